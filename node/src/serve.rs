//! `nnmesh node`: serve a block range of a model on the mesh.
//!
//! The node loads its stage on a thread of its own ([`stage::spawn`]),
//! starts a libp2p transport, announces itself as a provider of
//! [`STAGES_KEY`] in the DHT, answers `Info` with a freshly signed record,
//! and runs `Step` requests: admitted through a bounded semaphore (refused
//! as overloaded beyond it), answered `Accepted` at once, computed on the
//! stage thread, then pushed on to the next hop (hidden state + carry)
//! while saves go straight to the client. A compute permit is never held
//! across a network call.
//!
//! What the node checks before anything reaches the stage: the message
//! decodes, names this node's model and layers and this node as the hop, and
//! comes from whom it must (the client itself at hop 0, the previous hop
//! after that); with `--allow-peers`, that the requester and the client are
//! listed. The stage then checks the step's contents (see [`crate::stage`]).

use std::{
    collections::HashSet,
    ops::Range,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use actix::Addr;
use anyhow::{Context, Result, bail};
use clap::Args;
use libp2p::{Multiaddr, PeerId, identity::Keypair};
use nnmesh_client::{
    mesh::STAGES_KEY,
    transport::{Inbound, RequestError, Transport, TransportConfig, keys},
};
use nnmesh_graph::Limits;
use nnmesh_protocol::{
    codec,
    ids::ModelId,
    message::{
        ErrorKind, Hop, ReportBody, Request, Response, Saved, StageReport, StepRequest, WireError,
    },
    record::{SignedRecord, StageRecord},
};
use tokio::sync::{Semaphore, mpsc};
use tracing::Instrument;

use crate::{
    cli::ModelArgs,
    stage::{self, Close, Next, RunStep, StageActor},
};

/// Flags of `nnmesh node`.
#[derive(Debug, Args)]
pub struct NodeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Decoder layers to serve, `A..B` (end exclusive). The stage starting at
    /// 0 also hosts the embedding; the one ending at the last layer also hosts
    /// the final norm and lm_head.
    #[arg(long)]
    pub blocks: String,
    /// Address to listen on.
    #[arg(long, default_value = "/ip4/127.0.0.1/tcp/0")]
    pub listen: Vec<Multiaddr>,
    /// A mesh node to join through (repeatable).
    #[arg(long)]
    pub bootstrap: Vec<Multiaddr>,
    /// The node's identity key file, created on first use (a stable peer id
    /// across restarts, for allow-lists); a fresh identity without it.
    #[arg(long)]
    pub identity: Option<PathBuf>,
    /// A private mesh's pre-shared key file (`nnmesh keygen psk FILE`):
    /// peers without the same key cannot connect.
    #[arg(long)]
    pub psk: Option<PathBuf>,
    /// Serve only the peers listed in this file (one peer id per line):
    /// clients, and the nodes that forward steps to this one.
    #[arg(long)]
    pub allow_peers: Option<PathBuf>,
    /// Step requests admitted at once (running + queued); more are refused as overloaded.
    #[arg(long, default_value_t = 8)]
    pub queue: usize,
    /// Most sessions (requests) open at once; more are refused as overloaded.
    #[arg(long, default_value_t = 64)]
    pub max_sessions: usize,
    /// KV cache the open sessions may reserve, in MiB; a request that would
    /// exceed it is refused as overloaded.
    #[arg(long, default_value_t = 2048)]
    pub kv_cache_mib: u64,
    /// Sessions unused for this many seconds are dropped.
    #[arg(long, default_value_t = 600)]
    pub session_ttl_secs: u64,
    /// Per request: most batch tokens (rows × longest prompt) of a forward.
    #[arg(long, default_value_t = Limits::default().max_batch_tokens)]
    pub max_batch_tokens: u64,
    /// Per request: most MiB of activations of a forward (estimated, logits included).
    #[arg(long, default_value_t = Limits::default().max_activation_bytes >> 20)]
    pub max_activation_mib: u64,
    /// Per request: most MiB of saved values.
    #[arg(long, default_value_t = Limits::default().max_saved_bytes >> 20)]
    pub max_saved_mib: u64,
    /// Per request: most graph nodes.
    #[arg(long, default_value_t = Limits::default().max_nodes)]
    pub max_nodes: usize,
    /// Per request: most tokens a trace may generate.
    #[arg(long, default_value_t = Limits::default().max_new_tokens)]
    pub max_new_tokens: u32,
    /// Also discover peers on the LAN with mDNS.
    #[arg(long)]
    pub mdns: bool,
    /// Largest message accepted or sent, in MiB.
    #[arg(long, default_value_t = 256)]
    pub max_message_mib: usize,
}

impl NodeArgs {
    fn limits(&self) -> Limits {
        Limits {
            max_batch_tokens: self.max_batch_tokens,
            max_activation_bytes: self.max_activation_mib << 20,
            max_saved_bytes: self.max_saved_mib << 20,
            max_nodes: self.max_nodes,
            max_new_tokens: self.max_new_tokens,
            // A graph must fit in a message.
            max_graph_bytes: Limits::default()
                .max_graph_bytes
                .min((self.max_message_mib as u64) << 20),
            ..Limits::default()
        }
    }
}

/// Parses `A..B`.
///
/// # Errors
/// When it is not two integers separated by `..` with `A < B`.
pub fn parse_blocks(s: &str) -> Result<Range<usize>> {
    let (a, b) = s
        .split_once("..")
        .with_context(|| format!("--blocks {s:?}: expected A..B, e.g. 0..10"))?;
    let (a, b): (usize, usize) = (
        a.trim()
            .parse()
            .with_context(|| format!("--blocks {s:?}: bad start"))?,
        b.trim()
            .parse()
            .with_context(|| format!("--blocks {s:?}: bad end"))?,
    );
    if a >= b {
        bail!("--blocks {s:?}: the range is empty");
    }
    Ok(a..b)
}

/// The blake3 id of a model: the GGUF file (weights, tokenizer and
/// configuration in one), or a checkpoint folder's `config.json`,
/// `tokenizer.json` and `*.safetensors` files (name order), so nodes that
/// tokenize or configure the model differently never share an id.
///
/// # Errors
/// When the files cannot be read.
pub fn model_id(path: &std::path::Path) -> Result<ModelId> {
    let files = if path.is_dir() {
        let mut f: Vec<_> = std::fs::read_dir(path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        f.sort();
        let mut all = vec![path.join("config.json"), path.join("tokenizer.json")];
        all.extend(f);
        all
    } else {
        vec![path.to_path_buf()]
    };
    ModelId::of_files(&files).with_context(|| format!("hashing {}", path.display()))
}

struct Node {
    transport: Transport,
    stage: Addr<StageActor>,
    keypair: Keypair,
    model: ModelId,
    model_name: String,
    manifest: Vec<u8>,
    num_layers: u32,
    span: Range<usize>,
    throughput: f32,
    limits: Limits,
    addrs: Vec<String>,
    admit: Arc<Semaphore>,
    queue: usize,
    max_message: usize,
    allow: Option<HashSet<PeerId>>,
    fatal: mpsc::Sender<String>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Runs `nnmesh node` until Ctrl-C (or SIGTERM).
///
/// # Errors
/// Bad flags, a model that cannot be loaded, a transport that cannot start,
/// or a stage that can no longer compute.
pub fn run(args: NodeArgs) -> Result<()> {
    let layers = parse_blocks(&args.blocks)?;
    let path = args.model.path();
    // Check the file and the range here, where errors can still be reported
    // cleanly; the stage thread then loads the weights.
    let ckpt = crate::checkpoint::Checkpoint::open(&path)?;
    let n = ckpt.config.num_hidden_layers;
    if layers.end > n {
        bail!(
            "--blocks {}..{} is outside the model's {n} layers",
            layers.start,
            layers.end
        );
    }
    drop(ckpt);
    let device = crate::engine::parse_device(&args.model.device).map_err(anyhow::Error::msg)?;
    let kind = crate::engine::parse_kind(&args.model.dtype, device).map_err(anyhow::Error::msg)?;
    eprintln!("hashing {} ...", path.display());
    let model = model_id(&path)?;
    let cfg = stage::Config {
        model: path.clone(),
        layers: layers.clone(),
        kind,
        device,
        limits: args.limits(),
        session_ttl: Duration::from_secs(args.session_ttl_secs),
        max_sessions: args.max_sessions,
        max_kv_bytes: args.kv_cache_mib << 20,
    };
    actix::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime can be built")
    })
    .block_on(serve(args, cfg, model, n as u32))
}

async fn serve(args: NodeArgs, cfg: stage::Config, model: ModelId, num_layers: u32) -> Result<()> {
    let keypair = match &args.identity {
        Some(path) => keys::load_or_create_identity(path)?,
        None => Keypair::generate_ed25519(),
    };
    let psk = args.psk.as_deref().map(keys::read_psk).transpose()?;
    let allow = args
        .allow_peers
        .as_deref()
        .map(keys::read_allow_list)
        .transpose()?;
    eprintln!(
        "loading layers {}..{} of {} ...",
        cfg.layers.start,
        cfg.layers.end,
        cfg.model.display()
    );
    let (fatal_tx, mut fatal) = mpsc::channel(1);
    let (stage, info) = stage::spawn(cfg.clone(), fatal_tx.clone())
        .await
        .with_context(|| format!("loading {}", cfg.model.display()))?;
    let mut tcfg = TransportConfig::new(keypair.clone());
    tcfg.listen = args.listen.clone();
    tcfg.bootstrap = args.bootstrap.clone();
    tcfg.provide = Some(STAGES_KEY.to_vec());
    tcfg.mdns = args.mdns;
    tcfg.max_message = args.max_message_mib << 20;
    tcfg.psk = psk;
    let (transport, mut inbound) = Transport::start(tcfg).await?;
    let listen = transport.listen_addrs().await;
    let node = Arc::new(Node {
        transport: transport.clone(),
        stage,
        keypair,
        model,
        model_name: info.manifest.model.clone(),
        manifest: postcard::to_allocvec(&info.manifest).context("encoding the manifest")?,
        num_layers,
        span: cfg.layers.clone(),
        throughput: info.throughput,
        limits: cfg.limits.clone(),
        addrs: listen.iter().map(|a| a.to_string()).collect(),
        admit: Arc::new(Semaphore::new(args.queue)),
        queue: args.queue,
        max_message: args.max_message_mib << 20,
        allow,
        fatal: fatal_tx,
    });
    for a in &listen {
        println!("listening {a}");
    }
    println!(
        "node {} serves layers {}..{} of {} (model id {model}, {:.0} tokens/s)",
        transport.peer_id(),
        cfg.layers.start,
        cfg.layers.end,
        cfg.model.display(),
        info.throughput
    );
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let outcome = loop {
        tokio::select! {
            inb = inbound.recv() => match inb {
                Some(inb) => handle(node.clone(), inb),
                None => break Ok(()),
            },
            reason = fatal.recv() => {
                // Withdraw first, so clients stop routing here, then go.
                let reason = reason.unwrap_or_else(|| "the stage stopped".into());
                eprintln!("error: {reason}; withdrawing from the mesh");
                transport.stop_providing().await;
                break Err(anyhow::anyhow!(reason));
            }
            _ = &mut shutdown => {
                eprintln!("shutting down");
                break Ok(());
            }
        }
    };
    transport.shutdown().await;
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
fn handle(node: Arc<Node>, inb: Inbound) {
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
            let record = node.record();
            reply(
                inb,
                &Response::Info {
                    records: vec![record],
                    manifest: node.manifest.clone(),
                },
            );
        }
        Request::Tokenize { model, texts } => {
            if model != node.model {
                return refuse(
                    inb,
                    ErrorKind::NotServed,
                    format!("this node serves model {}, not {model}", node.model),
                );
            }
            let Ok(permit) = node.admit.clone().try_acquire_owned() else {
                return refuse(inb, ErrorKind::Overloaded, node.overloaded());
            };
            tokio::spawn(async move {
                let answer = node.stage.send(stage::Tokenize(texts)).await;
                drop(permit);
                match answer {
                    Ok(Ok(ids)) => reply(inb, &Response::Tokens(ids)),
                    Ok(Err(e)) => reply(inb, &Response::Error(e)),
                    Err(e) => {
                        node.stage_gone(&e);
                        refuse(inb, ErrorKind::Internal, format!("stage actor: {e}"));
                    }
                }
            });
        }
        Request::Close { request } => {
            // Only the request's own client may close it (the stage checks).
            match node.stage.try_send(Close {
                request,
                client: inb.peer.to_bytes(),
            }) {
                Ok(()) => reply(inb, &Response::Ack),
                Err(_) => refuse(inb, ErrorKind::Overloaded, node.overloaded()),
            }
        }
        Request::Report(_) => refuse(inb, ErrorKind::UnknownRequest, "nodes do not take reports"),
        Request::Step(step) => {
            if let Err(e) = node.check_step(&inb.peer, &step) {
                tracing::warn!(peer = %inb.peer, error = %e, "step refused");
                return reply(inb, &Response::Error(e));
            }
            let Ok(permit) = node.admit.clone().try_acquire_owned() else {
                return refuse(inb, ErrorKind::Overloaded, node.overloaded());
            };
            reply(inb, &Response::Accepted);
            let span = tracing::info_span!(
                "request",
                request = step.request.0,
                trace = step.trace,
                step = step.step,
                hop = step.hop
            );
            tokio::spawn(
                async move {
                    node.process(*step, permit).await;
                }
                .instrument(span),
            );
        }
    }
}

impl Node {
    fn record(&self) -> SignedRecord {
        let in_use = self.queue - self.admit.available_permits();
        let record = StageRecord {
            peer: self.transport.peer_id().to_bytes(),
            addrs: self.addrs.clone(),
            model: self.model,
            model_name: self.model_name.clone(),
            num_layers: self.num_layers,
            start: self.span.start as u32,
            end: self.span.end as u32,
            throughput: self.throughput,
            load: in_use as f32 / self.queue as f32,
            limits: self.limits.clone(),
            expires_at_ms: now_ms() + 120_000,
        };
        SignedRecord::sign(&record, &self.keypair)
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
    /// by whom it must come from, for an allowed client.
    fn check_step(&self, from: &PeerId, s: &StepRequest) -> Result<(), WireError> {
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
        if (hop.start as usize, hop.end as usize) != (self.span.start, self.span.end)
            || PeerId::from_bytes(&hop.peer).ok() != Some(self.transport.peer_id())
        {
            return Err(WireError::new(
                ErrorKind::NotServed,
                format!(
                    "this node serves layers {}..{}; the route asks hop {} for {}..{}",
                    self.span.start, self.span.end, s.hop, hop.start, hop.end
                ),
            ));
        }
        let sender = match s.hop.checked_sub(1) {
            None => s.client.clone(),
            Some(prev) => s.route[prev as usize].peer.clone(),
        };
        if from.to_bytes() != sender {
            return Err(WireError::new(
                ErrorKind::Forbidden,
                format!(
                    "hop {} takes steps from {} only, not from {from}",
                    s.hop,
                    if s.hop == 0 {
                        "the request's client"
                    } else {
                        "the previous hop"
                    }
                ),
            ));
        }
        let client = PeerId::from_bytes(&s.client).map_err(|e| {
            WireError::new(ErrorKind::Malformed, format!("bad client peer id: {e}"))
        })?;
        self.check_allowed(&client)
    }

    /// The stage actor is gone: nothing can be served any more.
    fn stage_gone(&self, e: &actix::MailboxError) {
        let _ = self
            .fatal
            .try_send(format!("the stage actor stopped ({e})"));
    }

    async fn report(&self, step: &StepRequest, body: ReportBody) -> Result<(), String> {
        let client =
            PeerId::from_bytes(&step.client).map_err(|e| format!("bad client peer id: {e}"))?;
        let addrs = step
            .client_addrs
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect();
        let msg = Request::Report(Box::new(StageReport {
            request: step.request,
            hop: step.hop,
            peer: self.transport.peer_id().to_bytes(),
            trace: step.trace,
            step: step.step,
            body,
        }));
        let bytes = self
            .transport
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
        if let Err(delivery) = self.report(step, ReportBody::Failed(e)).await {
            tracing::warn!(error = %delivery, "could not report the failure to the client");
        }
    }

    fn close(&self, step: &StepRequest) {
        let _ = self.stage.try_send(Close {
            request: step.request,
            client: step.client.clone(),
        });
    }

    /// Runs a step on the stage (holding `permit` for the compute only),
    /// reports saves, and pushes the result on.
    async fn process(&self, step: StepRequest, permit: tokio::sync::OwnedSemaphorePermit) {
        let out = self.stage.send(RunStep(Box::new(step.clone()))).await;
        drop(permit);
        let out = match out {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => return self.report_failure(&step, e).await,
            Err(e) => {
                self.stage_gone(&e);
                let e = WireError::new(ErrorKind::Internal, format!("stage actor: {e}"));
                return self.report_failure(&step, e).await;
            }
        };
        if let Err(e) = self.send_saves(&step, out.saves).await {
            tracing::warn!(error = %e, "could not send saves to the client");
            return self.close(&step);
        }
        if !out.relay.is_empty()
            && let Err(e) = self.report(&step, ReportBody::Relay(out.relay)).await
        {
            tracing::warn!(error = %e, "could not relay values to the client");
            return self.close(&step);
        }
        let hidden = match out.next {
            Next::Done(tokens) => {
                if let Err(e) = self.report(&step, ReportBody::Done { tokens }).await {
                    tracing::warn!(error = %e, "could not report completion to the client");
                }
                return;
            }
            Next::Hidden(h) => Some(h),
            Next::Stopped => None,
        };
        let next = StepRequest {
            hop: step.hop + 1,
            hidden,
            carry: out.carry,
            ..step.clone()
        };
        if let Err(e) = self.push(next).await {
            self.report_failure(&step, e).await;
        }
    }

    /// Sends saves in reports of at most half the message limit each.
    async fn send_saves(&self, step: &StepRequest, saves: Vec<Saved>) -> Result<(), String> {
        let budget = self.max_message / 2;
        let mut batch: Vec<Saved> = Vec::new();
        let mut size = 0;
        let mut saves = saves.into_iter().peekable();
        let len = |s: &Saved| s.value.data.len() + s.name.len() + 64;
        while let Some(s) = saves.next() {
            if len(&s) > budget {
                let e = WireError::new(
                    ErrorKind::TooLarge,
                    format!(
                        "saved value {:?} is {} bytes, over this node's message limit of {} bytes",
                        s.name,
                        len(&s),
                        self.max_message
                    ),
                );
                self.report_failure(step, e).await;
                return Err("a saved value is over the message limit".into());
            }
            size += len(&s);
            batch.push(s);
            if saves.peek().is_none_or(|n| size + len(n) > budget) {
                self.report(step, ReportBody::Saves(std::mem::take(&mut batch)))
                    .await?;
                size = 0;
            }
        }
        Ok(())
    }

    /// Hands the step on to the next hop; an error names it.
    async fn push(&self, next: StepRequest) -> Result<(), WireError> {
        let Some(Hop { peer, addrs, .. }) = next.route.get(next.hop as usize).cloned() else {
            return Err(WireError::new(
                ErrorKind::Internal,
                "no next hop after a middle stage",
            ));
        };
        let hop = next.hop;
        let peer = PeerId::from_bytes(&peer).map_err(|e| {
            WireError::new(
                ErrorKind::Malformed,
                format!("bad peer id for hop {hop}: {e}"),
            )
        })?;
        let addrs: Vec<Multiaddr> = addrs.iter().filter_map(|a| a.parse().ok()).collect();
        let bytes = self
            .transport
            .request(peer, addrs, codec::encode(&Request::Step(Box::new(next))))
            .await
            .map_err(|e| {
                let kind = match e {
                    RequestError::DialFailure { .. }
                    | RequestError::ConnectionClosed { .. }
                    | RequestError::Timeout { .. } => ErrorKind::Unreachable,
                    _ => ErrorKind::Internal,
                };
                WireError::new(kind, format!("hop {hop} ({peer}): {e}"))
            })?;
        match codec::decode::<Response>(&bytes) {
            Ok(Response::Accepted) => Ok(()),
            Ok(Response::Error(e)) => Err(WireError::new(
                e.kind,
                format!("hop {hop} ({peer}) refused the step: {}", e.message),
            )),
            Ok(other) => Err(WireError::new(
                ErrorKind::Internal,
                format!("hop {hop} ({peer}) answered {other:?}"),
            )),
            Err(e) => Err(WireError::new(
                ErrorKind::Internal,
                format!("hop {hop} ({peer}): {e}"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_model_id_covers_config_and_tokenizer() {
        let dir = std::env::temp_dir().join(format!("nnmesh-model-id-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        for (name, text) in [
            ("config.json", "{}"),
            ("tokenizer.json", "{\"v\": 1}"),
            ("model.safetensors", "weights"),
        ] {
            std::fs::write(dir.join(name), text).expect("write");
        }
        let id = model_id(&dir).expect("hashes");
        std::fs::write(dir.join("tokenizer.json"), "{\"v\": 2}").expect("write");
        let other_tokenizer = model_id(&dir).expect("hashes");
        assert_ne!(id, other_tokenizer, "a different tokenizer is a different model");
        std::fs::write(dir.join("config.json"), "{\"rope_theta\": 1}").expect("write");
        assert_ne!(other_tokenizer, model_id(&dir).expect("hashes"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
