"""The native module's promises: runs release the interpreter while they
wait, a mesh client needs no weights, and mesh options fail clearly."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from nnmesh import LanguageModel, MeshError

P = "The Eiffel Tower is in the city of"


def test_runs_release_the_interpreter(local):
    """Another Python thread keeps running while a graph runs: the native
    run waits with the interpreter released. Were it held, the other thread
    could run only before the call and after it (a tick or two)."""
    with local.generate(P, max_new_tokens=8) as tracer:
        tracer.result.save()
    graph = local.graph.to_json()
    inside = threading.Event()
    done = threading.Event()

    def run() -> None:
        inside.set()
        try:
            local._backend.run(graph)
        finally:
            done.set()

    worker = threading.Thread(target=run)
    worker.start()
    inside.wait()
    ticks = 0
    while not done.is_set():
        ticks += 1
        time.sleep(0.001)
    worker.join()
    assert ticks >= 20, f"the other thread ran only {ticks} times during the run"


def test_a_mesh_client_needs_no_model_file(mesh_addr, tmp_path):
    """From a folder without models/ and with NNMESH_MODEL pointing nowhere,
    a mesh model still tokenizes, traces and decodes."""
    code = f"""
from nnmesh import LanguageModel
model = LanguageModel(mesh={mesh_addr!r})
with model.trace({P!r}):
    top = model.lm_head.output[0, -1].argmax().save()
print(model.tokenizer.decode(top))
"""
    env = dict(os.environ, NNMESH_MODEL=str(tmp_path / "no-such-model.gguf"))
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "Paris"


def test_mesh_options_fail_clearly(mesh_addr, mesh):
    with pytest.raises(MeshError, match="bad model id"):
        LanguageModel(mesh=mesh_addr, model_id="not-hex")
    with pytest.raises(MeshError, match="pre-shared key"):
        LanguageModel(mesh=mesh_addr, psk="/no/such/psk")
    with pytest.raises(TypeError, match="LanguageModel\\(mesh=...\\)"):
        LanguageModel("models/x.gguf", verify=True)
    assert mesh.failovers == 0 and mesh.mesh_model is not None
