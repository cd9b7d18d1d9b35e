"""Attention pattern: the post-softmax attention probabilities of one layer
(``self_attn``'s second output, as in transformers); every row sums to 1.

    .venv/bin/python examples/python/attention.py [--mesh ADDR] [--layer 0]
"""

import argparse
import os

import torch

from nnmesh import LanguageModel

PROMPT = "The Eiffel Tower is in the city of"


def attention(model: LanguageModel, prompt: str = PROMPT, layer: int = 0) -> torch.Tensor:
    """The pattern, ``[1, heads, tokens, tokens]``."""
    with model.trace(prompt) as tracer:
        _, weights = model.model.layers[layer].self_attn.output
        pattern = weights.save()
        tracer.stop()
    return pattern


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    default = os.environ.get("NNMESH_MODEL", os.path.join(here, "../../models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mesh", help="a mesh node's address (else the model runs here)")
    p.add_argument("--model", default=default)
    p.add_argument("--layer", type=int, default=0)
    args = p.parse_args()
    model = LanguageModel(mesh=args.mesh) if args.mesh else LanguageModel(args.model)

    pattern = attention(model, layer=args.layer)
    tokens = [model.tokenizer.decode(t) for t in model.tokenizer.encode(PROMPT)]
    print(f"pattern {tuple(pattern.shape)}; rows sum to 1 within {float((pattern.sum(-1) - 1).abs().max()):.1e}")
    for h, head in enumerate(pattern[0]):
        looks = head[-1].argmax()
        print(f"head {h}: the last token attends most to {tokens[looks]!r} ({float(head[-1, looks]):.2f})")


if __name__ == "__main__":
    main()
