#!/usr/bin/env bash
# Chaos for MINUTES (default 10) with CLIENTS concurrent clients (default
# 4): six auto-placed nodes on this machine, each client running a
# different generating experiment in a loop, and a random node SIGKILLed
# every ~6 s and replaced by a new one. Prints requests completed, failed
# and retried, fail-overs, and step times with and without a fail-over.
# Every request must complete with the single-node result.
# `scripts/test.sh` runs it for one minute.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$root"
minutes="${1:-10}"
clients="${2:-4}"
case "$minutes$clients" in
  ''|*[!0-9]*) echo "usage: scripts/chaos.sh [MINUTES] [CLIENTS]" >&2; exit 2 ;;
esac
scripts/setup.sh
cargo build --release -p nnmesh-node -p nnmesh-tests --bins --tests
NNMESH_CHAOS_SECS=$((minutes * 60)) NNMESH_CHAOS_CLIENTS="$clients" \
  cargo test --release -p nnmesh-tests --test chaos -- --nocapture
