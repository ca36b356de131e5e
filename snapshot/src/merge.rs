//! Background merge of hidden layers, so chains stay short.
//!
//! A layer is merged when no volume or snapshot shows it directly and exactly one layer lies on
//! it, that child being frozen (a snapshot's layer, not a head): its blocks that the child does
//! not have are copied into the child, then the catalog drops it from the chain. Every step is
//! crash-safe:
//!
//! 1. copy the blocks into the child's data file, set the child's map bits, flush the child
//!    (data synced before the map) — the child now reads the same either way, since the copies
//!    equal what it read through to;
//! 2. one catalog transaction re-links the child to the merged layer's parent and drops it;
//! 3. unlink the merged layer's files (the orphan sweep finishes it after a crash).
//!
//! A crash before 2 leaves the layer in the chain and the catalog as it was; the next open
//! finds it again and merges it again (blocks already copied are skipped). A hidden layer whose
//! child is a head waits for the head's next snapshot, which freezes it.

use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use redb::{ReadableDatabase, ReadableTable};

use crate::alloc_map::BlockState;
use crate::catalog::{self, LayerRecord, LAYERS};
use crate::error::StoreError;
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

    /// Merges layer `x` into its only child `c` (frozen). False if the store is closing (the
    /// merge is left for the next open) or the catalog changed meanwhile.
    fn merge_one(&self, x: u64, c: u64) -> Result<bool, StoreError> {
        let lx = self.layer(x, false)?;
        let lc = self.layer(c, false)?;
        let mut runs = Vec::new();
        lx.map.runs(0..lx.map.blocks(), &mut runs);
        let limit = lc.map.blocks();
        let mut buf = vec![0u8; (COPY_BLOCKS * BLOCK_SIZE) as usize];
        let mut sub = Vec::new();
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
                let mut b = s.start;
                while b < s.end {
                    if self.merges.stopping() {
                        return Ok(false);
                    }
                    let e = (b + COPY_BLOCKS).min(s.end);
                    let bytes = &mut buf[..((e - b) * BLOCK_SIZE) as usize];
                    std::os::unix::fs::FileExt::read_exact_at(lx.data_file(), bytes, b * BLOCK_SIZE)?;
                    std::os::unix::fs::FileExt::write_all_at(lc.data_file(), bytes, b * BLOCK_SIZE)?;
                    // Readers of the child see the bit only after its data is in place.
                    lc.map.set_data(b..e);
                    b = e;
                }
            }
        }
        lc.mark_changed();
        lc.flush()?;
        crate::crash_point!("merge-after-copy");

        let _admin = self.lock_admin();
        let txn = self.db.begin_write()?;
        {
            let mut lt = txn.open_table(LAYERS)?;
            let Some(xr) = catalog::get::<LayerRecord>(&lt, x, "layer")? else { return Ok(false) };
            if xr.merge_candidate() != Some(c) {
                return Ok(false); // changed meanwhile: the next pass decides again
            }
            let mut cr: LayerRecord = catalog::must(&lt, c, "layer")?;
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
        txn.commit()?;
        crate::crash_point!("merge-after-commit");
        let holders: Vec<_> = self.open.lock().values().chain(self.views.lock().values()).cloned().collect();
        for v in holders {
            let ch = v.chain();
            if ch.layers.iter().any(|l| l.id == x) {
                v.set_chain(Chain::new(ch.layers.iter().filter(|l| l.id != x).cloned().collect()));
            }
        }
        drop(lx);
        // Unlinking a large sparse file can take milliseconds (discards): not under the lock
        // every snapshot create and delete takes. Nothing refers to `x` any more.
        drop(_admin);
        self.unlink_layers(&[x]);
        tracing::info!(layer = x, into = c, "merged a deleted snapshot's layer");
        Ok(true)
    }
}
