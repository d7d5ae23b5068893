"""The benchmark's settings: every BENCH_* variable read once, in one place, into one value.

Environment (all optional):
  BENCH_DURATION=10        seconds per measured run
  BENCH_WARMUP=2           seconds of warm-up before each measured run (same connection count)
  BENCH_CONNECTIONS="32 128"
  BENCH_THREADS=2          wrk threads
  BENCH_TIMEOUT=10         wrk request timeout, s (slower answers count as errors and are
                           missing from wrk's percentiles, so it is well above any p99 seen)
  BENCH_NGINX_WORKERS=auto worker_processes of each nginx (auto = one per core)
  BENCH_TARGETS="direct nginx off on on-nice sink mlflow"   rows to run (direct is needed for "added")
  BENCH_BUILD=1            0: do not run `cargo build --release --locked` first
  BENCH_BIN=FILE           the gateway binary (default: target/release/mlflow-gateway-operator)
  BENCH_RUST_LOG=          RUST_LOG of the gateway (default: unset, i.e. its default, info;
                           the gateway logs nothing per request at info)
  BENCH_DRAIN_TIMEOUT=120  s to wait for trace export to drain after a tracing-on run
  BENCH_EXPORT_MODE=       GATEWAY_TRACE_EXPORT_MODE of the tracing rows (info-then-spans,
                           spans-only, adaptive; unset: the gateway's default), in their labels
  BENCH_QUEUE_MAX_BYTES=   GATEWAY_TRACE_QUEUE_MAX_BYTES of the tracing rows (unset: the
                           gateway's default; their queue is in memory, as without a queue dir)
  BENCH_JSON=FILE          also write the raw results (one JSON object per run) there
  BENCH_KEEP=1             keep the run directory (configs, logs, wrk outputs, MLflow dbs as
                           */db.kept); it is also kept when the benchmark fails
"""
import os
from dataclasses import dataclass
from pathlib import Path

# The repository root: hack/bench_gateway/ is two levels below it.
REPO_ROOT = Path(__file__).resolve().parent.parent.parent

ALL_TARGETS = ("direct", "nginx", "off", "on", "on-nice", "sink", "mlflow")
EXPORT_MODES = ("info-then-spans", "spans-only", "adaptive")


class SettingsError(ValueError):
    """A BENCH_* variable that cannot be used, with the variable's name in the message."""


@dataclass(frozen=True)
class Settings:
    duration: int
    warmup: int
    connections: tuple[int, ...]
    threads: int
    wrk_timeout: int
    nginx_workers: str
    targets: frozenset[str]
    build: bool
    binary: Path
    rust_log: str
    drain_timeout: int
    json_out: Path | None
    keep: bool
    export_mode: str | None = None
    queue_max_bytes: int | None = None

    def wants(self, row: str) -> bool:
        return row in self.targets


def _int(env, name, default, minimum):
    raw = env.get(name, "").strip() or str(default)
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a whole number") from None
    if value < minimum:
        raise SettingsError(f"{name}={value} is below {minimum}")
    return value


def from_env(env=os.environ) -> Settings:
    """Reads the settings from `env`; raises SettingsError naming the variable that is wrong."""
    conns_raw = env.get("BENCH_CONNECTIONS", "32 128")
    try:
        conns = tuple(int(c) for c in conns_raw.split())
    except ValueError:
        raise SettingsError(f"BENCH_CONNECTIONS={conns_raw!r} is not a list of numbers") from None
    if not conns or min(conns) < 1:
        raise SettingsError(f"BENCH_CONNECTIONS={conns_raw!r}: give one or more counts >= 1")
    targets = env.get("BENCH_TARGETS", " ".join(ALL_TARGETS)).split()
    unknown = [t for t in targets if t not in ALL_TARGETS]
    if unknown:
        raise SettingsError(
            f"BENCH_TARGETS: unknown row(s) {' '.join(unknown)} (rows: {' '.join(ALL_TARGETS)})")
    binary = Path(env.get("BENCH_BIN") or REPO_ROOT / "target/release/mlflow-gateway-operator")
    json_out = env.get("BENCH_JSON") or None
    mode = env.get("BENCH_EXPORT_MODE", "").strip() or None
    if mode is not None and mode not in EXPORT_MODES:
        raise SettingsError(f"BENCH_EXPORT_MODE={mode!r} (modes: {' '.join(EXPORT_MODES)})")
    queue = env.get("BENCH_QUEUE_MAX_BYTES", "").strip()
    return Settings(
        duration=_int(env, "BENCH_DURATION", 10, 1),
        warmup=_int(env, "BENCH_WARMUP", 2, 0),
        connections=conns,
        threads=_int(env, "BENCH_THREADS", 2, 1),
        wrk_timeout=_int(env, "BENCH_TIMEOUT", 10, 1),
        nginx_workers=env.get("BENCH_NGINX_WORKERS", "auto") or "auto",
        targets=frozenset(targets),
        build=env.get("BENCH_BUILD", "1") == "1",
        binary=binary if binary.is_absolute() else REPO_ROOT / binary,
        rust_log=env.get("BENCH_RUST_LOG", ""),
        drain_timeout=_int(env, "BENCH_DRAIN_TIMEOUT", 120, 0),
        json_out=Path(json_out) if json_out else None,
        keep=env.get("BENCH_KEEP", "0") == "1",
        export_mode=mode,
        queue_max_bytes=_int(env, "BENCH_QUEUE_MAX_BYTES", 0, 1) if queue else None,
    )


def mlflow_version() -> str:
    """The pinned MLflow version, from hack/lib.sh (the one place it is written)."""
    for line in (REPO_ROOT / "hack/lib.sh").read_text().splitlines():
        if line.startswith("MLFLOW_VERSION="):
            return line.split("=", 1)[1].strip()
    return "?"


# The delivery scenarios (`python3 -m hack.bench_gateway.delivery`, delivery.py).
SCENARIOS = ("sustained", "outage", "restart")
SIGNALS = ("TERM", "KILL")


@dataclass(frozen=True)
class DeliverySettings:
    """The delivery scenarios' settings; `base` holds the shared ones (BENCH_BIN, BENCH_BUILD,
    BENCH_RUST_LOG, BENCH_JSON, BENCH_KEEP).

    Environment (all optional):
      BENCH_SCENARIOS="sustained outage restart"
      BENCH_MODES="info-then-spans spans-only adaptive"  export modes of the sustained runs
                               (GATEWAY_TRACE_EXPORT_MODE); "" runs none
      BENCH_MODE=              the mode of the outage and restart runs (unset: the gateway's
                               default)
      BENCH_OLD_BIN=FILE       today's export (a build of commit 8846bd5, before issue #15): a
                               sustained run of it too, the floor's reference (unset: none)
      BENCH_FAKE_BIN=FILE      the fake upstream (default target/release/fake-llm, built by
                               `cargo build --release -p mgo-dev --bin fake-llm` unless
                               BENCH_BUILD=0)
      BENCH_UPSTREAM_DELAY_MS=200   the fake's latency
      BENCH_SUSTAIN_SECONDS=180     BENCH_SUSTAIN_CONNECTIONS=40
      BENCH_OUTAGE_CONNECTIONS=4    BENCH_OUTAGE_SECONDS=120 (MLflow stopped)
      BENCH_OUTAGE_LEAD=30          load before the outage and after MLflow is back
      BENCH_RESTART_CONNECTIONS=20  BENCH_RESTART_SECONDS=60 (the gateway restarts half way)
      BENCH_RESTART_SIGNALS="TERM KILL"
      BENCH_RESTART_GRACE=30        s between SIGTERM and SIGKILL (a pod's grace period)
      BENCH_DELIVERY_DRAIN=600      s at most to wait, after the load, for the queue to empty
      BENCH_QUEUE_MAX_BYTES=        GATEWAY_TRACE_QUEUE_MAX_BYTES (unset: the gateway's default)
    """
    base: Settings
    scenarios: tuple[str, ...]
    modes: tuple[str, ...]
    mode: str | None
    old_binary: Path | None
    fake_binary: Path
    delay_ms: int
    sustain_seconds: int
    sustain_connections: int
    outage_connections: int
    outage_seconds: int
    outage_lead: int
    restart_connections: int
    restart_seconds: int
    restart_signals: tuple[str, ...]
    restart_grace: int
    drain: int
    queue_max_bytes: int | None


def _words(env, name, default, allowed) -> tuple[str, ...]:
    words = tuple(env.get(name, " ".join(default)).split())
    unknown = [w for w in words if w not in allowed]
    if unknown:
        raise SettingsError(f"{name}: unknown {' '.join(unknown)} (known: {' '.join(allowed)})")
    return words


def _path(env, name, default: Path | None) -> Path | None:
    raw = env.get(name) or default
    if raw is None:
        return None
    p = Path(raw)
    return p if p.is_absolute() else REPO_ROOT / p


def delivery_from_env(env=os.environ) -> DeliverySettings:
    """Reads the delivery settings from `env`; raises SettingsError naming the variable."""
    mode = env.get("BENCH_MODE", "").strip() or None
    if mode is not None and mode not in EXPORT_MODES:
        raise SettingsError(f"BENCH_MODE={mode!r} (modes: {' '.join(EXPORT_MODES)})")
    queue = env.get("BENCH_QUEUE_MAX_BYTES", "").strip()
    return DeliverySettings(
        base=from_env(env),
        scenarios=_words(env, "BENCH_SCENARIOS", SCENARIOS, SCENARIOS),
        modes=_words(env, "BENCH_MODES", EXPORT_MODES, EXPORT_MODES),
        mode=mode,
        old_binary=_path(env, "BENCH_OLD_BIN", None),
        fake_binary=_path(env, "BENCH_FAKE_BIN", REPO_ROOT / "target/release/fake-llm"),
        delay_ms=_int(env, "BENCH_UPSTREAM_DELAY_MS", 200, 0),
        sustain_seconds=_int(env, "BENCH_SUSTAIN_SECONDS", 180, 1),
        sustain_connections=_int(env, "BENCH_SUSTAIN_CONNECTIONS", 40, 1),
        outage_connections=_int(env, "BENCH_OUTAGE_CONNECTIONS", 4, 1),
        outage_seconds=_int(env, "BENCH_OUTAGE_SECONDS", 120, 1),
        outage_lead=_int(env, "BENCH_OUTAGE_LEAD", 30, 1),
        restart_connections=_int(env, "BENCH_RESTART_CONNECTIONS", 20, 1),
        restart_seconds=_int(env, "BENCH_RESTART_SECONDS", 60, 2),
        restart_signals=_words(env, "BENCH_RESTART_SIGNALS", SIGNALS, SIGNALS),
        restart_grace=_int(env, "BENCH_RESTART_GRACE", 30, 0),
        drain=_int(env, "BENCH_DELIVERY_DRAIN", 600, 0),
        queue_max_bytes=_int(env, "BENCH_QUEUE_MAX_BYTES", 0, 1) if queue else None,
    )
