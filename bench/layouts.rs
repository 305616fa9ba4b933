//! Which cache layout serves reads by file best, measured on the recorded
//! profile of a real cold start: for seekable zstd NARs at several frame
//! sizes (each published with `cache push --frame-size`) and for
//! uncompressed NARs read with HTTP `Range` by the 64 KiB chunk, the bytes a
//! cold start with that profile fetches, the requests it takes (runs of
//! adjacent frames or chunks, one request each), and the cache's size.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use nix_snapshotter::nixfmt::index::{EntryKind, FileIndex};
use nix_snapshotter::nixfmt::profile;

pub struct Layout {
    pub name: String,
    pub cache_bytes: u64,
    pub fetched: u64,
    pub requests: usize,
}

/// The file indexes of a cache directory, by store path base name.
fn indexes(cache: &Path) -> HashMap<String, FileIndex> {
    std::fs::read_dir(cache)
        .unwrap()
        .filter_map(|e| {
            let p = e.ok()?.path();
            (p.extension()? == "idx").then_some(p)
        })
        .map(|p| {
            let ix = FileIndex::parse(&std::fs::read(&p).unwrap()).unwrap();
            (ix.store_path.base_name().to_string(), ix)
        })
        .collect()
}

/// NAR byte ranges the profile reads, per store path.
fn nar_ranges(ranges: &[profile::Range], ixs: &HashMap<String, FileIndex>) -> HashMap<String, Vec<(u64, u64)>> {
    let mut out: HashMap<String, Vec<(u64, u64)>> = HashMap::new();
    for r in ranges {
        let Some(ix) = ixs.get(r.path.base_name()) else {
            continue;
        };
        let Some(e) = ix.entries.iter().find(|e| e.path == r.rel) else {
            continue;
        };
        if let EntryKind::Regular { size, offset, .. } = e.kind {
            let (from, to) = (r.offset.min(size), r.offset.saturating_add(r.len).min(size));
            if to > from {
                out.entry(r.path.base_name().to_string())
                    .or_default()
                    .push((offset + from, offset + to));
            }
        }
    }
    out
}

/// Runs of consecutive numbers in a sorted set.
fn runs(set: &BTreeSet<u64>) -> usize {
    let mut n = 0;
    let mut last = None;
    for &i in set {
        if last.is_none_or(|l: u64| l + 1 != i) {
            n += 1;
        }
        last = Some(i);
    }
    n
}

/// A seekable-zstd cache's figures for the profile.
pub fn seekable(name: &str, cache: &Path, ranges: &[profile::Range]) -> Layout {
    let ixs = indexes(cache);
    let (mut fetched, mut requests) = (0, 0);
    for (base, spans) in nar_ranges(ranges, &ixs) {
        let ix = &ixs[&base];
        let mut starts = Vec::with_capacity(ix.frames.len());
        let mut u = 0u64;
        for f in &ix.frames {
            starts.push(u);
            u += f.decompressed as u64;
        }
        let frame_of = |at: u64| starts.partition_point(|s| *s <= at).saturating_sub(1) as u64;
        let mut frames = BTreeSet::new();
        for (a, b) in spans {
            frames.extend(frame_of(a)..=frame_of(b - 1));
        }
        fetched += frames
            .iter()
            .map(|f| ix.frames[*f as usize].compressed as u64)
            .sum::<u64>();
        requests += runs(&frames);
    }
    Layout {
        name: name.into(),
        cache_bytes: crate::common::du(&cache.join("nar")),
        fetched,
        requests,
    }
}

/// Uncompressed NARs read with `Range` by the 64 KiB chunk (each chunk is
/// what an index can vouch for), from the same indexes' offsets.
pub fn uncompressed(cache: &Path, ranges: &[profile::Range]) -> Layout {
    const CHUNK: u64 = 64 << 10;
    let ixs = indexes(cache);
    let (mut fetched, mut requests) = (0, 0);
    for (base, spans) in nar_ranges(ranges, &ixs) {
        let nar = ixs[&base].nar_size;
        let mut chunks = BTreeSet::new();
        for (a, b) in spans {
            chunks.extend(a / CHUNK..=(b - 1) / CHUNK);
        }
        fetched += chunks.iter().map(|c| CHUNK.min(nar - c * CHUNK)).sum::<u64>();
        requests += runs(&chunks);
    }
    Layout {
        name: "uncompressed NARs + Range (64 KiB chunks)".into(),
        cache_bytes: ixs.values().map(|ix| ix.nar_size).sum(),
        fetched,
        requests,
    }
}
