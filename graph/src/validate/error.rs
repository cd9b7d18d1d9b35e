//! [`ValidateError`]: why a graph was rejected, naming the node and the
//! culprit.

use crate::ir::{DType, NodeId};
use crate::op::Arity;

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
        /// The name of the [`Limits`](crate::Limits) field, e.g. `max_batch_tokens`.
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

impl ValidateError {
    /// The node the error names, if it names one: lets a front end point at
    /// the line of code that built that node.
    pub fn node(&self) -> Option<NodeId> {
        use ValidateError::*;
        match self {
            DanglingInput { node, .. }
            | ForwardReference { node, .. }
            | NotAValue { node, .. }
            | UnknownModule { node, .. }
            | UnknownPoint { node, .. }
            | TraceOutOfRange { node, .. }
            | InvokeOutOfRange { node, .. }
            | StepOutOfRange { node, .. }
            | EmptySteps { node, .. }
            | StepMismatch { node, .. }
            | OutOfOrder { node, .. }
            | Arity { node, .. }
            | Shape { node, .. }
            | Dtype { node, .. }
            | ApplyArgs { node, .. }
            | ApplyShape { node, .. }
            | WriteIndex { node, .. }
            | WriteShape { node, .. }
            | WriteDtype { node, .. }
            | ConstLength { node, .. }
            | ConstValue { node, .. }
            | DuplicateSave { node, .. } => Some(*node),
            Version { .. }
            | NoTraces
            | TooManyTraces { .. }
            | EmptyTrace { .. }
            | TooManyInvokes { .. }
            | TooManyNewTokens { .. }
            | InputsMismatch { .. }
            | EmptyPrompt { .. }
            | PromptTooLong { .. }
            | TokenOutOfRange { .. }
            | TooManyNodes { .. }
            | ConstBytes { .. }
            | SavedBytes { .. }
            | OverBudget { .. } => None,
        }
    }

    /// The trace the error names, if it names one and no node.
    pub fn trace(&self) -> Option<u32> {
        use ValidateError::*;
        match self {
            EmptyTrace { trace }
            | TooManyInvokes { trace, .. }
            | TooManyNewTokens { trace, .. }
            | EmptyPrompt { trace, .. }
            | PromptTooLong { trace, .. }
            | TokenOutOfRange { trace, .. }
            | OverBudget { trace, .. } => Some(*trace),
            _ => None,
        }
    }
}
