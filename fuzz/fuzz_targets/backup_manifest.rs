//! Backup manifests (volume and server), the FORMAT marker, and the key and id parsers the
//! engine applies to what it reads or lists from the object store.
//!
//! Two readings of every input:
//! * raw: the bytes are an object (or a key) from the store. Nothing panics; a manifest that
//!   parses re-encodes to a manifest that parses to the same value (JSON is not canonical, so
//!   the round trip is on values); a key or id that parses is rebuilt to the same string.
//! * structured (`arbitrary`): a manifest built from the input encodes and parses back equal.

#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use evs_backup::layout::{
    check_format, chunk_key, format_timestamp, manifest_key, parse_chunk_key, parse_timestamp, server_manifest_key,
    split_manifest_key, validate_name, MANIFESTS_PREFIX, SERVERS_PREFIX,
};
use evs_backup::manifest::{
    encode_manifest, encode_server_manifest, parse_server_manifest, MANIFEST_FORMAT, MANIFEST_VERSION,
    SERVER_MANIFEST_FORMAT, SERVER_MANIFEST_VERSION,
};
use evs_backup::{
    parse_manifest, validate_backup_id, validate_server_backup_id, BackupKind, BackupStats, Manifest, ServerManifest,
    ServerVolume,
};
use libfuzzer_sys::arbitrary::{self, Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct ArbManifest {
    backup_id: String,
    tenant: String,
    volume: String,
    name: Option<String>,
    volume_size: u64,
    chunk_size: u32,
    created_ms: u64,
    az: String,
    parent: Option<String>,
    incremental: bool,
    server_backup: Option<String>,
    snapshot: String,
    encrypted: bool,
    key_fingerprint: Option<String>,
    index_key: String,
    stats: [u64; 8],
}

#[derive(Arbitrary, Debug)]
struct ArbServerManifest {
    server_backup_id: String,
    tenant: String,
    server: String,
    name: Option<String>,
    created_ms: u64,
    az: String,
    snapshot: String,
    volumes: Vec<(String, String)>,
}

/// What the engine does with the names and ids of a manifest it read (`check_manifest`):
/// validation only, which must answer, never panic.
fn check_ids(m: &Manifest) {
    let _ = validate_name("tenant", &m.tenant);
    let _ = validate_name("volume", &m.volume);
    let _ = validate_backup_id(&m.backup_id);
    if let Some(p) = &m.parent {
        let _ = validate_backup_id(p);
    }
    if let Some(s) = &m.server_backup {
        let _ = validate_server_backup_id(s);
    }
    if validate_name("tenant", &m.tenant).is_ok()
        && validate_name("volume", &m.volume).is_ok()
        && validate_backup_id(&m.backup_id).is_ok()
    {
        let key = manifest_key(&m.tenant, &m.volume, &m.backup_id);
        assert_eq!(
            split_manifest_key(MANIFESTS_PREFIX, &key),
            Some((m.tenant.as_str(), m.volume.as_str(), m.backup_id.as_str()))
        );
    }
}

fn raw(data: &[u8]) {
    if let Ok(m) = parse_manifest(data) {
        assert_eq!((m.format.as_str(), m.version), (MANIFEST_FORMAT, MANIFEST_VERSION));
        check_ids(&m);
        assert_eq!(parse_manifest(&encode_manifest(&m)).as_ref(), Ok(&m), "manifest round trip");
        assert!(parse_server_manifest(data).is_err(), "a volume manifest also parsed as a server manifest");
    }
    if let Ok(m) = parse_server_manifest(data) {
        assert_eq!((m.format.as_str(), m.version), (SERVER_MANIFEST_FORMAT, SERVER_MANIFEST_VERSION));
        let _ = validate_name("tenant", &m.tenant);
        let _ = validate_name("server", &m.server);
        let _ = validate_server_backup_id(&m.server_backup_id);
        for v in &m.volumes {
            let _ = validate_name("volume", &v.volume);
            let _ = validate_backup_id(&v.backup_id);
        }
        assert_eq!(parse_server_manifest(&encode_server_manifest(&m)).as_ref(), Ok(&m), "server manifest round trip");
    }
    let _ = check_format(data);

    // The same bytes as a key listed from the store, or an id.
    let Ok(s) = std::str::from_utf8(data) else { return };
    let _ = validate_backup_id(s);
    let _ = validate_server_backup_id(s);
    if let Some(ms) = parse_timestamp(s) {
        // The stamp is canonical: fixed width, every field range-checked.
        assert_eq!(format_timestamp(UNIX_EPOCH + Duration::from_millis(ms)), s, "timestamp round trip");
    }
    if let Some(id) = parse_chunk_key(s) {
        assert_eq!(chunk_key(&id), s, "chunk key round trip");
    }
    if let Some((t, v, id)) = split_manifest_key(MANIFESTS_PREFIX, s) {
        assert_eq!(manifest_key(t, v, id), s, "manifest key round trip");
    }
    if let Some((t, srv, id)) = split_manifest_key(SERVERS_PREFIX, s) {
        assert_eq!(server_manifest_key(t, srv, id), s, "server manifest key round trip");
    }
}

fn structured(data: &[u8]) {
    let mut u = Unstructured::new(data);
    if let Ok(a) = ArbManifest::arbitrary(&mut u) {
        let [chunks, chunks_zero, chunks_read, chunks_uploaded, chunks_deduplicated, bytes_read, bytes_uploaded, bytes_logical] =
            a.stats;
        let m = Manifest {
            format: MANIFEST_FORMAT.into(),
            version: MANIFEST_VERSION,
            backup_id: a.backup_id,
            tenant: a.tenant,
            volume: a.volume,
            name: a.name,
            volume_size: a.volume_size,
            chunk_size: a.chunk_size,
            created_ms: a.created_ms,
            az: a.az,
            parent: a.parent,
            kind: if a.incremental { BackupKind::Incremental } else { BackupKind::Full },
            server_backup: a.server_backup,
            snapshot: a.snapshot,
            encrypted: a.encrypted,
            key_fingerprint: a.key_fingerprint,
            index_key: a.index_key,
            stats: BackupStats {
                chunks,
                chunks_zero,
                chunks_read,
                chunks_uploaded,
                chunks_deduplicated,
                bytes_read,
                bytes_uploaded,
                bytes_logical,
            },
        };
        let bytes = encode_manifest(&m);
        assert_eq!(parse_manifest(&bytes).as_ref(), Ok(&m), "manifest round trip");
        assert!(parse_server_manifest(&bytes).is_err());
        check_ids(&m);
    }
    if let Ok(a) = ArbServerManifest::arbitrary(&mut u) {
        let m = ServerManifest {
            format: SERVER_MANIFEST_FORMAT.into(),
            version: SERVER_MANIFEST_VERSION,
            server_backup_id: a.server_backup_id,
            tenant: a.tenant,
            server: a.server,
            name: a.name,
            created_ms: a.created_ms,
            az: a.az,
            snapshot: a.snapshot,
            volumes: a.volumes.into_iter().map(|(volume, backup_id)| ServerVolume { volume, backup_id }).collect(),
        };
        let bytes = encode_server_manifest(&m);
        assert_eq!(parse_server_manifest(&bytes).as_ref(), Ok(&m), "server manifest round trip");
        assert!(parse_manifest(&bytes).is_err());
    }
}

fuzz_target!(|data: &[u8]| {
    raw(data);
    structured(data);
});
