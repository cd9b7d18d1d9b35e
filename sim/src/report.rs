//! The text report of a scenario's runs: a line of headline figures per
//! run, means per series, and the calibration against a real mesh.

use std::fmt::Write;

use crate::{Plan, Summary, calibrate};

/// The report, as printed at the end of a run and written to
/// `summary.txt`.
pub fn text(plan: &Plan, runs: &[Summary]) -> String {
    // Writing to a String cannot fail.
    let mut out = String::new();
    runs_table(&mut out, runs);
    series_table(&mut out, runs);
    let cal = calibrate(plan, runs);
    if !cal.is_empty() {
        let _ = writeln!(
            out,
            "\n{:<44} {:>10} {:>10} {:>8} {:>21}",
            "calibration (mean of the runs)", "measured", "simulated", "error", "range"
        );
        for c in &cal {
            let _ = writeln!(
                out,
                "{:<44} {:>10.1} {:>10.1} {:>+7.1}% {:>10.1}-{:<10.1}{}",
                c.name,
                c.measured,
                c.simulated,
                c.error * 100.0,
                c.range[0],
                c.range[1],
                if c.fitted { "  (fitted)" } else { "" }
            );
        }
    }
    out
}

/// One line per run: the headline figures.
fn runs_table(out: &mut String, runs: &[Summary]) {
    let _ = writeln!(
        out,
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
        let _ = writeln!(
            out,
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
fn series_table(out: &mut String, runs: &[Summary]) {
    let mut series: Vec<&str> = Vec::new();
    for r in runs {
        if !series.contains(&r.series.as_str()) {
            series.push(&r.series);
        }
    }
    if series.len() == runs.len() {
        return;
    }
    let _ = writeln!(
        out,
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
        let _ = writeln!(
            out,
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
