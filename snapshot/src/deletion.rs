//! Deleting a volume in two steps, so that destroying a large volume's data can be spread out
//! and report progress:
//!
//! 1. [`BlockStore::remove_volume`]: one catalog transaction removes the volume, its snapshots
//!    and every layer nothing else refers to (a clone keeps the layers it shares). From the
//!    commit on, the volume is gone and its unreferenced layer files are orphans.
//! 2. [`BlockStore::destroy_removed`]: the orphans' data files are punched step by step
//!    (`FALLOC_FL_PUNCH_HOLE`, skipping holes with `SEEK_DATA`), reporting the bytes freed
//!    after each step, then unlinked.
//!
//! Crash safety: a crash before the commit leaves the volume as it was (a retry redoes the
//! whole deletion); a crash after it leaves orphan files, which [`BlockStore::open`] removes.
//! Unlinking a multi-TiB file in one go makes the filesystem free all its extents in one
//! syscall, holding the inode (and on some filesystems the journal) for a long time; punching
//! a bounded range at a time keeps each step short and lets the caller pace the work.

use std::fs::OpenOptions;
use std::ops::ControlFlow;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use rustix::fs::{FallocateFlags, SeekFrom};

use crate::catalog::{
    self, LayerRecord, SnapshotRecord, VolumeRecord, LAYERS, SNAPSHOTS, SNAPSHOT_NAMES, VOLUMES, VOLUME_NAMES,
};
use crate::error::StoreError;
use crate::layer;
use crate::store::BlockStore;

/// What [`BlockStore::remove_volume`] took out of the catalog: layer files to destroy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRemoval {
    /// The volume's id (gone from the catalog).
    pub volume: u64,
    /// Layers no longer in the catalog whose files are to be destroyed.
    pub layers: Vec<u64>,
    /// Bytes the filesystem holds for their data files (allocated blocks, not the apparent
    /// size: a thin volume's holes cost nothing to destroy).
    pub bytes: u64,
}

/// Bytes the filesystem allocated to a file (0 when it is gone).
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.blocks() * 512).unwrap_or(0)
}

impl BlockStore {
    /// Removes volume `id`, its snapshots, and the layers nothing else uses from the catalog,
    /// in one transaction. The layers' files stay until [`destroy_removed`](Self::destroy_removed)
    /// (or the next open) destroys them. The caller makes sure nothing serves the volume.
    pub fn remove_volume(&self, id: u64) -> Result<VolumeRemoval, StoreError> {
        let admin = self.lock_admin();
        let txn = self.db.begin_write()?;
        let (doomed, snaps) = {
            let mut vols = txn.open_table(VOLUMES)?;
            let rec: VolumeRecord = match vols.remove(id)? {
                Some(v) => catalog::decode(v.value(), "volume record")?,
                None => return Err(StoreError::VolumeNotFound(format!("#{id}"))),
            };
            txn.open_table(VOLUME_NAMES)?.remove(catalog::name_key(&rec.owner, &rec.name).as_str())?;
            let mut layers = txn.open_table(LAYERS)?;
            let mut touched = vec![rec.head];
            let mut sn = txn.open_table(SNAPSHOT_NAMES)?;
            let snaps = crate::snapshots::snapshot_ids_in(&sn, id)?;
            {
                let mut st = txn.open_table(SNAPSHOTS)?;
                for s in &snaps {
                    let Some(sr) = catalog::get::<SnapshotRecord>(&st, *s, "snapshot")? else { continue };
                    st.remove(*s)?;
                    sn.remove(catalog::snapshot_key(id, &sr.name).as_str())?;
                    let mut lr: LayerRecord = catalog::must(&layers, sr.layer, "layer")?;
                    lr.snapshots.retain(|x| x != s);
                    catalog::put(&mut layers, sr.layer, &lr)?;
                    touched.push(sr.layer);
                }
            }
            let mut hr: LayerRecord = catalog::must(&layers, rec.head, "layer")?;
            hr.head_of = None;
            catalog::put(&mut layers, rec.head, &hr)?;
            (catalog::collect_garbage(&mut layers, touched)?, snaps)
        };
        txn.commit()?;
        self.open.lock().remove(&id);
        {
            let mut views = self.views.lock();
            for s in &snaps {
                views.remove(s);
            }
        }
        self.forget_layers(&doomed);
        drop(admin);
        self.kick_merges();
        let bytes = doomed.iter().map(|l| allocated(&layer::data_path(&self.layers_dir, *l))).sum();
        Ok(VolumeRemoval { volume: id, layers: doomed, bytes })
    }

    /// Destroys the files of a removal: each data file is punched `step` bytes at a time
    /// (holes skipped), then both files are unlinked. After every step `progress` gets the
    /// bytes that step freed; [`ControlFlow::Break`] stops at once, leaving the rest as orphans
    /// for the next open to remove. Returns whether everything was destroyed.
    pub fn destroy_removed(
        &self,
        removal: &VolumeRemoval,
        step: u64,
        mut progress: impl FnMut(u64) -> ControlFlow<()>,
    ) -> Result<bool, StoreError> {
        let step = step.max(crate::BLOCK_SIZE);
        for id in &removal.layers {
            if !destroy_layer_files(&self.layers_dir, *id, step, &mut progress)? {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// Punches and unlinks the files of layer `id`. False if `progress` asked to stop.
fn destroy_layer_files(
    dir: &Path,
    id: u64,
    step: u64,
    progress: &mut impl FnMut(u64) -> ControlFlow<()>,
) -> Result<bool, StoreError> {
    let data = layer::data_path(dir, id);
    match OpenOptions::new().write(true).open(&data) {
        Ok(f) => {
            let len = f.metadata()?.len();
            let mut held = f.metadata()?.blocks() * 512;
            let mut off = 0;
            while off < len {
                let start = match rustix::fs::seek(&f, SeekFrom::Data(off)) {
                    Ok(p) => p,
                    // No data past `off`.
                    Err(rustix::io::Errno::NXIO) => break,
                    // A filesystem without SEEK_DATA: punch everything in order.
                    Err(_) => off,
                };
                if start >= len {
                    break;
                }
                let end = start.saturating_add(step).min(len);
                let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
                match rustix::fs::fallocate(&f, flags, start, end - start) {
                    Ok(()) => {}
                    // No hole punching here: the unlink below frees it all at once.
                    Err(rustix::io::Errno::OPNOTSUPP) => break,
                    Err(e) => return Err(StoreError::Io(e.into())),
                }
                let now = f.metadata()?.blocks() * 512;
                // A merge still copying into the file can add blocks: never report less than 0.
                let freed = held.saturating_sub(now);
                held = now;
                off = end;
                if progress(freed).is_break() {
                    return Ok(false);
                }
            }
            drop(f);
            remove_if_present(&data)?;
            remove_if_present(&layer::map_path(dir, id))?;
            // What the punches left (or all of it, where punching is not supported) went with
            // the unlink.
            Ok(held == 0 || progress(held).is_continue())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            remove_if_present(&layer::map_path(dir, id))?;
            Ok(true)
        }
        Err(e) => Err(e.into()),
    }
}

fn remove_if_present(p: &Path) -> Result<(), StoreError> {
    match std::fs::remove_file(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io_engine::EngineKind;
    use crate::store::StoreOptions;
    use std::os::unix::fs::FileExt;

    fn open(dir: &Path) -> std::sync::Arc<BlockStore> {
        let opts = StoreOptions { engine: EngineKind::Portable, direct_writes: false, ..Default::default() };
        BlockStore::open(dir, opts).unwrap()
    }

    /// Writes `len` bytes of 0xab at `off` straight into the head's data file (the map does
    /// not matter for destruction: every allocated byte of the file goes).
    fn fill(store: &BlockStore, dir: &Path, vol: u64, off: u64, len: usize) {
        let head = store.volume_info(vol).unwrap().layers[0];
        let f = OpenOptions::new().write(true).open(layer::data_path(&dir.join("layers"), head)).unwrap();
        f.write_all_at(&vec![0xab; len], off).unwrap();
        f.sync_all().unwrap();
    }

    fn layer_files(dir: &Path) -> usize {
        std::fs::read_dir(dir.join("layers")).unwrap().count()
    }

    #[test]
    fn removal_commits_first_then_destroys_with_progress() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let v = store.create_volume("t", "v", 64 << 20).unwrap();
        let keep = store.create_volume("t", "keep", 1 << 20).unwrap();
        fill(&store, dir.path(), v.id, 0, 4 << 20);
        fill(&store, dir.path(), v.id, 40 << 20, 4 << 20);
        store.create_snapshot(v.id, "s").unwrap();
        fill(&store, dir.path(), v.id, 8 << 20, 1 << 20);
        assert_eq!(layer_files(dir.path()), 6);

        let r = store.remove_volume(v.id).unwrap();
        assert_eq!(r.layers.len(), 2, "head and snapshot layer");
        assert!(r.bytes >= 9 << 20, "{}", r.bytes);
        assert!(matches!(store.volume_info(v.id), Err(StoreError::VolumeNotFound(_))));
        assert!(matches!(store.remove_volume(v.id), Err(StoreError::VolumeNotFound(_))));
        assert_eq!(layer_files(dir.path()), 6, "files stay until destroyed");

        let mut steps = Vec::new();
        assert!(store
            .destroy_removed(&r, 1 << 20, |b| {
                steps.push(b);
                ControlFlow::Continue(())
            })
            .unwrap());
        assert_eq!(steps.iter().sum::<u64>(), r.bytes, "progress adds up to the total");
        assert!(steps.len() >= 9, "one step per MiB of data, holes skipped: {steps:?}");
        assert!(steps.len() < 30, "holes are skipped, not punched MiB by MiB: {} steps", steps.len());
        assert_eq!(layer_files(dir.path()), 2, "only the other volume's files are left");
        assert_eq!(store.volume_info(keep.id).unwrap().name, "keep");
    }

    #[test]
    fn an_interrupted_destruction_is_finished_by_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let v = store.create_volume("t", "v", 16 << 20).unwrap();
        fill(&store, dir.path(), v.id, 0, 8 << 20);
        let r = store.remove_volume(v.id).unwrap();
        let mut n = 0;
        let done = store
            .destroy_removed(&r, 1 << 20, |_| {
                n += 1;
                if n == 2 {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })
            .unwrap();
        assert!(!done);
        assert_eq!(layer_files(dir.path()), 2, "the orphans are left");
        store.close();
        let store = open(dir.path());
        assert_eq!(layer_files(dir.path()), 0, "the sweep at open removed them");
        assert!(store.list_volumes(None).unwrap().is_empty());
    }

    #[test]
    fn layers_a_clone_shares_survive() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let v = store.create_volume("t", "v", 8 << 20).unwrap();
        fill(&store, dir.path(), v.id, 0, 1 << 20);
        let s = store.create_snapshot(v.id, "s").unwrap();
        let c = store.clone_snapshot("t", "c", s.id, None).unwrap();
        let r = store.remove_volume(v.id).unwrap();
        assert_eq!(r.layers.len(), 1, "only the head goes; the snapshot's layer is the clone's parent");
        assert!(!r.layers.contains(&s.layer));
        store.destroy_removed(&r, 1 << 30, |_| ControlFlow::Continue(())).unwrap();
        let info = store.volume_info(c.id).unwrap();
        assert_eq!(info.layers.len(), 2);
        assert!(layer::data_path(&dir.path().join("layers"), s.layer).exists());
    }
}
