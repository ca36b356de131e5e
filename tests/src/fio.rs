//! fio with its nbd engine as a load generator and meter: a run's totals from its JSON report
//! and, optionally, its per-second IOPS and bandwidth logs.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::tools::{describe, format_output, require_tool};

/// One fio job against an NBD URI.
#[derive(Debug, Clone)]
pub struct FioJob {
    pub uri: String,
    /// fio `--rw` (randread, randwrite, read, write).
    pub rw: String,
    pub bs: String,
    pub iodepth: u32,
    pub runtime: Duration,
    /// Region of the export fio uses (bytes); 0 = the whole export.
    pub size: u64,
}

impl FioJob {
    pub fn new(uri: &str, rw: &str, bs: &str, iodepth: u32, runtime_s: u64) -> FioJob {
        FioJob {
            uri: uri.to_string(),
            rw: rw.to_string(),
            bs: bs.to_string(),
            iodepth,
            runtime: Duration::from_secs(runtime_s),
            size: 0,
        }
    }

    fn command(&self, dir: &Path, name: &str) -> Command {
        let mut c = Command::new(require_tool("fio"));
        c.current_dir(dir)
            .arg(format!("--name={name}"))
            .arg("--ioengine=nbd")
            .arg(format!("--uri={}", self.uri))
            .arg(format!("--rw={}", self.rw))
            .arg(format!("--bs={}", self.bs))
            .arg(format!("--iodepth={}", self.iodepth))
            .arg(format!("--runtime={}", self.runtime.as_secs()))
            .arg("--time_based")
            .arg("--norandommap")
            .arg("--randrepeat=0")
            .arg(format!("--write_iops_log={name}"))
            .arg(format!("--write_bw_log={name}"))
            .arg("--log_avg_msec=1000")
            .arg("--output-format=json");
        if self.size > 0 {
            c.arg(format!("--size={}", self.size));
        }
        c
    }

    /// Starts the job in `dir` (its logs go there, named after `name`).
    pub fn spawn(&self, dir: &Path, name: &str) -> FioRun {
        let mut cmd = self.command(dir, name);
        let what = describe(&cmd);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{what}`: {e}"));
        FioRun { child, what, dir: dir.to_path_buf(), name: name.to_string(), rw: self.rw.clone() }
    }

    /// Runs the job to its end.
    pub fn run(&self, dir: &Path, name: &str) -> FioResult {
        self.spawn(dir, name).wait()
    }
}

/// A running fio job.
pub struct FioRun {
    child: Child,
    what: String,
    dir: std::path::PathBuf,
    name: String,
    rw: String,
}

/// What a finished job measured.
#[derive(Debug, Clone)]
pub struct FioResult {
    /// I/Os completed over the run, and the run's length (fio's own clock).
    pub total_ios: u64,
    pub runtime: Duration,
    pub iops: f64,
    pub bw_bytes: f64,
    /// Per-second IOPS (fio's log averaged over 1 s windows), in time order.
    pub iops_per_second: Vec<f64>,
    /// Per-second bandwidth in bytes per second.
    pub bw_per_second: Vec<f64>,
}

impl FioRun {
    pub fn wait(self) -> FioResult {
        let timeout = Duration::from_secs(120);
        let out =
            wait_output(self.child, timeout).unwrap_or_else(|| panic!("`{}` did not end in {timeout:?}", self.what));
        if !out.status.success() {
            panic!("`{}` failed\n{}", self.what, format_output(&out));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        // fio may print notes before the JSON document.
        let json_text = &text[text.find('{').unwrap_or_else(|| panic!("no JSON from `{}`\n{text}", self.what))..];
        let v: Value = serde_json::from_str(json_text).unwrap_or_else(|e| panic!("bad JSON from `{}`: {e}", self.what));
        let section = if self.rw.contains("write") { "write" } else { "read" };
        let job = &v["jobs"][0][section];
        let num = |k: &str| job[k].as_f64().unwrap_or_else(|| panic!("fio JSON lacks {section}.{k}: {job}"));
        let runtime_ms = num("runtime");
        FioResult {
            total_ios: num("total_ios") as u64,
            runtime: Duration::from_millis(runtime_ms as u64),
            iops: num("iops"),
            bw_bytes: num("bw_bytes"),
            iops_per_second: read_log(&self.dir.join(format!("{}_iops.1.log", self.name)), 1.0),
            // fio logs bandwidth in KiB/s.
            bw_per_second: read_log(&self.dir.join(format!("{}_bw.1.log", self.name)), 1024.0),
        }
    }
}

fn wait_output(mut child: Child, timeout: Duration) -> Option<std::process::Output> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return child.wait_with_output().ok(),
            Ok(None) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// fio's averaged log: `time_ms, value, ddir, bs[, offset]` per line; values summed over the
/// directions of one window (a job has one direction here).
fn read_log(path: &Path, scale: f64) -> Vec<f64> {
    let Ok(text) = std::fs::read_to_string(path) else { return Vec::new() };
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(',').map(str::trim);
            let _t = f.next()?;
            f.next()?.parse::<f64>().ok().map(|v| v * scale)
        })
        .collect()
}

/// Mean of `v[range]` (the per-second samples of a phase).
pub fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.iter().sum::<f64>() / v.len() as f64
}

/// Panics unless `got` is within `pct` percent of `want`.
pub fn assert_within(got: f64, want: f64, pct: f64, what: &str) {
    let lo = want * (1.0 - pct / 100.0);
    let hi = want * (1.0 + pct / 100.0);
    assert!((lo..=hi).contains(&got), "{what}: measured {got:.1}, limit {want:.1} (allowed {lo:.1} to {hi:.1})");
}
