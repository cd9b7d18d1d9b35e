//! Numerics against Hugging Face transformers on the same GGUF
//! (`tests/fixtures/reference.{json,safetensors}`, written by
//! `scripts/reference.py`), the tiny safetensors checkpoints (`tiny.json`,
//! `scripts/tiny_reference.py`), and the GGUF dequantizers against
//! llama.cpp's gguf-py (`quants.json`). Logits are compared with the scaled
//! tolerances of `common` (why those figures: see there), and
//! `planted_bugs_fail_the_checks` shows the same checks fail for real bugs.

mod common;

use std::collections::HashMap;

use common::{LOGITS, TINY_LOGITS, Tolerance, Worst};
use nnmesh_runtime::{
    checkpoint::Checkpoint,
    engine::{Engine, Padded},
    gguf,
    hooks::NoHooks,
    models::llama::{Input, Model},
};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

thread_local! {
    // tch tensors are not Sync: one engine per test thread.
    static ENGINE: &'static Engine = Box::leak(Box::new(common::load_engine()));
}

fn engine() -> &'static Engine {
    ENGINE.with(|e| *e)
}

fn fixture(name: &str) -> Value {
    let p = common::root().join("runtime/tests/fixtures").join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).expect("fixture exists"))
        .expect("fixture is JSON")
}

/// `reference.json` and its logits from `reference.safetensors`.
struct Reference {
    json: Value,
    tensors: HashMap<String, Tensor>,
}

impl Reference {
    fn load() -> Self {
        let json = fixture("reference.json");
        let file = json["tensors"].as_str().expect("tensors file named");
        let tensors =
            Tensor::read_safetensors(common::root().join("runtime/tests/fixtures").join(file))
                .expect("reference.safetensors reads")
                .into_iter()
                .collect();
        Reference { json, tensors }
    }

    fn tensor(&self, name: &str) -> &Tensor {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("{name} in reference.safetensors"))
    }
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

/// The f64 sum of a last row's 49,152 logits, relative to Σ|logit| (rounding
/// in a sum is bounded relative to Σ|x|, not |Σx|, which can cancel). Part of
/// the per-logit drift is a shift of the whole row, so the sums moved by up to
/// 2.0 between kernel sets (AVX-512 vs SSE4.2, on a row summing to 609,568),
/// 3.3e-6 of Σ|logit|, and by 0.19 on a row whose logits nearly cancel (sum
/// 21,770, Σ|logit| 116,899). 1e-5 of Σ|logit| is 3x the worst.
const SUM_RTOL_OF_ABS: f64 = 1e-5;

/// Compares `logits` ([t, vocab] for one prompt) with one fixture case, part
/// by part: `compare(what, ours, reference, tolerance)`.
fn compare_case(
    case: &Value,
    reference: &Reference,
    logits: &Tensor,
    compare: &mut dyn FnMut(&str, &Tensor, &Tensor, Tolerance),
) {
    let prompt = case["prompt"].as_str().expect("prompt");
    let name = case["tensors"].as_str().expect("tensors");
    assert_eq!(
        logits.size()[0],
        ids(&case["ids"]).len() as i64,
        "{prompt:?}: sequence length"
    );
    let columns = reference.tensor("columns");
    compare(
        &format!(
            "{prompt:?}: {} hashed columns, every position",
            columns.size()[0]
        ),
        &logits.index_select(1, columns),
        reference.tensor(&format!("{name}.columns")),
        LOGITS,
    );
    compare(
        &format!("{prompt:?}: top logits, every position"),
        &logits.gather(1, reference.tensor(&format!("{name}.top_ids")), false),
        reference.tensor(&format!("{name}.top_logits")),
        LOGITS,
    );
    let want_last = reference.tensor(&format!("{name}.last"));
    compare(
        &format!("{prompt:?}: whole last row"),
        &logits.get(-1),
        want_last,
        LOGITS,
    );
    let sum = case["last_logits_sum"].as_f64().expect("last_logits_sum");
    let abs_sum = want_last.abs().sum(Kind::Double).double_value(&[]);
    compare(
        &format!("{prompt:?}: sum of the last row"),
        &logits.get(-1).sum(Kind::Double).reshape([1]),
        &Tensor::from_slice(&[sum]),
        Tolerance {
            atol: SUM_RTOL_OF_ABS * abs_sum,
            rtol: 0.0,
        },
    );
}

/// Asserts `logits` ([t, vocab] for one prompt) match one fixture case.
fn check_case(case: &Value, reference: &Reference, logits: &Tensor) {
    compare_case(case, reference, logits, &mut |what, ours, want, tol| {
        common::assert_close(what, ours, want, tol);
    });
    let prompt = case["prompt"].as_str().expect("prompt");
    let (_, top) = logits.get(-1).topk(1, -1, true, true);
    assert_eq!(
        top.int64_value(&[0]) as u32,
        ids(&case["last_top_ids"])[0],
        "{prompt:?}: top-1 token"
    );
}

/// Keeps in `worst` whichever of it and `(what, w)` is further outside its bound.
fn keep_worst(worst: &mut Option<(String, Worst)>, what: &str, w: Worst) {
    if worst
        .as_ref()
        .is_none_or(|(_, old)| w.ratio() > old.ratio())
    {
        *worst = Some((what.to_string(), w));
    }
}

/// `model`'s logits ([t, vocab]) for one unpadded prompt.
fn forward_one(model: &Model, ids: &[u32]) -> Tensor {
    let _g = tch::no_grad_guard();
    let padded = Padded::new(&[ids.to_vec()], Device::Cpu);
    model
        .forward(
            Input::Tokens(padded.ids.shallow_clone()),
            &padded.batch,
            None,
            &mut NoHooks,
        )
        .expect("forward")
        .get(0)
}

/// The worst violation over every part of every case, for a model that should fail.
fn worst_over_cases(reference: &Reference, model: &Model) -> (String, Worst) {
    let mut worst: Option<(String, Worst)> = None;
    for case in reference.json["prompts"].as_array().expect("prompts") {
        let logits = forward_one(model, &ids(&case["ids"]));
        compare_case(case, reference, &logits, &mut |what, ours, want, tol| {
            keep_worst(&mut worst, what, common::closeness(what, ours, want, tol));
        });
    }
    worst.expect("the fixture has cases")
}

#[test]
fn tokenizer_ids_match_transformers() {
    let e = engine();
    let f = fixture("reference.json");
    for case in f["prompts"].as_array().expect("prompts") {
        let prompt = case["prompt"].as_str().expect("prompt");
        assert_eq!(
            e.encode(prompt).expect("encodes"),
            ids(&case["ids"]),
            "{prompt:?}"
        );
        assert_eq!(
            e.tokenizer.decode(&ids(&case["ids"])).expect("decodes"),
            prompt
        );
    }
}

/// The tokenizer a node sends a weightless client (as `tokenizer.json`)
/// tokenizes like the one it loaded from the GGUF file.
#[test]
fn the_tokenizer_travels_as_json() {
    let e = engine();
    let json = e.tokenizer.to_json().expect("serializes");
    let sent = nnmesh_runtime::tokenizer::Tokenizer::from_json(json.as_bytes()).expect("loads");
    let f = fixture("reference.json");
    for case in f["prompts"].as_array().expect("prompts") {
        let prompt = case["prompt"].as_str().expect("prompt");
        assert_eq!(
            sent.encode(prompt).expect("encodes"),
            ids(&case["ids"]),
            "{prompt:?}"
        );
        assert_eq!(sent.decode(&ids(&case["ids"])).expect("decodes"), prompt);
    }
    assert_eq!(sent.vocab_size(), e.tokenizer.vocab_size());
    assert!(nnmesh_runtime::tokenizer::Tokenizer::from_json(b"not json").is_err());
}

#[test]
fn logits_match_transformers() {
    let e = engine();
    let r = Reference::load();
    for case in r.json["prompts"].as_array().expect("prompts") {
        let logits = e
            .logits(&[ids(&case["ids"])], &mut NoHooks)
            .expect("forward");
        check_case(case, &r, &logits.get(0));
    }
}

#[test]
fn padded_batch_matches_transformers() {
    let e = engine();
    let r = Reference::load();
    let cases = r.json["batch"].as_array().expect("batch");
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["ids"])).collect();
    let logits = e.logits(&prompts, &mut NoHooks).expect("forward");
    let t = logits.size()[1];
    for (row, case) in cases.iter().enumerate() {
        let len = prompts[row].len() as i64;
        check_case(case, &r, &logits.get(row as i64).narrow(0, t - len, len));
    }
}

#[test]
fn three_way_split_equals_full_model() {
    let full = engine();
    let ckpt = Checkpoint::open(&common::model_path()).expect("opens");
    let stages: Vec<_> = [0..10, 10..20, 20..30]
        .into_iter()
        .map(|r| Model::load(&ckpt, r, Kind::Float, Device::Cpu).expect("stage loads"))
        .collect();
    assert!(stages[0].is_first() && !stages[0].is_last());
    assert!(!stages[1].is_first() && !stages[1].is_last());
    assert!(stages[2].is_last());
    let r = Reference::load();
    let prompts: Vec<Vec<u32>> = r.json["batch"]
        .as_array()
        .expect("batch")
        .iter()
        .map(|c| ids(&c["ids"]))
        .collect();
    let padded = Padded::new(&prompts, Device::Cpu);
    let _g = tch::no_grad_guard();
    let mut x = Input::Tokens(padded.ids.shallow_clone());
    let mut out = None;
    for s in &stages {
        let y = s
            .forward(x, &padded.batch, None, &mut NoHooks)
            .expect("stage forward");
        x = Input::Hidden(y.shallow_clone());
        out = Some(y);
    }
    let split = out.expect("three stages ran");
    let whole = full.logits(&prompts, &mut NoHooks).expect("forward");
    assert!(
        split.equal(&whole),
        "split logits differ from the full model"
    );
    // And each case still matches transformers.
    let t = split.size()[1];
    for (row, case) in r.json["batch"]
        .as_array()
        .expect("batch")
        .iter()
        .enumerate()
    {
        let len = prompts[row].len() as i64;
        check_case(case, &r, &split.get(row as i64).narrow(0, t - len, len));
    }
}

#[test]
fn greedy_generation_matches_transformers() {
    let e = engine();
    let f = fixture("reference.json");
    let g = &f["generate"];
    let prompt = e
        .encode(g["prompt"].as_str().expect("prompt"))
        .expect("encodes");
    let want = ids(&g["ids"]);
    let out = e
        .generate(
            &[prompt.clone(), prompt],
            want.len(),
            &mut NoHooks,
            &mut |_, _| {},
        )
        .expect("generates");
    assert_eq!(out[0], want);
    assert_eq!(out[1], want);
    assert!(
        e.tokenizer
            .decode(&out[0])
            .expect("decodes")
            .contains("Paris")
    );
}

#[test]
fn padded_generation_equals_unpadded() {
    let e = engine();
    let long = e
        .encode("The Eiffel Tower is in the city of")
        .expect("encodes");
    let short = e.encode("Hello, my name").expect("encodes");
    let alone = |p: &Vec<u32>| {
        e.generate(std::slice::from_ref(p), 6, &mut NoHooks, &mut |_, _| {})
            .expect("generates")
            .remove(0)
    };
    let both = e
        .generate(
            &[long.clone(), short.clone()],
            6,
            &mut NoHooks,
            &mut |_, _| {},
        )
        .expect("generates");
    assert_eq!(both[0], alone(&long));
    assert_eq!(both[1], alone(&short));
}

#[test]
fn dequantization_matches_gguf_py() {
    for case in fixture("quants.json").as_array().expect("cases") {
        let name = case["name"].as_str().expect("name");
        let hex = case["raw"].as_str().expect("raw");
        let raw: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
            .collect();
        let want = floats(&case["values"]);
        let got = gguf::dequantize(
            case["type"].as_u64().expect("type") as u32,
            &raw,
            want.len(),
        )
        .unwrap_or_else(|| panic!("{name} is supported"));
        assert_eq!(got.len(), want.len(), "{name}");
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                "{name}[{i}]: {a} vs {b}"
            );
        }
    }
}

#[test]
fn bad_inputs_give_clear_errors() {
    let dir = std::env::temp_dir().join(format!("nnmesh-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let load =
        |p: &std::path::Path, layers| Engine::load(p, layers, Kind::Float, Device::Cpu).map(|_| ());

    let missing = load(&dir.join("nope.gguf"), None).expect_err("missing file");
    assert!(missing.to_string().contains("does not exist"), "{missing}");

    let bytes = std::fs::read(common::model_path()).expect("model");
    let truncated = dir.join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).expect("write");
    let err = load(&truncated, None).expect_err("truncated file");
    assert!(err.to_string().contains("truncated"), "{err}");
    let header_only = dir.join("header.gguf");
    std::fs::write(&header_only, &bytes[..1000]).expect("write");
    let err = load(&header_only, None).expect_err("truncated header");
    assert!(err.to_string().contains("truncated"), "{err}");

    let not_gguf = dir.join("text.gguf");
    std::fs::write(&not_gguf, b"hello world, not a model").expect("write");
    let err = load(&not_gguf, None).expect_err("not gguf");
    assert!(err.to_string().contains("not a GGUF file"), "{err}");

    let err = load(&common::model_path(), Some(25..31)).expect_err("range outside");
    assert!(
        err.to_string().contains("outside the model's 30 layers"),
        "{err}"
    );

    let e = engine();
    let long = vec![504u32; e.model.config().max_position_embeddings + 1];
    let err = e.logits(&[long], &mut NoHooks).expect_err("too long");
    assert!(err.to_string().contains("context"), "{err}");
    let err = e.logits(&[vec![60_000]], &mut NoHooks).expect_err("bad id");
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");

    // An unsupported architecture, and an unsupported quantization type.
    let arch = dir.join("arch.gguf");
    std::fs::write(&arch, tiny_gguf("gptneox", 0)).expect("write");
    let err = load(&arch, None).expect_err("unsupported architecture");
    assert!(
        err.to_string()
            .contains("architecture \"gptneox\" is not supported"),
        "{err}"
    );
    let quant = dir.join("quant.gguf");
    std::fs::write(&quant, tiny_gguf("llama", 13)).expect("write");
    let ckpt = Checkpoint::open(&quant).expect("header parses");
    let err =
        Model::load(&ckpt, 0..1, Kind::Float, Device::Cpu).expect_err("unsupported quantization");
    assert!(err.to_string().contains("Q5_K"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// A minimal GGUF: llama-style metadata for a 1-layer model whose embedding
/// has ggml type `ty` (all other tensors are absent).
fn tiny_gguf(arch: &str, ty: u32) -> Vec<u8> {
    fn s(out: &mut Vec<u8>, v: &str) {
        out.extend((v.len() as u64).to_le_bytes());
        out.extend(v.as_bytes());
    }
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend(1u64.to_le_bytes()); // tensors
    let u32s = [
        ("block_count", 1u32),
        ("embedding_length", 256),
        ("feed_forward_length", 512),
        ("attention.head_count", 4),
        ("context_length", 64),
    ];
    out.extend((1 + u32s.len() as u64 + 1).to_le_bytes()); // kv pairs
    s(&mut out, "general.architecture");
    out.extend(8u32.to_le_bytes());
    s(&mut out, arch);
    for (k, v) in u32s {
        s(&mut out, &format!("{arch}.{k}"));
        out.extend(4u32.to_le_bytes());
        out.extend(v.to_le_bytes());
    }
    s(&mut out, &format!("{arch}.vocab_size"));
    out.extend(4u32.to_le_bytes());
    out.extend(8u32.to_le_bytes());
    s(&mut out, "token_embd.weight");
    out.extend(2u32.to_le_bytes());
    out.extend(256u64.to_le_bytes());
    out.extend(8u64.to_le_bytes());
    out.extend(ty.to_le_bytes());
    out.extend(0u64.to_le_bytes());
    while !out.len().is_multiple_of(32) {
        out.push(0);
    }
    out.extend(vec![0u8; 256 * 8 * 4]);
    out
}

#[test]
fn closeness_finds_the_element_furthest_outside_its_bound() {
    let reference = [1.0f32, 100.0, -3.0, 0.0, 5.0, 6.0];
    let tol = Tolerance {
        atol: 1e-3,
        rtol: 1e-2,
    };
    let t = |v: [f32; 6]| Tensor::from_slice(&v).reshape([2, 3]);
    let worst = |ours: [f32; 6]| common::closeness("t", &t(ours), &t(reference), tol);
    // 100 may move by 1.001, 1 only by 0.011: +0.9 at [0, 1] is inside its
    // bound, +0.5 at [0, 0] is 45x outside.
    let w = worst([1.5, 100.9, -3.0, 0.0, 5.0, 6.0]);
    assert_eq!(w.index, [0, 0]);
    assert!(
        w.violated() && (w.ratio() - 0.5 / 0.011).abs() < 1e-3,
        "{w}"
    );
    let w = worst([1.0, 100.9, -3.0, 0.0, 5.0, 6.0]);
    assert_eq!(w.index, [0, 1]);
    assert!(!w.violated(), "{w}");
    // A NaN is the worst violation of all.
    let w = worst([1.5, 100.9, -3.0, 0.0, 5.0, f32::NAN]);
    assert_eq!(w.index, [1, 2]);
    assert!(w.violated() && w.ratio().is_infinite(), "{w}");
    // Equal values pass even a zero bound.
    let zero = Tolerance {
        atol: 0.0,
        rtol: 0.0,
    };
    assert!(!common::closeness("t", &t(reference), &t(reference), zero).violated());
}

/// A tiny checkpoint of `tiny.json` (`"llama"` or `"qwen2"`), opened.
fn tiny_checkpoint(arch: &str) -> Checkpoint {
    let path = fixture("tiny.json")[arch]["path"]
        .as_str()
        .expect("path")
        .to_string();
    Checkpoint::open(&common::root().join("runtime/tests/fixtures").join(path))
        .expect("checkpoint opens")
}

/// Runs `tiny.json`'s prompts for `arch` through a model loaded from `ckpt`:
/// `compare(what, ours, reference)` for each prompt's logits.
fn compare_tiny(arch: &str, ckpt: &Checkpoint, compare: &mut dyn FnMut(&str, &Tensor, &Tensor)) {
    let f = fixture("tiny.json");
    let case = &f[arch];
    let n = ckpt.config.num_hidden_layers;
    let model = Model::load(ckpt, 0..n, Kind::Float, Device::Cpu).expect("model loads");
    for (i, (ids, want)) in case["ids"]
        .as_array()
        .expect("ids")
        .iter()
        .zip(case["logits"].as_array().expect("logits"))
        .enumerate()
    {
        let got = forward_one(&model, &self::ids(ids));
        let want: Vec<f32> = want
            .as_array()
            .expect("rows")
            .iter()
            .flat_map(floats)
            .collect();
        let want = Tensor::from_slice(&want).reshape(got.size());
        compare(&format!("tiny {arch}, prompt {i}"), &got, &want);
    }
}

/// Tiny random Hugging Face checkpoints (`scripts/tiny_reference.py`): a
/// sharded Llama with an index file, Llama-3 RoPE scaling and an untied head,
/// and a Qwen2 with q/k/v biases and a tied head; both with random biases and
/// norm weights.
#[test]
fn safetensors_checkpoints_match_transformers() {
    for arch in ["llama", "qwen2"] {
        compare_tiny(arch, &tiny_checkpoint(arch), &mut |what, ours, want| {
            common::assert_close(what, ours, want, TINY_LOGITS);
        });
    }
    // The llama config uses transformers 5's rope_parameters with llama3 scaling.
    let cfg = tiny_checkpoint("llama").config;
    assert!(cfg.rope_scaling.is_some() && cfg.rope_theta == 50_000.0 && !cfg.tie_word_embeddings);
    // The qwen2 checkpoint really has biases for the checks above to test.
    let qwen = tiny_checkpoint("qwen2");
    let bias = qwen
        .tensor(
            "model.layers.0.self_attn.k_proj.bias",
            Kind::Float,
            Device::Cpu,
        )
        .expect("k bias");
    assert!(qwen.config.attention_bias && bias.abs().max().double_value(&[]) > 0.1);
}

/// The tolerances are loose enough for any CPU's kernels, but not for a bug:
/// each planted bug below must fail the same checks the tests above pass.
#[test]
fn planted_bugs_fail_the_checks() {
    let fails = |what: &str, worst: (String, Worst)| {
        eprintln!("{what} fails: {}: {}", worst.0, worst.1);
        assert!(
            worst.1.violated(),
            "{what} passed the checks: {}: {}",
            worst.0,
            worst.1
        );
    };
    let reference = Reference::load();
    let smollm = Checkpoint::open(&common::model_path()).expect("opens");
    assert_eq!(smollm.config.rope_theta, 100_000.0);
    let n = smollm.config.num_hidden_layers;
    for (theta, what) in [
        (10_000.0, "SmolLM2 with RoPE base 1e4 instead of 1e5"),
        (101_000.0, "SmolLM2 with RoPE base 1.01e5 instead of 1e5"),
    ] {
        let mut ckpt = Checkpoint::open(&common::model_path()).expect("opens");
        ckpt.config.rope_theta = theta;
        let model = Model::load(&ckpt, 0..n, Kind::Float, Device::Cpu).expect("loads");
        fails(what, worst_over_cases(&reference, &model));
    }

    // Qwen2 without its q/k/v biases: the loader skips them when the
    // config says there are none.
    let mut qwen = tiny_checkpoint("qwen2");
    qwen.config.attention_bias = false;
    let mut worst: Option<(String, Worst)> = None;
    compare_tiny("qwen2", &qwen, &mut |what, ours, want| {
        keep_worst(
            &mut worst,
            what,
            common::closeness(what, ours, want, TINY_LOGITS),
        );
    });
    fails(
        "tiny Qwen2 without q/k/v biases",
        worst.expect("tiny prompts ran"),
    );
}
