//! The NBD wire protocol as plain data: constants, parsers and encoders.
//!
//! Nothing in here does I/O or allocates more than its inputs justify, so every parser can be
//! fed arbitrary bytes (see the `fuzz/` crate and the proptests below). The handshake driver is
//! in [`super::handshake`], the transmission loop in [`super::server`].
//!
//! Reference: the NBD protocol specification, `doc/proto.md` of NetworkBlockDevice/nbd. All
//! integers on the wire are big-endian. Names of constants follow the specification so they can
//! be grepped for in it.
//!
//! Deliberately not implemented: oldstyle negotiation, TLS (structured for later, see
//! [`super::handshake`]) and extended headers (`NBD_OPT_EXTENDED_HEADERS` is answered with
//! `NBD_REP_ERR_UNSUP`, so every header here is the compact one).

use std::borrow::Cow;

use thiserror::Error;

// ------------------------------------------------------------------------------------------------
// Magics
// ------------------------------------------------------------------------------------------------

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the second 8 bytes of the greeting, and the first 8 bytes of every client option.
pub const NBD_OPTS_MAGIC: u64 = 0x4948_4156_454f_5054;
/// First 8 bytes of every fixed-newstyle option reply.
pub const NBD_REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// First 4 bytes of every (compact) transmission request.
pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
/// First 4 bytes of a simple reply.
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// First 4 bytes of a structured reply chunk.
pub const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Extended-header request magic. Listed only so that a client that uses extended headers
/// without negotiating them is recognised in logs; this server never accepts it.
pub const NBD_EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Extended-header reply magic (never sent by this server).
pub const NBD_EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// ------------------------------------------------------------------------------------------------
// Handshake phase
// ------------------------------------------------------------------------------------------------

/// Server greeting, 18 bytes:
///
/// ```text
/// 0   u64  NBD_MAGIC ("NBDMAGIC")
/// 8   u64  NBD_OPTS_MAGIC ("IHAVEOPT")
/// 16  u16  handshake flags
/// ```
///
/// followed by the client's 32-bit client flags.
pub const GREETING_LEN: usize = 18;
/// Length of the client flags the client answers the greeting with.
pub const CLIENT_FLAGS_LEN: usize = 4;

/// Handshake flag (server, 16 bits): the server speaks fixed newstyle.
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag (server): the client may ask to skip the 124 zero bytes after
/// `NBD_OPT_EXPORT_NAME`.
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;

/// Client flag (32 bits): the client speaks fixed newstyle.
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: do not send the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Client option header, 16 bytes, followed by `length` bytes of option data:
///
/// ```text
/// 0   u64  NBD_OPTS_MAGIC
/// 8   u32  option (NBD_OPT_*)
/// 12  u32  length of option data
/// ```
pub const OPTION_HEADER_LEN: usize = 16;

/// Choose an export and enter transmission; cannot be answered with an error.
/// Data: the export name (the whole payload).
pub const NBD_OPT_EXPORT_NAME: u32 = 1;
/// Soft disconnect during haggling; answered with `NBD_REP_ACK`.
pub const NBD_OPT_ABORT: u32 = 2;
/// List exports. No data.
pub const NBD_OPT_LIST: u32 = 3;
/// Withdrawn; never valid.
pub const NBD_OPT_PEEK_EXPORT: u32 = 4;
/// Upgrade to TLS. No data.
pub const NBD_OPT_STARTTLS: u32 = 5;
/// Describe an export without entering transmission.
/// Data: u32 name length, name, u16 number of info requests, u16 × n `NBD_INFO_*`.
pub const NBD_OPT_INFO: u32 = 6;
/// Like `NBD_OPT_INFO`, and enter transmission after the final `NBD_REP_ACK`.
pub const NBD_OPT_GO: u32 = 7;
/// Enable structured replies. No data.
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
/// List metadata contexts.
/// Data: u32 export name length, export name, u32 number of queries, then per query
/// u32 length + query string.
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
/// Select metadata contexts (same data layout as `NBD_OPT_LIST_META_CONTEXT`).
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;
/// Enable extended (64-bit) headers. Not supported by this server.
pub const NBD_OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply header, 20 bytes, followed by `length` bytes of reply data:
///
/// ```text
/// 0   u64  NBD_REP_MAGIC
/// 8   u32  option being answered
/// 12  u32  reply type (NBD_REP_*)
/// 16  u32  length of reply data
/// ```
pub const OPTION_REPLY_HEADER_LEN: usize = 20;

/// The option succeeded (or a list of replies is complete). No data.
pub const NBD_REP_ACK: u32 = 1;
/// An export description: u32 name length, name, optional human-readable details.
pub const NBD_REP_SERVER: u32 = 2;
/// One information item for `NBD_OPT_INFO`/`NBD_OPT_GO`: u16 `NBD_INFO_*`, then its payload.
pub const NBD_REP_INFO: u32 = 3;
/// A metadata context: u32 context id, then the context name.
pub const NBD_REP_META_CONTEXT: u32 = 4;
/// Bit 31 marks an error reply; its optional data is a human-readable message.
pub const NBD_REP_FLAG_ERROR: u32 = 1 << 31;
/// The option is unknown to this server.
pub const NBD_REP_ERR_UNSUP: u32 = NBD_REP_FLAG_ERROR | 1;
/// The option is known and valid, but policy forbids it.
pub const NBD_REP_ERR_POLICY: u32 = NBD_REP_FLAG_ERROR | 2;
/// The option is syntactically or semantically invalid.
pub const NBD_REP_ERR_INVALID: u32 = NBD_REP_FLAG_ERROR | 3;
/// Not supported on this platform.
pub const NBD_REP_ERR_PLATFORM: u32 = NBD_REP_FLAG_ERROR | 4;
/// TLS must be negotiated first.
pub const NBD_REP_ERR_TLS_REQD: u32 = NBD_REP_FLAG_ERROR | 5;
/// The requested export is not available.
pub const NBD_REP_ERR_UNKNOWN: u32 = NBD_REP_FLAG_ERROR | 6;
/// The server is shutting down.
pub const NBD_REP_ERR_SHUTDOWN: u32 = NBD_REP_FLAG_ERROR | 7;
/// The client must request `NBD_INFO_BLOCK_SIZE` first.
pub const NBD_REP_ERR_BLOCK_SIZE_REQD: u32 = NBD_REP_FLAG_ERROR | 8;
/// The request or the reply is too large to process.
pub const NBD_REP_ERR_TOO_BIG: u32 = NBD_REP_FLAG_ERROR | 9;
/// Extended headers must be negotiated first.
pub const NBD_REP_ERR_EXT_HEADER_REQD: u32 = NBD_REP_FLAG_ERROR | 10;

/// `NBD_REP_INFO` item, 12 bytes of reply data: u16 type, u64 export size, u16 transmission flags.
pub const NBD_INFO_EXPORT: u16 = 0;
/// `NBD_REP_INFO` item: u16 type, then the canonical export name.
pub const NBD_INFO_NAME: u16 = 1;
/// `NBD_REP_INFO` item: u16 type, then a human-readable description.
pub const NBD_INFO_DESCRIPTION: u16 = 2;
/// `NBD_REP_INFO` item, 14 bytes of reply data: u16 type, u32 minimum, u32 preferred and
/// u32 maximum block size.
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

/// After `NBD_OPT_EXPORT_NAME`: u64 export size, u16 transmission flags, then 124 zero bytes
/// unless the client set `NBD_FLAG_C_NO_ZEROES`.
pub const EXPORT_NAME_REPLY_LEN: usize = 10;
/// The reserved zero bytes after the `NBD_OPT_EXPORT_NAME` reply.
pub const EXPORT_NAME_ZEROES: usize = 124;

/// Longest string (export name, query, message) the specification allows.
pub const MAX_STRING_LEN: usize = 4096;

/// Name of the one metadata context the specification defines.
pub const BASE_ALLOCATION: &str = "base:allocation";

// ------------------------------------------------------------------------------------------------
// Transmission flags (16 bits, sent after haggling)
// ------------------------------------------------------------------------------------------------

/// Always set.
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
/// The export is read-only; writes must fail with `NBD_EPERM`.
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
/// `NBD_CMD_FLUSH` is supported.
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
/// `NBD_CMD_FLAG_FUA` is supported.
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
/// The export behaves like a rotational disk (hint).
pub const NBD_FLAG_ROTATIONAL: u16 = 1 << 4;
/// `NBD_CMD_TRIM` is supported.
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
/// `NBD_CMD_WRITE_ZEROES` and `NBD_CMD_FLAG_NO_HOLE` are supported.
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// `NBD_CMD_FLAG_DF` is supported on reads; only with structured replies.
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
/// Flush and FUA are visible across all connections to the export.
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// `NBD_CMD_RESIZE` (experimental; not supported).
pub const NBD_FLAG_SEND_RESIZE: u16 = 1 << 9;
/// `NBD_CMD_CACHE` is understood.
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;
/// `NBD_CMD_FLAG_FAST_ZERO` is supported on write-zeroes.
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;
/// Block status requests may carry a payload (extended headers only; not supported).
pub const NBD_FLAG_BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;

// ------------------------------------------------------------------------------------------------
// Transmission phase: requests
// ------------------------------------------------------------------------------------------------

/// Request header, 28 bytes, followed by `length` bytes of data for `NBD_CMD_WRITE` only:
///
/// ```text
/// 0   u32  NBD_REQUEST_MAGIC
/// 4   u16  command flags (NBD_CMD_FLAG_*)
/// 6   u16  type (NBD_CMD_*)
/// 8   u64  cookie (opaque; echoed in every reply)
/// 16  u64  offset
/// 24  u32  length
/// ```
pub const REQUEST_LEN: usize = 28;

pub const NBD_CMD_READ: u16 = 0;
pub const NBD_CMD_WRITE: u16 = 1;
/// Disconnect: no reply; offset and length must be zero.
pub const NBD_CMD_DISC: u16 = 2;
/// Offset and length must be zero.
pub const NBD_CMD_FLUSH: u16 = 3;
pub const NBD_CMD_TRIM: u16 = 4;
pub const NBD_CMD_CACHE: u16 = 5;
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;
/// Experimental; not supported (parsed as [`Command::Unknown`]).
pub const NBD_CMD_RESIZE: u16 = 8;

/// Persist before replying. Valid on every command once `NBD_FLAG_SEND_FUA` was advertised.
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
/// `NBD_CMD_WRITE_ZEROES`: do not punch a hole (keep the range allocated).
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// `NBD_CMD_READ`: reply with at most one content chunk (needs `NBD_FLAG_SEND_DF`).
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
/// `NBD_CMD_BLOCK_STATUS`: exactly one extent per context, not longer than the request.
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// `NBD_CMD_WRITE_ZEROES`: fail fast with `NBD_ENOTSUP` unless faster than writing zeroes
/// (needs `NBD_FLAG_SEND_FAST_ZERO`).
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Extended headers only; never valid here.
pub const NBD_CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// ------------------------------------------------------------------------------------------------
// Transmission phase: replies
// ------------------------------------------------------------------------------------------------

/// Simple reply, 16 bytes, followed by `length` bytes of data for a successful `NBD_CMD_READ`:
///
/// ```text
/// 0   u32  NBD_SIMPLE_REPLY_MAGIC
/// 4   u32  error (NBD_E*, 0 for success)
/// 8   u64  cookie
/// ```
pub const SIMPLE_REPLY_LEN: usize = 16;

/// Structured reply chunk header, 20 bytes, followed by `length` bytes of payload:
///
/// ```text
/// 0   u32  NBD_STRUCTURED_REPLY_MAGIC
/// 4   u16  flags (NBD_REPLY_FLAG_*)
/// 6   u16  type (NBD_REPLY_TYPE_*)
/// 8   u64  cookie
/// 16  u32  length of payload
/// ```
pub const STRUCTURED_REPLY_HEADER_LEN: usize = 20;

/// `NBD_REPLY_TYPE_OFFSET_DATA` chunk header: the structured header plus the u64 offset that
/// starts its payload; `length - 8` data bytes follow.
pub const OFFSET_DATA_HEADER_LEN: usize = STRUCTURED_REPLY_HEADER_LEN + 8;
/// An `NBD_REPLY_TYPE_NONE` chunk is a bare structured header.
pub const NONE_CHUNK_LEN: usize = STRUCTURED_REPLY_HEADER_LEN;
/// `NBD_REPLY_TYPE_OFFSET_HOLE` chunk: header + u64 offset + u32 hole size.
pub const OFFSET_HOLE_CHUNK_LEN: usize = STRUCTURED_REPLY_HEADER_LEN + 12;
/// The most data one `NBD_REPLY_TYPE_OFFSET_DATA` chunk can carry (its length field also
/// counts the 8-byte offset).
pub const MAX_OFFSET_DATA_LEN: u32 = u32::MAX - 8;

/// This is the last chunk of the reply.
pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;

/// No payload; must carry `NBD_REPLY_FLAG_DONE`.
pub const NBD_REPLY_TYPE_NONE: u16 = 0;
/// Payload: u64 offset, then data.
pub const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Payload: u64 offset, u32 hole size (reads as zeroes).
pub const NBD_REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Payload: u32 context id, then one or more (u32 length, u32 status flags) descriptors.
pub const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Extended headers only (64-bit descriptors); never sent.
pub const NBD_REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// Bit 15 marks an error chunk.
pub const NBD_REPLY_TYPE_FLAG_ERROR: u16 = 1 << 15;
/// Payload: u32 error, u16 message length, message.
pub const NBD_REPLY_TYPE_ERROR: u16 = NBD_REPLY_TYPE_FLAG_ERROR | 1;
/// Payload: u32 error, u16 message length, message, u64 offset.
pub const NBD_REPLY_TYPE_ERROR_OFFSET: u16 = NBD_REPLY_TYPE_FLAG_ERROR | 2;

/// `base:allocation` status flag: the extent is not allocated.
pub const NBD_STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` status flag: the extent reads as zeroes.
pub const NBD_STATE_ZERO: u32 = 1 << 1;

// ------------------------------------------------------------------------------------------------
// Error values (the only ones allowed on the wire)
// ------------------------------------------------------------------------------------------------

pub const NBD_EPERM: u32 = 1;
pub const NBD_EIO: u32 = 5;
pub const NBD_ENOMEM: u32 = 12;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;
pub const NBD_EOVERFLOW: u32 = 75;
pub const NBD_ENOTSUP: u32 = 95;
pub const NBD_ESHUTDOWN: u32 = 108;

/// Maps a host `errno` to the NBD error value to put on the wire.
///
/// The wire values are fixed by the specification rather than being host errnos, so this
/// must not pass values through. `EDQUOT`/`EFBIG` become `NBD_ENOSPC` and read-only style
/// failures become `NBD_EPERM` as the specification asks; anything unknown (including 0,
/// because an error reply must be nonzero) becomes `NBD_EIO`.
pub fn nbd_errno(libc_errno: i32) -> u32 {
    match libc_errno {
        libc::EPERM | libc::EACCES | libc::EROFS => NBD_EPERM,
        libc::EIO => NBD_EIO,
        libc::ENOMEM => NBD_ENOMEM,
        libc::EINVAL => NBD_EINVAL,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => NBD_ENOSPC,
        libc::EOVERFLOW => NBD_EOVERFLOW,
        // EOPNOTSUPP equals ENOTSUP on Linux but not on every platform, so a guard rather
        // than (possibly overlapping) patterns.
        e if e == libc::ENOTSUP || e == libc::EOPNOTSUPP => NBD_ENOTSUP,
        libc::ESHUTDOWN => NBD_ESHUTDOWN,
        _ => NBD_EIO,
    }
}

// ------------------------------------------------------------------------------------------------
// Errors
// ------------------------------------------------------------------------------------------------

/// A message that does not follow the protocol.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProtoError {
    /// A transmission request did not start with `NBD_REQUEST_MAGIC`: the stream is out of
    /// sync (or uses unnegotiated extended headers), so the connection must be closed.
    #[error("bad request magic {0:#010x}")]
    BadRequestMagic(u32),
    /// A client option did not start with `IHAVEOPT`.
    #[error("bad option magic {0:#018x}")]
    BadOptionMagic(u64),
    /// An option reply did not start with `NBD_REP_MAGIC` (client side).
    #[error("bad option reply magic {0:#018x}")]
    BadOptionReplyMagic(u64),
    /// A transmission reply had an unknown magic (client side).
    #[error("bad reply magic {0:#010x}")]
    BadReplyMagic(u32),
    /// An option payload does not match its documented layout.
    #[error("malformed option data: {0}")]
    Malformed(&'static str),
}

// ------------------------------------------------------------------------------------------------
// Byte helpers
// ------------------------------------------------------------------------------------------------

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// Bounds-checked reader over an option payload: every short read is a [`ProtoError`], never
/// a panic, because payload lengths come from the client.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ProtoError> {
        if self.buf.len() < n {
            return Err(ProtoError::Malformed(what));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, ProtoError> {
        self.bytes(2, what).map(be_u16)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, ProtoError> {
        self.bytes(4, what).map(be_u32)
    }

    fn string(&mut self, len: u32, what: &'static str) -> Result<&'a str, ProtoError> {
        let len = usize::try_from(len).map_err(|_| ProtoError::Malformed(what))?;
        parse_string(self.bytes(len, what)?)
    }

    fn remaining(&self) -> usize {
        self.buf.len()
    }
}

/// Checks the specification's rules for strings: UTF-8, no NUL, at most 4096 bytes.
pub fn parse_string(bytes: &[u8]) -> Result<&str, ProtoError> {
    if bytes.len() > MAX_STRING_LEN {
        return Err(ProtoError::Malformed("string longer than 4096 bytes"));
    }
    let s = std::str::from_utf8(bytes).map_err(|_| ProtoError::Malformed("string is not UTF-8"))?;
    if s.contains('\0') {
        return Err(ProtoError::Malformed("string contains NUL"));
    }
    Ok(s)
}

/// Longest prefix of `s` that is at most `max` bytes and ends on a character boundary, so a
/// truncated message stays valid UTF-8.
fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn len_u32(n: usize) -> u32 {
    // Every caller bounds `n` far below 4 GiB (strings ≤ 4096 bytes, option payloads
    // ≤ 64 KiB); saturating keeps this panic-free regardless.
    u32::try_from(n).unwrap_or(u32::MAX)
}

// ------------------------------------------------------------------------------------------------
// Handshake encoders and parsers
// ------------------------------------------------------------------------------------------------

/// The server greeting.
pub fn greeting(handshake_flags: u16) -> [u8; GREETING_LEN] {
    let mut b = [0u8; GREETING_LEN];
    b[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&NBD_OPTS_MAGIC.to_be_bytes());
    b[16..18].copy_from_slice(&handshake_flags.to_be_bytes());
    b
}

/// A client option header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// `NBD_OPT_*`.
    pub option: u32,
    /// Length of the option data that follows (not yet checked against any limit).
    pub len: u32,
}

/// Parses a client option header; a bad magic means the client is not speaking NBD (or is out
/// of sync) and the connection must be closed.
pub fn parse_option_header(buf: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, ProtoError> {
    let magic = be_u64(&buf[0..8]);
    if magic != NBD_OPTS_MAGIC {
        return Err(ProtoError::BadOptionMagic(magic));
    }
    Ok(OptionHeader { option: be_u32(&buf[8..12]), len: be_u32(&buf[12..16]) })
}

/// Appends a client option (header and data). Client side: tests, fuzz seeds, test clients.
pub fn push_option(out: &mut Vec<u8>, option: u32, data: &[u8]) {
    out.extend_from_slice(&NBD_OPTS_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&len_u32(data.len()).to_be_bytes());
    out.extend_from_slice(data);
}

/// Appends an option reply header announcing `len` bytes of reply data.
pub fn push_option_reply_header(out: &mut Vec<u8>, option: u32, reply: u32, len: u32) {
    out.extend_from_slice(&NBD_REP_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// Appends a complete option reply.
pub fn push_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    push_option_reply_header(out, option, reply, len_u32(data.len()));
    out.extend_from_slice(data);
}

/// Appends an error reply with a human-readable message (truncated to the 4096-byte limit).
pub fn push_option_error(out: &mut Vec<u8>, option: u32, reply: u32, message: &str) {
    debug_assert!(reply & NBD_REP_FLAG_ERROR != 0, "not an error reply type");
    push_option_reply(out, option, reply, truncate_str(message, MAX_STRING_LEN).as_bytes());
}

/// Appends `NBD_REP_INFO` / `NBD_INFO_EXPORT`.
pub fn push_info_export(out: &mut Vec<u8>, option: u32, size: u64, transmission_flags: u16) {
    push_option_reply_header(out, option, NBD_REP_INFO, 12);
    out.extend_from_slice(&NBD_INFO_EXPORT.to_be_bytes());
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&transmission_flags.to_be_bytes());
}

/// Appends `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE`.
pub fn push_info_block_size(out: &mut Vec<u8>, option: u32, minimum: u32, preferred: u32, maximum: u32) {
    push_option_reply_header(out, option, NBD_REP_INFO, 14);
    out.extend_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
    out.extend_from_slice(&minimum.to_be_bytes());
    out.extend_from_slice(&preferred.to_be_bytes());
    out.extend_from_slice(&maximum.to_be_bytes());
}

/// Appends `NBD_REP_INFO` with a string item (`NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION`).
pub fn push_info_string(out: &mut Vec<u8>, option: u32, info: u16, value: &str) {
    let value = truncate_str(value, MAX_STRING_LEN);
    push_option_reply_header(out, option, NBD_REP_INFO, 2 + len_u32(value.len()));
    out.extend_from_slice(&info.to_be_bytes());
    out.extend_from_slice(value.as_bytes());
}

/// Appends `NBD_REP_META_CONTEXT`.
pub fn push_meta_context_reply(out: &mut Vec<u8>, option: u32, context_id: u32, name: &str) {
    push_option_reply_header(out, option, NBD_REP_META_CONTEXT, 4 + len_u32(name.len()));
    out.extend_from_slice(&context_id.to_be_bytes());
    out.extend_from_slice(name.as_bytes());
}

/// Appends the reply to a successful `NBD_OPT_EXPORT_NAME`.
pub fn push_export_name_reply(out: &mut Vec<u8>, size: u64, transmission_flags: u16, no_zeroes: bool) {
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&transmission_flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; EXPORT_NAME_ZEROES]);
    }
}

/// A parsed `NBD_OPT_INFO` / `NBD_OPT_GO` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    /// The export name as presented by the client.
    pub name: &'a str,
    /// Requested `NBD_INFO_*` items, in the client's order (unknown ones included; the server
    /// ignores those).
    pub info: Vec<u16>,
}

/// Parses `NBD_OPT_INFO` / `NBD_OPT_GO` data:
///
/// ```text
/// u32        length of name (at most data length - 6)
/// [u8]       name
/// u16        number of information requests n
/// u16 × n    NBD_INFO_* requests
/// ```
///
/// The data must be consumed exactly; anything else is `NBD_REP_ERR_INVALID`.
pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest<'_>, ProtoError> {
    let mut r = Reader { buf: data };
    let name_len = r.u32("missing export name length")?;
    let name = r.string(name_len, "export name overruns option data")?;
    let n = r.u16("missing information request count")?;
    if r.remaining() != usize::from(n) * 2 {
        return Err(ProtoError::Malformed("information request count does not match data length"));
    }
    let info = (0..n).map(|_| r.u16("truncated information request")).collect::<Result<Vec<_>, _>>()?;
    Ok(InfoRequest { name, info })
}

/// Builds `NBD_OPT_INFO` / `NBD_OPT_GO` data. Client side.
pub fn encode_info_request(name: &str, info: &[u16]) -> Vec<u8> {
    let mut v = Vec::with_capacity(6 + name.len() + 2 * info.len());
    v.extend_from_slice(&len_u32(name.len()).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&u16::try_from(info.len()).unwrap_or(u16::MAX).to_be_bytes());
    for i in info {
        v.extend_from_slice(&i.to_be_bytes());
    }
    v
}

/// A parsed `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest<'a> {
    /// The export the contexts are for.
    pub export: &'a str,
    /// The queries, in the client's order.
    pub queries: Vec<&'a str>,
}

/// Parses meta-context option data:
///
/// ```text
/// u32        length of export name
/// [u8]       export name
/// u32        number of queries n
/// n × (u32 length, [u8] query)
/// ```
///
/// The data must be consumed exactly; anything else is `NBD_REP_ERR_INVALID`.
pub fn parse_meta_context_request(data: &[u8]) -> Result<MetaContextRequest<'_>, ProtoError> {
    let mut r = Reader { buf: data };
    let name_len = r.u32("missing export name length")?;
    let export = r.string(name_len, "export name overruns option data")?;
    let n = r.u32("missing query count")?;
    // The count is client-controlled: size the vector by what the data can actually hold
    // (each query takes at least 4 bytes), never by the count itself.
    let mut queries = Vec::with_capacity((n as usize).min(r.remaining() / 4));
    for _ in 0..n {
        let len = r.u32("truncated query length")?;
        queries.push(r.string(len, "query overruns option data")?);
    }
    if r.remaining() != 0 {
        return Err(ProtoError::Malformed("trailing bytes after the last query"));
    }
    Ok(MetaContextRequest { export, queries })
}

/// Builds meta-context option data. Client side.
pub fn encode_meta_context_request(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&len_u32(export.len()).to_be_bytes());
    v.extend_from_slice(export.as_bytes());
    v.extend_from_slice(&len_u32(queries.len()).to_be_bytes());
    for q in queries {
        v.extend_from_slice(&len_u32(q.len()).to_be_bytes());
        v.extend_from_slice(q.as_bytes());
    }
    v
}

/// An option reply header, as a client sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply: u32,
    pub len: u32,
}

/// Parses an option reply header. Client side; `Ok(None)` if `buf` is shorter than
/// [`OPTION_REPLY_HEADER_LEN`].
pub fn parse_option_reply_header(buf: &[u8]) -> Result<Option<OptionReplyHeader>, ProtoError> {
    let Some(h) = buf.get(..OPTION_REPLY_HEADER_LEN) else {
        return Ok(None);
    };
    let magic = be_u64(&h[0..8]);
    if magic != NBD_REP_MAGIC {
        return Err(ProtoError::BadOptionReplyMagic(magic));
    }
    Ok(Some(OptionReplyHeader { option: be_u32(&h[8..12]), reply: be_u32(&h[12..16]), len: be_u32(&h[16..20]) }))
}

// ------------------------------------------------------------------------------------------------
// Metadata contexts
// ------------------------------------------------------------------------------------------------

/// A metadata context this server can serve through `NBD_CMD_BLOCK_STATUS`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MetaContext {
    /// `base:allocation`: extents flagged with [`NBD_STATE_HOLE`] / [`NBD_STATE_ZERO`].
    BaseAllocation,
    /// `x-evs:changed:<snapshot>` on a snapshot export: extents flagged [`EVS_STATE_CHANGED`]
    /// where the export differs from that older snapshot (and also [`EVS_STATE_DISCARDED`]
    /// where it was discarded), in the spirit of `qemu:dirty-bitmap:<name>`.
    Changed(String),
}

/// Namespace and leaf prefix of the changed-block contexts.
pub const EVS_CHANGED_PREFIX: &str = "x-evs:changed:";
/// `x-evs:changed:*` flag: the extent differs from the base snapshot.
pub const EVS_STATE_CHANGED: u32 = 1;
/// `x-evs:changed:*` flag: the extent was discarded since the base snapshot (reads as zeros).
pub const EVS_STATE_DISCARDED: u32 = 2;

impl MetaContext {
    /// The context's name on the wire.
    pub fn name(&self) -> Cow<'static, str> {
        match self {
            MetaContext::BaseAllocation => Cow::Borrowed(BASE_ALLOCATION),
            MetaContext::Changed(base) => Cow::Owned(format!("{EVS_CHANGED_PREFIX}{base}")),
        }
    }

    /// The contexts every export offers; a snapshot export adds [`MetaContext::Changed`].
    pub fn all() -> Vec<MetaContext> {
        vec![MetaContext::BaseAllocation]
    }
}

/// Whether a query comes from `NBD_OPT_LIST_META_CONTEXT` or `NBD_OPT_SET_META_CONTEXT`: the
/// specification gives wildcards meaning only when listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryKind {
    List,
    Set,
}

/// The contexts among `available` that one query names.
///
/// * A query without a colon has no namespace: `Err` (the server answers
///   `NBD_REP_ERR_INVALID`, which the specification permits).
/// * Unknown namespaces and unknown leaf names select nothing (the specification requires
///   them to be ignored, not rejected).
/// * `base:` is a wildcard for listing and must be ignored when setting.
pub fn match_meta_query(
    query: &str,
    kind: QueryKind,
    available: &[MetaContext],
) -> Result<Vec<MetaContext>, ProtoError> {
    let Some((namespace, leaf)) = query.split_once(':') else {
        return Err(ProtoError::Malformed("metadata context query without a namespace"));
    };
    if namespace.is_empty() {
        return Err(ProtoError::Malformed("metadata context query with an empty namespace"));
    }
    let matches = available.iter().filter(|ctx| {
        let name = ctx.name();
        match name.split_once(':') {
            Some((ns, ctx_leaf)) if ns == namespace => (leaf.is_empty() && kind == QueryKind::List) || ctx_leaf == leaf,
            _ => false,
        }
    });
    Ok(matches.cloned().collect())
}

// ------------------------------------------------------------------------------------------------
// Transmission: requests and their validation
// ------------------------------------------------------------------------------------------------

/// A transmission command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    /// Any other type; answered with `NBD_EINVAL`.
    Unknown(u16),
}

impl Command {
    pub fn from_wire(v: u16) -> Command {
        match v {
            NBD_CMD_READ => Command::Read,
            NBD_CMD_WRITE => Command::Write,
            NBD_CMD_DISC => Command::Disc,
            NBD_CMD_FLUSH => Command::Flush,
            NBD_CMD_TRIM => Command::Trim,
            NBD_CMD_CACHE => Command::Cache,
            NBD_CMD_WRITE_ZEROES => Command::WriteZeroes,
            NBD_CMD_BLOCK_STATUS => Command::BlockStatus,
            other => Command::Unknown(other),
        }
    }

    pub fn to_wire(self) -> u16 {
        match self {
            Command::Read => NBD_CMD_READ,
            Command::Write => NBD_CMD_WRITE,
            Command::Disc => NBD_CMD_DISC,
            Command::Flush => NBD_CMD_FLUSH,
            Command::Trim => NBD_CMD_TRIM,
            Command::Cache => NBD_CMD_CACHE,
            Command::WriteZeroes => NBD_CMD_WRITE_ZEROES,
            Command::BlockStatus => NBD_CMD_BLOCK_STATUS,
            Command::Unknown(v) => v,
        }
    }

    /// Commands that modify the export (refused with `NBD_EPERM` on read-only exports).
    pub fn is_write(self) -> bool {
        matches!(self, Command::Write | Command::Trim | Command::WriteZeroes)
    }
}

/// A transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// `NBD_CMD_FLAG_*`.
    pub flags: u16,
    pub cmd: Command,
    /// Opaque; echoed in every reply to this request.
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl Request {
    /// Bytes of data that follow this header on the wire: the length for `NBD_CMD_WRITE`, 0
    /// otherwise. The server must consume them even when it rejects the request (or close
    /// the connection).
    pub fn payload_len(&self) -> u32 {
        if self.cmd == Command::Write {
            self.len
        } else {
            0
        }
    }

    /// Encodes the header. Client side (tests, fuzz seeds, test clients).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.cmd.to_wire().to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// Parses one request header from the start of `buf`; `Ok(None)` if fewer than
/// [`REQUEST_LEN`] bytes are available. Bytes after the header are not looked at.
pub fn parse_request(buf: &[u8]) -> Result<Option<Request>, ProtoError> {
    let Some(h) = buf.get(..REQUEST_LEN) else {
        return Ok(None);
    };
    let magic = be_u32(&h[0..4]);
    if magic != NBD_REQUEST_MAGIC {
        return Err(ProtoError::BadRequestMagic(magic));
    }
    Ok(Some(Request {
        flags: be_u16(&h[4..6]),
        cmd: Command::from_wire(be_u16(&h[6..8])),
        cookie: be_u64(&h[8..16]),
        offset: be_u64(&h[16..24]),
        len: be_u32(&h[24..28]),
    }))
}

/// What the handshake settled that request validation depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NegotiatedFlags {
    /// The transmission flags sent to the client.
    pub transmission_flags: u16,
    /// `NBD_OPT_STRUCTURED_REPLY` was acknowledged.
    pub structured_replies: bool,
    /// At least one metadata context is selected for this export.
    pub block_status: bool,
}

/// The transmission flags this server advertises for an export.
///
/// Writable exports get flush, FUA, trim, write-zeroes and fast-zero; read-only exports get
/// `NBD_FLAG_READ_ONLY` and none of the write-related flags. Every export is multi-conn safe
/// (one shared store behind all connections) and understands `NBD_CMD_CACHE`. `SEND_DF` is
/// only allowed once structured replies are negotiated.
pub fn transmission_flags(read_only: bool, structured_replies: bool) -> u16 {
    let mut f = NBD_FLAG_HAS_FLAGS | NBD_FLAG_CAN_MULTI_CONN | NBD_FLAG_SEND_CACHE;
    if read_only {
        f |= NBD_FLAG_READ_ONLY;
    } else {
        f |= NBD_FLAG_SEND_FLUSH
            | NBD_FLAG_SEND_FUA
            | NBD_FLAG_SEND_TRIM
            | NBD_FLAG_SEND_WRITE_ZEROES
            | NBD_FLAG_SEND_FAST_ZERO;
    }
    if structured_replies {
        f |= NBD_FLAG_SEND_DF;
    }
    f
}

/// Checks a request against the export and the negotiated features before any I/O.
///
/// Returns the NBD error to reply with. The rules, from the specification:
///
/// * `NBD_CMD_DISC` is never answered, so it always passes.
/// * Unknown commands, and commands whose transmission flag was not advertised (flush, trim,
///   write-zeroes; block status without a selected metadata context): `NBD_EINVAL`.
///   `NBD_CMD_CACHE` is accepted regardless, as some clients send it unadvertised.
/// * Write-type commands (write, trim, write-zeroes) on a read-only export: `NBD_EPERM`.
/// * Unknown command flags, or flags not documented for the command, or not enabled by a
///   transmission flag: `NBD_EINVAL`. FUA is valid on every command once
///   `NBD_FLAG_SEND_FUA` was advertised (the server "MUST accept all commands with this bit
///   set"); DF only on reads with `NBD_FLAG_SEND_DF`; NO_HOLE and FAST_ZERO (with
///   `NBD_FLAG_SEND_FAST_ZERO`) only on write-zeroes; REQ_ONE only on block status.
/// * Flush with a nonzero offset or length: `NBD_EINVAL` (both are reserved, must be zero).
/// * Lengths above `max_len` (the advertised maximum block size) for read and write:
///   `NBD_EINVAL`. The specification also holds cache and write-zeroes without FAST_ZERO to
///   it, but leaves refusing them to the server (SHOULD): we serve them, as clients (nbdcopy,
///   qemu) send them over larger ranges and they carry no payload. Trim, fast write-zeroes
///   and block status may exceed it anyway.
/// * Zero-length block status: `NBD_EINVAL` (no valid non-empty descriptor could answer it
///   under REQ_ONE; the specification leaves the behaviour to the server).
/// * Ranges past the end of the export: `NBD_ENOSPC` for write and write-zeroes, `NBD_EINVAL`
///   otherwise.
///
/// `NBD_EOVERFLOW` is never produced: it is reserved for DF reads too large to send in one
/// chunk, and every read up to `max_len` fits in one `NBD_REPLY_TYPE_OFFSET_DATA` chunk
/// (`max_len` must stay ≤ [`MAX_OFFSET_DATA_LEN`]).
pub fn validate_request(
    req: &Request,
    export_size: u64,
    max_len: u32,
    read_only: bool,
    negotiated: &NegotiatedFlags,
) -> Result<(), u32> {
    let tf = negotiated.transmission_flags;
    let advertised = |flag: u16| tf & flag != 0;
    let when = |cond: bool, flag: u16| if cond { flag } else { 0 };

    // (command is enabled, command flags it accepts besides FUA)
    let (enabled, extra_flags) = match req.cmd {
        Command::Disc => return Ok(()),
        Command::Unknown(_) => return Err(NBD_EINVAL),
        Command::Read => (true, when(advertised(NBD_FLAG_SEND_DF), NBD_CMD_FLAG_DF)),
        Command::Write => (true, 0),
        Command::Flush => (advertised(NBD_FLAG_SEND_FLUSH), 0),
        Command::Trim => (advertised(NBD_FLAG_SEND_TRIM), 0),
        Command::Cache => (true, 0),
        Command::WriteZeroes => (
            advertised(NBD_FLAG_SEND_WRITE_ZEROES),
            NBD_CMD_FLAG_NO_HOLE | when(advertised(NBD_FLAG_SEND_FAST_ZERO), NBD_CMD_FLAG_FAST_ZERO),
        ),
        Command::BlockStatus => (negotiated.structured_replies && negotiated.block_status, NBD_CMD_FLAG_REQ_ONE),
    };

    // Read-only first: a write-type command on a read-only export fails with EPERM even
    // though its transmission flag was (correctly) not advertised.
    if read_only && req.cmd.is_write() {
        return Err(NBD_EPERM);
    }
    let allowed = extra_flags | when(advertised(NBD_FLAG_SEND_FUA), NBD_CMD_FLAG_FUA);
    if req.flags & !allowed != 0 || !enabled {
        return Err(NBD_EINVAL);
    }

    let capped = match req.cmd {
        Command::Flush => {
            if req.offset != 0 || req.len != 0 {
                return Err(NBD_EINVAL);
            }
            return Ok(());
        }
        // Only commands that move a payload are held to the maximum block size: clients
        // (nbdcopy, qemu) send WRITE_ZEROES, TRIM and CACHE over much larger ranges, and we
        // serve those without buffering anything.
        Command::Read | Command::Write => true,
        Command::BlockStatus => {
            if req.len == 0 {
                return Err(NBD_EINVAL);
            }
            false
        }
        _ => false,
    };
    if capped && req.len > max_len {
        return Err(NBD_EINVAL);
    }

    let in_bounds = req.offset.checked_add(u64::from(req.len)).is_some_and(|end| end <= export_size);
    if !in_bounds {
        return Err(match req.cmd {
            Command::Write | Command::WriteZeroes => NBD_ENOSPC,
            _ => NBD_EINVAL,
        });
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Transmission: reply encoders
// ------------------------------------------------------------------------------------------------

fn done_flag(done: bool) -> u16 {
    if done {
        NBD_REPLY_FLAG_DONE
    } else {
        0
    }
}

/// Fills `out[..SIMPLE_REPLY_LEN]` with a simple reply header.
///
/// # Panics
/// If `out` is shorter than [`SIMPLE_REPLY_LEN`].
pub fn write_simple_reply(out: &mut [u8], error: u32, cookie: u64) {
    let out = &mut out[..SIMPLE_REPLY_LEN];
    out[0..4].copy_from_slice(&NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
}

/// Appends a simple reply header.
pub fn push_simple_reply(out: &mut Vec<u8>, error: u32, cookie: u64) {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    write_simple_reply(&mut b, error, cookie);
    out.extend_from_slice(&b);
}

/// Fills `out[..STRUCTURED_REPLY_HEADER_LEN]` with a structured reply chunk header.
///
/// # Panics
/// If `out` is shorter than [`STRUCTURED_REPLY_HEADER_LEN`].
pub fn write_structured_header(out: &mut [u8], flags: u16, kind: u16, cookie: u64, length: u32) {
    let out = &mut out[..STRUCTURED_REPLY_HEADER_LEN];
    out[0..4].copy_from_slice(&NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..20].copy_from_slice(&length.to_be_bytes());
}

/// Appends a structured reply chunk header.
pub fn push_structured_header(out: &mut Vec<u8>, flags: u16, kind: u16, cookie: u64, length: u32) {
    let mut b = [0u8; STRUCTURED_REPLY_HEADER_LEN];
    write_structured_header(&mut b, flags, kind, cookie, length);
    out.extend_from_slice(&b);
}

/// Fills `out[..OFFSET_DATA_HEADER_LEN]` with the header of an `NBD_REPLY_TYPE_OFFSET_DATA`
/// chunk carrying `data_len` bytes read from `offset`; the caller places the data right after
/// (typically it reads into `buf[OFFSET_DATA_HEADER_LEN..]` and sends the whole buffer).
///
/// Use `done = true` only if no error can be detected any more while the chunk is sent.
///
/// # Panics
/// If `out` is shorter than [`OFFSET_DATA_HEADER_LEN`], or `data_len` is above
/// [`MAX_OFFSET_DATA_LEN`] (impossible for validated requests).
pub fn write_offset_data_header(out: &mut [u8], done: bool, cookie: u64, offset: u64, data_len: u32) {
    assert!(data_len <= MAX_OFFSET_DATA_LEN, "OFFSET_DATA chunk too large");
    let out = &mut out[..OFFSET_DATA_HEADER_LEN];
    write_structured_header(out, done_flag(done), NBD_REPLY_TYPE_OFFSET_DATA, cookie, data_len + 8);
    out[20..28].copy_from_slice(&offset.to_be_bytes());
}

/// Appends a complete `NBD_REPLY_TYPE_OFFSET_DATA` chunk (header and data).
///
/// # Panics
/// If `data` is longer than [`MAX_OFFSET_DATA_LEN`].
pub fn push_offset_data(out: &mut Vec<u8>, done: bool, cookie: u64, offset: u64, data: &[u8]) {
    let len =
        u32::try_from(data.len()).ok().filter(|l| *l <= MAX_OFFSET_DATA_LEN).expect("OFFSET_DATA chunk too large");
    let mut b = [0u8; OFFSET_DATA_HEADER_LEN];
    write_offset_data_header(&mut b, done, cookie, offset, len);
    out.extend_from_slice(&b);
    out.extend_from_slice(data);
}

/// Appends an `NBD_REPLY_TYPE_OFFSET_HOLE` chunk: `hole_len` (nonzero) bytes at `offset` read
/// as zeroes. Not allowed in the reply to a read with `NBD_CMD_FLAG_DF`.
pub fn push_offset_hole(out: &mut Vec<u8>, done: bool, cookie: u64, offset: u64, hole_len: u32) {
    debug_assert!(hole_len != 0, "hole size must be nonzero");
    push_structured_header(out, done_flag(done), NBD_REPLY_TYPE_OFFSET_HOLE, cookie, 12);
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&hole_len.to_be_bytes());
}

/// Fills `out[..NONE_CHUNK_LEN]` with the final `NBD_REPLY_TYPE_NONE` chunk (flag DONE).
///
/// # Panics
/// If `out` is shorter than [`NONE_CHUNK_LEN`].
pub fn write_none_done(out: &mut [u8], cookie: u64) {
    write_structured_header(out, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, cookie, 0);
}

/// Appends the final `NBD_REPLY_TYPE_NONE` chunk (flag DONE).
pub fn push_none_done(out: &mut Vec<u8>, cookie: u64) {
    push_structured_header(out, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, cookie, 0);
}

/// Appends an `NBD_REPLY_TYPE_ERROR` chunk: u32 error, u16 message length, message.
///
/// The message is truncated to the specification's 4096-byte limit; an `error` of 0 (which
/// the specification forbids in error chunks) is sent as `NBD_EIO`.
pub fn push_error_chunk(out: &mut Vec<u8>, done: bool, cookie: u64, error: u32, message: &str) {
    let message = truncate_str(message, MAX_STRING_LEN);
    let len = 6 + len_u32(message.len());
    push_structured_header(out, done_flag(done), NBD_REPLY_TYPE_ERROR, cookie, len);
    push_error_body(out, error, message);
}

/// Appends an `NBD_REPLY_TYPE_ERROR_OFFSET` chunk: u32 error, u16 message length, message,
/// u64 offset (which must lie within the request). Same message/error rules as
/// [`push_error_chunk`].
pub fn push_error_offset_chunk(out: &mut Vec<u8>, done: bool, cookie: u64, error: u32, message: &str, offset: u64) {
    let message = truncate_str(message, MAX_STRING_LEN);
    let len = 14 + len_u32(message.len());
    push_structured_header(out, done_flag(done), NBD_REPLY_TYPE_ERROR_OFFSET, cookie, len);
    push_error_body(out, error, message);
    out.extend_from_slice(&offset.to_be_bytes());
}

fn push_error_body(out: &mut Vec<u8>, error: u32, message: &str) {
    let error = if error == 0 { NBD_EIO } else { error };
    out.extend_from_slice(&error.to_be_bytes());
    // ≤ 4096 after truncation, so it fits in u16.
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message.as_bytes());
}

/// One block status descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes; must be nonzero.
    pub length: u32,
    /// Status flags as defined by the context (`NBD_STATE_*` for `base:allocation`).
    pub flags: u32,
}

/// Most descriptors one `NBD_REPLY_TYPE_BLOCK_STATUS` chunk can hold (its 32-bit length counts
/// 4 bytes of context id plus 8 per descriptor).
pub const MAX_BLOCK_STATUS_EXTENTS: usize = ((u32::MAX - 4) / 8) as usize;

/// Appends an `NBD_REPLY_TYPE_BLOCK_STATUS` chunk: u32 context id, then (u32 length, u32
/// flags) per extent. `extents` must not be empty; with `NBD_CMD_FLAG_REQ_ONE` it must hold
/// exactly one extent no longer than the request.
///
/// Extents past [`MAX_BLOCK_STATUS_EXTENTS`] are dropped, which the specification allows
/// (a reply may describe less than was asked for).
pub fn push_block_status_chunk(out: &mut Vec<u8>, done: bool, cookie: u64, context_id: u32, extents: &[Extent]) {
    debug_assert!(!extents.is_empty(), "a block status chunk needs a descriptor");
    let extents = &extents[..extents.len().min(MAX_BLOCK_STATUS_EXTENTS)];
    let len = 4 + 8 * len_u32(extents.len());
    push_structured_header(out, done_flag(done), NBD_REPLY_TYPE_BLOCK_STATUS, cookie, len);
    out.reserve(len as usize);
    out.extend_from_slice(&context_id.to_be_bytes());
    for e in extents {
        debug_assert!(e.length != 0, "block status descriptors must be nonzero");
        out.extend_from_slice(&e.length.to_be_bytes());
        out.extend_from_slice(&e.flags.to_be_bytes());
    }
}

/// A transmission reply header as a client sees it (client side: tests and test clients).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple { error: u32, cookie: u64 },
    Structured { flags: u16, kind: u16, cookie: u64, length: u32 },
}

impl ReplyHeader {
    /// Bytes this header occupies on the wire.
    pub fn wire_len(&self) -> usize {
        match self {
            ReplyHeader::Simple { .. } => SIMPLE_REPLY_LEN,
            ReplyHeader::Structured { .. } => STRUCTURED_REPLY_HEADER_LEN,
        }
    }
}

/// Parses a simple or structured reply header from the start of `buf`; `Ok(None)` if more
/// bytes are needed.
pub fn parse_reply_header(buf: &[u8]) -> Result<Option<ReplyHeader>, ProtoError> {
    let Some(m) = buf.get(..4) else {
        return Ok(None);
    };
    match be_u32(m) {
        NBD_SIMPLE_REPLY_MAGIC => Ok(buf
            .get(..SIMPLE_REPLY_LEN)
            .map(|h| ReplyHeader::Simple { error: be_u32(&h[4..8]), cookie: be_u64(&h[8..16]) })),
        NBD_STRUCTURED_REPLY_MAGIC => Ok(buf.get(..STRUCTURED_REPLY_HEADER_LEN).map(|h| ReplyHeader::Structured {
            flags: be_u16(&h[4..6]),
            kind: be_u16(&h[6..8]),
            cookie: be_u64(&h[8..16]),
            length: be_u32(&h[16..20]),
        })),
        other => Err(ProtoError::BadReplyMagic(other)),
    }
}

// ------------------------------------------------------------------------------------------------
// Tests
// ------------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SIZE: u64 = 1 << 30;
    const MAX: u32 = 32 << 20;

    fn rw(structured: bool) -> NegotiatedFlags {
        NegotiatedFlags {
            transmission_flags: transmission_flags(false, structured),
            structured_replies: structured,
            block_status: structured,
        }
    }

    fn ro() -> NegotiatedFlags {
        NegotiatedFlags {
            transmission_flags: transmission_flags(true, false),
            structured_replies: false,
            block_status: false,
        }
    }

    fn req(cmd: Command, flags: u16, offset: u64, len: u32) -> Request {
        Request { flags, cmd, cookie: 0x0102_0304_0506_0708, offset, len }
    }

    fn check(r: Request, read_only: bool, n: NegotiatedFlags) -> Result<(), u32> {
        validate_request(&r, SIZE, MAX, read_only, &n)
    }

    #[test]
    fn magics_spell_their_names() {
        assert_eq!(&NBD_MAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&NBD_OPTS_MAGIC.to_be_bytes(), b"IHAVEOPT");
        assert_eq!(NBD_REP_MAGIC, 0x3e889045565a9);
        assert_eq!(NBD_REP_ERR_TOO_BIG, 0x8000_0009);
        assert_eq!(NBD_REPLY_TYPE_ERROR, 0x8001);
    }

    #[test]
    fn parse_request_exact_bytes() {
        let bytes = [
            0x25, 0x60, 0x95, 0x13, // magic
            0x00, 0x01, // flags: FUA
            0x00, 0x01, // type: write
            1, 2, 3, 4, 5, 6, 7, 8, // cookie
            0, 0, 0, 0, 0, 0, 0x10, 0, // offset 4096
            0, 0, 0x02, 0,    // length 512
            0xaa, // first payload byte, must be ignored
        ];
        let r = parse_request(&bytes).unwrap().unwrap();
        assert_eq!(r, req(Command::Write, NBD_CMD_FLAG_FUA, 4096, 512));
        assert_eq!(r.payload_len(), 512);
        assert_eq!(&r.encode()[..], &bytes[..REQUEST_LEN]);
    }

    #[test]
    fn parse_request_short_and_bad_magic() {
        let good = req(Command::Read, 0, 0, 1).encode();
        for n in 0..REQUEST_LEN {
            assert_eq!(parse_request(&good[..n]), Ok(None));
        }
        let mut bad = good;
        bad[0] = 0x26;
        assert_eq!(parse_request(&bad), Err(ProtoError::BadRequestMagic(0x2660_9513)));
        // Extended headers were never negotiated: their magic is just a bad magic.
        let mut ext = good;
        ext[0..4].copy_from_slice(&NBD_EXTENDED_REQUEST_MAGIC.to_be_bytes());
        assert!(parse_request(&ext).is_err());
    }

    #[test]
    fn command_codes_round_trip() {
        for v in 0..=20u16 {
            assert_eq!(Command::from_wire(v).to_wire(), v);
        }
        assert_eq!(Command::from_wire(NBD_CMD_RESIZE), Command::Unknown(8));
        assert_eq!(Command::from_wire(6), Command::WriteZeroes);
        assert_eq!(Command::from_wire(7), Command::BlockStatus);
    }

    #[test]
    fn validate_accepts_ordinary_requests() {
        let n = rw(false);
        assert_eq!(check(req(Command::Read, 0, 0, 4096), false, n), Ok(()));
        assert_eq!(check(req(Command::Read, 0, SIZE - 1, 1), false, n), Ok(()));
        assert_eq!(check(req(Command::Write, NBD_CMD_FLAG_FUA, 0, MAX), false, n), Ok(()));
        assert_eq!(check(req(Command::Flush, 0, 0, 0), false, n), Ok(()));
        // Trim is not capped by the maximum block size (its length is no payload).
        let r = req(Command::Trim, NBD_CMD_FLAG_FUA, 0, MAX + 1);
        assert_eq!(check(r, false, n), Ok(()));
        assert_eq!(check(req(Command::Cache, 0, 0, 4096), false, n), Ok(()));
        let wz = NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FUA;
        assert_eq!(check(req(Command::WriteZeroes, wz, 0, MAX), false, n), Ok(()));
        // Fast zero is not capped by the maximum block size.
        let fz = NBD_CMD_FLAG_FAST_ZERO;
        assert_eq!(check(req(Command::WriteZeroes, fz, 0, MAX + 1), false, n), Ok(()));
        // Zero-length reads/writes are unspecified but must not kill the connection.
        assert_eq!(check(req(Command::Read, 0, SIZE, 0), false, n), Ok(()));
        // Disconnect is never answered.
        assert_eq!(check(req(Command::Disc, 0xffff, 1, 1), false, n), Ok(()));
    }

    #[test]
    fn validate_fua_is_valid_on_every_command_when_advertised() {
        let n = rw(true);
        for cmd in [Command::Read, Command::Cache, Command::Flush, Command::BlockStatus] {
            let len = if cmd == Command::Flush { 0 } else { 512 };
            assert_eq!(check(req(cmd, NBD_CMD_FLAG_FUA, 0, len), false, n), Ok(()), "{cmd:?}");
        }
        // Not advertised on read-only exports, hence invalid there.
        assert_eq!(check(req(Command::Read, NBD_CMD_FLAG_FUA, 0, 1), true, ro()), Err(NBD_EINVAL));
    }

    #[test]
    fn validate_unknown_commands_and_flags() {
        let n = rw(true);
        assert_eq!(check(req(Command::Unknown(8), 0, 0, 0), false, n), Err(NBD_EINVAL));
        assert_eq!(check(req(Command::Unknown(0xffff), 0, 0, 0), false, n), Err(NBD_EINVAL));
        for bit in 5..16 {
            let r = req(Command::Read, 1 << bit, 0, 1);
            assert_eq!(check(r, false, n), Err(NBD_EINVAL), "bit {bit}");
        }
        // Flags documented for another command.
        let cases = [
            (Command::Read, NBD_CMD_FLAG_NO_HOLE),
            (Command::Read, NBD_CMD_FLAG_REQ_ONE),
            (Command::Read, NBD_CMD_FLAG_FAST_ZERO),
            (Command::Write, NBD_CMD_FLAG_DF),
            (Command::Write, NBD_CMD_FLAG_NO_HOLE),
            (Command::Trim, NBD_CMD_FLAG_NO_HOLE),
            (Command::WriteZeroes, NBD_CMD_FLAG_DF),
            (Command::BlockStatus, NBD_CMD_FLAG_DF),
            (Command::Cache, NBD_CMD_FLAG_REQ_ONE),
            (Command::Read, NBD_CMD_FLAG_PAYLOAD_LEN),
        ];
        for (cmd, flag) in cases {
            assert_eq!(check(req(cmd, flag, 0, 1), false, n), Err(NBD_EINVAL), "{cmd:?}");
        }
        // DF only once structured replies (and so SEND_DF) are negotiated.
        assert_eq!(check(req(Command::Read, NBD_CMD_FLAG_DF, 0, 1), false, n), Ok(()));
        let plain = rw(false);
        let r = req(Command::Read, NBD_CMD_FLAG_DF, 0, 1);
        assert_eq!(check(r, false, plain), Err(NBD_EINVAL));
        // FAST_ZERO only when advertised.
        let mut no_fast = plain;
        no_fast.transmission_flags &= !NBD_FLAG_SEND_FAST_ZERO;
        let r = req(Command::WriteZeroes, NBD_CMD_FLAG_FAST_ZERO, 0, 1);
        assert_eq!(check(r, false, no_fast), Err(NBD_EINVAL));
    }

    #[test]
    fn validate_unadvertised_commands() {
        let none =
            NegotiatedFlags { transmission_flags: NBD_FLAG_HAS_FLAGS, structured_replies: false, block_status: false };
        assert_eq!(check(req(Command::Flush, 0, 0, 0), false, none), Err(NBD_EINVAL));
        assert_eq!(check(req(Command::Trim, 0, 0, 1), false, none), Err(NBD_EINVAL));
        assert_eq!(check(req(Command::WriteZeroes, 0, 0, 1), false, none), Err(NBD_EINVAL));
        // Cache is accepted even unadvertised (known clients send it anyway).
        assert_eq!(check(req(Command::Cache, 0, 0, 1), false, none), Ok(()));
        // Block status needs a selected context.
        let mut sr = rw(true);
        sr.block_status = false;
        assert_eq!(check(req(Command::BlockStatus, 0, 0, 1), false, sr), Err(NBD_EINVAL));
        assert_eq!(check(req(Command::BlockStatus, 0, 0, 1), false, rw(true)), Ok(()));
    }

    #[test]
    fn validate_read_only() {
        let n = ro();
        assert_eq!(check(req(Command::Write, 0, 0, 1), true, n), Err(NBD_EPERM));
        assert_eq!(check(req(Command::Trim, 0, 0, 1), true, n), Err(NBD_EPERM));
        assert_eq!(check(req(Command::WriteZeroes, 0, 0, 1), true, n), Err(NBD_EPERM));
        // EPERM wins over the (also wrong) FUA flag: it is the more useful answer.
        let r = req(Command::Write, NBD_CMD_FLAG_FUA, 0, 1);
        assert_eq!(check(r, true, n), Err(NBD_EPERM));
        assert_eq!(check(req(Command::Read, 0, 0, 1), true, n), Ok(()));
        assert_eq!(check(req(Command::Cache, 0, 0, 1), true, n), Ok(()));
        // No flush advertised on read-only exports.
        assert_eq!(check(req(Command::Flush, 0, 0, 0), true, n), Err(NBD_EINVAL));
    }

    #[test]
    fn validate_lengths_and_bounds() {
        let n = rw(true);
        assert_eq!(check(req(Command::Read, 0, 0, MAX + 1), false, n), Err(NBD_EINVAL));
        assert_eq!(check(req(Command::Write, 0, 0, MAX + 1), false, n), Err(NBD_EINVAL));
        // Commands without a payload are not held to the maximum block size: only bounds apply.
        assert_eq!(check(req(Command::Cache, 0, 0, MAX + 1), false, n), Ok(()));
        assert_eq!(check(req(Command::WriteZeroes, 0, 0, MAX + 1), false, n), Ok(()));
        assert_eq!(check(req(Command::Trim, 0, 0, MAX + 1), false, n), Ok(()));
        assert_eq!(check(req(Command::BlockStatus, 0, 0, MAX + 1), false, n), Ok(()));
        assert_eq!(check(req(Command::BlockStatus, 0, 0, 0), false, n), Err(NBD_EINVAL));

        // Past the end: ENOSPC for writes, EINVAL otherwise.
        assert_eq!(check(req(Command::Write, 0, SIZE - 1, 2), false, n), Err(NBD_ENOSPC));
        assert_eq!(check(req(Command::WriteZeroes, 0, SIZE, 1), false, n), Err(NBD_ENOSPC));
        assert_eq!(check(req(Command::Read, 0, SIZE - 1, 2), false, n), Err(NBD_EINVAL));
        assert_eq!(check(req(Command::Trim, 0, SIZE, 1), false, n), Err(NBD_EINVAL));
        assert_eq!(check(req(Command::Cache, 0, SIZE, 1), false, n), Err(NBD_EINVAL));
        assert_eq!(check(req(Command::BlockStatus, 0, SIZE, 1), false, n), Err(NBD_EINVAL));
        assert_eq!(check(req(Command::Read, 0, SIZE + 1, 0), false, n), Err(NBD_EINVAL));
        // offset + len overflowing u64.
        let r = req(Command::Read, 0, u64::MAX, 2);
        assert_eq!(check(r, false, n), Err(NBD_EINVAL));

        // Flush: offset and length are reserved.
        assert_eq!(check(req(Command::Flush, 0, 1, 0), false, n), Err(NBD_EINVAL));
        assert_eq!(check(req(Command::Flush, 0, 0, 1), false, n), Err(NBD_EINVAL));
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(nbd_errno(libc::EPERM), 1);
        assert_eq!(nbd_errno(libc::EROFS), 1);
        assert_eq!(nbd_errno(libc::EIO), 5);
        assert_eq!(nbd_errno(libc::ENOMEM), 12);
        assert_eq!(nbd_errno(libc::EINVAL), 22);
        assert_eq!(nbd_errno(libc::ENOSPC), 28);
        assert_eq!(nbd_errno(libc::EDQUOT), 28);
        assert_eq!(nbd_errno(libc::EFBIG), 28);
        assert_eq!(nbd_errno(libc::EOVERFLOW), 75);
        assert_eq!(nbd_errno(libc::ENOTSUP), 95);
        assert_eq!(nbd_errno(libc::EOPNOTSUPP), 95);
        assert_eq!(nbd_errno(libc::ESHUTDOWN), 108);
        assert_eq!(nbd_errno(libc::ENOENT), 5);
        assert_eq!(nbd_errno(0), 5);
        assert_eq!(nbd_errno(-1), 5);
    }

    #[test]
    fn simple_reply_bytes() {
        let mut buf = [0xffu8; SIMPLE_REPLY_LEN + 4];
        write_simple_reply(&mut buf, NBD_EINVAL, 0x1122_3344_5566_7788);
        assert_eq!(
            buf,
            [
                0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0xff, 0xff, 0xff,
                0xff
            ]
        );
        let mut v = Vec::new();
        push_simple_reply(&mut v, NBD_EINVAL, 0x1122_3344_5566_7788);
        assert_eq!(&v[..], &buf[..SIMPLE_REPLY_LEN]);
        assert_eq!(parse_reply_header(&v), Ok(Some(ReplyHeader::Simple { error: 22, cookie: 0x1122_3344_5566_7788 })));
    }

    #[test]
    fn offset_data_header_bytes() {
        let mut buf = vec![0u8; OFFSET_DATA_HEADER_LEN + 3];
        buf[OFFSET_DATA_HEADER_LEN..].copy_from_slice(b"abc");
        write_offset_data_header(&mut buf, true, 7, 0x1000, 3);
        let expected: Vec<u8> = [
            &[0x66, 0x8e, 0x33, 0xef][..], // magic
            &[0, 1],                       // flags: DONE
            &[0, 1],                       // type: OFFSET_DATA
            &[0, 0, 0, 0, 0, 0, 0, 7],     // cookie
            &[0, 0, 0, 11],                // length: 8 + 3
            &[0, 0, 0, 0, 0, 0, 0x10, 0],  // offset
            b"abc",
        ]
        .concat();
        assert_eq!(buf, expected);
        let mut v = Vec::new();
        push_offset_data(&mut v, true, 7, 0x1000, b"abc");
        assert_eq!(v, expected);
    }

    #[test]
    fn none_hole_error_and_block_status_chunks() {
        let mut v = Vec::new();
        push_none_done(&mut v, 9);
        let mut fixed = [0u8; NONE_CHUNK_LEN];
        write_none_done(&mut fixed, 9);
        assert_eq!(v, fixed);
        assert_eq!(v, [0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0]);

        let mut v = Vec::new();
        push_offset_hole(&mut v, false, 9, 512, 4096);
        assert_eq!(v.len(), OFFSET_HOLE_CHUNK_LEN);
        assert_eq!(&v[4..8], &[0, 0, 0, 2]);
        assert_eq!(&v[16..], &[0, 0, 0, 12, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0x10, 0]);

        let mut v = Vec::new();
        push_error_chunk(&mut v, true, 9, NBD_EIO, "bad");
        assert_eq!(&v[4..8], &[0, 1, 0x80, 0x01]);
        assert_eq!(&v[16..20], &[0, 0, 0, 9]);
        assert_eq!(&v[20..], &[0, 0, 0, 5, 0, 3, b'b', b'a', b'd']);

        // Error 0 is not allowed in an error chunk; long messages are cut at 4096 bytes on
        // a character boundary.
        let mut v = Vec::new();
        let long = "é".repeat(3000);
        push_error_offset_chunk(&mut v, true, 9, 0, &long, 42);
        let msg_len = u16::from_be_bytes([v[24], v[25]]) as usize;
        assert_eq!(msg_len, 4096);
        assert_eq!(&v[20..24], &[0, 0, 0, 5]);
        assert_eq!(be_u32(&v[16..20]) as usize, 14 + msg_len);
        assert_eq!(v.len(), 20 + 14 + msg_len);
        assert!(std::str::from_utf8(&v[26..26 + msg_len]).is_ok());
        assert_eq!(&v[v.len() - 8..], &42u64.to_be_bytes());

        let mut v = Vec::new();
        let extents =
            [Extent { length: 4096, flags: NBD_STATE_HOLE | NBD_STATE_ZERO }, Extent { length: 512, flags: 0 }];
        push_block_status_chunk(&mut v, true, 9, 1, &extents);
        assert_eq!(&v[4..8], &[0, 1, 0, 5]);
        assert_eq!(&v[16..20], &[0, 0, 0, 20]);
        assert_eq!(&v[20..], &[0, 0, 0, 1, 0, 0, 0x10, 0, 0, 0, 0, 3, 0, 0, 2, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn info_request_parsing() {
        let data = encode_info_request("vol", &[NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME]);
        assert_eq!(data, [0, 0, 0, 3, b'v', b'o', b'l', 0, 2, 0, 3, 0, 1]);
        assert_eq!(parse_info_request(&data), Ok(InfoRequest { name: "vol", info: vec![3, 1] }));
        // Every truncation and any trailing byte is malformed.
        for n in 0..data.len() {
            assert!(parse_info_request(&data[..n]).is_err(), "{n}");
        }
        let mut long = data.clone();
        long.push(0);
        assert!(parse_info_request(&long).is_err());
        // Name length pointing past the data.
        assert!(parse_info_request(&[0xff, 0xff, 0xff, 0xff, 0, 0]).is_err());
        // Not UTF-8 / contains NUL.
        assert!(parse_info_request(&[0, 0, 0, 1, 0xff, 0, 0]).is_err());
        assert!(parse_info_request(&[0, 0, 0, 1, 0, 0, 0]).is_err());
        // Empty name is the default export and is syntactically fine.
        assert_eq!(parse_info_request(&[0, 0, 0, 0, 0, 0]), Ok(InfoRequest { name: "", info: vec![] }));
    }

    #[test]
    fn meta_context_request_parsing() {
        let data = encode_meta_context_request("vol", &["base:allocation", "x-foo:"]);
        let parsed = parse_meta_context_request(&data).unwrap();
        assert_eq!(parsed.export, "vol");
        assert_eq!(parsed.queries, vec!["base:allocation", "x-foo:"]);
        for n in 0..data.len() {
            assert!(parse_meta_context_request(&data[..n]).is_err(), "{n}");
        }
        let mut long = data.clone();
        long.push(0);
        assert!(parse_meta_context_request(&long).is_err());
        // A huge query count with no data behind it fails without allocating for it.
        assert!(parse_meta_context_request(&[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn meta_query_matching() {
        let all = MetaContext::all();
        let base = vec![MetaContext::BaseAllocation];
        let m = |q, k| match_meta_query(q, k, &all);
        assert_eq!(m("base:allocation", QueryKind::Set), Ok(base.clone()));
        assert_eq!(m("base:allocation", QueryKind::List), Ok(base.clone()));
        assert_eq!(m("base:", QueryKind::List), Ok(base.clone()));
        assert_eq!(m("base:", QueryKind::Set), Ok(vec![]));
        assert_eq!(m("base:other", QueryKind::Set), Ok(vec![]));
        assert_eq!(m("qemu:dirty-bitmap:x", QueryKind::Set), Ok(vec![]));
        assert_eq!(m("x-foo:", QueryKind::List), Ok(vec![]));
        assert!(m("nocolon", QueryKind::List).is_err());
        assert!(m(":allocation", QueryKind::Set).is_err());
    }

    #[test]
    fn option_reply_encoders() {
        let mut v = Vec::new();
        push_info_export(&mut v, NBD_OPT_GO, 0x1_0000_0000, 0x0d6d);
        assert_eq!(
            v,
            [
                0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, // magic
                0, 0, 0, 7, // option
                0, 0, 0, 3, // NBD_REP_INFO
                0, 0, 0, 12, // length
                0, 0, // NBD_INFO_EXPORT
                0, 0, 0, 1, 0, 0, 0, 0, // size
                0x0d, 0x6d, // flags
            ]
        );
        let h = parse_option_reply_header(&v).unwrap().unwrap();
        assert_eq!(h, OptionReplyHeader { option: NBD_OPT_GO, reply: NBD_REP_INFO, len: 12 });
        let mut v = Vec::new();
        push_export_name_reply(&mut v, 512, 1, false);
        assert_eq!(v.len(), EXPORT_NAME_REPLY_LEN + EXPORT_NAME_ZEROES);
        let mut v = Vec::new();
        push_export_name_reply(&mut v, 512, 1, true);
        assert_eq!(v, [0, 0, 0, 0, 0, 0, 2, 0, 0, 1]);
    }

    #[test]
    fn transmission_flag_sets() {
        let rw = transmission_flags(false, false);
        assert_eq!(rw & NBD_FLAG_READ_ONLY, 0);
        assert_eq!(rw & NBD_FLAG_SEND_DF, 0);
        for f in [
            NBD_FLAG_HAS_FLAGS,
            NBD_FLAG_SEND_FLUSH,
            NBD_FLAG_SEND_FUA,
            NBD_FLAG_SEND_TRIM,
            NBD_FLAG_SEND_WRITE_ZEROES,
            NBD_FLAG_SEND_FAST_ZERO,
            NBD_FLAG_CAN_MULTI_CONN,
            NBD_FLAG_SEND_CACHE,
        ] {
            assert_ne!(rw & f, 0, "{f:#x}");
        }
        assert_eq!(transmission_flags(false, true), rw | NBD_FLAG_SEND_DF);
        assert_eq!(
            transmission_flags(true, false),
            NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY | NBD_FLAG_CAN_MULTI_CONN | NBD_FLAG_SEND_CACHE
        );
    }

    proptest! {
        #[test]
        fn parse_request_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(Some(r)) = parse_request(&bytes) {
                prop_assert_eq!(&r.encode()[..], &bytes[..REQUEST_LEN]);
            }
        }

        #[test]
        fn validate_never_panics(
            flags in any::<u16>(),
            cmd in 0u16..12,
            offset in prop_oneof![any::<u64>(), 0u64..(2 << 30)],
            len in any::<u32>(),
            size in any::<u64>(),
            read_only in any::<bool>(),
            structured in any::<bool>(),
            block_status in any::<bool>(),
        ) {
            let r = Request { flags, cmd: Command::from_wire(cmd), cookie: 1, offset, len };
            let n = NegotiatedFlags {
                transmission_flags: transmission_flags(read_only, structured),
                structured_replies: structured,
                block_status: structured && block_status,
            };
            match validate_request(&r, size, MAX, read_only, &n) {
                Ok(()) if r.cmd != Command::Disc => {
                    // Anything accepted is within the export and (where capped) the limit.
                    prop_assert!(offset.checked_add(u64::from(len)).is_some_and(|e| e <= size));
                    if matches!(r.cmd, Command::Read | Command::Write | Command::Cache) {
                        prop_assert!(len <= MAX);
                    }
                    prop_assert!(!(read_only && r.cmd.is_write()));
                }
                Ok(()) => {}
                Err(e) => prop_assert!([NBD_EPERM, NBD_EINVAL, NBD_ENOSPC].contains(&e)),
            }
        }

        #[test]
        fn option_parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_info_request(&bytes);
            let _ = parse_meta_context_request(&bytes);
            let _ = parse_reply_header(&bytes);
            let _ = parse_option_reply_header(&bytes);
        }
    }
}
