//! What the commands print: a human table or text by default, one JSON document with
//! `--output json`.
//!
//! JSON shapes (field names as in the .proto, sizes in bytes, times in Unix seconds):
//! * `volume create | show | extend | set-tier`: the volume object
//!   `{"name","id","size_bytes","allocated_bytes","created_unix","tier","attached","state",
//!   "server","qos"}` (`state`: `available`, or `deleting` while its delete job is queued or
//!   running; `server` null unless the volume belongs to one; `qos` null for the `unlimited`
//!   tier, else `{"iops_limit","iops_peak","iops_burst_capacity","iops_burst_balance",
//!   "bandwidth_limit","bandwidth_peak","bandwidth_burst_capacity","bandwidth_burst_balance"}`,
//!   bandwidth in bytes per second, burst figures in I/O units or bytes);
//! * `volume list`: `{"volumes": [volume, ...]}`;
//! * `volume attach`: `{"uri","unix_uri","export_name","volume": volume}` (`unix_uri` is null
//!   when the daemon has no unix socket);
//! * `volume detach`: `{"name","was_attached"}`; `volume delete`: `{"name","deleted","job_id",
//!   "job": job}` (`deleted` is true once the job succeeded; false with `--no-wait`);
//! * `snapshot create | show`: the snapshot object
//!   `{"volume","name","id","size_bytes","created_unix","group","attached"}` (`group` null
//!   unless taken by `create-group`); `snapshot list | create-group`: `{"snapshots": [...]}`;
//!   `snapshot rollback`: the volume object; `snapshot delete | detach` as for volumes, with
//!   `"name": "VOLUME@SNAP"`; `snapshot attach`: `{"uri","unix_uri","export_name","snapshot"}`;
//! * `snapshot diff`: `{"from","to","size_bytes","changed_bytes","extents": [{"offset",
//!   "length","zero"}]}` (`from`/`to` null for none / the current state).
//! * `job show | wait | cancel`: the job object `{"id","kind","target","state","bytes_done",
//!   "bytes_total","error","notes","created_unix","started_unix","finished_unix",
//!   "cancel_requested"}` (`state`: queued, running, succeeded, failed, cancelled; `error`,
//!   `started_unix`, `finished_unix` null until they apply); `job list`: `{"jobs": [...]}`.

use std::fmt::Write as _;

use evs_proto::v1 as pb;
use serde::Serialize;

use crate::size::format_size;

/// A volume as printed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VolumeView {
    pub name: String,
    pub id: u64,
    pub size_bytes: u64,
    pub allocated_bytes: u64,
    pub created_unix: u64,
    pub tier: String,
    pub attached: bool,
    pub state: String,
    pub server: Option<String>,
    pub qos: Option<QosView>,
}

/// A volume's effective QoS limits.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QosView {
    pub iops_limit: f64,
    pub iops_peak: f64,
    pub iops_burst_capacity: f64,
    pub iops_burst_balance: f64,
    pub bandwidth_limit: f64,
    pub bandwidth_peak: f64,
    pub bandwidth_burst_capacity: f64,
    pub bandwidth_burst_balance: f64,
}

impl From<pb::QosLimits> for QosView {
    fn from(q: pb::QosLimits) -> Self {
        QosView {
            iops_limit: q.iops_limit,
            iops_peak: q.iops_peak,
            iops_burst_capacity: q.iops_burst_capacity,
            iops_burst_balance: q.iops_burst_balance,
            bandwidth_limit: q.bandwidth_limit,
            bandwidth_peak: q.bandwidth_peak,
            bandwidth_burst_capacity: q.bandwidth_burst_capacity,
            bandwidth_burst_balance: q.bandwidth_burst_balance,
        }
    }
}

impl From<pb::Volume> for VolumeView {
    fn from(v: pb::Volume) -> Self {
        VolumeView {
            name: v.name,
            id: v.id,
            size_bytes: v.size_bytes,
            allocated_bytes: v.allocated_bytes,
            created_unix: v.created_unix,
            tier: v.tier,
            attached: v.attached,
            state: v.state,
            server: Some(v.server).filter(|s| !s.is_empty()),
            qos: v.qos.map(QosView::from),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct VolumeList {
    pub volumes: Vec<VolumeView>,
}

#[derive(Debug, Serialize)]
pub struct AttachView {
    pub uri: String,
    pub unix_uri: Option<String>,
    pub export_name: String,
    pub volume: Option<VolumeView>,
    /// "nbd" or "vhost-user".
    pub protocol: String,
    /// The vhost-user-blk socket of a vhost-user attachment.
    pub vhost_user_socket: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct DetachView {
    pub name: String,
    pub was_attached: bool,
}

#[derive(Debug, Serialize)]
pub struct DeleteView {
    pub name: String,
    pub deleted: bool,
}

/// `volume delete`: the fields of [`DeleteView`] plus the delete job.
#[derive(Debug, Serialize)]
pub struct VolumeDeleteView {
    pub name: String,
    pub deleted: bool,
    pub job_id: u64,
    pub job: JobView,
}

/// `volume create --from-backup`: the volume's fields, plus its restore job.
#[derive(Debug, Serialize)]
pub struct RestoredVolumeView {
    #[serde(flatten)]
    pub volume: VolumeView,
    pub restore_job: JobView,
}

/// A job as printed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobView {
    pub id: u64,
    pub kind: String,
    pub target: String,
    pub state: String,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub error: Option<String>,
    pub notes: Vec<String>,
    pub created_unix: u64,
    pub started_unix: Option<u64>,
    pub finished_unix: Option<u64>,
    pub cancel_requested: bool,
}

/// The name of a job state as the CLI prints it.
pub fn job_state_name(state: i32) -> &'static str {
    match pb::JobState::try_from(state) {
        Ok(pb::JobState::Queued) => "queued",
        Ok(pb::JobState::Running) => "running",
        Ok(pb::JobState::Succeeded) => "succeeded",
        Ok(pb::JobState::Failed) => "failed",
        Ok(pb::JobState::Cancelled) => "cancelled",
        Ok(pb::JobState::Unspecified) | Err(_) => "unknown",
    }
}

impl From<pb::Job> for JobView {
    fn from(j: pb::Job) -> Self {
        JobView {
            id: j.id,
            kind: j.kind,
            target: j.target,
            state: job_state_name(j.state).to_string(),
            bytes_done: j.bytes_done,
            bytes_total: j.bytes_total,
            error: Some(j.error).filter(|e| !e.is_empty()),
            notes: j.notes,
            created_unix: j.created_unix,
            started_unix: Some(j.started_unix).filter(|t| *t != 0),
            finished_unix: Some(j.finished_unix).filter(|t| *t != 0),
            cancel_requested: j.cancel_requested,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct JobList {
    pub jobs: Vec<JobView>,
}

/// `12 MiB / 64 MiB (18%)`; `-` while the total is unknown, the bytes alone when a job ended
/// without one (nothing to process).
pub fn job_progress(j: &JobView) -> String {
    if j.bytes_total == 0 {
        let active = j.state == "queued" || j.state == "running";
        return if active && j.bytes_done == 0 { "-".into() } else { format_size(j.bytes_done) };
    }
    let pct = (j.bytes_done.min(j.bytes_total) as f64 * 100.0 / j.bytes_total as f64).floor();
    format!("{} / {} ({pct:.0}%)", format_size(j.bytes_done), format_size(j.bytes_total))
}

/// `job list`.
pub fn job_table(jobs: &[JobView]) -> String {
    if jobs.is_empty() {
        return "no jobs\n".to_string();
    }
    let header = ["ID", "KIND", "TARGET", "STATE", "PROGRESS", "CREATED"].map(String::from).to_vec();
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                j.id.to_string(),
                j.kind.clone(),
                j.target.clone(),
                j.state.clone(),
                job_progress(j),
                format_time(j.created_unix),
            ]
        })
        .collect();
    table(&header, &rows)
}

/// `job show`.
pub fn job_detail(j: &JobView) -> String {
    let when = |t: Option<u64>| t.map(format_time).unwrap_or_else(|| "-".into());
    let mut rows = vec![
        ("job", j.id.to_string()),
        ("kind", j.kind.clone()),
        ("target", j.target.clone()),
        (
            "state",
            if j.cancel_requested && j.state == "running" {
                "running (cancel requested)".into()
            } else {
                j.state.clone()
            },
        ),
        ("progress", job_progress(j)),
    ];
    if let Some(e) = &j.error {
        rows.push(("error", e.clone()));
    }
    rows.extend([
        ("created", format_time(j.created_unix)),
        ("started", when(j.started_unix)),
        ("finished", when(j.finished_unix)),
    ]);
    for n in &j.notes {
        rows.push(("note", n.clone()));
    }
    let mut out = String::new();
    for (k, val) in rows {
        let _ = writeln!(out, "{:<10} {val}", format!("{k}:"));
    }
    out
}

/// A snapshot as printed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotView {
    pub volume: String,
    pub name: String,
    pub id: u64,
    pub size_bytes: u64,
    pub created_unix: u64,
    pub group: Option<String>,
    pub attached: bool,
}

impl From<pb::Snapshot> for SnapshotView {
    fn from(s: pb::Snapshot) -> Self {
        SnapshotView {
            volume: s.volume,
            name: s.name,
            id: s.id,
            size_bytes: s.size_bytes,
            created_unix: s.created_unix,
            group: Some(s.group).filter(|g| !g.is_empty()),
            attached: s.attached,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct SnapshotList {
    pub snapshots: Vec<SnapshotView>,
}

#[derive(Debug, Serialize)]
pub struct SnapshotAttachView {
    pub uri: String,
    pub unix_uri: Option<String>,
    pub export_name: String,
    pub snapshot: Option<SnapshotView>,
    pub protocol: String,
    pub vhost_user_socket: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ExtentView {
    pub offset: u64,
    pub length: u64,
    pub zero: bool,
}

#[derive(Debug, Serialize)]
pub struct DiffView {
    pub from: Option<String>,
    pub to: Option<String>,
    pub size_bytes: u64,
    pub changed_bytes: u64,
    pub extents: Vec<ExtentView>,
}

/// `snapshot show`.
pub fn snapshot_detail(s: &SnapshotView) -> String {
    let rows = [
        ("snapshot", format!("{}@{}", s.volume, s.name)),
        ("id", s.id.to_string()),
        ("size", format!("{} ({} bytes)", format_size(s.size_bytes), s.size_bytes)),
        ("group", s.group.clone().unwrap_or_else(|| "-".into())),
        ("attached", yes_no(s.attached).to_string()),
        ("created", format_time(s.created_unix)),
    ];
    let mut out = String::new();
    for (k, val) in rows {
        let _ = writeln!(out, "{:<10} {val}", format!("{k}:"));
    }
    out
}

/// `snapshot list`.
pub fn snapshot_table(snaps: &[SnapshotView]) -> String {
    if snaps.is_empty() {
        return "no snapshots\n".to_string();
    }
    let header = ["SNAPSHOT", "SIZE", "GROUP", "ATTACHED", "CREATED"].map(String::from).to_vec();
    let rows: Vec<Vec<String>> = snaps
        .iter()
        .map(|s| {
            vec![
                format!("{}@{}", s.volume, s.name),
                format_size(s.size_bytes),
                s.group.clone().unwrap_or_else(|| "-".into()),
                yes_no(s.attached).to_string(),
                format_time(s.created_unix),
            ]
        })
        .collect();
    table(&header, &rows)
}

/// `snapshot diff`: one extent per line, then a total.
pub fn diff_table(d: &DiffView) -> String {
    let header = ["OFFSET", "LENGTH", "KIND"].map(String::from).to_vec();
    let rows: Vec<Vec<String>> = d
        .extents
        .iter()
        .map(|e| vec![e.offset.to_string(), e.length.to_string(), if e.zero { "discarded" } else { "data" }.into()])
        .collect();
    let mut out = if rows.is_empty() { String::new() } else { table(&header, &rows) };
    let _ = writeln!(
        out,
        "{} extents, {} changed of {}",
        d.extents.len(),
        format_size(d.changed_bytes),
        format_size(d.size_bytes)
    );
    out
}

/// One JSON document, pretty-printed, newline-terminated.
pub fn json<T: Serialize>(v: &T) -> String {
    let mut s = serde_json::to_string_pretty(v).expect("plain data serialises");
    s.push('\n');
    s
}

/// `volume show`: one `key: value` line per field.
pub fn volume_detail(v: &VolumeView) -> String {
    let rows = [
        ("name", v.name.clone()),
        ("id", v.id.to_string()),
        ("size", format!("{} ({} bytes)", format_size(v.size_bytes), v.size_bytes)),
        ("allocated", format!("{} ({} bytes)", format_size(v.allocated_bytes), v.allocated_bytes)),
        ("tier", v.tier.clone()),
        ("attached", yes_no(v.attached).to_string()),
        ("state", v.state.clone()),
        ("server", v.server.clone().unwrap_or_else(|| "-".into())),
        ("created", format_time(v.created_unix)),
    ];
    let mut out = String::new();
    for (k, val) in rows {
        let _ = writeln!(out, "{:<10} {val}", format!("{k}:"));
    }
    match &v.qos {
        None => out.push_str("qos:       none (unlimited tier)\n"),
        Some(q) => {
            let _ = writeln!(
                out,
                "iops:      {} (burst {} while credits last; credits {} of {} I/Os)",
                q.iops_limit.round(),
                q.iops_peak.round(),
                q.iops_burst_balance.floor(),
                q.iops_burst_capacity.round()
            );
            let mbps = |b: f64| format!("{:.1} MB/s", b / 1e6);
            let _ = write!(out, "bandwidth: {}", mbps(q.bandwidth_limit));
            if q.bandwidth_peak > q.bandwidth_limit {
                let _ = write!(
                    out,
                    " (burst {}; credits {} of {})",
                    mbps(q.bandwidth_peak),
                    format_size(q.bandwidth_burst_balance as u64),
                    format_size(q.bandwidth_burst_capacity as u64)
                );
            }
            out.push('\n');
        }
    }
    out
}

/// `volume list`: aligned columns.
pub fn volume_table(vols: &[VolumeView]) -> String {
    if vols.is_empty() {
        return "no volumes\n".to_string();
    }
    let header = ["NAME", "SIZE", "ALLOCATED", "TIER", "ATTACHED", "CREATED", "STATE"].map(String::from).to_vec();
    let rows: Vec<Vec<String>> = vols
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                format_size(v.size_bytes),
                format_size(v.allocated_bytes),
                v.tier.clone(),
                yes_no(v.attached).to_string(),
                format_time(v.created_unix),
                v.state.clone(),
            ]
        })
        .collect();
    table(&header, &rows)
}

/// Left-aligned columns separated by two spaces; no trailing blanks.
pub fn table(header: &[String], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for r in std::iter::once(header).chain(rows.iter().map(|r| r.as_slice())) {
        let mut line = String::new();
        for (i, cell) in r.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            let _ = write!(line, "{cell:<width$}", width = widths[i]);
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SS UTC` (no time-zone database needed).
pub fn format_time(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", secs / 3600, secs / 60 % 60, secs % 60)
}

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(name: &str) -> VolumeView {
        VolumeView {
            name: name.into(),
            id: 7,
            size_bytes: 10 << 30,
            allocated_bytes: 3 << 19,
            created_unix: 1_700_000_000,
            tier: "gpssd".into(),
            attached: true,
            state: "available".into(),
            server: None,
            qos: Some(QosView {
                iops_limit: 1920.0,
                iops_peak: 8000.0,
                iops_burst_capacity: 14_400_000.0,
                iops_burst_balance: 14_399_000.5,
                bandwidth_limit: 105e6,
                bandwidth_peak: 105e6,
                bandwidth_burst_capacity: 0.0,
                bandwidth_burst_balance: 0.0,
            }),
        }
    }

    fn job(state: &str, done: u64, total: u64) -> JobView {
        JobView {
            id: 7,
            kind: "delete-volume".into(),
            target: "volume db".into(),
            state: state.into(),
            bytes_done: done,
            bytes_total: total,
            error: None,
            notes: vec!["resumed after a daemon restart".into()],
            created_unix: 1_700_000_000,
            started_unix: Some(1_700_000_001),
            finished_unix: None,
            cancel_requested: false,
        }
    }

    #[test]
    fn jobs() {
        assert_eq!(job_progress(&job("queued", 0, 0)), "-");
        assert_eq!(job_progress(&job("succeeded", 0, 0)), "0 B");
        assert_eq!(job_progress(&job("running", 16 << 20, 64 << 20)), "16 MiB / 64 MiB (25%)");
        let t = job_table(&[job("running", 16 << 20, 64 << 20)]);
        assert!(t.starts_with("ID  KIND           TARGET     STATE    PROGRESS"), "{t}");
        assert!(t.contains("7   delete-volume  volume db  running  16 MiB / 64 MiB (25%)"), "{t}");
        assert_eq!(job_table(&[]), "no jobs\n");
        let d = job_detail(&job("running", 1, 2));
        assert!(d.contains("state:     running\n") && d.contains("finished:  -\n"), "{d}");
        assert!(d.contains("note:      resumed after a daemon restart\n"), "{d}");
        let mut failed = job("failed", 1, 2);
        failed.error = Some("disk on fire".into());
        assert!(job_detail(&failed).contains("error:     disk on fire\n"));
        let v: serde_json::Value = serde_json::from_str(&json(&job("queued", 0, 0))).unwrap();
        assert!(v["error"].is_null() && v["finished_unix"].is_null());
        assert_eq!(v["started_unix"], 1_700_000_001u64);
        assert_eq!(job_state_name(pb::JobState::Cancelled as i32), "cancelled");
        assert_eq!(job_state_name(99), "unknown");
    }

    #[test]
    fn times() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_time(1_700_000_000), "2023-11-14 22:13:20 UTC");
        assert_eq!(format_time(951_782_400), "2000-02-29 00:00:00 UTC");
    }

    #[test]
    fn list_table() {
        let t = volume_table(&[vol("db"), vol("logs-archive")]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("NAME          SIZE    ALLOCATED  TIER"), "{t}");
        assert!(lines[1].starts_with("db            10 GiB  1.5 MiB    gpssd  yes"), "{t}");
        assert!(t.lines().all(|l| !l.ends_with(' ')));
        assert_eq!(volume_table(&[]), "no volumes\n");
    }

    #[test]
    fn detail() {
        let d = volume_detail(&vol("db"));
        assert!(d.contains("name:      db\n"), "{d}");
        assert!(d.contains("size:      10 GiB (10737418240 bytes)\n"), "{d}");
        assert!(d.contains("attached:  yes\n"), "{d}");
        assert!(
            d.contains("iops:      1920 (burst 8000 while credits last; credits 14399000 of 14400000 I/Os)\n"),
            "{d}"
        );
        assert!(d.contains("bandwidth: 105.0 MB/s\n"), "{d}");
        let mut u = vol("u");
        u.qos = None;
        assert!(volume_detail(&u).contains("qos:       none (unlimited tier)\n"));
    }

    #[test]
    fn json_is_one_document() {
        let s = json(&VolumeList { volumes: vec![vol("db")] });
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["volumes"][0]["size_bytes"], 10u64 << 30);
        assert_eq!(v["volumes"][0]["tier"], "gpssd");
        let a = json(&AttachView {
            uri: "nbd://h:1/t".into(),
            unix_uri: None,
            export_name: "t".into(),
            volume: None,
            protocol: "nbd".into(),
            vhost_user_socket: None,
        });
        let v: serde_json::Value = serde_json::from_str(&a).unwrap();
        assert!(v["unix_uri"].is_null());
        assert!(v["vhost_user_socket"].is_null());
        assert_eq!(v["protocol"], "nbd");
    }
}
