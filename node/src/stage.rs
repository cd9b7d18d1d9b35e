//! A hosted pipeline stage: its weights, and one session per request.
//!
//! [`Stage`] is the logic, usable without actix (the fuzz harness drives it
//! directly). [`StageActor`] puts it on a thread of its own as an actix
//! actor with a bounded mailbox; [`spawn`] loads the weights on that thread
//! (CUDA contexts are thread-bound) and returns the actor's address, or why
//! the stage could not start.
//!
//! # Containment
//! A stage serves strangers, so one request can never take it down:
//! [`Stage::step`] checks every field a peer sent before it reaches a tensor
//! op (the `session` module), runs the step under `catch_unwind`, and on any
//! failure drops that request's session and answers with a [`WireError`].
//! The next request is served as if nothing happened. Only when a probe
//! forward fails after a contained panic (the stage itself is broken, not
//! the request) does the actor report a fatal error, and the node withdraws
//! its record and exits.
//!
//! # Batching
//! The actor queues the steps it is sent and runs what waited as one packed
//! forward ([`Stage::step_many`]): each request keeps its own rows, cache
//! and graph, and fails, stops or panics alone (see the runtime's
//! `Model::forward_packed`).

mod session;

use std::{
    collections::{HashMap, VecDeque},
    panic::AssertUnwindSafe,
    path::PathBuf,
    time::{Duration, Instant},
};

use actix::{
    Actor, ActorContext, Addr, Arbiter, AsyncContext, Context, Handler, Message, ResponseFuture,
};
use nnmesh_graph::{Limits, Manifest};
use nnmesh_protocol::{
    PeerId, Span,
    ids::RequestId,
    message::{Carried, ErrorKind, HopOutput, Saved, StepRequest, StepTiming, WireError},
    tensor::WireTensor,
};
use tch::{Device, Kind, Tensor};
use tokio::sync::{mpsc, oneshot};

use self::session::Session;
use nnmesh_runtime::{
    engine::{Engine, EngineError},
    error::panic_message,
    execute::forward_steps,
    hooks::HookError,
    models::llama::Input,
};

/// Capacity of a stage actor's mailbox: senders wait (backpressure) beyond it.
pub const MAILBOX: usize = 16;

/// How a stage is loaded and what it admits.
#[derive(Debug, Clone)]
pub struct Config {
    /// Model file or folder.
    pub model: PathBuf,
    /// Decoder layers hosted.
    pub span: Span,
    /// Compute dtype.
    pub kind: Kind,
    /// Device.
    pub device: Device,
    /// Per-request limits.
    pub limits: Limits,
    /// Sessions unused for this long are dropped.
    pub session_ttl: Duration,
    /// Most sessions open at once; more are refused as overloaded.
    pub max_sessions: usize,
    /// Most bytes of KV cache reserved by open sessions; a session that
    /// would exceed it is refused as overloaded (live ones are never evicted).
    pub max_kv_bytes: u64,
    /// Threads torch computes with on the stage's thread (0: this
    /// machine's cores shared among the nodes running on it, see
    /// [`default_threads`]).
    pub threads: i32,
    /// Most steps run as one packed forward (1: one step at a time).
    pub max_batch: usize,
    /// A step that waited this long for its forward is refused as
    /// overloaded (its client fails over).
    pub queue_deadline: Duration,
    /// After a forward shared by several requests, how long the next one
    /// waits for their next steps to arrive (so that they stay in one
    /// batch); no wait after a forward that ran alone.
    pub batch_window: Duration,
}

impl Config {
    /// Layers `span` of the model at `model`, in f32 on the CPU, with the
    /// default limits: 64 sessions, 2 GiB of KV cache, a 10-minute session
    /// TTL, batches of up to 32 steps that wait at most 30 s, a 2 ms batch
    /// window.
    pub fn new(model: PathBuf, span: Span) -> Config {
        Config {
            model,
            span,
            kind: Kind::Float,
            device: Device::Cpu,
            limits: Limits::default(),
            session_ttl: Duration::from_secs(600),
            max_sessions: 64,
            max_kv_bytes: 2 << 30,
            threads: 0,
            max_batch: 32,
            queue_deadline: Duration::from_secs(30),
            batch_window: Duration::from_millis(2),
        }
    }
}

/// Torch threads for a node not given `--threads`: this machine's cores
/// shared evenly among the nnmesh nodes running on it, at least one each.
/// One node alone computes with every core; several on one machine do not
/// thrash each other's thread pools. A stage re-reads it every few seconds,
/// so nodes started or stopped later are accounted for.
pub fn default_threads() -> i32 {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let share = cores / nodes_on_this_machine().max(1);
    i32::try_from(share.max(1)).unwrap_or(i32::MAX)
}

/// How many `nnmesh node` processes run on this machine (from `/proc`;
/// 1 where there is none to read).
fn nodes_on_this_machine() -> usize {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return 1;
    };
    procs
        .flatten()
        .filter(|p| {
            p.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter(|p| std::fs::read(p.path().join("cmdline")).is_ok_and(|c| is_node_command(&c)))
        .count()
}

/// Whether a NUL-separated command line is `…/nnmesh node …`.
fn is_node_command(cmdline: &[u8]) -> bool {
    let mut args = cmdline.split(|&b| b == 0);
    let program = args.next().unwrap_or_default();
    let name = program.rsplit(|&b| b == b'/').next().unwrap_or_default();
    name == b"nnmesh" && args.next() == Some(b"node".as_slice())
}

/// What one step produced on this stage.
#[derive(Debug)]
pub struct StepOutput {
    /// What happens next: the next hop's input, or the end of the step.
    pub next: Next,
    /// Values the next hop needs.
    pub carry: Vec<Carried>,
    /// Values saved here, for the client.
    pub saves: Vec<Saved>,
    /// Values an earlier stage needs in a later step or trace: sent to the
    /// client, which hands them to the first stage with its next step.
    pub relay: Vec<Carried>,
    /// The outputs of the steps replayed first, when the request asked.
    pub replayed: Vec<HopOutput>,
    /// How many replayed steps ran together in one forward (generated
    /// tokens this hop has no intervention at).
    pub chunked: u32,
    /// How the step's time on the stage was spent.
    pub timing: StepTiming,
}

impl StepOutput {
    /// What the next hop gets from this one.
    pub fn output(&self) -> HopOutput {
        HopOutput {
            hidden: match &self.next {
                Next::Hidden(h) => Some(h.clone()),
                Next::Stopped | Next::Done(_) => None,
            },
            carry: self.carry.clone(),
        }
    }
}

/// Where a step goes after this stage.
#[derive(Debug)]
pub enum Next {
    /// The hidden state for the next hop.
    Hidden(WireTensor),
    /// The graph stopped the forward at or before this stage; later hops
    /// still run the nodes placed on them (applies, ops, saves) without a
    /// forward.
    Stopped,
    /// This was the last hop: the step is done. The greedy next token of
    /// each row when the trace generates further, else empty.
    Done(Vec<u32>),
}

/// A session's key: the request, and the first layer of its hop.
type Key = (RequestId, u32);

/// A pipeline stage: the model's layers `layers` and the sessions of the
/// requests running through them.
pub struct Stage {
    engine: Engine,
    manifest: Manifest,
    limits: Limits,
    ttl: Duration,
    max_sessions: usize,
    max_kv_bytes: u64,
    /// Open sessions by request and the first layer of the hop: after a
    /// fail-over one node may run two parts of a request's route.
    sessions: HashMap<Key, Session>,
    throughput: f32,
    panics: u64,
}

impl std::fmt::Debug for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stage")
            .field("layers", &self.engine.model.layers())
            .field("sessions", &self.sessions.len())
            .finish_non_exhaustive()
    }
}

fn err(kind: ErrorKind, msg: impl Into<String>) -> WireError {
    WireError::new(kind, msg)
}

/// Runs `f`, turning a panic into an [`ErrorKind::Internal`] error.
fn contain<T>(what: &str, f: impl FnOnce() -> Result<T, WireError>) -> Result<T, WireError> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        Err(err(
            ErrorKind::Internal,
            format!("{what} failed: {}", panic_message(payload.as_ref())),
        ))
    })
}

impl Stage {
    /// Loads the stage (on the calling thread: call it on the thread that
    /// will run it).
    ///
    /// # Errors
    /// When the model cannot be loaded.
    pub fn load(cfg: &Config) -> Result<Stage, EngineError> {
        let engine = Engine::load(&cfg.model, Some(cfg.span.range()), cfg.kind, cfg.device)?;
        Ok(Stage::new(engine, cfg))
    }

    /// A stage over an already loaded engine (`cfg.model`, `span`, `kind`
    /// and `device` are not used).
    pub fn new(engine: Engine, cfg: &Config) -> Stage {
        let manifest = engine.manifest();
        let throughput = measure_throughput(&engine);
        Stage {
            engine,
            manifest,
            limits: cfg.limits.clone(),
            ttl: cfg.session_ttl,
            max_sessions: cfg.max_sessions,
            max_kv_bytes: cfg.max_kv_bytes,
            sessions: HashMap::new(),
            throughput,
            panics: 0,
        }
    }

    /// Tokens per second through this stage, measured at load (a 64-token prefill).
    pub fn throughput(&self) -> f32 {
        self.throughput
    }

    /// The model manifest (module tree, shapes).
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The per-request limits this stage enforces.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Open sessions.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Bytes of KV cache reserved by the open sessions.
    pub fn kv_reserved(&self) -> u64 {
        self.sessions.values().map(Session::kv_bytes).sum()
    }

    /// Panics caught (and contained) so far.
    pub fn panics(&self) -> u64 {
        self.panics
    }

    /// Runs one step of a request, creating its session at its first step.
    ///
    /// Refusals that do not concern the session's own progress (a step of
    /// another client's request, a repeated or skipped step, a full node)
    /// leave an existing session as it is; any failure while running the
    /// step drops the session, whose KV cache may be half-written.
    ///
    /// # Errors
    /// A [`WireError`] naming what was wrong; [`ErrorKind::Internal`] for a
    /// failure (or a caught panic) inside the step.
    pub fn step(&mut self, req: &StepRequest) -> Result<StepOutput, WireError> {
        let key = self.admit(req)?;
        let Stage {
            engine,
            manifest,
            sessions,
            ..
        } = self;
        let session = sessions
            .get_mut(&key)
            .expect("the session was found or opened above");
        let out = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let _guard = tch::no_grad_guard();
            session.run(engine, manifest, req)
        }));
        let out = match out {
            Ok(out) => out,
            Err(payload) => {
                session.panics += 1;
                Err(err(
                    ErrorKind::Internal,
                    format!(
                        "trace {} step {} failed on this stage: {}",
                        req.input.trace,
                        req.input.step,
                        panic_message(payload.as_ref())
                    ),
                ))
            }
        };
        if out.is_err() {
            self.drop_session(key);
        }
        out
    }

    /// Runs several requests' steps, as one packed forward where they can
    /// share it: steps without a replay, one per session, grouped by the
    /// layers they run. Each result is what [`Stage::step`] gives the step
    /// alone, up to the rounding of a matrix product over more rows: every
    /// request keeps its own rows, positions, KV cache and graph, and a
    /// failure, a panic or a stop in one request's graph ends that request
    /// only. The other steps (a replay, a second step of a session) run
    /// after it, one by one, in order.
    pub fn step_many(&mut self, reqs: &[&StepRequest]) -> Vec<Result<StepOutput, WireError>> {
        let mut results: Vec<Option<Result<StepOutput, WireError>>> =
            reqs.iter().map(|_| None).collect();
        let mut groups: HashMap<Span, Vec<(usize, Key)>> = HashMap::new();
        let mut seen = std::collections::HashSet::new();
        for (i, req) in reqs.iter().enumerate() {
            let Some(hop) = req.route.get(req.hop as usize) else {
                continue;
            };
            let key = (req.request, hop.span.start);
            if !req.replay.is_empty() || !seen.insert(key) {
                continue;
            }
            match self.admit(req) {
                Ok(key) => groups.entry(hop.span).or_default().push((i, key)),
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        for (span, group) in groups {
            for (i, out) in self.run_packed(span, &group, reqs) {
                results[i] = Some(out);
            }
        }
        reqs.iter()
            .zip(results)
            .map(|(req, out)| out.unwrap_or_else(|| self.step(req)))
            .collect()
    }

    /// Runs the steps `group` (admitted, sessions open) of layers `span`
    /// as one packed forward.
    fn run_packed(
        &mut self,
        span: Span,
        group: &[(usize, Key)],
        reqs: &[&StepRequest],
    ) -> Vec<(usize, Result<StepOutput, WireError>)> {
        let _guard = tch::no_grad_guard();
        let now = Instant::now();
        let mut taken: Vec<(usize, Key, Session)> = group
            .iter()
            .filter_map(|&(i, key)| Some((i, key, self.sessions.remove(&key)?)))
            .collect();
        let (engine, manifest) = (&self.engine, &self.manifest);
        let mut done = Vec::with_capacity(taken.len());
        let mut ran = Vec::with_capacity(taken.len());
        {
            let mut prepared = Vec::with_capacity(taken.len());
            for (i, _, session) in &mut taken {
                session.touch(now);
                let input = &reqs[*i].input;
                match contain("readying the step", || {
                    session.prepare(engine, manifest, input)
                }) {
                    Ok(p) => prepared.push((*i, p)),
                    Err(e) => done.push((*i, Err(e))),
                }
            }
            let mut steps = Vec::with_capacity(prepared.len());
            let mut order = Vec::with_capacity(prepared.len());
            for (i, p) in &mut prepared {
                match p.step() {
                    Ok(Some(step)) => {
                        steps.push(step);
                        order.push(*i);
                    }
                    Ok(None) => ran.push((*i, Ok(None))),
                    Err(e) => ran.push((*i, Err(e))),
                }
            }
            let n = steps.len();
            let outs = std::panic::catch_unwind(AssertUnwindSafe(|| {
                forward_steps(&engine.model, span.range(), steps)
            }))
            .unwrap_or_else(|payload| {
                let msg = panic_message(payload.as_ref());
                (0..n).map(|_| Err(HookError::Panic(msg.clone()))).collect()
            });
            ran.extend(order.into_iter().zip(outs));
        }
        for (i, out) in ran {
            let req = reqs[i];
            let session = &mut taken.iter_mut().find(|t| t.0 == i).expect("taken").2;
            let is_last = req.hop as usize + 1 == req.route.len();
            let out = match out {
                Ok(out) => contain("ending the step", || {
                    session.collect(&req.input, out, is_last)
                }),
                Err(e) => Err(session.failed(e, &req.input)),
            };
            done.push((i, out));
        }
        for (i, key, session) in taken {
            if done.iter().any(|(j, out)| *j == i && out.is_ok()) {
                self.sessions.insert(key, session);
            } else {
                // Its KV cache may be half written.
                self.panics += session.panics;
            }
        }
        done
    }

    /// Checks `req` against the stage and its session, opening the session
    /// at the request's first step; returns the session's key.
    fn admit(&mut self, req: &StepRequest) -> Result<Key, WireError> {
        let layers = self.engine.model.layers();
        let hop = req.route.get(req.hop as usize).ok_or_else(|| {
            err(
                ErrorKind::Malformed,
                format!(
                    "hop {} is not in the route of {} hops",
                    req.hop,
                    req.route.len()
                ),
            )
        })?;
        let span = hop.span.range();
        if span.is_empty() || span.start < layers.start || span.end > layers.end {
            return Err(err(
                ErrorKind::NotServed,
                format!(
                    "this stage serves layers {}..{}, which do not hold {}",
                    layers.start, layers.end, hop.span
                ),
            ));
        }
        let key = (req.request, hop.span.start);
        if let Some(session) = self.sessions.get_mut(&key) {
            session.check_next(req)?;
            session.adopt_route(&self.manifest, req)?;
        } else {
            let session = self.open(req)?;
            self.sessions.insert(key, session);
        }
        if let Some(session) = self.sessions.get_mut(&key) {
            session.touch(Instant::now());
        }
        Ok(key)
    }

    /// Drops a session whose step failed (its KV cache may be half
    /// written), counting the panics its forwards caught.
    fn drop_session(&mut self, key: Key) {
        if let Some(s) = self.sessions.remove(&key) {
            self.panics += s.panics;
        }
    }

    /// A new session for `req`, if the node has room for it.
    fn open(&self, req: &StepRequest) -> Result<Session, WireError> {
        if self.sessions.len() >= self.max_sessions {
            return Err(err(
                ErrorKind::Overloaded,
                format!(
                    "{} sessions are open, this node's limit; retry later or elsewhere",
                    self.sessions.len()
                ),
            ));
        }
        let session = contain("opening the session", || {
            Session::open(&self.engine, &self.manifest, &self.limits, req)
        })?;
        let (need, reserved) = (session.kv_bytes(), self.kv_reserved());
        if need > self.max_kv_bytes {
            return Err(err(
                ErrorKind::Validation,
                format!(
                    "the request needs {need} bytes of KV cache on this stage; its limit is {} (--kv-cache-mib)",
                    self.max_kv_bytes
                ),
            ));
        }
        if reserved + need > self.max_kv_bytes {
            return Err(err(
                ErrorKind::Overloaded,
                format!(
                    "the request needs {need} bytes of KV cache and {} of this stage's {} are in use; retry later or elsewhere",
                    reserved, self.max_kv_bytes
                ),
            ));
        }
        Ok(session)
    }

    /// Tokenizes texts with the model's tokenizer.
    ///
    /// # Errors
    /// [`ErrorKind::TooLarge`] for more texts or bytes than the limits allow
    /// a graph; [`ErrorKind::Malformed`] if the tokenizer fails.
    pub fn tokenize(&self, texts: &[String]) -> Result<Vec<Vec<u32>>, WireError> {
        let max_texts = self
            .limits
            .max_invokes
            .saturating_mul(self.limits.max_traces);
        let bytes: u64 = texts.iter().map(|t| t.len() as u64).sum();
        if texts.len() > max_texts || bytes > self.limits.max_graph_bytes {
            return Err(err(
                ErrorKind::TooLarge,
                format!(
                    "{} texts of {bytes} bytes; this node tokenizes at most {max_texts} texts of {} bytes",
                    texts.len(),
                    self.limits.max_graph_bytes
                ),
            ));
        }
        contain("tokenizing", || {
            texts
                .iter()
                .map(|t| {
                    self.engine
                        .encode(t)
                        .map_err(|e| err(ErrorKind::Malformed, e.to_string()))
                })
                .collect()
        })
    }

    /// Drops a request's sessions, if `client` is their client.
    pub fn close(&mut self, request: RequestId, client: PeerId) {
        self.sessions
            .retain(|(r, _), s| *r != request || s.client() != client);
    }

    /// Drops the sessions unused for longer than the session TTL; returns
    /// how many.
    pub fn evict_idle(&mut self, now: Instant) -> usize {
        let before = self.sessions.len();
        let ttl = self.ttl;
        self.sessions.retain(|_, s| !s.idle_for(now, ttl));
        before - self.sessions.len()
    }

    /// Checks that the stage can still compute: a one-token forward.
    ///
    /// # Errors
    /// What failed.
    pub fn probe(&self) -> Result<(), String> {
        contain("the probe forward", || {
            let _guard = tch::no_grad_guard();
            forward_zeros(&self.engine, 1)
                .map(|_| ())
                .map_err(|e| err(ErrorKind::Internal, e))
        })
        .map_err(|e| e.message)
    }
}

/// A forward of `t` zero tokens (or zero hidden states) through the stage.
fn forward_zeros(engine: &Engine, t: i64) -> Result<Tensor, String> {
    let model = &engine.model;
    let device = model.device();
    let batch = nnmesh_runtime::models::llama::Batch::contiguous(1, t, 0, device);
    let input = if model.is_first() {
        Input::Tokens(Tensor::zeros([1, t], (Kind::Int64, device)))
    } else {
        let h = model.config().hidden_size as i64;
        Input::Hidden(Tensor::zeros([1, t, h], (model.kind(), device)))
    };
    model
        .forward(input, &batch, None, &mut nnmesh_runtime::hooks::NoHooks)
        .map_err(|e| e.to_string())
}

/// Times a 64-token forward through the stage (best of three).
fn measure_throughput(engine: &Engine) -> f32 {
    let _guard = tch::no_grad_guard();
    let t = 64;
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t0 = Instant::now();
        if forward_zeros(engine, t).is_err() {
            return 0.0;
        }
        best = best.min(t0.elapsed().as_secs_f64());
    }
    (t as f64 / best) as f32
}

/// A [`Stage`] as an actix actor on its own thread, with its scheduler:
/// steps wait in a queue while a forward runs, and the next forward takes
/// them together (continuous batching: see `StageActor::next_batch`).
pub struct StageActor {
    stage: Stage,
    fatal: mpsc::Sender<String>,
    queue: VecDeque<Queued>,
    /// A [`Flush`] is on its way.
    flushing: bool,
    max_batch: usize,
    deadline: Duration,
    window: Duration,
    /// Steps in the last forward.
    last_batch: usize,
    /// Threads as configured (0: follow the nodes on this machine).
    threads: i32,
}

impl std::fmt::Debug for StageActor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StageActor")
            .field("stage", &self.stage)
            .field("queued", &self.queue.len())
            .finish_non_exhaustive()
    }
}

/// A step waiting for its forward.
struct Queued {
    req: Box<StepRequest>,
    reply: oneshot::Sender<Result<StepOutput, WireError>>,
    since: Instant,
}

impl StageActor {
    /// The steps the next forward runs, taken out of the queue: every
    /// decode step waiting (up to `max_batch`, oldest first), plus one
    /// prefill or replay; only prefills when no decode waits. So a decode
    /// step waits for at most one forward and one prompt, never a queue of
    /// prompts. Steps past their deadline are refused here.
    fn next_batch(&mut self) -> Vec<Queued> {
        let now = Instant::now();
        let mut batch = Vec::new();
        let mut rest = VecDeque::with_capacity(self.queue.len());
        let decoding = self
            .queue
            .iter()
            .any(|q| q.req.input.step > 0 && q.req.replay.is_empty());
        let mut prefills = 0;
        for q in self.queue.drain(..) {
            if now.duration_since(q.since) > self.deadline {
                let _ = q.reply.send(Err(err(
                    ErrorKind::Overloaded,
                    format!(
                        "the step waited over {:?} for this stage; retry elsewhere",
                        self.deadline
                    ),
                )));
                continue;
            }
            let decode = q.req.input.step > 0 && q.req.replay.is_empty();
            let fits = batch.len() < self.max_batch
                && (decode || !decoding && prefills < self.max_batch || prefills == 0);
            if fits {
                prefills += usize::from(!decode);
                batch.push(q);
            } else {
                rest.push_back(q);
            }
        }
        self.queue = rest;
        batch
    }

    /// Runs the next batch and answers its steps.
    fn flush(&mut self) {
        let batch = self.next_batch();
        if batch.is_empty() {
            return;
        }
        let t0 = Instant::now();
        let panics = self.stage.panics();
        let reqs: Vec<&StepRequest> = batch.iter().map(|q| &*q.req).collect();
        let outs = match reqs.as_slice() {
            [one] => vec![self.stage.step(one)],
            many => self.stage.step_many(many),
        };
        let n = batch.len();
        self.last_batch = n;
        let took = t0.elapsed();
        let ms = took.as_secs_f64() * 1e3;
        let mut failed = None;
        for (q, mut out) in batch.into_iter().zip(outs) {
            let req = &q.req;
            if let Ok(out) = &mut out {
                out.timing = StepTiming {
                    queued_us: micros(t0.saturating_duration_since(q.since)),
                    compute_us: micros(took),
                    batch: n as u32,
                };
            }
            match &out {
                Ok(_) => tracing::debug!(
                    request = req.request.0,
                    trace = req.input.trace,
                    step = req.input.step,
                    hop = req.hop,
                    batch = n,
                    ms,
                    "step done"
                ),
                Err(e) => {
                    tracing::warn!(request = req.request.0, trace = req.input.trace, step = req.input.step, error = %e, "step failed");
                    failed = Some(e.message.clone());
                }
            }
            let _ = q.reply.send(out);
        }
        if self.stage.panics() > panics
            && let Err(reason) = self.stage.probe()
        {
            // A request's failure broke the stage itself: stop serving.
            let _ = self.fatal.try_send(format!(
                "the stage cannot compute any more ({reason}) after: {}",
                failed.unwrap_or_default()
            ));
        }
    }
}

impl Actor for StageActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(MAILBOX);
        if self.threads == 0 {
            // Follow the nodes on this machine as they come and go.
            ctx.run_interval(Duration::from_secs(5), |_, _| {
                let want = default_threads();
                if want != tch::get_num_threads() {
                    tracing::info!(
                        threads = want,
                        "torch threads follow the nodes on this machine"
                    );
                    tch::set_num_threads(want);
                }
            });
        }
        let every = (self.stage.ttl / 4).max(Duration::from_secs(1));
        ctx.run_interval(every, |actor, _| {
            let dropped = actor.stage.evict_idle(Instant::now());
            if dropped > 0 {
                tracing::info!(dropped, "idle sessions dropped");
            }
        });
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        // The stage's thread is its own: end it, freeing the weights.
        Arbiter::current().stop();
    }
}

/// What a started stage tells the node.
#[derive(Debug, Clone)]
pub struct Info {
    /// The model manifest.
    pub manifest: Manifest,
    /// Measured throughput, tokens per second.
    pub throughput: f32,
    /// The tokenizer as `tokenizer.json` (what weightless clients fetch).
    pub tokenizer: Vec<u8>,
}

/// Why a stage did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The model could not be loaded.
    #[error(transparent)]
    Load(#[from] EngineError),
    /// Loading panicked (a corrupt file that slipped past the checks).
    #[error("loading the stage failed: {0}")]
    Panicked(String),
    /// The stage thread ended before reporting.
    #[error("the stage thread ended while loading")]
    Thread,
}

/// Starts a stage actor on a new thread and loads its weights there.
/// `fatal` receives the reason if the stage later finds it can no longer
/// compute.
///
/// Must be called inside an actix system.
///
/// # Errors
/// See [`StartError`]; the thread is stopped then.
pub async fn spawn(
    cfg: Config,
    fatal: mpsc::Sender<String>,
) -> Result<(Addr<StageActor>, Info), StartError> {
    let arbiter = Arbiter::new();
    let (tx, rx) = oneshot::channel();
    arbiter.spawn_fn(move || {
        // Set on the thread that computes: OpenMP's thread count is a
        // per-thread setting.
        tch::set_num_threads(if cfg.threads > 0 {
            cfg.threads
        } else {
            default_threads()
        });
        let loaded = std::panic::catch_unwind(|| Stage::load(&cfg));
        let started = match loaded {
            Ok(Ok(stage)) => match stage.engine.tokenizer.to_json() {
                Ok(json) => {
                    let info = Info {
                        manifest: stage.manifest.clone(),
                        throughput: stage.throughput,
                        tokenizer: json.into_bytes(),
                    };
                    let actor = StageActor {
                        stage,
                        fatal,
                        queue: VecDeque::new(),
                        flushing: false,
                        max_batch: cfg.max_batch.max(1),
                        deadline: cfg.queue_deadline,
                        window: cfg.batch_window,
                        last_batch: 0,
                        threads: cfg.threads,
                    };
                    Ok((actor.start(), info))
                }
                Err(e) => Err(StartError::Load(e.into())),
            },
            Ok(Err(e)) => Err(StartError::Load(e)),
            Err(payload) => Err(StartError::Panicked(panic_message(payload.as_ref()))),
        };
        let failed = started.is_err();
        let _ = tx.send(started);
        if failed {
            Arbiter::current().stop();
        }
    });
    rx.await.map_err(|_| StartError::Thread)?
}

/// Run one step of a request on this stage.
#[derive(Debug, Message)]
#[rtype(result = "Result<StepOutput, WireError>")]
pub struct RunStep(pub Box<StepRequest>);

/// Tokenize texts with the model's tokenizer.
#[derive(Debug, Message)]
#[rtype(result = "Result<Vec<Vec<u32>>, WireError>")]
pub struct Tokenize(pub Vec<String>);

/// Drop a request's session, if `client` is its client.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Close {
    /// The request.
    pub request: RequestId,
    /// Who asks: only the request's own client may close it.
    pub client: PeerId,
}

impl Handler<RunStep> for StageActor {
    type Result = ResponseFuture<Result<StepOutput, WireError>>;

    /// Queues the step; the next `Flush` runs it, with whatever else
    /// arrived meanwhile.
    fn handle(&mut self, msg: RunStep, ctx: &mut Context<Self>) -> Self::Result {
        let (reply, rx) = oneshot::channel();
        self.queue.push_back(Queued {
            req: msg.0,
            reply,
            since: Instant::now(),
        });
        if !self.flushing {
            self.flushing = true;
            if self.last_batch > 1 && self.max_batch > 1 && !self.window.is_zero() {
                // Requests are running together: their other steps are
                // on their way; let them join.
                ctx.notify_later(Flush, self.window);
            } else {
                // Delivered after the messages already in the mailbox:
                // they join this forward.
                ctx.notify(Flush);
            }
        }
        Box::pin(async move {
            rx.await.unwrap_or_else(|_| {
                Err(err(
                    ErrorKind::Internal,
                    "the stage stopped before running the step",
                ))
            })
        })
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Run the next batch of queued steps.
#[derive(Debug, Message)]
#[rtype(result = "()")]
struct Flush;

impl Handler<Flush> for StageActor {
    type Result = ();

    fn handle(&mut self, _: Flush, ctx: &mut Context<Self>) {
        self.flushing = false;
        self.flush();
        if !self.queue.is_empty() {
            self.flushing = true;
            ctx.notify(Flush);
        }
    }
}

impl Handler<Tokenize> for StageActor {
    type Result = Result<Vec<Vec<u32>>, WireError>;

    fn handle(&mut self, msg: Tokenize, _: &mut Context<Self>) -> Self::Result {
        self.stage.tokenize(&msg.0)
    }
}

/// Stop serving: the stage's sessions are dropped (their clients fail
/// over), its weights freed and its thread ended.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Stop;

impl Handler<Stop> for StageActor {
    type Result = ();

    fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) {
        tracing::info!(sessions = self.stage.sessions(), "stage stopped");
        ctx.stop();
    }
}

impl Handler<Close> for StageActor {
    type Result = ();

    fn handle(&mut self, msg: Close, _: &mut Context<Self>) {
        self.stage.close(msg.request, msg.client);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_internal_error_without_the_cpp_backtrace() {
        // A shape error in a panicking tch call, as a graph that slipped
        // past validation would cause.
        let e = contain("adding", || {
            let a = Tensor::zeros([2], (Kind::Float, Device::Cpu));
            let b = Tensor::zeros([3], (Kind::Float, Device::Cpu));
            let _ = &a + &b;
            Ok(())
        })
        .expect_err("the panic is caught");
        assert_eq!(e.kind, ErrorKind::Internal);
        assert!(e.message.starts_with("adding failed: "), "{}", e.message);
        assert!(e.message.contains("must match the size"), "{}", e.message);
        assert!(
            !e.message.contains("Exception raised from"),
            "{}",
            e.message
        );
        // Nothing else is touched: the next call runs.
        assert_eq!(contain("adding", || Ok(1 + 1)).expect("runs"), 2);
    }

    #[test]
    fn node_processes_are_told_apart_by_their_command_line() {
        assert!(is_node_command(
            b"/x/target/release/nnmesh\0node\0--blocks\0A..B\0"
        ));
        assert!(is_node_command(b"nnmesh\0node\0"));
        assert!(!is_node_command(b"/x/nnmesh\0bench\0"));
        assert!(!is_node_command(b"/x/nnmesh-node\0node\0"));
        assert!(!is_node_command(b""));
        // This test process is not a node; at least one core each.
        assert!(default_threads() >= 1);
    }
}
