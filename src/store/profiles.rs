//! Access profiles ([`crate::nixfmt::profile`]): what containers read by the
//! chunk is recorded as they read it; a pulled image's profile is
//! prefetched, its frame hints first, in the order they were first read.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures::StreamExt;

use super::chunks::{check_run, chunk_err, decode_run, keep_verified, Indexed, MAX_RUN};
use super::{Result, Store};
use crate::nixfmt::index::EntryKind;
use crate::nixfmt::profile;
use crate::nixfmt::StorePath;

/// The largest NAR a profile's store path may have: the largest profile
/// file plus the NAR's framing of one file.
const MAX_PROFILE_NAR: u64 = profile::MAX_PROFILE as u64 + 4096;

/// What a profile prefetch did, and its bound on frame fetches in flight.
struct Tally {
    runs: AtomicUsize,
    hinted: AtomicUsize,
    whole: AtomicUsize,
    fetches: tokio::sync::Semaphore,
}

/// A profile's frame hint being fetched from cache number `cache`.
struct Hinted {
    cache: usize,
    url: String,
    offset: u64,
    len: u64,
    /// Dropped: not fetched, if not yet asked for.
    bytes: tokio::sync::oneshot::Receiver<Result<bytes::Bytes>>,
}

/// Frame hints asked for at a time (each recorded as at most
/// [`profile::HINT_RUN`], or 4 × that for frames a chunk straddles).
const HINTS_IN_FLIGHT: usize = 4;

/// The most bytes a profile's frame hints fetch (held until their indexes
/// come).
const MAX_HINTED: u64 = 64 << 20;
/// The most frame hints a profile's prefetch asks for (each a request).
const MAX_HINTS: usize = 4096;

impl Store {
    /// Whether pulled images' access profiles are acted on.
    pub fn prefetches_profiles(&self) -> bool {
        self.opts.prefetch_profile
    }

    /// `<root>/access-profile`: what this daemon's containers read by the
    /// chunk, first reads first (see [`crate::nixfmt::profile`]).
    pub fn profile_file(&self) -> PathBuf {
        self.opts.dir.with_file_name("access-profile")
    }

    /// Notes a container's read of `len` bytes at `offset` of file `rel`
    /// (at `file_at` in the NAR, `size` bytes) in the access profile, with
    /// the frames its chunks lie in.
    pub(super) fn record(&self, ix: &Indexed, rel: &[u8], offset: u64, len: u64, file_at: u64, size: u64) {
        let Ok(mut r) = self.indexes.recorder.lock() else {
            return;
        };
        let cs = ix.index.chunk_size as u64;
        r.0.note(&ix.path, rel, offset, len, cs);
        if let Some(url) = ix.index.url.as_deref() {
            let (from, to) = (offset / cs * cs, (offset + len).div_ceil(cs) * cs);
            let spans = ix.file_frames(file_at, from, to.min(size)).map(|(f, s)| ix.span(f, s));
            r.0.note_frames(&ix.path, url, spans);
        }
        if r.1 {
            return;
        }
        // A writer, twice a second while anything is new, by rename; it
        // ends with the store.
        r.1 = true;
        let recorder = Arc::downgrade(&self.indexes.recorder);
        let dest = self.profile_file();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                let Some(rec) = recorder.upgrade() else { return };
                // Copied under the lock, written out of it: reads record on.
                let recorded = match rec.lock() {
                    Ok(mut r) if r.0.dirty => {
                        r.0.dirty = false;
                        r.0.profile()
                    }
                    _ => continue,
                };
                let text = profile::to_text(&recorded);
                let tmp = dest.with_extension("tmp");
                if let Err(e) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &dest)) {
                    tracing::debug!(error = %e, "cannot write the access profile");
                }
            }
        });
    }

    /// The access profile recorded so far, as text, and its number of
    /// ranges; with `reset`, recording starts afresh (the file too).
    pub fn recorded_profile(&self, reset: bool) -> (String, usize) {
        let Ok(mut r) = self.indexes.recorder.lock() else {
            return (profile::to_text(&Default::default()), 0);
        };
        let out = (profile::to_text(&r.0.profile()), r.0.ranges.len());
        if reset {
            r.0 = profile::Recorder::default();
            r.0.dirty = true;
        }
        out
    }

    /// Fetches the chunks an access profile (a store path, from an image's
    /// `nix-profile` label) lists, for the paths of `within` (the image's
    /// closure): by the frame for paths with a file index, whole for the
    /// others. The profile's frame hints are asked for at once, in its
    /// order, while the indexes come, and used only where they match them.
    /// Reads of frames on their way wait for them. Failures are left to
    /// the reads that would have found the chunks.
    pub async fn prefetch_profile(self: &Arc<Self>, profile_path: StorePath, within: HashSet<StorePath>) {
        let started = std::time::Instant::now();
        let recorded = match self.read_profile(&profile_path).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(profile = %profile_path, error = %e, "cannot use the image's access profile");
                return;
            }
        };
        let mut hinted = self.fetch_hints(recorded.hints, &within).await;
        let mut order: Vec<StorePath> = Vec::new();
        let mut by_path: HashMap<StorePath, Vec<profile::Range>> = HashMap::new();
        for r in recorded.ranges.into_iter().filter(|r| within.contains(&r.path)) {
            if !by_path.contains_key(&r.path) {
                order.push(r.path.clone());
            }
            by_path.entry(r.path.clone()).or_default().push(r);
        }
        let work: Vec<_> = order
            .into_iter()
            .map(|p| {
                let ranges = by_path.remove(&p).unwrap_or_default();
                let hints = hinted.remove(&p).unwrap_or_default();
                (p, ranges, hints)
            })
            .collect();
        // Hints of paths without ranges are not fetched for nothing.
        drop(hinted);
        let parallel = self.opts.max_parallel.max(1);
        let tally = Arc::new(Tally {
            runs: Default::default(),
            hinted: Default::default(),
            whole: Default::default(),
            fetches: tokio::sync::Semaphore::new(parallel),
        });
        futures::stream::iter(work)
            .for_each_concurrent(parallel, |(p, ranges, hints)| {
                let (me, tally) = (self.clone(), tally.clone());
                async move { me.prefetch_path(p, ranges, hints, tally).await }
            })
            .await;
        let count = |n: &AtomicUsize| n.load(Ordering::Relaxed);
        tracing::info!(
            runs = count(&tally.runs),
            hinted = count(&tally.hinted),
            paths = count(&tally.whole),
            ms = started.elapsed().as_millis() as u64,
            "prefetched what the image's access profile lists"
        );
    }

    /// One path of [`Store::prefetch_profile`], once its index is here.
    async fn prefetch_path(
        self: &Arc<Self>,
        path: StorePath,
        ranges: Vec<profile::Range>,
        hints: Vec<Hinted>,
        tally: Arc<Tally>,
    ) {
        let Some(ix) = self.indexed(&path).await else {
            tally.whole.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = self.ensure(&path).await {
                tracing::debug!(%path, error = %e, "profile prefetch");
            }
            return;
        };
        // Frames, and whether one range needs it with the frame before.
        let mut frames = BTreeMap::new();
        for r in &ranges {
            if let Some(EntryKind::Regular { size, offset, .. }) = ix.entry(&r.rel).map(|e| &e.kind) {
                let from = r.offset.min(*size);
                let to = r.offset.saturating_add(r.len).min(*size);
                if to > from {
                    for (f, straddled) in ix.file_frames(*offset, from, to) {
                        *frames.entry(f).or_insert(false) |= straddled;
                    }
                }
            }
        }
        let mut jobs = Vec::new();
        for h in hints {
            let fits = ix.cache == h.cache && ix.index.url.as_deref() == Some(&h.url);
            let frames_of_hint = ix
                .frames_at(h.offset, h.len)
                .filter(|&(a, b)| fits && check_run(&ix, a, b).is_ok());
            match frames_of_hint {
                Some((a, b)) => {
                    frames.retain(|&f, _| f < a || f > b);
                    jobs.push((a, b, Some(h.bytes)));
                }
                None => tracing::debug!(%path, "a frame hint of the access profile does not fit the index; ignored"),
            }
        }
        // The frames no hint brings: runs of consecutive ones.
        let items = frames.into_iter().map(|(f, joined)| profile::Item {
            start: f as u64,
            end: f as u64 + 1,
            cost: ix.span(f, false).cost(),
            joined,
        });
        jobs.extend(
            profile::coalesce(items, profile::MAX_RUN)
                .into_iter()
                .map(|(a, b)| (a as usize, b as usize - 1, None)),
        );
        tally.runs.fetch_add(jobs.len(), Ordering::Relaxed);
        // Hinted frames are on their way (or next in line): a read of them
        // waits rather than fetches them again (for a while: see
        // `Indexed::pending_done`). Other runs are marked once started.
        let jobs: Vec<_> = jobs
            .into_iter()
            .map(|(a, b, bytes)| {
                let pending = bytes.is_some().then(|| ix.fetching_frames(a, b));
                (a, b, bytes, pending)
            })
            .collect();
        futures::stream::iter(jobs)
            .for_each_concurrent(None, |(a, b, bytes, pending)| {
                let (me, ix, tally) = (self.clone(), ix.clone(), tally.clone());
                async move {
                    let from_hint = match bytes {
                        Some(bytes) => match bytes.await {
                            Ok(got) => got.and_then(|got| decode_run(&ix, a, b, &got)),
                            Err(e) => Err(chunk_err(&ix.path, e)),
                        }
                        .inspect_err(|e| tracing::debug!(error = %e, "hinted frames; fetched again"))
                        .ok(),
                        None => None,
                    };
                    let fetched = match from_hint {
                        Some(got) => {
                            tally.hinted.fetch_add(1, Ordering::Relaxed);
                            Ok(got)
                        }
                        // No hint, or one that failed: fetched as without it.
                        None => {
                            let _turn = tally.fetches.acquire().await;
                            let _started = pending.is_none().then(|| ix.fetching_frames(a, b));
                            me.fetch_frame_run(&ix, a, b).await
                        }
                    };
                    match fetched {
                        Ok((u0, bytes)) => {
                            let (_, added) = keep_verified(&ix, &me.chunk_dir(), u0, &bytes, &(0..0));
                            me.chunks_added(added);
                        }
                        Err(e) => tracing::debug!(error = %e, "profile prefetch"),
                    }
                    drop(pending);
                }
            })
            .await;
    }

    /// Starts fetching the frame `hints` of paths of `within`, from the
    /// first cache that publishes file indexes (the one indexes are first
    /// asked of), at most [`MAX_HINTS`] of them and [`MAX_HINTED`] bytes in
    /// all: by path.
    async fn fetch_hints(
        self: &Arc<Self>,
        hints: Vec<profile::Hint>,
        within: &HashSet<StorePath>,
    ) -> HashMap<StorePath, Vec<Hinted>> {
        let mut out: HashMap<StorePath, Vec<Hinted>> = HashMap::new();
        let Some(cache) = self
            .caches()
            .await
            .ok()
            .and_then(|c| c.iter().position(|c| c.file_indexes))
        else {
            return out;
        };
        let mut total = 0u64;
        let mut asks = Vec::new();
        let mut skipped = 0usize;
        for h in hints.into_iter().filter(|h| within.contains(&h.path)) {
            if h.len == 0 || h.len > MAX_RUN || total + h.len > MAX_HINTED || asks.len() >= MAX_HINTS {
                skipped += 1;
                continue;
            }
            total += h.len;
            let (tx, bytes) = tokio::sync::oneshot::channel();
            asks.push((h.clone(), tx));
            out.entry(h.path).or_default().push(Hinted {
                cache,
                url: h.url,
                offset: h.offset,
                len: h.len,
                bytes,
            });
        }
        // In the profile's order, a few at a time: the link's bandwidth
        // goes to what the program reads next, and each run is served as
        // soon as it is whole. A hint no longer waited for is not fetched
        // further (`closed` is polled first).
        let me = self.clone();
        let in_flight = HINTS_IN_FLIGHT.min(self.opts.max_parallel.max(1));
        tokio::spawn(async move {
            futures::stream::iter(asks)
                .for_each_concurrent(in_flight, |(h, mut tx)| {
                    let me = me.clone();
                    async move {
                        tokio::select! {
                            biased;
                            () = tx.closed() => {}
                            got = me.download(cache, &h.path, &h.url, h.offset, h.len) => {
                                let _ = tx.send(got);
                            }
                        }
                    }
                })
                .await;
        });
        if skipped > 0 {
            tracing::debug!(skipped, "frame hints past the bounds; ignored");
        }
        out
    }

    /// Fetches the store path of an image's access profile, once its signed
    /// narinfo says its NAR can hold no more than a profile: a label naming
    /// a big path costs a narinfo, not the path.
    pub async fn fetch_profile(self: &Arc<Self>, path: &StorePath) -> Result<super::Location> {
        if self.local(path).is_none() {
            let found = self.narinfo(path).await.map_err(|e| chunk_err(path, e))?;
            if found.info.nar_size > MAX_PROFILE_NAR {
                return Err(chunk_err(
                    path,
                    format!(
                        "its NAR is {} bytes, more than an access profile's {MAX_PROFILE_NAR}",
                        found.info.nar_size
                    ),
                ));
            }
        }
        self.ensure(path).await.map_err(|e| chunk_err(path, e))
    }

    async fn read_profile(self: &Arc<Self>, path: &StorePath) -> Result<profile::Profile> {
        let loc = self.fetch_profile(path).await?;
        let holder = self.holder(&loc);
        let bytes = nix_snapshotter_fuse::beneath::read_file(
            std::os::fd::AsFd::as_fd(&*holder),
            Path::new(path.base_name()),
            profile::MAX_PROFILE as u64,
        )
        .map_err(|e| chunk_err(path, e))?;
        let text = String::from_utf8(bytes).map_err(|_| chunk_err(path, "not UTF-8"))?;
        profile::parse(&text).map_err(|e| chunk_err(path, e))
    }
}
