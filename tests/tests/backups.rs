//! Backups to object storage through the real `evsctl` and daemons: against the local-directory
//! default and against a real S3 server (the Garage that scripts/test.sh starts). Round trips
//! compared byte for byte with qemu-img, incremental and dedup costs asserted on the backup's
//! counters, a server backup's consistency under concurrent writers, a restore from another AZ,
//! verify and gc, policies with retention, limits, encryption, a restart between backups, and
//! store faults.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use evs_tests::proxy::Proxy;
use evs_tests::s3::S3Env;
use evs_tests::tools::{format_output, output_with_timeout, require_tool, run_tool};
use evs_tests::util::{Rng, MIB};
use evs_tests::{Daemon, DaemonOptions, NbdClient};
use serde_json::Value;

fn s3_daemon(prefix: &str, az: &str, extra_config: &str) -> Daemon {
    let s3 = S3Env::get();
    Daemon::start_with(DaemonOptions {
        args: vec!["--backup-store".into(), s3.store_url(prefix)],
        az: Some(az.into()),
        env: vec![
            ("AWS_ACCESS_KEY_ID".into(), s3.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY".into(), s3.secret_key.clone()),
        ],
        config: Some(format!("[backups]\nconcurrency = 4\n{extra_config}")),
        ..Default::default()
    })
}

fn file_daemon(extra_config: &str) -> Daemon {
    Daemon::start_with(DaemonOptions {
        config: Some(format!("[backups]\nconcurrency = 4\n{extra_config}")),
        ..Default::default()
    })
}

/// `backup create VOLUME --wait`, then `backup show`.
fn backup(d: &Daemon, volume: &str, extra: &[&str]) -> Value {
    let mut args = vec!["backup", "create", volume, "--wait"];
    args.extend_from_slice(extra);
    let v = d.evsctl_json(&args);
    let id = v["backup_id"].as_str().unwrap_or_else(|| panic!("no backup_id in {v}")).to_string();
    assert_eq!(v["job"]["state"], "succeeded", "{v}");
    d.evsctl_json(&["backup", "show", &id])
}

fn id(b: &Value) -> String {
    b["id"].as_str().unwrap_or_else(|| panic!("no id in {b}")).to_string()
}

fn stat(b: &Value, k: &str) -> u64 {
    b["stats"][k].as_u64().unwrap_or_else(|| panic!("no stats.{k} in {b}"))
}

fn restore(d: &Daemon, backup: &str, to: &str) {
    let v = d.evsctl_json(&["backup", "restore", backup, "--to", to, "--wait"]);
    assert_eq!(v["job"]["state"], "succeeded", "{v}");
}

/// The volume's whole content as a raw file in the daemon's directory.
fn image(d: &Daemon, volume: &str, file: &str) -> PathBuf {
    let uri = d.attach(volume);
    let path = d.root().join(file);
    run_tool(Command::new(require_tool("qemu-img")).args(["convert", "-f", "raw", "-O", "raw", &uri]).arg(&path));
    path
}

/// qemu-img compare of a volume against a raw file: identical, byte for byte.
fn assert_same(d: &Daemon, volume: &str, file: &Path) {
    let uri = d.attach(volume);
    let out = output_with_timeout(
        Command::new(require_tool("qemu-img")).args(["compare", "-f", "raw", "-F", "raw", &uri]).arg(file),
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "volume {volume} differs from {}\n{}", file.display(), format_output(&out));
}

/// Writes `pieces` random pieces (1 MiB each, at MiB-aligned offsets below `span`), a few
/// unaligned small writes and a discard; returns the MiB offsets written.
fn scatter(uri: &str, rng: &mut Rng, pieces: usize, span: u64) -> Vec<u64> {
    let mut c = NbdClient::connect(uri).unwrap();
    let mut at = Vec::new();
    for _ in 0..pieces {
        let off = rng.below(span / MIB) * MIB;
        c.write(off, &rng.bytes(MIB as usize)).unwrap();
        at.push(off);
    }
    for _ in 0..8 {
        let off = rng.below(span - 10_000);
        let len = 3000 + rng.below(5000) as usize;
        c.write(off, &rng.bytes(len)).unwrap();
    }
    c.trim(at[0], 512 * 1024).unwrap();
    c.flush().unwrap();
    at
}

fn round_trip(d: &Daemon) {
    let mut rng = Rng::from_env_or_time("backup round trip");
    let (uri, _) = d.create_volume("src", "2G");
    scatter(&uri, &mut rng, 40, 2 << 30);
    let copy1 = image(d, "src", "copy1.raw");
    let b1 = backup(d, "src", &["--name", "first"]);
    assert_eq!(b1["mode"], "full", "{b1}");
    assert_eq!(b1["name"], "first");
    // A first backup reads the allocated chunks only: at most 40 written pieces plus 8 small
    // writes, each touching one or two chunks, out of 2048.
    assert!(stat(&b1, "chunks_read") <= 40 + 16, "{b1}");
    assert!(stat(&b1, "chunks_read") >= 30, "{b1}");
    assert_eq!(stat(&b1, "chunks"), 2048);

    // Generation 2: overwrite some, add some, discard some.
    scatter(&uri, &mut rng, 8, 2 << 30);
    let copy2 = image(d, "src", "copy2.raw");
    let b2 = backup(d, "src", &[]);
    assert_eq!(b2["mode"], "incremental", "{b2}");
    assert_eq!(b2["parent"], id(&b1).as_str());
    assert!(stat(&b2, "chunks_read") <= 8 + 16 + 1, "an incremental reads only what changed: {b2}");

    restore(d, &id(&b1), "r1");
    restore(d, &id(&b2), "r2");
    assert_same(d, "r1", &copy1);
    assert_same(d, "r2", &copy2);
    // A restored volume is thin: zero chunks are not written.
    let r1 = d.show_volume("r1");
    assert!(r1["allocated_bytes"].as_u64().unwrap() <= 50 * MIB, "{r1}");

    // In place, onto the detached source: it reads as the first backup again.
    d.evsctl_ok(&["volume", "detach", "src"]);
    let v = d.evsctl_json(&["backup", "restore", &id(&b1), "--in-place", "--wait"]);
    assert_eq!(v["job"]["state"], "succeeded", "{v}");
    assert_same(d, "src", &copy1);
    // Refused while attached, with the reason.
    d.attach("src");
    let out = d.evsctl(&["backup", "restore", &id(&b2), "--in-place"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is attached"), "{}", format_output(&out));

    let list = d.evsctl_json(&["backup", "list", "--volume", "src"]);
    assert_eq!(list["backups"].as_array().unwrap().len(), 2, "{list}");
}

#[test]
fn round_trip_full_incremental_and_in_place_local_directory() {
    round_trip(&file_daemon(""));
}

#[test]
fn round_trip_full_incremental_and_in_place_s3() {
    round_trip(&s3_daemon(&S3Env::unique_prefix("roundtrip"), "az1", ""));
}

#[test]
fn an_incremental_after_one_percent_changed_reads_and_uploads_about_one_percent() {
    let mut d = file_daemon("");
    let (uri, _) = d.create_volume("big", "256M");
    {
        let mut c = NbdClient::connect(&uri).unwrap();
        let mut rng = Rng::new(7);
        for i in 0..256 {
            c.write(i * MIB, &rng.bytes(MIB as usize)).unwrap();
        }
        c.flush().unwrap();
    }
    let full = backup(&d, "big", &[]);
    assert_eq!((stat(&full, "chunks_read"), stat(&full, "chunks_uploaded")), (256, 256), "{full}");
    // Random data: compression gains nothing, so what is uploaded is about what was read.
    assert!(stat(&full, "bytes_uploaded") >= 255 * MIB, "{full}");

    // 1% of the volume: 2.56 MiB, as 4 KiB writes spread over three chunks.
    {
        let mut c = NbdClient::connect(&uri).unwrap();
        let mut rng = Rng::new(8);
        for chunk in [3u64, 100, 200] {
            for b in 0..218 {
                c.write(chunk * MIB + b * 4096, &rng.bytes(4096)).unwrap();
            }
        }
        c.flush().unwrap();
    }
    // A restart between the two backups: changed-block tracking is in the catalog, not memory.
    assert!(d.terminate().success());
    d.restart();
    let inc = backup(&d, "big", &[]);
    assert_eq!(inc["mode"], "incremental", "{inc}");
    assert_eq!(stat(&inc, "chunks_read"), 3, "{inc}");
    assert_eq!(stat(&inc, "chunks_uploaded"), 3, "{inc}");
    assert_eq!(stat(&inc, "bytes_read"), 3 * MIB, "{inc}");
    assert!(stat(&inc, "bytes_uploaded") <= 3 * MIB + 4096, "{inc}");
    // --full reads every allocated chunk again, but uploads nothing new (deduplicated).
    let again = backup(&d, "big", &["--full"]);
    assert_eq!(again["mode"], "full");
    assert_eq!(stat(&again, "chunks_read"), 256);
    assert_eq!(stat(&again, "chunks_uploaded"), 0, "{again}");
    assert_eq!(stat(&again, "chunks_deduplicated"), 256);
}

/// Chunk objects in the local-directory store.
fn chunk_files(d: &Daemon) -> usize {
    fn count(p: &Path) -> usize {
        std::fs::read_dir(p)
            .map(|rd| rd.flatten().map(|e| if e.path().is_dir() { count(&e.path()) } else { 1 }).sum::<usize>())
            .unwrap_or(0)
    }
    count(&d.data_dir().join("obs").join("chunks"))
}

#[test]
fn clones_share_chunks_and_the_store_grows_by_the_changed_part_only() {
    let d = file_daemon("");
    let (uri, _) = d.create_volume("gold", "64M");
    {
        let mut c = NbdClient::connect(&uri).unwrap();
        let mut rng = Rng::new(11);
        for i in 0..32 {
            c.write(i * 2 * MIB, &rng.bytes(MIB as usize)).unwrap();
        }
        c.flush().unwrap();
    }
    d.evsctl_ok(&["snapshot", "create", "gold", "base"]);
    d.evsctl_ok(&["volume", "create", "c1", "--from-snapshot", "gold@base"]);
    d.evsctl_ok(&["volume", "create", "c2", "--from-snapshot", "gold@base"]);
    let g = backup(&d, "gold", &[]);
    assert_eq!(stat(&g, "chunks_uploaded"), 32);
    let files = chunk_files(&d);
    assert_eq!(files, 32, "one object per distinct chunk");
    let b1 = backup(&d, "c1", &[]);
    assert_eq!((stat(&b1, "chunks_uploaded"), stat(&b1, "chunks_deduplicated")), (0, 32), "{b1}");
    assert_eq!(chunk_files(&d), files, "a clone's backup adds nothing to the store");
    let c2 = d.attach("c2");
    let mut c = NbdClient::connect(&c2).unwrap();
    c.write(5 * MIB, &vec![0x77; MIB as usize]).unwrap();
    c.flush().unwrap();
    let b2 = backup(&d, "c2", &[]);
    assert_eq!((stat(&b2, "chunks_uploaded"), stat(&b2, "chunks_deduplicated")), (1, 32), "{b2}");
    assert_eq!(chunk_files(&d), files + 1, "the store grows by the changed chunk only");
}

#[test]
fn a_server_backup_is_one_instant_under_concurrent_writers() {
    const VOLS: [&str; 2] = ["sa", "sb"];
    const BLOCKS: u64 = 2048;
    let d = s3_daemon(&S3Env::unique_prefix("server"), "az1", "");
    let uris: Vec<String> = VOLS.iter().map(|v| d.create_volume(v, "8M").0).collect();
    d.evsctl_ok(&["server", "create", "vm", "--volumes", "sa,sb"]);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (uris, stop) = (uris.clone(), stop.clone());
        thread::spawn(move || {
            let mut conns: Vec<NbdClient> = uris.iter().map(|u| NbdClient::connect(u).unwrap()).collect();
            let mut seq = 1u64;
            while !stop.load(Ordering::Acquire) && seq / 2 < BLOCKS {
                let mut block = vec![0u8; 4096];
                for chunk in block.chunks_mut(8) {
                    chunk.copy_from_slice(&seq.to_le_bytes());
                }
                conns[(seq % 2) as usize].write((seq / 2) * 4096, &block).unwrap();
                seq += 1;
            }
            seq - 1
        })
    };
    thread::sleep(Duration::from_millis(300));
    let v = d.evsctl_json(&["backup", "create-server", "vm", "--wait"]);
    assert_eq!(v["job"]["state"], "succeeded", "{v}");
    let sbk = v["backup_id"].as_str().unwrap().to_string();
    stop.store(true, Ordering::Release);
    let written = writer.join().unwrap();
    assert!(written > 100, "the writer made no progress ({written} records)");

    let sb = d.evsctl_json(&["backup", "show", &sbk]);
    assert_eq!(sb["kind"], "server");
    assert_eq!(sb["volumes"].as_array().unwrap().len(), 2, "{sb}");
    restore(&d, &sbk, "copy");
    let srv = d.evsctl_json(&["server", "show", "copy"]);
    assert_eq!(srv["volumes"], serde_json::json!(["copy-sa", "copy-sb"]), "{srv}");
    let mut present = Vec::new();
    for (vi, v) in VOLS.iter().enumerate() {
        let uri = d.attach(&format!("copy-{v}"));
        let mut c = NbdClient::connect(&uri).unwrap();
        let data = c.read_all(0, BLOCKS * 4096, 1 << 20).unwrap();
        for b in 0..BLOCKS {
            let seq = b * 2 + vi as u64;
            if seq == 0 {
                continue;
            }
            let got = u64::from_le_bytes(data[(b * 4096) as usize..(b * 4096 + 8) as usize].try_into().unwrap());
            assert!(got == 0 || got == seq, "{v} block {b} holds record {got}");
            present.push((seq, got == seq));
        }
    }
    present.sort();
    let newest = present.iter().filter(|(_, p)| *p).map(|(s, _)| *s).max().unwrap_or(0);
    let missing: Vec<u64> = present.iter().filter(|(s, p)| *s <= newest && !p).map(|(s, _)| *s).collect();
    assert!(newest > 0, "the server backup caught no write: the test proved nothing");
    assert!(missing.is_empty(), "the server backup holds record {newest} but misses earlier records {missing:?}");
}

#[test]
fn another_az_lists_and_restores_the_backups_of_the_same_bucket() {
    let prefix = S3Env::unique_prefix("crossaz");
    let a = s3_daemon(&prefix, "az1", "");
    let mut rng = Rng::new(21);
    let (uri, _) = a.create_volume("db", "256M");
    scatter(&uri, &mut rng, 12, 256 << 20);
    let copy = image(&a, "db", "db.raw");
    let b = backup(&a, "db", &[]);
    assert_eq!(b["az"], "az1");

    let other = s3_daemon(&prefix, "az2", "");
    let list = other.evsctl_json(&["backup", "list"]);
    let ids: Vec<&str> = list["backups"].as_array().unwrap().iter().map(|b| b["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec![id(&b).as_str()], "{list}");
    restore(&other, &id(&b), "db");
    let copy_b = other.root().join("db.raw");
    std::fs::copy(&copy, &copy_b).unwrap();
    assert_same(&other, "db", &copy_b);
}

#[test]
fn verify_names_missing_and_corrupt_chunks_and_gc_keeps_what_is_referenced() {
    let d = file_daemon("gc_grace_seconds = 0\n");
    let (uri, _) = d.create_volume("v", "32M");
    {
        let mut c = NbdClient::connect(&uri).unwrap();
        let mut rng = Rng::new(31);
        for i in 0..8 {
            c.write(i * MIB, &rng.bytes(MIB as usize)).unwrap();
        }
        c.flush().unwrap();
    }
    let b1 = backup(&d, "v", &[]);
    let mut c = NbdClient::connect(&uri).unwrap();
    // Two new distinct chunks (equal ones would be stored once).
    c.write(0, &Rng::new(32).bytes(2 * MIB as usize)).unwrap();
    c.flush().unwrap();
    drop(c);
    let b2 = backup(&d, "v", &[]);
    assert_eq!(chunk_files(&d), 10);
    let v = d.evsctl_json(&["backup", "verify", &id(&b2)]);
    assert_eq!(v["job"]["state"], "succeeded", "{v}");

    // Delete the first backup: gc removes the two chunks only it referenced, keeps the rest.
    assert_eq!(d.evsctl_json(&["backup", "delete", &id(&b1), "--wait"])["job"]["state"], "succeeded");
    assert_eq!(d.evsctl_json(&["backup", "gc", "--wait"])["job"]["state"], "succeeded");
    assert_eq!(chunk_files(&d), 8, "gc removed exactly the unreferenced chunks");
    let copy = image(&d, "v", "v.raw");
    restore(&d, &id(&b2), "again");
    assert_same(&d, "again", &copy);

    // Damage the store behind its back: one chunk deleted, one corrupted.
    let chunks: Vec<PathBuf> = walk(&d.data_dir().join("obs").join("chunks"));
    assert_eq!(chunks.len(), 8);
    std::fs::remove_file(&chunks[0]).unwrap();
    let mut bytes = std::fs::read(&chunks[1]).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0xff;
    std::fs::write(&chunks[1], &bytes).unwrap();
    let out = d.evsctl(&["backup", "verify", &id(&b2)]);
    assert_eq!(out.status.code(), Some(1), "{}", format_output(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    let name = |p: &Path| p.file_name().unwrap().to_string_lossy().into_owned();
    assert!(err.contains("missing chunk") && err.contains(&name(&chunks[0])), "{err}");
    assert!(err.contains("corrupt chunk") && err.contains(&name(&chunks[1])), "{err}");
    // A restore of the damaged backup fails and says which chunk.
    let out = d.evsctl(&["backup", "restore", &id(&b2), "--to", "broken", "--wait"]);
    assert_eq!(out.status.code(), Some(1), "{}", format_output(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&name(&chunks[0])) || err.contains(&name(&chunks[1])), "{err}");
}

fn walk(p: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            if e.path().is_dir() {
                out.extend(walk(&e.path()));
            } else {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn policies_back_up_on_schedule_and_retention_prunes() {
    let d = file_daemon("scheduler_interval_seconds = 1\n");
    let (uri, _) = d.create_volume("p", "16M");
    let mut c = NbdClient::connect(&uri).unwrap();
    c.write(0, &vec![1; 4096]).unwrap();
    c.flush().unwrap();
    let p = d.evsctl_json(&["policy", "create", "every2s", "--schedule", "*/2 * * * * *", "--keep-last", "2"]);
    assert!(p["next_run_unix"].as_u64().unwrap() > 0, "{p}");
    d.evsctl_ok(&["policy", "bind", "every2s", "--volume", "p"]);
    // Bad input: a bad schedule, a second policy on the volume, an unknown volume.
    let out = d.evsctl(&["policy", "create", "bad", "--schedule", "every day"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid schedule"), "{}", format_output(&out));
    d.evsctl_ok(&["policy", "create", "other", "--schedule", "0 2 * * *"]);
    let out = d.evsctl(&["policy", "bind", "other", "--volume", "p"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("bound to policy \"every2s\""), "{}", format_output(&out));
    let out = d.evsctl(&["policy", "bind", "other", "--volume", "nope"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"), "{}", format_output(&out));

    // Let it run a few times, with writes in between.
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut seen = std::collections::BTreeSet::new();
    while Instant::now() < deadline && seen.len() < 4 {
        c.write(4096, &vec![seen.len() as u8 + 2; 4096]).unwrap();
        c.flush().unwrap();
        thread::sleep(Duration::from_millis(500));
        let list = d.evsctl_json(&["backup", "list", "--volume", "p"]);
        for b in list["backups"].as_array().unwrap() {
            seen.insert(b["id"].as_str().unwrap().to_string());
        }
    }
    assert!(seen.len() >= 4, "the policy took {} backups in 40 s", seen.len());
    d.evsctl_ok(&["policy", "unbind", "every2s", "--volume", "p"]);
    // Retention: at most keep-last (2) of the policy's backups remain once the deletes ran.
    let deadline = Instant::now() + Duration::from_secs(30);
    let kept = loop {
        let list = d.evsctl_json(&["backup", "list", "--volume", "p"]);
        let n = list["backups"].as_array().unwrap().len();
        let busy = d.evsctl_json(&["job", "list"])["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["state"] == "queued" || j["state"] == "running");
        if (n <= 2 && !busy) || Instant::now() > deadline {
            break n;
        }
        thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(kept, 2, "retention keep-last 2 left {kept} backups");
    let list = d.evsctl_json(&["backup", "list", "--volume", "p"]);
    assert!(list["backups"].as_array().unwrap().iter().all(|b| b["name"] == "policy:every2s"), "{list}");
    // `policy run` queues a backup now.
    d.evsctl_ok(&["policy", "bind", "other", "--volume", "p"]);
    let r = d.evsctl_json(&["policy", "run", "other"]);
    assert_eq!(r["jobs"].as_array().unwrap().len(), 1, "{r}");
}

fn volume_names(d: &Daemon) -> Vec<String> {
    let v = d.evsctl_json(&["volume", "list"]);
    v["volumes"]
        .as_array()
        .unwrap_or_else(|| panic!("no volumes in {v}"))
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect()
}

/// `volume create --from-backup` (SPEC): the volume exists at once, in state "restoring", and
/// its restore job fills it; larger than the backed-up volume on request, never smaller; bad
/// requests are refused with the reason and create nothing.
#[test]
fn volume_create_from_backup_restores_into_the_new_volume() {
    let d = s3_daemon(&S3Env::unique_prefix("fromb"), "az1", "");
    let mut rng = Rng::from_env_or_time("volume create --from-backup");
    let (uri, _) = d.create_volume("src", "64M");
    scatter(&uri, &mut rng, 12, 64 * MIB);
    let copy = image(&d, "src", "src.raw");
    let b = id(&backup(&d, "src", &[]));

    // Waited for: the volume as it is after the restore.
    let v = d.evsctl_json(&["volume", "create", "same", "--from-backup", &b, "--wait"]);
    assert_eq!((v["name"].as_str(), v["state"].as_str()), (Some("same"), Some("available")), "{v}");
    assert_eq!(v["restore_job"]["state"], "succeeded", "{v}");
    assert_eq!(v["size_bytes"].as_u64(), Some(64 * MIB), "{v}");
    assert_same(&d, "same", &copy);

    // Not waited for: "restoring" in the reply, then the job's result.
    let v = d.evsctl_json(&["volume", "create", "bigger", "--from-backup", &b, "--size", "96M", "--tier", "essd"]);
    assert_eq!(v["state"], "restoring", "{v}");
    assert_eq!((v["size_bytes"].as_u64(), v["tier"].as_str()), (Some(96 * MIB), Some("essd")), "{v}");
    let job = v["restore_job"]["id"].as_u64().unwrap_or_else(|| panic!("no restore job id in {v}"));
    let out = d.evsctl(&["job", "wait", &job.to_string()]);
    assert!(out.status.success(), "{}", format_output(&out));
    let shown = d.show_volume("bigger");
    assert_eq!(shown["state"], "available", "{shown}");
    // The backed-up 64 MiB, then zeros.
    let big = image(&d, "bigger", "bigger.raw");
    let got = std::fs::read(&big).unwrap();
    assert_eq!(got.len() as u64, 96 * MIB);
    assert!(got[..64 * MIB as usize] == std::fs::read(&copy).unwrap()[..], "the restored part differs");
    assert!(got[64 * MIB as usize..].iter().all(|&x| x == 0), "past the backup's end it does not read as zeros");

    // Refusals name the problem and create nothing.
    d.evsctl_ok(&["server", "create", "srv", "--volumes", "src"]);
    let sv = d.evsctl_json(&["backup", "create-server", "srv", "--wait"]);
    let sbk = sv["backup_id"].as_str().unwrap_or_else(|| panic!("no backup_id in {sv}")).to_string();
    let before = volume_names(&d);
    for (args, code, want) in [
        (vec!["--from-backup", sbk.as_str()], 1, "is a server backup"),
        (vec!["--from-backup", b.as_str(), "--size", "32M"], 1, "smaller than"),
        (vec!["--from-backup", "bk-20260101T000000000Z-000000"], 1, "not found"),
        (vec!["--from-backup", "../x"], 1, "invalid backup id"),
        (vec!["--from-backup", b.as_str(), "--tier", "fast"], 1, "unknown tier"),
        (vec!["--from-backup", b.as_str(), "--from-snapshot", "src@s"], 2, "cannot be used with"),
        (vec!["--size", "1M", "--wait"], 2, "--from-backup"),
    ] {
        let mut a = vec!["volume", "create", "nope"];
        a.extend_from_slice(&args);
        let out = d.evsctl(&a);
        assert_eq!(out.status.code(), Some(code), "{a:?}: {}", format_output(&out));
        assert!(String::from_utf8_lossy(&out.stderr).contains(want), "{a:?}: {}", format_output(&out));
    }
    let out = d.evsctl(&["volume", "create", "same", "--from-backup", &b]);
    assert_eq!(out.status.code(), Some(1), "{}", format_output(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"), "{}", format_output(&out));
    assert_eq!(volume_names(&d), before, "a refused create changed the volume list");
    assert_same(&d, "same", &copy);
}

#[test]
fn limits_refuse_clearly() {
    let d = file_daemon("max_per_volume = 2\n");
    d.create_volume("lim", "4M");
    backup(&d, "lim", &[]);
    backup(&d, "lim", &[]);
    let out = d.evsctl(&["backup", "create", "lim"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("backup limit") && err.contains("2 backups"), "{err}");
    assert_eq!(d.evsctl_json(&["backup", "list"])["backups"].as_array().unwrap().len(), 2, "nothing was added");
    for (args, want) in [
        (vec!["backup", "show", "bk-nope"], "invalid backup id"),
        (vec!["backup", "show", "bk-20260101T000000000Z-000000"], "not found"),
        (vec!["backup", "show", "../etc"], "invalid backup id"),
        (vec!["backup", "create", "nope"], "not found"),
        (vec!["backup", "restore", "bk-20260101T000000000Z-000000", "--to", "x"], "not found"),
    ] {
        let out = d.evsctl(&args);
        assert!(!out.status.success(), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(want), "{args:?}: {}", format_output(&out));
    }
}

#[test]
fn encrypted_backups_need_their_key() {
    let d = s3_daemon(&S3Env::unique_prefix("crypt"), "az1", "");
    let (uri, _) = d.create_volume("secret", "8M");
    let mut c = NbdClient::connect(&uri).unwrap();
    c.write(0, &vec![0x5e; 2 * MIB as usize]).unwrap();
    c.flush().unwrap();
    drop(c);
    let plain = backup(&d, "secret", &[]);
    assert!(!plain["encrypted"].as_bool().unwrap());
    let key = "11".repeat(32);
    let k = d.evsctl_json(&["backup", "set-key", "--key-hex", &key]);
    let fp = k["fingerprint"].as_str().unwrap().to_string();
    assert!(!fp.is_empty() && !fp.contains(&key), "{k}");
    let enc = backup(&d, "secret", &["--full"]);
    assert!(enc["encrypted"].as_bool().unwrap(), "{enc}");
    // Same data, but keyed chunk ids: nothing is shared with the plain backup, so the
    // encrypted one uploads every distinct chunk again.
    assert!(stat(&plain, "chunks_uploaded") > 0, "{plain}");
    assert_eq!(stat(&enc, "chunks_uploaded"), stat(&plain, "chunks_uploaded"), "{enc}");
    let copy = image(&d, "secret", "s.raw");
    restore(&d, &id(&enc), "back");
    assert_same(&d, "back", &copy);

    d.evsctl_ok(&["backup", "set-key", "--key-hex", &"22".repeat(32)]);
    let out = d.evsctl(&["backup", "restore", &id(&enc), "--to", "wrong", "--wait"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("key"), "{}", format_output(&out));
    d.evsctl_ok(&["backup", "set-key", "--clear"]);
    let out = d.evsctl(&["backup", "restore", &id(&enc), "--to", "nokey", "--wait"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("encrypted"), "{}", format_output(&out));
    // The same through `volume create --from-backup`: the job fails, and the volume it
    // started from goes again.
    let out = d.evsctl(&["volume", "create", "nokey2", "--from-backup", &id(&enc), "--wait"]);
    assert_eq!(out.status.code(), Some(1), "{}", format_output(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("encrypted"), "{}", format_output(&out));
    wait_gone(&d, "nokey2");
    // The key never reaches the logs or the audit log.
    assert!(!d.log().contains(&key));
    let audit = d.evsctl_ok(&["--output", "json", "audit", "list"]);
    assert!(!audit.contains(&key));
    // The plain backup still restores without a key.
    restore(&d, &id(&plain), "plain");
}

#[test]
fn store_faults_fail_the_job_clearly_and_a_retry_succeeds() {
    // A Garage of its own, so stopping it disturbs no other test.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir().unwrap();
    let script = root.join("scripts").join("garage.sh");
    let start = || {
        let out = run_tool(Command::new(&script).arg("start").arg(dir.path()));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let env = start();
    let get = |k: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("export {k}=")))
            .unwrap_or_else(|| panic!("garage.sh printed no {k}"))
            .to_string()
    };
    let url =
        format!("s3://{}/faults?endpoint={}&region=garage", get("EVS_TEST_S3_BUCKET"), get("EVS_TEST_S3_ENDPOINT"));
    let mut opts = DaemonOptions {
        args: vec!["--backup-store".into(), url],
        config: Some("[backups]\nconcurrency = 1\n".into()),
        ..Default::default()
    };
    opts.env = vec![
        ("AWS_ACCESS_KEY_ID".into(), get("AWS_ACCESS_KEY_ID")),
        ("AWS_SECRET_ACCESS_KEY".into(), get("AWS_SECRET_ACCESS_KEY")),
    ];
    let d = Daemon::start_with(opts);
    let (uri, _) = d.create_volume("f", "512M");
    {
        let mut c = NbdClient::connect(&uri).unwrap();
        let mut rng = Rng::new(41);
        for i in 0..256 {
            c.write(i * 2 * MIB, &rng.bytes(MIB as usize)).unwrap();
        }
        c.flush().unwrap();
    }
    let v = d.evsctl_json(&["backup", "create", "f"]);
    let job = v["job"]["id"].as_u64().unwrap().to_string();
    // Stop the store once the upload is under way.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let j = d.evsctl_json(&["job", "show", &job]);
        if j["bytes_done"].as_u64().unwrap_or(0) > 0 || j["state"] != "running" && j["state"] != "queued" {
            break;
        }
        assert!(Instant::now() < deadline, "the backup never started: {j}");
        thread::sleep(Duration::from_millis(20));
    }
    run_tool(Command::new(&script).arg("stop").arg(dir.path()));
    let out = d.evsctl(&["job", "wait", &job]);
    assert_eq!(out.status.code(), Some(1), "the job must fail with the store gone\n{}", format_output(&out));
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(err.contains("store") || err.contains("connect") || err.contains("s3"), "{err}");
    // Nothing half-uploaded is listed once the store is back; a retry succeeds and restores.
    start();
    let list = d.evsctl_json(&["backup", "list"]);
    assert!(list["backups"].as_array().unwrap().is_empty(), "a failed backup is listed: {list}");
    let copy = image(&d, "f", "f.raw");
    let b = backup(&d, "f", &[]);
    restore(&d, &id(&b), "f2");
    assert_same(&d, "f2", &copy);

    run_tool(Command::new(&script).arg("stop").arg(dir.path()));
}

/// A failed restore removes the volume it created: waits until it is gone.
fn wait_gone(d: &Daemon, volume: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while d.evsctl(&["volume", "show", volume]).status.success() {
        assert!(Instant::now() < deadline, "the failed restore left volume {volume} behind");
        thread::sleep(Duration::from_millis(100));
    }
}

/// Between the daemon and the S3 server, a proxy that cuts every connection now and then
/// (requests fail mid-transfer) and slows every response down: backups and restores retry
/// through it and come out byte for byte.
#[test]
fn backups_and_restores_survive_cut_connections_and_slow_responses() {
    let s3 = S3Env::get();
    let endpoint: std::net::SocketAddr = s3
        .endpoint
        .trim_start_matches("http://")
        .parse()
        .unwrap_or_else(|e| panic!("S3 endpoint {}: {e}", s3.endpoint));
    let proxy = Proxy::start(endpoint);
    let url = format!(
        "s3://{}/{}?endpoint=http://{}&region={}",
        s3.bucket,
        S3Env::unique_prefix("flaky"),
        proxy.addr(),
        s3.region
    );
    let d = Daemon::start_with(DaemonOptions {
        args: vec!["--backup-store".into(), url],
        env: vec![
            ("AWS_ACCESS_KEY_ID".into(), s3.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY".into(), s3.secret_key.clone()),
        ],
        config: Some("[backups]\nconcurrency = 2\n".into()),
        ..Default::default()
    });
    let (uri, _) = d.create_volume("flaky", "64M");
    {
        let mut c = NbdClient::connect(&uri).unwrap();
        let mut rng = Rng::new(51);
        for i in 0..32 {
            c.write(i * 2 * MIB, &rng.bytes(MIB as usize)).unwrap();
        }
        c.flush().unwrap();
    }
    let copy = image(&d, "flaky", "flaky.raw");
    proxy.set_delay(Duration::from_millis(3));
    // Cuts every 150 ms while a job runs.
    let cutting = |d: &Daemon, job: &str| -> Value {
        loop {
            thread::sleep(Duration::from_millis(150));
            let j = d.evsctl_json(&["job", "show", job]);
            if j["state"] != "running" && j["state"] != "queued" {
                return j;
            }
            proxy.cut();
        }
    };
    let v = d.evsctl_json(&["backup", "create", "flaky"]);
    let (job, bid) = (v["job"]["id"].as_u64().unwrap().to_string(), v["backup_id"].as_str().unwrap().to_string());
    let j = cutting(&d, &job);
    let cuts = proxy.cuts.load(Ordering::Relaxed);
    assert!(cuts > 0, "the backup ended before any cut: {j}");
    if j["state"] != "succeeded" {
        // Retries ran out: the error says where, and a second attempt (no cuts) succeeds.
        let e = j["error"].as_str().unwrap_or("").to_lowercase();
        assert!(e.contains("store") || e.contains("s3") || e.contains("connect"), "{j}");
        let again = backup(&d, "flaky", &[]);
        assert_eq!(again["volume"], "flaky");
    } else {
        assert_eq!(d.evsctl_json(&["backup", "show", &bid])["id"], bid.as_str());
    }
    let last =
        d.evsctl_json(&["backup", "list", "--volume", "flaky"])["backups"].as_array().unwrap().last().cloned().unwrap();
    let v = d.evsctl_json(&["backup", "verify", &id(&last)]);
    assert_eq!(v["job"]["state"], "succeeded", "{v}");
    let r = d.evsctl_json(&["backup", "restore", &id(&last), "--to", "flaky2"]);
    let j = cutting(&d, &r["job"]["id"].as_u64().unwrap().to_string());
    if j["state"] != "succeeded" {
        let e = j["error"].as_str().unwrap_or("").to_lowercase();
        assert!(e.contains("store") || e.contains("s3") || e.contains("connect"), "{j}");
        wait_gone(&d, "flaky2");
        restore(&d, &id(&last), "flaky2");
    }
    assert_same(&d, "flaky2", &copy);

    // The store goes down while a restore runs: the job fails naming it and leaves no
    // half-restored volume; once it is back, the same restore comes out byte for byte.
    let r = d.evsctl_json(&["backup", "restore", &id(&last), "--to", "flaky3"]);
    let job = r["job"]["id"].as_u64().unwrap().to_string();
    proxy.set_down(true);
    let out = d.evsctl(&["job", "wait", &job]);
    assert_eq!(out.status.code(), Some(1), "the restore must fail with the store down\n{}", format_output(&out));
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(err.contains("store") || err.contains("connect") || err.contains("s3"), "{err}");
    wait_gone(&d, "flaky3");
    proxy.set_down(false);
    proxy.set_delay(Duration::ZERO);
    restore(&d, &id(&last), "flaky3");
    assert_same(&d, "flaky3", &copy);
    eprintln!("flaky store: {} connection cuts, 3 ms per forwarded piece", proxy.cuts.load(Ordering::Relaxed));
}
