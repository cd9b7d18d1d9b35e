//! The mesh client against stages that misbehave: a scripted fake stage
//! (a real libp2p transport on loopback, no model) answers `Info` with a
//! valid signed record and then reports whatever the test tells it to. The
//! client must refuse every bad report with a clear error, never panic, and
//! never return a partial result.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Result;
use libp2p::{Multiaddr, identity::Keypair};
use nnmesh_client::{
    mesh,
    transport::{self, Inbound},
};
use nnmesh_graph::{Builder, DType, Graph, IndexItem::*, Limits, Manifest, Point};
use nnmesh_protocol::{
    Span, codec,
    ids::{ModelId, RequestId},
    message::{ErrorKind, ReportBody, Request, Response, Saved, StageReport, StepRequest},
    record::{SignedRecord, StageRecord},
    tensor::WireTensor,
};
use tokio::sync::{Semaphore, mpsc};

fn manifest() -> Manifest {
    Manifest {
        model: "tiny".into(),
        num_layers: 4,
        hidden: 8,
        heads: 2,
        kv_heads: 1,
        head_dim: 4,
        intermediate: 16,
        vocab: 32,
        max_positions: 64,
        dtype: DType::F32,
    }
}

/// What the fake stage sends back for one step, given the step.
type Script = Box<dyn Fn(&StepRequest) -> Vec<ReportBody> + Send + Sync>;

/// A fake stage serving all 4 layers of the tiny model.
struct FakeStage {
    transport: transport::Endpoint,
    addr: Multiaddr,
}

/// Starts a fake stage; each step is sent to `steps`, and its reports wait
/// for a permit of `gate` when one is given.
async fn fake_stage(
    script: Script,
    steps: mpsc::Sender<StepRequest>,
    gate: Option<Arc<Semaphore>>,
) -> Result<FakeStage> {
    let key = Keypair::generate_ed25519();
    let (transport, mut inbound) =
        transport::Endpoint::start(transport::Config::new(key.clone())).await?;
    let addr = transport.listen_addrs().await[0].clone();
    let t = transport.clone();
    let record = StageRecord {
        peer: t.peer_id(),
        addrs: vec![addr.to_string()],
        model: ModelId::of_bytes(b"tiny"),
        model_name: "tiny".into(),
        num_layers: 4,
        span: Span::new(0, 4),
        throughput: 1000.0,
        load: 0.0,
        limits: Limits::default(),
        replication: 2,
        expires_at_ms: SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as u64 + 60_000,
    };
    tokio::spawn(async move {
        while let Some(Inbound { request, reply, .. }) = inbound.recv().await {
            let answer = match codec::decode::<Request>(&request) {
                Ok(Request::Info) => Response::Info {
                    records: vec![SignedRecord::sign(&record, &key)],
                    manifest: postcard::to_allocvec(&manifest()).expect("encodes"),
                },
                Ok(Request::Step(step)) => {
                    let _ = steps.send((*step).clone()).await;
                    let bodies = script(&step);
                    let t = t.clone();
                    let gate = gate.clone();
                    tokio::spawn(async move {
                        if let Some(gate) = gate {
                            gate.acquire().await.expect("open").forget();
                        }
                        let client = step.client;
                        let addrs = step
                            .client_addrs
                            .iter()
                            .filter_map(|a| a.parse().ok())
                            .collect::<Vec<_>>();
                        for body in bodies {
                            let report = Request::Report(Box::new(StageReport {
                                request: step.request,
                                hop: 0,
                                peer: t.peer_id(),
                                trace: step.input.trace,
                                step: step.input.step,
                                bodies: vec![body],
                                timing: None,
                            }));
                            let _ = t
                                .request(client, addrs.clone(), codec::encode(&report))
                                .await;
                        }
                    });
                    Response::Accepted
                }
                Ok(_) => Response::Ack,
                Err(e) => Response::Error(nnmesh_protocol::message::WireError::new(
                    ErrorKind::Malformed,
                    e.to_string(),
                )),
            };
            let _ = reply.send(codec::encode(&answer));
        }
    });
    Ok(FakeStage { transport, addr })
}

/// A 2-token generation of 3 prompt tokens that saves layer 3's last
/// position at every step.
fn graph() -> Graph {
    let g = Builder::new();
    let t = g.trace_tokens(vec![vec![1, 2, 3]]).generate(2);
    let h = g.read(t.at("model.layers.3", Point::Output).all_steps());
    g.save("h", h.index([Full, At(-1), Full]));
    g.finish()
}

fn saved(step: u32) -> ReportBody {
    ReportBody::Saves(vec![Saved {
        name: "h".into(),
        step: Some(step),
        value: WireTensor::from_f32(vec![1, 8], &[0.5; 8]).expect("consistent"),
    }])
}

async fn run_against(script: Script) -> Result<(Result<(), mesh::Error>, Vec<StepRequest>)> {
    let (tx, mut rx) = mpsc::channel(16);
    let stage = fake_stage(script, tx, None).await?;
    let client = mesh::Client::connect(std::slice::from_ref(&stage.addr)).await?;
    let out = tokio::time::timeout(Duration::from_secs(60), client.run(graph(), None))
        .await?
        .map(|_| ());
    drop(stage.transport);
    let mut steps = Vec::new();
    while let Ok(s) = rx.try_recv() {
        steps.push(s);
    }
    Ok((out, steps))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_honest_fake_stage_completes() -> Result<()> {
    let (out, steps) = run_against(Box::new(|s| {
        vec![saved(s.input.step), ReportBody::Done { tokens: vec![7] }]
    }))
    .await?;
    out?;
    assert_eq!(steps.len(), 2);
    assert_eq!(
        steps[1].input.tokens.to_i64()?,
        [7],
        "the reported token is fed back"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn done_with_the_wrong_token_count_is_refused() -> Result<()> {
    // Today's panic: two tokens for one row would build a bad [1, 1] tensor.
    let (out, _) = run_against(Box::new(|s| {
        vec![saved(s.input.step), ReportBody::Done { tokens: vec![7, 8] }]
    }))
    .await?;
    let e = out.expect_err("wrong token count");
    assert!(
        matches!(e, mesh::Error::Protocol { .. }) && e.to_string().contains("expected 1"),
        "{e}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_without_its_saves_fails_by_name() -> Result<()> {
    let (out, _) = run_against(Box::new(|_| vec![ReportBody::Done { tokens: vec![7] }])).await?;
    let e = out.expect_err("partial");
    assert!(matches!(e, mesh::Error::MissingSaves { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("\"h\"") && msg.contains("stage 0 (layers 0..4"),
        "{msg}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undeclared_or_repeated_saves_are_refused() -> Result<()> {
    let (out, _) = run_against(Box::new(|s| {
        vec![
            ReportBody::Saves(vec![Saved {
                name: "not-in-the-graph".into(),
                step: Some(s.input.step),
                value: WireTensor::from_f32(vec![1], &[0.0]).expect("consistent"),
            }]),
            ReportBody::Done { tokens: vec![7] },
        ]
    }))
    .await?;
    let e = out.expect_err("undeclared save");
    assert!(e.to_string().contains("not-in-the-graph"), "{e}");

    let (out, _) = run_against(Box::new(|s| {
        vec![
            saved(s.input.step),
            saved(s.input.step),
            ReportBody::Done { tokens: vec![7] },
        ]
    }))
    .await?;
    let e = out.expect_err("save sent twice");
    assert!(e.to_string().contains("twice"), "{e}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_from_peers_off_the_route_are_refused() -> Result<()> {
    let (rogue, _inbound) =
        transport::Endpoint::start(transport::Config::new(Keypair::generate_ed25519())).await?;
    let (tx, mut rx) = mpsc::channel(16);
    // The stage reports only after the rogue has tried its report.
    let gate = Arc::new(Semaphore::new(0));
    let stage = fake_stage(
        Box::new(|s| vec![saved(s.input.step), ReportBody::Done { tokens: vec![7] }]),
        tx,
        Some(gate.clone()),
    )
    .await?;
    let client = mesh::Client::connect(std::slice::from_ref(&stage.addr)).await?;
    let run = tokio::spawn({
        let client = client.clone();
        async move { client.run(graph(), None).await }
    });
    // Learn the request id the way an eavesdropper might, then forge a
    // report claiming to be hop 0.
    let step = rx.recv().await.expect("the stage got step 0");
    let forged = Request::Report(Box::new(StageReport {
        request: RequestId(step.request.0),
        hop: 0,
        peer: stage.transport.peer_id(),
        trace: 0,
        step: 0,
        bodies: vec![ReportBody::Done { tokens: vec![9] }],
        timing: None,
    }));
    let addrs: Vec<Multiaddr> = step
        .client_addrs
        .iter()
        .filter_map(|a| a.parse().ok())
        .collect();
    let answer = rogue
        .request(client.peer_id(), addrs, codec::encode(&forged))
        .await?;
    match codec::decode::<Response>(&answer)? {
        Response::Error(e) => {
            assert_eq!(e.kind, ErrorKind::Forbidden, "{}", e.message);
            assert!(e.message.contains("not hop 0"), "{}", e.message);
        }
        other => panic!("a forged report was taken: {other:?}"),
    }
    gate.add_permits(2);
    let out = tokio::time::timeout(Duration::from_secs(60), run).await???;
    assert_eq!(out.generated, [[[7, 7]]], "the forged token was not used");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_that_vanishes_mid_step_is_named() -> Result<()> {
    let (tx, _rx) = mpsc::channel(16);
    let (gone_tx, mut gone_rx) = mpsc::channel::<()>(1);
    let stage = fake_stage(
        Box::new(move |_| {
            let _ = gone_tx.try_send(());
            Vec::new() // accepts, then never reports
        }),
        tx,
        None,
    )
    .await?;
    let peer = stage.transport.peer_id();
    let client = mesh::Client::connect(std::slice::from_ref(&stage.addr)).await?;
    let run = tokio::spawn({
        let client = client.clone();
        async move { client.run(graph(), None).await }
    });
    gone_rx.recv().await.expect("the step arrived");
    let t0 = std::time::Instant::now();
    stage.transport.shutdown().await;
    let e = tokio::time::timeout(Duration::from_secs(30), run)
        .await??
        .expect_err("the stage is gone");
    assert!(matches!(e, mesh::Error::GaveUp { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&peer.to_string()) && msg.contains("layers 0..4"),
        "{msg}"
    );
    // Noticed from the lost connection (before or after the step was
    // accepted), not from a deadline.
    assert!(msg.contains("connection"), "{msg}");
    eprintln!("noticed in {:?}: {msg}", t0.elapsed());
    Ok(())
}

/// Redundant execution against two fake holders of the same layers.
async fn verified(a: Script, b: Script) -> Result<(Result<(), mesh::Error>, [String; 2], usize)> {
    let (tx, mut rx) = mpsc::channel(16);
    let sa = fake_stage(a, tx.clone(), None).await?;
    let sb = fake_stage(b, tx, None).await?;
    let peers = [
        sa.transport.peer_id().to_string(),
        sb.transport.peer_id().to_string(),
    ];
    let client = mesh::Client::connect(&[sa.addr.clone(), sb.addr.clone()])
        .await?
        .with_verify(Some(mesh::Tolerance::default()));
    let out = tokio::time::timeout(Duration::from_secs(60), client.run(graph(), None))
        .await?
        .map(|_| ());
    let mut steps = 0;
    while rx.try_recv().is_ok() {
        steps += 1;
    }
    Ok((out, peers, steps))
}

fn honest() -> Script {
    Box::new(|s| vec![saved(s.input.step), ReportBody::Done { tokens: vec![7] }])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verification_runs_every_step_on_two_holders() -> Result<()> {
    let (out, _, steps) = verified(honest(), honest()).await?;
    out?;
    assert_eq!(steps, 4, "2 steps on each holder");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_that_lies_is_caught_and_both_are_named() -> Result<()> {
    let tampered: Script = Box::new(|s| {
        vec![
            ReportBody::Saves(vec![Saved {
                name: "h".into(),
                step: Some(s.input.step),
                value: WireTensor::from_f32(vec![1, 8], &[0.5, 0.5, 0.5, 0.7, 0.5, 0.5, 0.5, 0.5])
                    .expect("consistent"),
            }]),
            ReportBody::Done { tokens: vec![7] },
        ]
    });
    let (out, peers, _) = verified(honest(), tampered).await?;
    let e = out.expect_err("the saves differ");
    assert!(matches!(e, mesh::Error::Mismatch { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        peers.iter().all(|p| msg.contains(p))
            && msg.contains("save \"h\"")
            && msg.contains("element 3"),
        "{msg}"
    );

    let other_token: Script =
        Box::new(|s| vec![saved(s.input.step), ReportBody::Done { tokens: vec![8] }]);
    let (out, _, _) = verified(honest(), other_token).await?;
    let e = out.expect_err("the tokens differ");
    assert!(
        e.to_string().contains("tokens [7] against [8]")
            || e.to_string().contains("tokens [8] against [7]"),
        "{e}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verification_needs_a_second_holder() -> Result<()> {
    let (tx, _rx) = mpsc::channel(16);
    let stage = fake_stage(honest(), tx, None).await?;
    let client = mesh::Client::connect(std::slice::from_ref(&stage.addr))
        .await?
        .with_verify(Some(mesh::Tolerance::default()));
    let e = client.run(graph(), None).await.expect_err("one holder");
    assert!(matches!(e, mesh::Error::NoTwin { .. }), "{e}");
    assert!(e.to_string().contains("layers 0..4"), "{e}");
    Ok(())
}
