//! `nnmesh node`: flags → [`serve::Config`] → [`serve::run`].

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use clap::Args;
use libp2p::Multiaddr;
use nnmesh_client::transport::keys;
use nnmesh_control::placement;
use nnmesh_graph::Limits;
use nnmesh_node::{serve, stage};
use nnmesh_protocol::Span;

use super::ModelArgs;

/// Flags of `nnmesh node`.
#[derive(Debug, Args)]
pub(crate) struct NodeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Decoder layers to serve, `A..B` (end exclusive). The stage starting at
    /// 0 also hosts the embedding; the one ending at the last layer also hosts
    /// the final norm and lm_head. Without it the node places itself: as many
    /// layers as --max-memory holds, where the mesh is weakest, moving when
    /// the mesh needs it.
    #[arg(long)]
    pub blocks: Option<Span>,
    /// Auto-placement: memory for weights and KV cache, in MiB (default: what
    /// the machine has free; on a GPU, its free memory).
    #[arg(long)]
    pub max_memory: Option<u64>,
    /// Holders every block should have (announced to the mesh; the highest
    /// announced wins).
    #[arg(long, default_value_t = 2)]
    pub replication: u32,
    /// Auto-placement: mean seconds between checks whether to move
    /// (each wait is jittered).
    #[arg(long, default_value_t = 60)]
    pub rebalance_secs: u64,
    /// Auto-placement: seconds a node stays on its layers before it may move
    /// again (a block with no holder is repaired at once).
    #[arg(long, default_value_t = 300)]
    pub min_dwell_secs: u64,
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
    /// Serve only the clients listed in this file (one peer id per line);
    /// anyone may still ask who the node is.
    #[arg(long)]
    pub allow_peers: Option<PathBuf>,
    /// Step requests admitted at once (running + queued); more are refused as overloaded.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// Most steps of different requests run as one forward (1: one step at
    /// a time, no batching).
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// After a forward shared by several requests, how many milliseconds
    /// the next waits for their next steps (0: never waits).
    #[arg(long, default_value_t = 2)]
    pub batch_window_ms: u64,
    /// A step that waits longer than this many seconds for its forward is
    /// refused as overloaded, and its client fails over.
    #[arg(long, default_value_t = 30)]
    pub queue_deadline_secs: u64,
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
    /// Threads torch computes with (0: the machine's cores shared evenly
    /// among the nnmesh nodes running on it, re-read every 5 s).
    #[arg(long, default_value_t = 0)]
    pub threads: i32,
    /// Testing: answer each step, with this probability, as if the node had
    /// lost the request's session (clients fail over and replay).
    #[arg(long, default_value_t = 0.0, value_parser = probability)]
    pub inject_faults: f64,
}

/// Memory free for a node's weights: `MemAvailable` on the CPU, the GPU's
/// free memory (as `nvidia-smi` reports it) on CUDA.
fn free_memory(device: tch::Device) -> Result<u64> {
    match device {
        tch::Device::Cuda(i) => {
            let out = std::process::Command::new("nvidia-smi")
                .args(["--query-gpu=memory.free", "--format=csv,noheader,nounits"])
                .arg(format!("--id={i}"))
                .output()
                .context("asking nvidia-smi for free GPU memory; pass --max-memory MiB")?;
            let mib: u64 = String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .context("reading nvidia-smi's free memory; pass --max-memory MiB")?;
            Ok(mib << 20)
        }
        _ => {
            let info = std::fs::read_to_string("/proc/meminfo")
                .context("reading /proc/meminfo; pass --max-memory MiB")?;
            let kib: u64 = info
                .lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .context("no MemAvailable in /proc/meminfo; pass --max-memory MiB")?;
            Ok(kib << 10)
        }
    }
}

fn probability(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err(format!("{s:?} is not a probability in 0..=1")),
    }
}

impl NodeArgs {
    /// The library's configuration for these flags (reads the key files).
    fn config(&self) -> Result<serve::Config> {
        let (device, kind) = self.model.device_kind()?;
        let limits = Limits {
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
        };
        let stage = stage::Config {
            kind,
            device,
            limits,
            session_ttl: Duration::from_secs(self.session_ttl_secs),
            max_sessions: self.max_sessions,
            max_kv_bytes: self.kv_cache_mib << 20,
            threads: self.threads,
            max_batch: self.max_batch,
            queue_deadline: Duration::from_secs(self.queue_deadline_secs),
            batch_window: Duration::from_millis(self.batch_window_ms),
            ..stage::Config::new(self.model.path()?, self.blocks.unwrap_or(Span::new(0, 0)))
        };
        let mut cfg = serve::Config::new(stage);
        if self.blocks.is_none() {
            let max_memory = match self.max_memory {
                Some(mib) => mib << 20,
                None => free_memory(device)?,
            };
            cfg.auto = Some(serve::Auto {
                max_memory,
                placement: placement::Config {
                    check_period: Duration::from_secs(self.rebalance_secs.max(1)),
                    min_dwell: Duration::from_secs(self.min_dwell_secs),
                    ..placement::Config::default()
                },
            });
        }
        cfg.replication = self.replication.max(1);
        cfg.listen = self.listen.clone();
        cfg.bootstrap = self.bootstrap.clone();
        if let Some(path) = &self.identity {
            cfg.keypair = keys::load_or_create_identity(path)?;
        }
        cfg.psk = self.psk.as_deref().map(keys::read_psk).transpose()?;
        cfg.allow = self
            .allow_peers
            .as_deref()
            .map(keys::read_allow_list)
            .transpose()?;
        cfg.queue = self.queue;
        cfg.mdns = self.mdns;
        cfg.max_message = self.max_message_mib << 20;
        cfg.inject_faults = self.inject_faults;
        Ok(cfg)
    }
}

/// Runs `nnmesh node` until Ctrl-C or SIGTERM. Prints `listening ADDR` for
/// each address, then `node PEER serves …` (scripts and tests wait for it).
///
/// # Errors
/// Bad flags or key files, a model that cannot be loaded, a transport that
/// cannot start, or a stage that can no longer compute.
pub(super) fn run(args: NodeArgs) -> Result<()> {
    let cfg = args.config()?;

    let model = cfg.stage.model.clone();
    match &cfg.auto {
        Some(auto) => eprintln!(
            "{}: choosing layers to serve within {} MiB ...",
            model.display(),
            auto.max_memory >> 20
        ),
        None => eprintln!(
            "loading layers {} of {} ...",
            cfg.stage.span,
            model.display()
        ),
    }
    serve::run(cfg, |ready| {
        for a in &ready.addrs {
            println!("listening {a}");
        }
        println!(
            "node {} serves layers {} of {} (model id {}, {:.0} tokens/s)",
            ready.peer,
            ready.span,
            model.display(),
            ready.model,
            ready.throughput
        );
    })
    .context("nnmesh node")
}
