//! Chunk objects (`chunks/<2 hex>/<64 hex id>`, magic `EVSCHNK\x01`), with and without a
//! tenant key.
//!
//! * raw: the input is `mode, key byte, 32-byte id, object`. `mode` bit 0: decode with the
//!   tenant key made of the key byte; bit 1: recompute the header's CRC32C of the payload first
//!   (to get past the checksum to zstd, the GCM tag and the hash); bits 2-3: the chunk size
//!   bound. `decode_chunk` never panics, and whatever it accepts is within the bound and
//!   hashes to the id it was fetched under.
//! * structured (`arbitrary`): data encoded with or without a key decodes back to itself;
//!   one damaged byte, a truncation, another key, no key, or another id is an error.

#![no_main]

use evs_backup::chunk::CHUNK_HEADER_LEN;
use evs_backup::{decode_chunk, encode_chunk, ChunkId, CodecError, TenantKeys};
use libfuzzer_sys::arbitrary::{self, Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;

const BOUNDS: [usize; 4] = [0, 4096, 64 << 10, 1 << 20];

#[derive(Arbitrary, Debug)]
struct ArbChunk {
    data: Vec<u8>,
    /// Replace the data by runs of few values (compressible: the zstd codec).
    runs: bool,
    key: Option<[u8; 32]>,
    level: u8,
    damage_at: u32,
    damage_xor: u8,
    cut: u32,
    other_key: [u8; 32],
}

fn raw(data: &[u8]) {
    if data.len() < 34 {
        return;
    }
    let (mode, key_byte) = (data[0], data[1]);
    let id = ChunkId(data[2..34].try_into().expect("32 bytes"));
    let mut object = data[34..].to_vec();
    if mode & 2 != 0 && object.len() >= CHUNK_HEADER_LEN {
        let crc = crc32c::crc32c(&object[CHUNK_HEADER_LEN..]);
        object[20..24].copy_from_slice(&crc.to_le_bytes());
    }
    let keys = (mode & 1 != 0).then(|| TenantKeys::new(&[key_byte; 32]));
    let max_len = BOUNDS[usize::from(mode >> 2) & 3];
    if let Ok(plain) = decode_chunk(&id, &object, max_len, keys.as_ref()) {
        assert!(plain.len() <= max_len, "{} bytes accepted under a bound of {max_len}", plain.len());
        assert_eq!(ChunkId::of(&plain, keys.as_ref()), id, "accepted data that is not the id's");
    }
}

fn structured(data: &[u8]) {
    let Ok(a) = ArbChunk::arbitrary(&mut Unstructured::new(data)) else { return };
    let plain: Vec<u8> = if a.runs { a.data.iter().map(|b| b & 3).collect() } else { a.data };
    let keys = a.key.map(|k| TenantKeys::new(&k));
    let keys = keys.as_ref();
    let id = ChunkId::of(&plain, keys);
    let level = i32::from(a.level % 4);
    let object = encode_chunk(&id, &plain, level, keys).expect("encode");
    let max = plain.len();
    assert_eq!(decode_chunk(&id, &object, max, keys).as_ref(), Ok(&plain), "round trip");
    if max > 0 {
        assert!(decode_chunk(&id, &object, max - 1, keys).is_err(), "data over the chunk size accepted");
    }

    let mut bad = object.clone();
    let at = a.damage_at as usize % bad.len();
    let xor = a.damage_xor.max(1);
    bad[at] ^= xor;
    assert!(decode_chunk(&id, &bad, max, keys).is_err(), "byte {at} ^ {xor:#04x} not detected");
    let cut = a.cut as usize % object.len();
    assert!(decode_chunk(&id, &object[..cut], max, keys).is_err(), "truncation to {cut} not detected");
    let mut longer = object.clone();
    longer.push(a.damage_xor);
    assert!(decode_chunk(&id, &longer, max, keys).is_err(), "a byte appended not detected");

    match keys {
        Some(k) => {
            assert_eq!(decode_chunk(&id, &object, max, None), Err(CodecError::KeyRequired));
            let other = TenantKeys::new(&a.other_key);
            if other.fingerprint() != k.fingerprint() {
                assert_eq!(decode_chunk(&id, &object, max, Some(&other)), Err(CodecError::AuthFailed));
            }
        }
        None => {
            let k = TenantKeys::new(&a.other_key);
            assert!(decode_chunk(&id, &object, max, Some(&k)).is_err(), "a plain chunk decoded with a key");
        }
    }
    let mut other_id = id;
    other_id.0[at % 32] ^= xor;
    assert!(decode_chunk(&other_id, &object, max, keys).is_err(), "a chunk decoded under another id");
}

fuzz_target!(|data: &[u8]| {
    raw(data);
    structured(data);
});
