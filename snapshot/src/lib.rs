//! The EVS block store.
//!
//! A volume is a writable *head* layer on top of a chain of read-only parent layers, left by
//! its snapshots ([`snapshots`]); clones share them.
//! A layer is a sparse data file plus an allocation map at 4 KiB granularity
//! ([`alloc_map`]). Writes go to the head at the same offset; reads take each block from the
//! top-most layer that has it; a block no layer has reads as zeros.
//!
//! Data moves through an [`io_engine::IoEngine`]: io_uring where the kernel allows it, a
//! portable pread/pwrite engine otherwise. The catalog of volumes and layers is a redb
//! database ([`catalog`]).

pub mod aligned_buf;
pub mod alloc_map;
pub mod catalog;
pub mod chain_index;
pub mod deletion;
pub mod error;
pub mod io_engine;
pub mod layer;
mod merge;
pub mod snapshots;
pub mod store;
pub mod volume;

/// A named point where the crash-matrix tests kill the process: with evs-target's `failpoints`
/// feature and `FAILPOINTS="<name>=return"` (or `"<name>=2*off->return"`, the third time) the
/// process prints the name and aborts there, as abruptly as kill -9. Without the feature it
/// compiles to nothing.
#[macro_export]
macro_rules! crash_point {
    ($name:literal) => {
        $crate::__fail::fail_point!($name, |_| {
            eprintln!(concat!("failpoint ", $name, " hit: aborting"));
            std::process::abort()
        })
    };
}

/// A named point where tests hold a thread to force an interleaving: with evs-target's
/// `failpoints` feature and `FAILPOINTS="<name>=sleep(<ms>)"` the thread sleeps there. Without
/// the feature it compiles to nothing.
#[macro_export]
macro_rules! delay_point {
    ($name:literal) => {
        $crate::__fail::fail_point!($name)
    };
}

#[doc(hidden)]
pub use fail as __fail;

pub use aligned_buf::AlignedBuf;
pub use deletion::VolumeRemoval;
pub use error::StoreError;
pub use io_engine::slots::Slots;
pub use io_engine::{Completion, EngineKind, HostSpan, IoEngine, Op, Segment, SegmentPool};
pub use snapshots::{ChangedExtent, SnapshotInfo};
pub use store::{BlockStore, StoreOptions, VolumeInfo, WithVolume};
pub use volume::{Extent, GateGuard, Volume, WritePlan};

/// Granularity of allocation maps, copy-on-write and O_DIRECT writes.
pub const BLOCK_SIZE: u64 = 4096;
/// Largest volume the store accepts (32 TiB, the service description's limit).
pub const MAX_VOLUME_SIZE: u64 = 32 << 40;
