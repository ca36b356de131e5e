//! Following a job until it ends: polls `GetJob`, draws a progress bar (bytes) on stderr
//! when stderr is a terminal, and turns the job's result into the command's result.

use std::fmt;
use std::io::IsTerminal;
use std::time::Duration;

use anyhow::Context;
use evs_proto::v1 as pb;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::client::{JobClient, ServerError};

/// How often a waiting command asks for the job's state.
const POLL: Duration = Duration::from_millis(200);

/// Exit status of a command whose job was cancelled.
pub const EXIT_CANCELLED: u8 = 3;

/// A job that ended without succeeding: the command's error. Its exit status is 1 for a
/// failed job, [`EXIT_CANCELLED`] for a cancelled one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEnded {
    pub cancelled: bool,
    pub message: String,
}

impl fmt::Display for JobEnded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for JobEnded {}

/// The exit status for a command's error.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<JobEnded>() {
        Some(j) if j.cancelled => EXIT_CANCELLED,
        _ => 1,
    }
}

pub fn is_finished(state: i32) -> bool {
    matches!(
        pb::JobState::try_from(state),
        Ok(pb::JobState::Succeeded | pb::JobState::Failed | pb::JobState::Cancelled)
    )
}

/// Ok for a succeeded job; else the error for the command, `what` naming the job for people
/// ("job 7", "deleting volume db (job 7)").
pub fn job_result(job: &pb::Job, what: &str) -> Result<(), JobEnded> {
    match pb::JobState::try_from(job.state) {
        Ok(pb::JobState::Succeeded) => Ok(()),
        Ok(pb::JobState::Cancelled) => Err(JobEnded { cancelled: true, message: format!("{what} was cancelled") }),
        Ok(pb::JobState::Failed) => {
            let why = if job.error.is_empty() { "no reason given" } else { job.error.as_str() };
            Err(JobEnded { cancelled: false, message: format!("{what} failed: {why}") })
        }
        _ => Err(JobEnded { cancelled: false, message: format!("{what} has not ended") }),
    }
}

/// `job` as the command reports it: with `wait`, followed to its end and its result (`what`
/// names it, the job id is added); without, as it is now and Ok.
pub async fn follow(
    c: &mut JobClient,
    job: pb::Job,
    wait: bool,
    what: &str,
) -> anyhow::Result<(pb::Job, Result<(), JobEnded>)> {
    if !wait {
        return Ok((job, Ok(())));
    }
    let id = job.id;
    let job = wait_job(c, id).await?;
    let result = job_result(&job, &format!("{what} (job {id})"));
    Ok((job, result))
}

/// Polls job `id` until it has ended and returns it. With a terminal on stderr, shows its
/// progress there meanwhile; otherwise prints nothing.
pub async fn wait_job(c: &mut JobClient, id: u64) -> anyhow::Result<pb::Job> {
    let bar = std::io::stderr().is_terminal().then(|| new_bar(id));
    let res = poll(c, id, bar.as_ref()).await;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    res
}

async fn poll(c: &mut JobClient, id: u64, bar: Option<&ProgressBar>) -> anyhow::Result<pb::Job> {
    loop {
        let job = c
            .get_job(pb::GetJobRequest { id })
            .await
            .map_err(ServerError::from)
            .with_context(|| format!("while waiting for job {id}"))?
            .into_inner()
            .job
            .context("the server's reply carries no job")?;
        if let Some(b) = bar {
            show(b, &job);
        }
        if is_finished(job.state) {
            return Ok(job);
        }
        tokio::time::sleep(POLL).await;
    }
}

fn new_bar(id: u64) -> ProgressBar {
    let b = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    // The bar takes what the terminal leaves, so the line never wraps.
    let style =
        ProgressStyle::with_template("{msg} [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}")
            .expect("a valid progress template")
            .progress_chars("=> ");
    b.set_style(style);
    b.set_message(format!("job {id}"));
    b.enable_steady_tick(Duration::from_millis(250));
    b
}

fn show(b: &ProgressBar, job: &pb::Job) {
    let state = crate::output::job_state_name(job.state);
    b.set_message(format!("job {} ({}) {state}", job.id, job.target));
    if job.bytes_total > 0 {
        b.set_length(job.bytes_total);
    }
    b.set_position(job.bytes_done);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(state: pb::JobState, error: &str) -> pb::Job {
        pb::Job { id: 7, state: state.into(), error: error.into(), ..Default::default() }
    }

    #[test]
    fn results_and_exit_codes() {
        assert_eq!(job_result(&job(pb::JobState::Succeeded, ""), "job 7"), Ok(()));
        let e = job_result(&job(pb::JobState::Failed, "disk on fire"), "job 7").unwrap_err();
        assert_eq!(e.to_string(), "job 7 failed: disk on fire");
        assert_eq!(exit_code(&anyhow::Error::new(e)), 1);
        let e = job_result(&job(pb::JobState::Cancelled, ""), "job 7").unwrap_err();
        assert_eq!(e.to_string(), "job 7 was cancelled");
        assert_eq!(exit_code(&anyhow::Error::new(e)), EXIT_CANCELLED);
        assert_eq!(exit_code(&anyhow::anyhow!("no connection")), 1);
        assert!(!is_finished(pb::JobState::Running as i32));
        assert!(is_finished(pb::JobState::Cancelled as i32));
    }
}
