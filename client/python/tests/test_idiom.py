"""The NNsight idiom's behaviour: shapes inside the block, saved values as
torch tensors, writes, invokes, generation loops, sessions, hook points."""

from __future__ import annotations

import torch

import nnmesh
from nnmesh import Graph

P = "The Eiffel Tower is in the city of"
HELLO = "Hello"


def test_shapes_come_from_shape_inference(local):
    with local.trace(P) as tracer:
        attn = local.model.layers[3].self_attn
        h = local.model.layers[3].output
        shapes = {
            "h": h.shape,
            "last": h[:, -1, :].shape,
            "q": attn.q.shape,
            "k": attn.k.shape,
            "v": attn.v.shape,
            "pattern": attn.pattern.shape,
            "z": attn.z.shape,
            "ids": local.model.embed_tokens.input.shape,
            "logits": local.lm_head.output.shape,
        }
        dtypes = (h.dtype, local.model.embed_tokens.input.dtype, h.argmax(-1).dtype, (h > 0).dtype)
        assert h.ndim == 3 and h.size(-1) == 576 and len(h) == 1
        tracer.stop()
    assert shapes == {
        "h": (1, 9, 576),
        "last": (1, 576),
        "q": (1, 9, 9, 64),
        "k": (1, 3, 9, 64),
        "v": (1, 3, 9, 64),
        "pattern": (1, 9, 9, 9),
        "z": (1, 9, 9, 64),
        "ids": (1, 9),
        "logits": (1, 9, 49152),
    }
    assert dtypes == (torch.float32, torch.int64, torch.int64, torch.bool)


def test_saved_values_become_tensors_everywhere(local):
    saved_list = []
    saved_dict = {}
    with local.trace(P):
        h = local.model.layers[5].output[:, -1, :].save()
        saved_list.append(local.model.layers[6].output.sum().save())
        saved_dict["top"] = local.lm_head.output[0, -1].topk(3).indices.save()
        pair = (h, local.model.norm.output.save())
        values, indices = local.lm_head.output[0, -1].max(-1)
        nnmesh.save([values, indices])
    assert type(h) is torch.Tensor and h.shape == (1, 576)
    assert type(saved_list[0]) is torch.Tensor and saved_list[0].shape == ()
    assert saved_dict["top"].dtype == torch.int64 and saved_dict["top"].shape == (3,)
    assert type(pair) is tuple and all(type(x) is torch.Tensor for x in pair)
    assert int(indices) == int(saved_dict["top"][0])
    assert local.tokenizer.decode(indices) == " Paris"


def test_add_assign_is_an_add_write(local):
    v = torch.randn(576, generator=torch.Generator().manual_seed(0))
    with local.trace(P) as tracer:
        local.model.layers[10].output[:, -1, :] += v
        added = local.lm_head.output[0, -1].save()
    writes = [n["write"] for n in tracer.graph.nodes if "write" in n]
    assert [(w["mode"], w["index"]) for w in writes] == [("add", ["full", {"at": -1}, "full"])]
    with local.trace(P):
        h = local.model.layers[10].output[:, -1, :]
        local.model.layers[10].output[:, -1, :] = h + v
        replaced = local.lm_head.output[0, -1].save()
    with local.trace(P):
        plain = local.lm_head.output[0, -1].save()
    torch.testing.assert_close(added, replaced, rtol=0, atol=1e-5)
    assert not torch.allclose(added, plain)
    # A zero vector changes nothing.
    with local.trace(P):
        local.model.layers[10].output[:, -1, :] += torch.zeros(576)
        zero = local.lm_head.output[0, -1].save()
    assert torch.equal(zero, plain)


def test_whole_output_writes_and_in_place_ops(local):
    with local.trace(P) as tracer:
        local.model.layers[0].mlp.output *= 0
        scaled = local.lm_head.output[0, -1].save()
    with local.trace(P):
        local.model.layers[0].mlp.output[:] = 0
        zeroed = local.lm_head.output[0, -1].save()
    assert torch.equal(scaled, zeroed)
    writes = [n["write"] for n in tracer.graph.nodes if "write" in n]
    assert writes[0]["index"] is None and writes[0]["mode"] == "set"


def test_reads_see_writes_in_program_order(local):
    with local.trace(P):
        before = local.model.layers[2].output.save()
        local.model.layers[2].output[:] = 1.5
        after = local.model.layers[2].output.save()
    assert torch.all(after == 1.5)
    assert not torch.all(before == 1.5), "a value read before a write keeps what it read"


def test_invokes_see_their_own_tokens(local):
    short, long = "Hi", P
    with local.trace() as tracer:
        with tracer.invoke(short):
            a = local.model.layers[1].output.save()
        with tracer.invoke(long):
            b = local.model.layers[1].output.save()
        with tracer.invoke():  # the whole, left-padded batch
            both = local.model.layers[1].output.save()
    n_short = len(local.tokenizer.encode(short))
    assert a.shape == (1, n_short, 576) and b.shape == (1, 9, 576) and both.shape == (2, 9, 576)
    torch.testing.assert_close(both[0, -n_short:], a[0], rtol=1e-5, atol=1e-4)
    with local.trace([short, long]):
        batch = local.model.layers[1].output.save()
    assert batch.shape == (2, 9, 576)


def test_values_cross_invokes_without_barriers(local):
    with local.trace() as tracer:
        barrier = tracer.barrier(2)  # accepted, not needed
        with tracer.invoke("The Colosseum is in the city of"):
            rome = local.model.layers[25].output[:, -1, :]
            barrier()
        with tracer.invoke(P):
            barrier()
            local.model.layers[25].output[:, -1, :] = rome
            patched = local.lm_head.output[0, -1].argmax().save()
    assert local.tokenizer.decode(patched) == " Rome"


def test_generation_loops(local):
    with local.generate(HELLO, max_new_tokens=5) as tracer:
        tokens = []
        for step in tracer.iter[:]:
            tokens.append(local.lm_head.output[0, -1].argmax(-1).save())
        middle = []
        for step in tracer.iter[1:3]:
            middle.append(local.model.layers[3].output[:, -1].save())
        picked = []
        for step in tracer.iter[[0, 4]]:
            picked.append(local.model.layers[3].output.shape)
        first = local.model.layers[3].output.save()  # outside a loop: step 0
        out = tracer.result.save()
    prompt = local.tokenizer.encode(HELLO)
    assert out.tolist() == [prompt + [int(t) for t in tokens]]
    assert [m.shape for m in middle] == [(1, 576), (1, 576)]
    assert picked == [(1, len(prompt), 576), (1, 1, 576)]
    assert first.shape == (1, len(prompt), 576)
    steps = [n["read"]["hook"]["steps"] for n in tracer.graph.nodes if "read" in n]
    assert {"range": {"start": 1, "end": 3}} in steps and "all" in steps


def test_sessions_carry_values_between_traces(local):
    with local.session() as session:
        with local.trace("The Colosseum is in the city of"):
            rome = local.model.layers[25].output[:, -1, :]  # not saved: it stays in the graph
        with local.trace(P):
            local.model.layers[25].output[:, -1, :] = rome
            top = local.lm_head.output[0, -1].argmax().save()
    assert local.tokenizer.decode(top) == " Rome"
    assert len(session.graph.traces) == 2 and local.graph == session.graph


def test_stop_ends_the_block(local):
    reached = []
    with local.trace(P) as tracer:
        h = local.model.layers[0].output.save()
        tracer.stop()
        reached.append(True)
    assert reached == [] and h.shape == (1, 9, 576)
    assert tracer.graph.nodes[-1] == {"stop": {"trace": 0}}


def test_attention_output_is_a_tuple_as_in_transformers(local):
    with local.trace(P):
        out, weights = local.model.layers[0].self_attn.output
        out = out.save()
        weights = weights.save()
        pattern = local.model.layers[0].self_attn.pattern.save()
        o_proj = local.model.layers[0].self_attn.o_proj.output.save()
    assert torch.equal(weights, pattern) and torch.equal(out, o_proj)
    with local.trace(P):
        local.model.layers[0].self_attn.output[0][:] = 0
        local.model.layers[0].self_attn.z[:, :, 2, :] = 0
        zeroed = local.model.layers[0].self_attn.output[0].save()
    assert torch.all(zeroed == 0)


def test_logit_lens_applies_modules_to_values(local):
    with local.trace(P):
        h = local.model.layers[-1].output
        via_apply = local.lm_head(local.model.norm(h)).save()
        direct = local.lm_head.output.save()
        logits = local.output.logits[0, -1].save()
    torch.testing.assert_close(via_apply, direct, rtol=1e-5, atol=1e-4)
    assert torch.equal(logits, direct[0, -1])


def test_graph_objects(local, tmp_path):
    with local.trace(P) as tracer:
        local.lm_head.output[0, -1].save("logits")
        inside = tracer.graph
    graph = tracer.graph
    assert inside.nodes[:2] == graph.nodes[:2]
    assert Graph.from_json(graph.to_json()) == graph and len(graph.hash) == 64
    assert "1 traces" in repr(graph)


def test_mesh_needs_no_weights_here(mesh, local):
    assert mesh.remote and not local.remote
    assert mesh.manifest == local.manifest
    assert mesh.tokenizer.encode(P) == local.tokenizer.encode(P)
    with mesh.trace(P):
        top = mesh.lm_head.output[0, -1].argmax().save()
    assert mesh.tokenizer.decode(top) == " Paris"
    assert [(start, end) for _, start, end in mesh.route] == [(0, 10), (10, 20), (20, 30)]
