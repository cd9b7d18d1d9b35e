//! What a run gives back to Python: a dict with the saved tensors as raw
//! bytes plus dtype and shape (the Python side views them as `torch`
//! tensors without another copy) and the generated tokens; a mesh run adds
//! its route, model id and fail-overs.

use nnmesh_protocol::tensor::{WireDType, WireTensor};
use pyo3::{
    prelude::*,
    types::{PyByteArray, PyDict, PyList},
};

/// One saved value: name, generation step (for per-step values), tensor.
pub(crate) type Saved = (String, Option<u32>, WireTensor);

fn dtype_name(d: WireDType) -> &'static str {
    match d {
        WireDType::F32 => "f32",
        WireDType::F16 => "f16",
        WireDType::Bf16 => "bf16",
        WireDType::I64 => "i64",
        WireDType::Bool => "bool",
    }
}

/// The run's result as a dict: `saves` (a list of `(name, step, dtype,
/// shape, bytearray)`) and `generated` (per trace, per invoke, token ids).
pub(crate) fn to_python<'py>(
    py: Python<'py>,
    saves: Vec<Saved>,
    generated: Vec<Vec<Vec<u32>>>,
) -> PyResult<Bound<'py, PyDict>> {
    let list = PyList::empty(py);
    for (name, step, t) in saves {
        let data = PyByteArray::new(py, &t.data);
        list.append((name, step, dtype_name(t.dtype), t.shape, data))?;
    }
    let out = PyDict::new(py);
    out.set_item("saves", list)?;
    out.set_item("generated", generated)?;
    Ok(out)
}
