//! The read index of a chain's frozen layers: for each block, which of them holds it.
//!
//! A read resolves a block by asking each layer top-down; every layer costs a few cache lines
//! of bitmap, so 16 layers cost more than the read of a 4 KiB block from the page cache. The
//! layers under the head are frozen (a merge only copies a lower layer's blocks into the one
//! above it, with the same bytes, before the chain is replaced), so what they say of a block
//! can be computed once: this index keeps, per bitmap page (128 MiB of volume), one byte per
//! block naming the top-most frozen layer that says anything of it. A read then costs the head's
//! word and one byte, whatever the chain's length.
//!
//! Built lazily per page on first read, dropped with its [`Chain`](crate::volume::Chain) (a
//! snapshot, merge or rollback makes a new one). Only chains with at least [`MIN_FROZEN`]
//! frozen layers use it: shorter ones walk as fast. Memory: 32 KiB per 128 MiB region read, at
//! most 1/4096 of the volume's size.

use std::sync::{Arc, OnceLock};

use crate::alloc_map::{BlockState, BLOCKS_PER_PAGE, WORDS_PER_PAGE};
use crate::layer::Layer;

/// Frozen layers from which a chain is indexed.
pub const MIN_FROZEN: usize = 3;
/// Owner byte: no frozen layer says anything of the block.
const ABSENT: u8 = 0;
/// Owner byte: the top-most frozen layer that says anything of it discarded it.
const ZEROED: u8 = u8::MAX;
/// Frozen layers an owner byte can name (1..=MAX_INDEXED); deeper chains walk.
const MAX_INDEXED: usize = (u8::MAX - 1) as usize;

type Owners = [u8; BLOCKS_PER_PAGE as usize];

pub struct ChainIndex {
    /// Per bitmap page of the deepest frozen layer's capacity; empty when not indexed.
    pages: Box<[OnceLock<Box<Owners>>]>,
}

impl ChainIndex {
    /// The index of `frozen` (top-most first), or an unused one when a walk is as fast.
    pub fn new(frozen: &[Arc<Layer>]) -> ChainIndex {
        let indexed = (MIN_FROZEN..=MAX_INDEXED).contains(&frozen.len());
        let blocks = if indexed { frozen.iter().map(|l| l.map.blocks()).max().unwrap_or(0) } else { 0 };
        ChainIndex { pages: (0..blocks.div_ceil(BLOCKS_PER_PAGE)).map(|_| OnceLock::new()).collect() }
    }

    pub fn is_used(&self) -> bool {
        !self.pages.is_empty()
    }

    /// What the frozen layers say of `blk`, the layer holding it (for `Data`) and the end (at
    /// most `end`) of the run of blocks they say the same of. Only when [`Self::is_used`].
    pub fn state_at<'a>(
        &self,
        frozen: &'a [Arc<Layer>],
        blk: u64,
        end: u64,
    ) -> (BlockState, Option<&'a Arc<Layer>>, u64) {
        let mut p = (blk / BLOCKS_PER_PAGE) as usize;
        let Some(slot) = self.pages.get(p) else { return (BlockState::Absent, None, end) };
        let mut owners = slot.get_or_init(|| build_page(frozen, p));
        let owner = owners[(blk % BLOCKS_PER_PAGE) as usize];
        let mut b = blk;
        loop {
            let page_start = p as u64 * BLOCKS_PER_PAGE;
            let stop = end.min(page_start + BLOCKS_PER_PAGE);
            let same = run_len(&owners[(b - page_start) as usize..(stop - page_start) as usize], owner);
            b += same as u64;
            if b < stop || b == end {
                break;
            }
            p += 1;
            match self.pages.get(p) {
                Some(slot) => owners = slot.get_or_init(|| build_page(frozen, p)),
                // Past every frozen layer's capacity: absent.
                None if owner == ABSENT => {
                    b = end;
                    break;
                }
                None => break,
            }
        }
        match owner {
            ABSENT => (BlockState::Absent, None, b),
            ZEROED => (BlockState::Zeroed, None, b),
            i => (BlockState::Data, Some(&frozen[i as usize - 1]), b),
        }
    }
}

/// How many bytes at the start of `bytes` equal `v`, eight at a time where it can.
fn run_len(bytes: &[u8], v: u8) -> usize {
    let splat = u64::from_ne_bytes([v; 8]);
    let mut n = 0;
    for chunk in bytes.chunks_exact(8) {
        if u64::from_ne_bytes(chunk.try_into().expect("8 bytes")) != splat {
            break;
        }
        n += 8;
    }
    n + bytes[n..].iter().take_while(|b| **b == v).count()
}

/// The owner bytes of bitmap page `p`: each block's top-most frozen layer that says anything.
fn build_page(frozen: &[Arc<Layer>], p: usize) -> Box<Owners> {
    let mut owners: Box<Owners> =
        vec![ABSENT; BLOCKS_PER_PAGE as usize].into_boxed_slice().try_into().expect("page size");
    // Bits of blocks no layer above has said anything of yet.
    let mut open = [u64::MAX; WORDS_PER_PAGE];
    for (i, layer) in frozen.iter().enumerate() {
        let Some(page) = layer.map.page(p) else { continue };
        let tag = i as u8 + 1;
        for (w, open_w) in open.iter_mut().enumerate() {
            if *open_w == 0 {
                continue;
            }
            let (a, z) = page.word(w as u64);
            let hit = (a | z) & *open_w;
            if hit == 0 {
                continue;
            }
            *open_w &= !hit;
            let mut bits = hit;
            while bits != 0 {
                let bit = bits.trailing_zeros() as u64;
                owners[w * 64 + bit as usize] = if a & (1 << bit) != 0 { tag } else { ZEROED };
                bits &= bits - 1;
            }
        }
        if open.iter().all(|w| *w == 0) {
            break;
        }
    }
    owners
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::top_state_at;
    use proptest::prelude::*;

    const PAGE: u64 = BLOCKS_PER_PAGE;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// The index answers exactly what a walk of the same layers answers.
        #[test]
        fn index_equals_the_walk(
            caps in proptest::collection::vec(1u64..4 * PAGE, 3..7),
            ops in proptest::collection::vec((0usize..7, 0.0f64..1.0, 1u64..3000, 0u8..3), 1..60),
            probes in proptest::collection::vec((0.0f64..1.2, 1u64..2 * PAGE), 32),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let layers: Vec<Arc<Layer>> = caps
                .iter()
                .enumerate()
                .map(|(i, c)| Arc::new(Layer::create(dir.path(), i as u64 + 1, c * 4096, false).unwrap()))
                .collect();
            for (l, at, len, kind) in ops {
                let layer = &layers[l % layers.len()];
                let start = (at * layer.map.blocks() as f64) as u64;
                match kind {
                    0 => layer.map.set_data(start..start + len),
                    1 => layer.map.clear(start..start + len, true),
                    _ => layer.map.clear(start..start + len, false),
                }
            }
            let index = ChainIndex::new(&layers);
            prop_assert!(index.is_used());
            let top = caps.iter().max().copied().unwrap();
            for (at, len) in probes {
                let blk = (at * top as f64) as u64;
                let end = blk + len;
                let (s1, l1, e1) = index.state_at(&layers, blk, end);
                let (s2, l2, e2) = top_state_at(&layers, blk, end);
                prop_assert_eq!((s1, l1.map(|l| l.id)), (s2, l2.map(|l| l.id)), "at {} len {}", blk, len);
                if s1 == BlockState::Data {
                    prop_assert_eq!(e1, e2);
                } else {
                    // The walk may end a zeroed or absent run where the layer saying so changes;
                    // the index's run is the longest of that state.
                    let mut b = e2;
                    while b < e1 {
                        let (s, _, e) = top_state_at(&layers, b, e1);
                        prop_assert_eq!(s, s1, "walk at {} inside the index's run {}..{}", b, blk, e1);
                        b = e;
                    }
                    if e1 < end {
                        prop_assert_ne!(top_state_at(&layers, e1, end).0, s1, "run ending at {} could go on", e1);
                    }
                }
            }
        }
    }

    #[test]
    fn short_chains_walk() {
        let dir = tempfile::tempdir().unwrap();
        let layers: Vec<Arc<Layer>> =
            (1..=2).map(|i| Arc::new(Layer::create(dir.path(), i, 1 << 20, false).unwrap())).collect();
        assert!(!ChainIndex::new(&layers).is_used());
    }
}
