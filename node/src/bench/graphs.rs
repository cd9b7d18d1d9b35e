//! Intervention Graph overhead: a plain forward vs the same forward under an
//! empty graph, a read-only graph, a 30-layer logit lens and 30-layer
//! activation patching (all patched runs as invokes of one batched pass),
//! beside NNsight on the same model and token ids when it is installed.

use std::path::Path;

use anyhow::Result;
use nnmesh_graph::{
    Builder, Graph, Limits, Point,
    recipes::{self, prompts},
};
use nnmesh_runtime::{engine::Engine, execute, hooks::NoHooks};

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
    let lens = recipes::logit_lens(&engine.tokenizer.decode(prompt)?, 0..n);
    let lens_s = time_median(args.runs, || run_graph(&lens))?;

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

    let ns = python.and_then(|py| {
        eprintln!("NNsight: the same experiments (skipped when nnsight is not installed) ...");
        let spec = serde_json::json!({
            "lens_ids": prompt, "clean_ids": clean_ids, "corrupt_ids": corrupt_ids,
            "answer": answer, "wrong": wrong, "runs": args.runs.min(3),
        });
        let model = args.model.path().ok()?.display().to_string();
        python_json(py, "bench_nnsight.py", &[model, spec.to_string()])
            .map_err(|e| eprintln!("NNsight figures skipped: {e:#}"))
            .ok()
    });
    let ns_get = |k: &str| ns.as_ref().and_then(|v| v[k].as_f64());
    let ns_pair = |k: &str, base: &str| Some((ns_get(k)?, ns_get(base)?));

    println!(
        "\nIntervention Graph overhead ({} tokens; patching on the {}-token IOI prompts), median of {} runs\n",
        prompt.len(),
        corrupt_ids.len(),
        args.runs
    );
    println!(
        "{:<36} {:>9} {:>9} {:>10} {:>9}",
        "", "nnmesh", "x plain", "NNsight", "x plain"
    );
    let row = |name: &str, ours: f64, base: f64, theirs: Option<(f64, f64)>| {
        let (t, r) = match theirs {
            Some((t, b)) => (format!("{t:.3} s"), format!("{:.2}x", t / b)),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{name:<36} {:>9} {:>9} {t:>10} {r:>9}",
            format!("{ours:.3} s"),
            format!("{:.2}x", ours / base)
        );
    };
    row(
        "plain forward",
        plain_s,
        plain_s,
        ns_pair("plain_lens_s", "plain_lens_s"),
    );
    row("empty graph", empty_s, plain_s, None);
    row(
        &format!("read-only graph ({n} layer outputs)"),
        reads_s,
        plain_s,
        None,
    );
    row(
        &format!("logit lens ({n} layers)"),
        lens_s,
        plain_s,
        ns_pair("lens_s", "plain_lens_s"),
    );
    row(
        "plain forward (IOI prompt)",
        plain_ioi_s,
        plain_ioi_s,
        ns_pair("plain_ioi_s", "plain_ioi_s"),
    );
    row(
        &format!("activation patching ({n} layers)"),
        patch_s,
        plain_ioi_s,
        ns_pair("patch_s", "plain_ioi_s"),
    );
    row(
        "  same, every row through every layer",
        patch_unshared_s,
        plain_ioi_s,
        None,
    );
    if let Some(e) = ns.as_ref().and_then(|v| v["patch_error"].as_str()) {
        println!("NNsight patching failed: {e}");
    }
    if let Some(t) = ns_get("patch_s") {
        println!(
            "\nactivation patching: nnmesh {:.1}x faster than NNsight ({} invokes in one pass vs one trace per layer)",
            t / patch_s,
            n + 2
        );
    }
    Ok(())
}
