//! Errors of the block store.

use std::io;

/// Everything the block store can fail with. Mapped to NBD errnos and gRPC codes at the
/// boundaries (evs-target), nowhere else.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("volume {0:?} not found")]
    VolumeNotFound(String),
    #[error("volume {0:?} already exists")]
    VolumeExists(String),
    #[error("invalid volume name {name:?}: {why}")]
    InvalidName { name: String, why: &'static str },
    #[error("invalid size {size}: {why}")]
    InvalidSize { size: u64, why: String },
    #[error("range {offset}+{len} is past the end of the volume ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("no space left on the device holding the volume's data")]
    NoSpace,
    #[error("snapshot {0:?} not found")]
    SnapshotNotFound(String),
    #[error("snapshot {0:?} already exists")]
    SnapshotExists(String),
    #[error("invalid snapshot name {name:?}: {why}")]
    InvalidSnapshotName { name: String, why: &'static str },
    #[error("volume {volume:?} already has {limit} snapshots, the most allowed (delete one first)")]
    SnapshotLimit { volume: String, limit: usize },
    #[error("{0}")]
    NotInLineage(String),
    #[error("{0}")]
    Precondition(String),
    #[error("the volume is read-only (a snapshot)")]
    ReadOnly,
    /// A snapshot is stopping the volume's writes for an instant: retry after
    /// `Volume::wait_thawed` (never reaches a client).
    #[error("the volume is frozen for a snapshot")]
    Frozen,
    #[error("corrupt {what}: {why}")]
    Corrupt { what: String, why: String },
    #[error("catalog: {0}")]
    Catalog(String),
    /// Zeroing was asked for only if quick (NBD FAST_ZERO), and it would mean writing the
    /// zeros: the filesystem under the volume cannot zero a range in place.
    #[error("zeroing this range in place is not supported here; it would mean writing the zeros")]
    SlowZeroes,
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

impl StoreError {
    /// The errno an NBD reply carries for this error.
    pub fn errno(&self) -> i32 {
        match self {
            StoreError::OutOfRange { .. } | StoreError::InvalidSize { .. } => libc::EINVAL,
            StoreError::NoSpace => libc::ENOSPC,
            StoreError::ReadOnly => libc::EPERM,
            StoreError::Frozen => libc::EAGAIN,
            StoreError::SlowZeroes => libc::ENOTSUP,
            // The NBD specification: EDQUOT and EFBIG SHOULD be reported as ENOSPC.
            StoreError::Io(e) => match e.raw_os_error() {
                Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => libc::ENOSPC,
                Some(libc::EPERM | libc::EACCES | libc::EROFS) => libc::EPERM,
                Some(libc::EINVAL) => libc::EINVAL,
                _ => libc::EIO,
            },
            _ => libc::EIO,
        }
    }
}

/// redb has one error type per operation; they all mean "the catalog failed".
macro_rules! catalog_error {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self { StoreError::Catalog(e.to_string()) }
        }
    )*};
}
catalog_error!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);
