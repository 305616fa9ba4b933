//! Running the daemon: socket ownership, serving, readiness and shutdown.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::StreamExt;

use crate::admin::AdminService;
use crate::api::admin::admin_server::AdminServer;
use crate::api::snapshots::snapshots_server::SnapshotsServer;
use crate::authority::AuthorityFix;
use crate::config::Config;
use crate::keeper::Found;
use crate::metrics::Metrics;
use crate::service::SnapshotService;
use crate::snapshots::nix::{NixSupport, StoreResolver, StoreSlot};
use crate::snapshots::{MountOptions, Snapshotter};
use nix_snapshotter_fuse::{Keeper, MountConfig, StoreFs};

/// How long in-flight calls may run after a stop signal before we exit anyway.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("another nix-snapshotter is already serving {}", .0.display())]
    SocketInUse(PathBuf),
    #[error("cannot {what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open state in {}: {source}", root.display())]
    State {
        root: PathBuf,
        #[source]
        source: crate::error::Error,
    },
    #[error("the daemon serving {} did not stop when asked to hand over", .0.display())]
    TakeOver(PathBuf),
    #[error("cannot serve metrics on {address}: {source}")]
    Metrics {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Lifeline(String),
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DaemonError {
    let path = path.to_path_buf();
    move |source| DaemonError::Io { what, path, source }
}

/// Binds `address`, replacing a stale socket file but refusing to take over
/// one that a live daemon still answers on.
pub fn bind(address: &Path) -> Result<UnixListener, DaemonError> {
    if let Some(dir) = address.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err("create socket directory", dir))?;
    }
    if address.exists() {
        if std::os::unix::net::UnixStream::connect(address).is_ok() {
            return Err(DaemonError::SocketInUse(address.to_path_buf()));
        }
        tracing::info!(address = %address.display(), "removing stale socket");
        std::fs::remove_file(address).map_err(io_err("remove stale socket", address))?;
    }
    let listener = UnixListener::bind(address).map_err(io_err("listen on", address))?;
    // Only root (or the rootless user) may talk to the snapshotter.
    std::fs::set_permissions(address, std::fs::Permissions::from_mode(0o600))
        .map_err(io_err("chmod socket", address))?;
    Ok(listener)
}

/// Raises the soft limit on open files to the hard limit (systemd's default
/// soft limit, 1024, is far below what a store serving many containers
/// keeps open) and returns the limit now in force.
pub fn raise_nofile() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current < lim.maximum {
        lim.current = lim.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, lim) {
            tracing::warn!(error = %e, "cannot raise the open file limit");
        }
    }
    let now = getrlimit(Resource::Nofile);
    now.current.unwrap_or(1 << 20)
}

/// Opens the database and the snapshotter, and mounts the FUSE store for
/// Nix layers (without it, Nix layers are served as ordinary layers), or
/// resumes the one `keeper` holds.
fn open_state(
    cfg: &Config,
    slot: StoreSlot,
    rt: tokio::runtime::Handle,
    keeper: Option<Arc<dyn Keeper>>,
    metrics: &Metrics,
) -> crate::error::Result<(Snapshotter, Arc<crate::db::Database>)> {
    let db = crate::db::open_root(&cfg.root)?;
    let sn = Snapshotter::open(&cfg.root, db.clone(), MountOptions::detect())?;
    if !cfg.fuse.enable {
        return Ok((sn, db));
    }
    let timeout = Duration::from_secs_f64(cfg.fuse.fetch_timeout.max(0.001));
    let mnt = cfg.root.join("fuse");
    // Not create_dir_all: it would stat a kept mount that nobody serves
    // yet, and wait for an answer. A mount left by a daemon that died with
    // no keeper (answering ENOTCONN) is detached when the store mounts.
    match std::fs::create_dir(&mnt) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(crate::error::Error::io("cannot create", &mnt)(e)),
    }
    let resolver = StoreResolver {
        store: slot.clone(),
        rt: rt.clone(),
        timeout,
        waited: metrics.fuse_wait_seconds.clone(),
    };
    let mount_cfg = MountConfig {
        threads: cfg.fuse.threads,
        passthrough: cfg.fuse.passthrough,
        // Half the descriptors for backing files kept open; the rest for
        // sockets, the database, fetches and containerd's connections.
        open_files: (raise_nofile() / 2).clamp(64, 1 << 20) as usize,
        ..Default::default()
    };
    match StoreFs::open(&mnt, Arc::new(resolver), &mount_cfg, keeper) {
        Ok(fs) => {
            let resumed = fs.resumed();
            let sn = sn.with_nix(NixSupport {
                fs,
                store: slot,
                rt,
                timeout,
            });
            if resumed {
                // Before the first request is read: running containers'
                // views must mean what they meant.
                let views = sn.restore_views()?;
                tracing::info!(mountpoint = %mnt.display(), views, "lazy store resumed: running containers kept their store");
            } else {
                tracing::info!(mountpoint = %mnt.display(), "lazy store mounted");
            }
            sn.start_store_fs()?;
            Ok((sn, db))
        }
        Err(e) => {
            tracing::warn!(error = %e, "no FUSE: Nix layers will be served as ordinary layers");
            Ok((sn, db))
        }
    }
}

/// Resolves, with the reason, when what the daemon lives for is gone (the
/// rootless namespace it joined).
pub type Lifeline = std::pin::Pin<Box<dyn std::future::Future<Output = String> + Send>>;

/// Serves until SIGTERM or SIGINT, then drains and removes the socket; the
/// FUSE session is left to the keeper while views need it. `take_over`:
/// first stops the daemon serving the socket (an upgrade). When `lifeline`
/// resolves, stops too, letting the session go (its containers are gone),
/// and fails with its reason.
pub async fn run(cfg: Config, found: Found, take_over: bool, lifeline: Option<Lifeline>) -> Result<(), DaemonError> {
    tracing::info!(root = %cfg.root.display(), "starting nix-snapshotter");
    // A bad setting fails before anything is stopped or opened: an upgrade
    // that cannot start leaves the running daemon alone.
    let metrics_addr = match cfg.metrics_address.trim() {
        "" => None,
        a => Some(parse_metrics_address(a)?),
    };
    if take_over {
        stop_predecessor(&cfg.address).await?;
    } else if std::os::unix::net::UnixStream::connect(&cfg.address).is_ok() {
        // Before touching any state: the other daemon may serve this root.
        return Err(DaemonError::SocketInUse(cfg.address.clone()));
    }
    let metrics_listener = match metrics_addr {
        None => None,
        Some(a) => Some(metrics_listener(&cfg.metrics_address, a)?),
    };
    let keeper = match found.keeper(&cfg.root) {
        Ok(k) if cfg.fuse.keep_session && cfg.fuse.enable => Some(k),
        // Turned off: a session kept by an earlier run is let go (its
        // mount is detached when the store mounts), so that its old
        // containers get ENOTCONN rather than reads that wait forever.
        Ok(k) => {
            if k.take().is_ok_and(|held| !held.is_empty()) {
                tracing::info!("fuse.keep_session is off: letting go of the session an earlier daemon kept");
                let _ = k.clear();
                if !cfg.fuse.enable {
                    nix_snapshotter_fuse::detach_stale(&cfg.root.join("fuse"));
                }
            }
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "no FUSE session keeper: running containers will not survive a restart");
            None
        }
    };
    let mut term = signal(SignalKind::terminate()).map_err(io_err("install SIGTERM handler for", &cfg.address))?;
    let mut int = signal(SignalKind::interrupt()).map_err(io_err("install SIGINT handler for", &cfg.address))?;
    let rt = tokio::runtime::Handle::current();
    let slot: StoreSlot = Arc::new(std::sync::OnceLock::new());
    let metrics = Arc::new(Metrics::default());
    let (sn, db) = {
        let (c, slot, rt, m) = (cfg.clone(), slot.clone(), rt.clone(), metrics.clone());
        tokio::task::spawn_blocking(move || open_state(&c, slot, rt, keeper, &m))
            .await
            .map_err(|e| DaemonError::State {
                root: cfg.root.clone(),
                source: crate::error::Error::Database(e.to_string()),
            })?
            .map_err(|source| DaemonError::State {
                root: cfg.root.clone(),
                source,
            })?
    };
    // Opened in the background: a slow or unreachable cache must not delay
    // serving ordinary layers. Nix layers wait for it (within fetch_timeout).
    let sn = Arc::new(sn);
    {
        let (cfg, slot, sn) = (cfg.clone(), slot.clone(), sn.clone());
        tokio::spawn(async move {
            match crate::store::open_from_config(&cfg, db).await {
                Ok(store) => {
                    sn.store_opened(&slot, store.clone());
                    // Each cache's nix-cache-info read now, not on the
                    // first pull's critical path (its connection stays
                    // pooled for that pull too). Unreachable caches are
                    // only logged here, and tried again when needed.
                    if let Err(e) = store.caches().await {
                        tracing::warn!(error = %e, "checking the substituters");
                    }
                }
                Err(e) => tracing::error!(error = %e, "cannot open the local store; Nix layers will fail"),
            }
        });
    }

    // Bound last: a socket that accepts means a daemon that serves.
    let listener = match bind(&cfg.address) {
        Ok(l) => l,
        Err(e) => {
            sn.stop_store_fs();
            return Err(e);
        }
    };
    let metrics_task =
        metrics_listener.map(|l| tokio::spawn(crate::metrics::serve(l, metrics.clone(), sn.clone(), slot.clone())));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        let _ = stop_rx.await;
    };

    let server = tonic::transport::Server::builder()
        .add_service(SnapshotsServer::new(
            SnapshotService::new(sn.clone()).with_metrics(metrics.clone()),
        ))
        .add_service(AdminServer::new(AdminService::new(
            sn.clone(),
            slot.clone(),
            cfg.clone(),
        )))
        // The CRI image service, only when enabled: off means off.
        .add_optional_service(cfg.image_service.enable.then(|| {
            crate::cri::ImageService::new(
                cfg.image_service.containerd_address.clone(),
                slot.clone(),
                Duration::from_secs_f64(cfg.fuse.fetch_timeout.max(1.0)),
            )
        }))
        .serve_with_incoming_shutdown(
            UnixListenerStream::new(listener).map(|conn| conn.map(AuthorityFix::new)),
            shutdown,
        );
    let mut server = tokio::spawn(server);

    tracing::info!(address = %cfg.address.display(), "serving");
    notify("READY=1");

    let lifeline = async move {
        match lifeline {
            Some(l) => l.await,
            None => std::future::pending().await,
        }
    };
    let mut orphaned = None;
    let early = tokio::select! {
        _ = term.recv() => { tracing::info!("got SIGTERM"); None }
        _ = int.recv() => { tracing::info!("got SIGINT"); None }
        why = lifeline => { tracing::error!("{why}"); orphaned = Some(why); None }
        res = &mut server => Some(res),
    };
    notify("STOPPING=1");
    let result = match early {
        Some(res) => res.unwrap_or_else(|e| {
            tracing::error!(error = %e, "server task failed");
            Ok(())
        }),
        None => {
            let _ = stop_tx.send(());
            match tokio::time::timeout(DRAIN_TIMEOUT, &mut server).await {
                Ok(res) => res.unwrap_or(Ok(())),
                Err(_) => {
                    tracing::warn!("in-flight calls did not finish in {DRAIN_TIMEOUT:?}; stopping anyway");
                    server.abort();
                    Ok(())
                }
            }
        }
    };
    if let Err(e) = std::fs::remove_file(&cfg.address) {
        tracing::warn!(address = %cfg.address.display(), error = %e, "cannot remove socket");
    }
    if let Some(t) = metrics_task {
        t.abort();
    }
    if orphaned.is_some() {
        sn.end_store_fs();
    } else {
        sn.stop_store_fs();
    }
    drop(sn); // closes the database once the last call released it
    tracing::info!("stopped");
    result.map_err(DaemonError::from)?;
    orphaned.map_or(Ok(()), |why| Err(DaemonError::Lifeline(why)))
}

fn parse_metrics_address(address: &str) -> Result<std::net::SocketAddr, DaemonError> {
    address.parse().map_err(|e| DaemonError::Metrics {
        address: address.to_string(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("not host:port ({e})")),
    })
}

/// Binds the metrics address.
fn metrics_listener(address: &str, addr: std::net::SocketAddr) -> Result<tokio::net::TcpListener, DaemonError> {
    let err = |source| DaemonError::Metrics {
        address: address.to_string(),
        source,
    };
    let l = std::net::TcpListener::bind(addr).map_err(err)?;
    l.set_nonblocking(true).map_err(err)?;
    tokio::net::TcpListener::from_std(l).map_err(err)
}

/// Stops the daemon answering on `address` and waits until it is gone, so
/// that its database and FUSE session are free to take.
async fn stop_predecessor(address: &Path) -> Result<(), DaemonError> {
    use rustix::process::{kill_process, pidfd_open, Pid, PidfdFlags, Signal};
    let stream = match std::os::unix::net::UnixStream::connect(address) {
        Ok(s) => s,
        Err(_) => {
            tracing::info!(address = %address.display(), "no daemon to take over from; starting afresh");
            return Ok(());
        }
    };
    let cred = rustix::net::sockopt::socket_peercred(&stream).map_err(|e| DaemonError::Io {
        what: "identify the daemon serving",
        path: address.to_path_buf(),
        source: e.into(),
    })?;
    drop(stream);
    let pid: Pid = cred.pid;
    let pidfd = pidfd_open(pid, PidfdFlags::empty()).map_err(|e| DaemonError::Io {
        what: "watch the daemon serving",
        path: address.to_path_buf(),
        source: e.into(),
    })?;
    tracing::info!(
        pid = pid.as_raw_nonzero().get(),
        "taking over: stopping the running daemon"
    );
    kill_process(pid, Signal::TERM).map_err(|e| DaemonError::Io {
        what: "stop the daemon serving",
        path: address.to_path_buf(),
        source: e.into(),
    })?;
    // A pidfd polls readable once the process has exited.
    let exited = tokio::task::spawn_blocking(move || {
        let mut fds = [rustix::event::PollFd::new(&pidfd, rustix::event::PollFlags::IN)];
        let limit = rustix::event::Timespec {
            tv_sec: (DRAIN_TIMEOUT.as_secs() + 25) as i64,
            tv_nsec: 0,
        };
        matches!(rustix::event::poll(&mut fds, Some(&limit)), Ok(n) if n > 0)
    })
    .await
    .unwrap_or(false);
    if !exited {
        return Err(DaemonError::TakeOver(address.to_path_buf()));
    }
    Ok(())
}

/// Sends a systemd notification when `$NOTIFY_SOCKET` is set (Type=notify units).
fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = (|| -> std::io::Result<()> {
        let sock = std::os::unix::net::UnixDatagram::unbound()?;
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        } else {
            sock.send_to(state.as_bytes(), &path)?;
        }
        Ok(())
    })();
    match sent {
        Ok(()) => tracing::debug!(state, "notified systemd"),
        Err(e) => tracing::warn!(state, error = %e, "cannot notify systemd"),
    }
}
