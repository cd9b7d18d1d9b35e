"""Each canonical experiment in nnmesh's idiom (``examples/python/``) gives
NNsight 0.8.1's numbers on the same weights, locally and through a 3-node
loopback mesh, within the runtime's numerics tolerance
(``runtime/tests/common/mod.rs``)."""

from __future__ import annotations

from typing import Dict, Tuple

import pytest
import torch

import ablate
import attention
import lens
import patch
import reference
import steer
from conftest import AGREEMENT

#: ``|ours - reference| <= atol + rtol * |reference|``: the bound the runtime's
#: tests measured for SmolLM2 logits across CPU kernel sets (AVX-512, AVX2,
#: SSE4.2) against transformers; used here for logits and attention
#: probabilities alike.
LOGITS = (2e-4, 1e-5)

#: The steering direction: 3 x the difference of two means of layer 12's
#: residual stream. The runtime's residual bound (1e-4 + 2e-6 |h|, measured
#: at layer 4) grows with depth; this is it for each of the two means,
#: times the coefficient.
DIRECTION = (2 * 3 * 1e-4, 3 * 2e-6)

_cache: Dict[str, object] = {}


def reference_of(name, nnsight_model, fn):
    if name not in _cache:
        _cache[name] = fn(nnsight_model)
    return _cache[name]


def check(exp: str, what: str, where: str, ours, ref, tol: Tuple[float, float], bound=None) -> None:
    """Asserts the bound element-wise and records the agreement."""
    ours = torch.as_tensor(ours).detach().double()
    ref = torch.as_tensor(ref).detach().double()
    assert ours.shape == ref.shape, f"{exp} {what}: shape {tuple(ours.shape)} vs NNsight {tuple(ref.shape)}"
    diff = (ours - ref).abs()
    allowed = bound if bound is not None else tol[0] + tol[1] * ref.abs()
    used = diff / allowed
    big = ref.abs() >= 1e-3
    rel = float((diff[big] / ref.abs()[big]).max()) if big.any() else 0.0
    worst = int(used.argmax())
    AGREEMENT[(exp, what, where)] = (float(diff.max()), rel, float(used.max()))
    assert float(used.max()) <= 1.0, (
        f"{exp} {what} ({where}): element {worst} is {float(ours.flatten()[worst])}, NNsight "
        f"{float(ref.flatten()[worst])}, allowed difference {float(allowed.flatten()[worst]):.2e}"
    )


def where_of(model) -> str:
    return "mesh" if model.remote else "local"


def test_logit_lens(model, nnsight_model):
    ours = lens.logit_lens(model)
    ref = reference_of("lens", nnsight_model, lambda hf: reference.lens(hf, lens.PROMPT))
    check("lens", "logits [30, vocab]", where_of(model), ours, ref, LOGITS)
    assert model.tokenizer.decode(ours[-1].argmax()) == " Paris"


def test_activation_patching(model, nnsight_model):
    (john,), (mary,) = model.tokenizer.encode(" John"), model.tokenizer.encode(" Mary")
    clean, corrupt, patched = patch.patching(model)
    ref_clean, ref_corrupt, ref_patched = reference_of(
        "patch", nnsight_model, lambda hf: reference.patching(hf, patch.CLEAN, patch.CORRUPT, john, mary)
    )
    # A difference of two logits, each within the logits' bound.
    atol, rtol = LOGITS

    def diff_and_bound(pairs):
        pairs = pairs.double()
        return pairs[..., 0] - pairs[..., 1], 2 * atol + rtol * pairs.abs().sum(-1)

    for what, ours, ref in [("clean", clean, ref_clean), ("corrupted", corrupt, ref_corrupt), ("patched [30]", patched, ref_patched)]:
        d, bound = diff_and_bound(ref)
        check("patch", f"logit diff {what}", where_of(model), ours, d, LOGITS, bound)
    assert clean > 0 > corrupt and patched[-1] > 0


def test_steering_during_generation(model, nnsight_model):
    ours = steer.steering(model)
    ref = reference_of(
        "steer",
        nnsight_model,
        lambda hf: reference.steering(hf, steer.PROMPT, steer.TOWARD, steer.AWAY, 12, 3.0, 16),
    )
    direction, logits, steered, plain = ours
    r_direction, r_logits, r_steered, r_plain = ref
    where = where_of(model)
    check("steer", "direction [1, 576]", where, direction, r_direction, DIRECTION)
    check("steer", "step logits [16, vocab]", where, logits, r_logits, LOGITS)
    assert steered.tolist() == r_steered.tolist(), "steered tokens differ from NNsight's"
    assert plain.tolist() == r_plain.tolist(), "plain tokens differ from NNsight's"
    assert steered.tolist() != plain.tolist(), "steering changed nothing"


def test_ablation(model, nnsight_model):
    ours = ablate.ablation(model)
    ref = reference_of("ablate", nnsight_model, lambda hf: reference.ablation(hf, ablate.PROMPT, 0, 3))
    for what, o, r in zip(["plain logits", "MLP 0 zeroed logits", "head 0.3 zeroed logits"], ours, ref):
        check("ablate", what, where_of(model), o, r, LOGITS)
    assert not torch.equal(ours[0], ours[2]), "zeroing the head changed nothing"


def test_attention_pattern(model, nnsight_model):
    ours = attention.attention(model)
    ref = reference_of("attention", nnsight_model, lambda hf: reference.attention(hf, attention.PROMPT, 0))
    check("attention", "pattern [1, 9, 9, 9]", where_of(model), ours, ref, LOGITS)
    assert torch.allclose(ours.sum(-1), torch.ones(()), atol=1e-5)
