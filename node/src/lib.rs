//! The nnmesh node: a tch model runtime with hook points at every module, the
//! Intervention Graph interpreter, and the `nnmesh` binary.
//!
//! Load a model (or one pipeline stage of it), then run a forward pass with
//! hooks that observe or replace values:
//!
//! ```no_run
//! use nnmesh_node::{engine::Engine, hooks::NoHooks};
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

pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod engine;
pub mod experiments;
pub mod gguf;
pub mod hooks;
pub mod interpret;
pub mod llama;
pub mod local_mesh;
pub mod serve;
pub mod stage;
pub mod tokenizer;
pub mod trace;
pub mod wire;
