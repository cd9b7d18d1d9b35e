//! Graphs the fault tests share: generations with interventions on every
//! stage, per-step saves, and values relayed back to an earlier stage.

use nnmesh_graph::{Builder, DType, Graph, IndexItem::*, Point, recipes};

/// Two invokes of different lengths (so the prompt is padded), generating
/// `new_tokens` with a steering vector added at layer 5 at every step, a
/// value from layer 25 at step 0 added back at layer 3 from step 1 on (a
/// relay from the last stage to the first), and per-step saves on every
/// stage of a three-way split.
pub fn steered_generation(new_tokens: u32) -> Graph {
    let g = Builder::new();
    let t = g
        .trace_tokens(vec![vec![504, 414, 46682, 314, 253], vec![1, 2, 3]])
        .generate(new_tokens);
    let v = g.vector(DType::F32, vec![0.5; 576]);
    g.add_at(
        t.at("model.layers.5", Point::Output).all_steps(),
        [Full, At(-1), Full],
        v,
    );
    let back = g
        .read(t.at("model.layers.25", Point::Output).step(0))
        .index([Full, At(-1), Full])
        .scale(0.05);
    g.add_at(
        t.at("model.layers.3", Point::Output).steps(1..new_tokens),
        [Full, At(-1), Full],
        back,
    );
    for (name, layer) in [("l8", 8), ("l15", 15), ("l27", 27)] {
        g.save(
            name,
            g.read(
                t.at(&format!("model.layers.{layer}"), Point::Output)
                    .all_steps(),
            )
            .index([Full, At(-1), Full]),
        );
    }
    g.save(
        "top",
        g.read(t.at("lm_head", Point::Output).all_steps())
            .index([Full, At(-1), Full])
            .argmax(-1, false),
    );
    g.finish()
}

/// A logit lens at every generation step: layers 12 and 22 through the
/// final norm and `lm_head` (computed on the last stage from values carried
/// from earlier ones).
pub fn lens_per_step(new_tokens: u32) -> Graph {
    let g = Builder::new();
    let t = g.trace([recipes::prompts::LENS]).generate(new_tokens);
    for layer in [12, 22] {
        let h = g
            .read(
                t.at(&format!("model.layers.{layer}"), Point::Output)
                    .all_steps(),
            )
            .index([Full, At(-1), Full]);
        let logits = g.apply("lm_head", [g.apply("model.norm", [h])]);
        g.save(format!("lens{layer}"), logits.argmax(-1, false));
    }
    g.finish()
}

/// Attention patterns at every step of a two-invoke generation, with a
/// head's output ablated.
pub fn attention_per_step(new_tokens: u32) -> Graph {
    let g = Builder::new();
    let t = g
        .trace([recipes::prompts::IOI_CLEAN, recipes::prompts::STEER])
        .generate(new_tokens);
    g.save(
        "pattern18",
        g.read(
            t.at("model.layers.18.self_attn", Point::Pattern)
                .all_steps(),
        ),
    );
    g.add_at(
        t.at("model.layers.9.mlp", Point::Output).all_steps(),
        [Full, At(-1), Full],
        g.vector(DType::F32, vec![-0.25; 576]),
    );
    g.save(
        "out",
        g.read(t.at("model.norm", Point::Output).all_steps())
            .index([Full, At(-1), Full]),
    );
    g.finish()
}

/// The chaos test's four experiments: each generates, intervenes on every
/// stage and saves per step; the last is a two-trace session (a direction
/// from trace 0 steers trace 1).
pub fn chaos_set() -> Vec<(&'static str, Graph)> {
    vec![
        ("steered", steered_generation(8)),
        ("lens", lens_per_step(6)),
        ("attention", attention_per_step(5)),
        (
            "session",
            recipes::steering(
                recipes::prompts::STEER,
                recipes::prompts::STEER_TOWARD,
                recipes::prompts::STEER_AWAY,
                14,
                4.0,
                6,
            ),
        ),
    ]
}
