//! The nnmesh Intervention Graph: a declarative, serializable experiment on
//! a transformer's forward pass.
//!
//! A [`Graph`] reads activations at hook points ("the output of layer 5"),
//! computes on them with a closed list of tensor [`Op`]s, calls model modules
//! on them ([`Node::Apply`], e.g. the logit lens `lm_head(model.norm(h))`),
//! writes values back into the forward pass and saves results for the
//! client. No code is ever shipped: a graph is data, checked before it runs.
//!
//! # Life of a graph
//! 1. **Build** it with [`Builder`] (or write JSON by hand, any language).
//! 2. **Encode** it: [`Graph::to_json`] for people, [`Graph::to_postcard`]
//!    for the wire; [`Graph::content_hash`] identifies it.
//! 3. **Validate** it on the node with [`validate`](fn@validate), against the model's
//!    [`Manifest`], the prompts' token counts ([`Inputs`]) and the request
//!    [`Limits`]. The resulting [`Plan`] gives each node its [`Anchor`] (the
//!    hook moment at which it runs), its inferred shape and dtype and, for
//!    nodes that run at every generation step, its [`StepSet`].
//! 4. **Partition** it along a pipeline route with [`partition`](fn@partition): one
//!    [`Fragment`] per stage, with the values each stage must carry forward.
//!
//! # Example: the logit lens
//! ```
//! use nnmesh_graph::{
//!     Builder, DType, Graph, IndexItem::*, Inputs, Limits, Manifest, Point,
//!     partition, validate,
//! };
//! use nnmesh_protocol::Span;
//!
//! let g = Builder::new();
//! let t = g.trace(["The Eiffel Tower is in the city of"]);
//! let h = g.read(t.at("model.layers.1", Point::Output));
//! let layer1 = h.id(); // handles borrow the builder; ids outlive it
//! let lens = g.apply("lm_head", [g.apply("model.norm", [h])]);
//! g.save("lens1", lens.index([Full, At(-1)]).argmax(-1, false));
//! // Steer: add a vector to layer 2's output at the last position.
//! let v = g.vector(DType::F32, vec![0.5; 8]);
//! g.add_at(t.at("model.layers.2", Point::Output), [Full, At(-1), Full], v);
//! let graph: Graph = g.finish();
//!
//! // JSON and postcard round-trip exactly.
//! assert_eq!(Graph::from_json(&graph.to_json())?, graph);
//! assert_eq!(Graph::from_postcard(&graph.to_postcard())?, graph);
//!
//! let manifest = Manifest {
//!     model: "tiny".into(), num_layers: 4, hidden: 8, heads: 2, kv_heads: 1,
//!     head_dim: 4, intermediate: 16, vocab: 32, max_positions: 64, dtype: DType::Bf16,
//! };
//! // The node tokenized the prompt into 9 tokens.
//! let inputs = Inputs { traces: vec![vec![9]] };
//! let plan = validate(&graph, &manifest, &inputs, &Limits::default())?;
//! assert_eq!(plan.nodes[4].meta.shape, [1]); // argmax over the vocabulary
//!
//! let route = [Span::new(0, 2), Span::new(2, 4)];
//! let fragments = partition(&graph, &plan, &manifest, &route)?;
//! // Layer 1's output travels to the last stage, which hosts lm_head.
//! assert_eq!(fragments[1].carry_in, [layer1]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Crate layout
//! [`ir`] holds the data model, [`op`] the op list and its shape rules,
//! [`manifest`] the model's modules, hook order and shapes, [`builder`] the
//! builder, [`encode`] the encodings, [`validate`](mod@validate) validation
//! and shape inference, [`partition`](mod@partition) the pipeline split,
//! [`recipes`] the canonical experiments.

pub mod builder;
pub mod encode;
pub mod ir;
pub mod manifest;
pub mod op;
pub mod partition;
pub mod recipes;
pub mod validate;

pub use builder::{Builder, InvokeRef, TraceRef, Value, WriteRef};
pub use encode::{DecodeError, GraphHash};
pub use ir::{
    ConstTensor, DType, FORMAT_VERSION, Graph, Hook, IndexItem, Invoke, Node, NodeId, Point,
    Prompt, Steps, Trace, WriteMode,
};
pub use manifest::{ApplyError, Manifest, Module, POINTS_PER_LAYER, Site};
pub use op::{Arity, Op, OpError, TensorMeta, infer};
pub use partition::{Fragment, PartitionError, partition};
pub use validate::{
    Anchor, Inputs, Limits, NodePlan, Plan, StepSet, TraceCost, ValidateError, validate,
};

#[cfg(test)]
pub(crate) mod strategies;
