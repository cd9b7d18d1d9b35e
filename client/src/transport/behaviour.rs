//! The composed libp2p behaviour of an nnmesh transport.

use std::time::Duration;

use libp2p::{
    StreamProtocol, identify,
    identity::Keypair,
    kad, mdns, ping, request_response,
    swarm::{NetworkBehaviour, behaviour::toggle::Toggle},
};
use nnmesh_protocol::STAGE_PROTOCOL;

use super::codec::Codec;

/// identify protocol version string of nnmesh peers.
pub const IDENTIFY_PROTOCOL: &str = "/nnmesh/id/1";

/// Kademlia protocol of the nnmesh DHT (separate from the public IPFS DHT).
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/nnmesh/kad/1");

/// Lifetime of a provider record in the DHT; re-published at half of it.
pub const PROVIDER_RECORD_TTL: Duration = Duration::from_secs(600);

/// The protocols every transport runs.
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    /// Exchanges listen addresses and protocols; feeds Kademlia.
    pub identify: identify::Behaviour,
    /// Liveness and RTT.
    pub ping: ping::Behaviour,
    /// Discovery: provider records for served stages.
    pub kad: kad::Behaviour<kad::store::MemoryStore>,
    /// LAN discovery, when enabled.
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    /// The stage protocol: length-prefixed raw bytes.
    pub stage: request_response::Behaviour<Codec>,
}

impl std::fmt::Debug for Behaviour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Behaviour").finish_non_exhaustive()
    }
}

impl Behaviour {
    /// Builds the behaviour for `keypair`.
    ///
    /// `server` puts Kademlia in server mode (answer DHT queries, be added to
    /// others' routing tables); auto mode would wait for a confirmed external
    /// address, which never comes on loopback or a LAN.
    ///
    /// # Errors
    /// If mDNS is requested and its socket cannot be opened.
    pub fn new(
        keypair: &Keypair,
        max_message: usize,
        request_timeout: Duration,
        mdns: bool,
        server: bool,
        (ping_interval, ping_timeout): (Duration, Duration),
    ) -> std::io::Result<Behaviour> {
        let peer_id = keypair.public().to_peer_id();
        let identify = identify::Behaviour::new(
            identify::Config::new(IDENTIFY_PROTOCOL.to_string(), keypair.public())
                .with_agent_version(format!("nnmesh/{}", env!("CARGO_PKG_VERSION"))),
        );

        let mut kad_config = kad::Config::new(KAD_PROTOCOL);
        // Stage providers come and go: short-lived records, re-published
        // often, so a dead node drops out of discovery within minutes (the
        // library defaults are 48 h and 12 h).
        kad_config.set_provider_record_ttl(Some(PROVIDER_RECORD_TTL));
        kad_config.set_provider_publication_interval(Some(PROVIDER_RECORD_TTL / 2));
        kad_config.set_query_timeout(
            request_timeout.clamp(Duration::from_secs(5), Duration::from_secs(60)),
        );
        let mut kad =
            kad::Behaviour::with_config(peer_id, kad::store::MemoryStore::new(peer_id), kad_config);
        kad.set_mode(Some(if server {
            kad::Mode::Server
        } else {
            kad::Mode::Client
        }));

        let mdns = if mdns {
            Some(mdns::tokio::Behaviour::new(
                mdns::Config::default(),
                peer_id,
            )?)
        } else {
            None
        };

        let stage = request_response::Behaviour::with_codec(
            Codec::new(max_message),
            [(
                StreamProtocol::new(STAGE_PROTOCOL),
                request_response::ProtocolSupport::Full,
            )],
            request_response::Config::default().with_request_timeout(request_timeout),
        );

        Ok(Behaviour {
            identify,
            ping: ping::Behaviour::new(
                ping::Config::new()
                    .with_interval(ping_interval)
                    .with_timeout(ping_timeout),
            ),
            kad,
            mdns: Toggle::from(mdns),
            stage,
        })
    }
}
