//! Resilience on a loopback mesh with two holders per block (six node
//! processes, one torch thread each): how long a request takes to recover
//! from a SIGKILLed stage as a function of its prefix, generation with
//! replay against restarting from scratch under injected hop failures
//! (Petals' Table 1 setting), what the client's history costs, and what
//! redundant execution costs.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use libp2p::Multiaddr;
use nnmesh_client::{
    failover,
    mesh::{self, Progress},
};
use nnmesh_graph::{Builder, Graph};
use nnmesh_protocol::message::Hop;
use nnmesh_runtime::engine::Engine;

use super::{LocalNodes, median, prompt_ids};
use crate::cli::BenchArgs;

const SPANS: [&str; 6] = ["0..10", "10..20", "20..30", "0..10", "10..20", "20..30"];

/// A plain generation: `new` tokens after `prompt`.
fn generation(prompt: &[u32], new: u32) -> Graph {
    let g = Builder::new();
    g.trace_tokens(vec![prompt.to_vec()]).generate(new);
    g.finish()
}

/// Starts the six nodes with `extra` flags.
fn six(model: &std::path::Path, extra: &[&str]) -> Result<(LocalNodes, Multiaddr)> {
    let mut nodes = LocalNodes::default();
    let mut flags = vec!["--threads", "1"];
    flags.extend(extra);
    let first = nodes.start(model, SPANS[0], None, &flags)?;
    for s in &SPANS[1..] {
        nodes.start(model, s, Some(&first), &flags)?;
    }
    Ok((nodes, first))
}

fn percentile(mut xs: Vec<f64>, p: f64) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[((xs.len() - 1) as f64 * p).round() as usize]
}

/// Measures and prints the tables.
///
/// # Errors
/// When the nodes do not start or a run fails.
pub(super) fn run(args: &BenchArgs, engine: &Engine) -> Result<()> {
    let model = args.model.path()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let runs = args.runs.max(2);

    // Recovery latency against the prefix, and the cost of verification.
    eprintln!("resilience: six nodes, two holders per block ...");
    let (nodes, first) = six(&model, &[])?;
    let nodes = Mutex::new(nodes);
    let client = rt.block_on(mesh::Client::connect(std::slice::from_ref(&first)))?;
    let mut recovery = Vec::new();
    for prefix in [128, 1024] {
        let graph = generation(&prompt_ids(engine, prefix)?, 6);
        let undisturbed = rt.block_on(client.run(graph.clone(), None))?;
        let hops = undisturbed.route.len() as f64;
        let history = undisturbed.history_bytes as f64 / (prefix as f64 + 5.0) / hops;
        let mut steps = Vec::new();
        let mut lat = Vec::new();
        for r in 0..runs {
            eprintln!("resilience: prefix {prefix}, kill {}/{runs} ...", r + 1);
            let mut route: Vec<Hop> = Vec::new();
            let mut killed: Option<Instant> = None;
            let mut last = Instant::now();
            let mut recovered = None;
            let out = rt.block_on(client.run_with(graph.clone(), None, |p| match p {
                Progress::Route(r) => route = r.clone(),
                Progress::Step { step, .. } => {
                    if let Some(k) = killed
                        && recovered.is_none()
                    {
                        recovered = Some(k.elapsed().as_secs_f64());
                    } else if *step > 0 {
                        steps.push(last.elapsed().as_secs_f64());
                    }
                    last = Instant::now();
                    if *step == 2 && killed.is_none() {
                        let victim = route[1].peer;
                        killed = Some(Instant::now());
                        let _ = nodes.lock().expect("not poisoned").kill(victim);
                    }
                }
                _ => {}
            }))?;
            if out.failovers != 1 {
                bail!("expected one fail-over, saw {}", out.failovers);
            }
            lat.extend(recovered);
            let mut n = nodes.lock().expect("not poisoned");
            let boot = n.any();
            n.start(&model, "10..20", boot.as_ref(), &["--threads", "1"])?;
        }
        recovery.push((prefix, median(steps), lat, history));
    }
    let graph = generation(&prompt_ids(engine, 128)?, 16);
    let verified = client.clone().with_verify(Some(mesh::Tolerance::default()));
    let (mut plain, mut checked) = (Vec::new(), Vec::new());
    rt.block_on(verified.run(graph.clone(), None))?;
    for _ in 0..runs {
        let t0 = Instant::now();
        rt.block_on(client.run(graph.clone(), None))?;
        plain.push(t0.elapsed().as_secs_f64());
        let t0 = Instant::now();
        rt.block_on(verified.run(graph.clone(), None))?;
        checked.push(t0.elapsed().as_secs_f64());
    }
    drop(nodes);

    // Replay against restart under injected hop failures.
    let tokens = args.resilience_tokens;
    let budget = Duration::from_secs(args.restart_budget_secs);
    let prompt = prompt_ids(engine, 16)?;
    let graph = generation(&prompt, tokens);
    let mut faults = Vec::new();
    for p in [1e-3, 1e-2] {
        eprintln!("resilience: {tokens} tokens with hop failures at p = {p}, replay ...");
        let p_flag = p.to_string();
        let (nodes, first) = six(&model, &["--inject-faults", &p_flag])?;
        // The default limits: failures are counted in a row, without
        // progress, so a long generation under a steady rate goes on.
        let replaying = rt.block_on(mesh::Client::connect(std::slice::from_ref(&first)))?;
        let t0 = Instant::now();
        let out = rt.block_on(replaying.run(graph.clone(), None))?;
        let replay = (tokens as f64 / t0.elapsed().as_secs_f64(), out.failovers);
        eprintln!(
            "resilience: the same, restarting from scratch on a failure (up to {budget:?}) ..."
        );
        let restarting = rt
            .block_on(mesh::Client::connect(std::slice::from_ref(&first)))?
            .with_failover(failover::Config {
                max_failures: 0,
                ..failover::Config::default()
            });
        let t0 = Instant::now();
        let mut attempts = 0;
        let restart = loop {
            attempts += 1;
            match rt.block_on(restarting.run(graph.clone(), None)) {
                Ok(_) => break Some(tokens as f64 / t0.elapsed().as_secs_f64()),
                Err(mesh::Error::GaveUp { .. }) if t0.elapsed() < budget => {}
                Err(mesh::Error::GaveUp { .. }) => break None,
                Err(e) => return Err(e.into()),
            }
        };
        faults.push((p, replay, restart, attempts, t0.elapsed()));
        drop(nodes);
    }

    println!(
        "\nResilience on loopback: six node processes (two holders per block, one torch thread each), {runs} kills per row\n"
    );
    println!(
        "{:<22} {:>12} {:>18} {:>18} {:>20}",
        "prefix (tokens)", "step p50", "recovery p50", "recovery p99", "history/token/hop"
    );
    for (prefix, step, lat, history) in &recovery {
        println!(
            "{prefix:<22} {:>12} {:>18} {:>18} {:>20}",
            format!("{:.0} ms", step * 1e3),
            format!("{:.0} ms", percentile(lat.clone(), 0.5) * 1e3),
            format!("{:.0} ms", percentile(lat.clone(), 0.99) * 1e3),
            format!("{history:.0} bytes"),
        );
    }
    println!(
        "(recovery: from the SIGKILL of the middle stage after step 2 to the next token delivered; \
         it includes noticing, finding the other holder and replaying the prefix)"
    );
    let (plain, checked) = (median(plain), median(checked));
    println!(
        "\n--verify (every hop on both holders, compared): {:.0} ms against {:.0} ms for 16 tokens, {:.2}x; \
         replication at R=2 holds every layer twice",
        checked * 1e3,
        plain * 1e3,
        checked / plain
    );
    println!(
        "\nGeneration of {tokens} tokens with injected hop failures (--inject-faults): replay vs restart\n"
    );
    println!(
        "{:<10} {:>16} {:>12} {:>24} {:>10}",
        "p per hop", "replay steps/s", "fail-overs", "restart steps/s", "ratio"
    );
    for (p, (replay, failovers), restart, attempts, took) in &faults {
        let (r, ratio) = match restart {
            Some(r) => (
                format!("{r:.2} ({attempts} tries)"),
                format!("{:.1}x", replay / r),
            ),
            None => (
                format!(
                    "unfinished in {:.0} s ({attempts} tries)",
                    took.as_secs_f64()
                ),
                "-".into(),
            ),
        };
        println!("{p:<10} {replay:>16.2} {failovers:>12} {r:>24} {ratio:>10}");
    }
    println!(
        "(Petals, BLOOM-7.1B on 4 GPUs: 7.76 vs 0.48 steps/s at p = 1e-3, 2.17 vs unfinished in an hour at 1e-2)"
    );
    Ok(())
}
