//! Fail-over with exact replay, against real `nnmesh node` processes and
//! real SIGKILLs: a generation with per-step steering, a relay and per-step
//! saves loses a stage mid-request, and the client carries it across on
//! another holder — with the tokens and saves of an undisturbed run.
//!
//! The client's progress callback fires at precise points (a hop accepted
//! step k, step k finished); the test kills the serving node right there, so
//! every kill point is hit deterministically.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Instant,
};

use libp2p::{Multiaddr, PeerId};
use nnmesh_client::mesh::{self, Progress};
use nnmesh_graph::{Graph, Limits};
use nnmesh_protocol::{Span, message::Hop};
use nnmesh_runtime::execute;
use nnmesh_tests::mesh::{Node, assert_close, assert_same, node, rt};

/// Tokens generated per run.
const NEW_TOKENS: u32 = 8;

fn generation() -> Graph {
    nnmesh_tests::graphs::steered_generation(NEW_TOKENS)
}

/// The nodes of a test mesh, shared with the progress callback that kills them.
#[derive(Clone)]
struct Mesh {
    model: PathBuf,
    nodes: Arc<Mutex<Vec<(Span, Node)>>>,
}

impl Mesh {
    /// Starts one node per span, the later ones bootstrapped to the first.
    fn start(spans: &[&str]) -> Mesh {
        let mesh = Mesh {
            model: nnmesh_tests::model_path(),
            nodes: Arc::default(),
        };
        for s in spans {
            mesh.add(s);
        }
        mesh
    }

    /// Starts a node serving `span` (one torch thread: several share 2 cores).
    fn add(&self, span: &str) -> PeerId {
        let boot: Option<Multiaddr> = self.lock().first().map(|(_, n)| n.addr.clone());
        let n = node(span, boot.as_ref(), &self.model, &["--threads", "1"]);
        let peer = n.peer;
        self.lock().push((span.parse().expect("a span"), n));
        peer
    }

    /// SIGKILLs `peer`'s node and waits for it to be gone; returns its span.
    fn kill(&self, peer: PeerId) -> Span {
        let mut nodes = self.lock();
        let i = nodes
            .iter()
            .position(|(_, n)| n.peer == peer)
            .expect("a live node of the mesh");
        let (span, n) = nodes.remove(i);
        drop(n); // SIGKILL, then wait
        span
    }

    fn addr(&self) -> Multiaddr {
        self.lock().first().expect("a live node").1.addr.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Span, Node)>> {
        self.nodes.lock().expect("not poisoned")
    }
}

/// Where to kill the node serving route hop `hop`.
#[derive(Debug, Clone, Copy)]
enum At {
    /// When it has accepted step `k` (it is computing it: mid-step).
    Accepted(u32),
    /// When step `k` finished on every hop (the next send finds it gone).
    After(u32),
}

/// The undisturbed single-node run, on one thread like the nodes (kernels
/// split across threads round differently).
fn single_node(graph: &Graph) -> execute::Outcome {
    tch::set_num_threads(1);
    let engine = nnmesh_tests::load_engine();
    execute::run(&engine, graph.clone(), &Limits::default()).expect("runs locally")
}

/// Runs `graph` on `mesh`, SIGKILLing the node of `hop` at `at`; returns
/// the outcome, the killed peer and what the client reported.
fn run_with_kill(
    mesh: &Mesh,
    client: &mesh::Client,
    graph: &Graph,
    hop: u32,
    at: At,
) -> (mesh::Outcome, Vec<Progress>) {
    let rt = rt();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut route: Vec<Hop> = Vec::new();
    let mut killed = false;
    let outcome = rt
        .block_on(client.run_with(graph.clone(), None, {
            let (mesh, seen) = (mesh.clone(), seen.clone());
            move |p: &Progress| {
                seen.lock().expect("not poisoned").push(p.clone());
                let fire = match (p, at) {
                    (Progress::Route(r), _) => {
                        route = r.clone();
                        false
                    }
                    (Progress::Accepted { step, stage, .. }, At::Accepted(k)) => {
                        *step == k && stage.hop == hop
                    }
                    (Progress::Step { step, .. }, At::After(k)) => *step == k,
                    _ => false,
                };
                if fire && !killed {
                    killed = true;
                    mesh.kill(route[hop as usize].peer);
                }
            }
        }))
        .expect("the request survives the kill");
    let seen = std::mem::take(&mut *seen.lock().expect("not poisoned"));
    (outcome, seen)
}

/// Every stage position (first, middle, last) and kill points in the
/// prefill and in generation: tokens equal to the undisturbed single-node
/// run, saves bit-identical (the replay runs each step as it first ran, on
/// the same kernels), and the mesh back to two holders per block after each.
#[test]
fn a_killed_stage_is_replaced_mid_generation_with_the_same_results() {
    let mesh = Mesh::start(&["0..10", "10..20", "20..30", "0..10", "10..20", "20..30"]);
    let graph = generation();
    let want = single_node(&graph);
    let rt = rt();
    let client = rt
        .block_on(mesh::Client::connect(&[mesh.addr()]))
        .expect("client connects");
    for (hop, at) in [
        (0, At::Accepted(0)),
        (1, At::Accepted(0)),
        (2, At::Accepted(0)),
        (0, At::After(3)),
        (1, At::Accepted(4)),
        (2, At::Accepted(NEW_TOKENS - 1)),
    ] {
        let name = format!("hop {hop} killed at {at:?}");
        let t0 = Instant::now();
        let (out, seen) = run_with_kill(&mesh, &client, &graph, hop, at);
        assert_eq!(out.failovers, 1, "{name}: one fail-over");
        let replayed = seen.iter().find_map(|p| match p {
            Progress::FailedOver { replay, by, .. } => Some((*replay, by.clone())),
            _ => None,
        });
        let (replay, by) = replayed.expect("a fail-over was reported");
        let step = match at {
            At::Accepted(k) => k,
            At::After(k) => k + 1,
        };
        assert_eq!(
            replay, step,
            "{name}: the replacement replays every earlier step"
        );
        assert_eq!(by.len(), 1, "{name}: a replica takes the whole span");
        assert_eq!(
            assert_same(&name, &out, &want),
            want.saves.len(),
            "{name}: every save bit-identical"
        );
        eprintln!("{name}: recovered, run took {:?}", t0.elapsed());
        // Back to two holders per block for the next kill.
        let span = by[0].span;
        mesh.add(&span.to_string());
    }
    // Redundant execution: every hop on both holders, agreeing.
    let verified = client.clone().with_verify(Some(mesh::Tolerance::default()));
    let t0 = Instant::now();
    let plain = rt.block_on(client.run(graph.clone(), None)).expect("runs");
    let t_plain = t0.elapsed();
    let t0 = Instant::now();
    let checked = rt
        .block_on(verified.run(graph.clone(), None))
        .expect("both holders agree");
    let t_checked = t0.elapsed();
    assert_eq!(assert_same("verified", &checked, &want), want.saves.len());
    assert_eq!(assert_same("plain", &plain, &want), want.saves.len());
    eprintln!("--verify took {t_checked:?} against {t_plain:?} without");
}

/// A second failure in a row, during the replay itself: the replacement is
/// killed as it accepts the replayed prefix, and a third holder (started
/// meanwhile) replays it all.
#[test]
fn a_replacement_killed_during_its_replay_is_replaced_again() {
    let mesh = Mesh::start(&["0..10", "10..20", "20..30", "10..20"]);
    let graph = generation();
    let want = single_node(&graph);
    let rt = rt();
    let client = rt
        .block_on(mesh::Client::connect(&[mesh.addr()]))
        .expect("client connects");
    let mut route: Vec<Hop> = Vec::new();
    let mut kills = 0;
    let out = rt
        .block_on(client.run_with(graph.clone(), None, {
            let mesh = mesh.clone();
            move |p: &Progress| match p {
                Progress::Route(r) => route = r.clone(),
                Progress::Accepted {
                    step: 5,
                    stage,
                    replay: 0,
                    ..
                } if stage.hop == 1 && kills == 0 => {
                    kills += 1;
                    mesh.kill(route[1].peer);
                }
                Progress::Accepted { stage, replay, .. } if *replay > 0 && kills == 1 => {
                    kills += 1;
                    // The last holder of 10..20 dies mid-replay; another joins.
                    mesh.add("10..20");
                    mesh.kill(stage.peer);
                }
                _ => {}
            }
        }))
        .expect("the request survives two failures");
    assert_eq!(out.failovers, 2);
    assert_eq!(
        assert_same("two failures", &out, &want),
        want.saves.len(),
        "bit-identical after two replays"
    );
}

/// A failed stage whose layers no single node holds: two holders that
/// split them (joining while the request runs) take over, the first
/// handing its replayed outputs to the second.
#[test]
fn a_stage_is_replaced_by_a_chain_of_holders() {
    let mesh = Mesh::start(&["0..10", "10..20", "20..30"]);
    let graph = generation();
    let want = single_node(&graph);
    let rt = rt();
    let client = rt
        .block_on(mesh::Client::connect(&[mesh.addr()]))
        .expect("client connects");
    let mut route: Vec<Hop> = Vec::new();
    let mut killed = false;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let out = rt
        .block_on(client.run_with(graph.clone(), None, {
            let (mesh, seen) = (mesh.clone(), seen.clone());
            move |p: &Progress| {
                seen.lock().expect("not poisoned").push(p.clone());
                match p {
                    Progress::Route(r) => route = r.clone(),
                    Progress::Accepted { step: 3, stage, .. } if stage.hop == 1 && !killed => {
                        killed = true;
                        mesh.add("10..14");
                        mesh.add("14..20");
                        mesh.kill(route[1].peer);
                    }
                    _ => {}
                }
            }
        }))
        .expect("the request survives the kill");
    let by = seen
        .lock()
        .expect("not poisoned")
        .iter()
        .find_map(|p| match p {
            Progress::FailedOver { by, .. } => Some(by.clone()),
            _ => None,
        })
        .expect("a fail-over");
    let spans: Vec<Span> = by.iter().map(|h| h.span).collect();
    assert_eq!(spans, [Span::new(10, 14), Span::new(14, 20)]);
    assert_eq!(out.route.len(), 4);
    // Layers 10..14 hold no intervention, so their replay of the generated
    // tokens runs as one forward: within the runtime's tolerance for
    // another kernel path (as `generated_tokens_replay_in_one_forward`),
    // not bit for bit.
    let (identical, worst) = assert_close("chain", &out, &want, 2e-4, 1e-5);
    eprintln!(
        "chain: {identical} of {} saves bit-identical; largest difference {worst:e}",
        want.saves.len()
    );
}

/// No holder left for a block: a clear error naming it, after bounded
/// retries, and no hang.
#[test]
fn no_holder_left_fails_naming_the_layers() {
    let mesh = Mesh::start(&["0..10", "10..20", "20..30"]);
    let rt = rt();
    let client = rt
        .block_on(mesh::Client::connect(&[mesh.addr()]))
        .expect("client connects");
    let mut route: Vec<Hop> = Vec::new();
    let t0 = Instant::now();
    let mut killed = false;
    let e = rt
        .block_on(client.run_with(generation(), None, {
            let mesh = mesh.clone();
            move |p: &Progress| match p {
                Progress::Route(r) => route = r.clone(),
                Progress::Step { step: 2, .. } if !killed => {
                    killed = true;
                    mesh.kill(route[2].peer);
                }
                _ => {}
            }
        }))
        .expect_err("layers 20..30 are gone");
    let took = t0.elapsed();
    assert!(matches!(e, mesh::Error::GaveUp { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("layers 20..30") && msg.contains("no live holder"),
        "{msg}"
    );
    eprintln!("gave up after {took:?}: {msg}");
}

/// A hop with nothing to do at the generated tokens replays them in one
/// forward: the same tokens as an undisturbed run, and values within
/// rounding of it (printed).
#[test]
fn generated_tokens_replay_in_one_forward() {
    let graph = {
        use nnmesh_graph::{Builder, IndexItem::*, Point};
        let g = Builder::new();
        let t = g
            .trace_tokens(vec![vec![504, 414, 46682, 314, 253], vec![1, 2, 3]])
            .generate(16);
        // Hop 1 (layers 10..20) works at step 0 only.
        g.save(
            "l15",
            g.read(t.at("model.layers.15", Point::Output).step(0)),
        );
        g.save(
            "top",
            g.read(t.at("lm_head", Point::Output).all_steps())
                .index([Full, At(-1), Full])
                .argmax(-1, false),
        );
        g.save(
            "l27",
            g.read(t.at("model.layers.27", Point::Output).step(15)),
        );
        g.finish()
    };
    let want = single_node(&graph);
    let mesh = Mesh::start(&["0..10", "10..20", "20..30", "10..20"]);
    let rt = rt();
    let client = rt
        .block_on(mesh::Client::connect(&[mesh.addr()]))
        .expect("client connects");
    let (out, _) = run_with_kill(&mesh, &client, &graph, 1, At::Accepted(12));
    assert_eq!(out.failovers, 1);
    assert_eq!(out.generated, want.generated, "the same tokens");
    // The runtime's tolerance for logits against another kernel path.
    let (identical, worst) = assert_close("replayed in one forward", &out, &want, 2e-4, 1e-5);
    eprintln!(
        "{identical} of {} saves bit-identical after replaying 12 steps (11 in one forward); largest difference {worst:e}",
        want.saves.len()
    );
}
