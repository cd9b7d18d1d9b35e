//! Where a graph runs: this process (the whole model loaded here) or a mesh
//! of stage nodes; and the flags that choose.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use nnmesh_client::mesh;
use nnmesh_graph::{Graph, Limits};
use nnmesh_runtime::{
    engine::Engine,
    execute::{self, Outcome},
    interpret::SavedTensor,
    tokenizer::Tokenizer,
};

use super::ModelArgs;

/// How a client joins a mesh.
#[derive(Debug, Args, Clone)]
pub(crate) struct MeshArgs {
    /// Run through the mesh reachable at this address (repeatable), e.g.
    /// /ip4/127.0.0.1/tcp/4001/p2p/12D3Koo...; without it the model runs here.
    #[arg(long)]
    pub mesh: Vec<libp2p::Multiaddr>,
    /// On a mesh serving several models: the model id (hex) to use.
    #[arg(long)]
    pub model_id: Option<nnmesh_protocol::ids::ModelId>,
    /// The client's identity key file, created on first use (the peer id
    /// that nodes' allow-lists name); a fresh identity without it.
    #[arg(long)]
    pub identity: Option<PathBuf>,
    /// A private mesh's pre-shared key file.
    #[arg(long)]
    pub psk: Option<PathBuf>,
    /// Redundant execution: run every hop on two holders of its layers and
    /// fail, naming both, if their outputs differ beyond a tolerance (about
    /// twice the latency; needs two holders of every hop's layers).
    #[arg(long)]
    pub verify: bool,
}

impl MeshArgs {
    /// Starts a mesh client on `rt` with these settings.
    ///
    /// # Errors
    /// Unreadable key files, or a mesh that cannot be reached.
    pub(crate) fn connect(&self, rt: &tokio::runtime::Runtime) -> Result<mesh::Client> {
        use nnmesh_client::transport::{self, keys};
        let keypair = match &self.identity {
            Some(path) => keys::load_or_create_identity(path)?,
            None => libp2p::identity::Keypair::generate_ed25519(),
        };
        let mut cfg = transport::Config::new(keypair);
        cfg.psk = self.psk.as_deref().map(keys::read_psk).transpose()?;
        let client = rt.block_on(mesh::Client::start(cfg, &self.mesh))?;
        Ok(client.with_verify(self.verify.then(mesh::Tolerance::default)))
    }
}

/// Where a graph runs: this process (a full model) or a mesh.
#[derive(Debug, Args, Clone)]
pub(crate) struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub mesh: MeshArgs,
    /// Write every saved value to this safetensors file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// A model to run graphs on: loaded here, or a mesh of stage nodes.
#[derive(Debug)]
pub(super) enum Backend {
    /// The full model in this process.
    Local(Engine),
    /// A mesh; the tokenizer (fetched from it) shows tokens.
    Mesh {
        /// The client.
        client: mesh::Client,
        /// Runs the client's async work.
        rt: tokio::runtime::Runtime,
        /// Token display.
        tokenizer: Tokenizer,
        /// Layers of the served model.
        num_layers: u32,
        /// The model to use, if chosen.
        model: Option<nnmesh_protocol::ids::ModelId>,
    },
}

impl Backend {
    /// Loads the model, or connects to the mesh when `--mesh` is given.
    ///
    /// # Errors
    /// A model that cannot be loaded or a mesh that cannot be reached.
    pub(super) fn open(run: &RunArgs) -> Result<Self> {
        if run.mesh.mesh.is_empty() {
            return Ok(Backend::Local(run.model.load(None)?));
        }
        // No weights here: the tokenizer comes from the mesh.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let client = run.mesh.connect(&rt)?;
        let peers = rt.block_on(client.discover())?;
        let (model, route) = mesh::choose_route(&peers, run.mesh.model_id)?;
        let num_layers = route[0].0.record.num_layers;
        let (_, json) = rt.block_on(client.tokenizer(Some(model)))?;
        let tokenizer =
            Tokenizer::from_json(&json).context("the tokenizer the mesh sent is not valid")?;
        Ok(Backend::Mesh {
            client,
            rt,
            tokenizer,
            num_layers,
            model: Some(model),
        })
    }

    /// The tokenizer.
    pub(super) fn tokenizer(&self) -> &Tokenizer {
        match self {
            Backend::Local(e) => &e.tokenizer,
            Backend::Mesh { tokenizer, .. } => tokenizer,
        }
    }

    /// Number of decoder layers.
    pub(super) fn num_layers(&self) -> u32 {
        match self {
            Backend::Local(e) => e.model.config().num_hidden_layers as u32,
            Backend::Mesh { num_layers, .. } => *num_layers,
        }
    }

    /// Tokenizes text.
    ///
    /// # Errors
    /// When tokenization fails.
    pub(super) fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.tokenizer().encode(text)?)
    }

    /// Runs a graph and returns what it saved (on a mesh, printing the route).
    ///
    /// # Errors
    /// Validation or run failures, naming the failing stage on a mesh.
    pub(super) fn execute(&self, graph: Graph) -> Result<Outcome> {
        match self {
            Backend::Local(engine) => Ok(execute::run(engine, graph, &Limits::default())?),
            Backend::Mesh {
                client, rt, model, ..
            } => {
                // Fail-overs are worth telling: a stage died and another
                // holder replayed the request's steps on its layers.
                let out = rt.block_on(client.run_with(graph, *model, |p| {
                    if let mesh::Progress::FailedOver {
                        failed,
                        reason,
                        by,
                        replay,
                    } = p
                    {
                        let by: Vec<String> = by
                            .iter()
                            .map(|h| format!("{} on {}", h.span, h.peer))
                            .collect();
                        eprintln!(
                            "{failed} failed ({reason}); replaced by {} replaying {replay} steps",
                            by.join(", ")
                        );
                    }
                }))?;
                eprintln!("mesh route (model {}):", out.model);
                for (i, h) in out.route.iter().enumerate() {
                    eprintln!(
                        "  stage {i}: layers {:>7} on {}",
                        h.span.to_string(),
                        h.peer
                    );
                }
                let saves = out
                    .saves
                    .iter()
                    .map(|s| {
                        Ok(SavedTensor {
                            name: s.name.clone(),
                            step: s.step,
                            value: nnmesh_runtime::wire::from_wire(&s.value, tch::Device::Cpu)?,
                        })
                    })
                    .collect::<Result<Vec<_>, nnmesh_protocol::message::WireError>>()?;
                Ok(Outcome {
                    saves,
                    generated: out.generated,
                })
            }
        }
    }
}
