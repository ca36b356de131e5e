//! The frontend's vhost-user socket, relayed to vhost-user-backend's handler so that we hold
//! the backend-to-frontend channel too.
//!
//! Why: after `volume extend` a guest should see its new capacity at once, which takes one
//! backend-to-frontend message, `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`. vhost 0.18 receives that
//! channel (`SET_BACKEND_REQ_FD`) and hands the handler a `Backend` that cannot send this
//! request, with its socket private. So the listener thread accepts the frontend itself and
//! relays its messages to the handler over a second, private connection, parsing only the
//! header of each frontend message: when one is `SET_BACKEND_REQ_FD` the relay keeps a
//! duplicate of the channel's descriptor before passing the message on. Nothing else is
//! interpreted or changed; after the set-up messages the data path (shared memory, eventfds)
//! does not touch this socket at all.
//!
//! ```text
//! frontend (QEMU) ──socket──▶ relay ──private socket──▶ vhost-user-backend handler
//!          ▲                    │ SET_BACKEND_REQ_FD: keeps a dup of the channel
//!          └──backend channel◀──┘ BackendChannel::config_changed
//! ```
//!
//! Message layout (vhost-user spec, "Message format"; all fields little-endian):
//!
//! | offset | size | field                                                    |
//! |--------|------|----------------------------------------------------------|
//! | 0      | 4    | request                                                  |
//! | 4      | 4    | flags: bits 0–1 version (1), bit 2 reply, bit 3 need-reply |
//! | 8      | 4    | size of the payload that follows (at most 4096)          |
//! | 12     | size | payload                                                  |
//!
//! Descriptors travel as `SCM_RIGHTS` with the message (at most 32).

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::net::Shutdown;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use parking_lot::Mutex;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer, SendAncillaryMessage,
    SendFlags,
};

/// Bytes of a message header.
pub const HEADER_LEN: usize = 12;
/// Largest payload a message may carry (the spec's and the crate's limit).
pub const MAX_PAYLOAD: usize = 4096;
/// Most descriptors one message may carry.
pub const MAX_FDS: usize = 32;
/// The version in the low two flag bits.
pub const VERSION: u32 = 0x1;
const VERSION_MASK: u32 = 0x3;
/// Frontend request: here is the backend-to-frontend channel (one descriptor).
pub const SET_BACKEND_REQ_FD: u32 = 21;
/// Backend request: the device's config space changed; read it again.
pub const BACKEND_CONFIG_CHANGE_MSG: u32 = 2;

/// A parsed message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub request: u32,
    pub flags: u32,
    pub size: u32,
}

/// Why a frontend message was not relayed (the connection is closed).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("vhost-user message with version {0} (expected 1)")]
    Version(u32),
    #[error("vhost-user message payload of {0} bytes (at most {MAX_PAYLOAD})")]
    TooLarge(u32),
}

/// Parses and checks a header (pure).
pub fn parse_header(b: &[u8; HEADER_LEN]) -> Result<Header, HeaderError> {
    let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let h = Header { request: word(0), flags: word(4), size: word(8) };
    if h.flags & VERSION_MASK != VERSION {
        return Err(HeaderError::Version(h.flags & VERSION_MASK));
    }
    if h.size as usize > MAX_PAYLOAD {
        return Err(HeaderError::TooLarge(h.size));
    }
    Ok(h)
}

/// The config-change message: no payload, no reply asked for (the frontend answers it by
/// reading the config space, GET_CONFIG, on the main socket).
pub fn config_change_message() -> [u8; HEADER_LEN] {
    let mut m = [0u8; HEADER_LEN];
    m[0..4].copy_from_slice(&BACKEND_CONFIG_CHANGE_MSG.to_le_bytes());
    m[4..8].copy_from_slice(&VERSION.to_le_bytes());
    m
}

/// The backend-to-frontend channel of the live connection, once the frontend has sent it.
#[derive(Clone, Default)]
pub struct BackendChannel(Arc<Mutex<Option<UnixStream>>>);

impl BackendChannel {
    fn set(&self, s: UnixStream) {
        *self.0.lock() = Some(s);
    }

    /// Whether the frontend has given us the channel.
    pub fn is_set(&self) -> bool {
        self.0.lock().is_some()
    }

    /// Tells the frontend the config space changed. Ok(false) when it gave no channel (it did
    /// not negotiate BACKEND_REQ): the guest then sees the change at its next config read.
    pub fn config_changed(&self) -> io::Result<bool> {
        let g = self.0.lock();
        let Some(s) = g.as_ref() else { return Ok(false) };
        let m = config_change_message();
        // 12 bytes into an idle socket: never short in practice; never block the API on it.
        let n = rustix::net::send(s, &m, SendFlags::NOSIGNAL | SendFlags::DONTWAIT)?;
        if n != m.len() {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "short write of the config-change message"));
        }
        Ok(true)
    }
}

/// Space for the most descriptors a message may carry.
const CMSG_SPACE: usize = rustix::cmsg_space!(ScmRights(MAX_FDS));

/// Receives into `buf` (once), appending any descriptors to `fds`. Ok(0) at end of file.
fn recv_some(s: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let mut space = [MaybeUninit::<u8>::uninit(); CMSG_SPACE];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let r = loop {
        match rustix::net::recvmsg(s, &mut [IoSliceMut::new(buf)], &mut control, RecvFlags::CMSG_CLOEXEC) {
            Err(rustix::io::Errno::INTR) => continue,
            other => break other?,
        }
    };
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = m {
            fds.extend(received);
        }
    }
    if r.flags.contains(ReturnFlags::CTRUNC) || fds.len() > MAX_FDS {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "too many descriptors in a vhost-user message"));
    }
    Ok(r.bytes)
}

/// Fills `buf` completely. Ok(false) at end of file before the first byte.
fn recv_exact(s: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<bool> {
    let mut have = 0;
    while have < buf.len() {
        let n = recv_some(s, &mut buf[have..], fds)?;
        if n == 0 {
            if have == 0 {
                return Ok(false);
            }
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "vhost-user message cut short"));
        }
        have += n;
    }
    Ok(true)
}

/// Sends all of `parts`, with `fds` attached to the first byte.
fn send_all(s: &UnixStream, parts: &[&[u8]], fds: &[OwnedFd]) -> io::Result<()> {
    let mut data: Vec<u8> = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
    for p in parts {
        data.extend_from_slice(p);
    }
    let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    let mut space = [MaybeUninit::<u8>::uninit(); CMSG_SPACE];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !borrowed.is_empty() && !control.push(SendAncillaryMessage::ScmRights(&borrowed)) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "too many descriptors to relay"));
    }
    let mut sent = 0;
    while sent < data.len() {
        let r = if sent == 0 {
            rustix::net::sendmsg(s, &[IoSlice::new(&data)], &mut control, SendFlags::NOSIGNAL)
        } else {
            rustix::net::send(s, &data[sent..], SendFlags::NOSIGNAL)
        };
        match r {
            Ok(n) => sent += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Whether `fd` is a unix stream socket (what SET_BACKEND_REQ_FD must carry).
fn is_unix_stream(fd: &OwnedFd) -> bool {
    let stream = rustix::net::sockopt::socket_type(fd).is_ok_and(|t| t == rustix::net::SocketType::STREAM);
    stream && rustix::net::getsockname(fd).is_ok_and(|a| a.address_family() == rustix::net::AddressFamily::UNIX)
}

/// Frontend to handler: one message at a time, header parsed.
fn frontend_to_backend(frontend: &UnixStream, backend: &UnixStream, channel: &BackendChannel) -> io::Result<()> {
    let mut payload = vec![0u8; MAX_PAYLOAD];
    loop {
        let mut fds = Vec::new();
        let mut hdr = [0u8; HEADER_LEN];
        if !recv_exact(frontend, &mut hdr, &mut fds)? {
            return Ok(());
        }
        let h = parse_header(&hdr).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let body = &mut payload[..h.size as usize];
        if !recv_exact(frontend, body, &mut fds)? && !body.is_empty() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "vhost-user message cut short"));
        }
        if h.request == SET_BACKEND_REQ_FD {
            if let [fd] = fds.as_slice() {
                if is_unix_stream(fd) {
                    channel.set(UnixStream::from(fd.try_clone()?));
                }
            }
        }
        send_all(backend, &[&hdr, body], &fds)?;
    }
}

/// Handler to frontend: replies, passed on as they come (the handler only ever answers the
/// request in hand, so a read never spans two of its messages).
fn backend_to_frontend(backend: &UnixStream, frontend: &UnixStream) -> io::Result<()> {
    let mut buf = vec![0u8; HEADER_LEN + MAX_PAYLOAD];
    loop {
        let mut fds = Vec::new();
        let n = recv_some(backend, &mut buf, &mut fds)?;
        if n == 0 {
            return Ok(());
        }
        send_all(frontend, &[&buf[..n]], &fds)?;
    }
}

/// A running relay: two threads, one per direction. When either side ends (or misbehaves),
/// both sockets are shut down, so the other thread, the handler and the frontend all see
/// the end.
pub struct Relay {
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Relay {
    /// Relays between `frontend` and `backend` (the handler's end), recording the backend
    /// channel in `channel`.
    pub fn start(frontend: UnixStream, backend: UnixStream, channel: BackendChannel) -> io::Result<Relay> {
        let (f2, b2) = (frontend.try_clone()?, backend.try_clone()?);
        let (f3, b3) = (frontend.try_clone()?, backend.try_clone()?);
        let end = move |f: &UnixStream, b: &UnixStream, what: &str, r: io::Result<()>| {
            if let Err(e) = r {
                tracing::debug!(error = %e, direction = what, "vhost-user relay ended");
            }
            let _ = f.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        };
        let down = std::thread::Builder::new().name("vhost-relay-fe".into()).spawn(move || {
            let r = frontend_to_backend(&frontend, &backend, &channel);
            end(&frontend, &backend, "from frontend", r);
        })?;
        let up = std::thread::Builder::new().name("vhost-relay-be".into()).spawn(move || {
            let r = backend_to_frontend(&b2, &f2);
            end(&f3, &b3, "to frontend", r);
        });
        match up {
            Ok(up) => Ok(Relay { threads: vec![down, up] }),
            Err(e) => {
                let _ = down.join();
                Err(e)
            }
        }
    }

    /// Waits for both directions to end.
    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::time::Duration;

    fn header(request: u32, flags: u32, size: u32) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&request.to_le_bytes());
        h[4..8].copy_from_slice(&flags.to_le_bytes());
        h[8..12].copy_from_slice(&size.to_le_bytes());
        h
    }

    #[test]
    fn headers_are_checked() {
        assert_eq!(parse_header(&header(5, 1, 8)), Ok(Header { request: 5, flags: 1, size: 8 }));
        // need-reply set: still version 1.
        assert_eq!(parse_header(&header(21, 1 | 8, 0)).map(|h| h.request), Ok(21));
        assert_eq!(parse_header(&header(5, 0, 8)), Err(HeaderError::Version(0)));
        assert_eq!(parse_header(&header(5, 2, 8)), Err(HeaderError::Version(2)));
        assert_eq!(parse_header(&header(5, 1, 4097)), Err(HeaderError::TooLarge(4097)));
        assert_eq!(parse_header(&header(5, 1, 4096)).map(|h| h.size), Ok(4096));
    }

    #[test]
    fn config_change_layout() {
        let m = config_change_message();
        assert_eq!(m, header(2, 1, 0));
        assert_eq!(parse_header(&m), Ok(Header { request: BACKEND_CONFIG_CHANGE_MSG, flags: VERSION, size: 0 }));
    }

    /// A frontend, the relay and a stand-in for the handler, over socket pairs.
    struct Rig {
        frontend: UnixStream,
        handler: UnixStream,
        channel: BackendChannel,
        relay: Relay,
    }

    fn rig() -> Rig {
        let (frontend, relay_front) = UnixStream::pair().unwrap();
        let (relay_back, handler) = UnixStream::pair().unwrap();
        for s in [&frontend, &handler] {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        }
        let channel = BackendChannel::default();
        let relay = Relay::start(relay_front, relay_back, channel.clone()).unwrap();
        Rig { frontend, handler, channel, relay }
    }

    #[test]
    fn messages_pass_both_ways_with_their_descriptors() {
        let mut r = rig();
        // A message with a payload and a descriptor, as SET_VRING_CALL.
        let (mut near, far) = UnixStream::pair().unwrap();
        near.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let payload = 7u64.to_le_bytes();
        send_all(&r.frontend, &[&header(13, 1, 8), &payload], &[OwnedFd::from(far)]).unwrap();
        let mut fds = Vec::new();
        let mut got = [0u8; HEADER_LEN + 8];
        assert!(recv_exact(&r.handler, &mut got, &mut fds).unwrap());
        assert_eq!(&got[..HEADER_LEN], &header(13, 1, 8));
        assert_eq!(&got[HEADER_LEN..], &payload);
        assert_eq!(fds.len(), 1, "the descriptor came through");
        // It is the same socket: what is written on the relayed end reads on ours.
        rustix::io::write(&fds[0], b"hi").unwrap();
        let mut two = [0u8; 2];
        near.read_exact(&mut two).unwrap();
        assert_eq!(&two, b"hi");
        // A reply goes back unchanged.
        let reply = [header(13, 1 | 4, 8).as_slice(), &9u64.to_le_bytes()].concat();
        r.handler.write_all(&reply).unwrap();
        let mut back = vec![0u8; reply.len()];
        r.frontend.read_exact(&mut back).unwrap();
        assert_eq!(back, reply);
        assert!(!r.channel.is_set(), "no backend channel was offered");
        assert!(!r.channel.config_changed().unwrap(), "nothing to notify without a channel");
        // The frontend goes: the handler sees end of file and the relay ends.
        drop(r.frontend);
        let mut rest = Vec::new();
        r.handler.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        r.relay.join();
    }

    #[test]
    fn the_backend_channel_is_kept_and_notified() {
        let mut r = rig();
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        send_all(&r.frontend, &[&header(SET_BACKEND_REQ_FD, 1, 0)], &[OwnedFd::from(theirs)]).unwrap();
        // The handler still gets the message and the descriptor.
        let mut fds = Vec::new();
        let mut got = [0u8; HEADER_LEN];
        assert!(recv_exact(&r.handler, &mut got, &mut fds).unwrap());
        assert_eq!(got, header(SET_BACKEND_REQ_FD, 1, 0));
        assert_eq!(fds.len(), 1);
        drop(fds); // the handler may drop its copy: ours keeps the channel open
        assert!(r.channel.is_set());
        assert!(r.channel.config_changed().unwrap());
        let mut msg = [0u8; HEADER_LEN];
        (&ours).read_exact(&mut msg).unwrap();
        assert_eq!(parse_header(&msg), Ok(Header { request: BACKEND_CONFIG_CHANGE_MSG, flags: VERSION, size: 0 }));
        // The handler ends the connection: the frontend sees end of file.
        r.handler.shutdown(Shutdown::Both).unwrap();
        let mut rest = Vec::new();
        r.frontend.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        r.relay.join();
    }

    #[test]
    fn a_bad_header_or_a_non_socket_channel_changes_nothing() {
        let mut r = rig();
        // A "channel" that is not a socket is passed on (the handler refuses it) but not kept.
        let file = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        send_all(&r.frontend, &[&header(SET_BACKEND_REQ_FD, 1, 0)], &[file]).unwrap();
        let mut fds = Vec::new();
        let mut got = [0u8; HEADER_LEN];
        assert!(recv_exact(&r.handler, &mut got, &mut fds).unwrap());
        assert_eq!(fds.len(), 1);
        assert!(!r.channel.is_set(), "a file is not a backend channel");
        // A payload over the limit ends the connection on both sides; nothing is relayed.
        r.frontend.write_all(&header(5, 1, 5000)).unwrap();
        let mut rest = Vec::new();
        r.handler.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "nothing of the bad message reached the handler");
        let mut rest = Vec::new();
        r.frontend.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        r.relay.join();
    }
}
