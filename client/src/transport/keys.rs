//! Key files: a persistent peer identity, a private mesh's pre-shared key,
//! and peer allow-lists.
//!
//! - An identity file holds an ed25519 keypair in libp2p's protobuf
//!   encoding; it is created (mode 0600) on first use, so a node or a client
//!   keeps its peer id across runs and can be named in allow-lists.
//! - A pre-shared key file is the format IPFS and every libp2p
//!   implementation read (`/key/swarm/psk/1.0.0/`, `/base16/`, 64 hex
//!   digits); peers without the same key cannot connect at all.
//! - An allow-list is one peer id per line; `#` starts a comment.

use std::{
    collections::HashSet,
    io::{self, Write},
    path::{Path, PathBuf},
};

use libp2p::{PeerId, identity::Keypair, pnet::PreSharedKey};

/// Why a key file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The file's contents are not what it should hold.
    #[error("{path}: {detail}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> KeyError + '_ {
    move |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn invalid(path: &Path, detail: impl Into<String>) -> KeyError {
    KeyError::Invalid {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

/// Writes `bytes` to a new file readable by its owner only; fails if the
/// file exists.
fn create_private(path: &Path, bytes: &[u8]) -> Result<(), KeyError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(io_err(path))?;
    file.write_all(bytes).map_err(io_err(path))
}

/// Loads the identity in `path`, creating a new ed25519 identity there if
/// the file does not exist.
///
/// # Errors
/// When the file cannot be read or created, or does not hold a keypair.
pub fn load_or_create_identity(path: &Path) -> Result<Keypair, KeyError> {
    match std::fs::read(path) {
        Ok(bytes) => Keypair::from_protobuf_encoding(&bytes)
            .map_err(|e| invalid(path, format!("not an identity key file: {e}"))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let key = Keypair::generate_ed25519();
            let bytes = key
                .to_protobuf_encoding()
                .map_err(|e| invalid(path, format!("cannot encode the new key: {e}")))?;
            create_private(path, &bytes)?;
            Ok(key)
        }
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Reads a pre-shared key file.
///
/// # Errors
/// When the file cannot be read or is not a swarm key.
pub fn read_psk(path: &Path) -> Result<PreSharedKey, KeyError> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    text.parse()
        .map_err(|e| invalid(path, format!("not a swarm key: {e}")))
}

/// Writes a new random pre-shared key to `path` (which must not exist) and
/// returns it.
///
/// # Errors
/// When the file exists or cannot be written.
pub fn create_psk(path: &Path) -> Result<PreSharedKey, KeyError> {
    // An ed25519 secret is 32 bytes from the OS's secure RNG: reuse that
    // source rather than adding an RNG dependency.
    let secret = Keypair::generate_ed25519()
        .try_into_ed25519()
        .map_err(|e| invalid(path, e.to_string()))?
        .secret();
    let mut key = [0u8; 32];
    key.copy_from_slice(secret.as_ref());
    let psk = PreSharedKey::new(key);
    create_private(path, psk.to_key_file().as_bytes())?;
    Ok(psk)
}

/// Reads an allow-list: one peer id per line, `#` comments, blank lines ignored.
///
/// # Errors
/// When the file cannot be read or a line is not a peer id.
pub fn read_allow_list(path: &Path) -> Result<HashSet<PeerId>, KeyError> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let mut peers = HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let peer = line.parse().map_err(|e| {
            invalid(
                path,
                format!("line {}: {line:?} is not a peer id: {e}", i + 1),
            )
        })?;
        peers.insert(peer);
    }
    Ok(peers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nnmesh-keys-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    }

    #[test]
    fn identity_persists() {
        let d = dir("identity");
        let path = d.join("id.key");
        let a = load_or_create_identity(&path).expect("created");
        let b = load_or_create_identity(&path).expect("loaded");
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path)
                .expect("exists")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(&path, b"garbage").expect("write");
        let e = load_or_create_identity(&path).expect_err("garbage");
        assert!(e.to_string().contains("not an identity key file"), "{e}");
        std::fs::remove_dir_all(&d).expect("cleanup");
    }

    #[test]
    fn psk_round_trips_and_is_random() {
        let d = dir("psk");
        let a = create_psk(&d.join("a.key")).expect("created");
        let b = create_psk(&d.join("b.key")).expect("created");
        assert_ne!(a.fingerprint().to_string(), b.fingerprint().to_string());
        let read = read_psk(&d.join("a.key")).expect("read");
        assert_eq!(read.fingerprint().to_string(), a.fingerprint().to_string());
        assert!(create_psk(&d.join("a.key")).is_err(), "never overwrites");
        std::fs::write(d.join("bad.key"), "not a key").expect("write");
        assert!(read_psk(&d.join("bad.key")).is_err());
        std::fs::remove_dir_all(&d).expect("cleanup");
    }

    #[test]
    fn allow_list_parses_and_names_bad_lines() {
        let d = dir("allow");
        let p = Keypair::generate_ed25519().public().to_peer_id();
        std::fs::write(d.join("ok"), format!("# clients\n{p}  # alice\n\n")).expect("write");
        assert_eq!(
            read_allow_list(&d.join("ok")).expect("parses"),
            HashSet::from([p])
        );
        std::fs::write(d.join("bad"), format!("{p}\nnot-a-peer\n")).expect("write");
        let e = read_allow_list(&d.join("bad")).expect_err("bad line");
        assert!(e.to_string().contains("line 2"), "{e}");
        std::fs::remove_dir_all(&d).expect("cleanup");
    }
}
