#!/usr/bin/env bash
# A real node for the local stack: a private containerd (runc), the CNI bridge plugin on a bridge
# and subnet this script creates, the pinned kubelet and kube-proxy (iptables mode). It joins the
# control plane that hack/cluster.sh runs in CLUSTER_DIR, beside kwok's fake node.
#   hack/node.sh up CLUSTER_DIR     start it, wait until the Node is Ready and kube-proxy has
#                                   synced, append its settings to CLUSTER_DIR/env and print them
#   hack/node.sh down CLUSTER_DIR   stop everything it started (containers, shims, containerd,
#                                   kubelet, kube-proxy), remove its iptables rules, routes, bridge,
#                                   mounts and cgroups; idempotent, also after a crash
#   hack/node.sh images             build (once, cached) the pause and echo-server images; print the dir
# Needs root (bridge, iptables, mounts). Installs the Debian packages it needs when missing.
# One real node per machine: kube-proxy's iptables chains and the bridge are machine-wide, so a
# marker under /run names the cluster that owns the node and a second `up` refuses to start.
# Pods carry the node's taint and label in their spec to land here; every other pod stays on kwok.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

NODE_NAME=mgo-node
NODE_LABEL_KEY=mlflow-gateway.dev/real-node
BRIDGE=mgo0
# A /24 no one else here uses (podman's default is 10.88.0.0/16, kwok's fake pods 10.244.0.0/16).
SUBNET=${MGO_NODE_SUBNET:-10.222.0.0/24}
HOST_IP=${SUBNET%.0/24}.1
SERVICE_CIDR=10.96.0.0/16 # hack/cluster.sh's --service-cluster-ip-range
KWOK_CIDR=10.244.0.0/16   # hack/cluster.sh's kwok --cidr: fake pod IPs, never routed off the machine
MARKER_DIR=/run/mlflow-gateway-operator
MARKER=$MARKER_DIR/node-owner
CNI_BIN=/usr/lib/cni
CHAIN=MGO-NODE-FORWARD
# Debian packages (and a command or file each provides, to tell whether it is there).
PACKAGES=(containerd:containerd runc:runc containernetworking-plugins:$CNI_BIN/bridge
  iptables:iptables conntrack:conntrack umoci:umoci buildah:buildah gcc:gcc libc6-dev:/usr/lib/x86_64-linux-gnu/libc.a)

[ "$(id -u)" = 0 ] || die "the real node needs root (a bridge, iptables rules, mounts)"
[[ $SUBNET =~ ^[0-9]+\.[0-9]+\.[0-9]+\.0/24$ ]] || die "MGO_NODE_SUBNET must be a /24 like 10.222.0.0/24"

ensure_packages() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    local pkg=${p%%:*} probe=${p#*:}
    if [[ $probe == /* ]]; then [ -e "$probe" ] || missing+=("$pkg"); else command -v "$probe" >/dev/null || missing+=("$pkg"); fi
  done
  [ ${#missing[@]} -eq 0 ] && return
  log "installing Debian packages: ${missing[*]}"
  # Keep the packages' own services (the system containerd) from starting: the node runs its own.
  local policy=/usr/sbin/policy-rc.d added=""
  if [ ! -e $policy ]; then printf '#!/bin/sh\nexit 101\n' > $policy; chmod +x $policy; added=1; fi
  local rc=0
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}"; } >&2 || rc=1
  [ -n "$added" ] && rm -f $policy
  [ $rc -eq 0 ] || die "apt-get install ${missing[*]} failed"
}

# The pause image (containerd's sandbox_image) and the tests' echo-server image: static C programs
# in hack/node/, each packaged with umoci as an OCI archive. Cached by the sources' hash.
images() {
  # Bump the recipe number when the packaging below changes.
  local sum; sum=$( (echo recipe-1; cat "$REPO_ROOT"/hack/node/*.c) | sha256sum | cut -c1-12)
  local out=$CACHE_DIR/node-images-$sum
  if [ ! -f "$out/done" ]; then
    log "building the node's images (pause, echo-server)"
    local tmp=$out.tmp; rm -rf "$tmp"; mkdir -p "$tmp"
    local prog
    for prog in pause echo-server; do
      gcc -static -Os -s -o "$tmp/$prog" "$REPO_ROOT/hack/node/$prog.c"
      (cd "$tmp" && umoci init --layout "oci-$prog" && umoci new --image "oci-$prog:$sum" \
        && umoci unpack --rootless --image "oci-$prog:$sum" "bundle-$prog" >/dev/null \
        && cp "$prog" "bundle-$prog/rootfs/$prog" \
        && umoci repack --image "oci-$prog:$sum" "bundle-$prog" \
        && umoci config --image "oci-$prog:$sum" --config.entrypoint "/$prog" --clear=config.cmd \
          --config.user 65532 --config.workingdir / \
        && umoci gc --layout "oci-$prog" && tar -C "oci-$prog" -cf "$prog.tar" . \
        && rm -rf "oci-$prog" "bundle-$prog" "$prog")
    done
    echo "$sum" > "$tmp/tag"; touch "$tmp/done"
    rm -rf "$out"; mv "$tmp" "$out"
  fi
  echo "$out"
}

image_ref() { echo "localhost/mlflow-gateway-operator/$1:$(cat "$2/tag")"; } # name images_dir

ctr_() { ctr --address "$NODE_DIR/containerd.sock" --namespace k8s.io "$@"; }

start() { # name args...
  local name=$1; shift
  setsid "$@" >"$NODE_DIR/logs/$name.log" 2>&1 < /dev/null 8>&- &  # 8: up's lock, not theirs
  echo $! > "$NODE_DIR/pids/$name"
}

wait_for() { # what seconds command...
  local what=$1 secs=$2; shift 2
  local deadline=$((SECONDS + secs)) c
  until "$@" >/dev/null 2>&1; do
    for c in containerd kubelet kube-proxy; do
      [ -f "$NODE_DIR/pids/$c" ] || continue
      kill -0 "$(cat "$NODE_DIR/pids/$c")" 2>/dev/null && continue
      tail -30 "$NODE_DIR/logs/$c.log" >&2
      down "$CLUSTER_DIR"
      die "$c exited during start (log above)"
    done
    [ $SECONDS -lt $deadline ] || { down "$CLUSTER_DIR"; die "timed out after ${secs}s waiting for $what"; }
    sleep 0.25
  done
}

network_up() {
  mkdir -p "$MARKER_DIR"
  [ -f "$MARKER_DIR/ip_forward.saved" ] || cat /proc/sys/net/ipv4/ip_forward > "$MARKER_DIR/ip_forward.saved"
  ip link add "$BRIDGE" type bridge
  ip addr add "$HOST_IP/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  # Pods reach each other and Services through the host: forwarding on (restored by `down`).
  echo 1 > /proc/sys/net/ipv4/ip_forward
  # ClusterIPs go to the bridge before kube-proxy's DNAT (never out of the machine's uplink),
  # kwok's fake pod IPs nowhere at all.
  ip route add "$SERVICE_CIDR" dev "$BRIDGE" src "$HOST_IP"
  ip route add blackhole "$KWOK_CIDR"
  # Pods may talk to each other and to the host; nothing they send is forwarded anywhere else.
  iptables -w -N "$CHAIN"
  iptables -w -A "$CHAIN" -i "$BRIDGE" -o "$BRIDGE" -j RETURN
  iptables -w -A "$CHAIN" -i "$BRIDGE" -j DROP
  iptables -w -A "$CHAIN" -o "$BRIDGE" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
  iptables -w -I FORWARD 1 -j "$CHAIN"
}

network_down() {
  while iptables -w -D FORWARD -j "$CHAIN" 2>/dev/null; do :; done
  iptables -w -F "$CHAIN" 2>/dev/null || true
  iptables -w -X "$CHAIN" 2>/dev/null || true
  ip route del "$SERVICE_CIDR" dev "$BRIDGE" 2>/dev/null || true
  ip route del blackhole "$KWOK_CIDR" 2>/dev/null || true
  ip link del "$BRIDGE" 2>/dev/null || true
  if [ -f "$MARKER_DIR/ip_forward.saved" ]; then
    cat "$MARKER_DIR/ip_forward.saved" > /proc/sys/net/ipv4/ip_forward
    rm -f "$MARKER_DIR/ip_forward.saved"
  fi
}

# Removes what kube-proxy and kubelet leave in iptables (kube-proxy's own --cleanup first, then
# any KUBE-* chain: kubelet's canaries), for IPv4 and IPv6.
iptables_cleanup() {
  local bin=$1
  [ -x "$bin/kube-proxy" ] && "$bin/kube-proxy" --cleanup >/dev/null 2>&1 || true
  local save restore
  for save in iptables-save ip6tables-save; do
    restore=${save/-save/-restore}
    "$save" 2>/dev/null | grep -q 'KUBE-' || continue
    "$save" | grep -v -e '^:KUBE-' -e '^-A KUBE-' -e '-j KUBE-' | "$restore" -w
  done
}

write_configs() { # bin kubelet_port kubelet_healthz proxy_healthz proxy_metrics
  local p=$CLUSTER_DIR/pki
  cat > "$NODE_DIR/containerd.toml" <<EOF
version = 2
root = "$NODE_DIR/containerd/root"
state = "$NODE_DIR/containerd/state"
[grpc]
  address = "$NODE_DIR/containerd.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "$NODE_DIR/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # No CAP_SYS_RESOURCE in sandboxes like this one: the pause container's negative
  # oom_score_adj would fail ("can't get final child's PID from pipe: EOF").
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  enable_tls_streaming = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    snapshotter = "overlayfs"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "$NODE_DIR/containerd/runc"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$CNI_BIN"
    conf_dir = "$NODE_DIR/cni"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$NODE_DIR/containerd/certs.d"
EOF
  mkdir -p "$NODE_DIR/cni"
  cat > "$NODE_DIR/cni/10-mgo-node.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "mgo-node",
  "plugins": [{
    "type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": false, "hairpinMode": true,
    "ipam": {"type": "host-local", "dataDir": "$NODE_DIR/cni-ipam",
             "ranges": [[{"subnet": "$SUBNET", "gateway": "$HOST_IP"}]],
             "routes": [{"dst": "0.0.0.0/0"}]}
  }]
}
EOF
  cat > "$NODE_DIR/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $HOST_IP
port: $2
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $3
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $p/ca.crt}
authorization: {mode: Webhook}
containerRuntimeEndpoint: unix://$NODE_DIR/containerd.sock
# cgroups v1 (hybrid) here: cgroupfs, and kubelet must not refuse v1; swap may be on.
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
registerWithTaints:
- {key: $NODE_LABEL_KEY, value: "true", effect: NoSchedule}
podLogsDir: $NODE_DIR/pod-logs
volumePluginDir: $NODE_DIR/volume-plugins
resolvConf: /etc/resolv.conf
clusterDomain: cluster.local
# A shared machine: never evict for another process's disk or memory use, never collect the
# imported images (nothing can pull them back).
evictionHard: {memory.available: 50Mi, nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
maxPods: 110
syncFrequency: 10s
EOF
  cat > "$NODE_DIR/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $CLUSTER_DIR/kubeconfig}
hostnameOverride: $NODE_NAME
mode: iptables
clusterCIDR: $SUBNET
bindAddress: $HOST_IP
healthzBindAddress: 127.0.0.1:$4
metricsBindAddress: 127.0.0.1:$5
nodePortAddresses: ["$HOST_IP/32"]
iptables: {localhostNodePorts: false, syncPeriod: 30s, minSyncPeriod: 0s}
# Leave the machine's conntrack sysctls alone.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
}

up() {
  CLUSTER_DIR=$(cd "$1" && pwd); NODE_DIR=$CLUSTER_DIR/node
  [ -f "$CLUSTER_DIR/env" ] && [ -f "$CLUSTER_DIR/kubeconfig" ] \
    || die "no cluster runs in $CLUSTER_DIR (start it with hack/cluster.sh up $CLUSTER_DIR)"
  local t0=$SECONDS
  # Two `up`s at once must not both find the machine free.
  mkdir -p "$CACHE_DIR"; exec 8>"$CACHE_DIR/node.lock"; flock 8
  if [ -f "$MARKER" ]; then
    local owner; owner=$(cat "$MARKER") alive=""
    [ -f "$owner/node/pids/kubelet" ] && kill -0 "$(cat "$owner/node/pids/kubelet")" 2>/dev/null && alive=1
    if [ -n "$alive" ] && [ "$owner" = "$CLUSTER_DIR" ] && grep -q '^KUBE_REAL_NODE=' "$CLUSTER_DIR/env"; then
      log "the real node already runs in $CLUSTER_DIR"; grep -e '^KUBE_REAL_NODE' -e '^KUBE_NODE_' -e '^KUBE_CONTAINERD_' "$CLUSTER_DIR/env"; return
    fi
    if [ -n "$alive" ]; then
      die "a real node already runs on this machine, for the cluster in $owner (one per machine:
the bridge and kube-proxy's iptables rules are machine-wide). Stop it with hack/cluster.sh down $owner"
    fi
    log "cleaning up after a real node that did not stop ($owner)"
    down "$owner"
  fi
  ensure_packages
  local bin; bin=$("$REPO_ROOT/hack/build-tools.sh")
  local imgs; imgs=$(images)
  PAUSE_IMAGE=$(image_ref pause "$imgs")
  local echo_image; echo_image=$(image_ref echo-server "$imgs")

  rm -rf "$NODE_DIR"; mkdir -p "$NODE_DIR/logs" "$NODE_DIR/pids" "$MARKER_DIR"
  echo "$CLUSTER_DIR" > "$MARKER"
  # containerd 1.6's shims put their sockets under /run/containerd/s whatever the config says.
  [ -e /run/containerd ] || touch "$MARKER_DIR/run-containerd.ours"
  network_up || { down "$CLUSTER_DIR"; die "cannot set up the bridge $BRIDGE ($SUBNET)"; }
  local kubelet_port kubelet_healthz proxy_healthz proxy_metrics
  kubelet_port=$(free_port); kubelet_healthz=$(free_port); proxy_healthz=$(free_port); proxy_metrics=$(free_port)
  write_configs "$bin" "$kubelet_port" "$kubelet_healthz" "$proxy_healthz" "$proxy_metrics"

  # No image is pulled: a pod that asks for one not imported fails at once, through a proxy
  # address where nothing listens, instead of reaching for a registry.
  start containerd env HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 NO_PROXY= \
    http_proxy= https_proxy= no_proxy= containerd --config "$NODE_DIR/containerd.toml"
  wait_for containerd 30 ctr_ version
  local img
  for img in pause echo-server; do
    ctr_ images import --base-name "localhost/mlflow-gateway-operator/$img" "$imgs/$img.tar" >/dev/null \
      || { down "$CLUSTER_DIR"; die "cannot import the $img image"; }
  done

  start kubelet "$bin/kubelet" --config "$NODE_DIR/kubelet.yaml" --kubeconfig "$CLUSTER_DIR/kubeconfig" \
    --root-dir "$NODE_DIR/kubelet" --cert-dir "$NODE_DIR/kubelet-pki" --hostname-override "$NODE_NAME" \
    --node-ip "$HOST_IP" --node-labels "$NODE_LABEL_KEY=true"
  start kube-proxy "$bin/kube-proxy" --config "$NODE_DIR/kube-proxy.yaml"
  wait_for "the Node $NODE_NAME to be Ready" 120 \
    "$bin/kubectl" --kubeconfig "$CLUSTER_DIR/kubeconfig" wait --for=condition=Ready "node/$NODE_NAME" --timeout=2s
  wait_for "kube-proxy to sync" 60 curl -fsS "http://127.0.0.1:$proxy_healthz/healthz"

  cat >> "$CLUSTER_DIR/env" <<EOF
KUBE_REAL_NODE=$NODE_NAME
KUBE_REAL_NODE_LABEL=$NODE_LABEL_KEY=true
KUBE_REAL_NODE_TAINT=$NODE_LABEL_KEY=true:NoSchedule
KUBE_NODE_HOST_IP=$HOST_IP
KUBE_NODE_POD_SUBNET=$SUBNET
KUBE_NODE_TEST_IMAGE=$echo_image
KUBE_NODE_PAUSE_IMAGE=$PAUSE_IMAGE
KUBE_CONTAINERD_SOCK=$NODE_DIR/containerd.sock
KUBE_CONTAINERD_NAMESPACE=k8s.io
EOF
  log "real node $NODE_NAME ready in $((SECONDS - t0))s"
  grep -e '^KUBE_REAL_NODE' -e '^KUBE_NODE_' -e '^KUBE_CONTAINERD_' "$CLUSTER_DIR/env"
}

stop_pid() { # pidfile [signal]
  [ -f "$1" ] || return 0
  local pid; pid=$(cat "$1")
  kill "-${2:-TERM}" -- "-$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do group_alive "$pid" || break; sleep 0.1; done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$1"
}

# The pids of processes whose command line contains $1 (the shims started for our socket).
pids_with_arg() {
  local f pid
  for f in /proc/[0-9]*/cmdline; do
    pid=${f#/proc/}; pid=${pid%/cmdline}
    { tr '\0' ' ' < "$f"; } 2>/dev/null | grep -qF -- "$1" && echo "$pid"
  done
  return 0
}

down() {
  # Locals: `up` calls this for a stale node of another cluster and goes on with its own.
  local CLUSTER_DIR=$1; local NODE_DIR=$CLUSTER_DIR/node
  local owner=""; [ -f "$MARKER" ] && owner=$(cat "$MARKER")
  [ -d "$NODE_DIR" ] || [ "$owner" = "$CLUSTER_DIR" ] || return 0
  local sock=$NODE_DIR/containerd.sock bin=$TOOLS_BIN_DIR kc=$CLUSTER_DIR/kubeconfig
  # Neither keeps state worth a graceful stop (the containers are killed below).
  stop_pid "$NODE_DIR/pids/kube-proxy" KILL
  stop_pid "$NODE_DIR/pids/kubelet" KILL
  # Every container of every pod, then containerd. Killing the tasks through containerd lets the
  # shims unmount the root filesystems and remove the containers' cgroups.
  if [ -S "$sock" ] && ctr_ version >/dev/null 2>&1; then
    local t
    for t in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks kill -a -s SIGKILL "$t" >/dev/null 2>&1 || true; done
    # A pod's sandbox task is deleted only after its containers': rounds until none is left.
    local left
    for _ in $(seq 1 50); do
      left=$(ctr_ tasks ls -q 2>/dev/null) || break
      [ -n "$left" ] || break
      for t in $left; do ctr_ tasks delete "$t" >/dev/null 2>&1 || true; done
      sleep 0.1
    done
  fi
  stop_pid "$NODE_DIR/pids/containerd"
  # A shim that outlived containerd (after a crash), and whatever still runs in the pods' cgroups.
  local pid
  for pid in $(pids_with_arg "-address $sock"); do kill -KILL "$pid" 2>/dev/null || true; done
  local cg
  for cg in /sys/fs/cgroup/*/kubepods*; do
    [ -d "$cg" ] || continue
    find "$cg" -name cgroup.procs -exec cat {} + 2>/dev/null | while read -r pid; do kill -KILL "$pid" 2>/dev/null || true; done
  done
  iptables_cleanup "$bin"
  network_down
  # Pod volumes (tmpfs), root filesystems and network namespaces are mounts under the node dir.
  if [ -d "$NODE_DIR" ]; then
    local m
    for m in $(awk -v d="$NODE_DIR/" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo | sort -r); do
      umount -l "$m" 2>/dev/null || true
    done
  fi
  # The cgroups kubelet made (kubepods and below), deepest first, once empty.
  for cg in /sys/fs/cgroup/*/kubepods*; do
    [ -d "$cg" ] && find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null || true
  done
  # The Node object, if the control plane still runs (pods bound to it are then garbage-collected).
  if [ -f "$kc" ] && [ -x "$bin/kubectl" ]; then
    "$bin/kubectl" --kubeconfig "$kc" delete node "$NODE_NAME" --ignore-not-found --wait=false \
      --request-timeout=5s >/dev/null 2>&1 || true
  fi
  [ -f "$CLUSTER_DIR/env" ] && sed -i -e '/^KUBE_REAL_NODE/d' -e '/^KUBE_NODE_/d' -e '/^KUBE_CONTAINERD_/d' "$CLUSTER_DIR/env"
  rm -rf "$NODE_DIR"
  if [ "$owner" = "$CLUSTER_DIR" ]; then
    if [ -f "$MARKER_DIR/run-containerd.ours" ]; then
      # Killed shims leave their sockets; the directory was ours, and no containerd runs now.
      pgrep -x containerd >/dev/null || pgrep -f '^/usr/bin/containerd-shim' >/dev/null \
        || rm -rf /run/containerd
      rm -f "$MARKER_DIR/run-containerd.ours"
    fi
    rm -f "$MARKER"
    rmdir "$MARKER_DIR" 2>/dev/null || true
  fi
  return 0
}

case ${1:-} in
  up) [ $# -eq 2 ] || die "usage: hack/node.sh up CLUSTER_DIR"; up "$2" ;;
  down) [ $# -eq 2 ] || die "usage: hack/node.sh down CLUSTER_DIR"; down "$(cd "$2" 2>/dev/null && pwd || echo "$2")" ;;
  images) images ;;
  *) die "usage: hack/node.sh up CLUSTER_DIR | down CLUSTER_DIR | images" ;;
esac
