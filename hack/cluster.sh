#!/usr/bin/env bash
# A real Kubernetes control plane on loopback, with no container runtime:
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok (one Ready fake Node).
#   hack/cluster.sh up RUN_DIR [--owner-pid PID] [--real-node]
#       generate a PKI and kubeconfig in RUN_DIR, start everything on free 127.0.0.1 ports, wait
#       until /readyz is ok, the Node is Ready and the default ServiceAccount exists, then write
#       RUN_DIR/env and print it. --owner-pid: tear everything down when that process ends.
#       --real-node: also start a real node (kubelet, containerd, kube-proxy: hack/node.sh, root
#       only); `hack/node.sh up RUN_DIR` adds it to a running cluster later.
#   hack/cluster.sh down RUN_DIR
#       stop exactly the processes started in RUN_DIR (the real node's too) and remove their state.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

COMPONENTS=(kwok kube-scheduler kube-controller-manager kube-apiserver etcd)

pki() {
  local d=$1/pki; mkdir -p "$d"; cd "$d"
  openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 \
    -subj "/CN=mlflow-gateway-operator-test-ca" 2>/dev/null
  cat > apiserver.ext <<EXT
subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
extendedKeyUsage=serverAuth
keyUsage=digitalSignature,keyEncipherment
EXT
  openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr -subj "/CN=kube-apiserver" 2>/dev/null
  openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
    -extfile apiserver.ext -out apiserver.crt 2>/dev/null
  printf 'extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature,keyEncipherment\n' > client.ext
  openssl req -newkey rsa:2048 -nodes -keyout admin.key -out admin.csr -subj "/O=system:masters/CN=admin" 2>/dev/null
  openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
    -extfile client.ext -out admin.crt 2>/dev/null
  openssl genrsa -out sa.key 2048 2>/dev/null
  openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
  # Token authentication (static token file) for a second admin identity.
  local token; token=$(openssl rand -hex 24)
  echo "$token,admin-token,admin-token-uid,\"system:masters\"" > tokens.csv
  echo "$token" > admin.token
  chmod 600 ./*.key admin.token tokens.csv
  cd - >/dev/null
}

kubeconfig() { # dir server
  local d=$1 server=$2
  cat > "$d/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: $server
    certificate-authority: $d/pki/ca.crt
users:
- name: admin
  user:
    client-certificate: $d/pki/admin.crt
    client-key: $d/pki/admin.key
- name: admin-token
  user:
    token: $(cat "$d/pki/admin.token")
contexts:
- name: local
  context: {cluster: local, user: admin}
- name: local-token
  context: {cluster: local, user: admin-token}
current-context: local
KC
  chmod 600 "$d/kubeconfig"
}

start() { # dir name binary args...
  local d=$1 name=$2; shift 2
  setsid "$@" >"$d/logs/$name.log" 2>&1 < /dev/null &
  echo $! > "$d/pids/$name"
}

alive_or_die() { # dir name
  local pid; pid=$(cat "$1/pids/$2")
  kill -0 "$pid" 2>/dev/null && return
  tail -30 "$1/logs/$2.log" >&2
  down "$1"
  die "$2 exited during start (log above; full log was in $1/logs/$2.log)"
}

wait_for() { # dir what seconds command...
  local d=$1 what=$2 secs=$3; shift 3
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    for c in "${COMPONENTS[@]}"; do [ -f "$d/pids/$c" ] && alive_or_die "$d" "$c"; done
    [ $SECONDS -lt $deadline ] || { down "$d"; die "timed out after ${secs}s waiting for $what"; }
    sleep 0.25
  done
}

up() {
  local dir=$1; shift
  local owner="" real_node=""
  while [ $# -gt 0 ]; do
    case $1 in
      --owner-pid) owner=$2; shift ;;
      --real-node) real_node=1 ;;
      *) die "unknown option $1" ;;
    esac; shift
  done
  local bin; bin=$("$REPO_ROOT/hack/build-tools.sh")
  export PATH=$bin:$PATH
  dir=$(mkdir -p "$dir" && cd "$dir" && pwd)
  for c in "${COMPONENTS[@]}"; do
    [ -f "$dir/pids/$c" ] && kill -0 "$(cat "$dir/pids/$c")" 2>/dev/null && die "a cluster already runs in $dir"
  done
  rm -rf "$dir/pki" "$dir/etcd" "$dir/logs" "$dir/pids" "$dir/env"
  mkdir -p "$dir/logs" "$dir/pids"
  local t0=$SECONDS
  pki "$dir"
  [ -n "$owner" ] && watch_owner "$owner" "$dir"

  local etcd_port peer_port api_port kcm_port sched_port kwok_port
  etcd_port=$(free_port); peer_port=$(free_port); api_port=$(free_port)
  kcm_port=$(free_port); sched_port=$(free_port); kwok_port=$(free_port)
  local server=https://127.0.0.1:$api_port
  kubeconfig "$dir" "$server"
  local kc=$dir/kubeconfig p=$dir/pki

  start "$dir" etcd etcd --name default --data-dir "$dir/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "default=http://127.0.0.1:$peer_port" --unsafe-no-fsync --log-level warn
  wait_for "$dir" etcd 30 curl -fsS "http://127.0.0.1:$etcd_port/health"

  start "$dir" kube-apiserver kube-apiserver --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address 127.0.0.1 --secure-port "$api_port" --advertise-address 127.0.0.1 \
    --endpoint-reconciler-type none \
    --tls-cert-file "$p/apiserver.crt" --tls-private-key-file "$p/apiserver.key" \
    --client-ca-file "$p/ca.crt" --token-auth-file "$p/tokens.csv" \
    --kubelet-client-certificate "$p/admin.crt" --kubelet-client-key "$p/admin.key" \
    --kubelet-preferred-address-types InternalIP \
    --authorization-mode RBAC \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$p/sa.pub" --service-account-signing-key-file "$p/sa.key" \
    --service-cluster-ip-range 10.96.0.0/16 --allow-privileged=true --profiling=false
  wait_for "$dir" "kube-apiserver /readyz" 120 curl -fsS --cacert "$p/ca.crt" --cert "$p/admin.crt" --key "$p/admin.key" "$server/readyz"

  start "$dir" kube-controller-manager kube-controller-manager --kubeconfig "$kc" \
    --authentication-kubeconfig "$kc" --authorization-kubeconfig "$kc" --leader-elect=false \
    --service-account-private-key-file "$p/sa.key" --root-ca-file "$p/ca.crt" \
    --cluster-signing-cert-file "$p/ca.crt" --cluster-signing-key-file "$p/ca.key" \
    --use-service-account-credentials=false --bind-address 127.0.0.1 --secure-port "$kcm_port" --profiling=false
  start "$dir" kube-scheduler kube-scheduler --kubeconfig "$kc" --authentication-kubeconfig "$kc" \
    --authorization-kubeconfig "$kc" --leader-elect=false --bind-address 127.0.0.1 --secure-port "$sched_port" --profiling=false
  # Only the fake node: a real node (hack/node.sh) is its kubelet's.
  start "$dir" kwok kwok --kubeconfig "$kc" --manage-nodes-with-annotation-selector kwok.x-k8s.io/node=fake \
    --cidr 10.244.0.0/16 \
    --node-ip 127.0.0.1 --node-port "$kwok_port" --node-lease-duration-seconds 40

  # The one Node. kwok keeps it Ready and moves the Pods bound to it to Running.
  kubectl --kubeconfig "$kc" apply -f - >/dev/null <<NODE
apiVersion: v1
kind: Node
metadata:
  name: kwok-node-0
  annotations:
    node.alpha.kubernetes.io/ttl: "0"
    kwok.x-k8s.io/node: fake
  labels:
    type: kwok
    kubernetes.io/hostname: kwok-node-0
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
status:
  allocatable: {cpu: "256", memory: 1Ti, pods: "5000"}
  capacity: {cpu: "256", memory: 1Ti, pods: "5000"}
NODE
  wait_for "$dir" "the Node to be Ready" 60 \
    kubectl --kubeconfig "$kc" wait --for=condition=Ready node/kwok-node-0 --timeout=2s
  wait_for "$dir" "the default ServiceAccount (controller-manager)" 60 \
    kubectl --kubeconfig "$kc" get serviceaccount default -n default

  cat > "$dir/env" <<ENV
KUBECONFIG=$kc
KUBE_APISERVER_URL=$server
KUBE_ADMIN_TOKEN_FILE=$p/admin.token
KUBE_CA_FILE=$p/ca.crt
KUBE_BIN_DIR=$bin
KUBE_RUN_DIR=$dir
ENV
  log "cluster ready in $((SECONDS - t0))s"
  if [ -n "$real_node" ]; then
    "$REPO_ROOT/hack/node.sh" up "$dir" >/dev/null || { down "$dir"; die "the real node did not start"; }
  fi
  cat "$dir/env"
}

# Tears the cluster down when OWNER ends (a crashed test run leaves nothing behind).
watch_owner() {
  local owner=$1 dir=$2
  setsid bash -c 'while kill -0 "$1" 2>/dev/null && [ -d "$2/pids" ]; do sleep 1; done; [ -d "$2/pids" ] && "$3" down "$2"' \
    _ "$owner" "$dir" "$REPO_ROOT/hack/cluster.sh" >/dev/null 2>&1 < /dev/null &
}

down() {
  local dir=$1
  # The real node first, while the API server still answers (it deletes its Node object).
  [ -d "$dir/node" ] && { "$REPO_ROOT/hack/node.sh" down "$dir" || true; }
  [ -d "$dir/pids" ] || return 0
  for c in "${COMPONENTS[@]}"; do
    [ -f "$dir/pids/$c" ] || continue
    local pid; pid=$(cat "$dir/pids/$c")
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do group_alive "$pid" || break; sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
  rm -rf "$dir/pids" "$dir/etcd" "$dir/pki" "$dir/env"
}

case ${1:-} in
  up) shift; up "$@" ;;
  down) shift; down "$@" ;;
  *) die "usage: hack/cluster.sh up RUN_DIR [--owner-pid PID] [--real-node] | down RUN_DIR" ;;
esac
