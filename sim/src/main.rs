//! `nnmesh-sim run SCENARIO.toml`: runs a scenario (every run of its
//! sweep), prints a table of the headline figures, and writes
//! `summary.json` and the scenario's plots.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use nnmesh_sim::{Plan, Summary, calibrate, progress::Progress, run_plan, write_outputs};

#[derive(Parser)]
#[command(
    version,
    about = "Simulate an nnmesh mesh in virtual time, on the real control code"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a scenario file.
    Run {
        /// The scenario (TOML).
        scenario: PathBuf,
        /// Output folder (default: `results/NAME` beside the scenario's
        /// folder, e.g. `sim/results/NAME`).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Override the scenario's seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Only the runs with these labels.
        #[arg(long)]
        only: Vec<String>,
        /// Runs at once (each on its own thread).
        #[arg(long, short = 'j', default_value_t = 1)]
        jobs: usize,
        /// No progress bar.
        #[arg(long, short)]
        quiet: bool,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Run {
            scenario,
            out,
            seed,
            only,
            jobs,
            quiet,
        } => {
            let mut plan = Plan::load(&scenario)?;
            if let Some(seed) = seed {
                for (_, sc) in &mut plan.runs {
                    sc.seed = seed;
                }
            }
            if !only.is_empty() {
                plan.runs.retain(|(r, _)| only.contains(&r.label));
                if plan.runs.is_empty() {
                    bail!("no run is labelled {only:?}");
                }
            }
            let out = out.unwrap_or_else(|| {
                let dir = scenario
                    .parent()
                    .and_then(|p| p.parent())
                    .map(|p| p.to_path_buf())
                    .unwrap_or_default();
                dir.join("results").join(&plan.base.name)
            });
            let runs = run_plan(&plan, &mut Progress::new(!quiet), jobs);
            print_table(&runs);
            print_series(&runs);
            let cal = calibrate(&plan, &runs);
            if !cal.is_empty() {
                println!(
                    "\n{:<44} {:>10} {:>10} {:>8}",
                    "calibration (mean of the runs)", "measured", "simulated", "error"
                );
                for c in &cal {
                    println!(
                        "{:<44} {:>10.1} {:>10.1} {:>+7.1}%{}",
                        c.name,
                        c.measured,
                        c.simulated,
                        c.error * 100.0,
                        if c.fitted { "  (fitted)" } else { "" }
                    );
                }
            }
            let files = write_outputs(&plan, &runs, &out)
                .with_context(|| format!("writing outputs to {}", out.display()))?;
            for f in files {
                println!("wrote {}", f.display());
            }
            if let Some(bad) = runs.iter().find(|r| !r.invariants.hold()) {
                bail!(
                    "run {}: an invariant failed: {:?}",
                    bad.label,
                    bad.invariants
                );
            }
            Ok(())
        }
    }
}

fn print_table(runs: &[Summary]) {
    println!(
        "{:<28} {:>8} {:>9} {:>8} {:>9} {:>9} {:>10} {:>10} {:>9} {:>9}",
        "run",
        "sessions",
        "complete",
        "steps/s",
        "step p50",
        "step p99",
        "recov p50",
        "RPC/node/s",
        "route ms",
        "events/s"
    );
    for r in runs {
        let s = &r.sessions;
        println!(
            "{:<28} {:>8} {:>8.3}% {:>8.2} {:>7.0}ms {:>7.0}ms {:>8.0}ms {:>10.2} {:>9.3} {:>8.2}M",
            truncate(&r.label, 28),
            s.counted,
            s.completion_rate * 100.0,
            s.steps_per_s_overall,
            s.step_ms.p50,
            s.step_ms.p99,
            r.recovery.latency_ms.p50,
            r.control.rpcs_per_node_s.mean,
            r.perf.route_search_ms.p50,
            r.perf.events_per_s / 1e6,
        );
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n - 1).chain(['…']).collect()
    }
}

/// Means per series, when a series has several runs (seeds).
fn print_series(runs: &[Summary]) {
    let mut series: Vec<&str> = Vec::new();
    for r in runs {
        if !series.contains(&r.series.as_str()) {
            series.push(&r.series);
        }
    }
    if series.len() == runs.len() {
        return;
    }
    println!(
        "\n{:<28} {:>4} {:>9} {:>8} {:>10} {:>10} {:>9} {:>8} {:>10}",
        "series (mean of runs)",
        "runs",
        "complete",
        "steps/s",
        "recov p50",
        "min cover",
        "full cov",
        "min hold",
        "RPC/node/s"
    );
    for s in series {
        let rs: Vec<&Summary> = runs.iter().filter(|r| r.series == s).collect();
        let n = rs.len() as f64;
        let mean = |f: &dyn Fn(&Summary) -> f64| rs.iter().map(|r| f(r)).sum::<f64>() / n;
        println!(
            "{:<28} {:>4} {:>8.3}% {:>8.2} {:>8.0}ms {:>10.3} {:>9.3} {:>8.2} {:>10.2}",
            truncate(s, 28),
            rs.len(),
            mean(&|r| r.sessions.completion_rate) * 100.0,
            mean(&|r| r.sessions.steps_per_s_overall),
            mean(&|r| r.recovery.latency_ms.p50),
            mean(&|r| r.coverage.min_covered),
            mean(&|r| r.coverage.fully_covered),
            mean(&|r| f64::from(r.coverage.min_holders)),
            mean(&|r| r.control.rpcs_per_node_s.mean),
        );
    }
}
