//! The mesh client: discover the nodes serving a model, route a graph through
//! them, and collect what each stage saved.
//!
//! [`MeshClient::run`] tokenizes a graph's prompts on the first stage,
//! validates and partitions the graph locally (so a bad graph fails before
//! anything is sent), then drives each step of each trace: the first hop gets
//! a `Step`, every hop pushes hidden state and carry to the next, saves come
//! back as reports, and the last hop reports the step done (with the greedy
//! next tokens when the trace generates).

// Errors are the cold path and carry the context a user needs (peer ids,
// validation details); boxing them would only add noise.
#![allow(clippy::result_large_err)]
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use libp2p::{Multiaddr, PeerId, identity::Keypair};
use nnmesh_graph::{
    Graph, Inputs, Limits, Manifest, PartitionError, Prompt, StageSpan, ValidateError, partition,
    validate,
};
use nnmesh_protocol::{
    codec,
    ids::{ModelId, RequestId},
    message::{
        Carried, ErrorKind, Hop, ReportBody, Request, Response, Saved, StageReport, StepRequest,
        WireError,
    },
    record::{SignedRecord, StageRecord},
    tensor::WireTensor,
};
use tokio::sync::mpsc;

use crate::transport::{Inbound, RequestError, Transport, TransportConfig, TransportError};

mod route;

pub use route::{choose_route, coverage_gaps, holders_per_layer};

/// The DHT provider key every stage-serving node announces.
pub const STAGES_KEY: &[u8] = b"nnmesh/stages/v1";

/// How long one step may take end to end before the client gives up.
const STEP_TIMEOUT: Duration = Duration::from_secs(300);

/// What went wrong talking to the mesh.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// The client's own transport failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// A request got no answer.
    #[error("request to {peer} failed: {source}")]
    Request {
        /// The peer asked.
        peer: PeerId,
        /// Why (and what is known about remote side effects).
        source: RequestError,
    },
    /// A peer refused a request.
    #[error("{peer} answered with an error: {error}")]
    Remote {
        /// The peer.
        peer: PeerId,
        /// Its error.
        error: WireError,
    },
    /// A peer's answer made no sense.
    #[error("{peer} sent an unexpected or undecodable answer: {detail}")]
    Protocol {
        /// The peer.
        peer: PeerId,
        /// What was wrong.
        detail: String,
    },
    /// Discovery found nobody.
    #[error("no stage-serving node found in the mesh")]
    NoPeers,
    /// No model has every layer served.
    #[error("no model is fully served: {0}")]
    Coverage(String),
    /// More than one model is fully served and none was chosen.
    #[error("several models are fully served ({0}); choose one with --model-id")]
    Ambiguous(String),
    /// The graph failed validation against the model's manifest.
    #[error("invalid graph: {0}")]
    Validate(#[from] ValidateError),
    /// The graph cannot run along the route.
    #[error("cannot split the graph along the route: {0}")]
    Partition(#[from] PartitionError),
    /// A stage reported a failure; earlier stages may have run the step.
    #[error("stage {hop} ({peer}) failed at trace {trace}, step {step}: {error}")]
    Stage {
        /// The hop's index in the route.
        hop: u32,
        /// The hop's peer.
        peer: String,
        /// The trace.
        trace: u32,
        /// The step.
        step: u32,
        /// The stage's error.
        error: WireError,
    },
    /// A step did not finish in time.
    #[error(
        "no answer for trace {trace}, step {step} within {secs} s (the stages may still be working)"
    )]
    Timeout {
        /// The trace.
        trace: u32,
        /// The step.
        step: u32,
        /// The time waited.
        secs: u64,
    },
}

/// A node found in the mesh, with its verified record.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The peer's id.
    pub peer: PeerId,
    /// Its addresses.
    pub addrs: Vec<Multiaddr>,
    /// Its verified record.
    pub record: StageRecord,
    /// Round-trip time of the `Info` request, in ms.
    pub rtt_ms: f32,
    /// The model manifest it serves.
    pub manifest: Manifest,
}

/// One stage of the route a request took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteHop {
    /// The peer.
    pub peer: PeerId,
    /// First layer.
    pub start: u32,
    /// End layer (exclusive).
    pub end: u32,
}

/// What a graph run through the mesh produced.
#[derive(Debug)]
pub struct MeshOutcome {
    /// Saved values, in the order they arrived (stage order within a step).
    pub saves: Vec<Saved>,
    /// Per trace, per invoke: generated tokens.
    pub generated: Vec<Vec<Vec<u32>>>,
    /// The route taken.
    pub route: Vec<RouteHop>,
    /// The model id served.
    pub model: ModelId,
}

type Pending = Arc<Mutex<HashMap<RequestId, mpsc::Sender<StageReport>>>>;
type Known = Arc<Mutex<Option<(Instant, Vec<Peer>)>>>;

/// A client of the mesh. Holds a libp2p transport that also receives the
/// stages' reports.
#[derive(Debug, Clone)]
pub struct MeshClient {
    transport: Transport,
    bootstrap: Vec<PeerId>,
    pending: Pending,
    /// Peers from the last discovery, reused for [`DISCOVERY_TTL`].
    known: Known,
}

/// How long a discovery result is reused before the mesh is asked again
/// (records are re-verified then; a failed run forgets it at once).
const DISCOVERY_TTL: Duration = Duration::from_secs(20);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Verifies signed records, dropping (and logging) those that fail.
pub fn verified_records(records: &[SignedRecord], now_ms: u64) -> Vec<StageRecord> {
    records
        .iter()
        .filter_map(|r| match r.verify(now_ms) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(error = %e, "dropping a mesh record");
                None
            }
        })
        .collect()
}

impl MeshClient {
    /// Starts a client transport (listening on loopback for reports) and
    /// dials the given mesh addresses.
    ///
    /// # Errors
    /// When the transport cannot start or no address can be dialled.
    pub async fn connect(mesh: &[Multiaddr]) -> Result<Self, MeshError> {
        Self::connect_with(mesh, vec!["/ip4/127.0.0.1/tcp/0".parse().expect("valid")]).await
    }

    /// As [`MeshClient::connect`], listening for reports on `listen`.
    ///
    /// # Errors
    /// When the transport cannot start or no address can be dialled.
    pub async fn connect_with(
        mesh: &[Multiaddr],
        listen: Vec<Multiaddr>,
    ) -> Result<Self, MeshError> {
        let mut cfg = TransportConfig::new(Keypair::generate_ed25519());
        cfg.listen = listen;
        cfg.bootstrap = mesh.to_vec();
        let (transport, inbound) = Transport::start(cfg).await?;
        let mut bootstrap = Vec::new();
        let mut last_err = None;
        for addr in mesh {
            match transport.dial(addr.clone()).await {
                Ok(p) => bootstrap.push(p),
                Err(e) => last_err = Some(e),
            }
        }
        if bootstrap.is_empty()
            && let Some(e) = last_err
        {
            return Err(e.into());
        }
        let pending: Pending = Arc::default();
        tokio::spawn(serve_reports(inbound, pending.clone()));
        Ok(MeshClient {
            transport,
            bootstrap,
            pending,
            known: Arc::default(),
        })
    }

    /// The client's own peer id.
    pub fn peer_id(&self) -> PeerId {
        self.transport.peer_id()
    }

    async fn call(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        req: &Request,
    ) -> Result<Response, MeshError> {
        let bytes = self
            .transport
            .request(peer, addrs, codec::encode(req))
            .await
            .map_err(|source| MeshError::Request { peer, source })?;
        match codec::decode::<Response>(&bytes) {
            Ok(Response::Error(error)) => Err(MeshError::Remote { peer, error }),
            Ok(r) => Ok(r),
            Err(e) => Err(MeshError::Protocol {
                peer,
                detail: e.to_string(),
            }),
        }
    }

    /// Finds the stage-serving nodes (the DHT's providers of [`STAGES_KEY`]
    /// plus the dialled peers) and asks each for its signed record.
    ///
    /// # Errors
    /// When no node answers.
    pub async fn discover(&self) -> Result<Vec<Peer>, MeshError> {
        let mut ids: Vec<PeerId> = self.bootstrap.clone();
        // The DHT fills in as the bootstrap peers answer: retry briefly.
        for attempt in 0..10 {
            if let Ok(found) = self.transport.providers(STAGES_KEY.to_vec()).await {
                for p in found {
                    if !ids.contains(&p) {
                        ids.push(p);
                    }
                }
            }
            if ids.len() > self.bootstrap.len() || attempt >= 3 && !ids.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut peers = Vec::new();
        for id in ids {
            let t0 = Instant::now();
            let (records, manifest) = match self.call(id, Vec::new(), &Request::Info).await {
                Ok(Response::Info { records, manifest }) => (records, manifest),
                Ok(other) => {
                    tracing::warn!(peer = %id, ?other, "unexpected Info answer");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(peer = %id, error = %e, "peer did not answer Info");
                    continue;
                }
            };
            let rtt_ms = t0.elapsed().as_secs_f32() * 1e3;
            let Ok(manifest) = postcard::from_bytes::<Manifest>(&manifest) else {
                tracing::warn!(peer = %id, "undecodable manifest");
                continue;
            };
            for record in verified_records(&records, now_ms()) {
                // A node speaks for itself only.
                if PeerId::from_bytes(&record.peer).ok() != Some(id) {
                    tracing::warn!(peer = %id, "record names another peer; ignored");
                    continue;
                }
                peers.push(Peer {
                    peer: id,
                    addrs: record.addrs.iter().filter_map(|a| a.parse().ok()).collect(),
                    record,
                    rtt_ms,
                    manifest: manifest.clone(),
                });
            }
        }
        if peers.is_empty() {
            return Err(MeshError::NoPeers);
        }
        Ok(peers)
    }

    /// Runs a graph through the mesh and collects its saves.
    ///
    /// # Errors
    /// Discovery, validation, partitioning, or a stage failure (naming the stage).
    pub async fn run(
        &self,
        mut graph: Graph,
        model: Option<ModelId>,
    ) -> Result<MeshOutcome, MeshError> {
        let cached = self
            .known
            .lock()
            .expect("not poisoned")
            .as_ref()
            .filter(|(at, _)| at.elapsed() < DISCOVERY_TTL)
            .map(|(_, peers)| peers.clone());
        let peers = match cached {
            Some(p) => p,
            None => {
                let p = self.discover().await?;
                *self.known.lock().expect("not poisoned") = Some((Instant::now(), p.clone()));
                p
            }
        };
        let (model, route) = choose_route(&peers, model)?;
        let manifest = route[0].manifest.clone();
        let hops: Vec<Hop> = route
            .iter()
            .map(|p| Hop {
                peer: p.peer.to_bytes(),
                addrs: p.addrs.iter().map(|a| a.to_string()).collect(),
                start: p.record.start,
                end: p.record.end,
            })
            .collect();
        let first = route[0];
        self.tokenize_prompts(first, model, &mut graph).await?;
        let inputs = Inputs::from_tokens(&graph).expect("prompts were tokenized");
        let plan = validate(&graph, &manifest, &inputs, &Limits::default())?;
        let spans: Vec<StageSpan> = hops
            .iter()
            .map(|h| StageSpan {
                start: h.start,
                end: h.end,
            })
            .collect();
        partition(&graph, &plan, &manifest, &spans)?;

        let request = RequestId(rand_u64());
        let (tx, mut rx) = mpsc::channel(64);
        self.pending
            .lock()
            .expect("not poisoned")
            .insert(request, tx);
        let client_addrs: Vec<String> = self
            .transport
            .listen_addrs()
            .await
            .iter()
            .map(|a| a.to_string())
            .collect();
        let graph_bytes = graph.to_postcard();
        let mut saves = Vec::new();
        let mut relayed = Vec::new();
        let mut generated = Vec::new();
        let result: Result<(), MeshError> = async {
            for (t, trace) in graph.traces.iter().enumerate() {
                let rows = trace.invokes.len();
                let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); rows];
                let mut last: Vec<u32> = Vec::new();
                for step in 0..plan.steps[t] {
                    let ids: Vec<i64> = last.iter().map(|&i| i64::from(i)).collect();
                    let shape = if step == 0 {
                        vec![0, 0]
                    } else {
                        vec![rows as u64, 1]
                    };
                    let msg = StepRequest {
                        request,
                        client: self.transport.peer_id().to_bytes(),
                        client_addrs: client_addrs.clone(),
                        model,
                        route: hops.clone(),
                        hop: 0,
                        graph: (step == 0).then(|| graph_bytes.clone()),
                        trace: t as u32,
                        step,
                        tokens: WireTensor::from_i64(shape, &ids).expect("shape matches ids"),
                        hidden: None,
                        // Values later stages sent back for earlier ones.
                        carry: std::mem::take(&mut relayed),
                    };
                    match self
                        .call(
                            first.peer,
                            first.addrs.clone(),
                            &Request::Step(Box::new(msg)),
                        )
                        .await?
                    {
                        Response::Accepted => {}
                        other => {
                            return Err(MeshError::Protocol {
                                peer: first.peer,
                                detail: format!("Step answered {other:?}"),
                            });
                        }
                    }
                    let done = self
                        .await_step(&mut rx, t as u32, step, &hops, &mut saves, &mut relayed)
                        .await?;
                    if trace.max_new_tokens > 0 && !done.is_empty() {
                        for (row, &id) in tokens.iter_mut().zip(&done) {
                            row.push(id);
                        }
                        last = done;
                    }
                }
                generated.push(tokens);
            }
            Ok(())
        }
        .await;
        self.pending.lock().expect("not poisoned").remove(&request);
        let close = Request::Close { request };
        let closes = route
            .iter()
            .map(|p| self.call(p.peer, p.addrs.clone(), &close));
        futures::future::join_all(closes).await;
        if result.is_err() {
            // The mesh may have changed under us: look again next time.
            *self.known.lock().expect("not poisoned") = None;
        }
        result?;
        Ok(MeshOutcome {
            saves,
            generated,
            route: route
                .iter()
                .map(|p| RouteHop {
                    peer: p.peer,
                    start: p.record.start,
                    end: p.record.end,
                })
                .collect(),
            model,
        })
    }

    async fn await_step(
        &self,
        rx: &mut mpsc::Receiver<StageReport>,
        trace: u32,
        step: u32,
        hops: &[Hop],
        saves: &mut Vec<Saved>,
        relayed: &mut Vec<Carried>,
    ) -> Result<Vec<u32>, MeshError> {
        let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
        loop {
            let report = tokio::time::timeout_at(deadline, rx.recv())
                .await
                .map_err(|_| MeshError::Timeout {
                    trace,
                    step,
                    secs: STEP_TIMEOUT.as_secs(),
                })?
                .ok_or(MeshError::Timeout {
                    trace,
                    step,
                    secs: 0,
                })?;
            if (report.trace, report.step) != (trace, step) {
                tracing::warn!(
                    report.trace,
                    report.step,
                    "report for another step; ignored"
                );
                continue;
            }
            match report.body {
                ReportBody::Saves(s) => saves.extend(s),
                ReportBody::Relay(values) => relayed.extend(values),
                ReportBody::Done { tokens } => return Ok(tokens),
                ReportBody::Failed(error) => {
                    let peer = hops
                        .get(report.hop as usize)
                        .and_then(|h| PeerId::from_bytes(&h.peer).ok())
                        .map_or_else(|| "?".to_string(), |p| p.to_string());
                    return Err(MeshError::Stage {
                        hop: report.hop,
                        peer,
                        trace,
                        step,
                        error,
                    });
                }
            }
        }
    }

    async fn tokenize_prompts(
        &self,
        first: &Peer,
        model: ModelId,
        graph: &mut Graph,
    ) -> Result<(), MeshError> {
        let texts: Vec<String> = graph
            .traces
            .iter()
            .flat_map(|t| &t.invokes)
            .filter_map(|i| match &i.prompt {
                Prompt::Text(s) => Some(s.clone()),
                Prompt::Tokens(_) => None,
            })
            .collect();
        if texts.is_empty() {
            return Ok(());
        }
        let ids = match self
            .call(
                first.peer,
                first.addrs.clone(),
                &Request::Tokenize { model, texts },
            )
            .await?
        {
            Response::Tokens(ids) => ids,
            other => {
                return Err(MeshError::Protocol {
                    peer: first.peer,
                    detail: format!("Tokenize answered {other:?}"),
                });
            }
        };
        let mut ids = ids.into_iter();
        for inv in graph.traces.iter_mut().flat_map(|t| &mut t.invokes) {
            if matches!(inv.prompt, Prompt::Text(_)) {
                inv.prompt = Prompt::Tokens(ids.next().ok_or_else(|| MeshError::Protocol {
                    peer: first.peer,
                    detail: "fewer tokenized prompts than sent".into(),
                })?);
            }
        }
        Ok(())
    }
}

fn rand_u64() -> u64 {
    // std's RandomState is seeded from the OS per process; a counter keeps
    // ids from one client distinct.
    use std::{
        hash::{BuildHasher, Hasher},
        sync::atomic::{AtomicU64, Ordering},
    };
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.finish()
}

/// Answers the stages' reports: each goes to the run waiting for its request.
async fn serve_reports(mut inbound: mpsc::Receiver<Inbound>, pending: Pending) {
    while let Some(inb) = inbound.recv().await {
        let answer = match codec::decode::<Request>(&inb.request) {
            Ok(Request::Report(report)) => {
                let tx = pending
                    .lock()
                    .expect("not poisoned")
                    .get(&report.request)
                    .cloned();
                match tx {
                    Some(tx) if tx.send(*report).await.is_ok() => Response::Ack,
                    _ => Response::Error(WireError::new(
                        ErrorKind::UnknownRequest,
                        "no such request here",
                    )),
                }
            }
            Ok(_) => Response::Error(WireError::new(
                ErrorKind::UnknownRequest,
                "this peer is a client; it only takes reports",
            )),
            Err(e) => Response::Error(WireError::new(ErrorKind::Malformed, e.to_string())),
        };
        let _ = inb.reply.send(codec::encode(&answer));
    }
}
