"""Steering during generation (activation addition): the mean residual
stream of an "ocean" text minus that of a "city" text, added at one layer
at every generated token. One session: the direction is computed and used
in the same request, never leaving the model.

    .venv/bin/python examples/python/steer.py [--mesh ADDR] [--coef 3.0]
"""

import argparse
import os
from typing import Tuple

import torch

from nnmesh import LanguageModel

PROMPT = "Yesterday I went for a walk and saw"
TOWARD = "I love the ocean, the sea, waves and beaches."
AWAY = "I love the city, the streets, traffic and buildings."


def steering(
    model: LanguageModel,
    prompt: str = PROMPT,
    toward: str = TOWARD,
    away: str = AWAY,
    layer: int = 12,
    coef: float = 3.0,
    new_tokens: int = 16,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The direction ``[1, hidden]``, the steered run's logits at each step
    ``[new_tokens, vocab]``, and the steered and plain token ids."""
    block = model.model.layers[layer]
    with model.session():
        with model.trace() as tracer:
            with tracer.invoke(toward):
                a = block.output[:, 1:, :].mean(1)  # position 0 is an attention sink
            with tracer.invoke(away):
                b = block.output[:, 1:, :].mean(1)
            direction = ((a - b) * coef).save()
        with model.generate(prompt, max_new_tokens=new_tokens) as tracer:
            logits = []
            for step in tracer.all():
                block.output[:, -1, :] += direction
                logits.append(model.lm_head.output[0, -1].save())
            steered = tracer.result.save()
        with model.generate(prompt, max_new_tokens=new_tokens) as tracer:
            plain = tracer.result.save()
    return direction, torch.stack(logits), steered, plain


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    default = os.environ.get("NNMESH_MODEL", os.path.join(here, "../../models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mesh", help="a mesh node's address (else the model runs here)")
    p.add_argument("--model", default=default)
    p.add_argument("--layer", type=int, default=12)
    p.add_argument("--coef", type=float, default=3.0)
    args = p.parse_args()
    model = LanguageModel(mesh=args.mesh) if args.mesh else LanguageModel(args.model)

    _, _, steered, plain = steering(model, layer=args.layer, coef=args.coef)
    print("plain:  ", repr(model.tokenizer.decode(plain[0])))
    print("steered:", repr(model.tokenizer.decode(steered[0])))


if __name__ == "__main__":
    main()
