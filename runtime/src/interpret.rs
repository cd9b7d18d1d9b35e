//! The Intervention Graph interpreter: runs a validated graph (or one stage's
//! fragment of it) at the runtime's hook points during forward passes.
//!
//! Scheduling follows the graph's semantics: each node runs at the first hook
//! moment where all its inputs exist ([`Plan`]'s anchors). Reads capture the
//! hook's value (a view, one prompt's own rows and tokens for an invoke);
//! writes replace it, copy-on-write, so earlier reads keep what they saw.
//! Nodes that feed a write run *eagerly* at their anchor; everything else is
//! *deferred* to the end of the step, where calls of the same module are
//! batched into one (a 30-layer logit lens reads `lm_head` once, not 30 times).
//! Invokes with identical prompts share a batch row until they are first
//! written ([`Sharing`]).

pub mod ops;
mod sharing;

pub use sharing::Sharing;

use nnmesh_graph::{Graph, Manifest, Module, Node, NodeId, Plan, Point, Site, WriteMode};
use tch::Tensor;

use crate::{
    error::{HookError, ModuleError, NodeError},
    hooks::Hooks,
    models::llama::Model,
};

/// A value the graph saved for the client.
#[derive(Debug)]
pub struct SavedTensor {
    /// The Save node's name.
    pub name: String,
    /// For values saved at every step of a generation, which step.
    pub step: Option<u32>,
    /// The value.
    pub value: Tensor,
}

impl SavedTensor {
    /// `name`, or `name.stepN` for per-step values (the safetensors key).
    pub fn key(&self) -> String {
        match self.step {
            Some(s) => format!("{}.step{s}", self.name),
            None => self.name.clone(),
        }
    }
}

/// What an [`Executor`] keeps between steps and traces: computed values,
/// saves, and the schedule of the step being run. A mesh stage keeps one per
/// request (its session) and builds a short-lived [`Executor`] per step.
#[derive(Debug)]
pub struct Store {
    /// Nodes this executor runs.
    mine: Vec<bool>,
    /// Nodes that some Write depends on: they run at their anchor.
    eager: Vec<bool>,
    /// Modules of Apply nodes.
    apply_modules: Vec<Option<Module>>,
    /// Longest path from a node without inputs (deferred work runs by depth).
    depth: Vec<u32>,
    values: Vec<Option<Tensor>>,
    /// Values set during the current step (computed here or carried in).
    fresh: Vec<bool>,
    saves: Vec<SavedTensor>,
    // The step being run.
    trace: u32,
    step: u32,
    lens: Vec<usize>,
    due: Vec<NodeId>,
    cursor: usize,
    deferred: Vec<NodeId>,
    wanted: Vec<bool>,
    stop_at: Option<u32>,
    /// Per trace, how invokes share batch rows (see [`Sharing`]).
    sharing: Vec<Option<Sharing>>,
    /// The physical batch row of each invoke now, and the number of rows.
    row_of: Vec<usize>,
    rows: usize,
}

/// Runs the nodes of a graph assigned to this model (all of them on a single
/// node, one fragment on a mesh stage) as [`Hooks`] of its forward passes.
#[derive(Debug)]
pub struct Executor<'a> {
    graph: &'a Graph,
    plan: &'a Plan,
    manifest: &'a Manifest,
    model: &'a Model,
    /// The first layer the forward runs (a stage may serve part of what it holds).
    first_layer: u32,
    store: &'a mut Store,
}

impl Store {
    /// The state for `nodes` of a validated graph (`None` = every node).
    ///
    /// # Errors
    /// When an Apply names a module this model does not host.
    pub fn new(
        graph: &Graph,
        manifest: &Manifest,
        model: &Model,
        nodes: Option<&[NodeId]>,
    ) -> Result<Self, HookError> {
        let n = graph.nodes.len();
        let mine = match nodes {
            None => vec![true; n],
            Some(ids) => {
                let mut m = vec![false; n];
                for id in ids {
                    m[id.index()] = true;
                }
                m
            }
        };
        let mut eager = vec![false; n];
        for (i, node) in graph.nodes.iter().enumerate().rev() {
            if matches!(node, Node::Write { .. }) || eager[i] {
                for inp in node.inputs() {
                    eager[inp.index()] = true;
                }
            }
        }
        let mut depth = vec![0u32; n];
        for (i, node) in graph.nodes.iter().enumerate() {
            depth[i] = node
                .inputs()
                .iter()
                .map(|inp| depth[inp.index()] + 1)
                .max()
                .unwrap_or(0);
        }
        let mut apply_modules = vec![None; n];
        for (i, node) in graph.nodes.iter().enumerate() {
            if let Node::Apply { module, .. } = node {
                let id = NodeId(i as u32);
                let m = manifest
                    .parse_module(module)
                    .ok_or_else(|| NodeError::UnknownModule(module.clone()).at(id))?;
                if mine[i] && !model.hosts(m) {
                    let layers = model.layers();
                    return Err(NodeError::Module(ModuleError::NotHosted {
                        module: module.clone(),
                        start: layers.start,
                        end: layers.end,
                    })
                    .at(id));
                }
                apply_modules[i] = Some(m);
            }
        }
        Ok(Store {
            mine,
            eager,
            apply_modules,
            depth,
            values: (0..n).map(|_| None).collect(),
            fresh: vec![false; n],
            saves: Vec::new(),
            trace: 0,
            step: 0,
            lens: Vec::new(),
            due: Vec::new(),
            cursor: 0,
            deferred: Vec::new(),
            wanted: vec![false; manifest.num_sites() as usize],
            stop_at: None,
            sharing: (0..graph.traces.len())
                .map(|t| Sharing::plan(graph, manifest, t))
                .collect(),
            row_of: Vec::new(),
            rows: 0,
        })
    }

    /// Takes the values saved so far.
    pub fn take_saves(&mut self) -> Vec<SavedTensor> {
        std::mem::take(&mut self.saves)
    }

    /// A node's current value, if computed.
    pub fn value(&self, node: NodeId) -> Option<&Tensor> {
        self.values[node.index()].as_ref()
    }

    /// Turns row sharing between identical prompts off (it is on by default;
    /// results agree to float rounding, since batch shapes differ).
    pub fn disable_row_sharing(&mut self) {
        self.sharing.iter_mut().for_each(|s| *s = None);
    }

    /// Whether `node`'s value was set during the current step.
    pub fn is_fresh(&self, node: NodeId) -> bool {
        self.fresh[node.index()]
    }

    /// Whether any node of this executor's part of the graph runs at
    /// `step` of `trace` (a step with none is a plain forward here).
    pub fn has_work(&self, plan: &Plan, trace: u32, step: u32) -> bool {
        plan.nodes.iter().enumerate().any(|(i, np)| {
            self.mine[i]
                && match np.per_step {
                    Some(s) => s.contains(trace, step),
                    None => np.anchor.trace == trace && np.anchor.step == step,
                }
        })
    }

    /// Sets a value computed elsewhere (carried from an earlier stage).
    pub fn insert(&mut self, node: NodeId, value: Tensor) {
        self.values[node.index()] = Some(value);
        self.fresh[node.index()] = true;
    }
}

impl<'a> Executor<'a> {
    /// An executor over `state` for one step of a validated graph.
    pub fn new(
        graph: &'a Graph,
        plan: &'a Plan,
        manifest: &'a Manifest,
        model: &'a Model,
        store: &'a mut Store,
    ) -> Self {
        Executor {
            graph,
            plan,
            manifest,
            model,
            first_layer: model.layers().start as u32,
            store,
        }
    }

    fn set(&mut self, id: NodeId, value: Tensor) {
        self.store.values[id.index()] = Some(value);
        self.store.fresh[id.index()] = true;
    }

    /// Sets a value computed elsewhere (carried from an earlier stage).
    pub fn insert(&mut self, node: NodeId, value: Tensor) {
        self.store.insert(node, value);
    }

    /// Runs the forward from layer `first` on (a part of the model's layers;
    /// all of them by default).
    pub fn set_first_layer(&mut self, first: u32) {
        self.first_layer = first;
    }

    /// Prepares step `step` of trace `trace`, whose prompts have `lens` tokens.
    pub fn begin(&mut self, trace: u32, step: u32, lens: &[usize]) {
        self.store.fresh.iter_mut().for_each(|f| *f = false);
        self.store.trace = trace;
        self.store.step = step;
        self.store.lens = lens.to_vec();
        self.store.due.clear();
        self.store.cursor = 0;
        self.store.deferred.clear();
        self.store.wanted.iter_mut().for_each(|w| *w = false);
        for (i, np) in self.plan.nodes.iter().enumerate() {
            if !self.store.mine[i] {
                continue;
            }
            let is_due = match np.per_step {
                Some(s) => s.contains(trace, step),
                None => np.anchor.trace == trace && np.anchor.step == step,
            };
            if !is_due {
                continue;
            }
            self.store.due.push(NodeId(i as u32));
            if let (Node::Read { .. } | Node::Write { .. }, Some(site)) =
                (&self.graph.nodes[i], np.site)
            {
                self.store.wanted[site.0 as usize] = true;
            }
        }
        let plan = self.plan;
        self.store
            .due
            .sort_by_key(|id| (plan.nodes[id.index()].anchor.position, *id));
        let invokes = self
            .graph
            .traces
            .get(trace as usize)
            .map_or(0, |t| t.invokes.len());
        (self.store.row_of, self.store.rows) = match self.sharing() {
            Some(s) => s.rows_before(self.first_layer),
            None => ((0..invokes).collect(), invokes),
        };
        let last_step = self.plan.steps.get(trace as usize).copied().unwrap_or(1) - 1;
        self.store.stop_at = match self.plan.stops.get(trace as usize) {
            Some(Some(a)) if step == last_step && a.trace == trace => Some(a.position),
            _ => None,
        };
    }

    /// Physical batch rows when the model's first hosted layer starts, for
    /// the step begun (fewer than the invokes when identical prompts share
    /// rows).
    pub fn rows(&self) -> usize {
        self.store.rows
    }

    fn sharing(&self) -> Option<&Sharing> {
        self.store.sharing.get(self.store.trace as usize)?.as_ref()
    }

    /// When invokes share rows in this step: the invoke each batch row
    /// carries at the model's input (the first stage feeds these prompts).
    /// All prompts then have one length and no padding, so every row uses
    /// the same positions.
    pub fn input_rows(&self) -> Option<Vec<usize>> {
        self.sharing().map(|s| s.initial.clone())
    }

    /// Ends the step: runs what was not reached in the forward and everything
    /// deferred, batching module calls.
    ///
    /// # Errors
    /// When a hooked point was never reached, or a node fails.
    pub fn finish(&mut self) -> Result<(), HookError> {
        while self.store.cursor < self.store.due.len() {
            let id = self.store.due[self.store.cursor];
            self.store.cursor += 1;
            match &self.graph.nodes[id.index()] {
                Node::Read { hook } | Node::Write { hook, .. } => {
                    return Err(NodeError::Unreached {
                        hook: hook.path(),
                        trace: self.store.trace,
                        step: self.store.step,
                    }
                    .at(id));
                }
                _ => self.store.deferred.push(id),
            }
        }
        self.run_deferred()
    }

    /// The per-invoke view of a hook value: one prompt's row and its own
    /// tokens (left padding stripped at the prompt step).
    fn invoke_view(&self, point: Point, full: &Tensor, invoke: usize) -> Result<Tensor, NodeError> {
        let row = *self
            .store
            .row_of
            .get(invoke)
            .ok_or(NodeError::InvokeOutOfRange(invoke))?;
        let row = full.f_narrow(0, row as i64, 1)?;
        let len = *self
            .store
            .lens
            .get(invoke)
            .ok_or(NodeError::InvokeOutOfRange(invoke))? as i64;
        let narrow_tail = |t: Tensor, dim: i64, keep: i64| -> Result<Tensor, NodeError> {
            let size = t.size().get(dim as usize).copied().unwrap_or(0);
            Ok(t.f_narrow(dim, size - keep, keep)?)
        };
        let query_dim = match point {
            Point::Q | Point::K | Point::V | Point::Pattern => 2,
            _ => 1,
        };
        let mut v = row;
        if self.store.step == 0 {
            v = narrow_tail(v, query_dim, len)?;
        }
        if point == Point::Pattern {
            v = narrow_tail(v, 3, len + i64::from(self.store.step))?;
        }
        Ok(v)
    }

    fn read_value(&self, id: NodeId, value: &Tensor) -> Result<Tensor, NodeError> {
        let Node::Read { hook } = &self.graph.nodes[id.index()] else {
            unreachable!("read_value on a Read node");
        };
        match hook.invoke {
            Some(i) => self.invoke_view(hook.point, value, i as usize),
            None => Ok(value.shallow_clone()),
        }
    }

    fn write(&self, id: NodeId, value: &mut Tensor) -> Result<(), NodeError> {
        let Node::Write {
            hook,
            value: src,
            index,
            mode,
        } = &self.graph.nodes[id.index()]
        else {
            unreachable!("write on a Write node");
        };
        let err = |source| NodeError::Write {
            hook: hook.path(),
            source,
        };
        let src = self.store.values[src.index()]
            .as_ref()
            .ok_or(NodeError::MissingInput(*src))?
            .f_to_kind(value.kind())
            .map_err(err)?;
        if hook.invoke.is_none() && index.is_none() && *mode == WriteMode::Set {
            *value = src.f_expand(value.size(), false).map_err(err)?.contiguous();
            return Ok(());
        }
        // Copy-on-write: reads taken before this write keep the old value.
        let target = value.copy();
        let mut view = match hook.invoke {
            Some(i) => self.invoke_view(hook.point, &target, i as usize)?,
            None => target.shallow_clone(),
        };
        if let Some(items) = index {
            view = ops::index(&view, items).map_err(err)?;
        }
        let new = match mode {
            WriteMode::Set => src,
            WriteMode::Add => view.f_add(&src).map_err(err)?,
        };
        view.f_copy_(&new).map_err(err)?;
        *value = target;
        Ok(())
    }

    fn input(&self, inp: NodeId) -> Result<&Tensor, NodeError> {
        self.store.values[inp.index()]
            .as_ref()
            .ok_or(NodeError::MissingInput(inp))
    }

    /// Runs a node that is neither Read nor Write.
    fn compute(&mut self, id: NodeId) -> Result<(), HookError> {
        self.compute_node(id).map_err(|e| e.at(id))
    }

    fn compute_node(&mut self, id: NodeId) -> Result<(), NodeError> {
        let node = &self.graph.nodes[id.index()];
        let out = match node {
            Node::Const { value } => ops::constant(value, self.model.device()),
            Node::Op { op, args } => {
                let args = args
                    .iter()
                    .map(|a| self.input(*a))
                    .collect::<Result<Vec<_>, _>>()?;
                let out = ops::eval(op, &args).map_err(|source| NodeError::Op {
                    op: op.name(),
                    source,
                })?;
                self.cast_to_plan(id, out)
            }
            Node::Apply { args, .. } => {
                let m = self.store.apply_modules[id.index()]
                    .expect("Apply modules are parsed in new()");
                let x = self.input(args[0])?;
                self.model.apply(m, x)?
            }
            Node::Save { name, value } => {
                let v = self.input(*value)?.copy();
                let per_step = self.plan.nodes[id.index()].per_step.is_some();
                self.store.saves.push(SavedTensor {
                    name: name.clone(),
                    step: per_step.then_some(self.store.step),
                    value: v,
                });
                return Ok(());
            }
            Node::Stop { .. } => return Ok(()),
            Node::Read { .. } | Node::Write { .. } => {
                unreachable!("reads and writes run at their hooks")
            }
        };
        self.set(id, out);
        Ok(())
    }

    fn cast_to_plan(&self, id: NodeId, t: Tensor) -> Tensor {
        match self.plan.meta_at(id, self.store.step) {
            Some(meta) if ops::dtype(t.kind()) != Some(meta.dtype) => {
                t.to_kind(ops::kind(meta.dtype))
            }
            _ => t,
        }
    }

    /// Runs deferred nodes in waves; Apply calls of one module on values of
    /// one shape run as a single batched call.
    fn run_deferred(&mut self) -> Result<(), HookError> {
        let mut pending = std::mem::take(&mut self.store.deferred);
        // Level by level of graph depth, so the batches are a property of the
        // graph alone: a mesh stage that received some inputs as carry batches
        // exactly as a single node does, and gets bit-identical results.
        let depth = std::mem::take(&mut self.store.depth);
        pending.sort_by_key(|id| (depth[id.index()], *id));
        let levels: Vec<&[NodeId]> = pending
            .chunk_by(|a, b| depth[a.index()] == depth[b.index()])
            .collect();
        let result = self.run_levels(&levels);
        self.store.depth = depth;
        result
    }

    fn run_levels(&mut self, levels: &[&[NodeId]]) -> Result<(), HookError> {
        for &level in levels {
            // Group Applies by (module, value shape past the batch dimension).
            // A 1-D value has no batch dimension (norm, lm_head and the
            // projections read its only dimension as features), so 1-D
            // values of one shape are stacked into a new one instead.
            let mut groups: Vec<(Module, Vec<i64>, Vec<NodeId>)> = Vec::new();
            for &id in level {
                if let Node::Apply { args, .. } = &self.graph.nodes[id.index()] {
                    let m = self.store.apply_modules[id.index()].expect("parsed");
                    let shape = self.input(args[0]).map_err(|e| e.at(id))?.size();
                    if shape.is_empty() {
                        self.compute(id)?;
                        continue;
                    }
                    let stacked = shape.len() == 1 && m != Module::Embed;
                    let key = |gs: &[i64]| {
                        if stacked {
                            gs == shape.as_slice()
                        } else {
                            gs.len() == shape.len() && gs[1..] == shape[1..]
                        }
                    };
                    match groups.iter_mut().find(|(gm, gs, _)| *gm == m && key(gs)) {
                        Some(g) => g.2.push(id),
                        None => groups.push((m, shape, vec![id])),
                    }
                } else {
                    self.compute(id)?;
                }
            }
            for (m, shape, ids) in groups {
                if ids.len() == 1 {
                    self.compute(ids[0])?;
                    continue;
                }
                let stacked = shape.len() == 1 && m != Module::Embed;
                let parts = self
                    .apply_batched(m, &ids, stacked)
                    .map_err(|e| e.at(ids[0]))?;
                for (id, part) in ids.iter().zip(parts) {
                    self.set(*id, part);
                }
            }
        }
        Ok(())
    }

    /// One call of module `m` on the concatenated (or, for 1-D values,
    /// stacked) inputs of the Apply nodes `ids`, split back per node.
    fn apply_batched(
        &self,
        m: Module,
        ids: &[NodeId],
        stacked: bool,
    ) -> Result<Vec<Tensor>, NodeError> {
        let xs = ids
            .iter()
            .map(|&id| match &self.graph.nodes[id.index()] {
                Node::Apply { args, .. } => {
                    let x = self.input(args[0])?;
                    Ok(if stacked {
                        x.f_unsqueeze(0)?
                    } else {
                        x.shallow_clone()
                    })
                }
                _ => unreachable!("groups hold Apply nodes"),
            })
            .collect::<Result<Vec<_>, NodeError>>()?;
        let sizes: Vec<i64> = xs.iter().map(|x| x.size()[0]).collect();
        let out = self.model.apply(m, &Tensor::f_cat(&xs, 0)?)?;
        out.f_split_with_sizes(&sizes, 0)?
            .into_iter()
            .map(|part| {
                Ok(if stacked {
                    part.f_squeeze_dim(0)?
                } else {
                    part
                })
            })
            .collect()
    }
}

impl Hooks for Executor<'_> {
    fn fork_rows(&mut self, layer: u32) -> Option<Vec<i64>> {
        let forks: Vec<(usize, usize)> = self.sharing()?.forks_at(layer).collect();
        if forks.is_empty() {
            return None;
        }
        let mut src = Vec::with_capacity(forks.len());
        for (invoke, from) in forks {
            src.push(self.store.row_of[from] as i64);
            self.store.row_of[invoke] = self.store.rows;
            self.store.rows += 1;
        }
        Some(src)
    }

    fn wants(&self, module: Module, point: Point) -> bool {
        self.manifest
            .site(module, point)
            .is_some_and(|s| self.store.wanted[s.0 as usize])
            || self
                .store
                .stop_at
                .is_some_and(|p| self.manifest.position(module, point) == Some(p))
    }

    fn visit(&mut self, module: Module, point: Point, value: &mut Tensor) -> Result<(), HookError> {
        let Some(Site(pos)) = self.manifest.site(module, point) else {
            return Ok(());
        };
        while self.store.cursor < self.store.due.len() {
            let id = self.store.due[self.store.cursor];
            let np = &self.plan.nodes[id.index()];
            if np.anchor.position > pos {
                break;
            }
            self.store.cursor += 1;
            match &self.graph.nodes[id.index()] {
                Node::Read { hook } => {
                    if np.site != Some(Site(pos)) {
                        return Err(NodeError::Passed {
                            hook: hook.path(),
                            at: module.path(),
                        }
                        .at(id));
                    }
                    let v = self.read_value(id, value).map_err(|e| e.at(id))?;
                    self.set(id, v);
                }
                Node::Write { .. } => self.write(id, value).map_err(|e| e.at(id))?,
                _ if self.store.eager[id.index()] => self.compute(id)?,
                _ => self.store.deferred.push(id),
            }
        }
        if self.store.stop_at.is_some_and(|p| p <= pos) {
            return Err(HookError::Stop);
        }
        Ok(())
    }
}
