//! The daemon: opens the store, binds the listeners, serves NBD, the gRPC API and metrics
//! until SIGTERM or SIGINT, then drains and flushes.
//!
//! Start-up order: logging, TLS certificate and key (a bad file ends the start with an error
//! naming it), I/O backend, data directory and store, listeners (a bind failure
//! ends the start with an error naming the address), control plane (admin tenant on first
//! start, attachments reloaded into the export registry), then serving. One log line,
//! `evs-target ready`, says when everything is up.
//!
//! Shutdown order: stop accepting (gRPC server asked to stop, NBD accept loops dropped),
//! close NBD connections after their in-flight requests, wait for the connection threads,
//! let in-flight gRPC calls finish (bounded), flush every volume, exit 0.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use evs_proto::v1::snapshot_service_server::SnapshotServiceServer;
use evs_proto::v1::volume_service_server::VolumeServiceServer;
use evs_snapshot::io_engine::uring::UringEngine;
use evs_snapshot::{BlockStore, EngineKind, StoreOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;

use crate::api::{ControlPlane, Gauges, NbdEndpoints, VolumeApi};
use crate::config::{is_loopback_ip, Config, IoBackend, ListenAddr, NbdTls, DIRECT_WRITE_MAX};
use crate::exports::ExportRegistry;
use crate::nbd::server::{NbdServer, NbdTlsConfig};
use crate::tls::{self, TlsIdentity};

/// How long in-flight gRPC calls get to finish at shutdown.
const GRPC_DRAIN: Duration = Duration::from_secs(10);

/// Runs the daemon until SIGTERM/SIGINT. Errors are start-up failures (named address, path)
/// or a failed final flush.
pub fn run(config: Config) -> anyhow::Result<()> {
    init_logging(config.log.as_deref());
    tls::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("evs-control")
        .build()
        .context("cannot start the tokio runtime")?;
    rt.block_on(serve(config))
}

/// Logs to stderr: `--log`, else `RUST_LOG`, else `info`. Colours only on a terminal, so
/// logs captured by a supervisor or a test stay greppable. rustls is held to errors unless
/// the filter names it: it warns about every GnuTLS client that connects by IP address (an
/// IP in the SNI extension), and the TLS failures that matter are logged by the NBD server.
fn init_logging(level: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let given = level.map(str::to_string).or_else(|| std::env::var(EnvFilter::DEFAULT_ENV).ok());
    let directives = match given {
        Some(l) if l.contains("rustls") => l,
        Some(l) => format!("{l},rustls=error"),
        None => "info,rustls=error".to_string(),
    };
    let filter = EnvFilter::try_new(&directives).unwrap_or_else(|_| EnvFilter::new("info,rustls=error"));
    // try_init: a second call (tests running the daemon in-process) keeps the first logger.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// The engine `--io-backend` asks for. `uring` is checked here rather than at the first
/// connection, so a kernel or sandbox that refuses io_uring fails the start, clearly.
fn choose_engine(backend: IoBackend) -> anyhow::Result<EngineKind> {
    match backend {
        IoBackend::Portable => Ok(EngineKind::Portable),
        IoBackend::Uring => {
            UringEngine::probe().map_err(|e| {
                anyhow!("--io-backend uring: io_uring is not available here ({e}); use --io-backend portable or auto")
            })?;
            Ok(EngineKind::Uring)
        }
        IoBackend::Auto => {
            let kind = EngineKind::detect();
            if kind == EngineKind::Portable {
                tracing::info!("io_uring is not available here; using the portable I/O backend");
            }
            Ok(kind)
        }
    }
}

async fn bind_tcp(what: &str, addr: &ListenAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr.0.as_str()).await.with_context(|| format!("cannot listen for {what} on {addr}"))
}

/// Binds the NBD unix socket at `path`, replacing a stale socket file left by a daemon that
/// died. A live socket (another daemon answers) or a file that is not a socket is an error.
fn bind_unix(path: &Path) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!("cannot listen for NBD on {}: another process is serving that socket", path.display());
            }
            std::fs::remove_file(path)
                .with_context(|| format!("cannot remove the stale NBD socket {}", path.display()))?;
        }
        Ok(_) => bail!("cannot listen for NBD on {}: the path exists and is not a socket", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot listen for NBD on {}", path.display())),
    }
    UnixListener::bind(path).with_context(|| format!("cannot listen for NBD on {}", path.display()))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    // Signals first: a SIGTERM that arrives during start-up is then handled once serving.
    let mut sigterm = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;

    let identity = match &config.tls {
        Some(files) => Some(TlsIdentity::load(files)?),
        None => None,
    };
    let engine = choose_engine(config.io_backend)?;
    let data_dir = config.data_dir.clone();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;
    let opts = StoreOptions {
        engine,
        direct_writes: config.direct_writes,
        direct_write_max: DIRECT_WRITE_MAX,
        max_snapshots: config.max_snapshots,
    };
    let store = {
        let dir = data_dir.clone();
        tokio::task::spawn_blocking(move || BlockStore::open(&dir, opts))
            .await
            .context("opening the block store")?
            .with_context(|| format!("cannot open the block store in {}", data_dir.display()))?
    };

    let nbd_tcp = bind_tcp("NBD", &config.nbd_listen).await?;
    let nbd_unix = match &config.nbd_socket {
        Some(p) => {
            // Absolute, because the path goes into the URIs that clients elsewhere use.
            let abs = std::path::absolute(p).with_context(|| format!("bad NBD socket path {}", p.display()))?;
            let l = bind_unix(&abs)?;
            Some((l, abs))
        }
        None => None,
    };
    let api_listener = bind_tcp("the gRPC API", &config.api_listen).await?;
    let metrics_listener = bind_tcp("metrics", &config.metrics_listen).await?;
    let nbd_addr = nbd_tcp.local_addr().context("NBD listener address")?;
    let api_addr = api_listener.local_addr().context("API listener address")?;
    let metrics_addr = metrics_listener.local_addr().context("metrics listener address")?;

    let exports = ExportRegistry::new();
    // "on" lets loopback peers stay in plain text, so a loopback listener's URIs stay nbd://.
    let endpoints = NbdEndpoints {
        tcp: nbd_addr,
        unix: nbd_unix.as_ref().map(|(_, p)| p.clone()),
        tcp_tls: config.nbd_tls == NbdTls::Require || (config.nbd_tls == NbdTls::On && !is_loopback_ip(nbd_addr.ip())),
        unix_tls: config.nbd_tls == NbdTls::Require,
    };
    let (cp, report) = {
        let (store, exports, dir) = (store.clone(), exports.clone(), data_dir.clone());
        tokio::task::spawn_blocking(move || ControlPlane::open(store, exports, &dir, endpoints))
            .await
            .context("opening the control plane")?
            .context("cannot open the control plane tables in the catalog")?
    };
    if let Some(path) = &report.admin_token_created {
        tracing::info!(token_file = %path.display(), "created tenant admin");
    }
    if report.attachments_loaded + report.attachments_dropped > 0 {
        tracing::info!(
            loaded = report.attachments_loaded,
            dropped = report.attachments_dropped,
            "attachments reloaded"
        );
    }

    // Serving starts here.
    let nbd_tls = match (&identity, config.nbd_tls) {
        (Some(id), mode @ (NbdTls::On | NbdTls::Require)) => Some(NbdTlsConfig { mode, config: id.nbd_config() }),
        _ => None,
    };
    let nbd = NbdServer::new(exports.clone(), store.clone(), engine, nbd_tls);
    let mut nbd_tasks: Vec<JoinHandle<()>> = vec![tokio::spawn(nbd.clone().serve_tcp(nbd_tcp))];
    let socket_path = nbd_unix.as_ref().map(|(_, p)| p.clone());
    if let Some((l, _)) = nbd_unix {
        nbd_tasks.push(tokio::spawn(nbd.clone().serve_unix(l)));
    }

    let (stop_grpc, grpc_stopped) = tokio::sync::oneshot::channel::<()>();
    let grpc = {
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(evs_proto::FILE_DESCRIPTOR_SET)
            .build_v1()
            .context("building the gRPC reflection service")?;
        // v1alpha too: older grpcurl versions and other tools only speak it.
        let reflection_alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(evs_proto::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .context("building the gRPC reflection service")?;
        let mut builder = tonic::transport::Server::builder();
        if let Some(id) = &identity {
            builder = builder.tls_config(id.api_config()).context("configuring TLS for the gRPC API")?;
        }
        let router = builder
            .add_service(VolumeServiceServer::new(VolumeApi::new(cp.clone())))
            .add_service(SnapshotServiceServer::new(VolumeApi::new(cp.clone())))
            .add_service(reflection)
            .add_service(reflection_alpha);
        let incoming = TcpIncoming::from(api_listener).with_nodelay(Some(true));
        tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
            let _ = grpc_stopped.await;
        }))
    };
    let metrics = {
        let info = Arc::new(MetricsInfo { io_backend: engine.name(), az: config.az.clone() });
        tokio::spawn(serve_metrics(metrics_listener, cp.clone(), info))
    };

    tracing::info!(
        nbd = %nbd_addr,
        nbd_socket = %socket_path.as_deref().map(|p| p.display().to_string()).unwrap_or_else(|| "-".into()),
        api = %api_addr,
        api_tls = identity.is_some(),
        nbd_tls = config.nbd_tls.name(),
        metrics = %metrics_addr,
        io_backend = %engine.name(),
        direct_writes = config.direct_writes,
        az = %config.az,
        data_dir = %data_dir.display(),
        backup_store = %config.backup_store,
        "evs-target ready"
    );

    let mut grpc = grpc;
    let mut failure: Option<anyhow::Error> = None;
    tokio::select! {
        _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = sigint.recv() => tracing::info!("SIGINT: shutting down"),
        r = &mut grpc => {
            failure = Some(match r {
                Ok(Ok(())) => anyhow!("the gRPC server stopped unexpectedly"),
                Ok(Err(e)) => anyhow!("the gRPC server failed: {e}"),
                Err(e) => anyhow!("the gRPC server task failed: {e}"),
            });
        }
    }

    // Stop accepting.
    let _ = stop_grpc.send(());
    for t in &nbd_tasks {
        t.abort();
    }
    metrics.abort();
    // Drain NBD: in-flight requests are answered, then every connection closes.
    nbd.shutdown();
    {
        let nbd = nbd.clone();
        tokio::task::spawn_blocking(move || nbd.wait_idle()).await.context("waiting for NBD connections")?;
    }
    if failure.is_none() {
        match tokio::time::timeout(GRPC_DRAIN, &mut grpc).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "the gRPC server ended with an error"),
            Ok(Err(e)) => tracing::warn!(error = %e, "the gRPC server task failed"),
            Err(_) => {
                tracing::warn!("gRPC calls still running after {GRPC_DRAIN:?}; stopping anyway");
                grpc.abort();
            }
        }
    }
    // Flush: everything acknowledged to a client is durable before we exit.
    {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.flush_all())
            .await
            .context("flushing volumes")?
            .context("cannot flush the volumes at shutdown")?;
    }
    if let Some(p) = &socket_path {
        let _ = std::fs::remove_file(p);
    }
    match failure {
        Some(e) => Err(e),
        None => {
            tracing::info!("evs-target stopped");
            Ok(())
        }
    }
}

/// Fixed labels of the metrics.
struct MetricsInfo {
    io_backend: &'static str,
    az: String,
}

/// `GET /metrics` in the Prometheus text format. One endpoint needs no HTTP framework: a
/// request head is read (bounded in size and time), one response is written, the connection
/// is closed.
async fn serve_metrics(listener: TcpListener, cp: Arc<ControlPlane>, info: Arc<MetricsInfo>) {
    loop {
        match listener.accept().await {
            Ok((sock, _)) => {
                tokio::spawn(metrics_conn(sock, cp.clone(), info.clone()));
            }
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Largest request head the metrics endpoint reads.
const MAX_HEAD: usize = 8192;

async fn metrics_conn(mut sock: TcpStream, cp: Arc<ControlPlane>, info: Arc<MetricsInfo>) {
    let head = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = Vec::with_capacity(512);
        let mut chunk = [0u8; 1024];
        loop {
            let n = sock.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
                return Some(buf);
            }
            if buf.len() > MAX_HEAD {
                return Some(buf);
            }
        }
    })
    .await;
    let Ok(Some(head)) = head else { return };
    let line = head.split(|&b| b == b'\n').next().unwrap_or(&[]);
    let line = String::from_utf8_lossy(line);
    let response = match route(&line) {
        Route::Metrics { head_only } => {
            let gauges = {
                let cp = cp.clone();
                tokio::task::spawn_blocking(move || cp.gauges()).await
            };
            match gauges {
                Ok(Ok(g)) => http_response(200, "OK", &render_metrics(&g, &info), head_only),
                Ok(Err(e)) => http_response(500, "Internal Server Error", &format!("catalog error: {e}\n"), head_only),
                Err(e) => http_response(500, "Internal Server Error", &format!("{e}\n"), head_only),
            }
        }
        Route::NotFound => http_response(404, "Not Found", "not found: try /metrics\n", false),
        Route::MethodNotAllowed => http_response(405, "Method Not Allowed", "only GET\n", false),
        Route::BadRequest => http_response(400, "Bad Request", "bad request\n", false),
    };
    let _ = sock.write_all(response.as_bytes()).await;
    let _ = sock.shutdown().await;
}

#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics { head_only: bool },
    NotFound,
    MethodNotAllowed,
    BadRequest,
}

/// Routes an HTTP request line (`GET /metrics HTTP/1.1`).
fn route(request_line: &str) -> Route {
    let mut parts = request_line.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next()) else {
        return Route::BadRequest;
    };
    if !version.starts_with("HTTP/1.") {
        return Route::BadRequest;
    }
    let path = target.split('?').next().unwrap_or("");
    if path != "/metrics" {
        return Route::NotFound;
    }
    match method {
        "GET" => Route::Metrics { head_only: false },
        "HEAD" => Route::Metrics { head_only: true },
        _ => Route::MethodNotAllowed,
    }
}

fn http_response(code: u16, reason: &str, body: &str, head_only: bool) -> String {
    let ctype = if code == 200 { "text/plain; version=0.0.4; charset=utf-8" } else { "text/plain; charset=utf-8" };
    let mut r = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        r.push_str(body);
    }
    r
}

/// The Prometheus text exposition of the gauges.
fn render_metrics(g: &Gauges, info: &MetricsInfo) -> String {
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, labels: &str, value: u64| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n{name}{labels} {value}\n"));
    };
    gauge("evs_up", "1 while the EVS target serves.", "", 1);
    gauge("evs_volumes", "Volumes in the catalog.", "", g.volumes);
    gauge("evs_attached_volumes", "Volumes exported over NBD (attached).", "", g.attached_volumes);
    let labels = format!(
        "{{version=\"{}\",io_backend=\"{}\",az=\"{}\"}}",
        env!("CARGO_PKG_VERSION"),
        info.io_backend,
        escape_label(&info.az)
    );
    gauge("evs_build_info", "Version, I/O backend and AZ of this target.", &labels, 1);
    out
}

/// Escapes a Prometheus label value.
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route("GET /metrics HTTP/1.1\r"), Route::Metrics { head_only: false });
        assert_eq!(route("GET /metrics?x=1 HTTP/1.0"), Route::Metrics { head_only: false });
        assert_eq!(route("HEAD /metrics HTTP/1.1"), Route::Metrics { head_only: true });
        assert_eq!(route("POST /metrics HTTP/1.1"), Route::MethodNotAllowed);
        assert_eq!(route("GET / HTTP/1.1"), Route::NotFound);
        assert_eq!(route("garbage"), Route::BadRequest);
        assert_eq!(route("GET /metrics SPDY/3"), Route::BadRequest);
    }

    #[test]
    fn metrics_text() {
        let info = MetricsInfo { io_backend: "uring", az: "az\"1".into() };
        let text = render_metrics(&Gauges { volumes: 3, attached_volumes: 1 }, &info);
        assert!(text.contains("# TYPE evs_up gauge\nevs_up 1\n"), "{text}");
        assert!(text.contains("\nevs_volumes 3\n"), "{text}");
        assert!(text.contains("\nevs_attached_volumes 1\n"), "{text}");
        assert!(text.contains("io_backend=\"uring\",az=\"az\\\"1\"} 1\n"), "{text}");
    }

    #[test]
    fn http_framing() {
        let r = http_response(200, "OK", "abc", false);
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(r.contains("Content-Length: 3\r\n"));
        assert!(r.ends_with("\r\n\r\nabc"));
        assert!(http_response(200, "OK", "abc", true).ends_with("\r\n\r\n"));
    }
}
