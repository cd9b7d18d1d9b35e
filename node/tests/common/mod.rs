//! Helpers shared by the integration tests.

#![allow(dead_code)] // each test binary uses its own subset

use std::path::PathBuf;

use nnmesh_graph::Graph;
use nnmesh_node::engine::Engine;
use tch::{Device, Kind};

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `$NNMESH_MODEL`, or the bundled SmolLM2 that scripts/setup.sh unpacks.
pub fn model_path() -> PathBuf {
    std::env::var_os("NNMESH_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"))
}

/// The full model in f32 on the CPU.
pub fn load_engine() -> Engine {
    Engine::load(&model_path(), None, Kind::Float, Device::Cpu)
        .expect("bundled model loads (run scripts/setup.sh)")
}

/// A graph from `examples/NAME.json`.
pub fn example(name: &str) -> Graph {
    let text = std::fs::read_to_string(root().join("examples").join(format!("{name}.json")))
        .expect("example exists");
    Graph::from_json(&text).expect("example parses")
}
