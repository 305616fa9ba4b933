//! The FUSE request handlers. Requests that may wait for a fetch are
//! answered from a thread of their own ([`State::answer`]); the rest on the
//! worker that read them.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use fuser::{
    BackingId, Errno, FileHandle, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner,
    OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyXattr, Request,
};

use crate::attrs::dir_attr;
use crate::files::{Backing, OpenFile};
use crate::inodes::Node;
use crate::state::{Lookup, Op, State};
use crate::TTL;

pub(crate) struct FsImpl {
    pub state: Arc<State>,
    /// Most requests answered off the workers at once.
    pub max_waiting: usize,
}

impl FsImpl {
    fn answer(&self, node: &Node, name: Option<&OsStr>, f: impl FnOnce(&State) + Send + 'static) {
        let wait = self.state.may_wait(node, name);
        self.state.answer(wait, self.max_waiting, f)
    }
}

/// Opens store file `ino`, reusing `kept` (its backing file kept open from
/// an earlier open) when there is one.
fn open_file(state: &State, ino: INodeNo, sn: &crate::inodes::StoreNode, kept: Option<OpenFile>, reply: ReplyOpen) {
    let (file, mut backing) = match kept {
        Some(entry) => entry,
        None => match state.open_file(sn) {
            Ok(f) => (Arc::new(f), None),
            Err(e) => return reply.error(e),
        },
    };
    let journal = state.journal.get().cloned();
    // An inode already open through passthrough must stay so (the kernel
    // refuses mixing), even after passthrough was turned off; also one an
    // earlier process of this session opened so.
    if backing.is_none() {
        backing = state.files.live_backing(ino.0).or_else(|| {
            state.files.adopted(ino.0, |raw| {
                // SAFETY (of wrap_backing): `raw` was made on this
                // connection by an earlier process and never closed (the
                // journal records closes before they happen).
                Backing::adopted(unsafe { reply.wrap_backing(raw) }, raw, ino.0, journal.clone())
            })
        });
    }
    if backing.is_none() && state.passthrough.load(Ordering::Relaxed) && !state.files.was_unbacked(ino.0) {
        let made = state.files.backing_or(ino.0, || {
            let dev = state
                .dev
                .get()
                .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EBADF))?;
            let raw = BackingId::create_raw(dev, file.as_ref())?;
            // SAFETY (of wrap_backing): `raw` was just made on this
            // connection, and only this wrapper will close it.
            Ok(Backing::new(
                unsafe { reply.wrap_backing(raw) },
                raw,
                ino.0,
                journal.clone(),
            ))
        });
        match made {
            Ok(id) => backing = Some(id),
            // A passing shortage: fail this open and keep passthrough
            // (serving it cached would mix modes on the inode).
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM)) => {
                return reply.error(Errno::from(e))
            }
            // Anything else is the kernel saying no (rootless, no support,
            // a store on a filesystem stacked too deep): serve reads
            // ourselves from now on.
            Err(e) => {
                tracing::info!(error = %e, "FUSE passthrough refused; serving reads ourselves");
                state.passthrough.store(false, Ordering::Relaxed);
            }
        }
    }
    let fh = state.files.opened(ino.0, (file, backing.clone()));
    match backing {
        Some(b) => reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &b.id),
        None => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
    }
}

fn read_at(file: &std::fs::File, offset: u64, size: u32, reply: ReplyData) {
    use std::os::unix::fs::FileExt;
    thread_local! {
        // One buffer per worker, reused: a fresh zeroed one per request
        // costs as much as the copy itself. The reply copies out of it.
        static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    BUF.with_borrow_mut(|buf| {
        if buf.len() < size as usize {
            buf.resize(size as usize, 0);
        }
        let buf = &mut buf[..size as usize];
        let mut filled = 0;
        while filled < buf.len() {
            match file.read_at(&mut buf[filled..], offset + filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return reply.error(Errno::from(e)),
            }
        }
        reply.data(&buf[..filled]);
    });
}

impl Filesystem for FsImpl {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let state = &self.state;
        // Kept for a successor, which resumes without an INIT of its own.
        state.has_resend.store(
            config.capabilities().contains(InitFlags::FUSE_HAS_RESEND),
            Ordering::Relaxed,
        );
        // Whether an OPENDIR answered ENOSYS means "open it yourself".
        state.no_opendir.store(
            config.capabilities().contains(InitFlags::FUSE_NO_OPENDIR_SUPPORT),
            Ordering::Relaxed,
        );
        // Without it the kernel serialises lookups in one directory: a
        // lookup waiting for a fetch would hold up every other name in
        // `nix/store`.
        if let Err(e) = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS) {
            tracing::warn!(flags = ?e, "the kernel does not take parallel directory operations");
        }
        // Symlinks never change (store paths are immutable; a node made
        // from a wrong hint is replaced by another): the kernel keeps their
        // targets, and a container's start asks for each once.
        if let Err(e) = config.add_capabilities(InitFlags::FUSE_CACHE_SYMLINKS) {
            tracing::debug!(flags = ?e, "the kernel does not cache symlinks");
        }
        if state.passthrough.load(Ordering::Relaxed) {
            let ok = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                // Needed when the mount is an overlayfs lower layer.
                && config.set_max_stack_depth(1).is_ok();
            state.passthrough.store(ok, Ordering::Relaxed);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.state.count(Op::Lookup);
        let Some(node) = self.state.node(parent) else {
            // A directory we no longer know (a view just dropped): a miss,
            // but not one the kernel may remember, since the view may come
            // back with the same inode numbers.
            return reply.error(Errno::ENOENT);
        };
        let wait = self.state.may_wait(&node, Some(name));
        let name: OsString = name.to_owned();
        self.state
            .answer(wait, self.max_waiting, move |state| match state.lookup(parent, &name) {
                Ok(Lookup::Found(attr)) => reply.entry(&TTL, &attr, Generation(0)),
                // Below the root nothing ever appears (views and store paths
                // are immutable): the kernel caches the miss (node id 0), so
                // the many probes for files that do not exist (the dynamic
                // loader, interpreters, overlayfs looking up every name in this
                // top-most lower layer) cost a round trip once.
                Ok(Lookup::Absent) => {
                    let mut negative = dir_attr(0);
                    negative.ino = INodeNo(0);
                    reply.entry(&TTL, &negative, Generation(0))
                }
                Err(e) => reply.error(e),
            });
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.state.count(Op::Forget);
        let gone = {
            let mut inodes = self.state.inodes.write().unwrap_or_else(|e| e.into_inner());
            inodes.forget(ino.0, nlookup)
        };
        // Its number is never given again: the file kept open for it would
        // only hold a descriptor (and the space of an evicted path).
        if gone {
            self.state.files.forget(ino.0);
            self.state
                .files
                .release_adopted(ino.0, self.state.dev.get(), self.state.journal.get());
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.state.count(Op::Getattr);
        let Some(node) = self.state.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        self.answer(&node, None, move |state| match state.attr(ino) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.state.count(Op::Readlink);
        let Some(node) = self.state.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        self.answer(&node, None, move |state| match state.read_link(ino) {
            Ok(t) => reply.data(t.as_bytes()),
            Err(e) => reply.error(e),
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.state.count(Op::Open);
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        let Some(Node::Store(sn)) = self.state.node(ino) else {
            return reply.error(Errno::EISDIR);
        };
        if !self.state.passthrough.load(Ordering::Relaxed) && !self.state.files.has_backings() {
            // Reads come to us anyway: ENOSYS tells the kernel to open
            // files of this mount without asking (and never to send a
            // release), keeping their page cache. A container opening
            // thousands of small files then costs one READ each, or
            // nothing once cached. Reads find the file by inode.
            return reply.error(Errno::ENOSYS);
        }
        if let Some(kept) = self.state.files.recent(ino.0) {
            // Open before: no fetch. Asking the store whether the path is
            // still there also counts as a use for eviction order; one that
            // was evicted is fetched again rather than served from a
            // deleted file (whose space eviction meant to free).
            if self.state.resolver.local(&sn.base).is_some() {
                return open_file(&self.state, ino, &sn, Some(kept), reply);
            }
            self.state.files.forget(ino.0);
        }
        self.answer(&Node::Store(sn.clone()), None, move |state| {
            if state.tree_of(&sn.base).is_some() {
                // Read by the piece from its verified tree: no backing
                // file; reads find none for handle 0 and ask the tree.
                state.files.opened_unbacked(ino.0);
                return reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
            }
            open_file(state, ino, &sn, None, reply)
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.state.count(Op::Read);
        let open = self
            .state
            .files
            .file(fh.0, ino.0)
            // Files the kernel opened without asking (handle 0), or whose
            // handle an earlier process gave: the inode's kept file.
            .or_else(|| self.state.files.recent(ino.0).map(|(f, _)| f));
        match open {
            Some(file) => read_at(&file, offset, size, reply),
            // A handle an earlier process of this session gave: open the
            // file again by its node, and serve the handle from it.
            None => {
                let Some(Node::Store(sn)) = self.state.node(ino) else {
                    return reply.error(Errno::EBADF);
                };
                // A read may fetch: off the workers, whatever the node.
                let wait = self.state.resolver.local(&sn.base).is_none();
                self.state.answer(wait, self.max_waiting, move |state| {
                    if let Some(tree) = state.tree_of(&sn.base) {
                        return match tree.read(sn.rel.as_os_str().as_bytes(), offset, size) {
                            Ok(data) => reply.data(&data),
                            Err(e) => {
                                if !state.leaving.load(Ordering::Relaxed) {
                                    tracing::warn!(path = %sn.base, error = %e, "a read of a store file failed; EIO");
                                }
                                reply.error(Errno::EIO)
                            }
                        };
                    }
                    match state.open_file(&sn) {
                        Ok(f) => {
                            let f = Arc::new(f);
                            if fh.0 == 0 {
                                state.files.keep(ino.0, (f.clone(), None));
                            } else {
                                state.files.insert(fh.0, ino.0, (f.clone(), None));
                            }
                            read_at(&f, offset, size, reply)
                        }
                        Err(e) => reply.error(e),
                    }
                });
            }
        }
    }

    // Store paths carry no extended attributes and nothing is ever written:
    // ENOSYS tells the kernel never to ask again (without fuser's
    // "not implemented" warning on every mount).
    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _owner: LockOwner, reply: ReplyEmpty) {
        self.state.count(Op::Other);
        reply.error(Errno::ENOSYS);
    }

    fn getxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _size: u32, reply: ReplyXattr) {
        self.state.count(Op::Other);
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        self.state.count(Op::Other);
        reply.error(Errno::ENOSYS);
    }

    // Store files have no inode flags to get or set: overlayfs asks for
    // them (FS_IOC_GETFLAGS) on every copy-up; ENOTTY is the answer it
    // expects from a filesystem without them.
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        self.state.count(Op::Other);
        reply.error(Errno::ENOTTY);
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
        self.state.count(Op::Release);
        self.state.files.release(fh.0);
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.state.count(Op::Opendir);
        // Where the kernel takes it, ENOSYS makes it open directories by
        // itself from now on, keeping their listings (the kernel is told to
        // drop the root's when views change, and a view's `nix/store` when
        // a hinted type is corrected): a container's start then costs no
        // OPENDIR and RELEASEDIR pair per directory it lists. Readdir
        // resolves a store path as this does.
        let opened = |state: &State, reply: ReplyOpen, flags| {
            if state.no_opendir.load(Ordering::Relaxed) {
                reply.error(Errno::ENOSYS)
            } else {
                reply.opened(FileHandle(state.open_listing()), flags)
            }
        };
        match self.state.node(ino) {
            // Resolving here makes an `ls` of a store path fetch it once, up
            // front (and checks a hinted one).
            Some(Node::Store(sn)) => {
                let node = Node::Store(sn.clone());
                let wait = self.state.may_wait(&node, Some(OsStr::new("")));
                self.state
                    .answer(wait, self.max_waiting, move |state| match state.open_dir(&sn) {
                        Ok(()) => opened(state, reply, FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR),
                        Err(e) => reply.error(e),
                    });
            }
            Some(_) => opened(&self.state, reply, FopenFlags::empty()),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, reply: ReplyDirectory) {
        self.state.count(Op::Readdir);
        let Some(node) = self.state.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let wait = matches!(node, Node::Store(_)) && self.state.may_wait(&node, Some(OsStr::new("")));
        self.state.answer(wait, self.max_waiting, move |state| {
            let mut reply = reply;
            let entries = match state.listing(fh.0, ino) {
                Ok(e) => e,
                Err(e) => return reply.error(e),
            };
            for (i, (name, child, kind)) in entries.iter().enumerate().skip(offset as usize) {
                if reply.add(INodeNo(*child), (i + 1) as u64, *kind, name) {
                    break;
                }
            }
            reply.ok();
        });
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.state.count(Op::Releasedir);
        self.state.drop_listing(fh.0);
        reply.ok();
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: fuser::AccessFlags, reply: ReplyEmpty) {
        self.state.count(Op::Access);
        // default_permissions makes the kernel check modes; we only refuse writes.
        if mask.bits() & libc::W_OK != 0 {
            reply.error(Errno::EROFS);
        } else if self.state.node(ino).is_some() {
            reply.ok();
        } else {
            reply.error(Errno::ENOENT);
        }
    }
}
