//! The command line of the `nnmesh` binary: clap derive → a plain config →
//! a library call.

mod backend;
mod experiments;
mod mesh;
mod model;
mod node;
mod show;

use std::{path::PathBuf, time::Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use nnmesh_runtime::engine::Engine;

/// The bundled default model, as `scripts/setup.sh` unpacks it.
pub(crate) const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// nnmesh: look inside, and change, the computation of large transformers.
#[derive(Debug, Parser)]
#[command(name = "nnmesh", version, about)]
pub(crate) struct Cli {
    /// More log output (-v info, -vv debug).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The tracing filter the verbosity asks for.
    pub(crate) fn log_filter(&self) -> &'static str {
        match self.verbose {
            0 => "warn",
            1 => "info",
            _ => "debug",
        }
    }
}

/// Which model to load and how.
#[derive(Debug, Args, Clone)]
pub(crate) struct ModelArgs {
    /// A .gguf file or a Hugging Face folder (config.json + *.safetensors +
    /// tokenizer.json); defaults to $NNMESH_MODEL, then ./models/ (where
    /// scripts/setup.sh puts the bundled SmolLM2).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32, f16, bf16 or auto (f32 on CPU, bf16 on CUDA).
    #[arg(long, default_value = "auto")]
    pub dtype: String,
}

impl ModelArgs {
    /// The model path, in this order: `--model`, `$NNMESH_MODEL`, the
    /// bundled model in `./models/`.
    ///
    /// # Errors
    /// When none is given and there is no `./models/` copy, with how to
    /// point the binary at a model.
    pub(crate) fn path(&self) -> Result<PathBuf> {
        if let Some(p) = &self.model {
            return Ok(p.clone());
        }
        if let Some(p) = std::env::var_os("NNMESH_MODEL") {
            return Ok(p.into());
        }
        let local = PathBuf::from(DEFAULT_MODEL);
        if local.exists() {
            return Ok(local);
        }
        bail!(
            "no model given: pass --model FILE (a .gguf file or a Hugging Face folder), \
             set NNMESH_MODEL, or run scripts/setup.sh in an nnmesh checkout to fetch \
             the bundled model into ./{DEFAULT_MODEL}"
        )
    }

    /// The device and dtype flags, parsed.
    ///
    /// # Errors
    /// An unknown device or dtype.
    pub(crate) fn device_kind(&self) -> Result<(tch::Device, tch::Kind)> {
        let device = parse_device(&self.device)?;
        Ok((device, parse_kind(&self.dtype, device)?))
    }

    /// Loads the engine for decoder layers `layers` (all when `None`).
    ///
    /// # Errors
    /// Bad flags or a model that cannot be loaded.
    pub(crate) fn load(&self, layers: Option<std::ops::Range<usize>>) -> Result<Engine> {
        let (device, kind) = self.device_kind()?;
        let path = self.path()?;
        eprintln!("loading {} ...", path.display());
        let t0 = Instant::now();
        let engine = Engine::load(&path, layers, kind, device)
            .with_context(|| format!("loading {}", path.display()))?;
        eprintln!("loaded in {:.2} s", t0.elapsed().as_secs_f64());
        Ok(engine)
    }
}

/// Parses `cpu`, `cuda`, `cuda:N` or `auto` (CUDA when available).
fn parse_device(s: &str) -> Result<tch::Device> {
    use tch::Device;
    match s {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(Device::cuda_if_available()),
        "cuda" => Ok(Device::Cuda(0)),
        s => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Device::Cuda)
            .with_context(|| format!("unknown device {s:?} (cpu, cuda, cuda:N, auto)")),
    }
}

/// Parses `f32`, `f16`, `bf16`, or `auto` (f32 on CPU, bf16 on CUDA).
fn parse_kind(s: &str, device: tch::Device) -> Result<tch::Kind> {
    use tch::Kind;
    match s {
        "f32" => Ok(Kind::Float),
        "f16" => Ok(Kind::Half),
        "bf16" => Ok(Kind::BFloat16),
        "auto" if device.is_cuda() => Ok(Kind::BFloat16),
        "auto" => Ok(Kind::Float),
        s => bail!("unknown dtype {s:?} (f32, f16, bf16, auto)"),
    }
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Print the architecture, sizes and module tree with hook points and shapes.
    Inspect {
        #[command(flatten)]
        model: ModelArgs,
        /// Token count used to show hook shapes.
        #[arg(long, default_value_t = 8)]
        tokens: u64,
    },
    /// Greedy generation, streaming the text as it goes.
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        /// The prompt text.
        #[arg(long)]
        prompt: String,
        /// How many tokens to generate.
        #[arg(long, default_value_t = 32)]
        max_new_tokens: usize,
    },
    /// One forward pass: the top-K next tokens with their logits.
    Forward {
        #[command(flatten)]
        model: ModelArgs,
        /// The prompt text.
        #[arg(long)]
        prompt: String,
        /// How many top tokens to show.
        #[arg(long, default_value_t = 5)]
        top: i64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run an Intervention Graph (JSON) and summarize what it saved.
    Trace {
        #[command(flatten)]
        run: backend::RunArgs,
        /// The graph file (see `nnmesh graph` and examples/).
        #[arg(long)]
        graph: PathBuf,
    },
    /// Print a built-in experiment as an Intervention Graph (JSON).
    Graph {
        /// lens, patch, steer, ablate, ablate-head or attention.
        name: String,
        /// Number of layers to cover (lens, patch).
        #[arg(long, default_value_t = 30)]
        layers: u32,
    },
    #[command(flatten)]
    Experiment(experiments::Experiment),
    /// Serve a block range of a model on the mesh.
    Node(node::NodeArgs),
    /// Show the mesh: peers, block coverage per model, throughput, load.
    Status {
        #[command(flatten)]
        mesh: backend::MeshArgs,
    },
    /// Create key files: a peer identity (prints its peer id, for
    /// allow-lists) or a private mesh's pre-shared key.
    Keygen {
        #[command(subcommand)]
        what: Keygen,
    },
    /// Benchmark prefill and decode, beside Hugging Face transformers when available.
    Bench(BenchArgs),
}

/// What `nnmesh keygen` creates.
#[derive(Debug, Subcommand)]
pub(crate) enum Keygen {
    /// An identity key file (loaded, not replaced, if it exists); prints its peer id.
    Identity {
        /// The file.
        file: PathBuf,
    },
    /// A new pre-shared key file for a private mesh (`--psk`); never overwrites.
    Psk {
        /// The file.
        file: PathBuf,
    },
}

/// Flags of `nnmesh bench`.
#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt length for the prefill benchmark.
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Tokens to generate in the decode benchmark.
    #[arg(long, default_value_t = 32)]
    pub decode_tokens: usize,
    /// Repetitions (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Python interpreter with transformers (and nnsight) for the
    /// side-by-side figures; defaults to the project's .venv.
    #[arg(long)]
    pub python: Option<PathBuf>,
    /// Skip the Intervention Graph overhead figures.
    #[arg(long)]
    pub skip_graphs: bool,
    /// Skip the mesh figures (which start 3 local node processes).
    #[arg(long)]
    pub skip_mesh: bool,
    /// Also measure resilience (six local node processes): recovery from a
    /// killed stage, replay against restart under injected failures, the
    /// cost of --verify. Takes several minutes.
    #[arg(long)]
    pub resilience: bool,
    /// Also measure concurrency: 1, 4 and 16 clients at once through a
    /// 3-node mesh with batching on and off, and where a hop's time goes.
    #[arg(long)]
    pub concurrency: bool,
    /// Concurrency: tokens each client generates.
    #[arg(long, default_value_t = 64)]
    pub concurrency_tokens: u32,
    /// Extra flags for the nodes the mesh and concurrency figures start
    /// (`--threads 2`, `--max-batch 8 --batch-window-ms 0`, say), as one
    /// string.
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    pub node_flags: String,
    /// Resilience: tokens generated under injected failures.
    #[arg(long, default_value_t = 1024)]
    pub resilience_tokens: u32,
    /// Resilience: how long restarting from scratch may try before it is
    /// reported unfinished.
    #[arg(long, default_value_t = 300)]
    pub restart_budget_secs: u64,
}

/// Runs a parsed command line.
///
/// # Errors
/// Any failure, with context for the user.
pub(crate) fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Inspect { model, tokens } => model::inspect(&model, tokens),
        Command::Generate {
            model,
            prompt,
            max_new_tokens,
        } => model::generate(&model, &prompt, max_new_tokens),
        Command::Forward {
            model,
            prompt,
            top,
            json,
        } => model::forward(&model, &prompt, top, json),
        Command::Trace { run, graph } => experiments::trace_file(&run, &graph),
        Command::Graph { name, layers } => {
            println!("{}", experiments::example_json(&name, layers)?);
            Ok(())
        }
        Command::Experiment(e) => experiments::experiment(e),
        Command::Node(args) => node::run(args),
        Command::Status { mesh } => mesh::status(&mesh),
        Command::Keygen { what } => mesh::keygen(what),
        Command::Bench(args) => crate::bench::run(&args),
    }
}
