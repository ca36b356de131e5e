//! The daemon's TLS identity: the PEM certificate chain and private key named by
//! `tls_cert`/`tls_key`, read and checked once at start-up, in the two forms the servers take
//! (tonic's for the gRPC API, a rustls `ServerConfig` for NBD STARTTLS).
//!
//! Clients are not asked for certificates: the API authenticates with tenant tokens and NBD
//! with the unguessable export name.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsFiles;

/// How long a client may take for the TLS handshake of the gRPC API.
const API_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the certificate or key cannot be used; every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the TLS {what} {}: {source}", path.display())]
    Read { what: &'static str, path: PathBuf, source: io::Error },
    #[error("TLS certificate {}: {message}", path.display())]
    Cert { path: PathBuf, message: String },
    #[error("TLS key {}: {message}", path.display())]
    Key { path: PathBuf, message: String },
    #[error("the TLS key {} does not belong to the certificate {}", key.display(), cert.display())]
    Mismatch { cert: PathBuf, key: PathBuf },
    #[error("cannot use the TLS certificate {} with the key {}: {message}", cert.display(), key.display())]
    Unusable { cert: PathBuf, key: PathBuf, message: String },
}

/// The server's certificate chain and key, checked.
pub struct TlsIdentity {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    nbd: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("TlsIdentity").field("cert_pem_len", &self.cert_pem.len()).finish_non_exhaustive()
    }
}

/// Makes ring the process's rustls provider. tonic's server builds its rustls config with the
/// process default, which rustls can only pick by itself when exactly one provider feature
/// is compiled in; installing it explicitly keeps that from ever being a panic. A provider
/// installed earlier (tests running several daemons in one process) is kept.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl TlsIdentity {
    /// Reads and checks both files: each must hold what it should (PEM certificates, one PEM
    /// private key), and the key must be the certificate's.
    pub fn load(files: &TlsFiles) -> Result<TlsIdentity, TlsError> {
        let read = |what, path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Read { what, path: path.to_path_buf(), source })
        };
        let cert_pem = read("certificate", &files.cert)?;
        let key_pem = read("key", &files.key)?;
        let chain = parse_chain(&cert_pem).map_err(|message| TlsError::Cert { path: files.cert.clone(), message })?;
        let key = parse_key(&key_pem).map_err(|message| TlsError::Key { path: files.key.clone(), message })?;
        let nbd = nbd_config(chain, key).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => {
                TlsError::Mismatch { cert: files.cert.clone(), key: files.key.clone() }
            }
            other => {
                TlsError::Unusable { cert: files.cert.clone(), key: files.key.clone(), message: other.to_string() }
            }
        })?;
        Ok(TlsIdentity { cert_pem, key_pem, nbd })
    }

    /// The gRPC server's TLS settings.
    pub fn api_config(&self) -> tonic::transport::ServerTlsConfig {
        tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem))
            .timeout(API_HANDSHAKE_TIMEOUT)
    }

    /// The NBD server's rustls configuration.
    pub fn nbd_config(&self) -> Arc<rustls::ServerConfig> {
        self.nbd.clone()
    }
}

fn parse_chain(pem_text: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain = CertificateDer::pem_slice_iter(pem_text).collect::<Result<Vec<_>, _>>().map_err(pem_message)?;
    if chain.is_empty() {
        return Err("no certificate in the file (expected PEM \"BEGIN CERTIFICATE\" blocks)".into());
    }
    Ok(chain)
}

fn parse_key(pem_text: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem_text).map_err(|e| match e {
        pem::Error::NoItemsFound => {
            "no private key in the file (expected PEM \"BEGIN PRIVATE KEY\", \"BEGIN RSA PRIVATE KEY\" or \
             \"BEGIN EC PRIVATE KEY\")"
                .to_string()
        }
        other => pem_message(other),
    })
}

fn pem_message(e: pem::Error) -> String {
    format!("not valid PEM: {e}")
}

/// TLS 1.2 and 1.3 (the NBD specification requires 1.2), ring's safe defaults, no client
/// certificates. The provider is given explicitly rather than taken from the process.
fn nbd_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(Arc::new(config))
}
