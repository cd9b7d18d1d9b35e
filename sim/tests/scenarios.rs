//! Small scenarios run end to end: determinism, the invariants, and the
//! failure detection the simulator drives. Each takes well under a second
//! in a debug build.

use nnmesh_sim::{Plan, Scenario, Summary, progress::Progress, run};

/// A small, busy mesh: churn (deaths that close connections and deaths
/// that vanish), injected hop failures, rebalancing with a short dwell,
/// open arrivals.
const SMALL: &str = r#"
name = "small"
seed = 7
duration_s = 1500.0
warmup_s = 300.0
sample_every_s = 10.0

[model]
blocks = 20
hidden = 1024
block_gb = 1.0

[nodes]
count = 40
join_over_s = 120.0
startup_s = 2.0
queue = 4

[[nodes.profiles]]
name = "big"
share = 1.0
memory_gb = 8.0
decode_ms_per_block = 2.0
prefill_ms_per_token_block = 0.05
up_mbps = 100.0
down_mbps = 100.0
load_s_per_block = 1.0

[[nodes.profiles]]
name = "small"
share = 2.0
memory_gb = 4.0
decode_ms_per_block = 4.0
prefill_ms_per_token_block = 0.1
up_mbps = 20.0
down_mbps = 100.0
load_s_per_block = 2.0

[churn]
lifetime = { dist = "exponential", mean_s = 900.0 }
fin_share = 0.5
hop_failure_p = 0.01

[workload]
mode = "open"
arrival_per_s = 0.3
start_s = 200.0
prompt_tokens = [8, 64]
new_tokens = [8, 64]
rows = [1, 2]

[control.placement]
check_period_s = 20.0
min_dwell_s = 60.0
"#;

/// `text` with fields overridden (a sweep entry's `set`, e.g.
/// `"control.recovery" = "restart"`).
fn scenario(text: &str, set: &str) -> Scenario {
    let plan = Plan::parse(
        &format!("{text}\n[[sweep]]\nlabel = \"test\"\nset = {{ {set} }}\n"),
        "test",
    )
    .expect("a valid scenario");
    plan.runs[0].1.clone()
}

fn go(sc: &Scenario) -> Summary {
    let mut s = run(sc, "test", &mut Progress::new(false));
    // Wall-clock figures are the only part that may differ between runs.
    s.perf = Default::default();
    s
}

/// The invariants every run must keep, and the accounting of sessions.
fn check(s: &Summary) {
    let inv = &s.invariants;
    assert!(inv.coverage_checks > 10, "{inv:?}");
    assert_eq!(
        inv.coverage_mismatches, 0,
        "coverage counted wrong: {inv:?}"
    );
    assert_eq!(inv.record_mismatches, 0, "records counted wrong: {inv:?}");
    assert_eq!(
        inv.sessions_lost, 0,
        "sessions lost without a cause: {inv:?}"
    );
    let ss = &s.sessions;
    assert_eq!(
        ss.counted,
        ss.completed + ss.failed + ss.unfinished,
        "{ss:?}"
    );
    assert_eq!(
        ss.failed,
        ss.failed_by_cause.values().sum::<u64>(),
        "{ss:?}"
    );
    assert!(ss.failed_by_cause.keys().all(|c| !c.is_empty()), "{ss:?}");
}

#[test]
fn the_same_seed_gives_the_same_summary_and_the_invariants_hold() {
    for discovery in ["providers", "blocks"] {
        let sc = scenario(SMALL, &format!("\"discovery.mode\" = \"{discovery}\""));
        let a = go(&sc);
        check(&a);
        // Something happened: sessions ran and recovered from failures,
        // nodes died and joined, placement moved nodes.
        assert!(a.sessions.completed > 100, "{discovery}: {:?}", a.sessions);
        assert!(a.sessions.failovers > 10, "{discovery}: {:?}", a.sessions);
        assert!(a.recovery.latency_ms.count > 10, "{discovery}");
        assert!(
            a.sim.nodes_left > 10 && a.sim.nodes_joined > 10,
            "{:?}",
            a.sim
        );
        assert!(a.placement.checks > 100, "{:?}", a.placement);
        let b = go(&sc);
        assert_eq!(
            a, b,
            "{discovery}: same scenario, same seed, different results"
        );
        let mut other = sc.clone();
        other.seed += 1;
        assert_ne!(go(&other), a, "{discovery}: the seed changes nothing");
    }
}

#[test]
fn restarts_and_one_prefill_replays_keep_the_invariants() {
    for extra in [
        r#""control.recovery" = "restart""#,
        r#""control.replay" = "prefill""#,
        r#""control.placement.rule" = "random""#,
        r#""control.placement.rebalance" = false, "control.placement.replication" = 1"#,
    ] {
        let s = go(&scenario(SMALL, extra));
        check(&s);
        assert!(s.sessions.completed > 50, "{extra}: {:?}", s.sessions);
    }
}

/// Only node deaths: no injected failures, no moves, no overload.
const DEATHS: &str = r#"
name = "deaths"
seed = 3
duration_s = 1800.0
warmup_s = 60.0
sample_every_s = 30.0

[model]
blocks = 12
hidden = 512
block_gb = 1.0

[nodes]
count = 6
join_over_s = 0.0
startup_s = 1.0
queue = 1000
pinned = [[0, 6], [0, 6], [0, 6], [6, 12], [6, 12], [6, 12]]

[[nodes.profiles]]
name = "gpu"
memory_gb = 6.0
decode_ms_per_block = 2.0

[net]
regions = [{ name = "one", share = 1.0, lat = 0.0, lon = 0.0, radius_km = 500.0 }]

[churn]
lifetime = { dist = "exponential", mean_s = 600.0 }
hop_failure_p = 0.0
fin_share = FIN

[workload]
mode = "closed"
clients = 6
start_s = 30.0
prompt_tokens = [8, 8]
new_tokens = [200, 200]

[control.placement]
rule = "pinned"
rebalance = false
"#;

#[test]
fn deaths_are_detected_as_the_client_would() {
    // Hosts that vanish: the client learns it from missed pings (a ping
    // every 2 s, 8 s to answer) and a redial that times out, or from a
    // dial that times out.
    let s = go(&scenario(&DEATHS.replace("FIN", "0.0"), ""));
    check(&s);
    let causes: Vec<&String> = s.recovery.by_cause.keys().collect();
    assert_eq!(causes, ["died (host vanished)"], "{:?}", s.recovery);
    assert!(s.recovery.detection_ms.count > 5, "{:?}", s.recovery);
    assert!(
        s.recovery.detection_ms.max >= 8000.0 - 1.0,
        "{:?}",
        s.recovery
    );
    assert!(
        s.recovery.detection_ms.p50 >= 8000.0,
        "{:?}",
        s.recovery.detection_ms
    );
    // Killed processes on live hosts: the connection closes at once, the
    // redial is refused: a round trip or two.
    let s = go(&scenario(&DEATHS.replace("FIN", "1.0"), ""));
    check(&s);
    let causes: Vec<&String> = s.recovery.by_cause.keys().collect();
    assert_eq!(causes, ["died (connection closed)"], "{:?}", s.recovery);
    assert!(s.recovery.detection_ms.count > 5, "{:?}", s.recovery);
    assert!(
        s.recovery.detection_ms.max < 100.0,
        "{:?}",
        s.recovery.detection_ms
    );
}

#[test]
fn the_bundled_scenarios_parse() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let mut found = 0;
    for entry in std::fs::read_dir(&dir).expect("sim/scenarios exists") {
        let path = entry.expect("a directory entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let plan = Plan::load(&path).unwrap_or_else(|e| panic!("{e}"));
            assert!(!plan.runs.is_empty(), "{}", path.display());
            found += 1;
        }
    }
    assert!(found >= 2, "no scenarios in {}", dir.display());
}

/// Petals' Table 1 in miniature: four pinned stages, one looping client,
/// long generations, every hop failing with probability `P`.
const CHAIN: &str = r#"
name = "chain"
seed = 5
duration_s = 3000.0
sample_every_s = 60.0

[model]
blocks = 16
hidden = 1024
block_gb = 0.5

[nodes]
count = 4
join_over_s = 0.0
startup_s = 0.0
step_overhead_ms = 10.0
pinned = [[0, 4], [4, 8], [8, 12], [12, 16]]

[[nodes.profiles]]
name = "gpu"
memory_gb = 2.0
decode_ms_per_block = 1.0
prefill_ms_per_token_block = 0.05

[net]
regions = [{ name = "one", share = 1.0, lat = 0.0, lon = 0.0, radius_km = 0.0 }]

[churn]
lifetime = { dist = "forever" }
replace = false
hop_failure_p = P

[workload]
mode = "closed"
clients = 1
start_s = 5.0
prompt_tokens = [16, 16]
new_tokens = [256, 256]

[control.placement]
rule = "pinned"

[control.failover]
max_failures = 1000000
max_attempts = 1000000
"#;

#[test]
fn a_replay_beats_a_restart_and_fewer_forwards_replay_faster() {
    let run = |p: &str, set: &str| {
        let s = go(&scenario(&CHAIN.replace("P", p), set));
        check(&s);
        s.sessions
    };
    let steps_per_s = |p: &str, set: &str| {
        let s = run(p, set);
        assert!(s.completed > 0, "p={p} {set}: {s:?}");
        s.steps_per_s_overall
    };
    // Without failures, how a replay would run makes no difference.
    let clean: Vec<f64> = ["steps", "chunk", "prefill"]
        .iter()
        .map(|m| steps_per_s("0.0", &format!("\"control.replay\" = \"{m}\"")))
        .collect();
    assert!(clean.windows(2).all(|w| w[0] == w[1]), "{clean:?}");
    assert_eq!(
        clean[0],
        steps_per_s("0.0", r#""control.recovery" = "restart""#)
    );
    // At p = 1e-2 a hop fails every ~25 steps of a 4-hop chain: a
    // step-by-step replay redoes one forward per step, a chunk two
    // forwards, a prefill one.
    let steps = steps_per_s("0.01", r#""control.replay" = "steps""#);
    let chunk = steps_per_s("0.01", r#""control.replay" = "chunk""#);
    let prefill = steps_per_s("0.01", r#""control.replay" = "prefill""#);
    assert!(
        steps < chunk && chunk < prefill && prefill < clean[0],
        "steps {steps}, chunk {chunk}, prefill {prefill}, clean {}",
        clean[0]
    );
    // The node replays generated tokens in one chunk by default.
    assert_eq!(chunk, steps_per_s("0.01", ""));
    // Restarts redo whole generations: at 1e-3 they are slower than any
    // replay; at 1e-2 (a failure-free 272-step run of 4 hops has odds of
    // 0.99^1088 ~ 2e-5) none finishes, as in Petals' Table 1.
    let replay = steps_per_s("0.001", r#""control.replay" = "steps""#);
    let restart = steps_per_s("0.001", r#""control.recovery" = "restart""#);
    assert!(restart < 0.8 * replay, "restart {restart}, replay {replay}");
    let restart = run("0.01", r#""control.recovery" = "restart""#);
    assert!(
        restart.completed == 0 && restart.restarts > 100,
        "{restart:?}"
    );
}
