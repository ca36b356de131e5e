//! The block store: the catalog plus the open volumes and layers of one data directory.
//!
//! Layout of a data directory: `catalog.redb` and `layers/` (layer files, see `layer.rs`).
//! Creating a layer writes its files first and commits the catalog last; dropping one commits
//! first and unlinks after. Files no catalog record names are leftovers of a crash between the
//! two steps and are removed at open.
//!
//! Operations that change the catalog's shape (create, delete, extend, snapshot, rollback, the
//! end of a merge) take one store-wide lock; the data path never does.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, MutexGuard};
use redb::{Database, ReadableDatabase, ReadableTable, WriteTransaction};

use crate::catalog::{
    self, LayerRecord, SnapshotRecord, VolumeRecord, LAYERS, SNAPSHOTS, SNAPSHOT_NAMES, STORE_META, VOLUMES,
    VOLUME_NAMES,
};
use crate::error::StoreError;
use crate::io_engine::EngineKind;
use crate::layer::{self, Layer};

/// The caller's own catalog rows for a volume being created (given its id), written in the
/// transaction that creates it.
pub type WithVolume<'a> = &'a dyn Fn(&WriteTransaction, u64) -> Result<(), StoreError>;
use crate::volume::{Chain, Volume};
use crate::MAX_VOLUME_SIZE;

/// How the store does its I/O.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Engine for the data path (chosen once at start-up).
    pub engine: EngineKind,
    /// Open head layers a second time with O_DIRECT for small aligned writes (random writes
    /// through the page cache collapse on this kind of machine; see BENCHMARKS.md). Falls back
    /// to buffered writes where the filesystem refuses O_DIRECT.
    pub direct_writes: bool,
    /// Writes larger than this go through the page cache even when `direct_writes` is on.
    pub direct_write_max: usize,
    /// Snapshots one volume may have.
    pub max_snapshots: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            engine: EngineKind::detect(),
            direct_writes: true,
            direct_write_max: 64 * 1024,
            max_snapshots: DEFAULT_MAX_SNAPSHOTS,
        }
    }
}

pub const DEFAULT_MAX_SNAPSHOTS: usize = 128;

/// What the catalog says of one volume.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VolumeInfo {
    pub id: u64,
    /// Opaque owner label (the tenant); names are unique per owner.
    pub owner: String,
    pub name: String,
    pub size: u64,
    /// Bytes of data held by the volume's own head layer (written since its last snapshot).
    pub allocated: u64,
    /// Unix seconds.
    pub created: u64,
    /// Layer ids, head first.
    pub layers: Vec<u64>,
    pub snapshots: usize,
}

pub struct BlockStore {
    pub(crate) layers_dir: PathBuf,
    pub(crate) db: Database,
    pub(crate) opts: StoreOptions,
    /// Serialises changes of the catalog's shape.
    admin: Mutex<()>,
    pub(crate) open: Mutex<HashMap<u64, Arc<Volume>>>,
    /// Read-only views of snapshots, by snapshot id.
    pub(crate) views: Mutex<HashMap<u64, Arc<Volume>>>,
    /// Every open layer, so volumes and snapshots sharing one share its map.
    layer_cache: Mutex<HashMap<u64, Weak<Layer>>>,
    /// The merge thread's signals and counters.
    pub(crate) merges: Arc<crate::merge::Merges>,
}

impl BlockStore {
    /// Stops the background merge thread and closes the store once the caller's handle was
    /// the last; the directory can be opened again right after (a plain drop may leave the
    /// merge thread holding the store for the rest of a merge).
    pub fn close(self: Arc<Self>) {
        self.merges.stop_and_join();
    }
}

impl Drop for BlockStore {
    fn drop(&mut self) {
        self.merges.stop();
    }
}

pub(crate) fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Checks a requested volume size.
pub fn validate_size(size: u64) -> Result<(), StoreError> {
    let why = if size == 0 {
        "a volume needs at least 512 bytes".to_string()
    } else if !size.is_multiple_of(512) {
        "must be a multiple of 512 bytes".to_string()
    } else if size > MAX_VOLUME_SIZE {
        format!("larger than the maximum volume size of {MAX_VOLUME_SIZE} bytes (32 TiB)")
    } else {
        return Ok(());
    };
    Err(StoreError::InvalidSize { size, why })
}

/// Checks a volume name.
pub fn validate_name(name: &str) -> Result<(), StoreError> {
    let why = if name.is_empty() {
        "must not be empty"
    } else if name.len() > 128 {
        "longer than 128 bytes"
    } else if name.contains(['/', '@']) || name.chars().any(char::is_control) {
        "must contain no '/', '@' or control characters"
    } else {
        return Ok(());
    };
    Err(StoreError::InvalidName { name: name.into(), why })
}

impl BlockStore {
    /// Opens (creating if needed) the store in `dir`: `dir/catalog.redb` and `dir/layers/`.
    /// Starts the background thread that merges the layers of deleted snapshots.
    pub fn open(dir: &Path, opts: StoreOptions) -> Result<Arc<BlockStore>, StoreError> {
        let layers_dir = dir.join("layers");
        std::fs::create_dir_all(&layers_dir)?;
        let db = Database::create(dir.join("catalog.redb"))?;
        let txn = db.begin_write()?;
        {
            let mut meta = txn.open_table(STORE_META)?;
            let format = meta.get(catalog::KEY_FORMAT)?.map(|v| v.value());
            txn.open_table(VOLUMES)?;
            txn.open_table(VOLUME_NAMES)?;
            txn.open_table(LAYERS)?;
            txn.open_table(SNAPSHOTS)?;
            txn.open_table(SNAPSHOT_NAMES)?;
            match format {
                None => {
                    meta.insert(catalog::KEY_FORMAT, catalog::FORMAT_VERSION)?;
                    meta.insert(catalog::KEY_NEXT_ID, 1)?;
                }
                Some(1) => {
                    migrate_v1(&txn)?;
                    meta.insert(catalog::KEY_FORMAT, catalog::FORMAT_VERSION)?;
                }
                Some(catalog::FORMAT_VERSION) => {}
                Some(v) => {
                    return Err(StoreError::Corrupt {
                        what: "catalog".into(),
                        why: format!(
                            "format version {v} is not supported by this build (expects {})",
                            catalog::FORMAT_VERSION
                        ),
                    })
                }
            }
        }
        txn.commit()?;
        let store = Arc::new(BlockStore {
            layers_dir,
            db,
            opts,
            admin: Mutex::new(()),
            open: Mutex::new(HashMap::new()),
            views: Mutex::new(HashMap::new()),
            layer_cache: Mutex::new(HashMap::new()),
            merges: Arc::default(),
        });
        store.sweep_orphans()?;
        crate::merge::start(&store);
        Ok(store)
    }

    /// Removes layer files that no catalog record names.
    fn sweep_orphans(&self) -> Result<(), StoreError> {
        let rtxn = self.db.begin_read()?;
        let layers = rtxn.open_table(LAYERS)?;
        for entry in std::fs::read_dir(&self.layers_dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(layer::parse_file_name) else { continue };
            if layers.get(id)?.is_none() {
                tracing::info!(file = ?name, "removing a layer file nothing uses (left by an interrupted operation)");
                std::fs::remove_file(entry.path())?;
            }
        }
        Ok(())
    }

    /// The catalog database, for the control plane's own tables.
    pub fn catalog(&self) -> &Database {
        &self.db
    }

    pub fn options(&self) -> &StoreOptions {
        &self.opts
    }

    pub(crate) fn lock_admin(&self) -> MutexGuard<'_, ()> {
        self.admin.lock()
    }

    /// The shared handle of layer `id` (opened on first use).
    pub(crate) fn layer(&self, id: u64, want_direct: bool) -> Result<Arc<Layer>, StoreError> {
        let mut cache = self.layer_cache.lock();
        if let Some(l) = cache.get(&id).and_then(Weak::upgrade) {
            return Ok(l);
        }
        let l = Arc::new(Layer::open(&self.layers_dir, id, want_direct)?);
        cache.retain(|_, w| w.strong_count() > 0);
        cache.insert(id, Arc::downgrade(&l));
        Ok(l)
    }

    /// Creates the files of a new empty layer (not yet in the catalog).
    pub(crate) fn new_layer(&self, id: u64, size: u64, want_direct: bool) -> Result<Arc<Layer>, StoreError> {
        let l = Arc::new(Layer::create(&self.layers_dir, id, size, want_direct)?);
        self.layer_cache.lock().insert(id, Arc::downgrade(&l));
        Ok(l)
    }

    /// Drops layers the catalog no longer has from the cache of open layers.
    pub(crate) fn forget_layers(&self, ids: &[u64]) {
        let mut cache = self.layer_cache.lock();
        for l in ids {
            cache.remove(l);
        }
    }

    /// Unlinks the files of layers the catalog no longer has.
    pub(crate) fn unlink_layers(&self, ids: &[u64]) {
        self.forget_layers(ids);
        for l in ids {
            for p in [layer::data_path(&self.layers_dir, *l), layer::map_path(&self.layers_dir, *l)] {
                if let Err(e) = std::fs::remove_file(&p) {
                    // The sweep at the next open removes it.
                    tracing::warn!(path = %p.display(), error = %e, "could not remove a dropped layer's file");
                }
            }
        }
    }

    /// Opens the layers of `ids` (top first) as a chain; the top one writable when `head`.
    pub(crate) fn open_chain(&self, ids: &[u64], head: bool) -> Result<Chain, StoreError> {
        let mut layers = Vec::with_capacity(ids.len());
        for (i, l) in ids.iter().enumerate() {
            // Only a head is written, so only a head needs an O_DIRECT descriptor.
            layers.push(self.layer(*l, head && i == 0 && self.opts.direct_writes)?);
        }
        Ok(Chain::new(layers))
    }

    /// The layer ids of the chain that starts at `top`, top first.
    pub(crate) fn chain_ids(&self, top: u64) -> Result<Vec<u64>, StoreError> {
        let rtxn = self.db.begin_read()?;
        catalog::chain(&rtxn.open_table(LAYERS)?, top)
    }

    /// Allocates `n` fresh ids.
    pub(crate) fn alloc_ids(txn: &WriteTransaction, n: u64) -> Result<u64, StoreError> {
        let mut meta = txn.open_table(STORE_META)?;
        let next = meta.get(catalog::KEY_NEXT_ID)?.map(|v| v.value()).unwrap_or(1);
        meta.insert(catalog::KEY_NEXT_ID, next + n)?;
        Ok(next)
    }

    fn info_of(&self, rec: VolumeRecord) -> Result<VolumeInfo, StoreError> {
        let rtxn = self.db.begin_read()?;
        let layers = catalog::chain(&rtxn.open_table(LAYERS)?, rec.head)?;
        let snapshots = crate::snapshots::snapshot_ids_in(&rtxn.open_table(SNAPSHOT_NAMES)?, rec.id)?.len();
        let allocated = match self.open.lock().get(&rec.id) {
            Some(v) => v.allocated_bytes(),
            None => self.load_allocated(rec.head).unwrap_or(0),
        };
        Ok(VolumeInfo {
            id: rec.id,
            owner: rec.owner,
            name: rec.name,
            size: rec.size,
            allocated,
            created: rec.created,
            layers,
            snapshots,
        })
    }

    fn load_allocated(&self, head: u64) -> Result<u64, StoreError> {
        let f = std::fs::File::open(layer::map_path(&self.layers_dir, head))?;
        Ok(crate::alloc_map::AllocMap::load(&f, "allocation map")?.allocated_blocks() * crate::BLOCK_SIZE)
    }

    pub(crate) fn record(&self, id: u64) -> Result<VolumeRecord, StoreError> {
        let rtxn = self.db.begin_read()?;
        let t = rtxn.open_table(VOLUMES)?;
        catalog::get(&t, id, "volume record")?.ok_or_else(|| StoreError::VolumeNotFound(format!("#{id}")))
    }

    /// Creates a thin volume of `size` bytes (a multiple of 512, at most MAX_VOLUME_SIZE).
    pub fn create_volume(&self, owner: &str, name: &str, size: u64) -> Result<VolumeInfo, StoreError> {
        self.create_volume_on(owner, name, size, None, &|_, _| Ok(()))
    }

    /// [`Store::create_volume`], with the caller's own catalog rows for the new volume
    /// committed in the same transaction: a crash leaves both or neither.
    pub fn create_volume_with(
        &self,
        owner: &str,
        name: &str,
        size: u64,
        rows: WithVolume<'_>,
    ) -> Result<VolumeInfo, StoreError> {
        self.create_volume_on(owner, name, size, None, rows)
    }

    /// Creates a volume; with `from` (a snapshot id), a clone of it: a new empty head over the
    /// snapshot's chain, which it shares. `rows` adds the caller's rows to the transaction.
    pub(crate) fn create_volume_on(
        &self,
        owner: &str,
        name: &str,
        size: u64,
        from: Option<u64>,
        rows: WithVolume<'_>,
    ) -> Result<VolumeInfo, StoreError> {
        validate_size(size)?;
        validate_name(name)?;
        let _admin = self.lock_admin();
        let txn = self.db.begin_write()?;
        let (rec, head) = {
            let mut names = txn.open_table(VOLUME_NAMES)?;
            let key = catalog::name_key(owner, name);
            if names.get(key.as_str())?.is_some() {
                return Err(StoreError::VolumeExists(name.into()));
            }
            let next = Self::alloc_ids(&txn, 2)?;
            let (vol_id, layer_id) = (next, next + 1);
            let rec = VolumeRecord {
                id: vol_id,
                owner: owner.into(),
                name: name.into(),
                size,
                created: now_unix(),
                head: layer_id,
                layers: Vec::new(),
            };
            let parent = match from {
                Some(snap) => {
                    let sr: SnapshotRecord = catalog::get(&txn.open_table(SNAPSHOTS)?, snap, "snapshot")?
                        .ok_or_else(|| StoreError::SnapshotNotFound(format!("#{snap}")))?;
                    if size < sr.size {
                        return Err(StoreError::InvalidSize {
                            size,
                            why: format!("smaller than the snapshot ({} bytes)", sr.size),
                        });
                    }
                    Some(sr.layer)
                }
                None => None,
            };
            // Files first: a crash before the commit leaves orphans the next open removes.
            let head = Layer::create(&self.layers_dir, layer_id, size, false)?;
            let mut layers = txn.open_table(LAYERS)?;
            if let Some(p) = parent {
                let mut pr: LayerRecord = catalog::must(&layers, p, "layer")?;
                pr.children.push(layer_id);
                catalog::put(&mut layers, p, &pr)?;
            }
            let lr = LayerRecord { id: layer_id, parent, head_of: Some(vol_id), ..Default::default() };
            catalog::put(&mut layers, layer_id, &lr)?;
            catalog::put(&mut txn.open_table(VOLUMES)?, vol_id, &rec)?;
            names.insert(key.as_str(), vol_id)?;
            drop((names, layers));
            if let Err(e) = rows(&txn, vol_id) {
                drop(head);
                drop(txn);
                self.unlink_layers(&[layer_id]);
                return Err(e);
            }
            (rec, head)
        };
        if let Err(e) = txn.commit() {
            drop(head);
            self.unlink_layers(&[rec.head]);
            return Err(e.into());
        }
        drop(head);
        self.info_of(rec)
    }

    pub fn find_volume(&self, owner: &str, name: &str) -> Result<VolumeInfo, StoreError> {
        let id = self.find_volume_id(owner, name)?;
        self.volume_info(id)
    }

    pub(crate) fn find_volume_id(&self, owner: &str, name: &str) -> Result<u64, StoreError> {
        let rtxn = self.db.begin_read()?;
        let names = rtxn.open_table(VOLUME_NAMES)?;
        let id = names.get(catalog::name_key(owner, name).as_str())?.map(|v| v.value());
        id.ok_or_else(|| StoreError::VolumeNotFound(name.into()))
    }

    pub fn volume_info(&self, id: u64) -> Result<VolumeInfo, StoreError> {
        let rec = self.record(id)?;
        self.info_of(rec)
    }

    /// All volumes of `owner` (all volumes when `owner` is None), by name.
    pub fn list_volumes(&self, owner: Option<&str>) -> Result<Vec<VolumeInfo>, StoreError> {
        let recs = {
            let rtxn = self.db.begin_read()?;
            let t = rtxn.open_table(VOLUMES)?;
            let mut recs = Vec::new();
            for row in t.iter()? {
                let (_, v) = row?;
                let rec: VolumeRecord = catalog::decode(v.value(), "volume record")?;
                if owner.is_none_or(|o| o == rec.owner) {
                    recs.push(rec);
                }
            }
            recs
        };
        let mut out = recs.into_iter().map(|r| self.info_of(r)).collect::<Result<Vec<_>, _>>()?;
        out.sort_by(|a, b| (&a.owner, &a.name).cmp(&(&b.owner, &b.name)));
        Ok(out)
    }

    /// The shared handle of an open volume (opened on first use, then cached).
    pub fn open_volume(&self, id: u64) -> Result<Arc<Volume>, StoreError> {
        let mut open = self.open.lock();
        if let Some(v) = open.get(&id) {
            return Ok(v.clone());
        }
        // The record and its chain from one read transaction (as `open_snapshot`): a merge
        // committing between two reads would leave a layer id in the chain that is gone.
        let (rec, ids) = {
            let rtxn = self.db.begin_read()?;
            let rec: VolumeRecord = catalog::get(&rtxn.open_table(VOLUMES)?, id, "volume record")?
                .ok_or_else(|| StoreError::VolumeNotFound(format!("#{id}")))?;
            let ids = catalog::chain(&rtxn.open_table(LAYERS)?, rec.head)?;
            (rec, ids)
        };
        let chain = self.open_chain(&ids, true)?;
        let v = Arc::new(Volume::new(rec.id, rec.size, chain, self.opts.direct_write_max));
        open.insert(id, v.clone());
        Ok(v)
    }

    /// Grows a volume online; never shrinks (InvalidSize).
    pub fn extend_volume(&self, id: u64, new_size: u64) -> Result<VolumeInfo, StoreError> {
        validate_size(new_size)?;
        let _admin = self.lock_admin();
        let rec = self.record(id)?;
        if new_size < rec.size {
            return Err(StoreError::InvalidSize {
                size: new_size,
                why: format!("smaller than the current size {} (volumes never shrink)", rec.size),
            });
        }
        if new_size == rec.size {
            drop(_admin);
            return self.info_of(rec);
        }
        let vol = self.open_volume(id)?;
        // Files grow first (harmless if the catalog commit is lost), then the catalog, then the
        // size clients see.
        vol.grow(new_size)?;
        let txn = self.db.begin_write()?;
        let rec = {
            let mut t = txn.open_table(VOLUMES)?;
            let mut rec: VolumeRecord =
                catalog::get(&t, id, "volume record")?.ok_or_else(|| StoreError::VolumeNotFound(format!("#{id}")))?;
            rec.size = new_size;
            catalog::put(&mut t, id, &rec)?;
            rec
        };
        txn.commit()?;
        vol.set_size(new_size);
        drop(_admin);
        self.info_of(rec)
    }

    /// Deletes a volume with its snapshots and destroys their data: layers nothing else uses
    /// (a clone may still use some) are unlinked at once. [`BlockStore::remove_volume`] and
    /// [`BlockStore::destroy_removed`] do the same in two steps, with progress.
    pub fn delete_volume(&self, id: u64) -> Result<(), StoreError> {
        let removal = self.remove_volume(id)?;
        self.unlink_layers(&removal.layers);
        Ok(())
    }

    /// Flushes every open volume (used at shutdown).
    pub fn flush_all(&self) -> Result<(), StoreError> {
        let vols: Vec<Arc<Volume>> = self.open.lock().values().cloned().collect();
        for v in vols {
            v.flush()?;
        }
        Ok(())
    }
}

/// Format 1 → 2: each volume had exactly one layer, `layers[0]`.
fn migrate_v1(txn: &WriteTransaction) -> Result<(), StoreError> {
    let mut vols = txn.open_table(VOLUMES)?;
    let mut layers = txn.open_table(LAYERS)?;
    let mut recs = Vec::new();
    for row in vols.iter()? {
        let (_, v) = row?;
        recs.push(catalog::decode::<VolumeRecord>(v.value(), "volume record")?);
    }
    for mut rec in recs {
        let Some(&head) = rec.layers.first() else {
            return Err(StoreError::Corrupt { what: "catalog".into(), why: format!("volume {} has no layer", rec.id) });
        };
        rec.head = head;
        rec.layers.clear();
        catalog::put(&mut vols, rec.id, &rec)?;
        let mut lr: LayerRecord = catalog::must(&layers, head, "layer")?;
        lr.head_of = Some(rec.id);
        lr.users.clear();
        catalog::put(&mut layers, head, &lr)?;
    }
    tracing::info!("catalog migrated from format 1 to 2");
    Ok(())
}
