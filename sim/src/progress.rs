//! A progress bar on standard error for long runs: simulated time, events
//! and their rate. Quiet for runs shorter than a second; a line every ten
//! seconds when standard error is not a terminal.

use std::{
    io::{IsTerminal, Write},
    time::{Duration, Instant},
};

/// Reports a run's progress.
#[derive(Debug)]
pub struct Progress {
    enabled: bool,
    tty: bool,
    label: String,
    total_s: f64,
    started: Instant,
    last: Option<Instant>,
}

impl Progress {
    /// A reporter; `enabled: false` prints nothing.
    pub fn new(enabled: bool) -> Progress {
        Progress {
            enabled,
            tty: std::io::stderr().is_terminal(),
            label: String::new(),
            total_s: 0.0,
            started: Instant::now(),
            last: None,
        }
    }

    pub(crate) fn start(&mut self, label: &str, total_s: f64) {
        self.label = label.to_string();
        self.total_s = total_s;
        self.started = Instant::now();
        self.last = None;
    }

    pub(crate) fn update(&mut self, sim_s: f64, events: u64, sessions: usize) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        let every = if self.tty {
            Duration::from_millis(250)
        } else {
            Duration::from_secs(10)
        };
        if now.duration_since(self.started) < Duration::from_secs(1)
            || self.last.is_some_and(|l| now.duration_since(l) < every)
        {
            return;
        }
        self.last = Some(now);
        let frac = (sim_s / self.total_s.max(1e-9)).clamp(0.0, 1.0);
        let width = 30;
        let done = (frac * width as f64).round() as usize;
        let wall = now.duration_since(self.started).as_secs_f64();
        let line = format!(
            "{} [{}{}] {:>3.0}%  sim {} / {}  {:.1} M events ({:.2} M/s)  {} sessions",
            self.label,
            "#".repeat(done),
            ".".repeat(width - done),
            frac * 100.0,
            clock(sim_s),
            clock(self.total_s),
            events as f64 / 1e6,
            events as f64 / 1e6 / wall.max(1e-9),
            sessions,
        );
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r{line}\x1b[K");
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    }

    pub(crate) fn finish(&mut self, events: u64, wall_s: f64) {
        if !self.enabled || self.last.is_none() {
            return;
        }
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[K");
        }
        let _ = writeln!(
            err,
            "{}: {:.1} M events in {:.1} s ({:.2} M events/s)",
            self.label,
            events as f64 / 1e6,
            wall_s,
            events as f64 / 1e6 / wall_s.max(1e-9)
        );
    }
}

/// `h:mm:ss`.
fn clock(s: f64) -> String {
    let s = s.max(0.0) as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}
