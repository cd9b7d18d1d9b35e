#!/usr/bin/env bash
# Fuzz the decoders, the validator and live stages for SECONDS (default
# 600): structure-aware mutations of valid graphs and stage messages
# (postcard and JSON) and raw bytes. Prints the cases tried, the outcomes by
# kind, and the crashes (any panic, contained or not), which must be 0.
# NNMESH_FUZZ_SEED=N replays a run. `scripts/test.sh` runs 10,000 cases.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$root"
secs="${1:-600}"
case "$secs" in
  ''|*[!0-9]*) echo "usage: scripts/fuzz.sh [SECONDS]" >&2; exit 2 ;;
esac
scripts/setup.sh
cargo build --release -p nnmesh-tests --test fuzz
NNMESH_FUZZ_SECONDS="$secs" cargo test --release -p nnmesh-tests --test fuzz -- --exact fuzz --nocapture
