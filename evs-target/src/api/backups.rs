//! Backups (VBS, CSBS): `BackupService` over the backup engine (`evs-backup`), run as jobs.
//!
//! What the control plane adds to the engine:
//! * **Changed-block tracking.** Each backup takes a hidden snapshot (`.bk-<backup id>`); the
//!   last successful one stays as the volume's *base* (table `backup_bases`: volume id → base
//!   snapshot and backup). The next backup reads only the chunks holding blocks changed or
//!   discarded between the base and its own snapshot (metadata only, from the layer maps), and
//!   takes every other chunk from the base backup's index. The base survives restarts and
//!   crashes (it is a snapshot in the catalog), so an incremental after a restart still reads
//!   only what changed. Without a usable base (first backup, `--full`, the base backup
//!   deleted), the backup reads the allocated chunks only.
//! * **Limits** of the service description (per volume, per tenant, bytes per tenant),
//!   counted from the object store's manifests plus the backups queued or running.
//! * **Restores** to a new volume (thin: zero chunks are skipped) or in place (detached volume;
//!   zero chunks are discarded); a server backup restores every volume and groups them in a
//!   new server. A volume being restored (table `restoring`) cannot be attached.
//! * **Encryption keys**: one per tenant, `<data-dir>/keys/<tenant>.key` (hex, mode 0600),
//!   never logged; the engine records only its fingerprint.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use evs_backup::{
    BackupError, BackupKind, BackupRequest, ChunkSink, ChunkSource, Engine, Manifest, Progress, ServerManifest,
    ServerVolume,
};
use evs_proto::v1 as pb;
use evs_proto::v1::backup_service_server::BackupService;
use evs_snapshot::{ChangedExtent, StoreError, Volume};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use super::jobs::job_to_pb;
use super::validate::{validate_volume_name, validate_volume_size, ValidationError};
use super::{ApiError, ControlPlane, VolumeApi};
use crate::config::BackupSettings;
use crate::jobs::{JobContext, JobError, JobKind, JobRecord};

/// Volume id → encoded [`BaseRecord`]: the snapshot the next incremental diffs against.
pub(super) const BACKUP_BASES: TableDefinition<u64, &[u8]> = TableDefinition::new("backup_bases");
/// Volume id → the restore job writing it.
pub(super) const RESTORING: TableDefinition<u64, u64> = TableDefinition::new("restoring");

/// Prefix of the hidden snapshots backups take.
const SNAPSHOT_PREFIX: &str = ".bk-";

/// The backup engine and what the control plane needs to drive it.
pub struct BackupContext {
    pub engine: Arc<Engine>,
    /// The daemon's runtime: job threads block on the engine's futures through it.
    pub rt: tokio::runtime::Handle,
    pub settings: BackupSettings,
    pub az: String,
    /// Where tenants' encryption keys live.
    pub keys_dir: PathBuf,
}

impl std::fmt::Debug for BackupContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupContext").field("store", &self.engine.store().describe()).field("az", &self.az).finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct BaseRecord {
    v: u32,
    snapshot: u64,
    backup_id: String,
}

/// The chunks (of `chunk` bytes) that `extents` touch, in order.
pub fn chunks_touched(extents: &[ChangedExtent], chunk: u64) -> Vec<u64> {
    let mut out: BTreeSet<u64> = BTreeSet::new();
    for e in extents.iter().filter(|e| e.len > 0) {
        let first = e.offset / chunk;
        let last = (e.offset + e.len - 1) / chunk;
        out.extend(first..=last);
    }
    out.into_iter().collect()
}

/// Checks a backup id given by a user (`bk-…` or `sbk-…`), so it never becomes a strange
/// object key.
pub fn validate_backup_id(id: &str) -> Result<(), ValidationError> {
    let checked = if id.starts_with("sbk-") {
        evs_backup::validate_server_backup_id(id)
    } else {
        evs_backup::validate_backup_id(id)
    };
    checked.map_err(|_| ValidationError::BackupId(id.to_string()))
}

/// The id of volume `index`'s backup within server backup `server_backup_id`: derived from
/// it (same timestamp, hashed suffix), so a resumed job finds the backups it already made.
fn server_volume_backup_id(server_backup_id: &str, index: usize) -> String {
    let rest = server_backup_id.trim_start_matches("sbk-");
    let stamp = rest.split_once('-').map_or(rest, |(s, _)| s);
    let h = blake3::hash(format!("{server_backup_id}/{index}").as_bytes());
    let b = h.as_bytes();
    format!("bk-{stamp}-{:02x}{:02x}{:02x}", b[0], b[1], b[2])
}

/// A job's progress as the engine reports it.
struct JobProgress<'a>(&'a JobContext);

impl Progress for JobProgress<'_> {
    fn set_total(&self, bytes: u64) {
        self.0.set_total(bytes);
    }
    fn add_done(&self, bytes: u64) {
        self.0.add_done(bytes);
    }
    fn cancelled(&self) -> bool {
        self.0.is_cancelled() || self.0.stopping()
    }
}

/// Reads of a snapshot, by chunk.
struct SnapshotSource {
    view: Arc<Volume>,
    chunk: u64,
}

impl ChunkSource for SnapshotSource {
    fn size(&self) -> u64 {
        self.view.size()
    }
    fn read(&self, index: u64, buf: &mut [u8]) -> io::Result<()> {
        self.view.read_at(index * self.chunk, buf).map_err(io::Error::other)
    }
}

/// Writes of a restore into a volume.
struct VolumeSink {
    volume: Arc<Volume>,
    /// A new volume reads as zeros already: zero chunks cost nothing.
    fresh: bool,
}

impl VolumeSink {
    /// Runs a mutation, waiting out a snapshot's freeze (none is expected on a restore target).
    fn mutate(&self, f: impl Fn(&Volume) -> Result<(), StoreError>) -> io::Result<()> {
        loop {
            match f(&self.volume) {
                Err(StoreError::Frozen) => self.volume.wait_thawed(),
                other => return other.map_err(io::Error::other),
            }
        }
    }
}

impl ChunkSink for VolumeSink {
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        // Restores write MiB chunks: O_DIRECT, no page-cache copy.
        self.mutate(|v| v.write_at_direct(offset, data))
    }
    fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.fresh {
            return Ok(());
        }
        self.mutate(|v| v.write_zeroes(offset, len, false))
    }
    fn flush(&self) -> io::Result<()> {
        self.volume.flush().map_err(io::Error::other)
    }
}

fn backup_error(e: BackupError) -> ApiError {
    match e {
        BackupError::NotFound(what) => ApiError::BackupNotFound(what),
        other => ApiError::Backup(other.to_string()),
    }
}

fn kind_name(kind: BackupKind) -> &'static str {
    match kind {
        BackupKind::Full => "full",
        BackupKind::Incremental => "incremental",
    }
}

fn job_failed(e: impl std::fmt::Display) -> JobError {
    JobError::Failed(e.to_string())
}

/// A volume backup's manifest as the API shows it.
pub fn manifest_to_pb(m: &Manifest) -> pb::Backup {
    pb::Backup {
        id: m.backup_id.clone(),
        kind: "volume".into(),
        volume: m.volume.clone(),
        server: String::new(),
        server_backup: m.server_backup.clone().unwrap_or_default(),
        size_bytes: m.volume_size,
        created_unix_ms: m.created_ms,
        mode: kind_name(m.kind).into(),
        parent: m.parent.clone().unwrap_or_default(),
        az: m.az.clone(),
        encrypted: m.encrypted,
        stats: Some(pb::BackupStats {
            chunks: m.stats.chunks,
            chunks_zero: m.stats.chunks_zero,
            chunks_read: m.stats.chunks_read,
            chunks_uploaded: m.stats.chunks_uploaded,
            chunks_deduplicated: m.stats.chunks_deduplicated,
            bytes_read: m.stats.bytes_read,
            bytes_uploaded: m.stats.bytes_uploaded,
            bytes_logical: m.stats.bytes_logical,
        }),
        volumes: Vec::new(),
        name: m.name.clone().unwrap_or_default(),
    }
}

impl ControlPlane {
    fn backups(&self) -> Result<&BackupContext, ApiError> {
        self.backup.as_deref().ok_or(ApiError::Unsupported("backups without a backup store"))
    }

    fn block_on<T>(&self, f: impl std::future::Future<Output = Result<T, BackupError>>) -> Result<T, ApiError> {
        self.backups()?.rt.block_on(f).map_err(backup_error)
    }

    // ---- encryption keys ----

    fn key_path(&self, tenant: &str) -> Result<PathBuf, ApiError> {
        Ok(self.backups()?.keys_dir.join(format!("{tenant}.key")))
    }

    /// The tenant's encryption key, if it set one.
    fn tenant_key(&self, tenant: &str) -> Result<Option<[u8; 32]>, ApiError> {
        let path = self.key_path(tenant)?;
        match fs::read_to_string(&path) {
            Ok(text) => parse_key(text.trim()).map(Some).map_err(|_| {
                ApiError::Internal(format!("the encryption key file of tenant {tenant:?} is not 64 hex digits"))
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ApiError::Internal(format!("cannot read the encryption key of tenant {tenant:?}: {e}"))),
        }
    }

    /// Sets (or with "" clears) the caller's encryption key; returns its fingerprint.
    pub fn set_encryption_key(&self, tenant: &str, key_hex: &str) -> Result<String, ApiError> {
        let path = self.key_path(tenant)?;
        if key_hex.is_empty() {
            match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(ApiError::Internal(format!("cannot remove the encryption key: {e}")))
                }
                _ => return Ok(String::new()),
            }
        }
        let key = parse_key(key_hex).map_err(|why| ValidationError::EncryptionKey(why.to_string()))?;
        let dir = path.parent().expect("keys dir");
        fs::create_dir_all(dir).map_err(|e| ApiError::Internal(format!("cannot create the keys directory: {e}")))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| ApiError::Internal(format!("cannot protect the keys directory: {e}")))?;
        let tmp = path.with_extension("tmp");
        let write = || -> io::Result<()> {
            let _ = fs::remove_file(&tmp);
            let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
            io::Write::write_all(&mut f, format!("{key_hex}\n").as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            fs::File::open(dir)?.sync_all()
        };
        write().map_err(|e| ApiError::Internal(format!("cannot store the encryption key: {e}")))?;
        tracing::info!(tenant, "backup encryption key set");
        Ok(evs_backup::key_fingerprint(&key))
    }

    // ---- lookups ----

    /// The tenant's backup `id` (a volume or a server backup).
    fn find_backup(&self, owner: &str, id: &str) -> Result<pb::Backup, ApiError> {
        validate_backup_id(id)?;
        let engine = self.backups()?.engine.clone();
        if id.starts_with("sbk-") {
            let sb = self.block_on(engine.find_server_backup(owner, id))?;
            let mut volumes = Vec::new();
            for v in &sb.volumes {
                volumes.push(manifest_to_pb(&self.block_on(engine.find(owner, &v.backup_id))?));
            }
            Ok(pb::Backup {
                id: sb.server_backup_id.clone(),
                kind: "server".into(),
                server: sb.server.clone(),
                size_bytes: volumes.iter().map(|v| v.size_bytes).sum(),
                created_unix_ms: sb.created_ms,
                mode: volumes.first().map(|v| v.mode.clone()).unwrap_or_default(),
                az: sb.az.clone(),
                encrypted: volumes.iter().any(|v| v.encrypted),
                volumes,
                name: sb.name.clone().unwrap_or_default(),
                ..Default::default()
            })
        } else {
            Ok(manifest_to_pb(&self.block_on(engine.find(owner, id))?))
        }
    }

    pub fn list_backups(&self, owner: &str, volume: &str, server: &str) -> Result<Vec<pb::Backup>, ApiError> {
        if !server.is_empty() && !volume.is_empty() {
            return Err(ValidationError::ListFilter.into());
        }
        let engine = self.backups()?.engine.clone();
        if !server.is_empty() {
            super::validate::validate_server_name(server)?;
            let mut out = Vec::new();
            for sb in self.block_on(engine.list_server_backups(owner, Some(server)))? {
                out.push(self.find_backup(owner, &sb.server_backup_id)?);
            }
            return Ok(out);
        }
        if !volume.is_empty() {
            validate_volume_name(volume)?;
        }
        let list = self.block_on(engine.list(owner, (!volume.is_empty()).then_some(volume)))?;
        Ok(list.iter().map(manifest_to_pb).collect())
    }

    pub fn get_backup(&self, owner: &str, id: &str) -> Result<pb::Backup, ApiError> {
        self.find_backup(owner, id)
    }

    // ---- creating ----

    /// Refuses a backup past the limits: `volumes` more backups of `bytes`.
    fn check_backup_limits(&self, owner: &str, per_volume: &[(String, u64)]) -> Result<(), ApiError> {
        let ctx = self.backups()?;
        let s = &ctx.settings;
        let existing = self.block_on(ctx.engine.list(owner, None))?;
        let pending: Vec<JobRecord> = self
            .jobs
            .list(owner)
            .into_iter()
            .filter(|j| !j.state.is_finished())
            .filter(|j| matches!(j.kind, JobKind::Backup { .. } | JobKind::ServerBackup { .. }))
            .collect();
        let pending_count: u64 = pending
            .iter()
            .map(|j| match &j.kind {
                JobKind::ServerBackup { volume_ids, .. } => volume_ids.len() as u64,
                _ => 1,
            })
            .sum();
        let adding = per_volume.len() as u64;
        if s.max_per_tenant != 0 && existing.len() as u64 + pending_count + adding > s.max_per_tenant {
            return Err(ApiError::BackupLimit(format!(
                "tenant {owner:?} has {} backups (and {pending_count} in progress) of the {} allowed",
                existing.len(),
                s.max_per_tenant
            )));
        }
        let bytes: u64 = existing.iter().map(|m| m.volume_size).sum();
        let adding_bytes: u64 = per_volume.iter().map(|(_, b)| b).sum();
        if s.max_bytes_per_tenant != 0 && bytes.saturating_add(adding_bytes) > s.max_bytes_per_tenant {
            return Err(ApiError::BackupLimit(format!(
                "tenant {owner:?} keeps {} of backups; {} more exceeds the {} allowed",
                super::validate::HumanBytes(bytes),
                super::validate::HumanBytes(adding_bytes),
                super::validate::HumanBytes(s.max_bytes_per_tenant)
            )));
        }
        for (volume, _) in per_volume {
            let n = existing.iter().filter(|m| &m.volume == volume).count() as u64;
            if s.max_per_volume != 0 && n + 1 > s.max_per_volume {
                return Err(ApiError::BackupLimit(format!(
                    "volume {volume:?} has {n} backups, the most allowed ({}); delete one first",
                    s.max_per_volume
                )));
            }
        }
        Ok(())
    }

    /// Queues a backup of a volume; returns the job and the backup's id.
    pub fn create_backup(
        &self,
        owner: &str,
        volume: &str,
        label: &str,
        full: bool,
        policy: Option<&str>,
    ) -> Result<(JobRecord, String), ApiError> {
        validate_volume_name(volume)?;
        if !label.is_empty() {
            super::validate::validate_label(label)?;
        }
        self.backups()?;
        let _g = self.mutations.lock();
        let info = self.find_live(owner, volume)?;
        self.ensure_not_restoring(volume, info.id)?;
        if let Some(j) = self.jobs.find_active(|k| k.backs_up_volume(info.id)) {
            return Err(ApiError::BackupInProgress { volume: volume.to_string(), job: j.id });
        }
        self.check_backup_limits(owner, &[(volume.to_string(), info.size)])?;
        let backup_id = evs_backup::new_backup_id(SystemTime::now());
        let job = self.jobs.submit(
            owner,
            JobKind::Backup {
                volume_id: info.id,
                volume: volume.to_string(),
                backup_id: backup_id.clone(),
                full,
                label: label.to_string(),
                policy: policy.map(str::to_string),
            },
        )?;
        tracing::info!(owner, volume, backup = backup_id, job = job.id, full, "backup queued");
        Ok((job, backup_id))
    }

    /// Queues a backup of every volume of a server, at one instant.
    pub fn create_server_backup(
        &self,
        owner: &str,
        server: &str,
        label: &str,
        policy: Option<&str>,
    ) -> Result<(JobRecord, String), ApiError> {
        if !label.is_empty() {
            super::validate::validate_label(label)?;
        }
        self.backups()?;
        let _g = self.mutations.lock();
        let rec = self.find_server(owner, server)?;
        let mut sizes = Vec::new();
        for id in &rec.volumes {
            let info = self.store.volume_info(*id)?;
            self.ensure_not_deleting(&info.name, *id)?;
            self.ensure_not_restoring(&info.name, *id)?;
            if let Some(j) = self.jobs.find_active(|k| k.backs_up_volume(*id)) {
                return Err(ApiError::BackupInProgress { volume: info.name, job: j.id });
            }
            sizes.push((info.name, info.size));
        }
        self.check_backup_limits(owner, &sizes)?;
        let backup_id = evs_backup::new_server_backup_id(SystemTime::now());
        let job = self.jobs.submit(
            owner,
            JobKind::ServerBackup {
                server: server.to_string(),
                volume_ids: rec.volumes.clone(),
                backup_id: backup_id.clone(),
                label: label.to_string(),
                policy: policy.map(str::to_string),
            },
        )?;
        tracing::info!(owner, server, backup = backup_id, job = job.id, "server backup queued");
        Ok((job, backup_id))
    }

    pub fn delete_backup(&self, owner: &str, id: &str) -> Result<JobRecord, ApiError> {
        self.find_backup(owner, id)?;
        Ok(self.jobs.submit(owner, JobKind::DeleteBackup { backup_id: id.to_string() })?)
    }

    pub fn verify_backup(&self, owner: &str, id: &str) -> Result<JobRecord, ApiError> {
        self.find_backup(owner, id)?;
        Ok(self.jobs.submit(owner, JobKind::VerifyBackup { backup_id: id.to_string() })?)
    }

    pub fn collect_garbage(&self, caller: &str) -> Result<JobRecord, ApiError> {
        self.require_admin(caller, "collecting backup garbage")?;
        self.backups()?;
        Ok(self.jobs.submit(caller, JobKind::CollectGarbage)?)
    }

    /// Queues a restore: to new volume(s) named `to`, or in place.
    pub fn restore_backup(
        &self,
        owner: &str,
        id: &str,
        to: &str,
        in_place: bool,
        tier: &str,
    ) -> Result<JobRecord, ApiError> {
        let b = self.find_backup(owner, id)?;
        if in_place != to.is_empty() {
            return Err(ValidationError::RestoreTarget.into());
        }
        // Checked here, as `volume create` does, not only when the job makes the volume.
        let tier = self.tier_for(owner, tier)?;
        let _g = self.mutations.lock();
        let volumes: Vec<String> = if b.kind == "server" {
            b.volumes.iter().map(|v| v.volume.clone()).collect()
        } else {
            vec![b.volume.clone()]
        };
        if in_place {
            for v in &volumes {
                let info = self.find_live(owner, v)?;
                if self.exports.is_attached(info.id) || !self.tokens_of(info.id)?.is_empty() {
                    return Err(ApiError::Attached(v.clone()));
                }
            }
        } else {
            validate_volume_name(to)?;
            let names: Vec<String> = if b.kind == "server" {
                volumes.iter().map(|v| format!("{to}-{v}")).collect()
            } else {
                vec![to.to_string()]
            };
            for n in &names {
                validate_volume_name(n)?;
                if self.find(owner, n).is_ok() {
                    return Err(ApiError::VolumeExists(n.clone()));
                }
            }
            if b.kind == "server" && self.find_server(owner, to).is_ok() {
                return Err(ApiError::ServerExists(to.to_string()));
            }
            self.check_quota(owner, names.len() as u64, b.size_bytes)?;
        }
        Ok(self.jobs.submit(
            owner,
            JobKind::Restore {
                backup_id: id.to_string(),
                to: to.to_string(),
                in_place,
                tier: tier.to_string(),
                size: 0,
            },
        )?)
    }

    /// Creates volume `name` from the volume backup `id`: the volume exists when this returns,
    /// in state "restoring", and the returned restore job fills it (removing it again if the
    /// restore fails or is cancelled). `size` 0 means the backed-up volume's size.
    pub fn create_volume_from_backup(
        &self,
        owner: &str,
        name: &str,
        size: u64,
        tier: &str,
        id: &str,
    ) -> Result<(pb::Volume, JobRecord), ApiError> {
        validate_volume_name(name)?;
        if size != 0 {
            validate_volume_size(size)?;
        }
        let tier = self.tier_for(owner, tier)?;
        self.backups()?;
        let b = self.find_backup(owner, id)?;
        if b.kind == "server" {
            return Err(ValidationError::ServerBackupToVolume(id.to_string()).into());
        }
        if size != 0 && size < b.size_bytes {
            let why = format!("smaller than the {} bytes of the volume in backup {id}", b.size_bytes);
            return Err(ValidationError::Size { size, why }.into());
        }
        let size = if size == 0 { b.size_bytes } else { size };
        // Held from the checks to the volume's creation; the job looks for its volume under
        // the same lock, so it finds it made and marked as its own (or, after a crash between
        // the two, makes it itself).
        let _g = self.mutations.lock();
        if self.find(owner, name).is_ok() {
            return Err(ApiError::VolumeExists(name.to_string()));
        }
        self.check_quota(owner, 1, size)?;
        let kind = JobKind::Restore {
            backup_id: id.to_string(),
            to: name.to_string(),
            in_place: false,
            tier: tier.to_string(),
            size,
        };
        let job = self.jobs.submit(owner, kind)?;
        evs_snapshot::crash_point!("create-from-backup-after-submit");
        match self.create_volume_locked(owner, name, size, tier, "", Some(job.id)) {
            Ok(mut volume) => {
                evs_snapshot::crash_point!("create-from-backup-after-create");
                volume.state = super::jobs::VOLUME_RESTORING.to_string();
                Ok((volume, job))
            }
            Err(e) => {
                // The job has not got past its look for the volume (it waits for this lock)
                // and stops there.
                let _ = self.jobs.cancel(owner, job.id);
                Err(e)
            }
        }
    }

    /// Forgets a deleted volume's base (its snapshots went with it) and policy bindings.
    pub(super) fn forget_volume_backups(&self, volume_id: u64) -> Result<(), StoreError> {
        self.set_base(volume_id, None)?;
        self.unbind_volume(volume_id)
    }

    /// Refuses to touch a volume a restore is writing.
    pub(super) fn ensure_not_restoring(&self, name: &str, id: u64) -> Result<(), ApiError> {
        let r = self.store.catalog().begin_read().map_err(StoreError::from)?;
        let t = r.open_table(RESTORING).map_err(StoreError::from)?;
        match t.get(id).map_err(StoreError::from)? {
            Some(job) => Err(ApiError::BeingRestored { name: name.to_string(), job: job.value() }),
            None => Ok(()),
        }
    }

    // ---- job bodies ----

    fn base_of(&self, volume_id: u64) -> Result<Option<BaseRecord>, StoreError> {
        let r = self.store.catalog().begin_read()?;
        let t = r.open_table(BACKUP_BASES)?;
        let Some(v) = t.get(volume_id)? else { return Ok(None) };
        serde_json::from_slice(v.value())
            .map(Some)
            .map_err(|e| StoreError::Corrupt { what: "backup base record".into(), why: e.to_string() })
    }

    fn set_base(&self, volume_id: u64, base: Option<&BaseRecord>) -> Result<(), StoreError> {
        let w = self.store.catalog().begin_write()?;
        {
            let mut t = w.open_table(BACKUP_BASES)?;
            match base {
                Some(b) => {
                    let bytes = serde_json::to_vec(b).map_err(|e| StoreError::Catalog(e.to_string()))?;
                    t.insert(volume_id, bytes.as_slice())?;
                }
                None => {
                    t.remove(volume_id)?;
                }
            }
        }
        w.commit()?;
        Ok(())
    }

    /// Drops a snapshot a backup took, unless it is still some volume's base.
    fn drop_backup_snapshot(&self, snapshot: u64) {
        let keep = (|| -> Result<bool, StoreError> {
            let r = self.store.catalog().begin_read()?;
            let t = r.open_table(BACKUP_BASES)?;
            for row in t.iter()? {
                let (_, v) = row?;
                if serde_json::from_slice::<BaseRecord>(v.value()).is_ok_and(|b| b.snapshot == snapshot) {
                    return Ok(true);
                }
            }
            Ok(false)
        })();
        if keep.unwrap_or(true) {
            return;
        }
        match self.store.delete_snapshot(snapshot) {
            Ok(()) | Err(StoreError::SnapshotNotFound(_)) => {}
            Err(e) => tracing::warn!(snapshot, error = %e, "cannot delete a backup's snapshot"),
        }
    }

    /// Backs up volume `volume_id` from its snapshot `snap` (taken already).
    #[allow(clippy::too_many_arguments)]
    fn backup_one(
        &self,
        tenant: &str,
        volume_id: u64,
        snap: u64,
        backup_id: &str,
        full: bool,
        label: &str,
        server_backup: Option<&str>,
        ctx: &JobContext,
    ) -> Result<Manifest, JobError> {
        let bctx = self.backups().map_err(job_failed)?;
        let chunk = u64::from(bctx.settings.chunk_size);
        let info = self.store.volume_info(volume_id).map_err(job_failed)?;
        let key = self.tenant_key(tenant).map_err(job_failed)?;
        let fingerprint = key.as_ref().map(evs_backup::key_fingerprint);
        // The base: usable when its backup still exists with our chunk size and key.
        let base = if full { None } else { self.base_of(volume_id).map_err(job_failed)? };
        let mut base = base.filter(|b| {
            self.block_on(bctx.engine.find(tenant, &b.backup_id)).is_ok_and(|m| {
                u64::from(m.chunk_size) == chunk
                    && m.key_fingerprint == fingerprint
                    && self.store.snapshot_info(b.snapshot).is_ok()
            })
        });
        // A run that a restart cut off after its manifest's commit: the backup exists, only
        // the bookkeeping below is left.
        let committed = self.block_on(bctx.engine.find(tenant, backup_id)).ok();
        if committed.is_some() {
            ctx.note(format!("backup {backup_id} was committed before a restart; recording it"));
        }
        let m = if let Some(m) = committed {
            m
        } else {
            self.backup_loop(tenant, &info.name, volume_id, snap, backup_id, server_backup, label, &mut base, ctx)?
        };
        self.finish_backup(volume_id, snap, backup_id, m, ctx)
    }

    /// The engine's backup of one volume, falling back to a full backup when the parent
    /// turns out unusable.
    #[allow(clippy::too_many_arguments)]
    fn backup_loop(
        &self,
        tenant: &str,
        volume: &str,
        volume_id: u64,
        snap: u64,
        backup_id: &str,
        server_backup: Option<&str>,
        label: &str,
        base: &mut Option<BaseRecord>,
        ctx: &JobContext,
    ) -> Result<Manifest, JobError> {
        let bctx = self.backups().map_err(job_failed)?;
        let chunk = u64::from(bctx.settings.chunk_size);
        let key = self.tenant_key(tenant).map_err(job_failed)?;
        let snap_info = self.store.snapshot_info(snap).map_err(job_failed)?;
        let view = self.store.open_snapshot(snap).map_err(job_failed)?;
        let progress = JobProgress(ctx);
        let m = loop {
            let (extents, _) = self
                .store
                .changed_extents(volume_id, base.as_ref().map(|b| b.snapshot), Some(snap))
                .map_err(job_failed)?;
            let req = BackupRequest {
                tenant,
                volume,
                backup_id,
                server_backup,
                source: Arc::new(SnapshotSource { view: view.clone(), chunk }),
                read_chunks: chunks_touched(&extents, chunk),
                parent: base.as_ref().map(|b| b.backup_id.as_str()),
                kind_full: base.is_none(),
                snapshot: &snap_info.name,
                az: &bctx.az,
                key: key.as_ref(),
                name: (!label.is_empty()).then_some(label),
            };
            match bctx.rt.block_on(bctx.engine.backup(req, &progress)) {
                Ok(m) => break m,
                // The parent went (deleted, damaged) between the check and the backup.
                Err(BackupError::Parent { parent, why }) if base.is_some() => {
                    ctx.note(format!("parent backup {parent} unusable ({why}): taking a full backup"));
                    *base = None;
                }
                Err(BackupError::Cancelled) => return Err(stopped(ctx)),
                Err(e) => return Err(job_failed(e)),
            }
        };
        Ok(m)
    }

    /// Records a committed backup as the volume's new base (the old base's snapshot goes).
    fn finish_backup(
        &self,
        volume_id: u64,
        snap: u64,
        backup_id: &str,
        m: Manifest,
        ctx: &JobContext,
    ) -> Result<Manifest, JobError> {
        // The new base; the old one's snapshot goes.
        let old = self.base_of(volume_id).map_err(job_failed)?;
        self.set_base(volume_id, Some(&BaseRecord { v: 1, snapshot: snap, backup_id: backup_id.to_string() }))
            .map_err(job_failed)?;
        if let Some(old) = old.filter(|o| o.snapshot != snap) {
            self.drop_backup_snapshot(old.snapshot);
        }
        ctx.note(format!(
            "{} backup: {} of {} chunks read, {} uploaded ({} bytes), {} deduplicated, {} zero",
            kind_name(m.kind),
            m.stats.chunks_read,
            m.stats.chunks,
            m.stats.chunks_uploaded,
            m.stats.bytes_uploaded,
            m.stats.chunks_deduplicated,
            m.stats.chunks_zero
        ));
        Ok(m)
    }

    /// The hidden snapshot of backup `backup_id` of a volume: found again after a restart.
    fn backup_snapshot(&self, volume_id: u64, backup_id: &str) -> Result<u64, JobError> {
        let name = format!("{SNAPSHOT_PREFIX}{backup_id}");
        match self.store.find_snapshot(volume_id, &name) {
            Ok(s) => Ok(s.id),
            Err(StoreError::SnapshotNotFound(_)) => {
                self.store.create_snapshot(volume_id, &name).map(|s| s.id).map_err(job_failed)
            }
            Err(e) => Err(job_failed(e)),
        }
    }

    pub(super) fn run_backup(&self, job: &JobRecord, ctx: &JobContext) -> Result<(), JobError> {
        let JobKind::Backup { volume_id, backup_id, full, label, policy, .. } = &job.kind else {
            unreachable!("run_backup of another kind")
        };
        ctx.check_cancelled()?;
        if self.store.volume_info(*volume_id).is_err() {
            return Err(JobError::Failed("the volume was deleted before its backup ran".into()));
        }
        let snap = self.backup_snapshot(*volume_id, backup_id)?;
        match self.backup_one(&job.tenant, *volume_id, snap, backup_id, *full, label, None, ctx) {
            Ok(m) => {
                if let Some(p) = policy {
                    self.apply_retention(&job.tenant, p, Some(&m.volume), None);
                }
                Ok(())
            }
            Err(e) => {
                if !matches!(e, JobError::Interrupted) {
                    self.drop_backup_snapshot(snap);
                }
                Err(e)
            }
        }
    }

    pub(super) fn run_server_backup(&self, job: &JobRecord, ctx: &JobContext) -> Result<(), JobError> {
        let JobKind::ServerBackup { server, volume_ids, backup_id, label, policy } = &job.kind else {
            unreachable!("run_server_backup of another kind")
        };
        ctx.check_cancelled()?;
        let bctx = self.backups().map_err(job_failed)?;
        let name = format!("{SNAPSHOT_PREFIX}{backup_id}");
        // One instant for all: a group snapshot (found again by name after a restart).
        let mut snaps = Vec::with_capacity(volume_ids.len());
        let existing: Vec<Option<u64>> =
            volume_ids.iter().map(|v| self.store.find_snapshot(*v, &name).ok().map(|s| s.id)).collect();
        if existing.iter().all(Option::is_some) {
            snaps.extend(existing.into_iter().flatten());
        } else {
            for (v, s) in volume_ids.iter().zip(&existing) {
                if let Some(s) = s {
                    // A group snapshot cut off halfway cannot exist (it commits in one
                    // transaction); this is a leftover of a failed attempt.
                    let _ = self.store.delete_snapshot(*s);
                    let _ = v;
                }
            }
            let items: Vec<(u64, String)> = volume_ids.iter().map(|v| (*v, name.clone())).collect();
            let taken = self.store.create_snapshots(&items, Some(&name)).map_err(job_failed)?;
            snaps.extend(taken.iter().map(|s| s.id));
        }
        let mut volume_backups = Vec::with_capacity(volume_ids.len());
        for (i, (vid, snap)) in volume_ids.iter().zip(&snaps).enumerate() {
            // Volume backup ids derive from the server backup's, so a resumed job finds them.
            let vb = server_volume_backup_id(backup_id, i);
            let done = self.block_on(bctx.engine.find(&job.tenant, &vb)).ok();
            let m = match done {
                Some(m) => m,
                None => match self.backup_one(&job.tenant, *vid, *snap, &vb, false, label, Some(backup_id), ctx) {
                    Ok(m) => m,
                    Err(e) => {
                        if !matches!(e, JobError::Interrupted) {
                            for s in &snaps {
                                self.drop_backup_snapshot(*s);
                            }
                        }
                        return Err(e);
                    }
                },
            };
            volume_backups.push(ServerVolume { volume: m.volume.clone(), backup_id: m.backup_id.clone() });
        }
        let snapshot = self.store.snapshot_info(snaps[0]).map(|s| s.name).unwrap_or_default();
        let sm = ServerManifest::new(
            &job.tenant,
            server,
            backup_id,
            (!label.is_empty()).then_some(label.as_str()),
            &bctx.az,
            &snapshot,
            volume_backups,
        );
        bctx.rt.block_on(bctx.engine.put_server_manifest(&sm)).map_err(job_failed)?;
        if let Some(p) = policy {
            self.apply_retention(&job.tenant, p, None, Some(server));
        }
        Ok(())
    }

    /// A restore job. One that fails or is cancelled removes the volumes it created, so a
    /// half-restored volume is never left looking like a whole one; one that a restart
    /// interrupts keeps them and writes them again when it resumes.
    pub(super) fn run_restore(&self, job: &JobRecord, ctx: &JobContext) -> Result<(), JobError> {
        let mut created = Vec::new();
        let r = self.restore_into(job, ctx, &mut created);
        if matches!(r, Err(JobError::Failed(_) | JobError::Cancelled)) {
            for (name, _) in &created {
                match self.delete_volume(&job.tenant, name) {
                    Ok(d) => ctx.note(format!("removed the partly restored volume {name} (delete job {})", d.id)),
                    Err(e) => ctx.note(format!("could not remove the partly restored volume {name}: {e}")),
                }
            }
        }
        r
    }

    fn restore_into(
        &self,
        job: &JobRecord,
        ctx: &JobContext,
        created: &mut Vec<(String, u64)>,
    ) -> Result<(), JobError> {
        let JobKind::Restore { backup_id, to, in_place, tier, size } = &job.kind else {
            unreachable!("run_restore of another kind")
        };
        ctx.check_cancelled()?;
        let bctx = self.backups().map_err(job_failed)?;
        let tenant = job.tenant.as_str();
        let b = self.find_backup(tenant, backup_id).map_err(job_failed)?;
        let parts: Vec<pb::Backup> = if b.kind == "server" { b.volumes.clone() } else { vec![b.clone()] };
        let key = self.tenant_key(tenant).map_err(job_failed)?;
        ctx.set_total(parts.iter().map(|p| p.size_bytes).sum());
        for p in &parts {
            let manifest = self.block_on(bctx.engine.find(tenant, &p.id)).map_err(job_failed)?;
            let (volume_id, fresh) = if *in_place {
                let info = self.find(tenant, &p.volume).map_err(job_failed)?;
                if self.exports.is_attached(info.id) {
                    return Err(job_failed(ApiError::Attached(p.volume.clone())));
                }
                if info.size < manifest.volume_size {
                    self.store.extend_volume(info.id, manifest.volume_size).map_err(job_failed)?;
                }
                (info.id, false)
            } else {
                let name = if b.kind == "server" { format!("{to}-{}", p.volume) } else { to.clone() };
                let id = {
                    // The lock `create_volume_from_backup` holds from its checks until it has
                    // made this job's volume.
                    let _g = self.mutations.lock();
                    // Cancelled there when the volume could not be made.
                    ctx.check_cancelled()?;
                    match self.find(tenant, &name) {
                        // Made for this job (`volume create --from-backup`), or by this job
                        // before a restart cut it off: `restoring` says which volume is ours.
                        Ok(info) if self.restoring_job(info.id) == Some(job.id) => info.id,
                        Ok(_) => return Err(job_failed(ApiError::VolumeExists(name))),
                        Err(_) => {
                            let tier = self.tier_for(tenant, tier).map_err(job_failed)?;
                            let size = (*size).max(manifest.volume_size);
                            let v = self
                                .create_volume_locked(tenant, &name, size, tier, "", Some(job.id))
                                .map_err(job_failed)?;
                            evs_snapshot::crash_point!("restore-after-create");
                            v.id
                        }
                    }
                };
                created.push((name, id));
                (id, true)
            };
            self.set_restoring(volume_id, Some(job.id)).map_err(job_failed)?;
            let volume = self.store.open_volume(volume_id).map_err(job_failed)?;
            let sink = Arc::new(VolumeSink { volume: volume.clone(), fresh });
            let progress = JobProgress(ctx);
            let r = bctx.rt.block_on(bctx.engine.restore(&manifest, sink, key.as_ref(), &progress));
            if r.is_ok() && *in_place && volume.size() > manifest.volume_size {
                // Past the backup's end the volume held nothing at backup time.
                let tail = volume.size() - manifest.volume_size;
                let _ = volume.write_zeroes(manifest.volume_size, tail, false);
                let _ = volume.flush();
            }
            self.set_restoring(volume_id, None).map_err(job_failed)?;
            match r {
                Ok(stats) => ctx.note(format!(
                    "restored {} to volume #{volume_id}: {} chunks written, {} zero",
                    p.id,
                    stats.chunks - stats.chunks_zero,
                    stats.chunks_zero
                )),
                Err(BackupError::Cancelled) => return Err(stopped(ctx)),
                Err(e) => return Err(job_failed(e)),
            }
        }
        if b.kind == "server" && !*in_place {
            let names: Vec<String> = created.iter().map(|(n, _)| n.clone()).collect();
            if self.find_server(tenant, to).is_err() {
                self.create_server(tenant, to, &names).map_err(job_failed)?;
            }
        }
        Ok(())
    }

    pub(super) fn restoring_job(&self, volume_id: u64) -> Option<u64> {
        let r = self.store.catalog().begin_read().ok()?;
        let t = r.open_table(RESTORING).ok()?;
        t.get(volume_id).ok()?.map(|g| g.value())
    }

    fn set_restoring(&self, volume_id: u64, job: Option<u64>) -> Result<(), StoreError> {
        let w = self.store.catalog().begin_write()?;
        {
            let mut t = w.open_table(RESTORING)?;
            match job {
                Some(j) => {
                    t.insert(volume_id, j)?;
                }
                None => {
                    t.remove(volume_id)?;
                }
            }
        }
        w.commit()?;
        Ok(())
    }

    pub(super) fn run_delete_backup(&self, job: &JobRecord, ctx: &JobContext) -> Result<(), JobError> {
        let JobKind::DeleteBackup { backup_id } = &job.kind else { unreachable!("run_delete_backup of another kind") };
        ctx.check_cancelled()?;
        let bctx = self.backups().map_err(job_failed)?;
        let tenant = job.tenant.as_str();
        let ids: Vec<String> = if backup_id.starts_with("sbk-") {
            match bctx.rt.block_on(bctx.engine.find_server_backup(tenant, backup_id)) {
                Ok(sb) => {
                    // The server manifest first: a server backup is never left half-listed.
                    bctx.rt.block_on(bctx.engine.delete_server_backup(&sb)).map_err(job_failed)?;
                    sb.volumes.iter().map(|v| v.backup_id.clone()).collect()
                }
                Err(BackupError::NotFound(_)) => return Ok(()),
                Err(e) => return Err(job_failed(e)),
            }
        } else {
            vec![backup_id.clone()]
        };
        for id in &ids {
            match bctx.rt.block_on(bctx.engine.find(tenant, id)) {
                Ok(m) => bctx.rt.block_on(bctx.engine.delete(&m)).map_err(job_failed)?,
                Err(BackupError::NotFound(_)) => continue,
                Err(e) => return Err(job_failed(e)),
            }
            self.forget_base_of_backup(id);
        }
        Ok(())
    }

    /// A deleted backup cannot be an incremental's parent: its volume's base goes, and the
    /// next backup is full (deduplicated, so it uploads only what the store lacks).
    fn forget_base_of_backup(&self, backup_id: &str) {
        let found = (|| -> Result<Option<(u64, BaseRecord)>, StoreError> {
            let r = self.store.catalog().begin_read()?;
            let t = r.open_table(BACKUP_BASES)?;
            for row in t.iter()? {
                let (k, v) = row?;
                if let Ok(b) = serde_json::from_slice::<BaseRecord>(v.value()) {
                    if b.backup_id == backup_id {
                        return Ok(Some((k.value(), b)));
                    }
                }
            }
            Ok(None)
        })();
        if let Ok(Some((volume, base))) = found {
            if self.set_base(volume, None).is_ok() {
                self.drop_backup_snapshot(base.snapshot);
            }
        }
    }

    pub(super) fn run_verify_backup(&self, job: &JobRecord, ctx: &JobContext) -> Result<(), JobError> {
        let JobKind::VerifyBackup { backup_id } = &job.kind else { unreachable!("run_verify of another kind") };
        let bctx = self.backups().map_err(job_failed)?;
        let tenant = job.tenant.as_str();
        let b = self.find_backup(tenant, backup_id).map_err(job_failed)?;
        let parts: Vec<String> =
            if b.kind == "server" { b.volumes.iter().map(|v| v.id.clone()).collect() } else { vec![b.id.clone()] };
        let key = self.tenant_key(tenant).map_err(job_failed)?;
        let mut problems = Vec::new();
        let mut checked = 0u64;
        for id in &parts {
            let m = self.block_on(bctx.engine.find(tenant, id)).map_err(job_failed)?;
            let progress = JobProgress(ctx);
            let report = match bctx.rt.block_on(bctx.engine.verify(&m, key.as_ref(), &progress)) {
                Ok(r) => r,
                Err(BackupError::Cancelled) => return Err(stopped(ctx)),
                Err(e) => return Err(job_failed(e)),
            };
            checked += report.chunks_checked;
            problems.extend(report.missing.iter().map(|k| format!("missing chunk {k}")));
            problems.extend(report.corrupt.iter().map(|c| format!("corrupt chunk {}: {}", c.key, c.why)));
        }
        if problems.is_empty() {
            ctx.note(format!("{checked} chunks verified, all intact"));
            Ok(())
        } else {
            Err(JobError::Failed(format!(
                "backup {backup_id}: {} of {checked} chunks bad: {}",
                problems.len(),
                problems.join("; ")
            )))
        }
    }

    pub(super) fn run_gc(&self, _job: &JobRecord, ctx: &JobContext) -> Result<(), JobError> {
        let bctx = self.backups().map_err(job_failed)?;
        let progress = JobProgress(ctx);
        let r = match bctx.rt.block_on(bctx.engine.gc(&progress)) {
            Ok(r) => r,
            Err(BackupError::Cancelled) => return Err(stopped(ctx)),
            Err(e) => return Err(job_failed(e)),
        };
        ctx.note(format!(
            "gc: {} chunks referenced, {} removed ({} bytes), {} kept within the grace period, {} orphan indexes removed",
            r.chunks_referenced, r.chunks_removed, r.bytes_removed, r.chunks_within_grace, r.indexes_removed
        ));
        Ok(())
    }
}

/// How a job that stopped at a cancel check ends.
fn stopped(ctx: &JobContext) -> JobError {
    if ctx.is_cancelled() {
        JobError::Cancelled
    } else {
        JobError::Interrupted
    }
}

/// 64 hex digits → 32 bytes.
fn parse_key(hex: &str) -> Result<[u8; 32], &'static str> {
    if hex.len() != 64 {
        return Err("an encryption key is 64 hex digits (32 bytes)");
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| "an encryption key is 64 hex digits")?;
    }
    Ok(out)
}

#[tonic::async_trait]
impl BackupService for VolumeApi {
    async fn create_backup(
        &self,
        req: Request<pb::CreateBackupRequest>,
    ) -> Result<Response<pb::CreateBackupResponse>, Status> {
        let pb::CreateBackupRequest { volume, name, full } = req.get_ref().clone();
        let target = format!("volume {volume}");
        let (job, backup_id) = self
            .run_mut(&req, "BackupService/CreateBackup", target, move |cp, owner| {
                cp.create_backup(owner, &volume, &name, full, None)
            })
            .await?;
        Ok(Response::new(pb::CreateBackupResponse { job: Some(job_to_pb(&job)), backup_id }))
    }

    async fn create_server_backup(
        &self,
        req: Request<pb::CreateServerBackupRequest>,
    ) -> Result<Response<pb::CreateServerBackupResponse>, Status> {
        let pb::CreateServerBackupRequest { server, name } = req.get_ref().clone();
        let target = format!("server {server}");
        let (job, backup_id) = self
            .run_mut(&req, "BackupService/CreateServerBackup", target, move |cp, owner| {
                cp.create_server_backup(owner, &server, &name, None)
            })
            .await?;
        Ok(Response::new(pb::CreateServerBackupResponse { job: Some(job_to_pb(&job)), backup_id }))
    }

    async fn list_backups(
        &self,
        req: Request<pb::ListBackupsRequest>,
    ) -> Result<Response<pb::ListBackupsResponse>, Status> {
        let pb::ListBackupsRequest { volume, server } = req.get_ref().clone();
        let backups = self
            .run(&req, "BackupService/ListBackups", move |cp, owner| cp.list_backups(owner, &volume, &server))
            .await?;
        Ok(Response::new(pb::ListBackupsResponse { backups }))
    }

    async fn get_backup(&self, req: Request<pb::GetBackupRequest>) -> Result<Response<pb::GetBackupResponse>, Status> {
        let id = req.get_ref().id.clone();
        let backup = self.run(&req, "BackupService/GetBackup", move |cp, owner| cp.get_backup(owner, &id)).await?;
        Ok(Response::new(pb::GetBackupResponse { backup: Some(backup) }))
    }

    async fn delete_backup(
        &self,
        req: Request<pb::DeleteBackupRequest>,
    ) -> Result<Response<pb::DeleteBackupResponse>, Status> {
        let id = req.get_ref().id.clone();
        let target = format!("backup {id}");
        let job = self
            .run_mut(&req, "BackupService/DeleteBackup", target, move |cp, owner| cp.delete_backup(owner, &id))
            .await?;
        Ok(Response::new(pb::DeleteBackupResponse { job: Some(job_to_pb(&job)) }))
    }

    async fn restore_backup(
        &self,
        req: Request<pb::RestoreBackupRequest>,
    ) -> Result<Response<pb::RestoreBackupResponse>, Status> {
        let pb::RestoreBackupRequest { id, to, in_place, tier } = req.get_ref().clone();
        let target = format!("backup {id}");
        let job = self
            .run_mut(&req, "BackupService/RestoreBackup", target, move |cp, owner| {
                cp.restore_backup(owner, &id, &to, in_place, &tier)
            })
            .await?;
        Ok(Response::new(pb::RestoreBackupResponse { job: Some(job_to_pb(&job)) }))
    }

    async fn verify_backup(
        &self,
        req: Request<pb::VerifyBackupRequest>,
    ) -> Result<Response<pb::VerifyBackupResponse>, Status> {
        let id = req.get_ref().id.clone();
        let target = format!("backup {id}");
        let job = self
            .run_mut(&req, "BackupService/VerifyBackup", target, move |cp, owner| cp.verify_backup(owner, &id))
            .await?;
        Ok(Response::new(pb::VerifyBackupResponse { job: Some(job_to_pb(&job)) }))
    }

    async fn collect_garbage(
        &self,
        req: Request<pb::CollectGarbageRequest>,
    ) -> Result<Response<pb::CollectGarbageResponse>, Status> {
        let target = "the backup store".to_string();
        let job = self
            .run_mut(&req, "BackupService/CollectGarbage", target, move |cp, caller| cp.collect_garbage(caller))
            .await?;
        Ok(Response::new(pb::CollectGarbageResponse { job: Some(job_to_pb(&job)) }))
    }

    async fn set_encryption_key(
        &self,
        req: Request<pb::SetEncryptionKeyRequest>,
    ) -> Result<Response<pb::SetEncryptionKeyResponse>, Status> {
        let key = req.get_ref().key_hex.clone();
        // The key itself never reaches the audit log or any log line.
        let target = "backup encryption key".to_string();
        let fingerprint = self
            .run_mut(&req, "BackupService/SetEncryptionKey", target, move |cp, tenant| {
                cp.set_encryption_key(tenant, &key)
            })
            .await?;
        Ok(Response::new(pb::SetEncryptionKeyResponse { fingerprint }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_of_extents() {
        let e = |offset, len| ChangedExtent { offset, len, zero: false };
        let m = 1 << 20;
        assert_eq!(chunks_touched(&[], m), Vec::<u64>::new());
        assert_eq!(chunks_touched(&[e(0, 4096)], m), vec![0]);
        assert_eq!(chunks_touched(&[e(m - 4096, 8192)], m), vec![0, 1]);
        assert_eq!(chunks_touched(&[e(3 * m, 2 * m), e(4 * m + 5, 1), e(10 * m, 0)], m), vec![3, 4]);
        assert_eq!(chunks_touched(&[e(0, 3 * m)], m), vec![0, 1, 2]);
    }

    #[test]
    fn backup_ids() {
        let a = evs_backup::new_backup_id(SystemTime::now());
        let s = evs_backup::new_server_backup_id(SystemTime::now());
        assert!(validate_backup_id(&a).is_ok(), "{a}");
        assert!(validate_backup_id(&s).is_ok(), "{s}");
        let (v0, v1) = (server_volume_backup_id(&s, 0), server_volume_backup_id(&s, 1));
        assert!(validate_backup_id(&v0).is_ok() && validate_backup_id(&v1).is_ok(), "{v0} {v1}");
        assert_ne!(v0, v1);
        assert_eq!(v0, server_volume_backup_id(&s, 0));
        assert_eq!(v0[3..22], s[4..23], "same timestamp");
        for bad in ["", "bk-../x", "x-1", "bk-a/b", &"bk-".repeat(30)] {
            assert!(validate_backup_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys() {
        assert_eq!(parse_key(&"ab".repeat(32)).unwrap(), [0xab; 32]);
        assert!(parse_key("abc").is_err());
        assert!(parse_key(&"zz".repeat(32)).is_err());
    }
}
