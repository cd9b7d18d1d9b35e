//! Hostile input, faults and limits against live `nnmesh node` processes on
//! loopback: every bad request gets a clear error, the nodes stay up, and a
//! correct request afterwards gets the single-node result.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use libp2p::{PeerId, identity::Keypair};
use nnmesh_client::{
    mesh,
    transport::{self, Inbound, keys},
};
use nnmesh_graph::{Builder, Graph, IndexItem::*, Limits, Point, recipes};
use nnmesh_protocol::{
    Span, codec,
    ids::{ModelId, RequestId},
    message::{ErrorKind, Hop, ReportBody, Request, Response, StepInput, StepRequest, WireError},
    tensor::WireTensor,
};
use nnmesh_runtime::execute;
use nnmesh_tests::mesh::{Node, assert_same, node, raw, rt, three_nodes};
use tokio::sync::mpsc;

/// "The Eiffel Tower" in SmolLM2's vocabulary.
const PROMPT: [u32; 3] = [504, 414, 46682];

fn hop(node: &Node, start: u32, end: u32) -> Hop {
    Hop {
        peer: node.peer,
        addrs: vec![node.addr.to_string()],
        span: Span::new(start, end),
    }
}

/// A step of `graph` for `route`, sent by the transport `from` as client.
fn step(from: &transport::Endpoint, model: ModelId, route: Vec<Hop>, graph: &Graph) -> StepRequest {
    StepRequest {
        request: RequestId(rand_id()),
        client: from.peer_id(),
        client_addrs: Vec::new(),
        model,
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
    }
}

fn rand_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// The model id a node announces.
async fn model_of(t: &transport::Endpoint, node: &Node) -> ModelId {
    let Ok(Response::Info { records, .. }) = raw(t, node, codec::encode(&Request::Info)).await
    else {
        panic!("Info answers Info")
    };
    records[0].verify(now_ms()).expect("valid record").model
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64
}

/// Sends a step; returns the node's answer (Accepted, or a refusal).
async fn send(t: &transport::Endpoint, to: &Node, s: &StepRequest) -> Response {
    raw(t, to, codec::encode(&Request::Step(Box::new(s.clone()))))
        .await
        .expect("the node answers")
}

/// The bodies of the next report to `t`, acknowledged.
async fn next_report(inbound: &mut mpsc::Receiver<Inbound>) -> Vec<ReportBody> {
    let inb = tokio::time::timeout(Duration::from_secs(60), inbound.recv())
        .await
        .expect("a report arrives")
        .expect("inbound open");
    let Ok(Request::Report(report)) = codec::decode::<Request>(&inb.request) else {
        panic!("a report")
    };
    let _ = inb.reply.send(codec::encode(&Response::Ack));
    report.bodies
}

/// Reads reports until the hop's step ends; returns the failure, if any.
async fn outcome(inbound: &mut mpsc::Receiver<Inbound>) -> Option<WireError> {
    loop {
        for body in next_report(inbound).await {
            match body {
                ReportBody::Done { .. } | ReportBody::Output(_) => return None,
                ReportBody::Failed(e) => return Some(e),
                _ => {}
            }
        }
    }
}

/// Asserts the step fails at the stage with `kind` and a message containing `needle`.
async fn fails(inbound: &mut mpsc::Receiver<Inbound>, kind: ErrorKind, needle: &str) {
    let e = outcome(inbound).await.expect("the step fails");
    assert_eq!(e.kind, kind, "{}", e.message);
    assert!(
        e.message.contains(needle),
        "{needle:?} not in: {}",
        e.message
    );
}

fn refused(r: Response, kind: ErrorKind, needle: &str) {
    match r {
        Response::Error(e) => {
            assert_eq!(e.kind, kind, "{}", e.message);
            assert!(
                e.message.contains(needle),
                "{needle:?} not in: {}",
                e.message
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// The single-node result of `graph`.
fn local(graph: &Graph) -> execute::Outcome {
    thread_local! {
        static ENGINE: &'static nnmesh_runtime::engine::Engine =
            Box::leak(Box::new(nnmesh_tests::load_engine()));
    }
    ENGINE.with(|e| execute::run(e, graph.clone(), &Limits::default()).expect("runs locally"))
}

#[test]
fn an_early_stop_on_the_mesh_returns_every_save() {
    let nodes = three_nodes(&nnmesh_tests::model_path());
    let rt = rt();
    let client = rt
        .block_on(mesh::Client::connect(std::slice::from_ref(&nodes[0].addr)))
        .expect("client connects");
    // Stops inside stage 0 (layers 0..10) and inside stage 1: the norm,
    // lm_head and saves placed on the last stage must still run.
    for layers in [10, 15] {
        let graph = recipes::logit_lens(recipes::prompts::LENS, 0..layers);
        let want = local(&graph);
        assert_eq!(want.saves.len(), layers as usize);
        let mesh = rt
            .block_on(client.run(graph, None))
            .expect("runs on the mesh");
        assert_eq!(
            assert_same(&format!("lens {layers}"), &mesh, &want),
            layers as usize,
            "bit-identical"
        );
    }
}

/// The graph from the issue: two `apply model.norm` on 1-D values, which
/// were batched into one `[1152]` tensor and panicked the stage's thread.
const ONE_D_NORMS: &str = r#"{"version":1,"traces":[{"invokes":[{"prompt":{"text":"The Eiffel Tower is in the city of"}}]}],
 "nodes":[{"read":{"hook":{"module":"model.layers.5","point":"output"}}},
  {"op":{"op":{"index":{"items":[{"at":0},{"at":-1}]}},"args":[0]}},
  {"read":{"hook":{"module":"model.layers.6","point":"output"}}},
  {"op":{"op":{"index":{"items":[{"at":0},{"at":-1}]}},"args":[2]}},
  {"apply":{"module":"model.norm","args":[1]}},{"apply":{"module":"model.norm","args":[3]}},
  {"save":{"name":"a","value":4}},{"save":{"name":"b","value":5}}]}"#;

/// A graph that validates but fails when it runs: it gathers at an index
/// computed from the data (argmax + 100000), past the end of the vocabulary.
fn gathers_out_of_range() -> Graph {
    let g = Builder::new();
    let t = g.trace([recipes::prompts::LENS]);
    let h = g.read(t.at("model.layers.3", Point::Output));
    let top = h.index([Full, At(-1), Full]).argmax(-1, true);
    let far = top + top.full_like(100_000.0);
    g.save("x", h.index([Full, At(-1), Full]).gather(-1, far));
    g.finish()
}

#[test]
fn a_graph_that_fails_while_running_fails_only_its_request() {
    let nodes = three_nodes(&nnmesh_tests::model_path());
    let rt = rt();
    let client = rt
        .block_on(mesh::Client::connect(std::slice::from_ref(&nodes[0].addr)))
        .expect("client connects");
    let norms = Graph::from_json(ONE_D_NORMS).expect("parses");
    let mesh = rt.block_on(client.run(norms.clone(), None)).expect("runs");
    assert_same("1-D norms", &mesh, &local(&norms));

    let e = rt
        .block_on(client.run(gathers_out_of_range(), None))
        .expect_err("an index past the vocabulary");
    assert!(matches!(e, mesh::Error::Stage { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("stage 0") && msg.contains("index"), "{msg}");

    // The stages serve the next request as if nothing happened.
    let lens = nnmesh_tests::example("lens");
    let mesh = rt
        .block_on(client.run(lens.clone(), None))
        .expect("still serving");
    assert_same("lens after a failure", &mesh, &local(&lens));
}

#[test]
fn hostile_messages_get_clear_errors_and_the_mesh_keeps_serving() {
    let nodes = three_nodes(&nnmesh_tests::model_path());
    let rt = rt();
    rt.block_on(async {
        let (t, mut inbound) =
            transport::Endpoint::start(transport::Config::new(Keypair::generate_ed25519()))
                .await
                .expect("transport");
        let model = model_of(&t, &nodes[0]).await;
        let route = vec![
            hop(&nodes[0], 0, 10),
            hop(&nodes[1], 10, 20),
            hop(&nodes[2], 20, 30),
        ];
        let generate = {
            let g = Builder::new();
            let tr = g.trace_tokens(vec![PROMPT.to_vec()]).generate(3);
            g.save(
                "h",
                g.read(tr.at("model.layers.25", Point::Output).all_steps()),
            );
            g.finish()
        };

        // Token ids outside the vocabulary, at a decode step.
        let mut s = step(&t, model, route.clone(), &generate);
        s.client_addrs = t
            .listen_addrs()
            .await
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(send(&t, &nodes[0], &s).await, Response::Accepted);
        assert!(outcome(&mut inbound).await.is_none(), "step 0 runs");
        let mut bad = s.clone();
        bad.input.step = 1;
        bad.input.past = 3;
        bad.graph = None;
        bad.input.tokens = WireTensor::from_i64(vec![1, 1], &[100_000]).expect("one id");
        assert_eq!(send(&t, &nodes[0], &bad).await, Response::Accepted);
        fails(&mut inbound, ErrorKind::Malformed, "outside the vocabulary").await;
        // Two ids for one invoke.
        let mut s = step(&t, model, route.clone(), &generate);
        s.client_addrs = bad.client_addrs.clone();
        assert_eq!(send(&t, &nodes[0], &s).await, Response::Accepted);
        assert!(outcome(&mut inbound).await.is_none());
        let mut two = s.clone();
        two.input.step = 1;
        two.input.past = 3;
        two.graph = None;
        two.input.tokens = WireTensor::from_i64(vec![2, 1], &[1, 2]).expect("two ids");
        assert_eq!(send(&t, &nodes[0], &two).await, Response::Accepted);
        fails(&mut inbound, ErrorKind::Malformed, "[1, 1] token ids").await;

        // A skipped step: refused, and the session is kept for the right one.
        let mut s = step(&t, model, route.clone(), &generate);
        s.client_addrs = bad.client_addrs.clone();
        assert_eq!(send(&t, &nodes[0], &s).await, Response::Accepted);
        assert!(outcome(&mut inbound).await.is_none());
        let mut skip = s.clone();
        skip.input.step = 2;
        skip.input.past = 4;
        skip.graph = None;
        skip.input.tokens = WireTensor::from_i64(vec![1, 1], &[5]).expect("one id");
        assert_eq!(send(&t, &nodes[0], &skip).await, Response::Accepted);
        fails(&mut inbound, ErrorKind::Malformed, "out of order").await;
        let mut next = skip.clone();
        next.input.step = 1;
        next.input.past = 3;
        assert_eq!(send(&t, &nodes[0], &next).await, Response::Accepted);
        assert!(outcome(&mut inbound).await.is_none(), "step 1 still runs");
        // The (history length, position) invariant: step 2 comes after 4
        // cached positions, not 9.
        let mut wrong = next.clone();
        wrong.input.step = 2;
        wrong.input.past = 9;
        assert_eq!(send(&t, &nodes[0], &wrong).await, Response::Accepted);
        fails(
            &mut inbound,
            ErrorKind::Malformed,
            "after 9 cached positions",
        )
        .await;

        // A middle stage's input, checked against the plan.
        let lens = {
            let g = Builder::new();
            let tr = g.trace_tokens(vec![PROMPT.to_vec()]);
            g.save("h", g.read(tr.at("model.layers.25", Point::Output)));
            g.finish()
        };
        let middle = |hidden: WireTensor| {
            let mut s = step(&t, model, route.clone(), &lens);
            s.client_addrs = bad.client_addrs.clone();
            s.hop = 1;
            s.input.hidden = Some(hidden);
            s
        };
        let f32s = |shape: Vec<u64>| {
            let n = shape.iter().product::<u64>() as usize;
            WireTensor::from_f32(shape, &vec![0.1; n]).expect("consistent")
        };
        for (hidden, needle) in [
            (f32s(vec![1, 5, 576]), "[1, 3, 576]"),
            (f32s(vec![1, 3, 575]), "[1, 3, 576]"),
            (
                WireTensor::from_i64(vec![1, 3, 576], &[0; 1728]).expect("consistent"),
                "F32",
            ),
        ] {
            assert_eq!(
                send(&t, &nodes[1], &middle(hidden)).await,
                Response::Accepted
            );
            fails(&mut inbound, ErrorKind::Malformed, needle).await;
        }
        let mut carry = middle(f32s(vec![1, 3, 576]));
        carry.input.carry.push(nnmesh_protocol::message::Carried {
            node: 999,
            value: f32s(vec![1]),
        });
        assert_eq!(send(&t, &nodes[1], &carry).await, Response::Accepted);
        fails(&mut inbound, ErrorKind::Malformed, "node 999").await;
        // The right input runs.
        assert_eq!(
            send(&t, &nodes[1], &middle(f32s(vec![1, 3, 576]))).await,
            Response::Accepted
        );
        assert!(
            outcome(&mut inbound).await.is_none(),
            "a good middle step runs"
        );
        // A stage takes a request's steps from its client only.
        let mut hijack = middle(f32s(vec![1, 3, 576]));
        hijack.client = PeerId::random();
        refused(
            send(&t, &nodes[1], &hijack).await,
            ErrorKind::Forbidden,
            "come from its client",
        );

        // A graph over the node count limit is refused before it is decoded.
        let huge = {
            let g = Builder::new();
            let tr = g.trace_tokens(vec![PROMPT.to_vec()]);
            let h = g.read(tr.at("model.layers.1", Point::Output));
            for _ in 0..Limits::default().max_nodes {
                let _ = -h;
            }
            g.finish()
        };
        let s = step(&t, model, route.clone(), &huge);
        assert_eq!(send(&t, &nodes[0], &s).await, Response::Accepted);
        fails(
            &mut inbound,
            ErrorKind::TooLarge,
            "nodes; the limit is 10000",
        )
        .await;
        // So is tokenizing more texts than a graph may have prompts.
        let texts = vec!["x".to_string(); 10_000];
        refused(
            raw(
                &t,
                &nodes[0],
                codec::encode(&Request::Tokenize { model, texts }),
            )
            .await
            .expect("answers"),
            ErrorKind::TooLarge,
            "texts",
        );

        // After all that, a client gets the single-node result.
        let client = mesh::Client::connect(std::slice::from_ref(&nodes[0].addr))
            .await
            .expect("connects");
        let lens = nnmesh_tests::example("lens");
        let mesh = client.run(lens.clone(), None).await.expect("serving");
        assert_same("lens after hostile input", &mesh, &local(&lens));
    });
}

#[test]
fn limits_refuse_work_before_it_runs() {
    let model_path = nnmesh_tests::model_path();
    let node = node(
        "0..30",
        None,
        &model_path,
        &["--max-sessions", "1", "--max-batch-tokens", "2048"],
    );
    let rt = rt();
    rt.block_on(async {
        // 256 invokes of a 20-token prompt: 5120 batch tokens.
        let wide = {
            let g = Builder::new();
            let tr = g.trace_tokens(vec![[PROMPT; 7].concat()[..20].to_vec(); 256]);
            g.save(
                "h",
                g.read(tr.invoke(0).at("model.layers.1", Point::Output)),
            );
            g.finish()
        };
        // The client knows the node's limits from its record.
        let client = mesh::Client::connect(std::slice::from_ref(&node.addr))
            .await
            .expect("connects");
        let e = client.run(wide.clone(), None).await.expect_err("too wide");
        assert!(matches!(e, mesh::Error::Validate(_)), "{e}");
        assert!(e.to_string().contains("max_batch_tokens"), "{e}");
        // A client that ignores them is refused by the node.
        let (t, mut inbound) =
            transport::Endpoint::start(transport::Config::new(Keypair::generate_ed25519()))
                .await
                .expect("transport");
        let addrs: Vec<String> = t
            .listen_addrs()
            .await
            .iter()
            .map(|a| a.to_string())
            .collect();
        let model = model_of(&t, &node).await;
        let route = vec![hop(&node, 0, 30)];
        let mut s = step(&t, model, route.clone(), &wide);
        s.client_addrs = addrs.clone();
        assert_eq!(send(&t, &node, &s).await, Response::Accepted);
        fails(&mut inbound, ErrorKind::Validation, "5120 batch tokens").await;

        // One open session is the limit: a second request is refused as
        // overloaded, and the first is never evicted.
        let generate = {
            let g = Builder::new();
            let tr = g.trace_tokens(vec![PROMPT.to_vec()]).generate(3);
            g.save(
                "h",
                g.read(tr.at("model.layers.25", Point::Output).all_steps()),
            );
            g.finish()
        };
        let mut first = step(&t, model, route.clone(), &generate);
        first.client_addrs = addrs.clone();
        assert_eq!(send(&t, &node, &first).await, Response::Accepted);
        assert!(outcome(&mut inbound).await.is_none());
        let mut second = step(&t, model, route.clone(), &generate);
        second.client_addrs = addrs.clone();
        assert_eq!(send(&t, &node, &second).await, Response::Accepted);
        fails(&mut inbound, ErrorKind::Overloaded, "1 sessions are open").await;
        let mut on = first.clone();
        on.input.step = 1;
        on.input.past = 3;
        on.graph = None;
        on.input.tokens = WireTensor::from_i64(vec![1, 1], &[5]).expect("one id");
        assert_eq!(send(&t, &node, &on).await, Response::Accepted);
        assert!(
            outcome(&mut inbound).await.is_none(),
            "the first request goes on"
        );
        // Closing it frees the slot.
        let close = Request::Close {
            request: first.request,
        };
        assert_eq!(
            raw(&t, &node, codec::encode(&close)).await.expect("ack"),
            Response::Ack
        );
        let lens = nnmesh_tests::example("lens");
        client.run(lens, None).await.expect("room again");
    });
}

#[test]
fn a_killed_stage_is_named_within_seconds() {
    let mut nodes = three_nodes(&nnmesh_tests::model_path());
    let rt = rt();
    let client = rt
        .block_on(mesh::Client::connect(std::slice::from_ref(&nodes[0].addr)))
        .expect("client connects");
    // A generation long enough to be running when the middle node dies.
    let graph = recipes::steering(
        recipes::prompts::STEER,
        recipes::prompts::STEER_TOWARD,
        recipes::prompts::STEER_AWAY,
        12,
        3.0,
        400,
    );
    let running = rt.spawn({
        let client = client.clone();
        async move { client.run(graph, None).await }
    });
    std::thread::sleep(Duration::from_secs(4));
    assert!(!running.is_finished(), "the generation is still running");
    let middle = nodes.remove(1);
    let peer = middle.peer;
    let t0 = Instant::now();
    drop(middle); // SIGKILL
    let e = rt
        .block_on(running)
        .expect("joins")
        .expect_err("the middle stage died");
    let noticed = t0.elapsed();
    assert!(matches!(e, mesh::Error::GaveUp { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&peer.to_string()) && msg.contains("layers 10..20"),
        "{msg}"
    );
    eprintln!("noticed the SIGKILL after {noticed:?}: {msg}");
    // The dead peer is not routed to again: the next run says what is missing.
    let e = rt
        .block_on(client.run(nnmesh_tests::example("lens"), None))
        .expect_err("no holder for 10..20");
    assert!(e.to_string().contains("layers 10..20 unserved"), "{e}");
}

#[test]
fn a_bad_model_file_stops_the_node_with_an_error() {
    let dir = temp_dir("bad-model");
    let bytes = std::fs::read(nnmesh_tests::model_path()).expect("model");
    let cut = dir.join("truncated.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).expect("write");
    let out = Command::new(nnmesh_tests::nnmesh_exe())
        .args(["node", "--blocks", "0..30", "--model"])
        .arg(&cut)
        .stdout(Stdio::null())
        .output()
        .expect("runs");
    assert!(!out.status.success(), "exits non-zero");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("error:") && err.contains("truncated.gguf"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nnmesh-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// `nnmesh keygen identity FILE`: the peer id it prints.
fn identity(path: &Path) -> PeerId {
    let out = Command::new(nnmesh_tests::nnmesh_exe())
        .args(["keygen", "identity"])
        .arg(path)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a peer id")
}

#[test]
fn private_meshes_and_allow_lists() {
    let dir = temp_dir("private");
    let model = nnmesh_tests::model_path();
    let psk = dir.join("swarm.key");
    let out = Command::new(nnmesh_tests::nnmesh_exe())
        .args(["keygen", "psk"])
        .arg(&psk)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let alice = identity(&dir.join("alice.key"));
    let bob_id = identity(&dir.join("bob.key"));
    let first = identity(&dir.join("first.key"));
    let allow = |name: &str, peers: &[PeerId]| {
        let p = dir.join(name);
        let text: String = peers.iter().map(|p| format!("{p}\n")).collect();
        std::fs::write(&p, format!("# who may use this node\n{text}")).expect("write");
        p
    };
    let s = |p: &Path| p.to_str().expect("utf-8 path").to_string();
    let (psk_s, first_key) = (s(&psk), s(&dir.join("first.key")));
    let first_allow = s(&allow("first.allow", &[alice]));
    let n0 = node(
        "0..15",
        None,
        &model,
        &[
            "--psk",
            &psk_s,
            "--identity",
            &first_key,
            "--allow-peers",
            &first_allow,
        ],
    );
    assert_eq!(n0.peer, first, "the identity file sets the peer id");
    // Every stage takes steps from the client itself: the second lists
    // Alice only, not the first stage.
    let second_allow = s(&allow("second.allow", &[alice]));
    let n1 = node(
        "15..30",
        Some(&n0.addr),
        &model,
        &["--psk", &psk_s, "--allow-peers", &second_allow],
    );
    let rt = rt();
    let client = |key: &str| {
        let mut cfg = transport::Config::new(
            keys::load_or_create_identity(&dir.join(key)).expect("identity"),
        );
        cfg.psk = Some(keys::read_psk(&psk).expect("psk"));
        rt.block_on(mesh::Client::start(cfg, std::slice::from_ref(&n0.addr)))
            .map_err(|e| e.to_string())
    };
    // Without the key, nothing connects.
    let outsider = rt.block_on(mesh::Client::connect(std::slice::from_ref(&n0.addr)));
    assert!(
        outsider.is_err(),
        "a peer without the pre-shared key cannot dial"
    );
    // Alice is listed: her requests flow through both stages.
    let lens = nnmesh_tests::example("lens");
    let alice_client = client("alice.key").expect("alice connects");
    assert_eq!(alice_client.peer_id(), alice);
    let mesh = rt
        .block_on(alice_client.run(lens.clone(), None))
        .expect("alice runs");
    assert_same("lens on a private mesh", &mesh, &local(&lens));
    // Bob has the key but is not listed: refused by name.
    let bob = client("bob.key").expect("bob connects (he has the key)");
    let e = rt
        .block_on(bob.run(lens.clone(), None))
        .expect_err("bob is not listed");
    assert!(
        e.to_string().contains("not on this node's allow-list"),
        "{e}"
    );
    // A second stage that does not list Alice refuses her steps; with no
    // other holder of its layers, fail-over gives up naming it.
    // (One identity, one client at a time: reports go to whichever
    // connection of that peer id a node has, so the first client goes.)
    drop((alice_client, bob, n1));
    let only_bob = s(&allow("strict.allow", &[bob_id]));
    let _n1 = node(
        "15..30",
        Some(&n0.addr),
        &model,
        &["--psk", &psk_s, "--allow-peers", &only_bob],
    );
    let alice_client = client("alice.key").expect("alice connects");
    let e = rt
        .block_on(alice_client.run(lens, None))
        .expect_err("alice is not listed on the second stage");
    assert!(matches!(e, mesh::Error::GaveUp { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("stage 1") && msg.contains("allow-list"),
        "{msg}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
