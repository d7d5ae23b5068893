"""The nginx instances: the fake upstream, the reference reverse proxy and the trace sink.

Each is its own nginx (same Debian binary, own prefix and config) so that the proxy's workers and
CPU are its own, as the gateway's are: the fake is the same process in every row.
worker_processes is BENCH_NGINX_WORKERS (auto = one per core), like the gateway's tokio runtime
(one worker thread per core). No access log; keep-alive without a request cap so every row runs
over persistent connections (nginx closes after 1000 requests by default, hyper/uvicorn do not).
"""
import subprocess
import time
from pathlib import Path

from .processes import BenchError, Session
from .web import request

# The fake's answer: a complete chat.completion with usage, as OpenAI sends it (359 bytes).
RESPONSE = (
    '{"id":"chatcmpl-bench","object":"chat.completion","created":1735689600,'
    '"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":"assistant",'
    '"content":"Hello! How can I help you today?","refusal":null},"logprobs":null,'
    '"finish_reason":"stop"}],"usage":{"prompt_tokens":19,"completion_tokens":9,'
    '"total_tokens":28},"system_fingerprint":"fp_bench"}'
)


def config(prefix: Path, workers: str, http_body: str) -> str:
    """A whole nginx.conf for an instance living in `prefix`, with `http_body` inside http{}."""
    return f"""daemon off;
master_process on;
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 8192; multi_accept on; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/tmp/body;
  proxy_temp_path {prefix}/tmp/proxy;
  fastcgi_temp_path {prefix}/tmp/fastcgi;
  uwsgi_temp_path {prefix}/tmp/uwsgi;
  scgi_temp_path {prefix}/tmp/scgi;
  keepalive_requests 100000000;
  keepalive_timeout 300s;
{http_body}}}
"""


def fake_server(port: int) -> str:
    """POST /v1/chat/completions answers RESPONSE; anything else 405 or 404."""
    return f"""  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location = /v1/chat/completions {{
      if ($request_method != POST) {{ return 405; }}
      default_type application/json;
      return 200 '{RESPONSE}';
    }}
    location / {{ return 404; }}
  }}
"""


def proxy_server(port: int, fake_port: int) -> str:
    """A reverse proxy to the fake over keep-alive upstream connections, adding the key."""
    return f"""  upstream fake {{
    server 127.0.0.1:{fake_port};
    keepalive 64;
    keepalive_requests 100000000;
  }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://fake;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer sk-bench";
    }}
  }}
"""


def sink_server(port: int) -> str:
    """200 `{}` to every request: stands in for MLflow's OTLP and trace-info endpoints."""
    return f"""  client_max_body_size 64m;
  client_body_buffer_size 16m;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{ default_type application/json; return 200 '{{}}'; }}
  }}
"""


class Nginx:
    """One nginx instance: its config written (and checked by `nginx -t`) under RUN/nginx-NAME."""

    def __init__(self, session: Session, name: str, workers: str, http_body: str):
        self.session = session
        self.name = f"nginx-{name}"
        self.prefix = session.run / self.name
        (self.prefix / "tmp").mkdir(parents=True)
        self.conf = self.prefix / "nginx.conf"
        self.conf.write_text(config(self.prefix, workers, http_body))
        self.proc = None

    def _args(self):
        return ["-e", f"{self.prefix}/error.log", "-p", str(self.prefix), "-c", str(self.conf)]

    def start(self) -> int:
        """Checks the config, starts nginx in the foreground of its own process; returns its pid."""
        checked = subprocess.run(["nginx", "-t", "-q", *self._args()], stdin=subprocess.DEVNULL,
                                 timeout=30)
        if checked.returncode != 0:
            raise BenchError(f"nginx rejected {self.conf}")
        self.proc = self.session.start(self.name, ["nginx", *self._args()])
        return self.proc.pid

    def stop(self) -> None:
        if self.proc:
            self.session.stop(self.proc)
            self.proc = None


def wait_posts(urls, seconds: float = 10) -> None:
    """Waits until a POST to each URL answers 2xx (the fake's location is POST-only: a GET gets
    405, so readiness is probed with a POST)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if all(request(u, b"{}", timeout=2)[0] // 100 == 2 for u in urls):
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise BenchError("nginx did not start (logs: nginx-*/error.log in the run directory)")
        time.sleep(0.1)
