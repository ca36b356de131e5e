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
//! close the vhost-user sockets and connections (in-flight guest requests complete first),
//! let in-flight gRPC calls finish (bounded), stop the running jobs at their next check
//! (bounded; they stay `running` in the catalog and resume at the next start), flush every
//! volume, exit 0.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use evs_proto::v1::audit_service_server::AuditServiceServer;
use evs_proto::v1::job_service_server::JobServiceServer;
use evs_proto::v1::server_service_server::ServerServiceServer;
use evs_proto::v1::snapshot_service_server::SnapshotServiceServer;
use evs_proto::v1::tenant_service_server::TenantServiceServer;
use evs_proto::v1::volume_service_server::VolumeServiceServer;
use evs_snapshot::io_engine::uring::UringEngine;
use evs_snapshot::{BlockStore, EngineKind, StoreOptions};
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;

use crate::api::{ControlOptions, ControlPlane, NbdEndpoints, VolumeApi};
use crate::config::{is_loopback_ip, Config, IoBackend, ListenAddr, NbdTls, DIRECT_WRITE_MAX};
use crate::exports::ExportRegistry;
use crate::metrics::{serve_metrics, MetricsInfo};
use crate::nbd::server::{NbdServer, NbdTlsConfig};
use crate::tls::{self, TlsIdentity};
use crate::vhost::VhostUserServer;

/// How long in-flight gRPC calls get to finish at shutdown.
const GRPC_DRAIN: Duration = Duration::from_secs(10);
/// Queues per vhost-user-blk device (one vring thread each; QEMU's `num-queues` may ask for
/// fewer, e.g. one per vCPU).
const VHOST_USER_QUEUES: usize = 4;
/// How long running jobs get to reach their next check at shutdown.
const JOBS_DRAIN: Duration = Duration::from_secs(10);

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

    match evs_snapshot::layer::raise_open_file_limit() {
        Ok(n) => tracing::debug!(limit = n, "open file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open file limit; many snapshots may exhaust it"),
    }
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
    // Before the control plane opens: it re-binds the persisted vhost-user sockets.
    let vhost_dir = std::path::absolute(&config.vhost_user_dir)
        .with_context(|| format!("bad vhost-user directory {}", config.vhost_user_dir.display()))?;
    let vhost = VhostUserServer::new(&vhost_dir, engine, VHOST_USER_QUEUES, &exports)
        .with_context(|| format!("cannot create the vhost-user socket directory {}", vhost_dir.display()))?;
    exports.set_vhost(vhost.clone());
    // "on" lets loopback peers stay in plain text, so a loopback listener's URIs stay nbd://.
    let endpoints = NbdEndpoints {
        tcp: nbd_addr,
        unix: nbd_unix.as_ref().map(|(_, p)| p.clone()),
        tcp_tls: config.nbd_tls == NbdTls::Require || (config.nbd_tls == NbdTls::On && !is_loopback_ip(nbd_addr.ip())),
        unix_tls: config.nbd_tls == NbdTls::Require,
    };
    let (cp, report) = {
        let (store, exports, dir) = (store.clone(), exports.clone(), data_dir.clone());
        let opts =
            ControlOptions { tiers: config.tiers.clone(), default_quota: config.default_quota, jobs: config.jobs };
        tokio::task::spawn_blocking(move || ControlPlane::open(store, exports, &dir, endpoints, opts))
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
    let j = report.jobs;
    if j.queued + j.resumed + j.failed + j.cancelled > 0 {
        tracing::info!(
            queued = j.queued,
            resumed = j.resumed,
            failed = j.failed,
            cancelled = j.cancelled,
            "jobs reloaded (resumed: interrupted by the last stop, running again)"
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
            .add_service(TenantServiceServer::new(VolumeApi::new(cp.clone())))
            .add_service(ServerServiceServer::new(VolumeApi::new(cp.clone())))
            .add_service(AuditServiceServer::new(VolumeApi::new(cp.clone())))
            .add_service(JobServiceServer::new(VolumeApi::new(cp.clone())))
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
        vhost_user_dir = %vhost_dir.display(),
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
    // vhost-user: listeners close, each guest's requests in flight complete, connections end.
    {
        let vhost = vhost.clone();
        tokio::task::spawn_blocking(move || vhost.shutdown()).await.context("closing vhost-user sockets")?;
    }
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
    // Jobs stop at their next check and resume at the next start.
    {
        let jobs = cp.jobs().clone();
        let left = tokio::task::spawn_blocking(move || jobs.shutdown(JOBS_DRAIN)).await.context("stopping jobs")?;
        if left > 0 {
            tracing::warn!(
                jobs = left,
                "jobs still running after {JOBS_DRAIN:?}; stopping anyway (they resume at the next start)"
            );
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
