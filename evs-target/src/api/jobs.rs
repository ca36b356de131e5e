//! The job half of the control API: `JobService` over the [`JobManager`], and what the jobs
//! do (the control plane is their [`JobExecutor`]).
//!
//! Volume delete is a job: `DeleteVolume` checks and queues it; while it is queued or running
//! the volume is *deleting* (listed so, and every change or export of it is refused with
//! FAILED_PRECONDITION); the job removes the volume from the catalog (its point of no
//! return), then destroys the data layer by layer with progress in bytes, paced by
//! `delete_bytes_per_second` when set.

use std::ops::ControlFlow;
use std::time::Instant;

use evs_proto::v1 as pb;
use evs_proto::v1::job_service_server::JobService;
use evs_snapshot::StoreError;
use tonic::{Request, Response, Status};

use super::{ApiError, ControlPlane, VolumeApi, VOLUME_TIERS};
use crate::jobs::{pace_delay, JobContext, JobError, JobExecutor, JobKind, JobRecord, JobState};

/// Destruction step without pacing: bounded, so one punch never holds the filesystem long.
const DESTROY_STEP: u64 = 1 << 30;
/// Smallest destruction step when paced.
const MIN_PACED_STEP: u64 = 1 << 20;

/// `Volume.state` of a volume with no delete job.
pub const VOLUME_AVAILABLE: &str = "available";
/// `Volume.state` while a delete job is queued or running.
pub const VOLUME_DELETING: &str = "deleting";
/// `Volume.state` while a restore job writes the volume.
pub const VOLUME_RESTORING: &str = "restoring";

/// The punch size for a pace of `rate` bytes per second: about four steps a second, so the
/// progress moves smoothly and the pacing sleeps stay short.
pub fn destroy_step(rate: Option<u64>) -> u64 {
    match rate {
        None => DESTROY_STEP,
        Some(r) => (r / 4).clamp(MIN_PACED_STEP, DESTROY_STEP),
    }
}

pub fn job_to_pb(r: &JobRecord) -> pb::Job {
    let state = match r.state {
        JobState::Queued => pb::JobState::Queued,
        JobState::Running => pb::JobState::Running,
        JobState::Succeeded => pb::JobState::Succeeded,
        JobState::Failed => pb::JobState::Failed,
        JobState::Cancelled => pb::JobState::Cancelled,
    };
    pb::Job {
        id: r.id,
        kind: r.kind.name().to_string(),
        target: r.target.clone(),
        state: state.into(),
        bytes_done: r.bytes_done,
        bytes_total: r.bytes_total,
        error: r.error.clone().unwrap_or_default(),
        notes: r.notes.clone(),
        created_unix: r.created,
        started_unix: r.started.unwrap_or(0),
        finished_unix: r.finished.unwrap_or(0),
        cancel_requested: r.cancel_requested,
    }
}

fn failed(what: &str, e: impl std::fmt::Display) -> JobError {
    JobError::Failed(format!("{what}: {e}"))
}

impl ControlPlane {
    /// The queued or running delete job of volume `id`, if any.
    pub fn delete_job_of(&self, id: u64) -> Option<JobRecord> {
        self.jobs.find_active(|k| k.deletes_volume() == Some(id))
    }

    /// `Volume.state` of volume `id`.
    pub(super) fn volume_state(&self, id: u64) -> &'static str {
        if self.delete_job_of(id).is_some() {
            VOLUME_DELETING
        } else if self.restoring_job(id).is_some() {
            VOLUME_RESTORING
        } else {
            VOLUME_AVAILABLE
        }
    }

    /// Refuses any change of a volume that is being deleted.
    pub(super) fn ensure_not_deleting(&self, name: &str, id: u64) -> Result<(), ApiError> {
        match self.delete_job_of(id) {
            Some(job) => Err(ApiError::BeingDeleted { name: name.to_string(), job: job.id }),
            None => Ok(()),
        }
    }

    pub fn list_jobs(&self, tenant: &str) -> Vec<JobRecord> {
        self.jobs.list(tenant)
    }

    pub fn get_job(&self, tenant: &str, id: u64) -> Result<JobRecord, ApiError> {
        Ok(self.jobs.get(tenant, id)?)
    }

    pub fn cancel_job(&self, tenant: &str, id: u64) -> Result<JobRecord, ApiError> {
        Ok(self.jobs.cancel(tenant, id)?)
    }

    /// The delete job's body. Safe to run again from the start: before the catalog commit
    /// nothing has changed; after it the volume is not found, and the files a restart cut
    /// off were removed by the store's start-up sweep.
    fn run_delete_volume(&self, id: u64, name: &str, ctx: &JobContext) -> Result<(), JobError> {
        ctx.check_cancelled()?;
        let removal = {
            let _g = self.mutations.lock();
            let snaps = match self.store.list_snapshots(id) {
                Ok(s) => s.into_iter().map(|s| s.id).collect::<Vec<_>>(),
                Err(e) => return Err(failed("cannot read the volume's snapshots", e)),
            };
            match self.store.volume_info(id) {
                Ok(_) => {}
                Err(StoreError::VolumeNotFound(_)) => {
                    ctx.note(
                        "the volume was already removed from the catalog: a restart interrupted this deletion \
                         after its catalog commit, and the start-up sweep removed the remaining files",
                    );
                    return Ok(());
                }
                Err(e) => return Err(failed("cannot read the volume's catalog record", e)),
            }
            // Attaching was refused since the job was queued; this only guards the catalog.
            let tokens = self.tokens_of(id).map_err(|e| failed("cannot read the attachments", e))?;
            if self.exports.is_attached(id) || !tokens.is_empty() {
                return Err(JobError::Failed(ApiError::Attached(name.to_string()).to_string()));
            }
            ctx.point_of_no_return("the volume was removed from the catalog")?;
            self.revoke_snapshot_attachments(&snaps).map_err(|e| failed("cannot revoke the snapshot exports", e))?;
            let removal = self.store.remove_volume(id).map_err(|e| failed("cannot remove the volume", e))?;
            // Gone with the volume (ids are not reused): a leftover row would only be noise.
            let tier = (|| -> Result<(), StoreError> {
                let w = self.store.catalog().begin_write()?;
                w.open_table(VOLUME_TIERS)?.remove(id)?;
                w.commit()?;
                Ok(())
            })();
            if let Err(e) = tier {
                tracing::warn!(volume = name, id, error = %e, "cannot remove the tier row of a deleted volume");
            }
            self.volume_io.remove(id);
            // Its backups stay in the store; its change tracking and policy bindings go.
            if let Err(e) = self.forget_volume_backups(id) {
                tracing::warn!(volume = name, id, error = %e, "cannot remove the backup records of a deleted volume");
            }
            removal
        };
        tracing::info!(volume = name, id, bytes = removal.bytes, job = ctx.id(), "volume removed; destroying its data");
        ctx.set_total(removal.bytes);
        let rate = ctx.options().delete_bytes_per_second;
        let started = Instant::now();
        let mut done = 0u64;
        let complete = self
            .store
            .destroy_removed(&removal, destroy_step(rate), |freed| {
                ctx.add_done(freed);
                done += freed;
                if let Some(rate) = rate {
                    let wait = pace_delay(done, rate, started.elapsed());
                    if !wait.is_zero() && !ctx.sleep(wait) {
                        return ControlFlow::Break(());
                    }
                }
                if ctx.stopping() {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })
            .map_err(|e| {
                failed("the volume is deleted, but destroying its data failed (the next start removes the rest)", e)
            })?;
        if !complete {
            return Err(JobError::Interrupted);
        }
        tracing::info!(volume = name, id, job = ctx.id(), "volume deleted");
        Ok(())
    }
}

impl JobExecutor for ControlPlane {
    fn run(&self, job: &JobRecord, ctx: &JobContext) -> Result<(), JobError> {
        match &job.kind {
            JobKind::DeleteVolume { volume_id, name } => self.run_delete_volume(*volume_id, name, ctx),
            JobKind::Backup { .. } => self.run_backup(job, ctx),
            JobKind::ServerBackup { .. } => self.run_server_backup(job, ctx),
            JobKind::Restore { .. } => self.run_restore(job, ctx),
            JobKind::DeleteBackup { .. } => self.run_delete_backup(job, ctx),
            JobKind::VerifyBackup { .. } => self.run_verify_backup(job, ctx),
            JobKind::CollectGarbage => self.run_gc(job, ctx),
            JobKind::DrProtect { .. } => self.run_dr_protect(job, ctx),
            JobKind::DrSwitchover { .. } => self.run_dr_switchover(job, ctx),
            JobKind::DrFailover { .. } => self.run_dr_failover(job, ctx),
            JobKind::DrReprotect { .. } => self.run_dr_reprotect(job, ctx),
        }
    }
}

#[tonic::async_trait]
impl JobService for VolumeApi {
    async fn list_jobs(&self, req: Request<pb::ListJobsRequest>) -> Result<Response<pb::ListJobsResponse>, Status> {
        let jobs = self.run(&req, "JobService/ListJobs", |cp, tenant| Ok(cp.list_jobs(tenant))).await?;
        Ok(Response::new(pb::ListJobsResponse { jobs: jobs.iter().map(job_to_pb).collect() }))
    }

    async fn get_job(&self, req: Request<pb::GetJobRequest>) -> Result<Response<pb::GetJobResponse>, Status> {
        let id = req.get_ref().id;
        let job = self.run(&req, "JobService/GetJob", move |cp, tenant| cp.get_job(tenant, id)).await?;
        Ok(Response::new(pb::GetJobResponse { job: Some(job_to_pb(&job)) }))
    }

    async fn cancel_job(&self, req: Request<pb::CancelJobRequest>) -> Result<Response<pb::CancelJobResponse>, Status> {
        let id = req.get_ref().id;
        let job = self
            .run_mut(&req, "JobService/CancelJob", format!("job {id}"), move |cp, tenant| cp.cancel_job(tenant, id))
            .await?;
        Ok(Response::new(pb::CancelJobResponse { job: Some(job_to_pb(&job)) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps() {
        assert_eq!(destroy_step(None), 1 << 30);
        assert_eq!(destroy_step(Some(64 << 20)), 16 << 20);
        assert_eq!(destroy_step(Some(1 << 20)), 1 << 20);
        assert_eq!(destroy_step(Some(1 << 40)), 1 << 30);
    }
}
