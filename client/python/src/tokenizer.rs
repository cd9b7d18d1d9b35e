//! The model's tokenizer, from a local model or from the mesh.

use pyo3::prelude::*;

use crate::error::RunError;

/// A Hugging Face tokenizer (byte-level BPE for SmolLM2), as the model's
/// nodes use it.
#[pyclass(frozen, module = "nnmesh._nnmesh")]
#[derive(Debug)]
pub(crate) struct Tokenizer {
    pub(crate) inner: nnmesh_runtime::tokenizer::Tokenizer,
}

fn failed(e: impl std::fmt::Display) -> PyErr {
    RunError::new_err(format!("tokenizer: {e}"))
}

#[pymethods]
impl Tokenizer {
    /// Loads a tokenizer from the bytes of a `tokenizer.json`.
    ///
    /// # Errors
    /// When the bytes are not a tokenizer.
    #[staticmethod]
    fn from_json(json: &[u8]) -> PyResult<Self> {
        let inner = nnmesh_runtime::tokenizer::Tokenizer::from_json(json).map_err(failed)?;
        Ok(Tokenizer { inner })
    }

    /// Token ids of `text` (no special tokens added).
    fn encode(&self, text: &str) -> PyResult<Vec<u32>> {
        self.inner.encode(text).map_err(failed)
    }

    /// The text of token ids.
    fn decode(&self, ids: Vec<u32>) -> PyResult<String> {
        self.inner.decode(&ids).map_err(failed)
    }

    /// The text of one token, as shown in summaries.
    fn token_text(&self, id: u32) -> String {
        self.inner.token_text(id)
    }

    /// The id of a token given by its text in the vocabulary, if it has one.
    fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_id(token)
    }

    /// Vocabulary size.
    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    /// The end-of-sequence token id, if known.
    #[getter]
    fn eos(&self) -> Option<u32> {
        self.inner.eos
    }

    /// The tokenizer as `tokenizer.json` text.
    fn to_json(&self) -> PyResult<String> {
        self.inner.to_json().map_err(failed)
    }
}
