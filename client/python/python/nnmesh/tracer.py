"""``with model.trace(...)``, ``model.generate(...)``, invokes, generation
loops and sessions.

Everything inside the blocks records graph nodes (see :mod:`nnmesh.recorder`);
nothing runs until the outermost block (a trace, or a session holding
traces) ends. Then the graph is validated (errors name the line that built
the offending node), run locally or on the mesh, and every saved value
becomes a torch tensor in the block's variables.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any, Dict, List, Optional, Sequence

import torch

from .errors import UnsupportedError
from .proxy import Proxy, _UNSET, unwrap
from .recorder import Loop, Recorder, user_frame, where

_OUTSIDE = object()  # not inside any `tracer.invoke(...)` block


class _Stop(Exception):
    """Raised by ``tracer.stop()``; its trace's ``__exit__`` catches it."""

    def __init__(self, tracer: "Tracer") -> None:
        super().__init__("tracer.stop()")
        self.tracer = tracer


def prompts(inputs: Any) -> List[Dict[str, Any]]:
    """Graph prompts (one per batch row) from a trace's or invoke's input:
    text, a list of texts, token ids (a list, or a 1-d or 2-d tensor), or a
    tokenizer's output with ``input_ids`` (and ``attention_mask``)."""
    if isinstance(inputs, str):
        return [{"text": inputs}]
    if isinstance(inputs, dict) or hasattr(inputs, "input_ids"):
        ids = inputs["input_ids"] if isinstance(inputs, dict) else inputs.input_ids
        mask = inputs.get("attention_mask") if isinstance(inputs, dict) else getattr(inputs, "attention_mask", None)
        ids = torch.as_tensor(ids)
        rows = ids.reshape(-1, ids.shape[-1])
        if mask is not None:
            m = torch.as_tensor(mask).reshape(rows.shape).bool()
            return [{"tokens": r[k].tolist()} for r, k in zip(rows, m)]
        return [{"tokens": r.tolist()} for r in rows]
    if isinstance(inputs, torch.Tensor):
        if inputs.dim() == 1:
            return [{"tokens": inputs.tolist()}]
        if inputs.dim() == 2:
            return [{"tokens": r.tolist()} for r in inputs]
        raise UnsupportedError(f"token ids of shape {tuple(inputs.shape)}: give [t] or [b, t]", where())
    if isinstance(inputs, (list, tuple)):
        if all(isinstance(p, str) for p in inputs):
            return [{"text": p} for p in inputs]
        if all(isinstance(p, int) for p in inputs):
            return [{"tokens": list(inputs)}]
        if all(isinstance(p, (list, tuple)) and all(isinstance(i, int) for i in p) for p in inputs):
            return [{"tokens": list(p)} for p in inputs]
    raise UnsupportedError(
        f"cannot use a {type(inputs).__name__} as a prompt: give text, a list of texts, or token ids",
        where(),
    )


class Tracer:
    """A forward pass (``model.trace``) or a greedy generation
    (``model.generate``) being recorded.

    With an input (``model.trace("prompt")``) the block is one implicit
    invoke and hooks see the whole batch; without one, each
    ``with tracer.invoke(prompt):`` adds a prompt (a batch row) and the
    hooks inside it see only that prompt's rows and tokens.
    """

    def __init__(self, model: Any, inputs: Sequence[Any], max_new_tokens: int, generate: bool) -> None:
        if len(inputs) > 1:
            raise UnsupportedError(
                "trace() takes one input (a prompt, a list of prompts, or token ids)", where()
            )
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.generating = generate
        self.inputs = prompts(inputs[0]) if inputs else []
        self.direct = bool(self.inputs)
        self.index = -1
        self.recorder: Optional[Recorder] = None
        self.standalone = False
        self.current_invoke: Any = _OUTSIDE
        self.frame: Any = None
        self.where = where()
        self._graph: Any = None
        self._result: Optional[Result] = None

    @property
    def steps(self) -> int:
        """Forward steps of the trace: ``max(1, max_new_tokens)``."""
        return max(1, self.max_new_tokens)

    def __enter__(self) -> "Tracer":
        model = self.model
        rec = model._session
        if rec is None:
            rec = Recorder(model)
            self.standalone = True
            self.frame = user_frame()
        elif rec.tracer is not None:
            raise UnsupportedError("traces cannot be nested (a session holds traces one after another)", self.where)
        self.recorder = rec
        self.index = rec.add_trace(self.max_new_tokens, self.where)
        for p in self.inputs:
            rec.add_invoke(self.index, p)
        rec.tracer = self
        if self.standalone:
            model._recording_stack.append(rec)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        rec = self.recorder
        assert rec is not None
        rec.tracer = None
        if self.standalone:
            self.model._recording_stack.pop()
        stopped = isinstance(exc, _Stop) and exc.tracer is self
        if exc is not None and not stopped:
            if self.standalone:
                rec.closed = True
            return False
        try:
            if rec.broken_loop is not None:
                at, rec.broken_loop = rec.broken_loop, None
                raise UnsupportedError(
                    "a generation loop ended early (break, or tracer.stop() inside it): its body "
                    "runs at every step of its range; choose the steps with tracer.iter[a:b] "
                    "or a list, tracer.iter[[0, 3]]",
                    at,
                )
            if stopped:
                rec.stop(self.index)
            if not rec.traces[self.index]["invokes"]:
                raise UnsupportedError(
                    "this trace has no input: pass a prompt, model.trace(prompt), or add "
                    "prompts with `with tracer.invoke(prompt):`",
                    self.where,
                )
        except BaseException:
            if self.standalone:
                rec.closed = True
            raise
        if self.standalone:
            self._graph = self.model._execute(rec, self.frame)
        return stopped

    # ---- inside the block --------------------------------------------------

    def hook_invoke(self, path: str) -> Optional[int]:
        """The ``invoke`` of a hook used now: ``None`` for the whole batch."""
        if self.direct:
            return None
        if self.current_invoke is _OUTSIDE:
            raise UnsupportedError(
                f"{path} is used outside `with tracer.invoke(...)`: a trace without "
                "input reads and writes modules inside its invokes",
                where(),
            )
        return self.current_invoke

    def invoke(self, *inputs: Any) -> "Invoker":
        """One prompt of the batch: ``with tracer.invoke(prompt):``. Without
        input, the block sees the whole batch."""
        return Invoker(self, inputs)

    def stop(self) -> None:
        """Ends the block here; the forward may end after the last hook the
        graph uses (the graph's ``stop`` node: no logits are computed when
        nothing needs them)."""
        raise _Stop(self)

    def barrier(self, n: int) -> Any:
        """Accepted for NNsight code and not needed: values flow between
        invokes by data dependency, so every use waits for its value."""
        return lambda: None

    @property
    def iter(self) -> "Iterations":
        """Generation steps: ``for step in tracer.iter[2:5]:`` (also
        ``[:]``, ``[3]`` and a list ``[[0, 2]]``)."""
        return Iterations(self)

    def all(self) -> "Iterations":
        """Every step: ``for step in tracer.all():``."""
        return Iterations(self)[:]

    @property
    def result(self) -> Any:
        """For ``generate``: the token ids (prompt and generated), available
        after the block once saved. For ``trace``: the model's output logits
        (``lm_head``'s output)."""
        if not self.generating:
            return self.model.lm_head.output
        if self._result is None:
            self._result = Result(self)
        return self._result

    @property
    def graph(self) -> Any:
        """The Intervention Graph: after the block, the graph that ran
        (for a trace inside a session, the session's once it ends); inside
        it, the nodes recorded so far."""
        if self._graph is not None:
            return self._graph
        rec = self.recorder
        if rec is not None and rec.graph is not None:
            return rec.graph
        from .model import Graph

        if rec is None:
            raise UnsupportedError("the trace has not started", where())
        ids = {id(r): i for i, r in enumerate(rec.recs)}
        return Graph(rec._json(rec.recs, ids))


class Invoker:
    """``with tracer.invoke(prompt):`` (see :meth:`Tracer.invoke`)."""

    def __init__(self, tracer: Tracer, inputs: Sequence[Any]) -> None:
        self.tracer = tracer
        self.inputs = inputs

    def __enter__(self) -> "Invoker":
        t = self.tracer
        if t.direct:
            raise UnsupportedError(
                "this trace already has its input (model.trace(prompt)): either give "
                "trace() no input and one invoke per prompt, or all prompts to trace()",
                where(),
            )
        if t.current_invoke is not _OUTSIDE:
            raise UnsupportedError("invokes cannot be nested", where())
        if not self.inputs:
            t.current_invoke = None
            return self
        if len(self.inputs) > 1:
            raise UnsupportedError("invoke() takes one input", where())
        ps = prompts(self.inputs[0])
        if len(ps) != 1:
            raise UnsupportedError(
                "an invoke holds one prompt here (its hooks see that prompt's own tokens); "
                "use one invoke per prompt",
                where(),
            )
        assert t.recorder is not None
        t.current_invoke = t.recorder.add_invoke(t.index, ps[0])
        return self

    def __exit__(self, *exc: Any) -> bool:
        self.tracer.current_invoke = _OUTSIDE
        return False


class Iterations:
    """``tracer.iter[...]``: the generation steps a loop's body applies to.

    A range (``[:]``, ``[a:b]``) records the body once, as nodes that run at
    every step of the range, and replays it for the later steps (which must
    do the same; see :class:`nnmesh.recorder.Loop`); ``[i]`` and a list
    ``[[i, j]]`` record each step on its own.
    """

    def __init__(self, tracer: Tracer, start: int = 0, stop: Optional[int] = None, steps: Optional[List[int]] = None):
        self.tracer = tracer
        self.start = start
        self.stop = stop
        self.steps = steps

    def __getitem__(self, key: Any) -> "Iterations":
        if isinstance(key, slice):
            if key.step not in (None, 1):
                raise UnsupportedError("tracer.iter[a:b:step] with a step: list the steps instead", where())
            return Iterations(self.tracer, key.start or 0, key.stop)
        if isinstance(key, (list, tuple)):
            return Iterations(self.tracer, steps=[int(k) for k in key])
        return Iterations(self.tracer, int(key), int(key) + 1)

    def __iter__(self) -> Any:
        t = self.tracer
        rec = t.recorder
        at = where()
        if rec is None or rec.tracer is not t:
            raise UnsupportedError("tracer.iter is used outside its trace", at)
        if rec.loop is not None or rec.step_at != 0:
            raise UnsupportedError("generation loops cannot be nested", at)
        n = t.steps
        if self.steps is not None:
            return self._each(rec, self.steps, n, at)
        stop = n if self.stop is None else self.stop
        start = self.start
        if start < 0 or stop > n or start >= stop:
            raise UnsupportedError(
                f"steps {start}..{stop} are not within this trace's {n} steps "
                f"(max_new_tokens={t.max_new_tokens}; step 0 is the prompt)",
                at,
            )
        if stop - start == 1:
            return self._each(rec, [start], n, at)
        spec: Any = "all" if (start, stop) == (0, n) else {"range": {"start": start, "end": stop}}
        return self._rolled(rec, Loop(spec, start, stop - start, at))

    @staticmethod
    def _each(rec: Recorder, steps: List[int], n: int, at: Any) -> Any:
        for s in steps:
            if not 0 <= s < n:
                raise UnsupportedError(f"step {s} is not within this trace's {n} steps", at)
        try:
            for s in steps:
                rec.step_at = s
                yield s
        finally:
            rec.step_at = 0

    @staticmethod
    def _rolled(rec: Recorder, loop: Loop) -> Any:
        rec.loop = loop
        done = False
        try:
            for i in range(loop.count):
                loop.iteration, loop.cursor = i, 0
                yield loop.start + i
                if i > 0 and loop.cursor != len(loop.tape):
                    missing = loop.tape[loop.cursor][1]
                    line = missing.where[1] if missing.where else "?"
                    raise UnsupportedError(
                        f"the body of the generation loop does less at step {loop.step} than at "
                        f"step {loop.start} (it skipped the {missing.kind} of line {line}): it "
                        "must build the same operations at every step; list the steps to treat "
                        "them differently: tracer.iter[[0, 2, 5]]",
                        loop.where,
                    )
            done = True
        finally:
            rec.loop = None
            if not done:
                # A break (or an exception, which the trace reports instead).
                rec.broken_loop = loop.where


class Result:
    """``tracer.result`` of a generation: the token ids, prompt and generated
    (``[rows, prompt + new]``, left-padded with 0 when prompts differ in
    length), known only after the run; save it inside the block."""

    __slots__ = ("_tracer", "_value", "__weakref__")

    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer
        self._value: Any = _UNSET

    @property
    def _resolved(self) -> bool:
        return self._value is not _UNSET

    def save(self) -> "Result":
        """Asks for the token ids back after the block (as NNsight's
        ``tracer.result.save()``)."""
        rec = self._tracer.recorder
        if rec is not None and self not in rec.results:
            rec.results.append(self)
        return self

    @property
    def value(self) -> torch.Tensor:
        """The token ids, ``[batch, prompt + new tokens]``, left-padded with 0."""
        if self._value is _UNSET:
            raise UnsupportedError(
                "tracer.result exists after the run, and only when saved (tracer.result.save())",
                where(),
            )
        return self._value

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.value, name)

    def __getitem__(self, key: Any) -> Any:
        return self.value[unwrap(key)]

    def __len__(self) -> int:
        return len(self.value)

    def __iter__(self) -> Any:
        return iter(self.value)

    def __repr__(self) -> str:
        return repr(self._value) if self._value is not _UNSET else "<nnmesh generation result: after the run>"

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        def unwrap_result(x: Any) -> Any:
            if isinstance(x, Result):
                return x.value
            if isinstance(x, (list, tuple)):
                return type(x)(unwrap_result(v) for v in x)
            return unwrap(x)

        return func(*unwrap_result(args), **{k: unwrap_result(v) for k, v in (kwargs or {}).items()})


class Session:
    """``with model.session():`` several traces run as one graph (one
    request on a mesh); values flow between the traces without saving."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.recorder: Optional[Recorder] = None
        self.frame: Any = None
        self._graph: Any = None

    def __enter__(self) -> "Session":
        model = self.model
        if model._session is not None or model._recording_stack:
            raise UnsupportedError("sessions cannot be nested or opened inside a trace", where())
        self.recorder = Recorder(model)
        model._session = self.recorder
        model._recording_stack.append(self.recorder)
        self.frame = user_frame()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        model = self.model
        rec = self.recorder
        assert rec is not None
        model._session = None
        model._recording_stack.pop()
        if exc is not None:
            rec.closed = True
            return False
        if not rec.traces:
            rec.closed = True
            raise UnsupportedError("this session holds no trace", where())
        self._graph = model._execute(rec, self.frame)
        return False

    @property
    def graph(self) -> Any:
        """The session's Intervention Graph (after the block)."""
        if self._graph is None:
            raise UnsupportedError("the session's graph exists once the block has ended", where())
        return self._graph


def resolve_frame(frame: Any) -> None:
    """Puts saved values in place of their proxies among ``frame``'s local
    variables (and inside the lists, dicts and tuples they hold)."""
    if frame is None:
        return
    seen: set = set()
    changed = {}
    for name, value in list(frame.f_locals.items()):
        new = _replace(value, seen, 0)
        if new is not value:
            changed[name] = new
    if not changed:
        return
    if frame.f_code.co_flags & 0x01 and frame.f_locals is not frame.f_globals:  # CO_OPTIMIZED
        if sys.version_info >= (3, 13):
            for name, value in changed.items():
                frame.f_locals[name] = value  # a write-through view (PEP 667)
        else:
            locals_ = frame.f_locals
            locals_.update(changed)
            ctypes.pythonapi.PyFrame_LocalsToFast(ctypes.py_object(frame), ctypes.c_int(0))
    else:
        frame.f_locals.update(changed)


_LIMIT = 100_000


def _replace(x: Any, seen: set, depth: int) -> Any:
    if isinstance(x, (Proxy, Result)):
        return x._value if x._resolved else x
    if depth > 4 or id(x) in seen:
        return x
    t = type(x)
    if t is list and len(x) <= _LIMIT:
        seen.add(id(x))
        for i, v in enumerate(x):
            nv = _replace(v, seen, depth + 1)
            if nv is not v:
                x[i] = nv
        return x
    if t is dict and len(x) <= _LIMIT:
        seen.add(id(x))
        for k, v in list(x.items()):
            nv = _replace(v, seen, depth + 1)
            if nv is not v:
                x[k] = nv
        return x
    if isinstance(x, tuple) and len(x) <= _LIMIT:
        seen.add(id(x))
        items = [_replace(v, seen, depth + 1) for v in x]
        if any(a is not b for a, b in zip(items, x)):
            return t(*items) if hasattr(t, "_fields") else t(items)
    return x
