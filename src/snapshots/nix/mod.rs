//! Nix layers: recognising them, and giving the snapshots above them a FUSE
//! view of their closure as the top-most lower directory of their overlay.
//!
//! A committed layer is a Nix layer when its labels say so
//! (`containerd.io/snapshot/nix-closure` naming a closure-info store path, or
//! the legacy `nix-layer` + `nix-store-path.<i>`), or, when containerd passed
//! no labels (`ctr images import`), when its only content under `nix/store/`
//! is empty mountpoints named like store paths: the image format's Nix layer.
//!
//! Here: deciding from labels (this file); `resolver` (the only blocking
//! network calls), `views` (FUSE views and pins), `tree` (a layer's
//! directory on the host, read and made beneath its fd).

mod resolver;
mod tree;
mod views;

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::Duration;

use super::db::NixPath;
use crate::error::{Error, Result};
use crate::nixfmt::StorePath;
use crate::nixlayer::RootLink;
use nix_snapshotter_fuse::{beneath, Resolver, StoreFs};

pub use crate::nixlayer::{
    LABEL_CLOSURE, LABEL_COPY_TO_ROOT, LABEL_ENTRYPOINT, LABEL_LAYER, LABEL_PATH_PREFIX, LABEL_PROFILE,
    MAX_ENTRYPOINT_PATHS,
};
pub use resolver::{StoreResolver, StoreSlot};
pub use tree::{materialize, mountpoints};

/// Largest closure-info `store-paths` we read: a line per path, so about
/// 100,000 paths; far beyond any real closure.
const MAX_CLOSURE_INFO: u64 = 8 << 20;

/// A Nix layer made from its labels alone.
pub struct RemoteLayer {
    pub closure: Vec<NixPath>,
    /// What copyToRoot puts under `/`.
    pub links: BTreeMap<String, RootLink>,
    /// The store paths the image's command runs from (a hint).
    pub entrypoint: Vec<StorePath>,
    /// An access profile of the image (a hint).
    pub profile: Option<StorePath>,
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
        if labels.contains_key(LABEL_CLOSURE) {
            self.start_hint_fetches(labels);
        }
        let closure = match self.closure_from_labels(labels) {
            Some(Ok(c)) => c,
            None => return Err(bad("no nix-closure or nix-layer label says which closure".into())),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "cannot read the closure now; the Nix layer will be fetched");
                return Ok(None);
            }
        };
        let entrypoint = entrypoint_hint(labels, Some(&closure))?;
        let profile = profile_hint(labels, Some(&closure))?;
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
        Ok(Some(RemoteLayer {
            closure,
            links,
            entrypoint,
            profile,
        }))
    }

    /// Starts fetching, in the background, the closures of the store paths
    /// a pulled image's command runs from (see
    /// [`Store::prefetch_closure`](crate::store::Store::prefetch_closure)).
    pub fn prefetch(&self, layer: &RemoteLayer) {
        let Some(store) = self.store.get().cloned() else {
            return;
        };
        let within = layer
            .closure
            .iter()
            .filter_map(|p| StorePath::from_base_name(&p.name).ok())
            .collect();
        // A profile says what the containers read: it replaces fetching
        // the command's closures whole.
        if let (Some(profile), true) = (&layer.profile, store.prefetches_profiles()) {
            // The command's own paths are read first and their indexes are
            // the largest: asked for while the profile itself comes.
            for p in layer.entrypoint.clone() {
                let store = store.clone();
                self.rt.spawn(async move { store.indexed(&p).await });
            }
            let profile = profile.clone();
            self.rt
                .spawn(async move { store.prefetch_profile(profile, within).await });
            return;
        }
        if layer.entrypoint.is_empty() {
            return;
        }
        let roots = layer.entrypoint.clone();
        self.rt
            .spawn(async move { store.prefetch_closure(roots, within).await });
    }

    /// With a closure-info label the closure is known only once that path
    /// is fetched: two round trips on a cold node. The first round trips
    /// of the prefetch need not wait for it, so they start now: with a
    /// profile, the profile (a narinfo, then its NAR only if that is no
    /// bigger than a profile can be) and the entrypoint paths' indexes;
    /// otherwise the entrypoint paths' narinfos. That is at most
    /// 1 + [`MAX_ENTRYPOINT_PATHS`] signed paths' metadata and one small
    /// path, whatever the image; nothing when a hint label is malformed
    /// (the pull fails on it). Whether the hints are in the closure is
    /// checked, as before, before [`Self::prefetch`] uses them.
    fn start_hint_fetches(&self, labels: &BTreeMap<String, String>) {
        let Some(store) = self.store.get().cloned() else {
            return;
        };
        // Parsed as they will be checked, the closure aside.
        let (Ok(entrypoint), Ok(profile)) = (entrypoint_hint(labels, None), profile_hint(labels, None)) else {
            return;
        };
        match profile {
            Some(profile) if store.prefetches_profiles() => {
                for p in entrypoint {
                    let store = store.clone();
                    self.rt.spawn(async move { store.indexed(&p).await });
                }
                self.rt.spawn(async move {
                    if let Err(e) = store.fetch_profile(&profile).await {
                        tracing::debug!(profile = %profile, error = %e, "early fetch of the access profile");
                    }
                });
            }
            _ if store.prefetches_entrypoint() && !entrypoint.is_empty() => {
                self.rt.spawn(async move { store.prefetch_narinfos(entrypoint).await });
            }
            _ => {}
        }
    }

    fn resolver(&self) -> StoreResolver {
        StoreResolver {
            store: self.store.clone(),
            rt: self.rt.clone(),
            timeout: self.timeout,
            // Not a FUSE request's wait: not counted.
            waited: std::sync::Arc::default(),
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
}

/// Whether `p` is in `closure`; anything is while the closure is not yet
/// known (None).
fn in_closure(closure: Option<&[NixPath]>, p: &StorePath) -> bool {
    closure.is_none_or(|c| c.iter().any(|n| n.name == p.base_name()))
}

/// The [`LABEL_PROFILE`] hint of a layer: one store path of its closure;
/// anything else is an error naming the label. With no closure (None),
/// only parsed.
fn profile_hint(labels: &BTreeMap<String, String>, closure: Option<&[NixPath]>) -> Result<Option<StorePath>> {
    let Some(raw) = labels.get(LABEL_PROFILE) else {
        return Ok(None);
    };
    let bad = |m: String| Error::InvalidArgument(format!("label {LABEL_PROFILE}={raw:?}: {m}"));
    let p = StorePath::parse(raw).map_err(|e| bad(e.to_string()))?;
    if !in_closure(closure, &p) {
        return Err(bad(format!("{raw} is not in the closure")));
    }
    Ok(Some(p))
}

/// The [`LABEL_ENTRYPOINT`] hint of a layer: store paths of its closure, at
/// most [`MAX_ENTRYPOINT_PATHS`]; anything else in it is an error naming
/// the label (a hint may be absent, not wrong). With no closure (None),
/// only parsed and bounded.
fn entrypoint_hint(labels: &BTreeMap<String, String>, closure: Option<&[NixPath]>) -> Result<Vec<StorePath>> {
    let Some(raw) = labels.get(LABEL_ENTRYPOINT) else {
        return Ok(Vec::new());
    };
    let bad = |m: String| Error::InvalidArgument(format!("label {LABEL_ENTRYPOINT}={raw:?}: {m}"));
    let list: Vec<String> =
        serde_json::from_str(raw).map_err(|e| bad(format!("expected a JSON list of store paths: {e}")))?;
    if list.len() > MAX_ENTRYPOINT_PATHS {
        return Err(bad(format!("more than {MAX_ENTRYPOINT_PATHS} store paths")));
    }
    list.iter()
        .map(|s| {
            let p = StorePath::parse(s).map_err(|e| bad(e.to_string()))?;
            if !in_closure(closure, &p) {
                return Err(bad(format!("{s} is not in the closure")));
            }
            Ok(p)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entrypoint_hint_is_a_bounded_list_of_closure_paths_or_an_error_naming_it() {
        let inside = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-python3";
        let closure = vec![NixPath {
            name: inside.into(),
            dir: Some(true),
        }];
        let hint = |v: &str| entrypoint_hint(&[(LABEL_ENTRYPOINT.to_string(), v.to_string())].into(), Some(&closure));
        assert_eq!(
            hint(&format!("[\"/nix/store/{inside}\"]")).unwrap(),
            [StorePath::from_base_name(inside).unwrap()]
        );
        assert!(entrypoint_hint(&BTreeMap::new(), Some(&closure)).unwrap().is_empty());
        for (bad, says) in [
            ("/nix/store/x", "expected a JSON list"),
            ("[\"/etc/passwd\"]", "/etc/passwd"),
            (
                "[\"/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-x\"]",
                "not in the closure",
            ),
        ] {
            let e = hint(bad).unwrap_err().to_string();
            assert!(e.contains(LABEL_ENTRYPOINT) && e.contains(says), "{bad}: {e}");
        }
        let many = serde_json::to_string(&vec![format!("/nix/store/{inside}"); MAX_ENTRYPOINT_PATHS + 1]).unwrap();
        assert!(hint(&many).unwrap_err().to_string().contains("more than"));
    }
}
