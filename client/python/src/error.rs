//! The exceptions the module raises, and conversions from the Rust errors.
//!
//! A [`GraphError`] carries `(message, node, trace)`: the node (or trace) the
//! graph's validation names, so the Python side can point at the line of
//! code that built it.

use nnmesh_graph::{DecodeError, ValidateError};
use pyo3::{
    PyErr, create_exception,
    exceptions::{PyRuntimeError, PyValueError},
};

create_exception!(
    _nnmesh,
    GraphError,
    PyValueError,
    "A graph that does not decode or does not validate; args are (message, node, trace)."
);
create_exception!(
    _nnmesh,
    MeshError,
    PyRuntimeError,
    "The mesh could not be reached, or a request through it failed."
);
create_exception!(
    _nnmesh,
    RunError,
    PyRuntimeError,
    "A model could not be loaded, or a graph failed while running on it."
);

/// A validation error as a [`GraphError`] naming its node or trace.
pub(crate) fn invalid(e: &ValidateError) -> PyErr {
    GraphError::new_err((e.to_string(), e.node().map(|n| n.0), e.trace()))
}

/// A graph that does not decode, as a [`GraphError`].
pub(crate) fn undecodable(e: &DecodeError) -> PyErr {
    GraphError::new_err((e.to_string(), None::<u32>, None::<u32>))
}
