//! Connecting to the daemon: endpoint, token, and errors worded for the command line.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use evs_proto::v1::audit_service_client::AuditServiceClient;
use evs_proto::v1::backup_service_client::BackupServiceClient;
use evs_proto::v1::dr_service_client::DrServiceClient;
use evs_proto::v1::job_service_client::JobServiceClient;
use evs_proto::v1::policy_service_client::PolicyServiceClient;
use evs_proto::v1::server_service_client::ServerServiceClient;
use evs_proto::v1::snapshot_service_client::SnapshotServiceClient;
use evs_proto::v1::tenant_service_client::TenantServiceClient;
use evs_proto::v1::volume_service_client::VolumeServiceClient;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// The volume client with the tenant's token on every call.
pub type VolumeClient = VolumeServiceClient<InterceptedService<Channel, BearerAuth>>;
pub type SnapshotClient = SnapshotServiceClient<InterceptedService<Channel, BearerAuth>>;
pub type TenantClient = TenantServiceClient<InterceptedService<Channel, BearerAuth>>;
pub type ServerClient = ServerServiceClient<InterceptedService<Channel, BearerAuth>>;
pub type AuditClient = AuditServiceClient<InterceptedService<Channel, BearerAuth>>;
pub type BackupClient = BackupServiceClient<InterceptedService<Channel, BearerAuth>>;
pub type PolicyClient = PolicyServiceClient<InterceptedService<Channel, BearerAuth>>;
pub type DrClient = DrServiceClient<InterceptedService<Channel, BearerAuth>>;
pub type JobClient = JobServiceClient<InterceptedService<Channel, BearerAuth>>;

/// The clients of every service, over one connection.
pub struct Api {
    pub volume: VolumeClient,
    pub snapshot: SnapshotClient,
    pub tenant: TenantClient,
    pub server: ServerClient,
    pub audit: AuditClient,
    pub job: JobClient,
    pub backup: BackupClient,
    pub policy: PolicyClient,
    pub dr: DrClient,
}

/// Adds `authorization: Bearer <token>` to every request.
#[derive(Clone)]
pub struct BearerAuth(MetadataValue<Ascii>);

impl Interceptor for BearerAuth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

/// A refusal from the server: printed as the server's message, which names the problem.
#[derive(Debug)]
pub struct ServerError {
    pub code: tonic::Code,
    pub message: String,
    /// The call failed below the API (the connection or HTTP/2, not the server's answer):
    /// the causes, for [`explain`].
    pub transport: Option<String>,
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.message.is_empty() {
            write!(f, "{}", self.code.description())
        } else {
            f.write_str(&self.message)
        }
    }
}

impl std::error::Error for ServerError {}

impl From<tonic::Status> for ServerError {
    fn from(s: tonic::Status) -> Self {
        // tonic turns transport failures into a status whose source is the cause.
        let transport = std::error::Error::source(&s).map(|cause| {
            let mut text = s.message().to_string();
            push_causes(&mut text, Some(cause));
            text
        });
        ServerError { code: s.code(), message: s.message().to_string(), transport }
    }
}

/// Appends each cause of the chain not already in `text`.
fn push_causes(text: &mut String, mut cur: Option<&(dyn std::error::Error + 'static)>) {
    while let Some(c) = cur {
        let t = c.to_string();
        if !text.contains(&t) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&t);
        }
        cur = c.source();
    }
}

/// The error to print for a failed command: a call that failed below the API says which
/// endpoint it talked to and, for http://, that the daemon may want TLS.
pub fn explain(e: anyhow::Error, url: &str) -> anyhow::Error {
    match e.downcast_ref::<ServerError>().and_then(|s| s.transport.as_deref()) {
        Some(detail) => {
            let hint = if url.starts_with("http://") {
                " (if the daemon serves TLS, use an https:// endpoint with --ca-cert)"
            } else {
                ""
            };
            anyhow::anyhow!("the connection to the EVS API at {url} failed: {detail}{hint}")
        }
        None => e,
    }
}

/// `host:port` means `http://host:port`.
pub fn normalize_endpoint(endpoint: &str) -> String {
    if endpoint.contains("://") {
        endpoint.to_string()
    } else {
        format!("http://{endpoint}")
    }
}

/// The token: `--token` or `EVS_TOKEN` (already merged by clap into `given`), else the
/// contents of `default_file` if it can be read.
pub fn resolve_token(given: Option<&str>, default_file: &Path) -> anyhow::Result<String> {
    if let Some(t) = given {
        let t = t.trim();
        anyhow::ensure!(!t.is_empty(), "the token given with --token or EVS_TOKEN is empty");
        return Ok(t.to_string());
    }
    match std::fs::read_to_string(default_file) {
        Ok(s) => {
            let t = s.trim();
            anyhow::ensure!(!t.is_empty(), "the token file {} is empty", default_file.display());
            Ok(t.to_string())
        }
        Err(e) => anyhow::bail!(
            "no token: pass --token TOKEN or set EVS_TOKEN ({} is not readable: {e})",
            default_file.display()
        ),
    }
}

/// How to reach the endpoint: in plain text, or over TLS trusting one CA file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport<'a> {
    Plain,
    Tls { ca_cert: &'a Path },
}

/// The transport `url`'s scheme asks for. An https endpoint needs `--ca-cert`: the daemon's
/// certificate comes from the operator's CA, not from a public one, so the system's roots are
/// not consulted. A CA with an http endpoint is refused rather than ignored: the user meant
/// TLS and would not get it.
pub fn transport<'a>(url: &str, ca_cert: Option<&'a Path>) -> anyhow::Result<Transport<'a>> {
    let scheme = url.split_once("://").map_or("", |(s, _)| s);
    match (scheme, ca_cert) {
        ("http", None) => Ok(Transport::Plain),
        ("http", Some(ca)) => bail!(
            "--ca-cert (or EVS_CA_CERT) {} is for TLS, but the endpoint {url} is plain http: use https://",
            ca.display()
        ),
        ("https", Some(ca)) => Ok(Transport::Tls { ca_cert: ca }),
        ("https", None) => bail!(
            "the endpoint {url} uses TLS: pass --ca-cert FILE (or set EVS_CA_CERT) with the CA certificate that \
             signed the daemon's certificate"
        ),
        (other, _) => bail!("unsupported scheme {other:?} in the endpoint {url} (expected http:// or https://)"),
    }
}

/// Reads a CA file: PEM with at least one certificate.
pub fn read_ca(path: &Path) -> anyhow::Result<Vec<u8>> {
    let pem = std::fs::read(path).with_context(|| format!("cannot read the CA certificate {}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("the CA certificate {} is not valid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no certificate (expected PEM \"BEGIN CERTIFICATE\" blocks)", path.display());
    }
    Ok(pem)
}

/// Connects to `endpoint` and returns clients that authenticate with `token`.
pub async fn connect(endpoint: &str, token: &str, ca_cert: Option<&Path>) -> anyhow::Result<Api> {
    let url = normalize_endpoint(endpoint);
    let transport = transport(&url, ca_cert)?;
    let value: MetadataValue<Ascii> = format!("Bearer {token}")
        .parse()
        .map_err(|_| anyhow::anyhow!("the token contains characters that cannot be sent in a header"))?;
    let mut ep = Endpoint::from_shared(url.clone())
        .with_context(|| format!("invalid endpoint {url:?}"))?
        .connect_timeout(Duration::from_secs(5));
    if let Transport::Tls { ca_cert } = transport {
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read_ca(ca_cert)?));
        ep = ep.tls_config(tls).context("cannot set up TLS")?;
    }
    let channel = ep.connect().await.map_err(|e| connect_error(&url, &transport, &e))?;
    let auth = BearerAuth(value);
    Ok(Api {
        volume: VolumeServiceClient::with_interceptor(channel.clone(), auth.clone()),
        snapshot: SnapshotServiceClient::with_interceptor(channel.clone(), auth.clone()),
        tenant: TenantServiceClient::with_interceptor(channel.clone(), auth.clone()),
        server: ServerServiceClient::with_interceptor(channel.clone(), auth.clone()),
        job: JobServiceClient::with_interceptor(channel.clone(), auth.clone()),
        backup: BackupServiceClient::with_interceptor(channel.clone(), auth.clone()),
        policy: PolicyServiceClient::with_interceptor(channel.clone(), auth.clone()),
        dr: DrServiceClient::with_interceptor(channel.clone(), auth.clone()),
        audit: AuditServiceClient::with_interceptor(channel, auth),
    })
}

/// The one-line reason a connection failed, from the error's whole chain (tonic's top-level
/// "transport error" says nothing), with a hint where the cause is a TLS mismatch.
fn connect_error(url: &str, transport: &Transport<'_>, e: &(dyn std::error::Error + 'static)) -> anyhow::Error {
    let mut detail = String::new();
    push_causes(&mut detail, Some(e));
    let hint = match transport {
        Transport::Tls { ca_cert } if detail.contains("certificate") => {
            format!(" (the daemon's certificate is not signed by {} or does not name this host)", ca_cert.display())
        }
        Transport::Tls { .. } if detail.contains("InvalidContentType") || detail.contains("corrupt message") => {
            " (the daemon does not seem to serve TLS: try http://)".to_string()
        }
        _ => String::new(),
    };
    anyhow::anyhow!("cannot connect to the EVS API at {url}: {detail}{hint}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transports() {
        assert_eq!(transport("http://h:1", None).unwrap(), Transport::Plain);
        let ca = Path::new("ca.pem");
        assert_eq!(transport("https://h:1", Some(ca)).unwrap(), Transport::Tls { ca_cert: ca });
        let e = transport("https://h:1", None).unwrap_err().to_string();
        assert!(e.contains("--ca-cert") && e.contains("https://h:1"), "{e}");
        let e = transport("http://h:1", Some(ca)).unwrap_err().to_string();
        assert!(e.contains("ca.pem") && e.contains("use https://"), "{e}");
        let e = transport("ftp://h:1", None).unwrap_err().to_string();
        assert!(e.contains("\"ftp\""), "{e}");
    }

    #[test]
    fn ca_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.pem");
        assert!(read_ca(&missing).unwrap_err().to_string().contains("none.pem"));
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = read_ca(&empty).unwrap_err().to_string();
        assert!(e.contains("empty.pem") && e.contains("no certificate"), "{e}");
        let bad = dir.path().join("bad.pem");
        std::fs::write(&bad, "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n").unwrap();
        assert!(read_ca(&bad).unwrap_err().to_string().contains("bad.pem"));
    }

    #[test]
    fn endpoints() {
        assert_eq!(normalize_endpoint("127.0.0.1:10810"), "http://127.0.0.1:10810");
        assert_eq!(normalize_endpoint("https://evs.example:443"), "https://evs.example:443");
    }

    #[test]
    fn token_sources() {
        let dir = std::env::temp_dir().join(format!("evsctl-token-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("admin.token");
        assert_eq!(resolve_token(Some(" abc\n"), &file).unwrap(), "abc");
        assert!(resolve_token(Some(""), &file).is_err());
        let e = resolve_token(None, &file).unwrap_err().to_string();
        assert!(e.contains("--token") && e.contains("admin.token"), "{e}");
        std::fs::write(&file, "f00d\n").unwrap();
        assert_eq!(resolve_token(None, &file).unwrap(), "f00d");
        assert_eq!(resolve_token(Some("flag"), &file).unwrap(), "flag", "the flag wins");
        std::fs::write(&file, "\n").unwrap();
        assert!(resolve_token(None, &file).unwrap_err().to_string().contains("empty"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn transport_failures_name_the_endpoint() {
        let e =
            ServerError { code: tonic::Code::Unknown, message: "h2".into(), transport: Some("h2: bad frame".into()) };
        let msg = explain(e.into(), "http://h:1").to_string();
        assert!(msg.contains("http://h:1 failed: h2: bad frame") && msg.contains("https://"), "{msg}");
        let msg = explain(ServerError::from(tonic::Status::not_found("no volume")).into(), "http://h:1").to_string();
        assert_eq!(msg, "no volume", "a server's answer is printed as it is");
    }

    #[test]
    fn server_errors_print_the_server_message() {
        let e = ServerError::from(tonic::Status::not_found("volume \"db\" not found"));
        assert_eq!(e.to_string(), "volume \"db\" not found");
        let e = ServerError::from(tonic::Status::new(tonic::Code::Internal, ""));
        assert!(!e.to_string().is_empty());
    }
}
