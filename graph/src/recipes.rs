//! The canonical experiments as Intervention Graphs, built with the
//! [`Builder`]. The CLI's `lens`, `patch`, `steer`, `ablate` and `attention`
//! commands run these, and `examples/*.json` are [`example`]'s output for
//! the SmolLM2 demo prompts (a test keeps them in step).
//!
//! ```
//! use nnmesh_graph::recipes::{self, prompts};
//! let lens = recipes::logit_lens(prompts::LENS, 0..30);
//! assert_eq!(lens.nodes.iter().filter(|n| n.kind() == "save").count(), 30);
//! assert_eq!(recipes::example("lens", 30), Some(lens));
//! ```

use crate::{
    builder::Builder,
    ir::{ConstTensor, DType, Graph, IndexItem, IndexItem::*, Point},
};

/// Logit lens: for every layer `l` in `layers`, `lm_head(model.norm(layers.l.output))`
/// at the last position, saved as `lens.l` (`[1, vocab]` logits).
///
/// The last position is taken *before* the head, so each layer costs one row
/// of the head, and the interpreter batches all layers into one head call.
pub fn logit_lens(prompt: &str, layers: impl IntoIterator<Item = u32>) -> Graph {
    let g = Builder::new();
    let t = g.trace([prompt]);
    for l in layers {
        let h = g.read(t.at(&format!("model.layers.{l}"), Point::Output));
        let last = h.index([Full, At(-1)]);
        let logits = g.apply("lm_head", [g.apply("model.norm", [last])]);
        g.save(format!("lens.{l}"), logits);
    }
    g.stop(t);
    g.finish()
}

/// Activation patching in one batched pass: invoke 0 runs `clean`, invoke 1
/// `corrupt`, and invoke `2 + i` runs `corrupt` with layer `layers[i]`'s
/// residual stream at the last position replaced by the clean run's. Saves the
/// logit difference `answer - wrong` at the last position: `clean`,
/// `corrupt` (scalars) and `patched` (`[layers.len()]`).
///
/// Only the last position's logits are needed, so the graph applies
/// `lm_head` to `model.norm`'s output there (one batched call for every
/// invoke) and stops the forward before its own `lm_head` over all positions.
pub fn patching(clean: &str, corrupt: &str, layers: &[u32], answer: u32, wrong: u32) -> Graph {
    let g = Builder::new();
    let mut prompts = vec![clean, corrupt];
    prompts.extend(std::iter::repeat_n(corrupt, layers.len()));
    let t = g.trace(prompts);
    for (i, &l) in layers.iter().enumerate() {
        let layer = format!("model.layers.{l}");
        let c = g
            .read(t.invoke(0).at(&layer, Point::Output))
            .index([Full, At(-1), Full]);
        g.write_at(
            t.invoke(2 + i as u32).at(&layer, Point::Output),
            [Full, At(-1), Full],
            c,
        );
    }
    let diff = |k: u32| {
        let last = g
            .read(t.invoke(k).at("model.norm", Point::Output))
            .index([Full, At(-1)]);
        let logits = g.apply("lm_head", [last]).index([At(0)]);
        logits.index([At(i64::from(answer))]) - logits.index([At(i64::from(wrong))])
    };
    g.save("clean", diff(0));
    g.save("corrupt", diff(1));
    let patched: Vec<_> = (0..layers.len() as u32).map(|i| diff(2 + i)).collect();
    g.save("patched", g.stack(patched, 0));
    g.stop(t);
    g.finish()
}

/// Steering during generation, as a session of two traces (activation
/// addition, Turner et al. 2023): trace 0 reads the residual stream of
/// `toward` and of `away` at `layer`, and the direction is the difference of
/// their means (positions 1..: the first position is an attention-sink
/// outlier); trace 1 generates `new_tokens` from `prompt`, adding `coef ×`
/// the direction to `layer`'s output at the last position of every step.
/// Saves the direction as `direction`.
pub fn steering(
    prompt: &str,
    toward: &str,
    away: &str,
    layer: u32,
    coef: f64,
    new_tokens: u32,
) -> Graph {
    let g = Builder::new();
    let source = g.trace([toward, away]);
    let target = g.trace([prompt]).generate(new_tokens);
    let module = format!("model.layers.{layer}");
    let mean = |invoke: u32| {
        g.read(source.invoke(invoke).at(&module, Point::Output))
            .index([Full, IndexItem::slice(Some(1), None), Full])
            .mean([1], false)
    };
    let dir = (mean(0) - mean(1)).scale(coef);
    g.save("direction", dir);
    g.add_at(
        target.at(&module, Point::Output).all_steps(),
        [Full, At(-1), Full],
        dir,
    );
    g.finish()
}

/// Adds a constant vector (length `hidden`) to `layer`'s output at the last
/// position of every generation step; a zero vector leaves generation unchanged.
pub fn steering_vector(prompt: &str, layer: u32, vector: Vec<f64>, new_tokens: u32) -> Graph {
    let g = Builder::new();
    let t = g.trace([prompt]).generate(new_tokens);
    let v = g.vector(DType::F32, vector);
    g.add_at(
        t.at(&format!("model.layers.{layer}"), Point::Output)
            .all_steps(),
        [Full, At(-1), Full],
        v,
    );
    g.finish()
}

/// Ablation: zero `layer`'s MLP output, or only attention head `head`'s `z`,
/// and save the last position's logits as `logits`.
pub fn ablation(prompt: &str, layer: u32, head: Option<u32>) -> Graph {
    let g = Builder::new();
    let t = g.trace([prompt]);
    let zero = g.constant(ConstTensor::scalar(0.0));
    match head {
        None => {
            g.write(
                t.at(&format!("model.layers.{layer}.mlp"), Point::Output),
                zero,
            );
        }
        Some(h) => {
            g.write_at(
                t.at(&format!("model.layers.{layer}.self_attn"), Point::Z),
                [Full, Full, At(i64::from(h)), Full],
                zero,
            );
        }
    }
    let logits = g.read(t.at("lm_head", Point::Output)).index([Full, At(-1)]);
    g.save("logits", logits);
    g.finish()
}

/// The last position's logits of a plain forward, saved as `logits`.
pub fn last_logits(prompt: &str) -> Graph {
    let g = Builder::new();
    let t = g.trace([prompt]);
    g.save(
        "logits",
        g.read(t.at("lm_head", Point::Output)).index([Full, At(-1)]),
    );
    g.finish()
}

/// Attention pattern of one layer (`[1, heads, t, t]`, post-softmax) and its row sums.
pub fn attention_pattern(prompt: &str, layer: u32) -> Graph {
    let g = Builder::new();
    let t = g.trace([prompt]);
    let p = g.read(t.at(&format!("model.layers.{layer}.self_attn"), Point::Pattern));
    g.save("pattern", p);
    g.save("row_sums", p.sum([-1], false));
    g.stop(t);
    g.finish()
}

/// The demo prompts of the canonical experiments.
pub mod prompts {
    /// Logit lens prompt.
    pub const LENS: &str = "The Eiffel Tower is in the city of";
    /// Indirect-object identification, clean.
    pub const IOI_CLEAN: &str =
        "After John and Mary went to the store, Mary gave a bottle of milk to";
    /// Indirect-object identification, corrupted (names swapped).
    pub const IOI_CORRUPT: &str =
        "After John and Mary went to the store, John gave a bottle of milk to";
    /// Steering prompt.
    pub const STEER: &str = "Yesterday I went for a walk and saw";
    /// Steering: text whose direction is added.
    pub const STEER_TOWARD: &str = "I love the ocean, the sea, waves and beaches.";
    /// Steering: text whose direction is subtracted.
    pub const STEER_AWAY: &str = "I love the city, the streets, traffic and buildings.";
}

/// SmolLM2's token ids of the IOI answers, `" John"` and `" Mary"`.
pub const SMOLLM2_JOHN_MARY: (u32, u32) = (2322, 5099);

/// The built-in experiments by name, as `examples/NAME.json` holds them.
pub const EXAMPLES: [&str; 6] = [
    "lens",
    "patch",
    "steer",
    "ablate",
    "ablate-head",
    "attention",
];

/// A built-in experiment on the demo prompts (`lens` and `patch` over
/// layers `0..layers`), or `None` for an unknown name.
pub fn example(name: &str, layers: u32) -> Option<Graph> {
    let (john, mary) = SMOLLM2_JOHN_MARY;
    Some(match name {
        "lens" => logit_lens(prompts::LENS, 0..layers),
        "patch" => patching(
            prompts::IOI_CLEAN,
            prompts::IOI_CORRUPT,
            &(0..layers).collect::<Vec<_>>(),
            john,
            mary,
        ),
        "steer" => steering(
            prompts::STEER,
            prompts::STEER_TOWARD,
            prompts::STEER_AWAY,
            12,
            3.0,
            16,
        ),
        "ablate" => ablation(prompts::LENS, 0, None),
        "ablate-head" => ablation(prompts::LENS, 0, Some(3)),
        "attention" => attention_pattern(prompts::LENS, 0),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `examples/*.json` are generated from the recipes, byte for byte.
    #[test]
    fn examples_are_up_to_date() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        for name in EXAMPLES {
            let built = example(name, 30).expect("known example").to_json();
            let file =
                std::fs::read_to_string(dir.join(format!("{name}.json"))).expect("example exists");
            assert_eq!(
                built.trim(),
                file.trim(),
                "examples/{name}.json is stale: regenerate with `nnmesh graph {name}`"
            );
        }
        assert_eq!(example("nope", 30), None);
    }
}
