//! Checks of API input, as pure functions: run before anything is touched, so bad input
//! changes nothing.

use std::fmt;

use evs_snapshot::MAX_VOLUME_SIZE;

use crate::qos::TierSpec;

/// Longest tier name (tiers the config file adds are named like volumes, shorter).
pub const MAX_TIER_NAME_LEN: usize = 32;
/// The tier of a volume created without `--tier`.
pub const DEFAULT_TIER: &str = "gpssd";
/// The tier without QoS, reserved for the admin tenant (benchmarks, infrastructure volumes).
pub const UNLIMITED_TIER: &str = "unlimited";
/// Longest volume name (fits a DNS label, so names can appear in host names and URIs).
pub const MAX_NAME_LEN: usize = 63;
/// Volume sizes are whole 512-byte sectors: the smallest block NBD clients address.
pub const SECTOR: u64 = 512;

/// Why an input was refused. The message names the offending value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("invalid volume name {name:?}: {why}")]
    Name { name: String, why: &'static str },
    #[error("invalid size {size} bytes: {why}")]
    Size { size: u64, why: String },
    #[error("unknown tier {name:?} (expected one of: {known})")]
    Tier { name: String, known: String },
    #[error("invalid snapshot name {name:?}: {why}")]
    SnapshotName { name: String, why: &'static str },
    #[error("invalid snapshot reference {0:?}: expected VOLUME@SNAP")]
    SnapshotRef(String),
    #[error("a group snapshot needs at least one volume, each listed once")]
    GroupVolumes,
    #[error("a group snapshot takes either volumes or a server, not both")]
    GroupVolumesAndServer,
    #[error("invalid tenant name {name:?}: {why}")]
    TenantName { name: String, why: &'static str },
    #[error("invalid server name {name:?}: {why}")]
    ServerName { name: String, why: &'static str },
    #[error("a server needs 1 to {max} volumes, each listed once (got {got})")]
    ServerVolumes { got: usize, max: usize },
    #[error("invalid backup id {0:?}: expected bk-... or sbk-... as `backup list` prints")]
    BackupId(String),
    #[error("invalid encryption key: {0}")]
    EncryptionKey(String),
    #[error("backups are listed by volume or by server, not both")]
    ListFilter,
    #[error("a restore needs exactly one of --to NEW_VOLUME and --in-place")]
    RestoreTarget,
    #[error("a volume starts from a snapshot or from a backup, not both (--from-snapshot, --from-backup)")]
    TwoSources,
    #[error("backup {0:?} is a server backup: restore it with `evsctl backup restore {0} --to NAME` (one volume per disk of the server)")]
    ServerBackupToVolume(String),
    #[error("invalid label {name:?}: {why}")]
    Label { name: String, why: &'static str },
    #[error("invalid policy name {name:?}: {why}")]
    PolicyName { name: String, why: &'static str },
    #[error("{0}")]
    Policy(String),
    #[error("a policy binds exactly one of a volume and a server")]
    PolicyTarget,
    #[error("invalid group name {name:?}: {why}")]
    GroupName { name: String, why: &'static str },
    #[error("invalid endpoint {0:?}: expected http://HOST:PORT or https://HOST:PORT")]
    Endpoint(String),
    #[error("{0}")]
    Dr(String),
    #[error("unknown protocol {0:?} (expected nbd or vhost-user)")]
    Protocol(String),
    #[error("a unix-socket NBD URI (--unix) and --protocol vhost-user do not go together: vhost-user is always a unix socket")]
    UnixWithVhostUser,
}

/// The front end an attach asks for: "" or "nbd", or "vhost-user"; `require_unix` is for NBD.
pub fn validate_protocol(protocol: &str, require_unix: bool) -> Result<crate::exports::Protocol, ValidationError> {
    let p = crate::exports::Protocol::parse(protocol).ok_or_else(|| ValidationError::Protocol(protocol.to_string()))?;
    if require_unix && p == crate::exports::Protocol::VhostUser {
        return Err(ValidationError::UnixWithVhostUser);
    }
    Ok(p)
}

/// A policy name: the same rules as a volume name.
pub fn validate_policy_name(name: &str) -> Result<(), ValidationError> {
    validate_volume_name(name).map_err(|e| match e {
        ValidationError::Name { name, why } => ValidationError::PolicyName { name, why },
        other => other,
    })
}

/// A backup label: 1 to 63 of `[A-Za-z0-9._:-]`.
pub fn validate_label(name: &str) -> Result<(), ValidationError> {
    let err = |why| Err(ValidationError::Label { name: name.to_string(), why });
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return err("1 to 63 characters");
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':')) {
        return err("only letters, digits, '.', '_', ':' and '-' are allowed");
    }
    Ok(())
}

/// A tenant name: the same rules as a volume name.
pub fn validate_tenant_name(name: &str) -> Result<(), ValidationError> {
    validate_volume_name(name).map_err(|e| match e {
        ValidationError::Name { name, why } => ValidationError::TenantName { name, why },
        other => other,
    })
}

/// A protection group name: the same rules as a volume name.
pub fn validate_group_name(name: &str) -> Result<(), ValidationError> {
    validate_volume_name(name).map_err(|e| match e {
        ValidationError::Name { name, why } => ValidationError::GroupName { name, why },
        other => other,
    })
}

/// A server name: the same rules as a volume name.
pub fn validate_server_name(name: &str) -> Result<(), ValidationError> {
    validate_volume_name(name).map_err(|e| match e {
        ValidationError::Name { name, why } => ValidationError::ServerName { name, why },
        other => other,
    })
}

/// A snapshot name: the same rules as a volume name.
pub fn validate_snapshot_name(name: &str) -> Result<(), ValidationError> {
    validate_volume_name(name).map_err(|e| match e {
        ValidationError::Name { name, why } => ValidationError::SnapshotName { name, why },
        other => other,
    })
}

/// Splits `VOLUME@SNAP` into its two valid names.
pub fn parse_snapshot_ref(s: &str) -> Result<(&str, &str), ValidationError> {
    let (v, n) = s.split_once('@').ok_or_else(|| ValidationError::SnapshotRef(s.to_string()))?;
    validate_volume_name(v)?;
    validate_snapshot_name(n)?;
    Ok((v, n))
}

/// A volume name: 1 to 63 characters of `[A-Za-z0-9._-]`, starting with a letter or a digit.
/// `@` (snapshot separator in `VOLUME@SNAP`) and `/` (path separator) are thereby excluded.
pub fn validate_volume_name(name: &str) -> Result<(), ValidationError> {
    let err = |why| Err(ValidationError::Name { name: name.to_string(), why });
    let Some(first) = name.chars().next() else {
        return err("the name is empty");
    };
    if name.len() > MAX_NAME_LEN {
        return err("longer than 63 characters");
    }
    if !first.is_ascii_alphanumeric() {
        return err("must start with a letter or a digit");
    }
    if name.contains('@') {
        return err("'@' is reserved for snapshots (VOLUME@SNAP)");
    }
    if name.contains('/') {
        return err("'/' is not allowed");
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
        return err("only letters, digits, '.', '_' and '-' are allowed");
    }
    Ok(())
}

/// A volume size: positive, whole 512-byte sectors, at most 32 TiB.
pub fn validate_volume_size(size: u64) -> Result<(), ValidationError> {
    let err = |why: String| Err(ValidationError::Size { size, why });
    if size == 0 {
        return err("the size must be greater than zero".into());
    }
    // Too large first: a huge value (a negative number sent as unsigned, say) is told so.
    if size > MAX_VOLUME_SIZE {
        return err(format!("the largest volume is {}", HumanBytes(MAX_VOLUME_SIZE)));
    }
    if !size.is_multiple_of(SECTOR) {
        return err("the size must be a multiple of 512 bytes".into());
    }
    Ok(())
}

/// The canonical name of `tier` among the configured `tiers` and `unlimited`; the empty
/// string means the default tier.
pub fn validate_tier<'a>(tier: &str, tiers: &'a [TierSpec]) -> Result<&'a str, ValidationError> {
    if tier.is_empty() {
        return Ok(DEFAULT_TIER);
    }
    if tier == UNLIMITED_TIER {
        return Ok(UNLIMITED_TIER);
    }
    tiers
        .iter()
        .map(|t| t.name.as_str())
        .find(|t| *t == tier)
        .ok_or_else(|| ValidationError::Tier { name: tier.to_string(), known: tier_names(tiers) })
}

/// The tiers a volume can have, for messages: "common, high, …, unlimited".
pub fn tier_names(tiers: &[TierSpec]) -> String {
    tiers.iter().map(|t| t.name.as_str()).chain([UNLIMITED_TIER]).collect::<Vec<_>>().join(", ")
}

/// A name for a tier the config file adds: 1 to 32 of `a-z`, `0-9` and `-`, starting with a
/// letter (so it reads well in `volume list` and metric labels); `unlimited` is taken.
pub fn validate_tier_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > MAX_TIER_NAME_LEN {
        return Err("a tier name has 1 to 32 characters");
    }
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err("a tier name starts with a lowercase letter");
    }
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        return Err("a tier name has only a-z, 0-9 and '-'");
    }
    if name == UNLIMITED_TIER {
        return Err("unlimited is the tier without limits; it has none to set");
    }
    Ok(())
}

/// Bytes in binary units for messages ("10 GiB", "1.5 MiB", "4096 B").
pub struct HumanBytes(pub u64);

impl fmt::Display for HumanBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
        let b = self.0;
        if b < 1024 {
            return write!(f, "{b} B");
        }
        let mut unit = 0;
        let mut scale = 1024u64;
        while unit + 1 < UNITS.len() && b >= scale * 1024 {
            scale *= 1024;
            unit += 1;
        }
        if b.is_multiple_of(scale) {
            write!(f, "{} {}", b / scale, UNITS[unit])
        } else {
            write!(f, "{:.1} {}", b as f64 / scale as f64, UNITS[unit])
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn protocols() {
        use crate::exports::Protocol;
        assert_eq!(validate_protocol("", false), Ok(Protocol::Nbd));
        assert_eq!(validate_protocol("nbd", true), Ok(Protocol::Nbd));
        assert_eq!(validate_protocol("vhost-user", false), Ok(Protocol::VhostUser));
        assert_eq!(validate_protocol("vhost-user", true), Err(ValidationError::UnixWithVhostUser));
        assert_eq!(validate_protocol("iscsi", false), Err(ValidationError::Protocol("iscsi".into())));
    }

    use super::*;

    #[test]
    fn good_names() {
        for n in ["a", "0", "vol-1", "db.data_01", "A.b-C_d", &"x".repeat(63)] {
            assert_eq!(validate_volume_name(n), Ok(()), "{n}");
        }
    }

    #[test]
    fn bad_names_say_why() {
        let why = |n: &str| match validate_volume_name(n) {
            Err(ValidationError::Name { why, .. }) => why,
            Ok(()) => panic!("{n:?} accepted"),
            Err(e) => panic!("{e}"),
        };
        assert!(why("").contains("empty"));
        assert!(why(&"x".repeat(64)).contains("63"));
        assert!(why("-vol").contains("start"));
        assert!(why(".vol").contains("start"));
        assert!(why("vol@snap").contains('@'));
        assert!(why("a/b").contains('/'));
        assert!(why("a b").contains("only"));
        assert!(why("vél").contains("only"));
        let msg = validate_volume_name("a b").unwrap_err().to_string();
        assert!(msg.contains("\"a b\""), "{msg}");
    }

    #[test]
    fn sizes() {
        assert!(validate_volume_size(512).is_ok());
        assert!(validate_volume_size(10 << 30).is_ok());
        assert!(validate_volume_size(MAX_VOLUME_SIZE).is_ok());
        for bad in [0, 1, 511, 513, 4097, MAX_VOLUME_SIZE + 512] {
            assert!(validate_volume_size(bad).is_err(), "{bad}");
        }
        let msg = validate_volume_size(MAX_VOLUME_SIZE + 512).unwrap_err().to_string();
        assert!(msg.contains("32 TiB"), "{msg}");
        let msg = validate_volume_size(u64::MAX).unwrap_err().to_string();
        assert!(msg.contains("the largest volume is 32 TiB"), "{msg}");
        assert!(validate_volume_size(100).unwrap_err().to_string().contains("512"));
    }

    #[test]
    fn tiers() {
        let mut tiers = crate::qos::default_tiers();
        assert_eq!(validate_tier("", &tiers), Ok("gpssd"));
        for t in ["common", "high", "gpssd", "ultra-high", "essd", "unlimited"] {
            assert_eq!(validate_tier(t, &tiers), Ok(t));
        }
        let known = "common, high, gpssd, ultra-high, essd, unlimited".to_string();
        assert_eq!(validate_tier("GPSSD", &tiers), Err(ValidationError::Tier { name: "GPSSD".into(), known }));
        assert!(validate_tier("fast", &tiers).unwrap_err().to_string().contains("\"fast\""));
        // A tier of the config file is known, and listed in the error.
        tiers.push(TierSpec { name: "fast".into(), ..tiers[0].clone() });
        assert_eq!(validate_tier("fast", &tiers), Ok("fast"));
        let msg = validate_tier("slow", &tiers).unwrap_err().to_string();
        assert!(msg.ends_with("(expected one of: common, high, gpssd, ultra-high, essd, fast, unlimited)"), "{msg}");
    }

    #[test]
    fn tier_names() {
        for ok in ["gold", "nvme-2", "a", &"x".repeat(32)] {
            assert_eq!(validate_tier_name(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("", "1 to 32"),
            (&"x".repeat(33), "1 to 32"),
            ("2fast", "starts with"),
            ("-x", "starts with"),
            ("Gold", "starts with"),
            ("go ld", "only a-z"),
            ("gold!", "only a-z"),
            ("unlimited", "without limits"),
        ] {
            let e = validate_tier_name(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn human_bytes() {
        assert_eq!(HumanBytes(0).to_string(), "0 B");
        assert_eq!(HumanBytes(4096).to_string(), "4 KiB");
        assert_eq!(HumanBytes(10 << 30).to_string(), "10 GiB");
        assert_eq!(HumanBytes(3 << 29).to_string(), "1.5 GiB");
        assert_eq!(HumanBytes(32 << 40).to_string(), "32 TiB");
    }
}
