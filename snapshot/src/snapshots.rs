//! Snapshots, group snapshots, clones, rollback and changed-block tracking.
//!
//! A snapshot freezes a volume's head layer and gives the volume a new empty head on top of
//! it: O(1) whatever the size, since no data moves. The freeze stops new writes at one instant
//! (the volume's write gate), waits for those in progress, flushes the old head (data, then
//! map), and commits the snapshot in one catalog transaction; a group snapshot freezes all its
//! volumes before any is committed, so one instant holds for all of them.
//!
//! A clone is a new head over a snapshot's layer (layers are shared; the catalog counts who
//! refers to each). Rollback gives the volume a new empty head over the snapshot's layer;
//! layers of later snapshots stay. Deleting a snapshot only drops its reference; a layer that
//! then lies hidden below exactly one frozen layer is merged into it in the background
//! (`merge.rs`), so chains stay as long as the live snapshots make them.
//!
//! Changed blocks between two snapshots of one lineage are the blocks any layer between them
//! holds or discarded: read from the allocation maps, never from the data.

use std::ops::Range;
use std::sync::Arc;

use redb::{ReadableDatabase, ReadableTable};

use crate::alloc_map::BlockState;
use crate::catalog::{self, LayerRecord, SnapshotRecord, VolumeRecord, LAYERS, SNAPSHOTS, SNAPSHOT_NAMES, VOLUMES};
use crate::error::StoreError;
use crate::layer::Layer;
use crate::store::{now_unix, BlockStore, VolumeInfo, WithVolume};
use crate::volume::{Chain, Volume};
use crate::BLOCK_SIZE;

/// What the catalog says of one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotInfo {
    pub id: u64,
    pub volume: u64,
    pub name: String,
    /// Volume size when it was taken.
    pub size: u64,
    /// Unix seconds.
    pub created: u64,
    pub group: Option<String>,
    /// The frozen layer that is the top of the snapshot's chain.
    pub layer: u64,
}

impl From<SnapshotRecord> for SnapshotInfo {
    fn from(r: SnapshotRecord) -> Self {
        SnapshotInfo {
            id: r.id,
            volume: r.volume,
            name: r.name,
            size: r.size,
            created: r.created,
            group: r.group,
            layer: r.layer,
        }
    }
}

/// A run of blocks that differs between two snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChangedExtent {
    pub offset: u64,
    pub len: u64,
    /// The range was discarded (reads as zeros in the newer snapshot): nothing to copy.
    pub zero: bool,
}

/// First character of the names of internal snapshots (a backup's base for changed-block
/// tracking, a replication point): they do not count against the per-volume limit, and the
/// control API neither lists them nor lets users name them (user names start with a letter or
/// a digit).
pub const HIDDEN_PREFIX: char = '.';

/// Whether `name` is an internal snapshot's.
pub fn is_hidden(name: &str) -> bool {
    name.starts_with(HIDDEN_PREFIX)
}

/// User snapshots of `volume` (hidden ones excluded), from the `snapshot_names` table.
fn user_snapshot_count(t: &impl ReadableTable<&'static str, u64>, volume: u64) -> Result<usize, StoreError> {
    let prefix = format!("{volume}/");
    let end = format!("{volume}0");
    let mut n = 0;
    for row in t.range(prefix.as_str()..end.as_str())? {
        let (k, _) = row?;
        if !k.value().strip_prefix(prefix.as_str()).is_some_and(is_hidden) {
            n += 1;
        }
    }
    Ok(n)
}

/// Checks a snapshot name.
pub fn validate_snapshot_name(name: &str) -> Result<(), StoreError> {
    let why = if name.is_empty() {
        "must not be empty"
    } else if name.len() > 128 {
        "longer than 128 bytes"
    } else if name.contains(['/', '@']) || name.chars().any(char::is_control) {
        "must contain no '/', '@' or control characters"
    } else {
        return Ok(());
    };
    Err(StoreError::InvalidSnapshotName { name: name.into(), why })
}

/// Snapshot ids of `volume`, from the `snapshot_names` table.
pub fn snapshot_ids_in(t: &impl ReadableTable<&'static str, u64>, volume: u64) -> Result<Vec<u64>, StoreError> {
    let prefix = format!("{volume}/");
    let mut out = Vec::new();
    // Names sort after "<volume>/"; '0' follows '/' in ASCII, so the range ends at "<volume>0".
    let end = format!("{volume}0");
    for row in t.range(prefix.as_str()..end.as_str())? {
        let (_, v) = row?;
        out.push(v.value());
    }
    Ok(out)
}

/// Runs of `range` by the state of the top-most of `layers` that says anything of them.
fn top_states(layers: &[Arc<Layer>], range: Range<u64>, out: &mut Vec<(Range<u64>, BlockState)>) {
    let mut p = range.start;
    while p < range.end {
        let (state, _, end) = crate::volume::top_state_at(layers, p, range.end);
        push_run(out, p..end, state);
        p = end;
    }
}

fn push_run(out: &mut Vec<(Range<u64>, BlockState)>, r: Range<u64>, s: BlockState) {
    if r.is_empty() {
        return;
    }
    match out.last_mut() {
        Some((last, ls)) if *ls == s && last.end == r.start => last.end = r.end,
        _ => out.push((r, s)),
    }
}

impl BlockStore {
    fn snapshot_record(&self, id: u64) -> Result<SnapshotRecord, StoreError> {
        let rtxn = self.db.begin_read()?;
        catalog::get(&rtxn.open_table(SNAPSHOTS)?, id, "snapshot")?
            .ok_or_else(|| StoreError::SnapshotNotFound(format!("#{id}")))
    }

    /// Snapshot `name` of volume `volume`.
    pub fn find_snapshot(&self, volume: u64, name: &str) -> Result<SnapshotInfo, StoreError> {
        let id = {
            let rtxn = self.db.begin_read()?;
            let t = rtxn.open_table(SNAPSHOT_NAMES)?;
            let id = t.get(catalog::snapshot_key(volume, name).as_str())?.map(|v| v.value());
            id.ok_or_else(|| StoreError::SnapshotNotFound(name.into()))?
        };
        self.snapshot_info(id)
    }

    pub fn snapshot_info(&self, id: u64) -> Result<SnapshotInfo, StoreError> {
        Ok(self.snapshot_record(id)?.into())
    }

    /// Snapshots of a volume, oldest first.
    pub fn list_snapshots(&self, volume: u64) -> Result<Vec<SnapshotInfo>, StoreError> {
        let rtxn = self.db.begin_read()?;
        let ids = snapshot_ids_in(&rtxn.open_table(SNAPSHOT_NAMES)?, volume)?;
        let t = rtxn.open_table(SNAPSHOTS)?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.push(SnapshotInfo::from(catalog::must::<SnapshotRecord>(&t, id, "snapshot")?));
        }
        out.sort_by_key(|s| s.id);
        Ok(out)
    }

    /// Takes a snapshot of one volume.
    pub fn create_snapshot(&self, volume: u64, name: &str) -> Result<SnapshotInfo, StoreError> {
        let mut v = self.create_snapshots(&[(volume, name.to_string())], None)?;
        Ok(v.remove(0))
    }

    /// Takes snapshots of several volumes at one instant (a group snapshot when `group` is
    /// given): no write completed after that instant is in any of them, none completed before
    /// it is missing. All or nothing.
    pub fn create_snapshots(
        &self,
        items: &[(u64, String)],
        group: Option<&str>,
    ) -> Result<Vec<SnapshotInfo>, StoreError> {
        if items.is_empty() {
            return Err(StoreError::Precondition("a group snapshot needs at least one volume".into()));
        }
        for (i, (vol, name)) in items.iter().enumerate() {
            validate_snapshot_name(name)?;
            if items[..i].iter().any(|(v, _)| v == vol) {
                return Err(StoreError::Precondition(format!("volume #{vol} is listed twice")));
            }
        }
        let _admin = self.lock_admin();
        let mut recs: Vec<VolumeRecord> = Vec::with_capacity(items.len());
        {
            let rtxn = self.db.begin_read()?;
            let names = rtxn.open_table(SNAPSHOT_NAMES)?;
            for (vol, name) in items {
                let rec = self.record(*vol)?;
                if names.get(catalog::snapshot_key(*vol, name).as_str())?.is_some() {
                    return Err(StoreError::SnapshotExists(format!("{}@{name}", rec.name)));
                }
                if !is_hidden(name) && user_snapshot_count(&names, *vol)? >= self.opts.max_snapshots {
                    return Err(StoreError::SnapshotLimit { volume: rec.name, limit: self.opts.max_snapshots });
                }
                recs.push(rec);
            }
        }
        let vols = recs.iter().map(|r| self.open_volume(r.id)).collect::<Result<Vec<_>, _>>()?;
        let txn = self.db.begin_write()?;
        let base = Self::alloc_ids(&txn, 2 * items.len() as u64)?;
        // New heads are made before the freeze, to keep the frozen instant short.
        let mut heads = Vec::with_capacity(items.len());
        for (i, v) in vols.iter().enumerate() {
            match self.new_layer(base + 2 * i as u64 + 1, v.size(), self.opts.direct_writes) {
                Ok(l) => heads.push(l),
                Err(e) => {
                    drop(heads);
                    self.unlink_layers(&(0..i as u64).map(|j| base + 2 * j + 1).collect::<Vec<_>>());
                    return Err(e);
                }
            }
        }
        for v in &vols {
            v.freeze_begin();
        }
        for v in &vols {
            v.freeze_wait();
        }
        let created = now_unix();
        let res = (|| -> Result<Vec<SnapshotInfo>, StoreError> {
            for v in &vols {
                v.flush()?;
            }
            let mut out = Vec::with_capacity(items.len());
            {
                let mut vt = txn.open_table(VOLUMES)?;
                let mut lt = txn.open_table(LAYERS)?;
                let mut st = txn.open_table(SNAPSHOTS)?;
                let mut sn = txn.open_table(SNAPSHOT_NAMES)?;
                for (i, ((rec, v), (_, name))) in recs.iter().zip(&vols).zip(items).enumerate() {
                    let (sid, new_head) = (base + 2 * i as u64, heads[i].id);
                    let old_head = v.chain().layers[0].id;
                    debug_assert_eq!(old_head, rec.head);
                    let mut old: LayerRecord = catalog::must(&lt, old_head, "layer")?;
                    old.head_of = None;
                    old.snapshots.push(sid);
                    old.children.push(new_head);
                    catalog::put(&mut lt, old_head, &old)?;
                    let nl = LayerRecord {
                        id: new_head,
                        parent: Some(old_head),
                        head_of: Some(rec.id),
                        ..Default::default()
                    };
                    catalog::put(&mut lt, new_head, &nl)?;
                    let mut vr = rec.clone();
                    vr.head = new_head;
                    vr.size = v.size();
                    catalog::put(&mut vt, rec.id, &vr)?;
                    let sr = SnapshotRecord {
                        id: sid,
                        volume: rec.id,
                        name: name.clone(),
                        layer: old_head,
                        size: v.size(),
                        created,
                        group: group.map(str::to_string),
                    };
                    catalog::put(&mut st, sid, &sr)?;
                    sn.insert(catalog::snapshot_key(rec.id, name).as_str(), sid)?;
                    out.push(sr.into());
                }
            }
            crate::crash_point!("snapshot-create-before-commit");
            txn.commit()?;
            crate::crash_point!("snapshot-create-after-commit");
            for (v, h) in vols.iter().zip(&heads) {
                let mut layers = vec![h.clone()];
                layers.extend(v.chain().layers.iter().cloned());
                v.set_chain(Chain::new(layers));
            }
            Ok(out)
        })();
        for v in &vols {
            v.thaw();
        }
        match res {
            Ok(out) => {
                drop(_admin);
                // A hidden layer right under an old head can now merge into it.
                self.kick_merges();
                Ok(out)
            }
            Err(e) => {
                let ids: Vec<u64> = heads.iter().map(|h| h.id).collect();
                drop(heads);
                self.unlink_layers(&ids);
                Err(e)
            }
        }
    }

    /// Deletes a snapshot. Its layer is merged away in the background when nothing else needs
    /// it apart ([`BlockStore::wait_merges`] waits for that).
    pub fn delete_snapshot(&self, id: u64) -> Result<(), StoreError> {
        let _admin = self.lock_admin();
        let txn = self.db.begin_write()?;
        let doomed = {
            let mut st = txn.open_table(SNAPSHOTS)?;
            let sr: SnapshotRecord =
                catalog::get(&st, id, "snapshot")?.ok_or_else(|| StoreError::SnapshotNotFound(format!("#{id}")))?;
            st.remove(id)?;
            txn.open_table(SNAPSHOT_NAMES)?.remove(catalog::snapshot_key(sr.volume, &sr.name).as_str())?;
            let mut lt = txn.open_table(LAYERS)?;
            let mut lr: LayerRecord = catalog::must(&lt, sr.layer, "layer")?;
            lr.snapshots.retain(|s| *s != id);
            catalog::put(&mut lt, sr.layer, &lr)?;
            catalog::collect_garbage(&mut lt, vec![sr.layer])?
        };
        txn.commit()?;
        self.views.lock().remove(&id);
        // Outside the lock: unlinking can take milliseconds, and nothing refers to them now.
        drop(_admin);
        self.unlink_layers(&doomed);
        self.kick_merges();
        Ok(())
    }

    /// Makes volume `volume` read as snapshot `snap` again: a new empty head over the
    /// snapshot's layer; what the volume held since is dropped, later snapshots stay. The size
    /// stays (volumes never shrink): blocks past the snapshot's size read as zeros. The caller
    /// makes sure no client is connected (the volume is swapped under it otherwise).
    pub fn rollback(&self, volume: u64, snap: u64) -> Result<VolumeInfo, StoreError> {
        let _admin = self.lock_admin();
        let rec = self.record(volume)?;
        let sr = self.snapshot_record(snap)?;
        if sr.volume != volume {
            return Err(StoreError::SnapshotNotFound(format!("{}@#{snap}", rec.name)));
        }
        let v = self.open_volume(volume)?;
        let txn = self.db.begin_write()?;
        let new_id = Self::alloc_ids(&txn, 1)?;
        let head = self.new_layer(new_id, v.size(), self.opts.direct_writes)?;
        v.freeze_begin();
        v.freeze_wait();
        let res = (|| -> Result<Vec<u64>, StoreError> {
            let doomed;
            let ids;
            {
                let mut lt = txn.open_table(LAYERS)?;
                let mut old: LayerRecord = catalog::must(&lt, rec.head, "layer")?;
                old.head_of = None;
                catalog::put(&mut lt, rec.head, &old)?;
                let mut base: LayerRecord = catalog::must(&lt, sr.layer, "layer")?;
                base.children.push(new_id);
                catalog::put(&mut lt, sr.layer, &base)?;
                let nl =
                    LayerRecord { id: new_id, parent: Some(sr.layer), head_of: Some(volume), ..Default::default() };
                catalog::put(&mut lt, new_id, &nl)?;
                doomed = catalog::collect_garbage(&mut lt, vec![rec.head])?;
                ids = catalog::chain(&lt, sr.layer)?;
                let mut vr = rec.clone();
                vr.head = new_id;
                catalog::put(&mut txn.open_table(VOLUMES)?, volume, &vr)?;
            }
            txn.commit()?;
            let mut layers = self.open_chain(&ids, false)?.layers;
            layers.insert(0, head.clone());
            v.set_chain(Chain::new(layers));
            Ok(doomed)
        })();
        v.thaw();
        match res {
            Ok(doomed) => {
                drop(_admin);
                self.unlink_layers(&doomed);
                self.kick_merges();
                self.volume_info(volume)
            }
            Err(e) => {
                drop(head);
                self.unlink_layers(&[new_id]);
                Err(e)
            }
        }
    }

    /// Creates volume `name` from snapshot `snap` at once (a new head over the snapshot's
    /// shared layers). `size` defaults to the snapshot's and may not be smaller.
    pub fn clone_snapshot(
        &self,
        owner: &str,
        name: &str,
        snap: u64,
        size: Option<u64>,
    ) -> Result<VolumeInfo, StoreError> {
        self.clone_snapshot_with(owner, name, snap, size, &|_, _| Ok(()))
    }

    /// [`Store::clone_snapshot`], with the caller's rows for the clone in the same transaction.
    pub fn clone_snapshot_with(
        &self,
        owner: &str,
        name: &str,
        snap: u64,
        size: Option<u64>,
        rows: WithVolume<'_>,
    ) -> Result<VolumeInfo, StoreError> {
        let sr = self.snapshot_record(snap)?;
        let size = size.unwrap_or(sr.size);
        if size < sr.size {
            return Err(StoreError::InvalidSize {
                size,
                why: format!("smaller than the snapshot ({} bytes)", sr.size),
            });
        }
        self.create_volume_on(owner, name, size, Some(snap), rows)
    }

    /// The snapshots of the same volume that `snap` descends from (valid `from` of a diff
    /// to it), oldest first.
    pub fn snapshot_ancestors(&self, snap: u64) -> Result<Vec<SnapshotInfo>, StoreError> {
        let sr = self.snapshot_record(snap)?;
        let chain: Vec<u64> = self.open_snapshot(snap)?.chain().layers.iter().map(|l| l.id).collect();
        let mut out = self.list_snapshots(sr.volume)?;
        out.retain(|s| s.id != snap && chain.contains(&s.layer));
        Ok(out)
    }

    /// A read-only view of a snapshot, for NBD exports, backup and replication.
    pub fn open_snapshot(&self, snap: u64) -> Result<Arc<Volume>, StoreError> {
        let mut views = self.views.lock();
        if let Some(v) = views.get(&snap) {
            return Ok(v.clone());
        }
        // The record and its chain from one read transaction: a merge that commits in between
        // moves the snapshot to the layer it keeps and removes the other, so a chain read
        // afterwards from the old layer found it missing. Opening the layers after the commit
        // is safe: the merge unlinks the gone layer only after it has re-chained every view,
        // which waits for the `views` lock held here.
        let (sr, ids) = {
            let rtxn = self.db.begin_read()?;
            let sr: SnapshotRecord = catalog::get(&rtxn.open_table(SNAPSHOTS)?, snap, "snapshot")?
                .ok_or_else(|| StoreError::SnapshotNotFound(format!("#{snap}")))?;
            let ids = catalog::chain(&rtxn.open_table(LAYERS)?, sr.layer)?;
            (sr, ids)
        };
        crate::delay_point!("open-snapshot-after-catalog");
        let v = Arc::new(Volume::new_read_only(sr.id, sr.size, self.open_chain(&ids, false)?));
        views.insert(snap, v.clone());
        Ok(v)
    }

    /// Changed extents of volume `volume` from snapshot `from` to snapshot `to` (the live
    /// volume when `to` is None), from the allocation maps alone. With `from` None: the
    /// allocated extents of `to` (what a first full copy must read). Also returns the size of
    /// `to`. Both snapshots must be of one lineage, `from` an ancestor of `to`.
    pub fn changed_extents(
        &self,
        volume: u64,
        from: Option<u64>,
        to: Option<u64>,
    ) -> Result<(Vec<ChangedExtent>, u64), StoreError> {
        let rec = self.record(volume)?;
        let (view, to_name) = match to {
            Some(s) => {
                let sr = self.snapshot_record(s)?;
                if sr.volume != volume {
                    return Err(StoreError::SnapshotNotFound(format!("{}@#{s}", rec.name)));
                }
                (self.open_snapshot(s)?, sr.name)
            }
            None => (self.open_volume(volume)?, "the volume's current state".to_string()),
        };
        let chain = view.chain();
        let size = view.size();
        let upto = match from {
            None => chain.layers.len(),
            Some(f) => {
                let fr = self.snapshot_record(f)?;
                if fr.volume != volume {
                    return Err(StoreError::SnapshotNotFound(format!("{}@#{f}", rec.name)));
                }
                match chain.layers.iter().position(|l| l.id == fr.layer) {
                    Some(k) => k,
                    None => {
                        return Err(StoreError::NotInLineage(format!(
                            "snapshot {:?} is not an ancestor of {to_name} (different lineage, or newer)",
                            fr.name
                        )))
                    }
                }
            }
        };
        let mut runs = Vec::new();
        top_states(&chain.layers[..upto], 0..size.div_ceil(BLOCK_SIZE), &mut runs);
        let mut out = Vec::new();
        for (r, state) in runs {
            let zero = match state {
                BlockState::Absent => continue,
                // A discard with nothing below it changed nothing a full copy must know.
                BlockState::Zeroed if from.is_none() => continue,
                BlockState::Zeroed => true,
                BlockState::Data => false,
            };
            let offset = r.start * BLOCK_SIZE;
            let len = (r.end * BLOCK_SIZE).min(size) - offset;
            out.push(ChangedExtent { offset, len, zero });
        }
        Ok((out, size))
    }
}
