//! The messages of the stage protocol, [`STAGE_PROTOCOL`].
//!
//! Every libp2p request carries one encoded [`Request`] and is answered with
//! one encoded [`Response`] (see [`crate::codec`]). A client drives each step
//! of a trace hop by hop: it sends [`Request::Step`] to a hop, which answers
//! `Accepted`, runs, and sends back with [`Request::Report`] what the graph
//! saves there and its output ([`ReportBody::Output`]: the hidden state and
//! carried values for the next hop), or, from the last hop,
//! [`ReportBody::Done`]. The client keeps every hop's inputs, so it can
//! replay them to a replacement when a hop dies ([`StepRequest::replay`]).

use serde::{Deserialize, Serialize};

use crate::{
    PeerId,
    ids::{ModelId, RequestId},
    record::SignedRecord,
    span::Span,
    tensor::WireTensor,
};

/// libp2p protocol id of the stage protocol. The version in it changes
/// together with [`crate::codec::WIRE_VERSION`].
pub const STAGE_PROTOCOL: &str = "/nnmesh/stage/3";

/// One hop of a route: a peer and the layers it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hop {
    /// The hop's peer.
    pub peer: PeerId,
    /// Multiaddrs to reach it.
    pub addrs: Vec<String>,
    /// The layers it runs.
    pub span: Span,
}

/// A request of the stage protocol.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Ask a node for its signed records and its model manifest.
    Info,
    /// Tokenize texts with the tokenizer of `model`.
    Tokenize {
        /// The model whose tokenizer to use.
        model: ModelId,
        /// The texts, one sequence each.
        texts: Vec<String>,
    },
    /// Run one step of one trace on the receiving hop.
    Step(Box<StepRequest>),
    /// A stage reports to the client (saves, relayed values, completion, failure).
    Report(Box<StageReport>),
    /// Free every session the request holds on the receiving node.
    Close {
        /// The request to close.
        request: RequestId,
    },
    /// Ask for the tokenizer of `model` (a Hugging Face `tokenizer.json`), so
    /// a client without the weights can tokenize and show tokens itself.
    Tokenizer {
        /// The model whose tokenizer to send.
        model: ModelId,
    },
}

/// One step of one trace, addressed to hop `hop` of `route`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRequest {
    /// The request this step belongs to.
    pub request: RequestId,
    /// The client: where reports go.
    pub client: PeerId,
    /// The client's multiaddrs.
    pub client_addrs: Vec<String>,
    /// The model the route serves.
    pub model: ModelId,
    /// The whole route: the graph is partitioned along it.
    pub route: Vec<Hop>,
    /// Index into `route` of the receiving hop.
    pub hop: u32,
    /// postcard-encoded intervention graph (opaque to the protocol); sent
    /// with the first step a hop gets of a request.
    #[serde(with = "serde_bytes")]
    pub graph: Option<Vec<u8>>,
    /// The step to run.
    pub input: StepInput,
    /// For a hop that replaces a failed one: the steps its predecessor ran,
    /// in order, to run first without reporting (their saves and relays were
    /// delivered already). Empty otherwise.
    pub replay: Vec<StepInput>,
    /// Send the outputs of the replayed steps back
    /// ([`ReportBody::Replayed`]), for a replacement made of several hops.
    pub replay_outputs: bool,
}

/// What a hop gets for one step of one trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepInput {
    /// Trace index within the request.
    pub trace: u32,
    /// Generation step within the trace (0 = prompt).
    pub step: u32,
    /// Positions the hop's KV cache holds for this trace before the step
    /// (0 at step 0; the padded prompt length plus `step - 1` after). Client
    /// and stage both check it: a replacement that starts at the wrong
    /// position is refused, not silently wrong.
    pub past: u32,
    /// This step's input ids, `[batch, tokens]` i64 (the first hop, decode
    /// steps; empty at step 0, whose tokens are the graph's prompts).
    pub tokens: WireTensor,
    /// Hidden state from the previous hop; `None` at the first hop, and at
    /// a later hop when the graph stopped the forward before it.
    pub hidden: Option<WireTensor>,
    /// Graph values computed upstream that this hop needs.
    pub carry: Vec<Carried>,
}

/// A graph node's value carried between hops.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Carried {
    /// The graph node id.
    pub node: u32,
    /// Its value.
    pub value: WireTensor,
}

/// What a stage sends back to the client for one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageReport {
    /// The request reported on.
    pub request: RequestId,
    /// Index of the reporting hop in the route.
    pub hop: u32,
    /// The reporting peer.
    pub peer: PeerId,
    /// Trace index.
    pub trace: u32,
    /// Step index.
    pub step: u32,
    /// What it reports, in order (a step's saves, relayed values and end
    /// travel in one report when they fit).
    pub bodies: Vec<ReportBody>,
    /// With the step's last report (its output, or done): how the stage
    /// spent the step's time there.
    pub timing: Option<StepTiming>,
}

/// How a stage spent one step's time (see [`StageReport::timing`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepTiming {
    /// Microseconds the step waited in the stage's queue for its forward.
    pub queued_us: u64,
    /// Microseconds of the forward it ran in (shared with the others in
    /// its batch).
    pub compute_us: u64,
    /// Steps in that forward, this one included (1: it ran alone).
    pub batch: u32,
}

/// The payload of a [`StageReport`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ReportBody {
    /// Values the graph saved on this stage.
    Saves(Vec<Saved>),
    /// Values an earlier stage needs in a later step or trace: the client
    /// hands them to the first stage with its next step.
    Relay(Vec<Carried>),
    /// The trace finished; the generated tokens.
    Done {
        /// Generated token ids.
        tokens: Vec<u32>,
    },
    /// The step failed on this stage.
    Failed(WireError),
    /// A non-last hop finished the step: the next hop's input.
    Output(HopOutput),
    /// The outputs of the steps a replacement replayed, in order (when
    /// [`StepRequest::replay_outputs`] asked for them).
    Replayed(Vec<HopOutput>),
}

/// What a hop hands the next one for a step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HopOutput {
    /// The hidden state; `None` when the graph stopped the forward at or
    /// before this hop (later hops then run their nodes without a forward).
    pub hidden: Option<WireTensor>,
    /// Values later hops need.
    pub carry: Vec<Carried>,
}

/// One saved value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    /// The name the graph saved it under.
    pub name: String,
    /// The generation step it was saved at, if per-step.
    pub step: Option<u32>,
    /// The value.
    pub value: WireTensor,
}

/// A response of the stage protocol.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// Answer to [`Request::Info`].
    Info {
        /// The node's signed stage records.
        records: Vec<SignedRecord>,
        /// The node's model manifest (encoded by the graph crate; opaque here).
        #[serde(with = "serde_bytes")]
        manifest: Vec<u8>,
    },
    /// Answer to [`Request::Tokenize`]: one id sequence per text.
    Tokens(Vec<Vec<u32>>),
    /// A step was admitted and will run.
    Accepted,
    /// A report or close was received.
    Ack,
    /// The request failed.
    Error(WireError),
    /// Answer to [`Request::Tokenizer`]: the tokenizer as `tokenizer.json`.
    Tokenizer {
        /// The JSON bytes.
        #[serde(with = "serde_bytes")]
        json: Vec<u8>,
    },
}

/// An error as sent to a peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct WireError {
    /// The class of error.
    pub kind: ErrorKind,
    /// A human-readable explanation naming the offending thing.
    pub message: String,
}

impl WireError {
    /// Builds a `WireError`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> WireError {
        WireError {
            kind,
            message: message.into(),
        }
    }
}

/// Classes of [`WireError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The message's wire version is not supported.
    Version,
    /// The message could not be decoded.
    Malformed,
    /// The message exceeds a size limit.
    TooLarge,
    /// The node does not serve the requested model or layers.
    NotServed,
    /// The request (e.g. its graph) failed validation.
    Validation,
    /// The node's queue is full; retry later or elsewhere. Nothing was run.
    Overloaded,
    /// An unexpected failure on the node.
    Internal,
    /// The referenced request is unknown to the node.
    UnknownRequest,
    /// The requester may not do this: it is not on the node's allow-list,
    /// or the request belongs to another client.
    Forbidden,
}
