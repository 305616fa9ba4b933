//! Who keeps the FUSE session while no daemon serves it (see
//! `nix_snapshotter_fuse::Keeper`): systemd's file descriptor store where
//! systemd runs us with one, else a holder process of our own.

pub mod holder;
pub mod systemd;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix_snapshotter_fuse::Keeper;

pub use holder::HolderKeeper;
pub use systemd::SystemdKeeper;

/// Where the holder process listens for a daemon whose state is in `root`.
pub fn holder_socket(root: &Path) -> PathBuf {
    root.join("fuse-holder.sock")
}

/// How this process may keep its session: found once at start, before any
/// thread runs (systemd's descriptors are taken from the environment).
pub enum Found {
    Systemd(SystemdKeeper),
    Holder,
}

impl Found {
    pub fn from_environment() -> Found {
        match SystemdKeeper::from_environment() {
            Some(k) => Found::Systemd(k),
            None => Found::Holder,
        }
    }

    /// The keeper for a daemon whose state is in `root`.
    pub fn keeper(self, root: &Path) -> std::io::Result<Arc<dyn Keeper>> {
        Ok(match self {
            Found::Systemd(k) => Arc::new(k),
            Found::Holder => Arc::new(HolderKeeper::new(holder_socket(root))?),
        })
    }
}
