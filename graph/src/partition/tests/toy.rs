//! The reference evaluator for the partition law: a toy model over f64
//! vectors of width 3, run as one stage or as a pipeline of stage sessions.
//!
//! It follows the semantics a node implements, for a whole session (every
//! trace, every generation step):
//! - A trace runs `plan.steps[t]` steps; step 0 forwards the prompt, step
//!   `s > 0` an input computed from step `s - 1`'s logits ([`next_input`]).
//! - A node runs at the first visited hook at or after its anchor's position
//!   in every step it is due (its anchor's step, or each step of its
//!   [`StepSet`](crate::StepSet)); what the forward did not reach runs at the
//!   end of the step. A per-step node's value overwrites the previous step's.
//! - At the last step of a trace with a stop, the forward ends right after the
//!   stop's position: the stage holding that point stops there, later stages
//!   get no hidden state and run no forward, yet every stage still runs the
//!   nodes due at that step and passes its carry on.
//! - In the pipeline only carry and relays cross stage boundaries: a stage's
//!   session keeps its own values (across steps and traces) plus what arrived
//!   as carry; after each step the fresh `relay_out` values go to the client,
//!   which hands them to the first stage with the next step it sends.
//!
//! Each layer has a toy KV cache (the mean of the inputs it saw at earlier
//! steps of the trace), so a step's result depends on what every stage did at
//! the earlier steps.

use nnmesh_protocol::Span;
use std::collections::{BTreeMap, HashMap, HashSet};

use crate::{
    ir::{Graph, Hook, Node, NodeId, Point, WriteMode},
    manifest::{Manifest, Module},
    op::Op,
    partition::Fragment,
    validate::Plan,
};

/// Width of every value: hidden size and vocabulary.
pub(super) const W: usize = 3;

pub(super) fn toy_manifest(layers: u32) -> Manifest {
    Manifest {
        model: "toy".into(),
        num_layers: layers,
        hidden: W as u32,
        heads: 1,
        kv_heads: 1,
        head_dim: W as u32,
        intermediate: W as u32,
        vocab: W as u32,
        max_positions: 16,
        dtype: crate::ir::DType::F32,
    }
}

pub(super) type Vector = Vec<f64>;

fn map(v: &[f64], f: impl Fn(f64) -> f64) -> Vector {
    v.iter().map(|&a| f(a)).collect()
}

fn zip(a: &[f64], b: &[f64], f: impl Fn(f64, f64) -> f64) -> Vector {
    a.iter().zip(b).map(|(&x, &y)| f(x, y)).collect()
}

fn mlp(i: u32, m: &[f64]) -> Vector {
    map(m, |a| (a + f64::from(i)).tanh())
}

fn mlp_in(i: u32, x: &[f64]) -> Vector {
    map(x, |a| a * 0.5 + f64::from(i))
}

fn norm(x: &[f64]) -> Vector {
    let mean = x.iter().map(|a| a.abs()).sum::<f64>() / W as f64;
    map(x, |a| a / (1.0 + mean))
}

fn head(n: &[f64]) -> Vector {
    vec![n[0] - n[1], n[1] * 2.0, n[2] + 1.0]
}

/// The toy attention: a small function of the mean of the cached inputs.
fn attend(cache: &[Vector]) -> Vector {
    let mut mean = vec![0.0; W];
    for v in cache {
        mean = zip(&mean, v, |a, b| a + b);
    }
    let n = cache.len() as f64;
    map(&mean, |a| 0.25 * (a / n).sin())
}

/// A decoder layer over `x`, attending to `cache` (which holds `x` last).
fn layer(i: u32, x: &[f64], cache: &[Vector]) -> Vector {
    let h = zip(x, &attend(cache), |a, b| a + b);
    zip(&h, &mlp(i, &mlp_in(i, &h)), |a, b| a + b)
}

fn apply_module(m: Module, v: &[f64]) -> Vector {
    match m {
        // Applied layers run without a cache: they attend to the value alone.
        Module::Layer(i) => layer(i, v, &[v.to_vec()]),
        Module::Mlp(i) => mlp(i, v),
        Module::Norm => norm(v),
        Module::LmHead => head(v),
        other => panic!("the toy model cannot apply {other}"),
    }
}

/// The prompt's embedding for trace `t`.
fn prompt(t: u32) -> Vector {
    let t = f64::from(t);
    vec![1.0 + t, 2.0 - t, 3.0 + 0.5 * t]
}

/// The input of the next generation step, chosen from this step's logits.
fn next_input(logits: &[f64]) -> Vector {
    map(logits, |a| (0.5 * a).tanh() + 1.0)
}

/// One stage's session: its nodes, the values it holds (kept across steps
/// and traces), its layers' caches and the step being run.
struct Session<'a> {
    /// Index of the stage in the route (0 on a single stage), for messages.
    stage: usize,
    graph: &'a Graph,
    plan: &'a Plan,
    manifest: &'a Manifest,
    span: Span,
    first: bool,
    last: bool,
    nodes: Vec<NodeId>,
    store: HashMap<NodeId, Vector>,
    /// Values set during the current step (computed here or carried in).
    fresh: HashSet<NodeId>,
    /// Values some node of this stage used as an input.
    used: HashSet<NodeId>,
    /// Per layer, the inputs it saw at the earlier steps of the trace.
    cache: HashMap<u32, Vec<Vector>>,
    saves: BTreeMap<String, Vector>,
    // The step being run.
    step: u32,
    stop_at: Option<u32>,
    pending: Vec<NodeId>,
}

impl<'a> Session<'a> {
    /// The session of stage `stage` of a route of `stages`, running `nodes`.
    fn new(
        graph: &'a Graph,
        plan: &'a Plan,
        manifest: &'a Manifest,
        stage: usize,
        stages: usize,
        span: Span,
        nodes: Vec<NodeId>,
    ) -> Self {
        Session {
            stage,
            graph,
            plan,
            manifest,
            span,
            first: stage == 0,
            last: stage + 1 == stages,
            nodes,
            store: HashMap::new(),
            fresh: HashSet::new(),
            used: HashSet::new(),
            cache: HashMap::new(),
            saves: BTreeMap::new(),
            step: 0,
            stop_at: None,
            pending: Vec::new(),
        }
    }

    /// Prepares step `step` of trace `trace`: which nodes are due, where the forward stops.
    fn begin(&mut self, trace: u32, step: u32) {
        self.step = step;
        self.fresh.clear();
        if step == 0 {
            self.cache.clear();
        }
        let plan = self.plan;
        self.pending = self
            .nodes
            .iter()
            .copied()
            .filter(|id| {
                let np = &plan.nodes[id.index()];
                match np.per_step {
                    Some(set) => set.contains(trace, step),
                    None => np.anchor.trace == trace && np.anchor.step == step,
                }
            })
            .collect();
        self.pending
            .sort_by_key(|id| (plan.nodes[id.index()].anchor.position, *id));
        let last_step = plan.steps[trace as usize] - 1;
        self.stop_at = match plan.stops[trace as usize] {
            Some(a) if step == last_step && a.trace == trace => Some(a.position),
            _ => None,
        };
    }

    /// The values of `ids` set during this step.
    fn fresh(&self, ids: &[NodeId]) -> Vec<(NodeId, Vector)> {
        ids.iter()
            .filter(|id| self.fresh.contains(id))
            .map(|id| (*id, self.store[id].clone()))
            .collect()
    }

    /// Sets a value, computed here or carried in.
    fn set(&mut self, id: NodeId, value: Vector) {
        self.store.insert(id, value);
        self.fresh.insert(id);
    }

    fn get(&mut self, id: NodeId) -> Vector {
        self.used.insert(id);
        self.store.get(&id).cloned().unwrap_or_else(|| {
            panic!(
                "stage {}: node {id} is neither computed here nor carried in",
                self.stage
            )
        })
    }

    /// Runs one step: the forward from `input` (the embedding on the first
    /// stage, the hidden state on the others; `None` when an earlier stage
    /// stopped), then the due nodes it did not reach. Returns the hidden
    /// state or logits, or `None` if the forward stopped.
    fn step(&mut self, input: Option<Vector>) -> Option<Vector> {
        let out = input.and_then(|x| self.forward(x));
        for id in std::mem::take(&mut self.pending) {
            match &self.graph.nodes[id.index()] {
                Node::Read { hook } | Node::Write { hook, .. } => {
                    panic!(
                        "stage {}: node {id}: hook {} was not reached",
                        self.stage,
                        hook.path()
                    )
                }
                _ => self.compute(id),
            }
        }
        out
    }

    fn forward(&mut self, mut x: Vector) -> Option<Vector> {
        if self.first {
            self.hook(Module::Embed, Point::Output, &mut x)?;
        }
        for i in self.span.start..self.span.end {
            self.hook(Module::Layer(i), Point::Input, &mut x)?;
            let cache = self.cache.entry(i).or_default();
            cache.push(x.clone());
            let h = zip(&x, &attend(cache), |a, b| a + b);
            let mut m = mlp_in(i, &h);
            self.hook(Module::Mlp(i), Point::Input, &mut m)?;
            let mut o = mlp(i, &m);
            self.hook(Module::Mlp(i), Point::Output, &mut o)?;
            x = zip(&h, &o, |a, b| a + b);
            self.hook(Module::Layer(i), Point::Output, &mut x)?;
        }
        if self.last {
            let mut n = x;
            self.hook(Module::Norm, Point::Input, &mut n)?;
            let mut n = norm(&n);
            self.hook(Module::Norm, Point::Output, &mut n)?;
            self.hook(Module::LmHead, Point::Input, &mut n)?;
            x = head(&n);
            self.hook(Module::LmHead, Point::Output, &mut x)?;
        }
        Some(x)
    }

    /// The forward reached `(module, point)` with value `x`: runs every node
    /// due by now; `None` if the forward stops here (or stopped before).
    fn hook(&mut self, module: Module, point: Point, x: &mut Vector) -> Option<()> {
        let p = self.manifest.position(module, point).expect("site");
        if self.stop_at.is_some_and(|stop| p > stop) {
            return None;
        }
        let plan = self.plan;
        let due = self
            .pending
            .iter()
            .take_while(|id| plan.nodes[id.index()].anchor.position <= p)
            .count();
        let manifest = self.manifest;
        let here = |hook: &Hook| {
            manifest.parse_module(&hook.module) == Some(module) && hook.point == point
        };
        for id in self.pending.drain(..due).collect::<Vec<_>>() {
            match &self.graph.nodes[id.index()] {
                Node::Read { hook } => {
                    assert!(here(hook), "read {id} ran away from its hook");
                    self.set(id, x.clone());
                }
                Node::Write {
                    hook, value, mode, ..
                } => {
                    assert!(here(hook), "write {id} ran away from its hook");
                    let v = self.get(*value);
                    *x = match mode {
                        WriteMode::Set => v,
                        WriteMode::Add => zip(x, &v, |a, b| a + b),
                    };
                }
                _ => self.compute(id),
            }
        }
        if self.stop_at.is_some_and(|stop| p >= stop) {
            return None;
        }
        Some(())
    }

    /// Runs a node that is neither Read nor Write.
    fn compute(&mut self, id: NodeId) {
        let value = match &self.graph.nodes[id.index()] {
            Node::Op { op, args } => {
                let a = self.get(args[0]);
                match op {
                    Op::Add => zip(&a, &self.get(args[1]), |x, y| x + y),
                    Op::Mul => zip(&a, &self.get(args[1]), |x, y| x * y),
                    Op::Scale { factor } => map(&a, |x| x * factor),
                    Op::Tanh => map(&a, f64::tanh),
                    Op::Neg => map(&a, |x| -x),
                    other => panic!("the toy evaluator has no {}", other.name()),
                }
            }
            Node::Apply { module, args } => {
                let m = self.manifest.parse_module(module).expect("valid module");
                apply_module(m, &self.get(args[0]))
            }
            Node::Const { value } => value.values.clone(),
            Node::Save { name, value } => {
                let v = self.get(*value);
                let key = match self.plan.nodes[id.index()].per_step {
                    Some(_) => format!("{name}.step{}", self.step),
                    None => name.clone(),
                };
                assert!(self.saves.insert(key, v).is_none(), "save {id} ran twice");
                return;
            }
            Node::Stop { .. } => return,
            Node::Read { .. } | Node::Write { .. } => unreachable!("they run at their hooks"),
        };
        self.set(id, value);
    }
}

/// Runs every trace and step of the session on one stage hosting the whole
/// model; returns the saves, keyed `name` or `name.stepN` for per-step saves.
pub(super) fn run_single(graph: &Graph, plan: &Plan, m: &Manifest) -> BTreeMap<String, Vector> {
    let all = (0..graph.nodes.len() as u32).map(NodeId).collect();
    let span = Span::new(0, m.num_layers);
    let mut s = Session::new(graph, plan, m, 0, 1, span, all);
    for (t, &steps) in plan.steps.iter().enumerate() {
        let mut input = prompt(t as u32);
        for step in 0..steps {
            s.begin(t as u32, step);
            let out = s.step(Some(input.clone()));
            if step + 1 < steps {
                input = next_input(&out.expect("only a trace's last step stops"));
            }
        }
    }
    s.saves
}

/// What a pipeline run produced.
pub(super) struct Piped {
    /// The saves of every stage, keyed as in [`run_single`].
    pub saves: BTreeMap<String, Vector>,
    /// Every value relayed through the client, with the stage it came from.
    pub relayed: Vec<(NodeId, usize)>,
    /// Per stage, the values its nodes used as inputs.
    pub used: Vec<HashSet<NodeId>>,
}

/// Runs every trace and step of the session as a pipeline of `fragments`,
/// one stage session each; only carry and relays cross stage boundaries.
pub(super) fn run_pipeline(
    graph: &Graph,
    plan: &Plan,
    m: &Manifest,
    fragments: &[Fragment],
) -> Piped {
    let mut stages: Vec<Session> = fragments
        .iter()
        .enumerate()
        .map(|(k, f)| Session::new(graph, plan, m, k, fragments.len(), f.span, f.nodes.clone()))
        .collect();
    let mut relay: Vec<(NodeId, Vector)> = Vec::new();
    let mut relayed = Vec::new();
    for (t, &steps) in plan.steps.iter().enumerate() {
        let mut input = prompt(t as u32);
        for step in 0..steps {
            // The client hands what was relayed to the first stage with this step.
            let mut carry = std::mem::take(&mut relay);
            let mut hidden = Some(input.clone());
            for (k, (s, f)) in stages.iter_mut().zip(fragments).enumerate() {
                s.begin(t as u32, step);
                for (id, v) in carry {
                    assert!(
                        f.carry_in.contains(&id),
                        "stage {k} got {id}, not in its carry_in"
                    );
                    s.set(id, v);
                }
                hidden = s.step(hidden);
                carry = s.fresh(&f.carry_out);
                let out = s.fresh(&f.relay_out);
                relayed.extend(out.iter().map(|(id, _)| (*id, k)));
                relay.extend(out);
            }
            if step + 1 < steps {
                input = next_input(&hidden.expect("only a trace's last step stops"));
            }
        }
    }
    let mut saves = BTreeMap::new();
    for s in &mut stages {
        for (key, v) in std::mem::take(&mut s.saves) {
            assert!(saves.insert(key, v).is_none(), "a save arrived twice");
        }
    }
    Piped {
        saves,
        relayed,
        used: stages.into_iter().map(|s| s.used).collect(),
    }
}
