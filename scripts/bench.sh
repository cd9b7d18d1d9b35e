#!/usr/bin/env bash
# Benchmarks: nnmesh beside Hugging Face transformers on the bundled model.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$root"
NNMESH_SETUP_REFERENCE=1 scripts/setup.sh
cargo build --release -p nnmesh-node
target/release/nnmesh bench "$@"
