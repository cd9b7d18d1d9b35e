//! `nnmesh._nnmesh`: the small native half of nnmesh's Python package.
//!
//! The NNsight-style surface (`LanguageModel`, `with model.trace(...)`,
//! proxies) is pure Python in `python/nnmesh/`; it builds an Intervention
//! Graph as JSON and calls into this module to
//! - decode, check and re-encode a graph (`canonical_json`,
//!   `content_hash`), validate it against a model and infer every node's
//!   shape (`plan`), list the model's modules (`modules`);
//! - run it: on a model loaded in this process (`Local`, on the same
//!   libtorch as the `torch` package beside it), or on a mesh (`Mesh`, a
//!   libp2p client on a tokio runtime that the object owns);
//! - tokenize (`Tokenizer`).
//!
//! Runs release the interpreter while they wait and stay interruptible with
//! Ctrl-C. Saved tensors come back as raw little-endian bytes with dtype and
//! shape; the Python side views them as `torch` tensors.
//!
//! `scripts/setup.sh` builds and installs the module (maturin); its tests
//! are the pytest suite in `client/python/tests`. The Python API it serves
//! is typed in `python/nnmesh/_nnmesh.pyi`.

use pyo3::prelude::*;

mod error;
mod graph;
mod local;
mod mesh;
mod outcome;
mod tokenizer;
mod wait;

/// The extension module `nnmesh._nnmesh`.
#[pymodule]
fn _nnmesh(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("GraphError", py.get_type::<error::GraphError>())?;
    m.add("MeshError", py.get_type::<error::MeshError>())?;
    m.add("RunError", py.get_type::<error::RunError>())?;
    m.add("FORMAT_VERSION", nnmesh_graph::FORMAT_VERSION)?;
    m.add_function(wrap_pyfunction!(graph::canonical_json, m)?)?;
    m.add_function(wrap_pyfunction!(graph::content_hash, m)?)?;
    m.add_function(wrap_pyfunction!(graph::plan, m)?)?;
    m.add_function(wrap_pyfunction!(graph::modules, m)?)?;
    m.add_function(wrap_pyfunction!(graph::example, m)?)?;
    m.add_class::<graph::Plan>()?;
    m.add_class::<local::Local>()?;
    m.add_class::<mesh::Mesh>()?;
    m.add_class::<tokenizer::Tokenizer>()?;
    Ok(())
}
