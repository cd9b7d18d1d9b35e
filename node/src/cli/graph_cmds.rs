//! The graph commands: `trace` (run a JSON graph) and the built-in
//! experiments (`lens`, `patch`, `steer`, `ablate`, `attention`), with
//! readable summaries of what they saved.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use nnmesh_graph::{Graph, Limits};
use tch::{Kind, Tensor};

use crate::{
    cli::ModelArgs,
    engine::Engine,
    experiments::{self, prompts},
    interpret::Saved,
    tokenizer::Tokenizer,
    trace::{self, Outcome},
};

/// How a client joins a mesh.
#[derive(Debug, Args, Clone)]
pub struct MeshArgs {
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
}

impl MeshArgs {
    /// Starts a mesh client on `rt` with these settings.
    ///
    /// # Errors
    /// Unreadable key files, or a mesh that cannot be reached.
    pub fn connect(&self, rt: &tokio::runtime::Runtime) -> Result<nnmesh_client::mesh::MeshClient> {
        use nnmesh_client::transport::{TransportConfig, keys};
        let keypair = match &self.identity {
            Some(path) => keys::load_or_create_identity(path)?,
            None => libp2p::identity::Keypair::generate_ed25519(),
        };
        let mut cfg = TransportConfig::new(keypair);
        cfg.psk = self.psk.as_deref().map(keys::read_psk).transpose()?;
        Ok(rt.block_on(nnmesh_client::mesh::MeshClient::start(cfg, &self.mesh))?)
    }
}

/// Where a graph runs: this process (a full model) or a mesh.
#[derive(Debug, Args, Clone)]
pub struct RunArgs {
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
pub enum Backend {
    /// The full model in this process.
    Local(Engine),
    /// A mesh; the tokenizer (read from the local model file) shows tokens.
    Mesh {
        /// The client.
        client: nnmesh_client::mesh::MeshClient,
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
    pub fn open(run: &RunArgs) -> Result<Self> {
        if run.mesh.mesh.is_empty() {
            return Ok(Backend::Local(run.model.load(None)?));
        }
        let path = run.model.path();
        let ckpt = crate::checkpoint::Checkpoint::open(&path).with_context(|| {
            format!(
                "the mesh client reads the tokenizer from {} (pass --model)",
                path.display()
            )
        })?;
        let tokenizer = match ckpt.gguf() {
            Some(g) => Tokenizer::from_gguf(g)?,
            None => Tokenizer::from_file(&path.join("tokenizer.json"))?,
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let client = run.mesh.connect(&rt)?;
        let peers = rt.block_on(client.discover())?;
        let (_, route) = nnmesh_client::mesh::choose_route(&peers, run.mesh.model_id)?;
        let num_layers = route[0].record.num_layers;
        Ok(Backend::Mesh {
            client,
            rt,
            tokenizer,
            num_layers,
            model: run.mesh.model_id,
        })
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        match self {
            Backend::Local(e) => &e.tokenizer,
            Backend::Mesh { tokenizer, .. } => tokenizer,
        }
    }

    /// Number of decoder layers.
    pub fn num_layers(&self) -> u32 {
        match self {
            Backend::Local(e) => e.model.config().num_hidden_layers as u32,
            Backend::Mesh { num_layers, .. } => *num_layers,
        }
    }

    /// Tokenizes text.
    ///
    /// # Errors
    /// When tokenization fails.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.tokenizer().encode(text)?)
    }

    /// Runs a graph and returns what it saved (on a mesh, printing the route).
    ///
    /// # Errors
    /// Validation or run failures, naming the failing stage on a mesh.
    pub fn execute(&self, graph: Graph) -> Result<Outcome> {
        match self {
            Backend::Local(engine) => Ok(trace::run(engine, graph, &Limits::default())?),
            Backend::Mesh {
                client, rt, model, ..
            } => {
                let out = rt.block_on(client.run(graph, *model))?;
                eprintln!("mesh route (model {}):", out.model);
                for (i, h) in out.route.iter().enumerate() {
                    eprintln!(
                        "  stage {i}: layers {:>2}..{:<2} on {}",
                        h.start, h.end, h.peer
                    );
                }
                let saves = out
                    .saves
                    .iter()
                    .map(|s| {
                        Ok(Saved {
                            name: s.name.clone(),
                            step: s.step,
                            value: crate::wire::from_wire(&s.value, tch::Device::Cpu)?,
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

/// The built-in experiments.
#[derive(Debug, Subcommand)]
pub enum Experiment {
    /// Logit lens: the top next token of every layer's residual stream.
    Lens {
        #[command(flatten)]
        run: RunArgs,
        #[arg(long, default_value = prompts::LENS)]
        prompt: String,
    },
    /// Activation patching: per-layer logit difference after patching the
    /// clean residual stream (last position) into the corrupted run.
    Patch {
        #[command(flatten)]
        run: RunArgs,
        #[arg(long, default_value = prompts::IOI_CLEAN)]
        clean: String,
        #[arg(long, default_value = prompts::IOI_CORRUPT)]
        corrupt: String,
        /// The answer token of the clean prompt (one token, with its leading space).
        #[arg(long, default_value = " John")]
        answer: String,
        /// The answer token of the corrupted prompt.
        #[arg(long, default_value = " Mary")]
        wrong: String,
    },
    /// Steering: add --coef × (mean residual stream of --toward − that of
    /// --away) at --layer to every generation step.
    Steer {
        #[command(flatten)]
        run: RunArgs,
        #[arg(long, default_value = prompts::STEER)]
        prompt: String,
        #[arg(long, default_value = prompts::STEER_TOWARD)]
        toward: String,
        #[arg(long, default_value = prompts::STEER_AWAY)]
        away: String,
        #[arg(long, default_value_t = 12)]
        layer: u32,
        #[arg(long, default_value_t = 3.0)]
        coef: f64,
        #[arg(long, default_value_t = 16)]
        max_new_tokens: u32,
    },
    /// Ablation: zero a layer's MLP output (or one attention head's z) and
    /// show how the next-token prediction changes.
    Ablate {
        #[command(flatten)]
        run: RunArgs,
        #[arg(long, default_value = prompts::LENS)]
        prompt: String,
        #[arg(long, default_value_t = 0)]
        layer: u32,
        /// Zero only this head's z instead of the whole MLP output.
        #[arg(long)]
        head: Option<u32>,
    },
    /// Attention pattern of one layer (post-softmax), averaged over heads.
    Attention {
        #[command(flatten)]
        run: RunArgs,
        #[arg(long, default_value = prompts::LENS)]
        prompt: String,
        #[arg(long, default_value_t = 0)]
        layer: u32,
    },
}

/// `nnmesh trace --graph FILE.json`.
///
/// # Errors
/// A file that cannot be read or parsed, or a failing run.
pub fn trace_file(run: &RunArgs, graph: &Path) -> Result<()> {
    let text = std::fs::read_to_string(graph)
        .with_context(|| format!("reading graph {}", graph.display()))?;
    let g = Graph::from_json(&text).with_context(|| format!("parsing {}", graph.display()))?;
    eprintln!(
        "graph {} ({} nodes, {} traces, hash {})",
        graph.display(),
        g.nodes.len(),
        g.traces.len(),
        g.content_hash()
    );
    let backend = Backend::open(run)?;
    let out = backend.execute(g)?;
    print_generated(backend.tokenizer(), &out);
    for s in &out.saves {
        print_saved(backend.tokenizer(), s);
    }
    write_out(run, &out)
}

fn write_out(run: &RunArgs, out: &Outcome) -> Result<()> {
    if let Some(path) = &run.out {
        let named: Vec<(String, Tensor)> = out
            .saves
            .iter()
            .map(|s| (s.key(), s.value.contiguous()))
            .collect();
        Tensor::write_safetensors(&named, path)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {} values to {}", named.len(), path.display());
    }
    Ok(())
}

fn print_generated(tok: &Tokenizer, out: &Outcome) {
    for (t, rows) in out.generated.iter().enumerate() {
        for (i, ids) in rows.iter().enumerate().filter(|(_, ids)| !ids.is_empty()) {
            println!(
                "trace {t} invoke {i} generated: {:?}",
                tok.decode(ids).unwrap_or_default()
            );
        }
    }
}

/// Prints one saved value: shape and dtype, then the top tokens if it looks
/// like logits, else summary statistics.
pub fn print_saved(tok: &Tokenizer, s: &Saved) {
    let v = &s.value;
    println!("{}  {:?} {:?}", s.key(), v.kind(), v.size());
    let numel = v.numel();
    if numel == 0 {
        return;
    }
    let vocab = tok_vocab(tok);
    let f = v.to_kind(Kind::Float);
    if v.size().last() == Some(&vocab) && v.is_floating_point() {
        let rows = f.reshape([-1, vocab]);
        let last = rows.get(-1);
        println!("    top tokens (last row): {}", top_tokens(tok, &last, 5));
    } else if numel <= 16 {
        let vals = Vec::<f32>::try_from(f.flatten(0, -1)).unwrap_or_default();
        println!("    {vals:?}");
    } else {
        println!(
            "    mean {:.4}  std {:.4}  min {:.4}  max {:.4}",
            f.mean(Kind::Float).double_value(&[]),
            f.std(true).double_value(&[]),
            f.min().double_value(&[]),
            f.max().double_value(&[])
        );
    }
}

fn tok_vocab(tok: &Tokenizer) -> i64 {
    tok.vocab_size() as i64
}

/// `" Paris" 0.62, " Rome" 0.05, …` for a `[vocab]` logits row.
pub fn top_tokens(tok: &Tokenizer, logits: &Tensor, k: i64) -> String {
    let probs = logits.to_kind(Kind::Float).softmax(-1, Kind::Float);
    let (p, idx) = probs.topk(k, -1, true, true);
    let p = Vec::<f32>::try_from(&p).unwrap_or_default();
    let idx = Vec::<i64>::try_from(&idx).unwrap_or_default();
    idx.iter()
        .zip(&p)
        .map(|(&i, &p)| format!("{:?} {p:.2}", tok.token_text(i as u32)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn single_token(backend: &Backend, text: &str) -> Result<u32> {
    let ids = backend.encode(text)?;
    match ids.as_slice() {
        [id] => Ok(*id),
        _ => bail!(
            "{text:?} is {} tokens ({ids:?}); the answer must be one token",
            ids.len()
        ),
    }
}

/// Runs a built-in experiment and prints its result.
///
/// # Errors
/// Loading, validation or run failures.
pub fn experiment(e: Experiment) -> Result<()> {
    match e {
        Experiment::Lens { run, prompt } => {
            let engine = Backend::open(&run)?;
            let n = engine.num_layers();
            let out = engine.execute(experiments::logit_lens(&prompt, 0..n))?;
            println!("logit lens: {prompt:?}\n");
            println!(
                "{:>5}  {:<16} {:>6}   next best",
                "layer", "top token", "prob"
            );
            for l in 0..n {
                let logits = out
                    .get(&format!("lens.{l}"))
                    .context("lens value missing")?
                    .get(0);
                let probs = logits.to_kind(Kind::Float).softmax(-1, Kind::Float);
                let (p, idx) = probs.topk(4, -1, true, true);
                let p = Vec::<f32>::try_from(&p)?;
                let idx = Vec::<i64>::try_from(&idx)?;
                let rest: Vec<String> = idx[1..]
                    .iter()
                    .zip(&p[1..])
                    .map(|(&i, &p)| format!("{:?} {p:.2}", engine.tokenizer().token_text(i as u32)))
                    .collect();
                println!(
                    "{l:>5}  {:<16} {:>6.3}   {}",
                    format!("{:?}", engine.tokenizer().token_text(idx[0] as u32)),
                    p[0],
                    rest.join(", ")
                );
            }
            write_out(&run, &out)
        }
        Experiment::Patch {
            run,
            clean,
            corrupt,
            answer,
            wrong,
        } => {
            let engine = Backend::open(&run)?;
            let (a, w) = (
                single_token(&engine, &answer)?,
                single_token(&engine, &wrong)?,
            );
            let layers: Vec<u32> = (0..engine.num_layers()).collect();
            let out = engine.execute(experiments::patching(&clean, &corrupt, &layers, a, w))?;
            let clean_d = out.get("clean").context("clean")?.double_value(&[]);
            let corrupt_d = out.get("corrupt").context("corrupt")?.double_value(&[]);
            let patched =
                Vec::<f32>::try_from(out.get("patched").context("patched")?.to_kind(Kind::Float))?;
            println!("activation patching (residual stream, last position)");
            println!("clean:   {clean:?}\ncorrupt: {corrupt:?}");
            println!(
                "logit difference {answer:?} - {wrong:?}: clean {clean_d:.3}, corrupt {corrupt_d:.3}\n"
            );
            println!("{:>5}  {:>9}  recovered", "layer", "logit diff");
            for (l, d) in patched.iter().enumerate() {
                let frac = (f64::from(*d) - corrupt_d) / (clean_d - corrupt_d);
                let bar = "█".repeat((frac.clamp(0.0, 1.0) * 30.0).round() as usize);
                println!("{l:>5}  {d:>9.3}  {:>5.0}% {bar}", frac * 100.0);
            }
            write_out(&run, &out)
        }
        Experiment::Steer {
            run,
            prompt,
            toward,
            away,
            layer,
            coef,
            max_new_tokens,
        } => {
            let engine = Backend::open(&run)?;
            let plain = engine.execute(experiments::steering(
                &prompt,
                &toward,
                &away,
                layer,
                0.0,
                max_new_tokens,
            ))?;
            let steered = engine.execute(experiments::steering(
                &prompt,
                &toward,
                &away,
                layer,
                coef,
                max_new_tokens,
            ))?;
            let text = |o: &Outcome| {
                engine
                    .tokenizer()
                    .decode(&o.generated[1][0])
                    .unwrap_or_default()
            };
            println!(
                "steering layer {layer} toward {toward:?}, away from {away:?} (coef {coef})\n"
            );
            println!("plain:   {prompt}{}", text(&plain));
            println!("steered: {prompt}{}", text(&steered));
            write_out(&run, &steered)
        }
        Experiment::Ablate {
            run,
            prompt,
            layer,
            head,
        } => {
            let engine = Backend::open(&run)?;
            let base = engine.execute(experiments::last_logits(&prompt))?;
            let base = base.get("logits").context("logits")?.get(0);
            let out = engine.execute(experiments::ablation(&prompt, layer, head))?;
            let ablated = out.get("logits").context("logits")?.get(0);
            let what = match head {
                Some(h) => format!("head {h} of layer {layer} (z = 0)"),
                None => format!("layer {layer} MLP output = 0"),
            };
            println!("ablation: {what}\nprompt: {prompt:?}\n");
            println!("plain:   {}", top_tokens(engine.tokenizer(), &base, 5));
            println!("ablated: {}", top_tokens(engine.tokenizer(), &ablated, 5));
            write_out(&run, &out)
        }
        Experiment::Attention { run, prompt, layer } => {
            let engine = Backend::open(&run)?;
            let out = engine.execute(experiments::attention_pattern(&prompt, layer))?;
            let p = out
                .get("pattern")
                .context("pattern")?
                .get(0)
                .mean_dim(0, false, Kind::Float);
            let sums = out.get("row_sums").context("row_sums")?;
            let ids = engine.encode(&prompt)?;
            println!("attention pattern, layer {layer}, mean over heads (rows: queries)\n");
            let toks: Vec<String> = ids
                .iter()
                .map(|&i| engine.tokenizer().token_text(i))
                .collect();
            for (q, tq) in toks.iter().enumerate() {
                let row = Vec::<f32>::try_from(p.get(q as i64))?;
                let cells: String = row.iter().map(|&x| shade(x)).collect();
                println!("{:>12} |{cells}|", format!("{tq:?}"));
            }
            let (lo, hi) = (sums.min().double_value(&[]), sums.max().double_value(&[]));
            println!("\nrow sums over all heads and queries: min {lo:.6}, max {hi:.6}");
            write_out(&run, &out)
        }
    }
}

fn shade(x: f32) -> char {
    [' ', '░', '▒', '▓', '█'][((x * 4.0).round() as usize).min(4)]
}

/// The built-in experiments that `nnmesh graph NAME` prints (and `examples/` holds).
pub const EXAMPLES: [&str; 6] = [
    "lens",
    "patch",
    "steer",
    "ablate",
    "ablate-head",
    "attention",
];

/// `nnmesh graph NAME`: prints a built-in experiment as JSON (to edit, or to run with `trace`).
///
/// # Errors
/// An unknown experiment name.
pub fn example_json(name: &str, layers: u32) -> Result<String> {
    let g = match name {
        "lens" => experiments::logit_lens(prompts::LENS, 0..layers),
        // " John" = 2322, " Mary" = 5099 in SmolLM2's vocabulary.
        "patch" => experiments::patching(
            prompts::IOI_CLEAN,
            prompts::IOI_CORRUPT,
            &(0..layers).collect::<Vec<_>>(),
            2322,
            5099,
        ),
        "steer" => experiments::steering(
            prompts::STEER,
            prompts::STEER_TOWARD,
            prompts::STEER_AWAY,
            12,
            3.0,
            16,
        ),
        "ablate" => experiments::ablation(prompts::LENS, 0, None),
        "ablate-head" => experiments::ablation(prompts::LENS, 0, Some(3)),
        "attention" => experiments::attention_pattern(prompts::LENS, 0),
        other => bail!(
            "unknown experiment {other:?} (lens, patch, steer, ablate, ablate-head, attention)"
        ),
    };
    Ok(g.to_json())
}
