#!/usr/bin/env bash
# Builds the pinned Kubernetes binaries (kube-apiserver, kube-controller-manager, kube-scheduler,
# kubectl; kubelet and kube-proxy for the real node), etcd, kwok and helm from their Go modules into $CACHE_DIR/bin-<version>/, once per
# version. Prints the directory holding all of them. Safe to run concurrently: a lock serialises it.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

command -v go >/dev/null 2>&1 || die "Go is not installed. The tests build the upstream Kubernetes
binaries from their Go modules (no prebuilt binary can be downloaded here). Install Go >= 1.24
(https://go.dev/doc/install, or 'apt-get install golang-go' where it is recent enough) and retry."

export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod
mkdir -p "$CACHE_DIR"
exec 9>"$CACHE_DIR/build.lock"
flock 9

k8s_bin=$CACHE_DIR/kubernetes-$KUBERNETES_VERSION
node_bin=$CACHE_DIR/kubernetes-node-$KUBERNETES_VERSION
etcd_bin=$CACHE_DIR/etcd-$ETCD_VERSION
kwok_bin=$CACHE_DIR/kwok-$KWOK_VERSION
helm_bin=$CACHE_DIR/helm-$HELM_VERSION

k8s_ldflags() {
  local minor=${KUBERNETES_VERSION#v1.}; minor=${minor%%.*}
  local ld="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ld+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  echo "$ld"
}

build_kubernetes() {
  [ -x "$k8s_bin/kubectl" ] && [ -x "$k8s_bin/kube-apiserver" ] && [ -x "$k8s_bin/kube-controller-manager" ] \
    && [ -x "$k8s_bin/kube-scheduler" ] && return
  log "building Kubernetes $KUBERNETES_VERSION (cold: about 20-30 min on 2 cores)"
  local tmp=$k8s_bin.tmp; rm -rf "$tmp"; mkdir -p "$tmp"
  (cd "$REPO_ROOT/tools/kubernetes" && go build -trimpath -ldflags "$(k8s_ldflags)" -o "$tmp/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl)
  rm -rf "$k8s_bin"; mv "$tmp" "$k8s_bin"
}

# The real node's kubelet and kube-proxy: same module and recipe, their own cache directory so a
# cache that already holds the control plane is not rebuilt.
build_node() {
  [ -x "$node_bin/kubelet" ] && [ -x "$node_bin/kube-proxy" ] && return
  log "building kubelet and kube-proxy $KUBERNETES_VERSION"
  local tmp=$node_bin.tmp; rm -rf "$tmp"; mkdir -p "$tmp"
  (cd "$REPO_ROOT/tools/kubernetes" && go build -trimpath -ldflags "$(k8s_ldflags)" -o "$tmp/" \
    k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy)
  rm -rf "$node_bin"; mv "$tmp" "$node_bin"
}

build_etcd() {
  [ -x "$etcd_bin/etcd" ] && return
  log "building etcd $ETCD_VERSION"
  local tmp=$etcd_bin.tmp; rm -rf "$tmp"; mkdir -p "$tmp"
  (cd "$REPO_ROOT/tools/etcd" && go build -trimpath -ldflags "-s -w" -o "$tmp/etcd" go.etcd.io/etcd/server/v3)
  rm -rf "$etcd_bin"; mv "$tmp" "$etcd_bin"
}

# kwok and helm have no replace directives: a plain versioned install is reproducible.
go_install() { # dir binary package@version [extra ldflags]
  [ -x "$1/$2" ] && return
  log "building $3"
  local tmp=$1.tmp; rm -rf "$tmp"; mkdir -p "$tmp"
  (cd "$tmp" && GOBIN="$tmp" go install -trimpath -ldflags "-s -w ${4:-}" "$3")
  rm -rf "$1"; mv "$tmp" "$1"
}

build_etcd
go_install "$kwok_bin" kwok "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
go_install "$helm_bin" helm "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" \
  "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
build_kubernetes
build_node

# One directory with every tool, for PATH.
bin=$TOOLS_BIN_DIR
mkdir -p "$bin"
for f in "$k8s_bin"/* "$node_bin"/* "$etcd_bin/etcd" "$kwok_bin/kwok" "$helm_bin/helm"; do ln -sf "$f" "$bin/"; done
echo "$bin"
