//! The crash matrix: the daemon is aborted at named points (crash points, `FAILPOINTS`; see
//! `evs_snapshot::crash_point!`) of writes, flushes, snapshot create, snapshot merge, backup
//! upload, restore, replication apply and switchover; after each restart the catalog opens and
//! what the point's operation promised holds:
//!
//! * data path: every write acknowledged before a completed FLUSH (or with FUA) reads back
//!   intact, nothing reads as something it never held;
//! * snapshot create: the snapshot is absent (before its commit) or present and whole (after),
//!   no orphan layer is left;
//! * merge: the volume and the surviving snapshot read what they held, the deleted snapshot
//!   stays deleted, the merge finishes after the restart;
//! * backup: no backup is half-visible (every listed one verifies), the resumed job completes
//!   and its backup restores byte for byte;
//! * restore: the resumed job completes and the volume reads as the backup, also when the
//!   crash came right after the restore's volume was made, or (`volume create --from-backup`)
//!   before or after the call made the volume for the job it queued;
//! * replication: the target comes back, replication resumes, a drill reads what the source
//!   held;
//! * switchover: the old source never serves writes next to the promoted one; running
//!   `dr switchover` again completes it.
//!
//! Each test runs every point of its row once per iteration: `EVS_CRASH_MATRIX_ITERATIONS`
//! (default 1: the CI sample; `scripts/crash-matrix.sh` runs hundreds). The binaries must be
//! built with `--features evs-target/failpoints` (scripts/test.sh does); the tests check it.

use std::process::Output;
use std::thread;
use std::time::{Duration, Instant};

use evs_tests::durability::{workload, Model};
use evs_tests::tools::format_output;
use evs_tests::util::{first_difference, Rng, BLOCK, MIB};
use evs_tests::{Daemon, DaemonOptions, NbdClient};
use serde_json::Value;

/// Blocks of the small volumes (4 MiB).
const BLOCKS: u64 = 1024;
/// How long a crash point may take to be reached.
const REACH: Duration = Duration::from_secs(60);

fn iterations() -> u32 {
    std::env::var("EVS_CRASH_MATRIX_ITERATIONS").ok().and_then(|s| s.parse().ok()).unwrap_or(1)
}

/// Restarts `d` with crash point `point` armed: it aborts the process on its `skip + 1`-th
/// pass.
fn arm(d: &mut Daemon, point: &str, skip: u64) {
    assert!(d.terminate().success(), "clean stop before arming {point}\n{}", d.log());
    let spec = if skip == 0 { format!("{point}=return") } else { format!("{point}={skip}*off->return") };
    d.set_env("FAILPOINTS", Some(&spec));
    d.restart();
    d.require_failpoints();
}

/// Waits for the abort at `point`. On a timeout the daemon is killed (so that clients blocked
/// on it return) and the test fails.
fn expect_crash(d: &mut Daemon, point: &str) {
    match d.wait_exit(REACH) {
        Some(status) => {
            let log = d.log();
            assert!(
                log.contains(&format!("failpoint {point} hit")),
                "the daemon exited ({status}), but not at crash point {point}\n{log}"
            );
        }
        None => {
            let log = d.log();
            d.kill9();
            panic!("crash point {point} was not reached in {REACH:?}\n{log}");
        }
    }
}

/// Restarts `d` with no crash point: the catalog must open.
fn recover(d: &mut Daemon) {
    d.set_env("FAILPOINTS", None);
    d.restart();
}

fn read_uri(uri: &str, len: u64) -> Vec<u8> {
    let mut c = NbdClient::connect(uri).unwrap_or_else(|e| panic!("connect {uri}: {e}"));
    let all = c.read_all(0, len, 1 << 20).unwrap_or_else(|e| panic!("read {uri}: {e}"));
    c.disconnect().expect("disconnect");
    all
}

fn read_volume(d: &Daemon, name: &str, len: u64) -> Vec<u8> {
    read_uri(&d.attach(name), len)
}

fn read_snapshot(d: &Daemon, snap: &str, len: u64) -> Vec<u8> {
    let v = d.evsctl_json(&["snapshot", "attach", snap]);
    let data = read_uri(v["uri"].as_str().unwrap_or_else(|| panic!("no uri in {v}")), len);
    d.evsctl_ok(&["snapshot", "detach", snap]);
    data
}

fn assert_image(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(at) = first_difference(got, want) {
        panic!("{what}: differs from what it must hold, first at byte {at} (block {})", at as u64 / BLOCK);
    }
}

/// Writes random data over `n` random 4 KiB blocks of a volume of `blocks` blocks, flushes.
fn scribble(uri: &str, rng: &mut Rng, blocks: u64, n: u64) {
    let mut c = NbdClient::connect(uri).unwrap_or_else(|e| panic!("connect {uri}: {e}"));
    for _ in 0..n {
        let run = rng.range(1, 9).min(blocks);
        let at = rng.below(blocks - run + 1);
        c.write(at * BLOCK, &rng.bytes((run * BLOCK) as usize)).expect("write");
    }
    c.flush().expect("flush");
    c.disconnect().expect("disconnect");
}

fn snapshot_names(d: &Daemon, volume: &str) -> Vec<String> {
    let v = d.evsctl_json(&["snapshot", "list", volume]);
    v["snapshots"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap().to_string()).collect()
}

/// Files in the store's layer directory (two per layer: data and map).
fn layer_files(d: &Daemon) -> usize {
    let dir = d.data_dir().join("layers");
    assert!(dir.is_dir(), "no layer directory at {}", dir.display());
    std::fs::read_dir(&dir).unwrap().count()
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        thread::sleep(Duration::from_millis(50));
    }
}

fn job_id(v: &Value) -> String {
    v["job"]["id"].as_u64().unwrap_or_else(|| panic!("no job id in {v}")).to_string()
}

fn job_wait(d: &Daemon, job: &str) -> Output {
    d.evsctl(&["--output", "json", "job", "wait", job])
}

fn assert_job_succeeded(d: &Daemon, job: &str, what: &str) {
    let out = job_wait(d, job);
    assert!(out.status.success(), "{what}: job {job} did not succeed after the restart\n{}", format_output(&out));
}

// ---------------------------------------------------------------------------------------
// Data path

#[test]
fn crash_points_on_the_data_path_keep_every_flushed_write() {
    let mut d = Daemon::start();
    let (tcp, unix) = d.create_volume("v", "4M");
    let mut rng = Rng::from_env_or_time("crash matrix: data path");
    let mut model = Model::new(BLOCKS);
    let mut crashes = 0;
    for it in 0..iterations() {
        for point in ["nbd-write-before-reply", "layer-flush-after-data-sync"] {
            // Writes pass the first point every time, flushes the second one.
            let skip = if point.starts_with("nbd") { rng.range(20, 400) } else { rng.range(2, 30) };
            arm(&mut d, point, skip);
            let uri = if it % 2 == 0 { tcp.clone() } else { unix.clone() };
            let c = NbdClient::connect(&uri).unwrap_or_else(|e| panic!("connect {uri}: {e}"));
            let (flush_every, wrng) = (rng.range(3, 17), Rng::new(rng.next_u64()));
            let writer = thread::spawn(move || workload(c, model, wrng, flush_every));
            expect_crash(&mut d, point);
            model = writer.join().expect("writer thread panicked");
            crashes += 1;
            recover(&mut d);
            let bad = model.check_all(&read_volume(&d, "v", BLOCKS * BLOCK));
            assert!(
                bad.is_empty(),
                "iteration {it}, crash point {point} (after {skip} passes): {} blocks are wrong:\n{}",
                bad.len(),
                bad.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
            );
        }
    }
    eprintln!(
        "data path: {crashes} crashes, {} operations acknowledged, {} flushes, {} blocks durable",
        model.acked_ops,
        model.flushes,
        model.durable_blocks()
    );
    assert!(model.flushes > 0 && model.durable_blocks() > 0, "no flush completed: the test proved nothing");
}

// ---------------------------------------------------------------------------------------
// Snapshots

#[test]
fn crash_points_in_snapshot_create_leave_it_absent_or_whole() {
    let mut d = Daemon::start();
    let (uri, _) = d.create_volume("s", "4M");
    let mut rng = Rng::from_env_or_time("crash matrix: snapshot create");
    let mut kept: Vec<(String, Vec<u8>)> = Vec::new();
    for it in 0..iterations() {
        for point in ["snapshot-create-before-commit", "snapshot-create-after-commit"] {
            scribble(&uri, &mut rng, BLOCKS, 40);
            let image = read_volume(&d, "s", BLOCKS * BLOCK);
            arm(&mut d, point, 0);
            let name = format!("p{it}-{}", kept.len());
            let out = d.evsctl(&["snapshot", "create", "s", &name]);
            expect_crash(&mut d, point);
            assert!(!out.status.success(), "snapshot create reported success through a crash");
            recover(&mut d);
            // Every write was flushed before the snapshot: the volume holds all of them.
            assert_image(&read_volume(&d, "s", BLOCKS * BLOCK), &image, &format!("volume after {point}"));
            let names = snapshot_names(&d, "s");
            let listed = names.contains(&name);
            assert_eq!(
                listed,
                point.ends_with("after-commit"),
                "{point}: snapshot {name} listed: {listed} ({names:?})"
            );
            if listed {
                kept.push((name, image));
            }
            for (n, img) in &kept {
                assert_image(&read_snapshot(&d, &format!("s@{n}"), BLOCKS * BLOCK), img, &format!("snapshot {n}"));
            }
            assert_eq!(names.len(), kept.len(), "{names:?}");
            // No orphan layer: one per snapshot, plus the head.
            assert_eq!(layer_files(&d), 2 * (kept.len() + 1), "layer files after {point}");
        }
    }
    assert!(!kept.is_empty());
}

#[test]
fn crash_points_in_a_merge_lose_nothing_and_the_merge_finishes() {
    let mut d = Daemon::start();
    let mut rng = Rng::from_env_or_time("crash matrix: merge");
    let mut n = 0;
    for _ in 0..iterations() {
        for point in ["merge-after-copy", "merge-after-commit"] {
            // Snapshots a, b, c: deleting `a` merges its layer into `b`'s, deleting `b` into
            // `c`'s. (A deleted snapshot's layer right under the live head waits for the next
            // snapshot: merges go into frozen layers only.)
            for victim in ["a", "b"] {
                n += 1;
                let vol = format!("m{n}");
                let (uri, _) = d.create_volume(&vol, "4M");
                let mut images = Vec::new();
                for snap in ["a", "b", "c"] {
                    scribble(&uri, &mut rng, BLOCKS, 60);
                    images.push((snap, read_volume(&d, &vol, BLOCKS * BLOCK)));
                    d.evsctl_ok(&["snapshot", "create", &vol, snap]);
                }
                scribble(&uri, &mut rng, BLOCKS, 60);
                let head = read_volume(&d, &vol, BLOCKS * BLOCK);
                images.retain(|(s, _)| *s != victim);
                let files_before = layer_files(&d);
                arm(&mut d, point, 0);
                let out = d.evsctl(&["snapshot", "delete", &format!("{vol}@{victim}")]);
                // The merge the delete starts may reach the crash point before the reply is out:
                // then the call sees its connection drop, and the snapshot list after the
                // restart (below) shows that the delete committed all the same.
                assert!(
                    out.status.success() || String::from_utf8_lossy(&out.stderr).contains("connection"),
                    "snapshot delete {vol}@{victim}: {}",
                    format_output(&out)
                );
                expect_crash(&mut d, point);
                recover(&mut d);
                let what = format!("{vol}, {point}, deleting {victim}");
                let survivors: Vec<&str> = images.iter().map(|(s, _)| *s).collect();
                assert_eq!(snapshot_names(&d, &vol), survivors, "{what}");
                let check = |d: &Daemon| {
                    assert_image(&read_volume(d, &vol, BLOCKS * BLOCK), &head, &format!("{what}: volume"));
                    for (s, img) in &images {
                        let got = read_snapshot(d, &format!("{vol}@{s}"), BLOCKS * BLOCK);
                        assert_image(&got, img, &format!("{what}: snapshot {s}"));
                    }
                };
                check(&d);
                // The merge resumes after the restart and removes the deleted layer.
                wait_for(&format!("{what}: merge"), Duration::from_secs(30), || layer_files(&d) == files_before - 2);
                check(&d);
                d.evsctl_ok(&["volume", "detach", &vol]);
                d.evsctl_ok(&["volume", "delete", &vol]);
                wait_for(&format!("{vol} deleted"), Duration::from_secs(30), || {
                    !d.evsctl(&["volume", "show", &vol]).status.success()
                });
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Backups and restores (local directory store)

#[test]
fn crash_points_in_backup_and_restore_never_show_half_a_backup() {
    let mut d = Daemon::start_with(DaemonOptions {
        // Long runs keep every backup they make (3 per round).
        config: Some("[backups]\nconcurrency = 2\nmax_per_volume = 10000\n".into()),
        ..Default::default()
    });
    let size = 16 * MIB;
    let blocks = size / BLOCK;
    let (uri, _) = d.create_volume("b", "16M");
    let mut rng = Rng::from_env_or_time("crash matrix: backup");
    let mut backups: Vec<(String, Vec<u8>)> = Vec::new();
    let mut restores = 0;
    for _ in 0..iterations() {
        for point in ["backup-before-manifest", "backup-after-manifest"] {
            scribble(&uri, &mut rng, blocks, 200);
            let image = read_volume(&d, "b", size);
            arm(&mut d, point, 0);
            let v = d.evsctl_json(&["backup", "create", "b"]);
            let (job, id) = (job_id(&v), v["backup_id"].as_str().unwrap().to_string());
            expect_crash(&mut d, point);
            recover(&mut d);
            // Whatever is listed now is whole (the resumed job may be running).
            for b in d.evsctl_json(&["backup", "list"])["backups"].as_array().unwrap() {
                let bid = b["id"].as_str().unwrap();
                let v = d.evsctl_json(&["backup", "verify", bid]);
                assert_eq!(v["job"]["state"], "succeeded", "{point}: listed backup {bid} does not verify: {v}");
            }
            assert_job_succeeded(&d, &job, point);
            let shown = d.evsctl_json(&["backup", "show", &id]);
            assert_eq!(shown["id"], id.as_str(), "{shown}");
            backups.push((id, image));
        }
        // A restore cut off after its first chunks resumes and completes.
        let (id, image) = backups[rng.below(backups.len() as u64) as usize].clone();
        restores += 1;
        let to = format!("r{restores}");
        arm(&mut d, "restore-after-chunk", rng.range(0, 4));
        let v = d.evsctl_json(&["backup", "restore", &id, "--to", &to]);
        let job = job_id(&v);
        expect_crash(&mut d, "restore-after-chunk");
        recover(&mut d);
        assert_job_succeeded(&d, &job, "restore");
        assert_image(&read_volume(&d, &to, size), &image, &format!("volume {to} restored from {id}"));
        // Crashes around a restore's volume: right after a restore job made it, and in
        // `volume create --from-backup` before and after it made the volume for its job. The call may
        // see its connection drop; after the restart the job makes (or finds) the volume,
        // marked as its own, and fills it: never an empty volume that looks restored.
        let points = [
            ("restore-after-create", false),
            ("create-from-backup-after-submit", true),
            ("create-from-backup-after-create", true),
        ];
        for (point, from_backup) in points {
            restores += 1;
            let to = format!("r{restores}");
            arm(&mut d, point, 0);
            let out = if from_backup {
                d.evsctl(&["volume", "create", &to, "--from-backup", &id, "--size", "32M"])
            } else {
                d.evsctl(&["backup", "restore", &id, "--to", &to])
            };
            assert!(
                out.status.success() || String::from_utf8_lossy(&out.stderr).contains("connection"),
                "{point}: {}",
                format_output(&out)
            );
            expect_crash(&mut d, point);
            recover(&mut d);
            let target = format!("backup {id} to {to}");
            let jobs = d.evsctl_json(&["job", "list"]);
            let job = jobs["jobs"]
                .as_array()
                .unwrap()
                .iter()
                .find(|j| j["target"] == target.as_str())
                .unwrap_or_else(|| panic!("{point}: no job for {target} in {jobs}"));
            assert_job_succeeded(&d, &job["id"].to_string(), point);
            let want = if from_backup { 32 * MIB } else { size };
            let shown = d.evsctl_json(&["volume", "show", &to]);
            assert_eq!(shown["size_bytes"].as_u64(), Some(want), "{point}: {shown}");
            let mut image = image.clone();
            image.resize(want as usize, 0);
            assert_image(&read_volume(&d, &to, want), &image, &format!("{point}: volume {to} restored from {id}"));
        }
    }
    // Every backup made through a crash restores byte for byte; gc keeps what they need.
    let gc = d.evsctl_json(&["backup", "gc", "--wait"]);
    assert_eq!(gc["job"]["state"], "succeeded", "{gc}");
    for (i, (id, image)) in backups.iter().enumerate() {
        let to = format!("check{i}");
        let v = d.evsctl_json(&["backup", "restore", id, "--to", &to, "--wait"]);
        assert_eq!(v["job"]["state"], "succeeded", "{v}");
        assert_image(&read_volume(&d, &to, size), image, &format!("backup {id}"));
    }
}

// ---------------------------------------------------------------------------------------
// Disaster recovery (two real daemons)

fn az(name: &str) -> Daemon {
    Daemon::start_with(DaemonOptions { az: Some(name.into()), ..Default::default() })
}

/// Source A with volume `va` (4 MiB) in server `vm`, protected to target B by group `g`
/// (1 s cycles).
fn protected_pair() -> (Daemon, Daemon, String) {
    let a = az("az1");
    let b = az("az2");
    let (uri, _) = a.create_volume("va", "4M");
    a.evsctl_ok(&["server", "create", "vm", "--volumes", "va"]);
    let target = format!("http://{}", b.api_addr);
    let g = a.create_dr_group("g", &b, &target, &[]);
    assert_eq!(g["role"], "source", "{g}");
    let v = a.evsctl_json(&["dr", "protect", "g", "--server", "vm", "--wait"]);
    assert_eq!(v["job"]["state"], "succeeded", "{v}");
    (a, b, uri)
}

fn status(d: &Daemon) -> Value {
    d.evsctl_json(&["dr", "status", "g"])
}

/// Waits for two new points on the source: the second one was taken after the caller's
/// last write.
fn settled(a: &Daemon) -> u64 {
    let seq = status(a)["point_seq"].as_u64().unwrap();
    let mut now = seq;
    wait_for("two new replication points", Duration::from_secs(90), || {
        now = status(a)["point_seq"].as_u64().unwrap_or(0);
        now >= seq + 2
    });
    now
}

/// What the target's last point holds, read through a drill.
fn drill_image(a: &Daemon) -> Vec<u8> {
    let v = a.evsctl_json(&["dr", "drill", "start", "g"]);
    let uri = v["volumes"][0]["uri"].as_str().unwrap_or_else(|| panic!("no drill volume in {v}")).to_string();
    let data = read_uri(&uri, BLOCKS * BLOCK);
    a.evsctl_ok(&["dr", "drill", "stop", "g"]);
    data
}

#[test]
fn crash_points_in_replication_apply_and_switchover_keep_one_consistent_source() {
    let (mut a, mut b, uri) = protected_pair();
    let mut rng = Rng::from_env_or_time("crash matrix: replication");
    for it in 0..iterations() {
        for point in ["replica-apply-before-point", "replica-point-before-record"] {
            scribble(&uri, &mut rng, BLOCKS, 30);
            let image = read_volume(&a, "va", BLOCKS * BLOCK);
            arm(&mut b, point, 0);
            expect_crash(&mut b, point);
            recover(&mut b);
            // Replication resumes after the target's restart, and the point holds the data.
            settled(&a);
            assert_image(&drill_image(&a), &image, &format!("iteration {it}: the target's point after {point}"));
        }
    }

    // Switchover cut off after the target was promoted.
    scribble(&uri, &mut rng, BLOCKS, 30);
    let image = read_volume(&a, "va", BLOCKS * BLOCK);
    settled(&a);
    a.evsctl_ok(&["volume", "detach", "va"]);
    arm(&mut a, "switchover-after-promote", 0);
    let v = a.evsctl_json(&["dr", "switchover", "g"]);
    let job = job_id(&v);
    expect_crash(&mut a, "switchover-after-promote");
    recover(&mut a);
    let out = job_wait(&a, &job);
    assert!(!out.status.success(), "a switchover cut off by a crash reports success");
    assert_eq!(status(&b)["role"], "source", "the target was promoted before the crash");
    // Never two sources taking writes: the old source refuses attachments.
    let out = a.evsctl(&["volume", "attach", "va"]);
    assert!(!out.status.success(), "the old source attached a volume next to the promoted one");
    // Running it again finishes it: A becomes the target, B serves what A held.
    let v = a.evsctl_json(&["dr", "switchover", "g", "--wait"]);
    assert_eq!(v["job"]["state"], "succeeded", "{v}");
    assert_eq!(status(&a)["role"], "target");
    assert_image(&read_volume(&b, "va", BLOCKS * BLOCK), &image, "the promoted side after the switchover");
    // And replication runs the other way.
    let buri = b.attach("va");
    scribble(&buri, &mut rng, BLOCKS, 10);
    let image_b = read_volume(&b, "va", BLOCKS * BLOCK);
    settled(&b);
    assert_image(&drill_image(&b), &image_b, "replication from the new source");
}
