//! Attach tokens → volumes: what the NBD server may serve, and to whom.
//!
//! An attach token is the NBD export name: 32 random bytes, hex, bound to one volume. The
//! control API persists attachments in the catalog and mirrors them here; detach removes the
//! entry and closes the connections that used it.
//!
//! An attachment is served over one protocol: NBD (the token is the export name) or
//! vhost-user-blk (the token names a unix socket of [`crate::vhost`]); the NBD server does not
//! serve vhost-user tokens.

use std::collections::HashMap;
use std::sync::Arc;

use evs_snapshot::Volume;
use parking_lot::Mutex;

use crate::vhost::{VhostError, VhostUserServer};
use crate::volume_io::VolumeIo;

/// The front end an attachment is served on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    #[default]
    Nbd,
    VhostUser,
}

impl Protocol {
    /// Parses the API's `protocol` field: "" or "nbd", or "vhost-user".
    pub fn parse(s: &str) -> Option<Protocol> {
        match s {
            "" | "nbd" => Some(Protocol::Nbd),
            "vhost-user" | "vhost-user-blk" => Some(Protocol::VhostUser),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Protocol::Nbd => "nbd",
            Protocol::VhostUser => "vhost-user",
        }
    }
}

/// Shuts down one connection's socket (a handle on a clone of the socket).
pub type Closer = Arc<dyn Fn(std::net::Shutdown) + Send + Sync>;

/// One attached volume as the NBD server sees it.
#[derive(Clone)]
pub struct Export {
    pub volume_id: u64,
    /// The volume, or the snapshot's read-only view.
    pub volume: Arc<Volume>,
    pub read_only: bool,
    /// The snapshot served (a read-only export), if it is one.
    pub snapshot: Option<u64>,
    /// The volume's QoS limiter and counters (a snapshot export shares its volume's).
    pub io: Arc<VolumeIo>,
    /// The front end serving it.
    pub protocol: Protocol,
}

#[derive(Default)]
struct Inner {
    exports: HashMap<String, Export>,
    /// Live connections per token (connection id, closer), shut down on revoke.
    conns: HashMap<String, Vec<(u64, Closer)>>,
}

/// The registry shared by the API (which adds and revokes) and the NBD server (which looks up).
#[derive(Default)]
pub struct ExportRegistry {
    inner: Mutex<Inner>,
    /// The vhost-user front end, when the daemon runs one.
    vhost: Mutex<Option<Arc<VhostUserServer>>>,
}

/// Why an export could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("this daemon has no vhost-user front end")]
    NoVhostUser,
    #[error(transparent)]
    Vhost(#[from] VhostError),
}

impl ExportRegistry {
    pub fn new() -> Arc<ExportRegistry> {
        Arc::new(ExportRegistry::default())
    }

    /// A fresh unguessable token (256 bits from the OS RNG, hex).
    pub fn new_token() -> String {
        let mut b = [0u8; 32];
        getrandom::fill(&mut b).expect("OS random number generator");
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    pub fn insert(&self, token: String, export: Export) {
        self.inner.lock().exports.insert(token, export);
    }

    /// Gives the registry its vhost-user front end (before attachments are loaded).
    pub fn set_vhost(&self, server: Arc<VhostUserServer>) {
        *self.vhost.lock() = Some(server);
    }

    /// The vhost-user front end, if any.
    pub fn vhost(&self) -> Option<Arc<VhostUserServer>> {
        self.vhost.lock().clone()
    }

    /// Registers `export` under `token` and, for a vhost-user export, starts its socket.
    /// Returns the socket path of a vhost-user export. On error nothing is registered.
    pub fn serve(&self, token: String, export: Export) -> Result<Option<std::path::PathBuf>, ServeError> {
        let path = match export.protocol {
            Protocol::Nbd => None,
            Protocol::VhostUser => {
                let server = self.vhost().ok_or(ServeError::NoVhostUser)?;
                // Registered first, so a frontend that connects at once finds the token.
                self.insert(token.clone(), export.clone());
                match server.listen(&token, export) {
                    Ok(p) => return Ok(Some(p)),
                    Err(e) => {
                        self.inner.lock().exports.remove(&token);
                        return Err(e.into());
                    }
                }
            }
        };
        self.insert(token, export);
        Ok(path)
    }

    /// The export for `token`, if attached.
    pub fn lookup(&self, token: &str) -> Option<Export> {
        self.inner.lock().exports.get(token).cloned()
    }

    /// Whether any token serves volume `volume_id` itself (not one of its snapshots).
    pub fn is_attached(&self, volume_id: u64) -> bool {
        self.inner.lock().exports.values().any(|e| e.volume_id == volume_id && e.snapshot.is_none())
    }

    /// Whether any token serves snapshot `snap`.
    pub fn is_snapshot_attached(&self, snap: u64) -> bool {
        self.inner.lock().exports.values().any(|e| e.snapshot == Some(snap))
    }

    /// Live connections (NBD clients, vhost-user frontends) to volume `volume_id` itself.
    pub fn volume_connections(&self, volume_id: u64) -> usize {
        let g = self.inner.lock();
        g.exports
            .iter()
            .filter(|(_, e)| e.volume_id == volume_id && e.snapshot.is_none())
            .map(|(t, _)| g.conns.get(t).map_or(0, Vec::len))
            .sum()
    }

    /// Tells the vhost-user frontends of volume `volume_id` that its capacity changed (NBD has
    /// no such notice: its clients see the new size when they connect again). Returns how
    /// many were told.
    pub fn volume_resized(&self, volume_id: u64) -> usize {
        let tokens: Vec<String> = self
            .inner
            .lock()
            .exports
            .iter()
            .filter(|(_, e)| e.volume_id == volume_id && e.snapshot.is_none() && e.protocol == Protocol::VhostUser)
            .map(|(t, _)| t.clone())
            .collect();
        let Some(vhost) = self.vhost() else { return 0 };
        tokens.iter().filter(|t| vhost.config_changed(t)).count()
    }

    /// Removes `token` and shuts down the connections that use it. Returns whether it existed.
    pub fn revoke(&self, token: &str) -> bool {
        let mut g = self.inner.lock();
        let removed = g.exports.remove(token);
        let existed = removed.is_some();
        if removed.is_some_and(|e| e.protocol == Protocol::VhostUser) {
            if let Some(v) = self.vhost.lock().as_ref() {
                v.stop(token);
            }
        }
        if let Some(conns) = g.conns.remove(token) {
            for (_, close) in conns {
                close(std::net::Shutdown::Both);
            }
        }
        existed
    }

    /// Records a live connection on `token` (so revoke can close it). False if the token was
    /// revoked in the meantime.
    pub fn register_conn(&self, token: &str, conn: u64, close: Closer) -> bool {
        let mut g = self.inner.lock();
        if !g.exports.contains_key(token) {
            return false;
        }
        g.conns.entry(token.to_string()).or_default().push((conn, close));
        true
    }

    pub fn unregister_conn(&self, token: &str, conn: u64) {
        let mut g = self.inner.lock();
        if let Some(v) = g.conns.get_mut(token) {
            v.retain(|(c, _)| *c != conn);
            if v.is_empty() {
                g.conns.remove(token);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Protocol;

    #[test]
    fn protocol_names() {
        assert_eq!(Protocol::parse(""), Some(Protocol::Nbd));
        assert_eq!(Protocol::parse("nbd"), Some(Protocol::Nbd));
        assert_eq!(Protocol::parse("vhost-user"), Some(Protocol::VhostUser));
        assert_eq!(Protocol::parse("iscsi"), None);
        assert_eq!(Protocol::parse("VHOST-USER"), None);
        for p in [Protocol::Nbd, Protocol::VhostUser] {
            assert_eq!(Protocol::parse(p.name()), Some(p));
        }
    }
}
