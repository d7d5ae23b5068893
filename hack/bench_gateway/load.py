"""Load runs with wrk: the request script, a warm-up and a measured run per connection count,
and wrk's text output parsed into numbers.

Every wrk run is bounded (warm-up + 30 s, measured run + request timeout + 30 s), its output kept
in the run directory as wrk-ROW-CONC[-warmup].txt. The CPU of the servers under test, of the
trace receiver beside them and the machine's steal are read right before and after each
measured run.
"""
import json
import os
import re
import subprocess
from pathlib import Path

from . import cpu
from .processes import Session, log, run_bounded
from .settings import Settings

# wrk's request: the model comes from BENCH_MODEL (the endpoint name for the gateways, the
# upstream model for direct and nginx); the body is web.chat_body's.
LUA = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-client"
wrk.body = '{"model":"' .. (os.getenv("BENCH_MODEL") or "gpt-4o-mini") .. '",'
  .. '"messages":[{"role":"system","content":"You are a helpful assistant."},'
  .. '{"role":"user","content":"Say hello."}],"max_tokens":16,"temperature":0}'
"""

_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4, "h": 3.6e6}


def parse_wrk(text: str) -> dict:
    """requests, rps, p50/p75/p90/p99 (ms, when wrk printed --latency's distribution),
    socket_errors (connect + read + write + timeout), timeouts, non2xx from wrk's output.
    Missing figures are 0 (a run that failed to start)."""
    r = {}
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)", text)
    r["requests"] = int(m.group(1)) if m else 0
    m = re.search(r"Requests/sec:\s*([\d.]+)", text)
    r["rps"] = float(m.group(1)) if m else 0.0
    for p, v, u in re.findall(r"^\s*(50|75|90|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", text,
                              re.M):
        r[f"p{p}"] = float(v) * _UNIT_MS[u]
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    r["socket_errors"] = sum(map(int, m.groups())) if m else 0
    r["timeouts"] = int(m.group(4)) if m else 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    r["non2xx"] = int(m.group(1)) if m else 0
    return r


class Load:
    """Runs wrk for every row; appends one JSON object per measured run (or skipped row and
    connection count) to RUN/results.jsonl, which the report reads."""

    def __init__(self, session: Session, settings: Settings):
        self.session = session
        self.settings = settings
        self.script = session.run / "chat.lua"
        self.script.write_text(LUA)
        self.results = session.run / "results.jsonl"
        self.results.touch()
        # one JSON object per traced row: its request and trace counts
        self.traces = session.run / "traces.jsonl"
        self.traces.touch()

    def _wrk(self, out: Path, model: str, url: str, conns: int, seconds: int, timeout: float,
             latency: bool) -> int | None:
        s = self.settings
        argv = ["wrk", f"-t{s.threads}", f"-c{conns}", f"-d{seconds}s", "--timeout",
                f"{s.wrk_timeout}s", *(["--latency"] if latency else []), "-s", str(self.script),
                url]
        with open(out, "wb") as f:
            return run_bounded(argv, timeout, stdout=f, stderr=subprocess.STDOUT,
                               env={**os.environ, "BENCH_MODEL": model})

    def bench(self, row: str, label: str, url: str, model: str, pids, side_pid=None,
              between_runs=None) -> int:
        """Warm-up and measured runs at every connection count for one row. `pids`: the servers
        under test (their CPU per request is reported); `side_pid`: the trace receiver, whose
        CPU is reported beside; `between_runs`: called after each measured run (export drain).
        Returns the requests wrk completed, warm-ups included."""
        s = self.settings
        sent = 0
        for c in s.connections:
            if s.warmup > 0:
                out = self.session.run / f"wrk-{row}-{c}-warmup.txt"
                self._wrk(out, model, url, c, s.warmup, s.warmup + 30, latency=False)
                sent += parse_wrk(out.read_text(errors="replace"))["requests"]
            log(f"{label}, {c} connections, {s.duration}s")
            side0 = cpu.cpu_seconds(side_pid) if side_pid else 0.0
            cpu0 = cpu.cpu_seconds(*pids)
            stat0 = cpu.read_cpu_line()
            out = self.session.run / f"wrk-{row}-{c}.txt"
            rc = self._wrk(out, model, url, c, s.duration, s.duration + s.wrk_timeout + 30,
                           latency=True)
            cpu1 = cpu.cpu_seconds(*pids)
            stat1 = cpu.read_cpu_line()
            side1 = cpu.cpu_seconds(side_pid) if side_pid else 0.0
            if rc != 0:
                log(f"warning: wrk {'timed out' if rc is None else f'exited with {rc}'} ({out})")
            r = parse_wrk(out.read_text(errors="replace"))
            sent += r["requests"]
            r.update(row=row, label=label, conc=c, cpu_s=cpu1 - cpu0, side_cpu_s=side1 - side0,
                     steal_pct=cpu.steal_pct(stat0, stat1))
            self._append(r)
            if between_runs:
                between_runs()
        return sent

    def skip(self, row: str, label: str, reason: str) -> None:
        for c in self.settings.connections:
            self._append(dict(row=row, label=label, conc=c, skipped=reason))

    def note_traces(self, row: str, *counts: dict) -> None:
        """Records a traced row's request and trace counts (the dicts merged)."""
        record = {"row": row}
        for c in counts:
            record.update(c)
        _append(self.traces, record)

    def _append(self, record: dict) -> None:
        _append(self.results, record)

    def rows(self) -> list[dict]:
        return _read(self.results)

    def traced_rows(self) -> list[dict]:
        return _read(self.traces)


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
