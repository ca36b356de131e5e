//! I/O engines: where reads, writes and syncs of layer files (and the NBD server's socket
//! traffic) are executed.
//!
//! An engine is owned by one thread (one NBD connection, say). Callers queue [`Op`]s with a
//! tag, then [`IoEngine::wait`]; each finished op comes back whole in a [`Completion`], so the
//! buffers an op carries stay owned by the engine while the kernel may touch them.
//!
//! * [`uring::UringEngine`]: one io_uring per engine; an op with several segments becomes
//!   several SQEs and completes when all of them have.
//! * [`portable::PortableEngine`]: pread/pwrite/fdatasync/recv/send executed synchronously, for
//!   kernels or sandboxes that refuse `io_uring_setup`.
//! * [`faulty::FaultyEngine`]: wraps another engine and fails chosen ops (tests).

pub mod faulty;
pub mod portable;
pub mod slots;
pub mod uring;

use std::io;
use std::os::fd::RawFd;
use std::time::Instant;

use crate::aligned_buf::AlignedBuf;

/// One contiguous transfer between `buf[buf_offset..buf_offset + len]` and a file or socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub fd: RawFd,
    /// File offset (ignored for sockets).
    pub offset: u64,
    pub buf_offset: usize,
    pub len: usize,
}

/// One file read into memory the engine does not own: `len` bytes at `offset` of `fd` into
/// `ptr..ptr + len` (a piece of a guest's buffer, mapped in this process).
/// Neither `Clone` nor mutable once made: the contract of [`HostSpan::new`] covers exactly the
/// span it was given and the one op it goes into.
#[derive(Debug, PartialEq, Eq)]
pub struct HostSpan {
    fd: RawFd,
    offset: u64,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a span is only an address; `HostSpan::new`'s contract makes the memory valid for
// writes from any thread for as long as the op's `keep` lives, and the op carries `keep`.
unsafe impl Send for HostSpan {}

impl HostSpan {
    /// # Safety
    /// `ptr..ptr + len` must stay valid for writes for as long as the `keep` of the
    /// [`Op::ReadInto`] this span goes into is alive (the engine holds the op, `keep` included,
    /// until its completion is drained), and no Rust reference to that memory may exist
    /// meanwhile (guest memory is only ever touched through raw or volatile accesses).
    pub unsafe fn new(fd: RawFd, offset: u64, ptr: *mut u8, len: usize) -> HostSpan {
        HostSpan { fd, offset, ptr, len }
    }

    pub fn fd(&self) -> RawFd {
        self.fd
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// An operation and the buffer it owns until it completes.
#[derive(Debug)]
pub enum Op {
    /// Read every segment into `buf`. Completes with the total length, or the first error
    /// (a short read of a file is an error: layer files are never shorter than the volume).
    Read { buf: AlignedBuf, segs: Vec<Segment> },
    /// Read every span into the memory it names, which `keep` holds mapped (a vhost-user
    /// guest's memory: the read lands in the guest's buffers with no copy). Same completion
    /// rule as `Read`.
    ReadInto { spans: Vec<HostSpan>, keep: std::sync::Arc<dyn std::any::Any + Send + Sync> },
    /// Write every segment from `buf`; same completion rule as `Read`.
    Write { buf: AlignedBuf, segs: Vec<Segment> },
    /// fdatasync (or fsync) of one file.
    Sync { fd: RawFd, datasync: bool },
    /// One recv from a socket into `buf[buf_offset..buf_offset+len]`; completes with the
    /// number of bytes received (0 = peer closed).
    Recv { buf: AlignedBuf, seg: Segment },
    /// One send of `bufs` (in order, as a gather list) to a socket; completes with the number
    /// of bytes sent, which may be short.
    Send { fd: RawFd, bufs: Vec<SendBuf> },
}

/// Recycled segment lists: a front end takes one per op and puts it back at completion, so a
/// request allocates none.
#[derive(Debug, Default)]
pub struct SegmentPool(Vec<Vec<Segment>>);

impl SegmentPool {
    /// Lists kept at most (more in flight at once are simply dropped when they come back).
    const MAX: usize = 256;

    /// An empty list (recycled when one is available).
    pub fn take(&mut self) -> Vec<Segment> {
        self.0.pop().unwrap_or_default()
    }

    /// Gives a list back.
    pub fn put(&mut self, mut segs: Vec<Segment>) {
        if self.0.len() < Self::MAX {
            segs.clear();
            self.0.push(segs);
        }
    }
}

/// A piece of a gather-send: `data[start..]`.
#[derive(Debug)]
pub struct SendBuf {
    pub data: AlignedBuf,
    pub start: usize,
    pub end: usize,
}

/// A finished op with its result: bytes transferred, or the error.
#[derive(Debug)]
pub struct Completion {
    pub tag: u64,
    pub result: io::Result<usize>,
    pub op: Op,
}

/// The engine interface. Not `Sync`: one engine per thread.
pub trait IoEngine: Send {
    /// Queues an op. Nothing is guaranteed to start before the next `wait`.
    fn push(&mut self, tag: u64, op: Op);
    /// Starts everything queued and blocks until at least `min_complete` ops have completed
    /// since the last `drain` (0: do not block), then returns.
    fn wait(&mut self, min_complete: usize) -> io::Result<()>;
    /// As [`wait`](Self::wait), but returns at `deadline` at the latest, however few ops have
    /// completed (a throttled NBD connection waits for its QoS deadline this way, still
    /// reaping the completions of what it has in flight).
    fn wait_until(&mut self, min_complete: usize, deadline: Instant) -> io::Result<()>;
    /// Moves the completed ops into `out`.
    fn drain(&mut self, out: &mut Vec<Completion>);
    /// Ops pushed and not yet drained.
    fn in_flight(&self) -> usize;
    fn kind(&self) -> EngineKind;
}

/// Which engine to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    Uring,
    Portable,
}

impl EngineKind {
    /// Parses `--io-backend`: `uring`, `portable` or `auto`. `auto` probes io_uring.
    pub fn parse(s: &str) -> Result<EngineKind, String> {
        match s {
            "uring" | "io_uring" | "io-uring" => Ok(EngineKind::Uring),
            "portable" => Ok(EngineKind::Portable),
            "auto" => Ok(EngineKind::detect()),
            other => Err(format!("unknown I/O backend {other:?} (expected uring, portable or auto)")),
        }
    }

    /// io_uring when `io_uring_setup` succeeds here, else the portable engine.
    pub fn detect() -> EngineKind {
        if uring::UringEngine::probe().is_ok() {
            EngineKind::Uring
        } else {
            EngineKind::Portable
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Uring => "uring",
            EngineKind::Portable => "portable",
        }
    }

    /// A new engine of this kind able to hold `depth` ops in flight.
    pub fn build(self, depth: u32) -> io::Result<Box<dyn IoEngine>> {
        let engine: Box<dyn IoEngine> = match self {
            EngineKind::Uring => Box::new(uring::UringEngine::new(depth)?),
            EngineKind::Portable => Box::new(portable::PortableEngine::new()),
        };
        // Test builds: disk faults on demand (FAILPOINTS="io-write-fault=...").
        #[cfg(feature = "failpoints")]
        let engine: Box<dyn IoEngine> =
            Box::new(faulty::FaultyEngine::new(engine, std::sync::Arc::new(faulty::failpoint_rule)));
        Ok(engine)
    }
}

/// Runs one op to completion on `engine` (for synchronous callers such as tests and the
/// read-modify-write path). Returns the op (with its buffer) and its result.
pub fn run_one(engine: &mut dyn IoEngine, op: Op) -> (Op, io::Result<usize>) {
    const TAG: u64 = u64::MAX;
    engine.push(TAG, op);
    let mut out = Vec::with_capacity(1);
    loop {
        if let Err(e) = engine.wait(1) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            panic!("I/O engine failed: {e}");
        }
        engine.drain(&mut out);
        if let Some(c) = out.pop() {
            debug_assert_eq!(c.tag, TAG);
            return (c.op, c.result);
        }
    }
}
