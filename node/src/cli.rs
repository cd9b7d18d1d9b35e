//! Command-line interface of the `nnmesh` binary (clap derive → a `run`).

pub mod graph_cmds;

use std::{
    io::Write,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use nnmesh_graph::{Manifest, Module};

use crate::{engine::Engine, hooks::NoHooks};

/// The bundled default model, as `scripts/setup.sh` unpacks it.
pub const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// nnmesh: look inside, and change, the computation of large transformers.
#[derive(Debug, Parser)]
#[command(name = "nnmesh", version, about)]
pub struct Cli {
    /// More log output (-v info, -vv debug).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The tracing filter the verbosity asks for.
    pub fn log_filter(&self) -> &'static str {
        match self.verbose {
            0 => "warn",
            1 => "info",
            _ => "debug",
        }
    }
}

/// Which model to load and how.
#[derive(Debug, Args, Clone)]
pub struct ModelArgs {
    /// A .gguf file or a Hugging Face folder (config.json + *.safetensors);
    /// defaults to $NNMESH_MODEL, then the bundled SmolLM2.
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
    /// Resolves the model path: the flag, `$NNMESH_MODEL`, `./models/…`, or
    /// `models/…` beside the repository the binary was built in.
    pub fn path(&self) -> PathBuf {
        if let Some(p) = &self.model {
            return p.clone();
        }
        if let Some(p) = std::env::var_os("NNMESH_MODEL") {
            return p.into();
        }
        let local = PathBuf::from(DEFAULT_MODEL);
        if local.exists() {
            return local;
        }
        // target/release/nnmesh -> repository root
        std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent()?.parent()?.parent().map(Path::to_path_buf))
            .map(|root| root.join(DEFAULT_MODEL))
            .filter(|p| p.exists())
            .unwrap_or(local)
    }

    /// Loads the engine for decoder layers `layers` (all when `None`).
    ///
    /// # Errors
    /// Bad flags or a model that cannot be loaded.
    pub fn load(&self, layers: Option<std::ops::Range<usize>>) -> Result<Engine> {
        let device = crate::engine::parse_device(&self.device).map_err(anyhow::Error::msg)?;
        let kind = crate::engine::parse_kind(&self.dtype, device).map_err(anyhow::Error::msg)?;
        let path = self.path();
        eprintln!("loading {} ...", path.display());
        let t0 = Instant::now();
        let engine = Engine::load(&path, layers, kind, device)?;
        eprintln!("loaded in {:.2} s", t0.elapsed().as_secs_f64());
        Ok(engine)
    }
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
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
        run: graph_cmds::RunArgs,
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
    Experiment(graph_cmds::Experiment),
    /// Serve a block range of a model on the mesh.
    Node(crate::serve::NodeArgs),
    /// Show the mesh: peers, block coverage per model, throughput, load.
    Status {
        #[command(flatten)]
        mesh: graph_cmds::MeshArgs,
    },
    /// Create key files: a peer identity (prints its peer id, for
    /// allow-lists) or a private mesh's pre-shared key.
    Keygen {
        #[command(subcommand)]
        what: Keygen,
    },
    /// Benchmark prefill and decode, beside Hugging Face transformers when available.
    Bench(crate::cli::BenchArgs),
}

/// What `nnmesh keygen` creates.
#[derive(Debug, Subcommand)]
pub enum Keygen {
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
pub struct BenchArgs {
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
}

/// Runs a parsed command line.
///
/// # Errors
/// Any failure, with context for the user.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Inspect { model, tokens } => inspect(&model, tokens),
        Command::Generate {
            model,
            prompt,
            max_new_tokens,
        } => generate(&model, &prompt, max_new_tokens),
        Command::Forward {
            model,
            prompt,
            top,
            json,
        } => forward(&model, &prompt, top, json),
        Command::Trace { run, graph } => graph_cmds::trace_file(&run, &graph),
        Command::Graph { name, layers } => {
            println!("{}", graph_cmds::example_json(&name, layers)?);
            Ok(())
        }
        Command::Experiment(e) => graph_cmds::experiment(e),
        Command::Node(args) => crate::serve::run(args),
        Command::Status { mesh } => status(&mesh),
        Command::Keygen { what } => keygen(what),
        Command::Bench(args) => crate::bench::run(&args),
    }
}

/// The graph crate's manifest of a loaded model.
pub fn manifest(engine: &Engine) -> Manifest {
    crate::engine::manifest(engine.model.config(), engine.model.kind())
}

fn inspect(args: &ModelArgs, t: u64) -> Result<()> {
    let engine = args.load(None)?;
    let cfg = engine.model.config();
    let m = manifest(&engine);
    let params = crate::engine::parameter_count(cfg);
    println!("model        {}", args.path().display());
    println!(
        "architecture {} ({} parameters)",
        cfg.model_type,
        human(params)
    );
    println!(
        "layers {}  hidden {}  mlp {}  heads {} (kv {}, dim {})  vocab {}  context {}  rope base {}  tied head {}",
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_attention_heads,
        cfg.kv_heads(),
        cfg.head_dim(),
        cfg.vocab_size,
        cfg.max_position_embeddings,
        cfg.rope_theta,
        cfg.tie_word_embeddings
    );
    println!(
        "dtype {:?} on {:?}\n\nmodule tree: hook points with shapes for 1 prompt of {t} tokens\n",
        engine.model.kind(),
        engine.model.device()
    );
    let show = |module: Module, depth: usize, shown_layers: bool| {
        let name = module.path();
        let indent = "  ".repeat(depth);
        let points: Vec<String> = m
            .points(module)
            .iter()
            .map(|&p| {
                let meta = m.hook_meta(module, p, 1, t, t);
                format!("{} {:?}", p.name(), meta.shape)
            })
            .collect();
        if shown_layers {
            println!("{indent}{name}  ·  {}", points.join("  "));
        }
    };
    show(Module::Embed, 0, true);
    for i in 0..m.num_layers {
        let full = i == 0 || i + 1 == m.num_layers;
        if i == 1 && m.num_layers > 2 {
            println!(
                "  ... model.layers.1 .. model.layers.{} (same points) ...",
                m.num_layers - 2
            );
        }
        for sub in Module::of_layer(i) {
            let depth = match sub {
                Module::Layer(_) => 0,
                Module::QProj(_)
                | Module::KProj(_)
                | Module::VProj(_)
                | Module::OProj(_)
                | Module::Gate(_)
                | Module::Up(_)
                | Module::Down(_) => 2,
                _ => 1,
            };
            show(sub, depth, full);
        }
    }
    show(Module::Norm, 0, true);
    show(Module::LmHead, 0, true);
    Ok(())
}

fn human(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n => n.to_string(),
    }
}

fn generate(args: &ModelArgs, prompt: &str, max_new: usize) -> Result<()> {
    let engine = args.load(None)?;
    let ids = engine.encode(prompt)?;
    let mut out = std::io::stdout().lock();
    write!(out, "{prompt}")?;
    out.flush()?;
    let mut produced: Vec<u32> = Vec::new();
    let mut printed = 0usize;
    let t0 = Instant::now();
    let eos = engine.tokenizer.eos;
    engine.generate(
        std::slice::from_ref(&ids),
        max_new,
        &mut NoHooks,
        &mut |_, step_ids| {
            produced.push(step_ids[0]);
            // Decode the whole continuation each time so multi-byte
            // characters split across tokens print correctly.
            if let Ok(text) = engine.tokenizer.decode(&produced)
                && !text.ends_with('\u{fffd}')
            {
                let _ = write!(out, "{}", &text[printed.min(text.len())..]);
                let _ = out.flush();
                printed = text.len();
            }
        },
    )?;
    writeln!(out)?;
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "{} tokens in {secs:.2} s ({:.1} tokens/s){}",
        produced.len(),
        produced.len() as f64 / secs,
        if eos.is_some_and(|e| produced.contains(&e)) {
            " (the model emitted end-of-sequence)"
        } else {
            ""
        }
    );
    Ok(())
}

fn forward(args: &ModelArgs, prompt: &str, k: i64, json: bool) -> Result<()> {
    if k < 1 {
        bail!("--top must be at least 1");
    }
    let engine = args.load(None)?;
    let ids = engine.encode(prompt)?;
    let logits = engine.logits(std::slice::from_ref(&ids), &mut NoHooks)?;
    let last = logits.select(1, -1).select(0, 0).to_kind(tch::Kind::Float);
    let k = k.min(last.size()[0]);
    let (vals, idx) = last.topk(k, -1, true, true);
    let vals = Vec::<f32>::try_from(&vals).context("reading logits")?;
    let idx = Vec::<i64>::try_from(&idx).context("reading token ids")?;
    if json {
        let top: Vec<serde_json::Value> = idx
            .iter()
            .zip(&vals)
            .map(|(&i, &v)| {
                serde_json::json!({"id": i, "token": engine.tokenizer.token_text(i as u32), "logit": v})
            })
            .collect();
        let out = serde_json::json!({"prompt": prompt, "ids": ids, "top": top});
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("prompt: {prompt:?} ({} tokens)", ids.len());
        println!("{:>4}  {:>7}  {:>10}  token", "rank", "id", "logit");
        for (r, (&i, &v)) in idx.iter().zip(&vals).enumerate() {
            println!(
                "{:>4}  {i:>7}  {v:>10.4}  {:?}",
                r + 1,
                engine.tokenizer.token_text(i as u32)
            );
        }
    }
    Ok(())
}

fn keygen(what: Keygen) -> Result<()> {
    use nnmesh_client::transport::keys;
    match what {
        Keygen::Identity { file } => {
            let key = keys::load_or_create_identity(&file)?;
            println!("{}", key.public().to_peer_id());
        }
        Keygen::Psk { file } => {
            let psk = keys::create_psk(&file)?;
            eprintln!(
                "wrote {} (fingerprint {}); give it to every node and client of the mesh",
                file.display(),
                psk.fingerprint()
            );
        }
    }
    Ok(())
}

fn status(mesh: &graph_cmds::MeshArgs) -> Result<()> {
    use nnmesh_client::mesh::holders_per_layer;
    if mesh.mesh.is_empty() {
        bail!("nnmesh status needs --mesh ADDR");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let client = mesh.connect(&rt)?;
    let peers = rt.block_on(client.discover())?;
    println!("{} stage nodes\n", peers.len());
    println!(
        "{:<54} {:>8} {:>11} {:>6} {:>8}  addresses",
        "peer", "layers", "tokens/s", "load", "rtt ms"
    );
    for p in &peers {
        println!(
            "{:<54} {:>8} {:>11.0} {:>5.0}% {:>8.1}  {}",
            p.peer.to_string(),
            format!("{}..{}", p.record.start, p.record.end),
            p.record.throughput,
            p.record.load * 100.0,
            p.rtt_ms,
            p.record.addrs.join(" ")
        );
    }
    let mut models: Vec<_> = peers.iter().map(|p| p.record.model).collect();
    models.sort_by_key(|m| m.0);
    models.dedup();
    for m in models {
        let recs: Vec<_> = peers.iter().filter(|p| p.record.model == m).collect();
        let n = recs[0].record.num_layers;
        let holders = holders_per_layer(recs.iter().map(|p| &p.record), n);
        let bar: String = holders
            .iter()
            .map(|&h| match h {
                0 => '·',
                1 => '▄',
                _ => '█',
            })
            .collect();
        let served = holders.iter().filter(|&&h| h > 0).count();
        println!(
            "\nmodel {} ({})\n  layers 0..{n} |{bar}|  {served}/{n} served, min {} holder(s) per layer",
            recs[0].record.model_name,
            m,
            holders.iter().min().copied().unwrap_or(0)
        );
    }
    println!("\n(█ two or more holders, ▄ one, · none)");
    Ok(())
}
