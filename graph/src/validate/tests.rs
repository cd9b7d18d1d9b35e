use super::*;
use crate::{
    builder::Builder,
    ir::{ConstTensor, Hook, IndexItem::*, Invoke, Node, Point, Steps, Trace},
    manifest::tests::tiny,
    op::Op,
};

const PROMPT: u32 = 9;

fn inputs_for(g: &Graph) -> Inputs {
    Inputs {
        traces: g
            .traces
            .iter()
            .map(|t| {
                t.invokes
                    .iter()
                    .map(|i| match &i.prompt {
                        Prompt::Tokens(ids) => ids.len() as u32,
                        Prompt::Text(_) => PROMPT,
                    })
                    .collect()
            })
            .collect(),
    }
}

fn check(g: &Graph) -> Result<Plan, ValidateError> {
    validate(g, &tiny(), &inputs_for(g), &Limits::default())
}

fn err(g: &Graph) -> ValidateError {
    check(g).expect_err("graph should be rejected")
}

/// Asserts the error's message mentions every `needle`.
fn assert_names(e: &ValidateError, needles: &[&str]) {
    let msg = e.to_string();
    for n in needles {
        assert!(msg.contains(n), "{msg:?} should mention {n:?}");
    }
}

#[test]
fn logit_lens_over_every_layer() {
    let g = Builder::new();
    let t = g.trace(["The Eiffel Tower is in the city of"]);
    for l in 0..4 {
        let h = g.read(t.at(&format!("model.layers.{l}"), Point::Output));
        let logits = g.apply("lm_head", [g.apply("model.norm", [h])]);
        g.save(
            format!("lens{l}"),
            logits.index([Full, At(-1)]).topk_indices(3, -1),
        );
    }
    g.stop(t);
    let graph = g.finish();
    let plan = check(&graph).expect("valid");
    let m = tiny();
    // lm_head(norm(layers.0.output)) runs right after layer 0's output.
    let l0 = m.position(Module::Layer(0), Point::Output).expect("site");
    assert_eq!(
        plan.nodes[2].anchor,
        Anchor {
            trace: 0,
            step: 0,
            position: l0
        }
    );
    assert_eq!(
        plan.nodes[2].meta,
        TensorMeta::new([1, PROMPT as u64, 32], DType::Bf16)
    );
    assert_eq!(plan.nodes[4].meta, TensorMeta::new([1, 3], DType::I64));
    assert_eq!(plan.saved_bytes, 4 * 3 * 8);
    // The last read is layer 3's output: the forward may stop there.
    let l3 = m.position(Module::Layer(3), Point::Output).expect("site");
    assert_eq!(
        plan.stops[0],
        Some(Anchor {
            trace: 0,
            step: 0,
            position: l3
        })
    );
    let order = plan.order();
    assert_eq!(order.len(), graph.nodes.len());
    assert!(
        order
            .windows(2)
            .all(|w| plan.nodes[w[0].index()].anchor <= plan.nodes[w[1].index()].anchor)
    );
}

#[test]
fn activation_patching_across_invokes() {
    let g = Builder::new();
    let t = g.trace(["clean prompt", "corrupted prompt"]);
    for l in [1, 2] {
        let layer = format!("model.layers.{l}");
        let clean = g.read(t.invoke(0).at(&layer, Point::Output));
        g.write(
            t.invoke(1).at(&layer, Point::Output),
            clean.index([Full, At(-1), Full]),
        )
        .index([Full, At(-1), Full]);
    }
    let logits = g.read(t.invoke(1).at("lm_head", Point::Output));
    g.save("logits", logits.index([Full, At(-1)]));
    let graph = g.finish();
    let plan = check(&graph).expect("valid");
    assert_eq!(plan.nodes[0].meta.shape, [1, PROMPT as u64, 8]);
}

#[test]
fn patching_between_traces_of_a_session() {
    let g = Builder::new();
    let clean = g.trace(["clean"]);
    let corrupt = g.trace(["corrupt"]);
    let h = g.read(clean.at("model.layers.3", Point::Output));
    g.write(corrupt.at("model.layers.3", Point::Output), h);
    // A later trace's value written into an earlier trace is out of order.
    let h2 = g.read(corrupt.at("model.layers.0", Point::Output));
    g.write(clean.at("model.layers.2", Point::Output), h2);
    let e = err(&g.finish());
    assert!(
        matches!(
            e,
            ValidateError::OutOfOrder {
                node: NodeId(3),
                ..
            }
        ),
        "{e}"
    );
    assert_names(
        &e,
        &[
            "model.layers.2.output (trace 0",
            "model.layers.0.output (trace 1",
        ],
    );
}

#[test]
fn steering_during_generation() {
    let g = Builder::new();
    let t = g.trace(["Once upon a time"]).generate(5);
    let v = g.vector(DType::F32, vec![0.0; 8]);
    g.add_at(
        t.at("model.layers.2", Point::Output).all_steps(),
        [Full, At(-1), Full],
        v,
    );
    let logits = g.read(t.at("lm_head", Point::Output).all_steps());
    let token = logits.index([Full, At(-1)]).argmax(-1, false);
    g.save("tokens", token);
    let graph = g.finish();
    let plan = check(&graph).expect("valid");
    let write = &plan.nodes[1];
    assert_eq!(
        write.per_step,
        Some(StepSet {
            trace: 0,
            start: 0,
            end: 5
        })
    );
    assert_eq!(plan.nodes[2].meta.shape, [1, PROMPT as u64, 32]);
    assert_eq!(
        plan.meta_at(NodeId(2), 3).map(|m| m.shape.clone()),
        Some(vec![1, 1, 32])
    );
    assert_eq!(plan.meta_at(NodeId(2), 5), None);
    assert_eq!(
        plan.nodes[4].per_step,
        Some(StepSet {
            trace: 0,
            start: 0,
            end: 5
        })
    );
    assert_eq!(plan.saved_bytes, 5 * 8);
}

#[test]
fn ablations() {
    let g = Builder::new();
    let t = g.trace(["x"]);
    let mlp = g.read(t.at("model.layers.1.mlp", Point::Output));
    g.write(t.at("model.layers.1.mlp", Point::Output), mlp.zeros_like());
    // Zero head 1 of z.
    let zero = g.scalar(0.0);
    g.write_at(
        t.at("model.layers.2.self_attn", Point::Z),
        [Full, Full, At(1), Full],
        zero,
    );
    let graph = g.finish();
    check(&graph).expect("valid");
}

#[test]
fn attention_pattern_per_step() {
    let g = Builder::new();
    let t = g.trace(["x"]).generate(4);
    let p = g.read(t.at("model.layers.0.self_attn", Point::Pattern).all_steps());
    g.save("row_sums", p.sum([-1], false));
    let graph = g.finish();
    let plan = check(&graph).expect("valid");
    let at = |s| plan.meta_at(NodeId(0), s).map(|m| m.shape.clone());
    assert_eq!(at(0), Some(vec![1, 2, 9, 9]));
    assert_eq!(at(1), Some(vec![1, 2, 1, 10]));
    assert_eq!(at(3), Some(vec![1, 2, 1, 12]));
    // Step 0: 2*9 f32... bf16 sums: [1,2,9] + 3 * [1,2,1], 2 bytes each.
    assert_eq!(plan.saved_bytes, (18 + 3 * 2) * 2);
}

#[test]
fn same_hook_read_then_write_is_fine() {
    let g = Builder::new();
    let t = g.trace(["x"]);
    let h = g.read(t.at("model.layers.1", Point::Output));
    g.write(t.at("model.layers.1", Point::Output), h.scale(2.0));
    let after = g.read(t.at("model.layers.1", Point::Output));
    g.save("h", after);
    let plan = check(&g.finish()).expect("valid");
    assert_eq!(plan.nodes[1].anchor, plan.nodes[2].anchor);
    assert_eq!(
        plan.order(),
        [NodeId(0), NodeId(1), NodeId(2), NodeId(3), NodeId(4)]
    );
}

#[test]
fn out_of_order_names_both_hooks() {
    let g = Builder::new();
    let t = g.trace(["x"]);
    let h5 = g.read(t.at("model.layers.3", Point::Output));
    let v = h5.scale(0.5);
    g.write(t.at("model.layers.1", Point::Output), v);
    let e = err(&g.finish());
    assert_eq!(
        e.to_string(),
        "node 2 writes model.layers.1.output (trace 0, step 0) but its value depends on \
         model.layers.3.output (trace 0, step 0), which runs later in the forward pass"
    );
}

#[test]
fn per_step_writes_need_values_at_each_step() {
    let g = Builder::new();
    let t = g.trace(["x"]).generate(6);
    let h = g.read(t.at("model.layers.0", Point::Output).steps(1..4));
    g.write(t.at("model.layers.2", Point::Output).steps(1..3), h);
    g.write(t.at("model.layers.2", Point::Output).step(3), h);
    check(&g.graph()).expect("subset of steps is fine");
    g.write(t.at("model.layers.2", Point::Output).steps(2..5), h);
    let e = err(&g.finish());
    assert!(
        matches!(
            e,
            ValidateError::StepMismatch {
                node: NodeId(3),
                ..
            }
        ),
        "{e}"
    );
    assert_names(&e, &["node 0", "2..5", "1..4"]);
}

#[test]
fn per_step_values_combine_by_intersection() {
    let g = Builder::new();
    let t = g.trace(["x"]).generate(6);
    let a = g.read(t.at("model.layers.0", Point::Output).steps(0..4));
    let b = g.read(t.at("model.layers.1", Point::Output).steps(2..6));
    let c = g.read(t.at("model.layers.2", Point::Output).step(0));
    let sum = a + b + c;
    g.save("s", sum);
    let plan = check(&g.graph()).expect("valid");
    let p = &plan.nodes[sum.id().index()];
    assert_eq!(
        p.per_step,
        Some(StepSet {
            trace: 0,
            start: 2,
            end: 4
        })
    );
    assert_eq!(p.meta.shape, [1, PROMPT as u64, 8]);
    // A once value only available at a later step cannot feed earlier steps.
    let late = g.read(t.at("model.layers.0", Point::Output).step(3));
    g.save("bad", a + late);
    let e = err(&g.finish());
    assert!(matches!(e, ValidateError::StepMismatch { .. }), "{e}");
    assert_names(&e, &["step 3"]);
}

fn one_trace_graph(nodes: Vec<Node>) -> Graph {
    Graph {
        version: FORMAT_VERSION,
        traces: vec![Trace {
            invokes: vec![Invoke {
                prompt: Prompt::Text("x".into()),
            }],
            max_new_tokens: 0,
        }],
        nodes,
    }
}

fn read(module: &str, point: Point) -> Node {
    Node::Read {
        hook: Hook::new(0, module, point),
    }
}

fn op(op: Op, args: &[u32]) -> Node {
    Node::Op {
        op,
        args: args.iter().map(|&a| NodeId(a)).collect(),
    }
}

#[test]
fn structural_errors() {
    let e = err(&Graph {
        version: 3,
        ..one_trace_graph(vec![])
    });
    assert_eq!(
        e,
        ValidateError::Version {
            found: 3,
            supported: FORMAT_VERSION
        }
    );
    assert_names(&e, &["3"]);

    let e = err(&one_trace_graph(vec![op(Op::Neg, &[5])]));
    assert_eq!(
        e,
        ValidateError::DanglingInput {
            node: NodeId(0),
            input: NodeId(5)
        }
    );
    assert_names(&e, &["node 0", "node 5"]);

    let g = one_trace_graph(vec![
        read("model.layers.0", Point::Output),
        op(Op::Add, &[0, 1]),
    ]);
    let e = err(&g);
    assert_eq!(
        e,
        ValidateError::ForwardReference {
            node: NodeId(1),
            input: NodeId(1)
        }
    );
    assert_names(&e, &["node 1"]);

    let g = one_trace_graph(vec![
        read("model.layers.0", Point::Output),
        Node::Save {
            name: "a".into(),
            value: NodeId(0),
        },
        op(Op::Neg, &[1]),
    ]);
    let e = err(&g);
    assert!(matches!(
        e,
        ValidateError::NotAValue {
            node: NodeId(2),
            input: NodeId(1),
            ..
        }
    ));
    assert_names(&e, &["save"]);

    let e = err(&one_trace_graph(vec![read(
        "model.layers.4",
        Point::Output,
    )]));
    assert!(matches!(e, ValidateError::UnknownModule { .. }));
    assert_names(&e, &["model.layers.4"]);

    let e = err(&one_trace_graph(vec![read(
        "model.layers.1.mlp",
        Point::Pattern,
    )]));
    assert!(matches!(e, ValidateError::UnknownPoint { .. }));
    assert_names(&e, &["model.layers.1.mlp", "pattern"]);

    let mut hook = Hook::new(2, "lm_head", Point::Output);
    let e = err(&one_trace_graph(vec![Node::Read { hook: hook.clone() }]));
    assert_eq!(
        e,
        ValidateError::TraceOutOfRange {
            node: NodeId(0),
            trace: 2,
            traces: 1
        }
    );
    let e = err(&one_trace_graph(vec![Node::Stop { trace: 1 }]));
    assert!(matches!(e, ValidateError::TraceOutOfRange { trace: 1, .. }));

    hook.trace = 0;
    hook.invoke = Some(1);
    let e = err(&one_trace_graph(vec![Node::Read { hook: hook.clone() }]));
    assert_eq!(
        e,
        ValidateError::InvokeOutOfRange {
            node: NodeId(0),
            invoke: 1,
            invokes: 1
        }
    );
    assert_names(&e, &["invoke 1"]);

    hook.invoke = None;
    hook.steps = Steps::At(1);
    let e = err(&one_trace_graph(vec![Node::Read { hook: hook.clone() }]));
    assert_eq!(
        e,
        ValidateError::StepOutOfRange {
            node: NodeId(0),
            step: 1,
            steps: 1
        }
    );
    assert_names(&e, &["step 1"]);
    hook.steps = Steps::Range { start: 2, end: 2 };
    let e = err(&one_trace_graph(vec![Node::Read { hook }]));
    assert_eq!(
        e,
        ValidateError::EmptySteps {
            node: NodeId(0),
            start: 2,
            end: 2
        }
    );
}

#[test]
fn shape_errors() {
    let h = || read("model.layers.0", Point::Output);
    let e = err(&one_trace_graph(vec![
        h(),
        Node::Const {
            value: ConstTensor::vector(DType::F32, vec![0.0; 9]),
        },
        op(Op::Add, &[0, 1]),
    ]));
    assert_eq!(
        e.to_string(),
        "node 2: add: cannot broadcast [1,9,8] with [9]"
    );

    let e = err(&one_trace_graph(vec![h(), op(Op::Where, &[0, 0])]));
    assert!(matches!(
        e,
        ValidateError::Arity {
            node: NodeId(1),
            op: "where",
            found: 2,
            ..
        }
    ));
    assert_names(&e, &["where", "exactly 3"]);

    let e = err(&one_trace_graph(vec![
        h(),
        op(Op::Gather { dim: 0 }, &[0, 0]),
    ]));
    assert!(
        matches!(e, ValidateError::Dtype { op: "gather", .. }),
        "{e}"
    );
    assert_names(&e, &["index must be i64"]);

    let apply = |module: &str, args: Vec<NodeId>| Node::Apply {
        module: module.into(),
        args,
    };
    let e = err(&one_trace_graph(vec![
        h(),
        apply("lm_head", vec![NodeId(0), NodeId(0)]),
    ]));
    assert!(matches!(e, ValidateError::ApplyArgs { found: 2, .. }));
    assert_names(&e, &["lm_head", "got 2"]);
    let e = err(&one_trace_graph(vec![
        h(),
        apply("model.layers.9", vec![NodeId(0)]),
    ]));
    assert!(matches!(e, ValidateError::UnknownModule { .. }));
    let logits = || apply("lm_head", vec![NodeId(0)]);
    let e = err(&one_trace_graph(vec![
        h(),
        logits(),
        apply("model.norm", vec![NodeId(1)]),
    ]));
    assert!(matches!(
        e,
        ValidateError::ApplyShape {
            node: NodeId(2),
            ..
        }
    ));
    assert_names(&e, &["model.norm", "[1,9,32]"]);
}

#[test]
fn write_errors() {
    let write = |value: u32, index: Option<Vec<crate::ir::IndexItem>>| Node::Write {
        hook: Hook::new(0, "model.layers.1", Point::Output),
        value: NodeId(value),
        index,
        mode: crate::ir::WriteMode::Set,
    };
    let vec9 = Node::Const {
        value: ConstTensor::vector(DType::F32, vec![0.0; 9]),
    };
    let e = err(&one_trace_graph(vec![vec9.clone(), write(0, None)]));
    assert!(matches!(
        e,
        ValidateError::WriteShape {
            node: NodeId(1),
            ..
        }
    ));
    assert_names(&e, &["[9]", "[1,9,8]", "model.layers.1.output"]);
    // Indexed: h[:, -1] is [1, 8]; a [9] vector does not fit, an [8] one does.
    let e = err(&one_trace_graph(vec![
        vec9,
        write(0, Some(vec![Full, At(-1)])),
    ]));
    assert_names(&e, &["[1,8]"]);
    let vec8 = Node::Const {
        value: ConstTensor::vector(DType::F32, vec![0.0; 8]),
    };
    check(&one_trace_graph(vec![
        vec8,
        write(0, Some(vec![Full, At(-1)])),
    ]))
    .expect("fits");

    let ids = Node::Const {
        value: ConstTensor::vector(DType::I64, vec![1.0; 8]),
    };
    let e = err(&one_trace_graph(vec![ids, write(0, None)]));
    assert!(matches!(
        e,
        ValidateError::WriteDtype {
            value: DType::I64,
            target: DType::Bf16,
            ..
        }
    ));
    assert_names(&e, &["i64", "bf16"]);

    let s = Node::Const {
        value: ConstTensor::scalar(0.0),
    };
    let e = err(&one_trace_graph(vec![s, write(0, Some(vec![Full, At(9)]))]));
    assert!(matches!(
        e,
        ValidateError::WriteIndex {
            node: NodeId(1),
            ..
        }
    ));
    assert_names(&e, &["index 9"]);
}

#[test]
fn const_and_save_errors() {
    let c = |dtype, shape: Vec<u64>, values: Vec<f64>| Node::Const {
        value: ConstTensor {
            dtype,
            shape,
            values,
        },
    };
    let e = err(&one_trace_graph(vec![c(
        DType::F32,
        vec![2, 3],
        vec![0.0; 5],
    )]));
    assert!(matches!(
        e,
        ValidateError::ConstLength {
            node: NodeId(0),
            expected: 6,
            found: 5,
            ..
        }
    ));
    assert_names(&e, &["[2,3]", "6", "5"]);
    let e = err(&one_trace_graph(vec![c(
        DType::I64,
        vec![2],
        vec![1.0, 1.5],
    )]));
    assert!(matches!(e, ValidateError::ConstValue { index: 1, .. }));
    assert_names(&e, &["1.5", "i64"]);
    let e = err(&one_trace_graph(vec![c(DType::Bool, vec![1], vec![2.0])]));
    assert!(matches!(
        e,
        ValidateError::ConstValue {
            dtype: DType::Bool,
            ..
        }
    ));

    let g = one_trace_graph(vec![c(DType::F32, vec![4], vec![0.0; 4])]);
    let limits = Limits {
        max_const_bytes: 15,
        ..Limits::default()
    };
    let e = validate(&g, &tiny(), &inputs_for(&g), &limits).expect_err("over");
    assert_eq!(
        e,
        ValidateError::ConstBytes {
            total: 16,
            limit: 15
        }
    );

    let save = |name: &str| Node::Save {
        name: name.into(),
        value: NodeId(0),
    };
    let g = one_trace_graph(vec![read("lm_head", Point::Output), save("a"), save("a")]);
    let e = err(&g);
    assert_eq!(
        e,
        ValidateError::DuplicateSave {
            node: NodeId(2),
            name: "a".into()
        }
    );
    assert_names(&e, &["\"a\""]);

    let g = one_trace_graph(vec![read("lm_head", Point::Output), save("a")]);
    let limits = Limits {
        max_saved_bytes: 100,
        ..Limits::default()
    };
    let e = validate(&g, &tiny(), &inputs_for(&g), &limits).expect_err("over");
    assert_eq!(
        e,
        ValidateError::SavedBytes {
            total: 9 * 32 * 2,
            limit: 100
        }
    );
}

#[test]
fn budgets_name_the_limit() {
    let m = tiny();
    // 4 invokes of 10 tokens: 40 batch tokens.
    let g = Graph {
        traces: vec![Trace {
            invokes: (0..4)
                .map(|_| Invoke {
                    prompt: Prompt::Tokens(vec![1; 10]),
                })
                .collect(),
            max_new_tokens: 0,
        }],
        ..Graph::default()
    };
    let inputs = inputs_for(&g);
    let plan = validate(&g, &m, &inputs, &Limits::default()).expect("fits");
    assert_eq!(plan.costs[0].batch_tokens, 40);
    let e = validate(
        &g,
        &m,
        &inputs,
        &Limits {
            max_batch_tokens: 39,
            ..Limits::default()
        },
    )
    .expect_err("over");
    assert!(
        matches!(
            e,
            ValidateError::OverBudget {
                needed: 40,
                limit: 39,
                limit_name: "max_batch_tokens",
                ..
            }
        ),
        "{e}"
    );
    // The activation estimate counts the [rows, tokens, vocab] logits.
    let logits = 40 * u64::from(m.vocab) * 2; // bf16
    assert!(plan.costs[0].activation_bytes > logits);
    let e = validate(
        &g,
        &m,
        &inputs,
        &Limits {
            max_activation_bytes: logits,
            ..Limits::default()
        },
    )
    .expect_err("over");
    assert!(e.to_string().contains("max_activation_bytes"), "{e}");
}

#[test]
fn trace_and_limit_errors() {
    let m = tiny();
    let l = Limits::default();
    let g = one_trace_graph(vec![]);
    let no_traces = Graph {
        traces: vec![],
        ..g.clone()
    };
    assert_eq!(
        validate(&no_traces, &m, &Inputs::default(), &l),
        Err(ValidateError::NoTraces)
    );

    let many = Limits {
        max_nodes: 1,
        ..l.clone()
    };
    let two = one_trace_graph(vec![
        read("lm_head", Point::Output),
        read("lm_head", Point::Input),
    ]);
    let e = validate(&two, &m, &inputs_for(&two), &many).expect_err("too many");
    assert_eq!(e, ValidateError::TooManyNodes { nodes: 2, limit: 1 });

    let mut traces2 = g.clone();
    traces2.traces.push(traces2.traces[0].clone());
    let e = validate(
        &traces2,
        &m,
        &inputs_for(&traces2),
        &Limits {
            max_traces: 1,
            ..l.clone()
        },
    );
    assert_eq!(
        e,
        Err(ValidateError::TooManyTraces {
            traces: 2,
            limit: 1
        })
    );

    let mut empty = g.clone();
    empty.traces[0].invokes.clear();
    assert_eq!(check(&empty), Err(ValidateError::EmptyTrace { trace: 0 }));

    let e = validate(
        &g,
        &m,
        &inputs_for(&g),
        &Limits {
            max_invokes: 0,
            ..l.clone()
        },
    );
    assert_eq!(
        e,
        Err(ValidateError::TooManyInvokes {
            trace: 0,
            invokes: 1,
            limit: 0
        })
    );

    let mut gen_ = g.clone();
    gen_.traces[0].max_new_tokens = 2000;
    let e = check(&gen_).expect_err("too many tokens");
    assert_eq!(
        e,
        ValidateError::TooManyNewTokens {
            trace: 0,
            requested: 2000,
            limit: 1024
        }
    );

    let e = validate(&g, &m, &Inputs { traces: vec![] }, &l).expect_err("mismatch");
    assert!(matches!(e, ValidateError::InputsMismatch { .. }));
    let e = validate(
        &g,
        &m,
        &Inputs {
            traces: vec![vec![3, 4]],
        },
        &l,
    )
    .expect_err("mismatch");
    assert_names(&e, &["1 invokes", "2 token counts"]);

    let e = validate(
        &g,
        &m,
        &Inputs {
            traces: vec![vec![0]],
        },
        &l,
    )
    .expect_err("empty");
    assert_eq!(
        e,
        ValidateError::EmptyPrompt {
            trace: 0,
            invoke: 0
        }
    );

    let mut long = g.clone();
    long.traces[0].max_new_tokens = 10;
    let e = validate(
        &long,
        &m,
        &Inputs {
            traces: vec![vec![60]],
        },
        &l,
    )
    .expect_err("long");
    assert_eq!(
        e,
        ValidateError::PromptTooLong {
            trace: 0,
            invoke: 0,
            tokens: 60,
            new_tokens: 10,
            max: 64
        }
    );
    validate(
        &long,
        &m,
        &Inputs {
            traces: vec![vec![55]],
        },
        &l,
    )
    .expect("55 + 9 fits 64");

    let mut toks = g;
    toks.traces[0].invokes[0].prompt = Prompt::Tokens(vec![1, 99]);
    let e = validate(&toks, &m, &Inputs::from_tokens(&toks).expect("tokens"), &l).expect_err("oov");
    assert_eq!(
        e,
        ValidateError::TokenOutOfRange {
            trace: 0,
            invoke: 0,
            token: 99,
            vocab: 32
        }
    );
    let e = validate(
        &toks,
        &m,
        &Inputs {
            traces: vec![vec![3]],
        },
        &l,
    )
    .expect_err("count");
    assert!(matches!(e, ValidateError::InputsMismatch { .. }));
}

#[test]
fn padding_and_invokes() {
    let g = Builder::new();
    let t = g.trace(["short", "a longer prompt"]);
    g.read(t.at("model.layers.0", Point::Output));
    g.read(t.invoke(0).at("model.layers.0", Point::Output));
    g.read(t.at("model.embed_tokens", Point::Input));
    let graph = g.finish();
    let plan = validate(
        &graph,
        &tiny(),
        &Inputs {
            traces: vec![vec![3, 7]],
        },
        &Limits::default(),
    )
    .expect("valid");
    assert_eq!(plan.nodes[0].meta.shape, [2, 7, 8]);
    assert_eq!(plan.nodes[1].meta.shape, [1, 3, 8]);
    assert_eq!(plan.nodes[2].meta, TensorMeta::new([2, 7], DType::I64));
    assert_eq!(
        plan.nodes[0].site,
        tiny().site(Module::Layer(0), Point::Output)
    );
}

#[test]
fn errors_name_their_node_or_trace() {
    let h = || read("model.layers.0", Point::Output);
    let e = err(&one_trace_graph(vec![
        h(),
        Node::Const {
            value: ConstTensor::vector(DType::F32, vec![0.0; 9]),
        },
        op(Op::Add, &[0, 1]),
    ]));
    assert_eq!((e.node(), e.trace()), (Some(NodeId(2)), None));
    let e = ValidateError::EmptyTrace { trace: 1 };
    assert_eq!((e.node(), e.trace()), (None, Some(1)));
    assert_eq!(ValidateError::NoTraces.node(), None);
}
