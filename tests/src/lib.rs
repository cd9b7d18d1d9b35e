//! The end-to-end test harness of nnmesh: real `nnmesh node` processes on
//! loopback (port 0), clients on the same machine, and comparisons with the
//! single-node results. The tests themselves are in `tests/tests/`:
//!
//! - `mesh.rs`: the canonical experiments through a 3-node mesh, replicas,
//!   foreign weights, a dead stage;
//! - `hostile.rs`: hostile input, limits, a SIGKILLed stage, private meshes;
//! - `fuzz.rs`: the fuzz harness (`scripts/fuzz.sh` runs it longer);
//! - `failover.rs`: stages SIGKILLed mid-generation, replaced with exact
//!   replay; no holder left;
//! - `placement.rs`: auto-placed nodes, two holders per block, healing;
//! - `chaos.rs`: clients running while nodes are killed and restarted
//!   (`scripts/chaos.sh` runs it longer).
//!
//! The tests run the `nnmesh` binary of the same build (found beside the
//! test executable, or at `$NNMESH_BIN`) and the bundled model
//! (`$NNMESH_MODEL`, or `models/` of the repository).

pub mod graphs;
pub mod local_node;
pub mod mesh;

use std::path::PathBuf;

use nnmesh_graph::Graph;
use nnmesh_runtime::engine::Engine;
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

/// The `nnmesh` binary: `$NNMESH_BIN`, or the one of this build
/// (`target/<profile>/nnmesh`, beside the `deps/` folder of the test).
///
/// # Panics
/// When it does not exist: build the workspace first (`scripts/test.sh` does).
pub fn nnmesh_exe() -> PathBuf {
    if let Some(p) = std::env::var_os("NNMESH_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("the test knows its path");
    let profile = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("tests run from target/<profile>/deps");
    let bin = profile.join("nnmesh");
    assert!(
        bin.exists(),
        "{} does not exist: build the workspace first (cargo build --workspace)",
        bin.display()
    );
    bin
}

/// The full bundled model in f32 on the CPU, computing on one torch thread
/// (set for the calling thread).
///
/// # Panics
/// When the model cannot be loaded (run scripts/setup.sh).
pub fn load_engine() -> Engine {
    // One torch thread on the calling thread, like the test nodes: kernels
    // split across threads round differently.
    tch::set_num_threads(1);
    Engine::load(&model_path(), None, Kind::Float, Device::Cpu)
        .expect("bundled model loads (run scripts/setup.sh)")
}

/// A graph from `examples/NAME.json`.
///
/// # Panics
/// When the file is missing or invalid.
pub fn example(name: &str) -> Graph {
    let text = std::fs::read_to_string(root().join("examples").join(format!("{name}.json")))
        .expect("example exists");
    Graph::from_json(&text).expect("example parses")
}
