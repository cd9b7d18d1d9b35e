//! Partitioning: splits a validated graph into per-stage fragments along a
//! pipeline route.
//!
//! Reads and writes run on the stage that owns their hook's module, `Apply`
//! on the stage that owns the applied module, ops and saves on the earliest
//! stage where all their inputs exist, constants on every stage that uses
//! them. A value used on a later stage than the one producing it travels
//! with the hidden state ("carry"). Saves go straight to the client.
//!
//! # Running a fragment
//! A stage visits, for each trace and step, the hook sites of its modules in
//! forward order. A fragment node runs at the first such moment at or after
//! its [`Anchor`](crate::Anchor); a node anchored before the stage's first
//! site of that step (e.g. an `Apply(lm_head)` of an early layer's output)
//! runs as soon as the stage starts that step, once the carry has arrived.

use nnmesh_protocol::Span;

use crate::{
    ir::{Graph, Node, NodeId},
    manifest::{Manifest, Module},
    validate::Plan,
};

/// The part of a graph one stage executes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fragment {
    /// Index of the stage in the route.
    pub stage: usize,
    /// The layers the stage hosts; the first stage also hosts
    /// `model.embed_tokens`, the last `model.norm` and `lm_head`.
    pub span: Span,
    /// Nodes this stage executes, in id order (constants may appear on several stages).
    pub nodes: Vec<NodeId>,
    /// Values that arrive with the hidden state from the previous stage.
    pub carry_in: Vec<NodeId>,
    /// Values this stage forwards to the next stage.
    pub carry_out: Vec<NodeId>,
    /// Save nodes executed here; their values go straight to the client.
    pub saves: Vec<NodeId>,
    /// Values this stage sends to the client for an earlier stage that needs
    /// them in a later trace or step; the client hands them to the first
    /// stage with its next step, and they travel as carry from there.
    pub relay_out: Vec<NodeId>,
}

/// Why a graph cannot be split along a route.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PartitionError {
    /// The route does not cover the model's layers exactly once, in order.
    #[error("the route does not cover layers 0..{num_layers}: {detail}")]
    Coverage {
        /// The model's layer count.
        num_layers: u32,
        /// What is missing or overlapping.
        detail: String,
    },
    /// The plan is not the one for this graph.
    #[error("the plan has {plan} nodes but the graph has {graph}")]
    PlanMismatch {
        /// Nodes in the plan.
        plan: usize,
        /// Nodes in the graph.
        graph: usize,
    },
    /// A hook or apply names a module the manifest does not have (validate first).
    #[error("node {node}: the model has no module {module:?}")]
    UnknownModule {
        /// The node.
        node: NodeId,
        /// The module path.
        module: String,
    },
    /// A value needed on an earlier stage than the one producing it.
    #[error(
        "node {consumer} runs on stage {needed_on} but uses node {node}, which is produced on the later stage {produced_on}; a pipeline cannot send values backward"
    )]
    Backward {
        /// The value's node.
        node: NodeId,
        /// The node that needs it.
        consumer: NodeId,
        /// Stage producing the value.
        produced_on: usize,
        /// Stage needing it.
        needed_on: usize,
    },
}

fn check_route(route: &[Span], num_layers: u32) -> Result<(), PartitionError> {
    let err = |detail: String| PartitionError::Coverage { num_layers, detail };
    if route.is_empty() {
        return Err(err("the route has no stages".into()));
    }
    let mut next = 0;
    for (i, s) in route.iter().enumerate() {
        if s.start != next {
            return Err(err(format!(
                "stage {i} starts at layer {} but layer {next} comes next",
                s.start
            )));
        }
        if s.end <= s.start {
            return Err(err(format!(
                "stage {i} hosts no layers ({}..{})",
                s.start, s.end
            )));
        }
        next = s.end;
    }
    if next != num_layers {
        return Err(err(format!("the last stage ends at layer {next}")));
    }
    Ok(())
}

/// Assigns every node of a validated graph to a stage of `route` and
/// computes each stage's fragment and carry.
///
/// Stop nodes go to the last stage that runs any node of their trace.
///
/// # Errors
/// [`PartitionError::Coverage`] if the route does not tile `0..num_layers`,
/// [`PartitionError::Backward`] if a value is needed on an earlier stage than
/// the one producing it within the same step (a value needed in a later step
/// or trace is relayed through the client instead, see
/// [`Fragment::relay_out`]), and
/// [`PartitionError::PlanMismatch`]/[`PartitionError::UnknownModule`] for a
/// plan or graph that did not come from [`validate`](fn@crate::validate).
pub fn partition(
    graph: &Graph,
    plan: &Plan,
    manifest: &Manifest,
    route: &[Span],
) -> Result<Vec<Fragment>, PartitionError> {
    check_route(route, manifest.num_layers)?;
    if plan.nodes.len() != graph.nodes.len() {
        return Err(PartitionError::PlanMismatch {
            plan: plan.nodes.len(),
            graph: graph.nodes.len(),
        });
    }
    let last = route.len() - 1;
    let stage_of = |m: Module| match m.layer() {
        Some(l) => route
            .iter()
            .position(|s| s.start <= l && l < s.end)
            .unwrap_or(last),
        None if m == Module::Embed => 0,
        None => last,
    };
    let module_stage = |id: NodeId, path: &str| {
        manifest
            .parse_module(path)
            .map(stage_of)
            .ok_or_else(|| PartitionError::UnknownModule {
                node: id,
                module: path.to_owned(),
            })
    };

    // Stage of every node except constants (placed with their consumers) and stops.
    let mut stage: Vec<Option<usize>> = vec![None; graph.nodes.len()];
    // For values relayed through the client: the last stage that needs them.
    let mut relay_to: Vec<Option<usize>> = vec![None; graph.nodes.len()];
    for (i, node) in graph.nodes.iter().enumerate() {
        let id = NodeId(i as u32);
        let inputs_max = || {
            node.inputs()
                .iter()
                .filter_map(|input| stage.get(input.index()).copied().flatten())
                .max()
                .unwrap_or(0)
        };
        stage[i] = match node {
            Node::Read { hook } | Node::Write { hook, .. } => Some(module_stage(id, &hook.module)?),
            Node::Apply { module, .. } => Some(module_stage(id, module)?),
            Node::Op { .. } | Node::Save { .. } => Some(inputs_max()),
            Node::Const { .. } | Node::Stop { .. } => None,
        };
        if let Some(s) = stage[i] {
            for &input in node.inputs() {
                if let Some(p) = stage.get(input.index()).copied().flatten()
                    && p > s
                {
                    // A value finished before the consumer's step starts can
                    // go back through the client; within one step it cannot.
                    let produced = plan.nodes[input.index()].last_moment();
                    let needed = plan.nodes[i].anchor;
                    if (needed.trace, needed.step) > (produced.trace, produced.step) {
                        let r = &mut relay_to[input.index()];
                        *r = Some(r.map_or(s, |r: usize| r.max(s)));
                        continue;
                    }
                    return Err(PartitionError::Backward {
                        node: input,
                        consumer: id,
                        produced_on: p,
                        needed_on: s,
                    });
                }
            }
        }
    }

    // Stops: the last stage that runs any node of the trace.
    for (i, node) in graph.nodes.iter().enumerate() {
        if let Node::Stop { trace } = node {
            let in_trace = |j: usize| match &graph.nodes[j] {
                Node::Read { hook } | Node::Write { hook, .. } => hook.trace == *trace,
                _ => plan.nodes[j].anchor.trace == *trace,
            };
            stage[i] = Some(
                (0..graph.nodes.len())
                    .filter(|&j| stage[j].is_some() && !matches!(graph.nodes[j], Node::Stop { .. }))
                    .filter(|&j| in_trace(j))
                    .filter_map(|j| stage[j])
                    .max()
                    .unwrap_or(0),
            );
        }
    }

    let mut fragments: Vec<Fragment> = route
        .iter()
        .enumerate()
        .map(|(k, &span)| Fragment {
            stage: k,
            span,
            nodes: Vec::new(),
            carry_in: Vec::new(),
            carry_out: Vec::new(),
            saves: Vec::new(),
            relay_out: Vec::new(),
        })
        .collect();

    // Consumers' stages of each node, to place constants and compute carry
    // (relayed consumers are served from the first stage instead).
    let mut consumers: Vec<Vec<usize>> = vec![Vec::new(); graph.nodes.len()];
    for (i, node) in graph.nodes.iter().enumerate() {
        if let Some(s) = stage[i] {
            for &input in node.inputs() {
                let producer = stage.get(input.index()).copied().flatten();
                if producer.is_some_and(|p| p > s) {
                    continue;
                }
                if let Some(c) = consumers.get_mut(input.index()) {
                    c.push(s);
                }
            }
        }
    }
    for (i, r) in relay_to.iter().enumerate() {
        if let (Some(r), Some(p)) = (*r, stage[i]) {
            let id = NodeId(i as u32);
            fragments[p].relay_out.push(id);
            for f in &mut fragments[..=r] {
                f.carry_in.push(id);
            }
            for f in &mut fragments[..r] {
                f.carry_out.push(id);
            }
        }
    }
    for (i, node) in graph.nodes.iter().enumerate() {
        let id = NodeId(i as u32);
        match stage[i] {
            Some(s) => {
                fragments[s].nodes.push(id);
                if matches!(node, Node::Save { .. }) {
                    fragments[s].saves.push(id);
                }
                if let Some(&farthest) = consumers[i].iter().max()
                    && farthest > s
                {
                    for f in &mut fragments[s..farthest] {
                        f.carry_out.push(id);
                    }
                    for f in &mut fragments[s + 1..=farthest] {
                        f.carry_in.push(id);
                    }
                }
            }
            None => {
                let mut on = consumers[i].clone();
                on.sort_unstable();
                on.dedup();
                if on.is_empty() {
                    on.push(0);
                }
                for s in on {
                    fragments[s].nodes.push(id);
                }
            }
        }
    }
    for f in &mut fragments {
        for list in [&mut f.carry_in, &mut f.carry_out] {
            list.sort_unstable();
            list.dedup();
        }
    }
    Ok(fragments)
}

#[cfg(test)]
mod tests;
