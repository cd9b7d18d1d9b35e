//! Graphs: decode and re-encode, hash, validate with shape inference, and
//! the model's module tree, for the Python builder.

use nnmesh_graph::{Graph, Inputs, Limits, Manifest, NodeId, recipes};
use pyo3::prelude::*;

use crate::error::{GraphError, invalid, undecodable};

/// Parses a graph's JSON (checking its structure: unknown fields, bad ops
/// and indices are errors) and writes it back in the canonical, pretty JSON
/// form that `nnmesh graph` prints.
///
/// # Errors
/// A [`GraphError`] when the JSON is not a graph.
#[pyfunction]
pub(crate) fn canonical_json(json: &str) -> PyResult<String> {
    Ok(decode(json)?.to_json())
}

/// The graph's content hash (blake3 of its canonical postcard encoding), in hex.
///
/// # Errors
/// A [`GraphError`] when the JSON is not a graph.
#[pyfunction]
pub(crate) fn content_hash(json: &str) -> PyResult<String> {
    Ok(decode(json)?.content_hash().to_string())
}

pub(crate) fn decode(json: &str) -> PyResult<Graph> {
    Graph::from_json(json).map_err(|e| undecodable(&e))
}

pub(crate) fn manifest(json: &str) -> PyResult<Manifest> {
    serde_json::from_str(json)
        .map_err(|e| GraphError::new_err((format!("bad manifest: {e}"), None::<u32>, None::<u32>)))
}

/// A validated graph: each node's inferred shape and dtype.
#[pyclass(frozen, module = "nnmesh._nnmesh")]
#[derive(Debug)]
pub(crate) struct Plan {
    plan: nnmesh_graph::Plan,
}

#[pymethods]
impl Plan {
    /// Number of nodes.
    fn __len__(&self) -> usize {
        self.plan.nodes.len()
    }

    /// `(shape, dtype)` of node `node`'s value at generation step `step`
    /// (its first step when `None`), or `None` when the node does not run
    /// at that step. Write and Save nodes give their value's meta.
    #[pyo3(signature = (node, step=None))]
    fn meta(&self, node: u32, step: Option<u32>) -> Option<(Vec<u64>, &'static str)> {
        let id = NodeId(node);
        let meta = match step {
            None => &self.plan.nodes.get(id.index())?.meta,
            Some(s) => self.plan.meta_at(id, s)?,
        };
        Some((meta.shape.clone(), meta.dtype.name()))
    }

    /// For a node that runs at several generation steps, `(trace, start,
    /// end)` of those steps; `None` for a node that runs once.
    fn per_step(&self, node: u32) -> Option<(u32, u32, u32)> {
        let s = self.plan.nodes.get(node as usize)?.per_step?;
        Some((s.trace, s.start, s.end))
    }

    /// Number of forward steps of each trace.
    #[getter]
    fn steps(&self) -> Vec<u32> {
        self.plan.steps.clone()
    }
}

/// Validates a graph against a model's manifest (JSON) with the default
/// request limits, given the token count of every invoke of every trace.
///
/// # Errors
/// A [`GraphError`] `(message, node, trace)` naming the first problem.
#[pyfunction]
pub(crate) fn plan(json: &str, manifest_json: &str, tokens: Vec<Vec<u32>>) -> PyResult<Plan> {
    let graph = decode(json)?;
    let manifest = manifest(manifest_json)?;
    let inputs = Inputs { traces: tokens };
    let plan = nnmesh_graph::validate(&graph, &manifest, &inputs, &Limits::default())
        .map_err(|e| invalid(&e))?;
    Ok(Plan { plan })
}

/// The model's modules in forward order, each with its hook points:
/// `[("model.embed_tokens", ["input", "output"]), ...]`.
///
/// # Errors
/// A [`GraphError`] when the manifest does not parse.
#[pyfunction]
pub(crate) fn modules(manifest_json: &str) -> PyResult<Vec<(String, Vec<&'static str>)>> {
    let m = manifest(manifest_json)?;
    Ok(m.modules()
        .into_iter()
        .map(|module| {
            let points = m.points(module).iter().map(|p| p.name()).collect();
            (module.path(), points)
        })
        .collect())
}

/// A built-in experiment (`graph::recipes::example`, what `nnmesh graph
/// NAME` prints) as canonical JSON, or `None` for an unknown name.
#[pyfunction]
#[pyo3(signature = (name, layers=30))]
pub(crate) fn example(name: &str, layers: u32) -> Option<String> {
    recipes::example(name, layers).map(|g| g.to_json())
}
