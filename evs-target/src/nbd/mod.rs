//! The NBD front end.
//!
//! * [`proto`]: the wire protocol as plain types, parsers and encoders; no I/O (fuzzed).
//! * [`handshake`]: the fixed-newstyle option haggling, over any `Read + Write`.
//! * [`server`]: listeners and the transmission phase on an I/O engine.
//! * [`tls`]: the TLS handshake after STARTTLS and the pump between the encrypted socket and
//!   the plain-text socket the transmission phase runs on.

pub mod handshake;
pub mod proto;
pub mod server;
pub mod tls;
