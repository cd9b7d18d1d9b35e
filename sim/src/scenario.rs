//! Scenario files: every parameter of the models, with its default.
//!
//! A scenario is a TOML file. Every section and field is optional and
//! defaults to the values documented here (an internet-like mesh of 1,000
//! nodes serving an 80-block Llama-70B-like model); unknown fields are
//! errors, so a typo never goes unnoticed. A `[[sweep]]` list turns one
//! file into several runs, each overriding fields by their dotted path:
//!
//! ```toml
//! name = "example"
//! duration_s = 600
//! [nodes]
//! count = 200
//! [[sweep]]
//! label = "R=1"
//! set = { "control.placement.replication" = 1 }
//! [[sweep]]
//! label = "R=2"
//! set = { "control.placement.replication" = 2 }
//! ```

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Why a scenario could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML, or a field is unknown or mistyped.
    #[error("{what}: {message}")]
    Parse {
        /// The file, or the sweep entry.
        what: String,
        /// The parser's message (it names the field).
        message: String,
    },
    /// A value is out of range.
    #[error("{what}: {message}")]
    Invalid {
        /// The file, or the sweep entry.
        what: String,
        /// What is wrong.
        message: String,
    },
}

/// One simulation's parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Scenario {
    /// The scenario's name (the output folder is named after it).
    pub name: String,
    /// What it shows, for the summary.
    pub description: String,
    /// The seed of every random draw.
    pub seed: u64,
    /// Simulated time, seconds.
    pub duration_s: f64,
    /// Sessions that start before this time run but are not counted.
    pub warmup_s: f64,
    /// How often coverage is sampled (and checked), seconds.
    pub sample_every_s: f64,
    /// The model served.
    pub model: Model,
    /// The nodes serving it.
    pub nodes: Nodes,
    /// Latency and bandwidth.
    pub net: Net,
    /// Departures, joins and injected failures.
    pub churn: Churn,
    /// The clients.
    pub workload: Workload,
    /// The control machines' settings.
    pub control: Control,
    /// How nodes and clients find the holders of blocks.
    pub discovery: Discovery,
    /// Runs that override some fields (empty: one run of the scenario).
    pub sweep: Vec<SweepRun>,
    /// Plots drawn from the runs.
    pub plots: Vec<Plot>,
    /// Figures measured on a real mesh, to compare the runs with.
    pub calibration: Vec<Target>,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            name: "scenario".into(),
            description: String::new(),
            seed: 1,
            duration_s: 3600.0,
            warmup_s: 0.0,
            sample_every_s: 30.0,
            model: Model::default(),
            nodes: Nodes::default(),
            net: Net::default(),
            churn: Churn::default(),
            workload: Workload::default(),
            control: Control::default(),
            discovery: Discovery::default(),
            sweep: Vec::new(),
            plots: Vec::new(),
            calibration: Vec::new(),
        }
    }
}

/// The model: a stack of identical blocks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Model {
    /// Its name, for the summary.
    pub name: String,
    /// Decoder blocks.
    pub blocks: u32,
    /// Hidden size: a token's activation is `hidden × dtype_bytes` bytes.
    pub hidden: u32,
    /// Bytes per activation element on the wire.
    pub dtype_bytes: u32,
    /// One block's weights, GB (decides how many blocks a node holds).
    pub block_gb: f64,
}

impl Default for Model {
    /// Llama-2-70B-like: 80 blocks, hidden 8192, fp16 weights (~0.86 B
    /// parameters, 1.7 GB per block).
    fn default() -> Self {
        Model {
            name: "llama-70b-like".into(),
            blocks: 80,
            hidden: 8192,
            dtype_bytes: 2,
            block_gb: 1.7,
        }
    }
}

/// The nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Nodes {
    /// Nodes at the start (kept near this by joins, see [`Churn`]).
    pub count: u32,
    /// The initial nodes join uniformly over this many seconds (0: all at
    /// once).
    pub join_over_s: f64,
    /// Hardware classes, drawn by `share`.
    pub profiles: Vec<Profile>,
    /// Steps a node admits at once (queued or running); more are refused
    /// as overloaded (the node's `--queue`).
    pub queue: u32,
    /// Decode steps run together in one forward, at most.
    pub max_batch: u32,
    /// Each further step in a batch adds this fraction of one step's time.
    pub batch_growth: f64,
    /// Fixed cost of every forward a node runs (framework, graph
    /// interpreter, messages), ms.
    pub step_overhead_ms: f64,
    /// Seconds from a node's start to its first placement decision (process
    /// start, joining the DHT).
    pub startup_s: f64,
    /// Pinned spans `[start, end)`, one per node in order (placement rule
    /// `pinned`); nodes past the list are placed by the rule `window`.
    pub pinned: Vec<[u32; 2]>,
}

impl Default for Nodes {
    fn default() -> Self {
        Nodes {
            count: 1000,
            join_over_s: 600.0,
            profiles: Profile::internet_mix(),
            queue: 8,
            max_batch: 8,
            batch_growth: 0.1,
            step_overhead_ms: 2.0,
            startup_s: 10.0,
            pinned: Vec::new(),
        }
    }
}

/// A hardware class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Profile {
    /// Its name.
    pub name: String,
    /// Relative share of nodes of this class.
    pub share: f64,
    /// Memory for weights, GB: the node holds `memory_gb / block_gb`
    /// blocks (at least 1, at most the model).
    pub memory_gb: f64,
    /// Blocks held, overriding `memory_gb` when set.
    pub blocks: Option<u32>,
    /// One decode step (one token per row) through one block, ms.
    pub decode_ms_per_block: f64,
    /// One prompt token through one block in a prefill, ms.
    pub prefill_ms_per_token_block: f64,
    /// Uplink, Mbit/s.
    pub up_mbps: f64,
    /// Downlink, Mbit/s.
    pub down_mbps: f64,
    /// Seconds to load one block's weights.
    pub load_s_per_block: f64,
}

impl Default for Profile {
    fn default() -> Self {
        Profile {
            name: "gpu".into(),
            share: 1.0,
            memory_gb: 20.0,
            blocks: None,
            decode_ms_per_block: 2.4,
            prefill_ms_per_token_block: 0.06,
            up_mbps: 100.0,
            down_mbps: 500.0,
            load_s_per_block: 2.0,
        }
    }
}

impl Profile {
    /// A volunteer mix: consumer GPUs, some data-centre GPUs, a few CPU
    /// servers. Decode times are memory-bound (1.7 GB per block over the
    /// card's bandwidth, plus ~30%); prefill times compute-bound (1.7
    /// GFLOP per token per block at 40–50% of peak).
    pub fn internet_mix() -> Vec<Profile> {
        let p = |name: &str, share, memory_gb, decode, prefill, up, down, load| Profile {
            name: name.into(),
            share,
            memory_gb,
            blocks: None,
            decode_ms_per_block: decode,
            prefill_ms_per_token_block: prefill,
            up_mbps: up,
            down_mbps: down,
            load_s_per_block: load,
        };
        vec![
            p("rtx3090-24g", 0.45, 20.0, 2.4, 0.06, 50.0, 300.0, 8.0),
            p("rtx3060-12g", 0.25, 10.0, 6.0, 0.17, 20.0, 100.0, 12.0),
            p("a100-80g", 0.10, 72.0, 1.1, 0.011, 1000.0, 1000.0, 2.0),
            p("a6000-48g", 0.12, 42.0, 2.8, 0.03, 500.0, 1000.0, 3.0),
            p("cpu-64g", 0.08, 48.0, 25.0, 1.0, 200.0, 1000.0, 4.0),
        ]
    }
}

/// Where nodes and clients are, and their links.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Net {
    /// Regions, drawn by `share`; a host lies within `radius_km` of its
    /// region's centre.
    pub regions: Vec<Region>,
    /// Effective one-way propagation, km per ms (fibre is ~200; paths are
    /// not straight, so ~100).
    pub km_per_ms: f64,
    /// One-way access latency of each host (last mile, NAT, stack), drawn
    /// uniformly in this range, ms.
    pub access_ms: [f64; 2],
    /// Fixed bytes of every message besides its tensors (framing, route,
    /// ids).
    pub msg_overhead_bytes: u64,
}

impl Default for Net {
    fn default() -> Self {
        Net {
            regions: Region::world(),
            km_per_ms: 100.0,
            access_ms: [1.0, 10.0],
            msg_overhead_bytes: 512,
        }
    }
}

/// A region of hosts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Region {
    /// Its name.
    pub name: String,
    /// Relative share of hosts.
    pub share: f64,
    /// Centre latitude, degrees.
    pub lat: f64,
    /// Centre longitude, degrees.
    pub lon: f64,
    /// Hosts lie within this distance of the centre, km.
    pub radius_km: f64,
}

impl Default for Region {
    fn default() -> Self {
        Region {
            name: "here".into(),
            share: 1.0,
            lat: 0.0,
            lon: 0.0,
            radius_km: 0.0,
        }
    }
}

impl Region {
    /// North America, Europe, East Asia, South America, Oceania.
    pub fn world() -> Vec<Region> {
        let r = |name: &str, share, lat, lon, radius_km| Region {
            name: name.into(),
            share,
            lat,
            lon,
            radius_km,
        };
        vec![
            r("north-america", 0.35, 40.0, -95.0, 2000.0),
            r("europe", 0.35, 50.0, 10.0, 1200.0),
            r("east-asia", 0.20, 33.0, 120.0, 1500.0),
            r("south-america", 0.05, -15.0, -55.0, 1500.0),
            r("oceania", 0.05, -30.0, 145.0, 1200.0),
        ]
    }
}

/// Node lifetimes: how long a node serves before it leaves.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "dist", rename_all = "lowercase", deny_unknown_fields)]
pub enum Lifetime {
    /// Nodes never leave.
    Forever,
    /// Exponential with mean `mean_s`.
    Exponential {
        /// Mean lifetime, s.
        mean_s: f64,
    },
    /// Log-normal (heavy-tailed): median `median_s`, log-space deviation
    /// `sigma`.
    Lognormal {
        /// Median lifetime, s.
        median_s: f64,
        /// Log-space standard deviation.
        sigma: f64,
    },
    /// Pareto (heavy-tailed): at least `min_s`, tail index `alpha`.
    Pareto {
        /// Shortest lifetime, s.
        min_s: f64,
        /// Tail index (> 1 for a finite mean).
        alpha: f64,
    },
}

impl Lifetime {
    /// The mean lifetime, s (infinite for `Forever` or a Pareto tail index
    /// of 1 or less).
    pub fn mean_s(&self) -> f64 {
        match *self {
            Lifetime::Forever => f64::INFINITY,
            Lifetime::Exponential { mean_s } => mean_s,
            Lifetime::Lognormal { median_s, sigma } => median_s * (sigma * sigma / 2.0).exp(),
            Lifetime::Pareto { min_s, alpha } if alpha > 1.0 => min_s * alpha / (alpha - 1.0),
            Lifetime::Pareto { .. } => f64::INFINITY,
        }
    }
}

/// Departures, joins and injected failures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Churn {
    /// How long each node serves.
    pub lifetime: Lifetime,
    /// New nodes join at `count / mean lifetime` per second, keeping the
    /// mesh near its size.
    pub replace: bool,
    /// Share of departures whose host closes the connections (a killed or
    /// crashed process: peers see it at once); the others vanish (power,
    /// network: peers notice by missed pings).
    pub fin_share: f64,
    /// Probability that a node drops a step's session when it arrives
    /// (the node's `--inject-faults`; Petals' per-hop failure rate).
    pub hop_failure_p: f64,
    /// Periodic kills (the chaos test's killer), if any.
    pub kills: Option<Kills>,
}

impl Default for Churn {
    fn default() -> Self {
        Churn {
            lifetime: Lifetime::Exponential { mean_s: 7200.0 },
            replace: true,
            fin_share: 0.5,
            hop_failure_p: 0.0,
            kills: None,
        }
    }
}

/// A killer: a random node every `every_s × U[0.5, 1.5)`, then a new node
/// in its place.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Kills {
    /// Mean seconds between kills.
    pub every_s: f64,
    /// The first kill's wait starts here, s.
    pub start_s: f64,
    /// No kill after this time, s (none: until the end).
    pub stop_s: Option<f64>,
    /// Whether a new node is started after each kill.
    pub replace: bool,
    /// Whether the killer waits for the new node to serve before the next
    /// wait starts (the chaos test does).
    pub wait_for_replacement: bool,
}

impl Default for Kills {
    fn default() -> Self {
        Kills {
            every_s: 6.0,
            start_s: 0.0,
            stop_s: None,
            replace: true,
            wait_for_replacement: true,
        }
    }
}

/// Who uses the mesh.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Workload {
    /// Open: sessions arrive at `arrival_per_s`, each from a new client.
    /// Closed: `clients` clients each run sessions back to back.
    pub mode: WorkloadMode,
    /// Session arrivals per second (open).
    pub arrival_per_s: f64,
    /// Clients (closed).
    pub clients: u32,
    /// Pause between a closed client's sessions, s.
    pub think_s: f64,
    /// No session starts before this time, s.
    pub start_s: f64,
    /// No session starts after this time, s (none: until the end).
    pub stop_s: Option<f64>,
    /// Prompt tokens per row, uniform in this range.
    pub prompt_tokens: [u32; 2],
    /// Steps (new tokens) per session, uniform in this range.
    pub new_tokens: [u32; 2],
    /// Rows (invokes) per session, uniform in this range.
    pub rows: [u32; 2],
    /// The intervention graph, sent to each hop on first contact, bytes.
    pub graph_bytes: u64,
    /// Saved values returned per step by the hops that save, bytes.
    pub save_bytes_per_step: u64,
    /// Client uplink, Mbit/s.
    pub up_mbps: f64,
    /// Client downlink, Mbit/s.
    pub down_mbps: f64,
    /// Client-side work before a session's first step (tokenize, validate,
    /// partition), ms.
    pub setup_ms: f64,
    /// A closed client reuses its last discovery this long (the client's
    /// `DISCOVERY_TTL`), unless a session failed over, s.
    pub discovery_ttl_s: f64,
}

/// See [`Workload::mode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkloadMode {
    /// Poisson arrivals.
    Open,
    /// A fixed number of looping clients.
    Closed,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            mode: WorkloadMode::Open,
            arrival_per_s: 1.0,
            clients: 1,
            think_s: 0.0,
            start_s: 0.0,
            stop_s: None,
            prompt_tokens: [64, 512],
            new_tokens: [32, 256],
            rows: [1, 1],
            graph_bytes: 4096,
            save_bytes_per_step: 0,
            up_mbps: 50.0,
            down_mbps: 200.0,
            setup_ms: 5.0,
            discovery_ttl_s: 20.0,
        }
    }
}

/// The control machines' settings (the control crate's `Config`s).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Control {
    /// Placement and rebalancing.
    pub placement: PlacementCfg,
    /// The client's fail-over.
    pub failover: FailoverCfg,
    /// The client's failure detection.
    pub detect: DetectCfg,
    /// After a replacement: replay the history to it (`replay`), or
    /// restart the session from its first step on every hop (`restart`,
    /// Petals' "caching with restarts").
    pub recovery: Recovery,
    /// How a replacement computes the history it replays: one forward per
    /// replayed step (`steps`: a hop that intervenes at every step), the
    /// prompt and then the generated tokens in one chunk (`chunk`, the node
    /// today), or one prefill of all of it (`prefill`, Petals' Algorithm 1).
    pub replay: Replay,
    /// A client leaves a peer it found dead out of discovery this long
    /// (the client's `DEAD_TTL`), s.
    pub dead_ttl_s: f64,
    /// Answer a fail-over's first discovery with the candidates the session
    /// found when it started, at once, instead of discovering anew. Later
    /// attempts (after a backoff) discover anew. The client does this now;
    /// off by default, the scenarios model the client before it.
    pub reuse_candidates: bool,
}

impl Default for Control {
    fn default() -> Self {
        Control {
            placement: PlacementCfg::default(),
            failover: FailoverCfg::default(),
            detect: DetectCfg::default(),
            recovery: Recovery::Replay,
            replay: Replay::Chunk,
            dead_ttl_s: 60.0,
            reuse_candidates: false,
        }
    }
}

/// See [`Control::recovery`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Recovery {
    /// Replay the failed hop's history on its replacement.
    Replay,
    /// Start the session over.
    Restart,
}

/// See [`Control::replay`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Replay {
    /// One forward per replayed step.
    Steps,
    /// The prompt's forward, then one forward of every generated token.
    Chunk,
    /// One prefill of every replayed token.
    Prefill,
}

/// Placement (the control crate's `placement::Config`, and the rule).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PlacementCfg {
    /// `window`: the control crate's machine (weakest blocks first, a
    /// replication floor, rebalancing). `random`: a uniformly random
    /// window, kept for life (the baseline). `pinned`: `nodes.pinned`.
    pub rule: PlacementRule,
    /// The replication floor R.
    pub replication: u32,
    /// Whether serving nodes check for better spans (off: a node places
    /// itself once).
    pub rebalance: bool,
    /// Mean seconds between checks.
    pub check_period_s: f64,
    /// The first placement waits U[0, this) s.
    pub start_jitter_s: f64,
    /// A balance move needs the weakest block's throughput to grow by more
    /// than 1 / this.
    pub balance_quality: f32,
    /// No move within this long after arriving, s (a hole excepted).
    pub min_dwell_s: f64,
}

impl Default for PlacementCfg {
    fn default() -> Self {
        PlacementCfg {
            rule: PlacementRule::Window,
            replication: 2,
            rebalance: true,
            check_period_s: 60.0,
            start_jitter_s: 2.0,
            balance_quality: 0.75,
            min_dwell_s: 300.0,
        }
    }
}

/// See [`PlacementCfg::rule`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlacementRule {
    /// The control crate's placement machine.
    Window,
    /// A random window, never moved.
    Random,
    /// `nodes.pinned`.
    Pinned,
}

/// Fail-over (the control crate's `failover::Config`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FailoverCfg {
    /// Searches for a replacement of one set of layers before giving up.
    pub max_attempts: u32,
    /// Failures in a row, without progress, one session survives.
    pub max_failures: u32,
    /// First backoff, ms.
    pub backoff_ms: f64,
    /// Longest backoff, s.
    pub max_backoff_s: f64,
    /// How long a failed peer is left out, s.
    pub blacklist_s: f64,
}

impl Default for FailoverCfg {
    fn default() -> Self {
        FailoverCfg {
            max_attempts: 6,
            max_failures: 16,
            backoff_ms: 250.0,
            max_backoff_s: 4.0,
            blacklist_s: 60.0,
        }
    }
}

/// Failure detection (the control crate's `detect::Config`, and the
/// transport's timers).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DetectCfg {
    /// Fixed part of a step's deadline, s.
    pub deadline_base_s: f64,
    /// The deadline allows this many times the predicted compute.
    pub deadline_factor: f64,
    /// Deadline periods a live hop may take.
    pub deadlines: u32,
    /// Redial timeout, s.
    pub redial_timeout_s: f64,
    /// Probe timeout, s.
    pub probe_timeout_s: f64,
    /// The transport pings each connection this often, s.
    pub ping_interval_s: f64,
    /// A ping unanswered this long closes the connection, s.
    pub ping_timeout_s: f64,
    /// A call to a host that vanished fails after this long: dialling an
    /// address that does not answer ends with libp2p's connection timeout
    /// (the `SwarmBuilder`'s default, 10 s, which the transport keeps), s.
    pub dial_timeout_s: f64,
}

impl Default for DetectCfg {
    fn default() -> Self {
        DetectCfg {
            deadline_base_s: 10.0,
            deadline_factor: 20.0,
            deadlines: 3,
            redial_timeout_s: 5.0,
            probe_timeout_s: 3.0,
            ping_interval_s: 2.0,
            ping_timeout_s: 8.0,
            dial_timeout_s: 10.0,
        }
    }
}

/// How holders are found, and what it costs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Discovery {
    /// `providers`: what the node and client do today: one Kademlia key
    /// that every node provides, then an `Info` call to every provider
    /// (fresh records, O(N) calls). `blocks`: one key per block holding the
    /// signed records of its holders (Petals' layout), read without
    /// contacting the holders; a read returns the block's census and
    /// `sample` records; records live `record_ttl_s` unless refreshed, so
    /// dead nodes linger.
    pub mode: DiscoveryMode,
    /// Kademlia's replication parameter k.
    pub k: u32,
    /// Kademlia's parallelism α.
    pub alpha: u32,
    /// Provider records expire after this long (the transport's
    /// `PROVIDER_RECORD_TTL`), s.
    pub provider_ttl_s: f64,
    /// Providers republish this often, s.
    pub provider_republish_s: f64,
    /// An `Info` call to a provider that vanished fails after this long
    /// (its dial ends with libp2p's 10 s connection timeout, before the
    /// 60 s request timeout), s. A discovery waits for every call. The
    /// client now gives up on an `Info` after 2 s; the scenarios' 10 s
    /// model the client before it.
    pub info_timeout_s: f64,
    /// Block records expire after this long (`blocks`), s.
    pub record_ttl_s: f64,
    /// Nodes refresh their block records this often (`blocks`), s.
    pub record_refresh_s: f64,
    /// Records a block read returns at most (`blocks`).
    pub sample: u32,
    /// Fixed extra time of every discovery (processing), ms.
    pub overhead_ms: f64,
    /// Lookups simulated on the DHT's current membership to measure a
    /// lookup's messages and hops (redone every `lookup_every_s`).
    pub lookup_samples: u32,
    /// See `lookup_samples`, s.
    pub lookup_every_s: f64,
}

/// See [`Discovery::mode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiscoveryMode {
    /// One key, `Info` to every provider.
    Providers,
    /// A key per block, census and a sample per read.
    Blocks,
}

impl Default for Discovery {
    fn default() -> Self {
        Discovery {
            mode: DiscoveryMode::Providers,
            k: 20,
            alpha: 3,
            provider_ttl_s: 600.0,
            provider_republish_s: 300.0,
            info_timeout_s: 10.0,
            record_ttl_s: 120.0,
            record_refresh_s: 60.0,
            sample: 16,
            overhead_ms: 0.0,
            lookup_samples: 64,
            lookup_every_s: 300.0,
        }
    }
}

/// One run of a sweep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SweepRun {
    /// The run's label.
    pub label: String,
    /// The series it belongs to in plots.
    pub series: String,
    /// Its x coordinate in plots of figures against x.
    pub x: f64,
    /// Fields overridden, by dotted path (`"churn.hop_failure_p" = 0.01`).
    pub set: toml::Table,
}

impl Default for SweepRun {
    fn default() -> Self {
        SweepRun {
            label: String::new(),
            series: String::new(),
            x: 0.0,
            set: toml::Table::new(),
        }
    }
}

/// A plot drawn from the runs' summaries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Plot {
    /// What it shows.
    pub kind: PlotKind,
    /// File name (SVG), in the output folder.
    pub file: String,
    /// Title.
    pub title: String,
    /// Label of the x axis (plots against x).
    pub x_label: String,
    /// Logarithmic x axis.
    pub log_x: bool,
    /// Logarithmic y axis.
    pub log_y: bool,
    /// Runs to draw, by label (empty: all).
    pub runs: Vec<String>,
}

impl Default for Plot {
    fn default() -> Self {
        Plot {
            kind: PlotKind::Coverage,
            file: "plot.svg".into(),
            title: String::new(),
            x_label: "x".into(),
            log_x: false,
            log_y: false,
            runs: Vec::new(),
        }
    }
}

/// See [`Plot::kind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlotKind {
    /// Steps per second of the completed sessions (their steps over their
    /// time) against each run's x, one line per series.
    StepsVsX,
    /// Control messages per node per second against each run's x, one line
    /// per series.
    TrafficVsX,
    /// Block coverage and minimum holders over time.
    Coverage,
    /// The recovery-latency CDF, one line per run.
    RecoveryCdf,
}

/// A figure measured on a real mesh.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// What it is.
    pub name: String,
    /// Where the simulated figure is in a run's summary, by dotted path
    /// (`sessions.step_ms.p50`).
    pub path: String,
    /// The measured value.
    pub measured: f64,
    /// Whether a parameter was fitted to it (so it is no test of the
    /// model).
    #[serde(default)]
    pub fitted: bool,
}

/// A scenario with its runs resolved.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The scenario as written.
    pub base: Scenario,
    /// Each run: its sweep entry (a default one without a sweep) and the
    /// scenario with its overrides applied.
    pub runs: Vec<(SweepRun, Scenario)>,
}

impl Plan {
    /// Reads a scenario file.
    ///
    /// # Errors
    /// When the file cannot be read, parsed, or has values out of range.
    pub fn load(path: &Path) -> Result<Plan, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Plan::parse(&text, &path.display().to_string())
    }

    /// Parses a scenario from TOML text; `what` names it in errors.
    ///
    /// # Errors
    /// When the text does not parse or has values out of range.
    pub fn parse(text: &str, what: &str) -> Result<Plan, ScenarioError> {
        let parse_err = |what: &str, e: &dyn std::fmt::Display| ScenarioError::Parse {
            what: what.to_string(),
            message: e.to_string(),
        };
        let table: toml::Table = toml::from_str(text).map_err(|e| parse_err(what, &e))?;
        let base: Scenario = Scenario::deserialize(toml::Value::Table(table.clone()))
            .map_err(|e| parse_err(what, &e))?;
        base.validate(what)?;
        let mut runs = Vec::new();
        if base.sweep.is_empty() {
            runs.push((
                SweepRun {
                    label: base.name.clone(),
                    ..SweepRun::default()
                },
                base.clone(),
            ));
        }
        for (i, run) in base.sweep.iter().enumerate() {
            let what = format!("{what}, sweep entry {} ({:?})", i + 1, run.label);
            let mut t = table.clone();
            t.remove("sweep");
            for (path, value) in &run.set {
                set_path(&mut t, path, value.clone()).map_err(|m| ScenarioError::Invalid {
                    what: what.clone(),
                    message: m,
                })?;
            }
            let sc: Scenario =
                Scenario::deserialize(toml::Value::Table(t)).map_err(|e| parse_err(&what, &e))?;
            sc.validate(&what)?;
            runs.push((run.clone(), sc));
        }
        Ok(Plan { base, runs })
    }
}

/// Sets `path` (dotted) in `table` to `value`, creating tables on the way.
fn set_path(table: &mut toml::Table, path: &str, value: toml::Value) -> Result<(), String> {
    let mut parts = path.split('.').peekable();
    let mut t = table;
    while let Some(key) = parts.next() {
        if parts.peek().is_none() {
            t.insert(key.to_string(), value);
            return Ok(());
        }
        let entry = t
            .entry(key.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        t = entry
            .as_table_mut()
            .ok_or_else(|| format!("{path}: {key} is not a table"))?;
    }
    Err(format!("empty path {path:?}"))
}

impl Scenario {
    /// Checks that values are in range.
    ///
    /// # Errors
    /// Naming the first field out of range.
    pub fn validate(&self, what: &str) -> Result<(), ScenarioError> {
        let bad = |message: String| {
            Err(ScenarioError::Invalid {
                what: what.to_string(),
                message,
            })
        };
        if self.model.blocks == 0 {
            return bad("model.blocks must be at least 1".into());
        }
        if self.duration_s.is_nan() || self.duration_s <= 0.0 {
            return bad("duration_s must be positive".into());
        }
        if self.nodes.profiles.is_empty() || self.nodes.profiles.iter().all(|p| p.share <= 0.0) {
            return bad("nodes.profiles needs a profile with a positive share".into());
        }
        for p in &self.nodes.profiles {
            if [p.decode_ms_per_block, p.up_mbps, p.down_mbps]
                .iter()
                .any(|v| v.is_nan() || *v <= 0.0)
            {
                return bad(format!(
                    "profile {:?}: decode time and bandwidths must be positive",
                    p.name
                ));
            }
        }
        if self.net.regions.is_empty() || self.net.regions.iter().all(|r| r.share <= 0.0) {
            return bad("net.regions needs a region with a positive share".into());
        }
        if !(0.0..=1.0).contains(&self.churn.hop_failure_p) {
            return bad("churn.hop_failure_p must be in [0, 1]".into());
        }
        if !(0.0..=1.0).contains(&self.churn.fin_share) {
            return bad("churn.fin_share must be in [0, 1]".into());
        }
        if self.nodes.queue == 0 || self.nodes.max_batch == 0 {
            return bad("nodes.queue and nodes.max_batch must be at least 1".into());
        }
        let [lo, hi] = self.workload.new_tokens;
        if lo == 0 || hi < lo {
            return bad("workload.new_tokens must be a range of at least 1".into());
        }
        let [lo, hi] = self.workload.rows;
        if lo == 0 || hi < lo {
            return bad("workload.rows must be a range of at least 1".into());
        }
        if self.workload.prompt_tokens[1] < self.workload.prompt_tokens[0] {
            return bad("workload.prompt_tokens must be a range".into());
        }
        if self.control.placement.rule == PlacementRule::Pinned && self.nodes.pinned.is_empty() {
            return bad("the pinned placement rule needs nodes.pinned".into());
        }
        for s in &self.nodes.pinned {
            if s[0] >= s[1] || s[1] > self.model.blocks {
                return bad(format!(
                    "nodes.pinned: {}..{} is not a span of the model",
                    s[0], s[1]
                ));
            }
        }
        if self.discovery.k == 0 || self.discovery.alpha == 0 || self.discovery.sample == 0 {
            return bad("discovery.k, alpha and sample must be at least 1".into());
        }
        if self.sample_every_s <= 0.0 {
            return bad("sample_every_s must be positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_in_and_sweeps_override() {
        let plan = Plan::parse(
            r#"
            name = "t"
            [nodes]
            count = 50
            [[sweep]]
            label = "a"
            set = { "churn.hop_failure_p" = 0.01, "control.recovery" = "restart" }
            [[sweep]]
            label = "b"
            x = 2.0
            set = { "nodes.count" = 7 }
            "#,
            "test",
        )
        .expect("parses");
        assert_eq!(plan.base.nodes.count, 50);
        assert_eq!(plan.base.model.blocks, 80);
        assert_eq!(plan.runs.len(), 2);
        assert_eq!(plan.runs[0].1.churn.hop_failure_p, 0.01);
        assert_eq!(plan.runs[0].1.control.recovery, Recovery::Restart);
        assert_eq!(plan.runs[0].1.nodes.count, 50);
        assert_eq!(plan.runs[1].1.nodes.count, 7);
        assert_eq!(plan.runs[1].0.x, 2.0);
    }

    #[test]
    fn mistakes_are_named() {
        let e = Plan::parse("[nodes]\ncuont = 5\n", "f.toml").expect_err("unknown field");
        assert!(e.to_string().contains("cuont"), "{e}");
        let e = Plan::parse("[churn]\nhop_failure_p = 2.0\n", "f.toml").expect_err("range");
        assert!(e.to_string().contains("hop_failure_p"), "{e}");
        let e = Plan::parse(
            "[[sweep]]\nlabel = \"x\"\nset = { \"nodes.count.deep\" = 1 }\n",
            "f.toml",
        )
        .expect_err("not a table");
        assert!(e.to_string().contains("sweep entry 1"), "{e}");
        let lifetimes = Plan::parse(
            "[churn]\nlifetime = { dist = \"pareto\", min_s = 600.0, alpha = 1.5 }\n",
            "f.toml",
        )
        .expect("parses");
        assert_eq!(lifetimes.base.churn.lifetime.mean_s(), 1800.0);
    }
}
