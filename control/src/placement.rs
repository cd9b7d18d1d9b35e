//! Placement: which blocks a node serves, and when it moves. Pure functions
//! of the mesh's records, and [`Placement`], one node's sans-IO state
//! machine that drives them.
//!
//! It follows Petals' block selection (`server/block_selection.py`): a
//! joining node covers the weakest blocks, and a serving node checks at
//! random intervals whether moving would make the weakest block markedly
//! stronger. It adds a replication floor of [`Config::replication`] (`R`)
//! holders per block, so that a failed holder can be replaced, and it moves
//! by loading the new blocks while still serving the old ones, then looks
//! at the mesh again before dropping them.
//!
//! # Where a joining node goes: [`choose_span`]
//!
//! Of the windows of `len` consecutive blocks, the first by, in order:
//! 1. its blocks' holder counts, each capped at `R`, sorted ascending,
//!    lexicographically smallest first: the window with the most blocks
//!    without holder wins, then the one with the most with one holder, …;
//! 2. its blocks' throughputs sorted ascending, lexicographically smallest
//!    first (Petals' rule: cover the weakest blocks);
//! 3. the total number of holders of its blocks, fewest first;
//! 4. its start, lowest first.
//!
//! A block's throughput is the sum of its holders' (tokens/s through the
//! holder's whole span; non-finite or negative values count as 0).
//!
//! # When a serving node moves: [`move_target`]
//!
//! At each check the node leaves itself out of the records and takes
//! `new = choose_span(others)`. With `c`, `t` the holder counts and
//! throughputs per block while it serves `old`, `c'`, `t'` those if it
//! served `new` instead, and `m = min c`, it moves iff `new != old`, at
//! least [`Config::min_dwell`] has passed since it last arrived (or a block
//! has no holder at all: an outage is repaired at once), and
//! - (a) **repair**: `m < R`, `new` holds a block with `m` holders, and
//!   every block it leaves (`old \ new`) keeps at least `m + 1` holders
//!   (as many as the weakest block it covers reaches; so never none); or
//! - (b) **balance**: `min t < balance_quality · min t'` (Petals' `old_min /
//!   new_min < 0.75`), and every block it leaves keeps at least `max(R, 1)`
//!   holders (no block falls under the floor or loses its last holder).
//!
//! With accurate records and one move at a time, every move raises the pair
//! (counts capped at `R` and sorted ascending, `min t`) lexicographically:
//! a repair leaves fewer blocks with `m` holders and none with fewer; a
//! balance lowers no capped count and multiplies `min t` by more than
//! `1 / balance_quality`. The pair is bounded, so the moves stop: no
//! flapping. Only one move is simulated per check (Petals also simulates
//! the other nodes' replies, which costs a pass over every holder per
//! holder); a mesh that only a sequence of moves would improve stays put.
//!
//! # A move, safely
//!
//! `Load { new }` (still serving `old`), then on `Loaded` a fresh
//! `Discover`. If the fresh records show that a block of `old \ new` would
//! keep fewer than `max(1, min(R, planned))` holders, `planned` being its
//! count when the move was decided (other nodes moved meanwhile), the move
//! is aborted: `Unload { new }`, `old` stays. Otherwise `Serve { new }`,
//! then `Drop { old }`. Checks come every [`Config::check_period`] ×
//! U[0.5, 1.5); the first placement waits U[0, [`Config::start_jitter`]) so
//! that nodes started together do not all pick the same blocks.
//!
//! # Records or a census
//!
//! The answer to `Discover` is either the holders' records
//! ([`Event::Records`]) or, where handing every node every record costs too
//! much (a mesh of thousands), their per-block aggregates
//! ([`Placement::on_census`] with a [`Census`]): the rule only reads holder
//! counts and throughputs per block, so both give the same decisions.
//!
//! ```
//! use std::time::Instant;
//! use nnmesh_control::placement::*;
//! use nnmesh_protocol::Span;
//!
//! let id = |s: u8| libp2p_identity::Keypair::ed25519_from_bytes([s; 32]).unwrap().public().to_peer_id();
//! let holders = [Holder { peer: id(1), span: Span::new(0, 10), throughput: 100.0 }];
//! // A node of 10 blocks joining a 30-layer mesh covers a hole.
//! assert_eq!(choose_span(&holders, 30, 10, 2), Span::new(10, 20));
//!
//! let mut p = Placement::new(Config::default(), id(2), 100.0, 30, 10, 7);
//! let now = Instant::now();
//! let [Action::WakeAt(at)] = p.on_event(now, Event::Start)[..] else { panic!() };
//! assert_eq!(p.on_event(at, Event::Woke), [Action::Discover]);
//! let load = p.on_event(at, Event::Records { holders: &holders });
//! assert_eq!(load, [Action::Load { span: Span::new(10, 20) }]);
//! let actions = p.on_event(at, Event::Loaded { span: Span::new(10, 20) });
//! assert_eq!(actions[0], Action::Serve { span: Span::new(10, 20) });
//! assert_eq!(p.span(), Some(Span::new(10, 20)));
//! ```

use std::{
    cmp::Ordering,
    ops::Range,
    time::{Duration, Instant},
};

use nnmesh_protocol::{PeerId, Span};

/// How a node places itself and rebalances.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The replication floor: holders wanted per block.
    pub replication: u32,
    /// Mean time between rebalance checks (each wait is this × U[0.5, 1.5)).
    pub check_period: Duration,
    /// The first placement waits U[0, this), so that nodes started
    /// together do not all pick the same blocks.
    pub start_jitter: Duration,
    /// A balance move needs `old_min / new_min` below this (Petals' 0.75):
    /// the weakest block's throughput must grow by more than its inverse.
    pub balance_quality: f32,
    /// No move within this long after arriving on a span (hysteresis: a
    /// move reloads weights and ends or fails over sessions).
    pub min_dwell: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            replication: 2,
            check_period: Duration::from_secs(60),
            start_jitter: Duration::from_secs(2),
            balance_quality: 0.75,
            min_dwell: Duration::from_secs(300),
        }
    }
}

/// A node as the mesh's records show it.
#[derive(Debug, Clone, PartialEq)]
pub struct Holder {
    /// The node.
    pub peer: PeerId,
    /// The blocks it serves.
    pub span: Span,
    /// Tokens per second through its whole span.
    pub throughput: f32,
}

/// Holders per block of a model with `num_layers` blocks (spans are cut at
/// `num_layers`).
pub fn holders_per_block(holders: &[Holder], num_layers: u32) -> Vec<u32> {
    Blocks::of(holders, num_layers, None).holders
}

/// Throughput per block: the sum of its holders' throughputs.
pub fn block_throughput(holders: &[Holder], num_layers: u32) -> Vec<f32> {
    Blocks::of(holders, num_layers, None).throughput
}

/// The maximal runs of blocks with fewer than `replication` holders.
pub fn under_floor(holders: &[Holder], num_layers: u32, replication: u32) -> Vec<Span> {
    runs(&holders_per_block(holders, num_layers), |c| c < replication)
}

/// The maximal runs of blocks without holder: a request through them fails.
pub fn uncovered(holders: &[Holder], num_layers: u32) -> Vec<Span> {
    under_floor(holders, num_layers, 1)
}

/// The `len` blocks (clamped to `1..=num_layers`) a node joining the mesh
/// of `holders` should serve, by the rule in the [module docs](self);
/// `0..0` if `num_layers` is 0.
pub fn choose_span(holders: &[Holder], num_layers: u32, len: u32, replication: u32) -> Span {
    Blocks::of(holders, num_layers, None).best_window(len, replication)
}

/// Where `me` should move by the rule in the [module docs](self), if
/// anywhere (the dwell time aside). `others` may list `me.peer`: it is left
/// out, and `me` counts on `me.span`.
pub fn move_target(others: &[Holder], me: &Holder, num_layers: u32, cfg: &Config) -> Option<Span> {
    let blocks = Blocks::of(others, num_layers, Some(&me.peer));
    plan(&blocks, me.span, me.throughput, cfg).map(|p| p.to)
}

/// Per-block aggregates of a set of holders: what placement needs of the
/// mesh's records (see [`Placement::on_census`]).
///
/// Kept up to date with [`add`](Census::add) and
/// [`remove`](Census::remove), it costs O(blocks of the span) per change,
/// whatever the number of holders.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Census {
    /// Holders per block.
    pub holders: Vec<u32>,
    /// Throughput per block: the sum of its holders' (tokens/s through the
    /// holder's whole span; non-finite or negative values count as 0).
    pub throughput: Vec<f32>,
}

impl Census {
    /// An empty census of `num_layers` blocks.
    pub fn new(num_layers: u32) -> Census {
        Census {
            holders: vec![0; num_layers as usize],
            throughput: vec![0.0; num_layers as usize],
        }
    }

    /// The census of `holders` (spans are cut at `num_layers`).
    pub fn of(holders: &[Holder], num_layers: u32) -> Census {
        let b = Blocks::of(holders, num_layers, None);
        Census {
            holders: b.holders,
            throughput: b.throughput,
        }
    }

    /// Counts a holder of `span` at `throughput` (the part of `span` past
    /// the census's blocks is ignored).
    pub fn add(&mut self, span: Span, throughput: f32) {
        let tp = valid(throughput);
        for b in self.blocks(span) {
            self.holders[b] += 1;
            self.throughput[b] += tp;
        }
    }

    /// Takes back a holder counted by [`add`](Census::add) with the same
    /// arguments (counts never go below 0; throughputs below 0 are
    /// clamped to 0).
    pub fn remove(&mut self, span: Span, throughput: f32) {
        let tp = valid(throughput);
        for b in self.blocks(span) {
            self.holders[b] = self.holders[b].saturating_sub(1);
            self.throughput[b] = (self.throughput[b] - tp).max(0.0);
        }
    }

    fn blocks(&self, span: Span) -> Range<usize> {
        let n = self.holders.len().min(self.throughput.len());
        (span.start as usize).min(n)..(span.end as usize).min(n)
    }
}

/// Per-block holder counts and throughputs.
#[derive(Debug)]
struct Blocks {
    holders: Vec<u32>,
    throughput: Vec<f32>,
}

impl Blocks {
    /// The blocks of `holders`, leaving out `skip`'s records.
    fn of(holders: &[Holder], num_layers: u32, skip: Option<&PeerId>) -> Blocks {
        let n = num_layers as usize;
        let mut blocks = Blocks {
            holders: vec![0; n],
            throughput: vec![0.0; n],
        };
        for h in holders.iter().filter(|h| Some(&h.peer) != skip) {
            let tp = valid(h.throughput);
            for b in h.span.start.min(num_layers)..h.span.end.min(num_layers) {
                blocks.holders[b as usize] += 1;
                blocks.throughput[b as usize] += tp;
            }
        }
        blocks
    }

    /// The best window of `len` blocks (see [`choose_span`]).
    /// Whether a block outside `span` has no holder.
    fn has_hole_outside(&self, span: Span) -> bool {
        self.holders
            .iter()
            .enumerate()
            .any(|(b, &c)| c == 0 && !span.contains(b as u32))
    }

    fn best_window(&self, len: u32, floor: u32) -> Span {
        let n = self.holders.len();
        if n == 0 {
            return Span::new(0, 0);
        }
        let len = (len as usize).clamp(1, n);
        // Keys of the best window so far and of the one being looked at;
        // reused, so a choice allocates four buffers whatever the mesh.
        let (mut best_c, mut best_t) = (Vec::with_capacity(len), Vec::with_capacity(len));
        let (mut c, mut t) = (Vec::with_capacity(len), Vec::with_capacity(len));
        let mut best = (0, self.key(0..len, floor, &mut best_c, &mut best_t));
        for start in 1..=n - len {
            let total = self.key(start..start + len, floor, &mut c, &mut t);
            let better = c
                .cmp(&best_c)
                .then_with(|| cmp_f32s(&t, &best_t))
                .then(total.cmp(&best.1))
                .is_lt();
            if better {
                best = (start, total);
                std::mem::swap(&mut c, &mut best_c);
                std::mem::swap(&mut t, &mut best_t);
            }
        }
        Span::new(best.0 as u32, (best.0 + len) as u32)
    }

    /// Fills the sorted capped counts and throughputs of `window`; returns
    /// its total holders.
    fn key(&self, window: Range<usize>, floor: u32, c: &mut Vec<u32>, t: &mut Vec<f32>) -> u64 {
        c.clear();
        c.extend(self.holders[window.clone()].iter().map(|&h| h.min(floor)));
        c.sort_unstable();
        t.clear();
        t.extend_from_slice(&self.throughput[window.clone()]);
        t.sort_unstable_by(f32::total_cmp);
        self.holders[window].iter().map(|&h| u64::from(h)).sum()
    }
}

/// A decided move.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Plan {
    to: Span,
    /// For each block of the old span (in order): the fewest holders it may
    /// keep when the old span is dropped (0 for the blocks of `to`).
    keep: Vec<u32>,
}

/// The rebalance rule for a node serving `old` at `tp`, over the blocks of
/// the others.
fn plan(others: &Blocks, old: Span, tp: f32, cfg: &Config) -> Option<Plan> {
    let n = others.holders.len() as u32;
    let to = others.best_window(old.len(), cfg.replication);
    if to == old || to.is_empty() {
        return None;
    }
    let tp = valid(tp);
    let on = |span: Span, b: u32| u32::from(span.contains(b));
    let before = |b: u32| others.holders[b as usize] + on(old, b);
    let after = |b: u32| others.holders[b as usize] + on(to, b);
    let min_t = |span: Span| {
        (0..n)
            .map(|b| others.throughput[b as usize] + if span.contains(b) { tp } else { 0.0 })
            .fold(f32::INFINITY, f32::min)
    };
    let left = || (old.start..old.end.min(n)).filter(|&b| !to.contains(b));
    let m = (0..n).map(before).min().unwrap_or(0);
    let repair = m < cfg.replication
        && (to.start..to.end).any(|b| !old.contains(b) && before(b) == m)
        && left().all(|b| after(b) > m);
    let balance = f64::from(min_t(old)) < f64::from(cfg.balance_quality) * f64::from(min_t(to))
        && left().all(|b| after(b) >= cfg.replication.max(1));
    (repair || balance).then(|| Plan {
        to,
        keep: (old.start..old.end)
            .map(|b| {
                if to.contains(b) || b >= n {
                    0
                } else {
                    after(b).min(cfg.replication).max(1)
                }
            })
            .collect(),
    })
}

/// Throughput as the rule counts it: non-finite or negative is 0.
fn valid(tp: f32) -> f32 {
    if tp.is_finite() { tp.max(0.0) } else { 0.0 }
}

/// Lexicographic order of two float sequences, by `total_cmp`.
fn cmp_f32s(a: &[f32], b: &[f32]) -> Ordering {
    a.iter()
        .zip(b)
        .map(|(x, y)| x.total_cmp(y))
        .find(|o| o.is_ne())
        .unwrap_or(a.len().cmp(&b.len()))
}

/// Maximal runs of blocks whose count satisfies `pred`.
fn runs(counts: &[u32], pred: impl Fn(u32) -> bool) -> Vec<Span> {
    let mut out: Vec<Span> = Vec::new();
    for (b, _) in counts.iter().enumerate().filter(|(_, c)| pred(**c)) {
        let b = b as u32;
        match out.last_mut() {
            Some(run) if run.end == b => run.end = b + 1,
            _ => out.push(Span::new(b, b + 1)),
        }
    }
    out
}

/// What happened.
#[derive(Debug)]
pub enum Event<'a> {
    /// The node starts (once).
    Start,
    /// The time asked for by the last [`Action::WakeAt`] came.
    Woke,
    /// The answer to [`Action::Discover`]: every live holder known, the
    /// node itself included or not (its records are ignored: the machine
    /// knows what it serves).
    Records {
        /// The holders.
        holders: &'a [Holder],
    },
    /// The weights of [`Action::Load`]'s span are loaded.
    Loaded {
        /// The span.
        span: Span,
    },
    /// Loading [`Action::Load`]'s span failed; nothing of it is held.
    LoadFailed {
        /// The span.
        span: Span,
    },
}

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send [`Event::Woke`] at this time.
    WakeAt(Instant),
    /// Fetch the mesh's records, then send [`Event::Records`].
    Discover,
    /// Load the weights of `span`, still serving the current one; then send
    /// [`Event::Loaded`] or [`Event::LoadFailed`].
    Load {
        /// The blocks.
        span: Span,
    },
    /// Announce and serve `span`, just loaded.
    Serve {
        /// The blocks.
        span: Span,
    },
    /// Stop serving `span` (its open sessions finish or fail over) and
    /// free it.
    Drop {
        /// The blocks.
        span: Span,
    },
    /// Free `span`, loaded but never served: the move was aborted.
    Unload {
        /// The blocks.
        span: Span,
    },
}

/// What the machine waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Not started.
    Idle,
    /// For [`Event::Woke`].
    Sleeping,
    /// For the records of a placement or a check.
    Discovering,
    /// For the new span's weights.
    Loading(Plan),
    /// For fresh records before dropping the old span.
    Confirming(Plan),
}

/// One node's placement: where it serves and when it moves (see the
/// [module docs](self)).
#[derive(Debug)]
pub struct Placement {
    cfg: Config,
    me: PeerId,
    throughput: f32,
    num_layers: u32,
    len: u32,
    span: Option<Span>,
    phase: Phase,
    arrived: Option<Instant>,
    moves: u32,
    rng: u64,
}

impl Placement {
    /// The placement of node `me`, whose `throughput` is tokens/s through
    /// `len` blocks (clamped to `1..=num_layers`) of a model with
    /// `num_layers` blocks; `seed` drives the timers' jitter.
    ///
    /// # Panics
    /// If `num_layers` is 0.
    pub fn new(
        cfg: Config,
        me: PeerId,
        throughput: f32,
        num_layers: u32,
        len: u32,
        seed: u64,
    ) -> Placement {
        assert!(num_layers > 0, "a model has at least one block");
        // splitmix64, so that nearby seeds give unrelated timers.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Placement {
            cfg,
            me,
            throughput,
            num_layers,
            len: len.clamp(1, num_layers),
            span: None,
            phase: Phase::Idle,
            arrived: None,
            moves: 0,
            rng: (z ^ (z >> 31)) | 1,
        }
    }

    /// The span served, once placed.
    pub fn span(&self) -> Option<Span> {
        self.span
    }

    /// The span being loaded or confirmed, while a placement or move is
    /// under way.
    pub fn moving_to(&self) -> Option<Span> {
        match &self.phase {
            Phase::Loading(p) | Phase::Confirming(p) => Some(p.to),
            _ => None,
        }
    }

    /// Moves completed (the first placement is not one).
    pub fn moves(&self) -> u32 {
        self.moves
    }

    /// Adopts a replication floor announced in the mesh's records, if it is
    /// higher than the node's own (the floor is a mesh-wide setting: the
    /// highest announced wins).
    pub fn raise_replication(&mut self, replication: u32) {
        self.cfg.replication = self.cfg.replication.max(replication);
    }

    /// The replication floor in force.
    pub fn replication(&self) -> u32 {
        self.cfg.replication
    }

    /// Updates the node's measured throughput, used from the next check on.
    pub fn set_throughput(&mut self, throughput: f32) {
        self.throughput = throughput;
    }

    /// Takes an event; returns what to do. Events the machine is not
    /// waiting for (a second `Start`, a stale `Woke`, records or a load it
    /// did not ask for) are ignored.
    pub fn on_event(&mut self, now: Instant, event: Event<'_>) -> Vec<Action> {
        match (event, std::mem::replace(&mut self.phase, Phase::Sleeping)) {
            (Event::Start, Phase::Idle) => {
                let wait = self.cfg.start_jitter.mul_f64(self.uniform());
                vec![Action::WakeAt(now + wait)]
            }
            (Event::Woke, Phase::Sleeping) => {
                self.phase = Phase::Discovering;
                vec![Action::Discover]
            }
            (Event::Records { holders }, phase @ (Phase::Discovering | Phase::Confirming(_))) => {
                let others = Blocks::of(holders, self.num_layers, Some(&self.me));
                self.on_blocks(now, others, phase)
            }
            (Event::Loaded { span }, Phase::Loading(plan)) if span == plan.to => match self.span {
                None => self.arrive(now, span),
                Some(_) => {
                    self.phase = Phase::Confirming(plan);
                    vec![Action::Discover]
                }
            },
            (Event::LoadFailed { span }, Phase::Loading(plan)) if span == plan.to => {
                vec![self.next_check(now)]
            }
            (_, phase) => {
                self.phase = phase;
                Vec::new()
            }
        }
    }

    /// Takes the answer to [`Action::Discover`] as per-block aggregates of
    /// the *other* holders (the node's own records left out), instead of
    /// their records ([`Event::Records`]); returns what to do, exactly as
    /// `on_event` would for records with those aggregates. A census made
    /// for a different number of blocks is cut or padded with empty blocks.
    ///
    /// For meshes too large to hand every node every record: the aggregates
    /// can be kept per block (a DHT key per block, a simulator's counters)
    /// at a cost independent of the number of holders.
    pub fn on_census(&mut self, now: Instant, others: &Census) -> Vec<Action> {
        match std::mem::replace(&mut self.phase, Phase::Sleeping) {
            phase @ (Phase::Discovering | Phase::Confirming(_)) => {
                let n = self.num_layers as usize;
                let mut blocks = Blocks {
                    holders: others.holders.clone(),
                    throughput: others.throughput.iter().map(|&t| valid(t)).collect(),
                };
                blocks.holders.resize(n, 0);
                blocks.throughput.resize(n, 0.0);
                self.on_blocks(now, blocks, phase)
            }
            phase => {
                self.phase = phase;
                Vec::new()
            }
        }
    }

    /// The records' answer in `phase` (discovering or confirming a move),
    /// as the per-block aggregates of the other holders.
    fn on_blocks(&mut self, now: Instant, others: Blocks, phase: Phase) -> Vec<Action> {
        match phase {
            Phase::Discovering => {
                let plan = match self.span {
                    None => Some(Plan {
                        to: others.best_window(self.len, self.cfg.replication),
                        keep: Vec::new(),
                    }),
                    // Within the dwell, only a hole (a block nobody holds:
                    // an outage) is worth a move.
                    Some(old)
                        if self.arrived.is_some_and(|at| now < at + self.cfg.min_dwell)
                            && !others.has_hole_outside(old) =>
                    {
                        None
                    }
                    Some(old) => plan(&others, old, self.throughput, &self.cfg),
                };
                let Some(plan) = plan else {
                    return vec![self.next_check(now)];
                };
                let span = plan.to;
                self.phase = Phase::Loading(plan);
                vec![Action::Load { span }]
            }
            Phase::Confirming(plan) => {
                let old = self.span.expect("only a placed node moves");
                let safe = (old.start..old.end)
                    .zip(&plan.keep)
                    .all(|(b, &keep)| others.holders[b as usize] >= keep);
                if !safe {
                    return vec![Action::Unload { span: plan.to }, self.next_check(now)];
                }
                self.moves += 1;
                let mut actions = self.arrive(now, plan.to);
                actions.insert(1, Action::Drop { span: old });
                actions
            }
            phase => unreachable!("records are only taken while discovering: {phase:?}"),
        }
    }

    /// Serves `span` from `now`: `Serve`, then the next check.
    fn arrive(&mut self, now: Instant, span: Span) -> Vec<Action> {
        self.span = Some(span);
        self.arrived = Some(now);
        vec![Action::Serve { span }, self.next_check(now)]
    }

    /// When to check next: `check_period` × U[0.5, 1.5), so that nodes do
    /// not check in lockstep.
    fn next_check(&mut self, now: Instant) -> Action {
        let jitter = 0.5 + self.uniform();
        Action::WakeAt(now + self.cfg.check_period.mul_f64(jitter))
    }

    /// Uniform in [0, 1), from xorshift64: seeded by the caller, so runs
    /// are reproducible.
    fn uniform(&mut self) -> f64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use std::{
        cmp::Reverse,
        collections::{BinaryHeap, HashMap},
    };

    use proptest::prelude::*;

    use super::*;

    fn peer(seed: u8) -> PeerId {
        libp2p_identity::Keypair::ed25519_from_bytes([seed; 32])
            .expect("32 bytes")
            .public()
            .to_peer_id()
    }

    fn h(p: u8, start: u32, end: u32, throughput: f32) -> Holder {
        Holder {
            peer: peer(p),
            span: Span::new(start, end),
            throughput,
        }
    }

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn an_empty_mesh_is_served_from_block_zero() {
        assert_eq!(choose_span(&[], 30, 10, 2), Span::new(0, 10));
        // `len` is clamped to 1..=num_layers.
        assert_eq!(choose_span(&[], 5, 10, 2), Span::new(0, 5));
        assert_eq!(choose_span(&[], 5, 0, 2), Span::new(0, 1));
        assert_eq!(choose_span(&[], 0, 3, 2), Span::new(0, 0));
    }

    #[test]
    fn a_hole_is_covered() {
        let mesh = [h(1, 0, 10, 100.0), h(2, 20, 30, 100.0)];
        assert_eq!(choose_span(&mesh, 30, 10, 2), Span::new(10, 20));
        // A hole shorter than the node: the lowest window covering all of it.
        let mesh = [h(1, 0, 12, 100.0), h(2, 18, 30, 100.0)];
        assert_eq!(choose_span(&mesh, 30, 10, 2), Span::new(8, 18));
        // A node longer than the hole still covers it.
        let mesh = [h(1, 0, 25, 100.0)];
        assert_eq!(choose_span(&mesh, 30, 10, 1), Span::new(20, 30));
    }

    #[test]
    fn ties_go_to_fewer_holders_then_the_lowest_start() {
        // Same throughput everywhere (two nodes of 50 or one of 100).
        let mesh = [h(1, 0, 5, 50.0), h(2, 0, 5, 50.0), h(3, 5, 10, 100.0)];
        assert_eq!(choose_span(&mesh, 10, 5, 1), Span::new(5, 10));
        let mesh = [h(1, 0, 5, 100.0), h(3, 5, 10, 100.0)];
        assert_eq!(choose_span(&mesh, 10, 5, 1), Span::new(0, 5));
    }

    #[test]
    fn blocks_under_the_floor_beat_low_throughput() {
        // 0..10: one fast holder; 10..20: two slow ones.
        let mesh = [h(1, 0, 10, 1000.0), h(2, 10, 20, 10.0), h(3, 10, 20, 10.0)];
        assert_eq!(choose_span(&mesh, 20, 10, 2), Span::new(0, 10));
        // Without a floor, Petals' rule: the weakest throughput.
        assert_eq!(choose_span(&mesh, 20, 10, 1), Span::new(10, 20));
        // A block without holder counts more than blocks with one.
        let mesh = [h(1, 0, 4, 10.0), h(2, 5, 10, 10.0)];
        assert_eq!(choose_span(&mesh, 10, 1, 2), Span::new(4, 5));
    }

    #[test]
    fn coverage_queries() {
        let mesh = [
            h(1, 0, 10, 100.0),
            h(2, 0, 10, f32::NAN),
            h(3, 10, 20, 50.0),
            h(4, 25, 40, 10.0),
        ];
        let counts = holders_per_block(&mesh, 30);
        assert_eq!(
            (counts[0], counts[10], counts[20], counts[29]),
            (2, 1, 0, 1)
        );
        let tp = block_throughput(&mesh, 30);
        assert_eq!((tp[0], tp[10], tp[20], tp[29]), (100.0, 50.0, 0.0, 10.0));
        assert_eq!(
            under_floor(&mesh, 30, 2),
            [Span::new(10, 30)],
            "runs are maximal"
        );
        assert_eq!(uncovered(&mesh, 30), [Span::new(20, 25)]);
        assert!(under_floor(&mesh, 30, 0).is_empty());
    }

    fn me(start: u32, end: u32, throughput: f32) -> Holder {
        h(9, start, end, throughput)
    }

    #[test]
    fn repair_moves_an_extra_holder_into_a_hole() {
        let cfg = Config::default();
        let others = [h(1, 0, 10, 100.0), h(2, 0, 10, 100.0), h(3, 10, 20, 100.0)];
        let target = move_target(&others, &me(0, 10, 100.0), 30, &cfg);
        assert_eq!(target, Some(Span::new(20, 30)));
        // The records may list the node itself, even on a stale span.
        let with_me = [&others[..], &[me(5, 15, 1.0), me(0, 10, 100.0)]].concat();
        assert_eq!(move_target(&with_me, &me(0, 10, 100.0), 30, &cfg), target);
    }

    #[test]
    fn repair_never_leaves_a_block_without_holder() {
        let cfg = Config::default();
        // The only holder of 20..30 does not jump into the hole 0..10
        // (which `choose_span` prefers: both look empty without it).
        let others = [h(3, 10, 20, 100.0)];
        assert_eq!(choose_span(&others, 30, 10, 2), Span::new(0, 10));
        assert_eq!(move_target(&others, &me(20, 30, 100.0), 30, &cfg), None);
    }

    #[test]
    fn repair_does_not_swap_one_weak_block_for_another() {
        let cfg = Config {
            replication: 3,
            ..Config::default()
        };
        // 0..10 has 2 holders, 10..20 one (and slow, so `choose_span`
        // prefers it): moving would only swap them.
        let others = [h(1, 0, 10, 100.0), h(3, 10, 20, 10.0)];
        assert_eq!(choose_span(&others, 20, 10, 3), Span::new(10, 20));
        assert_eq!(move_target(&others, &me(0, 10, 100.0), 20, &cfg), None);
        // With a third holder on 0..10 the move raises 10..20 to 2 and
        // leaves 0..10 with 2: allowed.
        let others = [h(1, 0, 10, 100.0), h(2, 0, 10, 100.0), h(3, 10, 20, 1.0)];
        assert_eq!(
            move_target(&others, &me(0, 10, 100.0), 20, &cfg),
            Some(Span::new(10, 20))
        );
    }

    #[test]
    fn balance_moves_only_for_a_large_enough_gain() {
        let cfg = Config {
            replication: 1,
            ..Config::default()
        };
        // me + A on 0..10 (200 tokens/s); B alone on 10..20 (x). Moving
        // gives min 100: old_min / new_min = x / 100 must be below 0.75.
        let mesh = |x| [h(1, 0, 10, 100.0), h(2, 10, 20, x)];
        let at = |x| move_target(&mesh(x), &me(0, 10, 100.0), 20, &cfg);
        assert_eq!(at(74.0), Some(Span::new(10, 20)));
        assert_eq!(at(75.0), None);
        // With a floor of 2 the move would leave 0..10 under it.
        let cfg = Config::default();
        assert_eq!(move_target(&mesh(1.0), &me(0, 10, 100.0), 20, &cfg), None);
    }

    #[test]
    fn the_span_held_is_never_a_move() {
        let cfg = Config::default();
        assert_eq!(move_target(&[], &me(0, 10, 100.0), 30, &cfg), None);
        let others = [h(1, 0, 10, 1.0), h(2, 10, 20, 1.0)];
        assert_eq!(move_target(&others, &me(20, 30, 1.0), 30, &cfg), None);
    }

    /// A machine placed on `span` (by records that make it the choice).
    fn placed(cfg: Config, records: &[Holder], span: Span) -> (Placement, Instant) {
        let mut p = Placement::new(cfg, peer(9), 100.0, 30, 10, 3);
        let t0 = Instant::now();
        let [Action::WakeAt(at)] = p.on_event(t0, Event::Start)[..] else {
            panic!("start waits")
        };
        assert!(at >= t0 && at < t0 + Config::default().start_jitter);
        assert_eq!(p.on_event(at, Event::Woke), [Action::Discover]);
        let load = p.on_event(at, Event::Records { holders: records });
        assert_eq!(load, [Action::Load { span }]);
        assert_eq!((p.span(), p.moving_to()), (None, Some(span)));
        match &p.on_event(at, Event::Loaded { span })[..] {
            [Action::Serve { span: s }, Action::WakeAt(next)] => {
                assert_eq!(*s, span);
                assert!(*next >= at + MIN / 2 && *next < at + MIN * 3 / 2);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!((p.span(), p.moving_to(), p.moves()), (Some(span), None, 0));
        (p, at)
    }

    #[test]
    fn first_placement_loads_then_serves() {
        let records = [h(1, 0, 10, 100.0)];
        placed(Config::default(), &records, Span::new(10, 20));
        // Events it did not ask for change nothing.
        let mut p = Placement::new(Config::default(), peer(9), 100.0, 30, 10, 3);
        let now = Instant::now();
        assert!(p.on_event(now, Event::Woke).is_empty());
        assert!(
            p.on_event(now, Event::Records { holders: &records })
                .is_empty()
        );
        assert_eq!(p.on_event(now, Event::Start).len(), 1);
        assert!(p.on_event(now, Event::Start).is_empty());
    }

    /// Checks after the dwell: the mesh has a hole and three holders of 0..10.
    fn ready_to_move() -> (Placement, Instant, [Holder; 3]) {
        let cfg = Config::default();
        let (mut p, at) = placed(cfg.clone(), &[], Span::new(0, 10));
        let others = [h(1, 0, 10, 100.0), h(2, 0, 10, 100.0), h(3, 10, 20, 100.0)];
        // Within the dwell a check moves only to fill a hole.
        let early = at + cfg.min_dwell - Duration::from_secs(1);
        assert_eq!(p.on_event(early, Event::Woke), [Action::Discover]);
        let no_hole = [
            others[0].clone(),
            others[1].clone(),
            others[2].clone(),
            h(4, 20, 30, 1.0),
        ];
        assert!(matches!(
            p.on_event(early, Event::Records { holders: &no_hole })[..],
            [Action::WakeAt(_)]
        ));
        let now = at + cfg.min_dwell;
        assert_eq!(p.on_event(now, Event::Woke), [Action::Discover]);
        let load = p.on_event(now, Event::Records { holders: &others });
        assert_eq!(
            load,
            [Action::Load {
                span: Span::new(20, 30)
            }]
        );
        assert_eq!(
            p.span(),
            Some(Span::new(0, 10)),
            "serves the old span meanwhile"
        );
        let span = Span::new(20, 30);
        assert_eq!(p.on_event(now, Event::Loaded { span }), [Action::Discover]);
        (p, now, others)
    }

    #[test]
    fn a_hole_is_repaired_even_within_the_dwell() {
        let cfg = Config::default();
        let (mut p, at) = placed(cfg.clone(), &[], Span::new(0, 10));
        let soon = at + Duration::from_secs(1);
        let others = [h(1, 0, 10, 100.0), h(3, 10, 20, 100.0)];
        assert_eq!(p.on_event(soon, Event::Woke), [Action::Discover]);
        assert_eq!(
            p.on_event(soon, Event::Records { holders: &others }),
            [Action::Load {
                span: Span::new(20, 30)
            }]
        );
    }

    #[test]
    fn a_move_loads_then_looks_again_then_serves_and_drops() {
        let (mut p, now, others) = ready_to_move();
        match &p.on_event(now, Event::Records { holders: &others })[..] {
            [
                Action::Serve { span: new },
                Action::Drop { span: old },
                Action::WakeAt(_),
            ] => {
                assert_eq!((*new, *old), (Span::new(20, 30), Span::new(0, 10)));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            (p.span(), p.moving_to(), p.moves()),
            (Some(Span::new(20, 30)), None, 1)
        );
        // The dwell starts again on arrival: with no hole, no move.
        let soon = now + Duration::from_secs(200);
        assert_eq!(p.on_event(soon, Event::Woke), [Action::Discover]);
        assert!(matches!(
            p.on_event(soon, Event::Records { holders: &others })[..],
            [Action::WakeAt(_)]
        ));
    }

    #[test]
    fn a_move_is_aborted_when_others_moved_meanwhile() {
        // One of the other holders of 0..10 left: dropping would leave one
        // holder where the plan kept two.
        for fresh in [
            vec![h(2, 0, 10, 100.0), h(3, 10, 20, 100.0)],
            vec![h(3, 10, 20, 100.0), h(4, 20, 30, 100.0)],
        ] {
            let (mut p, now, _) = ready_to_move();
            match &p.on_event(now, Event::Records { holders: &fresh })[..] {
                [Action::Unload { span }, Action::WakeAt(_)] => {
                    assert_eq!(*span, Span::new(20, 30));
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(
                (p.span(), p.moving_to(), p.moves()),
                (Some(Span::new(0, 10)), None, 0)
            );
        }
    }

    #[test]
    fn a_failed_load_keeps_the_old_span_and_retries_later() {
        let cfg = Config::default();
        let (mut p, at) = placed(cfg.clone(), &[], Span::new(0, 10));
        let others = [h(1, 0, 10, 100.0), h(2, 0, 10, 100.0)];
        let now = at + cfg.min_dwell;
        p.on_event(now, Event::Woke);
        assert_eq!(
            p.on_event(now, Event::Records { holders: &others }),
            [Action::Load {
                span: Span::new(10, 20)
            }]
        );
        let span = Span::new(10, 20);
        let retry = p.on_event(now, Event::LoadFailed { span });
        assert!(matches!(retry[..], [Action::WakeAt(_)]));
        assert_eq!((p.span(), p.moving_to()), (Some(Span::new(0, 10)), None));
        assert!(p.on_event(now, Event::Loaded { span }).is_empty(), "stale");
        assert_eq!(p.on_event(now, Event::Woke), [Action::Discover]);
    }

    /// What the driver owes a machine, and when.
    #[derive(Debug)]
    enum Pending {
        Woke,
        /// Records taken when asked (`Some`), or when delivered.
        Records(Option<Vec<Holder>>),
        Loaded(Span),
    }

    #[derive(Debug)]
    struct Node {
        m: Placement,
        peer: PeerId,
        throughput: f32,
        alive: bool,
        /// The last records it got.
        seen: Vec<Holder>,
    }

    /// A deterministic mesh in virtual time: machines, the shared record
    /// table, and deliveries in time order.
    #[derive(Debug)]
    struct Sim {
        cfg: Config,
        num_layers: u32,
        now: Instant,
        nodes: Vec<Node>,
        table: Vec<Holder>,
        queue: BinaryHeap<Reverse<(Instant, u64)>>,
        pending: HashMap<u64, (usize, Pending)>,
        seq: u64,
        load_delay: Duration,
        discover_delay: Duration,
        seed: u64,
        /// Drops that left a block of the table without holder.
        uncovering_drops: u32,
        /// Drops that the node's last records showed would leave a block
        /// without holder.
        unsafe_drops: u32,
    }

    impl Sim {
        fn new(cfg: Config, num_layers: u32, load_delay: Duration, seed: u64) -> Sim {
            Sim {
                cfg,
                num_layers,
                now: Instant::now(),
                nodes: Vec::new(),
                table: Vec::new(),
                queue: BinaryHeap::new(),
                pending: HashMap::new(),
                seq: 0,
                load_delay,
                discover_delay: Duration::ZERO,
                seed,
                uncovering_drops: 0,
                unsafe_drops: 0,
            }
        }

        fn join(&mut self, len: u32, throughput: f32) -> usize {
            let i = self.nodes.len();
            let peer = peer(u8::try_from(i + 1).expect("fewer than 255 nodes"));
            let seed = self.seed ^ i as u64;
            let m = Placement::new(
                self.cfg.clone(),
                peer,
                throughput,
                self.num_layers,
                len,
                seed,
            );
            self.nodes.push(Node {
                m,
                peer,
                throughput,
                alive: true,
                seen: Vec::new(),
            });
            let actions = self.nodes[i].m.on_event(self.now, Event::Start);
            self.apply(i, actions);
            i
        }

        /// SIGKILL: the node stops and its records disappear.
        fn kill(&mut self, i: usize) {
            self.nodes[i].alive = false;
            let p = self.nodes[i].peer;
            self.table.retain(|h| h.peer != p);
        }

        fn at(&mut self, at: Instant, i: usize, what: Pending) {
            self.seq += 1;
            self.queue.push(Reverse((at, self.seq)));
            self.pending.insert(self.seq, (i, what));
        }

        fn run_for(&mut self, d: Duration) {
            let until = self.now + d;
            while let Some(&Reverse((at, seq))) = self.queue.peek() {
                if at > until {
                    break;
                }
                self.queue.pop();
                self.now = at;
                let (i, what) = self.pending.remove(&seq).expect("scheduled");
                if !self.nodes[i].alive {
                    continue;
                }
                let now = self.now;
                let node = &mut self.nodes[i];
                let actions = match what {
                    Pending::Woke => node.m.on_event(now, Event::Woke),
                    Pending::Loaded(span) => node.m.on_event(now, Event::Loaded { span }),
                    Pending::Records(records) => {
                        node.seen = records.unwrap_or_else(|| self.table.clone());
                        node.m.on_event(
                            now,
                            Event::Records {
                                holders: &node.seen,
                            },
                        )
                    }
                };
                self.apply(i, actions);
            }
            self.now = until;
        }

        fn apply(&mut self, i: usize, actions: Vec<Action>) {
            let now = self.now;
            for action in actions {
                let (p, tp) = (self.nodes[i].peer, self.nodes[i].throughput);
                match action {
                    Action::WakeAt(at) => self.at(at, i, Pending::Woke),
                    Action::Discover => {
                        let snapshot = (!self.discover_delay.is_zero()).then(|| self.table.clone());
                        self.at(now + self.discover_delay, i, Pending::Records(snapshot));
                    }
                    Action::Load { span } => {
                        self.at(now + self.load_delay, i, Pending::Loaded(span))
                    }
                    Action::Serve { span } => self.table.push(Holder {
                        peer: p,
                        span,
                        throughput: tp,
                    }),
                    Action::Drop { span } => {
                        let node = &self.nodes[i];
                        let mut seen: Vec<Holder> =
                            node.seen.iter().filter(|h| h.peer != p).cloned().collect();
                        seen.extend(node.m.span().map(|span| Holder {
                            peer: p,
                            span,
                            throughput: tp,
                        }));
                        let seen = holders_per_block(&seen, self.num_layers);
                        self.unsafe_drops += u32::from(span.range().any(|b| seen[b] == 0));
                        let before = self.counts();
                        self.table.retain(|h| !(h.peer == p && h.span == span));
                        let after = self.counts();
                        self.uncovering_drops +=
                            u32::from(span.range().any(|b| before[b] > 0 && after[b] == 0));
                    }
                    Action::Unload { span } => {
                        assert!(!self.table.iter().any(|h| h.peer == p && h.span == span));
                    }
                }
            }
        }

        fn counts(&self) -> Vec<u32> {
            holders_per_block(&self.table, self.num_layers)
        }

        fn sorted_counts(&self) -> Vec<u32> {
            let mut c = self.counts();
            c.sort_unstable();
            c
        }

        fn moves(&self) -> u32 {
            self.nodes.iter().map(|n| n.m.moves()).sum()
        }

        fn serving(&self, span: Span) -> Vec<usize> {
            (0..self.nodes.len())
                .filter(|&i| self.nodes[i].alive && self.nodes[i].m.span() == Some(span))
                .collect()
        }
    }

    #[test]
    fn six_nodes_pair_up_and_survivors_restore_coverage() {
        // Loading takes longer than the start jitter: the nodes start
        // blind to each other and sort it out by moving.
        let mut sim = Sim::new(Config::default(), 30, Duration::from_secs(5), 1);
        for _ in 0..6 {
            sim.join(10, 100.0);
        }
        sim.run_for(30 * MIN);
        assert_eq!(sim.counts(), [2; 30]);
        let settled = sim.moves();

        // One SIGKILL: its twin still serves its blocks. 5 × 10 < 2 × 30,
        // so the best the survivors can do is 20 blocks with 2 holders and
        // 10 with 1; that is what they keep, without moving.
        let twins = sim.serving(Span::new(20, 30));
        assert_eq!(twins.len(), 2);
        sim.kill(twins[0]);
        sim.run_for(10 * MIN);
        assert_eq!(sim.sorted_counts(), [&[1; 10][..], &[2; 20]].concat());
        assert_eq!(sim.moves(), settled);

        // The second SIGKILL leaves a hole; a survivor of a doubled span
        // fills it within three check periods (their dwell is long past).
        sim.kill(twins[1]);
        assert_eq!(uncovered(&sim.table, 30), [Span::new(20, 30)]);
        let mut periods = 0;
        while !uncovered(&sim.table, 30).is_empty() {
            assert!(periods < 3, "still uncovered: {:?}", sim.counts());
            sim.run_for(MIN);
            periods += 1;
        }
        sim.run_for(20 * MIN);
        assert_eq!(sim.sorted_counts(), [&[1; 20][..], &[2; 10]].concat());
        assert_eq!((sim.uncovering_drops, sim.unsafe_drops), (0, 0));
    }

    #[test]
    fn three_nodes_hold_each_block_once() {
        let mut sim = Sim::new(Config::default(), 30, Duration::from_secs(5), 2);
        for _ in 0..3 {
            sim.join(10, 100.0);
        }
        sim.run_for(30 * MIN);
        assert_eq!(sim.counts(), [1; 30]);
        assert_eq!((sim.uncovering_drops, sim.unsafe_drops), (0, 0));
        // Started apart (no concurrent loads), they never move.
        let mut sim = Sim::new(Config::default(), 30, Duration::from_secs(5), 2);
        for _ in 0..3 {
            sim.join(10, 100.0);
            sim.run_for(MIN);
        }
        sim.run_for(30 * MIN);
        assert_eq!((sim.counts(), sim.moves()), (vec![1; 30], 0));
    }

    #[test]
    fn a_settled_mesh_does_not_flap() {
        // Unequal nodes, so balance moves happen too.
        let nodes = [
            (10, 100.0),
            (10, 250.0),
            (8, 80.0),
            (12, 400.0),
            (10, 150.0),
            (6, 60.0),
            (10, 120.0),
            (9, 30.0),
        ];
        let mut sim = Sim::new(Config::default(), 30, Duration::from_secs(20), 3);
        for (len, tp) in nodes {
            sim.join(len, tp);
        }
        sim.run_for(120 * MIN);
        let (settled, table) = (sim.moves(), sim.table.clone());
        assert!(uncovered(&table, 30).is_empty());
        sim.run_for(50 * MIN);
        assert_eq!(sim.moves(), settled, "moves after settling");
        assert_eq!(sim.table, table);
        assert_eq!((sim.uncovering_drops, sim.unsafe_drops), (0, 0));
    }

    #[test]
    fn a_census_counts_what_the_records_hold() {
        let mesh = [
            h(1, 0, 10, 100.0),
            h(2, 5, 40, f32::NAN),
            h(3, 10, 20, -3.0),
        ];
        let c = Census::of(&mesh, 30);
        assert_eq!(c.holders, holders_per_block(&mesh, 30));
        assert_eq!(c.throughput, block_throughput(&mesh, 30));
        // Built by hand, and taken apart again.
        let mut built = Census::new(30);
        for x in &mesh {
            built.add(x.span, x.throughput);
        }
        assert_eq!(built, c);
        for x in &mesh {
            built.remove(x.span, x.throughput);
        }
        assert_eq!(built, Census::new(30));
        // Never below zero.
        built.remove(Span::new(0, 3), 5.0);
        assert_eq!(built, Census::new(30));
    }

    #[test]
    fn a_census_of_another_size_is_cut_or_padded() {
        let me = peer(9);
        let mut p = Placement::new(Config::default(), me, 100.0, 30, 10, 1);
        let t = Instant::now();
        p.on_event(t, Event::Start);
        p.on_event(t, Event::Woke);
        // Blocks 0..10 held; the rest missing from a 10-block census.
        let mut c = Census::new(10);
        c.add(Span::new(0, 10), 50.0);
        assert_eq!(
            p.on_census(t, &c),
            [Action::Load {
                span: Span::new(10, 20)
            }]
        );
        // Not waiting for records: ignored.
        assert!(p.on_census(t, &c).is_empty());
    }

    fn peers() -> Vec<PeerId> {
        (1..=5).map(peer).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Whatever the records say from one look to the next (others
        /// joining, leaving, moving concurrently), a `Drop` never leaves a
        /// block without holder by the records the node last saw, and the
        /// machine only serves what it loaded and drops what it served.
        #[test]
        fn a_drop_never_uncovers_a_block_by_the_last_records(
            num_layers in 1u32..16,
            len in 1u32..16,
            replication in 0u32..4,
            looks in proptest::collection::vec(
                (
                    proptest::collection::vec((0usize..5, 0u32..16, 1u32..16, 0f32..300.0), 0..8),
                    any::<bool>(),
                    0usize..3,
                ),
                1..48,
            ),
            failures in proptest::collection::vec(any::<bool>(), 32),
            seed in any::<u64>(),
        ) {
            let peers = peers();
            let me = peers[0];
            let cfg = Config { replication, min_dwell: Duration::ZERO, ..Config::default() };
            let mut p = Placement::new(cfg, me, 100.0, num_layers, len, seed);
            let mut now = Instant::now();
            let mut actions = p.on_event(now, Event::Start);
            let (mut looks, mut failures) = (looks.iter(), failures.iter().cycle());
            let mut seen: Vec<Holder> = Vec::new();
            let (mut served, mut loaded) = (None, None);
            loop {
                let mut next = None;
                for action in actions {
                    match action {
                        Action::WakeAt(at) => { now = at; next = Some(Pending::Woke) }
                        Action::Discover => next = Some(Pending::Records(None)),
                        Action::Load { span } => { loaded = Some(span); next = Some(Pending::Loaded(span)) }
                        Action::Serve { span } => {
                            prop_assert_eq!(Some(span), loaded);
                            prop_assert_eq!(p.span(), Some(span));
                        }
                        Action::Drop { span } => {
                            prop_assert_eq!(Some(span), served);
                            let now_serving = p.span().expect("serves something after a drop");
                            prop_assert_ne!(now_serving, span);
                            let mut after: Vec<Holder> =
                                seen.iter().filter(|h| h.peer != me).cloned().collect();
                            after.push(Holder { peer: me, span: now_serving, throughput: 1.0 });
                            let counts = holders_per_block(&after, num_layers);
                            prop_assert!(span.range().all(|b| counts[b] > 0),
                                "dropping {} with {:?}", span, counts);
                        }
                        Action::Unload { span } => {
                            prop_assert_eq!(Some(span), loaded);
                            prop_assert_ne!(p.span(), Some(span));
                        }
                    }
                }
                served = p.span();
                actions = match next {
                    Some(Pending::Woke) => p.on_event(now, Event::Woke),
                    Some(Pending::Records(_)) => {
                        let Some((look, unchanged, twins)) = looks.next() else { break };
                        // Half the time the mesh did not change since the
                        // last look; otherwise random holders, and maybe
                        // others on the node's own span (which invites a
                        // move away from it).
                        if !unchanged {
                            let twins = p.span().into_iter().flat_map(|span| {
                                peers[1..=*twins].iter().map(move |&peer| Holder {
                                    peer,
                                    span,
                                    throughput: 100.0,
                                })
                            });
                            seen = look
                                .iter()
                                .map(|&(i, start, len, throughput)| Holder {
                                    peer: peers[i],
                                    span: Span::new(start, start + len),
                                    throughput,
                                })
                                .chain(twins)
                                .collect();
                        }
                        p.on_event(now, Event::Records { holders: &seen })
                    }
                    Some(Pending::Loaded(span)) if *failures.next().expect("cycles") => {
                        p.on_event(now, Event::LoadFailed { span })
                    }
                    Some(Pending::Loaded(span)) => p.on_event(now, Event::Loaded { span }),
                    None => return Err(TestCaseError::fail("the machine stalled")),
                };
            }
        }

        /// Many nodes joining, moving concurrently and dying: no `Drop`
        /// leaves a block without holder, by the mesh when records are
        /// fresh, by the node's last records when they arrive late.
        #[test]
        fn concurrent_moves_never_uncover_a_block(
            num_layers in 2u32..24,
            nodes in proptest::collection::vec((1u32..24, 10f32..500.0, 0u64..60), 2..12),
            kills in proptest::collection::vec((0usize..12, 0u64..3600), 0..4),
            load_s in 0u64..40,
            discover_ms in prop_oneof![Just(0u64), 1u64..5000],
            dwell_s in 0u64..400,
            seed in any::<u64>(),
        ) {
            let cfg = Config { min_dwell: Duration::from_secs(dwell_s), ..Config::default() };
            let mut sim = Sim::new(cfg, num_layers, Duration::from_secs(load_s), seed);
            sim.discover_delay = Duration::from_millis(discover_ms);
            let mut events: Vec<(u64, Option<usize>, u32, f32)> = nodes
                .iter()
                .map(|&(len, tp, at)| (at, None, len, tp))
                .chain(kills.iter().map(|&(i, at)| (at, Some(i), 0, 0.0)))
                .collect();
            events.sort_by_key(|e| e.0);
            let mut t = 0;
            for (at, kill, len, tp) in events {
                sim.run_for(Duration::from_secs(at - t));
                t = at;
                match kill {
                    Some(i) if i < sim.nodes.len() => sim.kill(i),
                    Some(_) => {}
                    // Spans of up to half the model, so that nodes must share it out.
                    None => { sim.join(1 + len % num_layers.div_ceil(2), tp); }
                }
            }
            sim.run_for(120 * MIN);
            prop_assert_eq!(sim.unsafe_drops, 0);
            if discover_ms == 0 {
                prop_assert_eq!(sim.uncovering_drops, 0);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Two machines with the same seed, one given records and one the
        /// census of the others' records, take the same decisions.
        #[test]
        fn a_census_decides_as_the_records_do(
            num_layers in 1u32..16,
            len in 1u32..16,
            replication in 0u32..4,
            dwell_s in prop_oneof![Just(0u64), 1u64..600],
            looks in proptest::collection::vec(
                (
                    proptest::collection::vec((0usize..5, 0u32..16, 1u32..16, 0f32..300.0), 0..8),
                    0u64..400,
                    any::<bool>(),
                ),
                1..40,
            ),
            seed in any::<u64>(),
        ) {
            let peers = peers();
            let me = peers[0];
            let cfg = Config {
                replication,
                min_dwell: Duration::from_secs(dwell_s),
                ..Config::default()
            };
            let mut a = Placement::new(cfg.clone(), me, 100.0, num_layers, len, seed);
            let mut b = Placement::new(cfg, me, 100.0, num_layers, len, seed);
            let mut now = Instant::now();
            let mut pending = a.on_event(now, Event::Start);
            prop_assert_eq!(&pending, &b.on_event(now, Event::Start));
            for (look, wait_s, load_fails) in looks {
                now += Duration::from_secs(wait_s);
                let mut next = Vec::new();
                for action in pending {
                    let (x, y) = match action {
                        Action::WakeAt(_) => (a.on_event(now, Event::Woke), b.on_event(now, Event::Woke)),
                        Action::Discover => {
                            // The node's own records are in the list and
                            // left out of the census, as a driver would.
                            let holders: Vec<Holder> = look
                                .iter()
                                .map(|&(i, start, len, throughput)| Holder {
                                    peer: peers[i],
                                    span: Span::new(start, start + len),
                                    throughput,
                                })
                                .collect();
                            let others: Vec<Holder> =
                                holders.iter().filter(|h| h.peer != me).cloned().collect();
                            (
                                a.on_event(now, Event::Records { holders: &holders }),
                                b.on_census(now, &Census::of(&others, num_layers)),
                            )
                        }
                        Action::Load { span } if load_fails => (
                            a.on_event(now, Event::LoadFailed { span }),
                            b.on_event(now, Event::LoadFailed { span }),
                        ),
                        Action::Load { span } => (
                            a.on_event(now, Event::Loaded { span }),
                            b.on_event(now, Event::Loaded { span }),
                        ),
                        Action::Serve { .. } | Action::Drop { .. } | Action::Unload { .. } => {
                            (Vec::new(), Vec::new())
                        }
                    };
                    prop_assert_eq!(&x, &y);
                    next.extend(x);
                }
                prop_assert_eq!(a.span(), b.span());
                pending = next;
            }
        }
    }
}
