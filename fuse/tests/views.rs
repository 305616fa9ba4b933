//! The FUSE filesystem mounted for real (needs root and /dev/fuse), with a
//! resolver that serves store paths from a local directory.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix_snapshotter_fuse::{ClosureEntry, MountConfig, Resolver, StoreDir, StoreFs};

const A: &str = "7h7qgvs4kgzsn8a6rb274saxyqh4jxlz-a";

/// Serves `<dir>/<base name>`, counting resolutions; paths named in
/// `stalled` never resolve (a download that hangs).
struct DirResolver {
    dir: PathBuf,
    fd: StoreDir,
    calls: AtomicUsize,
    stalled: Mutex<Vec<String>>,
}

impl Resolver for DirResolver {
    fn resolve(&self, base_name: &str) -> Result<StoreDir, String> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        while self.stalled.lock().unwrap().iter().any(|s| s == base_name) {
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(self.fd.clone())
    }

    fn local(&self, base_name: &str) -> Option<StoreDir> {
        if self.stalled.lock().unwrap().iter().any(|s| s == base_name) {
            return None;
        }
        std::fs::symlink_metadata(self.dir.join(base_name))
            .is_ok()
            .then(|| self.fd.clone())
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
    let fd = std::fs::File::open(&store).unwrap();
    let resolver = Arc::new(DirResolver {
        dir: store,
        fd: Arc::new(fd.into()),
        calls: AtomicUsize::new(0),
        stalled: Mutex::new(Vec::new()),
    });
    let cfg = MountConfig {
        threads: 2,
        ..Default::default()
    };
    let fs = StoreFs::mount(&mnt, resolver.clone(), &cfg).expect("mounting needs root and /dev/fuse");
    (Mounted(Some(fs)), resolver)
}

/// Lets stalled downloads finish when dropped, also when a test fails, so
/// that unmounting does not wait for them forever.
struct Unstall(Arc<DirResolver>);

impl Drop for Unstall {
    fn drop(&mut self) {
        self.0.stalled.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
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

#[test]
fn directories_are_listed_without_opendir_and_the_root_follows_its_views() {
    let tmp = tempfile::Builder::new().prefix("nst-fuse-").tempdir_in("/tmp").unwrap();
    let (m, resolver) = setup(tmp.path());
    let fs = m.0.as_ref().unwrap();
    let mnt = tmp.path().join("mnt");
    let names = |dir: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let count = |op: &str| {
        fs.request_counts()
            .iter()
            .find(|(o, _)| *o == op)
            .map_or(0, |(_, n)| *n)
    };
    assert!(names(&mnt).is_empty());
    let store = fs.add_view("v", &closure()).unwrap().join("nix/store");
    let path = store.join(A);
    // Listing a store path fetches it, as opening it did.
    assert_eq!(names(&path), ["file"]);
    assert!(resolver.calls.load(Ordering::SeqCst) > 0);
    assert_eq!(names(&store), [A]);
    // Listed again: neither opened nor read by us (the kernel keeps the
    // listings of what never changes).
    let (opens, reads) = (count("opendir"), count("readdir"));
    for _ in 0..3 {
        assert_eq!(names(&path), ["file"]);
        assert_eq!(names(&store), [A]);
    }
    // Only the first OPENDIR ever, answered ENOSYS.
    assert_eq!((opens, count("opendir")), (1, 1));
    assert_eq!(count("readdir"), reads);
    assert_eq!(count("releasedir"), 0);
    // The root is the one listing that changes: views come and go.
    let wait_for = |want: &[&str]| {
        let start = std::time::Instant::now();
        while names(&mnt) != want && start.elapsed() < std::time::Duration::from_secs(5) {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(names(&mnt), want);
    };
    wait_for(&["v"]);
    fs.add_view("w", &closure()).unwrap();
    wait_for(&["v", "w"]);
    fs.remove_view("v");
    wait_for(&["w"]);
}

/// Store path names for the tests below (32 hash characters, then a name).
fn base(name: &str, i: usize) -> String {
    format!("{:0>32}-{name}", i)
        .chars()
        .map(|c| if c == '0' { 'a' } else { c })
        .collect()
}

#[test]
fn a_store_path_that_is_a_symlink_to_root_is_shown_as_that_symlink_whatever_the_hint() {
    let tmp = tempfile::Builder::new().prefix("nst-fuse-").tempdir_in("/tmp").unwrap();
    let (m, resolver) = setup(tmp.path());
    let fs = m.0.as_ref().unwrap();
    let _unstall = Unstall(resolver.clone());
    let evil = base("evil", 1);
    let inner = base("inner", 2);
    std::os::unix::fs::symlink("/", resolver.dir.join(&evil)).unwrap();
    std::fs::create_dir(resolver.dir.join(&inner)).unwrap();
    std::os::unix::fs::symlink("/etc", resolver.dir.join(&inner).join("etc")).unwrap();
    // The image's mountpoint lies: it says both are directories.
    let lying = |b: &str| ClosureEntry {
        base_name: b.to_string(),
        is_dir: Some(true),
    };
    resolver.stalled.lock().unwrap().push(evil.clone());
    let view = fs.add_view("v", &[lying(&evil), lying(&inner)]).unwrap();
    let store = view.join("nix/store");
    // Before it is fetched, the hint makes `ls -l` lazy: a directory.
    assert!(std::fs::metadata(store.join(&evil)).unwrap().is_dir());
    resolver.stalled.lock().unwrap().clear();
    // Looking inside the "directory" never serves the host's /etc.
    assert!(std::fs::read(store.join(&evil).join("etc/hostname")).is_err());
    // The verified type wins: it is now the symlink it is (which a reader
    // resolves in its own root: a container's, not the host's).
    let mut shown = None;
    for _ in 0..100 {
        let m = std::fs::symlink_metadata(store.join(&evil)).unwrap();
        if m.file_type().is_symlink() {
            shown = Some(std::fs::read_link(store.join(&evil)).unwrap());
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(shown.as_deref(), Some(std::path::Path::new("/")));
    // A symlink inside a store path is a symlink, not a way out.
    let etc = store.join(&inner).join("etc");
    assert!(std::fs::symlink_metadata(&etc).unwrap().file_type().is_symlink());
    assert_eq!(std::fs::read_link(&etc).unwrap(), std::path::Path::new("/etc"));
}

#[test]
fn thirty_two_stalled_paths_do_not_stop_an_unrelated_one() {
    let tmp = tempfile::Builder::new().prefix("nst-fuse-").tempdir_in("/tmp").unwrap();
    let (m, resolver) = setup(tmp.path());
    let fs = m.0.as_ref().unwrap();
    let _unstall = Unstall(resolver.clone());
    let mut closure = closure();
    for i in 0..32 {
        let b = base("stalled", i + 10);
        std::fs::write(resolver.dir.join(&b), b"never\n").unwrap();
        resolver.stalled.lock().unwrap().push(b.clone());
        closure.push(ClosureEntry {
            base_name: b,
            is_dir: Some(false),
        });
    }
    let view = fs.add_view("v", &closure).unwrap();
    let store = view.join("nix/store");
    let readers: Vec<_> = (0..32)
        .map(|i| {
            let p = store.join(base("stalled", i + 10));
            std::thread::spawn(move || std::fs::read(p))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // Two workers, 32 requests waiting on downloads: the unrelated path is served.
    let (tx, rx) = std::sync::mpsc::channel();
    let p = store.join(A).join("file");
    std::thread::spawn(move || tx.send(std::fs::read(p).map_err(|e| e.to_string())));
    let got = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("an unrelated path was not served while 32 stalled");
    assert_eq!(got.unwrap(), b"content\n");
    resolver.stalled.lock().unwrap().clear();
    for r in readers {
        assert_eq!(r.join().unwrap().unwrap(), b"never\n");
    }
}

#[test]
fn the_inode_table_shrinks_when_the_kernel_forgets() {
    let tmp = tempfile::Builder::new().prefix("nst-fuse-").tempdir_in("/tmp").unwrap();
    let (m, resolver) = setup(tmp.path());
    let fs = m.0.as_ref().unwrap();
    for i in 0..500 {
        std::fs::write(resolver.dir.join(A).join(format!("f{i}")), format!("{i}\n")).unwrap();
    }
    let view = fs.add_view("v", &closure()).unwrap();
    let dir = view.join("nix/store").join(A);
    for i in 0..500 {
        assert!(std::fs::metadata(dir.join(format!("f{i}"))).unwrap().is_file());
    }
    let grown = fs.node_count();
    assert!(grown > 500, "{grown} nodes");
    // The kernel drops unused dentries and inodes, and tells us (FORGET).
    let mut now = grown;
    for _ in 0..50 {
        std::fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        now = fs.node_count();
        if now < 100 {
            break;
        }
    }
    assert!(now < 100, "{grown} nodes, still {now} after the kernel forgot them");
    // Everything is still there, under new node ids.
    assert_eq!(std::fs::read(dir.join("f499")).unwrap(), b"499\n");
    assert_eq!(std::fs::read(dir.join("file")).unwrap(), b"content\n");
}

#[test]
fn without_passthrough_files_open_with_no_round_trip_and_eviction_still_frees_them() {
    let tmp = tempfile::Builder::new().prefix("nst-fuse-").tempdir_in("/tmp").unwrap();
    let store = tmp.path().join("store");
    std::fs::create_dir_all(store.join(A)).unwrap();
    for i in 0..200 {
        std::fs::write(store.join(A).join(format!("f{i}")), format!("{i}\n").repeat(1000)).unwrap();
    }
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let resolver = Arc::new(DirResolver {
        fd: Arc::new(std::fs::File::open(&store).unwrap().into()),
        dir: store.clone(),
        calls: AtomicUsize::new(0),
        stalled: Mutex::new(Vec::new()),
    });
    // What a rootless daemon gets: reads go through us.
    let cfg = MountConfig {
        threads: 2,
        passthrough: false,
        ..Default::default()
    };
    let m = Mounted(Some(StoreFs::mount(&mnt, resolver.clone(), &cfg).unwrap()));
    let fs = m.0.as_ref().unwrap();
    let dir = fs.add_view("v", &closure()).unwrap().join("nix/store").join(A);
    let count = |op: &str| fs.request_counts().iter().find(|(o, _)| *o == op).unwrap().1;
    for round in 0..3 {
        for i in 0..200 {
            let got = std::fs::read(dir.join(format!("f{i}"))).unwrap();
            assert_eq!(got, format!("{i}\n").repeat(1000).into_bytes(), "f{i}, round {round}");
        }
    }
    // One OPEN told the kernel to open by itself; the 599 others never
    // came; the second and third rounds were served from the page cache.
    assert_eq!(count("open"), 1);
    assert!(count("read") <= 200, "{} reads", count("read"));
    assert_eq!(fs.open_files(), 0);

    // Evicted: the kept backing file is closed (its space freed), and the
    // kernel is told to drop the pages it kept (from a thread of its own,
    // so a moment later): the next read resolves the path again instead
    // of being served from memory.
    let (before, reads) = (resolver.calls.load(Ordering::SeqCst), count("read"));
    (fs.evictor())(A);
    let mut resolved = false;
    for _ in 0..100 {
        assert_eq!(std::fs::read(dir.join("f7")).unwrap(), "7\n".repeat(1000).into_bytes());
        // A READ came (the pages were dropped), and found the path anew.
        if count("read") > reads && resolver.calls.load(Ordering::SeqCst) > before {
            resolved = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(resolved, "an evicted path was still served from the page cache");
}
