"""Tensor operations on proxies, mapped to the graph's closed op list.

Every name here records one or a few graph ops; everything else raises
:class:`~nnmesh.errors.UnsupportedError` naming the operation and the line.
The same handler serves the ``Tensor`` method (``h.softmax(-1)``), the
``torch`` function (``torch.softmax(h, -1)``) and, where it exists, the
``torch.nn.functional`` one, with torch's signatures.

Mapping notes (each keeps torch's semantics):

- ``x * 2.5`` (a Python float) is the graph's ``scale`` op; other products
  are ``mul`` with a constant.
- Python numbers become 0-d constants (``int`` → i64, ``float`` → f32,
  ``bool``), which, like torch's scalars, do not widen a tensor's dtype.
- Tensors become constants; float64 ones are stored as f32 (graphs have no
  f64).
- ``x[idx]`` is basic numpy indexing; one list, 1-d tensor or 0-d/1-d
  traced value of indices (other dimensions taken whole) becomes
  ``index_select``.
- ``max``/``min``/``topk`` with a dimension return ``(values, indices)``
  as torch does.
- ``clone``, ``detach``, ``contiguous``, ``cpu`` and device moves return
  the value itself: graph values are immutable and live where the model
  runs.
"""

from __future__ import annotations

import collections
from typing import Any, Dict, List, Sequence

import torch

from .errors import UnsupportedError
from .indexing import getitem, setitem, write_whole
from .proxy import Proxy
from .recorder import DTYPES, json_float, where

__all__ = ["METHODS", "TORCH", "HINTS", "getitem", "setitem", "write_whole", "torch_function"]

MaxMin = collections.namedtuple("MaxMin", ["values", "indices"])
TopK = collections.namedtuple("TopK", ["values", "indices"])


def _unsupported(what: str, why: str = "") -> UnsupportedError:
    return UnsupportedError(f"{what} is not supported in a graph{': ' + why if why else ''}", where())


def any_recording(x: Any) -> bool:
    """Whether ``x`` (nested in lists, tuples, dicts) holds an unresolved proxy."""
    if isinstance(x, Proxy):
        return x._recording()
    if isinstance(x, (list, tuple)):
        return any(any_recording(v) for v in x)
    if isinstance(x, dict):
        return any(any_recording(v) for v in x.values())
    return False


def recorder_of(*xs: Any) -> Any:
    for x in xs:
        if isinstance(x, Proxy) and not x._resolved:
            return x._recorder
        if isinstance(x, (list, tuple)):
            r = recorder_of(*x)
            if r is not None:
                return r
    return None


def as_value(recorder: Any, x: Any) -> Proxy:
    return recorder.value(x)


def binary(op: str, a: Any, b: Any) -> Proxy:
    r = recorder_of(a, b)
    if op == "mul":
        if isinstance(b, float) and isinstance(a, Proxy):
            return r.op({"scale": {"factor": json_float(b)}}, [a])
        if isinstance(a, float) and isinstance(b, Proxy):
            return r.op({"scale": {"factor": json_float(a)}}, [b])
    return r.op(op, [a, b])


def _dim_list(dim: Any) -> List[int]:
    if dim is None:
        return []
    if isinstance(dim, (list, tuple)):
        return [int(d) for d in dim]
    return [int(dim)]


def _shape_args(shape: Sequence[Any]) -> List[int]:
    if len(shape) == 1 and isinstance(shape[0], (list, tuple, torch.Size)):
        shape = shape[0]
    return [int(s) for s in shape]


def _cast(x: Proxy, dtype: torch.dtype) -> Proxy:
    name = DTYPES.get(dtype)
    if name is None:
        raise _unsupported(f"a cast to {dtype}", "graphs hold f32, f16, bf16, i64 and bool")
    return x._recorder.op({"cast": {"dtype": name}}, [x])


# ---- handlers (torch signatures) ----------------------------------------------


def _r(*xs: Any) -> Any:
    r = recorder_of(*xs)
    if r is None:
        raise AssertionError("no traced value among the arguments")
    return r


def add(input: Any, other: Any, *, alpha: Any = 1, out: Any = None) -> Proxy:
    _no_out(out)
    if alpha != 1:
        other = binary("mul", other, alpha)
    return binary("add", input, other)


def sub(input: Any, other: Any, *, alpha: Any = 1, out: Any = None) -> Proxy:
    _no_out(out)
    if alpha != 1:
        other = binary("mul", other, alpha)
    return binary("sub", input, other)


def rsub(input: Any, other: Any, *, alpha: Any = 1) -> Proxy:
    return sub(other, input, alpha=alpha)


def div(input: Any, other: Any, *, rounding_mode: Any = None, out: Any = None) -> Proxy:
    _no_out(out)
    if rounding_mode is not None:
        raise _unsupported(f"division with rounding_mode={rounding_mode!r}")
    return binary("div", input, other)


def _no_out(out: Any) -> None:
    if out is not None:
        raise _unsupported("out= arguments", "graph values are immutable")


def _bin(op: str) -> Any:
    def f(input: Any, other: Any, *, out: Any = None) -> Proxy:
        _no_out(out)
        return binary(op, input, other)

    f.__name__ = op
    return f


def _un(op: str) -> Any:
    def f(input: Any, *args: Any, out: Any = None, inplace: bool = False, **kwargs: Any) -> Proxy:
        _no_out(out)
        if args or kwargs:
            raise _unsupported(f"{op} with extra arguments {args or ''}{kwargs or ''}")
        if inplace:
            raise _unsupported(f"in-place {op}", "graph values are immutable")
        return _r(input).op(op, [input])

    f.__name__ = op
    return f


def gelu(input: Any, approximate: str = "none") -> Proxy:
    if approximate != "none":
        raise _unsupported(f"gelu(approximate={approximate!r})", "the graph's gelu is the exact (erf) form")
    return _r(input).op("gelu", [input])


def where_(condition: Any, input: Any = None, other: Any = None) -> Proxy:
    if input is None or other is None:
        raise _unsupported("torch.where(condition) with one argument")
    return _r(condition, input, other).op("where", [condition, input, other])


def einsum(equation: str, *operands: Any) -> Proxy:
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    return _r(*operands).op({"einsum": {"equation": equation}}, list(operands))


def _reduce(op: str) -> Any:
    def f(input: Any, dim: Any = None, keepdim: bool = False, *, dtype: Any = None) -> Proxy:
        x = _r(input).op({op: {"dims": _dim_list(dim), "keepdim": bool(keepdim)}}, [input])
        return _cast(x, dtype) if dtype is not None else x

    f.__name__ = op
    return f


def _max(input: Any, dim: Any = None, keepdim: bool = False) -> Any:
    r = _r(input, dim)
    if isinstance(dim, (Proxy, torch.Tensor)):
        return r.op("maximum", [input, dim])
    if dim is None:
        flat = r.op({"reshape": {"shape": [-1]}}, [input])
        return r.op({"max": {"dim": 0, "keepdim": False}}, [flat])
    values = r.op({"max": {"dim": int(dim), "keepdim": bool(keepdim)}}, [input])
    indices = r.op({"argmax": {"dim": int(dim), "keepdim": bool(keepdim)}}, [input])
    return MaxMin(values, indices)


def _min(input: Any, dim: Any = None, keepdim: bool = False) -> Any:
    r = _r(input, dim)
    if isinstance(dim, (Proxy, torch.Tensor)):
        return r.op("minimum", [input, dim])
    if dim is None:
        flat = r.op({"reshape": {"shape": [-1]}}, [input])
        return r.op({"min": {"dim": 0, "keepdim": False}}, [flat])
    values = r.op({"min": {"dim": int(dim), "keepdim": bool(keepdim)}}, [input])
    neg = r.op("neg", [input])
    indices = r.op({"argmax": {"dim": int(dim), "keepdim": bool(keepdim)}}, [neg])
    return MaxMin(values, indices)


def argmax(input: Any, dim: Any = None, keepdim: bool = False) -> Proxy:
    r = _r(input)
    if dim is None:
        flat = r.op({"reshape": {"shape": [-1]}}, [input])
        return r.op({"argmax": {"dim": 0, "keepdim": False}}, [flat])
    return r.op({"argmax": {"dim": int(dim), "keepdim": bool(keepdim)}}, [input])


def topk(input: Any, k: int, dim: int = -1, largest: bool = True, sorted: bool = True) -> TopK:
    if not largest or not sorted:
        raise _unsupported("topk(largest=False) or topk(sorted=False)")
    r = _r(input)
    return TopK(
        r.op({"topk_values": {"k": int(k), "dim": int(dim)}}, [input]),
        r.op({"topk_indices": {"k": int(k), "dim": int(dim)}}, [input]),
    )


def norm(input: Any, p: Any = "fro", dim: Any = None, keepdim: bool = False, dtype: Any = None) -> Proxy:
    if p in ("fro", None):
        p = 2
    if isinstance(p, str):
        raise _unsupported(f"norm(p={p!r})")
    x = _r(input).op({"norm": {"p": json_float(float(p)), "dims": _dim_list(dim), "keepdim": bool(keepdim)}}, [input])
    return _cast(x, dtype) if dtype is not None else x


def vector_norm(x: Any, ord: Any = 2, dim: Any = None, keepdim: bool = False, *, dtype: Any = None) -> Proxy:
    return norm(x, ord, dim, keepdim, dtype)


def _softmax(op: str) -> Any:
    def f(input: Any, dim: Any = None, _stacklevel: int = 3, dtype: Any = None) -> Proxy:
        if dim is None:
            raise _unsupported(f"{op} without dim")
        x = _cast(input, dtype) if dtype is not None else input
        return _r(input).op({op: {"dim": int(dim)}}, [x])

    f.__name__ = op
    return f


def reshape(input: Any, *shape: Any) -> Proxy:
    return _r(input).op({"reshape": {"shape": _shape_args(shape)}}, [input])


def view(input: Any, *shape: Any) -> Proxy:
    if len(shape) == 1 and isinstance(shape[0], torch.dtype):
        raise _unsupported("view(dtype)", "reinterpreting bits is not a graph op")
    return reshape(input, *shape)


def transpose(input: Any, dim0: int, dim1: int) -> Proxy:
    return _r(input).op({"transpose": {"dim0": int(dim0), "dim1": int(dim1)}}, [input])


def permute(input: Any, *dims: Any) -> Proxy:
    return _r(input).op({"permute": {"dims": _shape_args(dims)}}, [input])


def squeeze(input: Any, dim: Any = None) -> Proxy:
    r = _r(input)
    if isinstance(dim, int):
        return r.op({"squeeze": {"dim": dim}}, [input])
    if dim is None:
        dims = [d for d, s in enumerate(input.shape) if s == 1]
    else:
        nd = input.ndim
        dims = [d % nd if nd else 0 for d in _dim_list(dim)]
    x = input
    for d in sorted(set(dims), reverse=True):
        x = r.op({"squeeze": {"dim": d}}, [x])
    return x


def unsqueeze(input: Any, dim: int) -> Proxy:
    return _r(input).op({"unsqueeze": {"dim": int(dim)}}, [input])


def flatten(input: Any, start_dim: int = 0, end_dim: int = -1) -> Proxy:
    shape = list(input.shape)
    if not shape:
        return reshape(input, [1])
    s, e = start_dim % len(shape), end_dim % len(shape)
    target = shape[:s] + [-1] + shape[e + 1 :]
    return reshape(input, target)


def cat(tensors: Sequence[Any], dim: int = 0, *, out: Any = None) -> Proxy:
    _no_out(out)
    return _r(*tensors).op({"cat": {"dim": int(dim)}}, list(tensors))


def stack(tensors: Sequence[Any], dim: int = 0, *, out: Any = None) -> Proxy:
    _no_out(out)
    return _r(*tensors).op({"stack": {"dim": int(dim)}}, list(tensors))


def index_select(input: Any, dim: int, index: Any) -> Proxy:
    return _r(input, index).op({"index_select": {"dim": int(dim)}}, [input, index])


def gather(input: Any, dim: int, index: Any, *, sparse_grad: bool = False) -> Proxy:
    return _r(input, index).op({"gather": {"dim": int(dim)}}, [input, index])


def scatter(input: Any, dim: int, index: Any, src: Any = None, value: Any = None, *, reduce: Any = None) -> Proxy:
    if reduce is not None:
        raise _unsupported(f"scatter(reduce={reduce!r})")
    values = src if src is not None else value
    if values is None:
        raise _unsupported("scatter without src or value")
    return _r(input, index, values).op({"scatter": {"dim": int(dim)}}, [input, index, values])


def to(input: Any, *args: Any, **kwargs: Any) -> Proxy:
    dtype = kwargs.pop("dtype", None)
    for a in args:
        if isinstance(a, torch.dtype):
            dtype = a
        elif isinstance(a, Proxy):
            dtype = a.dtype
        elif isinstance(a, torch.Tensor):
            dtype = a.dtype
        elif not isinstance(a, (str, torch.device)):
            raise _unsupported(f"to({a!r})")
    for k in kwargs:
        if k not in ("device", "non_blocking", "copy", "memory_format"):
            raise _unsupported(f"to({k}=...)")
    return _cast(input, dtype) if dtype is not None else input


def _like(op: str) -> Any:
    def f(input: Any, *, dtype: Any = None, **kwargs: Any) -> Proxy:
        x = _r(input).op(op, [input])
        return _cast(x, dtype) if dtype is not None else x

    f.__name__ = op
    return f


def full_like(input: Any, fill_value: Any, *, dtype: Any = None, **kwargs: Any) -> Proxy:
    x = _r(input).op({"full_like": {"value": json_float(float(fill_value))}}, [input])
    return _cast(x, dtype) if dtype is not None else x


def _identity(input: Any, *args: Any, **kwargs: Any) -> Any:
    return input


def _method_cast(dtype: torch.dtype) -> Any:
    return lambda input, *a, **k: _cast(input, dtype)


def _getitem_fn(input: Any, key: Any) -> Any:
    if isinstance(input, Proxy):
        return getitem(input, key)
    # A torch tensor indexed by a traced value.
    r = recorder_of(key)
    return getitem(r.value(input), key)


def _unsupported_method(name: str, why: str) -> Any:
    def f(*args: Any, **kwargs: Any) -> Any:
        raise _unsupported(name, why)

    return f


_binaries = {n: _bin(n) for n in ["mul", "pow", "matmul", "maximum", "minimum", "eq", "ne", "lt", "le", "gt", "ge"]}
_unaries = {n: _un(n) for n in ["neg", "exp", "log", "sqrt", "abs", "tanh", "sigmoid", "relu"]}

#: Tensor methods (``h.NAME(...)``) on traced values.
METHODS: Dict[str, Any] = {
    **_binaries,
    **_unaries,
    "add": add,
    "sub": sub,
    "subtract": sub,
    "div": div,
    "divide": div,
    "true_divide": div,
    "multiply": _binaries["mul"],
    "negative": _unaries["neg"],
    "absolute": _unaries["abs"],
    "greater": _binaries["gt"],
    "less": _binaries["lt"],
    "greater_equal": _binaries["ge"],
    "less_equal": _binaries["le"],
    "not_equal": _binaries["ne"],
    "gelu": gelu,
    "where": lambda input, condition, other: where_(condition, input, other),
    "sum": _reduce("sum"),
    "mean": _reduce("mean"),
    "max": _max,
    "min": _min,
    "argmax": argmax,
    "topk": topk,
    "norm": norm,
    "softmax": _softmax("softmax"),
    "log_softmax": _softmax("log_softmax"),
    "reshape": reshape,
    "view": view,
    "transpose": transpose,
    "swapaxes": transpose,
    "permute": permute,
    "squeeze": squeeze,
    "unsqueeze": unsqueeze,
    "flatten": flatten,
    "index_select": index_select,
    "gather": gather,
    "scatter": scatter,
    "to": to,
    "type_as": lambda input, other: to(input, other),
    "float": _method_cast(torch.float32),
    "half": _method_cast(torch.float16),
    "bfloat16": _method_cast(torch.bfloat16),
    "long": _method_cast(torch.int64),
    "bool": _method_cast(torch.bool),
    "zeros_like": _like("zeros_like"),
    "ones_like": _like("ones_like"),
    "clone": _identity,
    "detach": _identity,
    "contiguous": _identity,
    "cpu": _identity,
    "cuda": _identity,
}

#: ``torch.NAME`` / ``torch.nn.functional.NAME`` / ``Tensor.__NAME__``
#: functions, by ``func.__name__``.
TORCH: Dict[str, Any] = {
    **METHODS,
    "where": where_,
    "einsum": einsum,
    "cat": cat,
    "concat": cat,
    "concatenate": cat,
    "stack": stack,
    "vector_norm": vector_norm,
    "full_like": full_like,
    "rsub": rsub,
    "__add__": add,
    "__radd__": lambda a, b: add(b, a),
    "__iadd__": add,
    "__sub__": sub,
    "__rsub__": lambda a, b: sub(b, a),
    "__mul__": lambda a, b: binary("mul", a, b),
    "__rmul__": lambda a, b: binary("mul", b, a),
    "__truediv__": div,
    "__rtruediv__": lambda a, b: div(b, a),
    "__div__": div,
    "__rdiv__": lambda a, b: div(b, a),
    "__pow__": _binaries["pow"],
    "__rpow__": lambda a, b: binary("pow", b, a),
    "__matmul__": _binaries["matmul"],
    "__rmatmul__": lambda a, b: binary("matmul", b, a),
    "__eq__": _binaries["eq"],
    "__ne__": _binaries["ne"],
    "__lt__": _binaries["lt"],
    "__le__": _binaries["le"],
    "__gt__": _binaries["gt"],
    "__ge__": _binaries["ge"],
    "__neg__": _unaries["neg"],
    "__abs__": _unaries["abs"],
    "__getitem__": _getitem_fn,
}

#: Extra advice for common methods that have no graph op.
HINTS: Dict[str, str] = {
    "item": ": a value exists only when the graph runs; save it and call .item() after the block",
    "tolist": ": save the value and call .tolist() after the block",
    "numpy": ": save the value and call .numpy() after the block",
    "backward": " (gradients are future work)",
    "grad": " (gradients are future work)",
    "requires_grad_": " (gradients are future work)",
    "double": ": graphs hold f32, f16, bf16, i64 and bool",
    "int": ": graphs hold i64 integers; use .long()",
    "copy_": ": graph values are immutable; write to a hook: module.output[...] = v",
    "zero_": ": write to a hook: module.output[...] = 0",
    "fill_": ": write to a hook: module.output[...] = v",
}


def torch_function(func: Any, args: Sequence[Any], kwargs: Dict[str, Any]) -> Any:
    """``func(*args, **kwargs)`` where some argument is a traced value."""
    name = getattr(func, "__name__", repr(func))
    handler = TORCH.get(name)
    module = getattr(func, "__module__", None) or ""
    qual = f"{module}.{name}" if module and not module.startswith("torch._C") else f"torch.{name}"
    if handler is None or (module.startswith("torch.nn.functional") and name not in _FUNCTIONAL):
        hint = HINTS.get(name, "")
        raise UnsupportedError(
            f"{qual} is not in nnmesh's op list, so a graph cannot do it{hint}", where()
        )
    return handler(*args, **kwargs)


_FUNCTIONAL = {"softmax", "log_softmax", "relu", "gelu", "sigmoid", "tanh"}

