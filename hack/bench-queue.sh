#!/usr/bin/env bash
# The trace queue's cost per push and its write throughput, optimised (issue #15): runs the
# ignored `push_cost` test of src/gateway/tracing/queue/ in a release build of that module alone.
# It needs only std, tokio, thiserror and tracing, so this builds in about 2 minutes instead of
# the whole crate with fat LTO. Versions come from the repo's Cargo.lock.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

dir="$REPO_ROOT/target/bench-queue"
mkdir -p "$dir/src"
cat >"$dir/Cargo.toml" <<TOML
[package]
name = "bench-queue"
version = "0.0.0"
edition = "2024"
publish = false

[dependencies]
tokio = { version = "1", features = ["macros", "rt-multi-thread", "sync", "time"] }
thiserror = "2"
tracing = "0.1"

[profile.release]
codegen-units = 1

# Not a member of the repo's workspace.
[workspace]
TOML
printf '#[path = "%s/src/gateway/tracing/queue/mod.rs"]\npub mod queue;\n' "$REPO_ROOT" >"$dir/src/lib.rs"
cp Cargo.lock "$dir/Cargo.lock"
cd "$dir"
log "building the trace queue alone (release) and running its push benchmark"
cargo test --release --lib -- --ignored push_cost --nocapture 2>&1 | grep -E '^(memory|disk):'
