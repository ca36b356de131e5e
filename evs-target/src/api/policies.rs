//! Backup policies: `PolicyService`, and the scheduler that runs them.
//!
//! Catalog tables:
//! * `policies`: `"<tenant>/<name>"` → JSON `{"v":1,"schedule","retention","volumes":[ids],
//!   "servers":[names],"created","last_run","next_run"}`;
//! * `policy_bindings`: `"v/<volume id>"` or `"s/<tenant>/<server>"` → the policy's key: a
//!   volume or a server has at most one policy (CSBS: one policy per server).
//!
//! The scheduler ([`ControlPlane::run_due_policies`], every `scheduler_interval_seconds`)
//! queues, for each policy whose `next_run` has come, one backup job per bound volume and one
//! server backup job per bound server, then moves `next_run` to the schedule's next instant
//! (runs missed while the daemon was down are not made up: one run, then the schedule).
//! Retention runs when a policy's backup succeeds: the expired backups of that volume or
//! server (among those the policy took) are deleted, as jobs.

use std::time::{SystemTime, UNIX_EPOCH};

use evs_proto::v1 as pb;
use evs_proto::v1::policy_service_server::PolicyService;
use evs_snapshot::StoreError;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use super::jobs::job_to_pb;
use super::validate::{validate_policy_name, validate_server_name, validate_volume_name, ValidationError};
use super::{ApiError, ControlPlane, VolumeApi};
use crate::jobs::JobRecord;
use crate::policy::{expired, Retention, Schedule};

pub(super) const POLICIES: TableDefinition<&str, &[u8]> = TableDefinition::new("policies");
pub(super) const POLICY_BINDINGS: TableDefinition<&str, &str> = TableDefinition::new("policy_bindings");

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PolicyRecord {
    v: u32,
    schedule: String,
    retention: Retention,
    volumes: Vec<u64>,
    servers: Vec<String>,
    created: u64,
    last_run: u64,
    next_run: u64,
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn key(owner: &str, name: &str) -> String {
    format!("{owner}/{name}")
}

fn decode(bytes: &[u8]) -> Result<PolicyRecord, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt { what: "policy record".into(), why: e.to_string() })
}

/// The label of the backups a policy takes (retention only ever deletes those).
fn policy_label(policy: &str) -> String {
    format!("policy:{policy}")
}

fn retention_of(r: Option<pb::Retention>) -> Retention {
    let r = r.unwrap_or_default();
    Retention {
        keep_last: r.keep_last,
        keep_daily: r.keep_daily,
        keep_weekly: r.keep_weekly,
        keep_monthly: r.keep_monthly,
    }
}

impl ControlPlane {
    fn policy_record(&self, owner: &str, name: &str) -> Result<PolicyRecord, ApiError> {
        validate_policy_name(name)?;
        let r = self.store.catalog().begin_read().map_err(StoreError::from)?;
        let t = r.open_table(POLICIES).map_err(StoreError::from)?;
        match t.get(key(owner, name).as_str()).map_err(StoreError::from)? {
            Some(v) => Ok(decode(v.value())?),
            None => Err(ApiError::PolicyNotFound(name.to_string())),
        }
    }

    fn put_policy(&self, owner: &str, name: &str, rec: &PolicyRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(rec).map_err(|e| StoreError::Catalog(e.to_string()))?;
        let w = self.store.catalog().begin_write()?;
        w.open_table(POLICIES)?.insert(key(owner, name).as_str(), bytes.as_slice())?;
        w.commit()?;
        Ok(())
    }

    fn describe_policy(&self, name: &str, rec: &PolicyRecord) -> pb::Policy {
        let volumes = rec.volumes.iter().filter_map(|id| self.store.volume_info(*id).ok().map(|v| v.name)).collect();
        pb::Policy {
            name: name.to_string(),
            schedule: rec.schedule.clone(),
            retention: Some(pb::Retention {
                keep_last: rec.retention.keep_last,
                keep_daily: rec.retention.keep_daily,
                keep_weekly: rec.retention.keep_weekly,
                keep_monthly: rec.retention.keep_monthly,
            }),
            volumes,
            servers: rec.servers.clone(),
            created_unix: rec.created,
            next_run_unix: rec.next_run,
            last_run_unix: rec.last_run,
        }
    }

    pub fn create_policy(
        &self,
        owner: &str,
        name: &str,
        schedule: &str,
        retention: Retention,
    ) -> Result<pb::Policy, ApiError> {
        validate_policy_name(name)?;
        let s = Schedule::parse(schedule).map_err(|e| ValidationError::Policy(e.to_string()))?;
        retention.validate().map_err(|e| ValidationError::Policy(e.to_string()))?;
        let _g = self.mutations.lock();
        if self.policy_record(owner, name).is_ok() {
            return Err(ApiError::PolicyExists(name.to_string()));
        }
        let now = now_unix();
        let rec = PolicyRecord {
            v: 1,
            schedule: s.as_str().to_string(),
            retention,
            volumes: Vec::new(),
            servers: Vec::new(),
            created: now,
            last_run: 0,
            next_run: s.next_after(now).unwrap_or(u64::MAX),
        };
        self.put_policy(owner, name, &rec)?;
        tracing::info!(owner, policy = name, schedule, "policy created");
        Ok(self.describe_policy(name, &rec))
    }

    pub fn list_policies(&self, owner: &str) -> Result<Vec<pb::Policy>, ApiError> {
        Ok(self.policy_rows(Some(owner))?.iter().map(|(_, name, rec)| self.describe_policy(name, rec)).collect())
    }

    /// (tenant, name, record) of every policy (of `owner` only, when given).
    fn policy_rows(&self, owner: Option<&str>) -> Result<Vec<(String, String, PolicyRecord)>, StoreError> {
        let r = self.store.catalog().begin_read()?;
        let t = r.open_table(POLICIES)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            let Some((tenant, name)) = k.value().split_once('/') else { continue };
            if owner.is_some_and(|o| o != tenant) {
                continue;
            }
            out.push((tenant.to_string(), name.to_string(), decode(v.value())?));
        }
        Ok(out)
    }

    pub fn delete_policy(&self, owner: &str, name: &str) -> Result<(), ApiError> {
        let _g = self.mutations.lock();
        let rec = self.policy_record(owner, name)?;
        let w = self.store.catalog().begin_write().map_err(StoreError::from)?;
        {
            let mut b = w.open_table(POLICY_BINDINGS).map_err(StoreError::from)?;
            for v in &rec.volumes {
                b.remove(format!("v/{v}").as_str()).map_err(StoreError::from)?;
            }
            for s in &rec.servers {
                b.remove(format!("s/{owner}/{s}").as_str()).map_err(StoreError::from)?;
            }
            w.open_table(POLICIES)
                .map_err(StoreError::from)?
                .remove(key(owner, name).as_str())
                .map_err(StoreError::from)?;
        }
        w.commit().map_err(StoreError::from)?;
        tracing::info!(owner, policy = name, "policy deleted");
        Ok(())
    }

    /// The binding key of a volume or a server, checked to exist.
    fn binding_of(&self, owner: &str, volume: &str, server: &str) -> Result<(String, Option<u64>), ApiError> {
        match (volume.is_empty(), server.is_empty()) {
            (false, true) => {
                validate_volume_name(volume)?;
                let info = self.find_live(owner, volume)?;
                Ok((format!("v/{}", info.id), Some(info.id)))
            }
            (true, false) => {
                validate_server_name(server)?;
                self.find_server(owner, server)?;
                Ok((format!("s/{owner}/{server}"), None))
            }
            _ => Err(ValidationError::PolicyTarget.into()),
        }
    }

    pub fn bind_policy(&self, owner: &str, name: &str, volume: &str, server: &str) -> Result<pb::Policy, ApiError> {
        let _g = self.mutations.lock();
        let mut rec = self.policy_record(owner, name)?;
        let (bkey, vid) = self.binding_of(owner, volume, server)?;
        let pkey = key(owner, name);
        let w = self.store.catalog().begin_write().map_err(StoreError::from)?;
        {
            let mut b = w.open_table(POLICY_BINDINGS).map_err(StoreError::from)?;
            if let Some(other) = b.get(bkey.as_str()).map_err(StoreError::from)? {
                let other = other.value().split_once('/').map_or("", |(_, n)| n).to_string();
                if other != name {
                    let what = if vid.is_some() { format!("volume {volume}") } else { format!("server {server}") };
                    return Err(ApiError::PolicyBound { what, policy: other });
                }
            }
            b.insert(bkey.as_str(), pkey.as_str()).map_err(StoreError::from)?;
        }
        match vid {
            Some(id) if !rec.volumes.contains(&id) => rec.volumes.push(id),
            None if !rec.servers.iter().any(|s| s == server) => rec.servers.push(server.to_string()),
            _ => {}
        }
        let bytes = serde_json::to_vec(&rec).map_err(|e| StoreError::Catalog(e.to_string()))?;
        w.open_table(POLICIES)
            .map_err(StoreError::from)?
            .insert(pkey.as_str(), bytes.as_slice())
            .map_err(StoreError::from)?;
        w.commit().map_err(StoreError::from)?;
        tracing::info!(owner, policy = name, volume, server, "policy bound");
        Ok(self.describe_policy(name, &rec))
    }

    pub fn unbind_policy(&self, owner: &str, name: &str, volume: &str, server: &str) -> Result<pb::Policy, ApiError> {
        let _g = self.mutations.lock();
        let mut rec = self.policy_record(owner, name)?;
        let (bkey, vid) = match self.binding_of(owner, volume, server) {
            Ok(b) => b,
            // A deleted volume's binding goes with it; unbinding it again is not an error.
            Err(ApiError::VolumeNotFound(_)) => return Ok(self.describe_policy(name, &rec)),
            Err(e) => return Err(e),
        };
        match vid {
            Some(id) => rec.volumes.retain(|v| *v != id),
            None => rec.servers.retain(|s| s != server),
        }
        let w = self.store.catalog().begin_write().map_err(StoreError::from)?;
        {
            let mut b = w.open_table(POLICY_BINDINGS).map_err(StoreError::from)?;
            // Unbinding what another policy holds must not take it from that policy.
            if let Some(other) = b.get(bkey.as_str()).map_err(StoreError::from)? {
                let other = other.value().split_once('/').map_or("", |(_, n)| n).to_string();
                if other != name {
                    let what = if vid.is_some() { format!("volume {volume}") } else { format!("server {server}") };
                    return Err(ApiError::BoundElsewhere { what, policy: other, asked: name.to_string() });
                }
            }
            b.remove(bkey.as_str()).map_err(StoreError::from)?;
            drop(b);
            let bytes = serde_json::to_vec(&rec).map_err(|e| StoreError::Catalog(e.to_string()))?;
            w.open_table(POLICIES)
                .map_err(StoreError::from)?
                .insert(key(owner, name).as_str(), bytes.as_slice())
                .map_err(StoreError::from)?;
        }
        w.commit().map_err(StoreError::from)?;
        Ok(self.describe_policy(name, &rec))
    }

    /// Queues the policy's backups now; returns the jobs. A resource whose backup cannot be
    /// queued (a limit, a backup already running) is skipped with a warning, the rest go on.
    pub fn run_policy(&self, owner: &str, name: &str) -> Result<Vec<JobRecord>, ApiError> {
        let rec = self.policy_record(owner, name)?;
        let mut jobs = Vec::new();
        let mut errors = Vec::new();
        for id in &rec.volumes {
            let Ok(info) = self.store.volume_info(*id) else { continue };
            match self.create_backup(owner, &info.name, &policy_label(name), false, Some(name)) {
                Ok((j, _)) => jobs.push(j),
                Err(e) => errors.push(format!("volume {}: {e}", info.name)),
            }
        }
        for s in &rec.servers {
            match self.create_server_backup(owner, s, &policy_label(name), Some(name)) {
                Ok((j, _)) => jobs.push(j),
                Err(e) => errors.push(format!("server {s}: {e}")),
            }
        }
        for e in &errors {
            tracing::warn!(owner, policy = name, error = %e, "policy run skipped a resource");
        }
        let mut rec = rec;
        rec.last_run = now_unix();
        self.put_policy(owner, name, &rec)?;
        if jobs.is_empty() && !errors.is_empty() {
            return Err(ApiError::PolicyRun { policy: name.to_string(), errors: errors.join("; ") });
        }
        Ok(jobs)
    }

    /// Runs every policy whose time has come (the scheduler's tick). Returns how many ran.
    pub fn run_due_policies(&self, now: u64) -> usize {
        let rows = match self.policy_rows(None) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the policies");
                return 0;
            }
        };
        let mut ran = 0;
        for (tenant, name, rec) in rows {
            if rec.next_run > now {
                continue;
            }
            let next = Schedule::parse(&rec.schedule).ok().and_then(|s| s.next_after(now)).unwrap_or(u64::MAX);
            // The next instant first: a policy whose run fails is not retried every tick.
            let mut moved = rec.clone();
            moved.next_run = next;
            if let Err(e) = self.put_policy(&tenant, &name, &moved) {
                tracing::error!(tenant, policy = name, error = %e, "cannot update a policy");
                continue;
            }
            match self.run_policy(&tenant, &name) {
                Ok(jobs) => tracing::info!(tenant, policy = name, jobs = jobs.len(), "policy ran"),
                Err(e) => tracing::warn!(tenant, policy = name, error = %e, "policy run failed"),
            }
            ran += 1;
        }
        ran
    }

    /// Deletes, as jobs, the backups of a volume or server that policy `policy` took and its
    /// retention no longer keeps.
    pub(super) fn apply_retention(&self, owner: &str, policy: &str, volume: Option<&str>, server: Option<&str>) {
        let Ok(rec) = self.policy_record(owner, policy) else { return };
        let backups = match (volume, server) {
            (Some(v), _) => self.list_backups(owner, v, ""),
            (_, Some(s)) => self.list_backups(owner, "", s),
            _ => return,
        };
        let backups = match backups {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(owner, policy, error = %e, "retention: cannot list backups");
                return;
            }
        };
        // Only the policy's own backups (a volume backup of a server backup is the server's).
        let candidates: Vec<(String, u64)> = backups
            .iter()
            .filter(|b| b.name == policy_label(policy))
            .filter(|b| server.is_some() || b.server_backup.is_empty())
            .map(|b| (b.id.clone(), b.created_unix_ms))
            .collect();
        for id in expired(&candidates, &rec.retention) {
            match self.delete_backup(owner, &id) {
                Ok(j) => tracing::info!(owner, policy, backup = id, job = j.id, "retention: backup expired"),
                Err(e) => tracing::warn!(owner, policy, backup = id, error = %e, "retention: cannot delete"),
            }
        }
    }

    /// Forgets the bindings of a deleted volume.
    pub(super) fn unbind_volume(&self, volume_id: u64) -> Result<(), StoreError> {
        let bkey = format!("v/{volume_id}");
        let pkey = {
            let r = self.store.catalog().begin_read()?;
            let t = r.open_table(POLICY_BINDINGS)?;
            let g = t.get(bkey.as_str())?;
            g.map(|g| g.value().to_string())
        };
        let Some(pkey) = pkey else { return Ok(()) };
        let w = self.store.catalog().begin_write()?;
        {
            w.open_table(POLICY_BINDINGS)?.remove(bkey.as_str())?;
            let mut p = w.open_table(POLICIES)?;
            let rec = p.get(pkey.as_str())?.map(|g| decode(g.value())).transpose()?;
            if let Some(mut rec) = rec {
                rec.volumes.retain(|v| *v != volume_id);
                let bytes = serde_json::to_vec(&rec).map_err(|e| StoreError::Catalog(e.to_string()))?;
                p.insert(pkey.as_str(), bytes.as_slice())?;
            }
        }
        w.commit()?;
        Ok(())
    }
}

#[tonic::async_trait]
impl PolicyService for VolumeApi {
    async fn create_policy(
        &self,
        req: Request<pb::CreatePolicyRequest>,
    ) -> Result<Response<pb::CreatePolicyResponse>, Status> {
        let pb::CreatePolicyRequest { name, schedule, retention } = req.get_ref().clone();
        let target = format!("policy {name}");
        let policy = self
            .run_mut(&req, "PolicyService/CreatePolicy", target, move |cp, owner| {
                cp.create_policy(owner, &name, &schedule, retention_of(retention))
            })
            .await?;
        Ok(Response::new(pb::CreatePolicyResponse { policy: Some(policy) }))
    }

    async fn list_policies(
        &self,
        req: Request<pb::ListPoliciesRequest>,
    ) -> Result<Response<pb::ListPoliciesResponse>, Status> {
        let policies = self.run(&req, "PolicyService/ListPolicies", |cp, owner| cp.list_policies(owner)).await?;
        Ok(Response::new(pb::ListPoliciesResponse { policies }))
    }

    async fn delete_policy(
        &self,
        req: Request<pb::DeletePolicyRequest>,
    ) -> Result<Response<pb::DeletePolicyResponse>, Status> {
        let name = req.get_ref().name.clone();
        let target = format!("policy {name}");
        self.run_mut(&req, "PolicyService/DeletePolicy", target, move |cp, owner| cp.delete_policy(owner, &name))
            .await?;
        Ok(Response::new(pb::DeletePolicyResponse {}))
    }

    async fn bind_policy(
        &self,
        req: Request<pb::BindPolicyRequest>,
    ) -> Result<Response<pb::BindPolicyResponse>, Status> {
        let pb::BindPolicyRequest { name, volume, server } = req.get_ref().clone();
        let target = format!("policy {name}");
        let policy = self
            .run_mut(&req, "PolicyService/BindPolicy", target, move |cp, owner| {
                cp.bind_policy(owner, &name, &volume, &server)
            })
            .await?;
        Ok(Response::new(pb::BindPolicyResponse { policy: Some(policy) }))
    }

    async fn unbind_policy(
        &self,
        req: Request<pb::UnbindPolicyRequest>,
    ) -> Result<Response<pb::UnbindPolicyResponse>, Status> {
        let pb::UnbindPolicyRequest { name, volume, server } = req.get_ref().clone();
        let target = format!("policy {name}");
        let policy = self
            .run_mut(&req, "PolicyService/UnbindPolicy", target, move |cp, owner| {
                cp.unbind_policy(owner, &name, &volume, &server)
            })
            .await?;
        Ok(Response::new(pb::UnbindPolicyResponse { policy: Some(policy) }))
    }

    async fn run_policy(&self, req: Request<pb::RunPolicyRequest>) -> Result<Response<pb::RunPolicyResponse>, Status> {
        let name = req.get_ref().name.clone();
        let target = format!("policy {name}");
        let jobs =
            self.run_mut(&req, "PolicyService/RunPolicy", target, move |cp, owner| cp.run_policy(owner, &name)).await?;
        Ok(Response::new(pb::RunPolicyResponse { jobs: jobs.iter().map(job_to_pb).collect() }))
    }
}
