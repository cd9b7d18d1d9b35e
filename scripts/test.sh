#!/usr/bin/env bash
# Set up (PyTorch + the bundled model), build, and run the whole test suite.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$root"
scripts/setup.sh
echo "[test] building (release)"
cargo build --release --workspace --all-targets
echo "[test] running tests"
cargo test --release --workspace -- --test-threads=1
