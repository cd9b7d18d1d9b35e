//! Many clients at once: N = 1, 4, 16 concurrent clients, each generating
//! tokens with a steering write and a per-step save, through a 3-node
//! loopback mesh whose stages batch concurrent steps, and through one that
//! runs one step at a time (`--max-batch 1`, how NDIF and Petals serve),
//! side by side; then where a hop's time goes.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use libp2p::Multiaddr;
use nnmesh_client::mesh::{self, HopStats, Progress};
use nnmesh_graph::{Builder, Graph, IndexItem::*, Limits, Point, recipes};
use nnmesh_runtime::{engine::Engine, execute};

use super::LocalNodes;
use crate::cli::BenchArgs;

/// A client's generation: `tokens` new tokens, steered at layer 5 by layer
/// 20's last-position residual from the prompt, saving layer 20's last
/// position at every step.
fn steered(tokens: u32) -> Graph {
    let g = Builder::new();
    let t = g.trace([recipes::prompts::STEER]).generate(tokens);
    let v = g
        .read(t.at("model.layers.20", Point::Output).step(0))
        .index([Full, At(-1), Full])
        .scale(0.05);
    g.add_at(
        t.at("model.layers.5", Point::Output).steps(1..tokens),
        [Full, At(-1), Full],
        v,
    );
    let h = g.read(t.at("model.layers.20", Point::Output).steps(0..tokens));
    g.save("h20", h.index([Full, At(-1), Full]));
    g.finish()
}

/// What N concurrent clients measured.
struct Round {
    wall: Duration,
    tokens: u64,
    /// Every client's step latencies.
    steps: Vec<Duration>,
    /// Per hop, summed over the clients.
    hops: Vec<HopStats>,
}

impl Round {
    fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.wall.as_secs_f64()
    }

    fn percentile(&self, p: f64) -> f64 {
        let mut s: Vec<f64> = self.steps.iter().map(Duration::as_secs_f64).collect();
        s.sort_by(f64::total_cmp);
        let i = ((s.len() as f64 - 1.0) * p).round() as usize;
        s.get(i).copied().unwrap_or(f64::NAN) * 1e3
    }
}

/// Runs `n` clients at once against the mesh at `addr`, each with a
/// client (and connection) of its own.
fn round(rt: &tokio::runtime::Runtime, addr: &Multiaddr, n: usize, tokens: u32) -> Result<Round> {
    let graph = steered(tokens);
    // Connect first: the round times the requests, not the handshakes.
    let clients = rt.block_on(async {
        let mut cs = Vec::with_capacity(n);
        for _ in 0..n {
            cs.push(mesh::Client::connect(std::slice::from_ref(addr)).await?);
        }
        anyhow::Ok(cs)
    })?;
    let t0 = Instant::now();
    let outs = rt.block_on(async {
        let runs: Vec<_> = clients
            .into_iter()
            .map(|client| {
                let graph = graph.clone();
                tokio::spawn(async move {
                    let mut last = Instant::now();
                    let mut steps = Vec::new();
                    let out = client
                        .run_with(graph, None, |p| {
                            if let Progress::Step { .. } = p {
                                steps.push(last.elapsed());
                                last = Instant::now();
                            }
                        })
                        .await?;
                    anyhow::Ok((out, steps))
                })
            })
            .collect();
        let mut outs = Vec::with_capacity(n);
        for r in runs {
            outs.push(r.await.context("client task")??);
        }
        anyhow::Ok(outs)
    })?;
    let wall = t0.elapsed();
    let mut r = Round {
        wall,
        tokens: 0,
        steps: Vec::new(),
        hops: Vec::new(),
    };
    for (out, steps) in outs {
        r.tokens += out
            .generated
            .iter()
            .flatten()
            .map(|t| t.len() as u64)
            .sum::<u64>();
        r.steps.extend(steps);
        r.hops
            .resize(out.hops.len().max(r.hops.len()), HopStats::default());
        for (sum, h) in r.hops.iter_mut().zip(&out.hops) {
            sum.add(h);
        }
    }
    Ok(r)
}

/// Three local nodes (0..10, 10..20, 20..30) with `extra` flags.
fn three(nodes: &mut LocalNodes, model: &std::path::Path, extra: &[&str]) -> Result<Multiaddr> {
    three_env(nodes, model, extra, &[])
}

/// As [`three`], with environment variables.
fn three_env(
    nodes: &mut LocalNodes,
    model: &std::path::Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Result<Multiaddr> {
    let first = nodes.start_env(model, "0..10", None, extra, env)?;
    nodes.start_env(model, "10..20", Some(&first), extra, env)?;
    nodes.start_env(model, "20..30", Some(&first), extra, env)?;
    Ok(first)
}

/// The thread policy: three nodes on this machine with the default (its
/// cores shared among them), with every core each (torch's default, the
/// old one), and every core each with OpenMP's idle threads sleeping
/// instead of spinning; one client, then eight.
fn threads(args: &BenchArgs, rt: &tokio::runtime::Runtime) -> Result<()> {
    let model = args.model.path()?;
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let all = cores.to_string();
    let tokens = (args.concurrency_tokens / 2).max(1);
    /// A policy's name, node flags and environment.
    type Policy<'a> = (&'a str, Vec<&'a str>, &'a [(&'a str, &'a str)]);
    let configs: [Policy; 3] = [
        ("default (cores / nodes)", vec![], &[]),
        ("all cores each", vec!["--threads", &all], &[]),
        (
            "all cores, OMP_WAIT_POLICY=passive",
            vec!["--threads", &all],
            &[("OMP_WAIT_POLICY", "PASSIVE")],
        ),
    ];
    println!(
        "\nThread policy: 3 nodes on this machine ({cores} cores), {tokens} tokens per client\n"
    );
    println!("{:<36} {:>12} {:>12}", "", "1 client", "8 clients");
    for (name, flags, env) in configs {
        eprintln!("concurrency: thread policy {name} ...");
        let mut nodes = LocalNodes::default();
        let addr = three_env(&mut nodes, &model, &flags, env)?;
        round(rt, &addr, 1, 4)?;
        let one = round(rt, &addr, 1, tokens)?;
        let eight = round(rt, &addr, 8, tokens)?;
        println!(
            "{name:<36} {:>8.1} t/s {:>8.1} t/s",
            one.tokens_per_s(),
            eight.tokens_per_s()
        );
    }
    Ok(())
}

fn ms(d: Duration, n: u32) -> f64 {
    d.as_secs_f64() * 1e3 / f64::from(n.max(1))
}

/// Tokens per second of `n` copies of the generation run in-process as one
/// packed forward per step ([`execute::run_many`]): the compute's own
/// scaling, with no mesh.
fn in_process(engine: &Engine, n: usize, tokens: u32) -> Result<f64> {
    let mut graph = steered(tokens);
    execute::tokenize_prompts(engine, &mut graph)?;
    let manifest = engine.manifest();
    let plan = execute::plan(&graph, &manifest, &Limits::default())?;
    let pairs = vec![(&graph, &plan); n];
    let t0 = Instant::now();
    for out in execute::run_many(engine, &pairs, &manifest, true) {
        out?;
    }
    Ok(f64::from(tokens) * n as f64 / t0.elapsed().as_secs_f64())
}

/// Measures and prints the tables.
///
/// # Errors
/// When the nodes do not start or a run fails.
pub(super) fn run(args: &BenchArgs, engine: &Engine) -> Result<()> {
    let model = args.model.path()?;
    let tokens = args.concurrency_tokens;
    let ns = [1usize, 4, 16];
    eprintln!("concurrency: in-process, the same generations packed ...");
    let local: Vec<f64> = ns
        .iter()
        .map(|&n| in_process(engine, n, tokens))
        .collect::<Result<_>>()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // First, with no other nodes on this machine.
    threads(args, &rt)?;
    eprintln!("concurrency: two 3-node meshes, batching on and off ...");
    let mut nodes = LocalNodes::default();
    let flags: Vec<&str> = args.node_flags.split_whitespace().collect();
    let on = three(&mut nodes, &model, &flags)?;
    let off = three(
        &mut nodes,
        &model,
        &[&flags[..], &["--max-batch", "1"]].concat(),
    )?;
    // Warm both (first forwards allocate).
    round(&rt, &on, 1, 4)?;
    round(&rt, &off, 1, 4)?;
    let mut rows = Vec::new();
    for &n in &ns {
        eprintln!("concurrency: {n} clients x {tokens} tokens, batching on, then off ...");
        let a = round(&rt, &on, n, tokens)?;
        let b = round(&rt, &off, n, tokens)?;
        rows.push((n, a, b));
    }
    println!(
        "\nConcurrent clients through a 3-node loopback mesh, {tokens} tokens each (steering write, per-step save)\n"
    );
    println!(
        "{:>3} {:>11} {:>9} {:>9} {:>8} {:>11} {:>9} {:>9} {:>8} {:>12}",
        "N",
        "on: tok/s",
        "p50 ms",
        "p99 ms",
        "batch",
        "off: tok/s",
        "p50 ms",
        "p99 ms",
        "on/off",
        "in-process"
    );
    let base = rows[0].1.tokens_per_s();
    for ((n, a, b), local) in rows.iter().zip(&local) {
        println!(
            "{n:>3} {:>11.1} {:>9.1} {:>9.1} {:>8} {:>11.1} {:>9.1} {:>9.1} {:>7.2}x {local:>12.1}",
            a.tokens_per_s(),
            a.percentile(0.5),
            a.percentile(0.99),
            format!(
                "{:.1}/{}",
                a.hops.iter().map(HopStats::mean_batch).sum::<f64>() / a.hops.len().max(1) as f64,
                a.hops.iter().map(|h| h.max_batch).max().unwrap_or(0)
            ),
            b.tokens_per_s(),
            b.percentile(0.5),
            b.percentile(0.99),
            a.tokens_per_s() / b.tokens_per_s()
        );
    }
    let last = &rows[rows.len() - 1];
    println!(
        "\naggregate at N = {}: {:.2}x N = 1 with batching, {:.2}x without; in-process, packed: {:.2}x \
         (batch: the mean and largest forward a step ran in, in steps; in-process: tokens/s of the N generations packed \
         into one forward per step in this process, on {} threads)",
        last.0,
        last.1.tokens_per_s() / base,
        last.2.tokens_per_s() / rows[0].2.tokens_per_s(),
        local[local.len() - 1] / local[0],
        tch::get_num_threads()
    );
    println!("\nWhere a hop's time goes (mean per step, ms; N = 1 and N = 16, batching on)\n");
    println!(
        "{:>3} {:>4} {:>9} {:>9} {:>9} {:>9} {:>13}",
        "N", "hop", "total", "queued", "forward", "messages", "(accept RTT)"
    );
    for (n, r) in [(&rows[0].0, &rows[0].1), (&last.0, &last.1)] {
        for (i, h) in r.hops.iter().enumerate() {
            println!(
                "{n:>3} {i:>4} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>13.2}",
                ms(h.total, h.steps),
                ms(h.queued, h.steps),
                ms(h.compute, h.steps),
                ms(h.overhead(), h.steps),
                ms(h.accept, h.steps)
            );
        }
    }
    let (step_us, report_us) = serialization();
    println!(
        "\nmessages: the client's time per hop less the stage's queue and forward: the step \
         (its accept RTT beside it; the stage starts the step meanwhile), the saves and the output \
         reported back, and the hand-offs between tasks and threads on either side. \
         Of that, serialization (postcard encode + decode, in-process) is {step_us:.1} us for a \
         decode step's request and {report_us:.1} us for its output report."
    );
    Ok(())
}

/// Microseconds to encode and decode a decode step's request (one row's
/// hidden state) and its output report, median of 1000.
fn serialization() -> (f64, f64) {
    use nnmesh_protocol::{
        PeerId, Span, codec,
        ids::{ModelId, RequestId},
        message::{
            Hop, HopOutput, ReportBody, Request, StageReport, StepInput, StepRequest, StepTiming,
        },
        tensor::WireTensor,
    };
    let peer = PeerId::random();
    let hidden = WireTensor::from_f32(vec![1, 1, 576], &[0.5; 576]).expect("a tensor");
    let step = Request::Step(Box::new(StepRequest {
        request: RequestId(7),
        client: peer,
        client_addrs: vec!["/ip4/127.0.0.1/tcp/4001".into()],
        model: ModelId([1; 32]),
        route: (0..3)
            .map(|i| Hop {
                peer,
                addrs: vec!["/ip4/127.0.0.1/tcp/4002".into()],
                span: Span::new(i * 10, i * 10 + 10),
            })
            .collect(),
        hop: 1,
        graph: None,
        input: StepInput {
            trace: 0,
            step: 9,
            past: 17,
            tokens: WireTensor::from_i64(vec![0, 0], &[]).expect("empty"),
            hidden: Some(hidden.clone()),
            carry: Vec::new(),
        },
        replay: Vec::new(),
        replay_outputs: false,
    }));
    let report = Request::Report(Box::new(StageReport {
        request: RequestId(7),
        hop: 1,
        peer,
        trace: 0,
        step: 9,
        bodies: vec![ReportBody::Output(HopOutput {
            hidden: Some(hidden),
            carry: Vec::new(),
        })],
        timing: Some(StepTiming::default()),
    }));
    let time = |msg: &Request| {
        let mut us: Vec<f64> = (0..1000)
            .map(|_| {
                let t = Instant::now();
                let bytes = codec::encode(msg);
                let back: Request = codec::decode(&bytes).expect("decodes");
                std::hint::black_box(back);
                t.elapsed().as_secs_f64() * 1e6
            })
            .collect();
        us.sort_by(f64::total_cmp);
        us[us.len() / 2]
    };
    (time(&step), time(&report))
}
