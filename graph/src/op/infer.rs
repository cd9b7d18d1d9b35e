//! Shape and dtype inference for the op list: what each op gives for
//! inputs of given shapes and dtypes, checked before anything runs.
//!
//! Dtype rules: ops promote their inputs like torch (bool < i64 < float;
//! f16/bf16 meeting another float type become f32; a 0-d input only changes
//! the result's dtype when it is of a higher category than every
//! dimensioned input, as with torch's scalars). Bool inputs act as i64 in
//! arithmetic, `div` of integers is true division (f32), float functions
//! (`exp`, `softmax`, `mean`, ...) of integers give f32, comparisons give
//! bool, `argmax`/`topk_indices` give i64 and `where` gives the promoted type
//! of its two value arguments.

use super::{Arity, Op, TensorMeta, shape};
use crate::ir::DType;

/// Why an op cannot be applied to the given inputs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OpError {
    /// Wrong number of arguments.
    #[error("{op}: takes {expected} arguments, got {found}")]
    Arity {
        /// The op's name.
        op: &'static str,
        /// What it accepts.
        expected: Arity,
        /// What it got.
        found: usize,
    },
    /// The shapes do not fit the op.
    #[error("{op}: {detail}")]
    Shape {
        /// The op's name.
        op: &'static str,
        /// What is wrong, naming the shapes.
        detail: String,
    },
    /// The element types do not fit the op.
    #[error("{op}: {detail}")]
    Dtype {
        /// The op's name.
        op: &'static str,
        /// What is wrong, naming the dtypes.
        detail: String,
    },
}

fn category(d: DType) -> u8 {
    match d {
        DType::Bool => 0,
        DType::I64 => 1,
        DType::F32 | DType::F16 | DType::Bf16 => 2,
    }
}

fn promote2(a: DType, b: DType) -> DType {
    if a == b {
        a
    } else if a.is_float() && b.is_float() {
        DType::F32
    } else if category(a) >= category(b) {
        a
    } else {
        b
    }
}

/// The dtype torch gives an op over these inputs (see the module docs).
pub fn promote(args: &[&TensorMeta]) -> Option<DType> {
    let fold = |zero_d: bool| {
        args.iter()
            .filter(|m| m.shape.is_empty() == zero_d)
            .map(|m| m.dtype)
            .reduce(promote2)
    };
    match (fold(false), fold(true)) {
        (Some(d), Some(z)) if category(z) > category(d) => Some(match z {
            DType::Bool => DType::Bool,
            DType::I64 => DType::I64,
            _ => DType::F32,
        }),
        (Some(d), _) => Some(d),
        (None, z) => z,
    }
}

fn to_float(d: DType) -> DType {
    if d.is_float() { d } else { DType::F32 }
}

/// Infers the shape and dtype of `op` applied to inputs of these metas.
///
/// # Errors
/// [`OpError::Arity`] on a wrong number of inputs, [`OpError::Shape`] or
/// [`OpError::Dtype`] when the inputs do not fit the op; messages name the
/// shapes and dtypes involved.
pub fn infer(op: &Op, args: &[TensorMeta]) -> Result<TensorMeta, OpError> {
    let name = op.name();
    if !op.arity().accepts(args.len()) {
        return Err(OpError::Arity {
            op: name,
            expected: op.arity(),
            found: args.len(),
        });
    }
    let shape_err = |detail: String| OpError::Shape { op: name, detail };
    let dtype_err = |detail: String| OpError::Dtype { op: name, detail };
    let refs: Vec<&TensorMeta> = args.iter().collect();
    let promoted = promote(&refs).unwrap_or(DType::F32);
    let no_bool = |m: &TensorMeta| {
        if m.dtype == DType::Bool {
            Err(dtype_err(format!("not defined for bool ({})", m)))
        } else {
            Ok(())
        }
    };
    let need_i64 = |m: &TensorMeta, what: &str| {
        if m.dtype == DType::I64 {
            Ok(())
        } else {
            Err(dtype_err(format!("{what} must be i64, got {}", m.dtype)))
        }
    };
    let x = &args[0];
    let ndim = x.shape.len();
    let dim = |d: i64| shape::norm_dim(d, ndim).map_err(shape_err);
    let out = |shape: Vec<u64>, dtype: DType| Ok(TensorMeta { shape, dtype });
    match op {
        Op::Add | Op::Sub | Op::Mul | Op::Div | Op::Pow | Op::Maximum | Op::Minimum => {
            let shape = shape::broadcast(&x.shape, &args[1].shape).map_err(shape_err)?;
            let dtype = match (op, promoted) {
                (Op::Maximum | Op::Minimum, d) => d,
                (Op::Div, d) => to_float(d),
                (_, DType::Bool) => DType::I64,
                (_, d) => d,
            };
            out(shape, dtype)
        }
        Op::Eq | Op::Ne | Op::Lt | Op::Le | Op::Gt | Op::Ge => {
            let shape = shape::broadcast(&x.shape, &args[1].shape).map_err(shape_err)?;
            out(shape, DType::Bool)
        }
        Op::Where => {
            if x.dtype != DType::Bool {
                return Err(dtype_err(format!(
                    "condition must be bool, got {}",
                    x.dtype
                )));
            }
            let s = shape::broadcast(&x.shape, &args[1].shape).map_err(shape_err)?;
            let s = shape::broadcast(&s, &args[2].shape).map_err(shape_err)?;
            let dtype = promote(&[&args[1], &args[2]]).unwrap_or(DType::F32);
            out(s, dtype)
        }
        Op::Exp | Op::Log | Op::Sqrt | Op::Tanh | Op::Sigmoid | Op::Gelu => {
            out(x.shape.clone(), to_float(x.dtype))
        }
        Op::Neg | Op::Abs | Op::Relu => {
            no_bool(x)?;
            out(x.shape.clone(), x.dtype)
        }
        Op::Matmul => {
            no_bool(x)?;
            no_bool(&args[1])?;
            let s = shape::matmul(&x.shape, &args[1].shape).map_err(shape_err)?;
            out(s, promoted)
        }
        Op::Einsum { equation } => {
            for a in args {
                no_bool(a)?;
            }
            let shapes: Vec<&[u64]> = args.iter().map(|a| a.shape.as_slice()).collect();
            let s = shape::einsum(equation, &shapes).map_err(shape_err)?;
            out(s, promoted)
        }
        Op::Index { items } => {
            let s = shape::index(&x.shape, items).map_err(shape_err)?;
            out(s, x.dtype)
        }
        Op::Gather { dim: d } => {
            let index = &args[1];
            need_i64(index, "index")?;
            let d = dim(*d)?;
            if index.shape.len() != ndim {
                return Err(shape_err(format!(
                    "index {} must have as many dimensions as src {}",
                    shape::fmt_shape(&index.shape),
                    shape::fmt_shape(&x.shape)
                )));
            }
            for (i, (&si, &ii)) in x.shape.iter().zip(&index.shape).enumerate() {
                if i != d && ii > si {
                    return Err(shape_err(format!(
                        "index {} is larger than src {} in dimension {i}",
                        shape::fmt_shape(&index.shape),
                        shape::fmt_shape(&x.shape)
                    )));
                }
            }
            out(index.shape.clone(), x.dtype)
        }
        Op::Scatter { dim: d } => {
            let (index, values) = (&args[1], &args[2]);
            need_i64(index, "index")?;
            let d = dim(*d)?;
            if index.shape.len() != ndim {
                return Err(shape_err(format!(
                    "index {} must have as many dimensions as src {}",
                    shape::fmt_shape(&index.shape),
                    shape::fmt_shape(&x.shape)
                )));
            }
            let fits_src = x
                .shape
                .iter()
                .zip(&index.shape)
                .enumerate()
                .all(|(i, (&s, &ix))| i == d || ix <= s);
            let fits_values = values.shape.is_empty()
                || (values.shape.len() == ndim
                    && index.shape.iter().zip(&values.shape).all(|(ix, v)| ix <= v));
            if !fits_src || !fits_values {
                return Err(shape_err(format!(
                    "index {} does not fit src {} and values {}",
                    shape::fmt_shape(&index.shape),
                    shape::fmt_shape(&x.shape),
                    shape::fmt_shape(&values.shape)
                )));
            }
            out(x.shape.clone(), x.dtype)
        }
        Op::IndexSelect { dim: d } => {
            let indices = &args[1];
            need_i64(indices, "indices")?;
            if indices.shape.len() > 1 {
                return Err(shape_err(format!(
                    "indices must be 1-d, got {}",
                    shape::fmt_shape(&indices.shape)
                )));
            }
            let d = dim(*d)?;
            let mut s = x.shape.clone();
            if !s.is_empty() {
                s[d] = indices.shape.first().copied().unwrap_or(1);
            }
            out(s, x.dtype)
        }
        Op::Reshape { shape: target } => {
            let s = reshape(&x.shape, target).map_err(shape_err)?;
            out(s, x.dtype)
        }
        Op::Transpose { dim0, dim1 } => {
            let (a, b) = (dim(*dim0)?, dim(*dim1)?);
            let mut s = x.shape.clone();
            if !s.is_empty() {
                s.swap(a, b);
            }
            out(s, x.dtype)
        }
        Op::Permute { dims } => {
            if dims.len() != ndim {
                return Err(shape_err(format!(
                    "permutation {dims:?} has {} dims but the input {} has {ndim}",
                    dims.len(),
                    shape::fmt_shape(&x.shape)
                )));
            }
            let mut seen = vec![false; ndim];
            let mut s = Vec::with_capacity(ndim);
            for &d in dims {
                let d = dim(d)?;
                if std::mem::replace(&mut seen[d], true) {
                    return Err(shape_err(format!("{dims:?} is not a permutation")));
                }
                s.push(x.shape[d]);
            }
            out(s, x.dtype)
        }
        Op::Squeeze { dim: d } => {
            let d = dim(*d)?;
            let mut s = x.shape.clone();
            if s.get(d) == Some(&1) {
                s.remove(d);
            }
            out(s, x.dtype)
        }
        Op::Unsqueeze { dim: d } => {
            let d = shape::norm_insert_dim(*d, ndim).map_err(shape_err)?;
            let mut s = x.shape.clone();
            s.insert(d, 1);
            out(s, x.dtype)
        }
        Op::Cat { dim: d } => {
            if ndim == 0 {
                return Err(shape_err("cannot concatenate 0-d tensors".into()));
            }
            let d = dim(*d)?;
            let mut s = x.shape.clone();
            for a in &args[1..] {
                let same_rest = a.shape.len() == ndim
                    && a.shape
                        .iter()
                        .zip(&x.shape)
                        .enumerate()
                        .all(|(i, (p, q))| i == d || p == q);
                if !same_rest {
                    return Err(shape_err(format!(
                        "cannot concatenate {} with {} along dim {d}",
                        shape::fmt_shape(&x.shape),
                        shape::fmt_shape(&a.shape)
                    )));
                }
                s[d] += a.shape[d];
            }
            out(s, promoted)
        }
        Op::Stack { dim: d } => {
            if let Some(a) = args.iter().find(|a| a.shape != x.shape) {
                return Err(shape_err(format!(
                    "cannot stack {} with {}",
                    shape::fmt_shape(&x.shape),
                    shape::fmt_shape(&a.shape)
                )));
            }
            let d = shape::norm_insert_dim(*d, ndim).map_err(shape_err)?;
            let mut s = x.shape.clone();
            s.insert(d, args.len() as u64);
            out(s, promoted)
        }
        Op::Sum { dims, keepdim } => {
            let s = shape::reduce(&x.shape, dims, *keepdim).map_err(shape_err)?;
            out(
                s,
                if x.dtype.is_float() {
                    x.dtype
                } else {
                    DType::I64
                },
            )
        }
        Op::Mean { dims, keepdim } | Op::Norm { dims, keepdim, .. } => {
            let s = shape::reduce(&x.shape, dims, *keepdim).map_err(shape_err)?;
            out(s, to_float(x.dtype))
        }
        Op::Max { dim: d, keepdim } | Op::Min { dim: d, keepdim } => {
            let s = shape::reduce(&x.shape, &[*d], *keepdim).map_err(shape_err)?;
            out(s, x.dtype)
        }
        Op::Argmax { dim: d, keepdim } => {
            let s = shape::reduce(&x.shape, &[*d], *keepdim).map_err(shape_err)?;
            out(s, DType::I64)
        }
        Op::TopkValues { k, dim: d } | Op::TopkIndices { k, dim: d } => {
            let d = dim(*d)?;
            let size = x.shape.get(d).copied().unwrap_or(1);
            if *k > size {
                return Err(shape_err(format!(
                    "k = {k} exceeds the size {size} of dim {d} of {}",
                    shape::fmt_shape(&x.shape)
                )));
            }
            let mut s = x.shape.clone();
            if !s.is_empty() {
                s[d] = *k;
            }
            let dtype = if matches!(op, Op::TopkIndices { .. }) {
                DType::I64
            } else {
                x.dtype
            };
            out(s, dtype)
        }
        Op::Softmax { dim: d } | Op::LogSoftmax { dim: d } => {
            dim(*d)?;
            out(x.shape.clone(), to_float(x.dtype))
        }
        Op::Cast { dtype } => out(x.shape.clone(), *dtype),
        Op::ZerosLike | Op::OnesLike | Op::FullLike { .. } => out(x.shape.clone(), x.dtype),
        Op::Scale { .. } => out(x.shape.clone(), to_float(x.dtype)),
    }
}

fn reshape(from: &[u64], to: &[i64]) -> Result<Vec<u64>, String> {
    let total = shape::numel(from).ok_or("input too large")?;
    let mut infer_at = None;
    let mut known: u64 = 1;
    for (i, &d) in to.iter().enumerate() {
        match d {
            -1 if infer_at.is_none() => infer_at = Some(i),
            -1 => return Err(format!("only one -1 allowed in {to:?}")),
            d if d < 0 => return Err(format!("invalid size {d} in {to:?}")),
            d => {
                known = known
                    .checked_mul(d as u64)
                    .ok_or("target shape too large")?
            }
        }
    }
    let mismatch = || {
        format!(
            "cannot reshape {} ({total} elements) to {to:?}",
            shape::fmt_shape(from)
        )
    };
    let mut out: Vec<u64> = to.iter().map(|&d| d.max(0) as u64).collect();
    match infer_at {
        Some(i) => {
            if known == 0 || total % known != 0 {
                return Err(mismatch());
            }
            out[i] = total / known;
        }
        None if known != total => return Err(mismatch()),
        None => {}
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::IndexItem;

    fn m(shape: &[u64], dtype: DType) -> TensorMeta {
        TensorMeta::new(shape, dtype)
    }

    #[test]
    fn binary_ops_broadcast_and_promote() {
        let h = m(&[1, 9, 576], DType::Bf16);
        let v = m(&[576], DType::F32);
        assert_eq!(
            infer(&Op::Add, &[h.clone(), v.clone()]),
            Ok(m(&[1, 9, 576], DType::F32))
        );
        // A 0-d float does not widen a bf16 tensor, as with torch scalars.
        let s = m(&[], DType::F32);
        assert_eq!(
            infer(&Op::Mul, &[h.clone(), s]),
            Ok(m(&[1, 9, 576], DType::Bf16))
        );
        let i = m(&[3], DType::I64);
        assert_eq!(
            infer(&Op::Div, &[i.clone(), i.clone()]),
            Ok(m(&[3], DType::F32))
        );
        assert_eq!(infer(&Op::Lt, &[i.clone(), i]), Ok(m(&[3], DType::Bool)));
        let err = infer(&Op::Add, &[h, m(&[577], DType::Bf16)]).expect_err("mismatch");
        assert_eq!(
            err.to_string(),
            "add: cannot broadcast [1,9,576] with [577]"
        );
    }

    #[test]
    fn arity_is_checked() {
        let x = m(&[2], DType::F32);
        let err = infer(&Op::Where, &[x.clone(), x]).expect_err("arity");
        assert_eq!(err.to_string(), "where: takes exactly 3 arguments, got 2");
        assert!(matches!(
            infer(&Op::Cat { dim: 0 }, &[]),
            Err(OpError::Arity { .. })
        ));
    }

    #[test]
    fn reductions_and_indices() {
        let logits = m(&[1, 9, 100], DType::Bf16);
        let last = infer(
            &Op::Index {
                items: vec![IndexItem::Full, IndexItem::At(-1)],
            },
            std::slice::from_ref(&logits),
        )
        .expect("index");
        assert_eq!(last, m(&[1, 100], DType::Bf16));
        let arg = infer(
            &Op::Argmax {
                dim: -1,
                keepdim: false,
            },
            std::slice::from_ref(&last),
        )
        .expect("argmax");
        assert_eq!(arg, m(&[1], DType::I64));
        let top = infer(
            &Op::TopkIndices { k: 5, dim: -1 },
            std::slice::from_ref(&last),
        )
        .expect("topk");
        assert_eq!(top, m(&[1, 5], DType::I64));
        assert!(
            infer(
                &Op::TopkValues { k: 101, dim: -1 },
                std::slice::from_ref(&last)
            )
            .is_err()
        );
        let mean = infer(
            &Op::Mean {
                dims: vec![],
                keepdim: false,
            },
            &[m(&[3], DType::I64)],
        );
        assert_eq!(mean, Ok(m(&[], DType::F32)));
        let sm = infer(&Op::Softmax { dim: -1 }, &[last]).expect("softmax");
        assert_eq!(sm.dtype, DType::Bf16);
    }

    #[test]
    fn shape_ops() {
        let x = m(&[2, 3, 4], DType::F32);
        let r = |shape: Vec<i64>| infer(&Op::Reshape { shape }, std::slice::from_ref(&x));
        assert_eq!(r(vec![6, -1]), Ok(m(&[6, 4], DType::F32)));
        assert!(r(vec![-1, -1]).is_err());
        assert!(r(vec![5, -1]).is_err());
        assert!(r(vec![7, 4]).is_err());
        let p = infer(
            &Op::Permute {
                dims: vec![2, 0, 1],
            },
            std::slice::from_ref(&x),
        );
        assert_eq!(p, Ok(m(&[4, 2, 3], DType::F32)));
        assert!(
            infer(
                &Op::Permute {
                    dims: vec![0, 0, 1]
                },
                std::slice::from_ref(&x)
            )
            .is_err()
        );
        let t = infer(
            &Op::Transpose { dim0: 0, dim1: -1 },
            std::slice::from_ref(&x),
        );
        assert_eq!(t, Ok(m(&[4, 3, 2], DType::F32)));
        let u = infer(&Op::Unsqueeze { dim: -1 }, std::slice::from_ref(&x));
        assert_eq!(u, Ok(m(&[2, 3, 4, 1], DType::F32)));
        let sq = infer(&Op::Squeeze { dim: 0 }, &[m(&[1, 3], DType::F32)]);
        assert_eq!(sq, Ok(m(&[3], DType::F32)));
        let c = infer(&Op::Cat { dim: 1 }, &[x.clone(), x.clone()]);
        assert_eq!(c, Ok(m(&[2, 6, 4], DType::F32)));
        assert!(infer(&Op::Cat { dim: 0 }, &[x.clone(), m(&[2, 2, 4], DType::F32)]).is_err());
        let s = infer(&Op::Stack { dim: 0 }, &[x.clone(), x.clone(), x.clone()]);
        assert_eq!(s, Ok(m(&[3, 2, 3, 4], DType::F32)));
        assert!(infer(&Op::Transpose { dim0: 3, dim1: 0 }, &[x]).is_err());
    }

    #[test]
    fn gather_scatter_select() {
        let src = m(&[2, 5], DType::F32);
        let idx = m(&[2, 3], DType::I64);
        let g = infer(&Op::Gather { dim: 1 }, &[src.clone(), idx.clone()]);
        assert_eq!(g, Ok(m(&[2, 3], DType::F32)));
        let bad = infer(
            &Op::Gather { dim: 1 },
            &[src.clone(), m(&[2, 3], DType::F32)],
        );
        assert!(matches!(bad, Err(OpError::Dtype { .. })));
        let sc = infer(
            &Op::Scatter { dim: 1 },
            &[src.clone(), idx.clone(), m(&[], DType::F32)],
        );
        assert_eq!(sc, Ok(src.clone()));
        let sel = infer(&Op::IndexSelect { dim: 1 }, &[src, m(&[4], DType::I64)]);
        assert_eq!(sel, Ok(m(&[2, 4], DType::F32)));
    }

    #[test]
    fn where_and_matmul() {
        let c = m(&[2, 1], DType::Bool);
        let a = m(&[3], DType::F16);
        let b = m(&[2, 3], DType::F16);
        assert_eq!(
            infer(&Op::Where, &[c, a.clone(), b]),
            Ok(m(&[2, 3], DType::F16))
        );
        assert!(matches!(
            infer(&Op::Where, &[a.clone(), a.clone(), a]),
            Err(OpError::Dtype { .. })
        ));
        let e = infer(
            &Op::Einsum {
                equation: "bthd,hdk->btk".into(),
            },
            &[m(&[1, 4, 2, 8], DType::F32), m(&[2, 8, 16], DType::F32)],
        );
        assert_eq!(e, Ok(m(&[1, 4, 16], DType::F32)));
    }
}
