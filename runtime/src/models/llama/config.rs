//! The Llama-family configuration, read from a Hugging Face `config.json` or
//! from GGUF metadata.

use serde::Deserialize;

use crate::gguf::Gguf;

/// Llama-3 style RoPE frequency scaling (`rope_scaling` with `rope_type: "llama3"`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RopeScaling {
    /// Scaling factor for low frequencies.
    pub factor: f64,
    /// Wavelength boundary factor for low frequencies.
    pub low_freq_factor: f64,
    /// Wavelength boundary factor for high frequencies.
    pub high_freq_factor: f64,
    /// The context length the model was pre-trained with.
    pub original_max_position_embeddings: f64,
}

/// A Llama-family model configuration; field names are `config.json`'s keys.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Config {
    /// `"llama"`, `"mistral"` or `"qwen2"`.
    pub model_type: String,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Size of each head; `hidden_size / num_attention_heads` when absent.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base frequency.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// Optional RoPE scaling (Llama 3.1+).
    #[serde(default, deserialize_with = "llama3_scaling")]
    pub rope_scaling: Option<RopeScaling>,
    /// Longest sequence the model handles.
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    /// Whether `lm_head` shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Whether q/k/v projections have biases (Qwen2 does).
    #[serde(default)]
    pub attention_bias: bool,
    /// transformers 5 keeps `rope_theta` and the scaling here.
    #[serde(default)]
    rope_parameters: Option<serde_json::Value>,
}

fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_max_positions() -> usize {
    2048
}

fn llama3_scaling<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<RopeScaling>, D::Error> {
    let v: Option<serde_json::Value> = Option::deserialize(d)?;
    let Some(v) = v else { return Ok(None) };
    let ty = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|t| t.as_str())
        .map(str::to_owned);
    parse_scaling(v, ty.as_deref()).map_err(serde::de::Error::custom)
}

/// A `rope_scaling` (or transformers 5 `rope_parameters`) object: `None`
/// for plain RoPE, Llama-3 scaling, or an error naming an unsupported type.
fn parse_scaling(v: serde_json::Value, ty: Option<&str>) -> Result<Option<RopeScaling>, String> {
    match ty {
        None | Some("default") => Ok(None),
        Some("llama3") => serde_json::from_value(v)
            .map(Some)
            .map_err(|e| e.to_string()),
        Some(other) => Err(format!(
            "RoPE scaling type {other:?} is not supported (default and llama3 are)"
        )),
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// An architecture other than the Llama family.
    #[error("architecture {0:?} is not supported (llama, mistral, qwen2 are)")]
    Architecture(String),
    /// A configuration value that is missing or makes no sense, and which.
    #[error("invalid config: {0}")]
    Invalid(String),
    /// The GGUF metadata holding the configuration is malformed.
    #[error(transparent)]
    Gguf(#[from] crate::gguf::GgufError),
}

impl Config {
    /// Number of key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Size of each attention head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Parameters of one decoder layer: attention (q, k, v, o and the q/k/v
    /// biases where the model has them), the gated MLP and two norms.
    pub fn layer_params(&self) -> u64 {
        let (h, i) = (self.hidden_size as u64, self.intermediate_size as u64);
        let q = (self.num_attention_heads * self.head_dim()) as u64;
        let kv = (self.kv_heads() * self.head_dim()) as u64;
        let bias = if self.attention_bias { q + 2 * kv } else { 0 };
        h * q + 2 * h * kv + q * h + bias + 3 * h * i + 2 * h
    }

    /// Parameters outside the layers: the embedding, the final norm and
    /// `lm_head` (when not tied to the embedding).
    pub fn outer_params(&self) -> u64 {
        let (h, v) = (self.hidden_size as u64, self.vocab_size as u64);
        let head = if self.tie_word_embeddings { 0 } else { h * v };
        h * v + h + head
    }

    /// Checks the architecture is supported and the sizes are consistent.
    ///
    /// # Errors
    /// Names the unsupported architecture or the inconsistent sizes.
    pub fn check(&self) -> Result<(), ConfigError> {
        if !matches!(self.model_type.as_str(), "llama" | "mistral" | "qwen2") {
            return Err(ConfigError::Architecture(self.model_type.clone()));
        }
        let heads = self.num_attention_heads;
        if heads == 0 || self.kv_heads() == 0 || !heads.is_multiple_of(self.kv_heads()) {
            return Err(ConfigError::Invalid(format!(
                "{heads} attention heads are not a multiple of {} key/value heads",
                self.kv_heads()
            )));
        }
        if !self.head_dim().is_multiple_of(2)
            || self.num_hidden_layers == 0
            || self.hidden_size == 0
        {
            return Err(ConfigError::Invalid(format!(
                "head_dim {} must be even and sizes non-zero",
                self.head_dim()
            )));
        }
        Ok(())
    }

    /// Reads the configuration from GGUF metadata (`{arch}.*` keys).
    ///
    /// # Errors
    /// When a required key is missing or the architecture is unsupported.
    pub fn from_gguf(g: &Gguf) -> Result<Self, ConfigError> {
        let arch = g.str("general.architecture")?.to_string();
        if !matches!(arch.as_str(), "llama" | "mistral" | "qwen2") {
            return Err(ConfigError::Architecture(arch));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let u = |k: &str| g.u64(&key(k)).map(|v| v as usize);
        let f = |k: &str| g.get(&key(k)).and_then(|v| v.as_f64());
        let heads = u("attention.head_count")?;
        let hidden = u("embedding_length")?;
        let vocab = match u("vocab_size") {
            Ok(v) => v,
            Err(_) => g.strings("tokenizer.ggml.tokens")?.len(),
        };
        let head_dim = u("attention.key_length").ok();
        let cfg = Config {
            model_type: arch.clone(),
            hidden_size: hidden,
            intermediate_size: u("feed_forward_length")?,
            num_hidden_layers: u("block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: Some(u("attention.head_count_kv").unwrap_or(heads)),
            head_dim,
            vocab_size: vocab,
            rms_norm_eps: f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_theta: f("rope.freq_base").unwrap_or(10_000.0),
            // GGUF stores Llama-3 scaling as precomputed `rope_freqs.weight` factors.
            rope_scaling: None,
            max_position_embeddings: u("context_length").unwrap_or(2048),
            tie_word_embeddings: !g.tensors.contains_key("output.weight"),
            attention_bias: g.tensors.contains_key("blk.0.attn_q.bias"),
            rope_parameters: None,
        };
        cfg.check()?;
        Ok(cfg)
    }

    /// Parses a Hugging Face `config.json`.
    ///
    /// # Errors
    /// When the JSON is malformed or the architecture unsupported.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let mut cfg: Config =
            serde_json::from_str(text).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if let Some(p) = cfg.rope_parameters.take() {
            if let Some(theta) = p.get("rope_theta").and_then(|t| t.as_f64()) {
                cfg.rope_theta = theta;
            }
            let ty = p
                .get("rope_type")
                .and_then(|t| t.as_str())
                .map(str::to_owned);
            cfg.rope_scaling = parse_scaling(p, ty.as_deref()).map_err(ConfigError::Invalid)?;
        }
        if cfg.model_type == "qwen2" {
            cfg.attention_bias = true;
        }
        cfg.check()?;
        Ok(cfg)
    }
}
