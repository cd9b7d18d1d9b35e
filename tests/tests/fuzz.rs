//! A fuzz harness on stable Rust: structure-aware mutations of valid graphs
//! and stage messages (postcard and JSON), and raw bytes, fed to the
//! decoders, the validator and live stages (the node's own [`Stage`], in
//! this process, on a tiny 3-layer Llama so that ten thousand cases take
//! seconds).
//!
//! A crash is any panic: in a decoder or the validator, or inside a stage
//! (where the node contains it, but a contained panic still means a check is
//! missing). Every other outcome is counted by kind. The split and the full
//! stage also serve as each other's reference: a valid graph run through
//! three stages must save what it saves on one.
//!
//! `cargo test --test fuzz` runs 10,000 cases (`scripts/test.sh` does);
//! `scripts/fuzz.sh SECONDS` runs for longer. `NNMESH_FUZZ_SEED` picks the
//! seed (printed with every run, so a crash can be replayed).

#[path = "fuzz/mutate.rs"]
mod mutate;

use std::{
    cell::RefCell,
    collections::BTreeMap,
    fmt::Debug,
    panic::AssertUnwindSafe,
    time::{Duration, Instant},
};

use mutate::Rng;
use nnmesh_graph::{
    Builder, DType, Graph, IndexItem::*, Inputs, Limits, Manifest, Point, validate,
};
use nnmesh_node::stage::{Config, Next, Stage};
use nnmesh_protocol::{
    PeerId, Span, codec,
    ids::{ModelId, RequestId},
    message::{Carried, Hop, Request, Response, Saved, StepInput, StepRequest, WireError},
    tensor::WireTensor,
};
use nnmesh_runtime::{
    checkpoint::Checkpoint, engine::Engine, models::llama::Model, tokenizer::Tokenizer,
};
use tch::{Device, Kind};

/// Counts of outcomes by kind, and the crashes.
#[derive(Default)]
struct Tally {
    cases: u64,
    outcomes: BTreeMap<String, u64>,
    crashes: Vec<String>,
    divergences: Vec<String>,
}

impl Tally {
    fn count(&mut self, target: &str, kind: &str) {
        *self
            .outcomes
            .entry(format!("{target}: {kind}"))
            .or_default() += 1;
    }

    fn crash(&mut self, case: u64, detail: String) {
        if self.crashes.len() < 20 {
            self.crashes.push(format!("case {case}: {detail}"));
        } else {
            self.crashes.push(String::new());
        }
    }
}

/// The variant name of an error (`TooMany { .. }` → `TooMany`).
fn kind_of(e: &impl Debug) -> String {
    let s = format!("{e:?}");
    s.split(['{', '(', ' '])
        .next()
        .unwrap_or_default()
        .to_string()
}

thread_local! {
    /// The message of the last panic on this thread.
    static LAST_PANIC: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Runs `f`; a panic is a crash.
fn guarded<T>(tally: &mut Tally, case: u64, what: &str, f: impl FnOnce() -> T) -> Option<T> {
    let _quiet = Quiet::enter();
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => Some(v),
        Err(_) => {
            let msg = LAST_PANIC.with(|m| m.borrow().clone());
            tally.crash(case, format!("{what} panicked: {msg}"));
            None
        }
    }
}

thread_local! {
    /// Inside a guarded call: panics are recorded, not printed.
    static QUIET: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Marks a guarded region (stages contain panics inside it too).
struct Quiet;

impl Quiet {
    fn enter() -> Quiet {
        QUIET.with(|q| q.set(q.get() + 1));
        Quiet
    }
}

impl Drop for Quiet {
    fn drop(&mut self) {
        QUIET.with(|q| q.set(q.get() - 1));
    }
}

/// The tiny Llama of the numerics fixtures, as stages.
struct Mesh {
    full: Stage,
    split: Vec<Stage>,
    manifest: Manifest,
    model: ModelId,
}

fn engine(layers: std::ops::Range<usize>) -> Engine {
    let ckpt = Checkpoint::open(&nnmesh_tests::root().join("runtime/tests/fixtures/tiny-llama"))
        .expect("tiny checkpoint opens");
    // The fixture has no tokenizer; stages only tokenize for `Tokenize`.
    let smol = Checkpoint::open(&nnmesh_tests::model_path()).expect("bundled model");
    let tokenizer = Tokenizer::from_gguf(smol.gguf().expect("a gguf")).expect("tokenizer");
    Engine {
        model: Model::load(&ckpt, layers, Kind::Float, Device::Cpu).expect("loads"),
        tokenizer,
    }
}

fn mesh() -> Mesh {
    let cfg = Config {
        limits: Limits {
            max_graph_bytes: 1 << 20,
            max_nodes: 512,
            max_batch_tokens: 4096,
            max_activation_bytes: 256 << 20,
            max_saved_bytes: 64 << 20,
            max_new_tokens: 16,
            ..Limits::default()
        },
        max_sessions: 8,
        max_kv_bytes: 64 << 20,
        // The model is given as engines below; path and span are unused.
        ..Config::new(Default::default(), Span::new(0, 3))
    };
    let full = Stage::new(engine(0..3), &cfg);
    let manifest = full.manifest().clone();
    Mesh {
        full,
        split: (0..3).map(|l| Stage::new(engine(l..l + 1), &cfg)).collect(),
        manifest,
        model: ModelId::of_bytes(b"tiny-llama"),
    }
}

/// The client of every driven request.
fn client() -> PeerId {
    mutate::peer(0xc1)
}

fn hops(spans: &[(u32, u32)]) -> Vec<Hop> {
    spans
        .iter()
        .enumerate()
        .map(|(i, &(start, end))| Hop {
            peer: mutate::peer(i as u8 + 1),
            addrs: Vec::new(),
            span: Span::new(start, end),
        })
        .collect()
}

/// What a run through stages produced, and the steps each stage got.
#[derive(Default)]
struct Run {
    saves: Vec<Saved>,
    tokens: Vec<Vec<u32>>,
    /// Per stage, the requests it got, in order.
    received: Vec<Vec<StepRequest>>,
    error: Option<WireError>,
}

/// Drives a graph through `stages` (a route), as the client and the nodes
/// would: step by step, hop by hop, relays through the "client".
fn drive(stages: &mut [&mut Stage], model: ModelId, request: u64, graph: &Graph) -> Run {
    let route = match stages.len() {
        1 => hops(&[(0, 3)]),
        _ => hops(&[(0, 1), (1, 2), (2, 3)]),
    };
    let mut run = Run {
        received: vec![Vec::new(); stages.len()],
        ..Run::default()
    };
    let bytes = graph.to_postcard();
    let mut relayed: Vec<Carried> = Vec::new();
    'traces: for (t, trace) in graph.traces.iter().enumerate() {
        let mut last: Vec<u32> = Vec::new();
        // Positions each stage's cache holds for this trace.
        let mut past = 0;
        for step in 0..trace.steps() {
            let ids: Vec<i64> = last.iter().map(|&i| i64::from(i)).collect();
            let mut req = StepRequest {
                request: RequestId(request),
                client: client(),
                client_addrs: Vec::new(),
                model,
                route: route.clone(),
                hop: 0,
                graph: (step == 0).then(|| bytes.clone()),
                input: StepInput {
                    trace: t as u32,
                    step,
                    past,
                    tokens: WireTensor::from_i64(
                        if step == 0 {
                            vec![0, 0]
                        } else {
                            vec![ids.len() as u64, 1]
                        },
                        &ids,
                    )
                    .expect("one id per row"),
                    hidden: None,
                    carry: std::mem::take(&mut relayed),
                },
                replay: Vec::new(),
                replay_outputs: false,
            };
            for (k, stage) in stages.iter_mut().enumerate() {
                req.hop = k as u32;
                run.received[k].push(req.clone());
                match stage.step(&req) {
                    Err(e) => {
                        run.error = Some(e);
                        break 'traces;
                    }
                    Ok(out) => {
                        let next = out.output();
                        run.saves.extend(out.saves);
                        relayed.extend(out.relay);
                        if let Next::Done(tokens) = out.next
                            && !tokens.is_empty()
                        {
                            run.tokens.push(tokens.clone());
                            last = tokens;
                        }
                        // The client hands each hop the previous one's
                        // output, and the first hop only the relays.
                        req.input.hidden = next.hidden;
                        req.input.carry = next.carry;
                    }
                }
            }
            past = if step == 0 {
                trace_positions(graph, t)
            } else {
                past + 1
            };
        }
    }
    for s in stages.iter_mut() {
        s.close(RequestId(request), client());
    }
    run
}

/// Valid graphs for the tiny model (3 layers, hidden 64, vocab 256).
fn seeds() -> Vec<Graph> {
    let prompt = || vec![5u32, 17, 200, 3, 9];
    let mut out = Vec::new();
    // Logit lens with a stop.
    let g = Builder::new();
    let t = g.trace_tokens(vec![prompt()]);
    for l in 0..3 {
        let h = g.read(t.at(&format!("model.layers.{l}"), Point::Output));
        let logits = g.apply(
            "lm_head",
            [g.apply("model.norm", [h.index([Full, At(-1)])])],
        );
        g.save(format!("lens{l}"), logits);
    }
    g.stop(t);
    out.push(g.finish());
    // Patching between two invokes of one trace.
    let g = Builder::new();
    let t = g.trace_tokens(vec![prompt(), vec![5, 17, 201, 3, 9]]);
    let clean = g.read(t.invoke(0).at("model.layers.1", Point::Output));
    g.write_at(
        t.invoke(1).at("model.layers.1", Point::Output),
        [Full, At(-1), Full],
        clean.index([Full, At(-1), Full]),
    );
    g.save(
        "out",
        g.read(t.invoke(1).at("lm_head", Point::Output))
            .index([Full, At(-1)]),
    );
    out.push(g.finish());
    // Steering during generation, with per-step saves and a relay from the
    // last layer back to the first at the next step.
    let g = Builder::new();
    let t = g.trace_tokens(vec![prompt()]).generate(4);
    let v = g.vector(DType::F32, vec![0.25; 64]);
    g.add_at(
        t.at("model.layers.1", Point::Output).all_steps(),
        [Full, At(-1), Full],
        v,
    );
    let back = g
        .read(t.at("model.layers.2", Point::Output).step(0))
        .index([Full, At(-1), Full])
        .scale(0.1);
    g.add_at(
        t.at("model.layers.0", Point::Output).steps(1..4),
        [Full, At(-1), Full],
        back,
    );
    g.save(
        "tok",
        g.read(t.at("lm_head", Point::Output).all_steps())
            .argmax(-1, false),
    );
    out.push(g.finish());
    // Attention internals and a head ablation, two traces in a session.
    let g = Builder::new();
    let a = g.trace_tokens(vec![prompt()]);
    let b = g.trace_tokens(vec![vec![1, 2, 3]]);
    g.save(
        "pattern",
        g.read(a.at("model.layers.1.self_attn", Point::Pattern)),
    );
    let z = g.read(b.at("model.layers.0.self_attn", Point::Z));
    g.write(b.at("model.layers.0.self_attn", Point::Z), z.scale(0.0));
    g.save(
        "q",
        g.read(a.at("model.layers.2.self_attn", Point::Q))
            .sum([-1], false),
    );
    g.save("b", g.read(b.at("model.norm", Point::Output)));
    out.push(g.finish());
    out
}

fn run_graph_case(rng: &mut Rng, tally: &mut Tally, case: u64, mesh: &mut Mesh, g: &Graph) {
    // Both encodings, decoded under the stage's limits.
    let limits = mesh.full.limits().clone();
    let json = g.to_json();
    let mut decoded = None;
    for (name, result) in [
        (
            "graph postcard",
            guarded(tally, case, "postcard decode", || {
                Graph::from_postcard_limited(&g.to_postcard(), &limits)
            }),
        ),
        (
            "graph JSON",
            guarded(tally, case, "JSON decode", || {
                Graph::from_json_limited(&json, &limits)
            }),
        ),
    ] {
        match result {
            Some(Ok(back)) => {
                tally.count(name, "ok");
                decoded = Some(back);
            }
            Some(Err(e)) => tally.count(name, &kind_of(&e)),
            None => return,
        }
    }
    let Some(g) = decoded else { return };
    let Some(inputs) = Inputs::from_tokens(&g) else {
        tally.count("validate", "text prompt");
        return;
    };
    let manifest = mesh.manifest.clone();
    let Some(plan) = guarded(tally, case, "validate", || {
        validate(&g, &manifest, &inputs, &limits)
    }) else {
        return;
    };
    match plan {
        Err(e) => {
            tally.count("validate", &kind_of(&e));
            // The stage must refuse it the same way, without running.
        }
        Ok(_) => tally.count("validate", "ok"),
    }
    let request = rng.next();
    let panics = mesh.full.panics() + mesh.split.iter().map(Stage::panics).sum::<u64>();
    let model = mesh.model;
    let full = guarded(tally, case, "full stage", || {
        drive(&mut [&mut mesh.full], model, request, &g)
    });
    let split = guarded(tally, case, "split stages", || {
        let [a, b, c] = &mut mesh.split[..] else {
            unreachable!("three stages")
        };
        drive(&mut [a, b, c], model, request ^ 1, &g)
    });
    let after = mesh.full.panics() + mesh.split.iter().map(Stage::panics).sum::<u64>();
    if after > panics {
        let msg = LAST_PANIC.with(|m| m.borrow().clone());
        tally.crash(
            case,
            format!("a stage contained a panic: {msg}\n{}", g.to_json()),
        );
    }
    let (Some(full), Some(split)) = (full, split) else {
        return;
    };
    let kind = |r: &Run| {
        r.error
            .as_ref()
            .map_or("ok".into(), |e| format!("{:?}", e.kind))
    };
    tally.count("run, one stage", &kind(&full));
    tally.count("run, three stages", &kind(&split));
    if full.error.is_none() && split.error.is_none() {
        let key = |s: &Saved| (s.name.clone(), s.step);
        let mut a: Vec<_> = full.saves.iter().map(|s| (key(s), &s.value)).collect();
        let mut b: Vec<_> = split.saves.iter().map(|s| (key(s), &s.value)).collect();
        a.sort_by(|x, y| x.0.cmp(&y.0));
        b.sort_by(|x, y| x.0.cmp(&y.0));
        let same =
            a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| x.0 == y.0 && close(x.1, y.1));
        if !same || full.tokens != split.tokens {
            tally
                .divergences
                .push(format!("case {case}: {}", g.to_json()));
        }
    }
}

/// Equal values (bit-identical expected; a rounding's slack allowed).
fn close(a: &WireTensor, b: &WireTensor) -> bool {
    if a.dtype != b.dtype || a.shape != b.shape {
        return false;
    }
    match (a.to_f32(), b.to_f32()) {
        (Ok(x), Ok(y)) => x.iter().zip(&y).all(|(p, q)| {
            p == q || (p - q).abs() <= 1e-5 * (1.0 + q.abs()) || (p.is_nan() && q.is_nan())
        }),
        _ => a.data == b.data,
    }
}

/// Replays a recorded valid run up to one request, sends that request
/// mutated, then the rest as recorded.
fn step_case(rng: &mut Rng, tally: &mut Tally, case: u64, mesh: &mut Mesh, recorded: &Recorded) {
    let stage = rng.below(recorded.received.len());
    let reqs = &recorded.received[stage];
    if reqs.is_empty() {
        return;
    }
    let at = rng.below(reqs.len());
    let request = RequestId(rng.next());
    let target: &mut Stage = if recorded.split {
        &mut mesh.split[stage]
    } else {
        &mut mesh.full
    };
    let panics = target.panics();
    let with_id = |r: &StepRequest| StepRequest {
        request,
        ..r.clone()
    };
    for r in &reqs[..at] {
        if target.step(&with_id(r)).is_err() {
            tally.count("step prefix", "refused");
            return;
        }
    }
    let mut bad = with_id(&reqs[at]);
    mutate::step(rng, &mut bad, &recorded.graph_bytes);
    let out = guarded(tally, case, "stage step", || target.step(&bad));
    match out {
        Some(Ok(_)) => tally.count("mutated step", "ok"),
        Some(Err(e)) => tally.count("mutated step", &format!("{:?}", e.kind)),
        None => {}
    }
    for r in &reqs[at + 1..] {
        if guarded(tally, case, "stage step after", || target.step(&with_id(r))).is_none() {
            break;
        }
    }
    target.close(request, client());
    // Close whatever client the mutation named, too.
    target.close(request, bad.client);
    if target.panics() > panics {
        let msg = LAST_PANIC.with(|m| m.borrow().clone());
        tally.crash(
            case,
            format!("a stage contained a panic on a mutated step: {msg}\n{bad:?}"),
        );
    }
}

/// A valid run's requests, per stage, to replay with mutations.
struct Recorded {
    split: bool,
    graph_bytes: Vec<u8>,
    received: Vec<Vec<StepRequest>>,
}

fn bytes_case(rng: &mut Rng, tally: &mut Tally, case: u64, corpus: &[Vec<u8>]) {
    let mut b = rng.pick(corpus).clone();
    let other = rng.pick(corpus).clone();
    mutate::bytes(rng, &mut b, &other);
    if let Some(r) = guarded(tally, case, "Request decode", || {
        codec::decode::<Request>(&b)
    }) {
        tally.count(
            "Request bytes",
            &r.as_ref().map_or_else(kind_of, |_| "ok".into()),
        );
    }
    if let Some(r) = guarded(tally, case, "Response decode", || {
        codec::decode::<Response>(&b)
    }) {
        tally.count(
            "Response bytes",
            &r.as_ref().map_or_else(kind_of, |_| "ok".into()),
        );
    }
    let limits = Limits::default();
    if let Some(r) = guarded(tally, case, "graph decode", || {
        Graph::from_postcard_limited(&b, &limits)
    }) {
        tally.count(
            "graph bytes",
            &r.as_ref().map_or_else(kind_of, |_| "ok".into()),
        );
    }
    let text = String::from_utf8_lossy(&b);
    if let Some(r) = guarded(tally, case, "graph JSON decode", || {
        Graph::from_json_limited(&text, &limits)
    }) {
        tally.count(
            "graph text",
            &r.as_ref().map_or_else(kind_of, |_| "ok".into()),
        );
    }
}

fn json_case(rng: &mut Rng, tally: &mut Tally, case: u64, mesh: &mut Mesh, seed: &Graph) {
    let mut v: serde_json::Value = serde_json::from_str(&seed.to_json()).expect("own JSON");
    mutate::json(rng, &mut v);
    let text = v.to_string();
    let limits = mesh.full.limits().clone();
    match guarded(tally, case, "JSON decode", || {
        Graph::from_json_limited(&text, &limits)
    }) {
        Some(Ok(g)) => {
            tally.count("mutated JSON", "ok");
            run_graph_case(rng, tally, case, mesh, &g);
        }
        Some(Err(e)) => tally.count("mutated JSON", &kind_of(&e)),
        None => {}
    }
}

#[test]
fn fuzz() {
    let seconds: Option<u64> = std::env::var("NNMESH_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok());
    let seed: u64 = std::env::var("NNMESH_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6e6e_6d65_7368);
    let budget = seconds.map(Duration::from_secs);
    let max_cases = if budget.is_some() { u64::MAX } else { 10_000 };
    let mut mesh = mesh();
    let seeds = seeds();
    // Record every seed's valid run, on one stage and on three.
    let mut recorded = Vec::new();
    for (i, g) in seeds.iter().enumerate() {
        let model = mesh.model;
        let full = drive(&mut [&mut mesh.full], model, 1000 + i as u64, g);
        let [a, b, c] = &mut mesh.split[..] else {
            unreachable!()
        };
        let split = drive(&mut [a, b, c], model, 2000 + i as u64, g);
        assert!(
            full.error.is_none(),
            "seed {i} runs on one stage: {:?}",
            full.error
        );
        assert!(
            split.error.is_none(),
            "seed {i} runs on three: {:?}",
            split.error
        );
        for (split, run) in [(false, full), (true, split)] {
            recorded.push(Recorded {
                split,
                graph_bytes: g.to_postcard(),
                received: run.received,
            });
        }
    }
    // Raw-byte corpus: every encoding of every seed and recorded message.
    let mut corpus: Vec<Vec<u8>> = seeds.iter().map(Graph::to_postcard).collect();
    corpus.extend(seeds.iter().map(|g| g.to_json().into_bytes()));
    for r in &recorded {
        for reqs in &r.received {
            corpus.extend(
                reqs.iter()
                    .map(|s| codec::encode(&Request::Step(Box::new(s.clone())))),
            );
        }
    }
    corpus.push(codec::encode(&Request::Info));

    // Panics in guarded calls are recorded and reported as crashes; any
    // other panic is a bug of the harness and printed as usual.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        LAST_PANIC.with(|m| *m.borrow_mut() = info.to_string());
        if QUIET.with(std::cell::Cell::get) == 0 {
            default_hook(info);
        }
    }));
    let mut rng = Rng::new(seed);
    let mut tally = Tally::default();
    let t0 = Instant::now();
    let mut last_report = t0;
    while tally.cases < max_cases && budget.is_none_or(|b| t0.elapsed() < b) {
        let case = tally.cases;
        match rng.below(10) {
            0..=2 => bytes_case(&mut rng, &mut tally, case, &corpus),
            3..=4 => {
                let mut g = rng.pick(&seeds).clone();
                mutate::graph(&mut rng, &mut g);
                run_graph_case(&mut rng, &mut tally, case, &mut mesh, &g);
            }
            5 => {
                let g = rng.pick(&seeds).clone();
                json_case(&mut rng, &mut tally, case, &mut mesh, &g);
            }
            _ => {
                let r = &recorded[rng.below(recorded.len())];
                step_case(&mut rng, &mut tally, case, &mut mesh, r);
            }
        }
        tally.cases += 1;
        if last_report.elapsed() > Duration::from_secs(30) {
            last_report = Instant::now();
            eprintln!(
                "[fuzz] {} cases, {} crashes, {:.0} s",
                tally.cases,
                tally.crashes.len(),
                t0.elapsed().as_secs_f64()
            );
        }
    }
    let _ = std::panic::take_hook();

    let secs = t0.elapsed().as_secs_f64();
    println!(
        "fuzz: {} cases in {secs:.1} s ({:.0}/s), seed {seed}",
        tally.cases,
        tally.cases as f64 / secs
    );
    println!("outcomes by target and kind:");
    for (k, n) in &tally.outcomes {
        println!("  {n:>8}  {k}");
    }
    println!(
        "divergences (one stage vs three): {}",
        tally.divergences.len()
    );
    println!("crashes: {}", tally.crashes.len());
    for c in tally.crashes.iter().filter(|c| !c.is_empty()) {
        println!("  {c}");
    }
    for d in tally.divergences.iter().take(5) {
        println!("  divergence {d}");
    }
    assert!(tally.crashes.is_empty(), "{} crashes", tally.crashes.len());
    assert!(
        tally.divergences.is_empty(),
        "{} graphs gave different saves on one stage and on three",
        tally.divergences.len()
    );
}

/// Found by the fuzzer (seed 777, case 16343): a carried value of the right
/// dtype and rank but the wrong shape reached `apply model.norm` on the last
/// stage, and libtorch panicked inside the stage (contained, but a missing
/// check). Carried values are now checked against the plan's exact shape.
#[test]
fn regression_a_carried_value_of_the_wrong_shape_is_refused() {
    let mut mesh = mesh();
    let lens = seeds().remove(0);
    let model = mesh.model;
    let [a, b, c] = &mut mesh.split[..] else {
        unreachable!("three stages")
    };
    let run = drive(&mut [a, b, c], model, 1, &lens);
    assert!(run.error.is_none(), "{:?}", run.error);
    let mut bad = run.received[2][0].clone();
    bad.request = RequestId(2);
    let carried = bad
        .input
        .carry
        .first_mut()
        .expect("the lens carries values to the last stage");
    carried.value = WireTensor::from_f32(vec![10, 0], &[]).expect("consistent");
    let last = &mut mesh.split[2];
    let e = last.step(&bad).expect_err("refused");
    assert_eq!(e.kind, nnmesh_protocol::message::ErrorKind::Malformed);
    assert!(e.message.contains("carried node"), "{}", e.message);
    assert_eq!(last.panics(), 0, "refused before any tensor op");
}

/// Positions a trace's prompt fills: its longest invoke (the fuzz seeds give
/// token ids, never text).
fn trace_positions(graph: &Graph, trace: usize) -> u32 {
    graph.traces[trace]
        .invokes
        .iter()
        .map(|i| match &i.prompt {
            nnmesh_graph::Prompt::Tokens(t) => t.len() as u32,
            nnmesh_graph::Prompt::Text(_) => unreachable!("fuzz seeds give token ids"),
        })
        .max()
        .unwrap_or(0)
}

/// A replacement stage, given a hop's history to replay, reaches the state
/// the original had: its output at the next step matches the original's.
/// Steps with interventions on the hop replay one by one, bit for bit;
/// generated tokens it has nothing to do at replay as one forward, equal
/// up to rounding.
#[test]
fn a_replacement_replays_to_the_state_of_the_stage_it_replaces() {
    let mut mesh = mesh();
    let model = mesh.model;
    let prompt = vec![5u32, 17, 200, 3, 9];
    // Hop 1 (layer 1) steered at every step.
    let steered = {
        let g = Builder::new();
        let t = g
            .trace_tokens(vec![prompt.clone(), vec![7, 8]])
            .generate(12);
        let v = g.vector(DType::F32, vec![0.25; 64]);
        g.add_at(
            t.at("model.layers.1", Point::Output).all_steps(),
            [Full, At(-1), Full],
            v,
        );
        g.finish()
    };
    // Hop 1 has work at step 0 only: steps 1.. replay in one forward.
    let plain = {
        let g = Builder::new();
        let t = g
            .trace_tokens(vec![prompt.clone(), vec![7, 8]])
            .generate(12);
        g.save("h", g.read(t.at("model.layers.1", Point::Output).step(0)));
        g.finish()
    };
    for (name, graph, chunked) in [("steered", steered, 0), ("plain", plain, 10)] {
        let [a, b, c] = &mut mesh.split[..] else {
            unreachable!("three stages")
        };
        let run = drive(&mut [a, b, c], model, 1, &graph);
        assert!(run.error.is_none(), "{name}: {:?}", run.error);
        let hop1 = &run.received[1];
        let (live, history) = hop1.split_last().expect("steps");
        let mut req = live.clone();
        req.request = RequestId(2);
        req.graph = Some(graph.to_postcard());
        req.replay = history.iter().map(|r| r.input.clone()).collect();
        let cfg = Config {
            ..Config::new(Default::default(), Span::new(0, 3))
        };
        let mut fresh = Stage::new(engine(1..2), &cfg);
        let out = fresh.step(&req).expect("the replacement replays and runs");
        assert_eq!(
            out.chunked, chunked,
            "{name}: steps replayed in one forward"
        );
        // What the original hop 1 handed hop 2 at the live step.
        let want = run.received[2]
            .last()
            .expect("hop 2 ran")
            .input
            .hidden
            .clone();
        let Next::Hidden(got) = out.next else {
            panic!("{name}: hop 1 hands on a hidden state")
        };
        let want = want.expect("a hidden state");
        let (g, w) = (got.to_f32().expect("f32"), want.to_f32().expect("f32"));
        let diff = g
            .iter()
            .zip(&w)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!(
            "{name}: replayed {} steps ({chunked} in one forward); max |diff| {diff:e}",
            history.len()
        );
        if chunked == 0 {
            assert_eq!(got, want, "{name}: step-by-step replay is bit-identical");
        } else {
            assert!(
                diff < 1e-4,
                "{name}: replay in one forward is off by {diff}"
            );
        }
    }
}
