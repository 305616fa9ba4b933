//! Nix layers: recognising them, and giving the snapshots above them a FUSE
//! view of their closure as the top-most lower directory of their overlay.
//!
//! A committed layer is a Nix layer when its labels say so
//! (`containerd.io/snapshot/nix-closure` naming a closure-info store path, or
//! the legacy `nix-layer` + `nix-store-path.<i>`), or, when containerd passed
//! no labels (`ctr images import`), when its only content under `nix/store/`
//! is empty mountpoints named like store paths: the image format's Nix layer.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::db::{Ancestor, NixPath};
use crate::error::{Error, Result};
use crate::image::RootLink;
use crate::nixfmt::StorePath;
use crate::store::Store;
use nix_snapshotter_fuse::{ClosureEntry, Resolver, StoreFs};

pub const LABEL_CLOSURE: &str = "containerd.io/snapshot/nix-closure";
pub const LABEL_LAYER: &str = "containerd.io/snapshot/nix-layer";
pub const LABEL_PATH_PREFIX: &str = "containerd.io/snapshot/nix-store-path.";
/// Ours: a JSON list of the image's copyToRoot store paths. Its presence says
/// the layer is exactly the closure's mountpoints plus those paths' links,
/// so the layer can be made without fetching it (the remote-snapshot
/// shortcut). Images without it (the Go project's) are fetched and applied.
pub const LABEL_COPY_TO_ROOT: &str = "containerd.io/snapshot/nix-copy-to-root";

/// A Nix layer made from its labels alone.
pub struct RemoteLayer {
    pub closure: Vec<NixPath>,
    /// What copyToRoot puts under `/`.
    pub links: BTreeMap<String, RootLink>,
}

/// The store, once the daemon has opened it (it opens in the background so
/// an unreachable cache never delays serving).
pub type StoreSlot = Arc<OnceLock<Arc<Store>>>;

/// Fetches through the store for the FUSE filesystem, within a time bound.
pub struct StoreResolver {
    pub store: StoreSlot,
    pub rt: tokio::runtime::Handle,
    pub timeout: Duration,
}

impl Resolver for StoreResolver {
    fn resolve(&self, base_name: &str) -> std::result::Result<PathBuf, String> {
        let path = StorePath::from_base_name(base_name).map_err(|e| e.to_string())?;
        let store = self.store.get().ok_or("the local store is not open (yet)")?;
        if let Some(loc) = store.local(&path) {
            return Ok(loc.path().to_path_buf());
        }
        let store = store.clone();
        let fetch = async move { store.ensure(&path).await.map(|l| l.path().to_path_buf()) };
        match self
            .rt
            .block_on(async { tokio::time::timeout(self.timeout, fetch).await })
        {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("fetching {base_name} took longer than {:?}", self.timeout)),
        }
    }

    fn is_dir(&self, base_name: &str) -> Option<bool> {
        let path = StorePath::from_base_name(base_name).ok()?;
        let store = self.store.get()?.clone();
        self.rt
            .block_on(async { tokio::time::timeout(self.timeout, store.listed_is_dir(&path)).await })
            .ok()
            .flatten()
    }
}

/// Everything the snapshotter needs for Nix layers.
pub struct NixSupport {
    pub fs: StoreFs,
    pub store: StoreSlot,
    pub rt: tokio::runtime::Handle,
    pub timeout: Duration,
}

impl NixSupport {
    /// Decides whether the layer being committed (its upper directory and
    /// labels) is a Nix layer, and if so returns its closure.
    pub fn detect(&self, upper: &Path, labels: &BTreeMap<String, String>) -> Result<Option<Vec<NixPath>>> {
        match self.closure_from_labels(labels) {
            Some(Ok(c)) => Ok(Some(c)),
            // The layer's own mountpoints list the same closure.
            Some(Err(e)) => match mountpoints(upper) {
                Some(c) => {
                    tracing::warn!(error = %e, "Nix layer labels unusable; using the layer's mountpoints");
                    Ok(Some(c))
                }
                None => Err(e),
            },
            None => Ok(mountpoints(upper)),
        }
    }

    /// The closure the labels name, or None when they do not name one.
    fn closure_from_labels(&self, labels: &BTreeMap<String, String>) -> Option<Result<Vec<NixPath>>> {
        if let Some(info) = labels.get(LABEL_CLOSURE) {
            return Some(self.closure_info(info));
        }
        if labels.get(LABEL_LAYER).is_some_and(|v| v == "true") {
            let paths: Result<Vec<NixPath>> = labels
                .iter()
                .filter(|(k, _)| k.starts_with(LABEL_PATH_PREFIX))
                .map(|(_, v)| {
                    let p = StorePath::parse(v)
                        .map_err(|e| Error::InvalidArgument(format!("label {LABEL_PATH_PREFIX}*: {e}")))?;
                    Ok(NixPath {
                        name: p.base_name().to_string(),
                        dir: None,
                    })
                })
                .collect();
            return Some(paths);
        }
        None
    }

    /// For the remote-snapshot shortcut: the layer, when its labels say what
    /// it holds (closure labels plus [`LABEL_COPY_TO_ROOT`]). The copyToRoot
    /// paths are fetched to list them. None (the layer is then fetched and
    /// applied as usual, with a warning) when the labels do not determine
    /// it or what they name cannot be fetched now; an error only when the
    /// marker label itself is malformed.
    pub fn remote_layer(&self, labels: &BTreeMap<String, String>) -> Result<Option<RemoteLayer>> {
        let Some(raw) = labels.get(LABEL_COPY_TO_ROOT) else {
            return Ok(None);
        };
        let bad = |m: String| Error::InvalidArgument(format!("label {LABEL_COPY_TO_ROOT}={raw:?}: {m}"));
        let roots: Vec<String> =
            serde_json::from_str(raw).map_err(|e| bad(format!("expected a JSON list of store paths: {e}")))?;
        let roots: Vec<StorePath> = roots
            .iter()
            .map(|r| StorePath::parse(r).map_err(|e| bad(e.to_string())))
            .collect::<Result<_>>()?;
        let closure = match self.closure_from_labels(labels) {
            Some(Ok(c)) => c,
            None => return Err(bad("no nix-closure or nix-layer label says which closure".into())),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "cannot read the closure now; the Nix layer will be fetched");
                return Ok(None);
            }
        };
        let resolver = self.resolver();
        let mut links = BTreeMap::new();
        for root in &roots {
            if !closure.iter().any(|p| p.name == root.base_name()) {
                return Err(bad(format!("{} is not in the closure", root.absolute())));
            }
            let listed = resolver.resolve(root.base_name()).and_then(|dir| {
                crate::image::add_root_links(&dir, &root.absolute(), &mut links).map_err(|e| e.to_string())
            });
            if let Err(e) = listed {
                tracing::warn!(path = %root.absolute(), error = %e, "cannot list a copyToRoot path now; the Nix layer will be fetched");
                return Ok(None);
            }
        }
        Ok(Some(RemoteLayer { closure, links }))
    }

    fn resolver(&self) -> StoreResolver {
        StoreResolver {
            store: self.store.clone(),
            rt: self.rt.clone(),
            timeout: self.timeout,
        }
    }

    /// Reads `store-paths` of a closure-info store path, fetched through the store.
    fn closure_info(&self, path: &str) -> Result<Vec<NixPath>> {
        let bad = |m: String| Error::InvalidArgument(format!("label {LABEL_CLOSURE}={path:?}: {m}"));
        let sp = StorePath::parse(path).map_err(|e| bad(e.to_string()))?;
        let dir = self.resolver().resolve(sp.base_name()).map_err(bad)?;
        let text = std::fs::read_to_string(dir.join("store-paths")).map_err(|e| bad(format!("store-paths: {e}")))?;
        text.lines()
            .filter(|l| !l.is_empty())
            .map(|l| {
                let p = StorePath::parse(l.trim()).map_err(|e| bad(e.to_string()))?;
                Ok(NixPath {
                    name: p.base_name().to_string(),
                    dir: None,
                })
            })
            .collect()
    }

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
        self.fs
            .add_view(&name, &entries)
            .map(Some)
            .map_err(|e| Error::Database(e.to_string()))
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

/// Makes copyToRoot's directories and symlinks under `fs_dir`, as applying
/// the layer would (its mountpoints are not needed: the FUSE view is above).
pub fn materialize(fs_dir: &Path, links: &BTreeMap<String, RootLink>) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    // Sorted, so every directory comes before what it holds.
    for (rel, link) in links {
        let path = fs_dir.join(rel);
        let dir = match link {
            RootLink::Dir => path.as_path(),
            RootLink::Symlink(_) => path.parent().unwrap_or(fs_dir),
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(Error::io("cannot create", dir))?;
        if let RootLink::Symlink(target) = link {
            std::os::unix::fs::symlink(target, &path).map_err(Error::io("cannot create symlink", &path))?;
        }
    }
    Ok(())
}

/// The closure of an image-format Nix layer: `nix/store/` holds only empty
/// directories and empty files named like store paths (anything else may sit
/// beside `nix/`, such as copyToRoot symlinks). None if it is not one.
pub fn mountpoints(upper: &Path) -> Option<Vec<NixPath>> {
    let store = upper.join("nix/store");
    let entries = std::fs::read_dir(&store).ok()?;
    // `nix/` must hold nothing but `store/`.
    if std::fs::read_dir(upper.join("nix")).ok()?.count() != 1 {
        return None;
    }
    let mut out = BTreeSet::new();
    for e in entries {
        let e = e.ok()?;
        let name = e.file_name().into_string().ok()?;
        StorePath::from_base_name(&name).ok()?;
        let meta = std::fs::symlink_metadata(e.path()).ok()?;
        let dir = if meta.is_dir() {
            if std::fs::read_dir(e.path()).ok()?.next().is_some() {
                return None; // real content: an ordinary layer that happens to have /nix/store
            }
            true
        } else if meta.is_file() && meta.len() == 0 {
            false
        } else {
            return None;
        };
        out.insert((name, dir));
    }
    if out.is_empty() {
        return None;
    }
    Some(
        out.into_iter()
            .map(|(name, dir)| NixPath { name, dir: Some(dir) })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_mountpoint_layers_only() {
        let t = tempfile::tempdir().unwrap();
        let up = t.path();
        assert!(mountpoints(up).is_none());
        std::fs::create_dir_all(up.join("nix/store/7h7qgvs4kgzsn8a6rb274saxyqh4jxlz-hello")).unwrap();
        std::fs::write(up.join("nix/store/syd87l2rxw8cbsxmxl853h0r6pdwhw1a-config.json"), b"").unwrap();
        std::fs::create_dir_all(up.join("bin")).unwrap();
        std::os::unix::fs::symlink(
            "/nix/store/7h7qgvs4kgzsn8a6rb274saxyqh4jxlz-hello/bin/hello",
            up.join("bin/hello"),
        )
        .unwrap();
        let c = mountpoints(up).unwrap();
        assert_eq!(c.len(), 2);
        assert!(c.iter().any(|p| p.name.ends_with("-hello") && p.dir == Some(true)));
        assert!(c
            .iter()
            .any(|p| p.name.ends_with("-config.json") && p.dir == Some(false)));
        // Real content under a store path: not a Nix layer.
        std::fs::write(up.join("nix/store/7h7qgvs4kgzsn8a6rb274saxyqh4jxlz-hello/x"), b"x").unwrap();
        assert!(mountpoints(up).is_none());
        std::fs::remove_file(up.join("nix/store/7h7qgvs4kgzsn8a6rb274saxyqh4jxlz-hello/x")).unwrap();
        // A name that is not a store path: not a Nix layer.
        std::fs::create_dir_all(up.join("nix/store/not-a-store-path")).unwrap();
        assert!(mountpoints(up).is_none());
    }
}
