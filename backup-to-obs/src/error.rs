//! Errors of the backup engine: one enum for the object store, one for the pure codecs, one
//! for the engine (which carries the other two with the object key they concern). The daemon
//! maps `BackupError` to gRPC statuses in one place.

use std::fmt;
use std::io;

/// The object-store operation that failed (in messages: "put of chunks/ab/…").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoreOp {
    Put,
    Get,
    Head,
    List,
    Delete,
}

impl fmt::Display for StoreOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StoreOp::Put => "put",
            StoreOp::Get => "get",
            StoreOp::Head => "head",
            StoreOp::List => "list",
            StoreOp::Delete => "delete",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("object {key:?} not found in {store}")]
    NotFound { store: String, key: String },
    #[error("{op} of {key:?} in {store} failed: {cause}")]
    Failed { op: StoreOp, store: String, key: String, cause: String },
    #[error("invalid object key {key:?}: {why}")]
    InvalidKey { key: String, why: &'static str },
    #[error("object store configuration: {0}")]
    Config(String),
    #[error("invalid backup store URL {url:?}: {why}")]
    Url { url: String, why: String },
}

impl StoreError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }
}

/// What the pure decoders (chunk, index, manifest, FORMAT) find wrong with bytes they are
/// given; the engine adds the object key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// Damaged bytes: bad magic, lengths, checksum, hash, JSON.
    #[error("{0}")]
    Corrupt(String),
    /// Well-formed, but of a format or version this build does not read.
    #[error("{0}")]
    Unsupported(String),
    /// The object is encrypted and no key was given.
    #[error("encrypted, and no key was given")]
    KeyRequired,
    /// AES-GCM refused the payload: another key, or damaged ciphertext.
    #[error("AES-256-GCM authentication failed (another key, or a damaged object)")]
    AuthFailed,
    /// Encoding failed (compression or encryption refused the input).
    #[error("{0}")]
    Encode(String),
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// A backup, server backup, or other named thing that does not exist (for this tenant).
    #[error("{0} not found")]
    NotFound(String),
    #[error("corrupt object {key:?}: {why}")]
    Corrupt { key: String, why: String },
    #[error("object {key:?} is missing from the store")]
    Missing { key: String },
    /// The backup is encrypted and no key was given.
    #[error("backup {backup_id} is encrypted: its tenant's encryption key is needed")]
    Encrypted { backup_id: String },
    /// The key given is not the one the backup was taken with.
    #[error("the encryption key given is not the one backup {backup_id} was taken with (fingerprint {expected})")]
    WrongKey { backup_id: String, expected: String },
    /// Another on-store format or version.
    #[error("{what}: {why}")]
    Format { what: String, why: String },
    /// The parent of an incremental cannot supply unchanged chunks (missing, another chunk
    /// size, another key): the caller takes a full backup instead.
    #[error("parent backup {parent} cannot be used for an incremental backup: {why}")]
    Parent { parent: String, why: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("reading the source: {0}")]
    Source(#[source] io::Error),
    #[error("writing the restore target: {0}")]
    Sink(#[source] io::Error),
    #[error("cancelled")]
    Cancelled,
    #[error("{0}")]
    Invalid(String),
}

impl BackupError {
    /// The engine's error for a codec error found in object `key` (of backup `backup_id`,
    /// for the key errors).
    pub(crate) fn codec(key: &str, e: CodecError) -> BackupError {
        match e {
            CodecError::Unsupported(why) => BackupError::Format { what: format!("object {key:?}"), why },
            CodecError::KeyRequired => {
                BackupError::Corrupt { key: key.into(), why: "encrypted, but its backup is not".into() }
            }
            CodecError::Encode(why) => BackupError::Invalid(format!("encoding {key:?}: {why}")),
            other => BackupError::Corrupt { key: key.into(), why: other.to_string() },
        }
    }

    /// A store error on `key`, with NotFound turned into Missing (an object a backup needs).
    pub(crate) fn missing_or_store(e: StoreError) -> BackupError {
        match e {
            StoreError::NotFound { key, .. } => BackupError::Missing { key },
            other => BackupError::Store(other),
        }
    }
}
