"""Unsupported Python inside a trace fails while the block is built, naming
the file, the line and the operation; graphs that do not validate fail
before anything runs, with the line that built the offending node."""

from __future__ import annotations

import pytest
import torch

from nnmesh import GraphError, UnsupportedError

P = "The Eiffel Tower is in the city of"
HERE = __file__


def line_of(marker: str) -> int:
    """The line of this file that ends with ``# <marker>``."""
    with open(HERE) as f:
        hits = [i for i, line in enumerate(f, 1) if line.rstrip().endswith(f"# {marker}")]
    assert len(hits) == 1, marker
    return hits[0]


def assert_at(err, marker: str, *words: str) -> None:
    assert err.filename == HERE and err.lineno == line_of(marker), (err.filename, err.lineno, str(err))
    text = str(err)
    assert text.startswith(f"{HERE}:{line_of(marker)}: "), text
    for w in words:
        assert w in text, f"{w!r} not in {text!r}"


def test_data_dependent_control_flow(local):
    with pytest.raises(UnsupportedError) as e:
        with local.trace(P):
            h = local.model.layers[0].output
            if h.sum() > 0:  # if-on-value
                pass
    assert_at(e.value, "if-on-value", "bool(value)", "no Python control flow")


def test_item_and_numpy(local):
    with pytest.raises(UnsupportedError) as e:
        with local.trace(P):
            local.lm_head.output[0, -1].argmax().item()  # item
    assert_at(e.value, "item", "Tensor.item", "after the block")
    with pytest.raises(UnsupportedError) as e:
        with local.trace(P):
            local.lm_head.output.numpy()  # numpy
    assert_at(e.value, "numpy", "Tensor.numpy")


def test_torch_function_outside_the_op_list(local):
    with pytest.raises(UnsupportedError) as e:
        with local.trace(P):
            h = local.model.layers[3].output
            torch.nn.functional.layer_norm(h, (576,))  # layer-norm
    assert_at(e.value, "layer-norm", "torch.nn.functional.layer_norm", "op list")
    with pytest.raises(UnsupportedError) as e:
        with local.trace(P):
            local.model.layers[3].output.cumsum(-1)  # cumsum
    assert_at(e.value, "cumsum", "Tensor.cumsum")


def test_writes_only_to_hooks(local):
    with pytest.raises(UnsupportedError) as e:
        with local.trace(P):
            x = local.model.layers[3].output * 2
            x[:, -1] = 0  # computed-write
    assert_at(e.value, "computed-write", "assignment into a computed value", "hook")
    with pytest.raises(UnsupportedError) as e:
        with local.trace(P):
            h = local.model.layers[3].output
            h[h > 0] = 0  # mask-write
    assert_at(e.value, "mask-write", "assigning through a list, tensor or mask index")


def test_unknown_modules_and_points(local):
    with pytest.raises(AttributeError) as e:
        with local.trace(P):
            local.model.layers[3].attn  # no-attn
    assert_at(e.value, "no-attn", "has no 'attn'", "self_attn")
    with pytest.raises(AttributeError) as e:
        with local.trace(P):
            local.model.layers[3].mlp.pattern  # no-pattern
    assert_at(e.value, "no-pattern", "no hook point 'pattern'")
    with pytest.raises(IndexError):
        local.model.layers[30]


def test_shape_error_names_the_line(local):
    with pytest.raises(GraphError) as e:
        with local.trace(P):
            h = local.model.layers[3].output
            bad = h + torch.zeros(7)  # broadcast
            bad.save()
    assert_at(e.value, "broadcast", "add", "cannot broadcast [1,9,576] with [7]")
    # .shape validates what is built so far: the error comes at once.
    with pytest.raises(GraphError) as e:
        with local.trace(P):
            logits = local.lm_head(local.lm_head.output)  # apply-shape
            logits.shape
    assert_at(e.value, "apply-shape", "cannot apply lm_head")


def test_out_of_order_write_names_both_hooks(local):
    with pytest.raises(GraphError) as e:
        with local.trace(P):
            local.model.layers[3].output[:] = local.model.layers[5].output  # out-of-order
    assert_at(e.value, "out-of-order", "model.layers.3.output", "model.layers.5.output", "later in the forward")


def test_unsaved_values_are_not_returned(local):
    with local.trace(P):
        h = local.model.layers[3].output
        kept = local.model.layers[4].output.save()
    assert isinstance(kept, torch.Tensor)
    with pytest.raises(UnsupportedError) as e:
        h.sum()  # unsaved
    assert_at(e.value, "unsaved", "was not saved", ".save()")


def test_hooks_belong_in_a_trace(local):
    with pytest.raises(UnsupportedError) as e:
        local.model.layers[0].output  # outside
    assert_at(e.value, "outside", "outside a trace")
    with pytest.raises(UnsupportedError) as e:
        with local.trace() as tracer:
            with tracer.invoke(P):
                pass
            local.lm_head.output  # outside-invoke
    assert_at(e.value, "outside-invoke", "outside `with tracer.invoke(...)`")


def test_generation_loops_do_the_same_at_every_step(local):
    with pytest.raises(UnsupportedError) as e:
        with local.generate(P, max_new_tokens=4) as tracer:
            for step in tracer.all():
                h = local.model.layers[3].output
                if step == 2:
                    h = h * 2  # differs
                h.save()
    assert_at(e.value, "differs", "does something else at step 2", "tracer.iter[[")
    with pytest.raises(UnsupportedError) as e:
        with local.generate(P, max_new_tokens=4) as tracer:
            for step in tracer.all():  # broken
                local.model.layers[3].output.save()
                break
    assert_at(e.value, "broken", "ended early")
    with pytest.raises(UnsupportedError) as e:
        with local.generate(P, max_new_tokens=4) as tracer:
            for step in tracer.iter[2:9]:  # past-end
                pass
    assert_at(e.value, "past-end", "not within this trace's 4 steps")


def test_per_step_values_stay_in_their_loop(local):
    with pytest.raises(UnsupportedError) as e:
        with local.generate(P, max_new_tokens=3) as tracer:
            hs = []
            for step in tracer.all():
                hs.append(local.model.layers[3].output)
            torch.stack(hs)  # after-loop
    assert_at(e.value, "after-loop", "only be saved outside the loop")


def test_arguments_that_would_be_ignored_are_refused(local):
    with pytest.raises(UnsupportedError):
        local.trace(P, remote=True)
    with pytest.raises(TypeError):
        local.trace(P, temperature=0.5)
    with pytest.raises(TypeError):
        local.generate(P)
    with pytest.raises(UnsupportedError):
        local.generate(P, max_new_tokens=2, do_sample=True)
