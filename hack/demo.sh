#!/usr/bin/env bash
# The whole thing, locally: a real Kubernetes control plane, a real MLflow server, the operator,
# and the endpoints of examples/, each with its experiment.
#   hack/demo.sh up     (make demo)       start everything and print where to look
#   hack/demo.sh down   (make demo-down)  stop everything it started
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"
dir=${MGO_DEMO_DIR:-$REPO_ROOT/.stack/demo}

down() {
  if [ -f "$dir/operator.pid" ]; then
    kill "$(cat "$dir/operator.pid")" 2>/dev/null || true
    rm -f "$dir/operator.pid"
  fi
  hack/mlflow.sh down "$dir/mlflow"
  hack/cluster.sh down "$dir/cluster"
  log "demo stopped"
}

up() {
  [ -f "$dir/cluster/env" ] && { log "a demo is already running; 'make demo-down' first"; down; }
  mkdir -p "$dir"
  log "building the operator"
  cargo build --quiet --locked
  log "starting the control plane (the first run builds Kubernetes from source: ~25 min)"
  hack/cluster.sh up "$dir/cluster" >/dev/null
  log "starting MLflow"
  hack/mlflow.sh up "$dir/mlflow" >/dev/null
  set -a; source "$dir/cluster/env"; source "$dir/mlflow/env"; set +a
  export PATH=$KUBE_BIN_DIR:$PATH

  log "installing the CRD and starting the operator"
  kubectl apply --server-side -f crds/ >/dev/null
  kubectl wait --for condition=Established crd/gatewayendpoints.mlflow-gateway.dev --timeout=60s >/dev/null
  MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI KUBECONFIG=$KUBECONFIG \
    setsid target/debug/mlflow-gateway-operator controller >"$dir/operator.log" 2>&1 < /dev/null &
  echo $! > "$dir/operator.pid"

  log "applying examples/"
  kubectl create namespace demo --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  kubectl apply -n demo -f examples/ >/dev/null
  kubectl wait -n demo --for condition=Ready gatewayendpoints --all --timeout=120s >/dev/null \
    || { tail -20 "$dir/operator.log" >&2; die "endpoints did not become Ready (operator log: $dir/operator.log)"; }

  cat <<MSG

The demo is running.
  export KUBECONFIG=$KUBECONFIG
  export PATH=$KUBE_BIN_DIR:\$PATH        # kubectl $KUBERNETES_VERSION, helm
  API server:   $KUBE_APISERVER_URL
  MLflow UI:    $MLFLOW_TRACKING_URI
  Operator log: $dir/operator.log

\$ kubectl get gatewayendpoints -n demo
$(kubectl get gatewayendpoints -n demo)

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
