//! A node on the mesh: serve a block range of a model ([`run`]).
//!
//! The node loads its stage on a thread of its own ([`stage::spawn`]),
//! starts a libp2p endpoint, announces itself as a provider of
//! [`STAGES_KEY`] in the DHT, answers `Info` with a freshly signed record,
//! and runs `Step` requests: admitted through a bounded semaphore (refused
//! as overloaded beyond it), answered `Accepted` at once, computed on the
//! stage thread, then reported to the client: saves, relayed values, and
//! the step's output (the next hop's input) or, on the last hop, its end.
//! A compute permit is never held across a network call.
//!
//! What the node checks before anything reaches the stage: the message
//! decodes, names this node's model, layers it holds and this node as the
//! hop, and comes from the request's client; with an allow-list
//! ([`Config::allow`]), that the client is listed. The stage then checks the step's contents (see [`crate::stage`]).

use std::{
    collections::HashSet,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{SystemTime, UNIX_EPOCH},
};

use actix::Addr;
use libp2p::{Multiaddr, PeerId, identity::Keypair, pnet::PreSharedKey};
use nnmesh_client::{
    mesh,
    transport::{self, Inbound},
};
use nnmesh_graph::Limits;
use nnmesh_protocol::{
    Span, codec,
    ids::ModelId,
    message::{
        ErrorKind, HopOutput, ReportBody, Request, Response, Saved, StageReport, StepRequest,
        StepTiming, WireError,
    },
    record::{STAGES_KEY, SignedRecord, StageRecord},
};
use nnmesh_runtime::checkpoint::{Checkpoint, LoadError};
use tokio::sync::{Semaphore, mpsc};
use tracing::Instrument;

use nnmesh_control::placement;

use crate::stage::{self, Close, Next, RunStep, StageActor};

mod auto;

/// How a node serves: its stage, its network settings, whom it serves.
#[derive(Debug, Clone)]
pub struct Config {
    /// The stage: model, layers, dtype, device, limits.
    pub stage: stage::Config,
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// Mesh nodes to join through.
    pub bootstrap: Vec<Multiaddr>,
    /// The node's identity (its peer id).
    pub keypair: Keypair,
    /// A private mesh's pre-shared key.
    pub psk: Option<PreSharedKey>,
    /// When set, the only clients served; `Info` is answered for everyone.
    pub allow: Option<HashSet<PeerId>>,
    /// Steps and tokenizations admitted at once; more are refused as overloaded.
    pub queue: usize,
    /// Also discover peers on the LAN with mDNS.
    pub mdns: bool,
    /// Largest message accepted or sent, in bytes.
    pub max_message: usize,
    /// When set, the node chooses its layers itself (and moves when the
    /// mesh needs it); `stage.span` is then ignored.
    pub auto: Option<Auto>,
    /// The replication floor this node asks of the mesh (announced in its
    /// record; the highest announced wins).
    pub replication: u32,
    /// Fault injection, for tests and benchmarks: the probability that a
    /// step is answered as if the node had lost the request's session
    /// ([`ErrorKind::UnknownRequest`], the session dropped), so clients fail
    /// over without anything being killed. 0 in production.
    pub inject_faults: f64,
}

impl Config {
    /// Serves `stage` on a fresh identity, listening on `127.0.0.1` (any
    /// port), open to everyone, with a queue of 64 steps and 256 MiB messages.
    pub fn new(stage: stage::Config) -> Config {
        Config {
            stage,
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("a valid multiaddr")],
            bootstrap: Vec::new(),
            keypair: Keypair::generate_ed25519(),
            psk: None,
            allow: None,
            queue: 64,
            mdns: false,
            max_message: 256 << 20,
            auto: None,
            replication: 2,
            inject_faults: 0.0,
        }
    }
}

/// Automatic placement ([`Config::auto`]).
#[derive(Debug, Clone)]
pub struct Auto {
    /// Memory the node may use for weights and KV cache, in bytes: with the
    /// model's layer size, this sets how many layers it serves.
    pub max_memory: u64,
    /// When and how it moves (the replication floor comes from
    /// [`Config::replication`]).
    pub placement: placement::Config,
}

/// What a node that started serving tells its caller.
#[derive(Debug, Clone)]
pub struct Ready {
    /// The node's peer id.
    pub peer: PeerId,
    /// Its listening addresses, each ending in `/p2p/<peer id>`.
    pub addrs: Vec<Multiaddr>,
    /// The model id (blake3 of its files).
    pub model: ModelId,
    /// The layers served.
    pub span: Span,
    /// Measured throughput of the stage, tokens per second.
    pub throughput: f32,
}

/// Why a node did not start, or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The model cannot be opened.
    #[error(transparent)]
    Checkpoint(#[from] LoadError),
    /// The layers asked for are not the model's.
    #[error("layers {span} are outside the model's {layers} layers")]
    Span {
        /// The layers asked for.
        span: Span,
        /// The model's layer count.
        layers: usize,
    },
    /// The memory budget holds no layer of the model.
    #[error(
        "--max-memory of {budget} MiB holds no layer: one layer takes {layer} MiB, plus {outer} MiB for the embedding and lm_head and {kv} MiB of KV cache (--kv-cache-mib)"
    )]
    Memory {
        /// The budget, MiB.
        budget: u64,
        /// One layer, MiB.
        layer: u64,
        /// Embedding and head, MiB.
        outer: u64,
        /// KV cache budget, MiB.
        kv: u64,
    },
    /// The model's files cannot be hashed into its id.
    #[error("hashing {path}: {source}")]
    Hash {
        /// The model file or folder.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The stage could not be loaded.
    #[error("loading {path}: {source}")]
    Stage {
        /// The model file or folder.
        path: PathBuf,
        /// Why.
        source: stage::StartError,
    },
    /// The network endpoint could not start.
    #[error(transparent)]
    Transport(#[from] transport::Error),
    /// The stage can no longer compute; the node withdrew from the mesh.
    #[error("{0}; withdrew from the mesh")]
    Fatal(String),
}

/// The serving side of a node: what every request handler shares.
struct Server {
    endpoint: transport::Endpoint,
    keypair: Keypair,
    model: ModelId,
    num_layers: u32,
    /// The stage served now; `None` while an auto-placed node has not
    /// chosen its layers.
    serving: RwLock<Option<Serving>>,
    limits: Limits,
    addrs: Vec<String>,
    admit: Arc<Semaphore>,
    queue: usize,
    max_message: usize,
    allow: Option<HashSet<PeerId>>,
    replication: u32,
    fatal: mpsc::Sender<String>,
    /// See [`Config::inject_faults`], as a threshold on a random `u64`.
    fault_threshold: u64,
}

/// A loaded stage and what it serves.
#[derive(Clone)]
struct Serving {
    span: Span,
    stage: Addr<StageActor>,
    throughput: f32,
    model_name: String,
    /// The model manifest, postcard-encoded for `Info`.
    manifest: Arc<Vec<u8>>,
    /// `tokenizer.json`, for weightless clients.
    tokenizer: Arc<Vec<u8>>,
}

impl Serving {
    fn new(span: Span, stage: Addr<StageActor>, info: stage::Info) -> Serving {
        Serving {
            span,
            stage,
            throughput: info.throughput,
            model_name: info.manifest.model.clone(),
            manifest: Arc::new(postcard::to_allocvec(&info.manifest).expect("a manifest encodes")),
            tokenizer: Arc::new(info.tokenizer),
        }
    }
}

/// Drops `step`'s session on `stage` (its client fails over).
fn close(stage: &Addr<StageActor>, step: &StepRequest) {
    let _ = stage.try_send(Close {
        request: step.request,
        client: step.client,
    });
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Serves `cfg` until Ctrl-C (or SIGTERM); `on_ready` is called once the
/// stage is loaded and the node listens. Blocks the calling thread (it runs
/// its own actix system on a tokio runtime).
///
/// # Errors
/// A model that cannot be opened or loaded, layers it does not have, a
/// network endpoint that cannot start, or a stage that can no longer
/// compute (after withdrawing from the mesh).
pub fn run(cfg: Config, on_ready: impl FnOnce(&Ready)) -> Result<(), Error> {
    let path = cfg.stage.model.clone();
    // Check the file and the range here, where errors can still be reported
    // cleanly; the stage thread then loads the weights.
    let config = Checkpoint::open(&path)?.config;
    let layers = config.num_hidden_layers;
    let len = match &cfg.auto {
        Some(auto) => auto::span_len(
            &config,
            cfg.stage.kind,
            auto.max_memory,
            cfg.stage.max_kv_bytes,
        )?,
        None if cfg.stage.span.is_empty() || cfg.stage.span.end as usize > layers => {
            return Err(Error::Span {
                span: cfg.stage.span,
                layers,
            });
        }
        None => cfg.stage.span.len(),
    };
    tracing::info!(path = %path.display(), "hashing the model");
    let model = nnmesh_runtime::checkpoint::model_id(&path)
        .map_err(|source| Error::Hash { path, source })?;
    actix::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime can be built")
    })
    .block_on(serve(cfg, model, layers as u32, len, on_ready))
}

async fn serve(
    cfg: Config,
    model: ModelId,
    num_layers: u32,
    len: u32,
    on_ready: impl FnOnce(&Ready),
) -> Result<(), Error> {
    let (fatal_tx, mut fatal) = mpsc::channel(1);
    // A pinned stage loads before the node joins; an auto-placed one once
    // it has looked at the mesh.
    let pinned = match cfg.auto {
        Some(_) => None,
        None => {
            tracing::info!(span = %cfg.stage.span, path = %cfg.stage.model.display(), "loading the stage");
            let (stage, info) = stage::spawn(cfg.stage.clone(), fatal_tx.clone())
                .await
                .map_err(|source| Error::Stage {
                    path: cfg.stage.model.clone(),
                    source,
                })?;
            Some(Serving::new(cfg.stage.span, stage, info))
        }
    };
    let mut tcfg = transport::Config::new(cfg.keypair.clone());
    tcfg.listen = cfg.listen.clone();
    tcfg.bootstrap = cfg.bootstrap.clone();
    tcfg.provide = Some(STAGES_KEY.to_vec());
    tcfg.mdns = cfg.mdns;
    tcfg.max_message = cfg.max_message;
    tcfg.psk = cfg.psk;
    let (endpoint, mut inbound) = transport::Endpoint::start(tcfg).await?;
    let listen = endpoint.listen_addrs().await;
    let server = Arc::new(Server {
        endpoint: endpoint.clone(),
        keypair: cfg.keypair.clone(),
        model,
        num_layers,
        serving: RwLock::new(pinned),
        limits: cfg.stage.limits.clone(),
        addrs: listen.iter().map(|a| a.to_string()).collect(),
        admit: Arc::new(Semaphore::new(cfg.queue)),
        queue: cfg.queue,
        max_message: cfg.max_message,
        allow: cfg.allow.clone(),
        replication: cfg.replication,
        fatal: fatal_tx,
        fault_threshold: (cfg.inject_faults.clamp(0.0, 1.0) * u64::MAX as f64) as u64,
    });
    let (placed_tx, mut placed) = tokio::sync::oneshot::channel();
    match cfg.auto {
        Some(a) => {
            let seeds = cfg
                .bootstrap
                .iter()
                .filter_map(|addr| match addr.iter().last() {
                    Some(libp2p::multiaddr::Protocol::P2p(p)) => Some(p),
                    _ => None,
                })
                .collect();
            let placement = placement::Config {
                replication: cfg.replication,
                ..a.placement
            };
            // On the actix system's thread: loading spawns stage arbiters.
            actix::spawn(auto::drive(
                server.clone(),
                cfg.stage.clone(),
                placement,
                len,
                seeds,
                placed_tx,
            ));
        }
        None => {
            let _ = placed_tx.send(());
        }
    }
    let mut on_ready = Some(on_ready);
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let outcome = loop {
        tokio::select! {
            inb = inbound.recv() => match inb {
                Some(inb) => handle(server.clone(), inb),
                None => break Ok(()),
            },
            Ok(()) = &mut placed, if on_ready.is_some() => {
                if let (Some(ready), Some(serving)) = (on_ready.take(), server.serving()) {
                    ready(&Ready {
                        peer: endpoint.peer_id(),
                        addrs: listen.clone(),
                        model,
                        span: serving.span,
                        throughput: serving.throughput,
                    });
                }
            }
            reason = fatal.recv() => {
                // Withdraw first, so clients stop routing here, then go.
                let reason = reason.unwrap_or_else(|| "the stage stopped".into());
                tracing::error!(%reason, "withdrawing from the mesh");
                endpoint.stop_providing().await;
                break Err(Error::Fatal(reason));
            }
            _ = &mut shutdown => {
                tracing::info!("shutting down");
                break Ok(());
            }
        }
    };
    endpoint.shutdown().await;
    actix::System::current().stop();
    outcome
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler installs");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

fn reply(inb: Inbound, r: &Response) {
    let _ = inb.reply.send(codec::encode(r));
}

fn refuse(inb: Inbound, kind: ErrorKind, msg: impl Into<String>) {
    let e = WireError::new(kind, msg);
    tracing::warn!(peer = %inb.peer, error = %e, "request refused");
    reply(inb, &Response::Error(e));
}

/// Answers one inbound request; never blocks the caller (long work is spawned).
fn handle(node: Arc<Server>, inb: Inbound) {
    let req: Request = match codec::decode(&inb.request) {
        Ok(r) => r,
        Err(e) => {
            let kind = match e {
                codec::CodecError::Version { .. } => ErrorKind::Version,
                _ => ErrorKind::Malformed,
            };
            return refuse(inb, kind, e.to_string());
        }
    };
    // Anyone may ask who we are; everything else is for listed peers only.
    if !matches!(req, Request::Info)
        && let Err(e) = node.check_allowed(&inb.peer)
    {
        tracing::warn!(peer = %inb.peer, error = %e, "request refused");
        return reply(inb, &Response::Error(e));
    }
    match req {
        Request::Info => {
            // A node still choosing its layers has no record yet.
            let (records, manifest) = match node.serving() {
                Some(s) => (vec![node.record(&s)], s.manifest.to_vec()),
                None => (Vec::new(), Vec::new()),
            };
            reply(inb, &Response::Info { records, manifest });
        }
        Request::Tokenize { model, texts } => {
            if model != node.model {
                return refuse(
                    inb,
                    ErrorKind::NotServed,
                    format!("this node serves model {}, not {model}", node.model),
                );
            }
            let serving = match node.serving_or_refuse() {
                Ok(s) => s,
                Err(e) => return reply(inb, &Response::Error(e)),
            };
            let Ok(permit) = node.admit.clone().try_acquire_owned() else {
                return refuse(inb, ErrorKind::Overloaded, node.overloaded());
            };
            tokio::spawn(async move {
                let answer = serving.stage.send(stage::Tokenize(texts)).await;
                drop(permit);
                match answer {
                    Ok(Ok(ids)) => reply(inb, &Response::Tokens(ids)),
                    Ok(Err(e)) => reply(inb, &Response::Error(e)),
                    Err(e) => {
                        node.stage_gone(&serving.stage, &e);
                        refuse(inb, ErrorKind::Internal, format!("stage actor: {e}"));
                    }
                }
            });
        }
        Request::Close { request } => {
            // Only the request's own client may close it (the stage checks).
            let Some(serving) = node.serving() else {
                return reply(inb, &Response::Ack);
            };
            match serving.stage.try_send(Close {
                request,
                client: inb.peer,
            }) {
                Ok(()) => reply(inb, &Response::Ack),
                Err(_) => refuse(inb, ErrorKind::Overloaded, node.overloaded()),
            }
        }
        Request::Report(_) => refuse(inb, ErrorKind::UnknownRequest, "nodes do not take reports"),
        Request::Tokenizer { model } => {
            if model != node.model {
                return refuse(
                    inb,
                    ErrorKind::NotServed,
                    format!("this node serves model {}, not {model}", node.model),
                );
            }
            match node.serving_or_refuse() {
                Ok(s) => reply(
                    inb,
                    &Response::Tokenizer {
                        json: s.tokenizer.to_vec(),
                    },
                ),
                Err(e) => reply(inb, &Response::Error(e)),
            }
        }
        Request::Step(step) => {
            let stage = match node.check_step(&inb.peer, &step) {
                Ok(s) => s.stage,
                Err(e) => {
                    tracing::warn!(peer = %inb.peer, error = %e, "step refused");
                    return reply(inb, &Response::Error(e));
                }
            };
            let Ok(permit) = node.admit.clone().try_acquire_owned() else {
                return refuse(inb, ErrorKind::Overloaded, node.overloaded());
            };
            if node.fault_threshold > 0 && mesh::random_u64() < node.fault_threshold {
                close(&stage, &step);
                tracing::info!(request = step.request.0, "fault injected: session dropped");
                return refuse(
                    inb,
                    ErrorKind::UnknownRequest,
                    "fault injected (--inject-faults): this node dropped the request's session",
                );
            }
            reply(inb, &Response::Accepted);
            let span = tracing::info_span!(
                "request",
                request = step.request.0,
                trace = step.input.trace,
                step = step.input.step,
                hop = step.hop
            );
            tokio::spawn(
                async move {
                    node.process(*step, &stage, permit).await;
                }
                .instrument(span),
            );
        }
    }
}

impl Server {
    fn record(&self, serving: &Serving) -> SignedRecord {
        let in_use = self.queue - self.admit.available_permits();
        let record = StageRecord {
            peer: self.endpoint.peer_id(),
            addrs: self.addrs.clone(),
            model: self.model,
            model_name: serving.model_name.clone(),
            num_layers: self.num_layers,
            span: serving.span,
            throughput: serving.throughput,
            load: in_use as f32 / self.queue as f32,
            limits: self.limits.clone(),
            replication: self.replication,
            expires_at_ms: now_ms() + 120_000,
        };
        SignedRecord::sign(&record, &self.keypair)
    }

    /// The stage served now, if any.
    fn serving(&self) -> Option<Serving> {
        self.serving.read().expect("not poisoned").clone()
    }

    /// Serves `new` from now on; returns what was served before.
    fn replace_serving(&self, new: Option<Serving>) -> Option<Serving> {
        std::mem::replace(&mut *self.serving.write().expect("not poisoned"), new)
    }

    fn serving_or_refuse(&self) -> Result<Serving, WireError> {
        self.serving().ok_or_else(|| {
            WireError::new(
                ErrorKind::NotServed,
                "this node is still choosing the layers it serves",
            )
        })
    }

    fn overloaded(&self) -> String {
        format!(
            "{} requests are already admitted here; retry later or elsewhere (nothing was run)",
            self.queue
        )
    }

    fn check_allowed(&self, peer: &PeerId) -> Result<(), WireError> {
        match &self.allow {
            Some(allow) if !allow.contains(peer) => Err(WireError::new(
                ErrorKind::Forbidden,
                format!("{peer} is not on this node's allow-list"),
            )),
            _ => Ok(()),
        }
    }

    /// Checks a step's addressing: this model, this node as the hop, sent
    /// by whom it must come from, for an allowed client; returns the stage
    /// that runs it.
    fn check_step(&self, from: &PeerId, s: &StepRequest) -> Result<Serving, WireError> {
        let serving = self.serving_or_refuse()?;
        if s.model != self.model {
            return Err(WireError::new(
                ErrorKind::NotServed,
                format!("this node serves model {}, not {}", self.model, s.model),
            ));
        }
        let hop = s.route.get(s.hop as usize).ok_or_else(|| {
            WireError::new(
                ErrorKind::Malformed,
                format!(
                    "hop {} is not in the route of {} hops",
                    s.hop,
                    s.route.len()
                ),
            )
        })?;
        let span = serving.span;
        let held = hop.span.start >= span.start && hop.span.end <= span.end;
        if hop.span.is_empty() || !held || hop.peer != self.endpoint.peer_id() {
            return Err(WireError::new(
                ErrorKind::NotServed,
                format!(
                    "this node serves layers {span}; the route asks hop {} for {}",
                    s.hop, hop.span
                ),
            ));
        }
        if *from != s.client {
            return Err(WireError::new(
                ErrorKind::Forbidden,
                format!("steps of a request come from its client, not from {from}"),
            ));
        }
        Ok(serving)
    }

    /// A stage actor is gone: if it is the one served (not one a move
    /// retired), nothing can be served any more.
    fn stage_gone(&self, stage: &Addr<StageActor>, e: &actix::MailboxError) {
        if self.serving().is_some_and(|s| s.stage == *stage) {
            let _ = self
                .fatal
                .try_send(format!("the stage actor stopped ({e})"));
        }
    }

    /// Sends the client one report of `bodies` (in order), with the
    /// step's timing when it ends the step.
    async fn report(
        &self,
        step: &StepRequest,
        bodies: Vec<ReportBody>,
        timing: Option<StepTiming>,
    ) -> Result<(), String> {
        let client = step.client;
        let addrs = step
            .client_addrs
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect();
        let msg = Request::Report(Box::new(StageReport {
            request: step.request,
            hop: step.hop,
            peer: self.endpoint.peer_id(),
            trace: step.input.trace,
            step: step.input.step,
            bodies,
            timing,
        }));
        let bytes = self
            .endpoint
            .request(client, addrs, codec::encode(&msg))
            .await
            .map_err(|e| e.to_string())?;
        match codec::decode::<Response>(&bytes) {
            Ok(Response::Ack) => Ok(()),
            Ok(other) => Err(format!("client answered {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Tells the client a step failed here; logs it when even that fails.
    async fn report_failure(&self, step: &StepRequest, e: WireError) {
        tracing::warn!(error = %e, "step failed");
        if let Err(delivery) = self.report(step, vec![ReportBody::Failed(e)], None).await {
            tracing::warn!(error = %delivery, "could not report the failure to the client");
        }
    }

    /// Runs a step on the stage (holding `permit` for the compute only),
    /// reports its saves, relays and output to the client.
    async fn process(
        &self,
        step: StepRequest,
        stage: &Addr<StageActor>,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        let out = stage.send(RunStep(Box::new(step.clone()))).await;
        drop(permit);
        let mut out = match out {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => return self.report_failure(&step, e).await,
            Err(e) => {
                self.stage_gone(stage, &e);
                let e = WireError::new(ErrorKind::Internal, format!("stage actor: {e}"));
                return self.report_failure(&step, e).await;
            }
        };
        // Everything the step reports, in order: saves, values for
        // earlier stages, replayed outputs, then its end.
        let mut bodies = match self.saves_bodies(std::mem::take(&mut out.saves)) {
            Ok(b) => b,
            Err(e) => {
                self.report_failure(&step, e).await;
                return close(stage, &step);
            }
        };
        if !out.relay.is_empty() {
            bodies.push(ReportBody::Relay(std::mem::take(&mut out.relay)));
        }
        if !out.replayed.is_empty() {
            bodies.push(ReportBody::Replayed(std::mem::take(&mut out.replayed)));
        }
        bodies.push(match out.next {
            Next::Done(tokens) => ReportBody::Done { tokens },
            Next::Hidden(_) | Next::Stopped => ReportBody::Output(out.output()),
        });
        // In as few reports as fit half the message limit each: one, for
        // a step's usual few values.
        let budget = self.max_message / 2;
        let mut report = Vec::new();
        let mut size = 0;
        let mut bodies = bodies.into_iter().peekable();
        while let Some(body) = bodies.next() {
            size += body_len(&body);
            report.push(body);
            let Some(next) = bodies.peek() else { break };
            if size + body_len(next) > budget {
                if let Err(e) = self.report(&step, std::mem::take(&mut report), None).await {
                    tracing::warn!(error = %e, "could not report to the client");
                    return close(stage, &step);
                }
                size = 0;
            }
        }
        if let Err(e) = self.report(&step, report, Some(out.timing)).await {
            tracing::warn!(error = %e, "could not report the step's end to the client");
        }
    }

    /// Saves as report bodies of at most half the message limit each.
    fn saves_bodies(&self, saves: Vec<Saved>) -> Result<Vec<ReportBody>, WireError> {
        let budget = self.max_message / 2;
        let mut bodies = Vec::new();
        let mut batch: Vec<Saved> = Vec::new();
        let mut size = 0;
        for s in saves {
            let len = saved_len(&s);
            if len > budget {
                return Err(WireError::new(
                    ErrorKind::TooLarge,
                    format!(
                        "saved value {:?} is {len} bytes, over this node's message limit of {} bytes",
                        s.name, self.max_message
                    ),
                ));
            }
            if size + len > budget {
                bodies.push(ReportBody::Saves(std::mem::take(&mut batch)));
                size = 0;
            }
            size += len;
            batch.push(s);
        }
        if !batch.is_empty() {
            bodies.push(ReportBody::Saves(batch));
        }
        Ok(bodies)
    }
}

/// About how many bytes a saved value takes in a report.
fn saved_len(s: &Saved) -> usize {
    s.value.data.len() + s.name.len() + 64
}

/// About how many bytes a report body takes.
fn body_len(body: &ReportBody) -> usize {
    let hop = |o: &HopOutput| {
        o.hidden.as_ref().map_or(0, |h| h.data.len())
            + o.carry
                .iter()
                .map(|c| c.value.data.len() + 64)
                .sum::<usize>()
            + 64
    };
    match body {
        ReportBody::Saves(saves) => saves.iter().map(saved_len).sum(),
        ReportBody::Relay(values) => values.iter().map(|c| c.value.data.len() + 64).sum(),
        ReportBody::Replayed(outputs) => outputs.iter().map(hop).sum(),
        ReportBody::Output(o) => hop(o),
        ReportBody::Done { tokens } => tokens.len() * 4 + 64,
        ReportBody::Failed(e) => e.message.len() + 64,
    }
}
