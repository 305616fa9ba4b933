//! Disk usage the way containerd's continuity `fs.DiskUsage` counts it:
//! allocated blocks (st_blocks * 512) and inodes, each inode counted once.
//! A leaf: the store and the snapshotter both measure with it. Symlinks are
//! counted, never followed: the walk goes by directory fd and name.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Disk usage as containerd counts it: allocated bytes and distinct inodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub size: i64,
    pub inodes: i64,
}

pub fn disk_usage(root: &Path) -> Result<Usage> {
    use nix_snapshotter_fuse::beneath::{self, Kind};
    use rustix::fs::{openat, statat, AtFlags, Mode, OFlags};
    use std::os::fd::OwnedFd;
    use std::sync::Arc;

    let io = |what: &'static str, p: &Path| Error::io(what, p.to_path_buf());
    let open_flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let root_st = rustix::fs::lstat(root).map_err(|e| io("cannot stat", root)(e.into()))?;
    if Kind::of(&root_st) != Kind::Dir {
        // A file or symlink store path.
        return Ok(Usage {
            size: root_st.st_blocks * 512,
            inodes: 1,
        });
    }
    let mut seen = HashSet::new();
    let mut usage = Usage::default();
    let mut count = |st: &rustix::fs::Stat| {
        if seen.insert((st.st_dev, st.st_ino)) {
            usage.size += st.st_blocks * 512;
            usage.inodes += 1;
        }
    };
    let top: Arc<OwnedFd> =
        Arc::new(rustix::fs::open(root, open_flags, Mode::empty()).map_err(|e| io("cannot open", root)(e.into()))?);
    count(&rustix::fs::fstat(&*top).map_err(|e| io("cannot stat", root)(e.into()))?);
    // Walked by directory fd and name, never by path: a container that
    // swaps a directory for a symlink mid-walk cannot send it elsewhere.
    // Directories wait as (parent fd, name), opened when their turn comes,
    // so a wide tree does not hold a descriptor per waiting directory.
    let mut stack: Vec<(Arc<OwnedFd>, Option<std::ffi::OsString>, PathBuf)> = vec![(top, None, root.to_path_buf())];
    while let Some((parent, name, path)) = stack.pop() {
        let dir = match name {
            None => parent,
            Some(name) => match openat(&*parent, name.as_os_str(), open_flags, Mode::empty()) {
                Ok(fd) => Arc::new(fd),
                // Gone or replaced since it was listed (an active snapshot changes).
                Err(rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR | rustix::io::Errno::LOOP) => continue,
                Err(e) => return Err(io("cannot open", &path)(e.into())),
            },
        };
        let names = beneath::entries(&*dir).map_err(io("cannot list", &path))?;
        for (name, _) in names {
            let child = path.join(&name);
            let st = match statat(&*dir, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                Err(rustix::io::Errno::NOENT) => continue,
                Err(e) => return Err(io("cannot stat", &child)(e.into())),
            };
            count(&st);
            if Kind::of(&st) == Kind::Dir {
                stack.push((dir.clone(), Some(name), child));
            }
        }
    }
    Ok(usage)
}
