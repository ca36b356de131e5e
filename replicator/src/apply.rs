//! The target side: a batch of frames applied to the replica volumes.

use std::io;

use thiserror::Error;

use crate::frame::{decode_frames, FrameError, FrameKind};

/// Writes of the replicas of a cycle's pairs.
pub trait ReplicaSink {
    /// Size of pair `pair`'s replica; None when the cycle has no such pair.
    fn size(&self, pair: u16) -> Option<u64>;
    fn write(&self, pair: u16, offset: u64, data: &[u8]) -> io::Result<()>;
    /// The range was discarded on the source: it must read as zeros.
    fn zero(&self, pair: u16, offset: u64, len: u64) -> io::Result<()>;
}

#[derive(Debug, Error)]
pub enum ApplyError {
    #[error("bad replication stream: {0}")]
    Frame(#[from] FrameError),
    #[error("bad replication stream: frame for pair {pair}, which the cycle does not have")]
    UnknownPair { pair: u16 },
    #[error("bad replication stream: range {offset}+{len} of pair {pair} is past its end ({size} bytes)")]
    OutOfRange { pair: u16, offset: u64, len: u64, size: u64 },
    #[error("cannot write a replica: {0}")]
    Write(io::Error),
}

/// What a batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub frames: u64,
    pub bytes_written: u64,
    pub bytes_zeroed: u64,
}

/// Decodes `batch` and checks every frame against the pairs before writing any, then writes.
pub fn apply_frames(batch: &[u8], sink: &dyn ReplicaSink) -> Result<ApplyStats, ApplyError> {
    let frames = decode_frames(batch)?;
    for f in &frames {
        let size = sink.size(f.pair).ok_or(ApplyError::UnknownPair { pair: f.pair })?;
        let end = f.offset + u64::from(f.len);
        if end > size {
            return Err(ApplyError::OutOfRange { pair: f.pair, offset: f.offset, len: u64::from(f.len), size });
        }
    }
    let mut stats = ApplyStats::default();
    for f in &frames {
        match f.kind {
            FrameKind::Data => {
                sink.write(f.pair, f.offset, &f.data).map_err(ApplyError::Write)?;
                stats.bytes_written += u64::from(f.len);
            }
            FrameKind::Zero => {
                sink.zero(f.pair, f.offset, u64::from(f.len)).map_err(ApplyError::Write)?;
                stats.bytes_zeroed += u64::from(f.len);
            }
        }
        stats.frames += 1;
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{encode_frame, FrameBody};
    use parking_lot::Mutex;

    /// Two in-memory replicas.
    struct Mem(Mutex<Vec<Vec<u8>>>);
    impl ReplicaSink for Mem {
        fn size(&self, pair: u16) -> Option<u64> {
            self.0.lock().get(pair as usize).map(|v| v.len() as u64)
        }
        fn write(&self, pair: u16, offset: u64, data: &[u8]) -> io::Result<()> {
            let mut g = self.0.lock();
            g[pair as usize][offset as usize..offset as usize + data.len()].copy_from_slice(data);
            Ok(())
        }
        fn zero(&self, pair: u16, offset: u64, len: u64) -> io::Result<()> {
            self.0.lock()[pair as usize][offset as usize..(offset + len) as usize].fill(0);
            Ok(())
        }
    }

    #[test]
    fn applies_and_refuses_bad_frames_before_writing() {
        let sink = Mem(Mutex::new(vec![vec![9u8; 1 << 20], vec![9u8; 64 << 10]]));
        let mut b = Vec::new();
        encode_frame(&mut b, FrameKind::Data, 0, 8192, FrameBody::Data(&[1u8; 4096]), 1);
        encode_frame(&mut b, FrameKind::Zero, 1, 0, FrameBody::Len(8192), 1);
        let s = apply_frames(&b, &sink).unwrap();
        assert_eq!((s.frames, s.bytes_written, s.bytes_zeroed), (2, 4096, 8192));
        {
            let g = sink.0.lock();
            assert_eq!(&g[0][8192..12288], &[1u8; 4096][..]);
            assert_eq!(g[0][12288], 9);
            assert!(g[1][..8192].iter().all(|&x| x == 0));
        }
        // A batch with one bad frame writes nothing at all.
        let mut bad = Vec::new();
        encode_frame(&mut bad, FrameKind::Data, 0, 0, FrameBody::Data(&[5u8; 4096]), 1);
        encode_frame(&mut bad, FrameKind::Data, 1, 61440, FrameBody::Data(&[5u8; 8192]), 1);
        assert!(matches!(apply_frames(&bad, &sink), Err(ApplyError::OutOfRange { pair: 1, .. })));
        assert_eq!(sink.0.lock()[0][0], 9, "nothing was written");
        let mut unknown = Vec::new();
        encode_frame(&mut unknown, FrameKind::Zero, 7, 0, FrameBody::Len(4096), 1);
        assert!(matches!(apply_frames(&unknown, &sink), Err(ApplyError::UnknownPair { pair: 7 })));
        assert!(matches!(apply_frames(&b[..b.len() - 3], &sink), Err(ApplyError::Frame(_))));
    }
}
