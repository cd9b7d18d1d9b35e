//! nnmesh's wire protocol: the messages nodes and clients exchange, the
//! tensors inside them, content ids, layer spans, request limits, signed
//! mesh records and the versioned codec.
//!
//! This crate is a leaf: no async runtime and no networking, so nodes,
//! clients and the control logic (`nnmesh-control`) build on exactly the
//! same types.
//!
//! - [`ids`]: [`RequestId`], [`ModelId`] (blake3 of the weight files).
//! - [`tensor`]: [`WireTensor`], raw little-endian bytes with dtype and shape.
//! - [`limits`]: [`Limits`], what one request may ask of a node.
//! - [`record`]: [`StageRecord`] announcements, signed and expiring.
//! - [`message`]: [`Request`] / [`Response`] of [`STAGE_PROTOCOL`].
//! - [`codec`]: [`encode`] / [`decode`], a `u16` version then postcard.
//! - [`span`]: [`Span`], a contiguous range of decoder layers.
//!
//! # Example
//!
//! ```
//! use nnmesh_protocol::{
//!     codec::{self, CodecError},
//!     message::{ErrorKind, Request, Response, WireError},
//!     ids::ModelId,
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
//! # Ok::<(), CodecError>(())
//! ```

pub mod codec;
pub mod ids;
pub mod limits;
pub mod message;
pub mod record;
pub mod span;
pub mod tensor;

pub use codec::{CodecError, MAX_MESSAGE, WIRE_VERSION, decode, encode};
pub use ids::{ModelId, ParseModelIdError, RequestId};
pub use libp2p_identity::PeerId;
pub use limits::Limits;
pub use message::{
    Carried, ErrorKind, Hop, HopOutput, ReportBody, Request, Response, STAGE_PROTOCOL, Saved,
    StageReport, StepInput, StepRequest, WireError,
};
pub use record::{RecordError, STAGES_KEY, SignedRecord, StageRecord};
pub use span::{ParseSpanError, Span};
pub use tensor::{TensorError, WireDType, WireTensor};
