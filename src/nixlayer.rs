//! The image format's Nix layer, as labels say it: the facts both `image`
//! (which writes them) and `snapshots` (which reads them) need. Depends on
//! neither.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::BorrowedFd;
use std::path::Path;

use nix_snapshotter_fuse::beneath;

/// containerd's limit on one label (key and value together).
pub const MAX_LABEL_SIZE: usize = 4096;

pub const LABEL_CLOSURE: &str = "containerd.io/snapshot/nix-closure";
pub const LABEL_LAYER: &str = "containerd.io/snapshot/nix-layer";
pub const LABEL_PATH_PREFIX: &str = "containerd.io/snapshot/nix-store-path.";
/// Ours: a JSON list of the image's copyToRoot store paths. Its presence says
/// the layer is exactly the closure's mountpoints plus those paths' links,
/// so the layer can be made without fetching it (the remote-snapshot
/// shortcut). Images without it (the Go project's) are fetched and applied.
pub const LABEL_COPY_TO_ROOT: &str = "containerd.io/snapshot/nix-copy-to-root";

/// Ours: a JSON list of the store paths the image's command runs from (the
/// store paths named in its Entrypoint and Cmd). A hint, nothing more: a
/// snapshotter may start fetching their closures when the image is pulled,
/// before the container asks, instead of one library after another. Only
/// paths of the layer's closure are taken, at most [`MAX_ENTRYPOINT_PATHS`].
pub const LABEL_ENTRYPOINT: &str = "containerd.io/snapshot/nix-entrypoint";
pub const MAX_ENTRYPOINT_PATHS: usize = 16;

/// Ours: a store path of the layer's closure holding an access profile
/// (what the image's containers read first, see
/// [`crate::nixfmt::profile`]). A hint: a snapshotter may fetch what it
/// lists, many requests in flight, when the image is pulled.
pub const LABEL_PROFILE: &str = "containerd.io/snapshot/nix-profile";

/// The store paths (`/nix/store/<hash>-<name>`) named anywhere in `args`
/// that `closure` holds (base names), in order of appearance, at most
/// [`MAX_ENTRYPOINT_PATHS`]: what [`LABEL_ENTRYPOINT`] lists.
pub fn entrypoint_paths<'a>(args: impl IntoIterator<Item = &'a str>, closure: &dyn Fn(&str) -> bool) -> Vec<String> {
    const PREFIX: &str = "/nix/store/";
    let mut out: Vec<String> = Vec::new();
    for arg in args {
        let mut rest = arg;
        while let Some(i) = rest.find(PREFIX) {
            let after = &rest[i + PREFIX.len()..];
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || "+-._?=".contains(c)))
                .unwrap_or(after.len());
            let base = &after[..end];
            if closure(base) && !out.iter().any(|p| p[PREFIX.len()..] == *base) && out.len() < MAX_ENTRYPOINT_PATHS {
                out.push(format!("{PREFIX}{base}"));
            }
            rest = &after[end..];
        }
    }
    out
}

/// The labels that determine a Nix layer's whole content, when they do
/// (the copyToRoot marker is there): closure and copyToRoot. Two layers
/// with the same are the same layer, whoever asked for them.
pub fn content_labels(labels: &BTreeMap<String, String>) -> Option<BTreeMap<&str, &str>> {
    labels.get(LABEL_COPY_TO_ROOT)?;
    Some(
        labels
            .iter()
            .filter(|(k, _)| {
                k.as_str() == LABEL_COPY_TO_ROOT
                    || k.as_str() == LABEL_CLOSURE
                    || k.as_str() == LABEL_LAYER
                    || k.starts_with(LABEL_PATH_PREFIX)
            })
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect(),
    )
}

/// Whether a committed snapshot (key `their_key`, labels `theirs`,
/// `made_from_labels` when the snapshotter made it itself from verified
/// store content rather than a client applying it) may stand in for the
/// layer a Prepare under `key` with labels `ours` asks for by chain ID.
/// Within one containerd namespace, yes: containerd itself trusts chain IDs
/// there. Across namespaces only for a Nix layer we made from labels that
/// say the same as the ones asked for: content a client applied (labels and
/// all, which any client can set) is not ours to vouch for, and one client
/// that skipped the diff_id check must not poison every namespace.
pub fn may_share(
    their_key: &str,
    theirs: &BTreeMap<String, String>,
    made_from_labels: bool,
    key: &str,
    ours: &BTreeMap<String, String>,
) -> bool {
    let namespace = |k: &str| k.split('/').next().unwrap_or_default().to_string();
    if namespace(their_key) == namespace(key) {
        return true;
    }
    made_from_labels && matches!((content_labels(theirs), content_labels(ours)), (Some(a), Some(b)) if a == b)
}

/// What copyToRoot puts at one path relative to `/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootLink {
    /// A directory of a copyToRoot path (0755), merged across paths.
    Dir,
    /// A symlink to the store file (or store symlink) of the same relative path.
    Symlink(String),
}

/// copyToRoot as the Go project does it: every directory of the store path
/// `base` (an entry of the store directory `holder`, read beneath it without
/// following symlinks) becomes a directory of `/`, and everything else a
/// symlink `/<rel>` -> `/nix/store/<base>/<rel>`. A later path wins a
/// conflict: its symlink replaces an earlier directory with all it held,
/// its directory replaces an earlier symlink. So every entry's parents are
/// directories of the map, and nothing is ever made through a symlink.
pub fn add_root_links(holder: BorrowedFd<'_>, base: &str, out: &mut BTreeMap<String, RootLink>) -> io::Result<()> {
    let st = beneath::lstat(holder, Path::new(base))?;
    if beneath::Kind::of(&st) != beneath::Kind::Dir {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a copyToRoot path must be a directory",
        ));
    }
    let mut budget = MAX_ROOT_LINKS;
    link_tree(holder, base, Path::new(""), beneath::Kind::Dir, out, &mut budget)
}

/// Most entries one image's copyToRoot trees may have (a bound on what an
/// untrusted store path can make us hold).
const MAX_ROOT_LINKS: usize = 1_000_000;

fn link_tree(
    holder: BorrowedFd<'_>,
    base: &str,
    rel: &Path,
    kind: beneath::Kind,
    out: &mut BTreeMap<String, RootLink>,
    budget: &mut usize,
) -> io::Result<()> {
    *budget = budget
        .checked_sub(1)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "too many copyToRoot entries"))?;
    let key = rel.to_string_lossy().into_owned();
    if kind != beneath::Kind::Dir {
        // Whatever an earlier path had here, with all it held, gives way.
        let below = format!("{key}/");
        let gone: Vec<String> = out
            .range(below.clone()..)
            .take_while(|(k, _)| k.starts_with(&below))
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            out.remove(&k);
        }
        out.insert(key, RootLink::Symlink(format!("/nix/store/{base}/{}", rel.display())));
        return Ok(());
    }
    if !key.is_empty() {
        out.insert(key, RootLink::Dir);
    }
    let here = Path::new(base).join(rel);
    let names = beneath::entries(beneath::open_dir(holder, &here)?)?;
    for (n, k) in names {
        link_tree(holder, base, &rel.join(n), k, out, budget)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn the_entrypoint_hint_lists_closure_paths_named_in_the_command_once_and_boundedly() {
        let py = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-python3";
        let sh = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-busybox";
        let closure = |b: &str| b == py || b == sh;
        let script = format!("/nix/store/{py}/bin/python3 -c 'x'; /nix/store/{py}/bin/x /nix/store/cccccccccccccccccccccccccccccccc-other");
        let args = [format!("/nix/store/{sh}/bin/sh"), "-c".to_string(), script];
        assert_eq!(
            entrypoint_paths(args.iter().map(String::as_str), &closure),
            [format!("/nix/store/{sh}"), format!("/nix/store/{py}")]
        );
        // Plain commands (copyToRoot links) name none.
        assert!(entrypoint_paths(["/bin/hello"], &closure).is_empty());
        // At most MAX_ENTRYPOINT_PATHS, whatever the command says.
        let many: Vec<String> = (0..100).map(|i| format!("/nix/store/{i:032}-p")).collect();
        let all = |_: &str| true;
        assert_eq!(
            entrypoint_paths(many.iter().map(String::as_str), &all).len(),
            MAX_ENTRYPOINT_PATHS
        );
    }

    #[test]
    fn copy_to_root_conflicts_resolve_one_way_and_never_through_a_symlink() {
        let t = tempfile::tempdir().unwrap();
        let store = t.path();
        let (a, b) = (
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-a",
            "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-b",
        );
        // a has a directory `bin` with a file; b has `bin -> /` and `etc` a dir.
        std::fs::create_dir_all(store.join(a).join("bin")).unwrap();
        std::fs::write(store.join(a).join("bin/x"), b"x").unwrap();
        std::fs::create_dir_all(store.join(b).join("etc")).unwrap();
        std::os::unix::fs::symlink("/", store.join(b).join("bin")).unwrap();
        let fd = beneath::root(store).unwrap();
        use std::os::fd::AsFd;
        let mut links = BTreeMap::new();
        add_root_links(fd.as_fd(), a, &mut links).unwrap();
        add_root_links(fd.as_fd(), b, &mut links).unwrap();
        // The later symlink replaced the directory and all it held.
        assert_eq!(
            links.get("bin"),
            Some(&RootLink::Symlink(format!("/nix/store/{b}/bin")))
        );
        assert!(!links.contains_key("bin/x"), "{links:?}");
        assert_eq!(links.get("etc"), Some(&RootLink::Dir));
        // The other way round: the later directory replaces the symlink.
        let mut links = BTreeMap::new();
        add_root_links(fd.as_fd(), b, &mut links).unwrap();
        add_root_links(fd.as_fd(), a, &mut links).unwrap();
        assert_eq!(links.get("bin"), Some(&RootLink::Dir));
        assert_eq!(
            links.get("bin/x"),
            Some(&RootLink::Symlink(format!("/nix/store/{a}/bin/x")))
        );
        // Every entry's parents are directories of the map.
        for k in links.keys() {
            let mut p = Path::new(k).parent();
            while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
                assert_eq!(links.get(d.to_str().unwrap()), Some(&RootLink::Dir), "{k}");
                p = d.parent();
            }
        }
        // A copyToRoot path must be a directory, and is never followed.
        assert!(add_root_links(fd.as_fd(), &format!("{b}/bin"), &mut links).is_err());
    }

    #[test]
    fn layers_are_shared_across_namespaces_only_when_made_from_the_same_labels() {
        let plain = labels(&[("containerd.io/snapshot.ref", "sha256:c")]);
        assert!(may_share("a/1/x", &plain, false, "a/7/y", &plain));
        assert!(!may_share("a/1/x", &plain, false, "b/7/y", &plain));
        let nix = labels(&[(LABEL_CLOSURE, "/nix/store/x-closure-info"), (LABEL_COPY_TO_ROOT, "[]")]);
        assert!(may_share("a/1/x", &nix, true, "b/7/y", &nix));
        // The same labels on content a client applied: not shared.
        assert!(!may_share("a/1/x", &nix, false, "b/7/y", &nix));
        let other = labels(&[(LABEL_CLOSURE, "/nix/store/y-closure-info"), (LABEL_COPY_TO_ROOT, "[]")]);
        assert!(!may_share("a/1/x", &nix, true, "b/7/y", &other));
        // Unmarked Nix layers are never made from labels.
        let unmarked = labels(&[(LABEL_CLOSURE, "/nix/store/x-closure-info")]);
        assert!(!may_share("a/1/x", &unmarked, true, "b/7/y", &unmarked));
    }
}
