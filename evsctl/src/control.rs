//! `evsctl tenant | server | audit`: tenants and quotas (admin), servers, the audit log (admin).
//!
//! JSON shapes:
//! * `tenant create`: `{"tenant": tenant, "token"}`; `tenant show | set-quota`: the tenant
//!   `{"name","created_unix","max_volumes","max_capacity_bytes","volumes","capacity_bytes"}`
//!   (quotas 0 = unlimited); `tenant list`: `{"tenants": [...]}`; `tenant delete`:
//!   `{"name","deleted": true}`;
//! * `server create | show`: `{"name","id","volumes": [names],"created_unix"}`; `server list`:
//!   `{"servers": [...]}`; `server delete`: `{"name","deleted": true}`;
//! * `audit list`: `{"entries": [{"seq","time_unix_ms","tenant","method","target","result",
//!   "message"}]}`.

use std::fmt::Write as _;

use anyhow::Context;
use evs_proto::v1 as pb;
use serde::Serialize;

use crate::cli::{AuditCommand, OutputFormat, ServerCommand, TenantCommand};
use crate::client::{AuditClient, ServerClient, ServerError, TenantClient};
use crate::output::{format_time, json, table, DeleteView};
use crate::size::format_size;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TenantView {
    pub name: String,
    pub created_unix: u64,
    pub max_volumes: u64,
    pub max_capacity_bytes: u64,
    pub volumes: u64,
    pub capacity_bytes: u64,
}

impl From<pb::Tenant> for TenantView {
    fn from(t: pb::Tenant) -> Self {
        TenantView {
            name: t.name,
            created_unix: t.created_unix,
            max_volumes: t.max_volumes,
            max_capacity_bytes: t.max_capacity_bytes,
            volumes: t.volumes,
            capacity_bytes: t.capacity_bytes,
        }
    }
}

#[derive(Debug, Serialize)]
struct TenantCreated {
    tenant: TenantView,
    token: String,
}

#[derive(Debug, Serialize)]
struct TenantList {
    tenants: Vec<TenantView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServerView {
    pub name: String,
    pub id: u64,
    pub volumes: Vec<String>,
    pub created_unix: u64,
}

impl From<pb::Server> for ServerView {
    fn from(s: pb::Server) -> Self {
        ServerView { name: s.name, id: s.id, volumes: s.volumes, created_unix: s.created_unix }
    }
}

#[derive(Debug, Serialize)]
struct ServerList {
    servers: Vec<ServerView>,
}

#[derive(Debug, Serialize)]
struct AuditView {
    seq: u64,
    time_unix_ms: u64,
    tenant: String,
    method: String,
    target: String,
    result: String,
    message: String,
}

#[derive(Debug, Serialize)]
struct AuditList {
    entries: Vec<AuditView>,
}

fn quota(n: u64, f: impl Fn(u64) -> String) -> String {
    if n == 0 {
        "unlimited".into()
    } else {
        f(n)
    }
}

fn tenant_detail(t: &TenantView) -> String {
    let rows = [
        ("name", t.name.clone()),
        ("volumes", format!("{} of {}", t.volumes, quota(t.max_volumes, |n| n.to_string()))),
        ("capacity", format!("{} of {}", format_size(t.capacity_bytes), quota(t.max_capacity_bytes, format_size))),
        ("created", if t.created_unix == 0 { "-".into() } else { format_time(t.created_unix) }),
    ];
    let mut out = String::new();
    for (k, v) in rows {
        let _ = writeln!(out, "{:<10} {v}", format!("{k}:"));
    }
    out
}

fn tenant_table(ts: &[TenantView]) -> String {
    let header = ["NAME", "VOLUMES", "MAX_VOLUMES", "CAPACITY", "MAX_CAPACITY"].map(String::from).to_vec();
    let rows: Vec<Vec<String>> = ts
        .iter()
        .map(|t| {
            vec![
                t.name.clone(),
                t.volumes.to_string(),
                quota(t.max_volumes, |n| n.to_string()),
                format_size(t.capacity_bytes),
                quota(t.max_capacity_bytes, format_size),
            ]
        })
        .collect();
    table(&header, &rows)
}

fn server_detail(s: &ServerView) -> String {
    format!(
        "name:      {}\nid:        {}\nvolumes:   {}\ncreated:   {}\n",
        s.name,
        s.id,
        s.volumes.join(","),
        format_time(s.created_unix)
    )
}

fn server_table(ss: &[ServerView]) -> String {
    if ss.is_empty() {
        return "no servers\n".to_string();
    }
    let header = ["NAME", "VOLUMES", "CREATED"].map(String::from).to_vec();
    let rows: Vec<Vec<String>> =
        ss.iter().map(|s| vec![s.name.clone(), s.volumes.join(","), format_time(s.created_unix)]).collect();
    table(&header, &rows)
}

pub async fn tenant(c: &mut TenantClient, cmd: TenantCommand, format: OutputFormat) -> anyhow::Result<String> {
    let one = |t: Option<pb::Tenant>| -> anyhow::Result<String> {
        let t = TenantView::from(t.context("the server's reply carries no tenant")?);
        Ok(match format {
            OutputFormat::Json => json(&t),
            OutputFormat::Table => tenant_detail(&t),
        })
    };
    Ok(match cmd {
        TenantCommand::Create { name, max_volumes, max_capacity } => {
            let r = c
                .create_tenant(pb::CreateTenantRequest {
                    name,
                    max_volumes: max_volumes.unwrap_or(0),
                    max_capacity_bytes: max_capacity.unwrap_or(0),
                })
                .await
                .map_err(ServerError::from)?
                .into_inner();
            let tenant = TenantView::from(r.tenant.context("the server's reply carries no tenant")?);
            match format {
                OutputFormat::Json => json(&TenantCreated { tenant, token: r.token }),
                // Just the token, so `TOKEN=$(evsctl tenant create t1)` works.
                OutputFormat::Table => format!("{}\n", r.token),
            }
        }
        TenantCommand::List => {
            let r = c.list_tenants(pb::ListTenantsRequest {}).await.map_err(ServerError::from)?;
            let tenants: Vec<TenantView> = r.into_inner().tenants.into_iter().map(TenantView::from).collect();
            match format {
                OutputFormat::Json => json(&TenantList { tenants }),
                OutputFormat::Table => tenant_table(&tenants),
            }
        }
        TenantCommand::Show { name } => {
            let r = c.get_tenant(pb::GetTenantRequest { name }).await.map_err(ServerError::from)?;
            one(r.into_inner().tenant)?
        }
        TenantCommand::Delete { name } => {
            c.delete_tenant(pb::DeleteTenantRequest { name: name.clone() }).await.map_err(ServerError::from)?;
            match format {
                OutputFormat::Json => json(&DeleteView { name, deleted: true }),
                OutputFormat::Table => format!("deleted tenant {name}\n"),
            }
        }
        TenantCommand::SetQuota { name, max_volumes, max_capacity } => {
            anyhow::ensure!(
                max_volumes.is_some() || max_capacity.is_some(),
                "nothing to set: give --max-volumes and/or --max-capacity"
            );
            let r = c
                .set_tenant_quota(pb::SetTenantQuotaRequest { name, max_volumes, max_capacity_bytes: max_capacity })
                .await
                .map_err(ServerError::from)?;
            one(r.into_inner().tenant)?
        }
    })
}

pub async fn server(c: &mut ServerClient, cmd: ServerCommand, format: OutputFormat) -> anyhow::Result<String> {
    let one = |s: Option<pb::Server>| -> anyhow::Result<String> {
        let s = ServerView::from(s.context("the server's reply carries no server")?);
        Ok(match format {
            OutputFormat::Json => json(&s),
            OutputFormat::Table => server_detail(&s),
        })
    };
    Ok(match cmd {
        ServerCommand::Create { name, volumes } => {
            let r = c.create_server(pb::CreateServerRequest { name, volumes }).await.map_err(ServerError::from)?;
            one(r.into_inner().server)?
        }
        ServerCommand::List => {
            let r = c.list_servers(pb::ListServersRequest {}).await.map_err(ServerError::from)?;
            let servers: Vec<ServerView> = r.into_inner().servers.into_iter().map(ServerView::from).collect();
            match format {
                OutputFormat::Json => json(&ServerList { servers }),
                OutputFormat::Table => server_table(&servers),
            }
        }
        ServerCommand::Show { name } => {
            let r = c.get_server(pb::GetServerRequest { name }).await.map_err(ServerError::from)?;
            one(r.into_inner().server)?
        }
        ServerCommand::Delete { name } => {
            c.delete_server(pb::DeleteServerRequest { name: name.clone() }).await.map_err(ServerError::from)?;
            match format {
                OutputFormat::Json => json(&DeleteView { name, deleted: true }),
                OutputFormat::Table => format!("deleted server {name}\n"),
            }
        }
    })
}

pub async fn audit(c: &mut AuditClient, cmd: AuditCommand, format: OutputFormat) -> anyhow::Result<String> {
    let AuditCommand::List { tenant, limit } = cmd;
    let r = c
        .list_audit(pb::ListAuditRequest { tenant: tenant.unwrap_or_default(), limit })
        .await
        .map_err(ServerError::from)?;
    let entries: Vec<AuditView> = r
        .into_inner()
        .entries
        .into_iter()
        .map(|e| AuditView {
            seq: e.seq,
            time_unix_ms: e.time_unix_ms,
            tenant: e.tenant,
            method: e.method,
            target: e.target,
            result: e.result,
            message: e.message,
        })
        .collect();
    Ok(match format {
        OutputFormat::Json => json(&AuditList { entries }),
        OutputFormat::Table => {
            if entries.is_empty() {
                return Ok("no audit entries\n".into());
            }
            let header = ["SEQ", "TIME", "TENANT", "METHOD", "TARGET", "RESULT"].map(String::from).to_vec();
            let rows: Vec<Vec<String>> = entries
                .iter()
                .map(|e| {
                    let result =
                        if e.message.is_empty() { e.result.clone() } else { format!("{}: {}", e.result, e.message) };
                    vec![
                        e.seq.to_string(),
                        format_time(e.time_unix_ms / 1000),
                        e.tenant.clone(),
                        e.method.clone(),
                        e.target.clone(),
                        result,
                    ]
                })
                .collect();
            table(&header, &rows)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_rendering() {
        let t = TenantView {
            name: "t1".into(),
            created_unix: 1_700_000_000,
            max_volumes: 0,
            max_capacity_bytes: 10 << 30,
            volumes: 2,
            capacity_bytes: 3 << 30,
        };
        let d = tenant_detail(&t);
        assert!(d.contains("volumes:   2 of unlimited\n"), "{d}");
        assert!(d.contains("capacity:  3 GiB of 10 GiB\n"), "{d}");
        let tab = tenant_table(&[t]);
        assert!(tab.lines().nth(1).unwrap().starts_with("t1    2        unlimited    3 GiB     10 GiB"), "{tab}");
    }

    #[test]
    fn server_rendering() {
        let s = ServerView { name: "vm1".into(), id: 3, volumes: vec!["a".into(), "b".into()], created_unix: 0 };
        assert!(server_detail(&s).contains("volumes:   a,b\n"));
        assert!(server_table(&[s]).lines().nth(1).unwrap().starts_with("vm1   a,b"));
        assert_eq!(server_table(&[]), "no servers\n");
    }
}
