//! Where things live in the store, how backups are named, and the store's FORMAT marker.
//!
//! ```text
//! <root>/FORMAT                                  {"format":"evs-backup","version":1}
//! <root>/chunks/<first 2 hex of id>/<64 hex id>  chunk objects, content-addressed, stored once per store
//! <root>/indexes/<backup-id>                     fixed index of one backup, written before its manifest
//! <root>/manifests/<tenant>/<volume>/<backup-id> manifest of one volume backup: THE COMMIT POINT, written last
//! <root>/servers/<tenant>/<server>/<server-backup-id>  server backup manifest, after its volume manifests
//! <root>/leases/backups/<backup-id>              a backup in progress (refreshed while it runs)
//! <root>/leases/gc                               a garbage collection in progress
//! ```
//!
//! A backup exists iff its manifest exists. Listing a tenant's backups lists only
//! `manifests/<tenant>/`; only gc lists the whole store.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::chunk::ChunkId;
use crate::error::{BackupError, CodecError};

pub const FORMAT_KEY: &str = "FORMAT";
pub const FORMAT_NAME: &str = "evs-backup";
pub const FORMAT_VERSION: u32 = 1;
pub const CHUNKS_PREFIX: &str = "chunks/";
pub const INDEXES_PREFIX: &str = "indexes/";
pub const MANIFESTS_PREFIX: &str = "manifests/";
pub const SERVERS_PREFIX: &str = "servers/";
pub const BACKUP_LEASES_PREFIX: &str = "leases/backups/";
pub const GC_LEASE_KEY: &str = "leases/gc";

pub const BACKUP_ID_PREFIX: &str = "bk-";
pub const SERVER_BACKUP_ID_PREFIX: &str = "sbk-";
/// Longest tenant, volume or server name that goes into a key.
pub const MAX_NAME_LEN: usize = 128;

pub fn chunk_key(id: &ChunkId) -> String {
    let hex = id.to_hex();
    format!("{CHUNKS_PREFIX}{}/{hex}", &hex[..2])
}

/// The chunk id a key of `chunks/` names, if it is one.
pub fn parse_chunk_key(key: &str) -> Option<ChunkId> {
    let rest = key.strip_prefix(CHUNKS_PREFIX)?;
    let (dir, hex) = rest.split_once('/')?;
    let id = ChunkId::from_hex(hex)?;
    (dir == &hex[..2]).then_some(id)
}

pub fn index_key(backup_id: &str) -> String {
    format!("{INDEXES_PREFIX}{backup_id}")
}

pub fn manifest_key(tenant: &str, volume: &str, backup_id: &str) -> String {
    format!("{MANIFESTS_PREFIX}{tenant}/{volume}/{backup_id}")
}

/// The prefix holding a tenant's manifests, or one volume's.
pub fn manifest_prefix(tenant: &str, volume: Option<&str>) -> String {
    match volume {
        Some(v) => format!("{MANIFESTS_PREFIX}{tenant}/{v}/"),
        None => format!("{MANIFESTS_PREFIX}{tenant}/"),
    }
}

/// Splits `manifests/<tenant>/<volume>/<backup-id>` (or `servers/<tenant>/<server>/<id>`
/// with `SERVERS_PREFIX`).
pub fn split_manifest_key<'a>(prefix: &str, key: &'a str) -> Option<(&'a str, &'a str, &'a str)> {
    let mut parts = key.strip_prefix(prefix)?.split('/');
    let (t, v, id) = (parts.next()?, parts.next()?, parts.next()?);
    parts.next().is_none().then_some((t, v, id))
}

pub fn server_manifest_key(tenant: &str, server: &str, server_backup_id: &str) -> String {
    format!("{SERVERS_PREFIX}{tenant}/{server}/{server_backup_id}")
}

pub fn server_manifest_prefix(tenant: &str, server: Option<&str>) -> String {
    match server {
        Some(s) => format!("{SERVERS_PREFIX}{tenant}/{s}/"),
        None => format!("{SERVERS_PREFIX}{tenant}/"),
    }
}

pub fn backup_lease_key(backup_id: &str) -> String {
    format!("{BACKUP_LEASES_PREFIX}{backup_id}")
}

/// Checks a tenant, volume or server name that becomes a key component: 1 to 128 of
/// `[A-Za-z0-9._-]`, starting with a letter or a digit (so never `.`, `..` or empty).
pub fn validate_name(what: &str, name: &str) -> Result<(), BackupError> {
    let why = if name.is_empty() {
        "is empty"
    } else if name.len() > MAX_NAME_LEN {
        "is longer than 128 characters"
    } else if !name.as_bytes()[0].is_ascii_alphanumeric() {
        "must start with a letter or a digit"
    } else if !name.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-')) {
        "may hold only letters, digits, '.', '_' and '-'"
    } else {
        return Ok(());
    };
    Err(BackupError::Invalid(format!("{what} name {name:?} {why}")))
}

/// A new backup id for `now`: `bk-YYYYMMDDTHHMMSSmmmZ-<6 hex>` (sorts by time).
pub fn new_backup_id(now: SystemTime) -> String {
    new_id(BACKUP_ID_PREFIX, now)
}

/// A new server backup id: `sbk-YYYYMMDDTHHMMSSmmmZ-<6 hex>`.
pub fn new_server_backup_id(now: SystemTime) -> String {
    new_id(SERVER_BACKUP_ID_PREFIX, now)
}

fn new_id(prefix: &str, now: SystemTime) -> String {
    let mut r = [0u8; 3];
    // An id must be unique; a failing system RNG falls back to the clock's nanoseconds.
    if getrandom::fill(&mut r).is_err() {
        let n = now.duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        r.copy_from_slice(&n.to_le_bytes()[..3]);
    }
    format!("{prefix}{}-{}", format_timestamp(now), crate::crypto::hex(&r))
}

/// Checks a backup id given by a user (`bk-…`).
pub fn validate_backup_id(id: &str) -> Result<(), BackupError> {
    validate_id(BACKUP_ID_PREFIX, "backup", id)
}

/// Checks a server backup id given by a user (`sbk-…`).
pub fn validate_server_backup_id(id: &str) -> Result<(), BackupError> {
    validate_id(SERVER_BACKUP_ID_PREFIX, "server backup", id)
}

fn validate_id(prefix: &str, what: &str, id: &str) -> Result<(), BackupError> {
    let bad = || {
        BackupError::Invalid(format!("invalid {what} id {id:?}: expected {prefix}YYYYMMDDTHHMMSSmmmZ-<6 hex digits>"))
    };
    let rest = id.strip_prefix(prefix).ok_or_else(bad)?;
    let (stamp, tail) = rest.split_once('-').ok_or_else(bad)?;
    if tail.len() != 6 || !tail.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(bad());
    }
    parse_timestamp(stamp).ok_or_else(bad)?;
    Ok(())
}

/// `YYYYMMDDTHHMMSSmmmZ` in UTC.
pub fn format_timestamp(t: SystemTime) -> String {
    let ms = t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    let (days, rem) = (ms / 86_400_000, ms % 86_400_000);
    let (y, m, d) = civil_from_days(days as i64);
    let (h, mi, s, milli) = (rem / 3_600_000, rem / 60_000 % 60, rem / 1000 % 60, rem % 1000);
    format!("{y:04}{m:02}{d:02}T{h:02}{mi:02}{s:02}{milli:03}Z")
}

/// Milliseconds since the epoch of a `YYYYMMDDTHHMMSSmmmZ` stamp, if it is a valid one.
pub fn parse_timestamp(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    // ASCII only: the fields below are sliced by byte position, and a multi-byte character
    // across one of those positions would make the slice panic.
    if b.len() != 19 || !s.is_ascii() || b[8] != b'T' || b[18] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u64> {
        let part = &s[r];
        part.bytes().all(|c| c.is_ascii_digit()).then(|| part.parse().ok())?
    };
    let (y, mo, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (h, mi, sec, ms) = (num(9..11)?, num(11..13)?, num(13..15)?, num(15..18)?);
    if !(1970..=9999).contains(&y) || !(1..=12).contains(&mo) || h > 23 || mi > 59 || sec > 59 {
        return None;
    }
    let days = days_from_civil(y as i64, mo as u32, d as u32)?;
    Some(days as u64 * 86_400_000 + h * 3_600_000 + mi * 60_000 + sec * 1000 + ms)
}

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> Option<i64> {
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let month_days = [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    if d == 0 || d > month_days[(m - 1) as usize] {
        return None;
    }
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some(era * 146_097 + doe - 719_468)
}

/// The store's FORMAT object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FormatMarker {
    pub format: String,
    pub version: u32,
}

pub fn encode_format() -> Vec<u8> {
    serde_json::to_vec(&FormatMarker { format: FORMAT_NAME.into(), version: FORMAT_VERSION }).expect("plain struct")
}

/// Checks a FORMAT object: this format, this version.
pub fn check_format(bytes: &[u8]) -> Result<(), CodecError> {
    let m: FormatMarker =
        serde_json::from_slice(bytes).map_err(|e| CodecError::Corrupt(format!("not a FORMAT marker: {e}")))?;
    if m.format != FORMAT_NAME {
        return Err(CodecError::Unsupported(format!(
            "the store holds format {:?}, not {FORMAT_NAME:?}: it is not an EVS backup store",
            m.format
        )));
    }
    if m.version != FORMAT_VERSION {
        return Err(CodecError::Unsupported(format!(
            "the store is format version {}; this build reads and writes version {FORMAT_VERSION}",
            m.version
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn keys() {
        let id = ChunkId::of(b"x", None);
        let k = chunk_key(&id);
        assert_eq!(k.len(), "chunks/".len() + 3 + 64);
        assert_eq!(parse_chunk_key(&k), Some(id));
        assert_eq!(parse_chunk_key(&format!("chunks/zz/{}", id.to_hex())), None);
        assert_eq!(parse_chunk_key("chunks/ab"), None);
        assert_eq!(manifest_key("t", "v", "bk-1"), "manifests/t/v/bk-1");
        assert_eq!(split_manifest_key(MANIFESTS_PREFIX, "manifests/t/v/bk-1"), Some(("t", "v", "bk-1")));
        assert_eq!(split_manifest_key(MANIFESTS_PREFIX, "manifests/t/v/bk-1/x"), None);
        assert_eq!(split_manifest_key(MANIFESTS_PREFIX, "manifests/t/v"), None);
    }

    #[test]
    fn ids_are_valid_sortable_and_unique() {
        let t = UNIX_EPOCH + Duration::from_millis(1_764_590_400_123); // 2025-12-01T12:00:00.123Z
        let a = new_backup_id(t);
        assert!(a.starts_with("bk-20251201T120000123Z-"), "{a}");
        validate_backup_id(&a).unwrap();
        assert!(validate_server_backup_id(&a).is_err());
        let s = new_server_backup_id(t);
        validate_server_backup_id(&s).unwrap();
        assert!(validate_backup_id(&s).is_err());
        let later = new_backup_id(t + Duration::from_millis(1));
        assert!(later > a);
        assert_ne!(new_backup_id(t), new_backup_id(t));
        assert_eq!(parse_timestamp(&format_timestamp(t)), Some(1_764_590_400_123));
    }

    #[test]
    fn timestamps_round_trip_over_the_calendar() {
        for days in (0..30_000u64).step_by(37) {
            let ms = days * 86_400_000 + 45_296_789;
            let t = UNIX_EPOCH + Duration::from_millis(ms);
            assert_eq!(parse_timestamp(&format_timestamp(t)), Some(ms));
        }
        assert_eq!(format_timestamp(UNIX_EPOCH + Duration::from_secs(951_782_400)), "20000229T000000000Z");
    }

    #[test]
    fn bad_ids_are_refused() {
        for bad in [
            "",
            "bk-",
            "bk-20251201T120000123Z",
            "bk-20251201T120000123Z-abc",
            "bk-20251201T120000123Z-ABCDEF",
            "bk-20251201T120000123Z-abcdefa",
            "bk-20251301T120000123Z-abcdef",
            "bk-20250230T120000123Z-abcdef",
            "bk-20251201T250000123Z-abcdef",
            "bk-20251201X120000123Z-abcdef",
            "bk-2025120lT120000123Z-abcdef",
            "bk-+0251201T120000123Z-abcdef",
            "xx-20251201T120000123Z-abcdef",
            "bk-20251201T120000123Z-abcdef/../x",
            "../bk-20251201T120000123Z-abcdef",
        ] {
            let e = validate_backup_id(bad).unwrap_err();
            assert!(e.to_string().contains("invalid backup id"), "{bad}: {e}");
        }
    }

    /// Found by the `backup_manifest` fuzz target: a stamp with a multi-byte character
    /// straddling a field boundary panicked (byte-range slicing of a `str`: "end byte index 6
    /// is not a char boundary; it is inside '€'") instead of being refused. The engine checks
    /// the backup id of every manifest it reads from the store this way (and of ids given by
    /// callers), so one hostile manifest made it panic instead of reporting a corrupt object.
    #[test]
    fn non_ascii_stamps_are_refused_not_a_panic() {
        // The fuzzer's input, as it found it.
        let found = std::str::from_utf8(b"2025\xe2\x82\xac0T12\x13\x00\x13\x00\x00\x003Z").unwrap();
        assert_eq!(found.len(), 19);
        assert_eq!(parse_timestamp(found), None);
        assert!(validate_backup_id(&format!("bk-{found}-abcdef")).is_err());
        // "202é201T120000123Z": 19 bytes, 'T' at byte 8, 'Z' at byte 18, and 'é' (2 bytes) at
        // bytes 3..5, across the year/month boundary at byte 4.
        let stamp = "202\u{e9}201T120000123Z";
        assert_eq!(stamp.len(), 19);
        assert_eq!(parse_timestamp(stamp), None);
        let e = validate_backup_id(&format!("bk-{stamp}-abcdef")).unwrap_err();
        assert!(e.to_string().contains("invalid backup id"), "{e}");
        let e = validate_server_backup_id(&format!("sbk-{stamp}-abcdef")).unwrap_err();
        assert!(e.to_string().contains("invalid server backup id"), "{e}");
        // The same at every other field boundary.
        for at in [6, 11, 13, 15] {
            let mut b = b"20251201T120000123Z".to_vec();
            b.splice(at - 1..at + 1, "\u{e9}".bytes());
            let s = String::from_utf8(b).unwrap();
            assert_eq!(s.len(), 19);
            assert_eq!(parse_timestamp(&s), None, "{s}");
        }
    }

    #[test]
    fn names() {
        validate_name("volume", "vol-1.a_b").unwrap();
        for bad in ["", ".", "..", "-a", "a/b", "a b", "é", &"a".repeat(129)] {
            let e = validate_name("volume", bad).unwrap_err();
            assert!(e.to_string().starts_with("volume name"), "{e}");
        }
    }

    #[test]
    fn format_marker() {
        check_format(&encode_format()).unwrap();
        assert_eq!(encode_format(), br#"{"format":"evs-backup","version":1}"#);
        assert!(matches!(check_format(br#"{"format":"evs-backup","version":2}"#), Err(CodecError::Unsupported(_))));
        assert!(matches!(check_format(br#"{"format":"other","version":1}"#), Err(CodecError::Unsupported(_))));
        assert!(matches!(check_format(b"garbage"), Err(CodecError::Corrupt(_))));
    }
}
