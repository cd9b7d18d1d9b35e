"""Type stubs of nnmesh's native module (Rust, pyo3): graph checks, local
and mesh runs, the tokenizer. The Python package wraps it; user code
normally needs none of it directly."""

from typing import Any, Dict, List, Optional, Tuple

FORMAT_VERSION: int

class GraphError(ValueError):
    """A graph that does not decode or validate; args: (message, node, trace)."""

class MeshError(RuntimeError):
    """The mesh could not be reached, or a request through it failed."""

class RunError(RuntimeError):
    """A model could not be loaded, or a graph failed while running."""

def canonical_json(json: str) -> str:
    """Parses graph JSON (checking its structure) and writes it back in the
    canonical pretty form that `nnmesh graph` prints."""

def content_hash(json: str) -> str:
    """The graph's content hash (blake3 of its canonical encoding), hex."""

def plan(json: str, manifest_json: str, tokens: List[List[int]]) -> Plan:
    """Validates a graph against a manifest, given each invoke's token count."""

def modules(manifest_json: str) -> List[Tuple[str, List[str]]]:
    """The model's modules in forward order, each with its hook points."""

def example(name: str, layers: int = 30) -> Optional[str]:
    """A built-in experiment's graph (`nnmesh graph NAME`) as JSON."""

class Plan:
    """A validated graph: every node's inferred shape and dtype."""

    steps: List[int]
    def __len__(self) -> int: ...
    def meta(self, node: int, step: Optional[int] = None) -> Optional[Tuple[List[int], str]]:
        """(shape, dtype) of a node's value at a step (its first by default)."""
    def per_step(self, node: int) -> Optional[Tuple[int, int, int]]:
        """(trace, start, end) for a node that runs at several steps."""

class Tokenizer:
    """A Hugging Face tokenizer, as the model's nodes use it."""

    vocab_size: int
    eos: Optional[int]
    @staticmethod
    def from_json(json: bytes) -> Tokenizer: ...
    def encode(self, text: str) -> List[int]: ...
    def decode(self, ids: List[int]) -> str: ...
    def token_text(self, id: int) -> str: ...
    def token_id(self, token: str) -> Optional[int]: ...
    def to_json(self) -> str: ...

#: A run's result: saves as (name, step, dtype, shape, bytes) and generated
#: token ids per trace and invoke; a mesh run adds its route (peer, start,
#: end), model id and fail-over count.
RunResult = Dict[str, Any]

class Local:
    """A whole model loaded in this process (`.gguf` or a Hugging Face folder)."""

    tokenizer: Tokenizer
    def __init__(self, path: str, device: str = "cpu", dtype: str = "float32") -> None: ...
    def manifest(self) -> str: ...
    def run(self, graph: str) -> RunResult: ...

class Mesh:
    """A connection to a mesh of stage nodes serving one model."""

    tokenizer: Tokenizer
    model: str
    peer_id: str
    def __init__(
        self,
        addrs: List[str],
        model: Optional[str] = None,
        identity: Optional[str] = None,
        psk: Optional[str] = None,
        verify: bool = False,
    ) -> None: ...
    def manifest(self) -> str: ...
    def peers(self) -> List[Tuple[str, int, int, str]]: ...
    def run(self, graph: str) -> RunResult: ...
