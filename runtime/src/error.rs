//! The errors of a forward pass and of the graph nodes that run inside it,
//! in one leaf module that the model, the hooks and the interpreter share.

use nnmesh_graph::NodeId;
use tch::TchError;

/// Why a forward did not run to its end.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HookError {
    /// The hooks asked to end the forward early (nothing later is needed).
    #[error("forward stopped early")]
    Stop,
    /// The forward's input does not fit the model.
    #[error(transparent)]
    Input(#[from] InputError),
    /// A graph node failed while the forward ran.
    #[error("node {node}: {cause}")]
    Node {
        /// The node.
        node: NodeId,
        /// Why it failed.
        #[source]
        cause: NodeError,
    },
    /// A hook replaced a value with one of another shape or dtype.
    #[error("the value at {at} was replaced by {got}; it must stay {want}")]
    Replaced {
        /// The hook point.
        at: String,
        /// Its dtype and shape.
        want: String,
        /// What replaced it.
        got: String,
    },
    /// A hook panicked (the panic was caught; only this request failed).
    #[error("panicked: {0}")]
    Panic(String),
}

/// The input of a forward does not fit the model or stage.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InputError {
    /// Token ids sent to a stage without the embedding.
    #[error("this stage does not host model.embed_tokens; send it a hidden state")]
    NoEmbedding,
    /// A hidden state of the wrong rank.
    #[error("the input must be [batch, tokens, hidden], got {0:?}")]
    Shape(Vec<i64>),
    /// Layers this stage does not hold.
    #[error("layers {start}..{end} are not all held by this stage")]
    Span {
        /// First layer asked for.
        start: usize,
        /// End of the layers asked for.
        end: usize,
    },
}

/// A module called on a value outside the forward pass (a graph's `Apply`)
/// that cannot run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModuleError {
    /// The stage does not host the module.
    #[error("module {module} is not hosted by this stage (layers {start}..{end})")]
    NotHosted {
        /// The module path.
        module: String,
        /// First layer the stage hosts.
        start: usize,
        /// End of the stage's layers (exclusive).
        end: usize,
    },
    /// The value does not fit the module.
    #[error("module {module} cannot be applied: {source}")]
    Input {
        /// The module path.
        module: String,
        /// What is wrong with the value.
        #[source]
        source: InputError,
    },
}

/// A graph node that failed while it ran.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// A read or write whose hook the forward never reached at this step.
    #[error("hook {hook} was not reached in trace {trace}, step {step}")]
    Unreached {
        /// The hook's path.
        hook: String,
        /// The trace.
        trace: u32,
        /// The step.
        step: u32,
    },
    /// A read due at a hook the forward passed without visiting.
    #[error("hook {hook} was not reached before {at}")]
    Passed {
        /// The hook's path.
        hook: String,
        /// The hook the forward was at.
        at: String,
    },
    /// An invoke the step does not have.
    #[error("invoke {0} is out of range")]
    InvokeOutOfRange(usize),
    /// An input that was never computed here (nor carried in).
    #[error("input {0} has no value (it runs on another stage and was not carried)")]
    MissingInput(NodeId),
    /// An op failed in libtorch.
    #[error("{op}: {source}")]
    Op {
        /// The op's name.
        op: &'static str,
        /// libtorch's error.
        source: TchError,
    },
    /// A write failed in libtorch (a value that does not fit the slice).
    #[error("writing {hook}: {source}")]
    Write {
        /// The hook's path.
        hook: String,
        /// libtorch's error.
        source: TchError,
    },
    /// An applied module failed.
    #[error(transparent)]
    Module(#[from] ModuleError),
    /// A module path the model does not have.
    #[error("unknown module {0}")]
    UnknownModule(String),
    /// A libtorch call around the node failed (views, batching, copies).
    #[error(transparent)]
    Torch(#[from] TchError),
}

impl NodeError {
    /// This failure, attributed to `node`.
    pub fn at(self, node: NodeId) -> HookError {
        HookError::Node { node, cause: self }
    }
}

/// The message of a caught panic, first line only: libtorch errors carry a
/// C++ backtrace after it, as real or (inside a `Debug` string) escaped
/// newlines.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let msg = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("a panic without a message");
    let end = [msg.find('\n'), msg.find("\\n")]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(msg.len());
    msg[..end].chars().take(400).collect()
}
