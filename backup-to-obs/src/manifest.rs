//! Manifests (JSON): one per volume backup at `manifests/<tenant>/<volume>/<backup-id>`, the
//! backup's commit point, and one per server backup at `servers/<tenant>/<server>/<id>`,
//! written after the manifests of its volumes.
//!
//! `"format": "evs-backup-manifest", "version": 1` (server backups: `"evs-backup-server-manifest"`).
//! Unknown fields are ignored when reading (a later minor addition stays readable); another
//! version is refused clearly. `parse_*` are pure and panic-free.

use serde::{Deserialize, Serialize};

use crate::error::CodecError;

pub const MANIFEST_FORMAT: &str = "evs-backup-manifest";
pub const MANIFEST_VERSION: u32 = 1;
pub const SERVER_MANIFEST_FORMAT: &str = "evs-backup-server-manifest";
pub const SERVER_MANIFEST_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupKind {
    Full,
    Incremental,
}

/// Counters of one backup (also returned by `Engine::backup`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BackupStats {
    /// Chunks in the index (= ceil(volume size / chunk size)).
    pub chunks: u64,
    /// Chunks that read as zeros (never written, or all zeros): nothing stored.
    pub chunks_zero: u64,
    /// Chunks read from the source by this backup (the rest came from the parent).
    pub chunks_read: u64,
    /// Chunks this backup stored.
    pub chunks_uploaded: u64,
    /// Chunks read whose content the store already had (or this backup had already stored).
    pub chunks_deduplicated: u64,
    pub bytes_read: u64,
    /// Bytes stored by this backup, as stored (compressed, encrypted, with headers).
    pub bytes_uploaded: u64,
    /// Bytes of the volume held in data chunks (volume size less zero chunks).
    pub bytes_logical: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub backup_id: String,
    pub tenant: String,
    pub volume: String,
    /// A label given at creation.
    #[serde(default)]
    pub name: Option<String>,
    pub volume_size: u64,
    pub chunk_size: u32,
    /// Unix time, milliseconds.
    pub created_ms: u64,
    pub az: String,
    /// The backup this incremental was based on (informational: the index is full).
    #[serde(default)]
    pub parent: Option<String>,
    pub kind: BackupKind,
    #[serde(default)]
    pub server_backup: Option<String>,
    /// The snapshot the backup was read from (informational).
    pub snapshot: String,
    pub encrypted: bool,
    /// Fingerprint of the tenant key (never the key), when encrypted.
    #[serde(default)]
    pub key_fingerprint: Option<String>,
    pub index_key: String,
    #[serde(default)]
    pub stats: BackupStats,
}

/// One volume backup of a server backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerVolume {
    pub volume: String,
    pub backup_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerManifest {
    pub format: String,
    pub version: u32,
    pub server_backup_id: String,
    pub tenant: String,
    pub server: String,
    #[serde(default)]
    pub name: Option<String>,
    pub created_ms: u64,
    pub az: String,
    /// The group snapshot all volumes were read from (informational).
    #[serde(default)]
    pub snapshot: String,
    pub volumes: Vec<ServerVolume>,
}

impl ServerManifest {
    /// A server manifest created now.
    pub fn new(
        tenant: &str,
        server: &str,
        server_backup_id: &str,
        name: Option<&str>,
        az: &str,
        snapshot: &str,
        volumes: Vec<ServerVolume>,
    ) -> ServerManifest {
        ServerManifest {
            format: SERVER_MANIFEST_FORMAT.into(),
            version: SERVER_MANIFEST_VERSION,
            server_backup_id: server_backup_id.into(),
            tenant: tenant.into(),
            server: server.into(),
            name: name.map(str::to_string),
            created_ms: now_ms(),
            az: az.into(),
            snapshot: snapshot.into(),
            volumes,
        }
    }
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[derive(Deserialize)]
struct Header {
    format: String,
    version: u32,
}

fn check_header(bytes: &[u8], format: &str, version: u32) -> Result<(), CodecError> {
    let h: Header = serde_json::from_slice(bytes).map_err(|e| CodecError::Corrupt(format!("not a manifest: {e}")))?;
    if h.format != format {
        return Err(CodecError::Unsupported(format!("format {:?}, expected {format:?}", h.format)));
    }
    if h.version != version {
        return Err(CodecError::Unsupported(format!(
            "{format} version {}; this build reads version {version}",
            h.version
        )));
    }
    Ok(())
}

pub fn encode_manifest(m: &Manifest) -> Vec<u8> {
    serde_json::to_vec_pretty(m).expect("plain struct")
}

pub fn parse_manifest(bytes: &[u8]) -> Result<Manifest, CodecError> {
    check_header(bytes, MANIFEST_FORMAT, MANIFEST_VERSION)?;
    serde_json::from_slice(bytes).map_err(|e| CodecError::Corrupt(format!("bad manifest: {e}")))
}

pub fn encode_server_manifest(m: &ServerManifest) -> Vec<u8> {
    serde_json::to_vec_pretty(m).expect("plain struct")
}

pub fn parse_server_manifest(bytes: &[u8]) -> Result<ServerManifest, CodecError> {
    check_header(bytes, SERVER_MANIFEST_FORMAT, SERVER_MANIFEST_VERSION)?;
    serde_json::from_slice(bytes).map_err(|e| CodecError::Corrupt(format!("bad server manifest: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT.into(),
            version: MANIFEST_VERSION,
            backup_id: "bk-20251201T120000123Z-abcdef".into(),
            tenant: "t1".into(),
            volume: "v1".into(),
            name: Some("nightly".into()),
            volume_size: 1 << 30,
            chunk_size: 1 << 20,
            created_ms: 1_764_590_400_123,
            az: "az1".into(),
            parent: None,
            kind: BackupKind::Full,
            server_backup: None,
            snapshot: "s1".into(),
            encrypted: false,
            key_fingerprint: None,
            index_key: "indexes/bk-20251201T120000123Z-abcdef".into(),
            stats: BackupStats { chunks: 1024, ..Default::default() },
        }
    }

    #[test]
    fn round_trip_and_unknown_fields_ignored() {
        let m = sample();
        let bytes = encode_manifest(&m);
        assert!(std::str::from_utf8(&bytes).unwrap().contains("\"kind\": \"full\""));
        assert_eq!(parse_manifest(&bytes).unwrap(), m);
        let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        v["added_later"] = serde_json::json!({"x": 1});
        v["stats"]["added_later"] = serde_json::json!(5);
        assert_eq!(parse_manifest(&serde_json::to_vec(&v).unwrap()).unwrap(), m);
    }

    #[test]
    fn other_versions_and_garbage_are_refused() {
        let mut v: serde_json::Value = serde_json::from_slice(&encode_manifest(&sample())).unwrap();
        v["version"] = 2.into();
        let e = parse_manifest(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert_eq!(e, CodecError::Unsupported("evs-backup-manifest version 2; this build reads version 1".into()));
        v["version"] = 1.into();
        v["format"] = "evs-backup-server-manifest".into();
        assert!(matches!(parse_manifest(&serde_json::to_vec(&v).unwrap()), Err(CodecError::Unsupported(_))));
        v["format"] = "evs-backup-manifest".into();
        v.as_object_mut().unwrap().remove("volume_size");
        assert!(matches!(parse_manifest(&serde_json::to_vec(&v).unwrap()), Err(CodecError::Corrupt(_))));
        let bytes = encode_manifest(&sample());
        for len in 0..bytes.len() - 1 {
            assert!(parse_manifest(&bytes[..len]).is_err(), "truncation to {len}");
        }
    }

    #[test]
    fn server_manifest_round_trip() {
        let m = ServerManifest::new(
            "t1",
            "srv",
            "sbk-20251201T120000123Z-abcdef",
            None,
            "az1",
            "g1",
            vec![ServerVolume { volume: "v1".into(), backup_id: "bk-20251201T120000123Z-abcdef".into() }],
        );
        assert_eq!(parse_server_manifest(&encode_server_manifest(&m)).unwrap(), m);
        assert!(parse_manifest(&encode_server_manifest(&m)).is_err());
    }
}
