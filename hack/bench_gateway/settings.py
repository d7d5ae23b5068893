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
    )


def mlflow_version() -> str:
    """The pinned MLflow version, from hack/lib.sh (the one place it is written)."""
    for line in (REPO_ROOT / "hack/lib.sh").read_text().splitlines():
        if line.startswith("MLFLOW_VERSION="):
            return line.split("=", 1)[1].strip()
    return "?"
