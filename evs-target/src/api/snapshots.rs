//! The snapshot half of the control API: `SnapshotService` over the block store's snapshots.
//!
//! Snapshot exports are read-only NBD exports persisted in the `snapshot_attachments` table
//! (attach token → snapshot id), reloaded at start like volume attachments.

use std::pin::Pin;

use evs_proto::v1 as pb;
use evs_proto::v1::snapshot_service_server::SnapshotService;
use evs_snapshot::{ChangedExtent, SnapshotInfo, StoreError};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::validate::{parse_snapshot_ref, validate_snapshot_name, validate_volume_name, ValidationError};
use super::{ApiError, ControlPlane, VolumeApi};
use crate::exports::{Export, ExportRegistry, Protocol};

/// Attach token → snapshot id.
pub(super) const SNAPSHOT_ATTACHMENTS: TableDefinition<&str, u64> = TableDefinition::new("snapshot_attachments");

/// Extents per streamed diff message.
const DIFF_CHUNK: usize = 4096;

/// What a snapshot attach hands to the caller.
#[derive(Debug, Clone)]
pub struct SnapshotAttachment {
    pub token: String,
    pub snapshot: pb::Snapshot,
    pub protocol: Protocol,
    /// The vhost-user socket (a read-only disk), for a vhost-user attachment.
    pub socket: Option<std::path::PathBuf>,
}

impl ControlPlane {
    /// The tenant's snapshot `volume@name`.
    fn find_snapshot(&self, owner: &str, volume: &str, name: &str) -> Result<(u64, SnapshotInfo), ApiError> {
        validate_volume_name(volume)?;
        validate_snapshot_name(name)?;
        let v = self.find(owner, volume)?;
        match self.store.find_snapshot(v.id, name) {
            Ok(s) => Ok((v.id, s)),
            Err(StoreError::SnapshotNotFound(_)) => Err(ApiError::SnapshotNotFound(format!("{volume}@{name}"))),
            Err(e) => Err(e.into()),
        }
    }

    fn describe_snapshot(&self, volume: &str, s: &SnapshotInfo) -> pb::Snapshot {
        pb::Snapshot {
            volume: volume.to_string(),
            name: s.name.clone(),
            id: s.id,
            size_bytes: s.size,
            created_unix: s.created,
            group: s.group.clone().unwrap_or_default(),
            attached: self.exports.is_snapshot_attached(s.id),
        }
    }

    pub fn create_snapshot(&self, owner: &str, volume: &str, name: &str) -> Result<pb::Snapshot, ApiError> {
        validate_volume_name(volume)?;
        validate_snapshot_name(name)?;
        let v = self.find_live(owner, volume)?;
        let s = match self.store.create_snapshot(v.id, name) {
            Err(StoreError::SnapshotExists(_)) => return Err(ApiError::SnapshotExists(format!("{volume}@{name}"))),
            other => other?,
        };
        tracing::info!(owner, volume, snapshot = name, id = s.id, "snapshot created");
        Ok(self.describe_snapshot(volume, &s))
    }

    /// Snapshots `volumes` at one instant, all named `name`.
    pub fn create_group_snapshot(
        &self,
        owner: &str,
        name: &str,
        volumes: &[String],
    ) -> Result<Vec<pb::Snapshot>, ApiError> {
        validate_snapshot_name(name)?;
        if volumes.is_empty() || volumes.iter().enumerate().any(|(i, v)| volumes[..i].contains(v)) {
            return Err(ValidationError::GroupVolumes.into());
        }
        let mut items = Vec::with_capacity(volumes.len());
        for v in volumes {
            validate_volume_name(v)?;
            items.push((self.find_live(owner, v)?.id, name.to_string()));
        }
        let snaps = match self.store.create_snapshots(&items, Some(name)) {
            Err(StoreError::SnapshotExists(what)) => return Err(ApiError::SnapshotExists(what)),
            other => other?,
        };
        tracing::info!(owner, snapshot = name, volumes = volumes.len(), "group snapshot created");
        Ok(snaps.iter().zip(volumes).map(|(s, v)| self.describe_snapshot(v, s)).collect())
    }

    pub fn list_snapshots(&self, owner: &str, volume: &str) -> Result<Vec<pb::Snapshot>, ApiError> {
        validate_volume_name(volume)?;
        let v = self.find(owner, volume)?;
        Ok(self
            .store
            .list_snapshots(v.id)?
            .iter()
            .filter(|s| !evs_snapshot::snapshots::is_hidden(&s.name))
            .map(|s| self.describe_snapshot(volume, s))
            .collect())
    }

    pub fn get_snapshot(&self, owner: &str, volume: &str, name: &str) -> Result<pb::Snapshot, ApiError> {
        let (_, s) = self.find_snapshot(owner, volume, name)?;
        Ok(self.describe_snapshot(volume, &s))
    }

    /// Deletes a detached snapshot; its layer is merged away in the background.
    pub fn delete_snapshot(&self, owner: &str, volume: &str, name: &str) -> Result<(), ApiError> {
        let _g = self.mutations.lock();
        let (vid, s) = self.find_snapshot(owner, volume, name)?;
        self.ensure_not_deleting(volume, vid)?;
        if self.exports.is_snapshot_attached(s.id) {
            return Err(ApiError::Attached(format!("{volume}@{name}")));
        }
        self.store.delete_snapshot(s.id)?;
        tracing::info!(owner, volume, snapshot = name, id = s.id, "snapshot deleted");
        Ok(())
    }

    /// Rolls a volume back to a snapshot. The rule: no NBD client may be connected to the
    /// volume (its attach token stays valid; clients reconnect and see the snapshot's data).
    pub fn rollback_snapshot(&self, owner: &str, volume: &str, name: &str) -> Result<pb::Volume, ApiError> {
        let _g = self.mutations.lock();
        let (vid, s) = self.find_snapshot(owner, volume, name)?;
        self.ensure_not_deleting(volume, vid)?;
        let conns = self.exports.volume_connections(vid);
        if conns > 0 {
            return Err(ApiError::Connected { volume: volume.to_string(), connections: conns });
        }
        let info = self.store.rollback(vid, s.id)?;
        tracing::info!(owner, volume, snapshot = name, "volume rolled back");
        Ok(self.describe(&info, self.tier_of(info.id)?))
    }

    /// Changed extents of `volume` from snapshot `from` ("" = none: allocated extents) to
    /// snapshot `to` ("" = the volume now), and the size of `to`.
    pub fn diff_snapshots(
        &self,
        owner: &str,
        volume: &str,
        from: &str,
        to: &str,
    ) -> Result<(Vec<ChangedExtent>, u64), ApiError> {
        validate_volume_name(volume)?;
        let v = self.find(owner, volume)?;
        let snap = |n: &str| -> Result<Option<u64>, ApiError> {
            if n.is_empty() {
                return Ok(None);
            }
            Ok(Some(self.find_snapshot(owner, volume, n)?.1.id))
        };
        let (from, to) = (snap(from)?, snap(to)?);
        Ok(self.store.changed_extents(v.id, from, to)?)
    }

    /// Exports a snapshot read-only over NBD; returns its existing token if already attached.
    pub fn attach_snapshot(
        &self,
        owner: &str,
        volume: &str,
        name: &str,
        require_unix: bool,
    ) -> Result<SnapshotAttachment, ApiError> {
        self.attach_snapshot_over(owner, volume, name, require_unix, Protocol::Nbd)
    }

    /// Exports a snapshot read-only over `protocol` (one attachment per protocol).
    pub fn attach_snapshot_over(
        &self,
        owner: &str,
        volume: &str,
        name: &str,
        require_unix: bool,
        protocol: Protocol,
    ) -> Result<SnapshotAttachment, ApiError> {
        if require_unix && self.endpoints.unix.is_none() {
            return Err(ApiError::NoUnixSocket);
        }
        if protocol == Protocol::VhostUser && self.exports.vhost().is_none() {
            return Err(crate::exports::ServeError::NoVhostUser.into());
        }
        let _g = self.mutations.lock();
        let (vid, s) = self.find_snapshot(owner, volume, name)?;
        self.ensure_not_deleting(volume, vid)?;
        let protocols = self.attachment_protocols()?;
        let existing = self
            .snapshot_attachment_rows()?
            .into_iter()
            .find(|(t, id)| *id == s.id && protocols.get(t).copied().unwrap_or_default() == protocol)
            .map(|(t, _)| t);
        let token = match existing {
            Some(t) => t,
            None => {
                let token = ExportRegistry::new_token();
                let view = self.store.open_snapshot(s.id)?;
                self.persist_attachment(SNAPSHOT_ATTACHMENTS, &token, s.id, protocol)?;
                let io = self.io_of(vid)?;
                let export =
                    Export { volume_id: vid, volume: view, read_only: true, snapshot: Some(s.id), io, protocol };
                if let Err(e) = self.exports.serve(token.clone(), export) {
                    if let Err(e2) = self.remove_attachment_rows(SNAPSHOT_ATTACHMENTS, std::slice::from_ref(&token)) {
                        tracing::error!(volume, snapshot = name, error = %e2, "cannot remove the rows of a failed attach");
                    }
                    return Err(e.into());
                }
                tracing::info!(owner, volume, snapshot = name, protocol = protocol.name(), "snapshot attached");
                token
            }
        };
        let socket = self.socket_of(&token, protocol);
        Ok(SnapshotAttachment { token, snapshot: self.describe_snapshot(volume, &s), protocol, socket })
    }

    pub fn detach_snapshot(&self, owner: &str, volume: &str, name: &str) -> Result<bool, ApiError> {
        let _g = self.mutations.lock();
        let (_, s) = self.find_snapshot(owner, volume, name)?;
        Ok(self.revoke_snapshot_attachments(&[s.id])?)
    }

    /// Removes the attachments of `snaps` (rows and live exports). Returns whether any existed.
    pub(super) fn revoke_snapshot_attachments(&self, snaps: &[u64]) -> Result<bool, StoreError> {
        let tokens: Vec<String> =
            self.snapshot_attachment_rows()?.into_iter().filter(|(_, id)| snaps.contains(id)).map(|(t, _)| t).collect();
        if tokens.is_empty() {
            return Ok(false);
        }
        self.remove_attachment_rows(SNAPSHOT_ATTACHMENTS, &tokens)?;
        for token in &tokens {
            self.exports.revoke(token);
        }
        Ok(true)
    }

    pub(super) fn snapshot_attachment_rows(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let r = self.store.catalog().begin_read()?;
        let t = r.open_table(SNAPSHOT_ATTACHMENTS)?;
        let mut rows = Vec::new();
        for row in t.iter()? {
            let (token, id) = row?;
            rows.push((token.value().to_string(), id.value()));
        }
        Ok(rows)
    }

    /// Mirrors `snapshot_attachments` into the export registry; drops rows of gone snapshots.
    pub(super) fn load_snapshot_attachments(&self) -> Result<(usize, usize), StoreError> {
        let mut stale = Vec::new();
        let mut loaded = 0;
        let protocols = self.attachment_protocols()?;
        for (token, snap) in self.snapshot_attachment_rows()? {
            match self.store.snapshot_info(snap).and_then(|s| Ok((s.volume, self.store.open_snapshot(snap)?))) {
                Ok((volume_id, view)) => {
                    let io = self.io_of(volume_id)?;
                    let protocol = protocols.get(&token).copied().unwrap_or_default();
                    let export =
                        Export { volume_id, volume: view, read_only: true, snapshot: Some(snap), io, protocol };
                    match self.exports.serve(token, export) {
                        Ok(_) => loaded += 1,
                        Err(e) => tracing::warn!(snapshot = snap, error = %e, "cannot serve a persisted attachment"),
                    }
                }
                Err(StoreError::SnapshotNotFound(_)) => stale.push(snap),
                Err(e) => return Err(e),
            }
        }
        if !stale.is_empty() {
            self.revoke_snapshot_attachments(&stale)?;
        }
        Ok((loaded, stale.len()))
    }

    /// Resolves `VOLUME@SNAP` of `owner` to a snapshot id (for clones).
    pub(super) fn snapshot_ref(&self, owner: &str, r: &str) -> Result<u64, ApiError> {
        let (v, n) = parse_snapshot_ref(r)?;
        let (vid, s) = self.find_snapshot(owner, v, n)?;
        self.ensure_not_deleting(v, vid)?;
        Ok(s.id)
    }
}

type DiffStream = Pin<Box<dyn Stream<Item = Result<pb::DiffSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl SnapshotService for VolumeApi {
    async fn create_snapshot(
        &self,
        req: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::CreateSnapshotResponse>, Status> {
        let pb::CreateSnapshotRequest { volume, name } = req.get_ref().clone();
        let target = format!("snapshot {volume}@{name}");
        let snapshot = self
            .run_mut(&req, "SnapshotService/CreateSnapshot", target, move |cp, owner| {
                cp.create_snapshot(owner, &volume, &name)
            })
            .await?;
        Ok(Response::new(pb::CreateSnapshotResponse { snapshot: Some(snapshot) }))
    }

    async fn create_group_snapshot(
        &self,
        req: Request<pb::CreateGroupSnapshotRequest>,
    ) -> Result<Response<pb::CreateGroupSnapshotResponse>, Status> {
        let pb::CreateGroupSnapshotRequest { name, volumes, server } = req.get_ref().clone();
        let target = if server.is_empty() {
            format!("group snapshot {name} of {}", volumes.join(","))
        } else {
            format!("group snapshot {name} of server {server}")
        };
        let snapshots = self
            .run_mut(&req, "SnapshotService/CreateGroupSnapshot", target, move |cp, owner| {
                if server.is_empty() {
                    return cp.create_group_snapshot(owner, &name, &volumes);
                }
                if !volumes.is_empty() {
                    return Err(ValidationError::GroupVolumesAndServer.into());
                }
                let volumes = cp.server_volume_names(owner, &server)?;
                cp.create_group_snapshot(owner, &name, &volumes)
            })
            .await?;
        Ok(Response::new(pb::CreateGroupSnapshotResponse { snapshots }))
    }

    async fn list_snapshots(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let volume = req.get_ref().volume.clone();
        let snapshots =
            self.run(&req, "SnapshotService/ListSnapshots", move |cp, owner| cp.list_snapshots(owner, &volume)).await?;
        Ok(Response::new(pb::ListSnapshotsResponse { snapshots }))
    }

    async fn get_snapshot(
        &self,
        req: Request<pb::GetSnapshotRequest>,
    ) -> Result<Response<pb::GetSnapshotResponse>, Status> {
        let pb::GetSnapshotRequest { volume, name } = req.get_ref().clone();
        let snapshot = self
            .run(&req, "SnapshotService/GetSnapshot", move |cp, owner| cp.get_snapshot(owner, &volume, &name))
            .await?;
        Ok(Response::new(pb::GetSnapshotResponse { snapshot: Some(snapshot) }))
    }

    async fn delete_snapshot(
        &self,
        req: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        let pb::DeleteSnapshotRequest { volume, name } = req.get_ref().clone();
        let target = format!("snapshot {volume}@{name}");
        self.run_mut(&req, "SnapshotService/DeleteSnapshot", target, move |cp, owner| {
            cp.delete_snapshot(owner, &volume, &name)
        })
        .await?;
        Ok(Response::new(pb::DeleteSnapshotResponse {}))
    }

    async fn rollback_snapshot(
        &self,
        req: Request<pb::RollbackSnapshotRequest>,
    ) -> Result<Response<pb::RollbackSnapshotResponse>, Status> {
        let pb::RollbackSnapshotRequest { volume, name } = req.get_ref().clone();
        let target = format!("snapshot {volume}@{name}");
        let volume = self
            .run_mut(&req, "SnapshotService/RollbackSnapshot", target, move |cp, owner| {
                cp.rollback_snapshot(owner, &volume, &name)
            })
            .await?;
        Ok(Response::new(pb::RollbackSnapshotResponse { volume: Some(volume) }))
    }

    type DiffSnapshotsStream = DiffStream;

    async fn diff_snapshots(
        &self,
        req: Request<pb::DiffSnapshotsRequest>,
    ) -> Result<Response<Self::DiffSnapshotsStream>, Status> {
        let pb::DiffSnapshotsRequest { volume, from, to } = req.get_ref().clone();
        let (extents, size) = self
            .run(&req, "SnapshotService/DiffSnapshots", move |cp, owner| cp.diff_snapshots(owner, &volume, &from, &to))
            .await?;
        let mut msgs: Vec<Result<pb::DiffSnapshotsResponse, Status>> = extents
            .chunks(DIFF_CHUNK)
            .map(|c| {
                Ok(pb::DiffSnapshotsResponse {
                    size_bytes: size,
                    extents: c
                        .iter()
                        .map(|e| pb::ChangedExtent { offset: e.offset, length: e.len, zero: e.zero })
                        .collect(),
                })
            })
            .collect();
        if msgs.is_empty() {
            // Always one message, so the client learns the size.
            msgs.push(Ok(pb::DiffSnapshotsResponse { size_bytes: size, extents: Vec::new() }));
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(msgs))))
    }

    async fn attach_snapshot(
        &self,
        req: Request<pb::AttachSnapshotRequest>,
    ) -> Result<Response<pb::AttachSnapshotResponse>, Status> {
        let pb::AttachSnapshotRequest { volume, name, require_unix, protocol } = req.get_ref().clone();
        let api_local = req.local_addr();
        let target = format!("snapshot {volume}@{name}");
        let (a, uri, unix_uri) = self
            .run_mut(&req, "SnapshotService/AttachSnapshot", target, move |cp, owner| {
                let protocol = super::validate::validate_protocol(&protocol, require_unix)?;
                let a = cp.attach_snapshot_over(owner, &volume, &name, require_unix, protocol)?;
                let (uri, unix_uri) = match a.protocol {
                    Protocol::Nbd => (cp.tcp_uri(&a.token, api_local), cp.unix_uri(&a.token).unwrap_or_default()),
                    Protocol::VhostUser => (String::new(), String::new()),
                };
                Ok((a, uri, unix_uri))
            })
            .await?;
        Ok(Response::new(pb::AttachSnapshotResponse {
            uri,
            unix_uri,
            export_name: a.token,
            snapshot: Some(a.snapshot),
            protocol: a.protocol.name().to_string(),
            vhost_user_socket: a.socket.map(|p| p.display().to_string()).unwrap_or_default(),
        }))
    }

    async fn detach_snapshot(
        &self,
        req: Request<pb::DetachSnapshotRequest>,
    ) -> Result<Response<pb::DetachSnapshotResponse>, Status> {
        let pb::DetachSnapshotRequest { volume, name } = req.get_ref().clone();
        let target = format!("snapshot {volume}@{name}");
        let was_attached = self
            .run_mut(&req, "SnapshotService/DetachSnapshot", target, move |cp, owner| {
                cp.detach_snapshot(owner, &volume, &name)
            })
            .await?;
        Ok(Response::new(pb::DetachSnapshotResponse { was_attached }))
    }
}
