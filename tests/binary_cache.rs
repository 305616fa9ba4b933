//! The binary-cache client and the verified local store against caches
//! written by real Nix, served over HTTP on 127.0.0.1 (and file://), with
//! every kind of bad input a cache can send.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine;
use common::http::{Fault, Server};
use common::nix::{derivation, dump_sha256, NixStore};
use common::{TempRoot, DAEMON};
use ed25519_dalek::Signer;
use nix_snapshotter::nixfmt::{NarInfo, StorePath};

/// Built once per test binary: a closure with every kind of entry, and caches of it.
struct Fixture {
    _dir: TempRoot,
    nix: NixStore,
    top: String,
    tool: String,
    data: String,
    big: String,
    /// compression -> cache directory
    caches: Vec<(&'static str, PathBuf)>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = TempRoot::leaked("nixfix");
        let nix = NixStore::new(&dir.join("nix"), "test-cache-1");
        let data = derivation(
            "data",
            r#"b mkdir -p $out/empty-dir $out/deep/1/2/3/4/5/6/7/8/9/10/11/12/13/14/15/16/17/18/19/20
b touch $out/empty-file
b printf 'leaf\n' > $out/deep/1/2/3/4/5/6/7/8/9/10/11/12/13/14/15/16/17/18/19/20/leaf
b printf 'spaces\n' > "$out/name with spaces"
b printf 'unicode\n' > "$out/ünïcödé-файл-✓"
b printf '#!/bin/sh\necho hello\n' > $out/run.sh
b chmod 755 $out/run.sh
b ln -s run.sh $out/rel-link
b ln -s /nix/store/00000000000000000000000000000000-nothing $out/dangling
b ln -s deep/1/2 $out/dir-link
b seq 1 200000 > $out/numbers.txt"#,
            &[],
        );
        let expr =
            format!(
            r#"let
  data = {data};
  big = {big};
  tool = {tool};
in {{ top = {top}; inherit data big tool; }}"#,
            big = derivation("big", "b mkdir $out; b dd if=/dev/urandom of=$out/blob bs=1M count=101 2>/dev/null", &[]),
            tool = derivation(
                "tool",
                "b mkdir -p $out/bin; b cp /bin/busybox $out/bin/busybox; b ln -s ${data}/run.sh $out/bin/run",
                &["data"]
            ),
            top = derivation(
                "top",
                "b mkdir $out; b ln -s ${tool} $out/tool; b ln -s ${big}/blob $out/blob; b echo ${data} > $out/refs",
                &["tool", "big"]
            ),
        );
        let outs = nix.build(&expr);
        let find = |suffix: &str| outs.iter().find(|o| o.ends_with(suffix)).unwrap().clone();
        let (top, tool, data, big) = (find("-top"), find("-tool"), find("-data"), find("-big"));
        let mut caches = Vec::new();
        for (compression, roots) in [
            ("zstd", vec![top.clone()]),
            ("none", vec![top.clone()]),
            ("xz", vec![tool.clone()]),
        ] {
            let c = dir.join(&format!("cache-{compression}"));
            nix.publish(&c, compression, &roots);
            caches.push((compression, c));
        }
        Fixture {
            _dir: dir,
            nix,
            top,
            tool,
            data,
            big,
            caches,
        }
    })
}

fn cache_dir(compression: &str) -> &'static Path {
    &fixture().caches.iter().find(|(c, _)| *c == compression).unwrap().1
}

/// A private copy of a fixture cache that a test may break.
fn copy_cache(compression: &str, to: &Path) {
    let st = Command::new("cp")
        .arg("-r")
        .arg(cache_dir(compression))
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}

fn write_config(dir: &Path, substituters: &[String], key: &str, extra: &str) -> PathBuf {
    let cfg = dir.join("config.toml");
    let list = |v: &[String]| v.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ");
    std::fs::write(
        &cfg,
        format!(
            "substituters = [{}]\ntrusted_public_keys = [{}]\nhost_store = \"\"\n{extra}",
            list(substituters),
            list(&[key.to_string()])
        ),
    )
    .unwrap();
    cfg
}

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn fetch_cli(cfg: &Path, root: &Path, args: &[&str]) -> Run {
    let out = Command::new(DAEMON)
        .arg("--config")
        .arg(cfg)
        .arg("--root")
        .arg(root)
        .arg("fetch")
        .args(args)
        .output()
        .unwrap();
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn narinfo_of(cache: &Path, store_path: &str) -> NarInfo {
    let p = StorePath::parse(store_path).unwrap();
    NarInfo::parse(&std::fs::read_to_string(cache.join(format!("{}.narinfo", p.hash_part()))).unwrap()).unwrap()
}

/// Store entries (ignoring nothing): what a failed fetch must not leave.
fn store_entries(root: &Path) -> Vec<String> {
    std::fs::read_dir(root.join("store"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn real_nix_caches_fetch_byte_identical_over_http() {
    let f = fixture();
    let tmp = TempRoot::new("bc");
    for (compression, root_path) in [("zstd", &f.top), ("none", &f.top), ("xz", &f.tool)] {
        let cache = cache_dir(compression);
        let server = Server::start(cache.to_path_buf());
        let cfg = write_config(&tmp.path, &[server.url()], &f.nix.public_key, "");
        let root = tmp.join(&format!("root-{compression}"));
        let run = fetch_cli(&cfg, &root, &["--closure", root_path]);
        assert!(run.ok, "{compression}: {}", run.stderr);
        let closure = f.nix.closure(root_path);
        let printed: Vec<&str> = run.stdout.lines().collect();
        assert_eq!(printed.len(), closure.len(), "{compression}: printed {printed:?}");
        assert!(
            run.stderr.contains("downloaded") && run.stderr.contains("on disk"),
            "{}",
            run.stderr
        );
        for p in &closure {
            let sp = StorePath::parse(p).unwrap();
            let ours = root.join("store").join(sp.base_name());
            let info = narinfo_of(cache, p);
            assert_eq!(
                dump_sha256(&ours),
                info.nar_hash.to_hex(),
                "{compression}: {p} differs from the original"
            );
        }
        // Each NAR downloaded exactly once.
        assert_eq!(
            server.count(".nar") + server.count(".nar.zst") + server.count(".nar.xz"),
            closure.len()
        );
    }
    // file:// works the same way.
    let cfg = write_config(
        &tmp.path,
        &[format!("file://{}", cache_dir("zstd").display())],
        &f.nix.public_key,
        "",
    );
    let root = tmp.join("root-file");
    let run = fetch_cli(&cfg, &root, &["--closure", &f.tool]);
    assert!(run.ok, "{}", run.stderr);
    let ours = root.join("store").join(StorePath::parse(&f.data).unwrap().base_name());
    assert_eq!(std::fs::read_link(ours.join("rel-link")).unwrap(), Path::new("run.sh"));
    assert_eq!(std::fs::read(ours.join("name with spaces")).unwrap(), b"spaces\n");
    // The big path came through intact too (checked above by NarHash); and
    // store files are read-only, directories too.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(ours.join("run.sh")).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o555);
    let _ = &f.big;
}

/// Re-signs a narinfo after editing it, with the fixture's key (or another).
fn sign(info_text: &str, secret_key_file: &Path) -> String {
    let secret = std::fs::read_to_string(secret_key_file).unwrap();
    let (name, b64) = secret.trim().split_once(':').unwrap();
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
    let key = ed25519_dalek::SigningKey::from_bytes(&bytes[..32].try_into().unwrap());
    let unsigned: String = info_text
        .lines()
        .filter(|l| !l.starts_with("Sig:"))
        .map(|l| format!("{l}\n"))
        .collect();
    let info = NarInfo::parse(&unsigned).unwrap();
    let sig = key.sign(info.fingerprint().as_bytes());
    format!(
        "{unsigned}Sig: {name}:{}\n",
        base64::engine::general_purpose::STANDARD.encode(sig.to_bytes())
    )
}

fn narinfo_path(cache: &Path, store_path: &str) -> PathBuf {
    cache.join(format!("{}.narinfo", StorePath::parse(store_path).unwrap().hash_part()))
}

/// Hand-made NAR of a directory with regular-file entries named `names`.
fn dir_nar(names: &[&[u8]]) -> Vec<u8> {
    fn s(out: &mut Vec<u8>, x: &[u8]) {
        out.extend((x.len() as u64).to_le_bytes());
        out.extend(x);
        out.extend(&[0u8; 8][..(8 - x.len() % 8) % 8]);
    }
    let mut n = Vec::new();
    for t in [&b"nix-archive-1"[..], b"(", b"type", b"directory"] {
        s(&mut n, t);
    }
    for name in names {
        for t in [
            &b"entry"[..],
            b"(",
            b"name",
            name,
            b"node",
            b"(",
            b"type",
            b"regular",
            b"contents",
            b"x",
            b")",
            b")",
        ] {
            s(&mut n, t);
        }
    }
    s(&mut n, b")");
    n
}

/// Replaces `data`'s NAR in a `none` cache by `nar`, with a correct, signed narinfo.
fn plant_nar(cache: &Path, store_path: &str, nar: &[u8], key: &Path) {
    use sha2::Digest;
    let info_file = narinfo_path(cache, store_path);
    let text = std::fs::read_to_string(&info_file).unwrap();
    let info = NarInfo::parse(&text).unwrap();
    std::fs::write(cache.join(&info.url), nar).unwrap();
    let hash = nix_snapshotter::nixfmt::NixHash {
        sha256: sha2::Sha256::digest(nar).into(),
    };
    let edited: String = text
        .lines()
        .map(|l| {
            if l.starts_with("NarHash:") || l.starts_with("FileHash:") {
                format!("{}: {hash}\n", l.split(':').next().unwrap())
            } else if l.starts_with("NarSize:") || l.starts_with("FileSize:") {
                format!("{}: {}\n", l.split(':').next().unwrap(), nar.len())
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    std::fs::write(&info_file, sign(&edited, key)).unwrap();
}

#[test]
fn bad_caches_give_clear_errors_and_store_nothing() {
    let f = fixture();
    let tmp = TempRoot::new("bad");
    let other_key = NixStore::new(&tmp.join("other"), "stranger-1");
    let data = f.data.as_str();

    type Edit = Box<dyn Fn(&Path)>;
    let edit_narinfo = |g: fn(String) -> String| -> Edit {
        let data = data.to_string();
        Box::new(move |c: &Path| {
            let p = narinfo_path(c, &data);
            let t = std::fs::read_to_string(&p).unwrap();
            std::fs::write(&p, g(t)).unwrap();
        })
    };
    let key = f.nix.secret_key.clone();
    let other = other_key.secret_key.clone();
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "tampered NAR",
            Box::new(move |c: &Path| {
                let info = narinfo_of(c, data);
                let nar = c.join(&info.url);
                let mut bytes = std::fs::read(&nar).unwrap();
                let at = bytes.windows(5).position(|w| w == b"leaf\n").unwrap();
                bytes[at] = b'L';
                std::fs::write(&nar, bytes).unwrap();
            }),
            "NarHash mismatch",
        ),
        (
            "bad signature",
            edit_narinfo(|t| {
                t.lines()
                    .map(|l| {
                        if l.starts_with("Sig:") {
                            format!("{}AAAA==\n", &l[..l.len() - 8])
                        } else {
                            format!("{l}\n")
                        }
                    })
                    .collect()
            }),
            "does not verify",
        ),
        (
            "untrusted key",
            {
                let other = other.clone();
                Box::new(move |c: &Path| {
                    let p = narinfo_path(c, data);
                    let t = std::fs::read_to_string(&p).unwrap();
                    std::fs::write(&p, sign(&t, &other)).unwrap();
                })
            },
            "untrusted keys stranger-1",
        ),
        (
            "no signature",
            edit_narinfo(|t| {
                t.lines()
                    .filter(|l| !l.starts_with("Sig:"))
                    .map(|l| format!("{l}\n"))
                    .collect()
            }),
            "no signature",
        ),
        (
            "NarSize smaller than the stream",
            {
                let key = key.clone();
                Box::new(move |c: &Path| {
                    let p = narinfo_path(c, data);
                    let t = std::fs::read_to_string(&p).unwrap();
                    let info = NarInfo::parse(&t).unwrap();
                    let t = t.replace(
                        &format!("NarSize: {}", info.nar_size),
                        &format!("NarSize: {}", info.nar_size / 2),
                    );
                    std::fs::write(&p, sign(&t, &key)).unwrap();
                })
            },
            "larger than its NarSize",
        ),
        (
            "malformed narinfo",
            edit_narinfo(|t| t.replace("NarSize:", "NarSize: lots\nX:")),
            "narinfo rejected",
        ),
        (
            "narinfo for another path",
            edit_narinfo(|t| t.replace("-data\n", "-atad\n")),
            "narinfo rejected",
        ),
    ];
    let mut cases = cases;
    for (label, name) in [
        ("entry named ..", &b".."[..]),
        ("entry named .", b"."),
        ("entry with /", b"a/b"),
        ("entry with NUL", b"a\0b"),
    ] {
        let key = key.clone();
        cases.push((
            label,
            Box::new(move |c: &Path| plant_nar(c, data, &dir_nar(&[name]), &key)),
            "malformed NAR",
        ));
    }
    for (label, names) in [
        ("unsorted entries", vec![&b"b"[..], b"a"]),
        ("duplicate entries", vec![b"a", b"a"]),
    ] {
        let key = key.clone();
        cases.push((
            label,
            Box::new(move |c: &Path| plant_nar(c, data, &dir_nar(&names), &key)),
            "not strictly sorted",
        ));
    }

    for (i, (label, edit, expect)) in cases.iter().enumerate() {
        let cache = tmp.join(&format!("cache{i}"));
        copy_cache("none", &cache);
        edit(&cache);
        let server = Server::start(cache.clone());
        let cfg = write_config(&tmp.path, &[server.url()], &f.nix.public_key, "");
        let root = tmp.join(&format!("root{i}"));
        let run = fetch_cli(&cfg, &root, &[data]);
        assert!(!run.ok, "{label}: fetch succeeded");
        assert!(
            run.stderr.contains(expect),
            "{label}: expected {expect:?} in:\n{}",
            run.stderr
        );
        assert!(
            run.stderr.contains(data) && run.stderr.contains(&server.url()),
            "{label}: message must name path and cache:\n{}",
            run.stderr
        );
        assert!(
            store_entries(&root).is_empty(),
            "{label}: store not empty: {:?}",
            store_entries(&root)
        );
    }
}

#[test]
fn transfer_faults_are_retried_resumed_or_bounded() {
    let f = fixture();
    let tmp = TempRoot::new("faults");
    let cache = cache_dir("none");
    let info = narinfo_of(cache, &f.data);
    let fast = "[fetch]\nattempts = 3\nstall_timeout = 1.0\nconnect_timeout = 1.0\n";

    // Dropped once mid-transfer: resumed with a Range request, and correct.
    let server = Server::start(cache.to_path_buf());
    server.fault(".nar", Fault::DropAfter(1000), Some(1));
    let cfg = write_config(&tmp.path, &[server.url()], &f.nix.public_key, fast);
    let root = tmp.join("r1");
    let run = fetch_cli(&cfg, &root, &[&f.data]);
    assert!(run.ok, "{}", run.stderr);
    assert!(
        server.log().iter().any(|l| l.ends_with("bytes=1000-")),
        "no resume: {:?}",
        server.log()
    );
    let ours = root.join("store").join(StorePath::parse(&f.data).unwrap().base_name());
    assert_eq!(dump_sha256(&ours), info.nar_hash.to_hex());

    // Dropped every time: a bounded number of tries, then a clear error.
    let server = Server::start(cache.to_path_buf());
    server.fault(".nar", Fault::DropAfter(100), None);
    let cfg = write_config(&tmp.path, &[server.url()], &f.nix.public_key, fast);
    let root = tmp.join("r2");
    let run = fetch_cli(&cfg, &root, &[&f.data]);
    assert!(!run.ok);
    assert!(
        run.stderr.contains("transfer") && run.stderr.contains(&f.data),
        "{}",
        run.stderr
    );
    assert_eq!(server.count(".nar"), 3, "{:?}", server.log());
    assert!(store_entries(&root).is_empty());

    // Stalled: abandoned after the stall timeout, for each try.
    let server = Server::start(cache.to_path_buf());
    server.fault(".nar", Fault::StallAfter(100, Duration::from_secs(60)), None);
    let cfg = write_config(&tmp.path, &[server.url()], &f.nix.public_key, fast);
    let root = tmp.join("r3");
    let start = Instant::now();
    let run = fetch_cli(&cfg, &root, &[&f.data]);
    assert!(!run.ok);
    assert!(run.stderr.contains("stalled"), "{}", run.stderr);
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "stall not bounded: {:?}",
        start.elapsed()
    );
    assert!(store_entries(&root).is_empty());

    // 404: not found, asked once, not retried.
    let server = Server::start(tmp.join("empty-cache"));
    let cfg = write_config(&tmp.path, &[server.url()], &f.nix.public_key, fast);
    let run = fetch_cli(&cfg, &tmp.join("r4"), &[&f.data]);
    assert!(!run.ok);
    assert!(run.stderr.contains("not found in any substituter"), "{}", run.stderr);
    assert_eq!(server.count(".narinfo"), 1, "{:?}", server.log());

    // 5xx twice, then fine: retried.
    let server = Server::start(cache.to_path_buf());
    server.fault(".narinfo", Fault::Status(503), Some(2));
    let cfg = write_config(&tmp.path, &[server.url()], &f.nix.public_key, fast);
    let run = fetch_cli(&cfg, &tmp.join("r5"), &[&f.data]);
    assert!(run.ok, "{}", run.stderr);
    assert_eq!(server.count(".narinfo"), 3);

    // Unreachable cache: a clear error naming it.
    let cfg = write_config(&tmp.path, &["http://127.0.0.1:9".to_string()], &f.nix.public_key, fast);
    let run = fetch_cli(&cfg, &tmp.join("r6"), &[&f.data]);
    assert!(!run.ok);
    assert!(run.stderr.contains("127.0.0.1:9"), "{}", run.stderr);

    // Malformed nix-cache-info: refused, naming the cache.
    let bad = tmp.join("bad-info-cache");
    copy_cache("none", &bad);
    std::fs::write(bad.join("nix-cache-info"), "StoreDir: /gnu/store\n").unwrap();
    let server = Server::start(bad);
    let cfg = write_config(&tmp.path, &[server.url()], &f.nix.public_key, fast);
    let run = fetch_cli(&cfg, &tmp.join("r7"), &[&f.data]);
    assert!(!run.ok);
    assert!(
        run.stderr.contains("StoreDir") && run.stderr.contains(&server.url()),
        "{}",
        run.stderr
    );
}

async fn open_store(cfg: &nix_snapshotter::config::Config) -> Arc<nix_snapshotter::store::Store> {
    let db = nix_snapshotter::db::open_root(&cfg.root).unwrap();
    nix_snapshotter::store::open_from_config(cfg, db).await.unwrap()
}

fn config(root: &Path, url: String, key: &str, host: &str) -> nix_snapshotter::config::Config {
    nix_snapshotter::config::Config {
        root: root.to_path_buf(),
        substituters: vec![url],
        trusted_public_keys: vec![key.to_string()],
        host_store: host.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_requests_share_one_download() {
    let f = fixture();
    let tmp = TempRoot::new("flight");
    let server = Server::start(cache_dir("zstd").to_path_buf());
    let store = open_store(&config(&tmp.join("root"), server.url(), &f.nix.public_key, "")).await;
    let path = StorePath::parse(&f.big).unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (s, p) = (store.clone(), path.clone());
            tokio::spawn(async move { s.ensure(&p).await.map(|l| l.path().to_path_buf()) })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(server.count(".nar.zst"), 1, "{:?}", server.log());
    assert_eq!(server.count(".narinfo"), 1, "{:?}", server.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn host_store_paths_are_not_downloaded() {
    let f = fixture();
    let tmp = TempRoot::new("host");
    let server = Server::start(cache_dir("zstd").to_path_buf());
    let host = f.nix.root.join("nix/store");
    let store = open_store(&config(
        &tmp.join("root"),
        server.url(),
        &f.nix.public_key,
        host.to_str().unwrap(),
    ))
    .await;
    let loc = store.ensure(&StorePath::parse(&f.tool).unwrap()).await.unwrap();
    assert!(matches!(loc, nix_snapshotter::store::Location::Host(_)), "{loc:?}");
    assert_eq!(server.count(".nar.zst"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn gc_evicts_least_recently_used_but_never_leased_paths() {
    let f = fixture();
    let tmp = TempRoot::new("gc");
    let server = Server::start(cache_dir("zstd").to_path_buf());
    let mut cfg = config(&tmp.join("root"), server.url(), &f.nix.public_key, "");
    cfg.store.max_size = nix_snapshotter::config::ByteSize(0); // no automatic GC here
    let store = open_store(&cfg).await;
    let [data, tool, big] = [&f.data, &f.tool, &f.big].map(|p| StorePath::parse(p).unwrap());
    let (_, lease) = store.ensure_leased(&big).await.unwrap();
    store.ensure(&data).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    store.ensure(&tool).await.unwrap();
    let store2 = store.clone();
    // Bound far below the big path: everything evictable goes, oldest first, big stays.
    let report = tokio::task::spawn_blocking(move || store2.gc(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        report.removed,
        vec![data.base_name().to_string(), tool.base_name().to_string()]
    );
    assert_eq!(report.kept_in_use, 1);
    assert!(store.local(&big).is_some() && store.local(&data).is_none());
    drop(lease);
    let store2 = store.clone();
    let report = tokio::task::spawn_blocking(move || store2.gc(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(report.removed, vec![big.base_name().to_string()]);
    assert!(store_entries(&tmp.join("root")).is_empty());
    // Evicted paths come back on demand.
    store.ensure(&data).await.unwrap();
    assert_eq!(server.count(&narinfo_of(cache_dir("zstd"), &f.data).url), 2);
    let _ = &f.top;
}
