"""``LanguageModel``: a model to trace, loaded here or served by a mesh."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from . import _nnmesh
from .envoy import Envoy, build
from .errors import GraphError, MeshError, RunError, UnsupportedError, from_native
from .recorder import Recorder, TORCH_DTYPES, where
from .tracer import Session, Tracer, resolve_frame


class Graph:
    """An Intervention Graph, in the canonical JSON form that ``nnmesh graph``
    prints and ``nnmesh trace --graph FILE`` runs."""

    def __init__(self, text: str) -> None:
        try:
            self._text = _nnmesh.canonical_json(text)
        except _nnmesh.GraphError as e:
            raise from_native(e) from None

    @classmethod
    def from_json(cls, text: str) -> "Graph":
        """Parses graph JSON (checking its structure)."""
        return cls(text)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "Graph":
        """Reads a graph file."""
        with open(path) as f:
            return cls(f.read())

    def to_json(self) -> str:
        """The graph as pretty JSON."""
        return self._text

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Writes the graph's JSON to ``path``."""
        with open(path, "w") as f:
            f.write(self._text + "\n")

    @property
    def data(self) -> Dict[str, Any]:
        """The graph as a dict (``version``, ``traces``, ``nodes``)."""
        return json.loads(self._text)

    @property
    def nodes(self) -> List[Dict[str, Any]]:
        """The graph's nodes, as dicts in the JSON form."""
        return self.data["nodes"]

    @property
    def traces(self) -> List[Dict[str, Any]]:
        """The graph's traces (prompts, new tokens), as dicts."""
        return self.data["traces"]

    @property
    def hash(self) -> str:
        """The content hash (blake3 of the canonical encoding), in hex."""
        return _nnmesh.content_hash(self._text)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Graph) and other._text == self._text

    def __hash__(self) -> int:
        return hash(self._text)

    def __repr__(self) -> str:
        d = self.data
        return f"Graph({len(d['traces'])} traces, {len(d['nodes'])} nodes, {self.hash[:12]})"


class Tokenizer:
    """The model's tokenizer (from its file, or sent by the mesh)."""

    def __init__(self, native: Any) -> None:
        self._native = native

    def encode(self, text: str, add_special_tokens: bool = False) -> List[int]:
        """Token ids of ``text``; nnmesh never adds special tokens (neither
        does SmolLM2's Hugging Face tokenizer)."""
        if add_special_tokens:
            raise UnsupportedError("add_special_tokens=True: nnmesh tokenizes prompts as given", where())
        return list(self._native.encode(text))

    def __call__(self, text: Union[str, Sequence[str]], **kwargs: Any) -> Dict[str, Any]:
        """``{"input_ids": ...}`` like a Hugging Face tokenizer (lists)."""
        if isinstance(text, str):
            return {"input_ids": self.encode(text, **kwargs)}
        return {"input_ids": [self.encode(t, **kwargs) for t in text]}

    def decode(self, ids: Any) -> str:
        """The text of token ids (a list, a tensor, or one id)."""
        from .proxy import unwrap

        ids = unwrap(ids)
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        elif isinstance(ids, int):
            ids = [ids]
        return self._native.decode([int(i) for i in ids])

    def batch_decode(self, rows: Any) -> List[str]:
        """The text of each row of token ids."""
        return [self.decode(r) for r in rows]

    def convert_ids_to_tokens(self, ids: Any) -> Any:
        """The vocabulary entry of one id, or of each id in a sequence."""
        if isinstance(ids, int):
            return self._native.token_text(ids)
        return [self._native.token_text(int(i)) for i in ids]

    def token_id(self, token: str) -> Optional[int]:
        """The id of a vocabulary entry, or ``None``."""
        return self._native.token_id(token)

    @property
    def eos_token_id(self) -> Optional[int]:
        """The end-of-sequence token's id, if the tokenizer names one."""
        return self._native.eos

    @property
    def vocab_size(self) -> int:
        """The number of tokens in the vocabulary."""
        return self._native.vocab_size


_DEVICE_MAPS = {"auto": "cpu", "cpu": "cpu", "cuda": "cuda", None: "cpu"}


class LanguageModel:
    """A causal language model to trace, as NNsight's ``LanguageModel``.

    ``LanguageModel(path)`` loads a ``.gguf`` file or a Hugging Face folder
    here (``device="cpu"`` or ``"cuda"``, ``dtype="float32"`` or
    ``"bfloat16"``); ``LanguageModel(mesh=ADDR)`` (a multiaddr ending in
    ``/p2p/<peer id>``, or a list of them) uses the model a mesh serves,
    without weights here: the manifest and tokenizer come from the nodes.
    Everything else is the same for both.

    On a mesh: ``model_id`` picks the model (hex id) where several are
    served; ``identity`` is a key file, created on first use, giving this
    client a stable peer id (for nodes' allow-lists); ``psk`` is a private
    mesh's pre-shared key file (``nnmesh keygen psk``); ``verify=True`` runs
    every hop on two holders of its layers and fails, naming both, when
    their outputs disagree.
    """

    def __init__(
        self,
        path: Optional[Union[str, os.PathLike]] = None,
        *,
        mesh: Optional[Union[str, Sequence[str]]] = None,
        device: Optional[str] = None,
        dtype: Any = None,
        device_map: Optional[str] = None,
        torch_dtype: Any = None,
        dispatch: bool = True,
        model_id: Optional[str] = None,
        identity: Optional[Union[str, os.PathLike]] = None,
        psk: Optional[Union[str, os.PathLike]] = None,
        verify: bool = False,
    ) -> None:
        if (path is None) == (mesh is None):
            raise TypeError("give a model path, LanguageModel(path), or a mesh, LanguageModel(mesh=ADDR)")
        if device_map not in _DEVICE_MAPS:
            raise TypeError(f"device_map={device_map!r}: use 'auto', 'cpu' or 'cuda'")
        device = device or _DEVICE_MAPS[device_map]
        dtype = dtype if dtype is not None else torch_dtype
        if isinstance(dtype, torch.dtype):
            dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, str(dtype))
        self._session: Optional[Recorder] = None
        self._recording_stack: List[Recorder] = []
        #: The graph of the last trace or session that ran.
        self.graph: Optional[Graph] = None
        #: The last run's route through the mesh, after any fail-over:
        #: ``[(peer, start, end)]`` (``None`` locally).
        self.route: Optional[List[Any]] = None
        #: Stages of the last mesh run that failed and were replaced by
        #: another holder of their layers (``0`` locally).
        self.failovers: int = 0
        try:
            if mesh is not None:
                if device is not None and device != "cpu" or dtype is not None:
                    raise TypeError("device and dtype are chosen by the mesh's nodes")
                addrs = [mesh] if isinstance(mesh, str) else list(mesh)
                self._backend: Any = _nnmesh.Mesh(
                    addrs,
                    model=model_id,
                    identity=None if identity is None else os.fspath(identity),
                    psk=None if psk is None else os.fspath(psk),
                    verify=verify,
                )
            else:
                if model_id is not None or identity is not None or psk is not None or verify:
                    raise TypeError("model_id, identity, psk and verify are for LanguageModel(mesh=...)")
                self._backend = _nnmesh.Local(os.fspath(path), device or "cpu", dtype or "float32")
        except (_nnmesh.MeshError, _nnmesh.RunError) as e:
            raise from_native(e) from None
        self._manifest_json: str = self._backend.manifest()
        #: The model's dimensions (``num_layers``, ``hidden``, ``heads``, ...).
        self.manifest: Dict[str, Any] = json.loads(self._manifest_json)
        self.tokenizer = Tokenizer(self._backend.tokenizer)
        self._envoy: Envoy = build(self, _nnmesh.modules(self._manifest_json))

    @property
    def remote(self) -> bool:
        """Whether the model is served by a mesh."""
        return isinstance(self._backend, _nnmesh.Mesh)

    @property
    def mesh_model(self) -> Optional[str]:
        """On a mesh, the served model's id (blake3 of its weights)."""
        return self._backend.model if self.remote else None

    @property
    def _recording(self) -> Optional[Recorder]:
        return self._recording_stack[-1] if self._recording_stack else None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._envoy, name)

    def __repr__(self) -> str:
        where_ = f"mesh model {self.mesh_model[:12]}" if self.remote else "local"
        return f"LanguageModel ({where_})\n" + repr(self._envoy)

    @property
    def output(self) -> "_Output":
        """The model's output: ``model.output.logits`` (``lm_head``'s output)."""
        return _Output(self)

    # ---- tracing -----------------------------------------------------------

    def _check_kwargs(self, kwargs: Dict[str, Any], generate: bool) -> int:
        remote = kwargs.pop("remote", None)
        if remote is not None and bool(remote) != self.remote:
            raise UnsupportedError(
                f"remote={remote!r}, but this model is {'a mesh' if self.remote else 'local'}: "
                "where a model runs is chosen by its constructor",
                where(),
            )
        for k in ("scan", "validate"):
            # nnmesh always validates and infers shapes.
            if kwargs.pop(k, True) is False:
                raise UnsupportedError(f"{k}=False: nnmesh always validates graphs", where())
        max_new = kwargs.pop("max_new_tokens", None)
        if kwargs.pop("do_sample", False):
            raise UnsupportedError("do_sample=True: nnmesh generates greedily", where())
        if kwargs:
            raise TypeError(f"unsupported arguments: {', '.join(kwargs)}")
        if generate:
            if max_new is None:
                raise TypeError("generate() needs max_new_tokens=N")
            if int(max_new) < 1:
                raise TypeError("max_new_tokens must be at least 1")
            return int(max_new)
        if max_new is not None:
            raise TypeError("max_new_tokens belongs to generate(), not trace()")
        return 0

    def trace(self, *inputs: Any, **kwargs: Any) -> Tracer:
        """A forward pass: ``with model.trace(prompt):`` (or with invokes)."""
        return Tracer(self, inputs, self._check_kwargs(kwargs, False), generate=False)

    def generate(self, *inputs: Any, **kwargs: Any) -> Tracer:
        """Greedy generation of exactly ``max_new_tokens`` tokens:
        ``with model.generate(prompt, max_new_tokens=N) as tracer:``."""
        return Tracer(self, inputs, self._check_kwargs(kwargs, True), generate=True)

    def session(self, **kwargs: Any) -> Session:
        """Several traces as one graph: ``with model.session():``."""
        self._check_kwargs(dict(kwargs), False)
        return Session(self)

    # ---- running -------------------------------------------------------------

    def run(self, graph: Union[Graph, str]) -> Dict[str, torch.Tensor]:
        """Runs a graph (a :class:`Graph` or its JSON) and returns its saved
        values by name (per-step values as ``NAME.stepN``, as ``nnmesh trace
        --out`` writes them)."""
        text = graph.to_json() if isinstance(graph, Graph) else Graph(graph).to_json()
        result = self._run(text)
        out = {}
        for name, step, dtype, shape, data in result["saves"]:
            out[name if step is None else f"{name}.step{step}"] = _tensor(dtype, shape, data)
        return out

    def _run(self, text: str) -> Dict[str, Any]:
        try:
            result = self._backend.run(text)
        except (_nnmesh.GraphError, _nnmesh.MeshError, _nnmesh.RunError) as e:
            raise from_native(e) from None
        self.route = result.get("route")
        self.failovers = result.get("failovers", 0)
        return result

    def _execute(self, rec: Recorder, frame: Any) -> Graph:
        """Validates, runs and resolves a finished recorder; puts the saved
        values into ``frame``'s variables."""
        try:
            text, order = rec.finish()
        finally:
            rec.closed = True
        graph = Graph(text)
        rec.graph = graph
        self.graph = graph
        try:
            result = self._run(text)
        except GraphError as e:
            node = e.node
            at = order[node].where if node is not None and node < len(order) else None
            raise GraphError(e.detail, at, node) from None
        values: Dict[Any, torch.Tensor] = {}
        for name, step, dtype, shape, data in result["saves"]:
            values[(name, step)] = _tensor(dtype, shape, data)
        for s in rec.saved:
            name = s.rec.body["name"]
            key = (name, s.step)
            if key not in values:
                raise RunError(f"the run did not return the value saved as {name!r}" + (f" at step {s.step}" if s.step is not None else ""))
            s.proxy._value = values[key]
        for r in rec.results:
            r._value = _generated(rec, r._tracer.index, result["generated"], self.tokenizer)
        resolve_frame(frame)
        return graph


class _Output:
    """``model.output``: the model's output, with ``.logits``."""

    def __init__(self, model: LanguageModel) -> None:
        self._model = model

    @property
    def logits(self) -> Any:
        return self._model.lm_head.output

    def __getitem__(self, i: int) -> Any:
        if i != 0:
            raise UnsupportedError("model.output[0] is the logits; there is nothing else", where())
        return self.logits


def _tensor(dtype: str, shape: List[int], data: bytearray) -> torch.Tensor:
    t = TORCH_DTYPES[dtype]
    if len(data) == 0:
        return torch.empty(shape, dtype=t)
    return torch.frombuffer(data, dtype=t).reshape(shape)


def _generated(rec: Recorder, trace: int, generated: List[Any], tok: Tokenizer) -> torch.Tensor:
    """Prompt plus generated ids of each row of a trace, left-padded with 0."""
    rows = []
    for inv, new in zip(rec.traces[trace]["invokes"], generated[trace]):
        p = inv["prompt"]
        ids = p["tokens"] if "tokens" in p else tok.encode(p["text"])
        rows.append(list(ids) + list(new))
    width = max(len(r) for r in rows)
    return torch.tensor([[0] * (width - len(r)) + r for r in rows], dtype=torch.int64)


__all__ = ["LanguageModel", "Graph", "Tokenizer", "MeshError"]
