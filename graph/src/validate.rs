//! Validation: checks a graph against a model's manifest and request limits
//! before anything runs, and produces the [`Plan`] the interpreter follows.
//!
//! # When a node runs
//! Each node runs at the first hook moment — `(trace, step, position in
//! forward order)`, see [`Anchor`] — at which all its inputs exist: a `Read`
//! at its hook's first step, a `Write` at its hook, a `Const` at the very
//! start, every other node at the latest anchor of its inputs. Nodes with the
//! same anchor run in id order, so a read followed by a write of the same
//! hook sees the value before the write (`h += f(h)` works), and a read after
//! a write sees the written value.
//!
//! # Steps
//! A hook over several steps (`Steps::Range`/`Steps::All`) makes its node
//! *per-step* ([`NodePlan::per_step`]): it runs once per step of its
//! [`StepSet`], at the same position, and so does every node that depends on
//! it (over the intersection of their inputs' step sets, which must be in
//! one trace). A write uses the value of its own step; it needs a value for
//! every step it writes. Shapes differ between step 0 (`t` = prompt length)
//! and decode steps (`t` = 1, `t_kv` = prompt length + step): validation
//! checks every step, [`NodePlan::meta`] is the meta at the node's first step
//! and [`Plan::meta_at`] gives any other.
//!
//! # Padding
//! A hook with `invoke: Some(i)` sees only prompt `i`'s own rows and tokens
//! (`[1, len_i, ...]`); with `None` it sees the whole left-padded batch
//! (`[B, T_max, ...]`).

mod scan;

use std::collections::BTreeMap;

use crate::{
    ir::{DType, FORMAT_VERSION, Graph, NodeId, Prompt},
    manifest::{Manifest, Module, Site},
    op::{Arity, TensorMeta},
};

pub use nnmesh_protocol::limits::Limits;

/// What the node learned by tokenizing: the token count of each invoke of each trace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inputs {
    /// `traces[t][i]` is the number of tokens of invoke `i` of trace `t`.
    pub traces: Vec<Vec<u32>>,
}

impl Inputs {
    /// Token counts for a graph whose prompts are all token ids; `None` if any is text.
    pub fn from_tokens(graph: &Graph) -> Option<Inputs> {
        let traces = graph
            .traces
            .iter()
            .map(|t| {
                t.invokes
                    .iter()
                    .map(|i| match &i.prompt {
                        Prompt::Tokens(ids) => u32::try_from(ids.len()).ok(),
                        Prompt::Text(_) => None,
                    })
                    .collect::<Option<Vec<u32>>>()
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Inputs { traces })
    }
}

/// A hook moment: ordered by trace, then step, then position in forward order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Anchor {
    /// Index of the trace.
    pub trace: u32,
    /// Step of the trace (0 = prompt forward).
    pub step: u32,
    /// Position of the hook in forward order within the step ([`Manifest::position`]).
    pub position: u32,
}

impl std::fmt::Display for Anchor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "trace {}, step {}, position {}",
            self.trace, self.step, self.position
        )
    }
}

/// The steps `start..end` of one trace at which a per-step node runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StepSet {
    /// Index of the trace.
    pub trace: u32,
    /// First step.
    pub start: u32,
    /// One past the last step.
    pub end: u32,
}

impl StepSet {
    /// Whether the set holds `step` of `trace`.
    pub fn contains(&self, trace: u32, step: u32) -> bool {
        trace == self.trace && (self.start..self.end).contains(&step)
    }

    /// Number of steps.
    pub fn len(&self) -> u32 {
        self.end.saturating_sub(self.start)
    }

    /// Whether the set has no steps (never true in a [`Plan`]).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether every step of `other` is in `self`.
    pub fn covers(&self, other: &StepSet) -> bool {
        self.trace == other.trace && self.start <= other.start && other.end <= self.end
    }
}

/// What validation decided about one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePlan {
    /// The first moment at which the node runs.
    pub anchor: Anchor,
    /// The node's value at its first step; for Write and Save the value's
    /// meta, for Stop a 0-d bool placeholder.
    pub meta: TensorMeta,
    /// For per-step nodes, the steps at which they run (at `anchor.position`).
    pub per_step: Option<StepSet>,
    /// For Read and Write, the hook's module.
    pub module: Option<Module>,
    /// For Read and Write, the hook's site.
    pub site: Option<Site>,
}

impl NodePlan {
    /// The last moment at which the node runs.
    pub fn last_moment(&self) -> Anchor {
        match self.per_step {
            Some(s) => Anchor {
                step: s.end - 1,
                ..self.anchor
            },
            None => self.anchor,
        }
    }
}

/// A validated graph: per-node anchors, metas and step sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// One entry per node, indexed by [`NodeId`].
    pub nodes: Vec<NodePlan>,
    /// Number of steps of each trace.
    pub steps: Vec<u32>,
    /// For each trace with a Stop node, the moment after which its forward may end.
    pub stops: Vec<Option<Anchor>>,
    /// Total bytes of saved values, over all steps.
    pub saved_bytes: u64,
    /// Total bytes of constants.
    pub const_bytes: u64,
    /// What each trace costs a node, as checked against the [`Limits`].
    pub costs: Vec<TraceCost>,
    /// Metas of per-step nodes at decode steps whose shape differs from the
    /// first step's, keyed by (node, step); see [`Plan::meta_at`].
    step_metas: BTreeMap<(u32, u32), TensorMeta>,
}

impl Plan {
    /// Node ids in execution order: by anchor, then id.
    pub fn order(&self) -> Vec<NodeId> {
        let mut ids: Vec<NodeId> = (0..self.nodes.len() as u32).map(NodeId).collect();
        ids.sort_by_key(|id| (self.nodes[id.index()].anchor, *id));
        ids
    }

    /// The meta of `node`'s value at `step` (differs from [`NodePlan::meta`]
    /// for per-step nodes whose first step is the prompt forward), or `None`
    /// if the node does not run at that step or does not exist.
    pub fn meta_at(&self, node: NodeId, step: u32) -> Option<&TensorMeta> {
        let n = self.nodes.get(node.index())?;
        match n.per_step {
            None => Some(&n.meta),
            Some(s) if !(s.start..s.end).contains(&step) => None,
            Some(_) => self
                .step_metas
                .range((node.0, 0)..=(node.0, step))
                .next_back()
                .map(|(_, m)| m)
                .or(Some(&n.meta)),
        }
    }
}

/// Why a graph was rejected; every variant names the offending node or thing.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ValidateError {
    /// The graph's format version is not the one this build runs.
    #[error("graph format version {found} is not supported (this build runs version {supported})")]
    Version {
        /// The graph's version.
        found: u32,
        /// This build's version.
        supported: u32,
    },
    /// The graph has no traces.
    #[error("the graph has no traces")]
    NoTraces,
    /// More traces than allowed.
    #[error("the graph has {traces} traces; the limit is {limit}")]
    TooManyTraces {
        /// Traces in the graph.
        traces: usize,
        /// The limit.
        limit: usize,
    },
    /// A trace without prompts.
    #[error("trace {trace} has no invokes")]
    EmptyTrace {
        /// The trace.
        trace: u32,
    },
    /// More invokes in one trace than allowed.
    #[error("trace {trace} has {invokes} invokes; the limit is {limit}")]
    TooManyInvokes {
        /// The trace.
        trace: u32,
        /// Its invokes.
        invokes: usize,
        /// The limit.
        limit: usize,
    },
    /// A trace asks to generate more tokens than allowed.
    #[error("trace {trace} asks for {requested} new tokens; the limit is {limit}")]
    TooManyNewTokens {
        /// The trace.
        trace: u32,
        /// Tokens requested.
        requested: u32,
        /// The limit.
        limit: u32,
    },
    /// The token counts given do not match the graph's traces and prompts.
    #[error("inputs do not match the graph: {detail}")]
    InputsMismatch {
        /// What differs.
        detail: String,
    },
    /// A prompt with no tokens.
    #[error("trace {trace} invoke {invoke} has an empty prompt")]
    EmptyPrompt {
        /// The trace.
        trace: u32,
        /// The invoke.
        invoke: u32,
    },
    /// A prompt plus its generated tokens does not fit the model.
    #[error(
        "trace {trace} invoke {invoke}: {tokens} prompt tokens + {new_tokens} new tokens exceed the model's {max} positions"
    )]
    PromptTooLong {
        /// The trace.
        trace: u32,
        /// The invoke.
        invoke: u32,
        /// Prompt tokens.
        tokens: u32,
        /// Tokens to generate.
        new_tokens: u32,
        /// The model's maximum positions.
        max: u32,
    },
    /// A token id outside the vocabulary.
    #[error("trace {trace} invoke {invoke}: token id {token} is outside the vocabulary of {vocab}")]
    TokenOutOfRange {
        /// The trace.
        trace: u32,
        /// The invoke.
        invoke: u32,
        /// The token id.
        token: u32,
        /// Vocabulary size.
        vocab: u32,
    },
    /// More nodes than allowed.
    #[error("the graph has {nodes} nodes; the limit is {limit}")]
    TooManyNodes {
        /// Nodes in the graph.
        nodes: usize,
        /// The limit.
        limit: usize,
    },
    /// An input id past the end of the node list.
    #[error("node {node} uses node {input}, which does not exist")]
    DanglingInput {
        /// The node.
        node: NodeId,
        /// The missing input.
        input: NodeId,
    },
    /// An input that is the node itself or a later node (a cycle).
    #[error(
        "node {node} uses node {input}, which is not an earlier node (cycle or forward reference)"
    )]
    ForwardReference {
        /// The node.
        node: NodeId,
        /// The input.
        input: NodeId,
    },
    /// An input that produces no value (a write, save or stop).
    #[error("node {node} uses node {input}, a {kind} node, which has no value")]
    NotAValue {
        /// The node.
        node: NodeId,
        /// The input.
        input: NodeId,
        /// The input's kind.
        kind: &'static str,
    },
    /// A module path the model does not have.
    #[error("node {node}: the model has no module {module:?}")]
    UnknownModule {
        /// The node.
        node: NodeId,
        /// The path.
        module: String,
    },
    /// A point the module does not have.
    #[error("node {node}: module {module} has no point {point}")]
    UnknownPoint {
        /// The node.
        node: NodeId,
        /// The module path.
        module: String,
        /// The point.
        point: crate::ir::Point,
    },
    /// A hook or stop naming a trace that does not exist.
    #[error("node {node} names trace {trace}, but the graph has {traces} traces")]
    TraceOutOfRange {
        /// The node.
        node: NodeId,
        /// The trace.
        trace: u32,
        /// Traces in the graph.
        traces: usize,
    },
    /// A hook naming an invoke its trace does not have.
    #[error("node {node} names invoke {invoke}, but its trace has {invokes} invokes")]
    InvokeOutOfRange {
        /// The node.
        node: NodeId,
        /// The invoke.
        invoke: u32,
        /// Invokes in the trace.
        invokes: usize,
    },
    /// A hook naming a step its trace does not run.
    #[error("node {node} names step {step}, but its trace runs {steps} steps")]
    StepOutOfRange {
        /// The node.
        node: NodeId,
        /// The step.
        step: u32,
        /// Steps of the trace.
        steps: u32,
    },
    /// A step range with no steps.
    #[error("node {node} names the empty step range {start}..{end}")]
    EmptySteps {
        /// The node.
        node: NodeId,
        /// Range start.
        start: u32,
        /// Range end.
        end: u32,
    },
    /// Per-step values that do not line up in steps.
    #[error("node {node}: {detail}")]
    StepMismatch {
        /// The node.
        node: NodeId,
        /// Which steps and values clash.
        detail: String,
    },
    /// A write whose value is only available after the written hook has run.
    #[error(
        "node {node} writes {write_hook} but its value depends on {depends_on}, which runs later in the forward pass"
    )]
    OutOfOrder {
        /// The write node.
        node: NodeId,
        /// The written hook, with trace and step.
        write_hook: String,
        /// The hook the value depends on, with trace and step.
        depends_on: String,
    },
    /// Wrong number of op arguments.
    #[error("node {node}: {op} takes {expected} arguments, got {found}")]
    Arity {
        /// The node.
        node: NodeId,
        /// The op.
        op: &'static str,
        /// What it accepts.
        expected: Arity,
        /// What it got.
        found: usize,
    },
    /// Shapes that do not fit an op.
    #[error("node {node}: {op}: {detail}")]
    Shape {
        /// The node.
        node: NodeId,
        /// The op.
        op: &'static str,
        /// What is wrong, naming the shapes.
        detail: String,
    },
    /// Dtypes that do not fit an op.
    #[error("node {node}: {op}: {detail}")]
    Dtype {
        /// The node.
        node: NodeId,
        /// The op.
        op: &'static str,
        /// What is wrong, naming the dtypes.
        detail: String,
    },
    /// An apply without exactly one argument.
    #[error("node {node}: applying {module} takes exactly 1 argument, got {found}")]
    ApplyArgs {
        /// The node.
        node: NodeId,
        /// The module path.
        module: String,
        /// Arguments given.
        found: usize,
    },
    /// An apply whose argument does not fit the module.
    #[error("node {node}: cannot apply {module}: {detail}")]
    ApplyShape {
        /// The node.
        node: NodeId,
        /// The module path.
        module: String,
        /// What is wrong.
        detail: String,
    },
    /// An index that does not fit the written hook.
    #[error("node {node}: cannot index {hook}: {detail}")]
    WriteIndex {
        /// The node.
        node: NodeId,
        /// The hook path.
        hook: String,
        /// What is wrong.
        detail: String,
    },
    /// A written value that does not broadcast to the written slice.
    #[error(
        "node {node}: cannot write a value of shape {value} into {hook}, whose slice has shape {target}"
    )]
    WriteShape {
        /// The node.
        node: NodeId,
        /// The hook path (and step).
        hook: String,
        /// The value's shape.
        value: String,
        /// The slice's shape.
        target: String,
    },
    /// A written value of the wrong kind (float vs integer) for the hook.
    #[error("node {node}: cannot write a {value} value into {hook}, which holds {target}")]
    WriteDtype {
        /// The node.
        node: NodeId,
        /// The hook path.
        hook: String,
        /// The value's dtype.
        value: DType,
        /// The hook's dtype.
        target: DType,
    },
    /// A constant whose value count does not match its shape.
    #[error("node {node}: constant of shape {shape} needs {expected} values, got {found}")]
    ConstLength {
        /// The node.
        node: NodeId,
        /// The declared shape.
        shape: String,
        /// Values the shape needs.
        expected: u64,
        /// Values given.
        found: u64,
    },
    /// A constant value its dtype cannot hold.
    #[error("node {node}: value {value} at position {index} is not a valid {dtype}")]
    ConstValue {
        /// The node.
        node: NodeId,
        /// Position in `values`.
        index: usize,
        /// The value.
        value: f64,
        /// The dtype.
        dtype: DType,
    },
    /// Constants over the byte limit.
    #[error("constants take {total} bytes; the limit is {limit}")]
    ConstBytes {
        /// Bytes of all constants.
        total: u64,
        /// The limit.
        limit: u64,
    },
    /// Saved values over the byte limit.
    #[error("saved values take {total} bytes; the limit is {limit}")]
    SavedBytes {
        /// Bytes of all saves over all steps.
        total: u64,
        /// The limit.
        limit: u64,
    },
    /// A trace needs more of a node's resources than its limits allow.
    #[error("trace {trace} needs {needed} {what}; this node's limit is {limit} ({limit_name})")]
    OverBudget {
        /// The trace.
        trace: u32,
        /// What is over (e.g. "batch tokens").
        what: &'static str,
        /// How much the trace needs (estimated for bytes of activations).
        needed: u64,
        /// The limit.
        limit: u64,
        /// The name of the [`Limits`] field, e.g. `max_batch_tokens`.
        limit_name: &'static str,
    },
    /// Two saves with the same name.
    #[error("node {node} saves under {name:?}, which an earlier save already uses")]
    DuplicateSave {
        /// The second save.
        node: NodeId,
        /// The name.
        name: String,
    },
}

/// Validates `graph` against the model and limits and computes its [`Plan`].
///
/// # Errors
/// The first problem found, as a [`ValidateError`] naming the node and the
/// culprit (module, hook, shapes, limit).
pub fn validate(
    graph: &Graph,
    manifest: &Manifest,
    inputs: &Inputs,
    limits: &Limits,
) -> Result<Plan, ValidateError> {
    if graph.version != FORMAT_VERSION {
        return Err(ValidateError::Version {
            found: graph.version,
            supported: FORMAT_VERSION,
        });
    }
    if graph.nodes.len() > limits.max_nodes {
        return Err(ValidateError::TooManyNodes {
            nodes: graph.nodes.len(),
            limit: limits.max_nodes,
        });
    }
    check_traces(graph, manifest, inputs, limits)?;
    let costs = check_budget(graph, manifest, inputs, limits)?;
    let mut plan = scan::scan(graph, manifest, inputs, limits)?;
    plan.costs = costs;
    Ok(plan)
}

/// What one trace costs a node: the size of its forward and of its KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceCost {
    /// Batch rows (invokes).
    pub rows: u64,
    /// Tokens of the longest prompt (the padded length of step 0).
    pub prompt_tokens: u64,
    /// `rows × prompt_tokens`: the tokens of the largest forward.
    pub batch_tokens: u64,
    /// Estimated bytes of activations of the largest forward (step 0).
    pub activation_bytes: u64,
    /// Bytes of KV cache one decoder layer holds at the trace's last step.
    pub kv_bytes_per_layer: u64,
}

impl TraceCost {
    /// The cost of a trace of `rows` prompts padded to `prompt_tokens`,
    /// running `steps` steps, on the model of `manifest`.
    ///
    /// Activations are estimated as the tensors live at the widest point of
    /// a forward, in the model's dtype: four hidden states, q/k/v, one
    /// attention-score matrix (the softmax path materializes it), three MLP
    /// intermediates and the `[rows, tokens, vocab]` logits. It is an
    /// estimate for admission, not an allocator's count.
    pub fn estimate(manifest: &Manifest, rows: u64, prompt_tokens: u64, steps: u32) -> TraceCost {
        let e = dtype_bytes(manifest.dtype);
        let m = |a: u64, b: u64| a.saturating_mul(b);
        let bt = m(rows, prompt_tokens);
        let (h, i, v) = (
            u64::from(manifest.hidden),
            u64::from(manifest.intermediate),
            u64::from(manifest.vocab),
        );
        let (heads, kv, hd) = (
            u64::from(manifest.heads),
            u64::from(manifest.kv_heads),
            u64::from(manifest.head_dim),
        );
        let per_token = m(4, h)
            .saturating_add(m(heads + 2 * kv, hd))
            .saturating_add(m(3, i))
            .saturating_add(v);
        let scores = m(m(rows, heads), m(prompt_tokens, prompt_tokens));
        let activation_bytes = m(e, m(bt, per_token).saturating_add(scores));
        let kv_tokens = prompt_tokens.saturating_add(u64::from(steps).saturating_sub(1));
        TraceCost {
            rows,
            prompt_tokens,
            batch_tokens: bt,
            activation_bytes,
            kv_bytes_per_layer: m(e, m(m(2, rows), m(kv_tokens, m(kv, hd)))),
        }
    }
}

fn dtype_bytes(d: DType) -> u64 {
    match d {
        DType::F32 => 4,
        DType::F16 | DType::Bf16 => 2,
        DType::I64 => 8,
        DType::Bool => 1,
    }
}

/// Estimates each trace's cost and checks it against the limits.
fn check_budget(
    graph: &Graph,
    manifest: &Manifest,
    inputs: &Inputs,
    limits: &Limits,
) -> Result<Vec<TraceCost>, ValidateError> {
    let mut costs = Vec::with_capacity(graph.traces.len());
    for (t, (trace, lens)) in graph.traces.iter().zip(&inputs.traces).enumerate() {
        let longest = lens.iter().copied().max().unwrap_or(0);
        let cost = TraceCost::estimate(
            manifest,
            lens.len() as u64,
            u64::from(longest),
            trace.steps(),
        );
        let over = |what, needed, limit, limit_name| ValidateError::OverBudget {
            trace: t as u32,
            what,
            needed,
            limit,
            limit_name,
        };
        if cost.batch_tokens > limits.max_batch_tokens {
            return Err(over(
                "batch tokens (rows × longest prompt)",
                cost.batch_tokens,
                limits.max_batch_tokens,
                "max_batch_tokens",
            ));
        }
        if cost.activation_bytes > limits.max_activation_bytes {
            return Err(over(
                "bytes of activations (estimated, logits included)",
                cost.activation_bytes,
                limits.max_activation_bytes,
                "max_activation_bytes",
            ));
        }
        costs.push(cost);
    }
    Ok(costs)
}

/// Checks traces, prompts and token counts against the model and limits.
fn check_traces(
    graph: &Graph,
    manifest: &Manifest,
    inputs: &Inputs,
    limits: &Limits,
) -> Result<(), ValidateError> {
    if graph.traces.is_empty() {
        return Err(ValidateError::NoTraces);
    }
    if graph.traces.len() > limits.max_traces {
        return Err(ValidateError::TooManyTraces {
            traces: graph.traces.len(),
            limit: limits.max_traces,
        });
    }
    if inputs.traces.len() != graph.traces.len() {
        return Err(ValidateError::InputsMismatch {
            detail: format!(
                "{} traces of token counts for {} traces",
                inputs.traces.len(),
                graph.traces.len()
            ),
        });
    }
    for (t, (trace, lens)) in graph.traces.iter().zip(&inputs.traces).enumerate() {
        let t = t as u32;
        if trace.invokes.is_empty() {
            return Err(ValidateError::EmptyTrace { trace: t });
        }
        if trace.invokes.len() > limits.max_invokes {
            return Err(ValidateError::TooManyInvokes {
                trace: t,
                invokes: trace.invokes.len(),
                limit: limits.max_invokes,
            });
        }
        if trace.max_new_tokens > limits.max_new_tokens {
            return Err(ValidateError::TooManyNewTokens {
                trace: t,
                requested: trace.max_new_tokens,
                limit: limits.max_new_tokens,
            });
        }
        if lens.len() != trace.invokes.len() {
            return Err(ValidateError::InputsMismatch {
                detail: format!(
                    "trace {t} has {} invokes but {} token counts",
                    trace.invokes.len(),
                    lens.len()
                ),
            });
        }
        for (i, (invoke, &len)) in trace.invokes.iter().zip(lens).enumerate() {
            let i = i as u32;
            if let Prompt::Tokens(ids) = &invoke.prompt {
                if ids.len() != len as usize {
                    return Err(ValidateError::InputsMismatch {
                        detail: format!(
                            "trace {t} invoke {i} has {} token ids but a count of {len}",
                            ids.len()
                        ),
                    });
                }
                if let Some(&token) = ids.iter().find(|&&id| id >= manifest.vocab) {
                    return Err(ValidateError::TokenOutOfRange {
                        trace: t,
                        invoke: i,
                        token,
                        vocab: manifest.vocab,
                    });
                }
            }
            if len == 0 {
                return Err(ValidateError::EmptyPrompt {
                    trace: t,
                    invoke: i,
                });
            }
            // The last generated token is never fed back, so N new tokens use N - 1 positions.
            let needed = u64::from(len) + u64::from(trace.steps()) - 1;
            if needed > u64::from(manifest.max_positions) {
                return Err(ValidateError::PromptTooLong {
                    trace: t,
                    invoke: i,
                    tokens: len,
                    new_tokens: trace.max_new_tokens,
                    max: manifest.max_positions,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
