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

/// Starts an auto-placed `nnmesh node` (no `--blocks`) on SmolLM2 that
/// holds ten layers in f32 (13.5 MiB each) beside the embedding (108 MiB)
/// and a 16 MiB KV cache, with one torch thread, and rebalances every ~3 s
/// after a 10 s dwell: six of them hold every layer twice.
pub fn auto_node(bootstrap: Option<&Multiaddr>) -> Node {
    const AUTO: &[&str] = &[
        "--max-memory",
        "265",
        "--kv-cache-mib",
        "16",
        "--threads",
        "1",
        "--rebalance-secs",
        "3",
        "--min-dwell-secs",
        "10",
    ];
    Node::start_auto(&crate::model_path(), bootstrap, AUTO).expect("node starts")
}

/// Holders per block of SmolLM2's 30 layers among `peers`' records.
pub fn holders_per_block(peers: &[mesh::Peer]) -> Vec<u32> {
    let holders: Vec<_> = peers.iter().map(mesh::holder).collect();
    nnmesh_control::placement::holders_per_block(&holders, 30)
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
    // Same machine, same kernels: the mesh is expected to be bit for bit
    // equal (the callers assert how many were); this bound only tells a
    // rounding difference from a wrong value.
    assert_close(name, mesh, local, 1e-5, 0.0).0
}

/// Asserts the outcome of a request that may have shared its forwards with
/// other requests' (a stage batches concurrent steps) equals the
/// single-node outcome: tokens exactly, values within the rounding of a
/// matrix product over more rows. That rounding scales with the values a
/// row carries, not with each element: measured, at most 3.1e-6 of a save's
/// largest value (`runtime/tests/packed.rs`), so an element near zero in a
/// residual stream of hundreds may move by 1e-3. The bound is `2e-4 +
/// 5e-4·|local| + 2e-5·max|local|`. Returns how many saved values were
/// bit-identical.
pub fn assert_batched(name: &str, mesh: &mesh::Outcome, local: &execute::Outcome) -> usize {
    assert_close_scaled(name, mesh, local, (2e-4, 5e-4, 2e-5)).0
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
    assert_close_scaled(name, mesh, local, (atol, rtol, 0.0))
}

/// As [`assert_close`], within `atol + rtol · |local| + scale · max|local|`
/// (the largest element of each saved value).
pub fn assert_close_scaled(
    name: &str,
    mesh: &mesh::Outcome,
    local: &execute::Outcome,
    (atol, rtol, scale): (f64, f64, f64),
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
        let largest = b.abs().max().double_value(&[]);
        let excess = (diff - (b.abs() * rtol + atol + scale * largest))
            .max()
            .double_value(&[]);
        assert!(
            excess <= 0.0,
            "{name}: {} beyond atol {atol} + rtol {rtol} + {scale} x {largest} by {excess}",
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
