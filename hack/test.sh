#!/usr/bin/env bash
# Runs every test: formatting and lints, unit tests, integration tests against a real MLflow
# server, end-to-end tests against a real Kubernetes control plane. Builds or reuses what it needs.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

command -v cargo >/dev/null 2>&1 || die "cargo is required (https://rustup.rs)"
t0=$SECONDS

# CI builds from a fresh clone: cargo's outputs live in the cache, as a CI's cargo cache would,
# keyed by the toolchain, so a warm run compiles only this workspace's crates (cargo hashes their
# paths relative to the workspace: each clone reuses the last one's outputs instead of adding
# more). Past 30 GiB the cache starts over. A developer's own `target/` is left alone.
if [ -n "${CI:-}" ] && [ -z "${CARGO_TARGET_DIR:-}" ]; then
  export CARGO_TARGET_DIR=$CACHE_DIR/cargo-target-$(rustc -V | awk '{print $2}')
  mkdir -p "$CARGO_TARGET_DIR"
  if [ "$(du -s --block-size=1G "$CARGO_TARGET_DIR" | cut -f1)" -gt 30 ]; then
    log "the cargo cache $CARGO_TARGET_DIR is over 30 GiB: starting it over"
    rm -rf "$CARGO_TARGET_DIR"; mkdir -p "$CARGO_TARGET_DIR"
  fi
  log "cargo outputs in $CARGO_TARGET_DIR (CI)"
fi

log "checking formatting and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

log "benchmark program unit tests"
# Quiet when they pass; the whole report when one fails.
if ! bench_out=$(python3 -m unittest discover -s hack/bench_gateway -t . 2>&1); then
  printf '%s\n' "$bench_out"; die "the benchmark program's unit tests failed"
fi
printf '%s\n' "$bench_out" | tail -n 3

# The heavy, cached prerequisites (cold: ~25 min for the Kubernetes binaries, ~2 min for MLflow).
hack/build-tools.sh >/dev/null
hack/mlflow.sh install >/dev/null
hack/argocd-lua.sh >/dev/null

run=$(mktemp -d "${TMPDIR:-/tmp}/mlflow-gateway-operator-test.XXXXXX")
cleanup() {
  hack/cluster.sh down "$run/cluster" || true
  hack/mlflow.sh down "$run/mlflow" || true
  rm -rf "$run"
}
trap cleanup EXIT
# One cluster and one MLflow server for every test binary; tests that need their own MLflow
# (auth, stop/start) start private ones. The watchdogs (--owner-pid) end them if this script dies.
hack/cluster.sh up "$run/cluster" --owner-pid $$ >/dev/null
hack/mlflow.sh up "$run/mlflow" --owner-pid $$ >/dev/null
export MGO_CLUSTER_ENV=$run/cluster/env MGO_MLFLOW_ENV=$run/mlflow/env

log "running tests"
# The operator's unit tests, tools/dev's (the fake LLM), and the one integration binary
# (tests/integration/); arguments are test-name filters, e.g. `hack/test.sh gateway::`.
cargo test --locked --workspace --all-targets --no-fail-fast -- "$@"
log "all tests passed in $((SECONDS - t0))s"
