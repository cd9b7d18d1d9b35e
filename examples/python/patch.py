"""Activation patching (indirect object identification): patch each layer's
residual stream at the last position from the clean run into the corrupted
one, and watch the logit difference " John" - " Mary" come back.

Every run is an invoke of one batched forward, and the clean activations
flow into the patched invokes as graph edges (no barrier needed).

    .venv/bin/python examples/python/patch.py [--mesh ADDR]
"""

import argparse
import os
from typing import Tuple

import torch

from nnmesh import LanguageModel

CLEAN = "After John and Mary went to the store, Mary gave a bottle of milk to"
CORRUPT = "After John and Mary went to the store, John gave a bottle of milk to"


def patching(
    model: LanguageModel, clean: str = CLEAN, corrupt: str = CORRUPT, answer: str = " John", wrong: str = " Mary"
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logit differences: clean, corrupted, and patched at each layer (``[layers]``)."""
    (john,), (mary,) = model.tokenizer.encode(answer), model.tokenizer.encode(wrong)
    layers = model.model.layers
    with model.trace() as tracer:
        with tracer.invoke(clean):
            acts = [layer.output[:, -1, :] for layer in layers]
            logits = model.lm_head.output[0, -1]
            clean_diff = (logits[john] - logits[mary]).save()
        with tracer.invoke(corrupt):
            logits = model.lm_head.output[0, -1]
            corrupt_diff = (logits[john] - logits[mary]).save()
        diffs = []
        for layer, act in zip(layers, acts):
            with tracer.invoke(corrupt):
                layer.output[:, -1, :] = act
                logits = model.lm_head.output[0, -1]
                diffs.append((logits[john] - logits[mary]).save())
    return clean_diff, corrupt_diff, torch.stack(diffs)


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    default = os.environ.get("NNMESH_MODEL", os.path.join(here, "../../models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mesh", help="a mesh node's address (else the model runs here)")
    p.add_argument("--model", default=default)
    args = p.parse_args()
    model = LanguageModel(mesh=args.mesh) if args.mesh else LanguageModel(args.model)

    clean, corrupt, patched = patching(model)
    print(f"clean {clean:+.3f}   corrupted {corrupt:+.3f}")
    for layer, d in enumerate(patched):
        recovered = (d - corrupt) / (clean - corrupt)
        print(f"layer {layer:2}: {d:+.3f}  {'#' * int(max(0.0, float(recovered)) * 40)}")


if __name__ == "__main__":
    main()
