//! The fixed index of a backup (`indexes/<backup-id>`, magic `EVSFIDX\x01`).
//!
//! The format is canonical, so:
//! * raw: `decode_index` never panics, and an index it accepts re-encodes to exactly the input
//!   bytes. The first input byte selects whether the trailing CRC32C is recomputed over the
//!   rest first (so the fuzzer gets past the checksum to the field checks, as a hostile writer
//!   could), the rest is the object.
//! * structured (`arbitrary`): an index built from the input round-trips, and every single-byte
//!   change and every truncation of its encoding is refused.

#![no_main]

use evs_backup::fixed_index::{chunk_count, validate_chunk_size, INDEX_TRAILER_LEN, MIN_CHUNK_SIZE};
use evs_backup::{decode_index, encode_index, ChunkId, FixedIndex};
use libfuzzer_sys::arbitrary::{self, Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct ArbIndex {
    /// chunk size = 64 KiB << (shift % 11): 64 KiB .. 64 MiB.
    shift: u8,
    /// Chunks in the volume (bounded below).
    chunks: u16,
    /// Bytes the last chunk is short by (modulo the chunk size).
    short_by: u32,
    /// Data chunks, by position modulo the count.
    data: Vec<(u16, [u8; 32])>,
    /// A byte to damage and how.
    damage_at: u32,
    damage_xor: u8,
    cut: u32,
}

fn reseal(bytes: &mut [u8]) {
    if bytes.len() >= INDEX_TRAILER_LEN {
        let n = bytes.len() - INDEX_TRAILER_LEN;
        let crc = crc32c::crc32c(&bytes[..n]);
        bytes[n..].copy_from_slice(&crc.to_le_bytes());
    }
}

fn raw(data: &[u8]) {
    let Some((&mode, object)) = data.split_first() else { return };
    let mut object = object.to_vec();
    if mode & 1 != 0 {
        reseal(&mut object);
    }
    if let Ok(ix) = decode_index(&object) {
        assert!(validate_chunk_size(ix.chunk_size).is_ok(), "accepted chunk size {}", ix.chunk_size);
        assert_eq!(ix.entries.len() as u64, chunk_count(ix.volume_size, ix.chunk_size));
        assert_eq!(encode_index(&ix), object, "an accepted index does not re-encode to its bytes");
    }
}

fn structured(data: &[u8]) {
    let Ok(a) = ArbIndex::arbitrary(&mut Unstructured::new(data)) else { return };
    let chunk_size = MIN_CHUNK_SIZE << (a.shift % 11);
    let chunks = u64::from(a.chunks % 4096);
    let short = u64::from(a.short_by) % u64::from(chunk_size);
    let volume_size = (chunks * u64::from(chunk_size)).saturating_sub(if chunks > 0 { short } else { 0 });
    let mut ix = FixedIndex::zeroed(chunk_size, volume_size);
    assert_eq!(ix.entries.len() as u64, chunks);
    if chunks > 0 {
        for (at, id) in &a.data {
            ix.entries[usize::from(*at) % chunks as usize] = Some(ChunkId(*id));
        }
    }
    let bytes = encode_index(&ix);
    assert_eq!(decode_index(&bytes).as_ref(), Ok(&ix), "round trip");

    let mut bad = bytes.clone();
    let at = a.damage_at as usize % bad.len();
    let xor = a.damage_xor.max(1);
    bad[at] ^= xor;
    assert!(decode_index(&bad).is_err(), "byte {at} ^ {xor:#04x} not detected");
    let cut = a.cut as usize % bytes.len();
    assert!(decode_index(&bytes[..cut]).is_err(), "truncation to {cut} not detected");
}

fuzz_target!(|data: &[u8]| {
    raw(data);
    structured(data);
});
