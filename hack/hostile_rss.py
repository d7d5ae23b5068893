#!/usr/bin/env python3
"""Peak memory of the gateway under hostile input: one fresh gateway process per input, its peak
resident set (VmHWM from /proc/<pid>/status) after the input, and the time of a normal request
served right after it. Python standard library only; the provider is `hostile-llm` (tools/dev).

  python3 hack/hostile_rss.py                 # builds the debug binaries first
  HOSTILE_PROFILE=release python3 hack/hostile_rss.py
  HOSTILE_BUILD=0 ...                         # use the binaries as they are

Inputs (issue #14): four concurrent 10 MB bodies of tiny JSON values; a 300 MB upstream answer;
a 300 MB event-stream line; 500 half-sent requests held open (half inside their headers, half
inside their body). Every setting is the gateway's default except the ones printed.
"""

import concurrent.futures
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROFILE = os.environ.get("HOSTILE_PROFILE", "debug")
TARGET = ROOT / "target" / PROFILE
KEY = "sk-hostile-rss"
MIB = 1 << 20


def build():
    if os.environ.get("HOSTILE_BUILD", "1") == "0":
        return
    flags = ["--release"] if PROFILE == "release" else []
    subprocess.run(["cargo", "build", "--quiet", *flags, "--bin", "mlflow-gateway-operator"],
                   cwd=ROOT, check=True)
    subprocess.run(["cargo", "build", "--quiet", *flags, "-p", "mgo-dev", "--bin", "hostile-llm"],
                   cwd=ROOT, check=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


class Gateway:
    def __init__(self, api_base, workdir, env=None):
        self.port = free_port()
        manifest = Path(workdir) / f"endpoint-{self.port}.yaml"
        manifest.write_text(
            "apiVersion: mlflow-gateway.dev/v1alpha1\nkind: GatewayEndpoint\n"
            "metadata: {name: chat, namespace: bench, uid: hostile}\n"
            "spec:\n  endpointType: llm/v1/chat\n  usageTracking: false\n  models:\n"
            f"    - {{name: main, provider: openai, model: m, apiBase: \"{api_base}\", "
            "apiKeySecretRef: {name: keys, key: k}}\n  access: {open: true}\n")
        full_env = {"PATH": os.environ.get("PATH", ""), "RUST_LOG": "warn",
                    "GATEWAY_API_KEY_MAIN": KEY, **(env or {})}
        self.proc = subprocess.Popen(
            [str(TARGET / "mlflow-gateway-operator"), "gateway", "--endpoint", str(manifest),
             "--listen", f"127.0.0.1:{self.port}"],
            env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                if self.request("GET", "/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("the gateway did not become ready")

    def request(self, method, path, body=None, timeout=120):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            headers = {"content-type": "application/json"} if body is not None else {}
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def chat(self, text, stream=False):
        body = json.dumps({"model": "chat", "stream": stream,
                           "messages": [{"role": "user", "content": text}]})
        return self.request("POST", "/v1/chat/completions", body)

    def normal_ms(self):
        t0 = time.perf_counter()
        status, _ = self.chat("hello")
        ms = (time.perf_counter() - t0) * 1000
        if status != 200:
            raise RuntimeError(f"a normal request got {status}")
        return ms

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def four_bodies(gw):
    body = '{"model":"chat","messages":[{"role":"user","content":"hi"}],"pad":['
    body += "0," * ((10_000_000 - len(body) - 3) // 2) + "0]}"
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda _: gw.request("POST", "/v1/chat/completions", body)[0],
                            range(4)))
    return ",".join(map(str, got))


def huge_answer(gw):
    return str(gw.chat("huge-answer")[0])


def endless_line(gw):
    return str(gw.chat("endless-line", stream=True)[0])


def half_sent(gw):
    held = []
    for i in range(500):
        s = socket.create_connection(("127.0.0.1", gw.port))
        if i % 2 == 0:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Ty")
        else:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
                      b"Content-Type: application/json\r\nContent-Length: 2000\r\n\r\n"
                      b'{"model":"chat","messages":[')
        held.append(s)
    gw.held = held  # closed after the normal request
    return "held"


INPUTS = [
    ("4 concurrent 10 MB bodies of tiny JSON values", four_bodies),
    ("a 300 MB upstream answer", huge_answer),
    ("a 300 MB event-stream line", endless_line),
    ("500 half-sent requests held open", half_sent),
]


def main():
    build()
    hostile = subprocess.Popen([str(TARGET / "hostile-llm"), "--size", str(300 * MIB)],
                               stdout=subprocess.PIPE, text=True)
    try:
        base = hostile.stdout.readline().strip() + "/v1"
        rows = []
        with tempfile.TemporaryDirectory() as workdir:
            idle = Gateway(base, workdir)
            idle.normal_ms()
            rows.append(("(idle, one normal request)", "200", peak_rss(idle.proc.pid), None))
            idle.stop()
            for name, run in INPUTS:
                gw = Gateway(base, workdir)
                gw.normal_ms()
                statuses = run(gw)
                ms = gw.normal_ms()
                peak = peak_rss(gw.proc.pid)
                for s in getattr(gw, "held", []):
                    s.close()
                gw.stop()
                rows.append((name, statuses, peak, ms))
        print(f"gateway {PROFILE} build, default limits; peak RSS = VmHWM of a fresh process")
        print(f"{'input':<48} {'answers':<16} {'peak RSS':>9} {'next request':>13}")
        for name, statuses, peak, ms in rows:
            nxt = f"{ms:.0f} ms" if ms is not None else "-"
            print(f"{name:<48} {statuses:<16} {peak / MIB:>5.0f} MiB {nxt:>13}")
    finally:
        hostile.terminate()
        hostile.wait()


if __name__ == "__main__":
    sys.exit(main())
