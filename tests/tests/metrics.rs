//! The Prometheus endpoint, scraped and parsed: node gauges, per-volume counters that match
//! the I/O a client did exactly, latency histograms consistent with them, and jobs by state.

use evs_tests::{Daemon, NbdClient};

#[test]
fn metrics_count_what_clients_did() {
    let d = Daemon::start();
    let (uri, _) = d.create_volume("metered", "64M");
    d.evsctl_ok(&["volume", "create", "spare", "--size", "1M"]);
    let mut c = NbdClient::connect(&uri).unwrap();
    for i in 0..10u64 {
        c.write(i * 65536, &[i as u8 + 1; 65536]).unwrap();
    }
    c.flush().unwrap();
    for i in 0..7u64 {
        assert_eq!(c.read(i * 65536, 4096).unwrap(), vec![i as u8 + 1; 4096]);
    }
    c.trim(0, 65536).unwrap();
    drop(c);
    d.evsctl_ok(&["volume", "delete", "spare"]);

    let m = d.metrics();
    let v = [("volume", "metered")];
    let get = |name: &str| m.get(name, &v).unwrap_or_else(|| panic!("no {name} for volume metered"));
    assert_eq!(get("evs_volume_write_ops_total"), 10.0);
    assert_eq!(get("evs_volume_write_bytes_total"), 10.0 * 65536.0);
    assert_eq!(get("evs_volume_read_ops_total"), 7.0);
    assert_eq!(get("evs_volume_read_bytes_total"), 7.0 * 4096.0);
    assert_eq!(get("evs_volume_other_ops_total"), 2.0, "one FLUSH, one TRIM");
    assert_eq!(get("evs_volume_errors_total"), 0.0);
    assert_eq!(get("evs_volume_queue_depth"), 0.0);
    assert_eq!(get("evs_volume_throttled_ops_total"), 0.0, "a gpssd volume far below its limits");
    let rd = [("volume", "metered"), ("op", "read")];
    assert_eq!(m.get("evs_volume_latency_seconds_count", &rd), Some(7.0));
    assert_eq!(
        m.get("evs_volume_latency_seconds_bucket", &[("volume", "metered"), ("op", "read"), ("le", "+Inf")]),
        Some(7.0)
    );
    let wr = [("volume", "metered"), ("op", "write")];
    assert_eq!(m.get("evs_volume_latency_seconds_count", &wr), Some(10.0));
    assert!(m.get("evs_volume_latency_seconds_sum", &wr).unwrap() > 0.0);
    // Buckets are cumulative: never decreasing towards +Inf.
    let buckets: Vec<f64> = m
        .samples
        .iter()
        .filter(|s| {
            s.name == "evs_volume_latency_seconds_bucket"
                && s.labels.iter().any(|(k, v)| k == "op" && v == "write")
                && s.labels.iter().any(|(k, v)| k == "volume" && v == "metered")
        })
        .map(|s| s.value)
        .collect();
    assert_eq!(buckets.len(), 16, "15 bounds and +Inf");
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
    assert_eq!(m.type_of("evs_volume_latency_seconds"), Some("histogram"));
    assert_eq!(m.type_of("evs_volume_read_ops_total"), Some("counter"));

    assert_eq!(m.get("evs_up", &[]), Some(1.0));
    assert_eq!(m.get("evs_volumes", &[]), Some(1.0));
    assert_eq!(m.get("evs_attached_volumes", &[]), Some(1.0));
    assert_eq!(m.get("evs_tenants", &[]), Some(1.0));
    assert_eq!(m.get("evs_jobs", &[("state", "succeeded")]), Some(1.0), "the delete of `spare`");
    assert_eq!(m.get("evs_jobs", &[("state", "running")]), Some(0.0));
    assert!(m.get("evs_build_info", &[("az", "az1")]).is_some());
}
