//! A read-only FUSE filesystem that shows Nix closures as *views*:
//!
//! ```text
//! <mountpoint>/<view>/nix/store/<hash>-<name>/...
//! ```
//!
//! Each view lists exactly one closure under `nix/store/`. The names are
//! known at once; a store path's content is asked of the [`Resolver`] the
//! first time something looks inside it (or stats it), and is then read
//! beneath the directory the resolver names, with every path resolved by
//! the kernel without following symlinks ([`beneath`]): a store path that is
//! a symlink (even to `/`) is shown as the symlink it is. Hints (an image's
//! mountpoints, a `.ls` listing) may show a store path as a directory before
//! it is fetched; what the verified path is always wins. Attributes and
//! entries are cached by the kernel without expiry (store paths never
//! change), file contents are kept in the page cache across opens (and
//! dropped when their store path is evicted), and reads go through FUSE
//! passthrough where it is turned on and the kernel allows it.
//!
//! A view is typically the top-most lower directory of a container's overlay.
//!
//! The session can outlive the process: with a [`Keeper`] holding the
//! `/dev/fuse` descriptor and the inode journal, a restarted daemon resumes
//! serving the same mount, and running containers never see it go.
//!
//! Modules: [`beneath`] (fd-relative path resolution), `inodes` (the node
//! table), `journal` (the node table kept for a successor), `session`
//! (mounting, resuming, leaving), `state` (what each node is), `files`
//! (open files), `handlers` (the FUSE requests).

mod attrs;
pub mod beneath;
mod files;
mod handlers;
mod inodes;
mod inval;
mod journal;
mod session;
mod state;

pub use journal::FUSE_FD_NAME;
pub use session::Keeper;

use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::state::State;

/// Store paths never change: the kernel may cache what we say for good.
pub(crate) const TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// A directory that holds store paths as entries named `<hash>-<name>`
/// (the local store, or the node's own `/nix/store`), opened once.
pub type StoreDir = Arc<OwnedFd>;

/// Makes a store path's content available on local disk.
pub trait Resolver: Send + Sync + 'static {
    /// The directory holding `base_name` now, fetching it first if needed.
    /// May block (it is called off the FUSE workers when the path is not
    /// local), but must return, with an error, within a bounded time.
    fn resolve(&self, base_name: &str) -> Result<StoreDir, String>;

    /// The directory holding `base_name` if it is local now. Cheap: no
    /// network. Also tells the store that the path is in use.
    fn local(&self, base_name: &str) -> Option<StoreDir>;

    /// Whether `base_name` is a directory, if that can be known cheaply
    /// without fetching it (e.g. from a NAR listing). A hint only: it makes
    /// listings lazy, and the fetched path overrules it. Bounded like `resolve`.
    fn is_dir(&self, _base_name: &str) -> Option<bool> {
        None
    }

    /// The verified tree of `base_name` when its files can be read one by
    /// one without fetching the whole path (a signed file index): lookups
    /// and listings are answered from it at once, and reads fetch only
    /// what they need. Bounded like `resolve`.
    fn tree(&self, _base_name: &str) -> Option<Arc<dyn FileTree>> {
        None
    }

    /// [`Resolver::tree`] if already known: no network, no waiting.
    fn known_tree(&self, _base_name: &str) -> Option<Arc<dyn FileTree>> {
        None
    }
}

/// What an entry of a [`FileTree`] is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TreeEntry {
    Dir,
    File { size: u64, executable: bool },
    Symlink(Vec<u8>),
}

/// A store path known, and verified, before its content: its entries by
/// path relative to the store path (empty for the store path itself, names
/// joined with `/`), and its files read piece by piece.
pub trait FileTree: Send + Sync {
    fn entry(&self, rel: &[u8]) -> Option<TreeEntry>;
    /// A directory's entries, sorted by name.
    fn children(&self, rel: &[u8]) -> Option<Vec<(Vec<u8>, TreeEntry)>>;
    /// Up to `len` bytes at `offset` of the file at `rel`, every byte
    /// verified. May block on the network, within a time bound.
    fn read(&self, rel: &[u8], offset: u64, len: u32) -> Result<Vec<u8>, String>;
}

/// One entry of a view's closure.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClosureEntry {
    /// `<hash>-<name>`
    pub base_name: String,
    /// Whether the store path is a directory, if a hint says so (an image's
    /// Nix layer does). A hinted directory is listed and stat'ed without
    /// fetching it; of an unknown type the resolver is asked
    /// ([`Resolver::is_dir`]), and failing that it is fetched on first lookup.
    pub is_dir: Option<bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    #[error("cannot mount the store filesystem at {}: {source}", path.display())]
    Mount {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid view name {0:?}")]
    BadViewName(String),
    #[error("cannot keep the store filesystem's session: {0}")]
    Keep(std::io::Error),
}

/// A mounted store filesystem. Unmounts when dropped, unless a keeper
/// holds its session for a successor ([`StoreFs::open`]).
pub struct StoreFs {
    state: Arc<State>,
    session: std::sync::Mutex<session::Serving>,
}

#[derive(Debug, Clone)]
pub struct MountConfig {
    /// Worker threads reading requests.
    pub threads: usize,
    /// Try FUSE passthrough (needs root and Linux >= 6.9; falls back if
    /// refused). Off by default: each open then costs a round trip.
    pub passthrough: bool,
    /// Backing files kept open for quick re-opens (each is a file descriptor).
    pub open_files: usize,
    /// Requests that wait for a fetch, each on a thread of its own, at most
    /// at once; past it they wait on a worker.
    pub max_waiting: usize,
}

impl Default for MountConfig {
    fn default() -> Self {
        MountConfig {
            threads: 16,
            passthrough: false,
            open_files: 4096,
            max_waiting: 1024,
        }
    }
}

impl StoreFs {
    /// Mounts at `mountpoint` (an existing directory) and starts serving.
    /// A stale mount left there by a dead process is detached first.
    pub fn mount(mountpoint: &Path, resolver: Arc<dyn Resolver>, cfg: &MountConfig) -> Result<StoreFs, FuseError> {
        let fs = StoreFs::open(mountpoint, resolver, cfg, None)?;
        fs.start()?;
        Ok(fs)
    }

    pub fn mountpoint(&self) -> &Path {
        &self.state.mountpoint
    }

    /// Adds (or finds) view `name` showing `closure`; returns its directory.
    pub fn add_view(&self, name: &str, closure: &[ClosureEntry]) -> Result<PathBuf, FuseError> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(FuseError::BadViewName(name.to_string()));
        }
        let mut inodes = self.state.inodes.write().unwrap_or_else(|e| e.into_inner());
        if inodes.add_view(&self.state.next_ino, name, closure) {
            self.state.root_changed();
        }
        Ok(self.state.mountpoint.join(name))
    }

    /// Forgets view `name` (containers using it should be gone).
    pub fn remove_view(&self, name: &str) {
        let mut inodes = self.state.inodes.write().unwrap_or_else(|e| e.into_inner());
        inodes.remove_view(name);
        self.state.root_changed();
    }

    pub fn view_names(&self) -> Vec<String> {
        let inodes = self.state.inodes.read().unwrap_or_else(|e| e.into_inner());
        inodes.views.keys().cloned().collect()
    }

    /// Every store path some live view shows (what must not be evicted).
    pub fn shown(&self) -> std::collections::BTreeSet<String> {
        let inodes = self.state.inodes.read().unwrap_or_else(|e| e.into_inner());
        inodes
            .views
            .values()
            .flat_map(|v| v.closure.iter().map(|e| e.base_name.clone()))
            .collect()
    }

    /// A function the store calls when it evicts a store path: the backing
    /// files kept open for quick re-opens are closed, so eviction frees the
    /// disk space it counts (files the kernel still has open stay readable
    /// until closed), and the kernel drops the pages it cached of the path,
    /// so that the next read fetches it again.
    pub fn evictor(&self) -> Arc<dyn Fn(&str) + Send + Sync> {
        let state = Arc::downgrade(&self.state);
        Arc::new(move |base: &str| {
            if let Some(state) = state.upgrade() {
                state.close_files_of(base);
            }
        })
    }

    /// Nodes in the inode table (the kernel's cached inodes, the views and
    /// the root): bounded by what the kernel holds, not by all ever seen.
    pub fn node_count(&self) -> usize {
        let inodes = self.state.inodes.read().unwrap_or_else(|e| e.into_inner());
        inodes.nodes.len()
    }

    /// Unmounts, waits for the worker threads and tells the keeper to let
    /// the session go.
    pub fn unmount(&self) -> std::io::Result<()> {
        self.serving().unmount(&self.state)
    }

    /// Stops serving and leaves the mount to whoever the keeper hands it
    /// to next (a restarted or upgraded daemon): nothing is unmounted, and
    /// requests in flight are resent to the successor. Without a keeper,
    /// unmounts as [`StoreFs::unmount`] does.
    pub fn leave(&self) -> std::io::Result<()> {
        self.state.leaving.store(true, std::sync::atomic::Ordering::Relaxed);
        self.serving().leave(&self.state)
    }

    /// Whether this filesystem resumed a session an earlier process served.
    pub fn resumed(&self) -> bool {
        self.serving().resumed()
    }

    /// Requests served so far, by FUSE operation.
    pub fn request_counts(&self) -> Vec<(&'static str, u64)> {
        state::OPS
            .iter()
            .zip(&self.state.requests)
            .map(|(op, n)| (*op, n.load(std::sync::atomic::Ordering::Relaxed)))
            .collect()
    }

    /// Files the kernel holds open through this filesystem.
    pub fn open_files(&self) -> usize {
        self.state.files.open_count()
    }

    /// Whether a keeper holds the session for a successor.
    pub fn kept(&self) -> bool {
        self.state.journal.get().is_some_and(|j| !j.broken())
    }

    fn serving(&self) -> std::sync::MutexGuard<'_, session::Serving> {
        self.session.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for StoreFs {
    fn drop(&mut self) {
        if let Err(e) = self.serving().leave(&self.state) {
            tracing::warn!(error = %e, "unmounting the store filesystem failed; detaching it");
            detach_stale(&self.state.mountpoint);
        }
    }
}

/// Lazily unmounts whatever is mounted at `path` (a FUSE mount whose
/// process died answers ENOTCONN until unmounted).
pub fn detach_stale(path: &Path) {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call;
    // umount2 only reads it. Failure (nothing mounted) is expected and ignored.
    unsafe {
        libc::umount2(c.as_ptr(), libc::MNT_DETACH);
    }
}

#[cfg(test)]
mod tests {
    use super::inodes::View;
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn view_entries_are_sorted_and_found() {
        let v = View {
            name: "v".into(),
            closure: vec![
                ClosureEntry {
                    base_name: "a".into(),
                    is_dir: Some(true),
                },
                ClosureEntry {
                    base_name: "b".into(),
                    is_dir: Some(false),
                },
            ],
            inos: [2, 3, 4],
        };
        assert!(v.entry(OsStr::new("b")).is_some_and(|e| e.is_dir == Some(false)));
        assert!(v.entry(OsStr::new("c")).is_none());
    }
}
