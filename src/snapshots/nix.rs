//! Nix layers: recognising them, and giving the snapshots above them a FUSE
//! view of their closure as the top-most lower directory of their overlay.
//!
//! A committed layer is a Nix layer when its labels say so
//! (`containerd.io/snapshot/nix-closure` naming a closure-info store path, or
//! the legacy `nix-layer` + `nix-store-path.<i>`), or, when containerd passed
//! no labels (`ctr images import`), when its only content under `nix/store/`
//! is empty mountpoints named like store paths: the image format's Nix layer.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::db::{Ancestor, NixPath};
use crate::error::{Error, Result};
use crate::nixfmt::StorePath;
use crate::nixlayer::RootLink;
use crate::store::Store;
use nix_snapshotter_fuse::{beneath, ClosureEntry, Resolver, StoreDir, StoreFs};

pub use crate::nixlayer::{LABEL_CLOSURE, LABEL_COPY_TO_ROOT, LABEL_LAYER, LABEL_PATH_PREFIX};

/// Largest closure-info `store-paths` we read: a line per path, so about
/// 100,000 paths; far beyond any real closure.
const MAX_CLOSURE_INFO: u64 = 8 << 20;

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
    fn resolve(&self, base_name: &str) -> std::result::Result<StoreDir, String> {
        let path = StorePath::from_base_name(base_name).map_err(|e| e.to_string())?;
        let store = self.store.get().ok_or("the local store is not open (yet)")?;
        if let Some(loc) = store.local(&path) {
            return Ok(store.holder(&loc));
        }
        let fetching = store.clone();
        let fetch = async move { fetching.ensure(&path).await };
        // Waiting stops at the time bound; the download goes on, and a
        // later access finds it done (or still under way).
        match self
            .rt
            .block_on(async { tokio::time::timeout(self.timeout, fetch).await })
        {
            Ok(Ok(loc)) => Ok(store.holder(&loc)),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "fetching {base_name} takes longer than {:?} (still downloading)",
                self.timeout
            )),
        }
    }

    fn local(&self, base_name: &str) -> Option<StoreDir> {
        let path = StorePath::from_base_name(base_name).ok()?;
        let store = self.store.get()?;
        store.local(&path).map(|loc| store.holder(&loc))
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
            let listed = resolver.resolve(root.base_name()).and_then(|holder| {
                crate::nixlayer::add_root_links(holder.as_fd(), root.base_name(), &mut links).map_err(|e| e.to_string())
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
        // Not the label's fault when the cache cannot deliver it now.
        let holder = self
            .resolver()
            .resolve(sp.base_name())
            .map_err(|e| Error::Unavailable(format!("label {LABEL_CLOSURE}={path:?}: {e}")))?;
        let file = Path::new(sp.base_name()).join("store-paths");
        let bytes = beneath::read_file(holder.as_fd(), &file, MAX_CLOSURE_INFO)
            .map_err(|e| bad(format!("store-paths: {e}")))?;
        let text = String::from_utf8(bytes).map_err(|_| bad("store-paths: not UTF-8".into()))?;
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

/// Makes copyToRoot's directories and symlinks under `fs_dir`, as applying
/// the layer would (its mountpoints are not needed: the FUSE view is above).
/// Everything is made beneath `fs_dir`'s fd: a symlink the map holds is
/// never followed, so nothing lands outside, whatever the map says.
pub fn materialize(fs_dir: &Path, links: &BTreeMap<String, RootLink>) -> Result<()> {
    let root = rustix::fs::open(
        fs_dir,
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| Error::io("cannot open", fs_dir)(e.into()))?;
    // Sorted, so every directory comes before what it holds.
    for (rel, link) in links {
        let path = Path::new(rel);
        let made = match link {
            RootLink::Dir => beneath::mkdir(root.as_fd(), path, 0o755),
            RootLink::Symlink(target) => beneath::symlink(root.as_fd(), path, Path::new(target)),
        };
        made.map_err(|e| Error::io("cannot create", &fs_dir.join(rel))(e))?;
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
    fn materialize_never_creates_through_a_symlink() {
        let t = tempfile::tempdir().unwrap();
        let fs_dir = t.path().join("fs");
        std::fs::create_dir(&fs_dir).unwrap();
        let outside = t.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        // A map no walk makes, as a hostile one would be: a symlink out,
        // then entries below it.
        let links = BTreeMap::from([
            ("bin".to_string(), RootLink::Symlink(outside.display().to_string())),
            ("bin/x".to_string(), RootLink::Symlink("/nix/store/x".into())),
        ]);
        assert!(materialize(&fs_dir, &links).is_err());
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0, "created outside");
        let links = BTreeMap::from([("bin/y".to_string(), RootLink::Dir)]);
        let fresh = t.path().join("fresh");
        std::fs::create_dir(&fresh).unwrap();
        // A parent the map does not make is not made on the fly either.
        assert!(materialize(&fresh, &links).is_err());
    }

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
