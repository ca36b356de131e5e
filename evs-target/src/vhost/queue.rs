//! One virtqueue's worker: pops the guest's requests, runs them on the queue's own I/O engine
//! (an io_uring, or the portable engine), and completes them in the used ring.
//!
//! The worker runs on the vring thread that vhost-user-backend gives each queue, from the kick
//! that wakes it until the queue is idle: while requests are in flight it keeps popping new
//! ones after every batch of completions (guest notifications stay off meanwhile), so a guest
//! at queue depth 32 keeps 32 requests in the ring without a kick per request.
//!
//! A read lands in the guest's buffers directly ([`guest_read`]: the op reads the layer files
//! into guest memory and holds the memory map until it completes; holes are zeroed there), so
//! it costs no copy; a range that is not inside one region of guest memory goes through a
//! pooled bounce buffer instead. A write is gathered out of guest memory into the op's own
//! buffer first: it may be completed to the guest before its op finishes, and the guest may
//! then reuse the buffer. One memcpy per write, none per read.
//!
//! QoS, counters and the durability rule are the NBD server's: each request's cost is reserved
//! on the volume's shared limiter before it starts (a request told "not before t" is held, with
//! nothing popped behind it, until t); a write's allocation bits are set by
//! [`Volume::commit_write`] after its data op completed and before its status is written;
//! FLUSH is [`Volume::flush`].

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use evs_snapshot::volume::{Chain, PendingWrite, WriterGuard};
use evs_snapshot::{Completion, EngineKind, HostSpan, IoEngine, Op, SegmentPool, Slots, StoreError, Volume, WritePlan};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use super::blk::{self, BlkOp, BlkRequest, Desc, GuestRange};
use super::guest_read;
use crate::exports::Export;
use crate::in_flight::{BufPool, IDLE_POLL};
use crate::qos::Cost;
use crate::volume_io::VolumeIo;
use crate::write_back::EarlyWrites;

pub(crate) type GuestMem = GuestMemoryAtomic<GuestMemoryMmap<()>>;
pub(crate) type Vring = VringRwLock<GuestMem>;

/// While writes completed early are in flight, the ring is looked at again this often.
const EARLY_RECHECK: std::time::Duration = std::time::Duration::from_micros(20);
/// While a request is held by QoS with nothing in flight, whether the queue is being stopped
/// is looked at this often: `stop_vring` (the frontend waiting on GET_VRING_BASE) waits for
/// the worker, and must not wait for a whole QoS delay.
const HELD_RECHECK: std::time::Duration = std::time::Duration::from_millis(5);

/// Recycled lists kept per kind, and the longest one kept: a guest decides how long a chain
/// is (up to 65535 descriptors through an indirect table), and one huge request must not leave
/// its memory held for the queue's life.
const LIST_POOL_MAX: usize = 256;
const LIST_CAPACITY_MAX: usize = 256;

fn recycle_list<T>(pool: &mut Vec<Vec<T>>, list: Vec<T>) {
    if pool.len() < LIST_POOL_MAX && list.capacity() <= LIST_CAPACITY_MAX {
        pool.push(list);
    }
}

/// A request whose engine op is in flight.
enum InFlight {
    Read {
        head: u16,
        data: Vec<GuestRange>,
        status: u64,
        len: usize,
        start: Instant,
        /// The layers its segments read from, kept open until it completes.
        _chain: Arc<Chain>,
    },
    /// `early`: completed to the guest already (write-back, see `Volume::reply_early`).
    Write { head: u16, status: u64, pending: PendingWrite, len: usize, start: Instant, early: bool },
}

/// A popped request held back by QoS until `deadline`.
struct Held {
    head: u16,
    descs: Vec<Desc>,
    /// The chain as parsed when it was popped (and charged).
    req: Option<BlkRequest>,
    deadline: Instant,
    since: Instant,
}

/// The state of one queue's worker (owned by its vring thread; the mutex around it is only
/// taken by that thread, by `stop_vring` and by the connection's quiesce).
pub(crate) struct QueueWorker {
    /// Set when the connection ends: pop nothing more, finish what was popped.
    stopping: Arc<AtomicBool>,
    volume: Arc<Volume>,
    io: Arc<VolumeIo>,
    volume_id: u64,
    read_only: bool,
    kind: EngineKind,
    engine: Option<Box<dyn IoEngine>>,
    mem: GuestMem,
    slots: Slots<InFlight>,
    writes_in_flight: usize,
    held: Option<Held>,
    pool: BufPool,
    /// Recycled segment lists of the ops (a request allocates none).
    seg_lists: SegmentPool,
    /// Recycled span lists of the reads that land in guest memory.
    span_lists: Vec<Vec<HostSpan>>,
    /// Recycled descriptor and data-range lists of the requests.
    desc_lists: Vec<Vec<Desc>>,
    range_lists: Vec<Vec<GuestRange>>,
    /// Completions drained from the engine (reused).
    done: Vec<Completion>,
    /// Used-ring entries added since the last notification.
    unsignalled: bool,
    /// Writes among those in flight that the guest was told are done.
    early: EarlyWrites,
    /// Registers this queue with the volume (early completions need a single writer), from
    /// its first kick: queues a guest never uses do not count.
    writer: Option<WriterGuard>,
    /// The driver did not negotiate VIRTIO_BLK_F_FLUSH: a write is stable when it completes
    /// (virtio 1.2, 5.2.6.2), so none completes early and each is flushed before it completes.
    write_through: bool,
}

/// How a request that finished without an engine op went, for the counters.
enum Outcome {
    Read(u64),
    Write(u64),
    Other,
    Error,
}

impl QueueWorker {
    pub(crate) fn new(export: &Export, kind: EngineKind, mem: GuestMem, stopping: Arc<AtomicBool>) -> QueueWorker {
        QueueWorker {
            stopping,
            volume: export.volume.clone(),
            io: export.io.clone(),
            volume_id: export.volume_id,
            read_only: export.read_only,
            kind,
            engine: None,
            mem,
            slots: Slots::default(),
            writes_in_flight: 0,
            held: None,
            pool: BufPool::default(),
            seg_lists: SegmentPool::default(),
            span_lists: Vec::new(),
            desc_lists: Vec::new(),
            range_lists: Vec::new(),
            done: Vec::new(),
            unsignalled: false,
            early: EarlyWrites::default(),
            writer: None,
            write_through: false,
        }
    }

    /// See `write_through`; set from the features the driver acknowledged.
    pub(crate) fn set_write_through(&mut self, on: bool) {
        self.write_through = on;
    }

    /// The status of a write-type request that succeeded: OK, once stable if it must be.
    fn stable(&self, what: &str) -> u8 {
        if !self.write_through {
            return blk::STATUS_OK;
        }
        match self.volume.flush() {
            Ok(()) => blk::STATUS_OK,
            Err(e) => self.store_error(what, &e).0,
        }
    }

    /// Serves the queue until it is idle: nothing in flight, nothing held, and no request
    /// made available since notifications were turned back on. Returns early, with nothing in
    /// flight, when the frontend stops the queue.
    pub(crate) fn run(&mut self, vring: &Vring) -> io::Result<()> {
        if self.engine.is_none() {
            self.engine = Some(self.kind.build(blk::MAX_QUEUE_SIZE as u32 + 8)?);
        }
        if self.writer.is_none() {
            self.writer = Some(self.volume.open_writer());
        }
        // Kept across runs (a run per kick): its capacity is reused.
        let mut done = std::mem::take(&mut self.done);
        let r = self.serve(vring, &mut done);
        self.done = done;
        r
    }

    fn serve(&mut self, vring: &Vring, done: &mut Vec<Completion>) -> io::Result<()> {
        vring.disable_notification().map_err(io::Error::other)?;
        loop {
            let ready = !self.stopping.load(Ordering::Acquire) && {
                let state = vring.get_ref();
                state.is_enabled() && state.get_queue().ready()
            };
            if ready {
                self.start_requests(vring);
            } else if let Some(h) = self.held.take() {
                // The queue is being stopped: a popped request must complete (the frontend
                // counts it as taken), QoS deadline or not.
                self.start(vring, h.head, &h.descs, h.req, h.since);
            }
            self.signal(vring)?;
            if self.slots.is_empty() {
                if let Some(h) = &self.held {
                    let now = Instant::now();
                    if h.deadline > now {
                        std::thread::sleep((h.deadline - now).min(HELD_RECHECK));
                    }
                    continue;
                }
                // Idle: look at the ring a little longer before sleeping (a guest at queue
                // depth usually answers its completions with new requests within
                // microseconds; with notifications still off it need not kick either).
                if ready && self.poll_avail(vring) {
                    continue;
                }
                // Then turn notifications back on; a request that slipped in meanwhile is
                // served now rather than after a kick that will not come.
                if !ready || !vring.enable_notification().map_err(io::Error::other)? {
                    return Ok(());
                }
                // Unless the guest's avail index cannot be popped at all: then looking again
                // would spin this thread until the next kick.
                if self.avail_pending(vring) != Some(true) {
                    return Ok(());
                }
                vring.disable_notification().map_err(io::Error::other)?;
                continue;
            }
            let mut deadline = self.held.as_ref().map(|h| h.deadline);
            if !self.early.is_empty() {
                // Requests completed early let the guest send more while their ops are still
                // at the disk, and it may not kick (notifications are off while we run): look
                // at the ring again soon rather than only when an op completes.
                let soon = Instant::now() + EARLY_RECHECK;
                deadline = Some(deadline.map_or(soon, |d| d.min(soon)));
            }
            self.wait(1, deadline, done);
            for c in done.drain(..) {
                self.complete(vring, c);
            }
        }
    }

    /// Spins on the avail ring for up to [`IDLE_POLL`]: true as soon as the guest has made a
    /// request available, false when the time is up or the queue is being stopped.
    fn poll_avail(&self, vring: &Vring) -> bool {
        let until = Instant::now() + IDLE_POLL;
        loop {
            if self.stopping.load(Ordering::Acquire) {
                return false;
            }
            match self.avail_pending(vring) {
                Some(true) => return true,
                Some(false) => {}
                None => return false,
            }
            if Instant::now() >= until {
                return false;
            }
            for _ in 0..32 {
                std::hint::spin_loop();
            }
        }
    }

    /// Whether the guest has made requests available that a pop would return: None when
    /// there is nothing to look at (the queue is disabled, or its ring is not in guest memory)
    /// or when its avail index is more than a ring ahead of ours (a broken driver: popping
    /// fails, and will until the guest writes a sane index and kicks).
    fn avail_pending(&self, vring: &Vring) -> Option<bool> {
        let mem = self.mem.memory();
        let state = vring.get_ref();
        let queue = state.get_queue();
        if !state.is_enabled() || !queue.ready() {
            return None;
        }
        let ahead = queue.avail_idx(&*mem, Ordering::Acquire).ok()?.0.wrapping_sub(queue.next_avail());
        (ahead <= queue.size()).then_some(ahead > 0)
    }

    fn wait(&mut self, min: usize, deadline: Option<Instant>, done: &mut Vec<Completion>) {
        let engine = self.engine.as_mut().expect("engine built in run");
        let r = match deadline {
            Some(d) => engine.wait_until(min, d),
            None => engine.wait(min),
        };
        if let Err(e) = r {
            if e.kind() != io::ErrorKind::Interrupted {
                tracing::error!(error = %e, "vhost-user queue: I/O engine wait failed");
            }
        }
        engine.drain(done);
    }

    /// Pops and starts requests until the queue is empty or one is held by QoS.
    fn start_requests(&mut self, vring: &Vring) {
        loop {
            let (head, descs, req, since) = match self.held.take() {
                Some(h) => {
                    let now = Instant::now();
                    if now < h.deadline {
                        self.held = Some(h);
                        return;
                    }
                    self.io.stats.add_throttled(now.saturating_duration_since(h.since));
                    (h.head, h.descs, h.req, h.since)
                }
                None => {
                    let mem = self.mem.memory();
                    let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(mem);
                    let Some(chain) = chain else { return };
                    let head = chain.head_index();
                    let mut descs = self.desc_lists.pop().unwrap_or_default();
                    descs.clear();
                    descs.extend(chain.map(|d| Desc { addr: d.addr().0, len: d.len(), write: d.is_write_only() }));
                    // Parsed once: the request charged is the request run (the guest may
                    // rewrite its header in guest memory at any time).
                    let req = self.parse(&descs);
                    let now = Instant::now();
                    let cost = self.cost(req.as_ref());
                    if let Some(deadline) = self.io.limiter.reserve(cost, now) {
                        if deadline > now {
                            self.held = Some(Held { head, descs, req, deadline, since: now });
                            return;
                        }
                    }
                    (head, descs, req, now)
                }
            };
            self.start(vring, head, &descs, req, since);
            recycle_list(&mut self.desc_lists, descs);
        }
    }

    /// The QoS cost of a chain (a request that will be refused costs nothing).
    fn cost(&self, req: Option<&BlkRequest>) -> Cost {
        match req {
            Some(req) if blk::validate(req, self.volume.size(), self.read_only).is_ok() => match req.op {
                BlkOp::Read { len, .. } | BlkOp::Write { len, .. } => Cost::transfer(len),
                BlkOp::Discard | BlkOp::WriteZeroes => Cost::metadata(),
                BlkOp::Flush | BlkOp::GetId | BlkOp::Unsupported(_) => Cost::FREE,
            },
            _ => Cost::FREE,
        }
    }

    /// Reads the header from guest memory and parses the chain; None for a chain without a
    /// status byte or header (nothing can be answered).
    fn parse(&mut self, descs: &[Desc]) -> Option<BlkRequest> {
        let mem = self.mem.memory();
        let mut header = [0u8; blk::OUT_HDR_LEN];
        let mut at = 0;
        for r in blk::header_ranges(descs) {
            let n = r.len as usize;
            mem.read_slice(&mut header[at..at + n], GuestAddress(r.addr)).ok()?;
            at += n;
        }
        if at < blk::OUT_HDR_LEN {
            return None;
        }
        blk::parse_in(descs, &header, self.range_lists.pop().unwrap_or_default()).ok()
    }

    /// Starts one request: an engine op (read, aligned write) or done inline.
    fn start(&mut self, vring: &Vring, head: u16, descs: &[Desc], req: Option<BlkRequest>, since: Instant) {
        let stats = &self.io.stats;
        let Some(req) = req else {
            tracing::debug!(head, "vhost-user: malformed descriptor chain; completing it empty");
            stats.errors.fetch_add(1, Ordering::Relaxed);
            self.add_used(vring, head, 0);
            return;
        };
        stats.queue_depth.fetch_add(1, Ordering::Relaxed);
        let checked = if !blk::directions_ok(descs, &req) {
            Err(blk::RequestError::Direction)
        } else {
            blk::validate(&req, self.volume.size(), self.read_only)
        };
        if let Err(e) = checked {
            tracing::debug!(error = %e, "vhost-user request refused");
            self.finish_inline(vring, head, req.status, e.status(), 0, Outcome::Error, since);
            return;
        }
        // A request that could see or reorder the blocks of a write completed early waits for
        // it; so does a flush (the volume waits for them, and only this thread completes them).
        let touches = match req.op {
            BlkOp::Read { offset, len } | BlkOp::Write { offset, len } => self.early.overlaps(offset, len),
            BlkOp::Flush | BlkOp::Discard | BlkOp::WriteZeroes => !self.early.is_empty(),
            BlkOp::GetId | BlkOp::Unsupported(_) => false,
        };
        if touches {
            self.finish_early(vring);
        }
        let (status, written, outcome) = match req.op {
            BlkOp::Read { offset, len } => {
                if len > 0 {
                    return self.start_read(vring, head, req, offset, len as usize, since);
                }
                (blk::STATUS_OK, 0, Outcome::Read(0))
            }
            BlkOp::Write { offset, len } => return self.start_write(vring, head, req, offset, len as usize, since),
            BlkOp::Flush => match self.volume.flush() {
                Ok(()) => (blk::STATUS_OK, 0, Outcome::Other),
                Err(e) => self.store_error("flush", &e),
            },
            BlkOp::GetId => {
                let id = blk::device_id(self.volume_id);
                match self.scatter(&req.data, &id) {
                    Ok(n) => (blk::STATUS_OK, n as u32, Outcome::Other),
                    Err(e) => {
                        tracing::debug!(error = %e, "vhost-user: cannot write the device id");
                        (blk::STATUS_IOERR, 0, Outcome::Error)
                    }
                }
            }
            BlkOp::Discard | BlkOp::WriteZeroes => match self.zero_segments(vring, &req) {
                Ok(()) => match self.stable("discard/write-zeroes") {
                    blk::STATUS_OK => (blk::STATUS_OK, 0, Outcome::Other),
                    st => (st, 0, Outcome::Error),
                },
                Err((status, msg)) => {
                    tracing::debug!(error = %msg, "vhost-user discard/write-zeroes failed");
                    (status, 0, Outcome::Error)
                }
            },
            BlkOp::Unsupported(ty) => {
                tracing::debug!(ty, "vhost-user: unsupported request type");
                (blk::STATUS_UNSUPP, 0, Outcome::Other)
            }
        };
        self.finish_inline(vring, head, req.status, status, written, outcome, since);
    }

    fn store_error(&self, what: &str, e: &StoreError) -> (u8, u32, Outcome) {
        tracing::debug!(error = %e, "vhost-user {what} failed");
        (blk::STATUS_IOERR, 0, Outcome::Error)
    }

    /// Runs the segments of a DISCARD / WRITE_ZEROES request (its payload's length was
    /// checked by `blk::validate`). Err: the status to answer and why.
    fn zero_segments(&mut self, vring: &Vring, req: &BlkRequest) -> Result<(), (u8, String)> {
        let ioerr = |e: &dyn std::fmt::Display| (blk::STATUS_IOERR, e.to_string());
        let payload = self.gather_data(&req.data).map_err(|e| ioerr(&e))?;
        let discard = req.op == BlkOp::Discard;
        let segs =
            blk::parse_segments(&payload, self.volume.size(), discard).map_err(|e| (e.status(), e.to_string()))?;
        for s in segs {
            let r = if discard {
                self.while_frozen(vring, |v| v.trim(s.offset, s.len))
            } else {
                self.while_frozen(vring, |v| v.write_zeroes(s.offset, s.len, !s.unmap))
            };
            r.map_err(|e| ioerr(&e))?;
        }
        Ok(())
    }

    /// Copies the request's data out of guest memory.
    fn gather_data(&self, data: &[GuestRange]) -> Result<Vec<u8>, vm_memory::GuestMemoryError> {
        let mut out = vec![0u8; data.iter().map(|r| r.len as usize).sum()];
        self.gather_into(data, &mut out)?;
        Ok(out)
    }

    /// Copies the guest ranges, in order, into `out` (exactly as long as they are together).
    fn gather_into(&self, data: &[GuestRange], out: &mut [u8]) -> Result<(), vm_memory::GuestMemoryError> {
        let mem = self.mem.memory();
        let mut at = 0;
        for r in data {
            mem.read_slice(&mut out[at..at + r.len as usize], GuestAddress(r.addr))?;
            at += r.len as usize;
        }
        Ok(())
    }

    /// Copies `src` into the guest ranges, in order; returns the bytes written.
    fn scatter(&self, data: &[GuestRange], src: &[u8]) -> Result<usize, vm_memory::GuestMemoryError> {
        let mem = self.mem.memory();
        let mut at = 0;
        for r in data {
            if at == src.len() {
                break;
            }
            let n = (r.len as usize).min(src.len() - at);
            mem.write_slice(&src[at..at + n], GuestAddress(r.addr))?;
            at += n;
        }
        Ok(at)
    }

    fn start_read(&mut self, vring: &Vring, head: u16, req: BlkRequest, offset: u64, len: usize, since: Instant) {
        let mut segs = self.seg_lists.take();
        let chain = match self.volume.read_segments(offset, len as u64, 0, &mut segs) {
            Ok(chain) => chain,
            Err(e) => {
                self.seg_lists.put(segs);
                let (st, w, o) = self.store_error("read", &e);
                return self.finish_inline(vring, head, req.status, st, w, o, since);
            }
        };
        // Straight into the guest's buffers when every range is inside one mapped region.
        let mem = self.mem.memory().into_inner();
        let mut spans = self.span_lists.pop().unwrap_or_default();
        let planned = guest_read::plan(&mem, &req.data, &segs, &mut spans);
        self.seg_lists.put(segs);
        if planned.is_err() {
            recycle_list(&mut self.span_lists, spans);
            drop(chain);
            return self.start_read_bounced(vring, head, req, offset, len, since);
        }
        if spans.is_empty() {
            // All holes, zeroed in place already.
            recycle_list(&mut self.span_lists, spans);
            recycle_list(&mut self.range_lists, req.data);
            return self.finish_inline(
                vring,
                head,
                req.status,
                blk::STATUS_OK,
                len as u32,
                Outcome::Read(len as u64),
                since,
            );
        }
        self.submit_read(head, req, len, since, chain, Op::ReadInto { spans, keep: mem });
    }

    /// Puts a read's op in flight: into guest memory, or into a bounce buffer.
    fn submit_read(&mut self, head: u16, req: BlkRequest, len: usize, since: Instant, chain: Arc<Chain>, op: Op) {
        let slot = self.slots.insert(InFlight::Read {
            head,
            data: req.data,
            status: req.status,
            len,
            start: since,
            _chain: chain,
        });
        self.engine.as_mut().expect("engine").push(slot as u64, op);
    }

    /// [`start_read`](Self::start_read) through a bounce buffer, copied into the guest at
    /// completion: for a range that is not inside one region of guest memory.
    fn start_read_bounced(
        &mut self,
        vring: &Vring,
        head: u16,
        req: BlkRequest,
        offset: u64,
        len: usize,
        since: Instant,
    ) {
        let mut buf = self.pool.take(len);
        let mut segs = self.seg_lists.take();
        let chain = match self.volume.read_data_segments(offset, len as u64, 0, &mut buf, &mut segs) {
            Ok(chain) => chain,
            Err(e) => {
                self.seg_lists.put(segs);
                self.pool.put(buf);
                let (st, w, o) = self.store_error("read", &e);
                return self.finish_inline(vring, head, req.status, st, w, o, since);
            }
        };
        if segs.is_empty() {
            self.seg_lists.put(segs);
            // All holes: no engine op needed.
            let r = self.scatter(&req.data, &buf[..len]);
            self.pool.put(buf);
            let (st, w, o) = match r {
                Ok(n) => (blk::STATUS_OK, n as u32, Outcome::Read(len as u64)),
                Err(_) => (blk::STATUS_IOERR, 0, Outcome::Error),
            };
            return self.finish_inline(vring, head, req.status, st, w, o, since);
        }
        self.submit_read(head, req, len, since, chain, Op::Read { buf, segs });
    }

    fn start_write(&mut self, vring: &Vring, head: u16, req: BlkRequest, offset: u64, len: usize, since: Instant) {
        // Copied once, out of guest memory into the op's own aligned buffer.
        let mut buf = self.pool.take(len.next_multiple_of(4096));
        let gathered = self.gather_into(&req.data, &mut buf[..len]);
        recycle_list(&mut self.range_lists, req.data);
        if gathered.is_err() {
            self.pool.put(buf);
            return self.finish_inline(vring, head, req.status, blk::STATUS_IOERR, 0, Outcome::Error, since);
        }
        let gate = loop {
            match self.volume.begin_write() {
                Err(StoreError::Frozen) => {
                    self.finish_writes(vring);
                    self.volume.wait_thawed();
                }
                other => break other,
            }
        };
        let planned = match gate {
            Ok(gate) => {
                let segs = self.seg_lists.take();
                self.volume.plan_write_filled(gate, offset, len, buf, segs)
            }
            Err(e) => {
                self.pool.put(buf);
                Err(e)
            }
        };
        match planned {
            Ok(WritePlan::Submit { op, mut pending }) => {
                let early = !self.write_through && self.early.has_room(len) && self.volume.reply_early(&mut pending);
                let slot =
                    self.slots.insert(InFlight::Write { head, status: req.status, pending, len, start: since, early });
                self.writes_in_flight += 1;
                // The op is submitted before the guest hears of it: both go out at the next wait.
                self.engine.as_mut().expect("engine").push(slot as u64, op);
                if early {
                    self.early.answered(offset, len, slot, &self.io.stats, since);
                    self.write_status(vring, head, req.status, blk::STATUS_OK, 0);
                }
            }
            Ok(WritePlan::Done) => match self.stable("write") {
                blk::STATUS_OK => {
                    self.finish_inline(vring, head, req.status, blk::STATUS_OK, 0, Outcome::Write(len as u64), since)
                }
                st => self.finish_inline(vring, head, req.status, st, 0, Outcome::Error, since),
            },
            Err(e) => {
                let (st, w, o) = self.store_error("write", &e);
                self.finish_inline(vring, head, req.status, st, w, o, since)
            }
        }
    }

    /// Runs a mutation, waiting out a snapshot's freeze: this queue's own writes finish first
    /// (the freeze waits for them), then the freeze ends, then the mutation is retried.
    fn while_frozen<T>(
        &mut self,
        vring: &Vring,
        f: impl Fn(&Volume) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        loop {
            match f(&self.volume) {
                Err(StoreError::Frozen) => {
                    self.finish_writes(vring);
                    self.volume.wait_thawed();
                }
                other => return other,
            }
        }
    }

    /// Completes the writes the guest was told are done (before a flush, and before a request
    /// that could see or reorder their blocks).
    fn finish_early(&mut self, vring: &Vring) {
        let mut done = Vec::new();
        while !self.early.is_empty() {
            self.wait(1, None, &mut done);
            for c in done.drain(..) {
                self.complete(vring, c);
            }
        }
    }

    /// Completes every write in flight (before waiting for a snapshot's freeze to end).
    fn finish_writes(&mut self, vring: &Vring) {
        let mut done = Vec::new();
        while self.writes_in_flight > 0 {
            self.wait(1, None, &mut done);
            for c in done.drain(..) {
                self.complete(vring, c);
            }
        }
    }

    fn complete(&mut self, vring: &Vring, c: Completion) {
        let slot = c.tag as usize;
        let Some(state) = self.slots.take(slot) else {
            tracing::error!(slot, "vhost-user: completion for an unknown slot");
            return;
        };
        let io = self.io.clone();
        let stats = &io.stats;
        if let InFlight::Write { early: true, pending, .. } = state {
            // Completed to the guest already (and counted then): only the map, or the failure.
            self.writes_in_flight -= 1;
            let Op::Write { buf, segs } = c.op else { unreachable!("write slot on another op") };
            self.pool.put(buf);
            self.seg_lists.put(segs);
            self.early.completed(slot, &self.volume, pending, &c.result, stats);
            return;
        }
        stats.queue_depth.fetch_sub(1, Ordering::Relaxed);
        match state {
            InFlight::Read { head, data, status, len, start, .. } => {
                // A bounced read is copied into the guest now; one into guest memory is there.
                let buf = match c.op {
                    Op::Read { buf, segs } => {
                        self.seg_lists.put(segs);
                        Some(buf)
                    }
                    Op::ReadInto { spans, .. } => {
                        recycle_list(&mut self.span_lists, spans);
                        None
                    }
                    _ => unreachable!("read slot on another op"),
                };
                let (st, written) = match c.result {
                    Ok(_) => match buf.as_ref().map_or(Ok(len), |b| self.scatter(&data, &b[..len])) {
                        Ok(n) => {
                            stats.read_ops.fetch_add(1, Ordering::Relaxed);
                            stats.read_bytes.fetch_add(len as u64, Ordering::Relaxed);
                            stats.read_latency.observe(start.elapsed());
                            (blk::STATUS_OK, n as u32)
                        }
                        Err(_) => (blk::STATUS_IOERR, 0),
                    },
                    Err(e) => {
                        tracing::debug!(error = %e, "vhost-user read failed");
                        (blk::STATUS_IOERR, 0)
                    }
                };
                if st != blk::STATUS_OK {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(buf) = buf {
                    self.pool.put(buf);
                }
                recycle_list(&mut self.range_lists, data);
                self.write_status(vring, head, status, st, written);
            }
            InFlight::Write { head, status, pending, len, start, .. } => {
                self.writes_in_flight -= 1;
                let Op::Write { buf, segs } = c.op else { unreachable!("write slot on another op") };
                self.pool.put(buf);
                self.seg_lists.put(segs);
                let st = match c.result {
                    Ok(_) => {
                        // Durability rule: the map bits only after the data is written.
                        self.volume.commit_write(pending);
                        let st = self.stable("write");
                        if st == blk::STATUS_OK {
                            stats.write_ops.fetch_add(1, Ordering::Relaxed);
                            stats.write_bytes.fetch_add(len as u64, Ordering::Relaxed);
                            stats.write_latency.observe(start.elapsed());
                        } else {
                            stats.errors.fetch_add(1, Ordering::Relaxed);
                        }
                        st
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "vhost-user write failed");
                        stats.errors.fetch_add(1, Ordering::Relaxed);
                        blk::STATUS_IOERR
                    }
                };
                self.write_status(vring, head, status, st, 0);
            }
        }
    }

    /// Completes a request that did not go to the engine, with its counters.
    #[allow(clippy::too_many_arguments)]
    fn finish_inline(
        &mut self,
        vring: &Vring,
        head: u16,
        status_addr: u64,
        status: u8,
        written: u32,
        outcome: Outcome,
        since: Instant,
    ) {
        let stats = &self.io.stats;
        stats.queue_depth.fetch_sub(1, Ordering::Relaxed);
        match outcome {
            Outcome::Read(n) => {
                stats.read_ops.fetch_add(1, Ordering::Relaxed);
                stats.read_bytes.fetch_add(n, Ordering::Relaxed);
                stats.read_latency.observe(since.elapsed());
            }
            Outcome::Write(n) => {
                stats.write_ops.fetch_add(1, Ordering::Relaxed);
                stats.write_bytes.fetch_add(n, Ordering::Relaxed);
                stats.write_latency.observe(since.elapsed());
            }
            Outcome::Other => {
                stats.other_ops.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Error => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.write_status(vring, head, status_addr, status, written);
    }

    /// Writes the status byte and puts the chain in the used ring (`written` data bytes plus
    /// the status byte).
    fn write_status(&mut self, vring: &Vring, head: u16, status_addr: u64, status: u8, written: u32) {
        let ok = self.mem.memory().write_obj(status, GuestAddress(status_addr)).is_ok();
        self.add_used(vring, head, if ok { written + 1 } else { 0 });
    }

    fn add_used(&mut self, vring: &Vring, head: u16, len: u32) {
        if let Err(e) = vring.add_used(head, len) {
            tracing::warn!(error = %e, head, "vhost-user: cannot add to the used ring");
        }
        self.unsignalled = true;
    }

    /// Tells the guest about new used entries, when it wants to hear (EVENT_IDX).
    fn signal(&mut self, vring: &Vring) -> io::Result<()> {
        if !self.unsignalled {
            return Ok(());
        }
        self.unsignalled = false;
        if vring.needs_notification().map_err(io::Error::other)? {
            vring.signal_used_queue()?;
        }
        Ok(())
    }
}
