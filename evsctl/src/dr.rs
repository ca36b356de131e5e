//! `evsctl dr`: disaster recovery between AZs (protection groups, drills, switchover,
//! failover, reprotect).
//!
//! JSON shapes:
//! * a group (`dr group create | show`, `dr status`, `dr enable | disable | unprotect`):
//!   `{"name","role","state","az","peer_endpoint","peer_az","interval_seconds",
//!   "bandwidth_limit_bytes_per_second","enabled","servers","pairs":[{"server","volume",
//!   "state","size_bytes","synced_bytes","point_seq","point_unix_ms","rpo_seconds",
//!   "bytes_transferred","bytes_replicated"}],"point_seq","point_unix_ms","rpo_seconds",
//!   "bytes_transferred","bytes_replicated","cycles","last_error","drill"}`;
//!   `dr group list`: `{"groups": [...]}`;
//! * `dr protect | switchover | failover | reprotect`: `{"job": job}` (as it ended with
//!   `--wait`);
//! * `dr drill start`: `{"point_seq","volumes":[{"volume","drill_volume","uri","unix_uri"}]}`.

use std::fmt::Write as _;

use anyhow::Context;
use evs_proto::v1 as pb;
use serde::Serialize;

use crate::cli::{DrCommand, DrDrillCommand, DrGroupCommand, OutputFormat};
use crate::client::{DrClient, JobClient, ServerError};
use crate::output::{format_time, json, table, DeleteView, JobView};
use crate::size::format_size;
use crate::wait;

#[derive(Debug, Serialize)]
struct PairView {
    server: String,
    volume: String,
    state: String,
    size_bytes: u64,
    synced_bytes: u64,
    point_seq: u64,
    point_unix_ms: u64,
    rpo_seconds: f64,
    bytes_transferred: u64,
    bytes_replicated: u64,
}

#[derive(Debug, Serialize)]
struct GroupView {
    name: String,
    role: String,
    state: String,
    az: String,
    peer_endpoint: String,
    peer_az: String,
    interval_seconds: u64,
    bandwidth_limit_bytes_per_second: u64,
    enabled: bool,
    servers: Vec<String>,
    pairs: Vec<PairView>,
    point_seq: u64,
    point_unix_ms: u64,
    rpo_seconds: f64,
    bytes_transferred: u64,
    bytes_replicated: u64,
    cycles: u64,
    last_error: Option<String>,
    drill: bool,
}

impl From<pb::Group> for GroupView {
    fn from(g: pb::Group) -> Self {
        GroupView {
            name: g.name,
            role: g.role,
            state: g.state,
            az: g.az,
            peer_endpoint: g.peer_endpoint,
            peer_az: g.peer_az,
            interval_seconds: g.interval_seconds,
            bandwidth_limit_bytes_per_second: g.bandwidth_limit_bytes_per_second,
            enabled: g.enabled,
            servers: g.servers,
            pairs: g
                .pairs
                .into_iter()
                .map(|p| PairView {
                    server: p.server,
                    volume: p.volume,
                    state: p.state,
                    size_bytes: p.size_bytes,
                    synced_bytes: p.synced_bytes,
                    point_seq: p.point_seq,
                    point_unix_ms: p.point_unix_ms,
                    rpo_seconds: p.rpo_seconds,
                    bytes_transferred: p.bytes_transferred,
                    bytes_replicated: p.bytes_replicated,
                })
                .collect(),
            point_seq: g.point_seq,
            point_unix_ms: g.point_unix_ms,
            rpo_seconds: g.rpo_seconds,
            bytes_transferred: g.bytes_transferred,
            bytes_replicated: g.bytes_replicated,
            cycles: g.cycles,
            last_error: Some(g.last_error).filter(|e| !e.is_empty()),
            drill: g.drill,
        }
    }
}

#[derive(Debug, Serialize)]
struct GroupList {
    groups: Vec<GroupView>,
}

#[derive(Debug, Serialize)]
struct JobOnly {
    job: JobView,
}

#[derive(Debug, Serialize)]
struct DrillView {
    point_seq: u64,
    volumes: Vec<DrillVolumeView>,
}

#[derive(Debug, Serialize)]
struct DrillVolumeView {
    volume: String,
    drill_volume: String,
    uri: String,
    unix_uri: Option<String>,
}

fn group_detail(g: &GroupView) -> String {
    let mut out = String::new();
    let point = if g.point_seq == 0 {
        "none yet".to_string()
    } else {
        format!("{} ({})", g.point_seq, format_time(g.point_unix_ms / 1000))
    };
    let rows = [
        ("group", g.name.clone()),
        ("role", format!("{} (this AZ: {}, peer: {} at {})", g.role, g.az, g.peer_az, g.peer_endpoint)),
        ("state", g.state.clone()),
        ("interval", format!("{} s", g.interval_seconds)),
        ("point", point),
        ("rpo", if g.role == "source" { format!("{:.1} s", g.rpo_seconds) } else { "-".into() }),
        (
            "sent",
            format!(
                "{} on the wire for {} of data, {} cycles",
                format_size(g.bytes_transferred),
                format_size(g.bytes_replicated),
                g.cycles
            ),
        ),
        ("drill", if g.drill { "running" } else { "no" }.into()),
    ];
    for (k, v) in rows {
        let _ = writeln!(out, "{:<10} {v}", format!("{k}:"));
    }
    if let Some(e) = &g.last_error {
        let _ = writeln!(out, "error:     {e}");
    }
    if !g.pairs.is_empty() {
        let header = ["SERVER", "VOLUME", "STATE", "SIZE", "SYNCED", "POINT", "RPO", "SENT"].map(String::from).to_vec();
        let rows: Vec<Vec<String>> = g
            .pairs
            .iter()
            .map(|p| {
                let (point, rpo) = match p.point_seq {
                    0 => ("-".to_string(), "-".to_string()),
                    n if g.role == "source" => (n.to_string(), format!("{:.1} s", p.rpo_seconds)),
                    n => (n.to_string(), "-".to_string()),
                };
                vec![
                    p.server.clone(),
                    p.volume.clone(),
                    p.state.clone(),
                    format_size(p.size_bytes),
                    format_size(p.synced_bytes),
                    point,
                    rpo,
                    format_size(p.bytes_transferred),
                ]
            })
            .collect();
        out.push_str(&table(&header, &rows));
    }
    out
}

async fn job_outcome(
    jobs: &mut JobClient,
    job: Option<pb::Job>,
    wait: bool,
    what: &str,
    format: OutputFormat,
) -> anyhow::Result<String> {
    let job = job.context("the server's reply carries no job")?;
    let id = job.id;
    let (job, result) = wait::follow(jobs, job, wait, what).await?;
    let notes = job.notes.clone();
    let out = match format {
        OutputFormat::Json => json(&JobOnly { job: job.into() }),
        OutputFormat::Table if !wait => format!("{what}: job {id} (follow it with `evsctl job wait {id}`)\n"),
        OutputFormat::Table => notes.iter().map(|n| format!("{n}\n")).collect(),
    };
    if let Err(e) = result {
        crate::emit(&out)?;
        return Err(e.into());
    }
    Ok(out)
}

pub async fn dr(
    c: &mut DrClient,
    jobs: &mut JobClient,
    cmd: DrCommand,
    format: OutputFormat,
    default_ca: Option<std::path::PathBuf>,
) -> anyhow::Result<String> {
    let one = |g: Option<pb::Group>| -> anyhow::Result<String> {
        let g = GroupView::from(g.context("the server's reply carries no group")?);
        Ok(match format {
            OutputFormat::Json => json(&g),
            OutputFormat::Table => group_detail(&g),
        })
    };
    Ok(match cmd {
        DrCommand::Group(DrGroupCommand::Create {
            name,
            target,
            target_token,
            target_az,
            interval,
            bandwidth,
            source_endpoint,
            peer_ca_cert,
        }) => {
            let ca_cert_pem = match peer_ca_cert.or(default_ca) {
                Some(p) => std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?,
                None => String::new(),
            };
            let r = c
                .create_group(pb::CreateGroupRequest {
                    name,
                    target_endpoint: target,
                    target_token,
                    target_az: target_az.unwrap_or_default(),
                    interval_seconds: interval.unwrap_or(0),
                    bandwidth_limit_bytes_per_second: bandwidth.unwrap_or(0),
                    source_endpoint: source_endpoint.unwrap_or_default(),
                    ca_cert_pem,
                })
                .await
                .map_err(ServerError::from)?;
            one(r.into_inner().group)?
        }
        DrCommand::Group(DrGroupCommand::List) => {
            let r = c.list_groups(pb::ListGroupsRequest {}).await.map_err(ServerError::from)?;
            let groups: Vec<GroupView> = r.into_inner().groups.into_iter().map(GroupView::from).collect();
            match format {
                OutputFormat::Json => json(&GroupList { groups }),
                OutputFormat::Table if groups.is_empty() => "no DR groups\n".into(),
                OutputFormat::Table => {
                    let header =
                        ["GROUP", "ROLE", "STATE", "PEER_AZ", "POINT", "RPO", "SERVERS"].map(String::from).to_vec();
                    let rows: Vec<Vec<String>> = groups
                        .iter()
                        .map(|g| {
                            vec![
                                g.name.clone(),
                                g.role.clone(),
                                g.state.clone(),
                                g.peer_az.clone(),
                                g.point_seq.to_string(),
                                format!("{:.1}s", g.rpo_seconds),
                                g.servers.join(","),
                            ]
                        })
                        .collect();
                    table(&header, &rows)
                }
            }
        }
        DrCommand::Group(DrGroupCommand::Show { name }) => {
            one(c.get_group(pb::GetGroupRequest { name }).await.map_err(ServerError::from)?.into_inner().group)?
        }
        DrCommand::Group(DrGroupCommand::Delete { name }) => {
            c.delete_group(pb::DeleteGroupRequest { name: name.clone() }).await.map_err(ServerError::from)?;
            match format {
                OutputFormat::Json => json(&DeleteView { name, deleted: true }),
                OutputFormat::Table => format!("deleted DR group {name}\n"),
            }
        }
        DrCommand::Protect { group, server, wait } => {
            let r = c
                .protect(pb::ProtectRequest { group: group.clone(), server: server.clone() })
                .await
                .map_err(ServerError::from)?
                .into_inner();
            job_outcome(jobs, r.job, wait, &format!("protecting server {server} in group {group}"), format).await?
        }
        DrCommand::Unprotect { group, server } => one(c
            .unprotect(pb::UnprotectRequest { group, server })
            .await
            .map_err(ServerError::from)?
            .into_inner()
            .group)?,
        DrCommand::Enable { group } => {
            one(c.enable(pb::EnableRequest { group }).await.map_err(ServerError::from)?.into_inner().group)?
        }
        DrCommand::Disable { group } => {
            one(c.disable(pb::DisableRequest { group }).await.map_err(ServerError::from)?.into_inner().group)?
        }
        DrCommand::Status { group } => {
            one(c.status(pb::StatusRequest { group }).await.map_err(ServerError::from)?.into_inner().group)?
        }
        DrCommand::Drill(DrDrillCommand::Start { group }) => {
            let r = c.start_drill(pb::StartDrillRequest { group }).await.map_err(ServerError::from)?.into_inner();
            let view = DrillView {
                point_seq: r.point_seq,
                volumes: r
                    .volumes
                    .into_iter()
                    .map(|v| DrillVolumeView {
                        volume: v.volume,
                        drill_volume: v.drill_volume,
                        uri: v.uri,
                        unix_uri: Some(v.unix_uri).filter(|u| !u.is_empty()),
                    })
                    .collect(),
            };
            match format {
                OutputFormat::Json => json(&view),
                OutputFormat::Table => {
                    let mut s = format!("drill of point {} on the target:\n", view.point_seq);
                    for v in &view.volumes {
                        let _ = writeln!(s, "{} -> {} {}", v.volume, v.drill_volume, v.uri);
                    }
                    s
                }
            }
        }
        DrCommand::Drill(DrDrillCommand::Stop { group }) => {
            c.stop_drill(pb::StopDrillRequest { group: group.clone() }).await.map_err(ServerError::from)?;
            match format {
                OutputFormat::Json => json(&DeleteView { name: group, deleted: true }),
                OutputFormat::Table => format!("drill of group {group} stopped; its volumes are deleted\n"),
            }
        }
        DrCommand::Switchover { group, wait } => {
            let r = c.switchover(pb::SwitchoverRequest { group: group.clone() }).await.map_err(ServerError::from)?;
            job_outcome(jobs, r.into_inner().job, wait, &format!("switching over group {group}"), format).await?
        }
        DrCommand::Failover { group, wait } => {
            let r = c.failover(pb::FailoverRequest { group: group.clone() }).await.map_err(ServerError::from)?;
            job_outcome(jobs, r.into_inner().job, wait, &format!("failing over group {group}"), format).await?
        }
        DrCommand::Reprotect { group, wait } => {
            let r = c.reprotect(pb::ReprotectRequest { group: group.clone() }).await.map_err(ServerError::from)?;
            job_outcome(jobs, r.into_inner().job, wait, &format!("reprotecting group {group}"), format).await?
        }
    })
}
