//! `nnmesh-sim run SCENARIO.toml`: runs a scenario (every run of its
//! sweep), prints a table of the headline figures, and writes
//! `summary.json` and the scenario's plots.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use nnmesh_sim::{
    Plan, Scenario, Summary, plot, progress::Progress, report, run_plan, write_outputs,
};

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
    /// Redraw a scenario's plots from the `summary.json` of an earlier
    /// run (after a change to the plots, without running it again).
    Plot {
        /// The scenario (TOML): its plots are drawn.
        scenario: PathBuf,
        /// The folder with `summary.json`, where the plots go (default as
        /// for `run`).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Print every parameter with its default, as a scenario file.
    Defaults,
}

/// `results/NAME` beside the scenario's folder (`sim/results/NAME`).
fn default_out(scenario: &Path, plan: &Plan) -> PathBuf {
    let dir = scenario
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.to_path_buf())
        .unwrap_or_default();
    dir.join("results").join(&plan.base.name)
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
            let out = out.unwrap_or_else(|| default_out(&scenario, &plan));
            let runs = run_plan(&plan, &mut Progress::new(!quiet), jobs);
            print!("{}", report::text(&plan, &runs));
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
        Command::Plot { scenario, out } => {
            let plan = Plan::load(&scenario)?;
            let out = out.unwrap_or_else(|| default_out(&scenario, &plan));
            let path = out.join("summary.json");
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            #[derive(serde::Deserialize)]
            struct Saved {
                runs: Vec<Summary>,
            }
            let saved: Saved = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", path.display()))?;
            for p in &plan.base.plots {
                if plot::draw(p, &saved.runs, &out)
                    .with_context(|| format!("drawing {}", p.file))?
                {
                    println!("wrote {}", out.join(&p.file).display());
                }
            }
            Ok(())
        }
        Command::Defaults => {
            let text = toml::to_string(&Scenario::default()).context("serializing the defaults")?;
            print!("{text}");
            Ok(())
        }
    }
}
