"""Graphs built in Python are the Rust builder's graphs: each canonical
experiment written in the idiom gives, byte for byte, the graph of
``graph::recipes`` (what ``nnmesh graph NAME`` prints and ``examples/*.json``
hold); ``tracer.graph`` saves as JSON that ``nnmesh trace --graph`` runs to
the same values."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

import nnmesh
from conftest import MODEL, NNMESH, ROOT

LENS = "The Eiffel Tower is in the city of"
CLEAN = "After John and Mary went to the store, Mary gave a bottle of milk to"
CORRUPT = "After John and Mary went to the store, John gave a bottle of milk to"
STEER = "Yesterday I went for a walk and saw"
TOWARD = "I love the ocean, the sea, waves and beaches."
AWAY = "I love the city, the streets, traffic and buildings."
JOHN, MARY = 2322, 5099


def lens(model):
    with model.trace(LENS) as tracer:
        for l in range(30):
            h = model.model.layers[l].output[:, -1]
            model.lm_head(model.model.norm(h)).save(f"lens.{l}")
        tracer.stop()
    return tracer.graph


def patch(model):
    def logit_diff():
        logits = model.lm_head(model.model.norm.output[:, -1])[0]
        return logits[JOHN] - logits[MARY]

    with model.trace() as tracer:
        with tracer.invoke(CLEAN):
            acts = [model.model.layers[l].output[:, -1, :] for l in range(30)]
            clean = logit_diff()
        with tracer.invoke(CORRUPT):
            corrupt = logit_diff()
        patched = []
        for l in range(30):
            with tracer.invoke(CORRUPT):
                model.model.layers[l].output[:, -1, :] = acts[l]
                patched.append(logit_diff())
        clean.save("clean")
        corrupt.save("corrupt")
        torch.stack(patched).save("patched")
        tracer.stop()
    return tracer.graph


def steer(model):
    with model.session() as session:
        with model.trace() as tracer:
            with tracer.invoke(TOWARD):
                a = model.model.layers[12].output[:, 1:, :].mean(1)
            with tracer.invoke(AWAY):
                b = model.model.layers[12].output[:, 1:, :].mean(1)
            direction = ((a - b) * 3.0).save()
        with model.generate(STEER, max_new_tokens=16) as tracer:
            for step in tracer.all():
                model.model.layers[12].output[:, -1, :] += direction
    return session.graph


def ablate(model):
    with model.trace(LENS) as tracer:
        model.model.layers[0].mlp.output = 0
        model.lm_head.output[:, -1].save("logits")
    return tracer.graph


def ablate_head(model):
    with model.trace(LENS) as tracer:
        model.model.layers[0].self_attn.z[:, :, 3, :] = 0
        model.lm_head.output[:, -1].save("logits")
    return tracer.graph


def attention(model):
    with model.trace(LENS) as tracer:
        pattern = model.model.layers[0].self_attn.pattern.save()
        pattern.sum(-1).save("row_sums")
        tracer.stop()
    return tracer.graph


BUILT = {"lens": lens, "patch": patch, "steer": steer, "ablate": ablate, "ablate-head": ablate_head, "attention": attention}


@pytest.mark.parametrize("name", list(BUILT))
def test_python_graph_is_the_recipe(local, name):
    graph = BUILT[name](local)
    recipe = nnmesh.example(name)
    assert graph.to_json() == recipe.to_json(), f"{name}: Python graph differs from recipes::example"
    with open(os.path.join(ROOT, "examples", f"{name}.json")) as f:
        assert graph.to_json() == f.read().strip()
    assert graph.hash == recipe.hash
    assert local.graph == graph


def test_graph_json_round_trips_and_runs_in_the_cli(local, tmp_path):
    with local.trace(LENS) as tracer:
        h = local.model.layers[20].output[:, -1]
        lens20 = local.lm_head(local.model.norm(h)).save()
        top = lens20.argmax(-1).save()
    graph = tracer.graph
    path = tmp_path / "lens20.json"
    graph.save(path)
    assert nnmesh.Graph.load(path) == graph
    names = [n["save"]["name"] for n in graph.nodes if "save" in n]
    assert names == ["lens20", "top"], "save names come from the assigned variables"
    out = tmp_path / "saves.safetensors"
    run = subprocess.run(
        [NNMESH, "trace", "--graph", str(path), "--model", MODEL, "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    from safetensors.torch import load_file

    saved = load_file(out)
    torch.testing.assert_close(saved["lens20"], lens20, rtol=0, atol=1e-6)
    assert torch.equal(saved["top"], top)
    # model.run takes any graph, e.g. the built-in ones.
    again = local.run(graph)
    assert torch.equal(again["top"], top)


def test_per_step_saves_run_by_name(local):
    with local.generate("Hello", max_new_tokens=3) as tracer:
        for step in tracer.all():
            local.lm_head.output[0, -1].argmax(-1).save("next")
    saved = local.run(tracer.graph)
    assert sorted(saved) == ["next.step0", "next.step1", "next.step2"]
