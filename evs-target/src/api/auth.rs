//! Tenants and their tokens.
//!
//! A tenant is a name and a bearer token. Only the token's BLAKE3 hash is stored (catalog
//! table `tenants`: name → hash), so a copy of the catalog does not give access. The hashes
//! are mirrored in memory, so authenticating a call costs one hash and one map look-up and
//! never waits for the catalog.
//!
//! On first start the daemon creates tenant `admin` and writes its token to
//! `<data-dir>/admin.token` (mode 0600), the one place the clear token ever exists.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use evs_snapshot::StoreError;
use parking_lot::RwLock;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tonic::metadata::MetadataMap;

/// Tenant name → BLAKE3 hash of its token.
const TENANTS: TableDefinition<&str, [u8; 32]> = TableDefinition::new("tenants");

/// The tenant created on first start; it administers the node.
pub const ADMIN_TENANT: &str = "admin";
/// File in the data directory holding the admin tenant's token.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// Why a call was refused before it ran. Mapped to UNAUTHENTICATED.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(
        "missing credentials: send gRPC metadata `authorization: Bearer <token>` \
         (evsctl: --token, EVS_TOKEN or ./evs-data/admin.token)"
    )]
    Missing,
    #[error("malformed authorization metadata: expected `Bearer <token>`")]
    Malformed,
    #[error("invalid token: it belongs to no tenant")]
    UnknownToken,
}

/// Failures while setting up the admin tenant.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error(transparent)]
    Catalog(#[from] StoreError),
    #[error("cannot write the admin token to {}: {source}", path.display())]
    TokenFile { path: PathBuf, source: io::Error },
    #[error("cannot generate a token: the OS random number generator failed: {0}")]
    Random(String),
}

/// The tenants of this node, by token hash.
pub struct Tenants {
    by_hash: RwLock<HashMap<[u8; 32], String>>,
}

impl Tenants {
    /// Loads every tenant from the catalog (creating the table on first start).
    pub fn load(db: &Database) -> Result<Tenants, StoreError> {
        let w = db.begin_write()?;
        w.open_table(TENANTS)?;
        w.commit()?;
        let r = db.begin_read()?;
        let t = r.open_table(TENANTS)?;
        let mut by_hash = HashMap::new();
        for row in t.iter()? {
            let (name, hash) = row?;
            by_hash.insert(hash.value(), name.value().to_string());
        }
        Ok(Tenants { by_hash: RwLock::new(by_hash) })
    }

    /// Creates tenant `admin` if it does not exist yet, writing its token to
    /// `<data_dir>/admin.token`. Returns the token file's path when it was created.
    pub fn bootstrap_admin(&self, db: &Database, data_dir: &Path) -> Result<Option<PathBuf>, BootstrapError> {
        if self.by_hash.read().values().any(|n| n == ADMIN_TENANT) {
            return Ok(None);
        }
        let token = new_token()?;
        let path = data_dir.join(ADMIN_TOKEN_FILE);
        // The file first, the hash second: a crash in between leaves no admin tenant, and the
        // next start simply makes a new token. The other order could leave a tenant whose
        // token nobody knows.
        write_secret(&path, &token).map_err(|source| BootstrapError::TokenFile { path: path.clone(), source })?;
        self.insert(db, ADMIN_TENANT, &token)?;
        Ok(Some(path))
    }

    /// Adds (or re-keys) tenant `name` with `token`, in the catalog then in memory.
    pub fn insert(&self, db: &Database, name: &str, token: &str) -> Result<(), StoreError> {
        let hash = hash_token(token);
        let w = db.begin_write()?;
        {
            let mut t = w.open_table(TENANTS)?;
            t.insert(name, hash)?;
        }
        w.commit()?;
        let mut g = self.by_hash.write();
        g.retain(|_, n| n != name);
        g.insert(hash, name.to_string());
        Ok(())
    }

    /// Removes tenant `name` (its token stops working at once).
    pub fn remove(&self, db: &Database, name: &str) -> Result<(), StoreError> {
        let w = db.begin_write()?;
        w.open_table(TENANTS)?.remove(name)?;
        w.commit()?;
        self.by_hash.write().retain(|_, n| n != name);
        Ok(())
    }

    /// Every tenant's name.
    pub fn names(&self) -> Vec<String> {
        self.by_hash.read().values().cloned().collect()
    }

    /// Whether tenant `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.by_hash.read().values().any(|n| n == name)
    }

    /// The tenant a call's `authorization` metadata authenticates.
    pub fn authenticate(&self, metadata: &MetadataMap) -> Result<String, AuthError> {
        let token = bearer_token(metadata)?;
        self.by_hash.read().get(&hash_token(token)).cloned().ok_or(AuthError::UnknownToken)
    }
}

/// The token of `authorization: Bearer <token>` (scheme case-insensitive, as in RFC 6750).
pub fn bearer_token(metadata: &MetadataMap) -> Result<&str, AuthError> {
    let value = metadata.get("authorization").ok_or(AuthError::Missing)?;
    let value = value.to_str().map_err(|_| AuthError::Malformed)?.trim();
    let (scheme, token) = value.split_once(' ').ok_or(AuthError::Malformed)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(AuthError::Malformed);
    }
    Ok(token)
}

/// BLAKE3 of the token. Tokens carry 256 random bits, so a fast unsalted hash is enough:
/// there is nothing to brute-force.
pub fn hash_token(token: &str) -> [u8; 32] {
    *blake3::hash(token.as_bytes()).as_bytes()
}

/// A fresh tenant token: 256 bits from the OS RNG, hex.
pub fn new_token() -> Result<String, BootstrapError> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| BootstrapError::Random(e.to_string()))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Writes `secret` to `path` readable by the owner only, atomically (temporary file, fsync,
/// rename), so a crash never leaves a truncated token behind.
fn write_secret(path: &Path, secret: &str) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
    // The umask can only remove bits from 0600, but make the mode explicit all the same.
    f.set_permissions(fs::Permissions::from_mode(0o600))?;
    f.write_all(secret.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::metadata::MetadataValue;

    fn md(v: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", MetadataValue::try_from(v).unwrap());
        m
    }

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer_token(&md("Bearer abc")), Ok("abc"));
        assert_eq!(bearer_token(&md("bearer   abc ")), Ok("abc"));
        assert_eq!(bearer_token(&MetadataMap::new()), Err(AuthError::Missing));
        assert_eq!(bearer_token(&md("Basic abc")), Err(AuthError::Malformed));
        assert_eq!(bearer_token(&md("abc")), Err(AuthError::Malformed));
        assert_eq!(bearer_token(&md("Bearer ")), Err(AuthError::Malformed));
    }

    #[test]
    fn tokens_are_random_hex() {
        let a = new_token().unwrap();
        let b = new_token().unwrap();
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn admin_bootstrap_writes_a_private_token_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("catalog.redb")).unwrap();
        let tenants = Tenants::load(&db).unwrap();
        let path = tenants.bootstrap_admin(&db, dir.path()).unwrap().expect("created");
        assert_eq!(path, dir.path().join(ADMIN_TOKEN_FILE));
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let token = fs::read_to_string(&path).unwrap().trim().to_string();
        assert_eq!(tenants.authenticate(&md(&format!("Bearer {token}"))), Ok(ADMIN_TENANT.to_string()));
        assert_eq!(tenants.authenticate(&md("Bearer nope")), Err(AuthError::UnknownToken));

        // A second start finds the tenant in the catalog and keeps the token.
        drop(tenants);
        let again = Tenants::load(&db).unwrap();
        assert!(again.contains(ADMIN_TENANT));
        assert_eq!(again.bootstrap_admin(&db, dir.path()).unwrap(), None);
        assert_eq!(fs::read_to_string(&path).unwrap().trim(), token);
        assert_eq!(again.authenticate(&md(&format!("Bearer {token}"))), Ok(ADMIN_TENANT.to_string()));
        // Only the hash is stored.
        let raw = fs::read(dir.path().join("catalog.redb")).unwrap();
        assert!(!raw.windows(token.len()).any(|w| w == token.as_bytes()));
    }
}
