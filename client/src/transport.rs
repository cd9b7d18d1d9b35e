//! A libp2p swarm behind a cloneable handle: request-response over the stage
//! protocol, Kademlia provider discovery, identify, ping and optional mDNS.
//!
//! The swarm runs in its own tokio task. The [`Transport`] handle talks to it
//! through a bounded command channel; inbound requests come out of a bounded
//! [`Inbound`] channel and are answered through a oneshot, so the swarm loop
//! never waits on application work. When the inbound channel is full the
//! loop answers at once with [`ErrorKind::Overloaded`].

// The derive's generated `BehaviourEvent` carries no docs; everything
// written by hand in the module is documented.
#[allow(missing_docs)]
pub mod behaviour;
pub mod codec;

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use futures::{StreamExt, future::BoxFuture, stream::FuturesUnordered};
use libp2p::{
    Multiaddr, PeerId, Swarm,
    core::transport::ListenerId,
    identity::Keypair,
    kad, mdns, multiaddr::Protocol, noise, request_response,
    swarm::{ConnectionId, DialError, SwarmEvent, dial_opts::DialOpts},
    tcp, yamux,
};
use nnmesh_protocol::{
    codec::{MAX_MESSAGE, encode},
    message::{ErrorKind, Response, WireError},
};
use tokio::sync::{mpsc, oneshot};
use tracing::{Instrument, debug, info, info_span, trace, warn};

use self::behaviour::{Behaviour, BehaviourEvent, KAD_PROTOCOL};

/// How long [`Transport::start`] waits for its listeners to come up.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Capacity of the handle → swarm command channel.
const COMMAND_CAPACITY: usize = 256;
/// Minimum spacing of provider re-announcements after routing changes.
const REPROVIDE_DEBOUNCE: Duration = Duration::from_millis(500);

/// Settings of a [`Transport`].
#[derive(Debug, Clone)]
pub struct TransportConfig {
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
    /// with [`ErrorKind::Overloaded`].
    pub inbound_capacity: usize,
}

impl TransportConfig {
    /// A configuration with defaults: listen on `127.0.0.1` port 0, no
    /// bootstrap, [`MAX_MESSAGE`], a 60 s request timeout, no mDNS, nothing
    /// provided, 64 queued inbound requests.
    pub fn new(keypair: Keypair) -> TransportConfig {
        TransportConfig {
            keypair,
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("valid multiaddr")],
            bootstrap: Vec::new(),
            max_message: MAX_MESSAGE,
            request_timeout: Duration::from_secs(60),
            mdns: false,
            provide: None,
            inbound_capacity: 64,
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
    /// Where to send the encoded response. Dropping it answers with an
    /// [`ErrorKind::Internal`] error; not answering within the request
    /// timeout lets the request time out.
    pub reply: oneshot::Sender<Vec<u8>>,
}

/// A failure of the transport itself.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
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
    /// The swarm task has stopped (after [`Transport::shutdown`]).
    #[error("the transport is shut down")]
    Shutdown,
}

/// Why a request got no response, and what that means for the remote side.
#[derive(Debug, thiserror::Error)]
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
    /// The stream failed mid-way (e.g. the peer refused an oversize frame
    /// and reset it): the peer may have processed the request.
    #[error("stream to {peer} failed: {message}; the peer may have processed the request")]
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

enum Command {
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    Dial {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<PeerId, TransportError>>,
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
    Shutdown(oneshot::Sender<()>),
}

/// A handle to a running swarm. Cheap to clone; all clones drive the same
/// swarm, which stops on [`shutdown`](Self::shutdown) or when the last clone
/// is dropped.
#[derive(Debug, Clone)]
pub struct Transport {
    peer_id: PeerId,
    max_message: usize,
    commands: mpsc::Sender<Command>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::ListenAddrs(_) => f.write_str("ListenAddrs"),
            Command::Dial { addr, .. } => write!(f, "Dial({addr})"),
            Command::Request { peer, bytes, .. } => write!(f, "Request({peer}, {} bytes)", bytes.len()),
            Command::Providers { .. } => f.write_str("Providers"),
            Command::Shutdown(_) => f.write_str("Shutdown"),
        }
    }
}

impl Transport {
    /// Builds the swarm, spawns its task on the current tokio runtime, and
    /// waits until every listen address is bound. Then dials the bootstrap
    /// peers (without waiting for them).
    ///
    /// # Errors
    /// [`TransportError::Build`] or [`TransportError::Listen`].
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub async fn start(
        cfg: TransportConfig,
    ) -> Result<(Transport, mpsc::Receiver<Inbound>), TransportError> {
        let peer_id = cfg.keypair.public().to_peer_id();
        let max_message = cfg.max_message.min(u32::MAX as usize);
        let server = !cfg.listen.is_empty();
        let (request_timeout, mdns) = (cfg.request_timeout, cfg.mdns);
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(cfg.keypair.clone())
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )
            .map_err(|e| TransportError::Build(e.to_string()))?
            .with_behaviour(
                |key| -> Result<Behaviour, Box<dyn std::error::Error + Send + Sync>> {
                    Ok(Behaviour::new(key, max_message, request_timeout, mdns, server)?)
                },
            )
            .map_err(|e| TransportError::Build(e.to_string()))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
            .build();

        let mut listening = HashMap::new();
        for addr in &cfg.listen {
            let id = swarm
                .listen_on(addr.clone())
                .map_err(|e| TransportError::Listen {
                    addr: addr.clone(),
                    reason: e.to_string(),
                })?;
            listening.insert(id, addr.clone());
        }

        let (commands, command_rx) = mpsc::channel(COMMAND_CAPACITY);
        let (inbound_tx, inbound_rx) = mpsc::channel(cfg.inbound_capacity.max(1));
        let (ready_tx, ready_rx) = oneshot::channel();
        let event_loop = EventLoop {
            swarm,
            commands: command_rx,
            inbound: inbound_tx,
            max_message,
            request_timeout,
            provide: cfg.provide.map(|key| kad::RecordKey::new(&key)),
            reprovide_at: None,
            bootstrap: cfg.bootstrap,
            listening,
            ready: Some(ready_tx),
            pending_replies: FuturesUnordered::new(),
            requests: HashMap::new(),
            dials: HashMap::new(),
            providers: HashMap::new(),
            bootstrapped: false,
        };
        let span = info_span!("transport", peer = %peer_id);
        tokio::spawn(event_loop.run().instrument(span));

        match tokio::time::timeout(LISTEN_TIMEOUT, ready_rx).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => return Err(e),
            Ok(Err(_)) => return Err(TransportError::Shutdown),
            Err(_) => {
                return Err(TransportError::Build(format!(
                    "listeners not up after {LISTEN_TIMEOUT:?}"
                )));
            }
        }
        info!(peer = %peer_id, "transport started");
        Ok((
            Transport {
                peer_id,
                max_message,
                commands,
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
    /// [`TransportError::Dial`] if the connection fails,
    /// [`TransportError::Shutdown`] after shutdown.
    pub async fn dial(&self, addr: Multiaddr) -> Result<PeerId, TransportError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Dial { addr, reply })
            .await
            .map_err(|_| TransportError::Shutdown)?;
        rx.await.map_err(|_| TransportError::Shutdown)?
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
    /// [`TransportError::Shutdown`] after shutdown.
    pub async fn providers(&self, key: Vec<u8>) -> Result<Vec<PeerId>, TransportError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Providers { key, reply })
            .await
            .map_err(|_| TransportError::Shutdown)?;
        rx.await.map_err(|_| TransportError::Shutdown)
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

/// An inbound request waiting for the application's reply.
type PendingReply = BoxFuture<
    'static,
    (
        PeerId,
        request_response::ResponseChannel<Vec<u8>>,
        Result<Vec<u8>, WireError>,
    ),
>;

struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    inbound: mpsc::Sender<Inbound>,
    max_message: usize,
    request_timeout: Duration,
    provide: Option<kad::RecordKey>,
    /// When to (re-)announce `provide`: set on routing changes, debounced.
    reprovide_at: Option<tokio::time::Instant>,
    bootstrap: Vec<Multiaddr>,
    /// Listeners that have not reported an address yet.
    listening: HashMap<ListenerId, Multiaddr>,
    ready: Option<oneshot::Sender<Result<(), TransportError>>>,
    pending_replies: FuturesUnordered<PendingReply>,
    requests: HashMap<
        request_response::OutboundRequestId,
        (PeerId, oneshot::Sender<Result<Vec<u8>, RequestError>>),
    >,
    dials: HashMap<ConnectionId, (Multiaddr, oneshot::Sender<Result<PeerId, TransportError>>)>,
    providers: HashMap<kad::QueryId, (HashSet<PeerId>, oneshot::Sender<Vec<PeerId>>)>,
    bootstrapped: bool,
}

fn overloaded() -> Vec<u8> {
    encode(&Response::Error(WireError::new(
        ErrorKind::Overloaded,
        "inbound queue full; retry later or elsewhere (nothing was run)",
    )))
}

impl EventLoop {
    async fn run(mut self) {
        if self.listening.is_empty() {
            self.become_ready();
        }
        loop {
            let reprovide = async {
                match self.reprovide_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = self.commands.recv() => match command {
                    Some(Command::Shutdown(done)) => {
                        self.close();
                        let _ = done.send(());
                        return;
                    }
                    Some(command) => self.on_command(command),
                    None => {
                        debug!("all handles dropped");
                        self.close();
                        return;
                    }
                },
                Some((peer, channel, reply)) = self.pending_replies.next(),
                    if !self.pending_replies.is_empty() => self.respond(peer, channel, reply),
                () = reprovide => self.announce(),
            }
        }
    }

    fn become_ready(&mut self) {
        if let Some(ready) = self.ready.take() {
            let _ = ready.send(Ok(()));
            // Join the mesh only once we can be reached back.
            for addr in std::mem::take(&mut self.bootstrap) {
                debug!(%addr, "dialling bootstrap peer");
                if let Err(e) = self.swarm.dial(addr.clone()) {
                    warn!(%addr, error = %e, "bootstrap dial failed");
                }
            }
            if self.provide.is_some() {
                self.announce();
            }
        }
    }

    fn close(&mut self) {
        for (_, (_, reply)) in self.requests.drain() {
            let _ = reply.send(Err(RequestError::Shutdown));
        }
        for (_, (_, reply)) in self.dials.drain() {
            let _ = reply.send(Err(TransportError::Shutdown));
        }
        for (_, (found, reply)) in self.providers.drain() {
            let _ = reply.send(found.into_iter().collect());
        }
        let listeners: Vec<ListenerId> = self.listening.keys().copied().collect();
        for id in listeners {
            self.swarm.remove_listener(id);
        }
        info!("transport shut down");
    }

    fn announce(&mut self) {
        self.reprovide_at = None;
        if let Some(key) = self.provide.clone() {
            match self.swarm.behaviour_mut().kad.start_providing(key) {
                Ok(query) => trace!(?query, "announcing provider record"),
                Err(e) => warn!(error = %e, "cannot store provider record"),
            }
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::ListenAddrs(reply) => {
                let me = *self.swarm.local_peer_id();
                let addrs = self
                    .swarm
                    .listeners()
                    .map(|a| a.clone().with(Protocol::P2p(me)))
                    .collect();
                let _ = reply.send(addrs);
            }
            Command::Dial { addr, reply } => {
                let opts = match addr.iter().last() {
                    Some(Protocol::P2p(peer)) => DialOpts::peer_id(peer)
                        .addresses(vec![addr.clone()])
                        .build(),
                    _ => DialOpts::unknown_peer_id().address(addr.clone()).build(),
                };
                let connection = opts.connection_id();
                match self.swarm.dial(opts) {
                    Ok(()) => {
                        self.dials.insert(connection, (addr, reply));
                    }
                    // Already connected to a peer given by id: report it.
                    Err(DialError::DialPeerConditionFalse(_)) => {
                        if let Some(Protocol::P2p(peer)) = addr.iter().last() {
                            let _ = reply.send(Ok(peer));
                        }
                    }
                    Err(e) => {
                        let _ = reply.send(Err(TransportError::Dial {
                            addr,
                            reason: e.to_string(),
                        }));
                    }
                }
            }
            Command::Request {
                peer,
                addrs,
                bytes,
                reply,
            } => {
                for addr in &addrs {
                    self.swarm.add_peer_address(peer, addr.clone());
                }
                let len = bytes.len();
                let id = self
                    .swarm
                    .behaviour_mut()
                    .stage
                    .send_request_with_addresses(&peer, bytes, addrs);
                debug!(%peer, request = ?id, len, "outbound request");
                self.requests.insert(id, (peer, reply));
            }
            Command::Providers { key, reply } => {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .get_providers(kad::RecordKey::new(&key));
                self.providers.insert(id, (HashSet::new(), reply));
            }
            Command::Shutdown(_) => unreachable!("handled in run"),
        }
    }

    fn respond(
        &mut self,
        peer: PeerId,
        channel: request_response::ResponseChannel<Vec<u8>>,
        reply: Result<Vec<u8>, WireError>,
    ) {
        let bytes = match reply {
            Ok(bytes) if bytes.len() > self.max_message => {
                warn!(%peer, len = bytes.len(), max = self.max_message, "response too large");
                encode(&Response::Error(WireError::new(
                    ErrorKind::TooLarge,
                    format!(
                        "response of {} bytes exceeds the limit of {} bytes",
                        bytes.len(),
                        self.max_message
                    ),
                )))
            }
            Ok(bytes) => bytes,
            Err(error) => encode(&Response::Error(error)),
        };
        if self
            .swarm
            .behaviour_mut()
            .stage
            .send_response(channel, bytes)
            .is_err()
        {
            debug!(%peer, "requester gone before the response");
        }
    }

    fn on_inbound(
        &mut self,
        peer: PeerId,
        request: Vec<u8>,
        channel: request_response::ResponseChannel<Vec<u8>>,
    ) {
        let (reply, reply_rx) = oneshot::channel();
        let len = request.len();
        match self.inbound.try_send(Inbound {
            peer,
            request,
            reply,
        }) {
            Ok(()) => {
                trace!(%peer, len, "inbound request queued");
                let timeout = self.request_timeout;
                self.pending_replies.push(Box::pin(async move {
                    let reply = match tokio::time::timeout(timeout, reply_rx).await {
                        Ok(Ok(bytes)) => Ok(bytes),
                        Ok(Err(_)) => Err(WireError::new(
                            ErrorKind::Internal,
                            "the request was dropped without a reply",
                        )),
                        Err(_) => Err(WireError::new(
                            ErrorKind::Internal,
                            format!("no reply within {timeout:?}"),
                        )),
                    };
                    (peer, channel, reply)
                }));
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                debug!(%peer, len, "inbound queue full; answering Overloaded");
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .stage
                    .send_response(channel, overloaded());
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                let _ = self.swarm.behaviour_mut().stage.send_response(
                    channel,
                    encode(&Response::Error(WireError::new(
                        ErrorKind::Internal,
                        "this peer is not accepting requests",
                    ))),
                );
            }
        }
    }

    fn on_outbound_failure(
        &mut self,
        peer: PeerId,
        id: request_response::OutboundRequestId,
        error: request_response::OutboundFailure,
    ) {
        use request_response::OutboundFailure as F;
        let Some((_, reply)) = self.requests.remove(&id) else {
            return;
        };
        let error = match error {
            F::DialFailure => RequestError::DialFailure { peer },
            F::Timeout => RequestError::Timeout { peer },
            F::ConnectionClosed => RequestError::ConnectionClosed { peer },
            F::UnsupportedProtocols => RequestError::UnsupportedProtocol { peer },
            F::Io(e) => match codec::frame_too_large(&e) {
                Some(t) => RequestError::TooLarge {
                    what: "response",
                    len: t.len,
                    max: t.max,
                },
                None => RequestError::Io {
                    peer,
                    message: e.to_string(),
                },
            },
        };
        debug!(%peer, request = ?id, error = %error, "outbound request failed");
        let _ = reply.send(Err(error));
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                debug!(%address, "listening");
                if self.listening.contains_key(&listener_id) && self.ready.is_some() {
                    // Keep the id (for shutdown) but mark it as up.
                    self.listening.insert(listener_id, Multiaddr::empty());
                    if self.listening.values().all(|a| a.is_empty()) {
                        self.become_ready();
                    }
                }
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => {
                if let Some(addr) = self.listening.remove(&listener_id)
                    && let Some(ready) = self.ready.take()
                {
                    let reason = match reason {
                        Ok(()) => "closed".to_string(),
                        Err(e) => e.to_string(),
                    };
                    let _ = ready.send(Err(TransportError::Listen { addr, reason }));
                }
            }
            SwarmEvent::ListenerError { listener_id, error } => {
                warn!(?listener_id, %error, "listener error");
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                debug!(peer = %peer_id, addr = %endpoint.get_remote_address(), "connected");
                if let Some((_, reply)) = self.dials.remove(&connection_id) {
                    let _ = reply.send(Ok(peer_id));
                }
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => {
                debug!(peer = ?peer_id, %error, "outgoing connection failed");
                if let Some((addr, reply)) = self.dials.remove(&connection_id) {
                    let _ = reply.send(Err(TransportError::Dial {
                        addr,
                        reason: error.to_string(),
                    }));
                }
            }
            SwarmEvent::ConnectionClosed { peer_id, cause, .. } => {
                debug!(peer = %peer_id, cause = ?cause, "disconnected");
            }
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event),
            _ => {}
        }
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Stage(event) => self.on_stage_event(event),
            BehaviourEvent::Identify(libp2p::identify::Event::Received { peer_id, info, .. }) => {
                if info.protocols.contains(&KAD_PROTOCOL) {
                    let kad = &mut self.swarm.behaviour_mut().kad;
                    for addr in info.listen_addrs {
                        kad.add_address(&peer_id, addr);
                    }
                }
            }
            BehaviourEvent::Kad(event) => self.on_kad_event(event),
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                for (peer, addr) in found {
                    debug!(%peer, %addr, "mdns discovered");
                    self.swarm.add_peer_address(peer, addr.clone());
                    if !self.swarm.is_connected(&peer) {
                        let _ = self.swarm.dial(DialOpts::peer_id(peer).addresses(vec![addr]).build());
                    }
                }
            }
            _ => {}
        }
    }

    fn on_stage_event(&mut self, event: request_response::Event<Vec<u8>, Vec<u8>>) {
        use request_response::{Event, Message};
        match event {
            Event::Message {
                peer,
                message:
                    Message::Request {
                        request, channel, ..
                    },
                ..
            } => self.on_inbound(peer, request, channel),
            Event::Message {
                peer,
                message:
                    Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                trace!(%peer, request = ?request_id, len = response.len(), "response");
                if let Some((_, reply)) = self.requests.remove(&request_id) {
                    let _ = reply.send(Ok(response));
                }
            }
            Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => self.on_outbound_failure(peer, request_id, error),
            Event::InboundFailure { peer, error, .. } => {
                // E.g. an oversize or truncated frame; the requester sees its
                // stream fail. Everyone else is unaffected.
                debug!(%peer, %error, "inbound request failed");
            }
            Event::ResponseSent { .. } => {}
        }
    }

    fn on_kad_event(&mut self, event: kad::Event) {
        match event {
            kad::Event::RoutingUpdated {
                peer, is_new_peer, ..
            } => {
                trace!(%peer, is_new_peer, "kad routing updated");
                if is_new_peer {
                    if !self.bootstrapped {
                        self.bootstrapped = true;
                        let _ = self.swarm.behaviour_mut().kad.bootstrap();
                    }
                    if self.provide.is_some() && self.reprovide_at.is_none() {
                        self.reprovide_at =
                            Some(tokio::time::Instant::now() + REPROVIDE_DEBOUNCE);
                    }
                }
            }
            kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::GetProviders(result),
                step,
                ..
            } => {
                let me = *self.swarm.local_peer_id();
                let done = match result {
                    Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) => {
                        if let Some((found, _)) = self.providers.get_mut(&id) {
                            found.extend(providers.into_iter().filter(|p| *p != me));
                        }
                        step.last
                    }
                    Ok(kad::GetProvidersOk::FinishedWithNoAdditionalRecord { .. }) => true,
                    Err(e) => {
                        debug!(error = %e, "provider query failed");
                        true
                    }
                };
                if done && let Some((found, reply)) = self.providers.remove(&id) {
                    let mut found: Vec<PeerId> = found.into_iter().collect();
                    found.sort();
                    let _ = reply.send(found);
                }
            }
            kad::Event::OutboundQueryProgressed {
                result: kad::QueryResult::StartProviding(result),
                ..
            } => match result {
                Ok(_) => trace!("provider record announced"),
                Err(e) => debug!(error = %e, "provider announcement incomplete"),
            },
            _ => {}
        }
    }
}
