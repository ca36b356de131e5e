//! The object store the engine writes to: a small trait, its OpenDAL implementation (a local
//! directory, S3, Huawei OBS), and a fault-injecting wrapper for tests.
//!
//! Keys are relative to the store's root, '/'-separated, never starting or ending with '/'.
//! Contract (checked by the same test suite on a directory and on a real S3 server):
//! * `put` is atomic: an object appears whole or not at all, to `get` and `list` alike;
//! * `get` of an absent key is `StoreError::NotFound`; `head` of one is `None`;
//! * `list(prefix)` gives every object whose key starts with `prefix`, recursively, objects
//!   only (no directories, not the prefix itself), sorted by key;
//! * `delete` of an absent key succeeds.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::TryStreamExt;
use opendal::layers::{RetryLayer, TimeoutLayer};
use opendal::services::{Fs, Obs, S3};
use opendal::{ErrorKind, HttpTransporter, OperationContext, Operator};
use parking_lot::Mutex;

use crate::error::{StoreError, StoreOp};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub key: String,
    pub size: u64,
    pub modified: Option<SystemTime>,
}

#[async_trait::async_trait]
pub trait ObjectStore: Send + Sync + 'static {
    /// Atomic: the object appears whole or not at all.
    async fn put(&self, key: &str, data: Vec<u8>) -> Result<(), StoreError>;
    /// NotFound is its own error kind.
    async fn get(&self, key: &str) -> Result<Vec<u8>, StoreError>;
    /// None: absent.
    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StoreError>;
    /// Recursive, objects only, keys relative to the store root, sorted.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError>;
    /// Absent is Ok.
    async fn delete(&self, key: &str) -> Result<(), StoreError>;
    /// Where the store is, for messages: "s3://bucket/prefix at http://…" (no secrets).
    fn describe(&self) -> String;
}

/// Where backups go.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// A local directory (the embedded default).
    File { path: PathBuf },
    /// An S3-compatible service, path-style addressing.
    S3 { bucket: String, prefix: String, endpoint: String, region: String, access_key: String, secret_key: String },
    /// Huawei Cloud OBS.
    Obs { bucket: String, prefix: String, endpoint: String, access_key: String, secret_key: String },
}

impl std::fmt::Debug for StoreConfig {
    // Never prints the secret key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// The variables a URL's credentials come from (`StoreUrl::with_env_keys`).
pub const ENV_ACCESS_KEY: &str = "AWS_ACCESS_KEY_ID";
pub const ENV_SECRET_KEY: &str = "AWS_SECRET_ACCESS_KEY";

impl StoreConfig {
    pub fn describe(&self) -> String {
        match self {
            StoreConfig::File { path } => format!("file://{}", path.display()),
            StoreConfig::S3 { bucket, prefix, endpoint, region, .. } => {
                format!("s3://{bucket}/{prefix} at {endpoint} (region {region})")
            }
            StoreConfig::Obs { bucket, prefix, endpoint, .. } => format!("obs://{bucket}/{prefix} at {endpoint}"),
        }
    }
}

/// Checks an object key: relative, '/'-separated, no empty, `.` or `..` components.
pub fn validate_key(key: &str) -> Result<(), StoreError> {
    let why = if key.is_empty() {
        "empty"
    } else if key.starts_with('/') || key.ends_with('/') {
        "starts or ends with '/'"
    } else if key.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        "has an empty, '.' or '..' component"
    } else if key.chars().any(|c| c.is_control() || c == '\\') {
        "has a control character or '\\'"
    } else {
        return Ok(());
    };
    Err(StoreError::InvalidKey { key: key.into(), why })
}

/// A list prefix: empty (everything), or a key prefix with the same rules as a key except
/// that it may end with '/'.
fn validate_prefix(prefix: &str) -> Result<(), StoreError> {
    match prefix.strip_suffix('/') {
        _ if prefix.is_empty() => Ok(()),
        Some(p) => validate_key(p),
        None => validate_key(prefix),
    }
}

/// Timeouts and retries of an `OpendalStore`.
#[derive(Debug, Clone)]
pub struct StoreTuning {
    /// Per control operation (head, delete, list page).
    pub timeout: Duration,
    /// Per read or write of a body.
    pub io_timeout: Duration,
    /// Retries of a temporary failure (with exponential backoff and jitter).
    pub retries: usize,
}

impl Default for StoreTuning {
    fn default() -> Self {
        StoreTuning { timeout: Duration::from_secs(30), io_timeout: Duration::from_secs(30), retries: 4 }
    }
}

/// An `ObjectStore` over an OpenDAL operator.
pub struct OpendalStore {
    op: Operator,
    describe: String,
}

/// reqwest (without a built-in provider) uses the process's default rustls provider: install
/// ring when the process (the daemon, a test) has not installed one.
fn ensure_tls_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Err: another thread installed one meanwhile, which is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// The directory where a file store's writes are staged: a sibling of the root (same
/// filesystem, so rename works; outside the root, so no listing sees a partial object).
pub fn staging_dir(root: &Path) -> Result<PathBuf, StoreError> {
    let name = root.file_name().ok_or_else(|| {
        StoreError::Config(format!("file store {:?}: the path needs a last component", root.display()))
    })?;
    let mut staging = name.to_os_string();
    staging.push(".partial");
    Ok(root.with_file_name(staging))
}

/// A put dropped before it completed (a backup failing or cancelled with uploads in flight)
/// leaves its staging file behind; one older than this is no write in progress.
const STALE_STAGING: Duration = Duration::from_secs(3600);

/// Best effort: a file that cannot be removed now is tried again at the next open.
fn remove_stale_staging_files(staging: &Path) {
    let Ok(entries) = std::fs::read_dir(staging) else { return };
    let now = SystemTime::now();
    for e in entries.flatten() {
        let Ok(meta) = e.metadata() else { continue };
        let old = meta.modified().is_ok_and(|m| now.duration_since(m).unwrap_or_default() >= STALE_STAGING);
        if meta.is_file() && old {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

impl OpendalStore {
    pub fn open(cfg: &StoreConfig) -> Result<OpendalStore, StoreError> {
        OpendalStore::open_tuned(cfg, &StoreTuning::default())
    }

    pub fn open_tuned(cfg: &StoreConfig, tuning: &StoreTuning) -> Result<OpendalStore, StoreError> {
        let config_err = |e: opendal::Error| StoreError::Config(format!("{}: {e}", cfg.describe()));
        let op = match cfg {
            StoreConfig::File { path } => {
                if !path.is_absolute() {
                    return Err(StoreError::Config(format!("file store {:?}: not an absolute path", path.display())));
                }
                let staging = staging_dir(path)?;
                let utf8 = |p: &Path| {
                    p.to_str()
                        .map(str::to_string)
                        .ok_or_else(|| StoreError::Config(format!("file store {:?}: not a UTF-8 path", p.display())))
                };
                remove_stale_staging_files(&staging);
                let fs = Fs::default().root(&utf8(path)?).atomic_write_dir(&utf8(&staging)?);
                Operator::new(fs).map_err(config_err)?
            }
            StoreConfig::S3 { bucket, prefix, endpoint, region, access_key, secret_key } => {
                ensure_tls_provider();
                let s3 = S3::default()
                    .bucket(bucket)
                    .root(&format!("/{prefix}"))
                    .endpoint(endpoint)
                    .region(region)
                    .access_key_id(access_key)
                    .secret_access_key(secret_key)
                    .disable_config_load()
                    .disable_ec2_metadata();
                with_transport(Operator::new(s3).map_err(config_err)?)
            }
            StoreConfig::Obs { bucket, prefix, endpoint, access_key, secret_key } => {
                ensure_tls_provider();
                let obs = Obs::default()
                    .bucket(bucket)
                    .root(&format!("/{prefix}"))
                    .endpoint(endpoint)
                    .access_key_id(access_key)
                    .secret_access_key(secret_key);
                with_transport(Operator::new(obs).map_err(config_err)?)
            }
        };
        // Timeout inside retry: each attempt is timed out, and the retry layer sees it.
        let op = op.layer(TimeoutLayer::new().with_timeout(tuning.timeout).with_io_timeout(tuning.io_timeout)).layer(
            RetryLayer::new()
                .with_max_times(tuning.retries)
                .with_min_delay(Duration::from_millis(100))
                .with_max_delay(Duration::from_secs(5))
                .with_jitter(),
        );
        Ok(OpendalStore { op, describe: cfg.describe() })
    }

    fn err(&self, op: StoreOp, key: &str, e: opendal::Error) -> StoreError {
        match e.kind() {
            ErrorKind::NotFound => StoreError::NotFound { store: self.describe.clone(), key: key.into() },
            _ => StoreError::Failed { op, store: self.describe.clone(), key: key.into(), cause: e.to_string() },
        }
    }
}

/// HTTP services get their transport per operator: without `auto-register-services`
/// OpenDAL installs no process-wide one.
fn with_transport(op: Operator) -> Operator {
    let transport = HttpTransporter::new(opendal_http_transport_reqwest::ReqwestTransport::default());
    op.with_context(OperationContext::new().with_http_transport(transport))
}

fn meta_of(key: String, m: &opendal::Metadata) -> ObjectMeta {
    ObjectMeta { key, size: m.content_length(), modified: m.last_modified().map(SystemTime::from) }
}

#[async_trait::async_trait]
impl ObjectStore for OpendalStore {
    async fn put(&self, key: &str, data: Vec<u8>) -> Result<(), StoreError> {
        validate_key(key)?;
        self.op.write(key, data).await.map(|_| ()).map_err(|e| self.err(StoreOp::Put, key, e))
    }

    async fn get(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        validate_key(key)?;
        match self.op.read(key).await {
            Ok(buf) => Ok(buf.to_vec()),
            Err(e) if e.kind() == ErrorKind::NotFound => Err(self.err(StoreOp::Get, key, e)),
            // A directory of the fs service is no object (it reads as an Unexpected error).
            Err(e) => match self.op.stat(key).await {
                Ok(m) if m.is_dir() => Err(StoreError::NotFound { store: self.describe.clone(), key: key.into() }),
                _ => Err(self.err(StoreOp::Get, key, e)),
            },
        }
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StoreError> {
        validate_key(key)?;
        match self.op.stat(key).await {
            Ok(m) if m.is_file() => Ok(Some(meta_of(key.into(), &m))),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.err(StoreOp::Head, key, e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        validate_prefix(prefix)?;
        // List the directory part, keep what starts with the whole prefix: the same answer
        // on a filesystem (directories) and on S3 (plain prefixes).
        let dir = match prefix.rfind('/') {
            Some(i) => &prefix[..=i],
            None => "/",
        };
        let mut lister =
            self.op.lister_with(dir).recursive(true).await.map_err(|e| self.err(StoreOp::List, prefix, e))?;
        let mut out = Vec::new();
        while let Some(entry) = lister.try_next().await.map_err(|e| self.err(StoreOp::List, prefix, e))? {
            let (path, meta) = entry.into_parts();
            let key = path.trim_start_matches('/');
            if meta.is_file() && key.starts_with(prefix) && !key.ends_with('/') {
                out.push(meta_of(key.to_string(), &meta));
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        validate_key(key)?;
        self.op.delete(key).await.map_err(|e| self.err(StoreOp::Delete, key, e))
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }
}

/// What a fault rule does to an operation it picks.
#[derive(Debug, Clone)]
pub enum FaultEffect {
    /// Fail without executing it (as a lost connection before the request would).
    Fail,
    /// Execute it after a delay.
    Delay(Duration),
}

/// Picks operations: of a kind (any when `op` is None), on keys starting with `prefix`;
/// lets the first `skip` matching ones through, then applies `effect` to the next `count`
/// (all of them when None).
#[derive(Debug, Clone)]
pub struct FaultRule {
    pub op: Option<StoreOp>,
    pub prefix: String,
    pub skip: u64,
    pub count: Option<u64>,
    pub effect: FaultEffect,
}

impl FaultRule {
    /// Fails every `op` (from now on, until changed with the builder methods).
    pub fn fail(op: StoreOp) -> FaultRule {
        FaultRule { op: Some(op), prefix: String::new(), skip: 0, count: None, effect: FaultEffect::Fail }
    }

    pub fn delay(op: StoreOp, by: Duration) -> FaultRule {
        FaultRule { op: Some(op), prefix: String::new(), skip: 0, count: None, effect: FaultEffect::Delay(by) }
    }

    pub fn on_prefix(mut self, prefix: &str) -> FaultRule {
        self.prefix = prefix.into();
        self
    }

    pub fn after(mut self, skip: u64) -> FaultRule {
        self.skip = skip;
        self
    }

    pub fn times(mut self, count: u64) -> FaultRule {
        self.count = Some(count);
        self
    }
}

struct RuleState {
    rule: FaultRule,
    seen: u64,
}

/// A store that fails or delays the operations its rules pick, for tests.
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    rules: Mutex<Vec<RuleState>>,
    injected: AtomicU64,
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn ObjectStore>) -> FaultyStore {
        FaultyStore { inner, rules: Mutex::new(Vec::new()), injected: AtomicU64::new(0) }
    }

    pub fn add_rule(&self, rule: FaultRule) {
        self.rules.lock().push(RuleState { rule, seen: 0 });
    }

    pub fn clear_rules(&self) {
        self.rules.lock().clear();
    }

    /// Operations failed or delayed so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    /// The effect for this operation, counting it against every rule it matches.
    fn pick(&self, op: StoreOp, key: &str) -> Option<FaultEffect> {
        let mut picked = None;
        for st in self.rules.lock().iter_mut() {
            let r = &st.rule;
            if r.op.is_some_and(|o| o != op) || !key.starts_with(&r.prefix) {
                continue;
            }
            st.seen += 1;
            let n = st.seen - 1;
            let hit = n >= r.skip && r.count.is_none_or(|c| n < r.skip + c);
            if hit && picked.is_none() {
                picked = Some(r.effect.clone());
            }
        }
        if picked.is_some() {
            self.injected.fetch_add(1, Ordering::Relaxed);
        }
        picked
    }

    async fn gate(&self, op: StoreOp, key: &str) -> Result<(), StoreError> {
        match self.pick(op, key) {
            None => Ok(()),
            Some(FaultEffect::Delay(d)) => {
                tokio::time::sleep(d).await;
                Ok(())
            }
            Some(FaultEffect::Fail) => {
                Err(StoreError::Failed { op, store: self.describe(), key: key.into(), cause: "injected fault".into() })
            }
        }
    }
}

#[async_trait::async_trait]
impl ObjectStore for FaultyStore {
    async fn put(&self, key: &str, data: Vec<u8>) -> Result<(), StoreError> {
        self.gate(StoreOp::Put, key).await?;
        self.inner.put(key, data).await
    }

    async fn get(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        self.gate(StoreOp::Get, key).await?;
        self.inner.get(key).await
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StoreError> {
        self.gate(StoreOp::Head, key).await?;
        self.inner.head(key).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        self.gate(StoreOp::List, prefix).await?;
        self.inner.list(prefix).await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.gate(StoreOp::Delete, key).await?;
        self.inner.delete(key).await
    }

    fn describe(&self) -> String {
        format!("faulty {}", self.inner.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        validate_key("chunks/ab/cd").unwrap();
        for bad in ["", "/a", "a/", "a//b", "a/./b", "../a", "a\nb", "a\\b"] {
            assert!(validate_key(bad).is_err(), "{bad:?}");
        }
        validate_prefix("").unwrap();
        validate_prefix("manifests/t/").unwrap();
        validate_prefix("manifests/t").unwrap();
        assert!(validate_prefix("/").is_err());
        assert!(validate_prefix("a//").is_err());
    }

    #[test]
    fn staging_is_a_sibling() {
        assert_eq!(staging_dir(Path::new("/a/obs")).unwrap(), PathBuf::from("/a/obs.partial"));
        assert!(staging_dir(Path::new("/")).is_err());
    }
}
