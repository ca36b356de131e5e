//! The audit log: who did what, when, with what result — one entry per mutating API call and
//! per refused authentication.
//!
//! Entries live in the catalog table `audit` (sequence number → JSON record), written after the
//! call ran, in their own transaction: a call that changed something is never undone because
//! its entry could not be written (that failure is logged instead). The table keeps the newest
//! [`AUDIT_KEEP`] entries; older ones are trimmed in batches.
//!
//! Record (JSON, version 1): `{"v":1,"t":unix_ms,"tenant","method","target","result","message"}`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use evs_proto::v1 as pb;
use evs_proto::v1::audit_service_server::AuditService;
use evs_snapshot::StoreError;
use tonic::{Request, Response, Status};

use super::validate::validate_tenant_name;
use super::{ApiError, ControlPlane, VolumeApi};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

/// Sequence number → encoded [`Record`].
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");

/// Entries kept.
pub const AUDIT_KEEP: u64 = 100_000;
/// Entries trimmed at once when the log is over [`AUDIT_KEEP`].
const TRIM_BATCH: u64 = 1000;
/// Largest `limit` of a listing.
pub const MAX_LIST: u32 = 10_000;
/// `limit` 0 means this many.
pub const DEFAULT_LIST: u32 = 100;
/// The tenant recorded when authentication failed.
pub const UNAUTHENTICATED: &str = "-";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    v: u32,
    t: u64,
    tenant: String,
    method: String,
    target: String,
    result: String,
    message: String,
}

/// The audit log over the catalog.
pub struct AuditLog {
    next: AtomicU64,
}

impl AuditLog {
    /// Creates the table if needed and finds the next sequence number.
    pub fn open(db: &Database) -> Result<AuditLog, StoreError> {
        let w = db.begin_write()?;
        let next = {
            let t = w.open_table(AUDIT)?;
            let last = t.last()?.map(|(k, _)| k.value());
            last.map_or(1, |k| k + 1)
        };
        w.commit()?;
        Ok(AuditLog { next: AtomicU64::new(next) })
    }

    /// Appends an entry. `result` is "OK" or a gRPC code name.
    pub fn record(
        &self,
        db: &Database,
        tenant: &str,
        method: &str,
        target: &str,
        result: &str,
        message: &str,
    ) -> Result<(), StoreError> {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        let rec = Record {
            v: 1,
            t: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
            tenant: tenant.to_string(),
            method: method.to_string(),
            target: target.to_string(),
            result: result.to_string(),
            message: message.to_string(),
        };
        let bytes = serde_json::to_vec(&rec).map_err(|e| StoreError::Catalog(e.to_string()))?;
        let w = db.begin_write()?;
        {
            let mut t = w.open_table(AUDIT)?;
            t.insert(seq, bytes.as_slice())?;
            if t.len()? > AUDIT_KEEP + TRIM_BATCH {
                let first = t.first()?.map(|(k, _)| k.value()).unwrap_or(seq);
                t.retain_in(first..first + TRIM_BATCH, |_, _| false)?;
            }
        }
        w.commit()?;
        Ok(())
    }

    /// The newest `limit` entries (oldest first), of `tenant` only when it is not empty.
    pub fn list(&self, db: &Database, tenant: &str, limit: u32) -> Result<Vec<pb::AuditEntry>, StoreError> {
        let limit = if limit == 0 { DEFAULT_LIST } else { limit.min(MAX_LIST) } as usize;
        let r = db.begin_read()?;
        let t = r.open_table(AUDIT)?;
        let mut out = Vec::with_capacity(limit);
        for row in t.iter()?.rev() {
            let (k, v) = row?;
            let rec: Record = serde_json::from_slice(v.value())
                .map_err(|e| StoreError::Corrupt { what: "audit log".into(), why: e.to_string() })?;
            if !tenant.is_empty() && rec.tenant != tenant {
                continue;
            }
            out.push(pb::AuditEntry {
                seq: k.value(),
                time_unix_ms: rec.t,
                tenant: rec.tenant,
                method: rec.method,
                target: rec.target,
                result: rec.result,
                message: rec.message,
            });
            if out.len() == limit {
                break;
            }
        }
        out.reverse();
        Ok(out)
    }
}

impl ControlPlane {
    /// The newest `limit` audit entries, of `tenant` only when not empty (admin only).
    pub fn list_audit(&self, caller: &str, tenant: &str, limit: u32) -> Result<Vec<pb::AuditEntry>, ApiError> {
        self.require_admin(caller, "reading the audit log")?;
        if !tenant.is_empty() && tenant != UNAUTHENTICATED {
            validate_tenant_name(tenant)?;
        }
        Ok(self.audit.list(self.store.catalog(), tenant, limit)?)
    }
}

#[tonic::async_trait]
impl AuditService for VolumeApi {
    async fn list_audit(&self, req: Request<pb::ListAuditRequest>) -> Result<Response<pb::ListAuditResponse>, Status> {
        let pb::ListAuditRequest { tenant, limit } = req.get_ref().clone();
        let entries =
            self.run(&req, "AuditService/ListAudit", move |cp, caller| cp.list_audit(caller, &tenant, limit)).await?;
        Ok(Response::new(pb::ListAuditResponse { entries }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_kept_in_order_filtered_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("c.redb")).unwrap();
        let log = AuditLog::open(&db).unwrap();
        log.record(&db, "admin", "VolumeService/CreateVolume", "volume a", "OK", "").unwrap();
        log.record(&db, "t1", "VolumeService/DeleteVolume", "volume b", "NOT_FOUND", "volume \"b\" not found").unwrap();
        log.record(&db, "admin", "VolumeService/DeleteVolume", "volume a", "OK", "").unwrap();
        let all = log.list(&db, "", 0).unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(all[1].result, "NOT_FOUND");
        assert!(all[0].time_unix_ms > 0);
        let admin = log.list(&db, "admin", 0).unwrap();
        assert_eq!(admin.iter().map(|e| e.target.as_str()).collect::<Vec<_>>(), vec!["volume a", "volume a"]);
        let newest = log.list(&db, "", 1).unwrap();
        assert_eq!(newest[0].seq, 3);
        // A reopen (a restart) continues the sequence.
        let log = AuditLog::open(&db).unwrap();
        log.record(&db, "admin", "m", "x", "OK", "").unwrap();
        assert_eq!(log.list(&db, "", 0).unwrap().last().unwrap().seq, 4, "sequence numbers continue");
    }
}
