//! One request's state on a stage, and the checks every step a peer sends
//! must pass before anything of it reaches a tensor op.
//!
//! A session holds the request's graph, its plan and this stage's fragment,
//! the interpreter's values, and the KV cache of the trace in progress. It
//! runs steps strictly in order — trace 0 step 0, 1, …, then trace 1 step
//! 0, … — since a skipped step would reuse a stale KV cache and a repeated
//! one would append to it twice; and each step says how many positions the
//! cache must hold before it (`past`), so a replacement that replayed the
//! wrong prefix is refused, never silently wrong.

use std::time::{Duration, Instant};

use nnmesh_graph::{DecodeError, Fragment, Graph, Limits, Manifest, NodeId, Plan, partition};
use nnmesh_protocol::{
    PeerId, Span,
    message::{
        Carried, ErrorKind, Hop, HopOutput, Saved, StepInput, StepRequest, StepTiming, WireError,
    },
    tensor::{WireDType, WireTensor},
};
use nnmesh_runtime::{
    engine::{Engine, Padded},
    execute::{Step, forward_steps, trace_prompts},
    hooks::HookError,
    interpret::{Executor, Store, ops},
    models::llama::{Cache, Input, Model},
    wire::{from_wire, to_wire},
};
use tch::{Kind, Tensor};

use super::{Next, StepOutput, err};

/// A request's state on this stage.
pub(super) struct Session {
    graph: Graph,
    plan: Plan,
    fragment: Fragment,
    store: Store,
    cache: Option<Cache>,
    padded: Option<Padded>,
    /// The last (trace, step) run here.
    applied: Option<(u32, u32)>,
    /// Who the request belongs to: later steps must come from the same client.
    client: PeerId,
    /// The route the fragment was cut along (a new route is taken when it
    /// leaves this stage's fragment as it is).
    route: Vec<Hop>,
    /// The layers this session runs (part or all of what the stage holds).
    span: Span,
    /// KV cache reserved for the request on this stage.
    kv_bytes: u64,
    last_used: Instant,
    /// Panics caught in this request's forwards (each failed the request).
    pub(super) panics: u64,
}

fn malformed(msg: impl Into<String>) -> WireError {
    err(ErrorKind::Malformed, msg)
}

/// A trace's padding and KV cache (made by its step 0), checked against
/// the (history length, position) invariant: what the cache holds is what
/// the client says step `step` comes after (`past`).
fn positioned<'a>(
    padded: &'a Option<Padded>,
    cache: &'a mut Option<Cache>,
    trace: u32,
    step: u32,
    past: u32,
) -> Result<(&'a Padded, &'a mut Cache), WireError> {
    let (Some(padded), Some(cache)) = (padded.as_ref(), cache.as_mut()) else {
        return Err(malformed(format!(
            "trace {trace} step {step} arrived before its step 0"
        )));
    };
    let held = u32::try_from(cache.len()).unwrap_or(u32::MAX);
    if held != past {
        return Err(malformed(format!(
            "trace {trace} step {step} comes after {past} cached positions, but this stage holds {held}"
        )));
    }
    Ok((padded, cache))
}

fn wire_dtype(kind: Kind) -> Option<WireDType> {
    Some(match kind {
        Kind::Float => WireDType::F32,
        Kind::Half => WireDType::F16,
        Kind::BFloat16 => WireDType::Bf16,
        Kind::Int64 => WireDType::I64,
        Kind::Bool => WireDType::Bool,
        _ => return None,
    })
}

impl Session {
    /// Opens the session of a request from its first step, which must carry
    /// the graph: decoded under the node's limits, validated, and split
    /// along the step's route.
    pub(super) fn open(
        engine: &Engine,
        manifest: &Manifest,
        limits: &Limits,
        req: &StepRequest,
    ) -> Result<Session, WireError> {
        let first = req.replay.first().unwrap_or(&req.input);
        if (first.trace, first.step) != (0, 0) {
            return Err(malformed(format!(
                "request {} has no session here, so its first step (or the first it replays) must be trace 0 step 0, not trace {} step {}",
                req.request, first.trace, first.step
            )));
        }
        let bytes = req.graph.as_ref().ok_or_else(|| {
            malformed(format!(
                "request {} has no session here and its step carries no graph",
                req.request
            ))
        })?;
        let graph = Graph::from_postcard_limited(bytes, limits).map_err(|e| match e {
            DecodeError::TooLarge { .. } | DecodeError::TooMany { .. } => {
                err(ErrorKind::TooLarge, e.to_string())
            }
            e => malformed(format!("graph: {e}")),
        })?;
        let validation = |e: &dyn std::fmt::Display| err(ErrorKind::Validation, e.to_string());
        let plan =
            nnmesh_runtime::execute::plan(&graph, manifest, limits).map_err(|e| validation(&e))?;
        let route: Vec<Span> = req.route.iter().map(|h| h.span).collect();
        let mut fragments =
            partition(&graph, &plan, manifest, &route).map_err(|e| validation(&e))?;
        let fragment = fragments.swap_remove(req.hop as usize);
        let store = Store::new(&graph, manifest, &engine.model, Some(&fragment.nodes))
            .map_err(|e| validation(&e))?;
        let span = req.route[req.hop as usize].span;
        let layers = u64::from(span.len());
        let kv_bytes = plan
            .costs
            .iter()
            .map(|c| c.kv_bytes_per_layer)
            .max()
            .unwrap_or(0)
            .saturating_mul(layers);
        Ok(Session {
            graph,
            plan,
            fragment,
            store,
            cache: None,
            padded: None,
            applied: None,
            client: req.client,
            route: req.route.clone(),
            span,
            kv_bytes,
            last_used: Instant::now(),
            panics: 0,
        })
    }

    /// The client the request belongs to.
    pub(super) fn client(&self) -> PeerId {
        self.client
    }

    /// KV cache reserved for this session.
    pub(super) fn kv_bytes(&self) -> u64 {
        self.kv_bytes
    }

    /// Marks the session used now.
    pub(super) fn touch(&mut self, now: Instant) {
        self.last_used = now;
    }

    /// Whether the session has been unused for longer than `ttl`.
    pub(super) fn idle_for(&self, now: Instant, ttl: Duration) -> bool {
        now.duration_since(self.last_used) >= ttl
    }

    /// The (trace, step) this session runs next.
    fn expected(&self) -> (u32, u32) {
        match self.applied {
            None => (0, 0),
            Some((t, s)) if s + 1 < self.plan.steps[t as usize] => (t, s + 1),
            Some((t, _)) => (t + 1, 0),
        }
    }

    /// Checks that `req` comes from this request's client, for this
    /// session's layers, with the session's next step (and no replay, which
    /// only a new session takes). A refusal leaves the session untouched.
    pub(super) fn check_next(&self, req: &StepRequest) -> Result<(), WireError> {
        if req.client != self.client {
            return Err(err(
                ErrorKind::Forbidden,
                format!("request {} belongs to another client", req.request),
            ));
        }
        let span = req.route[req.hop as usize].span;
        if span != self.span {
            return Err(malformed(format!(
                "request {} runs layers {} here, not {span}",
                req.request, self.span
            )));
        }
        if !req.replay.is_empty() {
            return Err(malformed(format!(
                "request {} has a session here already: only a new session replays",
                req.request
            )));
        }
        self.check_order(&req.input, req.request)
    }

    fn check_order(
        &self,
        input: &StepInput,
        request: nnmesh_protocol::ids::RequestId,
    ) -> Result<(), WireError> {
        let (t, s) = self.expected();
        match (input.trace, input.step).cmp(&(t, s)) {
            std::cmp::Ordering::Equal => Ok(()),
            std::cmp::Ordering::Less => Err(malformed(format!(
                "trace {} step {} was already applied to request {request} here; a replay needs a new session",
                input.trace, input.step
            ))),
            std::cmp::Ordering::Greater => Err(malformed(format!(
                "trace {} step {} of request {request} arrived out of order: this stage runs trace {t} step {s} next",
                input.trace, input.step
            ))),
        }
    }

    /// Takes the step's route when it differs from the session's (another
    /// stage was replaced): only if this stage's fragment stays the same.
    pub(super) fn adopt_route(
        &mut self,
        manifest: &Manifest,
        req: &StepRequest,
    ) -> Result<(), WireError> {
        if req.route == self.route {
            return Ok(());
        }
        let spans: Vec<Span> = req.route.iter().map(|h| h.span).collect();
        let fragments = partition(&self.graph, &self.plan, manifest, &spans)
            .map_err(|e| err(ErrorKind::Validation, e.to_string()))?;
        let new = &fragments[req.hop as usize];
        let old = &self.fragment;
        if (&new.nodes, &new.carry_in, &new.carry_out, &new.relay_out)
            != (&old.nodes, &old.carry_in, &old.carry_out, &old.relay_out)
        {
            return Err(malformed(format!(
                "the new route of request {} changes what this stage runs",
                req.request
            )));
        }
        self.route = req.route.clone();
        self.fragment = new.clone();
        Ok(())
    }

    /// Runs what `req` asks of this session: the replayed steps first (a
    /// replacement catching up; their saves and relays are dropped, their
    /// outputs kept only if asked for), then the step itself.
    pub(super) fn run(
        &mut self,
        engine: &Engine,
        manifest: &Manifest,
        req: &StepRequest,
    ) -> Result<StepOutput, WireError> {
        let is_last = req.hop as usize + 1 == req.route.len();
        let mut replayed = Vec::with_capacity(req.replay.len());
        let mut chunked = 0;
        let mut i = 0;
        while i < req.replay.len() {
            // Generated tokens this hop has nothing to do at replay in one
            // forward; steps with interventions one by one, as they ran.
            let k = self.idle_run(&req.replay[i..]);
            if k >= 2 {
                let chunk = &req.replay[i..i + k];
                for input in chunk {
                    self.check_order(input, req.request)?;
                    self.applied = Some((input.trace, input.step));
                }
                let outputs =
                    self.run_chunk(engine, manifest, chunk, req.replay_outputs && !is_last)?;
                replayed.extend(outputs);
                chunked += k as u32;
                i += k;
                continue;
            }
            let input = &req.replay[i];
            self.check_order(input, req.request)?;
            let out = self.run_input(engine, manifest, input, is_last)?;
            if req.replay_outputs {
                replayed.push(out.output());
            }
            i += 1;
        }
        if !req.replay.is_empty() {
            self.check_order(&req.input, req.request)?;
        }
        let mut out = self.run_input(engine, manifest, &req.input, is_last)?;
        out.replayed = replayed;
        out.chunked = chunked;
        if !req.replay.is_empty() {
            tracing::info!(steps = req.replay.len(), chunked, "replayed");
        }
        Ok(out)
    }

    /// How many of `inputs` (steps to replay), from the first, can run as
    /// one forward: consecutive decode steps of one trace that carry no
    /// values, at which this hop's fragment has no node, and where the
    /// trace does not stop.
    fn idle_run(&self, inputs: &[StepInput]) -> usize {
        let Some(first) = inputs.first() else {
            return 0;
        };
        let trace = first.trace as usize;
        let steps = self.plan.steps.get(trace).copied().unwrap_or(0);
        let stops = self.plan.stops.get(trace).copied().flatten().is_some();
        // (Invokes share rows only in traces that do not generate.)
        if first.step == 0 {
            return 0;
        }
        inputs
            .iter()
            .zip(0..)
            .take_while(|(i, j)| {
                i.trace == first.trace
                    && i.step == first.step + j
                    && i.past == first.past + j
                    && i.carry.is_empty()
                    && !(stops && i.step + 1 == steps)
                    && !self.store.has_work(&self.plan, i.trace, i.step)
            })
            .count()
    }

    /// Runs `inputs` (see [`Session::idle_run`]) as one forward of their
    /// tokens: the cache ends as after the steps one by one, up to
    /// rounding. Returns each step's output when `outputs` (a chain of
    /// replacements needs them).
    fn run_chunk(
        &mut self,
        engine: &Engine,
        manifest: &Manifest,
        inputs: &[StepInput],
        outputs: bool,
    ) -> Result<Vec<HopOutput>, WireError> {
        let model = &engine.model;
        let first = &inputs[0];
        let span = self.span;
        let Session {
            graph,
            plan,
            store,
            cache,
            padded,
            ..
        } = self;
        let (padded, cache) = positioned(padded, cache, first.trace, first.step, first.past)?;
        let mut exec = Executor::new(graph, plan, manifest, model, store);
        exec.set_first_layer(span.start);
        exec.begin(first.trace, first.step, &padded.lens);
        let rows = exec.rows();
        let mut parts = Vec::with_capacity(inputs.len());
        for i in inputs {
            match step_input(engine, manifest, span, i, padded, rows, None)? {
                Some(Input::Tokens(t) | Input::Hidden(t)) => parts.push(t),
                None => {
                    return Err(malformed(format!(
                        "trace {} step {} carries no input",
                        i.trace, i.step
                    )));
                }
            }
        }
        let joined = Tensor::cat(&parts, 1);
        let input = if span.start == 0 {
            Input::Tokens(joined)
        } else {
            Input::Hidden(joined)
        };
        let batch = padded.next_steps(first.step as usize, inputs.len());
        let out = model
            .forward_span(input, span.range(), &batch, Some(cache), &mut exec)
            .and_then(|out| exec.finish().map(|()| out));
        let out = out.map_err(|e| {
            let e = self.failed(e, first);
            err(
                e.kind,
                format!(
                    "replaying trace {} steps {}..{}: {}",
                    first.trace,
                    first.step,
                    first.step as usize + inputs.len(),
                    e.message
                ),
            )
        })?;
        if !outputs {
            return Ok(Vec::new());
        }
        (0..inputs.len() as i64)
            .map(|j| {
                Ok(HopOutput {
                    hidden: Some(to_wire(&out.narrow(1, j, 1))?),
                    carry: Vec::new(),
                })
            })
            .collect()
    }

    /// Runs one step alone: [`Session::prepare`], the forward, then
    /// [`Session::collect`].
    fn run_input(
        &mut self,
        engine: &Engine,
        manifest: &Manifest,
        req: &StepInput,
        is_last: bool,
    ) -> Result<StepOutput, WireError> {
        let span = self.span;
        let out = {
            let prepared = self.prepare(engine, manifest, req)?;
            prepared.run_alone(&engine.model, span)
        };
        let out = out.map_err(|e| self.failed(e, req))?;
        self.collect(req, out, is_last)
    }

    /// Readies one step: checks its inputs and position, sets up the trace
    /// at its step 0, and begins the step's interpreter with the carried
    /// values in it. The forward is the caller's ([`Prepared::step`] for a
    /// packed one, [`Prepared::run_alone`]); [`Session::collect`] ends it.
    pub(super) fn prepare<'s>(
        &'s mut self,
        engine: &'s Engine,
        manifest: &'s Manifest,
        req: &StepInput,
    ) -> Result<Prepared<'s>, WireError> {
        let model = &engine.model;
        let device = model.device();
        let trace = req.trace as usize;
        let steps = match self.plan.steps.get(trace) {
            Some(&n) if req.step < n => n,
            _ => {
                return Err(malformed(format!(
                    "trace {} step {} is not in the graph",
                    req.trace, req.step
                )));
            }
        };
        self.applied = Some((req.trace, req.step));
        if req.step == 0 {
            let prompts = trace_prompts(&self.graph, trace);
            self.padded = Some(Padded::new(&prompts, device));
            self.cache = Some(model.new_cache());
        }
        let span = self.span;
        let Session {
            graph,
            plan,
            fragment,
            store,
            cache,
            padded,
            ..
        } = self;
        let (padded, cache) = positioned(padded, cache, req.trace, req.step, req.past)?;
        let stop = plan.stops[trace].filter(|a| req.step + 1 == steps && a.trace == req.trace);
        let mut exec = Executor::new(graph, plan, manifest, model, store);
        exec.set_first_layer(span.start);
        exec.begin(req.trace, req.step, &padded.lens);
        let input = step_input(engine, manifest, span, req, padded, exec.rows(), stop)?;
        for c in &req.carry {
            let node = NodeId(c.node);
            if fragment.carry_in.binary_search(&node).is_err() {
                return Err(malformed(format!(
                    "the step carries node {}, which this stage's fragment does not take in",
                    c.node
                )));
            }
            check_carried(plan, node, (req.trace, req.step), &c.value)?;
            exec.insert(node, from_wire(&c.value, device)?);
        }
        Ok(Prepared {
            exec,
            padded,
            cache,
            step: req.step,
            input,
        })
    }

    /// The error of a step whose forward or graph failed (counting caught
    /// panics).
    pub(super) fn failed(&mut self, e: HookError, req: &StepInput) -> WireError {
        if matches!(e, HookError::Panic(_)) {
            self.panics += 1;
        }
        err(
            ErrorKind::Internal,
            format!(
                "running the graph at trace {} step {}: {e}",
                req.trace, req.step
            ),
        )
    }

    /// Ends a step after its forward (`out`: the logits or hidden state,
    /// `None` after a stop): what goes on to the next hop and back to the
    /// client.
    pub(super) fn collect(
        &mut self,
        req: &StepInput,
        out: Option<Tensor>,
        is_last: bool,
    ) -> Result<StepOutput, WireError> {
        let Session {
            graph,
            fragment,
            store,
            ..
        } = self;
        let saves = store
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
                .filter(|n| store.is_fresh(**n))
                .filter_map(|n| store.value(*n).map(|v| (n, v)))
                .map(|(n, v)| {
                    Ok(Carried {
                        node: n.0,
                        value: to_wire(v)?,
                    })
                })
                .collect::<Result<Vec<_>, WireError>>()
        };
        let carry = fresh(&fragment.carry_out)?;
        let relay = fresh(&fragment.relay_out)?;
        let generating = graph.traces[req.trace as usize].max_new_tokens > 0;
        let next = match out {
            None if is_last => Next::Done(Vec::new()),
            None => Next::Stopped,
            Some(logits) if is_last => {
                let tokens = if generating {
                    let next = logits
                        .f_select(1, -1)
                        .and_then(|l| l.f_argmax(-1, false))
                        .map_err(|e| err(ErrorKind::Internal, e.to_string()))?;
                    Vec::<i64>::try_from(&next)
                        .map_err(|e| err(ErrorKind::Internal, e.to_string()))?
                        .into_iter()
                        .map(|i| i as u32)
                        .collect()
                } else {
                    Vec::new()
                };
                Next::Done(tokens)
            }
            Some(h) => Next::Hidden(to_wire(&h)?),
        };
        Ok(StepOutput {
            next,
            carry,
            saves,
            relay,
            replayed: Vec::new(),
            chunked: 0,
            timing: StepTiming::default(),
        })
    }
}

/// A step readied by [`Session::prepare`]: its interpreter (begun, carried
/// values in), layout, cache and input.
pub(super) struct Prepared<'s> {
    exec: Executor<'s>,
    padded: &'s Padded,
    cache: &'s mut Cache,
    step: u32,
    /// `None` when an earlier stage stopped the forward: the fragment runs
    /// without one.
    input: Option<Input>,
}

impl<'s> Prepared<'s> {
    /// Its part of a packed forward, or, after an upstream stop, `None`
    /// (its fragment has run).
    ///
    /// # Errors
    /// When the fragment fails without a forward.
    pub(super) fn step(&mut self) -> Result<Option<Step<'_, 's>>, HookError> {
        match self.input.take() {
            Some(input) => Ok(Some(Step {
                exec: &mut self.exec,
                padded: self.padded,
                step: self.step,
                input,
                cache: &mut *self.cache,
            })),
            None => {
                self.exec.finish()?;
                Ok(None)
            }
        }
    }

    /// Runs the step's forward alone.
    fn run_alone(mut self, model: &Model, span: Span) -> Result<Option<Tensor>, HookError> {
        match self.step()? {
            Some(step) => forward_steps(model, span.range(), vec![step])
                .pop()
                .expect("one result per step"),
            None => Ok(None),
        }
    }
}

/// The forward's input for this step, after checking what the peer sent:
/// token ids on the first stage, a hidden state of the right shape and
/// dtype on the others. `None` when an earlier stage stopped the forward
/// (the graph's Stop), which is only valid at the stop's step when the stop
/// point lies before this stage.
fn step_input(
    engine: &Engine,
    manifest: &Manifest,
    span: Span,
    req: &StepInput,
    padded: &Padded,
    rows: usize,
    stop: Option<nnmesh_graph::Anchor>,
) -> Result<Option<Input>, WireError> {
    let model = &engine.model;
    let device = model.device();
    let shape = |t: &WireTensor| format!("{:?} {:?}", t.dtype, t.shape);
    if span.start == 0 {
        if let Some(h) = &req.hidden {
            return Err(malformed(format!(
                "the first stage takes token ids, not a hidden state ({})",
                shape(h)
            )));
        }
        if req.step == 0 {
            if !req.tokens.shape.contains(&0) {
                return Err(malformed(format!(
                    "step 0 takes its tokens from the graph's prompts, but the step carries {}",
                    shape(&req.tokens)
                )));
            }
            return Ok(Some(Input::Tokens(padded.ids.shallow_clone())));
        }
        let invokes = padded.lens.len() as u64;
        if req.tokens.dtype != WireDType::I64 || req.tokens.shape != [invokes, 1] {
            return Err(malformed(format!(
                "step {} needs I64 [{invokes}, 1] token ids (one per invoke), got {}",
                req.step,
                shape(&req.tokens)
            )));
        }
        let ids = req
            .tokens
            .to_i64()
            .map_err(|e| malformed(format!("token ids: {e}")))?;
        let vocab = model.config().vocab_size as i64;
        if let Some(&bad) = ids.iter().find(|&&id| !(0..vocab).contains(&id)) {
            return Err(malformed(format!(
                "token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        return Ok(Some(Input::Tokens(from_wire(&req.tokens, device)?)));
    }
    let Some(h) = &req.hidden else {
        let first_site = manifest
            .position(
                nnmesh_graph::Module::Layer(span.start),
                nnmesh_graph::Point::Input,
            )
            .unwrap_or(0);
        return match stop {
            Some(a) if a.position < first_site => Ok(None),
            _ => Err(malformed(format!(
                "trace {} step {} carries no hidden state, and the graph does not stop before layer {}",
                req.trace, req.step, span.start
            ))),
        };
    };
    let tokens = if req.step == 0 {
        padded.ids.size()[1] as u64
    } else {
        1
    };
    let want = [rows as u64, tokens, model.config().hidden_size as u64];
    if Some(h.dtype) != wire_dtype(model.kind()) || h.shape != want {
        return Err(malformed(format!(
            "the hidden state must be {:?} {want:?} at trace {} step {}, got {}",
            wire_dtype(model.kind()),
            req.trace,
            req.step,
            shape(h)
        )));
    }
    Ok(Some(Input::Hidden(from_wire(h, device)?)))
}

/// Checks a carried value's dtype and shape against the plan. A value
/// travels in the step it is computed in (carry) or the next one (a relay,
/// or a relay carried on), so for a per-step node its shape is the one of
/// this step or the previous step of its steps, or of its last step when it
/// comes from an earlier trace.
fn check_carried(
    plan: &Plan,
    node: NodeId,
    (trace, step): (u32, u32),
    value: &WireTensor,
) -> Result<(), WireError> {
    let np = &plan.nodes[node.index()];
    let allowed: Vec<&nnmesh_graph::TensorMeta> = match np.per_step {
        None => vec![&np.meta],
        Some(set) => {
            let mut metas: Vec<_> = [Some(step), step.checked_sub(1)]
                .into_iter()
                .flatten()
                .filter(|&s| set.contains(trace, s))
                .filter_map(|s| plan.meta_at(node, s))
                .collect();
            if set.trace < trace {
                metas.extend(plan.meta_at(node, set.end - 1));
            }
            metas
        }
    };
    let fits = |m: &&nnmesh_graph::TensorMeta| {
        wire_dtype(ops::kind(m.dtype)) == Some(value.dtype) && m.shape == value.shape
    };
    if allowed.iter().any(fits) {
        return Ok(());
    }
    let want: Vec<String> = allowed
        .iter()
        .map(|m| format!("{:?} {:?}", m.dtype, m.shape))
        .collect();
    Err(malformed(format!(
        "carried node {node} must be {} at trace {trace} step {step}, got {:?} {:?}",
        if want.is_empty() {
            "absent".to_string()
        } else {
            want.join(" or ")
        },
        value.dtype,
        value.shape
    )))
}
