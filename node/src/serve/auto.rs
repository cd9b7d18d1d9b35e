//! Automatic placement: the node drives the control crate's [`Placement`]
//! machine with real time and the mesh — it discovers the holders, loads
//! the span the machine picks (a new stage actor, while the old one keeps
//! serving), serves it, and stops the old one.
//!
//! A dropped stage's open sessions end with it: their clients fail over and
//! replay them on another holder.

use std::{collections::VecDeque, sync::Arc, time::Instant};

use actix::Addr;
use libp2p::PeerId;
use nnmesh_client::mesh;
use nnmesh_control::placement::{self, Action, Event, Holder, Placement};
use nnmesh_runtime::models::llama::config::Config as ModelConfig;
use tch::Kind;
use tokio::sync::oneshot;

use super::{Error, Server, Serving};
use crate::stage::{self, StageActor, Stop};

/// How many layers fit in `max_memory` bytes: the budget, less the KV
/// cache's and the embedding and head's (counted whatever the span: the
/// node may land on the first or last layers), over one layer's weights.
pub(super) fn span_len(
    config: &ModelConfig,
    kind: Kind,
    max_memory: u64,
    kv_bytes: u64,
) -> Result<u32, Error> {
    let bytes = kind.elt_size_in_bytes() as u64;
    let layer = config.layer_params() * bytes;
    let outer = config.outer_params() * bytes;
    let room = max_memory.saturating_sub(kv_bytes + outer);
    let len = (room / layer.max(1)).min(config.num_hidden_layers as u64);
    if len == 0 {
        return Err(Error::Memory {
            budget: max_memory >> 20,
            layer: layer.div_ceil(1 << 20),
            outer: outer.div_ceil(1 << 20),
            kv: kv_bytes >> 20,
        });
    }
    Ok(len as u32)
}

/// Runs the node's placement for as long as the node runs. `placed` fires
/// when the node first serves; a first load that fails stops the node.
pub(super) async fn drive(
    server: Arc<Server>,
    stage: stage::Config,
    cfg: placement::Config,
    len: u32,
    seeds: Vec<PeerId>,
    placed: oneshot::Sender<()>,
) {
    let me = server.endpoint.peer_id();
    // Nodes must not wake in lockstep: seed the jitter with the peer id.
    let seed = me
        .to_bytes()
        .iter()
        .fold(0u64, |h, &b| h.rotate_left(5) ^ u64::from(b));
    let mut machine = Placement::new(cfg, me, 0.0, server.num_layers, len, seed);
    let mut placed = Some(placed);
    // The loaded span not yet served, and the one a move retired.
    let mut loading: Option<Serving> = None;
    let mut retired: Option<Serving> = None;
    let mut actions: VecDeque<Action> = machine.on_event(Instant::now(), Event::Start).into();
    while let Some(action) = actions.pop_front() {
        let more = match action {
            Action::WakeAt(at) => {
                tokio::time::sleep_until(at.into()).await;
                machine.on_event(Instant::now(), Event::Woke)
            }
            Action::Discover => {
                let holders = holders(&server, &seeds, &mut machine).await;
                machine.on_event(Instant::now(), Event::Records { holders: &holders })
            }
            Action::Load { span } => {
                tracing::info!(%span, "loading layers");
                match stage::spawn(
                    stage::Config {
                        span,
                        ..stage.clone()
                    },
                    server.fatal.clone(),
                )
                .await
                {
                    Ok((addr, info)) => {
                        machine.set_throughput(info.throughput);
                        loading = Some(Serving::new(span, addr, info));
                        machine.on_event(Instant::now(), Event::Loaded { span })
                    }
                    Err(e) if placed.is_some() => {
                        // The first load: the model itself is at fault.
                        let _ = server.fatal.try_send(format!("loading layers {span}: {e}"));
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(%span, error = %e, "loading failed; keeping the current layers");
                        machine.on_event(Instant::now(), Event::LoadFailed { span })
                    }
                }
            }
            Action::Serve { span } => {
                let Some(new) = loading.take().filter(|l| l.span == span) else {
                    tracing::error!(%span, "asked to serve layers that are not loaded");
                    continue;
                };
                retired = server.replace_serving(Some(new));
                match &retired {
                    Some(old) => tracing::info!(from = %old.span, to = %span, "moved"),
                    None => tracing::info!(%span, "placed"),
                }
                if let Some(tx) = placed.take() {
                    let _ = tx.send(());
                }
                Vec::new()
            }
            Action::Drop { span } => {
                if let Some(old) = retired.take().filter(|o| o.span == span) {
                    stop(&old.stage);
                }
                Vec::new()
            }
            Action::Unload { span } => {
                if let Some(l) = loading.take().filter(|l| l.span == span) {
                    tracing::info!(%span, "move aborted: others moved meanwhile");
                    stop(&l.stage);
                }
                Vec::new()
            }
        };
        actions.extend(more);
    }
}

/// Stops a stage actor (its thread ends, its weights are freed).
fn stop(stage: &Addr<StageActor>) {
    if stage.try_send(Stop).is_err() {
        tracing::warn!("a retired stage's mailbox is full; it stops when its last step ends");
    }
}

/// The holders of this node's model the mesh knows of, this node left out
/// (the machine counts itself); adopts the highest replication floor
/// announced.
async fn holders(server: &Server, seeds: &[PeerId], machine: &mut Placement) -> Vec<Holder> {
    let me = server.endpoint.peer_id();
    let peers = mesh::discover(&server.endpoint, seeds, |p| *p == me)
        .await
        .unwrap_or_default();
    peers
        .into_iter()
        .filter(|p| p.record.model == server.model)
        .map(|p| {
            machine.raise_replication(p.record.replication);
            mesh::holder(&p)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm2() -> ModelConfig {
        ModelConfig::from_json(
            r#"{"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
                "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                "vocab_size": 49152, "rms_norm_eps": 1e-5, "tie_word_embeddings": true}"#,
        )
        .expect("a valid config")
    }

    #[test]
    fn the_span_length_comes_from_the_memory_budget() {
        let c = smollm2();
        let mib = |m: u64| m << 20;
        // One layer is 3,540,096 parameters: 13.5 MiB in f32; the embedding 108 MiB.
        assert_eq!(c.layer_params(), 3_540_096);
        assert_eq!(
            span_len(&c, Kind::Float, mib(16 + 108 + 135), mib(16)).ok(),
            Some(9)
        );
        assert_eq!(
            span_len(&c, Kind::Float, mib(16 + 109 + 136), mib(16)).ok(),
            Some(10)
        );
        assert_eq!(
            span_len(&c, Kind::Half, mib(16 + 109 + 136), mib(16)).ok(),
            Some(28)
        );
        assert_eq!(span_len(&c, Kind::Float, u64::MAX / 2, 0).ok(), Some(30));
        let e = span_len(&c, Kind::Float, mib(100), mib(16)).expect_err("no room");
        assert!(e.to_string().contains("holds no layer"), "{e}");
    }
}
