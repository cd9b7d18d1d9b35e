//! A builder that reads like an experiment: traces, hooks, reads, ops on
//! value handles, writes and saves.
//!
//! [`Builder`] methods take `&self` (the node list sits in a `RefCell`), so
//! value handles are `Copy` and calls nest: `g.apply("lm_head",
//! [g.apply("model.norm", [h])])`.

use std::{
    cell::RefCell,
    ops::{Add, Div, Mul, Neg, Range, Sub},
};

use crate::{
    ir::{
        ConstTensor, DType, FORMAT_VERSION, Graph, Hook, IndexItem, Invoke, Node, NodeId, Point,
        Prompt, Steps, Trace, WriteMode,
    },
    op::Op,
};

/// Builds a [`Graph`] node by node; see the crate docs for an example.
#[derive(Debug, Default)]
pub struct Builder {
    graph: RefCell<Graph>,
}

/// A trace being built; hooks on it cover the whole batch unless narrowed with [`TraceRef::invoke`].
#[derive(Debug, Clone, Copy)]
pub struct TraceRef<'a> {
    builder: &'a Builder,
    index: u32,
}

/// One invoke (prompt, batch row) of a trace.
#[derive(Debug, Clone, Copy)]
pub struct InvokeRef {
    trace: u32,
    invoke: u32,
}

/// A handle to a value-producing node; cheap to copy, ops chain on it.
#[derive(Debug, Clone, Copy)]
pub struct Value<'a> {
    builder: &'a Builder,
    id: NodeId,
}

/// A handle to a just-added [`Node::Write`], to set its index and mode.
#[derive(Debug, Clone, Copy)]
pub struct WriteRef<'a> {
    builder: &'a Builder,
    id: NodeId,
}

impl Builder {
    /// An empty graph at the current [`FORMAT_VERSION`].
    pub fn new() -> Self {
        Builder::default()
    }

    fn push(&self, node: Node) -> NodeId {
        let mut g = self.graph.borrow_mut();
        let id = NodeId(u32::try_from(g.nodes.len()).expect("fewer than 2^32 nodes"));
        g.nodes.push(node);
        id
    }

    fn value(&self, node: Node) -> Value<'_> {
        Value {
            builder: self,
            id: self.push(node),
        }
    }

    fn add_trace(&self, invokes: Vec<Invoke>) -> TraceRef<'_> {
        let mut g = self.graph.borrow_mut();
        g.traces.push(Trace {
            invokes,
            max_new_tokens: 0,
        });
        TraceRef {
            builder: self,
            index: u32::try_from(g.traces.len() - 1).expect("fewer than 2^32 traces"),
        }
    }

    /// Adds a trace whose invokes are these text prompts (invoke `i` is the `i`-th prompt).
    pub fn trace<I, S>(&self, prompts: I) -> TraceRef<'_>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.add_trace(
            prompts
                .into_iter()
                .map(|p| Invoke {
                    prompt: Prompt::Text(p.into()),
                })
                .collect(),
        )
    }

    /// Adds a trace whose invokes are these token-id prompts.
    pub fn trace_tokens(&self, prompts: Vec<Vec<u32>>) -> TraceRef<'_> {
        self.add_trace(
            prompts
                .into_iter()
                .map(|p| Invoke {
                    prompt: Prompt::Tokens(p),
                })
                .collect(),
        )
    }

    /// Reads the value at a hook.
    pub fn read(&self, hook: Hook) -> Value<'_> {
        self.value(Node::Read { hook })
    }

    /// Writes `value` over the hook's value (see [`WriteRef`] for index and mode).
    pub fn write(&self, hook: Hook, value: Value<'_>) -> WriteRef<'_> {
        let id = self.push(Node::Write {
            hook,
            value: value.id,
            index: None,
            mode: WriteMode::Set,
        });
        WriteRef { builder: self, id }
    }

    /// `hook[index] = value`.
    pub fn write_at(
        &self,
        hook: Hook,
        index: impl IntoIterator<Item = IndexItem>,
        value: Value<'_>,
    ) -> WriteRef<'_> {
        self.write(hook, value).index(index)
    }

    /// `hook[index] += value`.
    pub fn add_at(
        &self,
        hook: Hook,
        index: impl IntoIterator<Item = IndexItem>,
        value: Value<'_>,
    ) -> WriteRef<'_> {
        self.write(hook, value).index(index).mode_add()
    }

    /// Applies an op to these arguments.
    pub fn op<'a>(&'a self, op: Op, args: impl IntoIterator<Item = Value<'a>>) -> Value<'a> {
        let args = args.into_iter().map(|v| v.id).collect();
        self.value(Node::Op { op, args })
    }

    /// Calls a model module (by Hugging Face path) on a value.
    pub fn apply<'a>(
        &'a self,
        module: &str,
        args: impl IntoIterator<Item = Value<'a>>,
    ) -> Value<'a> {
        let args = args.into_iter().map(|v| v.id).collect();
        self.value(Node::Apply {
            module: module.to_owned(),
            args,
        })
    }

    /// A constant tensor.
    pub fn constant(&self, value: ConstTensor) -> Value<'_> {
        self.value(Node::Const { value })
    }

    /// A 0-d f32 constant; it does not widen the dtype of tensors it meets.
    pub fn scalar(&self, value: f64) -> Value<'_> {
        self.constant(ConstTensor::scalar(value))
    }

    /// A 1-d constant vector of `dtype`.
    pub fn vector(&self, dtype: DType, values: Vec<f64>) -> Value<'_> {
        self.constant(ConstTensor::vector(dtype, values))
    }

    /// `torch.einsum(equation, *args)`.
    pub fn einsum<'a>(
        &'a self,
        equation: &str,
        args: impl IntoIterator<Item = Value<'a>>,
    ) -> Value<'a> {
        self.op(
            Op::Einsum {
                equation: equation.to_owned(),
            },
            args,
        )
    }

    /// `torch.cat(args, dim)`.
    pub fn cat<'a>(&'a self, args: impl IntoIterator<Item = Value<'a>>, dim: i64) -> Value<'a> {
        self.op(Op::Cat { dim }, args)
    }

    /// `torch.stack(args, dim)`.
    pub fn stack<'a>(&'a self, args: impl IntoIterator<Item = Value<'a>>, dim: i64) -> Value<'a> {
        self.op(Op::Stack { dim }, args)
    }

    /// Sends `value` back to the client under `name`.
    pub fn save(&self, name: impl Into<String>, value: Value<'_>) -> NodeId {
        self.push(Node::Save {
            name: name.into(),
            value: value.id,
        })
    }

    /// Declares that the caller does not need `trace`'s logits, so its forward may stop early.
    pub fn stop(&self, trace: TraceRef<'_>) -> NodeId {
        self.push(Node::Stop { trace: trace.index })
    }

    /// A copy of the graph built so far.
    pub fn graph(&self) -> Graph {
        self.graph.borrow().clone()
    }

    /// The finished graph.
    pub fn finish(self) -> Graph {
        let mut g = self.graph.into_inner();
        g.version = FORMAT_VERSION;
        g
    }
}

impl<'a> TraceRef<'a> {
    /// The trace's index in [`Graph::traces`].
    pub fn index(self) -> u32 {
        self.index
    }

    /// Makes the trace a greedy generation of `n` new tokens.
    pub fn generate(self, n: u32) -> Self {
        self.builder.graph.borrow_mut().traces[self.index as usize].max_new_tokens = n;
        self
    }

    /// One invoke (prompt) of the trace.
    pub fn invoke(self, invoke: u32) -> InvokeRef {
        InvokeRef {
            trace: self.index,
            invoke,
        }
    }

    /// A hook on the whole (left-padded) batch at step 0.
    pub fn at(self, module: &str, point: Point) -> Hook {
        Hook::new(self.index, module, point)
    }
}

impl InvokeRef {
    /// A hook on this invoke's own rows and tokens at step 0.
    pub fn at(self, module: &str, point: Point) -> Hook {
        Hook {
            invoke: Some(self.invoke),
            ..Hook::new(self.trace, module, point)
        }
    }
}

impl Hook {
    /// The hook at generation step `step` only.
    pub fn step(mut self, step: u32) -> Self {
        self.steps = Steps::At(step);
        self
    }

    /// The hook at each step in `range` (end exclusive); its nodes run once per step.
    pub fn steps(mut self, range: Range<u32>) -> Self {
        self.steps = Steps::Range {
            start: range.start,
            end: range.end,
        };
        self
    }

    /// The hook at every step of the trace.
    pub fn all_steps(mut self) -> Self {
        self.steps = Steps::All;
        self
    }
}

impl WriteRef<'_> {
    /// The write node's id.
    pub fn id(self) -> NodeId {
        self.id
    }

    fn edit(self, f: impl FnOnce(&mut Option<Vec<IndexItem>>, &mut WriteMode)) -> Self {
        let mut g = self.builder.graph.borrow_mut();
        if let Some(Node::Write { index, mode, .. }) = g.nodes.get_mut(self.id.index()) {
            f(index, mode);
        }
        self
    }

    /// Writes only `hook[items]`.
    pub fn index(self, items: impl IntoIterator<Item = IndexItem>) -> Self {
        let items: Vec<IndexItem> = items.into_iter().collect();
        self.edit(|index, _| *index = Some(items))
    }

    /// Adds the value instead of replacing (`+=`).
    pub fn mode_add(self) -> Self {
        self.mode(WriteMode::Add)
    }

    /// Sets the write mode.
    pub fn mode(self, m: WriteMode) -> Self {
        self.edit(|_, mode| *mode = m)
    }
}

macro_rules! unary {
    ($($(#[$doc:meta])* $name:ident => $op:expr;)*) => {$(
        $(#[$doc])*
        pub fn $name(self) -> Value<'a> {
            self.op($op, [])
        }
    )*};
}

macro_rules! binary {
    ($($(#[$doc:meta])* $name:ident => $op:expr;)*) => {$(
        $(#[$doc])*
        pub fn $name(self, other: Value<'a>) -> Value<'a> {
            self.op($op, [other])
        }
    )*};
}

impl<'a> Value<'a> {
    /// The node's id.
    pub fn id(self) -> NodeId {
        self.id
    }

    /// Applies `op` with `self` as first argument followed by `rest`.
    pub fn op(self, op: Op, rest: impl IntoIterator<Item = Value<'a>>) -> Value<'a> {
        self.builder.op(op, std::iter::once(self).chain(rest))
    }

    binary! {
        /// `self ** other`.
        pow => Op::Pow;
        /// Elementwise maximum.
        maximum => Op::Maximum;
        /// Elementwise minimum.
        minimum => Op::Minimum;
        /// `self == other` (bool).
        eq => Op::Eq;
        /// `self != other` (bool).
        ne => Op::Ne;
        /// `self < other` (bool).
        lt => Op::Lt;
        /// `self <= other` (bool).
        le => Op::Le;
        /// `self > other` (bool).
        gt => Op::Gt;
        /// `self >= other` (bool).
        ge => Op::Ge;
        /// `torch.matmul(self, other)`.
        matmul => Op::Matmul;
    }

    unary! {
        /// `exp(self)`.
        exp => Op::Exp;
        /// `log(self)`.
        log => Op::Log;
        /// `sqrt(self)`.
        sqrt => Op::Sqrt;
        /// `abs(self)`.
        abs => Op::Abs;
        /// `tanh(self)`.
        tanh => Op::Tanh;
        /// `sigmoid(self)`.
        sigmoid => Op::Sigmoid;
        /// `relu(self)`.
        relu => Op::Relu;
        /// `gelu(self)`.
        gelu => Op::Gelu;
        /// Zeros of the same shape and dtype.
        zeros_like => Op::ZerosLike;
        /// Ones of the same shape and dtype.
        ones_like => Op::OnesLike;
    }

    /// `torch.where(self, if_true, if_false)` with `self` the bool condition.
    pub fn select(self, if_true: Value<'a>, if_false: Value<'a>) -> Value<'a> {
        self.op(Op::Where, [if_true, if_false])
    }

    /// `self[items]` with numpy basic indexing.
    pub fn index(self, items: impl IntoIterator<Item = IndexItem>) -> Value<'a> {
        let items = items.into_iter().collect();
        self.op(Op::Index { items }, [])
    }

    /// `torch.gather(self, dim, index)`.
    pub fn gather(self, dim: i64, index: Value<'a>) -> Value<'a> {
        self.op(Op::Gather { dim }, [index])
    }

    /// A copy of `self` with `values` scattered at `index` along `dim`.
    pub fn scatter(self, dim: i64, index: Value<'a>, values: Value<'a>) -> Value<'a> {
        self.op(Op::Scatter { dim }, [index, values])
    }

    /// `torch.index_select(self, dim, indices)`.
    pub fn index_select(self, dim: i64, indices: Value<'a>) -> Value<'a> {
        self.op(Op::IndexSelect { dim }, [indices])
    }

    /// `self.reshape(shape)`.
    pub fn reshape(self, shape: impl Into<Vec<i64>>) -> Value<'a> {
        self.op(
            Op::Reshape {
                shape: shape.into(),
            },
            [],
        )
    }

    /// `self.transpose(dim0, dim1)`.
    pub fn transpose(self, dim0: i64, dim1: i64) -> Value<'a> {
        self.op(Op::Transpose { dim0, dim1 }, [])
    }

    /// `self.permute(dims)`.
    pub fn permute(self, dims: impl Into<Vec<i64>>) -> Value<'a> {
        self.op(Op::Permute { dims: dims.into() }, [])
    }

    /// `self.squeeze(dim)`.
    pub fn squeeze(self, dim: i64) -> Value<'a> {
        self.op(Op::Squeeze { dim }, [])
    }

    /// `self.unsqueeze(dim)`.
    pub fn unsqueeze(self, dim: i64) -> Value<'a> {
        self.op(Op::Unsqueeze { dim }, [])
    }

    /// Sum over `dims` (all when empty).
    pub fn sum(self, dims: impl Into<Vec<i64>>, keepdim: bool) -> Value<'a> {
        let dims = dims.into();
        self.op(Op::Sum { dims, keepdim }, [])
    }

    /// Mean over `dims` (all when empty).
    pub fn mean(self, dims: impl Into<Vec<i64>>, keepdim: bool) -> Value<'a> {
        let dims = dims.into();
        self.op(Op::Mean { dims, keepdim }, [])
    }

    /// Maximum values along `dim`.
    pub fn max(self, dim: i64, keepdim: bool) -> Value<'a> {
        self.op(Op::Max { dim, keepdim }, [])
    }

    /// Minimum values along `dim`.
    pub fn min(self, dim: i64, keepdim: bool) -> Value<'a> {
        self.op(Op::Min { dim, keepdim }, [])
    }

    /// Index of the maximum along `dim`.
    pub fn argmax(self, dim: i64, keepdim: bool) -> Value<'a> {
        self.op(Op::Argmax { dim, keepdim }, [])
    }

    /// The `k` largest values along `dim`.
    pub fn topk_values(self, k: u64, dim: i64) -> Value<'a> {
        self.op(Op::TopkValues { k, dim }, [])
    }

    /// Indices of the `k` largest values along `dim`.
    pub fn topk_indices(self, k: u64, dim: i64) -> Value<'a> {
        self.op(Op::TopkIndices { k, dim }, [])
    }

    /// The p-norm over `dims` (all when empty).
    pub fn norm(self, p: f64, dims: impl Into<Vec<i64>>, keepdim: bool) -> Value<'a> {
        let dims = dims.into();
        self.op(Op::Norm { p, dims, keepdim }, [])
    }

    /// Softmax along `dim`.
    pub fn softmax(self, dim: i64) -> Value<'a> {
        self.op(Op::Softmax { dim }, [])
    }

    /// Log-softmax along `dim`.
    pub fn log_softmax(self, dim: i64) -> Value<'a> {
        self.op(Op::LogSoftmax { dim }, [])
    }

    /// Converts to `dtype`.
    pub fn cast(self, dtype: DType) -> Value<'a> {
        self.op(Op::Cast { dtype }, [])
    }

    /// `value` everywhere, same shape and dtype.
    pub fn full_like(self, value: f64) -> Value<'a> {
        self.op(Op::FullLike { value }, [])
    }

    /// Multiplies by a scalar.
    pub fn scale(self, factor: f64) -> Value<'a> {
        self.op(Op::Scale { factor }, [])
    }
}

macro_rules! std_binary {
    ($($trait:ident $method:ident => $op:expr;)*) => {$(
        impl<'a> $trait for Value<'a> {
            type Output = Value<'a>;
            fn $method(self, other: Value<'a>) -> Value<'a> {
                self.op($op, [other])
            }
        }
    )*};
}

std_binary! {
    Add add => Op::Add;
    Sub sub => Op::Sub;
    Mul mul => Op::Mul;
    Div div => Op::Div;
}

impl<'a> Mul<f64> for Value<'a> {
    type Output = Value<'a>;
    fn mul(self, factor: f64) -> Value<'a> {
        self.scale(factor)
    }
}

impl<'a> Neg for Value<'a> {
    type Output = Value<'a>;
    fn neg(self) -> Value<'a> {
        self.op(Op::Neg, [])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::IndexItem::*;

    #[test]
    fn builds_the_logit_lens() {
        let g = Builder::new();
        let t = g.trace(["The Eiffel Tower is in the city of"]);
        let h = g.read(t.at("model.layers.5", Point::Output));
        let lens = g.apply("lm_head", [g.apply("model.norm", [h])]);
        g.save("lens5", lens.index([Full, At(-1)]).argmax(-1, false));
        let graph = g.finish();
        assert_eq!(graph.nodes.len(), 6);
        assert_eq!(
            graph.nodes[1],
            Node::Apply {
                module: "model.norm".into(),
                args: vec![NodeId(0)]
            }
        );
        assert!(
            matches!(&graph.nodes[5], Node::Save { name, value: NodeId(4) } if name == "lens5")
        );
    }

    #[test]
    fn writes_hooks_and_steps() {
        let g = Builder::new();
        let t = g.trace(["a", "b"]).generate(4);
        let v = g.vector(DType::F32, vec![0.0; 8]);
        let w = g
            .write(
                t.invoke(1).at("model.layers.3", Point::Output).all_steps(),
                v,
            )
            .index([Full, At(-1), Full])
            .mode_add()
            .id();
        let sum = ((v + v) * 2.0 - -v / v).id();
        g.stop(t);
        let graph = g.finish();
        assert_eq!(graph.traces[0].max_new_tokens, 4);
        let Node::Write {
            hook, index, mode, ..
        } = &graph.nodes[w.index()]
        else {
            panic!("not a write")
        };
        assert_eq!(hook.invoke, Some(1));
        assert_eq!(hook.steps, Steps::All);
        assert_eq!(index.as_deref(), Some(&[Full, At(-1), Full][..]));
        assert_eq!(*mode, WriteMode::Add);
        assert!(matches!(
            &graph.nodes[sum.index()],
            Node::Op { op: Op::Sub, .. }
        ));
        assert_eq!(graph.nodes.last(), Some(&Node::Stop { trace: 0 }));
    }

    #[test]
    fn step_ranges() {
        let h = Hook::new(0, "lm_head", Point::Output);
        assert_eq!(
            h.clone().steps(1..4).steps,
            Steps::Range { start: 1, end: 4 }
        );
        assert_eq!(h.step(3).steps, Steps::At(3));
    }
}
