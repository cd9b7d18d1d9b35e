//! Signed, expiring announcements of the stages a node serves.
//!
//! A node publishes one [`StageRecord`] per hosted block range, wrapped in a
//! [`SignedRecord`] signed with its libp2p identity key. Readers call
//! [`SignedRecord::verify`], which checks the signature, that the signing key
//! is the key of `record.peer` (so a node cannot announce on behalf of
//! another), and the expiry.

use libp2p_identity::{Keypair, PublicKey};
use serde::{Deserialize, Serialize};

use crate::{PeerId, ids::ModelId, limits::Limits, span::Span};

/// The DHT key under which every stage-serving node announces itself as a
/// provider; clients ask the DHT for its providers, then each for its records.
pub const STAGES_KEY: &[u8] = b"nnmesh/stages/v1";

/// Domain separator prepended to the record bytes before signing, so a
/// record signature can never be replayed as a signature of anything else.
pub const RECORD_DOMAIN: &[u8] = b"nnmesh-record-v2";

/// What a node announces about one stage it serves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageRecord {
    /// The serving node.
    pub peer: PeerId,
    /// Multiaddrs the node listens on.
    pub addrs: Vec<String>,
    /// Hash of the model's weight files.
    pub model: ModelId,
    /// Human-readable model name (informational; `model` is authoritative).
    pub model_name: String,
    /// Number of decoder layers of the whole model.
    pub num_layers: u32,
    /// The decoder layers served.
    pub span: Span,
    /// Measured throughput of this stage, tokens per second.
    pub throughput: f32,
    /// Queue fullness, 0 (idle) to 1 (full).
    pub load: f32,
    /// The per-request limits the node enforces.
    pub limits: Limits,
    /// The replication floor the node asks of the mesh: holders every block
    /// should have (a mesh-wide setting; the highest announced wins).
    pub replication: u32,
    /// Unix time in milliseconds after which the record is void.
    pub expires_at_ms: u64,
}

/// A [`StageRecord`] with its signer's public key and signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedRecord {
    /// postcard encoding of the [`StageRecord`]; the exact signed bytes.
    #[serde(with = "serde_bytes")]
    pub record: Vec<u8>,
    /// The signer's public key, libp2p protobuf encoding.
    #[serde(with = "serde_bytes")]
    pub public_key: Vec<u8>,
    /// Signature over [`RECORD_DOMAIN`] followed by `record`.
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// Why a [`SignedRecord`] was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// The public key or the record bytes could not be decoded.
    #[error("undecodable signed record: {0}")]
    Undecodable(String),
    /// The signature does not verify under the enclosed public key.
    #[error("bad record signature")]
    BadSignature,
    /// The record is validly signed, but by a key that is not `record.peer`'s.
    #[error("record signed by a key that does not belong to its peer")]
    PeerMismatch,
    /// The record's lifetime is over.
    #[error("record expired at {expires_at_ms} ms (now {now_ms} ms)")]
    Expired {
        /// The record's `expires_at_ms`.
        expires_at_ms: u64,
        /// The time the check was made at.
        now_ms: u64,
    },
}

fn signed_payload(record: &[u8]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(RECORD_DOMAIN.len() + record.len());
    payload.extend_from_slice(RECORD_DOMAIN);
    payload.extend_from_slice(record);
    payload
}

impl SignedRecord {
    /// Encodes and signs `record` with `keypair`.
    ///
    /// The caller is responsible for `record.peer` being `keypair`'s peer id;
    /// [`verify`](Self::verify) rejects it otherwise.
    ///
    /// # Panics
    /// If the key type cannot sign (never for ed25519, the key type nnmesh
    /// uses), or if postcard fails to encode into a `Vec` (never).
    pub fn sign(record: &StageRecord, keypair: &Keypair) -> SignedRecord {
        let bytes =
            postcard::to_allocvec(record).expect("encoding a record into a Vec cannot fail");
        let signature = keypair
            .sign(&signed_payload(&bytes))
            .expect("ed25519 signing is infallible");
        SignedRecord {
            record: bytes,
            public_key: keypair.public().encode_protobuf(),
            signature,
        }
    }

    /// Checks the signature, the signer and the expiry (against `now_ms`,
    /// Unix milliseconds), and returns the record.
    ///
    /// # Errors
    /// See [`RecordError`].
    pub fn verify(&self, now_ms: u64) -> Result<StageRecord, RecordError> {
        let key = PublicKey::try_decode_protobuf(&self.public_key)
            .map_err(|e| RecordError::Undecodable(format!("public key: {e}")))?;
        if !key.verify(&signed_payload(&self.record), &self.signature) {
            return Err(RecordError::BadSignature);
        }
        let record: StageRecord = postcard::from_bytes(&self.record)
            .map_err(|e| RecordError::Undecodable(format!("record: {e}")))?;
        if key.to_peer_id() != record.peer {
            return Err(RecordError::PeerMismatch);
        }
        if now_ms >= record.expires_at_ms {
            return Err(RecordError::Expired {
                expires_at_ms: record.expires_at_ms,
                now_ms,
            });
        }
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic key from a one-byte seed (tests need no RNG).
    fn key(seed: u8) -> Keypair {
        Keypair::ed25519_from_bytes([seed; 32]).expect("32 bytes is a valid ed25519 secret")
    }

    fn record_for(key: &Keypair) -> StageRecord {
        StageRecord {
            peer: key.public().to_peer_id(),
            addrs: vec!["/ip4/127.0.0.1/tcp/4001".into()],
            model: ModelId::of_bytes(b"smollm2"),
            model_name: "SmolLM2-135M-Instruct".into(),
            num_layers: 30,
            span: Span::new(0, 15),
            throughput: 120.5,
            load: 0.25,
            limits: Limits::default(),
            replication: 2,
            expires_at_ms: 1_000,
        }
    }

    #[test]
    fn sign_then_verify() {
        let key = key(1);
        let record = record_for(&key);
        let signed = SignedRecord::sign(&record, &key);
        assert_eq!(signed.verify(999).unwrap(), record);
    }

    #[test]
    fn tampered_record_fails() {
        let key = key(1);
        let mut signed = SignedRecord::sign(&record_for(&key), &key);
        let last = signed.record.len() - 1;
        signed.record[last] ^= 1;
        assert_eq!(signed.verify(0), Err(RecordError::BadSignature));

        let mut signed = SignedRecord::sign(&record_for(&key), &key);
        signed.signature[0] ^= 1;
        assert_eq!(signed.verify(0), Err(RecordError::BadSignature));
    }

    #[test]
    fn record_of_another_peer_fails() {
        let owner = key(2);
        let impostor = key(3);
        // The impostor signs a record naming the owner's peer id.
        let signed = SignedRecord::sign(&record_for(&owner), &impostor);
        assert_eq!(signed.verify(0), Err(RecordError::PeerMismatch));

        // Swapping in the owner's public key breaks the signature instead.
        let mut swapped = signed.clone();
        swapped.public_key = owner.public().encode_protobuf();
        assert_eq!(swapped.verify(0), Err(RecordError::BadSignature));
    }

    #[test]
    fn expiry() {
        let key = key(1);
        let signed = SignedRecord::sign(&record_for(&key), &key);
        assert!(signed.verify(999).is_ok());
        assert_eq!(
            signed.verify(1_000),
            Err(RecordError::Expired {
                expires_at_ms: 1_000,
                now_ms: 1_000
            })
        );
    }

    #[test]
    fn garbage_key_is_undecodable() {
        let key = key(1);
        let mut signed = SignedRecord::sign(&record_for(&key), &key);
        signed.public_key = vec![1, 2, 3];
        assert!(matches!(signed.verify(0), Err(RecordError::Undecodable(_))));
    }
}
