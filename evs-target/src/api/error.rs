//! The errors of the control API and the one place they become gRPC statuses.

use evs_snapshot::StoreError;
use tonic::{Code, Status};

use super::auth::AuthError;
use super::validate::{HumanBytes, ValidationError};
use crate::jobs::JobsError;

/// Everything a volume call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("volume {0:?} not found")]
    VolumeNotFound(String),
    #[error("volume {0:?} already exists")]
    VolumeExists(String),
    #[error("volume {0:?} is attached; detach it first")]
    Attached(String),
    #[error("volume {name:?} is being deleted (job {job})")]
    BeingDeleted { name: String, job: u64 },
    #[error(transparent)]
    Jobs(#[from] JobsError),
    #[error("snapshot {0:?} not found")]
    SnapshotNotFound(String),
    #[error("snapshot {0:?} already exists")]
    SnapshotExists(String),
    #[error(
        "volume {volume:?} has {connections} NBD connection(s) or vhost-user frontend(s); disconnect the clients (or detach) before a rollback"
    )]
    Connected { volume: String, connections: usize },
    #[error(
        "cannot shrink volume {name:?} from {} ({current} bytes) to {} ({requested} bytes): volumes only grow",
        HumanBytes(*current),
        HumanBytes(*requested)
    )]
    Shrink { name: String, current: u64, requested: u64 },
    #[error("tier \"unlimited\" is reserved for the admin tenant")]
    TierDenied,
    #[error("this daemon serves NBD on no unix socket (start evs-target with --nbd-socket PATH)")]
    NoUnixSocket,
    #[error("{0} is not supported yet")]
    Unsupported(&'static str),
    #[error("permission denied: {0} is for the admin tenant only")]
    PermissionDenied(&'static str),
    #[error("tenant {0:?} not found")]
    TenantNotFound(String),
    #[error("tenant {0:?} already exists")]
    TenantExists(String),
    #[error("the admin tenant cannot be deleted")]
    AdminTenant,
    #[error("tenant {tenant:?} still owns {volumes} volume(s); delete them first")]
    TenantHasVolumes { tenant: String, volumes: u64 },
    #[error("quota exceeded: tenant {tenant:?} has {used} of its {max} volumes")]
    QuotaVolumes { tenant: String, used: u64, max: u64 },
    #[error(
        "quota exceeded: tenant {tenant:?} uses {} of its {} capacity; {} more does not fit",
        HumanBytes(*used),
        HumanBytes(*max),
        HumanBytes(*asked)
    )]
    QuotaCapacity { tenant: String, used: u64, asked: u64, max: u64 },
    #[error("server {0:?} not found")]
    ServerNotFound(String),
    #[error("server {0:?} already exists")]
    ServerExists(String),
    #[error("volume {volume:?} belongs to server {server:?}; delete the server first")]
    VolumeInServer { volume: String, server: String },
    #[error("backup {0:?} not found")]
    BackupNotFound(String),
    #[error("backup store: {0}")]
    Backup(String),
    #[error("backup limit reached: {0}")]
    BackupLimit(String),
    #[error("a backup of volume {volume:?} is already queued or running (job {job})")]
    BackupInProgress { volume: String, job: u64 },
    #[error("volume {name:?} is being restored (job {job})")]
    BeingRestored { name: String, job: u64 },
    #[error("policy {0:?} not found")]
    PolicyNotFound(String),
    #[error("policy {0:?} already exists")]
    PolicyExists(String),
    #[error("{what} is bound to policy {policy:?} already; unbind it first (one policy per volume or server)")]
    PolicyBound { what: String, policy: String },
    #[error("{what} is bound to policy {policy:?}, not to {asked:?}")]
    BoundElsewhere { what: String, policy: String, asked: String },
    #[error("policy {policy:?} queued no backup: {errors}")]
    PolicyRun { policy: String, errors: String },
    #[error("DR group {0:?} not found")]
    GroupNotFound(String),
    #[error("DR group {0:?} already exists")]
    GroupExists(String),
    #[error("DR peer: {0}")]
    Peer(String),
    #[error("volume {name:?} is a replica of DR group {group:?}: it changes only through replication (use a drill, or fail over)")]
    Replica { name: String, group: String },
    #[error("volume {name:?} is being switched over (DR group {group:?}); attach it where it is promoted")]
    Switching { name: String, group: String },
    #[error("DR group {group:?} is {role} on this daemon; this needs its {want}")]
    WrongRole { group: String, role: String, want: &'static str },
    #[error("server {server:?} is protected by DR group {group:?} already")]
    AlreadyProtected { server: String, group: String },
    #[error("server {server:?} is being protected by DR group {group:?} right now")]
    BeingProtected { server: String, group: String },
    #[error("server {server:?} is not protected by DR group {group:?}")]
    NotProtected { server: String, group: String },
    #[error("a drill of DR group {0:?} is running; stop it first")]
    DrillRunning(String),
    #[error("DR group {0:?} has no consistent point yet (its initial sync is running)")]
    Syncing(String),
    #[error("DR group {0:?} is busy on this daemon (a replication cycle or another DR operation holds it); try again")]
    GroupBusy(String),
    #[error("DR group {group:?}: this daemon holds point {have}, the request is about point {base}")]
    PointMismatch { group: String, have: u64, base: u64 },
    #[error(transparent)]
    Serve(#[from] crate::exports::ServeError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// The gRPC code of this error.
    pub fn code(&self) -> Code {
        match self {
            ApiError::Auth(_) => Code::Unauthenticated,
            ApiError::Invalid(_) | ApiError::Shrink { .. } => Code::InvalidArgument,
            ApiError::VolumeNotFound(_)
            | ApiError::SnapshotNotFound(_)
            | ApiError::TenantNotFound(_)
            | ApiError::ServerNotFound(_)
            | ApiError::BackupNotFound(_)
            | ApiError::PolicyNotFound(_)
            | ApiError::GroupNotFound(_)
            | ApiError::NotProtected { .. } => Code::NotFound,
            ApiError::VolumeExists(_)
            | ApiError::SnapshotExists(_)
            | ApiError::TenantExists(_)
            | ApiError::ServerExists(_)
            | ApiError::PolicyExists(_)
            | ApiError::GroupExists(_)
            | ApiError::AlreadyProtected { .. }
            | ApiError::BeingProtected { .. } => Code::AlreadyExists,
            ApiError::Attached(_)
            | ApiError::NoUnixSocket
            | ApiError::Connected { .. }
            | ApiError::AdminTenant
            | ApiError::TenantHasVolumes { .. }
            | ApiError::VolumeInServer { .. }
            | ApiError::BackupInProgress { .. }
            | ApiError::BeingRestored { .. }
            | ApiError::PolicyBound { .. }
            | ApiError::BoundElsewhere { .. }
            | ApiError::PolicyRun { .. }
            | ApiError::Replica { .. }
            | ApiError::Switching { .. }
            | ApiError::WrongRole { .. }
            | ApiError::DrillRunning(_)
            | ApiError::Syncing(_)
            | ApiError::PointMismatch { .. }
            | ApiError::BeingDeleted { .. } => Code::FailedPrecondition,
            ApiError::Jobs(j) => match j {
                JobsError::NotFound(_) => Code::NotFound,
                JobsError::Finished { .. } | JobsError::PastPointOfNoReturn { .. } => Code::FailedPrecondition,
                JobsError::ShuttingDown => Code::Unavailable,
                JobsError::Store(s) => store_code(s),
            },
            ApiError::TierDenied | ApiError::PermissionDenied(_) => Code::PermissionDenied,
            ApiError::QuotaVolumes { .. } | ApiError::QuotaCapacity { .. } | ApiError::BackupLimit(_) => {
                Code::ResourceExhausted
            }
            ApiError::Backup(_) => Code::Unavailable,
            ApiError::Unsupported(_) => Code::Unimplemented,
            ApiError::Peer(_) | ApiError::GroupBusy(_) => Code::Unavailable,
            ApiError::Serve(crate::exports::ServeError::NoVhostUser) => Code::FailedPrecondition,
            ApiError::Serve(crate::exports::ServeError::Vhost(crate::vhost::VhostError::PathTooLong(_))) => {
                Code::FailedPrecondition
            }
            ApiError::Serve(_) => Code::Internal,
            ApiError::Store(s) => store_code(s),
            ApiError::Internal(_) => Code::Internal,
        }
    }
}

/// The name of a gRPC code as the audit log writes it (`NOT_FOUND`).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        let code = e.code();
        if code == Code::Internal {
            // The client gets the message too (a single-node service: the operator is the
            // user), but the log keeps it with the daemon's context.
            tracing::error!(error = %e, "request failed");
        }
        Status::new(code, e.to_string())
    }
}

/// The gRPC code for a block-store error.
pub fn store_code(e: &StoreError) -> Code {
    match e {
        StoreError::VolumeNotFound(_) | StoreError::SnapshotNotFound(_) => Code::NotFound,
        StoreError::VolumeExists(_) | StoreError::SnapshotExists(_) => Code::AlreadyExists,
        StoreError::SnapshotLimit { .. } => Code::ResourceExhausted,
        StoreError::NotInLineage(_) => Code::InvalidArgument,
        StoreError::Precondition(_) | StoreError::ReadOnly | StoreError::Frozen => Code::FailedPrecondition,
        StoreError::InvalidName { .. }
        | StoreError::InvalidSnapshotName { .. }
        | StoreError::InvalidSize { .. }
        | StoreError::OutOfRange { .. } => Code::InvalidArgument,
        StoreError::NoSpace => Code::ResourceExhausted,
        StoreError::SlowZeroes => Code::Unimplemented,
        StoreError::Io(io) if matches!(io.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) => {
            Code::ResourceExhausted
        }
        StoreError::Corrupt { .. } | StoreError::Catalog(_) | StoreError::Io(_) => Code::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(e: impl Into<ApiError>) -> Status {
        Status::from(e.into())
    }

    #[test]
    fn store_errors_map_to_codes_with_their_message() {
        let s = status(StoreError::VolumeNotFound("db".into()));
        assert_eq!(s.code(), Code::NotFound);
        assert!(s.message().contains("\"db\""), "{}", s.message());
        assert_eq!(status(StoreError::VolumeExists("db".into())).code(), Code::AlreadyExists);
        let s = status(StoreError::InvalidName { name: "a b".into(), why: "space" });
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("a b"));
        assert_eq!(status(StoreError::InvalidSize { size: 3, why: "odd".into() }).code(), Code::InvalidArgument);
        assert_eq!(status(StoreError::OutOfRange { offset: 0, len: 1, size: 0 }).code(), Code::InvalidArgument);
        assert_eq!(status(StoreError::NoSpace).code(), Code::ResourceExhausted);
        let enospc = std::io::Error::from_raw_os_error(libc::ENOSPC);
        assert_eq!(status(StoreError::Io(enospc)).code(), Code::ResourceExhausted);
        assert_eq!(status(StoreError::Catalog("boom".into())).code(), Code::Internal);
        let eio = std::io::Error::from_raw_os_error(libc::EIO);
        assert_eq!(status(StoreError::Io(eio)).code(), Code::Internal);
        assert_eq!(status(StoreError::Corrupt { what: "map".into(), why: "crc".into() }).code(), Code::Internal);
    }

    #[test]
    fn api_errors_map_to_codes() {
        assert_eq!(status(AuthError::Missing).code(), Code::Unauthenticated);
        assert_eq!(
            status(ValidationError::Tier { name: "x".into(), known: String::new() }).code(),
            Code::InvalidArgument
        );
        let s = status(ApiError::Attached("db".into()));
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert_eq!(s.message(), "volume \"db\" is attached; detach it first");
        let s = status(ApiError::Shrink { name: "db".into(), current: 2 << 30, requested: 1 << 30 });
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("2 GiB") && s.message().contains("1 GiB"), "{}", s.message());
        assert_eq!(status(ApiError::TierDenied).code(), Code::PermissionDenied);
        assert_eq!(status(ApiError::NoUnixSocket).code(), Code::FailedPrecondition);
        assert_eq!(status(ApiError::Unsupported("x")).code(), Code::Unimplemented);
        assert_eq!(status(ApiError::VolumeNotFound("v".into())).code(), Code::NotFound);
        assert_eq!(status(ApiError::PermissionDenied("creating tenants")).code(), Code::PermissionDenied);
        assert_eq!(status(ApiError::TenantNotFound("t".into())).code(), Code::NotFound);
        assert_eq!(status(ApiError::TenantExists("t".into())).code(), Code::AlreadyExists);
        assert_eq!(status(ApiError::AdminTenant).code(), Code::FailedPrecondition);
        let s = status(ApiError::QuotaCapacity { tenant: "t".into(), used: 1 << 30, asked: 2 << 30, max: 2 << 30 });
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert!(s.message().contains("1 GiB of its 2 GiB"), "{}", s.message());
        let s = status(ApiError::QuotaVolumes { tenant: "t".into(), used: 3, max: 3 });
        assert_eq!(
            (s.code(), s.message()),
            (Code::ResourceExhausted, "quota exceeded: tenant \"t\" has 3 of its 3 volumes")
        );
        let s = status(ApiError::VolumeInServer { volume: "v".into(), server: "vm".into() });
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert_eq!(code_name(Code::NotFound), "NOT_FOUND");
        assert_eq!(code_name(ApiError::ServerExists("s".into()).code()), "ALREADY_EXISTS");
        let s = status(ApiError::BeingDeleted { name: "db".into(), job: 7 });
        assert_eq!((s.code(), s.message()), (Code::FailedPrecondition, "volume \"db\" is being deleted (job 7)"));
    }

    #[test]
    fn job_errors_map_to_codes() {
        use crate::jobs::JobState;
        let s = status(JobsError::NotFound(7));
        assert_eq!((s.code(), s.message()), (Code::NotFound, "job 7 not found"));
        let s = status(JobsError::Finished { id: 7, state: JobState::Succeeded });
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert!(s.message().contains("already succeeded"), "{}", s.message());
        let s = status(JobsError::PastPointOfNoReturn { id: 7, what: "x".into() });
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert_eq!(status(JobsError::ShuttingDown).code(), Code::Unavailable);
        assert_eq!(status(JobsError::Store(StoreError::Catalog("x".into()))).code(), Code::Internal);
    }
}
