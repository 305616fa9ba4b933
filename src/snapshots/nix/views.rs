//! FUSE views: one per distinct union of Nix closures below a snapshot,
//! added with the first snapshot that needs it, dropped with the last, and
//! their store paths pinned against eviction while they live.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use sha2::{Digest, Sha256};

use super::super::db::Ancestor;
use super::NixSupport;
use crate::error::{Error, Result};
use crate::nixfmt::StorePath;
use nix_snapshotter_fuse::ClosureEntry;

impl NixSupport {
    /// The FUSE view for the union of the Nix closures among `ancestors`,
    /// or None when there is no Nix layer below.
    pub fn view_for(&self, ancestors: &[Ancestor]) -> Result<Option<PathBuf>> {
        let Some((name, closure)) = view_of(ancestors) else {
            return Ok(None);
        };
        let is_new = !self.fs.view_names().contains(&name);
        if is_new {
            if let Some(store) = self.store.get().cloned() {
                let paths: Vec<StorePath> = closure
                    .keys()
                    .filter_map(|n| StorePath::from_base_name(n).ok())
                    .collect();
                // Metadata for the whole closure up front: a round trip saved
                // on each path's first touch.
                self.rt.spawn(async move { store.prefetch_narinfos(paths).await });
            }
        }
        let entries: Vec<ClosureEntry> = closure
            .iter()
            .map(|(n, dir)| ClosureEntry {
                base_name: n.to_string(),
                is_dir: *dir,
            })
            .collect();
        let dir = self
            .fs
            .add_view(&name, &entries)
            .map_err(|e| Error::Fuse(e.to_string()))?;
        if is_new {
            self.pin();
        }
        Ok(Some(dir))
    }

    /// Keeps every store path a live view shows from eviction: a running
    /// container may read any of them at any time.
    pub fn pin(&self) {
        if let Some(store) = self.store.get() {
            let shown = self.fs.shown();
            store.set_pinned(shown.iter().filter_map(|b| StorePath::from_base_name(b).ok()).collect());
        }
    }

    pub fn has_views(&self) -> bool {
        !self.fs.view_names().is_empty()
    }

    /// Drops the views that none of `in_use` (the ancestor chains of the
    /// remaining active snapshots and views) needs.
    pub fn drop_unused_views(&self, in_use: &[Vec<Ancestor>]) {
        let keep: BTreeSet<String> = in_use.iter().filter_map(|a| view_of(a).map(|(n, _)| n)).collect();
        for name in self.fs.view_names() {
            if !keep.contains(&name) {
                tracing::debug!(view = %name, "dropping unused view");
                self.fs.remove_view(&name);
            }
        }
        self.pin();
    }
}

/// The view a snapshot above `ancestors` needs: its name (a hash of the
/// union of their Nix closures, so equal closures share a view) and closure.
fn view_of(ancestors: &[Ancestor]) -> Option<(String, BTreeMap<String, Option<bool>>)> {
    let mut closure: BTreeMap<String, Option<bool>> = BTreeMap::new();
    for a in ancestors {
        for p in a.nix.iter().flatten() {
            closure.insert(p.name.clone(), p.dir);
        }
    }
    if closure.is_empty() {
        return None;
    }
    let mut h = Sha256::new();
    for name in closure.keys() {
        h.update(name.as_bytes());
        h.update(b"\n");
    }
    let name: String = h.finalize()[..12].iter().map(|b| format!("{b:02x}")).collect();
    Some((name, closure))
}
