"""Ablation: zero layer 0's MLP output, or one attention head's output
(``self_attn.z``, per head, before ``o_proj``), and see the next-token
prediction change.

    .venv/bin/python examples/python/ablate.py [--mesh ADDR] [--layer 0] [--head 3]
"""

import argparse
import os
from typing import Tuple

import torch

from nnmesh import LanguageModel

PROMPT = "The Eiffel Tower is in the city of"


def ablation(
    model: LanguageModel, prompt: str = PROMPT, layer: int = 0, head: int = 3
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Last-position logits: plain, with the MLP zeroed, with the head zeroed."""
    block = model.model.layers[layer]
    with model.session():  # three forwards, one request
        with model.trace(prompt):
            plain = model.lm_head.output[0, -1].save()
        with model.trace(prompt):
            block.mlp.output[:] = 0
            no_mlp = model.lm_head.output[0, -1].save()
        with model.trace(prompt):
            block.self_attn.z[:, :, head, :] = 0  # z: [batch, tokens, heads, head_dim]
            no_head = model.lm_head.output[0, -1].save()
    return plain, no_mlp, no_head


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    default = os.environ.get("NNMESH_MODEL", os.path.join(here, "../../models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mesh", help="a mesh node's address (else the model runs here)")
    p.add_argument("--model", default=default)
    p.add_argument("--layer", type=int, default=0)
    p.add_argument("--head", type=int, default=3)
    args = p.parse_args()
    model = LanguageModel(mesh=args.mesh) if args.mesh else LanguageModel(args.model)

    for name, logits in zip(["plain", "MLP zeroed", "head zeroed"], ablation(model, layer=args.layer, head=args.head)):
        p_top, top = logits.softmax(-1).topk(3)
        shown = ", ".join(f"{model.tokenizer.decode(t)!r} {p:.3f}" for p, t in zip(p_top, top))
        print(f"{name:>12}: {shown}")


if __name__ == "__main__":
    main()
