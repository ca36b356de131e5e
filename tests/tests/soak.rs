//! Load and soak: 64 NBD connections over 16 volumes, each verifying every write by reading it
//! back, for a bounded time, while snapshots are taken and deleted, backups run and a DR group
//! replicates four of the volumes to a second daemon every second. At the end: zero
//! verification errors (every connection's region reads back as its model, the replica's
//! last point and a fresh backup read back as the source), the daemon's memory stayed under a
//! stated bound and no file descriptor leaked.
//!
//! `EVS_SOAK_SECONDS` sets the duration (default 30 s: the CI sample; the long run in
//! RELIABILITY.md uses 1800).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use evs_tests::util::{first_difference, Rng, BLOCK, MIB};
use evs_tests::{Daemon, DaemonOptions, NbdClient};
use serde_json::Value;

const VOLUMES: usize = 16;
const CONNECTIONS: usize = 64;
const VOLUME_SIZE: u64 = 16 * MIB;
/// Each connection owns a disjoint quarter of its volume.
const REGION: u64 = VOLUME_SIZE / (CONNECTIONS / VOLUMES) as u64;
/// The memory bound: resident set size may grow by at most this much over the soak.
const RSS_GROWTH_BOUND: u64 = 256 * MIB;

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn rss(pid: u32) -> u64 {
    proc_status_kib(pid, "VmRSS:") * 1024
}

/// (all descriptors, sockets) of a process.
fn fds(pid: u32) -> (usize, usize) {
    let mut all = 0;
    let mut sockets = 0;
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        all += 1;
        if std::fs::read_link(e.path()).map(|t| t.to_string_lossy().starts_with("socket:")).unwrap_or(false) {
            sockets += 1;
        }
    }
    (all, sockets)
}

fn layer_files(d: &Daemon) -> usize {
    std::fs::read_dir(d.data_dir().join("layers")).unwrap().count()
}

/// One connection's life: random writes of 1–16 blocks in its region, each read back at once
/// and compared; a flush now and then. Returns (writes, verification errors) after a final
/// read of the whole region against its model.
fn client(uri: String, region: u64, seed: u64, stop: Arc<AtomicBool>, errors: Arc<AtomicU64>) -> u64 {
    let mut rng = Rng::new(seed);
    let mut c = NbdClient::connect(&uri).unwrap_or_else(|e| panic!("connect {uri}: {e}"));
    let blocks = REGION / BLOCK;
    let base = region * REGION;
    let mut model = vec![0u8; REGION as usize];
    let mut writes = 0;
    let fail = |what: String| {
        eprintln!("verification error: {what}");
        errors.fetch_add(1, Ordering::Relaxed);
    };
    while !stop.load(Ordering::Relaxed) {
        let n = rng.range(1, 17).min(blocks);
        let at = rng.below(blocks - n + 1) * BLOCK;
        let data = rng.bytes((n * BLOCK) as usize);
        c.write(base + at, &data).unwrap_or_else(|e| panic!("write on {uri}: {e}"));
        model[at as usize..at as usize + data.len()].copy_from_slice(&data);
        writes += 1;
        let back = c.read(base + at, data.len() as u32).unwrap_or_else(|e| panic!("read on {uri}: {e}"));
        if back != data {
            fail(format!(
                "{uri} offset {}: read-after-write differs at {:?}",
                base + at,
                first_difference(&back, &data)
            ));
        }
        if rng.chance(16) {
            c.flush().unwrap_or_else(|e| panic!("flush on {uri}: {e}"));
        }
    }
    c.flush().unwrap();
    let all = c.read_all(base, REGION, 1 << 20).unwrap();
    if let Some(at) = first_difference(&all, &model) {
        fail(format!("{uri} region {region}: final read differs from the model at {}", base + at as u64));
    }
    c.disconnect().unwrap();
    writes
}

fn evsctl_loop(d_args: Vec<String>, stop: Arc<AtomicBool>, seed: u64, snapshots: bool) -> u64 {
    let mut rng = Rng::new(seed);
    let mut done = 0u64;
    let mut taken: Vec<(usize, u64)> = Vec::new();
    let run = |args: &[String]| -> Value {
        let out = std::process::Command::new(evs_tests::bin_path("evsctl"))
            .args(&d_args)
            .args(["--output", "json"])
            .args(args)
            .output()
            .expect("run evsctl");
        assert!(out.status.success(), "evsctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    };
    while !stop.load(Ordering::Relaxed) {
        let v = rng.below(VOLUMES as u64) as usize;
        if snapshots {
            done += 1;
            run(&["snapshot".into(), "create".into(), format!("v{v}"), format!("soak{done}")]);
            taken.push((v, done));
            if taken.len() > 8 {
                let (ov, on) = taken.remove(rng.below(taken.len() as u64) as usize);
                run(&["snapshot".into(), "delete".into(), format!("v{ov}@soak{on}")]);
            }
            thread::sleep(Duration::from_millis(200));
        } else {
            let r = run(&["backup".into(), "create".into(), format!("v{v}"), "--wait".into()]);
            assert_eq!(r["job"]["state"], "succeeded", "backup during the soak: {r}");
            done += 1;
            thread::sleep(Duration::from_millis(500));
        }
    }
    if snapshots {
        for (v, n) in taken {
            run(&["snapshot".into(), "delete".into(), format!("v{v}@soak{n}")]);
        }
    }
    done
}

fn read_volume(uri: &str) -> Vec<u8> {
    let mut c = NbdClient::connect(uri).unwrap();
    c.read_all(0, VOLUME_SIZE, 1 << 20).unwrap()
}

#[test]
fn soak_64_connections_16_volumes_with_snapshots_backups_and_replication() {
    let seconds: u64 = std::env::var("EVS_SOAK_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(30);
    let a = Daemon::start_with(DaemonOptions {
        az: Some("az1".into()),
        config: Some("[backups]\nconcurrency = 2\n".into()),
        ..Default::default()
    });
    let b = Daemon::start_with(DaemonOptions { az: Some("az2".into()), ..Default::default() });
    let uris: Vec<String> = (0..VOLUMES).map(|v| a.create_volume(&format!("v{v}"), "16M").0).collect();
    a.evsctl_ok(&["server", "create", "vm", "--volumes", "v0,v1,v2,v3"]);
    let target = format!("http://{}", b.api_addr);
    a.create_dr_group("g", &b, &target, &[]);
    let p = a.evsctl_json(&["dr", "protect", "g", "--server", "vm", "--wait"]);
    assert_eq!(p["job"]["state"], "succeeded", "{p}");
    let pid = a.pid().unwrap();
    let (rss0, (fds0, sockets0), layers0) = (rss(pid), fds(pid), layer_files(&a));

    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let mut rng = Rng::from_env_or_time("soak");
    let clients: Vec<_> = (0..CONNECTIONS)
        .map(|i| {
            let (uri, seed, stop, errors) = (uris[i % VOLUMES].clone(), rng.next_u64(), stop.clone(), errors.clone());
            thread::spawn(move || client(uri, (i / VOLUMES) as u64, seed, stop, errors))
        })
        .collect();
    let args = vec!["--endpoint".to_string(), a.endpoint(), "--token".to_string(), a.token().to_string()];
    let churn = [true, false].map(|snap| {
        let (args, stop, seed) = (args.clone(), stop.clone(), rng.next_u64());
        thread::spawn(move || evsctl_loop(args, stop, seed, snap))
    });
    let started = Instant::now();
    let mut peak = rss0;
    let mut peak_fds = fds0;
    while started.elapsed() < Duration::from_secs(seconds) {
        thread::sleep(Duration::from_millis(500));
        peak = peak.max(rss(pid));
        peak_fds = peak_fds.max(fds(pid).0);
    }
    stop.store(true, Ordering::Relaxed);
    let writes: u64 = clients.into_iter().map(|h| h.join().expect("a client thread panicked")).sum();
    let [snapshots, backups] = churn.map(|h| h.join().expect("an evsctl thread panicked"));
    let status = a.evsctl_json(&["dr", "status", "g"]);
    let cycles = status["cycles"].as_u64().unwrap_or(0);
    assert_eq!(errors.load(Ordering::Relaxed), 0, "verification errors during the soak");

    // The replica's newest point and a fresh backup hold what the source holds.
    let seq = status["point_seq"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while a.evsctl_json(&["dr", "status", "g"])["point_seq"].as_u64().unwrap() < seq + 2 {
        assert!(Instant::now() < deadline, "replication stalled after the soak");
        thread::sleep(Duration::from_millis(100));
    }
    let v0 = read_volume(&uris[0]);
    let drill = a.evsctl_json(&["dr", "drill", "start", "g"]);
    let drill_uri =
        drill["volumes"].as_array().unwrap().iter().find(|v| v["volume"] == "v0").unwrap_or_else(|| panic!("{drill}"))
            ["uri"]
            .as_str()
            .unwrap()
            .to_string();
    assert!(read_volume(&drill_uri) == v0, "the replica of v0 differs from v0");
    a.evsctl_ok(&["dr", "drill", "stop", "g"]);
    let bk = a.evsctl_json(&["backup", "create", "v5", "--wait"]);
    let v5 = read_volume(&uris[5]);
    let r = a.evsctl_json(&["backup", "restore", bk["backup_id"].as_str().unwrap(), "--to", "v5-back", "--wait"]);
    assert_eq!(r["job"]["state"], "succeeded", "{r}");
    assert!(read_volume(&a.attach("v5-back")) == v5, "the backup of v5 differs from v5");
    a.evsctl_ok(&["volume", "detach", "v5-back"]);
    a.evsctl_ok(&["volume", "delete", "v5-back"]);

    // Memory and descriptors, once the clients are gone and deleted snapshots are merged.
    thread::sleep(Duration::from_secs(2));
    let (rss1, (fds1, sockets1), layers1) = (rss(pid), fds(pid), layer_files(&a));
    eprintln!(
        "soak: {seconds} s, {CONNECTIONS} connections, {writes} verified writes, {snapshots} snapshots, {backups} backups, {cycles} replication cycles; \
         RSS {} MiB -> peak {} MiB -> {} MiB after; fds {fds0} -> peak {peak_fds} -> {fds1} (sockets {sockets0} -> {sockets1}); layer files {layers0} -> {layers1}",
        rss0 / MIB,
        peak / MIB,
        rss1 / MIB
    );
    assert!(
        writes > CONNECTIONS as u64 && snapshots > 0 && backups > 0 && cycles > 0,
        "the soak did not run every activity"
    );
    assert!(
        peak <= rss0 + RSS_GROWTH_BOUND,
        "RSS grew from {} to {} MiB (bound: +{} MiB)",
        rss0 / MIB,
        peak / MIB,
        RSS_GROWTH_BOUND / MIB
    );
    // Every connection's socket is closed; other descriptors are the open layers (3 each:
    // data, O_DIRECT data, map; 2 files per layer on disk), a few of the runtime's.
    assert!(sockets1 <= sockets0 + 2, "sockets: {sockets0} before, {sockets1} after the clients left");
    let layer_fds = 3 * layers1.saturating_sub(layers0) / 2;
    assert!(
        fds1 <= fds0 + layer_fds + 4,
        "descriptors: {fds0} before, {fds1} after ({layers0} -> {layers1} layer files)"
    );
}
