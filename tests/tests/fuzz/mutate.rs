//! Mutators: raw bytes, JSON trees, graphs and stage messages, each
//! changed the way a careless or hostile peer would change them — lengths,
//! ids and indices at their extremes, fields swapped, lists cut short.

use nnmesh_graph::{ConstTensor, DType, Graph, Hook, IndexItem, Node, NodeId, Op, Point, Steps};
use nnmesh_protocol::{
    PeerId, Span,
    message::{Carried, Hop, StepRequest},
    tensor::{WireDType, WireTensor},
};
use serde_json::Value;

/// A deterministic peer id from a one-byte seed.
pub(crate) fn peer(seed: u8) -> PeerId {
    libp2p::identity::Keypair::ed25519_from_bytes([seed; 32])
        .expect("32 bytes")
        .public()
        .to_peer_id()
}

/// xorshift64*: a seeded, reproducible source of choices.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub(crate) fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    pub(crate) fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    pub(crate) fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }

    /// Integers where bugs live: around 0, the type limits, and small values.
    pub(crate) fn int(&mut self) -> i64 {
        match self.below(8) {
            0 => *self.pick(&[0, 1, -1, 2, -2]),
            1 => *self.pick(&[i64::MAX, i64::MIN, i64::MAX - 1, i64::MIN + 1]),
            2 => *self.pick(&[i64::from(i32::MAX), i64::from(u32::MAX), 1 << 31, 1 << 32]),
            3 => *self.pick(&[63, 64, 65, 255, 256, 257, 576, 1 << 20]),
            4 => -(self.below(10) as i64),
            _ => self.below(12) as i64,
        }
    }

    pub(crate) fn uint(&mut self) -> u64 {
        self.int().unsigned_abs()
    }

    pub(crate) fn float(&mut self) -> f64 {
        match self.below(6) {
            0 => *self.pick(&[f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -0.0]),
            1 => *self.pick(&[f64::MAX, f64::MIN_POSITIVE, 1e300, -1e300]),
            _ => (self.below(2001) as f64 - 1000.0) / 100.0,
        }
    }
}

/// Flips, overwrites, inserts, deletes, truncates or splices bytes.
pub(crate) fn bytes(rng: &mut Rng, b: &mut Vec<u8>, other: &[u8]) {
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(b.len() + 1);
        match rng.below(7) {
            0 if !b.is_empty() => {
                let i = at.min(b.len() - 1);
                b[i] ^= 1 << rng.below(8);
            }
            1 if !b.is_empty() => {
                let i = at.min(b.len() - 1);
                b[i] = *rng.pick(&[0, 0xff, 0x7f, 0x80, 0x01, 0xfe]);
            }
            2 => b.insert(at, rng.next() as u8),
            3 if at < b.len() => {
                b.remove(at);
            }
            4 => b.truncate(at),
            5 if !other.is_empty() => {
                let from = rng.below(other.len());
                let len = rng.below(other.len() - from + 1);
                let tail = b.split_off(at);
                b.extend_from_slice(&other[from..from + len]);
                b.extend(tail);
            }
            _ => {
                // A huge varint: a length prefix that claims the world.
                b.splice(at..at, [0xff, 0xff, 0xff, 0xff, 0x0f]);
            }
        }
    }
}

/// Mutates a JSON tree in place: numbers, strings, arrays, objects.
pub(crate) fn json(rng: &mut Rng, v: &mut Value) {
    let mut nodes = Vec::new();
    collect(v, &mut Vec::new(), &mut nodes);
    for _ in 0..1 + rng.below(3) {
        let path = rng.pick(&nodes).clone();
        let Some(target) = pointer(v, &path) else {
            continue;
        };
        *target = match (rng.below(6), &*target) {
            (0, Value::Number(_)) => rng.int().into(),
            (1, Value::Number(_)) => {
                serde_json::Number::from_f64(rng.float()).map_or(Value::Null, Value::Number)
            }
            (2, Value::Array(a)) if !a.is_empty() => {
                let mut a = a.clone();
                let i = rng.below(a.len());
                if rng.chance(0.5) {
                    a.remove(i);
                } else {
                    a.push(a[i].clone());
                }
                Value::Array(a)
            }
            (3, Value::String(_)) => Value::String(
                rng.pick(&[
                    "model.layers.999",
                    "lm_head",
                    "",
                    "model.norm",
                    "output",
                    "pattern",
                    "zzz",
                ])
                .to_string(),
            ),
            (4, _) => rng
                .pick(&[Value::Null, Value::Bool(true), Value::Array(Vec::new())])
                .clone(),
            _ => rng.int().into(),
        };
    }
}

fn collect(v: &Value, path: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    out.push(path.clone());
    match v {
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                path.push(i.to_string());
                collect(x, path, out);
                path.pop();
            }
        }
        Value::Object(o) => {
            for (k, x) in o {
                path.push(k.clone());
                collect(x, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

fn pointer<'a>(v: &'a mut Value, path: &[String]) -> Option<&'a mut Value> {
    let p: String = path.iter().map(|s| format!("/{s}")).collect();
    v.pointer_mut(&p)
}

const MODULES: [&str; 12] = [
    "model.embed_tokens",
    "model.layers.0",
    "model.layers.1",
    "model.layers.2",
    "model.layers.3",
    "model.layers.1.self_attn",
    "model.layers.0.mlp",
    "model.layers.2.mlp.down_proj",
    "model.layers.1.input_layernorm",
    "model.norm",
    "lm_head",
    "model.layers.4294967295",
];

const POINTS: [Point; 7] = [
    Point::Input,
    Point::Output,
    Point::Q,
    Point::K,
    Point::V,
    Point::Pattern,
    Point::Z,
];

fn hook(rng: &mut Rng, traces: usize) -> Hook {
    let mut h = Hook::new(
        rng.below(traces + 1) as u32,
        *rng.pick(&MODULES),
        *rng.pick(&POINTS),
    );
    if rng.chance(0.3) {
        h.invoke = Some(rng.uint() as u32 % 4);
    }
    h.steps = match rng.below(4) {
        0 => Steps::All,
        1 => Steps::At(rng.uint() as u32 % 5),
        2 => Steps::Range {
            start: rng.uint() as u32 % 4,
            end: rng.uint() as u32 % 6,
        },
        _ => Steps::At(0),
    };
    h
}

fn index_item(rng: &mut Rng) -> IndexItem {
    match rng.below(5) {
        0 => IndexItem::Full,
        1 => IndexItem::At(rng.int()),
        2 => IndexItem::Slice {
            start: rng.chance(0.7).then(|| rng.int()),
            end: rng.chance(0.7).then(|| rng.int()),
            step: rng.int(),
        },
        3 => IndexItem::NewAxis,
        _ => IndexItem::Ellipsis,
    }
}

fn op(rng: &mut Rng) -> Op {
    let dim = rng.int();
    match rng.below(16) {
        0 => Op::Index {
            items: (0..rng.below(5)).map(|_| index_item(rng)).collect(),
        },
        1 => Op::Reshape {
            shape: (0..rng.below(4)).map(|_| rng.int()).collect(),
        },
        2 => Op::Sum {
            dims: vec![dim],
            keepdim: rng.chance(0.5),
        },
        3 => Op::TopkValues { k: rng.uint(), dim },
        4 => Op::Gather { dim },
        5 => Op::IndexSelect { dim },
        6 => Op::Scatter { dim },
        7 => Op::Softmax { dim },
        8 => Op::Transpose {
            dim0: dim,
            dim1: rng.int(),
        },
        9 => Op::Einsum {
            equation: rng
                .pick(&[
                    "ij,jk->ik",
                    "bth,h->bt",
                    "...,...->...",
                    "i->",
                    "ii->i",
                    "x",
                ])
                .to_string(),
        },
        10 => Op::Cast {
            dtype: *rng.pick(&[DType::F32, DType::I64, DType::Bool, DType::Bf16]),
        },
        11 => Op::Argmax {
            dim,
            keepdim: false,
        },
        12 => Op::Scale {
            factor: rng.float(),
        },
        13 => Op::Cat { dim },
        14 => Op::Matmul,
        _ => rng
            .pick(&[
                Op::Add,
                Op::Mul,
                Op::Div,
                Op::Where,
                Op::Exp,
                Op::Log,
                Op::Neg,
            ])
            .clone(),
    }
}

fn node_id(rng: &mut Rng, len: usize) -> NodeId {
    if rng.chance(0.1) {
        NodeId(rng.uint() as u32)
    } else {
        NodeId(rng.below(len.max(1)) as u32)
    }
}

/// A random node that may refer to nodes before `len` (and sometimes past it).
fn random_node(rng: &mut Rng, len: usize, traces: usize) -> Node {
    let args = |rng: &mut Rng| (0..1 + rng.below(3)).map(|_| node_id(rng, len)).collect();
    match rng.below(7) {
        0 => Node::Read {
            hook: hook(rng, traces),
        },
        1 => Node::Write {
            hook: hook(rng, traces),
            value: node_id(rng, len),
            index: rng
                .chance(0.5)
                .then(|| (0..rng.below(4)).map(|_| index_item(rng)).collect()),
            mode: if rng.chance(0.5) {
                nnmesh_graph::WriteMode::Set
            } else {
                nnmesh_graph::WriteMode::Add
            },
        },
        2 => Node::Op {
            op: op(rng),
            args: args(rng),
        },
        3 => Node::Apply {
            module: rng.pick(&MODULES).to_string(),
            args: args(rng),
        },
        4 => {
            let shape: Vec<u64> = (0..rng.below(3)).map(|_| rng.uint() % 70).collect();
            let n: u64 = shape.iter().product();
            let n = if rng.chance(0.8) {
                n.min(4096)
            } else {
                rng.uint() % 100
            };
            Node::Const {
                value: ConstTensor {
                    dtype: *rng.pick(&[DType::F32, DType::I64, DType::Bool, DType::F16]),
                    shape,
                    values: (0..n).map(|_| rng.float()).collect(),
                },
            }
        }
        5 => Node::Save {
            name: format!("s{}", rng.below(6)),
            value: node_id(rng, len),
        },
        _ => Node::Stop {
            trace: rng.below(traces + 1) as u32,
        },
    }
}

/// Mutates a graph structurally: nodes replaced, inserted, deleted or
/// rewired; hooks, ops and prompts changed.
pub(crate) fn graph(rng: &mut Rng, g: &mut Graph) {
    for _ in 0..1 + rng.below(3) {
        let (len, traces) = (g.nodes.len(), g.traces.len());
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                g.nodes[i] = random_node(rng, i, traces);
            }
            1 => {
                let i = rng.below(len + 1);
                let n = random_node(rng, i, traces);
                g.nodes.insert(i, n);
            }
            2 if len > 0 => {
                g.nodes.remove(rng.below(len));
            }
            3 if len > 0 => {
                let i = rng.below(len);
                match &mut g.nodes[i] {
                    Node::Op { args, .. } | Node::Apply { args, .. } if !args.is_empty() => {
                        let k = rng.below(args.len());
                        args[k] = node_id(rng, len);
                    }
                    Node::Write { value, .. } | Node::Save { value, .. } => {
                        *value = node_id(rng, len);
                    }
                    Node::Read { hook } => *hook = self::hook(rng, traces),
                    _ => {}
                }
            }
            4 if !g.traces.is_empty() => {
                let t = rng.below(traces);
                g.traces[t].max_new_tokens = match rng.below(3) {
                    0 => rng.uint() as u32,
                    _ => rng.below(5) as u32,
                };
            }
            5 if !g.traces.is_empty() => {
                let t = rng.below(traces);
                let invokes = &mut g.traces[t].invokes;
                match rng.below(3) {
                    0 if !invokes.is_empty() => {
                        invokes.remove(rng.below(invokes.len()));
                    }
                    1 if !invokes.is_empty() => {
                        let i = rng.below(invokes.len());
                        invokes.push(invokes[i].clone());
                    }
                    _ => {
                        for inv in invokes.iter_mut() {
                            if let nnmesh_graph::Prompt::Tokens(ids) = &mut inv.prompt {
                                if rng.chance(0.5) && !ids.is_empty() {
                                    let k = rng.below(ids.len());
                                    ids[k] = rng.uint() as u32;
                                } else if rng.chance(0.5) {
                                    ids.clear();
                                } else {
                                    ids.extend((0..rng.below(200)).map(|_| rng.below(256) as u32));
                                }
                            }
                        }
                    }
                }
            }
            6 if len > 1 => {
                let (a, b) = (rng.below(len), rng.below(len));
                g.nodes.swap(a, b);
            }
            7 => {
                if rng.chance(0.5) && !g.traces.is_empty() {
                    g.traces.remove(rng.below(traces));
                } else if !g.traces.is_empty() {
                    g.traces.push(g.traces[rng.below(traces)].clone());
                }
            }
            _ => g.version = rng.uint() as u32 % 3,
        }
    }
}

fn tensor(rng: &mut Rng, t: &mut WireTensor) {
    match rng.below(8) {
        // Consistent but wrong: another shape or dtype with data to match,
        // so the tensor itself decodes and only its meaning is off.
        6 | 7 => {
            if rng.chance(0.5) {
                t.dtype = *rng.pick(&[
                    WireDType::F32,
                    WireDType::F16,
                    WireDType::Bf16,
                    WireDType::I64,
                    WireDType::Bool,
                ]);
            }
            if rng.chance(0.7) || t.shape.is_empty() {
                t.shape = (0..rng.below(5)).map(|_| rng.uint() % 70).collect();
                if rng.chance(0.5) && !t.shape.is_empty() {
                    let i = rng.below(t.shape.len());
                    t.shape[i] = *rng.pick(&[1, 3, 5, 63, 64, 65]);
                }
            } else {
                let i = rng.below(t.shape.len());
                t.shape.swap(0, i);
            }
            let n: u64 = t.shape.iter().product();
            if n > 1 << 16 {
                t.shape = vec![1];
            }
            let n: u64 = t.shape.iter().product();
            t.data = (0..n as usize * t.dtype.size())
                .map(|_| rng.next() as u8 & 0x3f)
                .collect();
        }
        0 => {
            t.dtype = *rng.pick(&[
                WireDType::F32,
                WireDType::F16,
                WireDType::Bf16,
                WireDType::I64,
                WireDType::Bool,
            ])
        }
        1 if !t.shape.is_empty() => {
            let i = rng.below(t.shape.len());
            t.shape[i] = rng.uint();
        }
        2 => t.shape.push(1 + rng.uint() % 3),
        3 => {
            t.shape.pop();
        }
        4 => {
            let other = t.data.clone();
            bytes(rng, &mut t.data, &other);
        }
        _ => {
            // Values at the extremes, shape kept: NaN, inf, huge ids.
            for chunk in t.data.chunks_mut(t.dtype.size().max(1)) {
                if rng.chance(0.3) {
                    let v = rng.int().to_le_bytes();
                    let n = chunk.len().min(8);
                    chunk[..n].copy_from_slice(&v[..n]);
                }
            }
        }
    }
}

/// Mutates a stage message field by field.
pub(crate) fn step(rng: &mut Rng, s: &mut StepRequest, graph_bytes: &[u8]) {
    for _ in 0..1 + rng.below(2) {
        match rng.below(11) {
            0 => s.hop = rng.uint() as u32 % 5,
            1 => s.input.trace = rng.uint() as u32 % 3,
            2 => s.input.step = rng.uint() as u32 % 6,
            3 => tensor(rng, &mut s.input.tokens),
            4 => match &mut s.input.hidden {
                Some(h) if rng.chance(0.8) => tensor(rng, h),
                _ => s.input.hidden = None,
            },
            5 => match rng.below(3) {
                0 if !s.input.carry.is_empty() => {
                    let i = rng.below(s.input.carry.len());
                    s.input.carry[i].node = rng.uint() as u32;
                }
                1 if !s.input.carry.is_empty() => {
                    let i = rng.below(s.input.carry.len());
                    tensor(rng, &mut s.input.carry[i].value);
                }
                _ => s.input.carry.push(Carried {
                    node: rng.below(40) as u32,
                    value: WireTensor::from_f32(vec![1, 64], &[rng.float() as f32; 64])
                        .expect("consistent"),
                }),
            },
            6 if !s.route.is_empty() => {
                let i = rng.below(s.route.len());
                let h: &mut Hop = &mut s.route[i];
                match rng.below(3) {
                    0 => h.span.start = rng.uint() as u32 % 5,
                    1 => h.span.end = rng.uint() as u32 % 5,
                    _ => h.peer = peer(rng.next() as u8),
                }
            }
            7 => {
                let mut g = s.graph.clone().unwrap_or_else(|| graph_bytes.to_vec());
                bytes(rng, &mut g, graph_bytes);
                s.graph = Some(g);
            }
            8 => {
                s.graph = if rng.chance(0.5) {
                    None
                } else {
                    Some(graph_bytes.to_vec())
                }
            }
            9 => s.client = peer(rng.next() as u8),
            _ => {
                if rng.chance(0.5) && !s.route.is_empty() {
                    s.route.pop();
                } else {
                    s.route.push(s.route.first().cloned().unwrap_or(Hop {
                        peer: peer(0),
                        addrs: Vec::new(),
                        span: Span::new(0, 0),
                    }));
                }
            }
        }
    }
}
