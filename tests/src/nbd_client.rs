//! A minimal, blocking NBD client written from the protocol description (the NBD project's
//! `doc/proto.md`), for tests that need more control than qemu or libnbd give: several
//! connections to one export, a connection that dies at a chosen moment, malformed handshakes
//! and requests.
//!
//! Two layers:
//! * [`RawConn`]: a socket plus helpers to send arbitrary bytes and read the handshake's
//!   messages, with no state; bad-input tests drive it by hand.
//! * [`NbdClient`]: a well-behaved client (fixed newstyle, `NBD_OPT_GO` or
//!   `NBD_OPT_EXPORT_NAME`, structured replies optional) that issues one request at a time
//!   and checks every reply it reads.
//!
//! Either can upgrade to TLS with `NBD_OPT_STARTTLS` ([`RawConn::start_tls`],
//! [`NbdClient::connect_tls`]), with rustls as the client and a CA of the test's choosing.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

/// Protocol constants (values as `doc/proto.md` of the NBD project defines them).
pub mod consts {
    /// "NBDMAGIC", first 8 bytes the server sends.
    pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
    /// "IHAVEOPT": newstyle magic, also prefixes every option the client sends.
    pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
    /// Magic of every option reply.
    pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

    // Handshake flags (server) and client flags.
    pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
    pub const FLAG_NO_ZEROES: u16 = 1 << 1;
    pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
    pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

    // Options.
    pub const OPT_EXPORT_NAME: u32 = 1;
    pub const OPT_ABORT: u32 = 2;
    pub const OPT_LIST: u32 = 3;
    pub const OPT_STARTTLS: u32 = 5;
    pub const OPT_INFO: u32 = 6;
    pub const OPT_GO: u32 = 7;
    pub const OPT_STRUCTURED_REPLY: u32 = 8;
    pub const OPT_LIST_META_CONTEXT: u32 = 9;
    pub const OPT_SET_META_CONTEXT: u32 = 10;

    // Option reply types.
    pub const REP_ACK: u32 = 1;
    pub const REP_SERVER: u32 = 2;
    pub const REP_INFO: u32 = 3;
    pub const REP_META_CONTEXT: u32 = 4;
    pub const REP_FLAG_ERROR: u32 = 1 << 31;
    pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
    pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
    pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
    pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
    pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
    pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
    pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
    pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
    pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

    // NBD_REP_INFO types.
    pub const INFO_EXPORT: u16 = 0;
    pub const INFO_NAME: u16 = 1;
    pub const INFO_DESCRIPTION: u16 = 2;
    pub const INFO_BLOCK_SIZE: u16 = 3;

    // Transmission flags.
    pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
    pub const TFLAG_READ_ONLY: u16 = 1 << 1;
    pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
    pub const TFLAG_SEND_FUA: u16 = 1 << 3;
    pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
    pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
    pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const TFLAG_SEND_DF: u16 = 1 << 7;
    pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
    pub const TFLAG_SEND_RESIZE: u16 = 1 << 9;
    pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
    pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

    // Transmission phase magics.
    pub const REQUEST_MAGIC: u32 = 0x2560_9513;
    pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
    pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

    // Commands.
    pub const CMD_READ: u16 = 0;
    pub const CMD_WRITE: u16 = 1;
    pub const CMD_DISC: u16 = 2;
    pub const CMD_FLUSH: u16 = 3;
    pub const CMD_TRIM: u16 = 4;
    pub const CMD_CACHE: u16 = 5;
    pub const CMD_WRITE_ZEROES: u16 = 6;
    pub const CMD_BLOCK_STATUS: u16 = 7;

    // Command flags.
    pub const CMD_FLAG_FUA: u16 = 1 << 0;
    pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
    pub const CMD_FLAG_DF: u16 = 1 << 2;
    pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
    pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

    // Structured reply flags and chunk types.
    pub const REPLY_FLAG_DONE: u16 = 1 << 0;
    pub const REPLY_TYPE_NONE: u16 = 0;
    pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
    pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
    pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
    pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
    pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

    // Error values.
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const ENOMEM: u32 = 12;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;
    pub const ENOTSUP: u32 = 95;
    pub const ESHUTDOWN: u32 = 108;
}

use consts::*;

/// How long a blocking read or write on a test connection may take before it fails.
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(60);

/// What went wrong talking to the server.
#[derive(Debug)]
pub enum Error {
    /// The server closed the connection (EOF, reset or broken pipe).
    Closed,
    /// Any other socket error (a timeout shows as `WouldBlock`/`TimedOut`).
    Io(io::Error),
    /// The server answered an option with an error reply.
    OptionRefused { option: u32, reply_type: u32, message: String },
    /// The server answered a request with an error.
    Server { errno: u32, message: String },
    /// The server sent something the protocol does not allow.
    Protocol(String),
}

impl Error {
    /// The errno of a server error reply, if this is one.
    pub fn errno(&self) -> Option<u32> {
        match self {
            Error::Server { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    pub fn is_closed(&self) -> bool {
        matches!(self, Error::Closed)
    }

    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Io(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Closed => write!(f, "connection closed by the server"),
            Error::Io(e) => write!(f, "socket error: {e}"),
            Error::OptionRefused { option, reply_type, message } => write!(
                f,
                "option {option} refused with reply type {:#x} ({}){}",
                reply_type,
                option_reply_name(*reply_type),
                if message.is_empty() { String::new() } else { format!(": {message}") }
            ),
            Error::Server { errno, message } => write!(
                f,
                "server error {errno} ({}){}",
                errno_name(*errno),
                if message.is_empty() { String::new() } else { format!(": {message}") }
            ),
            Error::Protocol(m) => write!(f, "protocol violation by the server: {m}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => Error::Closed,
            _ => Error::Io(e),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub fn errno_name(errno: u32) -> &'static str {
    match errno {
        EPERM => "EPERM",
        EIO => "EIO",
        ENOMEM => "ENOMEM",
        EINVAL => "EINVAL",
        ENOSPC => "ENOSPC",
        EOVERFLOW => "EOVERFLOW",
        ENOTSUP => "ENOTSUP",
        ESHUTDOWN => "ESHUTDOWN",
        _ => "unknown errno",
    }
}

pub fn option_reply_name(t: u32) -> &'static str {
    match t {
        REP_ACK => "NBD_REP_ACK",
        REP_SERVER => "NBD_REP_SERVER",
        REP_INFO => "NBD_REP_INFO",
        REP_META_CONTEXT => "NBD_REP_META_CONTEXT",
        REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        REP_ERR_POLICY => "NBD_REP_ERR_POLICY",
        REP_ERR_INVALID => "NBD_REP_ERR_INVALID",
        REP_ERR_PLATFORM => "NBD_REP_ERR_PLATFORM",
        REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD",
        REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN",
        REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN",
        REP_ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG",
        _ => "unknown reply type",
    }
}

/// Where a server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// `host:port`
    Tcp(String),
    /// Path of a unix socket.
    Unix(PathBuf),
}

/// A parsed NBD URI: `nbd://HOST:PORT/EXPORT` or `nbd+unix:///EXPORT?socket=PATH`, or their
/// TLS forms `nbds://` and `nbds+unix://`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdUri {
    pub target: Target,
    pub export: String,
    /// The URI says TLS is required (`nbds`).
    pub tls: bool,
}

impl NbdUri {
    pub fn parse(uri: &str) -> std::result::Result<NbdUri, String> {
        if let Some(rest) = uri.strip_prefix("nbds") {
            let mut u = NbdUri::parse(&format!("nbd{rest}"))?;
            u.tls = true;
            return Ok(u);
        }
        let bad = |why: &str| format!("bad NBD URI {uri:?}: {why}");
        if let Some(rest) = uri.strip_prefix("nbd+unix://") {
            let rest = rest.strip_prefix('/').ok_or_else(|| bad("expected nbd+unix:///EXPORT?socket=PATH"))?;
            let (export, query) = rest.split_once('?').ok_or_else(|| bad("no ?socket="))?;
            let socket = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .ok_or_else(|| bad("no socket= parameter"))?;
            Ok(NbdUri {
                target: Target::Unix(PathBuf::from(percent_decode(socket))),
                export: percent_decode(export),
                tls: false,
            })
        } else if let Some(rest) = uri.strip_prefix("nbd://") {
            let (authority, path) = match rest.split_once('/') {
                Some((a, p)) => (a, p),
                None => (rest, ""),
            };
            if authority.is_empty() {
                return Err(bad("no host"));
            }
            let path = path.split('?').next().unwrap_or("");
            let authority = if authority.contains(':') { authority.to_string() } else { format!("{authority}:10809") };
            Ok(NbdUri { target: Target::Tcp(authority), export: percent_decode(path), tls: false })
        } else {
            Err(bad("unknown scheme"))
        }
    }

    /// The same URI text form (for tools), export included.
    pub fn to_uri(&self) -> String {
        let s = if self.tls { "s" } else { "" };
        match &self.target {
            Target::Tcp(a) => format!("nbd{s}://{a}/{}", self.export),
            Target::Unix(p) => format!("nbd{s}+unix:///{}?socket={}", self.export, p.display()),
        }
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A TCP or unix stream, or a TLS session over one.
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<StreamOwned<ClientConnection, Stream>>),
}

/// What a TLS client trusts and which name it expects the server's certificate to carry.
#[derive(Clone, Debug)]
pub struct TlsClient {
    pub config: Arc<ClientConfig>,
    pub server_name: String,
}

impl TlsClient {
    /// Trusts the certificates of `ca_pem` (TLS 1.2 and 1.3), for a server named `server_name`
    /// (an IP address or a DNS name).
    pub fn new(ca_pem: &[u8], server_name: &str) -> TlsClient {
        TlsClient::with_versions(ca_pem, server_name, rustls::DEFAULT_VERSIONS)
    }

    /// Like [`new`](Self::new), restricted to the given protocol versions.
    pub fn with_versions(
        ca_pem: &[u8],
        server_name: &str,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> TlsClient {
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca_pem) {
            roots.add(c.expect("CA PEM")).expect("CA certificate");
        }
        let config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(versions)
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        TlsClient { config: Arc::new(config), server_name: server_name.to_string() }
    }
}

impl Stream {
    pub fn connect(target: &Target) -> io::Result<Stream> {
        match target {
            Target::Tcp(addr) => {
                let addrs: Vec<_> = addr.to_socket_addrs()?.collect();
                let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{addr} resolves to nothing"));
                for a in addrs {
                    match TcpStream::connect_timeout(&a, Duration::from_secs(10)) {
                        Ok(s) => {
                            s.set_nodelay(true)?;
                            return Ok(Stream::Tcp(s));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
            Target::Unix(path) => UnixStream::connect(path).map(Stream::Unix),
        }
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tls(s) => s.sock.set_read_timeout(t),
        }
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
            Stream::Tls(s) => s.sock.set_write_timeout(t),
        }
    }

    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tls(s) => s.sock.shutdown(how),
        }
    }

    /// A second handle on the socket; a TLS session cannot be shared.
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tls(_) => return Err(io::Error::new(io::ErrorKind::Unsupported, "a TLS stream cannot be cloned")),
        })
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// One reply to an option.
#[derive(Clone, Debug)]
pub struct OptionReply {
    pub option: u32,
    pub reply_type: u32,
    pub data: Vec<u8>,
}

impl OptionReply {
    pub fn is_error(&self) -> bool {
        self.reply_type & REP_FLAG_ERROR != 0
    }

    /// The error message text carried by an error reply (may be empty).
    pub fn message(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

/// How a connection ended when the test waited for the server to close it.
#[derive(Debug, PartialEq, Eq)]
pub enum Ending {
    /// EOF or reset, after the server sent this many more bytes.
    Closed { bytes_before_close: usize },
    /// Still open when the wait ran out; the server sent this many bytes meanwhile.
    StillOpen { bytes_received: usize },
}

/// A connection with no protocol state: the tests send what they like and read what comes.
#[derive(Debug)]
pub struct RawConn {
    pub stream: Stream,
}

impl RawConn {
    pub fn connect(target: &Target) -> io::Result<RawConn> {
        let stream = Stream::connect(target)?;
        stream.set_read_timeout(Some(DEFAULT_IO_TIMEOUT))?;
        stream.set_write_timeout(Some(DEFAULT_IO_TIMEOUT))?;
        Ok(RawConn { stream })
    }

    pub fn connect_uri(uri: &str) -> io::Result<RawConn> {
        let u = NbdUri::parse(uri).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        RawConn::connect(&u.target)
    }

    pub fn set_read_timeout(&self, t: Duration) {
        self.stream.set_read_timeout(Some(t)).expect("set_read_timeout");
    }

    pub fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes)?;
        Ok(())
    }

    pub fn recv_exact(&mut self, n: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; n];
        self.stream.read_exact(&mut buf)?;
        Ok(buf)
    }

    pub fn read_u16(&mut self) -> Result<u16> {
        let mut b = [0u8; 2];
        self.stream.read_exact(&mut b)?;
        Ok(u16::from_be_bytes(b))
    }

    pub fn read_u32(&mut self) -> Result<u32> {
        let mut b = [0u8; 4];
        self.stream.read_exact(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }

    pub fn read_u64(&mut self) -> Result<u64> {
        let mut b = [0u8; 8];
        self.stream.read_exact(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }

    /// Reads the server's greeting (`NBDMAGIC`, `IHAVEOPT`, handshake flags) and returns the flags.
    pub fn read_greeting(&mut self) -> Result<u16> {
        let magic = self.read_u64()?;
        if magic != NBDMAGIC {
            return Err(Error::Protocol(format!("greeting magic {magic:#x}, expected NBDMAGIC")));
        }
        let opt = self.read_u64()?;
        if opt != IHAVEOPT {
            return Err(Error::Protocol(format!(
                "second greeting magic {opt:#x}, expected IHAVEOPT (oldstyle servers are not supported)"
            )));
        }
        self.read_u16()
    }

    pub fn send_client_flags(&mut self, flags: u32) -> Result<()> {
        self.send(&flags.to_be_bytes())
    }

    /// Sends an option header announcing `len` bytes of data, and no data.
    pub fn send_option_header(&mut self, option: u32, len: u32) -> Result<()> {
        let mut b = Vec::with_capacity(16);
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        self.send(&b)
    }

    pub fn send_option(&mut self, option: u32, data: &[u8]) -> Result<()> {
        let mut b = Vec::with_capacity(16 + data.len());
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&u32::try_from(data.len()).expect("option too long").to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b)
    }

    /// Reads one option reply, checking its magic; replies longer than 1 MiB are refused as a
    /// protocol violation (no real reply is that long).
    pub fn read_option_reply(&mut self) -> Result<OptionReply> {
        let magic = self.read_u64()?;
        if magic != OPTION_REPLY_MAGIC {
            return Err(Error::Protocol(format!("option reply magic {magic:#x}")));
        }
        let option = self.read_u32()?;
        let reply_type = self.read_u32()?;
        let len = self.read_u32()?;
        if len > 1 << 20 {
            return Err(Error::Protocol(format!("option reply of {len} bytes")));
        }
        let data = self.recv_exact(len as usize)?;
        Ok(OptionReply { option, reply_type, data })
    }

    /// Greeting, then the client flags (fixed newstyle, plus no-zeroes when offered).
    pub fn start_fixed_newstyle(&mut self) -> Result<u16> {
        let hflags = self.read_greeting()?;
        if hflags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(Error::Protocol("server does not offer fixed newstyle".into()));
        }
        let mut cflags = FLAG_C_FIXED_NEWSTYLE;
        if hflags & FLAG_NO_ZEROES != 0 {
            cflags |= FLAG_C_NO_ZEROES;
        }
        self.send_client_flags(cflags)?;
        Ok(hflags)
    }

    /// `NBD_OPT_STARTTLS`, then the TLS handshake: from here on everything is encrypted. A
    /// refusal is [`Error::OptionRefused`]; a failed handshake is [`Error::Io`] with rustls's
    /// reason (or [`Error::Closed`] if the server hung up).
    pub fn start_tls(&mut self, tls: &TlsClient) -> Result<()> {
        self.send_option(OPT_STARTTLS, &[])?;
        let r = self.read_option_reply()?;
        if r.option != OPT_STARTTLS {
            return Err(Error::Protocol(format!("reply to option {} while waiting for STARTTLS", r.option)));
        }
        if r.reply_type != REP_ACK {
            return Err(Error::OptionRefused { option: OPT_STARTTLS, reply_type: r.reply_type, message: r.message() });
        }
        self.wrap_tls(tls)
    }

    /// Runs the TLS handshake on the connection as it is (after the server's STARTTLS ACK).
    pub fn wrap_tls(&mut self, tls: &TlsClient) -> Result<()> {
        let name = ServerName::try_from(tls.server_name.clone())
            .map_err(|e| Error::Io(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
        let conn = ClientConnection::new(tls.config.clone(), name).map_err(io::Error::other)?;
        // The stream moves into the TLS session; a dead placeholder holds its place meanwhile.
        let placeholder = Stream::Unix(UnixStream::pair()?.0);
        let sock = std::mem::replace(&mut self.stream, placeholder);
        let mut s = StreamOwned::new(conn, sock);
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock)?;
        }
        self.stream = Stream::Tls(Box::new(s));
        Ok(())
    }

    /// Reads and discards whatever the server sends until it closes the connection or
    /// `timeout` passes.
    pub fn wait_closed(&mut self, timeout: Duration) -> Ending {
        let deadline = Instant::now() + timeout;
        let mut total = 0usize;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Ending::StillOpen { bytes_received: total };
            }
            let left = (deadline - now).max(Duration::from_millis(1));
            if self.stream.set_read_timeout(Some(left)).is_err() {
                return Ending::Closed { bytes_before_close: total };
            }
            match self.stream.read(&mut buf) {
                Ok(0) => return Ending::Closed { bytes_before_close: total },
                Ok(n) => total += n,
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    return Ending::StillOpen { bytes_received: total }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Ending::Closed { bytes_before_close: total },
            }
        }
    }
}

/// How [`NbdClient`] negotiates.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// Ask for structured replies (NBD_OPT_STRUCTURED_REPLY) before choosing the export.
    pub structured_replies: bool,
    /// Enter transmission with the old NBD_OPT_EXPORT_NAME instead of NBD_OPT_GO.
    pub use_export_name: bool,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions { structured_replies: true, use_export_name: false }
    }
}

/// Block size constraints the server announced (NBD_INFO_BLOCK_SIZE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSize {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

/// A connected client in the transmission phase. One request at a time.
#[derive(Debug)]
pub struct NbdClient {
    pub conn: RawConn,
    pub export_size: u64,
    pub transmission_flags: u16,
    pub structured: bool,
    pub block_size: Option<BlockSize>,
    next_handle: u64,
}

impl NbdClient {
    /// Connects to an `nbd://` or `nbd+unix://` URI with structured replies and NBD_OPT_GO.
    pub fn connect(uri: &str) -> Result<NbdClient> {
        NbdClient::connect_with(uri, &ConnectOptions::default())
    }

    pub fn connect_with(uri: &str, opts: &ConnectOptions) -> Result<NbdClient> {
        let u = NbdUri::parse(uri).map_err(|e| Error::Io(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
        let conn = RawConn::connect(&u.target)?;
        NbdClient::handshake(conn, &u.export, opts)
    }

    /// Connects to an `nbds://` (or `nbd://`) URI, upgrades with STARTTLS right after the
    /// client flags, then negotiates as [`connect_with`](Self::connect_with) does.
    pub fn connect_tls(uri: &str, tls: &TlsClient, opts: &ConnectOptions) -> Result<NbdClient> {
        let u = NbdUri::parse(uri).map_err(|e| Error::Io(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
        let mut conn = RawConn::connect(&u.target)?;
        let hflags = conn.start_fixed_newstyle()?;
        conn.start_tls(tls)?;
        NbdClient::negotiate(conn, &u.export, opts, hflags & FLAG_NO_ZEROES != 0)
    }

    /// Runs the whole handshake on a fresh connection.
    pub fn handshake(mut conn: RawConn, export: &str, opts: &ConnectOptions) -> Result<NbdClient> {
        let hflags = conn.start_fixed_newstyle()?;
        NbdClient::negotiate(conn, export, opts, hflags & FLAG_NO_ZEROES != 0)
    }

    /// The options after the client flags (and after STARTTLS, if any).
    pub fn negotiate(mut conn: RawConn, export: &str, opts: &ConnectOptions, no_zeroes: bool) -> Result<NbdClient> {
        let mut structured = false;
        if opts.structured_replies {
            conn.send_option(OPT_STRUCTURED_REPLY, &[])?;
            let r = conn.read_option_reply()?;
            if r.option != OPT_STRUCTURED_REPLY {
                return Err(Error::Protocol(format!(
                    "reply to option {} while waiting for STRUCTURED_REPLY",
                    r.option
                )));
            }
            match r.reply_type {
                REP_ACK => structured = true,
                t if t & REP_FLAG_ERROR != 0 => {
                    return Err(Error::OptionRefused {
                        option: OPT_STRUCTURED_REPLY,
                        reply_type: t,
                        message: r.message(),
                    })
                }
                t => return Err(Error::Protocol(format!("reply type {t} to STRUCTURED_REPLY"))),
            }
        }
        if opts.use_export_name {
            conn.send_option(OPT_EXPORT_NAME, export.as_bytes())?;
            let size = conn.read_u64()?;
            let tflags = conn.read_u16()?;
            if !no_zeroes {
                conn.recv_exact(124)?;
            }
            return Ok(NbdClient {
                conn,
                export_size: size,
                transmission_flags: tflags,
                structured,
                block_size: None,
                next_handle: 1,
            });
        }
        conn.send_option(OPT_GO, &info_request(export, &[INFO_BLOCK_SIZE]))?;
        let (size, tflags, bs) = read_info_replies(&mut conn, OPT_GO)?;
        Ok(NbdClient {
            conn,
            export_size: size,
            transmission_flags: tflags,
            structured,
            block_size: bs,
            next_handle: 1,
        })
    }

    pub fn size(&self) -> u64 {
        self.export_size
    }

    pub fn has_flag(&self, flag: u16) -> bool {
        self.transmission_flags & flag != 0
    }

    pub fn set_timeout(&self, t: Duration) {
        self.conn.stream.set_read_timeout(Some(t)).expect("set_read_timeout");
        self.conn.stream.set_write_timeout(Some(t)).expect("set_write_timeout");
    }

    fn take_handle(&mut self) -> u64 {
        let h = self.next_handle;
        self.next_handle += 1;
        // Mix the counter so that a server that confuses handles with small integers shows it.
        h.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }

    /// Sends a request with a fresh handle and returns the handle.
    pub fn send_request(&mut self, flags: u16, cmd: u16, offset: u64, len: u32, payload: &[u8]) -> Result<u64> {
        let h = self.take_handle();
        self.send_request_raw(REQUEST_MAGIC, flags, cmd, h, offset, len, payload)?;
        Ok(h)
    }

    /// Sends any request header (any magic, any fields) followed by `payload`.
    #[allow(clippy::too_many_arguments)]
    pub fn send_request_raw(
        &mut self,
        magic: u32,
        flags: u16,
        cmd: u16,
        handle: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Result<()> {
        self.conn.send(&request_bytes(magic, flags, cmd, handle, offset, len, payload))
    }

    /// Reads the reply to the request `handle` (a `cmd` of `len` bytes at `offset`):
    /// `Ok(Some(data))` for a successful READ, `Ok(None)` for any other success,
    /// `Err(Server{..})` for an error reply.
    pub fn read_reply(&mut self, handle: u64, cmd: u16, offset: u64, len: u32) -> Result<Option<Vec<u8>>> {
        let magic = self.conn.read_u32()?;
        match magic {
            SIMPLE_REPLY_MAGIC => {
                let errno = self.conn.read_u32()?;
                let h = self.conn.read_u64()?;
                if h != handle {
                    return Err(Error::Protocol(format!("simple reply for handle {h:#x}, expected {handle:#x}")));
                }
                if cmd == CMD_READ && self.structured {
                    return Err(Error::Protocol(format!(
                        "simple reply (error {errno}) to a READ after structured replies were negotiated"
                    )));
                }
                if errno != 0 {
                    return Err(Error::Server { errno, message: String::new() });
                }
                if cmd == CMD_READ {
                    return Ok(Some(self.conn.recv_exact(len as usize)?));
                }
                Ok(None)
            }
            STRUCTURED_REPLY_MAGIC => {
                if !self.structured {
                    return Err(Error::Protocol("structured reply without negotiation".into()));
                }
                self.read_structured_rest(handle, cmd, offset, len)
            }
            m => Err(Error::Protocol(format!("reply magic {m:#x}"))),
        }
    }

    /// Reads structured chunks after the magic of the first one has been consumed.
    fn read_structured_rest(&mut self, handle: u64, cmd: u16, req_off: u64, len: u32) -> Result<Option<Vec<u8>>> {
        let mut buf = if cmd == CMD_READ { vec![0u8; len as usize] } else { Vec::new() };
        let mut covered: Vec<(u64, u64)> = Vec::new();
        let mut error: Option<Error> = None;
        let mut first = true;
        loop {
            if !first {
                let magic = self.conn.read_u32()?;
                if magic != STRUCTURED_REPLY_MAGIC {
                    return Err(Error::Protocol(format!("chunk magic {magic:#x} inside a structured reply")));
                }
            }
            first = false;
            let flags = self.conn.read_u16()?;
            let ctype = self.conn.read_u16()?;
            let h = self.conn.read_u64()?;
            let clen = self.conn.read_u32()?;
            if h != handle {
                return Err(Error::Protocol(format!("chunk for handle {h:#x}, expected {handle:#x}")));
            }
            if clen > 64 << 20 {
                return Err(Error::Protocol(format!("chunk of {clen} bytes")));
            }
            let payload = self.conn.recv_exact(clen as usize)?;
            match ctype {
                REPLY_TYPE_NONE => {
                    if clen != 0 || flags & REPLY_FLAG_DONE == 0 {
                        return Err(Error::Protocol("NBD_REPLY_TYPE_NONE with a payload or without DONE".into()));
                    }
                }
                REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE => {
                    if cmd != CMD_READ {
                        return Err(Error::Protocol(format!("content chunk in the reply to command {cmd}")));
                    }
                    let bad_len = if ctype == REPLY_TYPE_OFFSET_DATA { payload.len() < 9 } else { payload.len() != 12 };
                    if bad_len {
                        return Err(Error::Protocol(format!("content chunk type {ctype} of {} bytes", payload.len())));
                    }
                    let off = u64::from_be_bytes(payload[0..8].try_into().unwrap());
                    let n = if ctype == REPLY_TYPE_OFFSET_DATA {
                        payload.len() as u64 - 8
                    } else {
                        u64::from(u32::from_be_bytes(payload[8..12].try_into().unwrap()))
                    };
                    if n == 0 || off < req_off || off + n > req_off + u64::from(len) {
                        return Err(Error::Protocol(format!(
                            "content chunk [{off}, +{n}) outside the request [{req_off}, +{len})"
                        )));
                    }
                    let start = (off - req_off) as usize;
                    if ctype == REPLY_TYPE_OFFSET_DATA {
                        buf[start..start + n as usize].copy_from_slice(&payload[8..]);
                    } else {
                        buf[start..start + n as usize].fill(0);
                    }
                    covered.push((off, n));
                }
                t if t & (1 << 15) != 0 => {
                    if payload.len() < 6 {
                        return Err(Error::Protocol(format!("error chunk of {} bytes", payload.len())));
                    }
                    let errno = u32::from_be_bytes(payload[0..4].try_into().unwrap());
                    let mlen = u16::from_be_bytes(payload[4..6].try_into().unwrap()) as usize;
                    if 6 + mlen > payload.len() {
                        return Err(Error::Protocol("error chunk message longer than the chunk".into()));
                    }
                    if errno == 0 {
                        return Err(Error::Protocol("error chunk with errno 0".into()));
                    }
                    let message = String::from_utf8_lossy(&payload[6..6 + mlen]).into_owned();
                    if error.is_none() {
                        error = Some(Error::Server { errno, message });
                    }
                }
                REPLY_TYPE_BLOCK_STATUS => {
                    if cmd != CMD_BLOCK_STATUS {
                        return Err(Error::Protocol("block status chunk in the reply to another command".into()));
                    }
                }
                t => return Err(Error::Protocol(format!("unknown chunk type {t}"))),
            }
            if flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        if let Some(e) = error {
            return Err(e);
        }
        if cmd == CMD_READ {
            covered.sort_unstable();
            let mut pos = req_off;
            for (off, n) in &covered {
                if *off != pos {
                    return Err(Error::Protocol(format!(
                        "read reply chunks leave a gap or overlap at {pos} (next chunk at {off})"
                    )));
                }
                pos += n;
            }
            if pos != req_off + u64::from(len) {
                return Err(Error::Protocol(format!(
                    "successful read reply covers [{}, {pos}) of [{}, +{len})",
                    req_off, req_off
                )));
            }
            return Ok(Some(buf));
        }
        Ok(None)
    }

    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>> {
        self.read_flags(offset, len, 0)
    }

    pub fn read_flags(&mut self, offset: u64, len: u32, flags: u16) -> Result<Vec<u8>> {
        let h = self.send_request(flags, CMD_READ, offset, len, &[])?;
        Ok(self.read_reply(h, CMD_READ, offset, len)?.unwrap_or_default())
    }

    /// Reads `len` bytes in pieces of at most `chunk` bytes.
    pub fn read_all(&mut self, offset: u64, len: u64, chunk: u32) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(len as usize);
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(u64::from(chunk)) as u32;
            out.extend_from_slice(&self.read(pos, n)?);
            pos += u64::from(n);
        }
        Ok(out)
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.write_flags(offset, data, 0)
    }

    pub fn write_fua(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.write_flags(offset, data, CMD_FLAG_FUA)
    }

    pub fn write_flags(&mut self, offset: u64, data: &[u8], flags: u16) -> Result<()> {
        let len = u32::try_from(data.len()).expect("write too long");
        let h = self.send_request(flags, CMD_WRITE, offset, len, data)?;
        self.read_reply(h, CMD_WRITE, offset, len).map(|_| ())
    }

    pub fn flush(&mut self) -> Result<()> {
        self.simple_command(CMD_FLUSH, 0, 0, 0)
    }

    pub fn trim(&mut self, offset: u64, len: u32) -> Result<()> {
        self.simple_command(CMD_TRIM, 0, offset, len)
    }

    pub fn write_zeroes(&mut self, offset: u64, len: u32, flags: u16) -> Result<()> {
        self.simple_command(CMD_WRITE_ZEROES, flags, offset, len)
    }

    pub fn cache(&mut self, offset: u64, len: u32) -> Result<()> {
        self.simple_command(CMD_CACHE, 0, offset, len)
    }

    /// Any command without payload whose success carries no data.
    pub fn simple_command(&mut self, cmd: u16, flags: u16, offset: u64, len: u32) -> Result<()> {
        let h = self.send_request(flags, cmd, offset, len, &[])?;
        self.read_reply(h, cmd, offset, len).map(|_| ())
    }

    /// NBD_CMD_DISC, then waits (a little) for the server to close.
    pub fn disconnect(mut self) -> Result<()> {
        let h = self.take_handle();
        self.send_request_raw(REQUEST_MAGIC, 0, CMD_DISC, h, 0, 0, &[])?;
        match self.conn.wait_closed(Duration::from_secs(10)) {
            Ending::Closed { bytes_before_close: 0 } => Ok(()),
            Ending::Closed { bytes_before_close } => {
                Err(Error::Protocol(format!("{bytes_before_close} bytes sent in reply to NBD_CMD_DISC")))
            }
            Ending::StillOpen { .. } => Err(Error::Protocol("connection still open 10 s after NBD_CMD_DISC".into())),
        }
    }
}

/// Data of NBD_OPT_INFO / NBD_OPT_GO: export name and the info types requested.
pub fn info_request(export: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(export.len() as u32).to_be_bytes());
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

/// Reads the replies to NBD_OPT_INFO / NBD_OPT_GO up to the final ACK: size, flags, block sizes.
pub fn read_info_replies(conn: &mut RawConn, option: u32) -> Result<(u64, u16, Option<BlockSize>)> {
    let mut export: Option<(u64, u16)> = None;
    let mut bs = None;
    loop {
        let r = conn.read_option_reply()?;
        if r.option != option {
            return Err(Error::Protocol(format!("reply to option {} while waiting for {option}", r.option)));
        }
        if r.is_error() {
            return Err(Error::OptionRefused { option, reply_type: r.reply_type, message: r.message() });
        }
        match r.reply_type {
            REP_INFO => {
                if r.data.len() < 2 {
                    return Err(Error::Protocol("NBD_REP_INFO shorter than 2 bytes".into()));
                }
                let itype = u16::from_be_bytes([r.data[0], r.data[1]]);
                match itype {
                    INFO_EXPORT => {
                        if r.data.len() != 12 {
                            return Err(Error::Protocol(format!("NBD_INFO_EXPORT of {} bytes", r.data.len())));
                        }
                        let size = u64::from_be_bytes(r.data[2..10].try_into().unwrap());
                        let flags = u16::from_be_bytes([r.data[10], r.data[11]]);
                        export = Some((size, flags));
                    }
                    INFO_BLOCK_SIZE => {
                        if r.data.len() != 14 {
                            return Err(Error::Protocol(format!("NBD_INFO_BLOCK_SIZE of {} bytes", r.data.len())));
                        }
                        let v = |i: usize| u32::from_be_bytes(r.data[i..i + 4].try_into().unwrap());
                        bs = Some(BlockSize { minimum: v(2), preferred: v(6), maximum: v(10) });
                    }
                    _ => {}
                }
            }
            REP_ACK => break,
            t => return Err(Error::Protocol(format!("unexpected reply type {t:#x} to option {option}"))),
        }
    }
    let (size, flags) = export.ok_or_else(|| Error::Protocol("NBD_REP_ACK without NBD_INFO_EXPORT".into()))?;
    Ok((size, flags, bs))
}

/// The bytes of one request: header then payload.
pub fn request_bytes(magic: u32, flags: u16, cmd: u16, handle: u64, offset: u64, len: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(28 + payload.len());
    b.extend_from_slice(&magic.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&cmd.to_be_bytes());
    b.extend_from_slice(&handle.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(payload);
    b
}
