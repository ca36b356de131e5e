//! The source side of a cycle: the changed extents of each pair become frames.

use std::io;

use evs_snapshot::ChangedExtent;

use crate::frame::{encode_frame, FrameBody, FrameKind, MAX_BATCH_DATA, MAX_FRAME_DATA};

/// Reads of the cycle's snapshot of each pair.
pub trait BlockSource {
    fn read(&self, pair: u16, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

/// A frame-sized piece of a changed extent: offset, length, discarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub offset: u64,
    pub len: u32,
    pub zero: bool,
}

/// Cuts changed extents into ranges of at most [`MAX_FRAME_DATA`] bytes, at multiples of it
/// (so ranges stay aligned).
pub fn plan_ranges(extents: &[ChangedExtent]) -> Vec<Range> {
    let max = u64::from(MAX_FRAME_DATA);
    let mut out = Vec::new();
    for e in extents.iter().filter(|e| e.len > 0) {
        let mut off = e.offset;
        let end = e.offset + e.len;
        while off < end {
            let stop = ((off / max) + 1).saturating_mul(max).min(end);
            out.push(Range { offset: off, len: (stop - off) as u32, zero: e.zero });
            off = stop;
        }
    }
    out
}

/// What a cycle sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CycleStats {
    pub frames: u64,
    /// Bytes of volume data described (data and discarded ranges).
    pub bytes_replicated: u64,
    /// Bytes read from the source snapshot.
    pub bytes_read: u64,
    /// Bytes of encoded frames (what crosses the link).
    pub bytes_sent: u64,
}

/// Encodes ranges into batches of frames.
pub struct FrameEncoder {
    pub zstd_level: i32,
    /// A batch is handed over once it holds about this many bytes.
    pub batch_bytes: usize,
    /// ... or before its data frames would describe more than this many bytes (at most
    /// [`MAX_BATCH_DATA`], which the target refuses to go past).
    pub batch_data: usize,
}

/// Batches stay under gRPC's default 4 MiB message limit: a batch is handed over at 2 MiB,
/// so it holds at most 2 MiB plus one frame.
pub const DEFAULT_BATCH_BYTES: usize = 2 << 20;

impl Default for FrameEncoder {
    fn default() -> Self {
        FrameEncoder { zstd_level: 1, batch_bytes: DEFAULT_BATCH_BYTES, batch_data: MAX_BATCH_DATA }
    }
}

impl FrameEncoder {
    /// Reads, encodes and hands over (`emit`, with the stats so far) the ranges of pair
    /// `pair`. A data range that reads as zeros goes as a zero frame. Stops at the first error
    /// of `read` or `emit`.
    pub fn encode_pair(
        &self,
        pair: u16,
        ranges: &[Range],
        src: &dyn BlockSource,
        emit: &mut dyn FnMut(Vec<u8>, &CycleStats) -> io::Result<()>,
        stats: &mut CycleStats,
    ) -> io::Result<()> {
        let mut batch = Vec::with_capacity(self.batch_bytes + MAX_FRAME_DATA as usize);
        let mut buf = vec![0u8; MAX_FRAME_DATA as usize];
        let max_data = self.batch_data.min(MAX_BATCH_DATA);
        // Bytes of data (decoded) the data frames of `batch` describe.
        let mut data_in_batch = 0usize;
        for r in ranges {
            if !r.zero && !batch.is_empty() && data_in_batch + r.len as usize > max_data {
                emit(std::mem::take(&mut batch), stats)?;
                data_in_batch = 0;
            }
            let before = batch.len();
            if r.zero {
                encode_frame(&mut batch, FrameKind::Zero, pair, r.offset, FrameBody::Len(r.len), self.zstd_level);
            } else {
                let data = &mut buf[..r.len as usize];
                src.read(pair, r.offset, data)?;
                stats.bytes_read += u64::from(r.len);
                if data.iter().all(|&b| b == 0) {
                    encode_frame(&mut batch, FrameKind::Zero, pair, r.offset, FrameBody::Len(r.len), self.zstd_level);
                } else {
                    encode_frame(&mut batch, FrameKind::Data, pair, r.offset, FrameBody::Data(data), self.zstd_level);
                    data_in_batch += data.len();
                }
            }
            stats.frames += 1;
            stats.bytes_replicated += u64::from(r.len);
            stats.bytes_sent += (batch.len() - before) as u64;
            if batch.len() >= self.batch_bytes {
                emit(std::mem::take(&mut batch), stats)?;
                data_in_batch = 0;
            }
        }
        if !batch.is_empty() {
            emit(batch, stats)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::decode_frames;

    #[test]
    fn ranges_are_frame_sized_and_aligned() {
        let m = u64::from(MAX_FRAME_DATA);
        let e = |offset, len, zero| ChangedExtent { offset, len, zero };
        let r = plan_ranges(&[e(4096, 3 * m, false), e(10 * m, 8192, true), e(20 * m, 0, false)]);
        assert_eq!(r[0], Range { offset: 4096, len: (m - 4096) as u32, zero: false });
        assert_eq!(r[1], Range { offset: m, len: m as u32, zero: false });
        assert_eq!(r[3], Range { offset: 3 * m, len: 4096, zero: false });
        assert_eq!(r[4], Range { offset: 10 * m, len: 8192, zero: true });
        assert_eq!(r.len(), 5);
        assert_eq!(r.iter().map(|x| u64::from(x.len)).sum::<u64>(), 3 * m + 8192);
    }

    struct Pattern;
    impl BlockSource for Pattern {
        fn read(&self, pair: u16, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            for (i, b) in buf.iter_mut().enumerate() {
                // Incompressible (splitmix64 of the position), so batches fill up.
                let mut z = (offset + i as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                *b = if offset >= 8 << 20 { 0 } else { (z >> 32) as u8 ^ pair as u8 | 1 };
            }
            Ok(())
        }
    }

    #[test]
    fn encodes_batches_that_decode_to_the_source() {
        let enc = FrameEncoder { zstd_level: 1, batch_bytes: 1 << 20, ..FrameEncoder::default() };
        let ranges = plan_ranges(&[
            ChangedExtent { offset: 0, len: 3 << 20, zero: false },
            ChangedExtent { offset: 8 << 20, len: 1 << 20, zero: false },
            ChangedExtent { offset: 12 << 20, len: 4096, zero: true },
        ]);
        let mut batches = Vec::new();
        let mut stats = CycleStats::default();
        enc.encode_pair(
            2,
            &ranges,
            &Pattern,
            &mut |b, s| {
                assert!(s.bytes_sent >= b.len() as u64);
                batches.push(b);
                Ok(())
            },
            &mut stats,
        )
        .unwrap();
        assert!(batches.len() >= 2, "batches are cut at about 1 MiB");
        let frames: Vec<_> = batches.iter().flat_map(|b| decode_frames(b).unwrap()).collect();
        assert_eq!(frames.len(), 5);
        assert_eq!(stats.frames, 5);
        assert_eq!(stats.bytes_replicated, (4 << 20) + 4096);
        assert_eq!(stats.bytes_read, 4 << 20, "a discarded range is not read");
        assert_eq!(stats.bytes_sent, batches.iter().map(|b| b.len() as u64).sum::<u64>());
        for f in &frames[..3] {
            let mut want = vec![0u8; f.len as usize];
            Pattern.read(2, f.offset, &mut want).unwrap();
            assert_eq!(f.data, want);
        }
        assert_eq!(frames[3].kind, FrameKind::Zero, "an all-zero read goes as a zero frame");
        assert_eq!(frames[4].kind, FrameKind::Zero);
    }

    /// Compressible data: batches are cut by the data they describe, not only by their size,
    /// so each decodes within MAX_BATCH_DATA (see frame.rs).
    #[test]
    fn compressible_ranges_are_cut_into_batches_the_target_accepts() {
        struct Ones;
        impl BlockSource for Ones {
            fn read(&self, _pair: u16, _offset: u64, buf: &mut [u8]) -> io::Result<()> {
                buf.fill(1);
                Ok(())
            }
        }
        let enc = FrameEncoder::default();
        let total = 2 * MAX_BATCH_DATA as u64 + (3 << 20);
        let ranges = plan_ranges(&[ChangedExtent { offset: 0, len: total, zero: false }]);
        let mut batches = Vec::new();
        let mut stats = CycleStats::default();
        enc.encode_pair(
            0,
            &ranges,
            &Ones,
            &mut |b, _| {
                batches.push(b);
                Ok(())
            },
            &mut stats,
        )
        .unwrap();
        assert_eq!(batches.len(), 3, "two full batches and the rest");
        let mut covered = 0u64;
        for b in &batches {
            assert!(b.len() < 64 << 10, "{} bytes: the data compresses", b.len());
            let frames = decode_frames(b).unwrap();
            let data: usize = frames.iter().map(|f| f.data.len()).sum();
            assert!(data <= MAX_BATCH_DATA);
            assert!(frames.iter().all(|f| f.data.iter().all(|&x| x == 1)));
            covered += data as u64;
        }
        assert_eq!(covered, total);
        assert_eq!(stats.frames, ranges.len() as u64);
    }
}
