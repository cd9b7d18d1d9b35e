//! The model commands: `inspect`, `generate`, `forward`.

use std::{io::Write, time::Instant};

use anyhow::{Context, Result, bail};
use nnmesh_graph::Module;
use nnmesh_runtime::hooks::NoHooks;

use super::ModelArgs;

/// `nnmesh inspect`.
pub(super) fn inspect(args: &ModelArgs, t: u64) -> Result<()> {
    let engine = args.load(None)?;
    let cfg = engine.model.config();
    let m = engine.manifest();
    let params = nnmesh_runtime::engine::parameter_count(cfg);
    println!("model        {}", args.path()?.display());
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

/// `nnmesh generate`: streams the text as it is generated.
pub(super) fn generate(args: &ModelArgs, prompt: &str, max_new: usize) -> Result<()> {
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

/// `nnmesh forward`: the top next tokens.
pub(super) fn forward(args: &ModelArgs, prompt: &str, k: i64, json: bool) -> Result<()> {
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
