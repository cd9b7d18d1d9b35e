//! Tensors on the wire: a dtype, a shape and raw little-endian bytes.

use serde::{Deserialize, Serialize};

/// Element type of a [`WireTensor`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum WireDType {
    /// 32-bit IEEE float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// bfloat16.
    Bf16,
    /// 64-bit signed integer (token ids, indices).
    I64,
    /// Boolean, one byte per element (0 or 1).
    Bool,
}

impl WireDType {
    /// Size of one element in bytes.
    pub const fn size(self) -> usize {
        match self {
            WireDType::F32 => 4,
            WireDType::F16 | WireDType::Bf16 => 2,
            WireDType::I64 => 8,
            WireDType::Bool => 1,
        }
    }
}

/// Why a [`WireTensor`] is inconsistent or of the wrong type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TensorError {
    /// The number of elements does not fit in memory (`shape` overflows).
    #[error("shape {shape:?} overflows the addressable size")]
    Overflow {
        /// The offending shape.
        shape: Vec<u64>,
    },
    /// `data` is not `numel * dtype.size()` bytes long.
    #[error("shape {shape:?} of {dtype:?} needs {expected} bytes, got {actual}")]
    Length {
        /// The tensor's dtype.
        dtype: WireDType,
        /// The tensor's shape.
        shape: Vec<u64>,
        /// Bytes the shape and dtype require.
        expected: usize,
        /// Bytes present.
        actual: usize,
    },
    /// The tensor has another dtype than the accessor asked for.
    #[error("expected a {expected:?} tensor, got {actual:?}")]
    DType {
        /// The dtype asked for.
        expected: WireDType,
        /// The dtype present.
        actual: WireDType,
    },
}

/// A dense tensor as it travels: row-major, little-endian element bytes.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireTensor {
    /// Element type.
    pub dtype: WireDType,
    /// Dimensions, outermost first. An empty shape is a scalar.
    pub shape: Vec<u64>,
    /// `numel * dtype.size()` little-endian bytes.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

impl std::fmt::Debug for WireTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Payloads can be megabytes; show the header only.
        f.debug_struct("WireTensor")
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("bytes", &self.data.len())
            .finish()
    }
}

/// Number of elements of `shape`, or `None` on overflow.
fn numel(shape: &[u64]) -> Option<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(usize::try_from(d).ok()?))
}

impl WireTensor {
    /// Number of elements the shape describes.
    ///
    /// # Errors
    /// [`TensorError::Overflow`] if the product of the dimensions overflows.
    pub fn numel(&self) -> Result<usize, TensorError> {
        numel(&self.shape).ok_or_else(|| TensorError::Overflow {
            shape: self.shape.clone(),
        })
    }

    /// Checks that `data` holds exactly `numel * dtype.size()` bytes.
    ///
    /// # Errors
    /// [`TensorError::Overflow`] or [`TensorError::Length`].
    pub fn check(&self) -> Result<(), TensorError> {
        let expected = self
            .numel()?
            .checked_mul(self.dtype.size())
            .ok_or_else(|| TensorError::Overflow {
                shape: self.shape.clone(),
            })?;
        if expected != self.data.len() {
            return Err(TensorError::Length {
                dtype: self.dtype,
                shape: self.shape.clone(),
                expected,
                actual: self.data.len(),
            });
        }
        Ok(())
    }

    /// Builds an f32 tensor.
    ///
    /// # Errors
    /// [`TensorError`] if `values` does not fill `shape` exactly.
    pub fn from_f32(shape: Vec<u64>, values: &[f32]) -> Result<WireTensor, TensorError> {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let t = WireTensor {
            dtype: WireDType::F32,
            shape,
            data,
        };
        t.check()?;
        Ok(t)
    }

    /// Builds an i64 tensor.
    ///
    /// # Errors
    /// [`TensorError`] if `values` does not fill `shape` exactly.
    pub fn from_i64(shape: Vec<u64>, values: &[i64]) -> Result<WireTensor, TensorError> {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let t = WireTensor {
            dtype: WireDType::I64,
            shape,
            data,
        };
        t.check()?;
        Ok(t)
    }

    fn expect(&self, dtype: WireDType) -> Result<(), TensorError> {
        if self.dtype != dtype {
            return Err(TensorError::DType {
                expected: dtype,
                actual: self.dtype,
            });
        }
        self.check()
    }

    /// Decodes the elements of an f32 tensor.
    ///
    /// # Errors
    /// [`TensorError::DType`] for another dtype, or a failed [`check`](Self::check).
    pub fn to_f32(&self) -> Result<Vec<f32>, TensorError> {
        self.expect(WireDType::F32)?;
        Ok(self
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("chunks of 4")))
            .collect())
    }

    /// Decodes the elements of any tensor as `f64` (exact for every dtype
    /// but i64 values beyond 2^53); for comparisons.
    ///
    /// # Errors
    /// A failed [`check`](Self::check).
    pub fn to_f64(&self) -> Result<Vec<f64>, TensorError> {
        self.check()?;
        let size = self.dtype.size();
        Ok(self
            .data
            .chunks_exact(size)
            .map(|c| match self.dtype {
                WireDType::F32 => f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                WireDType::Bf16 => f64::from(f32::from_bits(
                    u32::from(u16::from_le_bytes([c[0], c[1]])) << 16,
                )),
                WireDType::F16 => f16_to_f64(u16::from_le_bytes([c[0], c[1]])),
                WireDType::I64 => i64::from_le_bytes(c.try_into().expect("chunks of 8")) as f64,
                WireDType::Bool => f64::from(c[0]),
            })
            .collect())
    }

    /// Decodes the elements of an i64 tensor.
    ///
    /// # Errors
    /// [`TensorError::DType`] for another dtype, or a failed [`check`](Self::check).
    pub fn to_i64(&self) -> Result<Vec<i64>, TensorError> {
        self.expect(WireDType::I64)?;
        Ok(self
            .data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("chunks of 8")))
            .collect())
    }

    /// blake3 digest of the tensor: dtype, shape and data, so that equal
    /// bytes under different shapes hash differently.
    pub fn blake3(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        h.update(&[self.dtype as u8]);
        h.update(&(self.shape.len() as u64).to_le_bytes());
        for d in &self.shape {
            h.update(&d.to_le_bytes());
        }
        h.update(&self.data);
        *h.finalize().as_bytes()
    }
}

/// An IEEE half-precision float's value.
fn f16_to_f64(h: u16) -> f64 {
    let sign = if h >> 15 == 1 { -1.0 } else { 1.0 };
    let exp = i32::from((h >> 10) & 0x1f);
    let frac = f64::from(h & 0x3ff);
    match exp {
        0 => sign * frac * 2f64.powi(-24),
        31 if frac == 0.0 => sign * f64::INFINITY,
        31 => f64::NAN,
        _ => sign * (1.0 + frac / 1024.0) * 2f64.powi(exp - 15),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_round_trip() {
        let t = WireTensor::from_f32(vec![2, 2], &[1.0, -2.5, 3.25, 0.0]).unwrap();
        assert_eq!(t.data.len(), 16);
        assert_eq!(&t.data[..4], &1.0f32.to_le_bytes());
        assert_eq!(t.to_f32().unwrap(), vec![1.0, -2.5, 3.25, 0.0]);
        assert!(matches!(t.to_i64(), Err(TensorError::DType { .. })));
    }

    #[test]
    fn i64_round_trip() {
        let t = WireTensor::from_i64(vec![1, 3], &[1, -2, i64::MAX]).unwrap();
        assert_eq!(t.to_i64().unwrap(), vec![1, -2, i64::MAX]);
    }

    #[test]
    fn scalar_and_empty() {
        let s = WireTensor::from_f32(vec![], &[7.0]).unwrap();
        assert_eq!(s.numel().unwrap(), 1);
        let e = WireTensor::from_f32(vec![0, 5], &[]).unwrap();
        assert_eq!(e.numel().unwrap(), 0);
    }

    #[test]
    fn length_mismatch() {
        assert!(matches!(
            WireTensor::from_f32(vec![3], &[1.0]),
            Err(TensorError::Length {
                expected: 12,
                actual: 4,
                ..
            })
        ));
    }

    #[test]
    fn overflow_is_an_error() {
        let t = WireTensor {
            dtype: WireDType::F32,
            shape: vec![u64::MAX, u64::MAX],
            data: vec![],
        };
        assert!(matches!(t.check(), Err(TensorError::Overflow { .. })));
        let t = WireTensor {
            dtype: WireDType::I64,
            shape: vec![usize::MAX as u64 / 2],
            data: vec![],
        };
        assert!(matches!(t.check(), Err(TensorError::Overflow { .. })));
    }

    #[test]
    fn every_dtype_reads_as_f64() {
        let t = |dtype, data: Vec<u8>| WireTensor {
            dtype,
            shape: vec![2],
            data,
        };
        // 1.5 and -2 in each encoding.
        let f16 = [0x3e00u16, 0xc000]
            .iter()
            .flat_map(|h| h.to_le_bytes())
            .collect();
        let bf16 = [0x3fc0u16, 0xc000]
            .iter()
            .flat_map(|h| h.to_le_bytes())
            .collect();
        assert_eq!(t(WireDType::F16, f16).to_f64().unwrap(), [1.5, -2.0]);
        assert_eq!(t(WireDType::Bf16, bf16).to_f64().unwrap(), [1.5, -2.0]);
        let f = WireTensor::from_f32(vec![2], &[1.5, -2.0]).unwrap();
        assert_eq!(f.to_f64().unwrap(), [1.5, -2.0]);
        let i = WireTensor::from_i64(vec![2], &[3, -4]).unwrap();
        assert_eq!(i.to_f64().unwrap(), [3.0, -4.0]);
        assert_eq!(t(WireDType::Bool, vec![1, 0]).to_f64().unwrap(), [1.0, 0.0]);
        // Subnormal and infinite halves.
        assert_eq!(f16_to_f64(0x0001), 2f64.powi(-24));
        assert_eq!(f16_to_f64(0xfc00), f64::NEG_INFINITY);
        assert!(f16_to_f64(0x7e00).is_nan());
    }

    #[test]
    fn digest_covers_shape() {
        let a = WireTensor::from_f32(vec![4], &[1.0, 2.0, 3.0, 4.0]).unwrap();
        let mut b = a.clone();
        b.shape = vec![2, 2];
        assert_ne!(a.blake3(), b.blake3());
        assert_eq!(a.blake3(), a.clone().blake3());
    }
}
