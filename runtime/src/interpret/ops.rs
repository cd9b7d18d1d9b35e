//! Graph ops on tch tensors: the closed list of [`Op`] mapped to libtorch
//! calls, plus numpy-style indexing and graph ↔ tch dtype conversion.

use nnmesh_graph::{ConstTensor, DType, IndexItem, Op};
use tch::{Device, Kind, TchError, Tensor};

/// The tch kind of a graph dtype.
pub fn kind(d: DType) -> Kind {
    match d {
        DType::F32 => Kind::Float,
        DType::F16 => Kind::Half,
        DType::Bf16 => Kind::BFloat16,
        DType::I64 => Kind::Int64,
        DType::Bool => Kind::Bool,
    }
}

/// The graph dtype of a tch kind, if it has one.
pub fn dtype(k: Kind) -> Option<DType> {
    Some(match k {
        Kind::Float => DType::F32,
        Kind::Half => DType::F16,
        Kind::BFloat16 => DType::Bf16,
        Kind::Int64 => DType::I64,
        Kind::Bool => DType::Bool,
        _ => return None,
    })
}

/// A constant as a tensor on `device`.
pub fn constant(c: &ConstTensor, device: Device) -> Tensor {
    let shape: Vec<i64> = c.shape.iter().map(|&d| d as i64).collect();
    let t = match c.dtype {
        DType::I64 | DType::Bool => {
            let v: Vec<i64> = c.values.iter().map(|&x| x as i64).collect();
            Tensor::from_slice(&v)
        }
        _ => Tensor::from_slice(&c.values).to_kind(Kind::Float),
    };
    t.reshape(&shape).to_kind(kind(c.dtype)).to_device(device)
}

fn norm_dim(dim: i64, ndim: usize) -> i64 {
    if dim < 0 { dim + ndim as i64 } else { dim }
}

/// numpy-style basic indexing: a view of `xs` (select, slice, new axes).
///
/// # Errors
/// When an index is out of range for `xs`.
pub fn index(xs: &Tensor, items: &[IndexItem]) -> Result<Tensor, TchError> {
    let ndim = xs.dim();
    let consumed = items
        .iter()
        .filter(|i| !matches!(i, IndexItem::NewAxis | IndexItem::Ellipsis))
        .count();
    let mut out = xs.shallow_clone();
    let mut dim = 0i64;
    for item in items {
        match *item {
            IndexItem::Full => dim += 1,
            IndexItem::Ellipsis => dim += ndim.saturating_sub(consumed) as i64,
            IndexItem::At(i) => {
                let size = out.size()[dim as usize];
                let i = if i < 0 { i + size } else { i };
                out = out.f_select(dim, i)?;
            }
            IndexItem::Slice { start, end, step } => {
                out = out.f_slice(dim, start, end, step)?;
                dim += 1;
            }
            IndexItem::NewAxis => {
                out = out.f_unsqueeze(dim)?;
                dim += 1;
            }
        }
    }
    Ok(out)
}

fn dims_or_all(dims: &[i64], ndim: usize) -> Vec<i64> {
    if dims.is_empty() {
        (0..ndim as i64).collect()
    } else {
        dims.to_vec()
    }
}

/// Evaluates one op on its arguments.
///
/// # Errors
/// libtorch's error when the arguments do not fit the op (validation
/// normally rules this out before anything runs).
pub fn eval(op: &Op, args: &[&Tensor]) -> Result<Tensor, TchError> {
    let a = args[0];
    let b = || args[1];
    let float = |t: &Tensor| {
        if t.is_floating_point() {
            t.shallow_clone()
        } else {
            t.to_kind(Kind::Float)
        }
    };
    Ok(match op {
        Op::Add => a.f_add(b())?,
        Op::Sub => a.f_sub(b())?,
        Op::Mul => a.f_mul(b())?,
        Op::Div => float(a).f_div(b())?,
        Op::Pow => a.f_pow(b())?,
        Op::Maximum => a.f_maximum(b())?,
        Op::Minimum => a.f_minimum(b())?,
        Op::Eq => a.f_eq_tensor(b())?,
        Op::Ne => a.f_ne_tensor(b())?,
        Op::Lt => a.f_lt_tensor(b())?,
        Op::Le => a.f_le_tensor(b())?,
        Op::Gt => a.f_gt_tensor(b())?,
        Op::Ge => a.f_ge_tensor(b())?,
        Op::Where => b().f_where_self(&a.f_to_kind(Kind::Bool)?, args[2])?,
        Op::Neg => a.f_neg()?,
        Op::Exp => float(a).f_exp()?,
        Op::Log => float(a).f_log()?,
        Op::Sqrt => float(a).f_sqrt()?,
        Op::Abs => a.f_abs()?,
        Op::Tanh => float(a).f_tanh()?,
        Op::Sigmoid => float(a).f_sigmoid()?,
        Op::Relu => a.f_relu()?,
        Op::Gelu => float(a).f_gelu("none")?,
        Op::Matmul => a.f_matmul(b())?,
        Op::Einsum { equation } => Tensor::f_einsum(equation, args, None::<&[i64]>)?,
        Op::Index { items } => index(a, items)?,
        Op::Gather { dim } => a.f_gather(*dim, &b().f_to_kind(Kind::Int64)?, false)?,
        Op::Scatter { dim } => a.f_scatter(*dim, &b().f_to_kind(Kind::Int64)?, args[2])?,
        Op::IndexSelect { dim } => a.f_index_select(*dim, &b().f_to_kind(Kind::Int64)?)?,
        Op::Reshape { shape } => a.f_reshape(shape.as_slice())?,
        Op::Transpose { dim0, dim1 } => a.f_transpose(*dim0, *dim1)?,
        Op::Permute { dims } => a.f_permute(dims.as_slice())?,
        Op::Squeeze { dim } => a.f_squeeze_dim(*dim)?,
        Op::Unsqueeze { dim } => a.f_unsqueeze(*dim)?,
        Op::Cat { dim } => Tensor::f_cat(args, *dim)?,
        Op::Stack { dim } => Tensor::f_stack(args, *dim)?,
        Op::Sum { dims, keepdim } => {
            a.f_sum_dim_intlist(dims_or_all(dims, a.dim()).as_slice(), *keepdim, None)?
        }
        Op::Mean { dims, keepdim } => {
            float(a).f_mean_dim(dims_or_all(dims, a.dim()).as_slice(), *keepdim, None)?
        }
        Op::Max { dim, keepdim } => a.f_max_dim(*dim, *keepdim)?.0,
        Op::Min { dim, keepdim } => a.f_min_dim(*dim, *keepdim)?.0,
        Op::Argmax { dim, keepdim } => a.f_argmax(*dim, *keepdim)?,
        Op::TopkValues { k, dim } => a.f_topk(*k as i64, *dim, true, true)?.0,
        Op::TopkIndices { k, dim } => a.f_topk(*k as i64, *dim, true, true)?.1,
        Op::Norm { p, dims, keepdim } => {
            let dims = dims_or_all(dims, a.dim());
            float(a).f_norm_scalaropt_dim(*p, dims.as_slice(), *keepdim)?
        }
        Op::Softmax { dim } => float(a).f_softmax(norm_dim(*dim, a.dim()), None::<Kind>)?,
        Op::LogSoftmax { dim } => float(a).f_log_softmax(norm_dim(*dim, a.dim()), None::<Kind>)?,
        Op::Cast { dtype } => a.f_to_kind(kind(*dtype))?,
        Op::ZerosLike => a.f_zeros_like()?,
        Op::OnesLike => a.f_ones_like()?,
        Op::FullLike { value } => a.f_full_like(*value)?,
        Op::Scale { factor } => a.f_mul_scalar(*factor)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_matches_numpy_semantics() {
        let x = Tensor::arange(24, (Kind::Int64, Device::Cpu)).reshape([2, 3, 4]);
        let last = index(&x, &[IndexItem::Full, IndexItem::At(-1)]).expect("index");
        assert_eq!(last.size(), [2, 4]);
        assert_eq!(last.int64_value(&[1, 0]), 20);
        let e = index(&x, &[IndexItem::Ellipsis, IndexItem::At(0)]).expect("index");
        assert_eq!(e.size(), [2, 3]);
        assert_eq!(e.int64_value(&[1, 2]), 20);
        let s = index(
            &x,
            &[
                IndexItem::NewAxis,
                IndexItem::At(0),
                IndexItem::Slice {
                    start: Some(1),
                    end: None,
                    step: 1,
                },
            ],
        )
        .expect("index");
        assert_eq!(s.size(), [1, 2, 4]);
        assert_eq!(s.int64_value(&[0, 0, 0]), 4);
    }

    #[test]
    fn reductions_and_casts() {
        let x = Tensor::from_slice(&[1f32, 5.0, 3.0, 2.0]).reshape([2, 2]);
        let am = eval(
            &Op::Argmax {
                dim: -1,
                keepdim: false,
            },
            &[&x],
        )
        .expect("argmax");
        assert_eq!(Vec::<i64>::try_from(&am).expect("ids"), [1, 0]);
        let s = eval(
            &Op::Sum {
                dims: vec![],
                keepdim: false,
            },
            &[&x],
        )
        .expect("sum");
        assert_eq!(s.double_value(&[]), 11.0);
        let c = eval(&Op::Cast { dtype: DType::I64 }, &[&x]).expect("cast");
        assert_eq!(c.kind(), Kind::Int64);
    }
}
