"""Values inside a trace.

A :class:`Proxy` stands for a tensor that exists only when the graph runs:
an activation read at a hook, or anything computed from one. Tensor
operators, methods and ``torch`` functions on it record graph nodes (see
:mod:`nnmesh.ops` for the list); ``.shape`` and ``.dtype`` come from the
graph's shape inference. Anything that needs the value itself while the
block is being built (``if h.sum() > 0``, ``h.item()``, ``h.numpy()``)
raises :class:`~nnmesh.errors.UnsupportedError` naming the line: a graph
has no Python control flow, so nothing runs until the block ends.

After the block, a saved proxy *is* its value: nnmesh puts the torch tensor
in its place in the block's local variables (and inside lists, dicts and
tuples there), and the proxy itself forwards everything to the tensor
(``.value`` returns it).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .errors import UnsupportedAttribute, UnsupportedError

_UNSET: Any = object()


def unwrap(x: Any) -> Any:
    """A resolved proxy's tensor (recursively inside lists and tuples)."""
    if isinstance(x, Proxy):
        return x._get()
    if isinstance(x, (list, tuple)):
        return type(x)(unwrap(v) for v in x)
    return x


class Proxy:
    """A tensor of the graph being built (see the module docs)."""

    __slots__ = ("_recorder", "_rec", "_step", "_value", "_inplace", "__weakref__")

    def __init__(self, recorder: Any, rec: Any, step: Optional[int]) -> None:
        self._recorder = recorder
        self._rec = rec
        self._step = step
        self._value = _UNSET
        self._inplace: Any = None

    # ---- state ----------------------------------------------------------

    @property
    def _resolved(self) -> bool:
        return self._value is not _UNSET

    def _get(self) -> Any:
        """The value after the run; an error while recording or when unsaved."""
        if self._value is not _UNSET:
            return self._value
        from .recorder import where

        line = self._rec.where[1] if self._rec.where else "?"
        if self._recorder.closed:
            raise UnsupportedError(
                f"the value built on line {line} was not saved: call .save() on it "
                "inside the block to get it back",
                where(),
            )
        raise UnsupportedError(
            f"the value built on line {line} does not exist yet: it is computed when "
            "the graph runs, after the block (data-dependent Python such as `if`, "
            "`.item()` or `.tolist()` cannot be part of a graph)",
            where(),
        )

    def _recording(self) -> bool:
        if self._value is not _UNSET:
            return False
        if self._recorder.closed:
            self._get()
        return True

    # ---- the NNsight surface ---------------------------------------------

    def save(self, name: Optional[str] = None) -> "Proxy":
        """Sends this value back when the graph has run; returns the proxy,
        which then stands for a torch tensor.

        ``name`` (an nnmesh addition) names the value in the graph (as
        ``nnmesh trace`` shows it); by default it is the variable assigned
        on the line (``h = ....save()`` saves ``h``) or ``save.N``.
        """
        if self._value is not _UNSET:
            return self
        self._recorder.save(self, name)
        return self

    @property
    def value(self) -> torch.Tensor:
        """The saved tensor (after the block)."""
        return self._get()

    @property
    def shape(self) -> torch.Size:
        """The shape, from the graph's shape inference while recording."""
        if not self._recording():
            return self._value.shape
        return torch.Size(self._recorder.meta(self)[0])

    @property
    def dtype(self) -> torch.dtype:
        """The element type, from the graph's inference while recording."""
        if not self._recording():
            return self._value.dtype
        return self._recorder.meta(self)[1]

    @property
    def ndim(self) -> int:
        """The number of dimensions."""
        return len(self.shape)

    def dim(self) -> int:
        """The number of dimensions, as ``torch.Tensor.dim``."""
        return len(self.shape)

    def size(self, dim: Optional[int] = None) -> Any:
        """The shape, or one dimension's size, as ``torch.Tensor.size``."""
        s = self.shape
        return s if dim is None else s[dim]

    @property
    def device(self) -> torch.device:
        """``cpu`` while recording: constants travel into the graph as data,
        whatever device the model runs on."""
        if not self._recording():
            return self._value.device
        return torch.device("cpu")

    @property
    def T(self) -> Any:
        """The dimensions reversed (a ``permute`` node while recording)."""
        if not self._recording():
            return self._value.T
        return self.permute(*reversed(range(self.ndim)))

    def __len__(self) -> int:
        return self.shape[0] if len(self.shape) else len(self._get())

    # ---- forwarding and recording ------------------------------------------

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        if not self._recording():
            return getattr(self._value, name)
        from . import ops

        method = ops.METHODS.get(name)
        if method is None:
            from .recorder import where

            hint = ops.HINTS.get(name, "")
            raise UnsupportedAttribute(
                f"Tensor.{name} is not in nnmesh's op list, so a graph cannot do it{hint}",
                where(),
            )
        return lambda *args, **kwargs: method(self, *args, **kwargs)

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        from . import ops

        if not ops.any_recording((args, kwargs)):
            return func(*unwrap(args), **{k: unwrap(v) for k, v in kwargs.items()})
        return ops.torch_function(func, args, kwargs)

    def __repr__(self) -> str:
        if self._value is not _UNSET:
            return repr(self._value)
        line = self._rec.where[1] if self._rec.where else "?"
        step = f" at step {self._step}" if self._step is not None else ""
        return f"<nnmesh value: {self._rec.kind} on line {line}{step}>"

    def __format__(self, spec: str) -> str:
        return format(self._get(), spec)

    def __hash__(self) -> int:
        return id(self)

    def __bool__(self) -> bool:
        return bool(self._need("bool(value) (e.g. `if value:` or `and`/`or`)"))

    def __int__(self) -> int:
        return int(self._need("int(value)"))

    def __float__(self) -> float:
        return float(self._need("float(value)"))

    def __index__(self) -> int:
        return self._need("using a value as a Python int").__index__()

    def __iter__(self) -> Any:
        return iter(self._need("iterating over a value (use indexing instead)"))

    def __contains__(self, item: Any) -> bool:
        return unwrap(item) in self._need("`in` on a value")

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        return self._need("converting to numpy").__array__(*args, **kwargs)

    def _need(self, what: str) -> Any:
        if self._value is not _UNSET:
            return self._value
        if self._recorder.closed:
            return self._get()
        from .recorder import where

        raise UnsupportedError(
            f"{what} needs the value while the graph is being built, but it only "
            "exists when the graph runs (nnmesh graphs have no Python control "
            "flow): save it and use it after the block",
            where(),
        )

    def __getitem__(self, key: Any) -> Any:
        if not self._recording():
            return self._value[unwrap(key)]
        from . import ops

        return ops.getitem(self, key)

    def __setitem__(self, key: Any, value: Any) -> None:
        if not self._recording():
            self._value[unwrap(key)] = unwrap(value)
            return
        from . import ops

        ops.setitem(self, key, value)


def _binary(name: str, op: str, reflected: bool = False) -> Any:
    def method(self: Proxy, other: Any) -> Any:
        if self._value is not _UNSET:
            return getattr(self._value, name)(unwrap(other))
        self._recording()
        from . import ops

        return ops.binary(op, other, self) if reflected else ops.binary(op, self, other)

    method.__name__ = name
    return method


def _inplace(name: str, op: str) -> Any:
    def method(self: Proxy, other: Any) -> Any:
        if self._value is not _UNSET:
            return getattr(self._value, name)(unwrap(other))
        self._recording()
        from . import ops

        result = ops.binary(op, self, other)
        # `h[i] += v` ends in h.__setitem__(i, result): an add-mode write of
        # v (see ops.setitem); other in-place ops write the result.
        addend = ops.as_value(self._recorder, other) if op == "add" else None
        result._inplace = (self, addend)
        return result

    method.__name__ = name
    return method


def _unary(name: str, op: str) -> Any:
    def method(self: Proxy) -> Any:
        if self._value is not _UNSET:
            return getattr(self._value, name)()
        self._recording()
        return self._recorder.op(op, [self])

    method.__name__ = name
    return method


for _name, _op in [
    ("add", "add"), ("sub", "sub"), ("mul", "mul"), ("truediv", "div"), ("pow", "pow"),
    ("matmul", "matmul"), ("eq", "eq"), ("ne", "ne"), ("lt", "lt"), ("le", "le"),
    ("gt", "gt"), ("ge", "ge"),
]:
    setattr(Proxy, f"__{_name}__", _binary(f"__{_name}__", _op))
for _name, _op in [
    ("add", "add"), ("sub", "sub"), ("mul", "mul"), ("truediv", "div"), ("pow", "pow"),
    ("matmul", "matmul"),
]:
    setattr(Proxy, f"__r{_name}__", _binary(f"__r{_name}__", _op, reflected=True))
    setattr(Proxy, f"__i{_name}__", _inplace(f"__i{_name}__", _op))
Proxy.__neg__ = _unary("__neg__", "neg")  # type: ignore[attr-defined]
Proxy.__abs__ = _unary("__abs__", "abs")  # type: ignore[attr-defined]
Proxy.__pos__ = lambda self: self._value if self._value is not _UNSET else self  # type: ignore[attr-defined]
