//! A discrete-event simulator of an nnmesh mesh: thousands of nodes
//! serving the blocks of a large model, clients generating through them,
//! nodes joining and dying, in virtual time, driving the same control
//! state machines as the real node and client (`nnmesh-control`'s
//! placement, route search, failure detection and fail-over).
//!
//! A run is a pure function of its [`Scenario`] and seed: the same file
//! gives the same [`Summary`] (wall-clock figures in [`summary::Perf`]
//! aside).
//!
//! ```no_run
//! use nnmesh_sim::{Plan, progress::Progress, run_plan, write_outputs};
//!
//! let plan = Plan::load("sim/scenarios/calibrate-loopback.toml".as_ref())?;
//! let runs = run_plan(&plan, &mut Progress::new(true), 1);
//! for r in &runs {
//!     println!("{}: {} of {} sessions completed", r.label, r.sessions.completed, r.sessions.counted);
//! }
//! write_outputs(&plan, &runs, "sim/results/calibrate-loopback".as_ref())?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The models (see [`scenario`] for every parameter):
//! - **nodes**: hardware classes with per-block decode and prefill times,
//!   memory (how many blocks they hold), up/down bandwidth, load time; a
//!   bounded admission queue and batched decode steps;
//! - **links**: latency from synthetic coordinates, bandwidth from each
//!   host's own links (no per-pair state);
//! - **churn**: lifetimes (exponential, log-normal, Pareto), joins that
//!   keep the mesh's size, deaths that close connections or vanish, a
//!   killer like the chaos test's, and a per-hop failure rate `p`;
//! - **workload**: open (Poisson) or closed (looping clients) sessions
//!   with prompt, new tokens, rows and intervention payload sizes;
//! - **discovery**: today's providers-and-`Info` design, or per-block DHT
//!   records, with Kademlia lookups measured on the membership.

mod dht;
mod engine;
mod net;
pub mod plot;
pub mod progress;
pub mod report;
mod rng;
pub mod scenario;
pub mod summary;
mod world;

use std::path::{Path, PathBuf};

pub use scenario::{Plan, Scenario};
pub use summary::Summary;

use crate::progress::Progress;

/// Runs one scenario; `label` names it in the summary and the progress bar.
pub fn run(sc: &Scenario, label: &str, progress: &mut Progress) -> Summary {
    world::World::new(sc.clone()).run(label, progress)
}

/// Runs every run of `plan`, `jobs` at a time; returns their summaries in
/// the plan's order.
pub fn run_plan(plan: &Plan, progress: &mut Progress, jobs: usize) -> Vec<Summary> {
    let finish = |(sweep, sc): &(scenario::SweepRun, Scenario), p: &mut Progress| {
        let mut s = run(sc, &sweep.label, p);
        s.series = sweep.series.clone();
        s.x = sweep.x;
        s
    };
    if jobs <= 1 || plan.runs.len() <= 1 {
        return plan.runs.iter().map(|r| finish(r, progress)).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let out: Vec<std::sync::Mutex<Option<Summary>>> = plan
        .runs
        .iter()
        .map(|_| std::sync::Mutex::new(None))
        .collect();
    std::thread::scope(|scope| {
        for _ in 0..jobs.min(plan.runs.len()) {
            scope.spawn(|| {
                let mut quiet = Progress::new(false);
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(r) = plan.runs.get(i) else { break };
                    let s = finish(r, &mut quiet);
                    eprintln!("{}: done in {:.1} s", s.label, s.perf.wall_s);
                    *out[i].lock().expect("not poisoned") = Some(s);
                }
            });
        }
    });
    out.into_iter()
        .map(|m| {
            m.into_inner()
                .expect("not poisoned")
                .expect("every run ran")
        })
        .collect()
}

/// Why outputs could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutputError {
    /// A file could not be written.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A plot could not be drawn.
    #[error(transparent)]
    Plot(#[from] plot::PlotError),
}

/// One calibration target against the runs: the measured value, the
/// simulated one (the mean over the runs), and the relative error.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Calibrated {
    /// The target's name.
    pub name: String,
    /// The measured value.
    pub measured: f64,
    /// The runs' mean.
    pub simulated: f64,
    /// The runs' smallest and largest values.
    pub range: [f64; 2],
    /// (simulated − measured) / measured.
    pub error: f64,
    /// Whether a parameter was fitted to it.
    pub fitted: bool,
}

/// Compares the runs with the scenario's calibration targets.
pub fn calibrate(plan: &Plan, runs: &[Summary]) -> Vec<Calibrated> {
    let values: Vec<serde_json::Value> = runs
        .iter()
        .map(|r| serde_json::to_value(r).expect("summaries serialize"))
        .collect();
    plan.base
        .calibration
        .iter()
        .map(|t| {
            let pointer = format!("/{}", t.path.replace('.', "/"));
            let xs: Vec<f64> = values
                .iter()
                .filter_map(|v| v.pointer(&pointer).and_then(serde_json::Value::as_f64))
                .collect();
            let mean = if xs.is_empty() {
                f64::NAN
            } else {
                xs.iter().sum::<f64>() / xs.len() as f64
            };
            Calibrated {
                name: t.name.clone(),
                measured: t.measured,
                simulated: mean,
                range: [
                    xs.iter().copied().fold(f64::INFINITY, f64::min),
                    xs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                ],
                error: (mean - t.measured) / t.measured,
                fitted: t.fitted,
            }
        })
        .collect()
}

/// Writes `summary.json` (every run), `summary.txt` (the report) and the
/// plan's plots into `dir`
/// (a plot none of whose runs ran is left out); returns the files written.
///
/// # Errors
/// When a file cannot be written or a plot drawn.
pub fn write_outputs(
    plan: &Plan,
    runs: &[Summary],
    dir: &Path,
) -> Result<Vec<PathBuf>, OutputError> {
    let write_err = |path: &Path, source| OutputError::Write {
        path: path.display().to_string(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(|e| write_err(dir, e))?;
    let path = dir.join("summary.json");
    let json = serde_json::json!({
        "scenario": plan.base.name,
        "description": plan.base.description,
        "calibration": calibrate(plan, runs),
        "runs": runs,
    });
    let text = serde_json::to_string_pretty(&json).expect("summaries serialize");
    std::fs::write(&path, text + "\n").map_err(|e| write_err(&path, e))?;
    let txt = dir.join("summary.txt");
    std::fs::write(&txt, report::text(plan, runs)).map_err(|e| write_err(&txt, e))?;
    let mut files = vec![path, txt];
    for p in &plan.base.plots {
        if plot::draw(p, runs, dir)? {
            files.push(dir.join(&p.file));
        }
    }
    Ok(files)
}
