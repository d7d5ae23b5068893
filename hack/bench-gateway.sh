#!/usr/bin/env bash
# Gateway benchmark (not a test). On this machine, against one local fake upstream (nginx
# returning a fixed 359-byte OpenAI chat.completion with usage), one load generator (wrk, fixed
# connection count, fixed duration) measures, side by side in one run:
#   direct               wrk -> fake upstream
#   nginx reverse proxy  wrk -> nginx (proxy_pass, keepalive upstream) -> fake   (the reference)
#   this gateway, off    wrk -> `mlflow-gateway-operator gateway` (usageTracking: false) -> fake
#   this gateway, on     same with usageTracking: true, traces exported to a real MLflow server
#                        (on the same cores: its CPU seconds are reported with the traces)
#   on, MLflow niced     the same with that MLflow server (and its workers) at nice 19: it takes
#                        only CPU the rest leaves idle, as a tracking server on other machines
#                        would. The gateway's cost is what a production deployment would see
#                        (it builds whole traces only for those the server can store)
#   this gateway, sink   same, but exporting to a sink (nginx answering 200 to the OTLP and
#                        trace-info requests at once) instead of MLflow: every trace is
#                        exported, so this row is the gateway's own whole cost of tracing,
#                        without the CPU a tracking server on the same cores takes
#   MLflow gateway       wrk -> MLflow 3.17.2's own AI gateway (in `mlflow server`, an endpoint
#                        whose secret's api_base is the fake) -> fake, usage_tracking on
# each at every connection count (default 32 and 128), and reports requests/s, p50/p99 latency,
# errors, the server's CPU per request and the latency added over direct, then the ratios the
# targets are about and how many traces were exported, dropped, failed and actually stored.
#
# Targets (issue): added p99 < 1 ms at 32 connections; >= 10x MLflow gateway's throughput;
# tracing costs < 10% throughput; >= 50% of the nginx reverse proxy's throughput, tracing on.
#
# Both gateways are driven on the same route, POST /gateway/mlflow/v1/chat/completions with
# "model": "<endpoint name>"; direct and nginx get POST /v1/chat/completions with the model.
# Everything listens on 127.0.0.1 on free ports. Every process started here is stopped by pid on
# exit; every load run is bounded in time. Numbers are only meaningful on a quiet machine: wrk,
# the proxies and the fake share the cores (`nproc` is printed).
#
# Usage: hack/bench-gateway.sh
# Environment:
#   BENCH_DURATION=10        seconds per measured run
#   BENCH_WARMUP=2           seconds of warm-up before each measured run (same connection count)
#   BENCH_CONNECTIONS="32 128"
#   BENCH_THREADS=2          wrk threads
#   BENCH_TIMEOUT=10         wrk request timeout, s (slower answers count as errors and are
#                            missing from wrk's percentiles, so it is well above any p99 seen)
#   BENCH_NGINX_WORKERS=auto worker_processes of each nginx (auto = one per core)
#   BENCH_TARGETS="direct nginx off on on-nice sink mlflow"   rows to run (direct is needed for "added")
#   BENCH_BUILD=1            0: do not run `cargo build --release --locked` first
#   BENCH_BIN=FILE           the gateway binary (default: target/release/mlflow-gateway-operator)
#   BENCH_RUST_LOG=          RUST_LOG of the gateway (default: unset, i.e. its default, info;
#                            the gateway logs nothing per request at info)
#   BENCH_DRAIN_TIMEOUT=120  s to wait for trace export to drain after a tracing-on run
#   BENCH_JSON=FILE          also write the raw results (one JSON object per run) there
#   BENCH_KEEP=1             keep the run directory (configs, logs, wrk outputs, MLflow dbs as
#                            */db.kept); it is also kept when the script fails
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

duration=${BENCH_DURATION:-10}
warmup=${BENCH_WARMUP:-2}
conns=${BENCH_CONNECTIONS:-32 128}
threads=${BENCH_THREADS:-2}
wrk_timeout=${BENCH_TIMEOUT:-10}
nginx_workers=${BENCH_NGINX_WORKERS:-auto}
targets=" ${BENCH_TARGETS:-direct nginx off on on-nice sink mlflow} "
drain_timeout=${BENCH_DRAIN_TIMEOUT:-120}
bin=${BENCH_BIN:-$REPO_ROOT/target/release/mlflow-gateway-operator}
want() { [[ $targets == *" $1 "* ]]; }

# --- tools ------------------------------------------------------------------------------------
export PATH=$PATH:/usr/sbin:/sbin
apt_install() {
  log "installing $* (Debian packages)"
  local sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get install -y -qq "$@" >&2 || { $sudo apt-get update -qq >&2 && $sudo apt-get install -y -qq "$@" >&2; } \
    || die "could not install $* with apt-get"
}
missing=()
command -v nginx >/dev/null 2>&1 || missing+=(nginx)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
[ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
command -v python3 >/dev/null 2>&1 || die "python3 is required"

have_gateway=""
if want off || want on || want sink; then
  if [ "${BENCH_BUILD:-1}" = 1 ]; then
    log "cargo build --release --locked"
    cargo build --release --locked --quiet
  fi
  if "$bin" gateway --help >/dev/null 2>&1; then have_gateway=1
  else log "warning: $bin has no working 'gateway' subcommand: the rows of this gateway are skipped"; fi
fi

# --- run directory, process bookkeeping, cleanup ----------------------------------------------
run=$(mktemp -d "${TMPDIR:-/tmp}/mgo-bench-gw.XXXXXX")
pids=()
fg_pid=""
mlflow_dirs=()
cleanup() {
  local rc=$?
  set +e
  [ -n "$fg_pid" ] && kill -TERM "$fg_pid" 2>/dev/null
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -KILL "$pid" 2>/dev/null
  done
  local keep=""; { [ "${BENCH_KEEP:-0}" = 1 ] || [ "$rc" != 0 ]; } && keep=1
  for d in "${mlflow_dirs[@]}"; do
    # `down` deletes the database; a kept run keeps it as db.kept
    [ -n "$keep" ] && hack/mlflow.sh stop "$d" >/dev/null 2>&1 && mv "$d/db" "$d/db.kept" 2>/dev/null
    hack/mlflow.sh down "$d" >/dev/null 2>&1
  done
  if [ -n "$keep" ]; then log "run directory kept: $run"; else rm -rf "$run"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Starts "$@" in the background with output to $run/NAME.log; its pid is left in $last_pid.
start_bg() {
  local name=$1; shift
  "$@" >"$run/$name.log" 2>&1 </dev/null &
  last_pid=$!
  pids+=("$last_pid")
}
# run_fg OUTFILE CMD...: runs CMD in the background with its output to OUTFILE and waits for it,
# so that a signal ends the script at once (bash defers traps while a foreground child runs);
# returns its status.
run_fg() {
  local out=$1; shift
  "$@" >"$out" 2>&1 &
  fg_pid=$!
  local rc=0; wait "$fg_pid" || rc=$?
  fg_pid=""
  return "$rc"
}
# Stops one process started by start_bg (TERM, KILL after 10 s) and forgets its pid.
stop_pid() {
  local pid=$1 p rest=()
  for p in "${pids[@]}"; do [ "$p" = "$pid" ] || rest+=("$p"); done
  pids=("${rest[@]}")
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.25; done
  kill -KILL "$pid" 2>/dev/null || true
}
# Waits (at most SECONDS) until GET URL answers 2xx while PID lives.
wait_http() {
  local url=$1 pid=$2 secs=$3 name=$4
  local deadline=$((SECONDS + secs))
  until curl -fsS -o /dev/null "$url" 2>/dev/null; do
    kill -0 "$pid" 2>/dev/null || { tail -20 "$run/$name.log" >&2; die "$name exited during start (log: $run/$name.log)"; }
    [ $SECONDS -lt $deadline ] || { tail -20 "$run/$name.log" >&2; die "$name did not answer $url within $secs s"; }
    sleep 0.1
  done
}
# CPU seconds (user+sys) used so far by the processes under the given pids (descendants and
# process-group members included; a process's threads are in its own counters).
cpu_seconds() {
  python3 - "$@" <<'PY'
import os, sys
roots = {int(a) for a in sys.argv[1:]}
procs = {}
for d in os.listdir("/proc"):
    if not d.isdigit():
        continue
    try:
        s = open(f"/proc/{d}/stat").read()
    except OSError:
        continue
    f = s[s.rindex(")") + 2:].split()
    procs[int(d)] = (int(f[1]), int(f[2]), int(f[11]) + int(f[12]))
def ours(p):
    if procs[p][1] in roots:
        return True
    for _ in range(64):
        if p in roots:
            return True
        p = procs.get(p, (0,))[0]
        if p <= 1:
            return False
    return False
print(sum(v[2] for p, v in procs.items() if ours(p)) / os.sysconf("SC_CLK_TCK"))
PY
}

# --- fixed payloads ---------------------------------------------------------------------------
# The fake's answer: a complete chat.completion with usage, as OpenAI sends it (359 bytes).
response='{"id":"chatcmpl-bench","object":"chat.completion","created":1735689600,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help you today?","refusal":null},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":19,"completion_tokens":9,"total_tokens":28},"system_fingerprint":"fp_bench"}'
response_bytes=${#response}
# wrk's request: a small chat request; the model comes from BENCH_MODEL (endpoint name for the
# gateways, the upstream model for direct and nginx).
cat >"$run/chat.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-client"
wrk.body = '{"model":"' .. (os.getenv("BENCH_MODEL") or "gpt-4o-mini") .. '",'
  .. '"messages":[{"role":"system","content":"You are a helpful assistant."},'
  .. '{"role":"user","content":"Say hello."}],"max_tokens":16,"temperature":0}'
LUA
body() { printf '{"model":"%s","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Say hello."}],"max_tokens":16,"temperature":0}' "$1"; }

# --- nginx: the fake upstream and the reference reverse proxy ---------------------------------
# Two nginx instances (same Debian binary, own prefix/config each) so that the proxy's workers
# and CPU are its own, as the gateway's are: the fake is the same process in every row.
# worker_processes auto (one per core) for both, like the gateway's tokio runtime (one worker
# thread per core). No access log; keep-alive without a request cap so every row runs over
# persistent connections (nginx closes after 1000 requests by default, hyper/uvicorn do not).
fake_port=$(free_port)
proxy_port=$(free_port)
nginx_conf() { # NAME, then the http{} body on stdin
  local dir=$run/nginx-$1
  mkdir -p "$dir/tmp"
  { cat <<CONF
daemon off;
master_process on;
worker_processes $nginx_workers;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 8192; multi_accept on; }
http {
  access_log off;
  client_body_temp_path $dir/tmp/body;
  proxy_temp_path $dir/tmp/proxy;
  fastcgi_temp_path $dir/tmp/fastcgi;
  uwsgi_temp_path $dir/tmp/uwsgi;
  scgi_temp_path $dir/tmp/scgi;
  keepalive_requests 100000000;
  keepalive_timeout 300s;
CONF
    cat; echo '}'; } >"$dir/nginx.conf"
}
nginx_conf fake <<CONF
  server {
    listen 127.0.0.1:$fake_port backlog=4096;
    location = /v1/chat/completions {
      if (\$request_method != POST) { return 405; }
      default_type application/json;
      return 200 '$response';
    }
    location / { return 404; }
  }
CONF
nginx_conf proxy <<CONF
  upstream fake {
    server 127.0.0.1:$fake_port;
    keepalive 64;
    keepalive_requests 100000000;
  }
  server {
    listen 127.0.0.1:$proxy_port backlog=4096;
    location / {
      proxy_pass http://fake;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer sk-bench";
    }
  }
CONF
sink_port=$(free_port)
nginx_conf sink <<CONF
  client_max_body_size 64m;
  client_body_buffer_size 16m;
  server {
    listen 127.0.0.1:$sink_port backlog=4096;
    location / { default_type application/json; return 200 '{}'; }
  }
CONF
for n in fake proxy; do
  nginx -t -q -e "$run/nginx-$n/error.log" -p "$run/nginx-$n" -c "$run/nginx-$n/nginx.conf" \
    || die "nginx rejected $run/nginx-$n/nginx.conf"
done
start_bg nginx-fake nginx -e "$run/nginx-fake/error.log" -p "$run/nginx-fake" -c "$run/nginx-fake/nginx.conf"
fake_pid=$last_pid
start_bg nginx-proxy nginx -e "$run/nginx-proxy/error.log" -p "$run/nginx-proxy" -c "$run/nginx-proxy/nginx.conf"
proxy_pid=$last_pid
# A POST-only location: readiness is a 405 from GET, so probe with a POST.
deadline=$((SECONDS + 10))
until curl -fsS -o /dev/null -X POST -d '{}' "http://127.0.0.1:$fake_port/v1/chat/completions" 2>/dev/null \
   && curl -fsS -o /dev/null -X POST -d '{}' "http://127.0.0.1:$proxy_port/v1/chat/completions" 2>/dev/null; do
  [ $SECONDS -lt $deadline ] || die "nginx did not start (logs: $run/nginx-*/error.log)"
  sleep 0.1
done

# --- MLflow servers ---------------------------------------------------------------------------
# Two, so that the MLflow gateway's traffic and our gateway's trace ingestion never share one:
#   mlflow-traces-ROW  receives this gateway's traces (tracing-on rows), plain `hack/mlflow.sh up`
#   mlflow-gw      hosts MLflow's AI gateway endpoint; only this one may call a loopback,
#                  plain-http upstream (MLflow's SSRF policy is relaxed for it alone)
# Both: `mlflow server --workers 2` (uvicorn) as hack/mlflow.sh starts it, sqlite, telemetry off.
mlflow_up() { # NAME [VAR=VALUE...]
  local name=$1; shift
  mlflow_dirs+=("$run/$name")
  env MLFLOW_DISABLE_TELEMETRY=true "$@" hack/mlflow.sh up "$run/$name" --owner-pid $$ >/dev/null
}
mlflow_env() { sed -n "s/^$2=//p" "$run/$1/env"; }
post_json() { # URL JSON -> response body (fails on non-2xx, body to stderr)
  local out code
  out=$(curl -sS -X POST -H 'content-type: application/json' -d "$2" -w '\n%{http_code}' "$1") || return 1
  code=${out##*$'\n'}; out=${out%$'\n'*}
  if [ "${code:0:1}" != 2 ]; then printf 'POST %s -> %s: %s\n' "$1" "$code" "$out" >&2; return 1; fi
  printf '%s' "$out"
}
jget() { python3 -c 'import json,sys; d=json.load(sys.stdin)
for k in sys.argv[1].split("."): d=d[k]
print(d)' "$1"; }
count_traces() { # MLFLOW_NAME EXPERIMENT_ID -> traces stored (read from the server's sqlite db)
  python3 - "$run/$1/db/mlflow.db" "$2" <<'PY'
import sqlite3, sys
c = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True, timeout=30)
print(c.execute("select count(*) from trace_info where experiment_id = ?", (int(sys.argv[2]),)).fetchone()[0])
PY
}
trace_stats() { # MLFLOW_NAME EXPERIMENT_ID -> JSON: traces stored, with their root span, spans stored
  python3 - "$run/$1/db/mlflow.db" "$2" <<'PY'
import json, sqlite3, sys
c = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True, timeout=30)
e = int(sys.argv[2])
q = lambda sql: c.execute(sql, (e,)).fetchone()[0]
print(json.dumps(dict(
    stored=q("select count(*) from trace_info where experiment_id = ?"),
    rooted=q("select count(distinct trace_id) from spans where experiment_id = ? and parent_span_id is null"),
    spans_stored=q("select count(*) from spans where experiment_id = ?"))))
PY
}

# --- load runs --------------------------------------------------------------------------------
results=$run/results.jsonl
: >"$results"
parse_wrk() { # FILE -> JSON: requests, rps, p50/p75/p90/p99 ms, errors
  python3 - "$1" <<'PY'
import json, re, sys
t = open(sys.argv[1]).read()
unit = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4, "h": 3.6e6}
r = {}
m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)", t)
r["requests"] = int(m.group(1)) if m else 0
m = re.search(r"Requests/sec:\s*([\d.]+)", t)
r["rps"] = float(m.group(1)) if m else 0.0
for p, v, u in re.findall(r"^\s*(50|75|90|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", t, re.M):
    r[f"p{p}"] = float(v) * unit[u]
m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", t)
r["socket_errors"] = sum(map(int, m.groups())) if m else 0
r["timeouts"] = int(m.group(4)) if m else 0
m = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
r["non2xx"] = int(m.group(1)) if m else 0
print(json.dumps(r))
PY
}
# Sends one request with curl and checks that the fake's answer came back.
check_target() { # URL MODEL -> 0 if OK
  local out
  out=$(curl -sS -m 60 -X POST -H 'content-type: application/json' -H 'authorization: Bearer sk-client' \
    -d "$(body "$2")" -w '\n%{http_code}' "$1" 2>&1) || { printf '%s\n' "$out" >&2; return 1; }
  if [ "${out##*$'\n'}" != 200 ] || [[ $out != *"How can I help you today?"* ]]; then
    printf 'POST %s -> %s\n' "$1" "$out" >&2; return 1
  fi
}
# Runs warm-up and measured runs at every connection count for one row.
#   bench ROW LABEL URL MODEL CPU_PIDS...
requests_sent=0 # completed requests of the last bench call, warm-ups included
bench() {
  local row=$1 label=$2 url=$3 model=$4; shift 4
  local c out w cpu0 cpu1
  requests_sent=0
  for c in $conns; do
    if [ "$warmup" -gt 0 ]; then
      BENCH_MODEL=$model run_fg "$run/wrk-$row-$c-warmup.txt" timeout $((warmup + 30)) \
        wrk -t"$threads" -c"$c" -d"${warmup}s" --timeout "${wrk_timeout}s" -s "$run/chat.lua" "$url" || true
      w=$(parse_wrk "$run/wrk-$row-$c-warmup.txt" | jget requests)
      requests_sent=$((requests_sent + w))
    fi
    log "$label, $c connections, ${duration}s"
    side0=0; [ -n "${side_pid:-}" ] && side0=$(cpu_seconds "$side_pid")
    cpu0=$(cpu_seconds "$@")
    stat0=$(head -1 /proc/stat)
    BENCH_MODEL=$model run_fg "$run/wrk-$row-$c.txt" timeout $((duration + wrk_timeout + 30)) \
      wrk -t"$threads" -c"$c" -d"${duration}s" --timeout "${wrk_timeout}s" --latency -s "$run/chat.lua" "$url" \
      || log "warning: wrk exited with $? ($run/wrk-$row-$c.txt)"
    cpu1=$(cpu_seconds "$@")
    stat1=$(head -1 /proc/stat)
    side1=0; [ -n "${side_pid:-}" ] && side1=$(cpu_seconds "$side_pid")
    out=$(parse_wrk "$run/wrk-$row-$c.txt")
    requests_sent=$((requests_sent + $(jget requests <<<"$out")))
    # steal: the share of the machine's CPU time the hypervisor gave to others during the run
    # (the 8th field of /proc/stat's cpu line); figures of a run with much of it are not comparable.
    python3 -c 'import json,sys; r=json.loads(sys.argv[1]); r.update(row=sys.argv[2], label=sys.argv[3], conc=int(sys.argv[4]), cpu_s=float(sys.argv[6])-float(sys.argv[5]), side_cpu_s=float(sys.argv[8])-float(sys.argv[7]))
d=[int(b)-int(a) for a, b in zip(sys.argv[9].split()[1:9], sys.argv[10].split()[1:9])]
r.update(steal_pct=100.0*d[7]/max(1, sum(d))); print(json.dumps(r))' \
      "$out" "$row" "$label" "$c" "$cpu0" "$cpu1" "$side0" "$side1" "$stat0" "$stat1" >>"$results"
    "${between_runs:-true}"
  done
}
skip() { # ROW LABEL REASON
  local c
  for c in $conns; do
    python3 -c 'import json,sys; print(json.dumps(dict(row=sys.argv[1], label=sys.argv[2], conc=int(sys.argv[3]), skipped=sys.argv[4])))' \
      "$1" "$2" "$c" "$3" >>"$results"
  done
}

traces=$run/traces.jsonl # one JSON object per traced row: request and trace counts
: >"$traces"
trace_note() { # ROW JSON... (objects merged)
  python3 -c 'import json,sys; r={"row": sys.argv[1]}
for a in sys.argv[2:]: r.update(json.loads(a))
print(json.dumps(r))' "$@" >>"$traces"
}

# direct and nginx
if want direct; then
  check_target "http://127.0.0.1:$fake_port/v1/chat/completions" gpt-4o-mini || die "the fake upstream does not answer"
  bench direct "direct (nginx fake upstream)" "http://127.0.0.1:$fake_port/v1/chat/completions" gpt-4o-mini "$fake_pid"
fi
if want nginx; then
  if check_target "http://127.0.0.1:$proxy_port/v1/chat/completions" gpt-4o-mini; then
    bench nginx "nginx reverse proxy" "http://127.0.0.1:$proxy_port/v1/chat/completions" gpt-4o-mini "$proxy_pid"
  else skip nginx "nginx reverse proxy" "check request failed"; fi
fi

# --- this gateway -----------------------------------------------------------------------------
gw_manifest() { # FILE USAGE_TRACKING
  cat >"$1" <<YAML
apiVersion: mlflow-gateway.dev/v1alpha1
kind: GatewayEndpoint
metadata: {name: bench, namespace: default, uid: bench-uid}
spec:
  models:
    - {name: fake, provider: openai, model: gpt-4o-mini, apiBase: "http://127.0.0.1:$fake_port/v1", apiKeySecretRef: {name: k, key: k}}
  usageTracking: $2
YAML
}
gw_metric() { # PORT NAME -> sum of the samples of NAME (all label sets)
  curl -fsS "http://127.0.0.1:$1/metrics" | awk -v m="$2" '$1 ~ "^"m"({|$)" {s+=$NF} END {printf "%d", s}'
}
gw_port=""
# Waits (bounded) until the span export queue is empty and neither the gateway's exported-trace
# counter (trace-info requests) nor MLflow's trace count moved for 2 s.
gw_drain() {
  local deadline=$((SECONDS + drain_timeout)) q prev=-1 n
  log "waiting for trace export to drain (at most $drain_timeout s)"
  while [ $SECONDS -lt $deadline ]; do
    q=$(gw_metric "$gw_port" mlflow_gateway_trace_export_queue_spans)
    n=$(gw_metric "$gw_port" mlflow_gateway_traces_exported_total)/$(count_traces "$traces_name" "$gw_exp")
    [ "$q" = 0 ] && [ "$n" = "$prev" ] && return 0
    prev=$n; sleep 2
  done
  log "warning: trace export did not drain within $drain_timeout s"
}
run_gateway() { # ROW LABEL USAGE_TRACKING [VAR=VALUE...]
  local row=$1 label=$2 tracking=$3; shift 3
  gw_manifest "$run/endpoint-$row.yaml" "$tracking"
  gw_port=$(free_port)
  local log=(); [ -n "${BENCH_RUST_LOG:-}" ] && log=(RUST_LOG="$BENCH_RUST_LOG")
  start_bg "gateway-$row" env -u MLFLOW_TRACKING_URI -u MLFLOW_EXPERIMENT_ID -u MLFLOW_TRACKING_TOKEN \
    -u MLFLOW_TRACKING_USERNAME -u MLFLOW_TRACKING_PASSWORD -u RUST_LOG -u LOG_FORMAT \
    -u GATEWAY_MAX_BODY_BYTES -u GATEWAY_ATTEMPT_TIMEOUT_SECONDS \
    "${log[@]}" GATEWAY_API_KEY_FAKE=sk-bench "$@" \
    "$bin" gateway --endpoint "$run/endpoint-$row.yaml" --listen "127.0.0.1:$gw_port"
  local pid=$last_pid
  gw_pid=$pid
  wait_http "http://127.0.0.1:$gw_port/readyz" "$pid" 30 "gateway-$row"
  if check_target "http://127.0.0.1:$gw_port/gateway/mlflow/v1/chat/completions" bench; then
    bench "$row" "$label" "http://127.0.0.1:$gw_port/gateway/mlflow/v1/chat/completions" bench "$pid"
  else skip "$row" "$label" "check request failed (log: gateway-$row.log)"; fi
}
if want off; then
  if [ -n "$have_gateway" ]; then
    run_gateway off "this gateway, tracing off" false
    stop_pid "$gw_pid"
  else skip off "this gateway, tracing off" "no gateway subcommand in $bin"; fi
fi
descendants() { local p; for p in $(pgrep -P "$1"); do echo "$p"; descendants "$p"; done; }
# ROW LABEL NICE: this gateway with tracing on, exporting to a fresh MLflow server whose processes
# (the server and its uvicorn workers) run at niceness NICE.
run_traced_mlflow() {
  local row=$1 label=$2 nice=$3 name=mlflow-traces-$1
  log "starting the MLflow server that receives this gateway's traces ($row, nice $nice)"
  mlflow_up "$name"
  traces_uri=$(mlflow_env "$name" MLFLOW_TRACKING_URI)
  traces_name=$name
  gw_exp=$(post_json "$traces_uri/api/2.0/mlflow/experiments/create" '{"name":"bench-gateway"}' | jget experiment_id)
  traces_pid=$(mlflow_env "$name" MLFLOW_PID)
  if [ "$nice" != 0 ]; then
    # shellcheck disable=SC2046 # one pid per word
    renice -n "$nice" -p "$traces_pid" $(descendants "$traces_pid") >/dev/null
    # The server runs in a session of its own (setsid), hence in its own scheduler autogroup,
    # whose weight against the others' is the autogroup's nice, not the processes'.
    [ -w "/proc/$traces_pid/autogroup" ] && echo "$nice" >"/proc/$traces_pid/autogroup"
  fi
  traces_cpu0=$(cpu_seconds "$traces_pid")
  between_runs=gw_drain
  side_pid=$traces_pid # MLflow's CPU during each measured run, reported beside it
  run_gateway "$row" "$label" true MLFLOW_TRACKING_URI="$traces_uri" MLFLOW_EXPERIMENT_ID="$gw_exp"
  between_runs=true
  side_pid=""
  if curl -fsS -o /dev/null "http://127.0.0.1:$gw_port/metrics"; then
    m() { gw_metric "$gw_port" "$1"; }
    trace_note "$row" "$(trace_stats "$name" "$gw_exp")" "$(printf \
      '{"answered":%s,"wrk_completed":%s,"exported":%s,"spans_exported":%s,"dropped":%s,"dropped_traces":%s,"failed":%s,"experiment":"%s","receiver_cpu_s":%s,"nice":%s}' \
      "$(m mlflow_gateway_requests_total)" "$requests_sent" "$(m mlflow_gateway_traces_exported_total)" \
      "$(m mlflow_gateway_spans_exported_total)" "$(m mlflow_gateway_spans_dropped_total)" \
      "$(m mlflow_gateway_traces_dropped_total)" "$(m mlflow_gateway_spans_export_failed_total)" "$gw_exp" \
      "$(python3 -c 'import sys; print(float(sys.argv[2]) - float(sys.argv[1]))' "$traces_cpu0" "$(cpu_seconds "$traces_pid")")" "$nice")"
  fi
  stop_pid "$gw_pid"
  hack/mlflow.sh stop "$run/$name" >/dev/null 2>&1 || true # free its CPU for the next row
}
for row in on on-nice; do
  want "$row" || continue
  if [ "$row" = on ]; then label="this gateway, tracing on"; nice=0
  else label="this gateway, on, MLflow niced"; nice=19; fi
  if [ -n "$have_gateway" ]; then run_traced_mlflow "$row" "$label" "$nice"
  else skip "$row" "$label" "no gateway subcommand in $bin"; fi
done

if want sink; then
  if [ -n "$have_gateway" ]; then
    nginx -t -q -e "$run/nginx-sink/error.log" -p "$run/nginx-sink" -c "$run/nginx-sink/nginx.conf" \
      || die "nginx rejected $run/nginx-sink/nginx.conf"
    start_bg nginx-sink nginx -e "$run/nginx-sink/error.log" -p "$run/nginx-sink" -c "$run/nginx-sink/nginx.conf"
    sink_pid=$last_pid
    sink_cpu0=$(cpu_seconds "$sink_pid")
    side_pid=$sink_pid
    sink_drain() { # bounded: until the export queue is empty
      local deadline=$((SECONDS + 30))
      until [ "$(gw_metric "$gw_port" mlflow_gateway_trace_export_queue_spans)" = 0 ] || [ $SECONDS -ge $deadline ]; do sleep 0.5; done
    }
    between_runs=sink_drain
    run_gateway sink "this gateway, tracing on, sink" true MLFLOW_TRACKING_URI="http://127.0.0.1:$sink_port" MLFLOW_EXPERIMENT_ID=1
    between_runs=true
    side_pid=""
    if curl -fsS -o /dev/null "http://127.0.0.1:$gw_port/metrics"; then
      m() { gw_metric "$gw_port" "$1"; }
      trace_note sink "$(printf \
        '{"answered":%s,"wrk_completed":%s,"exported":%s,"spans_exported":%s,"dropped":%s,"dropped_traces":%s,"failed":%s,"receiver_cpu_s":%s}' \
        "$(m mlflow_gateway_requests_total)" "$requests_sent" "$(m mlflow_gateway_traces_exported_total)" \
        "$(m mlflow_gateway_spans_exported_total)" "$(m mlflow_gateway_spans_dropped_total)" \
        "$(m mlflow_gateway_traces_dropped_total)" "$(m mlflow_gateway_spans_export_failed_total)" \
        "$(python3 -c 'import sys; print(float(sys.argv[2]) - float(sys.argv[1]))' "$sink_cpu0" "$(cpu_seconds "$sink_pid")")")"
    fi
    stop_pid "$gw_pid"
    stop_pid "$sink_pid"
  else skip sink "this gateway, tracing on, sink" "no gateway subcommand in $bin"; fi
fi

# --- MLflow's own AI gateway ------------------------------------------------------------------
# MLflow 3.17.2 serves AI Gateway endpoints from the tracking server (/gateway/...), configured
# through its REST API: a secret (the API key, encrypted with a KEK derived from
# MLFLOW_CRYPTO_KEK_PASSPHRASE; the upstream URL is the secret's auth_config.api_base), a model
# definition (provider + model, bound to the secret) and an endpoint (model configs, usage
# tracking on: it then creates its own experiment and traces every call into it).
# api_base is checked on write and at connect time: https and public addresses only unless
# MLFLOW_GATEWAY_API_BASE_ALLOWED_SCHEMES / MLFLOW_GATEWAY_API_BASE_ALLOW_PRIVATE_IPS say
# otherwise; they are set for this benchmark's own MLflow server only.
if want mlflow; then
  log "starting the MLflow server that hosts MLflow's AI gateway"
  mlflow_up mlflow-gw MLFLOW_GATEWAY_API_BASE_ALLOWED_SCHEMES=http,https \
    MLFLOW_GATEWAY_API_BASE_ALLOW_PRIVATE_IPS=true MLFLOW_CRYPTO_KEK_PASSPHRASE="bench-$(openssl rand -hex 24)"
  mgw=$(mlflow_env mlflow-gw MLFLOW_TRACKING_URI)
  mgw_pid=$(mlflow_env mlflow-gw MLFLOW_PID)
  api=$mgw/api/3.0/mlflow/gateway
  secret_id=$(post_json "$api/secrets/create" "$(printf '{"secret_name":"bench-fake-key","secret_value":{"api_key":"sk-bench"},"provider":"openai","auth_config":{"api_base":"http://127.0.0.1:%s/v1"}}' "$fake_port")" \
    | jget secret.secret_id)
  model_id=$(post_json "$api/model-definitions/create" "$(printf '{"name":"bench-fake","secret_id":"%s","provider":"openai","model_name":"gpt-4o-mini"}' "$secret_id")" \
    | jget model_definition.model_definition_id)
  endpoint=$(post_json "$api/endpoints/create" "$(printf '{"name":"bench","model_configs":[{"model_definition_id":"%s","linkage_type":"PRIMARY","weight":1}],"usage_tracking":true}' "$model_id")")
  mgw_exp=$(jget endpoint.experiment_id <<<"$endpoint")
  label="MLflow gateway $MLFLOW_VERSION"
  if check_target "$mgw/gateway/mlflow/v1/chat/completions" bench; then
    deadline=$((SECONDS + 30))
    until [ "$(count_traces mlflow-gw "$mgw_exp")" -ge 1 ]; do
      [ $SECONDS -lt $deadline ] || die "MLflow's gateway answered but stored no trace in experiment $mgw_exp within 30 s"
      sleep 0.5
    done
    # Each uvicorn worker takes seconds to answer its first gateway call (imports, provider
    # setup): send rounds of 8 parallel requests until a round takes under 1 s (at most 180 s).
    deadline=$((SECONDS + 180))
    while :; do
      t0=$(date +%s%N); curls=()
      for _ in 1 2 3 4 5 6 7 8; do
        curl -sS -m 60 -o /dev/null -X POST -H 'content-type: application/json' -d "$(body bench)" \
          "$mgw/gateway/mlflow/v1/chat/completions" &
        curls+=($!)
      done
      wait "${curls[@]}" || true # only these: a bare `wait` would wait for nginx too
      [ $(( ($(date +%s%N) - t0) / 1000000 )) -lt 1000 ] && break
      [ $SECONDS -lt $deadline ] || { log "warning: MLflow's gateway is still slow after 180 s of warm-up"; break; }
    done
    bench mlflow "$label" "$mgw/gateway/mlflow/v1/chat/completions" bench "$mgw_pid"
    # Its traces are logged asynchronously inside the server: wait until the count stops moving.
    prev=-1; deadline=$((SECONDS + drain_timeout))
    while n=$(count_traces mlflow-gw "$mgw_exp"); [ "$n" != "$prev" ] && [ $SECONDS -lt $deadline ]; do
      prev=$n; sleep 2
    done
    answered=$(grep -c 'POST /gateway/mlflow/v1/chat/completions HTTP/1.1" 200' "$run/mlflow-gw/mlflow.log" || true)
    trace_note mlflow "$(trace_stats mlflow-gw "$mgw_exp")" \
      "$(printf '{"answered":%s,"wrk_completed":%s,"experiment":"%s"}' "$answered" "$requests_sent" "$mgw_exp")"
  else
    skip mlflow "$label" "check request failed (log: $run/mlflow-gw/mlflow.log)"
  fi
fi

# --- report -----------------------------------------------------------------------------------
[ -n "${BENCH_JSON:-}" ] && cp "$results" "$BENCH_JSON"
python3 - "$results" "$traces" "$threads" "$duration" "$warmup" "$response_bytes" "$(nproc)" "$nginx_workers" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
traces = {t["row"]: t for t in (json.loads(l) for l in open(sys.argv[2]) if l.strip())}
threads, duration, warmup, size, ncpu, nginx_workers = sys.argv[3:9]
direct = {r["conc"]: r for r in rows if r["row"] == "direct" and "skipped" not in r}
by = {(r["row"], r["conc"]): r for r in rows}
concs = sorted({r["conc"] for r in rows})
print(f"gateway benchmark: wrk, {threads} threads, {duration} s per run (+{warmup} s warm-up), "
      f"fixed {size}-byte response, {ncpu} CPUs, nginx worker_processes {nginx_workers}")
head = f"{'target':<30} {'conc':>4} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'cpu us/req':>10} {'steal':>5}  added p50/p99 vs direct"
print(head)
print("-" * len(head))
for c in concs:
    for r in rows:
        if r["conc"] != c:
            continue
        if "skipped" in r:
            print(f"{r['label']:<30} {c:>4}  skipped: {r['skipped']}")
            continue
        errs = r.get("non2xx", 0) + r.get("socket_errors", 0)
        cpu = f"{r['cpu_s'] / r['requests'] * 1e6:.0f}" if r.get("requests") else "-"
        d = direct.get(c)
        added = ""
        if d and r["row"] != "direct" and "p99" in r and "p99" in d:
            added = f"{r['p50'] - d['p50']:+.3f} / {r['p99'] - d['p99']:+.3f} ms"
        p50 = f"{r['p50']:.3f}" if "p50" in r else "-"
        p99 = f"{r['p99']:.3f}" if "p99" in r else "-"
        steal = f"{r['steal_pct']:.0f}%" if "steal_pct" in r else "-"
        print(f"{r['label']:<30} {c:>4} {r['rps']:>9.0f} {p50:>8} {p99:>8} {errs:>7} {cpu:>10} {steal:>5}  {added}")
    print()
side = [r for r in rows if r.get("side_cpu_s") and r.get("requests")]
if side:
    print("trace receiver's CPU during the measured runs (on the same cores as everything above):")
    for r in side:
        who = "MLflow" if r["row"].startswith("on") else "the sink (nginx)"
        print(f"  {r['label']}, conc {r['conc']}: {who} used {r['side_cpu_s']:.1f} CPU s in {duration} s"
              f" ({r['side_cpu_s'] / (float(duration) * int(ncpu)) * 100:.0f}% of {ncpu} cores), the gateway {r['cpu_s']:.1f} CPU s")
    print()
def rps(row, c):
    r = by.get((row, c))
    return r["rps"] if r and "skipped" not in r and r.get("rps") else None
def verdict(ok):
    return "met" if ok else "MISSED"
# Share of this gateway's requests (tracing on, all runs) whose trace reached MLflow complete.
def share(row):
    t = traces.get(row, {})
    return t["exported"] / t["answered"] * 100 if t.get("answered") else None
# "<what> = X% (target < 10%: ...)": the throughput tracing row `row` loses against tracing off.
def cost(what, row, off, c):
    on, exported = rps(row, c), share(row)
    if not (on and off):
        return None
    cost = (off - on) / off * 100
    shared = f"; {exported:.1f}% of its traces were exported" if exported is not None else ""
    return f"{what} = {cost:.1f}% (target < 10%: {verdict(cost < 10)}{shared})"
lines = []
for c in concs:
    off, ml, ng, sk = rps("off", c), rps("mlflow", c), rps("nginx", c), rps("sink", c)
    parts = []
    for row, what in (("on", "tracing on"), ("on-nice", "tracing on, MLflow niced")):
        on = rps(row, c)
        if on and ml:
            parts.append(f"this gateway ({what}) / MLflow gateway = {on / ml:.1f}x (target >= 10x: {verdict(on / ml >= 10)})")
        parts.append(cost(f"cost of {what}", row, off, c))
        if on and ng:
            parts.append(f"{what} vs nginx proxy = {on / ng * 100:.0f}% (target >= 50%: {verdict(on / ng >= 0.5)})")
    parts.append(cost("tracing cost, sink instead of MLflow", "sink", off, c))
    parts = [p for p in parts if p]
    if sk and ng:
        parts.append(f"vs nginx proxy, sink = {sk / ng * 100:.0f}%")
    if off and ng:
        parts.append(f"vs nginx proxy, tracing off = {off / ng * 100:.0f}%")
    d = direct.get(c)
    for row in ("off", "on", "on-nice", "sink"):
        r = by.get((row, c))
        if c == 32 and r and d and "p99" in r and "p99" in d:
            a = r["p99"] - d["p99"]
            parts.append(f"added p99 (tracing {row}) = {a:.3f} ms (target < 1 ms: {verdict(a < 1)})")
    if parts:
        lines.append(f"  conc {c}: " + "; ".join(parts))
if lines:
    print("ratios:")
    print("\n".join(lines))
if traces:
    print("traces:")
for row, what in (("on", "this gateway, tracing on"), ("on-nice", "this gateway, tracing on, MLflow niced")):
    t = traces.get(row)
    if not t:
        continue
    print(f"  {what}: {t['answered']} requests answered (its requests counter; wrk completed {t['wrk_completed']}"
          f" incl. warm-ups); exported {t['exported']} traces ({share(row):.1f}% of them; root span and trace info stored),"
          f" {t['spans_exported']} spans; dropped {t.get('dropped_traces', 0)} traces whole at their start and"
          f" {t['dropped']} spans in all (export queue full); failed {t['failed']} spans (MLflow did not accept)")
    print(f"    MLflow (experiment {t['experiment']}, nice {t.get('nice', 0)}) holds {t['stored']} traces ({t['rooted']} with their root span),"
          f" {t['spans_stored']} spans; that server (--workers 2) used {t['receiver_cpu_s']:.1f} CPU s meanwhile,"
          f" on the same cores")
t = traces.get("sink")
if t:
    print(f"  this gateway, tracing on, sink: {t['answered']} requests answered; exported {t['exported']} traces"
          f" ({share('sink'):.1f}%), {t['spans_exported']} spans; dropped {t['dropped_traces']} traces whole, {t['dropped']} spans"
          f" in all; failed {t['failed']} spans; the sink (nginx) used {t['receiver_cpu_s']:.1f} CPU s meanwhile")
t = traces.get("mlflow")
if t:
    print(f"  MLflow gateway: {t['answered']} requests answered (200s in its access log; wrk completed {t['wrk_completed']}"
          f" incl. warm-ups); MLflow (experiment {t['experiment']}, created by the endpoint) holds {t['stored']} traces"
          f" ({t['rooted']} with their root span), {t['spans_stored']} spans; requests in flight when wrk stops"
          f" are still served and traced (up to conc per wrk run)")
for r in rows:
    if "skipped" not in r and r.get("requests", 0) < 2 * r["conc"]:
        print(f"note: {r['label']} at conc {r['conc']} completed {r['requests']} requests, under 2 per connection:"
              f" its req/s and percentiles are coarse (a longer BENCH_DURATION steadies them)")
print("errors = non-2xx answers + socket errors (connect/read/write/timeout); cpu us/req = CPU time of the"
      " server under test (the proxy alone, not the fake) during the measured run / requests; steal = CPU time"
      " the hypervisor took from this machine during the run (rows with much of it are not comparable)")
PY
