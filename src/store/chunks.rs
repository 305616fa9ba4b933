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

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::{Result, Store, StoreError};
use crate::nixfmt::index::{EntryKind, FileIndex};
use crate::nixfmt::StorePath;

/// A store path's verified index, with where each frame starts.
pub struct Indexed {
    pub path: StorePath,
    pub index: FileIndex,
    /// Which of the store's caches serves it.
    cache: usize,
    /// Uncompressed and compressed offset of every frame.
    starts: Vec<(u64, u64)>,
    /// Entries by path, and each directory's entries (in name order).
    by_path: HashMap<Vec<u8>, usize>,
    children: HashMap<Vec<u8>, Vec<usize>>,
}

/// What the store remembers about paths' indexes this run.
#[derive(Default)]
pub struct Indexes {
    known: std::sync::Mutex<HashMap<StorePath, Option<Arc<Indexed>>>>,
}

fn chunk_err(path: &StorePath, msg: impl std::fmt::Display) -> StoreError {
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
                    let name = match e.path.iter().rposition(|&b| b == b'/') {
                        Some(p) => &e.path[p + 1..],
                        None => &e.path[..],
                    };
                    (name, e)
                })
                .collect(),
        )
    }

    /// The frames holding NAR bytes `from..to`: first and last index.
    fn frames_for(&self, from: u64, to: u64) -> (usize, usize) {
        let find = |at: u64| self.starts.partition_point(|(u, _)| *u <= at).saturating_sub(1);
        (find(from), find(to.saturating_sub(1)))
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
        if let Some(known) = self.indexes.known.lock().ok()?.get(path) {
            return known.clone();
        }
        let found = self.found_index(path).await;
        if let Ok(mut k) = self.indexes.known.lock() {
            k.insert(path.clone(), found.clone());
        }
        found
    }

    /// [`Store::indexed`] if already asked this run: no network.
    pub fn known_index(&self, path: &StorePath) -> Option<Arc<Indexed>> {
        self.indexes.known.lock().ok()?.get(path).cloned().flatten()
    }

    async fn found_index(&self, path: &StorePath) -> Option<Arc<Indexed>> {
        let found = self.narinfo(path).await.ok()?;
        let caches = self.caches().await.ok()?;
        let cache = caches.get(found.cache)?;
        if !cache.file_indexes {
            return None;
        }
        let rel = format!("{}.idx", path.hash_part());
        let bytes = match cache.get(&rel).await {
            Ok(Some(b)) => b,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(%path, error = %e, "cannot read the file index; fetching whole paths");
                return None;
            }
        };
        let refuse = |why: String| {
            tracing::warn!(%path, cache = cache.url(), "ignoring its file index ({why}); fetching the whole path");
            None
        };
        let index = match FileIndex::parse(&bytes) {
            Ok(i) => i,
            Err(e) => return refuse(e.to_string()),
        };
        if cache.require_sigs {
            if let Err(reason) = index.verify(&self.opts.trusted_keys) {
                return refuse(format!("not trusted: {reason}"));
            }
        }
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
        let mut by_path = HashMap::with_capacity(index.entries.len());
        let mut children: HashMap<Vec<u8>, Vec<usize>> = HashMap::new();
        for (i, e) in index.entries.iter().enumerate() {
            by_path.insert(e.path.clone(), i);
            if matches!(e.kind, EntryKind::Directory) {
                children.entry(e.path.clone()).or_default();
            }
            if !e.path.is_empty() {
                let parent = match e.path.iter().rposition(|&b| b == b'/') {
                    Some(p) => e.path[..p].to_vec(),
                    None => Vec::new(),
                };
                children.entry(parent).or_default().push(i);
            }
        }
        Some(Arc::new(Indexed {
            path: path.clone(),
            index,
            cache: found.cache,
            starts,
            by_path,
            children,
        }))
    }

    /// Up to `len` bytes at `offset` of the file at `rel` (relative to the
    /// store path) of an indexed path: from verified chunks on disk, the
    /// rest fetched, verified and kept first.
    pub async fn read_indexed(&self, ix: &Indexed, rel: &[u8], offset: u64, len: u64) -> Result<Vec<u8>> {
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
        let (c0, c1) = (offset / cs, (offset + len - 1) / cs);
        let dir = self.chunk_dir();
        let chunk_len = |i: u64| cs.min(size - i * cs);
        let mut pieces: Vec<Option<Vec<u8>>> = Vec::new();
        for i in c0..=c1 {
            let hash = &ix.index.chunks[first_chunk + i as usize];
            let on_disk = std::fs::read(chunk_file(&dir, hash))
                .ok()
                .filter(|b| b.len() as u64 == chunk_len(i));
            pieces.push(on_disk);
        }
        // Each run of missing chunks: one ranged read of the frames under it.
        let mut i = 0;
        while i < pieces.len() {
            if pieces[i].is_some() {
                i += 1;
                continue;
            }
            let mut j = i;
            while j + 1 < pieces.len() && pieces[j + 1].is_none() {
                j += 1;
            }
            let (a, b) = (c0 + i as u64, c0 + j as u64);
            let from = file_at + a * cs;
            let to = file_at + b * cs + chunk_len(b);
            let bytes = self.fetch_nar_range(ix, from, to).await?;
            for k in a..=b {
                let start = ((k - a) * cs) as usize;
                let piece = bytes[start..start + chunk_len(k) as usize].to_vec();
                let hash = &ix.index.chunks[first_chunk + k as usize];
                if <[u8; 32]>::from(Sha256::digest(&piece)) != *hash {
                    return Err(chunk_err(
                        &ix.path,
                        format!("{}: chunk {k} does not match its index; nothing was served", shown()),
                    ));
                }
                keep_chunk(&dir, hash, &piece);
                pieces[(k - c0) as usize] = Some(piece);
            }
            i = j + 1;
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

    /// NAR bytes `from..to` of an indexed path: the frames holding them,
    /// fetched in one ranged request and decompressed one by one.
    async fn fetch_nar_range(&self, ix: &Indexed, from: u64, to: u64) -> Result<Vec<u8>> {
        let caches = self.caches().await?;
        let cache = caches
            .get(ix.cache)
            .ok_or_else(|| chunk_err(&ix.path, "its cache is gone"))?;
        let (f0, f1) = ix.frames_for(from, to);
        let (u0, c0) = ix.starts[f0];
        let last = ix.index.frames[f1];
        let c_end = ix.starts[f1].1 + last.compressed as u64;
        let url = ix.index.url.as_deref().unwrap_or_default();
        let bytes = cache
            .read_range(url, c0, c_end - c0)
            .await
            .map_err(|source| StoreError::Cache {
                path: ix.path.clone(),
                cache: cache.url().to_string(),
                source,
            })?
            .ok_or_else(|| chunk_err(&ix.path, format!("{url} is missing from {}", cache.url())))?;
        self.counters
            .bytes_downloaded
            .fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let mut nar = Vec::new();
        let mut at = 0usize;
        for f in &ix.index.frames[f0..=f1] {
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
        let a = (from - u0) as usize;
        let b = (to - u0) as usize;
        Ok(nar[a..b].to_vec())
    }
}

/// Keeps a verified chunk (by rename: a reader sees all of it or none).
/// A chunk that cannot be kept is simply fetched again next time.
fn keep_chunk(dir: &Path, hash: &[u8; 32], bytes: &[u8]) {
    let dest = chunk_file(dir, hash);
    if dest.exists() {
        return;
    }
    let tmp = dest.with_extension(format!("tmp{}", std::process::id()));
    let kept = dest
        .parent()
        .map(std::fs::create_dir_all)
        .unwrap_or(Ok(()))
        .and_then(|()| std::fs::write(&tmp, bytes))
        .and_then(|()| std::fs::rename(&tmp, &dest));
    if let Err(e) = kept {
        let _ = std::fs::remove_file(&tmp);
        tracing::debug!(error = %e, "cannot keep a chunk");
    }
}
