//! What can go wrong talking to the mesh.

use libp2p::PeerId;
use nnmesh_graph::{PartitionError, ValidateError};
use nnmesh_protocol::{Span, message::WireError};

use crate::transport::{self, RequestError};

/// A stage of a route, as errors name it: its index, peer and layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageName {
    /// The hop's index in the route.
    pub hop: u32,
    /// The hop's peer.
    pub peer: PeerId,
    /// Its layers.
    pub span: Span,
}

impl std::fmt::Display for StageName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "stage {} (layers {} on {})",
            self.hop, self.span, self.peer
        )
    }
}

/// What went wrong talking to the mesh.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The client's own transport failed.
    #[error(transparent)]
    Transport(#[from] transport::Error),
    /// A request got no answer.
    #[error("request to {peer} failed: {source}")]
    Request {
        /// The peer asked.
        peer: PeerId,
        /// Why (and what is known about remote side effects).
        source: RequestError,
    },
    /// A peer refused a request.
    #[error("{peer} answered with an error: {error}")]
    Remote {
        /// The peer.
        peer: PeerId,
        /// Its error.
        error: WireError,
    },
    /// A peer's answer made no sense.
    #[error("{peer} sent an unexpected or undecodable answer: {detail}")]
    Protocol {
        /// The peer.
        peer: PeerId,
        /// What was wrong.
        detail: String,
    },
    /// Discovery found nobody.
    #[error("no stage-serving node found in the mesh")]
    NoPeers,
    /// No model has every layer served.
    #[error("no model is fully served: {0}")]
    Coverage(String),
    /// More than one model is fully served and none was chosen.
    #[error("several models are fully served ({0}); choose one by its model id")]
    Ambiguous(String),
    /// The graph failed validation against the model's manifest and the
    /// route's limits.
    #[error("invalid graph: {0}")]
    Validate(#[from] ValidateError),
    /// The encoded graph is over the route's size limit.
    #[error("the graph is {bytes} bytes; the route's limit is {limit} (max_graph_bytes)")]
    GraphTooLarge {
        /// Its encoded size.
        bytes: u64,
        /// The limit.
        limit: u64,
    },
    /// The graph cannot run along the route.
    #[error("cannot split the graph along the route: {0}")]
    Partition(#[from] PartitionError),
    /// A stage reported a failure; earlier stages may have run the step.
    #[error("{stage} failed at trace {trace}, step {step}: {error}")]
    Stage {
        /// The stage.
        stage: StageName,
        /// The trace.
        trace: u32,
        /// The step.
        step: u32,
        /// The stage's error.
        error: WireError,
    },
    /// A stage failed and fail-over could not carry the request across:
    /// no other live holder of its layers, too many failures, or a failure
    /// any holder would repeat.
    #[error("{stage} failed at trace {trace}, step {step} ({failure}); fail-over gave up: {why}")]
    GaveUp {
        /// The stage that failed last.
        stage: StageName,
        /// The trace.
        trace: u32,
        /// The step.
        step: u32,
        /// How it failed.
        failure: String,
        /// Why fail-over stopped.
        why: nnmesh_control::failover::GiveUp,
    },
    /// Redundant execution: two holders of a hop's layers disagreed.
    #[error("{stage} and its twin {twin} disagree at trace {trace}, step {step}: {detail}")]
    Mismatch {
        /// The route's holder.
        stage: StageName,
        /// The second holder.
        twin: StageName,
        /// The trace.
        trace: u32,
        /// The step.
        step: u32,
        /// What differs, and by how much.
        detail: String,
    },
    /// Redundant execution needs a second holder of every hop's layers.
    #[error("verification needs two holders of layers {span}; the mesh has one")]
    NoTwin {
        /// The layers.
        span: Span,
    },
    /// A step ended without some of the values the graph saves at it: the
    /// result would be partial, so there is none.
    #[error("trace {trace}, step {step} ended without {missing}")]
    MissingSaves {
        /// The trace.
        trace: u32,
        /// The step.
        step: u32,
        /// The missing saves and the stage that should have sent each.
        missing: String,
    },
    /// Every stage answers, but the step made no progress in time.
    #[error(
        "no progress on trace {trace}, step {step} within {secs} s, although every stage of the route answers (they may be overloaded)"
    )]
    NoProgress {
        /// The trace.
        trace: u32,
        /// The step.
        step: u32,
        /// How long the client waited.
        secs: u64,
    },
    /// The client's report channel closed: the client is shutting down.
    #[error("the client stopped while the request was running")]
    Closed,
}
