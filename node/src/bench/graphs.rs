//! Intervention Graph overhead: a plain forward vs the same forward under an
//! empty graph, a read-only graph, a 30-layer logit lens and 30-layer
//! activation patching (all patched runs as invokes of one batched pass),
//! beside NNsight on the same model and token ids when it is installed.
//! NNsight runs each experiment in its tutorials' form and in the form an
//! expert writes (the lens stacked and stopped; patching as invokes of one
//! trace that cross values with `tracer.barrier`); every form's results are
//! checked against nnmesh's, and nnmesh is compared with the fastest.

mod nnsight;

use std::path::Path;

use anyhow::{Context, Result};
use nnmesh_graph::{
    Builder, Graph, Limits, Point, Prompt,
    recipes::{self, prompts},
};
use nnmesh_runtime::{engine::Engine, execute, hooks::NoHooks};
use tch::Kind;

use super::{python_json, time_median};
use crate::cli::BenchArgs;

/// Measures and prints the table.
///
/// # Errors
/// When a graph fails to run.
pub(super) fn run(
    args: &BenchArgs,
    engine: &Engine,
    prompt: &[u32],
    python: Option<&Path>,
) -> Result<()> {
    let n = engine.model.config().num_hidden_layers as u32;
    let limits = Limits::default();
    let run_graph = |g: &Graph| -> Result<()> {
        execute::run(engine, g.clone(), &limits)?;
        Ok(())
    };
    let plain = |ids: &[u32]| -> Result<()> {
        let _ = engine.logits(&[ids.to_vec()], &mut NoHooks)?;
        Ok(())
    };
    eprintln!("graphs: plain forward, empty graph, read-only graph, logit lens ...");
    let plain_s = time_median(args.runs, || plain(prompt))?;
    let g = Builder::new();
    g.trace_tokens(vec![prompt.to_vec()]);
    let empty = g.finish();
    let empty_s = time_median(args.runs, || run_graph(&empty))?;
    let g = Builder::new();
    let t = g.trace_tokens(vec![prompt.to_vec()]);
    for l in 0..n {
        g.read(t.at(&format!("model.layers.{l}"), Point::Output));
    }
    let reads = g.finish();
    let reads_s = time_median(args.runs, || run_graph(&reads))?;
    // On the prompt's own token ids, as NNsight gets them: its text would
    // tokenize differently where the repeated sentences meet.
    let mut lens = recipes::logit_lens("", 0..n);
    lens.traces[0].invokes[0].prompt = Prompt::Tokens(prompt.to_vec());
    let lens_s = time_median(args.runs, || run_graph(&lens))?;
    let lens_out = execute::run(engine, lens.clone(), &limits)?;

    eprintln!("graphs: {n}-layer activation patching in one batched pass ...");
    let clean_ids = engine.encode(prompts::IOI_CLEAN)?;
    let corrupt_ids = engine.encode(prompts::IOI_CORRUPT)?;
    let (answer, wrong) = (engine.encode(" John")?[0], engine.encode(" Mary")?[0]);
    let layers: Vec<u32> = (0..n).collect();
    let patch = recipes::patching(
        prompts::IOI_CLEAN,
        prompts::IOI_CORRUPT,
        &layers,
        answer,
        wrong,
    );
    let plain_ioi_s = time_median(args.runs, || plain(&corrupt_ids))?;
    let patch_s = time_median(args.runs, || run_graph(&patch))?;
    let patch_unshared_s = time_median(args.runs, || {
        execute::run_with(engine, patch.clone(), &limits, false)?;
        Ok(())
    })?;
    let patched = Vec::<f64>::try_from(
        execute::run(engine, patch.clone(), &limits)?
            .get("patched")
            .context("the patching graph saves `patched`")?
            .to_kind(Kind::Double),
    )?;

    let ns = python.and_then(|py| {
        eprintln!("NNsight: the same experiments (skipped when nnsight is not installed) ...");
        let spec = serde_json::json!({
            "lens_ids": prompt, "clean_ids": clean_ids, "corrupt_ids": corrupt_ids,
            "answer": answer, "wrong": wrong, "runs": args.runs.min(3),
        });
        let model = args.model.path().ok()?.display().to_string();
        python_json(py, "bench_nnsight.py", &[model, spec.to_string()])
            .map(|v| nnsight::Figures::from_json(&v))
            .map_err(|e| eprintln!("NNsight figures skipped: {e:#}"))
            .ok()
    });
    let (plain_lens_ns, plain_ioi_ns) = ns
        .as_ref()
        .map_or((None, None), |f| (f.plain_lens_s, f.plain_ioi_s));
    let (lens_forms, patch_forms) = ns.map_or((Vec::new(), Vec::new()), |f| (f.lens, f.patching));

    println!(
        "\nIntervention Graph overhead ({} tokens; patching on the {}-token IOI prompts), median of {} runs\n",
        prompt.len(),
        corrupt_ids.len(),
        args.runs
    );
    println!(
        "{:<48} {:>9} {:>9} {:>10} {:>9}",
        "", "nnmesh", "x plain", "NNsight", "x plain"
    );
    let cells = |secs: Option<f64>, base: Option<f64>| match (secs, base) {
        (Some(t), Some(b)) => (format!("{t:.3} s"), format!("{:.2}x", t / b)),
        _ => ("-".into(), "-".into()),
    };
    let row = |name: &str, ours: f64, base: f64, theirs: Option<(f64, f64)>| {
        let (t, r) = cells(theirs.map(|p| p.0), theirs.map(|p| p.1));
        println!(
            "{name:<48} {:>9} {:>9} {t:>10} {r:>9}",
            format!("{ours:.3} s"),
            format!("{:.2}x", ours / base)
        );
    };
    let form_rows = |forms: &[nnsight::Form], base: Option<f64>| {
        for f in forms {
            let (t, r) = match f.secs {
                Ok(s) => cells(Some(s), base),
                Err(_) => ("failed".into(), "-".into()),
            };
            println!(
                "{:<48} {:>9} {:>9} {t:>10} {r:>9}",
                format!("  NNsight: {}", f.name),
                "",
                ""
            );
        }
    };
    row(
        "plain forward",
        plain_s,
        plain_s,
        plain_lens_ns.map(|t| (t, t)),
    );
    row("empty graph", empty_s, plain_s, None);
    row(
        &format!("read-only graph ({n} layer outputs)"),
        reads_s,
        plain_s,
        None,
    );
    row(&format!("logit lens ({n} layers)"), lens_s, plain_s, None);
    form_rows(&lens_forms, plain_lens_ns);
    row(
        "plain forward (IOI prompt)",
        plain_ioi_s,
        plain_ioi_s,
        plain_ioi_ns.map(|t| (t, t)),
    );
    row(
        &format!("activation patching ({n} layers)"),
        patch_s,
        plain_ioi_s,
        None,
    );
    row(
        "  same, every row through every layer",
        patch_unshared_s,
        plain_ioi_s,
        None,
    );
    form_rows(&patch_forms, plain_ioi_ns);
    for (experiment, f) in lens_forms
        .iter()
        .map(|f| ("logit lens", f))
        .chain(patch_forms.iter().map(|f| ("activation patching", f)))
    {
        if let Err(e) = &f.secs {
            println!("NNsight {experiment}, {}, failed: {e}", f.name);
        }
    }

    if !lens_forms.is_empty() || !patch_forms.is_empty() {
        println!("\nNNsight against nnmesh's own run (max |difference|):");
    }
    for f in lens_forms.iter().filter(|f| f.secs.is_ok()) {
        println!(
            "  logit lens, {}: {}",
            f.name,
            f.lens_agreement(&lens_out, n)?
        );
    }
    for f in patch_forms.iter().filter(|f| f.secs.is_ok()) {
        println!(
            "  activation patching, {}: {}",
            f.name,
            f.patching_agreement(&patched)?
        );
    }

    if let Some((f, t)) = nnsight::fastest(&lens_forms) {
        println!(
            "\nlogit lens: nnmesh {:.1}x faster than NNsight's fastest form ({})",
            t / lens_s,
            f.name
        );
    }
    if let Some((f, t)) = nnsight::fastest(&patch_forms) {
        println!(
            "activation patching: nnmesh {:.1}x faster than NNsight's fastest form ({}); nnmesh runs {} invokes in one pass",
            t / patch_s,
            f.name,
            n + 2
        );
    }
    Ok(())
}
