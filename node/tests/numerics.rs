//! Numerics against Hugging Face transformers on the same GGUF
//! (`tests/fixtures/reference.json`, written by `scripts/reference.py`), and
//! the GGUF dequantizers against llama.cpp's gguf-py (`quants.json`).

mod common;

use nnmesh_node::{
    engine::{Engine, Padded},
    gguf,
    hooks::NoHooks,
    llama::Input,
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
    let p = common::root().join("node/tests/fixtures").join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).expect("fixture exists"))
        .expect("fixture is JSON")
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

/// Checks `logits` ([t, vocab] for one prompt) against one fixture case.
fn check_case(case: &Value, logits: &Tensor, tol: f32) {
    let prompt = case["prompt"].as_str().expect("prompt");
    let slice_w = case["slice"][0].as_array().expect("slice").len() as i64;
    let ours = logits.narrow(1, 0, slice_w);
    let rows = case["slice"].as_array().expect("slice");
    assert_eq!(
        rows.len() as i64,
        logits.size()[0],
        "{prompt}: sequence length"
    );
    let mut worst = 0f32;
    for (p, row) in rows.iter().enumerate() {
        let ours = Vec::<f32>::try_from(&ours.get(p as i64)).expect("f32 row");
        for (a, b) in ours.iter().zip(floats(row)) {
            worst = worst.max((a - b).abs());
        }
    }
    let last = logits.get(-1);
    for (&id, want) in ids(&case["last_top_ids"])
        .iter()
        .zip(floats(&case["last_top_logits"]))
    {
        let got = last.double_value(&[i64::from(id)]) as f32;
        worst = worst.max((got - want).abs());
    }
    assert!(
        worst <= tol,
        "{prompt}: max |ours - transformers| = {worst} > {tol}"
    );
    let (_, top) = last.topk(1, -1, true, true);
    assert_eq!(
        top.int64_value(&[0]) as u32,
        ids(&case["last_top_ids"])[0],
        "{prompt}: top-1 token"
    );
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

#[test]
fn logits_match_transformers() {
    let e = engine();
    let f = fixture("reference.json");
    for case in f["prompts"].as_array().expect("prompts") {
        let logits = e
            .logits(&[ids(&case["ids"])], &mut NoHooks)
            .expect("forward");
        check_case(case, &logits.get(0), 1e-4);
    }
}

#[test]
fn padded_batch_matches_transformers() {
    let e = engine();
    let f = fixture("reference.json");
    let cases = f["batch"].as_array().expect("batch");
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["ids"])).collect();
    let logits = e.logits(&prompts, &mut NoHooks).expect("forward");
    let t = logits.size()[1];
    for (row, case) in cases.iter().enumerate() {
        let len = prompts[row].len() as i64;
        check_case(case, &logits.get(row as i64).narrow(0, t - len, len), 1e-4);
    }
}

#[test]
fn three_way_split_equals_full_model() {
    let full = engine();
    let ckpt = nnmesh_node::checkpoint::Checkpoint::open(&common::model_path()).expect("opens");
    let stages: Vec<_> = [0..10, 10..20, 20..30]
        .into_iter()
        .map(|r| {
            nnmesh_node::llama::Model::load(&ckpt, r, Kind::Float, Device::Cpu)
                .expect("stage loads")
        })
        .collect();
    assert!(stages[0].is_first() && !stages[0].is_last());
    assert!(!stages[1].is_first() && !stages[1].is_last());
    assert!(stages[2].is_last());
    let f = fixture("reference.json");
    let prompts: Vec<Vec<u32>> = f["batch"]
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
    for (row, case) in f["batch"].as_array().expect("batch").iter().enumerate() {
        let len = prompts[row].len() as i64;
        check_case(case, &split.get(row as i64).narrow(0, t - len, len), 1e-4);
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
    let ckpt = nnmesh_node::checkpoint::Checkpoint::open(&quant).expect("header parses");
    let err = nnmesh_node::llama::Model::load(&ckpt, 0..1, Kind::Float, Device::Cpu)
        .expect_err("unsupported quantization");
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

/// Tiny random Hugging Face checkpoints (`scripts/tiny_reference.py`): a
/// sharded Llama with an index file, Llama-3 RoPE scaling and an untied head,
/// and a Qwen2 with q/k/v biases and a tied head.
#[test]
fn safetensors_checkpoints_match_transformers() {
    let f = fixture("tiny.json");
    for arch in ["llama", "qwen2"] {
        let case = &f[arch];
        let dir = common::root()
            .join("node/tests/fixtures")
            .join(case["path"].as_str().expect("path"));
        let ckpt = nnmesh_node::checkpoint::Checkpoint::open(&dir).expect("checkpoint opens");
        let n = ckpt.config.num_hidden_layers;
        let model = nnmesh_node::llama::Model::load(&ckpt, 0..n, Kind::Float, Device::Cpu)
            .expect("model loads");
        let _g = tch::no_grad_guard();
        for (ids, want) in case["ids"]
            .as_array()
            .expect("ids")
            .iter()
            .zip(case["logits"].as_array().expect("logits"))
        {
            let ids = self::ids(ids);
            let padded = Padded::new(std::slice::from_ref(&ids), Device::Cpu);
            let got = model
                .forward(
                    Input::Tokens(padded.ids.shallow_clone()),
                    &padded.batch,
                    None,
                    &mut NoHooks,
                )
                .expect("forward")
                .get(0);
            let want: Vec<f32> = want
                .as_array()
                .expect("rows")
                .iter()
                .flat_map(floats)
                .collect();
            let want = Tensor::from_slice(&want).reshape(got.size());
            let d = (&got - &want).abs().max().double_value(&[]);
            assert!(d < 1e-4, "{arch}: max |ours - transformers| = {d}");
        }
    }
    // The llama config uses transformers 5's rope_parameters with llama3 scaling.
    let cfg = nnmesh_node::checkpoint::Checkpoint::open(
        &common::root().join("node/tests/fixtures/tiny-llama"),
    )
    .expect("opens")
    .config;
    assert!(cfg.rope_scaling.is_some() && cfg.rope_theta == 50_000.0 && !cfg.tie_word_embeddings);
}
