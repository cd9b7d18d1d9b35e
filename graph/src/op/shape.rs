//! Shape rules shared by ops and writes: broadcasting, matmul, einsum,
//! numpy basic indexing and dimension arithmetic. Errors are plain detail
//! strings; the caller adds the op name.

use std::collections::BTreeMap;

use crate::ir::IndexItem;

/// Formats a shape as `[1,9,576]`.
pub(crate) fn fmt_shape(shape: &[u64]) -> String {
    let parts: Vec<String> = shape.iter().map(u64::to_string).collect();
    format!("[{}]", parts.join(","))
}

/// numpy broadcasting of two shapes.
pub(crate) fn broadcast(a: &[u64], b: &[u64]) -> Result<Vec<u64>, String> {
    let n = a.len().max(b.len());
    let mut out = vec![0; n];
    for i in 0..n {
        let da = if i < n - a.len() {
            1
        } else {
            a[i - (n - a.len())]
        };
        let db = if i < n - b.len() {
            1
        } else {
            b[i - (n - b.len())]
        };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => {
                return Err(format!(
                    "cannot broadcast {} with {}",
                    fmt_shape(a),
                    fmt_shape(b)
                ));
            }
        };
    }
    Ok(out)
}

/// Whether `value` broadcasts to exactly `target` (one-directional, as in assignment).
pub(crate) fn broadcasts_to(value: &[u64], target: &[u64]) -> bool {
    value.len() <= target.len() && broadcast(value, target).is_ok_and(|s| s == target)
}

/// Normalizes a possibly negative dimension for a tensor of `ndim` dims
/// (torch's rule: a 0-d tensor accepts `0` and `-1`).
pub(crate) fn norm_dim(dim: i64, ndim: usize) -> Result<usize, String> {
    let n = ndim.max(1) as i64;
    if dim < -n || dim >= n {
        return Err(format!(
            "dim {dim} out of range for a {ndim}-d tensor (expected {}..={})",
            -n,
            n - 1
        ));
    }
    Ok(if dim < 0 {
        (dim + n) as usize
    } else {
        dim as usize
    })
}

/// Normalizes a dimension at which a new axis is inserted (`ndim + 1` positions).
pub(crate) fn norm_insert_dim(dim: i64, ndim: usize) -> Result<usize, String> {
    let n = ndim as i64 + 1;
    if dim < -n || dim >= n {
        return Err(format!(
            "dim {dim} out of range for inserting into a {ndim}-d tensor (expected {}..={})",
            -n,
            n - 1
        ));
    }
    Ok(if dim < 0 {
        (dim + n) as usize
    } else {
        dim as usize
    })
}

/// Shape after reducing `dims` (all dims when empty).
pub(crate) fn reduce(shape: &[u64], dims: &[i64], keepdim: bool) -> Result<Vec<u64>, String> {
    let mut reduced = vec![false; shape.len()];
    if dims.is_empty() {
        reduced.iter_mut().for_each(|r| *r = true);
    }
    for &d in dims {
        let d = norm_dim(d, shape.len())?;
        if shape.is_empty() {
            continue;
        }
        if reduced[d] && !dims.is_empty() {
            return Err(format!("dim {d} appears more than once in {dims:?}"));
        }
        reduced[d] = true;
    }
    Ok(shape
        .iter()
        .zip(&reduced)
        .filter_map(|(&s, &r)| match (r, keepdim) {
            (false, _) => Some(s),
            (true, true) => Some(1),
            (true, false) => None,
        })
        .collect())
}

/// torch.matmul's shape rule, batch broadcasting included.
pub(crate) fn matmul(a: &[u64], b: &[u64]) -> Result<Vec<u64>, String> {
    if a.is_empty() || b.is_empty() {
        return Err("both arguments need at least 1 dimension".into());
    }
    let mismatch = || {
        format!(
            "cannot multiply {} by {}: inner dimensions differ",
            fmt_shape(a),
            fmt_shape(b)
        )
    };
    match (a.len(), b.len()) {
        (1, 1) => {
            if a[0] != b[0] {
                return Err(mismatch());
            }
            Ok(vec![])
        }
        _ => {
            let a2: Vec<u64> = if a.len() == 1 {
                vec![1, a[0]]
            } else {
                a.to_vec()
            };
            let b2: Vec<u64> = if b.len() == 1 {
                vec![b[0], 1]
            } else {
                b.to_vec()
            };
            let (ab, am) = a2.split_at(a2.len() - 2);
            let (bb, bm) = b2.split_at(b2.len() - 2);
            if am[1] != bm[0] {
                return Err(mismatch());
            }
            let mut out = broadcast(ab, bb)?;
            if a.len() > 1 {
                out.push(am[0]);
            }
            if b.len() > 1 {
                out.push(bm[1]);
            }
            Ok(out)
        }
    }
}

/// One operand's subscript: labels, with `None` marking where `...` sits.
type Subscript = Vec<Option<char>>;

fn parse_subscript(s: &str) -> Result<Subscript, String> {
    let mut out = Vec::new();
    let mut rest = s.trim();
    let mut seen_ellipsis = false;
    while let Some(c) = rest.chars().next() {
        if rest.starts_with("...") {
            if seen_ellipsis {
                return Err(format!("'...' appears twice in '{s}'"));
            }
            seen_ellipsis = true;
            out.push(None);
            rest = &rest[3..];
        } else if c.is_ascii_alphabetic() {
            out.push(Some(c));
            rest = &rest[1..];
        } else if c.is_whitespace() {
            rest = &rest[1..];
        } else {
            return Err(format!("unexpected character '{c}' in '{s}'"));
        }
    }
    Ok(out)
}

/// torch.einsum's shape rule: parses the equation (with `...` and implicit output).
pub(crate) fn einsum(equation: &str, shapes: &[&[u64]]) -> Result<Vec<u64>, String> {
    let (lhs, rhs) = match equation.split_once("->") {
        Some((l, r)) => (l, Some(r)),
        None => (equation, None),
    };
    let inputs: Vec<Subscript> = lhs
        .split(',')
        .map(parse_subscript)
        .collect::<Result<_, _>>()?;
    if inputs.len() != shapes.len() {
        return Err(format!(
            "equation '{equation}' names {} operands but {} were given",
            inputs.len(),
            shapes.len()
        ));
    }
    let mut sizes: BTreeMap<char, u64> = BTreeMap::new();
    let mut counts: BTreeMap<char, usize> = BTreeMap::new();
    let mut ellipsis: Vec<u64> = Vec::new();
    for (k, (sub, shape)) in inputs.iter().zip(shapes).enumerate() {
        let labels = sub.iter().filter(|l| l.is_some()).count();
        let has_ellipsis = sub.len() != labels;
        if (!has_ellipsis && labels != shape.len()) || (has_ellipsis && labels > shape.len()) {
            return Err(format!(
                "operand {k} has shape {} but its subscript has {labels} labels",
                fmt_shape(shape)
            ));
        }
        let ell_len = shape.len() - labels;
        let mut dim = 0;
        for l in sub {
            match l {
                None => {
                    ellipsis = broadcast(&ellipsis, &shape[dim..dim + ell_len])?;
                    dim += ell_len;
                }
                Some(c) => {
                    let size = shape[dim];
                    dim += 1;
                    *counts.entry(*c).or_default() += 1;
                    match sizes.get(c) {
                        Some(&old) if old == size || size == 1 => {}
                        Some(&1) | None => {
                            sizes.insert(*c, size);
                        }
                        Some(&old) => {
                            return Err(format!(
                                "label '{c}' has size {old} in one place and {size} in another"
                            ));
                        }
                    }
                }
            }
        }
    }
    let output: Subscript = match rhs {
        Some(r) => {
            let out = parse_subscript(r)?;
            for (i, l) in out.iter().enumerate() {
                if let Some(c) = l {
                    if !sizes.contains_key(c) {
                        return Err(format!("output label '{c}' does not appear in the inputs"));
                    }
                    if out[..i].contains(l) {
                        return Err(format!("output label '{c}' appears twice"));
                    }
                }
            }
            out
        }
        None => {
            let mut out: Subscript = Vec::new();
            if inputs.iter().any(|s| s.contains(&None)) {
                out.push(None);
            }
            out.extend(
                counts
                    .iter()
                    .filter(|&(_, &n)| n == 1)
                    .map(|(&c, _)| Some(c)),
            );
            out
        }
    };
    let mut shape = Vec::new();
    for l in output {
        match l {
            None => shape.extend_from_slice(&ellipsis),
            Some(c) => shape.push(sizes[&c]),
        }
    }
    Ok(shape)
}

/// The shape that numpy basic indexing with `items` selects from `shape`.
pub(crate) fn index(shape: &[u64], items: &[IndexItem]) -> Result<Vec<u64>, String> {
    let consuming = items
        .iter()
        .filter(|i| !matches!(i, IndexItem::Ellipsis | IndexItem::NewAxis))
        .count();
    let ellipses = items
        .iter()
        .filter(|i| matches!(i, IndexItem::Ellipsis))
        .count();
    if ellipses > 1 {
        return Err("an index may contain at most one ellipsis".into());
    }
    if consuming > shape.len() {
        return Err(format!(
            "too many indices ({consuming}) for shape {}",
            fmt_shape(shape)
        ));
    }
    let mut out = Vec::new();
    let mut dim = 0;
    for item in items {
        match *item {
            IndexItem::Full => {
                out.push(shape[dim]);
                dim += 1;
            }
            IndexItem::At(i) => {
                let n = shape[dim] as i64;
                if i < -n || i >= n {
                    return Err(format!(
                        "index {i} out of range for dimension {dim} of size {n} in {}",
                        fmt_shape(shape)
                    ));
                }
                dim += 1;
            }
            IndexItem::Slice { start, end, step } => {
                if step < 1 {
                    return Err(format!("slice step must be at least 1, got {step}"));
                }
                let n = shape[dim] as i64;
                let clamp = |v: i64| if v < 0 { (v + n).max(0) } else { v.min(n) };
                let s = start.map_or(0, clamp);
                let e = end.map_or(n, clamp);
                let len = if e > s { (e - s + step - 1) / step } else { 0 };
                out.push(len as u64);
                dim += 1;
            }
            IndexItem::Ellipsis => {
                let skip = shape.len() - consuming;
                out.extend_from_slice(&shape[dim..dim + skip]);
                dim += skip;
            }
            IndexItem::NewAxis => out.push(1),
        }
    }
    out.extend_from_slice(&shape[dim..]);
    Ok(out)
}

/// Number of elements of a shape, or `None` on overflow.
pub(crate) fn numel(shape: &[u64]) -> Option<u64> {
    shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::IndexItem::*;

    #[test]
    fn broadcasting_follows_numpy() {
        assert_eq!(broadcast(&[1, 9, 576], &[576]), Ok(vec![1, 9, 576]));
        assert_eq!(broadcast(&[4, 1], &[1, 3]), Ok(vec![4, 3]));
        let err = broadcast(&[1, 9, 576], &[577]).expect_err("mismatch");
        assert_eq!(err, "cannot broadcast [1,9,576] with [577]");
        assert!(broadcasts_to(&[576], &[1, 9, 576]));
        assert!(!broadcasts_to(&[2, 1, 576], &[1, 9, 576]));
    }

    #[test]
    fn matmul_follows_torch() {
        assert_eq!(matmul(&[3], &[3]), Ok(vec![]));
        assert_eq!(matmul(&[2, 3], &[3]), Ok(vec![2]));
        assert_eq!(matmul(&[3], &[3, 4]), Ok(vec![4]));
        assert_eq!(matmul(&[5, 1, 2, 3], &[7, 3, 4]), Ok(vec![5, 7, 2, 4]));
        assert!(matmul(&[2, 3], &[4, 5]).is_err());
    }

    #[test]
    fn einsum_parses_equations() {
        assert_eq!(einsum("ij,jk->ik", &[&[2, 3], &[3, 4]]), Ok(vec![2, 4]));
        assert_eq!(einsum("ij,jk", &[&[2, 3], &[3, 4]]), Ok(vec![2, 4]));
        assert_eq!(einsum("...d,d->...", &[&[2, 5, 8], &[8]]), Ok(vec![2, 5]));
        assert_eq!(
            einsum("bhqd,bhkd->bhqk", &[&[1, 2, 3, 4], &[1, 2, 5, 4]]),
            Ok(vec![1, 2, 3, 5])
        );
        assert_eq!(einsum("ii->i", &[&[3, 3]]), Ok(vec![3]));
        assert_eq!(einsum("i->", &[&[3]]), Ok(vec![]));
        assert!(einsum("ij,jk->ik", &[&[2, 3], &[4, 4]]).is_err());
        assert!(einsum("ij->ix", &[&[2, 3]]).is_err());
        assert!(einsum("ij", &[&[2, 3, 4]]).is_err());
        assert!(einsum("i$", &[&[2, 3]]).is_err());
    }

    #[test]
    fn indexing_follows_numpy() {
        let s = [2, 9, 8];
        assert_eq!(index(&s, &[Full, At(-1)]), Ok(vec![2, 8]));
        assert_eq!(index(&s, &[Ellipsis, At(0)]), Ok(vec![2, 9]));
        assert_eq!(index(&s, &[NewAxis, Full]), Ok(vec![1, 2, 9, 8]));
        assert_eq!(
            index(&s, &[Full, IndexItem::slice(Some(-3), None)]),
            Ok(vec![2, 3, 8])
        );
        assert_eq!(
            index(
                &s,
                &[
                    Full,
                    Slice {
                        start: Some(1),
                        end: Some(8),
                        step: 3
                    }
                ]
            ),
            Ok(vec![2, 3, 8])
        );
        assert_eq!(
            index(&s, &[Full, IndexItem::slice(Some(5), Some(2))]),
            Ok(vec![2, 0, 8])
        );
        assert!(index(&s, &[Full, At(9)]).is_err());
        assert!(index(&s, &[Full, Full, Full, Full]).is_err());
        assert!(index(&s, &[Ellipsis, Ellipsis]).is_err());
        assert!(
            index(
                &s,
                &[Slice {
                    start: None,
                    end: None,
                    step: -1
                }]
            )
            .is_err()
        );
    }

    #[test]
    fn reductions() {
        assert_eq!(reduce(&[2, 3, 4], &[-1], false), Ok(vec![2, 3]));
        assert_eq!(reduce(&[2, 3, 4], &[0, 2], true), Ok(vec![1, 3, 1]));
        assert_eq!(reduce(&[2, 3, 4], &[], false), Ok(vec![]));
        assert!(reduce(&[2, 3], &[1, -1], false).is_err());
        assert!(reduce(&[2, 3], &[2], false).is_err());
    }
}
