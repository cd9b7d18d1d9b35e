# Sourced by the other scripts: the build and run environment.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export LIBTORCH_USE_PYTORCH=1
export PATH="$root/.venv/bin:$PATH"
export NNMESH_MODEL="${NNMESH_MODEL:-$root/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
# The Python extension (client/python): pyo3 configured the way maturin
# configures it (abi3, an extension module, this venv's interpreter), so
# `cargo build` and setup.sh's `maturin develop` share one build of it
# instead of rebuilding each other's.
export VIRTUAL_ENV="$root/.venv"
export PYO3_PYTHON="$root/.venv/bin/python"
export PYO3_CONFIG_FILE="$root/client/python/pyo3-config.txt"
export PYO3_BUILD_EXTENSION_MODULE=1
