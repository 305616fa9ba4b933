//! File-granular fetching at the store: a path of a cache made by `cache
//! push` is read file by file through its signed index, over HTTP ranged
//! requests to 127.0.0.1, fetching only the frames under the bytes asked
//! for; every chunk is verified before it is served or kept. A tampered
//! frame is never served, and an index the store may not trust is ignored
//! (the path is then fetched whole).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::http::Server;
use common::nix::{mixed_closure, NixStore};
use common::TempRoot;
use nix_snapshotter::nixfmt::index::FileIndex;
use nix_snapshotter::nixfmt::signature::SecretKey;
use nix_snapshotter::nixfmt::StorePath;
use nix_snapshotter::store::Store;
use sha2::{Digest, Sha256};

struct Fixture {
    tmp: TempRoot,
    nix: NixStore,
    cache: PathBuf,
    data: StorePath,
}

fn fixture(name: &str) -> Fixture {
    fixture_with(name, "16KiB")
}

/// The closure pushed with chunks of `chunk_size`.
fn fixture_with(name: &str, chunk_size: &str) -> Fixture {
    let tmp = TempRoot::new(name);
    let nix = NixStore::new(&tmp.join("nix"), "chunks-1");
    let top = mixed_closure(&nix);
    let cache = tmp.join("cache");
    nix.cache_push(&cache, &["--frame-size", "64KiB", "--chunk-size", chunk_size], &[&top]);
    let data = nix.closure(&top).into_iter().find(|p| p.ends_with("-data")).unwrap();
    Fixture {
        data: StorePath::parse(&data).unwrap(),
        tmp,
        nix,
        cache,
    }
}

async fn store(root: &Path, url: &str, key: &str) -> Arc<Store> {
    store_with(root, url, key, |_| {}).await
}

async fn store_with(
    root: &Path,
    url: &str,
    key: &str,
    tune: impl FnOnce(&mut nix_snapshotter::config::Config),
) -> Arc<Store> {
    let mut cfg = nix_snapshotter::config::Config {
        root: root.to_path_buf(),
        substituters: vec![url.to_string()],
        trusted_public_keys: vec![key.to_string()],
        host_store: "".into(),
        ..Default::default()
    };
    tune(&mut cfg);
    let db = nix_snapshotter::db::open_root(&cfg.root).unwrap();
    nix_snapshotter::store::open_from_config(&cfg, db).await.unwrap()
}

/// Bytes asked for by ranged GETs of NAR files, and whole NAR GETs.
fn nar_traffic(server: &Server) -> (u64, usize) {
    let mut ranged = 0;
    let mut whole = 0;
    for l in server.log().iter().filter(|l| l.contains("/nar/")) {
        match l.split_once(" bytes=") {
            Some((_, r)) => {
                let (a, b) = r.split_once('-').unwrap();
                ranged += b.parse::<u64>().unwrap() - a.parse::<u64>().unwrap() + 1;
            }
            None => whole += 1,
        }
    }
    (ranged, whole)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_small_file_of_a_large_path_costs_a_frame_and_every_byte_is_verified() {
    let f = fixture("chunkreads");
    let server = Server::start(f.cache.clone());
    let s = store(&f.tmp.join("root"), &server.url(), &f.nix.public_key).await;
    let ix = s.indexed(&f.data).await.expect("the pushed path has a trusted index");
    let real = f.nix.real(&f.data.to_string());

    let small = s.read_indexed(&ix, b"share/deep/a", 0, 1 << 20).await.unwrap();
    assert_eq!(small, b"small one\n");
    let (ranged, whole) = nar_traffic(&server);
    let nar_file = std::fs::metadata(f.cache.join(ix.index.url.as_ref().unwrap()))
        .unwrap()
        .len();
    assert_eq!(whole, 0, "{:#?}", server.log());
    // One frame of at most 64 KiB of random-free data, out of a 3 MiB NAR.
    assert!(ranged > 0 && ranged <= 64 << 10, "{ranged} bytes of {nar_file}");

    // The middle of the big file: the frames under it, verified chunk by
    // chunk; then again, from the chunks kept on disk, with no request.
    let big = std::fs::read(real.join("share/big")).unwrap();
    let at = (1 << 20) + 5;
    let got = s.read_indexed(&ix, b"share/big", at as u64, 100_000).await.unwrap();
    assert_eq!(got, big[at..at + 100_000]);
    let requests = server.log().len();
    let again = s.read_indexed(&ix, b"share/big", at as u64, 100_000).await.unwrap();
    assert_eq!(again, got);
    assert_eq!(server.log().len(), requests, "kept chunks were fetched again");
    // Reads past the end are cut short; the whole file reads back.
    let tail = s
        .read_indexed(&ix, b"share/big", big.len() as u64 - 10, 100)
        .await
        .unwrap();
    assert_eq!(tail, big[big.len() - 10..]);
    let all = s.read_indexed(&ix, b"share/big", 0, u64::MAX).await.unwrap();
    assert_eq!(all, big);
    // Not a file: named.
    let e = s.read_indexed(&ix, b"share/deep", 0, 10).await.unwrap_err().to_string();
    assert!(e.contains("share/deep") && e.contains("not a file"), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tampered_frame_is_never_served_or_kept() {
    let f = fixture("chunktamper");
    let idx = FileIndex::parse(&std::fs::read(f.cache.join(format!("{}.idx", f.data.hash_part()))).unwrap()).unwrap();
    // Flip a byte in the middle of the NAR file (inside the big file's frames).
    let nar = f.cache.join(idx.url.as_ref().unwrap());
    let mut bytes = std::fs::read(&nar).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&nar, bytes).unwrap();
    let server = Server::start(f.cache.clone());
    let root = f.tmp.join("root");
    let s = store(&root, &server.url(), &f.nix.public_key).await;
    let ix = s.indexed(&f.data).await.unwrap();
    let e = s
        .read_indexed(&ix, b"share/big", 0, u64::MAX)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&f.data.to_string()) && (e.contains("does not match") || e.contains("does not decompress")),
        "{e}"
    );
    // Chunks of the frames before the damage verified and may be kept;
    // whatever is on disk is a chunk of the index, named by its own hash.
    let real = std::fs::read(f.nix.real(&f.data.to_string()).join("share/big")).unwrap();
    let kept = walk_files(&root.join("chunks"));
    for k in &kept {
        let b = std::fs::read(k).unwrap();
        let hash: [u8; 32] = Sha256::digest(&b).into();
        let hex: String = hash.iter().map(|x| format!("{x:02x}")).collect();
        assert_eq!(
            k.file_name().unwrap().to_string_lossy(),
            hex,
            "{} is not what its name says",
            k.display()
        );
        assert!(idx.chunks.contains(&hash), "{} is no chunk of the index", k.display());
    }
    // Not the damaged one: fewer than all of the big file's chunks.
    let big_chunks = real.len().div_ceil(16 << 10);
    let kept_of_big = real
        .chunks(16 << 10)
        .filter(|c| {
            let hex: String = Sha256::digest(c).iter().map(|x| format!("{x:02x}")).collect();
            root.join("chunks").join(&hex[..2]).join(&hex).exists()
        })
        .count();
    assert!(
        kept_of_big < big_chunks,
        "all {big_chunks} chunks of the damaged file were kept"
    );
}

fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk_files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn an_index_the_store_may_not_trust_is_ignored() {
    let f = fixture("chunktrust");
    let idx_path = f.cache.join(format!("{}.idx", f.data.hash_part()));
    let original = std::fs::read(&idx_path).unwrap();
    let server = Server::start(f.cache.clone());

    // Signed by a key nobody trusts (the narinfo still is trusted).
    let stranger = NixStore::new(&f.tmp.join("stranger"), "stranger-1");
    let key = SecretKey::parse(&std::fs::read_to_string(&stranger.secret_key).unwrap()).unwrap();
    let mut idx = FileIndex::parse(&original).unwrap();
    idx.sigs.clear();
    idx.sign(&key);
    std::fs::write(&idx_path, idx.to_bytes()).unwrap();
    let s = store(&f.tmp.join("root1"), &server.url(), &f.nix.public_key).await;
    assert!(s.indexed(&f.data).await.is_none());
    // The path is still fetched, whole.
    assert!(s.ensure(&f.data).await.is_ok());

    // A body changed under a valid header: refused as malformed.
    let mut bad = original.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    std::fs::write(&idx_path, bad).unwrap();
    let s = store(&f.tmp.join("root2"), &server.url(), &f.nix.public_key).await;
    assert!(s.indexed(&f.data).await.is_none());

    // Valid and trusted, but for another store path.
    let mut other = FileIndex::parse(&original).unwrap();
    let tool = std::fs::read_dir(&f.cache)
        .unwrap()
        .flatten()
        .find_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            (n.ends_with(".idx") && !n.starts_with(f.data.hash_part())).then(|| e.path())
        })
        .unwrap();
    other.store_path = FileIndex::parse(&std::fs::read(tool).unwrap()).unwrap().store_path;
    other.sigs.clear();
    other.sign(&SecretKey::parse(&std::fs::read_to_string(&f.nix.secret_key).unwrap()).unwrap());
    std::fs::write(&idx_path, other.to_bytes()).unwrap();
    let s = store(&f.tmp.join("root3"), &server.url(), &f.nix.public_key).await;
    assert!(s.indexed(&f.data).await.is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_path_read_far_enough_becomes_whole_from_its_chunks_and_matches_its_nar_hash() {
    let f = fixture("chunkcomplete");
    let server = Server::start(f.cache.clone());
    let root = f.tmp.join("root");
    let s = store(&root, &server.url(), &f.nix.public_key).await;
    let ix = s.indexed(&f.data).await.unwrap();
    // The big file is most of the path: past half of it (the default
    // [store] complete_after), the path is completed in the background.
    let big = s.read_indexed(&ix, b"share/big", 0, u64::MAX).await.unwrap();
    assert_eq!(big.len(), 3 << 20);
    common::wait_until(
        std::time::Duration::from_secs(30),
        || s.local(&f.data).is_some(),
        || "the path was not completed".into(),
    );
    let base = f.data.base_name().to_string();
    assert_eq!(
        common::nix::dump_sha256(&root.join("store").join(&base)),
        common::nix::dump_sha256(&f.nix.real(&f.data.to_string())),
        "the completed path is not the store path"
    );
    // Made from the chunks here and the frames missing: never downloaded
    // whole, and fewer bytes than the NAR file.
    let (ranged, whole) = nar_traffic(&server);
    let nar_file = std::fs::metadata(f.cache.join(ix.index.url.as_ref().unwrap()))
        .unwrap()
        .len();
    assert_eq!(whole, 0, "{:#?}", server.log());
    assert!(
        ranged <= nar_file + (64 << 10),
        "{ranged} bytes for a {nar_file}-byte NAR"
    );
    // Its chunks went with it: the files are on disk now.
    assert_eq!(walk_files(&root.join("chunks")), Vec::<PathBuf>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn kept_chunks_count_against_the_store_bound_and_the_oldest_go() {
    let f = fixture("chunkgc");
    let server = Server::start(f.cache.clone());
    let root = f.tmp.join("root");
    let s = store_with(&root, &server.url(), &f.nix.public_key, |c| {
        c.store.max_size = nix_snapshotter::config::ByteSize(1 << 20);
        c.store.complete_after = 2.0;
    })
    .await;
    let ix = s.indexed(&f.data).await.unwrap();
    let real = std::fs::read(f.nix.real(&f.data.to_string()).join("share/big")).unwrap();
    // 3 MiB read in pieces: 3 MiB of chunks kept, over a 1 MiB bound.
    for at in (0..real.len()).step_by(256 << 10) {
        let got = s.read_indexed(&ix, b"share/big", at as u64, 256 << 10).await.unwrap();
        assert_eq!(got, real[at..(at + (256 << 10)).min(real.len())]);
    }
    let on_disk = || {
        walk_files(&root.join("chunks"))
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok()) // the collector may be at work
            .map(|m| m.len())
            .sum::<u64>()
    };
    common::wait_until(
        std::time::Duration::from_secs(20),
        || on_disk() <= 1 << 20,
        || format!("{} bytes of chunks kept over a 1 MiB bound", on_disk()),
    );
    // What went is fetched again when read, verified as before.
    let again = s.read_indexed(&ix, b"share/big", 0, u64::MAX).await.unwrap();
    assert_eq!(again, real);
}

#[tokio::test(flavor = "multi_thread")]
async fn chunks_larger_than_the_read_ahead_read_from_a_files_start() {
    // 4 MiB chunks: more than the 1 MiB a read looks ahead.
    let f = fixture_with("chunkbig", "4MiB");
    let server = Server::start(f.cache.clone());
    let s = store(&f.tmp.join("root"), &server.url(), &f.nix.public_key).await;
    let ix = s.indexed(&f.data).await.unwrap();
    assert_eq!(
        s.read_indexed(&ix, b"share/deep/a", 0, 100).await.unwrap(),
        b"small one\n"
    );
    let real = std::fs::read(f.nix.real(&f.data.to_string()).join("share/big")).unwrap();
    assert_eq!(s.read_indexed(&ix, b"share/big", 0, 4096).await.unwrap(), real[..4096]);
}
