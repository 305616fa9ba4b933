//! The FUSE filesystem mounted for real (needs root and /dev/fuse), with a
//! resolver that serves store paths from a local directory.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use nix_snapshotter_fuse::{ClosureEntry, MountConfig, Resolver, StoreFs};

const A: &str = "7h7qgvs4kgzsn8a6rb274saxyqh4jxlz-a";

/// Serves `<dir>/<base name>`, counting resolutions.
struct DirResolver {
    dir: PathBuf,
    calls: AtomicUsize,
}

impl Resolver for DirResolver {
    fn resolve(&self, base_name: &str) -> Result<PathBuf, String> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(self.dir.join(base_name))
    }
}

/// Unmounts even when the test fails.
struct Mounted(Option<StoreFs>);

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(fs) = self.0.take() {
            let _ = fs.unmount();
        }
    }
}

fn setup(tmp: &Path) -> (Mounted, Arc<DirResolver>) {
    let store = tmp.join("store");
    std::fs::create_dir_all(store.join(A)).unwrap();
    std::fs::write(store.join(A).join("file"), b"content\n").unwrap();
    let mnt = tmp.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let resolver = Arc::new(DirResolver {
        dir: store,
        calls: AtomicUsize::new(0),
    });
    let cfg = MountConfig {
        threads: 2,
        passthrough: true,
    };
    let fs = StoreFs::mount(&mnt, resolver.clone(), &cfg).expect("mounting needs root and /dev/fuse");
    (Mounted(Some(fs)), resolver)
}

fn closure() -> Vec<ClosureEntry> {
    vec![ClosureEntry {
        base_name: A.into(),
        is_dir: Some(true),
    }]
}

#[test]
fn a_view_dropped_and_added_again_is_whole() {
    // Under /tmp/nst-*, where scripts/test looks for mounts left behind.
    let tmp = tempfile::Builder::new().prefix("nst-fuse-").tempdir_in("/tmp").unwrap();
    let (m, resolver) = setup(tmp.path());
    let fs = m.0.as_ref().unwrap();
    let view = fs.add_view("v", &closure()).unwrap();
    let store = view.join("nix/store");
    // The kernel now caches v, v/nix and v/nix/store.
    assert!(store.is_dir());
    assert_eq!(resolver.calls.load(Ordering::SeqCst), 0, "listing fetched");

    // Looked up while the view is gone: a miss, but not one to remember.
    fs.remove_view("v");
    assert!(std::fs::metadata(store.join(A)).is_err());

    fs.add_view("v", &closure()).unwrap();
    assert_eq!(std::fs::read(store.join(A).join("file")).unwrap(), b"content\n");
    // Names outside the closure stay missing.
    assert!(std::fs::metadata(store.join("00000000000000000000000000000000-b")).is_err());
}
