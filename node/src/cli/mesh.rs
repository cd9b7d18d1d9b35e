//! The mesh commands: `status` and `keygen`.

use anyhow::{Result, bail};
use nnmesh_client::{mesh::holders_per_layer, transport::keys};

use super::{Keygen, backend::MeshArgs};

/// `nnmesh keygen`.
pub(super) fn keygen(what: Keygen) -> Result<()> {
    match what {
        Keygen::Identity { file } => {
            let key = keys::load_or_create_identity(&file)?;
            println!("{}", key.public().to_peer_id());
        }
        Keygen::Psk { file } => {
            let psk = keys::create_psk(&file)?;
            eprintln!(
                "wrote {} (fingerprint {}); give it to every node and client of the mesh",
                file.display(),
                psk.fingerprint()
            );
        }
    }
    Ok(())
}

/// `nnmesh status`: peers, and holders per block of each model.
pub(super) fn status(mesh: &MeshArgs) -> Result<()> {
    if mesh.mesh.is_empty() {
        bail!("nnmesh status needs --mesh ADDR");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let client = mesh.connect(&rt)?;
    let peers = rt.block_on(client.discover())?;
    println!("{} stage nodes\n", peers.len());
    println!(
        "{:<54} {:>8} {:>11} {:>6} {:>8}  addresses",
        "peer", "layers", "tokens/s", "load", "rtt ms"
    );
    for p in &peers {
        println!(
            "{:<54} {:>8} {:>11.0} {:>5.0}% {:>8.1}  {}",
            p.peer.to_string(),
            p.record.span.to_string(),
            p.record.throughput,
            p.record.load * 100.0,
            p.rtt_ms,
            p.record.addrs.join(" ")
        );
    }
    let mut models: Vec<_> = peers.iter().map(|p| p.record.model).collect();
    models.sort_by_key(|m| m.0);
    models.dedup();
    for m in models {
        let recs: Vec<_> = peers.iter().filter(|p| p.record.model == m).collect();
        let n = recs[0].record.num_layers;
        let holders = holders_per_layer(recs.iter().map(|p| &p.record), n);
        let bar: String = holders
            .iter()
            .map(|&h| match h {
                0 => '·',
                1 => '▄',
                _ => '█',
            })
            .collect();
        let served = holders.iter().filter(|&&h| h > 0).count();
        println!(
            "\nmodel {} ({})\n  layers 0..{n} |{bar}|  {served}/{n} served, min {} holder(s) per layer",
            recs[0].record.model_name,
            m,
            holders.iter().min().copied().unwrap_or(0)
        );
    }
    println!("\n(█ two or more holders, ▄ one, · none)");
    Ok(())
}
