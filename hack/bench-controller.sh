#!/usr/bin/env bash
# Controller benchmark (not a test): on a fresh local control plane and MLflow server, create N
# GatewayEndpoints at once and measure
#   - time until every one has status.experimentId, and until every one is Ready (its experiment
#     ready and its gateway Deployment available: kwok makes the pods Running),
#   - MLflow requests and API-server writes per endpoint (the operator's own counters),
#   - writes during two resync periods in which nothing changed (target 0),
#   - the controller's peak memory (VmHWM).
# Usage: hack/bench-controller.sh [N=1000] [RESYNC_SECONDS=30]
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"
n=${1:-1000}
resync=${2:-30}

cargo build --release --locked --quiet
bin=target/release/mlflow-gateway-operator
run=$(mktemp -d "${TMPDIR:-/tmp}/mgo-bench.XXXXXX")
op_pid=""
cleanup() {
  [ -n "$op_pid" ] && kill "$op_pid" 2>/dev/null || true
  hack/cluster.sh down "$run/cluster" || true
  hack/mlflow.sh down "$run/mlflow" || true
  rm -rf "$run"
}
trap cleanup EXIT
hack/cluster.sh up "$run/cluster" --owner-pid $$ >/dev/null
hack/mlflow.sh up "$run/mlflow" --owner-pid $$ >/dev/null
set -a; source "$run/cluster/env"; source "$run/mlflow/env"; set +a
export PATH=$KUBE_BIN_DIR:$PATH
kubectl apply --server-side -f crds/ >/dev/null
wait_crd_established gatewayendpoints.mlflow-gateway.dev
kubectl create namespace bench >/dev/null
kubectl create secret generic keys -n bench --from-literal=openai=sk-bench >/dev/null

port=$(free_port)
METRICS_ADDR=127.0.0.1:$port RESYNC_PERIOD_SECONDS=$resync RUST_LOG=warn \
  "$bin" controller >"$run/operator.log" 2>&1 &
op_pid=$!
metric() { curl -fsS "http://127.0.0.1:$port/metrics" | awk -v m="$1" '$1 ~ "^"m"({|$)" {s+=$NF} END {printf "%d", s}'; }
until curl -fsS -o /dev/null "http://127.0.0.1:$port/healthz" 2>/dev/null; do sleep 0.1; done

for i in $(seq 1 "$n"); do
  cat <<YAML
apiVersion: mlflow-gateway.dev/v1alpha1
kind: GatewayEndpoint
metadata: {name: ep-$i, namespace: bench}
spec:
  models: [{name: m, provider: openai, model: gpt-4o-mini, apiKeySecretRef: {name: keys, key: openai}}]
---
YAML
done > "$run/endpoints.yaml"

log "creating $n GatewayEndpoints"
t0=$(date +%s.%N)
kubectl apply --server-side -f "$run/endpoints.yaml" >/dev/null
t_applied=$(date +%s.%N)
ids_done=""
while :; do
  read -r ids ready < <(kubectl get gwe -n bench -o json | python3 -c '
import json, sys
items = json.load(sys.stdin)["items"]
status = [i.get("status") or {} for i in items]
ids = sum(1 for s in status if s.get("experimentId"))
ready = sum(1 for s in status if any(c.get("type") == "Ready" and c.get("status") == "True" for c in s.get("conditions") or []))
print(ids, ready)')
  if [ -z "$ids_done" ] && [ "$ids" -ge "$n" ]; then ids_done=1; t_ids=$(date +%s.%N); fi
  [ "$ready" -ge "$n" ] && break
  sleep 0.5
done
t_ready=$(date +%s.%N)

ml_req=$(metric mlflow_gateway_operator_mlflow_requests_total)
ml_w=$(metric mlflow_gateway_operator_mlflow_writes_total)
kube_w=$(metric mlflow_gateway_operator_kube_writes_total)
patches=$(metric mlflow_gateway_operator_status_patches_total)
applies=$(metric mlflow_gateway_operator_object_applies_total)
pods=$(kubectl get pods -n bench --field-selector=status.phase=Running -o name | wc -l)
experiments=$(curl -fsS -X POST "$MLFLOW_TRACKING_URI/api/2.0/mlflow/experiments/search" \
  -H 'content-type: application/json' \
  -d '{"filter":"tags.`mlflow.experiment.isGateway` = '"'"'true'"'"'","max_results":5000}' \
  | python3 -c 'import json,sys; print(len(json.load(sys.stdin).get("experiments",[])))')

log "quiet: waiting two resync periods ($((2 * resync + resync / 5)) s)"
sleep $((2 * resync + resync / 5))
quiet_ml_req=$(( $(metric mlflow_gateway_operator_mlflow_requests_total) - ml_req ))
quiet_ml_w=$(( $(metric mlflow_gateway_operator_mlflow_writes_total) - ml_w ))
quiet_kube_w=$(( $(metric mlflow_gateway_operator_kube_writes_total) - kube_w ))
quiet_reconciles=$(metric mlflow_gateway_operator_reconciles_total)
peak_kib=$(awk '/VmHWM/ {print $2}' "/proc/$op_pid/status")
rss_kib=$(awk '/VmRSS/ {print $2}' "/proc/$op_pid/status")

python3 - "$n" "$t0" "$t_applied" "$t_ids" "$t_ready" "$ml_req" "$ml_w" "$kube_w" "$patches" "$experiments" "$applies" "$pods" \
  "$quiet_ml_req" "$quiet_ml_w" "$quiet_kube_w" "$quiet_reconciles" "$peak_kib" "$rss_kib" "$resync" <<'PY'
import sys
(n, t0, ta, ti, tr, mlr, mlw, kw, sp, ex, ap, pods, qr, qw, qk, qrec, peak, rss, resync) = sys.argv[1:]
n = int(n); t0, ta, ti, tr = map(float, (t0, ta, ti, tr))
print(f"""
controller benchmark: {n} GatewayEndpoints created at once (kubectl apply --server-side)
  kubectl apply returned after        {ta - t0:7.1f} s
  every endpoint has experimentId     {ti - t0:7.1f} s   ({n / (ti - t0):.1f} endpoints/s)
  every endpoint Ready (pods Running) {tr - t0:7.1f} s   ({pods} gateway pods Running)
  MLflow experiments with gateway tag {ex}
  MLflow requests per endpoint        {int(mlr) / n:.2f}   (writes {int(mlw) / n:.2f})
  API-server writes per endpoint      {int(kw) / n:.2f}   (status patches {int(sp) / n:.2f}, owned-object applies {int(ap) / n:.2f}, the rest Events and finalizers)
  two quiet resync periods ({resync} s):  MLflow writes {qw}, API-server writes {qk}, MLflow reads {qr}
  controller memory                   peak {int(peak) / 1024:.1f} MiB, now {int(rss) / 1024:.1f} MiB""")
PY
