//! `nnmesh node`: serve a block range of a model on the mesh.
//!
//! The node loads its stage in an actix `SyncArbiter` actor (its own thread),
//! starts a libp2p transport, announces itself as a provider of
//! [`STAGES_KEY`] in the DHT, answers `Info` with a freshly signed record, and
//! runs `Step` requests: admitted through a bounded semaphore, answered
//! `Accepted` at once, computed on the stage thread, then pushed on to the
//! next hop (hidden state + carry) while saves go straight to the client.

use std::{
    ops::Range,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use actix::{Addr, SyncArbiter};
use anyhow::{Context, Result, bail};
use clap::Args;
use libp2p::{Multiaddr, PeerId, identity::Keypair};
use nnmesh_client::{
    mesh::STAGES_KEY,
    transport::{Inbound, Transport, TransportConfig},
};
use nnmesh_graph::Limits;
use nnmesh_protocol::{
    codec,
    ids::ModelId,
    message::{ErrorKind, Hop, ReportBody, Request, Response, StageReport, StepRequest, WireError},
    record::{SignedRecord, StageRecord},
};
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::{
    cli::ModelArgs,
    stage::{self, Close, RunStep, Stage},
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
    /// Step requests admitted at once (running + queued); more are refused as overloaded.
    #[arg(long, default_value_t = 8)]
    pub queue: usize,
    /// Also discover peers on the LAN with mDNS.
    #[arg(long)]
    pub mdns: bool,
    /// Largest message accepted or sent, in MiB.
    #[arg(long, default_value_t = 256)]
    pub max_message_mib: usize,
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

/// The blake3 id of a model's weights: the GGUF file, or a checkpoint
/// folder's `*.safetensors` files in name order.
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
        f
    } else {
        vec![path.to_path_buf()]
    };
    ModelId::of_files(&files).with_context(|| format!("hashing {}", path.display()))
}

struct Node {
    transport: Transport,
    stage: Addr<Stage>,
    keypair: Keypair,
    model: ModelId,
    model_name: String,
    manifest: Vec<u8>,
    num_layers: u32,
    span: Range<usize>,
    throughput: f32,
    addrs: Vec<String>,
    admit: Arc<Semaphore>,
    queue: usize,
    max_message: usize,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Runs `nnmesh node` until Ctrl-C (or SIGTERM).
///
/// # Errors
/// Bad flags, a model that cannot be loaded, or a transport that cannot start.
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
        limits: Limits::default(),
        session_ttl: Duration::from_secs(600),
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
    let (tx, rx) = tokio::sync::oneshot::channel();
    let tx = Mutex::new(Some(tx));
    let stage_cfg = cfg.clone();
    eprintln!(
        "loading layers {}..{} of {} ...",
        cfg.layers.start,
        cfg.layers.end,
        cfg.model.display()
    );
    // The factory runs on the stage thread: weights (and any CUDA context)
    // live there.
    let stage = SyncArbiter::start(1, move || match Stage::load(&stage_cfg) {
        Ok(s) => {
            let info = (s.manifest().clone(), s.throughput());
            if let Some(tx) = tx.lock().expect("not poisoned").take() {
                let _ = tx.send(Ok(info));
            }
            s
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    });
    let (manifest, throughput): (nnmesh_graph::Manifest, f32) = rx
        .await
        .context("the stage thread died while loading")?
        .map_err(|e: String| anyhow::anyhow!(e))?;
    let keypair = Keypair::generate_ed25519();
    let mut tcfg = TransportConfig::new(keypair.clone());
    tcfg.listen = args.listen.clone();
    tcfg.bootstrap = args.bootstrap.clone();
    tcfg.provide = Some(STAGES_KEY.to_vec());
    tcfg.mdns = args.mdns;
    tcfg.max_message = args.max_message_mib << 20;
    let (transport, mut inbound) = Transport::start(tcfg).await?;
    let listen = transport.listen_addrs().await;
    let node = Arc::new(Node {
        transport: transport.clone(),
        stage,
        keypair,
        model,
        model_name: manifest.model.clone(),
        manifest: postcard::to_allocvec(&manifest).context("encoding the manifest")?,
        num_layers,
        span: cfg.layers.clone(),
        throughput,
        addrs: listen.iter().map(|a| a.to_string()).collect(),
        admit: Arc::new(Semaphore::new(args.queue)),
        queue: args.queue,
        max_message: args.max_message_mib << 20,
    });
    for a in &listen {
        println!("listening {a}");
    }
    println!(
        "node {} serves layers {}..{} of {} (model id {model}, {throughput:.0} tokens/s)",
        transport.peer_id(),
        cfg.layers.start,
        cfg.layers.end,
        cfg.model.display()
    );
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            inb = inbound.recv() => match inb {
                Some(inb) => handle(node.clone(), inb),
                None => break,
            },
            _ = &mut shutdown => {
                eprintln!("shutting down");
                break;
            }
        }
    }
    transport.shutdown().await;
    actix::System::current().stop();
    Ok(())
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
            let stage = node.stage.clone();
            tokio::spawn(async move {
                match stage.send(stage::Tokenize(texts)).await {
                    Ok(Ok(ids)) => reply(inb, &Response::Tokens(ids)),
                    Ok(Err(e)) => refuse(inb, ErrorKind::Malformed, e),
                    Err(e) => refuse(inb, ErrorKind::Internal, e.to_string()),
                }
            });
        }
        Request::Close { request } => {
            node.stage.do_send(Close(request));
            reply(inb, &Response::Ack);
        }
        Request::Report(_) => refuse(inb, ErrorKind::UnknownRequest, "nodes do not take reports"),
        Request::Step(step) => {
            if let Err(e) = node.check_step(&step) {
                tracing::warn!(peer = %inb.peer, error = %e, "step refused");
                return reply(inb, &Response::Error(e));
            }
            let Ok(permit) = node.admit.clone().try_acquire_owned() else {
                return refuse(
                    inb,
                    ErrorKind::Overloaded,
                    format!("{} step requests already queued", node.queue),
                );
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
                    node.process(*step).await;
                    drop(permit);
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
            expires_at_ms: now_ms() + 120_000,
        };
        SignedRecord::sign(&record, &self.keypair)
    }

    fn check_step(&self, s: &StepRequest) -> Result<(), WireError> {
        if s.model != self.model {
            return Err(WireError::new(
                ErrorKind::NotServed,
                format!("this node serves model {}, not {}", self.model, s.model),
            ));
        }
        let hop = s.route.get(s.hop as usize).ok_or_else(|| {
            WireError::new(
                ErrorKind::Malformed,
                format!("hop {} is not in the route", s.hop),
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
        Ok(())
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

    /// Runs a step on the stage, reports saves, and pushes the result on.
    async fn process(&self, step: StepRequest) {
        let request = step.request;
        let out = match self.stage.send(RunStep(Box::new(step.clone()))).await {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => {
                self.report_failure(&step, e).await;
                return;
            }
            Err(e) => {
                let e = WireError::new(ErrorKind::Internal, format!("stage actor: {e}"));
                self.report_failure(&step, e).await;
                return;
            }
        };
        // Saves go in reports of at most half the message limit each.
        let budget = self.max_message / 2;
        let mut batch: Vec<nnmesh_protocol::message::Saved> = Vec::new();
        let mut size = 0;
        let mut saves = out.saves.into_iter().peekable();
        while let Some(s) = saves.next() {
            let len = s.value.data.len() + s.name.len() + 64;
            if len > budget {
                let e = WireError::new(
                    ErrorKind::TooLarge,
                    format!(
                        "saved value {:?} is {} bytes, over this node's message limit of {} bytes",
                        s.name, len, self.max_message
                    ),
                );
                self.report_failure(&step, e).await;
                self.stage.do_send(Close(request));
                return;
            }
            size += len;
            batch.push(s);
            let full = saves
                .peek()
                .is_none_or(|n| size + n.value.data.len() + n.name.len() + 64 > budget);
            if full {
                if let Err(e) = self
                    .report(&step, ReportBody::Saves(std::mem::take(&mut batch)))
                    .await
                {
                    tracing::warn!(error = %e, "could not send saves to the client");
                    self.stage.do_send(Close(request));
                    return;
                }
                size = 0;
            }
        }
        if !out.relay.is_empty()
            && let Err(e) = self.report(&step, ReportBody::Relay(out.relay)).await
        {
            tracing::warn!(error = %e, "could not relay values to the client");
            self.stage.do_send(Close(request));
            return;
        }
        if let Some(tokens) = out.done {
            if let Err(e) = self.report(&step, ReportBody::Done { tokens }).await {
                tracing::warn!(error = %e, "could not report completion to the client");
            }
            return;
        }
        let next_hop = step.hop + 1;
        let Some(Hop { peer, addrs, .. }) = step.route.get(next_hop as usize).cloned() else {
            let e = WireError::new(ErrorKind::Internal, "no next hop after a middle stage");
            self.report_failure(&step, e).await;
            return;
        };
        let next = StepRequest {
            hop: next_hop,
            hidden: out.hidden,
            carry: out.carry,
            ..step.clone()
        };
        let result = match PeerId::from_bytes(&peer) {
            Err(e) => Err(format!("bad peer id for hop {next_hop}: {e}")),
            Ok(peer_id) => {
                let addrs: Vec<Multiaddr> = addrs.iter().filter_map(|a| a.parse().ok()).collect();
                match self
                    .transport
                    .request(
                        peer_id,
                        addrs,
                        codec::encode(&Request::Step(Box::new(next))),
                    )
                    .await
                {
                    Ok(bytes) => match codec::decode::<Response>(&bytes) {
                        Ok(Response::Accepted) => Ok(()),
                        Ok(Response::Error(e)) => {
                            Err(format!("hop {next_hop} ({peer_id}) refused the step: {e}"))
                        }
                        Ok(other) => Err(format!("hop {next_hop} ({peer_id}) answered {other:?}")),
                        Err(e) => Err(format!("hop {next_hop} ({peer_id}): {e}")),
                    },
                    Err(e) => Err(format!("hop {next_hop} ({peer_id}): {e}")),
                }
            }
        };
        if let Err(msg) = result {
            let e = WireError::new(ErrorKind::Internal, msg);
            self.report_failure(&step, e).await;
        }
    }
}
