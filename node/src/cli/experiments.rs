//! The built-in experiments (`lens`, `patch`, `steer`, `ablate`,
//! `attention`), `trace` (run a JSON graph) and `graph` (print a built-in
//! experiment as JSON).

use std::path::Path;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use nnmesh_graph::{
    Graph,
    recipes::{self, prompts},
};
use tch::Kind;

use super::{
    backend::{Backend, RunArgs},
    show::{print_generated, print_saved, top_tokens, write_out},
};

/// The built-in experiments.
#[derive(Debug, Subcommand)]
pub(crate) enum Experiment {
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
pub(super) fn trace_file(run: &RunArgs, graph: &Path) -> Result<()> {
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
pub(super) fn experiment(e: Experiment) -> Result<()> {
    match e {
        Experiment::Lens { run, prompt } => {
            let engine = Backend::open(&run)?;
            let n = engine.num_layers();
            let out = engine.execute(recipes::logit_lens(&prompt, 0..n))?;
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
            let out = engine.execute(recipes::patching(&clean, &corrupt, &layers, a, w))?;
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
            let plain = engine.execute(recipes::steering(
                &prompt,
                &toward,
                &away,
                layer,
                0.0,
                max_new_tokens,
            ))?;
            let steered = engine.execute(recipes::steering(
                &prompt,
                &toward,
                &away,
                layer,
                coef,
                max_new_tokens,
            ))?;
            let text = |o: &nnmesh_runtime::execute::Outcome| {
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
            let base = engine.execute(recipes::last_logits(&prompt))?;
            let base = base.get("logits").context("logits")?.get(0);
            let out = engine.execute(recipes::ablation(&prompt, layer, head))?;
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
            let out = engine.execute(recipes::attention_pattern(&prompt, layer))?;
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

/// `nnmesh graph NAME`: a built-in experiment as JSON (to edit, or to run
/// with `trace`).
///
/// # Errors
/// An unknown experiment name.
pub(super) fn example_json(name: &str, layers: u32) -> Result<String> {
    match recipes::example(name, layers) {
        Some(g) => Ok(g.to_json()),
        None => bail!(
            "unknown experiment {name:?} (one of: {})",
            recipes::EXAMPLES.join(", ")
        ),
    }
}
