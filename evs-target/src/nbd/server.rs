//! NBD listeners and the transmission phase.
//!
//! Each connection gets a thread that runs the handshake with blocking I/O, then drives the
//! transmission phase on its own I/O engine (an io_uring per connection, or the portable
//! engine): one recv always in flight, requests parsed as soon as they arrive, reads and
//! aligned writes submitted as engine ops, replies gathered into one send. Socket and file
//! operations share the ring, so the thread has one place to wait.
//!
//! A client that asks for TLS (`NBD_OPT_STARTTLS`, see [`handshake`] for the policy) gets the
//! TLS handshake on its socket, then a pump thread ([`super::tls`]) between the encrypted
//! socket and a unix socket pair; haggling resumes and transmission runs on the pair's other
//! end, exactly as on a plain socket.
//!
//! Synchronous commands (FLUSH, TRIM, WRITE_ZEROES, BLOCK_STATUS, CACHE, unaligned writes)
//! run inline. A FLUSH covers every write this server has replied to, on any connection,
//! because a write's allocation bits are set before its reply and the flush persists the
//! volume's shared map: so CAN_MULTI_CONN holds.
//!
//! QoS: before a request starts, its cost is reserved on the volume's shared limiter
//! ([`crate::qos`]). When the limiter says "not before t", the connection keeps that request
//! at the head of its receive buffer, stops reading the socket (the client feels the
//! back-pressure), keeps completing what it has in flight, and starts the request at t. Nothing
//! is ever refused for QoS. Counters and latencies go to the volume's [`VolumeIo`].

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use evs_snapshot::io_engine::SendBuf;
use evs_snapshot::volume::{Chain, PendingWrite, WriterGuard};
use evs_snapshot::{
    AlignedBuf, BlockStore, ChangedExtent, Completion, EngineKind, IoEngine, Op, Segment, SegmentPool, Slots,
    StoreError, Volume, WritePlan,
};
use parking_lot::{Condvar, Mutex};

use super::handshake::{self, ExportInfo, Negotiated, Outcome, TlsPolicy, MAX_REQUEST_LEN};
use super::proto::{self, Command, MetaContext, Request};
use super::tls;
use crate::config::NbdTls;
use crate::exports::{Closer, Export, ExportRegistry};
use crate::in_flight::{BufPool, IDLE_POLL};
use crate::qos::Cost;
use crate::volume_io::VolumeIo;
use crate::write_back::EarlyWrites;

/// How long a client may take to finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Requests in flight per connection before we stop reading new ones (back-pressure).
const MAX_IN_FLIGHT: usize = 256;
/// Bytes of read/write payload in flight per connection before we stop reading.
const MAX_BYTES_IN_FLIGHT: usize = 128 << 20;
/// Receive buffer size; grows for a larger write payload.
const RECV_BUF: usize = 256 << 10;
/// A receive buffer grown for large writes is kept up to this size (a stream of 1 MiB writes
/// would otherwise allocate and fault in a fresh buffer per request).
const RECV_BUF_KEEP: usize = 4 << 20;
/// Requests started per turn of the event loop. The replies of one turn go out while the next
/// turn's requests run, so client and server overlap instead of taking turns with whole queues
/// (measured: see BENCHMARKS.md).
const BATCH: usize = 8;

const TAG_RECV: u64 = u64::MAX - 1;
const TAG_SEND: u64 = u64::MAX - 2;
const TAG_RECV_PAYLOAD: u64 = u64::MAX - 3;

/// Writes at least this large are received straight into the buffer they are written from
/// (no copy out of the receive buffer: measured, see BENCHMARKS.md).
const DIRECT_RECV_MIN: usize = 128 << 10;

/// A large write whose payload is being received into its own buffer.
struct PayloadRx {
    req: Request,
    /// Absent while the recv op owns it.
    buf: Option<AlignedBuf>,
    /// Payload bytes received so far.
    have: usize,
    /// When its QoS admission let it start.
    since: Instant,
}

/// A write's data: in the receive buffer, or already in a buffer of its own.
enum Payload<'p> {
    InRecvBuf(&'p [u8]),
    Owned { buf: AlignedBuf, len: usize },
}

/// NBD TLS: when it is required, and the rustls configuration of the server's identity.
#[derive(Clone)]
pub struct NbdTlsConfig {
    /// `On` or `Require` (`Off` is no `NbdTlsConfig`).
    pub mode: NbdTls,
    pub config: Arc<rustls::ServerConfig>,
}

/// Where a connection comes from, for the TLS policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peer {
    /// A loopback TCP address, or the unix socket.
    Local,
    Remote,
}

/// The NBD server: accepts connections and serves the exports of the registry.
pub struct NbdServer {
    exports: Arc<ExportRegistry>,
    /// For the changed-block contexts of snapshot exports.
    store: Arc<BlockStore>,
    engine: EngineKind,
    tls: Option<NbdTlsConfig>,
    shutting_down: AtomicBool,
    next_conn: AtomicU64,
    conns: Mutex<HashMap<u64, Closer>>,
    idle: Condvar,
}

impl NbdServer {
    pub fn new(
        exports: Arc<ExportRegistry>,
        store: Arc<BlockStore>,
        engine: EngineKind,
        tls: Option<NbdTlsConfig>,
    ) -> Arc<NbdServer> {
        Arc::new(NbdServer {
            exports,
            store,
            engine,
            tls,
            shutting_down: AtomicBool::new(false),
            next_conn: AtomicU64::new(1),
            conns: Mutex::new(HashMap::new()),
            idle: Condvar::new(),
        })
    }

    /// Accepts TCP connections until the task is dropped or the server shuts down.
    pub async fn serve_tcp(self: Arc<Self>, l: tokio::net::TcpListener) {
        loop {
            match l.accept().await {
                Ok((s, peer)) => {
                    // tokio hands over a non-blocking socket; the handshake uses blocking I/O.
                    let Ok(s) = s.into_std().and_then(|s| s.set_nonblocking(false).map(|()| s)) else { continue };
                    let _ = s.set_nodelay(true);
                    let local = if crate::config::is_loopback_ip(peer.ip()) { Peer::Local } else { Peer::Remote };
                    self.spawn_conn(s, peer.to_string(), local);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "NBD accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            if self.shutting_down.load(Ordering::Acquire) {
                return;
            }
        }
    }

    /// Accepts unix-socket connections until the task is dropped or the server shuts down.
    pub async fn serve_unix(self: Arc<Self>, l: tokio::net::UnixListener) {
        loop {
            match l.accept().await {
                Ok((s, _)) => {
                    let Ok(s) = s.into_std().and_then(|s| s.set_nonblocking(false).map(|()| s)) else { continue };
                    self.spawn_conn(s, "unix".to_string(), Peer::Local);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "NBD accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            if self.shutting_down.load(Ordering::Acquire) {
                return;
            }
        }
    }

    fn spawn_conn<S: Stream>(self: &Arc<Self>, s: S, peer: String, from: Peer) {
        if self.shutting_down.load(Ordering::Acquire) {
            return;
        }
        let close = match s.closer() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot clone an NBD socket; dropping the connection");
                return;
            }
        };
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        self.conns.lock().insert(id, close.clone());
        let server = self.clone();
        let spawned = std::thread::Builder::new().name(format!("nbd-{id}")).spawn(move || {
            let mut s = s;
            if let Err(e) = server.run_conn(&mut s, id, close, &peer, from) {
                tracing::debug!(peer, error = %e, "NBD connection ended with an error");
            }
            s.close();
            let mut conns = server.conns.lock();
            conns.remove(&id);
            if conns.is_empty() {
                server.idle.notify_all();
            }
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start an NBD connection thread");
            self.conns.lock().remove(&id);
        }
    }

    /// Stops accepting and ends every connection once its in-flight requests are answered.
    pub fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
        for close in self.conns.lock().values() {
            // The read side only: each connection answers what it already received.
            close(std::net::Shutdown::Read);
        }
    }

    /// Blocks until every connection thread has ended.
    pub fn wait_idle(&self) {
        let mut conns = self.conns.lock();
        while !conns.is_empty() {
            self.idle.wait_for(&mut conns, Duration::from_millis(200));
        }
    }

    /// Live connections.
    pub fn connections(&self) -> usize {
        self.conns.lock().len()
    }

    /// The TLS policy for a connection from `from`.
    fn tls_policy(&self, from: Peer) -> TlsPolicy {
        match (&self.tls, from) {
            (None, _) => TlsPolicy::Unavailable,
            (Some(t), _) if t.mode == NbdTls::Require => TlsPolicy::Required,
            (Some(_), Peer::Remote) => TlsPolicy::Required,
            (Some(_), Peer::Local) => TlsPolicy::Optional,
        }
    }

    fn run_conn<S: Stream>(&self, s: &mut S, id: u64, close: Closer, peer: &str, from: Peer) -> io::Result<()> {
        s.set_timeouts(Some(HANDSHAKE_TIMEOUT))?;
        let exports = &self.exports;
        let store = &self.store;
        let lookup = |name: &str| {
            // vhost-user attach tokens are not NBD export names.
            exports.lookup(name).filter(|e| e.protocol == crate::exports::Protocol::Nbd).map(|e: Export| {
                let mut contexts = MetaContext::all();
                if let Some(snap) = e.snapshot {
                    // Changed blocks against each snapshot this one descends from.
                    match store.snapshot_ancestors(snap) {
                        Ok(a) => contexts.extend(
                            a.into_iter()
                                .filter(|s| !evs_snapshot::snapshots::is_hidden(&s.name))
                                .map(|s| MetaContext::Changed(s.name)),
                        ),
                        Err(e) => tracing::warn!(error = %e, "cannot list the ancestors of an exported snapshot"),
                    }
                }
                let info = ExportInfo { size: e.volume.size(), read_only: e.read_only, contexts };
                (e, info)
            })
        };
        let handshake_error = |e: handshake::HandshakeError| io::Error::other(e.to_string());
        let upgrade = match handshake::negotiate(s, self.tls_policy(from), lookup).map_err(handshake_error)? {
            Outcome::Transmission(neg) => {
                s.set_timeouts(None)?;
                return self.transmit(s.as_raw_fd(), &neg, id, close);
            }
            Outcome::Closed => return Ok(()),
            Outcome::StartTls(upgrade) => upgrade,
        };
        // The policy offers STARTTLS only with a configuration.
        let Some(tls_config) = &self.tls else { return Ok(()) };
        let session = match tls::accept(tls_config.config.clone(), s) {
            Ok(session) => session,
            Err(e) => {
                // Worth more than a debug line: a wrong CA or hostname on the client shows here.
                tracing::info!(peer, error = %e, "NBD TLS handshake failed");
                return Ok(());
            }
        };
        s.set_timeouts(None)?;
        let (mut plain, pump_end) = std::os::unix::net::UnixStream::pair()?;
        let sock = s.duplicate()?;
        let pump = std::thread::Builder::new()
            .name(format!("nbd-{id}-tls"))
            .spawn(move || tls::pump(session, sock, pump_end))?;
        let res = (|| {
            plain.set_timeouts(Some(HANDSHAKE_TIMEOUT))?;
            match handshake::resume(&mut plain, upgrade, lookup).map_err(handshake_error)? {
                Outcome::Transmission(neg) => {
                    plain.set_timeouts(None)?;
                    self.transmit(plain.as_raw_fd(), &neg, id, close)
                }
                Outcome::Closed | Outcome::StartTls(_) => Ok(()),
            }
        })();
        // Our end closes first: the pump then sends close_notify and ends.
        drop(plain);
        match pump.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(peer, error = %e, "NBD TLS session ended with an error"),
            Err(_) => tracing::error!(peer, "the NBD TLS pump thread panicked"),
        }
        res
    }

    /// Runs the transmission phase on `fd` (the client's socket, or the plain end of its TLS
    /// pump), registered so that revoking the export closes the connection.
    fn transmit(&self, fd: RawFd, neg: &Negotiated<Export>, id: u64, close: Closer) -> io::Result<()> {
        if !self.exports.register_conn(&neg.name, id, close) {
            return Ok(()); // detached while we negotiated
        }
        let engine = self.engine.build(MAX_IN_FLIGHT as u32 + 8);
        let res = engine.and_then(|engine| Transmission::new(fd, neg, engine, self.store.clone()).run());
        self.exports.unregister_conn(&neg.name, id);
        res
    }
}

/// What a connection thread needs of its socket.
pub trait Stream: tls::Socket + AsRawFd {
    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()>;
    fn close(&self);
    /// A handle that shuts this socket down from another thread (on a clone of the socket).
    /// For a TLS connection it is the client's socket too: the pump passes the end on.
    fn closer(&self) -> io::Result<Closer>;
    /// Another handle on the same socket (for the TLS pump).
    fn duplicate(&self) -> io::Result<Self>
    where
        Self: Sized;
}

impl Stream for std::net::TcpStream {
    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
    fn close(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
    fn closer(&self) -> io::Result<Closer> {
        let clone = self.try_clone()?;
        Ok(Arc::new(move |how| {
            let _ = clone.shutdown(how);
        }))
    }
    fn duplicate(&self) -> io::Result<Self> {
        self.try_clone()
    }
}

impl Stream for std::os::unix::net::UnixStream {
    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
    fn close(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
    fn closer(&self) -> io::Result<Closer> {
        let clone = self.try_clone()?;
        Ok(Arc::new(move |how| {
            let _ = clone.shutdown(how);
        }))
    }
    fn duplicate(&self) -> io::Result<Self> {
        self.try_clone()
    }
}

/// A request whose engine op is in flight; `start` is when it was received.
enum InFlight {
    Read {
        cookie: u64,
        offset: u64,
        len: usize,
        hdr: usize,
        start: Instant,
        /// The layers its segments read from, kept open until it completes.
        _chain: Arc<Chain>,
    },
    /// `early`: replied to already (write-back, see [`Volume::reply_early`]).
    Write { cookie: u64, pending: PendingWrite, fua: bool, len: usize, start: Instant, early: bool },
}

/// The request at the head of the receive buffer, charged to the limiter and waiting for its
/// deadline.
#[derive(Debug, Clone, Copy)]
struct Held {
    deadline: Instant,
    /// When it was received (its latency counts from here).
    since: Instant,
}

/// What a request costs the volume's QoS budget (see [`crate::qos`] for the rules).
fn request_cost(req: &Request) -> Cost {
    match req.cmd {
        Command::Read | Command::Write | Command::Cache => Cost::transfer(req.len as u64),
        Command::Trim | Command::WriteZeroes => Cost::metadata(),
        Command::Flush | Command::BlockStatus | Command::Disc | Command::Unknown(_) => Cost::FREE,
    }
}

/// The transmission phase of one connection.
struct Transmission<'a> {
    fd: RawFd,
    volume: Arc<Volume>,
    read_only: bool,
    structured: bool,
    meta: Vec<(u32, MetaContext)>,
    flags: proto::NegotiatedFlags,
    engine: Box<dyn IoEngine>,
    _neg: std::marker::PhantomData<&'a ()>,

    /// Receive buffer, absent while the recv op owns it.
    rbuf: Option<AlignedBuf>,
    /// Unparsed bytes are rbuf[rpos..rend].
    rpos: usize,
    rend: usize,
    recv_in_flight: bool,
    /// The last request was a large write received in place: receive just the next header,
    /// so that another one's payload goes straight into its own buffer too, not through the
    /// receive buffer and a copy.
    header_only: bool,
    /// A large write being received into its own buffer (nothing else is parsed meanwhile).
    payload: Option<PayloadRx>,
    /// The client sent DISC, closed its side, or broke the protocol: read nothing more.
    closing: bool,

    slots: Slots<InFlight>,
    bytes_in_flight: usize,
    /// Writes among `slots` (they hold the volume's write gate open).
    writes_in_flight: usize,
    /// Writes among those replied to already.
    early: EarlyWrites,
    /// Registers this connection with the volume (early replies need a single writer).
    _writer: WriterGuard,

    /// Small replies, sent as one buffer.
    small: Vec<u8>,
    /// Large replies (read data), sent in order after `small`.
    big: Vec<SendBuf>,
    send_in_flight: bool,
    /// The socket failed: stop sending.
    broken: bool,

    pool: BufPool,
    /// Emptied segment lists of finished reads and gather lists of finished sends, reused:
    /// the steady state of a read allocates nothing.
    seg_lists: SegmentPool,
    send_lists: Vec<Vec<SendBuf>>,

    store: Arc<BlockStore>,
    volume_id: u64,
    snapshot: Option<u64>,
    /// The volume's limiter and counters, shared with its other connections.
    io: Arc<VolumeIo>,
    /// Error replies sent (to tell, after an inline request, whether it failed).
    errors: u64,
    /// A reserved request waiting for its QoS deadline.
    held: Option<Held>,
    /// Changed extents per `x-evs:changed:*` context id, computed on first use (a snapshot
    /// never changes).
    changed: HashMap<u32, Result<Vec<ChangedExtent>, StoreError>>,
}

impl<'a> Transmission<'a> {
    fn new(
        fd: RawFd,
        neg: &'a Negotiated<Export>,
        engine: Box<dyn IoEngine>,
        store: Arc<BlockStore>,
    ) -> Transmission<'a> {
        Transmission {
            fd,
            volume: neg.export.volume.clone(),
            read_only: neg.read_only,
            structured: neg.structured_replies,
            meta: neg.meta_contexts.clone(),
            flags: neg.flags(),
            engine,
            _neg: std::marker::PhantomData,
            rbuf: Some(AlignedBuf::zeroed(RECV_BUF)),
            rpos: 0,
            rend: 0,
            recv_in_flight: false,
            header_only: false,
            payload: None,
            closing: false,
            slots: Slots::default(),
            bytes_in_flight: 0,
            writes_in_flight: 0,
            early: EarlyWrites::default(),
            _writer: neg.export.volume.open_writer(),
            small: Vec::with_capacity(4096),
            big: Vec::new(),
            send_in_flight: false,
            broken: false,
            pool: BufPool::default(),
            seg_lists: SegmentPool::default(),
            send_lists: Vec::new(),
            store,
            volume_id: neg.export.volume_id,
            snapshot: neg.export.snapshot,
            io: neg.export.io.clone(),
            held: None,
            errors: 0,
            changed: HashMap::new(),
        }
    }

    fn run(mut self) -> io::Result<()> {
        let mut done = Vec::new();
        loop {
            let mut more = false;
            if !self.closing
                && !self.recv_in_flight
                && self.slots.len() < MAX_IN_FLIGHT
                && self.bytes_in_flight < MAX_BYTES_IN_FLIGHT
            {
                more = self.parse_and_dispatch();
                // A held request keeps the receive buffer (and stops reading: back-pressure).
                if !more
                    && self.held.is_none()
                    && !self.closing
                    && self.slots.len() < MAX_IN_FLIGHT
                    && self.bytes_in_flight < MAX_BYTES_IN_FLIGHT
                {
                    self.submit_recv();
                }
            }
            self.submit_send();
            if !self.recv_in_flight && !self.send_in_flight && self.slots.is_empty() && (self.closing || self.broken) {
                if self.broken || (self.small.is_empty() && self.big.is_empty()) {
                    return Ok(());
                }
                continue;
            }
            // With requests still waiting in the buffer, only submit: the next turn starts them.
            // A held request wakes the loop at its deadline.
            let deadline = if more { None } else { self.held.map(|h| h.deadline) };
            // Nothing at the disk: the client's next requests are likely microseconds away.
            if !more && deadline.is_none() && self.slots.is_empty() && self.poll_engine(&mut done)? {
                continue;
            }
            self.wait_engine_until(if more { 0 } else { 1 }, deadline, &mut done)?;
        }
    }

    /// Looks for completions (the socket's receive above all) for up to [`IDLE_POLL`] without
    /// blocking; completes them and returns true as soon as there are some.
    fn poll_engine(&mut self, done: &mut Vec<Completion>) -> io::Result<bool> {
        let until = Instant::now() + IDLE_POLL;
        loop {
            if let Err(e) = self.engine.wait(0) {
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            self.engine.drain(done);
            if !done.is_empty() {
                for c in done.drain(..) {
                    self.complete(c);
                }
                return Ok(true);
            }
            if Instant::now() >= until {
                return Ok(false);
            }
            std::hint::spin_loop();
        }
    }

    fn wait_engine(&mut self, min: usize, done: &mut Vec<Completion>) -> io::Result<()> {
        self.wait_engine_until(min, None, done)
    }

    fn wait_engine_until(
        &mut self,
        min: usize,
        deadline: Option<Instant>,
        done: &mut Vec<Completion>,
    ) -> io::Result<()> {
        let r = match deadline {
            Some(d) => self.engine.wait_until(min, d),
            None => self.engine.wait(min),
        };
        if let Err(e) = r {
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        self.engine.drain(done);
        for c in done.drain(..) {
            self.complete(c);
        }
        Ok(())
    }

    /// Completes every write this connection has in flight (before waiting for a snapshot's
    /// freeze to end: the freeze waits for them).
    fn finish_writes(&mut self) {
        let mut done = Vec::new();
        while self.writes_in_flight > 0 {
            if let Err(e) = self.wait_engine(1, &mut done) {
                tracing::error!(error = %e, "I/O engine failed while finishing writes");
                return;
            }
        }
    }

    /// Completes this connection's writes that were replied to early (before a flush, and
    /// before a request that could see or reorder their blocks).
    fn finish_early(&mut self) {
        let mut done = Vec::new();
        while !self.early.is_empty() {
            if let Err(e) = self.wait_engine(1, &mut done) {
                tracing::error!(error = %e, "I/O engine failed while finishing writes");
                return;
            }
        }
    }

    /// Whether a request on `offset..offset+len` must wait for early-replied writes first.
    fn touches_early(&self, cmd: Command, offset: u64, len: u64) -> bool {
        if self.early.is_empty() {
            return false;
        }
        match cmd {
            Command::Read | Command::Write => self.early.overlaps(offset, len),
            // Map-only, or no data: early writes overwrite blocks and change no map bit.
            Command::BlockStatus | Command::Disc | Command::Unknown(_) => false,
            // FLUSH: the volume waits for them, and only this thread completes them. TRIM,
            // WRITE_ZEROES and CACHE work on the files directly.
            Command::Flush | Command::Trim | Command::WriteZeroes | Command::Cache => true,
        }
    }

    fn complete(&mut self, c: Completion) {
        match c.tag {
            TAG_RECV => {
                self.recv_in_flight = false;
                let Op::Recv { buf, .. } = c.op else { unreachable!("recv tag on another op") };
                self.rbuf = Some(buf);
                match c.result {
                    Ok(0) => self.closing = true,
                    Ok(n) => self.rend += n,
                    Err(e) => {
                        tracing::debug!(error = %e, "NBD recv failed");
                        self.closing = true;
                    }
                }
            }
            TAG_RECV_PAYLOAD => {
                self.recv_in_flight = false;
                let Op::Recv { buf, .. } = c.op else { unreachable!("payload recv tag on another op") };
                let Some(mut p) = self.payload.take() else { unreachable!("payload recv without a payload") };
                match c.result {
                    Ok(n) if n > 0 => {
                        p.have += n;
                        if p.have == p.req.len as usize {
                            let len = p.have;
                            self.dispatch(p.req, Payload::Owned { buf, len }, p.since);
                        } else {
                            p.buf = Some(buf);
                            self.payload = Some(p);
                        }
                    }
                    other => {
                        // The client went away in the middle of a request.
                        if let Err(e) = other {
                            tracing::debug!(error = %e, "NBD recv failed");
                        }
                        self.pool.put(buf);
                        self.closing = true;
                    }
                }
            }
            TAG_SEND => {
                self.send_in_flight = false;
                let Op::Send { bufs, .. } = c.op else { unreachable!("send tag on another op") };
                match c.result {
                    Ok(n) => self.sent(bufs, n),
                    Err(e) => {
                        tracing::debug!(error = %e, "NBD send failed");
                        self.broken = true;
                        self.closing = true;
                    }
                }
            }
            slot => self.request_done(slot as usize, c),
        }
    }

    /// Accounts a (possibly short) send; the unsent rest goes out before anything newer.
    fn sent(&mut self, mut bufs: Vec<SendBuf>, mut n: usize) {
        let mut rest = Vec::new();
        for mut b in bufs.drain(..) {
            let len = b.end - b.start;
            if n >= len {
                n -= len;
                self.pool.put(b.data);
            } else {
                b.start += n;
                n = 0;
                rest.push(b);
            }
        }
        if !rest.is_empty() {
            // The unsent rest goes first; replies queued meanwhile follow it.
            rest.append(&mut self.big);
            self.big = rest;
        }
        self.send_lists.push(bufs);
    }

    fn submit_send(&mut self) {
        if self.send_in_flight || self.broken || (self.small.is_empty() && self.big.is_empty()) {
            return;
        }
        let mut bufs = self.send_lists.pop().unwrap_or_default();
        bufs.append(&mut self.big);
        if !self.small.is_empty() {
            let mut b = self.pool.take(self.small.len());
            b.as_mut_slice().copy_from_slice(&self.small);
            let len = self.small.len();
            bufs.push(SendBuf { data: b, start: 0, end: len });
            self.small.clear();
        }
        // Linux takes at most 1024 iovecs per sendmsg.
        if bufs.len() > 1024 {
            let tail = bufs.split_off(1024);
            self.big = tail;
        }
        self.engine.push(TAG_SEND, Op::Send { fd: self.fd, bufs });
        self.send_in_flight = true;
    }

    fn submit_recv(&mut self) {
        if let Some(p) = self.payload.as_mut() {
            let Some(buf) = p.buf.take() else { return };
            let seg = Segment { fd: self.fd, offset: 0, buf_offset: p.have, len: p.req.len as usize - p.have };
            self.engine.push(TAG_RECV_PAYLOAD, Op::Recv { buf, seg });
            self.recv_in_flight = true;
            return;
        }
        let Some(mut buf) = self.rbuf.take() else { return };
        // Keep unparsed bytes at the front; make room for at least a request header.
        if self.rpos > 0 {
            buf.as_mut_slice().copy_within(self.rpos..self.rend, 0);
            self.rend -= self.rpos;
            self.rpos = 0;
        }
        let len = if self.header_only && self.rend < proto::REQUEST_LEN {
            proto::REQUEST_LEN - self.rend
        } else {
            buf.len() - self.rend
        };
        let seg = Segment { fd: self.fd, offset: 0, buf_offset: self.rend, len };
        self.engine.push(TAG_RECV, Op::Recv { buf, seg });
        self.recv_in_flight = true;
    }

    /// Parses up to [`BATCH`] complete requests in the receive buffer and starts them. Returns
    /// whether another complete request is waiting there.
    fn parse_and_dispatch(&mut self) -> bool {
        let Some(mut rbuf) = self.rbuf.take() else { return false };
        let mut started = 0;
        let mut more = false;
        while !self.closing && self.slots.len() < MAX_IN_FLIGHT && self.bytes_in_flight < MAX_BYTES_IN_FLIGHT {
            if started == BATCH {
                more = Self::complete_request_at(&rbuf[self.rpos..self.rend]);
                break;
            }
            started += 1;
            let avail = &rbuf[self.rpos..self.rend];
            let req = match proto::parse_request(avail) {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "bad NBD request; closing the connection");
                    self.closing = true;
                    break;
                }
            };
            let payload = if req.cmd == Command::Write { req.len as usize } else { 0 };
            if payload > MAX_REQUEST_LEN as usize {
                // We will not buffer it: answer, then close (the stream cannot be resynced).
                self.reply_error(req.cookie, proto::NBD_EINVAL, "write payload larger than the maximum request size");
                self.closing = true;
                break;
            }
            let need = proto::REQUEST_LEN + payload;
            self.header_only = payload >= DIRECT_RECV_MIN;
            if avail.len() < need {
                if payload >= DIRECT_RECV_MIN {
                    // The rest of a large write's payload goes straight into its own buffer.
                    let Some(since) = self.admit(&req) else { break };
                    let mut buf = self.pool.take(payload.next_multiple_of(4096));
                    let got = avail.len() - proto::REQUEST_LEN;
                    buf[..got].copy_from_slice(&avail[proto::REQUEST_LEN..]);
                    self.rpos = self.rend;
                    self.payload = Some(PayloadRx { req, buf: Some(buf), have: got, since });
                    break;
                }
                if rbuf.len() < need {
                    let mut bigger = AlignedBuf::zeroed(need.next_multiple_of(RECV_BUF));
                    bigger[..avail.len()].copy_from_slice(avail);
                    self.rend -= self.rpos;
                    self.rpos = 0;
                    rbuf = bigger;
                }
                break;
            }
            let Some(since) = self.admit(&req) else { break };
            let start = self.rpos + proto::REQUEST_LEN;
            self.rpos += need;
            self.dispatch(req, Payload::InRecvBuf(&rbuf[start..start + payload]), since);
        }
        if self.rpos == self.rend {
            self.rpos = 0;
            self.rend = 0;
            if rbuf.len() > RECV_BUF_KEEP {
                rbuf = AlignedBuf::zeroed(RECV_BUF);
            }
        }
        self.rbuf = Some(rbuf);
        more
    }

    /// QoS: charges a request once and says when it started (its admission), or None while
    /// it is held until its deadline (the loop comes back to it then).
    fn admit(&mut self, req: &Request) -> Option<Instant> {
        let now = Instant::now();
        match self.held {
            Some(h) if now < h.deadline => None,
            Some(h) => {
                self.held = None;
                self.io.stats.add_throttled(now.saturating_duration_since(h.since));
                Some(h.since)
            }
            None => {
                let cost = if self.request_is_valid(req) { request_cost(req) } else { Cost::FREE };
                if let Some(deadline) = self.io.limiter.reserve(cost, now) {
                    if deadline > now {
                        self.held = Some(Held { deadline, since: now });
                        return None;
                    }
                }
                Some(now)
            }
        }
    }

    /// Whether `avail` starts with a whole request (header and payload).
    fn complete_request_at(avail: &[u8]) -> bool {
        match proto::parse_request(avail) {
            Ok(Some(r)) => {
                let payload = if r.cmd == Command::Write { r.len as usize } else { 0 };
                payload > MAX_REQUEST_LEN as usize || avail.len() >= proto::REQUEST_LEN + payload
            }
            Ok(None) => false,
            // Let the next turn report it.
            Err(_) => true,
        }
    }

    fn request_is_valid(&self, req: &Request) -> bool {
        proto::validate_request(req, self.volume.size(), MAX_REQUEST_LEN, self.read_only, &self.flags).is_ok()
    }

    /// Runs a request received at `since`; the ones that finish inline are counted here, the
    /// engine ops when they complete.
    fn dispatch(&mut self, req: Request, payload: Payload<'_>, since: Instant) {
        let stats = &self.io.stats;
        stats.queue_depth.fetch_add(1, Ordering::Relaxed);
        let errors_before = self.errors;
        if self.dispatch_inner(req, payload, since) {
            return; // an engine op: counted at completion
        }
        let stats = &self.io.stats;
        stats.queue_depth.fetch_sub(1, Ordering::Relaxed);
        if self.errors != errors_before {
            stats.errors.fetch_add(1, Ordering::Relaxed);
        } else if req.cmd == Command::Write {
            // Unaligned writes complete inline (read-modify-write).
            stats.write_ops.fetch_add(1, Ordering::Relaxed);
            stats.write_bytes.fetch_add(req.len as u64, Ordering::Relaxed);
            stats.write_latency.observe(since.elapsed());
        } else if req.cmd == Command::Read {
            stats.read_ops.fetch_add(1, Ordering::Relaxed);
            stats.read_latency.observe(since.elapsed());
        } else if req.cmd != Command::Disc {
            stats.other_ops.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Returns true when the request became an engine op (its reply comes at completion).
    fn dispatch_inner(&mut self, req: Request, payload: Payload<'_>, since: Instant) -> bool {
        if let Err(errno) =
            proto::validate_request(&req, self.volume.size(), MAX_REQUEST_LEN, self.read_only, &self.flags)
        {
            if let Payload::Owned { buf, .. } = payload {
                self.pool.put(buf);
            }
            tracing::debug!(cmd = ?req.cmd, flags = req.flags, offset = req.offset, len = req.len, errno, "NBD request refused");
            self.reply_error(req.cookie, errno, "invalid request");
            return false;
        }
        let fua = req.flags & proto::NBD_CMD_FLAG_FUA != 0;
        if self.touches_early(req.cmd, req.offset, req.len as u64) {
            self.finish_early();
        }
        let r: Result<(), StoreError> = match req.cmd {
            Command::Read => return self.start_read(req, since),
            Command::Write => match self.plan_write(req.offset, payload) {
                Ok(WritePlan::Submit { op, mut pending }) => {
                    let len = req.len as usize;
                    let early = !fua && self.early.has_room(len) && self.volume.reply_early(&mut pending);
                    let slot = self.slots.insert(InFlight::Write {
                        cookie: req.cookie,
                        pending,
                        fua,
                        len,
                        start: since,
                        early,
                    });
                    self.bytes_in_flight += len;
                    self.writes_in_flight += 1;
                    // The op goes to the kernel before the reply: both are submitted in order.
                    self.engine.push(slot as u64, op);
                    if early {
                        self.early.answered(req.offset, len, slot, &self.io.stats, since);
                        self.reply_ok(req.cookie);
                    }
                    return true;
                }
                Ok(WritePlan::Done) => self.flush_if(fua),
                Err(e) => Err(e),
            },
            // Early-replied writes completed just above.
            Command::Flush => self.volume.flush(),
            Command::Trim => {
                self.while_frozen(|v| v.trim(req.offset, req.len as u64)).and_then(|()| self.flush_if(fua))
            }
            Command::WriteZeroes => {
                let no_hole = req.flags & proto::NBD_CMD_FLAG_NO_HOLE != 0;
                let (off, len) = (req.offset, req.len as u64);
                if req.flags & proto::NBD_CMD_FLAG_FAST_ZERO != 0 {
                    self.while_frozen(|v| v.write_zeroes_fast(off, len, no_hole))
                } else {
                    self.while_frozen(|v| v.write_zeroes(off, len, no_hole))
                }
                .and_then(|()| self.flush_if(fua))
            }
            Command::Cache => self.volume.prefetch(req.offset, req.len as u64),
            Command::BlockStatus => {
                self.block_status(req);
                return false;
            }
            Command::Disc => {
                self.closing = true;
                return false;
            }
            Command::Unknown(_) => Err(StoreError::Io(io::Error::from_raw_os_error(libc::EINVAL))),
        };
        match r {
            Ok(()) => self.reply_ok(req.cookie),
            Err(e) => self.reply_store_error(req.cookie, &e),
        }
        false
    }

    /// Plans an aligned write into a pooled buffer (waiting out a snapshot's freeze).
    fn plan_write(&mut self, offset: u64, payload: Payload<'_>) -> Result<WritePlan, StoreError> {
        match payload {
            Payload::InRecvBuf(data) => loop {
                let buf = self.pool.take(data.len().next_multiple_of(4096));
                let segs = self.seg_lists.take();
                match self.volume.plan_write_in(offset, data, buf, segs) {
                    Err(StoreError::Frozen) => {
                        self.finish_writes();
                        self.volume.wait_thawed();
                    }
                    other => return other,
                }
            },
            Payload::Owned { buf, len } => {
                let gate = self.while_frozen(|v| v.begin_write())?;
                let segs = self.seg_lists.take();
                self.volume.plan_write_filled(gate, offset, len, buf, segs)
            }
        }
    }

    /// Runs a mutation, waiting out a snapshot's freeze: this connection's own writes finish
    /// first (the freeze waits for them), then the freeze ends, then the mutation is retried.
    fn while_frozen<T>(&mut self, f: impl Fn(&Volume) -> Result<T, StoreError>) -> Result<T, StoreError> {
        loop {
            match f(&self.volume) {
                Err(StoreError::Frozen) => {
                    self.finish_writes();
                    self.volume.wait_thawed();
                }
                other => return other,
            }
        }
    }

    fn flush_if(&self, fua: bool) -> Result<(), StoreError> {
        if fua {
            self.volume.flush()
        } else {
            Ok(())
        }
    }

    /// Returns true when the read became an engine op.
    fn start_read(&mut self, req: Request, since: Instant) -> bool {
        let len = req.len as usize;
        if len == 0 {
            self.reply_ok(req.cookie);
            return false;
        }
        let hdr = if self.structured { proto::OFFSET_DATA_HEADER_LEN } else { proto::SIMPLE_REPLY_LEN };
        let mut buf = self.pool.take(hdr + len);
        let mut segs = self.seg_lists.take();
        let chain = match self.volume.read_data_segments(req.offset, len as u64, hdr, &mut buf, &mut segs) {
            Ok(chain) => chain,
            Err(e) => {
                self.seg_lists.put(segs);
                self.pool.put(buf);
                self.reply_store_error(req.cookie, &e);
                return false;
            }
        };
        let slot = self.slots.insert(InFlight::Read {
            cookie: req.cookie,
            offset: req.offset,
            len,
            hdr,
            start: since,
            _chain: chain,
        });
        self.bytes_in_flight += len;
        self.engine.push(slot as u64, Op::Read { buf, segs });
        true
    }

    fn request_done(&mut self, slot: usize, c: Completion) {
        let Some(state) = self.slots.take(slot) else {
            tracing::error!(slot, "completion for an unknown request slot");
            return;
        };
        if let InFlight::Write { early: true, pending, len, .. } = state {
            // Answered already (and counted then): only the map bits, or the failure.
            self.bytes_in_flight -= len;
            self.writes_in_flight -= 1;
            let Op::Write { buf, segs } = c.op else { unreachable!("write slot on another op") };
            self.pool.put(buf);
            self.seg_lists.put(segs);
            self.early.completed(slot, &self.volume, pending, &c.result, &self.io.stats);
            return;
        }
        let stats = &self.io.stats;
        stats.queue_depth.fetch_sub(1, Ordering::Relaxed);
        match state {
            InFlight::Read { cookie, offset, len, hdr, start, .. } => {
                self.bytes_in_flight -= len;
                let Op::Read { mut buf, segs } = c.op else { unreachable!("read slot on another op") };
                self.seg_lists.put(segs);
                match c.result {
                    Ok(_) => {
                        stats.read_ops.fetch_add(1, Ordering::Relaxed);
                        stats.read_bytes.fetch_add(len as u64, Ordering::Relaxed);
                        stats.read_latency.observe(start.elapsed());
                        if self.structured {
                            proto::write_offset_data_header(&mut buf[..hdr], true, cookie, offset, len as u32);
                        } else {
                            proto::write_simple_reply(&mut buf[..hdr], 0, cookie);
                        }
                        self.big.push(SendBuf { data: buf, start: 0, end: hdr + len });
                    }
                    Err(e) => {
                        stats.errors.fetch_add(1, Ordering::Relaxed);
                        self.pool.put(buf);
                        self.reply_io_error(cookie, &e);
                    }
                }
            }
            InFlight::Write { cookie, pending, fua, len, start, .. } => {
                self.bytes_in_flight -= len;
                self.writes_in_flight -= 1;
                let Op::Write { buf, segs } = c.op else { unreachable!("write slot on another op") };
                self.pool.put(buf);
                self.seg_lists.put(segs);
                match c.result {
                    Ok(_) => {
                        self.volume.commit_write(pending);
                        evs_snapshot::crash_point!("nbd-write-before-reply");
                        if fua {
                            // The flush waits for them, and only this thread completes them.
                            self.finish_early();
                        }
                        match self.flush_if(fua) {
                            Ok(()) => {
                                let stats = &self.io.stats;
                                stats.write_ops.fetch_add(1, Ordering::Relaxed);
                                stats.write_bytes.fetch_add(len as u64, Ordering::Relaxed);
                                stats.write_latency.observe(start.elapsed());
                                self.reply_ok(cookie)
                            }
                            Err(e) => {
                                self.io.stats.errors.fetch_add(1, Ordering::Relaxed);
                                self.reply_store_error(cookie, &e)
                            }
                        }
                    }
                    Err(e) => {
                        self.io.stats.errors.fetch_add(1, Ordering::Relaxed);
                        self.reply_io_error(cookie, &e)
                    }
                }
            }
        }
    }

    fn block_status(&mut self, req: Request) {
        let (off, len) = (req.offset, req.len as u64);
        let req_one = req.flags & proto::NBD_CMD_FLAG_REQ_ONE != 0;
        let mut chunks: Vec<(u32, Vec<proto::Extent>)> = Vec::new();
        for (id, ctx) in self.meta.clone() {
            let mut descs = Vec::new();
            match ctx {
                MetaContext::BaseAllocation => {
                    let extents = match self.volume.extents(off, len) {
                        Ok(e) => e,
                        Err(e) => return self.reply_store_error(req.cookie, &e),
                    };
                    for e in extents {
                        let flags = if e.hole { proto::NBD_STATE_HOLE } else { 0 }
                            | if e.zero { proto::NBD_STATE_ZERO } else { 0 };
                        push_desc(&mut descs, e.len, flags);
                    }
                }
                MetaContext::Changed(base) => {
                    let changed = match self.changed_extents(id, &base) {
                        Ok(c) => c,
                        Err(msg) => return self.reply_error(req.cookie, proto::NBD_EIO, &msg),
                    };
                    changed_descs(changed, off, len, &mut descs);
                }
            }
            if req_one {
                descs.truncate(1);
            }
            chunks.push((id, descs));
        }
        let n = chunks.len();
        for (i, (id, descs)) in chunks.into_iter().enumerate() {
            proto::push_block_status_chunk(&mut self.small, i + 1 == n, req.cookie, id, &descs);
        }
    }

    /// The changed extents of this (snapshot) export against its ancestor `base`.
    fn changed_extents(&mut self, id: u32, base: &str) -> Result<&[ChangedExtent], String> {
        if !self.changed.contains_key(&id) {
            let r = self
                .store
                .find_snapshot(self.volume_id, base)
                .and_then(|b| self.store.changed_extents(self.volume_id, Some(b.id), self.snapshot).map(|(e, _)| e));
            self.changed.insert(id, r);
        }
        match &self.changed[&id] {
            Ok(e) => Ok(e),
            Err(e) => Err(e.to_string()),
        }
    }

    fn reply_ok(&mut self, cookie: u64) {
        if self.structured {
            proto::push_none_done(&mut self.small, cookie);
        } else {
            proto::push_simple_reply(&mut self.small, 0, cookie);
        }
    }

    fn reply_error(&mut self, cookie: u64, errno: u32, msg: &str) {
        self.errors += 1;
        if self.structured {
            proto::push_error_chunk(&mut self.small, true, cookie, errno, msg);
        } else {
            proto::push_simple_reply(&mut self.small, errno, cookie);
        }
    }

    fn reply_store_error(&mut self, cookie: u64, e: &StoreError) {
        tracing::debug!(error = %e, "NBD request failed");
        self.reply_error(cookie, proto::nbd_errno(e.errno()), &e.to_string());
    }

    fn reply_io_error(&mut self, cookie: u64, e: &io::Error) {
        tracing::debug!(error = %e, "NBD request failed");
        let errno = match e.raw_os_error() {
            Some(libc::EDQUOT) => libc::ENOSPC,
            Some(n) => n,
            None => libc::EIO,
        };
        self.reply_error(cookie, proto::nbd_errno(errno), &e.to_string());
    }
}

/// Appends a block-status descriptor of `len` bytes, merging with the previous one of the same
/// flags and splitting at the 32-bit length limit (block-aligned).
fn push_desc(descs: &mut Vec<proto::Extent>, mut len: u64, flags: u32) {
    const MAX: u64 = u32::MAX as u64 / 4096 * 4096;
    while len > 0 {
        if let Some(last) = descs.last_mut() {
            if last.flags == flags && (last.length as u64) < MAX {
                let n = len.min(MAX - last.length as u64);
                last.length += n as u32;
                len -= n;
                continue;
            }
        }
        let n = len.min(MAX);
        descs.push(proto::Extent { length: n as u32, flags });
        len -= n;
    }
}

/// Descriptors of `off..off+len` for an `x-evs:changed:*` context, from the sorted changed
/// extents.
fn changed_descs(changed: &[ChangedExtent], off: u64, len: u64, descs: &mut Vec<proto::Extent>) {
    let end = off + len;
    let mut pos = off;
    let first = changed.partition_point(|e| e.offset + e.len <= off);
    for e in &changed[first..] {
        if e.offset >= end {
            break;
        }
        if e.offset > pos {
            push_desc(descs, e.offset - pos, 0);
            pos = e.offset;
        }
        let stop = (e.offset + e.len).min(end);
        let flags = proto::EVS_STATE_CHANGED | if e.zero { proto::EVS_STATE_DISCARDED } else { 0 };
        push_desc(descs, stop - pos, flags);
        pos = stop;
    }
    if pos < end {
        push_desc(descs, end - pos, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_descriptors_cover_the_request_exactly() {
        let ch = [
            ChangedExtent { offset: 4096, len: 8192, zero: false },
            ChangedExtent { offset: 16384, len: 4096, zero: true },
        ];
        let mut d = Vec::new();
        changed_descs(&ch, 0, 32768, &mut d);
        let got: Vec<(u32, u32)> = d.iter().map(|e| (e.length, e.flags)).collect();
        assert_eq!(got, vec![(4096, 0), (8192, 1), (4096, 0), (4096, 3), (12288, 0)]);
        let mut d = Vec::new();
        changed_descs(&ch, 8192, 4096, &mut d);
        assert_eq!(d.iter().map(|e| (e.length, e.flags)).collect::<Vec<_>>(), vec![(4096, 1)]);
        let mut d = Vec::new();
        changed_descs(&[], 0, 1 << 20, &mut d);
        assert_eq!(d.iter().map(|e| (e.length, e.flags)).collect::<Vec<_>>(), vec![(1 << 20, 0)]);
    }

    #[test]
    fn descriptors_split_at_the_32_bit_limit() {
        let mut d = Vec::new();
        push_desc(&mut d, 10 << 30, 1);
        assert!(d.iter().all(|e| (e.length as u64).is_multiple_of(4096) && e.flags == 1));
        assert_eq!(d.iter().map(|e| e.length as u64).sum::<u64>(), 10 << 30);
    }
}
