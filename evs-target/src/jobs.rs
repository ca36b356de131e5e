//! Jobs: long operations (volume delete today; backup, restore, rollback and replication
//! next) run in the background, persisted in the catalog, with progress in bytes.
//!
//! * States: `queued → running → succeeded | failed | cancelled`.
//! * Per tenant, at most `max_running_jobs_per_tenant` (default 5) run at once; the others
//!   wait in a FIFO queue (by job id, which is creation order).
//! * Persistence: table `jobs` (job id → [`JobRecord`] as JSON, so fields can be added with
//!   defaults) and `jobs_meta` (`next_id`, never reused; `format_version`, [`FORMAT_VERSION`]).
//!   A job is in the catalog before its id is returned; every state change is written when it
//!   happens; progress at most once per [`PROGRESS_PERSIST_INTERVAL`] (in memory it is always
//!   current). The last [`KEEP_FINISHED_PER_TENANT`] finished jobs of each tenant are kept.
//! * Restart ([`recover`]): a job that was running is queued again when its kind can resume
//!   (it redoes its work from the start; kinds are written so that this is safe), else it
//!   becomes failed with "the daemon restarted while the job was running". A running job whose
//!   cancellation had been asked becomes cancelled. Queued jobs stay queued, in order.
//! * Cancel: a queued job becomes cancelled at once; a running one is asked and ends cancelled
//!   at its next check. A job past its *point of no return* (a delete whose catalog commit is
//!   done) refuses the cancel with a clear error and runs to the end.
//! * Shutdown: running jobs are asked to stop at their next check; they stay `running` in the
//!   catalog and so are resumed (or failed) by the next start, exactly as after a crash.
//!
//! Workers are std threads, one per running job: the work is blocking store I/O.
//! What a job does is the [`JobExecutor`]'s business (the control plane); this module only
//! queues, runs, records and reports.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use evs_snapshot::{BlockStore, StoreError};
use parking_lot::{Condvar, Mutex};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

/// Job id → [`JobRecord`] as JSON.
const JOBS: TableDefinition<u64, &[u8]> = TableDefinition::new("jobs");
/// `next_id`, `format_version`.
const JOBS_META: TableDefinition<&str, u64> = TableDefinition::new("jobs_meta");
const KEY_NEXT_ID: &str = "next_id";
const KEY_FORMAT: &str = "format_version";
/// Version of the `jobs` table's records. 1: this layout.
pub const FORMAT_VERSION: u64 = 1;

/// Default of `max_running_jobs_per_tenant`.
pub const DEFAULT_MAX_RUNNING_PER_TENANT: usize = 5;
/// Finished jobs kept per tenant; older ones are dropped from the catalog.
pub const KEEP_FINISHED_PER_TENANT: usize = 1000;
/// Progress is written to the catalog at most this often per job.
pub const PROGRESS_PERSIST_INTERVAL: Duration = Duration::from_secs(1);
/// The error of a job that was running when the daemon stopped and cannot resume.
pub const RESTART_ERROR: &str = "the daemon restarted while the job was running";

/// How jobs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobOptions {
    /// Jobs of one tenant running at once (at least 1).
    pub max_running_per_tenant: usize,
    /// Pace of a delete job's data destruction, bytes per second; None: as fast as the
    /// filesystem goes.
    pub delete_bytes_per_second: Option<u64>,
}

impl Default for JobOptions {
    fn default() -> Self {
        JobOptions { max_running_per_tenant: DEFAULT_MAX_RUNNING_PER_TENANT, delete_bytes_per_second: None }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 5] =
        [JobState::Queued, JobState::Running, JobState::Succeeded, JobState::Failed, JobState::Cancelled];

    pub fn is_finished(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }

    pub fn name(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a job does, with everything needed to run it again after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum JobKind {
    /// Remove a volume (and its snapshots) from the catalog, then destroy its data.
    DeleteVolume { volume_id: u64, name: String },
    /// Back up a volume (incremental unless `full` or no usable base).
    Backup {
        volume_id: u64,
        volume: String,
        backup_id: String,
        #[serde(default)]
        full: bool,
        #[serde(default)]
        label: String,
        /// The policy that queued it (retention runs after it).
        #[serde(default)]
        policy: Option<String>,
    },
    /// Back up every volume of a server at one instant.
    ServerBackup {
        server: String,
        volume_ids: Vec<u64>,
        backup_id: String,
        #[serde(default)]
        label: String,
        #[serde(default)]
        policy: Option<String>,
    },
    /// Restore a backup (or a server backup) to new volumes or in place.
    Restore {
        backup_id: String,
        #[serde(default)]
        to: String,
        #[serde(default)]
        in_place: bool,
        #[serde(default)]
        tier: String,
        /// The new volume's size (`volume create --from-backup --size`); 0 = the backup's.
        #[serde(default)]
        size: u64,
    },
    /// Delete a backup (or a server backup and its volume backups).
    DeleteBackup { backup_id: String },
    /// Re-read and check every chunk of a backup.
    VerifyBackup { backup_id: String },
    /// Remove chunks no backup references.
    CollectGarbage,
    /// Wait for a newly protected server's initial sync (its first consistent point).
    DrProtect { group: String, server: String },
    /// Planned switchover of a DR group.
    DrSwitchover { group: String },
    /// Failover of a DR group to this (target) daemon.
    DrFailover { group: String },
    /// Replicate back to the old source after a failover.
    DrReprotect { group: String },
}

impl JobKind {
    /// The kind as the API and the CLI name it.
    pub fn name(&self) -> &'static str {
        match self {
            JobKind::DeleteVolume { .. } => "delete-volume",
            JobKind::Backup { .. } => "backup",
            JobKind::ServerBackup { .. } => "server-backup",
            JobKind::Restore { .. } => "restore",
            JobKind::DeleteBackup { .. } => "delete-backup",
            JobKind::VerifyBackup { .. } => "verify-backup",
            JobKind::CollectGarbage => "gc",
            JobKind::DrProtect { .. } => "dr-protect",
            JobKind::DrSwitchover { .. } => "dr-switchover",
            JobKind::DrFailover { .. } => "dr-failover",
            JobKind::DrReprotect { .. } => "dr-reprotect",
        }
    }

    /// What the job works on, for people: `volume db`.
    pub fn target(&self) -> String {
        match self {
            JobKind::DeleteVolume { name, .. } => format!("volume {name}"),
            JobKind::Backup { volume, backup_id, .. } => format!("volume {volume} (backup {backup_id})"),
            JobKind::ServerBackup { server, backup_id, .. } => format!("server {server} (backup {backup_id})"),
            JobKind::Restore { backup_id, to, in_place, .. } if *in_place || to.is_empty() => {
                format!("backup {backup_id} (in place)")
            }
            JobKind::Restore { backup_id, to, .. } => format!("backup {backup_id} to {to}"),
            JobKind::DeleteBackup { backup_id } | JobKind::VerifyBackup { backup_id } => format!("backup {backup_id}"),
            JobKind::CollectGarbage => "the backup store".to_string(),
            JobKind::DrProtect { group, server } => format!("DR group {group}, server {server}"),
            JobKind::DrSwitchover { group } | JobKind::DrFailover { group } | JobKind::DrReprotect { group } => {
                format!("DR group {group}")
            }
        }
    }

    /// Whether a job of this kind that a restart interrupted may simply run again. A delete
    /// may: before its catalog commit nothing changed; after it the volume is gone and the
    /// start-up sweep has removed its files, which the job then finds.
    /// Backup jobs may too: a backup's hidden snapshot is found again by name and nothing of
    /// it is visible before its manifest; a restore finds its half-written volume and writes
    /// it again; deletes, verify and gc are idempotent.
    pub fn resumable(&self) -> bool {
        match self {
            JobKind::DeleteVolume { .. }
            | JobKind::DrProtect { .. }
            | JobKind::Backup { .. }
            | JobKind::ServerBackup { .. }
            | JobKind::Restore { .. }
            | JobKind::DeleteBackup { .. }
            | JobKind::VerifyBackup { .. }
            | JobKind::CollectGarbage => true,
            // A role change cut off is not redone blindly: the operator looks at `dr status`
            // and runs it again (each step checks where the group stands).
            JobKind::DrSwitchover { .. } | JobKind::DrFailover { .. } | JobKind::DrReprotect { .. } => false,
        }
    }

    /// The volume a delete job removes.
    pub fn deletes_volume(&self) -> Option<u64> {
        match self {
            JobKind::DeleteVolume { volume_id, .. } => Some(*volume_id),
            _ => None,
        }
    }

    /// The volumes a backup job reads (one, or a server's).
    pub fn backs_up_volume(&self, id: u64) -> bool {
        match self {
            JobKind::Backup { volume_id, .. } => *volume_id == id,
            JobKind::ServerBackup { volume_ids, .. } => volume_ids.contains(&id),
            _ => false,
        }
    }
}

/// One job as the catalog keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: u64,
    pub tenant: String,
    pub kind: JobKind,
    /// `volume db`.
    pub target: String,
    pub state: JobState,
    #[serde(default)]
    pub bytes_done: u64,
    /// 0 while unknown.
    #[serde(default)]
    pub bytes_total: u64,
    /// Why it failed.
    #[serde(default)]
    pub error: Option<String>,
    /// Events worth telling (resumed after a restart, what a cancel found, ...).
    #[serde(default)]
    pub notes: Vec<String>,
    /// Unix seconds.
    pub created: u64,
    #[serde(default)]
    pub started: Option<u64>,
    #[serde(default)]
    pub finished: Option<u64>,
    #[serde(default)]
    pub cancel_requested: bool,
}

/// How a job body ends when it does not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// Stopped at a check after a cancel request.
    #[error("cancelled")]
    Cancelled,
    /// Stopped because the daemon is shutting down; the job is resumed (or failed) at the
    /// next start.
    #[error("interrupted by the daemon's shutdown")]
    Interrupted,
    /// The job failed; the text is its error.
    #[error("{0}")]
    Failed(String),
}

/// Errors of the job manager's calls.
#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    #[error("job {0} not found")]
    NotFound(u64),
    #[error("job {id} already {state}; only a queued or running job can be cancelled")]
    Finished { id: u64, state: JobState },
    #[error("job {id} is past its point of no return ({what}); it cannot be cancelled and runs to the end")]
    PastPointOfNoReturn { id: u64, what: String },
    #[error("the daemon is shutting down; no new jobs are accepted")]
    ShuttingDown,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Runs the jobs (the control plane implements it).
pub trait JobExecutor: Send + Sync {
    /// Does the work of `job`, reporting through `ctx`. A body must be safe to run again from
    /// the start after an interruption if its kind is [`JobKind::resumable`].
    fn run(&self, job: &JobRecord, ctx: &JobContext) -> Result<(), JobError>;
}

/// What [`JobManager::open`] found, for the start-up log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub queued: usize,
    pub resumed: usize,
    pub failed: usize,
    pub cancelled: usize,
}

/// What a restart does to a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    Unchanged,
    Resumed,
    Failed,
    Cancelled,
}

/// The restart rule for one job record (see the module doc). Pure.
pub fn recover(rec: &mut JobRecord, resumable: bool, now: u64) -> Recovery {
    if rec.state != JobState::Running {
        return Recovery::Unchanged;
    }
    if rec.cancel_requested {
        // A job that was asked to cancel had not passed its point of no return (a cancel is
        // refused past it, and the point refuses a job asked to cancel).
        rec.state = JobState::Cancelled;
        rec.finished = Some(now);
        rec.notes.push("cancelled at start-up: the daemon restarted before the job reached its next check".into());
        Recovery::Cancelled
    } else if resumable {
        rec.state = JobState::Queued;
        rec.bytes_done = 0;
        rec.started = None;
        rec.notes.push("resumed after a daemon restart interrupted it; it runs again from the start".into());
        Recovery::Resumed
    } else {
        rec.state = JobState::Failed;
        rec.finished = Some(now);
        rec.error = Some(RESTART_ERROR.into());
        Recovery::Failed
    }
}

/// The queued jobs that may start now: per tenant, from the front of its queue, as many as
/// its running count leaves room for under `limit`. Pure.
pub fn pick_startable(
    queues: &BTreeMap<String, VecDeque<u64>>,
    running: &BTreeMap<String, usize>,
    limit: usize,
) -> Vec<u64> {
    let mut out = Vec::new();
    for (tenant, q) in queues {
        let room = limit.saturating_sub(running.get(tenant).copied().unwrap_or(0));
        out.extend(q.iter().take(room).copied());
    }
    out
}

/// Of one tenant's finished jobs (ids), those beyond the newest `keep`. Pure.
pub fn to_prune(mut finished: Vec<u64>, keep: usize) -> Vec<u64> {
    finished.sort_unstable();
    let excess = finished.len().saturating_sub(keep);
    finished.truncate(excess);
    finished
}

/// How long to wait so that `done` bytes take at least `done / rate` seconds from the start
/// of the work (`elapsed` ago). Pure.
pub fn pace_delay(done: u64, rate: u64, elapsed: Duration) -> Duration {
    if rate == 0 {
        return Duration::ZERO;
    }
    let due = Duration::from_secs_f64(done as f64 / rate as f64);
    due.saturating_sub(elapsed)
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

struct Entry {
    rec: JobRecord,
    /// Set when the job passed its point of no return: what it did.
    point_of_no_return: Option<String>,
    last_persist: Instant,
}

#[derive(Default)]
struct State {
    jobs: BTreeMap<u64, Entry>,
    /// Queued job ids per tenant, oldest first.
    queues: BTreeMap<String, VecDeque<u64>>,
    running: BTreeMap<String, usize>,
    /// Queued and running jobs (what `find_active` looks through, on every volume listing).
    active: BTreeSet<u64>,
    executor: Option<Weak<dyn JobExecutor>>,
    shutting_down: bool,
    /// Worker threads alive.
    workers: usize,
}

/// The jobs of this daemon.
pub struct JobManager {
    store: Arc<BlockStore>,
    opts: JobOptions,
    /// Serialises catalog writes of job records, so the last write of a record is its latest
    /// state. Taken before `state`, never after.
    persist: Mutex<()>,
    state: Mutex<State>,
    /// Any change of a job (waits, paced sleeps that must wake at shutdown).
    changed: Condvar,
}

impl JobManager {
    /// Opens the job tables (creating them on first start), loads the jobs and applies the
    /// restart rule. Nothing runs until [`start`](Self::start).
    pub fn open(store: Arc<BlockStore>, opts: JobOptions) -> Result<(Arc<JobManager>, RecoveryReport), StoreError> {
        let opts = JobOptions { max_running_per_tenant: opts.max_running_per_tenant.max(1), ..opts };
        let db = store.catalog();
        let w = db.begin_write()?;
        {
            w.open_table(JOBS)?;
            let mut meta = w.open_table(JOBS_META)?;
            let format = meta.get(KEY_FORMAT)?.map(|v| v.value());
            match format {
                None => {
                    meta.insert(KEY_FORMAT, FORMAT_VERSION)?;
                    meta.insert(KEY_NEXT_ID, 1)?;
                }
                Some(FORMAT_VERSION) => {}
                Some(v) => {
                    return Err(StoreError::Corrupt {
                        what: "jobs table".into(),
                        why: format!("format version {v} is not supported by this build (expects {FORMAT_VERSION})"),
                    })
                }
            }
        }
        w.commit()?;

        let mut recs = Vec::new();
        {
            let r = db.begin_read()?;
            let t = r.open_table(JOBS)?;
            for row in t.iter()? {
                let (id, v) = row?;
                let rec: JobRecord = serde_json::from_slice(v.value())
                    .map_err(|e| StoreError::Corrupt { what: format!("job {}", id.value()), why: e.to_string() })?;
                recs.push(rec);
            }
        }
        let now = now_unix();
        let mut report = RecoveryReport::default();
        let mut changed = Vec::new();
        let mut st = State::default();
        for mut rec in recs {
            let resumable = rec.kind.resumable();
            let outcome = recover(&mut rec, resumable, now);
            match outcome {
                Recovery::Unchanged => {}
                Recovery::Resumed => report.resumed += 1,
                Recovery::Failed => report.failed += 1,
                Recovery::Cancelled => report.cancelled += 1,
            }
            if outcome != Recovery::Unchanged {
                changed.push(rec.id);
            }
            if rec.state == JobState::Queued {
                report.queued += 1;
                st.queues.entry(rec.tenant.clone()).or_default().push_back(rec.id);
                st.active.insert(rec.id);
            }
            st.jobs.insert(rec.id, Entry { rec, point_of_no_return: None, last_persist: Instant::now() });
        }
        // Records come in id order, so each queue is already FIFO.
        let tenants: Vec<String> = st.jobs.values().map(|e| e.rec.tenant.clone()).collect();
        let mgr = Arc::new(JobManager {
            store,
            opts,
            persist: Mutex::new(()),
            state: Mutex::new(st),
            changed: Condvar::new(),
        });
        if !changed.is_empty() {
            mgr.persist(&changed)?;
        }
        let mut seen = std::collections::BTreeSet::new();
        for t in tenants {
            if seen.insert(t.clone()) {
                mgr.prune(&t)?;
            }
        }
        Ok((mgr, report))
    }

    pub fn options(&self) -> &JobOptions {
        &self.opts
    }

    /// Starts running queued jobs with `executor`.
    pub fn start(self: &Arc<Self>, executor: Weak<dyn JobExecutor>) {
        self.state.lock().executor = Some(executor);
        self.schedule();
    }

    /// Queues a job for `tenant`; it is in the catalog when this returns.
    pub fn submit(self: &Arc<Self>, tenant: &str, kind: JobKind) -> Result<JobRecord, JobsError> {
        if self.state.lock().shutting_down {
            return Err(JobsError::ShuttingDown);
        }
        let rec = {
            let _p = self.persist.lock();
            let w = self.store.catalog().begin_write().map_err(StoreError::from)?;
            let rec = {
                let mut meta = w.open_table(JOBS_META).map_err(StoreError::from)?;
                let id = meta.get(KEY_NEXT_ID).map_err(StoreError::from)?.map(|v| v.value()).unwrap_or(1);
                meta.insert(KEY_NEXT_ID, id + 1).map_err(StoreError::from)?;
                let rec = JobRecord {
                    id,
                    tenant: tenant.to_string(),
                    target: kind.target(),
                    kind,
                    state: JobState::Queued,
                    bytes_done: 0,
                    bytes_total: 0,
                    error: None,
                    notes: Vec::new(),
                    created: now_unix(),
                    started: None,
                    finished: None,
                    cancel_requested: false,
                };
                let bytes = encode(&rec);
                w.open_table(JOBS).map_err(StoreError::from)?.insert(id, bytes.as_slice()).map_err(StoreError::from)?;
                rec
            };
            w.commit().map_err(StoreError::from)?;
            // Still under `persist`: ids enter the queue in the order they were allocated.
            let mut st = self.state.lock();
            st.queues.entry(rec.tenant.clone()).or_default().push_back(rec.id);
            st.active.insert(rec.id);
            st.jobs.insert(rec.id, Entry { rec: rec.clone(), point_of_no_return: None, last_persist: Instant::now() });
            rec
        };
        tracing::info!(job = rec.id, tenant, kind = rec.kind.name(), target = %rec.target, "job queued");
        self.schedule();
        Ok(self.get(tenant, rec.id).unwrap_or(rec))
    }

    /// Job `id` of `tenant` (another tenant's job is not found).
    pub fn get(&self, tenant: &str, id: u64) -> Result<JobRecord, JobsError> {
        match self.state.lock().jobs.get(&id) {
            Some(e) if e.rec.tenant == tenant => Ok(e.rec.clone()),
            _ => Err(JobsError::NotFound(id)),
        }
    }

    /// The jobs of `tenant`, oldest first.
    pub fn list(&self, tenant: &str) -> Vec<JobRecord> {
        self.state.lock().jobs.values().filter(|e| e.rec.tenant == tenant).map(|e| e.rec.clone()).collect()
    }

    /// The first queued or running job whose kind matches.
    pub fn find_active(&self, pred: impl Fn(&JobKind) -> bool) -> Option<JobRecord> {
        let st = self.state.lock();
        st.active.iter().filter_map(|id| st.jobs.get(id)).find(|e| pred(&e.rec.kind)).map(|e| e.rec.clone())
    }

    /// Jobs per state, every state listed (finished ones: those still kept). For metrics.
    pub fn counts_by_state(&self) -> Vec<(JobState, u64)> {
        let st = self.state.lock();
        JobState::ALL.iter().map(|s| (*s, st.jobs.values().filter(|e| e.rec.state == *s).count() as u64)).collect()
    }

    /// Cancels job `id` of `tenant`: a queued job at once, a running one at its next check.
    /// Cancelling a cancelled job is a no-op.
    pub fn cancel(&self, tenant: &str, id: u64) -> Result<JobRecord, JobsError> {
        let rec = {
            let _p = self.persist.lock();
            let rec = {
                let mut st = self.state.lock();
                let st = &mut *st;
                let e = match st.jobs.get_mut(&id) {
                    Some(e) if e.rec.tenant == tenant => e,
                    _ => return Err(JobsError::NotFound(id)),
                };
                match e.rec.state {
                    JobState::Cancelled => return Ok(e.rec.clone()),
                    JobState::Succeeded | JobState::Failed => {
                        return Err(JobsError::Finished { id, state: e.rec.state })
                    }
                    JobState::Running => {
                        if let Some(what) = &e.point_of_no_return {
                            return Err(JobsError::PastPointOfNoReturn { id, what: what.clone() });
                        }
                        e.rec.cancel_requested = true;
                    }
                    JobState::Queued => {
                        e.rec.cancel_requested = true;
                        e.rec.state = JobState::Cancelled;
                        e.rec.finished = Some(now_unix());
                        e.rec.notes.push("cancelled while queued: it never started".into());
                        if let Some(q) = st.queues.get_mut(tenant) {
                            q.retain(|j| *j != id);
                        }
                        st.active.remove(&id);
                    }
                }
                e.rec.clone()
            };
            self.write_records(&[id])?;
            rec
        };
        tracing::info!(job = id, tenant, state = %rec.state, "job cancel requested");
        self.changed.notify_all();
        if rec.state == JobState::Cancelled {
            self.prune(tenant)?;
        }
        Ok(rec)
    }

    /// Waits up to `timeout` for job `id` to finish; returns its record then, or None.
    pub fn wait(&self, id: u64, timeout: Duration) -> Option<JobRecord> {
        let deadline = Instant::now() + timeout;
        let mut st = self.state.lock();
        loop {
            if let Some(e) = st.jobs.get(&id) {
                if e.rec.state.is_finished() {
                    return Some(e.rec.clone());
                }
            }
            if self.changed.wait_until(&mut st, deadline).timed_out() {
                return None;
            }
        }
    }

    /// Asks running jobs to stop at their next check, starts no new ones, and waits up to
    /// `timeout` for their threads. Returns how many were still running then.
    pub fn shutdown(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let mut st = self.state.lock();
        st.shutting_down = true;
        self.changed.notify_all();
        while st.workers > 0 {
            if self.changed.wait_until(&mut st, deadline).timed_out() {
                break;
            }
        }
        st.workers
    }

    /// Starts what may start.
    fn schedule(self: &Arc<Self>) {
        let started: Vec<u64> = {
            let mut st = self.state.lock();
            if st.shutting_down || st.executor.is_none() {
                return;
            }
            let picks = pick_startable(&st.queues, &st.running, self.opts.max_running_per_tenant);
            let st = &mut *st;
            let mut started = Vec::with_capacity(picks.len());
            for id in picks {
                let Some(e) = st.jobs.get_mut(&id) else { continue };
                let tenant = e.rec.tenant.clone();
                if let Some(q) = st.queues.get_mut(&tenant) {
                    q.retain(|j| *j != id);
                }
                e.rec.state = JobState::Running;
                e.rec.started = Some(now_unix());
                *st.running.entry(tenant).or_default() += 1;
                st.workers += 1;
                started.push(id);
            }
            started
        };
        for id in started {
            let me = self.clone();
            if let Err(err) = std::thread::Builder::new().name(format!("evs-job-{id}")).spawn(move || me.work(id)) {
                tracing::error!(job = id, error = %err, "cannot start a job thread");
                self.finish(id, Err(JobError::Failed(format!("cannot start a worker thread: {err}"))));
            }
        }
    }

    /// A worker thread: records the start, runs the body, records the end.
    fn work(self: Arc<Self>, id: u64) {
        if let Err(e) = self.persist(&[id]) {
            tracing::warn!(job = id, error = %e, "cannot record the job's start in the catalog");
        }
        let (rec, exec) = {
            let st = self.state.lock();
            let rec = st.jobs.get(&id).map(|e| e.rec.clone());
            (rec, st.executor.as_ref().and_then(Weak::upgrade))
        };
        let Some(rec) = rec else {
            // Cannot happen (running jobs are never pruned); keep the counts right anyway.
            return self.finish(id, Err(JobError::Failed("internal error: the job vanished".into())));
        };
        tracing::info!(job = id, kind = rec.kind.name(), target = %rec.target, "job started");
        let ctx = JobContext { mgr: self.clone(), id };
        let result = match exec {
            None => Err(JobError::Failed("internal error: the control plane is gone".into())),
            Some(exec) => std::panic::catch_unwind(AssertUnwindSafe(|| exec.run(&rec, &ctx))).unwrap_or_else(|p| {
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Err(JobError::Failed(format!("internal error: the job panicked: {msg}")))
            }),
        };
        self.finish(id, result);
    }

    /// Records the end of a running job and starts what may start.
    fn finish(self: &Arc<Self>, id: u64, result: Result<(), JobError>) {
        let interrupted = result == Err(JobError::Interrupted);
        let tenant = {
            let mut st = self.state.lock();
            let st = &mut *st;
            let Some(e) = st.jobs.get_mut(&id) else {
                st.workers = st.workers.saturating_sub(1);
                self.changed.notify_all();
                return;
            };
            let tenant = e.rec.tenant.clone();
            match &result {
                Ok(()) => {
                    e.rec.state = JobState::Succeeded;
                    e.rec.bytes_done = e.rec.bytes_done.max(e.rec.bytes_total);
                    e.rec.bytes_total = e.rec.bytes_done;
                }
                Err(JobError::Cancelled) => e.rec.state = JobState::Cancelled,
                Err(JobError::Failed(msg)) => {
                    e.rec.state = JobState::Failed;
                    e.rec.error = Some(msg.clone());
                }
                // Stays running in the catalog: the next start resumes it.
                Err(JobError::Interrupted) => {}
            }
            if !interrupted {
                e.rec.finished = Some(now_unix());
                st.active.remove(&id);
            }
            if let Some(n) = st.running.get_mut(&tenant) {
                *n = n.saturating_sub(1);
            }
            tracing::info!(job = id, state = %e.rec.state, error = e.rec.error.as_deref().unwrap_or(""), "job ended");
            tenant
        };
        if !interrupted {
            if let Err(e) = self.persist(&[id]) {
                tracing::error!(job = id, error = %e, "cannot record the job's end in the catalog");
            }
            if let Err(e) = self.prune(&tenant) {
                tracing::warn!(error = %e, "cannot drop old finished jobs");
            }
        }
        {
            let mut st = self.state.lock();
            st.workers = st.workers.saturating_sub(1);
        }
        self.changed.notify_all();
        self.schedule();
    }

    /// Drops `tenant`'s finished jobs beyond the newest [`KEEP_FINISHED_PER_TENANT`].
    fn prune(&self, tenant: &str) -> Result<(), StoreError> {
        let _p = self.persist.lock();
        let doomed = {
            let mut st = self.state.lock();
            let finished: Vec<u64> = st
                .jobs
                .values()
                .filter(|e| e.rec.tenant == tenant && e.rec.state.is_finished())
                .map(|e| e.rec.id)
                .collect();
            let doomed = to_prune(finished, KEEP_FINISHED_PER_TENANT);
            for id in &doomed {
                st.jobs.remove(id);
            }
            doomed
        };
        if doomed.is_empty() {
            return Ok(());
        }
        self.write_records(&doomed)
    }

    /// Writes the current in-memory state of `ids` to the catalog.
    fn persist(&self, ids: &[u64]) -> Result<(), StoreError> {
        let _p = self.persist.lock();
        self.write_records(ids)
    }

    /// [`persist`](Self::persist) with the persist lock held by the caller. A record no longer
    /// in memory (pruned) is removed from the catalog.
    fn write_records(&self, ids: &[u64]) -> Result<(), StoreError> {
        let rows: Vec<(u64, Option<Vec<u8>>)> = {
            let mut st = self.state.lock();
            ids.iter()
                .map(|id| {
                    let bytes = st.jobs.get_mut(id).map(|e| {
                        e.last_persist = Instant::now();
                        encode(&e.rec)
                    });
                    (*id, bytes)
                })
                .collect()
        };
        let w = self.store.catalog().begin_write()?;
        {
            let mut t = w.open_table(JOBS)?;
            for (id, bytes) in &rows {
                match bytes {
                    Some(b) => {
                        t.insert(*id, b.as_slice())?;
                    }
                    None => {
                        t.remove(*id)?;
                    }
                }
            }
        }
        w.commit()?;
        Ok(())
    }

    /// Runs `f` on the job's in-memory record; persists it when `persist_now` says so.
    fn update(&self, id: u64, f: impl FnOnce(&mut Entry) -> bool) {
        let persist_now = {
            let mut st = self.state.lock();
            match st.jobs.get_mut(&id) {
                Some(e) => f(e),
                None => false,
            }
        };
        if persist_now {
            if let Err(e) = self.persist(&[id]) {
                tracing::warn!(job = id, error = %e, "cannot record the job's progress in the catalog");
            }
        }
    }
}

fn encode(rec: &JobRecord) -> Vec<u8> {
    serde_json::to_vec(rec).expect("job records serialise")
}

/// What a job body reports through and asks of.
pub struct JobContext {
    mgr: Arc<JobManager>,
    id: u64,
}

impl JobContext {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The options jobs run with.
    pub fn options(&self) -> &JobOptions {
        &self.mgr.opts
    }

    /// Sets the bytes the job has to process.
    pub fn set_total(&self, bytes: u64) {
        self.mgr.update(self.id, |e| {
            e.rec.bytes_total = bytes;
            true
        });
    }

    /// Adds processed bytes (written to the catalog at most once a second).
    pub fn add_done(&self, bytes: u64) {
        self.mgr.update(self.id, |e| {
            e.rec.bytes_done = e.rec.bytes_done.saturating_add(bytes);
            e.last_persist.elapsed() >= PROGRESS_PERSIST_INTERVAL
        });
        self.mgr.changed.notify_all();
    }

    /// Records a note on the job (written with its next change).
    pub fn note(&self, text: impl Into<String>) {
        let text = text.into();
        self.mgr.update(self.id, |e| {
            e.rec.notes.push(text);
            false
        });
    }

    pub fn is_cancelled(&self) -> bool {
        self.mgr.state.lock().jobs.get(&self.id).is_some_and(|e| e.rec.cancel_requested)
    }

    /// Whether the daemon is shutting down (the job should stop at its next check).
    pub fn stopping(&self) -> bool {
        self.mgr.state.lock().shutting_down
    }

    /// Err when the job should stop: cancelled, or the daemon is shutting down.
    pub fn check_cancelled(&self) -> Result<(), JobError> {
        let st = self.mgr.state.lock();
        if st.jobs.get(&self.id).is_some_and(|e| e.rec.cancel_requested) {
            return Err(JobError::Cancelled);
        }
        if st.shutting_down {
            return Err(JobError::Interrupted);
        }
        Ok(())
    }

    /// Declares that the job is about to do what cannot be undone (`what`, for the error a
    /// later cancel gets). Fails instead if a cancel or the shutdown came first: from here on
    /// a cancel is refused, so there is no moment where both could succeed.
    pub fn point_of_no_return(&self, what: &str) -> Result<(), JobError> {
        let mut st = self.mgr.state.lock();
        let shutting_down = st.shutting_down;
        let Some(e) = st.jobs.get_mut(&self.id) else { return Err(JobError::Interrupted) };
        if e.rec.cancel_requested {
            return Err(JobError::Cancelled);
        }
        if shutting_down {
            return Err(JobError::Interrupted);
        }
        e.point_of_no_return = Some(what.to_string());
        Ok(())
    }

    /// Sleeps for `d`, waking early at shutdown. False if the daemon is shutting down.
    pub fn sleep(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        let mut st = self.mgr.state.lock();
        while !st.shutting_down {
            if self.mgr.changed.wait_until(&mut st, deadline).timed_out() {
                return !st.shutting_down;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use evs_snapshot::{EngineKind, StoreOptions};

    fn rec(id: u64, state: JobState) -> JobRecord {
        JobRecord {
            id,
            tenant: "t".into(),
            kind: JobKind::DeleteVolume { volume_id: 9, name: "db".into() },
            target: "volume db".into(),
            state,
            bytes_done: 7,
            bytes_total: 10,
            error: None,
            notes: Vec::new(),
            created: 1,
            started: Some(2),
            finished: None,
            cancel_requested: false,
        }
    }

    #[test]
    fn restart_rule() {
        let mut r = rec(1, JobState::Running);
        assert_eq!(recover(&mut r, true, 50), Recovery::Resumed);
        assert_eq!((r.state, r.bytes_done, r.started), (JobState::Queued, 0, None));
        assert!(r.notes[0].contains("resumed"), "{:?}", r.notes);

        let mut r = rec(1, JobState::Running);
        assert_eq!(recover(&mut r, false, 50), Recovery::Failed);
        assert_eq!((r.state, r.finished), (JobState::Failed, Some(50)));
        assert_eq!(r.error.as_deref(), Some(RESTART_ERROR));

        let mut r = rec(1, JobState::Running);
        r.cancel_requested = true;
        assert_eq!(recover(&mut r, true, 50), Recovery::Cancelled);
        assert_eq!(r.state, JobState::Cancelled);

        for s in [JobState::Queued, JobState::Succeeded, JobState::Failed, JobState::Cancelled] {
            let mut r = rec(1, s);
            assert_eq!(recover(&mut r, true, 50), Recovery::Unchanged);
            assert_eq!(r, rec(1, s));
        }
    }

    #[test]
    fn picking_respects_the_limit_per_tenant_in_fifo_order() {
        let mut queues = BTreeMap::new();
        queues.insert("a".to_string(), VecDeque::from([3, 4, 7, 8]));
        queues.insert("b".to_string(), VecDeque::from([5, 6]));
        let mut running = BTreeMap::new();
        running.insert("a".to_string(), 3usize);
        assert_eq!(pick_startable(&queues, &running, 5), vec![3, 4, 5, 6]);
        running.insert("a".to_string(), 5);
        assert_eq!(pick_startable(&queues, &running, 5), vec![5, 6]);
        running.insert("a".to_string(), 9); // the limit was lowered across a restart
        running.insert("b".to_string(), 1);
        assert_eq!(pick_startable(&queues, &running, 2), vec![5]);
        assert!(pick_startable(&BTreeMap::new(), &running, 5).is_empty());
    }

    #[test]
    fn pruning_keeps_the_newest() {
        assert_eq!(to_prune(vec![5, 1, 9, 3], 2), vec![1, 3]);
        assert!(to_prune(vec![1, 2], 2).is_empty());
        assert!(to_prune(Vec::new(), 0).is_empty());
    }

    #[test]
    fn pacing() {
        assert_eq!(pace_delay(10 << 20, 10 << 20, Duration::ZERO), Duration::from_secs(1));
        assert_eq!(pace_delay(10 << 20, 10 << 20, Duration::from_millis(400)), Duration::from_millis(600));
        assert_eq!(pace_delay(10 << 20, 10 << 20, Duration::from_secs(2)), Duration::ZERO);
        assert_eq!(pace_delay(5, 0, Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn records_are_json_with_defaults_for_new_fields() {
        let r = rec(4, JobState::Queued);
        let back: JobRecord = serde_json::from_slice(&encode(&r)).unwrap();
        assert_eq!(back, r);
        let minimal = r#"{"id":1,"tenant":"t","kind":{"type":"delete_volume","volume_id":3,"name":"v"},
            "target":"volume v","state":"queued","created":5}"#;
        let m: JobRecord = serde_json::from_str(minimal).unwrap();
        assert_eq!((m.bytes_done, m.notes.len(), m.cancel_requested), (0, 0, false));
    }

    /// Jobs that run until the test opens their gate; records what ran when.
    #[derive(Default)]
    struct Gates {
        open: Mutex<BTreeSet<u64>>,
        fail: Mutex<BTreeSet<u64>>,
        started: Mutex<Vec<u64>>,
        running: Mutex<BTreeMap<String, usize>>,
        max_running: Mutex<BTreeMap<String, usize>>,
        /// Jobs that pass their point of no return first.
        no_return: Mutex<BTreeSet<u64>>,
        panic: Mutex<BTreeSet<u64>>,
    }

    impl JobExecutor for Gates {
        fn run(&self, job: &JobRecord, ctx: &JobContext) -> Result<(), JobError> {
            self.started.lock().push(job.id);
            {
                let mut r = self.running.lock();
                let n = r.entry(job.tenant.clone()).or_default();
                *n += 1;
                let mut m = self.max_running.lock();
                let mx = m.entry(job.tenant.clone()).or_default();
                *mx = (*mx).max(*n);
            }
            let res = (|| {
                if self.panic.lock().contains(&job.id) {
                    panic!("boom");
                }
                if self.no_return.lock().contains(&job.id) {
                    ctx.point_of_no_return("the test committed")?;
                }
                ctx.set_total(100);
                while !self.open.lock().contains(&job.id) {
                    if !self.no_return.lock().contains(&job.id) {
                        ctx.check_cancelled()?;
                    } else if ctx.stopping() {
                        return Err(JobError::Interrupted);
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                ctx.add_done(60);
                if self.fail.lock().contains(&job.id) {
                    return Err(JobError::Failed("the test said so".into()));
                }
                Ok(())
            })();
            *self.running.lock().get_mut(&job.tenant).unwrap() -= 1;
            res
        }
    }

    fn store(dir: &std::path::Path) -> Arc<BlockStore> {
        let opts = StoreOptions { engine: EngineKind::Portable, direct_writes: false, ..Default::default() };
        BlockStore::open(dir, opts).unwrap()
    }

    fn kind(n: u64) -> JobKind {
        JobKind::DeleteVolume { volume_id: n, name: format!("v{n}") }
    }

    /// A started manager; the manager holds its executor weakly, so the caller keeps the
    /// returned handle alive.
    fn manager(store: &Arc<BlockStore>, limit: usize, gates: &Arc<Gates>) -> (Arc<JobManager>, Arc<dyn JobExecutor>) {
        let opts = JobOptions { max_running_per_tenant: limit, delete_bytes_per_second: None };
        let (m, _) = JobManager::open(store.clone(), opts).unwrap();
        let exec: Arc<dyn JobExecutor> = gates.clone();
        m.start(Arc::downgrade(&exec));
        (m, exec)
    }

    fn until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn states(m: &JobManager, tenant: &str) -> Vec<JobState> {
        m.list(tenant).iter().map(|r| r.state).collect()
    }

    #[test]
    fn at_most_the_limit_runs_per_tenant_and_the_rest_start_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let gates = Arc::new(Gates::default());
        let (m, _exec) = manager(&store, 5, &gates);
        let a: Vec<u64> = (0..8).map(|i| m.submit("a", kind(i)).unwrap().id).collect();
        let b: Vec<u64> = (0..2).map(|i| m.submit("b", kind(i)).unwrap().id).collect();
        until("7 jobs started", || gates.started.lock().len() == 7);
        use JobState::*;
        assert_eq!(states(&m, "a"), [Running, Running, Running, Running, Running, Queued, Queued, Queued]);
        assert_eq!(states(&m, "b"), [Running, Running], "another tenant's jobs do not wait for a's");
        assert_eq!(m.counts_by_state()[..2], [(Queued, 3), (Running, 7)]);
        let found = m.find_active(|k| k.deletes_volume() == Some(7)).expect("a's job on volume 7, queued");
        assert_eq!((found.id, found.tenant.as_str()), (a[7], "a"));
        assert!(m.find_active(|k| k.deletes_volume() == Some(99)).is_none());

        // Finishing a's jobs one at a time (not in order) starts its queued ones in FIFO order.
        for (i, id) in [a[3], a[0], a[6], a[1], a[2], a[4], a[5], a[7]].into_iter().enumerate() {
            gates.open.lock().insert(id);
            assert_eq!(m.wait(id, Duration::from_secs(20)).unwrap().state, Succeeded);
            let expect = (7 + i + 1).min(10);
            until("the next queued job to start", || gates.started.lock().len() == expect);
        }
        // The first five started at once, on five threads (in any order); the three that
        // waited started one by one, in submission order.
        let order_a: Vec<u64> = gates.started.lock().iter().copied().filter(|id| a.contains(id)).collect();
        assert_eq!(order_a[..5].iter().copied().collect::<BTreeSet<u64>>(), a[..5].iter().copied().collect());
        assert_eq!(order_a[5..], a[5..], "a's queued jobs started in submission order");
        assert_eq!(gates.max_running.lock()["a"], 5);
        for id in &b {
            gates.open.lock().insert(*id);
            m.wait(*id, Duration::from_secs(20)).unwrap();
        }
        for r in m.list("a") {
            assert_eq!((r.state, r.bytes_done, r.bytes_total), (Succeeded, 100, 100), "{r:?}");
            assert!(r.started.is_some() && r.finished.is_some());
        }
        assert_eq!(m.counts_by_state(), [(Queued, 0), (Running, 0), (Succeeded, 10), (Failed, 0), (Cancelled, 0)]);
        assert!(m.find_active(|_| true).is_none(), "no job is active any more");
    }

    #[test]
    fn cancel_fail_panic_and_tenant_scoping() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let gates = Arc::new(Gates::default());
        let (m, _exec) = manager(&store, 1, &gates);
        let j1 = m.submit("a", kind(1)).unwrap().id;
        let j2 = m.submit("a", kind(2)).unwrap().id;
        until("j1 running", || m.get("a", j1).unwrap().state == JobState::Running);

        // Another tenant sees nothing and cancels nothing.
        assert!(matches!(m.get("b", j1), Err(JobsError::NotFound(_))));
        assert!(matches!(m.cancel("b", j1), Err(JobsError::NotFound(_))));
        assert!(m.list("b").is_empty());
        assert!(matches!(m.get("a", 999), Err(JobsError::NotFound(999))));

        // A queued job is cancelled at once and never runs.
        let c = m.cancel("a", j2).unwrap();
        assert_eq!(c.state, JobState::Cancelled);
        assert!(c.finished.is_some());
        assert_eq!(m.cancel("a", j2).unwrap().state, JobState::Cancelled, "idempotent");
        // A running one ends cancelled at its next check.
        assert_eq!(m.cancel("a", j1).unwrap().state, JobState::Running);
        assert_eq!(m.wait(j1, Duration::from_secs(20)).unwrap().state, JobState::Cancelled);
        assert!(!gates.started.lock().contains(&j2));

        // Failures and panics carry their text; a finished job cannot be cancelled.
        let j3 = m.submit("a", kind(3)).unwrap().id;
        gates.fail.lock().insert(j3);
        gates.open.lock().insert(j3);
        let r = m.wait(j3, Duration::from_secs(20)).unwrap();
        assert_eq!((r.state, r.error.as_deref()), (JobState::Failed, Some("the test said so")));
        let e = m.cancel("a", j3).unwrap_err();
        assert!(matches!(e, JobsError::Finished { state: JobState::Failed, .. }), "{e}");
        gates.panic.lock().insert(j3 + 1);
        let j4 = m.submit("a", kind(4)).unwrap().id;
        let r = m.wait(j4, Duration::from_secs(20)).unwrap();
        assert_eq!(r.state, JobState::Failed);
        assert!(r.error.as_deref().unwrap().contains("panicked: boom"), "{r:?}");

        // Past its point of no return a job refuses the cancel and finishes.
        let j5 = j4 + 1;
        gates.no_return.lock().insert(j5);
        assert_eq!(m.submit("a", kind(5)).unwrap().id, j5);
        // (The total is set after the point.)
        until("j5 past its point of no return", || m.get("a", j5).unwrap().bytes_total == 100);
        let e = m.cancel("a", j5).unwrap_err().to_string();
        assert!(e.contains("point of no return") && e.contains("the test committed"), "{e}");
        gates.open.lock().insert(j5);
        assert_eq!(m.wait(j5, Duration::from_secs(20)).unwrap().state, JobState::Succeeded);
    }

    #[test]
    fn jobs_survive_a_restart_and_ids_are_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let gates = Arc::new(Gates::default());
        let (m, _exec) = manager(&store, 1, &gates);
        let done = m.submit("a", kind(1)).unwrap().id;
        gates.open.lock().insert(done);
        m.wait(done, Duration::from_secs(20)).unwrap();
        let running = m.submit("a", kind(2)).unwrap().id;
        let queued = m.submit("a", kind(3)).unwrap().id;
        until("the second job running", || m.get("a", running).unwrap().state == JobState::Running);
        assert_eq!(m.shutdown(Duration::from_secs(20)), 0, "the running job stopped at its next check");
        assert!(matches!(m.submit("a", kind(4)), Err(JobsError::ShuttingDown)));
        let before = m.get("a", done).unwrap();
        drop(m);

        // A new manager on the same catalog: the interrupted job runs again, first.
        let (m2, report) =
            JobManager::open(store.clone(), JobOptions { max_running_per_tenant: 1, ..Default::default() }).unwrap();
        assert_eq!(report, RecoveryReport { queued: 2, resumed: 1, failed: 0, cancelled: 0 });
        assert_eq!(m2.get("a", done).unwrap(), before, "finished jobs are kept as they were");
        let r = m2.get("a", running).unwrap();
        assert_eq!(r.state, JobState::Queued);
        assert!(r.notes.iter().any(|n| n.contains("resumed after a daemon restart")), "{r:?}");
        let gates2 = Arc::new(Gates::default());
        let exec: Arc<dyn JobExecutor> = gates2.clone();
        m2.start(Arc::downgrade(&exec));
        gates2.open.lock().extend([running, queued]);
        assert_eq!(m2.wait(running, Duration::from_secs(20)).unwrap().state, JobState::Succeeded);
        assert_eq!(m2.wait(queued, Duration::from_secs(20)).unwrap().state, JobState::Succeeded);
        assert_eq!(*gates2.started.lock(), [running, queued]);
        let next = m2.submit("a", kind(5)).unwrap().id;
        assert!(next > queued, "ids are never reused: {next} after {queued}");
        drop(exec);
    }
}
