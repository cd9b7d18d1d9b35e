//! Model checkpoints: a GGUF file, or a Hugging Face folder (`config.json` +
//! one or many `*.safetensors`, with `model.safetensors.index.json` when
//! sharded). Tensors are addressed by their Hugging Face names and read one at
//! a time from a memory map, so a stage reads only its own weights.

use std::{
    collections::HashMap,
    fs::File,
    path::{Path, PathBuf},
};

use memmap2::Mmap;
use tch::{Device, Kind, Tensor};

use crate::{
    gguf::{Gguf, GgufError},
    models::llama::config::{Config, ConfigError},
};

/// What went wrong opening a checkpoint or reading a tensor from it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// No file or folder at the path.
    #[error("model file {0} does not exist")]
    NotFound(PathBuf),
    /// Reading a file failed.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The GGUF file is malformed.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// The configuration is missing or invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A safetensors file is malformed.
    #[error("{path}: {detail}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A tensor the model needs is not in the checkpoint.
    #[error("tensor {name} is not in the checkpoint")]
    Missing {
        /// The tensor's Hugging Face name.
        name: String,
    },
    /// A tensor's dtype cannot be loaded.
    #[error("tensor {name} has dtype {dtype}, which is not supported")]
    Dtype {
        /// The tensor.
        name: String,
        /// Its dtype.
        dtype: String,
    },
    /// A tensor's shape is not the one the configuration implies.
    #[error("tensor {name} has shape {found:?}, expected {expected:?}")]
    Shape {
        /// The tensor.
        name: String,
        /// Its shape.
        found: Vec<i64>,
        /// The shape the configuration implies.
        expected: Vec<i64>,
    },
}

/// The blake3 id of a model: the GGUF file (weights, tokenizer and
/// configuration in one), or a checkpoint folder's `config.json`,
/// `tokenizer.json` and `*.safetensors` files (name order), so nodes that
/// tokenize or configure the model differently never share an id.
///
/// # Errors
/// When a file cannot be read.
pub fn model_id(path: &Path) -> std::io::Result<nnmesh_protocol::ModelId> {
    let files = if path.is_dir() {
        let mut weights: Vec<PathBuf> = std::fs::read_dir(path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        weights.sort();
        let mut all = vec![path.join("config.json"), path.join("tokenizer.json")];
        all.extend(weights);
        all
    } else {
        vec![path.to_path_buf()]
    };
    nnmesh_protocol::ModelId::of_files(&files)
}

/// One tensor entry of a safetensors file.
#[derive(Debug, Clone)]
struct SafeEntry {
    file: usize,
    dtype: String,
    shape: Vec<i64>,
    start: usize,
    end: usize,
}

/// Where the tensors come from.
#[derive(Debug)]
enum Source {
    Gguf(Box<Gguf>),
    Safetensors {
        files: Vec<(PathBuf, Mmap)>,
        entries: HashMap<String, SafeEntry>,
    },
}

/// An open checkpoint: configuration plus lazily read tensors.
#[derive(Debug)]
pub struct Checkpoint {
    /// The file or folder it was opened from.
    pub path: PathBuf,
    /// The model configuration.
    pub config: Config,
    source: Source,
}

impl Checkpoint {
    /// Opens a `.gguf` file or a Hugging Face checkpoint folder.
    ///
    /// # Errors
    /// When the path is missing, malformed, or describes an unsupported model.
    pub fn open(path: &Path) -> Result<Self, LoadError> {
        if !path.exists() {
            return Err(LoadError::NotFound(path.to_path_buf()));
        }
        if path.is_dir() {
            return Self::open_hf(path);
        }
        let gguf = Gguf::open(path)?;
        let config = Config::from_gguf(&gguf)?;
        Ok(Checkpoint {
            path: path.to_path_buf(),
            config,
            source: Source::Gguf(Box::new(gguf)),
        })
    }

    fn open_hf(dir: &Path) -> Result<Self, LoadError> {
        let read = |p: PathBuf| {
            std::fs::read_to_string(&p).map_err(|source| LoadError::Io { path: p, source })
        };
        let config = Config::from_json(&read(dir.join("config.json"))?)?;
        let index = dir.join("model.safetensors.index.json");
        let names: Vec<PathBuf> = if index.exists() {
            let text = read(index.clone())?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| LoadError::Safetensors {
                    path: index.clone(),
                    detail: e.to_string(),
                })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| LoadError::Safetensors {
                    path: index.clone(),
                    detail: "no weight_map".into(),
                })?;
            let mut files: Vec<PathBuf> = map
                .values()
                .filter_map(|f| f.as_str())
                .map(|f| dir.join(f))
                .collect();
            files.sort();
            files.dedup();
            files
        } else {
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|source| LoadError::Io {
                    path: dir.to_path_buf(),
                    source,
                })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            files.sort();
            files
        };
        if names.is_empty() {
            return Err(LoadError::Safetensors {
                path: dir.to_path_buf(),
                detail: "no *.safetensors files".into(),
            });
        }
        let mut files = Vec::new();
        let mut entries = HashMap::new();
        for (i, p) in names.into_iter().enumerate() {
            let f = File::open(&p).map_err(|source| LoadError::Io {
                path: p.clone(),
                source,
            })?;
            let mmap = map(&f).map_err(|source| LoadError::Io {
                path: p.clone(),
                source,
            })?;
            for (name, e) in parse_safetensors_header(&p, &mmap, i)? {
                entries.insert(name, e);
            }
            files.push((p, mmap));
        }
        Ok(Checkpoint {
            path: dir.to_path_buf(),
            config,
            source: Source::Safetensors { files, entries },
        })
    }

    /// Whether the checkpoint has a tensor of this Hugging Face name.
    pub fn has(&self, name: &str) -> bool {
        match &self.source {
            Source::Gguf(g) => gguf_name(name).is_some_and(|n| g.tensors.contains_key(&n)),
            Source::Safetensors { entries, .. } => entries.contains_key(name),
        }
    }

    /// The GGUF file behind this checkpoint, if it is one (for its tokenizer).
    pub fn gguf(&self) -> Option<&Gguf> {
        match &self.source {
            Source::Gguf(g) => Some(g),
            Source::Safetensors { .. } => None,
        }
    }

    /// Reads one tensor by Hugging Face name, converted to `kind` on `device`.
    ///
    /// # Errors
    /// When it is missing, its dtype unsupported, or its bytes are out of the file.
    pub fn tensor(&self, name: &str, kind: Kind, device: Device) -> Result<Tensor, LoadError> {
        let missing = || LoadError::Missing {
            name: name.to_string(),
        };
        let t = match &self.source {
            Source::Gguf(g) => {
                let gname = gguf_name(name).ok_or_else(missing)?;
                if !g.tensors.contains_key(&gname) {
                    return Err(missing());
                }
                let (data, shape) = g.dequantize(&gname)?;
                let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
                let t = Tensor::from_slice(&data).reshape(&shape);
                // llama.cpp's converter permutes q/k rows for its interleaved
                // RoPE; undo it for Hugging Face's rotate_half layout.
                if g.str("general.architecture").is_ok_and(|a| a == "llama") {
                    let heads = if name.ends_with("self_attn.q_proj.weight")
                        || name.ends_with("self_attn.q_proj.bias")
                    {
                        Some(self.config.num_attention_heads)
                    } else if name.ends_with("self_attn.k_proj.weight")
                        || name.ends_with("self_attn.k_proj.bias")
                    {
                        Some(self.config.kv_heads())
                    } else {
                        None
                    };
                    match heads {
                        Some(h) => unpermute(&t, h as i64),
                        None => t,
                    }
                } else {
                    t
                }
            }
            Source::Safetensors { files, entries } => {
                let e = entries.get(name).ok_or_else(missing)?;
                let kind = match e.dtype.as_str() {
                    "F32" => Kind::Float,
                    "F16" => Kind::Half,
                    "BF16" => Kind::BFloat16,
                    d => {
                        return Err(LoadError::Dtype {
                            name: name.to_string(),
                            dtype: d.to_string(),
                        });
                    }
                };
                let bytes = &files[e.file].1[e.start..e.end];
                Tensor::from_data_size(bytes, &e.shape, kind)
            }
        };
        Ok(t.to_kind(kind).to_device(device))
    }

    /// Reads a tensor and checks its shape.
    ///
    /// # Errors
    /// As [`Checkpoint::tensor`], plus a shape mismatch.
    pub fn tensor_shaped(
        &self,
        name: &str,
        shape: &[i64],
        kind: Kind,
        device: Device,
    ) -> Result<Tensor, LoadError> {
        let t = self.tensor(name, kind, device)?;
        if t.size() != shape {
            return Err(LoadError::Shape {
                name: name.to_string(),
                found: t.size(),
                expected: shape.to_vec(),
            });
        }
        Ok(t)
    }
}

/// Inverse of llama.cpp's `permute(w, n_head)`: rows grouped as
/// (head, pair-element, half) back to (head, half, pair-element).
fn unpermute(w: &Tensor, heads: i64) -> Tensor {
    let size = w.size();
    let rows = size[0];
    let mut shape = vec![heads, rows / heads / 2, 2];
    shape.extend_from_slice(&size[1..]);
    w.reshape(&shape).transpose(1, 2).reshape(&size)
}

/// Maps a Hugging Face Llama tensor name to llama.cpp's GGUF name.
fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        "rope_freqs.weight" => return Some("rope_freqs.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: u32 = layer.parse().ok()?;
    let (module, param) = rest.rsplit_once('.')?;
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{param}"))
}

fn parse_safetensors_header(
    path: &Path,
    buf: &[u8],
    file: usize,
) -> Result<Vec<(String, SafeEntry)>, LoadError> {
    let bad = |detail: String| LoadError::Safetensors {
        path: path.to_path_buf(),
        detail,
    };
    let n = buf
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .ok_or_else(|| bad("truncated header".into()))?;
    let header_end = 8usize
        .checked_add(usize::try_from(n).map_err(|_| bad("header too large".into()))?)
        .filter(|&e| e <= buf.len())
        .ok_or_else(|| bad(format!("header of {n} bytes runs past the end of the file")))?;
    let header: HashMap<String, serde_json::Value> = serde_json::from_slice(&buf[8..header_end])
        .map_err(|e| bad(format!("header is not JSON: {e}")))?;
    let mut out = Vec::new();
    for (name, v) in header {
        if name == "__metadata__" {
            continue;
        }
        let dtype = v["dtype"].as_str().unwrap_or_default().to_string();
        let shape: Vec<i64> = v["shape"]
            .as_array()
            .map(|a| a.iter().filter_map(|d| d.as_i64()).collect())
            .unwrap_or_default();
        let offs = v["data_offsets"].as_array().cloned().unwrap_or_default();
        let (Some(s), Some(e)) = (
            offs.first().and_then(|x| x.as_u64()),
            offs.get(1).and_then(|x| x.as_u64()),
        ) else {
            return Err(bad(format!("tensor {name} has no data_offsets")));
        };
        let (start, end) = (header_end + s as usize, header_end + e as usize);
        if start > end || end > buf.len() {
            return Err(bad(format!("tensor {name} lies past the end of the file")));
        }
        out.push((
            name,
            SafeEntry {
                file,
                dtype,
                shape,
                start,
                end,
            },
        ));
    }
    Ok(out)
}

#[allow(unsafe_code)]
fn map(file: &File) -> std::io::Result<Mmap> {
    // SAFETY: read-only mapping of a checkpoint that is not modified while loaded.
    unsafe { Mmap::map(file) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_model_id_covers_config_and_tokenizer() {
        let dir = std::env::temp_dir().join(format!("nnmesh-model-id-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        for (name, text) in [
            ("config.json", "{}"),
            ("tokenizer.json", "{\"v\": 1}"),
            ("model.safetensors", "weights"),
        ] {
            std::fs::write(dir.join(name), text).expect("write");
        }
        let id = model_id(&dir).expect("hashes");
        std::fs::write(dir.join("tokenizer.json"), "{\"v\": 2}").expect("write");
        let other_tokenizer = model_id(&dir).expect("hashes");
        assert_ne!(
            id, other_tokenizer,
            "a different tokenizer is a different model"
        );
        std::fs::write(dir.join("config.json"), "{\"rope_theta\": 1}").expect("write");
        assert_ne!(other_tokenizer, model_id(&dir).expect("hashes"));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn gguf_names() {
        assert_eq!(
            gguf_name("model.layers.12.self_attn.q_proj.weight").as_deref(),
            Some("blk.12.attn_q.weight")
        );
        assert_eq!(
            gguf_name("model.layers.0.mlp.down_proj.weight").as_deref(),
            Some("blk.0.ffn_down.weight")
        );
        assert_eq!(gguf_name("model.layers.x.mlp.down_proj.weight"), None);
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(h, 2, rows/h/2, cols).swapaxes(1, 2).reshape(rows, cols)
        let w = Tensor::arange(8 * 3, (Kind::Float, Device::Cpu)).reshape([8, 3]);
        let permuted = w.reshape([2, 2, 2, 3]).transpose(1, 2).reshape([8, 3]);
        assert!(unpermute(&permuted, 2).equal(&w));
    }
}
