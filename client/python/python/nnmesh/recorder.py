"""Recording an Intervention Graph from Python.

A :class:`Recorder` belongs to one ``with`` block that runs (a trace, or a
session holding several traces). Proxies add nodes to it in program order
(:class:`Rec`, each remembering the line of user code that built it); when
the block ends, :meth:`Recorder.finish` turns them into the graph:

- **Dead nodes are dropped.** Only what a write, a save or a stop needs is
  kept. ``h[:, -1] += v`` evaluates ``h[:, -1]`` and ``h[:, -1] + v`` before
  Python calls ``__setitem__``; those become an ``add``-mode write of ``v``
  and the intermediate nodes disappear, as does a read nothing uses.
- **Nodes are emitted effect by effect:** each write, save and stop, in
  program order, preceded by whatever it needs that was not emitted yet.
  This is the order the Rust builder's recipes use, so the same experiment
  gives the same graph, byte for byte. It is only a reordering: the graph
  runs each node when its inputs exist, and the reads and writes of any one
  hook keep their program order (checked; if they would not, the program
  order is kept).

Inside a ``for step in tracer.iter[a:b]`` loop the body is recorded once,
with hooks over the steps ``a..b`` (the graph runs it at each step); the
later iterations replay the body and must do the same things (see
:class:`Loop`).
"""

from __future__ import annotations

import ast
import json
import linecache
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import _nnmesh
from .errors import GraphError, UnsupportedError, Where, from_native
from .proxy import Proxy

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_SKIP = (_PACKAGE_DIR, _TORCH_DIR, "<frozen ")

#: The JSON dtype names of torch dtypes.
DTYPES = {
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.bool: "bool",
}
TORCH_DTYPES = {v: k for k, v in DTYPES.items()}


def user_frame():
    """The innermost frame of user code (not nnmesh's, not torch's)."""
    f = sys._getframe(1)
    while f is not None:
        name = f.f_code.co_filename
        if not name.startswith(_SKIP) and name != "<frozen importlib._bootstrap>":
            return f
        f = f.f_back
    return None


def where() -> Optional[Where]:
    """(file, line) of the user code running now."""
    f = user_frame()
    return (f.f_code.co_filename, f.f_lineno) if f is not None else None


def json_float(v: float) -> Any:
    """A float as the graph's JSON writes it (non-finite values as strings)."""
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return v


@dataclass(eq=False)
class Rec:
    """One recorded node: its kind (``read``, ``write``, ``op``, ``apply``,
    ``const``, ``save``, ``stop``), its JSON body without the inputs, its
    inputs, and the line of user code that built it."""

    kind: str
    body: Dict[str, Any]
    args: List["Rec"]
    where: Optional[Where]
    index: int = -1

    def has_value(self) -> bool:
        return self.kind not in ("write", "save", "stop")

    def hook_key(self) -> Optional[Tuple[int, str, str]]:
        hook = self.body.get("hook")
        if hook is None:
            return None
        return (hook["trace"], hook["module"], hook["point"])

    def to_json(self, ids: Dict[int, int]) -> Dict[str, Any]:
        a = [ids[id(x)] for x in self.args]
        b = self.body
        if self.kind == "read":
            return {"read": {"hook": b["hook"]}}
        if self.kind == "write":
            return {"write": {"hook": b["hook"], "value": a[0], "index": b["index"], "mode": b["mode"]}}
        if self.kind == "op":
            return {"op": {"op": b["op"], "args": a}}
        if self.kind == "apply":
            return {"apply": {"module": b["module"], "args": a}}
        if self.kind == "const":
            return {"const": {"value": b["value"]}}
        if self.kind == "save":
            return {"save": {"name": b["name"], "value": a[0]}}
        if self.kind == "stop":
            return {"stop": {"trace": b["trace"]}}
        raise AssertionError(self.kind)


@dataclass(eq=False)
class Loop:
    """A ``for step in tracer.iter[a:b]`` loop being recorded.

    Iteration 0 records the body with hooks over ``steps`` (JSON); every
    later iteration replays it: each node the body builds must equal the
    one built at the same point of iteration 0 (same op, same hook, inputs
    that correspond), and stands for that node's value at the iteration's
    step. A body that does something else at some step (``if step == 2:``,
    or arithmetic with ``step``) is an error naming the line; use a list of
    steps, ``tracer.iter[[0, 2]]``, which records each step separately.
    """

    steps: Any
    start: int
    count: int
    where: Optional[Where]
    iteration: int = 0
    cursor: int = 0
    tape: List[Tuple[Any, Rec]] = field(default_factory=list)
    members: Dict[int, int] = field(default_factory=dict)

    @property
    def step(self) -> int:
        return self.start + self.iteration


@dataclass(eq=False)
class Saved:
    """A proxy whose value the run sends back: the Save node, and for a value
    of a generation loop, its step."""

    proxy: Proxy
    rec: Rec
    step: Optional[int]


def _infer_name(frame) -> Optional[str]:
    """``x`` when the line is ``x = <expr>.save()``."""
    if frame is None:
        return None
    line = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
    try:
        tree = ast.parse(line)
    except SyntaxError:
        return None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assign):
        return None
    stmt = tree.body[0]
    call = stmt.value
    if (
        len(stmt.targets) == 1
        and isinstance(stmt.targets[0], ast.Name)
        and isinstance(call, ast.Call)
        and isinstance(call.func, ast.Attribute)
        and call.func.attr == "save"
        and not call.args
    ):
        return stmt.targets[0].id
    return None


class Recorder:
    """The nodes and traces of one graph being built (see the module docs)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.recs: List[Rec] = []
        self.traces: List[Dict[str, Any]] = []
        self.trace_where: List[Optional[Where]] = []
        self.saved: List[Saved] = []
        #: Generation results (``tracer.result``) saved.
        self.results: List[Any] = []
        #: The finished graph, once the block has run.
        self.graph: Any = None
        self.names: Dict[str, Rec] = {}
        self.saves_of: Dict[int, Rec] = {}
        self.closed = False
        self.tracer: Any = None
        self.loop: Optional[Loop] = None
        self.step_at = 0
        self.broken_loop: Optional[Where] = None
        self._plan: Optional[Tuple[Any, Any]] = None
        self._token_counts: Dict[str, int] = {}

    # ---- building -------------------------------------------------------

    def check_open(self) -> None:
        if self.closed:
            raise UnsupportedError(
                "this trace has ended: its values can no longer be computed on "
                "(save them inside the block; saved values are torch tensors after it)",
                where(),
            )

    def add(self, kind: str, body: Dict[str, Any], args: List[Any], at: Optional[Where] = None):
        """Records a node (or, replaying a loop, finds the one it stands for).
        Returns a Proxy for nodes with a value, else the Rec."""
        self.check_open()
        at = at if at is not None else where()
        loop = self.loop
        recs: List[Rec] = []
        for a in args:
            if not isinstance(a, Proxy):
                raise AssertionError(f"not a proxy: {a!r}")
            if a._recorder is not self:
                raise UnsupportedError(
                    "this value belongs to another trace; use it inside a "
                    "model.session() that holds both traces, or save it first",
                    at,
                )
            if a._step is not None and (loop is None or id(a._rec) not in loop.members):
                if kind != "save":
                    raise UnsupportedError(
                        f"a value from step {a._step} of a generation loop can "
                        "only be saved outside the loop: the loop's body runs at "
                        "every step, so compute on it inside the loop",
                        at,
                    )
            recs.append(a._rec)
        if loop is not None:
            sig = (kind, json.dumps(body, sort_keys=True), tuple(self._identity(a, loop, at) for a in args))
            if loop.iteration > 0:
                if loop.cursor >= len(loop.tape) or loop.tape[loop.cursor][0] != sig:
                    first = loop.tape[loop.cursor][1] if loop.cursor < len(loop.tape) else None
                    then = f" (at step {loop.start} it built {first.kind} on line {first.where[1]})" if first and first.where else ""
                    raise UnsupportedError(
                        f"the body of the generation loop (line {loop.where[1] if loop.where else '?'}) "
                        f"does something else at step {loop.step} than at step {loop.start}{then}: "
                        "nnmesh runs one body at every step, so it must build the same "
                        "operations each time; to treat steps differently, list them: "
                        "tracer.iter[[0, 2, 5]]",
                        at,
                    )
                rec = loop.tape[loop.cursor][1]
                loop.cursor += 1
                return Proxy(self, rec, loop.step) if rec.has_value() else rec
        rec = Rec(kind, body, recs, at, len(self.recs))
        self.recs.append(rec)
        self._plan = None
        if loop is not None:
            loop.members[id(rec)] = len(loop.tape)
            loop.tape.append((sig, rec))
            return Proxy(self, rec, loop.step) if rec.has_value() else rec
        return Proxy(self, rec, None) if rec.has_value() else rec

    def _identity(self, a: Proxy, loop: Loop, at: Optional[Where]):
        index = loop.members.get(id(a._rec))
        if index is None:
            return ("x", id(a._rec))
        if a._step != loop.step:
            raise UnsupportedError(
                f"a value from step {a._step} of the generation loop is used at step "
                f"{loop.step}: each step of the loop's body sees its own step's values",
                at,
            )
        return ("l", index)

    def op(self, op: Any, args: List[Any]) -> Proxy:
        """An op node (``op`` as the graph's JSON names it) on these values."""
        return self.add("op", {"op": op}, [self.value(a) for a in args])

    def apply(self, module: str, arg: Any) -> Proxy:
        return self.add("apply", {"module": module}, [self.value(arg)])

    def value(self, x: Any, dtype: Optional[str] = None) -> Proxy:
        """``x`` as a graph value: a proxy as is, anything else as a constant."""
        if isinstance(x, Proxy):
            if x._resolved:
                return self.const(x._value, dtype)
            return x
        return self.const(x, dtype)

    def const(self, x: Any, dtype: Optional[str] = None) -> Proxy:
        """A constant node from a Python number, a list or a torch tensor;
        ``dtype`` forces the element type (e.g. a hook's, for a write)."""
        if isinstance(x, bool):
            t = torch.tensor(x)
        elif isinstance(x, int):
            t = torch.tensor(x, dtype=torch.int64)
        elif isinstance(x, float):
            t = torch.tensor(x, dtype=torch.float32)
        elif isinstance(x, torch.Tensor):
            t = x.detach()
        else:
            try:
                t = torch.as_tensor(x)
            except Exception as e:  # noqa: BLE001 - named in the message
                raise UnsupportedError(
                    f"cannot use a {type(x).__name__} in a graph: values are tensors, numbers or lists of numbers ({e})",
                    where(),
                ) from None
        if t.dtype == torch.float64:
            t = t.to(torch.float32)
        if t.dtype in (torch.int32, torch.int16, torch.int8, torch.uint8):
            t = t.to(torch.int64)
        if dtype is not None:
            t = t.to(TORCH_DTYPES[dtype])
        name = DTYPES.get(t.dtype)
        if name is None:
            raise UnsupportedError(
                f"tensors of {t.dtype} have no graph dtype (f32, f16, bf16, i64, bool)", where()
            )
        flat = t.reshape(-1).to(torch.float64 if t.is_floating_point() else torch.int64).tolist()
        values = [json_float(v) for v in flat] if t.is_floating_point() else [float(v) for v in flat]
        body = {"value": {"dtype": name, "shape": list(t.shape), "values": values}}
        return self.add("const", body, [])

    def hook(self, module: str, point: str) -> Dict[str, Any]:
        """The hook JSON for ``module.point`` in the current trace, invoke and steps."""
        tracer = self.tracer
        if tracer is None:
            raise UnsupportedError(
                f"{module}.{point} is read outside a trace: hooks belong to a "
                "`with model.trace(...)` or `model.generate(...)` block",
                where(),
            )
        invoke = tracer.hook_invoke(f"{module}.{point}")
        steps = self.loop.steps if self.loop is not None else {"at": self.step_at}
        return {"trace": tracer.index, "module": module, "point": point, "invoke": invoke, "steps": steps}

    def read(self, module: str, point: str) -> Proxy:
        return self.add("read", {"hook": self.hook(module, point)}, [])

    def write(self, hook: Dict[str, Any], index: Optional[list], value: Any, mode: str) -> None:
        dtype = "i64" if (hook["module"], hook["point"]) == ("model.embed_tokens", "input") else "f32"
        v = value if isinstance(value, Proxy) and not value._resolved else self.const(
            value._value if isinstance(value, Proxy) else value, dtype
        )
        self.add("write", {"hook": hook, "index": index, "mode": mode}, [v])

    def save(self, proxy: Proxy, name: Optional[str]) -> None:
        """Records that ``proxy``'s value goes back to the caller (once per
        value; saving it again, or a later step's view of it, reuses the
        Save node)."""
        self.check_open()
        at = where()
        loop = self.loop
        if loop is not None and loop.iteration > 0:
            want = loop.tape[loop.cursor][1] if loop.cursor < len(loop.tape) else None
            first = want.body["name"] if want is not None and want.kind == "save" else name
            if name is not None and name != first:
                raise UnsupportedError(
                    f"a generation loop saves one value per step under one name: "
                    f"{first!r} at step {loop.start}, {name!r} at step {loop.step}",
                    at,
                )
            rec = self.add("save", {"name": first}, [proxy], at)
            self.saved.append(Saved(proxy, rec, proxy._step))
            return
        rec = self.saves_of.get(id(proxy._rec))
        if rec is not None:
            if name is not None and name != rec.body["name"]:
                raise UnsupportedError(f"this value is already saved as {rec.body['name']!r}", at)
        else:
            if name is None:
                name = self._unique(_infer_name(user_frame()))
            elif name in self.names:
                raise UnsupportedError(f"the name {name!r} is already used by another save", at)
            rec = self.add("save", {"name": name}, [proxy], at)
            self.saves_of[id(proxy._rec)] = rec
            self.names[name] = rec
        self.saved.append(Saved(proxy, rec, proxy._step))

    def _unique(self, name: Optional[str]) -> str:
        if name is None:
            n = len(self.names)
            while f"save.{n}" in self.names:
                n += 1
            return f"save.{n}"
        if name not in self.names:
            return name
        k = 2
        while f"{name}.{k}" in self.names:
            k += 1
        return f"{name}.{k}"

    def stop(self, trace: int) -> None:
        self.add("stop", {"trace": trace}, [])

    # ---- traces and token counts ----------------------------------------

    def add_trace(self, max_new_tokens: int, at: Optional[Where]) -> int:
        self.check_open()
        self.traces.append({"invokes": [], "max_new_tokens": max_new_tokens})
        self.trace_where.append(at)
        self._plan = None
        return len(self.traces) - 1

    def add_invoke(self, trace: int, prompt: Dict[str, Any]) -> int:
        invokes = self.traces[trace]["invokes"]
        invokes.append({"prompt": prompt})
        self._plan = None
        return len(invokes) - 1

    def token_counts(self) -> List[List[int]]:
        counts = []
        for t in self.traces:
            row = []
            for inv in t["invokes"]:
                p = inv["prompt"]
                if "tokens" in p:
                    row.append(len(p["tokens"]))
                else:
                    text = p["text"]
                    if text not in self._token_counts:
                        self._token_counts[text] = len(self.model.tokenizer.encode(text))
                    row.append(self._token_counts[text])
            counts.append(row)
        return counts

    # ---- shapes ---------------------------------------------------------

    def meta(self, proxy: Proxy) -> Tuple[Tuple[int, ...], torch.dtype]:
        """Shape and dtype of a value, from the graph's shape inference over
        everything recorded so far."""
        if self._plan is None:
            ids = {id(r): i for i, r in enumerate(self.recs)}
            text = self._json(self.recs, ids)
            self._plan = (self._check(text, self.recs), None)
        plan = self._plan[0]
        got = plan.meta(proxy._rec.index, proxy._step)
        if got is None:
            raise UnsupportedError("this value does not exist at that step", where())
        shape, dtype = got
        return tuple(shape), TORCH_DTYPES[dtype]

    def _json(self, recs: List[Rec], ids: Dict[int, int]) -> str:
        graph = {
            "version": _nnmesh.FORMAT_VERSION,
            "traces": self.traces,
            "nodes": [r.to_json(ids) for r in recs],
        }
        return json.dumps(graph)

    def _check(self, text: str, order: List[Rec]):
        """Validates graph JSON whose nodes are ``order``; errors name the line."""
        try:
            return _nnmesh.plan(text, self.model._manifest_json, self.token_counts())
        except _nnmesh.GraphError as e:
            err = from_native(e)
            node, trace = e.args[1], e.args[2] if len(e.args) > 2 else None
            at = None
            if node is not None and node < len(order):
                at = order[node].where
            elif trace is not None and trace < len(self.trace_where):
                at = self.trace_where[trace]
            raise GraphError(err.detail, at, node) from None

    # ---- finishing ------------------------------------------------------

    def finish(self) -> Tuple[str, List[Rec]]:
        """The graph's JSON (dead nodes dropped, effects in order; see the
        module docs), validated, and its nodes in graph order."""
        order = self._emission_order()
        ids = {id(r): i for i, r in enumerate(order)}
        for i, r in enumerate(order):
            r.index = i
        text = self._json(order, ids)
        self._check(text, order)
        return _nnmesh.canonical_json(text), order

    def _emission_order(self) -> List[Rec]:
        effects = [r for r in self.recs if not r.has_value()]
        live: Dict[int, Rec] = {}
        stack = list(effects)
        while stack:
            r = stack.pop()
            if id(r) not in live:
                live[id(r)] = r
                stack.extend(r.args)
        program = [r for r in self.recs if id(r) in live]
        emitted: List[Rec] = []
        seen: set = set()

        def emit(r: Rec) -> None:
            # Iterative post-order: inputs first, in argument order.
            work = [(r, False)]
            while work:
                node, expanded = work.pop()
                if id(node) in seen:
                    continue
                if expanded:
                    seen.add(id(node))
                    emitted.append(node)
                else:
                    work.append((node, True))
                    for a in reversed(node.args):
                        if id(a) not in seen:
                            work.append((a, False))

        for e in effects:
            emit(e)
        if self._hook_orders(emitted) != self._hook_orders(program):
            return program
        return emitted

    @staticmethod
    def _hook_orders(order: List[Rec]) -> Dict[Any, List[int]]:
        out: Dict[Any, List[int]] = {}
        for r in order:
            key = r.hook_key()
            if key is not None:
                out.setdefault(key, []).append(id(r))
        return out
