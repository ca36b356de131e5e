//! The portable engine: every op runs synchronously with pread/pwrite/fdatasync/recv/sendmsg
//! when `wait` is called. Used where io_uring is unavailable, and as the reference the
//! io_uring engine is tested against.
//!
//! A queued recv runs only when nothing else can complete, so a caller that queues a recv and
//! then a reply never blocks on the recv before its reply is sent.

use std::collections::VecDeque;
use std::io;
use std::time::{Duration, Instant};

use super::{Completion, EngineKind, IoEngine, Op};

pub struct PortableEngine {
    queue: VecDeque<(u64, Op)>,
    done: Vec<Completion>,
}

impl PortableEngine {
    pub fn new() -> PortableEngine {
        PortableEngine { queue: VecDeque::new(), done: Vec::new() }
    }
}

impl Default for PortableEngine {
    fn default() -> Self {
        Self::new()
    }
}

fn cvt(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Repeats `f(done_so_far)` until `len` bytes moved, retrying EINTR.
fn whole(len: usize, mut f: impl FnMut(usize) -> isize) -> io::Result<()> {
    let mut done = 0;
    while done < len {
        match cvt(f(done)) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short transfer at end of file")),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn execute(op: &mut Op) -> io::Result<usize> {
    match op {
        Op::Read { buf, segs } => {
            let mut total = 0;
            for s in segs.iter() {
                assert!(s.buf_offset + s.len <= buf.len(), "read segment outside its buffer");
                let base = buf.as_mut_ptr();
                whole(s.len, |done| {
                    // SAFETY: the range buf_offset+done..buf_offset+len lies inside `buf`
                    // (asserted above), which this op owns exclusively.
                    unsafe {
                        libc::pread(
                            s.fd,
                            base.add(s.buf_offset + done).cast(),
                            s.len - done,
                            (s.offset + done as u64) as libc::off_t,
                        )
                    }
                })?;
                total += s.len;
            }
            Ok(total)
        }
        Op::ReadInto { spans, .. } => {
            let mut total = 0;
            for s in spans.iter() {
                whole(s.len(), |done| {
                    // SAFETY: done < s.len(); the span is valid for writes while the op (and
                    // its `keep`) lives, by HostSpan::new's contract.
                    unsafe {
                        libc::pread(
                            s.fd(),
                            s.ptr().add(done).cast(),
                            s.len() - done,
                            (s.offset() + done as u64) as libc::off_t,
                        )
                    }
                })?;
                total += s.len();
            }
            Ok(total)
        }
        Op::Write { buf, segs } => {
            let mut total = 0;
            for s in segs.iter() {
                assert!(s.buf_offset + s.len <= buf.len(), "write segment outside its buffer");
                let base = buf.as_ptr();
                whole(s.len, |done| {
                    // SAFETY: as for reads; the kernel only reads from the buffer.
                    unsafe {
                        libc::pwrite(
                            s.fd,
                            base.add(s.buf_offset + done).cast(),
                            s.len - done,
                            (s.offset + done as u64) as libc::off_t,
                        )
                    }
                })?;
                total += s.len;
            }
            Ok(total)
        }
        Op::Sync { fd, datasync } => loop {
            // SAFETY: fdatasync/fsync take only a descriptor.
            let r = unsafe {
                if *datasync {
                    libc::fdatasync(*fd)
                } else {
                    libc::fsync(*fd)
                }
            };
            match cvt(r as isize) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        },
        Op::Recv { buf, seg } => {
            assert!(seg.buf_offset + seg.len <= buf.len(), "recv segment outside its buffer");
            loop {
                // SAFETY: the destination range lies inside `buf`, owned by this op.
                let r = unsafe { libc::recv(seg.fd, buf.as_mut_ptr().add(seg.buf_offset).cast(), seg.len, 0) };
                match cvt(r) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    other => return other,
                }
            }
        }
        Op::Send { fd, bufs } => {
            let iov: Vec<libc::iovec> = bufs
                .iter()
                .map(|b| libc::iovec {
                    // The kernel only reads through iov_base for a send.
                    iov_base: b.data.as_ptr().wrapping_add(b.start) as *mut libc::c_void,
                    iov_len: b.end - b.start,
                })
                .collect();
            // SAFETY: an all-zero msghdr is valid (no name, no control data).
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
            msg.msg_iovlen = iov.len() as _;
            loop {
                // SAFETY: msg points at `iov`, whose entries point into buffers this op owns;
                // all live until the call returns.
                let r = unsafe { libc::sendmsg(*fd, &msg, libc::MSG_NOSIGNAL) };
                match cvt(r) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    other => return other,
                }
            }
        }
    }
}

/// Whether `fd` becomes readable (or hung up) within `timeout`.
fn readable_within(fd: std::os::fd::RawFd, timeout: Duration) -> io::Result<bool> {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    // SAFETY: the descriptor belongs to the queued recv's socket, open for as long as the op
    // is queued; borrowing it for the duration of poll() is sound.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
    let ts = Timespec { tv_sec: timeout.as_secs() as _, tv_nsec: timeout.subsec_nanos() as _ };
    loop {
        match poll(&mut fds, Some(&ts)) {
            Ok(n) => return Ok(n > 0),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

impl PortableEngine {
    /// Runs every queued op but the recvs (which may block), keeping the recvs queued in order.
    fn run_ready(&mut self) {
        let mut recvs = VecDeque::new();
        while let Some((tag, mut op)) = self.queue.pop_front() {
            if matches!(op, Op::Recv { .. }) {
                recvs.push_back((tag, op));
                continue;
            }
            let result = execute(&mut op);
            self.done.push(Completion { tag, result, op });
        }
        self.queue = recvs;
    }
}

impl IoEngine for PortableEngine {
    fn push(&mut self, tag: u64, op: Op) {
        self.queue.push_back((tag, op));
    }

    fn wait(&mut self, min_complete: usize) -> io::Result<()> {
        loop {
            self.run_ready();
            if self.done.len() >= min_complete {
                return Ok(());
            }
            // Nothing else can complete: block on the oldest recv.
            let Some((tag, mut op)) = self.queue.pop_front() else { return Ok(()) };
            let result = execute(&mut op);
            self.done.push(Completion { tag, result, op });
        }
    }

    fn wait_until(&mut self, min_complete: usize, deadline: Instant) -> io::Result<()> {
        // Everything but a recv completes at once; a recv is run only if its socket becomes
        // readable before the deadline, so the wait never outlasts it.
        loop {
            self.run_ready();
            let now = Instant::now();
            if self.done.len() >= min_complete || now >= deadline {
                return Ok(());
            }
            let left = deadline - now;
            let fd = match self.queue.front() {
                Some((_, Op::Recv { seg, .. })) => seg.fd,
                _ => {
                    std::thread::sleep(left);
                    return Ok(());
                }
            };
            if !readable_within(fd, left)? {
                return Ok(());
            }
            let (tag, mut op) = self.queue.pop_front().expect("checked above");
            let result = execute(&mut op);
            self.done.push(Completion { tag, result, op });
        }
    }

    fn drain(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut self.done);
    }

    fn in_flight(&self) -> usize {
        self.queue.len() + self.done.len()
    }

    fn kind(&self) -> EngineKind {
        EngineKind::Portable
    }
}
