//! nnmesh's wire protocol: the messages nodes and clients exchange, the
//! tensors inside them, content ids, signed mesh records, the versioned
//! codec and the shared route search.
//!
//! This crate is a leaf: no async runtime and no networking, so the nodes
//! and the clients build on exactly the same types and algorithms (and a
//! simulator can, later).
//!
//! - [`ids`]: [`RequestId`], [`ModelId`] (blake3 of the weight files).
//! - [`tensor`]: [`WireTensor`], raw little-endian bytes with dtype and shape.
//! - [`limits`]: [`Limits`], what one request may ask of a node.
//! - [`record`]: [`StageRecord`] announcements, signed and expiring.
//! - [`message`]: [`Request`] / [`Response`] of [`STAGE_PROTOCOL`].
//! - [`codec`]: [`encode`] / [`decode`], a `u16` version then postcard.
//! - [`span`]: [`Span`], a contiguous range of decoder layers.
//! - [`route`]: [`find_route`], the cheapest chain of stages.
//!
//! # Example
//!
//! ```
//! use nnmesh_protocol::{
//!     codec::{self, CodecError},
//!     message::{ErrorKind, Request, Response, WireError},
//!     ids::ModelId,
//!     route::{Candidate, find_route},
//!     PeerId, Span,
//! };
//!
//! // Encode a request, decode it on the other side.
//! let model = ModelId::of_bytes(b"weights");
//! let bytes = codec::encode(&Request::Tokenize { model, texts: vec!["hello".into()] });
//! let back: Request = codec::decode(&bytes)?;
//! assert_eq!(back, Request::Tokenize { model, texts: vec!["hello".into()] });
//!
//! // A node answers what it cannot decode with a typed error.
//! let answer = match codec::decode::<Request>(b"\x07\x00garbage") {
//!     Err(CodecError::Version { .. }) => Response::Error(WireError::new(ErrorKind::Version, "v7")),
//!     other => panic!("unexpected {other:?}"),
//! };
//! assert!(matches!(answer, Response::Error(_)));
//!
//! // Route 30 layers over two half-model peers or one slow full-model peer.
//! let id = |seed: u8| libp2p_identity::Keypair::ed25519_from_bytes([seed; 32])
//!     .expect("32 bytes").public().to_peer_id();
//! let peer = |seed, start, end, throughput| Candidate {
//!     peer: id(seed), span: Span::new(start, end), throughput, rtt_ms: 5.0, load: 0.0,
//! };
//! let cands = [peer(1, 0, 15, 500.0), peer(2, 15, 30, 500.0), peer(3, 0, 30, 50.0)];
//! assert_eq!(find_route(&cands, 30, &[]), Some(vec![0, 1]));
//! # Ok::<(), CodecError>(())
//! ```

pub mod codec;
pub mod ids;
pub mod limits;
pub mod message;
pub mod record;
pub mod route;
pub mod span;
pub mod tensor;

pub use codec::{CodecError, MAX_MESSAGE, WIRE_VERSION, decode, encode};
pub use ids::{ModelId, ParseModelIdError, RequestId};
pub use libp2p_identity::PeerId;
pub use limits::Limits;
pub use message::{
    Carried, ErrorKind, Hop, ReportBody, Request, Response, STAGE_PROTOCOL, Saved, StageReport,
    StepRequest, WireError,
};
pub use record::{RecordError, STAGES_KEY, SignedRecord, StageRecord};
pub use route::{Candidate, disjoint_backup, find_route};
pub use span::{ParseSpanError, Span};
pub use tensor::{TensorError, WireDType, WireTensor};
