//! The simulated mesh: nodes, clients and the network between them, in
//! virtual time, driving the control crate's machines.
//!
//! - [`node`](self::node): nodes join, run the placement machine
//!   ([`Placement`]) on discovered records, load and serve spans, queue and
//!   compute steps, and die.
//! - [`session`](self::session): clients discover holders, pick a route
//!   with `find_route`, drive each step hop by hop, watch each hop with the
//!   failure detector ([`Detector`]) and recover with [`Failover`] and
//!   replay (or a restart).
//! - [`discovery`](self::discovery): what finding holders returns, how long
//!   it takes, and the control traffic it costs.
//!
//! [`Placement`]: nnmesh_control::placement::Placement
//! [`Detector`]: nnmesh_control::detect::Detector
//! [`Failover`]: nnmesh_control::failover::Failover

mod discovery;
mod node;
mod session;

use std::{
    collections::{BTreeMap, HashSet},
    time::Instant as WallInstant,
};

use nnmesh_control::{
    detect,
    placement::{self, Holder, holders_per_block},
};
use nnmesh_protocol::{PeerId, Span, message::ErrorKind};

use self::{
    node::{Job, Node},
    session::{Client, Session},
};
use crate::{
    dht::{Kad, Records},
    engine::{Clock, Queue, Time},
    progress::Progress,
    rng::Rng,
    scenario::{DiscoveryMode, Lifetime, Scenario, WorkloadMode},
    summary::{
        Coverage, CoverageSample, Dist, Invariants, Perf, PlacementStats, RecoveryStats, Sessions,
        SimStats, Summary, Traffic, cdf,
    },
};

/// What a failed hop's replacement had to recover from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Cause {
    /// The node dropped the session (injected, `--inject-faults`).
    Injected,
    /// The node's queue was full.
    Overloaded,
    /// The node moved to other blocks.
    Moved,
    /// The node died and its host closed the connections.
    DiedFin,
    /// The node's host vanished.
    DiedVanish,
    /// The step passed its deadline and the node did not answer a probe.
    Deadline,
}

impl Cause {
    fn name(self) -> &'static str {
        match self {
            Cause::Injected => "injected",
            Cause::Overloaded => "overloaded",
            Cause::Moved => "moved",
            Cause::DiedFin => "died (connection closed)",
            Cause::DiedVanish => "died (host vanished)",
            Cause::Deadline => "deadline",
        }
    }
}

/// How a hop answered a step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Answer {
    /// Its output (or the step done, at the last hop), from a node whose
    /// serving generation is the `u32`.
    Output(u32),
    /// A refusal, with its cause.
    Refused(ErrorKind, Cause),
}

/// The events.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Ev {
    /// A node joins (churn).
    Join,
    /// A node's process is up: its placement starts.
    Start(u32),
    /// A node leaves (its lifetime is over).
    Depart(u32),
    /// The chaos killer strikes.
    Kill,
    /// A placement machine's timer.
    PlaceWake(u32),
    /// A node's discovery for placement is answered.
    PlaceRecords(u32),
    /// A node finished loading a span.
    PlaceLoaded(u32, Span),
    /// A node refreshes its records or provider announcement.
    Refresh(u32),
    /// A block record may have expired.
    Expire(u32),
    /// An open-workload session arrives.
    Arrive,
    /// A closed-workload client starts its next session.
    ClientGo(u32),
    /// A session's initial discovery is answered (session, token).
    Route(u32, u32),
    /// A step's message reaches its node (job).
    HopArrive(u32),
    /// A node finishes a forward (node, service generation).
    Computed(u32, u32),
    /// A hop's answer reaches the client (session, token, answer).
    Reply(u32, u32, Answer),
    /// A call to a dead node fails at the client (session, token).
    CallFailed(u32, u32),
    /// An event for a session's failure detector (session, token).
    Detect(u32, u32, detect::Event),
    /// A fail-over's discovery is answered (session, token).
    FailoverFound(u32, u32),
    /// A fail-over's backoff ends (session, token).
    FailoverWake(u32, u32),
    /// Coverage is sampled and checked.
    Sample,
    /// The DHT's lookups are measured again, storers are charged.
    Lookups,
}

impl Ev {
    /// The (session, token) an event is for, if any.
    fn session(&self) -> Option<(u32, u32)> {
        match *self {
            Ev::Route(s, t)
            | Ev::Reply(s, t, _)
            | Ev::CallFailed(s, t)
            | Ev::Detect(s, t, _)
            | Ev::FailoverFound(s, t)
            | Ev::FailoverWake(s, t) => Some((s, t)),
            _ => None,
        }
    }
}

/// Per-block holder counts and exact throughputs (milli-tokens/s) of the
/// live, serving nodes: kept up to date on every serve, drop and death.
#[derive(Debug)]
struct Live {
    holders: Vec<u32>,
    tp_milli: Vec<i64>,
}

impl Live {
    fn add(&mut self, span: Span, tp: f32) {
        for b in span.range() {
            self.holders[b] += 1;
            self.tp_milli[b] += milli(tp);
        }
    }

    fn remove(&mut self, span: Span, tp: f32) {
        for b in span.range() {
            self.holders[b] -= 1;
            self.tp_milli[b] -= milli(tp);
        }
    }
}

pub(crate) fn milli(tp: f32) -> i64 {
    if tp.is_finite() {
        (f64::from(tp.max(0.0)) * 1000.0).round() as i64
    } else {
        0
    }
}

/// Counters of the run.
#[derive(Debug, Default)]
struct Metrics {
    step_ms: Vec<f64>,
    failover_step_ms: Vec<f64>,
    steps_per_s: Vec<f64>,
    completed_steps: u64,
    completed_secs: f64,
    recovery_ms: Vec<f64>,
    recovery_by_cause: BTreeMap<Cause, Vec<f64>>,
    detection_ms: Vec<f64>,
    route_legs: Vec<f64>,
    counted: u64,
    completed: u64,
    completed_after_failover: u64,
    failed: u64,
    failed_by_cause: BTreeMap<String, u64>,
    steps: u64,
    failovers: u64,
    restarts: u64,
    started: u64,
    lost: u64,
    samples: Vec<CoverageSample>,
    coverage_checks: u64,
    coverage_mismatches: u64,
    record_mismatches: u64,
    placed: u64,
    aborted: u64,
    checks: u64,
    joined: u32,
    left: u32,
    discoveries: u64,
    discovery_ms: Vec<f64>,
    route_search_ms: Vec<f64>,
    failover_search_ms: Vec<f64>,
    route_candidates: Vec<f64>,
}

/// RPC counts by kind, mesh-wide.
#[derive(Debug, Default)]
struct Kinds(BTreeMap<&'static str, f64>);

impl Kinds {
    fn add(&mut self, kind: &'static str, rpcs: f64) {
        *self.0.entry(kind).or_default() += rpcs;
    }
}

/// The simulated mesh.
pub(crate) struct World {
    sc: Scenario,
    clock: Clock,
    q: Queue<Ev>,
    end: Time,
    rng_churn: Rng,
    rng_work: Rng,
    rng_net: Rng,
    rng_fault: Rng,
    rng_misc: Rng,
    nodes: Vec<Node>,
    sessions: Vec<Session>,
    clients: Vec<Client>,
    jobs: Vec<Job>,
    free_jobs: Vec<u32>,
    live: Live,
    /// Serving nodes, and each node's index here.
    serving: Vec<u32>,
    kad: Kad,
    records: Records,
    /// Storers of each block's key, then of the providers' key.
    storers: Vec<Vec<u32>>,
    /// (stores, gets) per key since the storers were last charged.
    key_ops: Vec<(f64, f64)>,
    /// When vanished nodes stop being listed as providers.
    stale_providers: discovery::TimeHeap,
    /// Discoveries so far by anyone (each alive node serves one `Info` per
    /// discovery in `providers` mode).
    info_calls: u64,
    /// Lookup RPCs, spread over the DHT's members.
    routing_rpcs: f64,
    kinds: Kinds,
    /// Bytes of an `Info` answer and of a block record.
    info_bytes: u64,
    record_bytes: u64,
    /// The node whose start the killer waits for.
    killer_waits: Option<u32>,
    m: Metrics,
    placement_cfg: placement::Config,
    detect_cfg: detect::Config,
    failover_cfg: nnmesh_control::failover::Config,
}

impl World {
    /// A world for `sc`, with its initial nodes and workload scheduled.
    pub(crate) fn new(sc: Scenario) -> World {
        let b = sc.model.blocks;
        let seed = sc.seed;
        let end = Time::from_secs(sc.duration_s);
        let (info_bytes, record_bytes) = discovery::message_sizes(&sc);
        let pc = &sc.control.placement;
        let placement_cfg = placement::Config {
            replication: pc.replication,
            check_period: if pc.rebalance {
                secs(pc.check_period_s)
            } else {
                // One placement, no checks: the next one is past any run.
                secs(1e9)
            },
            start_jitter: secs(pc.start_jitter_s),
            balance_quality: pc.balance_quality,
            min_dwell: secs(pc.min_dwell_s),
        };
        let dc = &sc.control.detect;
        let detect_cfg = detect::Config {
            deadline_base: secs(dc.deadline_base_s),
            deadline_factor: dc.deadline_factor,
            deadlines: dc.deadlines,
            redial_timeout: secs(dc.redial_timeout_s),
            probe_timeout: secs(dc.probe_timeout_s),
            ..detect::Config::default()
        };
        let fc = &sc.control.failover;
        let failover_cfg = nnmesh_control::failover::Config {
            max_attempts: fc.max_attempts,
            max_failures: fc.max_failures,
            backoff: std::time::Duration::from_secs_f64(fc.backoff_ms / 1e3),
            max_backoff: secs(fc.max_backoff_s),
            blacklist: secs(fc.blacklist_s),
        };
        let kad = Kad::new(sc.discovery.k, sc.discovery.alpha);
        let mut w = World {
            clock: Clock::new(),
            q: Queue::new(),
            end,
            rng_churn: Rng::new(seed, 1),
            rng_work: Rng::new(seed, 2),
            rng_net: Rng::new(seed, 3),
            rng_fault: Rng::new(seed, 4),
            rng_misc: Rng::new(seed, 5),
            nodes: Vec::new(),
            sessions: Vec::new(),
            clients: Vec::new(),
            jobs: Vec::new(),
            free_jobs: Vec::new(),
            live: Live {
                holders: vec![0; b as usize],
                tp_milli: vec![0; b as usize],
            },
            serving: Vec::new(),
            kad,
            records: Records::new(b),
            storers: vec![Vec::new(); b as usize + 1],
            key_ops: vec![(0.0, 0.0); b as usize + 1],
            stale_providers: discovery::TimeHeap::new(),
            info_calls: 0,
            routing_rpcs: 0.0,
            kinds: Kinds::default(),
            info_bytes,
            record_bytes,
            killer_waits: None,
            m: Metrics::default(),
            placement_cfg,
            detect_cfg,
            failover_cfg,
            sc,
        };
        let n = w.sc.nodes.count;
        for i in 0..n {
            let at = if w.sc.nodes.join_over_s > 0.0 && n > 1 {
                Time::from_secs(w.sc.nodes.join_over_s * f64::from(i) / f64::from(n))
            } else {
                Time::ZERO
            };
            w.add_node(at, true);
        }
        if w.sc.churn.replace {
            w.schedule_join();
        }
        if let Some(k) = w.sc.churn.kills.clone() {
            let wait = k.every_s * (0.5 + w.rng_churn.f64());
            w.q.at(Time::from_secs(k.start_s + wait), Ev::Kill);
        }
        let start = Time::from_secs(w.sc.workload.start_s);
        match w.sc.workload.mode {
            WorkloadMode::Open if w.sc.workload.arrival_per_s > 0.0 => w.q.at(start, Ev::Arrive),
            WorkloadMode::Open => {}
            WorkloadMode::Closed => {
                for c in 0..w.sc.workload.clients {
                    let place = w.draw_place();
                    w.clients.push(Client::new(place));
                    w.q.at(start, Ev::ClientGo(c));
                }
            }
        }
        w.q.at(Time::ZERO, Ev::Lookups);
        w.q.at(Time::from_secs(w.sc.sample_every_s), Ev::Sample);
        w
    }

    /// Runs to the end; returns the summary.
    pub(crate) fn run(mut self, label: &str, progress: &mut Progress) -> Summary {
        let wall = WallInstant::now();
        progress.start(label, self.end.secs());
        while let Some(ev) = self.q.pop(self.end) {
            self.handle(ev);
            if self.q.popped() & 0xffff == 0 {
                let active = self.sessions.iter().filter(|s| !s.is_done()).count();
                progress.update(self.q.now().secs(), self.q.popped(), active);
            }
        }
        self.charge_storers();
        let wall_s = wall.elapsed().as_secs_f64();
        progress.finish(self.q.popped(), wall_s);
        self.summary(label, wall_s)
    }

    fn now(&self) -> Time {
        self.q.now()
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Join => {
                self.add_node(self.now(), false);
                self.schedule_join();
            }
            Ev::Start(n) => self.start_node(n),
            Ev::Depart(n) => self.kill_node(n, None),
            Ev::Kill => self.killer(),
            Ev::PlaceWake(n) => self.place_wake(n),
            Ev::PlaceRecords(n) => self.place_records(n),
            Ev::PlaceLoaded(n, span) => self.place_loaded(n, span),
            Ev::Refresh(n) => self.refresh(n),
            Ev::Expire(r) => self.expire(r),
            Ev::Arrive => {
                if self.workload_over() {
                    return;
                }
                self.start_session(None);
                let gap = self.rng_work.exp(1.0 / self.sc.workload.arrival_per_s);
                self.q.at(self.now() + Time::from_secs(gap), Ev::Arrive);
            }
            Ev::ClientGo(c) if !self.workload_over() => self.start_session(Some(c)),
            Ev::ClientGo(_) => {}
            Ev::Route(s, t) => self.on_route(s, t),
            Ev::HopArrive(j) => self.hop_arrive(j),
            Ev::Computed(n, g) => self.computed(n, g),
            Ev::Reply(s, t, a) => self.on_reply(s, t, a),
            Ev::CallFailed(s, t) => self.on_call_failed(s, t),
            Ev::Detect(s, t, e) => self.on_detect(s, t, e),
            Ev::FailoverFound(s, t) => self.on_failover_found(s, t),
            Ev::FailoverWake(s, t) => self.on_failover_wake(s, t),
            Ev::Sample => {
                self.sample();
                self.q.at(
                    self.now() + Time::from_secs(self.sc.sample_every_s),
                    Ev::Sample,
                );
            }
            Ev::Lookups => {
                self.measure_lookups();
                self.q.at(
                    self.now() + Time::from_secs(self.sc.discovery.lookup_every_s.max(1.0)),
                    Ev::Lookups,
                );
            }
        }
    }

    /// Whether new sessions may no longer start.
    fn workload_over(&self) -> bool {
        self.sc
            .workload
            .stop_s
            .is_some_and(|t| self.now() > Time::from_secs(t))
    }

    fn draw_place(&mut self) -> crate::net::Place {
        crate::net::Place::draw(
            &mut self.rng_net,
            &self.sc.net.regions,
            self.sc.net.access_ms,
        )
    }

    /// One-way latency between two places.
    fn one_way(&self, a: &crate::net::Place, b: &crate::net::Place) -> Time {
        Time::from_ms(a.one_way_ms(b, self.sc.net.km_per_ms))
    }

    /// Schedules the next churn join.
    fn schedule_join(&mut self) {
        let mean = self.sc.churn.lifetime.mean_s();
        if !mean.is_finite() || mean <= 0.0 || self.sc.nodes.count == 0 {
            return;
        }
        let rate = f64::from(self.sc.nodes.count) / mean;
        let gap = self.rng_churn.exp(1.0 / rate);
        let at = self.now() + Time::from_secs(gap);
        if at <= self.end {
            self.q.at(at, Ev::Join);
        }
    }

    /// A node's lifetime. The initial nodes get a residual lifetime, as if
    /// the mesh had been running for long: a lifetime drawn in proportion
    /// to its length (the lives under way at a random moment are the long
    /// ones), times U[0, 1). So the mesh starts in its steady state instead
    /// of losing its initial cohort at once.
    fn lifetime(&mut self, initial: bool) -> Option<Time> {
        let r = &mut self.rng_churn;
        let s = match (self.sc.churn.lifetime, initial) {
            (Lifetime::Forever, _) => return None,
            (Lifetime::Exponential { mean_s }, _) => r.exp(mean_s),
            (Lifetime::Lognormal { median_s, sigma }, false) => r.lognormal(median_s, sigma),
            (Lifetime::Lognormal { median_s, sigma }, true) => {
                r.lognormal(median_s * (sigma * sigma).exp(), sigma) * r.f64()
            }
            (Lifetime::Pareto { min_s, alpha }, true) if alpha > 1.0 => {
                r.pareto(min_s, alpha - 1.0) * r.f64()
            }
            (Lifetime::Pareto { min_s, alpha }, _) => r.pareto(min_s, alpha),
        };
        Some(Time::from_secs(s))
    }

    /// The chaos killer: kills a random started node, starts a new one.
    fn killer(&mut self) {
        let Some(k) = self.sc.churn.kills.clone() else {
            return;
        };
        if k.stop_s.is_some_and(|t| self.now() > Time::from_secs(t)) {
            return;
        }
        let candidates: Vec<u32> = (0..self.nodes.len() as u32)
            .filter(|&i| self.nodes[i as usize].alive && self.nodes[i as usize].span.is_some())
            .collect();
        if !candidates.is_empty() {
            let victim = candidates[self.rng_churn.below(candidates.len() as u64) as usize];
            self.kill_node(victim, Some(true));
        }
        if k.replace {
            let fresh = self.add_node(self.now(), false);
            if k.wait_for_replacement {
                self.killer_waits = Some(fresh);
                return;
            }
        }
        let wait = k.every_s * (0.5 + self.rng_churn.f64());
        self.q.at(self.now() + Time::from_secs(wait), Ev::Kill);
    }

    /// The killer's node serves: the next wait starts.
    fn killer_resumes(&mut self, n: u32) {
        if self.killer_waits == Some(n) {
            self.killer_waits = None;
            if let Some(k) = &self.sc.churn.kills {
                let wait = k.every_s * (0.5 + self.rng_churn.f64());
                self.q.at(self.now() + Time::from_secs(wait), Ev::Kill);
            }
        }
    }

    /// Samples coverage and checks the running counts against recounts.
    fn sample(&mut self) {
        let b = self.sc.model.blocks;
        let now = self.now();
        // Recount with the control crate's own function, from the spans the
        // live nodes serve.
        let holders: Vec<Holder> = self
            .nodes
            .iter()
            .filter(|n| n.alive)
            .flat_map(|n| {
                n.counted.iter().map(|&span| Holder {
                    peer: n.peer,
                    span,
                    throughput: n.tp,
                })
            })
            .collect();
        let recount = holders_per_block(&holders, b);
        let mut tp = vec![0i64; b as usize];
        for h in &holders {
            for i in h.span.range() {
                tp[i] += milli(h.throughput);
            }
        }
        self.m.coverage_checks += 1;
        if recount != self.live.holders || tp != self.live.tp_milli {
            self.m.coverage_mismatches += 1;
        }
        if self.sc.discovery.mode == DiscoveryMode::Blocks {
            let (h, t) = self.records.recount();
            if h != self.records.holders() || t != self.records.tp_milli() {
                self.m.record_mismatches += 1;
            }
        }
        let live = &self.live.holders;
        let covered = live.iter().filter(|&&c| c > 0).count() as f64 / f64::from(b);
        let min_records = match self.sc.discovery.mode {
            DiscoveryMode::Blocks => self.records.holders().iter().copied().min().unwrap_or(0),
            DiscoveryMode::Providers => live.iter().copied().min().unwrap_or(0),
        };
        self.m.samples.push(CoverageSample {
            t_s: now.secs(),
            covered,
            min_holders: live.iter().copied().min().unwrap_or(0),
            mean_holders: live.iter().map(|&c| f64::from(c)).sum::<f64>() / f64::from(b),
            min_holders_records: min_records,
            alive: self.nodes.iter().filter(|n| n.alive).count() as u32,
            serving: self.serving.len() as u32,
            sessions: self.sessions.iter().filter(|s| !s.is_done()).count() as u32,
        });
    }

    /// The run's summary.
    fn summary(mut self, label: &str, wall_s: f64) -> Summary {
        let now = self.now().max(self.end);
        // Sessions: every counted session is completed, failed with a
        // cause, or unfinished with an event left to wake it.
        let pending: HashSet<(u32, u32)> = self.q.pending().filter_map(Ev::session).collect();
        let mut unfinished = 0;
        for (i, s) in self.sessions.iter().enumerate() {
            if s.is_done() {
                continue;
            }
            if !pending.contains(&(i as u32, s.token)) {
                self.m.lost += 1;
            }
            if s.counted {
                unfinished += 1;
            }
        }
        let m = &mut self.m;
        let warm = self.sc.warmup_s;
        let after: Vec<&CoverageSample> = m.samples.iter().filter(|s| s.t_s >= warm).collect();
        let coverage = Coverage {
            min_covered: after.iter().map(|s| s.covered).fold(1.0, f64::min),
            fully_covered: if after.is_empty() {
                0.0
            } else {
                after.iter().filter(|s| s.covered >= 1.0).count() as f64 / after.len() as f64
            },
            min_holders: after.iter().map(|s| s.min_holders).min().unwrap_or(0),
            samples: std::mem::take(&mut m.samples),
        };
        let ended = m.completed + m.failed;
        let sessions = Sessions {
            counted: m.counted,
            completed: m.completed,
            failed: m.failed,
            unfinished,
            completion_rate: if ended == 0 {
                0.0
            } else {
                m.completed as f64 / ended as f64
            },
            failed_by_cause: std::mem::take(&mut m.failed_by_cause),
            steps: m.steps,
            steps_per_s: Dist::of(&mut m.steps_per_s),
            steps_per_s_overall: m.completed_steps as f64 / m.completed_secs.max(1e-9),
            step_ms: Dist::of(&mut m.step_ms),
            failover_step_ms: Dist::of(&mut m.failover_step_ms),
            failovers: m.failovers,
            completed_after_failover: m.completed_after_failover,
            restarts: m.restarts,
            route_legs: Dist::of(&mut m.route_legs),
        };
        let recovery = RecoveryStats {
            cdf: cdf(&mut m.recovery_ms.clone(), 200),
            latency_ms: Dist::of(&mut m.recovery_ms),
            by_cause: std::mem::take(&mut m.recovery_by_cause)
                .into_iter()
                .map(|(c, mut v)| (c.name().to_string(), Dist::of(&mut v)))
                .collect(),
            detection_ms: Dist::of(&mut m.detection_ms),
        };
        let control = self.traffic(now);
        let m = &mut self.m;
        let events = self.q.popped();
        Summary {
            label: label.to_string(),
            series: String::new(),
            x: 0.0,
            scenario: self.sc.name.clone(),
            seed: self.sc.seed,
            sim: SimStats {
                duration_s: self.end.secs(),
                events,
                nodes_initial: self.sc.nodes.count,
                nodes_joined: m.joined,
                nodes_left: m.left,
                nodes_alive_end: self.nodes.iter().filter(|n| n.alive).count() as u32,
                nodes_serving_end: self.serving.len() as u32,
            },
            sessions,
            recovery,
            coverage,
            placement: PlacementStats {
                placed: m.placed,
                moves: self
                    .nodes
                    .iter()
                    .filter_map(|n| n.machine.as_ref())
                    .map(|p| u64::from(p.moves()))
                    .sum(),
                aborted: m.aborted,
                checks: m.checks,
            },
            control,
            invariants: Invariants {
                sessions_started: m.started,
                sessions_lost: m.lost,
                coverage_checks: m.coverage_checks,
                coverage_mismatches: m.coverage_mismatches,
                record_mismatches: m.record_mismatches,
            },
            perf: Perf {
                wall_s,
                events_per_s: events as f64 / wall_s.max(1e-9),
                route_search_ms: Dist::of(&mut m.route_search_ms),
                failover_search_ms: Dist::of(&mut m.failover_search_ms),
                route_candidates: Dist::of(&mut m.route_candidates),
            },
        }
    }

    /// Control traffic per node, over the nodes alive at least five
    /// minutes.
    fn traffic(&mut self, now: Time) -> Traffic {
        let mut rpcs = Vec::new();
        let mut bytes = Vec::new();
        let alive_s: f64 = self
            .nodes
            .iter()
            .filter(|n| n.started_at.is_some())
            .map(|n| (n.died.unwrap_or(now) - n.joined).secs())
            .sum();
        // Lookup RPCs are spread over the members by their time in the DHT.
        let routing_rate = self.routing_rpcs / alive_s.max(1e-9);
        for n in &self.nodes {
            let Some(_) = n.started_at else { continue };
            let until = n.died.unwrap_or(now);
            let t = (until - n.joined).secs();
            if t < 300.0 {
                continue;
            }
            let info = match self.sc.discovery.mode {
                DiscoveryMode::Providers => (n.info_until(self.info_calls) - n.info_at_join) as f64,
                DiscoveryMode::Blocks => 0.0,
            };
            let r = n.rpcs + info + routing_rate * t;
            let by = n.bytes + info * (self.info_bytes as f64 + 64.0);
            rpcs.push(r / t);
            bytes.push(by / t);
        }
        let mut kinds = std::mem::take(&mut self.kinds.0);
        if self.sc.discovery.mode == DiscoveryMode::Providers {
            let served: f64 = self
                .nodes
                .iter()
                .filter(|n| n.started_at.is_some())
                .map(|n| (n.info_until(self.info_calls) - n.info_at_join) as f64)
                .sum();
            *kinds.entry("info (served)").or_default() += served;
        }
        *kinds.entry("lookup (routing)").or_default() += self.routing_rpcs;
        Traffic {
            mode: format!("{:?}", self.sc.discovery.mode).to_lowercase(),
            nodes: rpcs.len() as u64,
            rpcs_per_node_s: Dist::of(&mut rpcs),
            bytes_per_node_s: Dist::of(&mut bytes),
            by_kind: kinds
                .into_iter()
                .map(|(k, v)| (k.to_string(), v / alive_s.max(1e-9)))
                .collect(),
            lookup_rpcs: self.kad.rpcs_per_lookup,
            lookup_rounds: self.kad.rounds_per_lookup,
            get_rpcs: self.kad.rpcs_per_get,
            get_rounds: self.kad.rounds_per_get,
            info_bytes: self.info_bytes,
            discoveries: self.m.discoveries,
            discovery_ms: Dist::of(&mut self.m.discovery_ms),
        }
    }

    /// A peer id for a new node, from the run's seed.
    fn new_peer(&mut self) -> PeerId {
        let mut bytes = [0u8; 32];
        for chunk in bytes.chunks_mut(8) {
            chunk.copy_from_slice(&self.rng_misc.next_u64().to_le_bytes());
        }
        libp2p_identity::Keypair::ed25519_from_bytes(bytes)
            .expect("any 32 bytes are an ed25519 secret")
            .public()
            .to_peer_id()
    }
}

fn secs(s: f64) -> std::time::Duration {
    std::time::Duration::from_secs_f64(s.clamp(0.0, 1e12))
}
