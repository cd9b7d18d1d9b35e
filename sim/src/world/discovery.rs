//! Discovery: what finding the holders of blocks returns, how long it
//! takes, and the control traffic it costs (see
//! [`Discovery`](crate::scenario::Discovery) for the two modes).

use std::{cmp::Reverse, collections::BinaryHeap};

use nnmesh_control::route::Candidate;
use nnmesh_protocol::{
    Span, codec,
    ids::ModelId,
    limits::Limits,
    message::Response,
    record::{SignedRecord, StageRecord},
};

use super::World;
use crate::{
    engine::Time,
    rng::mix,
    scenario::{DiscoveryMode, Scenario},
};

/// Bytes of an entry in a provider list (peer id and addresses).
const PROVIDER_BYTES: f64 = 100.0;
/// Bytes of a Kademlia request or of a `FIND_NODE` answer's entry.
const KAD_BYTES: f64 = 64.0;

/// Bytes of an `Info` answer and of one signed block record, from a real
/// record signed and encoded by the protocol crate.
pub(super) fn message_sizes(sc: &Scenario) -> (u64, u64) {
    let key = libp2p_identity::Keypair::ed25519_from_bytes([7; 32])
        .expect("any 32 bytes are an ed25519 secret");
    let record = StageRecord {
        peer: key.public().to_peer_id(),
        addrs: vec![
            "/ip4/203.0.113.7/tcp/4001".into(),
            "/ip6/2001:db8::7/tcp/4001".into(),
        ],
        model: ModelId::of_bytes(sc.model.name.as_bytes()),
        model_name: sc.model.name.clone(),
        num_layers: sc.model.blocks,
        span: Span::new(0, sc.model.blocks.min(10)),
        throughput: 123.4,
        load: 0.5,
        limits: Limits::default(),
        replication: sc.control.placement.replication,
        expires_at_ms: 1_800_000_000_000,
    };
    let signed = SignedRecord::sign(&record, &key);
    let info = codec::encode(&Response::Info {
        records: vec![signed.clone()],
        // A model manifest (the graph crate's; ~100 bytes encoded).
        manifest: vec![0; 100],
    });
    (info.len() as u64, codec::encode(&signed).len() as u64)
}

impl World {
    /// Charges and times one discovery of the holders of `span`, by node
    /// `node` or by session `session`; returns how long it takes.
    pub(super) fn discover_cost(
        &mut self,
        node: Option<u32>,
        session: Option<u32>,
        span: Span,
    ) -> Time {
        let place = match (node, session) {
            (Some(n), _) => self.nodes[n as usize].place,
            (None, Some(s)) => self.sessions[s as usize].place,
            (None, None) => unreachable!("a discovery has someone discovering"),
        };
        // A round trip to a random member, for each round of a lookup.
        let rtt = match self.random_member() {
            Some(m) => {
                self.one_way(&place, &self.nodes[m as usize].place)
                    + self.one_way(&place, &self.nodes[m as usize].place)
            }
            None => Time::from_ms(1.0),
        };
        // A provider query runs to the k closest; a block read stops at the
        // first storer that answers.
        let rounds = match self.sc.discovery.mode {
            DiscoveryMode::Providers => self.kad.rounds_per_lookup,
            DiscoveryMode::Blocks => self.kad.rounds_per_get,
        };
        let lookup = Time::from_secs(rtt.secs() * rounds.max(1.0));
        let d = self.sc.discovery.clone();
        let latency = match d.mode {
            DiscoveryMode::Providers => {
                self.lookup_cost(node, 1.0, "discover");
                let now = self.now();
                while self
                    .stale_providers
                    .peek()
                    .is_some_and(|Reverse(t)| *t <= now)
                {
                    self.stale_providers.pop();
                }
                let stale = self.stale_providers.len();
                let providers = self.serving.len() + stale;
                // Every answering provider serves an `Info`.
                self.info_calls += 1;
                self.key_ops[self.sc.model.blocks as usize].1 += 1.0;
                if let Some(n) = node {
                    let p = providers as f64;
                    let bytes = p * (self.info_bytes as f64 + KAD_BYTES) + p * PROVIDER_BYTES;
                    self.charge(n, p, bytes, "info (asked)");
                }
                // The calls run together: the slowest answer decides, and
                // a provider that vanished answers only by timing out.
                let mut slowest = Time::ZERO;
                for _ in 0..16 {
                    if let Some(m) = self.random_serving() {
                        let one = self.one_way(&place, &self.nodes[m as usize].place);
                        slowest = slowest.max(one + one);
                    }
                }
                if stale > 0 {
                    slowest = slowest.max(Time::from_secs(d.info_timeout_s));
                }
                lookup + slowest
            }
            DiscoveryMode::Blocks => {
                let blocks = f64::from(span.len());
                self.get_cost(node, blocks, "discover");
                for b in span.range() {
                    self.key_ops[b].1 += 1.0;
                }
                if let Some(n) = node {
                    let bytes = blocks * (16.0 + f64::from(d.sample) * self.record_bytes as f64);
                    self.charge(n, 0.0, bytes, "discover");
                }
                // The blocks' lookups run in parallel; one more round for
                // the slowest of them.
                lookup + rtt
            }
        };
        let latency = latency + Time::from_ms(d.overhead_ms);
        self.m.discoveries += 1;
        self.m.discovery_ms.push(latency.ms());
        latency
    }

    /// A random started, alive node (a DHT member), if any.
    fn random_member(&mut self) -> Option<u32> {
        if self.serving.is_empty() {
            return None;
        }
        self.random_serving()
    }

    fn random_serving(&mut self) -> Option<u32> {
        if self.serving.is_empty() {
            return None;
        }
        let i = self.rng_misc.below(self.serving.len() as u64) as usize;
        Some(self.serving[i])
    }

    /// Charges `lookups` Kademlia lookups: the initiator's RPCs (to `node`
    /// if a node initiates), the same served by the members.
    pub(super) fn lookup_cost(&mut self, node: Option<u32>, lookups: f64, kind: &'static str) {
        self.routing_cost(node, lookups * self.kad.rpcs_per_lookup, kind);
    }

    /// Charges `gets` block reads (each stops at the first storer).
    pub(super) fn get_cost(&mut self, node: Option<u32>, gets: f64, kind: &'static str) {
        self.routing_cost(node, gets * self.kad.rpcs_per_get, kind);
    }

    /// Charges `rpcs` Kademlia RPCs to the mesh, and to `node` if a node
    /// initiates them.
    fn routing_cost(&mut self, node: Option<u32>, rpcs: f64, kind: &'static str) {
        self.routing_rpcs += rpcs;
        if let Some(n) = node {
            self.charge(
                n,
                rpcs,
                rpcs * KAD_BYTES * f64::from(self.sc.discovery.k),
                kind,
            );
        }
    }

    /// Charges node `n` with RPCs and bytes of a kind.
    pub(super) fn charge(&mut self, n: u32, rpcs: f64, bytes: f64, kind: &'static str) {
        let node = &mut self.nodes[n as usize];
        node.rpcs += rpcs;
        node.bytes += bytes;
        self.kinds.add(kind, rpcs);
    }

    /// Charges each key's storers with the stores and reads since the last
    /// charge.
    pub(super) fn charge_storers(&mut self) {
        let k = f64::from(self.sc.discovery.k);
        let b = self.sc.model.blocks as usize;
        let sample = f64::from(self.sc.discovery.sample);
        for key in 0..=b {
            let (stores, gets) = std::mem::take(&mut self.key_ops[key]);
            if stores == 0.0 && gets == 0.0 {
                continue;
            }
            let (store_bytes, get_bytes) = if key == b {
                // The providers' key: a read returns every provider.
                (PROVIDER_BYTES, self.serving.len() as f64 * PROVIDER_BYTES)
            } else {
                (
                    self.record_bytes as f64,
                    16.0 + sample * self.record_bytes as f64,
                )
            };
            let storers = std::mem::take(&mut self.storers[key]);
            // Every store reaches all k storers; a read ends on one of them.
            let reads = gets / k;
            for &n in &storers {
                self.charge(n, stores, stores * store_bytes, "store (served)");
                self.charge(n, reads, reads * get_bytes, "read (served)");
            }
            if storers.is_empty() {
                self.kinds.add("store (served)", stores * k);
                self.kinds.add("read (served)", gets);
            }
            self.storers[key] = storers;
        }
    }

    /// Measures lookups on the current membership and finds each key's
    /// storers.
    pub(super) fn measure_lookups(&mut self) {
        self.charge_storers();
        let members: Vec<(u64, u32)> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.alive && n.started_at.is_some())
            .map(|(i, n)| (n.key, i as u32))
            .collect();
        self.kad.rebuild(members);
        let samples = self.sc.discovery.lookup_samples;
        self.kad.measure(&mut self.rng_misc, samples);
        let b = self.sc.model.blocks as usize;
        for key in 0..=b {
            self.storers[key] = if self.kad.len() == 0 {
                Vec::new()
            } else {
                self.kad.storers(mix(key as u64 ^ 0x6e6e_6d65_7368))
            };
        }
    }

    /// The candidates session `s` finds for `span`, and each one's node.
    pub(super) fn candidates(&mut self, s: u32, span: Span) -> (Vec<Candidate>, Vec<u32>) {
        let now = self.now();
        let sess = &self.sessions[s as usize];
        let place = sess.place;
        let dead = |n: u32| sess.dead.iter().any(|&(d, until)| d == n && now < until);
        let mut nodes: Vec<u32> = Vec::new();
        let mut cands = Vec::new();
        let km = self.sc.net.km_per_ms;
        match self.sc.discovery.mode {
            DiscoveryMode::Providers => {
                for &n in &self.serving {
                    if dead(n) {
                        continue;
                    }
                    let node = &self.nodes[n as usize];
                    let Some(held) = node.span else { continue };
                    cands.push(Candidate {
                        peer: node.peer,
                        span: held,
                        throughput: node.tp * held.len() as f32,
                        rtt_ms: (2.0 * place.one_way_ms(&node.place, km)) as f32,
                        load: node.load(self.sc.nodes.queue),
                    });
                    nodes.push(n);
                }
            }
            DiscoveryMode::Blocks => {
                let sample = self.sc.discovery.sample as usize;
                let mut ids: Vec<u32> = Vec::new();
                for b in span.range() {
                    let members = self.records.members(b);
                    if members.len() <= sample {
                        ids.extend_from_slice(members);
                    } else {
                        for _ in 0..sample {
                            let i = self.rng_misc.below(members.len() as u64) as usize;
                            ids.push(members[i]);
                        }
                    }
                }
                ids.sort_unstable();
                ids.dedup();
                let sess = &self.sessions[s as usize];
                let dead = |n: u32| sess.dead.iter().any(|&(d, until)| d == n && now < until);
                for id in ids {
                    let Some(rec) = self.records.get(id) else {
                        continue;
                    };
                    if dead(rec.node) {
                        continue;
                    }
                    let node = &self.nodes[rec.node as usize];
                    cands.push(Candidate {
                        peer: node.peer,
                        span: rec.span,
                        throughput: rec.tp * rec.span.len() as f32,
                        // Records carry network coordinates: RTT is
                        // estimated without contacting the holder.
                        rtt_ms: (2.0 * place.one_way_ms(&node.place, km)) as f32,
                        load: rec.load,
                    });
                    nodes.push(rec.node);
                }
            }
        }
        (cands, nodes)
    }
}

/// A min-heap of times.
pub(super) type TimeHeap = BinaryHeap<Reverse<Time>>;
