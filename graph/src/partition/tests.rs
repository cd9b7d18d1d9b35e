use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;

use super::*;
use crate::{
    builder::Builder,
    ir::{ConstTensor, DType, Hook, IndexItem::*, Point, WriteMode},
    manifest::tests::tiny,
    op::Op,
    validate::{Inputs, Limits, validate},
};

fn split(layers: &[(u32, u32)]) -> Vec<StageSpan> {
    layers
        .iter()
        .map(|&(start, end)| StageSpan { start, end })
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

// ---- Reference evaluator: a toy model over f64 vectors of width 3. ----

const W: usize = 3;

fn toy_manifest(layers: u32) -> Manifest {
    Manifest {
        model: "toy".into(),
        num_layers: layers,
        hidden: W as u32,
        heads: 1,
        kv_heads: 1,
        head_dim: W as u32,
        intermediate: W as u32,
        vocab: W as u32,
        max_positions: 16,
        dtype: DType::F32,
    }
}

type Vector = Vec<f64>;

fn map(v: &[f64], f: impl Fn(f64) -> f64) -> Vector {
    v.iter().map(|&a| f(a)).collect()
}

fn zip(a: &[f64], b: &[f64], f: impl Fn(f64, f64) -> f64) -> Vector {
    a.iter().zip(b).map(|(&x, &y)| f(x, y)).collect()
}

fn mlp(i: u32, m: &[f64]) -> Vector {
    map(m, |a| (a + f64::from(i)).tanh())
}

fn mlp_in(i: u32, x: &[f64]) -> Vector {
    map(x, |a| a * 0.5 + f64::from(i))
}

fn norm(x: &[f64]) -> Vector {
    let mean = x.iter().map(|a| a.abs()).sum::<f64>() / W as f64;
    map(x, |a| a / (1.0 + mean))
}

fn head(n: &[f64]) -> Vector {
    vec![n[0] - n[1], n[1] * 2.0, n[2] + 1.0]
}

fn apply_module(m: Module, v: &[f64]) -> Vector {
    match m {
        Module::Layer(i) => zip(v, &mlp(i, &mlp_in(i, v)), |a, b| a + b),
        Module::Mlp(i) => mlp(i, v),
        Module::Norm => norm(v),
        Module::LmHead => head(v),
        other => panic!("the toy model cannot apply {other}"),
    }
}

/// Runs the nodes of one stage (or all of them) over the toy forward pass.
struct Exec<'a> {
    graph: &'a Graph,
    plan: &'a Plan,
    manifest: &'a Manifest,
    store: HashMap<NodeId, Vector>,
    pending: Vec<NodeId>,
    saves: BTreeMap<String, Vector>,
}

impl Exec<'_> {
    fn get(&self, id: NodeId) -> Vector {
        self.store
            .get(&id)
            .cloned()
            .unwrap_or_else(|| panic!("node {id} is not available on this stage"))
    }

    /// The forward reached `(module, point)` with value `x`: run every node due by now.
    fn visit(&mut self, module: Module, point: Point, x: &mut Vector) {
        let p = self.manifest.position(module, point).expect("site");
        let mut due: Vec<NodeId> = self
            .pending
            .iter()
            .copied()
            .filter(|id| self.plan.nodes[id.index()].anchor.position <= p)
            .collect();
        self.pending.retain(|id| !due.contains(id));
        due.sort_by_key(|id| (self.plan.nodes[id.index()].anchor.position, *id));
        for id in due {
            self.run(id, module, point, x);
        }
    }

    fn run(&mut self, id: NodeId, module: Module, point: Point, x: &mut Vector) {
        let here = |hook: &Hook| {
            self.manifest.parse_module(&hook.module) == Some(module) && hook.point == point
        };
        let value = match &self.graph.nodes[id.index()] {
            Node::Read { hook } => {
                assert!(here(hook), "read {id} ran away from its hook");
                x.clone()
            }
            Node::Write {
                hook, value, mode, ..
            } => {
                assert!(here(hook), "write {id} ran away from its hook");
                let v = self.get(*value);
                *x = match mode {
                    WriteMode::Set => v,
                    WriteMode::Add => zip(x, &v, |a, b| a + b),
                };
                return;
            }
            Node::Op { op, args } => {
                let a = self.get(args[0]);
                match op {
                    Op::Add => zip(&a, &self.get(args[1]), |x, y| x + y),
                    Op::Mul => zip(&a, &self.get(args[1]), |x, y| x * y),
                    Op::Scale { factor } => map(&a, |x| x * factor),
                    Op::Tanh => map(&a, f64::tanh),
                    Op::Neg => map(&a, |x| -x),
                    other => panic!("the toy evaluator has no {}", other.name()),
                }
            }
            Node::Apply { module, args } => {
                let m = self.manifest.parse_module(module).expect("valid module");
                apply_module(m, &self.get(args[0]))
            }
            Node::Const { value } => value.values.clone(),
            Node::Save { name, value } => {
                let v = self.get(*value);
                self.saves.insert(name.clone(), v);
                return;
            }
            Node::Stop { .. } => return,
        };
        self.store.insert(id, value);
    }

    /// Runs the forward over layers `span`, from the embedding if `first`, to the logits if `last`.
    fn forward(&mut self, span: StageSpan, first: bool, last: bool, mut x: Vector) -> Vector {
        if first {
            x = vec![1.0, 2.0, 3.0];
            self.visit(Module::Embed, Point::Output, &mut x);
        }
        for i in span.start..span.end {
            self.visit(Module::Layer(i), Point::Input, &mut x);
            let mut m = mlp_in(i, &x);
            self.visit(Module::Mlp(i), Point::Input, &mut m);
            let mut o = mlp(i, &m);
            self.visit(Module::Mlp(i), Point::Output, &mut o);
            x = zip(&x, &o, |a, b| a + b);
            self.visit(Module::Layer(i), Point::Output, &mut x);
        }
        if last {
            let mut n = x.clone();
            self.visit(Module::Norm, Point::Input, &mut n);
            let mut n = norm(&n);
            self.visit(Module::Norm, Point::Output, &mut n);
            self.visit(Module::LmHead, Point::Input, &mut n);
            let mut logits = head(&n);
            self.visit(Module::LmHead, Point::Output, &mut logits);
            x = logits;
        }
        assert!(
            self.pending.is_empty(),
            "nodes {:?} never ran",
            self.pending
        );
        x
    }
}

fn run_single(graph: &Graph, plan: &Plan, m: &Manifest) -> BTreeMap<String, Vector> {
    let mut exec = Exec {
        graph,
        plan,
        manifest: m,
        store: HashMap::new(),
        pending: (0..graph.nodes.len() as u32).map(NodeId).collect(),
        saves: BTreeMap::new(),
    };
    let span = StageSpan {
        start: 0,
        end: m.num_layers,
    };
    exec.forward(span, true, true, Vec::new());
    exec.saves
}

fn run_pipeline(
    graph: &Graph,
    plan: &Plan,
    m: &Manifest,
    fragments: &[Fragment],
) -> BTreeMap<String, Vector> {
    let mut saves = BTreeMap::new();
    let mut carry: HashMap<NodeId, Vector> = HashMap::new();
    let mut hidden = Vec::new();
    for (k, f) in fragments.iter().enumerate() {
        // Only the carry crosses the stage boundary.
        let store = f
            .carry_in
            .iter()
            .map(|id| (*id, carry.remove(id).expect("carried value arrived")))
            .collect();
        let mut exec = Exec {
            graph,
            plan,
            manifest: m,
            store,
            pending: f.nodes.clone(),
            saves: BTreeMap::new(),
        };
        hidden = exec.forward(f.span, k == 0, k + 1 == fragments.len(), hidden);
        carry = f.carry_out.iter().map(|id| (*id, exec.get(*id))).collect();
        saves.extend(exec.saves);
    }
    saves
}

/// One step of a random recipe: which kind of node, and numbers to pick its parts.
type Step = (u8, usize, usize, f64);

/// Grows a random valid graph from a recipe, keeping only nodes that validate.
fn grow(m: &Manifest, recipe: &[Step]) -> Graph {
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
    let inputs = Inputs {
        traces: vec![vec![1]],
    };
    let mut g = Builder::new().finish();
    g.traces.push(crate::ir::Trace {
        invokes: vec![crate::ir::Invoke {
            prompt: crate::ir::Prompt::Tokens(vec![0]),
        }],
        max_new_tokens: 0,
    });
    for &(kind, a, b, f) in recipe {
        let values: Vec<NodeId> = g
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.has_value())
            .map(|(i, _)| NodeId(i as u32))
            .collect();
        let pick = |k: usize| values.get(k % values.len().max(1)).copied();
        let hook = |k: usize| {
            let (module, point) = hooks[k % hooks.len()];
            Hook::new(0, module.path(), point)
        };
        let node = match (kind % 8, pick(a), pick(b)) {
            (0 | 1, _, _) => Node::Read { hook: hook(a) },
            (2, Some(v), _) => Node::Write {
                hook: hook(b),
                value: v,
                index: None,
                mode: if a % 2 == 0 {
                    WriteMode::Set
                } else {
                    WriteMode::Add
                },
            },
            (3, Some(x), Some(y)) => Node::Op {
                op: [Op::Add, Op::Mul][b % 2].clone(),
                args: vec![x, y],
            },
            (4, Some(x), _) => Node::Op {
                op: [Op::Scale { factor: f }, Op::Tanh, Op::Neg][b % 3].clone(),
                args: vec![x],
            },
            (5, Some(x), _) => Node::Apply {
                module: applies[b % applies.len()].path(),
                args: vec![x],
            },
            (6, _, _) => Node::Const {
                value: ConstTensor::vector(DType::F32, vec![f, -f, f * 0.5]),
            },
            (7, Some(x), _) => Node::Save {
                name: format!("s{}", g.nodes.len()),
                value: x,
            },
            _ => continue,
        };
        g.nodes.push(node);
        if validate(&g, m, &inputs, &Limits::default()).is_err() {
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
    g.nodes.push(Node::Stop { trace: 0 });
    g
}

fn route_from(m: &Manifest, cuts: &[u32]) -> Vec<StageSpan> {
    let mut cuts: Vec<u32> = cuts.iter().map(|c| 1 + c % (m.num_layers - 1)).collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut bounds = vec![0];
    bounds.extend(cuts);
    bounds.push(m.num_layers);
    bounds
        .windows(2)
        .map(|w| StageSpan {
            start: w[0],
            end: w[1],
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// The law: partitioned execution equals single-stage execution.
    #[test]
    fn partitioned_execution_equals_single_stage(
        layers in 2u32..6,
        recipe in proptest::collection::vec(
            (any::<u8>(), any::<usize>(), any::<usize>(), -2.0f64..2.0), 1..24),
        cuts in proptest::collection::vec(any::<u32>(), 0..4),
    ) {
        let m = toy_manifest(layers);
        let graph = grow(&m, &recipe);
        let plan = plan_for(&graph, &m);
        let route = route_from(&m, &cuts);
        let fragments = match partition(&graph, &plan, &m, &route) {
            Ok(f) => f,
            Err(PartitionError::Backward { node, consumer, produced_on, needed_on }) => {
                prop_assert!(produced_on > needed_on);
                prop_assert!(graph.nodes[consumer.index()].inputs().contains(&node));
                return Ok(());
            }
            Err(e) => return Err(TestCaseError::fail(e.to_string())),
        };
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
        // (b) every input is computed earlier on the same stage or carried in.
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
        }
        // (c) same saves, bit for bit.
        let single = run_single(&graph, &plan, &m);
        let piped = run_pipeline(&graph, &plan, &m, &fragments);
        prop_assert_eq!(single, piped);
    }
}
