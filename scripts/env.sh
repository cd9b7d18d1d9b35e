# Sourced by the other scripts: the build and run environment.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export LIBTORCH_USE_PYTORCH=1
export PATH="$root/.venv/bin:$PATH"
export NNMESH_MODEL="${NNMESH_MODEL:-$root/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
