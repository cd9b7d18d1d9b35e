//! `nnmesh node` processes on loopback (port 0), started and waited for
//! until they listen.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use libp2p::{Multiaddr, PeerId, multiaddr::Protocol};

/// A running `nnmesh node` child process; killed when dropped.
#[derive(Debug)]
pub struct LocalNode {
    child: Child,
    /// Its listening address, ending in `/p2p/<peer id>`.
    pub addr: Multiaddr,
    /// Its peer id.
    pub peer: PeerId,
}

impl LocalNode {
    /// Starts `nnmesh node --blocks BLOCKS` on `127.0.0.1:0` (with one torch
    /// thread unless `extra` says `--threads`) and waits (up to two minutes)
    /// for its `listening` and `node` lines.
    ///
    /// # Errors
    /// When the process cannot start or exits before listening.
    pub fn start(
        model: &Path,
        blocks: &str,
        bootstrap: Option<&Multiaddr>,
        extra: &[&str],
    ) -> Result<LocalNode> {
        LocalNode::spawn(model, Some(blocks), bootstrap, extra)
    }

    /// Starts an auto-placed `nnmesh node` (no `--blocks`; `extra` gives
    /// `--max-memory` and the like) and waits until it serves.
    ///
    /// # Errors
    /// When the process cannot start or exits before serving.
    pub fn start_auto(
        model: &Path,
        bootstrap: Option<&Multiaddr>,
        extra: &[&str],
    ) -> Result<LocalNode> {
        LocalNode::spawn(model, None, bootstrap, extra)
    }

    fn spawn(
        model: &Path,
        blocks: Option<&str>,
        bootstrap: Option<&Multiaddr>,
        extra: &[&str],
    ) -> Result<LocalNode> {
        let exe = crate::nnmesh_exe();
        let mut cmd = Command::new(&exe);
        cmd.args(["node", "--listen", "/ip4/127.0.0.1/tcp/0"]);
        if let Some(b) = blocks {
            cmd.args(["--blocks", b]);
        }
        if !extra.contains(&"--threads") {
            // One torch thread, as the tests' single-node references
            // (`load_engine`): kernels split across threads round
            // differently, and the mesh is checked bit for bit.
            cmd.args(["--threads", "1"]);
        }
        cmd.arg("--model")
            .arg(model)
            .args(extra)
            .stdout(Stdio::piped())
            // NNMESH_TEST_NODE_LOGS=1 shows the nodes' logs (with RUST_LOG).
            .stderr(if std::env::var_os("NNMESH_TEST_NODE_LOGS").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            });
        if let Some(b) = bootstrap {
            cmd.arg("--bootstrap").arg(b.to_string());
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        let stdout = child.stdout.take().context("node stdout is piped")?;
        let (tx, rx) = mpsc::sync_channel(64);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut addr = None;
        loop {
            let Ok(line) = rx.recv_timeout(Duration::from_secs(120)) else {
                let _ = child.kill();
                bail!("node {blocks:?} did not start serving");
            };
            if let Some(a) = line.strip_prefix("listening ") {
                addr = Some(a.parse::<Multiaddr>().context("listening address")?);
            }
            if line.starts_with("node ") {
                break;
            }
        }
        let addr = addr.context("no listening line before the node line")?;
        let peer = match addr.iter().last() {
            Some(Protocol::P2p(p)) => p,
            _ => bail!("address {addr} does not end in /p2p/"),
        };
        Ok(LocalNode { child, addr, peer })
    }

    /// Starts three nodes splitting a 30-layer model 0..10, 10..20, 20..30,
    /// the later two bootstrapped to the first.
    ///
    /// # Errors
    /// When a node does not start.
    pub fn three(model: &Path) -> Result<Vec<LocalNode>> {
        let first = LocalNode::start(model, "0..10", None, &[])?;
        let a = first.addr.clone();
        Ok(vec![
            first,
            LocalNode::start(model, "10..20", Some(&a), &[])?,
            LocalNode::start(model, "20..30", Some(&a), &[])?,
        ])
    }

    /// Sends SIGTERM and waits up to ten seconds for the exit status.
    ///
    /// # Errors
    /// When the process does not exit.
    pub fn terminate(mut self) -> Result<ExitStatus> {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .context("running kill")?;
        for _ in 0..100 {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("node did not exit within 10 s of SIGTERM")
    }
}

impl Drop for LocalNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
