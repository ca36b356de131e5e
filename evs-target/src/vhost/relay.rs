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
/// Frontend request: the protocol features it acknowledges (u64 payload).
pub const SET_PROTOCOL_FEATURES: u32 = 16;
/// Frontend request: here is the backend-to-frontend channel (one descriptor).
pub const SET_BACKEND_REQ_FD: u32 = 21;
/// `VHOST_USER_PROTOCOL_F_CONFIG`: the config-change message needs it negotiated.
pub const PROTOCOL_F_CONFIG: u64 = 1 << 9;
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

/// The backend-to-frontend channel of the live connection, once the frontend has sent it,
/// and whether it negotiated the CONFIG protocol feature.
#[derive(Clone, Default)]
pub struct BackendChannel(Arc<Mutex<ChannelState>>);

#[derive(Default)]
struct ChannelState {
    stream: Option<UnixStream>,
    config: bool,
}

impl BackendChannel {
    fn set(&self, s: UnixStream) {
        self.0.lock().stream = Some(s);
    }

    fn set_protocol_features(&self, features: u64) {
        self.0.lock().config = features & PROTOCOL_F_CONFIG != 0;
    }

    /// Whether the frontend has given us the channel.
    pub fn is_set(&self) -> bool {
        self.0.lock().stream.is_some()
    }

    /// Tells the frontend the config space changed. Ok(false) when it gave no channel (it did
    /// not negotiate BACKEND_REQ) or did not negotiate CONFIG, which the message requires: the
    /// guest then sees the change at its next config read.
    pub fn config_changed(&self) -> io::Result<bool> {
        let g = self.0.lock();
        let (Some(s), true) = (g.stream.as_ref(), g.config) else { return Ok(false) };
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
    while let Some(Received { header: h, raw: hdr, fds }) = recv_message(frontend, &mut payload)? {
        let body = &payload[..h.size as usize];
        if h.request == SET_PROTOCOL_FEATURES && body.len() == 8 {
            channel.set_protocol_features(u64::from_le_bytes(body.try_into().expect("8 bytes")));
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
    Ok(())
}

/// A received message: its header, parsed and as bytes, and its descriptors (the payload is
/// in the caller's buffer).
struct Received {
    header: Header,
    raw: [u8; HEADER_LEN],
    fds: Vec<OwnedFd>,
}

/// Reads one whole message (header, then its payload) with the descriptors sent with it.
/// Ok(None) at end of file between messages.
fn recv_message(s: &UnixStream, payload: &mut [u8]) -> io::Result<Option<Received>> {
    let mut fds = Vec::new();
    let mut hdr = [0u8; HEADER_LEN];
    if !recv_exact(s, &mut hdr, &mut fds)? {
        return Ok(None);
    }
    let h = parse_header(&hdr).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let body = &mut payload[..h.size as usize];
    if !recv_exact(s, body, &mut fds)? && !body.is_empty() {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "vhost-user message cut short"));
    }
    Ok(Some(Received { header: h, raw: hdr, fds }))
}

/// Handler to frontend: the replies, one whole message at a time, so descriptors stay with
/// the reply they came with.
fn backend_to_frontend(backend: &UnixStream, frontend: &UnixStream) -> io::Result<()> {
    let mut payload = vec![0u8; MAX_PAYLOAD];
    while let Some(m) = recv_message(backend, &mut payload)? {
        send_all(frontend, &[&m.raw, &payload[..m.header.size as usize]], &m.fds)?;
    }
    Ok(())
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
        let (f4, b4) = (frontend.try_clone()?, backend.try_clone()?);
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
                // Wake the first direction (blocked on the frontend) before waiting for it.
                let _ = f4.shutdown(Shutdown::Both);
                let _ = b4.shutdown(Shutdown::Both);
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

    /// Reads `s` to its end and asserts nothing more came.
    fn assert_ends(mut s: &UnixStream, what: &str) {
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "{what}: {} more bytes before the end", rest.len());
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
        assert_ends(&r.handler, "the handler sees the end");
        r.relay.join();
    }

    #[test]
    fn the_backend_channel_is_kept_and_notified() {
        let r = rig();
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // The frontend acknowledges CONFIG | BACKEND_REQ (the message needs CONFIG).
        let features = PROTOCOL_F_CONFIG | 1 << 5;
        send_all(&r.frontend, &[&header(SET_PROTOCOL_FEATURES, 1, 8), &features.to_le_bytes()], &[]).unwrap();
        let mut got = [0u8; HEADER_LEN + 8];
        assert!(recv_exact(&r.handler, &mut got, &mut Vec::new()).unwrap());
        assert_eq!(&got[HEADER_LEN..], &features.to_le_bytes());
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
        assert_ends(&r.frontend, "the frontend sees the end");
        r.relay.join();
    }

    #[test]
    fn no_notice_without_the_config_feature() {
        let r = rig();
        // BACKEND_REQ only: the channel is kept, but the message would break the spec.
        send_all(&r.frontend, &[&header(SET_PROTOCOL_FEATURES, 1, 8), &(1u64 << 5).to_le_bytes()], &[]).unwrap();
        let (ours, theirs) = UnixStream::pair().unwrap();
        send_all(&r.frontend, &[&header(SET_BACKEND_REQ_FD, 1, 0)], &[OwnedFd::from(theirs)]).unwrap();
        let mut got = [0u8; 2 * HEADER_LEN + 8];
        assert!(recv_exact(&r.handler, &mut got, &mut Vec::new()).unwrap());
        assert!(r.channel.is_set());
        assert!(!r.channel.config_changed().unwrap(), "no CONFIG, no notice");
        ours.set_nonblocking(true).unwrap();
        assert!((&ours).read(&mut [0u8; 1]).is_err(), "nothing was sent on the channel");
        drop(r.frontend);
        r.relay.join();
    }

    #[test]
    fn split_messages_and_descriptors_with_the_body_or_a_reply_keep_their_framing() {
        let mut r = rig();
        // A header split over two writes, then its payload with a descriptor attached to the
        // payload's first byte rather than the header's.
        let (mut near, far) = UnixStream::pair().unwrap();
        near.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let hdr = header(5, 1, 8);
        r.frontend.write_all(&hdr[..5]).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        r.frontend.write_all(&hdr[5..]).unwrap();
        send_all(&r.frontend, &[&3u64.to_le_bytes()], &[OwnedFd::from(far)]).unwrap();
        let mut fds = Vec::new();
        let mut got = [0u8; HEADER_LEN + 8];
        assert!(recv_exact(&r.handler, &mut got, &mut fds).unwrap());
        assert_eq!(&got[..HEADER_LEN], &hdr);
        assert_eq!(fds.len(), 1, "the descriptor sent with the payload came through");
        rustix::io::write(&fds[0], b"x").unwrap();
        let mut one = [0u8; 1];
        near.read_exact(&mut one).unwrap();
        // Two replies written back to back, the second carrying a descriptor (as
        // GET_INFLIGHT_FD's): each reaches the frontend whole, the descriptor with the second.
        let (mut near2, far2) = UnixStream::pair().unwrap();
        near2.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let first = [header(1, 1 | 4, 8).as_slice(), &1u64.to_le_bytes()].concat();
        let second = [header(31, 1 | 4, 8).as_slice(), &2u64.to_le_bytes()].concat();
        r.handler.write_all(&first).unwrap();
        send_all(&r.handler, &[&second], &[OwnedFd::from(far2)]).unwrap();
        let mut fds = Vec::new();
        let mut a = vec![0u8; first.len()];
        assert!(recv_exact(&r.frontend, &mut a, &mut fds).unwrap());
        assert_eq!(a, first);
        assert!(fds.is_empty(), "the first reply carries no descriptor");
        let mut b = vec![0u8; second.len()];
        assert!(recv_exact(&r.frontend, &mut b, &mut fds).unwrap());
        assert_eq!(b, second);
        assert_eq!(fds.len(), 1, "the second reply's descriptor came with it");
        rustix::io::write(&fds[0], b"y").unwrap();
        near2.read_exact(&mut one).unwrap();
        assert_eq!(&one, b"y");
        drop(r.frontend);
        r.relay.join();
    }

    #[test]
    fn too_many_descriptors_or_a_message_cut_short_end_the_connection() {
        // 33 descriptors (the limit is 32).
        let r = rig();
        let fds: Vec<OwnedFd> = (0..33).map(|_| OwnedFd::from(std::fs::File::open("/dev/null").unwrap())).collect();
        let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(40))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        assert!(control.push(SendAncillaryMessage::ScmRights(&borrowed)));
        let hdr = header(5, 1, 0);
        rustix::net::sendmsg(&r.frontend, &[IoSlice::new(&hdr)], &mut control, SendFlags::NOSIGNAL).unwrap();
        assert_ends(&r.handler, "nothing of the message reached the handler");
        assert_ends(&r.frontend, "the frontend's connection was closed");
        r.relay.join();
        // A header whose payload never comes.
        let mut r = rig();
        r.frontend.write_all(&header(5, 1, 64)).unwrap();
        r.frontend.write_all(&[0u8; 10]).unwrap();
        r.frontend.shutdown(Shutdown::Write).unwrap();
        assert_ends(&r.handler, "a message cut short is not passed on");
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
        assert_ends(&r.handler, "nothing of the bad message reached the handler");
        assert_ends(&r.frontend, "the frontend sees the end");
        r.relay.join();
    }
}
