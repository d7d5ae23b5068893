#!/usr/bin/env bash
# The whole thing, locally: a real Kubernetes control plane with a real node (kubelet, containerd,
# runc: hack/node.sh) beside kwok's fake one, a real MLflow server, the operator, the endpoints of
# examples/ (each with its experiment and its gateway pods, fake ones on kwok), and one traced chat
# request through the Service of an endpoint whose gateway pods really run on the real node, from
# the image built from the repo's Dockerfile (hack/image.sh), in front of a local fake of the
# OpenAI API (fake-llm). Pods reach MLflow and the fake on the node's bridge address. Needs root.
#   hack/demo.sh up     (make demo)       start everything and print where to look
#   hack/demo.sh down   (make demo-down)  stop everything it started
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"
dir=${MGO_DEMO_DIR:-$REPO_ROOT/.stack/demo}

down() {
  for p in operator fake-llm; do
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
  log "building the operator and fake-llm"
  cargo build --quiet --locked --workspace --bins
  log "starting the control plane and a real node (the first run builds Kubernetes from source: ~25 min)"
  hack/cluster.sh up "$dir/cluster" --real-node >/dev/null
  set -a; source "$dir/cluster/env"; set +a
  log "starting MLflow on the node's bridge address ($KUBE_NODE_HOST_IP), where the gateway pods reach it"
  hack/mlflow.sh up "$dir/mlflow" --host "$KUBE_NODE_HOST_IP" >/dev/null
  set -a; source "$dir/mlflow/env"; set +a
  export PATH=$KUBE_BIN_DIR:$PATH

  log "building the image from the Dockerfile (hack/image.sh) into the node's containerd"
  local image
  image=$(hack/image.sh build --tag localhost/mlflow-gateway-operator:demo \
    --binary target/debug/mlflow-gateway-operator --containerd "$KUBE_CONTAINERD_SOCK")

  log "installing the CRD and starting the operator"
  kubectl apply --server-side -f crds/ >/dev/null
  wait_crd_established gatewayendpoints.mlflow-gateway.dev
  MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI KUBECONFIG=$KUBECONFIG GATEWAY_IMAGE=$image \
    setsid target/debug/mlflow-gateway-operator controller >"$dir/operator.log" 2>&1 < /dev/null &
  echo $! > "$dir/operator.pid"

  log "applying examples/"
  kubectl create namespace demo --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  kubectl apply -n demo -f examples/ >/dev/null

  log "starting a local fake of the OpenAI API and an endpoint that uses it"
  local fake_port node_key=${KUBE_REAL_NODE_LABEL%=true}
  fake_port=$(free_port)
  setsid target/debug/fake-llm --host "$KUBE_NODE_HOST_IP" --port "$fake_port" --api-key sk-demo-local \
    --name fake-openai >"$dir/fake-llm.log" 2>&1 < /dev/null &
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
    - {name: local, provider: openai, model: gpt-4o-mini, apiBase: "http://$KUBE_NODE_HOST_IP:$fake_port/v1",
       apiKeySecretRef: {name: local-keys, key: openai}}
  access: {open: true}
  gateway:
    # The real node (tainted: only pods that ask land there); examples/ stay on kwok.
    nodeSelector: {"$node_key": "true"}
    tolerations: [{key: "$node_key", operator: Exists, effect: NoSchedule}]
YAML
  kubectl wait -n demo --for condition=Ready gatewayendpoints --all --timeout=180s >/dev/null \
    || { tail -20 "$dir/operator.log" >&2; die "endpoints did not become Ready (operator log: $dir/operator.log)"; }
  kubectl rollout status -n demo deployment/assistant --timeout=180s >/dev/null \
    || { kubectl describe pods -n demo -l app.kubernetes.io/instance=assistant >&2; die "the assistant's gateway pod did not become ready"; }

  log "sending a chat request through the assistant endpoint's Service"
  local svc headers answer trace_id experiment
  svc=http://$(kubectl get service -n demo assistant -o jsonpath='{.spec.clusterIP}'):8080
  # kube-proxy routes the new Service a moment after the pod is ready.
  local i
  for i in $(seq 1 100); do
    curl -fs -o /dev/null "$svc/readyz" && break
    [ "$i" = 100 ] && die "the assistant's Service $svc does not answer"
    sleep 0.2
  done
  headers=$(mktemp)
  answer=$(curl -fsS -D "$headers" "$svc/v1/chat/completions" \
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
  [ -n "$trace" ] || die "the trace $trace_id did not reach MLflow (kubectl logs -n demo deployment/assistant)"

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

The assistant endpoint's gateway pod, on the real node:
\$ kubectl get pods -n demo -l app.kubernetes.io/instance=assistant -o wide
$(kubectl get pods -n demo -l app.kubernetes.io/instance=assistant -o wide)

A chat request through the assistant endpoint's Service ($svc):
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

The pod's own log:
\$ kubectl logs -n demo deployment/assistant
$(kubectl logs -n demo deployment/assistant | sed 's/^/  /')

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
