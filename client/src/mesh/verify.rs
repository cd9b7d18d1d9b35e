//! Redundant execution: comparing what two holders of the same layers
//! computed from the same input.

use nnmesh_protocol::{message::HopOutput, tensor::WireTensor};

/// How close two holders' values must be: element-wise
/// `|a - b| <= atol + rtol · |a|`, as `torch.allclose`; token ids and
/// other integers must be equal.
///
/// The default (atol 1e-3, rtol 1e-4) admits what different CPU kernels
/// (AVX2, AVX-512, thread counts) produce from the same input — the
/// runtime's tests measured drifts up to 3.7e-2 at residual values of
/// 2·10⁴, i.e. 1.8e-6 relative — with margin, and flags any tampering
/// larger than that.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    /// Absolute part.
    pub atol: f64,
    /// Part relative to the route holder's value.
    pub rtol: f64,
}

impl Default for Tolerance {
    fn default() -> Self {
        Tolerance {
            atol: 1e-3,
            rtol: 1e-4,
        }
    }
}

/// Compares two tensors; describes the first difference found.
pub(super) fn tensors(
    what: &str,
    a: &WireTensor,
    b: &WireTensor,
    tol: Tolerance,
) -> Result<(), String> {
    if a.dtype != b.dtype || a.shape != b.shape {
        return Err(format!(
            "{what}: {:?} {:?} against {:?} {:?}",
            a.dtype, a.shape, b.dtype, b.shape
        ));
    }
    let (x, y) = match (a.to_f64(), b.to_f64()) {
        (Ok(x), Ok(y)) => (x, y),
        (Err(e), _) | (_, Err(e)) => return Err(format!("{what}: {e}")),
    };
    let mut worst: Option<(usize, f64, f64)> = None;
    for (i, (&u, &v)) in x.iter().zip(&y).enumerate() {
        let close = (u - v).abs() <= tol.atol + tol.rtol * u.abs() || (u.is_nan() && v.is_nan());
        if !close && worst.is_none_or(|(_, p, q)| (u - v).abs() > (p - q).abs()) {
            worst = Some((i, u, v));
        }
    }
    match worst {
        None => Ok(()),
        Some((i, u, v)) => Err(format!(
            "{what} differs at element {i}: {u} against {v} (|diff| {:.3e}, beyond atol {} + rtol {})",
            (u - v).abs(),
            tol.atol,
            tol.rtol
        )),
    }
}

/// Compares two hops' outputs: the hidden state and every carried value.
pub(super) fn outputs(a: &HopOutput, b: &HopOutput, tol: Tolerance) -> Result<(), String> {
    match (&a.hidden, &b.hidden) {
        (Some(x), Some(y)) => tensors("the hidden state", x, y, tol)?,
        (None, None) => {}
        _ => return Err("only one of them sent a hidden state".into()),
    }
    if a.carry.len() != b.carry.len() {
        return Err(format!(
            "{} carried values against {}",
            a.carry.len(),
            b.carry.len()
        ));
    }
    for x in &a.carry {
        let y = b
            .carry
            .iter()
            .find(|y| y.node == x.node)
            .ok_or_else(|| format!("carried node {} is missing from the twin", x.node))?;
        tensors(&format!("carried node {}", x.node), &x.value, &y.value, tol)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32]) -> WireTensor {
        WireTensor::from_f32(vec![v.len() as u64], v).expect("consistent")
    }

    #[test]
    fn close_values_pass_and_tampering_is_named() {
        let tol = Tolerance::default();
        assert!(tensors("h", &t(&[1.0, 20_000.0]), &t(&[1.0005, 20_001.5]), tol).is_ok());
        let e = tensors("h", &t(&[1.0, 2.0, 3.0]), &t(&[1.0, 2.5, 3.1]), tol).expect_err("differs");
        assert!(e.contains("element 1") && e.contains("2.5"), "{e}");
        let e = tensors("h", &t(&[1.0]), &t(&[1.0, 2.0]), tol).expect_err("shape");
        assert!(e.contains("[1]") && e.contains("[2]"), "{e}");
        let ids = |v: &[i64]| WireTensor::from_i64(vec![v.len() as u64], v).expect("ids");
        assert!(tensors("ids", &ids(&[3, 4]), &ids(&[3, 4]), tol).is_ok());
        assert!(tensors("ids", &ids(&[3, 4]), &ids(&[3, 5]), tol).is_err());
    }
}
