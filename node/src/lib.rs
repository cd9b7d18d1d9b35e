//! The nnmesh node: pipeline stages of a model, served on the mesh.
//!
//! - [`stage`]: a stage — a block range of the model and one session per
//!   request — as an actix actor on a thread of its own, which checks every
//!   step a peer sends and contains every failure to its request.
//! - [`serve`]: a node on the mesh — a libp2p endpoint that announces the
//!   stage, answers `Info` with a signed record, admits and checks requests,
//!   and reports each step's saves and output (the next hop's input) to the
//!   client, which drives every hop; without `--blocks`, it places itself
//!   and moves when the mesh needs it (the control crate's placement).
//!
//! The `nnmesh` binary (`src/main.rs`, `src/cli/`) parses flags into a
//! [`serve::Config`] and calls [`serve::run`]; it also holds the commands
//! that run graphs locally or through a mesh, and the benchmarks.
//!
//! ```no_run
//! use nnmesh_node::{serve, stage};
//! use nnmesh_protocol::Span;
//!
//! let model = std::path::PathBuf::from("models/SmolLM2-135M-Instruct.Q4_1.gguf");
//! let cfg = serve::Config::new(stage::Config::new(model, Span::new(0, 10)));
//! serve::run(cfg, |ready| println!("serving on {:?}", ready.addrs))?;
//! # Ok::<(), serve::Error>(())
//! ```

pub mod serve;
pub mod stage;
