//! The nnmesh client library (no libtorch): [`mesh::Client`] discovers the
//! nodes serving a model, routes Intervention Graphs through them and
//! collects what each stage saved; [`transport`] is the libp2p layer shared
//! by nodes and clients ([`transport::Endpoint`]).
//!
//! # Example
//!
//! ```no_run
//! use libp2p::identity::Keypair;
//! use nnmesh_client::transport::{self, Endpoint};
//! use nnmesh_protocol::{codec, message::{Request, Response}};
//!
//! # async fn demo() -> anyhow::Result<()> {
//! // A node: answer every request with `Ack`.
//! let (node, mut inbound) = Endpoint::start(transport::Config::new(Keypair::generate_ed25519())).await?;
//! tokio::spawn(async move {
//!     while let Some(req) = inbound.recv().await {
//!         let _ = req.reply.send(codec::encode(&Response::Ack));
//!     }
//! });
//!
//! // A client: send it a request.
//! let (client, _) = Endpoint::start(transport::Config::new(Keypair::generate_ed25519())).await?;
//! let answer = client
//!     .request(node.peer_id(), node.listen_addrs().await, codec::encode(&Request::Info))
//!     .await?;
//! let response: Response = codec::decode(&answer)?;
//! # Ok(()) }
//! ```

pub mod mesh;
pub mod transport;

/// The failure detection a [`mesh::Client`] runs with
/// ([`mesh::Client::with_detection`]).
pub use nnmesh_control::detect;
/// The fail-over limits a [`mesh::Client`] runs with
/// ([`mesh::Client::with_failover`]).
pub use nnmesh_control::failover;
