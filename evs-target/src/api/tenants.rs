//! Tenants and their quotas: `TenantService`.
//!
//! A tenant is a name and a bearer token ([`super::auth`]: only the token's hash is stored).
//! Its quotas and creation time live in the catalog table `tenant_info` (name → JSON
//! `{"v":1,"created","max_volumes","max_capacity"}`, 0 = unlimited). A tenant without a row
//! (the `admin` tenant, and tenants of catalogs older than quotas) has no quotas.
//!
//! Quotas count volumes and their provisioned sizes (thin or not: that is what the tenant
//! pays for), checked under the control plane's mutation lock so two calls cannot both fit
//! into the last slot.

use std::time::{SystemTime, UNIX_EPOCH};

use evs_proto::v1 as pb;
use evs_proto::v1::tenant_service_server::TenantService;
use evs_snapshot::StoreError;
use redb::{ReadableDatabase, TableDefinition};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use super::auth::{self, ADMIN_TENANT};
use super::validate::{validate_tenant_name, HumanBytes};
use super::{ApiError, ControlPlane, VolumeApi};
use crate::config::Quota;

/// Tenant name → encoded [`TenantRecord`].
pub(super) const TENANT_INFO: TableDefinition<&str, &[u8]> = TableDefinition::new("tenant_info");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct TenantRecord {
    v: u32,
    created: u64,
    max_volumes: u64,
    max_capacity: u64,
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A tenant's volume count and provisioned capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub volumes: u64,
    pub capacity: u64,
}

impl ControlPlane {
    /// Refuses unless the caller is the admin tenant.
    pub(super) fn require_admin(&self, caller: &str, what: &'static str) -> Result<(), ApiError> {
        if caller == ADMIN_TENANT {
            Ok(())
        } else {
            Err(ApiError::PermissionDenied(what))
        }
    }

    fn tenant_record(&self, name: &str) -> Result<Option<TenantRecord>, StoreError> {
        let r = self.store.catalog().begin_read()?;
        let t = r.open_table(TENANT_INFO)?;
        let Some(v) = t.get(name)? else { return Ok(None) };
        serde_json::from_slice(v.value())
            .map(Some)
            .map_err(|e| StoreError::Corrupt { what: format!("tenant record of {name:?}"), why: e.to_string() })
    }

    fn put_tenant_record(&self, name: &str, rec: &TenantRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(rec).map_err(|e| StoreError::Catalog(e.to_string()))?;
        let w = self.store.catalog().begin_write()?;
        w.open_table(TENANT_INFO)?.insert(name, bytes.as_slice())?;
        w.commit()?;
        Ok(())
    }

    /// The quotas of `tenant` (none for a tenant without a record, such as `admin`).
    pub fn quota_of(&self, tenant: &str) -> Result<Quota, StoreError> {
        Ok(self
            .tenant_record(tenant)?
            .map(|r| Quota { max_volumes: r.max_volumes, max_capacity: r.max_capacity })
            .unwrap_or(Quota { max_volumes: 0, max_capacity: 0 }))
    }

    pub fn usage_of(&self, tenant: &str) -> Result<Usage, StoreError> {
        let vols = self.store.list_volumes(Some(tenant))?;
        Ok(Usage { volumes: vols.len() as u64, capacity: vols.iter().map(|v| v.size).sum() })
    }

    /// Checks that `tenant` may add `volumes` volumes and `capacity` bytes. Call under the
    /// mutation lock, before changing anything.
    pub(super) fn check_quota(&self, tenant: &str, volumes: u64, capacity: u64) -> Result<(), ApiError> {
        let q = self.quota_of(tenant)?;
        if q.max_volumes == 0 && q.max_capacity == 0 {
            return Ok(());
        }
        let u = self.usage_of(tenant)?;
        if q.max_volumes != 0 && u.volumes + volumes > q.max_volumes {
            return Err(ApiError::QuotaVolumes { tenant: tenant.to_string(), used: u.volumes, max: q.max_volumes });
        }
        if q.max_capacity != 0 && u.capacity.saturating_add(capacity) > q.max_capacity {
            return Err(ApiError::QuotaCapacity {
                tenant: tenant.to_string(),
                used: u.capacity,
                asked: capacity,
                max: q.max_capacity,
            });
        }
        Ok(())
    }

    fn describe_tenant(&self, name: &str) -> Result<pb::Tenant, ApiError> {
        let rec = self.tenant_record(name)?;
        let u = self.usage_of(name)?;
        Ok(pb::Tenant {
            name: name.to_string(),
            created_unix: rec.map_or(0, |r| r.created),
            max_volumes: rec.map_or(0, |r| r.max_volumes),
            max_capacity_bytes: rec.map_or(0, |r| r.max_capacity),
            volumes: u.volumes,
            capacity_bytes: u.capacity,
        })
    }

    /// Creates a tenant (admin only) with the given quotas (0: the defaults); returns it
    /// and its token.
    pub fn create_tenant(
        &self,
        caller: &str,
        name: &str,
        max_volumes: u64,
        max_capacity: u64,
    ) -> Result<(pb::Tenant, String), ApiError> {
        self.require_admin(caller, "creating tenants")?;
        validate_tenant_name(name)?;
        let _g = self.mutations.lock();
        if self.tenants.contains(name) {
            return Err(ApiError::TenantExists(name.to_string()));
        }
        let token = auth::new_token().map_err(|e| ApiError::Internal(e.to_string()))?;
        let rec = TenantRecord {
            v: 1,
            created: now_unix(),
            max_volumes: if max_volumes == 0 { self.default_quota.max_volumes } else { max_volumes },
            max_capacity: if max_capacity == 0 { self.default_quota.max_capacity } else { max_capacity },
        };
        // The record first: a crash before the token lands leaves a record of a tenant that
        // does not exist, which a later create with that name simply overwrites.
        self.put_tenant_record(name, &rec)?;
        self.tenants.insert(self.store.catalog(), name, &token)?;
        tracing::info!(tenant = name, "tenant created");
        Ok((self.describe_tenant(name)?, token))
    }

    pub fn list_tenants(&self, caller: &str) -> Result<Vec<pb::Tenant>, ApiError> {
        self.require_admin(caller, "listing tenants")?;
        let mut names = self.tenants.names();
        names.sort();
        names.iter().map(|n| self.describe_tenant(n)).collect()
    }

    /// A tenant: the admin sees any, a tenant itself only.
    pub fn get_tenant(&self, caller: &str, name: &str) -> Result<pb::Tenant, ApiError> {
        validate_tenant_name(name)?;
        if caller != name {
            self.require_admin(caller, "showing other tenants")?;
        }
        if !self.tenants.contains(name) {
            return Err(ApiError::TenantNotFound(name.to_string()));
        }
        self.describe_tenant(name)
    }

    /// Deletes a tenant that owns no volumes (admin only; not `admin` itself).
    pub fn delete_tenant(&self, caller: &str, name: &str) -> Result<(), ApiError> {
        self.require_admin(caller, "deleting tenants")?;
        validate_tenant_name(name)?;
        if name == ADMIN_TENANT {
            return Err(ApiError::AdminTenant);
        }
        let _g = self.mutations.lock();
        if !self.tenants.contains(name) {
            return Err(ApiError::TenantNotFound(name.to_string()));
        }
        let u = self.usage_of(name)?;
        if u.volumes > 0 {
            return Err(ApiError::TenantHasVolumes { tenant: name.to_string(), volumes: u.volumes });
        }
        self.delete_servers_of(name)?;
        self.tenants.remove(self.store.catalog(), name)?;
        let w = self.store.catalog().begin_write().map_err(StoreError::from)?;
        w.open_table(TENANT_INFO).map_err(StoreError::from)?.remove(name).map_err(StoreError::from)?;
        w.commit().map_err(StoreError::from)?;
        tracing::info!(tenant = name, "tenant deleted");
        Ok(())
    }

    /// Sets the given quotas of a tenant (admin only).
    pub fn set_tenant_quota(
        &self,
        caller: &str,
        name: &str,
        max_volumes: Option<u64>,
        max_capacity: Option<u64>,
    ) -> Result<pb::Tenant, ApiError> {
        self.require_admin(caller, "setting quotas")?;
        validate_tenant_name(name)?;
        let _g = self.mutations.lock();
        if !self.tenants.contains(name) {
            return Err(ApiError::TenantNotFound(name.to_string()));
        }
        let mut rec =
            self.tenant_record(name)?.unwrap_or(TenantRecord { v: 1, created: 0, max_volumes: 0, max_capacity: 0 });
        if let Some(v) = max_volumes {
            rec.max_volumes = v;
        }
        if let Some(c) = max_capacity {
            rec.max_capacity = c;
        }
        self.put_tenant_record(name, &rec)?;
        tracing::info!(
            tenant = name,
            max_volumes = rec.max_volumes,
            max_capacity = %HumanBytes(rec.max_capacity),
            "tenant quota set"
        );
        self.describe_tenant(name)
    }
}

#[tonic::async_trait]
impl TenantService for VolumeApi {
    async fn create_tenant(
        &self,
        req: Request<pb::CreateTenantRequest>,
    ) -> Result<Response<pb::CreateTenantResponse>, Status> {
        let pb::CreateTenantRequest { name, max_volumes, max_capacity_bytes } = req.get_ref().clone();
        let target = format!("tenant {name}");
        let (tenant, token) = self
            .run_mut(&req, "TenantService/CreateTenant", target, move |cp, caller| {
                cp.create_tenant(caller, &name, max_volumes, max_capacity_bytes)
            })
            .await?;
        Ok(Response::new(pb::CreateTenantResponse { tenant: Some(tenant), token }))
    }

    async fn list_tenants(
        &self,
        req: Request<pb::ListTenantsRequest>,
    ) -> Result<Response<pb::ListTenantsResponse>, Status> {
        let tenants = self.run(&req, "TenantService/ListTenants", |cp, caller| cp.list_tenants(caller)).await?;
        Ok(Response::new(pb::ListTenantsResponse { tenants }))
    }

    async fn get_tenant(&self, req: Request<pb::GetTenantRequest>) -> Result<Response<pb::GetTenantResponse>, Status> {
        let name = req.get_ref().name.clone();
        let tenant = self.run(&req, "TenantService/GetTenant", move |cp, caller| cp.get_tenant(caller, &name)).await?;
        Ok(Response::new(pb::GetTenantResponse { tenant: Some(tenant) }))
    }

    async fn delete_tenant(
        &self,
        req: Request<pb::DeleteTenantRequest>,
    ) -> Result<Response<pb::DeleteTenantResponse>, Status> {
        let name = req.get_ref().name.clone();
        let target = format!("tenant {name}");
        self.run_mut(&req, "TenantService/DeleteTenant", target, move |cp, caller| cp.delete_tenant(caller, &name))
            .await?;
        Ok(Response::new(pb::DeleteTenantResponse {}))
    }

    async fn set_tenant_quota(
        &self,
        req: Request<pb::SetTenantQuotaRequest>,
    ) -> Result<Response<pb::SetTenantQuotaResponse>, Status> {
        let pb::SetTenantQuotaRequest { name, max_volumes, max_capacity_bytes } = req.get_ref().clone();
        let target = format!("tenant {name}");
        let tenant = self
            .run_mut(&req, "TenantService/SetTenantQuota", target, move |cp, caller| {
                cp.set_tenant_quota(caller, &name, max_volumes, max_capacity_bytes)
            })
            .await?;
        Ok(Response::new(pb::SetTenantQuotaResponse { tenant: Some(tenant) }))
    }
}
