//! A loaded model with its tokenizer: batching of prompts (left padding,
//! attention mask, position ids) and greedy generation with a KV cache.

use std::{ops::Range, path::Path, time::Instant};

use tch::{Device, Kind, Tensor};

use crate::{
    checkpoint::{Checkpoint, LoadError},
    hooks::{HookError, Hooks},
    models::llama::{Batch, Cache, Input, Model},
    tokenizer::{Tokenizer, TokenizerError},
};

/// What can go wrong loading or running an engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The checkpoint cannot be loaded.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The tokenizer cannot be loaded or failed.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// A prompt (with the tokens to generate) longer than the model's context.
    #[error("prompt {index} has {tokens} tokens; the model's context is {max} tokens")]
    TooLong {
        /// The prompt.
        index: usize,
        /// Its tokens plus those to generate.
        tokens: usize,
        /// The model's context.
        max: usize,
    },
    /// A prompt without tokens.
    #[error("prompt {0} is empty")]
    Empty(usize),
    /// No prompt at all.
    #[error("no prompt given")]
    NoPrompt,
    /// A token id outside the vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    TokenId {
        /// The id.
        id: u32,
        /// The vocabulary size.
        vocab: usize,
    },
    /// The forward failed.
    #[error(transparent)]
    Hook(#[from] HookError),
}

/// A model (or one stage of it) plus its tokenizer.
#[derive(Debug)]
pub struct Engine {
    /// The model or stage.
    pub model: Model,
    /// The model's tokenizer.
    pub tokenizer: Tokenizer,
}

/// Prompts as one left-padded batch.
#[derive(Debug)]
pub struct Padded {
    /// Token ids `[b, t_max]`, left-padded.
    pub ids: Tensor,
    /// Positions and key mask for the first forward.
    pub batch: Batch,
    /// Each prompt's own token count.
    pub lens: Vec<usize>,
}

impl Padded {
    /// Pads `prompts` on the left into one batch.
    pub fn new(prompts: &[Vec<u32>], device: Device) -> Self {
        let t = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let b = prompts.len();
        let mut ids = vec![0i64; b * t];
        let mut mask = vec![false; b * t];
        let mut pos = vec![0i64; b * t];
        for (r, p) in prompts.iter().enumerate() {
            let pad = t - p.len();
            for (j, &id) in p.iter().enumerate() {
                ids[r * t + pad + j] = i64::from(id);
                mask[r * t + pad + j] = true;
                pos[r * t + pad + j] = j as i64;
            }
        }
        let shape = [b as i64, t as i64];
        let padded = prompts.iter().any(|p| p.len() != t);
        Padded {
            ids: Tensor::from_slice(&ids).reshape(shape).to_device(device),
            batch: Batch {
                positions: Tensor::from_slice(&pos).reshape(shape).to_device(device),
                key_mask: padded
                    .then(|| Tensor::from_slice(&mask).reshape(shape).to_device(device)),
            },
            lens: prompts.iter().map(Vec::len).collect(),
        }
    }

    /// The batch layout of the next decode step, one new token per row.
    pub fn next_step(&self, step: usize) -> Batch {
        self.next_steps(step, 1)
    }

    /// The batch layout of decode steps `step..step + k` run as one forward
    /// (`k` new tokens per row, each seeing the ones before it): how a
    /// replacement replays generated tokens in one go.
    pub fn next_steps(&self, step: usize, k: usize) -> Batch {
        let device = self.ids.device();
        let b = self.lens.len() as i64;
        let positions: Vec<i64> = self
            .lens
            .iter()
            .flat_map(|&l| (0..k).map(move |j| (l - 1 + step + j) as i64))
            .collect();
        let positions = Tensor::from_slice(&positions)
            .reshape([b, k as i64])
            .to_device(device);
        let key_mask = self.batch.key_mask.as_ref().map(|m| {
            Tensor::cat(
                &[
                    m,
                    &Tensor::ones([b, (step + k - 1) as i64], (Kind::Bool, device)),
                ],
                1,
            )
        });
        Batch {
            positions,
            key_mask,
        }
    }
}

impl Engine {
    /// Loads the model at `path` (a `.gguf` file or a Hugging Face folder),
    /// hosting decoder layers `layers` (all when `None`).
    ///
    /// # Errors
    /// When the checkpoint or its tokenizer cannot be loaded.
    pub fn load(
        path: &Path,
        layers: Option<Range<usize>>,
        kind: Kind,
        device: Device,
    ) -> Result<Self, EngineError> {
        let t0 = Instant::now();
        let ckpt = Checkpoint::open(path)?;
        let tokenizer = match ckpt.gguf() {
            Some(g) => Tokenizer::from_gguf(g)?,
            None => Tokenizer::from_file(&path.join("tokenizer.json"))?,
        };
        let n = ckpt.config.num_hidden_layers;
        let layers = layers.unwrap_or(0..n);
        tracing::info!(
            path = %path.display(),
            layers = ?layers,
            of = n,
            dtype = ?kind,
            device = ?device,
            "loading model"
        );
        let model = Model::load(&ckpt, layers, kind, device)?;
        tracing::info!(elapsed_ms = t0.elapsed().as_millis() as u64, "model loaded");
        Ok(Engine { model, tokenizer })
    }

    /// Tokenizes prompts and checks them against the model's context and vocabulary.
    ///
    /// # Errors
    /// An empty or over-long prompt, or a token id outside the vocabulary.
    pub fn check_prompts(
        &self,
        prompts: &[Vec<u32>],
        new_tokens: usize,
    ) -> Result<(), EngineError> {
        if prompts.is_empty() {
            return Err(EngineError::NoPrompt);
        }
        let cfg = self.model.config();
        for (i, p) in prompts.iter().enumerate() {
            if p.is_empty() {
                return Err(EngineError::Empty(i));
            }
            if p.len() + new_tokens > cfg.max_position_embeddings {
                return Err(EngineError::TooLong {
                    index: i,
                    tokens: p.len() + new_tokens,
                    max: cfg.max_position_embeddings,
                });
            }
            if let Some(&id) = p.iter().find(|&&id| id as usize >= cfg.vocab_size) {
                return Err(EngineError::TokenId {
                    id,
                    vocab: cfg.vocab_size,
                });
            }
        }
        Ok(())
    }

    /// The graph crate's description of the model: module tree, hook
    /// points, shapes (of the whole model, whatever layers this engine hosts).
    pub fn manifest(&self) -> nnmesh_graph::Manifest {
        self.model.manifest()
    }

    /// Tokenizes one text prompt.
    ///
    /// # Errors
    /// When tokenization fails.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        Ok(self.tokenizer.encode(text)?)
    }

    /// One forward of a batch of prompts through the whole model: logits `[b, t_max, vocab]`
    /// (left-padded rows).
    ///
    /// # Errors
    /// Bad prompts, or a hook that fails.
    pub fn logits(
        &self,
        prompts: &[Vec<u32>],
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor, EngineError> {
        self.check_prompts(prompts, 0)?;
        let padded = Padded::new(prompts, self.model.device());
        let _guard = tch::no_grad_guard();
        Ok(self.model.forward(
            Input::Tokens(padded.ids.shallow_clone()),
            &padded.batch,
            None,
            hooks,
        )?)
    }

    /// Greedy generation of `max_new` tokens for each prompt. The hooks see
    /// every step (told by [`Hooks::begin_step`]; step 0 is the prompt);
    /// `on_step` gets the tokens chosen at each step. Returns the new tokens
    /// of every prompt.
    ///
    /// # Errors
    /// Bad prompts, or a hook that fails.
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        max_new: usize,
        hooks: &mut dyn Hooks,
        on_step: &mut dyn FnMut(usize, &[u32]),
    ) -> Result<Vec<Vec<u32>>, EngineError> {
        self.check_prompts(prompts, max_new)?;
        let _guard = tch::no_grad_guard();
        let padded = Padded::new(prompts, self.model.device());
        let mut cache: Cache = self.model.new_cache();
        let mut out = vec![Vec::with_capacity(max_new); prompts.len()];
        let mut input = padded.ids.shallow_clone();
        for step in 0..max_new {
            let next_batch;
            let batch = if step == 0 {
                &padded.batch
            } else {
                next_batch = padded.next_step(step);
                &next_batch
            };
            hooks.begin_step(step);
            let logits =
                self.model
                    .forward(Input::Tokens(input), batch, Some(&mut cache), hooks)?;
            let next = logits.select(1, -1).argmax(-1, false);
            let ids: Vec<i64> = Vec::<i64>::try_from(&next).expect("argmax gives i64 ids");
            let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
            for (o, &id) in out.iter_mut().zip(&ids) {
                o.push(id);
            }
            on_step(step, &ids);
            input = next.unsqueeze(1);
        }
        Ok(out)
    }
}

/// Number of parameters of the full model (the tied head counted once).
pub fn parameter_count(cfg: &crate::models::llama::Config) -> u64 {
    let (h, i, v) = (
        cfg.hidden_size as u64,
        cfg.intermediate_size as u64,
        cfg.vocab_size as u64,
    );
    let (q, kv) = (
        (cfg.num_attention_heads * cfg.head_dim()) as u64,
        (cfg.kv_heads() * cfg.head_dim()) as u64,
    );
    let layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h;
    let head = if cfg.tie_word_embeddings { 0 } else { v * h };
    v * h + cfg.num_hidden_layers as u64 * layer + h + head
}
