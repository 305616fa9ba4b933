//! Publishing caches that can be read by file: `cache push` from a real Nix
//! store and `cache index` over a cache real Nix wrote. Stock Nix must read
//! both as before (`nix copy --from`, `nix-store --verify`); every store
//! path gets a signed file index whose chunks, taken from the seekable NAR
//! frame by frame, are the store path's files.

mod common;

use std::path::Path;
use std::process::Command;

use common::nix::NixStore;
use common::TempRoot;
use nix_snapshotter::nixfmt::index::{EntryKind, FileIndex};
use nix_snapshotter::nixfmt::signature::PublicKey;
use nix_snapshotter::nixfmt::{NarInfo, StorePath};
use sha2::{Digest, Sha256};

/// `cache index` of `cache` with `nix`'s key.
fn index_cache(nix: &NixStore, cache: &Path) -> (bool, String, String) {
    ours(&[
        "cache",
        "index",
        "--secret-key",
        nix.secret_key.to_str().unwrap(),
        cache.to_str().unwrap(),
    ])
}

fn ours(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(common::DAEMON).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Stock Nix copies `path` from the cache into a fresh store and verifies
/// it; returns that store.
fn stock_nix_copies(tmp: &TempRoot, name: &str, cache: &Path, key: &str, path: &str) -> NixStore {
    let fresh = NixStore::new(&tmp.join(name), "unused-1");
    let out = Command::new("nix")
        .args(["--extra-experimental-features", "nix-command", "copy", "--from"])
        .arg(format!("file://{}", cache.display()))
        .arg("--to")
        .arg(&fresh.root)
        .args(["--option", "trusted-public-keys", key, path])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nix copy --from: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let verify = Command::new("nix-store")
        .arg("--store")
        .arg(&fresh.root)
        .args(["--verify", "--check-contents"])
        .output()
        .unwrap();
    assert!(
        verify.status.success() && !String::from_utf8_lossy(&verify.stderr).contains("error"),
        "nix-store --verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    fresh
}

/// Reads `file` of `store_path` through its index: the frames holding each
/// chunk, decompressed alone, hashed against the index.
fn read_through_index(cache: &Path, idx: &FileIndex, file: &[u8]) -> Vec<u8> {
    let entry = idx
        .entry(file)
        .unwrap_or_else(|| panic!("{} not indexed", String::from_utf8_lossy(file)));
    let EntryKind::Regular {
        size,
        offset,
        first_chunk,
        ..
    } = entry.kind
    else {
        panic!("not a file")
    };
    let nar_file = std::fs::read(cache.join(idx.url.as_ref().unwrap())).unwrap();
    // Uncompressed and compressed start of every frame.
    let (mut u, mut c, mut starts) = (0u64, 0usize, Vec::new());
    for f in &idx.frames {
        starts.push((u, c, *f));
        u += f.decompressed as u64;
        c += f.compressed as usize;
    }
    let range = |from: u64, to: u64| -> Vec<u8> {
        let mut out = Vec::new();
        for (us, cs, f) in &starts {
            let ue = us + f.decompressed as u64;
            if ue <= from || *us >= to {
                continue;
            }
            let frame =
                zstd::bulk::decompress(&nar_file[*cs..cs + f.compressed as usize], f.decompressed as usize).unwrap();
            let a = from.max(*us) - us;
            let b = to.min(ue) - us;
            out.extend_from_slice(&frame[a as usize..b as usize]);
        }
        out
    };
    let chunk = idx.chunk_size as u64;
    let mut bytes = Vec::new();
    for i in 0..size.div_ceil(chunk) {
        let from = offset + i * chunk;
        let to = (from + chunk).min(offset + size);
        let piece = range(from, to);
        assert_eq!(
            <[u8; 32]>::from(Sha256::digest(&piece)),
            idx.chunks[first_chunk + i as usize],
            "chunk {i}"
        );
        bytes.extend(piece);
    }
    bytes
}

#[test]
fn a_pushed_cache_is_read_by_stock_nix_and_by_file_through_signed_indexes() {
    let tmp = TempRoot::new("cachepush");
    let nix = NixStore::new(&tmp.join("nix"), "push-1");
    let top = common::nix::mixed_closure(&nix);
    let cache = tmp.join("cache");
    let out = nix.cache_push(&cache, &["--frame-size", "64KiB", "--chunk-size", "16KiB"], &[&top]);
    // The whole closure, found by scanning for references as Nix does.
    let mut published: Vec<&str> = out.lines().collect();
    published.sort();
    let mut want = nix.closure(&top);
    want.sort();
    assert_eq!(published, want);
    // Pushing again publishes nothing new.
    let out = nix.cache_push(&cache, &[], &[&top]);
    assert!(out.is_empty(), "{out}");

    // Stock Nix reads it, and registers the same references.
    let fresh = stock_nix_copies(&tmp, "fresh", &cache, &nix.public_key, &top);
    for p in &want {
        let refs = |store: &NixStore| {
            let out = Command::new("nix-store")
                .arg("--store")
                .arg(&store.root)
                .args(["--query", "--references", p])
                .output()
                .unwrap();
            let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect();
            v.sort();
            v
        };
        assert_eq!(refs(&fresh), refs(&nix), "references of {p}");
    }

    // Every index is signed by the cache's key (no other), names the
    // narinfo's NarHash, and yields the store path's files chunk by chunk.
    let trusted = PublicKey::parse(&nix.public_key).unwrap();
    let stranger = PublicKey::parse("other-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=").unwrap();
    for p in &want {
        let sp = StorePath::parse(p).unwrap();
        let info = NarInfo::parse(&std::fs::read_to_string(cache.join(format!("{}.narinfo", sp.hash_part()))).unwrap())
            .unwrap();
        let idx = FileIndex::parse(&std::fs::read(cache.join(format!("{}.idx", sp.hash_part()))).unwrap()).unwrap();
        assert_eq!(idx.verify(std::slice::from_ref(&trusted)), Ok("push-1".into()));
        assert!(idx.verify(std::slice::from_ref(&stranger)).is_err());
        assert_eq!((idx.nar_hash, idx.nar_size), (info.nar_hash, info.nar_size));
        assert_eq!(idx.url.as_deref(), Some(info.url.as_str()));
    }
    let data = want.iter().find(|p| p.ends_with("-data")).unwrap();
    let sp = StorePath::parse(data).unwrap();
    let idx = FileIndex::parse(&std::fs::read(cache.join(format!("{}.idx", sp.hash_part()))).unwrap()).unwrap();
    assert!(idx.frames.len() > 40, "{} frames", idx.frames.len());
    let real = nix.real(data);
    for f in ["share/big", "share/deep/a", "share/deep/b"] {
        assert_eq!(
            read_through_index(&cache, &idx, f.as_bytes()),
            std::fs::read(real.join(f)).unwrap(),
            "{f}"
        );
    }
    assert_eq!(
        idx.entry(b"share/link").unwrap().kind,
        EntryKind::Symlink {
            target: b"deep/a".to_vec()
        }
    );

    // Our own whole-path fetch reads the seekable NARs as any zstd NAR.
    let cfg = common::cache_config(&tmp.path, &format!("file://{}", cache.display()), &nix.public_key, "");
    let root = tmp.join("root");
    let (ok, _, err) = ours(&[
        "--root",
        root.to_str().unwrap(),
        "fetch",
        "--config",
        cfg.to_str().unwrap(),
        "--closure",
        &top,
    ]);
    assert!(ok, "{err}");
    for p in &want {
        let base = StorePath::parse(p).unwrap().base_name().to_string();
        assert_eq!(
            common::nix::dump_sha256(&root.join("store").join(&base)),
            common::nix::dump_sha256(&nix.real(p)),
            "{p}"
        );
    }
}

#[test]
fn a_cache_stock_nix_wrote_gets_indexes_and_stays_readable_and_a_bad_nar_is_named() {
    let tmp = TempRoot::new("cacheindex");
    let nix = NixStore::new(&tmp.join("nix"), "index-1");
    let top = common::nix::mixed_closure(&nix);
    for (compression, name) in [("xz", "xzcache"), ("zstd", "zstdcache")] {
        let cache = tmp.join(name);
        nix.publish(&cache, compression, std::slice::from_ref(&top));
        let (ok, out, err) = index_cache(&nix, &cache);
        assert!(ok, "{err}");
        assert_eq!(out.lines().count(), nix.closure(&top).len(), "{out}");
        // Stock Nix still reads the cache (the narinfos now point at the
        // seekable NARs, their signatures unchanged).
        stock_nix_copies(&tmp, &format!("{name}-fresh"), &cache, &nix.public_key, &top);
        let trusted = PublicKey::parse(&nix.public_key).unwrap();
        for p in nix.closure(&top) {
            let sp = StorePath::parse(&p).unwrap();
            let idx = FileIndex::parse(&std::fs::read(cache.join(format!("{}.idx", sp.hash_part()))).unwrap()).unwrap();
            assert!(idx.verify(std::slice::from_ref(&trusted)).is_ok());
            assert!(idx.url.as_deref().unwrap().ends_with(".nar.zst"));
        }
        // Again: all there.
        let (ok, out, _) = index_cache(&nix, &cache);
        assert!(ok && out.is_empty(), "{out}");
    }

    // A cache whose NAR does not match its narinfo: named, nothing written.
    let cache = tmp.join("bad");
    nix.publish(&cache, "none", std::slice::from_ref(&top));
    let data = nix.closure(&top).into_iter().find(|p| p.ends_with("-data")).unwrap();
    let sp = StorePath::parse(&data).unwrap();
    let info =
        NarInfo::parse(&std::fs::read_to_string(cache.join(format!("{}.narinfo", sp.hash_part()))).unwrap()).unwrap();
    let nar = cache.join(&info.url);
    let mut bytes = std::fs::read(&nar).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&nar, bytes).unwrap();
    let (ok, _, err) = index_cache(&nix, &cache);
    assert!(!ok && err.contains(&data) && err.contains("hashes to"), "{err}");
    assert!(!cache.join(format!("{}.idx", sp.hash_part())).exists());
    assert_eq!(
        NarInfo::parse(&std::fs::read_to_string(cache.join(format!("{}.narinfo", sp.hash_part()))).unwrap()).unwrap(),
        info,
        "the narinfo of a refused path was changed"
    );

    // A bad key file is named.
    let bad = tmp.join("bad.key");
    std::fs::write(&bad, "nonsense").unwrap();
    let (ok, _, err) = ours(&[
        "cache",
        "index",
        "--secret-key",
        bad.to_str().unwrap(),
        cache.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("bad.key"), "{err}");
}
