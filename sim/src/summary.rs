//! What a run reports: the JSON summary's types.
//!
//! Everything but [`Perf`] is a function of the scenario and its seed;
//! [`Perf`] holds wall-clock measurements (events per second, route search
//! time) and is left out when runs are compared for determinism.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A distribution's summary.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Dist {
    /// Samples.
    pub count: u64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

impl Dist {
    /// The summary of `xs` (sorted in place); percentiles are nearest-rank,
    /// as the chaos test computes them.
    pub fn of(xs: &mut [f64]) -> Dist {
        if xs.is_empty() {
            return Dist::default();
        }
        xs.sort_unstable_by(f64::total_cmp);
        let at = |p: f64| xs[((xs.len() - 1) as f64 * p).round() as usize];
        Dist {
            count: xs.len() as u64,
            mean: xs.iter().sum::<f64>() / xs.len() as f64,
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            max: xs[xs.len() - 1],
        }
    }
}

/// Up to `points` (value, fraction at or below) pairs of the empirical CDF
/// of `xs` (sorted in place).
pub fn cdf(xs: &mut [f64], points: usize) -> Vec<[f64; 2]> {
    xs.sort_unstable_by(f64::total_cmp);
    let n = xs.len();
    if n == 0 {
        return Vec::new();
    }
    let step = (n / points.max(1)).max(1);
    let mut out: Vec<[f64; 2]> = (0..n)
        .step_by(step)
        .map(|i| [xs[i], (i + 1) as f64 / n as f64])
        .collect();
    if out.last().is_some_and(|p| p[1] < 1.0) {
        out.push([xs[n - 1], 1.0]);
    }
    out
}

/// One run's results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// The run's label.
    pub label: String,
    /// Its series in plots.
    pub series: String,
    /// Its x in plots.
    pub x: f64,
    /// The scenario's name.
    pub scenario: String,
    /// The seed.
    pub seed: u64,
    /// The run itself.
    pub sim: SimStats,
    /// The clients' sessions.
    pub sessions: Sessions,
    /// Recoveries from failed hops.
    pub recovery: RecoveryStats,
    /// Blocks' holders over time.
    pub coverage: Coverage,
    /// Placement decisions.
    pub placement: PlacementStats,
    /// Control traffic.
    pub control: Traffic,
    /// The invariants checked along the run.
    pub invariants: Invariants,
    /// Wall-clock measurements (not deterministic).
    pub perf: Perf,
}

/// The run itself.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SimStats {
    /// Simulated seconds.
    pub duration_s: f64,
    /// Events processed.
    pub events: u64,
    /// Nodes at the start.
    pub nodes_initial: u32,
    /// Nodes that joined later.
    pub nodes_joined: u32,
    /// Nodes that left (died or were killed).
    pub nodes_left: u32,
    /// Nodes alive at the end.
    pub nodes_alive_end: u32,
    /// Nodes serving at the end.
    pub nodes_serving_end: u32,
}

/// Sessions counted (started after the warm-up).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sessions {
    /// Counted sessions.
    pub counted: u64,
    /// Completed.
    pub completed: u64,
    /// Failed, each with its cause.
    pub failed: u64,
    /// Still running at the end.
    pub unfinished: u64,
    /// completed / (completed + failed).
    pub completion_rate: f64,
    /// Failed sessions by cause.
    pub failed_by_cause: BTreeMap<String, u64>,
    /// Steps completed (all counted sessions).
    pub steps: u64,
    /// Steps per second of each completed session (steps / its duration).
    pub steps_per_s: Dist,
    /// Steps of the completed sessions over their summed durations: the
    /// rate a client gets over many sessions (the mean of `steps_per_s`
    /// favours the lucky short ones).
    pub steps_per_s_overall: f64,
    /// Step time, ms, of steps without a fail-over (from the previous step's
    /// end, as the chaos test measures: a session's first step includes its
    /// discovery and setup).
    pub step_ms: Dist,
    /// Step time, ms, of steps with a fail-over.
    pub failover_step_ms: Dist,
    /// Hops replaced.
    pub failovers: u64,
    /// Sessions with at least one fail-over that completed.
    pub completed_after_failover: u64,
    /// Restarts (recovery `restart`).
    pub restarts: u64,
    /// Legs of the initial routes.
    pub route_legs: Dist,
}

/// Recovery from failed hops.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RecoveryStats {
    /// From the failure (the node's death, or the refusal) to the
    /// replacement's output of the step, ms.
    pub latency_ms: Dist,
    /// The same, by cause.
    pub by_cause: BTreeMap<String, Dist>,
    /// From the failure to the client's decision that the hop failed, ms.
    pub detection_ms: Dist,
    /// The latency's empirical CDF: (ms, fraction).
    pub cdf: Vec<[f64; 2]>,
}

/// Block coverage over time.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Coverage {
    /// The samples.
    pub samples: Vec<CoverageSample>,
    /// Smallest fraction of blocks with a live holder, after the warm-up.
    pub min_covered: f64,
    /// Fraction of samples after the warm-up with every block covered.
    pub fully_covered: f64,
    /// Fewest holders of any block, after the warm-up.
    pub min_holders: u32,
}

/// One sample of coverage.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CoverageSample {
    /// Time, s.
    pub t_s: f64,
    /// Fraction of blocks with at least one live serving holder.
    pub covered: f64,
    /// Fewest live holders of a block.
    pub min_holders: u32,
    /// Mean live holders per block.
    pub mean_holders: f64,
    /// Fewest holders of a block by the records discovery reads (dead
    /// nodes' unexpired records included; `blocks` mode).
    pub min_holders_records: u32,
    /// Nodes alive.
    pub alive: u32,
    /// Nodes serving.
    pub serving: u32,
    /// Sessions running.
    pub sessions: u32,
}

/// Placement decisions.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PlacementStats {
    /// First placements.
    pub placed: u64,
    /// Moves completed.
    pub moves: u64,
    /// Moves aborted after loading (others moved meanwhile).
    pub aborted: u64,
    /// Placement checks (discoveries by nodes).
    pub checks: u64,
}

/// Control traffic per node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Traffic {
    /// The discovery mode.
    pub mode: String,
    /// Nodes measured (alive at least five minutes).
    pub nodes: u64,
    /// Control RPCs per node per second (initiated or served).
    pub rpcs_per_node_s: Dist,
    /// Control bytes per node per second (sent and received).
    pub bytes_per_node_s: Dist,
    /// Mean RPCs per node per second, by kind.
    pub by_kind: BTreeMap<String, f64>,
    /// RPCs per Kademlia lookup, measured on the membership.
    pub lookup_rpcs: f64,
    /// Rounds per lookup, measured.
    pub lookup_rounds: f64,
    /// RPCs per block read that stops at the first storer, measured.
    pub get_rpcs: f64,
    /// Rounds per such read, measured.
    pub get_rounds: f64,
    /// Bytes of one `Info` answer (a real signed record, encoded).
    pub info_bytes: u64,
    /// Discoveries (by nodes and clients).
    pub discoveries: u64,
    /// Discovery time, ms.
    pub discovery_ms: Dist,
}

/// Invariants checked along the run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Invariants {
    /// Sessions started (counted or not).
    pub sessions_started: u64,
    /// Sessions that ended without a cause, or that are unfinished with
    /// nothing left to wake them: must be 0.
    pub sessions_lost: u64,
    /// Coverage checks: the running counts against a recount from the
    /// nodes' spans with the control crate's `holders_per_block`.
    pub coverage_checks: u64,
    /// Checks where they differed: must be 0.
    pub coverage_mismatches: u64,
    /// Checks where the record store's aggregates differed from a recount:
    /// must be 0.
    pub record_mismatches: u64,
}

impl Invariants {
    /// Whether every invariant held.
    pub fn hold(&self) -> bool {
        self.sessions_lost == 0 && self.coverage_mismatches == 0 && self.record_mismatches == 0
    }
}

/// Wall-clock measurements: not deterministic.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Perf {
    /// Wall seconds.
    pub wall_s: f64,
    /// Events per wall second.
    pub events_per_s: f64,
    /// Wall time of each initial route search (`find_route` over the
    /// discovered candidates), ms.
    pub route_search_ms: Dist,
    /// Wall time of each fail-over decision on candidates (blacklist and
    /// `find_route` for the failed span), ms.
    pub failover_search_ms: Dist,
    /// Candidates per initial route search.
    pub route_candidates: Dist,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut xs: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let d = Dist::of(&mut xs);
        assert_eq!((d.count, d.p50, d.p99, d.max), (100, 51.0, 99.0, 100.0));
        assert_eq!(d.mean, 50.5);
        assert_eq!(Dist::of(&mut []), Dist::default());
        let c = cdf(&mut xs, 10);
        assert_eq!(c.first(), Some(&[1.0, 0.01]));
        assert_eq!(c.last(), Some(&[100.0, 1.0]));
    }
}
