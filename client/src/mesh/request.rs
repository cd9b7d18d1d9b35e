//! One request along one route: sending its steps, checking every report,
//! and noticing a stage that dies.

use std::{collections::HashSet, time::Duration};

use nnmesh_graph::{Fragment, Graph, Inputs, Node, NodeId, Plan, partition, validate};
use nnmesh_protocol::{
    Span,
    ids::{ModelId, RequestId},
    message::{
        Carried, ErrorKind, Hop, ReportBody, Request, Response, Saved, StageReport, StepRequest,
    },
    tensor::WireTensor,
};
use tokio::{
    sync::{broadcast, mpsc},
    time::Instant,
};

use super::{Client, Error, Outcome, Peer, Pending, StageName, choose_route};
use crate::transport::{PeerEvent, RequestError};

/// How long a dial that checks whether a disconnected stage is still there may take.
const REDIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a stage may take to answer a liveness probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// A step's deadline: this much, plus [`DEADLINE_FACTOR`] times the compute
/// time the route's advertised throughput predicts.
const DEADLINE_BASE: Duration = Duration::from_secs(10);
const DEADLINE_FACTOR: f64 = 20.0;
/// Deadlines a step may pass while every stage still answers probes.
const DEADLINES: u32 = 3;
/// How long closing the request on each stage may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs `graph` through the mesh (see [`Client::run`]).
pub(super) async fn run(
    client: &Client,
    mut graph: Graph,
    model: Option<ModelId>,
) -> Result<Outcome, Error> {
    let peers = client.peers().await?;
    let (model, route) = choose_route(&peers, model)?;
    let route: Vec<Peer> = route.into_iter().cloned().collect();
    let manifest = route[0].manifest.clone();
    // The graph must pass on every stage: check it against the tightest limits.
    let limits = route
        .iter()
        .skip(1)
        .fold(route[0].record.limits.clone(), |l, p| {
            l.tightest(&p.record.limits)
        });
    client
        .tokenize_prompts(&route[0], model, &mut graph)
        .await?;
    let graph_bytes = graph.to_postcard();
    if graph_bytes.len() as u64 > limits.max_graph_bytes {
        return Err(Error::GraphTooLarge {
            bytes: graph_bytes.len() as u64,
            limit: limits.max_graph_bytes,
        });
    }
    let inputs = Inputs::from_tokens(&graph).ok_or_else(|| Error::Protocol {
        peer: route[0].peer,
        detail: "tokenization left a text prompt".into(),
    })?;
    let plan = validate(&graph, &manifest, &inputs, &limits)?;
    let spans: Vec<Span> = route.iter().map(|p| p.record.span).collect();
    let fragments = partition(&graph, &plan, &manifest, &spans)?;

    let request = RequestId(super::rand_u64());
    let (tx, rx) = mpsc::channel(64);
    // Subscribe before dialling, so no disconnection goes unseen.
    let events = client.transport.peer_events();
    client.pending.lock().expect("not poisoned").insert(
        request,
        Pending {
            reports: tx,
            route: route.iter().map(|p| p.peer).collect(),
        },
    );
    let client_addrs = client
        .transport
        .listen_addrs()
        .await
        .iter()
        .map(|a| a.to_string())
        .collect();
    let mut run = Run {
        client,
        request,
        model,
        client_addrs,
        hops: route.iter().map(Peer::hop).collect(),
        route: &route,
        graph: &graph,
        plan: &plan,
        fragments: &fragments,
        graph_bytes,
        rx,
        events,
        saves: Vec::new(),
        relayed: Vec::new(),
    };
    let result = run.drive().await;
    client
        .pending
        .lock()
        .expect("not poisoned")
        .remove(&request);
    let close = Request::Close { request };
    let closes = route
        .iter()
        .map(|p| tokio::time::timeout(CLOSE_TIMEOUT, client.call(p.peer, p.addrs.clone(), &close)));
    futures::future::join_all(closes).await;
    if result.is_err() {
        // The mesh may have changed under us: look again next time.
        *client.known.lock().expect("not poisoned") = None;
    }
    let generated = result?;
    Ok(Outcome {
        saves: run.saves,
        generated,
        route: run.hops,
        model,
    })
}

/// The state of one request while it runs.
struct Run<'a> {
    client: &'a Client,
    request: RequestId,
    model: ModelId,
    client_addrs: Vec<String>,
    hops: Vec<Hop>,
    route: &'a [Peer],
    graph: &'a Graph,
    plan: &'a Plan,
    fragments: &'a [Fragment],
    graph_bytes: Vec<u8>,
    rx: mpsc::Receiver<StageReport>,
    events: broadcast::Receiver<PeerEvent>,
    saves: Vec<Saved>,
    /// Values later stages sent back for earlier ones, for the next step.
    relayed: Vec<Carried>,
}

impl Run<'_> {
    fn stage(&self, hop: usize) -> StageName {
        let p = &self.route[hop];
        StageName {
            hop: hop as u32,
            peer: p.peer,
            span: p.record.span,
        }
    }

    fn lost(&self, hop: usize, trace: u32, step: u32, reason: String) -> Error {
        self.client.mark_dead(self.route[hop].peer);
        Error::StageLost {
            stage: self.stage(hop),
            trace,
            step,
            reason,
        }
    }

    /// Runs every step of every trace; returns the generated tokens.
    async fn drive(&mut self) -> Result<Vec<Vec<Vec<u32>>>, Error> {
        // Connect to every stage up front: a lost connection is how a dead
        // stage is noticed first.
        for hop in 0..self.route.len() {
            if !self.reachable(hop).await {
                return Err(self.lost(hop, 0, 0, "it cannot be reached".into()));
            }
        }
        let mut generated = Vec::new();
        for (t, trace) in self.graph.traces.iter().enumerate() {
            let rows = trace.invokes.len();
            let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); rows];
            let mut last: Vec<u32> = Vec::new();
            for step in 0..self.plan.steps[t] {
                let done = self.step(t as u32, step, &last).await?;
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

    /// Whether stage `hop` can be reached (connected, or dialled anew).
    async fn reachable(&self, hop: usize) -> bool {
        let Some(addr) = self.route[hop].addrs.first() else {
            return false;
        };
        matches!(
            tokio::time::timeout(REDIAL_TIMEOUT, self.client.transport.dial(addr.clone())).await,
            Ok(Ok(_))
        )
    }

    /// Sends one step to the first stage and waits until the last reports it done.
    async fn step(&mut self, trace: u32, step: u32, last: &[u32]) -> Result<Vec<u32>, Error> {
        let ids: Vec<i64> = last.iter().map(|&i| i64::from(i)).collect();
        let shape = if step == 0 {
            vec![0, 0]
        } else {
            vec![ids.len() as u64, 1]
        };
        let msg = StepRequest {
            request: self.request,
            client: self.client.peer_id(),
            client_addrs: self.client_addrs.clone(),
            model: self.model,
            route: self.hops.clone(),
            hop: 0,
            graph: (step == 0).then(|| self.graph_bytes.clone()),
            trace,
            step,
            tokens: WireTensor::from_i64(shape, &ids).expect("one id per row"),
            hidden: None,
            carry: std::mem::take(&mut self.relayed),
        };
        let first = &self.route[0];
        match self
            .client
            .call(
                first.peer,
                first.addrs.clone(),
                &Request::Step(Box::new(msg)),
            )
            .await
        {
            Ok(Response::Accepted) => {}
            Ok(other) => {
                return Err(Error::Protocol {
                    peer: first.peer,
                    detail: format!("Step answered {other:?}"),
                });
            }
            Err(Error::Request {
                source:
                    e @ (RequestError::DialFailure { .. }
                    | RequestError::ConnectionClosed { .. }
                    | RequestError::Timeout { .. }),
                ..
            }) => return Err(self.lost(0, trace, step, e.to_string())),
            Err(e) => return Err(e),
        }
        self.await_step(trace, step).await
    }

    /// The deadline of a step: a base plus a multiple of the compute time
    /// the stages' advertised throughput predicts for its tokens.
    fn deadline(&self, trace: u32, step: u32) -> Duration {
        let t = trace as usize;
        let rows = self.graph.traces[t].invokes.len() as f64;
        let tokens = if step == 0 {
            let longest = self.plan.costs.get(t).map_or(1, |c| c.prompt_tokens);
            rows * longest as f64
        } else {
            rows
        };
        let secs: f64 = self
            .route
            .iter()
            .map(|p| tokens / f64::from(p.record.throughput.max(1e-3)))
            .sum();
        DEADLINE_BASE + Duration::from_secs_f64((secs * DEADLINE_FACTOR).min(3600.0))
    }

    /// Waits for the step's reports until the last stage reports it done,
    /// watching the route's stages meanwhile.
    async fn await_step(&mut self, trace: u32, step: u32) -> Result<Vec<u32>, Error> {
        let expected = expected_saves(self.graph, self.plan, self.fragments, trace, step);
        let mut arrived = HashSet::new();
        let period = self.deadline(trace, step);
        let mut deadline = Instant::now() + period;
        let mut deadlines = 0;
        loop {
            tokio::select! {
                report = self.rx.recv() => {
                    let report = report.ok_or(Error::Closed)?;
                    if (report.trace, report.step) != (trace, step) {
                        tracing::warn!(report.trace, report.step, "report for another step; ignored");
                        continue;
                    }
                    if let Some(tokens) = self.on_report(report, &expected, &mut arrived)? {
                        self.check_complete(trace, step, &expected, &arrived)?;
                        return Ok(tokens);
                    }
                }
                event = self.events.recv() => {
                    let peer = match event {
                        Ok(e) => e.peer(),
                        // Missed events: check every stage.
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            for hop in 0..self.route.len() {
                                if !self.reachable(hop).await {
                                    return Err(self.lost(hop, trace, step, "its connection was lost".into()));
                                }
                            }
                            continue;
                        }
                        Err(broadcast::error::RecvError::Closed) => return Err(Error::Closed),
                    };
                    if let Some(hop) = self.route.iter().position(|p| p.peer == peer)
                        && !self.reachable(hop).await
                    {
                        let why = match event {
                            Ok(PeerEvent::Unresponsive(_)) => "it stopped answering pings",
                            _ => "its connection was lost and it cannot be reached again",
                        };
                        return Err(self.lost(hop, trace, step, why.into()));
                    }
                }
                () = tokio::time::sleep_until(deadline) => {
                    if let Some(hop) = self.silent_stage().await {
                        return Err(self.lost(
                            hop,
                            trace,
                            step,
                            format!("no progress within {} s and no answer to a probe", period.as_secs()),
                        ));
                    }
                    deadlines += 1;
                    if deadlines >= DEADLINES {
                        return Err(Error::NoProgress {
                            trace,
                            step,
                            secs: (period * deadlines).as_secs(),
                        });
                    }
                    deadline += period;
                }
            }
        }
    }

    /// The first stage that does not answer an `Info` probe in time.
    async fn silent_stage(&self) -> Option<usize> {
        let probes = self.route.iter().map(|p| {
            tokio::time::timeout(
                PROBE_TIMEOUT,
                self.client.call(p.peer, p.addrs.clone(), &Request::Info),
            )
        });
        futures::future::join_all(probes)
            .await
            .into_iter()
            .position(|r| !matches!(r, Ok(Ok(Response::Info { .. }))))
    }

    /// Checks and files one report; `Some(tokens)` when it ends the step.
    fn on_report(
        &mut self,
        report: StageReport,
        expected: &[ExpectedSave],
        arrived: &mut HashSet<(String, Option<u32>)>,
    ) -> Result<Option<Vec<u32>>, Error> {
        let hop = report.hop as usize;
        let peer = self.route[hop].peer;
        let protocol = |detail: String| Error::Protocol { peer, detail };
        match report.body {
            ReportBody::Saves(saves) => {
                for s in saves {
                    let known = expected
                        .iter()
                        .any(|e| e.name == s.name && e.step == s.step && e.stage == hop);
                    if !known {
                        return Err(protocol(format!(
                            "stage {hop} sent save {:?} (step {:?}), which the graph does not make there at trace {}, step {}",
                            s.name, s.step, report.trace, report.step
                        )));
                    }
                    if !arrived.insert((s.name.clone(), s.step)) {
                        return Err(protocol(format!(
                            "stage {hop} sent save {:?} twice",
                            s.name
                        )));
                    }
                    self.saves.push(s);
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
                self.relayed.extend(values);
                Ok(None)
            }
            ReportBody::Done { tokens } => {
                if hop + 1 != self.route.len() {
                    return Err(protocol(format!(
                        "stage {hop} reported a step done, but only the last stage can"
                    )));
                }
                let t = report.trace as usize;
                let trace = &self.graph.traces[t];
                let stopped = report.step + 1 == self.plan.steps[t] && self.plan.stops[t].is_some();
                let want = if trace.max_new_tokens > 0 && !stopped {
                    trace.invokes.len()
                } else {
                    0
                };
                if tokens.len() != want {
                    return Err(protocol(format!(
                        "stage {hop} reported {} tokens for trace {t}, step {}; expected {want} (one per invoke when generating)",
                        tokens.len(),
                        report.step
                    )));
                }
                Ok(Some(tokens))
            }
            ReportBody::Failed(error)
                if error.kind == ErrorKind::Unreachable && hop + 1 < self.route.len() =>
            {
                Err(self.lost(
                    hop + 1,
                    report.trace,
                    report.step,
                    format!("stage {hop} could not hand it the step: {}", error.message),
                ))
            }
            ReportBody::Failed(error) => Err(Error::Stage {
                stage: self.stage(hop),
                trace: report.trace,
                step: report.step,
                error,
            }),
        }
    }

    /// Fails the step if a save the graph makes at it did not arrive.
    fn check_complete(
        &self,
        trace: u32,
        step: u32,
        expected: &[ExpectedSave],
        arrived: &HashSet<(String, Option<u32>)>,
    ) -> Result<(), Error> {
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
    use nnmesh_graph::{Builder, DType, IndexItem::*, Limits, Manifest, Point};

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
