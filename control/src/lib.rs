//! The mesh's control logic as sans-IO state machines: decisions with time
//! and randomness passed in, no sockets, no threads, no clocks.
//!
//! - [`route`]: the cheapest chain of holders through a range of layers
//!   (any part of a holder's span can be used).
//! - [`failover`]: a client's decisions when a hop of its route fails —
//!   replace, wait and look again, or give up.
//! - [`detect`]: whether a hop of a step in flight is gone (connection
//!   loss, missed pings, a deadline and a probe), alive but stuck, or fine.
//! - [`placement`]: which blocks a node serves (cover the weakest blocks,
//!   keep a replication floor) and when it moves (load the new blocks,
//!   look again, then drop the old ones).
//!
//! The node and the client drive these with real time and the network; a
//! simulator can drive the same code with virtual time.
//!
//! ```
//! use nnmesh_control::route::{Candidate, find_route};
//! use nnmesh_protocol::Span;
//!
//! let id = |s: u8| libp2p_identity::Keypair::ed25519_from_bytes([s; 32]).unwrap().public().to_peer_id();
//! let holder = |p, start, end| Candidate {
//!     peer: id(p), span: Span::new(start, end), throughput: 100.0, rtt_ms: 5.0, load: 0.0,
//! };
//! // Two overlapping holders cover 30 layers; the route uses part of one.
//! let cands = [holder(1, 0, 20), holder(2, 10, 30)];
//! let legs = find_route(&cands, Span::new(0, 30), &[]).expect("covered");
//! assert_eq!(legs.len(), 2);
//! assert_eq!(legs[0].span.start, 0);
//! assert_eq!(legs[1].span.end, 30);
//! ```

pub mod detect;
pub mod failover;
pub mod placement;
pub mod route;
