//! Attributes the kernel is shown: store content is read-only for everyone,
//! and a verified tree's entries look as their unpacked form would.

use std::time::{Duration, SystemTime};

use fuser::{FileAttr, FileType, INodeNo};
use rustix::fs::Stat;

use crate::beneath::Kind;
use crate::TreeEntry;

/// What FUSE calls a kind of entry (anything not a directory or symlink
/// is shown as a file; a store path holds nothing else).
pub(crate) fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        _ => FileType::RegularFile,
    }
}

pub(crate) fn dir_attr(ino: u64) -> FileAttr {
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

pub(crate) fn attr_from(ino: u64, st: &Stat) -> FileAttr {
    let kind = file_type(Kind::of(st));
    let t = |s: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(s.max(0) as u64);
    FileAttr {
        ino: INodeNo(ino),
        size: st.st_size.max(0) as u64,
        blocks: st.st_blocks as u64,
        atime: t(st.st_atime),
        mtime: t(st.st_mtime),
        ctime: t(st.st_ctime),
        crtime: t(st.st_mtime),
        kind,
        // Store paths are read-only for everyone; keep only r/x bits.
        perm: (st.st_mode & 0o555) as u16,
        nlink: if kind == FileType::Directory { 2 } else { 1 },
        uid: 0,
        gid: 0,
        rdev: 0,
        flags: 0,
        blksize: 4096,
    }
}

/// Attributes of an entry of a verified tree (as its unpacked form would
/// have them: mode 0444 or 0555, mtime 1).
pub(crate) fn attr_of_entry(ino: u64, e: &TreeEntry) -> FileAttr {
    let mut a = dir_attr(ino);
    match e {
        TreeEntry::Dir => {}
        TreeEntry::File { size, executable } => {
            a.kind = FileType::RegularFile;
            a.size = *size;
            a.blocks = size.div_ceil(512);
            a.perm = if *executable { 0o555 } else { 0o444 };
            a.nlink = 1;
        }
        TreeEntry::Symlink(target) => {
            a.kind = FileType::Symlink;
            a.size = target.len() as u64;
            a.nlink = 1;
        }
    }
    a
}

pub(crate) fn tree_kind(e: &TreeEntry) -> FileType {
    match e {
        TreeEntry::Dir => FileType::Directory,
        TreeEntry::File { .. } => FileType::RegularFile,
        TreeEntry::Symlink(_) => FileType::Symlink,
    }
}
