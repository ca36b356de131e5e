//! The control API: the gRPC `VolumeService` over the block store and the export registry.
//!
//! * [`ControlPlane`] holds the state and does the work synchronously (the block store and
//!   the catalog block), so it is testable without a network;
//! * [`VolumeApi`] is the tonic service: it authenticates, validates, and runs the work on
//!   tokio's blocking pool.
//!
//! Besides the store's own tables, the control plane keeps its tables in the catalog:
//! `attachments` (attach token → volume id, reloaded into the [`ExportRegistry`] at start),
//! `volume_tiers` (volume id → tier name), the `tenants` table of [`auth`], tenant quotas
//! ([`tenants`]), servers ([`servers`]), the audit log ([`audit`]) and the job tables of
//! [`crate::jobs`] (volume delete runs as a job: [`jobs`]).
//!
//! QoS: a volume's tier and size give its limits ([`crate::qos`]); the limiter every
//! connection of the volume shares lives in the [`VolumeIoRegistry`], created at attach and
//! retuned by `set-tier` and `extend`.

pub mod audit;
pub mod auth;
pub mod backups;
pub mod dr;
pub mod error;
pub mod jobs;
pub mod policies;
pub mod replication;
pub mod servers;
pub mod snapshots;
pub mod tenants;
pub mod validate;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use evs_proto::v1 as pb;
use evs_proto::v1::volume_service_server::VolumeService;
use evs_snapshot::{BlockStore, StoreError, VolumeInfo};
use parking_lot::Mutex;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use tonic::{Request, Response, Status};

use crate::config::{Quota, DEFAULT_QUOTA};
use crate::exports::{Export, ExportRegistry, Protocol};
use crate::jobs::{JobKind, JobManager, JobOptions, JobRecord, RecoveryReport};
use crate::qos::{default_tiers, Limits, TierSpec};
use crate::volume_io::{VolumeIo, VolumeIoRegistry};
use audit::AuditLog;
pub use auth::{Tenants, ADMIN_TENANT, ADMIN_TOKEN_FILE};
pub use error::ApiError;
use validate::{validate_tier, validate_volume_name, validate_volume_size, ValidationError, UNLIMITED_TIER};

/// Attach token (the NBD export name) → volume id.
const ATTACHMENTS: TableDefinition<&str, u64> = TableDefinition::new("attachments");
/// Attach token → front end, for the attachments (volume or snapshot) not served over NBD.
/// A token without a row is an NBD export.
pub(super) const ATTACHMENT_PROTOCOLS: TableDefinition<&str, &str> = TableDefinition::new("attachment_protocols");
/// Volume id → tier name. A volume without a row has the default tier.
const VOLUME_TIERS: TableDefinition<u64, &str> = TableDefinition::new("volume_tiers");

/// Where NBD clients reach this daemon, for the URIs that attach returns.
#[derive(Debug, Clone)]
pub struct NbdEndpoints {
    /// The bound TCP address of the NBD listener.
    pub tcp: SocketAddr,
    /// The NBD unix socket (absolute), if the daemon listens on one.
    pub unix: Option<PathBuf>,
    /// Clients of the TCP listener must use TLS (URIs `nbds://`).
    pub tcp_tls: bool,
    /// Clients of the unix socket must use TLS (URIs `nbds+unix://`).
    pub unix_tls: bool,
}

/// Figures for the metrics endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gauges {
    pub volumes: u64,
    pub attached_volumes: u64,
    pub tenants: u64,
}

/// What an attach hands to the caller.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub token: String,
    pub volume: pb::Volume,
    pub protocol: Protocol,
    /// The vhost-user socket, for a vhost-user attachment.
    pub socket: Option<PathBuf>,
}

/// What the control plane is configured with.
#[derive(Debug, Clone)]
pub struct ControlOptions {
    pub tiers: Vec<TierSpec>,
    /// Quotas of tenants created without explicit ones.
    pub default_quota: Quota,
    /// Job limits: interrupted jobs are resumed or failed at open, queued ones start.
    pub jobs: JobOptions,
    /// Backups: the engine over the backup store.
    pub backup: Option<Arc<backups::BackupContext>>,
    /// Disaster recovery: the runtime and this daemon's identity for its peers.
    pub dr: Option<Arc<dr::DrContext>>,
}

impl Default for ControlOptions {
    fn default() -> Self {
        ControlOptions {
            tiers: default_tiers(),
            default_quota: DEFAULT_QUOTA,
            jobs: JobOptions::default(),
            backup: None,
            dr: None,
        }
    }
}

/// The control plane's state and synchronous operations. Every method may block.
pub struct ControlPlane {
    store: Arc<BlockStore>,
    exports: Arc<ExportRegistry>,
    tenants: Tenants,
    endpoints: NbdEndpoints,
    tiers: Vec<TierSpec>,
    default_quota: Quota,
    volume_io: Arc<VolumeIoRegistry>,
    audit: AuditLog,
    /// Long operations (volume delete); the control plane runs them (`jobs::JobExecutor`).
    jobs: Arc<JobManager>,
    /// The backup engine; None when the daemon runs without backups (unit tests).
    backup: Option<Arc<backups::BackupContext>>,
    /// Disaster recovery; None when the daemon runs without (unit tests).
    dr: Option<Arc<dr::DrContext>>,
    /// Serialises the operations that check then change (attach mints a token only if none
    /// exists; delete proceeds only if not attached): without it two concurrent calls could
    /// both pass the check.
    mutations: Mutex<()>,
}

/// What [`ControlPlane::open`] did, for the start-up log.
#[derive(Debug, Clone, Default)]
pub struct OpenReport {
    /// Where the admin token was written, when the admin tenant was created by this start.
    pub admin_token_created: Option<PathBuf>,
    /// Attachments reloaded into the export registry.
    pub attachments_loaded: usize,
    /// Attachments dropped because their volume no longer exists.
    pub attachments_dropped: usize,
    /// What the restart rule did to the jobs.
    pub jobs: RecoveryReport,
}

/// Failures of [`ControlPlane::open`].
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Catalog(#[from] StoreError),
    #[error(transparent)]
    Bootstrap(#[from] auth::BootstrapError),
    /// Its QoS limits would be gone: refused rather than serve the volume unlimited.
    #[error(
        "volume {volume:?} of tenant {tenant:?} has tier {tier:?}, which the config file no longer defines \
         (the tiers are {known}): define [tiers.{tier}] again, or set-tier its volumes before removing it"
    )]
    UnknownTier { volume: String, tenant: String, tier: String, known: String },
}

/// This layer's rows of a new volume, written in the transaction that creates it
/// (`BlockStore::create_volume_with`): a crash never leaves a volume without its tier, nor one
/// that looks whole and ready while its restore or replication has not begun.
pub(super) struct VolumeRows<'a> {
    pub tier: &'a str,
    /// The restore job that is to fill the volume.
    pub restoring: Option<u64>,
    /// The protection group (key) the volume is a replica in.
    pub replica_of: Option<&'a str>,
}

impl VolumeRows<'_> {
    pub fn write(&self, w: &redb::WriteTransaction, id: u64) -> Result<(), StoreError> {
        w.open_table(VOLUME_TIERS)?.insert(id, self.tier)?;
        if let Some(job) = self.restoring {
            w.open_table(backups::RESTORING)?.insert(id, job)?;
        }
        if let Some(key) = self.replica_of {
            w.open_table(dr::DR_REPLICAS)?.insert(id, key)?;
        }
        Ok(())
    }
}

impl ControlPlane {
    /// Creates the control plane's tables if needed, creates the admin tenant on first start
    /// (token in `<data_dir>/admin.token`) and reloads the persisted attachments into
    /// `exports`. Jobs run with the default options.
    pub fn open(
        store: Arc<BlockStore>,
        exports: Arc<ExportRegistry>,
        data_dir: &Path,
        endpoints: NbdEndpoints,
        opts: ControlOptions,
    ) -> Result<(Arc<ControlPlane>, OpenReport), OpenError> {
        let db = store.catalog();
        let w = db.begin_write().map_err(StoreError::from)?;
        w.open_table(ATTACHMENTS).map_err(StoreError::from)?;
        w.open_table(VOLUME_TIERS).map_err(StoreError::from)?;
        w.open_table(ATTACHMENT_PROTOCOLS).map_err(StoreError::from)?;
        w.open_table(snapshots::SNAPSHOT_ATTACHMENTS).map_err(StoreError::from)?;
        w.open_table(tenants::TENANT_INFO).map_err(StoreError::from)?;
        w.open_table(servers::SERVERS).map_err(StoreError::from)?;
        w.open_table(servers::VOLUME_SERVERS).map_err(StoreError::from)?;
        w.open_table(servers::CONTROL_COUNTERS).map_err(StoreError::from)?;
        w.open_table(backups::BACKUP_BASES).map_err(StoreError::from)?;
        w.open_table(backups::RESTORING).map_err(StoreError::from)?;
        w.open_table(policies::POLICIES).map_err(StoreError::from)?;
        w.open_table(policies::POLICY_BINDINGS).map_err(StoreError::from)?;
        w.open_table(dr::DR_GROUPS).map_err(StoreError::from)?;
        w.open_table(dr::DR_REPLICAS).map_err(StoreError::from)?;
        w.commit().map_err(StoreError::from)?;

        Self::check_tiers(&store, &opts.tiers)?;
        let tenants = Tenants::load(db)?;
        let audit = AuditLog::open(db)?;
        let mut report =
            OpenReport { admin_token_created: tenants.bootstrap_admin(db, data_dir)?, ..Default::default() };
        let (jobs, jobs_report) = JobManager::open(store.clone(), opts.jobs)?;
        report.jobs = jobs_report;
        let cp = ControlPlane {
            store,
            exports,
            tenants,
            endpoints,
            tiers: opts.tiers,
            default_quota: opts.default_quota,
            volume_io: VolumeIoRegistry::new(),
            audit,
            jobs,
            backup: opts.backup,
            dr: opts.dr,
            mutations: Mutex::new(()),
        };
        (report.attachments_loaded, report.attachments_dropped) = cp.load_attachments()?;
        let (loaded, dropped) = cp.load_snapshot_attachments()?;
        report.attachments_loaded += loaded;
        report.attachments_dropped += dropped;
        let cp = Arc::new(cp);
        let executor: Arc<dyn crate::jobs::JobExecutor> = cp.clone();
        cp.jobs.start(Arc::downgrade(&executor));
        Ok((cp, report))
    }

    /// Every volume's tier is one of `tiers` (or `unlimited`): a tier taken out of the config
    /// file while volumes still had it would leave them without limits.
    fn check_tiers(store: &BlockStore, tiers: &[TierSpec]) -> Result<(), OpenError> {
        let rows: Vec<(u64, String)> = {
            let r = store.catalog().begin_read().map_err(StoreError::from)?;
            let t = r.open_table(VOLUME_TIERS).map_err(StoreError::from)?;
            let mut rows = Vec::new();
            for row in t.iter().map_err(StoreError::from)? {
                let (id, tier) = row.map_err(StoreError::from)?;
                rows.push((id.value(), tier.value().to_string()));
            }
            rows
        };
        for (id, tier) in rows {
            if validate_tier(&tier, tiers).is_err() {
                let (volume, tenant) = match store.volume_info(id) {
                    Ok(info) => (info.name, info.owner),
                    // A row left by a volume that is gone (deleted before tier rows went with
                    // it) limits nothing.
                    Err(StoreError::VolumeNotFound(_)) => continue,
                    Err(e) => return Err(e.into()),
                };
                return Err(OpenError::UnknownTier { volume, tenant, tier, known: validate::tier_names(tiers) });
            }
        }
        Ok(())
    }

    /// Mirrors the `attachments` table into the export registry. Rows whose volume is gone
    /// (deleted by a tool working on the catalog directly, say) are removed.
    fn load_attachments(&self) -> Result<(usize, usize), StoreError> {
        let rows = self.attachment_rows()?;
        let protocols = self.attachment_protocols()?;
        let mut stale = Vec::new();
        let mut loaded = 0;
        for (token, volume_id) in rows {
            match self.store.open_volume(volume_id) {
                Ok(volume) => {
                    let io = self.io_of(volume_id)?;
                    let protocol = protocols.get(&token).copied().unwrap_or_default();
                    let export = Export { volume_id, volume, read_only: false, snapshot: None, io, protocol };
                    match self.exports.serve(token, export) {
                        Ok(_) => loaded += 1,
                        // The row stays: the next attach (or start) serves it again.
                        Err(e) => tracing::warn!(volume_id, error = %e, "cannot serve a persisted attachment"),
                    }
                }
                Err(StoreError::VolumeNotFound(_)) => {
                    tracing::warn!(volume_id, "dropping the attachment of a volume that no longer exists");
                    stale.push(token);
                }
                Err(e) => return Err(e),
            }
        }
        if !stale.is_empty() {
            let w = self.store.catalog().begin_write()?;
            {
                let mut t = w.open_table(ATTACHMENTS)?;
                for token in &stale {
                    t.remove(token.as_str())?;
                }
            }
            w.commit()?;
        }
        Ok((loaded, stale.len()))
    }

    /// Every (token, volume id) of the `attachments` table.
    fn attachment_rows(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let r = self.store.catalog().begin_read()?;
        let t = r.open_table(ATTACHMENTS)?;
        let mut rows = Vec::new();
        for row in t.iter()? {
            let (token, id) = row?;
            rows.push((token.value().to_string(), id.value()));
        }
        Ok(rows)
    }

    /// The tokens attaching `volume_id` (at most one per protocol).
    fn tokens_of(&self, volume_id: u64) -> Result<Vec<String>, StoreError> {
        Ok(self.attachment_rows()?.into_iter().filter(|(_, id)| *id == volume_id).map(|(t, _)| t).collect())
    }

    /// The front end of every attachment not served over NBD, by token.
    pub(super) fn attachment_protocols(&self) -> Result<std::collections::HashMap<String, Protocol>, StoreError> {
        let r = self.store.catalog().begin_read()?;
        let t = r.open_table(ATTACHMENT_PROTOCOLS)?;
        let mut out = std::collections::HashMap::new();
        for row in t.iter()? {
            let (token, p) = row?;
            match Protocol::parse(p.value()) {
                Some(p) => {
                    out.insert(token.value().to_string(), p);
                }
                None => tracing::warn!(protocol = p.value(), "unknown attachment protocol in the catalog"),
            }
        }
        Ok(out)
    }

    /// The vhost-user socket of a token served over vhost-user.
    pub(super) fn socket_of(&self, token: &str, protocol: Protocol) -> Option<PathBuf> {
        match protocol {
            Protocol::Nbd => None,
            Protocol::VhostUser => self.exports.vhost().map(|v| v.socket_path(token)),
        }
    }

    pub fn tenants(&self) -> &Tenants {
        &self.tenants
    }

    /// The per-volume data-path state (QoS, counters), for the metrics endpoint.
    pub fn volume_io(&self) -> &Arc<VolumeIoRegistry> {
        &self.volume_io
    }

    /// The QoS limits of `tier` for a volume of `size` bytes (None: unlimited).
    pub fn limits_for(&self, tier: &str, size: u64) -> Option<Limits> {
        self.tiers.iter().find(|t| t.name == tier).map(|t| t.limits(size))
    }

    /// The shared data-path state of a volume, created with its tier's limits on first use.
    pub(crate) fn io_of(&self, volume_id: u64) -> Result<Arc<VolumeIo>, StoreError> {
        if let Some(io) = self.volume_io.get(volume_id) {
            return Ok(io);
        }
        let info = self.store.volume_info(volume_id)?;
        let limits = self.limits_for(&self.tier_of(volume_id)?, info.size);
        Ok(self.volume_io.get_or_create(volume_id, &info.owner, &info.name, limits))
    }

    /// Applies a volume's current tier and size to its live connections.
    fn retune(&self, volume_id: u64, tier: &str, size: u64) {
        self.volume_io.retune(volume_id, self.limits_for(tier, size));
    }

    pub fn store(&self) -> &Arc<BlockStore> {
        &self.store
    }

    pub fn jobs(&self) -> &Arc<JobManager> {
        &self.jobs
    }

    /// The tenant that a call's metadata authenticates.
    pub fn authenticate(&self, metadata: &tonic::metadata::MetadataMap) -> Result<String, ApiError> {
        Ok(self.tenants.authenticate(metadata)?)
    }

    fn find(&self, owner: &str, name: &str) -> Result<VolumeInfo, ApiError> {
        match self.store.find_volume(owner, name) {
            Err(StoreError::VolumeNotFound(_)) => Err(ApiError::VolumeNotFound(name.to_string())),
            other => Ok(other?),
        }
    }

    fn tier_of(&self, volume_id: u64) -> Result<String, StoreError> {
        let r = self.store.catalog().begin_read()?;
        let t = r.open_table(VOLUME_TIERS)?;
        Ok(t.get(volume_id)?.map(|g| g.value().to_string()).unwrap_or_else(|| validate::DEFAULT_TIER.to_string()))
    }

    fn set_tier_row(&self, volume_id: u64, tier: &str) -> Result<(), StoreError> {
        let w = self.store.catalog().begin_write()?;
        w.open_table(VOLUME_TIERS)?.insert(volume_id, tier)?;
        w.commit()?;
        Ok(())
    }

    fn describe(&self, info: &VolumeInfo, tier: String) -> pb::Volume {
        // The live limiter's balance when the volume is served, else what it would start with.
        let now = std::time::Instant::now();
        let status = match self.volume_io.get(info.id) {
            Some(io) => io.limiter.status(now),
            None => crate::qos::Limiter::new(self.limits_for(&tier, info.size), now).status(now),
        };
        let qos = status.limits.map(|l| pb::QosLimits {
            iops_limit: l.iops,
            iops_peak: l.iops_peak,
            iops_burst_capacity: l.iops_credits,
            iops_burst_balance: status.iops_burst_balance,
            bandwidth_limit: l.bps,
            bandwidth_peak: l.bps_peak,
            bandwidth_burst_capacity: l.bps_credits,
            bandwidth_burst_balance: status.bps_burst_balance,
        });
        let server = self.server_of(info.id).unwrap_or_else(|e| {
            tracing::warn!(volume = info.name, error = %e, "cannot read the volume's server");
            None
        });
        pb::Volume {
            name: info.name.clone(),
            id: info.id,
            size_bytes: info.size,
            allocated_bytes: info.allocated,
            created_unix: info.created,
            tier,
            attached: self.exports.is_attached(info.id),
            state: self.volume_state(info.id).to_string(),
            qos,
            server: server.unwrap_or_default(),
        }
    }

    /// A volume that may be changed: found, and not being deleted.
    pub(super) fn find_live(&self, owner: &str, name: &str) -> Result<VolumeInfo, ApiError> {
        let info = self.find(owner, name)?;
        self.ensure_not_deleting(name, info.id)?;
        self.ensure_not_replica(name, info.id)?;
        Ok(info)
    }

    /// Removes one attach token (row and live export; its connections are closed).
    pub(super) fn revoke_token(&self, token: &str) -> Result<(), ApiError> {
        let w = self.store.catalog().begin_write().map_err(StoreError::from)?;
        w.open_table(ATTACHMENTS).map_err(StoreError::from)?.remove(token).map_err(StoreError::from)?;
        w.commit().map_err(StoreError::from)?;
        self.exports.revoke(token);
        Ok(())
    }

    /// Creates an empty volume of `tier` ("" = default) for `owner`.
    pub fn create_volume(&self, owner: &str, name: &str, size: u64, tier: &str) -> Result<pb::Volume, ApiError> {
        self.create_volume_from(owner, name, size, tier, "")
    }

    /// Creates a volume; with `from_snapshot` ("VOLUME@SNAP") a clone of that snapshot, of its
    /// size when `size` is 0.
    pub fn create_volume_from(
        &self,
        owner: &str,
        name: &str,
        size: u64,
        tier: &str,
        from_snapshot: &str,
    ) -> Result<pb::Volume, ApiError> {
        validate_volume_name(name)?;
        if from_snapshot.is_empty() || size != 0 {
            validate_volume_size(size)?;
        }
        let tier = self.tier_for(owner, tier)?;
        let _g = self.mutations.lock();
        self.create_volume_locked(owner, name, size, tier, from_snapshot, None)
    }

    /// `tier` checked, and allowed to `owner`.
    pub(super) fn tier_for(&self, owner: &str, tier: &str) -> Result<&str, ApiError> {
        let tier = validate_tier(tier, &self.tiers)?;
        if tier == UNLIMITED_TIER && owner != ADMIN_TENANT {
            return Err(ApiError::TierDenied);
        }
        Ok(tier)
    }

    /// The body of [`create_volume_from`](Self::create_volume_from), its input validated and
    /// `mutations` held by the caller.
    pub(super) fn create_volume_locked(
        &self,
        owner: &str,
        name: &str,
        size: u64,
        tier: &str,
        from_snapshot: &str,
        restoring: Option<u64>,
    ) -> Result<pb::Volume, ApiError> {
        let rows = |w: &redb::WriteTransaction, id: u64| VolumeRows { tier, restoring, replica_of: None }.write(w, id);
        let created = if from_snapshot.is_empty() {
            self.check_quota(owner, 1, size)?;
            self.store.create_volume_with(owner, name, size, &rows)
        } else {
            let snap = self.snapshot_ref(owner, from_snapshot)?;
            let snap_size = self.store.snapshot_info(snap)?.size;
            self.check_quota(owner, 1, size.max(snap_size))?;
            self.store.clone_snapshot_with(owner, name, snap, (size != 0).then_some(size), &rows)
        };
        let info = match created {
            Err(StoreError::VolumeExists(_)) => {
                // The name frees up when the delete job has removed the volume.
                if let Ok(old) = self.find(owner, name) {
                    self.ensure_not_deleting(name, old.id)?;
                }
                return Err(ApiError::VolumeExists(name.to_string()));
            }
            other => other?,
        };
        tracing::info!(owner, volume = name, id = info.id, size, tier, "volume created");
        Ok(self.describe(&info, tier.to_string()))
    }

    /// The volumes of `owner`, by name.
    pub fn list_volumes(&self, owner: &str) -> Result<Vec<pb::Volume>, ApiError> {
        let infos = self.store.list_volumes(Some(owner))?;
        let r = self.store.catalog().begin_read().map_err(StoreError::from)?;
        let t = r.open_table(VOLUME_TIERS).map_err(StoreError::from)?;
        let mut out = Vec::with_capacity(infos.len());
        for info in infos.iter().filter(|i| self.replica_of(i.id).is_none()) {
            let tier = t.get(info.id).map_err(StoreError::from)?.map(|g| g.value().to_string());
            out.push(self.describe(info, tier.unwrap_or_else(|| validate::DEFAULT_TIER.to_string())));
        }
        Ok(out)
    }

    pub fn get_volume(&self, owner: &str, name: &str) -> Result<pb::Volume, ApiError> {
        validate_volume_name(name)?;
        let info = self.find(owner, name)?;
        Ok(self.describe(&info, self.tier_of(info.id)?))
    }

    /// Queues the deletion of a detached volume and its data (a job: see [`jobs`]); from
    /// here on the volume is `deleting`. Deleting a volume that is being deleted returns its
    /// delete job.
    pub fn delete_volume(&self, owner: &str, name: &str) -> Result<JobRecord, ApiError> {
        validate_volume_name(name)?;
        let _g = self.mutations.lock();
        let info = self.find(owner, name)?;
        if let Some(job) = self.delete_job_of(info.id) {
            return Ok(job);
        }
        self.ensure_not_replica(name, info.id)?;
        if self.exports.is_attached(info.id) || !self.tokens_of(info.id)?.is_empty() {
            return Err(ApiError::Attached(name.to_string()));
        }
        if let Some(server) = self.server_of(info.id)? {
            return Err(ApiError::VolumeInServer { volume: name.to_string(), server });
        }
        let job = self.jobs.submit(owner, JobKind::DeleteVolume { volume_id: info.id, name: name.to_string() })?;
        tracing::info!(owner, volume = name, id = info.id, job = job.id, "volume delete queued");
        Ok(job)
    }

    /// Grows a volume; the same size is a no-op, a smaller one an error.
    pub fn extend_volume(&self, owner: &str, name: &str, size: u64) -> Result<pb::Volume, ApiError> {
        validate_volume_name(name)?;
        validate_volume_size(size)?;
        let _g = self.mutations.lock();
        let info = self.find_live(owner, name)?;
        if size < info.size {
            return Err(ApiError::Shrink { name: name.to_string(), current: info.size, requested: size });
        }
        if size > info.size {
            self.check_quota(owner, 0, size - info.size)?;
        }
        let info = if size > info.size {
            let info = self.store.extend_volume(info.id, size)?;
            let told = self.exports.volume_resized(info.id);
            if told > 0 {
                tracing::info!(volume = name, frontends = told, "config-change notice sent to vhost-user frontends");
            }
            info
        } else {
            info
        };
        let tier = self.tier_of(info.id)?;
        // Limits grow with the size, online.
        self.retune(info.id, &tier, info.size);
        tracing::info!(owner, volume = name, id = info.id, size, "volume extended");
        Ok(self.describe(&info, tier))
    }

    /// Records a volume's tier (QoS enforcement reads it; see the QoS issue).
    pub fn set_volume_tier(&self, owner: &str, name: &str, tier: &str) -> Result<pb::Volume, ApiError> {
        validate_volume_name(name)?;
        if tier.is_empty() {
            return Err(ValidationError::Tier { name: String::new(), known: validate::tier_names(&self.tiers) }.into());
        }
        let tier = validate_tier(tier, &self.tiers)?;
        if tier == UNLIMITED_TIER && owner != ADMIN_TENANT {
            return Err(ApiError::TierDenied);
        }
        let _g = self.mutations.lock();
        let info = self.find_live(owner, name)?;
        self.set_tier_row(info.id, tier)?;
        self.retune(info.id, tier, info.size);
        tracing::info!(owner, volume = name, id = info.id, tier, "volume tier set");
        Ok(self.describe(&info, tier.to_string()))
    }

    /// Exports a volume over NBD; returns its existing token if it is already attached.
    /// With `require_unix`, a daemon without a unix socket refuses before attaching anything.
    pub fn attach_volume(&self, owner: &str, name: &str, require_unix: bool) -> Result<Attachment, ApiError> {
        self.attach_volume_over(owner, name, require_unix, Protocol::Nbd)
    }

    /// Exports a volume over `protocol` (one attachment per protocol; attaching again returns
    /// the existing one).
    pub fn attach_volume_over(
        &self,
        owner: &str,
        name: &str,
        require_unix: bool,
        protocol: Protocol,
    ) -> Result<Attachment, ApiError> {
        validate_volume_name(name)?;
        if require_unix && self.endpoints.unix.is_none() {
            return Err(ApiError::NoUnixSocket);
        }
        if protocol == Protocol::VhostUser && self.exports.vhost().is_none() {
            return Err(crate::exports::ServeError::NoVhostUser.into());
        }
        let _g = self.mutations.lock();
        let info = self.find_live(owner, name)?;
        self.ensure_not_restoring(name, info.id)?;
        self.ensure_not_switching(owner, name, info.id)?;
        let protocols = self.attachment_protocols()?;
        let existing =
            self.tokens_of(info.id)?.into_iter().find(|t| protocols.get(t).copied().unwrap_or_default() == protocol);
        let token = match existing {
            Some(token) => {
                if self.exports.lookup(&token).is_none() {
                    // Persisted but not served (its socket could not be bound at start, say):
                    // make the table the truth.
                    let volume = self.store.open_volume(info.id)?;
                    let io = self.io_of(info.id)?;
                    let export = Export { volume_id: info.id, volume, read_only: false, snapshot: None, io, protocol };
                    self.exports.serve(token.clone(), export)?;
                }
                token
            }
            None => {
                let token = ExportRegistry::new_token();
                let volume = self.store.open_volume(info.id)?;
                // Persist first: the registry only ever serves what a restart would serve.
                self.persist_attachment(ATTACHMENTS, &token, info.id, protocol)?;
                let io = self.io_of(info.id)?;
                let export = Export { volume_id: info.id, volume, read_only: false, snapshot: None, io, protocol };
                if let Err(e) = self.exports.serve(token.clone(), export) {
                    // Nothing half-done: the rows go again.
                    if let Err(e2) = self.remove_attachment_rows(ATTACHMENTS, std::slice::from_ref(&token)) {
                        tracing::error!(volume = name, error = %e2, "cannot remove the rows of a failed attach");
                    }
                    return Err(e.into());
                }
                tracing::info!(owner, volume = name, id = info.id, protocol = protocol.name(), "volume attached");
                token
            }
        };
        let socket = self.socket_of(&token, protocol);
        Ok(Attachment { token, volume: self.describe(&info, self.tier_of(info.id)?), protocol, socket })
    }

    /// Records an attachment: `token` → `id` in `table`, and its protocol unless NBD.
    pub(super) fn persist_attachment(
        &self,
        table: TableDefinition<&str, u64>,
        token: &str,
        id: u64,
        protocol: Protocol,
    ) -> Result<(), StoreError> {
        let w = self.store.catalog().begin_write()?;
        w.open_table(table)?.insert(token, id)?;
        if protocol != Protocol::Nbd {
            w.open_table(ATTACHMENT_PROTOCOLS)?.insert(token, protocol.name())?;
        }
        w.commit()?;
        Ok(())
    }

    /// Removes the rows of `tokens` from `table` and their protocols.
    pub(super) fn remove_attachment_rows(
        &self,
        table: TableDefinition<&str, u64>,
        tokens: &[String],
    ) -> Result<(), StoreError> {
        let w = self.store.catalog().begin_write()?;
        {
            let mut t = w.open_table(table)?;
            let mut p = w.open_table(ATTACHMENT_PROTOCOLS)?;
            for token in tokens {
                t.remove(token.as_str())?;
                p.remove(token.as_str())?;
            }
        }
        w.commit()?;
        Ok(())
    }

    /// Revokes a volume's attach tokens and closes their connections. Returns whether it was
    /// attached.
    pub fn detach_volume(&self, owner: &str, name: &str) -> Result<bool, ApiError> {
        validate_volume_name(name)?;
        let _g = self.mutations.lock();
        let info = self.find(owner, name)?;
        let tokens = self.tokens_of(info.id)?;
        if !tokens.is_empty() {
            self.remove_attachment_rows(ATTACHMENTS, &tokens)?;
        }
        let mut was_attached = !tokens.is_empty();
        for token in &tokens {
            was_attached |= self.exports.revoke(token);
        }
        if was_attached {
            tracing::info!(owner, volume = name, id = info.id, "volume detached");
        }
        Ok(was_attached)
    }

    /// Records the outcome of a call in the audit log (a failure to write it is logged).
    pub(super) fn audit_outcome<T>(&self, who: &str, method: &str, target: &str, r: &Result<T, ApiError>) {
        let (result, message) = match r {
            Ok(_) => ("OK", String::new()),
            Err(e) => (error::code_name(e.code()), e.to_string()),
        };
        if let Err(e) = self.audit.record(self.store.catalog(), who, method, target, result, &message) {
            tracing::error!(error = %e, method, "cannot write the audit log");
        }
    }

    /// Counts for the metrics endpoint.
    pub fn gauges(&self) -> Result<Gauges, StoreError> {
        let volumes = self.store.list_volumes(None)?.len() as u64;
        let attached: BTreeSet<u64> = self.attachment_rows()?.into_iter().map(|(_, id)| id).collect();
        Ok(Gauges { volumes, attached_volumes: attached.len() as u64, tenants: self.tenants.names().len() as u64 })
    }

    /// `nbd://HOST:PORT/TOKEN` (`nbds://` when the client must use TLS). When the listener is
    /// bound to a wildcard address, HOST is the local address the API call came in on: the
    /// client reached us there, so the NBD client (usually on the same host as the API
    /// client) most likely can too.
    pub fn tcp_uri(&self, token: &str, api_local: Option<SocketAddr>) -> String {
        nbd_tcp_uri(self.endpoints.tcp, api_local, token, self.endpoints.tcp_tls)
    }

    /// `nbd+unix:///TOKEN?socket=PATH` (`nbds+unix://` when the client must use TLS), if the
    /// daemon has a unix socket.
    pub fn unix_uri(&self, token: &str) -> Option<String> {
        self.endpoints.unix.as_deref().map(|p| nbd_unix_uri(p, token, self.endpoints.unix_tls))
    }
}

/// See [`ControlPlane::tcp_uri`]. The `nbds` scheme is libnbd's for "TLS required".
pub fn nbd_tcp_uri(listen: SocketAddr, api_local: Option<SocketAddr>, token: &str, tls: bool) -> String {
    let mut ip = listen.ip();
    if ip.is_unspecified() {
        ip = api_local.map(|a| a.ip()).filter(|ip| !ip.is_unspecified()).unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    // An IPv4-mapped IPv6 address (a dual-stack API listener) is an IPv4 client's view.
    if let IpAddr::V6(v6) = ip {
        if let Some(v4) = v6.to_ipv4_mapped() {
            ip = IpAddr::V4(v4);
        }
    }
    let scheme = if tls { "nbds" } else { "nbd" };
    match ip {
        IpAddr::V4(v4) => format!("{scheme}://{v4}:{}/{token}", listen.port()),
        IpAddr::V6(v6) => format!("{scheme}://[{v6}]:{}/{token}", listen.port()),
    }
}

/// See [`ControlPlane::unix_uri`]. The socket path is percent-encoded as a query value.
pub fn nbd_unix_uri(socket: &Path, token: &str, tls: bool) -> String {
    let mut enc = String::new();
    for b in socket.as_os_str().as_encoded_bytes() {
        match *b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => enc.push(*b as char),
            other => enc.push_str(&format!("%{other:02X}")),
        }
    }
    let scheme = if tls { "nbds+unix" } else { "nbd+unix" };
    format!("{scheme}:///{token}?socket={enc}")
}

/// The tonic service over a [`ControlPlane`].
#[derive(Clone)]
pub struct VolumeApi {
    cp: Arc<ControlPlane>,
}

impl VolumeApi {
    pub fn new(cp: Arc<ControlPlane>) -> VolumeApi {
        VolumeApi { cp }
    }

    /// Authenticates the call, then runs `f` with the tenant on the blocking pool (the store
    /// and the catalog do synchronous disk I/O). For a read-only call `method`: only a refused
    /// authentication goes to the audit log.
    async fn run<Q, T>(
        &self,
        req: &Request<Q>,
        method: &'static str,
        f: impl FnOnce(&ControlPlane, &str) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, Status>
    where
        T: Send + 'static,
    {
        let tenant = match self.cp.authenticate(req.metadata()) {
            Ok(t) => t,
            Err(e) => {
                let cp = self.cp.clone();
                let r: Result<(), ApiError> = Err(e);
                let r = tokio::task::spawn_blocking(move || {
                    cp.audit_outcome(audit::UNAUTHENTICATED, method, "", &r);
                    r
                })
                .await
                .map_err(|e| ApiError::Internal(format!("the operation did not complete: {e}")))?;
                return Err(r.expect_err("a refused authentication").into());
            }
        };
        let cp = self.cp.clone();
        tokio::task::spawn_blocking(move || f(&cp, &tenant))
            .await
            .map_err(|e| ApiError::Internal(format!("the operation did not complete: {e}")))?
            .map_err(Status::from)
    }

    /// [`run`](Self::run) for a mutating call: the outcome goes to the audit log as
    /// `method` on `target`, with the caller (or "-" when authentication failed).
    async fn run_mut<Q, T>(
        &self,
        req: &Request<Q>,
        method: &'static str,
        target: String,
        f: impl FnOnce(&ControlPlane, &str) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, Status>
    where
        T: Send + 'static,
    {
        let cp = self.cp.clone();
        let tenant = self.cp.authenticate(req.metadata());
        tokio::task::spawn_blocking(move || {
            let (who, r) = match tenant {
                Ok(t) => {
                    let r = f(&cp, &t);
                    (t, r)
                }
                Err(e) => (audit::UNAUTHENTICATED.to_string(), Err(e)),
            };
            cp.audit_outcome(&who, method, &target, &r);
            r.map_err(Status::from)
        })
        .await
        .map_err(|e| Status::from(ApiError::Internal(format!("the operation did not complete: {e}"))))?
    }
}

#[tonic::async_trait]
impl VolumeService for VolumeApi {
    async fn create_volume(
        &self,
        req: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        let m = req.get_ref().clone();
        let target = format!("volume {}", m.name);
        let (volume, job) = self
            .run_mut(&req, "VolumeService/CreateVolume", target, move |cp, owner| {
                if m.from_backup.is_empty() {
                    return Ok((cp.create_volume_from(owner, &m.name, m.size_bytes, &m.tier, &m.from_snapshot)?, None));
                }
                if !m.from_snapshot.is_empty() {
                    return Err(ValidationError::TwoSources.into());
                }
                let (v, job) = cp.create_volume_from_backup(owner, &m.name, m.size_bytes, &m.tier, &m.from_backup)?;
                Ok((v, Some(jobs::job_to_pb(&job))))
            })
            .await?;
        Ok(Response::new(pb::CreateVolumeResponse { volume: Some(volume), job }))
    }

    async fn list_volumes(
        &self,
        req: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let volumes = self.run(&req, "VolumeService/ListVolumes", |cp, owner| cp.list_volumes(owner)).await?;
        Ok(Response::new(pb::ListVolumesResponse { volumes }))
    }

    async fn get_volume(&self, req: Request<pb::GetVolumeRequest>) -> Result<Response<pb::GetVolumeResponse>, Status> {
        let name = req.get_ref().name.clone();
        let volume = self.run(&req, "VolumeService/GetVolume", move |cp, owner| cp.get_volume(owner, &name)).await?;
        Ok(Response::new(pb::GetVolumeResponse { volume: Some(volume) }))
    }

    async fn delete_volume(
        &self,
        req: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let name = req.get_ref().name.clone();
        let target = format!("volume {name}");
        let job = self
            .run_mut(&req, "VolumeService/DeleteVolume", target, move |cp, owner| cp.delete_volume(owner, &name))
            .await?;
        Ok(Response::new(pb::DeleteVolumeResponse { job: Some(jobs::job_to_pb(&job)) }))
    }

    async fn extend_volume(
        &self,
        req: Request<pb::ExtendVolumeRequest>,
    ) -> Result<Response<pb::ExtendVolumeResponse>, Status> {
        let pb::ExtendVolumeRequest { name, size_bytes } = req.get_ref().clone();
        let target = format!("volume {name}");
        let volume = self
            .run_mut(&req, "VolumeService/ExtendVolume", target, move |cp, owner| {
                cp.extend_volume(owner, &name, size_bytes)
            })
            .await?;
        Ok(Response::new(pb::ExtendVolumeResponse { volume: Some(volume) }))
    }

    async fn set_volume_tier(
        &self,
        req: Request<pb::SetVolumeTierRequest>,
    ) -> Result<Response<pb::SetVolumeTierResponse>, Status> {
        let pb::SetVolumeTierRequest { name, tier } = req.get_ref().clone();
        let target = format!("volume {name}");
        let volume = self
            .run_mut(&req, "VolumeService/SetVolumeTier", target, move |cp, owner| {
                cp.set_volume_tier(owner, &name, &tier)
            })
            .await?;
        Ok(Response::new(pb::SetVolumeTierResponse { volume: Some(volume) }))
    }

    async fn attach_volume(
        &self,
        req: Request<pb::AttachVolumeRequest>,
    ) -> Result<Response<pb::AttachVolumeResponse>, Status> {
        let pb::AttachVolumeRequest { name, require_unix, protocol } = req.get_ref().clone();
        let api_local = req.local_addr();
        let target = format!("volume {name}");
        let (a, uri, unix_uri) = self
            .run_mut(&req, "VolumeService/AttachVolume", target, move |cp, owner| {
                let protocol = validate::validate_protocol(&protocol, require_unix)?;
                let a = cp.attach_volume_over(owner, &name, require_unix, protocol)?;
                let (uri, unix_uri) = match a.protocol {
                    Protocol::Nbd => (cp.tcp_uri(&a.token, api_local), cp.unix_uri(&a.token).unwrap_or_default()),
                    Protocol::VhostUser => (String::new(), String::new()),
                };
                Ok((a, uri, unix_uri))
            })
            .await?;
        Ok(Response::new(pb::AttachVolumeResponse {
            uri,
            unix_uri,
            export_name: a.token,
            volume: Some(a.volume),
            protocol: a.protocol.name().to_string(),
            vhost_user_socket: a.socket.map(|p| p.display().to_string()).unwrap_or_default(),
        }))
    }

    async fn detach_volume(
        &self,
        req: Request<pb::DetachVolumeRequest>,
    ) -> Result<Response<pb::DetachVolumeResponse>, Status> {
        let name = req.get_ref().name.clone();
        let target = format!("volume {name}");
        let was_attached = self
            .run_mut(&req, "VolumeService/DetachVolume", target, move |cp, owner| cp.detach_volume(owner, &name))
            .await?;
        Ok(Response::new(pb::DetachVolumeResponse { was_attached }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv6Addr;

    #[test]
    fn tcp_uri_uses_the_bound_address() {
        let l: SocketAddr = "127.0.0.1:10809".parse().unwrap();
        assert_eq!(nbd_tcp_uri(l, None, "abc", false), "nbd://127.0.0.1:10809/abc");
        let l: SocketAddr = "[::1]:10809".parse().unwrap();
        assert_eq!(nbd_tcp_uri(l, None, "abc", false), "nbd://[::1]:10809/abc");
    }

    #[test]
    fn tcp_uri_of_a_wildcard_listener_uses_the_api_connection() {
        let l: SocketAddr = "0.0.0.0:10809".parse().unwrap();
        let api: SocketAddr = "10.1.2.3:10810".parse().unwrap();
        assert_eq!(nbd_tcp_uri(l, Some(api), "t", false), "nbd://10.1.2.3:10809/t");
        assert_eq!(nbd_tcp_uri(l, None, "t", false), "nbd://127.0.0.1:10809/t");
        let mapped = SocketAddr::new(IpAddr::V6(Ipv4Addr::new(10, 0, 0, 9).to_ipv6_mapped()), 1);
        let l6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 10809);
        assert_eq!(nbd_tcp_uri(l6, Some(mapped), "t", false), "nbd://10.0.0.9:10809/t");
    }

    #[test]
    fn uris_of_tls_listeners_say_nbds() {
        let l: SocketAddr = "0.0.0.0:10809".parse().unwrap();
        let api: SocketAddr = "10.1.2.3:10810".parse().unwrap();
        assert_eq!(nbd_tcp_uri(l, Some(api), "t", true), "nbds://10.1.2.3:10809/t");
        let l: SocketAddr = "[::1]:1".parse().unwrap();
        assert_eq!(nbd_tcp_uri(l, None, "t", true), "nbds://[::1]:1/t");
        assert_eq!(nbd_unix_uri(Path::new("/run/n.sock"), "t", true), "nbds+unix:///t?socket=/run/n.sock");
    }

    #[test]
    fn unix_uri_encodes_the_socket_path() {
        assert_eq!(nbd_unix_uri(Path::new("/run/evs/nbd.sock"), "t", false), "nbd+unix:///t?socket=/run/evs/nbd.sock");
        assert_eq!(nbd_unix_uri(Path::new("/tmp/a b&c"), "t", false), "nbd+unix:///t?socket=/tmp/a%20b%26c");
    }
}

/// The control plane over a real block store in a temporary directory.
#[cfg(test)]
mod control_tests {
    use super::*;
    use evs_snapshot::{EngineKind, StoreOptions};

    fn open(dir: &Path, unix: Option<PathBuf>) -> (Arc<ControlPlane>, OpenReport, Arc<ExportRegistry>) {
        let opts =
            StoreOptions { engine: EngineKind::Portable, direct_writes: false, direct_write_max: 0, max_snapshots: 4 };
        let store = BlockStore::open(dir, opts).unwrap();
        let exports = ExportRegistry::new();
        let endpoints = NbdEndpoints { tcp: "127.0.0.1:10809".parse().unwrap(), unix, tcp_tls: false, unix_tls: false };
        let (cp, report) =
            ControlPlane::open(store, exports.clone(), dir, endpoints, ControlOptions::default()).unwrap();
        (cp, report, exports)
    }

    const A: &str = ADMIN_TENANT;

    #[test]
    fn volume_lifecycle() {
        let dir = tempfile::tempdir().unwrap();
        let (cp, report, exports) = open(dir.path(), None);
        assert_eq!(report.admin_token_created, Some(dir.path().join(ADMIN_TOKEN_FILE)));

        // Bad input changes nothing.
        assert!(matches!(cp.create_volume(A, "a b", 1 << 20, ""), Err(ApiError::Invalid(_))));
        assert!(matches!(cp.create_volume(A, "v", 1000, ""), Err(ApiError::Invalid(_))));
        assert!(matches!(cp.create_volume(A, "v", 1 << 20, "fast"), Err(ApiError::Invalid(_))));
        assert!(cp.list_volumes(A).unwrap().is_empty());

        let v = cp.create_volume(A, "v", 1 << 20, "").unwrap();
        assert_eq!((v.name.as_str(), v.size_bytes, v.tier.as_str(), v.attached), ("v", 1 << 20, "gpssd", false));
        assert!(matches!(cp.create_volume(A, "v", 1 << 20, ""), Err(ApiError::VolumeExists(_))));
        assert!(matches!(cp.get_volume(A, "w"), Err(ApiError::VolumeNotFound(_))));
        // Another tenant does not see it.
        assert!(cp.list_volumes("other").unwrap().is_empty());
        assert!(matches!(cp.get_volume("other", "v"), Err(ApiError::VolumeNotFound(_))));

        // Extend: never shrinks, same size is a no-op.
        assert!(matches!(cp.extend_volume(A, "v", 512 << 10), Err(ApiError::Shrink { .. })));
        assert_eq!(cp.extend_volume(A, "v", 1 << 20).unwrap().size_bytes, 1 << 20);
        assert_eq!(cp.extend_volume(A, "v", 2 << 20).unwrap().size_bytes, 2 << 20);
        assert_eq!(cp.get_volume(A, "v").unwrap().size_bytes, 2 << 20);

        // Tiers.
        assert_eq!(cp.set_volume_tier(A, "v", "essd").unwrap().tier, "essd");
        assert_eq!(cp.list_volumes(A).unwrap()[0].tier, "essd");
        assert!(matches!(cp.set_volume_tier(A, "v", ""), Err(ApiError::Invalid(_))));
        assert!(matches!(cp.create_volume("other", "u", 1 << 20, "unlimited"), Err(ApiError::TierDenied)));

        // Attach is idempotent; the volume cannot be deleted while attached.
        assert!(matches!(cp.attach_volume(A, "v", true), Err(ApiError::NoUnixSocket)));
        assert!(!cp.get_volume(A, "v").unwrap().attached, "a refused attach attaches nothing");
        let a1 = cp.attach_volume(A, "v", false).unwrap();
        let a2 = cp.attach_volume(A, "v", false).unwrap();
        assert_eq!(a1.token, a2.token);
        assert!(a1.volume.attached);
        assert_eq!(exports.lookup(&a1.token).map(|e| e.volume_id), Some(v.id));
        assert_eq!(cp.gauges().unwrap(), Gauges { volumes: 1, attached_volumes: 1, tenants: 1 });
        assert!(matches!(cp.delete_volume(A, "v"), Err(ApiError::Attached(_))));

        // Detach revokes; a second detach is a no-op.
        assert!(cp.detach_volume(A, "v").unwrap());
        assert!(exports.lookup(&a1.token).is_none());
        assert!(!cp.detach_volume(A, "v").unwrap());
        let job = cp.delete_volume(A, "v").unwrap();
        let done = cp.jobs().wait(job.id, std::time::Duration::from_secs(30)).expect("the delete job ends");
        assert_eq!(done.state, crate::jobs::JobState::Succeeded, "{done:?}");
        assert!(matches!(cp.get_volume(A, "v"), Err(ApiError::VolumeNotFound(_))));
        assert_eq!(cp.gauges().unwrap(), Gauges { volumes: 0, attached_volumes: 0, tenants: 1 });
    }

    #[test]
    fn attachments_and_tiers_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nbd.sock");
        let token = {
            let (cp, _, _) = open(dir.path(), Some(sock.clone()));
            cp.create_volume(A, "v", 1 << 20, "high").unwrap();
            let a = cp.attach_volume(A, "v", true).unwrap();
            assert_eq!(cp.unix_uri(&a.token), Some(nbd_unix_uri(&sock, &a.token, false)));
            a.token
        };
        let (cp, report, exports) = open(dir.path(), Some(sock));
        assert_eq!(report.admin_token_created, None);
        assert_eq!((report.attachments_loaded, report.attachments_dropped), (1, 0));
        assert!(exports.lookup(&token).is_some());
        assert_eq!(cp.attach_volume(A, "v", false).unwrap().token, token);
        let v = cp.get_volume(A, "v").unwrap();
        assert_eq!((v.tier.as_str(), v.attached), ("high", true));
    }

    /// A peer's call waits a bounded time for its group's lock, then answers busy without
    /// running; once the lock is free it runs (here: on a group that does not exist).
    #[test]
    fn a_peer_call_waits_a_bounded_time_for_the_group_lock() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let mut dr = dr::DrContext::new(rt.handle().clone(), "az1".into(), "http://127.0.0.1:1".into());
        dr.peer_lock_wait = std::time::Duration::from_millis(100);
        let opts =
            StoreOptions { engine: EngineKind::Portable, direct_writes: false, direct_write_max: 0, max_snapshots: 4 };
        let store = BlockStore::open(dir.path(), opts).unwrap();
        let endpoints =
            NbdEndpoints { tcp: "127.0.0.1:10809".parse().unwrap(), unix: None, tcp_tls: false, unix_tls: false };
        let copts = ControlOptions { dr: Some(Arc::new(dr)), ..ControlOptions::default() };
        let (cp, _) = ControlPlane::open(store, ExportRegistry::new(), dir.path(), endpoints, copts).unwrap();
        let lock = cp.group_lock(&dr::group_key(A, "g")).unwrap();
        let held = lock.lock();
        let ran = std::sync::atomic::AtomicBool::new(false);
        let r = cp.with_group_locked(A, "g", |_| {
            ran.store(true, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        });
        assert!(matches!(r, Err(ApiError::GroupBusy(ref g)) if g == "g"), "{r:?}");
        assert_eq!(ApiError::GroupBusy("g".into()).code(), tonic::Code::Unavailable);
        assert!(!ran.load(std::sync::atomic::Ordering::Relaxed), "a call that gave up ran anyway");
        drop(held);
        let r = cp.with_group_locked(A, "g", |_| Ok(()));
        assert!(matches!(r, Err(ApiError::GroupNotFound(_))), "with the lock free the call reads the record: {r:?}");
    }
}
