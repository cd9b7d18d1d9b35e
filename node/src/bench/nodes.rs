//! `nnmesh node` processes of this executable on loopback for the mesh
//! benchmarks, killed (SIGKILL) one by one or when dropped.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
};

use anyhow::{Context, Result, bail};
use libp2p::{Multiaddr, PeerId, multiaddr::Protocol};

/// Local node processes.
#[derive(Default)]
pub(crate) struct LocalNodes(Vec<(Multiaddr, String, Child)>);

impl Drop for LocalNodes {
    fn drop(&mut self) {
        for (_, _, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl LocalNodes {
    /// Starts a node serving `blocks` (with `extra` flags) and waits for its
    /// first `listening` address and its `node` line.
    pub(crate) fn start(
        &mut self,
        model: &Path,
        blocks: &str,
        bootstrap: Option<&Multiaddr>,
        extra: &[&str],
    ) -> Result<Multiaddr> {
        self.start_env(model, blocks, bootstrap, extra, &[])
    }

    /// As [`LocalNodes::start`], with environment variables set for it.
    pub(crate) fn start_env(
        &mut self,
        model: &Path,
        blocks: &str,
        bootstrap: Option<&Multiaddr>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Multiaddr> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.envs(env.iter().copied());
        cmd.args(["node", "--blocks", blocks, "--model"])
            .arg(model)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if let Some(b) = bootstrap {
            cmd.arg("--bootstrap").arg(b.to_string());
        }
        let mut child = cmd.spawn().context("starting a node")?;
        let stdout = child.stdout.take().context("stdout is piped")?;
        let mut addr = None;
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            if let Some(a) = line.strip_prefix("listening ") {
                addr.get_or_insert(a.parse::<Multiaddr>()?);
            }
            if line.starts_with("node ") {
                let addr: Multiaddr = addr.context("no listening address before the node line")?;
                self.0.push((addr.clone(), blocks.to_string(), child));
                return Ok(addr);
            }
        }
        let _ = child.kill();
        bail!("node {blocks} exited before serving")
    }

    /// SIGKILLs the node of `peer`; returns the blocks it served.
    pub(crate) fn kill(&mut self, peer: PeerId) -> Option<String> {
        let i = self
            .0
            .iter()
            .position(|(a, _, _)| matches!(a.iter().last(), Some(Protocol::P2p(p)) if p == peer))?;
        let (_, blocks, mut child) = self.0.remove(i);
        let _ = child.kill();
        let _ = child.wait();
        Some(blocks)
    }

    /// A live node's address.
    pub(crate) fn any(&self) -> Option<Multiaddr> {
        self.0.first().map(|(a, _, _)| a.clone())
    }
}
