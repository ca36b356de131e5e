//! Connecting to the daemon: endpoint, token, and errors worded for the command line.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use evs_proto::v1::audit_service_client::AuditServiceClient;
use evs_proto::v1::job_service_client::JobServiceClient;
use evs_proto::v1::server_service_client::ServerServiceClient;
use evs_proto::v1::snapshot_service_client::SnapshotServiceClient;
use evs_proto::v1::tenant_service_client::TenantServiceClient;
use evs_proto::v1::volume_service_client::VolumeServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};

/// The volume client with the tenant's token on every call.
pub type VolumeClient = VolumeServiceClient<InterceptedService<Channel, BearerAuth>>;
pub type SnapshotClient = SnapshotServiceClient<InterceptedService<Channel, BearerAuth>>;
pub type TenantClient = TenantServiceClient<InterceptedService<Channel, BearerAuth>>;
pub type ServerClient = ServerServiceClient<InterceptedService<Channel, BearerAuth>>;
pub type AuditClient = AuditServiceClient<InterceptedService<Channel, BearerAuth>>;
pub type JobClient = JobServiceClient<InterceptedService<Channel, BearerAuth>>;

/// The clients of every service, over one connection.
pub struct Api {
    pub volume: VolumeClient,
    pub snapshot: SnapshotClient,
    pub tenant: TenantClient,
    pub server: ServerClient,
    pub audit: AuditClient,
    pub job: JobClient,
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
        ServerError { code: s.code(), message: s.message().to_string() }
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

/// Connects to `endpoint` and returns clients that authenticate with `token`.
pub async fn connect(endpoint: &str, token: &str) -> anyhow::Result<Api> {
    let url = normalize_endpoint(endpoint);
    let value: MetadataValue<Ascii> = format!("Bearer {token}")
        .parse()
        .map_err(|_| anyhow::anyhow!("the token contains characters that cannot be sent in a header"))?;
    let channel = Endpoint::from_shared(url.clone())
        .with_context(|| format!("invalid endpoint {url:?}"))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("cannot connect to the EVS API at {url}"))?;
    let auth = BearerAuth(value);
    Ok(Api {
        volume: VolumeServiceClient::with_interceptor(channel.clone(), auth.clone()),
        snapshot: SnapshotServiceClient::with_interceptor(channel.clone(), auth.clone()),
        tenant: TenantServiceClient::with_interceptor(channel.clone(), auth.clone()),
        server: ServerServiceClient::with_interceptor(channel.clone(), auth.clone()),
        job: JobServiceClient::with_interceptor(channel.clone(), auth.clone()),
        audit: AuditServiceClient::with_interceptor(channel, auth),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn server_errors_print_the_server_message() {
        let e = ServerError::from(tonic::Status::not_found("volume \"db\" not found"));
        assert_eq!(e.to_string(), "volume \"db\" not found");
        let e = ServerError::from(tonic::Status::new(tonic::Code::Internal, ""));
        assert!(!e.to_string().is_empty());
    }
}
