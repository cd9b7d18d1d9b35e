//! One request along one route: driving each step hop by hop, checking
//! every report, noticing a stage that dies, and carrying the request
//! across its loss.
//!
//! The client sends each hop its input and gets back the hop's output (the
//! next hop's input), so it holds every hop's history: the inputs of every
//! step it ran. When a hop fails in a way another holder could survive, the
//! [`Failover`] state machine picks a replacement (one or several holders
//! covering its layers); the first gets the dead hop's whole history to
//! replay before the step at hand, at the same positions (each input says
//! how many positions its KV cache must hold, and the stage checks), and a
//! chain of several replacements passes the replayed outputs along. Saves
//! and relays of replayed steps are not reported again; when a step is
//! retried, what arrived before the failure is kept and repeats dropped.

use std::{
    collections::{BTreeSet, HashSet, VecDeque},
    time::{Duration, Instant as StdInstant},
};

use nnmesh_control::{
    detect::{self, Detector},
    failover::{self, Action, Event, Failover, Failure},
    route::{Leg, best_holder},
};
use nnmesh_graph::{Fragment, Graph, Inputs, Manifest, Node, NodeId, Plan, partition, validate};
use nnmesh_protocol::{
    Span,
    ids::{ModelId, RequestId},
    message::{
        Carried, Hop, HopOutput, ReportBody, Request, Response, Saved, StageReport, StepInput,
        StepRequest, StepTiming,
    },
    tensor::WireTensor,
};
use tokio::{
    sync::{broadcast, mpsc},
    time::Instant,
};

use super::{
    Client, Error, HopStats, Outcome, Peer, Pending, Progress, Route, StageName, candidate,
    choose_route,
    verify::{self, Tolerance},
};
use crate::transport::{PeerEvent, RequestError};

/// How long closing the request on each stage may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs `graph` through the mesh (see [`Client::run`]).
pub(super) async fn run(
    client: &Client,
    graph: Graph,
    model: Option<ModelId>,
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> Result<Outcome, Error> {
    let out = run_once(client, graph, model, progress).await;
    if out.as_ref().map_or(true, |o| o.failovers > 0) {
        // The mesh changed under us: look again next time.
        *client.known.lock().expect("not poisoned") = None;
    }
    out
}

async fn run_once(
    client: &Client,
    mut graph: Graph,
    model: Option<ModelId>,
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> Result<Outcome, Error> {
    let peers = client.routable_peers(model).await?;
    let (model, route) = choose_route(&peers, model)?;
    let twins: Vec<Stage> = match client.verify {
        Some(_) => twins(&peers, &route)?
            .into_iter()
            .map(|(p, span)| Stage::new(p.clone(), span))
            .collect(),
        None => Vec::new(),
    };
    let route: Vec<Stage> = route
        .into_iter()
        .map(|(p, span)| Stage::new(p.clone(), span))
        .collect();
    let manifest = route[0].peer.manifest.clone();
    // The graph must pass on every stage: check it against the tightest limits.
    let limits = route
        .iter()
        .skip(1)
        .fold(route[0].peer.record.limits.clone(), |l, s| {
            l.tightest(&s.peer.record.limits)
        });
    // Any holder of the model tokenizes; the route's first.
    let tokenizers: Vec<&Peer> = route
        .iter()
        .map(|s| &s.peer)
        .chain(peers.iter().filter(|p| p.record.model == model))
        .collect();
    client
        .tokenize_prompts(&tokenizers, model, &mut graph)
        .await?;
    let graph_bytes = graph.to_postcard();
    if graph_bytes.len() as u64 > limits.max_graph_bytes {
        return Err(Error::GraphTooLarge {
            bytes: graph_bytes.len() as u64,
            limit: limits.max_graph_bytes,
        });
    }
    let inputs = Inputs::from_tokens(&graph).ok_or_else(|| Error::Protocol {
        peer: route[0].peer.peer,
        detail: "tokenization left a text prompt".into(),
    })?;
    let plan = validate(&graph, &manifest, &inputs, &limits)?;
    let spans: Vec<Span> = route.iter().map(|s| s.span).collect();
    let fragments = partition(&graph, &plan, &manifest, &spans)?;

    let request = RequestId(super::random_u64());
    let (tx, rx) = mpsc::channel(64);
    // Subscribe before dialling, so no disconnection goes unseen.
    let events = client.transport.peer_events();
    client.pending.lock().expect("not poisoned").insert(
        request,
        Pending {
            reports: tx,
            route: route.iter().map(|s| s.peer.peer).collect(),
            twins: twins.iter().map(|s| s.peer.peer).collect(),
        },
    );
    let client_addrs = client
        .transport
        .listen_addrs()
        .await
        .iter()
        .map(|a| a.to_string())
        .collect();
    progress(&Progress::Route(route.iter().map(Stage::hop).collect()));
    let mut run = Run {
        client,
        progress: std::sync::Mutex::new(progress),
        request,
        model,
        client_addrs,
        route,
        graph: &graph,
        plan: &plan,
        manifest: &manifest,
        fragments,
        graph_bytes,
        rx,
        events,
        failover: Failover::new(client.failover.clone(), request.0),
        twins,
        verify: client.verify,
        arrived: HashSet::new(),
        step_failed: false,
        twin_saves: Vec::new(),
        twin_relayed: Vec::new(),
        used: Vec::new(),
        known: peers.clone(),
        saves: Vec::new(),
        relayed: Vec::new(),
        failovers: 0,
        hops: Vec::new(),
        sent: now(),
        accepted: now(),
    };
    let result = run.drive().await;
    client
        .pending
        .lock()
        .expect("not poisoned")
        .remove(&request);
    // Close the request on every stage it touched, the replaced ones too.
    let close = Request::Close { request };
    let closes = run
        .route
        .iter()
        .chain(&run.twins)
        .map(|s| &s.peer)
        .chain(&run.used)
        .map(|p| tokio::time::timeout(CLOSE_TIMEOUT, client.call(p.peer, p.addrs.clone(), &close)));
    futures::future::join_all(closes).await;
    let generated = result?;
    Ok(Outcome {
        saves: run.saves,
        generated,
        route: run.route.iter().map(Stage::hop).collect(),
        model,
        failovers: run.failovers,
        hops: run.hops,
        history_bytes: run
            .route
            .iter()
            .flat_map(|s| &s.history)
            .map(|i| {
                let carried: usize = i.carry.iter().map(|c| c.value.data.len()).sum();
                (i.tokens.data.len() + i.hidden.as_ref().map_or(0, |h| h.data.len()) + carried)
                    as u64
            })
            .sum(),
    })
}

/// For verification: for each hop of `route`, the cheapest other holder of
/// all its layers (same model and dtype).
pub(super) fn twins<'a>(peers: &'a [Peer], route: &[(&Peer, Span)]) -> Result<Route<'a>, Error> {
    let same =
        |p: &Peer| p.record.model == route[0].0.record.model && p.manifest == route[0].0.manifest;
    let usable: Vec<&Peer> = peers.iter().filter(|p| same(p)).collect();
    let cands: Vec<_> = usable.iter().map(|p| candidate(p)).collect();
    route
        .iter()
        .map(|&(p, span)| {
            best_holder(&cands, span, &[p.peer])
                .map(|i| (usable[i], span))
                .ok_or(Error::NoTwin { span })
        })
        .collect()
}

/// A hop of the route, with what the client sent it.
#[derive(Debug)]
struct Stage {
    peer: Peer,
    /// The layers it runs (part or all of what it serves).
    span: Span,
    /// The inputs of every step its layers ran for this request, in order
    /// (a replacement inherits them): what a replacement replays.
    history: Vec<StepInput>,
    /// How many of `history` this holder has run; the rest it replays
    /// before its next step.
    ran: usize,
    /// Whether it has the request's session (and so needs no graph).
    opened: bool,
}

impl Stage {
    fn new(peer: Peer, span: Span) -> Stage {
        Stage {
            peer,
            span,
            history: Vec::new(),
            ran: 0,
            opened: false,
        }
    }

    fn hop(&self) -> Hop {
        self.peer.hop(self.span)
    }

    /// Files a step the holder finished (after replaying what it had to).
    fn ran_step(&mut self, input: StepInput) {
        self.history.push(input);
        self.ran = self.history.len();
    }
}

/// Which of a hop's holders: the route's, or (with verification) its twin,
/// a second holder of the same layers that runs every step as well.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Primary,
    Twin,
}

/// How one hop's step ended.
#[derive(Debug)]
enum HopResult {
    /// A non-last hop: the next hop's input.
    Output(HopOutput),
    /// The last hop: the greedy next tokens.
    Done(Vec<u32>),
}

/// Why one hop's step did not end.
enum HopError {
    /// A failure fail-over may carry the request across.
    Failed {
        failure: Failure,
        /// What happened, for the error if fail-over gives up.
        detail: String,
        /// The stage's own error, returned as is if the failure is not
        /// retriable (a refusal or failure any holder would repeat).
        error: Option<Error>,
    },
    /// The request cannot go on (the client's own failure, a lying stage).
    Fatal(Error),
}

impl From<Error> for HopError {
    fn from(e: Error) -> Self {
        HopError::Fatal(e)
    }
}

/// The state of one request while it runs.
struct Run<'a> {
    client: &'a Client,
    /// The caller's progress callback (in a mutex so that `Run` is `Sync`
    /// and can be borrowed across awaits).
    progress: std::sync::Mutex<&'a mut (dyn FnMut(&Progress) + Send)>,
    request: RequestId,
    model: ModelId,
    client_addrs: Vec<String>,
    route: Vec<Stage>,
    graph: &'a Graph,
    plan: &'a Plan,
    manifest: &'a Manifest,
    fragments: Vec<Fragment>,
    graph_bytes: Vec<u8>,
    rx: mpsc::Receiver<StageReport>,
    events: broadcast::Receiver<PeerEvent>,
    failover: Failover,
    /// With verification: for each hop, a second holder of its layers.
    twins: Vec<Stage>,
    verify: Option<Tolerance>,
    /// The saves of the running step that arrived.
    arrived: HashSet<(String, Option<u32>)>,
    /// Whether a hop failed during the running step.
    step_failed: bool,
    /// What the twin of the hop being verified saved and relayed.
    twin_saves: Vec<Saved>,
    twin_relayed: Vec<Carried>,
    /// Peers replaced along the way (closed at the end too).
    used: Vec<Peer>,
    /// The holders the request last found: a lost hop's replacement is
    /// looked for among them first, at once; the mesh is asked anew when
    /// they do not do.
    known: Vec<Peer>,
    saves: Vec<Saved>,
    /// Values later stages sent back for earlier ones, for the next step.
    relayed: Vec<Carried>,
    failovers: u32,
    /// Per hop of the route: where its steps' time went.
    hops: Vec<HopStats>,
    /// When the step being awaited was sent to its hop, and accepted.
    sent: StdInstant,
    accepted: StdInstant,
}

impl Run<'_> {
    /// Adds a finished step's time to its hop's figures.
    fn record(&mut self, hop: usize, t: &StepTiming) {
        if self.hops.len() <= hop {
            self.hops.resize(hop + 1, HopStats::default());
        }
        let h = &mut self.hops[hop];
        h.steps += 1;
        h.total += now().saturating_duration_since(self.sent);
        h.accept += self.accepted.saturating_duration_since(self.sent);
        h.queued += Duration::from_micros(t.queued_us);
        h.compute += Duration::from_micros(t.compute_us);
        h.batched += u32::from(t.batch > 1);
        h.max_batch = h.max_batch.max(t.batch);
        h.batch_sum += u64::from(t.batch);
    }

    fn notify(&self, p: &Progress) {
        (self.progress.lock().expect("not poisoned"))(p);
    }

    fn lane(&self, side: Side) -> &Vec<Stage> {
        match side {
            Side::Primary => &self.route,
            Side::Twin => &self.twins,
        }
    }

    fn lane_mut(&mut self, side: Side) -> &mut Vec<Stage> {
        match side {
            Side::Primary => &mut self.route,
            Side::Twin => &mut self.twins,
        }
    }

    fn stage(&self, hop: usize) -> StageName {
        self.stage_on(Side::Primary, hop)
    }

    fn stage_on(&self, side: Side, hop: usize) -> StageName {
        let s = &self.lane(side)[hop];
        StageName {
            hop: hop as u32,
            peer: s.peer.peer,
            span: s.span,
        }
    }

    fn hops(&self, side: Side) -> Vec<Hop> {
        self.lane(side).iter().map(Stage::hop).collect()
    }

    /// Positions every hop's KV cache holds for `trace` before `step`.
    fn past(&self, trace: u32, step: u32) -> u32 {
        if step == 0 {
            0
        } else {
            let longest = self.plan.costs[trace as usize].prompt_tokens as u32;
            longest + step - 1
        }
    }

    /// Runs every step of every trace; returns the generated tokens.
    async fn drive(&mut self) -> Result<Vec<Vec<Vec<u32>>>, Error> {
        let mut generated = Vec::new();
        for (t, trace) in self.graph.traces.iter().enumerate() {
            let rows = trace.invokes.len();
            let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); rows];
            let mut last: Vec<u32> = Vec::new();
            for step in 0..self.plan.steps[t] {
                let done = self.step(t as u32, step, &last).await?;
                self.notify(&Progress::Step {
                    trace: t as u32,
                    step,
                    steps: self.plan.steps[t],
                });
                if trace.max_new_tokens > 0 && !done.is_empty() {
                    for (row, &id) in tokens.iter_mut().zip(&done) {
                        row.push(id);
                    }
                    last = done;
                }
            }
            generated.push(tokens);
        }
        Ok(generated)
    }

    /// Runs one step through every hop, replacing hops that fail; returns
    /// the last hop's tokens.
    async fn step(&mut self, trace: u32, step: u32, last: &[u32]) -> Result<Vec<u32>, Error> {
        let ids: Vec<i64> = last.iter().map(|&i| i64::from(i)).collect();
        let shape = if step == 0 {
            vec![0, 0]
        } else {
            vec![ids.len() as u64, 1]
        };
        let past = self.past(trace, step);
        let mut input = StepInput {
            trace,
            step,
            past,
            tokens: WireTensor::from_i64(shape, &ids).expect("one id per row"),
            hidden: None,
            // Values later stages sent back for earlier ones.
            carry: std::mem::take(&mut self.relayed),
        };
        self.arrived.clear();
        self.step_failed = false;
        let mut hop = 0;
        loop {
            let result = self.run_hop_surviving(Side::Primary, hop, &input).await?;
            if self.verify.is_some() {
                let twin = self.run_hop_surviving(Side::Twin, hop, &input).await?;
                self.check_twin(hop, &input, &result, &twin)?;
                self.twins[hop].ran_step(input.clone());
            }
            self.route[hop].ran_step(input);
            match result {
                HopResult::Output(out) => {
                    input = StepInput {
                        trace,
                        step,
                        past,
                        tokens: WireTensor::from_i64(vec![0, 0], &[]).expect("empty"),
                        hidden: out.hidden,
                        carry: out.carry,
                    };
                    hop += 1;
                }
                HopResult::Done(tokens) => return Ok(tokens),
            }
        }
    }

    /// Runs one hop's step on `side`, replacing its holder while it fails
    /// in a way another holder could survive.
    async fn run_hop_surviving(
        &mut self,
        side: Side,
        hop: usize,
        input: &StepInput,
    ) -> Result<HopResult, Error> {
        // The saves of the step so far (all its hops), against repeats.
        let mut arrived = match side {
            Side::Primary => std::mem::take(&mut self.arrived),
            Side::Twin => {
                self.twin_saves.clear();
                self.twin_relayed.clear();
                HashSet::new()
            }
        };
        // After a failure in this step, saves may arrive again (from the
        // replacement, or from the hops after a replacement chain).
        let mut retried = self.step_failed;
        loop {
            match self.run_hop(side, hop, input, &mut arrived, retried).await {
                Ok(result) => {
                    if side == Side::Primary {
                        if matches!(result, HopResult::Done(_)) {
                            self.check_complete(input.trace, input.step, &arrived)?;
                        }
                        self.arrived = arrived;
                    }
                    if retried {
                        self.failover.on_event(now(), Event::Recovered);
                    }
                    return Ok(result);
                }
                Err(HopError::Fatal(e)) => return Err(e),
                Err(HopError::Failed {
                    failure,
                    detail,
                    error,
                }) => {
                    self.fail_over(side, hop, input.trace, input.step, failure, detail, error)
                        .await?;
                    retried = true;
                    self.step_failed = true;
                }
            }
        }
    }

    /// Replaces hop `hop` of `side` after it failed, or says why it cannot be.
    #[allow(clippy::too_many_arguments)]
    async fn fail_over(
        &mut self,
        side: Side,
        hop: usize,
        trace: u32,
        step: u32,
        failure: Failure,
        detail: String,
        error: Option<Error>,
    ) -> Result<(), Error> {
        let dead = self.stage_on(side, hop);
        tracing::warn!(%dead, trace, step, %detail, ?side, "a stage failed; failing over");
        // Verified hops keep two different holders of the same layers.
        let other = match (self.verify, side) {
            (None, _) => None,
            (Some(_), Side::Primary) => Some(self.twins[hop].peer.peer),
            (Some(_), Side::Twin) => Some(self.route[hop].peer.peer),
        };
        if failure == Failure::Lost {
            self.client.mark_dead(dead.peer);
        }
        let mut actions = self.failover.on_event(
            now(),
            Event::HopFailed {
                peer: dead.peer,
                span: dead.span,
                failure,
            },
        );
        let mut peers: Vec<Peer> = Vec::new();
        // A lost hop is replaced from the holders already known, at once
        // (those found dead are left out, so this cannot loop); a refusal
        // may mean those records are stale, so the mesh is asked anew.
        let mut looked = failure != Failure::Lost;
        while let Some(action) = actions.pop() {
            actions = match action {
                Action::Discover { span } => {
                    let found = if looked {
                        let fresh = self.client.discover().await.unwrap_or_default();
                        self.known.clone_from(&fresh);
                        fresh
                    } else {
                        looked = true;
                        self.known.clone()
                    };
                    peers = found
                        .into_iter()
                        .filter(|p| {
                            self.same_model(p)
                                && Some(p.peer) != other
                                && !self.client.is_dead(&p.peer)
                        })
                        .collect();
                    let cands: Vec<_> = peers.iter().map(candidate).collect();
                    self.failover.on_event(
                        now(),
                        Event::Candidates {
                            span,
                            cands: &cands,
                        },
                    )
                }
                Action::WaitUntil { at, span } => {
                    tokio::time::sleep_until(Instant::from_std(at)).await;
                    self.failover.on_event(now(), Event::Woke { span })
                }
                Action::Replace { span, mut legs } => {
                    if self.verify.is_some() && legs.len() > 1 {
                        // A verified hop is compared with its twin as a
                        // whole: its replacement must be one holder.
                        let cands: Vec<_> = peers.iter().map(candidate).collect();
                        let banned: Vec<_> = cands
                            .iter()
                            .map(|c| c.peer)
                            .filter(|p| self.failover.is_blacklisted(now(), p))
                            .collect();
                        match best_holder(&cands, span, &banned) {
                            Some(i) => legs = vec![Leg { candidate: i, span }],
                            None => {
                                return Err(Error::GaveUp {
                                    stage: dead,
                                    trace,
                                    step,
                                    failure: detail,
                                    why: failover::GiveUp::NoHolder { span, attempts: 1 },
                                });
                            }
                        }
                    }
                    let new: Vec<Stage> = legs
                        .iter()
                        .map(|l| Stage::new(peers[l.candidate].clone(), l.span))
                        .collect();
                    let by: Vec<Hop> = new.iter().map(Stage::hop).collect();
                    let replay = self.lane(side)[hop].history.len() as u32;
                    self.replace(side, hop, span, new)?;
                    self.notify(&Progress::FailedOver {
                        failed: dead.clone(),
                        reason: detail.clone(),
                        by,
                        replay,
                    });
                    Vec::new()
                }
                Action::GiveUp(why) => {
                    let gave_up = |why| Error::GaveUp {
                        stage: dead,
                        trace,
                        step,
                        failure: detail,
                        why,
                    };
                    return Err(match why {
                        // Not a mesh problem: the stage's own error says it best.
                        failover::GiveUp::NotRetriable { .. } => {
                            error.unwrap_or_else(|| gave_up(why))
                        }
                        why => gave_up(why),
                    });
                }
            };
        }
        Ok(())
    }

    /// Whether `p` serves this request's model in the same dtype (a
    /// replacement must compute exactly what the failed stage did).
    fn same_model(&self, p: &Peer) -> bool {
        p.record.model == self.model && p.manifest == *self.manifest
    }

    /// Puts `new` (covering `span`) in place of hop `hop`; the first new
    /// stage inherits the old one's history to replay (the others get
    /// theirs from the outputs of that replay).
    fn replace(
        &mut self,
        side: Side,
        hop: usize,
        span: Span,
        mut new: Vec<Stage>,
    ) -> Result<(), Error> {
        let old = &self.lane(side)[hop];
        debug_assert_eq!(old.span, span);
        if let Some(first) = new.first_mut() {
            first.history = old.history.clone();
        }
        let lane = self.lane(side);
        let spans: Vec<Span> = lane[..hop]
            .iter()
            .map(|s| s.span)
            .chain(new.iter().map(|s| s.span))
            .chain(lane[hop + 1..].iter().map(|s| s.span))
            .collect();
        // A twin keeps its hop's layers (one holder), so its fragments are
        // the route's.
        let fragments = match side {
            Side::Primary => Some(partition(self.graph, self.plan, self.manifest, &spans)?),
            Side::Twin => None,
        };
        tracing::info!(
            replaced = %self.stage_on(side, hop),
            by = ?new.iter().map(|s| format!("{} on {}", s.span, s.peer.peer)).collect::<Vec<_>>(),
            replay = old.history.len(),
            "stage replaced"
        );
        let removed: Vec<Stage> = self.lane_mut(side).splice(hop..=hop, new).collect();
        self.used.extend(removed.into_iter().map(|s| s.peer));
        if let Some(f) = fragments {
            self.fragments = f;
        }
        self.failovers += 1;
        // Reports of the new route's peers are accepted from now on.
        if let Some(p) = self
            .client
            .pending
            .lock()
            .expect("not poisoned")
            .get_mut(&self.request)
        {
            p.route = self.route.iter().map(|s| s.peer.peer).collect();
            p.twins = self.twins.iter().map(|s| s.peer.peer).collect();
        }
        Ok(())
    }

    /// Sends hop `hop` its input (and, for a replacement, what to replay)
    /// and waits for its output.
    async fn run_hop(
        &mut self,
        side: Side,
        hop: usize,
        input: &StepInput,
        arrived: &mut HashSet<(String, Option<u32>)>,
        retried: bool,
    ) -> Result<HopResult, HopError> {
        let lane = self.lane(side);
        let stage = &lane[hop];
        let peer = stage.peer.peer;
        let replay = stage.history[stage.ran..].to_vec();
        // A chain of replacements: the next one needs this one's replayed
        // outputs as its own history.
        let replay_outputs =
            !replay.is_empty() && lane.get(hop + 1).is_some_and(|next| !next.opened);
        let msg = StepRequest {
            request: self.request,
            client: self.client.peer_id(),
            client_addrs: self.client_addrs.clone(),
            model: self.model,
            route: self.hops(side),
            hop: hop as u32,
            graph: (!stage.opened).then(|| self.graph_bytes.clone()),
            input: input.clone(),
            replay,
            replay_outputs,
        };
        let addrs = stage.peer.addrs.clone();
        if side == Side::Primary {
            self.sent = now();
        }
        match self
            .client
            .call(peer, addrs, &Request::Step(Box::new(msg)))
            .await
        {
            Ok(Response::Accepted) => {
                if side == Side::Primary {
                    self.accepted = now();
                }
            }
            Ok(other) => {
                return Err(HopError::Fatal(Error::Protocol {
                    peer,
                    detail: format!("Step answered {other:?}"),
                }));
            }
            Err(Error::Remote { peer, error }) => {
                return Err(HopError::Failed {
                    failure: Failure::Refused(error.kind),
                    detail: format!("it refused the step: {error}"),
                    error: Some(Error::Remote { peer, error }),
                });
            }
            Err(Error::Request {
                source:
                    e @ (RequestError::DialFailure { .. }
                    | RequestError::ConnectionClosed { .. }
                    | RequestError::Timeout { .. }
                    | RequestError::Io { .. }),
                ..
            }) => {
                let detail = e.to_string();
                return Err(HopError::Failed {
                    failure: Failure::Lost,
                    error: None,
                    detail,
                });
            }
            Err(e) => return Err(HopError::Fatal(e)),
        }
        let stage = &mut self.lane_mut(side)[hop];
        stage.opened = true;
        let replayed = stage.history[stage.ran..].to_vec();
        let accepted = Progress::Accepted {
            trace: input.trace,
            step: input.step,
            stage: self.stage_on(side, hop),
            replay: replayed.len() as u32,
        };
        self.notify(&accepted);
        self.await_hop(side, hop, input, &replayed, arrived, retried)
            .await
    }

    /// The tokens a hop's step computes, for its deadline: the step's, and
    /// those of the steps it replays first.
    fn step_tokens(&self, input: &StepInput, replayed: usize) -> f64 {
        let t = input.trace as usize;
        let rows = self.graph.traces[t].invokes.len() as f64;
        let tokens = if input.step == 0 {
            rows * self.plan.costs[t].prompt_tokens as f64
        } else {
            rows
        };
        tokens + replayed as f64 * rows * 2.0
    }

    /// Waits for hop `hop`'s reports of the step until its output, watching it.
    #[allow(clippy::too_many_arguments)]
    async fn await_hop(
        &mut self,
        side: Side,
        hop: usize,
        input: &StepInput,
        replayed: &[StepInput],
        arrived: &mut HashSet<(String, Option<u32>)>,
        retried: bool,
    ) -> Result<HopResult, HopError> {
        let (trace, step) = (input.trace, input.step);
        let expected = expected_saves(self.graph, self.plan, &self.fragments, trace, step);
        let peer = self.lane(side)[hop].peer.peer;
        // The failure detector decides; this loop carries out its actions
        // and feeds it what happens (control::detect).
        let mut detector = Detector::new(self.client.detect.clone());
        let mut timers: BTreeSet<StdInstant> = BTreeSet::new();
        let mut actions: VecDeque<detect::Action> = detector
            .on_event(
                now(),
                detect::Event::Sent {
                    tokens: self.step_tokens(input, replayed.len()),
                    // The twin holds the same layers; the route's holder
                    // sets the pace.
                    throughput: self.route[hop].peer.record.throughput,
                },
            )
            .into();
        loop {
            while let Some(action) = actions.pop_front() {
                let seen = match action {
                    detect::Action::WakeAt(at) => {
                        timers.insert(at);
                        continue;
                    }
                    detect::Action::Redial => {
                        if self.reachable(side, hop).await {
                            detect::Event::Redialed
                        } else {
                            detect::Event::RedialFailed
                        }
                    }
                    detect::Action::Probe => {
                        if self.answers_probe(side, hop).await {
                            detect::Event::ProbeAnswered
                        } else {
                            detect::Event::ProbeFailed
                        }
                    }
                    detect::Action::Lost(why) => {
                        return Err(HopError::Failed {
                            failure: Failure::Lost,
                            error: None,
                            detail: why.to_string(),
                        });
                    }
                    detect::Action::NoProgress { waited } => {
                        return Err(Error::NoProgress {
                            trace,
                            step,
                            secs: waited.as_secs(),
                        }
                        .into());
                    }
                };
                actions.extend(detector.on_event(now(), seen));
            }
            let wake = timers.first().copied();
            tokio::select! {
                report = self.rx.recv() => {
                    let report = report.ok_or(Error::Closed)?;
                    if (report.trace, report.step, report.hop as usize) != (trace, step, hop)
                        || report.peer != peer
                    {
                        tracing::debug!(report.trace, report.step, report.hop, "report for another step or hop; ignored");
                        continue;
                    }
                    let mut bodies = report.bodies.into_iter();
                    while let Some(body) = bodies.next() {
                        let Some(result) = self.on_report(
                            side, hop, body, input, replayed, &expected, arrived, retried,
                        )?
                        else {
                            continue;
                        };
                        if bodies.next().is_some() {
                            return Err(HopError::Fatal(Error::Protocol {
                                peer,
                                detail: "it reported more after the step's end".into(),
                            }));
                        }
                        if let (Side::Primary, Some(t)) = (side, report.timing) {
                            self.record(hop, &t);
                        }
                        return Ok(result);
                    }
                }
                event = self.events.recv() => {
                    let seen = match event {
                        Ok(PeerEvent::Unresponsive(p)) if p == peer => detect::Event::Unresponsive,
                        Ok(PeerEvent::Disconnected(p)) if p == peer => detect::Event::Disconnected,
                        Ok(_) => continue,
                        // Missed events: check the hop.
                        Err(broadcast::error::RecvError::Lagged(_)) => detect::Event::Disconnected,
                        Err(broadcast::error::RecvError::Closed) => return Err(Error::Closed.into()),
                    };
                    actions.extend(detector.on_event(now(), seen));
                }
                () = tokio::time::sleep_until(Instant::from_std(wake.unwrap_or_else(now))), if wake.is_some() => {
                    timers.pop_first();
                    actions.extend(detector.on_event(now(), detect::Event::Woke));
                }
            }
        }
    }

    /// Whether stage `hop` can be reached (connected, or dialled anew).
    async fn reachable(&self, side: Side, hop: usize) -> bool {
        let Some(addr) = self.lane(side)[hop].peer.addrs.first() else {
            return false;
        };
        matches!(
            tokio::time::timeout(
                self.client.detect.redial_timeout,
                self.client.transport.dial(addr.clone())
            )
            .await,
            Ok(Ok(_))
        )
    }

    /// Whether stage `hop` answers an `Info` probe in time.
    async fn answers_probe(&self, side: Side, hop: usize) -> bool {
        let p = &self.lane(side)[hop].peer;
        matches!(
            tokio::time::timeout(
                self.client.detect.probe_timeout,
                self.client.call(p.peer, p.addrs.clone(), &Request::Info)
            )
            .await,
            Ok(Ok(Response::Info { .. }))
        )
    }

    /// Checks and files one report of hop `hop`; `Some` when it ends the step.
    #[allow(clippy::too_many_arguments)]
    fn on_report(
        &mut self,
        side: Side,
        hop: usize,
        body: ReportBody,
        input: &StepInput,
        replayed: &[StepInput],
        expected: &[ExpectedSave],
        arrived: &mut HashSet<(String, Option<u32>)>,
        retried: bool,
    ) -> Result<Option<HopResult>, HopError> {
        let peer = self.lane(side)[hop].peer.peer;
        let protocol = |detail: String| HopError::Fatal(Error::Protocol { peer, detail });
        let last = hop + 1 == self.lane(side).len();
        match body {
            ReportBody::Saves(saves) => {
                for s in saves {
                    let known = expected
                        .iter()
                        .any(|e| e.name == s.name && e.step == s.step && e.stage == hop);
                    if !known {
                        return Err(protocol(format!(
                            "stage {hop} sent save {:?} (step {:?}), which the graph does not make there",
                            s.name, s.step
                        )));
                    }
                    if !arrived.insert((s.name.clone(), s.step)) {
                        if retried {
                            // Delivered before the failure: keep the first.
                            continue;
                        }
                        return Err(protocol(format!(
                            "stage {hop} sent save {:?} twice",
                            s.name
                        )));
                    }
                    match side {
                        Side::Primary => self.saves.push(s),
                        Side::Twin => self.twin_saves.push(s),
                    }
                }
                Ok(None)
            }
            ReportBody::Relay(values) => {
                let allowed = &self.fragments[hop].relay_out;
                if let Some(c) = values.iter().find(|c| !allowed.contains(&NodeId(c.node))) {
                    return Err(protocol(format!(
                        "stage {hop} relayed node {}, which its fragment does not send back",
                        c.node
                    )));
                }
                let relayed = match side {
                    Side::Primary => &mut self.relayed,
                    Side::Twin => &mut self.twin_relayed,
                };
                for c in values {
                    if !relayed.iter().any(|r| r.node == c.node) {
                        relayed.push(c);
                    }
                }
                Ok(None)
            }
            ReportBody::Replayed(outputs) => {
                // A chain of replacements: the next one replays these.
                let next = hop + 1;
                let lane = self.lane_mut(side);
                let wanted = next < lane.len() && !lane[next].opened;
                if !wanted || outputs.len() != replayed.len() {
                    return Err(protocol(format!(
                        "stage {hop} sent {} replayed outputs, {} expected",
                        outputs.len(),
                        if wanted { replayed.len() } else { 0 }
                    )));
                }
                lane[next].history = replayed
                    .iter()
                    .zip(outputs)
                    .map(|(i, o)| StepInput {
                        trace: i.trace,
                        step: i.step,
                        past: i.past,
                        tokens: WireTensor::from_i64(vec![0, 0], &[]).expect("empty"),
                        hidden: o.hidden,
                        carry: o.carry,
                    })
                    .collect();
                lane[next].ran = 0;
                Ok(None)
            }
            ReportBody::Output(out) if !last => Ok(Some(HopResult::Output(out))),
            ReportBody::Output(_) => Err(protocol(format!(
                "stage {hop} is the last and sent an output instead of finishing the step"
            ))),
            ReportBody::Done { tokens } => {
                if !last {
                    return Err(protocol(format!(
                        "stage {hop} reported a step done, but only the last stage can"
                    )));
                }
                let t = input.trace as usize;
                let trace = &self.graph.traces[t];
                let stopped = input.step + 1 == self.plan.steps[t] && self.plan.stops[t].is_some();
                let want = if trace.max_new_tokens > 0 && !stopped {
                    trace.invokes.len()
                } else {
                    0
                };
                if tokens.len() != want {
                    return Err(protocol(format!(
                        "stage {hop} reported {} tokens for trace {t}, step {}; expected {want} (one per invoke when generating)",
                        tokens.len(),
                        input.step
                    )));
                }
                Ok(Some(HopResult::Done(tokens)))
            }
            ReportBody::Failed(error) => Err(HopError::Failed {
                failure: Failure::Failed(error.kind),
                detail: format!("it reported {error}"),
                error: Some(Error::Stage {
                    stage: self.stage_on(side, hop),
                    trace: input.trace,
                    step: input.step,
                    error,
                }),
            }),
        }
    }

    /// Compares what hop `hop`'s twin computed from `input` with what its
    /// holder did: the output (or the tokens, at the last hop), the saves
    /// and the relayed values, within the verification tolerance.
    fn check_twin(
        &self,
        hop: usize,
        input: &StepInput,
        result: &HopResult,
        twin: &HopResult,
    ) -> Result<(), Error> {
        let Some(tol) = self.verify else {
            return Ok(());
        };
        let mismatch = |detail: String| Error::Mismatch {
            stage: self.stage(hop),
            twin: self.stage_on(Side::Twin, hop),
            trace: input.trace,
            step: input.step,
            detail,
        };
        match (result, twin) {
            (HopResult::Output(a), HopResult::Output(b)) => {
                verify::outputs(a, b, tol).map_err(mismatch)?;
            }
            (HopResult::Done(a), HopResult::Done(b)) if a != b => {
                return Err(mismatch(format!("tokens {a:?} against {b:?}")));
            }
            (HopResult::Done(_), HopResult::Done(_)) => {}
            _ => return Err(mismatch("one finished the step, the other did not".into())),
        }
        let expected = expected_saves(
            self.graph,
            self.plan,
            &self.fragments,
            input.trace,
            input.step,
        );
        for e in expected.iter().filter(|e| e.stage == hop) {
            let find = |saves: &[Saved]| {
                saves
                    .iter()
                    .rev()
                    .find(|s| s.name == e.name && s.step == e.step)
                    .map(|s| s.value.clone())
            };
            match (find(&self.saves), find(&self.twin_saves)) {
                (Some(a), Some(b)) => {
                    verify::tensors(&format!("save {:?}", e.name), &a, &b, tol).map_err(mismatch)?
                }
                _ => {
                    return Err(mismatch(format!(
                        "save {:?} is missing from one of them",
                        e.name
                    )));
                }
            }
        }
        for b in &self.twin_relayed {
            let a = self
                .relayed
                .iter()
                .find(|a| a.node == b.node)
                .ok_or_else(|| mismatch(format!("only the twin relayed node {}", b.node)))?;
            verify::tensors(&format!("relayed node {}", b.node), &a.value, &b.value, tol)
                .map_err(mismatch)?;
        }
        Ok(())
    }

    /// Fails the step if a save the graph makes at it did not arrive.
    fn check_complete(
        &self,
        trace: u32,
        step: u32,
        arrived: &HashSet<(String, Option<u32>)>,
    ) -> Result<(), Error> {
        let expected = expected_saves(self.graph, self.plan, &self.fragments, trace, step);
        let missing: Vec<String> = expected
            .iter()
            .filter(|e| !arrived.contains(&(e.name.clone(), e.step)))
            .map(|e| format!("save {:?} from {}", e.name, self.stage(e.stage)))
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(Error::MissingSaves {
                trace,
                step,
                missing: missing.join(", "),
            })
        }
    }
}

fn now() -> StdInstant {
    StdInstant::now()
}

/// A save the graph makes at a step, and the stage that makes it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ExpectedSave {
    name: String,
    /// `Some(step)` for a save made at every step of a generation.
    step: Option<u32>,
    stage: usize,
}

/// The saves made at `(trace, step)`: per-step saves at each step of their
/// set, the others at their anchor.
fn expected_saves(
    graph: &Graph,
    plan: &Plan,
    fragments: &[Fragment],
    trace: u32,
    step: u32,
) -> Vec<ExpectedSave> {
    let mut out = Vec::new();
    for (k, f) in fragments.iter().enumerate() {
        for id in &f.saves {
            let Node::Save { name, .. } = &graph.nodes[id.index()] else {
                continue;
            };
            let np = &plan.nodes[id.index()];
            let (due, step_of) = match np.per_step {
                Some(set) => (set.contains(trace, step), Some(step)),
                None => ((np.anchor.trace, np.anchor.step) == (trace, step), None),
            };
            if due {
                out.push(ExpectedSave {
                    name: name.clone(),
                    step: step_of,
                    stage: k,
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use nnmesh_graph::{Builder, DType, IndexItem::*, Limits, Point};

    use super::*;

    fn tiny() -> Manifest {
        Manifest {
            model: "tiny".into(),
            num_layers: 4,
            hidden: 8,
            heads: 2,
            kv_heads: 1,
            head_dim: 4,
            intermediate: 16,
            vocab: 32,
            max_positions: 64,
            dtype: DType::F32,
        }
    }

    #[test]
    fn expected_saves_follow_steps_and_stages() {
        let g = Builder::new();
        let t = g.trace_tokens(vec![vec![1, 2, 3]]).generate(3);
        let h = g.read(t.at("model.layers.3", Point::Output).all_steps());
        g.save("each", h.index([Full, At(-1), Full]));
        let once = g.read(t.at("model.layers.0", Point::Output).step(1));
        g.save("once", once);
        let graph = g.finish();
        let m = tiny();
        let inputs = Inputs::from_tokens(&graph).expect("tokens");
        let plan = validate(&graph, &m, &inputs, &Limits::default()).expect("valid");
        let route = [Span::new(0, 2), Span::new(2, 4)];
        let f = partition(&graph, &plan, &m, &route).expect("splits");
        let at = |s| {
            let mut v: Vec<(String, Option<u32>, usize)> = expected_saves(&graph, &plan, &f, 0, s)
                .into_iter()
                .map(|e| (e.name, e.step, e.stage))
                .collect();
            v.sort();
            v
        };
        assert_eq!(at(0), [("each".into(), Some(0), 1)]);
        assert_eq!(
            at(1),
            [("each".into(), Some(1), 1), ("once".into(), None, 0)]
        );
        assert_eq!(at(2), [("each".into(), Some(2), 1)]);
        assert!(expected_saves(&graph, &plan, &f, 1, 0).is_empty());
    }
}
