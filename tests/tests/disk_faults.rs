//! Disk faults under the layer files.
//!
//! * ENOSPC, for real: the data directory is a small tmpfs. Writes past the free space fail with
//!   NBD_ENOSPC, the daemon keeps serving (reads, other volumes, the API), nothing flushed
//!   before is damaged, and once space is freed (a trim) writes work again; after a restart
//!   every flushed write is there.
//! * EIO, injected in the I/O engine (the `io-write-fault` fail point of test builds): the
//!   failed writes get NBD_EIO, the other connections and volumes are served throughout,
//!   flushed data reads back intact and writes succeed again when the fault stops. An
//!   overwrite replied to before its op failed (write-back) fails the next flush instead, once.
//! * FAST_ZERO where zeroing is slow: tmpfs cannot zero a range in place, so a write-zeroes
//!   that must stay allocated (NO_HOLE) and may only be quick (FAST_ZERO) gets NBD_ENOTSUP and
//!   changes nothing; without FAST_ZERO, or with holes allowed, it zeroes.

use std::path::PathBuf;
use std::process::Command;

use evs_tests::nbd_client::consts::{CMD_FLAG_FAST_ZERO, CMD_FLAG_NO_HOLE, EIO, ENOSPC, ENOTSUP};
use evs_tests::tools::{format_output, run_tool};
use evs_tests::util::{Rng, BLOCK, MIB};
use evs_tests::{Daemon, DaemonOptions, NbdClient};

/// A tmpfs of `size` bytes mounted on a new temporary directory; unmounted on drop.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(size: u64) -> SmallFs {
        let dir = tempfile::Builder::new().prefix("evs-smallfs-").tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}")])
            .arg("tmpfs")
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs as the data directory and needs root (CAP_SYS_ADMIN): {}",
            format_output(&out)
        );
        SmallFs { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn free(&self) -> u64 {
        let out = run_tool(Command::new("df").args(["-B1", "--output=avail"]).arg(self.dir.path()));
        String::from_utf8_lossy(&out.stdout).lines().nth(1).unwrap().trim().parse().unwrap()
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

fn read_back(uri: &str, len: u64) -> Vec<u8> {
    let mut c = NbdClient::connect(uri).unwrap();
    c.read_all(0, len, 1 << 20).unwrap()
}

#[test]
fn enospc_fails_writes_cleanly_keeps_flushed_data_and_service_resumes_when_space_is_freed() {
    let fs = SmallFs::mount(48 * MIB);
    let mut d = Daemon::start_with(DaemonOptions { data_dir: Some(fs.path()), ..Default::default() });
    let mut rng = Rng::from_env_or_time("enospc");
    // `keep` (4 MiB) is written and flushed first: it must survive everything below.
    let (keep_uri, _) = d.create_volume("keep", "4M");
    let keep = rng.bytes((4 * MIB) as usize);
    {
        let mut c = NbdClient::connect(&keep_uri).unwrap();
        c.write(0, &keep).unwrap();
        c.flush().unwrap();
    }
    // `big` (thin, 256 MiB) is filled until the filesystem is full.
    let (big_uri, _) = d.create_volume("big", "256M");
    let mut c = NbdClient::connect(&big_uri).unwrap();
    let mut written: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut enospc = None;
    for i in 0..256u64 {
        let data = rng.bytes(MIB as usize);
        match c.write(i * MIB, &data) {
            Ok(()) => written.push((i * MIB, data)),
            Err(e) => {
                enospc = Some((i, e));
                break;
            }
        }
    }
    let (failed_at, err) = enospc.expect("256 MiB fitted in a 48 MiB filesystem");
    assert_eq!(err.errno(), Some(ENOSPC), "a write on a full disk: {err}");
    assert!(failed_at >= 8, "only {failed_at} MiB fitted: the test proved little");
    // Flush what was acknowledged (the filesystem holds it already: flush needs no space).
    c.flush().expect("flush on a full filesystem");
    // Still serving: another connection reads `keep`, the API answers, a second write fails
    // the same way instead of hanging.
    assert_eq!(read_back(&keep_uri, 4 * MIB), keep, "flushed data of another volume");
    d.assert_running();
    assert_eq!(d.list_volumes().len(), 2);
    let again = c.write(failed_at * MIB, &rng.bytes(MIB as usize)).unwrap_err();
    assert_eq!(again.errno(), Some(ENOSPC), "{again}");

    // Free space: trim the first half of what was written (punches holes in the layer file).
    let freed = written.len() as u64 / 2;
    let before = fs.free();
    c.trim(0, (freed * MIB) as u32).unwrap();
    c.flush().unwrap();
    assert!(fs.free() >= before + freed * MIB / 2, "the trim gave no space back ({before} -> {})", fs.free());
    // Writes work again.
    let fresh = rng.bytes(MIB as usize);
    c.write(failed_at * MIB, &fresh).expect("a write once space was freed");
    c.flush().unwrap();
    drop(c);

    // After a restart every flushed write is there and the trimmed range reads as zeros.
    assert!(d.terminate().success());
    d.restart();
    assert_eq!(read_back(&keep_uri, 4 * MIB), keep);
    let all = read_back(&big_uri, 256 * MIB);
    for (off, data) in &written {
        let got = &all[*off as usize..*off as usize + data.len()];
        if *off < freed * MIB {
            assert!(got.iter().all(|&b| b == 0), "trimmed MiB at {off} does not read as zeros");
        } else {
            assert!(got == data.as_slice(), "flushed MiB at {off} is damaged");
        }
    }
    let at = (failed_at * MIB) as usize;
    assert!(all[at..at + MIB as usize] == fresh[..], "the write after freeing space");
}

#[test]
fn a_fast_zero_that_would_write_the_zeros_is_refused_with_enotsup_and_changes_nothing() {
    let fs = SmallFs::mount(32 * MIB);
    let d = Daemon::start_with(DaemonOptions { data_dir: Some(fs.path()), ..Default::default() });
    let (uri, _) = d.create_volume("z", "4M");
    let mut rng = Rng::from_env_or_time("fast-zero");
    let data = rng.bytes((4 * MIB) as usize);
    let mut c = NbdClient::connect(&uri).unwrap();
    c.write(0, &data).unwrap();
    c.flush().unwrap();
    let (off, len) = (MIB + 512, (MIB + 3 * BLOCK) as u32);
    let e = c.write_zeroes(off, len, CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO).unwrap_err();
    assert_eq!(e.errno(), Some(ENOTSUP), "{e}");
    assert_eq!(c.read_all(0, 4 * MIB, MIB as u32).unwrap(), data, "a refused fast zero changed the volume");
    // Without FAST_ZERO the server writes the zeros; with holes allowed it is quick anyway.
    let mut model = data;
    c.write_zeroes(off, len, CMD_FLAG_NO_HOLE).unwrap();
    model[off as usize..off as usize + len as usize].fill(0);
    c.write_zeroes(3 * MIB, MIB as u32, CMD_FLAG_FAST_ZERO).unwrap();
    model[3 * MIB as usize..].fill(0);
    c.flush().unwrap();
    assert_eq!(c.read_all(0, 4 * MIB, MIB as u32).unwrap(), model);
}

/// Stops the daemon and starts it again with the `io-write-fault` fail point set to `rule`.
fn restart_failing_writes(d: &mut Daemon, rule: &str) {
    assert!(d.terminate().success());
    d.set_env("FAILPOINTS", Some(&format!("io-write-fault={rule}")));
    d.restart();
    assert!(d.log().contains("failpoints=true"), "build with --features evs-target/failpoints (scripts/test.sh does)");
}

#[test]
fn injected_eio_fails_those_writes_only_and_flushed_data_stays_intact() {
    let mut d = Daemon::start();
    let (uri, _) = d.create_volume("v", "16M");
    let (other_uri, _) = d.create_volume("other", "4M");
    let mut rng = Rng::from_env_or_time("eio");
    let other = rng.bytes((4 * MIB) as usize);
    {
        let mut c = NbdClient::connect(&other_uri).unwrap();
        c.write(0, &other).unwrap();
        c.flush().unwrap();
    }
    // The next daemon fails writes 31 to 40 with EIO.
    restart_failing_writes(&mut d, "30*off->10*return(5)->off");

    let blocks = 16 * MIB / BLOCK;
    let mut model: Vec<Option<Vec<u8>>> = vec![None; blocks as usize];
    let mut c = NbdClient::connect(&uri).unwrap();
    let mut failed = 0;
    let mut ok = 0;
    for i in 0..100u64 {
        let blk = rng.below(blocks);
        let data = rng.bytes(BLOCK as usize);
        // An overwrite may be replied to before its op completes (write-back): its failure
        // then fails the flush that follows, as fsync reports a failed writeback.
        match c.write(blk * BLOCK, &data).and_then(|()| c.flush()) {
            Ok(()) => {
                ok += 1;
                model[blk as usize] = Some(data);
            }
            Err(e) => {
                assert_eq!(e.errno(), Some(EIO), "write {i}: {e}");
                failed += 1;
                // Meanwhile the other volume is served, intact.
                assert_eq!(read_back(&other_uri, 4 * MIB), other, "the other volume during the faults");
            }
        }
    }
    assert_eq!(failed, 10, "exactly the injected writes fail");
    assert_eq!(ok, 90);
    d.assert_running();
    // A failed write changed nothing; every flushed one is there, before and after a restart.
    let check = |all: &[u8]| {
        for (b, want) in model.iter().enumerate() {
            let got = &all[b * BLOCK as usize..(b + 1) * BLOCK as usize];
            match want {
                Some(w) => assert!(got == w.as_slice(), "block {b}: not the flushed write"),
                None => assert!(got.iter().all(|&x| x == 0), "block {b}: holds data never acknowledged"),
            }
        }
    };
    drop(c);
    check(&read_back(&uri, 16 * MIB));
    assert!(d.terminate().success());
    d.set_env("FAILPOINTS", None);
    d.restart();
    check(&read_back(&uri, 16 * MIB));
    assert_eq!(read_back(&other_uri, 4 * MIB), other);
}

#[test]
fn an_eio_after_an_early_reply_fails_the_next_flush_once() {
    let mut d = Daemon::start();
    let (uri, _) = d.create_volume("wb", "1M");
    let first = vec![1u8; BLOCK as usize];
    {
        let mut c = NbdClient::connect(&uri).unwrap();
        c.write(0, &first).unwrap();
        c.flush().unwrap();
    }
    // The next daemon fails its second data write.
    restart_failing_writes(&mut d, "1*off->1*return(5)->off");
    let mut c = NbdClient::connect(&uri).unwrap();
    let second = vec![2u8; BLOCK as usize];
    c.write(0, &second).unwrap();
    c.flush().unwrap();
    // An overwrite of a written block: replied to at once, so the fault shows at the flush.
    c.write(0, &[3u8; BLOCK as usize]).expect("an overwrite is replied to before its op completes");
    let early = d.metrics().get("evs_volume_write_early_replies_total", &[("volume", "wb")]).unwrap_or(0.0);
    assert!(early >= 2.0, "the overwrites were not replied to early ({early})");
    let err = c.flush().expect_err("the flush after a failed write succeeded");
    assert_eq!(err.errno(), Some(EIO), "{err}");
    c.flush().expect("a failure is reported by one flush only");
    // The failed write changed nothing.
    assert_eq!(c.read(0, BLOCK as u32).unwrap(), second);
    d.assert_running();
}
