//! Failure detection for one hop's step, as a sans-IO state machine:
//! [`Detector::on_event`] takes what the client saw of the hop (the step
//! was sent, a report arrived, the connection dropped, a probe was
//! answered, a timer fired) and returns what to do (set a timer, redial,
//! probe, declare the hop lost, or give up on a hop that is alive but makes
//! no progress).
//!
//! The rules, those of the mesh client:
//! - **Connection loss or missed pings.** The transport reports the peer
//!   [`Event::Disconnected`] or [`Event::Unresponsive`] (pings every 2 s,
//!   closed after 8 s unanswered). The client redials; a hop that cannot
//!   be reached within [`Config::redial_timeout`] is [`Action::Lost`].
//! - **Deadline.** A step must end within a period of
//!   [`Config::deadline_base`] plus [`Config::deadline_factor`] times the
//!   compute time the hop's advertised throughput predicts
//!   ([`Config::period`]). When it passes, the client probes the hop (an
//!   `Info` request): no answer within [`Config::probe_timeout`] means
//!   lost; an answer means the hop is alive, and the deadline moves one
//!   period on. After [`Config::deadlines`] periods without the step's end
//!   the client stops waiting: [`Action::NoProgress`] (the request fails;
//!   the hop is alive, so another holder is not tried).
//! - Non-final reports (saves, relayed values) do not move the deadline:
//!   it covers the whole step.
//!
//! One detector watches one step of one hop; the step's end
//! ([`Event::Report`] with `last`) or a decision ends it, and it ignores
//! everything after. Timers are asked for with [`Action::WakeAt`] and are
//! all to be delivered (the same time may be asked for twice); a
//! [`Event::Woke`] that comes before any timer is due is ignored, so stale
//! ones do no harm.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use nnmesh_control::detect::*;
//!
//! let cfg = Config::default();
//! let mut d = Detector::new(cfg.clone());
//! let t0 = Instant::now();
//! // A decode step of one token on a stage of 100 tokens/s: 10 s + 20 × 10 ms.
//! let actions = d.on_event(t0, Event::Sent { tokens: 1.0, throughput: 100.0 });
//! let deadline = t0 + Duration::from_millis(10_200);
//! assert_eq!(actions, [Action::WakeAt(deadline)]);
//! // The connection drops and the peer cannot be redialled: lost.
//! let t1 = t0 + Duration::from_secs(1);
//! assert_eq!(
//!     d.on_event(t1, Event::Disconnected),
//!     [Action::Redial, Action::WakeAt(t1 + cfg.redial_timeout)],
//! );
//! assert_eq!(d.on_event(t1, Event::RedialFailed), [Action::Lost(Lost::Disconnected)]);
//! assert!(d.is_done());
//! ```

use std::{
    fmt,
    time::{Duration, Instant},
};

/// The detector's limits (the mesh client's defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The fixed part of a step's deadline.
    pub deadline_base: Duration,
    /// The deadline allows this many times the compute time the hop's
    /// advertised throughput predicts.
    pub deadline_factor: f64,
    /// The longest compute part of a deadline.
    pub max_compute: Duration,
    /// Deadline periods a step may take while the hop answers probes.
    pub deadlines: u32,
    /// How long redialling a disconnected hop may take.
    pub redial_timeout: Duration,
    /// How long the hop may take to answer a probe.
    pub probe_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            deadline_base: Duration::from_secs(10),
            deadline_factor: 20.0,
            max_compute: Duration::from_secs(3600),
            deadlines: 3,
            redial_timeout: Duration::from_secs(5),
            probe_timeout: Duration::from_secs(3),
        }
    }
}

impl Config {
    /// A step's deadline period: [`deadline_base`](Self::deadline_base) plus
    /// [`deadline_factor`](Self::deadline_factor) times the time `tokens`
    /// take at `throughput` tokens/s (at most
    /// [`max_compute`](Self::max_compute); a throughput below 1e-3 counts
    /// as 1e-3, a non-finite or negative token count as 0).
    pub fn period(&self, tokens: f64, throughput: f32) -> Duration {
        let tokens = if tokens.is_finite() {
            tokens.max(0.0)
        } else {
            0.0
        };
        let tps = f64::from(throughput).max(1e-3);
        let secs = (tokens / tps * self.deadline_factor).min(self.max_compute.as_secs_f64());
        self.deadline_base + Duration::from_secs_f64(secs.max(0.0))
    }
}

/// What the client saw of the hop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Event {
    /// The step was sent to the hop: start watching. `tokens` is the work it
    /// asks for (the step's tokens, plus those it replays first) and
    /// `throughput` the hop's advertised tokens/s.
    Sent {
        /// Tokens the step computes.
        tokens: f64,
        /// The hop's advertised throughput, tokens/s.
        throughput: f32,
    },
    /// A report of the step arrived; `last` when it ends the step (the
    /// hop's output, or the step done).
    Report {
        /// Whether it ends the step.
        last: bool,
    },
    /// The connection to the hop was lost.
    Disconnected,
    /// The hop stopped answering pings (the transport closed the
    /// connection).
    Unresponsive,
    /// The redial asked for by [`Action::Redial`] connected.
    Redialed,
    /// The redial asked for by [`Action::Redial`] failed.
    RedialFailed,
    /// The hop answered the probe asked for by [`Action::Probe`].
    ProbeAnswered,
    /// The probe asked for by [`Action::Probe`] failed (an error, not an
    /// answer).
    ProbeFailed,
    /// A time asked for by [`Action::WakeAt`] came.
    Woke,
}

/// What to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send [`Event::Woke`] at this time.
    WakeAt(Instant),
    /// Dial the hop again; send [`Event::Redialed`] or
    /// [`Event::RedialFailed`] (or nothing, and the timer decides).
    Redial,
    /// Ask the hop for its `Info`; send [`Event::ProbeAnswered`] or
    /// [`Event::ProbeFailed`] (or nothing, and the timer decides).
    Probe,
    /// The hop is gone: fail over (the hop may have run the step).
    Lost(Lost),
    /// The hop is alive but the step did not end within this long: the
    /// request fails.
    NoProgress {
        /// How long the client waited.
        waited: Duration,
    },
}

/// Why a hop was declared lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lost {
    /// Its connection was lost and it could not be reached again.
    Disconnected,
    /// It stopped answering pings and could not be reached again.
    Unresponsive,
    /// The step passed its deadline and the hop did not answer a probe.
    NoAnswer {
        /// The deadline period that passed.
        period: Duration,
    },
}

impl fmt::Display for Lost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Lost::Disconnected => {
                f.write_str("its connection was lost and it cannot be reached again")
            }
            Lost::Unresponsive => f.write_str("it stopped answering pings"),
            Lost::NoAnswer { period } => write!(
                f,
                "no progress within {} s and no answer to a probe",
                period.as_secs()
            ),
        }
    }
}

/// What the detector waits for.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// For [`Event::Sent`].
    Idle,
    /// For the step's end, or the deadline.
    Watching,
    /// For the redial's outcome, until `until`.
    Redialing { until: Instant, cause: Lost },
    /// For the probe's answer, until `until`; `then` is a connection event
    /// that came meanwhile, handled once the probe is answered.
    Probing { until: Instant, then: Option<Lost> },
    /// Ended.
    Done,
}

/// Watches one hop's step (see the [module docs](self)).
#[derive(Debug, Clone)]
pub struct Detector {
    cfg: Config,
    phase: Phase,
    period: Duration,
    deadline: Option<Instant>,
    deadlines: u32,
}

impl Detector {
    /// A detector waiting for [`Event::Sent`].
    pub fn new(cfg: Config) -> Detector {
        Detector {
            cfg,
            phase: Phase::Idle,
            period: Duration::ZERO,
            deadline: None,
            deadlines: 0,
        }
    }

    /// Whether the watch has ended (the step ended, or a decision was made).
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// The step's current deadline, once sent and until the watch ends.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline.filter(|_| !self.is_done())
    }

    /// Takes an event; returns what to do. Events the detector is not
    /// waiting for are ignored.
    pub fn on_event(&mut self, now: Instant, event: Event) -> Vec<Action> {
        match (self.phase, event) {
            (Phase::Done, _) => Vec::new(),
            (_, Event::Report { last: true }) => {
                self.phase = Phase::Done;
                Vec::new()
            }
            (Phase::Idle, Event::Sent { tokens, throughput }) => {
                self.period = self.cfg.period(tokens, throughput);
                let deadline = now + self.period;
                self.deadline = Some(deadline);
                self.phase = Phase::Watching;
                vec![Action::WakeAt(deadline)]
            }
            (Phase::Watching, Event::Disconnected | Event::Unresponsive) => {
                self.redial(now, cause_of(event))
            }
            (Phase::Watching, Event::Woke) if self.deadline.is_some_and(|d| now >= d) => {
                self.watch(now)
            }
            (Phase::Redialing { cause, .. }, Event::RedialFailed) => self.lost(cause),
            (Phase::Redialing { until, cause }, Event::Woke) if now >= until => self.lost(cause),
            (Phase::Redialing { .. }, Event::Redialed) => {
                self.phase = Phase::Watching;
                self.watch(now)
            }
            (Phase::Probing { until, .. }, Event::Disconnected | Event::Unresponsive) => {
                self.phase = Phase::Probing {
                    until,
                    then: Some(cause_of(event)),
                };
                Vec::new()
            }
            (Phase::Probing { .. }, Event::ProbeFailed) => self.lost(Lost::NoAnswer {
                period: self.period,
            }),
            (Phase::Probing { until, .. }, Event::Woke) if now >= until => {
                self.lost(Lost::NoAnswer {
                    period: self.period,
                })
            }
            (Phase::Probing { then, .. }, Event::ProbeAnswered) => {
                self.deadlines += 1;
                if self.deadlines >= self.cfg.deadlines {
                    self.phase = Phase::Done;
                    return vec![Action::NoProgress {
                        waited: self.period * self.deadlines,
                    }];
                }
                self.deadline = self.deadline.map(|d| d + self.period);
                match then {
                    Some(cause) => self.redial(now, cause),
                    None => {
                        self.phase = Phase::Watching;
                        self.watch(now)
                    }
                }
            }
            _ => Vec::new(),
        }
    }

    /// In [`Phase::Watching`]: probe if the deadline has passed, else wait
    /// for it.
    fn watch(&mut self, now: Instant) -> Vec<Action> {
        let deadline = self.deadline.expect("a watched step has a deadline");
        if now < deadline {
            return vec![Action::WakeAt(deadline)];
        }
        let until = now + self.cfg.probe_timeout;
        self.phase = Phase::Probing { until, then: None };
        vec![Action::Probe, Action::WakeAt(until)]
    }

    fn redial(&mut self, now: Instant, cause: Lost) -> Vec<Action> {
        let until = now + self.cfg.redial_timeout;
        self.phase = Phase::Redialing { until, cause };
        vec![Action::Redial, Action::WakeAt(until)]
    }

    fn lost(&mut self, cause: Lost) -> Vec<Action> {
        self.phase = Phase::Done;
        vec![Action::Lost(cause)]
    }
}

fn cause_of(event: Event) -> Lost {
    match event {
        Event::Unresponsive => Lost::Unresponsive,
        _ => Lost::Disconnected,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn sent(d: &mut Detector, now: Instant) -> Instant {
        match d.on_event(
            now,
            Event::Sent {
                tokens: 1.0,
                throughput: 100.0,
            },
        )[..]
        {
            [Action::WakeAt(at)] => at,
            ref other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_period_follows_the_predicted_compute() {
        let cfg = Config::default();
        assert_eq!(cfg.period(0.0, 100.0), 10 * S);
        // 100 tokens at 50 tokens/s: 2 s of compute, ×20.
        assert_eq!(cfg.period(100.0, 50.0), 50 * S);
        // Capped, and robust to nonsense.
        assert_eq!(cfg.period(1e12, 1.0), 3610 * S);
        assert_eq!(cfg.period(f64::NAN, 0.0), 10 * S);
        assert_eq!(cfg.period(-5.0, 100.0), 10 * S);
        assert_eq!(cfg.period(1.0, 0.0), 3610 * S);
    }

    #[test]
    fn a_step_that_ends_ends_the_watch() {
        let mut d = Detector::new(Config::default());
        let t0 = Instant::now();
        let deadline = sent(&mut d, t0);
        assert_eq!(d.deadline(), Some(deadline));
        assert!(d.on_event(t0, Event::Report { last: false }).is_empty());
        assert!(!d.is_done());
        assert!(d.on_event(t0 + S, Event::Report { last: true }).is_empty());
        assert!(d.is_done());
        assert_eq!(d.deadline(), None);
        // Everything after is ignored, the deadline's timer included.
        assert!(d.on_event(deadline, Event::Woke).is_empty());
        assert!(d.on_event(deadline, Event::Disconnected).is_empty());
    }

    #[test]
    fn a_hop_that_is_redialled_is_watched_on() {
        let cfg = Config::default();
        let mut d = Detector::new(cfg.clone());
        let t0 = Instant::now();
        let deadline = sent(&mut d, t0);
        let t1 = t0 + S;
        assert_eq!(
            d.on_event(t1, Event::Unresponsive),
            [Action::Redial, Action::WakeAt(t1 + cfg.redial_timeout)]
        );
        // A second connection event while redialling changes nothing.
        assert!(d.on_event(t1, Event::Disconnected).is_empty());
        assert_eq!(
            d.on_event(t1 + S, Event::Redialed),
            [Action::WakeAt(deadline)]
        );
        // The redial's timer, now stale, is ignored.
        assert!(d.on_event(t1 + cfg.redial_timeout, Event::Woke).is_empty());
        assert!(!d.is_done());
    }

    #[test]
    fn an_unreachable_hop_is_lost_when_the_redial_times_out() {
        let cfg = Config::default();
        let mut d = Detector::new(cfg.clone());
        let t0 = Instant::now();
        sent(&mut d, t0);
        d.on_event(t0, Event::Unresponsive);
        // A wake before the redial's time is not its timeout.
        assert!(d.on_event(t0 + S, Event::Woke).is_empty());
        assert_eq!(
            d.on_event(t0 + cfg.redial_timeout, Event::Woke),
            [Action::Lost(Lost::Unresponsive)]
        );
        assert!(d.is_done());
        assert_eq!(Lost::Unresponsive.to_string(), "it stopped answering pings");
    }

    #[test]
    fn the_deadline_probes_and_a_silent_hop_is_lost() {
        let cfg = Config::default();
        let mut d = Detector::new(cfg.clone());
        let t0 = Instant::now();
        let deadline = sent(&mut d, t0);
        // An early wake is not the deadline's.
        assert!(d.on_event(t0 + S, Event::Woke).is_empty());
        assert_eq!(
            d.on_event(deadline, Event::Woke),
            [Action::Probe, Action::WakeAt(deadline + cfg.probe_timeout)]
        );
        let lost = d.on_event(deadline + cfg.probe_timeout, Event::Woke);
        let period = cfg.period(1.0, 100.0);
        assert_eq!(lost, [Action::Lost(Lost::NoAnswer { period })]);
        assert_eq!(
            Lost::NoAnswer { period }.to_string(),
            "no progress within 10 s and no answer to a probe"
        );
        // A failed probe is as good as a silent one.
        let mut d = Detector::new(cfg.clone());
        let deadline = sent(&mut d, t0);
        d.on_event(deadline, Event::Woke);
        assert_eq!(
            d.on_event(deadline, Event::ProbeFailed),
            [Action::Lost(Lost::NoAnswer { period })]
        );
    }

    #[test]
    fn a_live_hop_without_progress_fails_the_request_after_three_periods() {
        let cfg = Config::default();
        let mut d = Detector::new(cfg.clone());
        let t0 = Instant::now();
        let period = cfg.period(1.0, 100.0);
        let mut deadline = sent(&mut d, t0);
        for k in 1..=3u32 {
            assert_eq!(deadline, t0 + period * k);
            assert_eq!(
                d.on_event(deadline, Event::Woke),
                [Action::Probe, Action::WakeAt(deadline + cfg.probe_timeout)]
            );
            let answered = d.on_event(deadline + S, Event::ProbeAnswered);
            if k < 3 {
                assert_eq!(answered, [Action::WakeAt(deadline + period)]);
                deadline += period;
            } else {
                assert_eq!(answered, [Action::NoProgress { waited: period * 3 }]);
            }
        }
        assert!(d.is_done());
    }

    #[test]
    fn a_disconnection_during_a_probe_is_checked_after_it() {
        let cfg = Config::default();
        let mut d = Detector::new(cfg.clone());
        let t0 = Instant::now();
        let deadline = sent(&mut d, t0);
        d.on_event(deadline, Event::Woke);
        assert!(d.on_event(deadline, Event::Disconnected).is_empty());
        let t = deadline + S;
        assert_eq!(
            d.on_event(t, Event::ProbeAnswered),
            [Action::Redial, Action::WakeAt(t + cfg.redial_timeout)]
        );
        assert_eq!(
            d.on_event(t, Event::RedialFailed),
            [Action::Lost(Lost::Disconnected)]
        );
    }

    #[test]
    fn nothing_happens_before_the_step_is_sent() {
        let mut d = Detector::new(Config::default());
        let t0 = Instant::now();
        for e in [
            Event::Woke,
            Event::Disconnected,
            Event::ProbeAnswered,
            Event::RedialFailed,
        ] {
            assert!(d.on_event(t0, e).is_empty());
        }
        assert_eq!(d.deadline(), None);
    }

    fn events() -> impl Strategy<Value = Event> {
        prop_oneof![
            Just(Event::Report { last: false }),
            Just(Event::Report { last: true }),
            Just(Event::Disconnected),
            Just(Event::Unresponsive),
            Just(Event::Redialed),
            Just(Event::RedialFailed),
            Just(Event::ProbeAnswered),
            Just(Event::ProbeFailed),
            Just(Event::Woke),
        ]
    }

    proptest! {
        /// Whatever happens, the detector decides at most once, asks for no
        /// timer in the past, and never declares lost a hop that answered
        /// (only a failed redial, a failed or unanswered probe, or a timer
        /// that ran out does).
        #[test]
        fn decides_once_and_only_on_evidence(
            steps in proptest::collection::vec((events(), 0u64..20_000), 1..64),
        ) {
            let cfg = Config::default();
            let mut d = Detector::new(cfg.clone());
            let mut now = Instant::now();
            d.on_event(now, Event::Sent { tokens: 1.0, throughput: 100.0 });
            let mut decisions = 0;
            for (event, ms) in steps {
                now += Duration::from_millis(ms);
                let was_done = d.is_done();
                let actions = d.on_event(now, event);
                for a in &actions {
                    match a {
                        Action::WakeAt(at) => prop_assert!(*at >= now),
                        Action::Lost(_) => {
                            decisions += 1;
                            prop_assert!(matches!(
                                event,
                                Event::RedialFailed | Event::ProbeFailed | Event::Woke
                            ), "lost on {:?}", event);
                        }
                        Action::NoProgress { waited } => {
                            decisions += 1;
                            prop_assert_eq!(event, Event::ProbeAnswered);
                            prop_assert!(*waited >= cfg.deadline_base * cfg.deadlines);
                        }
                        Action::Redial | Action::Probe => {}
                    }
                }
                if was_done {
                    prop_assert!(actions.is_empty());
                }
            }
            prop_assert!(decisions <= 1);
        }
    }
}
