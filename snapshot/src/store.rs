//! The block store: the catalog plus the open volumes of one data directory.
//!
//! Layout of a data directory: `catalog.redb` and `layers/` (layer files, see `layer.rs`).
//! Creating a volume writes its files first and commits the catalog last; deleting commits
//! first and unlinks after. Files no catalog record names are leftovers of a crash between the
//! two steps and are removed at open.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use redb::{Database, ReadableDatabase, ReadableTable};

use crate::catalog::{self, LayerRecord, VolumeRecord, LAYERS, STORE_META, VOLUMES, VOLUME_NAMES};
use crate::error::StoreError;
use crate::io_engine::EngineKind;
use crate::layer::{self, Layer};
use crate::volume::{Chain, Volume};
use crate::MAX_VOLUME_SIZE;

/// How the store does its I/O.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Engine for the data path (chosen once at start-up).
    pub engine: EngineKind,
    /// Open layer files a second time with O_DIRECT for small aligned writes (random writes
    /// through the page cache collapse on this kind of machine; see BENCHMARKS.md). Falls back
    /// to buffered writes where the filesystem refuses O_DIRECT.
    pub direct_writes: bool,
    /// Writes larger than this go through the page cache even when `direct_writes` is on.
    pub direct_write_max: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions { engine: EngineKind::detect(), direct_writes: true, direct_write_max: 64 * 1024 }
    }
}

/// What the catalog says of one volume.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VolumeInfo {
    pub id: u64,
    /// Opaque owner label (the tenant); names are unique per owner.
    pub owner: String,
    pub name: String,
    pub size: u64,
    /// Bytes of data held by the volume's own head layer.
    pub allocated: u64,
    /// Unix seconds.
    pub created: u64,
    /// Layer ids, head first.
    pub layers: Vec<u64>,
}

pub struct BlockStore {
    layers_dir: PathBuf,
    db: Database,
    opts: StoreOptions,
    open: Mutex<HashMap<u64, Arc<Volume>>>,
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt { what: what.to_string(), why: e.to_string() })
}

fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("catalog records serialise")
}

/// Checks a requested volume size.
pub fn validate_size(size: u64) -> Result<(), StoreError> {
    let why = if size == 0 {
        "a volume needs at least 512 bytes".to_string()
    } else if size % 512 != 0 {
        "must be a multiple of 512 bytes".to_string()
    } else if size > MAX_VOLUME_SIZE {
        format!("larger than the maximum volume size of {MAX_VOLUME_SIZE} bytes (32 TiB)")
    } else {
        return Ok(());
    };
    Err(StoreError::InvalidSize { size, why })
}

impl BlockStore {
    /// Opens (creating if needed) the store in `dir`: `dir/catalog.redb` and `dir/layers/`.
    pub fn open(dir: &Path, opts: StoreOptions) -> Result<Arc<BlockStore>, StoreError> {
        let layers_dir = dir.join("layers");
        std::fs::create_dir_all(&layers_dir)?;
        let db = Database::create(dir.join("catalog.redb"))?;
        let txn = db.begin_write()?;
        {
            let mut meta = txn.open_table(STORE_META)?;
            let format = meta.get(catalog::KEY_FORMAT)?.map(|v| v.value());
            match format {
                None => {
                    meta.insert(catalog::KEY_FORMAT, catalog::FORMAT_VERSION)?;
                    meta.insert(catalog::KEY_NEXT_ID, 1)?;
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
            txn.open_table(VOLUMES)?;
            txn.open_table(VOLUME_NAMES)?;
            txn.open_table(LAYERS)?;
        }
        txn.commit()?;
        let store = BlockStore { layers_dir, db, opts, open: Mutex::new(HashMap::new()) };
        store.sweep_orphans()?;
        Ok(Arc::new(store))
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
                tracing::info!(file = ?name, "removing a layer file no volume uses (left by an interrupted create or delete)");
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

    fn info_of(&self, rec: VolumeRecord) -> VolumeInfo {
        let allocated = match self.open.lock().get(&rec.id) {
            Some(v) => v.allocated_bytes(),
            None => self.load_allocated(&rec).unwrap_or(0),
        };
        VolumeInfo {
            id: rec.id,
            owner: rec.owner,
            name: rec.name,
            size: rec.size,
            allocated,
            created: rec.created,
            layers: rec.layers,
        }
    }

    fn load_allocated(&self, rec: &VolumeRecord) -> Result<u64, StoreError> {
        let head = rec.layers.first().copied().unwrap_or(0);
        let f = std::fs::File::open(layer::map_path(&self.layers_dir, head))?;
        Ok(crate::alloc_map::AllocMap::load(&f, "allocation map")?.allocated_blocks() * crate::BLOCK_SIZE)
    }

    fn record(&self, id: u64) -> Result<VolumeRecord, StoreError> {
        let rtxn = self.db.begin_read()?;
        let t = rtxn.open_table(VOLUMES)?;
        let Some(v) = t.get(id)? else { return Err(StoreError::VolumeNotFound(format!("#{id}"))) };
        decode(v.value(), "volume record")
    }

    /// Creates a thin volume of `size` bytes (a multiple of 512, at most MAX_VOLUME_SIZE).
    pub fn create_volume(&self, owner: &str, name: &str, size: u64) -> Result<VolumeInfo, StoreError> {
        validate_size(size)?;
        if name.is_empty() || name.contains('/') {
            return Err(StoreError::InvalidName { name: name.into(), why: "must be non-empty and contain no '/'" });
        }
        // One write transaction at a time: the uniqueness check, the id and the files belong
        // together. Files first, catalog commit last.
        let txn = self.db.begin_write()?;
        let rec = {
            let mut names = txn.open_table(VOLUME_NAMES)?;
            let key = catalog::name_key(owner, name);
            if names.get(key.as_str())?.is_some() {
                return Err(StoreError::VolumeExists(name.into()));
            }
            let mut meta = txn.open_table(STORE_META)?;
            let next = meta.get(catalog::KEY_NEXT_ID)?.map(|v| v.value()).unwrap_or(1);
            let (vol_id, layer_id) = (next, next + 1);
            meta.insert(catalog::KEY_NEXT_ID, next + 2)?;
            Layer::create(&self.layers_dir, layer_id, size, false)?;
            let rec = VolumeRecord {
                id: vol_id,
                owner: owner.into(),
                name: name.into(),
                size,
                created: now_unix(),
                layers: vec![layer_id],
            };
            txn.open_table(VOLUMES)?.insert(vol_id, encode(&rec).as_slice())?;
            txn.open_table(LAYERS)?
                .insert(layer_id, encode(&LayerRecord { id: layer_id, users: vec![vol_id] }).as_slice())?;
            names.insert(key.as_str(), vol_id)?;
            rec
        };
        if let Err(e) = txn.commit() {
            for l in &rec.layers {
                let _ = std::fs::remove_file(layer::data_path(&self.layers_dir, *l));
                let _ = std::fs::remove_file(layer::map_path(&self.layers_dir, *l));
            }
            return Err(e.into());
        }
        Ok(self.info_of(rec))
    }

    pub fn find_volume(&self, owner: &str, name: &str) -> Result<VolumeInfo, StoreError> {
        let id = {
            let rtxn = self.db.begin_read()?;
            let names = rtxn.open_table(VOLUME_NAMES)?;
            let Some(id) = names.get(catalog::name_key(owner, name).as_str())?.map(|v| v.value()) else {
                return Err(StoreError::VolumeNotFound(name.into()));
            };
            id
        };
        self.volume_info(id)
    }

    pub fn volume_info(&self, id: u64) -> Result<VolumeInfo, StoreError> {
        let rec = self.record(id)?;
        Ok(self.info_of(rec))
    }

    /// All volumes of `owner` (all volumes when `owner` is None), by name.
    pub fn list_volumes(&self, owner: Option<&str>) -> Result<Vec<VolumeInfo>, StoreError> {
        let recs = {
            let rtxn = self.db.begin_read()?;
            let t = rtxn.open_table(VOLUMES)?;
            let mut recs = Vec::new();
            for row in t.iter()? {
                let (_, v) = row?;
                let rec: VolumeRecord = decode(v.value(), "volume record")?;
                if owner.is_none_or(|o| o == rec.owner) {
                    recs.push(rec);
                }
            }
            recs
        };
        let mut out: Vec<VolumeInfo> = recs.into_iter().map(|r| self.info_of(r)).collect();
        out.sort_by(|a, b| (&a.owner, &a.name).cmp(&(&b.owner, &b.name)));
        Ok(out)
    }

    /// The shared handle of an open volume (opened on first use, then cached).
    pub fn open_volume(&self, id: u64) -> Result<Arc<Volume>, StoreError> {
        let mut open = self.open.lock();
        if let Some(v) = open.get(&id) {
            return Ok(v.clone());
        }
        let rec = self.record(id)?;
        let mut layers = Vec::with_capacity(rec.layers.len());
        for (i, l) in rec.layers.iter().enumerate() {
            // Only the head is written, so only the head needs an O_DIRECT descriptor.
            layers.push(Arc::new(Layer::open(&self.layers_dir, *l, i == 0 && self.opts.direct_writes)?));
        }
        let v = Arc::new(Volume::new(rec.id, rec.size, Chain { layers }, self.opts.direct_write_max));
        open.insert(id, v.clone());
        Ok(v)
    }

    /// Grows a volume online; never shrinks (InvalidSize).
    pub fn extend_volume(&self, id: u64, new_size: u64) -> Result<VolumeInfo, StoreError> {
        validate_size(new_size)?;
        let rec = self.record(id)?;
        if new_size < rec.size {
            return Err(StoreError::InvalidSize {
                size: new_size,
                why: format!("smaller than the current size {} (volumes never shrink)", rec.size),
            });
        }
        if new_size == rec.size {
            return Ok(self.info_of(rec));
        }
        let vol = self.open_volume(id)?;
        // Files grow first (harmless if the catalog commit is lost), then the catalog, then the
        // size clients see.
        vol.grow(new_size)?;
        let txn = self.db.begin_write()?;
        let rec = {
            let mut t = txn.open_table(VOLUMES)?;
            let mut rec: VolumeRecord = match t.get(id)? {
                Some(v) => decode(v.value(), "volume record")?,
                None => return Err(StoreError::VolumeNotFound(format!("#{id}"))),
            };
            rec.size = new_size;
            t.insert(id, encode(&rec).as_slice())?;
            rec
        };
        txn.commit()?;
        vol.set_size(new_size);
        Ok(self.info_of(rec))
    }

    /// Deletes a volume and destroys its data (its layer files are unlinked).
    pub fn delete_volume(&self, id: u64) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        let doomed = {
            let mut vols = txn.open_table(VOLUMES)?;
            let rec: VolumeRecord = match vols.remove(id)? {
                Some(v) => decode(v.value(), "volume record")?,
                None => return Err(StoreError::VolumeNotFound(format!("#{id}"))),
            };
            txn.open_table(VOLUME_NAMES)?.remove(catalog::name_key(&rec.owner, &rec.name).as_str())?;
            let mut layers = txn.open_table(LAYERS)?;
            let mut doomed = Vec::new();
            for l in &rec.layers {
                let lr: Option<LayerRecord> = match layers.get(*l)? {
                    Some(v) => Some(decode(v.value(), "layer record")?),
                    None => None,
                };
                if let Some(mut lr) = lr {
                    lr.users.retain(|u| *u != id);
                    if lr.users.is_empty() {
                        layers.remove(*l)?;
                        doomed.push(*l);
                    } else {
                        layers.insert(*l, encode(&lr).as_slice())?;
                    }
                }
            }
            doomed
        };
        txn.commit()?;
        self.open.lock().remove(&id);
        for l in doomed {
            for p in [layer::data_path(&self.layers_dir, l), layer::map_path(&self.layers_dir, l)] {
                if let Err(e) = std::fs::remove_file(&p) {
                    // The sweep at the next open removes it.
                    tracing::warn!(path = %p.display(), error = %e, "could not remove a deleted volume's file");
                }
            }
        }
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
