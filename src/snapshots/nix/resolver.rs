//! Fetching through the store for the FUSE filesystem: the only place that
//! blocks a thread on the network, always within a time bound.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::nixfmt::index::EntryKind;
use crate::nixfmt::StorePath;
use crate::store::chunks::Indexed;
use crate::store::Store;
use nix_snapshotter_fuse::{FileTree, Resolver, StoreDir, TreeEntry};

/// The store, once the daemon has opened it (it opens in the background so
/// an unreachable cache never delays serving).
pub type StoreSlot = Arc<OnceLock<Arc<Store>>>;

/// Fetches through the store for the FUSE filesystem, within a time bound.
pub struct StoreResolver {
    pub store: StoreSlot,
    pub rt: tokio::runtime::Handle,
    pub timeout: Duration,
    /// How long requests waited for fetches.
    pub waited: Arc<crate::metrics::Histogram>,
}

impl StoreResolver {
    /// The store, waiting (within the time bound) while it opens: a daemon
    /// that resumed a FUSE session serves running containers' requests
    /// from its first instant, before the store has opened.
    fn opened_store(&self) -> std::result::Result<&Arc<Store>, String> {
        let start = std::time::Instant::now();
        loop {
            if let Some(s) = self.store.get() {
                return Ok(s);
            }
            if start.elapsed() >= self.timeout {
                return Err(format!("the local store did not open within {:?}", self.timeout));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Resolver for StoreResolver {
    fn resolve(&self, base_name: &str) -> std::result::Result<StoreDir, String> {
        let path = StorePath::from_base_name(base_name).map_err(|e| e.to_string())?;
        let store = self.opened_store()?;
        if let Some(loc) = store.local(&path) {
            return Ok(store.holder(&loc));
        }
        let fetching = store.clone();
        let fetch = async move { fetching.ensure(&path).await };
        // Waiting stops at the time bound; the download goes on, and a
        // later access finds it done (or still under way).
        let started = std::time::Instant::now();
        let result = self
            .rt
            .block_on(async { tokio::time::timeout(self.timeout, fetch).await });
        self.waited.observe(started.elapsed());
        match result {
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

    fn tree(&self, base_name: &str) -> Option<Arc<dyn FileTree>> {
        // Every request on a path read by the chunk asks: most find it known.
        if let Some(t) = self.known_tree(base_name) {
            return Some(t);
        }
        let path = StorePath::from_base_name(base_name).ok()?;
        let store = self.opened_store().ok()?.clone();
        let asking = store.clone();
        let ix = self
            .rt
            .block_on(async { tokio::time::timeout(self.timeout, asking.indexed(&path)).await })
            .ok()
            .flatten()?;
        Some(self.indexed_tree(store, ix))
    }

    fn known_tree(&self, base_name: &str) -> Option<Arc<dyn FileTree>> {
        let path = StorePath::from_base_name(base_name).ok()?;
        let store = self.store.get()?.clone();
        let ix = store.known_index(&path)?;
        Some(self.indexed_tree(store, ix))
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

impl StoreResolver {
    fn indexed_tree(&self, store: Arc<Store>, ix: Arc<Indexed>) -> Arc<dyn FileTree> {
        Arc::new(IndexedTree {
            store,
            ix,
            rt: self.rt.clone(),
            timeout: self.timeout,
        })
    }
}

/// A store path read by the chunk through its signed index.
struct IndexedTree {
    store: Arc<Store>,
    ix: Arc<Indexed>,
    rt: tokio::runtime::Handle,
    timeout: Duration,
}

fn tree_entry(kind: &EntryKind) -> TreeEntry {
    match kind {
        EntryKind::Directory => TreeEntry::Dir,
        EntryKind::Regular { size, executable, .. } => TreeEntry::File {
            size: *size,
            executable: *executable,
        },
        EntryKind::Symlink { target } => TreeEntry::Symlink(target.clone()),
    }
}

impl FileTree for IndexedTree {
    fn entry(&self, rel: &[u8]) -> Option<TreeEntry> {
        self.ix.entry(rel).map(|e| tree_entry(&e.kind))
    }

    fn children(&self, rel: &[u8]) -> Option<Vec<(Vec<u8>, TreeEntry)>> {
        Some(
            self.ix
                .children(rel)?
                .into_iter()
                .map(|(name, e)| (name.to_vec(), tree_entry(&e.kind)))
                .collect(),
        )
    }

    fn read(&self, rel: &[u8], offset: u64, len: u32) -> std::result::Result<Vec<u8>, String> {
        let read = self.store.read_indexed(&self.ix, rel, offset, len as u64);
        match self
            .rt
            .block_on(async { tokio::time::timeout(self.timeout, read).await })
        {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!("reading {} takes longer than {:?}", self.ix.path, self.timeout)),
        }
    }
}
