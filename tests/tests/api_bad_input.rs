//! Bad input through every gRPC call of the API, straight from a tonic client: negative-ish and
//! huge sizes, unknown and duplicate names, quotas and limits, names with path characters,
//! NUL, bidi marks and 300 characters, missing and wrong credentials. Each call must fail
//! with the right code and a message naming the problem, change nothing (every list of both
//! tenants and the daemon's catalog counts are compared before and after each call), and,
//! when the call is a mutating one, be in the audit log with its result.
//!
//! The RPCs are enumerated from the descriptor set the daemon serves: a new RPC without a case
//! here fails `every_rpc_refuses_bad_input_and_changes_nothing`.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use evs_tests::call;
use evs_tests::grpc::{all_methods, pb, req, Auth, Call, Fut, Grpc};
use evs_tests::{Daemon, DaemonOptions, NbdClient};
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
use tonic::transport::Channel;
use tonic::{Code, Status};

const MIB: u64 = 1 << 20;

/// A call with a default (empty) request of `method`, for the cases every RPC must pass (no
/// credentials, a wrong token). None for a method this table does not know: a new RPC.
fn default_call(method: &str) -> Option<Call> {
    use pb::*;
    Some(match method {
        "VolumeService/CreateVolume" => call!(VolC.create_volume(CreateVolumeRequest::default())),
        "VolumeService/ListVolumes" => call!(VolC.list_volumes(ListVolumesRequest::default())),
        "VolumeService/GetVolume" => call!(VolC.get_volume(GetVolumeRequest::default())),
        "VolumeService/DeleteVolume" => call!(VolC.delete_volume(DeleteVolumeRequest::default())),
        "VolumeService/ExtendVolume" => call!(VolC.extend_volume(ExtendVolumeRequest::default())),
        "VolumeService/SetVolumeTier" => call!(VolC.set_volume_tier(SetVolumeTierRequest::default())),
        "VolumeService/AttachVolume" => call!(VolC.attach_volume(AttachVolumeRequest::default())),
        "VolumeService/DetachVolume" => call!(VolC.detach_volume(DetachVolumeRequest::default())),
        "SnapshotService/CreateSnapshot" => call!(SnapC.create_snapshot(CreateSnapshotRequest::default())),
        "SnapshotService/CreateGroupSnapshot" => {
            call!(SnapC.create_group_snapshot(CreateGroupSnapshotRequest::default()))
        }
        "SnapshotService/ListSnapshots" => call!(SnapC.list_snapshots(ListSnapshotsRequest::default())),
        "SnapshotService/GetSnapshot" => call!(SnapC.get_snapshot(GetSnapshotRequest::default())),
        "SnapshotService/DeleteSnapshot" => call!(SnapC.delete_snapshot(DeleteSnapshotRequest::default())),
        "SnapshotService/RollbackSnapshot" => call!(SnapC.rollback_snapshot(RollbackSnapshotRequest::default())),
        "SnapshotService/DiffSnapshots" => diff_call(DiffSnapshotsRequest::default()),
        "SnapshotService/AttachSnapshot" => call!(SnapC.attach_snapshot(AttachSnapshotRequest::default())),
        "SnapshotService/DetachSnapshot" => call!(SnapC.detach_snapshot(DetachSnapshotRequest::default())),
        "TenantService/CreateTenant" => call!(TenantC.create_tenant(CreateTenantRequest::default())),
        "TenantService/ListTenants" => call!(TenantC.list_tenants(ListTenantsRequest::default())),
        "TenantService/GetTenant" => call!(TenantC.get_tenant(GetTenantRequest::default())),
        "TenantService/DeleteTenant" => call!(TenantC.delete_tenant(DeleteTenantRequest::default())),
        "TenantService/SetTenantQuota" => call!(TenantC.set_tenant_quota(SetTenantQuotaRequest::default())),
        "ServerService/CreateServer" => call!(ServerC.create_server(CreateServerRequest::default())),
        "ServerService/ListServers" => call!(ServerC.list_servers(ListServersRequest::default())),
        "ServerService/GetServer" => call!(ServerC.get_server(GetServerRequest::default())),
        "ServerService/DeleteServer" => call!(ServerC.delete_server(DeleteServerRequest::default())),
        "AuditService/ListAudit" => call!(AuditC.list_audit(ListAuditRequest::default())),
        "JobService/ListJobs" => call!(JobC.list_jobs(ListJobsRequest::default())),
        "JobService/GetJob" => call!(JobC.get_job(GetJobRequest::default())),
        "JobService/CancelJob" => call!(JobC.cancel_job(CancelJobRequest::default())),
        "BackupService/CreateBackup" => call!(BackupC.create_backup(CreateBackupRequest::default())),
        "BackupService/CreateServerBackup" => call!(BackupC.create_server_backup(CreateServerBackupRequest::default())),
        "BackupService/ListBackups" => call!(BackupC.list_backups(ListBackupsRequest::default())),
        "BackupService/GetBackup" => call!(BackupC.get_backup(GetBackupRequest::default())),
        "BackupService/DeleteBackup" => call!(BackupC.delete_backup(DeleteBackupRequest::default())),
        "BackupService/RestoreBackup" => call!(BackupC.restore_backup(RestoreBackupRequest::default())),
        "BackupService/VerifyBackup" => call!(BackupC.verify_backup(VerifyBackupRequest::default())),
        "BackupService/CollectGarbage" => call!(BackupC.collect_garbage(CollectGarbageRequest::default())),
        "BackupService/SetEncryptionKey" => call!(BackupC.set_encryption_key(SetEncryptionKeyRequest::default())),
        "PolicyService/CreatePolicy" => call!(PolicyC.create_policy(CreatePolicyRequest::default())),
        "PolicyService/ListPolicies" => call!(PolicyC.list_policies(ListPoliciesRequest::default())),
        "PolicyService/DeletePolicy" => call!(PolicyC.delete_policy(DeletePolicyRequest::default())),
        "PolicyService/BindPolicy" => call!(PolicyC.bind_policy(BindPolicyRequest::default())),
        "PolicyService/UnbindPolicy" => call!(PolicyC.unbind_policy(UnbindPolicyRequest::default())),
        "PolicyService/RunPolicy" => call!(PolicyC.run_policy(RunPolicyRequest::default())),
        "DrService/CreateGroup" => call!(DrC.create_group(CreateGroupRequest::default())),
        "DrService/ListGroups" => call!(DrC.list_groups(ListGroupsRequest::default())),
        "DrService/GetGroup" => call!(DrC.get_group(GetGroupRequest::default())),
        "DrService/DeleteGroup" => call!(DrC.delete_group(DeleteGroupRequest::default())),
        "DrService/Protect" => call!(DrC.protect(ProtectRequest::default())),
        "DrService/Unprotect" => call!(DrC.unprotect(UnprotectRequest::default())),
        "DrService/Enable" => call!(DrC.enable(EnableRequest::default())),
        "DrService/Disable" => call!(DrC.disable(DisableRequest::default())),
        "DrService/Status" => call!(DrC.status(StatusRequest::default())),
        "DrService/StartDrill" => call!(DrC.start_drill(StartDrillRequest::default())),
        "DrService/StopDrill" => call!(DrC.stop_drill(StopDrillRequest::default())),
        "DrService/Switchover" => call!(DrC.switchover(SwitchoverRequest::default())),
        "DrService/Failover" => call!(DrC.failover(FailoverRequest::default())),
        "DrService/Reprotect" => call!(DrC.reprotect(ReprotectRequest::default())),
        "ReplicationService/RegisterGroup" => call!(ReplC.register_group(RegisterGroupRequest::default())),
        "ReplicationService/UnregisterGroup" => call!(ReplC.unregister_group(UnregisterGroupRequest::default())),
        "ReplicationService/PreparePairs" => call!(ReplC.prepare_pairs(PreparePairsRequest::default())),
        "ReplicationService/RemovePairs" => call!(ReplC.remove_pairs(RemovePairsRequest::default())),
        "ReplicationService/Apply" => apply_call(vec![]),
        "ReplicationService/GetPoint" => call!(ReplC.get_point(GetPointRequest::default())),
        "ReplicationService/Drill" => call!(ReplC.drill(PeerDrillRequest::default())),
        "ReplicationService/Promote" => call!(ReplC.promote(PromoteRequest::default())),
        "ReplicationService/Demote" => call!(ReplC.demote(DemoteRequest::default())),
        _ => return None,
    })
}

/// DiffSnapshots, reading the whole stream (an error may come in it).
fn diff_call(m: pb::DiffSnapshotsRequest) -> Call {
    Box::new(move |ch: Channel, auth: Auth| -> Fut {
        let m = m.clone();
        Box::pin(async move {
            let mut s = SnapC::new(ch).diff_snapshots(req(&auth, m)).await?.into_inner();
            while s.message().await?.is_some() {}
            Ok(())
        })
    })
}

/// Apply with these messages as the client stream.
fn apply_call(msgs: Vec<pb::ApplyMessage>) -> Call {
    Box::new(move |ch: Channel, auth: Auth| -> Fut {
        let msgs = msgs.clone();
        Box::pin(async move { ReplC::new(ch).apply(req(&auth, tokio_stream::iter(msgs))).await.map(|_| ()) })
    })
}

/// The calls that change something: the audit log records each of them, refused or not (and
/// every call whose credentials are refused).
fn is_mutating(method: &str) -> bool {
    let m = method.split('/').nth(1).unwrap_or("");
    let read_only = m.starts_with("List") || m.starts_with("Get") || matches!(m, "Status" | "DiffSnapshots" | "Apply");
    !read_only
}

/// The names every name field is tried with.
fn bad_names() -> Vec<(String, &'static str)> {
    vec![
        (String::new(), "empty"),
        ("../x".into(), "path traversal"),
        ("a/b".into(), "slash"),
        ("a\0b".into(), "NUL"),
        ("a\u{200f}b".into(), "right-to-left mark"),
        ("\u{202e}gpj.exe".into(), "right-to-left override"),
        ("x".repeat(300), "300 characters"),
        (" a".into(), "leading space"),
        ("vol\u{e9}".into(), "non-ASCII letter"),
        ("a\nb".into(), "newline"),
    ]
}

struct Case {
    method: &'static str,
    what: String,
    auth: Auth,
    call: Call,
    code: Code,
    /// Substrings the message must hold.
    msg: Vec<String>,
}

struct Ctx {
    admin: Auth,
    t: Auth,
    /// The DR group registered as the admin's target group, with its secret.
    group: Auth,
    backup_id: String,
    done_job: u64,
}

/// Who the audit log must name for a call made with `auth`.
fn audit_tenant(ctx: &Ctx, auth: &Auth, code: Code) -> String {
    match auth {
        Auth::Bearer(t) if matches!(&ctx.admin, Auth::Bearer(a) if a == t) => "admin".into(),
        Auth::Bearer(t) if matches!(&ctx.t, Auth::Bearer(a) if a == t) => "t".into(),
        Auth::Group { key, .. } if code != Code::Unauthenticated => key.split('/').next().unwrap().to_string(),
        _ => "-".into(),
    }
}

fn cases(ctx: &Ctx) -> Vec<Case> {
    use pb::*;
    let mut out: Vec<Case> = Vec::new();
    let mut add = |method: &'static str, what: &str, auth: &Auth, call: Call, code: Code, msg: &[&str]| {
        out.push(Case {
            method,
            what: what.to_string(),
            auth: auth.clone(),
            call,
            code,
            msg: msg.iter().map(|s| s.to_string()).collect(),
        })
    };
    let (a, t, grp) = (&ctx.admin, &ctx.t, &ctx.group);
    let s = |x: &str| x.to_string();
    let ia = Code::InvalidArgument;
    let nf = Code::NotFound;
    let fp = Code::FailedPrecondition;
    let ae = Code::AlreadyExists;
    let re = Code::ResourceExhausted;
    let pd = Code::PermissionDenied;

    // ---- names with bad characters, in every name field ----
    for (n, why) in bad_names() {
        let w = |field: &str| format!("{field} {why}");
        let vn = "invalid volume name";
        let sn = "invalid snapshot name";
        let srv = "invalid server name";
        let n = n.clone();
        macro_rules! bad {
            ($method:literal, $field:literal, $auth:expr, $err:expr, $client:ident . $rpc:ident ( $m:expr )) => {{
                add($method, &w($field), $auth, call!($client.$rpc($m)), ia, &[$err]);
            }};
        }
        bad!(
            "VolumeService/CreateVolume",
            "name",
            t,
            vn,
            VolC.create_volume(CreateVolumeRequest { name: n.clone(), size_bytes: MIB, ..Default::default() })
        );
        bad!(
            "VolumeService/CreateVolume",
            "from_snapshot volume",
            a,
            vn,
            VolC.create_volume(CreateVolumeRequest {
                name: s("clone"),
                from_snapshot: format!("{n}@s1"),
                ..Default::default()
            })
        );
        bad!(
            "VolumeService/CreateVolume",
            "from_snapshot snapshot",
            a,
            sn,
            VolC.create_volume(CreateVolumeRequest {
                name: s("clone"),
                from_snapshot: format!("adm@{n}"),
                ..Default::default()
            })
        );
        bad!("VolumeService/GetVolume", "name", t, vn, VolC.get_volume(GetVolumeRequest { name: n.clone() }));
        bad!("VolumeService/DeleteVolume", "name", t, vn, VolC.delete_volume(DeleteVolumeRequest { name: n.clone() }));
        bad!(
            "VolumeService/ExtendVolume",
            "name",
            t,
            vn,
            VolC.extend_volume(ExtendVolumeRequest { name: n.clone(), size_bytes: MIB })
        );
        bad!(
            "VolumeService/SetVolumeTier",
            "name",
            t,
            vn,
            VolC.set_volume_tier(SetVolumeTierRequest { name: n.clone(), tier: s("high") })
        );
        bad!(
            "VolumeService/AttachVolume",
            "name",
            t,
            vn,
            VolC.attach_volume(AttachVolumeRequest { name: n.clone(), ..Default::default() })
        );
        bad!("VolumeService/DetachVolume", "name", t, vn, VolC.detach_volume(DetachVolumeRequest { name: n.clone() }));
        bad!(
            "SnapshotService/CreateSnapshot",
            "volume",
            t,
            vn,
            SnapC.create_snapshot(CreateSnapshotRequest { volume: n.clone(), name: s("s9") })
        );
        bad!(
            "SnapshotService/CreateSnapshot",
            "name",
            t,
            sn,
            SnapC.create_snapshot(CreateSnapshotRequest { volume: s("w"), name: n.clone() })
        );
        bad!(
            "SnapshotService/CreateGroupSnapshot",
            "name",
            t,
            sn,
            SnapC.create_group_snapshot(CreateGroupSnapshotRequest {
                name: n.clone(),
                volumes: vec![s("w")],
                ..Default::default()
            })
        );
        bad!(
            "SnapshotService/CreateGroupSnapshot",
            "volume",
            t,
            vn,
            SnapC.create_group_snapshot(CreateGroupSnapshotRequest {
                name: s("g9"),
                volumes: vec![s("w"), n.clone()],
                ..Default::default()
            })
        );
        if !n.is_empty() {
            bad!(
                "SnapshotService/CreateGroupSnapshot",
                "server",
                t,
                srv,
                SnapC.create_group_snapshot(CreateGroupSnapshotRequest {
                    name: s("g9"),
                    server: n.clone(),
                    ..Default::default()
                })
            );
        }
        bad!(
            "SnapshotService/ListSnapshots",
            "volume",
            t,
            vn,
            SnapC.list_snapshots(ListSnapshotsRequest { volume: n.clone() })
        );
        for (field, vol, snap, err) in [("volume", n.clone(), s("s1"), vn), ("name", s("v"), n.clone(), sn)] {
            let (v1, s1) = (vol.clone(), snap.clone());
            add(
                "SnapshotService/GetSnapshot",
                &w(field),
                t,
                call!(SnapC.get_snapshot(GetSnapshotRequest { volume: v1.clone(), name: s1.clone() })),
                ia,
                &[err],
            );
            let (v1, s1) = (vol.clone(), snap.clone());
            add(
                "SnapshotService/DeleteSnapshot",
                &w(field),
                t,
                call!(SnapC.delete_snapshot(DeleteSnapshotRequest { volume: v1.clone(), name: s1.clone() })),
                ia,
                &[err],
            );
            let (v1, s1) = (vol.clone(), snap.clone());
            add(
                "SnapshotService/RollbackSnapshot",
                &w(field),
                t,
                call!(SnapC.rollback_snapshot(RollbackSnapshotRequest { volume: v1.clone(), name: s1.clone() })),
                ia,
                &[err],
            );
            let (v1, s1) = (vol.clone(), snap.clone());
            add(
                "SnapshotService/AttachSnapshot",
                &w(field),
                t,
                call!(SnapC.attach_snapshot(AttachSnapshotRequest {
                    volume: v1.clone(),
                    name: s1.clone(),
                    ..Default::default()
                })),
                ia,
                &[err],
            );
            let (v1, s1) = (vol.clone(), snap.clone());
            add(
                "SnapshotService/DetachSnapshot",
                &w(field),
                t,
                call!(SnapC.detach_snapshot(DetachSnapshotRequest { volume: v1.clone(), name: s1.clone() })),
                ia,
                &[err],
            );
        }
        add(
            "SnapshotService/DiffSnapshots",
            &w("volume"),
            t,
            diff_call(DiffSnapshotsRequest { volume: n.clone(), ..Default::default() }),
            ia,
            &[vn],
        );
        if !n.is_empty() {
            add(
                "SnapshotService/DiffSnapshots",
                &w("from"),
                t,
                diff_call(DiffSnapshotsRequest { volume: s("v"), from: n.clone(), to: String::new() }),
                ia,
                &[sn],
            );
            add(
                "SnapshotService/DiffSnapshots",
                &w("to"),
                t,
                diff_call(DiffSnapshotsRequest { volume: s("v"), from: String::new(), to: n.clone() }),
                ia,
                &[sn],
            );
        }
        let tn = "invalid tenant name";
        bad!(
            "TenantService/CreateTenant",
            "name",
            a,
            tn,
            TenantC.create_tenant(CreateTenantRequest { name: n.clone(), ..Default::default() })
        );
        bad!("TenantService/GetTenant", "name", a, tn, TenantC.get_tenant(GetTenantRequest { name: n.clone() }));
        bad!(
            "TenantService/DeleteTenant",
            "name",
            a,
            tn,
            TenantC.delete_tenant(DeleteTenantRequest { name: n.clone() })
        );
        bad!(
            "TenantService/SetTenantQuota",
            "name",
            a,
            tn,
            TenantC.set_tenant_quota(SetTenantQuotaRequest {
                name: n.clone(),
                max_volumes: Some(5),
                ..Default::default()
            })
        );
        if !n.is_empty() {
            bad!(
                "AuditService/ListAudit",
                "tenant",
                a,
                tn,
                AuditC.list_audit(ListAuditRequest { tenant: n.clone(), limit: 0 })
            );
        }
        bad!(
            "ServerService/CreateServer",
            "name",
            t,
            srv,
            ServerC.create_server(CreateServerRequest { name: n.clone(), volumes: vec![s("x")] })
        );
        bad!(
            "ServerService/CreateServer",
            "volume",
            t,
            vn,
            ServerC.create_server(CreateServerRequest { name: s("srv2"), volumes: vec![s("x"), n.clone()] })
        );
        bad!("ServerService/GetServer", "name", t, srv, ServerC.get_server(GetServerRequest { name: n.clone() }));
        bad!(
            "ServerService/DeleteServer",
            "name",
            t,
            srv,
            ServerC.delete_server(DeleteServerRequest { name: n.clone() })
        );
        bad!(
            "BackupService/CreateBackup",
            "volume",
            t,
            vn,
            BackupC.create_backup(CreateBackupRequest { volume: n.clone(), ..Default::default() })
        );
        if !n.is_empty() {
            bad!(
                "BackupService/CreateBackup",
                "label",
                a,
                "invalid label",
                BackupC.create_backup(CreateBackupRequest { volume: s("adm"), name: n.clone(), full: false })
            );
            bad!(
                "BackupService/CreateServerBackup",
                "label",
                t,
                "invalid label",
                BackupC.create_server_backup(CreateServerBackupRequest { server: s("srv"), name: n.clone() })
            );
            bad!(
                "BackupService/ListBackups",
                "volume",
                t,
                vn,
                BackupC.list_backups(ListBackupsRequest { volume: n.clone(), server: String::new() })
            );
            bad!(
                "BackupService/ListBackups",
                "server",
                t,
                srv,
                BackupC.list_backups(ListBackupsRequest { volume: String::new(), server: n.clone() })
            );
        }
        bad!(
            "BackupService/CreateServerBackup",
            "server",
            t,
            srv,
            BackupC.create_server_backup(CreateServerBackupRequest { server: n.clone(), name: String::new() })
        );
        let bid = "invalid backup id";
        bad!("BackupService/GetBackup", "id", t, bid, BackupC.get_backup(GetBackupRequest { id: n.clone() }));
        bad!("BackupService/DeleteBackup", "id", t, bid, BackupC.delete_backup(DeleteBackupRequest { id: n.clone() }));
        bad!("BackupService/VerifyBackup", "id", t, bid, BackupC.verify_backup(VerifyBackupRequest { id: n.clone() }));
        bad!(
            "BackupService/RestoreBackup",
            "id",
            t,
            bid,
            BackupC.restore_backup(RestoreBackupRequest { id: n.clone(), to: s("r1"), ..Default::default() })
        );
        if !n.is_empty() {
            let id = ctx.backup_id.clone();
            bad!(
                "BackupService/RestoreBackup",
                "to",
                t,
                vn,
                BackupC.restore_backup(RestoreBackupRequest { id: id.clone(), to: n.clone(), ..Default::default() })
            );
        }
        let pn = "invalid policy name";
        bad!(
            "PolicyService/CreatePolicy",
            "name",
            t,
            pn,
            PolicyC.create_policy(CreatePolicyRequest {
                name: n.clone(),
                schedule: s("0 0 1 1 *"),
                retention: Some(Retention { keep_last: 1, ..Default::default() })
            })
        );
        bad!(
            "PolicyService/DeletePolicy",
            "name",
            t,
            pn,
            PolicyC.delete_policy(DeletePolicyRequest { name: n.clone() })
        );
        bad!("PolicyService/RunPolicy", "name", t, pn, PolicyC.run_policy(RunPolicyRequest { name: n.clone() }));
        bad!(
            "PolicyService/BindPolicy",
            "name",
            t,
            pn,
            PolicyC.bind_policy(BindPolicyRequest { name: n.clone(), volume: s("w"), server: String::new() })
        );
        bad!(
            "PolicyService/UnbindPolicy",
            "name",
            t,
            pn,
            PolicyC.unbind_policy(UnbindPolicyRequest { name: n.clone(), volume: s("x"), server: String::new() })
        );
        if !n.is_empty() {
            bad!(
                "PolicyService/BindPolicy",
                "volume",
                t,
                vn,
                PolicyC.bind_policy(BindPolicyRequest { name: s("p"), volume: n.clone(), server: String::new() })
            );
            bad!(
                "PolicyService/BindPolicy",
                "server",
                t,
                srv,
                PolicyC.bind_policy(BindPolicyRequest { name: s("p"), volume: String::new(), server: n.clone() })
            );
            bad!(
                "PolicyService/UnbindPolicy",
                "volume",
                t,
                vn,
                PolicyC.unbind_policy(UnbindPolicyRequest { name: s("p"), volume: n.clone(), server: String::new() })
            );
        }
        let gn = "invalid group name";
        bad!(
            "DrService/CreateGroup",
            "name",
            t,
            gn,
            DrC.create_group(CreateGroupRequest {
                name: n.clone(),
                target_endpoint: s("http://127.0.0.1:9"),
                target_token: s("x"),
                ..Default::default()
            })
        );
        bad!("DrService/GetGroup", "name", t, gn, DrC.get_group(GetGroupRequest { name: n.clone() }));
        bad!("DrService/DeleteGroup", "name", t, gn, DrC.delete_group(DeleteGroupRequest { name: n.clone() }));
        bad!("DrService/Protect", "group", t, gn, DrC.protect(ProtectRequest { group: n.clone(), server: s("srv") }));
        bad!(
            "DrService/Unprotect",
            "group",
            t,
            gn,
            DrC.unprotect(UnprotectRequest { group: n.clone(), server: s("srv") })
        );
        if !n.is_empty() {
            bad!(
                "DrService/Protect",
                "server",
                a,
                srv,
                DrC.protect(ProtectRequest { group: s("rg"), server: n.clone() })
            );
            bad!(
                "DrService/Unprotect",
                "server",
                a,
                srv,
                DrC.unprotect(UnprotectRequest { group: s("rg"), server: n.clone() })
            );
        }
        bad!("DrService/Enable", "group", t, gn, DrC.enable(EnableRequest { group: n.clone() }));
        bad!("DrService/Disable", "group", t, gn, DrC.disable(DisableRequest { group: n.clone() }));
        bad!("DrService/Status", "group", t, gn, DrC.status(StatusRequest { group: n.clone() }));
        bad!("DrService/StartDrill", "group", t, gn, DrC.start_drill(StartDrillRequest { group: n.clone() }));
        bad!("DrService/StopDrill", "group", t, gn, DrC.stop_drill(StopDrillRequest { group: n.clone() }));
        bad!("DrService/Switchover", "group", t, gn, DrC.switchover(SwitchoverRequest { group: n.clone() }));
        bad!("DrService/Failover", "group", t, gn, DrC.failover(FailoverRequest { group: n.clone() }));
        bad!("DrService/Reprotect", "group", t, gn, DrC.reprotect(ReprotectRequest { group: n.clone() }));
        bad!(
            "ReplicationService/RegisterGroup",
            "name",
            t,
            gn,
            ReplC.register_group(RegisterGroupRequest {
                name: n.clone(),
                secret: "ab".repeat(32),
                source_endpoint: s("http://127.0.0.1:9"),
                ..Default::default()
            })
        );
        bad!(
            "ReplicationService/PreparePairs",
            "volume",
            grp,
            vn,
            ReplC.prepare_pairs(PreparePairsRequest {
                pairs: vec![PairSpec { server: s("srv"), volume: n.clone(), size_bytes: MIB, tier: String::new() }]
            })
        );
        bad!(
            "ReplicationService/RemovePairs",
            "volume",
            grp,
            vn,
            ReplC.remove_pairs(RemovePairsRequest { volumes: vec![n.clone()] })
        );
    }

    // ---- sizes, tiers, protocols ----
    for (size, why, msg) in [
        (0, "zero", "greater than zero"),
        (511, "511", "multiple of 512"),
        (MIB + 1, "1 MiB + 1", "multiple of 512"),
        ((32u64 << 40) + 512, "32 TiB + 512", "largest volume is 32 TiB"),
        (u64::MAX, "u64::MAX (a negative i64)", "largest volume"),
        (1u64 << 63, "2^63", "largest volume"),
    ] {
        add(
            "VolumeService/CreateVolume",
            &format!("size {why}"),
            a,
            call!(VolC.create_volume(CreateVolumeRequest { name: s("big"), size_bytes: size, ..Default::default() })),
            ia,
            &["invalid size", msg],
        );
        if size != 0 {
            add(
                "VolumeService/ExtendVolume",
                &format!("size {why}"),
                a,
                call!(VolC.extend_volume(ExtendVolumeRequest { name: s("adm"), size_bytes: size })),
                ia,
                &["invalid size", msg],
            );
            add(
                "VolumeService/CreateVolume",
                &format!("clone size {why}"),
                a,
                call!(VolC.create_volume(CreateVolumeRequest {
                    name: s("clone"),
                    size_bytes: size,
                    from_snapshot: s("adm@as"),
                    ..Default::default()
                })),
                ia,
                &["invalid size"],
            );
        }
    }
    add(
        "VolumeService/ExtendVolume",
        "shrink",
        a,
        call!(VolC.extend_volume(ExtendVolumeRequest { name: s("adm"), size_bytes: 512 })),
        ia,
        &["cannot shrink", "adm"],
    );
    add(
        "VolumeService/CreateVolume",
        "clone smaller than its snapshot",
        a,
        call!(VolC.create_volume(CreateVolumeRequest {
            name: s("clone"),
            size_bytes: 512,
            from_snapshot: s("adm@as"),
            ..Default::default()
        })),
        ia,
        &["smaller than the snapshot"],
    );
    for (tier, code, msg) in [
        ("fast", ia, "unknown tier \"fast\""),
        ("GPSSD", ia, "unknown tier"),
        ("unlimited", pd, "reserved for the admin"),
    ] {
        add(
            "VolumeService/CreateVolume",
            &format!("tier {tier}"),
            t,
            call!(VolC.create_volume(CreateVolumeRequest {
                name: s("y"),
                size_bytes: MIB,
                tier: s(tier),
                ..Default::default()
            })),
            code,
            &[msg],
        );
        add(
            "VolumeService/SetVolumeTier",
            &format!("tier {tier}"),
            t,
            call!(VolC.set_volume_tier(SetVolumeTierRequest { name: s("x"), tier: s(tier) })),
            code,
            &[msg],
        );
        if code == ia {
            add(
                "BackupService/RestoreBackup",
                &format!("tier {tier}"),
                t,
                call!(BackupC.restore_backup(RestoreBackupRequest {
                    id: ctx.backup_id.clone(),
                    to: s("r1"),
                    tier: s(tier),
                    in_place: false
                })),
                code,
                &[msg],
            );
        }
    }
    add(
        "VolumeService/SetVolumeTier",
        "empty tier",
        t,
        call!(VolC.set_volume_tier(SetVolumeTierRequest { name: s("x"), tier: String::new() })),
        ia,
        &["unknown tier"],
    );
    add(
        "VolumeService/CreateVolume",
        "from_backup and from_snapshot",
        a,
        call!(VolC.create_volume(CreateVolumeRequest {
            name: s("fb"),
            from_backup: ctx.backup_id.clone(),
            from_snapshot: s("x@s"),
            ..Default::default()
        })),
        ia,
        &["not both"],
    );
    add(
        "VolumeService/CreateVolume",
        "from_backup smaller",
        t,
        call!(VolC.create_volume(CreateVolumeRequest {
            name: s("fb"),
            size_bytes: 512,
            from_backup: ctx.backup_id.clone(),
            ..Default::default()
        })),
        ia,
        &["smaller than"],
    );
    for (p, unix, msg) in [
        ("iscsi", false, "unknown protocol \"iscsi\""),
        ("NBD", false, "unknown protocol"),
        ("vhost-user", true, "do not go together"),
    ] {
        add(
            "VolumeService/AttachVolume",
            &format!("protocol {p}"),
            t,
            call!(VolC.attach_volume(AttachVolumeRequest { name: s("x"), require_unix: unix, protocol: s(p) })),
            ia,
            &[msg],
        );
        add(
            "SnapshotService/AttachSnapshot",
            &format!("protocol {p}"),
            t,
            call!(SnapC.attach_snapshot(AttachSnapshotRequest {
                volume: s("w"),
                name: s("ws"),
                require_unix: unix,
                protocol: s(p)
            })),
            ia,
            &[msg],
        );
    }

    // ---- unknown names ----
    let vnf = "volume \"nope\" not found";
    add(
        "VolumeService/GetVolume",
        "unknown",
        t,
        call!(VolC.get_volume(GetVolumeRequest { name: s("nope") })),
        nf,
        &[vnf],
    );
    add(
        "VolumeService/DeleteVolume",
        "unknown",
        t,
        call!(VolC.delete_volume(DeleteVolumeRequest { name: s("nope") })),
        nf,
        &[vnf],
    );
    add(
        "VolumeService/ExtendVolume",
        "unknown",
        a,
        call!(VolC.extend_volume(ExtendVolumeRequest { name: s("nope"), size_bytes: MIB })),
        nf,
        &[vnf],
    );
    add(
        "VolumeService/SetVolumeTier",
        "unknown",
        t,
        call!(VolC.set_volume_tier(SetVolumeTierRequest { name: s("nope"), tier: s("high") })),
        nf,
        &[vnf],
    );
    add(
        "VolumeService/AttachVolume",
        "unknown",
        t,
        call!(VolC.attach_volume(AttachVolumeRequest { name: s("nope"), ..Default::default() })),
        nf,
        &[vnf],
    );
    add(
        "VolumeService/DetachVolume",
        "unknown",
        t,
        call!(VolC.detach_volume(DetachVolumeRequest { name: s("nope") })),
        nf,
        &[vnf],
    );
    add(
        "VolumeService/CreateVolume",
        "clone of an unknown volume",
        a,
        call!(VolC.create_volume(CreateVolumeRequest {
            name: s("clone"),
            from_snapshot: s("nope@s1"),
            ..Default::default()
        })),
        nf,
        &[vnf],
    );
    add(
        "VolumeService/CreateVolume",
        "clone of an unknown snapshot",
        a,
        call!(VolC.create_volume(CreateVolumeRequest {
            name: s("clone"),
            from_snapshot: s("adm@nope"),
            ..Default::default()
        })),
        nf,
        &["snapshot", "nope", "not found"],
    );
    add(
        "VolumeService/CreateVolume",
        "from_snapshot without @",
        a,
        call!(VolC.create_volume(CreateVolumeRequest {
            name: s("clone"),
            from_snapshot: s("adm"),
            ..Default::default()
        })),
        ia,
        &["expected VOLUME@SNAP"],
    );
    add(
        "SnapshotService/CreateSnapshot",
        "unknown volume",
        t,
        call!(SnapC.create_snapshot(CreateSnapshotRequest { volume: s("nope"), name: s("s9") })),
        nf,
        &[vnf],
    );
    add(
        "SnapshotService/CreateGroupSnapshot",
        "unknown volume",
        t,
        call!(SnapC.create_group_snapshot(CreateGroupSnapshotRequest {
            name: s("g9"),
            volumes: vec![s("w"), s("nope")],
            ..Default::default()
        })),
        nf,
        &[vnf],
    );
    add(
        "SnapshotService/CreateGroupSnapshot",
        "unknown server",
        t,
        call!(SnapC.create_group_snapshot(CreateGroupSnapshotRequest {
            name: s("g9"),
            server: s("nope"),
            ..Default::default()
        })),
        nf,
        &["server \"nope\" not found"],
    );
    add(
        "SnapshotService/ListSnapshots",
        "unknown volume",
        t,
        call!(SnapC.list_snapshots(ListSnapshotsRequest { volume: s("nope") })),
        nf,
        &[vnf],
    );
    let snf = "snapshot";
    add(
        "SnapshotService/GetSnapshot",
        "unknown",
        t,
        call!(SnapC.get_snapshot(GetSnapshotRequest { volume: s("v"), name: s("nope") })),
        nf,
        &[snf, "nope", "not found"],
    );
    add(
        "SnapshotService/DeleteSnapshot",
        "unknown",
        t,
        call!(SnapC.delete_snapshot(DeleteSnapshotRequest { volume: s("v"), name: s("nope") })),
        nf,
        &[snf, "nope", "not found"],
    );
    add(
        "SnapshotService/RollbackSnapshot",
        "unknown",
        t,
        call!(SnapC.rollback_snapshot(RollbackSnapshotRequest { volume: s("w"), name: s("nope") })),
        nf,
        &[snf, "nope", "not found"],
    );
    add(
        "SnapshotService/AttachSnapshot",
        "unknown",
        t,
        call!(SnapC.attach_snapshot(AttachSnapshotRequest { volume: s("w"), name: s("nope"), ..Default::default() })),
        nf,
        &[snf, "nope", "not found"],
    );
    add(
        "SnapshotService/DetachSnapshot",
        "unknown",
        t,
        call!(SnapC.detach_snapshot(DetachSnapshotRequest { volume: s("w"), name: s("nope") })),
        nf,
        &[snf, "nope", "not found"],
    );
    add(
        "SnapshotService/DiffSnapshots",
        "unknown volume",
        t,
        diff_call(DiffSnapshotsRequest { volume: s("nope"), ..Default::default() }),
        nf,
        &[vnf],
    );
    add(
        "SnapshotService/DiffSnapshots",
        "unknown from",
        t,
        diff_call(DiffSnapshotsRequest { volume: s("v"), from: s("nope"), to: String::new() }),
        nf,
        &[snf, "nope"],
    );
    add(
        "TenantService/GetTenant",
        "unknown",
        a,
        call!(TenantC.get_tenant(GetTenantRequest { name: s("nobody") })),
        nf,
        &["tenant \"nobody\" not found"],
    );
    add(
        "TenantService/DeleteTenant",
        "unknown",
        a,
        call!(TenantC.delete_tenant(DeleteTenantRequest { name: s("nobody") })),
        nf,
        &["tenant \"nobody\" not found"],
    );
    add(
        "TenantService/SetTenantQuota",
        "unknown",
        a,
        call!(TenantC.set_tenant_quota(SetTenantQuotaRequest {
            name: s("nobody"),
            max_volumes: Some(1),
            ..Default::default()
        })),
        nf,
        &["tenant \"nobody\" not found"],
    );
    add(
        "ServerService/GetServer",
        "unknown",
        t,
        call!(ServerC.get_server(GetServerRequest { name: s("nope") })),
        nf,
        &["server \"nope\" not found"],
    );
    add(
        "ServerService/DeleteServer",
        "unknown",
        t,
        call!(ServerC.delete_server(DeleteServerRequest { name: s("nope") })),
        nf,
        &["server \"nope\" not found"],
    );
    add(
        "ServerService/CreateServer",
        "unknown volume",
        t,
        call!(ServerC.create_server(CreateServerRequest { name: s("srv2"), volumes: vec![s("x"), s("nope")] })),
        nf,
        &[vnf],
    );
    for id in [0u64, 999_999, u64::MAX] {
        add(
            "JobService/GetJob",
            &format!("unknown {id}"),
            t,
            call!(JobC.get_job(GetJobRequest { id })),
            nf,
            &[&format!("job {id} not found")],
        );
        add(
            "JobService/CancelJob",
            &format!("unknown {id}"),
            t,
            call!(JobC.cancel_job(CancelJobRequest { id })),
            nf,
            &[&format!("job {id} not found")],
        );
    }
    add(
        "BackupService/CreateBackup",
        "unknown volume",
        t,
        call!(BackupC.create_backup(CreateBackupRequest { volume: s("nope"), ..Default::default() })),
        nf,
        &[vnf],
    );
    add(
        "BackupService/CreateServerBackup",
        "unknown server",
        t,
        call!(BackupC.create_server_backup(CreateServerBackupRequest { server: s("nope"), name: String::new() })),
        nf,
        &["server \"nope\" not found"],
    );
    // (ListBackups of a volume or server that does not exist lists nothing: backups outlive
    // their volumes, so the name alone is no error.)
    // A well-formed id no backup has: the real one with another suffix.
    let unknown_id = {
        let mut id = ctx.backup_id.clone();
        let last = id.pop().unwrap();
        id.push(if last == '0' { '1' } else { '0' });
        id
    };
    for (m, c) in [
        ("BackupService/GetBackup", call!(BackupC.get_backup(GetBackupRequest { id: unknown_id.clone() }))),
        ("BackupService/DeleteBackup", call!(BackupC.delete_backup(DeleteBackupRequest { id: unknown_id.clone() }))),
        ("BackupService/VerifyBackup", call!(BackupC.verify_backup(VerifyBackupRequest { id: unknown_id.clone() }))),
        (
            "BackupService/RestoreBackup",
            call!(BackupC.restore_backup(RestoreBackupRequest {
                id: unknown_id.clone(),
                to: s("r1"),
                ..Default::default()
            })),
        ),
    ] {
        add(m, "unknown id", t, c, nf, &["backup", "not found"]);
    }
    add(
        "PolicyService/DeletePolicy",
        "unknown",
        t,
        call!(PolicyC.delete_policy(DeletePolicyRequest { name: s("nope") })),
        nf,
        &["policy \"nope\" not found"],
    );
    add(
        "PolicyService/RunPolicy",
        "unknown",
        t,
        call!(PolicyC.run_policy(RunPolicyRequest { name: s("nope") })),
        nf,
        &["policy \"nope\" not found"],
    );
    add(
        "PolicyService/BindPolicy",
        "unknown policy",
        t,
        call!(PolicyC.bind_policy(BindPolicyRequest { name: s("nope"), volume: s("w"), server: String::new() })),
        nf,
        &["policy \"nope\" not found"],
    );
    add(
        "PolicyService/BindPolicy",
        "unknown volume",
        t,
        call!(PolicyC.bind_policy(BindPolicyRequest { name: s("p"), volume: s("nope"), server: String::new() })),
        nf,
        &[vnf],
    );
    add(
        "PolicyService/BindPolicy",
        "unknown server",
        t,
        call!(PolicyC.bind_policy(BindPolicyRequest { name: s("p"), volume: String::new(), server: s("nope") })),
        nf,
        &["server \"nope\" not found"],
    );
    add(
        "PolicyService/UnbindPolicy",
        "unknown policy",
        t,
        call!(PolicyC.unbind_policy(UnbindPolicyRequest { name: s("nope"), volume: s("x"), server: String::new() })),
        nf,
        &["policy \"nope\" not found"],
    );
    // (UnbindPolicy of a volume that does not exist succeeds: a deleted volume's binding went
    // with it.)
    let gnf = "DR group \"nope\" not found";
    macro_rules! group_nf {
        ($method:literal, $client:ident . $rpc:ident ( $m:expr )) => {
            add($method, "unknown group", t, call!($client.$rpc($m)), nf, &[gnf])
        };
    }
    group_nf!("DrService/GetGroup", DrC.get_group(GetGroupRequest { name: s("nope") }));
    group_nf!("DrService/DeleteGroup", DrC.delete_group(DeleteGroupRequest { name: s("nope") }));
    group_nf!("DrService/Protect", DrC.protect(ProtectRequest { group: s("nope"), server: s("srv") }));
    group_nf!("DrService/Unprotect", DrC.unprotect(UnprotectRequest { group: s("nope"), server: s("srv") }));
    group_nf!("DrService/Enable", DrC.enable(EnableRequest { group: s("nope") }));
    group_nf!("DrService/Disable", DrC.disable(DisableRequest { group: s("nope") }));
    group_nf!("DrService/Status", DrC.status(StatusRequest { group: s("nope") }));
    group_nf!("DrService/StartDrill", DrC.start_drill(StartDrillRequest { group: s("nope") }));
    group_nf!("DrService/StopDrill", DrC.stop_drill(StopDrillRequest { group: s("nope") }));
    group_nf!("DrService/Switchover", DrC.switchover(SwitchoverRequest { group: s("nope") }));
    group_nf!("DrService/Failover", DrC.failover(FailoverRequest { group: s("nope") }));
    group_nf!("DrService/Reprotect", DrC.reprotect(ReprotectRequest { group: s("nope") }));

    // ---- duplicates ----
    add(
        "VolumeService/CreateVolume",
        "duplicate",
        a,
        call!(VolC.create_volume(CreateVolumeRequest { name: s("adm"), size_bytes: MIB, ..Default::default() })),
        ae,
        &["volume \"adm\" already exists"],
    );
    add(
        "VolumeService/CreateVolume",
        "duplicate clone",
        a,
        call!(VolC.create_volume(CreateVolumeRequest {
            name: s("adm"),
            from_snapshot: s("adm@as"),
            ..Default::default()
        })),
        ae,
        &["volume \"adm\" already exists"],
    );
    add(
        "SnapshotService/CreateSnapshot",
        "duplicate",
        t,
        call!(SnapC.create_snapshot(CreateSnapshotRequest { volume: s("w"), name: s("ws") })),
        ae,
        &["snapshot", "ws", "already exists"],
    );
    add(
        "SnapshotService/CreateGroupSnapshot",
        "duplicate in one volume",
        t,
        call!(SnapC.create_group_snapshot(CreateGroupSnapshotRequest {
            name: s("ws"),
            volumes: vec![s("x"), s("w")],
            ..Default::default()
        })),
        ae,
        &["ws", "already exists"],
    );
    add(
        "SnapshotService/CreateGroupSnapshot",
        "a volume listed twice",
        t,
        call!(SnapC.create_group_snapshot(CreateGroupSnapshotRequest {
            name: s("g9"),
            volumes: vec![s("w"), s("w")],
            ..Default::default()
        })),
        ia,
        &["each listed once"],
    );
    add(
        "SnapshotService/CreateGroupSnapshot",
        "no volume",
        t,
        call!(SnapC.create_group_snapshot(CreateGroupSnapshotRequest { name: s("g9"), ..Default::default() })),
        ia,
        &["at least one volume"],
    );
    add(
        "SnapshotService/CreateGroupSnapshot",
        "volumes and a server",
        t,
        call!(SnapC.create_group_snapshot(CreateGroupSnapshotRequest {
            name: s("g9"),
            volumes: vec![s("x")],
            server: s("srv")
        })),
        ia,
        &["either volumes or a server"],
    );
    add(
        "TenantService/CreateTenant",
        "duplicate",
        a,
        call!(TenantC.create_tenant(CreateTenantRequest { name: s("t"), ..Default::default() })),
        ae,
        &["tenant \"t\" already exists"],
    );
    add(
        "TenantService/CreateTenant",
        "admin",
        a,
        call!(TenantC.create_tenant(CreateTenantRequest { name: s("admin"), ..Default::default() })),
        ae,
        &["tenant \"admin\" already exists"],
    );
    add(
        "ServerService/CreateServer",
        "duplicate",
        t,
        call!(ServerC.create_server(CreateServerRequest { name: s("srv"), volumes: vec![s("x")] })),
        ae,
        &["server \"srv\" already exists"],
    );
    add(
        "ServerService/CreateServer",
        "volume in another server",
        t,
        call!(ServerC.create_server(CreateServerRequest { name: s("srv2"), volumes: vec![s("w")] })),
        fp,
        &["belongs to server \"srv\""],
    );
    add(
        "ServerService/CreateServer",
        "a volume listed twice",
        t,
        call!(ServerC.create_server(CreateServerRequest { name: s("srv2"), volumes: vec![s("x"), s("x")] })),
        ia,
        &["each listed once"],
    );
    add(
        "ServerService/CreateServer",
        "no volume",
        t,
        call!(ServerC.create_server(CreateServerRequest { name: s("srv2"), volumes: vec![] })),
        ia,
        &["volumes"],
    );
    add(
        "ServerService/CreateServer",
        "300 volumes",
        t,
        call!(ServerC.create_server(CreateServerRequest {
            name: s("srv2"),
            volumes: (0..300).map(|i| format!("v{i}")).collect()
        })),
        ia,
        &["volumes"],
    );
    add(
        "PolicyService/CreatePolicy",
        "duplicate",
        t,
        call!(PolicyC.create_policy(CreatePolicyRequest {
            name: s("p"),
            schedule: s("0 0 1 1 *"),
            retention: Some(Retention { keep_last: 1, ..Default::default() })
        })),
        ae,
        &["policy \"p\" already exists"],
    );
    add(
        "PolicyService/BindPolicy",
        "volume bound to another policy",
        t,
        call!(PolicyC.bind_policy(BindPolicyRequest { name: s("p2"), volume: s("x"), server: String::new() })),
        fp,
        &["volume x is bound to policy \"p\" already"],
    );
    add(
        "PolicyService/UnbindPolicy",
        "volume bound to another policy",
        t,
        call!(PolicyC.unbind_policy(UnbindPolicyRequest { name: s("p2"), volume: s("x"), server: String::new() })),
        fp,
        &["volume x is bound to policy \"p\", not to \"p2\""],
    );
    add(
        "DrService/CreateGroup",
        "duplicate",
        a,
        call!(DrC.create_group(CreateGroupRequest {
            name: s("rg"),
            target_endpoint: s("http://127.0.0.1:9"),
            target_token: s("x"),
            ..Default::default()
        })),
        ae,
        &["DR group \"rg\" already exists"],
    );
    add(
        "ReplicationService/RegisterGroup",
        "duplicate",
        a,
        call!(ReplC.register_group(RegisterGroupRequest {
            name: s("rg"),
            secret: "cd".repeat(32),
            source_endpoint: s("http://127.0.0.1:9"),
            ..Default::default()
        })),
        ae,
        &["DR group \"rg\" already exists"],
    );
    add(
        "ReplicationService/PreparePairs",
        "a name taken by a volume",
        grp,
        call!(ReplC.prepare_pairs(PreparePairsRequest {
            pairs: vec![
                PairSpec { server: s("srv"), volume: s("fresh"), size_bytes: MIB, tier: String::new() },
                PairSpec { server: s("srv"), volume: s("adm"), size_bytes: MIB, tier: String::new() },
            ]
        })),
        ae,
        &["volume \"adm\" already exists"],
    );

    // ---- quotas and limits ----
    add(
        "VolumeService/CreateVolume",
        "volume count quota",
        t,
        call!(VolC.create_volume(CreateVolumeRequest { name: s("y"), size_bytes: MIB, ..Default::default() })),
        re,
        &["quota exceeded", "4 of its 4 volumes"],
    );
    add(
        "VolumeService/ExtendVolume",
        "capacity quota",
        t,
        call!(VolC.extend_volume(ExtendVolumeRequest { name: s("x"), size_bytes: 32 * MIB })),
        re,
        &["quota exceeded", "64 MiB"],
    );
    add(
        "VolumeService/CreateVolume",
        "clone past the quota",
        t,
        call!(VolC.create_volume(CreateVolumeRequest { name: s("y"), from_snapshot: s("w@ws"), ..Default::default() })),
        re,
        &["quota exceeded"],
    );
    add(
        "SnapshotService/CreateSnapshot",
        "snapshot limit",
        t,
        call!(SnapC.create_snapshot(CreateSnapshotRequest { volume: s("v"), name: s("s3") })),
        re,
        &["snapshot", "2"],
    );
    add(
        "SnapshotService/CreateGroupSnapshot",
        "snapshot limit of one member",
        t,
        call!(SnapC.create_group_snapshot(CreateGroupSnapshotRequest {
            name: s("g9"),
            volumes: vec![s("x"), s("v")],
            ..Default::default()
        })),
        re,
        &["snapshot"],
    );
    add(
        "BackupService/CreateBackup",
        "backups per volume",
        t,
        call!(BackupC.create_backup(CreateBackupRequest { volume: s("bv"), ..Default::default() })),
        re,
        &["backup limit"],
    );
    add(
        "BackupService/RestoreBackup",
        "restore past the quota",
        t,
        call!(BackupC.restore_backup(RestoreBackupRequest {
            id: ctx.backup_id.clone(),
            to: s("r1"),
            ..Default::default()
        })),
        re,
        &["quota exceeded"],
    );
    add(
        "ReplicationService/PreparePairs",
        "a replica of 0 bytes",
        grp,
        call!(ReplC.prepare_pairs(PreparePairsRequest {
            pairs: vec![PairSpec { server: s("srv"), volume: s("fresh"), size_bytes: 0, tier: String::new() }]
        })),
        ia,
        &["invalid size"],
    );
    add(
        "ReplicationService/PreparePairs",
        "a replica of 2^64-1 bytes",
        grp,
        call!(ReplC.prepare_pairs(PreparePairsRequest {
            pairs: vec![PairSpec { server: s("srv"), volume: s("fresh"), size_bytes: u64::MAX, tier: String::new() }]
        })),
        ia,
        &["invalid size"],
    );

    // ---- preconditions ----
    add(
        "VolumeService/DeleteVolume",
        "attached",
        t,
        call!(VolC.delete_volume(DeleteVolumeRequest { name: s("v") })),
        fp,
        &["volume \"v\" is attached"],
    );
    add(
        "VolumeService/DeleteVolume",
        "in a server",
        t,
        call!(VolC.delete_volume(DeleteVolumeRequest { name: s("w") })),
        fp,
        &["belongs to server \"srv\""],
    );
    add(
        "SnapshotService/RollbackSnapshot",
        "connected clients",
        t,
        call!(SnapC.rollback_snapshot(RollbackSnapshotRequest { volume: s("v"), name: s("s1") })),
        fp,
        &["NBD connection"],
    );
    add(
        "SnapshotService/DeleteSnapshot",
        "attached snapshot",
        t,
        call!(SnapC.delete_snapshot(DeleteSnapshotRequest { volume: s("v"), name: s("s1") })),
        fp,
        &["attached"],
    );
    add(
        "SnapshotService/DiffSnapshots",
        "from is not an ancestor",
        t,
        diff_call(DiffSnapshotsRequest { volume: s("v"), from: s("s2"), to: s("s1") }),
        ia,
        &["s2"],
    );
    add(
        "TenantService/DeleteTenant",
        "admin",
        a,
        call!(TenantC.delete_tenant(DeleteTenantRequest { name: s("admin") })),
        fp,
        &["admin tenant cannot be deleted"],
    );
    add(
        "TenantService/DeleteTenant",
        "with volumes",
        a,
        call!(TenantC.delete_tenant(DeleteTenantRequest { name: s("t") })),
        fp,
        &["still owns 4 volume"],
    );
    add(
        "JobService/CancelJob",
        "finished job",
        t,
        call!(JobC.cancel_job(CancelJobRequest { id: ctx.done_job })),
        fp,
        &["already succeeded"],
    );
    add(
        "BackupService/RestoreBackup",
        "neither to nor in place",
        t,
        call!(BackupC.restore_backup(RestoreBackupRequest { id: ctx.backup_id.clone(), ..Default::default() })),
        ia,
        &["exactly one of --to NEW_VOLUME and --in-place"],
    );
    add(
        "BackupService/RestoreBackup",
        "to and in place",
        t,
        call!(BackupC.restore_backup(RestoreBackupRequest {
            id: ctx.backup_id.clone(),
            to: s("r1"),
            in_place: true,
            tier: String::new()
        })),
        ia,
        &["exactly one of"],
    );
    add(
        "BackupService/RestoreBackup",
        "to an existing volume",
        t,
        call!(BackupC.restore_backup(RestoreBackupRequest {
            id: ctx.backup_id.clone(),
            to: s("x"),
            ..Default::default()
        })),
        ae,
        &["volume \"x\" already exists"],
    );
    add(
        "BackupService/ListBackups",
        "a volume and a server",
        t,
        call!(BackupC.list_backups(ListBackupsRequest { volume: s("bv"), server: s("srv") })),
        ia,
        &["volume", "server"],
    );
    for (key, why) in [
        ("xyz", "not hex"),
        (&*"ab".repeat(31), "31 bytes"),
        (&*"zz".repeat(32), "64 non-hex"),
        (&*"ab".repeat(33), "33 bytes"),
    ] {
        let key = key.to_string();
        add(
            "BackupService/SetEncryptionKey",
            why,
            t,
            call!(BackupC.set_encryption_key(SetEncryptionKeyRequest { key_hex: key.clone() })),
            ia,
            &["invalid encryption key"],
        );
    }
    for (sched, why) in
        [("", "empty"), ("not cron", "words"), ("61 * * * *", "minute 61"), ("* * * * * * * *", "8 fields")]
    {
        add(
            "PolicyService/CreatePolicy",
            &format!("schedule {why}"),
            t,
            call!(PolicyC.create_policy(CreatePolicyRequest {
                name: s("p2"),
                schedule: s(sched),
                retention: Some(Retention { keep_last: 1, ..Default::default() })
            })),
            ia,
            &["schedule"],
        );
    }
    add(
        "PolicyService/BindPolicy",
        "neither volume nor server",
        t,
        call!(PolicyC.bind_policy(BindPolicyRequest { name: s("p"), ..Default::default() })),
        ia,
        &["exactly one of a volume and a server"],
    );
    add(
        "PolicyService/BindPolicy",
        "a volume and a server",
        t,
        call!(PolicyC.bind_policy(BindPolicyRequest { name: s("p"), volume: s("w"), server: s("srv") })),
        ia,
        &["exactly one of a volume and a server"],
    );
    add(
        "PolicyService/UnbindPolicy",
        "neither volume nor server",
        t,
        call!(PolicyC.unbind_policy(UnbindPolicyRequest { name: s("p"), ..Default::default() })),
        ia,
        &["exactly one of a volume and a server"],
    );
    for (ep, why) in [("", "empty endpoint"), ("ftp://h:1", "ftp"), ("127.0.0.1:10810", "no scheme")] {
        add(
            "DrService/CreateGroup",
            why,
            t,
            call!(DrC.create_group(CreateGroupRequest {
                name: s("g2"),
                target_endpoint: s(ep),
                target_token: s("x"),
                ..Default::default()
            })),
            ia,
            &["invalid endpoint"],
        );
    }
    add(
        "DrService/CreateGroup",
        "no target token",
        t,
        call!(DrC.create_group(CreateGroupRequest {
            name: s("g2"),
            target_endpoint: s("http://127.0.0.1:9"),
            ..Default::default()
        })),
        ia,
        &["--target-token is required"],
    );
    add(
        "DrService/CreateGroup",
        "interval over a day",
        t,
        call!(DrC.create_group(CreateGroupRequest {
            name: s("g2"),
            target_endpoint: s("http://127.0.0.1:9"),
            target_token: s("x"),
            interval_seconds: u64::MAX,
            ..Default::default()
        })),
        ia,
        &["more than a day"],
    );
    add(
        "DrService/CreateGroup",
        "unreachable target",
        t,
        call!(DrC.create_group(CreateGroupRequest {
            name: s("g2"),
            target_endpoint: s("http://127.0.0.1:9"),
            target_token: s("x"),
            ..Default::default()
        })),
        Code::Unavailable,
        &["127.0.0.1:9"],
    );
    // The admin's group is a target group here: source-side calls say so.
    for (m, c) in [
        ("DrService/Protect", call!(DrC.protect(ProtectRequest { group: s("rg"), server: s("asrv") }))),
        ("DrService/Switchover", call!(DrC.switchover(SwitchoverRequest { group: s("rg") }))),
        ("DrService/Reprotect", call!(DrC.reprotect(ReprotectRequest { group: s("rg") }))),
    ] {
        add(m, "on a target group", a, c, fp, &["DR group \"rg\" is target on this daemon"]);
    }
    add(
        "DrService/Unprotect",
        "server not protected",
        a,
        call!(DrC.unprotect(UnprotectRequest { group: s("rg"), server: s("asrv") })),
        nf,
        &["not protected"],
    );
    add(
        "DrService/StartDrill",
        "on a target group",
        a,
        call!(DrC.start_drill(StartDrillRequest { group: s("rg") })),
        fp,
        &["DR group \"rg\" is target on this daemon; this needs its source"],
    );
    add(
        "DrService/StopDrill",
        "on a target group",
        a,
        call!(DrC.stop_drill(StopDrillRequest { group: s("rg") })),
        fp,
        &["DR group \"rg\" is target on this daemon"],
    );
    add(
        "DrService/Failover",
        "no consistent point yet",
        a,
        call!(DrC.failover(FailoverRequest { group: s("rg") })),
        fp,
        &["no consistent point"],
    );
    add(
        "ReplicationService/RegisterGroup",
        "short secret",
        t,
        call!(ReplC.register_group(RegisterGroupRequest { name: s("g3"), secret: s("abc"), ..Default::default() })),
        ia,
        &["64 hex digits"],
    );
    add(
        "ReplicationService/RegisterGroup",
        "non-hex secret",
        t,
        call!(ReplC.register_group(RegisterGroupRequest {
            name: s("g3"),
            secret: "zz".repeat(32),
            ..Default::default()
        })),
        ia,
        &["64 hex digits"],
    );
    // (RemovePairs of a volume that is no pair succeeds: the source retries it after a lost reply.)
    add("ReplicationService/Apply", "no begin message", grp, apply_call(vec![]), ia, &["begin message"]);
    add(
        "ReplicationService/Apply",
        "frames before begin",
        grp,
        apply_call(vec![ApplyMessage { body: Some(apply_message::Body::Frames(vec![1, 2, 3])) }]),
        ia,
        &["begin message"],
    );
    add(
        "ReplicationService/Apply",
        "a cycle from a point this daemon lacks",
        grp,
        apply_call(vec![ApplyMessage {
            body: Some(apply_message::Body::Begin(ApplyBegin { seq: 9, base_seq: 5, pairs: vec![], point_unix_ms: 1 })),
        }]),
        fp,
        &["point"],
    );
    add(
        "ReplicationService/Drill",
        "no consistent point yet",
        grp,
        call!(ReplC.drill(PeerDrillRequest { start: true })),
        fp,
        &["no consistent point"],
    );
    add(
        "ReplicationService/Promote",
        "a point this daemon lacks",
        grp,
        call!(ReplC.promote(PromoteRequest { seq: 7 })),
        fp,
        &["point"],
    );
    add(
        "ReplicationService/Demote",
        "to point 0",
        grp,
        call!(ReplC.demote(DemoteRequest { seq: 0, source_endpoint: s("http://127.0.0.1:8"), source_az: s("az9") })),
        fp,
        &["the request is about point 0"],
    );
    add(
        "ReplicationService/Demote",
        "to a point this daemon lacks",
        grp,
        call!(ReplC.demote(DemoteRequest { seq: 3, source_endpoint: s("http://127.0.0.1:8"), source_az: s("az9") })),
        fp,
        &["DR group \"rg\" is target on this daemon; this needs its source"],
    );

    // ---- admin-only calls by a tenant ----
    let admin_only = "admin tenant only";
    add(
        "TenantService/CreateTenant",
        "by a tenant",
        t,
        call!(TenantC.create_tenant(CreateTenantRequest { name: s("u"), ..Default::default() })),
        pd,
        &[admin_only],
    );
    add(
        "TenantService/ListTenants",
        "by a tenant",
        t,
        call!(TenantC.list_tenants(ListTenantsRequest {})),
        pd,
        &[admin_only],
    );
    add(
        "TenantService/GetTenant",
        "another tenant",
        t,
        call!(TenantC.get_tenant(GetTenantRequest { name: s("admin") })),
        pd,
        &[admin_only],
    );
    add(
        "TenantService/DeleteTenant",
        "by a tenant",
        t,
        call!(TenantC.delete_tenant(DeleteTenantRequest { name: s("t") })),
        pd,
        &[admin_only],
    );
    add(
        "TenantService/SetTenantQuota",
        "by a tenant",
        t,
        call!(TenantC.set_tenant_quota(SetTenantQuotaRequest {
            name: s("t"),
            max_volumes: Some(1000),
            max_capacity_bytes: Some(0)
        })),
        pd,
        &[admin_only],
    );
    add(
        "AuditService/ListAudit",
        "by a tenant",
        t,
        call!(AuditC.list_audit(ListAuditRequest::default())),
        pd,
        &[admin_only],
    );
    add(
        "BackupService/CollectGarbage",
        "by a tenant",
        t,
        call!(BackupC.collect_garbage(CollectGarbageRequest {})),
        pd,
        &[admin_only],
    );

    // ---- credentials, for every RPC ----
    for method in all_methods() {
        let Some(c) = default_call(&method) else { continue };
        let m: &'static str = Box::leak(method.clone().into_boxed_str());
        if m.starts_with("ReplicationService/") && m != "ReplicationService/RegisterGroup" {
            // Node-to-node calls: the group's secret, not a tenant token.
            add(m, "no credentials", &Auth::None, c, Code::Unauthenticated, &["missing credentials"]);
            let key = match grp {
                Auth::Group { key, .. } => key.clone(),
                _ => unreachable!(),
            };
            for (why, auth) in [
                ("a tenant token as the secret", Auth::Group { key: key.clone(), secret: token_of(a) }),
                ("a wrong secret", Auth::Group { key: key.clone(), secret: "ab".repeat(32) }),
                ("an unknown group", Auth::Group { key: s("admin/nope"), secret: "ab".repeat(32) }),
                ("another tenant's group key", Auth::Group { key: s("t/rg"), secret: secret_of(grp) }),
                ("no group key", Auth::Bearer(secret_of(grp))),
            ] {
                add(m, why, &auth, default_call(m).unwrap(), Code::Unauthenticated, &["invalid token"]);
            }
        } else {
            add(m, "no credentials", &Auth::None, c, Code::Unauthenticated, &["missing credentials"]);
            add(
                m,
                "unknown token",
                &Auth::bearer(&"f".repeat(64)),
                default_call(m).unwrap(),
                Code::Unauthenticated,
                &["invalid token"],
            );
            add(
                m,
                "malformed authorization",
                &Auth::Bearer(String::new()),
                default_call(m).unwrap(),
                Code::Unauthenticated,
                &["authorization"],
            );
        }
    }
    out
}

fn token_of(a: &Auth) -> String {
    match a {
        Auth::Bearer(t) => t.clone(),
        _ => unreachable!(),
    }
}

fn secret_of(a: &Auth) -> String {
    match a {
        Auth::Group { secret, .. } => secret.clone(),
        _ => unreachable!(),
    }
}

/// Everything a refused call must leave as it was, as text: every list of both tenants, the
/// snapshots of every volume, the tenants with their usage, the daemon's own counts.
fn state(g: &Grpc, d: &Daemon, ctx: &Ctx) -> Vec<(String, String)> {
    use pb::*;
    let ch = g.channel();
    let mut out = Vec::new();
    g.block_on(async {
        for (who, auth) in [("admin", &ctx.admin), ("t", &ctx.t)] {
            let mut vols =
                VolC::new(ch.clone()).list_volumes(req(auth, ListVolumesRequest {})).await.unwrap().into_inner();
            for v in &mut vols.volumes {
                v.qos = None; // burst balances refill with time
            }
            for v in &vols.volumes {
                let snaps = SnapC::new(ch.clone())
                    .list_snapshots(req(auth, ListSnapshotsRequest { volume: v.name.clone() }))
                    .await
                    .unwrap()
                    .into_inner();
                out.push((format!("{who}: snapshots of {}", v.name), format!("{snaps:?}")));
            }
            out.push((format!("{who}: volumes"), format!("{vols:?}")));
            let r = ServerC::new(ch.clone()).list_servers(req(auth, ListServersRequest {})).await.unwrap();
            out.push((format!("{who}: servers"), format!("{:?}", r.into_inner())));
            let r = JobC::new(ch.clone()).list_jobs(req(auth, ListJobsRequest {})).await.unwrap();
            out.push((format!("{who}: jobs"), format!("{:?}", r.into_inner())));
            let r = PolicyC::new(ch.clone()).list_policies(req(auth, ListPoliciesRequest {})).await.unwrap();
            out.push((format!("{who}: policies"), format!("{:?}", r.into_inner())));
            let r = BackupC::new(ch.clone()).list_backups(req(auth, ListBackupsRequest::default())).await.unwrap();
            out.push((format!("{who}: backups"), format!("{:?}", r.into_inner())));
            let mut r = DrC::new(ch.clone()).list_groups(req(auth, ListGroupsRequest {})).await.unwrap().into_inner();
            for g in &mut r.groups {
                g.rpo_seconds = 0.0;
            }
            out.push((format!("{who}: DR groups"), format!("{r:?}")));
        }
        let r = TenantC::new(ch.clone()).list_tenants(req(&ctx.admin, ListTenantsRequest {})).await.unwrap();
        out.push(("tenants".into(), format!("{:?}", r.into_inner())));
    });
    let m = d.metrics();
    for name in ["evs_volumes", "evs_attached_volumes", "evs_tenants"] {
        out.push((name.into(), format!("{:?}", m.get(name, &[]))));
    }
    out
}

fn wait_job(g: &Grpc, auth: &Auth, id: u64) -> pb::Job {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let j = g
            .block_on(JobC::new(g.channel()).get_job(req(auth, pb::GetJobRequest { id })))
            .unwrap()
            .into_inner()
            .job
            .unwrap();
        if matches!(j.state(), pb::JobState::Succeeded | pb::JobState::Failed | pb::JobState::Cancelled) {
            return j;
        }
        assert!(Instant::now() < deadline, "job {id} did not end in 60 s: {j:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Tenant `t` at its quotas (4 volumes, 64 MiB): `v` attached with an NBD client connected and
/// at its snapshot limit (s1 attached, s2), `w` with snapshot `ws` in server `srv`, `bv` at its
/// backup limit, `x` bound to policy `p`. The admin: volume `adm` with snapshot `as` in server
/// `asrv`, and DR group `rg` registered as a target group.
fn setup(d: &Daemon, g: &Grpc) -> (Ctx, NbdClient) {
    use pb::*;
    let ch = g.channel();
    let admin = Auth::bearer(d.token());
    let ok = |r: Result<(), Status>, what: &str| r.unwrap_or_else(|e| panic!("setup: {what}: {e:?}"));
    let t_token = g
        .block_on(TenantC::new(ch.clone()).create_tenant(req(
            &admin,
            CreateTenantRequest { name: "t".into(), max_volumes: 4, max_capacity_bytes: 64 * MIB },
        )))
        .unwrap()
        .into_inner()
        .token;
    let t = Auth::bearer(&t_token);
    let (uri, backup_id, done_job, secret) = g.block_on(async {
        let mut vol = VolC::new(ch.clone());
        let mut snap = SnapC::new(ch.clone());
        for (auth, name, size) in [(&t, "v", 16), (&t, "w", 16), (&t, "bv", 16), (&t, "x", 16), (&admin, "adm", 1)] {
            let r = vol
                .create_volume(req(
                    auth,
                    CreateVolumeRequest { name: name.into(), size_bytes: size * MIB, ..Default::default() },
                ))
                .await;
            ok(r.map(|_| ()), name);
        }
        for (auth, v, s) in [(&t, "v", "s1"), (&t, "v", "s2"), (&t, "w", "ws"), (&admin, "adm", "as")] {
            let r = snap.create_snapshot(req(auth, CreateSnapshotRequest { volume: v.into(), name: s.into() })).await;
            ok(r.map(|_| ()), s);
        }
        let a = vol
            .attach_volume(req(&t, AttachVolumeRequest { name: "v".into(), ..Default::default() }))
            .await
            .unwrap()
            .into_inner();
        let r = snap
            .attach_snapshot(req(
                &t,
                AttachSnapshotRequest { volume: "v".into(), name: "s1".into(), ..Default::default() },
            ))
            .await;
        ok(r.map(|_| ()), "attach v@s1");
        let mut srv = ServerC::new(ch.clone());
        let r = srv.create_server(req(&t, CreateServerRequest { name: "srv".into(), volumes: vec!["w".into()] })).await;
        ok(r.map(|_| ()), "server srv");
        let r = srv
            .create_server(req(&admin, CreateServerRequest { name: "asrv".into(), volumes: vec!["adm".into()] }))
            .await;
        ok(r.map(|_| ()), "server asrv");
        let b = BackupC::new(ch.clone())
            .create_backup(req(&t, CreateBackupRequest { volume: "bv".into(), ..Default::default() }))
            .await
            .unwrap()
            .into_inner();
        let mut pol = PolicyC::new(ch.clone());
        let r = pol
            .create_policy(req(
                &t,
                CreatePolicyRequest {
                    name: "p".into(),
                    schedule: "0 0 1 1 *".into(),
                    retention: Some(Retention { keep_last: 1, ..Default::default() }),
                },
            ))
            .await;
        ok(r.map(|_| ()), "policy p");
        let r = pol
            .create_policy(req(
                &t,
                CreatePolicyRequest {
                    name: "p2".into(),
                    schedule: "0 0 1 1 *".into(),
                    retention: Some(Retention { keep_daily: 7, ..Default::default() }),
                },
            ))
            .await;
        ok(r.map(|_| ()), "policy p2");
        let r = pol
            .bind_policy(req(&t, BindPolicyRequest { name: "p".into(), volume: "x".into(), server: String::new() }))
            .await;
        ok(r.map(|_| ()), "bind p");
        let secret = "5e".repeat(32);
        let r = ReplC::new(ch.clone())
            .register_group(req(
                &admin,
                RegisterGroupRequest {
                    name: "rg".into(),
                    secret: secret.clone(),
                    source_endpoint: "http://127.0.0.1:9".into(),
                    source_az: "az0".into(),
                    ca_cert_pem: String::new(),
                    source_tenant: "admin".into(),
                },
            ))
            .await;
        ok(r.map(|_| ()), "register rg");
        (a.uri, b.backup_id, b.job.unwrap().id, secret)
    });
    let j = wait_job(g, &t, done_job);
    assert_eq!(j.state(), pb::JobState::Succeeded, "setup: the backup of bv: {j:?}");
    let client = NbdClient::connect(&uri).expect("setup: an NBD client of v");
    let group = Auth::Group { key: "admin/rg".into(), secret };
    (Ctx { admin, t, group, backup_id, done_job }, client)
}

#[test]
fn every_rpc_refuses_bad_input_and_changes_nothing() {
    let d = Daemon::start_with(DaemonOptions {
        config: Some("max_snapshots_per_volume = 2\n[backups]\nmax_per_volume = 1\n".into()),
        ..Default::default()
    });
    let g = Grpc::connect(&d);
    let (ctx, _client) = setup(&d, &g);
    let cases = cases(&ctx);

    // Every RPC the daemon serves has a default call and at least one case beyond credentials.
    let methods = all_methods();
    assert!(methods.len() >= 60, "the descriptor set lists {} methods: {methods:?}", methods.len());
    let unknown: Vec<&String> = methods.iter().filter(|m| default_call(m).is_none()).collect();
    assert!(unknown.is_empty(), "RPCs without a case in api_bad_input.rs: {unknown:?}");
    let covered: BTreeSet<&str> =
        cases.iter().filter(|c| !matches!(c.code, Code::Unauthenticated)).map(|c| c.method).collect();
    let uncovered: Vec<&String> = methods
        .iter()
        .filter(|m| !covered.contains(m.as_str()))
        // Calls whose request has nothing to get wrong.
        .filter(|m| {
            !matches!(
                m.as_str(),
                "VolumeService/ListVolumes"
                    | "ServerService/ListServers"
                    | "JobService/ListJobs"
                    | "PolicyService/ListPolicies"
                    | "DrService/ListGroups"
                    | "ReplicationService/GetPoint"
                    | "ReplicationService/UnregisterGroup"
            )
        })
        .collect();
    assert!(uncovered.is_empty(), "RPCs with no bad-argument case: {uncovered:?}");
    for c in &cases {
        assert!(methods.iter().any(|m| m == c.method), "case for an unknown RPC {}", c.method);
    }

    let mut before = state(&g, &d, &ctx);
    let mut failures = Vec::new();
    let mut audit_seq = 0;
    for c in &cases {
        let label = format!("{} ({})", c.method, c.what.escape_debug());
        let r = g.block_on((c.call)(g.channel(), c.auth.clone()));
        match r {
            Ok(()) => failures.push(format!("{label}: succeeded, expected {:?}", c.code)),
            Err(s) => {
                if s.code() != c.code {
                    failures.push(format!("{label}: {:?} {:?}, expected {:?}", s.code(), s.message(), c.code));
                } else if let Some(m) = c.msg.iter().find(|m| !s.message().contains(m.as_str())) {
                    failures.push(format!("{label}: message {:?} lacks {m:?}", s.message()));
                }
                // The audit log: the newest entry is this call, with its result.
                let newest = g
                    .block_on(
                        AuditC::new(g.channel())
                            .list_audit(req(&ctx.admin, pb::ListAuditRequest { tenant: String::new(), limit: 1 })),
                    )
                    .unwrap()
                    .into_inner()
                    .entries
                    .pop();
                let fresh = newest.as_ref().filter(|e| e.seq > audit_seq);
                if let Some(e) = &newest {
                    audit_seq = audit_seq.max(e.seq);
                }
                // Mutating calls always; read-only ones when the credentials were refused.
                if is_mutating(c.method) || s.code() == Code::Unauthenticated {
                    let want_tenant = audit_tenant(&ctx, &c.auth, s.code());
                    match fresh {
                        None => failures.push(format!("{label}: not in the audit log")),
                        Some(e) => {
                            let want_result = format!("{:?}", s.code());
                            let got = (e.method.as_str(), e.tenant.as_str(), e.message.as_str());
                            if got != (c.method, want_tenant.as_str(), s.message())
                                || e.result.replace('_', "").to_lowercase() != want_result.to_lowercase()
                            {
                                failures.push(format!(
                                    "{label}: audit entry {e:?}, expected method {}, tenant {want_tenant}, result {want_result}",
                                    c.method
                                ));
                            }
                        }
                    }
                } else if let Some(e) = fresh {
                    failures.push(format!("{label}: a read-only call made an audit entry {e:?}"));
                }
            }
        }
        let after = state(&g, &d, &ctx);
        if after != before {
            let diff: Vec<String> = before
                .iter()
                .zip(&after)
                .filter(|(b, a)| b != a)
                .map(|(b, a)| format!("  {}:\n    before {}\n    after  {}", b.0, b.1, a.1))
                .collect();
            failures.push(format!("{label}: changed the state\n{}", diff.join("\n")));
            before = after;
        }
    }
    d.evsctl_ok(&["volume", "list"]);
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
}
