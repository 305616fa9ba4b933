//! Store paths read by the chunk, through their signed file index
//! ([`crate::nixfmt::index`]): the tree is known at once, and a read fetches
//! only the zstd frames of the seekable NAR that hold the chunks it needs
//! (one ranged request per run of chunks), verifies every chunk against the
//! index before any byte is served, and keeps verified chunks on disk,
//! named by their hash, under `<root>/chunks`.
//!
//! An index is used only when a trusted key signed it (or the cache is
//! exempt from signatures, as for its narinfos) and it describes exactly
//! the NAR the verified narinfo names; otherwise the path is fetched whole,
//! with a warning.

use std::collections::{HashMap, HashSet};

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::{Result, Store, StoreError};
use crate::nixfmt::index::{split_parent, EntryKind, FileIndex};
use crate::nixfmt::profile;
use crate::nixfmt::StorePath;

/// A store path's verified index, with where each frame starts.
pub struct Indexed {
    pub path: StorePath,
    pub index: FileIndex,
    /// Which of the store's caches serves it.
    pub(super) cache: usize,
    /// Uncompressed and compressed offset of every frame.
    starts: Vec<(u64, u64)>,
    /// Entries by path, and each directory's entries (in name order).
    by_path: HashMap<Vec<u8>, usize>,
    children: HashMap<Vec<u8>, Vec<usize>>,
    /// Regular files in NAR order: (contents' offset, size, first chunk).
    files: Vec<(u64, u64, usize)>,
    /// One fetch at a time: concurrent reads (the kernel's readahead)
    /// find on disk what the first one fetched.
    fetching: tokio::sync::Mutex<()>,
    /// Frames a profile prefetch is fetching: a read that needs one waits
    /// for it (its sender dropped) rather than fetching it again.
    pending: std::sync::Mutex<HashMap<usize, tokio::sync::watch::Receiver<()>>>,
    /// Chunks served so far, their bytes, and the files' bytes in all: past
    /// `[store] complete_after` of it, the path is fetched whole.
    served: std::sync::Mutex<HashSet<usize>>,
    served_bytes: std::sync::atomic::AtomicU64,
    total_bytes: u64,
    completing: std::sync::atomic::AtomicBool,
}

/// How long after a path was read far enough its completion starts.
const COMPLETE_DELAY: std::time::Duration = std::time::Duration::from_secs(2);

/// How far past what a read asks for a fetch goes, within the file: the
/// kernel reads ahead 128 KiB at a time, each a round trip otherwise.
const READ_AHEAD: u64 = 1 << 20;

/// A path's index once known: `None` when it has none to use.
type IndexCell = tokio::sync::OnceCell<Option<Arc<Indexed>>>;

/// Index entries kept in memory at most, all paths together (one index
/// holds at most [`crate::nixfmt::index::MAX_ENTRIES`]): past it, the least
/// recently used indexes are forgotten, and asked of the cache again when
/// needed.
const MAX_KNOWN_ENTRIES: usize = 2_000_000;

/// A path's index cell and when it was last asked for.
struct Known {
    cell: Arc<IndexCell>,
    used: u64,
}

impl Known {
    fn entries(&self) -> usize {
        match self.cell.get() {
            Some(Some(ix)) => ix.index.entries.len(),
            _ => 0,
        }
    }
}

/// Forgets the least recently used indexes (never `keep`) until at most
/// `max` entries are left.
fn trim_known(known: &mut HashMap<StorePath, Known>, keep: &StorePath, max: usize) {
    let items = known.iter().map(|(p, k)| (p.clone(), k.used, k.entries()));
    for v in lru_victims(items, keep, max) {
        known.remove(&v);
    }
}

/// Which of `(key, last used, size)` to drop, least recently used first
/// and never `keep`, for the sizes left to total at most `max`.
fn lru_victims<K: PartialEq>(items: impl Iterator<Item = (K, u64, usize)>, keep: &K, max: usize) -> Vec<K> {
    let mut items: Vec<(K, u64, usize)> = items.collect();
    let mut total: usize = items.iter().map(|i| i.2).sum();
    items.sort_by_key(|i| i.1);
    let mut out = Vec::new();
    for (k, _, size) in items {
        if total <= max {
            break;
        }
        if &k != keep && size > 0 {
            total -= size;
            out.push(k);
        }
    }
    out
}

/// What the store remembers about paths' indexes this run.
pub struct Indexes {
    /// Each path's index, asked for once (concurrent askers wait for the
    /// first); a transient failure is not remembered.
    known: std::sync::Mutex<HashMap<StorePath, Known>>,
    /// Orders uses of `known`.
    tick: std::sync::atomic::AtomicU64,
    /// What was read by the chunk; whether its writer runs.
    pub(super) recorder: Arc<std::sync::Mutex<(profile::Recorder, bool)>>,
    /// Bytes of the chunks kept on disk (counted against `max_size`).
    pub chunk_bytes: std::sync::atomic::AtomicU64,
}

impl Indexes {
    /// With the chunks kept under `dir` counted (leftovers of interrupted
    /// writes removed).
    pub fn open(dir: &Path) -> Indexes {
        let mut bytes = 0;
        for (path, size, _) in chunk_files(dir) {
            if path.extension().is_some_and(|e| e.to_string_lossy().starts_with("tmp")) {
                let _ = std::fs::remove_file(&path);
            } else {
                bytes += size;
            }
        }
        Indexes {
            known: Default::default(),
            tick: Default::default(),
            recorder: Arc::new(std::sync::Mutex::new((profile::Recorder::default(), false))),
            chunk_bytes: bytes.into(),
        }
    }
}

/// Every file under the chunk directory: (path, size, modified).
pub(crate) fn chunk_files(dir: &Path) -> Vec<(PathBuf, u64, std::time::SystemTime)> {
    let mut out = Vec::new();
    for sub in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(sub.path()).into_iter().flatten().flatten() {
            if let Ok(m) = f.metadata() {
                if m.is_file() {
                    out.push((f.path(), m.len(), m.modified().unwrap_or(std::time::UNIX_EPOCH)));
                }
            }
        }
    }
    out
}

pub(super) fn chunk_err(path: &StorePath, msg: impl std::fmt::Display) -> StoreError {
    StoreError::Chunk {
        path: path.to_string(),
        msg: msg.to_string(),
    }
}

impl Indexed {
    /// The entry at `rel` (relative to the store path; empty: the path).
    pub fn entry(&self, rel: &[u8]) -> Option<&crate::nixfmt::index::Entry> {
        self.by_path.get(rel).map(|&i| &self.index.entries[i])
    }

    /// A directory's entries, by name order: (name, entry).
    pub fn children(&self, rel: &[u8]) -> Option<Vec<(&[u8], &crate::nixfmt::index::Entry)>> {
        let kids = self.children.get(rel)?;
        Some(
            kids.iter()
                .map(|&i| {
                    let e = &self.index.entries[i];
                    (split_parent(&e.path).1, e)
                })
                .collect(),
        )
    }

    /// The frames holding NAR bytes `from..to`: first and last index.
    pub(super) fn frames_for(&self, from: u64, to: u64) -> (usize, usize) {
        let find = |at: u64| self.starts.partition_point(|(u, _)| *u <= at).saturating_sub(1);
        (find(from), find(to.saturating_sub(1)))
    }

    /// The frames holding bytes `from..to` of the file whose contents
    /// start at NAR offset `file_at`, each with whether a chunk straddles it
    /// and the frame before (so that chunk needs both).
    pub(super) fn file_frames(&self, file_at: u64, from: u64, to: u64) -> impl Iterator<Item = (usize, bool)> + '_ {
        let (f0, f1) = self.frames_for(file_at + from, file_at + to);
        (f0..=f1).map(move |f| (f, f > f0 && self.straddles(f, file_at)))
    }

    /// Frame `f`'s place in the NAR file; `straddled`: see
    /// [`Indexed::file_frames`].
    pub(super) fn span(&self, f: usize, straddled: bool) -> profile::FrameSpan {
        let fr = self.index.frames[f];
        profile::FrameSpan {
            offset: self.starts[f].1,
            compressed: fr.compressed as u64,
            decompressed: fr.decompressed as u64,
            straddled,
        }
    }

    /// Whether frame `f` starts inside a chunk of the file whose contents
    /// start at NAR offset `file_at` (so that chunk needs the frame before
    /// too). `f` must start within the file.
    fn straddles(&self, f: usize, file_at: u64) -> bool {
        let u = self.starts[f].0;
        u > file_at && !(u - file_at).is_multiple_of(self.index.chunk_size.max(1) as u64)
    }

    /// The frames `f0..=f1` that are exactly NAR file bytes
    /// `offset..offset + len`, if any.
    pub(super) fn frames_at(&self, offset: u64, len: u64) -> Option<(usize, usize)> {
        let f0 = self.starts.binary_search_by_key(&offset, |s| s.1).ok()?;
        let end = offset.checked_add(len)?;
        let f1 = (f0..self.starts.len()).find(|&f| self.starts[f].1 + self.index.frames[f].compressed as u64 >= end)?;
        (self.starts[f1].1 + self.index.frames[f1].compressed as u64 == end && len > 0).then_some((f0, f1))
    }

    /// Marks frames `a..=b` as on their way until the guard is dropped.
    pub(super) fn fetching_frames(self: &Arc<Self>, a: usize, b: usize) -> PendingFrames {
        let (tx, rx) = tokio::sync::watch::channel(());
        if let Ok(mut p) = self.pending.lock() {
            for f in a..=b {
                p.insert(f, rx.clone());
            }
        }
        PendingFrames {
            ix: self.clone(),
            frames: (a, b),
            rx,
            _tx: tx,
        }
    }

    /// Waits until none of frames `f0..=f1` is on its way, for at most
    /// [`PENDING_WAIT`]: a prefetch that has not brought them by then (a
    /// long queue, a profile listing them last) is not waited for again.
    async fn pending_done(&self, f0: usize, f1: usize) {
        let waits: Vec<_> = match self.pending.lock() {
            Ok(p) if !p.is_empty() => (f0..=f1).filter_map(|f| p.get(&f).cloned()).collect(),
            _ => return,
        };
        let all = async {
            for mut rx in waits {
                // Err once the sender is gone: the only way it ends.
                let _ = rx.changed().await;
            }
        };
        if tokio::time::timeout(PENDING_WAIT, all).await.is_err() {
            tracing::debug!(path = %self.path, "frames on their way too long; fetched now");
            if let Ok(mut p) = self.pending.lock() {
                for f in f0..=f1 {
                    p.remove(&f);
                }
            }
        }
    }
}

/// How long a read waits for frames a prefetch is bringing.
const PENDING_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Frames of an indexed path on their way (see [`Indexed::fetching_frames`]).
pub(super) struct PendingFrames {
    ix: Arc<Indexed>,
    frames: (usize, usize),
    rx: tokio::sync::watch::Receiver<()>,
    /// Dropped last: waiters wake when the frames are no longer listed.
    _tx: tokio::sync::watch::Sender<()>,
}

impl Drop for PendingFrames {
    fn drop(&mut self) {
        if let Ok(mut p) = self.ix.pending.lock() {
            for f in self.frames.0..=self.frames.1 {
                if p.get(&f).is_some_and(|r| r.same_channel(&self.rx)) {
                    p.remove(&f);
                }
            }
        }
    }
}

/// Where a chunk lives on disk: `<dir>/<first two hex digits>/<hex>`.
fn chunk_file(dir: &Path, hash: &[u8; 32]) -> PathBuf {
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    dir.join(&hex[..2]).join(hex)
}

impl Store {
    /// `<root>/chunks`: verified chunks, by hash.
    pub fn chunk_dir(&self) -> PathBuf {
        self.opts.dir.with_file_name("chunks")
    }

    /// The verified file index of `path`, if the cache that serves it has
    /// one this store may use (see the module's doc). Asked of the cache
    /// once per run.
    pub async fn indexed(&self, path: &StorePath) -> Option<Arc<Indexed>> {
        let used = self.indexes.tick.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let cell = {
            let mut known = self.indexes.known.lock().ok()?;
            let k = known.entry(path.clone()).or_insert_with(|| Known {
                cell: Default::default(),
                used,
            });
            k.used = used;
            k.cell.clone()
        };
        let fresh = !cell.initialized();
        let found = cell
            .get_or_try_init(|| self.found_index(path))
            .await
            .ok()
            .and_then(|found| found.clone());
        if fresh && found.is_some() {
            if let Ok(mut known) = self.indexes.known.lock() {
                trim_known(&mut known, path, MAX_KNOWN_ENTRIES);
            }
        }
        found
    }

    /// [`Store::indexed`] if already asked this run: no network.
    pub fn known_index(&self, path: &StorePath) -> Option<Arc<Indexed>> {
        self.indexes.known.lock().ok()?.get(path)?.cell.get().cloned().flatten()
    }

    /// The path's index, `Ok(None)` for good (none, or one not to use),
    /// `Err` when it cannot be told now (asked again next time).
    async fn found_index(&self, path: &StorePath) -> std::result::Result<Option<Arc<Indexed>>, ()> {
        let caches = self.caches().await.map_err(drop)?;
        let rel = format!("{}.idx", path.hash_part());
        // Asked of the first cache that publishes indexes together with the
        // narinfo (a round trip fewer on a cold start), and used only if
        // the narinfo comes from that cache; it is verified against it.
        let guess = caches.iter().position(|c| c.file_indexes);
        let early = async {
            match guess {
                Some(i) => Some(caches[i].get(&rel).await),
                None => None,
            }
        };
        let (found, early) = tokio::join!(self.narinfo(path), early);
        let found = found.map_err(drop)?;
        let Some(cache) = caches.get(found.cache) else {
            return Ok(None);
        };
        if !cache.file_indexes {
            return Ok(None);
        }
        let got = match (guess, early) {
            (Some(i), Some(r)) if i == found.cache => r,
            _ => cache.get(&rel).await,
        };
        let bytes = match got {
            Ok(Some(b)) => b,
            Ok(None) => return Ok(None),
            Err(e) => {
                tracing::warn!(%path, error = %e, "cannot read the file index now; fetching whole paths");
                return Err(());
            }
        };
        let refuse = |why: String| {
            tracing::warn!(%path, cache = cache.url(), "ignoring its file index ({why}); fetching the whole path");
            Ok(None)
        };
        // The signature is checked on the header, before the body is parsed.
        let parsed = if cache.require_sigs {
            FileIndex::parse_trusted(&bytes, &self.opts.trusted_keys)
        } else {
            FileIndex::parse(&bytes)
        };
        let index = match parsed {
            Ok(i) => i,
            Err(e) => return refuse(e.to_string()),
        };
        let info = &found.info;
        if &index.store_path != path || index.nar_hash != info.nar_hash || index.nar_size != info.nar_size {
            return refuse("it describes another NAR than the narinfo".into());
        }
        if index.frames.is_empty() || index.url.as_deref() != Some(info.url.as_str()) {
            return refuse("it has no frames of the narinfo's NAR file".into());
        }
        let mut starts = Vec::with_capacity(index.frames.len());
        let (mut u, mut c) = (0u64, 0u64);
        for f in &index.frames {
            starts.push((u, c));
            u += f.decompressed as u64;
            c += f.compressed as u64;
        }
        let files: Vec<(u64, u64, usize)> = index
            .entries
            .iter()
            .filter_map(|e| match e.kind {
                EntryKind::Regular {
                    size,
                    offset,
                    first_chunk,
                    ..
                } => Some((offset, size, first_chunk)),
                _ => None,
            })
            .collect();
        let mut by_path = HashMap::with_capacity(index.entries.len());
        let mut children: HashMap<Vec<u8>, Vec<usize>> = HashMap::new();
        for (i, e) in index.entries.iter().enumerate() {
            by_path.insert(e.path.clone(), i);
            if matches!(e.kind, EntryKind::Directory) {
                children.entry(e.path.clone()).or_default();
            }
            if !e.path.is_empty() {
                children.entry(split_parent(&e.path).0.to_vec()).or_default().push(i);
            }
        }
        Ok(Some(Arc::new(Indexed {
            path: path.clone(),
            index,
            cache: found.cache,
            starts,
            by_path,
            children,
            total_bytes: files.iter().map(|(_, size, _)| size).sum(),
            files,
            fetching: tokio::sync::Mutex::new(()),
            pending: Default::default(),
            served: Default::default(),
            served_bytes: Default::default(),
            completing: Default::default(),
        })))
    }

    /// Up to `len` bytes at `offset` of the file at `rel` (relative to the
    /// store path) of an indexed path: from verified chunks on disk, the
    /// rest fetched, verified and kept first.
    pub async fn read_indexed(
        self: &Arc<Self>,
        ix: &Arc<Indexed>,
        rel: &[u8],
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>> {
        self.read_chunks(ix, rel, offset, len, true).await
    }

    /// [`Store::read_indexed`]; `counted`: a container's read (recorded in
    /// the access profile, counted towards completion), not the store's own.
    async fn read_chunks(
        self: &Arc<Self>,
        ix: &Arc<Indexed>,
        rel: &[u8],
        offset: u64,
        len: u64,
        counted: bool,
    ) -> Result<Vec<u8>> {
        let shown = || format!("{}/{}", ix.path, String::from_utf8_lossy(rel));
        let entry = ix
            .entry(rel)
            .ok_or_else(|| chunk_err(&ix.path, format!("{}: not in its index", shown())))?;
        let EntryKind::Regular {
            size,
            offset: file_at,
            first_chunk,
            ..
        } = entry.kind
        else {
            return Err(chunk_err(&ix.path, format!("{}: not a file", shown())));
        };
        let len = len.min(size.saturating_sub(offset));
        if len == 0 {
            return Ok(Vec::new());
        }
        let cs = ix.index.chunk_size as u64;
        if counted {
            self.record(ix, rel, offset, len, file_at, size);
        }
        let (c0, c1) = (offset / cs, (offset + len - 1) / cs);
        let chunk_len = |i: u64| cs.min(size - i * cs);
        let dir = self.chunk_dir();
        let on_disk = |pieces: &mut Vec<Option<Vec<u8>>>| {
            for (n, slot) in pieces.iter_mut().enumerate() {
                if slot.is_none() {
                    let k = c0 + n as u64;
                    *slot = std::fs::read(chunk_file(&dir, &ix.index.chunks[first_chunk + k as usize]))
                        .ok()
                        .filter(|b| b.len() as u64 == chunk_len(k));
                }
            }
        };
        let mut pieces: Vec<Option<Vec<u8>>> = vec![None; (c1 - c0 + 1) as usize];
        on_disk(&mut pieces);
        if let (Some(a), Some(b)) = (
            pieces.iter().position(Option::is_none),
            pieces.iter().rposition(Option::is_none),
        ) {
            // A prefetch bringing them: waited for, not fetched twice.
            let (a, b) = (c0 + a as u64, c0 + b as u64);
            let (f0, f1) = ix.frames_for(file_at + a * cs, file_at + b * cs + chunk_len(b));
            ix.pending_done(f0, f1).await;
            on_disk(&mut pieces);
        }
        if pieces.iter().any(Option::is_none) {
            let _turn = ix.fetching.lock().await;
            on_disk(&mut pieces);
            if let (Some(a), Some(b)) = (
                pieces.iter().position(Option::is_none),
                pieces.iter().rposition(Option::is_none),
            ) {
                let (a, b) = (c0 + a as u64, c0 + b as u64);
                let last = size.div_ceil(cs) - 1;
                let b_ahead = last.min(b.max(a + (READ_AHEAD / cs).max(1) - 1));
                let from = file_at + a * cs;
                let to = file_at + b_ahead * cs + chunk_len(b_ahead);
                let (u0, bytes) = self.fetch_frames(ix, from, to).await?;
                let wanted = first_chunk + a as usize..first_chunk + b as usize + 1;
                let (mut got, added) = keep_verified(ix, &dir, u0, &bytes, &wanted);
                self.chunks_added(added);
                for (n, slot) in pieces.iter_mut().enumerate() {
                    let k = first_chunk + c0 as usize + n;
                    if slot.is_none() {
                        *slot = Some(got.remove(&k).ok_or_else(|| {
                            chunk_err(
                                &ix.path,
                                format!(
                                    "{}: chunk {} does not match its index; nothing was served",
                                    shown(),
                                    k - first_chunk
                                ),
                            )
                        })?);
                    }
                }
            }
        }
        if counted {
            self.served(ix, first_chunk, c0, c1, &chunk_len);
        }
        let mut out = Vec::with_capacity(len as usize);
        let skip = (offset - c0 * cs) as usize;
        for p in pieces.into_iter().flatten() {
            out.extend_from_slice(&p);
        }
        out.drain(..skip.min(out.len()));
        out.truncate(len as usize);
        Ok(out)
    }

    /// The frames holding NAR bytes `from..to` of an indexed path, fetched
    /// in one ranged request and decompressed one by one: where they start
    /// in the NAR, and their bytes.
    async fn fetch_frames(&self, ix: &Indexed, from: u64, to: u64) -> Result<(u64, Vec<u8>)> {
        let (f0, f1) = ix.frames_for(from, to);
        self.fetch_frame_run(ix, f0, f1).await
    }

    /// Frames `f0..=f1` of an indexed path, in one ranged request,
    /// decompressed: where they start in the NAR, and their bytes.
    pub(super) async fn fetch_frame_run(&self, ix: &Indexed, f0: usize, f1: usize) -> Result<(u64, Vec<u8>)> {
        check_run(ix, f0, f1)?;
        let c0 = ix.starts[f0].1;
        let c_end = ix.starts[f1].1 + ix.index.frames[f1].compressed as u64;
        let url = ix.index.url.as_deref().unwrap_or_default();
        let bytes = self.download(ix.cache, &ix.path, url, c0, c_end - c0).await?;
        decode_run(ix, f0, f1, &bytes)
    }

    /// Bytes `offset..offset + len` of `path`'s NAR file at `url` in cache
    /// number `cache`, journaled and counted.
    pub(super) async fn download(
        &self,
        cache: usize,
        path: &StorePath,
        url: &str,
        offset: u64,
        len: u64,
    ) -> Result<bytes::Bytes> {
        let caches = self.caches().await?;
        let cache = caches.get(cache).ok_or_else(|| chunk_err(path, "its cache is gone"))?;
        let started = std::time::Instant::now();
        let got = cache
            .read_range(url, offset, len)
            .await
            .map_err(|source| StoreError::Cache {
                path: path.clone(),
                cache: cache.url().to_string(),
                source,
            })
            .and_then(|b| b.ok_or_else(|| chunk_err(path, format!("{url} is missing from {}", cache.url()))));
        self.journal.add(super::journal::Record {
            seq: 0,
            path: path.to_string(),
            kind: super::journal::Kind::Range,
            cache: cache.url().to_string(),
            bytes: got.as_ref().map_or(0, |b| b.len() as u64),
            took: started.elapsed(),
            error: got.as_ref().err().map(ToString::to_string).unwrap_or_default(),
        });
        let bytes = got?;
        self.counters
            .bytes_downloaded
            .fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(bytes)
    }
}

/// Refuses runs of frames that would inflate to more than [`MAX_RUN`].
pub(super) fn check_run(ix: &Indexed, f0: usize, f1: usize) -> Result<()> {
    let inflated: u64 = ix.index.frames[f0..=f1].iter().map(|f| f.decompressed as u64).sum();
    if inflated > MAX_RUN {
        return Err(chunk_err(
            &ix.path,
            format!("{inflated} bytes of frames at once is more than the {MAX_RUN} taken"),
        ));
    }
    Ok(())
}

/// Frames `f0..=f1` of `ix`'s NAR file, fetched as `bytes`, decompressed:
/// (their NAR offset, the NAR bytes). Not yet verified.
pub(super) fn decode_run(ix: &Indexed, f0: usize, f1: usize, bytes: &[u8]) -> Result<(u64, Vec<u8>)> {
    check_run(ix, f0, f1)?;
    let url = ix.index.url.as_deref().unwrap_or_default();
    let frames = &ix.index.frames[f0..=f1];
    if frames.iter().map(|f| f.compressed as u64).sum::<u64>() != bytes.len() as u64 {
        return Err(chunk_err(&ix.path, format!("frames of {url} fetched short or long")));
    }
    let mut nar = Vec::new();
    let mut at = 0usize;
    for f in frames {
        let frame = &bytes[at..at + f.compressed as usize];
        at += f.compressed as usize;
        let plain = zstd::bulk::decompress(frame, f.decompressed as usize)
            .ok()
            .filter(|p| p.len() == f.decompressed as usize)
            .ok_or_else(|| {
                chunk_err(
                    &ix.path,
                    format!("a frame of {url} does not decompress as its index says"),
                )
            })?;
        nar.extend_from_slice(&plain);
    }
    Ok((ix.starts[f0].0, nar))
}

impl Store {
    /// Counts chunks `c0..=c1` of a file (its first chunk `first`) as
    /// served; once `[store] complete_after` of the path's bytes were, the
    /// path is fetched whole in the background (and verified against its
    /// NarHash), after which it is read from disk like any local path.
    fn served(self: &Arc<Self>, ix: &Arc<Indexed>, first: usize, c0: u64, c1: u64, chunk_len: &dyn Fn(u64) -> u64) {
        use std::sync::atomic::Ordering;
        let Ok(mut served) = ix.served.lock() else {
            return;
        };
        for k in c0..=c1 {
            if served.insert(first + k as usize) {
                ix.served_bytes.fetch_add(chunk_len(k), Ordering::Relaxed);
            }
        }
        drop(served);
        let threshold = self.opts.complete_after * ix.total_bytes as f64;
        if ix.served_bytes.load(Ordering::Relaxed) as f64 >= threshold
            && self.opts.complete_after <= 1.0
            && !ix.completing.swap(true, Ordering::AcqRel)
        {
            let (me, path) = (self.clone(), ix.path.clone());
            tokio::spawn(async move {
                // Out of the way of the cold start that read it: its
                // reads and prefetch come first on the link.
                tokio::time::sleep(COMPLETE_DELAY).await;
                tracing::info!(%path, "read enough of it by the chunk: completing it in the background");
                if let Err(e) = me.ensure(&path).await {
                    tracing::warn!(%path, error = %e, "cannot complete a store path read by the chunk");
                }
            });
        }
    }

    /// Sends the NAR of an indexed path into `tx`, made from its index (the
    /// framing) and its chunks (on disk, the rest fetched by the frame and
    /// verified): what is already here is not downloaded again. The caller
    /// checks the result against the NarHash as it would a downloaded NAR.
    pub async fn nar_from_chunks(
        self: &Arc<Self>,
        ix: &Arc<Indexed>,
        tx: tokio::sync::mpsc::Sender<std::io::Result<bytes::Bytes>>,
    ) -> Result<()> {
        let mut w = NarWriter {
            buf: Vec::with_capacity(1 << 20),
            tx: &tx,
            closed: false,
        };
        let result = self.write_nar(ix, &mut w).await;
        match &result {
            Ok(()) => w.flush().await,
            Err(e) => {
                let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
            }
        }
        result
    }

    async fn write_nar(self: &Arc<Self>, ix: &Arc<Indexed>, w: &mut NarWriter<'_>) -> Result<()> {
        w.string(crate::nixfmt::nar::MAGIC).await;
        // Directories open above the current entry (their paths).
        let mut open: Vec<&[u8]> = Vec::new();
        for (i, e) in ix.index.entries.iter().enumerate() {
            if i > 0 {
                let (parent, name) = split_parent(&e.path);
                while open.last().is_some_and(|d| *d != parent) {
                    open.pop();
                    w.string(b")").await; // the directory node
                    w.string(b")").await; // its entry
                }
                for s in [&b"entry"[..], b"(", b"name", name, b"node"] {
                    w.string(s).await;
                }
            }
            w.string(b"(").await;
            w.string(b"type").await;
            match &e.kind {
                EntryKind::Directory => {
                    w.string(b"directory").await;
                    open.push(&e.path);
                    continue;
                }
                EntryKind::Symlink { target } => {
                    for s in [&b"symlink"[..], b"target", target] {
                        w.string(s).await;
                    }
                }
                EntryKind::Regular { executable, size, .. } => {
                    w.string(b"regular").await;
                    if *executable {
                        w.string(b"executable").await;
                        w.string(b"").await;
                    }
                    w.string(b"contents").await;
                    w.bytes(&size.to_le_bytes()).await;
                    let mut at = 0;
                    while at < *size {
                        if w.closed {
                            return Err(chunk_err(&ix.path, "the unpacker stopped"));
                        }
                        let piece = self
                            .read_chunks(ix, &e.path, at, (4 << 20).min(size - at), false)
                            .await?;
                        if piece.is_empty() {
                            return Err(chunk_err(&ix.path, "a file ended early"));
                        }
                        at += piece.len() as u64;
                        w.bytes(&piece).await;
                    }
                    w.bytes(&[0u8; 8][..((8 - size % 8) % 8) as usize]).await;
                }
            }
            w.string(b")").await;
            if i > 0 {
                w.string(b")").await; // the entry of a file or symlink
            }
        }
        while let Some(d) = open.pop() {
            w.string(b")").await;
            if !d.is_empty() {
                w.string(b")").await;
            }
        }
        Ok(())
    }

    /// Counts chunks newly kept; over the store's bound, collects.
    pub(super) fn chunks_added(self: &Arc<Self>, bytes: u64) {
        let before = self
            .indexes
            .chunk_bytes
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        let max = self.opts.max_size;
        if max > 0 && bytes > 0 {
            let paths = self.usage().map(|(_, b)| b).unwrap_or(0);
            if paths + before + bytes > max {
                self.collect_in_background();
            }
        }
    }

    /// Forgets what this run learned of `path` (its narinfo, `.ls`
    /// listing and index) and removes the chunks kept of it: the bytes freed.
    pub(crate) fn forget(&self, path: &StorePath) -> u64 {
        let before = self.indexes.chunk_bytes.load(std::sync::atomic::Ordering::Relaxed);
        if let Some(ix) = self.known_index(path) {
            self.drop_chunks_of(&ix);
        }
        if let Ok(mut k) = self.indexes.known.lock() {
            k.remove(path);
        }
        self.forget_narinfo(path);
        before.saturating_sub(self.indexes.chunk_bytes.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Removes the chunks of a path that became whole: its files are on
    /// disk now. (A chunk another indexed path shares is fetched again if
    /// that one needs it.)
    pub(crate) fn drop_chunks_of(&self, ix: &Indexed) {
        let dir = self.chunk_dir();
        let mut freed = 0;
        for hash in &ix.index.chunks {
            let f = chunk_file(&dir, hash);
            if let Ok(m) = std::fs::metadata(&f) {
                if std::fs::remove_file(&f).is_ok() {
                    freed += m.len();
                }
            }
        }
        let _ = self.indexes.chunk_bytes.fetch_update(
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
            |b| Some(b.saturating_sub(freed)),
        );
    }

    /// Removes the oldest chunks until at most `target` bytes of them are
    /// left; the bytes freed.
    pub(crate) fn collect_chunks(&self, target: u64) -> u64 {
        let mut files = chunk_files(&self.chunk_dir());
        let mut total: u64 = files.iter().map(|(_, s, _)| s).sum();
        files.sort_by_key(|(_, _, t)| *t);
        let mut freed = 0;
        for (path, size, _) in files {
            if total <= target {
                break;
            }
            if std::fs::remove_file(&path).is_ok() {
                total -= size;
                freed += size;
            }
        }
        self.indexes
            .chunk_bytes
            .store(total, std::sync::atomic::Ordering::Relaxed);
        freed
    }
}

/// NAR bytes on their way to the unpacker, a MiB at a time.
struct NarWriter<'a> {
    buf: Vec<u8>,
    tx: &'a tokio::sync::mpsc::Sender<std::io::Result<bytes::Bytes>>,
    /// The unpacker is gone: nothing more is worth fetching.
    closed: bool,
}

impl NarWriter<'_> {
    async fn bytes(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
        if self.buf.len() >= 1 << 20 {
            self.flush().await;
        }
    }

    /// A NAR string: length, bytes, zero padding to 8.
    async fn string(&mut self, s: &[u8]) {
        self.bytes(&(s.len() as u64).to_le_bytes()).await;
        self.bytes(s).await;
        self.bytes(&[0u8; 8][..(8 - s.len() % 8) % 8]).await;
    }

    async fn flush(&mut self) {
        if !self.buf.is_empty() {
            let full = std::mem::take(&mut self.buf);
            // A closed channel: the unpacker failed and says why; stop.
            if self.tx.send(Ok(bytes::Bytes::from(full))).await.is_err() {
                self.closed = true;
            }
        }
    }
}

/// The most one fetch of frames inflates to.
pub(super) const MAX_RUN: u64 = 128 << 20;

/// Verifies and keeps every whole chunk of every file inside NAR bytes
/// `u0..` (`bytes`): neighbours of what was asked for come with the same
/// frames and are free now. Returns the chunks of `wanted` (global chunk
/// numbers) that verified (one that does not is neither kept nor
/// returned), and the bytes newly kept.
pub(super) fn keep_verified(
    ix: &Indexed,
    dir: &Path,
    u0: u64,
    bytes: &[u8],
    wanted: &std::ops::Range<usize>,
) -> (HashMap<usize, Vec<u8>>, u64) {
    let mut added = 0;
    let u1 = u0 + bytes.len() as u64;
    let cs = ix.index.chunk_size as u64;
    let mut out = HashMap::new();
    let first = ix.files.partition_point(|(off, size, _)| off + size <= u0);
    for &(off, size, first_chunk) in ix.files[first..].iter().take_while(|(off, _, _)| *off < u1) {
        // Only the chunks that can lie inside the bytes fetched.
        let k0 = u0.saturating_sub(off) / cs;
        let k1 = ((u1 - off).div_ceil(cs)).min(size.div_ceil(cs));
        for k in k0..k1 {
            let (a, b) = (off + k * cs, off + (k * cs + cs).min(size));
            if a < u0 || b > u1 {
                continue;
            }
            let piece = &bytes[(a - u0) as usize..(b - u0) as usize];
            let n = first_chunk + k as usize;
            let hash = &ix.index.chunks[n];
            if <[u8; 32]>::from(Sha256::digest(piece)) != *hash {
                tracing::warn!(path = %ix.path, chunk = n, "a fetched chunk does not match its index; not kept");
                continue;
            }
            if keep_chunk(dir, hash, piece) {
                added += piece.len() as u64;
            }
            if wanted.contains(&n) {
                out.insert(n, piece.to_vec());
            }
        }
    }
    (out, added)
}

/// Keeps a verified chunk (by rename: a reader sees all of it or none);
/// whether it was new. A chunk that cannot be kept is simply fetched again
/// next time.
fn keep_chunk(dir: &Path, hash: &[u8; 32], bytes: &[u8]) -> bool {
    let dest = chunk_file(dir, hash);
    if dest.exists() {
        return false;
    }
    let tmp = dest.with_extension(format!("tmp{:016x}", rand::random::<u64>()));
    let kept = dest
        .parent()
        .map(std::fs::create_dir_all)
        .unwrap_or(Ok(()))
        .and_then(|()| std::fs::write(&tmp, bytes))
        .and_then(|()| std::fs::rename(&tmp, &dest));
    match kept {
        Ok(()) => true,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            tracing::debug!(error = %e, "cannot keep a chunk");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::lru_victims;

    #[test]
    fn the_least_recently_used_indexes_go_first_and_never_the_one_asked_for() {
        let items = || [("a", 5, 10), ("b", 1, 10), ("c", 3, 10), ("d", 0, 0)].into_iter();
        assert_eq!(lru_victims(items(), &"a", 30), Vec::<&str>::new());
        assert_eq!(lru_victims(items(), &"a", 29), vec!["b"]);
        assert_eq!(lru_victims(items(), &"a", 10), vec!["b", "c"]);
        // Never the one asked for, even when it alone is over the bound.
        assert_eq!(lru_victims(items(), &"b", 0), vec!["c", "a"]);
    }
}
