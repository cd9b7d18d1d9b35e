"""Logit lens: every layer's residual stream at the last position, read out
through the final norm and the unembedding.

    .venv/bin/python examples/python/lens.py [--mesh ADDR] [--prompt TEXT]
"""

import argparse
import os

import torch

from nnmesh import LanguageModel

PROMPT = "The Eiffel Tower is in the city of"


def logit_lens(model: LanguageModel, prompt: str = PROMPT) -> torch.Tensor:
    """The lens logits, ``[layers, vocab]``."""
    with model.trace(prompt) as tracer:
        lens = [model.lm_head(model.model.norm(layer.output[:, -1, :])).save() for layer in model.model.layers]
        tracer.stop()  # the model's own logits are not needed
    return torch.cat(lens)


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    default = os.environ.get("NNMESH_MODEL", os.path.join(here, "../../models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mesh", help="a mesh node's address (else the model runs here)")
    p.add_argument("--model", default=default)
    p.add_argument("--prompt", default=PROMPT)
    args = p.parse_args()
    model = LanguageModel(mesh=args.mesh) if args.mesh else LanguageModel(args.model)

    lens = logit_lens(model, args.prompt)
    probs = lens.softmax(-1)
    for layer, (p_top, top) in enumerate(zip(*probs.max(-1))):
        print(f"layer {layer:2}: {model.tokenizer.decode(top)!r:>12} {p_top:.3f}")


if __name__ == "__main__":
    main()
