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
use evs_proto::v1::backup_service_server::BackupServiceServer;
use evs_proto::v1::dr_service_server::DrServiceServer;
use evs_proto::v1::job_service_server::JobServiceServer;
use evs_proto::v1::policy_service_server::PolicyServiceServer;
use evs_proto::v1::replication_service_server::ReplicationServiceServer;
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

use crate::api::backups::BackupContext;
use crate::api::dr::DrContext;
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

/// The backup engine over `--backup-store`. S3 and OBS keys come from the environment
/// (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY); a missing one stops the start, named.
fn open_backup_engine(config: &Config) -> anyhow::Result<evs_backup::Engine> {
    use evs_backup::StoreUrl;
    let store = match &config.backup_store {
        // A relative path (the default under a relative data dir) is made absolute here: the
        // store takes absolute paths only.
        StoreUrl::File { path } => evs_backup::StoreConfig::File {
            path: std::path::absolute(path)
                .with_context(|| format!("cannot resolve the backup store path {}", path.display()))?,
        },
        // The URL was checked when the flag was parsed; only the keys are left to add.
        other => other.with_env_keys()?,
    };
    let s = &config.backups;
    let opts = evs_backup::EngineOptions {
        chunk_size: s.chunk_size,
        concurrency: s.concurrency,
        zstd_level: s.zstd_level,
        gc_grace: Duration::from_secs(s.gc_grace_seconds),
    };
    let objects = evs_backup::OpendalStore::open(&store)
        .with_context(|| format!("cannot open the backup store {}", config.backup_store))?;
    Ok(evs_backup::Engine::new(Arc::new(objects), opts))
}

/// Runs due backup policies every `interval` until `stop` is set.
fn start_scheduler(cp: Arc<ControlPlane>, interval: Duration, stop: Arc<std::sync::atomic::AtomicBool>) {
    let spawned = std::thread::Builder::new().name("evs-policies".into()).spawn(move || {
        while !stop.load(std::sync::atomic::Ordering::Acquire) {
            let now =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            cp.run_due_policies(now);
            let until = std::time::Instant::now() + interval;
            while std::time::Instant::now() < until && !stop.load(std::sync::atomic::Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the policy scheduler; policies run only with `policy run`");
    }
}

/// Runs the due replication cycles of this daemon's source groups until `stop` is set.
fn start_dr_worker(cp: Arc<ControlPlane>, stop: Arc<std::sync::atomic::AtomicBool>) {
    let spawned = std::thread::Builder::new().name("evs-dr".into()).spawn(move || {
        while !stop.load(std::sync::atomic::Ordering::Acquire) {
            if cp.run_due_cycles() == 0 {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the replication worker; DR groups will not replicate");
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
    let backup = Arc::new(BackupContext {
        engine: Arc::new(open_backup_engine(&config)?),
        rt: tokio::runtime::Handle::current(),
        settings: config.backups,
        az: config.az.clone(),
        keys_dir: data_dir.join("keys"),
    });
    let (cp, report) = {
        let (store, exports, dir) = (store.clone(), exports.clone(), data_dir.clone());
        let scheme = if identity.is_some() { "https" } else { "http" };
        let dr = Arc::new(DrContext::new(
            tokio::runtime::Handle::current(),
            config.az.clone(),
            format!("{scheme}://{api_addr}"),
        ));
        let opts = ControlOptions {
            tiers: config.tiers.clone(),
            default_quota: config.default_quota,
            jobs: config.jobs,
            backup: Some(backup),
            dr: Some(dr),
        };
        tokio::task::spawn_blocking(move || ControlPlane::open(store, exports, &dir, endpoints, opts))
            .await
            .context("opening the control plane")?
            .context("cannot open the control plane")?
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
        // Replication streams cycles of hundreds of MB into `Apply`: HTTP/2's default 64 KiB
        // receive window would hold the sender to one window per round trip.
        let mut builder = tonic::transport::Server::builder()
            .initial_stream_window_size(Some(evs_proto::STREAM_WINDOW))
            .initial_connection_window_size(Some(evs_proto::CONNECTION_WINDOW));
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
            .add_service(BackupServiceServer::new(VolumeApi::new(cp.clone())))
            .add_service(PolicyServiceServer::new(VolumeApi::new(cp.clone())))
            .add_service(DrServiceServer::new(VolumeApi::new(cp.clone())))
            // A frame batch is at most 3 MiB; leave room for a peer configured with bigger ones.
            .add_service(ReplicationServiceServer::new(VolumeApi::new(cp.clone())).max_decoding_message_size(16 << 20))
            .add_service(reflection)
            .add_service(reflection_alpha);
        let incoming = TcpIncoming::from(api_listener).with_nodelay(Some(true));
        tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
            let _ = grpc_stopped.await;
        }))
    };
    let dr_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    start_dr_worker(cp.clone(), dr_stop.clone());
    let metrics = {
        let info = Arc::new(MetricsInfo { io_backend: engine.name(), az: config.az.clone() });
        tokio::spawn(serve_metrics(metrics_listener, cp.clone(), info))
    };
    let scheduler_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    start_scheduler(cp.clone(), Duration::from_secs(config.backups.scheduler_interval_seconds), scheduler_stop.clone());

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
        failpoints = cfg!(feature = "failpoints"),
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
    scheduler_stop.store(true, std::sync::atomic::Ordering::Release);
    dr_stop.store(true, std::sync::atomic::Ordering::Release);
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
