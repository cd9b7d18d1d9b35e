//! The closed list of tensor ops a graph may use, with their attributes
//! and arity.
//!
//! The list is versioned with [`FORMAT_VERSION`](crate::FORMAT_VERSION):
//! adding, removing or changing an op bumps it. Semantics follow PyTorch
//! (which the node's interpreter calls) unless noted.
//!
//! Shape and dtype inference, [`infer`], lives in `op/infer.rs`; the shape
//! rules ops share with writes (broadcasting, matmul, einsum, indexing) in
//! `op/shape.rs`.

mod infer;
pub(crate) mod shape;

pub use infer::{OpError, infer, promote};

use serde::{Deserialize, Serialize};

use crate::ir::{DType, IndexItem};

/// Shape and element type of a tensor, known before anything runs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub struct TensorMeta {
    /// Dimensions; `[]` is a scalar.
    pub shape: Vec<u64>,
    /// Element type.
    pub dtype: DType,
}

impl TensorMeta {
    /// A meta of the given shape and dtype.
    pub fn new(shape: impl Into<Vec<u64>>, dtype: DType) -> Self {
        TensorMeta {
            shape: shape.into(),
            dtype,
        }
    }

    /// Number of elements, saturating at `u64::MAX`.
    pub fn numel(&self) -> u64 {
        shape::numel(&self.shape).unwrap_or(u64::MAX)
    }

    /// Size in bytes, saturating at `u64::MAX`.
    pub fn bytes(&self) -> u64 {
        self.numel().saturating_mul(self.dtype.size())
    }
}

impl std::fmt::Display for TensorMeta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.dtype, shape::fmt_shape(&self.shape))
    }
}

/// A tensor op with its attributes; dims are torch-style (negative from the end).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Op {
    /// `a + b` with broadcasting.
    Add,
    /// `a - b` with broadcasting.
    Sub,
    /// `a * b` with broadcasting.
    Mul,
    /// `a / b` with broadcasting (true division).
    Div,
    /// `a ** b` with broadcasting.
    Pow,
    /// Elementwise maximum of `a` and `b`.
    Maximum,
    /// Elementwise minimum of `a` and `b`.
    Minimum,
    /// `a == b` (bool).
    Eq,
    /// `a != b` (bool).
    Ne,
    /// `a < b` (bool).
    Lt,
    /// `a <= b` (bool).
    Le,
    /// `a > b` (bool).
    Gt,
    /// `a >= b` (bool).
    Ge,
    /// `torch.where(cond, a, b)`.
    Where,
    /// `-x`.
    Neg,
    /// `exp(x)`.
    Exp,
    /// Natural log.
    Log,
    /// Square root.
    Sqrt,
    /// Absolute value.
    Abs,
    /// Hyperbolic tangent.
    Tanh,
    /// Logistic sigmoid.
    Sigmoid,
    /// `max(x, 0)`.
    Relu,
    /// GELU (exact, erf form).
    Gelu,
    /// `torch.matmul`, batch broadcasting included.
    Matmul,
    /// `torch.einsum(equation, *args)`; supports `...` and implicit output.
    Einsum {
        /// The equation, e.g. `"bhqd,bhkd->bhqk"`.
        equation: String,
    },
    /// numpy-style basic indexing `x[items]`.
    Index {
        /// The index items.
        items: Vec<IndexItem>,
    },
    /// `torch.gather(src, dim, index)`.
    Gather {
        /// Dimension gathered along.
        dim: i64,
    },
    /// `src.scatter(dim, index, values)` (a copy; `values` may be 0-d).
    Scatter {
        /// Dimension scattered along.
        dim: i64,
    },
    /// `torch.index_select(src, dim, indices)` with 1-d i64 indices.
    IndexSelect {
        /// Dimension selected along.
        dim: i64,
    },
    /// `x.reshape(shape)`; at most one `-1`.
    Reshape {
        /// The new shape.
        shape: Vec<i64>,
    },
    /// `x.transpose(dim0, dim1)`.
    Transpose {
        /// First dimension.
        dim0: i64,
        /// Second dimension.
        dim1: i64,
    },
    /// `x.permute(dims)`.
    Permute {
        /// A permutation of the dimensions.
        dims: Vec<i64>,
    },
    /// `x.squeeze(dim)`; like torch, a no-op when that dimension is not 1.
    Squeeze {
        /// Dimension removed.
        dim: i64,
    },
    /// `x.unsqueeze(dim)`.
    Unsqueeze {
        /// Where the new dimension goes.
        dim: i64,
    },
    /// `torch.cat(args, dim)`.
    Cat {
        /// Dimension concatenated along.
        dim: i64,
    },
    /// `torch.stack(args, dim)`.
    Stack {
        /// Where the new dimension goes.
        dim: i64,
    },
    /// Sum over `dims` (all dims when empty).
    Sum {
        /// Dimensions reduced; empty reduces all.
        #[serde(default)]
        dims: Vec<i64>,
        /// Keep reduced dimensions as size 1.
        #[serde(default)]
        keepdim: bool,
    },
    /// Mean over `dims` (all dims when empty).
    Mean {
        /// Dimensions reduced; empty reduces all.
        #[serde(default)]
        dims: Vec<i64>,
        /// Keep reduced dimensions as size 1.
        #[serde(default)]
        keepdim: bool,
    },
    /// Maximum values along `dim`.
    Max {
        /// Dimension reduced.
        dim: i64,
        /// Keep it as size 1.
        #[serde(default)]
        keepdim: bool,
    },
    /// Minimum values along `dim`.
    Min {
        /// Dimension reduced.
        dim: i64,
        /// Keep it as size 1.
        #[serde(default)]
        keepdim: bool,
    },
    /// Index of the maximum along `dim` (i64).
    Argmax {
        /// Dimension reduced.
        dim: i64,
        /// Keep it as size 1.
        #[serde(default)]
        keepdim: bool,
    },
    /// The `k` largest values along `dim`, sorted descending.
    TopkValues {
        /// How many.
        k: u64,
        /// Dimension searched.
        dim: i64,
    },
    /// Indices (i64) of the `k` largest values along `dim`.
    TopkIndices {
        /// How many.
        k: u64,
        /// Dimension searched.
        dim: i64,
    },
    /// p-norm over `dims` (all dims when empty); `p` may be infinite.
    Norm {
        /// The order of the norm.
        #[serde(with = "crate::ir::float")]
        p: f64,
        /// Dimensions reduced; empty reduces all.
        #[serde(default)]
        dims: Vec<i64>,
        /// Keep reduced dimensions as size 1.
        #[serde(default)]
        keepdim: bool,
    },
    /// Softmax along `dim`.
    Softmax {
        /// Dimension normalized.
        dim: i64,
    },
    /// Log-softmax along `dim`.
    LogSoftmax {
        /// Dimension normalized.
        dim: i64,
    },
    /// Convert to `dtype`.
    Cast {
        /// Target element type.
        dtype: DType,
    },
    /// Zeros of the same shape and dtype.
    ZerosLike,
    /// Ones of the same shape and dtype.
    OnesLike,
    /// `value` everywhere, same shape and dtype.
    FullLike {
        /// The fill value.
        #[serde(with = "crate::ir::float")]
        value: f64,
    },
    /// Multiply by a scalar.
    Scale {
        /// The factor.
        #[serde(with = "crate::ir::float")]
        factor: f64,
    },
}

/// How many arguments an op takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arity {
    /// Exactly this many.
    Exact(usize),
    /// This many or more.
    AtLeast(usize),
}

impl Arity {
    /// Whether `n` arguments are acceptable.
    pub fn accepts(self, n: usize) -> bool {
        match self {
            Arity::Exact(k) => n == k,
            Arity::AtLeast(k) => n >= k,
        }
    }
}

impl std::fmt::Display for Arity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Arity::Exact(n) => write!(f, "exactly {n}"),
            Arity::AtLeast(n) => write!(f, "at least {n}"),
        }
    }
}

impl Op {
    /// The op's name as written in JSON (`"log_softmax"`).
    pub fn name(&self) -> &'static str {
        match self {
            Op::Add => "add",
            Op::Sub => "sub",
            Op::Mul => "mul",
            Op::Div => "div",
            Op::Pow => "pow",
            Op::Maximum => "maximum",
            Op::Minimum => "minimum",
            Op::Eq => "eq",
            Op::Ne => "ne",
            Op::Lt => "lt",
            Op::Le => "le",
            Op::Gt => "gt",
            Op::Ge => "ge",
            Op::Where => "where",
            Op::Neg => "neg",
            Op::Exp => "exp",
            Op::Log => "log",
            Op::Sqrt => "sqrt",
            Op::Abs => "abs",
            Op::Tanh => "tanh",
            Op::Sigmoid => "sigmoid",
            Op::Relu => "relu",
            Op::Gelu => "gelu",
            Op::Matmul => "matmul",
            Op::Einsum { .. } => "einsum",
            Op::Index { .. } => "index",
            Op::Gather { .. } => "gather",
            Op::Scatter { .. } => "scatter",
            Op::IndexSelect { .. } => "index_select",
            Op::Reshape { .. } => "reshape",
            Op::Transpose { .. } => "transpose",
            Op::Permute { .. } => "permute",
            Op::Squeeze { .. } => "squeeze",
            Op::Unsqueeze { .. } => "unsqueeze",
            Op::Cat { .. } => "cat",
            Op::Stack { .. } => "stack",
            Op::Sum { .. } => "sum",
            Op::Mean { .. } => "mean",
            Op::Max { .. } => "max",
            Op::Min { .. } => "min",
            Op::Argmax { .. } => "argmax",
            Op::TopkValues { .. } => "topk_values",
            Op::TopkIndices { .. } => "topk_indices",
            Op::Norm { .. } => "norm",
            Op::Softmax { .. } => "softmax",
            Op::LogSoftmax { .. } => "log_softmax",
            Op::Cast { .. } => "cast",
            Op::ZerosLike => "zeros_like",
            Op::OnesLike => "ones_like",
            Op::FullLike { .. } => "full_like",
            Op::Scale { .. } => "scale",
        }
    }

    /// How many arguments the op takes.
    pub fn arity(&self) -> Arity {
        match self {
            Op::Add
            | Op::Sub
            | Op::Mul
            | Op::Div
            | Op::Pow
            | Op::Maximum
            | Op::Minimum
            | Op::Eq
            | Op::Ne
            | Op::Lt
            | Op::Le
            | Op::Gt
            | Op::Ge
            | Op::Matmul
            | Op::Gather { .. }
            | Op::IndexSelect { .. } => Arity::Exact(2),
            Op::Where | Op::Scatter { .. } => Arity::Exact(3),
            Op::Einsum { .. } | Op::Cat { .. } | Op::Stack { .. } => Arity::AtLeast(1),
            _ => Arity::Exact(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_serde() {
        for op in [
            Op::LogSoftmax { dim: 0 },
            Op::TopkIndices { k: 1, dim: 0 },
            Op::ZerosLike,
            Op::Where,
        ] {
            let json = serde_json::to_string(&op).expect("serializes");
            assert!(json.contains(op.name()), "{json} vs {}", op.name());
        }
    }
}
