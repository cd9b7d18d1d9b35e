//! The two encodings of a graph (JSON for people, postcard for the wire) and
//! its content hash.

use nnmesh_protocol::limits::Limits;
use serde::Deserialize;

use crate::ir::{FORMAT_VERSION, Graph};

/// Why bytes or text could not be decoded into a [`Graph`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The JSON is malformed or does not describe a graph.
    #[error("invalid graph JSON at line {line}, column {column}: {message}")]
    Json {
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
        /// What serde_json reported.
        message: String,
    },
    /// The graph was written in a format version this build does not read.
    #[error("graph format version {found} is not supported (this build reads version {supported})")]
    Version {
        /// The version in the input.
        found: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// The postcard bytes are malformed.
    #[error("invalid graph bytes: {message}")]
    Postcard {
        /// What went wrong.
        message: String,
    },
    /// A list of the graph is longer than the limit; decoding stopped there.
    #[error("the graph has {} {what}; the limit is {limit}", count.map_or_else(|| "more".to_string(), |c| c.to_string()))]
    TooMany {
        /// Which list: `nodes`, `traces` or `invokes`.
        what: &'static str,
        /// Its length, when the encoding says it up front (postcard does).
        count: Option<usize>,
        /// The limit.
        limit: usize,
    },
    /// The encoded graph is larger than the limit; nothing was decoded.
    #[error("the graph is {bytes} bytes; the limit is {limit} (max_graph_bytes)")]
    TooLarge {
        /// The graph's encoded size.
        bytes: u64,
        /// The limit.
        limit: u64,
    },
}

impl From<serde_json::Error> for DecodeError {
    fn from(e: serde_json::Error) -> Self {
        DecodeError::Json {
            line: e.line(),
            column: e.column(),
            message: e.to_string(),
        }
    }
}

/// A graph's content hash: blake3 of its canonical (postcard) encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GraphHash(pub [u8; 32]);

impl GraphHash {
    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Display for GraphHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// Reads only the version of a JSON graph, so an unknown version is reported
/// as such instead of as whatever field it no longer understands.
#[derive(Deserialize)]
struct VersionProbe {
    version: u32,
}

impl Graph {
    /// The graph as pretty-printed JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a graph always serializes to JSON")
    }

    /// Parses a graph from JSON.
    ///
    /// # Errors
    /// [`DecodeError::Json`] with the line and column of the problem, or
    /// [`DecodeError::Version`] if `version` is not [`FORMAT_VERSION`].
    pub fn from_json(text: &str) -> Result<Graph, DecodeError> {
        let probe: VersionProbe = serde_json::from_str(text)?;
        check_version(probe.version)?;
        Ok(serde_json::from_str(text)?)
    }

    /// The canonical binary encoding: the version as 4 little-endian bytes,
    /// then the graph in postcard.
    pub fn to_postcard(&self) -> Vec<u8> {
        let out = self.version.to_le_bytes().to_vec();
        postcard::to_extend(self, out).expect("a graph always serializes to postcard")
    }

    /// Decodes [`Graph::to_postcard`]'s bytes.
    ///
    /// # Errors
    /// [`DecodeError::Version`] if the version prefix is not
    /// [`FORMAT_VERSION`], [`DecodeError::Postcard`] if the bytes are
    /// truncated, malformed or followed by trailing bytes.
    pub fn from_postcard(bytes: &[u8]) -> Result<Graph, DecodeError> {
        let Some((prefix, body)) = bytes.split_first_chunk::<4>() else {
            return Err(DecodeError::Postcard {
                message: format!("{} bytes is too short for the version prefix", bytes.len()),
            });
        };
        check_version(u32::from_le_bytes(*prefix))?;
        let (graph, rest): (Graph, _) =
            postcard::take_from_bytes(body).map_err(|e| DecodeError::Postcard {
                message: e.to_string(),
            })?;
        if !rest.is_empty() {
            return Err(DecodeError::Postcard {
                message: format!("{} trailing bytes after the graph", rest.len()),
            });
        }
        check_version(graph.version)?;
        Ok(graph)
    }

    /// [`Graph::from_postcard`] for bytes from a stranger: refuses more than
    /// `limits.max_graph_bytes` before looking at them, and more nodes,
    /// traces or invokes than the limits allow while decoding, before those
    /// lists are built (so a small message cannot claim a huge allocation).
    /// The rest of the limits are checked by [`validate`](crate::validate()).
    ///
    /// # Errors
    /// As [`Graph::from_postcard`], plus [`DecodeError::TooLarge`] and
    /// [`DecodeError::TooMany`].
    ///
    /// ```
    /// use nnmesh_graph::{Builder, DecodeError, Graph, Limits};
    /// let g = Builder::new();
    /// g.trace(["a", "b", "c"]);
    /// let bytes = g.finish().to_postcard();
    /// let two = Limits { max_invokes: 2, ..Limits::default() };
    /// assert!(Graph::from_postcard_limited(&bytes, &Limits::default()).is_ok());
    /// let e = Graph::from_postcard_limited(&bytes, &two).unwrap_err();
    /// assert_eq!(e.to_string(), "the graph has 3 invokes; the limit is 2");
    /// ```
    pub fn from_postcard_limited(bytes: &[u8], limits: &Limits) -> Result<Graph, DecodeError> {
        if bytes.len() as u64 > limits.max_graph_bytes {
            return Err(DecodeError::TooLarge {
                bytes: bytes.len() as u64,
                limit: limits.max_graph_bytes,
            });
        }
        limited(limits, || Graph::from_postcard(bytes))
    }

    /// [`Graph::from_json`] with the same limits as
    /// [`Graph::from_postcard_limited`].
    ///
    /// # Errors
    /// As [`Graph::from_json`], plus [`DecodeError::TooLarge`] and
    /// [`DecodeError::TooMany`].
    pub fn from_json_limited(text: &str, limits: &Limits) -> Result<Graph, DecodeError> {
        if text.len() as u64 > limits.max_graph_bytes {
            return Err(DecodeError::TooLarge {
                bytes: text.len() as u64,
                limit: limits.max_graph_bytes,
            });
        }
        limited(limits, || Graph::from_json(text))
    }

    /// blake3 of [`Graph::to_postcard`]: equal graphs have equal hashes.
    pub fn content_hash(&self) -> GraphHash {
        GraphHash(*blake3::hash(&self.to_postcard()).as_bytes())
    }
}

/// Runs a decode with `limits` on the IR's lists in force.
fn limited(
    limits: &Limits,
    decode: impl FnOnce() -> Result<Graph, DecodeError>,
) -> Result<Graph, DecodeError> {
    let (result, over) = crate::ir::bounded::with(limits, decode);
    match over {
        Some((what, count, limit)) => Err(DecodeError::TooMany { what, count, limit }),
        None => result,
    }
}

fn check_version(found: u32) -> Result<(), DecodeError> {
    if found == FORMAT_VERSION {
        Ok(())
    } else {
        Err(DecodeError::Version {
            found,
            supported: FORMAT_VERSION,
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::{
        builder::Builder,
        ir::{DType, IndexItem::*, Point},
        strategies,
    };

    /// A fixed graph touching most of the format: traces, invokes, steps, a
    /// write with index and mode, an op with attributes, a constant, a save.
    fn snapshot_graph() -> Graph {
        let g = Builder::new();
        let t = g.trace(["Hi"]).generate(2);
        let u = g.trace_tokens(vec![vec![1, 2]]);
        let h = g.read(t.at("model.layers.0", Point::Output).all_steps());
        let v = g.vector(DType::F32, vec![0.5, f64::NEG_INFINITY]);
        g.write(u.invoke(0).at("model.layers.1", Point::Output), v)
            .index([
                Full,
                At(-1),
                Slice {
                    start: Some(0),
                    end: None,
                    step: 2,
                },
            ])
            .mode_add();
        g.save("top", h.softmax(-1).topk_indices(2, -1));
        g.stop(u);
        g.finish()
    }

    const SNAPSHOT_HEX: &str = "0100000001020100024869020101020102000700000e6d6f64656c2e6c61796572732e300100020400010202000000000000e03f000000000000f0ff01010e6d6f64656c2e6c61796572732e310101000000010103000101020100000401022c010100022a020101030503746f70040601";
    const SNAPSHOT_HASH: &str = "ffbcd3cb218c22b4807792ee1acbdcce6904f388733c7ced26cd59c663b2e844";
    const SNAPSHOT_JSON: &str = r#"{
  "version": 1,
  "traces": [
    {
      "invokes": [
        {
          "prompt": {
            "text": "Hi"
          }
        }
      ],
      "max_new_tokens": 2
    },
    {
      "invokes": [
        {
          "prompt": {
            "tokens": [
              1,
              2
            ]
          }
        }
      ],
      "max_new_tokens": 0
    }
  ],
  "nodes": [
    {
      "read": {
        "hook": {
          "trace": 0,
          "module": "model.layers.0",
          "point": "output",
          "invoke": null,
          "steps": "all"
        }
      }
    },
    {
      "const": {
        "value": {
          "dtype": "f32",
          "shape": [
            2
          ],
          "values": [
            0.5,
            "-inf"
          ]
        }
      }
    },
    {
      "write": {
        "hook": {
          "trace": 1,
          "module": "model.layers.1",
          "point": "output",
          "invoke": 0,
          "steps": {
            "at": 0
          }
        },
        "value": 1,
        "index": [
          "full",
          {
            "at": -1
          },
          {
            "slice": {
              "start": 0,
              "end": null,
              "step": 2
            }
          }
        ],
        "mode": "add"
      }
    },
    {
      "op": {
        "op": {
          "softmax": {
            "dim": -1
          }
        },
        "args": [
          0
        ]
      }
    },
    {
      "op": {
        "op": {
          "topk_indices": {
            "k": 2,
            "dim": -1
          }
        },
        "args": [
          3
        ]
      }
    },
    {
      "save": {
        "name": "top",
        "value": 4
      }
    },
    {
      "stop": {
        "trace": 1
      }
    }
  ]
}"#;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn snapshot_is_stable() {
        let g = snapshot_graph();
        let bytes = g.to_postcard();
        let json = g.to_json();
        assert_eq!(hex(&bytes), SNAPSHOT_HEX, "postcard encoding changed");
        assert_eq!(json, SNAPSHOT_JSON, "JSON encoding changed");
        assert_eq!(g.content_hash().to_string(), SNAPSHOT_HASH, "hash changed");
        assert_eq!(Graph::from_json(SNAPSHOT_JSON), Ok(g));
    }

    #[test]
    fn json_errors_name_line_and_column() {
        let text = "{\n  \"version\": 1,\n  \"traces\": [],\n  \"nodes\": [{\"jump\": {}}]\n}";
        match Graph::from_json(text) {
            Err(DecodeError::Json {
                line,
                column,
                message,
            }) => {
                assert_eq!(line, 4, "{message}");
                assert!(column > 0);
                assert!(message.contains("jump"), "{message}");
            }
            other => panic!("expected a JSON error, got {other:?}"),
        }
        let err = Graph::from_json("{").expect_err("truncated");
        assert!(err.to_string().contains("line 1"), "{err}");
    }

    #[test]
    fn versions_are_checked() {
        let future = r#"{"version": 2, "traces": [], "nodes": [{"grad": {}}]}"#;
        assert_eq!(
            Graph::from_json(future),
            Err(DecodeError::Version {
                found: 2,
                supported: FORMAT_VERSION
            })
        );
        let mut bytes = snapshot_graph().to_postcard();
        bytes[0] = 9;
        assert_eq!(
            Graph::from_postcard(&bytes),
            Err(DecodeError::Version {
                found: 9,
                supported: FORMAT_VERSION
            })
        );
        let mut g = snapshot_graph();
        g.version = 7;
        assert!(matches!(
            Graph::from_postcard(&g.to_postcard()),
            Err(DecodeError::Version { found: 7, .. })
        ));
    }

    #[test]
    fn malformed_postcard_is_an_error() {
        let bytes = snapshot_graph().to_postcard();
        assert!(matches!(
            Graph::from_postcard(&bytes[..2]),
            Err(DecodeError::Postcard { .. })
        ));
        assert!(matches!(
            Graph::from_postcard(&bytes[..bytes.len() - 1]),
            Err(DecodeError::Postcard { .. })
        ));
        let mut long = bytes.clone();
        long.push(0);
        let err = Graph::from_postcard(&long).expect_err("trailing");
        assert!(err.to_string().contains("trailing"), "{err}");
    }

    #[test]
    fn limits_stop_decoding_before_long_lists_are_built() {
        let limits = Limits {
            max_nodes: 3,
            ..Limits::default()
        };
        // A node list that claims a billion nodes in a few bytes fails as
        // truncated without reserving memory for them (postcard itself
        // only trusts a length the remaining bytes could hold).
        let mut bytes = FORMAT_VERSION.to_le_bytes().to_vec();
        bytes.extend([1, 0]); // version 1 (varint), no traces
        bytes.extend([0x80, 0x94, 0xeb, 0xdc, 0x03]); // 1_000_000_000 (varint)
        assert!(matches!(
            Graph::from_postcard_limited(&bytes, &limits),
            Err(DecodeError::Postcard { .. })
        ));
        // Real nodes over the limit are refused from the length prefix,
        // before any is decoded.
        let g = Builder::new();
        let t = g.trace(["x"]);
        for l in 0..5 {
            g.read(t.at(&format!("model.layers.{l}"), Point::Output));
        }
        assert_eq!(
            Graph::from_postcard_limited(&g.finish().to_postcard(), &limits),
            Err(DecodeError::TooMany {
                what: "nodes",
                count: Some(5),
                limit: 3
            })
        );
        let g = snapshot_graph();
        let ok = Limits {
            max_nodes: g.nodes.len(),
            ..Limits::default()
        };
        assert_eq!(
            Graph::from_postcard_limited(&g.to_postcard(), &ok),
            Ok(g.clone())
        );
        assert_eq!(Graph::from_json_limited(&g.to_json(), &ok), Ok(g.clone()));
        let fewer = Limits {
            max_nodes: g.nodes.len() - 1,
            ..Limits::default()
        };
        let e = Graph::from_json_limited(&g.to_json(), &fewer).expect_err("JSON too");
        assert_eq!(
            e.to_string(),
            format!(
                "the graph has more nodes; the limit is {}",
                g.nodes.len() - 1
            )
        );
        // Traces and invokes are bounded the same way.
        let one = Limits {
            max_traces: 1,
            ..Limits::default()
        };
        assert!(matches!(
            Graph::from_postcard_limited(&g.to_postcard(), &one),
            Err(DecodeError::TooMany {
                what: "traces",
                count: Some(2),
                limit: 1
            })
        ));
        // The byte limit is checked first.
        let tiny = Limits {
            max_graph_bytes: 8,
            ..Limits::default()
        };
        assert!(matches!(
            Graph::from_postcard_limited(&g.to_postcard(), &tiny),
            Err(DecodeError::TooLarge { limit: 8, .. })
        ));
        // The limits end with the decode: later decodes are unlimited.
        assert_eq!(Graph::from_postcard(&g.to_postcard()), Ok(g));
    }

    proptest! {
        #[test]
        fn json_round_trips(g in strategies::graph()) {
            let back = Graph::from_json(&g.to_json()).expect("own JSON parses");
            prop_assert_eq!(&back, &g);
            // Bit-exact floats: postcard of the JSON round trip is identical.
            prop_assert_eq!(back.to_postcard(), g.to_postcard());
        }

        #[test]
        fn postcard_round_trips(g in strategies::graph()) {
            let bytes = g.to_postcard();
            let back = Graph::from_postcard(&bytes).expect("own bytes decode");
            prop_assert_eq!(&back, &g);
            prop_assert_eq!(back.content_hash(), g.content_hash());
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut framed = FORMAT_VERSION.to_le_bytes().to_vec();
            framed.extend(bytes);
            let _ = Graph::from_postcard(&framed);
        }
    }
}
