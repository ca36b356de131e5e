//! Security properties, end to end against real daemons:
//!
//! * tenant isolation across every RPC: tenant alice owns one of each resource (volume with
//!   data, snapshot and its export, server, backup, policy, job, DR group with a protected
//!   server on a second daemon); tenant bob calls every RPC against them. Each answer must be
//!   exactly the answer for a name that does not exist (code and message, the name aside), or
//!   PERMISSION_DENIED for the admin's calls; nothing of alice's changes. The RPCs come from
//!   the served descriptor set: a new RPC without a row fails the test.
//! * attach tokens: 256 random bits, unguessable, never reused; a random token, a detached
//!   one, a deleted volume's and a detached snapshot export's are refused on new connections,
//!   and detach closes the connections that use it.
//! * deleted data is gone: a volume written full of a pattern, deleted; new volumes of the
//!   same size on the same store read as zeros everywhere.
//! * a backup encryption key never reaches the daemon's log (at debug level), the audit log,
//!   the catalog, the object store or an error message.
//! * replication between two daemons over TLS (https API endpoints, one CA), and a peer whose
//!   certificate another CA signed is refused.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use evs_tests::call;
use evs_tests::grpc::{all_methods, pb, req, Auth, Call, Grpc};
use evs_tests::nbd_client::Error as NbdError;
use evs_tests::util::{is_zero, Rng, MIB};
use evs_tests::{Daemon, DaemonOptions, NbdClient, NbdUri};
use pb::audit_service_client::AuditServiceClient as AuditC;
use pb::backup_service_client::BackupServiceClient as BackupC;
use pb::dr_service_client::DrServiceClient as DrC;
use pb::job_service_client::JobServiceClient as JobC;
use pb::policy_service_client::PolicyServiceClient as PolicyC;
use pb::replication_service_client::ReplicationServiceClient as ReplC;
use pb::server_service_client::ServerServiceClient as ServerC;
use pb::snapshot_service_client::SnapshotServiceClient as SnapC;
use pb::tenant_service_client::TenantServiceClient as TenantC;
use pb::volume_service_client::VolumeServiceClient as VolC;
use serde_json::Value;
use tonic::Code;

fn new_tenant(d: &Daemon, name: &str) -> String {
    let v = d.evsctl_json(&["tenant", "create", name]);
    v["token"].as_str().expect("a token").to_string()
}

fn as_json(d: &Daemon, token: &str, args: &[&str]) -> Value {
    let mut full = vec!["--output", "json"];
    full.extend_from_slice(args);
    let out = d.evsctl_as(token, &full);
    assert!(out.status.success(), "evsctl {}: {}", args.join(" "), evs_tests::tools::format_output(&out));
    serde_json::from_slice(&out.stdout).expect("JSON")
}

/// What bob's call must get, compared with the same call naming something that does not exist.
enum Expect {
    /// The same code and message as for the nonexistent name (which must fail).
    SameAsMissing,
    /// PERMISSION_DENIED (the admin's calls).
    Denied,
}

/// `(method, what, call naming alice's resource, call naming nothing, the two names)`.
struct Row {
    method: &'static str,
    real: Call,
    fake: Call,
    names: (String, String),
    expect: Expect,
}

/// Everything of alice's, as text, on one daemon.
fn alice_state(g: &Grpc, alice: &Auth) -> String {
    use pb::*;
    let ch = g.channel();
    g.block_on(async {
        let mut out = String::new();
        let mut vols =
            VolC::new(ch.clone()).list_volumes(req(alice, ListVolumesRequest {})).await.unwrap().into_inner();
        for v in &mut vols.volumes {
            v.qos = None;
        }
        out += &format!("{vols:?}\n");
        for v in &vols.volumes {
            let s = SnapC::new(ch.clone())
                .list_snapshots(req(alice, ListSnapshotsRequest { volume: v.name.clone() }))
                .await;
            out += &format!("{:?}\n", s.unwrap().into_inner());
        }
        out += &format!(
            "{:?}\n",
            ServerC::new(ch.clone()).list_servers(req(alice, ListServersRequest {})).await.unwrap().into_inner()
        );
        out += &format!(
            "{:?}\n",
            PolicyC::new(ch.clone()).list_policies(req(alice, ListPoliciesRequest {})).await.unwrap().into_inner()
        );
        out += &format!(
            "{:?}\n",
            JobC::new(ch.clone()).list_jobs(req(alice, ListJobsRequest {})).await.unwrap().into_inner()
        );
        out += &format!(
            "{:?}\n",
            BackupC::new(ch.clone())
                .list_backups(req(alice, ListBackupsRequest::default()))
                .await
                .unwrap()
                .into_inner()
        );
        let mut groups = DrC::new(ch.clone()).list_groups(req(alice, ListGroupsRequest {})).await.unwrap().into_inner();
        for g in &mut groups.groups {
            // Replication goes on meanwhile: keep what bob could have changed.
            *g = Group {
                name: g.name.clone(),
                role: g.role.clone(),
                peer_endpoint: g.peer_endpoint.clone(),
                enabled: g.enabled,
                servers: g.servers.clone(),
                drill: g.drill,
                interval_seconds: g.interval_seconds,
                ..Default::default()
            };
        }
        out += &format!("{groups:?}\n");
        out += &format!(
            "{:?}\n",
            TenantC::new(ch.clone())
                .get_tenant(req(alice, GetTenantRequest { name: "alice".into() }))
                .await
                .unwrap()
                .into_inner()
        );
        out
    })
}

#[test]
fn another_tenant_gets_exactly_not_found_from_every_rpc_and_changes_nothing() {
    let d1 = Daemon::start_with(DaemonOptions { az: Some("az1".into()), ..Default::default() });
    let d2 = Daemon::start_with(DaemonOptions { az: Some("az2".into()), ..Default::default() });
    let alice = new_tenant(&d1, "alice");
    let alice2 = new_tenant(&d2, "alice");
    let bob = new_tenant(&d1, "bob");
    let run = |args: &[&str]| as_json(&d1, &alice, args);

    // Alice's resources.
    run(&["volume", "create", "alice-vol", "--size", "8M"]);
    let uri = run(&["volume", "attach", "alice-vol"])["uri"].as_str().unwrap().to_string();
    let pattern = Rng::new(7).bytes(2 * MIB as usize);
    {
        let mut c = NbdClient::connect(&uri).unwrap();
        c.write(MIB, &pattern).unwrap();
        c.flush().unwrap();
    }
    run(&["snapshot", "create", "alice-vol", "alice-snap"]);
    let snap_uri = run(&["snapshot", "attach", "alice-vol@alice-snap"])["uri"].as_str().unwrap().to_string();
    run(&["volume", "create", "alice-disk", "--size", "4M"]);
    run(&["server", "create", "alice-srv", "--volumes", "alice-disk"]);
    run(&["backup", "set-key", "--key-hex", &"a1".repeat(32)]);
    let b = run(&["backup", "create", "alice-vol", "--wait"]);
    assert_eq!(b["job"]["state"], "succeeded", "{b}");
    let backup_id = b["backup_id"].as_str().unwrap().to_string();
    let job_id = b["job"]["id"].as_u64().unwrap();
    run(&["policy", "create", "alice-pol", "--schedule", "0 0 1 1 *", "--keep-last", "2"]);
    run(&["policy", "bind", "alice-pol", "--volume", "alice-vol"]);
    let target = format!("http://{}", d2.api_addr);
    run(&["dr", "group", "create", "alice-grp", "--target", &target, "--target-token", &alice2, "--target-az", "az2"]);
    let p = run(&["dr", "protect", "alice-grp", "--server", "alice-srv", "--wait"]);
    assert_eq!(p["job"]["state"], "succeeded", "{p}");
    // Bob has a volume of his own to point at alice's things from.
    assert!(d1.evsctl_as(&bob, &["volume", "create", "bob-vol", "--size", "1M"]).status.success());
    let key_file = d1.data_dir().join("keys/alice.key");
    let alice_key = std::fs::read(&key_file).expect("alice's key file");

    let g1 = Grpc::connect(&d1);
    let g2 = Grpc::connect(&d2);
    let (a1, a2, b1) = (Auth::bearer(&alice), Auth::bearer(&alice2), Auth::bearer(&bob));
    let before = (alice_state(&g1, &a1), alice_state(&g2, &a2));

    // ---- the matrix ----
    use pb::*;
    let s = |x: &str| x.to_string();
    let mut rows: Vec<Row> = Vec::new();
    // A row whose two calls differ in one name: `$real` and `$fake` fill `$n` in the request.
    macro_rules! row {
        ($method:literal, $expect:expr, $names:expr, |$n:ident| $client:ident . $rpc:ident ( $m:expr )) => {{
            let (r, f): (String, String) = ($names.0.to_string(), $names.1.to_string());
            let real = {
                let $n = r.clone();
                call!($client.$rpc($m))
            };
            let fake = {
                let $n = f.clone();
                call!($client.$rpc($m))
            };
            rows.push(Row { method: $method, real, fake, names: (r, f), expect: $expect });
        }};
    }
    use Expect::{Denied, SameAsMissing as Same};
    let vol = ("alice-vol", "nobody-vl");
    row!("VolumeService/GetVolume", Same, vol, |n| VolC.get_volume(GetVolumeRequest { name: n }));
    row!("VolumeService/DeleteVolume", Same, vol, |n| VolC.delete_volume(DeleteVolumeRequest { name: n }));
    row!("VolumeService/ExtendVolume", Same, vol, |n| VolC
        .extend_volume(ExtendVolumeRequest { name: n, size_bytes: 16 * MIB }));
    row!("VolumeService/SetVolumeTier", Same, vol, |n| VolC
        .set_volume_tier(SetVolumeTierRequest { name: n, tier: s("high") }));
    row!("VolumeService/AttachVolume", Same, vol, |n| VolC
        .attach_volume(AttachVolumeRequest { name: n, ..Default::default() }));
    row!("VolumeService/DetachVolume", Same, vol, |n| VolC.detach_volume(DetachVolumeRequest { name: n }));
    row!("VolumeService/CreateVolume", Same, vol, |n| VolC.create_volume(CreateVolumeRequest {
        name: s("bob-clone"),
        from_snapshot: format!("{n}@alice-snap"),
        ..Default::default()
    }));
    row!("SnapshotService/CreateSnapshot", Same, vol, |n| SnapC
        .create_snapshot(CreateSnapshotRequest { volume: n, name: s("bob-s") }));
    row!("SnapshotService/CreateGroupSnapshot", Same, vol, |n| SnapC.create_group_snapshot(
        CreateGroupSnapshotRequest { name: s("bob-g"), volumes: vec![s("bob-vol"), n], server: String::new() }
    ));
    row!("SnapshotService/ListSnapshots", Same, vol, |n| SnapC.list_snapshots(ListSnapshotsRequest { volume: n }));
    row!("SnapshotService/GetSnapshot", Same, vol, |n| SnapC
        .get_snapshot(GetSnapshotRequest { volume: n, name: s("alice-snap") }));
    row!("SnapshotService/DeleteSnapshot", Same, vol, |n| SnapC
        .delete_snapshot(DeleteSnapshotRequest { volume: n, name: s("alice-snap") }));
    row!("SnapshotService/RollbackSnapshot", Same, vol, |n| SnapC
        .rollback_snapshot(RollbackSnapshotRequest { volume: n, name: s("alice-snap") }));
    row!("SnapshotService/DiffSnapshots", Same, vol, |n| SnapC.diff_snapshots(DiffSnapshotsRequest {
        volume: n,
        from: String::new(),
        to: s("alice-snap")
    }));
    row!("SnapshotService/AttachSnapshot", Same, vol, |n| SnapC.attach_snapshot(AttachSnapshotRequest {
        volume: n,
        name: s("alice-snap"),
        ..Default::default()
    }));
    row!("SnapshotService/DetachSnapshot", Same, vol, |n| SnapC
        .detach_snapshot(DetachSnapshotRequest { volume: n, name: s("alice-snap") }));
    let srv = ("alice-srv", "nobod-sv");
    row!("ServerService/GetServer", Same, srv, |n| ServerC.get_server(GetServerRequest { name: n }));
    row!("ServerService/DeleteServer", Same, srv, |n| ServerC.delete_server(DeleteServerRequest { name: n }));
    row!("ServerService/CreateServer", Same, vol, |n| ServerC
        .create_server(CreateServerRequest { name: s("bob-srv"), volumes: vec![s("bob-vol"), n] }));
    row!("SnapshotService/CreateGroupSnapshot", Same, srv, |n| SnapC
        .create_group_snapshot(CreateGroupSnapshotRequest { name: s("bob-g"), volumes: vec![], server: n }));
    let fake_backup = {
        let mut id = backup_id.clone();
        let last = id.pop().unwrap();
        id.push(if last == '0' { '1' } else { '0' });
        id
    };
    let bk = (backup_id.clone(), fake_backup);
    row!("BackupService/GetBackup", Same, bk, |n| BackupC.get_backup(GetBackupRequest { id: n }));
    row!("BackupService/DeleteBackup", Same, bk, |n| BackupC.delete_backup(DeleteBackupRequest { id: n }));
    row!("BackupService/VerifyBackup", Same, bk, |n| BackupC.verify_backup(VerifyBackupRequest { id: n }));
    row!("BackupService/RestoreBackup", Same, bk, |n| BackupC.restore_backup(RestoreBackupRequest {
        id: n,
        to: s("bob-restored"),
        ..Default::default()
    }));
    row!("BackupService/CreateBackup", Same, vol, |n| BackupC
        .create_backup(CreateBackupRequest { volume: n, ..Default::default() }));
    row!("BackupService/CreateServerBackup", Same, srv, |n| BackupC
        .create_server_backup(CreateServerBackupRequest { server: n, name: String::new() }));
    let pol = ("alice-pol", "nobody-pl");
    row!("PolicyService/DeletePolicy", Same, pol, |n| PolicyC.delete_policy(DeletePolicyRequest { name: n }));
    row!("PolicyService/RunPolicy", Same, pol, |n| PolicyC.run_policy(RunPolicyRequest { name: n }));
    row!("PolicyService/BindPolicy", Same, pol, |n| PolicyC.bind_policy(BindPolicyRequest {
        name: n,
        volume: s("bob-vol"),
        server: String::new()
    }));
    row!("PolicyService/UnbindPolicy", Same, pol, |n| PolicyC.unbind_policy(UnbindPolicyRequest {
        name: n,
        volume: s("bob-vol"),
        server: String::new()
    }));
    let job = (job_id.to_string(), (job_id + 1_000_000).to_string());
    row!("JobService/GetJob", Same, job, |n| JobC.get_job(GetJobRequest { id: n.parse().unwrap() }));
    row!("JobService/CancelJob", Same, job, |n| JobC.cancel_job(CancelJobRequest { id: n.parse().unwrap() }));
    let grp = ("alice-grp", "nobody-gp");
    row!("DrService/GetGroup", Same, grp, |n| DrC.get_group(GetGroupRequest { name: n }));
    row!("DrService/DeleteGroup", Same, grp, |n| DrC.delete_group(DeleteGroupRequest { name: n }));
    row!("DrService/Protect", Same, grp, |n| DrC.protect(ProtectRequest { group: n, server: s("alice-srv") }));
    row!("DrService/Unprotect", Same, grp, |n| DrC.unprotect(UnprotectRequest { group: n, server: s("alice-srv") }));
    row!("DrService/Enable", Same, grp, |n| DrC.enable(EnableRequest { group: n }));
    row!("DrService/Disable", Same, grp, |n| DrC.disable(DisableRequest { group: n }));
    row!("DrService/Status", Same, grp, |n| DrC.status(StatusRequest { group: n }));
    row!("DrService/StartDrill", Same, grp, |n| DrC.start_drill(StartDrillRequest { group: n }));
    row!("DrService/StopDrill", Same, grp, |n| DrC.stop_drill(StopDrillRequest { group: n }));
    row!("DrService/Switchover", Same, grp, |n| DrC.switchover(SwitchoverRequest { group: n }));
    row!("DrService/Failover", Same, grp, |n| DrC.failover(FailoverRequest { group: n }));
    row!("DrService/Reprotect", Same, grp, |n| DrC.reprotect(ReprotectRequest { group: n }));
    // A group of bob's under alice's name: it reaches the target with a token the target does
    // not know; the answer must not depend on alice having such a group.
    row!("DrService/CreateGroup", Same, grp, |n| DrC.create_group(CreateGroupRequest {
        name: n,
        target_endpoint: target.clone(),
        target_token: "0".repeat(64),
        ..Default::default()
    }));
    row!("ReplicationService/RegisterGroup", Same, ("alice-grp", "nobody-gp"), |n| ReplC
        .register_group(RegisterGroupRequest { name: n, secret: s("zz"), ..Default::default() }));
    row!("TenantService/GetTenant", Denied, ("alice", "nobod"), |n| TenantC.get_tenant(GetTenantRequest { name: n }));
    row!("TenantService/DeleteTenant", Denied, ("alice", "nobod"), |n| TenantC
        .delete_tenant(DeleteTenantRequest { name: n }));
    row!("TenantService/SetTenantQuota", Denied, ("alice", "nobod"), |n| TenantC
        .set_tenant_quota(SetTenantQuotaRequest { name: n, max_volumes: Some(1), max_capacity_bytes: None }));
    row!("TenantService/CreateTenant", Denied, ("alice", "nobod"), |n| TenantC
        .create_tenant(CreateTenantRequest { name: n, ..Default::default() }));
    row!("AuditService/ListAudit", Denied, ("alice", "nobod"), |n| AuditC
        .list_audit(ListAuditRequest { tenant: n, limit: 0 }));
    row!("TenantService/ListTenants", Denied, ("", ""), |n| TenantC.list_tenants({
        let _ = n;
        ListTenantsRequest {}
    }));
    row!("BackupService/CollectGarbage", Denied, ("", ""), |n| BackupC.collect_garbage({
        let _ = n;
        CollectGarbageRequest {}
    }));

    let mut failures = Vec::new();
    for r in &rows {
        let label = format!("{} ({} vs {})", r.method, r.names.0, r.names.1);
        let got = g1.block_on((r.real)(g1.channel(), b1.clone()));
        let missing = g1.block_on((r.fake)(g1.channel(), b1.clone()));
        match (&got, &r.expect) {
            (Ok(()), _) => failures.push(format!("{label}: bob's call on alice's resource succeeded")),
            (Err(e), Expect::Denied) => {
                if e.code() != Code::PermissionDenied || !e.message().contains("admin tenant only") {
                    failures.push(format!("{label}: {:?} {:?}, expected PERMISSION_DENIED", e.code(), e.message()));
                }
            }
            (Err(e), Expect::SameAsMissing) => match &missing {
                Ok(()) => failures.push(format!("{label}: the call naming nothing succeeded")),
                Err(m) => {
                    let norm = |msg: &str, name: &str| {
                        if name.is_empty() {
                            msg.to_string()
                        } else {
                            msg.replace(name, "<NAME>")
                        }
                    };
                    let (a, b) = (norm(e.message(), &r.names.0), norm(m.message(), &r.names.1));
                    if e.code() != m.code() || a != b {
                        failures.push(format!(
                            "{label}: alice's resource gives {:?} {a:?}, a missing one {:?} {b:?}",
                            e.code(),
                            m.code()
                        ));
                    }
                    // NOT_FOUND, except where the request fails before any look-up for both
                    // (bob's own group registration with a bad secret; a group of bob's that
                    // the target refuses).
                    let early = matches!(r.method, "DrService/CreateGroup" | "ReplicationService/RegisterGroup");
                    if e.code() != Code::NotFound && !early {
                        failures.push(format!("{label}: {:?} {:?}, expected NOT_FOUND", e.code(), e.message()));
                    }
                }
            },
        }
    }

    // Calls with nothing to name: bob's answers hold nothing of alice's.
    let lists = g1.block_on(async {
        let ch = g1.channel();
        vec![
            (
                "VolumeService/ListVolumes",
                format!("{:?}", VolC::new(ch.clone()).list_volumes(req(&b1, ListVolumesRequest {})).await),
            ),
            (
                "ServerService/ListServers",
                format!("{:?}", ServerC::new(ch.clone()).list_servers(req(&b1, ListServersRequest {})).await),
            ),
            (
                "JobService/ListJobs",
                format!("{:?}", JobC::new(ch.clone()).list_jobs(req(&b1, ListJobsRequest {})).await),
            ),
            (
                "PolicyService/ListPolicies",
                format!("{:?}", PolicyC::new(ch.clone()).list_policies(req(&b1, ListPoliciesRequest {})).await),
            ),
            (
                "DrService/ListGroups",
                format!("{:?}", DrC::new(ch.clone()).list_groups(req(&b1, ListGroupsRequest {})).await),
            ),
            (
                "BackupService/ListBackups",
                format!("{:?}", BackupC::new(ch.clone()).list_backups(req(&b1, ListBackupsRequest::default())).await),
            ),
            (
                "BackupService/ListBackups",
                format!(
                    "{:?}",
                    BackupC::new(ch.clone())
                        .list_backups(req(&b1, ListBackupsRequest { volume: s("alice-vol"), server: String::new() }))
                        .await
                ),
            ),
            (
                "BackupService/ListBackups",
                format!(
                    "{:?}",
                    BackupC::new(ch.clone())
                        .list_backups(req(&b1, ListBackupsRequest { volume: String::new(), server: s("alice-srv") }))
                        .await
                ),
            ),
        ]
    });
    for (m, text) in &lists {
        if !text.starts_with("Ok(") || text.contains("alice") || text.contains(&backup_id) {
            failures.push(format!("{m}: bob's answer {text}"));
        }
    }
    // Calls about the caller only: bob's own key, which must leave alice's alone.
    let r = g1.block_on(
        BackupC::new(g1.channel()).set_encryption_key(req(&b1, SetEncryptionKeyRequest { key_hex: "b0".repeat(32) })),
    );
    assert!(r.is_ok(), "bob sets his own key: {r:?}");
    assert_eq!(std::fs::read(&key_file).unwrap(), alice_key, "bob's key call changed alice's key");
    // Node-to-node calls: bob's token as a group secret, for alice's group and for none.
    let mut repl_methods = BTreeSet::new();
    for m in all_methods()
        .into_iter()
        .filter(|m| m.starts_with("ReplicationService/") && m != "ReplicationService/RegisterGroup")
    {
        let c = match m.as_str() {
            "ReplicationService/UnregisterGroup" => {
                call!(ReplC.unregister_group(UnregisterGroupRequest { delete_replicas: true }))
            }
            "ReplicationService/PreparePairs" => call!(ReplC.prepare_pairs(PreparePairsRequest::default())),
            "ReplicationService/RemovePairs" => {
                call!(ReplC.remove_pairs(RemovePairsRequest { volumes: vec![s("alice-disk")] }))
            }
            "ReplicationService/Apply" => Box::new(|ch, auth| -> evs_tests::grpc::Fut {
                Box::pin(async move {
                    ReplC::new(ch).apply(req(&auth, tokio_stream::iter(Vec::<ApplyMessage>::new()))).await.map(|_| ())
                })
            }) as Call,
            "ReplicationService/GetPoint" => call!(ReplC.get_point(GetPointRequest {})),
            "ReplicationService/Drill" => call!(ReplC.drill(PeerDrillRequest { start: true })),
            "ReplicationService/Promote" => call!(ReplC.promote(PromoteRequest { seq: 1 })),
            "ReplicationService/Demote" => call!(ReplC.demote(DemoteRequest::default())),
            other => {
                failures.push(format!("{other}: no isolation case for this node-to-node call"));
                continue;
            }
        };
        repl_methods.insert(m.clone());
        // On the target daemon, where alice's group is registered, and on the source.
        for (g, key) in [(&g2, "alice/alice-grp"), (&g1, "alice/alice-grp"), (&g2, "bob/alice-grp")] {
            let real = g.block_on(c(g.channel(), Auth::Group { key: key.into(), secret: bob.clone() }));
            let fake = g.block_on(c(g.channel(), Auth::Group { key: "alice/nobody-gp".into(), secret: bob.clone() }));
            match (real, fake) {
                (Err(r), Err(f)) if r.code() == Code::Unauthenticated && r.message() == f.message() => {}
                (r, f) => failures.push(format!("{m} as {key} with bob's token: {r:?} vs a missing group {f:?}")),
            }
        }
    }

    // Names are per tenant: bob may create his own "alice-pol" and "alice-vol"; alice's stay
    // as they are (checked below with the rest of her state).
    g1.block_on(async {
        let r = PolicyC::new(g1.channel())
            .create_policy(req(
                &b1,
                CreatePolicyRequest {
                    name: s("alice-pol"),
                    schedule: s("0 0 1 1 *"),
                    retention: Some(Retention { keep_last: 1, ..Default::default() }),
                },
            ))
            .await;
        assert!(r.is_ok(), "bob's own policy alice-pol: {r:?}");
        let r = VolC::new(g1.channel())
            .create_volume(req(
                &b1,
                CreateVolumeRequest { name: s("alice-vol"), size_bytes: MIB, ..Default::default() },
            ))
            .await;
        assert!(r.is_ok(), "bob's own volume alice-vol: {r:?}");
    });

    // Every RPC has its row (or is a list, a self-only call or a node-to-node call).
    let covered: BTreeSet<&str> = rows
        .iter()
        .map(|r| r.method)
        .chain(lists.iter().map(|(m, _)| *m))
        .chain(repl_methods.iter().map(String::as_str))
        .chain(["BackupService/SetEncryptionKey", "PolicyService/CreatePolicy"])
        .collect();
    for m in all_methods() {
        if !covered.contains(m.as_str()) {
            failures.push(format!("{m}: no row in the isolation matrix"));
        }
    }

    // Nothing of alice's changed, on either daemon; her data reads back; her exports serve.
    std::thread::sleep(Duration::from_millis(200));
    let after = (alice_state(&g1, &a1), alice_state(&g2, &a2));
    if after.0 != before.0 {
        failures.push(format!("alice's state on the source changed:\nbefore {}\nafter  {}", before.0, after.0));
    }
    if after.1 != before.1 {
        failures.push(format!("alice's state on the target changed:\nbefore {}\nafter  {}", before.1, after.1));
    }
    let mut c = NbdClient::connect(&uri).expect("alice's attach token still serves");
    assert_eq!(c.read(MIB, pattern.len() as u32).unwrap(), pattern, "alice's data");
    let mut c = NbdClient::connect(&snap_uri).expect("alice's snapshot export still serves");
    assert_eq!(c.read(MIB, pattern.len() as u32).unwrap(), pattern, "alice's snapshot");
    // The audit log names bob and the refusals.
    let audit = d1.evsctl_json(&["audit", "list", "--tenant", "bob", "--limit", "10000"]);
    let refused: Vec<&Value> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["method"] == "VolumeService/DeleteVolume" && e["target"] == "volume alice-vol")
        .collect();
    assert!(
        refused.len() == 1 && refused[0]["result"] == "NOT_FOUND",
        "the audit log of bob's delete of alice-vol: {refused:?}"
    );
    assert!(failures.is_empty(), "{} isolation problems:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn attach_tokens_are_unguessable_single_use_and_revocable() {
    let d = Daemon::start();
    d.evsctl_ok(&["volume", "create", "a", "--size", "4M"]);
    d.evsctl_ok(&["volume", "create", "b", "--size", "4M"]);
    // 32 attach/detach rounds: every token is 64 lowercase hex digits (256 bits), never seen
    // before; the hex digits are about uniform and no two tokens share a long prefix.
    let mut tokens = BTreeSet::new();
    let mut counts = [0u32; 16];
    for _ in 0..32 {
        let uri = d.attach("a");
        let t = NbdUri::parse(&uri).unwrap().export;
        assert_eq!(t.len(), 64, "{t}");
        for c in t.chars() {
            let v = c.to_digit(16).unwrap_or_else(|| panic!("not lowercase hex: {t}"));
            assert!(!c.is_ascii_uppercase());
            counts[v as usize] += 1;
        }
        assert!(tokens.insert(t.clone()), "a token came back: {t}");
        d.evsctl_ok(&["volume", "detach", "a"]);
        assert!(NbdClient::connect(&uri).is_err(), "a detached token still connects");
    }
    // 2048 digits, 128 expected per value: a broken generator (constant, counter, few bits)
    // is far outside 64..=192.
    assert!(counts.iter().all(|&n| (64..=192).contains(&n)), "hex digit counts {counts:?}");
    let v: Vec<&String> = tokens.iter().collect();
    for w in v.windows(2) {
        let common = w[0].chars().zip(w[1].chars()).take_while(|(x, y)| x == y).count();
        assert!(common < 8, "tokens {} and {} share {common} leading digits", w[0], w[1]);
    }

    let refused = |uri: &str, what: &str| match NbdClient::connect(uri) {
        Err(NbdError::OptionRefused { .. }) | Err(NbdError::Closed) => {}
        Err(e) => panic!("{what}: unexpected error {e:?}"),
        Ok(_) => panic!("{what}: served"),
    };
    let ua = d.attach("a");
    let ub = d.attach("b");
    let mut random = NbdUri::parse(&ua).unwrap();
    random.export = Rng::new(1).bytes(32).iter().map(|b| format!("{b:02x}")).collect();
    refused(&random.to_uri(), "a random token");
    // One character changed, and a prefix: nothing but the exact token serves.
    let mut near = NbdUri::parse(&ua).unwrap();
    let last = near.export.pop().unwrap();
    near.export.push(if last == '0' { '1' } else { '0' });
    refused(&near.to_uri(), "a token one digit off");
    let mut prefix = NbdUri::parse(&ua).unwrap();
    prefix.export.truncate(32);
    refused(&prefix.to_uri(), "half a token");
    // Each token serves its own volume only.
    {
        let mut ca = NbdClient::connect(&ua).unwrap();
        ca.write(0, &[0xaa; 4096]).unwrap();
        ca.flush().unwrap();
        let mut cb = NbdClient::connect(&ub).unwrap();
        assert!(is_zero(&cb.read(0, 4096).unwrap()), "b's token reads a's data");
    }
    // Detach closes the live connection and kills the token; a new attach gives a new one.
    let mut live = NbdClient::connect(&ua).unwrap();
    assert_eq!(live.read(0, 4096).unwrap(), vec![0xaa; 4096]);
    d.evsctl_ok(&["volume", "detach", "a"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while live.read(0, 4096).is_ok() {
        assert!(Instant::now() < deadline, "a connection outlived the detach by 10 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    refused(&ua, "a detached token");
    assert_ne!(d.attach("a"), ua);
    refused(&ua, "the old token after a new attach");
    // A snapshot export's token dies with its detach; a deleted volume's with the volume.
    d.evsctl_ok(&["snapshot", "create", "b", "s"]);
    let us = d.evsctl_json(&["snapshot", "attach", "b@s"])["uri"].as_str().unwrap().to_string();
    NbdClient::connect(&us).expect("the snapshot export serves");
    d.evsctl_ok(&["snapshot", "detach", "b@s"]);
    refused(&us, "a detached snapshot export");
    d.evsctl_ok(&["volume", "detach", "b"]);
    d.evsctl_ok(&["volume", "delete", "b"]);
    refused(&ub, "a deleted volume's token");
    d.evsctl_ok(&["volume", "create", "b", "--size", "4M"]);
    refused(&ub, "a deleted volume's token, after a volume of the same name came back");
}

#[test]
fn a_deleted_volume_s_data_is_unreadable_by_new_volumes() {
    let d = Daemon::start();
    const SIZE: u64 = 48 * MIB;
    let (uri, _) = d.create_volume("old", "48M");
    let mut c = NbdClient::connect(&uri).unwrap();
    let chunk = vec![0xc3u8; 4 * MIB as usize];
    for off in (0..SIZE).step_by(chunk.len()) {
        c.write(off, &chunk).unwrap();
    }
    c.flush().unwrap();
    assert_eq!(c.read(SIZE - 4096, 4096).unwrap(), vec![0xc3; 4096]);
    drop(c);
    // A snapshot and a clone share the data; they go too.
    d.evsctl_ok(&["snapshot", "create", "old", "s"]);
    d.evsctl_ok(&["volume", "detach", "old"]);
    d.evsctl_ok(&["volume", "delete", "old"]);
    let data = std::fs::read_dir(d.data_dir()).unwrap().count();
    assert!(data > 0);
    for i in 0..3 {
        let name = format!("new{i}");
        let (uri, _) = d.create_volume(&name, "48M");
        let mut c = NbdClient::connect(&uri).unwrap();
        for off in (0..SIZE).step_by(4 * MIB as usize) {
            let got = c.read(off, 4 * MIB as u32).unwrap();
            if let Some(p) = got.iter().position(|&b| b != 0) {
                panic!("{name} reads {:#x} at {} (a deleted volume's data)", got[p], off + p as u64);
            }
        }
        // Partial writes next to never-written blocks do not bring old data back either.
        c.write(4096, &[1u8; 512]).unwrap();
        let got = c.read(0, 64 * 1024).unwrap();
        assert!(is_zero(&got[..4096]) && got[4096..4608].iter().all(|&b| b == 1) && is_zero(&got[4608..]), "{name}");
    }
}

#[test]
fn a_backup_key_never_reaches_logs_audit_catalog_store_or_messages() {
    let d = Daemon::start_with(DaemonOptions { env: vec![("RUST_LOG".into(), "debug".into())], ..Default::default() });
    let (uri, _) = d.create_volume("v", "4M");
    let mut c = NbdClient::connect(&uri).unwrap();
    c.write(0, &[0x42; 65536]).unwrap();
    c.flush().unwrap();
    drop(c);
    let key = "7c".repeat(32);
    let key_file = d.root().join("k.hex");
    std::fs::write(&key_file, format!("{key}\n")).unwrap();
    d.evsctl_ok(&["backup", "set-key", "--key-file", key_file.to_str().unwrap()]);
    let b = d.evsctl_json(&["backup", "create", "v", "--wait"]);
    assert_eq!(b["job"]["state"], "succeeded", "{b}");
    let id = b["backup_id"].as_str().unwrap().to_string();
    d.evsctl_json(&["backup", "restore", &id, "--to", "r", "--wait"]);
    // Refused keys are not echoed either: one bad digit, and a key one byte short.
    let near = format!("{}g", &key[..63]);
    for bad in [near.as_str(), &key[..62]] {
        let out = d.evsctl(&["backup", "set-key", "--key-hex", bad]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("invalid encryption key") && !err.contains(bad), "{err}");
    }
    d.evsctl_ok(&["backup", "set-key", "--clear"]);
    let mut d = d;
    assert!(d.terminate().success());
    let upper = key.to_uppercase();
    let needles = [key.as_str(), &key[..32], &key[32..], upper.as_str(), &near[..40]];
    let log = d.log();
    assert!(log.lines().count() > 20, "a debug log was written: {log}");
    let mut found = Vec::new();
    let mut scan = |what: String, bytes: &[u8]| {
        for n in needles {
            if bytes.windows(n.len()).any(|w| w == n.as_bytes()) {
                found.push(format!("{what} holds {n}"));
            }
        }
    };
    scan("the daemon's log".into(), log.as_bytes());
    fn walk(p: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(p).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(d.data_dir(), &mut files);
    for f in files {
        // (The key file, `keys/<tenant>.key`, is where the key lives; `--clear` removed it.)
        if f.metadata().map(|m| m.len() < 256 << 20).unwrap_or(false) {
            scan(f.display().to_string(), &std::fs::read(&f).unwrap());
        }
    }
    assert!(found.is_empty(), "the key leaked: {found:?}");
    d.restart();
    let audit = d.evsctl_ok(&["--output", "json", "audit", "list", "--limit", "10000"]);
    assert!(audit.contains("BackupService/SetEncryptionKey"), "{audit}");
    for n in needles {
        assert!(!audit.contains(n), "the audit log holds {n}");
    }
}

/// A CA and one server certificate it signed for 127.0.0.1 (both daemons of a test use it).
fn pki(ca_name: &str) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name.push(DnType::CommonName, ca_name);
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut srv = CertificateParams::new(Vec::<String>::new()).unwrap();
    srv.distinguished_name.push(DnType::CommonName, "evs daemon");
    srv.subject_alt_names = vec![SanType::IpAddress("127.0.0.1".parse().unwrap())];
    srv.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let cert = srv.signed_by(&key, &issuer).unwrap().pem();
    (ca_pem, cert, key.serialize_pem())
}

#[test]
fn replication_runs_over_tls_and_refuses_a_peer_signed_by_another_ca() {
    let (ca, cert, key) = pki("evs DR CA");
    let (other_ca, _, _) = pki("some other CA");
    let files = vec![
        ("pki/ca.pem".into(), ca.into_bytes()),
        ("pki/cert.pem".into(), cert.into_bytes()),
        ("pki/key.pem".into(), key.into_bytes()),
        ("pki/other-ca.pem".into(), other_ca.into_bytes()),
    ];
    let tls = |az: &str| {
        Daemon::start_with(DaemonOptions {
            az: Some(az.into()),
            args: ["--tls-cert", "pki/cert.pem", "--tls-key", "pki/key.pem", "--nbd-tls", "off"]
                .map(String::from)
                .to_vec(),
            api_scheme: Some("https".into()),
            evsctl_args: vec!["--ca-cert".into(), "pki/ca.pem".into()],
            files: files.clone(),
            ..Default::default()
        })
    };
    let a = tls("az1");
    let b = tls("az2");
    let (uri, _) = a.create_volume("va", "8M");
    let data = Rng::new(11).bytes(3 * MIB as usize);
    let mut c = NbdClient::connect(&uri).unwrap();
    c.write(2 * MIB, &data).unwrap();
    c.flush().unwrap();
    a.evsctl_ok(&["server", "create", "vm", "--volumes", "va"]);
    let target = format!("https://{}", b.api_addr);

    // A target whose certificate another CA signed, and plain text to a TLS daemon: refused,
    // nothing registered on the target.
    for (ep, ca_file, why) in [
        (target.clone(), "pki/other-ca.pem", "a CA that did not sign the target"),
        (format!("http://{}", b.api_addr), "pki/ca.pem", "plain text to a TLS daemon"),
    ] {
        let out = a.evsctl(&[
            "dr",
            "group",
            "create",
            "g0",
            "--target",
            &ep,
            "--target-token",
            b.token(),
            "--peer-ca-cert",
            ca_file,
        ]);
        assert!(!out.status.success(), "{why}: {}", evs_tests::tools::format_output(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("DR peer"),
            "{why}: {}",
            evs_tests::tools::format_output(&out)
        );
    }
    assert_eq!(b.evsctl_json(&["dr", "group", "list"])["groups"].as_array().map(Vec::len), Some(0));
    assert_eq!(a.evsctl_json(&["dr", "group", "list"])["groups"].as_array().map(Vec::len), Some(0));

    // Over TLS both ways (the target calls back on the source's https endpoint).
    let g = a.create_dr_group("g", &b, &target, &["--peer-ca-cert", "pki/ca.pem"]);
    assert_eq!(g["peer_endpoint"], target.as_str(), "{g}");
    let p = a.evsctl_json(&["dr", "protect", "g", "--server", "vm", "--wait"]);
    assert_eq!(p["job"]["state"], "succeeded", "{p}");
    // A write after the initial sync travels in a cycle.
    c.write(0, &[0x77; 4096]).unwrap();
    c.flush().unwrap();
    let seq = a.evsctl_json(&["dr", "status", "g"])["point_seq"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while a.evsctl_json(&["dr", "status", "g"])["point_seq"].as_u64().unwrap() < seq + 2 {
        assert!(Instant::now() < deadline, "no replication cycle over TLS in 60 s");
        std::thread::sleep(Duration::from_millis(200));
    }
    let d = a.evsctl_json(&["dr", "drill", "start", "g"]);
    let drill = d["volumes"][0]["uri"].as_str().unwrap_or_else(|| panic!("{d}")).to_string();
    let mut r = NbdClient::connect(&drill).unwrap();
    assert_eq!(r.read(0, 4096).unwrap(), vec![0x77; 4096], "the cycle's write on the target");
    assert_eq!(r.read(2 * MIB, data.len() as u32).unwrap(), data, "the initial sync on the target");
    drop(r);
    a.evsctl_ok(&["dr", "drill", "stop", "g"]);
    let s = a.evsctl_json(&["dr", "status", "g"]);
    assert!(s["bytes_transferred"].as_u64().unwrap() > 0 && s["last_error"].as_str().unwrap_or("").is_empty(), "{s}");
}
