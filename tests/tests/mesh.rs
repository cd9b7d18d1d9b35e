//! The mesh end to end: real `nnmesh node` processes on loopback (port 0), a
//! client that holds no weights, and the same graphs run in-process.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use libp2p::{PeerId, identity::Keypair};
use nnmesh_client::{
    mesh::{self, choose_route},
    transport,
};
use nnmesh_graph::{Builder, Graph, IndexItem, IndexItem::*, Limits, Point, recipes};
use nnmesh_protocol::{
    Span, codec,
    ids::RequestId,
    message::{ErrorKind, Hop, ReportBody, Request, Response, StepInput, StepRequest},
    tensor::WireTensor,
};
use nnmesh_runtime::execute;

use nnmesh_tests::mesh::{assert_batched, assert_same, node, raw, rt, three_nodes};

#[test]
fn three_nodes_give_the_single_node_results_for_the_canonical_experiments() {
    let model = nnmesh_tests::model_path();
    let nodes = three_nodes(&model);
    let engine = nnmesh_tests::load_engine();
    let rt = rt();
    let client = rt
        .block_on(mesh::Client::connect(std::slice::from_ref(&nodes[0].addr)))
        .expect("client connects");
    let (mut total, mut identical) = (0, 0);
    for name in recipes::EXAMPLES {
        let graph = nnmesh_tests::example(name);
        let local = execute::run(&engine, graph.clone(), &Limits::default()).expect("runs locally");
        let mesh = rt
            .block_on(client.run(graph, None))
            .expect("runs on the mesh");
        let spans: Vec<Span> = mesh.route.iter().map(|h| h.span).collect();
        assert_eq!(
            spans,
            [Span::new(0, 10), Span::new(10, 20), Span::new(20, 30)],
            "{name}: route"
        );
        let peers: Vec<PeerId> = mesh.route.iter().map(|h| h.peer).collect();
        assert_eq!(peers, nodes.iter().map(|n| n.peer).collect::<Vec<_>>());
        identical += assert_same(name, &mesh, &local);
        total += local.saves.len();
    }
    eprintln!("{identical} of {total} saved values bit-identical to the single-node run");
    // Values that flow back to an earlier stage in a later trace or step go
    // through the client: layer 25 (stage 2) steers layer 5 (stage 0).
    for graph in [backward_session(), backward_steps()] {
        let local = execute::run(&engine, graph.clone(), &Limits::default()).expect("runs locally");
        let mesh = rt
            .block_on(client.run(graph, None))
            .expect("runs on the mesh");
        assert_eq!(assert_same("relayed", &mesh, &local), local.saves.len());
    }
    // Two clients at once: sessions are per request, so neither disturbs the other.
    let (lens, steer) = (
        nnmesh_tests::example("lens"),
        nnmesh_tests::example("steer"),
    );
    let lens_local = execute::run(&engine, lens.clone(), &Limits::default()).expect("runs");
    let steer_local = execute::run(&engine, steer.clone(), &Limits::default()).expect("runs");
    let other = rt
        .block_on(mesh::Client::connect(std::slice::from_ref(&nodes[1].addr)))
        .expect("second client connects");
    let (a, b) =
        rt.block_on(async { tokio::join!(client.run(lens, None), other.run(steer, None)) });
    assert_batched("concurrent lens", &a.expect("lens runs"), &lens_local);
    assert_batched("concurrent steer", &b.expect("steer runs"), &steer_local);
    assert_eq!(identical, total, "f32 on CPU should be bit-identical");
    for n in nodes {
        assert!(
            n.terminate().expect("exits").success(),
            "clean exit on SIGTERM"
        );
    }
}

/// Trace 0 reads layer 25; trace 1 generates with it added to layer 5.
fn backward_session() -> Graph {
    let g = Builder::new();
    let src = g.trace([recipes::prompts::STEER_TOWARD]);
    let tgt = g.trace([recipes::prompts::STEER]).generate(6);
    let dir = g
        .read(src.at("model.layers.25", Point::Output))
        .index([Full, IndexItem::slice(Some(1), None), Full])
        .mean([1], false)
        .scale(0.05);
    g.save("dir", dir);
    g.add_at(
        tgt.at("model.layers.5", Point::Output).all_steps(),
        [Full, At(-1), Full],
        dir,
    );
    g.finish()
}

/// One generation: layer 25's last position at step 0 is added to layer 5 at
/// every later step.
fn backward_steps() -> Graph {
    let g = Builder::new();
    let t = g.trace([recipes::prompts::STEER]).generate(5);
    let v = g
        .read(t.at("model.layers.25", Point::Output).step(0))
        .index([Full, At(-1), Full])
        .scale(0.1);
    g.add_at(
        t.at("model.layers.5", Point::Output).steps(1..5),
        [Full, At(-1), Full],
        v,
    );
    g.save("v", v);
    g.finish()
}

/// A copy of the model whose weights differ in one byte (of a tensor that
/// the 20..30 stage loads), so its model id differs.
fn foreign_model(dir: &Path) -> PathBuf {
    let mut bytes = std::fs::read(nnmesh_tests::model_path()).expect("model");
    let n = bytes.len();
    bytes[n - 1000] ^= 0x10;
    let p = dir.join("foreign.gguf");
    std::fs::write(&p, bytes).expect("write");
    p
}

#[test]
fn routes_avoid_foreign_weights_and_use_one_of_two_replicas() {
    let dir = std::env::temp_dir().join(format!("nnmesh-mesh-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let model = nnmesh_tests::model_path();
    let nodes = three_nodes(&model);
    let a = nodes[0].addr.clone();
    let replica = node("10..20", Some(&a), &model, &[]);
    let foreign = node("20..30", Some(&a), &foreign_model(&dir), &[]);
    let rt = rt();
    let client = rt
        .block_on(mesh::Client::connect(std::slice::from_ref(&a)))
        .expect("client connects");
    let peers = rt.block_on(client.discover()).expect("discovers");
    assert_eq!(peers.len(), 5, "all five nodes answer Info");
    let foreign_id = peers
        .iter()
        .find(|p| p.peer == foreign.peer)
        .expect("foreign node discovered")
        .record
        .model;
    let (model_id, route) = choose_route(&peers, None).expect("one model is fully served");
    assert_ne!(model_id, foreign_id);
    assert!(route.iter().all(|(p, _)| p.peer != foreign.peer));
    // Asking for the foreign model explicitly finds no full route.
    let err = choose_route(&peers, Some(foreign_id)).expect_err("foreign model is partial");
    assert!(err.to_string().contains("layers 0..20 unserved"), "{err}");

    let engine = nnmesh_tests::load_engine();
    let graph = nnmesh_tests::example("lens");
    let local = execute::run(&engine, graph.clone(), &Limits::default()).expect("runs");
    let mesh = rt
        .block_on(client.run(graph, None))
        .expect("runs on the mesh");
    let middle = mesh.route[1].peer;
    assert!(
        middle == nodes[1].peer || middle == replica.peer,
        "a 10..20 replica"
    );
    assert!(mesh.route.iter().all(|h| h.peer != foreign.peer));
    assert_same("lens with replicas", &mesh, &local);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_requests_get_clear_errors_and_the_node_keeps_serving() {
    let model = nnmesh_tests::model_path();
    let node = node("0..30", None, &model, &["--max-message-mib", "1"]);
    let rt = rt();
    rt.block_on(async {
        let mut cfg = transport::Config::new(Keypair::generate_ed25519());
        cfg.max_message = 8 << 20;
        let (t, mut inbound) = transport::Endpoint::start(cfg).await.expect("transport");
        let kind = |r: Response| match r {
            Response::Error(e) => (e.kind, e.message),
            other => panic!("expected an error, got {other:?}"),
        };

        let (k, msg) = kind(
            raw(
                &t,
                &node,
                [&codec::WIRE_VERSION.to_le_bytes()[..], b"garbage bytes"].concat(),
            )
            .await
            .expect("answer"),
        );
        assert_eq!(k, ErrorKind::Malformed, "{msg}");
        let mut wrong_version = codec::encode(&Request::Info);
        wrong_version[0] = 99;
        let (k, msg) = kind(raw(&t, &node, wrong_version).await.expect("answer"));
        assert_eq!(k, ErrorKind::Version, "{msg}");
        assert!(msg.contains("99"), "{msg}");
        // Over the node's 1 MiB limit: refused, nothing processed.
        let big = raw(&t, &node, vec![0u8; 2 << 20]).await;
        assert!(big.is_err(), "an oversized request is refused");

        // A step for a block range the node does not serve.
        let Response::Info { records, .. } = raw(&t, &node, codec::encode(&Request::Info))
            .await
            .expect("info")
        else {
            panic!("Info answers Info")
        };
        let record = records[0].verify(u64::MAX / 2).err();
        assert!(record.is_some(), "records expire");
        let rec = records[0].verify(now_ms()).expect("valid signature");
        let hop = |start, end| Hop {
            peer: node.peer,
            addrs: vec![node.addr.to_string()],
            span: Span::new(start, end),
        };
        let g = Builder::new();
        let tr = g.trace_tokens(vec![vec![504, 414, 46682]]);
        g.save("h", g.read(tr.at("model.layers.40", Point::Output)));
        let step = |route: Vec<Hop>, graph: &Graph| StepRequest {
            request: RequestId(7),
            client: t.peer_id(),
            client_addrs: Vec::new(),
            model: rec.model,
            route,
            hop: 0,
            graph: Some(graph.to_postcard()),
            input: StepInput {
                trace: 0,
                step: 0,
                past: 0,
                tokens: WireTensor::from_i64(vec![0, 0], &[]).expect("empty"),
                hidden: None,
                carry: Vec::new(),
            },
            replay: Vec::new(),
            replay_outputs: false,
        };
        let bad_graph = g.finish();
        let (k, msg) = kind(
            raw(
                &t,
                &node,
                codec::encode(&Request::Step(Box::new(step(vec![hop(0, 31)], &bad_graph)))),
            )
            .await
            .expect("answer"),
        );
        assert_eq!(k, ErrorKind::NotServed, "{msg}");
        assert!(msg.contains("0..30"), "{msg}");

        // A graph that fails validation: accepted, then reported as failed.
        let accepted = raw(
            &t,
            &node,
            codec::encode(&Request::Step(Box::new(step(vec![hop(0, 30)], &bad_graph)))),
        )
        .await
        .expect("answer");
        assert_eq!(accepted, Response::Accepted);
        let mut next_report = async || {
            let inb = tokio::time::timeout(Duration::from_secs(60), inbound.recv())
                .await
                .expect("a report arrives")
                .expect("inbound open");
            let Ok(Request::Report(report)) = codec::decode::<Request>(&inb.request) else {
                panic!("a report")
            };
            let _ = inb.reply.send(codec::encode(&Response::Ack));
            report.bodies
        };
        match next_report().await.as_slice() {
            [ReportBody::Failed(e)] => {
                assert_eq!(e.kind, ErrorKind::Validation);
                assert!(e.message.contains("model.layers.40"), "{}", e.message);
            }
            other => panic!("expected a failure report, got {other:?}"),
        }

        // A valid step runs once; the same step again is refused, since
        // running it twice would corrupt the session (its KV cache).
        let g = Builder::new();
        let tr = g.trace_tokens(vec![vec![504, 414, 46682]]);
        g.save("h", g.read(tr.at("model.layers.2", Point::Output)));
        let good = g.finish();
        let mut good_step = step(vec![hop(0, 30)], &good);
        good_step.request = RequestId(8);
        let msg = codec::encode(&Request::Step(Box::new(good_step)));
        assert_eq!(
            raw(&t, &node, msg.clone()).await.expect("answer"),
            Response::Accepted
        );
        // The step's saves and its end travel in one report.
        assert!(matches!(
            next_report().await.as_slice(),
            [ReportBody::Saves(s), ReportBody::Done { .. }] if s[0].name == "h"
        ));
        assert_eq!(
            raw(&t, &node, msg).await.expect("answer"),
            Response::Accepted
        );
        match next_report().await.as_slice() {
            [ReportBody::Failed(e)] => {
                assert!(e.message.contains("already applied"), "{}", e.message)
            }
            other => panic!("expected a refusal, got {other:?}"),
        }

        // The node still serves a real request.
        let client = mesh::Client::connect(std::slice::from_ref(&node.addr))
            .await
            .expect("connects");
        let out = client
            .run(nnmesh_tests::example("lens"), None)
            .await
            .expect("still serving");
        assert_eq!(out.saves.len(), 30);
    });
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64
}

#[test]
fn a_dead_stage_is_reported_by_name() {
    let model = nnmesh_tests::model_path();
    let mut nodes = three_nodes(&model);
    let rt = rt();
    let client = rt
        .block_on(mesh::Client::connect(std::slice::from_ref(&nodes[0].addr)))
        .expect("client connects");
    let dead = nodes.pop().expect("three nodes");
    drop(dead); // SIGKILL: no goodbye
    let err = rt
        .block_on(client.run(nnmesh_tests::example("lens"), None))
        .expect_err("no route without layers 20..30");
    assert!(matches!(err, mesh::Error::Coverage(_)), "{err}");
    assert!(err.to_string().contains("layers 20..30 unserved"), "{err}");
}

/// A client without any model file: the tokenizer comes from the mesh, and
/// the CLI's `--mesh` commands run from anywhere.
#[test]
fn a_client_without_weights_gets_the_tokenizer_from_the_mesh() {
    let nodes = three_nodes(&nnmesh_tests::model_path());
    let rt = rt();
    let client = rt
        .block_on(mesh::Client::connect(std::slice::from_ref(&nodes[0].addr)))
        .expect("client connects");
    let (_, json) = rt
        .block_on(client.tokenizer(None))
        .expect("a node sends it");
    let local = nnmesh_tests::load_engine()
        .tokenizer
        .to_json()
        .expect("serializes");
    assert_eq!(json, local.into_bytes(), "the node's own tokenizer");

    let empty = std::env::temp_dir().join(format!("nnmesh-weightless-{}", std::process::id()));
    std::fs::create_dir_all(&empty).expect("temp dir");
    let out = std::process::Command::new(nnmesh_tests::nnmesh_exe())
        .args(["lens", "--mesh", &nodes[0].addr.to_string()])
        .current_dir(&empty)
        .env("NNMESH_MODEL", empty.join("no-such-model.gguf"))
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(" Paris"), "{stdout}");
    std::fs::remove_dir_all(&empty).ok();
}
