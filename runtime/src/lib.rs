//! The nnmesh model runtime: a model (or one pipeline stage of it) on tch,
//! with hook points at every module, and the interpreter that runs an
//! Intervention Graph on it.
//!
//! - Loading: [`gguf`] (a hand-written reader and dequantizers) and
//!   [`checkpoint`] (a GGUF file or a Hugging Face folder), [`tokenizer`].
//! - The model: [`models::llama`], a Llama-family decoder built from a block
//!   range, reading only those weights; [`hooks`], how a forward is observed
//!   and changed; [`engine`], a model with its tokenizer, batching and
//!   generation; [`error`], what a forward and the nodes in it fail with.
//! - Graphs: [`interpret`] runs a graph's nodes at the hook points of
//!   forward passes; [`execute`] runs a whole graph on one node (tokenize,
//!   validate, every trace and step); [`wire`] converts tensors to and from
//!   the wire.
//!
//! It depends on tch, the graph and protocol crates only: the node (stage
//! actors, serving), the Python client and the benchmarks share it.
//!
//! ```no_run
//! use nnmesh_runtime::{engine::Engine, hooks::NoHooks};
//! use tch::{Device, Kind};
//!
//! let engine = Engine::load(
//!     "models/SmolLM2-135M-Instruct.Q4_1.gguf".as_ref(),
//!     None, // all layers; Some(0..10) loads only a stage
//!     Kind::Float,
//!     Device::Cpu,
//! )?;
//! let ids = engine.encode("The Eiffel Tower is in the city of")?;
//! let logits = engine.logits(&[ids], &mut NoHooks)?; // [1, t, vocab]
//! let next = logits.select(1, -1).argmax(-1, false).int64_value(&[0]);
//! println!("{}", engine.tokenizer.token_text(next as u32)); // " Paris"
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod checkpoint;
pub mod engine;
pub mod error;
pub mod execute;
pub mod gguf;
pub mod hooks;
pub mod interpret;
pub mod models;
pub mod tokenizer;
pub mod wire;
