//! One FUSE session served by two `StoreFs` in turn (needs root and
//! /dev/fuse): the first hands the connection to a keeper and leaves (it is
//! sealed: it answers nothing more), the second resumes it without a new
//! INIT. Node ids keep their meaning, a file opened before the hand-over
//! reads on, and a request the sealed side read but never answered is
//! resent to the successor and answered. This exercises the fuser patch in
//! `third_party/fuser` (resume, seal, resend, forget_mount).

use std::collections::HashMap;
use std::io::{Read, Seek};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix_snapshotter_fuse::{ClosureEntry, Keeper, MountConfig, Resolver, StoreDir, StoreFs};

const A: &str = "7h7qgvs4kgzsn8a6rb274saxyqh4jxlz-a";
const B: &str = "0c4n3pzm6y2y0yw4a0xgxkc0wczr7qj5-b";
/// Lines per file: 4 MB, well past what readahead brings in at the first read.
const SIZE: usize = 700_000;

struct DirResolver(StoreDir);

impl Resolver for DirResolver {
    fn resolve(&self, _base_name: &str) -> Result<StoreDir, String> {
        Ok(self.0.clone())
    }
    fn local(&self, _base_name: &str) -> Option<StoreDir> {
        Some(self.0.clone())
    }
}

/// A keeper in this process: what a holder process or systemd would hold.
#[derive(Default)]
struct MemKeeper(Mutex<HashMap<String, OwnedFd>>);

impl Keeper for MemKeeper {
    fn put(&self, name: &str, fd: BorrowedFd<'_>) -> std::io::Result<()> {
        let dup = fd.try_clone_to_owned()?;
        self.0.lock().unwrap().insert(name.to_string(), dup);
        Ok(())
    }
    fn remove(&self, name: &str) -> std::io::Result<()> {
        self.0.lock().unwrap().remove(name);
        Ok(())
    }
    fn take(&self) -> std::io::Result<Vec<(String, OwnedFd)>> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(n, fd)| Ok((n.clone(), fd.as_fd().try_clone_to_owned()?)))
            .collect()
    }
    fn clear(&self) -> std::io::Result<()> {
        self.0.lock().unwrap().clear();
        Ok(())
    }
}

/// Unmounts whatever is at `mnt` when the test ends, however it ends.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        nix_snapshotter_fuse::detach_stale(&self.0);
    }
}

fn closure() -> Vec<ClosureEntry> {
    [A, B]
        .iter()
        .map(|b| ClosureEntry {
            base_name: b.to_string(),
            is_dir: Some(true),
        })
        .collect()
}

#[test]
fn a_resumed_session_keeps_node_ids_open_files_and_unanswered_requests() {
    let tmp = tempfile::Builder::new().prefix("nst-fuse-").tempdir_in("/tmp").unwrap();
    let store = tmp.path().join("store");
    for (base, body) in [(A, "first\n"), (B, "second\n")] {
        std::fs::create_dir_all(store.join(base)).unwrap();
        std::fs::write(store.join(base).join("file"), body.repeat(SIZE)).unwrap();
    }
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let _cleanup = Cleanup(mnt.clone());
    let resolver: Arc<dyn Resolver> = Arc::new(DirResolver(Arc::new(std::fs::File::open(&store).unwrap().into())));
    let keeper: Arc<dyn Keeper> = Arc::new(MemKeeper::default());
    // One worker: after the seal it leaves once it has read one request.
    let cfg = MountConfig {
        threads: 1,
        passthrough: false,
        ..Default::default()
    };

    let first = StoreFs::open(&mnt, resolver.clone(), &cfg, Some(keeper.clone())).expect("needs root and /dev/fuse");
    first.start().unwrap();
    assert!(first.kept() && !first.resumed());
    let view = first.add_view("v", &closure()).unwrap();
    let a = view.join("nix/store").join(A).join("file");
    let b = view.join("nix/store").join(B).join("file");
    let ino_a = std::fs::metadata(&a).unwrap().ino();
    let mut open = std::fs::File::open(&a).unwrap();
    let mut head = [0u8; 6];
    open.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"first\n");

    // The first side leaves; a request now goes unanswered (its sealed
    // worker reads it and drops it).
    first.leave().unwrap();
    let waiting = {
        let b = b.clone();
        std::thread::spawn(move || std::fs::read(&b).map(|v| v.len()))
    };
    std::thread::sleep(Duration::from_millis(300));
    assert!(!waiting.is_finished(), "a sealed session answered");

    let second = StoreFs::open(&mnt, resolver, &cfg, Some(keeper)).unwrap();
    assert!(second.resumed(), "the kept session was not resumed");
    second.add_view("v", &closure()).unwrap();
    second.start().unwrap();

    // The request the sealed side dropped was resent, and answered.
    assert_eq!(waiting.join().unwrap().unwrap(), "second\n".len() * SIZE);
    // The same node id means the same file; the file opened before reads on.
    assert_eq!(std::fs::metadata(&a).unwrap().ino(), ino_a);
    open.seek(std::io::SeekFrom::Start((6 * SIZE - 6) as u64)).unwrap();
    let mut tail = String::new();
    open.read_to_string(&mut tail).unwrap();
    assert_eq!(tail, "first\n");
    assert_eq!(std::fs::read(&a).unwrap().len(), 6 * SIZE);
    drop(open);
    drop(first);
    second.unmount().unwrap();
}
