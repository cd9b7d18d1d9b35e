"""Indexing traced values: ``h[:, -1]`` reads (numpy basic indexing, plus
one list or tensor of indices as ``index_select``), and ``hook[...] = v``
/ ``+= v`` writes, which only a value read at a hook can take."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from .errors import UnsupportedError
from .proxy import Proxy, unwrap
from .recorder import where


def _unsupported(what: str, why: str = "") -> UnsupportedError:
    return UnsupportedError(f"{what} is not supported in a graph{': ' + why if why else ''}", where())


def _items(key: Any, allow_advanced: bool):
    """numpy basic index items for the graph, plus one advanced index
    ``(position, indices)`` if there is one."""
    if not isinstance(key, tuple):
        key = (key,)
    items: List[Any] = []
    advanced = None
    for k in key:
        if isinstance(k, Proxy) and not k._resolved:
            kind = "advanced"
        else:
            k = unwrap(k)
            if isinstance(k, torch.Tensor) and k.dim() == 0 and not k.is_floating_point() and k.dtype != torch.bool:
                k = int(k)
            kind = None
        if kind is None and isinstance(k, bool):
            raise _unsupported("boolean indexing")
        if kind is None and isinstance(k, int):
            items.append({"at": k})
        elif kind is None and isinstance(k, slice):
            for part in (k.start, k.stop, k.step):
                if part is not None and not isinstance(part, int):
                    raise _unsupported("a slice whose bounds are not Python ints")
            if k.step is not None and k.step < 1:
                raise _unsupported("a slice with a step below 1", "torch has no negative steps")
            if k.start is None and k.stop is None and k.step in (None, 1):
                items.append("full")
            else:
                items.append({"slice": {"start": k.start, "end": k.stop, "step": k.step or 1}})
        elif kind is None and k is Ellipsis:
            items.append("ellipsis")
        elif kind is None and k is None:
            items.append("new_axis")
        else:
            if not allow_advanced:
                raise _unsupported("assigning through a list, tensor or mask index", "write slices of a hook: h[:, -1, :] = v")
            if advanced is not None:
                raise _unsupported("indexing with more than one list or tensor of indices")
            if kind is None:
                t = torch.as_tensor(k)
                if t.dtype == torch.bool:
                    raise _unsupported("boolean mask indexing")
                if t.dim() != 1 or t.is_floating_point():
                    raise _unsupported("indexing with a tensor of indices that is not 1-d and integer")
                k = t.to(torch.int64)
            advanced = (len(items), k)
            items.append("full")
    return items, advanced


def getitem(x: Proxy, key: Any) -> Proxy:
    r = x._recorder
    items, advanced = _items(key, allow_advanced=True)
    if advanced is None:
        return r.op({"index": {"items": items}}, [x])
    pos, indices = advanced
    basic = all(i == "full" for i in items)
    out = x if basic else r.op({"index": {"items": items}}, [x])
    before = items[:pos]
    if "ellipsis" in before:
        rest = items[pos + 1 :]
        dim = out.ndim - sum(1 for i in rest if i == "full" or "slice" in i or i == "new_axis") - 1
    else:
        dim = sum(1 for i in before if i == "full" or i == "new_axis" or (isinstance(i, dict) and "slice" in i))
    idx = r.value(indices)
    if isinstance(indices, Proxy):
        nd = indices.ndim
        if nd == 0:
            sel = r.op({"index_select": {"dim": dim}}, [out, r.op({"unsqueeze": {"dim": 0}}, [idx])])
            return r.op({"squeeze": {"dim": dim}}, [sel])
        if nd != 1:
            raise _unsupported("indexing with a traced value of indices that is not 0-d or 1-d")
    return r.op({"index_select": {"dim": dim}}, [out, idx])


def setitem(x: Proxy, key: Any, value: Any) -> None:
    """``hook[key] = value`` (or ``+= v``, ...) on a value read at a hook."""
    r = x._recorder
    if x._rec.kind != "read":
        line = x._rec.where[1] if x._rec.where else "?"
        raise UnsupportedError(
            f"assignment into a computed value (built on line {line}): nnmesh graphs "
            "write only to hook points; index the hook itself, e.g. "
            "model.model.layers[0].output[:, -1, :] = v",
            where(),
        )
    items, _ = _items(key, allow_advanced=False)
    hook = x._rec.body["hook"]
    if isinstance(value, Proxy) and value._inplace is not None:
        target, addend = value._inplace
        same = (
            target._rec.kind == "op"
            and target._rec.body["op"] == {"index": {"items": items}}
            and target._rec.args[0] is x._rec
        )
        if same and addend is not None:
            r.write(hook, items, addend, "add")
            return
    r.write(hook, items, value, "set")


def write_whole(hook: Dict[str, Any], read: Optional[Proxy], value: Any, recorder: Any) -> None:
    """``module.output = value`` (or ``+=``): a write of the whole hook."""
    if isinstance(value, Proxy) and value._inplace is not None and read is not None:
        target, addend = value._inplace
        if target._rec is read._rec and addend is not None:
            recorder.write(hook, None, addend, "add")
            return
    recorder.write(hook, None, value, "set")
