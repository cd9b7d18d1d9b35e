//! The wire encoding: a `u16` little-endian version, then postcard.
//!
//! The version prefix lets a node answer a message from a newer or older
//! client with [`ErrorKind::Version`](crate::message::ErrorKind::Version)
//! instead of misreading it. Framing (the length prefix) is the transport's
//! job; [`MAX_MESSAGE`] is the default limit it enforces.

use serde::{Serialize, de::DeserializeOwned};

/// Version of the encoding, the first two bytes (LE) of every message.
pub const WIRE_VERSION: u16 = 3;

/// Default maximum size of one encoded message, 256 MiB.
pub const MAX_MESSAGE: usize = 256 << 20;

/// Why bytes could not be decoded as a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The message has another wire version than this build speaks.
    #[error("wire version {found} is not supported (this build speaks {supported})")]
    Version {
        /// The version in the message.
        found: u16,
        /// The version this build speaks.
        supported: u16,
    },
    /// The body is not a valid encoding of the expected type.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The message has no bytes at all.
    #[error("empty message")]
    Empty,
}

/// Encodes `value` as [`WIRE_VERSION`] (u16 LE) followed by its postcard encoding.
///
/// # Panics
/// If `value`'s `Serialize` impl uses a construct postcard cannot encode
/// (sequences of unknown length); never for the types of this crate.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_extend(value, WIRE_VERSION.to_le_bytes().to_vec())
        .expect("protocol types always encode with postcard")
}

/// Decodes a message produced by [`encode`], refusing other versions and
/// trailing bytes.
///
/// # Errors
/// [`CodecError::Empty`], [`CodecError::Version`] or [`CodecError::Malformed`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (version, body) = match bytes {
        [] => return Err(CodecError::Empty),
        [_] => return Err(CodecError::Malformed("truncated version prefix".into())),
        [a, b, body @ ..] => (u16::from_le_bytes([*a, *b]), body),
    };
    if version != WIRE_VERSION {
        return Err(CodecError::Version {
            found: version,
            supported: WIRE_VERSION,
        });
    }
    let (value, rest) =
        postcard::take_from_bytes(body).map_err(|e| CodecError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CodecError::Malformed(format!(
            "{} trailing bytes",
            rest.len()
        )));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use std::fmt::Debug;

    use proptest::prelude::*;

    use super::*;
    use crate::{
        PeerId,
        ids::{ModelId, RequestId},
        message::*,
        record::SignedRecord,
        span::Span,
        tensor::{WireDType, WireTensor},
    };

    // ---- proptest strategies -------------------------------------------

    fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..max)
    }

    fn model_id() -> impl Strategy<Value = ModelId> {
        any::<[u8; 32]>().prop_map(ModelId)
    }

    fn dtype() -> impl Strategy<Value = WireDType> {
        prop_oneof![
            Just(WireDType::F32),
            Just(WireDType::F16),
            Just(WireDType::Bf16),
            Just(WireDType::I64),
            Just(WireDType::Bool),
        ]
    }

    fn tensor() -> impl Strategy<Value = WireTensor> {
        // The codec does not require consistent tensors, so neither do we.
        (
            dtype(),
            proptest::collection::vec(any::<u64>(), 0..4),
            bytes(64),
        )
            .prop_map(|(dtype, shape, data)| WireTensor { dtype, shape, data })
    }

    fn strings() -> impl Strategy<Value = Vec<String>> {
        proptest::collection::vec(".{0,12}", 0..3)
    }

    fn peer_id() -> impl Strategy<Value = PeerId> {
        any::<[u8; 32]>().prop_map(|b| {
            libp2p_identity::Keypair::ed25519_from_bytes(b)
                .expect("any 32 bytes are an ed25519 secret")
                .public()
                .to_peer_id()
        })
    }

    fn hop() -> impl Strategy<Value = Hop> {
        (peer_id(), strings(), any::<u32>(), any::<u32>()).prop_map(|(peer, addrs, start, end)| {
            Hop {
                peer,
                addrs,
                span: Span::new(start, end),
            }
        })
    }

    fn carried() -> impl Strategy<Value = Carried> {
        (any::<u32>(), tensor()).prop_map(|(node, value)| Carried { node, value })
    }

    fn error_kind() -> impl Strategy<Value = ErrorKind> {
        prop_oneof![
            Just(ErrorKind::Version),
            Just(ErrorKind::Malformed),
            Just(ErrorKind::TooLarge),
            Just(ErrorKind::NotServed),
            Just(ErrorKind::Validation),
            Just(ErrorKind::Overloaded),
            Just(ErrorKind::Internal),
            Just(ErrorKind::UnknownRequest),
            Just(ErrorKind::Forbidden),
        ]
    }

    fn wire_error() -> impl Strategy<Value = WireError> {
        (error_kind(), ".{0,20}").prop_map(|(kind, message)| WireError { kind, message })
    }

    fn step_input() -> impl Strategy<Value = StepInput> {
        (
            (any::<u32>(), any::<u32>(), any::<u32>()),
            tensor(),
            proptest::option::of(tensor()),
            proptest::collection::vec(carried(), 0..3),
        )
            .prop_map(|((trace, step, past), tokens, hidden, carry)| StepInput {
                trace,
                step,
                past,
                tokens,
                hidden,
                carry,
            })
    }

    fn hop_output() -> impl Strategy<Value = HopOutput> {
        (
            proptest::option::of(tensor()),
            proptest::collection::vec(carried(), 0..3),
        )
            .prop_map(|(hidden, carry)| HopOutput { hidden, carry })
    }

    fn step_request() -> impl Strategy<Value = StepRequest> {
        (
            (any::<u64>(), peer_id(), strings(), model_id()),
            (
                proptest::collection::vec(hop(), 0..3),
                any::<u32>(),
                proptest::option::of(bytes(64)),
            ),
            step_input(),
            (proptest::collection::vec(step_input(), 0..3), any::<bool>()),
        )
            .prop_map(
                |(
                    (request, client, client_addrs, model),
                    (route, hop, graph),
                    input,
                    (replay, replay_outputs),
                )| StepRequest {
                    request: RequestId(request),
                    client,
                    client_addrs,
                    model,
                    route,
                    hop,
                    graph,
                    input,
                    replay,
                    replay_outputs,
                },
            )
    }

    fn saved() -> impl Strategy<Value = Saved> {
        (".{0,12}", proptest::option::of(any::<u32>()), tensor())
            .prop_map(|(name, step, value)| Saved { name, step, value })
    }

    fn report_body() -> impl Strategy<Value = ReportBody> {
        prop_oneof![
            proptest::collection::vec(saved(), 0..3).prop_map(ReportBody::Saves),
            hop_output().prop_map(ReportBody::Output),
            proptest::collection::vec(hop_output(), 0..3).prop_map(ReportBody::Replayed),
            proptest::collection::vec(carried(), 0..3).prop_map(ReportBody::Relay),
            proptest::collection::vec(any::<u32>(), 0..8)
                .prop_map(|tokens| ReportBody::Done { tokens }),
            wire_error().prop_map(ReportBody::Failed),
        ]
    }

    fn stage_report() -> impl Strategy<Value = StageReport> {
        (
            any::<u64>(),
            any::<u32>(),
            peer_id(),
            any::<u32>(),
            any::<u32>(),
            proptest::collection::vec(report_body(), 0..3),
            proptest::option::of((any::<u64>(), any::<u64>(), any::<u32>())),
        )
            .prop_map(
                |(request, hop, peer, trace, step, bodies, timing)| StageReport {
                    request: RequestId(request),
                    hop,
                    peer,
                    trace,
                    step,
                    bodies,
                    timing: timing.map(|(queued_us, compute_us, batch)| StepTiming {
                        queued_us,
                        compute_us,
                        batch,
                    }),
                },
            )
    }

    fn request() -> impl Strategy<Value = Request> {
        prop_oneof![
            Just(Request::Info),
            (model_id(), strings()).prop_map(|(model, texts)| Request::Tokenize { model, texts }),
            step_request().prop_map(|s| Request::Step(Box::new(s))),
            stage_report().prop_map(|r| Request::Report(Box::new(r))),
            any::<u64>().prop_map(|r| Request::Close {
                request: RequestId(r)
            }),
            model_id().prop_map(|model| Request::Tokenizer { model }),
        ]
    }

    fn signed_record() -> impl Strategy<Value = SignedRecord> {
        (bytes(64), bytes(40), bytes(64)).prop_map(|(record, public_key, signature)| SignedRecord {
            record,
            public_key,
            signature,
        })
    }

    fn response() -> impl Strategy<Value = Response> {
        prop_oneof![
            (proptest::collection::vec(signed_record(), 0..3), bytes(64))
                .prop_map(|(records, manifest)| Response::Info { records, manifest }),
            proptest::collection::vec(proptest::collection::vec(any::<u32>(), 0..5), 0..3)
                .prop_map(Response::Tokens),
            Just(Response::Accepted),
            Just(Response::Ack),
            wire_error().prop_map(Response::Error),
            bytes(64).prop_map(|json| Response::Tokenizer { json }),
        ]
    }

    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(value: &T) {
        let bytes = encode(value);
        assert_eq!(&bytes[..2], &WIRE_VERSION.to_le_bytes());
        let back: T = decode(&bytes).expect("decodes");
        assert_eq!(&back, value);
    }

    proptest! {
        #[test]
        fn request_round_trip(r in request()) { round_trip(&r); }

        #[test]
        fn response_round_trip(r in response()) { round_trip(&r); }

        #[test]
        fn step_request_round_trip(r in step_request()) { round_trip(&r); }

        #[test]
        fn stage_report_round_trip(r in stage_report()) { round_trip(&r); }

        #[test]
        fn parts_round_trip(h in hop(), c in carried(), s in saved(), e in wire_error(),
                            t in tensor(), rec in signed_record()) {
            round_trip(&h);
            round_trip(&c);
            round_trip(&s);
            round_trip(&e);
            round_trip(&t);
            round_trip(&rec);
        }

        #[test]
        fn truncation_never_panics(r in request()) {
            let bytes = encode(&r);
            for cut in 0..bytes.len() {
                prop_assert!(decode::<Request>(&bytes[..cut]).is_err());
            }
        }
    }

    // ---- fixed-bytes snapshots -----------------------------------------

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn fixed_peer(seed: u8) -> PeerId {
        libp2p_identity::Keypair::ed25519_from_bytes([seed; 32])
            .expect("32 bytes")
            .public()
            .to_peer_id()
    }

    fn tiny_tensor() -> WireTensor {
        WireTensor::from_i64(vec![1, 2], &[7, -1]).expect("consistent")
    }

    fn sample_step() -> StepRequest {
        StepRequest {
            request: RequestId(300),
            client: fixed_peer(0xc1),
            client_addrs: vec!["/a".into()],
            model: ModelId([0xab; 32]),
            route: vec![Hop {
                peer: fixed_peer(0x01),
                addrs: vec!["/h".into()],
                span: Span::new(0, 30),
            }],
            hop: 0,
            graph: Some(vec![0x99]),
            input: StepInput {
                trace: 1,
                step: 2,
                past: 12,
                tokens: tiny_tensor(),
                hidden: None,
                carry: vec![Carried {
                    node: 5,
                    value: WireTensor::from_f32(vec![1], &[1.0]).expect("consistent"),
                }],
            },
            replay: Vec::new(),
            replay_outputs: false,
        }
    }

    fn report(body: ReportBody) -> Request {
        let timing = matches!(body, ReportBody::Done { .. }).then_some(StepTiming {
            queued_us: 5,
            compute_us: 300,
            batch: 2,
        });
        Request::Report(Box::new(StageReport {
            request: RequestId(9),
            hop: 1,
            peer: fixed_peer(0xee),
            trace: 0,
            step: 3,
            bodies: vec![body],
            timing,
        }))
    }

    /// One sample of every message kind, with the exact bytes it must encode to.
    /// If one of these fails, the wire format changed: bump `WIRE_VERSION`
    /// and the protocol id, then update the literal.
    fn snapshots() -> Vec<(&'static str, Vec<u8>, &'static str)> {
        let sample_error = WireError::new(ErrorKind::Overloaded, "busy");
        vec![
            ("request/info", encode(&Request::Info), SNAP_INFO),
            (
                "request/tokenize",
                encode(&Request::Tokenize {
                    model: ModelId([0x11; 32]),
                    texts: vec!["hi".into()],
                }),
                SNAP_TOKENIZE,
            ),
            (
                "request/step",
                encode(&Request::Step(Box::new(sample_step()))),
                SNAP_STEP,
            ),
            (
                "request/report/saves",
                encode(&report(ReportBody::Saves(vec![Saved {
                    name: "x".into(),
                    step: Some(4),
                    value: tiny_tensor(),
                }]))),
                SNAP_REPORT_SAVES,
            ),
            (
                "request/report/output",
                encode(&report(ReportBody::Output(HopOutput {
                    hidden: Some(tiny_tensor()),
                    carry: Vec::new(),
                }))),
                SNAP_REPORT_OUTPUT,
            ),
            (
                "request/report/relay",
                encode(&report(ReportBody::Relay(vec![Carried {
                    node: 2,
                    value: tiny_tensor(),
                }]))),
                SNAP_REPORT_RELAY,
            ),
            (
                "request/report/done",
                encode(&report(ReportBody::Done {
                    tokens: vec![1, 200],
                })),
                SNAP_REPORT_DONE,
            ),
            (
                "request/report/failed",
                encode(&report(ReportBody::Failed(sample_error.clone()))),
                SNAP_REPORT_FAILED,
            ),
            (
                "request/close",
                encode(&Request::Close {
                    request: RequestId(1),
                }),
                SNAP_CLOSE,
            ),
            (
                "request/tokenizer",
                encode(&Request::Tokenizer {
                    model: ModelId([0x22; 32]),
                }),
                SNAP_TOKENIZER,
            ),
            (
                "response/info",
                encode(&Response::Info {
                    records: vec![SignedRecord {
                        record: vec![1, 2],
                        public_key: vec![3],
                        signature: vec![4, 5],
                    }],
                    manifest: vec![6],
                }),
                SNAP_RESP_INFO,
            ),
            (
                "response/tokens",
                encode(&Response::Tokens(vec![vec![1, 2], vec![]])),
                SNAP_RESP_TOKENS,
            ),
            (
                "response/accepted",
                encode(&Response::Accepted),
                SNAP_RESP_ACCEPTED,
            ),
            ("response/ack", encode(&Response::Ack), SNAP_RESP_ACK),
            (
                "response/error",
                encode(&Response::Error(sample_error)),
                SNAP_RESP_ERROR,
            ),
            (
                "response/tokenizer",
                encode(&Response::Tokenizer {
                    json: b"{}".to_vec(),
                }),
                SNAP_RESP_TOKENIZER,
            ),
        ]
    }

    const SNAP_INFO: &str = "030000";
    const SNAP_TOKENIZE: &str =
        "030001111111111111111111111111111111111111111111111111111111111111111101026869";
    const SNAP_STEP: &str = "030002ac0226002408011220acdcc8494d458f44a7aaac1d6a84ec624daee88436db2ae26e67ba645a10622801022f61abababababababababababababababababababababababababababababababab01260024080112208a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c01022f68001e0001019901020c03020102100700000000000000ffffffffffffffff000105000101040000803f0000";
    const SNAP_REPORT_SAVES: &str = "030003090126002408011220814722de71c5b14e748dff322ae7f7c415cee558766495292cd6c4c0a6a9df2800030100010178010403020102100700000000000000ffffffffffffffff00";
    const SNAP_REPORT_OUTPUT: &str = "030003090126002408011220814722de71c5b14e748dff322ae7f7c415cee558766495292cd6c4c0a6a9df28000301040103020102100700000000000000ffffffffffffffff0000";
    const SNAP_REPORT_RELAY: &str = "030003090126002408011220814722de71c5b14e748dff322ae7f7c415cee558766495292cd6c4c0a6a9df2800030101010203020102100700000000000000ffffffffffffffff00";
    const SNAP_REPORT_DONE: &str = "030003090126002408011220814722de71c5b14e748dff322ae7f7c415cee558766495292cd6c4c0a6a9df28000301020201c8010105ac0202";
    const SNAP_REPORT_FAILED: &str = "030003090126002408011220814722de71c5b14e748dff322ae7f7c415cee558766495292cd6c4c0a6a9df280003010305046275737900";
    const SNAP_CLOSE: &str = "03000401";
    const SNAP_TOKENIZER: &str =
        "0300052222222222222222222222222222222222222222222222222222222222222222";
    const SNAP_RESP_INFO: &str = "0300000102010201030204050106";
    const SNAP_RESP_TOKENS: &str = "0300010202010200";
    const SNAP_RESP_ACCEPTED: &str = "030002";
    const SNAP_RESP_ACK: &str = "030003";
    const SNAP_RESP_TOKENIZER: &str = "030005027b7d";
    const SNAP_RESP_ERROR: &str = "030004050462757379";

    #[test]
    fn snapshots_are_stable() {
        let mut failures = Vec::new();
        for (name, bytes, expected) in snapshots() {
            let actual = hex(&bytes);
            if actual != expected {
                failures.push(format!(
                    "{name}: expected {expected}\n{name}:   actual {actual}"
                ));
            }
        }
        assert!(
            failures.is_empty(),
            "wire format changed:\n{}",
            failures.join("\n")
        );
    }

    #[test]
    fn snapshots_decode() {
        for (name, bytes, _) in snapshots() {
            if name.starts_with("request/") {
                let r: Request = decode(&bytes).expect(name);
                assert_eq!(encode(&r), bytes, "{name}");
            } else {
                let r: Response = decode(&bytes).expect(name);
                assert_eq!(encode(&r), bytes, "{name}");
            }
        }
    }

    // ---- errors ----------------------------------------------------------

    #[test]
    fn empty_and_truncated() {
        assert_eq!(decode::<Request>(&[]), Err(CodecError::Empty));
        assert!(matches!(
            decode::<Request>(&[1]),
            Err(CodecError::Malformed(_))
        ));
    }

    #[test]
    fn wrong_version() {
        let mut bytes = encode(&Request::Info);
        bytes[..2].copy_from_slice(&7u16.to_le_bytes());
        assert_eq!(
            decode::<Request>(&bytes),
            Err(CodecError::Version {
                found: 7,
                supported: WIRE_VERSION
            })
        );
    }

    #[test]
    fn garbage_is_malformed() {
        let garbage = [&WIRE_VERSION.to_le_bytes()[..], &[0xff; 6]].concat();
        assert!(matches!(
            decode::<Request>(&garbage),
            Err(CodecError::Malformed(_))
        ));
        let mut trailing = encode(&Request::Info);
        trailing.push(0);
        assert!(matches!(
            decode::<Request>(&trailing),
            Err(CodecError::Malformed(_))
        ));
    }
}
