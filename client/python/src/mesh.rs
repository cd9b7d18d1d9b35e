//! A mesh of stage nodes, reached through the libp2p client on a tokio
//! runtime that the object owns. No weights are needed here: the manifest
//! and the tokenizer come from the nodes.

use std::path::PathBuf;

use libp2p::Multiaddr;
use nnmesh_client::{
    mesh::{self, Client},
    transport::{self, keys},
};
use nnmesh_graph::Manifest;
use nnmesh_protocol::ids::ModelId;
use pyo3::{prelude::*, types::PyDict};

use crate::{
    error::{MeshError, invalid},
    graph::decode,
    outcome,
    tokenizer::Tokenizer,
    wait,
};

/// A connection to a mesh serving one model.
#[pyclass(frozen, module = "nnmesh._nnmesh")]
#[derive(Debug)]
pub(crate) struct Mesh {
    rt: tokio::runtime::Runtime,
    client: Client,
    model: ModelId,
    manifest: Manifest,
    tokenizer: Py<Tokenizer>,
}

fn mesh_error(e: mesh::Error) -> PyErr {
    match e {
        mesh::Error::Validate(v) => invalid(&v),
        e => MeshError::new_err(e.to_string()),
    }
}

#[pymethods]
impl Mesh {
    /// Connects to the mesh through `addrs` (multiaddrs ending in
    /// `/p2p/<peer id>`), discovers the nodes, picks the fully served model
    /// (`model`, a model id in hex, when the mesh serves several) and
    /// fetches its manifest and tokenizer.
    ///
    /// `identity` is a key file (created on first use) giving the client
    /// the peer id that nodes' allow-lists name; `psk` is a private mesh's
    /// pre-shared key file. With `verify`, every hop runs on two holders of
    /// its layers and a disagreement fails the run, naming both.
    ///
    /// # Errors
    /// A [`MeshError`] for a bad address or key file, an unreachable mesh,
    /// or no model whose every layer is served.
    #[new]
    #[pyo3(signature = (addrs, model=None, identity=None, psk=None, verify=false))]
    fn new(
        py: Python<'_>,
        addrs: Vec<String>,
        model: Option<&str>,
        identity: Option<PathBuf>,
        psk: Option<PathBuf>,
        verify: bool,
    ) -> PyResult<Self> {
        let addrs = addrs
            .iter()
            .map(|a| {
                a.parse::<Multiaddr>()
                    .map_err(|e| MeshError::new_err(format!("bad mesh address {a:?}: {e}")))
            })
            .collect::<PyResult<Vec<_>>>()?;
        if addrs.is_empty() {
            return Err(MeshError::new_err("no mesh address given"));
        }
        let wanted = model
            .map(|m| {
                m.parse::<ModelId>()
                    .map_err(|e| MeshError::new_err(format!("bad model id {m:?}: {e}")))
            })
            .transpose()?;
        let keypair = match &identity {
            Some(path) => keys::load_or_create_identity(path)
                .map_err(|e| MeshError::new_err(format!("identity key {}: {e}", path.display())))?,
            None => libp2p::identity::Keypair::generate_ed25519(),
        };
        let mut cfg = transport::Config::new(keypair);
        cfg.psk = psk
            .as_deref()
            .map(|path| {
                keys::read_psk(path).map_err(|e| {
                    MeshError::new_err(format!("pre-shared key {}: {e}", path.display()))
                })
            })
            .transpose()?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| MeshError::new_err(format!("cannot start a tokio runtime: {e}")))?;
        let (client, model, manifest, json) = wait::on_runtime(py, &rt, async move {
            let client = Client::start(cfg, &addrs)
                .await?
                .with_verify(verify.then(mesh::Tolerance::default));
            let peers = client.discover().await?;
            let (model, route) = mesh::choose_route(&peers, wanted)?;
            let manifest = route[0].0.manifest.clone();
            let (_, json) = client.tokenizer(Some(model)).await?;
            Ok::<_, mesh::Error>((client, model, manifest, json))
        })?
        .map_err(mesh_error)?;
        let inner = nnmesh_runtime::tokenizer::Tokenizer::from_json(&json)
            .map_err(|e| MeshError::new_err(format!("the mesh sent a bad tokenizer: {e}")))?;
        let tokenizer = Py::new(py, Tokenizer { inner })?;
        Ok(Mesh {
            rt,
            client,
            model,
            manifest,
            tokenizer,
        })
    }

    /// The served model's manifest as JSON.
    fn manifest(&self) -> String {
        serde_json::to_string(&self.manifest).unwrap_or_default()
    }

    /// The served model's tokenizer (sent by a node).
    #[getter]
    fn tokenizer(&self, py: Python<'_>) -> Py<Tokenizer> {
        self.tokenizer.clone_ref(py)
    }

    /// The served model's id (blake3 of its weight files), in hex.
    #[getter]
    fn model(&self) -> String {
        self.model.to_string()
    }

    /// The client's own peer id.
    #[getter]
    fn peer_id(&self) -> String {
        self.client.peer_id().to_string()
    }

    /// The nodes found in the mesh: `(peer, start, end, model id)` per
    /// record, `start..end` being the layers it serves.
    ///
    /// # Errors
    /// A [`MeshError`] when discovery fails.
    fn peers(&self, py: Python<'_>) -> PyResult<Vec<(String, u32, u32, String)>> {
        let client = self.client.clone();
        let peers = wait::on_runtime(py, &self.rt, async move { client.discover().await })?
            .map_err(mesh_error)?;
        Ok(peers
            .iter()
            .map(|p| {
                let s = p.record.span;
                (
                    p.peer.to_string(),
                    s.start,
                    s.end,
                    p.record.model.to_string(),
                )
            })
            .collect())
    }

    /// Runs a graph (JSON) through the mesh and returns what it saved (see
    /// `outcome::to_python`), plus `route` (per hop `(peer, start, end)`,
    /// after any fail-over), `model` (the model id) and `failovers` (stages
    /// replaced along the way).
    ///
    /// # Errors
    /// A `GraphError` for an invalid graph, a [`MeshError`] for a failed
    /// request (naming the stage).
    fn run<'py>(&self, py: Python<'py>, graph: &str) -> PyResult<Bound<'py, PyDict>> {
        let graph = decode(graph)?;
        let client = self.client.clone();
        let model = self.model;
        let out = wait::on_runtime(
            py,
            &self.rt,
            async move { client.run(graph, Some(model)).await },
        )?
        .map_err(mesh_error)?;
        let saves = out
            .saves
            .into_iter()
            .map(|s| (s.name, s.step, s.value))
            .collect();
        let route: Vec<_> = out
            .route
            .iter()
            .map(|h| (h.peer.to_string(), h.span.start, h.span.end))
            .collect();
        let dict = outcome::to_python(py, saves, out.generated)?;
        dict.set_item("route", route)?;
        dict.set_item("model", out.model.to_string())?;
        dict.set_item("failovers", out.failovers)?;
        Ok(dict)
    }
}
