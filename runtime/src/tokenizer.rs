//! Tokenizers: Hugging Face `tokenizer.json`, or byte-level BPE rebuilt from a
//! GGUF file's `tokenizer.ggml.*` metadata with the `tokenizers` crate.

use std::path::Path;

use tokenizers::{
    AddedToken, Tokenizer as HfTokenizer,
    decoders::byte_level::ByteLevel as ByteLevelDecoder,
    models::bpe::{BPE, Vocab},
    pre_tokenizers::{byte_level::ByteLevel, digits::Digits, sequence::Sequence, split::Split},
};

use crate::gguf::Gguf;

/// A tokenizer that cannot be built, or text that cannot be encoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenizerError {
    /// A tokenizer model other than byte-level BPE.
    #[error("tokenizer model {0:?} is not supported (byte-level BPE \"gpt2\" is)")]
    Model(String),
    /// A pre-tokenizer this runtime does not know.
    #[error("pre-tokenizer {0:?} is not supported (smollm, gpt2, llama-bpe, qwen2 are)")]
    Pre(String),
    /// The tokenizers crate failed to build or run the tokenizer.
    #[error("tokenizer: {0}")]
    Build(String),
    /// The GGUF metadata holding the tokenizer is malformed.
    #[error(transparent)]
    Gguf(#[from] crate::gguf::GgufError),
}

fn build_err(e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Build(e.to_string())
}

/// Text ↔ token ids for one model.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: HfTokenizer,
    /// End-of-sequence token id, if known.
    pub eos: Option<u32>,
}

/// The split regex of Llama 3 ("llama-bpe") and similar pre-tokenizers.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json`.
    ///
    /// # Errors
    /// When the file cannot be read or parsed.
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        let inner = HfTokenizer::from_file(path).map_err(build_err)?;
        Ok(Tokenizer {
            eos: Self::eos_of(&inner),
            inner,
        })
    }

    /// Loads a tokenizer from the bytes of a `tokenizer.json` (what
    /// [`Tokenizer::to_json`] writes; a mesh client gets it from a node).
    ///
    /// # Errors
    /// When the bytes are not a tokenizer.
    pub fn from_json(json: &[u8]) -> Result<Self, TokenizerError> {
        let inner = HfTokenizer::from_bytes(json).map_err(build_err)?;
        Ok(Tokenizer {
            eos: Self::eos_of(&inner),
            inner,
        })
    }

    /// The tokenizer as a Hugging Face `tokenizer.json`.
    ///
    /// # Errors
    /// When it cannot be serialized.
    pub fn to_json(&self) -> Result<String, TokenizerError> {
        self.inner.to_string(false).map_err(build_err)
    }

    fn eos_of(inner: &HfTokenizer) -> Option<u32> {
        ["</s>", "<|endoftext|>", "<|end_of_text|>", "<|im_end|>"]
            .iter()
            .find_map(|t| inner.token_to_id(t))
    }

    /// Rebuilds the tokenizer stored in a GGUF file's metadata.
    ///
    /// # Errors
    /// When the metadata is missing or describes an unsupported tokenizer.
    pub fn from_gguf(g: &Gguf) -> Result<Self, TokenizerError> {
        let model = g.str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(TokenizerError::Model(model.to_string()));
        }
        let tokens = g.strings("tokenizer.ggml.tokens")?;
        let merges = g.strings("tokenizer.ggml.merges")?;
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, s)| (s.to_string(), i as u32))
            .collect();
        let merges: Vec<(String, String)> = merges
            .iter()
            .filter_map(|m| m.split_once(' '))
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(build_err)?;
        let mut inner = HfTokenizer::new(bpe);
        let pre = g.str("tokenizer.ggml.pre").unwrap_or("default");
        let byte_level_no_regex = || ByteLevel::new(false, true, false);
        let pre_tok: tokenizers::PreTokenizerWrapper = match pre {
            // llama.cpp "smollm": digits one by one, then byte-level GPT-2 splitting without a prefix space.
            "smollm" => Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])
            .into(),
            "gpt2" | "default" => ByteLevel::new(false, true, true).into(),
            "llama-bpe" | "llama3" | "qwen2" => {
                let re = if pre == "qwen2" {
                    QWEN2_SPLIT
                } else {
                    LLAMA3_SPLIT
                };
                let split = Split::new(
                    tokenizers::pre_tokenizers::split::SplitPattern::Regex(re.into()),
                    tokenizers::SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(build_err)?;
                Sequence::new(vec![split.into(), byte_level_no_regex().into()]).into()
            }
            other => return Err(TokenizerError::Pre(other.to_string())),
        };
        inner.with_pre_tokenizer(Some(pre_tok));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        // Control tokens (type 3) are matched whole, never split by BPE.
        if let Some(crate::gguf::Value::Array(types)) = g.get("tokenizer.ggml.token_type") {
            let special: Vec<AddedToken> = types
                .iter()
                .enumerate()
                .filter(|(_, t)| t.as_u64() == Some(3))
                .filter_map(|(i, _)| tokens.get(i))
                .map(|t| AddedToken::from(t.to_string(), true))
                .collect();
            inner.add_special_tokens(special).map_err(build_err)?;
        }
        let eos = g
            .get("tokenizer.ggml.eos_token_id")
            .and_then(|v| v.as_u64())
            .map(|v| v as u32);
        Ok(Tokenizer { inner, eos })
    }

    /// Encodes text into token ids (no BOS is added).
    ///
    /// # Errors
    /// When the tokenizer fails on the text.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self.inner.encode(text, false).map_err(build_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes token ids into text (special tokens kept).
    ///
    /// # Errors
    /// When an id is out of the vocabulary.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner.decode(ids, false).map_err(build_err)
    }

    /// The text of one token, as the model sees it (`" Paris"`).
    pub fn token_text(&self, id: u32) -> String {
        self.decode(&[id]).unwrap_or_else(|_| format!("<{id}>"))
    }

    /// Number of tokens in the vocabulary (special tokens included).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token string, if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}
