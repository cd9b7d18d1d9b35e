"""Exceptions of nnmesh's Python client.

Errors about the code inside a ``with model.trace(...)`` block name the file
and line of the user's code that caused them (``filename``, ``lineno``
attributes, and the message starts with ``file:line:``).
"""

from __future__ import annotations

import linecache
from typing import Optional, Tuple

from . import _nnmesh

__all__ = ["NNMeshError", "UnsupportedError", "GraphError", "MeshError", "RunError"]

#: (filename, line number) of a line of user code.
Where = Tuple[str, int]


def _located(message: str, where: Optional[Where]) -> str:
    if where is None:
        return message
    filename, lineno = where
    text = linecache.getline(filename, lineno).strip()
    head = f"{filename}:{lineno}: {message}"
    return f"{head}\n    {text}" if text else head


class NNMeshError(Exception):
    """Base class of the errors nnmesh's Python client raises itself."""

    filename: Optional[str]
    lineno: Optional[int]

    def __init__(self, message: str, where: Optional[Where] = None) -> None:
        super().__init__(_located(message, where))
        self.detail = message
        self.filename, self.lineno = where if where is not None else (None, None)


class UnsupportedError(NNMeshError):
    """An operation inside a trace that the Intervention Graph cannot express
    (its op list is closed, and it has no Python control flow); raised when
    the line runs, naming the operation."""


class UnsupportedAttribute(UnsupportedError, AttributeError):
    """An attribute of a traced value or module that nnmesh does not have."""


class GraphError(NNMeshError, ValueError):
    """The graph built by a trace failed validation (a shape that does not
    fit, a write that depends on a later hook, an unknown module, ...); names
    the line that built the offending node.

    ``node`` is the node's index in the finished graph (as ``tracer.graph``
    shows it), or ``None``.
    """

    def __init__(self, message: str, where: Optional[Where] = None, node: Optional[int] = None):
        super().__init__(message, where)
        self.node = node


class MeshError(NNMeshError, RuntimeError):
    """The mesh could not be reached, or a request through it failed."""


class RunError(NNMeshError, RuntimeError):
    """The model could not be loaded, or the graph failed while running."""


def from_native(e: BaseException) -> BaseException:
    """Turns an exception of the native module into the client's own class
    (a ``GraphError`` without a line yet; the tracer adds it)."""
    if isinstance(e, _nnmesh.GraphError):
        message, node = e.args[0], e.args[1] if len(e.args) > 1 else None
        return GraphError(message, None, node)
    if isinstance(e, _nnmesh.MeshError):
        return MeshError(str(e))
    if isinstance(e, _nnmesh.RunError):
        return RunError(str(e))
    return e
