//! The fixed index of one backup: for every chunk of the volume, "zero" or the id of its data.
//! Every index is full (incremental forever): a backup restores from its own index alone, and
//! deleting a backup never breaks another. Pure functions, no I/O.
//!
//! Object layout (little-endian), stored at `indexes/<backup-id>`:
//!
//! ```text
//! 0   8     magic b"EVSFIDX\x01"
//! 8   4     version (1)
//! 12  4     chunk_size (bytes, power of two, 64 KiB .. 64 MiB)
//! 16  8     volume size (bytes)
//! 24  8     chunk count n = ceil(size / chunk_size)
//! 32  33*n  per chunk: kind u8 (0 = zero: never written or all zeros, 1 = data) + 32-byte id
//!           (zeros for kind 0)
//! ..  4     crc32c of everything before
//! ```

use crate::chunk::ChunkId;
use crate::error::CodecError;

pub const INDEX_MAGIC: [u8; 8] = *b"EVSFIDX\x01";
pub const INDEX_VERSION: u32 = 1;
pub const INDEX_HEADER_LEN: usize = 32;
pub const INDEX_ENTRY_LEN: usize = 33;
pub const INDEX_TRAILER_LEN: usize = 4;
pub const KIND_ZERO: u8 = 0;
pub const KIND_DATA: u8 = 1;
pub const MIN_CHUNK_SIZE: u32 = 64 << 10;
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FixedIndex {
    pub chunk_size: u32,
    pub volume_size: u64,
    /// One per chunk: `None` reads as zeros.
    pub entries: Vec<Option<ChunkId>>,
}

/// Checks a chunk size: a power of two from 64 KiB to 64 MiB.
pub fn validate_chunk_size(chunk_size: u32) -> Result<(), String> {
    if !chunk_size.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        return Err(format!("chunk size {chunk_size} is not a power of two from 64 KiB to 64 MiB"));
    }
    Ok(())
}

/// Number of chunks of a volume of `size` bytes.
pub fn chunk_count(size: u64, chunk_size: u32) -> u64 {
    size.div_ceil(u64::from(chunk_size))
}

/// Length of chunk `index` (the last one may be short; 0 past the end).
pub fn chunk_len(size: u64, chunk_size: u32, index: u64) -> u64 {
    let start = index.saturating_mul(u64::from(chunk_size));
    size.saturating_sub(start).min(u64::from(chunk_size))
}

impl FixedIndex {
    /// An index of `volume_size` bytes whose chunks are all zero.
    pub fn zeroed(chunk_size: u32, volume_size: u64) -> FixedIndex {
        let n = chunk_count(volume_size, chunk_size) as usize;
        FixedIndex { chunk_size, volume_size, entries: vec![None; n] }
    }

    pub fn chunk_len(&self, index: u64) -> u64 {
        chunk_len(self.volume_size, self.chunk_size, index)
    }
}

pub fn encode_index(index: &FixedIndex) -> Vec<u8> {
    let n = index.entries.len();
    let mut out = Vec::with_capacity(INDEX_HEADER_LEN + n * INDEX_ENTRY_LEN + INDEX_TRAILER_LEN);
    out.extend_from_slice(&INDEX_MAGIC);
    out.extend_from_slice(&INDEX_VERSION.to_le_bytes());
    out.extend_from_slice(&index.chunk_size.to_le_bytes());
    out.extend_from_slice(&index.volume_size.to_le_bytes());
    out.extend_from_slice(&(n as u64).to_le_bytes());
    for e in &index.entries {
        match e {
            None => {
                out.push(KIND_ZERO);
                out.extend_from_slice(&[0u8; 32]);
            }
            Some(id) => {
                out.push(KIND_DATA);
                out.extend_from_slice(&id.0);
            }
        }
    }
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

pub fn decode_index(bytes: &[u8]) -> Result<FixedIndex, CodecError> {
    let corrupt = |why: String| Err(CodecError::Corrupt(why));
    if bytes.len() < INDEX_HEADER_LEN + INDEX_TRAILER_LEN {
        return corrupt(format!("{} bytes, shorter than an empty index", bytes.len()));
    }
    if bytes[0..8] != INDEX_MAGIC {
        return corrupt("not an index (bad magic)".into());
    }
    let (body, trailer) = bytes.split_at(bytes.len() - INDEX_TRAILER_LEN);
    let crc = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
    if crc32c::crc32c(body) != crc {
        return corrupt("checksum (crc32c) mismatch".into());
    }
    let le32 = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let le64 = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let version = le32(8);
    if version != INDEX_VERSION {
        return Err(CodecError::Unsupported(format!(
            "index format version {version} (this build reads version {INDEX_VERSION})"
        )));
    }
    let chunk_size = le32(12);
    let volume_size = le64(16);
    let n = le64(24);
    validate_chunk_size(chunk_size).map_err(CodecError::Corrupt)?;
    if n != chunk_count(volume_size, chunk_size) {
        return corrupt(format!("{n} chunks for a volume of {volume_size} bytes in chunks of {chunk_size}"));
    }
    let expected = usize::try_from(n)
        .ok()
        .and_then(|n| n.checked_mul(INDEX_ENTRY_LEN))
        .and_then(|e| e.checked_add(INDEX_HEADER_LEN + INDEX_TRAILER_LEN));
    if expected != Some(bytes.len()) {
        return corrupt(format!("{} bytes, {n} chunks need {}", bytes.len(), n.saturating_mul(33).saturating_add(36)));
    }
    let mut entries = Vec::with_capacity(n as usize);
    for (i, e) in body[INDEX_HEADER_LEN..].chunks_exact(INDEX_ENTRY_LEN).enumerate() {
        let id: [u8; 32] = e[1..].try_into().expect("32 bytes");
        entries.push(match e[0] {
            KIND_ZERO if id == [0u8; 32] => None,
            KIND_ZERO => return corrupt(format!("chunk {i}: a zero entry with an id")),
            KIND_DATA => Some(ChunkId(id)),
            kind => return corrupt(format!("chunk {i}: unknown kind {kind}")),
        });
    }
    Ok(FixedIndex { chunk_size, volume_size, entries })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> FixedIndex {
        let mut ix = FixedIndex::zeroed(MIN_CHUNK_SIZE, 5 * u64::from(MIN_CHUNK_SIZE) + 512);
        ix.entries[1] = Some(ChunkId::of(b"a", None));
        ix.entries[5] = Some(ChunkId::of(b"b", None));
        ix
    }

    #[test]
    fn lengths() {
        assert_eq!(chunk_count(0, MIN_CHUNK_SIZE), 0);
        assert_eq!(chunk_count(1, MIN_CHUNK_SIZE), 1);
        assert_eq!(chunk_count(2 * 65536, MIN_CHUNK_SIZE), 2);
        assert_eq!(chunk_len(65536 + 512, MIN_CHUNK_SIZE, 0), 65536);
        assert_eq!(chunk_len(65536 + 512, MIN_CHUNK_SIZE, 1), 512);
        assert_eq!(chunk_len(65536 + 512, MIN_CHUNK_SIZE, 2), 0);
        assert!(validate_chunk_size(1 << 20).is_ok());
        for bad in [0, 4096, 65537, 128 << 20, 3 << 20] {
            assert!(validate_chunk_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn round_trip_and_every_damage_detected() {
        let ix = sample();
        let bytes = encode_index(&ix);
        assert_eq!(bytes.len(), 32 + 6 * 33 + 4);
        assert_eq!(decode_index(&bytes).unwrap(), ix);
        for i in 0..bytes.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut bad = bytes.clone();
                bad[i] ^= flip;
                assert!(decode_index(&bad).is_err(), "byte {i} ^ {flip:#x} not detected");
            }
        }
        for len in 0..bytes.len() {
            assert!(decode_index(&bytes[..len]).is_err(), "truncation to {len} not detected");
        }
    }

    /// Damage that keeps the checksum right (as a hostile writer could) is still refused.
    #[test]
    fn inconsistent_fields_with_a_valid_checksum_are_refused() {
        let reseal = |mut b: Vec<u8>| {
            let n = b.len() - 4;
            let crc = crc32c::crc32c(&b[..n]);
            b[n..].copy_from_slice(&crc.to_le_bytes());
            b
        };
        let good = encode_index(&sample());
        let mut b = good.clone();
        b[24] = 7; // chunk count
        assert!(decode_index(&reseal(b)).is_err());
        let mut b = good.clone();
        b[12..16].copy_from_slice(&3000u32.to_le_bytes()); // chunk size
        assert!(decode_index(&reseal(b)).is_err());
        let mut b = good.clone();
        b[32] = 2; // kind
        assert!(decode_index(&reseal(b)).is_err());
        let mut b = good.clone();
        b[33] = 1; // id in a zero entry
        assert!(decode_index(&reseal(b)).is_err());
        let mut b = good;
        b[8] = 2; // version
        assert!(matches!(decode_index(&reseal(b)), Err(CodecError::Unsupported(_))));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn round_trip(shift in 16u32..=26, size in 0u64..(1 << 26), data in proptest::collection::vec(any::<bool>(), 0..64)) {
            let chunk_size = 1u32 << shift;
            let mut ix = FixedIndex::zeroed(chunk_size, size);
            for (i, e) in ix.entries.iter_mut().enumerate() {
                if data.get(i).copied().unwrap_or(false) {
                    *e = Some(ChunkId::of(&i.to_le_bytes(), None));
                }
            }
            prop_assert_eq!(decode_index(&encode_index(&ix)).unwrap(), ix);
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_index(&bytes);
        }
    }
}
