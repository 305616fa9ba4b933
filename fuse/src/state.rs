//! What each node is: answers for lookups, attributes and listings, read
//! from verified store content beneath the directory the resolver names.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use fuser::{Errno, FileAttr, FileType, INodeNo};

use crate::attrs::{attr_from, attr_of_entry, dir_attr, file_type, tree_kind};
use crate::beneath::{self, Kind};
use crate::files::Files;
use crate::inodes::{Inodes, Node, StoreNode};
use crate::inval::{Inval, Invalidator};
use crate::{FileTree, Resolver, StoreDir, TreeEntry};

pub(crate) struct State {
    pub resolver: Arc<dyn Resolver>,
    pub inodes: RwLock<Inodes>,
    pub next_ino: AtomicU64,
    pub files: Files,
    pub passthrough: AtomicBool,
    /// The kernel takes `FUSE_NOTIFY_RESEND` (said at INIT).
    pub has_resend: AtomicBool,
    /// The kernel opens directories by itself once told ENOSYS (said at
    /// INIT): no OPENDIR or RELEASEDIR, and listings cached.
    pub no_opendir: AtomicBool,
    pub mountpoint: PathBuf,
    /// Set once mounted: asks the kernel to resend requests.
    pub notifier: OnceLock<fuser::Notifier>,
    /// Set once mounted: tells the kernel to forget what it cached.
    pub inval: OnceLock<Invalidator>,
    /// The connection's `/dev/fuse` descriptor (backing ids are made on it).
    pub dev: OnceLock<std::os::fd::OwnedFd>,
    /// The inode journal, when the session is kept for a successor.
    pub journal: OnceLock<Arc<crate::journal::Journal>>,
    /// Requests being answered off the worker threads (they wait for a fetch).
    pub waiting: AtomicUsize,
    /// Directory listings by handle: taken on the handle's first readdir
    /// (the kernel serves repeats from its cache), dropped at releasedir.
    pub listings: std::sync::Mutex<std::collections::HashMap<u64, Option<Arc<Vec<Listed>>>>>,
    /// Listings read without a handle (the kernel opens directories by
    /// itself), the last few by inode: a large directory is read in many
    /// READDIRs, each served from one listing.
    pub unhandled: std::sync::Mutex<std::collections::VecDeque<(u64, Arc<Vec<Listed>>)>>,
    pub next_dir_fh: AtomicU64,
    /// Requests served, by operation.
    pub requests: [AtomicU64; OPS.len()],
    /// The session was left to a successor: what still fails here is
    /// never seen (and resent), so it is not worth a warning.
    pub leaving: AtomicBool,
}

/// FUSE operations counted (for metrics), by [`Op`] index.
pub(crate) const OPS: [&str; 12] = [
    "lookup",
    "forget",
    "getattr",
    "readlink",
    "open",
    "read",
    "release",
    "opendir",
    "readdir",
    "releasedir",
    "access",
    "other",
];

#[derive(Clone, Copy)]
pub(crate) enum Op {
    Lookup,
    Forget,
    Getattr,
    Readlink,
    Open,
    Read,
    Release,
    Opendir,
    Readdir,
    Releasedir,
    Access,
    Other,
}

/// One entry of a listing: name, node id, type.
pub(crate) type Listed = (OsString, u64, FileType);

/// Listings kept without a handle (see [`State::unhandled`]).
const UNHANDLED_LISTINGS: usize = 16;

/// `FUSE_UNKNOWN_INO`: what a directory listing may say for an entry.
const UNKNOWN_INO: u64 = 0xffff_ffff;

/// The answer to a lookup.
pub(crate) enum Lookup {
    Found(FileAttr),
    /// Not there, for good (views and store paths never change): the
    /// kernel may remember the miss.
    Absent,
}

impl State {
    /// The verified tree of store path `base` when it is not local (a
    /// local path is read from disk). May fetch the tree (bounded).
    pub fn tree_of(&self, base: &str) -> Option<Arc<dyn FileTree>> {
        if self.resolver.local(base).is_some() {
            return None;
        }
        self.resolver.tree(base)
    }

    pub fn count(&self, op: Op) {
        self.requests[op as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn node(&self, ino: INodeNo) -> Option<Node> {
        self.inodes.read().ok()?.nodes.get(&ino.0).cloned()
    }

    fn store_ino(&self, node: &StoreNode, looked_up: bool) -> u64 {
        let mut inodes = self.inodes.write().unwrap_or_else(|e| e.into_inner());
        inodes.store_ino(&self.next_ino, node, looked_up)
    }

    /// The node id a listing shows for `node`: its own if it has one, else
    /// FUSE's "unknown" (a listing creates no kernel inode, so it gets none).
    fn listed_ino(&self, node: &StoreNode) -> u64 {
        self.inodes
            .read()
            .ok()
            .and_then(|i| i.find_store(node))
            .unwrap_or(UNKNOWN_INO)
    }

    /// Whether answering about `node` (or its child `name`) may wait for
    /// the network: such requests are answered off the worker threads.
    pub fn may_wait(&self, node: &Node, name: Option<&OsStr>) -> bool {
        match (node, name) {
            (Node::Store(sn), None) if sn.hinted => false,
            (Node::Store(sn), _) => {
                self.resolver.local(&sn.base).is_none() && self.resolver.known_tree(&sn.base).is_none()
            }
            (Node::ViewDir { view, depth: 2 }, Some(name)) => match view.entry(name) {
                Some(e) => e.is_dir != Some(true) && self.resolver.local(&e.base_name).is_none(),
                None => false,
            },
            _ => false,
        }
    }

    /// Runs `f` beneath the directory holding `base` now, on `base/rel`.
    /// A store path evicted in between is resolved (fetched) again, once.
    fn at<T>(&self, base: &str, rel: &Path, f: impl Fn(BorrowedFd<'_>, &Path) -> io::Result<T>) -> Result<T, Errno> {
        // Not `join` for an empty `rel`: a trailing slash would make the
        // kernel follow (and demand a directory at) the last component.
        let path = if rel.as_os_str().is_empty() {
            PathBuf::from(base)
        } else {
            Path::new(base).join(rel)
        };
        let dir = self.holder(base)?;
        let gone = |dir: &StoreDir| beneath::lstat_name(dir.as_fd(), OsStr::new(base)).is_err();
        match f(dir.as_fd(), &path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && gone(&dir) => {
                let dir = self.holder(base)?;
                match f(dir.as_fd(), &path) {
                    // Evicted again: say so (EIO, never cached), not "no
                    // such file", which the kernel would remember for good.
                    Err(e) if e.kind() == io::ErrorKind::NotFound && gone(&dir) => Err(Errno::EIO),
                    r => r.map_err(Errno::from),
                }
            }
            r => r.map_err(Errno::from),
        }
    }

    fn holder(&self, base: &str) -> Result<StoreDir, Errno> {
        self.resolver.resolve(base).map_err(|e| {
            if !self.leaving.load(Ordering::Relaxed) {
                tracing::warn!(path = %base, error = %e, "store path unavailable; access gets EIO");
            }
            Errno::EIO
        })
    }

    /// Verified attributes of `base/rel`; directories belong to `view`.
    fn verified(
        &self,
        base: &Arc<str>,
        rel: &Path,
        view: Option<&Arc<str>>,
        looked_up: bool,
    ) -> Result<FileAttr, Errno> {
        if let Some(tree) = self.tree_of(base) {
            let entry = tree.entry(rel.as_os_str().as_bytes()).ok_or(Errno::ENOENT)?;
            let node = StoreNode {
                base: base.clone(),
                rel: rel.to_path_buf(),
                view: if entry == TreeEntry::Dir { view.cloned() } else { None },
                hinted: false,
            };
            return Ok(attr_of_entry(self.store_ino(&node, looked_up), &entry));
        }
        let st = self.at(base, rel, beneath::lstat)?;
        let is_dir = Kind::of(&st) == Kind::Dir;
        let node = StoreNode {
            base: base.clone(),
            rel: rel.to_path_buf(),
            view: if is_dir { view.cloned() } else { None },
            hinted: false,
        };
        Ok(attr_from(self.store_ino(&node, looked_up), &st))
    }

    /// Checks a store path shown as a directory on a hint's word. When the
    /// verified path is something else (a file, or a symlink such as one to
    /// `/`), the kernel is told to forget the directory it was shown, and
    /// the next lookup shows what the path really is.
    fn check_hinted(&self, base: &Arc<str>) -> Result<(), Errno> {
        let is_dir = match self.tree_of(base) {
            Some(tree) => tree.entry(b"") == Some(TreeEntry::Dir),
            None => Kind::of(&self.at(base, Path::new(""), beneath::lstat)?) == Kind::Dir,
        };
        if is_dir {
            return Ok(());
        }
        // Once per store path: the hinted nodes go, and with them every
        // later request's way back here.
        let dropped = self.inodes.write().map(|mut i| i.drop_hinted(base)).unwrap_or(false);
        if dropped {
            tracing::warn!(path = %base, "a hint said this store path is a directory, but it is not; showing what it is");
            self.forget_entries(base);
        }
        Err(Errno::ENOENT)
    }

    /// Tells the kernel what to forget, when mounted.
    fn invalidate(&self, invals: impl IntoIterator<Item = Inval>) {
        if let Some(i) = self.inval.get() {
            i.send(invals);
        }
    }

    /// Tells the kernel to drop its cached listing of the root (views come
    /// and go).
    pub fn root_changed(&self) {
        self.invalidate([Inval::Inode(INodeNo::ROOT.0)]);
    }

    /// Tells the kernel to drop `<view>/nix/store/<base>` in every view,
    /// and those directories' cached listings (which give its type).
    fn forget_entries(&self, base: &Arc<str>) {
        let dirs = self
            .inodes
            .read()
            .map(|i| i.store_dirs_listing(base))
            .unwrap_or_default();
        if let Ok(mut u) = self.unhandled.lock() {
            u.retain(|(ino, _)| !dirs.contains(ino));
        }
        let name = OsString::from(&**base);
        self.invalidate(dirs.into_iter().flat_map(|d| {
            [
                Inval::Entry {
                    parent: d,
                    name: name.clone(),
                },
                Inval::Inode(d),
            ]
        }));
    }

    pub fn attr(&self, ino: INodeNo) -> Result<FileAttr, Errno> {
        match self.node(ino).ok_or(Errno::ENOENT)? {
            Node::Root | Node::ViewDir { .. } => Ok(dir_attr(ino.0)),
            Node::Store(sn) if sn.hinted => {
                if self.resolver.local(&sn.base).is_none() {
                    return Ok(dir_attr(ino.0));
                }
                self.check_hinted(&sn.base).map_err(|_| Errno::ESTALE)?;
                self.verified(&sn.base, &sn.rel, sn.view.as_ref(), false)
            }
            Node::Store(sn) => self.verified(&sn.base, &sn.rel, sn.view.as_ref(), false),
        }
    }

    pub fn lookup(&self, parent: INodeNo, name: &OsStr) -> Result<Lookup, Errno> {
        if name.as_bytes().contains(&b'/') || name == "." || name == ".." {
            return Err(Errno::EINVAL);
        }
        match self.node(parent).ok_or(Errno::ENOENT)? {
            Node::Root => {
                let inodes = self.inodes.read().map_err(|_| Errno::EIO)?;
                let view = name.to_str().and_then(|n| inodes.views.get(n)).ok_or(Errno::ENOENT)?;
                Ok(Lookup::Found(dir_attr(view.inos[0])))
            }
            Node::ViewDir { view, depth } => match (depth, name.as_bytes()) {
                (0, b"nix") => Ok(Lookup::Found(dir_attr(view.inos[1]))),
                (1, b"store") => Ok(Lookup::Found(dir_attr(view.inos[2]))),
                (2, _) => {
                    let Some(entry) = view.entry(name) else {
                        return Ok(Lookup::Absent);
                    };
                    let base: Arc<str> = Arc::from(entry.base_name.as_str());
                    let hinted_dir = self.resolver.local(&base).is_none()
                        && entry.is_dir.or_else(|| self.resolver.is_dir(&base)) == Some(true);
                    if hinted_dir {
                        let node = StoreNode {
                            base,
                            rel: PathBuf::new(),
                            view: Some(view.name.clone()),
                            hinted: true,
                        };
                        // Listed lazily: fetched when something looks inside.
                        let ino = self.store_ino(&node, true);
                        return Ok(Lookup::Found(dir_attr(ino)));
                    }
                    self.verified(&base, Path::new(""), Some(&view.name), true)
                        .map(Lookup::Found)
                }
                _ => Ok(Lookup::Absent),
            },
            Node::Store(sn) => {
                if sn.hinted && sn.rel.as_os_str().is_empty() {
                    self.check_hinted(&sn.base)?;
                }
                match self.verified(&sn.base, &sn.rel.join(name), sn.view.as_ref(), true) {
                    Ok(attr) => Ok(Lookup::Found(attr)),
                    Err(e) if e == Errno::ENOENT || e == Errno::ENOTDIR => Ok(Lookup::Absent),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Closes the backing files kept open for store path `base`, and has
    /// the kernel drop the pages it cached of them.
    pub fn close_files_of(&self, base: &str) {
        let inos: Vec<u64> = self
            .inodes
            .read()
            .map(|i| {
                i.nodes
                    .iter()
                    .filter(|(_, n)| matches!(n, Node::Store(sn) if &*sn.base == base))
                    .map(|(ino, _)| *ino)
                    .collect()
            })
            .unwrap_or_default();
        for &ino in &inos {
            self.files.forget(ino);
            // An earlier process's backing id would keep the evicted file
            // (and its space) in use for new opens.
            self.files.release_adopted(ino, self.dev.get(), self.journal.get());
        }
        // Cold means cold: without passthrough the kernel keeps store
        // files' pages in the mount's own page cache, which would go on
        // serving an evicted path without a fetch.
        self.invalidate(inos.into_iter().map(Inval::Inode));
    }

    /// A handle for reading directory `ino`.
    pub fn open_listing(&self) -> u64 {
        let fh = self.next_dir_fh.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut l) = self.listings.lock() {
            l.insert(fh, None);
        }
        fh
    }

    /// The listing of directory `ino` (with `.` and `..`) for handle `fh`,
    /// taken on first use: readdir then serves every offset from it
    /// (reading the directory again for each chunk would be quadratic).
    pub fn listing(&self, fh: u64, ino: INodeNo) -> Result<Arc<Vec<Listed>>, Errno> {
        // Without a handle (no OPENDIR): the last few by inode, but never
        // the root's, which changes.
        let by_ino = fh == 0 && ino != INodeNo::ROOT;
        if by_ino {
            let u = self.unhandled.lock().map_err(|_| Errno::EIO)?;
            if let Some((_, l)) = u.iter().find(|(i, _)| *i == ino.0) {
                return Ok(l.clone());
            }
        } else if let Some(Some(l)) = self.listings.lock().map_err(|_| Errno::EIO)?.get(&fh) {
            return Ok(l.clone());
        }
        let mut all = vec![
            (OsString::from("."), ino.0, FileType::Directory),
            (OsString::from(".."), ino.0, FileType::Directory),
        ];
        all.extend(self.entries(ino)?);
        let all = Arc::new(all);
        if by_ino {
            if let Ok(mut u) = self.unhandled.lock() {
                if u.len() >= UNHANDLED_LISTINGS {
                    u.pop_front();
                }
                u.push_back((ino.0, all.clone()));
            }
        } else if let Ok(mut l) = self.listings.lock() {
            if let Some(slot) = l.get_mut(&fh) {
                *slot = Some(all.clone());
            }
        }
        Ok(all)
    }

    pub fn drop_listing(&self, fh: u64) {
        if let Ok(mut l) = self.listings.lock() {
            l.remove(&fh);
        }
    }

    /// Fetches a store path before it is listed, and checks a hinted one.
    pub fn open_dir(&self, sn: &StoreNode) -> Result<(), Errno> {
        if sn.hinted && sn.rel.as_os_str().is_empty() {
            return self.check_hinted(&sn.base);
        }
        if let Some(tree) = self.tree_of(&sn.base) {
            return match tree.entry(sn.rel.as_os_str().as_bytes()) {
                Some(TreeEntry::Dir) => Ok(()),
                Some(_) => Err(Errno::ENOTDIR),
                None => Err(Errno::ENOENT),
            };
        }
        self.at(&sn.base, &sn.rel, |d, p| beneath::open_dir(d, p).map(drop))
    }

    /// Directory entries (name, inode, type), without "." and "..".
    pub fn entries(&self, ino: INodeNo) -> Result<Vec<Listed>, Errno> {
        match self.node(ino).ok_or(Errno::ENOENT)? {
            Node::Root => {
                let inodes = self.inodes.read().map_err(|_| Errno::EIO)?;
                let mut v: Vec<_> = inodes
                    .views
                    .values()
                    .map(|view| (OsString::from(&*view.name), view.inos[0], FileType::Directory))
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
                    // Types in a listing are advisory; lookups verify.
                    let dir = e.is_dir != Some(false);
                    let node = StoreNode {
                        base: Arc::from(e.base_name.as_str()),
                        rel: PathBuf::new(),
                        view: dir.then(|| view.name.clone()),
                        hinted: dir,
                    };
                    let kind = if dir {
                        FileType::Directory
                    } else {
                        FileType::RegularFile
                    };
                    (OsString::from(&e.base_name), self.listed_ino(&node), kind)
                })
                .collect()),
            Node::Store(sn) => {
                if sn.hinted && sn.rel.as_os_str().is_empty() {
                    self.check_hinted(&sn.base)?;
                }
                if let Some(tree) = self.tree_of(&sn.base) {
                    let children = tree.children(sn.rel.as_os_str().as_bytes()).ok_or(Errno::ENOTDIR)?;
                    return Ok(children
                        .into_iter()
                        .map(|(name, entry)| {
                            let name = OsString::from(OsStr::from_bytes(&name));
                            let node = StoreNode {
                                base: sn.base.clone(),
                                rel: sn.rel.join(&name),
                                view: if entry == TreeEntry::Dir { sn.view.clone() } else { None },
                                hinted: false,
                            };
                            (name, self.listed_ino(&node), tree_kind(&entry))
                        })
                        .collect());
                }
                let list = self.at(&sn.base, &sn.rel, |d, p| beneath::entries(beneath::open_dir(d, p)?))?;
                Ok(list
                    .into_iter()
                    .map(|(name, kind)| {
                        let node = StoreNode {
                            base: sn.base.clone(),
                            rel: sn.rel.join(&name),
                            view: if kind == Kind::Dir { sn.view.clone() } else { None },
                            hinted: false,
                        };
                        (name, self.listed_ino(&node), file_type(kind))
                    })
                    .collect())
            }
        }
    }

    pub fn read_link(&self, ino: INodeNo) -> Result<OsString, Errno> {
        match self.node(ino) {
            Some(Node::Store(sn)) if !sn.hinted => {
                if let Some(tree) = self.tree_of(&sn.base) {
                    return match tree.entry(sn.rel.as_os_str().as_bytes()) {
                        Some(TreeEntry::Symlink(t)) => Ok(OsString::from(OsStr::from_bytes(&t))),
                        _ => Err(Errno::EINVAL),
                    };
                }
                self.at(&sn.base, &sn.rel, beneath::read_link)
            }
            _ => Err(Errno::EINVAL),
        }
    }

    pub fn open_file(&self, sn: &StoreNode) -> Result<File, Errno> {
        if sn.hinted {
            return Err(Errno::EISDIR);
        }
        self.at(&sn.base, &sn.rel, beneath::open_file)
    }

    /// Runs `f` on a thread of its own when it may wait for a fetch, so
    /// that a stalled download never holds a worker that other requests
    /// (other paths, other containers) need. Past `max` such threads, runs
    /// it here.
    pub fn answer(self: &Arc<Self>, wait: bool, max: usize, f: impl FnOnce(&State) + Send + 'static) {
        if wait && self.waiting.fetch_add(1, Ordering::AcqRel) < max {
            let me = self.clone();
            let spawned = std::thread::Builder::new().name("fuse-wait".into()).spawn(move || {
                // Counted down however `f` ends, a panic included.
                struct Done(Arc<State>);
                impl Drop for Done {
                    fn drop(&mut self) {
                        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
                    }
                }
                let done = Done(me);
                f(&done.0);
            });
            if let Err(e) = spawned {
                // The request's reply was dropped with the closure: the
                // kernel gets EIO for it.
                tracing::warn!(error = %e, "cannot start a thread for a request waiting on a fetch");
                self.waiting.fetch_sub(1, Ordering::AcqRel);
            }
            return;
        }
        if wait {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
        }
        f(self)
    }
}
