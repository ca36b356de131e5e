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
