//! Background merge of hidden layers, so chains stay short.
//!
//! A layer `x` is merged when no volume or snapshot shows it directly and exactly one layer `c`
//! lies on it, that child being frozen (a snapshot's layer, not a head). The two become one,
//! whichever way copies less:
//!
//! * **up** (x holds fewer blocks): `x`'s blocks that `c` does not have are copied into `c`,
//!   then the catalog drops `x` from the chain;
//! * **down** (c holds fewer, the usual case: the deleted snapshot is a volume's oldest and
//!   sits on its data, the one above holds what changed since): `c`'s blocks and discards are
//!   copied into `x`, then `x` takes `c`'s place (its snapshots and children) and `c` goes.
//!   Nothing reads `x` but through `c`, and only blocks `c` hides change, so readers see the
//!   same throughout. Without this a replication or backup schedule, which drops its oldest
//!   point every cycle, would copy the whole volume up every cycle.
//!
//! Every step is crash-safe:
//!
//! 1. copy the blocks into the kept layer's data file, set its map bits, flush it (data synced
//!    before the map) — it reads the same to every reader either way;
//! 2. one catalog transaction re-links the chain and drops the other layer;
//! 3. unlink the dropped layer's files (the orphan sweep finishes it after a crash).
//!
//! A crash before 2 leaves both layers in the chain and the catalog as it was; the next open
//! finds them again and merges them again, either way (blocks the child has win over a copy
//! up; a copy down only touched blocks the child hides). A hidden layer whose child is a head
//! waits for the head's next snapshot, which freezes it.

use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use redb::{ReadableDatabase, ReadableTable};

use crate::alloc_map::BlockState;
use crate::catalog::{self, LayerRecord, SnapshotRecord, LAYERS, SNAPSHOTS};
use crate::error::StoreError;
use crate::layer::Layer;
use crate::store::BlockStore;
use crate::volume::Chain;
use crate::BLOCK_SIZE;

/// Blocks copied per read/write while merging (1 MiB).
const COPY_BLOCKS: u64 = 256;

#[derive(Debug, Default)]
pub(crate) struct MergeState {
    /// Passes asked for / passes finished; a pass started after a request covers it.
    requested: u64,
    finished: u64,
    merged: u64,
    last_error: Option<String>,
    /// The store is going away.
    stop: bool,
}

/// Shared by the store and its merge thread; the thread holds the store only during a pass,
/// so dropping the store ends it.
#[derive(Debug, Default)]
pub(crate) struct Merges {
    state: Mutex<MergeState>,
    cv: Condvar,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Merges {
    pub(crate) fn stop(&self) {
        self.state.lock().stop = true;
        self.cv.notify_all();
    }

    fn stopping(&self) -> bool {
        self.state.lock().stop
    }

    /// Stops the thread and waits for it (a merge in progress stops at its next chunk and is
    /// redone at the next open).
    pub(crate) fn stop_and_join(&self) {
        self.stop();
        let handle = self.thread.lock().take();
        if let Some(h) = handle {
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
    }
}

/// Starts the merge thread of `store` and asks it for a pass (merges a crash interrupted).
pub(crate) fn start(store: &Arc<BlockStore>) {
    store.kick_merges();
    let weak = Arc::downgrade(store);
    let merges = store.merges.clone();
    let spawned = std::thread::Builder::new().name("evs-merge".into()).spawn(move || run(&merges, weak));
    match spawned {
        Ok(h) => *store.merges.thread.lock() = Some(h),
        Err(e) => {
            tracing::error!(error = %e, "cannot start the layer merge thread; deleted snapshots keep their layers")
        }
    }
}

fn run(merges: &Merges, weak: Weak<BlockStore>) {
    loop {
        let target = {
            let mut st = merges.state.lock();
            while st.requested == st.finished && !st.stop {
                merges.cv.wait(&mut st);
            }
            if st.stop {
                return;
            }
            st.requested
        };
        let Some(store) = weak.upgrade() else { return };
        let res = store.merge_pass();
        drop(store);
        let mut st = merges.state.lock();
        match res {
            Ok(n) => {
                st.merged += n;
                st.last_error = None;
            }
            Err(e) => {
                tracing::error!(error = %e, "layer merge failed; it is retried at the next snapshot change or restart");
                st.last_error = Some(e.to_string());
            }
        }
        st.finished = target;
        merges.cv.notify_all();
    }
}

impl BlockStore {
    /// Asks the merge thread for a pass.
    pub(crate) fn kick_merges(&self) {
        let mut st = self.merges.state.lock();
        st.requested += 1;
        self.merges.cv.notify_all();
    }

    /// Waits until every merge asked for so far is done; returns how many layers were merged
    /// since the store opened, or the error of the last pass.
    pub fn wait_merges(&self) -> Result<u64, StoreError> {
        let mut st = self.merges.state.lock();
        let target = st.requested;
        while st.finished < target && !st.stop {
            self.merges.cv.wait_for(&mut st, Duration::from_millis(100));
        }
        match &st.last_error {
            Some(e) => Err(StoreError::Io(std::io::Error::other(e.clone()))),
            None => Ok(st.merged),
        }
    }

    /// Merges every mergeable layer; returns how many.
    fn merge_pass(&self) -> Result<u64, StoreError> {
        let mut n = 0;
        while let Some((x, c)) = self.find_merge()? {
            if !self.merge_one(x, c)? {
                break;
            }
            n += 1;
        }
        Ok(n)
    }

    fn find_merge(&self) -> Result<Option<(u64, u64)>, StoreError> {
        let rtxn = self.db.begin_read()?;
        let t = rtxn.open_table(LAYERS)?;
        for row in t.iter()? {
            let (_, v) = row?;
            let rec: LayerRecord = catalog::decode(v.value(), "layer")?;
            let Some(c) = rec.merge_candidate() else { continue };
            let child: LayerRecord = catalog::must(&t, c, "layer")?;
            if child.head_of.is_none() {
                return Ok(Some((rec.id, c)));
            }
        }
        Ok(None)
    }

    /// Merges layer `x` with its only child `c` (frozen), whichever way copies less. False if
    /// the store is closing (the merge is left for the next open) or the catalog changed
    /// meanwhile.
    fn merge_one(&self, x: u64, c: u64) -> Result<bool, StoreError> {
        let lx = self.layer(x, false)?;
        let lc = self.layer(c, false)?;
        // The oldest snapshot of a volume sits on the layer holding most of its data; the
        // one above holds what changed since. Copying the small one down costs what changed.
        let down = lc.map.allocated_blocks() < lx.map.allocated_blocks();
        let copied = if down { self.copy_down(&lx, &lc)? } else { self.copy_up(&lx, &lc)? };
        if !copied {
            return Ok(false);
        }
        crate::crash_point!("merge-after-copy");
        crate::delay_point!("merge-before-commit");
        // The layer that goes, and the one that stays in its place.
        let (gone, kept) = if down { (c, x) } else { (x, c) };

        let _admin = self.lock_admin();
        let txn = self.db.begin_write()?;
        {
            let mut lt = txn.open_table(LAYERS)?;
            let Some(xr) = catalog::get::<LayerRecord>(&lt, x, "layer")? else { return Ok(false) };
            if xr.merge_candidate() != Some(c) {
                return Ok(false); // changed meanwhile: the next pass decides again
            }
            let cr: LayerRecord = catalog::must(&lt, c, "layer")?;
            if cr.head_of.is_some() {
                return Ok(false);
            }
            if down {
                // `x` takes `c`'s place: its snapshots and children.
                let merged = LayerRecord { id: x, parent: xr.parent, ..cr.clone() };
                catalog::put(&mut lt, x, &merged)?;
                for ch in &cr.children {
                    let mut chr: LayerRecord = catalog::must(&lt, *ch, "layer")?;
                    chr.parent = Some(x);
                    catalog::put(&mut lt, *ch, &chr)?;
                }
                let mut st = txn.open_table(SNAPSHOTS)?;
                for sid in &cr.snapshots {
                    let mut sr: SnapshotRecord = catalog::must(&st, *sid, "snapshot")?;
                    sr.layer = x;
                    catalog::put(&mut st, *sid, &sr)?;
                }
                lt.remove(c)?;
            } else {
                let mut cr = cr;
                cr.parent = xr.parent;
                catalog::put(&mut lt, c, &cr)?;
                if let Some(p) = xr.parent {
                    let mut pr: LayerRecord = catalog::must(&lt, p, "layer")?;
                    for ch in pr.children.iter_mut() {
                        if *ch == x {
                            *ch = c;
                        }
                    }
                    catalog::put(&mut lt, p, &pr)?;
                }
                lt.remove(x)?;
            }
        }
        txn.commit()?;
        crate::crash_point!("merge-after-commit");
        // Every chain through `c` goes on through `x`: the kept one now reads as both did.
        let holders: Vec<_> = self.open.lock().values().chain(self.views.lock().values()).cloned().collect();
        for v in holders {
            let ch = v.chain();
            if ch.layers.iter().any(|l| l.id == gone) {
                v.set_chain(Chain::new(ch.layers.iter().filter(|l| l.id != gone).cloned().collect()));
            }
        }
        drop((lx, lc));
        // Unlinking a large sparse file can take milliseconds (discards): not under the lock
        // every snapshot create and delete takes. Nothing refers to it any more.
        drop(_admin);
        self.unlink_layers(&[gone]);
        tracing::info!(layer = gone, into = kept, down, "merged a deleted snapshot's layer");
        Ok(true)
    }

    /// Copies the blocks of `lx` that `lc` does not have into `lc`, then flushes `lc`. `lc`
    /// reads the same before and after: the copies equal what it read through to.
    fn copy_up(&self, lx: &Layer, lc: &Layer) -> Result<bool, StoreError> {
        let mut runs = Vec::new();
        lx.map.runs(0..lx.map.blocks(), &mut runs);
        let limit = lc.map.blocks();
        let mut sub = Vec::new();
        let mut buf = Vec::new();
        for (r, state) in runs {
            if state == BlockState::Absent || r.start >= limit {
                continue;
            }
            sub.clear();
            lc.map.runs(r.start..r.end.min(limit), &mut sub);
            for (s, cs) in sub.drain(..) {
                if cs != BlockState::Absent {
                    continue; // the child has its own block (or discarded it): it wins
                }
                if state == BlockState::Zeroed {
                    lc.map.clear(s, true);
                    continue;
                }
                if !self.copy_blocks(lx, lc, s, &mut buf)? {
                    return Ok(false);
                }
            }
        }
        lc.mark_changed();
        lc.flush()?;
        Ok(true)
    }

    /// Copies the blocks `lc` holds or discarded down into `lx`, then flushes `lx`. Nothing
    /// reads `lx` but through `lc` (it has no snapshot, no other child, heads nothing), and
    /// only blocks `lc` hides change: every reader sees the same before and after.
    fn copy_down(&self, lx: &Layer, lc: &Layer) -> Result<bool, StoreError> {
        if lc.map.blocks() > lx.map.blocks() {
            lx.grow(lc.map.blocks() * BLOCK_SIZE)?;
        }
        let has_parent = self.chain_ids(lx.id)?.len() > 1;
        let mut runs = Vec::new();
        lc.map.runs(0..lc.map.blocks(), &mut runs);
        let mut buf = Vec::new();
        for (r, state) in runs {
            match state {
                BlockState::Absent => {}
                BlockState::Zeroed => {
                    // Discarded in `c`: `x` reads as zeros there too (over its parent, if any).
                    lx.map.clear(r.clone(), has_parent);
                    lx.punch_hole(r.start * BLOCK_SIZE, (r.end - r.start) * BLOCK_SIZE)?;
                }
                BlockState::Data => {
                    if !self.copy_blocks(lc, lx, r, &mut buf)? {
                        return Ok(false);
                    }
                }
            }
        }
        lx.mark_changed();
        lx.flush()?;
        Ok(true)
    }

    /// Copies blocks `r` of `from` into `to`, setting `to`'s bits after each piece's data is in
    /// place. False when the store is closing.
    fn copy_blocks(
        &self,
        from: &Layer,
        to: &Layer,
        r: std::ops::Range<u64>,
        buf: &mut Vec<u8>,
    ) -> Result<bool, StoreError> {
        buf.resize((COPY_BLOCKS * BLOCK_SIZE) as usize, 0);
        let mut b = r.start;
        while b < r.end {
            if self.merges.stopping() {
                return Ok(false);
            }
            let e = (b + COPY_BLOCKS).min(r.end);
            let bytes = &mut buf[..((e - b) * BLOCK_SIZE) as usize];
            std::os::unix::fs::FileExt::read_exact_at(from.data_file(), bytes, b * BLOCK_SIZE)?;
            std::os::unix::fs::FileExt::write_all_at(to.data_file(), bytes, b * BLOCK_SIZE)?;
            to.map.set_data(b..e);
            b = e;
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use crate::{BlockStore, EngineKind, StoreOptions};

    fn store(dir: &std::path::Path) -> std::sync::Arc<BlockStore> {
        let opts =
            StoreOptions { engine: EngineKind::Portable, direct_writes: false, direct_write_max: 0, max_snapshots: 8 };
        BlockStore::open(dir, opts).unwrap()
    }

    /// Deleting a volume's oldest snapshot copies what changed since, down into the old data
    /// (the kept layer is the old one); deleting one whose successor holds more copies up.
    #[test]
    fn merges_copy_the_smaller_layer() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let id = s.create_volume("t", "v", 8 << 20).unwrap().id;
        let v = s.open_volume(id).unwrap();
        let big: Vec<u8> = (0..4 << 20).map(|i| (i % 251) as u8).collect();
        v.write_at(0, &big).unwrap();
        let a = s.create_snapshot(id, "a").unwrap();
        v.write_at(4096, &[7u8; 4096]).unwrap();
        v.trim(8192, 4096).unwrap();
        let b = s.create_snapshot(id, "b").unwrap();
        s.delete_snapshot(a.id).unwrap();
        s.wait_merges().unwrap();
        // Down: b now sits on a's old layer, which holds everything.
        let b_now = s.snapshot_info(b.id).unwrap();
        assert_eq!(b_now.layer, a.layer, "the small layer was copied down into the big one");
        assert_eq!(v.chain().layers.len(), 2);
        let view = s.open_snapshot(b.id).unwrap();
        let mut got = vec![0u8; 4 << 20];
        view.read_at(0, &mut got).unwrap();
        let mut want = big.clone();
        want[4096..8192].fill(7);
        want[8192..12288].fill(0);
        assert_eq!(got, want);

        // Up: the head above b gets more data than b's layer holds... then c is taken and b
        // deleted: b's layer (4 MiB) against c's (6 MiB).
        let more: Vec<u8> = (0..6 << 20).map(|i| (i % 13) as u8).collect();
        v.write_at(0, &more).unwrap();
        let c = s.create_snapshot(id, "c").unwrap();
        s.delete_snapshot(b.id).unwrap();
        s.wait_merges().unwrap();
        assert_eq!(s.snapshot_info(c.id).unwrap().layer, c.layer, "the small layer was copied up");
        assert_eq!(v.chain().layers.len(), 2);
        let mut got = vec![0u8; 8 << 20];
        s.open_snapshot(c.id).unwrap().read_at(0, &mut got).unwrap();
        assert_eq!(&got[..6 << 20], &more[..]);
        assert!(got[6 << 20..].iter().all(|b| *b == 0));
        // And after a restart the catalog says the same.
        drop((v, s));
        let s = store(dir.path());
        let mut again = vec![0u8; 8 << 20];
        s.open_snapshot(c.id).unwrap().read_at(0, &mut again).unwrap();
        assert_eq!(again, got);
    }
}
