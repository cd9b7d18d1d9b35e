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

/// Where a graph runs: this process (a full model) or, later, a mesh.
#[derive(Debug, Args, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Write every saved value to this safetensors file.
    #[arg(long)]
    pub out: Option<PathBuf>,
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
    /// Steering: add the mean residual stream of --toward at --layer, times
    /// --coef, to every generation step.
    Steer {
        #[command(flatten)]
        run: RunArgs,
        #[arg(long, default_value = prompts::STEER)]
        prompt: String,
        #[arg(long, default_value = prompts::STEER_TOWARD)]
        toward: String,
        #[arg(long, default_value_t = 10)]
        layer: u32,
        #[arg(long, default_value_t = 4.0)]
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

/// Runs a graph on the model the flags name.
///
/// # Errors
/// Loading, validation or run failures.
pub fn execute(engine: &Engine, graph: Graph) -> Result<Outcome> {
    Ok(trace::run(engine, graph, &Limits::default())?)
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
    let engine = run.model.load(None)?;
    let out = execute(&engine, g)?;
    print_generated(&engine.tokenizer, &out);
    for s in &out.saves {
        print_saved(&engine.tokenizer, s);
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

fn single_token(engine: &Engine, text: &str) -> Result<u32> {
    let ids = engine.encode(text)?;
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
            let engine = run.model.load(None)?;
            let n = engine.model.config().num_hidden_layers as u32;
            let out = execute(&engine, experiments::logit_lens(&prompt, 0..n))?;
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
                    .map(|(&i, &p)| format!("{:?} {p:.2}", engine.tokenizer.token_text(i as u32)))
                    .collect();
                println!(
                    "{l:>5}  {:<16} {:>6.3}   {}",
                    format!("{:?}", engine.tokenizer.token_text(idx[0] as u32)),
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
            let engine = run.model.load(None)?;
            let (a, w) = (
                single_token(&engine, &answer)?,
                single_token(&engine, &wrong)?,
            );
            let n = engine.model.config().num_hidden_layers as u32;
            let layers: Vec<u32> = (0..n).collect();
            let out = execute(
                &engine,
                experiments::patching(&clean, &corrupt, &layers, a, w),
            )?;
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
            layer,
            coef,
            max_new_tokens,
        } => {
            let engine = run.model.load(None)?;
            let plain = execute(
                &engine,
                experiments::steering(&prompt, &toward, layer, 0.0, max_new_tokens),
            )?;
            let steered = execute(
                &engine,
                experiments::steering(&prompt, &toward, layer, coef, max_new_tokens),
            )?;
            let text = |o: &Outcome| {
                engine
                    .tokenizer
                    .decode(&o.generated[1][0])
                    .unwrap_or_default()
            };
            println!("steering layer {layer} toward {toward:?} (coef {coef})\n");
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
            let engine = run.model.load(None)?;
            let base = engine.logits(&[engine.encode(&prompt)?], &mut crate::hooks::NoHooks)?;
            let out = execute(&engine, experiments::ablation(&prompt, layer, head))?;
            let ablated = out.get("logits").context("logits")?.get(0);
            let what = match head {
                Some(h) => format!("head {h} of layer {layer} (z = 0)"),
                None => format!("layer {layer} MLP output = 0"),
            };
            println!("ablation: {what}\nprompt: {prompt:?}\n");
            println!(
                "plain:   {}",
                top_tokens(&engine.tokenizer, &base.get(0).get(-1), 5)
            );
            println!("ablated: {}", top_tokens(&engine.tokenizer, &ablated, 5));
            write_out(&run, &out)
        }
        Experiment::Attention { run, prompt, layer } => {
            let engine = run.model.load(None)?;
            let out = execute(&engine, experiments::attention_pattern(&prompt, layer))?;
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
                .map(|&i| engine.tokenizer.token_text(i))
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
        "steer" => experiments::steering(prompts::STEER, prompts::STEER_TOWARD, 10, 4.0, 16),
        "ablate" => experiments::ablation(prompts::LENS, 0, None),
        "ablate-head" => experiments::ablation(prompts::LENS, 0, Some(3)),
        "attention" => experiments::attention_pattern(prompts::LENS, 0),
        other => bail!(
            "unknown experiment {other:?} (lens, patch, steer, ablate, ablate-head, attention)"
        ),
    };
    Ok(g.to_json())
}
