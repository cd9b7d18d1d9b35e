//! A GGUF reader: header, metadata, tensor infos, alignment, and
//! dequantization of the common block formats into `f32`.
//!
//! Follows the format of llama.cpp's `gguf.md` and the block layouts of
//! `ggml-quants.c`. The file is memory-mapped, so a stage that needs 10 of 80
//! layers only touches those layers' bytes.

use std::{collections::HashMap, fs::File, path::Path};

use half::{bf16, f16};
use memmap2::Mmap;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

/// What went wrong reading a GGUF file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GgufError {
    /// The file cannot be opened or mapped.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file does not start with `GGUF`.
    #[error("{path} is not a GGUF file (magic {magic:?})")]
    Magic {
        /// The file.
        path: String,
        /// Its first four bytes.
        magic: [u8; 4],
    },
    /// A GGUF version this reader does not read.
    #[error("GGUF version {0} is not supported (2 and 3 are)")]
    Version(u32),
    /// The file ends before a header, value or tensor does.
    #[error("GGUF file is truncated: needed {needed} bytes at offset {offset}, file has {len}")]
    Truncated {
        /// Where the read started.
        offset: u64,
        /// Bytes needed.
        needed: u64,
        /// The file's length.
        len: u64,
    },
    /// A metadata value of an unknown type.
    #[error("GGUF metadata {key:?} has an unknown value type {ty}")]
    ValueType {
        /// The metadata key.
        key: String,
        /// The type code.
        ty: u32,
    },
    /// A metadata value that is missing or of the wrong kind.
    #[error("GGUF metadata {key:?}: {detail}")]
    Metadata {
        /// The metadata key.
        key: String,
        /// What is wrong.
        detail: String,
    },
    /// A tensor of a quantization type this reader does not dequantize.
    #[error("tensor {name:?} has quantization type {ty} ({}), which is not supported", type_name(*ty))]
    Unsupported {
        /// The tensor.
        name: String,
        /// The GGML type code.
        ty: u32,
    },
    /// A tensor the model needs is not in the file.
    #[error("tensor {0:?} is not in the file")]
    Missing(String),
    /// A tensor whose header does not fit the file (shape, offset, size).
    #[error("tensor {name:?}: {detail}")]
    Tensor {
        /// The tensor.
        name: String,
        /// What is wrong.
        detail: String,
    },
}

/// A metadata value, one variant per GGUF value type.
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)] // the variants are the GGUF types they are named after
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, if it is an integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// The value as a string, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
}

/// Where a tensor's bytes are and how to read them.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Row-major (PyTorch) shape: GGUF stores dimensions fastest-first, this is reversed.
    pub shape: Vec<usize>,
    /// The ggml type id.
    pub ty: u32,
    /// Absolute byte offset in the file.
    pub offset: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// An open, memory-mapped GGUF file.
#[derive(Debug)]
pub struct Gguf {
    mmap: Mmap,
    /// GGUF format version.
    pub version: u32,
    /// All metadata key-value pairs.
    pub metadata: HashMap<String, Value>,
    /// Tensor infos by name.
    pub tensors: HashMap<String, TensorInfo>,
    /// Tensor names in file order.
    pub names: Vec<String>,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], GgufError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let Some(end) = end else {
            return Err(GgufError::Truncated {
                offset: self.pos as u64,
                needed: n as u64,
                len: self.buf.len() as u64,
            });
        };
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        Ok(self.take(N)?.try_into().expect("take returned N bytes"))
    }
    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    fn len(&mut self) -> Result<usize, GgufError> {
        let n = self.u64()?;
        // Every length must fit in what is left of the file; this also keeps a
        // corrupt count from allocating absurd vectors.
        if n > (self.buf.len() - self.pos) as u64 {
            return Err(GgufError::Truncated {
                offset: self.pos as u64,
                needed: n,
                len: self.buf.len() as u64,
            });
        }
        Ok(n as usize)
    }
    fn string(&mut self) -> Result<String, GgufError> {
        let n = self.len()?;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
    fn value(&mut self, key: &str, ty: u32) -> Result<Value, GgufError> {
        Ok(match ty {
            0 => Value::U8(self.arr::<1>()?[0]),
            1 => Value::I8(self.arr::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.arr()?)),
            3 => Value::I16(i16::from_le_bytes(self.arr()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.arr()?)),
            6 => Value::F32(f32::from_le_bytes(self.arr()?)),
            7 => Value::Bool(self.arr::<1>()?[0] != 0),
            8 => Value::String(self.string()?),
            9 => {
                let ety = self.u32()?;
                let n = self.len()?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(key, ety)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.arr()?)),
            12 => Value::F64(f64::from_le_bytes(self.arr()?)),
            ty => {
                return Err(GgufError::ValueType {
                    key: key.to_string(),
                    ty,
                });
            }
        })
    }
}

impl Gguf {
    /// Opens and parses a GGUF file; tensor data is read lazily.
    ///
    /// # Errors
    /// When the file cannot be opened, is not GGUF, or its header is truncated.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let open_err = |source| GgufError::Open {
            path: path.display().to_string(),
            source,
        };
        let file = File::open(path).map_err(open_err)?;
        // SAFETY-free: memmap2's `map` is safe to call; the file must not be
        // truncated while mapped, which holds for model files we only read.
        let mmap = map(&file).map_err(open_err)?;
        let mut r = Reader { buf: &mmap, pos: 0 };
        let magic: [u8; 4] = r.arr().map_err(|_| GgufError::Magic {
            path: path.display().to_string(),
            magic: [0; 4],
        })?;
        if &magic != MAGIC {
            return Err(GgufError::Magic {
                path: path.display().to_string(),
                magic,
            });
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Version(version));
        }
        let n_tensors = r.u64()?;
        let n_kv = r.u64()?;
        let mut metadata = HashMap::new();
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            let v = r.value(&key, ty)?;
            metadata.insert(key, v);
        }
        let mut infos = Vec::new();
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()? as usize;
            if n_dims > 8 {
                return Err(GgufError::Tensor {
                    name,
                    detail: format!("{n_dims} dimensions"),
                });
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                dims.push(r.u64()? as usize);
            }
            dims.reverse();
            let ty = r.u32()?;
            let offset = r.u64()?;
            infos.push((name, dims, ty, offset));
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(Value::as_u64)
            .filter(|&a| a > 0)
            .unwrap_or(DEFAULT_ALIGNMENT);
        let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
        let mut tensors = HashMap::new();
        let mut names = Vec::new();
        for (name, shape, ty, offset) in infos {
            names.push(name.clone());
            tensors.insert(
                name,
                TensorInfo {
                    shape,
                    ty,
                    offset: data_start + offset,
                },
            );
        }
        Ok(Gguf {
            mmap,
            version,
            metadata,
            tensors,
            names,
        })
    }

    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A required integer metadata value.
    ///
    /// # Errors
    /// When the key is missing or not an integer.
    pub fn u64(&self, key: &str) -> Result<u64, GgufError> {
        self.get(key)
            .and_then(Value::as_u64)
            .ok_or_else(|| GgufError::Metadata {
                key: key.to_string(),
                detail: "missing or not an integer".into(),
            })
    }

    /// A required string metadata value.
    ///
    /// # Errors
    /// When the key is missing or not a string.
    pub fn str(&self, key: &str) -> Result<&str, GgufError> {
        self.get(key)
            .and_then(Value::as_str)
            .ok_or_else(|| GgufError::Metadata {
                key: key.to_string(),
                detail: "missing or not a string".into(),
            })
    }

    /// A string-array metadata value.
    ///
    /// # Errors
    /// When the key is missing or not an array of strings.
    pub fn strings(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        let bad = || GgufError::Metadata {
            key: key.to_string(),
            detail: "missing or not an array of strings".into(),
        };
        match self.get(key) {
            Some(Value::Array(v)) => v.iter().map(|x| x.as_str().ok_or_else(bad)).collect(),
            _ => Err(bad()),
        }
    }

    /// Dequantizes a tensor into `f32`, row-major in [`TensorInfo::shape`].
    ///
    /// # Errors
    /// When the tensor is missing, its type is unsupported, or its bytes lie past the end of the file.
    pub fn dequantize(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>), GgufError> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| GgufError::Missing(name.to_string()))?;
        let numel = info.numel();
        let Some((block_elems, block_bytes)) = block_size(info.ty) else {
            return Err(GgufError::Unsupported {
                name: name.to_string(),
                ty: info.ty,
            });
        };
        if numel % block_elems != 0 {
            return Err(GgufError::Tensor {
                name: name.to_string(),
                detail: format!(
                    "{numel} elements is not a multiple of the block size {block_elems}"
                ),
            });
        }
        let nbytes = (numel / block_elems * block_bytes) as u64;
        let end = info.offset.checked_add(nbytes);
        if end.is_none_or(|e| e > self.mmap.len() as u64) {
            return Err(GgufError::Truncated {
                offset: info.offset,
                needed: nbytes,
                len: self.mmap.len() as u64,
            });
        }
        let raw = &self.mmap[info.offset as usize..(info.offset + nbytes) as usize];
        let out = dequantize(info.ty, raw, numel).ok_or_else(|| GgufError::Unsupported {
            name: name.to_string(),
            ty: info.ty,
        })?;
        Ok((out, info.shape.clone()))
    }
}

#[allow(unsafe_code)]
fn map(file: &File) -> std::io::Result<Mmap> {
    // SAFETY: the mapping is read-only; model files are not modified while a
    // node runs (the same assumption every mmap-based loader makes).
    unsafe { Mmap::map(file) }
}

/// The name ggml gives a type id.
pub fn type_name(ty: u32) -> &'static str {
    match ty {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        30 => "BF16",
        _ => "unknown",
    }
}

/// (elements per block, bytes per block) of the supported types.
fn block_size(ty: u32) -> Option<(usize, usize)> {
    Some(match ty {
        0 => (1, 4),
        1 | 30 => (1, 2),
        2 => (32, 18),
        3 => (32, 20),
        8 => (32, 34),
        12 => (256, 144),
        14 => (256, 210),
        _ => return None,
    })
}

fn h(b: &[u8]) -> f32 {
    f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// Dequantizes `raw` blocks of type `ty` into `numel` floats; `None` for an unsupported type.
pub fn dequantize(ty: u32, raw: &[u8], numel: usize) -> Option<Vec<f32>> {
    let mut out = Vec::with_capacity(numel);
    match ty {
        0 => out.extend(
            raw.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
        1 => out.extend(raw.chunks_exact(2).map(h)),
        30 => out.extend(
            raw.chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        // Q4_0: d:f16, qs[16]; x = (q - 8) * d; low nibbles are elements 0..16.
        2 => {
            for b in raw.chunks_exact(18) {
                let d = h(&b[0..2]);
                let qs = &b[2..18];
                out.extend(qs.iter().map(|q| ((q & 0xF) as i32 - 8) as f32 * d));
                out.extend(qs.iter().map(|q| ((q >> 4) as i32 - 8) as f32 * d));
            }
        }
        // Q4_1: d:f16, m:f16, qs[16]; x = q * d + m.
        3 => {
            for b in raw.chunks_exact(20) {
                let (d, m) = (h(&b[0..2]), h(&b[2..4]));
                let qs = &b[4..20];
                out.extend(qs.iter().map(|q| (q & 0xF) as f32 * d + m));
                out.extend(qs.iter().map(|q| (q >> 4) as f32 * d + m));
            }
        }
        // Q8_0: d:f16, qs:[i8; 32]; x = q * d.
        8 => {
            for b in raw.chunks_exact(34) {
                let d = h(&b[0..2]);
                out.extend(b[2..34].iter().map(|&q| q as i8 as f32 * d));
            }
        }
        12 => raw.chunks_exact(144).for_each(|b| q4_k(b, &mut out)),
        14 => raw.chunks_exact(210).for_each(|b| q6_k(b, &mut out)),
        _ => return None,
    }
    debug_assert_eq!(out.len(), numel);
    Some(out)
}

/// Q4_K super-block: d:f16, dmin:f16, scales[12] (6-bit scales and mins), qs[128].
fn q4_k(b: &[u8], out: &mut Vec<f32>) {
    let (d, dmin) = (h(&b[0..2]), h(&b[2..4]));
    let scales = &b[4..16];
    let scale_min = |j: usize| -> (u8, u8) {
        if j < 4 {
            (scales[j] & 63, scales[j + 4] & 63)
        } else {
            (
                (scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4),
                (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
            )
        }
    };
    for (chunk, q) in b[16..144].chunks_exact(32).enumerate() {
        let (s1, m1) = scale_min(2 * chunk);
        let (s2, m2) = scale_min(2 * chunk + 1);
        let (d1, m1) = (d * s1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * s2 as f32, dmin * m2 as f32);
        out.extend(q.iter().map(|&x| d1 * (x & 0xF) as f32 - m1));
        out.extend(q.iter().map(|&x| d2 * (x >> 4) as f32 - m2));
    }
}

/// Q6_K super-block: ql[128] (low 4 bits), qh[64] (high 2 bits), scales:[i8; 16], d:f16.
fn q6_k(b: &[u8], out: &mut Vec<f32>) {
    let d = h(&b[208..210]);
    let mut y = [0f32; 256];
    for half in 0..2 {
        let ql = &b[half * 64..half * 64 + 64];
        let qh = &b[128 + half * 32..128 + half * 32 + 32];
        let sc = &b[192 + half * 8..192 + half * 8 + 8];
        let y = &mut y[half * 128..half * 128 + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
    out.extend_from_slice(&y);
}
