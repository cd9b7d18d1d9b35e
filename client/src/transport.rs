//! A libp2p swarm behind a cloneable handle: request-response over the stage
//! protocol, Kademlia provider discovery, identify, ping and optional mDNS.
//!
//! The swarm runs in its own tokio task. The [`Endpoint`] handle talks to it
//! through a bounded command channel; inbound requests come out of a bounded
//! [`Inbound`] channel and are answered through a oneshot, so the swarm loop
//! never waits on application work. When the inbound channel is full the
//! loop answers at once with an encoded
//! [`ErrorKind::Overloaded`](nnmesh_protocol::message::ErrorKind::Overloaded)
//! error response.

// The derive's generated `BehaviourEvent` carries no docs; everything
// written by hand in the module is documented.
#[allow(missing_docs)]
pub mod behaviour;
pub mod codec;
mod event_loop;
pub mod keys;

use std::{collections::HashMap, time::Duration};

use libp2p::{
    Multiaddr, PeerId, Swarm, Transport as _,
    core::upgrade::Version,
    identity::Keypair,
    noise,
    pnet::{PnetConfig, PreSharedKey},
    tcp, yamux,
};
use nnmesh_protocol::codec::MAX_MESSAGE;
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{Instrument, info, info_span};

use self::{
    behaviour::Behaviour,
    event_loop::{EventLoop, Settings},
};

/// How long [`Endpoint::start`] waits for its listeners to come up.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Capacity of the handle → swarm command channel.
const COMMAND_CAPACITY: usize = 256;
/// Capacity of the peer-event broadcast; a subscriber that falls further
/// behind is told it lagged.
const PEER_EVENT_CAPACITY: usize = 256;

/// Settings of a [`Endpoint`].
#[derive(Debug, Clone)]
pub struct Config {
    /// The node's identity.
    pub keypair: Keypair,
    /// Addresses to listen on, e.g. `/ip4/0.0.0.0/tcp/0`. May be empty for a
    /// client that never receives requests.
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start to join the DHT.
    pub bootstrap: Vec<Multiaddr>,
    /// Largest message (frame) sent or accepted, in bytes.
    pub max_message: usize,
    /// How long an outbound request may take, and how long the application
    /// may take to answer an inbound one.
    pub request_timeout: Duration,
    /// Discover peers on the LAN with mDNS.
    pub mdns: bool,
    /// A Kademlia provider key to announce, e.g. `b"nnmesh/stages/v1"`.
    pub provide: Option<Vec<u8>>,
    /// Capacity of the inbound request queue; further requests are answered
    /// with [`ErrorKind::Overloaded`](nnmesh_protocol::message::ErrorKind::Overloaded).
    pub inbound_capacity: usize,
    /// A private mesh's pre-shared key: only peers with the same key can
    /// connect (libp2p's pnet, below noise).
    pub psk: Option<PreSharedKey>,
    /// How often each connection is pinged.
    pub ping_interval: Duration,
    /// A ping unanswered for this long closes the connection and reports
    /// the peer [`PeerEvent::Unresponsive`].
    pub ping_timeout: Duration,
}

impl Config {
    /// A configuration with defaults: listen on `127.0.0.1` port 0, no
    /// bootstrap, [`MAX_MESSAGE`], a 60 s request timeout, no mDNS, nothing
    /// provided, 64 queued inbound requests, no pre-shared key, and a ping
    /// every 2 s that fails after 8 s (so a hung peer is noticed within 10 s).
    pub fn new(keypair: Keypair) -> Config {
        Config {
            keypair,
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("valid multiaddr")],
            bootstrap: Vec::new(),
            max_message: MAX_MESSAGE,
            request_timeout: Duration::from_secs(60),
            mdns: false,
            provide: None,
            inbound_capacity: 64,
            psk: None,
            ping_interval: Duration::from_secs(2),
            ping_timeout: Duration::from_secs(8),
        }
    }
}

/// An inbound request, handed to the application.
#[derive(Debug)]
pub struct Inbound {
    /// The requesting peer.
    pub peer: PeerId,
    /// The raw request bytes (decoding them is the application's job).
    pub request: Vec<u8>,
    /// Where to send the encoded response. Dropping it, or not answering
    /// within the request timeout, answers with an
    /// [`ErrorKind::Internal`](nnmesh_protocol::message::ErrorKind::Internal)
    /// error.
    pub reply: oneshot::Sender<Vec<u8>>,
}

/// A change in a peer's reachability, as seen by this transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerEvent {
    /// The last connection to the peer closed (it may reconnect; an idle
    /// connection also closes, so a caller that needs the peer should dial it
    /// again to tell).
    Disconnected(PeerId),
    /// A ping to the peer went unanswered: its connection was closed.
    Unresponsive(PeerId),
}

impl PeerEvent {
    /// The peer concerned.
    pub fn peer(&self) -> PeerId {
        match *self {
            PeerEvent::Disconnected(p) | PeerEvent::Unresponsive(p) => p,
        }
    }
}

/// A failure of the transport itself.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Building the swarm failed.
    #[error("cannot build the swarm: {0}")]
    Build(String),
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
    /// A dial failed; nothing was sent.
    #[error("cannot dial {addr}: {reason}")]
    Dial {
        /// The address dialled.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
    /// The swarm task has stopped (after [`Endpoint::shutdown`]).
    #[error("the transport is shut down")]
    Shutdown,
}

/// Why a request got no response, and what that means for the remote side.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// No connection could be made: nothing was delivered.
    #[error("cannot reach {peer}: nothing was delivered")]
    DialFailure {
        /// The peer.
        peer: PeerId,
    },
    /// No response in time: the peer may have processed the request.
    #[error("request to {peer} timed out: the peer may have processed it")]
    Timeout {
        /// The peer.
        peer: PeerId,
    },
    /// The connection closed before the response: the peer may have
    /// processed the request.
    #[error("connection to {peer} closed before a response: the peer may have processed it")]
    ConnectionClosed {
        /// The peer.
        peer: PeerId,
    },
    /// The peer does not speak the stage protocol: nothing was processed.
    #[error("{peer} does not support the stage protocol: nothing was processed")]
    UnsupportedProtocol {
        /// The peer.
        peer: PeerId,
    },
    /// A frame exceeded a size limit. For an outgoing request over our own
    /// limit nothing was sent; for a response over it the peer processed the
    /// request.
    #[error("{what} of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// "request" or "response".
        what: &'static str,
        /// The frame's length.
        len: u64,
        /// The limit.
        max: usize,
    },
    /// The stream failed mid-way: the peer may have refused the frame (e.g.
    /// over its size limit, in which case it reset the stream without
    /// processing anything), or may have processed the request.
    #[error(
        "stream to {peer} failed: {message} (the peer may have refused an oversize frame, \
         or may have processed the request)"
    )]
    Io {
        /// The peer.
        peer: PeerId,
        /// The I/O error.
        message: String,
    },
    /// The transport is shut down: nothing was sent.
    #[error("the transport is shut down")]
    Shutdown,
}

pub(crate) enum Command {
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    Dial {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<PeerId, Error>>,
    },
    Request {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        bytes: Vec<u8>,
        reply: oneshot::Sender<Result<Vec<u8>, RequestError>>,
    },
    Providers {
        key: Vec<u8>,
        reply: oneshot::Sender<Vec<PeerId>>,
    },
    StopProviding(oneshot::Sender<()>),
    Shutdown(oneshot::Sender<()>),
}

/// A handle to a running swarm. Cheap to clone; all clones drive the same
/// swarm, which stops on [`shutdown`](Self::shutdown) or when the last clone
/// is dropped.
#[derive(Debug, Clone)]
pub struct Endpoint {
    peer_id: PeerId,
    max_message: usize,
    commands: mpsc::Sender<Command>,
    peer_events: broadcast::Sender<PeerEvent>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::ListenAddrs(_) => f.write_str("ListenAddrs"),
            Command::Dial { addr, .. } => write!(f, "Dial({addr})"),
            Command::Request { peer, bytes, .. } => {
                write!(f, "Request({peer}, {} bytes)", bytes.len())
            }
            Command::Providers { .. } => f.write_str("Providers"),
            Command::StopProviding(_) => f.write_str("StopProviding"),
            Command::Shutdown(_) => f.write_str("Shutdown"),
        }
    }
}

impl Endpoint {
    /// Builds the swarm, spawns its task on the current tokio runtime, and
    /// waits until every listen address is bound. Then dials the bootstrap
    /// peers (without waiting for them).
    ///
    /// # Errors
    /// [`Error::Build`] or [`Error::Listen`].
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub async fn start(cfg: Config) -> Result<(Endpoint, mpsc::Receiver<Inbound>), Error> {
        let peer_id = cfg.keypair.public().to_peer_id();
        let max_message = cfg.max_message.min(u32::MAX as usize);
        let server = !cfg.listen.is_empty();
        let (request_timeout, mdns) = (cfg.request_timeout, cfg.mdns);
        let behaviour = |key: &Keypair| {
            Behaviour::new(
                key,
                max_message,
                request_timeout,
                mdns,
                server,
                (cfg.ping_interval, cfg.ping_timeout),
            )
        };
        let mut swarm = build_swarm(cfg.keypair.clone(), cfg.psk, behaviour)?;
        let mut listeners = HashMap::new();
        for addr in &cfg.listen {
            let id = swarm.listen_on(addr.clone()).map_err(|e| Error::Listen {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
            listeners.insert(id, addr.clone());
        }

        let (commands, command_rx) = mpsc::channel(COMMAND_CAPACITY);
        let (peer_events, _) = broadcast::channel(PEER_EVENT_CAPACITY);
        let (inbound_tx, inbound_rx) = mpsc::channel(cfg.inbound_capacity.max(1));
        let (ready_tx, ready_rx) = oneshot::channel();
        let event_loop = EventLoop::new(
            swarm,
            command_rx,
            inbound_tx,
            ready_tx,
            peer_events.clone(),
            Settings {
                max_message,
                request_timeout,
                provide: cfg.provide,
                bootstrap: cfg.bootstrap,
                listeners,
            },
        );
        let span = info_span!("transport", peer = %peer_id);
        tokio::spawn(event_loop.run().instrument(span));

        match tokio::time::timeout(LISTEN_TIMEOUT, ready_rx).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => return Err(e),
            Ok(Err(_)) => return Err(Error::Shutdown),
            Err(_) => {
                return Err(Error::Build(format!(
                    "listeners not up after {LISTEN_TIMEOUT:?}"
                )));
            }
        }
        info!(peer = %peer_id, "transport started");
        Ok((
            Endpoint {
                peer_id,
                max_message,
                commands,
                peer_events,
            },
            inbound_rx,
        ))
    }

    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The concrete addresses this node listens on (port 0 resolved), each
    /// ending in `/p2p/<peer id>`. Empty after shutdown.
    pub async fn listen_addrs(&self) -> Vec<Multiaddr> {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::ListenAddrs(tx)).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Connects to `addr` and returns the peer id of the remote.
    ///
    /// # Errors
    /// [`Error::Dial`] if the connection fails,
    /// [`Error::Shutdown`] after shutdown.
    pub async fn dial(&self, addr: Multiaddr) -> Result<PeerId, Error> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Dial { addr, reply })
            .await
            .map_err(|_| Error::Shutdown)?;
        rx.await.map_err(|_| Error::Shutdown)?
    }

    /// Sends `bytes` to `peer` over the stage protocol and returns its
    /// response. `addrs` are added to the peer's known addresses and used to
    /// dial it if not connected.
    ///
    /// # Errors
    /// See [`RequestError`]: each variant says whether the peer may have
    /// processed the request.
    pub async fn request(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        bytes: Vec<u8>,
    ) -> Result<Vec<u8>, RequestError> {
        if bytes.len() > self.max_message {
            return Err(RequestError::TooLarge {
                what: "request",
                len: bytes.len() as u64,
                max: self.max_message,
            });
        }
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Request {
                peer,
                addrs,
                bytes,
                reply,
            })
            .await
            .map_err(|_| RequestError::Shutdown)?;
        rx.await.map_err(|_| RequestError::Shutdown)?
    }

    /// Asks the DHT which peers provide `key` (one Kademlia `get_providers`
    /// query). This node itself is never listed. An empty answer may just
    /// mean the DHT has not converged yet; callers retry.
    ///
    /// # Errors
    /// [`Error::Shutdown`] after shutdown.
    pub async fn providers(&self, key: Vec<u8>) -> Result<Vec<PeerId>, Error> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Providers { key, reply })
            .await
            .map_err(|_| Error::Shutdown)?;
        rx.await.map_err(|_| Error::Shutdown)
    }

    /// Subscribes to changes in peers' reachability (connections lost,
    /// pings unanswered).
    pub fn peer_events(&self) -> broadcast::Receiver<PeerEvent> {
        self.peer_events.subscribe()
    }

    /// Withdraws the provider record announced for
    /// [`Config::provide`], so discovery stops finding this node.
    pub async fn stop_providing(&self) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::StopProviding(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Stops the swarm: closes connections and listeners, fails pending
    /// requests with [`RequestError::Shutdown`]. Idempotent.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Builds the swarm: TCP (with the pre-shared key handshake first, for a
/// private mesh), noise, yamux, and `behaviour`.
fn build_swarm(
    keypair: Keypair,
    psk: Option<PreSharedKey>,
    behaviour: impl FnOnce(&Keypair) -> std::io::Result<Behaviour>,
) -> Result<Swarm<Behaviour>, Error> {
    let build = |e: &dyn std::fmt::Display| Error::Build(e.to_string());
    let tcp_config = tcp::Config::default().nodelay(true);
    let idle = |c: libp2p::swarm::Config| c.with_idle_connection_timeout(Duration::from_secs(60));
    let builder = libp2p::SwarmBuilder::with_existing_identity(keypair).with_tokio();
    Ok(match psk {
        None => builder
            .with_tcp(tcp_config, noise::Config::new, yamux::Config::default)
            .map_err(|e| build(&e))?
            .with_behaviour(|key| -> Result<Behaviour, BoxError> { Ok(behaviour(key)?) })
            .map_err(|e| build(&e))?
            .with_swarm_config(idle)
            .build(),
        Some(psk) => builder
            .with_other_transport(|key| -> Result<_, BoxError> {
                let noise = noise::Config::new(key)?;
                Ok(tcp::tokio::Transport::new(tcp_config)
                    .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
                    .upgrade(Version::V1Lazy)
                    .authenticate(noise)
                    .multiplex(yamux::Config::default()))
            })
            .map_err(|e| build(&e))?
            .with_behaviour(|key| -> Result<Behaviour, BoxError> { Ok(behaviour(key)?) })
            .map_err(|e| build(&e))?
            .with_swarm_config(idle)
            .build(),
    })
}
