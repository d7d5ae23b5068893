#!/usr/bin/env bash
# The whole thing, locally: a real Kubernetes control plane, a real MLflow server, the operator,
# the endpoints of examples/ (each with its experiment and its gateway pods), and one traced chat
# request through an endpoint's gateway. kwok pods run no process, so the gateway runs here, exactly
# as its Deployment declares it (run-gateway), in front of a local fake of the OpenAI API (fake-llm):
# the two commands of tools/dev, whose code the tests use too.
#   hack/demo.sh up     (make demo)       start everything and print where to look
#   hack/demo.sh down   (make demo-down)  stop everything it started
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"
dir=${MGO_DEMO_DIR:-$REPO_ROOT/.stack/demo}

down() {
  for p in operator gateway fake-llm; do
    if [ -f "$dir/$p.pid" ]; then
      kill "$(cat "$dir/$p.pid")" 2>/dev/null || true
      rm -f "$dir/$p.pid"
    fi
  done
  hack/mlflow.sh down "$dir/mlflow"
  hack/cluster.sh down "$dir/cluster"
  log "demo stopped"
}

up() {
  [ -f "$dir/cluster/env" ] && { log "a demo is already running; 'make demo-down' first"; down; }
  mkdir -p "$dir"
  log "building the operator, fake-llm and run-gateway"
  cargo build --quiet --locked --workspace --bins
  log "starting the control plane (the first run builds Kubernetes from source: ~25 min)"
  hack/cluster.sh up "$dir/cluster" >/dev/null
  log "starting MLflow"
  hack/mlflow.sh up "$dir/mlflow" >/dev/null
  set -a; source "$dir/cluster/env"; source "$dir/mlflow/env"; set +a
  export PATH=$KUBE_BIN_DIR:$PATH

  log "installing the CRD and starting the operator"
  kubectl apply --server-side -f crds/ >/dev/null
  wait_crd_established gatewayendpoints.mlflow-gateway.dev
  MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI KUBECONFIG=$KUBECONFIG \
    setsid target/debug/mlflow-gateway-operator controller >"$dir/operator.log" 2>&1 < /dev/null &
  echo $! > "$dir/operator.pid"

  log "applying examples/"
  kubectl create namespace demo --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  kubectl apply -n demo -f examples/ >/dev/null

  log "starting a local fake of the OpenAI API and an endpoint that uses it"
  local fake_port gw_port
  fake_port=$(free_port); gw_port=$(free_port)
  setsid target/debug/fake-llm --port "$fake_port" --api-key sk-demo-local --name fake-openai \
    >"$dir/fake-llm.log" 2>&1 < /dev/null &
  echo $! > "$dir/fake-llm.pid"
  kubectl apply -n demo -f - >/dev/null <<YAML
apiVersion: v1
kind: Secret
metadata: {name: local-keys}
stringData: {openai: sk-demo-local}
---
apiVersion: mlflow-gateway.dev/v1alpha1
kind: GatewayEndpoint
metadata: {name: assistant}
spec:
  models:
    - {name: local, provider: openai, model: gpt-4o-mini, apiBase: "http://127.0.0.1:$fake_port/v1",
       apiKeySecretRef: {name: local-keys, key: openai}}
  access: {open: true}
YAML
  kubectl wait -n demo --for condition=Ready gatewayendpoints --all --timeout=180s >/dev/null \
    || { tail -20 "$dir/operator.log" >&2; die "endpoints did not become Ready (operator log: $dir/operator.log)"; }

  log "running the assistant endpoint's gateway as its Deployment declares it"
  setsid target/debug/run-gateway demo assistant "127.0.0.1:$gw_port" target/debug/mlflow-gateway-operator \
    >"$dir/gateway.log" 2>&1 < /dev/null &
  echo $! > "$dir/gateway.pid"
  local i
  for i in $(seq 1 100); do
    curl -fsS -o /dev/null "http://127.0.0.1:$gw_port/readyz" 2>/dev/null && break
    [ "$i" = 100 ] && { cat "$dir/gateway.log" >&2; die "the gateway did not start (log: $dir/gateway.log)"; }
    sleep 0.2
  done
  local headers answer trace_id experiment
  headers=$(mktemp)
  answer=$(curl -fsS -D "$headers" "http://127.0.0.1:$gw_port/v1/chat/completions" \
    -H 'content-type: application/json' \
    -d '{"model": "assistant", "messages": [{"role": "user", "content": "What does the operator do?"}]}')
  trace_id=$(awk 'tolower($1) == "x-mlflow-trace-id:" {print $2}' "$headers" | tr -d '\r')
  rm -f "$headers"
  experiment=$(kubectl get gatewayendpoint -n demo assistant -o jsonpath='{.status.experimentId}')
  local trace=""
  for _ in $(seq 1 60); do
    trace=$(curl -fsS "$MLFLOW_TRACKING_URI/api/3.0/mlflow/traces/get?trace_id=$trace_id" 2>/dev/null) \
      && grep -q '"mlflow.gateway.endpointId"' <<<"$trace" && break
    trace=""; sleep 1
  done
  [ -n "$trace" ] || die "the trace $trace_id did not reach MLflow (gateway log: $dir/gateway.log)"

  cat <<MSG

The demo is running.
  export KUBECONFIG=$KUBECONFIG
  export PATH=$KUBE_BIN_DIR:\$PATH        # kubectl $KUBERNETES_VERSION, helm
  API server:   $KUBE_APISERVER_URL
  MLflow UI:    $MLFLOW_TRACKING_URI
  Operator log: $dir/operator.log

\$ kubectl get gatewayendpoints -n demo
$(kubectl get gatewayendpoints -n demo)

\$ kubectl get deployments,services,configmaps -n demo -l app.kubernetes.io/managed-by=mlflow-gateway-operator
$(kubectl get deployments,services,configmaps -n demo -l app.kubernetes.io/managed-by=mlflow-gateway-operator)

A chat request through the assistant endpoint's gateway (http://127.0.0.1:$gw_port):
  answer: $(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["choices"][0]["message"]["content"])' "$answer")
  trace:  $trace_id, in experiment $experiment
$(python3 - "$trace" <<'PY'
import json, sys
t = json.loads(sys.argv[1])["trace"]
info, spans = t["trace_info"], t.get("spans", [])
print(f"  state:  {info.get('state')}, {len(spans)} spans: " + ", ".join(s["name"] for s in spans))
usage = info.get("trace_metadata", {}).get("mlflow.trace.tokenUsage")
if usage:
    print(f"  tokens: {usage}")
PY
)
  open:   $(kubectl get gatewayendpoint -n demo assistant -o jsonpath='{.status.experimentUrl}')

Each endpoint's experiment:
$(kubectl get gatewayendpoints -n demo -o jsonpath='{range .items[*]}  {.metadata.name}: experiment {.status.experimentId} ({.status.experimentName}){"\n"}    {.status.experimentUrl}{"\n"}{end}')

Stop it all with: make demo-down
MSG
}

case ${1:-} in
  up) up ;;
  down) down ;;
  *) die "usage: hack/demo.sh up|down" ;;
esac
