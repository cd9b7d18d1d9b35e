//! SVG plots of runs' summaries, drawn with plotters' SVG backend (no
//! fonts or system libraries needed). Logarithmic axes are drawn as
//! linear axes over log10 of the values, labelled with the values.

use std::path::Path;

use plotters::prelude::*;

use crate::{
    scenario::{Plot, PlotKind},
    summary::Summary,
};

/// Why a plot could not be drawn.
#[derive(Debug, thiserror::Error)]
#[error("plot {file}: {message}")]
pub struct PlotError {
    /// The plot's file.
    pub file: String,
    /// What went wrong.
    pub message: String,
}

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

/// A line to draw.
struct Line {
    name: String,
    points: Vec<(f64, f64)>,
    dashed: bool,
}

/// Draws `plot` from `runs` into `dir`; `false` when none of the plot's
/// runs is among `runs` (nothing drawn).
///
/// # Errors
/// When the file cannot be written.
pub fn draw(plot: &Plot, runs: &[Summary], dir: &Path) -> Result<bool, PlotError> {
    let err = |message: String| PlotError {
        file: plot.file.clone(),
        message,
    };
    let runs: Vec<&Summary> = runs
        .iter()
        .filter(|r| plot.runs.is_empty() || plot.runs.contains(&r.label))
        .collect();
    if runs.is_empty() {
        return Ok(false);
    }
    let path = dir.join(&plot.file);
    match plot.kind {
        PlotKind::StepsVsX | PlotKind::TrafficVsX => {
            let mut series: Vec<String> = Vec::new();
            for r in &runs {
                if !series.contains(&r.series) {
                    series.push(r.series.clone());
                }
            }
            let mut lines = Vec::new();
            for s in &series {
                let mut pts: Vec<(f64, f64)> = runs
                    .iter()
                    .filter(|r| &r.series == s)
                    .filter_map(|r| match plot.kind {
                        PlotKind::StepsVsX => (r.sessions.completed > 0)
                            .then_some((r.x, r.sessions.steps_per_s_overall)),
                        _ => Some((r.x, r.control.rpcs_per_node_s.mean)),
                    })
                    .collect();
                pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                lines.push(Line {
                    name: if s.is_empty() {
                        "runs".into()
                    } else {
                        s.clone()
                    },
                    points: pts,
                    dashed: false,
                });
                if plot.kind == PlotKind::TrafficVsX {
                    let mut p99: Vec<(f64, f64)> = runs
                        .iter()
                        .filter(|r| &r.series == s)
                        .map(|r| (r.x, r.control.rpcs_per_node_s.p99))
                        .collect();
                    p99.sort_by(|a, b| a.0.total_cmp(&b.0));
                    lines.push(Line {
                        name: format!("{s} (p99 node)"),
                        points: p99,
                        dashed: true,
                    });
                }
            }
            let y = match plot.kind {
                PlotKind::StepsVsX => "steps/s (completed sessions' steps / their time)",
                _ => "control RPCs per node per second",
            };
            chart(
                &path,
                &plot.title,
                &plot.x_label,
                y,
                plot.log_x,
                plot.log_y,
                &lines,
                None,
                // Throughput falls with x, traffic grows: keep the legend
                // off the lines.
                if plot.kind == PlotKind::StepsVsX {
                    SeriesLabelPosition::LowerLeft
                } else {
                    SeriesLabelPosition::UpperLeft
                },
            )
        }
        PlotKind::RecoveryCdf => {
            let lines: Vec<Line> = runs
                .iter()
                .map(|r| Line {
                    name: r.label.clone(),
                    points: r
                        .recovery
                        .cdf
                        .iter()
                        .map(|p| (p[0].max(1e-3), p[1]))
                        .collect(),
                    dashed: false,
                })
                .collect();
            chart(
                &path,
                &plot.title,
                "recovery latency, ms",
                "fraction of recoveries",
                true,
                false,
                &lines,
                Some((0.0, 1.0)),
                SeriesLabelPosition::LowerRight,
            )
        }
        PlotKind::Coverage => {
            let r = runs[0];
            let s = &r.coverage.samples;
            let covered = Line {
                name: "blocks with a live holder (fraction)".into(),
                points: s.iter().map(|c| (c.t_s / 60.0, c.covered)).collect(),
                dashed: false,
            };
            let holders = vec![
                Line {
                    name: "fewest live holders of a block".into(),
                    points: s
                        .iter()
                        .map(|c| (c.t_s / 60.0, f64::from(c.min_holders)))
                        .collect(),
                    dashed: false,
                },
                Line {
                    name: "mean live holders per block".into(),
                    points: s.iter().map(|c| (c.t_s / 60.0, c.mean_holders)).collect(),
                    dashed: true,
                },
            ];
            two_panels(&path, &plot.title, &[covered], &holders)
        }
    }
    .map_err(err)?;
    Ok(true)
}

fn l10(v: f64) -> f64 {
    v.max(1e-12).log10()
}

/// Axis range of `vals` with a margin.
fn range(vals: impl Iterator<Item = f64>, log: bool) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in vals {
        let v = if log { l10(v) } else { v };
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if (hi - lo).abs() < 1e-9 {
        return (lo - 0.5, hi + 0.5);
    }
    let pad = (hi - lo) * 0.05;
    if log {
        (lo - pad, hi + pad)
    } else {
        ((lo - pad).min(0.0_f64.max(lo - pad)), hi + pad)
    }
}

fn label(v: f64, log: bool) -> String {
    let x = if log { 10f64.powf(v) } else { v };
    // Two significant digits on log axes (their ticks fall between round
    // numbers).
    let x = if log && x != 0.0 {
        let mag = 10f64.powf(x.abs().log10().floor() - 1.0);
        (x / mag).round() * mag
    } else {
        x
    };
    if x != 0.0 && (x.abs() < 0.01 || x.abs() >= 1e5) {
        format!("{x:.1e}")
    } else if x.abs() < 10.0 {
        format!("{x:.3}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    } else {
        format!("{x:.0}")
    }
}

#[allow(clippy::too_many_arguments)]
fn chart(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    log_x: bool,
    log_y: bool,
    lines: &[Line],
    y_fixed: Option<(f64, f64)>,
    legend: SeriesLabelPosition,
) -> Result<(), String> {
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let xs = range(
        lines.iter().flat_map(|l| l.points.iter().map(|p| p.0)),
        log_x,
    );
    let ys = y_fixed.unwrap_or_else(|| {
        range(
            lines.iter().flat_map(|l| l.points.iter().map(|p| p.1)),
            log_y,
        )
    });
    let mut c = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(xs.0..xs.1, ys.0..ys.1)
        .map_err(|e| e.to_string())?;
    let fx = move |v: &f64| label(*v, log_x);
    let fy = move |v: &f64| label(*v, log_y);
    c.configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(&fx)
        .y_label_formatter(&fy)
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, l) in lines.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<(f64, f64)> = l
            .points
            .iter()
            .map(|&(x, y)| {
                (
                    if log_x { l10(x) } else { x },
                    if log_y { l10(y) } else { y },
                )
            })
            .collect();
        let style = color.stroke_width(if l.dashed { 1 } else { 2 });
        let series = if l.dashed {
            c.draw_series(DashedLineSeries::new(pts.clone(), 6, 4, style))
                .map_err(|e| e.to_string())?
        } else {
            c.draw_series(LineSeries::new(pts.clone(), style))
                .map_err(|e| e.to_string())?
        };
        series.label(l.name.clone()).legend(move |(x, y)| {
            PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
        });
        if pts.len() <= 12 {
            c.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(|e| e.to_string())?;
        }
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(legend)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

/// Coverage over time above, holders over time below.
fn two_panels(path: &Path, title: &str, top: &[Line], bottom: &[Line]) -> Result<(), String> {
    let root = SVGBackend::new(path, (900, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let root = root
        .titled(title, ("sans-serif", 22))
        .map_err(|e| e.to_string())?;
    let (a, b) = root.split_vertically(300);
    let xs = range(
        top.iter()
            .chain(bottom)
            .flat_map(|l| l.points.iter().map(|p| p.0)),
        false,
    );
    for (area, lines, y_desc, ys) in [
        (&a, top, "fraction of blocks", (0.0, 1.05)),
        (
            &b,
            bottom,
            "holders per block",
            (
                0.0,
                range(
                    bottom.iter().flat_map(|l| l.points.iter().map(|p| p.1)),
                    false,
                )
                .1,
            ),
        ),
    ] {
        let mut c = ChartBuilder::on(area)
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(64)
            .build_cartesian_2d(xs.0..xs.1, ys.0..ys.1)
            .map_err(|e| e.to_string())?;
        c.configure_mesh()
            .x_desc("time, minutes")
            .y_desc(y_desc)
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(|e| e.to_string())?;
        for (i, l) in lines.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let style = color.stroke_width(if l.dashed { 1 } else { 2 });
            let series = if l.dashed {
                c.draw_series(DashedLineSeries::new(l.points.clone(), 6, 4, style))
                    .map_err(|e| e.to_string())?
            } else {
                c.draw_series(LineSeries::new(l.points.clone(), style))
                    .map_err(|e| e.to_string())?
            };
            series.label(l.name.clone()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        }
        c.configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerRight)
            .draw()
            .map_err(|e| e.to_string())?;
    }
    root.present().map_err(|e| e.to_string())
}
