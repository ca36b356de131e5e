//! The Prometheus endpoint (`GET /metrics` on `--metrics-listen`): node gauges, per-volume
//! data-path figures ([`crate::volume_io`]) and, from the job framework, jobs by state.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::api::{ControlPlane, Gauges};
use crate::jobs::JobState;
#[cfg(test)]
use crate::volume_io::VolumeIoRegistry;
use crate::volume_io::{VolumeIo, VolumeStats, LATENCY_BOUNDS};

/// Fixed labels of the metrics.
pub struct MetricsInfo {
    pub io_backend: &'static str,
    pub az: String,
}

/// `GET /metrics` in the Prometheus text format. One endpoint needs no HTTP framework: a
/// request head is read (bounded in size and time), one response is written, the connection
/// is closed.
pub async fn serve_metrics(listener: TcpListener, cp: Arc<ControlPlane>, info: Arc<MetricsInfo>) {
    loop {
        match listener.accept().await {
            Ok((sock, _)) => {
                tokio::spawn(metrics_conn(sock, cp.clone(), info.clone()));
            }
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Largest request head the metrics endpoint reads.
const MAX_HEAD: usize = 8192;

async fn metrics_conn(mut sock: TcpStream, cp: Arc<ControlPlane>, info: Arc<MetricsInfo>) {
    let head = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = Vec::with_capacity(512);
        let mut chunk = [0u8; 1024];
        loop {
            let n = sock.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
                return Some(buf);
            }
            if buf.len() > MAX_HEAD {
                return Some(buf);
            }
        }
    })
    .await;
    let Ok(Some(head)) = head else { return };
    let line = head.split(|&b| b == b'\n').next().unwrap_or(&[]);
    let line = String::from_utf8_lossy(line);
    let response = match route(&line) {
        Route::Metrics { head_only } => {
            let gauges = {
                let cp = cp.clone();
                tokio::task::spawn_blocking(move || cp.gauges()).await
            };
            match gauges {
                Ok(Ok(g)) => {
                    let mut text = render_metrics(&g, &info);
                    render_jobs(&mut text, &cp.jobs().counts_by_state());
                    render_dr(&mut text, &cp.group_statuses());
                    render_volume_io(&mut text, &cp.volume_io().all());
                    http_response(200, "OK", &text, head_only)
                }
                Ok(Err(e)) => http_response(500, "Internal Server Error", &format!("catalog error: {e}\n"), head_only),
                Err(e) => http_response(500, "Internal Server Error", &format!("{e}\n"), head_only),
            }
        }
        Route::NotFound => http_response(404, "Not Found", "not found: try /metrics\n", false),
        Route::MethodNotAllowed => http_response(405, "Method Not Allowed", "only GET\n", false),
        Route::BadRequest => http_response(400, "Bad Request", "bad request\n", false),
    };
    let _ = sock.write_all(response.as_bytes()).await;
    let _ = sock.shutdown().await;
}

#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics { head_only: bool },
    NotFound,
    MethodNotAllowed,
    BadRequest,
}

/// Routes an HTTP request line (`GET /metrics HTTP/1.1`).
fn route(request_line: &str) -> Route {
    let mut parts = request_line.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next()) else {
        return Route::BadRequest;
    };
    if !version.starts_with("HTTP/1.") {
        return Route::BadRequest;
    }
    let path = target.split('?').next().unwrap_or("");
    if path != "/metrics" {
        return Route::NotFound;
    }
    match method {
        "GET" => Route::Metrics { head_only: false },
        "HEAD" => Route::Metrics { head_only: true },
        _ => Route::MethodNotAllowed,
    }
}

fn http_response(code: u16, reason: &str, body: &str, head_only: bool) -> String {
    let ctype = if code == 200 { "text/plain; version=0.0.4; charset=utf-8" } else { "text/plain; charset=utf-8" };
    let mut r = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        r.push_str(body);
    }
    r
}

/// The Prometheus text exposition of the node-wide gauges.
fn render_metrics(g: &Gauges, info: &MetricsInfo) -> String {
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, labels: &str, value: u64| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n{name}{labels} {value}\n"));
    };
    gauge("evs_up", "1 while the EVS target serves.", "", 1);
    gauge("evs_volumes", "Volumes in the catalog.", "", g.volumes);
    gauge("evs_attached_volumes", "Volumes exported over NBD (attached).", "", g.attached_volumes);
    gauge("evs_tenants", "Tenants of this node.", "", g.tenants);
    let labels = format!(
        "{{version=\"{}\",io_backend=\"{}\",az=\"{}\"}}",
        env!("CARGO_PKG_VERSION"),
        info.io_backend,
        escape_label(&info.az)
    );
    gauge("evs_build_info", "Version, I/O backend and AZ of this target.", &labels, 1);
    out
}

/// Jobs by state (finished states count the jobs kept in the history).
pub fn render_jobs(out: &mut String, counts: &[(JobState, u64)]) {
    out.push_str("# HELP evs_jobs Jobs by state.\n# TYPE evs_jobs gauge\n");
    for (state, n) in counts {
        out.push_str(&format!("evs_jobs{{state=\"{}\"}} {n}\n", state.name()));
    }
}

/// DR groups on this daemon: RPO, point, bytes sent, cycles, state (labels `group`, `tenant`,
/// `role`).
pub fn render_dr(out: &mut String, groups: &[(String, evs_proto::v1::Group)]) {
    let labels = |t: &str, g: &evs_proto::v1::Group| {
        format!("group=\"{}\",tenant=\"{}\",role=\"{}\"", escape_label(&g.name), escape_label(t), g.role)
    };
    type Figure = (&'static str, &'static str, &'static str, fn(&evs_proto::v1::Group) -> f64);
    let figures: [Figure; 5] = [
        ("evs_dr_rpo_seconds", "gauge", "Now minus the time of the last consistent point (source).", |g| g.rpo_seconds),
        ("evs_dr_point_seq", "gauge", "Sequence number of the last consistent point.", |g| g.point_seq as f64),
        ("evs_dr_bytes_transferred_total", "counter", "Bytes sent to the target, compressed.", |g| {
            g.bytes_transferred as f64
        }),
        ("evs_dr_bytes_replicated_total", "counter", "Bytes of volume data replicated.", |g| g.bytes_replicated as f64),
        ("evs_dr_cycles_total", "counter", "Replication cycles committed.", |g| g.cycles as f64),
    ];
    for (name, kind, help, get) in figures {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (t, g) in groups {
            out.push_str(&format!("{name}{{{}}} {}\n", labels(t, g), get(g)));
        }
    }
    out.push_str("# HELP evs_dr_state 1 for the group's state.\n# TYPE evs_dr_state gauge\n");
    for (t, g) in groups {
        out.push_str(&format!("evs_dr_state{{{},state=\"{}\"}} 1\n", labels(t, g), g.state));
    }
}

/// Per-volume data-path figures: operations, bytes, errors, QoS throttling, queue depth and
/// latency histograms, labelled `volume`, `tenant` and `id`. IOPS is `rate(..._ops_total)`.
pub fn render_volume_io(out: &mut String, vols: &[Arc<VolumeIo>]) {
    let labels = |v: &VolumeIo| {
        format!("volume=\"{}\",tenant=\"{}\",id=\"{}\"", escape_label(&v.name), escape_label(&v.owner), v.volume_id)
    };
    /// A counter family: name, help, and how to read it from a volume's stats.
    type Counter = (&'static str, &'static str, fn(&VolumeStats) -> f64);
    let counters: [Counter; 9] = [
        ("evs_volume_read_ops_total", "Reads completed.", |s| s.read_ops.load(Ordering::Relaxed) as f64),
        ("evs_volume_read_bytes_total", "Bytes read.", |s| s.read_bytes.load(Ordering::Relaxed) as f64),
        ("evs_volume_write_ops_total", "Writes completed.", |s| s.write_ops.load(Ordering::Relaxed) as f64),
        ("evs_volume_write_bytes_total", "Bytes written.", |s| s.write_bytes.load(Ordering::Relaxed) as f64),
        (
            "evs_volume_write_early_replies_total",
            "Writes replied to before their data reached the disk (a flush waits for them).",
            |s| s.write_early_replies.load(Ordering::Relaxed) as f64,
        ),
        ("evs_volume_other_ops_total", "FLUSH, TRIM, WRITE_ZEROES, CACHE and BLOCK_STATUS requests completed.", |s| {
            s.other_ops.load(Ordering::Relaxed) as f64
        }),
        ("evs_volume_errors_total", "Requests answered with an error.", |s| s.errors.load(Ordering::Relaxed) as f64),
        ("evs_volume_throttled_seconds_total", "Time requests were delayed by the volume's QoS limits.", |s| {
            s.throttled_ns.load(Ordering::Relaxed) as f64 / 1e9
        }),
        ("evs_volume_throttled_ops_total", "Requests delayed by the volume's QoS limits.", |s| {
            s.throttled_ops.load(Ordering::Relaxed) as f64
        }),
    ];
    for (name, help, get) in counters {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n"));
        for v in vols {
            out.push_str(&format!("{name}{{{}}} {}\n", labels(v), get(&v.stats)));
        }
    }
    let name = "evs_volume_queue_depth";
    out.push_str(&format!("# HELP {name} Requests received and not yet answered.\n# TYPE {name} gauge\n"));
    for v in vols {
        out.push_str(&format!("{name}{{{}}} {}\n", labels(v), v.stats.queue_depth.load(Ordering::Relaxed).max(0)));
    }
    let name = "evs_volume_latency_seconds";
    out.push_str(&format!(
        "# HELP {name} Time from a request's arrival to its reply, QoS delay included.\n# TYPE {name} histogram\n"
    ));
    for v in vols {
        for (op, h) in [("read", &v.stats.read_latency), ("write", &v.stats.write_latency)] {
            let (cumulative, sum, count) = h.snapshot();
            let l = format!("{},op=\"{op}\"", labels(v));
            for (bound, c) in LATENCY_BOUNDS.iter().zip(&cumulative) {
                out.push_str(&format!("{name}_bucket{{{l},le=\"{bound}\"}} {c}\n"));
            }
            out.push_str(&format!("{name}_bucket{{{l},le=\"+Inf\"}} {count}\n"));
            out.push_str(&format!("{name}_sum{{{l}}} {sum}\n{name}_count{{{l}}} {count}\n"));
        }
    }
}

/// Escapes a Prometheus label value.
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route("GET /metrics HTTP/1.1\r"), Route::Metrics { head_only: false });
        assert_eq!(route("GET /metrics?x=1 HTTP/1.0"), Route::Metrics { head_only: false });
        assert_eq!(route("HEAD /metrics HTTP/1.1"), Route::Metrics { head_only: true });
        assert_eq!(route("POST /metrics HTTP/1.1"), Route::MethodNotAllowed);
        assert_eq!(route("GET / HTTP/1.1"), Route::NotFound);
        assert_eq!(route("garbage"), Route::BadRequest);
        assert_eq!(route("GET /metrics SPDY/3"), Route::BadRequest);
    }

    #[test]
    fn metrics_text() {
        let info = MetricsInfo { io_backend: "uring", az: "az\"1".into() };
        let text = render_metrics(&Gauges { volumes: 3, attached_volumes: 1, tenants: 2 }, &info);
        assert!(text.contains("# TYPE evs_up gauge\nevs_up 1\n"), "{text}");
        assert!(text.contains("\nevs_volumes 3\n"), "{text}");
        assert!(text.contains("\nevs_attached_volumes 1\n"), "{text}");
        assert!(text.contains("io_backend=\"uring\",az=\"az\\\"1\"} 1\n"), "{text}");
        assert!(text.contains("\nevs_tenants 2\n"), "{text}");
    }

    #[test]
    fn dr_figures() {
        let g = evs_proto::v1::Group {
            name: "g".into(),
            role: "source".into(),
            state: "protected".into(),
            rpo_seconds: 2.5,
            point_seq: 7,
            bytes_transferred: 1000,
            ..Default::default()
        };
        let mut text = String::new();
        render_dr(&mut text, &[("t1".into(), g)]);
        let l = "group=\"g\",tenant=\"t1\",role=\"source\"";
        assert!(text.contains(&format!("evs_dr_rpo_seconds{{{l}}} 2.5\n")), "{text}");
        assert!(text.contains(&format!("evs_dr_point_seq{{{l}}} 7\n")), "{text}");
        assert!(text.contains(&format!("evs_dr_bytes_transferred_total{{{l}}} 1000\n")), "{text}");
        assert!(text.contains(&format!("evs_dr_state{{{l},state=\"protected\"}} 1\n")), "{text}");
    }

    #[test]
    fn jobs_by_state() {
        let mut text = String::new();
        render_jobs(&mut text, &[(JobState::Queued, 3), (JobState::Running, 5)]);
        assert!(text.contains("# TYPE evs_jobs gauge\n"), "{text}");
        assert!(text.contains("evs_jobs{state=\"queued\"} 3\n"), "{text}");
        assert!(text.contains("evs_jobs{state=\"running\"} 5\n"), "{text}");
    }

    #[test]
    fn volume_figures() {
        let reg = VolumeIoRegistry::new();
        let v = reg.get_or_create(4, "t1", "db", None);
        v.stats.read_ops.fetch_add(10, Ordering::Relaxed);
        v.stats.write_bytes.fetch_add(4096, Ordering::Relaxed);
        v.stats.add_throttled(Duration::from_millis(1500));
        v.stats.read_latency.observe(Duration::from_micros(80));
        let mut text = String::new();
        render_volume_io(&mut text, &reg.all());
        let l = "volume=\"db\",tenant=\"t1\",id=\"4\"";
        assert!(text.contains(&format!("evs_volume_read_ops_total{{{l}}} 10\n")), "{text}");
        assert!(text.contains(&format!("evs_volume_write_bytes_total{{{l}}} 4096\n")), "{text}");
        assert!(text.contains(&format!("evs_volume_throttled_seconds_total{{{l}}} 1.5\n")), "{text}");
        assert!(
            text.contains(&format!("evs_volume_latency_seconds_bucket{{{l},op=\"read\",le=\"0.00005\"}} 0\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!("evs_volume_latency_seconds_bucket{{{l},op=\"read\",le=\"0.0001\"}} 1\n")),
            "{text}"
        );
        assert!(text.contains(&format!("evs_volume_latency_seconds_count{{{l},op=\"read\"}} 1\n")), "{text}");
        assert!(text.contains("# TYPE evs_volume_latency_seconds histogram\n"), "{text}");
    }

    #[test]
    fn http_framing() {
        let r = http_response(200, "OK", "abc", false);
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(r.contains("Content-Length: 3\r\n"));
        assert!(r.ends_with("\r\n\r\nabc"));
        assert!(http_response(200, "OK", "abc", true).ends_with("\r\n\r\n"));
    }
}
