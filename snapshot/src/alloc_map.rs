//! The allocation map of one layer: which 4 KiB blocks the layer holds, and which it has
//! discarded over data of a lower layer ("zeroed").
//!
//! In memory: bitmap pages of `AtomicU64` words, made on first use, so every connection
//! thread updates them without a lock and a new layer costs the same whatever the volume's
//! size (a snapshot's new head is O(1)). A page (4 KiB of each bitmap: 32,768 blocks = 128 MiB
//! of volume) hangs off a two-level table sized for the largest volume; a missing page reads
//! as all absent. Each page has a dirty flag; a flush writes dirty pages only.
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
use std::sync::OnceLock;

use crate::error::StoreError;

pub const MAP_MAGIC: [u8; 8] = *b"EVSMAP\0\x01";
pub const MAP_VERSION: u32 = 1;
pub const MAP_HEADER_LEN: u64 = 4096;
/// Bytes of one bitmap page.
pub const PAGE_BYTES: usize = 4096;
pub(crate) const WORDS_PER_PAGE: usize = PAGE_BYTES / 8;
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

/// Bitmap pages per second-level table (1,024 pages: 128 GiB of volume).
const PAGES_PER_TABLE: usize = 1024;
/// First-level entries: enough tables for MAX_VOLUME_SIZE.
const TABLES: usize =
    (crate::MAX_VOLUME_SIZE / crate::BLOCK_SIZE / BLOCKS_PER_PAGE).div_ceil(PAGES_PER_TABLE as u64) as usize;

pub(crate) struct Page {
    alloc: [AtomicU64; WORDS_PER_PAGE],
    zeroed: [AtomicU64; WORDS_PER_PAGE],
    dirty: AtomicBool,
}

impl Page {
    fn empty() -> Box<Page> {
        Box::new(Page {
            alloc: std::array::from_fn(|_| AtomicU64::new(0)),
            zeroed: std::array::from_fn(|_| AtomicU64::new(0)),
            dirty: AtomicBool::new(false),
        })
    }

    /// The (allocated, zeroed) words `i` of the page.
    pub(crate) fn word(&self, i: u64) -> (u64, u64) {
        (self.alloc[i as usize].load(Ordering::Acquire), self.zeroed[i as usize].load(Ordering::Acquire))
    }

    /// The page's two bitmaps in the file's layout.
    fn encode(&self) -> Vec<u8> {
        let mut buf = vec![0u8; PAGE_BYTES * 2];
        for i in 0..WORDS_PER_PAGE {
            buf[i * 8..i * 8 + 8].copy_from_slice(&self.alloc[i].load(Ordering::Acquire).to_le_bytes());
            buf[PAGE_BYTES + i * 8..PAGE_BYTES + i * 8 + 8]
                .copy_from_slice(&self.zeroed[i].load(Ordering::Acquire).to_le_bytes());
        }
        buf
    }
}

type Table = [OnceLock<Box<Page>>; PAGES_PER_TABLE];

fn pages_for(blocks: u64) -> usize {
    blocks.div_ceil(BLOCKS_PER_PAGE).max(1) as usize
}

/// The allocation map of a layer.
pub struct AllocMap {
    blocks: AtomicU64,
    /// Inline, to save a pointer chase on every lookup.
    tables: [OnceLock<Box<Table>>; TABLES],
    allocated: AtomicU64,
}

/// A copy of dirty pages taken at the start of a flush.
pub struct DirtyPages(Vec<(usize, Vec<u8>)>);

impl AllocMap {
    /// An empty map of `blocks` blocks (all absent). No page is made yet.
    pub fn new(blocks: u64) -> AllocMap {
        AllocMap {
            blocks: AtomicU64::new(blocks),
            tables: std::array::from_fn(|_| OnceLock::new()),
            allocated: AtomicU64::new(0),
        }
    }

    pub fn blocks(&self) -> u64 {
        self.blocks.load(Ordering::Acquire)
    }

    /// Blocks in state `Data`.
    pub fn allocated_blocks(&self) -> u64 {
        self.allocated.load(Ordering::Relaxed)
    }

    /// Bitmap page `p`, if any bit of it was ever set.
    pub(crate) fn page(&self, p: usize) -> Option<&Page> {
        self.tables.get(p / PAGES_PER_TABLE)?.get()?[p % PAGES_PER_TABLE].get().map(|b| &**b)
    }

    fn page_or_make(&self, p: usize) -> &Page {
        let table = self.tables[p / PAGES_PER_TABLE].get_or_init(|| Box::new(std::array::from_fn(|_| OnceLock::new())));
        table[p % PAGES_PER_TABLE].get_or_init(Page::empty)
    }

    /// The (allocated, zeroed) words of word `w`; a missing page is all zeros.
    fn words(&self, w: u64) -> (u64, u64) {
        match self.page((w / WORDS_PER_PAGE as u64) as usize) {
            Some(pg) => pg.word(w % WORDS_PER_PAGE as u64),
            None => (0, 0),
        }
    }

    pub fn get(&self, block: u64) -> BlockState {
        if block >= self.blocks() {
            return BlockState::Absent;
        }
        let (a, z) = self.words(block / 64);
        state_in(a, z, block % 64)
    }

    /// Marks `range` as holding data in this layer.
    pub fn set_data(&self, range: Range<u64>) {
        self.update(range, true, |alloc, zeroed, mask| {
            let old = alloc.fetch_or(mask, Ordering::AcqRel);
            zeroed.fetch_and(!mask, Ordering::AcqRel);
            (mask & !old).count_ones() as i64
        });
    }

    /// Marks `range` as not held by this layer; `zeroed` hides lower layers too.
    pub fn clear(&self, range: Range<u64>, zeroed_over_lower: bool) {
        self.update(range, zeroed_over_lower, |alloc, zeroed, mask| {
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
    /// bits sees the dirty flag and writes the page again next time). A missing page is made
    /// only when `sets_bits` (clearing bits of a missing page changes nothing).
    fn update(&self, range: Range<u64>, sets_bits: bool, f: impl Fn(&AtomicU64, &AtomicU64, u64) -> i64) {
        let end = range.end.min(self.blocks());
        let mut blk = range.start;
        let mut delta = 0i64;
        while blk < end {
            let p = (blk / BLOCKS_PER_PAGE) as usize;
            let page_end = ((p as u64 + 1) * BLOCKS_PER_PAGE).min(end);
            let page = if sets_bits { Some(self.page_or_make(p)) } else { self.page(p) };
            let Some(page) = page else {
                blk = page_end;
                continue;
            };
            while blk < page_end {
                let w = ((blk / 64) as usize) % WORDS_PER_PAGE;
                let lo = blk % 64;
                let hi = (page_end - (blk - lo)).min(64);
                let mask = if hi - lo == 64 { u64::MAX } else { ((1u64 << (hi - lo)) - 1) << lo };
                delta += f(&page.alloc[w], &page.zeroed[w], mask);
                blk = blk - lo + hi;
            }
            page.dirty.store(true, Ordering::Release);
        }
        if delta >= 0 {
            self.allocated.fetch_add(delta as u64, Ordering::Relaxed);
        } else {
            self.allocated.fetch_sub((-delta) as u64, Ordering::Relaxed);
        }
    }

    /// The state of block `blk` and the end of its run of that state, at most `end`.
    /// Blocks past the map's capacity (a layer of a smaller, older size) are absent.
    pub fn run_at(&self, blk: u64, end: u64) -> (BlockState, u64) {
        debug_assert!(blk < end);
        const WPP: u64 = WORDS_PER_PAGE as u64;
        let blocks = self.blocks();
        if blk >= blocks {
            return (BlockState::Absent, end);
        }
        let limit = end.min(blocks);
        let mut w = blk / 64;
        let mut p = w / WPP;
        let mut page = self.page(p as usize);
        let (a, z) = page.map_or((0, 0), |pg| pg.word(w % WPP));
        let state = state_in(a, z, blk % 64);
        // Past the capacity every block is absent.
        let finish = |stop: u64| if stop >= blocks && state == BlockState::Absent { end } else { stop };
        // Bits of word `w` in another state than `state`, from `blk` on.
        let mut other = differing(state, a, z) & (u64::MAX << (blk % 64));
        if page.is_none() && state == BlockState::Absent {
            w = (p + 1) * WPP - 1; // a missing page is absent throughout: skip it
        }
        loop {
            if other != 0 {
                return (state, finish((w * 64 + other.trailing_zeros() as u64).min(limit)));
            }
            w += 1;
            if w * 64 >= limit {
                return (state, finish(limit));
            }
            if w / WPP != p {
                p = w / WPP;
                page = self.page(p as usize);
                if page.is_none() && state == BlockState::Absent {
                    w = (p + 1) * WPP - 1;
                    continue;
                }
            }
            let (a, z) = page.map_or((0, 0), |pg| pg.word(w % WPP));
            other = differing(state, a, z);
        }
    }

    /// Runs of equal state covering `range` (clipped to the map), in order.
    pub fn runs(&self, range: Range<u64>, out: &mut Vec<(Range<u64>, BlockState)>) {
        let end = range.end.min(self.blocks());
        let mut blk = range.start;
        while blk < end {
            let (state, next) = self.run_at(blk, end);
            match out.last_mut() {
                Some((r, s)) if *s == state && r.end == blk => r.end = next,
                _ => out.push((blk..next, state)),
            }
            blk = next;
        }
    }

    /// Grows the map to `blocks` (new blocks absent). Never shrinks. O(1): pages are made on
    /// first use, and the file's space beyond the old size reads as zeros (all absent).
    pub fn grow(&self, blocks: u64) {
        self.blocks.fetch_max(blocks, Ordering::AcqRel);
    }

    /// Existing pages of the map's capacity, with their index.
    fn pages(&self) -> impl Iterator<Item = (usize, &Page)> {
        (0..pages_for(self.blocks())).filter_map(|p| self.page(p).map(|pg| (p, pg)))
    }

    /// Copies the dirty pages, clearing their flags. Taken before the data is synced, so every
    /// bit in the copy describes data the sync will make durable.
    pub fn take_dirty(&self) -> DirtyPages {
        let mut out = Vec::new();
        for (p, pg) in self.pages() {
            if pg.dirty.swap(false, Ordering::AcqRel) {
                out.push((p, pg.encode()));
            }
        }
        DirtyPages(out)
    }

    /// Puts the dirty flags back after a failed write of `pages`.
    pub fn restore_dirty(&self, pages: &DirtyPages) {
        for (p, _) in &pages.0 {
            self.page_or_make(*p).dirty.store(true, Ordering::Release);
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
        reserve_file(file, blocks)?;
        map.write(file, &DirtyPages(Vec::new()))?;
        Ok(map)
    }

    /// Loads a map file. Pages with no bit set stay unmade.
    pub fn load(file: &File, what: &str) -> Result<AllocMap, StoreError> {
        let corrupt = |why: String| StoreError::Corrupt { what: what.to_string(), why };
        let mut hdr = [0u8; 28];
        file.read_exact_at(&mut hdr, 0).map_err(|e| corrupt(format!("reading header: {e}")))?;
        let blocks = decode_header(&hdr).map_err(corrupt)?;
        if blocks > crate::MAX_VOLUME_SIZE / crate::BLOCK_SIZE {
            return Err(corrupt(format!("capacity of {blocks} blocks is past the largest volume")));
        }
        let map = AllocMap::new(blocks);
        let pages = pages_for(blocks);
        let file_len = file.metadata().map_err(StoreError::Io)?.len();
        // Read many pages per call: a 100 GiB layer's map is 6.4 MiB.
        const BATCH: usize = 64;
        let page_len = PAGE_BYTES * 2;
        let mut buf = vec![0u8; page_len * BATCH];
        let mut allocated = 0u64;
        for first in (0..pages).step_by(BATCH) {
            let n = BATCH.min(pages - first);
            let off = MAP_HEADER_LEN + first as u64 * page_len as u64;
            // Pages past the end of the file were never written: all absent.
            let have = (file_len.saturating_sub(off) as usize).min(n * page_len);
            buf[have..n * page_len].fill(0);
            file.read_exact_at(&mut buf[..have], off).map_err(StoreError::Io)?;
            for k in 0..n {
                let p = first + k;
                let src = &buf[k * page_len..(k + 1) * page_len];
                if src.iter().all(|b| *b == 0) {
                    continue;
                }
                let page = map.page_or_make(p);
                for i in 0..WORDS_PER_PAGE {
                    let w = p * WORDS_PER_PAGE + i;
                    let mut a = u64::from_le_bytes(src[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
                    let z = u64::from_le_bytes(
                        src[PAGE_BYTES + i * 8..PAGE_BYTES + i * 8 + 8].try_into().expect("8 bytes"),
                    );
                    // Bits past the capacity are meaningless; never let them count.
                    let first_block = w as u64 * 64;
                    let valid = if first_block >= blocks {
                        0
                    } else if blocks - first_block < 64 {
                        (1u64 << (blocks - first_block)) - 1
                    } else {
                        u64::MAX
                    };
                    a &= valid;
                    allocated += a.count_ones() as u64;
                    page.alloc[i].store(a, Ordering::Relaxed);
                    page.zeroed[i].store(z & !a & valid, Ordering::Relaxed);
                }
            }
        }
        map.allocated.store(allocated, Ordering::Relaxed);
        Ok(map)
    }
}

/// The bits of a word pair whose state is not `state`.
fn differing(state: BlockState, a: u64, z: u64) -> u64 {
    !match state {
        BlockState::Data => a,
        BlockState::Zeroed => !a & z,
        BlockState::Absent => !a & !z,
    }
}

fn state_in(a: u64, z: u64, bit: u64) -> BlockState {
    let m = 1u64 << bit;
    if a & m != 0 {
        BlockState::Data
    } else if z & m != 0 {
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

    #[test]
    fn a_new_map_makes_no_page_and_runs_skip_missing_pages() {
        let blocks = (100u64 << 30) / 4096;
        let m = AllocMap::new(blocks);
        assert_eq!(m.pages().count(), 0);
        assert_eq!(collect(&m, 0..blocks), vec![(0..blocks, BlockState::Absent)]);
        m.set_data(5 * BLOCKS_PER_PAGE - 1..5 * BLOCKS_PER_PAGE + 1);
        assert_eq!(m.pages().count(), 2);
        // Clearing without hiding lower layers makes no page.
        m.clear(0..BLOCKS_PER_PAGE, false);
        assert_eq!(m.pages().count(), 2);
        assert_eq!(m.run_at(0, blocks), (BlockState::Absent, 5 * BLOCKS_PER_PAGE - 1));
        assert_eq!(m.run_at(5 * BLOCKS_PER_PAGE - 1, blocks), (BlockState::Data, 5 * BLOCKS_PER_PAGE + 1));
        // Past the capacity: absent to the end asked for.
        assert_eq!(m.run_at(blocks - 3, blocks + 100), (BlockState::Absent, blocks + 100));
        assert_eq!(m.run_at(blocks + 7, blocks + 100), (BlockState::Absent, blocks + 100));
        m.set_data(blocks - 2..blocks);
        assert_eq!(m.run_at(blocks - 2, blocks + 100), (BlockState::Data, blocks));
        assert_eq!(m.allocated_blocks(), 4);
        assert_eq!(m.take_dirty().0.len(), 3);
        assert_eq!(m.take_dirty().0.len(), 0);
    }

    #[test]
    fn a_capacity_past_the_largest_volume_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m");
        std::fs::write(&p, encode_header(u64::MAX / 2)).unwrap();
        let err = AllocMap::load(&File::open(&p).unwrap(), "big map").err().expect("refused");
        assert!(err.to_string().contains("largest volume"), "{err}");
    }

    /// Block counts that fit in one page, and that span several pages with a partial last one.
    fn sizes() -> impl Strategy<Value = u64> {
        prop_oneof![Just(700u64), Just(3 * BLOCKS_PER_PAGE + 4321)]
    }

    proptest! {
        #[test]
        fn runs_match_a_model(
            n in sizes(),
            ops in proptest::collection::vec((0.0f64..1.0, 0.0f64..0.4, 0u8..4), 1..40),
            probes in proptest::collection::vec(0.0f64..1.0, 8),
        ) {
            let m = AllocMap::new(n / 2);
            let mut cap = n / 2;
            let mut model = vec![BlockState::Absent; n as usize];
            for (start, len, kind) in ops {
                let start = (start * n as f64) as u64;
                let end = (start + (len * n as f64) as u64).min(cap);
                let start = start.min(end);
                match kind {
                    0 => { m.set_data(start..end); for b in start..end { model[b as usize] = BlockState::Data; } }
                    1 => { m.clear(start..end, true); for b in start..end { model[b as usize] = BlockState::Zeroed; } }
                    2 => { m.clear(start..end, false); for b in start..end { model[b as usize] = BlockState::Absent; } }
                    _ => { cap = n; m.grow(n); }
                }
            }
            let mut expect: Vec<(Range<u64>, BlockState)> = Vec::new();
            for (i, s) in model[..cap as usize].iter().enumerate() {
                let i = i as u64;
                match expect.last_mut() { Some((r, ls)) if ls == s => r.end = i + 1, _ => expect.push((i..i + 1, *s)) }
            }
            prop_assert_eq!(collect(&m, 0..cap), expect.clone());
            prop_assert_eq!(m.allocated_blocks(), model.iter().filter(|s| **s == BlockState::Data).count() as u64);
            for f in probes {
                let b = (f * cap as f64) as u64;
                prop_assert_eq!(m.get(b), model[b as usize]);
                let (state, end) = m.run_at(b, cap);
                prop_assert_eq!(state, model[b as usize]);
                prop_assert!(end > b && end <= cap);
                prop_assert!(model[b as usize..end as usize].iter().all(|s| *s == state));
                prop_assert!(end == cap || model[end as usize] != state);
            }
            // What a flush writes, a load reads back.
            let dir = tempfile::tempdir().unwrap();
            let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true)
                .open(dir.path().join("m")).unwrap();
            AllocMap::reserve(&f, cap).unwrap();
            m.write(&f, &m.take_dirty()).unwrap();
            let l = AllocMap::load(&f, "test map").unwrap();
            prop_assert_eq!(collect(&l, 0..cap), expect);
            prop_assert_eq!(l.allocated_blocks(), m.allocated_blocks());
        }
    }
}
