//! The io_uring engine: one ring per engine (per connection thread).
//!
//! Each op lives in a slot until every SQE it generated has completed; the slot index and the
//! segment index travel in `user_data`. File segments that complete short (rare: a signal, a
//! partial O_DIRECT write) are resubmitted for the rest, so callers see whole transfers or an
//! error. A send owns its iovec array and msghdr in the slot, so the addresses the kernel
//! holds stay valid until its completion.

use std::collections::VecDeque;
use std::io;
use std::time::Instant;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use super::slots::Slots;
use super::{Completion, EngineKind, IoEngine, Op};

const SEG_BITS: u32 = 24;
/// File transfers at least this long are handed to io_uring's worker threads (IOSQE_ASYNC):
/// the page-cache copy of a 1 MiB read or buffered write then runs on another core while this
/// thread goes on parsing and sending, instead of inline in `io_uring_enter`.
const ASYNC_MIN: usize = 128 << 10;
const SEG_MASK: u64 = (1 << SEG_BITS) - 1;

/// The kernel-visible parts of a send, boxed so their addresses are stable.
struct SendHeader {
    iov: Vec<libc::iovec>,
    msg: libc::msghdr,
}

// SAFETY: the raw pointers in iovec/msghdr point into buffers owned by the same slot; the
// header moves between threads only together with them.
unsafe impl Send for SendHeader {}

struct Slot {
    tag: u64,
    op: Op,
    /// Bytes moved per segment (reads/writes), to resubmit the rest of a short transfer.
    progress: Vec<usize>,
    /// SQEs of this op still in the kernel or waiting to be pushed.
    outstanding: usize,
    result: io::Result<usize>,
    send: Option<Box<SendHeader>>,
}

pub struct UringEngine {
    ring: IoUring,
    slots: Slots<Slot>,
    /// SQEs that did not fit in the submission queue yet.
    backlog: VecDeque<squeue::Entry>,
    done: Vec<Completion>,
    /// Slots whose last SQE completed, in completion order (reaped without scanning them all).
    finished: Vec<usize>,
    /// Emptied per-op vectors and send headers, reused so that the steady state allocates
    /// nothing per op.
    progress_pool: Vec<Vec<usize>>,
    // Boxed: a header goes back into a slot, where the kernel needs its address to stay put.
    #[allow(clippy::vec_box)]
    send_pool: Vec<Box<SendHeader>>,
}

impl UringEngine {
    /// Whether io_uring can be set up here (sandboxes may refuse `io_uring_setup`).
    pub fn probe() -> io::Result<()> {
        let ring = IoUring::new(4)?;
        // Timed waits (QoS deadlines) need IORING_ENTER_EXT_ARG (Linux 5.11).
        if !ring.params().is_feature_ext_arg() {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "io_uring lacks IORING_FEAT_EXT_ARG"));
        }
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for code in
            [opcode::Read::CODE, opcode::Write::CODE, opcode::Fsync::CODE, opcode::Recv::CODE, opcode::SendMsg::CODE]
        {
            if !probe.is_supported(code) {
                return Err(io::Error::new(io::ErrorKind::Unsupported, format!("io_uring opcode {code} unsupported")));
            }
        }
        Ok(())
    }

    pub fn new(depth: u32) -> io::Result<UringEngine> {
        let entries = depth.clamp(8, 4096).next_power_of_two();
        let ring = IoUring::builder().setup_cqsize(entries * 4).build(entries)?;
        Ok(UringEngine {
            ring,
            slots: Slots::default(),
            backlog: VecDeque::new(),
            done: Vec::new(),
            finished: Vec::new(),
            progress_pool: Vec::new(),
            send_pool: Vec::new(),
        })
    }

    /// The SQE for segment `seg` of slot `idx`, from its current progress.
    fn segment_sqe(slot: &mut Slot, idx: usize, seg: usize) -> squeue::Entry {
        let ud = ((idx as u64) << SEG_BITS) | seg as u64;
        let done = slot.progress.get(seg).copied().unwrap_or(0);
        match &mut slot.op {
            Op::Read { buf, segs } => {
                let s = segs[seg];
                assert!(s.buf_offset + s.len <= buf.len(), "read segment outside its buffer");
                // SAFETY: in bounds (asserted); the buffer is owned by the slot until completion.
                let ptr = unsafe { buf.as_mut_ptr().add(s.buf_offset + done) };
                let e = opcode::Read::new(types::Fd(s.fd), ptr, (s.len - done) as u32)
                    .offset(s.offset + done as u64)
                    .build()
                    .user_data(ud);
                if s.len - done >= ASYNC_MIN {
                    e.flags(squeue::Flags::ASYNC)
                } else {
                    e
                }
            }
            Op::ReadInto { spans, .. } => {
                let s = &spans[seg];
                // In bounds: done < s.len(). Valid for writes until completion by
                // HostSpan::new's contract (the slot holds the op and its `keep`).
                let ptr = s.ptr().wrapping_add(done);
                let e = opcode::Read::new(types::Fd(s.fd()), ptr, (s.len() - done) as u32)
                    .offset(s.offset() + done as u64)
                    .build()
                    .user_data(ud);
                if s.len() - done >= ASYNC_MIN {
                    e.flags(squeue::Flags::ASYNC)
                } else {
                    e
                }
            }
            Op::Write { buf, segs } => {
                let s = segs[seg];
                assert!(s.buf_offset + s.len <= buf.len(), "write segment outside its buffer");
                // SAFETY: as above.
                let ptr = unsafe { buf.as_ptr().add(s.buf_offset + done) };
                let e = opcode::Write::new(types::Fd(s.fd), ptr, (s.len - done) as u32)
                    .offset(s.offset + done as u64)
                    .build()
                    .user_data(ud);
                if s.len - done >= ASYNC_MIN {
                    e.flags(squeue::Flags::ASYNC)
                } else {
                    e
                }
            }
            Op::Sync { fd, datasync } => {
                let flags = if *datasync { types::FsyncFlags::DATASYNC } else { types::FsyncFlags::empty() };
                opcode::Fsync::new(types::Fd(*fd)).flags(flags).build().user_data(ud)
            }
            Op::Recv { buf, seg: s } => {
                assert!(s.buf_offset + s.len <= buf.len(), "recv segment outside its buffer");
                // SAFETY: as above.
                let ptr = unsafe { buf.as_mut_ptr().add(s.buf_offset) };
                opcode::Recv::new(types::Fd(s.fd), ptr, s.len as u32).build().user_data(ud)
            }
            Op::Send { fd, .. } => {
                let hdr = slot.send.as_mut().expect("send header built at push");
                opcode::SendMsg::new(types::Fd(*fd), &hdr.msg).flags(libc::MSG_NOSIGNAL as u32).build().user_data(ud)
            }
        }
    }

    /// Moves backlog SQEs into the submission queue while it has room.
    fn fill_sq(&mut self) {
        let mut sq = self.ring.submission();
        while let Some(e) = self.backlog.front() {
            // SAFETY: every entry's buffers are owned by a live slot until its completion.
            if unsafe { sq.push(e) }.is_err() {
                break;
            }
            self.backlog.pop_front();
        }
    }

    fn reap(&mut self) {
        let mut resubmit = Vec::new();
        for cqe in self.ring.completion() {
            resubmit.extend(Self::on_cqe(&mut self.slots, &cqe, &mut self.finished));
        }
        for (idx, seg) in resubmit {
            let slot = self.slots.get_mut(idx).expect("live slot");
            let e = Self::segment_sqe(slot, idx, seg);
            self.backlog.push_back(e);
        }
        // Finished slots become completions.
        for idx in self.finished.drain(..) {
            let s = self.slots.take(idx).expect("finished slot is live");
            let mut progress = s.progress;
            progress.clear();
            self.progress_pool.push(progress);
            if let Some(h) = s.send {
                self.send_pool.push(h);
            }
            self.done.push(Completion { tag: s.tag, result: s.result, op: s.op });
        }
    }

    /// Accounts one CQE; returns a segment to resubmit after a short file transfer, and adds
    /// the slot to `finished` when this was its last outstanding SQE.
    fn on_cqe(slots: &mut Slots<Slot>, cqe: &cqueue::Entry, finished: &mut Vec<usize>) -> Option<(usize, usize)> {
        let idx = (cqe.user_data() >> SEG_BITS) as usize;
        let slot = slots.get_mut(idx)?;
        let resubmit = Self::account(slot, cqe);
        if resubmit.is_none() && slot.outstanding == 0 {
            finished.push(idx);
        }
        resubmit
    }

    /// The body of [`on_cqe`](Self::on_cqe) for one live slot.
    fn account(slot: &mut Slot, cqe: &cqueue::Entry) -> Option<(usize, usize)> {
        let idx = (cqe.user_data() >> SEG_BITS) as usize;
        let seg = (cqe.user_data() & SEG_MASK) as usize;
        let res = cqe.result();
        let file_seg_len = match &slot.op {
            Op::Read { segs, .. } | Op::Write { segs, .. } => Some(segs[seg].len),
            Op::ReadInto { spans, .. } => Some(spans[seg].len()),
            _ => None,
        };
        if res < 0 {
            let err = io::Error::from_raw_os_error(-res);
            if let Some(len) = file_seg_len {
                if err.kind() == io::ErrorKind::Interrupted {
                    let _ = len;
                    return Some((idx, seg));
                }
            }
            slot.outstanding -= 1;
            if slot.result.is_ok() {
                slot.result = Err(err);
            }
            return None;
        }
        let n = res as usize;
        match file_seg_len {
            Some(len) => {
                slot.progress[seg] += n;
                if n == 0 && slot.progress[seg] < len {
                    slot.outstanding -= 1;
                    if slot.result.is_ok() {
                        slot.result =
                            Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short transfer at end of file"));
                    }
                    return None;
                }
                if slot.progress[seg] < len {
                    return Some((idx, seg));
                }
                slot.outstanding -= 1;
                if let Ok(t) = &mut slot.result {
                    *t += len;
                }
            }
            None => {
                slot.outstanding -= 1;
                if let Ok(t) = &mut slot.result {
                    *t += n;
                }
            }
        }
        None
    }
}

impl IoEngine for UringEngine {
    fn push(&mut self, tag: u64, op: Op) {
        let nsegs = match &op {
            Op::Read { segs, .. } | Op::Write { segs, .. } => segs.len(),
            Op::ReadInto { spans, .. } => spans.len(),
            _ => 1,
        };
        assert!((nsegs as u64) < SEG_MASK, "op with too many segments");
        let send = match &op {
            Op::Send { bufs, .. } => {
                let mut h = self.send_pool.pop().unwrap_or_else(|| {
                    // SAFETY: an all-zero msghdr is valid (no name, no control data).
                    let msg: libc::msghdr = unsafe { std::mem::zeroed() };
                    Box::new(SendHeader { iov: Vec::new(), msg })
                });
                h.iov.clear();
                h.iov.extend(bufs.iter().map(|b| libc::iovec {
                    iov_base: b.data.as_ptr().wrapping_add(b.start) as *mut libc::c_void,
                    iov_len: b.end - b.start,
                }));
                h.msg.msg_iov = h.iov.as_mut_ptr();
                h.msg.msg_iovlen = h.iov.len() as _;
                Some(h)
            }
            _ => None,
        };
        if nsegs == 0 {
            // Nothing for the kernel to do (a read of holes only): complete at once.
            self.done.push(Completion { tag, result: Ok(0), op });
            return;
        }
        let mut progress = self.progress_pool.pop().unwrap_or_default();
        progress.resize(nsegs, 0);
        let slot = Slot { tag, op, progress, outstanding: nsegs, result: Ok(0), send };
        let idx = self.slots.insert(slot);
        for seg in 0..nsegs {
            let slot = self.slots.get_mut(idx).expect("just stored");
            let e = Self::segment_sqe(slot, idx, seg);
            self.backlog.push_back(e);
        }
    }

    fn wait(&mut self, min_complete: usize) -> io::Result<()> {
        loop {
            self.fill_sq();
            let want = if self.done.len() >= min_complete || self.slots.is_empty() { 0 } else { 1 };
            match self.ring.submit_and_wait(want) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // EBUSY: the completion queue is full; reaping below makes room.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => return Err(e),
            }
            self.reap();
            if self.done.len() >= min_complete || self.slots.is_empty() {
                self.fill_sq();
                if !self.backlog.is_empty() || !self.ring.submission().is_empty() {
                    self.ring.submit()?;
                }
                return Ok(());
            }
        }
    }

    fn wait_until(&mut self, min_complete: usize, deadline: Instant) -> io::Result<()> {
        loop {
            self.fill_sq();
            let now = Instant::now();
            if self.done.len() >= min_complete || now >= deadline {
                if !self.backlog.is_empty() || !self.ring.submission().is_empty() {
                    self.ring.submit()?;
                }
                return Ok(());
            }
            let ts = types::Timespec::from(deadline - now);
            let args = types::SubmitArgs::new().timespec(&ts);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME) | Some(libc::EBUSY)) => {}
                Err(e) => return Err(e),
            }
            self.reap();
        }
    }

    fn drain(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut self.done);
    }

    fn in_flight(&self) -> usize {
        self.slots.len() + self.done.len()
    }

    fn kind(&self) -> EngineKind {
        EngineKind::Uring
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        // Buffers of ops still in the kernel must outlive them (a ReadInto's guest memory
        // too): wait for every one. A signal or a full completion queue is no reason to stop.
        while !self.slots.is_empty() {
            self.fill_sq();
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted || e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => {
                    // The ring cannot be waited on any more: leak the slots (their buffers and
                    // mappings) rather than free memory the kernel may still write.
                    tracing::error!(error = %e, live = self.slots.len(), "io_uring: cannot wait for ops in flight; leaking their buffers");
                    std::mem::forget(std::mem::take(&mut self.slots));
                    break;
                }
            }
            self.reap();
        }
    }
}
