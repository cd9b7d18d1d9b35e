//! Llama-family decoder (Llama 2/3, Mistral, SmolLM2, Qwen2 with q/k/v
//! biases), as a pipeline stage with hook points.
//!
//! Follows "LLaMA: Open and Efficient Foundation Language Models" (Touvron et
//! al., 2023) and the Hugging Face transformers implementation
//! (`models/llama/modeling_llama.py`), whose numerics it matches: RMSNorm in
//! f32, `rotate_half` RoPE (with Llama-3 frequency scaling), grouped-query
//! attention, SwiGLU MLP. Candle's `models/llama.rs` is the layout model.
//!
//! A [`Model`] is built from a block range and reads only those weights: the
//! stage whose range starts at layer 0 also holds `model.embed_tokens`, the
//! one that ends at the last layer also holds `model.norm` and `lm_head`.

use std::ops::Range;

use nnmesh_graph::{Module, Point};
use tch::{Device, Kind, Tensor};

pub use self::config::{Config, ConfigError};
use self::pack::{Live, Rows};
use crate::{
    checkpoint::{Checkpoint, LoadError},
    error::{InputError, ModuleError},
    hooks::{HookError, Hooks, at},
};

pub mod config;
mod pack;

/// What flows into a stage: token ids (first stage) or a hidden state.
#[derive(Debug)]
pub enum Input {
    /// Token ids `[b, t]` (i64).
    Tokens(Tensor),
    /// Residual stream `[b, t, hidden]`.
    Hidden(Tensor),
}

/// Per-forward batch layout: positions and which keys are real tokens.
#[derive(Debug)]
pub struct Batch {
    /// Position id of every query token, `[b, t]` i64 (left padding makes them differ per row).
    pub positions: Tensor,
    /// `[b, past + t]` bool, true for real tokens; `None` when no row is padded.
    pub key_mask: Option<Tensor>,
}

impl Batch {
    /// A batch of unpadded rows starting at position `past`.
    pub fn contiguous(b: i64, t: i64, past: i64, device: Device) -> Self {
        let positions = Tensor::arange_start(past, past + t, (Kind::Int64, device))
            .unsqueeze(0)
            .expand([b, t], false)
            .contiguous();
        Batch {
            positions,
            key_mask: None,
        }
    }
}

/// The key/value cache of one stage: per hosted layer, keys and values after RoPE.
#[derive(Debug, Default)]
pub struct Cache {
    kv: Vec<Option<(Tensor, Tensor)>>,
}

impl Cache {
    /// Tokens already cached (the past length).
    pub fn len(&self) -> i64 {
        self.kv
            .iter()
            .flatten()
            .next()
            .map_or(0, |(k, _)| k.size()[2])
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let kind = xs.kind();
        let xs32 = xs.to_kind(Kind::Float);
        let var = xs32.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let normed = xs32 * (var + self.eps).rsqrt();
        &self.weight * normed.to_kind(kind)
    }
}

#[derive(Debug)]
struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    fn forward(&self, xs: &Tensor) -> Tensor {
        xs.linear(&self.weight, self.bias.as_ref())
    }
}

/// RoPE inverse frequencies, shared by all layers.
#[derive(Debug)]
struct Rope {
    inv_freq: Tensor,
}

impl Rope {
    fn new(cfg: &Config, ckpt: &Checkpoint, device: Device) -> Result<Self, LoadError> {
        let dim = cfg.head_dim() as i64;
        let exps = Tensor::arange_start_step(0, dim, 2, (Kind::Int64, Device::Cpu))
            .to_kind(Kind::Float)
            / dim as f64;
        let mut inv_freq = Tensor::pow_scalar(cfg.rope_theta, &exps).reciprocal();
        if let Some(s) = &cfg.rope_scaling {
            let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
            let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
            let wavelen = inv_freq.reciprocal() * (2.0 * std::f64::consts::PI);
            let scaled = inv_freq.where_scalarother(&wavelen.le(low_wavelen), 0.0)
                + (&inv_freq / s.factor).where_scalarother(&wavelen.gt(low_wavelen), 0.0);
            let smooth = ((wavelen.reciprocal() * s.original_max_position_embeddings)
                - s.low_freq_factor)
                / (s.high_freq_factor - s.low_freq_factor);
            let smoothed = (smooth.ones_like() - &smooth) * &scaled / s.factor + &smooth * &scaled;
            let medium = wavelen
                .ge(high_wavelen)
                .logical_and(&wavelen.le(low_wavelen));
            inv_freq = smoothed.where_self(&medium, &scaled);
        } else if ckpt.has("rope_freqs.weight") {
            // GGUF stores Llama-3 scaling as per-frequency divisors.
            let factors = ckpt.tensor("rope_freqs.weight", Kind::Float, Device::Cpu)?;
            inv_freq /= factors;
        }
        Ok(Rope {
            inv_freq: inv_freq.to_device(device),
        })
    }

    /// cos and sin for `positions` `[b, t]`, shaped `[b, 1, t, head_dim]`.
    fn cos_sin(&self, positions: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * &self.inv_freq;
        let emb = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(1);
        (emb.cos().to_kind(kind), emb.sin().to_kind(kind))
    }
}

fn rotate_half(xs: &Tensor) -> Tensor {
    let half = xs.size()[3] / 2;
    let x1 = xs.narrow(3, 0, half);
    let x2 = xs.narrow(3, half, half);
    Tensor::cat(&[&x2.neg(), &x1], 3)
}

fn apply_rope(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    xs * cos + rotate_half(xs) * sin
}

/// The attention mask for one forward: how keys may be attended.
#[derive(Debug)]
enum Mask {
    /// Full causal attention over unpadded rows with no past.
    Causal,
    /// Every key is visible (one new token per row, no padding).
    None,
    /// Explicit `[b, 1, t, t_kv]` bool mask (true = attend).
    Explicit(Tensor),
}

impl Mask {
    fn new(batch: &Batch, t: i64, past: i64, device: Device) -> Mask {
        match &batch.key_mask {
            None if past == 0 && t > 1 => Mask::Causal,
            None if t == 1 => Mask::None,
            key_mask => {
                let t_kv = past + t;
                let keys = Tensor::arange(t_kv, (Kind::Int64, device));
                let queries = Tensor::arange_start(past, past + t, (Kind::Int64, device));
                let causal = keys.unsqueeze(0).le_tensor(&queries.unsqueeze(1)); // [t, t_kv]
                let mut allowed = causal.unsqueeze(0);
                if let Some(km) = key_mask {
                    // A padded query still attends to itself, so no softmax row is empty (no NaN).
                    let diag = keys.unsqueeze(0).eq_tensor(&queries.unsqueeze(1));
                    allowed = allowed
                        .logical_and(&km.unsqueeze(1))
                        .logical_or(&diag.unsqueeze(0));
                }
                Mask::Explicit(allowed.unsqueeze(1))
            }
        }
    }
}

#[derive(Debug)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
}

/// A linear module over packed rows, with its input and output hooks.
fn proj(lives: &mut [Live], module: Module, lin: &Linear, xs: &Rows) -> Rows {
    hooked(lives, module, xs, |x, lives| {
        x.map(lives, |x| lin.forward(x))
    })
}

/// Runs a module over packed rows with its input and output hooks (the
/// input hook replaces the module's own copy of the value).
fn hooked(
    lives: &mut [Live],
    module: Module,
    xs: &Rows,
    f: impl FnOnce(&mut Rows, &mut [Live]) -> Rows,
) -> Rows {
    let mut x = xs.shallow();
    x.hook(lives, module, Point::Input);
    let mut y = f(&mut x, lives);
    y.hook(lives, module, Point::Output);
    y
}

impl Attention {
    /// Attention over packed rows: the projections batched, the attention
    /// itself per segment, over its own cache slot `slot` and mask.
    fn forward(&self, layer: u32, slot: usize, lives: &mut [Live], xs: &Rows) -> Rows {
        let q = proj(lives, Module::QProj(layer), &self.q_proj, xs);
        let k = proj(lives, Module::KProj(layer), &self.k_proj, xs);
        let v = proj(lives, Module::VProj(layer), &self.v_proj, xs);
        let z = lives
            .iter_mut()
            .enumerate()
            .map(|(i, live)| {
                let (q, k, v) = (q.part(i)?, k.part(i)?, v.part(i)?);
                live.guard(|l| self.attend(layer, slot, l, q, k, v))
            })
            .collect();
        proj(lives, Module::OProj(layer), &self.o_proj, &Rows::new(z))
    }

    /// One segment's attention: `q`, `k`, `v` projected `[b, t, _]`, out
    /// `z` `[b, t, heads * head_dim]`.
    fn attend(
        &self,
        layer: u32,
        slot: usize,
        live: &mut Live,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor, HookError> {
        let (b, t, _) = q.size3().map_err(|_| InputError::Shape(q.size()))?;
        let (cos, sin, mask) = live
            .rope
            .as_ref()
            .expect("a live segment has its positions");
        let q = q.view([b, t, self.heads, self.head_dim]).transpose(1, 2);
        let k = k.view([b, t, self.kv_heads, self.head_dim]).transpose(1, 2);
        let mut v = v.view([b, t, self.kv_heads, self.head_dim]).transpose(1, 2);
        let mut q = apply_rope(&q, cos, sin);
        let mut k = apply_rope(&k, cos, sin);
        let attn = Module::Attn(layer);
        let hooks = &mut *live.hooks;
        at(hooks, attn, Point::Q, &mut q)?;
        at(hooks, attn, Point::K, &mut k)?;
        at(hooks, attn, Point::V, &mut v)?;
        let (k, v) = match live.cache.as_deref_mut().map(|c| &mut c.kv[slot]) {
            Some(slot) => {
                let kv = match slot.take() {
                    Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2), Tensor::cat(&[&pv, &v], 2)),
                    None => (k, v),
                };
                *slot = Some((kv.0.shallow_clone(), kv.1.shallow_clone()));
                kv
            }
            None => (k, v),
        };
        let rep = self.heads / self.kv_heads;
        let (k, v) = if rep > 1 {
            (
                k.repeat_interleave_self_int(rep, 1, None),
                v.repeat_interleave_self_int(rep, 1, None),
            )
        } else {
            (k, v)
        };
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let z = if hooks.wants(attn, Point::Pattern) {
            // Materialize the post-softmax pattern only when it is hooked.
            let mut scores = q.matmul(&k.transpose(-2, -1)) * scale;
            match mask {
                Mask::Causal => {
                    let t_kv = k.size()[2];
                    let m = Tensor::ones([t, t_kv], (Kind::Bool, q.device())).tril(t_kv - t);
                    scores = scores.masked_fill(&m.logical_not(), f64::NEG_INFINITY);
                }
                Mask::None => {}
                Mask::Explicit(m) => {
                    scores = scores.masked_fill(&m.logical_not(), f64::NEG_INFINITY);
                }
            }
            let mut pattern = scores.softmax(-1, Kind::Float).to_kind(q.kind());
            at(hooks, attn, Point::Pattern, &mut pattern)?;
            pattern.matmul(&v)
        } else {
            let (mask, causal) = match mask {
                Mask::Causal => (None, true),
                Mask::None => (None, false),
                Mask::Explicit(m) => (Some(m), false),
            };
            Tensor::scaled_dot_product_attention(&q, &k, &v, mask, 0.0, causal, scale, false)
        };
        let mut z = z.transpose(1, 2); // [b, t, heads, head_dim]
        at(hooks, attn, Point::Z, &mut z)?;
        Ok(z.reshape([b, t, self.heads * self.head_dim]))
    }
}

#[derive(Debug)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn forward(&self, i: u32, lives: &mut [Live], xs: &Rows) -> Rows {
        let mut gate = proj(lives, Module::Gate(i), &self.gate_proj, xs);
        let mut up = proj(lives, Module::Up(i), &self.up_proj, xs);
        let act = gate.zip(&mut up, lives, |g, u| g.silu() * u);
        proj(lives, Module::Down(i), &self.down_proj, &act)
    }
}

#[derive(Debug)]
struct Block {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl Block {
    /// Decoder layer `layer` (cache slot `slot`) over packed rows.
    fn forward(&self, layer: u32, slot: usize, lives: &mut [Live], xs: &Rows) -> Rows {
        let i = layer;
        hooked(lives, Module::Layer(i), xs, |x, lives| {
            let norm = |m, n: &RmsNorm, x: &Rows, lives: &mut [Live]| {
                hooked(lives, m, x, |x, lives| x.map(lives, |x| n.forward(x)))
            };
            let h = norm(Module::InputNorm(i), &self.input_layernorm, x, lives);
            let mut a = hooked(lives, Module::Attn(i), &h, |h, lives| {
                self.self_attn.forward(i, slot, lives, h)
            });
            let mut x = x.zip(&mut a, lives, |x, a| x + a);
            let h = norm(
                Module::PostNorm(i),
                &self.post_attention_layernorm,
                &x,
                lives,
            );
            let mut m = hooked(lives, Module::Mlp(i), &h, |h, lives| {
                self.mlp.forward(i, lives, h)
            });
            x.zip(&mut m, lives, |x, m| x + m)
        })
    }
}

/// One request's part of a packed forward ([`Model::forward_packed`]): its
/// input, positions and mask, KV cache and hooks.
pub struct Segment<'a> {
    /// Token ids or hidden state.
    pub input: Input,
    /// Its positions and key mask.
    pub batch: &'a Batch,
    /// Its KV cache, if it keeps one.
    pub cache: Option<&'a mut Cache>,
    /// Its hooks: they see its rows only.
    pub hooks: &'a mut dyn Hooks,
}

impl std::fmt::Debug for Segment<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("input", &self.input)
            .finish_non_exhaustive()
    }
}

/// A Llama-family model, or the part of it one pipeline stage hosts.
#[derive(Debug)]
pub struct Model {
    cfg: Config,
    layers_range: Range<usize>,
    embed: Option<Tensor>,
    layers: Vec<Block>,
    norm: Option<RmsNorm>,
    lm_head: Option<Linear>,
    rope: Rope,
    kind: Kind,
    device: Device,
}

impl Model {
    /// Loads the stage hosting decoder layers `layers` (all of them for a full model),
    /// reading only the weights it needs.
    ///
    /// # Errors
    /// When the range lies outside the model, or a weight is missing or malformed.
    pub fn load(
        ckpt: &Checkpoint,
        layers: Range<usize>,
        kind: Kind,
        device: Device,
    ) -> Result<Self, LoadError> {
        let cfg = ckpt.config.clone();
        let n = cfg.num_hidden_layers;
        if layers.start >= layers.end || layers.end > n {
            return Err(LoadError::Config(
                crate::models::llama::ConfigError::Invalid(format!(
                    "block range {}..{} is outside the model's {n} layers (use A..B with 0 <= A < B <= {n})",
                    layers.start, layers.end
                )),
            ));
        }
        let (hidden, inter) = (cfg.hidden_size as i64, cfg.intermediate_size as i64);
        let (heads, kv_heads, hd) = (
            cfg.num_attention_heads as i64,
            cfg.kv_heads() as i64,
            cfg.head_dim() as i64,
        );
        let w = |name: &str, shape: &[i64]| ckpt.tensor_shaped(name, shape, kind, device);
        let linear = |name: &str, out: i64, inp: i64, bias: bool| -> Result<Linear, LoadError> {
            Ok(Linear {
                weight: w(&format!("{name}.weight"), &[out, inp])?,
                bias: if bias {
                    Some(w(&format!("{name}.bias"), &[out])?)
                } else {
                    None
                },
            })
        };
        let norm = |name: &str| -> Result<RmsNorm, LoadError> {
            Ok(RmsNorm {
                weight: w(&format!("{name}.weight"), &[hidden])?,
                eps: cfg.rms_norm_eps,
            })
        };
        let vocab = cfg.vocab_size as i64;
        let embed = if layers.start == 0 {
            Some(w("model.embed_tokens.weight", &[vocab, hidden])?)
        } else {
            None
        };
        let mut blocks = Vec::with_capacity(layers.len());
        for i in layers.clone() {
            let p = format!("model.layers.{i}");
            let bias = cfg.attention_bias;
            blocks.push(Block {
                input_layernorm: norm(&format!("{p}.input_layernorm"))?,
                self_attn: Attention {
                    q_proj: linear(&format!("{p}.self_attn.q_proj"), heads * hd, hidden, bias)?,
                    k_proj: linear(
                        &format!("{p}.self_attn.k_proj"),
                        kv_heads * hd,
                        hidden,
                        bias,
                    )?,
                    v_proj: linear(
                        &format!("{p}.self_attn.v_proj"),
                        kv_heads * hd,
                        hidden,
                        bias,
                    )?,
                    o_proj: linear(&format!("{p}.self_attn.o_proj"), hidden, heads * hd, false)?,
                    heads,
                    kv_heads,
                    head_dim: hd,
                },
                post_attention_layernorm: norm(&format!("{p}.post_attention_layernorm"))?,
                mlp: Mlp {
                    gate_proj: linear(&format!("{p}.mlp.gate_proj"), inter, hidden, false)?,
                    up_proj: linear(&format!("{p}.mlp.up_proj"), inter, hidden, false)?,
                    down_proj: linear(&format!("{p}.mlp.down_proj"), hidden, inter, false)?,
                },
            });
        }
        let (norm_f, lm_head) = if layers.end == n {
            let head = if ckpt.has("lm_head.weight") {
                w("lm_head.weight", &[vocab, hidden])?
            } else {
                // Tied embeddings: the head is the embedding matrix. Share the
                // tensor when this stage holds both.
                match &embed {
                    Some(e) => e.shallow_clone(),
                    None => w("model.embed_tokens.weight", &[vocab, hidden])?,
                }
            };
            (
                Some(norm("model.norm")?),
                Some(Linear {
                    weight: head,
                    bias: None,
                }),
            )
        } else {
            (None, None)
        };
        Ok(Model {
            rope: Rope::new(&cfg, ckpt, device)?,
            cfg,
            layers_range: layers,
            embed,
            layers: blocks,
            norm: norm_f,
            lm_head,
            kind,
            device,
        })
    }

    /// The model configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The decoder layers this stage hosts.
    pub fn layers(&self) -> Range<usize> {
        self.layers_range.clone()
    }

    /// Whether this stage hosts the embedding.
    pub fn is_first(&self) -> bool {
        self.embed.is_some()
    }

    /// Whether this stage hosts the final norm and `lm_head`.
    pub fn is_last(&self) -> bool {
        self.lm_head.is_some()
    }

    /// The compute dtype.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The graph crate's description of the model: module tree, hook
    /// points, shapes, and the dtype it computes in.
    pub fn manifest(&self) -> nnmesh_graph::Manifest {
        let cfg = &self.cfg;
        nnmesh_graph::Manifest {
            model: cfg.model_type.clone(),
            num_layers: cfg.num_hidden_layers as u32,
            hidden: cfg.hidden_size as u32,
            heads: cfg.num_attention_heads as u32,
            kv_heads: cfg.kv_heads() as u32,
            head_dim: cfg.head_dim() as u32,
            intermediate: cfg.intermediate_size as u32,
            vocab: cfg.vocab_size as u32,
            max_positions: cfg.max_position_embeddings as u32,
            dtype: match self.kind {
                Kind::Half => nnmesh_graph::DType::F16,
                Kind::BFloat16 => nnmesh_graph::DType::Bf16,
                _ => nnmesh_graph::DType::F32,
            },
        }
    }

    /// A fresh, empty KV cache for this stage.
    pub fn new_cache(&self) -> Cache {
        Cache {
            kv: (0..self.layers.len()).map(|_| None).collect(),
        }
    }

    /// Runs this stage: tokens or hidden state in; hidden state out, or logits
    /// `[b, t, vocab]` on the last stage. Hooks see every point on the way.
    ///
    /// # Errors
    /// When a hook stops the forward or fails.
    pub fn forward(
        &self,
        input: Input,
        batch: &Batch,
        cache: Option<&mut Cache>,
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor, HookError> {
        self.forward_span(input, self.layers(), batch, cache, hooks)
    }

    /// As [`Model::forward`], through the hosted layers `span` only (a
    /// stage can serve any part of what it holds): the embedding runs when
    /// `span` starts at layer 0, the norm and head when it ends at the last
    /// layer.
    ///
    /// # Errors
    /// When `span` is not hosted here, the input does not fit, or a hook
    /// stops the forward or fails.
    pub fn forward_span(
        &self,
        input: Input,
        span: Range<usize>,
        batch: &Batch,
        cache: Option<&mut Cache>,
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor, HookError> {
        let seg = Segment {
            input,
            batch,
            cache,
            hooks,
        };
        self.forward_packed(span, vec![seg])
            .pop()
            .expect("one result per segment")
    }

    /// Runs several requests' forwards through layers `span` as one: the
    /// dense layers once over all their rows, attention per request (see
    /// the `pack` module). Each segment's hooks see only its own rows, and
    /// its result is what [`Model::forward_span`] gives it alone, up to the
    /// rounding of a matrix product over more rows. A segment that stops or
    /// fails leaves the forward with its error; the others run on.
    pub fn forward_packed(
        &self,
        span: Range<usize>,
        segments: Vec<Segment<'_>>,
    ) -> Vec<Result<Tensor, HookError>> {
        let held = self.layers();
        if span.is_empty() || span.start < held.start || span.end > held.end {
            return segments
                .iter()
                .map(|_| {
                    Err(InputError::Span {
                        start: span.start,
                        end: span.end,
                    }
                    .into())
                })
                .collect();
        }
        let mut lives = Vec::with_capacity(segments.len());
        let mut parts = Vec::with_capacity(segments.len());
        for seg in segments {
            let mut live = Live {
                hooks: seg.hooks,
                cache: seg.cache,
                rope: None,
                failed: None,
            };
            let (input, batch) = (seg.input, seg.batch);
            parts.push(live.guard(|l| self.enter(input, batch, span.start, l)));
            lives.push(live);
        }
        let mut xs = Rows::new(parts);
        let local = span.start - held.start..span.end - held.start;
        for (j, block) in self
            .layers
            .iter()
            .enumerate()
            .take(local.end)
            .skip(local.start)
        {
            let layer = (self.layers_range.start + j) as u32;
            for (i, live) in lives.iter_mut().enumerate() {
                if xs.part(i).is_none() {
                    continue;
                }
                // Shared rows fork here; positions and the causal mask are
                // the same for every row (see `interpret::Sharing`). Only a
                // fork touches the rows (and so the packed matrix).
                let Some(src) = live.guard(|l| Ok(l.hooks.fork_rows(layer))).flatten() else {
                    continue;
                };
                let x = xs.part_mut(i).expect("a live segment's rows");
                live.guard(|_| {
                    let idx = Tensor::from_slice(&src).to_device(self.device);
                    *x = Tensor::cat(&[&*x, &x.index_select(0, &idx)], 0);
                    Ok(())
                });
            }
            xs = block.forward(layer, j, &mut lives, &xs);
        }
        if let (Some(norm), Some(head), true) = (&self.norm, &self.lm_head, span.end == held.end) {
            let h = hooked(&mut lives, Module::Norm, &xs, |x, lives| {
                x.map(lives, |x| norm.forward(x))
            });
            xs = hooked(&mut lives, Module::LmHead, &h, |x, lives| {
                x.map(lives, |x| head.forward(x))
            });
        }
        lives
            .into_iter()
            .zip(xs.into_parts())
            .map(|(live, x)| match (live.failed, x) {
                (Some(e), _) => Err(e),
                (None, Some(x)) => Ok(x),
                (None, None) => unreachable!("a live segment keeps its rows"),
            })
            .collect()
    }

    /// A segment's input as its first hidden state (the embedding, with its
    /// hooks, for token ids), and its positions and mask.
    fn enter(
        &self,
        input: Input,
        batch: &Batch,
        first: usize,
        live: &mut Live,
    ) -> Result<Tensor, HookError> {
        let xs = match input {
            Input::Tokens(ids) => {
                let (Some(embed), 0) = (&self.embed, first) else {
                    return Err(InputError::NoEmbedding.into());
                };
                let mut ids = ids;
                at(&mut *live.hooks, Module::Embed, Point::Input, &mut ids)?;
                let mut xs = Tensor::embedding(embed, &ids, -1, false, false);
                at(&mut *live.hooks, Module::Embed, Point::Output, &mut xs)?;
                xs
            }
            Input::Hidden(h) => h.to_kind(self.kind),
        };
        let (_, t, _) = xs.size3().map_err(|_| InputError::Shape(xs.size()))?;
        let past = live.cache.as_ref().map_or(0, |c| c.len());
        let (cos, sin) = self.rope.cos_sin(&batch.positions, self.kind);
        live.rope = Some((cos, sin, Mask::new(batch, t, past, self.device)));
        Ok(xs)
    }

    /// Calls one hosted module on a value outside the forward pass (no hooks
    /// fire): `lm_head(model.norm(h))` for a logit lens. Decoder layers and
    /// attention treat the value as a fresh causal sequence (positions 0..t).
    ///
    /// # Errors
    /// When the module is not hosted here or the value has the wrong shape.
    pub fn apply(&self, module: Module, xs: &Tensor) -> Result<Tensor, ModuleError> {
        let not_hosted = || ModuleError::NotHosted {
            module: module.path(),
            start: self.layers_range.start,
            end: self.layers_range.end,
        };
        // Without hooks, a forward can only fail on its input (or panic,
        // which goes on as a panic).
        let invalid = |e: HookError| match e {
            HookError::Input(source) => ModuleError::Input {
                module: module.path(),
                source,
            },
            HookError::Panic(msg) => panic!("{msg}"),
            other => {
                unreachable!("a forward without hooks neither stops nor fails a node: {other}")
            }
        };
        let block = |i: u32| -> Result<&Block, ModuleError> {
            let i = i as usize;
            if !self.layers_range.contains(&i) {
                return Err(not_hosted());
            }
            Ok(&self.layers[i - self.layers_range.start])
        };
        let xs = if module == Module::Embed {
            xs.to_kind(Kind::Int64)
        } else {
            xs.to_kind(self.kind)
        };
        // A decoder module as one unhooked segment without a cache; layers
        // and attention see a fresh causal sequence.
        let alone = |f: &dyn Fn(&mut [Live], &Rows) -> Rows| -> Result<Tensor, ModuleError> {
            let (b, t, _) = xs.size3().map_err(|_| ModuleError::Input {
                module: module.path(),
                source: InputError::Shape(xs.size()),
            })?;
            let batch = Batch::contiguous(b, t, 0, self.device);
            let (cos, sin) = self.rope.cos_sin(&batch.positions, self.kind);
            let mut no = crate::hooks::NoHooks;
            let mut lives = [Live {
                hooks: &mut no,
                cache: None,
                rope: Some((cos, sin, Mask::new(&batch, t, 0, self.device))),
                failed: None,
            }];
            let y = f(&mut lives, &Rows::new(vec![Some(xs.shallow_clone())]));
            match lives[0].failed.take() {
                Some(e) => Err(invalid(e)),
                None => Ok(y
                    .into_parts()
                    .pop()
                    .flatten()
                    .expect("a live segment keeps its rows")),
            }
        };
        let out = match module {
            Module::Embed => {
                let e = self.embed.as_ref().ok_or_else(not_hosted)?;
                Tensor::embedding(e, &xs, -1, false, false)
            }
            Module::Norm => self.norm.as_ref().ok_or_else(not_hosted)?.forward(&xs),
            Module::LmHead => self.lm_head.as_ref().ok_or_else(not_hosted)?.forward(&xs),
            Module::Layer(i) => {
                let b = block(i)?;
                alone(&|lives, x| b.forward(i, 0, lives, x))?
            }
            Module::Attn(i) => {
                let b = block(i)?;
                alone(&|lives, x| b.self_attn.forward(i, 0, lives, x))?
            }
            Module::Mlp(i) => {
                let b = block(i)?;
                alone(&|lives, x| b.mlp.forward(i, lives, x))?
            }
            Module::InputNorm(i) => block(i)?.input_layernorm.forward(&xs),
            Module::PostNorm(i) => block(i)?.post_attention_layernorm.forward(&xs),
            Module::QProj(i) => block(i)?.self_attn.q_proj.forward(&xs),
            Module::KProj(i) => block(i)?.self_attn.k_proj.forward(&xs),
            Module::VProj(i) => block(i)?.self_attn.v_proj.forward(&xs),
            Module::OProj(i) => block(i)?.self_attn.o_proj.forward(&xs),
            Module::Gate(i) => block(i)?.mlp.gate_proj.forward(&xs),
            Module::Up(i) => block(i)?.mlp.up_proj.forward(&xs),
            Module::Down(i) => block(i)?.mlp.down_proj.forward(&xs),
        };
        Ok(out)
    }

    /// Whether this stage hosts `module` (and so can hook or apply it).
    pub fn hosts(&self, module: Module) -> bool {
        match module {
            Module::Embed => self.is_first(),
            Module::Norm | Module::LmHead => self.is_last(),
            m => m
                .layer()
                .is_some_and(|i| self.layers_range.contains(&(i as usize))),
        }
    }
}
