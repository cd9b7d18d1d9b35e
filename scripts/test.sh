#!/usr/bin/env bash
# Set up (PyTorch, the bundled model, the Python package and the reference
# implementations its tests compare against), check formatting, lints and
# docs, build, and run the whole test suite (what CI runs).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$root"
NNMESH_SETUP_REFERENCE=1 scripts/setup.sh
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
# reports every failure; the Python tests run whatever the Rust ones gave.
status=0
cargo test --release --workspace --no-fail-fast -- --test-threads=1 || status=$?
echo "[test] Python client (pytest: client/python/tests)"
started=$SECONDS
python -m pytest client/python/tests -q || status=$?
echo "[test] Python tests took $((SECONDS - started)) s"
exit "$status"
