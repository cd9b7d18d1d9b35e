//! Chaos: six auto-placed nodes, concurrent clients each running a
//! different generating experiment in a loop, and a killer that SIGKILLs a
//! random node every few seconds and starts a new one. Every request must
//! complete with the single-node result.
//!
//! CI runs it for 60 s with 4 clients; `scripts/chaos.sh [MINUTES]
//! [CLIENTS]` runs it longer (`NNMESH_CHAOS_SECS`, `NNMESH_CHAOS_CLIENTS`)
//! and prints requests completed, failed and retried, fail-overs, and the
//! recovery latency.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use nnmesh_client::mesh::{self, Progress};
use nnmesh_graph::{Graph, Limits};
use nnmesh_runtime::execute;
use nnmesh_tests::{
    local_node::LocalNode,
    mesh::{assert_batched, auto_node, holders_per_block, rt},
};

/// Mean time between kills.
const KILL_EVERY: Duration = Duration::from_secs(6);

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What one client saw.
#[derive(Default)]
struct Tally {
    completed: u32,
    retried: u32,
    failed: Vec<String>,
    failovers: u32,
    /// Durations of steps without a fail-over, and of those with one (from
    /// the previous step's end to the end of the step that failed over).
    steps: Vec<Duration>,
    recoveries: Vec<Duration>,
}

fn percentile(xs: &mut [Duration], p: f64) -> Duration {
    if xs.is_empty() {
        return Duration::ZERO;
    }
    xs.sort();
    xs[((xs.len() - 1) as f64 * p).round() as usize]
}

/// Runs `graph` in a loop until `stop`, checking every result.
fn client_loop(
    name: &str,
    graph: &Graph,
    want: &execute::Outcome,
    nodes: &Mutex<Vec<LocalNode>>,
    stop: &AtomicBool,
) -> Tally {
    let rt = rt();
    let boot = nodes.lock().expect("not poisoned")[0].addr.clone();
    let client = rt
        .block_on(mesh::Client::connect(&[boot]))
        .expect("client connects");
    let mut tally = Tally::default();
    while !stop.load(Ordering::Relaxed) {
        let mut last = Instant::now();
        let mut failed_over = false;
        let (mut steps, mut recoveries) = (Vec::new(), Vec::new());
        let out = rt.block_on(client.run_with(graph.clone(), None, |p| match p {
            Progress::FailedOver { .. } => failed_over = true,
            Progress::Step { .. } => {
                let took = last.elapsed();
                last = Instant::now();
                if std::mem::take(&mut failed_over) {
                    recoveries.push(took);
                } else {
                    steps.push(took);
                }
            }
            _ => {}
        }));
        match out {
            Ok(out) => {
                // Panics (fails the test) on a wrong result.
                assert_batched(name, &out, want);
                tally.completed += 1;
                tally.retried += u32::from(out.failovers > 0);
                tally.failovers += out.failovers;
                tally.steps.extend(steps);
                tally.recoveries.extend(recoveries);
            }
            Err(e) => {
                eprintln!("{name}: FAILED: {e}");
                tally.failed.push(format!("{name}: {e}"));
            }
        }
    }
    tally
}

#[test]
fn every_request_completes_with_the_single_node_result_while_nodes_die() {
    let secs = env("NNMESH_CHAOS_SECS", 60);
    let clients = env("NNMESH_CHAOS_CLIENTS", 4) as usize;
    let first = auto_node(None);
    let boot = first.addr.clone();
    let mut nodes: Vec<LocalNode> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..5).map(|_| s.spawn(|| auto_node(Some(&boot)))).collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("started"))
            .collect()
    });
    nodes.insert(0, first);
    {
        // Wait for two holders per block.
        let rt = rt();
        let client = rt
            .block_on(mesh::Client::connect(&[boot]))
            .expect("client connects");
        let t0 = Instant::now();
        loop {
            let peers = rt.block_on(client.discover()).unwrap_or_default();
            if holders_per_block(&peers).iter().all(|&c| c >= 2) {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(90),
                "never two holders per block"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    // The references, on one thread like the nodes.
    tch::set_num_threads(1);
    let engine = nnmesh_tests::load_engine();
    let graphs = nnmesh_tests::graphs::chaos_set();
    // One per client: tensors move to the client's thread.
    let wants: Vec<execute::Outcome> = (0..clients)
        .map(|i| {
            let g = graphs[i % graphs.len()].1.clone();
            execute::run(&engine, g, &Limits::default()).expect("runs locally")
        })
        .collect();
    drop(engine);

    let nodes = Arc::new(Mutex::new(nodes));
    let stop = AtomicBool::new(false);
    let t0 = Instant::now();
    let (tallies, kills) = std::thread::scope(|s| {
        let runs: Vec<_> = wants
            .into_iter()
            .enumerate()
            .map(|(i, want)| {
                let (name, graph) = &graphs[i % graphs.len()];
                let (nodes, stop) = (&nodes, &stop);
                s.spawn(move || client_loop(name, graph, &want, nodes, stop))
            })
            .collect();
        // The killer: a random node, every KILL_EVERY on average; a new
        // auto-placed node takes its place.
        let mut kills = 0;
        let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
        while t0.elapsed() < Duration::from_secs(secs) {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let jitter = 0.5 + (rng >> 11) as f64 / (1u64 << 53) as f64;
            std::thread::sleep(KILL_EVERY.mul_f64(jitter));
            let (victim, boot) = {
                let mut n = nodes.lock().expect("not poisoned");
                let i = (rng % n.len() as u64) as usize;
                let victim = n.remove(i);
                (victim, n[0].addr.clone())
            };
            drop(victim); // SIGKILL
            kills += 1;
            let fresh = auto_node(Some(&boot));
            nodes.lock().expect("not poisoned").push(fresh);
        }
        stop.store(true, Ordering::Relaxed);
        let tallies: Vec<Tally> = runs
            .into_iter()
            .map(|r| r.join().expect("a client panicked on a wrong result"))
            .collect();
        (tallies, kills)
    });
    let elapsed = t0.elapsed();
    let mut all = Tally::default();
    for t in tallies {
        all.completed += t.completed;
        all.retried += t.retried;
        all.failovers += t.failovers;
        all.failed.extend(t.failed);
        all.steps.extend(t.steps);
        all.recoveries.extend(t.recoveries);
    }
    println!(
        "chaos: {:.0} s, {clients} clients, {kills} nodes killed and replaced\n\
         requests: {} completed ({} after a fail-over), {} failed; {} fail-overs\n\
         step time: p50 {:?}, p99 {:?} ({} steps)\n\
         steps with a fail-over: p50 {:?}, p99 {:?} ({} steps)",
        elapsed.as_secs_f64(),
        all.completed,
        all.retried,
        all.failed.len(),
        all.failovers,
        percentile(&mut all.steps, 0.5),
        percentile(&mut all.steps, 0.99),
        all.steps.len(),
        percentile(&mut all.recoveries, 0.5),
        percentile(&mut all.recoveries, 0.99),
        all.recoveries.len(),
    );
    assert!(all.failed.is_empty(), "failed requests: {:#?}", all.failed);
    assert!(all.completed > 0, "no request completed");
    assert!(kills > 0, "nothing was killed");
}
