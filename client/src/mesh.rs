//! The mesh client: discover the nodes serving a model, route a graph through
//! them, and collect what each stage saved.
//!
//! [`Client::run`] tokenizes a graph's prompts on the first stage,
//! validates and partitions the graph locally against the route's own
//! limits (so a bad graph fails before anything is sent), then drives each
//! step of each trace hop by hop: every hop gets its input from the client
//! (token ids at the first, the previous hop's hidden state and carried
//! values after), and reports its saves and its output back; the last hop
//! reports the step done (with the greedy next tokens when the trace
//! generates).
//!
//! The client trusts no report blindly: a report must come from the stage of
//! the route it names, carry only the saves that stage's fragment produces,
//! and a step only ends when every save the graph declares for it has
//! arrived ([`Error::MissingSaves`] otherwise). A stage that dies is noticed
//! within seconds (connection loss, unanswered pings, and a deadline derived
//! from the stages' advertised throughput) and replaced: the client keeps
//! every input it sent each hop, so another holder of the same layers (or a
//! chain of holders covering them) replays them to rebuild the KV cache and
//! the request goes on, with the same tokens and saves
//! ([`Outcome::failovers`] counts the replacements). When no live holder can
//! take over, the request fails naming the stage ([`Error::GaveUp`]).

// Errors are the cold path and carry the context a user needs (peer ids,
// validation details); boxing them would only add noise.
#![allow(clippy::result_large_err)]
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use libp2p::{Multiaddr, PeerId, identity::Keypair};
use nnmesh_graph::{Graph, Manifest, Prompt};
use nnmesh_protocol::{
    Span, codec,
    ids::{ModelId, RequestId},
    message::{ErrorKind, Hop, Request, Response, Saved, StageReport, WireError},
    record::{STAGES_KEY, SignedRecord, StageRecord},
};
use tokio::sync::mpsc;

use crate::transport::{self, Inbound};

mod error;
mod request;
mod route;
mod verify;

pub use error::{Error, StageName};
pub use route::{Route, candidate, choose_route, coverage_gaps, holder};
pub use verify::Tolerance;

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

impl Peer {
    /// The peer as a hop of a route, running `span` (part or all of what
    /// it serves).
    pub fn hop(&self, span: Span) -> Hop {
        Hop {
            peer: self.peer,
            addrs: self.addrs.iter().map(|a| a.to_string()).collect(),
            span,
        }
    }
}

/// What a graph run through the mesh produced.
#[derive(Debug)]
pub struct Outcome {
    /// Saved values, in the order they arrived (stage order within a step).
    pub saves: Vec<Saved>,
    /// Per trace, per invoke: generated tokens.
    pub generated: Vec<Vec<Vec<u32>>>,
    /// The route at the end (after any fail-over).
    pub route: Vec<Hop>,
    /// The model id served.
    pub model: ModelId,
    /// Stages replaced along the way.
    pub failovers: u32,
    /// Per hop of the route: where its steps' time went.
    pub hops: Vec<HopStats>,
    /// Bytes of step inputs the client held at the end to replay a failed
    /// hop (token ids, hidden states and carried values, every hop).
    pub history_bytes: u64,
}

/// Where one hop's steps spent their time, as the client saw it and the
/// stage reported it (steps that ran on a replaced holder count too).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HopStats {
    /// Steps finished on this hop.
    pub steps: u32,
    /// From sending each step to its last report, summed.
    pub total: Duration,
    /// Of that, from sending each step to the stage's answer that it
    /// accepted it (the stage starts the step meanwhile).
    pub accept: Duration,
    /// Of that, waiting in the stage's queue.
    pub queued: Duration,
    /// Of that, in the stage's forward (shared with the steps batched with it).
    pub compute: Duration,
    /// Steps that shared their forward with other requests' steps.
    pub batched: u32,
    /// The largest forward a step ran in, in steps.
    pub max_batch: u32,
    /// The sizes of the forwards the steps ran in, summed (over `steps`:
    /// the mean batch a step saw).
    pub batch_sum: u64,
}

impl HopStats {
    /// What is neither queueing nor compute: the messages (serialization,
    /// the transport, both ways) and the hand-offs between tasks and
    /// threads on either side.
    pub fn overhead(&self) -> Duration {
        self.total.saturating_sub(self.queued + self.compute)
    }

    /// Adds another request's figures for the same hop.
    pub fn add(&mut self, other: &HopStats) {
        self.steps += other.steps;
        self.total += other.total;
        self.accept += other.accept;
        self.queued += other.queued;
        self.compute += other.compute;
        self.batched += other.batched;
        self.max_batch = self.max_batch.max(other.max_batch);
        self.batch_sum += other.batch_sum;
    }

    /// The mean size of the forwards this hop's steps ran in.
    pub fn mean_batch(&self) -> f64 {
        self.batch_sum as f64 / f64::from(self.steps.max(1))
    }
}

/// What a running request reports as it goes (see [`Client::run_with`]):
/// for progress displays, logs, and tests that act at a precise point.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Progress {
    /// The route was chosen.
    Route(Vec<Hop>),
    /// A hop accepted a step (after replaying `replay` earlier steps first,
    /// for a replacement).
    Accepted {
        /// The trace.
        trace: u32,
        /// The step.
        step: u32,
        /// The hop.
        stage: StageName,
        /// Steps it replays before this one.
        replay: u32,
    },
    /// A step finished on every hop.
    Step {
        /// The trace.
        trace: u32,
        /// The step.
        step: u32,
        /// Steps of the trace in all.
        steps: u32,
    },
    /// A failed stage was replaced.
    FailedOver {
        /// The stage that failed.
        failed: StageName,
        /// How it failed.
        reason: String,
        /// Its replacement (one hop or several), in layer order.
        by: Vec<Hop>,
        /// Steps the replacement replays.
        replay: u32,
    },
}

/// A running request's report queue, and the peers allowed to report to
/// it (its route, by hop).
struct Pending {
    reports: mpsc::Sender<StageReport>,
    route: Vec<PeerId>,
    /// With verification, each hop's second holder.
    twins: Vec<PeerId>,
}

type PendingMap = Arc<Mutex<HashMap<RequestId, Pending>>>;
type Known = Arc<Mutex<Option<(Instant, Vec<Peer>)>>>;
/// Peers found dead, and when.
type Dead = Arc<Mutex<HashMap<PeerId, Instant>>>;

/// A client of the mesh. Holds a libp2p transport that also receives the
/// stages' reports.
#[derive(Debug, Clone)]
pub struct Client {
    transport: transport::Endpoint,
    bootstrap: Vec<PeerId>,
    pending: PendingMap,
    /// Peers from the last discovery, reused for [`DISCOVERY_TTL`].
    known: Known,
    /// Peers that were found dead, left out of discovery for [`DEAD_TTL`].
    dead: Dead,
    /// The limits of fail-over.
    failover: nnmesh_control::failover::Config,
    /// When a hop counts as failed.
    detect: nnmesh_control::detect::Config,
    /// Redundant execution: every hop also runs on a second holder and
    /// the two must agree within this tolerance.
    verify: Option<Tolerance>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("route", &self.route)
            .finish_non_exhaustive()
    }
}

/// How long a discovery result is reused before the mesh is asked again
/// (records are re-verified then; a failed run forgets it at once).
const DISCOVERY_TTL: Duration = Duration::from_secs(20);
/// How long a discovery waits for a node's record: a node that takes
/// longer is left out of this round (the simulator's
/// `ablation-info-deadline` shows a vanished node otherwise holds every
/// fail-over up for a dial timeout).
const INFO_TIMEOUT: Duration = Duration::from_secs(2);
/// Discoveries retried (200 ms, doubling) while no route covers the model.
const COVERAGE_RETRIES: u32 = 4;
/// How long a peer found dead is left out of discovery.
const DEAD_TTL: Duration = Duration::from_secs(60);

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

impl Client {
    /// Starts a client transport (a fresh identity, listening on loopback
    /// for reports) and dials the given mesh addresses.
    ///
    /// # Errors
    /// When the transport cannot start or no address can be dialled.
    pub async fn connect(mesh: &[Multiaddr]) -> Result<Self, Error> {
        Self::connect_with(mesh, vec!["/ip4/127.0.0.1/tcp/0".parse().expect("valid")]).await
    }

    /// As [`Client::connect`], listening for reports on `listen`.
    ///
    /// # Errors
    /// When the transport cannot start or no address can be dialled.
    pub async fn connect_with(mesh: &[Multiaddr], listen: Vec<Multiaddr>) -> Result<Self, Error> {
        let mut cfg = transport::Config::new(Keypair::generate_ed25519());
        cfg.listen = listen;
        Self::start(cfg, mesh).await
    }

    /// Starts a client with the transport settings `cfg` (its identity, a
    /// private mesh's key, listen addresses for reports) and dials `mesh`.
    ///
    /// # Errors
    /// When the transport cannot start or no address can be dialled.
    pub async fn start(mut cfg: transport::Config, mesh: &[Multiaddr]) -> Result<Self, Error> {
        cfg.bootstrap = mesh.to_vec();
        let (transport, inbound) = transport::Endpoint::start(cfg).await?;
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
        let pending: PendingMap = Arc::default();
        tokio::spawn(serve_reports(inbound, pending.clone()));
        Ok(Client {
            transport,
            bootstrap,
            pending,
            known: Arc::default(),
            dead: Arc::default(),
            failover: nnmesh_control::failover::Config::default(),
            detect: nnmesh_control::detect::Config::default(),
            verify: None,
        })
    }

    /// The client with redundant execution: each hop of a request runs on
    /// two holders of its layers, and their outputs, saves and relayed
    /// values must agree within `tolerance`, or the request fails naming
    /// both ([`Error::Mismatch`]). It costs a second holder's compute and
    /// about twice the latency; it needs two holders of every hop's layers
    /// ([`Error::NoTwin`]).
    pub fn with_verify(mut self, tolerance: Option<Tolerance>) -> Self {
        self.verify = tolerance;
        self
    }

    /// The client with other fail-over limits (how many failures a request
    /// survives, how long to look for a replacement, how long a failed peer
    /// is left out).
    pub fn with_failover(mut self, cfg: nnmesh_control::failover::Config) -> Self {
        self.failover = cfg;
        self
    }

    /// The client with other failure detection (a step's deadline, how
    /// long a redial or a probe of a silent hop may take).
    pub fn with_detection(mut self, cfg: nnmesh_control::detect::Config) -> Self {
        self.detect = cfg;
        self
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
    ) -> Result<Response, Error> {
        call(&self.transport, peer, addrs, req).await
    }

    fn is_dead(&self, peer: &PeerId) -> bool {
        let mut dead = self.dead.lock().expect("not poisoned");
        dead.retain(|_, at| at.elapsed() < DEAD_TTL);
        dead.contains_key(peer)
    }

    fn mark_dead(&self, peer: PeerId) {
        self.dead
            .lock()
            .expect("not poisoned")
            .insert(peer, Instant::now());
        *self.known.lock().expect("not poisoned") = None;
    }

    /// Finds the stage-serving nodes (the DHT's providers of [`STAGES_KEY`]
    /// plus the dialled peers) and asks each for its signed record. Peers
    /// that do not answer, or were found dead within the last minute, are
    /// left out.
    ///
    /// # Errors
    /// When no node answers.
    pub async fn discover(&self) -> Result<Vec<Peer>, Error> {
        discover(&self.transport, &self.bootstrap, |p| self.is_dead(p)).await
    }

    /// The peers of the last discovery, or a new discovery when it is stale.
    async fn peers(&self) -> Result<Vec<Peer>, Error> {
        let cached = self
            .known
            .lock()
            .expect("not poisoned")
            .as_ref()
            .filter(|(at, _)| at.elapsed() < DISCOVERY_TTL)
            .map(|(_, peers)| {
                let mut peers = peers.clone();
                peers.retain(|p| !self.is_dead(&p.peer));
                peers
            });
        match cached {
            Some(p) => Ok(p),
            None => {
                let p = self.discover().await?;
                *self.known.lock().expect("not poisoned") = Some((Instant::now(), p.clone()));
                Ok(p)
            }
        }
    }

    /// Peers among which a route for `model` exists (with verification, and
    /// a second holder for each of its hops). A node that just joined may
    /// not be in the DHT yet, so a mesh that lacks layers is looked at again
    /// a few times (about 3 s in all) before the gap is reported.
    async fn routable_peers(&self, model: Option<ModelId>) -> Result<Vec<Peer>, Error> {
        let mut wait = Duration::from_millis(200);
        let mut attempt = 0;
        loop {
            let peers = match self.peers().await {
                Ok(p) => p,
                Err(Error::NoPeers) if attempt < COVERAGE_RETRIES => Vec::new(),
                Err(e) => return Err(e),
            };
            let verifiable =
                |route: &Route<'_>| self.verify.is_none() || request::twins(&peers, route).is_ok();
            match choose_route(&peers, model) {
                Ok((_, route)) if verifiable(&route) => return Ok(peers),
                Ok(_) | Err(Error::Coverage(_)) if attempt < COVERAGE_RETRIES => {}
                Ok(_) => return Ok(peers),
                Err(e) => return Err(e),
            }
            *self.known.lock().expect("not poisoned") = None;
            tokio::time::sleep(wait).await;
            wait *= 2;
            attempt += 1;
        }
    }

    /// The tokenizer of the model (the one fully served, unless given), as
    /// `tokenizer.json` bytes from a node that serves it: a client needs no
    /// weights to tokenize prompts or show tokens.
    ///
    /// # Errors
    /// Discovery, no fully served model, or no node that sends it.
    pub async fn tokenizer(&self, model: Option<ModelId>) -> Result<(ModelId, Vec<u8>), Error> {
        let peers = self.routable_peers(model).await?;
        let (model, route) = choose_route(&peers, model)?;
        let mut last = Error::NoPeers;
        for (p, _) in route {
            match self
                .call(p.peer, p.addrs.clone(), &Request::Tokenizer { model })
                .await
            {
                Ok(Response::Tokenizer { json }) => return Ok((model, json)),
                Ok(other) => {
                    last = Error::Protocol {
                        peer: p.peer,
                        detail: format!("Tokenizer answered {other:?}"),
                    }
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Runs a graph through the mesh and collects its saves.
    ///
    /// # Errors
    /// Discovery, validation, partitioning, a stage failure or a lost stage
    /// (naming it), or a result that would be partial.
    pub async fn run(&self, graph: Graph, model: Option<ModelId>) -> Result<Outcome, Error> {
        request::run(self, graph, model, &mut |_| {}).await
    }

    /// [`Client::run`], calling `progress` at each step of the way (the
    /// route, each hop's step, each step done, each fail-over). The call is
    /// made from the request's task: keep it short.
    ///
    /// # Errors
    /// As [`Client::run`].
    pub async fn run_with(
        &self,
        graph: Graph,
        model: Option<ModelId>,
        mut progress: impl FnMut(&Progress) + Send,
    ) -> Result<Outcome, Error> {
        request::run(self, graph, model, &mut progress).await
    }

    /// Replaces a graph's text prompts by token ids, asking the first of
    /// `peers` (nodes serving `model`) that answers; unreachable ones are
    /// marked dead.
    async fn tokenize_prompts(
        &self,
        peers: &[&Peer],
        model: ModelId,
        graph: &mut Graph,
    ) -> Result<(), Error> {
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
        let count = texts.len();
        let mut last = Error::NoPeers;
        let mut answer = None;
        for p in peers {
            if self.is_dead(&p.peer) {
                // (Listed twice, or found dead meanwhile.)
                continue;
            }
            let req = Request::Tokenize {
                model,
                texts: texts.clone(),
            };
            match self.call(p.peer, p.addrs.clone(), &req).await {
                Ok(Response::Tokens(ids)) if ids.len() == count => {
                    answer = Some(ids);
                    break;
                }
                Ok(other) => {
                    return Err(Error::Protocol {
                        peer: p.peer,
                        detail: format!("Tokenize of {count} texts answered {other:?}"),
                    });
                }
                Err(e @ Error::Request { .. }) => {
                    self.mark_dead(p.peer);
                    last = e;
                }
                Err(e) => return Err(e),
            }
        }
        let Some(ids) = answer else {
            return Err(last);
        };
        let mut ids = ids.into_iter();
        for inv in graph.traces.iter_mut().flat_map(|t| &mut t.invokes) {
            if matches!(inv.prompt, Prompt::Text(_))
                && let Some(tokens) = ids.next()
            {
                inv.prompt = Prompt::Tokens(tokens);
            }
        }
        Ok(())
    }
}

/// Finds the stage-serving nodes through `transport` (the DHT's providers
/// of [`STAGES_KEY`], plus `seeds`) and asks each for its signed record;
/// peers that do not answer, or that `skip` names, are left out. Clients
/// ([`Client::discover`]) and auto-placed nodes use it.
///
/// # Errors
/// When no node answers.
pub async fn discover(
    transport: &transport::Endpoint,
    seeds: &[PeerId],
    skip: impl Fn(&PeerId) -> bool,
) -> Result<Vec<Peer>, Error> {
    let mut ids: Vec<PeerId> = seeds.to_vec();
    // The DHT fills in as the bootstrap peers answer: retry briefly.
    for attempt in 0..10 {
        if let Ok(found) = transport.providers(STAGES_KEY.to_vec()).await {
            for p in found {
                if !ids.contains(&p) {
                    ids.push(p);
                }
            }
        }
        if ids.len() > seeds.len() || attempt >= 3 && !ids.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ids.retain(|p| !skip(p));
    // A vanished provider must not hold the round up for a dial timeout.
    let answers = futures::future::join_all(ids.into_iter().map(|id| async move {
        let t0 = Instant::now();
        let answer = tokio::time::timeout(
            INFO_TIMEOUT,
            call(transport, id, Vec::new(), &Request::Info),
        )
        .await;
        (id, answer, t0.elapsed())
    }))
    .await;
    let mut peers = Vec::new();
    for (id, answer, rtt) in answers {
        let (records, manifest) = match answer {
            Ok(Ok(Response::Info { records, manifest })) => (records, manifest),
            Ok(Ok(other)) => {
                tracing::warn!(peer = %id, ?other, "unexpected Info answer");
                continue;
            }
            Ok(Err(e)) => {
                tracing::warn!(peer = %id, error = %e, "peer did not answer Info");
                continue;
            }
            Err(_) => {
                tracing::warn!(peer = %id, "peer did not answer Info within {INFO_TIMEOUT:?}");
                continue;
            }
        };
        if records.is_empty() {
            // A node still choosing its layers.
            continue;
        }
        let Ok(manifest) = postcard::from_bytes::<Manifest>(&manifest) else {
            tracing::warn!(peer = %id, "undecodable manifest");
            continue;
        };
        for record in verified_records(&records, now_ms()) {
            // A node speaks for itself only.
            if record.peer != id {
                tracing::warn!(peer = %id, "record names another peer; ignored");
                continue;
            }
            peers.push(Peer {
                peer: id,
                addrs: record.addrs.iter().filter_map(|a| a.parse().ok()).collect(),
                record,
                rtt_ms: rtt.as_secs_f32() * 1e3,
                manifest: manifest.clone(),
            });
        }
    }
    if peers.is_empty() {
        return Err(Error::NoPeers);
    }
    Ok(peers)
}

/// Sends `req` to `peer` and decodes the answer; an error answer is
/// [`Error::Remote`].
async fn call(
    transport: &transport::Endpoint,
    peer: PeerId,
    addrs: Vec<Multiaddr>,
    req: &Request,
) -> Result<Response, Error> {
    let bytes = transport
        .request(peer, addrs, codec::encode(req))
        .await
        .map_err(|source| Error::Request { peer, source })?;
    match codec::decode::<Response>(&bytes) {
        Ok(Response::Error(error)) => Err(Error::Remote { peer, error }),
        Ok(r) => Ok(r),
        Err(e) => Err(Error::Protocol {
            peer,
            detail: e.to_string(),
        }),
    }
}

/// A random `u64`: std's `RandomState` keys (seeded from the OS per
/// process) hashing a counter, so values from one process are distinct.
/// For request ids and fault injection; not for keys.
pub fn random_u64() -> u64 {
    use std::{
        hash::{BuildHasher, Hasher},
        sync::atomic::{AtomicU64, Ordering},
    };
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.finish()
}

/// Answers the stages' reports: each goes to the run waiting for its
/// request, if it comes from the stage of that request's route it names.
async fn serve_reports(mut inbound: mpsc::Receiver<Inbound>, pending: PendingMap) {
    while let Some(inb) = inbound.recv().await {
        let answer = match codec::decode::<Request>(&inb.request) {
            Ok(Request::Report(report)) => {
                let target = pending
                    .lock()
                    .expect("not poisoned")
                    .get(&report.request)
                    .map(|p| {
                        let hop = report.hop as usize;
                        let on_route = p.route.get(hop) == Some(&inb.peer)
                            || p.twins.get(hop) == Some(&inb.peer);
                        (p.reports.clone(), on_route)
                    });
                match target {
                    None => Response::Error(WireError::new(
                        ErrorKind::UnknownRequest,
                        "no such request here",
                    )),
                    Some((_, on_route)) if !on_route || report.peer != inb.peer => {
                        tracing::warn!(peer = %inb.peer, hop = report.hop, "report from a peer off the route");
                        Response::Error(WireError::new(
                            ErrorKind::Forbidden,
                            format!(
                                "{} is not hop {} of request {}'s route",
                                inb.peer, report.hop, report.request
                            ),
                        ))
                    }
                    Some((tx, _)) if tx.send(*report).await.is_ok() => Response::Ack,
                    Some(_) => Response::Error(WireError::new(
                        ErrorKind::UnknownRequest,
                        "the request has ended",
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
