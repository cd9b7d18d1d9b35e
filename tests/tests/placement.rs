//! Automatic placement on real processes: six `nnmesh node`s without
//! `--blocks`, started together, place themselves so that every block of
//! SmolLM2 has two holders; when both holders of some layers are SIGKILLed,
//! the survivors move to cover them again.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use nnmesh_client::mesh;
use nnmesh_graph::Limits;
use nnmesh_protocol::Span;
use nnmesh_runtime::execute;
use nnmesh_tests::{
    local_node::LocalNode,
    mesh::{assert_same, auto_node, holders_per_block, rt},
};

/// Holders per block of the mesh, as its records say.
fn coverage(client: &mesh::Client) -> (Vec<u32>, BTreeMap<String, Span>) {
    let rt = rt();
    let peers = rt.block_on(client.discover()).unwrap_or_default();
    let spans = peers
        .iter()
        .map(|p| (p.peer.to_string(), p.record.span))
        .collect();
    (holders_per_block(&peers), spans)
}

/// Polls until `ok` holds of the coverage, up to `within`; returns how long it took.
fn wait_for(
    client: &mesh::Client,
    within: Duration,
    what: &str,
    ok: impl Fn(&[u32]) -> bool,
) -> Duration {
    let t0 = Instant::now();
    loop {
        let (counts, spans) = coverage(client);
        if ok(&counts) {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < within,
            "not {what} within {within:?}: holders per block {counts:?}, spans {spans:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn six_auto_placed_nodes_keep_two_holders_per_block_and_heal() {
    let first = auto_node(None);
    let boot = first.addr.clone();
    // The other five start at once: they see the same mesh and may pick
    // the same layers, then rebalance.
    let others: Vec<LocalNode> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..5).map(|_| s.spawn(|| auto_node(Some(&boot)))).collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("started"))
            .collect()
    });
    let mut nodes = vec![first];
    nodes.extend(others);
    let rt = rt();
    let client = rt
        .block_on(mesh::Client::connect(std::slice::from_ref(&boot)))
        .expect("client connects");
    let took = wait_for(
        &client,
        Duration::from_secs(90),
        "two holders per block",
        |c| c.iter().all(|&h| h == 2),
    );
    eprintln!("two holders per block {took:?} after the last node served");

    // The mesh gives the single-node result.
    tch::set_num_threads(1);
    let engine = nnmesh_tests::load_engine();
    let lens = nnmesh_tests::example("lens");
    let want = execute::run(&engine, lens.clone(), &Limits::default()).expect("runs locally");
    let got = rt.block_on(client.run(lens.clone(), None)).expect("runs");
    assert_eq!(assert_same("auto-placed", &got, &want), want.saves.len());

    // SIGKILL both holders of the last layers (not the client's bootstrap).
    let (_, spans) = coverage(&client);
    let last = spans[&nodes[0].peer.to_string()];
    let victim = if last == Span::new(20, 30) {
        Span::new(10, 20)
    } else {
        Span::new(20, 30)
    };
    let t0 = Instant::now();
    nodes.retain(|n| spans.get(&n.peer.to_string()) != Some(&victim));
    assert_eq!(nodes.len(), 4, "two holders of {victim} were killed");
    let took = wait_for(&client, Duration::from_secs(30), "covered again", |c| {
        c.iter().all(|&h| h >= 1)
    });
    eprintln!(
        "layers {victim} lost both holders; covered again after {took:?} ({:?} since the kill)",
        t0.elapsed()
    );
    let got = rt
        .block_on(client.run(lens, None))
        .expect("runs after healing");
    assert_eq!(assert_same("healed", &got, &want), want.saves.len());
}
