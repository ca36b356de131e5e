//! The allocation map of one layer: which 4 KiB blocks the layer holds, and which it has
//! discarded over data of a lower layer ("zeroed").
//!
//! In memory: two bitmaps of `AtomicU64` words, so every connection thread updates them without
//! a lock; a reader/writer lock only guards growth (online extend). Each 4 KiB page of bitmap
//! (32,768 blocks = 128 MiB of volume) has a dirty flag; a flush writes dirty pages only.
//!
//! ## On-disk layout (`<layer-id>.map`), little-endian
//!
//! ```text
//! 0      8   magic  "EVSMAP\0\x01"
//! 8      4   format version (MAP_VERSION = 1)
//! 12     4   block size in bytes (4096)
//! 16     8   capacity in blocks
//! 24     4   CRC32C of bytes 0..24
//! 28..4096   zero
//! then, for each bitmap page p = 0, 1, ...:
//! 4096 + p*8192          4096 bytes: allocated bits, block b at word b/64, bit b%64
//! 4096 + p*8192 + 4096   4096 bytes: zeroed bits, same indexing
//! ```
//!
//! Pages are rewritten in place. A page torn by a crash mixes bits of the previous and the new
//! flush; both describe data that was durable when they were written (the flush syncs data
//! before the map), so every mix is a valid state.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::RwLock;

use crate::error::StoreError;

pub const MAP_MAGIC: [u8; 8] = *b"EVSMAP\0\x01";
pub const MAP_VERSION: u32 = 1;
pub const MAP_HEADER_LEN: u64 = 4096;
/// Bytes of one bitmap page.
pub const PAGE_BYTES: usize = 4096;
const WORDS_PER_PAGE: usize = PAGE_BYTES / 8;
/// Blocks described by one bitmap page.
pub const BLOCKS_PER_PAGE: u64 = (PAGE_BYTES * 8) as u64;

/// What a layer says of one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockState {
    /// Not in this layer: look further down the chain.
    Absent,
    /// This layer holds the block's data.
    Data,
    /// Discarded in this layer: reads as zeros whatever lower layers hold.
    Zeroed,
}

struct Bits {
    blocks: u64,
    alloc: Vec<AtomicU64>,
    zeroed: Vec<AtomicU64>,
    dirty: Vec<AtomicBool>,
}

impl Bits {
    fn new(blocks: u64) -> Bits {
        let pages = pages_for(blocks);
        let words = pages * WORDS_PER_PAGE;
        Bits {
            blocks,
            alloc: (0..words).map(|_| AtomicU64::new(0)).collect(),
            zeroed: (0..words).map(|_| AtomicU64::new(0)).collect(),
            dirty: (0..pages).map(|_| AtomicBool::new(false)).collect(),
        }
    }
}

fn pages_for(blocks: u64) -> usize {
    blocks.div_ceil(BLOCKS_PER_PAGE).max(1) as usize
}

/// The allocation map of a layer.
pub struct AllocMap {
    bits: RwLock<Bits>,
    allocated: AtomicU64,
}

/// A copy of dirty pages taken at the start of a flush.
pub struct DirtyPages(Vec<(usize, Vec<u8>)>);

impl AllocMap {
    /// An empty map of `blocks` blocks (all absent).
    pub fn new(blocks: u64) -> AllocMap {
        AllocMap { bits: RwLock::new(Bits::new(blocks)), allocated: AtomicU64::new(0) }
    }

    pub fn blocks(&self) -> u64 {
        self.bits.read().blocks
    }

    /// Blocks in state `Data`.
    pub fn allocated_blocks(&self) -> u64 {
        self.allocated.load(Ordering::Relaxed)
    }

    pub fn get(&self, block: u64) -> BlockState {
        let b = self.bits.read();
        if block >= b.blocks {
            return BlockState::Absent;
        }
        let (w, m) = ((block / 64) as usize, 1u64 << (block % 64));
        if b.alloc[w].load(Ordering::Acquire) & m != 0 {
            BlockState::Data
        } else if b.zeroed[w].load(Ordering::Acquire) & m != 0 {
            BlockState::Zeroed
        } else {
            BlockState::Absent
        }
    }

    /// Marks `range` as holding data in this layer.
    pub fn set_data(&self, range: Range<u64>) {
        self.update(range, |alloc, zeroed, mask| {
            let old = alloc.fetch_or(mask, Ordering::AcqRel);
            zeroed.fetch_and(!mask, Ordering::AcqRel);
            (mask & !old).count_ones() as i64
        });
    }

    /// Marks `range` as not held by this layer; `zeroed` hides lower layers too.
    pub fn clear(&self, range: Range<u64>, zeroed_over_lower: bool) {
        self.update(range, |alloc, zeroed, mask| {
            let old = alloc.fetch_and(!mask, Ordering::AcqRel);
            if zeroed_over_lower {
                zeroed.fetch_or(mask, Ordering::AcqRel);
            } else {
                zeroed.fetch_and(!mask, Ordering::AcqRel);
            }
            -((old & mask).count_ones() as i64)
        });
    }

    /// Applies `f(alloc_word, zeroed_word, mask) -> change in allocated blocks` to every word
    /// covering `range`, marking pages dirty after the bits change (a flush that misses the
    /// bits sees the dirty flag and writes the page again next time).
    fn update(&self, range: Range<u64>, f: impl Fn(&AtomicU64, &AtomicU64, u64) -> i64) {
        let b = self.bits.read();
        let end = range.end.min(b.blocks);
        let mut blk = range.start;
        let mut delta = 0i64;
        while blk < end {
            let w = (blk / 64) as usize;
            let lo = blk % 64;
            let hi = (end - (blk - lo)).min(64);
            let mask = if hi - lo == 64 { u64::MAX } else { ((1u64 << (hi - lo)) - 1) << lo };
            delta += f(&b.alloc[w], &b.zeroed[w], mask);
            b.dirty[w / WORDS_PER_PAGE].store(true, Ordering::Release);
            blk = blk - lo + hi;
        }
        if delta >= 0 {
            self.allocated.fetch_add(delta as u64, Ordering::Relaxed);
        } else {
            self.allocated.fetch_sub((-delta) as u64, Ordering::Relaxed);
        }
    }

    /// Runs of equal state covering `range` (clipped to the map), in order.
    pub fn runs(&self, range: Range<u64>, out: &mut Vec<(Range<u64>, BlockState)>) {
        let b = self.bits.read();
        let end = range.end.min(b.blocks);
        let mut blk = range.start;
        while blk < end {
            let state = state_of(&b, blk);
            let mut next = blk + 1;
            // Skip whole words of one state quickly.
            while next < end {
                if next.is_multiple_of(64) && next + 64 <= end {
                    let w = (next / 64) as usize;
                    let a = b.alloc[w].load(Ordering::Acquire);
                    let z = b.zeroed[w].load(Ordering::Acquire);
                    let uniform = match state {
                        BlockState::Data => a == u64::MAX,
                        BlockState::Zeroed => a == 0 && z == u64::MAX,
                        BlockState::Absent => a == 0 && z == 0,
                    };
                    if uniform {
                        next += 64;
                        continue;
                    }
                }
                if state_of(&b, next) != state {
                    break;
                }
                next += 1;
            }
            match out.last_mut() {
                Some((r, s)) if *s == state && r.end == blk => r.end = next,
                _ => out.push((blk..next, state)),
            }
            blk = next;
        }
    }

    /// Grows the map to `blocks` (new blocks absent). Never shrinks.
    pub fn grow(&self, blocks: u64) {
        let mut b = self.bits.write();
        if blocks <= b.blocks {
            return;
        }
        let pages = pages_for(blocks);
        let words = pages * WORDS_PER_PAGE;
        b.alloc.resize_with(words, || AtomicU64::new(0));
        b.zeroed.resize_with(words, || AtomicU64::new(0));
        let old_pages = b.dirty.len();
        b.dirty.resize_with(pages, || AtomicBool::new(true));
        for d in &b.dirty[old_pages..] {
            d.store(true, Ordering::Release);
        }
        b.blocks = blocks;
    }

    /// Copies the dirty pages, clearing their flags. Taken before the data is synced, so every
    /// bit in the copy describes data the sync will make durable.
    pub fn take_dirty(&self) -> DirtyPages {
        let b = self.bits.read();
        let mut pages = Vec::new();
        for (p, d) in b.dirty.iter().enumerate() {
            if d.swap(false, Ordering::AcqRel) {
                let mut buf = vec![0u8; PAGE_BYTES * 2];
                let words = p * WORDS_PER_PAGE..(p + 1) * WORDS_PER_PAGE;
                for (i, w) in words.enumerate() {
                    let a = b.alloc[w].load(Ordering::Acquire).to_le_bytes();
                    let z = b.zeroed[w].load(Ordering::Acquire).to_le_bytes();
                    buf[i * 8..i * 8 + 8].copy_from_slice(&a);
                    buf[PAGE_BYTES + i * 8..PAGE_BYTES + i * 8 + 8].copy_from_slice(&z);
                }
                pages.push((p, buf));
            }
        }
        DirtyPages(pages)
    }

    /// Puts the dirty flags back after a failed write of `pages`.
    pub fn restore_dirty(&self, pages: &DirtyPages) {
        let b = self.bits.read();
        for (p, _) in &pages.0 {
            b.dirty[*p].store(true, Ordering::Release);
        }
    }

    /// Writes the map file's header for the current capacity, then `pages`, then fdatasync.
    pub fn write(&self, file: &File, pages: &DirtyPages) -> io::Result<()> {
        file.write_all_at(&encode_header(self.blocks()), 0)?;
        for (p, buf) in &pages.0 {
            file.write_all_at(buf, MAP_HEADER_LEN + (*p as u64) * (PAGE_BYTES as u64 * 2))?;
        }
        file.sync_data()
    }

    /// Allocates the file's space for a map of `blocks` blocks (the header and every bitmap
    /// page), so that no flush ever needs free space for the map: on a full filesystem a flush
    /// still records the writes whose data made it to disk.
    pub fn reserve(file: &File, blocks: u64) -> io::Result<()> {
        reserve_file(file, blocks)
    }

    /// Creates a new map file for `blocks` blocks and syncs it.
    pub fn create_file(file: &File, blocks: u64) -> io::Result<AllocMap> {
        let map = AllocMap::new(blocks);
        let pages = map.take_dirty();
        reserve_file(file, blocks)?;
        map.write(file, &pages)?;
        Ok(map)
    }

    /// Loads a map file.
    pub fn load(file: &File, what: &str) -> Result<AllocMap, StoreError> {
        let corrupt = |why: String| StoreError::Corrupt { what: what.to_string(), why };
        let mut hdr = [0u8; 28];
        file.read_exact_at(&mut hdr, 0).map_err(|e| corrupt(format!("reading header: {e}")))?;
        let blocks = decode_header(&hdr).map_err(corrupt)?;
        let map = AllocMap::new(blocks);
        let pages = pages_for(blocks);
        let mut buf = vec![0u8; PAGE_BYTES * 2];
        let mut allocated = 0u64;
        {
            let b = map.bits.read();
            for p in 0..pages {
                let off = MAP_HEADER_LEN + p as u64 * PAGE_BYTES as u64 * 2;
                // A page past the end of the file was never written: all absent.
                match file.read_exact_at(&mut buf, off) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => buf.fill(0),
                    Err(e) => return Err(StoreError::Io(e)),
                }
                for i in 0..WORDS_PER_PAGE {
                    let w = p * WORDS_PER_PAGE + i;
                    let mut a = u64::from_le_bytes(buf[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
                    let z = u64::from_le_bytes(
                        buf[PAGE_BYTES + i * 8..PAGE_BYTES + i * 8 + 8].try_into().expect("8 bytes"),
                    );
                    // Bits past the capacity are meaningless; never let them count.
                    let first = w as u64 * 64;
                    if first >= blocks {
                        a = 0;
                    } else if blocks - first < 64 {
                        a &= (1u64 << (blocks - first)) - 1;
                    }
                    allocated += a.count_ones() as u64;
                    b.alloc[w].store(a, Ordering::Relaxed);
                    b.zeroed[w].store(z & !a, Ordering::Relaxed);
                }
            }
        }
        map.allocated.store(allocated, Ordering::Relaxed);
        Ok(map)
    }
}

fn state_of(b: &Bits, blk: u64) -> BlockState {
    let (w, m) = ((blk / 64) as usize, 1u64 << (blk % 64));
    if b.alloc[w].load(Ordering::Acquire) & m != 0 {
        BlockState::Data
    } else if b.zeroed[w].load(Ordering::Acquire) & m != 0 {
        BlockState::Zeroed
    } else {
        BlockState::Absent
    }
}

/// The 28 header bytes for a map of `blocks` blocks.
pub fn encode_header(blocks: u64) -> [u8; 28] {
    let mut h = [0u8; 28];
    h[0..8].copy_from_slice(&MAP_MAGIC);
    h[8..12].copy_from_slice(&MAP_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(crate::BLOCK_SIZE as u32).to_le_bytes());
    h[16..24].copy_from_slice(&blocks.to_le_bytes());
    let crc = crc32c::crc32c(&h[0..24]);
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Validates a header; returns the capacity in blocks.
pub fn decode_header(h: &[u8; 28]) -> Result<u64, String> {
    if h[0..8] != MAP_MAGIC {
        return Err("bad magic (not an EVS allocation map)".into());
    }
    let crc = u32::from_le_bytes(h[24..28].try_into().expect("4 bytes"));
    if crc != crc32c::crc32c(&h[0..24]) {
        return Err("header checksum mismatch".into());
    }
    let version = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
    if version != MAP_VERSION {
        return Err(format!("unsupported map version {version}"));
    }
    let bs = u32::from_le_bytes(h[12..16].try_into().expect("4 bytes"));
    if bs as u64 != crate::BLOCK_SIZE {
        return Err(format!("unsupported block size {bs}"));
    }
    Ok(u64::from_le_bytes(h[16..24].try_into().expect("8 bytes")))
}

/// See [`AllocMap::reserve`]. Where the filesystem cannot preallocate, the file is only sized.
fn reserve_file(file: &File, blocks: u64) -> io::Result<()> {
    let len = MAP_HEADER_LEN + pages_for(blocks) as u64 * PAGE_BYTES as u64 * 2;
    match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, len) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::OPNOTSUPP => {
            if file.metadata()?.len() < len {
                file.set_len(len)?;
            }
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn collect(m: &AllocMap, r: Range<u64>) -> Vec<(Range<u64>, BlockState)> {
        let mut v = Vec::new();
        m.runs(r, &mut v);
        v
    }

    #[test]
    fn set_clear_runs_and_count() {
        let m = AllocMap::new(1000);
        m.set_data(10..200);
        m.clear(50..60, true);
        m.clear(100..110, false);
        assert_eq!(m.allocated_blocks(), 190 - 20);
        assert_eq!(
            collect(&m, 0..1000),
            vec![
                (0..10, BlockState::Absent),
                (10..50, BlockState::Data),
                (50..60, BlockState::Zeroed),
                (60..100, BlockState::Data),
                (100..110, BlockState::Absent),
                (110..200, BlockState::Data),
                (200..1000, BlockState::Absent),
            ]
        );
        assert_eq!(m.get(55), BlockState::Zeroed);
        assert_eq!(m.get(5000), BlockState::Absent);
    }

    #[test]
    fn persist_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("m"))
            .unwrap();
        let m = AllocMap::create_file(&f, 100_000).unwrap();
        m.set_data(3..70_000);
        m.clear(40_000..40_010, true);
        let d = m.take_dirty();
        m.write(&f, &d).unwrap();
        m.grow(300_000);
        m.set_data(299_990..300_000);
        let d = m.take_dirty();
        m.write(&f, &d).unwrap();
        let l = AllocMap::load(&f, "test map").unwrap();
        assert_eq!(l.blocks(), 300_000);
        assert_eq!(collect(&l, 0..300_000), collect(&m, 0..300_000));
        assert_eq!(l.allocated_blocks(), m.allocated_blocks());
    }

    #[test]
    fn corrupt_header_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m");
        std::fs::write(&p, vec![7u8; 8192]).unwrap();
        let f = File::open(&p).unwrap();
        match AllocMap::load(&f, "layer 9 map") {
            Err(StoreError::Corrupt { what, why }) => {
                assert_eq!(what, "layer 9 map");
                assert!(why.contains("magic"), "{why}");
            }
            other => panic!("expected Corrupt, got {:?}", other.err()),
        }
    }

    proptest! {
        #[test]
        fn runs_match_a_model(ops in proptest::collection::vec((0u64..700, 0u64..300, 0u8..3), 1..40)) {
            let n = 700u64;
            let m = AllocMap::new(n);
            let mut model = vec![BlockState::Absent; n as usize];
            for (start, len, kind) in ops {
                let end = (start + len).min(n);
                match kind {
                    0 => { m.set_data(start..end); for b in start..end { model[b as usize] = BlockState::Data; } }
                    1 => { m.clear(start..end, true); for b in start..end { model[b as usize] = BlockState::Zeroed; } }
                    _ => { m.clear(start..end, false); for b in start..end { model[b as usize] = BlockState::Absent; } }
                }
            }
            let mut expect: Vec<(Range<u64>, BlockState)> = Vec::new();
            for (i, s) in model.iter().enumerate() {
                let i = i as u64;
                match expect.last_mut() { Some((r, ls)) if ls == s => r.end = i + 1, _ => expect.push((i..i + 1, *s)) }
            }
            prop_assert_eq!(collect(&m, 0..n), expect);
            prop_assert_eq!(m.allocated_blocks(), model.iter().filter(|s| **s == BlockState::Data).count() as u64);
        }
    }
}
