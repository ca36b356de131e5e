//! `evsctl backup | policy`: backups to object storage and the policies that take them.
//!
//! Commands that start a job print it and return, or with `--wait` follow it (a progress bar on
//! a terminal) and exit with its result (0 succeeded, 1 failed, 3 cancelled). `backup verify`
//! always waits: its result is the answer.
//!
//! JSON shapes:
//! * a backup: `{"id","kind","volume","server","server_backup","size_bytes","created_unix_ms",
//!   "mode","parent","az","encrypted","name","stats":{...},"volumes":[backup...]}`;
//!   `backup list`: `{"backups": [...]}`;
//! * `backup create | create-server`: `{"backup_id","job": job}`; `delete | restore | gc |
//!   verify`: `{"job": job}` (the job as it ended when waited for);
//! * a policy: `{"name","schedule","retention":{"keep_last",...},"volumes","servers",
//!   "created_unix","next_run_unix","last_run_unix"}`; `policy list`: `{"policies": [...]}`;
//!   `policy run`: `{"jobs": [job...]}`.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context;
use evs_proto::v1 as pb;
use serde::Serialize;

use crate::cli::{BackupCommand, OutputFormat, PolicyCommand};
use crate::client::{BackupClient, JobClient, PolicyClient, ServerError};
use crate::output::{format_time, json, table, DeleteView, JobView};
use crate::size::format_size;
use crate::wait;

#[derive(Debug, Clone, Serialize)]
pub struct StatsView {
    pub chunks: u64,
    pub chunks_zero: u64,
    pub chunks_read: u64,
    pub chunks_uploaded: u64,
    pub chunks_deduplicated: u64,
    pub bytes_read: u64,
    pub bytes_uploaded: u64,
    pub bytes_logical: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BackupView {
    pub id: String,
    pub kind: String,
    pub volume: Option<String>,
    pub server: Option<String>,
    pub server_backup: Option<String>,
    pub size_bytes: u64,
    pub created_unix_ms: u64,
    pub mode: String,
    pub parent: Option<String>,
    pub az: String,
    pub encrypted: bool,
    pub name: Option<String>,
    pub stats: Option<StatsView>,
    pub volumes: Vec<BackupView>,
}

fn some(s: String) -> Option<String> {
    Some(s).filter(|s| !s.is_empty())
}

impl From<pb::Backup> for BackupView {
    fn from(b: pb::Backup) -> Self {
        BackupView {
            id: b.id,
            kind: b.kind,
            volume: some(b.volume),
            server: some(b.server),
            server_backup: some(b.server_backup),
            size_bytes: b.size_bytes,
            created_unix_ms: b.created_unix_ms,
            mode: b.mode,
            parent: some(b.parent),
            az: b.az,
            encrypted: b.encrypted,
            name: some(b.name),
            stats: b.stats.map(|s| StatsView {
                chunks: s.chunks,
                chunks_zero: s.chunks_zero,
                chunks_read: s.chunks_read,
                chunks_uploaded: s.chunks_uploaded,
                chunks_deduplicated: s.chunks_deduplicated,
                bytes_read: s.bytes_read,
                bytes_uploaded: s.bytes_uploaded,
                bytes_logical: s.bytes_logical,
            }),
            volumes: b.volumes.into_iter().map(BackupView::from).collect(),
        }
    }
}

#[derive(Debug, Serialize)]
struct BackupList {
    backups: Vec<BackupView>,
}

#[derive(Debug, Serialize)]
struct Created {
    backup_id: String,
    job: JobView,
}

#[derive(Debug, Serialize)]
struct JobOnly {
    job: JobView,
}

#[derive(Debug, Serialize)]
struct KeyView {
    fingerprint: Option<String>,
}

fn backup_detail(b: &BackupView) -> String {
    let mut out = String::new();
    let what = match (&b.volume, &b.server) {
        (Some(v), _) => format!("volume {v}"),
        (_, Some(s)) => format!("server {s}"),
        _ => "-".into(),
    };
    let rows = [
        ("id", b.id.clone()),
        ("of", what),
        ("name", b.name.clone().unwrap_or_else(|| "-".into())),
        ("size", format_size(b.size_bytes)),
        ("mode", b.mode.clone()),
        ("parent", b.parent.clone().unwrap_or_else(|| "-".into())),
        ("created", format_time(b.created_unix_ms / 1000)),
        ("az", b.az.clone()),
        ("encrypted", if b.encrypted { "yes" } else { "no" }.into()),
    ];
    for (k, v) in rows {
        let _ = writeln!(out, "{:<10} {v}", format!("{k}:"));
    }
    if let Some(s) = &b.stats {
        let _ = writeln!(
            out,
            "chunks:    {} ({} read, {} uploaded = {}, {} deduplicated, {} zero)",
            s.chunks,
            s.chunks_read,
            s.chunks_uploaded,
            format_size(s.bytes_uploaded),
            s.chunks_deduplicated,
            s.chunks_zero
        );
    }
    for v in &b.volumes {
        let _ =
            writeln!(out, "volume:    {} {} ({})", v.id, v.volume.as_deref().unwrap_or("-"), format_size(v.size_bytes));
    }
    out
}

fn backup_table(bs: &[BackupView]) -> String {
    if bs.is_empty() {
        return "no backups\n".into();
    }
    let header = ["ID", "OF", "SIZE", "MODE", "UPLOADED", "CREATED", "NAME"].map(String::from).to_vec();
    let rows: Vec<Vec<String>> = bs
        .iter()
        .map(|b| {
            vec![
                b.id.clone(),
                b.volume.clone().or_else(|| b.server.clone().map(|s| format!("server {s}"))).unwrap_or_default(),
                format_size(b.size_bytes),
                b.mode.clone(),
                b.stats.as_ref().map(|s| format_size(s.bytes_uploaded)).unwrap_or_else(|| "-".into()),
                format_time(b.created_unix_ms / 1000),
                b.name.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    table(&header, &rows)
}

/// Prints a job (or follows it with `wait`) and returns the command's output; a job that did
/// not succeed is the command's error, after its output is printed.
async fn job_outcome(
    jobs: &mut JobClient,
    job: Option<pb::Job>,
    wait: bool,
    what: &str,
    format: OutputFormat,
    created: Option<String>,
) -> anyhow::Result<String> {
    let job = job.context("the server's reply carries no job")?;
    let id = job.id;
    let (job, result) = wait::follow(jobs, job, wait, what).await?;
    let view: JobView = job.clone().into();
    let out = match format {
        OutputFormat::Json => match created {
            Some(backup_id) => json(&Created { backup_id, job: view }),
            None => json(&JobOnly { job: view }),
        },
        OutputFormat::Table => {
            let mut s = String::new();
            if let Some(b) = &created {
                let _ = writeln!(s, "{b}");
            }
            if !wait {
                let _ = writeln!(s, "{what}: job {id} (follow it with `evsctl job wait {id}`)");
            } else if result.is_ok() {
                for n in &job.notes {
                    let _ = writeln!(s, "{n}");
                }
            }
            s
        }
    };
    if let Err(e) = result {
        crate::emit(&out)?;
        return Err(e.into());
    }
    Ok(out)
}

fn read_key(hex: Option<String>, file: Option<PathBuf>, clear: bool) -> anyhow::Result<String> {
    match (hex, file, clear) {
        (Some(h), None, false) => Ok(h.trim().to_string()),
        (None, Some(f), false) => Ok(std::fs::read_to_string(&f)
            .with_context(|| format!("cannot read the key file {}", f.display()))?
            .trim()
            .to_string()),
        (None, None, true) => Ok(String::new()),
        _ => anyhow::bail!("give exactly one of --key-hex, --key-file and --clear"),
    }
}

pub async fn backup(
    c: &mut BackupClient,
    jobs: &mut JobClient,
    cmd: BackupCommand,
    format: OutputFormat,
) -> anyhow::Result<String> {
    Ok(match cmd {
        BackupCommand::Create { volume, name, full, wait } => {
            let r = c
                .create_backup(pb::CreateBackupRequest { volume: volume.clone(), name: name.unwrap_or_default(), full })
                .await
                .map_err(ServerError::from)?
                .into_inner();
            job_outcome(jobs, r.job, wait, &format!("backing up volume {volume}"), format, Some(r.backup_id)).await?
        }
        BackupCommand::CreateServer { server, name, wait } => {
            let r = c
                .create_server_backup(pb::CreateServerBackupRequest {
                    server: server.clone(),
                    name: name.unwrap_or_default(),
                })
                .await
                .map_err(ServerError::from)?
                .into_inner();
            job_outcome(jobs, r.job, wait, &format!("backing up server {server}"), format, Some(r.backup_id)).await?
        }
        BackupCommand::List { volume, server } => {
            let r = c
                .list_backups(pb::ListBackupsRequest {
                    volume: volume.unwrap_or_default(),
                    server: server.unwrap_or_default(),
                })
                .await
                .map_err(ServerError::from)?;
            let backups: Vec<BackupView> = r.into_inner().backups.into_iter().map(BackupView::from).collect();
            match format {
                OutputFormat::Json => json(&BackupList { backups }),
                OutputFormat::Table => backup_table(&backups),
            }
        }
        BackupCommand::Show { id } => {
            let r = c.get_backup(pb::GetBackupRequest { id }).await.map_err(ServerError::from)?;
            let b = BackupView::from(r.into_inner().backup.context("the server's reply carries no backup")?);
            match format {
                OutputFormat::Json => json(&b),
                OutputFormat::Table => backup_detail(&b),
            }
        }
        BackupCommand::Delete { id, wait } => {
            let r = c.delete_backup(pb::DeleteBackupRequest { id: id.clone() }).await.map_err(ServerError::from)?;
            job_outcome(jobs, r.into_inner().job, wait, &format!("deleting backup {id}"), format, None).await?
        }
        BackupCommand::Restore { id, to, in_place, tier, wait } => {
            let r = c
                .restore_backup(pb::RestoreBackupRequest {
                    id: id.clone(),
                    to: to.unwrap_or_default(),
                    in_place,
                    tier: tier.unwrap_or_default(),
                })
                .await
                .map_err(ServerError::from)?;
            job_outcome(jobs, r.into_inner().job, wait, &format!("restoring backup {id}"), format, None).await?
        }
        BackupCommand::Verify { id } => {
            let r = c.verify_backup(pb::VerifyBackupRequest { id: id.clone() }).await.map_err(ServerError::from)?;
            job_outcome(jobs, r.into_inner().job, true, &format!("verifying backup {id}"), format, None).await?
        }
        BackupCommand::Gc { wait } => {
            let r = c.collect_garbage(pb::CollectGarbageRequest {}).await.map_err(ServerError::from)?;
            job_outcome(jobs, r.into_inner().job, wait, "collecting backup garbage", format, None).await?
        }
        BackupCommand::SetKey { key_hex, key_file, clear } => {
            let key_hex = read_key(key_hex, key_file, clear)?;
            let r = c.set_encryption_key(pb::SetEncryptionKeyRequest { key_hex }).await.map_err(ServerError::from)?;
            let fingerprint = some(r.into_inner().fingerprint);
            match format {
                OutputFormat::Json => json(&KeyView { fingerprint }),
                OutputFormat::Table => match fingerprint {
                    Some(f) => format!("backups are now encrypted; key fingerprint {f}\n"),
                    None => "backups are no longer encrypted\n".into(),
                },
            }
        }
    })
}

#[derive(Debug, Clone, Serialize)]
struct RetentionView {
    keep_last: u32,
    keep_daily: u32,
    keep_weekly: u32,
    keep_monthly: u32,
}

#[derive(Debug, Clone, Serialize)]
struct PolicyView {
    name: String,
    schedule: String,
    retention: RetentionView,
    volumes: Vec<String>,
    servers: Vec<String>,
    created_unix: u64,
    next_run_unix: u64,
    last_run_unix: u64,
}

impl From<pb::Policy> for PolicyView {
    fn from(p: pb::Policy) -> Self {
        let r = p.retention.unwrap_or_default();
        PolicyView {
            name: p.name,
            schedule: p.schedule,
            retention: RetentionView {
                keep_last: r.keep_last,
                keep_daily: r.keep_daily,
                keep_weekly: r.keep_weekly,
                keep_monthly: r.keep_monthly,
            },
            volumes: p.volumes,
            servers: p.servers,
            created_unix: p.created_unix,
            next_run_unix: p.next_run_unix,
            last_run_unix: p.last_run_unix,
        }
    }
}

#[derive(Debug, Serialize)]
struct PolicyList {
    policies: Vec<PolicyView>,
}

#[derive(Debug, Serialize)]
struct JobList {
    jobs: Vec<JobView>,
}

fn policy_detail(p: &PolicyView) -> String {
    let r = &p.retention;
    let next =
        if p.next_run_unix == u64::MAX || p.next_run_unix == 0 { "-".into() } else { format_time(p.next_run_unix) };
    let last = if p.last_run_unix == 0 { "never".into() } else { format_time(p.last_run_unix) };
    format!(
        "name:      {}\nschedule:  {} (UTC)\nretention: keep last {}, daily {}, weekly {}, monthly {}\nvolumes:   {}\nservers:   {}\nnext run:  {next}\nlast run:  {last}\n",
        p.name,
        p.schedule,
        r.keep_last,
        r.keep_daily,
        r.keep_weekly,
        r.keep_monthly,
        if p.volumes.is_empty() { "-".into() } else { p.volumes.join(",") },
        if p.servers.is_empty() { "-".into() } else { p.servers.join(",") },
    )
}

pub async fn policy(c: &mut PolicyClient, cmd: PolicyCommand, format: OutputFormat) -> anyhow::Result<String> {
    let one = |p: Option<pb::Policy>| -> anyhow::Result<String> {
        let p = PolicyView::from(p.context("the server's reply carries no policy")?);
        Ok(match format {
            OutputFormat::Json => json(&p),
            OutputFormat::Table => policy_detail(&p),
        })
    };
    Ok(match cmd {
        PolicyCommand::Create { name, schedule, keep_last, keep_daily, keep_weekly, keep_monthly } => {
            let r = c
                .create_policy(pb::CreatePolicyRequest {
                    name,
                    schedule,
                    retention: Some(pb::Retention { keep_last, keep_daily, keep_weekly, keep_monthly }),
                })
                .await
                .map_err(ServerError::from)?;
            one(r.into_inner().policy)?
        }
        PolicyCommand::Bind { name, volume, server } => {
            let r = c
                .bind_policy(pb::BindPolicyRequest {
                    name,
                    volume: volume.unwrap_or_default(),
                    server: server.unwrap_or_default(),
                })
                .await
                .map_err(ServerError::from)?;
            one(r.into_inner().policy)?
        }
        PolicyCommand::Unbind { name, volume, server } => {
            let r = c
                .unbind_policy(pb::UnbindPolicyRequest {
                    name,
                    volume: volume.unwrap_or_default(),
                    server: server.unwrap_or_default(),
                })
                .await
                .map_err(ServerError::from)?;
            one(r.into_inner().policy)?
        }
        PolicyCommand::List => {
            let r = c.list_policies(pb::ListPoliciesRequest {}).await.map_err(ServerError::from)?;
            let policies: Vec<PolicyView> = r.into_inner().policies.into_iter().map(PolicyView::from).collect();
            match format {
                OutputFormat::Json => json(&PolicyList { policies }),
                OutputFormat::Table if policies.is_empty() => "no policies\n".into(),
                OutputFormat::Table => {
                    let header = ["NAME", "SCHEDULE", "KEEP", "VOLUMES", "SERVERS"].map(String::from).to_vec();
                    let rows: Vec<Vec<String>> = policies
                        .iter()
                        .map(|p| {
                            let r = &p.retention;
                            vec![
                                p.name.clone(),
                                p.schedule.clone(),
                                format!("{}/{}/{}/{}", r.keep_last, r.keep_daily, r.keep_weekly, r.keep_monthly),
                                p.volumes.join(","),
                                p.servers.join(","),
                            ]
                        })
                        .collect();
                    table(&header, &rows)
                }
            }
        }
        PolicyCommand::Delete { name } => {
            c.delete_policy(pb::DeletePolicyRequest { name: name.clone() }).await.map_err(ServerError::from)?;
            match format {
                OutputFormat::Json => json(&DeleteView { name, deleted: true }),
                OutputFormat::Table => format!("deleted policy {name}\n"),
            }
        }
        PolicyCommand::Run { name } => {
            let r = c.run_policy(pb::RunPolicyRequest { name: name.clone() }).await.map_err(ServerError::from)?;
            let jobs: Vec<JobView> = r.into_inner().jobs.into_iter().map(JobView::from).collect();
            match format {
                OutputFormat::Json => json(&JobList { jobs }),
                OutputFormat::Table => {
                    let mut s = format!("policy {name}: {} backup job(s) queued\n", jobs.len());
                    for j in &jobs {
                        let _ = writeln!(s, "job {} {}", j.id, j.target);
                    }
                    s
                }
            }
        }
    })
}
