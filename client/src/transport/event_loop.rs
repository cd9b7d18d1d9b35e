//! The swarm task behind a [`Endpoint`](super::Transport): owns the swarm,
//! serves commands from the handles, hands inbound requests to the
//! application and sends its replies, without ever awaiting application work.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use futures::{StreamExt, future::BoxFuture, stream::FuturesUnordered};
use libp2p::{
    Multiaddr, PeerId, Swarm,
    core::transport::ListenerId,
    kad, mdns,
    multiaddr::Protocol,
    request_response,
    swarm::{
        ConnectionId, DialError, SwarmEvent,
        dial_opts::{DialOpts, PeerCondition},
    },
};
use nnmesh_protocol::{
    codec::encode,
    message::{ErrorKind, Response, WireError},
};
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{debug, info, trace, warn};

use super::{
    Command, Error, Inbound, PeerEvent, RequestError,
    behaviour::{Behaviour, BehaviourEvent, KAD_PROTOCOL},
    codec,
};

/// Minimum spacing of provider re-announcements after routing changes.
const REPROVIDE_DEBOUNCE: Duration = Duration::from_millis(500);

/// An inbound request waiting for the application's reply.
type PendingReply = BoxFuture<
    'static,
    (
        PeerId,
        request_response::ResponseChannel<Vec<u8>>,
        Result<Vec<u8>, WireError>,
    ),
>;

/// Where an outbound request's outcome goes.
type ResponseTx = oneshot::Sender<Result<Vec<u8>, RequestError>>;

/// The state of the swarm task.
pub(super) struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    inbound: mpsc::Sender<Inbound>,
    max_message: usize,
    request_timeout: Duration,
    provide: Option<kad::RecordKey>,
    /// When to (re-)announce `provide`: set on routing changes, debounced.
    reprovide_at: Option<tokio::time::Instant>,
    bootstrap: Vec<Multiaddr>,
    /// Listeners that have not reported an address yet; `start` returns
    /// once this is empty.
    pending_listeners: HashMap<ListenerId, Multiaddr>,
    ready: Option<oneshot::Sender<Result<(), Error>>>,
    pending_replies: FuturesUnordered<PendingReply>,
    requests: HashMap<request_response::OutboundRequestId, ResponseTx>,
    dials: HashMap<ConnectionId, (Multiaddr, oneshot::Sender<Result<PeerId, Error>>)>,
    providers: HashMap<kad::QueryId, (HashSet<PeerId>, oneshot::Sender<Vec<PeerId>>)>,
    bootstrapped: bool,
    peer_events: broadcast::Sender<PeerEvent>,
}

fn overloaded() -> Vec<u8> {
    encode(&Response::Error(WireError::new(
        ErrorKind::Overloaded,
        "inbound queue full; retry later or elsewhere (nothing was run)",
    )))
}

/// What [`EventLoop::new`] needs besides the swarm and channels.
#[derive(Debug)]
pub(super) struct Settings {
    pub(super) max_message: usize,
    pub(super) request_timeout: Duration,
    pub(super) provide: Option<Vec<u8>>,
    pub(super) bootstrap: Vec<Multiaddr>,
    /// Listeners started on the swarm, with the address each was asked for.
    pub(super) listeners: HashMap<ListenerId, Multiaddr>,
}

impl EventLoop {
    /// A loop over `swarm`; `ready` fires once every listener is up (or one
    /// failed).
    pub(super) fn new(
        swarm: Swarm<Behaviour>,
        commands: mpsc::Receiver<Command>,
        inbound: mpsc::Sender<Inbound>,
        ready: oneshot::Sender<Result<(), Error>>,
        peer_events: broadcast::Sender<PeerEvent>,
        settings: Settings,
    ) -> EventLoop {
        EventLoop {
            swarm,
            commands,
            inbound,
            max_message: settings.max_message,
            request_timeout: settings.request_timeout,
            provide: settings.provide.map(|key| kad::RecordKey::new(&key)),
            reprovide_at: None,
            bootstrap: settings.bootstrap,
            pending_listeners: settings.listeners,
            ready: Some(ready),
            pending_replies: FuturesUnordered::new(),
            requests: HashMap::new(),
            dials: HashMap::new(),
            providers: HashMap::new(),
            bootstrapped: false,
            peer_events,
        }
    }

    /// Runs until shutdown or until every handle is dropped. Dropping the
    /// swarm at the end closes its listeners and connections.
    pub(super) async fn run(mut self) {
        if self.pending_listeners.is_empty() {
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
        for (_, reply) in self.requests.drain() {
            let _ = reply.send(Err(RequestError::Shutdown));
        }
        for (_, (_, reply)) in self.dials.drain() {
            let _ = reply.send(Err(Error::Shutdown));
        }
        for (_, (found, reply)) in self.providers.drain() {
            let _ = reply.send(found.into_iter().collect());
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
                    // Dial unless connected, even while another dial (e.g.
                    // the bootstrap one) is in flight: its outcome is not
                    // reported to this caller, and "dialling" is no answer.
                    Some(Protocol::P2p(peer)) => DialOpts::peer_id(peer)
                        .condition(PeerCondition::Disconnected)
                        .addresses(vec![addr.clone()])
                        .build(),
                    _ => DialOpts::unknown_peer_id().address(addr.clone()).build(),
                };
                let connection = opts.connection_id();
                match self.swarm.dial(opts) {
                    Ok(()) => {
                        self.dials.insert(connection, (addr, reply));
                    }
                    // Connected to a peer given by id already: report it.
                    Err(DialError::DialPeerConditionFalse(_)) => {
                        if let Some(Protocol::P2p(peer)) = addr.iter().last() {
                            let _ = reply.send(Ok(peer));
                        }
                    }
                    Err(e) => {
                        let _ = reply.send(Err(Error::Dial {
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
                self.requests.insert(id, reply);
            }
            Command::Providers { key, reply } => {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .get_providers(kad::RecordKey::new(&key));
                self.providers.insert(id, (HashSet::new(), reply));
            }
            Command::StopProviding(done) => {
                if let Some(key) = self.provide.take() {
                    self.swarm.behaviour_mut().kad.stop_providing(&key);
                    self.reprovide_at = None;
                    info!("provider record withdrawn");
                }
                let _ = done.send(());
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
        let Some(reply) = self.requests.remove(&id) else {
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
                if self.pending_listeners.remove(&listener_id).is_some()
                    && self.pending_listeners.is_empty()
                {
                    self.become_ready();
                }
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => {
                if let Some(addr) = self.pending_listeners.remove(&listener_id)
                    && let Some(ready) = self.ready.take()
                {
                    let reason = match reason {
                        Ok(()) => "closed".to_string(),
                        Err(e) => e.to_string(),
                    };
                    let _ = ready.send(Err(Error::Listen { addr, reason }));
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
                    let _ = reply.send(Err(Error::Dial {
                        addr,
                        reason: error.to_string(),
                    }));
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                cause,
                num_established,
                ..
            } => {
                debug!(peer = %peer_id, cause = ?cause, num_established, "disconnected");
                if num_established == 0 {
                    // No subscriber is fine: nobody is watching.
                    let _ = self.peer_events.send(PeerEvent::Disconnected(peer_id));
                }
            }
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event),
            _ => {}
        }
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Stage(event) => self.on_stage_event(event),
            BehaviourEvent::Identify(libp2p::identify::Event::Received {
                peer_id, info, ..
            }) if info.protocols.contains(&KAD_PROTOCOL) => {
                let kad = &mut self.swarm.behaviour_mut().kad;
                for addr in info.listen_addrs {
                    kad.add_address(&peer_id, addr);
                }
            }
            BehaviourEvent::Kad(event) => self.on_kad_event(event),
            BehaviourEvent::Ping(libp2p::ping::Event {
                peer,
                connection,
                result: Err(error),
            }) => {
                // libp2p's ping only reports; a peer that stopped answering
                // is cut off here, so requests to it fail instead of waiting.
                warn!(%peer, %error, "ping failed; closing the connection");
                let _ = self.peer_events.send(PeerEvent::Unresponsive(peer));
                self.swarm.close_connection(connection);
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                for (peer, addr) in found {
                    debug!(%peer, %addr, "mdns discovered");
                    self.swarm.add_peer_address(peer, addr.clone());
                    if !self.swarm.is_connected(&peer) {
                        let _ = self
                            .swarm
                            .dial(DialOpts::peer_id(peer).addresses(vec![addr]).build());
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
                if let Some(reply) = self.requests.remove(&request_id) {
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
                        self.reprovide_at = Some(tokio::time::Instant::now() + REPROVIDE_DEBOUNCE);
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
