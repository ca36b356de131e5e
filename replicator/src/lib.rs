//! Replication of volumes between availability zones (sDRS): what crosses the link and how it
//! is made and applied. Transport-free: the daemon carries the encoded frames over gRPC.
//!
//! * [`frame`]: the byte layout of the changed-block stream (pure encode/decode, fuzzable);
//! * [`cycle`]: the source side: changed extents → frames of at most [`frame::MAX_FRAME_DATA`]
//!   bytes, read through a [`cycle::BlockSource`], zstd-compressed, CRC32C-checked;
//! * [`apply`]: the target side: frames → writes and discards on replica volumes, every
//!   frame checked before anything is written;
//! * [`throttle`]: the per-group bandwidth limit.
//!
//! The consistency protocol (which snapshot a cycle diffs from, when a point is committed) is
//! the daemon's; see `docs/DESIGN.md`.

pub mod apply;
pub mod cycle;
pub mod frame;
pub mod throttle;

pub use apply::{apply_frames, ApplyError, ApplyStats, ReplicaSink};
pub use cycle::{plan_ranges, BlockSource, CycleStats, FrameEncoder};
pub use frame::{decode_frames, encode_frame, Frame, FrameError, FrameKind};
pub use throttle::Throttle;
