//! The fixed-newstyle NBD handshake (option haggling), over any blocking `Read + Write`.
//!
//! [`handshake`] sends the greeting, reads the client flags, then answers options until the
//! client enters transmission (`NBD_OPT_GO` acknowledged, or `NBD_OPT_EXPORT_NAME` answered),
//! soft-disconnects (`NBD_OPT_ABORT`) or goes away. The caller owns the socket and its
//! timeouts; this module only promises never to block on anything but the stream, never to
//! allocate more than [`MAX_OPTION_LEN`] for client data, and never to panic on client input.
//!
//! I/O discipline:
//! * Reads are exact (`read_exact`-style) and never read ahead: after a successful handshake
//!   the next byte in the stream is the first byte of the first transmission request, which
//!   belongs to the caller. (A `BufReader` here would swallow it.)
//! * Replies to one option are collected in memory and written with one `write_all` + `flush`.
//! * A client that closes the connection between options ends the handshake with `Ok(None)`
//!   ([`Outcome::Closed`]);
//!   one that vanishes inside an option is an [`HandshakeError::Io`] (`UnexpectedEof`).
//!
//! Export names are attach tokens, i.e. secrets: `NBD_OPT_LIST` is refused with
//! `NBD_REP_ERR_POLICY`, and no name appears in an error or reply the client did not itself
//! send.
//!
//! TLS (`NBD_OPT_STARTTLS`) follows a [`TlsPolicy`] and involves no TLS code here: the
//! haggling state ([`State`]) is kept apart from the stream. [`negotiate`] acknowledges
//! STARTTLS and returns [`Outcome::StartTls`] with the state, reset as the specification
//! demands (nothing negotiated before the upgrade survives it, except the client flags and the
//! option count); the caller runs the TLS handshake on the socket, then calls [`resume`] on the
//! decrypted stream. Nothing after the STARTTLS option is read before the acknowledgement is
//! sent, so bytes a client (or someone in the middle) sends early are TLS data, never
//! options. Under [`TlsPolicy::Required`] (FORCEDTLS) every other option but `NBD_OPT_ABORT`
//! gets `NBD_REP_ERR_TLS_REQD` until the upgrade, and `NBD_OPT_EXPORT_NAME`, which cannot be
//! refused, ends the connection. After the upgrade a second STARTTLS is `NBD_REP_ERR_INVALID`.

use std::io::{self, Read, Write};

use thiserror::Error;

use super::proto::{
    self, InfoRequest, NegotiatedFlags, OptionHeader, QueryKind, NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES,
    NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_NO_ZEROES, NBD_INFO_NAME, NBD_OPT_ABORT, NBD_OPT_EXPORT_NAME, NBD_OPT_GO,
    NBD_OPT_INFO, NBD_OPT_LIST, NBD_OPT_LIST_META_CONTEXT, NBD_OPT_SET_META_CONTEXT, NBD_OPT_STARTTLS,
    NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, NBD_REP_ERR_INVALID, NBD_REP_ERR_POLICY, NBD_REP_ERR_TLS_REQD,
    NBD_REP_ERR_TOO_BIG, NBD_REP_ERR_UNKNOWN, NBD_REP_ERR_UNSUP, OPTION_HEADER_LEN,
};

pub use super::proto::MetaContext;

/// Largest request length (read/write/cache/write-zeroes) the server accepts, advertised as the
/// maximum block size. 32 MiB is also the size the specification says clients should stay
/// under for interoperability, so well-behaved clients never hit it.
pub const MAX_REQUEST_LEN: u32 = 32 << 20;
/// Advertised minimum block size: any byte offset/length is accepted.
pub const MIN_BLOCK_SIZE: u32 = 1;
/// Advertised preferred block size: the store's block size (smaller writes cost a
/// read-modify-write).
pub const PREFERRED_BLOCK_SIZE: u32 = 4096;

/// Options answered before the connection is closed. A real client needs a handful; the cap
/// stops one from keeping a connection (and its thread) in haggling forever.
pub const MAX_OPTIONS: usize = 1000;
/// Largest option data read into memory. The biggest legitimate option is a meta-context
/// request with a few 4 KiB strings; anything larger gets `NBD_REP_ERR_TOO_BIG`
/// (`NBD_REP_ERR_UNSUP` if the option is one we do not implement).
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// Largest too-big option data that is read and thrown away so haggling can continue; above
/// this the client is treated as hostile and disconnected (which the specification allows
/// for denial-of-service behaviour).
pub const MAX_OPTION_DISCARD: u32 = 1 << 20;

/// What the server knows about an export when a client names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    pub read_only: bool,
    /// Metadata contexts the export offers.
    pub contexts: Vec<MetaContext>,
}

/// The outcome of a handshake that entered transmission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated<T> {
    /// The export name the client presented (an attach token: do not log it).
    pub name: String,
    /// What `lookup` returned for `name`.
    pub export: T,
    /// Export size in bytes, as sent to the client.
    pub size: u64,
    pub read_only: bool,
    /// `NBD_OPT_STRUCTURED_REPLY` was acknowledged: reads must be answered with structured
    /// replies, and errors should be.
    pub structured_replies: bool,
    /// Metadata contexts selected for this export, with the ids the client was given. Empty
    /// unless the last `NBD_OPT_SET_META_CONTEXT` named this same export.
    pub meta_contexts: Vec<(u32, MetaContext)>,
    /// The transmission flags sent to the client (see [`proto::transmission_flags`]).
    pub transmission_flags: u16,
    /// The client set `NBD_FLAG_C_NO_ZEROES` (only affects the `NBD_OPT_EXPORT_NAME` reply,
    /// already sent; informational).
    pub no_zeroes: bool,
}

impl<T> Negotiated<T> {
    /// What [`proto::validate_request`] needs to know about this session.
    pub fn flags(&self) -> NegotiatedFlags {
        NegotiatedFlags {
            transmission_flags: self.transmission_flags,
            structured_replies: self.structured_replies,
            block_status: self.structured_replies && !self.meta_contexts.is_empty(),
        }
    }
}

/// Why a handshake ended without entering transmission (other than a clean client exit). In
/// every case the caller must close the connection.
#[derive(Debug, Error)]
pub enum HandshakeError {
    /// The stream failed, or ended inside a message (`UnexpectedEof`).
    #[error("I/O error during the NBD handshake: {0}")]
    Io(#[from] io::Error),
    /// The client did not set `NBD_FLAG_C_FIXED_NEWSTYLE`; only fixed newstyle is spoken.
    #[error("client does not speak fixed newstyle (client flags {0:#x})")]
    NotFixedNewstyle(u32),
    /// The client set flags the server does not know or did not offer.
    #[error("client sent unknown client flags {0:#x}")]
    BadClientFlags(u32),
    /// An option did not start with `IHAVEOPT`.
    #[error("bad option magic {0:#018x}")]
    BadOptionMagic(u64),
    /// The client sent more than [`MAX_OPTIONS`] options.
    #[error("client sent more than {MAX_OPTIONS} options")]
    TooManyOptions,
    /// Option data above [`MAX_OPTION_DISCARD`] bytes.
    #[error("option {option} announces {len} bytes of data")]
    OptionTooLarge { option: u32, len: u32 },
    /// `NBD_OPT_EXPORT_NAME` named no known export; that option cannot be answered with an
    /// error, so the specification requires closing the connection.
    #[error("NBD_OPT_EXPORT_NAME named an unknown export")]
    UnknownExport,
    /// `NBD_OPT_EXPORT_NAME` with a name that is not a valid string (too long, not UTF-8,
    /// contains NUL).
    #[error("NBD_OPT_EXPORT_NAME carried an invalid export name")]
    InvalidExportName,
    /// `NBD_OPT_EXPORT_NAME` before STARTTLS on a connection that must use TLS: it cannot be
    /// refused with an error, so the specification requires closing the connection.
    #[error("NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS on a connection that requires TLS")]
    TlsRequired,
}

/// What this connection may or must do about TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsPolicy {
    /// No TLS here: STARTTLS gets `NBD_REP_ERR_POLICY` (the specification's NOTLS mode).
    Unavailable,
    /// STARTTLS is accepted, and so is carrying on in plain text.
    Optional,
    /// Nothing but STARTTLS and ABORT before the upgrade (FORCEDTLS).
    Required,
}

/// How [`negotiate`] or [`resume`] ended, short of an error.
#[derive(Debug)]
pub enum Outcome<T> {
    /// Transmission entered; the stream is positioned at the first request.
    Transmission(Negotiated<T>),
    /// The client ended the session cleanly (`NBD_OPT_ABORT`, or closed between options).
    Closed,
    /// STARTTLS was acknowledged: the next bytes on the socket are the client's TLS handshake.
    /// Run it, then [`resume`] on the encrypted stream.
    StartTls(TlsUpgrade),
}

/// The negotiation state to [`resume`] with after the TLS handshake.
#[derive(Debug)]
pub struct TlsUpgrade {
    state: State,
}

/// Runs the server side of the handshake on `s`.
///
/// `lookup` resolves an export name to the caller's export handle and its description; it is
/// called for every `NBD_OPT_INFO`, `NBD_OPT_GO`, `NBD_OPT_EXPORT_NAME` and meta-context
/// option, so it should be cheap (and `T` cheap to create, e.g. an `Arc`).
///
/// Returns `Ok(Some(_))` once transmission is entered (the stream is positioned at the first
/// request), `Ok(None)` if the client ended the session cleanly (`NBD_OPT_ABORT`, or closed
/// the connection before or between options), and `Err` when the connection must be closed.
pub fn handshake<S: Read + Write, T>(
    s: &mut S,
    lookup: impl Fn(&str) -> Option<(T, ExportInfo)>,
) -> Result<Option<Negotiated<T>>, HandshakeError> {
    match negotiate(s, TlsPolicy::Unavailable, lookup)? {
        Outcome::Transmission(n) => Ok(Some(n)),
        // Without TLS nothing is upgraded: STARTTLS got NBD_REP_ERR_POLICY.
        Outcome::Closed | Outcome::StartTls(_) => Ok(None),
    }
}

/// [`handshake`] with a TLS policy: sends the greeting, reads the client flags and answers
/// options until transmission, a clean end, or an acknowledged STARTTLS.
pub fn negotiate<S: Read + Write, T>(
    s: &mut S,
    tls: TlsPolicy,
    lookup: impl Fn(&str) -> Option<(T, ExportInfo)>,
) -> Result<Outcome<T>, HandshakeError> {
    let mut conn = Conn::new(s);
    conn.out.extend_from_slice(&proto::greeting(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES));
    conn.send()?;

    let mut flags = [0u8; proto::CLIENT_FLAGS_LEN];
    if !conn.read_or_eof(&mut flags)? {
        return Ok(Outcome::Closed);
    }
    let flags = u32::from_be_bytes(flags);
    // The specification: the server MUST drop the connection on unknown client flags. Both
    // known flags are acceptable because the greeting offered both.
    if flags & !(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES) != 0 {
        return Err(HandshakeError::BadClientFlags(flags));
    }
    if flags & NBD_FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(HandshakeError::NotFixedNewstyle(flags));
    }

    let state = State::new(flags & NBD_FLAG_C_NO_ZEROES != 0, tls);
    haggle(&mut conn, state, &lookup)
}

/// Resumes option haggling on `s`, the stream inside the TLS session that `upgrade` started.
/// Nothing is sent first: the client speaks next.
pub fn resume<S: Read + Write, T>(
    s: &mut S,
    upgrade: TlsUpgrade,
    lookup: impl Fn(&str) -> Option<(T, ExportInfo)>,
) -> Result<Outcome<T>, HandshakeError> {
    let mut conn = Conn::new(s);
    haggle(&mut conn, upgrade.state, &lookup)
}

/// Negotiation state that survives from one option to the next.
#[derive(Debug)]
struct State {
    no_zeroes: bool,
    structured_replies: bool,
    /// The last `NBD_OPT_SET_META_CONTEXT`: the export it named and what it selected.
    meta: Option<(String, Vec<(u32, MetaContext)>)>,
    /// Options answered so far (counted across a TLS upgrade too).
    options: usize,
    tls: TlsPolicy,
    /// STARTTLS was acknowledged: this is the session inside TLS.
    tls_active: bool,
}

impl State {
    fn new(no_zeroes: bool, tls: TlsPolicy) -> State {
        State { no_zeroes, structured_replies: false, meta: None, options: 0, tls, tls_active: false }
    }

    /// The state the session inside TLS starts from: the client flags were exchanged before
    /// and stay; whatever the plain-text options negotiated is forgotten (a man in the middle
    /// could have injected them).
    fn upgraded(self) -> State {
        State { structured_replies: false, meta: None, tls_active: true, ..self }
    }

    /// Options other than STARTTLS and ABORT must wait for TLS.
    fn tls_required(&self) -> bool {
        self.tls == TlsPolicy::Required && !self.tls_active
    }
}

/// What to do after an option.
enum Step<T> {
    Continue,
    Abort,
    Transmission(Negotiated<T>),
    StartTls,
}

/// The option loop.
fn haggle<S: Read + Write, T>(
    conn: &mut Conn<'_, S>,
    mut state: State,
    lookup: &impl Fn(&str) -> Option<(T, ExportInfo)>,
) -> Result<Outcome<T>, HandshakeError> {
    loop {
        if state.options >= MAX_OPTIONS {
            return Err(HandshakeError::TooManyOptions);
        }
        state.options += 1;

        let mut header = [0u8; OPTION_HEADER_LEN];
        if !conn.read_or_eof(&mut header)? {
            return Ok(Outcome::Closed);
        }
        let header = proto::parse_option_header(&header).map_err(|e| match e {
            proto::ProtoError::BadOptionMagic(m) => HandshakeError::BadOptionMagic(m),
            // parse_option_header reports nothing else.
            _ => HandshakeError::BadOptionMagic(0),
        })?;

        match option(conn, &mut state, lookup, header)? {
            Step::Continue => conn.send()?,
            Step::Abort => {
                // The specification asks servers to cope with a client that sends ABORT and
                // closes without waiting for the ACK: a failed write is still a clean end.
                let _ = conn.send();
                return Ok(Outcome::Closed);
            }
            Step::Transmission(negotiated) => {
                conn.send()?;
                return Ok(Outcome::Transmission(negotiated));
            }
            Step::StartTls => {
                conn.send()?;
                return Ok(Outcome::StartTls(TlsUpgrade { state: state.upgraded() }));
            }
        }
    }
}

/// Options this server answers (any other gets `NBD_REP_ERR_UNSUP`).
fn is_implemented(opt: u32) -> bool {
    matches!(
        opt,
        NBD_OPT_EXPORT_NAME
            | NBD_OPT_ABORT
            | NBD_OPT_LIST
            | NBD_OPT_STARTTLS
            | NBD_OPT_INFO
            | NBD_OPT_GO
            | NBD_OPT_STRUCTURED_REPLY
            | NBD_OPT_LIST_META_CONTEXT
            | NBD_OPT_SET_META_CONTEXT
    )
}

/// Handles one option: reads its data and queues the replies in `conn.out`.
fn option<S: Read + Write, T>(
    conn: &mut Conn<'_, S>,
    state: &mut State,
    lookup: &impl Fn(&str) -> Option<(T, ExportInfo)>,
    header: OptionHeader,
) -> Result<Step<T>, HandshakeError> {
    let OptionHeader { option: opt, len } = header;

    if state.tls_required() && opt != NBD_OPT_STARTTLS && opt != NBD_OPT_ABORT {
        if opt == NBD_OPT_EXPORT_NAME {
            return Err(HandshakeError::TlsRequired);
        }
        if len > MAX_OPTION_DISCARD {
            return Err(HandshakeError::OptionTooLarge { option: opt, len });
        }
        // Unknown options too: nothing is answered in plain text but this.
        conn.discard(len)?;
        conn.error(opt, NBD_REP_ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS first");
        return Ok(Step::Continue);
    }

    if len > MAX_OPTION_LEN {
        if opt == NBD_OPT_EXPORT_NAME {
            // Cannot be answered with an error, and no valid name is this long.
            return Err(HandshakeError::InvalidExportName);
        }
        if len > MAX_OPTION_DISCARD {
            return Err(HandshakeError::OptionTooLarge { option: opt, len });
        }
        conn.discard(len)?;
        // An option we do not implement is unsupported whatever its size (the specification:
        // such options MUST get NBD_REP_ERR_UNSUP).
        if is_implemented(opt) {
            conn.error(opt, NBD_REP_ERR_TOO_BIG, "option data too large");
        } else {
            conn.error(opt, NBD_REP_ERR_UNSUP, "option not supported");
        }
        return Ok(Step::Continue);
    }
    // Bounded by MAX_OPTION_LEN above.
    let data = conn.read_vec(len as usize)?;

    match opt {
        NBD_OPT_EXPORT_NAME => export_name(conn, state, lookup, &data),
        NBD_OPT_ABORT => {
            // Data is ignored rather than rejected, as the specification asks.
            conn.ack(opt);
            Ok(Step::Abort)
        }
        NBD_OPT_LIST => {
            if data.is_empty() {
                // Export names are secret attach tokens: never enumerate them.
                conn.error(opt, NBD_REP_ERR_POLICY, "listing exports is not allowed");
            } else {
                conn.error(opt, NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
            }
            Ok(Step::Continue)
        }
        NBD_OPT_STARTTLS => Ok(starttls(conn, state, &data)),
        NBD_OPT_INFO | NBD_OPT_GO => info_or_go(conn, state, lookup, opt, &data),
        NBD_OPT_STRUCTURED_REPLY => {
            if data.is_empty() {
                state.structured_replies = true;
                conn.ack(opt);
            } else {
                conn.error(opt, NBD_REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data");
            }
            Ok(Step::Continue)
        }
        NBD_OPT_LIST_META_CONTEXT | NBD_OPT_SET_META_CONTEXT => {
            meta_context(conn, state, lookup, opt, &data);
            Ok(Step::Continue)
        }
        // NBD_OPT_EXTENDED_HEADERS, NBD_OPT_PEEK_EXPORT and everything unknown. Extended
        // headers would change every transmission header; not supported (yet).
        _ => {
            conn.error(opt, NBD_REP_ERR_UNSUP, "option not supported");
            Ok(Step::Continue)
        }
    }
}

fn starttls<S: Read + Write, T>(conn: &mut Conn<'_, S>, state: &State, data: &[u8]) -> Step<T> {
    let opt = NBD_OPT_STARTTLS;
    if state.tls == TlsPolicy::Unavailable {
        if data.is_empty() {
            conn.error(opt, NBD_REP_ERR_POLICY, "TLS is not enabled on this server");
        } else {
            conn.error(opt, NBD_REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data");
        }
        Step::Continue
    } else if state.tls_active {
        conn.error(opt, NBD_REP_ERR_INVALID, "TLS is already negotiated");
        Step::Continue
    } else if !data.is_empty() {
        conn.error(opt, NBD_REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data");
        Step::Continue
    } else {
        conn.ack(opt);
        Step::StartTls
    }
}

fn export_name<S: Read + Write, T>(
    conn: &mut Conn<'_, S>,
    state: &State,
    lookup: &impl Fn(&str) -> Option<(T, ExportInfo)>,
    data: &[u8],
) -> Result<Step<T>, HandshakeError> {
    let name = proto::parse_string(data).map_err(|_| HandshakeError::InvalidExportName)?;
    let Some((export, info)) = lookup(name) else {
        return Err(HandshakeError::UnknownExport);
    };
    let negotiated = state.negotiated(name, export, &info);
    proto::push_export_name_reply(&mut conn.out, info.size, negotiated.transmission_flags, state.no_zeroes);
    Ok(Step::Transmission(negotiated))
}

fn info_or_go<S: Read + Write, T>(
    conn: &mut Conn<'_, S>,
    state: &State,
    lookup: &impl Fn(&str) -> Option<(T, ExportInfo)>,
    opt: u32,
    data: &[u8],
) -> Result<Step<T>, HandshakeError> {
    let InfoRequest { name, info } = match proto::parse_info_request(data) {
        Ok(r) => r,
        Err(e) => {
            conn.error(opt, NBD_REP_ERR_INVALID, &e.to_string());
            return Ok(Step::Continue);
        }
    };
    let Some((export, export_info)) = lookup(name) else {
        conn.error(opt, NBD_REP_ERR_UNKNOWN, "unknown export");
        return Ok(Step::Continue);
    };
    let negotiated = state.negotiated(name, export, &export_info);

    proto::push_info_export(&mut conn.out, opt, export_info.size, negotiated.transmission_flags);
    // Always sent, requested or not: the maximum is enforced either way, and clients that
    // did not ask are free to ignore it.
    proto::push_info_block_size(&mut conn.out, opt, MIN_BLOCK_SIZE, PREFERRED_BLOCK_SIZE, MAX_REQUEST_LEN);
    // The canonical name is the name the client used, so echoing it reveals nothing. It is
    // skipped for the empty (default) name, whose canonical name would be a secret.
    // NBD_INFO_DESCRIPTION is never sent: there is none, and it is optional.
    if info.contains(&NBD_INFO_NAME) && !name.is_empty() {
        proto::push_info_string(&mut conn.out, opt, NBD_INFO_NAME, name);
    }
    conn.ack(opt);

    if opt == NBD_OPT_GO {
        Ok(Step::Transmission(negotiated))
    } else {
        Ok(Step::Continue)
    }
}

fn meta_context<S: Read + Write, T>(
    conn: &mut Conn<'_, S>,
    state: &mut State,
    lookup: &impl Fn(&str) -> Option<(T, ExportInfo)>,
    opt: u32,
    data: &[u8],
) {
    let kind = if opt == NBD_OPT_SET_META_CONTEXT {
        // SET replaces the previous selection even when it fails.
        state.meta = None;
        if !state.structured_replies {
            conn.error(opt, NBD_REP_ERR_INVALID, "structured replies must be negotiated first");
            return;
        }
        QueryKind::Set
    } else {
        QueryKind::List
    };

    let req = match proto::parse_meta_context_request(data) {
        Ok(r) => r,
        Err(e) => {
            conn.error(opt, NBD_REP_ERR_INVALID, &e.to_string());
            return;
        }
    };
    let Some((_, info)) = lookup(req.export) else {
        conn.error(opt, NBD_REP_ERR_UNKNOWN, "unknown export");
        return;
    };
    let available = info.contexts;

    let selected = if req.queries.is_empty() {
        // No query: LIST returns everything, SET selects nothing.
        match kind {
            QueryKind::List => available,
            QueryKind::Set => Vec::new(),
        }
    } else {
        let mut selected: Vec<MetaContext> = Vec::new();
        for query in &req.queries {
            match proto::match_meta_query(query, kind, &available) {
                Ok(found) => {
                    for ctx in found {
                        if !selected.contains(&ctx) {
                            selected.push(ctx);
                        }
                    }
                }
                Err(e) => {
                    conn.error(opt, NBD_REP_ERR_INVALID, &e.to_string());
                    return;
                }
            }
        }
        selected
    };

    match kind {
        QueryKind::List => {
            // The id in list replies is reserved: 0.
            for ctx in &selected {
                proto::push_meta_context_reply(&mut conn.out, opt, 0, &ctx.name());
            }
        }
        QueryKind::Set => {
            // Ids start at 1 so that 0 never looks like a real context to a sloppy client.
            let chosen: Vec<(u32, MetaContext)> = (1u32..).zip(selected).collect();
            for (id, ctx) in &chosen {
                proto::push_meta_context_reply(&mut conn.out, opt, *id, &ctx.name());
            }
            state.meta = Some((req.export.to_owned(), chosen));
        }
    }
    conn.ack(opt);
}

impl State {
    /// The session a GO / EXPORT_NAME for `name` would enter, with the state as it is now.
    fn negotiated<T>(&self, name: &str, export: T, info: &ExportInfo) -> Negotiated<T> {
        // The selection only applies if the last SET_META_CONTEXT named this export.
        let meta_contexts = match &self.meta {
            Some((meta_name, chosen)) if meta_name == name && self.structured_replies => chosen.clone(),
            _ => Vec::new(),
        };
        Negotiated {
            name: name.to_owned(),
            export,
            size: info.size,
            read_only: info.read_only,
            structured_replies: self.structured_replies,
            meta_contexts,
            transmission_flags: proto::transmission_flags(info.read_only, self.structured_replies),
            no_zeroes: self.no_zeroes,
        }
    }
}

/// The stream plus the replies queued for it.
struct Conn<'a, S> {
    s: &'a mut S,
    out: Vec<u8>,
}

impl<'a, S: Read + Write> Conn<'a, S> {
    fn new(s: &'a mut S) -> Self {
        Conn { s, out: Vec::with_capacity(256) }
    }

    /// Writes out everything queued.
    fn send(&mut self) -> io::Result<()> {
        self.s.write_all(&self.out)?;
        self.s.flush()?;
        self.out.clear();
        Ok(())
    }

    fn ack(&mut self, opt: u32) {
        proto::push_option_reply(&mut self.out, opt, NBD_REP_ACK, &[]);
    }

    fn error(&mut self, opt: u32, reply: u32, message: &str) {
        proto::push_option_error(&mut self.out, opt, reply, message);
    }

    /// Fills `buf` completely. `Ok(false)` if the stream ended before the first byte (a clean
    /// end between messages); an end after some bytes is `UnexpectedEof`.
    fn read_or_eof(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        let mut filled = 0;
        while filled < buf.len() {
            match self.s.read(&mut buf[filled..]) {
                Ok(0) if filled == 0 => return Ok(false),
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Reads exactly `len` bytes; the caller bounds `len`.
    fn read_vec(&mut self, len: usize) -> io::Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.s.read_exact(&mut v)?;
        Ok(v)
    }

    /// Reads and drops `len` bytes without buffering them.
    fn discard(&mut self, len: u32) -> io::Result<()> {
        let copied = io::copy(&mut (&mut *self.s).take(u64::from(len)), &mut io::sink())?;
        if copied < u64::from(len) {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::proto::*;
    use proptest::prelude::*;
    use std::io::Cursor;

    /// An in-memory connection: the client's whole script as input, the server's bytes as
    /// output.
    struct Mock {
        input: Cursor<Vec<u8>>,
        output: Vec<u8>,
        /// Fail writes (a client that went away).
        broken_pipe: bool,
    }

    impl Mock {
        fn new(input: Vec<u8>) -> Self {
            Mock { input: Cursor::new(input), output: Vec::new(), broken_pipe: false }
        }
    }

    impl Read for Mock {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Mock {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.broken_pipe {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            self.output.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    const VOL_SIZE: u64 = 1 << 20;
    const RO_SIZE: u64 = 4096;

    fn lookup(name: &str) -> Option<(&'static str, ExportInfo)> {
        match name {
            "vol" => {
                Some(("vol-handle", ExportInfo { size: VOL_SIZE, read_only: false, contexts: MetaContext::all() }))
            }
            "ro" => Some((
                "ro-handle",
                ExportInfo {
                    size: RO_SIZE,
                    read_only: true,
                    contexts: vec![MetaContext::BaseAllocation, MetaContext::Changed("base".into())],
                },
            )),
            _ => None,
        }
    }

    const FIXED: u32 = NBD_FLAG_C_FIXED_NEWSTYLE;
    const NO_ZEROES: u32 = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;

    /// Builds a client script.
    struct Client(Vec<u8>);

    impl Client {
        fn new(flags: u32) -> Self {
            Client(flags.to_be_bytes().to_vec())
        }
        fn opt(mut self, option: u32, data: &[u8]) -> Self {
            push_option(&mut self.0, option, data);
            self
        }
        fn go(self, name: &str, info: &[u16]) -> Self {
            self.opt(NBD_OPT_GO, &encode_info_request(name, info))
        }
        fn info(self, name: &str, info: &[u16]) -> Self {
            self.opt(NBD_OPT_INFO, &encode_info_request(name, info))
        }
        fn raw(mut self, bytes: &[u8]) -> Self {
            self.0.extend_from_slice(bytes);
            self
        }
        fn run_with(self, policy: TlsPolicy) -> (Result<Outcome<&'static str>, HandshakeError>, Server) {
            run_policy(self.0, policy)
        }
        fn run(self) -> (Result<Option<Negotiated<&'static str>>, HandshakeError>, Server) {
            let mut m = Mock::new(self.0);
            let r = handshake(&mut m, lookup);
            let pos = m.input.position() as usize;
            let server = Server { bytes: m.output, pos: 0, unread_input: m.input.into_inner().split_off(pos) };
            (r, server)
        }
    }

    /// Reads the server's output back.
    struct Server {
        bytes: Vec<u8>,
        pos: usize,
        unread_input: Vec<u8>,
    }

    impl Server {
        fn take(&mut self, n: usize) -> &[u8] {
            assert!(self.pos + n <= self.bytes.len(), "server sent too little: want {n} more after {}", self.pos);
            let s = &self.bytes[self.pos..self.pos + n];
            self.pos += n;
            s
        }
        fn greeting(mut self) -> Self {
            let g = self.take(GREETING_LEN).to_vec();
            assert_eq!(g, b"NBDMAGICIHAVEOPT\x00\x03");
            self
        }
        fn reply(&mut self) -> (OptionReplyHeader, Vec<u8>) {
            let h = parse_option_reply_header(self.take(OPTION_REPLY_HEADER_LEN)).unwrap().unwrap();
            let data = self.take(h.len as usize).to_vec();
            (h, data)
        }
        fn expect(&mut self, option: u32, reply: u32) -> Vec<u8> {
            let (h, data) = self.reply();
            assert_eq!((h.option, h.reply), (option, reply), "unexpected reply {h:?} {data:?}");
            data
        }
        fn end(&self) {
            assert_eq!(self.pos, self.bytes.len(), "server sent more than expected");
        }
    }

    fn rw_flags(structured: bool) -> u16 {
        transmission_flags(false, structured)
    }

    #[test]
    fn go_exact_bytes() {
        let (r, s) = Client::new(NO_ZEROES).go("vol", &[NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME]).run();
        let n = r.unwrap().unwrap();
        let tf = rw_flags(false);
        assert_eq!(tf, 0x0d6d);
        let mut expected = b"NBDMAGICIHAVEOPT\x00\x03".to_vec();
        let rep = [0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9];
        let go = [0, 0, 0, 7];
        // NBD_INFO_EXPORT
        expected.extend_from_slice(&rep);
        expected.extend_from_slice(&go);
        expected.extend_from_slice(&[0, 0, 0, 3, 0, 0, 0, 12, 0, 0]);
        expected.extend_from_slice(&[0, 0, 0, 0, 0, 0x10, 0, 0, 0x0d, 0x6d]);
        // NBD_INFO_BLOCK_SIZE: 1, 4096, 32 MiB
        expected.extend_from_slice(&rep);
        expected.extend_from_slice(&go);
        expected.extend_from_slice(&[0, 0, 0, 3, 0, 0, 0, 14, 0, 3]);
        expected.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0x10, 0, 0x02, 0, 0, 0]);
        // NBD_INFO_NAME
        expected.extend_from_slice(&rep);
        expected.extend_from_slice(&go);
        expected.extend_from_slice(&[0, 0, 0, 3, 0, 0, 0, 5, 0, 1, b'v', b'o', b'l']);
        // NBD_REP_ACK, and nothing after it (no zero padding after GO)
        expected.extend_from_slice(&rep);
        expected.extend_from_slice(&go);
        expected.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0]);
        assert_eq!(s.bytes, expected);

        assert_eq!(
            n,
            Negotiated {
                name: "vol".into(),
                export: "vol-handle",
                size: VOL_SIZE,
                read_only: false,
                structured_replies: false,
                meta_contexts: vec![],
                transmission_flags: tf,
                no_zeroes: true,
            }
        );
        assert_eq!(
            n.flags(),
            NegotiatedFlags { transmission_flags: tf, structured_replies: false, block_status: false }
        );
    }

    #[test]
    fn go_does_not_read_past_the_handshake() {
        let request = Request { flags: 0, cmd: Command::Read, cookie: 1, offset: 0, len: 512 }.encode();
        let (r, s) = Client::new(FIXED).go("vol", &[]).raw(&request).run();
        assert!(r.unwrap().is_some());
        assert_eq!(s.unread_input, request);
    }

    #[test]
    fn go_read_only_export() {
        let (r, s) = Client::new(FIXED).go("ro", &[]).run();
        let n = r.unwrap().unwrap();
        assert_eq!(n.export, "ro-handle");
        assert!(n.read_only);
        let ro = NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY | NBD_FLAG_CAN_MULTI_CONN | NBD_FLAG_SEND_CACHE;
        assert_eq!(n.transmission_flags, ro);
        let mut s = s.greeting();
        let info = s.expect(NBD_OPT_GO, NBD_REP_INFO);
        let expected = [&[0, 0][..], &RO_SIZE.to_be_bytes(), &ro.to_be_bytes()].concat();
        assert_eq!(info, expected);
        s.expect(NBD_OPT_GO, NBD_REP_INFO);
        s.expect(NBD_OPT_GO, NBD_REP_ACK);
        s.end();
    }

    #[test]
    fn info_then_go() {
        let (r, s) =
            Client::new(FIXED).info("vol", &[NBD_INFO_DESCRIPTION, 0x7777]).info("nope", &[]).go("vol", &[]).run();
        let n = r.unwrap().unwrap();
        assert_eq!(n.name, "vol");
        let mut s = s.greeting();
        let export = s.expect(NBD_OPT_INFO, NBD_REP_INFO);
        assert_eq!(&export[..2], &[0, 0]);
        let bs = s.expect(NBD_OPT_INFO, NBD_REP_INFO);
        assert_eq!(&bs[..2], &[0, 3]);
        // No description (optional), unknown info ignored.
        s.expect(NBD_OPT_INFO, NBD_REP_ACK);
        // Unknown export: error, no NBD_REP_INFO, haggling continues.
        s.expect(NBD_OPT_INFO, NBD_REP_ERR_UNKNOWN);
        // GO repeats what INFO said.
        assert_eq!(s.expect(NBD_OPT_GO, NBD_REP_INFO), export);
        assert_eq!(s.expect(NBD_OPT_GO, NBD_REP_INFO), bs);
        s.expect(NBD_OPT_GO, NBD_REP_ACK);
        s.end();
    }

    #[test]
    fn go_unknown_export_then_close() {
        let (r, s) = Client::new(FIXED).go("secret-guess", &[]).run();
        assert!(r.unwrap().is_none());
        let mut s = s.greeting();
        let msg = s.expect(NBD_OPT_GO, NBD_REP_ERR_UNKNOWN);
        assert!(!String::from_utf8(msg).unwrap().contains("secret-guess"));
        s.end();
    }

    #[test]
    fn go_malformed_is_invalid_and_haggling_continues() {
        let (r, s) = Client::new(FIXED)
            .opt(NBD_OPT_GO, &[0, 0, 0, 9, b'v'])
            .opt(NBD_OPT_GO, &[0, 0, 0, 3, b'v', b'o', b'l', 0, 1]) // count says 1, no item
            .go("vol", &[])
            .run();
        assert!(r.unwrap().is_some());
        let mut s = s.greeting();
        s.expect(NBD_OPT_GO, NBD_REP_ERR_INVALID);
        s.expect(NBD_OPT_GO, NBD_REP_ERR_INVALID);
        s.expect(NBD_OPT_GO, NBD_REP_INFO);
        s.expect(NBD_OPT_GO, NBD_REP_INFO);
        s.expect(NBD_OPT_GO, NBD_REP_ACK);
        s.end();
    }

    #[test]
    fn export_name_with_zeroes() {
        let (r, s) = Client::new(FIXED).opt(NBD_OPT_EXPORT_NAME, b"vol").run();
        let n = r.unwrap().unwrap();
        assert!(!n.no_zeroes);
        assert_eq!(n.transmission_flags, rw_flags(false));
        let mut s = s.greeting();
        assert_eq!(s.take(8), VOL_SIZE.to_be_bytes());
        assert_eq!(s.take(2), rw_flags(false).to_be_bytes());
        assert_eq!(s.take(124), [0u8; 124]);
        s.end();
    }

    #[test]
    fn export_name_without_zeroes() {
        let (r, s) = Client::new(NO_ZEROES).opt(NBD_OPT_STRUCTURED_REPLY, &[]).opt(NBD_OPT_EXPORT_NAME, b"vol").run();
        let n = r.unwrap().unwrap();
        assert!(n.no_zeroes && n.structured_replies);
        let mut s = s.greeting();
        s.expect(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK);
        assert_eq!(s.take(8), VOL_SIZE.to_be_bytes());
        assert_eq!(s.take(2), rw_flags(true).to_be_bytes());
        s.end();
    }

    #[test]
    fn export_name_unknown_closes() {
        let (r, s) = Client::new(FIXED).opt(NBD_OPT_EXPORT_NAME, b"nope").run();
        assert!(matches!(r, Err(HandshakeError::UnknownExport)));
        s.greeting().end();
        let (r, _) = Client::new(FIXED).opt(NBD_OPT_EXPORT_NAME, b"\xff").run();
        assert!(matches!(r, Err(HandshakeError::InvalidExportName)));
        let (r, _) = Client::new(FIXED).opt(NBD_OPT_EXPORT_NAME, &vec![b'a'; 5000]).run();
        assert!(matches!(r, Err(HandshakeError::InvalidExportName)));
    }

    #[test]
    fn list_is_refused_without_names() {
        let (r, s) = Client::new(FIXED).opt(NBD_OPT_LIST, &[]).opt(NBD_OPT_LIST, b"x").run();
        assert!(r.unwrap().is_none());
        let mut s = s.greeting();
        let msg = s.expect(NBD_OPT_LIST, NBD_REP_ERR_POLICY);
        let msg = String::from_utf8(msg).unwrap();
        assert!(!msg.contains("vol") && !msg.contains("ro"), "{msg}");
        s.expect(NBD_OPT_LIST, NBD_REP_ERR_INVALID);
        s.end();
    }

    #[test]
    fn abort_acks_and_ends() {
        let (r, s) = Client::new(FIXED)
            .opt(NBD_OPT_ABORT, &[])
            .go("vol", &[]) // never read
            .run();
        assert!(r.unwrap().is_none());
        let mut s = s.greeting();
        assert_eq!(s.expect(NBD_OPT_ABORT, NBD_REP_ACK), Vec::<u8>::new());
        s.end();

        // ABORT with (ignored) data from a client that closes without waiting for the ACK:
        // the failed write is still a clean end.
        struct GoneAfterGreeting(Mock);
        impl Read for GoneAfterGreeting {
            fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
                self.0.read(b)
            }
        }
        impl Write for GoneAfterGreeting {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                let n = self.0.write(b)?;
                self.0.broken_pipe = true;
                Ok(n)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut script = FIXED.to_be_bytes().to_vec();
        push_option(&mut script, NBD_OPT_ABORT, b"junk");
        let mut m = GoneAfterGreeting(Mock::new(script));
        assert!(handshake(&mut m, lookup).unwrap().is_none());
        assert_eq!(m.0.output.len(), GREETING_LEN);
    }

    #[test]
    fn structured_replies() {
        let (r, s) = Client::new(FIXED)
            .opt(NBD_OPT_STRUCTURED_REPLY, b"x")
            .opt(NBD_OPT_STRUCTURED_REPLY, &[])
            .go("vol", &[])
            .run();
        let n = r.unwrap().unwrap();
        assert!(n.structured_replies);
        assert_eq!(n.transmission_flags, rw_flags(true));
        assert_ne!(n.transmission_flags & NBD_FLAG_SEND_DF, 0);
        let mut s = s.greeting();
        s.expect(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ERR_INVALID);
        s.expect(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK);
        let info = s.expect(NBD_OPT_GO, NBD_REP_INFO);
        assert_eq!(&info[10..], &rw_flags(true).to_be_bytes());
    }

    fn set_meta(export: &str, queries: &[&str]) -> Vec<u8> {
        encode_meta_context_request(export, queries)
    }

    #[test]
    fn set_meta_context_needs_structured_replies() {
        let (r, s) = Client::new(FIXED)
            .opt(NBD_OPT_SET_META_CONTEXT, &set_meta("vol", &["base:allocation"]))
            .go("vol", &[])
            .run();
        let n = r.unwrap().unwrap();
        assert!(n.meta_contexts.is_empty());
        assert!(!n.flags().block_status);
        let mut s = s.greeting();
        s.expect(NBD_OPT_SET_META_CONTEXT, NBD_REP_ERR_INVALID);
    }

    #[test]
    fn set_meta_context_then_go() {
        let (r, s) = Client::new(FIXED)
            .opt(NBD_OPT_STRUCTURED_REPLY, &[])
            .opt(
                NBD_OPT_SET_META_CONTEXT,
                &set_meta("vol", &["base:", "x-other:thing", "base:allocation", "base:allocation"]),
            )
            .go("vol", &[])
            .run();
        let n = r.unwrap().unwrap();
        assert_eq!(n.meta_contexts, vec![(1, MetaContext::BaseAllocation)]);
        assert!(n.flags().block_status);
        let mut s = s.greeting();
        s.expect(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK);
        let ctx = s.expect(NBD_OPT_SET_META_CONTEXT, NBD_REP_META_CONTEXT);
        assert_eq!(ctx, b"\x00\x00\x00\x01base:allocation");
        s.expect(NBD_OPT_SET_META_CONTEXT, NBD_REP_ACK);
        s.expect(NBD_OPT_GO, NBD_REP_INFO);
        s.expect(NBD_OPT_GO, NBD_REP_INFO);
        s.expect(NBD_OPT_GO, NBD_REP_ACK);
        s.end();
    }

    #[test]
    fn meta_context_selection_dropped_for_other_export() {
        let (r, _) = Client::new(FIXED)
            .opt(NBD_OPT_STRUCTURED_REPLY, &[])
            .opt(NBD_OPT_SET_META_CONTEXT, &set_meta("vol", &["base:allocation"]))
            .go("ro", &[])
            .run();
        let n = r.unwrap().unwrap();
        assert_eq!(n.name, "ro");
        assert!(n.meta_contexts.is_empty());

        // Same through NBD_OPT_EXPORT_NAME, where a matching name keeps the selection.
        let (r, _) = Client::new(NO_ZEROES)
            .opt(NBD_OPT_STRUCTURED_REPLY, &[])
            .opt(NBD_OPT_SET_META_CONTEXT, &set_meta("vol", &["base:allocation"]))
            .opt(NBD_OPT_EXPORT_NAME, b"vol")
            .run();
        assert_eq!(r.unwrap().unwrap().meta_contexts, vec![(1, MetaContext::BaseAllocation)]);
    }

    #[test]
    fn set_meta_context_replaces_even_on_failure() {
        let (r, s) = Client::new(FIXED)
            .opt(NBD_OPT_STRUCTURED_REPLY, &[])
            .opt(NBD_OPT_SET_META_CONTEXT, &set_meta("vol", &["base:allocation"]))
            .opt(NBD_OPT_SET_META_CONTEXT, &set_meta("nope", &["base:allocation"]))
            .go("vol", &[])
            .run();
        assert!(r.unwrap().unwrap().meta_contexts.is_empty());
        let mut s = s.greeting();
        s.expect(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK);
        s.expect(NBD_OPT_SET_META_CONTEXT, NBD_REP_META_CONTEXT);
        s.expect(NBD_OPT_SET_META_CONTEXT, NBD_REP_ACK);
        s.expect(NBD_OPT_SET_META_CONTEXT, NBD_REP_ERR_UNKNOWN);

        // Zero queries select nothing; "base:" is ignored when setting.
        let (r, s) = Client::new(FIXED)
            .opt(NBD_OPT_STRUCTURED_REPLY, &[])
            .opt(NBD_OPT_SET_META_CONTEXT, &set_meta("vol", &["base:allocation"]))
            .opt(NBD_OPT_SET_META_CONTEXT, &set_meta("vol", &["base:"]))
            .opt(NBD_OPT_SET_META_CONTEXT, &set_meta("vol", &[]))
            .go("vol", &[])
            .run();
        assert!(r.unwrap().unwrap().meta_contexts.is_empty());
        let mut s = s.greeting();
        s.expect(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK);
        s.expect(NBD_OPT_SET_META_CONTEXT, NBD_REP_META_CONTEXT);
        s.expect(NBD_OPT_SET_META_CONTEXT, NBD_REP_ACK);
        s.expect(NBD_OPT_SET_META_CONTEXT, NBD_REP_ACK);
        s.expect(NBD_OPT_SET_META_CONTEXT, NBD_REP_ACK);
    }

    #[test]
    fn list_meta_context() {
        let (r, s) = Client::new(FIXED)
            .opt(NBD_OPT_LIST_META_CONTEXT, &set_meta("vol", &[]))
            .opt(NBD_OPT_LIST_META_CONTEXT, &set_meta("vol", &["base:"]))
            .opt(NBD_OPT_LIST_META_CONTEXT, &set_meta("vol", &["x-foo:", "qemu:"]))
            .opt(NBD_OPT_LIST_META_CONTEXT, &set_meta("vol", &["nocolon"]))
            .opt(NBD_OPT_LIST_META_CONTEXT, &set_meta("nope", &[]))
            .opt(NBD_OPT_LIST_META_CONTEXT, &[0, 0, 0, 3, b'v'])
            .run();
        assert!(r.unwrap().is_none());
        let mut s = s.greeting();
        let opt = NBD_OPT_LIST_META_CONTEXT;
        for _ in 0..2 {
            assert_eq!(s.expect(opt, NBD_REP_META_CONTEXT), b"\x00\x00\x00\x00base:allocation");
            s.expect(opt, NBD_REP_ACK);
        }
        // Unknown namespaces are ignored: just the ACK.
        s.expect(opt, NBD_REP_ACK);
        s.expect(opt, NBD_REP_ERR_INVALID);
        s.expect(opt, NBD_REP_ERR_UNKNOWN);
        s.expect(opt, NBD_REP_ERR_INVALID);
        s.end();
    }

    #[test]
    fn unsupported_and_refused_options() {
        let (r, s) = Client::new(FIXED)
            .opt(NBD_OPT_STARTTLS, &[])
            .opt(NBD_OPT_STARTTLS, b"x")
            .opt(NBD_OPT_EXTENDED_HEADERS, &[])
            .opt(NBD_OPT_PEEK_EXPORT, &[])
            .opt(0x1234_5678, b"whatever")
            .go("vol", &[])
            .run();
        assert!(r.unwrap().is_some());
        let mut s = s.greeting();
        s.expect(NBD_OPT_STARTTLS, NBD_REP_ERR_POLICY);
        s.expect(NBD_OPT_STARTTLS, NBD_REP_ERR_INVALID);
        s.expect(NBD_OPT_EXTENDED_HEADERS, NBD_REP_ERR_UNSUP);
        s.expect(NBD_OPT_PEEK_EXPORT, NBD_REP_ERR_UNSUP);
        s.expect(0x1234_5678, NBD_REP_ERR_UNSUP);
        s.expect(NBD_OPT_GO, NBD_REP_INFO);
    }

    #[test]
    fn oversized_option_is_discarded() {
        let big = vec![0u8; MAX_OPTION_LEN as usize + 1];
        let (r, s) = Client::new(FIXED).opt(NBD_OPT_GO, &big).go("vol", &[]).run();
        assert!(r.unwrap().is_some());
        let mut s = s.greeting();
        s.expect(NBD_OPT_GO, NBD_REP_ERR_TOO_BIG);
        s.expect(NBD_OPT_GO, NBD_REP_INFO);
        // An unknown option is unsupported, however large.
        let (r, s) = Client::new(FIXED).opt(0x1234_5678, &big).go("vol", &[]).run();
        assert!(r.unwrap().is_some());
        let mut s = s.greeting();
        s.expect(0x1234_5678, NBD_REP_ERR_UNSUP);
        s.expect(NBD_OPT_GO, NBD_REP_INFO);

        // Far too large: disconnect without reading it.
        let mut script = FIXED.to_be_bytes().to_vec();
        script.extend_from_slice(&NBD_OPTS_MAGIC.to_be_bytes());
        script.extend_from_slice(&NBD_OPT_GO.to_be_bytes());
        script.extend_from_slice(&u32::MAX.to_be_bytes());
        let (r, s) = Client(script).run();
        assert!(matches!(r, Err(HandshakeError::OptionTooLarge { option: NBD_OPT_GO, len: u32::MAX })));
        s.greeting().end();

        // Announced but never sent: an error, not a hang.
        let mut script = FIXED.to_be_bytes().to_vec();
        script.extend_from_slice(&NBD_OPTS_MAGIC.to_be_bytes());
        script.extend_from_slice(&NBD_OPT_GO.to_be_bytes());
        script.extend_from_slice(&(MAX_OPTION_LEN + 10).to_be_bytes());
        script.extend_from_slice(&[0; 100]);
        let (r, _) = Client(script).run();
        assert!(matches!(r, Err(HandshakeError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof));
    }

    #[test]
    fn client_flags() {
        let (r, _) = Client::new(0).go("vol", &[]).run();
        assert!(matches!(r, Err(HandshakeError::NotFixedNewstyle(0))));
        let (r, _) = Client::new(FIXED | 4).run();
        assert!(matches!(r, Err(HandshakeError::BadClientFlags(5))));
        let (r, _) = Client::new(NBD_FLAG_C_NO_ZEROES).run();
        assert!(matches!(r, Err(HandshakeError::NotFixedNewstyle(2))));
        // Connection closed right after the greeting: clean.
        let (r, s) = Client(vec![]).run();
        assert!(r.unwrap().is_none());
        s.greeting().end();
        // Closed half-way through the flags: an error.
        let (r, _) = Client(vec![0, 0]).run();
        assert!(matches!(r, Err(HandshakeError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof));
    }

    #[test]
    fn framing_errors() {
        let (r, _) = Client::new(FIXED).raw(b"NOTAMAGIC\0\0\0\0\0\0\0").run();
        assert!(matches!(r, Err(HandshakeError::BadOptionMagic(_))));
        // Vanished mid-header and mid-payload.
        let (r, _) = Client::new(FIXED).raw(b"IHAVEOPT\0\0").run();
        assert!(matches!(r, Err(HandshakeError::Io(_))));
        let mut script = Client::new(FIXED).go("vol", &[]).0;
        script.truncate(script.len() - 1);
        let (r, _) = Client(script).run();
        assert!(matches!(r, Err(HandshakeError::Io(_))));
    }

    #[test]
    fn option_count_is_capped() {
        let mut c = Client::new(FIXED);
        for _ in 0..MAX_OPTIONS {
            c = c.opt(NBD_OPT_STRUCTURED_REPLY, &[]);
        }
        let (r, _) = c.go("vol", &[]).run();
        assert!(matches!(r, Err(HandshakeError::TooManyOptions)));
        // One fewer leaves room for the GO.
        let mut c = Client::new(FIXED);
        for _ in 0..MAX_OPTIONS - 1 {
            c = c.opt(NBD_OPT_STRUCTURED_REPLY, &[]);
        }
        assert!(c.go("vol", &[]).run().0.unwrap().is_some());
    }

    /// Runs [`negotiate`] with `policy` on a client script (client flags first).
    fn run_policy(script: Vec<u8>, policy: TlsPolicy) -> (Result<Outcome<&'static str>, HandshakeError>, Server) {
        let mut m = Mock::new(script);
        let r = negotiate(&mut m, policy, lookup);
        let pos = m.input.position() as usize;
        (r, Server { bytes: m.output, pos: 0, unread_input: m.input.into_inner().split_off(pos) })
    }

    /// [`resume`] on the "decrypted stream" of a second script (no greeting, no flags).
    fn run_resumed(up: TlsUpgrade, script: Client) -> (Result<Outcome<&'static str>, HandshakeError>, Server) {
        let mut m = Mock::new(script.0);
        let r = resume(&mut m, up, lookup);
        let pos = m.input.position() as usize;
        (r, Server { bytes: m.output, pos: 0, unread_input: m.input.into_inner().split_off(pos) })
    }

    fn upgrade(r: Result<Outcome<&'static str>, HandshakeError>) -> TlsUpgrade {
        match r {
            Ok(Outcome::StartTls(up)) => up,
            other => panic!("expected STARTTLS, got {other:?}"),
        }
    }

    fn transmission(r: Result<Outcome<&'static str>, HandshakeError>) -> Negotiated<&'static str> {
        match r {
            Ok(Outcome::Transmission(n)) => n,
            other => panic!("expected transmission, got {other:?}"),
        }
    }

    #[test]
    fn starttls_is_acked_and_nothing_after_it_is_read() {
        // A TLS ClientHello sent right behind the option (or bytes injected there) belongs to
        // the TLS layer: the handshake must stop exactly at the end of the option.
        let hello = b"\x16\x03\x01\x00\x05hello";
        for policy in [TlsPolicy::Optional, TlsPolicy::Required] {
            let (r, s) = Client::new(FIXED).opt(NBD_OPT_STARTTLS, &[]).raw(hello).run_with(policy);
            upgrade(r);
            let mut s = s.greeting();
            assert_eq!(s.expect(NBD_OPT_STARTTLS, NBD_REP_ACK), Vec::<u8>::new());
            s.end();
            assert_eq!(s.unread_input, hello);
        }
    }

    #[test]
    fn required_tls_refuses_every_option_before_starttls() {
        let big = vec![7u8; MAX_OPTION_LEN as usize + 1];
        let (r, s) = Client::new(FIXED)
            .opt(NBD_OPT_STRUCTURED_REPLY, &[])
            .go("vol", &[])
            .info("vol", &[])
            .opt(NBD_OPT_LIST, &[])
            .opt(NBD_OPT_LIST_META_CONTEXT, &set_meta("vol", &[]))
            .opt(NBD_OPT_SET_META_CONTEXT, &set_meta("vol", &["base:allocation"]))
            .opt(NBD_OPT_EXTENDED_HEADERS, &[])
            .opt(0x1234_5678, b"whatever")
            .opt(NBD_OPT_GO, &big)
            .opt(NBD_OPT_STARTTLS, b"x")
            .opt(NBD_OPT_STARTTLS, &[])
            .run_with(TlsPolicy::Required);
        upgrade(r);
        let mut s = s.greeting();
        for opt in [
            NBD_OPT_STRUCTURED_REPLY,
            NBD_OPT_GO,
            NBD_OPT_INFO,
            NBD_OPT_LIST,
            NBD_OPT_LIST_META_CONTEXT,
            NBD_OPT_SET_META_CONTEXT,
            NBD_OPT_EXTENDED_HEADERS,
            0x1234_5678,
            NBD_OPT_GO,
        ] {
            let msg = String::from_utf8(s.expect(opt, NBD_REP_ERR_TLS_REQD)).unwrap();
            assert!(msg.contains("STARTTLS") && !msg.contains("vol"), "{msg}");
        }
        s.expect(NBD_OPT_STARTTLS, NBD_REP_ERR_INVALID);
        s.expect(NBD_OPT_STARTTLS, NBD_REP_ACK);
        s.end();
    }

    #[test]
    fn required_tls_export_name_disconnects_and_abort_ends() {
        let (r, s) = Client::new(FIXED).opt(NBD_OPT_EXPORT_NAME, b"vol").run_with(TlsPolicy::Required);
        assert!(matches!(r, Err(HandshakeError::TlsRequired)), "{r:?}");
        s.greeting().end();

        let (r, s) = Client::new(FIXED).opt(NBD_OPT_ABORT, &[]).go("vol", &[]).run_with(TlsPolicy::Required);
        assert!(matches!(r, Ok(Outcome::Closed)), "{r:?}");
        let mut s = s.greeting();
        s.expect(NBD_OPT_ABORT, NBD_REP_ACK);
        s.end();

        // A client that gives up between options is a clean end too.
        let (r, _) = Client::new(FIXED).opt(NBD_OPT_GO, &[]).run_with(TlsPolicy::Required);
        assert!(matches!(r, Ok(Outcome::Closed)), "{r:?}");
        // Far too large, even to discard: disconnect.
        let mut script = FIXED.to_be_bytes().to_vec();
        script.extend_from_slice(&NBD_OPTS_MAGIC.to_be_bytes());
        script.extend_from_slice(&0x99u32.to_be_bytes());
        script.extend_from_slice(&u32::MAX.to_be_bytes());
        let (r, _) = run_policy(script, TlsPolicy::Required);
        assert!(matches!(r, Err(HandshakeError::OptionTooLarge { option: 0x99, .. })), "{r:?}");
    }

    #[test]
    fn optional_tls_allows_plain_text() {
        let (r, s) = Client::new(FIXED).opt(NBD_OPT_STRUCTURED_REPLY, &[]).go("vol", &[]).run_with(TlsPolicy::Optional);
        let n = transmission(r);
        assert!(n.structured_replies);
        let mut s = s.greeting();
        s.expect(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK);
        s.expect(NBD_OPT_GO, NBD_REP_INFO);
    }

    #[test]
    fn upgrade_forgets_plain_text_negotiation() {
        let (r, s) = Client::new(NO_ZEROES)
            .opt(NBD_OPT_STRUCTURED_REPLY, &[])
            .opt(NBD_OPT_SET_META_CONTEXT, &set_meta("vol", &["base:allocation"]))
            .opt(NBD_OPT_STARTTLS, &[])
            .run_with(TlsPolicy::Optional);
        let up = upgrade(r);
        let mut s = s.greeting();
        s.expect(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK);
        s.expect(NBD_OPT_SET_META_CONTEXT, NBD_REP_META_CONTEXT);
        s.expect(NBD_OPT_SET_META_CONTEXT, NBD_REP_ACK);
        s.expect(NBD_OPT_STARTTLS, NBD_REP_ACK);
        s.end();

        // Inside TLS: no greeting again, and neither structured replies nor the meta context
        // survived (so block status is not negotiated either).
        let (r, s) = run_resumed(up, Client(vec![]).go("vol", &[]));
        let n = transmission(r);
        assert!(!n.structured_replies && n.meta_contexts.is_empty() && !n.flags().block_status, "{n:?}");
        assert_eq!(n.transmission_flags, rw_flags(false));
        assert!(n.no_zeroes, "the client flags from before the upgrade stay");
        let mut s = s;
        s.expect(NBD_OPT_GO, NBD_REP_INFO);
        s.expect(NBD_OPT_GO, NBD_REP_INFO);
        s.expect(NBD_OPT_GO, NBD_REP_ACK);
        s.end();

        // SET_META_CONTEXT needs structured replies negotiated again, inside TLS.
        let (r, _) = Client::new(FIXED)
            .opt(NBD_OPT_STRUCTURED_REPLY, &[])
            .opt(NBD_OPT_STARTTLS, &[])
            .run_with(TlsPolicy::Optional);
        let (_, s) = run_resumed(
            upgrade(r),
            Client(vec![]).opt(NBD_OPT_SET_META_CONTEXT, &set_meta("vol", &["base:allocation"])),
        );
        let mut s = s;
        s.expect(NBD_OPT_SET_META_CONTEXT, NBD_REP_ERR_INVALID);
    }

    #[test]
    fn inside_tls_everything_works_and_starttls_again_is_invalid() {
        for policy in [TlsPolicy::Optional, TlsPolicy::Required] {
            let (r, _) = Client::new(FIXED).opt(NBD_OPT_STARTTLS, &[]).run_with(policy);
            let (r, s) = run_resumed(
                upgrade(r),
                Client(vec![])
                    .opt(NBD_OPT_STARTTLS, &[])
                    .opt(NBD_OPT_STARTTLS, b"x")
                    .opt(NBD_OPT_STRUCTURED_REPLY, &[])
                    .opt(NBD_OPT_SET_META_CONTEXT, &set_meta("vol", &["base:allocation"]))
                    .info("vol", &[])
                    .go("vol", &[]),
            );
            let n = transmission(r);
            assert!(n.structured_replies && n.flags().block_status, "{n:?}");
            let mut s = s;
            let msg = String::from_utf8(s.expect(NBD_OPT_STARTTLS, NBD_REP_ERR_INVALID)).unwrap();
            assert!(msg.contains("already"), "{msg}");
            s.expect(NBD_OPT_STARTTLS, NBD_REP_ERR_INVALID);
            s.expect(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK);
            s.expect(NBD_OPT_SET_META_CONTEXT, NBD_REP_META_CONTEXT);
            s.expect(NBD_OPT_SET_META_CONTEXT, NBD_REP_ACK);
            s.expect(NBD_OPT_INFO, NBD_REP_INFO);
        }

        // EXPORT_NAME inside TLS enters transmission (NO_ZEROES kept: no padding).
        let (r, _) = Client::new(NO_ZEROES).opt(NBD_OPT_STARTTLS, &[]).run_with(TlsPolicy::Required);
        let (r, mut s) = run_resumed(upgrade(r), Client(vec![]).opt(NBD_OPT_EXPORT_NAME, b"ro"));
        let n = transmission(r);
        assert!(n.read_only);
        assert_eq!(s.take(8), RO_SIZE.to_be_bytes());
        s.take(2);
        s.end();

        // ABORT and a close inside TLS end cleanly.
        let (r, _) = Client::new(FIXED).opt(NBD_OPT_STARTTLS, &[]).run_with(TlsPolicy::Required);
        let (r, _) = run_resumed(upgrade(r), Client(vec![]).opt(NBD_OPT_ABORT, &[]));
        assert!(matches!(r, Ok(Outcome::Closed)));
        let (r, _) = Client::new(FIXED).opt(NBD_OPT_STARTTLS, &[]).run_with(TlsPolicy::Required);
        let (r, _) = run_resumed(upgrade(r), Client(vec![]));
        assert!(matches!(r, Ok(Outcome::Closed)));
    }

    #[test]
    fn option_count_spans_the_upgrade() {
        let before = 500;
        let plain = |n: usize| {
            let mut c = Client::new(FIXED);
            for _ in 0..n {
                c = c.opt(NBD_OPT_STRUCTURED_REPLY, &[]);
            }
            c.opt(NBD_OPT_STARTTLS, &[]).run_with(TlsPolicy::Optional).0
        };
        let inside = |n: usize| {
            let mut c = Client(vec![]);
            for _ in 0..n {
                c = c.opt(NBD_OPT_STRUCTURED_REPLY, &[]);
            }
            c.go("vol", &[])
        };
        // before + STARTTLS + after + GO = MAX_OPTIONS: fits.
        let (r, _) = run_resumed(upgrade(plain(before)), inside(MAX_OPTIONS - before - 2));
        transmission(r);
        let (r, _) = run_resumed(upgrade(plain(before)), inside(MAX_OPTIONS - before - 1));
        assert!(matches!(r, Err(HandshakeError::TooManyOptions)), "{r:?}");
    }

    /// Options a fuzzed client picks from, so that random scripts get past the framing.
    fn arb_option() -> impl Strategy<Value = (u32, Vec<u8>)> {
        let names = prop_oneof![Just("vol"), Just("ro"), Just(""), Just("nope")];
        prop_oneof![
            (0u32..13, proptest::collection::vec(any::<u8>(), 0..40)),
            (names.clone(), proptest::collection::vec(any::<u16>(), 0..4))
                .prop_map(|(n, i)| (NBD_OPT_INFO, encode_info_request(n, &i))),
            (names.clone(), proptest::collection::vec("[a-z:]{0,16}", 0..4)).prop_map(|(n, q)| {
                let q: Vec<&str> = q.iter().map(String::as_str).collect();
                (NBD_OPT_SET_META_CONTEXT, encode_meta_context_request(n, &q))
            }),
            Just((NBD_OPT_STRUCTURED_REPLY, vec![])),
            names.prop_map(|n| (NBD_OPT_GO, encode_info_request(n, &[]))),
        ]
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut m = Mock::new(bytes);
            let _ = handshake(&mut m, lookup);
        }

        #[test]
        fn required_tls_never_serves_before_the_upgrade(
            options in proptest::collection::vec(arb_option(), 0..12),
        ) {
            let mut c = Client::new(FIXED);
            for (o, d) in &options {
                c = c.opt(*o, d);
            }
            let (r, s) = c.run_with(TlsPolicy::Required);
            prop_assert!(!matches!(r, Ok(Outcome::Transmission(_))), "{:?}", r);
            // Every reply is TLS_REQD, except ABORT's and STARTTLS's own.
            let mut s = s.greeting();
            while s.pos < s.bytes.len() {
                let (h, _) = s.reply();
                let ok = h.reply == NBD_REP_ERR_TLS_REQD
                    || (h.option == NBD_OPT_ABORT && h.reply == NBD_REP_ACK)
                    || (h.option == NBD_OPT_STARTTLS && matches!(h.reply, NBD_REP_ACK | NBD_REP_ERR_INVALID));
                prop_assert!(ok, "{:?}", h);
            }
        }

        #[test]
        fn random_option_sequences_terminate_consistently(
            flags in prop_oneof![Just(FIXED), Just(NO_ZEROES), any::<u32>()],
            options in proptest::collection::vec(arb_option(), 0..12),
            truncate in any::<prop::sample::Index>(),
            do_truncate in any::<bool>(),
        ) {
            let mut c = Client::new(flags);
            for (o, d) in &options {
                c = c.opt(*o, d);
            }
            if do_truncate && !c.0.is_empty() {
                let at = truncate.index(c.0.len());
                c.0.truncate(at);
            }
            let (r, s) = c.run();
            if let Ok(Some(n)) = r {
                // Whatever happened, the result is self-consistent.
                prop_assert!(lookup(&n.name).is_some());
                prop_assert_eq!(
                    n.transmission_flags,
                    transmission_flags(n.read_only, n.structured_replies)
                );
                prop_assert!(n.meta_contexts.is_empty() || n.structured_replies);
            }
            // The server's output always parses as greeting + well-formed replies (+ the
            // EXPORT_NAME reply at the very end, which has no framing; skip then).
            let mut s = s.greeting();
            while s.pos + OPTION_REPLY_HEADER_LEN <= s.bytes.len() {
                match parse_option_reply_header(&s.bytes[s.pos..]) {
                    Ok(Some(_)) => { s.reply(); }
                    _ => break,
                }
            }
        }
    }
}
