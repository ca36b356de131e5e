//! The backup engine: backup, restore, list, find, delete, verify, gc, server manifests.
//!
//! * **Commit order.** Chunks, then the backup's index, then its manifest, last: a backup
//!   exists iff its manifest does, so an interrupted backup leaves only invisible objects
//!   (chunks, maybe an index) that gc collects after the grace period.
//! * **Full indexes.** An incremental reads only the chunks it is told changed and copies
//!   every other entry from its parent's index: its own index is complete, so it restores
//!   alone, and deleting any backup never breaks another.
//! * **Leases between backups and gc.** A backup deduplicates against chunks already in the
//!   store (a `head`), which gc could be deleting at that moment if no backup references them
//!   yet. So each holds a lease object (`leases/backups/<id>`, `leases/gc`), written before
//!   it looks at the other's and refreshed while it runs: a backup that sees a live gc lease
//!   waits for it to end; a gc that sees a live backup lease after marking sweeps nothing.
//!   With both writing first and reading second, at least one sees the other. A lease not
//!   refreshed for `LEASE_TTL` is a crash leftover and is ignored (gc deletes it).
//! * **Grace period.** gc removes an unreferenced chunk or index only once it is older than
//!   `gc_grace`, the second line of defence (other writers, clocks) behind the leases.

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::{StreamExt, TryStreamExt};
use parking_lot::Mutex;
use serde::Serialize;

use crate::chunk::{decode_chunk, encode_chunk, ChunkId};
use crate::crypto::TenantKeys;
use crate::error::{BackupError, StoreError};
use crate::fixed_index::{chunk_count, chunk_len, decode_index, encode_index, validate_chunk_size, FixedIndex};
use crate::layout::{self, validate_backup_id, validate_name, validate_server_backup_id};
use crate::manifest::{
    encode_manifest, encode_server_manifest, now_ms, parse_manifest, parse_server_manifest, BackupKind, BackupStats,
    Manifest, ServerManifest, MANIFEST_FORMAT, MANIFEST_VERSION, SERVER_MANIFEST_FORMAT, SERVER_MANIFEST_VERSION,
};
use crate::object_store::{ObjectMeta, ObjectStore};

/// A lease not refreshed for this long belongs to a crashed backup or gc.
pub const LEASE_TTL: Duration = Duration::from_secs(600);
/// A running backup or gc rewrites its lease this often.
const LEASE_REFRESH: Duration = Duration::from_secs(120);
/// How often a backup looks again whether a gc it waits for has ended.
const GC_WAIT_POLL: Duration = Duration::from_secs(1);
/// Longest run of zero chunks one `ChunkSink::zero` call covers (keeps progress moving).
const MAX_ZERO_RUN_CHUNKS: u64 = 1024;

#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Bytes per chunk of new backups: a power of two, 64 KiB .. 64 MiB (default 1 MiB).
    pub chunk_size: u32,
    /// Chunks read, uploaded or downloaded at once (default 8).
    pub concurrency: usize,
    /// zstd level of new chunks (default 3).
    pub zstd_level: i32,
    /// gc keeps unreferenced chunks and indexes younger than this (default 1 h).
    pub gc_grace: Duration,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions { chunk_size: 1 << 20, concurrency: 8, zstd_level: 3, gc_grace: Duration::from_secs(3600) }
    }
}

/// What the daemon gives a backup: blocking reads of a snapshot, by chunk index.
pub trait ChunkSource: Send + Sync {
    fn size(&self) -> u64;
    /// Reads chunk `index` (the last one may be short) into `buf` (len = the chunk's length).
    fn read(&self, index: u64, buf: &mut [u8]) -> io::Result<()>;
}

/// Where a restore writes: blocking. Called from several threads at once, for distinct ranges.
pub trait ChunkSink: Send + Sync {
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// A range that reads as zeros (thin: a new volume skips it; in place: discard/zero it).
    fn zero(&self, offset: u64, len: u64) -> io::Result<()>;
    fn flush(&self) -> io::Result<()>;
}

pub trait Progress: Send + Sync {
    fn set_total(&self, bytes: u64);
    fn add_done(&self, bytes: u64);
    fn cancelled(&self) -> bool;
}

/// Progress nobody watches.
pub struct NoProgress;

impl Progress for NoProgress {
    fn set_total(&self, _: u64) {}
    fn add_done(&self, _: u64) {}
    fn cancelled(&self) -> bool {
        false
    }
}

pub struct BackupRequest<'a> {
    pub tenant: &'a str,
    pub volume: &'a str,
    pub backup_id: &'a str,
    pub server_backup: Option<&'a str>,
    pub source: Arc<dyn ChunkSource>,
    /// The chunks to read: for a first backup, those holding allocated blocks; for an
    /// incremental, those holding blocks changed (or discarded) since `parent`'s snapshot.
    /// Every other chunk is taken from `parent`'s index (or is zero when there is no parent).
    pub read_chunks: Vec<u64>,
    /// Backup id whose index supplies unchanged chunks.
    pub parent: Option<&'a str>,
    pub kind_full: bool,
    pub snapshot: &'a str,
    pub az: &'a str,
    /// Tenant encryption key.
    pub key: Option<&'a [u8; 32]>,
    /// A label (kept in the manifest).
    pub name: Option<&'a str>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RestoreStats {
    pub chunks: u64,
    pub chunks_zero: u64,
    pub chunks_downloaded: u64,
    /// As stored (compressed, encrypted).
    pub bytes_downloaded: u64,
    pub bytes_written: u64,
    pub bytes_zeroed: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CorruptChunk {
    pub key: String,
    pub why: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub backup_id: String,
    /// Distinct chunks the backup references, each read and decoded once.
    pub chunks_checked: u64,
    pub bytes_checked: u64,
    /// Keys of referenced chunks that are not in the store.
    pub missing: Vec<String>,
    /// Referenced chunks that fail to decode (checksum, authentication, hash, length).
    pub corrupt: Vec<CorruptChunk>,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.missing.is_empty() && self.corrupt.is_empty()
    }

    /// "backup X: 1 missing chunk (chunks/..), 1 corrupt chunk (chunks/..: why)", or None.
    pub fn problems(&self) -> Option<String> {
        if self.is_ok() {
            return None;
        }
        let mut parts = Vec::new();
        if !self.missing.is_empty() {
            parts.push(format!("{} missing chunk(s): {}", self.missing.len(), self.missing.join(", ")));
        }
        if !self.corrupt.is_empty() {
            let list: Vec<String> = self.corrupt.iter().map(|c| format!("{} ({})", c.key, c.why)).collect();
            parts.push(format!("{} corrupt chunk(s): {}", self.corrupt.len(), list.join(", ")));
        }
        Some(format!("backup {}: {}", self.backup_id, parts.join("; ")))
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    pub manifests: u64,
    /// Backups whose index is missing (they cannot be restored; their chunks are not kept).
    pub indexes_missing: Vec<String>,
    pub chunks_listed: u64,
    /// Distinct chunks referenced by some backup.
    pub chunks_referenced: u64,
    /// Unreferenced chunks kept because they are younger than the grace period.
    pub chunks_within_grace: u64,
    pub chunks_removed: u64,
    pub bytes_removed: u64,
    pub indexes_removed: u64,
    /// Backups running when gc was about to sweep: it swept nothing (run it again later).
    pub backups_in_progress: u64,
    pub stale_leases_removed: u64,
}

/// The outcome of one chunk of a backup.
struct ChunkDone {
    index: u64,
    id: Option<ChunkId>,
    deduplicated: bool,
    uploaded_bytes: Option<u64>,
}

/// A lease object held while a backup or a gc runs.
struct Lease<'e> {
    store: &'e dyn ObjectStore,
    key: String,
    body: Vec<u8>,
    refreshed: Instant,
}

#[derive(Serialize)]
struct LeaseBody<'a> {
    holder: &'a str,
    tenant: Option<&'a str>,
    volume: Option<&'a str>,
    started_ms: u64,
}

impl<'e> Lease<'e> {
    async fn take(store: &'e dyn ObjectStore, key: String, body: &LeaseBody<'_>) -> Result<Lease<'e>, BackupError> {
        let body = serde_json::to_vec(body).expect("plain struct");
        store.put(&key, body.clone()).await?;
        Ok(Lease { store, key, body, refreshed: Instant::now() })
    }

    async fn refresh_if_due(&mut self) -> Result<(), BackupError> {
        if self.refreshed.elapsed() >= LEASE_REFRESH {
            self.store.put(&self.key, self.body.clone()).await?;
            self.refreshed = Instant::now();
        }
        Ok(())
    }

    /// Best effort: a lease left behind only delays gc until it is stale.
    async fn release(self) {
        if let Err(e) = self.store.delete(&self.key).await {
            tracing::warn!("could not remove lease {}: {e}", self.key);
        }
    }
}

fn lease_live(meta: &ObjectMeta, now: SystemTime) -> bool {
    meta.modified.is_none_or(|m| now.duration_since(m).unwrap_or(Duration::ZERO) < LEASE_TTL)
}

fn joined<T>(r: Result<T, tokio::task::JoinError>) -> Result<T, BackupError> {
    r.map_err(|e| BackupError::Invalid(format!("a worker task failed: {e}")))
}

fn is_zero(buf: &[u8]) -> bool {
    // OR-folding blocks vectorises; an early exit per byte would not.
    buf.chunks(4096).all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
}

/// Checks what a manifest names before any key is derived from it: a manifest is data from
/// the store (or from a caller) and must not steer the engine to other tenants' objects.
fn check_manifest(key: &str, m: &Manifest) -> Result<(), BackupError> {
    let corrupt = |why: String| Err(BackupError::Corrupt { key: key.into(), why });
    if validate_name("tenant", &m.tenant).is_err()
        || validate_name("volume", &m.volume).is_err()
        || validate_backup_id(&m.backup_id).is_err()
    {
        return corrupt("invalid tenant, volume or backup id".into());
    }
    if layout::manifest_key(&m.tenant, &m.volume, &m.backup_id) != key {
        return corrupt(format!("it describes {}/{}/{}, not the backup of its key", m.tenant, m.volume, m.backup_id));
    }
    if m.index_key != layout::index_key(&m.backup_id) {
        return corrupt(format!("index key {:?} is not that of backup {}", m.index_key, m.backup_id));
    }
    if let Err(why) = validate_chunk_size(m.chunk_size) {
        return corrupt(why);
    }
    if m.encrypted != m.key_fingerprint.is_some() {
        return corrupt("encrypted flag and key fingerprint disagree".into());
    }
    Ok(())
}

fn check_server_manifest(key: &str, m: &ServerManifest) -> Result<(), BackupError> {
    let corrupt = |why: String| Err(BackupError::Corrupt { key: key.into(), why });
    if validate_name("tenant", &m.tenant).is_err()
        || validate_name("server", &m.server).is_err()
        || validate_server_backup_id(&m.server_backup_id).is_err()
        || m.volumes
            .iter()
            .any(|v| validate_name("volume", &v.volume).is_err() || validate_backup_id(&v.backup_id).is_err())
    {
        return corrupt("invalid tenant, server, volume or backup id".into());
    }
    if layout::server_manifest_key(&m.tenant, &m.server, &m.server_backup_id) != key {
        return corrupt("it describes another server backup than that of its key".into());
    }
    Ok(())
}

pub struct Engine {
    store: Arc<dyn ObjectStore>,
    opts: EngineOptions,
    format_checked: std::sync::atomic::AtomicBool,
}

impl Engine {
    pub fn new(store: Arc<dyn ObjectStore>, opts: EngineOptions) -> Engine {
        Engine { store, opts, format_checked: false.into() }
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    pub fn options(&self) -> &EngineOptions {
        &self.opts
    }

    fn concurrency(&self) -> usize {
        self.opts.concurrency.max(1)
    }

    /// Checks the store's FORMAT marker; writes it first when `create` and the store has none.
    async fn check_format(&self, create: bool) -> Result<(), BackupError> {
        use std::sync::atomic::Ordering;
        if self.format_checked.load(Ordering::Acquire) {
            return Ok(());
        }
        let what = || format!("backup store {}", self.store.describe());
        match self.store.get(layout::FORMAT_KEY).await {
            Ok(bytes) => {
                layout::check_format(&bytes).map_err(|e| BackupError::Format { what: what(), why: e.to_string() })?
            }
            Err(StoreError::NotFound { .. }) if create => {
                self.store.put(layout::FORMAT_KEY, layout::encode_format()).await?;
            }
            // An empty store: nothing to read, nothing to refuse yet.
            Err(StoreError::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        self.format_checked.store(true, Ordering::Release);
        Ok(())
    }

    /// The keys of a backup: checks that `key` is the one it was taken with.
    fn keys_for(manifest: &Manifest, key: Option<&[u8; 32]>) -> Result<Option<Arc<TenantKeys>>, BackupError> {
        let Some(expected) = &manifest.key_fingerprint else {
            return Ok(None);
        };
        let Some(key) = key else {
            return Err(BackupError::Encrypted { backup_id: manifest.backup_id.clone() });
        };
        let keys = TenantKeys::new(key);
        if keys.fingerprint() != expected {
            return Err(BackupError::WrongKey { backup_id: manifest.backup_id.clone(), expected: expected.clone() });
        }
        Ok(Some(Arc::new(keys)))
    }

    async fn read_manifest(&self, key: &str) -> Result<Manifest, BackupError> {
        let bytes = self.store.get(key).await.map_err(BackupError::missing_or_store)?;
        let m = parse_manifest(&bytes).map_err(|e| BackupError::codec(key, e))?;
        check_manifest(key, &m)?;
        Ok(m)
    }

    async fn read_server_manifest(&self, key: &str) -> Result<ServerManifest, BackupError> {
        let bytes = self.store.get(key).await.map_err(BackupError::missing_or_store)?;
        let m = parse_server_manifest(&bytes).map_err(|e| BackupError::codec(key, e))?;
        check_server_manifest(key, &m)?;
        Ok(m)
    }

    /// The index of a backup, checked against its manifest.
    async fn read_index(&self, m: &Manifest) -> Result<FixedIndex, BackupError> {
        let bytes = self.store.get(&m.index_key).await.map_err(BackupError::missing_or_store)?;
        let index = decode_index(&bytes).map_err(|e| BackupError::codec(&m.index_key, e))?;
        if index.chunk_size != m.chunk_size || index.volume_size != m.volume_size {
            return Err(BackupError::Corrupt {
                key: m.index_key.clone(),
                why: format!(
                    "index of {} bytes in chunks of {}, the manifest says {} in chunks of {}",
                    index.volume_size, index.chunk_size, m.volume_size, m.chunk_size
                ),
            });
        }
        Ok(index)
    }

    /// What a restore or verify starts from: the backup's keys (checked against the key given)
    /// and its index.
    async fn open_backup(
        &self,
        manifest: &Manifest,
        key: Option<&[u8; 32]>,
    ) -> Result<(Option<Arc<TenantKeys>>, FixedIndex), BackupError> {
        check_manifest(&layout::manifest_key(&manifest.tenant, &manifest.volume, &manifest.backup_id), manifest)?;
        let keys = Engine::keys_for(manifest, key)?;
        self.check_format(false).await?;
        Ok((keys, self.read_index(manifest).await?))
    }

    /// The key of the manifest named `id` under `prefix` (`<root><tenant>/`), by listing it.
    async fn find_key(&self, root: &str, prefix: &str, id: &str) -> Result<Option<String>, BackupError> {
        let listed = self.store.list(prefix).await?;
        Ok(listed
            .into_iter()
            .map(|m| m.key)
            .find(|k| layout::split_manifest_key(root, k).is_some_and(|(_, _, x)| x == id)))
    }

    /// Reads every manifest under `prefix` (keys `<prefix><a>/<b>/<id>`), `concurrency` at a time.
    async fn read_manifests(&self, prefix: &str) -> Result<Vec<Manifest>, BackupError> {
        let keys: Vec<String> = self
            .store
            .list(prefix)
            .await?
            .into_iter()
            .map(|m| m.key)
            .filter(|k| layout::split_manifest_key(layout::MANIFESTS_PREFIX, k).is_some())
            .collect();
        futures::stream::iter(keys)
            .map(|k| async move { self.read_manifest(&k).await })
            .buffered(self.concurrency())
            .try_collect()
            .await
    }

    // ---- backup ------------------------------------------------------------------------

    pub async fn backup(&self, req: BackupRequest<'_>, progress: &dyn Progress) -> Result<Manifest, BackupError> {
        validate_name("tenant", req.tenant)?;
        validate_name("volume", req.volume)?;
        validate_backup_id(req.backup_id)?;
        if let Some(s) = req.server_backup {
            validate_server_backup_id(s)?;
        }
        if let Some(p) = req.parent {
            validate_backup_id(p)?;
            if p == req.backup_id {
                return Err(BackupError::Invalid(format!("backup {p} cannot be its own parent")));
            }
        }
        let cs = self.opts.chunk_size;
        validate_chunk_size(cs).map_err(BackupError::Invalid)?;
        let size = req.source.size();
        let n = chunk_count(size, cs);
        let mut reads = req.read_chunks.clone();
        reads.sort_unstable();
        reads.dedup();
        if let Some(&bad) = reads.iter().find(|&&i| i >= n) {
            return Err(BackupError::Invalid(format!(
                "chunk {bad} to read is past the end of the volume ({n} chunks of {cs} bytes)"
            )));
        }
        let keys = req.key.map(|k| Arc::new(TenantKeys::new(k)));
        self.check_format(true).await?;
        let mkey = layout::manifest_key(req.tenant, req.volume, req.backup_id);
        if self.store.head(&mkey).await?.is_some() {
            return Err(BackupError::Invalid(format!("backup {} exists already", req.backup_id)));
        }

        let mut index = FixedIndex::zeroed(cs, size);
        if let Some(parent) = req.parent {
            let pindex = self.parent_index(req.tenant, req.volume, parent, keys.as_deref()).await?;
            for i in 0..n.min(pindex.entries.len() as u64) {
                if pindex.chunk_len(i) == chunk_len(size, cs, i) {
                    index.entries[i as usize] = pindex.entries[i as usize];
                } else {
                    // The parent's short last chunk, now longer (the volume grew): its new
                    // bytes may hold data, so it is read again.
                    reads.push(i);
                }
            }
            reads.sort_unstable();
            reads.dedup();
        }

        let holder = format!("backup {}", req.backup_id);
        let body =
            LeaseBody { holder: &holder, tenant: Some(req.tenant), volume: Some(req.volume), started_ms: now_ms() };
        let mut lease = Lease::take(self.store.as_ref(), layout::backup_lease_key(req.backup_id), &body).await?;
        let result = self.backup_locked(&req, &reads, index, keys, &mut lease, progress).await;
        lease.release().await;
        result
    }

    /// The parent's index, if it can supply this backup's unchanged chunks.
    async fn parent_index(
        &self,
        tenant: &str,
        volume: &str,
        parent: &str,
        keys: Option<&TenantKeys>,
    ) -> Result<FixedIndex, BackupError> {
        let unusable = |why: String| BackupError::Parent { parent: parent.into(), why };
        let pm = match self.read_manifest(&layout::manifest_key(tenant, volume, parent)).await {
            Ok(m) => m,
            // Another volume's backup of this tenant (e.g. the one this volume was restored from).
            Err(BackupError::Missing { .. }) => match self.find(tenant, parent).await {
                Ok(m) => m,
                Err(BackupError::NotFound(_)) => return Err(unusable("it does not exist".into())),
                Err(e) => return Err(e),
            },
            Err(e @ (BackupError::Corrupt { .. } | BackupError::Format { .. })) => return Err(unusable(e.to_string())),
            Err(e) => return Err(e),
        };
        if pm.chunk_size != self.opts.chunk_size {
            return Err(unusable(format!(
                "its chunk size is {}, this engine's {}",
                pm.chunk_size, self.opts.chunk_size
            )));
        }
        if pm.key_fingerprint.as_deref() != keys.map(|k| k.fingerprint()) {
            return Err(unusable("it was taken with another encryption key (or with none, or without one)".into()));
        }
        match self.read_index(&pm).await {
            Ok(ix) => Ok(ix),
            Err(e @ (BackupError::Missing { .. } | BackupError::Corrupt { .. } | BackupError::Format { .. })) => {
                Err(unusable(e.to_string()))
            }
            Err(e) => Err(e),
        }
    }

    /// The part of a backup that runs under its lease.
    async fn backup_locked(
        &self,
        req: &BackupRequest<'_>,
        reads: &[u64],
        mut index: FixedIndex,
        keys: Option<Arc<TenantKeys>>,
        lease: &mut Lease<'_>,
        progress: &dyn Progress,
    ) -> Result<Manifest, BackupError> {
        self.wait_for_gc(progress).await?;
        let (size, cs) = (index.volume_size, index.chunk_size);
        let bytes_read: u64 = reads.iter().map(|&i| chunk_len(size, cs, i)).sum();
        progress.set_total(bytes_read);
        let mut stats = BackupStats { chunks_read: reads.len() as u64, bytes_read, ..Default::default() };
        let stored_now = Mutex::new(HashSet::new());
        let mut done = futures::stream::iter(reads.iter().copied())
            .map(|i| self.backup_chunk(req, i, chunk_len(size, cs, i), keys.clone(), &stored_now, progress))
            .buffer_unordered(self.concurrency());
        while let Some(c) = done.next().await {
            let c = c?;
            index.entries[c.index as usize] = c.id;
            stats.chunks_deduplicated += u64::from(c.deduplicated);
            if let Some(b) = c.uploaded_bytes {
                stats.chunks_uploaded += 1;
                stats.bytes_uploaded += b;
            }
            progress.add_done(chunk_len(size, cs, c.index));
            lease.refresh_if_due().await?;
        }
        drop(done);
        if progress.cancelled() {
            return Err(BackupError::Cancelled);
        }
        stats.chunks = index.entries.len() as u64;
        for (i, e) in index.entries.iter().enumerate() {
            match e {
                None => stats.chunks_zero += 1,
                Some(_) => stats.bytes_logical += chunk_len(size, cs, i as u64),
            }
        }
        let index_key = layout::index_key(req.backup_id);
        self.store.put(&index_key, encode_index(&index)).await?;
        let manifest = Manifest {
            format: MANIFEST_FORMAT.into(),
            version: MANIFEST_VERSION,
            backup_id: req.backup_id.into(),
            tenant: req.tenant.into(),
            volume: req.volume.into(),
            name: req.name.map(str::to_string),
            volume_size: size,
            chunk_size: cs,
            created_ms: now_ms(),
            az: req.az.into(),
            parent: req.parent.map(str::to_string),
            kind: if req.kind_full { BackupKind::Full } else { BackupKind::Incremental },
            server_backup: req.server_backup.map(str::to_string),
            snapshot: req.snapshot.into(),
            encrypted: keys.is_some(),
            key_fingerprint: keys.as_ref().map(|k| k.fingerprint().to_string()),
            index_key,
            stats,
        };
        // The commit point.
        crash_point!("backup-before-manifest");
        let mkey = layout::manifest_key(req.tenant, req.volume, req.backup_id);
        self.store.put(&mkey, encode_manifest(&manifest)).await?;
        crash_point!("backup-after-manifest");
        Ok(manifest)
    }

    /// Waits while a (live) gc runs: it may be deleting chunks this backup would reuse.
    async fn wait_for_gc(&self, progress: &dyn Progress) -> Result<(), BackupError> {
        loop {
            match self.store.head(layout::GC_LEASE_KEY).await? {
                Some(m) if lease_live(&m, SystemTime::now()) => {
                    if progress.cancelled() {
                        return Err(BackupError::Cancelled);
                    }
                    tokio::time::sleep(GC_WAIT_POLL).await;
                }
                _ => return Ok(()),
            }
        }
    }

    /// Reads one chunk; stores it unless it is zeros or the store has it.
    async fn backup_chunk(
        &self,
        req: &BackupRequest<'_>,
        index: u64,
        len: u64,
        keys: Option<Arc<TenantKeys>>,
        stored_now: &Mutex<HashSet<ChunkId>>,
        progress: &dyn Progress,
    ) -> Result<ChunkDone, BackupError> {
        if progress.cancelled() {
            return Err(BackupError::Cancelled);
        }
        let source = req.source.clone();
        let hash_keys = keys.clone();
        let read = tokio::task::spawn_blocking(move || -> io::Result<Option<(Vec<u8>, ChunkId)>> {
            let mut buf = vec![0u8; len as usize];
            source.read(index, &mut buf)?;
            if is_zero(&buf) {
                return Ok(None);
            }
            let id = ChunkId::of(&buf, hash_keys.as_deref());
            Ok(Some((buf, id)))
        })
        .await;
        let Some((data, id)) = joined(read)?.map_err(BackupError::Source)? else {
            return Ok(ChunkDone { index, id: None, deduplicated: false, uploaded_bytes: None });
        };
        let dedup = ChunkDone { index, id: Some(id), deduplicated: true, uploaded_bytes: None };
        // Equal data twice in this backup: stored (or being stored) once.
        if !stored_now.lock().insert(id) {
            return Ok(dedup);
        }
        let key = layout::chunk_key(&id);
        if self.store.head(&key).await?.is_some() {
            return Ok(dedup);
        }
        let level = self.opts.zstd_level;
        let enc_key = key.clone();
        let encoded = tokio::task::spawn_blocking(move || {
            encode_chunk(&id, &data, level, keys.as_deref()).map_err(|e| BackupError::codec(&enc_key, e))
        })
        .await;
        let object = joined(encoded)??;
        let stored = object.len() as u64;
        self.store.put(&key, object).await?;
        Ok(ChunkDone { index, id: Some(id), deduplicated: false, uploaded_bytes: Some(stored) })
    }

    // ---- restore -----------------------------------------------------------------------

    /// Restores a backup into `sink`: every chunk is fetched, checked and written; zero chunks
    /// become `sink.zero`. A wrong or missing key fails before anything is written.
    pub async fn restore(
        &self,
        manifest: &Manifest,
        sink: Arc<dyn ChunkSink>,
        key: Option<&[u8; 32]>,
        progress: &dyn Progress,
    ) -> Result<RestoreStats, BackupError> {
        let (keys, index) = self.open_backup(manifest, key).await?;
        progress.set_total(index.volume_size);
        let mut stats = RestoreStats { chunks: index.entries.len() as u64, ..Default::default() };

        // Work items: (first chunk, number of chunks, id); runs of zero chunks are merged.
        let mut work: Vec<(u64, u64, Option<ChunkId>)> = Vec::new();
        for (i, e) in index.entries.iter().enumerate() {
            let i = i as u64;
            match (e, work.last_mut()) {
                (None, Some((start, count, None))) if *start + *count == i && *count < MAX_ZERO_RUN_CHUNKS => {
                    *count += 1
                }
                _ => work.push((i, 1, *e)),
            }
        }
        let index = &index;
        let mut done = futures::stream::iter(work)
            .map(|(first, count, id)| {
                let (sink, keys) = (sink.clone(), keys.clone());
                async move {
                    if progress.cancelled() {
                        return Err(BackupError::Cancelled);
                    }
                    let offset = first * u64::from(index.chunk_size);
                    let len: u64 = (first..first + count).map(|i| index.chunk_len(i)).sum();
                    match id {
                        None => {
                            let r = tokio::task::spawn_blocking(move || sink.zero(offset, len)).await;
                            joined(r)?.map_err(BackupError::Sink)?;
                            Ok((len, count, None))
                        }
                        Some(id) => {
                            let stored = self.fetch_chunk(id, len, index.chunk_size, keys).await?;
                            let (data, stored_len) = stored;
                            let r = tokio::task::spawn_blocking(move || sink.write(offset, &data)).await;
                            joined(r)?.map_err(BackupError::Sink)?;
                            crash_point!("restore-after-chunk");
                            Ok((len, count, Some(stored_len)))
                        }
                    }
                }
            })
            .buffer_unordered(self.concurrency());
        while let Some(r) = done.next().await {
            let (len, count, downloaded) = r?;
            match downloaded {
                None => {
                    stats.chunks_zero += count;
                    stats.bytes_zeroed += len;
                }
                Some(stored) => {
                    stats.chunks_downloaded += 1;
                    stats.bytes_downloaded += stored;
                    stats.bytes_written += len;
                }
            }
            progress.add_done(len);
        }
        drop(done);
        let r = tokio::task::spawn_blocking(move || sink.flush()).await;
        joined(r)?.map_err(BackupError::Sink)?;
        Ok(stats)
    }

    /// Fetches and decodes chunk `id`, which must hold `len` bytes; returns the data and the
    /// object's stored size.
    async fn fetch_chunk(
        &self,
        id: ChunkId,
        len: u64,
        chunk_size: u32,
        keys: Option<Arc<TenantKeys>>,
    ) -> Result<(Vec<u8>, u64), BackupError> {
        let key = layout::chunk_key(&id);
        let object = self.store.get(&key).await.map_err(BackupError::missing_or_store)?;
        let stored = object.len() as u64;
        let decoded = tokio::task::spawn_blocking(move || {
            let data = decode_chunk(&id, &object, chunk_size as usize, keys.as_deref())
                .map_err(|e| BackupError::codec(&key, e))?;
            if data.len() as u64 != len {
                return Err(BackupError::Corrupt {
                    key,
                    why: format!("it holds {} bytes where the index needs {len}", data.len()),
                });
            }
            Ok(data)
        })
        .await;
        Ok((joined(decoded)??, stored))
    }

    // ---- catalog -----------------------------------------------------------------------

    /// The backups of a tenant, or of one of its volumes, oldest first.
    pub async fn list(&self, tenant: &str, volume: Option<&str>) -> Result<Vec<Manifest>, BackupError> {
        validate_name("tenant", tenant)?;
        if let Some(v) = volume {
            validate_name("volume", v)?;
        }
        self.check_format(false).await?;
        let mut all = self.read_manifests(&layout::manifest_prefix(tenant, volume)).await?;
        all.sort_by(|a, b| (a.created_ms, &a.backup_id).cmp(&(b.created_ms, &b.backup_id)));
        Ok(all)
    }

    /// A backup of this tenant by id (NotFound for another tenant's).
    pub async fn find(&self, tenant: &str, backup_id: &str) -> Result<Manifest, BackupError> {
        validate_name("tenant", tenant)?;
        validate_backup_id(backup_id)?;
        self.check_format(false).await?;
        let key = self
            .find_key(layout::MANIFESTS_PREFIX, &layout::manifest_prefix(tenant, None), backup_id)
            .await?
            .ok_or_else(|| BackupError::NotFound(format!("backup {backup_id}")))?;
        match self.read_manifest(&key).await {
            // Deleted between the list and the get.
            Err(BackupError::Missing { .. }) => Err(BackupError::NotFound(format!("backup {backup_id}"))),
            other => other,
        }
    }

    /// Deletes a backup: its manifest (it no longer exists), then its index. Its chunks stay
    /// until gc finds no backup referencing them.
    pub async fn delete(&self, manifest: &Manifest) -> Result<(), BackupError> {
        let key = layout::manifest_key(&manifest.tenant, &manifest.volume, &manifest.backup_id);
        check_manifest(&key, manifest)?;
        self.store.delete(&key).await?;
        self.store.delete(&manifest.index_key).await?;
        Ok(())
    }

    // ---- verify ------------------------------------------------------------------------

    /// Re-reads and checks every chunk a backup references. Missing or corrupt chunks are
    /// reported by key; a missing or corrupt index is an error.
    pub async fn verify(
        &self,
        manifest: &Manifest,
        key: Option<&[u8; 32]>,
        progress: &dyn Progress,
    ) -> Result<VerifyReport, BackupError> {
        let (keys, index) = self.open_backup(manifest, key).await?;
        let mut report = VerifyReport { backup_id: manifest.backup_id.clone(), ..Default::default() };
        // Each distinct chunk once, with the length its (first) position needs.
        let mut lens: HashMap<ChunkId, u64> = HashMap::new();
        let mut order = Vec::new();
        for (i, e) in index.entries.iter().enumerate() {
            if let Some(id) = e {
                let len = index.chunk_len(i as u64);
                match lens.get(id) {
                    None => {
                        lens.insert(*id, len);
                        order.push((*id, len));
                    }
                    Some(&l) if l != len => report.corrupt.push(CorruptChunk {
                        key: layout::chunk_key(id),
                        why: format!("used for {l} and for {len} bytes"),
                    }),
                    Some(_) => {}
                }
            }
        }
        progress.set_total(order.iter().map(|&(_, l)| l).sum());
        let mut done = futures::stream::iter(order)
            .map(|(id, len)| {
                let keys = keys.clone();
                async move {
                    if progress.cancelled() {
                        return Err(BackupError::Cancelled);
                    }
                    Ok((len, self.fetch_chunk(id, len, index.chunk_size, keys).await))
                }
            })
            .buffer_unordered(self.concurrency());
        while let Some(r) = done.next().await {
            let (len, fetched) = r?;
            report.chunks_checked += 1;
            match fetched {
                Ok(_) => report.bytes_checked += len,
                Err(BackupError::Missing { key }) => report.missing.push(key),
                Err(BackupError::Corrupt { key, why }) => report.corrupt.push(CorruptChunk { key, why }),
                Err(BackupError::Format { what, why }) => report.corrupt.push(CorruptChunk { key: what, why }),
                Err(e) => return Err(e),
            }
            progress.add_done(len);
        }
        report.missing.sort();
        report.corrupt.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(report)
    }

    // ---- gc ----------------------------------------------------------------------------

    /// Marks every chunk and index referenced by a manifest, then removes the unreferenced
    /// ones older than the grace period. Sweeps nothing while a backup runs.
    pub async fn gc(&self, progress: &dyn Progress) -> Result<GcReport, BackupError> {
        self.check_format(false).await?;
        let body = LeaseBody { holder: "gc", tenant: None, volume: None, started_ms: now_ms() };
        let mut lease = Lease::take(self.store.as_ref(), layout::GC_LEASE_KEY.into(), &body).await?;
        let result = self.gc_locked(&mut lease, progress).await;
        lease.release().await;
        result
    }

    async fn gc_locked(&self, lease: &mut Lease<'_>, progress: &dyn Progress) -> Result<GcReport, BackupError> {
        let mut report = GcReport::default();
        // Mark. A manifest or index that cannot be read stops gc: what it references is unknown.
        let manifests = self.read_manifests(layout::MANIFESTS_PREFIX).await?;
        report.manifests = manifests.len() as u64;
        let mut chunks_used: HashSet<ChunkId> = HashSet::new();
        let indexes_used: HashSet<&str> = manifests.iter().map(|m| m.index_key.as_str()).collect();
        for m in &manifests {
            if progress.cancelled() {
                return Err(BackupError::Cancelled);
            }
            match self.read_index(m).await {
                Ok(ix) => chunks_used.extend(ix.entries.into_iter().flatten()),
                Err(BackupError::Missing { .. }) => report.indexes_missing.push(m.backup_id.clone()),
                Err(e) => return Err(e),
            }
            lease.refresh_if_due().await?;
        }
        report.chunks_referenced = chunks_used.len() as u64;

        // Candidates: unreferenced and older than the grace period.
        let now = SystemTime::now();
        let old = |m: &ObjectMeta| {
            m.modified.is_some_and(|t| now.duration_since(t).unwrap_or_default() >= self.opts.gc_grace)
        };
        let mut doomed: Vec<ObjectMeta> = Vec::new();
        let chunks = self.store.list(layout::CHUNKS_PREFIX).await?;
        report.chunks_listed = chunks.len() as u64;
        for c in chunks {
            // Objects of other shapes under chunks/ are not ours to remove.
            let Some(id) = layout::parse_chunk_key(&c.key) else { continue };
            if chunks_used.contains(&id) {
                continue;
            }
            if old(&c) {
                doomed.push(c);
            } else {
                report.chunks_within_grace += 1;
            }
        }
        let doomed_chunks = doomed.len();
        for ix in self.store.list(layout::INDEXES_PREFIX).await? {
            if !indexes_used.contains(ix.key.as_str()) && old(&ix) {
                doomed.push(ix);
            }
        }
        let mut live = 0u64;
        for l in self.store.list(layout::BACKUP_LEASES_PREFIX).await? {
            if lease_live(&l, now) {
                live += 1;
            } else {
                self.store.delete(&l.key).await?;
                report.stale_leases_removed += 1;
            }
        }
        if live > 0 {
            report.backups_in_progress = live;
            return Ok(report);
        }

        // Sweep.
        progress.set_total(doomed.len() as u64);
        let mut swept = futures::stream::iter(doomed.into_iter().enumerate())
            .map(|(n, m)| async move {
                if progress.cancelled() {
                    return Err(BackupError::Cancelled);
                }
                self.store.delete(&m.key).await?;
                Ok((n < doomed_chunks, m.size))
            })
            .buffer_unordered(self.concurrency());
        while let Some(r) = swept.next().await {
            let (is_chunk, size) = r?;
            if is_chunk {
                report.chunks_removed += 1;
                report.bytes_removed += size;
            } else {
                report.indexes_removed += 1;
            }
            progress.add_done(1);
            lease.refresh_if_due().await?;
        }
        Ok(report)
    }

    // ---- server backups ----------------------------------------------------------------

    /// Writes a server backup's manifest: after all its volume backups exist, each naming
    /// this server backup.
    pub async fn put_server_manifest(&self, m: &ServerManifest) -> Result<(), BackupError> {
        validate_name("tenant", &m.tenant)?;
        validate_name("server", &m.server)?;
        validate_server_backup_id(&m.server_backup_id)?;
        if m.format != SERVER_MANIFEST_FORMAT || m.version != SERVER_MANIFEST_VERSION {
            return Err(BackupError::Invalid(format!(
                "server manifest of format {:?} version {}; expected {SERVER_MANIFEST_FORMAT:?} version {SERVER_MANIFEST_VERSION}",
                m.format, m.version
            )));
        }
        if m.volumes.is_empty() {
            return Err(BackupError::Invalid(format!("server backup {} has no volume backups", m.server_backup_id)));
        }
        self.check_format(true).await?;
        for v in &m.volumes {
            validate_name("volume", &v.volume)?;
            validate_backup_id(&v.backup_id)?;
            let vm = match self.read_manifest(&layout::manifest_key(&m.tenant, &v.volume, &v.backup_id)).await {
                Err(BackupError::Missing { .. }) => {
                    return Err(BackupError::Invalid(format!(
                    "backup {} of volume {} does not exist: a server manifest is written after its volumes' manifests",
                    v.backup_id, v.volume
                )))
                }
                other => other?,
            };
            if vm.server_backup.as_deref() != Some(&m.server_backup_id) {
                return Err(BackupError::Invalid(format!(
                    "backup {} of volume {} does not belong to server backup {}",
                    v.backup_id, v.volume, m.server_backup_id
                )));
            }
        }
        let key = layout::server_manifest_key(&m.tenant, &m.server, &m.server_backup_id);
        if self.store.head(&key).await?.is_some() {
            return Err(BackupError::Invalid(format!("server backup {} exists already", m.server_backup_id)));
        }
        self.store.put(&key, encode_server_manifest(m)).await?;
        Ok(())
    }

    /// The server backups of a tenant, or of one of its servers, oldest first.
    pub async fn list_server_backups(
        &self,
        tenant: &str,
        server: Option<&str>,
    ) -> Result<Vec<ServerManifest>, BackupError> {
        validate_name("tenant", tenant)?;
        if let Some(s) = server {
            validate_name("server", s)?;
        }
        self.check_format(false).await?;
        let keys: Vec<String> = self
            .store
            .list(&layout::server_manifest_prefix(tenant, server))
            .await?
            .into_iter()
            .map(|m| m.key)
            .filter(|k| layout::split_manifest_key(layout::SERVERS_PREFIX, k).is_some())
            .collect();
        let mut all: Vec<ServerManifest> = futures::stream::iter(keys)
            .map(|k| async move { self.read_server_manifest(&k).await })
            .buffered(self.concurrency())
            .try_collect()
            .await?;
        all.sort_by(|a, b| (a.created_ms, &a.server_backup_id).cmp(&(b.created_ms, &b.server_backup_id)));
        Ok(all)
    }

    /// A server backup of this tenant by id (NotFound for another tenant's).
    pub async fn find_server_backup(
        &self,
        tenant: &str,
        server_backup_id: &str,
    ) -> Result<ServerManifest, BackupError> {
        validate_name("tenant", tenant)?;
        validate_server_backup_id(server_backup_id)?;
        self.check_format(false).await?;
        let not_found = || BackupError::NotFound(format!("server backup {server_backup_id}"));
        let key = self
            .find_key(layout::SERVERS_PREFIX, &layout::server_manifest_prefix(tenant, None), server_backup_id)
            .await?
            .ok_or_else(not_found)?;
        match self.read_server_manifest(&key).await {
            Err(BackupError::Missing { .. }) => Err(not_found()),
            other => other,
        }
    }

    /// Deletes a server backup: its manifest first (the server backup no longer exists), then
    /// each of its volume backups still there.
    pub async fn delete_server_backup(&self, m: &ServerManifest) -> Result<(), BackupError> {
        let key = layout::server_manifest_key(&m.tenant, &m.server, &m.server_backup_id);
        check_server_manifest(&key, m)?;
        self.store.delete(&key).await?;
        for v in &m.volumes {
            match self.read_manifest(&layout::manifest_key(&m.tenant, &v.volume, &v.backup_id)).await {
                Ok(vm) => self.delete(&vm).await?,
                Err(BackupError::Missing { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0u8; 10000]));
        let mut b = vec![0u8; 10000];
        b[9999] = 1;
        assert!(!is_zero(&b));
    }

    #[test]
    fn leases_go_stale() {
        let now = SystemTime::now();
        let m = |age: Duration| ObjectMeta { key: "k".into(), size: 0, modified: Some(now - age) };
        assert!(lease_live(&m(Duration::from_secs(1)), now));
        assert!(!lease_live(&m(LEASE_TTL + Duration::from_secs(1)), now));
        assert!(lease_live(&ObjectMeta { key: "k".into(), size: 0, modified: None }, now));
    }

    #[test]
    fn verify_report_names_problems() {
        let mut r = VerifyReport { backup_id: "bk-x".into(), ..Default::default() };
        assert_eq!(r.problems(), None);
        r.missing.push("chunks/aa/aa".into());
        r.corrupt.push(CorruptChunk { key: "chunks/bb/bb".into(), why: "crc".into() });
        let p = r.problems().unwrap();
        assert!(p.contains("chunks/aa/aa") && p.contains("chunks/bb/bb (crc)"), "{p}");
    }
}
