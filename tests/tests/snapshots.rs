//! Snapshots end to end: a real daemon, `evsctl`, and real NBD clients (qemu-io, qemu-img,
//! nbdinfo) on volume and snapshot exports.

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use evs_tests::tools::{format_output, output_with_timeout, run_tool, stdout_text, DEFAULT_TOOL_TIMEOUT};
use evs_tests::util::{assert_bytes_eq, Rng, MIB};
use evs_tests::{require_tool, u64_field, Daemon, NbdClient};

fn qemu_io(target: &str, cmds: &[&str]) -> Result<String, String> {
    qemu_io_with(target, cmds, false)
}

fn qemu_io_with(target: &str, cmds: &[&str], read_only: bool) -> Result<String, String> {
    let mut c = Command::new(require_tool("qemu-io"));
    if read_only {
        c.arg("-r");
    }
    c.arg("-f").arg("raw").arg(target);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    let out = output_with_timeout(&mut c, DEFAULT_TOOL_TIMEOUT);
    let text = format!("{}\n{}", stdout_text(&out), String::from_utf8_lossy(&out.stderr));
    let lower = text.to_lowercase();
    if !out.status.success() || lower.contains("failed") || lower.contains("error") {
        return Err(format_output(&out));
    }
    Ok(text)
}

fn qemu_io_ok(target: &str, cmds: &[&str]) {
    if let Err(e) = qemu_io(target, cmds) {
        panic!("qemu-io on {target}: {cmds:?} failed\n{e}");
    }
}

/// qemu-io -r (snapshot exports are read-only).
fn qemu_io_ro(target: &str, cmds: &[&str]) {
    if let Err(e) = qemu_io_with(target, cmds, true) {
        panic!("qemu-io -r on {target}: {cmds:?} failed\n{e}");
    }
}

fn attach_snapshot(d: &Daemon, r: &str) -> String {
    let v = d.evsctl_json(&["snapshot", "attach", r]);
    v["uri"].as_str().unwrap_or_else(|| panic!("no uri in {v}")).to_string()
}

/// `nbdinfo --map=CONTEXT --json URI` as (offset, length, type) triples.
fn map(uri: &str, context: &str) -> Vec<(u64, u64, u64)> {
    let out = run_tool(Command::new(require_tool("nbdinfo")).arg(format!("--map={context}")).arg("--json").arg(uri));
    let v: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("nbdinfo: {e}\n{}", format_output(&out)));
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| (u64_field(e, "offset"), u64_field(e, "length"), u64_field(e, "type")))
        .collect()
}

/// The byte ranges whose type has `bit` set, merged.
fn ranges_with(extents: &[(u64, u64, u64)], bit: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(off, len, ty) in extents {
        if ty & bit != 0 {
            match out.last_mut() {
                Some((o, l)) if *o + *l == off => *l += len,
                _ => out.push((off, len)),
            }
        }
    }
    out
}

#[test]
fn snapshot_clone_rollback_and_changed_blocks_over_nbd() {
    let d = Daemon::start();
    let (uri, _) = d.create_volume("db", "64M");
    // Generation 1: patterns at several places, aligned and not.
    qemu_io_ok(&uri, &["write -P 0x11 0 1M", "write -P 0x12 8M 64k", "write -P 0x13 2117152 5000", "flush"]);
    let s1 = d.evsctl_json(&["snapshot", "create", "db", "s1"]);
    assert_eq!((s1["volume"].as_str(), s1["name"].as_str()), (Some("db"), Some("s1")), "{s1}");
    assert_eq!(u64_field(&s1, "size_bytes"), 64 * MIB);
    // Generation 2: overwrite part, add new data, discard a range that held data.
    qemu_io_ok(&uri, &["write -P 0x21 512k 256k", "write -P 0x22 32M 1M", "discard 8M 64k", "flush"]);
    d.evsctl_ok(&["snapshot", "create", "db", "s2"]);
    // A copy of the volume at the same instant as s2 (nothing writes in between).
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("at-s2.raw");
    run_tool(Command::new(require_tool("qemu-img")).args(["convert", "-f", "raw", "-O", "raw", &uri]).arg(&copy));
    // Generation 3 lives only in the volume.
    qemu_io_ok(&uri, &["write -P 0x31 0 4k"]);

    // A name is unique per volume; bad names and unknown volumes are clear errors.
    let out = d.evsctl(&["snapshot", "create", "db", "s1"]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("already exists"),
        "{}",
        format_output(&out)
    );
    let out = d.evsctl(&["snapshot", "create", "db", "bad/name"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("invalid snapshot name"));
    let out = d.evsctl(&["snapshot", "create", "nope", "x"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not found"));
    let list = d.evsctl_json(&["snapshot", "list", "db"]);
    let names: Vec<&str> = list["snapshots"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["s1", "s2"]);

    // s1 read-only over NBD: generation 1 exactly, writes refused.
    let s1_uri = attach_snapshot(&d, "db@s1");
    qemu_io_ro(&s1_uri, &["read -P 0x11 0 1M", "read -P 0x12 8M 64k", "read -P 0x13 2117152 5000", "read -P 0 32M 1M"]);
    assert!(qemu_io(&s1_uri, &["write -P 0x99 0 4k"]).is_err(), "a snapshot export must refuse writes");
    let mut c = NbdClient::connect(&s1_uri).unwrap();
    assert!(c.write(0, &[1u8; 4096]).is_err());
    assert_eq!(c.read(0, 4096).unwrap(), vec![0x11; 4096], "the refused write changed nothing");
    drop(c);

    // qemu-img compare of the s2 export against the copy taken at its instant, and of the
    // volume against it (the volume differs in generation 3's block).
    let s2_uri = attach_snapshot(&d, "db@s2");
    run_tool(Command::new(require_tool("qemu-img")).args(["compare", "-f", "raw", "-F", "raw", &s2_uri]).arg(&copy));
    let cmp = output_with_timeout(
        Command::new(require_tool("qemu-img")).args(["compare", "-f", "raw", "-F", "raw", &uri]).arg(&copy),
        DEFAULT_TOOL_TIMEOUT,
    );
    assert_eq!(cmp.status.code(), Some(1), "the volume moved on since s2: {}", format_output(&cmp));

    // Changed blocks s1 → s2 over NBD (meta context x-evs:changed:s1) and through the CLI.
    let m = map(&s2_uri, "x-evs:changed:s1");
    let changed = ranges_with(&m, 1);
    assert_eq!(changed, vec![(512 * 1024, 256 * 1024), (8 * MIB, 64 * 1024), (32 * MIB, MIB)], "{m:?}");
    assert_eq!(ranges_with(&m, 2), vec![(8 * MIB, 64 * 1024)], "the discarded range is flagged: {m:?}");
    let diff = d.evsctl_json(&["snapshot", "diff", "db", "--from", "s1", "--to", "s2"]);
    let ext: Vec<(u64, u64, bool)> = diff["extents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (u64_field(e, "offset"), u64_field(e, "length"), e["zero"].as_bool().unwrap()))
        .collect();
    assert_eq!(ext, vec![(512 * 1024, 256 * 1024, false), (8 * MIB, 64 * 1024, true), (32 * MIB, MIB, false)]);
    let out = d.evsctl(&["snapshot", "diff", "db", "--from", "s2", "--to", "s1"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not an ancestor"));
    // Allocated extents of s1 (a first full backup reads only these).
    let full = d.evsctl_json(&["snapshot", "diff", "db", "--to", "s1"]);
    assert_eq!(u64_field(&full, "changed_bytes"), MIB + 64 * 1024 + 12288, "{full}");

    // Clone of s1: instant, independent both ways.
    let clone = d.evsctl_json(&["volume", "create", "db-clone", "--from-snapshot", "db@s1"]);
    assert_eq!(u64_field(&clone, "size_bytes"), 64 * MIB);
    let clone_uri = d.attach("db-clone");
    qemu_io_ok(&clone_uri, &["read -P 0x11 0 1M", "write -P 0x41 0 64k", "flush"]);
    qemu_io_ro(&s1_uri, &["read -P 0x11 0 1M"]);
    qemu_io_ok(&uri, &["read -P 0x31 0 4k", "read -P 0x11 4k 508k"]);

    // Rollback needs the volume's clients gone; later snapshots survive it.
    let mut holder = NbdClient::connect(&uri).unwrap();
    let out = d.evsctl(&["snapshot", "rollback", "db@s1"]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("NBD connection"),
        "{}",
        format_output(&out)
    );
    assert_eq!(holder.read(0, 4096).unwrap(), vec![0x31; 4096], "a refused rollback changed nothing");
    holder.disconnect().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = d.evsctl(&["snapshot", "rollback", "db@s1"]);
        if out.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "rollback still refused: {}", format_output(&out));
        thread::sleep(Duration::from_millis(100));
    }
    qemu_io_ok(&uri, &["read -P 0x11 0 1M", "read -P 0 32M 1M", "read -P 0x12 8M 64k"]);
    qemu_io_ro(&s2_uri, &["read -P 0x21 512k 256k", "read -P 0x22 32M 1M"]);

    // Deleting the source keeps the clone readable. Attached things are protected first.
    let out = d.evsctl(&["snapshot", "delete", "db@s1"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("attached"));
    d.evsctl_ok(&["volume", "detach", "db"]);
    d.evsctl_ok(&["volume", "delete", "db"]);
    qemu_io_ok(&clone_uri, &["read -P 0x41 0 64k", "read -P 0x11 64k 960k", "read -P 0x12 8M 64k"]);
    assert!(NbdClient::connect(&s1_uri).is_err(), "the deleted volume's snapshot exports are revoked");
    let list = d.evsctl(&["snapshot", "list", "db"]);
    assert!(!list.status.success(), "snapshots went with their volume");
}

#[test]
fn snapshot_delete_merges_online_and_survives_restart() {
    let mut d = Daemon::start();
    let (uri, _) = d.create_volume("v", "16M");
    let mut c = NbdClient::connect(&uri).unwrap();
    let mut model = vec![0u8; 16 * MIB as usize];
    let mut rng = Rng::from_env_or_time("snapshot_delete_merges");
    for round in 0..6 {
        for _ in 0..20 {
            let off = rng.below(16 * MIB / 4096 - 16) * 4096;
            let blocks = 1 + rng.below(15) as usize;
            let data = rng.bytes(4096 * blocks);
            c.write(off, &data).unwrap();
            model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        }
        c.flush().unwrap();
        d.evsctl_ok(&["snapshot", "create", "v", &format!("r{round}")]);
    }
    // Delete every other snapshot while the client keeps writing.
    for round in [0, 2, 4, 1] {
        d.evsctl_ok(&["snapshot", "delete", &format!("v@r{round}")]);
        let off = rng.below(16 * MIB / 4096 - 1) * 4096;
        let data = rng.bytes(4096);
        c.write(off, &data).unwrap();
        model[off as usize..off as usize + 4096].copy_from_slice(&data);
    }
    c.flush().unwrap();
    let got = c.read_all(0, 16 * MIB, 1 << 20).unwrap();
    assert_bytes_eq(&got, &model, 0, "volume after snapshot deletes");
    drop(c);
    assert!(d.terminate().success());
    d.restart();
    let mut c = NbdClient::connect(&uri).unwrap();
    let got = c.read_all(0, 16 * MIB, 1 << 20).unwrap();
    assert_bytes_eq(&got, &model, 0, "volume after restart");
    let names: Vec<String> = d.evsctl_json(&["snapshot", "list", "v"])["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["r3", "r5"]);
}

/// One writer appends numbered records to three volumes in turn (record `seq` goes to volume
/// `seq % 3`, block `seq / 3`), each acknowledged before the next is sent, while group
/// snapshots of the three are taken. In every group, if record N is in some volume then every
/// record before N is in its volume: no later write without an earlier one.
#[test]
fn group_snapshots_are_one_instant_across_volumes() {
    const VOLS: [&str; 3] = ["ga", "gb", "gc"];
    const BLOCKS: u64 = 512;
    let d = Daemon::start();
    let uris: Vec<String> = VOLS.iter().map(|v| d.create_volume(v, "2M").0).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (uris, stop) = (uris.clone(), stop.clone());
        thread::spawn(move || {
            let mut conns: Vec<NbdClient> = uris.iter().map(|u| NbdClient::connect(u).unwrap()).collect();
            let mut seq = 1u64;
            while !stop.load(std::sync::atomic::Ordering::Acquire) && seq / 3 < BLOCKS {
                let mut block = vec![0u8; 4096];
                for chunk in block.chunks_mut(8) {
                    chunk.copy_from_slice(&seq.to_le_bytes());
                }
                conns[(seq % 3) as usize].write((seq / 3) * 4096, &block).unwrap();
                seq += 1;
            }
            seq - 1
        })
    };
    let mut groups = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while groups < 8 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(30));
        let v = d.evsctl_json(&["snapshot", "create-group", &format!("g{groups}"), "--volumes", "ga,gb,gc"]);
        let snaps = v["snapshots"].as_array().unwrap();
        assert_eq!(snaps.len(), 3, "{v}");
        assert!(snaps.iter().all(|s| s["group"].as_str() == Some(&format!("g{groups}"))), "{v}");
        groups += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Release);
    let written = writer.join().unwrap();
    assert!(written > 30, "the writer made no progress ({written} records)");
    // A group naming an unknown volume is refused whole: nothing is created anywhere.
    let out = d.evsctl(&["snapshot", "create-group", "bad", "--volumes", "ga,nope"]);
    assert!(!out.status.success());
    let out = d.evsctl(&["snapshot", "show", "ga@bad"]);
    assert!(!out.status.success(), "a failed group left a snapshot behind");

    let mut nonempty = 0;
    for g in 0..groups {
        let mut present = Vec::new(); // (seq, in snapshot)
        for (vi, v) in VOLS.iter().enumerate() {
            let uri = attach_snapshot(&d, &format!("{v}@g{g}"));
            let mut c = NbdClient::connect(&uri).unwrap();
            let data = c.read_all(0, BLOCKS * 4096, 1 << 20).unwrap();
            for b in 0..BLOCKS {
                let seq = b * 3 + vi as u64;
                if seq == 0 {
                    continue;
                }
                let got = u64::from_le_bytes(data[(b * 4096) as usize..(b * 4096 + 8) as usize].try_into().unwrap());
                assert!(got == 0 || got == seq, "group g{g}: {v} block {b} holds record {got}");
                present.push((seq, got == seq));
            }
        }
        present.sort();
        let newest = present.iter().filter(|(_, p)| *p).map(|(s, _)| *s).max().unwrap_or(0);
        let missing: Vec<u64> = present.iter().filter(|(s, p)| *s <= newest && !p).map(|(s, _)| *s).collect();
        assert!(missing.is_empty(), "group g{g} holds record {newest} but misses earlier records {missing:?}");
        if newest > 0 {
            nonempty += 1;
        }
    }
    assert!(nonempty > 0, "no group caught any write: the test proved nothing");
}
