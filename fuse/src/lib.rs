//! A read-only FUSE filesystem that shows Nix closures as *views*:
//!
//! ```text
//! <mountpoint>/<view>/nix/store/<hash>-<name>/...
//! ```
//!
//! Each view lists exactly one closure under `nix/store/`. The names are
//! known at once; a store path's content is asked of the [`Resolver`] the
//! first time something looks inside it (or stats it), and from then on is
//! served from the local directory the resolver returned. Every store file
//! has one inode number whatever view it is seen through, so the kernel's
//! page cache is shared between containers. Attributes and entries are cached
//! by the kernel without expiry (store paths never change), file contents are
//! kept in the page cache across opens, and reads go through FUSE passthrough
//! (straight to the backing file, no round trip to us) where the kernel
//! allows it.
//!
//! A view is typically the top-most lower directory of a container's overlay.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, SystemTime};

use fuser::{
    BackingId, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyXattr, Request, SessionACL,
};

/// Store paths never change: the kernel may cache what we say for good.
const TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Makes a store path's content available on local disk.
pub trait Resolver: Send + Sync + 'static {
    /// Returns the directory (or file) holding `base_name`'s content,
    /// fetching it if needed. Called from FUSE worker threads; may block,
    /// but must return (with an error) within a bounded time.
    fn resolve(&self, base_name: &str) -> Result<PathBuf, String>;

    /// Whether `base_name` is a directory, if that can be known cheaply
    /// without fetching it (e.g. from a NAR listing). Bounded like `resolve`.
    fn is_dir(&self, _base_name: &str) -> Option<bool> {
        None
    }
}

/// One entry of a view's closure.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClosureEntry {
    /// `<hash>-<name>`
    pub base_name: String,
    /// Whether the store path is a directory, if known (an image's Nix
    /// layer says so). A known directory is listed and stat'ed without
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
}

#[derive(Debug, Clone)]
enum Node {
    Root,
    /// `<view>`, `<view>/nix`, `<view>/nix/store`
    ViewDir {
        view: Arc<View>,
        depth: u8,
    },
    /// Something at `rel` inside store path `base` (`rel` empty: the path itself).
    Store {
        base: Arc<str>,
        rel: PathBuf,
    },
}

#[derive(Debug)]
struct View {
    name: String,
    /// Sorted by name.
    closure: Vec<ClosureEntry>,
    inos: [u64; 3],
}

impl View {
    fn entry(&self, name: &OsStr) -> Option<&ClosureEntry> {
        let name = name.to_str()?;
        self.closure
            .binary_search_by(|e| e.base_name.as_str().cmp(name))
            .ok()
            .map(|i| &self.closure[i])
    }
}

#[derive(Default)]
struct Inodes {
    nodes: HashMap<u64, Node>,
    /// (store path, relative path) -> inode: the same in every view.
    store: HashMap<(Arc<str>, PathBuf), u64>,
    views: HashMap<String, Arc<View>>,
    /// Inode numbers ever given to each view name: a view dropped and added
    /// again gets the same ones, so entries the kernel still caches stay right.
    view_inos: HashMap<String, [u64; 3]>,
}

struct Open {
    file: Arc<File>,
    /// Keeps the kernel's backing file alive while this handle is open.
    _backing: Option<Arc<BackingId>>,
}

/// An open backing file and, with passthrough, its kernel backing id.
type OpenFile = (Arc<File>, Option<Arc<BackingId>>);

struct State {
    resolver: Arc<dyn Resolver>,
    inodes: RwLock<Inodes>,
    next_ino: AtomicU64,
    /// Where each resolved store path's content is.
    resolved: RwLock<HashMap<Arc<str>, PathBuf>>,
    opens: Mutex<HashMap<u64, Open>>,
    next_fh: AtomicU64,
    /// Recently opened store files: the open backing file and, with
    /// passthrough, its backing id. Reusing them makes a repeated open (every
    /// container start opens the same libraries) one round trip with no
    /// syscalls here.
    files: Mutex<lru::LruCache<u64, OpenFile>>,
    /// One backing id per inode while any open holds it (a second id for a
    /// busy inode makes the kernel fail the open), also after `files`
    /// evicted it.
    weak: Mutex<HashMap<u64, Weak<BackingId>>>,
    passthrough: AtomicBool,
    mountpoint: PathBuf,
    /// Store paths some view knows to be directories.
    known_dirs: RwLock<std::collections::HashSet<Arc<str>>>,
}

/// A mounted store filesystem. Unmounts when dropped.
pub struct StoreFs {
    state: Arc<State>,
    session: Option<fuser::BackgroundSession>,
}

#[derive(Debug, Clone)]
pub struct MountConfig {
    /// Worker threads: requests that wait for a fetch block one each.
    pub threads: usize,
    /// Try FUSE passthrough (needs root and Linux >= 6.9; falls back if refused).
    pub passthrough: bool,
}

impl Default for MountConfig {
    fn default() -> Self {
        MountConfig {
            threads: 16,
            passthrough: true,
        }
    }
}

impl StoreFs {
    /// Mounts at `mountpoint` (an existing directory). A stale mount left
    /// there by a dead process is detached first.
    pub fn mount(mountpoint: &Path, resolver: Arc<dyn Resolver>, cfg: &MountConfig) -> Result<StoreFs, FuseError> {
        detach_stale(mountpoint);
        let mut inodes = Inodes::default();
        inodes.nodes.insert(INodeNo::ROOT.0, Node::Root);
        let state = Arc::new(State {
            resolver,
            inodes: RwLock::new(inodes),
            next_ino: AtomicU64::new(2),
            resolved: RwLock::new(HashMap::new()),
            opens: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            files: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(4096).unwrap_or(std::num::NonZeroUsize::MIN),
            )),
            weak: Mutex::new(HashMap::new()),
            passthrough: AtomicBool::new(cfg.passthrough),
            mountpoint: mountpoint.to_path_buf(),
            known_dirs: RwLock::new(Default::default()),
        });
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
        // One /dev/fuse fd per worker (FUSE_DEV_IOC_CLONE): requests do not
        // contend on a single queue.
        config.clone_fd = true;
        let session =
            fuser::spawn_mount(FsImpl(state.clone()), mountpoint, &config).map_err(|source| FuseError::Mount {
                path: mountpoint.to_path_buf(),
                source,
            })?;
        Ok(StoreFs {
            state,
            session: Some(session),
        })
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
        if !inodes.views.contains_key(name) {
            let mut closure = closure.to_vec();
            closure.sort();
            closure.dedup_by(|a, b| a.base_name == b.base_name);
            let next = &self.state.next_ino;
            let inos = *inodes
                .view_inos
                .entry(name.to_string())
                .or_insert_with(|| [0, 1, 2].map(|_| next.fetch_add(1, Ordering::Relaxed)));
            let view = Arc::new(View {
                name: name.to_string(),
                closure,
                inos,
            });
            for (depth, ino) in inos.iter().enumerate() {
                inodes.nodes.insert(
                    *ino,
                    Node::ViewDir {
                        view: view.clone(),
                        depth: depth as u8,
                    },
                );
            }
            inodes.views.insert(name.to_string(), view.clone());
            if let Ok(mut d) = self.state.known_dirs.write() {
                d.extend(
                    view.closure
                        .iter()
                        .filter(|e| e.is_dir == Some(true))
                        .map(|e| Arc::from(e.base_name.as_str())),
                );
            }
        }
        Ok(self.state.mountpoint.join(name))
    }

    /// Forgets view `name` (containers using it should be gone).
    pub fn remove_view(&self, name: &str) {
        let mut inodes = self.state.inodes.write().unwrap_or_else(|e| e.into_inner());
        if let Some(view) = inodes.views.remove(name) {
            for ino in view.inos {
                inodes.nodes.remove(&ino);
            }
        }
    }

    pub fn view_names(&self) -> Vec<String> {
        let inodes = self.state.inodes.read().unwrap_or_else(|e| e.into_inner());
        inodes.views.keys().cloned().collect()
    }

    /// Unmounts and waits for the worker threads.
    pub fn unmount(mut self) -> std::io::Result<()> {
        match self.session.take() {
            Some(s) => s.umount_and_join(),
            None => Ok(()),
        }
    }
}

impl Drop for StoreFs {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            if let Err(e) = s.umount_and_join() {
                tracing::warn!(error = %e, "unmounting the store filesystem failed; detaching it");
                detach_stale(&self.state.mountpoint);
            }
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

struct FsImpl(Arc<State>);

fn attr_from(ino: u64, meta: &std::fs::Metadata) -> FileAttr {
    let kind = if meta.is_dir() {
        FileType::Directory
    } else if meta.file_type().is_symlink() {
        FileType::Symlink
    } else {
        FileType::RegularFile
    };
    let t = |s: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(s.max(0) as u64);
    FileAttr {
        ino: INodeNo(ino),
        size: meta.len(),
        blocks: meta.blocks(),
        atime: t(meta.atime()),
        mtime: t(meta.mtime()),
        ctime: t(meta.ctime()),
        crtime: t(meta.mtime()),
        kind,
        // Store paths are read-only for everyone; keep only r/x bits.
        perm: (meta.mode() & 0o555) as u16,
        nlink: if meta.is_dir() { 2 } else { 1 },
        uid: 0,
        gid: 0,
        rdev: 0,
        flags: 0,
        blksize: 4096,
    }
}

fn dir_attr(ino: u64) -> FileAttr {
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1);
    FileAttr {
        ino: INodeNo(ino),
        size: 0,
        blocks: 0,
        atime: t,
        mtime: t,
        ctime: t,
        crtime: t,
        kind: FileType::Directory,
        perm: 0o555,
        nlink: 2,
        uid: 0,
        gid: 0,
        rdev: 0,
        flags: 0,
        blksize: 4096,
    }
}

impl State {
    fn node(&self, ino: INodeNo) -> Option<Node> {
        self.inodes.read().ok()?.nodes.get(&ino.0).cloned()
    }

    fn store_ino(&self, base: &Arc<str>, rel: &Path) -> u64 {
        let key = (base.clone(), rel.to_path_buf());
        if let Some(ino) = self.inodes.read().ok().and_then(|i| i.store.get(&key).copied()) {
            return ino;
        }
        let mut inodes = self.inodes.write().unwrap_or_else(|e| e.into_inner());
        if let Some(ino) = inodes.store.get(&key) {
            return *ino;
        }
        let ino = self.next_ino.fetch_add(1, Ordering::Relaxed);
        inodes.store.insert(key, ino);
        inodes.nodes.insert(
            ino,
            Node::Store {
                base: base.clone(),
                rel: rel.to_path_buf(),
            },
        );
        ino
    }

    /// The local location of a store path, resolving it on first use.
    fn location(&self, base: &Arc<str>) -> Result<PathBuf, Errno> {
        if let Some(p) = self.resolved.read().ok().and_then(|r| r.get(base).cloned()) {
            return Ok(p);
        }
        match self.resolver.resolve(base) {
            Ok(p) => {
                if let Ok(mut r) = self.resolved.write() {
                    r.insert(base.clone(), p.clone());
                }
                Ok(p)
            }
            Err(e) => {
                tracing::warn!(path = %base, error = %e, "store path unavailable; reads get EIO");
                Err(Errno::EIO)
            }
        }
    }

    fn real_path(&self, base: &Arc<str>, rel: &Path) -> Result<PathBuf, Errno> {
        let loc = self.location(base)?;
        Ok(if rel.as_os_str().is_empty() { loc } else { loc.join(rel) })
    }

    fn store_attr(&self, base: &Arc<str>, rel: &Path) -> Result<FileAttr, Errno> {
        let real = self.real_path(base, rel)?;
        let meta = std::fs::symlink_metadata(&real).map_err(Errno::from)?;
        Ok(attr_from(self.store_ino(base, rel), &meta))
    }

    /// Attributes of a store path itself: a known directory is answered
    /// without fetching it (mode 0555, mtime 1: what its NAR unpacks to), so
    /// `ls -l /nix/store` stays lazy.
    fn root_attr(&self, base: &Arc<str>, is_dir: Option<bool>) -> Result<FileAttr, Errno> {
        let resolved = self.resolved.read().map(|r| r.contains_key(base)).unwrap_or(false);
        if !resolved && is_dir.or_else(|| self.listed_dir(base)) == Some(true) {
            return Ok(dir_attr(self.store_ino(base, Path::new(""))));
        }
        self.store_attr(base, Path::new(""))
    }

    /// Asks the resolver whether a store path of unknown type is a
    /// directory, remembering a yes.
    fn listed_dir(&self, base: &Arc<str>) -> Option<bool> {
        let dir = self.resolver.is_dir(base)?;
        if dir {
            if let Ok(mut d) = self.known_dirs.write() {
                d.insert(base.clone());
            }
        }
        Some(dir)
    }

    fn attr(&self, ino: INodeNo) -> Result<FileAttr, Errno> {
        match self.node(ino).ok_or(Errno::ENOENT)? {
            Node::Root | Node::ViewDir { .. } => Ok(dir_attr(ino.0)),
            Node::Store { base, rel } if rel.as_os_str().is_empty() => {
                let known_dir = self.known_dirs.read().map(|d| d.contains(&base)).unwrap_or(false);
                self.root_attr(&base, known_dir.then_some(true))
            }
            Node::Store { base, rel } => self.store_attr(&base, &rel),
        }
    }

    fn lookup(&self, parent: INodeNo, name: &OsStr) -> Result<FileAttr, Errno> {
        match self.node(parent).ok_or(Errno::ENOENT)? {
            Node::Root => {
                let inodes = self.inodes.read().map_err(|_| Errno::EIO)?;
                let view = name.to_str().and_then(|n| inodes.views.get(n)).ok_or(Errno::ENOENT)?;
                Ok(dir_attr(view.inos[0]))
            }
            Node::ViewDir { view, depth } => match (depth, name.as_bytes()) {
                (0, b"nix") => Ok(dir_attr(view.inos[1])),
                (1, b"store") => Ok(dir_attr(view.inos[2])),
                (2, _) => {
                    let entry = view.entry(name).ok_or(Errno::ENOENT)?;
                    let base: Arc<str> = Arc::from(entry.base_name.as_str());
                    self.root_attr(&base, entry.is_dir)
                }
                _ => Err(Errno::ENOENT),
            },
            Node::Store { base, rel } => self.store_attr(&base, &rel.join(name)),
        }
    }

    /// Directory entries (name, inode, type), without "." and "..".
    fn entries(&self, ino: INodeNo) -> Result<Vec<(OsString, u64, FileType)>, Errno> {
        match self.node(ino).ok_or(Errno::ENOENT)? {
            Node::Root => {
                let inodes = self.inodes.read().map_err(|_| Errno::EIO)?;
                let mut v: Vec<_> = inodes
                    .views
                    .values()
                    .map(|view| (OsString::from(&view.name), view.inos[0], FileType::Directory))
                    .collect();
                v.sort_by(|a, b| a.0.cmp(&b.0));
                Ok(v)
            }
            Node::ViewDir { view, depth: 0 } => Ok(vec![("nix".into(), view.inos[1], FileType::Directory)]),
            Node::ViewDir { view, depth: 1 } => Ok(vec![("store".into(), view.inos[2], FileType::Directory)]),
            Node::ViewDir { view, .. } => Ok(view
                .closure
                .iter()
                .map(|e| {
                    let base: Arc<str> = Arc::from(e.base_name.as_str());
                    let kind = if e.is_dir == Some(false) {
                        FileType::RegularFile
                    } else {
                        FileType::Directory
                    };
                    (OsString::from(&e.base_name), self.store_ino(&base, Path::new("")), kind)
                })
                .collect()),
            Node::Store { base, rel } => {
                let real = self.real_path(&base, &rel)?;
                let mut v = Vec::new();
                for entry in std::fs::read_dir(&real).map_err(Errno::from)? {
                    let entry = entry.map_err(Errno::from)?;
                    let ft = entry.file_type().map_err(Errno::from)?;
                    let kind = if ft.is_dir() {
                        FileType::Directory
                    } else if ft.is_symlink() {
                        FileType::Symlink
                    } else {
                        FileType::RegularFile
                    };
                    let name = entry.file_name();
                    let child = self.store_ino(&base, &rel.join(&name));
                    v.push((name, child, kind));
                }
                v.sort_by(|a, b| a.0.cmp(&b.0));
                Ok(v)
            }
        }
    }
}

impl Filesystem for FsImpl {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if self.0.passthrough.load(Ordering::Relaxed) {
            let ok = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                // Needed when the mount is an overlayfs lower layer.
                && config.set_max_stack_depth(1).is_ok();
            self.0.passthrough.store(ok, Ordering::Relaxed);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.0.lookup(parent, name) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            // Below the root nothing ever appears (views and store paths are
            // immutable): let the kernel cache the miss (node id 0), so the
            // many probes for files that do not exist (the dynamic loader,
            // interpreters, overlayfs looking up every name in this top-most
            // lower layer) cost a round trip once, not on every container start.
            // Only for a parent we still know: a lookup in a view that was
            // just dropped must not be cached as a miss for a view that
            // comes back with the same inode numbers.
            Err(e) if e == Errno::ENOENT && parent != INodeNo::ROOT && self.0.node(parent).is_some() => {
                let mut negative = dir_attr(0);
                negative.ino = INodeNo(0);
                reply.entry(&TTL, &negative, Generation(0))
            }
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.0.attr(ino) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let target = match self.0.node(ino) {
            Some(Node::Store { base, rel }) => self
                .0
                .real_path(&base, &rel)
                .and_then(|p| std::fs::read_link(p).map_err(Errno::from)),
            _ => Err(Errno::EINVAL),
        };
        match target {
            Ok(t) => reply.data(t.as_os_str().as_bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            reply.error(Errno::EROFS);
            return;
        }
        let Some(Node::Store { base, rel }) = self.0.node(ino) else {
            reply.error(Errno::EISDIR);
            return;
        };
        let cached = self.0.files.lock().ok().and_then(|mut c| c.get(&ino.0).cloned());
        let (file, mut backing) = match cached {
            Some(entry) => entry,
            None => match self
                .0
                .real_path(&base, &rel)
                .and_then(|p| File::open(p).map_err(Errno::from))
            {
                Ok(f) => (Arc::new(f), None),
                Err(e) => {
                    reply.error(e);
                    return;
                }
            },
        };
        let fh = self.0.next_fh.fetch_add(1, Ordering::Relaxed);
        if backing.is_none() && self.0.passthrough.load(Ordering::Relaxed) {
            let mut weak = self.0.weak.lock().unwrap_or_else(|e| e.into_inner());
            backing = weak.get(&ino.0).and_then(Weak::upgrade);
            if backing.is_none() {
                match reply.open_backing(file.as_ref()) {
                    Ok(id) => {
                        let id = Arc::new(id);
                        weak.insert(ino.0, Arc::downgrade(&id));
                        backing = Some(id);
                    }
                    Err(e) => {
                        tracing::info!(error = %e, "FUSE passthrough refused; serving reads ourselves");
                        self.0.passthrough.store(false, Ordering::Relaxed);
                    }
                }
            }
        }
        if let Ok(mut c) = self.0.files.lock() {
            c.put(ino.0, (file.clone(), backing.clone()));
        }
        let id = backing.clone();
        if let Ok(mut opens) = self.0.opens.lock() {
            opens.insert(
                fh,
                Open {
                    file,
                    _backing: backing,
                },
            );
        }
        match id {
            Some(id) => reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &id),
            None => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let file = self
            .0
            .opens
            .lock()
            .ok()
            .and_then(|o| o.get(&fh.0).map(|o| o.file.clone()));
        let Some(file) = file else {
            reply.error(Errno::EBADF);
            return;
        };
        let mut buf = vec![0u8; size as usize];
        let mut filled = 0;
        while filled < buf.len() {
            match file.read_at(&mut buf[filled..], offset + filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    reply.error(Errno::from(e));
                    return;
                }
            }
        }
        reply.data(&buf[..filled]);
    }

    // Store paths carry no extended attributes and nothing is ever written:
    // ENOSYS tells the kernel never to ask again (without fuser's
    // "not implemented" warning on every mount).
    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _owner: LockOwner, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS);
    }

    fn getxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if let Ok(mut opens) = self.0.opens.lock() {
            opens.remove(&fh.0);
        }
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // Resolving here makes an `ls` of a store path fetch it once, up front.
        match self.0.node(ino) {
            Some(Node::Store { base, rel }) => match self.0.real_path(&base, &rel) {
                Ok(_) => reply.opened(
                    FileHandle(0),
                    FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
                ),
                Err(e) => reply.error(e),
            },
            Some(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let entries = match self.0.entries(ino) {
            Ok(e) => e,
            Err(e) => {
                reply.error(e);
                return;
            }
        };
        let dots = [
            (OsString::from("."), ino.0, FileType::Directory),
            (OsString::from(".."), ino.0, FileType::Directory),
        ];
        for (i, (name, child, kind)) in dots.into_iter().chain(entries).enumerate().skip(offset as usize) {
            if reply.add(INodeNo(child), (i + 1) as u64, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // default_permissions makes the kernel check modes; we only refuse writes.
        if mask.bits() & libc::W_OK != 0 {
            reply.error(Errno::EROFS);
        } else if self.0.node(ino).is_some() {
            reply.ok();
        } else {
            reply.error(Errno::ENOENT);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
