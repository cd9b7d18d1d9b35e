"""The model's module tree, as NNsight's envoys: ``model.model.layers[5]``.

The tree comes from the model's manifest (the same one nodes validate
graphs against): Hugging Face module paths, each with its hook points.
Inside a trace, ``.output`` and ``.input`` read a module's hook points
(assigning to them writes), ``self_attn`` also has ``q``, ``k``, ``v``,
``pattern`` and ``z``, and calling a module on a value applies it to that
value (``model.lm_head(model.model.norm(h))``, the logit lens).

Differences from NNsight, all deliberate:

- ``.output`` of ``self_attn`` is ``(attn_output, attn_weights)`` as in
  transformers, and ``attn_weights`` is always there (the ``pattern`` hook
  point, post-softmax), whatever attention implementation NNsight's model
  would use. Every other module's output is one tensor, as with
  transformers 5 (decoder layers included).
- Attention internals are named hook points (``self_attn.q`` ... ``.z``),
  not ``.source``.
- ``.inputs``, ``.source``, ``.skip()``, ``.next()`` and module calls with
  ``hook=True`` have no graph form and raise ``UnsupportedError``.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Tuple

from .errors import UnsupportedAttribute, UnsupportedError
from .proxy import Proxy
from .recorder import where

_EXTRA_POINTS = ("q", "k", "v", "pattern", "z")
_NOT_HERE = {
    "inputs": "use .input (the first argument); modules take one value here",
    "source": "attention internals are hook points: self_attn.q, .k, .v, .pattern, .z",
    "skip": "skipping a module is not a graph operation",
    "next": "use `for step in tracer.iter[...]` to reach generation steps",
    "all": "use `for step in tracer.all():`",
    "iter": "use `for step in tracer.iter[...]:`",
}


class Envoy:
    """A module of the model (or a container of modules, like ``model.model``)."""

    def __init__(self, model: Any, path: str, points: Tuple[str, ...]) -> None:
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_points", points)
        object.__setattr__(self, "_children", {})

    @property
    def path(self) -> str:
        """The Hugging Face module path, e.g. ``model.layers.5.self_attn``."""
        return self._path

    def _recorder(self) -> Any:
        rec = self._model._recording
        if rec is None:
            raise UnsupportedError(
                f"{self._path} is used outside a trace: hooks are read inside "
                "`with model.trace(...)` or `with model.generate(...)`",
                where(),
            )
        return rec

    def _point(self, point: str) -> Any:
        if point not in self._points:
            have = ", ".join(self._points) or "none (it is a container)"
            raise UnsupportedAttribute(
                f"module {self._path or 'model'} has no hook point {point!r}; its points: {have}",
                where(),
            )
        rec = self._recorder()
        if point == "output" and "pattern" in self._points:
            # transformers' attention returns (attn_output, attn_weights).
            return (rec.read(self._path, "output"), rec.read(self._path, "pattern"))
        return rec.read(self._path, point)

    def _write(self, point: str, value: Any) -> None:
        if point not in self._points:
            self._point(point)
        rec = self._recorder()
        from . import ops

        if point == "output" and "pattern" in self._points and isinstance(value, tuple):
            if len(value) != 2 or not _is_read(value[1], self._path, "pattern"):
                raise UnsupportedError(
                    "self_attn.output = (attn_output, attn_weights) changes the output only; "
                    "to change the weights, write self_attn.pattern",
                    where(),
                )
            value = value[0]
        hook = rec.hook(self._path, point)
        read = value._inplace[0] if isinstance(value, Proxy) and value._inplace is not None else None
        if read is not None and not _is_read(read, self._path, point):
            read = None
        ops.write_whole(hook, read, value, rec)

    @property
    def output(self) -> Any:
        """The module's output (a write replaces it)."""
        return self._point("output")

    @output.setter
    def output(self, value: Any) -> None:
        self._write("output", value)

    @property
    def input(self) -> Any:
        """The module's (first) input (a write replaces it)."""
        return self._point("input")

    @input.setter
    def input(self, value: Any) -> None:
        self._write("input", value)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        children = self._children
        if name in children:
            return children[name]
        if name in _EXTRA_POINTS:
            return self._point(name)
        if name in _NOT_HERE:
            raise UnsupportedAttribute(f"{self._path}.{name}: {_NOT_HERE[name]}", where())
        have = ", ".join(list(children) + [p for p in self._points]) or "nothing"
        raise UnsupportedAttribute(
            f"module {self._path or 'model'} has no {name!r} (it has {have})", where()
        )

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXTRA_POINTS:
            self._write(name, value)
        elif name in ("output", "input"):
            object.__setattr__(self, name, value)
        else:
            raise UnsupportedError(
                f"cannot set {self._path}.{name}: only hook points (output, input, q, k, v, pattern, z) can be written",
                where(),
            )

    def __call__(self, *args: Any, hook: bool = False, **kwargs: Any) -> Proxy:
        """Applies the module to a value (its own weights, outside the forward)."""
        if hook:
            raise UnsupportedError(f"{self._path}(..., hook=True)", where())
        if len(args) != 1 or kwargs:
            raise UnsupportedError(
                f"{self._path}(...) takes exactly one value in a graph", where()
            )
        if not self._points:
            raise UnsupportedError(f"{self._path or 'model'} is a container, not a module to apply", where())
        rec = self._recorder()
        return rec.apply(self._path, args[0])

    def __repr__(self) -> str:
        return "\n".join(self._lines(self._path.rsplit(".", 1)[-1] or "model", ""))

    def _lines(self, name: str, indent: str) -> List[str]:
        points = f"  [{', '.join(self._points)}]" if self._points else ""
        out = [f"{indent}({name}): {self._path}{points}" if indent else f"{name}{points}"]
        for key, child in self._children.items():
            out.extend(child._lines(key, indent + "  "))
        return out


class EnvoyList(Envoy):
    """``model.model.layers``: index it, iterate it, take its ``len``."""

    def __init__(self, model: Any, path: str) -> None:
        super().__init__(model, path, ())
        object.__setattr__(self, "_items", [])

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return self._items[i]
        try:
            return self._items[i]
        except IndexError:
            raise IndexError(
                f"{self._path} has {len(self._items)} layers; there is no layer {i}"
            ) from None

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Envoy]:
        return iter(self._items)

    def _lines(self, name: str, indent: str) -> List[str]:
        if not self._items:
            return [f"{indent}({name}): {self._path} []"]
        first = self._items[0]._lines(f"0-{len(self._items) - 1}", indent + "  ")
        return [f"{indent}({name}): {self._path} ({len(self._items)} x)"] + first


def _is_read(x: Any, module: str, point: str) -> bool:
    if not isinstance(x, Proxy) or x._rec.kind != "read":
        return False
    hook = x._rec.body["hook"]
    return (hook["module"], hook["point"]) == (module, point)


def build(model: Any, modules: List[Tuple[str, List[str]]]) -> Envoy:
    """The envoy tree of the manifest's ``modules`` (path, points)."""
    root = Envoy(model, "", ())
    nodes: Dict[str, Envoy] = {"": root}

    def container(path: str) -> Envoy:
        if path in nodes:
            return nodes[path]
        parent, _, name = path.rpartition(".")
        env: Envoy = EnvoyList(model, path) if name == "layers" else Envoy(model, path, ())
        _attach(container(parent), name, env)
        nodes[path] = env
        return env

    for path, points in modules:
        parent, _, name = path.rpartition(".")
        env = Envoy(model, path, tuple(points))
        holder = container(parent)
        _attach(holder, name, env)
        nodes[path] = env
    return root


def _attach(parent: Envoy, name: str, child: Envoy) -> None:
    if isinstance(parent, EnvoyList):
        parent._items.append(child)
    parent._children[name] = child

