//! Block-level backups of volumes to object storage (VBS, and CSBS through server manifests).
//!
//! The daemon decides WHAT to back up (which chunks changed, from changed-block tracking) and
//! hands the engine a [`ChunkSource`] over a snapshot; the engine decides HOW: fixed-size
//! chunks, BLAKE3 content addresses (deduplicated across backups and volumes of a store),
//! zstd, a CRC32C per object, optional AES-256-GCM per tenant, parallel uploads, a full index
//! per backup, and a manifest written last as the commit point.
//!
//! Store layout (format `evs-backup`, version 1; see [`layout`]):
//!
//! ```text
//! FORMAT                                       {"format":"evs-backup","version":1}
//! chunks/<2 hex>/<64 hex id>                   chunk objects (magic EVSCHNK\x01, see [`chunk`])
//! indexes/<backup-id>                          full index of a backup (magic EVSFIDX\x01, see [`fixed_index`])
//! manifests/<tenant>/<volume>/<backup-id>      manifest (JSON, see [`manifest`]): written last
//! servers/<tenant>/<server>/<server-backup-id> server backup manifest, after its volume manifests
//! leases/backups/<backup-id>, leases/gc        backups and gc in progress (see [`engine`])
//! ```

/// A named crash point (see `evs_snapshot::crash_point!`, the same mechanism; this crate does
/// not depend on the block store).
macro_rules! crash_point {
    ($name:literal) => {
        fail::fail_point!($name, |_| {
            eprintln!(concat!("failpoint ", $name, " hit: aborting"));
            std::process::abort()
        })
    };
}

pub mod chunk;
pub mod crypto;
pub mod engine;
pub mod error;
pub mod fixed_index;
pub mod layout;
pub mod manifest;
pub mod object_store;
pub mod store_url;

pub use chunk::{decode_chunk, encode_chunk, ChunkId};
pub use crypto::{key_fingerprint, TenantKeys};
pub use engine::{
    BackupRequest, ChunkSink, ChunkSource, CorruptChunk, Engine, EngineOptions, GcReport, NoProgress, Progress,
    RestoreStats, VerifyReport,
};
pub use error::{BackupError, CodecError, StoreError, StoreOp};
pub use fixed_index::{decode_index, encode_index, FixedIndex};
pub use layout::{new_backup_id, new_server_backup_id, validate_backup_id, validate_server_backup_id};
pub use manifest::{parse_manifest, BackupKind, BackupStats, Manifest, ServerManifest, ServerVolume};
pub use object_store::{
    FaultEffect, FaultRule, FaultyStore, ObjectMeta, ObjectStore, OpendalStore, StoreConfig, StoreTuning,
};
pub use store_url::StoreUrl;
