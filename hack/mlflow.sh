#!/usr/bin/env bash
# A real MLflow tracking server for tests and the demo.
#   hack/mlflow.sh install              create/reuse the cached venv, print its bin directory
#   hack/mlflow.sh up RUN_DIR [--auth] [--workspaces] [--workers N] [--host ADDR] [--owner-pid PID]
#       start `mlflow server` on a free 127.0.0.1 port with a fresh sqlite database in RUN_DIR,
#       or on ADDR instead of 127.0.0.1 (an address of the local stack that pods reach: the real
#       node's bridge, KUBE_NODE_HOST_IP; never a public interface),
#       wait for /health, write RUN_DIR/env (MLFLOW_TRACKING_URI=..., MLFLOW_PID=...) and print it.
#       --auth: MLflow's basic-auth app, admin user `admin` with password $MLFLOW_ADMIN_PASSWORD
#       (default: a random one, written to RUN_DIR/env as MLFLOW_ADMIN_PASSWORD). --workspaces: MLflow workspaces
#       (MLFLOW_ENABLE_WORKSPACES=true). --workers: uvicorn workers (default 2; a test's private
#       server uses 1: each worker is a Python process that imports MLflow, about 5 s of CPU).
#       --owner-pid: stop the server when that process ends.
#       MLflow's job runner (scorers and judges, 8 more processes and ~10 s of CPU per start) is off
#       unless MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true: nothing here uses it.
#   hack/mlflow.sh stop RUN_DIR         stop the server but keep its port and database
#   hack/mlflow.sh resume RUN_DIR       start it again on the same port with the same database
#   hack/mlflow.sh down RUN_DIR         stop exactly the server started in RUN_DIR, remove its state
set -euo pipefail
source "$(dirname "$0")/lib.sh"

venv=$CACHE_DIR/mlflow-$MLFLOW_VERSION-py$(python3 -c 'import sys;print("%d.%d"%sys.version_info[:2])')

install() {
  if [ -x "$venv/bin/mlflow" ] && [ -f "$venv/.complete" ] && [ -f "$venv/.openai-$OPENAI_SDK_VERSION" ]; then
    echo "$venv/bin"; return
  fi
  command -v python3 >/dev/null 2>&1 || die "python3 is required to run the MLflow tracking server"
  mkdir -p "$CACHE_DIR"
  exec 8>"$CACHE_DIR/mlflow.lock"; flock 8
  if [ ! -f "$venv/.complete" ]; then
    log "installing mlflow[auth]==$MLFLOW_VERSION into $venv (about 1-2 min)"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "mlflow[auth]==$MLFLOW_VERSION" >&2
    touch "$venv/.complete"
  fi
  if [ ! -f "$venv/.openai-$OPENAI_SDK_VERSION" ]; then
    log "installing openai==$OPENAI_SDK_VERSION (the official SDK, for the gateway's compatibility test)"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "openai==$OPENAI_SDK_VERSION" >&2
    touch "$venv/.openai-$OPENAI_SDK_VERSION"
  fi
  echo "$venv/bin"
}

up() {
  local dir=$1; shift
  local auth="" owner="" workspaces="" host=127.0.0.1 workers=2
  while [ $# -gt 0 ]; do
    case $1 in
      --auth) auth=1 ;;
      --workspaces) workspaces=1 ;;
      --host) host=$2; shift ;;
      --workers) workers=$2; shift ;;
      --owner-pid) owner=$2; shift ;;
      *) die "unknown option $1" ;;
    esac; shift
  done
  local bin; bin=$(install)
  dir=$(mkdir -p "$dir" && cd "$dir" && pwd)
  [ -f "$dir/pid" ] && kill -0 "$(cat "$dir/pid")" 2>/dev/null && die "an MLflow server already runs in $dir"
  rm -rf "$dir/db" "$dir/artifacts"; mkdir -p "$dir/db" "$dir/artifacts"
  free_port > "$dir/port"
  echo "$host" > "$dir/host"
  echo "$workers" > "$dir/workers"
  if [ -n "$auth" ]; then
    (umask 077; echo "${MLFLOW_ADMIN_PASSWORD:-$(openssl rand -hex 12)}" > "$dir/auth")
  else rm -f "$dir/auth"; fi
  if [ -n "$workspaces" ]; then touch "$dir/workspaces"; else rm -f "$dir/workspaces"; fi
  [ -n "$owner" ] && watch_owner "$owner" "$dir"
  launch "$dir"
}

launch() {
  local dir=$1 bin port auth=""
  bin=$(install); port=$(cat "$dir/port"); [ -f "$dir/auth" ] && auth=$(cat "$dir/auth")
  local host=127.0.0.1; [ -f "$dir/host" ] && host=$(cat "$dir/host")
  local workers=2; [ -f "$dir/workers" ] && workers=$(cat "$dir/workers")
  local args=(server --host "$host" --port "$port" --workers "$workers"
    --backend-store-uri "sqlite:///$dir/db/mlflow.db" --default-artifact-root "$dir/artifacts")
  if [ -n "$auth" ]; then
    args+=(--app-name basic-auth)
    cat > "$dir/auth.ini" <<INI
[mlflow]
default_permission = READ
database_uri = sqlite:///$dir/db/auth.db
admin_username = admin
admin_password = $auth
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
    export MLFLOW_AUTH_CONFIG_PATH=$dir/auth.ini
    export MLFLOW_FLASK_SERVER_SECRET_KEY=${MLFLOW_FLASK_SERVER_SECRET_KEY:-test-only-secret}
    export MLFLOW_AUTH_ADMIN_PASSWORD=$auth
  fi
  if [ -f "$dir/workspaces" ]; then export MLFLOW_ENABLE_WORKSPACES=true; else unset MLFLOW_ENABLE_WORKSPACES; fi
  # setsid: the server and its workers form one process group that `down` can end as a whole.
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false} setsid "$bin/mlflow" "${args[@]}" >>"$dir/mlflow.log" 2>&1 < /dev/null &
  local pid=$!
  echo "$pid" > "$dir/pid"
  local url=http://$host:$port
  # A deadline, not a count of tries: on a busy machine a cold start takes over a minute.
  local deadline=$((SECONDS + 180))
  while [ "$SECONDS" -lt "$deadline" ]; do
    if curl -fsS -o /dev/null "$url/health" 2>/dev/null; then
      { printf 'MLFLOW_TRACKING_URI=%s\nMLFLOW_PID=%s\nMLFLOW_RUN_DIR=%s\n' "$url" "$pid" "$dir"
        [ -n "$auth" ] && printf 'MLFLOW_ADMIN_USERNAME=admin\nMLFLOW_ADMIN_PASSWORD=%s\n' "$auth"; } > "$dir/env"
      cat "$dir/env"
      return
    fi
    kill -0 "$pid" 2>/dev/null || { tail -5 "$dir/mlflow.log" >&2; stop "$dir"; die "mlflow server exited during start (log: $dir/mlflow.log)"; }
    sleep 0.25
  done
  tail -30 "$dir/mlflow.log" >&2
  stop "$dir"
  die "mlflow server did not answer /health within 180 s (log: $dir/mlflow.log)"
}

# Ends the server when OWNER ends (a crashed test run leaves nothing behind).
watch_owner() {
  local owner=$1 dir=$2
  setsid bash -c 'while kill -0 "$1" 2>/dev/null && [ -f "$2/port" ]; do sleep 1; done; [ -f "$2/port" ] && "$3" down "$2"' \
    _ "$owner" "$dir" "$REPO_ROOT/hack/mlflow.sh" >/dev/null 2>&1 < /dev/null &
}

stop() {
  local dir=$1
  [ -d "$dir" ] || return 0
  if [ -f "$dir/pid" ]; then
    local pid; pid=$(cat "$dir/pid")
    # The pid is a process-group leader (setsid): signal the group, i.e. the server and its workers.
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.25; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$dir/pid"
  fi
}

down() {
  stop "$1"
  rm -rf "$1/db" "$1/artifacts" "$1/env" "$1/port" "$1/auth" "$1/auth.ini" "$1/host" "$1/workers"
}

case ${1:-} in
  install) install ;;
  up) shift; up "$@" ;;
  stop) shift; stop "$@" ;;
  resume) shift; launch "$@" ;;
  down) shift; down "$@" ;;
  *) die "usage: hack/mlflow.sh install | up RUN_DIR [--auth] [--owner-pid PID] | stop RUN_DIR | resume RUN_DIR | down RUN_DIR" ;;
esac
