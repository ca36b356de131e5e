//! QoS on the data path, measured with fio (nbd engine, QD32) over 10 s windows: each tier's
//! IOPS and bandwidth limits within ±5%, burst then baseline, online changes by `set-tier` and
//! `extend` on a live connection, limits shared by all connections of a volume, and a
//! throttled volume that leaves an unthrottled neighbour alone.
//!
//! The tiers come from a test config file (small rates, so that a shared 2-core machine keeps
//! up with every limit, and small burst buckets, so that a burst ends inside the window).
//! These tests run alone (see .config/nextest.toml): other tests would steal the CPU they
//! measure with.

use std::time::{Duration, Instant};

use evs_tests::fio::{assert_within, mean, FioJob};
use evs_tests::{Daemon, DaemonOptions};
use serde_json::Value;

/// Five tiers, each limit reachable here; bandwidth in MB/s (10^6).
const TIERS: &str = r#"
[tiers.common]
iops_baseline = 300
iops_per_gib = 0
iops_max = 300
iops_burst = 0
mbps_baseline = 20
mbps_per_gib = 0
mbps_max = 20
burst_seconds = 0

[tiers.high]
iops_baseline = 600
iops_per_gib = 0
iops_max = 600
iops_burst = 0
mbps_baseline = 25
mbps_per_gib = 0.05
mbps_max = 100
burst_seconds = 0

[tiers.gpssd]
iops_baseline = 100
iops_per_gib = 10
iops_max = 5000
iops_burst = 0
mbps_baseline = 30
mbps_per_gib = 0.1
mbps_max = 100
burst_seconds = 0

[tiers.ultra-high]
iops_baseline = 1000
iops_per_gib = 0
iops_max = 1000
iops_burst = 3000
mbps_baseline = 40
mbps_per_gib = 0
mbps_max = 40
burst_seconds = 2

[tiers.essd]
iops_baseline = 1000
iops_per_gib = 50
iops_max = 2500
iops_burst = 0
mbps_baseline = 50
mbps_per_gib = 0.5
mbps_max = 60
burst_seconds = 0
"#;

/// (tier, size in GiB, IOPS limit, bandwidth limit in bytes/s) by the formulas of TIERS:
/// min(max, baseline + per_gib × size).
const EXPECTED: [(&str, u64, f64, f64); 5] = [
    ("common", 100, 300.0, 20e6),
    ("high", 100, 600.0, 30e6),
    ("gpssd", 100, 1100.0, 40e6),
    ("ultra-high", 100, 1000.0, 40e6),
    ("essd", 100, 2500.0, 60e6),
];

fn daemon() -> Daemon {
    Daemon::start_with(DaemonOptions { config: Some(TIERS.to_string()), ..Default::default() })
}

fn qos(d: &Daemon, name: &str) -> Value {
    d.show_volume(name).get("qos").cloned().unwrap_or_else(|| panic!("volume {name} shows no qos"))
}

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or_else(|| panic!("no number {k} in {v}"))
}

#[test]
fn each_tier_limits_iops_and_bandwidth_within_5_percent() {
    let d = daemon();
    let dir = tempfile::tempdir().unwrap();
    let mut runs = Vec::new();
    for (tier, gib, iops, bw) in EXPECTED {
        for kind in ["iops", "bw"] {
            let name = format!("{tier}-{kind}");
            d.evsctl_ok(&["volume", "create", &name, "--size", &format!("{gib}G"), "--tier", tier]);
            // The limits the volume reports are the formula's.
            let q = qos(&d, &name);
            assert_eq!((f(&q, "iops_limit"), f(&q, "bandwidth_limit")), (iops, bw), "{name}: {q}");
            let uri = d.attach(&name);
            // 4 KiB requests hit the IOPS limit first; 256 KiB ones (one I/O unit each) the
            // bandwidth limit.
            let job = if kind == "iops" {
                FioJob::new(&uri, "randread", "4k", 32, 10)
            } else {
                FioJob::new(&uri, "read", "256k", 32, 10)
            };
            runs.push((name.clone(), kind, iops, bw, job.spawn(dir.path(), &name)));
        }
    }
    for (name, kind, iops, bw, run) in runs {
        let r = run.wait();
        // A tier with burst credits (ultra-high here) also spends its full bucket in the window.
        let q = qos(&d, &name);
        let secs = r.runtime.as_secs_f64();
        if kind == "iops" {
            let want = iops + f(&q, "iops_burst_capacity") / secs;
            assert_within(r.iops, want, 5.0, &format!("{name}: IOPS over 10 s"));
        } else {
            let want = bw + f(&q, "bandwidth_burst_capacity") / secs;
            assert_within(r.bw_bytes, want, 5.0, &format!("{name}: bandwidth over 10 s"));
        }
    }
}

#[test]
fn burst_first_then_baseline_once_the_bucket_is_empty() {
    let d = daemon();
    let dir = tempfile::tempdir().unwrap();
    d.evsctl_ok(&["volume", "create", "bursty", "--size", "100G", "--tier", "ultra-high"]);
    let q = qos(&d, "bursty");
    // 1000 IOPS, 3000 while credits last, credits = 2 s × 3000.
    assert_eq!((f(&q, "iops_limit"), f(&q, "iops_peak"), f(&q, "iops_burst_capacity")), (1000.0, 3000.0, 6000.0));
    assert_eq!(f(&q, "iops_burst_balance"), 6000.0, "a new volume starts with a full bucket");
    let uri = d.attach("bursty");
    let r = FioJob::new(&uri, "randread", "4k", 32, 10).run(dir.path(), "bursty");
    let s = &r.iops_per_second;
    assert!(s.len() >= 9, "per-second samples: {s:?}");
    // The credits last 6000 / (3000 - 1000) = 3 s: the first two whole seconds at the peak,
    // from the fifth on at the baseline.
    assert_within(mean(&s[..2]), 3000.0, 5.0, &format!("burst phase (per-second IOPS {s:?})"));
    assert_within(mean(&s[4..9]), 1000.0, 5.0, &format!("baseline phase (per-second IOPS {s:?})"));
    // Over the window: the bucket plus the baseline rate.
    let want = 6000.0 + 1000.0 * r.runtime.as_secs_f64();
    assert_within(r.total_ios as f64, want, 5.0, "I/Os over the window");
    let left = f(&qos(&d, "bursty"), "iops_burst_balance");
    assert!(left < 300.0, "the bucket is empty after the run (balance {left})");
}

#[test]
fn set_tier_and_extend_change_the_rate_of_a_live_connection() {
    let d = daemon();
    let dir = tempfile::tempdir().unwrap();
    d.evsctl_ok(&["volume", "create", "live", "--size", "100G", "--tier", "common"]);
    let uri = d.attach("live");
    let t0 = Instant::now();
    let run = FioJob::new(&uri, "randread", "4k", 32, 15).spawn(dir.path(), "live");
    let at = |s: u64| {
        let when = t0 + Duration::from_secs(s);
        std::thread::sleep(when.saturating_duration_since(Instant::now()));
    };
    at(5);
    // gpssd at 100 GiB: 100 + 10 × 100 = 1100 IOPS.
    d.evsctl_ok(&["volume", "set-tier", "live", "--tier", "gpssd"]);
    at(10);
    // gpssd at 200 GiB: 2100 IOPS.
    d.evsctl_ok(&["volume", "extend", "live", "--size", "200G"]);
    assert_eq!(f(&qos(&d, "live"), "iops_limit"), 2100.0);
    let r = run.wait();
    let s = &r.iops_per_second;
    assert!(s.len() >= 14, "per-second samples: {s:?}");
    assert_within(mean(&s[1..4]), 300.0, 5.0, &format!("as common (per-second IOPS {s:?})"));
    assert_within(mean(&s[6..9]), 1100.0, 5.0, &format!("after set-tier gpssd (per-second IOPS {s:?})"));
    assert_within(mean(&s[11..14]), 2100.0, 5.0, &format!("after extend to 200 GiB (per-second IOPS {s:?})"));
}

#[test]
fn limits_are_shared_by_connections_and_spare_the_neighbours() {
    let d = daemon();
    let dir = tempfile::tempdir().unwrap();
    d.evsctl_ok(&["volume", "create", "noisy", "--size", "100G", "--tier", "common"]);
    d.evsctl_ok(&["volume", "create", "quiet", "--size", "10G", "--tier", "unlimited"]);
    let noisy = d.attach("noisy");
    let quiet = d.attach("quiet");
    assert!(d.show_volume("quiet").get("qos").is_none_or(Value::is_null), "unlimited has no limits");
    // Two connections to the throttled volume, one to the unlimited one, at once.
    let a = FioJob::new(&noisy, "randread", "4k", 32, 10).spawn(dir.path(), "noisy-a");
    let b = FioJob::new(&noisy, "randread", "4k", 32, 10).spawn(dir.path(), "noisy-b");
    let q = FioJob::new(&quiet, "randread", "4k", 32, 10).spawn(dir.path(), "quiet");
    let (a, b, q) = (a.wait(), b.wait(), q.wait());
    assert_within(a.iops + b.iops, 300.0, 5.0, "two connections of one common volume together");
    assert!(a.iops > 60.0 && b.iops > 60.0, "both connections progress: {:.0} and {:.0} IOPS", a.iops, b.iops);
    assert!(q.iops > 10.0 * 300.0, "the unlimited neighbour ran at {:.0} IOPS", q.iops);

    let m = d.metrics();
    let get = |name: &str, vol: &str| {
        m.get(name, &[("volume", vol)]).unwrap_or_else(|| panic!("no {name} for volume {vol} in the metrics"))
    };
    assert!(get("evs_volume_throttled_ops_total", "noisy") > 0.0);
    assert!(get("evs_volume_throttled_seconds_total", "noisy") > 1.0);
    assert_eq!(get("evs_volume_throttled_ops_total", "quiet"), 0.0, "the neighbour was never delayed");
    let reads = get("evs_volume_read_ops_total", "noisy");
    let fio_reads = (a.total_ios + b.total_ios) as f64;
    assert!(reads >= fio_reads, "metrics count {reads} reads, fio completed {fio_reads}");
    assert_eq!(get("evs_volume_queue_depth", "noisy"), 0.0, "nothing outstanding after the run");
}
