"""The canonical experiments written with NNsight 0.8.1 on transformers,
the way its documentation writes them: the reference the nnmesh idiom
(``examples/python/*.py``) is compared against.

Two adaptations, each to get the same numbers, not a different idiom:
- activation patching runs one trace per patched layer (NNsight 0.8 needs
  ``tracer.barrier`` to pass values between the invokes of one trace, and
  with one barrier per layer the order of 31 workers is easy to get wrong;
  separate traces are the plain form of the same experiment);
- the steering direction's two texts run in separate traces: in one
  batched trace NNsight's invokes include the left padding of the shorter
  prompt, while nnmesh's invokes see each prompt's own tokens.
"""

from __future__ import annotations

from typing import Tuple

import torch


def lens(hf, prompt: str) -> torch.Tensor:
    out = []  # NNsight 0.8 returns only saved values and objects from outside the block
    with hf.trace(prompt):
        for layer in hf.model.layers:
            out.append(hf.lm_head(hf.model.norm(layer.output[:, -1, :])).save())
    return torch.cat(out)


def patching(hf, clean: str, corrupt: str, john: int, mary: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (John, Mary) logits at the last position: clean ``[2]``,
    corrupted ``[2]``, patched at each layer ``[layers, 2]``."""
    layers = hf.model.layers
    acts = []
    with hf.trace(clean):
        for layer in layers:
            acts.append(layer.output[:, -1, :].save())
        logits = hf.lm_head.output[0, -1]
        clean_pair = torch.stack([logits[john], logits[mary]]).save()
    with hf.trace(corrupt):
        logits = hf.lm_head.output[0, -1]
        corrupt_pair = torch.stack([logits[john], logits[mary]]).save()
    patched = []
    for layer, act in zip(layers, acts):
        with hf.trace(corrupt):
            layer.output[:, -1, :] = act
            logits = hf.lm_head.output[0, -1]
            pair = torch.stack([logits[john], logits[mary]]).save()
        patched.append(pair)
    return clean_pair, corrupt_pair, torch.stack(patched)


def steering(hf, prompt: str, toward: str, away: str, layer: int, coef: float, new_tokens: int):
    """The direction, the steered logits at each step, the steered and the
    plain token ids."""
    block = hf.model.layers[layer]
    with hf.trace(toward):
        a = block.output[:, 1:, :].mean(1).save()
    with hf.trace(away):
        b = block.output[:, 1:, :].mean(1).save()
    direction = (a - b) * coef
    with hf.generate(prompt, max_new_tokens=new_tokens, do_sample=False) as tracer:
        logits = list().save()
        for step in tracer.iter[:new_tokens]:
            block.output[:, -1, :] += direction
            logits.append(hf.lm_head.output[0, -1])
        steered = tracer.result.save()
    with hf.generate(prompt, max_new_tokens=new_tokens, do_sample=False) as tracer:
        plain = tracer.result.save()
    return direction, torch.stack(list(logits)), steered, plain


def ablation(hf, prompt: str, layer: int, head: int):
    """Last-position logits: plain, MLP output zeroed, one head zeroed (the
    head's slice of ``o_proj``'s input)."""
    block = hf.model.layers[layer]
    d = hf.config.hidden_size // hf.config.num_attention_heads
    with hf.trace(prompt):
        plain = hf.lm_head.output[0, -1].save()
    with hf.trace(prompt):
        block.mlp.output[:] = 0
        no_mlp = hf.lm_head.output[0, -1].save()
    with hf.trace(prompt):
        block.self_attn.o_proj.input[:, :, head * d : (head + 1) * d] = 0
        no_head = hf.lm_head.output[0, -1].save()
    return plain, no_mlp, no_head


def attention(hf, prompt: str, layer: int) -> torch.Tensor:
    with hf.trace(prompt):
        pattern = hf.model.layers[layer].self_attn.output[1].save()
    return pattern
