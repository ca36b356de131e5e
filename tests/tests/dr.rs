//! Disaster recovery between two real `evs-target` processes (two AZs, two data dirs, two
//! sets of ports), driven by evsctl, checked with real NBD clients: a drill is a consistent
//! point under concurrent writers; a switchover loses nothing; a failover after kill -9 of the
//! source promotes a recent consistent point; reprotect sends only the delta and a failback
//! restores service on the original AZ; link faults mid-cycle resume without a full resync.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use evs_tests::proxy::Proxy;
use evs_tests::tools::{format_output, output_with_timeout, require_tool, run_tool};
use evs_tests::util::{Rng, MIB};
use evs_tests::{Daemon, DaemonOptions, NbdClient};
use serde_json::Value;

const BLOCKS: u64 = 2048;

fn az(name: &str) -> Daemon {
    az_with(name, None)
}

/// An AZ's daemon with `FAILPOINTS` set to `failpoints` (the build must have them).
fn az_with(name: &str, failpoints: Option<&str>) -> Daemon {
    let env = failpoints.map(|f| vec![("FAILPOINTS".to_string(), f.to_string())]).unwrap_or_default();
    let d = Daemon::start_with(DaemonOptions { az: Some(name.into()), env, ..Default::default() });
    if failpoints.is_some() {
        d.require_failpoints();
    }
    d
}

/// Source A with volumes `va`, `vb` (8 MiB) in server `vm`, target B, group `g` (1 s cycles)
/// through `via` (the target's API address, or a proxy's).
fn pair_of_azs(via: Option<std::net::SocketAddr>) -> (Daemon, Daemon, Vec<String>) {
    pair_of_azs_with(via, None, None)
}

/// [`pair_of_azs`] with `FAILPOINTS` on the source and on the target.
fn pair_of_azs_with(
    via: Option<std::net::SocketAddr>,
    a_failpoints: Option<&str>,
    b_failpoints: Option<&str>,
) -> (Daemon, Daemon, Vec<String>) {
    let a = az_with("az1", a_failpoints);
    let b = az_with("az2", b_failpoints);
    let uris: Vec<String> = ["va", "vb"].iter().map(|v| a.create_volume(v, "8M").0).collect();
    a.evsctl_ok(&["server", "create", "vm", "--volumes", "va,vb"]);
    let target = format!("http://{}", via.unwrap_or(b.api_addr));
    let g = a.create_dr_group("g", &b, &target, &[]);
    assert_eq!((g["role"].as_str(), g["peer_az"].as_str()), (Some("source"), Some("az2")), "{g}");
    (a, b, uris)
}

fn protect(a: &Daemon) {
    let v = a.evsctl_json(&["dr", "protect", "g", "--server", "vm", "--wait"]);
    assert_eq!(v["job"]["state"], "succeeded", "{v}");
}

fn status(d: &Daemon) -> Value {
    d.evsctl_json(&["dr", "status", "g"])
}

/// Waits until the group's point passes `seq`; returns the new status.
fn point_after(d: &Daemon, seq: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = status(d);
        if s["point_seq"].as_u64().unwrap_or(0) > seq {
            return s;
        }
        assert!(Instant::now() < deadline, "no new point after {seq} in 60 s: {s}");
        thread::sleep(Duration::from_millis(100));
    }
}

/// Waits for a point taken after now: the cycle in flight may have snapshotted before the
/// caller's last writes, so the point after it.
fn settled(d: &Daemon) -> Value {
    let seq = status(d)["point_seq"].as_u64().unwrap();
    point_after(d, seq + 1)
}

/// A writer of sequence-numbered blocks alternating between the two volumes; remembers when
/// each record was acknowledged.
struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<(u64, Instant)>>>,
    handle: Option<thread::JoinHandle<u64>>,
}

impl Writer {
    fn start(uris: &[String]) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let handle = {
            let (uris, stop, acked) = (uris.to_vec(), stop.clone(), acked.clone());
            thread::spawn(move || {
                let mut conns: Vec<NbdClient> = uris.iter().map(|u| NbdClient::connect(u).unwrap()).collect();
                let mut seq = 1u64;
                while !stop.load(Ordering::Acquire) && seq / 2 < BLOCKS {
                    let mut block = vec![0u8; 4096];
                    for chunk in block.chunks_mut(8) {
                        chunk.copy_from_slice(&seq.to_le_bytes());
                    }
                    if conns[(seq % 2) as usize].write((seq / 2) * 4096, &block).is_err() {
                        break; // the source died
                    }
                    acked.lock().unwrap().push((seq, Instant::now()));
                    seq += 1;
                    thread::sleep(Duration::from_millis(2));
                }
                seq - 1
            })
        };
        Writer { stop, acked, handle: Some(handle) }
    }

    fn stop(&mut self) -> u64 {
        self.stop.store(true, Ordering::Release);
        self.handle.take().unwrap().join().unwrap()
    }
}

/// Reads the two volumes (or their copies) and checks they are one consistent instant of the
/// writer: returns the newest record they hold.
fn consistent_point(uris: &[String]) -> u64 {
    let mut present = Vec::new();
    for (vi, uri) in uris.iter().enumerate() {
        let mut c = NbdClient::connect(uri).unwrap();
        let data = c.read_all(0, BLOCKS * 4096, 1 << 20).unwrap();
        for b in 0..BLOCKS {
            let seq = b * 2 + vi as u64;
            if seq == 0 {
                continue;
            }
            let got = u64::from_le_bytes(data[(b * 4096) as usize..(b * 4096 + 8) as usize].try_into().unwrap());
            assert!(got == 0 || got == seq, "volume {vi} block {b} holds record {got}");
            present.push((seq, got == seq));
        }
    }
    present.sort();
    let newest = present.iter().filter(|(_, p)| *p).map(|(s, _)| *s).max().unwrap_or(0);
    let missing: Vec<u64> = present.iter().filter(|(s, p)| *s <= newest && !p).map(|(s, _)| *s).collect();
    assert!(missing.is_empty(), "the point holds record {newest} but misses earlier records {missing:?}");
    newest
}

fn image(d: &Daemon, volume: &str, file: &str) -> std::path::PathBuf {
    let uri = d.attach(volume);
    let path = d.root().join(file);
    run_tool(Command::new(require_tool("qemu-img")).args(["convert", "-f", "raw", "-O", "raw", &uri]).arg(&path));
    path
}

fn assert_same(d: &Daemon, volume: &str, file: &std::path::Path) {
    let uri = d.attach(volume);
    let out = output_with_timeout(
        Command::new(require_tool("qemu-img")).args(["compare", "-f", "raw", "-F", "raw", &uri]).arg(file),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{volume} differs from {}\n{}", file.display(), format_output(&out));
}

#[test]
fn a_drill_is_a_consistent_point_while_replication_goes_on() {
    let (a, b, uris) = pair_of_azs(None);
    protect(&a);
    let s = status(&a);
    assert_eq!(s["state"], "protected", "{s}");
    assert!(s["pairs"].as_array().unwrap().iter().all(|p| p["state"] == "protected"), "{s}");
    // Replicas are hidden on the target and cannot be touched there.
    let list = b.evsctl_json(&["volume", "list"]);
    assert!(list["volumes"].as_array().unwrap().is_empty(), "replicas are listed: {list}");
    let out = b.evsctl(&["volume", "attach", "va"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("replica of DR group"), "{}", format_output(&out));
    let out = b.evsctl(&["volume", "delete", "va"]);
    assert!(!out.status.success());

    let mut w = Writer::start(&uris);
    let first = point_after(&a, s["point_seq"].as_u64().unwrap());
    let first = first["point_seq"].as_u64().unwrap();
    point_after(&a, first + 1);
    let d = a.evsctl_json(&["dr", "drill", "start", "g"]);
    let vols = d["volumes"].as_array().unwrap();
    assert_eq!(vols.len(), 2, "{d}");
    let drill_uris: Vec<String> = vols.iter().map(|v| v["uri"].as_str().unwrap().to_string()).collect();
    // Replication goes on during the drill.
    let during = status(&a)["point_seq"].as_u64().unwrap();
    point_after(&a, during);
    let newest = consistent_point(&drill_uris);
    let written = w.stop();
    assert!(newest > 0 && newest < written, "the drill holds record {newest} of {written}");
    a.evsctl_ok(&["dr", "drill", "stop", "g"]);
    let out = b.evsctl(&["volume", "show", "va-drill"]);
    assert!(!out.status.success(), "the drill volume outlived the drill");
    // The replicas were not touched: a new drill after the writer stopped sees everything.
    settled(&a);
    let d = a.evsctl_json(&["dr", "drill", "start", "g"]);
    let drill_uris: Vec<String> =
        d["volumes"].as_array().unwrap().iter().map(|v| v["uri"].as_str().unwrap().to_string()).collect();
    assert_eq!(consistent_point(&drill_uris), written, "the last point holds every acknowledged write");
    a.evsctl_ok(&["dr", "drill", "stop", "g"]);
    let s = status(&a);
    assert!(s["bytes_transferred"].as_u64().unwrap() > 0 && s["cycles"].as_u64().unwrap() > 2, "{s}");
    assert!(s["rpo_seconds"].as_f64().unwrap() < 10.0, "{s}");
    // Per pair (SPEC: state, last consistent point, RPO, bytes sent): the group's point, and
    // the bytes of each pair, which add up to the group's.
    let pairs = s["pairs"].as_array().unwrap();
    for p in pairs {
        assert_eq!((&p["point_seq"], &p["point_unix_ms"]), (&s["point_seq"], &s["point_unix_ms"]), "{s}");
        assert!(p["rpo_seconds"].as_f64().unwrap() >= 0.0 && p["rpo_seconds"].as_f64().unwrap() < 10.0, "{s}");
        assert!(p["bytes_transferred"].as_u64().unwrap() > 0 && p["bytes_replicated"].as_u64().unwrap() > 0, "{s}");
    }
    let sum = |k: &str| pairs.iter().map(|p| p[k].as_u64().unwrap()).sum::<u64>();
    assert_eq!(sum("bytes_transferred"), s["bytes_transferred"].as_u64().unwrap(), "{s}");
    assert_eq!(sum("bytes_replicated"), s["bytes_replicated"].as_u64().unwrap(), "{s}");
    let table = a.evsctl_ok(&["dr", "status", "g"]);
    assert!(table.contains("POINT") && table.contains("RPO") && table.contains("SENT"), "{table}");
    // The same figures as metrics, on both sides.
    let m = a.metrics();
    let l = [("group", "g"), ("role", "source")];
    assert!(m.get("evs_dr_point_seq", &l).unwrap() >= 3.0);
    assert!(m.get("evs_dr_bytes_transferred_total", &l).unwrap() > 0.0);
    assert!(m.get("evs_dr_rpo_seconds", &l).is_some());
    assert_eq!(m.get("evs_dr_state", &[("group", "g"), ("state", "protected")]), Some(1.0));
    let mb = b.metrics();
    assert!(mb.get("evs_dr_point_seq", &[("group", "g"), ("role", "target")]).unwrap() >= 3.0);
}

#[test]
fn switchover_loses_nothing_and_failback_brings_it_home() {
    let (a, b, uris) = pair_of_azs(None);
    let mut rng = Rng::new(5);
    for u in &uris {
        let mut c = NbdClient::connect(u).unwrap();
        for i in 0..6 {
            c.write(i * MIB, &rng.bytes(MIB as usize)).unwrap();
        }
        c.flush().unwrap();
    }
    protect(&a);
    // More writes after the initial sync, right up to the switchover.
    for u in &uris {
        let mut c = NbdClient::connect(u).unwrap();
        c.write(7 * MIB, &rng.bytes(MIB as usize)).unwrap();
        c.write(123 * 4096, &rng.bytes(4096)).unwrap();
    }
    let copies = [image(&a, "va", "va.raw"), image(&a, "vb", "vb.raw")];
    let v = a.evsctl_json(&["dr", "switchover", "g", "--wait"]);
    assert_eq!(v["job"]["state"], "succeeded", "{v}");
    // B serves the volumes now, byte for byte as A had them; A's are replicas.
    let sb = status(&b);
    assert_eq!((sb["role"].as_str(), sb["state"].as_str()), (Some("source"), Some("protected")), "{sb}");
    for (vol, copy) in ["va", "vb"].iter().zip(&copies) {
        let dst = b.root().join(copy.file_name().unwrap());
        std::fs::copy(copy, &dst).unwrap();
        assert_same(&b, vol, &dst);
    }
    let out = a.evsctl(&["volume", "attach", "va"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("replica of DR group"), "{}", format_output(&out));
    assert_eq!(status(&a)["role"], "target");

    // Work on B, replicated back to A; then fail back.
    let ub = b.attach("va");
    let mut c = NbdClient::connect(&ub).unwrap();
    c.write(2 * MIB, &vec![0xb2; MIB as usize]).unwrap();
    c.flush().unwrap();
    drop(c);
    let copy_b = image(&b, "va", "va-b.raw");
    settled(&b);
    let v = b.evsctl_json(&["dr", "switchover", "g", "--wait"]);
    assert_eq!(v["job"]["state"], "succeeded", "{v}");
    assert_eq!(status(&a)["role"], "source");
    let dst = a.root().join("va-b.raw");
    std::fs::copy(&copy_b, &dst).unwrap();
    assert_same(&a, "va", &dst);
}

#[test]
fn failover_after_kill9_then_reprotect_sends_only_the_delta_and_failback() {
    let (mut a, b, uris) = pair_of_azs(None);
    protect(&a);
    let mut w = Writer::start(&uris);
    // The RPO while it runs, measured before the kill.
    let mut rpo_bound: f64 = 0.0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(4) {
        rpo_bound = rpo_bound.max(status(&a)["rpo_seconds"].as_f64().unwrap());
        thread::sleep(Duration::from_millis(200));
    }
    let killed_at = Instant::now();
    a.kill9();
    let written = w.stop();
    let acked = w.acked.lock().unwrap().clone();

    let f = b.evsctl_json(&["dr", "failover", "g", "--wait"]);
    assert_eq!(f["job"]["state"], "succeeded", "{f}");
    let s = status(&b);
    assert_eq!((s["role"].as_str(), s["state"].as_str()), (Some("source"), Some("failed-over")), "{s}");
    let promoted: Vec<String> = ["va", "vb"].iter().map(|v| b.attach(v)).collect();
    let newest = consistent_point(&promoted);
    assert!(newest > 0, "the promoted point holds no write");
    // No older than the RPO measured before the kill (plus one cycle of slack).
    let t_newest = acked.iter().find(|(s, _)| *s == newest).map(|(_, t)| *t).unwrap();
    let age = killed_at.duration_since(t_newest).as_secs_f64();
    assert!(age <= rpo_bound + 2.0, "the promoted point is {age:.1} s old; the RPO was at most {rpo_bound:.1} s");
    assert!(newest <= written);

    // Service on B; then the old source comes back and is reprotected from B.
    let mut c = NbdClient::connect(&promoted[0]).unwrap();
    c.write(4096, &vec![0xee; 4096]).unwrap();
    c.flush().unwrap();
    drop(c);
    a.restart();
    let before = status(&b)["bytes_replicated"].as_u64().unwrap();
    let r = b.evsctl_json(&["dr", "reprotect", "g", "--wait"]);
    assert_eq!(r["job"]["state"], "succeeded", "{r}");
    let sent = status(&b)["bytes_replicated"].as_u64().unwrap() - before;
    assert!(sent < 2 * MIB, "reprotect sent {sent} bytes for 8 MiB volumes: not a delta");
    assert_eq!(status(&a)["role"], "target");
    // Failback: switch back to A, with B's write.
    let copy = image(&b, "va", "va-after.raw");
    b.evsctl_ok(&["volume", "detach", "va"]);
    let v = b.evsctl_json(&["dr", "switchover", "g", "--wait"]);
    assert_eq!(v["job"]["state"], "succeeded", "{v}");
    assert_eq!(status(&a)["role"], "source");
    let dst = a.root().join("va-after.raw");
    std::fs::copy(&copy, &dst).unwrap();
    assert_same(&a, "va", &dst);
}

/// A drill that starts while a cycle commits on the target. The target holds every drill 1.5 s
/// (`FAILPOINTS` `dr-peer-drill`), between reading its point and cloning it, while the writer
/// keeps 1 s cycles coming: a drill that read the group before taking its lock named a point
/// that the next commit replaced and deleted meanwhile ("snapshot .dr-g-N not found").
#[test]
fn a_drill_that_overlaps_a_commit_gets_a_whole_point() {
    let (a, _b, uris) = pair_of_azs_with(None, None, Some("dr-peer-drill=sleep(1500)"));
    protect(&a);
    let mut w = Writer::start(&uris);
    let mut points = Vec::new();
    for round in 0..3 {
        let before = status(&a)["point_seq"].as_u64().unwrap();
        point_after(&a, before);
        let out = a.evsctl(&["--output", "json", "dr", "drill", "start", "g"]);
        assert!(out.status.success(), "drill {round} overlapping a commit failed\n{}", format_output(&out));
        let d: Value = serde_json::from_slice(&out.stdout).unwrap();
        let drill_uris: Vec<String> =
            d["volumes"].as_array().unwrap().iter().map(|v| v["uri"].as_str().unwrap().to_string()).collect();
        assert_eq!(drill_uris.len(), 2, "{d}");
        points.push((d["point_seq"].as_u64().unwrap(), consistent_point(&drill_uris)));
        a.evsctl_ok(&["dr", "drill", "stop", "g"]);
    }
    let written = w.stop();
    // Each drill is a later point of the writer than the one before.
    for pair in points.windows(2) {
        assert!(pair[0].0 < pair[1].0 && pair[0].1 <= pair[1].1, "drills went back in time: {points:?}");
    }
    assert!(points[2].1 > 0 && points[2].1 <= written, "{points:?} of {written}");
}

/// `dr disable` while the worker has listed the group as due but not yet taken its lock: the
/// delay point `dr-before-cycle-lock` holds every due cycle 2 s there. A point commits at t=0,
/// the next cycle is due at 1 s and waits until 3 s, the disable comes at 1.5 s: no cycle may
/// run after it. Before, the worker ran that one on the record it had listed.
#[test]
fn no_cycle_runs_after_dr_disable() {
    let (a, _b, _) = pair_of_azs_with(None, Some("dr-before-cycle-lock=sleep(2000)"), None);
    protect(&a);
    let seq = status(&a)["point_seq"].as_u64().unwrap();
    point_after(&a, seq);
    thread::sleep(Duration::from_millis(1500));
    a.evsctl_ok(&["dr", "disable", "g"]);
    // A cycle that had passed the check under the lock before the disable may still finish.
    thread::sleep(Duration::from_millis(300));
    let before = status(&a);
    thread::sleep(Duration::from_millis(3500));
    let after = status(&a);
    assert_eq!(before["cycles"], after["cycles"], "a cycle ran after `dr disable`: {before} then {after}");
    assert_eq!(before["point_seq"], after["point_seq"]);
    // Enabled again, it cycles again.
    a.evsctl_ok(&["dr", "enable", "g"]);
    point_after(&a, after["point_seq"].as_u64().unwrap());
}

/// Two protects of one server into two groups at once. Each holds only its own group's lock,
/// and the source holds every protect 1.5 s (`FAILPOINTS` `dr-protect-before-record`) between
/// checking that the server is in no other group and recording it in this one: before, both
/// passed the check and the server was replicated by both groups.
/// A group the source cannot save (its catalog write fails: fail point `dr-group-save`) is
/// taken back on the target: nothing is left on either side, and the name can be used again.
#[test]
fn a_group_create_that_fails_at_home_leaves_nothing_on_the_target() {
    let a = az_with("az1", Some("dr-group-save=1*return->off"));
    let b = az("az2");
    let target = format!("http://{}", b.api_addr);
    let create = ["dr", "group", "create", "g", "--target", &target, "--target-token", b.token(), "--target-az", "az2"];
    let out = a.evsctl(&create);
    assert!(!out.status.success(), "the create should have failed\n{}", format_output(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("dr-group-save"), "{}", format_output(&out));
    let groups = |d: &Daemon| d.evsctl_json(&["dr", "group", "list"])["groups"].as_array().map(Vec::len);
    assert_eq!(groups(&a), Some(0), "the source kept the group");
    assert_eq!(groups(&b), Some(0), "the target kept the registration");
    // The fault was once: the same create succeeds, and each side has the group once.
    let g = a.create_dr_group("g", &b, &target, &[]);
    assert_eq!((g["role"].as_str(), g["peer_az"].as_str()), (Some("source"), Some("az2")), "{g}");
    assert_eq!((groups(&a), groups(&b)), (Some(1), Some(1)));
}

#[test]
fn one_server_protected_into_two_groups_at_once_lands_in_one() {
    let (a, b, _) = pair_of_azs_with(None, Some("dr-protect-before-record=sleep(1500)"), None);
    let target = format!("http://{}", b.api_addr);
    a.create_dr_group("g2", &b, &target, &[]);
    let outs: Vec<_> = thread::scope(|s| {
        let hs: Vec<_> = ["g", "g2"]
            .iter()
            .map(|g| {
                let a = &a;
                s.spawn(move || a.evsctl(&["--output", "json", "dr", "protect", g, "--server", "vm", "--wait"]))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok: Vec<usize> = (0..2).filter(|&i| outs[i].status.success()).collect();
    assert_eq!(
        ok.len(),
        1,
        "not exactly one protect succeeded\n{}\n{}",
        format_output(&outs[0]),
        format_output(&outs[1])
    );
    let (won, lost) = if ok[0] == 0 { ("g", "g2") } else { ("g2", "g") };
    let err = String::from_utf8_lossy(&outs[1 - ok[0]].stderr).to_string();
    assert!(err.contains("\"vm\"") && err.contains(&format!("DR group \"{won}\"")), "{err}");
    let winner = a.evsctl_json(&["dr", "status", won]);
    assert_eq!(winner["pairs"].as_array().unwrap().len(), 2, "{winner}");
    let loser = a.evsctl_json(&["dr", "status", lost]);
    assert!(loser["pairs"].as_array().unwrap().is_empty(), "the server is in both groups: {loser}");
    // The server can go into the other group once the winner lets it go.
    a.evsctl_ok(&["dr", "unprotect", won, "--server", "vm"]);
    let v = a.evsctl_json(&["dr", "protect", lost, "--server", "vm", "--wait"]);
    assert_eq!(v["job"]["state"], "succeeded", "{v}");
    assert_eq!(a.evsctl_json(&["dr", "status", lost])["pairs"].as_array().unwrap().len(), 2);
}

#[test]
fn link_faults_mid_cycle_resume_without_a_full_resync() {
    let b = az("az2");
    let proxy = Proxy::start(b.api_addr);
    let a = az("az1");
    let uris: Vec<String> = ["va", "vb"].iter().map(|v| a.create_volume(v, "64M").0).collect();
    a.evsctl_ok(&["server", "create", "vm", "--volumes", "va,vb"]);
    let target = format!("http://{}", proxy.addr());
    a.create_dr_group("g", &b, &target, &["--bandwidth", "8M"]);
    protect(&a);
    let mut rng = Rng::new(9);
    let mut expected = Vec::new();
    // Rounds of writes; the link is cut in the middle of each cycle.
    for round in 0..4u64 {
        for u in &uris {
            let mut c = NbdClient::connect(u).unwrap();
            for i in 0..4 {
                c.write((round * 8 + i) * MIB, &rng.bytes(MIB as usize)).unwrap();
            }
            c.flush().unwrap();
        }
        thread::sleep(Duration::from_millis(400));
        proxy.cut();
        thread::sleep(Duration::from_millis(300));
        proxy.cut();
        expected.push(round);
    }
    // It converges: a point after the last write, with everything in it.
    let copies = [image(&a, "va", "va.raw"), image(&a, "vb", "vb.raw")];
    let s = settled(&a);
    let d = a.evsctl_json(&["dr", "drill", "start", "g"]);
    for (v, copy) in d["volumes"].as_array().unwrap().iter().zip(&copies) {
        let dst = b.root().join(copy.file_name().unwrap());
        std::fs::copy(copy, &dst).unwrap();
        assert_same(&b, v["drill_volume"].as_str().unwrap(), &dst);
    }
    a.evsctl_ok(&["dr", "drill", "stop", "g"]);
    // Cut cycles were redone from the last acknowledged point, not from zero: 32 MiB written
    // per volume, so a full resync per cut would replicate several times that.
    let replicated = s["bytes_replicated"].as_u64().unwrap();
    assert!(replicated < 3 * 2 * 32 * MIB, "{replicated} bytes replicated: looks like full resyncs");
    assert!(proxy.cuts.load(Ordering::Relaxed) >= 8);

    // kill -9 of the target mid-run: replication resumes when it is back.
    let mut b = b;
    b.kill9();
    let mut c = NbdClient::connect(&uris[0]).unwrap();
    c.write(60 * MIB, &vec![0x60; MIB as usize]).unwrap();
    c.flush().unwrap();
    drop(c);
    thread::sleep(Duration::from_millis(1500));
    assert!(status(&a)["last_error"].as_str().is_some_and(|e| !e.is_empty()), "no error while the target is down");
    b.restart();
    let seq = status(&a)["point_seq"].as_u64().unwrap();
    let s = point_after(&a, seq);
    assert_eq!(s["state"], "protected", "{s}");
}
