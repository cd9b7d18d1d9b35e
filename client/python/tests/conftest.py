"""Fixtures of the Python client's tests.

- ``local``: the bundled SmolLM2 loaded in this process.
- ``mesh``: the same model served by a 3-node loopback mesh (``nnmesh node
  --blocks 0..10 / 10..20 / 20..30`` processes started here, as
  ``tests/src/local_node.rs`` does), reached with ``LanguageModel(mesh=...)``.
- ``nnsight_model``: NNsight 0.8's ``LanguageModel`` on the same weights: the
  GGUF dequantized to f32 by transformers and saved once as a plain
  checkpoint under ``target/reference/`` (eager attention, so attention
  weights exist).

The equivalence tests record their measured agreement; the summary at the
end of the run prints it (and writes ``target/reference/agreement.txt``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
MODEL = os.environ.get("NNMESH_MODEL", os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
NNMESH = os.environ.get("NNMESH_BIN", os.path.join(ROOT, "target", "release", "nnmesh"))
REFERENCE = os.path.join(ROOT, "target", "reference")
sys.path.insert(0, os.path.join(ROOT, "examples", "python"))

#: (experiment, quantity, where) -> (max abs diff, max rel diff, fraction of the bound used)
AGREEMENT: Dict[Tuple[str, str, str], Tuple[float, float, float]] = {}


class Node:
    """An ``nnmesh node`` process on loopback; ``addr`` ends in /p2p/<id>."""

    def __init__(self, blocks: str, bootstrap: Optional[str] = None) -> None:
        cmd = [NNMESH, "node", "--blocks", blocks, "--listen", "/ip4/127.0.0.1/tcp/0", "--model", MODEL]
        if bootstrap:
            cmd += ["--bootstrap", bootstrap]
        logs = None if os.environ.get("NNMESH_TEST_NODE_LOGS") else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=logs, text=True)
        self.addr: Optional[str] = None
        lines: List[str] = []
        done = threading.Event()

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                lines.append(line.strip())
                if line.startswith("listening "):
                    self.addr = line.split(" ", 1)[1].strip()
                if line.startswith("node "):
                    done.set()
            done.set()

        threading.Thread(target=read, daemon=True).start()
        if not done.wait(120) or self.addr is None:
            self.stop()
            raise RuntimeError(f"node {blocks} did not start: {lines}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def local():
    from nnmesh import LanguageModel

    return LanguageModel(MODEL)


@pytest.fixture(scope="session")
def mesh_addr():
    if not os.path.exists(NNMESH):
        pytest.fail(f"{NNMESH} is missing: build the workspace first (cargo build --release --workspace)")
    first = Node("0..10")
    nodes = [first]
    try:
        nodes.append(Node("10..20", first.addr))
        nodes.append(Node("20..30", first.addr))
        yield first.addr
    finally:
        for n in nodes:
            n.stop()


@pytest.fixture(scope="session")
def mesh(mesh_addr):
    from nnmesh import LanguageModel

    return LanguageModel(mesh=mesh_addr)


@pytest.fixture(params=["local", "mesh"])
def model(request):
    """Each test that takes ``model`` runs locally and on the mesh."""
    return request.getfixturevalue(request.param)


def reference_checkpoint() -> str:
    """The bundled GGUF as a plain f32 transformers checkpoint (made once)."""
    out = os.path.join(REFERENCE, "smollm2-135m-f32")
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = os.path.split(MODEL)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    hf = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    # transformers will not save a model it loaded from GGUF ("quantized");
    # after its dequantization the weights are plain f32, so save them so.
    hf.hf_quantizer = None
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    part = out + f".part{os.getpid()}"
    hf.save_pretrained(part)
    tok.save_pretrained(part)
    os.replace(part, out)
    return out


@pytest.fixture(scope="session")
def nnsight_model():
    if os.environ.get("NNMESH_SKIP_REFERENCE") == "1":
        pytest.skip("NNMESH_SKIP_REFERENCE=1: no NNsight comparison")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings

    import torch

    try:
        import nnsight  # noqa: F401
    except ImportError:
        pytest.fail("nnsight is not installed: run NNMESH_SETUP_REFERENCE=1 scripts/setup.sh")
    warnings.filterwarnings("ignore", module="nnsight")
    from nnsight import LanguageModel

    torch.set_grad_enabled(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LanguageModel(reference_checkpoint(), dtype=torch.float32, attn_implementation="eager", dispatch=True)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not AGREEMENT:
        return
    lines = ["agreement with NNsight 0.8.1 (transformers, same weights):"]
    lines.append(f"{'experiment':<12} {'value':<22} {'where':<6} {'max abs':>10} {'max rel':>10} {'of bound':>9}")
    for (exp, what, where_), (a, r, used) in sorted(AGREEMENT.items()):
        lines.append(f"{exp:<12} {what:<22} {where_:<6} {a:>10.2e} {r:>10.2e} {used:>8.0%}")
    text = "\n".join(lines)
    terminalreporter.write_line(text)
    os.makedirs(REFERENCE, exist_ok=True)
    with open(os.path.join(REFERENCE, "agreement.txt"), "w") as f:
        f.write(text + "\n")
