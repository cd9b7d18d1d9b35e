//! Per-request limits a node enforces before it runs anything.
//!
//! A node sets its own [`Limits`] (the `nnmesh node` flags) and announces
//! them in its [`StageRecord`](crate::record::StageRecord); a client checks a
//! graph against the tightest limits of its route ([`Limits::tightest`]) before
//! sending it, and every node checks again on arrival. The graph crate's
//! validation enforces them and names the limit a request is over.

use serde::{Deserialize, Serialize};

/// What one request may ask of a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Most bytes of an encoded graph; checked before the graph is decoded.
    pub max_graph_bytes: u64,
    /// Most nodes in a graph; checked while decoding, before the nodes are built.
    pub max_nodes: usize,
    /// Most traces in a session.
    pub max_traces: usize,
    /// Most invokes (batch rows) in one trace.
    pub max_invokes: usize,
    /// Most tokens one trace may generate.
    pub max_new_tokens: u32,
    /// Most batch tokens of one forward: rows × the longest prompt, of any trace.
    pub max_batch_tokens: u64,
    /// Most bytes of activations one forward may need, estimated from the
    /// model's shapes (hidden states, q/k/v, attention scores, MLP and the
    /// `[batch, tokens, vocab]` logits).
    pub max_activation_bytes: u64,
    /// Most bytes of saved values, over all steps.
    pub max_saved_bytes: u64,
    /// Most bytes of constants.
    pub max_const_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_graph_bytes: 64 << 20,
            max_nodes: 10_000,
            max_traces: 16,
            max_invokes: 256,
            max_new_tokens: 1024,
            max_batch_tokens: 32_768,
            max_activation_bytes: 4 << 30,
            max_saved_bytes: 1 << 30,
            max_const_bytes: 32 << 20,
        }
    }
}

impl Limits {
    /// The element-wise minimum of two sets of limits: what a request must
    /// respect to pass on both nodes.
    ///
    /// ```
    /// use nnmesh_protocol::limits::Limits;
    /// let small = Limits { max_nodes: 10, ..Limits::default() };
    /// let big = Limits { max_saved_bytes: 1, ..Limits::default() };
    /// let both = small.tightest(&big);
    /// assert_eq!((both.max_nodes, both.max_saved_bytes), (10, 1));
    /// ```
    pub fn tightest(&self, other: &Limits) -> Limits {
        Limits {
            max_graph_bytes: self.max_graph_bytes.min(other.max_graph_bytes),
            max_nodes: self.max_nodes.min(other.max_nodes),
            max_traces: self.max_traces.min(other.max_traces),
            max_invokes: self.max_invokes.min(other.max_invokes),
            max_new_tokens: self.max_new_tokens.min(other.max_new_tokens),
            max_batch_tokens: self.max_batch_tokens.min(other.max_batch_tokens),
            max_activation_bytes: self.max_activation_bytes.min(other.max_activation_bytes),
            max_saved_bytes: self.max_saved_bytes.min(other.max_saved_bytes),
            max_const_bytes: self.max_const_bytes.min(other.max_const_bytes),
        }
    }
}
