//! The changed-block stream's frames. A batch of frames is their concatenation; the daemon
//! sends batches as the `frames` bytes of `ApplyMessage`.
//!
//! Frame, version 1, little-endian:
//!
//! ```text
//! offset size field
//! 0      4    magic b"EVRF"
//! 4      1    version (1)
//! 5      1    kind: 1 = data, 2 = zero (the range was discarded: reads as zeros)
//! 6      2    pair: index into the cycle's pairs
//! 8      8    offset in the volume (bytes, a multiple of 4096)
//! 16     4    length of the volume range (bytes, 1 .. MAX_FRAME_DATA)
//! 20     4    payload length (bytes stored; 0 for a zero frame)
//! 24     1    codec: 0 = stored, 1 = zstd
//! 25     3    reserved, zero
//! 28     4    CRC32C of bytes 0..28 and then the payload as stored
//! 32     ..   payload: the range's bytes, zstd-compressed or stored
//! ```
//!
//! Decoding checks everything (magic, version, kind, alignment, lengths, the CRC, that zstd
//! gives exactly `length` bytes) and never trusts a length before it is bounded, so a
//! truncated, corrupted or hostile stream is an error, never a panic or a wrong write.

use thiserror::Error;

pub const MAGIC: [u8; 4] = *b"EVRF";
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 32;
/// Largest volume range one frame describes.
pub const MAX_FRAME_DATA: u32 = 1 << 20;
/// Alignment of offsets (the block store's block).
pub const ALIGN: u64 = 4096;
/// Most bytes of data the data frames of one batch may decode to. The target holds a whole
/// decoded batch before writing any of it, and a zstd payload of a few dozen bytes can
/// describe a full `MAX_FRAME_DATA` range: without this bound a 2 MiB batch of such frames
/// would decode to tens of GiB. The source cuts its batches before this (see `cycle.rs`).
pub const MAX_BATCH_DATA: usize = 64 << 20;

const KIND_DATA: u8 = 1;
const KIND_ZERO: u8 = 2;
const CODEC_STORED: u8 = 0;
const CODEC_ZSTD: u8 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    Data,
    Zero,
}

/// A decoded frame; `data` is the volume range's bytes (empty for a zero frame).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub pair: u16,
    pub offset: u64,
    pub len: u32,
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    #[error("frame at byte {at}: truncated ({need} bytes needed, {have} left)")]
    Truncated { at: usize, need: usize, have: usize },
    #[error("frame at byte {at}: {why}")]
    Invalid { at: usize, why: String },
    #[error("frame at byte {at}: CRC32C mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Crc { at: usize, stored: u32, computed: u32 },
    #[error(
        "frame at byte {at}: the batch's data frames describe more than {max} bytes (this one would make it {total})"
    )]
    BatchTooLarge { at: usize, total: usize, max: usize },
}

/// Appends one frame to `out`. Data is compressed with zstd at `level` unless that does not
/// shrink it.
pub fn encode_frame(
    out: &mut Vec<u8>,
    kind: FrameKind,
    pair: u16,
    offset: u64,
    data_or_len: FrameBody<'_>,
    level: i32,
) {
    let (kind_byte, len, codec, payload): (u8, u32, u8, std::borrow::Cow<'_, [u8]>) = match (kind, data_or_len) {
        (FrameKind::Zero, FrameBody::Len(len)) => (KIND_ZERO, len, CODEC_STORED, std::borrow::Cow::Borrowed(&[])),
        (FrameKind::Data, FrameBody::Data(d)) => {
            let packed =
                if looks_compressible(d, level) { compress(d, level).filter(|c| c.len() < d.len()) } else { None };
            match packed {
                Some(c) => (KIND_DATA, d.len() as u32, CODEC_ZSTD, std::borrow::Cow::Owned(c)),
                None => (KIND_DATA, d.len() as u32, CODEC_STORED, std::borrow::Cow::Borrowed(d)),
            }
        }
        _ => panic!("encode_frame: a data frame carries data, a zero frame a length"),
    };
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(kind_byte);
    out.extend_from_slice(&pair.to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.push(codec);
    out.extend_from_slice(&[0; 3]);
    let header_start = out.len() - 28;
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out[header_start..]), &payload);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&payload);
}

/// Frames at least this large are probed before zstd runs over them whole.
const PROBE_MIN: usize = 64 * 1024;
/// Bytes of the probe, from the middle of the frame.
const PROBE_LEN: usize = 8 * 1024;

/// Whether `d` is worth compressing: a sample from its middle must shrink by at least 1/32.
/// Random or already compressed data (most of what an initial sync of a used disk moves)
/// then costs a few microseconds per MiB instead of a full zstd pass that gives nothing.
fn looks_compressible(d: &[u8], level: i32) -> bool {
    if d.len() < PROBE_MIN {
        return true;
    }
    let mid = d.len() / 2 - PROBE_LEN / 2;
    let sample = &d[mid..mid + PROBE_LEN];
    compress(sample, level).is_some_and(|c| c.len() < PROBE_LEN - PROBE_LEN / 32)
}

thread_local! {
    /// One zstd context per encoding thread: making one per frame costs more than a small
    /// frame's compression.
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
}

fn compress(d: &[u8], level: i32) -> Option<Vec<u8>> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().map(|(l, _)| *l) != Some(level) {
            *c = Some((level, zstd::bulk::Compressor::new(level).ok()?));
        }
        c.as_mut()?.1.compress(d).ok()
    })
}

/// What a frame carries when encoded.
#[derive(Debug, Clone, Copy)]
pub enum FrameBody<'a> {
    Data(&'a [u8]),
    Len(u32),
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Decodes a batch of frames; their data may total at most [`MAX_BATCH_DATA`] bytes.
pub fn decode_frames(mut buf: &[u8]) -> Result<Vec<Frame>, FrameError> {
    let mut out = Vec::new();
    let mut at = 0usize;
    let mut data = 0usize;
    while !buf.is_empty() {
        let (frame, used) = decode_one(buf, at, data)?;
        data += frame.data.len();
        out.push(frame);
        buf = &buf[used..];
        at += used;
    }
    Ok(out)
}

/// Decodes the frame at the start of `b` (at byte `at` of its batch, after `data` bytes of
/// data in the batch's earlier frames).
fn decode_one(b: &[u8], at: usize, data: usize) -> Result<(Frame, usize), FrameError> {
    let invalid = |why: String| FrameError::Invalid { at, why };
    if b.len() < HEADER_LEN {
        return Err(FrameError::Truncated { at, need: HEADER_LEN, have: b.len() });
    }
    if b[0..4] != MAGIC {
        return Err(invalid("bad magic".into()));
    }
    if b[4] != VERSION {
        return Err(invalid(format!("unknown version {}", b[4])));
    }
    let kind = match b[5] {
        KIND_DATA => FrameKind::Data,
        KIND_ZERO => FrameKind::Zero,
        k => return Err(invalid(format!("unknown kind {k}"))),
    };
    let pair = u16::from_le_bytes([b[6], b[7]]);
    let offset = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
    let len = u32_at(b, 16);
    let payload_len = u32_at(b, 20) as usize;
    let codec = b[24];
    if b[25..28] != [0, 0, 0] {
        return Err(invalid("reserved bytes are not zero".into()));
    }
    let crc = u32_at(b, 28);
    if offset % ALIGN != 0 {
        return Err(invalid(format!("offset {offset} is not a multiple of {ALIGN}")));
    }
    if len == 0 || len > MAX_FRAME_DATA {
        return Err(invalid(format!("range length {len} is not 1 to {MAX_FRAME_DATA}")));
    }
    if offset.checked_add(u64::from(len)).is_none() {
        return Err(invalid("range past the end of the address space".into()));
    }
    match kind {
        FrameKind::Zero if payload_len != 0 || codec != CODEC_STORED => {
            return Err(invalid("a zero frame carries a payload".into()))
        }
        FrameKind::Data if payload_len > len as usize + 1024 => {
            return Err(invalid(format!("payload of {payload_len} bytes for a range of {len}")))
        }
        // Before anything is allocated or decompressed.
        FrameKind::Data if data + len as usize > MAX_BATCH_DATA => {
            return Err(FrameError::BatchTooLarge { at, total: data + len as usize, max: MAX_BATCH_DATA })
        }
        _ => {}
    }
    let end = HEADER_LEN + payload_len;
    if b.len() < end {
        return Err(FrameError::Truncated { at, need: end, have: b.len() });
    }
    let payload = &b[HEADER_LEN..end];
    let computed = crc32c::crc32c_append(crc32c::crc32c(&b[..28]), payload);
    if computed != crc {
        return Err(FrameError::Crc { at, stored: crc, computed });
    }
    let data = match (kind, codec) {
        (FrameKind::Zero, _) => Vec::new(),
        (FrameKind::Data, CODEC_STORED) if payload_len == len as usize => payload.to_vec(),
        (FrameKind::Data, CODEC_STORED) => return Err(invalid("a stored payload of the wrong length".into())),
        (FrameKind::Data, CODEC_ZSTD) => {
            let d = zstd::bulk::decompress(payload, len as usize).map_err(|e| invalid(format!("zstd: {e}")))?;
            if d.len() != len as usize {
                return Err(invalid(format!("zstd gave {} bytes, the frame says {len}", d.len())));
            }
            d
        }
        (FrameKind::Data, c) => return Err(invalid(format!("unknown codec {c}"))),
    };
    Ok((Frame { kind, pair, offset, len, data }, end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn batch() -> Vec<u8> {
        let mut b = Vec::new();
        encode_frame(&mut b, FrameKind::Data, 0, 4096, FrameBody::Data(&vec![7u8; 8192]), 3);
        let noise: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        encode_frame(&mut b, FrameKind::Data, 1, 0, FrameBody::Data(&noise), 3);
        encode_frame(&mut b, FrameKind::Zero, 1, 1 << 20, FrameBody::Len(65536), 3);
        b
    }

    #[test]
    fn random_data_is_stored_and_text_compressed() {
        // A xorshift stream: incompressible.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let random: Vec<u8> = (0..1 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let text: Vec<u8> =
            b"the quick brown fox jumps over the lazy dog. ".iter().cycle().take(1 << 20).copied().collect();
        for (data, want_codec) in [(&random, CODEC_STORED), (&text, CODEC_ZSTD)] {
            let mut b = Vec::new();
            encode_frame(&mut b, FrameKind::Data, 0, 0, FrameBody::Data(data), 1);
            assert_eq!(b[24], want_codec);
            if want_codec == CODEC_STORED {
                assert_eq!(b.len(), HEADER_LEN + data.len());
            } else {
                assert!(b.len() < HEADER_LEN + data.len() / 10, "{}", b.len());
            }
            assert_eq!(decode_frames(&b).unwrap()[0].data, *data);
        }
    }

    #[test]
    fn round_trip() {
        let f = decode_frames(&batch()).unwrap();
        assert_eq!(f.len(), 3);
        assert_eq!((f[0].kind, f[0].pair, f[0].offset, f[0].len), (FrameKind::Data, 0, 4096, 8192));
        assert_eq!(f[0].data, vec![7u8; 8192]);
        assert_eq!(f[1].data.len(), 4096);
        assert_eq!((f[2].kind, f[2].offset, f[2].len, f[2].data.len()), (FrameKind::Zero, 1 << 20, 65536, 0));
        // Compressible data is sent compressed.
        assert!(batch().len() < 8192 + 4096 + 3 * HEADER_LEN);
        assert_eq!(decode_frames(&[]).unwrap(), vec![]);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let b = batch();
        for cut in 0..b.len() {
            let r = decode_frames(&b[..cut]);
            // A cut exactly between frames decodes the frames before it.
            if let Ok(f) = r {
                assert!(f.len() < 3, "a cut at {cut} decoded all frames");
            }
        }
        assert!(decode_frames(&b[..b.len() - 1]).is_err());
    }

    #[test]
    fn every_single_byte_corruption_is_detected() {
        let b = batch();
        let good = decode_frames(&b).unwrap();
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x41;
            match decode_frames(&c) {
                Err(_) => {}
                Ok(f) => panic!("a flipped byte {i} decoded as {:?} (was {:?})", f.len(), good.len()),
            }
        }
    }

    /// Found by review while writing the `replication_stream` fuzz target (libFuzzer's inputs
    /// are too short to reach it): a batch of highly compressible frames decoded to far more
    /// memory than it occupies. A frame of 1 MiB of 0x01 takes under 128 bytes, so a 2 MiB
    /// batch of them (what the source sends, up to 16 MiB what the target accepts) decoded to
    /// tens of GiB; now the frame that passes MAX_BATCH_DATA is refused before it is
    /// decompressed.
    #[test]
    fn a_batch_decoding_to_more_than_max_batch_data_is_refused() {
        let range = vec![1u8; MAX_FRAME_DATA as usize];
        let mut b = Vec::new();
        let frames = MAX_BATCH_DATA / MAX_FRAME_DATA as usize;
        for i in 0..frames as u64 {
            encode_frame(&mut b, FrameKind::Data, 0, i * u64::from(MAX_FRAME_DATA), FrameBody::Data(&range), 1);
        }
        let exactly_max = b.len();
        assert!(exactly_max < 128 * frames, "{exactly_max} bytes for {frames} frames: not a bomb");
        // Zero frames carry no data: they do not count.
        encode_frame(&mut b, FrameKind::Zero, 0, 1 << 40, FrameBody::Len(MAX_FRAME_DATA), 1);
        let f = decode_frames(&b).unwrap();
        assert_eq!(f.len(), frames + 1);
        assert_eq!(f.iter().map(|f| f.data.len()).sum::<usize>(), MAX_BATCH_DATA);
        // One more byte of data is one too many.
        let before = b.len();
        encode_frame(&mut b, FrameKind::Data, 1, 0, FrameBody::Data(&[7]), 1);
        assert_eq!(
            decode_frames(&b),
            Err(FrameError::BatchTooLarge { at: before, total: MAX_BATCH_DATA + 1, max: MAX_BATCH_DATA })
        );
        // And the bytes of the original finding: the 71st 1 MiB frame.
        let mut bomb = b[..exactly_max].to_vec();
        encode_frame(&mut bomb, FrameKind::Data, 0, 1 << 30, FrameBody::Data(&range), 1);
        assert!(matches!(decode_frames(&bomb), Err(FrameError::BatchTooLarge { .. })));
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_frames(&bytes);
        }

        #[test]
        fn data_round_trips(data in proptest::collection::vec(any::<u8>(), 1..20000), blocks in 0u64..1000, pair in any::<u16>()) {
            let mut b = Vec::new();
            encode_frame(&mut b, FrameKind::Data, pair, blocks * 4096, FrameBody::Data(&data), 1);
            let f = decode_frames(&b).unwrap();
            prop_assert_eq!(f.len(), 1);
            prop_assert_eq!(&f[0].data, &data);
            prop_assert_eq!(f[0].pair, pair);
        }
    }
}
