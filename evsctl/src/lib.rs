//! `evsctl`, the command-line client of the EVS engine's gRPC API.
//!
//! * [`cli`]: the command line (clap);
//! * [`client`]: endpoint, token, connection;
//! * [`size`]: `10G`-style sizes;
//! * [`output`]: tables and JSON;
//! * [`wait`]: following a job (progress bar, result).
//!
//! Exit codes: 0 success, 1 any failure (server refusal, connection, a failed job), 2 usage
//! (clap), 3 the job waited for (`job wait`, `volume delete`) was cancelled.

pub mod backup;
pub mod cli;
pub mod client;
pub mod control;
pub mod dr;
pub mod output;
pub mod size;
pub mod wait;

use std::io::Write;

use anyhow::Context;
use evs_proto::v1 as pb;

use cli::{Cli, Command, JobCommand, OutputFormat, SnapshotCommand, VolumeCommand};
use client::{JobClient, ServerError, SnapshotClient, VolumeClient};
use output::{
    AttachView, DeleteView, DetachView, DiffView, JobList, JobView, RestoredVolumeView, SnapshotList, SnapshotView,
    VolumeDeleteView, VolumeList, VolumeView,
};

/// Runs one command. The error, printed with `{:#}`, is the one-line message for stderr.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start the runtime")?;
    rt.block_on(dispatch(cli))
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let token = client::resolve_token(cli.token.as_deref(), &Cli::default_token_file())?;
    let mut c = client::connect(&cli.endpoint, &token, cli.ca_cert.as_deref()).await?;
    let out = match cli.command {
        Command::Volume(cmd) => volume(&mut c.volume, &mut c.job, cmd, cli.output).await,
        Command::Snapshot(cmd) => snapshot(&mut c.snapshot, cmd, cli.output).await,
        Command::Tenant(cmd) => control::tenant(&mut c.tenant, cmd, cli.output).await,
        Command::Server(cmd) => control::server(&mut c.server, cmd, cli.output).await,
        Command::Audit(cmd) => control::audit(&mut c.audit, cmd, cli.output).await,
        Command::Job(cmd) => job(&mut c.job, cmd, cli.output).await,
        Command::Backup(cmd) => backup::backup(&mut c.backup, &mut c.job, cmd, cli.output).await,
        Command::Policy(cmd) => backup::policy(&mut c.policy, cmd, cli.output).await,
        Command::Dr(cmd) => dr::dr(&mut c.dr, &mut c.job, cmd, cli.output, cli.ca_cert.clone()).await,
    }
    .map_err(|e| client::explain(e, &client::normalize_endpoint(&cli.endpoint)))?;
    emit(&out)
}

/// Writes to stdout; a closed pipe (`evsctl volume list | head -1`) is not an error.
pub(crate) fn emit(s: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(s.as_bytes()).and_then(|_| stdout.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("cannot write to stdout"),
        _ => Ok(()),
    }
}

fn volume_of(v: Option<pb::Volume>) -> anyhow::Result<VolumeView> {
    v.map(VolumeView::from).context("the server's reply carries no volume")
}

/// The rendering of a command that returns one volume.
fn one_volume(v: VolumeView, format: OutputFormat) -> String {
    match format {
        OutputFormat::Json => output::json(&v),
        OutputFormat::Table => output::volume_detail(&v),
    }
}

/// `volume create --from-backup`: the volume and its restore job (followed with `wait`, then
/// the volume as it is after the restore). A restore that did not succeed is the command's
/// error, after its output is printed.
async fn restored_volume(
    c: &mut VolumeClient,
    jobs: &mut JobClient,
    volume: VolumeView,
    backup: &str,
    job: pb::Job,
    wait: bool,
    format: OutputFormat,
) -> anyhow::Result<String> {
    let id = job.id;
    let what = format!("restoring backup {backup} into volume {}", volume.name);
    let (job, result) = wait::follow(jobs, job, wait, &what).await?;
    // After a restore that was waited for, the volume as it is now.
    let volume = if wait && result.is_ok() {
        let r = c.get_volume(pb::GetVolumeRequest { name: volume.name.clone() }).await.map_err(ServerError::from)?;
        volume_of(r.into_inner().volume)?
    } else {
        volume
    };
    let out = match format {
        OutputFormat::Json => output::json(&RestoredVolumeView { volume, restore_job: job.into() }),
        OutputFormat::Table => {
            let mut s = output::volume_detail(&volume);
            if !wait {
                s.push_str(&format!("{what}: job {id} (follow it with `evsctl job wait {id}`)\n"));
            } else if result.is_ok() {
                for n in &job.notes {
                    s.push_str(n);
                    s.push('\n');
                }
            }
            s
        }
    };
    if let Err(e) = result {
        emit(&out)?;
        return Err(e.into());
    }
    Ok(out)
}

async fn volume(
    c: &mut VolumeClient,
    jobs: &mut JobClient,
    cmd: VolumeCommand,
    format: OutputFormat,
) -> anyhow::Result<String> {
    Ok(match cmd {
        VolumeCommand::Create { name, size, tier, from_snapshot, from_backup, wait } => {
            let r = c
                .create_volume(pb::CreateVolumeRequest {
                    name: name.clone(),
                    size_bytes: size.unwrap_or(0),
                    tier: tier.unwrap_or_default(),
                    from_snapshot: from_snapshot.unwrap_or_default(),
                    from_backup: from_backup.clone().unwrap_or_default(),
                })
                .await
                .map_err(ServerError::from)?
                .into_inner();
            let volume = volume_of(r.volume)?;
            match (from_backup, r.job) {
                (Some(backup), Some(job)) => restored_volume(c, jobs, volume, &backup, job, wait, format).await?,
                (Some(_), None) => anyhow::bail!("the server's reply carries no restore job"),
                (None, _) => one_volume(volume, format),
            }
        }
        VolumeCommand::List => {
            let r = c.list_volumes(pb::ListVolumesRequest {}).await.map_err(ServerError::from)?;
            let volumes: Vec<VolumeView> = r.into_inner().volumes.into_iter().map(VolumeView::from).collect();
            match format {
                OutputFormat::Json => output::json(&VolumeList { volumes }),
                OutputFormat::Table => output::volume_table(&volumes),
            }
        }
        VolumeCommand::Show { name } => {
            let r = c.get_volume(pb::GetVolumeRequest { name }).await.map_err(ServerError::from)?;
            one_volume(volume_of(r.into_inner().volume)?, format)
        }
        VolumeCommand::Delete { name, no_wait } => {
            let r = c.delete_volume(pb::DeleteVolumeRequest { name: name.clone() }).await.map_err(ServerError::from)?;
            let job = r.into_inner().job.context("the server's reply carries no delete job")?;
            let id = job.id;
            let (job, result) = wait::follow(jobs, job, !no_wait, &format!("deleting volume {name}")).await?;
            let deleted = result.is_ok() && !no_wait;
            let out = match format {
                OutputFormat::Json => {
                    output::json(&VolumeDeleteView { name: name.clone(), deleted, job_id: id, job: job.into() })
                }
                OutputFormat::Table if no_wait => {
                    format!("deleting volume {name}: job {id} (follow it with `evsctl job wait {id}`)\n")
                }
                OutputFormat::Table if deleted => format!("deleted volume {name}\n"),
                OutputFormat::Table => String::new(),
            };
            if let Err(e) = result {
                emit(&out)?;
                return Err(e.into());
            }
            out
        }
        VolumeCommand::Extend { name, size } => {
            let r =
                c.extend_volume(pb::ExtendVolumeRequest { name, size_bytes: size }).await.map_err(ServerError::from)?;
            one_volume(volume_of(r.into_inner().volume)?, format)
        }
        VolumeCommand::SetTier { name, tier } => {
            let r = c.set_volume_tier(pb::SetVolumeTierRequest { name, tier }).await.map_err(ServerError::from)?;
            one_volume(volume_of(r.into_inner().volume)?, format)
        }
        VolumeCommand::Attach { name, unix, protocol } => {
            let r = c
                .attach_volume(pb::AttachVolumeRequest { name, require_unix: unix, protocol })
                .await
                .map_err(ServerError::from)?
                .into_inner();
            let view = AttachView {
                uri: r.uri,
                unix_uri: Some(r.unix_uri).filter(|u| !u.is_empty()),
                export_name: r.export_name,
                volume: r.volume.map(VolumeView::from),
                protocol: r.protocol,
                vhost_user_socket: Some(r.vhost_user_socket).filter(|s| !s.is_empty()),
            };
            match format {
                OutputFormat::Json => output::json(&view),
                // Just the socket, so `sock=$(evsctl volume attach db --protocol vhost-user)` works.
                OutputFormat::Table if view.protocol == "vhost-user" => {
                    format!("{}\n", view.vhost_user_socket.context("the server returned no vhost-user socket")?)
                }
                // Just the URI, so `uri=$(evsctl volume attach db)` works.
                OutputFormat::Table if unix => {
                    format!("{}\n", view.unix_uri.context("the server returned no unix-socket URI")?)
                }
                OutputFormat::Table => format!("{}\n", view.uri),
            }
        }
        VolumeCommand::Detach { name } => {
            let r = c.detach_volume(pb::DetachVolumeRequest { name: name.clone() }).await.map_err(ServerError::from)?;
            let was_attached = r.into_inner().was_attached;
            match format {
                OutputFormat::Json => output::json(&DetachView { name, was_attached }),
                OutputFormat::Table if was_attached => format!("detached volume {name}\n"),
                OutputFormat::Table => format!("volume {name} was not attached\n"),
            }
        }
    })
}

async fn job(c: &mut JobClient, cmd: JobCommand, format: OutputFormat) -> anyhow::Result<String> {
    let one = |j: pb::Job| {
        let v = JobView::from(j);
        match format {
            OutputFormat::Json => output::json(&v),
            OutputFormat::Table => output::job_detail(&v),
        }
    };
    let job_of = |j: Option<pb::Job>| j.context("the server's reply carries no job");
    Ok(match cmd {
        JobCommand::List => {
            let r = c.list_jobs(pb::ListJobsRequest {}).await.map_err(ServerError::from)?;
            let jobs: Vec<JobView> = r.into_inner().jobs.into_iter().map(JobView::from).collect();
            match format {
                OutputFormat::Json => output::json(&JobList { jobs }),
                OutputFormat::Table => output::job_table(&jobs),
            }
        }
        JobCommand::Show { id } => {
            let r = c.get_job(pb::GetJobRequest { id }).await.map_err(ServerError::from)?;
            one(job_of(r.into_inner().job)?)
        }
        JobCommand::Wait { id } => {
            let job = wait::wait_job(c, id).await?;
            let result = wait::job_result(&job, &format!("job {id}"));
            let out = one(job);
            if let Err(e) = result {
                emit(&out)?;
                return Err(e.into());
            }
            out
        }
        JobCommand::Cancel { id } => {
            let r = c.cancel_job(pb::CancelJobRequest { id }).await.map_err(ServerError::from)?;
            let job = job_of(r.into_inner().job)?;
            let cancelled = job.state == pb::JobState::Cancelled as i32;
            match format {
                OutputFormat::Json => one(job),
                OutputFormat::Table if cancelled => format!("cancelled job {id}\n"),
                OutputFormat::Table => format!("asked job {id} to cancel; it stops at its next check\n"),
            }
        }
    })
}

/// `VOLUME@SNAP` → (volume, snapshot); the server validates the names themselves.
fn split_ref(r: &str) -> anyhow::Result<(String, String)> {
    match r.split_once('@') {
        Some((v, s)) if !v.is_empty() && !s.is_empty() => Ok((v.to_string(), s.to_string())),
        _ => anyhow::bail!("invalid snapshot reference {r:?}: expected VOLUME@SNAP"),
    }
}

fn snapshot_of(s: Option<pb::Snapshot>) -> anyhow::Result<SnapshotView> {
    s.map(SnapshotView::from).context("the server's reply carries no snapshot")
}

fn one_snapshot(s: SnapshotView, format: OutputFormat) -> String {
    match format {
        OutputFormat::Json => output::json(&s),
        OutputFormat::Table => output::snapshot_detail(&s),
    }
}

async fn snapshot(c: &mut SnapshotClient, cmd: SnapshotCommand, format: OutputFormat) -> anyhow::Result<String> {
    Ok(match cmd {
        SnapshotCommand::Create { volume, name } => {
            let r = c.create_snapshot(pb::CreateSnapshotRequest { volume, name }).await.map_err(ServerError::from)?;
            one_snapshot(snapshot_of(r.into_inner().snapshot)?, format)
        }
        SnapshotCommand::CreateGroup { name, volumes, server } => {
            let r = c
                .create_group_snapshot(pb::CreateGroupSnapshotRequest {
                    name,
                    volumes,
                    server: server.unwrap_or_default(),
                })
                .await
                .map_err(ServerError::from)?;
            let snapshots: Vec<SnapshotView> = r.into_inner().snapshots.into_iter().map(SnapshotView::from).collect();
            match format {
                OutputFormat::Json => output::json(&SnapshotList { snapshots }),
                OutputFormat::Table => output::snapshot_table(&snapshots),
            }
        }
        SnapshotCommand::List { volume } => {
            let r = c.list_snapshots(pb::ListSnapshotsRequest { volume }).await.map_err(ServerError::from)?;
            let snapshots: Vec<SnapshotView> = r.into_inner().snapshots.into_iter().map(SnapshotView::from).collect();
            match format {
                OutputFormat::Json => output::json(&SnapshotList { snapshots }),
                OutputFormat::Table => output::snapshot_table(&snapshots),
            }
        }
        SnapshotCommand::Show { snapshot } => {
            let (volume, name) = split_ref(&snapshot)?;
            let r = c.get_snapshot(pb::GetSnapshotRequest { volume, name }).await.map_err(ServerError::from)?;
            one_snapshot(snapshot_of(r.into_inner().snapshot)?, format)
        }
        SnapshotCommand::Delete { snapshot } => {
            let (volume, name) = split_ref(&snapshot)?;
            c.delete_snapshot(pb::DeleteSnapshotRequest { volume, name }).await.map_err(ServerError::from)?;
            match format {
                OutputFormat::Json => output::json(&DeleteView { name: snapshot, deleted: true }),
                OutputFormat::Table => format!("deleted snapshot {snapshot}\n"),
            }
        }
        SnapshotCommand::Rollback { snapshot } => {
            let (volume, name) = split_ref(&snapshot)?;
            let r =
                c.rollback_snapshot(pb::RollbackSnapshotRequest { volume, name }).await.map_err(ServerError::from)?;
            one_volume(volume_of(r.into_inner().volume)?, format)
        }
        SnapshotCommand::Diff { volume, from, to } => {
            let req = pb::DiffSnapshotsRequest {
                volume,
                from: from.clone().unwrap_or_default(),
                to: to.clone().unwrap_or_default(),
            };
            let mut stream = c.diff_snapshots(req).await.map_err(ServerError::from)?.into_inner();
            let mut view = DiffView { from, to, size_bytes: 0, changed_bytes: 0, extents: Vec::new() };
            while let Some(m) = stream.message().await.map_err(ServerError::from)? {
                view.size_bytes = m.size_bytes;
                for e in m.extents {
                    view.changed_bytes += e.length;
                    view.extents.push(output::ExtentView { offset: e.offset, length: e.length, zero: e.zero });
                }
            }
            match format {
                OutputFormat::Json => output::json(&view),
                OutputFormat::Table => output::diff_table(&view),
            }
        }
        SnapshotCommand::Attach { snapshot, unix, protocol } => {
            let (volume, name) = split_ref(&snapshot)?;
            let r = c
                .attach_snapshot(pb::AttachSnapshotRequest { volume, name, require_unix: unix, protocol })
                .await
                .map_err(ServerError::from)?
                .into_inner();
            let view = output::SnapshotAttachView {
                uri: r.uri,
                unix_uri: Some(r.unix_uri).filter(|u| !u.is_empty()),
                export_name: r.export_name,
                snapshot: r.snapshot.map(SnapshotView::from),
                protocol: r.protocol,
                vhost_user_socket: Some(r.vhost_user_socket).filter(|s| !s.is_empty()),
            };
            match format {
                OutputFormat::Json => output::json(&view),
                OutputFormat::Table if view.protocol == "vhost-user" => {
                    format!("{}\n", view.vhost_user_socket.context("the server returned no vhost-user socket")?)
                }
                OutputFormat::Table if unix => {
                    format!("{}\n", view.unix_uri.context("the server returned no unix-socket URI")?)
                }
                OutputFormat::Table => format!("{}\n", view.uri),
            }
        }
        SnapshotCommand::Detach { snapshot } => {
            let (volume, name) = split_ref(&snapshot)?;
            let r = c.detach_snapshot(pb::DetachSnapshotRequest { volume, name }).await.map_err(ServerError::from)?;
            let was_attached = r.into_inner().was_attached;
            match format {
                OutputFormat::Json => output::json(&DetachView { name: snapshot, was_attached }),
                OutputFormat::Table if was_attached => format!("detached snapshot {snapshot}\n"),
                OutputFormat::Table => format!("snapshot {snapshot} was not attached\n"),
            }
        }
    })
}
