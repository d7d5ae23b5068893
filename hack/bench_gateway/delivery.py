"""The trace-delivery benchmark (issue #15), not a test:
`python3 -m hack.bench_gateway.delivery` from the repository root.

Does every trace reach MLflow? Three scenarios, each against a fresh real MLflow server
(hack/mlflow.sh: sqlite, 2 workers) and a fake upstream answering after a realistic latency
(tools/dev's `fake-llm --delay-ms`, 200 ms by default), with a closed-loop client (loadgen.py)
that keeps the `x-mlflow-trace-id` of every answered request:

  sustained  BENCH_SUSTAIN_CONNECTIONS (40: about 200 requests/s at 200 ms, 5x what one MLflow
             server stores on the 2-core machine) for BENCH_SUSTAIN_SECONDS (180), then the
             drain (until the gateway's queue is empty, at most BENCH_DELIVERY_DRAIN s); once per
             export mode (BENCH_MODES) and once with today's export (BENCH_OLD_BIN), each with a
             fresh MLflow. The gateway's CPU per request and MLflow's CPU per stored trace are
             read from /proc over the load and the drain.
  outage     BENCH_OUTAGE_CONNECTIONS (4: about 20 requests/s, a rate MLflow keeps up with);
             MLflow is stopped (its process group, SIGTERM) after BENCH_OUTAGE_LEAD s, started
             again on the same port and database BENCH_OUTAGE_SECONDS later, the load goes on
             for BENCH_OUTAGE_LEAD s more, then the drain.
  restart    BENCH_RESTART_CONNECTIONS for BENCH_RESTART_SECONDS; half way the gateway gets
             SIGTERM (SIGKILL after BENCH_RESTART_GRACE s, as a kubelet does) or SIGKILL, and a
             new one starts at once on the same port with the same queue directory; the clients
             reconnect by themselves. Once per BENCH_RESTART_SIGNALS.

Each reports requests served (2xx answers the clients received), traces stored (MLflow's
search-traces API, the traces' ids compared with the served ones: missing and extra), traces
dropped and the queue's peak (the gateway's /metrics, polled every 0.5 s: metric names in
watch.py), and how long the drain took. The gateways of issue #15 get a disk queue in the run
directory (GATEWAY_TRACE_QUEUE_DIR, as the pods' emptyDir). Settings: DeliverySettings in
settings.py. Everything listens on 127.0.0.1; every process started is stopped by pid on exit;
every load is bounded in time.
"""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

from . import cpu
from .delivery_report import render
from .gateway import Gateway
from .loadgen import Load
from .mlflow import MlflowServer
from .processes import BenchError, Session, exit_status, log, run_bounded
from .settings import REPO_ROOT, DeliverySettings, SettingsError, delivery_from_env
from .tools import gateway_binary
from .watch import Watch, wait_until
from .web import chat_body

PATH = "/gateway/mlflow/v1/chat/completions"
HEADERS = {"authorization": "Bearer sk-client"}


def start_fake(session: Session, ds: DeliverySettings) -> int:
    """The fake upstream (fake-llm, key sk-bench: the gateway's GATEWAY_API_KEY_FAKE); its port."""
    proc = session.start("fake-llm", [str(ds.fake_binary), "--api-key", "sk-bench",
                                      "--delay-ms", str(ds.delay_ms)])
    deadline = time.monotonic() + 30
    out = session.run / "fake-llm.log"
    while time.monotonic() < deadline:
        first = out.read_text().splitlines()[:1]
        if first and first[0].startswith("http://127.0.0.1:"):
            return int(first[0].rsplit(":", 1)[1])
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise BenchError(f"fake-llm did not start (log: {out})")


class Run:
    """One scenario's stack: a fresh MLflow, its experiment, a gateway exporting there (of the
    build and mode given), its metrics watched."""

    def __init__(self, session: Session, ds: DeliverySettings, fake_port: int, row: str,
                 mode: str | None, old: bool = False):
        self.session, self.ds, self.fake_port, self.row = session, ds, fake_port, row
        self.mode, self.old = mode, old
        log(f"{row}: starting its MLflow server")
        self.server = MlflowServer(session, f"mlflow-{row}")
        self.experiment = self.server.create_experiment(f"bench-delivery-{row}")
        self.queue_dir = session.run / f"queue-{row}"
        self.lives = 0
        self.gw = self.start_gateway()
        self.watch = Watch(self.gw.port).start()
        self.check_ids = [self.check()]

    def start_gateway(self, port: int | None = None) -> Gateway:
        self.lives += 1
        env = dict(MLFLOW_TRACKING_URI=self.server.uri, MLFLOW_EXPERIMENT_ID=self.experiment)
        if not self.old:
            env["GATEWAY_TRACE_QUEUE_DIR"] = str(self.queue_dir)
            if self.mode:
                env["GATEWAY_TRACE_EXPORT_MODE"] = self.mode
            if self.ds.queue_max_bytes:
                env["GATEWAY_TRACE_QUEUE_MAX_BYTES"] = str(self.ds.queue_max_bytes)
        return Gateway(self.session, self.ds.base, f"{self.row}-{self.lives}", self.fake_port,
                       True, port=port,
                       binary=self.ds.old_binary if self.old else None, **env)

    def check(self) -> str:
        """One request through the gateway: 200 from the fake, with a trace id (returned)."""
        status, body, trace_id = _post(self.gw.port)
        if status != 200 or "reply from" not in body or not trace_id:
            raise BenchError(f"{self.row}: check request -> {status} {body[:300]} "
                             f"(log: {self.session.run}/{self.gw.log_name})")
        return trace_id

    def load(self, conns: int, seconds: float) -> Load:
        return Load(self.gw.port, PATH, chat_body("bench"), HEADERS, conns, seconds).start()

    def queued(self) -> float | None:
        """Traces (spans for today's export) still in the gateway's queue; None if it did not
        answer."""
        s = self.watch.scrape()
        if s is None:
            return None
        if "trace_queue_traces" in s:
            return s["trace_queue_traces"]
        return s.get("trace_export_queue_spans")

    def drain(self) -> tuple[float, bool]:
        """Waits until the queue is empty (today's export: its span queue empty and its trace-info
        counter still for 3 s), at most BENCH_DELIVERY_DRAIN s; (seconds, drained)."""
        log(f"{self.row}: draining (at most {self.ds.drain} s)")
        t0, last_log = time.monotonic(), [time.monotonic()]
        prev = [None]

        def empty():
            q = self.queued()
            if time.monotonic() - last_log[0] >= 15:
                log(f"{self.row}: {q} still queued")
                last_log[0] = time.monotonic()
            if q != 0:
                prev[0] = None
                return False
            if not self.old:
                return True
            exported = self.watch.totals.total("traces_exported_total")
            done = exported == prev[0]
            prev[0] = exported
            return done

        ok = wait_until(empty, self.ds.drain, every=1.0 if not self.old else 3.0)
        return time.monotonic() - t0, ok

    def count(self, served_ids: list[str]) -> dict:
        """Stops the gateway (SIGTERM: its own shutdown, which may deliver more), then counts the
        traces MLflow holds, through its search API, compared with the served ids."""
        self.watch.stop()
        self.session.stop(self.gw.proc)
        infos = self.server.trace_infos(self.experiment)
        stored = {t.get("trace_id") for t in infos}
        served = set(served_ids)
        return dict(stored=len(infos), stored_served=len(stored & served),
                    missing=len(served - stored), extra=len(stored - served),
                    with_preview=sum(1 for t in infos if t.get("request_preview")),
                    sample_missing=sorted(served - stored)[:3])

    def finish(self) -> None:
        self.server.stop()  # frees its CPU for the next run; its database stays until the end


def _post(port: int) -> tuple[int, str, str | None]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{PATH}", data=chat_body("bench"),
                                 headers={"content-type": "application/json", **HEADERS},
                                 method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read().decode(errors="replace"), \
                resp.headers.get("x-mlflow-trace-id")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace"), None
    except (urllib.error.URLError, OSError) as e:
        return 0, str(e), None


def _common(run: Run, result, drained: tuple[float, bool]) -> dict:
    """The figures every scenario reports; stops the gateway (see Run.count)."""
    left = run.queued()
    totals, peaks = run.watch.snapshot()
    served_ids = run.check_ids + result.ids
    counted = run.count(served_ids)
    return dict(
        row=run.row, mode=run.mode or ("today" if run.old else "default"), old=run.old,
        served=result.ok + len(run.check_ids), served_with_id=len(served_ids),
        load_seconds=round(result.seconds, 1), statuses=dict(result.statuses),
        client_errors=dict(result.errors), drain_seconds=round(drained[0], 1),
        drained=drained[1], left_in_queue=left, totals=totals, peaks=peaks, **counted)


def sustained(session: Session, ds: DeliverySettings, fake_port: int, mode: str | None,
              old: bool) -> dict:
    row = "sustained-today" if old else f"sustained-{mode}"
    run = Run(session, ds, fake_port, row, mode, old)
    gw_cpu0, ml_cpu0, stat0 = (cpu.cpu_seconds(run.gw.proc.pid),
                               cpu.cpu_seconds(run.server.pid), cpu.read_cpu_line())
    log(f"{row}: {ds.sustain_connections} connections for {ds.sustain_seconds} s")
    result = run.load(ds.sustain_connections, ds.sustain_seconds).join()
    drained = run.drain()
    gw_cpu, ml_cpu = (cpu.cpu_seconds(run.gw.proc.pid) - gw_cpu0,
                      cpu.cpu_seconds(run.server.pid) - ml_cpu0)
    stat1 = cpu.read_cpu_line()
    out = _common(run, result, drained)
    out.update(scenario="sustained", conns=ds.sustain_connections, gateway_cpu_s=gw_cpu,
               mlflow_cpu_s=ml_cpu, steal_pct=cpu.steal_pct(stat0, stat1),
               busy_pct=cpu.busy_pct(stat0, stat1), loadavg=cpu.loadavg())
    run.finish()
    return out


def outage(session: Session, ds: DeliverySettings, fake_port: int) -> dict:
    run = Run(session, ds, fake_port, "outage", ds.mode)
    total = ds.outage_lead * 2 + ds.outage_seconds
    log(f"outage: {ds.outage_connections} connections for {total} s; MLflow down from "
        f"{ds.outage_lead} s for {ds.outage_seconds} s")
    load = run.load(ds.outage_connections, total)
    t0 = time.monotonic()
    _sleep_until(t0 + ds.outage_lead)
    run.server.stop()
    stopped = time.monotonic()
    log("outage: MLflow stopped")
    _sleep_until(stopped + ds.outage_seconds)
    queued_at_resume = run.queued()
    run.server.resume()
    down = time.monotonic() - stopped
    log(f"outage: MLflow back after {down:.0f} s ({queued_at_resume} traces queued)")
    result = load.join()
    drained = run.drain()
    out = _common(run, result, drained)
    out.update(scenario="outage", conns=ds.outage_connections,
               down_seconds=round(down, 1),
               queued_at_resume=queued_at_resume)
    run.finish()
    return out


def restart(session: Session, ds: DeliverySettings, fake_port: int, sig: str) -> dict:
    run = Run(session, ds, fake_port, f"restart-{sig.lower()}", ds.mode)
    log(f"restart-{sig.lower()}: {ds.restart_connections} connections for "
        f"{ds.restart_seconds} s; SIG{sig} half way")
    load = run.load(ds.restart_connections, ds.restart_seconds)
    _sleep_until(time.monotonic() + ds.restart_seconds / 2)
    before = run.watch.scrape() or {}
    run.watch.stop()
    signum = signal.SIGTERM if sig == "TERM" else signal.SIGKILL
    exit_s = session.end(run.gw.proc, signum, ds.restart_grace)
    rc = run.gw.proc.returncode
    log(f"restart-{sig.lower()}: the gateway exited ({rc}) {exit_s:.1f} s after SIG{sig}")
    on_disk = _dir_bytes(run.queue_dir)
    run.watch.totals.restarted()
    run.gw = run.start_gateway(port=run.gw.port)
    recovered = run.watch.scrape() or {}
    run.watch = _continue_watch(run.watch, run.gw.port)
    result = load.join()
    drained = run.drain()
    out = _common(run, result, drained)
    out.update(scenario="restart", signal=sig, conns=ds.restart_connections,
               exit_seconds=round(exit_s, 1), exit_status=rc,
               queued_before=before.get("trace_queue_traces"),
               queue_dir_bytes_at_restart=on_disk,
               recovered=recovered.get("trace_queue_traces"))
    run.finish()
    return out


def _continue_watch(old: Watch, port: int) -> Watch:
    """A new polling thread for the restarted gateway, keeping the totals so far."""
    w = Watch(port)
    w.totals = old.totals
    return w.start()


def _dir_bytes(path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def _sleep_until(t: float) -> None:
    while (left := t - time.monotonic()) > 0:
        time.sleep(min(left, 1.0))


def _build(ds: DeliverySettings) -> None:
    if ds.base.build:
        log("cargo build --release --locked -p mgo-dev --bin fake-llm")
        if run_bounded(["cargo", "build", "--release", "--locked", "--quiet", "-p", "mgo-dev",
                        "--bin", "fake-llm"], 3600, cwd=REPO_ROOT) != 0:
            raise BenchError("cargo build of fake-llm failed")
    if not gateway_binary(ds.base):
        raise BenchError(f"{ds.base.binary} has no working 'gateway' subcommand")
    for what, path in (("BENCH_FAKE_BIN", ds.fake_binary), ("BENCH_OLD_BIN", ds.old_binary)):
        if path is not None and not os.access(path, os.X_OK):
            raise BenchError(f"{what}: {path} is not an executable")


def run_all(session: Session, ds: DeliverySettings) -> list[dict]:
    fake_port = start_fake(session, ds)
    results = []
    out = session.run / "delivery.jsonl"

    def keep(r):
        results.append(r)
        with open(out, "a") as f:
            f.write(json.dumps(r) + "\n")
        log(f"{r['row']}: served {r['served']}, stored {r['stored']} "
            f"(missing {r['missing']}, extra {r['extra']})")

    if "sustained" in ds.scenarios:
        if ds.old_binary:
            keep(sustained(session, ds, fake_port, None, old=True))
        for mode in ds.modes:
            keep(sustained(session, ds, fake_port, mode, old=False))
    if "outage" in ds.scenarios:
        keep(outage(session, ds, fake_port))
    if "restart" in ds.scenarios:
        for sig in ds.restart_signals:
            keep(restart(session, ds, fake_port, sig))
    return results


def main() -> int:
    try:
        ds = delivery_from_env()
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.chdir(REPO_ROOT)
    session, status = None, 0
    try:
        _build(ds)
        session = Session(ds.base.keep)
        results = run_all(session, ds)
        if ds.base.json_out:
            ds.base.json_out.write_text("".join(json.dumps(r) + "\n" for r in results))
        sys.stdout.write(render(results, ds, ncpu=len(os.sched_getaffinity(0))))
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        status = 1
    except BaseException as e:  # Ctrl-C, SIGTERM, a bug: the session still cleans up
        status = exit_status(e)
        if status == 1:
            raise
    finally:
        if session:
            session.close(failed=status != 0)
    return status


if __name__ == "__main__":
    sys.exit(main())
