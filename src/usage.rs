//! Disk usage the way containerd's continuity `fs.DiskUsage` counts it:
//! allocated blocks (st_blocks * 512) and inodes, each inode counted once.
//! A leaf: the store and the snapshotter both measure with it. Symlinks are
//! counted, never followed (`symlink_metadata`, and only directories that
//! lstat says are directories are listed).

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Disk usage as containerd counts it: allocated bytes and distinct inodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub size: i64,
    pub inodes: i64,
}

pub fn disk_usage(root: &Path) -> Result<Usage> {
    let mut seen = HashSet::new();
    let mut usage = Usage::default();
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = fs::symlink_metadata(&path).map_err(Error::io("cannot stat", &path))?;
        if seen.insert((meta.dev(), meta.ino())) {
            usage.size += (meta.blocks() * 512) as i64;
            usage.inodes += 1;
        }
        if meta.is_dir() {
            for entry in fs::read_dir(&path).map_err(Error::io("cannot list", &path))? {
                stack.push(entry.map_err(Error::io("cannot list", &path))?.path());
            }
        }
    }
    Ok(usage)
}
