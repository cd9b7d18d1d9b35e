#!/usr/bin/env bash
# Set up, build, and run nnmesh on the bundled default model (SmolLM2-135M):
# the model runtime, then a three-node mesh on loopback that splits the
# model's 30 layers and runs the canonical experiments through it.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$root"
scripts/setup.sh
echo "[demo] building (release)"
cargo build --release -p nnmesh-node
nnmesh="$root/target/release/nnmesh"
logs=$(mktemp -d)
pids=()
stop_nodes() {
  if [ ${#pids[@]} -gt 0 ]; then
    echo
    echo "[demo] stopping the nodes (SIGTERM)"
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
    pids=()
  fi
  rm -rf "$logs"
}
trap stop_nodes EXIT

section() { printf '\n== %s ==\n' "$*"; }

section "nnmesh inspect (the module tree and its hook points)"
"$nnmesh" inspect | head -24
section "nnmesh generate"
"$nnmesh" generate --prompt "The Eiffel Tower is in the city of" --max-new-tokens 12

# start_node LOG ARGS...: start a node in the background, wait for its address.
start_node() {
  local log=$1; shift
  "$nnmesh" node "$@" >"$log" 2>"$log.err" &
  pids+=($!)
  for _ in $(seq 1 600); do
    if grep -q '^node ' "$log"; then return 0; fi
    if ! kill -0 "${pids[-1]}" 2>/dev/null; then cat "$log.err" >&2; return 1; fi
    sleep 0.1
  done
  echo "node did not start" >&2; return 1
}

section "a three-node mesh on loopback"
start_node "$logs/n0" --blocks 0..10
mesh=$(awk '/^listening /{print $2; exit}' "$logs/n0")
start_node "$logs/n1" --blocks 10..20 --bootstrap "$mesh"
start_node "$logs/n2" --blocks 20..30 --bootstrap "$mesh"
cat "$logs"/n0 "$logs"/n1 "$logs"/n2 | grep '^node '
echo
"$nnmesh" status --mesh "$mesh"

section "1. logit lens through the mesh"
"$nnmesh" lens --mesh "$mesh"
section "2. activation patching (IOI) through the mesh"
"$nnmesh" patch --mesh "$mesh"
section "3. steering during generation through the mesh"
"$nnmesh" steer --mesh "$mesh"
section "4. ablation through the mesh: layer 0's MLP, then head 3 of layer 0"
"$nnmesh" ablate --mesh "$mesh" --layer 0
"$nnmesh" ablate --mesh "$mesh" --layer 0 --head 3
section "5. attention pattern through the mesh"
"$nnmesh" attention --mesh "$mesh" --layer 5
