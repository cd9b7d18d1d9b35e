#!/usr/bin/env bash
# Set up (PyTorch + the bundled model), check formatting, lints and docs,
# build, and run the whole test suite (what CI runs).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$root"
scripts/setup.sh
echo "[test] formatting"
cargo fmt --all -- --check
echo "[test] building (release)"
cargo build --release --workspace --all-targets
echo "[test] lints"
cargo clippy --release --workspace --all-targets -- -D warnings
echo "[test] docs"
RUSTDOCFLAGS="-D warnings" cargo doc --release --workspace --no-deps
echo "[test] running tests"
# --no-fail-fast: run every test binary even when one fails, so one run
# reports every failure.
cargo test --release --workspace --no-fail-fast -- --test-threads=1
