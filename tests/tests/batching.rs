//! Many researchers at once: eight clients run different experiments through
//! one 3-node loopback mesh at the same time. Every stage merges their steps
//! into shared forwards, and each client still gets its single-node result.

use nnmesh_client::mesh;
use nnmesh_graph::{Builder, Graph, IndexItem::*, Limits, Point, recipes};
use nnmesh_runtime::execute;
use nnmesh_tests::mesh::{assert_batched, rt, three_nodes};

/// Generation with a save at every step, and a steering write at some.
fn generation_with_saves() -> Graph {
    let g = Builder::new();
    let t = g.trace([recipes::prompts::STEER]).generate(12);
    let h = g.read(t.at("model.layers.12", Point::Output).steps(0..12));
    g.save("h12", h.index([Full, At(-1), Full]));
    let v = g
        .read(t.at("model.layers.20", Point::Output).step(0))
        .index([Full, At(-1), Full]);
    g.add_at(
        t.at("model.layers.3", Point::Output).steps(4..8),
        [Full, At(-1), Full],
        v.scale(0.05),
    );
    g.finish()
}

#[test]
fn eight_concurrent_clients_share_batches_and_each_gets_its_single_node_result() {
    let model = nnmesh_tests::model_path();
    let nodes = three_nodes(&model);
    let engine = nnmesh_tests::load_engine();
    let mut graphs: Vec<(String, Graph)> = recipes::EXAMPLES
        .iter()
        .map(|n| (n.to_string(), nnmesh_tests::example(n)))
        .collect();
    graphs.push(("generation with saves".into(), generation_with_saves()));
    graphs.push((
        "lens, 8 layers".into(),
        recipes::logit_lens("Hello there, my name is", 22..30),
    ));
    assert_eq!(graphs.len(), 8);
    let want: Vec<execute::Outcome> = graphs
        .iter()
        .map(|(_, g)| execute::run(&engine, g.clone(), &Limits::default()).expect("runs locally"))
        .collect();
    let rt = rt();
    let addr = nodes[0].addr.clone();
    let outs = rt.block_on(async {
        let runs: Vec<_> = graphs
            .iter()
            .map(|(_, g)| {
                let (g, addr) = (g.clone(), addr.clone());
                tokio::spawn(async move {
                    // A client of its own each, as eight researchers would have.
                    let client = mesh::Client::connect(&[addr]).await?;
                    client.run(g, None).await
                })
            })
            .collect();
        let mut outs = Vec::with_capacity(runs.len());
        for run in runs {
            outs.push(run.await);
        }
        outs
    });
    let mut batched = vec![0u32; 3];
    let mut biggest = vec![0u32; 3];
    for (((name, _), out), want) in graphs.iter().zip(outs).zip(&want) {
        let out = out.expect("task").unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_batched(name, &out, want);
        assert_eq!(out.hops.len(), 3, "{name}: figures for every hop");
        for (h, stats) in out.hops.iter().enumerate() {
            batched[h] += stats.batched;
            biggest[h] = biggest[h].max(stats.max_batch);
        }
    }
    eprintln!("steps that shared a forward, per stage: {batched:?}; largest forwards: {biggest:?}");
    for h in 0..3 {
        assert!(
            batched[h] > 0 && biggest[h] >= 2,
            "stage {h} batched no steps of concurrent requests ({batched:?}, {biggest:?})"
        );
    }
    for n in nodes {
        assert!(n.terminate().expect("exits").success(), "clean exit");
    }
}
