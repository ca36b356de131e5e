//! vhost-user attachments without a VM: the socket's life (attach, restart, detach), the
//! refusals, and that a vhost-user token is no NBD export name. The guest side is in vm.rs.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::PathBuf;
use std::process::Command;

use evs_tests::tools::{format_output, require_tool};
use evs_tests::Daemon;

fn vhost_attach(d: &Daemon, name: &str) -> serde_json::Value {
    d.evsctl_json(&["volume", "attach", name, "--protocol", "vhost-user"])
}

#[test]
fn vhost_user_socket_lives_from_attach_to_detach_across_a_restart() {
    let mut d = Daemon::start();
    d.evsctl_ok(&["volume", "create", "v", "--size", "64M"]);
    let v = vhost_attach(&d, "v");
    let sock = PathBuf::from(v["vhost_user_socket"].as_str().expect("a socket path"));
    assert_eq!(v["protocol"], "vhost-user");
    assert!(sock.starts_with(d.data_dir().join("vhost")), "under <data-dir>/vhost: {}", sock.display());
    let dir_mode = std::fs::metadata(sock.parent().unwrap()).unwrap().permissions().mode() & 0o777;
    assert_eq!(dir_mode, 0o700, "the socket directory is the daemon's");
    assert!(std::fs::symlink_metadata(&sock).unwrap().file_type().is_socket());
    assert_eq!(d.show_volume("v")["attached"], true);

    // The vhost-user token is not an NBD export name.
    let token = v["export_name"].as_str().unwrap().to_string();
    let bogus = format!("nbd://{}/{token}", d.nbd_addr);
    let out = Command::new(require_tool("nbdinfo")).arg(&bogus).output().unwrap();
    assert!(!out.status.success(), "NBD refuses a vhost-user token\n{}", format_output(&out));

    // NBD and vhost-user attachments side by side; each protocol keeps its own.
    let nbd = d.evsctl_json(&["volume", "attach", "v"]);
    assert_eq!(nbd["protocol"], "nbd");
    assert_ne!(nbd["export_name"], v["export_name"]);
    assert_eq!(vhost_attach(&d, "v")["vhost_user_socket"], v["vhost_user_socket"]);

    // A restart binds the persisted socket again.
    let status = d.terminate();
    assert!(status.success(), "clean stop: {status}");
    d.restart();
    assert!(std::fs::symlink_metadata(&sock).unwrap().file_type().is_socket(), "socket back after the restart");
    assert!(std::os::unix::net::UnixStream::connect(&sock).is_ok(), "the restarted daemon accepts on it");
    assert_eq!(vhost_attach(&d, "v")["vhost_user_socket"], v["vhost_user_socket"], "same socket after a restart");

    // Detach removes every attachment: the socket goes, reconnects fail.
    d.evsctl_ok(&["volume", "detach", "v"]);
    assert!(!sock.exists(), "socket removed at detach");
    assert!(std::os::unix::net::UnixStream::connect(&sock).is_err());
    assert_eq!(d.show_volume("v")["attached"], false);
    // And a restart does not bring it back.
    assert!(d.terminate().success());
    d.restart();
    assert!(!sock.exists(), "a detached socket stays gone after a restart");
}

#[test]
fn vhost_user_attach_refusals_change_nothing() {
    let d = Daemon::start();
    d.evsctl_ok(&["volume", "create", "v", "--size", "64M"]);
    // An unknown protocol is a usage error.
    let out = d.evsctl(&["volume", "attach", "v", "--protocol", "iscsi"]);
    assert_eq!(out.status.code(), Some(2), "{}", format_output(&out));
    // --unix is for NBD URIs: the server refuses the combination, naming it.
    let out = d.evsctl(&["volume", "attach", "v", "--unix", "--protocol", "vhost-user"]);
    assert_eq!(out.status.code(), Some(1), "{}", format_output(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--unix") && err.contains("vhost-user"), "{err}");
    assert_eq!(d.show_volume("v")["attached"], false, "a refused attach attaches nothing");
    assert!(std::fs::read_dir(d.data_dir().join("vhost")).unwrap().next().is_none(), "no socket was made");
    // A missing volume.
    let out = d.evsctl(&["volume", "attach", "nope", "--protocol", "vhost-user"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"), "{}", format_output(&out));
    // A snapshot export over vhost-user is read-only and its own socket.
    d.evsctl_ok(&["snapshot", "create", "v", "s"]);
    let s = d.evsctl_json(&["snapshot", "attach", "v@s", "--protocol", "vhost-user"]);
    let sock = PathBuf::from(s["vhost_user_socket"].as_str().unwrap());
    assert!(sock.exists());
    // Deleting an attached snapshot is refused; detaching it removes the socket.
    assert_eq!(d.evsctl(&["snapshot", "delete", "v@s"]).status.code(), Some(1));
    d.evsctl_ok(&["snapshot", "detach", "v@s"]);
    assert!(!sock.exists());
}

#[test]
fn a_connected_vhost_user_frontend_blocks_rollback_and_detach_ends_it() {
    use std::io::Read;
    use std::time::{Duration, Instant};
    let d = Daemon::start();
    d.evsctl_ok(&["volume", "create", "v", "--size", "64M"]);
    d.evsctl_ok(&["snapshot", "create", "v", "s"]);
    let v = vhost_attach(&d, "v");
    let sock = PathBuf::from(v["vhost_user_socket"].as_str().unwrap());
    // A frontend that connects (and says nothing yet) is a live connection of the volume.
    let mut conn = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = d.evsctl(&["snapshot", "rollback", "v@s"]);
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("vhost-user frontend"), "{err}");
            break;
        }
        assert!(Instant::now() < deadline, "rollback kept succeeding with a frontend connected");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Detach ends the connection: the frontend reads end-of-file.
    d.evsctl_ok(&["volume", "detach", "v"]);
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(conn.read(&mut buf).unwrap_or(0), 0, "the connection was closed by detach");
    assert!(!sock.exists());
    // With nothing connected the rollback goes through.
    d.evsctl_ok(&["snapshot", "rollback", "v@s"]);
}

#[test]
fn extend_tells_a_connected_frontend_and_the_config_space_grows() {
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;
    use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
    use vhost::vhost_user::{Frontend, VhostUserFrontend};
    use vhost::VhostBackend;
    const VIRTIO_F_VERSION_1: u64 = 1 << 32;

    let d = Daemon::start();
    d.evsctl_ok(&["volume", "create", "v", "--size", "64M"]);
    let v = vhost_attach(&d, "v");
    let sock = PathBuf::from(v["vhost_user_socket"].as_str().unwrap());
    let mut fe = Frontend::connect(&sock, 1).unwrap();
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    let proto = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    assert_ne!(features & proto, 0, "protocol features offered");
    let p = fe.get_protocol_features().unwrap();
    assert!(p.contains(VhostUserProtocolFeatures::BACKEND_REQ), "the backend channel is offered: {p:?}");
    fe.set_protocol_features(p & (VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::BACKEND_REQ)).unwrap();
    fe.set_features(features & (VIRTIO_F_VERSION_1 | proto)).unwrap();
    let (mut ours, theirs) = UnixStream::pair().unwrap();
    fe.set_backend_request_fd(&theirs).unwrap();
    drop(theirs);
    let mut capacity = || {
        let (_, cfg) = fe.get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0u8; 8]).unwrap();
        u64::from_le_bytes(cfg[..8].try_into().unwrap())
    };
    assert_eq!(capacity(), (64u64 << 20) / 512, "capacity in 512-byte sectors");

    d.evsctl_ok(&["volume", "extend", "v", "--size", "192M"]);
    // The notice: VHOST_USER_BACKEND_CONFIG_CHANGE_MSG (2), version 1, no payload.
    ours.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut msg = [0u8; 12];
    ours.read_exact(&mut msg).expect("a config-change message on the backend channel");
    assert_eq!(u32::from_le_bytes(msg[0..4].try_into().unwrap()), 2, "request: config change {msg:?}");
    assert_eq!(u32::from_le_bytes(msg[4..8].try_into().unwrap()) & 3, 1, "version 1 {msg:?}");
    assert_eq!(u32::from_le_bytes(msg[8..12].try_into().unwrap()), 0, "no payload {msg:?}");
    assert_eq!(capacity(), (192u64 << 20) / 512, "the config space has the new capacity");
    assert!(d.log().contains("config-change notice sent to vhost-user frontends"), "{}", d.log());

    // Extending to the same size changes nothing and sends nothing.
    d.evsctl_ok(&["volume", "extend", "v", "--size", "192M"]);
    ours.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    assert!(ours.read(&mut msg).is_err(), "no second notice for an unchanged size");
    assert_eq!(capacity(), (192u64 << 20) / 512);
}

/// Requests from a virtio-blk driver in this process, with buffers where a guest may put
/// them: reads land in guest memory directly when each range is inside one memory region, and
/// through a bounce buffer when a range crosses into the next region; both must return the
/// volume's bytes (holes as zeros), and a range outside guest memory fails the request alone.
#[test]
fn guest_buffers_anywhere_read_and_write_the_volume() {
    use evs_tests::util::Rng;
    use evs_tests::vhost_driver::{VhostDriver, FREE_FROM, STATUS_IOERR, STATUS_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
    use evs_tests::NbdClient;
    const MIB: u64 = 1 << 20;

    let d = Daemon::start();
    let (uri, _) = d.create_volume("v", "16M");
    // The first 4 MiB hold random data; the rest was never written (holes).
    let mut rng = Rng::new(7);
    let image = rng.bytes(4 * MIB as usize);
    let mut c = NbdClient::connect(&uri).unwrap();
    c.write(0, &image).unwrap();
    c.flush().unwrap();
    let v = vhost_attach(&d, "v");
    let sock = PathBuf::from(v["vhost_user_socket"].as_str().unwrap());
    // Two regions, adjacent in guest physical memory: [0, 1 MiB) and [1 MiB, 2 MiB).
    let mut drv = VhostDriver::connect(&sock, &[(0, MIB as usize), (MIB, MIB as usize)]);
    let want = |off: u64, len: usize| -> Vec<u8> {
        let mut w = vec![0u8; len];
        let end = (off as usize + len).min(image.len());
        if (off as usize) < end {
            w[..end - off as usize].copy_from_slice(&image[off as usize..end]);
        }
        w
    };
    // What, volume offset, guest data ranges (address, length).
    type Case = (&'static str, u64, &'static [(u64, u32)]);
    let cases: [Case; 6] = [
        ("inside the second region", 65536, &[(MIB + 0x8000, 8192)]),
        ("across the regions' boundary", 131072, &[(MIB - 4096, 8192)]),
        ("odd pieces in both regions", 200 * 4096, &[(FREE_FROM + 3, 1000), (MIB + 0x2_0001, 7192), (0x9000, 4096)]),
        ("data then holes", 4 * MIB - 4096, &[(MIB + 0x4_0000, 12288)]),
        ("holes across the boundary", 8 * MIB, &[(MIB - 512, 4096)]),
        ("holes only, in place", 12 * MIB, &[(0x2_0000, 65536)]),
    ];
    for (what, off, data) in cases {
        drv.fill(data, 0xee);
        let len: u32 = data.iter().map(|r| r.1).sum();
        let (status, used) = drv.request(VIRTIO_BLK_T_IN, off / 512, data);
        assert_eq!(status, STATUS_OK, "read {what}");
        assert_eq!(used, len + 1, "read {what}: used length is the data and the status byte");
        assert!(drv.gather(data) == want(off, len as usize), "read {what}: not the volume's bytes");
    }

    // A data range outside guest memory fails that request only.
    let (status, _) = drv.request(VIRTIO_BLK_T_IN, 0, &[(4 * MIB, 4096)]);
    assert_eq!(status, STATUS_IOERR, "a read into memory the guest does not have");
    let (status, _) = drv.request(VIRTIO_BLK_T_IN, 0, &[(MIB + 0x1000, 4096)]);
    assert_eq!(status, STATUS_OK);
    assert!(drv.gather(&[(MIB + 0x1000, 4096)]) == image[..4096], "the queue still reads after the refusal");

    // Writes from buffers in odd places read back over NBD.
    let pieces = [(MIB - 1024, 3072), (FREE_FROM, 5120)];
    let bytes = rng.bytes(8192);
    drv.scatter(&pieces, &bytes);
    let (status, _) = drv.request(VIRTIO_BLK_T_OUT, (6 * MIB) / 512, &pieces);
    assert_eq!(status, STATUS_OK, "write across the regions");
    let got = c.read(6 * MIB, 8192).unwrap();
    assert!(got == bytes, "the vhost-user write reads back over NBD");
}

/// A driver that did not negotiate FLUSH (this one) takes a completed write as stable: after a
/// kill -9 it is there. Discard and write-zeroes payloads the device cannot honour get UNSUPP
/// (unmap on a discard, unknown flags) or IOERR (longer than its one segment, refused before
/// it is read), change nothing, and the queue serves on.
#[test]
fn without_flush_a_completed_write_is_stable_and_bad_discards_change_nothing() {
    use evs_tests::util::Rng;
    use evs_tests::vhost_driver::{
        VhostDriver, FREE_FROM, STATUS_IOERR, STATUS_OK, STATUS_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_OUT,
        VIRTIO_BLK_T_WRITE_ZEROES,
    };
    use evs_tests::NbdClient;
    const MIB: u64 = 1 << 20;

    let mut d = Daemon::start();
    d.evsctl_ok(&["volume", "create", "v", "--size", "16M"]);
    let sock = PathBuf::from(vhost_attach(&d, "v")["vhost_user_socket"].as_str().unwrap().to_string());
    let mut drv = VhostDriver::connect(&sock, &[(0, 2 * MIB as usize)]);
    let mut rng = Rng::new(11);
    let buf = (FREE_FROM, 65536u32);
    let mut written = Vec::new();
    for i in 0..8u64 {
        let bytes = rng.bytes(buf.1 as usize);
        drv.scatter(&[buf], &bytes);
        let off = i * MIB + i * 4096;
        assert_eq!(drv.request(VIRTIO_BLK_T_OUT, off / 512, &[buf]).0, STATUS_OK, "write {i}");
        written.push((off, bytes));
    }
    let seg = |sectors: u32, flags: u32| {
        let mut b = [0u8; 16];
        b[8..12].copy_from_slice(&sectors.to_le_bytes());
        b[12..16].copy_from_slice(&flags.to_le_bytes());
        b
    };
    let at = (FREE_FROM, 16u32);
    for (ty, flags, what) in [
        (VIRTIO_BLK_T_DISCARD, 1, "unmap on a discard"),
        (VIRTIO_BLK_T_WRITE_ZEROES, 4, "an unknown write-zeroes flag"),
        (VIRTIO_BLK_T_DISCARD, 2, "an unknown discard flag"),
    ] {
        drv.scatter(&[at], &seg(128, flags));
        assert_eq!(drv.request(ty, 0, &[at]).0, STATUS_UNSUPP, "{what}");
    }
    // One segment followed by a megabyte the device must not copy.
    drv.scatter(&[at], &seg(128, 0));
    assert_eq!(drv.request(VIRTIO_BLK_T_DISCARD, 0, &[at, (MIB, MIB as u32)]).0, STATUS_IOERR);
    // The queue still works: a valid write-zeroes of the last written range.
    let last = written.pop().unwrap();
    drv.scatter(&[at], &{
        let mut s = seg(128, 0);
        s[0..8].copy_from_slice(&(last.0 / 512).to_le_bytes());
        s
    });
    assert_eq!(drv.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[at]).0, STATUS_OK);
    written.push((last.0, vec![0u8; 65536]));

    // No flush was ever sent: every completed write and the write-zeroes survive a kill -9.
    drop(drv);
    d.kill9();
    d.restart();
    let mut c = NbdClient::connect(&d.attach("v")).unwrap();
    for (off, bytes) in &written {
        assert!(c.read(*off, bytes.len() as u32).unwrap() == *bytes, "the 64 KiB at {off} after kill -9");
    }
}

/// CPU time (user + system) the process has used so far, in clock ticks (`/proc/PID/stat`).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn a_driver_with_an_impossible_avail_index_gets_no_spinning_queue_and_can_recover() {
    use evs_tests::vhost_driver::{VhostDriver, FREE_FROM, STATUS_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
    use evs_tests::NbdClient;

    let mut d = Daemon::start();
    d.evsctl_ok(&["volume", "create", "v", "--size", "16M"]);
    let sock = PathBuf::from(vhost_attach(&d, "v")["vhost_user_socket"].as_str().unwrap().to_string());
    let mut drv = VhostDriver::connect(&sock, &[(0, 1 << 20)]);
    let buf = (FREE_FROM, 4096u32);
    drv.fill(&[buf], 0xa7);
    assert_eq!(drv.request(VIRTIO_BLK_T_OUT, 8, &[buf]).0, STATUS_OK);

    // An index more than a ring ahead of what the device has taken: nothing can be popped.
    // The queue's thread must go back to sleep rather than look again and again.
    let ahead = drv.queue_size() + 7;
    drv.publish_bogus_avail(ahead);
    let pid = d.pid().expect("daemon pid");
    std::thread::sleep(std::time::Duration::from_millis(200));
    let hz = 100; // USER_HZ on Linux
    let before = cpu_ticks(pid);
    std::thread::sleep(std::time::Duration::from_secs(2));
    let used = cpu_ticks(pid) - before;
    // A thread spinning on the ring would have used about 2 s (200 ticks) of CPU.
    assert!(used < hz / 2, "the daemon used {used} ticks of CPU in 2 s after a bogus avail index");

    // The driver fixes its index: the queue serves it again, and the data is the volume's.
    drv.restore_avail();
    drv.fill(&[buf], 0);
    assert_eq!(drv.request(VIRTIO_BLK_T_IN, 8, &[buf]), (STATUS_OK, 4097));
    assert_eq!(drv.gather(&[buf]), vec![0xa7; 4096]);
    let mut c = NbdClient::connect(&d.attach("v")).unwrap();
    assert_eq!(c.read(4096, 4096).unwrap(), vec![0xa7; 4096]);
    d.assert_running();
}
