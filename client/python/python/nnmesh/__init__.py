"""nnmesh: NNsight-style interventions on transformers, run by nnmesh's
runtime in this process or by a peer-to-peer mesh of nodes.

    from nnmesh import LanguageModel

    model = LanguageModel("models/SmolLM2-135M-Instruct.Q4_1.gguf")   # local
    model = LanguageModel(mesh="/ip4/127.0.0.1/tcp/4001/p2p/12D3KooW...")  # a mesh

    with model.trace("The Eiffel Tower is in the city of"):
        logits = model.lm_head.output[0, -1].save()
    print(model.tokenizer.decode(logits.argmax()))   # " Paris"

The block records an Intervention Graph (``model.graph``); it is validated,
then run, when the block ends, and saved values come back as torch tensors.
See the README's "From Python" section for the idiom and for where it
differs from NNsight.
"""

# The extension links the libtorch inside the torch package: load torch first.
import torch  # noqa: F401  (isort: skip)

from . import _nnmesh
from .errors import GraphError, MeshError, NNMeshError, RunError, UnsupportedError
from .model import Graph, LanguageModel, Tokenizer
from .proxy import Proxy

__all__ = [
    "LanguageModel",
    "Graph",
    "Tokenizer",
    "Proxy",
    "save",
    "example",
    "NNMeshError",
    "UnsupportedError",
    "GraphError",
    "MeshError",
    "RunError",
    "FORMAT_VERSION",
]

#: Version of the graph format this build reads and writes.
FORMAT_VERSION: int = _nnmesh.FORMAT_VERSION


def save(value):
    """Saves every traced value in ``value`` (a proxy, or a list, tuple or
    dict of them) and returns ``value``, like NNsight's ``nnsight.save``."""
    if isinstance(value, Proxy):
        return value.save()
    if isinstance(value, (list, tuple)):
        for v in value:
            save(v)
    elif isinstance(value, dict):
        for v in value.values():
            save(v)
    return value


def example(name: str, layers: int = 30) -> Graph:
    """A built-in experiment's graph (``nnmesh graph NAME``): ``lens``,
    ``patch``, ``steer``, ``ablate``, ``ablate-head``, ``attention``."""
    text = _nnmesh.example(name, layers)
    if text is None:
        raise ValueError(f"no built-in experiment {name!r}")
    return Graph(text)
