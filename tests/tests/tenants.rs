//! Tenants, quotas, servers and the audit log, through the real `evsctl` against a real
//! daemon: isolation (another tenant's resources are NOT_FOUND, never revealed), quotas with
//! clear errors and no side effects, servers as sets of volumes (and group snapshots of them),
//! and the audit log recording who did what.

use std::process::Output;

use evs_tests::nbd_client::Error as NbdError;
use evs_tests::tools::format_output;
use evs_tests::{name_field, u64_field, volume_list, Daemon, NbdClient};
use serde_json::Value;

/// stderr of a failed evsctl call; panics if it succeeded.
fn refused(out: &Output, what: &str) -> String {
    assert!(!out.status.success(), "{what} should have failed\n{}", format_output(out));
    assert_eq!(out.status.code(), Some(1), "{what}: exit status\n{}", format_output(out));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn ok_json(out: Output, what: &str) -> Value {
    assert!(out.status.success(), "{what} failed\n{}", format_output(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{what}: not JSON: {e}\n{}", format_output(&out)))
}

fn new_tenant(d: &Daemon, name: &str, extra: &[&str]) -> String {
    let mut args = vec!["--output", "json", "tenant", "create", name];
    args.extend_from_slice(extra);
    let v = ok_json(d.evsctl(&args), "tenant create");
    assert_eq!(v["tenant"]["name"], name);
    let token = v["token"].as_str().expect("token").to_string();
    assert_eq!(token.len(), 64, "a 256-bit hex token");
    token
}

#[test]
fn another_tenant_gets_not_found_for_everything_of_mine() {
    let d = Daemon::start();
    let b = new_tenant(&d, "bob", &[]);
    // Admin's resources: a volume with data, a snapshot, an attachment, a server.
    let (uri, _) = d.create_volume("secret", "64M");
    let mut c = NbdClient::connect(&uri).unwrap();
    c.write(0, &[0x5a; 4096]).unwrap();
    c.flush().unwrap();
    drop(c);
    d.evsctl_ok(&["snapshot", "create", "secret", "s1"]);
    d.evsctl_ok(&["volume", "create", "other", "--size", "1M"]);
    d.evsctl_ok(&["server", "create", "vm", "--volumes", "other"]);

    // A job of admin's: the delete of a volume.
    d.evsctl_ok(&["volume", "create", "doomed", "--size", "1M"]);
    let job = d.evsctl_json(&["volume", "delete", "doomed"]);
    let job_id = u64_field(&job, "job_id").to_string();

    // Bob sees nothing.
    let v = ok_json(d.evsctl_as(&b, &["--output", "json", "job", "list"]), "bob: job list");
    assert_eq!(v["jobs"].as_array().map(Vec::len), Some(0), "bob lists admin's jobs: {v}");
    let v = ok_json(d.evsctl_as(&b, &["--output", "json", "volume", "list"]), "bob: volume list");
    assert!(volume_list(&v).is_empty(), "bob lists admin's volumes: {v}");
    let v = ok_json(d.evsctl_as(&b, &["--output", "json", "server", "list"]), "bob: server list");
    assert_eq!(v["servers"].as_array().map(Vec::len), Some(0), "{v}");

    let calls: Vec<Vec<&str>> = vec![
        vec!["volume", "show", "secret"],
        vec!["volume", "delete", "secret"],
        vec!["volume", "extend", "secret", "--size", "128M"],
        vec!["volume", "set-tier", "secret", "--tier", "high"],
        vec!["volume", "attach", "secret"],
        vec!["volume", "detach", "secret"],
        vec!["volume", "create", "mine", "--from-snapshot", "secret@s1"],
        vec!["snapshot", "create", "secret", "s2"],
        vec!["snapshot", "create-group", "g", "--volumes", "secret"],
        vec!["snapshot", "create-group", "g", "--server", "vm"],
        vec!["snapshot", "list", "secret"],
        vec!["snapshot", "show", "secret@s1"],
        vec!["snapshot", "delete", "secret@s1"],
        vec!["snapshot", "rollback", "secret@s1"],
        vec!["snapshot", "diff", "secret"],
        vec!["snapshot", "attach", "secret@s1"],
        vec!["snapshot", "detach", "secret@s1"],
        vec!["server", "show", "vm"],
        vec!["server", "delete", "vm"],
        vec!["server", "create", "vm2", "--volumes", "secret"],
        vec!["job", "show", &job_id],
        vec!["job", "cancel", &job_id],
        vec!["job", "wait", &job_id],
    ];
    for args in &calls {
        let err = refused(&d.evsctl_as(&b, args), &format!("bob: {}", args.join(" ")));
        assert!(err.contains("not found"), "bob: {}: {err}", args.join(" "));
    }
    // Bob may reuse the same names for his own resources: namespaces are per tenant.
    assert!(d.evsctl_as(&b, &["volume", "create", "secret", "--size", "1M"]).status.success());
    let mine = ok_json(d.evsctl_as(&b, &["--output", "json", "volume", "show", "secret"]), "bob: own volume");
    assert_eq!(u64_field(&mine, "size_bytes"), 1 << 20);

    // Nothing changed for admin.
    let v = d.show_volume("secret");
    assert_eq!(u64_field(&v, "size_bytes"), 64 << 20);
    assert_eq!(v["tier"], "gpssd");
    assert_eq!(d.evsctl_json(&["snapshot", "list", "secret"])["snapshots"].as_array().unwrap().len(), 1);

    // NBD: a guessed export name is refused like any unknown one.
    let mut guessed = evs_tests::NbdUri::parse(&uri).unwrap();
    guessed.export = "0".repeat(64);
    match NbdClient::connect(&guessed.to_uri()) {
        Err(NbdError::OptionRefused { .. }) | Err(NbdError::Closed) => {}
        Err(e) => panic!("a guessed export name gave an unexpected error: {e:?}"),
        Ok(_) => panic!("a guessed export name was served"),
    }
    // A detached token stops working on new connections.
    d.evsctl_ok(&["volume", "detach", "secret"]);
    assert!(NbdClient::connect(&uri).is_err(), "the revoked attach token still works");
    // A new attach gives a new token; the old one stays dead.
    let again = d.attach("secret");
    assert_ne!(again, uri);
    assert!(NbdClient::connect(&uri).is_err());
    assert_eq!(NbdClient::connect(&again).unwrap().read(0, 4096).unwrap(), vec![0x5a; 4096]);
}

#[test]
fn tenant_management_is_for_the_admin_and_tokens_die_with_the_tenant() {
    let d = Daemon::start();
    let t = new_tenant(&d, "carol", &[]);
    for args in [
        vec!["tenant", "create", "dave"],
        vec!["tenant", "list"],
        vec!["tenant", "delete", "carol"],
        vec!["tenant", "set-quota", "carol", "--max-volumes", "1000"],
        vec!["tenant", "show", "admin"],
        vec!["audit", "list"],
    ] {
        let err = refused(&d.evsctl_as(&t, &args), &format!("carol: {}", args.join(" ")));
        assert!(err.contains("permission denied") && err.contains("admin tenant only"), "{}: {err}", args.join(" "));
    }
    // A tenant sees its own record.
    let me = ok_json(d.evsctl_as(&t, &["--output", "json", "tenant", "show", "carol"]), "carol: tenant show");
    assert_eq!(me["name"], "carol");
    assert_eq!(u64_field(&me, "max_volumes"), 200, "the default quota");

    let err = refused(&d.evsctl(&["tenant", "create", "carol"]), "duplicate tenant");
    assert!(err.contains("already exists"), "{err}");
    let err = refused(&d.evsctl(&["tenant", "create", "bad/name"]), "bad tenant name");
    assert!(err.contains("invalid tenant name"), "{err}");
    let err = refused(&d.evsctl(&["tenant", "delete", "admin"]), "delete admin");
    assert!(err.contains("admin tenant cannot be deleted"), "{err}");
    let err = refused(&d.evsctl(&["tenant", "delete", "nobody"]), "delete unknown tenant");
    assert!(err.contains("not found"), "{err}");

    // A tenant with volumes cannot be deleted; without, it can, and its token dies.
    assert!(d.evsctl_as(&t, &["volume", "create", "v", "--size", "1M"]).status.success());
    let err = refused(&d.evsctl(&["tenant", "delete", "carol"]), "delete a tenant with volumes");
    assert!(err.contains("still owns 1 volume"), "{err}");
    assert!(d.evsctl_as(&t, &["volume", "delete", "v"]).status.success());
    d.evsctl_ok(&["tenant", "delete", "carol"]);
    let err = refused(&d.evsctl_as(&t, &["volume", "list"]), "a deleted tenant's token");
    assert!(err.contains("invalid token"), "{err}");
    let v = d.evsctl_json(&["tenant", "list"]);
    let names: Vec<&str> = v["tenants"].as_array().unwrap().iter().map(name_field).collect();
    assert_eq!(names, vec!["admin"]);
    // Only the hash of a token is in the catalog.
    let catalog = std::fs::read(d.data_dir().join("catalog.redb")).unwrap();
    assert!(!catalog.windows(t.len()).any(|w| w == t.as_bytes()), "a clear token is in the catalog");
}

#[test]
fn quotas_refuse_clearly_and_change_nothing() {
    let d = Daemon::start();
    let t = new_tenant(&d, "erin", &["--max-volumes", "2", "--max-capacity", "3G"]);
    let run = |args: &[&str]| d.evsctl_as(&t, args);
    assert!(run(&["volume", "create", "a", "--size", "1G"]).status.success());
    assert!(run(&["volume", "create", "b", "--size", "1G"]).status.success());
    let err = refused(&run(&["volume", "create", "c", "--size", "1M"]), "third volume");
    assert!(err.contains("quota exceeded") && err.contains("2 of its 2 volumes"), "{err}");
    let err = refused(&run(&["volume", "extend", "b", "--size", "3G"]), "extend past the capacity quota");
    assert!(err.contains("quota exceeded") && err.contains("2 GiB of its 3 GiB"), "{err}");
    // Nothing changed.
    let v = ok_json(run(&["--output", "json", "volume", "list"]), "list");
    let vols = volume_list(&v);
    assert_eq!(vols.len(), 2);
    assert!(vols.iter().all(|v| u64_field(v, "size_bytes") == 1 << 30), "{v}");
    // Up to the quota is fine.
    assert!(run(&["volume", "extend", "b", "--size", "2G"]).status.success());
    // A clone counts as a volume.
    assert!(run(&["snapshot", "create", "a", "s"]).status.success());
    let err = refused(&run(&["volume", "create", "c", "--from-snapshot", "a@s"]), "clone past the quota");
    assert!(err.contains("quota exceeded"), "{err}");
    // The admin raises the quota; the usage shows.
    let e = d.evsctl_json(&["tenant", "set-quota", "erin", "--max-volumes", "3", "--max-capacity", "5G"]);
    assert_eq!((u64_field(&e, "max_volumes"), u64_field(&e, "max_capacity_bytes")), (3, 5 << 30));
    assert_eq!((u64_field(&e, "volumes"), u64_field(&e, "capacity_bytes")), (2, 3 << 30));
    assert!(run(&["volume", "create", "c", "--from-snapshot", "a@s"]).status.success());
    let err = refused(&run(&["volume", "create", "d", "--size", "1M"]), "fourth volume");
    assert!(err.contains("3 of its 3 volumes"), "{err}");
    // Only the admin may use the unlimited tier.
    let err = refused(&run(&["volume", "set-tier", "a", "--tier", "unlimited"]), "unlimited tier");
    assert!(err.contains("reserved for the admin"), "{err}");
    // Nor by restoring a backup: refused when asked, before any job is queued.
    d.evsctl_ok(&["tenant", "set-quota", "erin", "--max-volumes", "5", "--max-capacity", "8G"]);
    let b = ok_json(run(&["--output", "json", "backup", "create", "a", "--wait"]), "backup");
    assert_eq!(b["job"]["state"], "succeeded", "{b}");
    let id = b["backup_id"].as_str().unwrap().to_string();
    let jobs = |what| ok_json(run(&["--output", "json", "job", "list"]), what)["jobs"].as_array().unwrap().len();
    let before = jobs("jobs before");
    for (args, what) in [
        (vec!["backup", "restore", &id, "--to", "r1", "--tier", "unlimited"], "restore to unlimited"),
        (vec!["volume", "create", "r2", "--from-backup", &id, "--tier", "unlimited"], "create from backup unlimited"),
    ] {
        let err = refused(&run(&args), what);
        assert!(err.contains("reserved for the admin"), "{what}: {err}");
    }
    assert_eq!(jobs("jobs after"), before, "a refused restore queued a job");
    let v = ok_json(run(&["--output", "json", "volume", "list"]), "list");
    assert_eq!(volume_list(&v).len(), 3, "{v}");
}

#[test]
fn servers_group_volumes_and_snapshot_them_together() {
    let d = Daemon::start();
    let (ua, _) = d.create_volume("disk-a", "16M");
    let (ub, _) = d.create_volume("disk-b", "16M");
    for (uri, byte) in [(&ua, 0xa1u8), (&ub, 0xb2)] {
        let mut c = NbdClient::connect(uri).unwrap();
        c.write(0, &[byte; 8192]).unwrap();
        c.flush().unwrap();
    }
    let s = d.evsctl_json(&["server", "create", "vm1", "--volumes", "disk-a,disk-b"]);
    assert_eq!(s["volumes"], serde_json::json!(["disk-a", "disk-b"]));
    assert_eq!(d.show_volume("disk-a")["server"], "vm1");
    let err = refused(&d.evsctl(&["server", "create", "vm2", "--volumes", "disk-b"]), "volume in two servers");
    assert!(err.contains("belongs to server \"vm1\""), "{err}");
    let err = refused(&d.evsctl(&["server", "create", "vm1", "--volumes", "disk-a"]), "duplicate server");
    assert!(err.contains("belongs to server") || err.contains("already exists"), "{err}");
    let err = refused(&d.evsctl(&["server", "create", "vm3", "--volumes", "nope"]), "unknown volume");
    assert!(err.contains("volume \"nope\" not found"), "{err}");
    let err = refused(&d.evsctl(&["server", "create", "vm3", "--volumes", "disk-a,disk-a"]), "listed twice");
    assert!(err.contains("each listed once"), "{err}");
    assert_eq!(d.evsctl_json(&["server", "list"])["servers"].as_array().unwrap().len(), 1);

    // A group snapshot of the server: both volumes at one instant.
    let g = d.evsctl_json(&["snapshot", "create-group", "g1", "--server", "vm1"]);
    let snaps = g["snapshots"].as_array().unwrap();
    assert_eq!(snaps.len(), 2);
    assert!(snaps.iter().all(|s| s["group"] == "g1"), "{g}");
    for (vol, byte) in [("disk-a", 0xa1u8), ("disk-b", 0xb2)] {
        let v = d.evsctl_json(&["snapshot", "attach", &format!("{vol}@g1")]);
        let mut c = NbdClient::connect(v["uri"].as_str().unwrap()).unwrap();
        assert_eq!(c.read(0, 8192).unwrap(), vec![byte; 8192], "{vol}@g1");
    }
    let err = refused(
        &d.evsctl(&["snapshot", "create-group", "g2", "--server", "vm9"]),
        "group snapshot of an unknown server",
    );
    assert!(err.contains("server \"vm9\" not found"), "{err}");

    // A volume in a server cannot be deleted; after the server is, it can.
    d.evsctl_ok(&["volume", "detach", "disk-a"]);
    let err = refused(&d.evsctl(&["volume", "delete", "disk-a"]), "delete a volume of a server");
    assert!(err.contains("belongs to server \"vm1\""), "{err}");
    d.evsctl_ok(&["server", "delete", "vm1"]);
    assert!(d.show_volume("disk-a")["server"].is_null());
    d.evsctl_ok(&["snapshot", "detach", "disk-a@g1"]);
    d.evsctl_ok(&["volume", "delete", "disk-a"]);
    let err = refused(&d.evsctl(&["server", "show", "vm1"]), "deleted server");
    assert!(err.contains("server \"vm1\" not found"), "{err}");
}

#[test]
fn the_audit_log_records_who_did_what_and_survives_a_restart() {
    let mut d = Daemon::start();
    d.evsctl_ok(&["volume", "create", "audited", "--size", "1M"]);
    d.evsctl_ok(&["volume", "delete", "audited"]);
    let _ = d.evsctl(&["volume", "delete", "audited"]); // NOT_FOUND, recorded too
    let _ = d.evsctl_as(&"f".repeat(64), &["volume", "create", "x", "--size", "1M"]); // unauthenticated
    d.evsctl_ok(&["volume", "list"]); // read-only: not recorded

    let check = |d: &Daemon| {
        let v = d.evsctl_json(&["audit", "list"]);
        let e: Vec<(String, String, String, String)> = v["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let s = |k: &str| e[k].as_str().unwrap().to_string();
                (s("tenant"), s("method"), s("target"), s("result"))
            })
            .collect();
        let want = [
            ("admin", "VolumeService/CreateVolume", "volume audited", "OK"),
            ("admin", "VolumeService/DeleteVolume", "volume audited", "OK"),
            ("admin", "VolumeService/DeleteVolume", "volume audited", "NOT_FOUND"),
            ("-", "VolumeService/CreateVolume", "volume x", "UNAUTHENTICATED"),
        ];
        let want: Vec<(String, String, String, String)> =
            want.iter().map(|(a, b, c, d)| (a.to_string(), b.to_string(), c.to_string(), d.to_string())).collect();
        assert_eq!(e, want, "{v}");
        let entries = v["entries"].as_array().unwrap();
        assert!(entries[2]["message"].as_str().unwrap().contains("not found"));
        assert!(entries.iter().all(|e| u64_field(e, "time_unix_ms") > 1_600_000_000_000));
        let only = d.evsctl_json(&["audit", "list", "--tenant", "-"]);
        assert_eq!(only["entries"].as_array().unwrap().len(), 1, "{only}");
    };
    check(&d);
    assert!(d.terminate().success());
    d.restart();
    check(&d);
}
