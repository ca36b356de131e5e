//! `ReplicationService`: what one daemon asks of another for a protection group (see
//! [`super::dr`] for the protocol). Calls are authenticated by the group's secret, except
//! `RegisterGroup`, which needs the tenant's token (the tenant agreeing to the group).

use std::sync::Arc;

use evs_proto::v1 as pb;
use evs_proto::v1::replication_service_server::ReplicationService;
use evs_replicator::{apply_frames, ReplicaSink};
use evs_snapshot::{StoreError, Volume};
use tonic::{Request, Response, Status, Streaming};

use super::dr::{group_key, point_name, GroupRecord, PairRecord, Role, GROUP_HEADER};
use super::validate::{validate_group_name, validate_volume_name, validate_volume_size, ValidationError};
use super::{ApiError, ControlPlane, VolumeApi};

/// The replicas of a cycle, by the cycle's pair index.
struct Replicas(Vec<Arc<Volume>>);

impl ReplicaSink for Replicas {
    fn size(&self, pair: u16) -> Option<u64> {
        self.0.get(pair as usize).map(|v| v.size())
    }
    fn write(&self, pair: u16, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let v = &self.0[pair as usize];
        loop {
            match v.write_at_direct(offset, data) {
                Err(StoreError::Frozen) => v.wait_thawed(),
                other => return other.map_err(std::io::Error::other),
            }
        }
    }
    fn zero(&self, pair: u16, offset: u64, len: u64) -> std::io::Result<()> {
        let v = &self.0[pair as usize];
        loop {
            match v.write_zeroes(offset, len, false) {
                Err(StoreError::Frozen) => v.wait_thawed(),
                other => return other.map_err(std::io::Error::other),
            }
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl ControlPlane {
    /// The group a node-to-node call names, if its secret is right.
    fn authenticate_group(&self, md: &tonic::metadata::MetadataMap) -> Result<(String, GroupRecord), ApiError> {
        let denied = || ApiError::Auth(super::auth::AuthError::UnknownToken);
        // Missing or malformed credentials first, as for tenant calls.
        let secret = super::auth::bearer_token(md)?;
        let key = md.get(GROUP_HEADER).and_then(|v| v.to_str().ok()).ok_or_else(denied)?;
        let (tenant, name) = key.split_once('/').ok_or_else(denied)?;
        let g = self.group_by_key(key)?.ok_or_else(denied)?;
        // BLAKE3 hashes compare in constant time.
        if blake3::hash(secret.as_bytes()) != blake3::hash(g.secret.as_bytes()) {
            return Err(denied());
        }
        let _ = name;
        Ok((tenant.to_string(), g))
    }

    /// [`authenticate_group`](Self::authenticate_group), with a refusal in the audit log.
    fn authenticate_group_audited(
        &self,
        md: &tonic::metadata::MetadataMap,
        method: &str,
    ) -> Result<(String, GroupRecord), ApiError> {
        let r = self.authenticate_group(md);
        if r.is_err() {
            let key = md.get(GROUP_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("");
            self.audit_outcome(super::audit::UNAUTHENTICATED, method, &format!("DR group {key}"), &r);
        }
        r
    }

    /// On the target: records the group the source made (the caller's token is the tenant's).
    pub fn register_group(
        &self,
        tenant: &str,
        r: &pb::RegisterGroupRequest,
    ) -> Result<pb::RegisterGroupResponse, ApiError> {
        validate_group_name(&r.name)?;
        let dr = self.dr()?;
        if r.secret.len() != 64 || !r.secret.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(ValidationError::Dr("a group secret is 64 hex digits".into()).into());
        }
        let _g = self.mutations.lock();
        if self.group_record(tenant, &r.name).is_ok() {
            return Err(ApiError::GroupExists(r.name.clone()));
        }
        let ca = (!r.ca_cert_pem.is_empty()).then(|| r.ca_cert_pem.clone());
        let g = GroupRecord::new(
            &r.name,
            Role::Target,
            &r.source_endpoint,
            &r.source_az,
            &r.source_tenant,
            &r.secret,
            ca,
            super::dr::DEFAULT_INTERVAL,
            0,
        );
        self.put_group(tenant, &g)?;
        tracing::info!(tenant, group = r.name, source_az = r.source_az, "DR group registered (target)");
        Ok(pb::RegisterGroupResponse { az: dr.az.clone(), tenant: tenant.to_string() })
    }

    fn peer_unregister(&self, tenant: &str, g: &GroupRecord, delete_replicas: bool) -> Result<(), ApiError> {
        self.stop_drill(tenant, g)?;
        self.drop_group_locally(tenant, g, delete_replicas)
    }

    /// On the target: makes (or grows) the replicas of `pairs`. Every pair is checked (name,
    /// size, a name taken by another volume, the quota for all the new ones) before any
    /// replica is made, so a refused call makes none.
    fn prepare_pairs(&self, tenant: &str, g: &GroupRecord, pairs: &[pb::PairSpec]) -> Result<(), ApiError> {
        let key = group_key(tenant, &g.name);
        let mut added = Vec::new();
        {
            let _m = self.mutations.lock();
            let mut new = Vec::new();
            let mut seen = std::collections::BTreeSet::new();
            for p in pairs {
                validate_volume_name(&p.volume)?;
                validate_volume_size(p.size_bytes)?;
                if !seen.insert(p.volume.as_str()) {
                    return Err(ValidationError::Dr(format!("volume {} is listed twice", p.volume)).into());
                }
                if g.pairs.iter().any(|x| x.volume == p.volume) {
                    continue;
                }
                match self.find(tenant, &p.volume) {
                    Ok(info) if self.replica_of(info.id).as_deref() == Some(key.as_str()) => {
                        added.push((p.clone(), info.id));
                    }
                    Ok(_) => return Err(ApiError::VolumeExists(p.volume.clone())),
                    Err(ApiError::VolumeNotFound(_)) => new.push(p),
                    Err(e) => return Err(e),
                }
            }
            let bytes = new.iter().try_fold(0u64, |acc, p| acc.checked_add(p.size_bytes));
            self.check_quota(tenant, new.len() as u64, bytes.unwrap_or(u64::MAX))?;
            for p in new {
                let tier = if super::validate::validate_tier(&p.tier, &self.tiers).is_ok() && p.tier != "unlimited" {
                    p.tier.as_str()
                } else {
                    ""
                };
                let rows = super::VolumeRows {
                    tier: super::validate::validate_tier(tier, &self.tiers)?,
                    restoring: None,
                    replica_of: Some(&key),
                };
                let info =
                    self.store.create_volume_with(tenant, &p.volume, p.size_bytes, &|w, id| rows.write(w, id))?;
                added.push((p.clone(), info.id));
            }
        }
        self.update_group(tenant, &g.name, |r| {
            for (p, id) in added {
                if !r.servers.contains(&p.server) {
                    r.servers.push(p.server.clone());
                }
                r.pairs.push(PairRecord {
                    server: p.server,
                    volume: p.volume,
                    volume_id: id,
                    size: p.size_bytes,
                    tier: p.tier,
                    since_seq: None,
                    synced_bytes: 0,
                    bytes_transferred: 0,
                    bytes_replicated: 0,
                });
            }
        })?;
        Ok(())
    }

    fn remove_pairs(&self, tenant: &str, g: &GroupRecord, volumes: &[String]) -> Result<(), ApiError> {
        for v in volumes {
            validate_volume_name(v)?;
        }
        for p in g.pairs.iter().filter(|p| volumes.contains(&p.volume)) {
            self.set_replica(p.volume_id, None)?;
            match self.store.delete_volume(p.volume_id) {
                Ok(()) | Err(StoreError::VolumeNotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
            self.volume_io.remove(p.volume_id);
        }
        self.update_group(tenant, &g.name, |r| {
            r.pairs.retain(|p| !volumes.contains(&p.volume));
            let servers: Vec<String> = r.pairs.iter().map(|p| p.server.clone()).collect();
            r.servers.retain(|s| servers.contains(s));
        })?;
        Ok(())
    }

    /// On the target: one whole `Apply` stream (runs on a blocking thread; reads the stream
    /// through the runtime).
    fn apply_stream(
        &self,
        tenant: &str,
        name: &str,
        mut stream: Streaming<pb::ApplyMessage>,
    ) -> Result<pb::ApplyResult, ApiError> {
        let dr = self.dr()?;
        let lock = self.group_lock(&group_key(tenant, name))?;
        let _l = lock.lock();
        let g = self.group_record(tenant, name)?;
        if g.role != Role::Target || g.failed_over {
            return Err(ApiError::WrongRole {
                group: name.to_string(),
                role: g.role.name_str().into(),
                want: "target",
            });
        }
        let next = |stream: &mut Streaming<pb::ApplyMessage>| -> Result<Option<pb::apply_message::Body>, ApiError> {
            match dr.rt.block_on(stream.message()) {
                Ok(Some(m)) => Ok(m.body),
                Ok(None) => Ok(None),
                Err(s) => Err(ApiError::Peer(format!("the replication stream broke: {}", s.message()))),
            }
        };
        let Some(pb::apply_message::Body::Begin(begin)) = next(&mut stream)? else {
            return Err(ValidationError::Dr("a replication stream starts with its begin message".into()).into());
        };
        if begin.base_seq != g.point_seq {
            return Err(ApiError::PointMismatch { group: name.to_string(), have: g.point_seq, base: begin.base_seq });
        }
        if begin.seq != g.point_seq + 1 {
            return Err(ValidationError::Dr(format!("cycle {} after point {}", begin.seq, g.point_seq)).into());
        }
        // The replicas, in the cycle's order, grown to the source's sizes and rolled back to
        // the point (dropping whatever an interrupted cycle wrote).
        let mut vols = Vec::with_capacity(begin.pairs.len());
        for spec in &begin.pairs {
            let p =
                g.pairs.iter().find(|p| p.volume == spec.volume).ok_or_else(|| {
                    ValidationError::Dr(format!("volume {} is not a pair of group {name}", spec.volume))
                })?;
            if p.since_seq.is_some() && g.point_seq > 0 {
                let snap = self.store.find_snapshot(p.volume_id, &point_name(name, g.point_seq))?;
                self.store.rollback(p.volume_id, snap.id)?;
            }
            // A point snapshot past the recorded one was left by a crash between its snapshot
            // and its record: it is not a point, and its name is about to be taken again.
            self.drop_points(p.volume_id, name, (g.point_seq > 0).then_some(g.point_seq));
            let size = self.store.volume_info(p.volume_id)?.size;
            if spec.size_bytes > size {
                self.store.extend_volume(p.volume_id, spec.size_bytes)?;
            }
            vols.push(self.store.open_volume(p.volume_id)?);
        }
        let sink = Replicas(vols);
        let started = std::time::Instant::now();
        let mut applied = 0u64;
        let mut frames = 0u64;
        let commit = loop {
            match next(&mut stream)? {
                Some(pb::apply_message::Body::Frames(batch)) => {
                    let s = apply_frames(&batch, &sink).map_err(|e| ApiError::Peer(e.to_string()))?;
                    applied += s.bytes_written + s.bytes_zeroed;
                    frames += s.frames;
                }
                Some(pb::apply_message::Body::Commit(c)) => break c,
                Some(pb::apply_message::Body::Begin(_)) => {
                    return Err(ValidationError::Dr("a second begin in one replication stream".into()).into())
                }
                None => return Err(ApiError::Peer("the replication stream ended before its commit".into())),
            }
        };
        if commit.seq != begin.seq || commit.frames != frames {
            return Err(ApiError::Peer(format!(
                "commit of cycle {} with {} frames, but cycle {} sent {frames}",
                commit.seq, commit.frames, begin.seq
            )));
        }
        let received = started.elapsed();
        // The new point: flushed, then one snapshot of all replicas in one transaction.
        for v in &sink.0 {
            v.flush()?;
        }
        let flushed = started.elapsed();
        let seq = begin.seq;
        let snap = point_name(name, seq);
        let items: Vec<(u64, String)> = begin
            .pairs
            .iter()
            .filter_map(|s| g.pairs.iter().find(|p| p.volume == s.volume))
            .map(|p| (p.volume_id, snap.clone()))
            .collect();
        evs_snapshot::crash_point!("replica-apply-before-point");
        self.store.create_snapshots(&items, Some(&snap))?;
        evs_snapshot::crash_point!("replica-point-before-record");
        let g = self.update_group(tenant, name, |r| {
            r.point_seq = seq;
            r.point_ms = begin.point_unix_ms;
            r.bytes_replicated += applied;
            r.cycles += 1;
            r.last_cycle_ms = now_ms();
            for p in r.pairs.iter_mut() {
                if p.since_seq.is_none() && begin.pairs.iter().any(|s| s.volume == p.volume) {
                    p.since_seq = Some(seq);
                    p.synced_bytes = p.size;
                }
            }
        })?;
        for p in &g.pairs {
            self.drop_points(p.volume_id, name, Some(seq));
        }
        tracing::debug!(
            group = name,
            seq,
            bytes = applied,
            received_ms = received.as_millis() as u64,
            flushed_ms = flushed.as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            "replica point committed"
        );
        Ok(pb::ApplyResult { committed_seq: seq, bytes_applied: applied })
    }

    /// On the target: clones of the last point, attached (start); or their removal (stop).
    fn peer_drill(&self, tenant: &str, g: &GroupRecord, start: bool) -> Result<pb::PeerDrillResponse, ApiError> {
        if !start {
            self.stop_drill(tenant, g)?;
            return Ok(pb::PeerDrillResponse { volumes: Vec::new(), point_seq: g.point_seq });
        }
        if g.point_seq == 0 {
            return Err(ApiError::Syncing(g.name.clone()));
        }
        // Tests hold a drill here while cycles go on: the point it names must stay.
        evs_snapshot::delay_point!("dr-peer-drill");
        let mut out = Vec::new();
        let mut made = Vec::new();
        for p in g.pairs.iter().filter(|p| p.since_seq.is_some()) {
            let drill_name = format!("{}-drill", p.volume);
            let snap = self.store.find_snapshot(p.volume_id, &point_name(&g.name, g.point_seq))?;
            let id = match self.find(tenant, &drill_name) {
                Ok(info) if g.drill.iter().any(|(_, d)| *d == info.id) => info.id,
                Ok(_) => return Err(ApiError::VolumeExists(drill_name)),
                Err(_) => self.store.clone_snapshot(tenant, &drill_name, snap.id, None)?.id,
            };
            made.push((p.volume.clone(), id));
            let a = self.attach_volume(tenant, &drill_name, false)?;
            out.push(pb::DrillVolume {
                volume: p.volume.clone(),
                drill_volume: drill_name,
                uri: self.tcp_uri(&a.token, None),
                unix_uri: self.unix_uri(&a.token).unwrap_or_default(),
            });
        }
        self.update_group(tenant, &g.name, |r| r.drill = made)?;
        Ok(pb::PeerDrillResponse { volumes: out, point_seq: g.point_seq })
    }

    /// Detaches and deletes a group's drill volumes (the replicas are not touched).
    pub(super) fn stop_drill(&self, tenant: &str, g: &GroupRecord) -> Result<(), ApiError> {
        for (_, id) in &g.drill {
            if *id == 0 {
                continue;
            }
            for token in self.tokens_of(*id)? {
                self.revoke_token(&token)?;
            }
            match self.store.delete_volume(*id) {
                Ok(()) | Err(StoreError::VolumeNotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
            self.volume_io.remove(*id);
        }
        if !g.drill.is_empty() {
            self.update_group(tenant, &g.name, |r| r.drill.clear())?;
        }
        Ok(())
    }

    /// On the target, in a switchover: becomes the source at point `seq`.
    fn peer_promote(&self, tenant: &str, g: &GroupRecord, seq: u64) -> Result<(), ApiError> {
        if g.role != Role::Target || g.point_seq != seq {
            return Err(ApiError::PointMismatch { group: g.name.clone(), have: g.point_seq, base: seq });
        }
        self.stop_drill(tenant, g)?;
        self.become_source(tenant, g, false)?;
        tracing::info!(tenant, group = g.name, seq, "promoted: this daemon is now the DR source");
        Ok(())
    }

    /// On the old source, in a reprotect: rolls back to the common point and becomes the
    /// target of the daemon that failed over.
    fn peer_demote(&self, tenant: &str, g: &GroupRecord, r: &pb::DemoteRequest) -> Result<(), ApiError> {
        let mut g = g.clone();
        // Checked before anything is recorded: a refused demote changes nothing. Point 0 is
        // "no point": there is nothing to roll back to.
        // A target was demoted already: only a retry of that demote (same point) is accepted.
        if g.role == Role::Target && g.point_seq != r.seq {
            return Err(ApiError::WrongRole { group: g.name.clone(), role: "target".into(), want: "source" });
        }
        let have = r.seq != 0
            && g.pairs.iter().all(|p| self.store.find_snapshot(p.volume_id, &point_name(&g.name, r.seq)).is_ok());
        if !have {
            return Err(ApiError::PointMismatch { group: g.name.clone(), have: g.point_seq, base: r.seq });
        }
        if !r.source_endpoint.is_empty() {
            g = self.update_group(tenant, &g.name, |g| {
                g.peer_endpoint = r.source_endpoint.clone();
                g.peer_az = r.source_az.clone();
            })?;
        }
        self.become_target(tenant, &g, r.seq)?;
        tracing::info!(tenant, group = g.name, seq = r.seq, "demoted: this daemon is now the DR target");
        Ok(())
    }
}

impl Role {
    pub(super) fn name_str(self) -> &'static str {
        match self {
            Role::Source => "source",
            Role::Target => "target",
        }
    }
}

impl VolumeApi {
    /// Runs `f` for an authenticated group call on the blocking pool (read-only `method`:
    /// only a refused secret goes to the audit log).
    async fn run_group<Q, T>(
        &self,
        req: &Request<Q>,
        method: &'static str,
        f: impl FnOnce(&ControlPlane, &str, &GroupRecord) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, Status>
    where
        T: Send + 'static,
    {
        let cp = self.cp.clone();
        let md = req.metadata().clone();
        tokio::task::spawn_blocking(move || {
            let (tenant, g) = cp.authenticate_group_audited(&md, method)?;
            f(&cp, &tenant, &g)
        })
        .await
        .map_err(|e| ApiError::Internal(format!("the operation did not complete: {e}")))?
        .map_err(Status::from)
    }

    /// [`run_group`](Self::run_group) for a call that changes something: `f` runs under the
    /// group's lock, on its record as read under it; the outcome goes to the audit log as
    /// `method` on the group the call names (tenant "-" when the secret was refused).
    async fn run_group_mut<Q, T>(
        &self,
        req: &Request<Q>,
        method: &'static str,
        f: impl FnOnce(&ControlPlane, &str, &GroupRecord) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, Status>
    where
        T: Send + 'static,
    {
        let cp = self.cp.clone();
        let md = req.metadata().clone();
        tokio::task::spawn_blocking(move || {
            let key = md.get(GROUP_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
            let (who, r) = match cp.authenticate_group(&md) {
                Ok((tenant, g)) => {
                    let r = cp.with_group_locked(&tenant, &g.name, |g| f(&cp, &tenant, g));
                    (tenant, r)
                }
                Err(e) => (super::audit::UNAUTHENTICATED.to_string(), Err(e)),
            };
            cp.audit_outcome(&who, method, &format!("DR group {key}"), &r);
            r.map_err(Status::from)
        })
        .await
        .map_err(|e| Status::from(ApiError::Internal(format!("the operation did not complete: {e}"))))?
    }
}

#[tonic::async_trait]
impl ReplicationService for VolumeApi {
    async fn register_group(
        &self,
        req: Request<pb::RegisterGroupRequest>,
    ) -> Result<Response<pb::RegisterGroupResponse>, Status> {
        let r = req.get_ref().clone();
        let target = format!("DR group {} (target)", r.name);
        let resp = self
            .run_mut(&req, "ReplicationService/RegisterGroup", target, move |cp, t| cp.register_group(t, &r))
            .await?;
        Ok(Response::new(resp))
    }

    async fn unregister_group(
        &self,
        req: Request<pb::UnregisterGroupRequest>,
    ) -> Result<Response<pb::UnregisterGroupResponse>, Status> {
        let delete = req.get_ref().delete_replicas;
        self.run_group_mut(&req, "ReplicationService/UnregisterGroup", move |cp, t, g| {
            cp.peer_unregister(t, g, delete)
        })
        .await?;
        Ok(Response::new(pb::UnregisterGroupResponse {}))
    }

    async fn prepare_pairs(
        &self,
        req: Request<pb::PreparePairsRequest>,
    ) -> Result<Response<pb::PreparePairsResponse>, Status> {
        let pairs = req.get_ref().pairs.clone();
        self.run_group_mut(&req, "ReplicationService/PreparePairs", move |cp, t, g| cp.prepare_pairs(t, g, &pairs))
            .await?;
        Ok(Response::new(pb::PreparePairsResponse {}))
    }

    async fn remove_pairs(
        &self,
        req: Request<pb::RemovePairsRequest>,
    ) -> Result<Response<pb::RemovePairsResponse>, Status> {
        let volumes = req.get_ref().volumes.clone();
        self.run_group_mut(&req, "ReplicationService/RemovePairs", move |cp, t, g| cp.remove_pairs(t, g, &volumes))
            .await?;
        Ok(Response::new(pb::RemovePairsResponse {}))
    }

    async fn apply(&self, req: Request<Streaming<pb::ApplyMessage>>) -> Result<Response<pb::ApplyResult>, Status> {
        let cp = self.cp.clone();
        let md = req.metadata().clone();
        let stream = req.into_inner();
        let r = tokio::task::spawn_blocking(move || {
            let (tenant, g) = cp.authenticate_group_audited(&md, "ReplicationService/Apply")?;
            cp.apply_stream(&tenant, &g.name, stream)
        })
        .await
        .map_err(|e| ApiError::Internal(format!("the apply did not complete: {e}")))?
        .map_err(Status::from)?;
        Ok(Response::new(r))
    }

    async fn get_point(&self, req: Request<pb::GetPointRequest>) -> Result<Response<pb::GetPointResponse>, Status> {
        let r = self
            .run_group(&req, "ReplicationService/GetPoint", |_, _, g| {
                let role = if g.failed_over { "failed-over" } else { g.role.name_str() };
                Ok(pb::GetPointResponse { seq: g.point_seq, point_unix_ms: g.point_ms, role: role.into() })
            })
            .await?;
        Ok(Response::new(r))
    }

    async fn drill(&self, req: Request<pb::PeerDrillRequest>) -> Result<Response<pb::PeerDrillResponse>, Status> {
        let start = req.get_ref().start;
        let r =
            self.run_group_mut(&req, "ReplicationService/Drill", move |cp, t, g| cp.peer_drill(t, g, start)).await?;
        Ok(Response::new(r))
    }

    async fn promote(&self, req: Request<pb::PromoteRequest>) -> Result<Response<pb::PromoteResponse>, Status> {
        let seq = req.get_ref().seq;
        self.run_group_mut(&req, "ReplicationService/Promote", move |cp, t, g| cp.peer_promote(t, g, seq)).await?;
        Ok(Response::new(pb::PromoteResponse {}))
    }

    async fn demote(&self, req: Request<pb::DemoteRequest>) -> Result<Response<pb::DemoteResponse>, Status> {
        let r = req.get_ref().clone();
        self.run_group_mut(&req, "ReplicationService/Demote", move |cp, t, g| cp.peer_demote(t, g, &r)).await?;
        Ok(Response::new(pb::DemoteResponse {}))
    }
}

/// Checks done by tests of this module without a network.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn point_names() {
        assert_eq!(point_name("g1", 7), ".dr-g1-7");
        assert_eq!(group_key("t", "g"), "t/g");
    }
}
