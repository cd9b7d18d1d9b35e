//! The Intervention Graph's data model: traces, hooks and nodes.
//!
//! Everything here is plain serde data. JSON is the human form (see
//! [`Graph::to_json`]); postcard is the canonical wire form that the content
//! hash is taken over (see [`Graph::to_postcard`]).

pub(crate) mod bounded;

use serde::{Deserialize, Serialize};

use crate::op::Op;

/// Version of the graph format; bumped whenever the IR or the op list changes.
pub const FORMAT_VERSION: u32 = 1;

/// A whole experiment: several traces run in order and the nodes that read,
/// compute on and write their activations; a node's index is its [`NodeId`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub struct Graph {
    /// Format version, always [`FORMAT_VERSION`] for graphs this crate writes.
    pub version: u32,
    /// The forward passes (or generations) of the session, run in this order.
    #[serde(deserialize_with = "crate::ir::bounded::traces")]
    pub traces: Vec<Trace>,
    /// The nodes; a node may only name earlier nodes as inputs.
    #[serde(deserialize_with = "crate::ir::bounded::nodes")]
    pub nodes: Vec<Node>,
}

impl Default for Graph {
    fn default() -> Self {
        Graph {
            version: FORMAT_VERSION,
            traces: Vec::new(),
            nodes: Vec::new(),
        }
    }
}

/// One batched forward pass (or greedy generation) over several prompts.
///
/// A trace runs `max(1, max_new_tokens)` steps: step 0 is the forward over the
/// prompts, and step `s >= 1` feeds the token chosen at step `s - 1`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub struct Trace {
    /// The prompts of the batch, one per batch row.
    #[serde(deserialize_with = "crate::ir::bounded::invokes")]
    pub invokes: Vec<Invoke>,
    /// Number of tokens to generate greedily; 0 means a single forward pass.
    #[serde(default)]
    pub max_new_tokens: u32,
}

impl Trace {
    /// Number of forward steps this trace runs: `max(1, max_new_tokens)`.
    pub fn steps(&self) -> u32 {
        self.max_new_tokens.max(1)
    }
}

/// One prompt of a trace, i.e. one row of the batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub struct Invoke {
    /// The prompt, as text for the node to tokenize or as token ids.
    pub prompt: Prompt,
}

/// A prompt as text (tokenized by the node) or as token ids.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prompt {
    /// Text that the node tokenizes with the model's tokenizer.
    Text(String),
    /// Token ids, used as given.
    Tokens(Vec<u32>),
}

/// Index of a node in [`Graph::nodes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(pub u32);

impl NodeId {
    /// The id as a `usize` index into [`Graph::nodes`].
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Where on a module a hook sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Point {
    /// The module's (first) input.
    Input,
    /// The module's output.
    Output,
    /// Queries after RoPE, `[b, heads, t, head_dim]` (only on `self_attn`).
    Q,
    /// This step's keys after RoPE, `[b, kv_heads, t, head_dim]` (only on `self_attn`).
    K,
    /// This step's values, `[b, kv_heads, t, head_dim]` (only on `self_attn`).
    V,
    /// Attention probabilities after softmax, `[b, heads, t, t_kv]` (only on `self_attn`).
    Pattern,
    /// Per-head attention output before `o_proj`, `[b, t, heads, head_dim]` (only on `self_attn`).
    Z,
}

impl Point {
    /// The point's name as written in JSON and in hook paths (`"output"`).
    pub fn name(self) -> &'static str {
        match self {
            Point::Input => "input",
            Point::Output => "output",
            Point::Q => "q",
            Point::K => "k",
            Point::V => "v",
            Point::Pattern => "pattern",
            Point::Z => "z",
        }
    }
}

impl std::fmt::Display for Point {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Which generation steps of a trace a hook refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Steps {
    /// A single step (0 = the prompt forward).
    At(u32),
    /// Steps `start..end` (end exclusive); the hook's nodes run once per step.
    Range {
        /// First step.
        start: u32,
        /// One past the last step.
        end: u32,
    },
    /// Every step of the trace; the hook's nodes run once per step.
    All,
}

impl Default for Steps {
    fn default() -> Self {
        Steps::At(0)
    }
}

/// A hook point: a module, a point on it, which rows of the batch and which steps.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub struct Hook {
    /// Index of the trace in [`Graph::traces`].
    #[serde(default)]
    pub trace: u32,
    /// Hugging Face module path, e.g. `model.layers.5`.
    pub module: String,
    /// The point on the module.
    pub point: Point,
    /// One prompt's own rows and tokens (no padding), or `None` for the whole
    /// left-padded batch.
    #[serde(default)]
    pub invoke: Option<u32>,
    /// Which steps of the trace.
    #[serde(default)]
    pub steps: Steps,
}

impl Hook {
    /// A hook on the whole batch of `trace` at step 0.
    pub fn new(trace: u32, module: impl Into<String>, point: Point) -> Self {
        Hook {
            trace,
            module: module.into(),
            point,
            invoke: None,
            steps: Steps::At(0),
        }
    }

    /// The hook's path, `module.point`, e.g. `model.layers.5.output`.
    pub fn path(&self) -> String {
        format!("{}.{}", self.module, self.point)
    }
}

/// One node of the graph.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Node {
    /// The value at a hook point.
    Read {
        /// The hook read.
        hook: Hook,
    },
    /// `hook[index] = value` (Set) or `hook[index] += value` (Add).
    Write {
        /// The hook written.
        hook: Hook,
        /// The value written, broadcast to the indexed slice.
        value: NodeId,
        /// numpy-style index into the hook's value; `None` writes all of it.
        #[serde(default)]
        index: Option<Vec<IndexItem>>,
        /// Replace or add.
        #[serde(default)]
        mode: WriteMode,
    },
    /// A tensor op from the closed list in [`Op`].
    Op {
        /// The op and its attributes.
        op: Op,
        /// Its inputs, in the op's argument order.
        args: Vec<NodeId>,
    },
    /// Call a model module on a value, e.g. `lm_head(model.norm(h))`.
    Apply {
        /// Hugging Face module path.
        module: String,
        /// Its input (exactly one).
        args: Vec<NodeId>,
    },
    /// A constant tensor.
    Const {
        /// The tensor.
        value: ConstTensor,
    },
    /// Send a value back to the client under a name.
    Save {
        /// The name, unique within the graph.
        name: String,
        /// The value saved.
        value: NodeId,
    },
    /// The caller does not need this trace's logits: its forward may end
    /// after the last hook the graph uses.
    Stop {
        /// Index of the trace.
        trace: u32,
    },
}

impl Node {
    /// The node's inputs, in argument order.
    pub fn inputs(&self) -> &[NodeId] {
        match self {
            Node::Read { .. } | Node::Const { .. } | Node::Stop { .. } => &[],
            Node::Write { value, .. } | Node::Save { value, .. } => std::slice::from_ref(value),
            Node::Op { args, .. } | Node::Apply { args, .. } => args,
        }
    }

    /// The node kind's name as written in JSON (`"read"`, `"op"`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            Node::Read { .. } => "read",
            Node::Write { .. } => "write",
            Node::Op { .. } => "op",
            Node::Apply { .. } => "apply",
            Node::Const { .. } => "const",
            Node::Save { .. } => "save",
            Node::Stop { .. } => "stop",
        }
    }

    /// Whether the node produces a value other nodes may use (not Write, Save or Stop).
    pub fn has_value(&self) -> bool {
        !matches!(
            self,
            Node::Write { .. } | Node::Save { .. } | Node::Stop { .. }
        )
    }
}

/// How a [`Node::Write`] combines its value with the hook's value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteMode {
    /// `hook[index] = value`.
    #[default]
    Set,
    /// `hook[index] += value`.
    Add,
}

/// One item of a numpy-style basic index; negative positions count from the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum IndexItem {
    /// `:` — the whole dimension.
    Full,
    /// A single position; removes the dimension.
    At(i64),
    /// `start:end:step`; `step` must be positive (torch has no negative steps).
    Slice {
        /// First position (default 0).
        start: Option<i64>,
        /// One past the last position (default the end).
        end: Option<i64>,
        /// Stride, at least 1.
        #[serde(default = "one")]
        step: i64,
    },
    /// `...` — as many `:` as needed.
    Ellipsis,
    /// `None` — inserts a dimension of size 1.
    NewAxis,
}

fn one() -> i64 {
    1
}

impl IndexItem {
    /// The slice `start:end` with step 1.
    pub fn slice(start: Option<i64>, end: Option<i64>) -> Self {
        IndexItem::Slice {
            start,
            end,
            step: 1,
        }
    }
}

/// Element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DType {
    /// 32-bit float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// bfloat16.
    Bf16,
    /// 64-bit signed integer (token ids, indices).
    I64,
    /// Boolean.
    Bool,
}

impl DType {
    /// Size of one element in bytes.
    pub fn size(self) -> u64 {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::Bf16 => 2,
            DType::I64 => 8,
            DType::Bool => 1,
        }
    }

    /// Whether this is a floating-point type.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::Bf16)
    }

    /// The name as written in JSON (`"bf16"`).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
            DType::I64 => "i64",
            DType::Bool => "bool",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A small constant tensor, human-writable in JSON.
///
/// Non-finite values are written in JSON as the strings `"inf"`, `"-inf"` and
/// `"nan"` (JSON numbers cannot express them); postcard stores the raw bits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub struct ConstTensor {
    /// Element type the values are converted to.
    pub dtype: DType,
    /// Shape; `[]` is a scalar.
    pub shape: Vec<u64>,
    /// Values in row-major order; as many as the shape's product.
    #[serde(with = "crate::ir::floats")]
    pub values: Vec<f64>,
}

impl ConstTensor {
    /// A 0-d f32 scalar.
    pub fn scalar(value: f64) -> Self {
        ConstTensor {
            dtype: DType::F32,
            shape: Vec::new(),
            values: vec![value],
        }
    }

    /// A 1-d tensor of `dtype` holding `values`.
    pub fn vector(dtype: DType, values: Vec<f64>) -> Self {
        ConstTensor {
            dtype,
            shape: vec![values.len() as u64],
            values,
        }
    }
}

/// A JSON-friendly f64: finite values as numbers, others as `"inf"`, `"-inf"`, `"nan"`.
#[derive(Debug, Clone, Copy)]
struct Float(f64);

impl Serialize for Float {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let v = self.0;
        if s.is_human_readable() && !v.is_finite() {
            s.serialize_str(if v.is_nan() {
                "nan"
            } else if v > 0.0 {
                "inf"
            } else {
                "-inf"
            })
        } else {
            s.serialize_f64(v)
        }
    }
}

impl<'de> Deserialize<'de> for Float {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Float;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a number or one of \"inf\", \"-inf\", \"nan\"")
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Float, E> {
                Ok(Float(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Float, E> {
                Ok(Float(v as f64))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Float, E> {
                Ok(Float(v as f64))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Float, E> {
                match v {
                    "inf" => Ok(Float(f64::INFINITY)),
                    "-inf" => Ok(Float(f64::NEG_INFINITY)),
                    "nan" => Ok(Float(f64::NAN)),
                    other => Err(E::invalid_value(serde::de::Unexpected::Str(other), &self)),
                }
            }
        }
        if d.is_human_readable() {
            d.deserialize_any(Visitor)
        } else {
            f64::deserialize(d).map(Float)
        }
    }
}

/// serde `with` module for a single f64 that may be non-finite.
pub(crate) mod float {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::Float;

    pub(crate) fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        Float(*v).serialize(s)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Float::deserialize(d).map(|f| f.0)
    }
}

/// serde `with` module for a list of f64 that may be non-finite.
pub(crate) mod floats {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::Float;

    pub(crate) fn serialize<S: Serializer>(v: &[f64], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|x| Float(*x)))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
        let v: Vec<Float> = Vec::deserialize(d)?;
        Ok(v.into_iter().map(|f| f.0).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_in_optional_fields() {
        let hook: Hook = serde_json::from_str(r#"{"module":"model.layers.0","point":"output"}"#)
            .expect("hook parses");
        assert_eq!(hook, Hook::new(0, "model.layers.0", Point::Output));
        let item: IndexItem =
            serde_json::from_str(r#"{"slice":{"start":1,"end":null}}"#).expect("slice parses");
        assert_eq!(item, IndexItem::slice(Some(1), None));
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = serde_json::from_str::<Hook>(
            r#"{"module":"model.layers.0","point":"output","layer":3}"#,
        )
        .expect_err("unknown field");
        assert!(err.to_string().contains("layer"), "{err}");
    }

    #[test]
    fn non_finite_constants_survive_json() {
        let c = ConstTensor::vector(DType::F32, vec![f64::NEG_INFINITY, 1.5, f64::INFINITY]);
        let json = serde_json::to_string(&c).expect("serializes");
        assert!(json.contains("\"-inf\""), "{json}");
        let back: ConstTensor = serde_json::from_str(&json).expect("parses");
        assert_eq!(back, c);
        let nan: ConstTensor =
            serde_json::from_str(r#"{"dtype":"f32","shape":[1],"values":["nan"]}"#)
                .expect("parses");
        assert!(nan.values[0].is_nan());
    }
}
