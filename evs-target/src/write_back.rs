//! A front end's writes that were answered before their op completed (write-back, see
//! `Volume::reply_early`): which blocks they cover, so that a request touching those blocks
//! waits for them first, and how many there are, to bound them. One per NBD connection and per
//! vhost-user queue; its owner is the only thread that completes them.

use std::io;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::time::Instant;

use evs_snapshot::volume::PendingWrite;
use evs_snapshot::Volume;

use crate::volume_io::VolumeStats;

/// Writes answered early, in flight, per connection or queue: enough to keep the disk's queue
/// fuller than a client's usual depth of 32, few enough that a flush waits for little.
pub const MAX_WRITES: usize = 128;
/// Bytes of them.
pub const MAX_BYTES: usize = 32 << 20;

/// The 4 KiB blocks under a byte range.
pub fn block_span(offset: u64, len: u64) -> Range<u64> {
    offset / 4096..(offset + len).div_ceil(4096)
}

#[derive(Debug)]
struct Entry {
    blocks: Range<u64>,
    slot: usize,
    len: usize,
}

/// The early-answered writes of one connection or queue, by engine slot.
#[derive(Debug, Default)]
pub struct EarlyWrites {
    entries: Vec<Entry>,
    bytes: usize,
}

impl EarlyWrites {
    /// Whether one more write of `len` bytes stays within the bounds.
    pub fn has_room(&self, len: usize) -> bool {
        self.entries.len() < MAX_WRITES && self.bytes + len <= MAX_BYTES
    }

    /// Records the write of `len` bytes at `offset` in flight on `slot`.
    pub fn insert(&mut self, offset: u64, len: usize, slot: usize) {
        self.entries.push(Entry { blocks: block_span(offset, len as u64), slot, len });
        self.bytes += len;
    }

    /// A write of `len` bytes at `offset`, in flight on `slot`, is answered now: it is recorded,
    /// and counted as done (it leaves the queue depth, its latency ends here).
    pub fn answered(&mut self, offset: u64, len: usize, slot: usize, stats: &VolumeStats, since: Instant) {
        self.insert(offset, len, slot);
        stats.queue_depth.fetch_sub(1, Ordering::Relaxed);
        stats.write_ops.fetch_add(1, Ordering::Relaxed);
        stats.write_bytes.fetch_add(len as u64, Ordering::Relaxed);
        stats.write_early_replies.fetch_add(1, Ordering::Relaxed);
        stats.write_latency.observe(since.elapsed());
    }

    /// The op of the answered write on `slot` completed with `result`: its map bits are set,
    /// or its failure is left for the volume's next flush to report.
    pub fn completed(
        &mut self,
        slot: usize,
        volume: &Volume,
        pending: PendingWrite,
        result: &io::Result<usize>,
        stats: &VolumeStats,
    ) {
        self.remove(slot);
        match result {
            Ok(_) => volume.commit_write(pending),
            Err(e) => {
                tracing::error!(volume = volume.id(), error = %e, "a write failed after it was answered; the next flush fails");
                stats.errors.fetch_add(1, Ordering::Relaxed);
                volume.fail_write(pending, e);
            }
        }
    }

    /// Forgets the write on `slot` (its op completed); false if there was none.
    pub fn remove(&mut self, slot: usize) -> bool {
        match self.entries.iter().position(|e| e.slot == slot) {
            Some(i) => {
                self.bytes -= self.entries.swap_remove(i).len;
                true
            }
            None => false,
        }
    }

    /// Whether one of them covers a block of `offset..offset+len`.
    pub fn overlaps(&self, offset: u64, len: u64) -> bool {
        if self.entries.is_empty() {
            return false;
        }
        let b = block_span(offset, len);
        self.entries.iter().any(|e| e.blocks.start < b.end && b.start < e.blocks.end)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_is_by_whole_blocks() {
        let mut w = EarlyWrites::default();
        assert!(!w.overlaps(0, 1 << 30));
        w.insert(8192, 4096, 3);
        assert!(w.overlaps(8192, 1));
        assert!(w.overlaps(12287, 1), "the last byte of the block");
        assert!(w.overlaps(8191, 2), "a range that reaches into the block");
        assert!(!w.overlaps(4096, 4096), "the block before");
        assert!(!w.overlaps(12288, 4096), "the block after");
        // Unaligned ranges cover their partial blocks.
        assert!(w.overlaps(5000, 4000));
    }

    #[test]
    fn bounds_count_writes_and_bytes() {
        let mut w = EarlyWrites::default();
        for slot in 0..MAX_WRITES {
            assert!(w.has_room(4096));
            w.insert(slot as u64 * 4096, 4096, slot);
        }
        assert!(!w.has_room(4096), "more writes than MAX_WRITES");
        assert!(w.remove(5));
        assert!(!w.remove(5), "removed twice");
        assert!(w.has_room(4096));
        assert!(!w.has_room(MAX_BYTES), "more bytes than MAX_BYTES");
        assert_eq!(w.len(), MAX_WRITES - 1);
        for slot in 0..MAX_WRITES {
            w.remove(slot);
        }
        assert!(w.is_empty() && w.has_room(MAX_BYTES));
    }
}
