//! The client's fail-over decisions for one request, as a sans-IO state
//! machine: [`Failover::on_event`] takes what happened (a hop failed,
//! candidates were found, a wait ended) and returns what to do (discover,
//! replace the failed layers by these legs, wait, give up).
//!
//! The rules:
//! - A failure that may be transient — the hop is gone, overloaded, no
//!   longer serves those layers, or lost the session — replaces the hop's
//!   layers; one that would repeat anywhere (the graph failed validation or
//!   at run time, the client is not allowed) gives up at once.
//! - A failed peer is left out of replacements for [`Config::blacklist`],
//!   unless it is the only holder left and its failure was transient (it
//!   was busy, or lost the session): then it is asked again.
//! - When no replacement covers the layers, the client waits with
//!   exponential backoff (jittered) and looks again, up to
//!   [`Config::max_attempts`] times, then gives up naming the layers.
//! - A request survives at most [`Config::max_failures`] failures in a row
//!   without progress (a step going through on a repaired route resets the
//!   count): a long generation under a steady failure rate keeps going, a
//!   request that fails everywhere stops.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use nnmesh_control::{failover::*, route::Candidate};
//! use nnmesh_protocol::{ErrorKind, PeerId, Span};
//!
//! let id = |s: u8| libp2p_identity::Keypair::ed25519_from_bytes([s; 32]).unwrap().public().to_peer_id();
//! let mut f = Failover::new(Config::default(), 7);
//! let now = Instant::now();
//! let (dead, span) = (id(1), Span::new(10, 20));
//! let actions = f.on_event(now, Event::HopFailed { peer: dead, span, failure: Failure::Lost });
//! assert_eq!(actions, [Action::Discover { span }]);
//! let cands = [
//!     Candidate { peer: dead, span, throughput: 1e3, rtt_ms: 1.0, load: 0.0 },
//!     Candidate { peer: id(2), span: Span::new(5, 25), throughput: 1e3, rtt_ms: 1.0, load: 0.0 },
//! ];
//! match &f.on_event(now, Event::Candidates { span, cands: &cands })[..] {
//!     [Action::Replace { legs, .. }] => assert_eq!(legs[0].candidate, 1), // never the dead peer
//!     other => panic!("{other:?}"),
//! }
//! ```

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use nnmesh_protocol::{ErrorKind, PeerId, Span};

use crate::route::{Candidate, Leg, find_route};

/// The limits of fail-over.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Looks for a replacement of one set of layers before giving up.
    pub max_attempts: u32,
    /// Failures in a row, without a step going through on a repaired
    /// route in between, that a request survives.
    pub max_failures: u32,
    /// The first wait when no replacement is found; doubled each time.
    pub backoff: Duration,
    /// The longest wait.
    pub max_backoff: Duration,
    /// How long a failed peer is left out of replacements.
    pub blacklist: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_attempts: 6,
            max_failures: 16,
            backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(4),
            blacklist: Duration::from_secs(60),
        }
    }
}

/// How a hop failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The hop is gone: its connection was lost and it cannot be reached,
    /// it stopped answering pings, or it made no progress and did not answer
    /// a probe. It may have run the step.
    Lost,
    /// The hop refused the step (nothing ran), with this error.
    Refused(ErrorKind),
    /// The hop reported that the step failed while running, with this error.
    Failed(ErrorKind),
}

impl Failure {
    /// Whether another holder of the layers may succeed where this one failed:
    /// a lost holder, or a refusal that is the holder's own (full, not
    /// serving the layers any more, its allow-list). Errors the graph or
    /// the input causes would repeat anywhere.
    pub fn is_retriable(self) -> bool {
        match self {
            Failure::Lost => true,
            Failure::Refused(k) | Failure::Failed(k) => matches!(
                k,
                ErrorKind::Overloaded
                    | ErrorKind::NotServed
                    | ErrorKind::UnknownRequest
                    | ErrorKind::Forbidden
            ),
        }
    }

    /// Whether the same peer may succeed if asked again soon: it is alive
    /// and was only busy, lost the session (a replay rebuilds it), or moved
    /// to other layers since the record the route came from (its new
    /// record may make it the only holder of the layers being replaced).
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            Failure::Refused(
                ErrorKind::Overloaded | ErrorKind::UnknownRequest | ErrorKind::NotServed
            ) | Failure::Failed(
                ErrorKind::Overloaded | ErrorKind::UnknownRequest | ErrorKind::NotServed
            )
        )
    }
}

/// What happened.
#[derive(Debug)]
pub enum Event<'a> {
    /// A hop of the route failed.
    HopFailed {
        /// Its peer.
        peer: PeerId,
        /// The layers it ran.
        span: Span,
        /// How it failed.
        failure: Failure,
    },
    /// The mesh's holders, found after [`Action::Discover`].
    Candidates {
        /// The layers to replace.
        span: Span,
        /// Every holder found (the failed and blacklisted ones included:
        /// they are left out here).
        cands: &'a [Candidate],
    },
    /// A wait asked for by [`Action::WaitUntil`] ended.
    Woke {
        /// The layers to replace.
        span: Span,
    },
    /// A step went through on the repaired route.
    Recovered,
}

/// What to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Find the mesh's current holders, then send [`Event::Candidates`].
    Discover {
        /// The layers to replace.
        span: Span,
    },
    /// Replace the failed hop by these legs (over the candidates given).
    Replace {
        /// The layers replaced.
        span: Span,
        /// The replacement, in layer order.
        legs: Vec<Leg>,
    },
    /// Wait until `at`, then send [`Event::Woke`].
    WaitUntil {
        /// When to look again.
        at: Instant,
        /// The layers to replace.
        span: Span,
    },
    /// The request fails.
    GiveUp(GiveUp),
}

/// Why fail-over gave up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GiveUp {
    /// The failure would happen on any holder.
    #[error("{peer} failed with {kind:?}, which another holder would repeat")]
    NotRetriable {
        /// The peer.
        peer: PeerId,
        /// Its error.
        kind: ErrorKind,
    },
    /// No live holder of the layers was found after every attempt.
    #[error("no live holder of layers {span} after {attempts} attempts")]
    NoHolder {
        /// The layers.
        span: Span,
        /// How many times the mesh was searched.
        attempts: u32,
    },
    /// Too many failures in a row.
    #[error("{failures} failures in a row without progress; giving up")]
    TooManyFailures {
        /// The failures in a row.
        failures: u32,
    },
}

/// The fail-over state of one request.
#[derive(Debug)]
pub struct Failover {
    cfg: Config,
    /// Failures in all.
    failures: u32,
    /// Failures since the last step that went through on a repaired route.
    in_a_row: u32,
    /// Searches for the layers being replaced.
    attempts: u32,
    /// Failed peers: until when they are left out, and whether the failure
    /// was transient ([`Failure::is_transient`]).
    blacklist: HashMap<PeerId, (Instant, bool)>,
    rng: u64,
}

impl Failover {
    /// A request's fail-over, with `seed` for the backoff jitter.
    pub fn new(cfg: Config, seed: u64) -> Failover {
        Failover {
            cfg,
            failures: 0,
            in_a_row: 0,
            attempts: 0,
            blacklist: HashMap::new(),
            rng: seed | 1,
        }
    }

    /// Failures so far, in all.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Whether `peer` is left out of replacements at `now`.
    pub fn is_blacklisted(&self, now: Instant, peer: &PeerId) -> bool {
        self.blacklist
            .get(peer)
            .is_some_and(|&(until, _)| now < until)
    }

    /// Takes an event; returns what to do.
    pub fn on_event(&mut self, now: Instant, event: Event<'_>) -> Vec<Action> {
        match event {
            Event::HopFailed {
                peer,
                span,
                failure,
            } => {
                self.failures += 1;
                self.in_a_row += 1;
                self.blacklist
                    .insert(peer, (now + self.cfg.blacklist, failure.is_transient()));
                if !failure.is_retriable() {
                    let (Failure::Refused(kind) | Failure::Failed(kind)) = failure else {
                        unreachable!("a lost hop is retriable")
                    };
                    return vec![Action::GiveUp(GiveUp::NotRetriable { peer, kind })];
                }
                if self.in_a_row > self.cfg.max_failures {
                    return vec![Action::GiveUp(GiveUp::TooManyFailures {
                        failures: self.in_a_row,
                    })];
                }
                self.attempts = 0;
                vec![Action::Discover { span }]
            }
            Event::Candidates { span, cands } => {
                self.attempts += 1;
                let banned = |transient_too: bool| -> Vec<PeerId> {
                    self.blacklist
                        .iter()
                        .filter(|(_, (until, transient))| {
                            now < *until && (transient_too || !transient)
                        })
                        .map(|(p, _)| *p)
                        .collect()
                };
                // Other holders first; a peer that was only busy or lost the
                // session is asked again when no other holder is left.
                let route = find_route(cands, span, &banned(true))
                    .or_else(|| find_route(cands, span, &banned(false)));
                match route {
                    Some(legs) if !legs.is_empty() => vec![Action::Replace { span, legs }],
                    _ if self.attempts >= self.cfg.max_attempts => {
                        vec![Action::GiveUp(GiveUp::NoHolder {
                            span,
                            attempts: self.attempts,
                        })]
                    }
                    _ => vec![Action::WaitUntil {
                        at: now + self.backoff(),
                        span,
                    }],
                }
            }
            Event::Woke { span } => vec![Action::Discover { span }],
            Event::Recovered => {
                self.attempts = 0;
                self.in_a_row = 0;
                Vec::new()
            }
        }
    }

    /// The next wait: `backoff · 2^(attempts-1)`, at most `max_backoff`,
    /// times a jitter in [0.5, 1.5) so clients do not retry in lockstep.
    fn backoff(&mut self) -> Duration {
        let exp = self.attempts.saturating_sub(1).min(16);
        let base = self
            .cfg
            .backoff
            .saturating_mul(1 << exp)
            .min(self.cfg.max_backoff);
        // xorshift64: seeded by the caller, so runs are reproducible.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let jitter = 0.5 + (self.rng >> 11) as f64 / (1u64 << 53) as f64;
        base.mul_f64(jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(seed: u8) -> PeerId {
        libp2p_identity::Keypair::ed25519_from_bytes([seed; 32])
            .expect("32 bytes")
            .public()
            .to_peer_id()
    }

    fn cand(p: u8, start: u32, end: u32) -> Candidate {
        Candidate {
            peer: peer(p),
            span: Span::new(start, end),
            throughput: 1000.0,
            rtt_ms: 1.0,
            load: 0.0,
        }
    }

    const SPAN: Span = Span::new(10, 20);

    fn fail(f: &mut Failover, now: Instant, p: u8, failure: Failure) -> Vec<Action> {
        f.on_event(
            now,
            Event::HopFailed {
                peer: peer(p),
                span: SPAN,
                failure,
            },
        )
    }

    #[test]
    fn a_lost_hop_is_replaced_by_another_holder_never_itself() {
        let mut f = Failover::new(Config::default(), 1);
        let now = Instant::now();
        assert_eq!(
            fail(&mut f, now, 1, Failure::Lost),
            [Action::Discover { span: SPAN }]
        );
        let cands = [cand(1, 10, 20), cand(2, 0, 30)];
        let actions = f.on_event(
            now,
            Event::Candidates {
                span: SPAN,
                cands: &cands,
            },
        );
        assert_eq!(
            actions,
            [Action::Replace {
                span: SPAN,
                legs: vec![Leg {
                    candidate: 1,
                    span: SPAN
                }]
            }]
        );
        // Several replacement legs when no single holder covers it.
        let cands = [cand(1, 10, 20), cand(3, 10, 14), cand(4, 14, 20)];
        match &f.on_event(
            now,
            Event::Candidates {
                span: SPAN,
                cands: &cands,
            },
        )[..]
        {
            [Action::Replace { legs, .. }] => {
                assert_eq!(legs.iter().map(|l| l.candidate).collect::<Vec<_>>(), [1, 2]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_busy_holder_is_asked_again_only_when_no_other_is_left() {
        let mut f = Failover::new(Config::default(), 3);
        let now = Instant::now();
        let replace_by = |f: &mut Failover, cands: &[Candidate]| -> Option<usize> {
            match &f.on_event(now, Event::Candidates { span: SPAN, cands })[..] {
                [Action::Replace { legs, .. }] => Some(legs[0].candidate),
                _ => None,
            }
        };
        // Busy, with another holder: the other.
        fail(&mut f, now, 1, Failure::Refused(ErrorKind::Overloaded));
        assert_eq!(
            replace_by(&mut f, &[cand(1, 10, 20), cand(2, 10, 20)]),
            Some(1)
        );
        // Alone: asked again (it is alive; a replay rebuilds a lost session).
        assert_eq!(replace_by(&mut f, &[cand(1, 10, 20)]), Some(0));
        fail(&mut f, now, 2, Failure::Failed(ErrorKind::UnknownRequest));
        assert_eq!(replace_by(&mut f, &[cand(2, 10, 20)]), Some(0));
        // A peer that moved away from the failed layers (a stale record)
        // may be the one holder of the next layers replaced.
        fail(&mut f, now, 5, Failure::Refused(ErrorKind::NotServed));
        assert_eq!(replace_by(&mut f, &[cand(5, 10, 20)]), Some(0));
        // A lost or forbidding peer is not, even alone.
        fail(&mut f, now, 3, Failure::Lost);
        assert_eq!(replace_by(&mut f, &[cand(3, 10, 20)]), None);
        fail(&mut f, now, 4, Failure::Refused(ErrorKind::Forbidden));
        assert_eq!(replace_by(&mut f, &[cand(4, 10, 20)]), None);
    }

    #[test]
    fn no_holder_waits_with_growing_backoff_then_gives_up() {
        let cfg = Config {
            max_attempts: 4,
            ..Config::default()
        };
        let mut f = Failover::new(cfg, 9);
        let mut now = Instant::now();
        fail(&mut f, now, 1, Failure::Lost);
        let only_dead = [cand(1, 10, 20)];
        let mut waits = Vec::new();
        for attempt in 1..=4 {
            let actions = f.on_event(
                now,
                Event::Candidates {
                    span: SPAN,
                    cands: &only_dead,
                },
            );
            match &actions[..] {
                [Action::WaitUntil { at, span }] => {
                    assert_eq!(*span, SPAN);
                    waits.push(*at - now);
                    now = *at;
                    assert_eq!(
                        f.on_event(now, Event::Woke { span: SPAN }),
                        [Action::Discover { span: SPAN }]
                    );
                }
                [Action::GiveUp(GiveUp::NoHolder { span, attempts })] => {
                    assert_eq!((attempt, *span, *attempts), (4, SPAN, 4));
                }
                other => panic!("attempt {attempt}: {other:?}"),
            }
        }
        assert_eq!(waits.len(), 3);
        // Exponential (the jitter is within [0.5, 1.5) of the base).
        assert!(waits[0] < Duration::from_millis(375), "{waits:?}");
        assert!(waits[2] >= Duration::from_millis(500), "{waits:?}");
        let msg = GiveUp::NoHolder {
            span: SPAN,
            attempts: 4,
        }
        .to_string();
        assert!(msg.contains("10..20"), "{msg}");
    }

    #[test]
    fn failures_that_would_repeat_give_up_at_once() {
        let mut f = Failover::new(Config::default(), 1);
        let now = Instant::now();
        for kind in [
            ErrorKind::Validation,
            ErrorKind::Internal,
            ErrorKind::Malformed,
            ErrorKind::TooLarge,
        ] {
            assert_eq!(
                fail(&mut f, now, 1, Failure::Failed(kind)),
                [Action::GiveUp(GiveUp::NotRetriable {
                    peer: peer(1),
                    kind
                })]
            );
        }
        for kind in [
            ErrorKind::Overloaded,
            ErrorKind::NotServed,
            ErrorKind::UnknownRequest,
            ErrorKind::Forbidden,
        ] {
            assert_eq!(
                fail(&mut f, now, 2, Failure::Refused(kind)),
                [Action::Discover { span: SPAN }]
            );
        }
    }

    #[test]
    fn blacklisted_peers_return_after_a_while_and_failures_are_bounded() {
        let cfg = Config {
            max_failures: 2,
            ..Config::default()
        };
        let mut f = Failover::new(cfg.clone(), 1);
        let now = Instant::now();
        fail(&mut f, now, 1, Failure::Lost);
        assert!(f.is_blacklisted(now, &peer(1)));
        assert!(!f.is_blacklisted(now + cfg.blacklist, &peer(1)));
        // Once the blacklist expires the peer is a candidate again.
        let later = now + cfg.blacklist;
        let cands = [cand(1, 10, 20)];
        assert!(matches!(
            &f.on_event(
                later,
                Event::Candidates {
                    span: SPAN,
                    cands: &cands
                }
            )[..],
            [Action::Replace { .. }]
        ));
        fail(&mut f, later, 2, Failure::Lost);
        // Progress resets the count: a long request under a steady failure
        // rate goes on.
        f.on_event(later, Event::Recovered);
        fail(&mut f, later, 4, Failure::Lost);
        fail(&mut f, later, 5, Failure::Lost);
        assert_eq!(
            fail(&mut f, later, 6, Failure::Lost),
            [Action::GiveUp(GiveUp::TooManyFailures { failures: 3 })]
        );
        assert_eq!(f.failures(), 5);
    }
}
