//! Per-tenant client-side encryption: the keys derived from a tenant's 32-byte key, and
//! AES-256-GCM sealing of chunk payloads.
//!
//! Three independent keys come out of the tenant key with BLAKE3's key derivation, so that no
//! derived value reveals another:
//! * `k_id` keys the chunk-id hash: equal data of two tenants gets unrelated ids, and the
//!   store cannot confirm a guess about a chunk's content;
//! * `k_enc` is the AES-256-GCM key; the chunk id is the AAD, so a chunk object moved under
//!   another id fails to decrypt;
//! * the fingerprint (hex) is recorded in manifests, so a restore with another key fails
//!   before anything is written. It is not the key and does not lead to it.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};

use crate::error::CodecError;

/// Derivation contexts (BLAKE3 `derive_key`): fixed forever for format version 1.
pub const CONTEXT_CHUNK_ID: &str = "evs backup v1 chunk id";
pub const CONTEXT_CHUNK_ENCRYPTION: &str = "evs backup v1 chunk encryption";
pub const CONTEXT_KEY_FINGERPRINT: &str = "evs backup v1 key fingerprint";

pub const KEY_LEN: usize = 32;
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;

/// The keys derived from one tenant key.
#[derive(Clone)]
pub struct TenantKeys {
    id_key: [u8; 32],
    cipher: Aes256Gcm,
    fingerprint: String,
}

impl TenantKeys {
    pub fn new(key: &[u8; KEY_LEN]) -> TenantKeys {
        let id_key = blake3::derive_key(CONTEXT_CHUNK_ID, key);
        let enc = blake3::derive_key(CONTEXT_CHUNK_ENCRYPTION, key);
        let cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&enc));
        TenantKeys { id_key, cipher, fingerprint: key_fingerprint(key) }
    }

    pub(crate) fn id_key(&self) -> &[u8; 32] {
        &self.id_key
    }

    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Encrypts `plain` under a fresh random nonce; returns (nonce, ciphertext || tag).
    pub(crate) fn seal(&self, aad: &[u8], plain: &[u8]) -> Result<([u8; NONCE_LEN], Vec<u8>), CodecError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| CodecError::Encode(format!("no random nonce: {e}")))?;
        let sealed = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: plain, aad })
            .map_err(|_| CodecError::Encode("AES-256-GCM refused the payload".into()))?;
        Ok((nonce, sealed))
    }

    pub(crate) fn open(&self, nonce: &[u8; NONCE_LEN], aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, CodecError> {
        self.cipher.decrypt(Nonce::from_slice(nonce), Payload { msg: sealed, aad }).map_err(|_| CodecError::AuthFailed)
    }
}

impl std::fmt::Debug for TenantKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantKeys").field("fingerprint", &self.fingerprint).finish_non_exhaustive()
    }
}

/// The fingerprint of a tenant key, as manifests record it (64 hex).
pub fn key_fingerprint(key: &[u8; KEY_LEN]) -> String {
    hex(&blake3::derive_key(CONTEXT_KEY_FINGERPRINT, key))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_keys_differ_and_fingerprint_is_not_the_key() {
        let key = [7u8; 32];
        let k = TenantKeys::new(&key);
        assert_ne!(k.id_key(), &key);
        assert_ne!(k.fingerprint(), hex(&key));
        assert_ne!(k.fingerprint(), hex(k.id_key()));
        assert_eq!(k.fingerprint().len(), 64);
        assert_ne!(key_fingerprint(&[8u8; 32]), k.fingerprint());
    }

    #[test]
    fn seal_open_round_trip_and_wrong_key_or_aad_fails() {
        let k = TenantKeys::new(&[1u8; 32]);
        let (nonce, sealed) = k.seal(b"aad", b"hello").unwrap();
        assert_eq!(sealed.len(), 5 + TAG_LEN);
        assert_eq!(k.open(&nonce, b"aad", &sealed).unwrap(), b"hello");
        assert_eq!(k.open(&nonce, b"other", &sealed), Err(CodecError::AuthFailed));
        let other = TenantKeys::new(&[2u8; 32]);
        assert_eq!(other.open(&nonce, b"aad", &sealed), Err(CodecError::AuthFailed));
        // Two seals of the same data use different nonces.
        let (nonce2, sealed2) = k.seal(b"aad", b"hello").unwrap();
        assert_ne!((nonce, &sealed), (nonce2, &sealed2));
    }
}
