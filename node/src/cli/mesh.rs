//! The mesh commands: `status` and `keygen`.

use anyhow::{Result, bail};
use nnmesh_client::{mesh::holder, transport::keys};
use nnmesh_control::placement::{Holder, holders_per_block, uncovered};

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
        let floor = recs.iter().map(|p| p.record.replication).max().unwrap_or(1);
        let holders: Vec<Holder> = recs.iter().map(|p| holder(p)).collect();
        let counts = holders_per_block(&holders, n);
        let bar: String = counts
            .iter()
            .map(|&c| char::from_digit(c, 10).unwrap_or('+'))
            .collect();
        let served = counts.iter().filter(|&&c| c > 0).count();
        println!(
            "\nmodel {} ({})\n  holders per layer 0..{n}: {bar}\n  {served}/{n} layers served, min {} holder(s) per layer, replication floor {floor}",
            recs[0].record.model_name,
            m,
            counts.iter().min().copied().unwrap_or(0)
        );
        for span in uncovered(&holders, n) {
            println!("  ERROR: layers {span} have no holder: requests through them fail");
        }
        // Runs of layers with some holders, but fewer than the floor.
        let mut l = 0;
        while l < n as usize {
            let c = counts[l];
            let start = l;
            while l < n as usize && counts[l] == c {
                l += 1;
            }
            if c > 0 && c < floor {
                println!(
                    "  WARNING: layers {start}..{l} have {c} holder(s), under the floor of {floor}: a failure there cannot be replaced"
                );
            }
        }
    }
    Ok(())
}
