use nnmesh_protocol::Span;
mod toy;

use std::collections::BTreeSet;

use proptest::{collection::vec, prelude::*};

use super::*;
use crate::{
    builder::Builder,
    ir::{ConstTensor, DType, Hook, IndexItem::*, Invoke, Point, Prompt, Steps, Trace, WriteMode},
    manifest::tests::tiny,
    op::Op,
    validate::{Inputs, Limits, validate},
};

fn split(layers: &[(u32, u32)]) -> Vec<Span> {
    layers
        .iter()
        .map(|&(start, end)| Span { start, end })
        .collect()
}

fn plan_for(g: &Graph, m: &Manifest) -> Plan {
    let inputs = Inputs {
        traces: g.traces.iter().map(|t| vec![1; t.invokes.len()]).collect(),
    };
    validate(g, m, &inputs, &Limits::default()).expect("valid graph")
}

#[test]
fn logit_lens_carries_to_the_last_stage() {
    let g = Builder::new();
    let t = g.trace(["x"]);
    let h = g.read(t.at("model.layers.0", Point::Output));
    let normed = g.apply("model.norm", [h]);
    let logits = g.apply("lm_head", [normed]);
    let top = logits.index([Full, At(-1)]).argmax(-1, false);
    g.save("top", top);
    let v = g.vector(DType::F32, vec![1.0; 8]);
    g.add_at(
        t.at("model.layers.1", Point::Output),
        [Full, At(-1), Full],
        v,
    );
    g.save("v", v);
    g.stop(t);
    let graph = g.finish();
    let m = tiny();
    let plan = plan_for(&graph, &m);
    let f = partition(&graph, &plan, &m, &split(&[(0, 1), (1, 3), (3, 4)])).expect("splits");
    let ids = |v: &[u32]| v.iter().map(|&i| NodeId(i)).collect::<Vec<_>>();
    // Saving a constant needs no model: it happens on the first stage.
    assert_eq!(f[0].nodes, ids(&[0, 6, 8]));
    assert_eq!(f[0].saves, ids(&[8]));
    assert_eq!(f[0].carry_out, ids(&[0]));
    assert_eq!(f[1].carry_in, ids(&[0]));
    assert_eq!(f[1].nodes, ids(&[6, 7]));
    assert_eq!(f[1].carry_out, ids(&[0]));
    assert_eq!(f[2].carry_in, ids(&[0]));
    // The logit lens of layer 0 runs where lm_head lives, after the carry arrives.
    assert_eq!(f[2].nodes, ids(&[1, 2, 3, 4, 5, 9]));
    assert_eq!(f[2].saves, ids(&[5]));
}

#[test]
fn constants_are_copied_to_each_consumer() {
    let g = Builder::new();
    let t = g.trace(["x"]);
    let v = g.vector(DType::F32, vec![1.0; 8]);
    g.add_at(
        t.at("model.layers.0", Point::Output),
        [Full, At(-1), Full],
        v,
    );
    g.add_at(
        t.at("model.layers.3", Point::Output),
        [Full, At(-1), Full],
        v,
    );
    let graph = g.finish();
    let m = tiny();
    let plan = plan_for(&graph, &m);
    let f = partition(&graph, &plan, &m, &split(&[(0, 2), (2, 4)])).expect("splits");
    assert_eq!(f[0].nodes, [NodeId(0), NodeId(1)]);
    assert_eq!(f[1].nodes, [NodeId(0), NodeId(2)]);
    assert!(f[0].carry_out.is_empty());
}

#[test]
fn backward_values_are_rejected() {
    let g = Builder::new();
    let t = g.trace(["x"]);
    let h = g.read(t.at("model.layers.1", Point::Output));
    let logits = g.apply("lm_head", [h]);
    let back = logits.index([
        Full,
        Full,
        Slice {
            start: None,
            end: Some(8),
            step: 1,
        },
    ]);
    g.write(t.at("model.layers.2", Point::Output), back);
    let graph = g.finish();
    let m = tiny();
    let plan = plan_for(&graph, &m);
    // On one stage the graph is fine ...
    partition(&graph, &plan, &m, &split(&[(0, 4)])).expect("one stage");
    // ... but a pipeline cannot send lm_head's output back to layer 2.
    let e = partition(&graph, &plan, &m, &split(&[(0, 3), (3, 4)])).expect_err("backward");
    assert_eq!(
        e,
        PartitionError::Backward {
            node: NodeId(2),
            consumer: NodeId(3),
            produced_on: 1,
            needed_on: 0
        }
    );
    let msg = e.to_string();
    assert!(
        msg.contains("node 3") && msg.contains("node 2") && msg.contains("stage 1"),
        "{msg}"
    );
}

#[test]
fn values_for_a_later_trace_are_relayed_through_the_client() {
    // Trace 0 reads layer 3 (stage 1); trace 1 adds it to layer 1 (stage 0).
    let g = Builder::new();
    let t0 = g.trace(["x"]);
    let t1 = g.trace(["y"]);
    let value = g
        .read(t0.at("model.layers.3", Point::Output))
        .index([Full, At(-1), Full]);
    g.add_at(
        t1.at("model.layers.1", Point::Output),
        [Full, At(-1), Full],
        value,
    );
    let v = value.id();
    let graph = g.finish();
    let m = tiny();
    let plan = plan_for(&graph, &m);
    let f = partition(&graph, &plan, &m, &split(&[(0, 2), (2, 4)])).expect("relayed");
    assert_eq!(f[1].relay_out, [v]);
    assert_eq!(f[0].carry_in, [v]);
    assert!(f[0].carry_out.is_empty() && f[1].carry_in.is_empty());
    // (Within one step the same flow is an out-of-order write, which
    // validation rejects; `backward_values_are_rejected` covers the rest.)
}

/// The scenario behind the stop bug, pinned: a stopped generation whose
/// logit lens of layer 0 runs on the last stage after the first stage has
/// stopped, and a value read at layer 3 that steers layer 0 at later steps
/// and in the next trace (relayed through the client).
#[test]
fn a_stopped_logit_lens_and_relays_run_as_on_one_stage() {
    let g = Builder::new();
    let t0 = g.trace(["x"]).generate(3);
    let t1 = g.trace(["y"]);
    let late = g.read(t0.at("model.layers.3", Point::Output));
    g.write(t0.at("model.layers.0", Point::Output).steps(1..3), late)
        .mode_add();
    let h = g.read(t0.at("model.layers.0", Point::Output).all_steps());
    g.save("lens", g.apply("lm_head", [g.apply("model.norm", [h])]));
    g.stop(t0);
    g.write(t1.at("model.layers.1", Point::Input), late.tanh());
    let graph = g.finish();
    let m = toy::toy_manifest(4);
    let plan = plan_for(&graph, &m);
    // At its last step trace 0 ends right after layer 0, on the first stage.
    let stop = plan.stops[0].expect("stopped");
    assert_eq!(
        (stop.step, Some(stop.position)),
        (2, m.position(Module::Layer(0), Point::Output))
    );
    let f = partition(&graph, &plan, &m, &split(&[(0, 2), (2, 4)])).expect("splits");
    assert_eq!(f[1].relay_out, [NodeId(0), NodeId(7)]);
    let single = toy::run_single(&graph, &plan, &m);
    let piped = toy::run_pipeline(&graph, &plan, &m, &f);
    let keys: Vec<&str> = single.keys().map(String::as_str).collect();
    assert_eq!(keys, ["lens.step0", "lens.step1", "lens.step2"]);
    assert_eq!(piped.saves, single);
    assert_eq!(piped.relayed, [(NodeId(0), 1), (NodeId(7), 1)]);
}

#[test]
fn routes_must_cover_the_layers() {
    let g = Builder::new();
    g.trace(["x"]);
    let graph = g.finish();
    let m = tiny();
    let plan = plan_for(&graph, &m);
    for route in [
        vec![],
        split(&[(0, 2)]),
        split(&[(0, 2), (3, 4)]),
        split(&[(0, 3), (2, 4)]),
        split(&[(0, 0), (0, 4)]),
        split(&[(1, 4)]),
    ] {
        let e = partition(&graph, &plan, &m, &route).expect_err("bad route");
        assert!(
            matches!(e, PartitionError::Coverage { num_layers: 4, .. }),
            "{route:?}: {e}"
        );
    }
    assert!(partition(&graph, &plan, &m, &split(&[(0, 4)])).is_ok());
}

// ---- The law: partitioned execution equals single-stage execution. ----

/// One step of a random recipe: which kind of node, and numbers to pick its
/// parts (`a`, `b`: values and hooks; `c`: a hook's trace and steps; `f`: a
/// constant or scale factor).
type RecipeStep = (u8, usize, usize, usize, f64);

/// Recipe kinds, taken modulo [`KINDS`]; reads and writes get several each.
const KINDS: u8 = 12;
/// The kind that adds the two nodes of a logit lens.
const LENS: u8 = 10;

/// Grows a random valid session from a recipe: one trace per `(new_tokens,
/// depth)`, generating that many tokens; an odd depth keeps the trace's hooks
/// early in the forward (so that a stop ends it early), an even one allows
/// any hook.
///
/// Keeps only nodes that validate and that some pipeline can run: a node that
/// needs, within one step, a value from a later stage of the finest route
/// (one layer per stage) is dropped, since every coarser route rejects it too
/// (`backward_values_are_rejected` covers that error). Any other partition
/// error is kept, for the law to report.
fn grow(m: &Manifest, traces: &[(u32, u8)], recipe: &[RecipeStep]) -> Graph {
    let mut hooks = vec![(Module::Embed, Point::Output)];
    for i in 0..m.num_layers {
        for p in [Point::Input, Point::Output] {
            hooks.push((Module::Layer(i), p));
            hooks.push((Module::Mlp(i), p));
        }
    }
    for p in [Point::Input, Point::Output] {
        hooks.push((Module::Norm, p));
        hooks.push((Module::LmHead, p));
    }
    let mut applies = vec![Module::Norm, Module::LmHead];
    for i in 0..m.num_layers {
        applies.extend([Module::Layer(i), Module::Mlp(i)]);
    }
    let mut g = Builder::new().finish();
    for (t, &(n, _)) in traces.iter().enumerate() {
        g.traces.push(Trace {
            invokes: vec![Invoke {
                prompt: Prompt::Tokens(vec![t as u32 % m.vocab]),
            }],
            max_new_tokens: n,
        });
    }
    let inputs = Inputs {
        traces: vec![vec![1]; g.traces.len()],
    };
    let steps: Vec<u32> = g.traces.iter().map(Trace::steps).collect();
    // A hook of any trace, at one step, a range of steps or all of them.
    let hook = |k: usize, c: usize| {
        let trace = c % steps.len();
        let depth = usize::from(traces[trace].1);
        let reach = match depth % 2 {
            0 => hooks.len(),
            _ => 1 + depth / 2 % (hooks.len() / 2),
        };
        let (module, point) = hooks[k % reach];
        let (n, c) = (steps[trace], c / steps.len());
        let start = (c / 4) as u32 % n;
        let end = start + 1 + (c / 64) as u32 % (n - start);
        Hook {
            trace: trace as u32,
            module: module.path(),
            point,
            invoke: None,
            steps: match c % 4 {
                0 => Steps::At(0),
                1 => Steps::At(start),
                2 => Steps::All,
                _ => Steps::Range { start, end },
            },
        }
    };
    for &(kind, a, b, c, f) in recipe {
        let kind = kind % KINDS;
        let values: Vec<NodeId> = g
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.has_value())
            .map(|(i, _)| NodeId(i as u32))
            .collect();
        // Half the picks take one of the newest values, so chains grow long.
        let pick = |k: usize| {
            let n = values.len().max(1);
            let k = if k.is_multiple_of(2) {
                n - 1 - (k / 2) % n.min(4)
            } else {
                k / 2 % n
            };
            values.get(k).copied()
        };
        let node = match (kind, pick(a), pick(b)) {
            (0 | 1, _, _) => Node::Read { hook: hook(b, c) },
            (2 | 3 | 11, Some(v), _) => Node::Write {
                hook: hook(b, c),
                value: v,
                index: None,
                mode: if c % 2 == 0 {
                    WriteMode::Set
                } else {
                    WriteMode::Add
                },
            },
            (4, Some(x), Some(y)) => Node::Op {
                op: [Op::Add, Op::Mul][c % 2].clone(),
                args: vec![x, y],
            },
            (5, Some(x), _) => Node::Op {
                op: [Op::Scale { factor: f }, Op::Tanh, Op::Neg][c % 3].clone(),
                args: vec![x],
            },
            (6, Some(x), _) => Node::Apply {
                module: applies[b % applies.len()].path(),
                args: vec![x],
            },
            (7, _, _) => Node::Const {
                value: ConstTensor::vector(DType::F32, vec![f, -f, f * 0.5]),
            },
            (8, Some(x), _) => Node::Save {
                name: format!("s{}", g.nodes.len()),
                value: x,
            },
            (9, _, _) => Node::Stop {
                trace: (a % steps.len()) as u32,
            },
            // The logit lens: `lm_head(model.norm(x))`, run on the last stage.
            (LENS, Some(x), _) => {
                let id = NodeId(g.nodes.len() as u32);
                g.nodes.push(Node::Apply {
                    module: Module::Norm.path(),
                    args: vec![x],
                });
                Node::Apply {
                    module: Module::LmHead.path(),
                    args: vec![id],
                }
            }
            _ => continue,
        };
        g.nodes.push(node);
        if validate(&g, m, &inputs, &Limits::default())
            .is_ok_and(|plan| !backward_within_a_step(&g, &plan, m))
        {
            continue;
        }
        g.nodes.pop();
        if kind == LENS {
            g.nodes.pop();
        }
    }
    // Save every value too, so the law compares all of them, not just the recipe's saves.
    for i in 0..g.nodes.len() {
        if g.nodes[i].has_value() {
            g.nodes.push(Node::Save {
                name: format!("v{i}"),
                value: NodeId(i as u32),
            });
        }
    }
    g
}

/// Whether partitioning along the finest route fails because a value is
/// needed on an earlier stage within the step that produces it.
fn backward_within_a_step(g: &Graph, plan: &Plan, m: &Manifest) -> bool {
    let finest: Vec<Span> = (0..m.num_layers).map(|l| Span::new(l, l + 1)).collect();
    match partition(g, plan, m, &finest) {
        Err(PartitionError::Backward { node, consumer, .. }) => {
            let produced = plan.nodes[node.index()].last_moment();
            let needed = plan.nodes[consumer.index()].anchor;
            (needed.trace, needed.step) <= (produced.trace, produced.step)
        }
        _ => false,
    }
}

fn route_from(m: &Manifest, cuts: &[u32]) -> Vec<Span> {
    let mut cuts: Vec<u32> = cuts.iter().map(|c| 1 + c % (m.num_layers - 1)).collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut bounds = vec![0];
    bounds.extend(cuts);
    bounds.push(m.num_layers);
    bounds.windows(2).map(|w| Span::new(w[0], w[1])).collect()
}

/// The keys of every save the graph declares: `name`, or `name.stepN` for
/// each step of a per-step save.
fn declared_saves(graph: &Graph, plan: &Plan) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    for (node, np) in graph.nodes.iter().zip(&plan.nodes) {
        if let Node::Save { name, .. } = node {
            match np.per_step {
                Some(set) => keys.extend((set.start..set.end).map(|s| format!("{name}.step{s}"))),
                None => {
                    keys.insert(name.clone());
                }
            }
        }
    }
    keys
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// The law: partitioned execution equals single-stage execution, over
    /// whole sessions (1-3 traces, generation steps with per-step hooks,
    /// stops, values flowing across traces and steps, relays).
    ///
    /// Planted bugs it was checked to catch, each in every one of several runs:
    /// - in the pipeline (`toy::run_pipeline` and the stage sessions): no
    ///   stage runs after one that stopped (the bug that silently lost the
    ///   `lm_head(model.norm(h))` saves of stopped traces: "saves missing");
    ///   a stage without hidden state skips its due nodes; a stopped stage
    ///   sends no carry; the client drops relays, or hands them over one step
    ///   late; a stage passes on only values it computed, not those carried
    ///   in; a value is carried only the first time it is set (stale per-step
    ///   values); a stage session forgets its values at a new trace;
    /// - in `partition`: flows to an earlier stage in a later step rejected
    ///   as backward instead of relayed; a relay carried only into the
    ///   consumer's stage instead of from the first; `relay_out` listed on
    ///   the consumer's stage; a relay carried to the nearest instead of the
    ///   farthest of its consumers (the rarest: a value relayed to two stages).
    #[test]
    fn partitioned_execution_equals_single_stage(
        layers in 2u32..6,
        traces in vec((prop_oneof![Just(0u32), 2u32..5], any::<u8>()), 1..=3),
        recipe in vec(
            (any::<u8>(), any::<usize>(), any::<usize>(), any::<usize>(), -2.0f64..2.0),
            1..32,
        ),
        cuts in vec(any::<u32>(), 0..4),
    ) {
        let m = toy::toy_manifest(layers);
        let graph = grow(&m, &traces, &recipe);
        let plan = plan_for(&graph, &m);
        let route = route_from(&m, &cuts);
        // The grower left no flow that must run backward within one step.
        let fragments = partition(&graph, &plan, &m, &route)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(fragments.len(), route.len());

        // (a) every node runs on exactly one stage; constants on at least one.
        for (i, node) in graph.nodes.iter().enumerate() {
            let on = fragments.iter().filter(|f| f.nodes.contains(&NodeId(i as u32))).count();
            if matches!(node, Node::Const { .. }) {
                prop_assert!(on >= 1, "const {} on no stage", i);
            } else {
                prop_assert_eq!(on, 1, "node {} on {} stages", i, on);
            }
        }
        // (b) every input is computed earlier on the same stage or carried in;
        // relayed values come from this stage and enter at the first.
        for (k, f) in fragments.iter().enumerate() {
            prop_assert!(f.nodes.windows(2).all(|w| w[0] < w[1]));
            for &id in &f.nodes {
                for input in graph.nodes[id.index()].inputs() {
                    prop_assert!(
                        (f.nodes.contains(input) && *input < id) || f.carry_in.contains(input),
                        "stage {}: node {} lacks input {}", k, id, input
                    );
                }
            }
            if k + 1 < fragments.len() {
                prop_assert_eq!(&f.carry_out, &fragments[k + 1].carry_in);
            } else {
                prop_assert!(f.carry_out.is_empty());
            }
            for s in &f.saves {
                let is_save = matches!(graph.nodes[s.index()], Node::Save { .. });
                prop_assert!(is_save, "node {} is not a save", s);
            }
            for r in &f.relay_out {
                prop_assert!(k > 0 && f.nodes.contains(r), "stage {} relays {}", k, r);
                prop_assert!(fragments[0].carry_in.contains(r), "relay {} never enters", r);
            }
        }
        // (c) same saves, bit for bit, and (d) every save the graph declares
        // arrives, at every step it runs.
        let single = toy::run_single(&graph, &plan, &m);
        let piped = toy::run_pipeline(&graph, &plan, &m, &fragments);
        let declared = declared_saves(&graph, &plan);
        let arrived: BTreeSet<String> = piped.saves.keys().cloned().collect();
        prop_assert_eq!(&arrived, &declared, "saves missing or extra in the pipeline");
        prop_assert_eq!(single.keys().cloned().collect::<BTreeSet<_>>(), declared);
        prop_assert_eq!(single, piped.saves);
        // (e) every relayed value is sent and then used on an earlier stage.
        for f in &fragments {
            for r in &f.relay_out {
                prop_assert!(piped.relayed.contains(&(*r, f.stage)), "{} never relayed", r);
            }
        }
        for &(id, from) in &piped.relayed {
            prop_assert!(
                piped.used[..from].iter().any(|u| u.contains(&id)),
                "relayed {} from stage {} is used on no earlier stage", id, from
            );
        }
    }
}
