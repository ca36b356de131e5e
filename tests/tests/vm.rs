//! A real virtual machine on our volumes: qemu-system-x86_64 boots a small Debian-kernel guest
//! (see `evs_tests::vm`) whose disk is a volume over vhost-user-blk or over NBD. The guest
//! makes a file system, writes files, prints their checksums, syncs and powers off; the host
//! then reads the same volume over NBD and checks the files with debugfs (e2fsprogs), no root
//! mount needed.
//!
//! KVM when it runs guests here, TCG otherwise; each boot takes a few seconds either way.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use evs_tests::tools::{format_output, require_tool, run_tool};
use evs_tests::vm::{program_with_libs, Console, Disk, GuestImage, Vm, GUEST_MEM_MIB};
use evs_tests::{tool, u64_field, Daemon};

/// A scenario's time limit (TCG included).
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

/// Files the write scenario creates: name, block size, count (odd sizes included).
const FILES: [(&str, u32, u32); 3] = [("a", 4096, 1), ("b", 65536, 100), ("c", 1000, 3333)];

/// Makes an ext4 file system (busybox mke2fs makes ext2; the kernel's ext4 driver mounts it),
/// writes the files from /dev/urandom, prints `SUM name sha256` for each, unmounts, syncs.
fn write_scenario() -> String {
    let mut s = String::from("set -e\nmke2fs -q -F /dev/vda\nmount -t ext4 /dev/vda /mnt\n");
    for (name, bs, count) in FILES {
        s.push_str(&format!("dd if=/dev/urandom of=/mnt/{name} bs={bs} count={count} 2>/dev/null\n"));
    }
    s.push_str("sync\n");
    for (name, _, _) in FILES {
        s.push_str(&format!("echo \"SUM {name} $(sha256sum /mnt/{name} | cut -d' ' -f1)\"\n"));
    }
    s.push_str("umount /mnt\nsync\n");
    s
}

/// Mounts read-only, prints the sums again, and shows that writes are refused.
fn verify_ro_scenario() -> String {
    let mut s = String::from("echo \"RO $(cat /sys/block/vda/ro)\"\nmount -t ext4 -o ro,noload /dev/vda /mnt\n");
    for (name, _, _) in FILES {
        s.push_str(&format!("echo \"SUM {name} $(sha256sum /mnt/{name} | cut -d' ' -f1)\"\n"));
    }
    s.push_str("umount /mnt\n");
    s.push_str(
        "if dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct 2>/dev/null; then echo \"WRITE ok\"; \
         else echo \"WRITE refused\"; fi\n",
    );
    s
}

/// The guest's checksums by file name.
fn sums(c: &Console) -> Vec<(String, String)> {
    c.values("SUM")
        .into_iter()
        .map(|v| {
            let mut it = v.split_whitespace();
            let name = it.next().unwrap_or_default().to_string();
            let sum = it.next().unwrap_or_default().to_string();
            (name, sum)
        })
        .collect()
}

fn sha256(path: &Path) -> String {
    let out = run_tool(Command::new(require_tool("sha256sum")).arg(path));
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_string()
}

/// Copies the volume behind `uri` to a raw image and checks every file of the guest's list
/// with debugfs against the guest's checksum.
fn check_files_over_nbd(uri: &str, dir: &Path, guest: &[(String, String)]) {
    assert_eq!(guest.len(), FILES.len(), "the guest printed a checksum per file: {guest:?}");
    let img = dir.join("readback.raw");
    let _ = std::fs::remove_file(&img);
    tool("nbdcopy", &[uri, img.to_str().unwrap()]);
    let debugfs = require_tool("debugfs");
    for (name, sum) in guest {
        assert_eq!(sum.len(), 64, "a sha256 from the guest for {name}: {sum:?}");
        let out_file = dir.join(format!("host-{name}"));
        let _ = std::fs::remove_file(&out_file);
        let out =
            run_tool(Command::new(&debugfs).arg("-R").arg(format!("dump /{name} {}", out_file.display())).arg(&img));
        assert!(out_file.is_file(), "debugfs dumped /{name}\n{}", format_output(&out));
        assert_eq!(&sha256(&out_file), sum, "file {name} read back over NBD differs from what the guest wrote");
    }
}

fn boot(image: &GuestImage, dir: &Path, disk: Disk, scenario: &str) -> Console {
    let initrd = image.initramfs(dir, scenario, &[]);
    let vm = Vm {
        image,
        accel: image.accel(),
        smp: 2,
        disks: vec![disk],
        initrd,
        mem_mib: GUEST_MEM_MIB,
        allow_reboot: false,
    };
    let c = vm.run(dir, BOOT_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.exit_status(), Some(0), "the guest scenario failed\n{}", c.text);
    c
}

/// Boots a one-vCPU guest on `disk` in the background and waits until its console shows
/// `marker` (the scenario's cue for the host). Returns the running guest and the console path.
fn boot_until(
    image: &GuestImage,
    dir: &Path,
    disk: Disk,
    scenario: &str,
    marker: &str,
) -> std::thread::JoinHandle<Result<Console, String>> {
    let initrd = image.initramfs(dir, scenario, &[]);
    let accel = image.accel();
    let console = dir.join(format!("console-{}.log", std::process::id()));
    let (img, dpath) = (image.clone(), dir.to_path_buf());
    let guest = std::thread::spawn(move || {
        let vm =
            Vm { image: &img, accel, smp: 1, disks: vec![disk], initrd, mem_mib: GUEST_MEM_MIB, allow_reboot: false };
        vm.run(&dpath, BOOT_TIMEOUT)
    });
    let start = Instant::now();
    while !std::fs::read_to_string(&console).unwrap_or_default().contains(marker) {
        assert!(start.elapsed() < BOOT_TIMEOUT, "the guest never printed {marker}");
        assert!(!guest.is_finished(), "the guest ended before printing {marker}");
        std::thread::sleep(Duration::from_millis(100));
    }
    guest
}

fn socket_of(d: &Daemon, args: &[&str]) -> PathBuf {
    let v = d.evsctl_json(args);
    assert_eq!(v["protocol"], "vhost-user", "{v}");
    assert_eq!(v["uri"], "", "no NBD URI for a vhost-user attachment: {v}");
    PathBuf::from(v["vhost_user_socket"].as_str().unwrap_or_else(|| panic!("a socket path: {v}")))
}

fn metric(d: &Daemon, name: &str, volume: &str) -> f64 {
    d.metrics().get(name, &[("volume", volume)]).unwrap_or(0.0)
}

#[test]
fn vm_on_vhost_user_writes_files_the_host_reads_over_nbd() {
    let image = GuestImage::prepare();
    let d = Daemon::start();
    d.evsctl_ok(&["volume", "create", "vm", "--size", "256M", "--tier", "unlimited"]);
    let sock = socket_of(&d, &["volume", "attach", "vm", "--protocol", "vhost-user"]);
    let meta = std::fs::symlink_metadata(&sock).expect("the socket exists");
    assert!(meta.file_type().is_socket(), "{} is a socket", sock.display());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "the socket is for the daemon's user only");
    // Attaching again over vhost-user returns the same socket.
    assert_eq!(socket_of(&d, &["volume", "attach", "vm", "--protocol", "vhost-user"]), sock);
    // The table output is just the socket path.
    assert_eq!(d.evsctl_ok(&["volume", "attach", "vm", "--protocol", "vhost-user"]).trim(), sock.to_str().unwrap());

    let dir = tempfile::tempdir().unwrap();
    let c =
        boot(&image, dir.path(), Disk::VhostUser { socket: sock.clone(), queues: 2, reconnect: 0 }, &write_scenario());
    let guest = sums(&c);

    // The guest's I/O went through the volume's counters; its sync was a FLUSH.
    assert!(metric(&d, "evs_volume_write_ops_total", "vm") > 0.0, "writes counted");
    assert!(metric(&d, "evs_volume_read_ops_total", "vm") > 0.0, "reads counted");
    assert!(metric(&d, "evs_volume_other_ops_total", "vm") > 0.0, "flushes counted");
    assert!(u64_field(&d.show_volume("vm"), "allocated_bytes") >= 6 << 20, "the files' blocks are allocated");
    assert_eq!(metric(&d, "evs_volume_queue_depth", "vm"), 0.0, "every request was answered");
    assert_eq!(metric(&d, "evs_volume_errors_total", "vm"), 0.0, "no request failed");

    // The host reads the same volume over NBD (a second attachment, same volume).
    let uri = d.attach("vm");
    check_files_over_nbd(&uri, dir.path(), &guest);

    // A snapshot, attached read-only over vhost-user: a second frontend sees the same files
    // and cannot write.
    d.evsctl_ok(&["snapshot", "create", "vm", "s1"]);
    let ro_sock = socket_of(&d, &["snapshot", "attach", "vm@s1", "--protocol", "vhost-user"]);
    let c = boot(
        &image,
        dir.path(),
        Disk::VhostUser { socket: ro_sock.clone(), queues: 1, reconnect: 0 },
        &verify_ro_scenario(),
    );
    assert_eq!(c.values("RO"), vec!["1".to_string()], "the guest sees a read-only disk\n{}", c.text);
    assert_eq!(sums(&c), guest, "the snapshot holds the files\n{}", c.text);
    assert_eq!(c.values("WRITE"), vec!["refused".to_string()], "writes to the snapshot are refused\n{}", c.text);

    // Detach removes the sockets: a hypervisor cannot reconnect.
    d.evsctl_ok(&["volume", "detach", "vm"]);
    d.evsctl_ok(&["snapshot", "detach", "vm@s1"]);
    for s in [&sock, &ro_sock] {
        assert!(!s.exists(), "{} removed at detach", s.display());
        assert!(std::os::unix::net::UnixStream::connect(s).is_err(), "no reconnect to {}", s.display());
    }
}

#[test]
fn vm_on_nbd_writes_files_the_host_reads_back() {
    let image = GuestImage::prepare();
    let d = Daemon::start();
    d.evsctl_ok(&["volume", "create", "vm", "--size", "256M", "--tier", "unlimited"]);
    let uri = d.attach("vm");
    let dir = tempfile::tempdir().unwrap();
    let c = boot(&image, dir.path(), Disk::Nbd { uri: uri.clone() }, &write_scenario());
    let guest = sums(&c);
    assert!(metric(&d, "evs_volume_write_ops_total", "vm") > 0.0, "writes counted");
    check_files_over_nbd(&uri, dir.path(), &guest);
}

#[test]
fn vm_on_vhost_user_is_held_to_the_volume_tier() {
    // Tier common: 40 MB/s and no burst above the limit; 48 MiB of 1 MiB writes take over a
    // second, so the limiter must hold requests back (delay, never fail).
    let image = GuestImage::prepare();
    let d = Daemon::start();
    d.evsctl_ok(&["volume", "create", "vm", "--size", "256M", "--tier", "common"]);
    let sock = socket_of(&d, &["volume", "attach", "vm", "--protocol", "vhost-user"]);
    let scenario = "set -e\ndd if=/dev/zero of=/dev/vda bs=1048576 count=48 oflag=direct 2>/dev/null\n\
                    echo \"SUM z $(dd if=/dev/vda bs=1048576 count=48 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)\"\n";
    let dir = tempfile::tempdir().unwrap();
    let c = boot(&image, dir.path(), Disk::VhostUser { socket: sock, queues: 1, reconnect: 0 }, scenario);
    assert!(metric(&d, "evs_volume_throttled_ops_total", "vm") > 0.0, "QoS held requests back\n{}", c.text);
    assert!(metric(&d, "evs_volume_write_bytes_total", "vm") >= (48 << 20) as f64, "every write went through");
    assert_eq!(metric(&d, "evs_volume_errors_total", "vm"), 0.0, "throttled, never failed");
    // 48 MiB of zeros read back as written.
    let zeros = dir.path().join("zeros");
    std::fs::write(&zeros, vec![0u8; 48 << 20]).unwrap();
    assert_eq!(sums(&c), vec![("z".to_string(), sha256(&zeros))], "{}", c.text);
}

#[test]
fn vm_fstrim_on_vhost_user_gives_space_back() {
    let image = GuestImage::prepare();
    let d = Daemon::start();
    d.evsctl_ok(&["volume", "create", "vm", "--size", "256M", "--tier", "unlimited"]);
    let sock = socket_of(&d, &["volume", "attach", "vm", "--protocol", "vhost-user"]);
    let scenario = "set -e\nmke2fs -q -F /dev/vda\nmount -t ext4 /dev/vda /mnt\n\
                    dd if=/dev/urandom of=/mnt/big bs=1048576 count=64 2>/dev/null\nsync\n\
                    echo \"DISCARD_MAX $(cat /sys/block/vda/queue/discard_max_bytes)\"\n\
                    rm /mnt/big\nsync\nfstrim -v /mnt\numount /mnt\nsync\n";
    let dir = tempfile::tempdir().unwrap();
    let c = boot(&image, dir.path(), Disk::VhostUser { socket: sock, queues: 2, reconnect: 0 }, scenario);
    let max: u64 = c.values("DISCARD_MAX").first().and_then(|v| v.parse().ok()).unwrap_or(0);
    assert!(max > 0, "the guest sees a disk that discards\n{}", c.text);
    assert!(metric(&d, "evs_volume_write_bytes_total", "vm") >= (64 << 20) as f64, "the 64 MiB file was written");
    let allocated = u64_field(&d.show_volume("vm"), "allocated_bytes");
    assert!(allocated < 32 << 20, "fstrim gave the file's 64 MiB back: {allocated} bytes still allocated\n{}", c.text);
}

#[test]
fn vm_on_vhost_user_sees_volume_extend_at_once() {
    // The guest waits (without rebooting or reconnecting) for its disk to grow, then writes
    // past the old end; the host extends the volume while it waits and reads that data back.
    let image = GuestImage::prepare();
    let d = Daemon::start();
    d.evsctl_ok(&["volume", "create", "vm", "--size", "256M", "--tier", "unlimited"]);
    let sock = socket_of(&d, &["volume", "attach", "vm", "--protocol", "vhost-user"]);
    let scenario = "set -e\ns0=$(cat /sys/block/vda/size)\necho \"SIZE0 $s0\"\necho RESIZE-WAIT\n\
                    i=0\nwhile [ \"$(cat /sys/block/vda/size)\" = \"$s0\" ] && [ $i -lt 60 ]; do sleep 1; i=$((i+1)); done\n\
                    echo \"SIZE1 $(cat /sys/block/vda/size)\"\n\
                    dd if=/dev/urandom of=/tmp/tail bs=4096 count=16 2>/dev/null\n\
                    dd if=/tmp/tail of=/dev/vda bs=4096 seek=$((s0 / 8)) count=16 oflag=direct 2>/dev/null\nsync\n\
                    echo \"SUM tail $(sha256sum /tmp/tail | cut -d' ' -f1)\"\n";
    let dir = tempfile::tempdir().unwrap();
    let disk = Disk::VhostUser { socket: sock, queues: 1, reconnect: 0 };
    let guest = boot_until(&image, dir.path(), disk, scenario, "RESIZE-WAIT");
    d.evsctl_ok(&["volume", "extend", "vm", "--size", "512M"]);
    let c = guest.join().unwrap().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.exit_status(), Some(0), "the guest scenario\n{}", c.text);
    assert_eq!(c.values("SIZE0"), vec![((256u64 << 20) / 512).to_string()], "{}", c.text);
    assert_eq!(c.values("SIZE1"), vec![((512u64 << 20) / 512).to_string()], "the guest saw the new size\n{}", c.text);
    assert!(d.log().contains("config-change notice sent to vhost-user frontends"), "{}", d.log());
    // The 64 KiB written at the old end, read back over NBD.
    let sum = c.values("SUM").first().and_then(|v| v.split_whitespace().nth(1).map(str::to_string)).unwrap_or_default();
    let uri = d.attach("vm");
    let img = dir.path().join("readback.raw");
    tool("nbdcopy", &[&uri, img.to_str().unwrap()]);
    let all = std::fs::read(&img).unwrap();
    assert_eq!(all.len() as u64, 512 << 20, "the volume is 512 MiB over NBD too");
    let tail = dir.path().join("tail");
    std::fs::write(&tail, &all[256 << 20..(256 << 20) + (64 << 10)]).unwrap();
    assert_eq!(sha256(&tail), sum, "the data the guest wrote past the old end");
}

#[test]
fn vm_on_vhost_user_resumes_after_a_daemon_restart() {
    let image = GuestImage::prepare();
    let mut d = Daemon::start();
    d.evsctl_ok(&["volume", "create", "vm", "--size", "256M", "--tier", "unlimited"]);
    let sock = socket_of(&d, &["volume", "attach", "vm", "--protocol", "vhost-user"]);
    // Phase 1 writes a file; the guest then waits for the host to restart the daemon (it
    // polls for a marker the host cannot write: it just sleeps past the restart) and writes
    // phase 2 through the reconnected backend.
    let scenario = "set -e\nmke2fs -q -F -b 4096 /dev/vda\nmount -t ext4 /dev/vda /mnt\n\
                    dd if=/dev/urandom of=/mnt/p1 bs=65536 count=16 2>/dev/null\nsync\n\
                    dd if=/dev/urandom of=/mnt/p1 bs=65536 count=16 conv=notrunc 2>/dev/null\nsync\n\
                    echo \"SUM p1 $(sha256sum /mnt/p1 | cut -d' ' -f1)\"\necho PHASE1-DONE\n\
                    sleep 8\n\
                    dd if=/dev/urandom of=/mnt/p2 bs=65536 count=16 2>/dev/null\nsync\n\
                    echo \"SUM p2 $(sha256sum /mnt/p2 | cut -d' ' -f1)\"\numount /mnt\nsync\n";
    let dir = tempfile::tempdir().unwrap();
    let disk = Disk::VhostUser { socket: sock.clone(), queues: 1, reconnect: 1 };
    let guest = boot_until(&image, dir.path(), disk, scenario, "PHASE1-DONE");
    // One queue, one writer, 4 KiB file system blocks: p1's second copy overwrote its blocks
    // and was completed to the guest before its ops (write-back); the guest's sync waited for
    // them, and the restart below finds p1 intact.
    assert!(metric(&d, "evs_volume_write_early_replies_total", "vm") > 0.0, "no write was completed early");
    let status = d.terminate();
    assert!(status.success(), "the daemon stopped cleanly: {status}");
    d.restart();
    assert!(sock.exists(), "the restarted daemon listens on the persisted socket again");
    let c = guest.join().unwrap().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.exit_status(), Some(0), "the guest wrote phase 2 after the restart\n{}", c.text);
    let s: Vec<(String, String)> = sums(&c);
    assert_eq!(s.len(), 2, "{}", c.text);
    // Both files are on the volume.
    let uri = d.attach("vm");
    let img = dir.path().join("readback.raw");
    tool("nbdcopy", &[&uri, img.to_str().unwrap()]);
    for (name, sum) in &s {
        let out_file = dir.path().join(format!("host-{name}"));
        run_tool(
            Command::new(require_tool("debugfs"))
                .arg("-R")
                .arg(format!("dump /{name} {}", out_file.display()))
                .arg(&img),
        );
        assert_eq!(&sha256(&out_file), sum, "file {name} after the restart");
    }
}

/// The benchmark of benches/scripts/vhost-bench.sh (ignored in the suite): fio inside one
/// guest with three disks, 4 KiB random read and write at QD32 over vhost-user (volume A), over
/// NBD (the same volume A) and on qemu's own file-backed virtio-blk (a raw file on the file
/// system of the daemon's data), interleaved rounds. Prints a table and the ratios; with
/// `EVS_BENCH_OUT=FILE` also writes them there.
#[test]
#[ignore = "benchmark: run benches/scripts/vhost-bench.sh"]
fn vm_bench_vhost_user_vs_nbd_vs_file() {
    let rounds: u32 = std::env::var("EVS_BENCH_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let runtime: u32 = std::env::var("EVS_BENCH_RUNTIME").ok().and_then(|s| s.parse().ok()).unwrap_or(8);
    let span_mib: u64 = 256;
    let image = GuestImage::prepare();
    let d = Daemon::start();
    d.evsctl_ok(&["volume", "create", "bench", "--size", "1G", "--tier", "unlimited"]);
    let sock = socket_of(&d, &["volume", "attach", "bench", "--protocol", "vhost-user"]);
    let uri = d.attach("bench");
    let raw = d.root().join("qemu-native.raw");
    std::fs::File::create(&raw).unwrap().set_len(1 << 30).unwrap();
    let disks = [("vhost-user", "vda"), ("nbd", "vdb"), ("qemu-file", "vdc")];
    let mut scen = String::from("set -e\n");
    // Precondition: the span is written on every disk, so reads hit data, not holes.
    for (_, dev) in disks {
        scen.push_str(&format!("dd if=/dev/zero of=/dev/{dev} bs=1M count={span_mib} oflag=direct 2>/dev/null\n"));
    }
    for round in 0..rounds {
        for rw in ["randread", "randwrite"] {
            // Rotate the order each round so no disk always runs first.
            for i in 0..disks.len() {
                let (name, dev) = disks[(i + round as usize) % disks.len()];
                scen.push_str(&format!(
                    "echo \"FIO {name} {rw} $(fio --name=b --filename=/dev/{dev} --direct=1 --ioengine=libaio \
                     --iodepth=32 --rw={rw} --bs=4k --size={span_mib}M --runtime={runtime} --time_based \
                     --group_reporting --output-format=terse --terse-version=3 | cut -d';' -f8,49)\"\n"
                ));
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let initrd = image.initramfs(dir.path(), &scen, &program_with_libs(&require_tool("fio")));
    let disk_list = vec![
        Disk::VhostUser { socket: sock, queues: 2, reconnect: 0 },
        Disk::Nbd { uri },
        Disk::File { path: raw.clone() },
    ];
    let accel = image.accel();
    let vm = Vm { image: &image, accel, smp: 2, disks: disk_list, initrd, mem_mib: 1024, allow_reboot: false };
    let c = vm.run(dir.path(), Duration::from_secs(3600)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.exit_status(), Some(0), "the benchmark scenario failed\n{}", c.text);
    // name rw -> IOPS per round
    let mut results: std::collections::BTreeMap<(String, String), Vec<f64>> = Default::default();
    for v in c.values("FIO") {
        let f: Vec<&str> = v.split_whitespace().collect();
        let (name, rw, vals) = (f[0], f[1], f.get(2).copied().unwrap_or_default());
        let mut it = vals.split(';').map(|x| x.parse::<f64>().unwrap_or(0.0));
        let (r, w) = (it.next().unwrap_or(0.0), it.next().unwrap_or(0.0));
        results.entry((name.to_string(), rw.to_string())).or_default().push(if rw == "randread" { r } else { w });
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let mut report = format!(
        "vhost-user vs NBD vs qemu file-backed virtio-blk: fio in the guest ({}), 4 KiB random, QD32, libaio, \
         O_DIRECT, {span_mib} MiB span, {rounds} interleaved rounds of {runtime} s, median IOPS\n",
        accel.name()
    );
    for rw in ["randread", "randwrite"] {
        let get = |n: &str| results.get(&(n.to_string(), rw.to_string())).map(|v| median(v)).unwrap_or(0.0);
        let (vu, nbd, file) = (get("vhost-user"), get("nbd"), get("qemu-file"));
        let rounds_of =
            |n: &str| format!("{:?}", results.get(&(n.to_string(), rw.to_string())).cloned().unwrap_or_default());
        report.push_str(&format!(
            "{rw:9}  vhost-user {vu:>9.0}  nbd {nbd:>9.0}  qemu-file {file:>9.0}  vhost/nbd {:.2}x  vhost/file {:.2}x\n",
            vu / nbd.max(1.0),
            vu / file.max(1.0)
        ));
        report.push_str(&format!(
            "           rounds: vhost-user {}  nbd {}  qemu-file {}\n",
            rounds_of("vhost-user"),
            rounds_of("nbd"),
            rounds_of("qemu-file")
        ));
        assert!(vu > 0.0 && nbd > 0.0 && file > 0.0, "every disk reported IOPS\n{report}\n{}", c.text);
    }
    println!("{report}");
    if let Ok(p) = std::env::var("EVS_BENCH_OUT") {
        std::fs::write(p, &report).unwrap();
    }
}

#[test]
fn vm_on_vhost_user_survives_a_guest_reset() {
    // First boot: a file system and a file, then a hard reboot (a machine reset: QEMU stops
    // and restarts the device's rings on the same connection). Second boot: the file is
    // there, and new I/O after the reset works.
    let image = GuestImage::prepare();
    let d = Daemon::start();
    d.evsctl_ok(&["volume", "create", "vm", "--size", "256M", "--tier", "unlimited"]);
    let sock = socket_of(&d, &["volume", "attach", "vm", "--protocol", "vhost-user"]);
    let scenario = "if mount -t ext4 /dev/vda /mnt 2>/dev/null && [ -f /mnt/boot1 ]; then\n\
                      set -e\n\
                      echo SECOND-BOOT\n\
                      echo \"SUM boot1 $(sha256sum /mnt/boot1 | cut -d' ' -f1)\"\n\
                      dd if=/dev/urandom of=/mnt/boot2 bs=65536 count=16 2>/dev/null\n\
                      sync\n\
                      echo \"SUM boot2 $(sha256sum /mnt/boot2 | cut -d' ' -f1)\"\n\
                      umount /mnt\n\
                      sync\n\
                    else\n\
                      set -e\n\
                      mke2fs -q -F /dev/vda\n\
                      mount -t ext4 /dev/vda /mnt\n\
                      dd if=/dev/urandom of=/mnt/boot1 bs=65536 count=16 2>/dev/null\n\
                      sync\n\
                      echo \"SUM boot1 $(sha256sum /mnt/boot1 | cut -d' ' -f1)\"\n\
                      umount /mnt\n\
                      sync\n\
                      echo FIRST-BOOT\n\
                      reboot -f\n\
                    fi\n";
    let dir = tempfile::tempdir().unwrap();
    let initrd = image.initramfs(dir.path(), scenario, &[]);
    let disk = Disk::VhostUser { socket: sock, queues: 2, reconnect: 0 };
    let vm = Vm {
        image: &image,
        accel: image.accel(),
        smp: 2,
        disks: vec![disk],
        initrd,
        mem_mib: GUEST_MEM_MIB,
        allow_reboot: true,
    };
    let c = vm.run(dir.path(), BOOT_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.exit_status(), Some(0), "the second boot's scenario\n{}", c.text);
    assert!(c.text.contains("FIRST-BOOT") && c.text.contains("SECOND-BOOT"), "two boots\n{}", c.text);
    let s = sums(&c);
    assert_eq!(s.len(), 3, "{}", c.text);
    assert_eq!(s[0], s[1], "the file written before the reset reads the same after it\n{}", c.text);
    assert_eq!(d.log().matches("vhost-user frontend connected").count(), 1, "one connection across the reset");
    let uri = d.attach("vm");
    let img = dir.path().join("readback.raw");
    tool("nbdcopy", &[&uri, img.to_str().unwrap()]);
    for (name, sum) in &s[1..] {
        let out_file = dir.path().join(format!("host-{name}"));
        run_tool(
            Command::new(require_tool("debugfs"))
                .arg("-R")
                .arg(format!("dump /{name} {}", out_file.display()))
                .arg(&img),
        );
        assert_eq!(&sha256(&out_file), sum, "file {name}");
    }
}
