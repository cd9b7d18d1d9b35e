//! Mesh helpers: `nnmesh node` processes on loopback and comparisons of
//! mesh results with single-node results.

use std::path::Path;

use libp2p::Multiaddr;
use nnmesh_client::{
    mesh,
    transport::{self, RequestError},
};
use nnmesh_protocol::{codec, message::Response};
use nnmesh_runtime::{execute, wire::from_wire};
use tch::{Device, Kind};

/// A node process, killed when dropped.
pub type Node = crate::local_node::LocalNode;

/// Starts `nnmesh node --blocks BLOCKS` with `extra` flags.
pub fn node(blocks: &str, bootstrap: Option<&Multiaddr>, model: &Path, extra: &[&str]) -> Node {
    Node::start(model, blocks, bootstrap, extra).expect("node starts")
}

/// Starts the README's mesh: 0..10, 10..20, 20..30.
pub fn three_nodes(model: &Path) -> Vec<Node> {
    Node::three(model).expect("nodes start")
}

/// A tokio runtime for the client side of a test. With `RUST_LOG` set, the client's logs
/// go to the test's output (the nodes' go to their own stderr).
pub fn rt() -> tokio::runtime::Runtime {
    if std::env::var_os("RUST_LOG").is_some() {
        // Fails harmlessly when a subscriber is already set.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Asserts a mesh outcome equals the single-node outcome; returns how many
/// saved values were bit-identical.
pub fn assert_same(name: &str, mesh: &mesh::Outcome, local: &execute::Outcome) -> usize {
    assert_eq!(mesh.generated, local.generated, "{name}: generated tokens");
    assert_eq!(
        mesh.saves.len(),
        local.saves.len(),
        "{name}: number of saves"
    );
    let mut identical = 0;
    for s in &local.saves {
        let m = mesh
            .saves
            .iter()
            .find(|m| m.name == s.name && m.step == s.step)
            .unwrap_or_else(|| panic!("{name}: {} missing from the mesh result", s.key()));
        let mt = from_wire(&m.value, Device::Cpu).expect("decodes");
        assert_eq!(mt.size(), s.value.size(), "{name}: {} shape", s.key());
        if mt.equal(&s.value) {
            identical += 1;
        } else {
            // Same machine, same kernels: the mesh is expected to be bit for
            // bit equal (the callers assert how many were); this bound only
            // tells a rounding difference from a wrong value.
            let d = (mt.to_kind(Kind::Double) - s.value.to_kind(Kind::Double))
                .abs()
                .max()
                .double_value(&[]);
            assert!(d < 1e-5, "{name}: {} differs by {d}", s.key());
        }
    }
    identical
}

/// Asserts a mesh outcome equals the single-node outcome within
/// `|mesh - local| <= atol + rtol · |local|` element-wise (tokens exactly);
/// returns how many saved values were bit-identical and the largest
/// absolute difference.
pub fn assert_close(
    name: &str,
    mesh: &mesh::Outcome,
    local: &execute::Outcome,
    atol: f64,
    rtol: f64,
) -> (usize, f64) {
    assert_eq!(mesh.generated, local.generated, "{name}: generated tokens");
    assert_eq!(
        mesh.saves.len(),
        local.saves.len(),
        "{name}: number of saves"
    );
    let (mut identical, mut worst) = (0, 0f64);
    for s in &local.saves {
        let m = mesh
            .saves
            .iter()
            .find(|m| m.name == s.name && m.step == s.step)
            .unwrap_or_else(|| panic!("{name}: {} missing from the mesh result", s.key()));
        let mt = from_wire(&m.value, Device::Cpu).expect("decodes");
        assert_eq!(mt.size(), s.value.size(), "{name}: {} shape", s.key());
        if mt.equal(&s.value) {
            identical += 1;
            continue;
        }
        let (a, b) = (mt.to_kind(Kind::Double), s.value.to_kind(Kind::Double));
        let diff = (&a - &b).abs();
        worst = worst.max(diff.max().double_value(&[]));
        let excess = (diff - (b.abs() * rtol + atol)).max().double_value(&[]);
        assert!(
            excess <= 0.0,
            "{name}: {} beyond atol {atol} + rtol {rtol} by {excess}",
            s.key()
        );
    }
    (identical, worst)
}

/// Sends raw bytes to a node and decodes its answer.
pub async fn raw(
    t: &transport::Endpoint,
    node: &Node,
    bytes: Vec<u8>,
) -> Result<Response, RequestError> {
    let answer = t.request(node.peer, vec![node.addr.clone()], bytes).await?;
    Ok(codec::decode(&answer).expect("nodes answer with a Response"))
}
