//! Clients: a session discovers the holders, picks a route with
//! `find_route`, and drives each step hop by hop as the mesh client does
//! (star: every hop gets its input from the client and answers it). Each
//! hop's step is watched by the control crate's [`Detector`]; a failed hop
//! goes to the session's [`Failover`], whose replacement replays the hop's
//! history (or, with recovery `restart`, the session starts over).

use std::time::Instant as WallInstant;

use nnmesh_control::{
    detect::{self, Detector},
    failover::{self, Failover, Failure, GiveUp},
    route::{Candidate, find_route},
};
use nnmesh_protocol::Span;

use super::{Answer, Cause, Ev, World, node::Job};
use crate::{
    engine::Time,
    net::{Link, Place, send},
    rng::mix,
    scenario::Recovery,
};

/// A closed-workload client: it runs sessions back to back and keeps its
/// last discovery for a while.
#[derive(Debug)]
pub(crate) struct Client {
    place: Place,
    link: Option<Link>,
    /// The last discovery: when, candidates, their nodes.
    cache: Option<(Time, Vec<Candidate>, Vec<u32>)>,
    dead: Vec<(u32, Time)>,
}

impl Client {
    pub(crate) fn new(place: Place) -> Client {
        Client {
            place,
            link: None,
            cache: None,
            dead: Vec::new(),
        }
    }
}

/// A hop of a session's route.
#[derive(Debug, Clone)]
struct Hop {
    node: u32,
    span: Span,
    /// Tokens/s its record announced.
    tp: f32,
    /// History entries (steps) this holder has run.
    ran: u32,
    /// The node's serving generation when the session was opened there.
    opened: Option<u32>,
}

/// What a session waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Its first discovery.
    Routing,
    /// A hop's answer.
    Running,
    /// Fail-over (discovery or backoff).
    FailingOver,
    /// Nothing: it ended.
    Done,
}

/// A recovery under way.
#[derive(Debug, Clone, Copy)]
struct Recovering {
    failed_at: Time,
    cause: Cause,
    /// The route's hop whose answer ends it.
    until_hop: usize,
}

/// One generation session.
#[derive(Debug)]
pub(crate) struct Session {
    client: Option<u32>,
    pub(crate) place: Place,
    pub(crate) link: Link,
    arrived: Time,
    pub(crate) counted: bool,
    prompt: u32,
    steps: u32,
    rows: u32,
    step: u32,
    hop: usize,
    step_start: Time,
    step_failed_over: bool,
    sent_at: Time,
    route: Vec<Hop>,
    failover: Failover,
    detector: Detector,
    pub(crate) token: u32,
    state: State,
    /// Candidates' nodes of the last discovery handed to `failover`.
    found: Vec<u32>,
    /// The span being replaced.
    fo_span: Span,
    /// Peers found dead: (node, until).
    pub(crate) dead: Vec<(u32, Time)>,
    /// When a dead node failed it, and how (for the recovery latency).
    suspect: Option<(Time, Cause)>,
    recovering: Option<Recovering>,
    route_tries: u32,
    failovers: u32,
    /// The candidates found at the start, kept for fail-over
    /// (`reuse_candidates`): node, span, per-layer throughput, RTT, load.
    warm: Vec<(u32, Span, f32, f32, f32)>,
    /// Discoveries since the last failure.
    fo_discoveries: u32,
    /// Whether the pending fail-over discovery is answered from `warm`.
    fo_warm: bool,
}

impl Session {
    pub(crate) fn is_done(&self) -> bool {
        self.state == State::Done
    }
}

impl World {
    /// A new session (of closed client `client`, or a new open client).
    pub(super) fn start_session(&mut self, client: Option<u32>) {
        let now = self.now();
        if now > self.end {
            return;
        }
        let s = self.sessions.len() as u32;
        let w = self.sc.workload.clone();
        let (prompt, steps, rows) = (
            self.rng_work
                .range_u32(w.prompt_tokens[0], w.prompt_tokens[1]),
            self.rng_work.range_u32(w.new_tokens[0], w.new_tokens[1]),
            self.rng_work.range_u32(w.rows[0], w.rows[1]),
        );
        let (place, link, dead) = match client {
            Some(c) => {
                let cl = &mut self.clients[c as usize];
                let link = cl
                    .link
                    .take()
                    .unwrap_or_else(|| Link::new(w.up_mbps, w.down_mbps));
                (cl.place, link, cl.dead.clone())
            }
            None => (
                self.draw_place(),
                Link::new(w.up_mbps, w.down_mbps),
                Vec::new(),
            ),
        };
        let counted = now.secs() >= self.sc.warmup_s;
        self.m.started += 1;
        if counted {
            self.m.counted += 1;
        }
        self.sessions.push(Session {
            client,
            place,
            link,
            arrived: now,
            counted,
            prompt,
            steps,
            rows,
            step: 0,
            hop: 0,
            step_start: now,
            step_failed_over: false,
            sent_at: now,
            route: Vec::new(),
            failover: Failover::new(
                self.failover_cfg.clone(),
                mix(self.sc.seed ^ mix(u64::from(s))),
            ),
            detector: Detector::new(self.detect_cfg.clone()),
            token: 0,
            state: State::Routing,
            found: Vec::new(),
            fo_span: Span::new(0, 0),
            dead,
            suspect: None,
            recovering: None,
            route_tries: 0,
            failovers: 0,
            warm: Vec::new(),
            fo_discoveries: 0,
            fo_warm: false,
        });
        self.discover_route(s);
    }

    /// The session's first discovery (or a closed client's cached one).
    fn discover_route(&mut self, s: u32) {
        let now = self.now();
        let setup = Time::from_ms(self.sc.workload.setup_ms);
        let sess = &self.sessions[s as usize];
        let cached = sess.client.is_some_and(|c| {
            self.clients[c as usize]
                .cache
                .as_ref()
                .is_some_and(|(at, _, _)| (now - *at).secs() < self.sc.workload.discovery_ttl_s)
        });
        let latency = if cached && self.sessions[s as usize].route_tries == 0 {
            Time::ZERO
        } else {
            if let Some(c) = sess.client {
                self.clients[c as usize].cache = None;
            }
            let all = Span::new(0, self.sc.model.blocks);
            self.discover_cost(None, Some(s), all)
        };
        let token = self.sessions[s as usize].token;
        self.q.at(now + latency + setup, Ev::Route(s, token));
    }

    /// The first discovery is answered: pick the route.
    pub(super) fn on_route(&mut self, s: u32, token: u32) {
        if self.sessions[s as usize].token != token {
            return;
        }
        let now = self.now();
        let all = Span::new(0, self.sc.model.blocks);
        let client = self.sessions[s as usize].client;
        let cache = client.and_then(|c| self.clients[c as usize].cache.clone());
        let (cands, nodes) = match cache {
            Some((_, c, n)) => (c, n),
            None => self.candidates(s, all),
        };
        let wall = WallInstant::now();
        let route = find_route(&cands, all, &[]);
        self.m
            .route_search_ms
            .push(wall.elapsed().as_secs_f64() * 1e3);
        self.m.route_candidates.push(cands.len() as f64);
        let Some(legs) = route else {
            // As the client does: look again a few times (~3 s), then give
            // up naming the gap.
            let sess = &mut self.sessions[s as usize];
            sess.route_tries += 1;
            if sess.route_tries > 4 {
                return self.end_session(s, Some("no route: a block has no holder".into()));
            }
            let wait = Time::from_ms(200.0 * f64::from(1u32 << (sess.route_tries - 1)));
            sess.token += 1;
            let token = sess.token;
            let all = Span::new(0, self.sc.model.blocks);
            let latency = self.discover_cost(None, Some(s), all);
            self.q.at(now + wait + latency, Ev::Route(s, token));
            return;
        };
        if let Some(c) = client {
            self.clients[c as usize].cache = Some((now, cands.clone(), nodes.clone()));
        }
        if self.sc.control.reuse_candidates {
            self.sessions[s as usize].warm = cands
                .iter()
                .zip(&nodes)
                .map(|(c, &n)| (n, c.span, c.throughput, c.rtt_ms, c.load))
                .collect();
        }
        let route: Vec<Hop> = legs
            .iter()
            .map(|l| Hop {
                node: nodes[l.candidate],
                span: l.span,
                tp: cands[l.candidate].throughput / cands[l.candidate].span.len().max(1) as f32,
                ran: 0,
                opened: None,
            })
            .collect();
        self.m.route_legs.push(route.len() as f64);
        let sess = &mut self.sessions[s as usize];
        sess.route = route;
        sess.state = State::Running;
        sess.step = 0;
        sess.hop = 0;
        self.send_hop(s);
    }

    /// Sends the current step to the current hop (with the history it must
    /// replay first).
    fn send_hop(&mut self, s: u32) {
        let now = self.now();
        let hidden_bytes = u64::from(self.sc.model.hidden) * u64::from(self.sc.model.dtype_bytes);
        let overhead = self.sc.net.msg_overhead_bytes;
        let w = &self.sc.workload;
        let (graph_bytes, save_bytes) = (w.graph_bytes, w.save_bytes_per_step);
        let sess = &mut self.sessions[s as usize];
        sess.token += 1;
        let token = sess.token;
        let h = sess.hop;
        let hop = sess.route[h].clone();
        let last = h + 1 == sess.route.len();
        let step_tokens = |e: u32| sess.rows * if e == 0 { sess.prompt } else { 1 };
        let tokens = step_tokens(sess.step);
        // The first hop gets token ids, the others hidden states.
        let per_token = if h == 0 { 4 } else { hidden_bytes };
        let replay = (hop.ran, sess.step - hop.ran.min(sess.step));
        let replay_tokens: u64 = (replay.0..replay.0 + replay.1)
            .map(|e| u64::from(step_tokens(e)))
            .sum();
        let mut bytes = overhead + per_token * u64::from(tokens) + per_token * replay_tokens;
        if hop.opened.is_none() {
            bytes += graph_bytes;
        }
        let next_unopened = sess.route.get(h + 1).is_some_and(|n| n.opened.is_none());
        let mut reply = overhead
            + if last {
                4 * u64::from(sess.rows) + save_bytes
            } else {
                hidden_bytes * u64::from(tokens)
            };
        if replay.1 > 0 && next_unopened {
            reply += hidden_bytes * replay_tokens;
        }
        sess.sent_at = now;
        // The deadline's work estimate, as the client makes it: the step's
        // tokens plus two per replayed step and row.
        let predicted = f64::from(tokens) + f64::from(replay.1) * f64::from(sess.rows) * 2.0;
        let job = Job::new(
            s,
            token,
            hop.node,
            hop.span,
            hop.opened,
            tokens,
            sess.step == 0,
            sess.rows,
            replay,
            sess.prompt,
            reply,
        );
        let n = hop.node;
        let node = &self.nodes[n as usize];
        let one_way = self.one_way(&self.sessions[s as usize].place, &node.place);
        if !node.alive {
            // A call to a dead node: refused at once if its host is up,
            // else it fails when the connection's pings give up, or when a
            // fresh dial times out.
            let died = node.died.unwrap_or(now);
            let cause = if node.fin {
                Cause::DiedFin
            } else {
                Cause::DiedVanish
            };
            let at = if node.fin {
                now + one_way + one_way
            } else {
                let detect = self.ping_detection(died);
                if detect > now {
                    detect
                } else {
                    now + Time::from_secs(self.sc.control.detect.dial_timeout_s)
                }
            };
            self.sessions[s as usize].suspect = Some((died.max(now), cause));
            self.q.at(at, Ev::CallFailed(s, token));
            return;
        }
        let j = self.new_job(job);
        let (sess, node) = (&mut self.sessions[s as usize], &mut self.nodes[n as usize]);
        let at = send(&mut sess.link, &mut node.link, bytes, now, one_way);
        node.watchers.push((s, token));
        self.q.at(at, Ev::HopArrive(j));
        sess.detector = Detector::new(self.detect_cfg.clone());
        let actions = sess.detector.on_event(
            self.clock.instant(now),
            detect::Event::Sent {
                tokens: predicted,
                throughput: hop.tp,
            },
        );
        self.detect_actions(s, actions);
    }

    /// When a connection's pings notice that a host vanished at `died`.
    fn ping_detection(&mut self, died: Time) -> Time {
        let d = &self.sc.control.detect;
        died + Time::from_secs(self.rng_fault.f64() * d.ping_interval_s + d.ping_timeout_s)
    }

    /// A node died while session `s` (at `token`) waited on it: its
    /// detector hears of it as the client's transport would.
    pub(super) fn notify_death(&mut self, s: u32, token: u32, n: u32) {
        let sess = &self.sessions[s as usize];
        if sess.token != token || sess.state != State::Running {
            return;
        }
        let now = self.now();
        let node = &self.nodes[n as usize];
        let (at, event, cause) = if node.fin {
            let one_way = self.one_way(&node.place, &sess.place);
            (now + one_way, detect::Event::Disconnected, Cause::DiedFin)
        } else {
            (
                self.ping_detection(now),
                detect::Event::Unresponsive,
                Cause::DiedVanish,
            )
        };
        self.sessions[s as usize].suspect = Some((now, cause));
        self.q.at(at, Ev::Detect(s, token, event));
    }

    /// Carries out the detector's actions.
    fn detect_actions(&mut self, s: u32, actions: Vec<detect::Action>) {
        let token = self.sessions[s as usize].token;
        let now = self.now();
        for a in actions {
            match a {
                detect::Action::WakeAt(at) => {
                    let t = self.clock.time(at);
                    self.q.at(t, Ev::Detect(s, token, detect::Event::Woke));
                }
                detect::Action::Redial | detect::Action::Probe => {
                    // Answered after a round trip if the node lives, refused
                    // if its host is up, silent if it vanished.
                    let sess = &self.sessions[s as usize];
                    let node = &self.nodes[sess.route[sess.hop].node as usize];
                    let one_way = self.one_way(&sess.place, &node.place);
                    let ok = node.alive;
                    if ok || node.fin {
                        let event = match (a, ok) {
                            (detect::Action::Redial, true) => detect::Event::Redialed,
                            (detect::Action::Redial, false) => detect::Event::RedialFailed,
                            (_, true) => detect::Event::ProbeAnswered,
                            (_, false) => detect::Event::ProbeFailed,
                        };
                        self.q
                            .at(now + one_way + one_way, Ev::Detect(s, token, event));
                    }
                }
                detect::Action::Lost(why) => {
                    let sess = &self.sessions[s as usize];
                    let (at, cause) = sess.suspect.unwrap_or((sess.sent_at, Cause::Deadline));
                    let cause = match why {
                        detect::Lost::NoAnswer { .. } if sess.suspect.is_none() => Cause::Deadline,
                        _ => cause,
                    };
                    self.hop_failed(s, Failure::Lost, at, cause);
                }
                detect::Action::NoProgress { waited } => {
                    let why = format!("no progress: a live hop took over {} s", waited.as_secs());
                    self.end_session(s, Some(why));
                }
            }
        }
    }

    pub(super) fn on_detect(&mut self, s: u32, token: u32, event: detect::Event) {
        let now = self.clock.instant(self.now());
        let sess = &mut self.sessions[s as usize];
        if sess.token != token || sess.state != State::Running {
            return;
        }
        let actions = sess.detector.on_event(now, event);
        self.detect_actions(s, actions);
    }

    /// A call to a node that was already dead failed.
    pub(super) fn on_call_failed(&mut self, s: u32, token: u32) {
        let sess = &self.sessions[s as usize];
        if sess.token != token || sess.state != State::Running {
            return;
        }
        let (at, cause) = sess.suspect.unwrap_or((sess.sent_at, Cause::DiedFin));
        self.hop_failed(s, Failure::Lost, at, cause);
    }

    /// A hop's answer reaches the client.
    pub(super) fn on_reply(&mut self, s: u32, token: u32, answer: Answer) {
        let sess = &self.sessions[s as usize];
        if sess.token != token || sess.state != State::Running {
            return;
        }
        let now = self.now();
        let h = sess.hop;
        let n = sess.route[h].node;
        match answer {
            Answer::Refused(kind, cause) => {
                self.unwatch(n, s);
                let one_way = self.one_way(
                    &self.nodes[n as usize].place,
                    &self.sessions[s as usize].place,
                );
                self.hop_failed(s, Failure::Refused(kind), now - one_way, cause);
            }
            Answer::Output(generation) => {
                self.unwatch(n, s);
                let sess = &mut self.sessions[s as usize];
                sess.detector.on_event(
                    self.clock.instant(now),
                    detect::Event::Report { last: true },
                );
                let hop = &mut sess.route[h];
                hop.ran = sess.step + 1;
                hop.opened = Some(generation);
                if let Some(r) = sess.recovering.filter(|r| r.until_hop == h) {
                    sess.recovering = None;
                    let ms = (now - r.failed_at).ms();
                    if sess.counted {
                        self.m.recovery_ms.push(ms);
                        self.m
                            .recovery_by_cause
                            .entry(r.cause)
                            .or_default()
                            .push(ms);
                    }
                }
                let sess = &mut self.sessions[s as usize];
                if h + 1 < sess.route.len() {
                    sess.hop += 1;
                    return self.send_hop(s);
                }
                self.step_done(s);
            }
        }
    }

    fn unwatch(&mut self, n: u32, s: u32) {
        let w = &mut self.nodes[n as usize].watchers;
        if let Some(i) = w.iter().position(|&(x, _)| x == s) {
            w.swap_remove(i);
        }
    }

    /// Every hop ran the step.
    fn step_done(&mut self, s: u32) {
        let now = self.now();
        let sess = &mut self.sessions[s as usize];
        let ms = (now - sess.step_start).ms();
        let failed_over = std::mem::take(&mut sess.step_failed_over);
        if failed_over {
            sess.failover
                .on_event(self.clock.instant(now), failover::Event::Recovered);
        }
        if sess.counted {
            if failed_over {
                self.m.failover_step_ms.push(ms);
            } else {
                self.m.step_ms.push(ms);
            }
            self.m.steps += 1;
        }
        let sess = &mut self.sessions[s as usize];
        sess.step += 1;
        sess.step_start = now;
        if sess.step >= sess.steps {
            return self.end_session(s, None);
        }
        sess.hop = 0;
        self.send_hop(s);
    }

    /// Hop `hop` of session `s` failed (at `failed_at`, from `cause`).
    fn hop_failed(&mut self, s: u32, failure: Failure, failed_at: Time, cause: Cause) {
        let now = self.now();
        let dead_ttl = Time::from_secs(self.sc.control.dead_ttl_s);
        let sess = &mut self.sessions[s as usize];
        let h = sess.hop;
        let hop = sess.route[h].clone();
        sess.token += 1;
        sess.state = State::FailingOver;
        sess.step_failed_over = true;
        sess.suspect = None;
        sess.fo_discoveries = 0;
        if failure == Failure::Lost {
            sess.dead.push((hop.node, now + dead_ttl));
            if let Some(c) = sess.client {
                let cl = &mut self.clients[c as usize];
                cl.cache = None;
                cl.dead.push((hop.node, now + dead_ttl));
            }
        }
        let sess = &mut self.sessions[s as usize];
        if sess.recovering.is_none() {
            sess.recovering = Some(Recovering {
                failed_at,
                cause,
                until_hop: h,
            });
            if sess.counted {
                self.m.detection_ms.push((now - failed_at).ms());
            }
        }
        let peer = self.nodes[hop.node as usize].peer;
        let actions = sess.failover.on_event(
            self.clock.instant(now),
            failover::Event::HopFailed {
                peer,
                span: hop.span,
                failure,
            },
        );
        self.unwatch(hop.node, s);
        self.failover_actions(s, actions);
    }

    /// Carries out the fail-over machine's actions.
    fn failover_actions(&mut self, s: u32, actions: Vec<failover::Action>) {
        let now = self.now();
        for a in actions {
            match a {
                failover::Action::Discover { span } => {
                    let sess = &self.sessions[s as usize];
                    // The first look after a failure may reuse the
                    // session's own candidates, at once.
                    let warm = sess.fo_discoveries == 0 && !sess.warm.is_empty();
                    let latency = if warm {
                        Time::ZERO
                    } else {
                        self.discover_cost(None, Some(s), span)
                    };
                    let sess = &mut self.sessions[s as usize];
                    sess.fo_span = span;
                    sess.fo_warm = warm;
                    sess.fo_discoveries += 1;
                    self.q.at(now + latency, Ev::FailoverFound(s, sess.token));
                }
                failover::Action::WaitUntil { at, span } => {
                    let sess = &mut self.sessions[s as usize];
                    sess.fo_span = span;
                    let t = self.clock.time(at);
                    self.q.at(t, Ev::FailoverWake(s, sess.token));
                }
                failover::Action::Replace { span, legs } => self.replace(s, span, &legs),
                failover::Action::GiveUp(why) => {
                    let why = match why {
                        GiveUp::NotRetriable { kind, .. } => {
                            format!("gave up: {kind:?} would repeat on any holder")
                        }
                        GiveUp::NoHolder { .. } => "gave up: no live holder of a span".into(),
                        GiveUp::TooManyFailures { .. } => "gave up: too many failures".into(),
                        _ => format!("gave up: {why}"),
                    };
                    self.end_session(s, Some(why));
                }
            }
        }
    }

    pub(super) fn on_failover_found(&mut self, s: u32, token: u32) {
        let sess = &self.sessions[s as usize];
        if sess.token != token || sess.state != State::FailingOver {
            return;
        }
        let span = sess.fo_span;
        let (cands, nodes) = if sess.fo_warm {
            let t = self.now();
            let dead = |n: u32| sess.dead.iter().any(|&(d, until)| d == n && t < until);
            sess.warm
                .iter()
                .filter(|w| !dead(w.0) && w.1.start < span.end && span.start < w.1.end)
                .map(|&(n, span, throughput, rtt_ms, load)| {
                    let peer = self.nodes[n as usize].peer;
                    (
                        Candidate {
                            peer,
                            span,
                            throughput,
                            rtt_ms,
                            load,
                        },
                        n,
                    )
                })
                .unzip()
        } else {
            self.candidates(s, span)
        };
        let now = self.clock.instant(self.now());
        let wall = WallInstant::now();
        let sess = &mut self.sessions[s as usize];
        let actions = sess.failover.on_event(
            now,
            failover::Event::Candidates {
                span,
                cands: &cands,
            },
        );
        self.m
            .failover_search_ms
            .push(wall.elapsed().as_secs_f64() * 1e3);
        sess.found = nodes;
        self.failover_actions(s, actions);
    }

    pub(super) fn on_failover_wake(&mut self, s: u32, token: u32) {
        let now = self.clock.instant(self.now());
        let sess = &mut self.sessions[s as usize];
        if sess.token != token || sess.state != State::FailingOver {
            return;
        }
        let span = sess.fo_span;
        let actions = sess.failover.on_event(now, failover::Event::Woke { span });
        self.failover_actions(s, actions);
    }

    /// Replaces the current hop by `legs` and goes on: the first new hop
    /// replays the history (or, for a restart, every hop starts over).
    fn replace(&mut self, s: u32, span: Span, legs: &[nnmesh_control::route::Leg]) {
        let restart = self.sc.control.recovery == Recovery::Restart;
        let sess = &mut self.sessions[s as usize];
        let h = sess.hop;
        debug_assert_eq!(sess.route[h].span, span);
        let new: Vec<Hop> = legs
            .iter()
            .map(|l| {
                let n = sess.found[l.candidate];
                let node = &self.nodes[n as usize];
                Hop {
                    node: n,
                    span: l.span,
                    tp: node.tp,
                    ran: 0,
                    opened: None,
                }
            })
            .collect();
        let count = new.len();
        sess.route.splice(h..=h, new);
        sess.failovers += 1;
        if sess.counted {
            self.m.failovers += 1;
        }
        if let Some(r) = sess.recovering.as_mut() {
            r.until_hop = h + count - 1;
        }
        if restart {
            for hop in &mut sess.route {
                hop.ran = 0;
                hop.opened = None;
            }
            sess.step = 0;
            sess.hop = 0;
            if let Some(r) = sess.recovering.as_mut() {
                r.until_hop = h + count - 1;
            }
            if sess.counted {
                self.m.restarts += 1;
            }
        }
        sess.state = State::Running;
        self.send_hop(s);
    }

    /// Ends a session: completed (`why` is `None`) or failed with its
    /// cause.
    pub(super) fn end_session(&mut self, s: u32, why: Option<String>) {
        let now = self.now();
        let sess = &mut self.sessions[s as usize];
        sess.state = State::Done;
        sess.token += 1;
        if let Some(h) = sess.route.get(sess.hop) {
            let n = h.node;
            self.unwatch(n, s);
        }
        if why.as_ref().is_some_and(|w| w.is_empty()) {
            // A failure must say why.
            self.m.lost += 1;
        }
        let sess = &mut self.sessions[s as usize];
        if sess.counted {
            match &why {
                None => {
                    self.m.completed += 1;
                    if sess.failovers > 0 {
                        self.m.completed_after_failover += 1;
                    }
                    let secs = (now - sess.arrived).secs();
                    self.m
                        .steps_per_s
                        .push(f64::from(sess.steps) / secs.max(1e-9));
                    self.m.completed_steps += u64::from(sess.steps);
                    self.m.completed_secs += secs;
                }
                Some(cause) => {
                    self.m.failed += 1;
                    *self.m.failed_by_cause.entry(cause.clone()).or_default() += 1;
                }
            }
        }
        // Free what a finished session no longer needs.
        sess.route = Vec::new();
        sess.found = Vec::new();
        sess.warm = Vec::new();
        if let Some(c) = sess.client {
            let link = std::mem::replace(&mut sess.link, Link::new(1.0, 1.0));
            let dead = std::mem::take(&mut sess.dead);
            let cl = &mut self.clients[c as usize];
            cl.link = Some(link);
            cl.dead = dead;
            cl.dead.retain(|&(_, until)| until > now);
            let think = Time::from_secs(self.sc.workload.think_s);
            if now + think <= self.end {
                self.q.at(now + think, Ev::ClientGo(c));
            }
        }
    }
}
