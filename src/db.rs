//! The daemon's one embedded database file, `<root>/metadata.redb`, shared by
//! the snapshot metadata and the local store's path metadata (each owns its
//! tables).
//!
//! redb is a pure-Rust, copy-on-write B-tree store whose commits are atomic
//! and durable (checksummed, fsynced), so a kill -9 at any moment leaves
//! either the old or the new state, never a torn one, and it needs no C
//! library. It locks the file: one process at a time.

use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};

pub use redb::Database;

/// Creates `root` (mode 0700) if needed and opens `root/metadata.redb`.
pub fn open_root(root: &Path) -> Result<Arc<Database>> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(root)
        .map_err(Error::io("cannot create", root))?;
    // Also when it already existed (made 0755 by hand or an older version):
    // below it lie every container's layers and the FUSE mount.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
            .map_err(Error::io("cannot restrict the mode of", root))?;
    }
    open(&root.join("metadata.redb"))
}

pub fn open(path: &Path) -> Result<Arc<Database>> {
    match Database::create(path) {
        Ok(db) => Ok(Arc::new(db)),
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => Err(Error::Database(format!(
            "{} is in use by another process (is the nix-snapshotter daemon running with this --root?)",
            path.display()
        ))),
        Err(e) => Err(Error::Database(format!("{}: {e}", path.display()))),
    }
}
