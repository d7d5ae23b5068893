#!/usr/bin/env bash
# Builds tools/argocd-lua (Argo CD's Lua runtime, gopher-lua, to test docs/argocd/health.lua) into
# $CACHE_DIR/argocd-lua-<hash of its sources>/, once. Prints the binary's path.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

command -v go >/dev/null 2>&1 || die "Go is not installed (needed to build tools/argocd-lua)"
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod
src=$REPO_ROOT/tools/argocd-lua
hash=$(cat "$src/go.mod" "$src/go.sum" "$src/main.go" | sha256sum | cut -c1-16)
out=$CACHE_DIR/argocd-lua-$hash
mkdir -p "$CACHE_DIR"
exec 9>"$CACHE_DIR/argocd-lua.lock"
flock 9
if [ ! -x "$out/argocd-lua" ]; then
  log "building tools/argocd-lua"
  rm -rf "$out.tmp"; mkdir -p "$out.tmp"
  (cd "$src" && go build -trimpath -ldflags "-s -w" -o "$out.tmp/argocd-lua" .)
  rm -rf "$out"; mv "$out.tmp" "$out"
fi
echo "$out/argocd-lua"
