//! The changed-block stream as it arrives from the peer AZ: a batch of frames (`EVRF`), decoded
//! and applied to the replicas.
//!
//! * raw: the first input byte selects whether each frame's CRC32C is recomputed first (so the
//!   fuzzer reaches the length, alignment and zstd checks); the rest is the batch.
//!   `decode_frames` never panics; every frame it accepts is well-formed and re-encodes to a
//!   frame that decodes equal, and a batch never decodes to more than `MAX_BATCH_DATA`.
//!   `apply_frames` on two in-memory replicas writes exactly the decoded frames, each inside
//!   its replica, or, when a frame is bad, nothing at all.
//! * structured (`arbitrary`): frames built from the input encode and decode back equal.

#![no_main]

use std::io;
use std::sync::Mutex;

use evs_replicator::frame::{FrameBody, ALIGN, HEADER_LEN, MAX_BATCH_DATA, MAX_FRAME_DATA};
use evs_replicator::{apply_frames, decode_frames, encode_frame, ApplyError, Frame, FrameKind, ReplicaSink};
use libfuzzer_sys::arbitrary::{self, Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;

/// Replica sizes of pairs 0 and 1.
const SIZES: [u64; 2] = [4 << 20, 64 << 10];

#[derive(Debug, PartialEq, Eq)]
enum Op {
    Write { pair: u16, offset: u64, data: Vec<u8> },
    Zero { pair: u16, offset: u64, len: u64 },
}

#[derive(Default)]
struct Recorder(Mutex<Vec<Op>>);

impl ReplicaSink for Recorder {
    fn size(&self, pair: u16) -> Option<u64> {
        SIZES.get(usize::from(pair)).copied()
    }
    fn write(&self, pair: u16, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.lock().unwrap().push(Op::Write { pair, offset, data: data.to_vec() });
        Ok(())
    }
    fn zero(&self, pair: u16, offset: u64, len: u64) -> io::Result<()> {
        self.0.lock().unwrap().push(Op::Zero { pair, offset, len });
        Ok(())
    }
}

/// Recomputes the CRC of every frame whose header is complete (payload cut at the end).
fn reseal(b: &mut [u8]) {
    let mut at = 0;
    while b.len() - at >= HEADER_LEN {
        let payload_len = u32::from_le_bytes(b[at + 20..at + 24].try_into().unwrap()) as usize;
        let end = (at + HEADER_LEN).saturating_add(payload_len).min(b.len());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&b[at..at + 28]), &b[at + HEADER_LEN..end]);
        b[at + 28..at + 32].copy_from_slice(&crc.to_le_bytes());
        at = end;
    }
}

fn check_frame(f: &Frame) {
    assert_eq!(f.offset % ALIGN, 0, "unaligned offset accepted: {}", f.offset);
    assert!(f.len >= 1 && f.len <= MAX_FRAME_DATA, "length {} accepted", f.len);
    assert!(f.offset.checked_add(u64::from(f.len)).is_some());
    match f.kind {
        FrameKind::Data => assert_eq!(f.data.len(), f.len as usize, "data frame of the wrong size"),
        FrameKind::Zero => assert!(f.data.is_empty(), "zero frame with data"),
    }
}

fn encode(f: &Frame, level: i32) -> Vec<u8> {
    let mut out = Vec::new();
    let body = match f.kind {
        FrameKind::Data => FrameBody::Data(&f.data),
        FrameKind::Zero => FrameBody::Len(f.len),
    };
    encode_frame(&mut out, f.kind, f.pair, f.offset, body, level);
    out
}

fn raw(data: &[u8]) {
    let Some((&mode, batch)) = data.split_first() else { return };
    let mut batch = batch.to_vec();
    if mode & 1 != 0 {
        reseal(&mut batch);
    }
    let decoded = decode_frames(&batch);
    if let Ok(frames) = &decoded {
        let data: usize = frames.iter().map(|f| f.data.len()).sum();
        assert!(data <= MAX_BATCH_DATA, "a batch decoded to {data} bytes");
        for f in frames {
            check_frame(f);
            assert_eq!(decode_frames(&encode(f, 1)).as_deref(), Ok(std::slice::from_ref(f)), "re-encode round trip");
        }
    }

    let sink = Recorder::default();
    let applied = apply_frames(&batch, &sink);
    let ops = sink.0.into_inner().unwrap();
    match (&decoded, applied) {
        (Ok(frames), Ok(stats)) => {
            assert_eq!(stats.frames, frames.len() as u64);
            assert_eq!(ops.len(), frames.len());
            for (f, op) in frames.iter().zip(&ops) {
                let size = SIZES[usize::from(f.pair)];
                assert!(f.offset + u64::from(f.len) <= size, "applied past the end: {f:?}");
                let want = match f.kind {
                    FrameKind::Data => Op::Write { pair: f.pair, offset: f.offset, data: f.data.clone() },
                    FrameKind::Zero => Op::Zero { pair: f.pair, offset: f.offset, len: u64::from(f.len) },
                };
                assert_eq!(op, &want);
            }
        }
        (Ok(_), Err(ApplyError::UnknownPair { .. } | ApplyError::OutOfRange { .. })) => {
            assert!(ops.is_empty(), "a refused batch wrote {} ops", ops.len());
        }
        (Err(e), Err(ApplyError::Frame(f))) => {
            assert_eq!(e, &f);
            assert!(ops.is_empty(), "a refused batch wrote {} ops", ops.len());
        }
        (d, a) => panic!("decode {:?} but apply {a:?}", d.as_ref().map(Vec::len)),
    }
}

#[derive(Arbitrary, Debug)]
enum ArbFrame {
    Data { pair: u16, block: u32, data: Vec<u8>, runs: bool },
    Zero { pair: u16, block: u32, len: u32 },
}

fn structured(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(level) = u.int_in_range(1..=3) else { return };
    let Ok(frames) = Vec::<ArbFrame>::arbitrary(&mut u) else { return };
    let mut batch = Vec::new();
    let mut want = Vec::new();
    for f in frames {
        let frame = match f {
            ArbFrame::Data { data, .. } if data.is_empty() => continue,
            ArbFrame::Data { pair, block, mut data, runs } => {
                data.truncate(MAX_FRAME_DATA as usize);
                if runs {
                    data.iter_mut().for_each(|b| *b &= 1);
                }
                let len = data.len() as u32;
                Frame { kind: FrameKind::Data, pair, offset: u64::from(block) * ALIGN, len, data }
            }
            ArbFrame::Zero { pair, block, len } => Frame {
                kind: FrameKind::Zero,
                pair,
                offset: u64::from(block) * ALIGN,
                len: len % MAX_FRAME_DATA + 1,
                data: Vec::new(),
            },
        };
        batch.extend_from_slice(&encode(&frame, level));
        want.push(frame);
    }
    assert_eq!(decode_frames(&batch), Ok(want), "round trip");
}

fuzz_target!(|data: &[u8]| {
    raw(data);
    structured(data);
});
