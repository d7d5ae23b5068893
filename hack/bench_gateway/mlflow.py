"""MLflow for the benchmark: tracking servers started with hack/mlflow.sh, the traces they stored
(read from their sqlite databases), and the row of MLflow's own AI gateway.

Each MLflow server gets a directory RUN/NAME and is registered for cleanup before it starts, so a
run ended during `hack/mlflow.sh up` still takes it down (`--owner-pid` covers a killed run).
Two kinds, so that MLflow's gateway traffic and our gateway's trace ingestion never share one:
  mlflow-traces-ROW  receives this gateway's traces (tracing-on rows), plain `hack/mlflow.sh up`
  mlflow-gw          hosts MLflow's AI gateway endpoint; only this one may call a loopback,
                     plain-http upstream (MLflow's SSRF policy is relaxed for it alone)
Both: `mlflow server --workers 2` (uvicorn) as hack/mlflow.sh starts it, sqlite, telemetry off.
"""
import os
import secrets
import sqlite3
import subprocess
import time
import urllib.error
from concurrent.futures import ThreadPoolExecutor

from .load import Load
from .processes import BenchError, Session, log, run_bounded
from .settings import REPO_ROOT, mlflow_version
from .web import chat_body, check_target, post_json, request

MLFLOW_SH = str(REPO_ROOT / "hack/mlflow.sh")


class MlflowServer:
    """One `mlflow server` in RUN/NAME, up until `stop` or the session's end."""

    def __init__(self, session: Session, name: str, **env: str):
        self.dir = session.run / name
        session.on_cleanup(self._cleanup)
        # bounded: a first run installs MLflow into its cached venv (1-2 min)
        status = run_bounded([MLFLOW_SH, "up", str(self.dir), "--owner-pid", str(os.getpid())],
                             900, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", **env},
                             stdout=subprocess.DEVNULL)
        if status != 0:
            raise BenchError(f"hack/mlflow.sh up {self.dir} failed (log: {self.dir}/mlflow.log)")
        values = dict(line.split("=", 1)
                      for line in (self.dir / "env").read_text().splitlines() if "=" in line)
        self.uri = values["MLFLOW_TRACKING_URI"]
        self.pid = int(values["MLFLOW_PID"])
        self.db = self.dir / "db/mlflow.db"

    def stop(self) -> None:
        """Stops the server (and its workers, its process group), keeping its port and
        database."""
        subprocess.run([MLFLOW_SH, "stop", str(self.dir)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=60)

    def resume(self) -> None:
        """Starts the stopped server again on the same port with the same database (a new pid)."""
        status = run_bounded([MLFLOW_SH, "resume", str(self.dir)], 300,
                             env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
                             stdout=subprocess.DEVNULL)
        if status != 0:
            raise BenchError(f"hack/mlflow.sh resume {self.dir} failed "
                             f"(log: {self.dir}/mlflow.log)")
        self.pid = int((self.dir / "pid").read_text().strip())

    def trace_infos(self, experiment: str, page: int = 500) -> list[dict]:
        """Every trace info stored in `experiment`, through MLflow's search-traces API
        (`POST /api/3.0/mlflow/traces/search`, 500 per page, its maximum): what a user sees."""
        found, token = [], None
        for _ in range(100_000):  # bounded: a page per 500 traces
            body = {"locations": [{"type": "MLFLOW_EXPERIMENT",
                                   "mlflow_experiment": {"experiment_id": experiment}}],
                    "max_results": page}
            if token:
                body["page_token"] = token
            answer = _retried(lambda: post_json(f"{self.uri}/api/3.0/mlflow/traces/search",
                                                body))
            found += answer.get("traces", [])
            token = answer.get("next_page_token")
            if not token:
                break
        return found

    def _cleanup(self, keep: bool) -> None:
        # `down` deletes the database; a kept run keeps it as db.kept
        if keep and self.dir.exists():
            self.stop()
            if (self.dir / "db").exists():
                (self.dir / "db").rename(self.dir / "db.kept")
        subprocess.run([MLFLOW_SH, "down", str(self.dir)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=60)

    def create_experiment(self, name: str) -> str:
        return post_json(f"{self.uri}/api/2.0/mlflow/experiments/create",
                         {"name": name})["experiment_id"]

    def _query(self, sql: str, experiment: str) -> int:
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30)
        try:
            return conn.execute(sql, (int(experiment),)).fetchone()[0]
        finally:
            conn.close()

    def count_traces(self, experiment: str) -> int:
        """Traces stored in `experiment`."""
        return self._query("select count(*) from trace_info where experiment_id = ?", experiment)

    def trace_stats(self, experiment: str) -> dict:
        """Traces stored, those with their root span, and spans stored in `experiment`."""
        return dict(
            stored=self.count_traces(experiment),
            rooted=self._query("select count(distinct trace_id) from spans where experiment_id = ?"
                               " and parent_span_id is null", experiment),
            spans_stored=self._query("select count(*) from spans where experiment_id = ?",
                                     experiment))


def run_mlflow_gateway(session: Session, load: Load, fake_port: int, drain_timeout: int) -> None:
    """The row of MLflow's own AI gateway.

    MLflow serves AI Gateway endpoints from the tracking server (/gateway/...), configured through
    its REST API: a secret (the API key, encrypted with a KEK derived from
    MLFLOW_CRYPTO_KEK_PASSPHRASE; the upstream URL is the secret's auth_config.api_base), a model
    definition (provider + model, bound to the secret) and an endpoint (model configs, usage
    tracking on: it then creates its own experiment and traces every call into it). api_base is
    checked on write and at connect time: https and public addresses only unless
    MLFLOW_GATEWAY_API_BASE_ALLOWED_SCHEMES / MLFLOW_GATEWAY_API_BASE_ALLOW_PRIVATE_IPS say
    otherwise; they are set for this benchmark's own MLflow server only."""
    log("starting the MLflow server that hosts MLflow's AI gateway")
    server = MlflowServer(session, "mlflow-gw",
                          MLFLOW_GATEWAY_API_BASE_ALLOWED_SCHEMES="http,https",
                          MLFLOW_GATEWAY_API_BASE_ALLOW_PRIVATE_IPS="true",
                          MLFLOW_CRYPTO_KEK_PASSPHRASE=f"bench-{secrets.token_hex(24)}")
    api = f"{server.uri}/api/3.0/mlflow/gateway"
    secret_id = post_json(f"{api}/secrets/create", {
        "secret_name": "bench-fake-key", "secret_value": {"api_key": "sk-bench"},
        "provider": "openai", "auth_config": {"api_base": f"http://127.0.0.1:{fake_port}/v1"},
    })["secret"]["secret_id"]
    model_id = post_json(f"{api}/model-definitions/create", {
        "name": "bench-fake", "secret_id": secret_id, "provider": "openai",
        "model_name": "gpt-4o-mini",
    })["model_definition"]["model_definition_id"]
    experiment = post_json(f"{api}/endpoints/create", {
        "name": "bench",
        "model_configs": [{"model_definition_id": model_id, "linkage_type": "PRIMARY",
                           "weight": 1}],
        "usage_tracking": True,
    })["endpoint"]["experiment_id"]
    label = f"MLflow gateway {mlflow_version()}"
    url = f"{server.uri}/gateway/mlflow/v1/chat/completions"
    if not check_target(url, "bench"):
        load.skip("mlflow", label, f"check request failed (log: {server.dir}/mlflow.log)")
        return
    deadline = time.monotonic() + 30
    while server.count_traces(experiment) < 1:
        if time.monotonic() >= deadline:
            raise BenchError(f"MLflow's gateway answered but stored no trace in experiment "
                             f"{experiment} within 30 s")
        time.sleep(0.5)
    _warm_up(url)
    sent = load.bench("mlflow", label, url, "bench", [server.pid])
    # Its traces are logged asynchronously inside the server: wait until the count stops moving.
    prev, deadline = -1, time.monotonic() + drain_timeout
    while (n := server.count_traces(experiment)) != prev and time.monotonic() < deadline:
        prev = n
        time.sleep(2)
    marker = 'POST /gateway/mlflow/v1/chat/completions HTTP/1.1" 200'
    answered = sum(marker in line for line in
                   (server.dir / "mlflow.log").read_text(errors="replace").splitlines())
    load.note_traces("mlflow", server.trace_stats(experiment),
                     dict(answered=answered, wrk_completed=sent, experiment=experiment))


def _retried(call, attempts: int = 6, pause: float = 5.0):
    """`call()`, tried again after a failure (a uvicorn worker that its supervisor restarts on a
    loaded machine drops its connections): at most `attempts` times, `pause` s apart."""
    for attempt in range(attempts):
        try:
            return call()
        except BenchError as e:
            if attempt == attempts - 1:
                raise
            log(f"warning: {e}; again in {pause:.0f} s")
            time.sleep(pause)


def _warm_up(url: str) -> None:
    """Each uvicorn worker takes seconds to answer its first gateway call (imports, provider
    setup): sends rounds of 8 parallel requests until a round takes under 1 s (at most 180 s)."""

    def one(_):
        try:
            request(url, chat_body("bench"), {"content-type": "application/json"}, timeout=60)
        except (urllib.error.URLError, OSError):
            pass  # a slow or failed warm-up request only means another round

    deadline = time.monotonic() + 180
    with ThreadPoolExecutor(8) as pool:
        while True:
            t0 = time.monotonic()
            list(pool.map(one, range(8)))
            if time.monotonic() - t0 < 1:
                return
            if time.monotonic() >= deadline:
                log("warning: MLflow's gateway is still slow after 180 s of warm-up")
                return
