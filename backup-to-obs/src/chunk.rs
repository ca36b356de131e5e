//! Chunk objects: one chunk of volume data, content-addressed, compressed, checksummed and
//! optionally encrypted. Pure functions: `encode_chunk` and `decode_chunk` do no I/O.
//!
//! Object layout (little-endian), stored at `chunks/<2 hex>/<64 hex id>`:
//!
//! ```text
//! offset size field
//! 0      8    magic  b"EVSCHNK\x01"
//! 8      2    version (1)
//! 10     1    codec: 0 = stored, 1 = zstd
//! 11     1    flags: bit 0 = encrypted (AES-256-GCM)
//! 12     4    plain_len: bytes of the chunk's data (at most the chunk size)
//! 16     4    payload_len
//! 20     4    crc32c of the payload as stored
//! 24     12   nonce (zeros unless encrypted)
//! 36     ..   payload: zstd(data) or data; encrypted: AES-256-GCM of that, 16-byte tag appended
//! ```
//!
//! The id is BLAKE3(data), or BLAKE3-keyed(k_id, data) with a tenant key (see crypto.rs).
//! Decoding checks everything it can before the expensive steps, bounds decompression by
//! `plain_len` (itself bounded by the caller's chunk size), and ends by re-hashing the data
//! against the id the object was fetched under: a decoded chunk is the right data or an error.

use std::fmt;

use crate::crypto::{TenantKeys, NONCE_LEN, TAG_LEN};
use crate::error::CodecError;

pub const CHUNK_MAGIC: [u8; 8] = *b"EVSCHNK\x01";
pub const CHUNK_VERSION: u16 = 1;
pub const CHUNK_HEADER_LEN: usize = 36;
pub const CODEC_STORED: u8 = 0;
pub const CODEC_ZSTD: u8 = 1;
pub const FLAG_ENCRYPTED: u8 = 1;
const KNOWN_FLAGS: u8 = FLAG_ENCRYPTED;

/// The content address of a chunk: 32 bytes of BLAKE3 (keyed with a tenant key).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// The id of `data`: plain BLAKE3, or keyed with the tenant's id key.
    pub fn of(data: &[u8], keys: Option<&TenantKeys>) -> ChunkId {
        match keys {
            None => ChunkId(*blake3::hash(data).as_bytes()),
            Some(k) => ChunkId(*blake3::keyed_hash(k.id_key(), data).as_bytes()),
        }
    }

    pub fn to_hex(&self) -> String {
        crate::crypto::hex(&self.0)
    }

    /// Parses 64 lowercase hex digits.
    pub fn from_hex(s: &str) -> Option<ChunkId> {
        let b = s.as_bytes();
        if b.len() != 64 {
            return None;
        }
        let digit = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        let mut id = [0u8; 32];
        for (i, out) in id.iter_mut().enumerate() {
            *out = (digit(b[2 * i])? << 4) | digit(b[2 * i + 1])?;
        }
        Some(ChunkId(id))
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", self.to_hex())
    }
}

/// Encodes `data` (whose id is `id`) as a chunk object: zstd at `zstd_level` unless that does
/// not shrink it, then encrypted when `keys` is given.
pub fn encode_chunk(
    id: &ChunkId,
    data: &[u8],
    zstd_level: i32,
    keys: Option<&TenantKeys>,
) -> Result<Vec<u8>, CodecError> {
    let plain_len = u32::try_from(data.len()).map_err(|_| CodecError::Encode("chunk larger than 4 GiB".into()))?;
    let compressed =
        zstd::bulk::compress(data, zstd_level).map_err(|e| CodecError::Encode(format!("zstd compression: {e}")))?;
    let (codec, body) =
        if compressed.len() < data.len() { (CODEC_ZSTD, compressed.as_slice()) } else { (CODEC_STORED, data) };
    let (flags, nonce, payload) = match keys {
        None => (0, [0u8; NONCE_LEN], None),
        Some(k) => {
            let (nonce, sealed) = k.seal(&id.0, body)?;
            (FLAG_ENCRYPTED, nonce, Some(sealed))
        }
    };
    let payload = payload.as_deref().unwrap_or(body);
    let payload_len =
        u32::try_from(payload.len()).map_err(|_| CodecError::Encode("payload larger than 4 GiB".into()))?;
    let mut out = Vec::with_capacity(CHUNK_HEADER_LEN + payload.len());
    out.extend_from_slice(&CHUNK_MAGIC);
    out.extend_from_slice(&CHUNK_VERSION.to_le_bytes());
    out.push(codec);
    out.push(flags);
    out.extend_from_slice(&plain_len.to_le_bytes());
    out.extend_from_slice(&payload_len.to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(payload);
    Ok(out)
}

/// Decodes a chunk object fetched as `id`. `max_len` bounds the data (the backup's chunk
/// size); `keys` must be given exactly when the backup is encrypted.
pub fn decode_chunk(
    id: &ChunkId,
    object: &[u8],
    max_len: usize,
    keys: Option<&TenantKeys>,
) -> Result<Vec<u8>, CodecError> {
    let corrupt = |why: String| Err(CodecError::Corrupt(why));
    if object.len() < CHUNK_HEADER_LEN {
        return corrupt(format!("{} bytes, shorter than the {CHUNK_HEADER_LEN}-byte chunk header", object.len()));
    }
    if object[0..8] != CHUNK_MAGIC {
        return corrupt("not a chunk object (bad magic)".into());
    }
    let version = u16::from_le_bytes([object[8], object[9]]);
    if version != CHUNK_VERSION {
        return Err(CodecError::Unsupported(format!(
            "chunk format version {version} (this build reads version {CHUNK_VERSION})"
        )));
    }
    let codec = object[10];
    let flags = object[11];
    let le32 = |at: usize| u32::from_le_bytes([object[at], object[at + 1], object[at + 2], object[at + 3]]);
    let plain_len = le32(12) as usize;
    let payload_len = le32(16) as usize;
    let crc = le32(20);
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&object[24..24 + NONCE_LEN]);
    let payload = &object[CHUNK_HEADER_LEN..];
    if codec != CODEC_STORED && codec != CODEC_ZSTD {
        return corrupt(format!("unknown codec {codec}"));
    }
    if flags & !KNOWN_FLAGS != 0 {
        return corrupt(format!("unknown flags {flags:#04x}"));
    }
    if plain_len > max_len {
        return corrupt(format!("{plain_len} bytes of data, more than the chunk size {max_len}"));
    }
    if payload.len() != payload_len {
        return corrupt(format!("payload of {} bytes, the header says {payload_len}", payload.len()));
    }
    if crc32c::crc32c(payload) != crc {
        return corrupt("payload checksum (crc32c) mismatch".into());
    }
    let encrypted = flags & FLAG_ENCRYPTED != 0;
    let opened;
    let body = match (encrypted, keys) {
        (false, None) => {
            if nonce != [0u8; NONCE_LEN] {
                return corrupt("nonce set on an unencrypted chunk".into());
            }
            payload
        }
        (true, Some(k)) => {
            if payload.len() < TAG_LEN {
                return corrupt("encrypted payload shorter than its tag".into());
            }
            opened = k.open(&nonce, &id.0, payload)?;
            opened.as_slice()
        }
        (true, None) => return Err(CodecError::KeyRequired),
        (false, Some(_)) => return corrupt("not encrypted, but its backup is".into()),
    };
    let data = match codec {
        CODEC_STORED => body.to_vec(),
        // zstd itself accepts an empty input as an empty frame.
        _ if body.is_empty() => return corrupt("empty zstd payload".into()),
        _ => zstd::bulk::decompress(body, plain_len).map_err(|e| CodecError::Corrupt(format!("zstd: {e}")))?,
    };
    if data.len() != plain_len {
        return corrupt(format!("{} bytes of data, the header says {plain_len}", data.len()));
    }
    if ChunkId::of(&data, keys) != *id {
        return corrupt("content does not hash to the chunk id".into());
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAX: usize = 1 << 20;

    fn compressible(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i / 100) as u8).collect()
    }

    fn random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn compressible_data_is_zstd_and_random_is_stored() {
        let data = compressible(65536);
        let id = ChunkId::of(&data, None);
        let obj = encode_chunk(&id, &data, 3, None).unwrap();
        assert_eq!(obj[10], CODEC_ZSTD);
        assert!(obj.len() < data.len() / 4);
        assert_eq!(decode_chunk(&id, &obj, MAX, None).unwrap(), data);

        let data = random(65536, 9);
        let id = ChunkId::of(&data, None);
        let obj = encode_chunk(&id, &data, 3, None).unwrap();
        assert_eq!(obj[10], CODEC_STORED);
        assert_eq!(obj.len(), CHUNK_HEADER_LEN + data.len());
        assert_eq!(decode_chunk(&id, &obj, MAX, None).unwrap(), data);
    }

    #[test]
    fn encrypted_round_trip_and_key_errors() {
        let keys = TenantKeys::new(&[3u8; 32]);
        let data = compressible(10000);
        let id = ChunkId::of(&data, Some(&keys));
        assert_ne!(id, ChunkId::of(&data, None));
        let obj = encode_chunk(&id, &data, 3, Some(&keys)).unwrap();
        assert_eq!(obj[11], FLAG_ENCRYPTED);
        assert_eq!(decode_chunk(&id, &obj, MAX, Some(&keys)).unwrap(), data);
        assert_eq!(decode_chunk(&id, &obj, MAX, None), Err(CodecError::KeyRequired));
        let other = TenantKeys::new(&[4u8; 32]);
        assert_eq!(decode_chunk(&id, &obj, MAX, Some(&other)), Err(CodecError::AuthFailed));
        // The same data under another key has another id.
        assert_ne!(ChunkId::of(&data, Some(&other)), id);
        // An unencrypted chunk where an encrypted one is expected.
        let plain_id = ChunkId::of(&data, None);
        let plain = encode_chunk(&plain_id, &data, 3, None).unwrap();
        assert!(matches!(decode_chunk(&plain_id, &plain, MAX, Some(&keys)), Err(CodecError::Corrupt(_))));
    }

    #[test]
    fn chunk_moved_under_another_id_is_refused() {
        let a = compressible(5000);
        let b = random(5000, 1);
        let (ia, ib) = (ChunkId::of(&a, None), ChunkId::of(&b, None));
        let obj = encode_chunk(&ia, &a, 3, None).unwrap();
        assert!(matches!(decode_chunk(&ib, &obj, MAX, None), Err(CodecError::Corrupt(_))));
        let keys = TenantKeys::new(&[5u8; 32]);
        let (ka, kb) = (ChunkId::of(&a, Some(&keys)), ChunkId::of(&b, Some(&keys)));
        let obj = encode_chunk(&ka, &a, 3, Some(&keys)).unwrap();
        assert_eq!(decode_chunk(&kb, &obj, MAX, Some(&keys)), Err(CodecError::AuthFailed));
    }

    #[test]
    fn data_longer_than_the_chunk_size_is_refused() {
        let data = compressible(8192);
        let id = ChunkId::of(&data, None);
        let obj = encode_chunk(&id, &data, 3, None).unwrap();
        assert!(matches!(decode_chunk(&id, &obj, 4096, None), Err(CodecError::Corrupt(_))));
    }

    #[test]
    fn another_version_is_unsupported() {
        let data = compressible(100);
        let id = ChunkId::of(&data, None);
        let mut obj = encode_chunk(&id, &data, 3, None).unwrap();
        obj[8] = 2;
        assert!(matches!(decode_chunk(&id, &obj, MAX, None), Err(CodecError::Unsupported(_))));
    }

    #[test]
    fn hex_round_trip() {
        let id = ChunkId::of(b"x", None);
        assert_eq!(ChunkId::from_hex(&id.to_hex()), Some(id));
        assert_eq!(ChunkId::from_hex("00"), None);
        assert_eq!(ChunkId::from_hex(&"G".repeat(64)), None);
        assert_eq!(ChunkId::from_hex(&id.to_hex().to_uppercase()), None);
    }

    /// Every single-byte change and every truncation of a chunk object is an error.
    fn assert_every_damage_detected(obj: &[u8], id: &ChunkId, keys: Option<&TenantKeys>) {
        for i in 0..obj.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut bad = obj.to_vec();
                bad[i] ^= flip;
                assert!(decode_chunk(id, &bad, MAX, keys).is_err(), "byte {i} ^ {flip:#x} not detected");
            }
        }
        for len in 0..obj.len() {
            assert!(decode_chunk(id, &obj[..len], MAX, keys).is_err(), "truncation to {len} not detected");
        }
        let mut longer = obj.to_vec();
        longer.push(0);
        assert!(decode_chunk(id, &longer, MAX, keys).is_err());
    }

    #[test]
    fn every_corruption_and_truncation_is_detected() {
        let keys = TenantKeys::new(&[6u8; 32]);
        for data in [compressible(3000), random(700, 3), Vec::new()] {
            let id = ChunkId::of(&data, None);
            assert_every_damage_detected(&encode_chunk(&id, &data, 3, None).unwrap(), &id, None);
            let id = ChunkId::of(&data, Some(&keys));
            assert_every_damage_detected(&encode_chunk(&id, &data, 3, Some(&keys)).unwrap(), &id, Some(&keys));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn round_trip(data in proptest::collection::vec(any::<u8>(), 0..20000), runs in any::<bool>(), enc in any::<bool>()) {
            let data = if runs { data.iter().map(|b| b & 3).collect() } else { data };
            let keys = enc.then(|| TenantKeys::new(&[9u8; 32]));
            let id = ChunkId::of(&data, keys.as_ref());
            let obj = encode_chunk(&id, &data, 3, keys.as_ref()).unwrap();
            prop_assert_eq!(decode_chunk(&id, &obj, MAX, keys.as_ref()).unwrap(), data);
        }

        #[test]
        fn random_bytes_never_panic(obj in proptest::collection::vec(any::<u8>(), 0..200), with_header in any::<bool>()) {
            let mut obj = obj;
            if with_header && obj.len() >= 10 {
                obj[..8].copy_from_slice(&CHUNK_MAGIC);
                obj[8..10].copy_from_slice(&CHUNK_VERSION.to_le_bytes());
            }
            let id = ChunkId([0u8; 32]);
            prop_assert!(decode_chunk(&id, &obj, MAX, None).is_err());
        }
    }
}
