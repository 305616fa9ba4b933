//! Mounting, resuming and leaving the FUSE session.
//!
//! Without a keeper the session lives and dies with this process, as any
//! FUSE filesystem. With one ([`Keeper`]: systemd's file descriptor store,
//! or a small holder process), the `/dev/fuse` descriptor and the inode
//! journal are handed to it as soon as the mount exists, so that they
//! outlive the process however it ends; the next process takes them back,
//! rebuilds the inode table from the journal, serves the same connection
//! without a new INIT, and asks the kernel to resend the requests the dead
//! one had read but not answered (`FUSE_NOTIFY_RESEND`).
//!
//! All workers read the one descriptor the keeper holds (no cloned
//! descriptors): requests read through a clone are failed by the kernel
//! when the clone closes, which a process exit does; requests read through
//! the kept descriptor stay queued for the successor.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use fuser::{BackgroundSession, Config, INodeNo, MountOption, Session, SessionACL, Version};

use crate::files::{first_handle, Files};
use crate::handlers::FsImpl;
use crate::inodes::{Inodes, Node};
use crate::journal::{self, Init, Journal, Model, Record, FUSE_FD_NAME};
use crate::state::State;
use crate::{detach_stale, FuseError, MountConfig, Resolver, StoreFs};

/// Holds descriptors by name for whichever process serves the session
/// next. Implementations: systemd's file descriptor store, a holder process.
pub trait Keeper: Send + Sync + 'static {
    /// Holds `fd` (a duplicate) under `name`, replacing what was held so.
    fn put(&self, name: &str, fd: BorrowedFd<'_>) -> io::Result<()>;
    /// Lets go of what is held under `name`.
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Duplicates of everything held now (still held).
    fn take(&self) -> io::Result<Vec<(String, OwnedFd)>>;
    /// Lets go of everything: the session ends with this process.
    fn clear(&self) -> io::Result<()>;
}

/// The session's serving side.
pub(crate) struct Serving {
    /// Made but not yet serving (views are restored before the first
    /// request is read).
    pending: Option<Session<FsImpl>>,
    running: Option<BackgroundSession>,
    keeper: Option<Arc<dyn Keeper>>,
    /// What the predecessor negotiated, when this session was resumed.
    resumed: Option<Init>,
}

fn fuse_config(cfg: &MountConfig, kept: bool) -> Config {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("nix-snapshotter".into()),
        MountOption::Subtype("nixstore".into()),
        MountOption::RO,
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::Exec,
    ];
    // Containers run as any uid (and in user namespaces).
    config.acl = SessionACL::All;
    config.n_threads = Some(cfg.threads.max(1));
    // One /dev/fuse fd per worker (FUSE_DEV_IOC_CLONE) spares contention on
    // one queue, but a kept session must not lose requests with its clones.
    config.clone_fd = !kept;
    config
}

fn new_state(
    mountpoint: &Path,
    resolver: Arc<dyn Resolver>,
    cfg: &MountConfig,
    inodes: Inodes,
    next_ino: u64,
    epoch: u64,
) -> Arc<State> {
    Arc::new(State {
        resolver,
        inodes: RwLock::new(inodes),
        next_ino: AtomicU64::new(next_ino),
        files: Files::new(cfg.open_files, epoch),
        passthrough: AtomicBool::new(cfg.passthrough),
        has_resend: AtomicBool::new(false),
        no_opendir: AtomicBool::new(false),
        mountpoint: mountpoint.to_path_buf(),
        notifier: OnceLock::new(),
        inval: OnceLock::new(),
        dev: OnceLock::new(),
        journal: OnceLock::new(),
        waiting: AtomicUsize::new(0),
        listings: Default::default(),
        unhandled: Default::default(),
        next_dir_fh: AtomicU64::new(first_handle(epoch)),
        requests: Default::default(),
        leaving: AtomicBool::new(false),
    })
}

impl StoreFs {
    /// Mounts at `mountpoint`, or with a `keeper`, resumes the session it
    /// holds for this mountpoint when it is still connected there. Nothing
    /// is served until [`StoreFs::start`]: add the views first, so that a
    /// resumed session's first requests find them.
    pub fn open(
        mountpoint: &Path,
        resolver: Arc<dyn Resolver>,
        cfg: &MountConfig,
        keeper: Option<Arc<dyn Keeper>>,
    ) -> Result<StoreFs, FuseError> {
        let mount_err = |source| FuseError::Mount {
            path: mountpoint.to_path_buf(),
            source,
        };
        // Not the mountpoint itself: a kept mount nobody serves yet would
        // make the stat wait for an answer.
        let mountpoint = match (mountpoint.parent(), mountpoint.file_name()) {
            (Some(p), Some(n)) if !p.as_os_str().is_empty() => p.canonicalize().map_err(mount_err)?.join(n),
            _ => mountpoint.canonicalize().map_err(mount_err)?,
        };
        if let Some(keeper) = &keeper {
            match resume(&mountpoint, resolver.clone(), cfg, keeper) {
                Ok(Some(fs)) => return Ok(fs),
                Ok(None) => {}
                // A live session that could not be taken now (a passing
                // error): mounting afresh would cut every running container
                // off. Fail, and leave it held for the next try.
                Err(e) => return Err(FuseError::Keep(e)),
            }
        }
        detach_stale(&mountpoint);
        let mut inodes = Inodes::default();
        inodes.nodes.insert(INodeNo::ROOT.0, Node::Root);
        let state = new_state(&mountpoint, resolver, cfg, inodes, 2, 0);
        let fs = FsImpl {
            state: state.clone(),
            max_waiting: cfg.max_waiting,
        };
        let session = Session::new(fs, &mountpoint, &fuse_config(cfg, keeper.is_some())).map_err(mount_err)?;
        let dev = session.as_fd().try_clone_to_owned().map_err(mount_err)?;
        let mut keeper = keeper;
        if let Some(k) = keeper.take() {
            let init = Init {
                major: session.proto_version().map_or(7, |v| v.0),
                minor: session.proto_version().map_or(0, |v| v.1),
                passthrough: state.passthrough.load(Ordering::Relaxed),
                resend: state.has_resend.load(Ordering::Relaxed),
                mount_dev: mount_dev(&mountpoint).unwrap_or(0),
            };
            match keep(&k, &dev, init).map_err(FuseError::Keep) {
                Ok(j) => {
                    set_journal(&state, j);
                    keeper = Some(k);
                }
                // Serve anyway, as a session of this process only.
                Err(e) => {
                    tracing::warn!(error = %e, "running containers will not survive a restart of this process");
                    let _ = k.clear();
                }
            }
        }
        let _ = state.dev.set(dev);
        Ok(StoreFs {
            state,
            session: std::sync::Mutex::new(Serving {
                pending: Some(session),
                running: None,
                keeper,
                resumed: None,
            }),
        })
    }

    /// Starts serving requests; a resumed session first asks the kernel to
    /// resend what its predecessor read but never answered.
    pub fn start(&self) -> Result<(), FuseError> {
        let mut serving = self.serving();
        let Some(session) = serving.pending.take() else {
            return Ok(());
        };
        let _ = self.state.notifier.set(session.notifier());
        if let Some(i) = crate::inval::Invalidator::start(session.notifier()) {
            let _ = self.state.inval.set(i);
        }
        // Before any worker of ours reads: what is resent is then only
        // what the predecessor left unanswered, never a request of ours.
        if serving.resumed.is_some() {
            self.resend();
        }
        let running = session.spawn().map_err(|source| FuseError::Mount {
            path: self.state.mountpoint.clone(),
            source,
        })?;
        serving.running = Some(running);
        Ok(())
    }

    /// Asks the kernel to queue again the requests read from this
    /// connection but not answered (by a predecessor).
    fn resend(&self) {
        if !self.state.has_resend.load(Ordering::Relaxed) {
            tracing::warn!(
                "the kernel cannot resend requests (FUSE_NOTIFY_RESEND needs Linux 6.9): \
                 reads that were in flight when the last daemon stopped stay unanswered"
            );
            return;
        }
        if let Some(n) = self.state.notifier.get() {
            match n.resend() {
                Ok(()) => tracing::debug!("asked the kernel to resend unanswered requests"),
                Err(e) => tracing::warn!(error = %e, "cannot ask the kernel to resend unanswered requests"),
            }
        }
    }
}

/// Hands the connection and a new journal to `keeper`.
fn keep(keeper: &Arc<dyn Keeper>, dev: &OwnedFd, init: Init) -> io::Result<Arc<Journal>> {
    // What an earlier session left is of no use now.
    keeper.clear()?;
    let mut model = Model::default();
    model.apply(&Record::Init(init));
    let journal = Journal::create(keeper.clone(), model, 1, None)?;
    keeper.put(FUSE_FD_NAME, dev.as_fd())?;
    Ok(Arc::new(journal))
}

fn set_journal(state: &State, journal: Arc<Journal>) {
    state.inodes.write().unwrap_or_else(|e| e.into_inner()).journal = Some(journal.clone());
    let _ = state.journal.set(journal);
}

/// Takes the session `keeper` holds, if it still serves `mountpoint`.
fn resume(
    mountpoint: &Path,
    resolver: Arc<dyn Resolver>,
    cfg: &MountConfig,
    keeper: &Arc<dyn Keeper>,
) -> io::Result<Option<StoreFs>> {
    let mut fds = keeper.take()?;
    let Some(i) = fds.iter().position(|(n, _)| n == FUSE_FD_NAME) else {
        return Ok(None);
    };
    let dev = fds.remove(i).1;
    if !connected(&dev) {
        tracing::info!("the kept FUSE session was disconnected (unmounted); mounting afresh");
        return Ok(None);
    }
    // Without its journal a live session's node ids cannot be read: the
    // only way on is a new mount (its containers lose /nix/store).
    let Some(loaded) = journal::load(&mut fds) else {
        tracing::error!(
            "the kept FUSE session has no usable inode journal; mounting afresh (running containers lose /nix/store)"
        );
        return Ok(None);
    };
    let Some(init) = loaded.model.init else {
        return Ok(None);
    };
    if mount_dev(mountpoint) != Some(init.mount_dev) {
        // Still connected, so mounted somewhere (another mount namespace,
        // or moved): serving it is what its users need.
        tracing::warn!(mountpoint = %mountpoint.display(), "the kept FUSE session is not mounted here as this process sees it; resuming it anyway");
    }
    let epoch = loaded.model.epoch + 1;
    let mut inodes = Inodes::restore(&loaded.model, None);
    inodes.nodes.insert(INodeNo::ROOT.0, Node::Root);
    let next_ino = loaded.model.max_ino() + 1;
    let backing = loaded.model.backing.clone();
    let nodes = loaded.model.nodes.len();
    let journal = Arc::new(Journal::resume(keeper.clone(), loaded)?);
    journal.append(Record::Epoch(epoch));
    let state = new_state(mountpoint, resolver, cfg, inodes, next_ino, epoch);
    state.files.adopt(&backing);
    if cfg.passthrough && !init.passthrough {
        // What the connection was opened with stays: the kernel was told
        // at its first mount, and has opened files by itself since.
        tracing::warn!(
            "passthrough is set, but the FUSE session resumed was mounted without it; \
             it takes effect once the session is mounted afresh (stop the daemon while \
             no container uses the store, then start it)"
        );
    }
    state
        .passthrough
        .store(init.passthrough && cfg.passthrough, Ordering::Relaxed);
    state.has_resend.store(init.resend, Ordering::Relaxed);
    set_journal(&state, journal);
    let own = dev.try_clone()?;
    let fs = FsImpl {
        state: state.clone(),
        max_waiting: cfg.max_waiting,
    };
    let config = fuse_config(cfg, true);
    let session = Session::resume(fs, own, config.acl, config, Version(init.major, init.minor))?;
    let _ = state.dev.set(dev);
    tracing::info!(nodes, epoch, "resumed the kept FUSE session");
    Ok(Some(StoreFs {
        state,
        session: std::sync::Mutex::new(Serving {
            pending: Some(session),
            running: None,
            keeper: Some(keeper.clone()),
            resumed: Some(init),
        }),
    }))
}

/// Ends the FUSE connection of `state`'s mount (its workers then stop),
/// through the connection's `abort` file in the fusectl filesystem.
fn abort_connection(state: &State) {
    let Some(init_dev) = state.journal.get().and_then(|j| j.init()).map(|i| i.mount_dev) else {
        return;
    };
    let minor = init_dev & 0xffff_ffff;
    let abort = format!("/sys/fs/fuse/connections/{minor}/abort");
    if let Err(e) = std::fs::write(&abort, b"1") {
        tracing::debug!(path = %abort, error = %e, "aborting the FUSE connection");
    }
}

/// Whether the FUSE connection behind `dev` is still up (an unmounted or
/// aborted one polls as an error).
fn connected(dev: &OwnedFd) -> bool {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mut fds = [PollFd::new(dev, PollFlags::empty())];
    let zero = Timespec { tv_sec: 0, tv_nsec: 0 };
    match poll(&mut fds, Some(&zero)) {
        Ok(_) => !fds[0]
            .revents()
            .intersects(PollFlags::ERR | PollFlags::HUP | PollFlags::NVAL),
        Err(_) => false,
    }
}

/// The device number of what is mounted at `path` now (the topmost mount),
/// read from mountinfo: asking the filesystem itself could wait on a
/// session nobody serves.
pub(crate) fn mount_dev(path: &Path) -> Option<u64> {
    let info = std::fs::read("/proc/self/mountinfo").ok()?;
    let want = escape(path.as_os_str().as_bytes());
    let mut found = None;
    for line in info.split(|b| *b == b'\n') {
        let mut fields = line.split(|b| *b == b' ');
        let (Some(dev), Some(point)) = (fields.nth(2), fields.nth(1)) else {
            continue;
        };
        if point == want.as_slice() {
            let parsed = std::str::from_utf8(dev)
                .ok()
                .and_then(|s| s.split_once(':'))
                .and_then(|(a, b)| Some(a.parse::<u64>().ok()? << 32 | b.parse::<u64>().ok()?));
            if parsed.is_some() {
                found = parsed;
            }
        }
    }
    found
}

/// mountinfo's escaping of a path (space, tab, newline, backslash as octal).
fn escape(path: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(path.len());
    for b in path {
        match b {
            b' ' | b'\t' | b'\n' | b'\\' => out.extend_from_slice(format!("\\{b:03o}").as_bytes()),
            _ => out.push(*b),
        }
    }
    out
}

impl Serving {
    pub fn resumed(&self) -> bool {
        self.resumed.is_some()
    }

    pub fn unmount(&mut self, state: &State) -> io::Result<()> {
        if let Some(k) = &self.keeper {
            if let Err(e) = k.clear() {
                tracing::warn!(error = %e, "cannot tell the session keeper to let go");
            }
        }
        self.pending = None;
        let resumed = self.resumed.is_some();
        match self.running.take() {
            // A resumed session has no mount object of its own (the mount
            // was made by an earlier process): detach it, and end the
            // connection so that the workers stop reading.
            Some(s) if resumed => {
                detach_stale(&state.mountpoint);
                abort_connection(state);
                s.join()
            }
            Some(s) => s.umount_and_join(),
            None => {
                detach_stale(&state.mountpoint);
                Ok(())
            }
        }
    }

    pub fn leave(&mut self, state: &State) -> io::Result<()> {
        if self.keeper.is_none() || state.journal.get().is_none_or(|j| j.broken()) {
            return self.unmount(state);
        }
        // From here this process records nothing, and closes no backing
        // id: the successor reads the journal as it is now.
        if let Some(j) = state.journal.get() {
            j.seal();
        }
        if let Some(mut s) = self.running.take() {
            if state.has_resend.load(Ordering::Relaxed) {
                // Nothing this process still works out reaches the kernel
                // (its store and runtime are about to go); what its workers
                // read and leave unanswered the successor has resent.
                s.seal();
            }
            // (Without resend, workers answer until the process exits: a
            // request they dropped would wait forever.)
            s.forget_mount();
            std::mem::forget(s);
        }
        if let Some(s) = self.pending.take() {
            std::mem::forget(s);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_are_escaped_as_the_kernel_does() {
        assert_eq!(escape(b"/a b\\c"), b"/a\\040b\\134c".to_vec());
        assert_eq!(escape(b"/plain/path"), b"/plain/path".to_vec());
    }

    #[test]
    fn the_root_is_a_mount() {
        assert!(mount_dev(Path::new("/")).is_some());
        assert_eq!(mount_dev(Path::new("/surely/not/a/mountpoint")), None);
    }
}
