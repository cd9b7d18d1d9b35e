//! A hosted pipeline stage as an actix actor: it owns the stage's weights and
//! runs each step of each request's graph fragment on its own thread
//! (`SyncArbiter`), keeping one session per request (graph, plan, the
//! interpreter's values, the KV cache of the current trace).

use std::{
    collections::HashMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use actix::{Actor, Handler, Message, SyncContext};
use nnmesh_graph::{Fragment, Graph, Limits, Manifest, NodeId, Plan, StageSpan, partition};
use nnmesh_protocol::{
    ids::RequestId,
    message::{Carried, ErrorKind, Saved, StepRequest, WireError},
    tensor::WireTensor,
};
use tch::{Device, Kind, Tensor};

use crate::{
    engine::{Engine, Padded},
    interpret::{Executor, State},
    llama::{Cache, Input},
    trace::{forward_step, trace_prompts},
    wire::{from_wire, to_wire},
};

/// How a stage is loaded.
#[derive(Debug, Clone)]
pub struct Config {
    /// Model file or folder.
    pub model: PathBuf,
    /// Decoder layers hosted.
    pub layers: std::ops::Range<usize>,
    /// Compute dtype.
    pub kind: Kind,
    /// Device.
    pub device: Device,
    /// Per-request limits.
    pub limits: Limits,
    /// Sessions unused for this long are dropped.
    pub session_ttl: Duration,
}

/// What one step produced on this stage.
#[derive(Debug)]
pub struct StepOutput {
    /// Hidden state for the next hop (`None` on the last hop or after an early stop).
    pub hidden: Option<WireTensor>,
    /// Values the next hop needs.
    pub carry: Vec<Carried>,
    /// Values saved here, for the client.
    pub saves: Vec<Saved>,
    /// Values an earlier stage needs in a later step or trace: sent to the
    /// client, which hands them to the first stage with its next step.
    pub relay: Vec<Carried>,
    /// On the last hop (or when the forward stopped early): the greedy next
    /// token of each row when the trace generates further, else empty.
    pub done: Option<Vec<u32>>,
}

/// Run one step of a request on this stage.
#[derive(Debug, Message)]
#[rtype(result = "Result<StepOutput, WireError>")]
pub struct RunStep(pub Box<StepRequest>);

/// Tokenize texts with the model's tokenizer.
#[derive(Debug, Message)]
#[rtype(result = "Result<Vec<Vec<u32>>, String>")]
pub struct Tokenize(pub Vec<String>);

/// Drop a request's session.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Close(pub RequestId);

struct Session {
    graph: Graph,
    plan: Plan,
    fragment: Fragment,
    state: State,
    cache: Option<Cache>,
    padded: Option<Padded>,
    /// The last (trace, step) run here: a step is applied at most once,
    /// since running it again would append to the KV cache twice.
    applied: Option<(u32, u32)>,
    last_used: Instant,
}

/// The stage actor.
pub struct Stage {
    engine: Engine,
    manifest: Manifest,
    limits: Limits,
    ttl: Duration,
    sessions: HashMap<RequestId, Session>,
    throughput: f32,
}

impl std::fmt::Debug for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stage")
            .field("layers", &self.engine.model.layers())
            .field("sessions", &self.sessions.len())
            .finish()
    }
}

impl Actor for Stage {
    type Context = SyncContext<Self>;
}

fn err(kind: ErrorKind, msg: impl Into<String>) -> WireError {
    WireError::new(kind, msg)
}

impl Stage {
    /// Loads the stage (on the calling thread: call it on the actor's thread).
    ///
    /// # Errors
    /// When the model cannot be loaded.
    pub fn load(cfg: &Config) -> Result<Self, crate::engine::EngineError> {
        let engine = Engine::load(&cfg.model, Some(cfg.layers.clone()), cfg.kind, cfg.device)?;
        let manifest = crate::engine::manifest(engine.model.config(), engine.model.kind());
        let throughput = measure_throughput(&engine);
        Ok(Stage {
            engine,
            manifest,
            limits: cfg.limits.clone(),
            ttl: cfg.session_ttl,
            sessions: HashMap::new(),
            throughput,
        })
    }

    /// Tokens per second through this stage, measured at load (a 64-token prefill).
    pub fn throughput(&self) -> f32 {
        self.throughput
    }

    /// The model manifest (module tree, shapes).
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn run_step(&mut self, req: &StepRequest) -> Result<StepOutput, WireError> {
        let model_layers = self.engine.model.layers();
        let hop = req.route.get(req.hop as usize).ok_or_else(|| {
            err(
                ErrorKind::Malformed,
                format!("hop {} is not in the route", req.hop),
            )
        })?;
        if (hop.start as usize, hop.end as usize) != (model_layers.start, model_layers.end) {
            return Err(err(
                ErrorKind::NotServed,
                format!(
                    "this node serves layers {}..{}, not {}..{}",
                    model_layers.start, model_layers.end, hop.start, hop.end
                ),
            ));
        }
        let is_last = req.hop as usize + 1 == req.route.len();
        let _guard = tch::no_grad_guard();
        let Stage {
            engine,
            manifest,
            limits,
            ttl,
            sessions,
            ..
        } = self;
        let device = engine.model.device();
        let session = open_session(sessions, engine, manifest, limits, *ttl, req)?;
        let trace = req.trace as usize;
        if trace >= session.graph.traces.len() || req.step >= session.plan.steps[trace] {
            return Err(err(
                ErrorKind::Malformed,
                format!("trace {} step {} is not in the graph", req.trace, req.step),
            ));
        }
        session.applied = Some((req.trace, req.step));
        if req.step == 0 {
            let prompts = trace_prompts(&session.graph, trace);
            session.padded = Some(Padded::new(&prompts, device));
            session.cache = Some(engine.model.new_cache());
        }
        let (Some(padded), Some(cache)) = (&session.padded, &mut session.cache) else {
            return Err(err(
                ErrorKind::Malformed,
                format!(
                    "trace {} step {} arrived before its step 0",
                    req.trace, req.step
                ),
            ));
        };
        let input = if engine.model.is_first() {
            if req.step == 0 {
                Input::Tokens(padded.ids.shallow_clone())
            } else {
                Input::Tokens(from_wire(&req.tokens, device)?)
            }
        } else {
            let h = req
                .hidden
                .as_ref()
                .ok_or_else(|| err(ErrorKind::Malformed, "no hidden state for a middle stage"))?;
            Input::Hidden(from_wire(h, device)?)
        };
        let lens = padded.lens.clone();
        let mut exec = Executor::new(
            &session.graph,
            &session.plan,
            manifest,
            &engine.model,
            &mut session.state,
        );
        exec.begin(req.trace, req.step, &lens);
        for c in &req.carry {
            exec.insert(NodeId(c.node), from_wire(&c.value, device)?);
        }
        let out = forward_step(&engine.model, &mut exec, padded, req.step, input, cache)
            .map_err(|e| err(ErrorKind::Internal, e.to_string()))?;
        let saves = session
            .state
            .take_saves()
            .into_iter()
            .map(|s| {
                Ok(Saved {
                    name: s.name,
                    step: s.step,
                    value: to_wire(&s.value)?,
                })
            })
            .collect::<Result<Vec<_>, WireError>>()?;
        let fresh = |ids: &[NodeId]| {
            ids.iter()
                .filter(|n| session.state.is_fresh(**n))
                .map(|n| {
                    let v = session.state.value(*n).expect("fresh values exist");
                    Ok(Carried {
                        node: n.0,
                        value: to_wire(v)?,
                    })
                })
                .collect::<Result<Vec<_>, WireError>>()
        };
        let carry = fresh(&session.fragment.carry_out)?;
        let relay = fresh(&session.fragment.relay_out)?;
        let generating = session.graph.traces[trace].max_new_tokens > 0;
        let (hidden, done) = match out {
            None => (None, Some(Vec::new())),
            Some(logits) if is_last => {
                let tokens = if generating {
                    let next = logits.select(1, -1).argmax(-1, false);
                    Vec::<i64>::try_from(&next)
                        .map_err(|e| err(ErrorKind::Internal, e.to_string()))?
                        .into_iter()
                        .map(|i| i as u32)
                        .collect()
                } else {
                    Vec::new()
                };
                (None, Some(tokens))
            }
            Some(h) => (Some(to_wire(&h)?), None),
        };
        Ok(StepOutput {
            hidden,
            carry,
            saves,
            relay,
            done,
        })
    }
}

/// The session of `req`, created from the graph it carries when new.
fn open_session<'s>(
    sessions: &'s mut HashMap<RequestId, Session>,
    engine: &Engine,
    manifest: &Manifest,
    limits: &Limits,
    ttl: Duration,
    req: &StepRequest,
) -> Result<&'s mut Session, WireError> {
    let now = Instant::now();
    sessions.retain(|_, s| now.duration_since(s.last_used) < ttl);
    let session = match sessions.entry(req.request) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(slot) => {
            let bytes = req.graph.as_ref().ok_or_else(|| {
                err(
                    ErrorKind::Malformed,
                    format!(
                        "request {} has no session here and the step carries no graph",
                        req.request.0
                    ),
                )
            })?;
            let graph = Graph::from_postcard(bytes)
                .map_err(|e| err(ErrorKind::Malformed, format!("graph: {e}")))?;
            let plan = crate::trace::plan(&graph, manifest, limits)
                .map_err(|e| err(ErrorKind::Validation, e.to_string()))?;
            let route: Vec<StageSpan> = req
                .route
                .iter()
                .map(|h| StageSpan {
                    start: h.start,
                    end: h.end,
                })
                .collect();
            let mut fragments = partition(&graph, &plan, manifest, &route)
                .map_err(|e| err(ErrorKind::Validation, e.to_string()))?;
            let fragment = fragments.swap_remove(req.hop as usize);
            let state = State::new(&graph, manifest, &engine.model, Some(&fragment.nodes))
                .map_err(|e| err(ErrorKind::Validation, e.to_string()))?;
            slot.insert(Session {
                graph,
                plan,
                fragment,
                state,
                cache: None,
                padded: None,
                applied: None,
                last_used: now,
            })
        }
    };
    session.last_used = now;
    Ok(session)
}

impl Handler<RunStep> for Stage {
    type Result = Result<StepOutput, WireError>;

    fn handle(&mut self, msg: RunStep, _: &mut Self::Context) -> Self::Result {
        let req = msg.0;
        let span = tracing::info_span!(
            "step",
            request = req.request.0,
            trace = req.trace,
            step = req.step,
            hop = req.hop
        );
        let _e = span.enter();
        let t0 = Instant::now();
        // A duplicate leaves the session as it is (it may be a retry of a
        // step that did arrive).
        if let Some(s) = self.sessions.get(&req.request)
            && s.applied.is_some_and(|a| (req.trace, req.step) <= a)
        {
            return Err(err(
                ErrorKind::Malformed,
                format!(
                    "trace {} step {} was already applied to request {} here; a replay needs a new request id",
                    req.trace, req.step, req.request.0
                ),
            ));
        }
        let out = self.run_step(&req);
        match &out {
            Ok(_) => tracing::debug!(ms = t0.elapsed().as_secs_f64() * 1e3, "step done"),
            Err(e) => {
                tracing::warn!(error = %e, "step failed");
                self.sessions.remove(&req.request);
            }
        }
        out
    }
}

impl Handler<Tokenize> for Stage {
    type Result = Result<Vec<Vec<u32>>, String>;

    fn handle(&mut self, msg: Tokenize, _: &mut Self::Context) -> Self::Result {
        msg.0
            .iter()
            .map(|t| self.engine.encode(t).map_err(|e| e.to_string()))
            .collect()
    }
}

/// Times a 64-token forward through the stage (best of three).
fn measure_throughput(engine: &Engine) -> f32 {
    let _guard = tch::no_grad_guard();
    let model = &engine.model;
    let t = 64;
    let device = model.device();
    let batch = crate::llama::Batch::contiguous(1, t, 0, device);
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let input = if model.is_first() {
            Input::Tokens(Tensor::zeros([1, t], (Kind::Int64, device)))
        } else {
            let h = model.config().hidden_size as i64;
            Input::Hidden(Tensor::zeros([1, t, h], (model.kind(), device)))
        };
        let t0 = Instant::now();
        if model
            .forward(input, &batch, None, &mut crate::hooks::NoHooks)
            .is_err()
        {
            return 0.0;
        }
        best = best.min(t0.elapsed().as_secs_f64());
    }
    (t as f64 / best) as f32
}

impl Handler<Close> for Stage {
    type Result = ();

    fn handle(&mut self, msg: Close, _: &mut Self::Context) {
        self.sessions.remove(&msg.0);
    }
}
