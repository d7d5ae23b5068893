"""This gateway's rows: tracing off, tracing on into a real MLflow (niced or not), tracing on into
a sink. Each runs `mlflow-gateway-operator gateway` on a GatewayEndpoint manifest whose one model
is the fake upstream, with a clean environment (no MLflow or gateway settings inherited)."""
import os
import time
from pathlib import Path

from . import cpu
from .load import Load
from .mlflow import MlflowServer
from .nginx import Nginx, sink_server
from .processes import Session, free_port, log
from .settings import Settings
from .watch import parse_exposition, sample
from .web import answers, check_target, metric_sum, request

# Variables the gateway reads that the caller's environment must not leak into a row.
_UNSET = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_TRACKING_TOKEN",
          "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "RUST_LOG", "LOG_FORMAT",
          "GATEWAY_MAX_BODY_BYTES", "GATEWAY_ATTEMPT_TIMEOUT_SECONDS",
          "GATEWAY_TRACE_QUEUE_DIR", "GATEWAY_TRACE_QUEUE_MAX_BYTES", "GATEWAY_TRACE_EXPORT_MODE")

LABELS = {
    "off": "this gateway, tracing off",
    "on": "this gateway, tracing on",
    "on-nice": "this gateway, on, MLflow niced",
    "sink": "this gateway, tracing on, sink",
}


def manifest(fake_port: int, usage_tracking: bool) -> str:
    return f"""apiVersion: mlflow-gateway.dev/v1alpha1
kind: GatewayEndpoint
metadata: {{name: bench, namespace: default, uid: bench-uid}}
spec:
  models:
    - {{name: fake, provider: openai, model: gpt-4o-mini, apiBase: "http://127.0.0.1:{fake_port}/v1", apiKeySecretRef: {{name: k, key: k}}}}
  usageTracking: {'true' if usage_tracking else 'false'}
  access: {{open: true}}
"""


class GatewayGone(Exception):
    """The gateway's /metrics did not answer (it exited or hangs)."""


class Gateway:
    """One running gateway process (for one row)."""

    def __init__(self, session: Session, settings: Settings, row: str, fake_port: int,
                 usage_tracking: bool, port: int | None = None, binary: Path | None = None,
                 **env: str):
        """`port`: listen there (a restarted gateway keeps its port); `binary`: another build
        than BENCH_BIN's (today's export, for comparison)."""
        self.session = session
        endpoint = session.run / f"endpoint-{row}.yaml"
        endpoint.write_text(manifest(fake_port, usage_tracking))
        self.port = port or free_port()
        child_env = {k: v for k, v in os.environ.items() if k not in _UNSET}
        if settings.rust_log:
            child_env["RUST_LOG"] = settings.rust_log
        child_env.update(GATEWAY_API_KEY_FAKE="sk-bench", **env)
        name = f"gateway-{row}"
        self.proc = session.start(name, [str(binary or settings.binary), "gateway", "--endpoint",
                                         str(endpoint), "--listen", f"127.0.0.1:{self.port}"],
                                  env=child_env)
        self.url = f"http://127.0.0.1:{self.port}/gateway/mlflow/v1/chat/completions"
        self.name, self.log_name = name, f"{name}.log"
        session.wait_http(f"http://127.0.0.1:{self.port}/readyz", self.proc, 30, name)

    def metric(self, name: str) -> int:
        """The sum of the samples of `name` in the gateway's /metrics; GatewayGone if it does not
        answer."""
        try:
            status, body = request(f"http://127.0.0.1:{self.port}/metrics", timeout=10)
        except OSError as e:  # urllib's errors included
            raise GatewayGone(f"{self.name}: /metrics: {e}") from None
        if status != 200:
            raise GatewayGone(f"{self.name}: /metrics -> {status}")
        return metric_sum(body, name)

    def scrape(self) -> dict:
        """The export figures of /metrics (watch.sample); GatewayGone if it does not answer."""
        try:
            status, body = request(f"http://127.0.0.1:{self.port}/metrics", timeout=10)
        except OSError as e:
            raise GatewayGone(f"{self.name}: /metrics: {e}") from None
        if status != 200:
            raise GatewayGone(f"{self.name}: /metrics -> {status}")
        return sample(parse_exposition(body))

    def queued(self) -> int:
        """What waits in the export queue: traces (issue #15's queue) or spans (before it)."""
        s = self.scrape()
        return int(s.get("trace_queue_traces", s.get("trace_export_queue_spans", 0)))

    def exported(self) -> int:
        """Traces delivered (issue #15: stored by MLflow) or, before it, trace infos sent."""
        s = self.scrape()
        return int(s.get("traces_delivered_total", s.get("traces_exported_total", 0)))

    def alive(self) -> bool:
        return answers(f"http://127.0.0.1:{self.port}/metrics")

    def trace_counts(self, wrk_completed: int) -> dict:
        m = self.metric
        s = self.scrape()
        return dict(answered=m("mlflow_gateway_requests_total"), wrk_completed=wrk_completed,
                    exported=self.exported(), queued=self.queued(),
                    queued_bytes=s.get("trace_queue_bytes"),
                    spans_exported=m("mlflow_gateway_spans_exported_total"),
                    dropped=m("mlflow_gateway_spans_dropped_total"),
                    dropped_traces=m("mlflow_gateway_traces_dropped_total"),
                    failed=m("mlflow_gateway_spans_export_failed_total"))

    def stop(self) -> None:
        self.session.stop(self.proc)


def label(settings: Settings, row: str) -> str:
    """A row's label; a tracing row's names its export mode when BENCH_EXPORT_MODE sets one."""
    if row != "off" and settings.export_mode:
        return f"{LABELS[row]} [{settings.export_mode}]"
    return LABELS[row]


def export_env(settings: Settings) -> dict[str, str]:
    """The export settings of a tracing row (BENCH_EXPORT_MODE, BENCH_QUEUE_MAX_BYTES)."""
    env = {}
    if settings.export_mode:
        env["GATEWAY_TRACE_EXPORT_MODE"] = settings.export_mode
    if settings.queue_max_bytes:
        env["GATEWAY_TRACE_QUEUE_MAX_BYTES"] = str(settings.queue_max_bytes)
    return env


def _bench(gw: Gateway, settings: Settings, load: Load, row: str, **kwargs) -> int:
    """The check request, then the load; a failed check skips the row. Returns wrk's count."""
    if not check_target(gw.url, "bench"):
        load.skip(row, label(settings, row), f"check request failed (log: {gw.log_name})")
        return 0
    return load.bench(row, label(settings, row), gw.url, "bench", [gw.proc.pid], **kwargs)


def run_off(session: Session, settings: Settings, load: Load, fake_port: int) -> None:
    gw = Gateway(session, settings, "off", fake_port, False)
    _bench(gw, settings, load, "off")
    gw.stop()


def run_traced_mlflow(session: Session, settings: Settings, load: Load, fake_port: int,
                      row: str, nice: int) -> None:
    """Tracing on, exporting to a fresh MLflow server whose processes (the server and its uvicorn
    workers) run at niceness `nice`; MLflow's CPU during each run is reported beside."""
    log(f"starting the MLflow server that receives this gateway's traces ({row}, nice {nice})")
    server = MlflowServer(session, f"mlflow-traces-{row}")
    experiment = server.create_experiment("bench-gateway")
    if nice:
        cpu.renice_tree(server.pid, nice)
    cpu0 = cpu.cpu_seconds(server.pid)
    gw = Gateway(session, settings, row, fake_port, True, MLFLOW_TRACKING_URI=server.uri,
                 MLFLOW_EXPERIMENT_ID=experiment, **export_env(settings))

    def drain():
        """Waits (bounded) until the span export queue is empty and neither the gateway's
        exported-trace counter (trace-info requests) nor MLflow's trace count moved for 2 s."""
        log(f"waiting for trace export to drain (at most {settings.drain_timeout} s)")
        deadline, prev = time.monotonic() + settings.drain_timeout, None
        try:
            while time.monotonic() < deadline:
                queued = gw.queued()
                now = (gw.exported(), server.count_traces(experiment))
                if queued == 0 and now == prev:
                    return
                prev = now
                time.sleep(2)
        except GatewayGone as e:
            log(f"warning: no drain: {e}")
            return
        log(f"warning: trace export did not drain within {settings.drain_timeout} s")

    sent = _bench(gw, settings, load, row, side_pid=server.pid, between_runs=drain)
    if gw.alive():
        load.note_traces(row, server.trace_stats(experiment), gw.trace_counts(sent),
                         dict(experiment=experiment,
                              receiver_cpu_s=cpu.cpu_seconds(server.pid) - cpu0, nice=nice))
    gw.stop()
    server.stop()  # frees its CPU for the next row


def run_sink(session: Session, settings: Settings, load: Load, fake_port: int) -> None:
    """Tracing on, exporting to an nginx that answers 200 at once: every trace is exported."""
    sink_port = free_port()
    sink = Nginx(session, "sink", settings.nginx_workers, sink_server(sink_port))
    sink_pid = sink.start()
    cpu0 = cpu.cpu_seconds(sink_pid)
    gw = Gateway(session, settings, "sink", fake_port, True,
                 MLFLOW_TRACKING_URI=f"http://127.0.0.1:{sink_port}", MLFLOW_EXPERIMENT_ID="1",
                 **export_env(settings))

    def drain():  # bounded: until the export queue is empty
        deadline = time.monotonic() + 30
        try:
            while gw.queued() != 0 and time.monotonic() < deadline:
                time.sleep(0.5)
        except GatewayGone as e:
            log(f"warning: no drain: {e}")

    sent = _bench(gw, settings, load, "sink", side_pid=sink_pid, between_runs=drain)
    if gw.alive():
        load.note_traces("sink", gw.trace_counts(sent),
                         dict(receiver_cpu_s=cpu.cpu_seconds(sink_pid) - cpu0))
    gw.stop()
    sink.stop()
