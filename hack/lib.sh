# Shared settings for the hack/ scripts. Sourced, not run.
# Pinned versions of the upstream tools the tests and the demo run. Changing one rebuilds it.
KUBERNETES_VERSION=v1.34.4
ETCD_VERSION=v3.6.16
KWOK_VERSION=v0.7.0
HELM_VERSION=v3.19.5
MLFLOW_VERSION=3.17.2
# The official OpenAI Python SDK, installed beside MLflow: tests prove it works against the gateway.
OPENAI_SDK_VERSION=3.54.0

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Heavy artefacts live outside the repo, keyed by version, and are reused across clones and runs.
CACHE_DIR=${MGO_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/mlflow-gateway-operator}
# hack/build-tools.sh links every built tool here (what it prints).
TOOLS_BIN_DIR=$CACHE_DIR/bin-k8s$KUBERNETES_VERSION-etcd$ETCD_VERSION-kwok$KWOK_VERSION-helm$HELM_VERSION

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# A free TCP port on 127.0.0.1 (the kernel picks it; a tiny race remains until the server binds).
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# Waits up to 60 s until the API server serves the CRD $1 (kubectl on PATH, KUBECONFIG set).
# `kubectl wait --for condition=Established` fails at once while a new CRD has no conditions yet.
wait_crd_established() {
  local i
  for i in $(seq 300); do
    [ "$(kubectl get "crd/$1" -o 'jsonpath={.status.conditions[?(@.type=="Established")].status}' 2>/dev/null)" = True ] && return 0
    sleep 0.2
  done
  die "CRD $1 not established within 60 s"
}

# True while a process of group $1 is alive. Zombies do not count: this machine's init may reap
# late, and `kill -0` succeeds on a zombie.
group_alive() {
  ps -e -o pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ {found = 1} END {exit !found}'
}
