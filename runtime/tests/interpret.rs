//! The Intervention Graph interpreter on SmolLM2: reads leave the forward
//! untouched, and the canonical experiments (run from `examples/*.json`)
//! give the numbers of the same computation done directly with runtime hooks.

mod common;

use common::{LOGITS, RESIDUAL, Tolerance};
use nnmesh_graph::{Builder, Graph, IndexItem::*, Limits, Module, Point, recipes};
use nnmesh_runtime::{
    engine::Engine,
    execute::{self, Outcome},
    hooks::{HookError, Hooks, NoHooks},
};
use tch::{Kind, Tensor};

thread_local! {
    // tch tensors are not Sync: one engine per test thread.
    static ENGINE: &'static Engine = Box::leak(Box::new(common::load_engine()));
}

fn engine() -> &'static Engine {
    ENGINE.with(|e| *e)
}

fn run(graph: Graph) -> Outcome {
    execute::run(engine(), graph, &Limits::default()).expect("graph runs")
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

const LENS: &str = recipes::prompts::LENS;

/// Hooks written directly against the runtime, for reference computations.
struct Direct<F: FnMut(Module, Point, &mut Tensor)> {
    points: Vec<(Module, Point)>,
    f: F,
}

impl<F: FnMut(Module, Point, &mut Tensor)> Hooks for Direct<F> {
    fn wants(&self, m: Module, p: Point) -> bool {
        self.points.contains(&(m, p))
    }
    fn visit(&mut self, m: Module, p: Point, v: &mut Tensor) -> Result<(), HookError> {
        (self.f)(m, p, v);
        Ok(())
    }
}

fn layer_out(l: u32) -> (Module, Point) {
    (Module::Layer(l), Point::Output)
}

#[test]
fn read_only_graph_leaves_logits_bit_identical() {
    let e = engine();
    let ids = e.encode(LENS).expect("encodes");
    let plain = e
        .logits(std::slice::from_ref(&ids), &mut NoHooks)
        .expect("forward");
    let g = Builder::new();
    let t = g.trace([LENS]);
    for (m, p) in [
        ("model.embed_tokens", Point::Input),
        ("model.embed_tokens", Point::Output),
        ("model.layers.0", Point::Input),
        ("model.layers.3.input_layernorm", Point::Output),
        ("model.layers.3.self_attn", Point::Q),
        ("model.layers.3.self_attn", Point::K),
        ("model.layers.3.self_attn", Point::V),
        ("model.layers.3.self_attn", Point::Z),
        ("model.layers.3.self_attn.o_proj", Point::Input),
        ("model.layers.7.mlp.down_proj", Point::Input),
        ("model.layers.7.mlp", Point::Output),
        ("model.layers.29", Point::Output),
        ("model.norm", Point::Output),
    ] {
        let v = g.read(t.at(m, p));
        g.save(format!("{m}.{p}"), v);
    }
    g.save("logits", g.read(t.at("lm_head", Point::Output)));
    let out = run(g.finish());
    assert!(
        out.get("logits").expect("saved").equal(&plain),
        "reads changed the logits"
    );
    assert_eq!(
        out.get("model.layers.3.self_attn.q").expect("q").size(),
        [1, 9, 9, 64]
    );
    assert_eq!(
        out.get("model.layers.3.self_attn.k").expect("k").size(),
        [1, 3, 9, 64]
    );
    assert_eq!(
        out.get("model.layers.3.self_attn.z").expect("z").size(),
        [1, 9, 9, 64]
    );
    let z = out
        .get("model.layers.3.self_attn.z")
        .expect("z")
        .reshape([1, 9, 576]);
    assert!(
        z.equal(
            out.get("model.layers.3.self_attn.o_proj.input")
                .expect("o_proj in")
        )
    );
    let ids_read = out.get("model.embed_tokens.input").expect("ids");
    assert_eq!(
        Vec::<i64>::try_from(ids_read.flatten(0, -1)).expect("i64"),
        ids.iter().map(|&i| i64::from(i)).collect::<Vec<_>>()
    );
}

#[test]
fn writing_the_value_just_read_changes_nothing() {
    let e = engine();
    let plain = e
        .logits(&[e.encode(LENS).expect("encodes")], &mut NoHooks)
        .expect("forward");
    let g = Builder::new();
    let t = g.trace([LENS]);
    let h = g.read(t.at("model.layers.5", Point::Output));
    g.write(t.at("model.layers.5", Point::Output), h);
    let last = g
        .read(t.at("model.layers.9.mlp", Point::Output))
        .index([Full, At(-1), Full]);
    g.write_at(
        t.at("model.layers.9.mlp", Point::Output),
        [Full, At(-1), Full],
        last,
    );
    let zero = g.scalar(0.0);
    g.add_at(t.at("model.layers.12", Point::Output), [Full, At(-1)], zero);
    g.save("logits", g.read(t.at("lm_head", Point::Output)));
    let out = run(g.finish());
    assert!(out.get("logits").expect("saved").equal(&plain));
}

#[test]
fn logit_lens_matches_direct_hooks() {
    let e = engine();
    let out = run(common::example("lens"));
    let mut hs = Vec::new();
    let mut hooks = Direct {
        points: (0..30).map(layer_out).collect(),
        f: |_, _, v: &mut Tensor| hs.push(v.shallow_clone()),
    };
    let _ = e
        .logits(&[e.encode(LENS).expect("encodes")], &mut hooks)
        .expect("forward");
    assert_eq!(hs.len(), 30);
    for (l, h) in hs.iter().enumerate() {
        let last = h.select(1, -1);
        let normed = e.model.apply(Module::Norm, &last).expect("norm");
        let direct = e.model.apply(Module::LmHead, &normed).expect("head");
        let lens = out.get(&format!("lens.{l}")).expect("lens saved");
        common::assert_close(&format!("lens of layer {l}"), lens, &direct, LOGITS);
    }
    let top = |l: u32| {
        out.get(&format!("lens.{l}"))
            .expect("lens")
            .argmax(-1, false)
            .int64_value(&[0])
    };
    let paris = e.encode(" Paris").expect("encodes")[0] as i64;
    assert_eq!(top(29), paris);
    assert_eq!(top(28), paris);
}

fn logit_diff(logits: &Tensor, a: i64, b: i64) -> f64 {
    let last = logits.get(0).get(-1);
    last.double_value(&[a]) - last.double_value(&[b])
}

/// Asserts two scalars (logit differences) agree within `tol`.
fn assert_scalar_close(name: &str, ours: f64, reference: f64, tol: Tolerance) {
    common::assert_close(
        name,
        &Tensor::from_slice(&[ours]),
        &Tensor::from_slice(&[reference]),
        tol,
    );
}

#[test]
fn activation_patching_matches_direct_hooks() {
    let e = engine();
    let out = run(common::example("patch"));
    let (john, mary) = (2322i64, 5099i64);
    let clean_ids = e.encode(recipes::prompts::IOI_CLEAN).expect("encodes");
    let corrupt_ids = e.encode(recipes::prompts::IOI_CORRUPT).expect("encodes");
    let mut clean = Vec::new();
    let mut hooks = Direct {
        points: (0..30).map(layer_out).collect(),
        f: |_, _, v: &mut Tensor| clean.push(v.select(1, -1).copy()),
    };
    let clean_logits = e
        .logits(std::slice::from_ref(&clean_ids), &mut hooks)
        .expect("forward");
    let corrupt_logits = e
        .logits(std::slice::from_ref(&corrupt_ids), &mut NoHooks)
        .expect("forward");
    let clean_d = logit_diff(&clean_logits, john, mary);
    let saved = |name: &str| out.get(name).expect("saved").double_value(&[]);
    assert_scalar_close("clean logit difference", saved("clean"), clean_d, LOGITS);
    let corrupt_d = logit_diff(&corrupt_logits, john, mary);
    assert_scalar_close(
        "corrupt logit difference",
        saved("corrupt"),
        corrupt_d,
        LOGITS,
    );
    assert!(
        clean_d > 0.0 && corrupt_d < 0.0,
        "the model solves IOI: {clean_d} {corrupt_d}"
    );
    let patched = Vec::<f64>::try_from(out.get("patched").expect("patched").to_kind(Kind::Double))
        .expect("f64");
    assert_eq!(patched.len(), 30);
    for l in [0u32, 10, 20, 23, 29] {
        let v = clean[l as usize].shallow_clone();
        let mut hooks = Direct {
            points: vec![layer_out(l)],
            f: |_, _, h: &mut Tensor| {
                let h2 = h.copy();
                h2.select(1, -1).copy_(&v);
                *h = h2;
            },
        };
        let logits = e
            .logits(std::slice::from_ref(&corrupt_ids), &mut hooks)
            .expect("forward");
        let d = logit_diff(&logits, john, mary);
        assert_scalar_close(
            &format!("patched layer {l}: graph vs direct"),
            patched[l as usize],
            d,
            LOGITS,
        );
    }
    // Patching the last layer restores the clean answer entirely.
    assert_scalar_close("patched layer 29 vs clean", patched[29], clean_d, LOGITS);
}

#[test]
fn patching_the_clean_run_into_itself_gives_the_clean_difference() {
    let layers: Vec<u32> = (0..30).collect();
    let p = recipes::prompts::IOI_CLEAN;
    let out = run(recipes::patching(p, p, &layers, 2322, 5099));
    let clean = out.get("clean").expect("clean").double_value(&[]);
    let patched = Vec::<f64>::try_from(out.get("patched").expect("patched").to_kind(Kind::Double))
        .expect("f64");
    for (l, &d) in patched.iter().enumerate() {
        assert_scalar_close(&format!("layer {l} vs clean"), d, clean, LOGITS);
    }
}

#[test]
fn shared_rows_give_the_same_patching_result() {
    let out = run(common::example("patch"));
    let unshared = execute::run_with(
        engine(),
        common::example("patch"),
        &Limits::default(),
        false,
    )
    .expect("runs");
    for name in ["clean", "corrupt", "patched"] {
        let (a, b) = (
            out.get(name).expect("saved"),
            unshared.get(name).expect("saved"),
        );
        common::assert_close(name, a, b, LOGITS);
    }
}

#[test]
fn steering_with_zero_vector_equals_plain_generation() {
    let e = engine();
    let prompt = e.encode(recipes::prompts::STEER).expect("encodes");
    let plain = e
        .generate(
            std::slice::from_ref(&prompt),
            8,
            &mut NoHooks,
            &mut |_, _| {},
        )
        .expect("generates");
    let zero = run(recipes::steering_vector(
        recipes::prompts::STEER,
        10,
        vec![0.0; 576],
        8,
    ));
    assert_eq!(zero.generated[0], plain);
    let scaled_zero = run(recipes::steering(
        recipes::prompts::STEER,
        recipes::prompts::STEER_TOWARD,
        recipes::prompts::STEER_AWAY,
        10,
        0.0,
        8,
    ));
    assert_eq!(scaled_zero.generated[1], plain);
}

#[test]
fn steering_matches_direct_hooks_and_changes_the_text() {
    let e = engine();
    let out = run(common::example("steer"));
    let dir = out
        .get("direction")
        .expect("direction saved")
        .shallow_clone();
    assert_eq!(dir.size(), [1, 576]);
    let prompt = e.encode(recipes::prompts::STEER).expect("encodes");
    let mut hooks = Direct {
        points: vec![layer_out(12)],
        f: |_, _, h: &mut Tensor| {
            let h2 = h.copy();
            let mut last = h2.select(1, -1);
            last += &dir;
            *h = h2;
        },
    };
    let direct = e
        .generate(
            std::slice::from_ref(&prompt),
            16,
            &mut hooks,
            &mut |_, _| {},
        )
        .expect("generates");
    assert_eq!(out.generated[1], direct);
    let plain = e
        .generate(
            std::slice::from_ref(&prompt),
            16,
            &mut NoHooks,
            &mut |_, _| {},
        )
        .expect("generates");
    assert_ne!(out.generated[1], plain, "steering changed nothing");
}

#[test]
fn ablations_match_direct_hooks() {
    // The graph and the direct hooks run the same ops on the same shapes:
    // bit-identical with the AVX-512, AVX2 and SSE4.2 kernels alike, so
    // this stays far below the kernel drift that `LOGITS` allows for.
    const SAME_OPS: Tolerance = Tolerance {
        atol: 1e-5,
        rtol: 0.0,
    };
    let e = engine();
    let ids = e.encode(LENS).expect("encodes");
    // Zero layer 0's MLP output.
    let out = run(common::example("ablate"));
    let mut hooks = Direct {
        points: vec![(Module::Mlp(0), Point::Output)],
        f: |_, _, v: &mut Tensor| *v = v.zeros_like(),
    };
    let direct = e
        .logits(std::slice::from_ref(&ids), &mut hooks)
        .expect("forward")
        .select(1, -1);
    common::assert_close(
        "MLP 0 ablated",
        out.get("logits").expect("logits"),
        &direct,
        SAME_OPS,
    );
    // Zero head 3 of layer 0's z.
    let out = run(common::example("ablate-head"));
    let mut hooks = Direct {
        points: vec![(Module::Attn(0), Point::Z)],
        f: |_, _, v: &mut Tensor| {
            let v2 = v.copy();
            let _ = v2.select(2, 3).fill_(0.0);
            *v = v2;
        },
    };
    let direct = e
        .logits(std::slice::from_ref(&ids), &mut hooks)
        .expect("forward")
        .select(1, -1);
    common::assert_close(
        "head 0.3 ablated",
        out.get("logits").expect("logits"),
        &direct,
        SAME_OPS,
    );
    let plain = e
        .logits(std::slice::from_ref(&ids), &mut NoHooks)
        .expect("forward")
        .select(1, -1);
    assert!(
        max_diff(&plain, &direct) > 1e-3,
        "head ablation changed nothing"
    );
}

#[test]
fn attention_pattern_rows_sum_to_one_and_match_direct_hooks() {
    let e = engine();
    let out = run(common::example("attention"));
    let p = out.get("pattern").expect("pattern");
    assert_eq!(p.size(), [1, 9, 9, 9]);
    let sums = out.get("row_sums").expect("sums");
    assert!(max_diff(sums, &sums.ones_like()) < 1e-5);
    // Causal: nothing above the diagonal.
    assert_eq!(p.triu(1).abs().max().double_value(&[]), 0.0);
    let mut direct = None;
    let mut hooks = Direct {
        points: vec![(Module::Attn(0), Point::Pattern)],
        f: |_, _, v: &mut Tensor| direct = Some(v.copy()),
    };
    let _ = e
        .logits(&[e.encode(LENS).expect("encodes")], &mut hooks)
        .expect("forward");
    assert!(p.equal(&direct.expect("pattern hooked")));
}

#[test]
fn invoke_views_strip_padding() {
    // The short prompt's layer output and attention pattern, read as one
    // invoke of a left-padded batch and alone.
    let views = |prompts: &[&str], invoke: u32| {
        let g = Builder::new();
        let t = g.trace(prompts.iter().copied());
        let at = |m: &str, p| g.read(t.invoke(invoke).at(m, p));
        g.save("h", at("model.layers.4", Point::Output));
        g.save("pattern", at("model.layers.4.self_attn", Point::Pattern));
        run(g.finish())
    };
    let short = "Hello, my name is";
    let (together, alone) = (views(&[LENS, short], 1), views(&[short], 0));
    // Attention probabilities lie in [0, 1], so an absolute bound fits them.
    let probabilities = Tolerance {
        atol: 1e-5,
        rtol: 0.0,
    };
    for (name, tol) in [("h", RESIDUAL), ("pattern", probabilities)] {
        let (a, b) = (
            together.get(name).expect("saved"),
            alone.get(name).expect("saved"),
        );
        common::assert_close(name, a, b, tol);
    }
}

#[test]
fn per_step_reads_during_generation() {
    let g = Builder::new();
    let t = g.trace([LENS]).generate(4);
    let h = g.read(t.at("model.layers.29", Point::Output).all_steps());
    g.save("h", h);
    g.save(
        "k3",
        g.read(t.at("model.layers.2.self_attn", Point::Pattern).step(3)),
    );
    let out = run(g.finish());
    let steps: Vec<(Option<u32>, Vec<i64>)> = out
        .saves
        .iter()
        .filter(|s| s.name == "h")
        .map(|s| (s.step, s.value.size()))
        .collect();
    assert_eq!(
        steps,
        [
            (Some(0), vec![1, 9, 576]),
            (Some(1), vec![1, 1, 576]),
            (Some(2), vec![1, 1, 576]),
            (Some(3), vec![1, 1, 576])
        ]
    );
    assert_eq!(out.get("k3").expect("pattern").size(), [1, 9, 1, 12]);
    let e = engine();
    assert!(
        e.tokenizer
            .decode(&out.generated[0][0])
            .expect("decodes")
            .contains("Paris")
    );
}

#[test]
fn validation_errors_reach_the_caller() {
    let g = Builder::new();
    let t = g.trace([LENS]);
    let h = g.read(t.at("model.layers.40", Point::Output));
    g.save("h", h);
    let err = execute::run(engine(), g.finish(), &Limits::default()).expect_err("invalid");
    assert!(err.to_string().contains("model.layers.40"), "{err}");

    let g = Builder::new();
    let t = g.trace([LENS]);
    let late = g.read(t.at("model.layers.5", Point::Output));
    g.write(t.at("model.layers.3", Point::Output), late);
    let err = execute::run(engine(), g.finish(), &Limits::default()).expect_err("out of order");
    let msg = err.to_string();
    assert!(
        msg.contains("model.layers.3.output") && msg.contains("model.layers.5.output"),
        "{msg}"
    );
}

#[test]
fn reading_the_attention_pattern_changes_logits_only_by_rounding() {
    // The pattern is materialized with an explicit softmax instead of the
    // fused attention kernel, so logits agree to rounding, not bit for bit.
    let e = engine();
    let plain = e
        .logits(&[e.encode(LENS).expect("encodes")], &mut NoHooks)
        .expect("forward");
    let g = Builder::new();
    let t = g.trace([LENS]);
    for l in [0, 14, 29] {
        g.read(t.at(&format!("model.layers.{l}.self_attn"), Point::Pattern));
    }
    g.save("logits", g.read(t.at("lm_head", Point::Output)));
    let out = run(g.finish());
    common::assert_close(
        "logits with pattern reads vs plain",
        out.get("logits").expect("saved"),
        &plain,
        LOGITS,
    );
}
