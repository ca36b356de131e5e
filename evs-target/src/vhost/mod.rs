//! The vhost-user-blk front end: one unix socket per vhost-user attach token, served with the
//! rust-vmm crates (vhost, vhost-user-backend, virtio-queue, vm-memory).
//!
//! * **Sockets.** `volume attach --protocol vhost-user` binds `<vhost_user_dir>/<id>.sock`
//!   (mode 0600, in a directory of mode 0700 the daemon owns), where `<id>` is the first half of
//!   the attach token. A listener thread accepts one frontend at a time; detach shuts the
//!   listener down, removes the socket (a reconnect finds nothing) and ends the connection.
//! * **Connections.** Each accepted frontend gets a fresh `VhostUserDaemon` (the handler keeps
//!   owner and feature state that a second frontend must not inherit) over a backend holding
//!   the volume's [`Export`]: guest memory is mapped from the frontend's memfds by vm-memory,
//!   and vhost-user-backend runs one vring thread per queue, on which the [`queue`] worker
//!   serves that queue with its own I/O engine. When the frontend goes (guest shut down, QEMU
//!   restarted, a reconnect), the listener accepts the next one; the daemon restarting
//!   re-binds every persisted socket at start, so QEMU's `reconnect=` resumes I/O.
//! * **Capacity changes.** The config space is computed at every read from the volume's live
//!   size, and after `volume extend` every connected frontend that gave us its backend channel
//!   gets `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` (it then reads the config space and raises the
//!   guest's config interrupt). vhost 0.18 cannot send that request, so the listener thread
//!   accepts the frontend itself and relays it to the crate's handler ([`relay`]), keeping a
//!   duplicate of the channel when the frontend sends it. See docs/DESIGN.md.

pub mod blk;
mod guest_read;
mod queue;
pub mod relay;

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use evs_snapshot::EngineKind;
use parking_lot::Mutex;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

use crate::exports::{Closer, Export, ExportRegistry};
use queue::{GuestMem, QueueWorker, Vring};
use relay::{BackendChannel, Relay};

/// Longest socket path (sun_path holds 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Errors of the vhost-user front end.
#[derive(Debug, thiserror::Error)]
pub enum VhostError {
    #[error("vhost-user socket path {path} is {len} bytes long; unix sockets allow {max}: use a shorter --vhost-user-dir", path = .0.display(), len = .0.as_os_str().len(), max = MAX_SOCKET_PATH)]
    PathTooLong(PathBuf),
    #[error("cannot listen on the vhost-user socket {}: {source}", path.display())]
    Bind { path: PathBuf, source: io::Error },
    #[error("cannot start the vhost-user listener thread: {0}")]
    Thread(#[source] io::Error),
}

/// The vhost-user-blk server: its socket directory and one listener per attach token.
pub struct VhostUserServer {
    dir: PathBuf,
    engine: EngineKind,
    num_queues: usize,
    exports: Weak<ExportRegistry>,
    listeners: Mutex<HashMap<String, Arc<ListenerState>>>,
    next_conn: AtomicU64,
}

impl std::fmt::Debug for VhostUserServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserServer").field("dir", &self.dir).field("num_queues", &self.num_queues).finish()
    }
}

/// One token's socket.
struct ListenerState {
    path: PathBuf,
    /// A duplicate of the listening socket, to shut it down from another thread (that wakes
    /// the blocked accept with EINVAL).
    wake: OwnedFd,
    closed: AtomicBool,
    /// The live connection, if any.
    conn: Mutex<Option<Arc<LiveConn>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// A connected frontend.
struct LiveConn {
    /// Ends the handler's side.
    daemon: Option<vhost_user_backend::ShutdownHandle>,
    /// A clone of the frontend's socket, to end its side too.
    frontend: UnixStream,
    /// The backend-to-frontend channel, once the frontend sent it.
    channel: BackendChannel,
    /// Its queues, quiesced before the sockets are shut.
    backend: Arc<BlkBackend>,
    ending: AtomicBool,
}

impl LiveConn {
    /// Ends the connection without waiting (callers may hold the export registry's lock): a
    /// thread quiesces the queues — what they popped completes, nothing more is popped — and
    /// only then shuts the sockets, so the frontend (QEMU, reconnecting to the next daemon)
    /// resubmits exactly the requests that were never taken.
    fn end(self: &Arc<Self>) {
        if self.ending.swap(true, Ordering::AcqRel) {
            return;
        }
        let c = self.clone();
        if let Err(e) = std::thread::Builder::new().name("vhost-end".into()).spawn(move || c.finish()) {
            tracing::warn!(error = %e, "cannot start a thread to end the vhost-user connection; ending it here");
            self.finish();
        }
    }

    fn finish(&self) {
        self.backend.quiesce();
        if let Some(d) = &self.daemon {
            d.shutdown();
        }
        let _ = self.frontend.shutdown(std::net::Shutdown::Both);
    }
}

impl ListenerState {
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let _ = rustix::net::shutdown(self.wake.as_fd(), rustix::net::Shutdown::Both);
        if let Some(c) = self.conn.lock().as_ref() {
            c.end();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl VhostUserServer {
    /// A server with sockets in `dir` (created with mode 0700 if missing), serving each
    /// frontend with up to `num_queues` queues.
    pub fn new(
        dir: &Path,
        engine: EngineKind,
        num_queues: usize,
        exports: &Arc<ExportRegistry>,
    ) -> io::Result<Arc<VhostUserServer>> {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        Ok(Arc::new(VhostUserServer {
            dir: dir.to_path_buf(),
            engine,
            num_queues: num_queues.clamp(1, 64),
            exports: Arc::downgrade(exports),
            listeners: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
        }))
    }

    /// The socket directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where `token` is served: `<dir>/<first 32 hex digits of the token>.sock` (128 bits:
    /// unguessable, and short enough for sun_path under most directories).
    pub fn socket_path(&self, token: &str) -> PathBuf {
        socket_path(&self.dir, token)
    }

    /// Starts serving `export` on `token`'s socket (a no-op if it is served already).
    pub fn listen(self: &Arc<Self>, token: &str, export: Export) -> Result<PathBuf, VhostError> {
        let path = self.socket_path(token);
        if path.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(VhostError::PathTooLong(path));
        }
        let mut listeners = self.listeners.lock();
        if listeners.contains_key(token) {
            return Ok(path);
        }
        let listener = bind(&path).map_err(|source| VhostError::Bind { path: path.clone(), source })?;
        let wake = listener.try_clone().map_err(|source| VhostError::Bind { path: path.clone(), source })?.into();
        let state = Arc::new(ListenerState {
            path: path.clone(),
            wake,
            closed: AtomicBool::new(false),
            conn: Mutex::new(None),
            thread: Mutex::new(None),
        });
        let server = self.clone();
        let (tok, st) = (token.to_string(), state.clone());
        let thread = std::thread::Builder::new()
            .name(format!("vhost-{}", &token[..8.min(token.len())]))
            .spawn(move || server.accept_loop(&tok, &st, &listener, export))
            .map_err(|e| {
                let _ = std::fs::remove_file(&path);
                VhostError::Thread(e)
            })?;
        *state.thread.lock() = Some(thread);
        listeners.insert(token.to_string(), state);
        tracing::info!(socket = %path.display(), "vhost-user socket listening");
        Ok(path)
    }

    /// Stops serving `token`: no new connection, the live one ends, the socket is removed.
    /// Does not wait (it may be called under the export registry's lock).
    pub fn stop(&self, token: &str) {
        if let Some(state) = self.listeners.lock().remove(token) {
            state.close();
            tracing::info!(socket = %state.path.display(), "vhost-user socket closed");
        }
    }

    /// Tells the frontend connected on `token`, if any, that the device's config space
    /// changed (after `volume extend`). Returns whether a frontend was told: one that gave no
    /// backend channel sees the new capacity at its next config read.
    pub fn config_changed(&self, token: &str) -> bool {
        let Some(state) = self.listeners.lock().get(token).cloned() else { return false };
        let conn = state.conn.lock();
        let Some(c) = conn.as_ref() else { return false };
        match c.channel.config_changed() {
            Ok(told) => told,
            Err(e) => {
                // The frontend is going away (EPIPE): it reads the config afresh when it comes back.
                tracing::debug!(socket = %state.path.display(), error = %e, "cannot send the config change to the vhost-user frontend");
                false
            }
        }
    }

    /// Ends every listener and connection and waits for their threads (daemon shutdown: the
    /// requests the guests had in flight are completed first).
    pub fn shutdown(&self) {
        let all: Vec<_> = self.listeners.lock().drain().map(|(_, s)| s).collect();
        for s in &all {
            s.close();
        }
        for s in all {
            if let Some(t) = s.thread.lock().take() {
                let _ = t.join();
            }
        }
    }

    /// Accepts frontends one after another until the listener is closed.
    fn accept_loop(&self, token: &str, state: &ListenerState, listener: &UnixListener, export: Export) {
        while !state.closed.load(Ordering::Acquire) {
            let frontend = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) => {
                    if !state.closed.load(Ordering::Acquire) {
                        tracing::warn!(error = %e, "vhost-user accept failed");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    continue;
                }
            };
            let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = self.serve_conn(token, state, id, frontend, &export) {
                tracing::warn!(socket = %state.path.display(), error = %e, "cannot serve the vhost-user frontend");
            }
        }
    }

    /// Serves one frontend until it goes or is shut down: a fresh daemon (see the module doc)
    /// behind the relay.
    fn serve_conn(
        &self,
        token: &str,
        state: &ListenerState,
        id: u64,
        frontend: UnixStream,
        export: &Export,
    ) -> io::Result<()> {
        let mem: GuestMem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = Arc::new(BlkBackend::new(export, self.engine, self.num_queues, mem.clone()));
        let mut daemon = VhostUserDaemon::new("vhost-user-blk".to_string(), backend.clone(), mem)
            .map_err(|e| io::Error::other(format!("cannot create a vhost-user daemon: {e}")))?;
        // The handler accepts on a private socket in our 0700 directory, unlinked as soon as
        // the relay's end has connected.
        let private = self.dir.join(format!(".relay-{id}.sock"));
        let _ = std::fs::remove_file(&private);
        let private_listener = UnixListener::bind(&private)?;
        let relay_end = UnixStream::connect(&private);
        let _ = std::fs::remove_file(&private);
        let relay_end = relay_end?;
        daemon
            .start(&mut Listener::from(private_listener))
            .map_err(|e| io::Error::other(format!("vhost-user handler did not start: {e}")))?;
        let channel = BackendChannel::default();
        let conn = Arc::new(LiveConn {
            daemon: daemon.shutdown_handle(),
            frontend: frontend.try_clone()?,
            channel: channel.clone(),
            backend,
            ending: AtomicBool::new(false),
        });
        let relay = match Relay::start(frontend, relay_end, channel) {
            Ok(r) => r,
            Err(e) => {
                conn.end();
                daemon.request_shutdown();
                let _ = daemon.wait();
                return Err(e);
            }
        };
        let closer: Closer = {
            let c = conn.clone();
            Arc::new(move |_| c.end())
        };
        *state.conn.lock() = Some(conn);
        let registered = self.exports.upgrade().is_some_and(|r| r.register_conn(token, id, closer));
        if !registered || state.closed.load(Ordering::Acquire) {
            if let Some(c) = state.conn.lock().as_ref() {
                c.end();
            }
            daemon.request_shutdown();
        }
        tracing::info!(socket = %state.path.display(), "vhost-user frontend connected");
        match daemon.wait() {
            Ok(()) => tracing::info!(socket = %state.path.display(), "vhost-user frontend disconnected"),
            Err(e) => tracing::info!(socket = %state.path.display(), error = %e, "vhost-user connection ended"),
        }
        if let Some(c) = state.conn.lock().take() {
            // The handler is done: the frontend's side ends with it.
            let _ = c.frontend.shutdown(std::net::Shutdown::Both);
        }
        relay.join();
        if let Some(r) = self.exports.upgrade() {
            r.unregister_conn(token, id);
        }
        // Dropping the daemon stops its vring threads once their queues are idle.
        drop(daemon);
        Ok(())
    }
}

/// See [`VhostUserServer::socket_path`].
pub fn socket_path(dir: &Path, token: &str) -> PathBuf {
    dir.join(format!("{}.sock", &token[..32.min(token.len())]))
}

/// Binds a socket at `path` with mode 0600, replacing a stale socket file (a daemon that died
/// left it; nobody answers on it). A file that is not a socket is an error.
fn bind(path: &Path) -> io::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(io::ErrorKind::AddrInUse, "another process is serving that socket"));
            }
            std::fs::remove_file(path)?;
        }
        Ok(_) => return Err(io::Error::new(io::ErrorKind::AlreadyExists, "the path exists and is not a socket")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// The virtio-blk device of one connection.
struct BlkBackend {
    export: Export,
    num_queues: usize,
    /// One worker per queue; the mutex is taken by the queue's vring thread, by
    /// `stop_vring` and by `quiesce` (both wait for the queue to be idle).
    workers: Vec<Mutex<QueueWorker>>,
    /// The connection is ending: the workers pop nothing more.
    stopping: Arc<AtomicBool>,
}

impl BlkBackend {
    fn new(export: &Export, engine: EngineKind, num_queues: usize, mem: GuestMem) -> BlkBackend {
        let stopping = Arc::new(AtomicBool::new(false));
        let workers = (0..num_queues)
            .map(|_| Mutex::new(QueueWorker::new(export, engine, mem.clone(), stopping.clone())))
            .collect();
        BlkBackend { export: export.clone(), num_queues, workers, stopping }
    }

    /// Stops every queue from popping requests and waits until what they popped completed.
    fn quiesce(&self) {
        self.stopping.store(true, Ordering::Release);
        for w in &self.workers {
            drop(w.lock());
        }
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn max_queue_size(&self) -> usize {
        blk::MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        blk::features(self.export.read_only) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            // The channel for config-change notices (see `relay`).
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    fn acked_features(&self, features: u64) {
        // Without FLUSH the driver takes a completed write as stable (no volatile cache).
        let write_through = blk::write_through(features, self.export.read_only);
        if write_through {
            tracing::info!("vhost-user driver without VIRTIO_BLK_F_FLUSH: writes complete once stable");
        }
        for w in &self.workers {
            w.lock().set_write_through(write_through);
        }
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The vrings track it (vhost-user-backend sets it on each queue).
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // The live size: after `volume extend` the next read sees the new capacity.
        let c = blk::config_space(self.export.volume.size(), self.num_queues as u16, self.export.read_only);
        blk::config_slice(&c, offset, size)
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        // Nothing is writable (no CONFIG_WCE): refuse quietly, as the spec lets a device.
        Ok(())
    }

    fn update_memory(&self, _mem: GuestMem) -> io::Result<()> {
        // The workers hold the same GuestMemoryAtomic, which the handler has just updated.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Without one, the vring threads never end and dropping the daemon (which joins them)
        // hangs: the handler notifies it when the connection's daemon is dropped.
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(e) => {
                tracing::error!(error = %e, "cannot create a vring thread's exit event");
                None
            }
        }
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // The queue's worker holds its lock while it runs; it stops starting requests once the
        // queue is not ready and returns when its in-flight ones are done.
        if let Some(w) = self.workers.get(queue_index as usize) {
            drop(w.lock());
        }
        Ok(())
    }

    fn handle_event(&self, device_event: u16, evset: EventSet, vrings: &[Vring], thread_id: usize) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected vring event {evset:?}")));
        }
        // One queue per thread: the thread's only vring is queue `thread_id`.
        let (Some(vring), Some(worker)) = (vrings.first(), self.workers.get(thread_id)) else {
            return Err(io::Error::other(format!("event {device_event} for an unknown queue")));
        };
        worker.lock().run(vring)
    }
}
