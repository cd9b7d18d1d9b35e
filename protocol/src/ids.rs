//! Identifiers: request ids and content-addressed model ids.

use std::{fmt, fs::File, io, path::PathBuf, str::FromStr};

use serde::{Deserialize, Serialize};

/// A client-chosen id for one request (an experiment run), echoed in every
/// message that belongs to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RequestId(pub u64);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The identity of a model: the blake3 hash of its weight files, in order.
///
/// Two nodes that report the same `ModelId` serve bit-identical weights.
/// Displays as 64 lowercase hex digits and parses back from them.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ModelId(pub [u8; 32]);

impl ModelId {
    /// Hashes an in-memory blob (for tests and single-buffer models).
    pub fn of_bytes(bytes: &[u8]) -> ModelId {
        ModelId(*blake3::hash(bytes).as_bytes())
    }

    /// Hashes the given weight files in order, streaming them through blake3.
    ///
    /// # Errors
    /// Any I/O error opening or reading a file.
    pub fn of_files(paths: &[PathBuf]) -> io::Result<ModelId> {
        let mut hasher = blake3::Hasher::new();
        for path in paths {
            let file = File::open(path)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
            hasher.update_reader(file)?;
        }
        Ok(ModelId(*hasher.finalize().as_bytes()))
    }
}

impl fmt::Display for ModelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ModelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ModelId({self})")
    }
}

/// Why a string is not a [`ModelId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseModelIdError {
    /// The string is not 64 characters long.
    #[error("a model id is 64 hex digits, got {0} characters")]
    Length(usize),
    /// A character is not a hex digit.
    #[error("invalid hex digit {0:?} in model id")]
    Digit(char),
}

impl FromStr for ModelId {
    type Err = ParseModelIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let chars: Vec<char> = s.chars().collect();
        if chars.len() != 64 {
            return Err(ParseModelIdError::Length(chars.len()));
        }
        let mut out = [0u8; 32];
        for (i, pair) in chars.chunks(2).enumerate() {
            let hi = pair[0]
                .to_digit(16)
                .ok_or(ParseModelIdError::Digit(pair[0]))?;
            let lo = pair[1]
                .to_digit(16)
                .ok_or(ParseModelIdError::Digit(pair[1]))?;
            out[i] = (hi * 16 + lo) as u8;
        }
        Ok(ModelId(out))
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn hex_round_trip() {
        let id = ModelId::of_bytes(b"weights");
        let s = id.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s, s.to_lowercase());
        assert_eq!(s.parse::<ModelId>().unwrap(), id);
        assert_eq!(s.to_uppercase().parse::<ModelId>().unwrap(), id);
    }

    #[test]
    fn bad_hex() {
        assert_eq!("ab".parse::<ModelId>(), Err(ParseModelIdError::Length(2)));
        let s = "g".repeat(64);
        assert_eq!(s.parse::<ModelId>(), Err(ParseModelIdError::Digit('g')));
    }

    #[test]
    fn files_hash_is_concatenation() {
        let dir = std::env::temp_dir().join(format!("nnmesh-ids-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = dir.join("a.bin");
        let b = dir.join("b.bin");
        std::fs::File::create(&a)
            .unwrap()
            .write_all(b"hello ")
            .unwrap();
        std::fs::File::create(&b)
            .unwrap()
            .write_all(b"world")
            .unwrap();
        let id = ModelId::of_files(&[a.clone(), b.clone()]).unwrap();
        assert_eq!(id, ModelId::of_bytes(b"hello world"));
        assert!(ModelId::of_files(&[dir.join("missing")]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
