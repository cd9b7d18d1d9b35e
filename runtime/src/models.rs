//! Model architectures, one per file, each a `Config` (the checkpoint's keys)
//! and a `Model` with hook points at every module.

pub mod llama;
