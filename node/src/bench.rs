//! `nnmesh bench`: prefill latency and greedy decode speed beside Hugging
//! Face transformers, Intervention Graph overhead beside NNsight
//! (`graphs`), a 3-node loopback mesh against in-process (`mesh`), with
//! `--concurrency` many clients at once, batching on and off
//! (`concurrency`), and with `--resilience` recovery, replay against restart and verification on a
//! six-node mesh (`resilience`), each measured side by side in one run and
//! printed as figures and ratios.

mod concurrency;
mod graphs;
mod mesh;
mod nodes;
mod resilience;

use nodes::LocalNodes;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result};

use nnmesh_runtime::{engine::Engine, hooks::NoHooks};

use crate::cli::BenchArgs;

const TEXT: &str = "The history of the Eiffel Tower begins in 1884, when two engineers \
    sketched a tall iron pylon for the coming World's Fair in Paris. ";
const DECODE_PROMPT: &str = "The Eiffel Tower is in the city of";

/// Median of a non-empty sample.
pub(crate) fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// `prompt_tokens` token ids of deterministic English text.
pub(crate) fn prompt_ids(engine: &Engine, prompt_tokens: usize) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    while ids.len() < prompt_tokens {
        ids.extend(engine.encode(TEXT)?);
    }
    ids.truncate(prompt_tokens);
    Ok(ids)
}

/// Times `f` `runs` times after one warm-up; returns the median seconds.
pub(crate) fn time_median(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(median(times))
}

/// Seconds one call of `f` takes.
pub(crate) fn time_once(f: impl FnOnce() -> Result<()>) -> Result<f64> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed().as_secs_f64())
}

/// The project's virtualenv Python (`./.venv`, as `scripts/bench.sh` runs
/// from the checkout), if present.
pub(crate) fn default_python() -> Option<PathBuf> {
    let py = PathBuf::from(".venv/bin/python");
    py.exists().then_some(py)
}

/// A benchmark script of the checkout (`./scripts/NAME`).
fn script(name: &str) -> Option<PathBuf> {
    let p = Path::new("scripts").join(name);
    p.exists().then_some(p)
}

/// Runs a Python benchmark script and parses its last JSON line.
pub(crate) fn python_json(
    python: &Path,
    script_name: &str,
    args: &[String],
) -> Result<serde_json::Value> {
    let script = script(script_name).with_context(|| {
        format!("./scripts/{script_name} not found (run nnmesh bench from an nnmesh checkout)")
    })?;
    let out = Command::new(python)
        .arg(&script)
        .args(args)
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    if !out.status.success() {
        anyhow::bail!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().context("no output")?;
    Ok(serde_json::from_str(line)?)
}

/// Where `bench_hf.py` saves a GGUF `model` as a plain f32 safetensors
/// checkpoint (`target/reference/STEM-safetensors`), so both sides can time
/// loading the same weights without transformers' slow GGUF path; `None`
/// when the model is not a GGUF file.
fn safetensors_dir(model: &Path) -> Option<PathBuf> {
    if model.extension()? != "gguf" {
        return None;
    }
    let stem = model.file_stem()?.to_string_lossy();
    Some(Path::new("target/reference").join(format!("{stem}-safetensors")))
}

/// Loads the model again from its safetensors folder `dir`: the seconds
/// that takes, and the largest difference of the prefill logits from
/// `engine`'s (the same weights, so they should agree).
///
/// # Errors
/// When the folder cannot be loaded or run.
fn load_safetensors(
    args: &BenchArgs,
    engine: &Engine,
    dir: &Path,
    ids: &[u32],
) -> Result<(f64, f64)> {
    let (device, kind) = args.model.device_kind()?;
    eprintln!("nnmesh: loading {} ...", dir.display());
    let t0 = Instant::now();
    let from_dir = Engine::load(dir, None, kind, device)
        .with_context(|| format!("loading {}", dir.display()))?;
    let load_s = t0.elapsed().as_secs_f64();
    let ids = [ids.to_vec()];
    let diff = (engine.logits(&ids, &mut NoHooks)? - from_dir.logits(&ids, &mut NoHooks)?)
        .abs()
        .max()
        .double_value(&[]);
    Ok((load_s, diff))
}

/// Runs the benchmark and prints its table.
///
/// # Errors
/// When the model cannot be loaded or run.
pub(crate) fn run(args: &BenchArgs) -> Result<()> {
    let t0 = Instant::now();
    let engine = args.model.load(None)?;
    let load_s = t0.elapsed().as_secs_f64();
    let prefill_ids = prompt_ids(&engine, args.prompt_tokens)?;
    let decode_ids = engine.encode(DECODE_PROMPT)?;
    let n = args.decode_tokens;
    eprintln!(
        "nnmesh: prefill of {} tokens, {} runs ...",
        prefill_ids.len(),
        args.runs
    );
    let prefill_s = time_median(args.runs, || {
        let _ = engine.logits(std::slice::from_ref(&prefill_ids), &mut NoHooks)?;
        Ok(())
    })?;
    eprintln!(
        "nnmesh: greedy decode of {n} tokens, {} runs ...",
        args.runs
    );
    let decode_s = time_median(args.runs, || {
        engine.generate(
            std::slice::from_ref(&decode_ids),
            n,
            &mut NoHooks,
            &mut |_, _| {},
        )?;
        Ok(())
    })?;
    let decode_tps = n as f64 / decode_s;

    let python = args.python.clone().or_else(default_python);
    let safetensors = safetensors_dir(&args.model.path()?);
    let hf = match &python {
        Some(py) => {
            eprintln!("transformers: same measurements (loading the GGUF takes a while) ...");
            let spec = serde_json::json!({
                "prefill_ids": prefill_ids, "decode_ids": decode_ids,
                "decode_tokens": n, "runs": args.runs, "safetensors_dir": safetensors,
            });
            match python_json(
                py,
                "bench_hf.py",
                &[args.model.path()?.display().to_string(), spec.to_string()],
            ) {
                Ok(v) => Some(v),
                Err(e) => {
                    eprintln!("transformers figures skipped: {e:#}");
                    None
                }
            }
        }
        None => None,
    };
    // bench_hf.py writes the folder on its first run; nnmesh loads it after.
    let from_safetensors = match safetensors.filter(|d| d.join("config.json").exists()) {
        Some(dir) => Some(load_safetensors(args, &engine, &dir, &prefill_ids)?),
        None => None,
    };

    println!(
        "\nSmolLM2 ({:?} on {:?}, {} threads), median of {} runs\n",
        engine.model.kind(),
        engine.model.device(),
        tch::get_num_threads(),
        args.runs
    );
    println!(
        "{:<28} {:>12} {:>14} {:>10}",
        "", "nnmesh", "transformers", "ratio"
    );
    let row = |name: &str, ours: f64, theirs: Option<f64>, unit: &str, higher_better: bool| {
        let (t, r) = match theirs {
            Some(t) => {
                let ratio = if higher_better { ours / t } else { t / ours };
                (format!("{t:.3}{unit}"), format!("{ratio:.2}x"))
            }
            None => ("-".into(), "-".into()),
        };
        println!(
            "{name:<28} {:>12} {t:>14} {r:>10}",
            format!("{ours:.3}{unit}")
        );
    };
    let get = |k: &str| hf.as_ref().and_then(|v| v[k].as_f64());
    row("load (GGUF)", load_s, get("load_s"), " s", false);
    if let Some((st_load_s, _)) = from_safetensors {
        row(
            "load (safetensors, f32)",
            st_load_s,
            get("load_safetensors_s"),
            " s",
            false,
        );
    }
    row(
        &format!("prefill {} tokens", prefill_ids.len()),
        prefill_s,
        get("prefill_s"),
        " s",
        false,
    );
    row(
        &format!("greedy decode ({n} tokens)"),
        decode_tps,
        get("decode_tps"),
        " t/s",
        true,
    );
    println!("\nratio > 1 means nnmesh is faster.");
    if let Some((_, diff)) = from_safetensors {
        println!(
            "nnmesh loaded from safetensors agrees with the GGUF: prefill logits max |difference| {diff:.1e}"
        );
    }
    if !args.skip_graphs {
        graphs::run(args, &engine, &prefill_ids, python.as_deref())?;
    }
    if !args.skip_mesh {
        mesh::run(args, &engine, &prefill_ids)?;
    }
    if args.concurrency {
        concurrency::run(args, &engine)?;
    }
    if args.resilience {
        resilience::run(args, &engine)?;
    }
    Ok(())
}
