#!/usr/bin/env bash
# Set up, build, and run nnmesh on the bundled default model (SmolLM2-135M).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$root"
scripts/setup.sh
echo "[demo] building (release)"
cargo build --release -p nnmesh-node
nnmesh=target/release/nnmesh
echo
echo "== nnmesh inspect =="
"$nnmesh" inspect
echo
echo "== nnmesh generate =="
"$nnmesh" generate --prompt "The Eiffel Tower is in the city of" --max-new-tokens 16
echo
echo "== nnmesh forward --top 5 =="
"$nnmesh" forward --prompt "The Eiffel Tower is in the city of" --top 5
