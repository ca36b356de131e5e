//! Daemon configuration: command-line flags over an optional TOML file over defaults.
//!
//! The file takes the flags' names in snake_case (`nbd_listen = "0.0.0.0:10809"`). Every value
//! is checked by the same function whether it comes from a flag or the file; a bad value in
//! the file is reported with its file, line and key, an unknown key likewise.
//!
//! Settings that only make sense together are checked last, on the merged result: the TLS
//! certificate and key come as a pair, NBD TLS needs them, and a listener on a non-loopback
//! address must not serve plain text unless `allow_plaintext` says so.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::ops::Range;
use std::path::{Path, PathBuf};

use clap::Parser;
use serde::Deserialize;
use toml::Spanned;

use evs_backup::StoreUrl;

use crate::api::validate::validate_tier_name;
use crate::jobs::{JobOptions, DEFAULT_MAX_RUNNING_PER_TENANT};
use crate::qos::{default_tiers, RateSpec, TierSpec, DEFAULT_BURST_SECONDS, MB};

/// For messages about `[tiers.NAME]`.
const BUILT_IN_TIERS: &str = "common, high, gpssd, ultra-high and essd";

pub const DEFAULT_DATA_DIR: &str = "./evs-data";
pub const DEFAULT_AZ: &str = "az1";
pub const DEFAULT_NBD_LISTEN: &str = "127.0.0.1:10809";
pub const DEFAULT_API_LISTEN: &str = "127.0.0.1:10810";
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:10811";
/// Writes up to this size go through O_DIRECT when direct writes are on: small random
/// writes are where the page cache hurts; large sequential ones gain from it.
pub const DIRECT_WRITE_MAX: usize = 64 * 1024;

/// `evs-target`'s command line.
#[derive(Debug, Default, Parser)]
#[command(name = "evs-target", version, about = "EVS volume server: NBD exports of thin volumes, gRPC control API")]
pub struct Flags {
    /// TOML file with the same settings (snake_case keys); flags override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory of the catalog, the volume data and admin.token [default: ./evs-data].
    #[arg(long, value_name = "DIR", value_parser = parse_data_dir)]
    pub data_dir: Option<PathBuf>,
    /// Availability zone of this node [default: az1].
    #[arg(long, value_name = "NAME", value_parser = parse_az)]
    pub az: Option<String>,
    /// NBD TCP listen address [default: 127.0.0.1:10809].
    #[arg(long, value_name = "ADDR", value_parser = parse_listen)]
    pub nbd_listen: Option<ListenAddr>,
    /// Also serve NBD on this unix socket.
    #[arg(long, value_name = "PATH", value_parser = parse_socket_path)]
    pub nbd_socket: Option<PathBuf>,
    /// Directory of the vhost-user-blk sockets (one per vhost-user attachment; the daemon
    /// creates it with mode 0700) [default: <data-dir>/vhost].
    #[arg(long, value_name = "DIR", value_parser = parse_vhost_user_dir)]
    pub vhost_user_dir: Option<PathBuf>,
    /// gRPC API listen address [default: 127.0.0.1:10810].
    #[arg(long, value_name = "ADDR", value_parser = parse_listen)]
    pub api_listen: Option<ListenAddr>,
    /// Prometheus metrics listen address, GET /metrics [default: 127.0.0.1:10811].
    #[arg(long, value_name = "ADDR", value_parser = parse_listen)]
    pub metrics_listen: Option<ListenAddr>,
    /// Backup object store: file:///PATH, s3://BUCKET/PREFIX?region=R&endpoint=URL or
    /// obs://BUCKET/PREFIX?endpoint=URL [default: file://<data-dir>/obs].
    #[arg(long, value_name = "URL", value_parser = parse_backup_store)]
    pub backup_store: Option<StoreUrl>,
    /// I/O backend of the data path [default: auto = io_uring if the kernel allows it].
    #[arg(long, value_name = "uring|portable|auto", value_parser = parse_io_backend)]
    pub io_backend: Option<IoBackend>,
    /// O_DIRECT for small writes [default: on].
    #[arg(long, value_name = "on|off", value_parser = parse_on_off)]
    pub direct_writes: Option<OnOff>,
    /// Log filter: a level (error, warn, info, debug, trace) or tracing directives
    /// [default: $RUST_LOG, else info].
    #[arg(long, value_name = "LEVEL", value_parser = parse_log)]
    pub log: Option<String>,
    /// TLS certificate chain (PEM), server certificate first: the gRPC API then serves
    /// https only, and NBD offers STARTTLS. Needs --tls-key.
    #[arg(long, value_name = "FILE", value_parser = parse_file_path)]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM: PKCS#8, PKCS#1 or SEC1) of --tls-cert.
    #[arg(long, value_name = "FILE", value_parser = parse_file_path)]
    pub tls_key: Option<PathBuf>,
    /// NBD TLS: off; on (STARTTLS offered, required from non-loopback peers); require (every
    /// connection, the unix socket too) [default: on with a certificate, else off].
    #[arg(long, value_name = "off|on|require", value_parser = parse_nbd_tls)]
    pub nbd_tls: Option<NbdTls>,
    /// Let a listener on a non-loopback address serve plain text (no TLS) [default: false].
    #[arg(
        long,
        value_name = "BOOL",
        value_parser = parse_bool,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true"
    )]
    pub allow_plaintext: Option<bool>,
}

/// The resolved configuration the daemon runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub data_dir: PathBuf,
    pub az: String,
    pub nbd_listen: ListenAddr,
    pub nbd_socket: Option<PathBuf>,
    /// Where vhost-user-blk sockets are created (`vhost_user_dir`, default `<data-dir>/vhost`).
    pub vhost_user_dir: PathBuf,
    pub api_listen: ListenAddr,
    pub metrics_listen: ListenAddr,
    pub backup_store: StoreUrl,
    pub io_backend: IoBackend,
    pub direct_writes: bool,
    /// Snapshots one volume may have (config file `max_snapshots_per_volume`, default 128).
    pub max_snapshots: usize,
    /// The QoS tiers (config file `[tiers.NAME]`, defaults as the service description).
    pub tiers: Vec<TierSpec>,
    /// Quotas of a tenant created without explicit ones (config file `[quotas]`).
    pub default_quota: Quota,
    /// Job limits (config file `max_running_jobs_per_tenant`, `delete_bytes_per_second`).
    pub jobs: JobOptions,
    /// Backup settings and limits (config file `[backups]`).
    pub backups: BackupSettings,
    /// None: `RUST_LOG` if set, else `info`.
    pub log: Option<String>,
    /// Certificate and key of the gRPC API and NBD TLS (read and checked at start-up).
    pub tls: Option<TlsFiles>,
    pub nbd_tls: NbdTls,
    /// Plain-text listeners on non-loopback addresses are allowed.
    pub allow_plaintext: bool,
}

/// How backups are made and how many a tenant may keep (`[backups]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackupSettings {
    /// Bytes per chunk: a power of two from 64 KiB to 64 MiB.
    pub chunk_size: u32,
    /// Chunks uploaded or downloaded at once per job.
    pub concurrency: usize,
    pub zstd_level: i32,
    /// Unreferenced chunks younger than this are kept by gc (a backup may be uploading them).
    pub gc_grace_seconds: u64,
    /// Limits of the service description; 0 = unlimited.
    pub max_per_volume: u64,
    pub max_per_tenant: u64,
    pub max_bytes_per_tenant: u64,
    /// How often the policy scheduler looks for due policies, seconds.
    pub scheduler_interval_seconds: u64,
}

impl Default for BackupSettings {
    fn default() -> Self {
        BackupSettings {
            chunk_size: 1 << 20,
            concurrency: 8,
            zstd_level: 3,
            gc_grace_seconds: 3600,
            max_per_volume: 20,
            max_per_tenant: 360,
            max_bytes_per_tenant: 200 * 1_000_000_000_000,
            scheduler_interval_seconds: 5,
        }
    }
}

/// The PEM files of the server's TLS identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `nbd_tls`: when NBD connections use TLS (`NBD_OPT_STARTTLS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NbdTls {
    /// No TLS: STARTTLS is refused.
    Off,
    /// STARTTLS offered; loopback TCP peers and the unix socket may stay in plain text, other
    /// peers must upgrade before anything else.
    On,
    /// Every connection must upgrade before anything else.
    Require,
}

impl NbdTls {
    pub fn name(self) -> &'static str {
        match self {
            NbdTls::Off => "off",
            NbdTls::On => "on",
            NbdTls::Require => "require",
        }
    }
}

/// A tenant's quotas; 0 means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub max_volumes: u64,
    pub max_capacity: u64,
}

/// Default quotas of a new tenant: 200 volumes, 1 PiB of provisioned capacity.
pub const DEFAULT_QUOTA: Quota = Quota { max_volumes: 200, max_capacity: 1 << 50 };

/// Default of `max_snapshots_per_volume`.
pub const DEFAULT_MAX_SNAPSHOTS: usize = 128;
/// Largest accepted `max_snapshots_per_volume`.
pub const MAX_MAX_SNAPSHOTS: i64 = 4096;
/// Largest accepted `max_running_jobs_per_tenant` (each running job is a thread).
pub const MAX_MAX_RUNNING_JOBS: i64 = 64;
/// Smallest accepted `delete_bytes_per_second` (1 MiB/s): slower would make a deletion of a
/// large volume take days.
pub const MIN_DELETE_BYTES_PER_SECOND: i64 = 1 << 20;

/// A configuration problem; the message names the flag or the file, line and key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    /// A TOML syntax or type error, or an unknown key.
    #[error("{}:{line}:{column}: {message} (in `{text}`)", path.display())]
    Syntax { path: PathBuf, line: usize, column: usize, message: String, text: String },
    /// A well-formed value that is not acceptable.
    #[error("{}:{line}: {key}: {message}", path.display())]
    Value { path: PathBuf, line: usize, key: &'static str, message: String },
    /// Settings that do not go together; the message names each (flag, or file:line:key).
    #[error("{0}")]
    Conflict(String),
    /// A listener on a non-loopback address would serve plain text.
    #[error(
        "{listener} would serve plain text on {addr} ({origin}), which is not a loopback address: {fix}, \
         or set allow_plaintext = true (--allow-plaintext) to accept that"
    )]
    Plaintext { listener: &'static str, addr: String, origin: String, fix: &'static str },
    /// A listen address that does not resolve, checked because it would serve plain text.
    #[error("cannot resolve {listener} address {addr} ({origin}): {message}")]
    Resolve { listener: &'static str, addr: String, origin: String, message: String },
}

impl Config {
    /// Flags over the `--config` file (if any) over the defaults.
    pub fn load(flags: Flags) -> Result<Config, ConfigError> {
        let (config, origins) = Config::merge(flags)?;
        check_exposure(&config, &origins, resolve_listen)?;
        Ok(config)
    }

    /// Flags over file over defaults, with the pairwise checks; `Origins` says where each
    /// setting named in an error came from.
    fn merge(flags: Flags) -> Result<(Config, Origins), ConfigError> {
        let file = match &flags.config {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
                FileConfig::parse(&text, path)?
            }
            None => FileConfig::default(),
        };
        let origins = Origins::new(&flags, &file);
        let data_dir = flags.data_dir.or(file.data_dir).unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let backup_store =
            flags.backup_store.or(file.backup_store).unwrap_or_else(|| StoreUrl::File { path: data_dir.join("obs") });
        let tls = match (flags.tls_cert.or(file.tls_cert), flags.tls_key.or(file.tls_key)) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::Conflict(format!(
                    "{} is set but tls_key is not: give the certificate's private key too (--tls-key or tls_key)",
                    origins.of("tls_cert")
                )))
            }
            (None, Some(_)) => {
                return Err(ConfigError::Conflict(format!(
                    "{} is set but tls_cert is not: give the certificate too (--tls-cert or tls_cert)",
                    origins.of("tls_key")
                )))
            }
        };
        let nbd_tls = match flags.nbd_tls.or(file.nbd_tls) {
            Some(mode @ (NbdTls::On | NbdTls::Require)) if tls.is_none() => {
                return Err(ConfigError::Conflict(format!(
                    "{} = {} needs a certificate: set tls_cert and tls_key (--tls-cert, --tls-key)",
                    origins.of("nbd_tls"),
                    mode.name()
                )))
            }
            Some(mode) => mode,
            None if tls.is_some() => NbdTls::On,
            None => NbdTls::Off,
        };
        let config = Config {
            tls,
            nbd_tls,
            allow_plaintext: flags.allow_plaintext.or(file.allow_plaintext).unwrap_or(false),
            az: flags.az.or(file.az).unwrap_or_else(|| DEFAULT_AZ.to_string()),
            nbd_listen: flags.nbd_listen.or(file.nbd_listen).unwrap_or_else(|| ListenAddr(DEFAULT_NBD_LISTEN.into())),
            nbd_socket: flags.nbd_socket.or(file.nbd_socket),
            vhost_user_dir: flags.vhost_user_dir.or(file.vhost_user_dir).unwrap_or_else(|| data_dir.join("vhost")),
            api_listen: flags.api_listen.or(file.api_listen).unwrap_or_else(|| ListenAddr(DEFAULT_API_LISTEN.into())),
            metrics_listen: flags
                .metrics_listen
                .or(file.metrics_listen)
                .unwrap_or_else(|| ListenAddr(DEFAULT_METRICS_LISTEN.into())),
            backup_store,
            io_backend: flags.io_backend.or(file.io_backend).unwrap_or(IoBackend::Auto),
            direct_writes: flags.direct_writes.or(file.direct_writes).map(|o| o.0).unwrap_or(true),
            max_snapshots: file.max_snapshots.unwrap_or(DEFAULT_MAX_SNAPSHOTS),
            tiers: file.tiers.unwrap_or_else(default_tiers),
            default_quota: file.default_quota.unwrap_or(DEFAULT_QUOTA),
            backups: file.backups.unwrap_or_default(),
            jobs: JobOptions {
                max_running_per_tenant: file.max_running_jobs.unwrap_or(DEFAULT_MAX_RUNNING_PER_TENANT),
                delete_bytes_per_second: file.delete_bytes_per_second,
            },
            log: flags.log.or(file.log),
            data_dir,
        };
        Ok((config, origins))
    }
}

/// Where the settings that cross-checks name came from: a flag, a line of the config file, or
/// the default.
#[derive(Debug, Default)]
struct Origins(BTreeMap<&'static str, String>);

impl Origins {
    fn new(flags: &Flags, file: &FileConfig) -> Origins {
        let mut o = Origins::default();
        let flag_set = [
            ("tls_cert", flags.tls_cert.is_some()),
            ("tls_key", flags.tls_key.is_some()),
            ("nbd_tls", flags.nbd_tls.is_some()),
            ("nbd_listen", flags.nbd_listen.is_some()),
            ("api_listen", flags.api_listen.is_some()),
        ];
        for (key, set) in flag_set {
            let text = if set {
                format!("--{}", key.replace('_', "-"))
            } else if let (Some(line), Some(path)) = (file.lines.get(key), &flags.config) {
                format!("{key} at {}:{line}", path.display())
            } else {
                format!("{key} (default)")
            };
            o.0.insert(key, text);
        }
        o
    }

    fn of(&self, key: &'static str) -> &str {
        self.0.get(key).map(String::as_str).unwrap_or(key)
    }
}

/// Refuses plain text on a listener reachable from other hosts: the gRPC API without a
/// certificate, or NBD over TCP with `nbd_tls = off`, on an address that is not loopback
/// (`0.0.0.0` and `::` are not), unless `allow_plaintext`. A host name counts as loopback when
/// every address it resolves to is. `resolve` is the resolver (tests pass their own).
fn check_exposure(
    config: &Config,
    origins: &Origins,
    resolve: impl Fn(&str) -> Result<Vec<SocketAddr>, String>,
) -> Result<(), ConfigError> {
    if config.allow_plaintext {
        return Ok(());
    }
    let plain = [
        (
            "the gRPC API",
            "api_listen",
            &config.api_listen,
            config.tls.is_none(),
            "configure a certificate (tls_cert and tls_key, or --tls-cert and --tls-key)",
        ),
        (
            "NBD",
            "nbd_listen",
            &config.nbd_listen,
            config.nbd_tls == NbdTls::Off,
            if config.tls.is_some() {
                "set nbd_tls = \"on\" or \"require\" (--nbd-tls)"
            } else {
                "configure a certificate (tls_cert and tls_key, or --tls-cert and --tls-key) with nbd_tls \"on\" \
                 or \"require\""
            },
        ),
    ];
    for (listener, key, addr, is_plain, fix) in plain {
        if !is_plain {
            continue;
        }
        let origin = origins.of(key).to_string();
        let loopback = is_loopback(addr, &resolve).map_err(|message| ConfigError::Resolve {
            listener,
            addr: addr.0.clone(),
            origin: origin.clone(),
            message,
        })?;
        if !loopback {
            return Err(ConfigError::Plaintext { listener, addr: addr.0.clone(), origin, fix });
        }
    }
    Ok(())
}

/// Whether every address `addr` stands for is a loopback address.
fn is_loopback(addr: &ListenAddr, resolve: impl Fn(&str) -> Result<Vec<SocketAddr>, String>) -> Result<bool, String> {
    let addrs = match addr.0.parse::<SocketAddr>() {
        Ok(a) => vec![a],
        Err(_) => resolve(&addr.0)?,
    };
    if addrs.is_empty() {
        return Err("it resolves to no address".into());
    }
    Ok(addrs.iter().all(|a| is_loopback_ip(a.ip())))
}

/// Loopback, including an IPv4-mapped IPv6 loopback address (`::ffff:127.0.0.1`).
pub fn is_loopback_ip(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// The system resolver, as binding will use it.
fn resolve_listen(addr: &str) -> Result<Vec<SocketAddr>, String> {
    addr.to_socket_addrs().map(Iterator::collect).map_err(|e| e.to_string())
}

/// The settings a config file may hold, each validated.
#[derive(Debug, Default, PartialEq)]
struct FileConfig {
    tiers: Option<Vec<TierSpec>>,
    backups: Option<BackupSettings>,
    default_quota: Option<Quota>,
    data_dir: Option<PathBuf>,
    az: Option<String>,
    nbd_listen: Option<ListenAddr>,
    nbd_socket: Option<PathBuf>,
    vhost_user_dir: Option<PathBuf>,
    api_listen: Option<ListenAddr>,
    metrics_listen: Option<ListenAddr>,
    backup_store: Option<StoreUrl>,
    io_backend: Option<IoBackend>,
    direct_writes: Option<OnOff>,
    max_snapshots: Option<usize>,
    max_running_jobs: Option<usize>,
    delete_bytes_per_second: Option<u64>,
    log: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    nbd_tls: Option<NbdTls>,
    allow_plaintext: Option<bool>,
    /// Line of each key present, for errors about combinations of settings.
    lines: BTreeMap<&'static str, usize>,
}

/// The file as TOML gives it, with the position of every value for error messages.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    data_dir: Option<Spanned<String>>,
    az: Option<Spanned<String>>,
    nbd_listen: Option<Spanned<String>>,
    nbd_socket: Option<Spanned<String>>,
    vhost_user_dir: Option<Spanned<String>>,
    api_listen: Option<Spanned<String>>,
    metrics_listen: Option<Spanned<String>>,
    backup_store: Option<Spanned<String>>,
    io_backend: Option<Spanned<String>>,
    /// `true`/`false` or `"on"`/`"off"`, like the flag.
    direct_writes: Option<Spanned<toml::Value>>,
    max_snapshots_per_volume: Option<Spanned<i64>>,
    max_running_jobs_per_tenant: Option<Spanned<i64>>,
    delete_bytes_per_second: Option<Spanned<i64>>,
    log: Option<Spanned<String>>,
    tls_cert: Option<Spanned<String>>,
    tls_key: Option<Spanned<String>>,
    nbd_tls: Option<Spanned<String>>,
    allow_plaintext: Option<Spanned<bool>>,
    /// `[tiers.NAME]`: overrides of the default tiers, key by key.
    tiers: Option<std::collections::BTreeMap<Spanned<String>, RawTier>>,
    quotas: Option<RawQuotas>,
    backups: Option<RawBackups>,
}

/// The `[backups]` table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackups {
    /// Bytes, or a size string ("1M").
    chunk_size: Option<Spanned<toml::Value>>,
    concurrency: Option<Spanned<i64>>,
    zstd_level: Option<Spanned<i64>>,
    gc_grace_seconds: Option<Spanned<i64>>,
    max_per_volume: Option<Spanned<i64>>,
    max_per_tenant: Option<Spanned<i64>>,
    /// Bytes, or a size string; "T" here is binary like everywhere in the file.
    max_bytes_per_tenant: Option<Spanned<toml::Value>>,
    scheduler_interval_seconds: Option<Spanned<i64>>,
}

/// One `[tiers.NAME]` table. IOPS in I/O units per second, bandwidth in MB/s (10^6 bytes).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTier {
    iops_baseline: Option<Spanned<f64>>,
    iops_per_gib: Option<Spanned<f64>>,
    iops_max: Option<Spanned<f64>>,
    iops_burst: Option<Spanned<f64>>,
    mbps_baseline: Option<Spanned<f64>>,
    mbps_per_gib: Option<Spanned<f64>>,
    mbps_max: Option<Spanned<f64>>,
    mbps_burst: Option<Spanned<f64>>,
    burst_seconds: Option<Spanned<f64>>,
}

/// The `[quotas]` table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuotas {
    max_volumes_per_tenant: Option<Spanned<i64>>,
    /// Bytes, or a size string ("100T").
    max_capacity_per_tenant: Option<Spanned<toml::Value>>,
}

impl FileConfig {
    fn parse(text: &str, path: &Path) -> Result<FileConfig, ConfigError> {
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            let (line, column) = line_col(text, span.start);
            ConfigError::Syntax {
                path: path.to_path_buf(),
                line,
                column,
                message: e.message().trim().to_string(),
                text: text.lines().nth(line - 1).unwrap_or("").trim().to_string(),
            }
        })?;
        // Each value through its checker; an error carries the key and the value's line.
        fn check<T>(
            text: &str,
            path: &Path,
            key: &'static str,
            v: Option<Spanned<String>>,
            parse: fn(&str) -> Result<T, String>,
        ) -> Result<Option<T>, ConfigError> {
            let Some(v) = v else { return Ok(None) };
            let span: Range<usize> = v.span();
            parse(v.get_ref()).map(Some).map_err(|message| ConfigError::Value {
                path: path.to_path_buf(),
                line: line_col(text, span.start).0,
                key,
                message,
            })
        }
        let direct_writes = match raw.direct_writes {
            None => None,
            Some(v) => {
                let span = v.span();
                let parsed = match v.get_ref() {
                    toml::Value::Boolean(b) => Ok(OnOff(*b)),
                    toml::Value::String(s) => parse_on_off(s),
                    other => Err(format!("expected on, off, true or false, found a {}", other.type_str())),
                };
                Some(parsed.map_err(|message| ConfigError::Value {
                    path: path.to_path_buf(),
                    line: line_col(text, span.start).0,
                    key: "direct_writes",
                    message,
                })?)
            }
        };
        let mut lines = BTreeMap::new();
        for (key, span) in [
            ("tls_cert", raw.tls_cert.as_ref().map(Spanned::span)),
            ("tls_key", raw.tls_key.as_ref().map(Spanned::span)),
            ("nbd_tls", raw.nbd_tls.as_ref().map(Spanned::span)),
            ("nbd_listen", raw.nbd_listen.as_ref().map(Spanned::span)),
            ("api_listen", raw.api_listen.as_ref().map(Spanned::span)),
        ] {
            if let Some(span) = span {
                lines.insert(key, line_col(text, span.start).0);
            }
        }
        let max_snapshots = match raw.max_snapshots_per_volume {
            None => None,
            Some(v) if (1..=MAX_MAX_SNAPSHOTS).contains(v.get_ref()) => Some(*v.get_ref() as usize),
            Some(v) => {
                return Err(ConfigError::Value {
                    path: path.to_path_buf(),
                    line: line_col(text, v.span().start).0,
                    key: "max_snapshots_per_volume",
                    message: format!("{} is not between 1 and {MAX_MAX_SNAPSHOTS}", v.get_ref()),
                })
            }
        };
        let value_err = |key: &'static str, at: usize, message: String| ConfigError::Value {
            path: path.to_path_buf(),
            line: line_col(text, at).0,
            key,
            message,
        };
        let tiers = match raw.tiers {
            None => None,
            Some(tables) => {
                let mut tiers = default_tiers();
                for (name, t) in tables {
                    let at = name.span().start;
                    let name = name.into_inner();
                    if let Some(tier) = tiers.iter_mut().find(|x| x.name == name) {
                        apply_tier(tier, t, at, &value_err)?;
                        continue;
                    }
                    if let Err(why) = validate_tier_name(&name) {
                        return Err(value_err("tiers", at, format!("invalid tier name {name:?}: {why}")));
                    }
                    let tier = new_tier(name, t, at, &value_err)?;
                    tiers.push(tier);
                }
                Some(tiers)
            }
        };
        let default_quota = match raw.quotas {
            None => None,
            Some(q) => {
                let mut quota = DEFAULT_QUOTA;
                if let Some(v) = q.max_volumes_per_tenant {
                    if *v.get_ref() < 0 {
                        return Err(value_err(
                            "max_volumes_per_tenant",
                            v.span().start,
                            format!("{} is negative (0 means unlimited)", v.get_ref()),
                        ));
                    }
                    quota.max_volumes = *v.get_ref() as u64;
                }
                if let Some(v) = q.max_capacity_per_tenant {
                    let parsed = match v.get_ref() {
                        toml::Value::Integer(n) if *n >= 0 => Ok(*n as u64),
                        toml::Value::Integer(n) => Err(format!("{n} is negative (0 means unlimited)")),
                        toml::Value::String(s) => parse_size(s),
                        other => Err(format!("expected bytes or a size like \"100T\", found a {}", other.type_str())),
                    };
                    quota.max_capacity = parsed.map_err(|m| value_err("max_capacity_per_tenant", v.span().start, m))?;
                }
                Some(quota)
            }
        };
        let int = |key: &'static str, v: Option<Spanned<i64>>, lo: i64, hi: i64| -> Result<Option<i64>, ConfigError> {
            let Some(v) = v else { return Ok(None) };
            check_int(*v.get_ref(), lo, hi).map(Some).map_err(|message| ConfigError::Value {
                path: path.to_path_buf(),
                line: line_col(text, v.span().start).0,
                key,
                message,
            })
        };
        let max_running_jobs =
            int("max_running_jobs_per_tenant", raw.max_running_jobs_per_tenant, 1, MAX_MAX_RUNNING_JOBS)?
                .map(|n| n as usize);
        let delete_bytes_per_second =
            int("delete_bytes_per_second", raw.delete_bytes_per_second, MIN_DELETE_BYTES_PER_SECOND, i64::MAX)?
                .map(|n| n as u64);
        let backups = match raw.backups {
            None => None,
            Some(b) => {
                let mut out = BackupSettings::default();
                let size = |key: &'static str, v: &Spanned<toml::Value>| -> Result<u64, ConfigError> {
                    match v.get_ref() {
                        toml::Value::Integer(n) if *n >= 0 => Ok(*n as u64),
                        toml::Value::String(s) => parse_size(s),
                        other => Err(format!("expected bytes or a size like \"1M\", found {other}")),
                    }
                    .map_err(|m| value_err(key, v.span().start, m))
                };
                if let Some(v) = &b.chunk_size {
                    let n = size("chunk_size", v)?;
                    if !n.is_power_of_two() || !(64 << 10..=64 << 20).contains(&n) {
                        return Err(value_err(
                            "chunk_size",
                            v.span().start,
                            format!("{n} is not a power of two from 64 KiB to 64 MiB"),
                        ));
                    }
                    out.chunk_size = n as u32;
                }
                if let Some(v) = &b.max_bytes_per_tenant {
                    out.max_bytes_per_tenant = size("max_bytes_per_tenant", v)?;
                }
                let int = |key: &'static str,
                           v: &Option<Spanned<i64>>,
                           lo: i64,
                           hi: i64|
                 -> Result<Option<i64>, ConfigError> {
                    let Some(v) = v else { return Ok(None) };
                    check_int(*v.get_ref(), lo, hi).map(Some).map_err(|m| value_err(key, v.span().start, m))
                };
                if let Some(n) = int("concurrency", &b.concurrency, 1, 256)? {
                    out.concurrency = n as usize;
                }
                if let Some(n) = int("zstd_level", &b.zstd_level, 1, 19)? {
                    out.zstd_level = n as i32;
                }
                if let Some(n) = int("gc_grace_seconds", &b.gc_grace_seconds, 0, i64::MAX)? {
                    out.gc_grace_seconds = n as u64;
                }
                if let Some(n) = int("max_per_volume", &b.max_per_volume, 0, i64::MAX)? {
                    out.max_per_volume = n as u64;
                }
                if let Some(n) = int("max_per_tenant", &b.max_per_tenant, 0, i64::MAX)? {
                    out.max_per_tenant = n as u64;
                }
                if let Some(n) = int("scheduler_interval_seconds", &b.scheduler_interval_seconds, 1, 3600)? {
                    out.scheduler_interval_seconds = n as u64;
                }
                Some(out)
            }
        };
        Ok(FileConfig {
            tiers,
            backups,
            default_quota,
            max_snapshots,
            max_running_jobs,
            delete_bytes_per_second,
            data_dir: check(text, path, "data_dir", raw.data_dir, parse_data_dir)?,
            az: check(text, path, "az", raw.az, parse_az)?,
            nbd_listen: check(text, path, "nbd_listen", raw.nbd_listen, parse_listen)?,
            nbd_socket: check(text, path, "nbd_socket", raw.nbd_socket, parse_socket_path)?,
            vhost_user_dir: check(text, path, "vhost_user_dir", raw.vhost_user_dir, parse_vhost_user_dir)?,
            api_listen: check(text, path, "api_listen", raw.api_listen, parse_listen)?,
            metrics_listen: check(text, path, "metrics_listen", raw.metrics_listen, parse_listen)?,
            backup_store: check(text, path, "backup_store", raw.backup_store, parse_backup_store)?,
            io_backend: check(text, path, "io_backend", raw.io_backend, parse_io_backend)?,
            direct_writes,
            log: check(text, path, "log", raw.log, parse_log)?,
            tls_cert: check(text, path, "tls_cert", raw.tls_cert, parse_file_path)?,
            tls_key: check(text, path, "tls_key", raw.tls_key, parse_file_path)?,
            nbd_tls: check(text, path, "nbd_tls", raw.nbd_tls, parse_nbd_tls)?,
            allow_plaintext: raw.allow_plaintext.map(Spanned::into_inner),
            lines,
        })
    }
}

/// A tier the config file adds (`[tiers.NAME]` of a name not built in). It must give
/// `iops_max` and `mbps_max`; the keys it leaves out make a flat limit: the baseline is the
/// max (0 when it gives a per-GiB rate), no per-GiB growth, no burst.
fn new_tier(
    name: String,
    t: RawTier,
    at: usize,
    err: &impl Fn(&'static str, usize, String) -> ConfigError,
) -> Result<TierSpec, ConfigError> {
    let value = |v: &Option<Spanned<f64>>| v.as_ref().map(|v| *v.get_ref());
    let (Some(iops), Some(mbps)) = (value(&t.iops_max), value(&t.mbps_max)) else {
        return Err(err(
            "tiers",
            at,
            format!("new tier {name:?} needs iops_max and mbps_max (the built-in tiers are {BUILT_IN_TIERS})"),
        ));
    };
    let rate = |max: f64, per_gib: &Option<Spanned<f64>>| RateSpec {
        baseline: if per_gib.is_some() { 0.0 } else { max },
        per_gib: 0.0,
        max,
        burst: 0.0,
    };
    let mut tier = TierSpec {
        iops: rate(iops, &t.iops_per_gib),
        bandwidth: rate(mbps * MB, &t.mbps_per_gib),
        name,
        burst_seconds: DEFAULT_BURST_SECONDS,
    };
    apply_tier(&mut tier, t, at, err)?;
    Ok(tier)
}

/// Applies one `[tiers.NAME]` table to `tier`, checking every value.
fn apply_tier(
    tier: &mut TierSpec,
    t: RawTier,
    at: usize,
    err: &impl Fn(&'static str, usize, String) -> ConfigError,
) -> Result<(), ConfigError> {
    // (key, value, target, scale): MB/s values are stored in bytes per second.
    let fields: [(&'static str, Option<Spanned<f64>>, &mut f64, f64); 8] = [
        ("iops_baseline", t.iops_baseline, &mut tier.iops.baseline, 1.0),
        ("iops_per_gib", t.iops_per_gib, &mut tier.iops.per_gib, 1.0),
        ("iops_max", t.iops_max, &mut tier.iops.max, 1.0),
        ("iops_burst", t.iops_burst, &mut tier.iops.burst, 1.0),
        ("mbps_baseline", t.mbps_baseline, &mut tier.bandwidth.baseline, MB),
        ("mbps_per_gib", t.mbps_per_gib, &mut tier.bandwidth.per_gib, MB),
        ("mbps_max", t.mbps_max, &mut tier.bandwidth.max, MB),
        ("mbps_burst", t.mbps_burst, &mut tier.bandwidth.burst, MB),
    ];
    // Where each key given is, to name the one that makes a limit zero.
    let mut given: Vec<(&'static str, usize)> = Vec::new();
    for (key, v, target, scale) in fields {
        if let Some(v) = v {
            let x = *v.get_ref();
            if !x.is_finite() || x < 0.0 {
                return Err(err(key, v.span().start, format!("{x} is not a finite number >= 0")));
            }
            *target = x * scale;
            given.push((key, v.span().start));
        }
    }
    if let Some(v) = t.burst_seconds {
        let x = *v.get_ref();
        if !x.is_finite() || x < 0.0 {
            return Err(err("burst_seconds", v.span().start, format!("{x} is not a finite number >= 0")));
        }
        tier.burst_seconds = x;
    }
    // The key to blame for a zero limit: the one given in this table (its line), else the
    // table's header line.
    let zero = [
        (tier.iops.max <= 0.0, &["iops_max"][..]),
        (tier.iops.baseline + tier.iops.per_gib <= 0.0, &["iops_baseline", "iops_per_gib"][..]),
        (tier.bandwidth.max <= 0.0, &["mbps_max"][..]),
        (tier.bandwidth.baseline + tier.bandwidth.per_gib <= 0.0, &["mbps_baseline", "mbps_per_gib"][..]),
    ];
    if let Some((_, keys)) = zero.iter().find(|(z, _)| *z) {
        let (key, at) = given.iter().rev().find(|(k, _)| keys.contains(k)).copied().unwrap_or(("tiers", at));
        return Err(err(
            key,
            at,
            format!(
                "tier {:?}: a limit is zero (iops_max, mbps_max and the baseline + per-GiB rates must be above 0)",
                tier.name
            ),
        ));
    }
    Ok(())
}

/// A size: bytes, or a number with a binary suffix K, M, G, T or P ("100T").
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                'P' => 50,
                _ => return Err(format!("invalid size {s:?}: unknown suffix {c:?} (use K, M, G, T or P)")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 =
        digits.parse().map_err(|_| format!("invalid size {s:?}: expected a whole number with K, M, G, T or P"))?;
    n.checked_mul(1u64 << shift).ok_or_else(|| format!("invalid size {s:?}: too large"))
}

/// An integer setting in `lo..=hi` (`hi` = i64::MAX: no upper bound).
fn check_int(v: i64, lo: i64, hi: i64) -> Result<i64, String> {
    match (v, hi) {
        (v, _) if (lo..=hi).contains(&v) => Ok(v),
        (v, i64::MAX) => Err(format!("{v} is less than the minimum, {lo}")),
        (v, hi) => Err(format!("{v} is not between {lo} and {hi}")),
    }
}

/// 1-based line and column of byte offset `at`.
fn line_col(text: &str, at: usize) -> (usize, usize) {
    let before = &text[..at.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    (line, column)
}

/// A listen address: `IP:PORT`, `[IPv6]:PORT` or `HOST:PORT` (resolved when binding).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenAddr(pub String);

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub fn parse_listen(s: &str) -> Result<ListenAddr, String> {
    if s.parse::<SocketAddr>().is_ok() {
        return Ok(ListenAddr(s.to_string()));
    }
    let bad =
        |why: &str| Err(format!("invalid listen address {s:?}: {why} (expected HOST:PORT, e.g. 127.0.0.1:10809)"));
    let Some((host, port)) = s.rsplit_once(':') else {
        return bad("no port");
    };
    if port.parse::<u16>().is_err() {
        return bad("the port must be a number from 0 to 65535");
    }
    if host.is_empty() {
        return bad("no host");
    }
    if host.starts_with('[') || host.contains(':') {
        return bad("not a valid IPv6 address (write [ADDR]:PORT)");
    }
    if !host.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.') {
        return bad("not an IP address or a host name");
    }
    Ok(ListenAddr(s.to_string()))
}

fn parse_data_dir(s: &str) -> Result<PathBuf, String> {
    if s.is_empty() {
        return Err("the data directory must not be empty".into());
    }
    Ok(PathBuf::from(s))
}

/// A file the daemon reads at start-up (a PEM certificate or key).
fn parse_file_path(s: &str) -> Result<PathBuf, String> {
    if s.is_empty() {
        return Err("the file name must not be empty".into());
    }
    Ok(PathBuf::from(s))
}

pub fn parse_nbd_tls(s: &str) -> Result<NbdTls, String> {
    match s {
        "off" => Ok(NbdTls::Off),
        "on" => Ok(NbdTls::On),
        "require" => Ok(NbdTls::Require),
        _ => Err(format!("expected off, on or require, found {s:?}")),
    }
}

pub fn parse_bool(s: &str) -> Result<bool, String> {
    match s {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(format!("expected true or false, found {s:?}")),
    }
}

fn parse_socket_path(s: &str) -> Result<PathBuf, String> {
    if s.is_empty() {
        return Err("the socket path must not be empty".into());
    }
    // sun_path holds 108 bytes including the terminating NUL.
    if s.len() > 107 {
        return Err(format!("socket path {s:?} is longer than the 107 bytes a unix socket address holds"));
    }
    Ok(PathBuf::from(s))
}

/// Longest `vhost_user_dir`: a socket is `DIR/<32 hex digits>.sock`, and a unix socket
/// address holds 107 bytes.
pub const MAX_VHOST_USER_DIR: usize = 107 - 1 - 32 - 5;

fn parse_vhost_user_dir(s: &str) -> Result<PathBuf, String> {
    if s.is_empty() {
        return Err("the vhost-user socket directory must not be empty".into());
    }
    if s.len() > MAX_VHOST_USER_DIR {
        return Err(format!(
            "vhost-user socket directory {s:?} is longer than {MAX_VHOST_USER_DIR} bytes: its sockets would not fit the 107 bytes of a unix socket address"
        ));
    }
    Ok(PathBuf::from(s))
}

/// An availability zone name: 1 to 63 of `[A-Za-z0-9._-]`.
pub fn parse_az(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 63 {
        return Err(format!("invalid AZ name {s:?}: 1 to 63 characters"));
    }
    if !s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
        return Err(format!("invalid AZ name {s:?}: only letters, digits, '.', '_' and '-'"));
    }
    Ok(s.to_string())
}

/// `--io-backend`; `auto` is resolved by the daemon (it probes io_uring).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoBackend {
    Auto,
    Uring,
    Portable,
}

impl IoBackend {
    pub fn name(self) -> &'static str {
        match self {
            IoBackend::Auto => "auto",
            IoBackend::Uring => "uring",
            IoBackend::Portable => "portable",
        }
    }
}

pub fn parse_io_backend(s: &str) -> Result<IoBackend, String> {
    match s {
        "auto" => Ok(IoBackend::Auto),
        "uring" | "io_uring" | "io-uring" => Ok(IoBackend::Uring),
        "portable" => Ok(IoBackend::Portable),
        _ => Err(format!("unknown I/O backend {s:?} (expected uring, portable or auto)")),
    }
}

/// An on/off switch as the flags spell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OnOff(pub bool);

pub fn parse_on_off(s: &str) -> Result<OnOff, String> {
    match s {
        "on" | "true" | "yes" | "1" => Ok(OnOff(true)),
        "off" | "false" | "no" | "0" => Ok(OnOff(false)),
        _ => Err(format!("expected on or off, found {s:?}")),
    }
}

pub fn parse_log(s: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::try_new(s).map_err(|e| format!("invalid log filter {s:?}: {e}"))?;
    Ok(s.to_string())
}

/// `--backup-store` and `backup_store`: the backup engine's own URL parser, so what the flag
/// accepts is what the engine opens.
pub fn parse_backup_store(s: &str) -> Result<StoreUrl, String> {
    StoreUrl::parse(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(args: &[&str]) -> Flags {
        Flags::try_parse_from(std::iter::once("evs-target").chain(args.iter().copied())).unwrap()
    }

    fn with_file(toml: &str, args: &[&str]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("evs.toml");
        std::fs::write(&path, toml).unwrap();
        let mut all = vec!["--config", path.to_str().unwrap()];
        all.extend_from_slice(args);
        Config::load(flags(&all))
    }

    #[test]
    fn defaults() {
        let c = Config::load(flags(&[])).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("./evs-data"));
        assert_eq!(c.vhost_user_dir, PathBuf::from("./evs-data/vhost"));
        assert_eq!(c.az, "az1");
        assert_eq!(c.nbd_listen.0, "127.0.0.1:10809");
        assert_eq!(c.api_listen.0, "127.0.0.1:10810");
        assert_eq!(c.metrics_listen.0, "127.0.0.1:10811");
        assert_eq!(c.nbd_socket, None);
        assert_eq!(c.backup_store, StoreUrl::File { path: PathBuf::from("./evs-data/obs") });
        assert_eq!(c.backup_store.to_string(), "file://./evs-data/obs");
        assert_eq!(c.io_backend, IoBackend::Auto);
        assert!(c.direct_writes);
        assert_eq!(c.log, None);
        assert_eq!(c.jobs, JobOptions { max_running_per_tenant: 5, delete_bytes_per_second: None });
    }

    #[test]
    fn job_settings() {
        let c = with_file("max_running_jobs_per_tenant = 2\ndelete_bytes_per_second = 67108864\n", &[]).unwrap();
        assert_eq!(c.jobs, JobOptions { max_running_per_tenant: 2, delete_bytes_per_second: Some(64 << 20) });
        for (toml, key, why) in [
            ("max_running_jobs_per_tenant = 0\n", "max_running_jobs_per_tenant", "0 is not between 1 and 64"),
            ("\nmax_running_jobs_per_tenant = 65\n", "max_running_jobs_per_tenant", "65 is not between 1 and 64"),
            ("delete_bytes_per_second = 1000\n", "delete_bytes_per_second", "less than the minimum, 1048576"),
        ] {
            let e = with_file(toml, &[]).unwrap_err();
            let line = if toml.starts_with('\n') { 2 } else { 1 };
            assert!(matches!(&e, ConfigError::Value { key: k, line: l, .. } if *k == key && *l == line), "{e}");
            assert!(e.to_string().contains(why), "{e}");
        }
        let e = with_file("max_running_jobs_per_tenant = \"five\"\n", &[]).unwrap_err();
        assert!(matches!(e, ConfigError::Syntax { line: 1, .. }), "{e}");
    }

    #[test]
    fn flags_set_everything() {
        let c = Config::load(flags(&[
            "--data-dir",
            "/srv/evs",
            "--az",
            "az2",
            "--nbd-listen",
            "0.0.0.0:20809",
            "--nbd-socket",
            "/run/evs.sock",
            "--vhost-user-dir",
            "/run/evs/vhost",
            "--api-listen",
            "[::1]:20810",
            "--metrics-listen",
            "localhost:20811",
            "--io-backend",
            "portable",
            "--direct-writes",
            "off",
            "--log",
            "debug",
            "--allow-plaintext",
        ]))
        .unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/srv/evs"));
        assert_eq!(c.az, "az2");
        assert_eq!(c.nbd_listen.0, "0.0.0.0:20809");
        assert_eq!(c.nbd_socket, Some(PathBuf::from("/run/evs.sock")));
        assert_eq!(c.vhost_user_dir, PathBuf::from("/run/evs/vhost"));
        assert_eq!(c.api_listen.0, "[::1]:20810");
        assert_eq!(c.metrics_listen.0, "localhost:20811");
        assert_eq!(c.backup_store.to_string(), "file:///srv/evs/obs");
        assert_eq!(c.io_backend, IoBackend::Portable);
        assert!(!c.direct_writes);
        assert_eq!(c.log.as_deref(), Some("debug"));
        assert!(c.allow_plaintext);
    }

    #[test]
    fn bad_flags_are_usage_errors_naming_the_flag() {
        for (flag, value) in [
            ("--nbd-listen", "10809"),
            ("--api-listen", "host:99999"),
            ("--io-backend", "fast"),
            ("--direct-writes", "maybe"),
            ("--backup-store", "ftp://x"),
            ("--az", "a z"),
            ("--nbd-tls", "maybe"),
            ("--allow-plaintext=yes", ""),
            ("--tls-cert", ""),
        ] {
            let args = if value.is_empty() && flag.contains('=') { vec![flag] } else { vec![flag, value] };
            let e = Flags::try_parse_from(std::iter::once("evs-target").chain(args)).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains(flag.split('=').next().unwrap()), "{msg}");
            assert_eq!(e.exit_code(), 2);
        }
    }

    #[test]
    fn file_values_and_flag_override() {
        let toml = r#"
data_dir = "/var/lib/evs"
az = "az9"
vhost_user_dir = "/run/vh"
nbd_listen = "0.0.0.0:1"
api_listen = "127.0.0.1:2"
io_backend = "portable"
direct_writes = false
backup_store = "s3://backups/evs/node1?endpoint=http://127.0.0.1:3900&region=garage"
allow_plaintext = true
"#;
        let c = with_file(toml, &["--api-listen", "127.0.0.1:3", "--direct-writes", "on"]).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/evs"));
        assert_eq!(c.az, "az9");
        assert_eq!(c.vhost_user_dir, PathBuf::from("/run/vh"));
        let e = with_file(&format!("vhost_user_dir = \"/{}\"\n", "d".repeat(80)), &[]).unwrap_err().to_string();
        assert!(e.contains("vhost_user_dir") && e.contains("unix socket address"), "{e}");
        assert_eq!(c.nbd_listen.0, "0.0.0.0:1");
        assert_eq!(c.api_listen.0, "127.0.0.1:3", "the flag wins");
        assert_eq!(c.io_backend, IoBackend::Portable);
        assert!(c.direct_writes, "the flag wins");
        assert_eq!(
            c.backup_store,
            StoreUrl::S3 {
                bucket: "backups".into(),
                prefix: "evs/node1".into(),
                endpoint: Some("http://127.0.0.1:3900".into()),
                region: "garage".into(),
            }
        );
        let c = with_file("direct_writes = \"off\"\n", &[]).unwrap();
        assert!(!c.direct_writes);
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let e = with_file("az = \"az1\"\n\nnbd_port = 10809\n", &[]).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, ConfigError::Syntax { line: 3, .. }), "{msg}");
        assert!(msg.contains("nbd_port"), "{msg}");
        assert!(msg.contains("evs.toml:3:"), "{msg}");
    }

    #[test]
    fn bad_value_names_key_and_line() {
        let e = with_file("az = \"az1\"\nnbd_listen = \"nowhere\"\n", &[]).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, ConfigError::Value { line: 2, key: "nbd_listen", .. }), "{msg}");
        assert!(msg.contains("evs.toml:2: nbd_listen: invalid listen address \"nowhere\""), "{msg}");

        let e = with_file("\n\ndirect_writes = 3\n", &[]).unwrap_err();
        assert!(matches!(e, ConfigError::Value { line: 3, key: "direct_writes", .. }), "{e}");
        let e = with_file("io_backend = \"spdk\"\n", &[]).unwrap_err();
        assert!(e.to_string().contains("io_backend: unknown I/O backend \"spdk\""), "{e}");
    }

    #[test]
    fn wrong_type_and_syntax_errors_name_the_line() {
        let e = with_file("az = \"az1\"\naz_x\n", &[]).unwrap_err();
        assert!(matches!(e, ConfigError::Syntax { line: 2, .. }), "{e}");
        let e = with_file("\naz = 5\n", &[]).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, ConfigError::Syntax { line: 2, .. }), "{msg}");
        assert!(msg.contains("az = 5"), "{msg}");
    }

    #[test]
    fn missing_file_is_an_error_naming_it() {
        let e = Config::load(flags(&["--config", "/nonexistent/evs.toml"])).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/evs.toml"), "{e}");
    }

    #[test]
    fn listen_addresses() {
        for ok in ["127.0.0.1:10809", "0.0.0.0:0", "[::]:1", "[::1]:10809", "localhost:80", "node-1.example:9"] {
            assert!(parse_listen(ok).is_ok(), "{ok}");
        }
        for bad in ["", "10809", ":10809", "host:", "host:65536", "::1:80", "a b:1", "[::1:80"] {
            assert!(parse_listen(bad).is_err(), "{bad}");
        }
    }

    /// The flag takes exactly what the backup engine opens (its parser's own tests cover the
    /// URL forms): an incomplete S3 or OBS URL is a usage error at start, not a failure later.
    #[test]
    fn backup_store_flag_uses_the_engines_parser() {
        let c = Config::load(flags(&["--backup-store", "file:///srv/obs"])).unwrap();
        assert_eq!(c.backup_store, StoreUrl::File { path: "/srv/obs".into() });
        let round = "s3://b12/x/y?endpoint=http://127.0.0.1:3900&region=garage";
        assert_eq!(Config::load(flags(&["--backup-store", round])).unwrap().backup_store.to_string(), round);
        for (bad, why) in [
            ("s3://bucket-1", "needs region"),
            ("obs://evs-backup", "needs endpoint"),
            ("obs://evs-backup?endpoint=https://obs.example&region=cn-north-4", "takes no region"),
            ("ftp://host/x", "unsupported scheme"),
        ] {
            let e = Flags::try_parse_from(["evs-target", "--backup-store", bad]).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains(bad), "{bad}: {e}");
            let e = with_file(&format!("backup_store = \"{bad}\"\n"), &[]).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains("backup_store"), "{bad}: {e}");
        }
    }

    /// `merge` and the exposure rule with a resolver that knows a few names.
    fn exposure(args: &[&str], toml: Option<&str>) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("evs.toml");
        let mut all: Vec<&str> = Vec::new();
        if let Some(t) = toml {
            std::fs::write(&path, t).unwrap();
            all.extend(["--config", path.to_str().unwrap()]);
        }
        all.extend_from_slice(args);
        let (c, origins) = Config::merge(flags(&all))?;
        check_exposure(&c, &origins, |host: &str| match host.rsplit_once(':').unwrap().0 {
            "localhost" => Ok(vec!["127.0.0.1:1".parse().unwrap(), "[::1]:1".parse().unwrap()]),
            "public" => Ok(vec!["192.0.2.7:1".parse().unwrap()]),
            "mixed" => Ok(vec!["127.0.0.1:1".parse().unwrap(), "192.0.2.7:1".parse().unwrap()]),
            "nothing" => Ok(vec![]),
            _ => Err("no such host".into()),
        })?;
        Ok(c)
    }

    const CERT: [&str; 4] = ["--tls-cert", "cert.pem", "--tls-key", "key.pem"];

    #[test]
    fn tls_defaults_and_pairing() {
        let c = Config::load(flags(&[])).unwrap();
        assert_eq!((c.tls, c.nbd_tls, c.allow_plaintext), (None, NbdTls::Off, false));

        let c = Config::load(flags(&CERT)).unwrap();
        assert_eq!(c.tls, Some(TlsFiles { cert: "cert.pem".into(), key: "key.pem".into() }));
        assert_eq!(c.nbd_tls, NbdTls::On, "on by default once there is a certificate");
        let c = Config::load(flags(&[&CERT[..], &["--nbd-tls", "off"]].concat())).unwrap();
        assert_eq!(c.nbd_tls, NbdTls::Off, "API TLS only");

        // Flag and file mix; the file's values are checked like the flags'.
        let c = with_file("tls_key = \"k.pem\"\nnbd_tls = \"require\"\n", &["--tls-cert", "c.pem"]).unwrap();
        assert_eq!(c.tls, Some(TlsFiles { cert: "c.pem".into(), key: "k.pem".into() }));
        assert_eq!(c.nbd_tls, NbdTls::Require);

        let e = Config::load(flags(&["--tls-cert", "c.pem"])).unwrap_err();
        assert!(matches!(e, ConfigError::Conflict(_)), "{e}");
        assert!(e.to_string().contains("--tls-cert is set but tls_key is not"), "{e}");
        let e = with_file("az = \"az1\"\ntls_key = \"k.pem\"\n", &[]).unwrap_err();
        assert!(e.to_string().contains("tls_key at "), "{e}");
        assert!(e.to_string().contains("evs.toml:2 is set but tls_cert is not"), "{e}");
    }

    #[test]
    fn nbd_tls_needs_a_certificate() {
        for mode in ["on", "require"] {
            let e = Config::load(flags(&["--nbd-tls", mode])).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains(&format!("--nbd-tls = {mode} needs a certificate")), "{msg}");
            assert!(msg.contains("tls_cert") && msg.contains("tls_key"), "{msg}");
        }
        let e = with_file("\nnbd_tls = \"require\"\n", &[]).unwrap_err();
        assert!(e.to_string().contains("nbd_tls at ") && e.to_string().contains("evs.toml:2 = require"), "{e}");
        assert_eq!(with_file("nbd_tls = \"off\"\n", &[]).unwrap().nbd_tls, NbdTls::Off);
    }

    #[test]
    fn tls_file_values_are_checked() {
        let e = with_file("\nnbd_tls = \"always\"\n", &[]).unwrap_err();
        assert!(matches!(e, ConfigError::Value { line: 2, key: "nbd_tls", .. }), "{e}");
        assert!(e.to_string().contains("expected off, on or require"), "{e}");
        let e = with_file("tls_cert = \"\"\n", &[]).unwrap_err();
        assert!(matches!(e, ConfigError::Value { line: 1, key: "tls_cert", .. }), "{e}");
        let e = with_file("\n\nallow_plaintext = \"yes\"\n", &[]).unwrap_err();
        assert!(matches!(e, ConfigError::Syntax { line: 3, .. }), "{e}");
        assert!(with_file("allow_plaintext = true\n", &[]).unwrap().allow_plaintext);
        assert!(!with_file("allow_plaintext = true\n", &["--allow-plaintext=false"]).unwrap().allow_plaintext);
    }

    #[test]
    fn plain_text_only_on_loopback() {
        // Loopback in every spelling is fine without TLS.
        for addr in ["127.0.0.1:1", "127.8.9.10:1", "[::1]:1", "[::ffff:127.0.0.1]:1", "localhost:1"] {
            exposure(&["--api-listen", addr, "--nbd-listen", addr], None).unwrap_or_else(|e| panic!("{addr}: {e}"));
        }
        // The API without a certificate on anything else.
        for addr in ["0.0.0.0:1", "[::]:1", "192.0.2.1:1", "public:1", "mixed:1"] {
            let e = exposure(&["--api-listen", addr], None).unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, ConfigError::Plaintext { listener: "the gRPC API", .. }), "{addr}: {msg}");
            assert!(msg.contains(addr) && msg.contains("(--api-listen)"), "{msg}");
            assert!(msg.contains("tls_cert") && msg.contains("allow_plaintext = true"), "{msg}");
        }
        // NBD with nbd_tls = off, named by its file line.
        let e = exposure(&[], Some("\nnbd_listen = \"0.0.0.0:10809\"\n")).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, ConfigError::Plaintext { listener: "NBD", .. }), "{msg}");
        assert!(msg.contains("0.0.0.0:10809 (nbd_listen at ") && msg.contains("evs.toml:2)"), "{msg}");
        let e = exposure(&[&CERT[..], &["--nbd-tls", "off", "--nbd-listen", "[::]:1"]].concat(), None).unwrap_err();
        assert!(e.to_string().contains("set nbd_tls = \"on\" or \"require\""), "{e}");

        // With TLS both may listen anywhere (nbd_tls = on makes remote peers use TLS).
        exposure(&[&CERT[..], &["--api-listen", "0.0.0.0:1", "--nbd-listen", "[::]:1"]].concat(), None).unwrap();
        // allow_plaintext, from the flag or the file, accepts plain text.
        exposure(&["--api-listen", "0.0.0.0:1", "--nbd-listen", "public:1", "--allow-plaintext"], None).unwrap();
        exposure(&["--api-listen", "0.0.0.0:1"], Some("allow_plaintext = true\n")).unwrap();

        // A name that cannot be checked is an error naming it, not a guess.
        for host in ["unknown:1", "nothing:1"] {
            let e = exposure(&["--api-listen", host], None).unwrap_err();
            assert!(matches!(e, ConfigError::Resolve { .. }), "{e}");
            assert!(e.to_string().contains(&format!("cannot resolve the gRPC API address {host}")), "{e}");
        }
        // `load` applies the rule.
        let e = Config::load(flags(&["--nbd-listen", "0.0.0.0:0"])).unwrap_err();
        assert!(matches!(e, ConfigError::Plaintext { listener: "NBD", .. }), "{e}");
    }

    #[test]
    fn tiers_and_quotas_from_the_file() {
        let c = Config::load(flags(&[])).unwrap();
        assert_eq!(c.tiers, default_tiers());
        assert_eq!(c.default_quota, DEFAULT_QUOTA);
        let toml = "[tiers.common]\niops_baseline = 500\nmbps_max = 10.5\nburst_seconds = 2\n\n[quotas]\nmax_volumes_per_tenant = 3\nmax_capacity_per_tenant = \"10G\"\n";
        let c = with_file(toml, &[]).unwrap();
        let common = c.tiers.iter().find(|t| t.name == "common").unwrap();
        assert_eq!(common.iops.baseline, 500.0);
        assert_eq!(common.iops.max, 1000.0, "keys not given keep their defaults");
        assert_eq!(common.bandwidth.max, 10.5e6);
        assert_eq!(common.burst_seconds, 2.0);
        assert_eq!(c.tiers.iter().find(|t| t.name == "essd"), default_tiers().iter().find(|t| t.name == "essd"));
        assert_eq!(c.default_quota, Quota { max_volumes: 3, max_capacity: 10 << 30 });

        // A new tier needs its two maxima; the keys it leaves out make a flat limit.
        let e = with_file("\n[tiers.fast]\niops_max = 1\n", &[]).unwrap_err();
        assert!(matches!(e, ConfigError::Value { line: 2, key: "tiers", .. }), "{e}");
        assert!(e.to_string().contains("new tier \"fast\" needs iops_max and mbps_max"), "{e}");
        let c = with_file("[tiers.fast]\niops_max = 900\nmbps_max = 50\n\n[tiers.slow]\niops_max = 90\niops_per_gib = 2\nmbps_max = 5\nmbps_burst = 9\nburst_seconds = 10\n", &[]).unwrap();
        assert_eq!(c.tiers.len(), default_tiers().len() + 2);
        let fast = c.tiers.iter().find(|t| t.name == "fast").unwrap();
        assert_eq!(
            (fast.iops, fast.bandwidth),
            (
                RateSpec { baseline: 900.0, per_gib: 0.0, max: 900.0, burst: 0.0 },
                RateSpec { baseline: 50e6, per_gib: 0.0, max: 50e6, burst: 0.0 }
            )
        );
        assert_eq!(fast.burst_seconds, DEFAULT_BURST_SECONDS);
        let slow = c.tiers.iter().find(|t| t.name == "slow").unwrap();
        assert_eq!(
            slow.iops,
            RateSpec { baseline: 0.0, per_gib: 2.0, max: 90.0, burst: 0.0 },
            "a per-GiB rate starts from 0"
        );
        assert_eq!((slow.bandwidth.baseline, slow.bandwidth.burst, slow.burst_seconds), (5e6, 9e6, 10.0));
        assert_eq!(slow.limits(10 << 30).iops, 20.0);
        let e = with_file("[tiers.\"no good\"]\niops_max = 1\nmbps_max = 1\n", &[]).unwrap_err();
        assert!(matches!(e, ConfigError::Value { line: 1, key: "tiers", .. }), "{e}");
        assert!(e.to_string().contains("invalid tier name \"no good\""), "{e}");
        let e = with_file("[tiers.unlimited]\niops_max = 1\nmbps_max = 1\n", &[]).unwrap_err();
        assert!(e.to_string().contains("the tier without limits"), "{e}");
        let e = with_file("[tiers.high]\n\niops_max = -3\n", &[]).unwrap_err();
        assert!(matches!(e, ConfigError::Value { line: 3, key: "iops_max", .. }), "{e}");
        // A zero limit names the key that made it zero, on its line.
        let e = with_file("[tiers.essd]\nmbps_max = 1\n\niops_max = 0\n", &[]).unwrap_err();
        assert!(matches!(e, ConfigError::Value { line: 4, key: "iops_max", .. }), "{e}");
        let e = with_file("[tiers.essd]\nmbps_baseline = 0\nmbps_per_gib = 0\n", &[]).unwrap_err();
        assert!(matches!(e, ConfigError::Value { line: 3, key: "mbps_per_gib", .. }), "{e}");
        let e = with_file("[tiers.high]\niops_speed = 3\n", &[]).unwrap_err();
        assert!(matches!(e, ConfigError::Syntax { line: 2, .. }), "{e}");
        assert!(e.to_string().contains("iops_speed"), "{e}");
        let e = with_file("[quotas]\nmax_capacity_per_tenant = \"lots\"\n", &[]).unwrap_err();
        assert!(matches!(e, ConfigError::Value { line: 2, key: "max_capacity_per_tenant", .. }), "{e}");
        let e = with_file("[quotas]\nmax_volumes_per_tenant = -1\n", &[]).unwrap_err();
        assert!(e.to_string().contains("negative"), "{e}");
    }

    #[test]
    fn backup_settings() {
        assert_eq!(Config::load(flags(&[])).unwrap().backups, BackupSettings::default());
        let c = with_file(
            "[backups]\nchunk_size = \"4M\"\nconcurrency = 4\nmax_per_volume = 3\nmax_bytes_per_tenant = \"1T\"\ngc_grace_seconds = 0\n",
            &[],
        )
        .unwrap();
        assert_eq!(
            (c.backups.chunk_size, c.backups.concurrency, c.backups.max_per_volume, c.backups.max_bytes_per_tenant),
            (4 << 20, 4, 3, 1 << 40)
        );
        assert_eq!(c.backups.gc_grace_seconds, 0);
        let e = with_file("[backups]\n\nchunk_size = 3000\n", &[]).unwrap_err();
        assert!(matches!(e, ConfigError::Value { line: 3, key: "chunk_size", .. }), "{e}");
        let e = with_file("[backups]\nconcurrency = 0\n", &[]).unwrap_err();
        assert!(matches!(e, ConfigError::Value { line: 2, key: "concurrency", .. }), "{e}");
        let e = with_file("[backups]\nchunks = 1\n", &[]).unwrap_err();
        assert!(e.to_string().contains("chunks"), "{e}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("1p"), Ok(1 << 50));
        assert!(parse_size("1.5G").is_err());
        assert!(parse_size("10X").unwrap_err().contains("suffix"));
        assert!(parse_size("99999999999P").unwrap_err().contains("too large"));
    }

    #[test]
    fn line_and_column() {
        assert_eq!(line_col("ab\ncd\n", 0), (1, 1));
        assert_eq!(line_col("ab\ncd\n", 4), (2, 2));
        assert_eq!(line_col("ab", 99), (1, 3));
    }
}
