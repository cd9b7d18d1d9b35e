//! proptest strategies for arbitrary (not necessarily valid) graphs, every
//! node kind and op variant included.

use proptest::{collection::vec, option, prelude::*};

use crate::{
    ir::{
        ConstTensor, DType, FORMAT_VERSION, Graph, Hook, IndexItem, Invoke, Node, NodeId, Point,
        Prompt, Steps, Trace, WriteMode,
    },
    op::Op,
};

/// Any f64 JSON can carry exactly (finite values and infinities; NaN never equals itself).
pub(crate) fn float() -> impl Strategy<Value = f64> {
    prop_oneof![
        4 => any::<f64>().prop_filter("NaN is not equal to itself", |v| !v.is_nan()),
        1 => Just(f64::INFINITY),
        1 => Just(f64::NEG_INFINITY),
        1 => Just(-0.0),
        1 => (-1000i32..1000).prop_map(f64::from),
    ]
}

pub(crate) fn dtype() -> impl Strategy<Value = DType> {
    prop_oneof![
        Just(DType::F32),
        Just(DType::F16),
        Just(DType::Bf16),
        Just(DType::I64),
        Just(DType::Bool),
    ]
}

fn point() -> impl Strategy<Value = Point> {
    prop_oneof![
        Just(Point::Input),
        Just(Point::Output),
        Just(Point::Q),
        Just(Point::K),
        Just(Point::V),
        Just(Point::Pattern),
        Just(Point::Z),
    ]
}

fn steps() -> impl Strategy<Value = Steps> {
    prop_oneof![
        any::<u32>().prop_map(Steps::At),
        (any::<u32>(), any::<u32>()).prop_map(|(start, end)| Steps::Range { start, end }),
        Just(Steps::All),
    ]
}

fn hook() -> impl Strategy<Value = Hook> {
    (
        any::<u32>(),
        "[a-z_.0-9]{0,24}",
        point(),
        option::of(any::<u32>()),
        steps(),
    )
        .prop_map(|(trace, module, point, invoke, steps)| Hook {
            trace,
            module,
            point,
            invoke,
            steps,
        })
}

pub(crate) fn index_item() -> impl Strategy<Value = IndexItem> {
    prop_oneof![
        Just(IndexItem::Full),
        any::<i64>().prop_map(IndexItem::At),
        (
            option::of(any::<i64>()),
            option::of(any::<i64>()),
            any::<i64>()
        )
            .prop_map(|(start, end, step)| IndexItem::Slice { start, end, step }),
        Just(IndexItem::Ellipsis),
        Just(IndexItem::NewAxis),
    ]
}

fn dims() -> impl Strategy<Value = Vec<i64>> {
    vec(any::<i64>(), 0..4)
}

/// Every op variant with arbitrary attributes.
pub(crate) fn op() -> impl Strategy<Value = Op> {
    let unit = prop_oneof![
        Just(Op::Add),
        Just(Op::Sub),
        Just(Op::Mul),
        Just(Op::Div),
        Just(Op::Pow),
        Just(Op::Maximum),
        Just(Op::Minimum),
        Just(Op::Eq),
        Just(Op::Ne),
        Just(Op::Lt),
        Just(Op::Le),
        Just(Op::Gt),
        Just(Op::Ge),
        Just(Op::Where),
        Just(Op::Neg),
        Just(Op::Exp),
        Just(Op::Log),
        Just(Op::Sqrt),
        Just(Op::Abs),
        Just(Op::Tanh),
        Just(Op::Sigmoid),
        Just(Op::Relu),
        Just(Op::Gelu),
        Just(Op::Matmul),
        Just(Op::ZerosLike),
        Just(Op::OnesLike),
    ];
    let d = any::<i64>;
    let with_dim = prop_oneof![
        d().prop_map(|dim| Op::Gather { dim }),
        d().prop_map(|dim| Op::Scatter { dim }),
        d().prop_map(|dim| Op::IndexSelect { dim }),
        d().prop_map(|dim| Op::Squeeze { dim }),
        d().prop_map(|dim| Op::Unsqueeze { dim }),
        d().prop_map(|dim| Op::Cat { dim }),
        d().prop_map(|dim| Op::Stack { dim }),
        d().prop_map(|dim| Op::Softmax { dim }),
        d().prop_map(|dim| Op::LogSoftmax { dim }),
        (d(), d()).prop_map(|(dim0, dim1)| Op::Transpose { dim0, dim1 }),
        (d(), any::<bool>()).prop_map(|(dim, keepdim)| Op::Max { dim, keepdim }),
        (d(), any::<bool>()).prop_map(|(dim, keepdim)| Op::Min { dim, keepdim }),
        (d(), any::<bool>()).prop_map(|(dim, keepdim)| Op::Argmax { dim, keepdim }),
        (any::<u64>(), d()).prop_map(|(k, dim)| Op::TopkValues { k, dim }),
        (any::<u64>(), d()).prop_map(|(k, dim)| Op::TopkIndices { k, dim }),
    ];
    let with_attrs = prop_oneof![
        "[a-z.,> -]{0,16}".prop_map(|equation| Op::Einsum { equation }),
        vec(index_item(), 0..5).prop_map(|items| Op::Index { items }),
        dims().prop_map(|shape| Op::Reshape { shape }),
        dims().prop_map(|dims| Op::Permute { dims }),
        (dims(), any::<bool>()).prop_map(|(dims, keepdim)| Op::Sum { dims, keepdim }),
        (dims(), any::<bool>()).prop_map(|(dims, keepdim)| Op::Mean { dims, keepdim }),
        (float(), dims(), any::<bool>()).prop_map(|(p, dims, keepdim)| Op::Norm {
            p,
            dims,
            keepdim
        }),
        dtype().prop_map(|dtype| Op::Cast { dtype }),
        float().prop_map(|value| Op::FullLike { value }),
        float().prop_map(|factor| Op::Scale { factor }),
    ];
    prop_oneof![unit, with_dim, with_attrs]
}

fn ids() -> impl Strategy<Value = Vec<NodeId>> {
    vec(any::<u32>().prop_map(NodeId), 0..4)
}

fn node() -> impl Strategy<Value = Node> {
    prop_oneof![
        hook().prop_map(|hook| Node::Read { hook }),
        (
            hook(),
            any::<u32>(),
            option::of(vec(index_item(), 0..4)),
            prop_oneof![Just(WriteMode::Set), Just(WriteMode::Add)]
        )
            .prop_map(|(hook, value, index, mode)| Node::Write {
                hook,
                value: NodeId(value),
                index,
                mode
            }),
        (op(), ids()).prop_map(|(op, args)| Node::Op { op, args }),
        ("[a-z_.0-9]{0,24}", ids()).prop_map(|(module, args)| Node::Apply { module, args }),
        (dtype(), vec(0u64..4, 0..3), vec(float(), 0..6)).prop_map(|(dtype, shape, values)| {
            Node::Const {
                value: ConstTensor {
                    dtype,
                    shape,
                    values,
                },
            }
        }),
        (".{0,12}", any::<u32>()).prop_map(|(name, v)| Node::Save {
            name,
            value: NodeId(v)
        }),
        any::<u32>().prop_map(|trace| Node::Stop { trace }),
    ]
}

fn trace() -> impl Strategy<Value = Trace> {
    let prompt = prop_oneof![
        ".{0,16}".prop_map(Prompt::Text),
        vec(any::<u32>(), 0..6).prop_map(Prompt::Tokens),
    ];
    (
        vec(prompt.prop_map(|prompt| Invoke { prompt }), 0..3),
        any::<u32>(),
    )
        .prop_map(|(invokes, max_new_tokens)| Trace {
            invokes,
            max_new_tokens,
        })
}

/// Arbitrary graphs at the current version.
pub(crate) fn graph() -> impl Strategy<Value = Graph> {
    (vec(trace(), 0..3), vec(node(), 0..12)).prop_map(|(traces, nodes)| Graph {
        version: FORMAT_VERSION,
        traces,
        nodes,
    })
}
