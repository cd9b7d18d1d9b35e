//! The mesh against in-process: a 30-layer logit lens on the benchmark
//! prompt run here and through three local node processes (0..10, 10..20,
//! 20..30), the per-hop overhead that implies, and the transfer rate of a
//! large tensor between two transports.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use libp2p::identity::Keypair;
use nnmesh_client::{mesh, transport};
use nnmesh_graph::{Builder, Graph, Limits, recipes};
use nnmesh_protocol::{codec, message::Response};
use nnmesh_runtime::{engine::Engine, execute};

use super::{LocalNodes, median, time_once};
use crate::cli::BenchArgs;

/// Measures and prints the table.
///
/// # Errors
/// When the nodes do not start or a run fails.
pub(super) fn run(args: &BenchArgs, engine: &Engine, prompt: &[u32]) -> Result<()> {
    let n = engine.model.config().num_hidden_layers as u32;
    let limits = Limits::default();
    let lens = {
        let g = recipes::logit_lens(&engine.tokenizer.decode(prompt)?, 0..n);
        // Same tokens as the other benchmarks, whatever the tokenizer round trip does.
        with_tokens(g, prompt)
    };
    let empty_of = |ids: &[u32]| {
        let g = Builder::new();
        g.trace_tokens(vec![ids.to_vec()]);
        g.finish()
    };
    let empty = empty_of(prompt);
    // One token: next to no compute, so what remains is the mesh's own cost.
    let tiny = empty_of(&prompt[..1]);
    eprintln!("mesh: starting 3 local nodes ...");
    let model = args.model.path()?;
    let mut nodes = LocalNodes::default();
    // One client at a time keeps one stage busy at a time: each node
    // computes with every core, as the in-process run does (the default
    // shares the cores among the nodes; see the thread policy figures).
    let cores = std::thread::available_parallelism()
        .map_or(1, std::num::NonZero::get)
        .to_string();
    let mut flags: Vec<&str> = args.node_flags.split_whitespace().collect();
    if !flags.contains(&"--threads") {
        flags.extend(["--threads", &cores]);
    }
    let first = nodes.start(&model, "0..10", None, &flags)?;
    nodes.start(&model, "10..20", Some(&first), &flags)?;
    nodes.start(&model, "20..30", Some(&first), &flags)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let client = rt.block_on(mesh::Client::connect(std::slice::from_ref(&first)))?;
    let local = |g: &Graph| -> Result<()> {
        execute::run(engine, g.clone(), &limits)?;
        Ok(())
    };
    let remote = |g: &Graph| -> Result<()> {
        rt.block_on(client.run(g.clone(), None))?;
        Ok(())
    };
    eprintln!("mesh: logit lens and empty graph, in-process and through 3 nodes, interleaved ...");
    // Alternate the two so drift on this shared machine hits both alike.
    let (mut lens_local, mut lens_mesh, mut empty_local, mut empty_mesh) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut tiny_local, mut tiny_mesh) = (Vec::new(), Vec::new());
    local(&lens)?;
    remote(&lens)?;
    for _ in 0..args.runs.max(1) {
        lens_local.push(time_once(|| local(&lens))?);
        lens_mesh.push(time_once(|| remote(&lens))?);
        empty_local.push(time_once(|| local(&empty))?);
        empty_mesh.push(time_once(|| remote(&empty))?);
        tiny_local.push(time_once(|| local(&tiny))?);
        tiny_mesh.push(time_once(|| remote(&tiny))?);
    }
    let (tiny_local, tiny_mesh) = (median(tiny_local), median(tiny_mesh));
    let (lens_local, lens_mesh) = (median(lens_local), median(lens_mesh));
    let (empty_local, empty_mesh) = (median(empty_local), median(empty_mesh));

    eprintln!("mesh: 64 MiB transfers between two transports ...");
    let mb_s = rt.block_on(transfer_rate(64 << 20, args.runs))?;
    drop(nodes);

    let hops = 3.0;
    println!(
        "\nMesh on loopback: 3 node processes (layers 0..10, 10..20, 20..30) vs in-process, {} tokens, median of {} runs\n",
        prompt.len(),
        args.runs
    );
    println!(
        "{:<32} {:>12} {:>12} {:>8}",
        "", "in-process", "mesh", "ratio"
    );
    for (name, a, b) in [
        (format!("logit lens ({n} layers)"), lens_local, lens_mesh),
        (
            "empty graph (one forward)".to_string(),
            empty_local,
            empty_mesh,
        ),
        (
            "empty graph, 1-token prompt".to_string(),
            tiny_local,
            tiny_mesh,
        ),
    ] {
        println!(
            "{name:<32} {:>12} {:>12} {:>8}",
            format!("{:.1} ms", a * 1e3),
            format!("{:.1} ms", b * 1e3),
            format!("{:.2}x", b / a)
        );
    }
    println!(
        "\nper-hop overhead: {:.2} ms ((mesh - in-process) / {hops} hops on the 1-token graph: request, \
         session set-up, hidden-state push, reports, close)",
        (tiny_mesh - tiny_local) * 1e3 / hops
    );
    println!(
        "tensor transfer between two transports: {mb_s:.0} MB/s (64 MiB request, both directions counted once)"
    );
    Ok(())
}

/// Replaces the text prompts of a graph by token ids.
fn with_tokens(mut g: Graph, ids: &[u32]) -> Graph {
    for t in &mut g.traces {
        for i in &mut t.invokes {
            i.prompt = nnmesh_graph::Prompt::Tokens(ids.to_vec());
        }
    }
    g
}

/// Median MB/s of `bytes`-sized requests answered with a short ack.
async fn transfer_rate(bytes: usize, runs: usize) -> Result<f64> {
    let (server, mut inbound) =
        transport::Endpoint::start(transport::Config::new(Keypair::generate_ed25519())).await?;
    tokio::spawn(async move {
        while let Some(req) = inbound.recv().await {
            let _ = req.reply.send(codec::encode(&Response::Ack));
        }
    });
    let (client, _) =
        transport::Endpoint::start(transport::Config::new(Keypair::generate_ed25519())).await?;
    let addrs = server.listen_addrs().await;
    let payload = vec![7u8; bytes];
    let mut rates = Vec::new();
    for i in 0..=runs.max(1) {
        let t0 = Instant::now();
        tokio::time::timeout(
            Duration::from_secs(60),
            client.request(server.peer_id(), addrs.clone(), payload.clone()),
        )
        .await
        .context("transfer timed out")??;
        if i > 0 {
            rates.push(bytes as f64 / 1e6 / t0.elapsed().as_secs_f64());
        }
    }
    server.shutdown().await;
    client.shutdown().await;
    Ok(median(rates))
}
