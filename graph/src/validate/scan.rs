//! The scan: one pass over the nodes in id order that checks references and
//! hooks, computes each node's anchor and step set, and infers shapes and
//! dtypes without any tensors.

use std::collections::{BTreeMap, HashSet};

use super::{Anchor, Inputs, Limits, NodePlan, Plan, StepSet, ValidateError};
use crate::{
    ir::{ConstTensor, DType, Graph, Hook, IndexItem, Node, NodeId, Point, Steps},
    manifest::{Manifest, Module, Site},
    op::{self, OpError, TensorMeta, shape},
};

/// Which steps a node's value exists for.
#[derive(Debug, Clone, Copy)]
enum Domain {
    /// One value, available from the anchor on.
    Once,
    /// One value per step of the set, each at the anchor's position of that step.
    PerStep(StepSet),
}

/// The scan's knowledge about one node.
#[derive(Debug)]
struct Scanned {
    anchor: Anchor,
    domain: Domain,
    /// Whether the node's shape depends on the key length (per-step `pattern`).
    kv: bool,
    /// The Read or Write whose hook fixed this node's anchor (`None`: the start).
    origin: Option<NodeId>,
    /// Meta at each evaluated step key (see [`key`]); one entry for Once nodes.
    metas: BTreeMap<u32, TensorMeta>,
    module: Option<Module>,
    site: Option<Site>,
}

/// Steps whose metas are equal share a key: 0 for the prompt step, 1 for any
/// decode step, or the step itself when the shape depends on the key length.
fn key(kv: bool, step: u32) -> u32 {
    match step {
        0 => 0,
        s if kv => s,
        _ => 1,
    }
}

/// The steps at which a node over `set` must be checked: one per key.
fn eval_steps(set: StepSet, kv: bool) -> Vec<u32> {
    let mut out = Vec::new();
    if set.start == 0 {
        out.push(0);
    }
    let lo = set.start.max(1);
    if lo < set.end {
        if kv {
            out.extend(lo..set.end);
        } else {
            out.push(lo);
        }
    }
    out
}

/// A resolved hook.
struct ResolvedHook {
    module: Module,
    site: Site,
    steps: StepSet,
    multi: bool,
}

struct Scan<'a> {
    graph: &'a Graph,
    manifest: &'a Manifest,
    inputs: &'a Inputs,
    nodes: Vec<Scanned>,
}

impl Scan<'_> {
    fn meta_at(&self, id: NodeId, step: u32) -> &TensorMeta {
        let n = &self.nodes[id.index()];
        let k = match n.domain {
            Domain::Once => *n.metas.keys().next().expect("once nodes have one meta"),
            Domain::PerStep(_) => key(n.kv, step),
        };
        n.metas
            .get(&k)
            .expect("a node's step set lies within each per-step input's")
    }

    fn describe(&self, origin: Option<NodeId>, anchor: Anchor, per_step: bool) -> String {
        let hook = origin.and_then(|id| match &self.graph.nodes[id.index()] {
            Node::Read { hook } | Node::Write { hook, .. } => Some(hook.path()),
            _ => None,
        });
        let steps = if per_step { "from step" } else { "step" };
        match hook {
            Some(path) => format!("{path} (trace {}, {steps} {})", anchor.trace, anchor.step),
            None => "the start of the session".into(),
        }
    }

    fn resolve_hook(&self, node: NodeId, hook: &Hook) -> Result<ResolvedHook, ValidateError> {
        let traces = &self.graph.traces;
        let trace = traces
            .get(hook.trace as usize)
            .ok_or(ValidateError::TraceOutOfRange {
                node,
                trace: hook.trace,
                traces: traces.len(),
            })?;
        let module = self.manifest.parse_module(&hook.module).ok_or_else(|| {
            ValidateError::UnknownModule {
                node,
                module: hook.module.clone(),
            }
        })?;
        let site =
            self.manifest
                .site(module, hook.point)
                .ok_or_else(|| ValidateError::UnknownPoint {
                    node,
                    module: hook.module.clone(),
                    point: hook.point,
                })?;
        if let Some(invoke) = hook.invoke
            && invoke as usize >= trace.invokes.len()
        {
            return Err(ValidateError::InvokeOutOfRange {
                node,
                invoke,
                invokes: trace.invokes.len(),
            });
        }
        let steps = trace.steps();
        let (start, end, multi) = match hook.steps {
            Steps::At(s) => (s, s.saturating_add(1), false),
            Steps::Range { start, end } => (start, end, true),
            Steps::All => (0, steps, true),
        };
        if start >= end {
            return Err(ValidateError::EmptySteps { node, start, end });
        }
        if end > steps {
            return Err(ValidateError::StepOutOfRange {
                node,
                step: end - 1,
                steps,
            });
        }
        Ok(ResolvedHook {
            module,
            site,
            steps: StepSet {
                trace: hook.trace,
                start,
                end,
            },
            multi,
        })
    }

    /// The hook's value at `step`: its own rows for one invoke, else the padded batch.
    fn hook_meta(&self, hook: &Hook, r: &ResolvedHook, step: u32) -> TensorMeta {
        let lens = &self.inputs.traces[hook.trace as usize];
        let (b, t0) = match hook.invoke {
            Some(i) => (1, lens[i as usize]),
            None => (lens.len() as u64, lens.iter().copied().max().unwrap_or(0)),
        };
        let t0 = u64::from(t0);
        let t = if step == 0 { t0 } else { 1 };
        self.manifest
            .hook_meta(r.module, hook.point, b, t, t0 + u64::from(step))
    }

    /// Checks inputs exist, come earlier and have values.
    fn check_inputs(&self, id: NodeId, node: &Node) -> Result<(), ValidateError> {
        for &input in node.inputs() {
            if input.index() >= self.graph.nodes.len() {
                return Err(ValidateError::DanglingInput { node: id, input });
            }
            if input >= id {
                return Err(ValidateError::ForwardReference { node: id, input });
            }
            let source = &self.graph.nodes[input.index()];
            if !source.has_value() {
                return Err(ValidateError::NotAValue {
                    node: id,
                    input,
                    kind: source.kind(),
                });
            }
        }
        Ok(())
    }

    /// Anchor, domain, origin and key-length dependence of a node computed from its inputs.
    fn combine(
        &self,
        id: NodeId,
        inputs: &[NodeId],
    ) -> Result<(Anchor, Domain, Option<NodeId>, bool), ValidateError> {
        let mut per_step: Option<(StepSet, NodeId)> = None;
        let mut anchor = Anchor::default();
        let mut origin = None;
        let mut kv = false;
        for &input in inputs {
            let n = &self.nodes[input.index()];
            if n.anchor > anchor {
                anchor = n.anchor;
                origin = n.origin;
            }
            if let Domain::PerStep(s) = n.domain {
                kv |= n.kv;
                per_step = Some(match per_step {
                    None => (s, input),
                    Some((acc, first)) => {
                        let both = StepSet {
                            trace: acc.trace,
                            start: acc.start.max(s.start),
                            end: acc.end.min(s.end),
                        };
                        if acc.trace != s.trace || both.is_empty() {
                            return Err(ValidateError::StepMismatch {
                                node: id,
                                detail: format!(
                                    "combines node {first} (per step, trace {} steps {}..{}) with node {input} (per step, trace {} steps {}..{}), which share no step",
                                    acc.trace, acc.start, acc.end, s.trace, s.start, s.end
                                ),
                            });
                        }
                        (both, first)
                    }
                });
            }
        }
        let Some((set, first)) = per_step else {
            return Ok((anchor, Domain::Once, origin, false));
        };
        // The node runs at each step of `set`, at the latest position of its inputs.
        let mut position = 0;
        for &input in inputs {
            let n = &self.nodes[input.index()];
            let available_by = Anchor {
                trace: set.trace,
                step: set.start,
                position: u32::MAX,
            };
            match n.domain {
                Domain::PerStep(_) => position = position.max(n.anchor.position),
                Domain::Once if n.anchor <= available_by => {
                    if n.anchor.trace == set.trace && n.anchor.step == set.start {
                        position = position.max(n.anchor.position);
                    }
                }
                Domain::Once => {
                    return Err(ValidateError::StepMismatch {
                        node: id,
                        detail: format!(
                            "combines node {first} (per step, trace {} from step {}) with node {input}, which only exists from trace {} step {}",
                            set.trace, set.start, n.anchor.trace, n.anchor.step
                        ),
                    });
                }
            }
        }
        let anchor = Anchor {
            trace: set.trace,
            step: set.start,
            position,
        };
        Ok((anchor, Domain::PerStep(set), origin, kv))
    }

    /// Evaluates `f` at each step key of `domain` (or once at `step` for Once nodes).
    fn metas(
        &self,
        domain: Domain,
        kv: bool,
        once_step: u32,
        mut f: impl FnMut(u32) -> Result<TensorMeta, ValidateError>,
    ) -> Result<BTreeMap<u32, TensorMeta>, ValidateError> {
        let steps = match domain {
            Domain::Once => vec![once_step],
            Domain::PerStep(set) => eval_steps(set, kv),
        };
        let mut out = BTreeMap::new();
        for s in steps {
            let k = match domain {
                Domain::Once => s,
                Domain::PerStep(_) => key(kv, s),
            };
            out.insert(k, f(s)?);
        }
        Ok(out)
    }

    fn scan_node(&self, id: NodeId, node: &Node) -> Result<Scanned, ValidateError> {
        self.check_inputs(id, node)?;
        match node {
            Node::Const { value } => {
                let meta = check_const(id, value)?;
                Ok(Scanned {
                    anchor: Anchor::default(),
                    domain: Domain::Once,
                    kv: false,
                    origin: None,
                    metas: BTreeMap::from([(0, meta)]),
                    module: None,
                    site: None,
                })
            }
            Node::Read { hook } => {
                let r = self.resolve_hook(id, hook)?;
                let domain = if r.multi {
                    Domain::PerStep(r.steps)
                } else {
                    Domain::Once
                };
                let kv = r.multi && hook.point == Point::Pattern;
                let metas = self.metas(domain, kv, r.steps.start, |s| {
                    Ok(self.hook_meta(hook, &r, s))
                })?;
                Ok(Scanned {
                    anchor: Anchor {
                        trace: hook.trace,
                        step: r.steps.start,
                        position: r.site.0,
                    },
                    domain,
                    kv,
                    origin: Some(id),
                    metas,
                    module: Some(r.module),
                    site: Some(r.site),
                })
            }
            Node::Write {
                hook,
                value,
                index,
                mode: _,
            } => self.scan_write(id, hook, *value, index.as_deref()),
            Node::Op { op, args } => {
                let (anchor, domain, origin, kv) = self.combine(id, args)?;
                let metas = self.metas(domain, kv, anchor.step, |s| {
                    let metas: Vec<TensorMeta> =
                        args.iter().map(|&a| self.meta_at(a, s).clone()).collect();
                    op::infer(op, &metas).map_err(|e| op_error(id, e))
                })?;
                Ok(Scanned {
                    anchor,
                    domain,
                    kv,
                    origin,
                    metas,
                    module: None,
                    site: None,
                })
            }
            Node::Apply { module, args } => {
                let m = self.manifest.parse_module(module).ok_or_else(|| {
                    ValidateError::UnknownModule {
                        node: id,
                        module: module.clone(),
                    }
                })?;
                if args.len() != 1 {
                    return Err(ValidateError::ApplyArgs {
                        node: id,
                        module: module.clone(),
                        found: args.len(),
                    });
                }
                let (anchor, domain, origin, kv) = self.combine(id, args)?;
                let metas = self.metas(domain, kv, anchor.step, |s| {
                    let metas = [self.meta_at(args[0], s).clone()];
                    self.manifest
                        .apply_meta(m, &metas)
                        .map_err(|e| ValidateError::ApplyShape {
                            node: id,
                            module: module.clone(),
                            detail: e.to_string(),
                        })
                })?;
                Ok(Scanned {
                    anchor,
                    domain,
                    kv,
                    origin,
                    metas,
                    module: None,
                    site: None,
                })
            }
            Node::Save { value, .. } => {
                let (anchor, domain, origin, kv) = self.combine(id, &[*value])?;
                let metas = self.metas(domain, kv, anchor.step, |s| {
                    Ok(self.meta_at(*value, s).clone())
                })?;
                Ok(Scanned {
                    anchor,
                    domain,
                    kv,
                    origin,
                    metas,
                    module: None,
                    site: None,
                })
            }
            Node::Stop { trace } => {
                if *trace as usize >= self.graph.traces.len() {
                    return Err(ValidateError::TraceOutOfRange {
                        node: id,
                        trace: *trace,
                        traces: self.graph.traces.len(),
                    });
                }
                // The real anchor is filled in once every node is known.
                Ok(Scanned {
                    anchor: Anchor {
                        trace: *trace,
                        step: 0,
                        position: 0,
                    },
                    domain: Domain::Once,
                    kv: false,
                    origin: None,
                    metas: BTreeMap::from([(0, TensorMeta::new([], DType::Bool))]),
                    module: None,
                    site: None,
                })
            }
        }
    }

    fn scan_write(
        &self,
        id: NodeId,
        hook: &Hook,
        value: NodeId,
        index: Option<&[IndexItem]>,
    ) -> Result<Scanned, ValidateError> {
        let r = self.resolve_hook(id, hook)?;
        let at = Anchor {
            trace: hook.trace,
            step: r.steps.start,
            position: r.site.0,
        };
        let v = &self.nodes[value.index()];
        let out_of_order = || ValidateError::OutOfOrder {
            node: id,
            write_hook: self.describe(Some(id), at, r.multi),
            depends_on: self.describe(v.origin, v.anchor, matches!(v.domain, Domain::PerStep(_))),
        };
        match v.domain {
            Domain::Once if v.anchor > at => return Err(out_of_order()),
            Domain::Once => {}
            Domain::PerStep(set) => {
                if !set.covers(&r.steps) {
                    return Err(ValidateError::StepMismatch {
                        node: id,
                        detail: format!(
                            "writes {} at trace {} steps {}..{} but its value (node {value}) exists only at trace {} steps {}..{}",
                            hook.path(),
                            r.steps.trace,
                            r.steps.start,
                            r.steps.end,
                            set.trace,
                            set.start,
                            set.end
                        ),
                    });
                }
                if v.anchor.position > at.position {
                    return Err(out_of_order());
                }
            }
        }
        let domain = if r.multi {
            Domain::PerStep(r.steps)
        } else {
            Domain::Once
        };
        let kv = r.multi && (hook.point == Point::Pattern || v.kv);
        let check_step = |s: u32| -> Result<TensorMeta, ValidateError> {
            let target = self.hook_meta(hook, &r, s);
            let slice = match index {
                Some(items) => shape::index(&target.shape, items).map_err(|detail| {
                    ValidateError::WriteIndex {
                        node: id,
                        hook: hook.path(),
                        detail,
                    }
                })?,
                None => target.shape.clone(),
            };
            let val = self.meta_at(value, s);
            if val.dtype.is_float() != target.dtype.is_float() {
                return Err(ValidateError::WriteDtype {
                    node: id,
                    hook: hook.path(),
                    value: val.dtype,
                    target: target.dtype,
                });
            }
            if !shape::broadcasts_to(&val.shape, &slice) {
                return Err(ValidateError::WriteShape {
                    node: id,
                    hook: format!("{} (step {s})", hook.path()),
                    value: shape::fmt_shape(&val.shape),
                    target: shape::fmt_shape(&slice),
                });
            }
            Ok(val.clone())
        };
        let mut metas = BTreeMap::new();
        match domain {
            // A Once write may still use a per-step value: the one of its own step.
            Domain::Once => {
                metas.insert(r.steps.start, check_step(r.steps.start)?);
            }
            Domain::PerStep(set) => {
                for s in eval_steps(set, kv) {
                    metas.insert(key(kv, s), check_step(s)?);
                }
            }
        }
        Ok(Scanned {
            anchor: at,
            domain,
            kv,
            origin: Some(id),
            metas,
            module: Some(r.module),
            site: Some(r.site),
        })
    }
}

fn op_error(node: NodeId, e: OpError) -> ValidateError {
    match e {
        OpError::Arity {
            op,
            expected,
            found,
        } => ValidateError::Arity {
            node,
            op,
            expected,
            found,
        },
        OpError::Shape { op, detail } => ValidateError::Shape { node, op, detail },
        OpError::Dtype { op, detail } => ValidateError::Dtype { node, op, detail },
    }
}

fn check_const(node: NodeId, c: &ConstTensor) -> Result<TensorMeta, ValidateError> {
    let expected = shape::numel(&c.shape).unwrap_or(u64::MAX);
    let found = c.values.len() as u64;
    if expected != found {
        return Err(ValidateError::ConstLength {
            node,
            shape: shape::fmt_shape(&c.shape),
            expected,
            found,
        });
    }
    let ok = |v: f64| match c.dtype {
        DType::Bool => v == 0.0 || v == 1.0,
        // 2^63 is the first f64 past i64::MAX.
        DType::I64 => v.fract() == 0.0 && v >= -(2f64.powi(63)) && v < 2f64.powi(63),
        DType::F32 | DType::F16 | DType::Bf16 => true,
    };
    if let Some((index, &value)) = c.values.iter().enumerate().find(|(_, v)| !ok(**v)) {
        return Err(ValidateError::ConstValue {
            node,
            index,
            value,
            dtype: c.dtype,
        });
    }
    Ok(TensorMeta::new(c.shape.clone(), c.dtype))
}

/// Bytes a node's values take over all the steps it runs.
fn bytes_over_steps(n: &Scanned) -> u64 {
    match n.domain {
        Domain::Once => n.metas.values().map(TensorMeta::bytes).sum(),
        Domain::PerStep(set) => (set.start..set.end)
            .map(|s| n.metas.get(&key(n.kv, s)).map_or(0, TensorMeta::bytes))
            .fold(0u64, u64::saturating_add),
    }
}

/// Runs the scan over all nodes and assembles the plan.
pub(super) fn scan(
    graph: &Graph,
    manifest: &Manifest,
    inputs: &Inputs,
    limits: &Limits,
) -> Result<Plan, ValidateError> {
    let mut scan = Scan {
        graph,
        manifest,
        inputs,
        nodes: Vec::with_capacity(graph.nodes.len()),
    };
    let mut names = HashSet::new();
    let (mut saved_bytes, mut const_bytes) = (0u64, 0u64);
    for (i, node) in graph.nodes.iter().enumerate() {
        let id = NodeId(i as u32);
        let scanned = scan.scan_node(id, node)?;
        match node {
            Node::Save { name, .. } => {
                if !names.insert(name.as_str()) {
                    return Err(ValidateError::DuplicateSave {
                        node: id,
                        name: name.clone(),
                    });
                }
                saved_bytes = saved_bytes.saturating_add(bytes_over_steps(&scanned));
                if saved_bytes > limits.max_saved_bytes {
                    return Err(ValidateError::SavedBytes {
                        total: saved_bytes,
                        limit: limits.max_saved_bytes,
                    });
                }
            }
            Node::Const { .. } => {
                const_bytes = const_bytes.saturating_add(bytes_over_steps(&scanned));
                if const_bytes > limits.max_const_bytes {
                    return Err(ValidateError::ConstBytes {
                        total: const_bytes,
                        limit: limits.max_const_bytes,
                    });
                }
            }
            _ => {}
        }
        scan.nodes.push(scanned);
    }

    let mut nodes: Vec<NodePlan> = Vec::with_capacity(scan.nodes.len());
    let mut step_metas = BTreeMap::new();
    for (i, n) in scan.nodes.into_iter().enumerate() {
        let per_step = match n.domain {
            Domain::Once => None,
            Domain::PerStep(s) => Some(s),
        };
        let first = match n.domain {
            Domain::Once => *n.metas.keys().next().expect("one meta"),
            Domain::PerStep(_) => key(n.kv, n.anchor.step),
        };
        let mut metas = n.metas;
        let meta = metas.remove(&first).expect("the first step is evaluated");
        if per_step.is_some() {
            step_metas.extend(metas.into_iter().map(|(k, m)| ((i as u32, k), m)));
        }
        nodes.push(NodePlan {
            anchor: n.anchor,
            meta,
            per_step,
            module: n.module,
            site: n.site,
        });
    }

    // A stopped trace may end after the last moment any node of it runs.
    let mut stops = vec![None; graph.traces.len()];
    for (i, node) in graph.nodes.iter().enumerate() {
        if let Node::Stop { trace } = node {
            let last = nodes
                .iter()
                .zip(&graph.nodes)
                .filter(|(p, n)| {
                    p.anchor.trace == *trace && !matches!(n, Node::Stop { .. } | Node::Const { .. })
                })
                .map(|(p, _)| p.last_moment())
                .max()
                .unwrap_or(Anchor {
                    trace: *trace,
                    step: 0,
                    position: 0,
                });
            nodes[i].anchor = last;
            stops[*trace as usize] = Some(last);
        }
    }

    Ok(Plan {
        nodes,
        steps: graph.traces.iter().map(|t| t.steps()).collect(),
        stops,
        saved_bytes,
        const_bytes,
        costs: Vec::new(),
        step_metas,
    })
}
