#!/usr/bin/env bash
# Set up (PyTorch + the bundled model), build, and run the whole test suite.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$root"
scripts/setup.sh
echo "[test] building (release)"
cargo build --release --workspace --all-targets
echo "[test] running tests"
# --no-fail-fast: run every test binary even when one fails, so one run
# reports every failure.
cargo test --release --workspace --no-fail-fast -- --test-threads=1
