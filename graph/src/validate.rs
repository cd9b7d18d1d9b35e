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

mod error;
mod scan;

pub use error::ValidateError;

use std::collections::BTreeMap;

use crate::{
    ir::{DType, FORMAT_VERSION, Graph, NodeId, Prompt},
    manifest::{Manifest, Module, Site},
    op::TensorMeta,
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
