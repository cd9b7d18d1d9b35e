//! Several requests in one packed forward (how a stage batches concurrent
//! clients): each gets what it gets alone, sees and writes only its own
//! rows, and stops or fails alone.

mod common;

use common::{LOGITS, Tolerance, closeness};
use nnmesh_graph::{Graph, Limits, Module, Point, recipes};
use nnmesh_runtime::{
    engine::{Engine, Padded},
    execute::{self, Outcome},
    hooks::{HookError, Hooks, NoHooks},
    models::llama::{Input, Segment},
};
use tch::Tensor;

thread_local! {
    static ENGINE: &'static Engine = Box::leak(Box::new(common::load_engine()));
}

fn engine() -> &'static Engine {
    ENGINE.with(|e| *e)
}

/// The bound on a saved value of a request run packed beside others
/// against the same run alone: `atol + 5e-4·|ref| + 2e-5·max|ref|`. A matrix
/// product over more rows may round differently (other kernel blocking), by
/// an amount that scales with the values the row carries rather than with
/// each element: measured on an Intel Xeon (AVX-512), the six examples
/// packed together differ by at most 3.1e-6 of a save's largest value (an
/// element near zero in a residual stream of hundreds moves by ~1e-3; the
/// worst element is at 0.1 of this bound).
fn tolerance(reference: &Tensor) -> Tolerance {
    let largest = reference.abs().max().double_value(&[]);
    Tolerance {
        atol: LOGITS.atol + 2e-5 * largest,
        rtol: 5e-4,
    }
}

fn tokenized(name: &str) -> Graph {
    let mut g = common::example(name);
    execute::tokenize_prompts(engine(), &mut g).expect("tokenizes");
    g
}

fn alone(g: &Graph) -> Outcome {
    execute::run(engine(), g.clone(), &Limits::default()).expect("runs alone")
}

fn together(graphs: &[Graph]) -> Vec<Result<Outcome, execute::Error>> {
    let e = engine();
    let manifest = e.manifest();
    let plans: Vec<_> = graphs
        .iter()
        .map(|g| execute::plan(g, &manifest, &Limits::default()).expect("valid"))
        .collect();
    let pairs: Vec<_> = graphs.iter().zip(&plans).collect();
    execute::run_many(e, &pairs, &manifest, true)
}

/// Every example experiment, packed together (lens, patching, steering with
/// generation, ablation, attention patterns; different prompt lengths,
/// batch rows and step counts), gives each its result alone.
#[test]
fn packed_graphs_give_their_results_alone() {
    let names = recipes::EXAMPLES;
    let graphs: Vec<Graph> = names.iter().map(|n| tokenized(n)).collect();
    let packed = together(&graphs);
    let mut worst = 0.0f64;
    let mut worst_scaled = 0.0f64;
    let mut identical = (0, 0);
    for ((name, g), out) in names.iter().zip(&graphs).zip(packed) {
        let out = out.unwrap_or_else(|e| panic!("{name} fails packed: {e}"));
        let reference = alone(g);
        assert_eq!(
            out.generated, reference.generated,
            "{name}: generated tokens"
        );
        assert_eq!(out.saves.len(), reference.saves.len(), "{name}: saves");
        for (a, b) in out.saves.iter().zip(&reference.saves) {
            assert_eq!((&a.name, a.step), (&b.name, b.step), "{name}: save order");
            let w = closeness(
                &format!("{name}: {}", a.name),
                &a.value,
                &b.value,
                tolerance(&b.value),
            );
            assert!(!w.violated(), "{name}: save {}: {w}", a.name);
            worst = worst.max(w.ratio());
            let scale = b.value.abs().max().double_value(&[]);
            let diff = (&a.value - &b.value).abs().max().double_value(&[]);
            worst_scaled = worst_scaled.max(diff / scale.max(1e-30));
            identical.1 += 1;
            if a.value.equal(&b.value) {
                identical.0 += 1;
            }
        }
    }
    eprintln!(
        "packed vs alone: {} of {} saves bit-identical; worst at {worst:.3} of the bound; \
         largest difference {worst_scaled:.2e} of its save's largest value",
        identical.0, identical.1
    );
}

/// A graph that fails (here: a token id outside the vocabulary, planted
/// after validation) fails alone; the others run to their results.
#[test]
fn a_failing_graph_fails_alone() {
    let e = engine();
    let manifest = e.manifest();
    let graphs = [tokenized("lens"), tokenized("steer"), tokenized("patch")];
    let plans: Vec<_> = graphs
        .iter()
        .map(|g| execute::plan(g, &manifest, &Limits::default()).expect("valid"))
        .collect();
    let mut bad = graphs[1].clone();
    let nnmesh_graph::Prompt::Tokens(ids) = &mut bad.traces[0].invokes[0].prompt else {
        panic!("tokenized")
    };
    ids[0] = manifest.vocab + 5;
    let pairs = [
        (&graphs[0], &plans[0]),
        (&bad, &plans[1]),
        (&graphs[2], &plans[2]),
    ];
    let out = execute::run_many(e, &pairs, &manifest, true);
    let err = out[1].as_ref().expect_err("the bad token is refused");
    assert!(err.to_string().contains("vocab"), "{err}");
    for i in [0, 2] {
        let o = out[i].as_ref().expect("the others run");
        let r = alone(&graphs[i]);
        assert_eq!(o.saves.len(), r.saves.len());
        for (a, b) in o.saves.iter().zip(&r.saves) {
            let w = closeness(&a.name, &a.value, &b.value, tolerance(&b.value));
            assert!(!w.violated(), "{w}");
        }
    }
}

/// Hooks written against the runtime: what they see, and what they do.
#[derive(Default)]
struct Probe {
    /// Every `(layer, shape)` seen at a layer's output.
    seen: Vec<(u32, Vec<i64>)>,
    /// At this layer's output: replace the rows with this value.
    write: Option<(u32, f64)>,
    /// At this layer's output: fail, stop, panic, or reshape.
    act: Option<(u32, Act)>,
}

#[derive(Clone, Copy)]
enum Act {
    Fail,
    Stop,
    Panic,
    Reshape,
}

impl Hooks for Probe {
    fn wants(&self, m: Module, p: Point) -> bool {
        matches!((m, p), (Module::Layer(_), Point::Output))
    }
    fn visit(&mut self, m: Module, _: Point, v: &mut Tensor) -> Result<(), HookError> {
        let Module::Layer(l) = m else { return Ok(()) };
        self.seen.push((l, v.size()));
        if let Some((at, x)) = self.write
            && at == l
        {
            *v = v.full_like(x);
        }
        match self.act {
            Some((at, Act::Fail)) if at == l => Err(HookError::Input(
                nnmesh_runtime::error::InputError::Shape(vec![-1]),
            )),
            Some((at, Act::Stop)) if at == l => Err(HookError::Stop),
            Some((at, Act::Panic)) if at == l => panic!("a planted panic"),
            Some((at, Act::Reshape)) if at == l => {
                *v = v.narrow(1, 0, 1);
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// Prompts of different lengths and row counts, one segment each.
fn prompts() -> Vec<Vec<Vec<u32>>> {
    let e = engine();
    let ids = |t: &str| e.encode(t).expect("encodes");
    vec![
        vec![ids("The Eiffel Tower is in the city of")],
        vec![
            ids("Hello, my name is"),
            ids("One, two, three, four, five,"),
        ],
        vec![ids(
            "When Mary and John went to the store, John gave a drink to",
        )],
        vec![ids("The capital of France is")],
    ]
}

/// Runs `prompts` as one packed forward under `probes`.
fn packed(prompts: &[Vec<Vec<u32>>], probes: &mut [Probe]) -> Vec<Result<Tensor, HookError>> {
    let model = &engine().model;
    let padded: Vec<Padded> = prompts
        .iter()
        .map(|p| Padded::new(p, model.device()))
        .collect();
    let segments = padded
        .iter()
        .zip(probes.iter_mut())
        .map(|(p, probe)| Segment {
            input: Input::Tokens(p.ids.shallow_clone()),
            batch: &p.batch,
            cache: None,
            hooks: probe as &mut dyn Hooks,
        })
        .collect();
    tch::no_grad(|| model.forward_packed(model.layers(), segments))
}

fn alone_logits(prompt: &[Vec<u32>]) -> Tensor {
    engine().logits(prompt, &mut NoHooks).expect("runs")
}

#[test]
fn hooks_see_only_their_own_rows_and_writes_stay_in_them() {
    let ps = prompts();
    let mut probes: Vec<Probe> = ps.iter().map(|_| Probe::default()).collect();
    // Request 1 overwrites its residual stream with a huge value at layer 3.
    probes[1].write = Some((3, 1e4));
    let outs = packed(&ps, &mut probes);
    for (i, (p, probe)) in ps.iter().zip(&probes).enumerate() {
        let t = p.iter().map(Vec::len).max().expect("a prompt") as i64;
        let own = vec![p.len() as i64, t, 576];
        assert_eq!(probe.seen.len(), 30, "request {i} sees every layer once");
        assert!(
            probe.seen.iter().all(|(_, s)| *s == own),
            "request {i} sees only its rows: {:?}",
            probe.seen
        );
        let out = outs[i].as_ref().expect("runs");
        if i == 1 {
            assert!(
                !out.allclose(&alone_logits(p), 1e-3, 1e-3, false),
                "the write changed its own logits"
            );
        } else {
            let want = alone_logits(p);
            let w = closeness(&format!("request {i}"), out, &want, tolerance(&want));
            assert!(
                !w.violated(),
                "request {i} untouched by request 1's write: {w}"
            );
        }
    }
}

#[test]
fn a_stop_a_failure_a_panic_or_a_reshape_ends_that_request_only() {
    let ps = prompts();
    let mut probes: Vec<Probe> = ps.iter().map(|_| Probe::default()).collect();
    probes[0].act = Some((2, Act::Stop));
    probes[1].act = Some((5, Act::Panic));
    probes[2].act = Some((7, Act::Reshape));
    let mut outs = packed(&ps, &mut probes);
    assert!(matches!(outs[0], Err(HookError::Stop)), "{:?}", outs[0]);
    assert!(
        matches!(&outs[1], Err(HookError::Panic(m)) if m.contains("a planted panic")),
        "{:?}",
        outs[1]
    );
    assert!(
        matches!(&outs[2], Err(HookError::Replaced { at, .. }) if at == "model.layers.7.output"),
        "{:?}",
        outs[2]
    );
    // The stopped request saw nothing after its stop.
    assert_eq!(probes[0].seen.last().map(|s| s.0), Some(2));
    let last = outs
        .pop()
        .expect("four")
        .expect("the fourth runs to its end");
    let want = alone_logits(&ps[3]);
    let w = closeness("request 3", &last, &want, tolerance(&want));
    assert!(!w.violated(), "{w}");

    // A failure beside a request that stops later: the stop still comes
    // where that request asked, not earlier.
    let mut probes: Vec<Probe> = ps.iter().map(|_| Probe::default()).collect();
    probes[0].act = Some((1, Act::Fail));
    probes[3].act = Some((20, Act::Stop));
    let outs = packed(&ps, &mut probes);
    assert!(matches!(outs[0], Err(HookError::Input(_))));
    assert!(matches!(outs[3], Err(HookError::Stop)));
    assert_eq!(probes[3].seen.len(), 21, "layers 0..=20");
    for i in [1, 2] {
        let want = alone_logits(&ps[i]);
        let w = closeness(
            "others",
            outs[i].as_ref().expect("runs"),
            &want,
            tolerance(&want),
        );
        assert!(!w.violated(), "{w}");
    }
}
