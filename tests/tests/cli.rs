//! `evsctl volume ...` against a real daemon: table and JSON output, errors (exit status,
//! one-line message, state unchanged), attach/detach tokens, delete destroying data.

use std::process::Output;

use serde_json::Value;

use evs_tests::tools::{format_output, output_with_timeout};
use evs_tests::util::{is_zero, Rng, GIB, MIB};
use evs_tests::{name_field, u64_field, volume_list, Daemon, NbdClient, NbdUri};

const TIB: u64 = 1024 * GIB;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The command failed the way SPEC.md says: non-zero exit, one line on stderr, and that line
/// mentions one of `keywords` (case-insensitive).
fn assert_cli_error(o: &Output, what: &str, keywords: &[&str]) {
    assert!(!o.status.success(), "{what}: succeeded but should fail\n{}", format_output(o));
    let err = stderr(o);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{what}: expected one line on stderr\n{}", format_output(o));
    let lower = lines[0].to_lowercase();
    assert!(
        keywords.iter().any(|k| lower.contains(&k.to_lowercase())),
        "{what}: the message does not name the problem (expected one of {keywords:?})\n{}",
        format_output(o)
    );
}

fn listed<'a>(vols: &'a [Value], name: &str) -> Option<&'a Value> {
    vols.iter().find(|v| name_field(v) == name)
}

/// Sorted `volume list --output json`, to compare the state before and after a failed command.
fn state(d: &Daemon) -> Vec<Value> {
    let mut v = d.list_volumes();
    v.sort_by(|a, b| name_field(a).cmp(name_field(b)));
    v
}

#[test]
fn volume_lifecycle_with_table_and_json_output() {
    let d = Daemon::start();
    assert!(d.list_volumes().is_empty(), "a new daemon has volumes: {:?}", d.list_volumes());

    // Sizes: suffixes and plain bytes.
    for (name, size, bytes) in [
        ("vol-512m", "512M", 512 * MIB),
        ("vol-10g", "10G", 10 * GIB),
        ("vol-1t", "1T", TIB),
        ("vol-bytes", "1048576", MIB),
    ] {
        let out = d.evsctl(&["volume", "create", name, "--size", size]);
        assert!(out.status.success(), "create {name} --size {size}\n{}", format_output(&out));
        let v = d.show_volume(name);
        assert_eq!(name_field(&v), name);
        assert_eq!(u64_field(&v, "size_bytes"), bytes, "size of {name} created with --size {size}: {v}");
        assert_eq!(u64_field(&v, "allocated_bytes"), 0, "a new thin volume has allocated bytes: {v}");
    }
    let vols = d.list_volumes();
    assert_eq!(vols.len(), 4, "{vols:?}");
    assert_eq!(u64_field(listed(&vols, "vol-10g").expect("vol-10g listed"), "size_bytes"), 10 * GIB);

    // Table output names the volumes.
    let table = d.evsctl_ok(&["volume", "list"]);
    for name in ["vol-512m", "vol-10g", "vol-1t", "vol-bytes"] {
        assert!(table.contains(name), "`volume list` table lacks {name}:\n{table}");
    }
    let show = d.evsctl_ok(&["volume", "show", "vol-10g"]);
    assert!(show.contains("vol-10g"), "`volume show` table lacks the name:\n{show}");

    // The JSON of create also parses.
    let created = d.evsctl_json(&["volume", "create", "vol-json", "--size", "64M"]);
    assert!(created.is_object(), "`volume create --output json` printed {created}");

    // Extend, online: a new connection sees the new size, an old one keeps working.
    let tcp = d.attach("vol-json");
    let u = NbdUri::parse(&tcp).expect("attach prints an NBD URI");
    assert_eq!(u.target, evs_tests::nbd_client::Target::Tcp(d.nbd_addr.to_string()), "attach URI {tcp}");
    assert!(u.export.len() >= 16, "attach token {:?} is too short to be unguessable", u.export);
    assert!(!u.export.contains("vol-json"), "attach token {:?} contains the volume name", u.export);
    let mut old = NbdClient::connect(&tcp).expect("connect");
    assert_eq!(old.size(), 64 * MIB);
    d.evsctl_ok(&["volume", "extend", "vol-json", "--size", "128M"]);
    assert_eq!(u64_field(&d.show_volume("vol-json"), "size_bytes"), 128 * MIB);
    let mut new = NbdClient::connect(&tcp).expect("connect after extend");
    assert_eq!(new.size(), 128 * MIB, "a connection made after extend sees the new size");
    new.write(100 * MIB, b"beyond the old end").expect("write in the extension");
    assert_eq!(new.read(100 * MIB, 18).expect("read"), b"beyond the old end");
    old.write(MIB, b"old connection").expect("old connection still writes");
    assert_eq!(new.read(MIB, 14).expect("read"), b"old connection");
    drop((old, new));

    // Attach over the unix socket (table output prints the URI too).
    let unix = d.attach_unix("vol-json");
    let u2 = NbdUri::parse(&unix).expect("attach --unix prints an NBD URI");
    assert_eq!(u2.target, evs_tests::nbd_client::Target::Unix(d.nbd_socket.clone()), "attach --unix URI {unix}");
    let mut c = NbdClient::connect(&unix).expect("connect over the unix socket");
    assert_eq!(c.read(MIB, 14).expect("read"), b"old connection");
    c.disconnect().expect("disconnect");
    let text = d.evsctl_ok(&["volume", "attach", "vol-512m"]);
    let line = text.lines().find(|l| l.contains("nbd://")).unwrap_or_else(|| panic!("attach printed no URI:\n{text}"));
    let uri = line.split_whitespace().find(|w| w.starts_with("nbd://")).unwrap();
    NbdClient::connect(uri).unwrap_or_else(|e| panic!("URI {uri} printed by attach: {e}"));

    // Detach, then delete: gone from list and from the table.
    d.evsctl_ok(&["volume", "detach", "vol-512m"]);
    d.evsctl_ok(&["volume", "delete", "vol-512m"]);
    let vols = d.list_volumes();
    assert!(listed(&vols, "vol-512m").is_none(), "deleted volume still listed: {vols:?}");
    assert!(!d.evsctl_ok(&["volume", "list"]).contains("vol-512m"));
    assert_eq!(vols.len(), 4);
}

#[test]
fn errors_are_reported_and_change_nothing() {
    let d = Daemon::start();
    let (tcp, _) = d.create_volume("err-attached", "1G");
    d.evsctl_ok(&["volume", "create", "err-plain", "--size", "512M"]);
    let mut c = NbdClient::connect(&tcp).expect("connect");
    c.write(0, b"precious").expect("write");
    c.flush().expect("flush");
    drop(c);
    let before = state(&d);

    let check_unchanged = |what: &str| {
        let after = state(&d);
        assert_eq!(after, before, "{what} changed the volumes");
    };

    // No token at all (no --token, no EVS_TOKEN, no ./evs-data/admin.token).
    let o = output_with_timeout(d.evsctl_bare().arg("--endpoint").arg(d.endpoint()).args(["volume", "list"]), TIMEOUT);
    assert_cli_error(&o, "no token", &["token", "auth", "credential", "permission"]);
    let o = output_with_timeout(
        d.evsctl_bare().arg("--endpoint").arg(d.endpoint()).args(["volume", "create", "sneaky", "--size", "1G"]),
        TIMEOUT,
    );
    assert_cli_error(&o, "create without token", &["token", "auth", "credential", "permission"]);
    check_unchanged("create without a token");

    // A wrong token.
    for args in
        [vec!["volume", "list"], vec!["volume", "delete", "err-plain"], vec!["volume", "create", "x", "--size", "1G"]]
    {
        let o = output_with_timeout(
            d.evsctl_bare().arg("--endpoint").arg(d.endpoint()).arg("--token").arg("not-the-token").args(&args),
            TIMEOUT,
        );
        assert_cli_error(&o, &format!("wrong token: {}", args.join(" ")), &["token", "auth", "denied", "permission"]);
    }
    check_unchanged("commands with a wrong token");

    // The environment variables work in place of the flags.
    let o = output_with_timeout(
        d.evsctl_bare()
            .env("EVS_ENDPOINT", d.endpoint())
            .env("EVS_TOKEN", d.token())
            .args(["--output", "json", "volume", "list"]),
        TIMEOUT,
    );
    assert!(o.status.success(), "EVS_ENDPOINT + EVS_TOKEN\n{}", format_output(&o));
    let v: Value = serde_json::from_slice(&o.stdout).expect("JSON");
    assert_eq!(volume_list(&v).len(), 2);

    // Nothing listening at the endpoint.
    let o = output_with_timeout(
        d.evsctl_bare().args(["--endpoint", "http://127.0.0.1:1", "--token", d.token(), "volume", "list"]),
        TIMEOUT,
    );
    assert_cli_error(
        &o,
        "unreachable endpoint",
        &["127.0.0.1:1", "connect", "unreachable", "refused", "endpoint", "transport"],
    );

    // Bad size strings.
    for size in ["12Q", "abc", "-1G", "1.5.5G", ""] {
        let arg = format!("--size={size}");
        let keywords: Vec<&str> = ["size", size].into_iter().filter(|k| !k.is_empty()).collect();
        let o = d.evsctl(&["volume", "create", "bad-size", &arg]);
        assert_cli_error(&o, &format!("create {arg}"), &keywords);
        let o = d.evsctl(&["volume", "extend", "err-plain", &arg]);
        assert_cli_error(&o, &format!("extend {arg}"), &keywords);
    }
    check_unchanged("bad sizes");

    // Usage errors: exit status 2, one line naming the problem.
    for (args, keyword) in [
        (vec!["volume", "create", "no-size"], "--size"),
        (vec!["volume", "list", "--bogus"], "--bogus"),
        (vec!["volume", "frobnicate"], "frobnicate"),
        (vec!["volume", "create", "two", "--from-snapshot", "a@b", "--from-backup", "bk-1"], "cannot be used with"),
        (vec!["--output", "yaml", "volume", "list"], "yaml"),
        (vec!["volume"], "evsctl volume needs a subcommand: create, list"),
        (vec!["dr", "drill"], "evsctl dr drill needs a subcommand"),
    ] {
        let o = d.evsctl(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}\n{}", format_output(&o));
        assert_cli_error(&o, &args.join(" "), &[keyword]);
    }
    check_unchanged("usage errors");

    // Duplicate name.
    let o = d.evsctl(&["volume", "create", "err-plain", "--size", "2G"]);
    assert_cli_error(&o, "duplicate name", &["exist", "err-plain", "duplicate", "already"]);
    check_unchanged("a duplicate create");

    // Shrinking.
    let o = d.evsctl(&["volume", "extend", "err-plain", "--size", "256M"]);
    assert_cli_error(&o, "extend to a smaller size", &["shrink", "smaller", "size", "less"]);
    check_unchanged("a shrinking extend");

    // Deleting an attached volume.
    let o = d.evsctl(&["volume", "delete", "err-attached"]);
    assert_cli_error(&o, "delete of an attached volume", &["attach"]);
    check_unchanged("delete of an attached volume");
    let mut c = NbdClient::connect(&tcp).expect("the attachment survives a refused delete");
    assert_eq!(c.read(0, 8).expect("read"), b"precious");
    c.disconnect().expect("disconnect");

    // Unknown volume, every subcommand.
    for args in [
        vec!["volume", "show", "no-such-volume"],
        vec!["volume", "delete", "no-such-volume"],
        vec!["volume", "extend", "no-such-volume", "--size", "2G"],
        vec!["volume", "attach", "no-such-volume"],
        vec!["volume", "detach", "no-such-volume"],
    ] {
        let o = d.evsctl(&args);
        assert_cli_error(&o, &args.join(" "), &["no-such-volume", "not found", "no such", "unknown", "does not exist"]);
        let mut json = vec!["--output", "json"];
        json.extend_from_slice(&args);
        let o = d.evsctl(&json);
        assert!(!o.status.success(), "{} succeeded\n{}", json.join(" "), format_output(&o));
    }
    check_unchanged("commands on an unknown volume");
}

const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// After detach the URI no longer gets through the handshake, over TCP or the unix socket; a
/// new attach gives a new token that works while the old one stays dead.
#[test]
fn detach_revokes_the_attach_uri() {
    let d = Daemon::start();
    let (tcp, unix) = d.create_volume("detach-me", "32M");
    let mut c = NbdClient::connect(&tcp).expect("connect before detach");
    c.write(4096, b"still here").expect("write");
    c.flush().expect("flush");
    c.disconnect().expect("disconnect");
    NbdClient::connect(&unix).expect("unix connect before detach").disconnect().expect("disconnect");

    d.evsctl_ok(&["volume", "detach", "detach-me"]);
    for uri in [&tcp, &unix] {
        match NbdClient::connect(uri) {
            Ok(_) => panic!("{uri} still connects after detach"),
            Err(e) => eprintln!("{uri} after detach: {e} (expected)"),
        }
    }
    // The volume itself is still there, unattached; attach again.
    let v = d.show_volume("detach-me");
    assert_eq!(u64_field(&v, "size_bytes"), 32 * MIB);
    let tcp2 = d.attach("detach-me");
    assert_ne!(
        NbdUri::parse(&tcp2).unwrap().export,
        NbdUri::parse(&tcp).unwrap().export,
        "a new attach reuses the revoked token"
    );
    let mut c = NbdClient::connect(&tcp2).expect("connect with the new URI");
    assert_eq!(c.read(4096, 10).expect("read"), b"still here");
    c.disconnect().expect("disconnect");
    assert!(NbdClient::connect(&tcp).is_err(), "the revoked URI works again after a new attach");
}

/// Delete destroys the data: a new volume of the same name (and size) reads all zeros and has
/// nothing allocated.
#[test]
fn delete_then_create_same_name_reads_zeros() {
    let d = Daemon::start();
    let size = 32 * MIB;
    let (tcp, _) = d.create_volume("reuse", "32M");
    let mut c = NbdClient::connect(&tcp).expect("connect");
    let mut rng = Rng::new(3);
    for i in 0..32u64 {
        c.write(i * MIB + rng.below(MIB / 2), &rng.bytes(200_000)).expect("write");
    }
    c.flush().expect("flush");
    c.disconnect().expect("disconnect");
    assert!(u64_field(&d.show_volume("reuse"), "allocated_bytes") > 0);
    d.evsctl_ok(&["volume", "detach", "reuse"]);
    d.evsctl_ok(&["volume", "delete", "reuse"]);
    assert!(listed(&d.list_volumes(), "reuse").is_none());

    let (tcp2, _) = d.create_volume("reuse", "32M");
    assert_eq!(u64_field(&d.show_volume("reuse"), "allocated_bytes"), 0, "the new volume has allocated bytes");
    let mut c = NbdClient::connect(&tcp2).expect("connect to the new volume");
    assert_eq!(c.size(), size);
    let all = c.read_all(0, size, 4 << 20).expect("read");
    if let Some(i) = all.iter().position(|&b| b != 0) {
        panic!("the new volume of the same name shows old data at byte {i}");
    }
    assert!(is_zero(&all));
    c.disconnect().expect("disconnect");
}
