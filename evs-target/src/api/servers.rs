//! Servers: named sets of a tenant's volumes (a VM's disks), the unit of server backup (CSBS)
//! and disaster recovery (sDRS): `ServerService`.
//!
//! Catalog tables:
//! * `servers`: `"<tenant>/<name>"` → JSON `{"v":1,"id","volumes":[volume ids],"created"}`
//!   (names cannot hold '/', so the key is unambiguous);
//! * `volume_servers`: volume id → the server's key, so a volume belongs to one server at most
//!   and a volume in a server cannot be deleted before the server is.
//! * `control_counters`: `"server"` → the last server id given (ids are never reused).

use std::time::{SystemTime, UNIX_EPOCH};

use evs_proto::v1 as pb;
use evs_proto::v1::server_service_server::ServerService;
use evs_snapshot::StoreError;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use super::validate::{validate_server_name, validate_volume_name, ValidationError};
use super::{ApiError, ControlPlane, VolumeApi};

pub(super) const SERVERS: TableDefinition<&str, &[u8]> = TableDefinition::new("servers");
pub(super) const VOLUME_SERVERS: TableDefinition<u64, &str> = TableDefinition::new("volume_servers");
pub(super) const CONTROL_COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("control_counters");

/// Most volumes a server may hold (a VM's disk slots).
pub const MAX_SERVER_VOLUMES: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerRecord {
    pub v: u32,
    pub id: u64,
    pub volumes: Vec<u64>,
    pub created: u64,
}

fn key(owner: &str, name: &str) -> String {
    format!("{owner}/{name}")
}

fn decode(bytes: &[u8], what: &str) -> Result<ServerRecord, StoreError> {
    serde_json::from_slice(bytes)
        .map_err(|e| StoreError::Corrupt { what: format!("server record {what}"), why: e.to_string() })
}

impl ControlPlane {
    /// The tenant's server `name` and the ids of its volumes.
    pub fn find_server(&self, owner: &str, name: &str) -> Result<ServerRecord, ApiError> {
        validate_server_name(name)?;
        let r = self.store.catalog().begin_read().map_err(StoreError::from)?;
        let t = r.open_table(SERVERS).map_err(StoreError::from)?;
        let k = key(owner, name);
        match t.get(k.as_str()).map_err(StoreError::from)? {
            Some(v) => Ok(decode(v.value(), &k)?),
            None => Err(ApiError::ServerNotFound(name.to_string())),
        }
    }

    /// The server a volume belongs to, by name.
    pub fn server_of(&self, volume_id: u64) -> Result<Option<String>, StoreError> {
        let r = self.store.catalog().begin_read()?;
        let t = r.open_table(VOLUME_SERVERS)?;
        Ok(t.get(volume_id)?.map(|k| k.value().split_once('/').map_or("", |(_, n)| n).to_string()))
    }

    fn describe_server(&self, owner: &str, name: &str, rec: &ServerRecord) -> Result<pb::Server, ApiError> {
        let mut volumes = Vec::with_capacity(rec.volumes.len());
        for id in &rec.volumes {
            match self.store.volume_info(*id) {
                Ok(v) if v.owner == owner => volumes.push(v.name),
                Ok(_) | Err(StoreError::VolumeNotFound(_)) => {
                    tracing::warn!(server = name, volume_id = id, "a server lists a volume that is gone")
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(pb::Server { name: name.to_string(), id: rec.id, volumes, created_unix: rec.created })
    }

    pub fn create_server(&self, owner: &str, name: &str, volumes: &[String]) -> Result<pb::Server, ApiError> {
        validate_server_name(name)?;
        if volumes.is_empty()
            || volumes.len() > MAX_SERVER_VOLUMES
            || volumes.iter().enumerate().any(|(i, v)| volumes[..i].contains(v))
        {
            return Err(ValidationError::ServerVolumes { got: volumes.len(), max: MAX_SERVER_VOLUMES }.into());
        }
        for v in volumes {
            validate_volume_name(v)?;
        }
        let _g = self.mutations.lock();
        let mut ids = Vec::with_capacity(volumes.len());
        for v in volumes {
            let info = self.find_live(owner, v)?;
            if let Some(s) = self.server_of(info.id)? {
                return Err(ApiError::VolumeInServer { volume: v.clone(), server: s });
            }
            ids.push(info.id);
        }
        let k = key(owner, name);
        let w = self.store.catalog().begin_write().map_err(StoreError::from)?;
        let rec = {
            let mut servers = w.open_table(SERVERS).map_err(StoreError::from)?;
            if servers.get(k.as_str()).map_err(StoreError::from)?.is_some() {
                return Err(ApiError::ServerExists(name.to_string()));
            }
            let mut counters = w.open_table(CONTROL_COUNTERS).map_err(StoreError::from)?;
            let id = counters.get("server").map_err(StoreError::from)?.map_or(0, |g| g.value()) + 1;
            counters.insert("server", id).map_err(StoreError::from)?;
            let created = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            let rec = ServerRecord { v: 1, id, volumes: ids.clone(), created };
            let bytes = serde_json::to_vec(&rec).map_err(|e| StoreError::Catalog(e.to_string()))?;
            servers.insert(k.as_str(), bytes.as_slice()).map_err(StoreError::from)?;
            let mut members = w.open_table(VOLUME_SERVERS).map_err(StoreError::from)?;
            for id in &ids {
                members.insert(*id, k.as_str()).map_err(StoreError::from)?;
            }
            rec
        };
        w.commit().map_err(StoreError::from)?;
        tracing::info!(owner, server = name, volumes = ids.len(), "server created");
        self.describe_server(owner, name, &rec)
    }

    /// Every server of `owner`: (name, record), by name.
    fn server_rows(&self, owner: &str) -> Result<Vec<(String, ServerRecord)>, StoreError> {
        let prefix = format!("{owner}/");
        let r = self.store.catalog().begin_read()?;
        let t = r.open_table(SERVERS)?;
        let mut rows = Vec::new();
        // Keys with one prefix are contiguous in key order.
        for row in t.range(prefix.as_str()..)? {
            let (k, v) = row?;
            let Some(name) = k.value().strip_prefix(prefix.as_str()) else { break };
            rows.push((name.to_string(), decode(v.value(), k.value())?));
        }
        Ok(rows)
    }

    pub fn list_servers(&self, owner: &str) -> Result<Vec<pb::Server>, ApiError> {
        self.server_rows(owner)?.iter().map(|(name, rec)| self.describe_server(owner, name, rec)).collect()
    }

    pub fn get_server(&self, owner: &str, name: &str) -> Result<pb::Server, ApiError> {
        let rec = self.find_server(owner, name)?;
        self.describe_server(owner, name, &rec)
    }

    /// Deletes the grouping; the volumes stay.
    pub fn delete_server(&self, owner: &str, name: &str) -> Result<(), ApiError> {
        let _g = self.mutations.lock();
        let rec = self.find_server(owner, name)?;
        self.remove_server_rows(&key(owner, name), &rec)?;
        tracing::info!(owner, server = name, "server deleted");
        Ok(())
    }

    fn remove_server_rows(&self, k: &str, rec: &ServerRecord) -> Result<(), StoreError> {
        let w = self.store.catalog().begin_write()?;
        {
            w.open_table(SERVERS)?.remove(k)?;
            let mut members = w.open_table(VOLUME_SERVERS)?;
            for id in &rec.volumes {
                members.remove(*id)?;
            }
        }
        w.commit()?;
        Ok(())
    }

    /// Removes every server of a tenant being deleted (its volumes are gone already).
    pub(super) fn delete_servers_of(&self, owner: &str) -> Result<(), ApiError> {
        for (name, rec) in self.server_rows(owner)? {
            self.remove_server_rows(&key(owner, &name), &rec)?;
        }
        Ok(())
    }

    /// The names of a server's volumes, for a group snapshot of it.
    pub fn server_volume_names(&self, owner: &str, server: &str) -> Result<Vec<String>, ApiError> {
        Ok(self.get_server(owner, server)?.volumes)
    }
}

#[tonic::async_trait]
impl ServerService for VolumeApi {
    async fn create_server(
        &self,
        req: Request<pb::CreateServerRequest>,
    ) -> Result<Response<pb::CreateServerResponse>, Status> {
        let pb::CreateServerRequest { name, volumes } = req.get_ref().clone();
        let target = format!("server {name}");
        let server = self
            .run_mut(&req, "ServerService/CreateServer", target, move |cp, owner| {
                cp.create_server(owner, &name, &volumes)
            })
            .await?;
        Ok(Response::new(pb::CreateServerResponse { server: Some(server) }))
    }

    async fn list_servers(
        &self,
        req: Request<pb::ListServersRequest>,
    ) -> Result<Response<pb::ListServersResponse>, Status> {
        let servers = self.run(&req, "ServerService/ListServers", |cp, owner| cp.list_servers(owner)).await?;
        Ok(Response::new(pb::ListServersResponse { servers }))
    }

    async fn get_server(&self, req: Request<pb::GetServerRequest>) -> Result<Response<pb::GetServerResponse>, Status> {
        let name = req.get_ref().name.clone();
        let server = self.run(&req, "ServerService/GetServer", move |cp, owner| cp.get_server(owner, &name)).await?;
        Ok(Response::new(pb::GetServerResponse { server: Some(server) }))
    }

    async fn delete_server(
        &self,
        req: Request<pb::DeleteServerRequest>,
    ) -> Result<Response<pb::DeleteServerResponse>, Status> {
        let name = req.get_ref().name.clone();
        let target = format!("server {name}");
        self.run_mut(&req, "ServerService/DeleteServer", target, move |cp, owner| cp.delete_server(owner, &name))
            .await?;
        Ok(Response::new(pb::DeleteServerResponse {}))
    }
}
