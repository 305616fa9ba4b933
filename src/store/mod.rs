//! The verified local store: `<root>/store/<hash>-<name>`, filled from
//! binary caches, bounded in size.
//!
//! A path is fetched at most once at a time (single flight), unpacked while
//! it downloads into a temporary directory beside its final place, and
//! published by one rename only after its NarSize and NarHash (and, where
//! required, the narinfo's signature) checked out: nothing unverified is
//! ever visible under its store name. When the node's own Nix store has a
//! path, that copy is used instead.

pub mod chunks;
mod db;
mod fetch;
pub mod gc;
pub mod journal;
mod profiles;

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use nix_snapshotter_fuse::beneath;
use tokio::sync::OnceCell;

use crate::cache::{Cache, CacheError};
use crate::nixfmt::nar::NarError;
use crate::nixfmt::signature::{self, PublicKey};
use crate::nixfmt::{NarInfo, StorePath};
use db::PathDb;
pub use db::PathRecord;
use fetch::PipelineError;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: not found in any substituter ({})", caches.join(", "))]
    NotFound { path: StorePath, caches: Vec<String> },
    #[error("{path} from {cache}: narinfo rejected: {msg}")]
    BadNarInfo {
        path: StorePath,
        cache: String,
        msg: String,
    },
    #[error("{path} from {cache}: not trusted: {reason}")]
    Untrusted {
        path: StorePath,
        cache: String,
        reason: String,
    },
    #[error("{path} from {cache}: {source}")]
    Cache {
        path: StorePath,
        cache: String,
        #[source]
        source: CacheError,
    },
    #[error("{path} from {cache}: {source}")]
    Verify {
        path: StorePath,
        cache: String,
        #[source]
        source: PipelineError,
    },
    #[error("{path}: {msg}")]
    Local { path: String, msg: String },
    #[error("{path} is in use by a running container (or a snapshot being made); not evicted{}", if *done > 0 { format!(" ({done} paths before it were)") } else { String::new() })]
    InUse { path: String, done: usize },
    #[error("{path}: {msg}")]
    Chunk { path: String, msg: String },
    #[error("{0}")]
    Substituter(String),
    #[error(transparent)]
    Db(#[from] crate::error::Error),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Where a path's content is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// In our store, `<root>/store/<base>`.
    Local(PathBuf),
    /// In the node's Nix store.
    Host(PathBuf),
}

impl Location {
    pub fn path(&self) -> &Path {
        match self {
            Location::Local(p) | Location::Host(p) => p,
        }
    }
}

pub struct StoreOptions {
    /// `<root>/store`
    pub dir: PathBuf,
    pub host_store: Option<PathBuf>,
    pub trusted_keys: Vec<PublicKey>,
    /// 0: unbounded.
    pub max_size: u64,
    pub max_parallel: usize,
    /// See [`crate::config::StoreConfig::prefetch_entrypoint`].
    pub prefetch_entrypoint: bool,
    /// See [`crate::config::StoreConfig::prefetch_profile`].
    pub prefetch_profile: bool,
    /// See [`crate::config::StoreConfig::complete_after`].
    pub complete_after: f64,
}

/// Counters for progress reporting and summaries.
#[derive(Debug, Default)]
pub struct Counters {
    pub bytes_downloaded: AtomicU64,
    pub paths_fetched: AtomicU64,
    pub bytes_on_disk: AtomicU64,
    pub evictions: AtomicU64,
    /// How long each fetch took (download, verify, unpack).
    pub fetch_seconds: crate::metrics::Histogram,
}

/// narinfos kept in memory, 50,000: a closure that large is far beyond any
/// image's, and a real narinfo is a few KiB (4 MiB is the read cap).
const MAX_NARINFOS: std::num::NonZeroUsize = std::num::NonZeroUsize::MIN.saturating_add(49_999);
/// `.ls` answers (is this path a directory) kept in memory, 200,000.
const MAX_LISTED: std::num::NonZeroUsize = std::num::NonZeroUsize::MIN.saturating_add(199_999);

/// A verified narinfo and the cache that has the NAR.
#[derive(Debug, Clone)]
pub struct Found {
    pub info: NarInfo,
    pub text: String,
    pub cache: usize,
}

/// Told the base name of each store path evicted.
pub type EvictHook = Arc<dyn Fn(&str) + Send + Sync>;

/// A fetch under way: its waiters watch for the result. The fetch itself
/// runs as a task of its own, so a waiter that gives up (a FUSE request's
/// time bound) stops waiting without stopping the download.
type Flight = tokio::sync::watch::Receiver<Option<Result<Location, Arc<StoreError>>>>;

pub struct Store {
    opts: StoreOptions,
    /// `opts.dir` and the host store, opened once: store paths are reached
    /// beneath them, never through a symlink.
    dir_fd: Arc<OwnedFd>,
    host_fd: Option<Arc<OwnedFd>>,
    /// Configured caches, as given; `ordered` holds them checked and sorted.
    configured: Mutex<Option<Vec<Cache>>>,
    ordered: OnceCell<Result<Vec<Cache>, String>>,
    db: PathDb,
    /// narinfos verified this run (also the closure walk's memo), the
    /// least recently used forgotten past [`MAX_NARINFOS`]: images name
    /// what is walked, and a forgotten one is only asked for again.
    narinfos: Mutex<lru::LruCache<StorePath, Arc<Found>>>,
    /// Whether a store path is a directory, as its `.ls` listing says;
    /// bounded likewise.
    listed_dirs: Mutex<lru::LruCache<StorePath, bool>>,
    /// Signed file indexes found this run.
    indexes: chunks::Indexes,
    inflight: Mutex<HashMap<StorePath, Flight>>,
    /// Paths being read or otherwise in use right now: never evicted.
    leases: Mutex<HashMap<StorePath, usize>>,
    /// Paths live snapshots need: never evicted.
    pinned: Mutex<HashSet<StorePath>>,
    /// Told the base name of each path evicted (the FUSE store closes the
    /// files it kept open for it).
    evicted: Mutex<Option<EvictHook>>,
    /// Last uses not yet written to the database.
    uses: Mutex<(HashMap<String, SystemTime>, Instant)>,
    pub counters: Counters,
    /// Recent downloads, for `bench` (through the admin API).
    pub journal: journal::Journal,
}

/// Keeps a path from eviction while alive.
pub struct Lease {
    store: Arc<Store>,
    path: StorePath,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Ok(mut l) = self.store.leases.lock() {
            if let Some(n) = l.get_mut(&self.path) {
                *n -= 1;
                if *n == 0 {
                    l.remove(&self.path);
                }
            }
        }
    }
}

fn local_err(path: &Path, msg: impl std::fmt::Display) -> StoreError {
    StoreError::Local {
        path: path.display().to_string(),
        msg: msg.to_string(),
    }
}

impl Store {
    /// Opens the store under `opts.dir`, removing leftovers of interrupted
    /// fetches and evictions, and records whose directory vanished.
    pub fn open(opts: StoreOptions, caches: Vec<Cache>, db: Arc<crate::db::Database>) -> Result<Store> {
        std::fs::create_dir_all(&opts.dir).map_err(|e| local_err(&opts.dir, e))?;
        let db = PathDb::open(db)?;
        let known: HashSet<String> = db.all()?.into_iter().map(|(k, _)| k).collect();
        let mut present = HashSet::new();
        for entry in std::fs::read_dir(&opts.dir).map_err(|e| local_err(&opts.dir, e))? {
            let entry = entry.map_err(|e| local_err(&opts.dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if known.contains(&name) {
                present.insert(name);
            } else {
                tracing::info!(path = %entry.path().display(), "removing unrecorded store entry");
                gc::remove_tree(&entry.path()).map_err(|e| local_err(&entry.path(), e))?;
            }
        }
        for gone in known.difference(&present) {
            tracing::info!(path = %gone, "forgetting store path whose directory is gone");
            db.remove(gone)?;
        }
        let indexes = chunks::Indexes::open(&opts.dir.with_file_name("chunks"));
        let dir_fd = Arc::new(beneath::root(&opts.dir).map_err(|e| local_err(&opts.dir, e))?);
        let host_fd = opts
            .host_store
            .as_deref()
            .and_then(|h| beneath::root(h).ok())
            .map(Arc::new);
        Ok(Store {
            dir_fd,
            host_fd,
            opts,
            configured: Mutex::new(Some(caches)),
            ordered: OnceCell::new(),
            db,
            narinfos: Mutex::new(lru::LruCache::new(MAX_NARINFOS)),
            listed_dirs: Mutex::new(lru::LruCache::new(MAX_LISTED)),
            journal: journal::Journal::default(),
            indexes,
            inflight: Mutex::new(HashMap::new()),
            leases: Mutex::new(HashMap::new()),
            pinned: Mutex::new(HashSet::new()),
            evicted: Mutex::new(None),
            uses: Mutex::new((HashMap::new(), Instant::now())),
            counters: Counters::default(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.opts.dir
    }

    /// The caches, each checked once (its nix-cache-info) and sorted by
    /// priority, config order breaking ties. Done on first use, not at start.
    pub async fn caches(&self) -> Result<&[Cache]> {
        let ordered = self
            .ordered
            .get_or_init(|| async {
                let mut caches = self
                    .configured
                    .lock()
                    .ok()
                    .and_then(|mut c| c.take())
                    .unwrap_or_default();
                for c in caches.iter_mut() {
                    c.read_info().await.map_err(|e| format!("substituter {e}"))?;
                }
                caches.sort_by_key(|c| c.priority);
                Ok(caches)
            })
            .await;
        match ordered {
            Ok(c) => Ok(c),
            Err(msg) => Err(StoreError::Substituter(msg.clone())),
        }
    }

    fn host_path(&self, path: &StorePath) -> Option<PathBuf> {
        let fd = self.host_fd.as_ref()?;
        beneath::lstat_name(fd.as_fd(), path.base_name().as_ref()).ok()?;
        self.opts.host_store.as_ref().map(|h| h.join(path.base_name()))
    }

    /// The local copy of `path` if we have it (no network). Counts as a
    /// use for eviction order.
    pub fn local(&self, path: &StorePath) -> Option<Location> {
        if let Some(h) = self.host_path(path) {
            return Some(Location::Host(h));
        }
        beneath::lstat_name(self.dir_fd.as_fd(), path.base_name().as_ref())
            .is_ok()
            .then(|| {
                self.note_use(path);
                Location::Local(self.opts.dir.join(path.base_name()))
            })
    }

    /// The directory that holds a location's store path, to resolve paths
    /// inside it beneath ([`beneath`]).
    pub fn holder(&self, loc: &Location) -> Arc<OwnedFd> {
        match (loc, &self.host_fd) {
            (Location::Host(_), Some(h)) => h.clone(),
            _ => self.dir_fd.clone(),
        }
    }

    /// Makes `path` available locally, fetching it if needed.
    pub async fn ensure(self: &Arc<Self>, path: &StorePath) -> Result<Location, Arc<StoreError>> {
        if let Some(loc) = self.local(path) {
            return Ok(loc);
        }
        let mut flight = {
            let mut m = self.inflight.lock().map_err(|_| Arc::new(poisoned()))?;
            match m.get(path) {
                Some(f) => f.clone(),
                None => {
                    let (tx, rx) = tokio::sync::watch::channel(None);
                    m.insert(path.clone(), rx.clone());
                    let me = self.clone();
                    let path = path.clone();
                    tokio::spawn(async move {
                        // The flight ends however the fetch does, a panic
                        // included: a later `ensure` starts afresh.
                        struct Landed(Arc<Store>, StorePath);
                        impl Drop for Landed {
                            fn drop(&mut self) {
                                if let Ok(mut m) = self.0.inflight.lock() {
                                    m.remove(&self.1);
                                }
                            }
                        }
                        let landed = Landed(me, path);
                        let started = Instant::now();
                        let res = landed.0.fetch_now(&landed.1).await.map_err(Arc::new);
                        landed.0.counters.fetch_seconds.observe(started.elapsed());
                        if let Err(e) = &res {
                            landed.0.journal.add(journal::Record {
                                seq: 0,
                                path: landed.1.to_string(),
                                kind: journal::Kind::Path,
                                cache: String::new(),
                                bytes: 0,
                                took: started.elapsed(),
                                error: e.to_string(),
                            });
                        }
                        drop(landed);
                        let _ = tx.send(Some(res));
                    });
                    rx
                }
            }
        };
        let res = flight.wait_for(Option::is_some).await;
        match res.as_deref() {
            Ok(Some(r)) => r.clone(),
            _ => Err(Arc::new(local_err(
                Path::new(path.base_name()),
                "the fetch ended without a result",
            ))),
        }
    }

    /// Like [`ensure`](Self::ensure), and keeps the path from eviction until
    /// the lease is dropped.
    pub async fn ensure_leased(self: &Arc<Self>, path: &StorePath) -> Result<(Location, Lease), Arc<StoreError>> {
        let lease = self.lease(path);
        let loc = self.ensure(path).await?;
        Ok((loc, lease))
    }

    pub fn lease(self: &Arc<Self>, path: &StorePath) -> Lease {
        if let Ok(mut l) = self.leases.lock() {
            *l.entry(path.clone()).or_insert(0) += 1;
        }
        Lease {
            store: self.clone(),
            path: path.clone(),
        }
    }

    /// Marks paths as needed by live snapshots (never evicted), replacing
    /// the previous set. When that frees paths of a store held to a size
    /// bound, collection runs again now: a store over its bound because
    /// containers held its paths shrinks when they go, not at the next fetch.
    pub fn set_pinned(self: &Arc<Self>, paths: HashSet<StorePath>) {
        let Ok(mut p) = self.pinned.lock() else {
            return;
        };
        let freed = p.iter().any(|old| !paths.contains(old));
        *p = paths;
        drop(p);
        if freed {
            self.collect_in_background();
        }
    }

    /// For a store held to a size bound: evicts down to it on a blocking
    /// thread (after a fetch grew the store, or when paths were unpinned).
    /// Outside a runtime (offline commands), nothing: they collect themselves.
    fn collect_in_background(self: &Arc<Self>) {
        if self.opts.max_size == 0 {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let me = self.clone();
            rt.spawn_blocking(move || {
                if let Err(e) = me.gc(me.opts.max_size) {
                    tracing::warn!(error = %e, "store garbage collection failed");
                }
            });
        }
    }

    /// Sets who is told of evictions.
    pub fn on_evict(&self, f: EvictHook) {
        if let Ok(mut e) = self.evicted.lock() {
            *e = Some(f);
        }
    }

    /// Paths and bytes in the local store (from its records).
    pub fn usage(&self) -> Result<(u64, u64)> {
        let all = self.db.all()?;
        Ok((all.len() as u64, all.iter().map(|(_, r)| r.disk_size).sum()))
    }

    /// Fetches under way now.
    pub fn in_flight(&self) -> usize {
        self.inflight.lock().map(|f| f.len()).unwrap_or(0)
    }

    /// Paths live snapshots need now.
    pub fn pinned_count(&self) -> usize {
        self.pinned.lock().map(|p| p.len()).unwrap_or(0)
    }

    /// The configured size bound (0: none).
    pub fn max_size(&self) -> u64 {
        self.opts.max_size
    }

    /// The caches, if they were opened already (no network).
    pub fn opened_caches(&self) -> &[Cache] {
        match self.ordered.get() {
            Some(Ok(c)) => c,
            _ => &[],
        }
    }

    pub(crate) fn tell_evicted(&self, base: &str) {
        self.counters.evictions.fetch_add(1, Ordering::Relaxed);
        let f = self.evicted.lock().ok().and_then(|e| e.clone());
        if let Some(f) = f {
            f(base);
        }
    }

    fn note_use(&self, path: &StorePath) {
        let Ok(mut u) = self.uses.lock() else { return };
        u.0.insert(path.base_name().to_string(), SystemTime::now());
        if u.1.elapsed() > Duration::from_secs(30) {
            let batch: Vec<_> = u.0.drain().collect();
            u.1 = Instant::now();
            drop(u);
            if let Err(e) = self.db.touch(&batch) {
                tracing::warn!(error = %e, "cannot record store path uses");
            }
        }
    }

    /// Writes pending last-use times (before GC and on shutdown).
    pub fn flush_uses(&self) -> Result<()> {
        let batch: Vec<_> = match self.uses.lock() {
            Ok(mut u) => u.0.drain().collect(),
            Err(_) => return Err(poisoned()),
        };
        Ok(self.db.touch(&batch)?)
    }

    /// The verified narinfo of `path`, from our records or the first cache
    /// (by priority) that has one we accept.
    pub async fn narinfo(&self, path: &StorePath) -> Result<Arc<Found>> {
        if let Some(f) = self.narinfos.lock().map_err(|_| poisoned())?.get(path) {
            return Ok(f.clone());
        }
        let caches = self.caches().await?;
        if let Some(rec) = self.db.get(path.base_name())? {
            if let Ok(info) = NarInfo::parse(&rec.narinfo) {
                let cache = caches.iter().position(|c| c.url() == rec.cache).unwrap_or(0);
                let found = Arc::new(Found {
                    info,
                    text: rec.narinfo,
                    cache,
                });
                self.remember(path, &found)?;
                return Ok(found);
            }
        }
        let rel = format!("{}.narinfo", path.hash_part());
        let mut first_error = None;
        for (i, cache) in caches.iter().enumerate() {
            let err = match cache.get(&rel).await {
                Ok(None) => continue,
                Err(e) => StoreError::Cache {
                    path: path.clone(),
                    cache: cache.url().to_string(),
                    source: e,
                },
                Ok(Some(bytes)) => match self.accept(path, cache, &bytes) {
                    Ok(info) => {
                        let found = Arc::new(Found {
                            info,
                            text: String::from_utf8_lossy(&bytes).into_owned(),
                            cache: i,
                        });
                        self.remember(path, &found)?;
                        return Ok(found);
                    }
                    Err(e) => e,
                },
            };
            tracing::warn!(error = %err, "substituter cannot provide this path");
            first_error.get_or_insert(err);
        }
        Err(first_error.unwrap_or_else(|| StoreError::NotFound {
            path: path.clone(),
            caches: caches.iter().map(|c| c.url().to_string()).collect(),
        }))
    }

    fn remember(&self, path: &StorePath, found: &Arc<Found>) -> Result<()> {
        self.narinfos
            .lock()
            .map_err(|_| poisoned())?
            .put(path.clone(), found.clone());
        Ok(())
    }

    /// Parses and checks a narinfo: it must describe `path`, and carry a
    /// trusted signature unless this cache is exempt.
    fn accept(&self, path: &StorePath, cache: &Cache, bytes: &[u8]) -> Result<NarInfo> {
        let bad = |msg: String| StoreError::BadNarInfo {
            path: path.clone(),
            cache: cache.url().to_string(),
            msg,
        };
        let text = std::str::from_utf8(bytes).map_err(|_| bad("not UTF-8".into()))?;
        let info = NarInfo::parse(text).map_err(|e| bad(e.to_string()))?;
        if &info.store_path != path {
            return Err(bad(format!("it describes {}", info.store_path)));
        }
        if cache.require_sigs {
            signature::verify(&info, &self.opts.trusted_keys).map_err(|reason| StoreError::Untrusted {
                path: path.clone(),
                cache: cache.url().to_string(),
                reason: reason.to_string(),
            })?;
        }
        Ok(info)
    }

    /// Whether `path` is a directory, from the `.ls` NAR listing of the cache
    /// that serves it, so that a stat needs no NAR download. None when that
    /// cache has no (readable) listing. Listings carry no signature: only
    /// this one bit is taken from them, and content is still verified.
    pub async fn listed_is_dir(&self, path: &StorePath) -> Option<bool> {
        if let Some(d) = self.listed_dirs.lock().ok()?.get(path) {
            return Some(*d);
        }
        let found = self.narinfo(path).await.ok()?;
        let cache = self.caches().await.ok()?.get(found.cache)?;
        let rel = format!("{}.ls", path.hash_part());
        let is_dir = match cache.get(&rel).await {
            Ok(Some(bytes)) => match decode_listing(&bytes) {
                Ok(is_dir) => is_dir,
                Err(e) => {
                    tracing::debug!(path = %path, cache = cache.url(), error = %e, "unreadable NAR listing");
                    return None;
                }
            },
            Ok(None) => return None,
            Err(e) => {
                tracing::debug!(path = %path, error = %e, "no NAR listing");
                return None;
            }
        };
        self.listed_dirs.lock().ok()?.put(path.clone(), is_dir);
        Some(is_dir)
    }

    /// Fetches and verifies the narinfos of `paths` not yet local, many in
    /// flight, so that the first touch of each later costs only its NAR. Only
    /// metadata: nothing is downloaded.
    pub async fn prefetch_narinfos(&self, paths: Vec<StorePath>) {
        futures::stream::iter(paths)
            .for_each_concurrent(self.opts.max_parallel.max(1), |p| async move {
                if self.local(&p).is_none() {
                    if let Err(e) = self.narinfo(&p).await {
                        tracing::debug!(error = %e, "narinfo prefetch");
                    }
                }
            })
            .await;
    }

    /// Whether an image's command's closure is fetched ahead.
    pub fn prefetches_entrypoint(&self) -> bool {
        self.opts.prefetch_entrypoint
    }

    /// Fetches the closures of `roots` that lie within `within` (an image's
    /// closure), many paths in flight: what the image's command will load,
    /// fetched before it asks one file after another. Each path is fetched
    /// and verified as a first access would; failures are left to that
    /// access. Nothing when `prefetch_entrypoint` is off.
    pub async fn prefetch_closure(self: &Arc<Self>, roots: Vec<StorePath>, within: HashSet<StorePath>) {
        if !self.opts.prefetch_entrypoint || roots.is_empty() {
            return;
        }
        let started = Instant::now();
        let closure = match self.closure(&roots).await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "entrypoint prefetch: closure");
                return;
            }
        };
        let wanted: Vec<StorePath> = closure.into_iter().filter(|p| within.contains(p)).collect();
        let count = wanted.len();
        futures::stream::iter(wanted)
            .for_each_concurrent(self.opts.max_parallel.max(1), |p| async move {
                if let Err(e) = self.ensure(&p).await {
                    tracing::debug!(path = %p, error = %e, "entrypoint prefetch");
                }
            })
            .await;
        tracing::info!(
            paths = count,
            ms = started.elapsed().as_millis() as u64,
            "prefetched the closure of the image's command"
        );
    }

    /// The closure of `roots` (every path they reference, transitively),
    /// with many narinfo requests in flight.
    pub async fn closure(&self, roots: &[StorePath]) -> Result<Vec<StorePath>> {
        let mut seen: HashSet<StorePath> = roots.iter().cloned().collect();
        let mut frontier: Vec<StorePath> = roots.to_vec();
        let mut out = Vec::new();
        while !frontier.is_empty() {
            let batch = std::mem::take(&mut frontier);
            let mut results = futures::stream::iter(batch.into_iter().map(|p| async move {
                let r = self.narinfo(&p).await;
                (p, r)
            }))
            .buffer_unordered(self.opts.max_parallel.max(1));
            while let Some((p, r)) = results.next().await {
                let refs = match r {
                    Ok(found) => found.info.references.clone(),
                    // A path only the host store has: its references are
                    // not known to us, and it needs no fetching.
                    Err(StoreError::NotFound { .. }) if self.host_path(&p).is_some() => Vec::new(),
                    Err(e) => return Err(e),
                };
                for r in refs {
                    if seen.insert(r.clone()) {
                        frontier.push(r);
                    }
                }
                out.push(p);
            }
        }
        out.sort();
        Ok(out)
    }

    async fn fetch_now(self: &Arc<Self>, path: &StorePath) -> Result<Location> {
        let found = self.narinfo(path).await?;
        let caches = self.caches().await?;
        let cache = caches.get(found.cache).ok_or_else(|| StoreError::NotFound {
            path: path.clone(),
            caches: Vec::new(),
        })?;
        let info = &found.info;
        let dest = self.opts.dir.join(path.base_name());
        let tmp = self
            .opts
            .dir
            .join(format!(".tmp-{}-{:08x}", path.hash_part(), rand::random::<u32>()));
        let started = Instant::now();

        let from_chunks = self.known_index(path);
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let unpack = {
            let mut info = info.clone();
            if from_chunks.is_some() {
                // The NAR itself, checked against NarSize and NarHash.
                info.compression = crate::nixfmt::narinfo::Compression::None;
                info.file_size = None;
                info.file_hash = None;
            }
            let tmp = tmp.clone();
            tokio::task::spawn_blocking(move || fetch::unpack_verified(fetch::ChannelReader::new(rx), &info, &tmp))
        };
        let download = {
            let counters = &self.counters;
            let (fwd_tx, mut fwd_rx) = tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(16);
            // Count bytes as they pass to the unpacker.
            // (Made from chunks, it was counted as its frames came.)
            let downloading = from_chunks.is_none();
            let forward = async move {
                while let Some(item) = fwd_rx.recv().await {
                    if let (Ok(b), true) = (&item, downloading) {
                        counters.bytes_downloaded.fetch_add(b.len() as u64, Ordering::Relaxed);
                    }
                    if tx.send(item).await.is_err() {
                        break;
                    }
                }
            };
            let source = async {
                match &from_chunks {
                    // Read by the chunk so far: made from the chunks here and
                    // the frames missing, not downloaded again.
                    Some(ix) => self
                        .nar_from_chunks(ix, fwd_tx)
                        .await
                        .map(|()| 0)
                        .map_err(|e| CacheError::Invalid {
                            url: format!("{}/{}", cache.url(), info.url),
                            msg: e.to_string(),
                        }),
                    None => cache.stream_to(&info.url, info.file_size, fwd_tx).await,
                }
            };
            let (res, ()) = tokio::join!(source, forward);
            res
        };
        let unpacked = unpack
            .await
            .map_err(|e| local_err(&tmp, format!("unpack task failed: {e}")));
        let cleanup = |e: StoreError| {
            let _ = gc::remove_tree(&tmp);
            e
        };
        let stats = match (download, unpacked) {
            (_, Ok(Ok(stats))) => stats,
            // The download's own error says more than the unpacker's "download failed".
            (Err(e), _) => {
                return Err(cleanup(StoreError::Cache {
                    path: path.clone(),
                    cache: cache.url().to_string(),
                    source: e,
                }))
            }
            (Ok(_), Ok(Err(e))) => {
                return Err(cleanup(StoreError::Verify {
                    path: path.clone(),
                    cache: cache.url().to_string(),
                    source: e,
                }))
            }
            (Ok(_), Err(e)) => return Err(cleanup(e)),
        };
        if let Err(e) = std::fs::rename(&tmp, &dest) {
            if std::fs::symlink_metadata(&dest).is_err() {
                return Err(cleanup(local_err(&dest, format!("cannot publish: {e}"))));
            }
            // Already there (another process fetched it): keep theirs.
            let _ = gc::remove_tree(&tmp);
        }
        let disk_size = crate::usage::disk_usage(&dest)
            .map(|u| u.size as u64)
            .unwrap_or(stats.bytes);
        let now = SystemTime::now();
        self.db.put(
            path.base_name(),
            &PathRecord {
                narinfo: found.text.clone(),
                cache: cache.url().to_string(),
                disk_size,
                fetched: now,
                last_used: now,
            },
        )?;
        self.counters.paths_fetched.fetch_add(1, Ordering::Relaxed);
        self.counters.bytes_on_disk.fetch_add(disk_size, Ordering::Relaxed);
        self.journal.add(journal::Record {
            seq: 0,
            path: path.to_string(),
            kind: journal::Kind::Path,
            cache: cache.url().to_string(),
            // Made from chunks, its frames were counted as they came.
            bytes: if from_chunks.is_some() {
                0
            } else {
                info.file_size.unwrap_or(info.nar_size)
            },
            took: started.elapsed(),
            error: String::new(),
        });
        tracing::info!(
            path = %path,
            cache = cache.url(),
            nar_size = info.nar_size,
            download = info.file_size.unwrap_or(0),
            files = stats.files,
            ms = started.elapsed().as_millis() as u64,
            "fetched"
        );
        if let Some(ix) = &from_chunks {
            self.drop_chunks_of(ix);
        }
        self.collect_in_background();
        Ok(Location::Local(dest))
    }

    /// Forgets the narinfo and listing verified for `path` this run.
    fn forget_narinfo(&self, path: &StorePath) {
        if let Ok(mut n) = self.narinfos.lock() {
            n.pop(path);
        }
        if let Ok(mut l) = self.listed_dirs.lock() {
            l.pop(path);
        }
    }

    /// Everything recorded in the store.
    pub fn paths(&self) -> Result<Vec<(String, PathRecord)>> {
        Ok(self.db.all()?)
    }
}

fn poisoned() -> StoreError {
    StoreError::Local {
        path: String::new(),
        msg: "internal lock poisoned".into(),
    }
}

impl From<NarError> for StoreError {
    fn from(e: NarError) -> Self {
        StoreError::Local {
            path: String::new(),
            msg: e.to_string(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("trusted_public_keys: {0}")]
    Key(#[from] crate::nixfmt::signature::KeyError),
    #[error("netrc_file {}: {source}", path.display())]
    Netrc {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("substituters: {0}")]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Builds the store the configuration describes, on the daemon's database.
pub async fn open_from_config(
    cfg: &crate::config::Config,
    db: Arc<crate::db::Database>,
) -> Result<Arc<Store>, SetupError> {
    let trusted_keys = cfg
        .trusted_public_keys
        .iter()
        .map(|k| PublicKey::parse(k))
        .collect::<Result<Vec<_>, _>>()?;
    let netrc = if cfg.netrc_file.as_os_str().is_empty() {
        None
    } else {
        Some(
            crate::cache::netrc::Netrc::load(&cfg.netrc_file).map_err(|source| SetupError::Netrc {
                path: cfg.netrc_file.clone(),
                source,
            })?,
        )
    };
    let secs = |s: f64| Duration::from_secs_f64(s.max(0.001));
    let cache_opts = crate::cache::CacheOptions {
        retry: crate::cache::RetryPolicy {
            attempts: cfg.fetch.attempts.max(1),
            stall_timeout: secs(cfg.fetch.stall_timeout),
            ..Default::default()
        },
        connect_timeout: secs(cfg.fetch.connect_timeout),
        netrc,
        require_sigs: cfg.require_sigs,
        max_connections: cfg.fetch.max_parallel.max(1),
    };
    let caches = crate::cache::open_all(&cfg.substituters, &cache_opts)?;
    let opts = StoreOptions {
        dir: cfg.root.join("store"),
        host_store: (!cfg.host_store.as_os_str().is_empty()).then(|| cfg.host_store.clone()),
        trusted_keys,
        max_size: cfg.store.max_size.0,
        max_parallel: cfg.fetch.max_parallel.max(1),
        prefetch_entrypoint: cfg.store.prefetch_entrypoint,
        prefetch_profile: cfg.store.prefetch_profile,
        complete_after: cfg.store.complete_after,
    };
    let store = tokio::task::spawn_blocking(move || Store::open(opts, caches, db))
        .await
        .map_err(|e| StoreError::Local {
            path: String::new(),
            msg: e.to_string(),
        })??;
    Ok(Arc::new(store))
}

/// Largest listing we decompress: a listing is a few hundred bytes per file.
const MAX_LISTING: u64 = 64 << 20;

/// A `.ls` listing as a cache serves it: plain JSON, or brotli-compressed
/// (stored with `Content-Encoding: br`, which our HTTP client does not undo).
fn decode_listing(bytes: &[u8]) -> Result<bool, crate::nixfmt::listing::ListingError> {
    use crate::nixfmt::listing::{root_is_dir, ListingError};
    use std::io::Read;
    if bytes.first() == Some(&b'{') {
        return root_is_dir(bytes);
    }
    // Decompressed as it is parsed: nothing but the parser's state is held.
    let brotli = brotli_decompressor::Decompressor::new(bytes, 4096).take(MAX_LISTING);
    root_is_dir(std::io::BufReader::with_capacity(64 << 10, brotli))
        .map_err(|e| ListingError(format!("neither JSON nor brotli JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::decode_listing;

    const JSON: &[u8] =
        br#"{"version":1,"root":{"type":"directory","entries":{"a":{"type":"regular","size":3,"narOffset":96}}}}"#;
    /// `JSON` compressed by the `brotli` command-line tool.
    const BROTLI: &str = "a1180380e03870cee5f123085db79ac20872477e602dcaf021eddb2f699f3a362cd1e79403d624c0a42d91243988df036ecaf2462977d4e48b91ca7cb4f7ef465364f8d202c2b4c5769839515f11b0d6";

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn listings_plain_or_brotli() {
        assert!(decode_listing(JSON).unwrap());
        assert!(decode_listing(&unhex(BROTLI)).unwrap());
        let err = decode_listing(b"\x00garbage").unwrap_err();
        assert!(err.to_string().contains("neither JSON nor brotli"), "{err}");
        let file = br#"{"version":1,"root":{"type":"regular","size":3}}"#;
        assert!(!decode_listing(file).unwrap());
    }
}
