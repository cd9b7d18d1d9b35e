//! A model loaded in this process: the runtime's engine, on the libtorch
//! that the `torch` package beside this module also uses.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
};

use nnmesh_graph::{Limits, Manifest};
use nnmesh_runtime::{engine::Engine, execute, wire};
use pyo3::{prelude::*, types::PyDict};
use tch::{Device, Kind};

use crate::{
    error::{RunError, invalid},
    graph::decode,
    outcome::{self, Saved},
    tokenizer::Tokenizer,
    wait,
};

/// A whole model loaded here (a `.gguf` file or a Hugging Face folder).
///
/// Runs are serialized: one graph at a time on the model.
#[pyclass(frozen, module = "nnmesh._nnmesh")]
#[derive(Debug)]
pub(crate) struct Local {
    // tch tensors are Send but not Sync: the engine is shared with the
    // thread that runs a graph through a mutex.
    engine: Arc<Mutex<Engine>>,
    manifest: Manifest,
    tokenizer: Py<Tokenizer>,
}

fn parse_device(device: &str) -> PyResult<Device> {
    match device {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        d => match d.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => Ok(Device::Cuda(i)),
            _ => Err(RunError::new_err(format!(
                "unknown device {d:?}: use \"cpu\", \"cuda\" or \"cuda:N\""
            ))),
        },
    }
}

fn parse_kind(dtype: &str) -> PyResult<Kind> {
    match dtype {
        "f32" | "float32" => Ok(Kind::Float),
        "bf16" | "bfloat16" => Ok(Kind::BFloat16),
        "f16" | "float16" => Ok(Kind::Half),
        d => Err(RunError::new_err(format!(
            "unknown dtype {d:?}: use \"float32\", \"bfloat16\" or \"float16\""
        ))),
    }
}

fn run_error(e: execute::Error) -> PyErr {
    match e {
        execute::Error::Validate(v) => invalid(&v),
        e => RunError::new_err(e.to_string()),
    }
}

#[pymethods]
impl Local {
    /// Loads the model at `path` on `device` in `dtype`.
    ///
    /// # Errors
    /// A [`RunError`] when the model cannot be loaded.
    #[new]
    #[pyo3(signature = (path, device="cpu", dtype="float32"))]
    fn new(py: Python<'_>, path: PathBuf, device: &str, dtype: &str) -> PyResult<Self> {
        let (device, kind) = (parse_device(device)?, parse_kind(dtype)?);
        let shown = path.display().to_string();
        let engine = wait::on_thread(py, move || Engine::load(&path, None, kind, device))?
            .map_err(|e| RunError::new_err(format!("loading {shown}: {e}")))?;
        let manifest = engine.manifest();
        let tokenizer = Py::new(
            py,
            Tokenizer {
                inner: engine.tokenizer.clone(),
            },
        )?;
        Ok(Local {
            engine: Arc::new(Mutex::new(engine)),
            manifest,
            tokenizer,
        })
    }

    /// The model's manifest (module tree dimensions, dtype) as JSON.
    fn manifest(&self) -> String {
        serde_json::to_string(&self.manifest).unwrap_or_default()
    }

    /// The model's tokenizer.
    #[getter]
    fn tokenizer(&self, py: Python<'_>) -> Py<Tokenizer> {
        self.tokenizer.clone_ref(py)
    }

    /// Runs a graph (JSON) on the model and returns what it saved (see
    /// `outcome::to_python`), with the interpreter released meanwhile.
    ///
    /// # Errors
    /// A `GraphError` for an invalid graph, a [`RunError`] when it fails
    /// while running.
    fn run<'py>(&self, py: Python<'py>, graph: &str) -> PyResult<Bound<'py, PyDict>> {
        let graph = decode(graph)?;
        let engine = self.engine.clone();
        let done = wait::on_thread(py, move || {
            let engine = engine.lock().map_err(|_| {
                RunError::new_err("an earlier run panicked while holding the model")
            })?;
            let out = execute::run(&engine, graph, &Limits::default()).map_err(run_error)?;
            let saves = out
                .saves
                .iter()
                .map(|s| {
                    let t = wire::to_wire(&s.value)
                        .map_err(|e| RunError::new_err(format!("saved value {}: {e}", s.name)))?;
                    Ok((s.name.clone(), s.step, t))
                })
                .collect::<PyResult<Vec<Saved>>>()?;
            Ok::<_, PyErr>((saves, out.generated))
        })??;
        outcome::to_python(py, done.0, done.1)
    }
}
