//! A Nix layer's directory on the host: reading an untrusted one (its
//! mountpoints) and making one (copyToRoot's tree), both beneath the
//! layer's directory fd, never through a symlink.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsFd;
use std::path::Path;

use super::super::db::NixPath;
use crate::error::{Error, Result};
use crate::nixfmt::StorePath;
use crate::nixlayer::RootLink;
use nix_snapshotter_fuse::beneath;

/// Makes copyToRoot's directories and symlinks under `fs_dir`, as applying
/// the layer would (its mountpoints are not needed: the FUSE view is above).
/// Everything is made beneath `fs_dir`'s fd: a symlink the map holds is
/// never followed, so nothing lands outside, whatever the map says.
pub fn materialize(fs_dir: &Path, links: &BTreeMap<String, RootLink>) -> Result<()> {
    let root = beneath::root(fs_dir).map_err(Error::io("cannot open", fs_dir))?;
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
    // The layer is untrusted: read it beneath its directory, never through
    // a symlink (a `nix -> /` must not make us list the host).
    let root = beneath::root(upper).ok()?;
    let root = root.as_fd();
    let list = |p: &str| beneath::entries(beneath::open_dir(root, Path::new(p)).ok()?).ok();
    // `nix/` must hold nothing but `store/`.
    if list("nix")? != [("store".into(), beneath::Kind::Dir)] {
        return None;
    }
    let mut out = BTreeSet::new();
    for (name, kind) in list("nix/store")? {
        let name = name.into_string().ok()?;
        StorePath::from_base_name(&name).ok()?;
        let rel = format!("nix/store/{name}");
        let dir = match kind {
            beneath::Kind::Dir => {
                if !list(&rel)?.is_empty() {
                    return None; // real content: an ordinary layer that happens to have /nix/store
                }
                true
            }
            beneath::Kind::File if beneath::lstat(root, Path::new(&rel)).ok()?.st_size == 0 => false,
            _ => return None,
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
