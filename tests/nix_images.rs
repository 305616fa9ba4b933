//! Nix images end to end: real Nix builds a closure and publishes it as a
//! signed cache on 127.0.0.1; a private containerd imports an image whose
//! Nix layer holds only mountpoints; containers run with an empty local
//! store and no host store, fetching only the store paths they touch.

mod common;

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use common::http::{Fault, Server};
use common::image::{self, nix_layer, write_oci_archive};
use common::nix::{busybox_tool, derivation, dump_sha256, NixStore};
use common::{unique, Containerd, Daemon, TempRoot};
use nix_snapshotter::nixfmt::{NarInfo, StorePath};

/// A closure of 25 store paths built once per test binary.
struct Fixture {
    _dir: TempRoot,
    nix: NixStore,
    cache: std::path::PathBuf,
    /// busybox at bin/busybox
    tool: String,
    /// a directory of data, with a greeting
    data: String,
    /// one filler whose file the container reads
    extra: String,
    /// a file store path: a script run by `tool`'s busybox
    exe: String,
    closure: Vec<(String, bool)>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = TempRoot::leaked("nixfix");
        let nix = NixStore::new(&dir.join("nix"), "images-1");
        let mut attrs = vec![
            format!("tool = {};", busybox_tool()),
            format!(
                "data = {};",
                derivation(
                    "data",
                    r#"b mkdir -p $out/deep/er $out/empty; b printf 'hello from the nix store\n' > $out/greeting; b touch $out/empty-file; b ln -s greeting $out/link; b printf 'x\n' > "$out/deep/er/odd name ✓""#,
                    &[]
                )
            ),
            format!(
                "exe = {};",
                derivation(
                    "exe",
                    "b printf '#!${tool}/bin/busybox sh\\ncat /hello.txt; ls /etc; cat /nix/store/*-data/link\\n' > $out; b chmod 555 $out",
                    &["tool"]
                )
            ),
        ];
        let mut refs = vec!["tool".to_string(), "data".to_string(), "exe".to_string()];
        for i in 0..21 {
            attrs.push(format!(
                "filler{i} = {};",
                derivation(&format!("filler{i}"), &format!("b mkdir $out; b printf 'filler {i}\\n' > $out/x"), &[])
            ));
            refs.push(format!("filler{i}"));
        }
        let expr = format!(
            "rec {{ {} top = {}; }}",
            attrs.join("\n"),
            derivation("top", "b mkdir $out; for r in $deps; do b echo $r >> $out/refs; done", &refs.iter().map(String::as_str).collect::<Vec<_>>()),
        );
        let built = nix.build_cache(&expr, "top", &dir.join("cache"));
        Fixture {
            cache: dir.join("cache"),
            _dir: dir,
            tool: built.find("-tool"),
            data: built.find("-data"),
            extra: built.find("-filler7"),
            exe: built.find("-exe"),
            closure: built.closure,
            nix,
        }
    })
}

fn config(dir: &Path, server: &Server, key: &str, extra: &str) -> std::path::PathBuf {
    common::cache_config(dir, &server.url(), key, extra)
}

/// Our daemon (root `<tmp>/root`, substituter `server`, extra config) and a
/// private containerd using it.
fn stack(tmp: &TempRoot, server: &Server, extra: &str) -> (std::path::PathBuf, Daemon, Containerd) {
    let cfg = config(&tmp.path, server, &fixture().nix.public_key, extra);
    let sock = tmp.join("nix.sock");
    let daemon = Daemon::start_with(&tmp.join("root"), &sock, &["--config", cfg.to_str().unwrap()], &[]);
    let ctrd = Containerd::start(&tmp.join("ctrd"), &sock);
    (cfg, daemon, ctrd)
}

/// `ctr run`, failing with both containerd's and our daemon's logs.
fn run(ctrd: &Containerd, daemon: &Daemon, args: &[&str]) -> String {
    run_in(ctrd, daemon, &ctrd.namespace, args)
}

/// [`run`] in namespace `ns`.
fn run_in(ctrd: &Containerd, daemon: &Daemon, ns: &str, args: &[&str]) -> String {
    let out = ctrd.ctr_run_in(ns, args);
    assert!(
        out.status.success(),
        "ctr {args:?} failed: {}\n--- nix-snapshotter log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        common::tail(
            &daemon
                .log_text()
                .lines()
                .filter(|l| !l.contains("capability"))
                .collect::<Vec<_>>()
                .join("\n"),
            40
        )
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Image `name` from `archive`, imported with `ctr images import` into the
/// test's namespace and with our `image load` into a second one, run once
/// from each: the two outputs.
fn import_and_load_then_run(ctrd: &Containerd, daemon: &Daemon, archive: &Path, name: &str) -> [String; 2] {
    ctrd.ctr_ok(&["images", "import", "--snapshotter", "nix", archive.to_str().unwrap()]);
    let imported = run(
        ctrd,
        daemon,
        &["run", "--rm", "--snapshotter", "nix", name, &unique("c")],
    );
    let ns = format!("{}-load", ctrd.namespace);
    load(ctrd, &ns, archive);
    let loaded = run_in(
        ctrd,
        daemon,
        &ns,
        &["run", "--rm", "--snapshotter", "nix", name, &unique("c")],
    );
    [imported, loaded]
}

/// `nix-snapshotter image load` of `archive` into namespace `ns` (our loader,
/// which unpacks through containerd's API itself, instead of `ctr`).
fn load(ctrd: &Containerd, ns: &str, archive: &Path) {
    let out = ctrd.image_load(ns, archive);
    assert!(
        out.status.success(),
        "image load {}: {}",
        archive.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn nar_downloads(server: &Server) -> Vec<String> {
    let mut v: Vec<String> = server
        .log()
        .into_iter()
        .filter(|l| l.contains("/nar/") && !l.contains("bytes="))
        .collect();
    v.sort();
    v
}

fn nar_url(store_path: &str) -> String {
    let f = fixture();
    let p = StorePath::parse(store_path).unwrap();
    let info =
        NarInfo::parse(&std::fs::read_to_string(f.cache.join(format!("{}.narinfo", p.hash_part()))).unwrap()).unwrap();
    format!("GET /{}", info.url)
}

#[test]
fn nix_image_runs_lazily_and_sees_exact_store_paths() {
    let f = fixture();
    assert!(f.closure.len() >= 20, "closure has only {} paths", f.closure.len());
    let tmp = TempRoot::new("nixe2e");
    let server = Server::start(f.cache.clone());
    let root = tmp.join("root");
    let (_cfg, daemon, ctrd) = stack(&tmp, &server, "[fuse]\nfetch_timeout = 20.0\n");

    // A pure Nix image: its only layer is the Nix layer.
    let bb = format!("{}/bin/busybox", f.tool);
    let image_name = "docker.io/library/nix-hello:latest";
    let archive = tmp.join("nix-hello.tar");
    let script = format!(
        "cat {data}/greeting; cat {extra}/x; n=0; for p in /nix/store/*; do n=$((n+1)); done; echo $n; echo changed > {data}/greeting; cat {data}/greeting",
        data = f.data,
        extra = f.extra
    );
    write_oci_archive(
        &archive,
        image_name,
        &[nix_layer(&f.closure, &[("bin/sh", bb.clone())])],
        &[&bb, "sh", "-c", &script],
    );
    ctrd.ctr_ok(&["images", "import", "--snapshotter", "nix", archive.to_str().unwrap()]);
    let out = run(
        &ctrd,
        &daemon,
        &["run", "--rm", "--snapshotter", "nix", image_name, &unique("c")],
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines.first(),
        Some(&"hello from the nix store"),
        "{out}\n{}",
        daemon.log_text()
    );
    assert_eq!(lines.get(1), Some(&"filler 7"), "{out}\n{}", daemon.log_text());
    assert_eq!(
        lines.get(2).map(|l| l.trim()),
        Some(f.closure.len().to_string().as_str()),
        "{out}"
    );
    assert_eq!(lines.get(3), Some(&"changed"), "write in the container failed: {out}");

    // Laziness: exactly the three store paths the container touched were downloaded.
    let mut expected: Vec<String> = [&f.tool, &f.data, &f.extra].iter().map(|p| nar_url(p)).collect();
    expected.sort();
    assert_eq!(
        nar_downloads(&server),
        expected,
        "fetched more (or less) than what was touched"
    );
    // Metadata of the closure may be prefetched; nothing beyond it.
    assert!(server.count(".narinfo") <= f.closure.len() + 3, "{:?}", server.log());

    // The write went to the container's upper layer, never into the store.
    let data_base = StorePath::parse(&f.data).unwrap().base_name().to_string();
    let ours = root.join("store").join(&data_base);
    assert_eq!(
        std::fs::read(ours.join("greeting")).unwrap(),
        b"hello from the nix store\n"
    );

    // The container is gone: its view goes with its snapshot (containerd's
    // GC removes the snapshot shortly after).
    let start = std::time::Instant::now();
    while std::fs::read_dir(root.join("fuse")).unwrap().count() > 0 {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "view not dropped with its last snapshot"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    // What a view shows is byte-identical to the original, for every path of
    // the closure (this fetches the rest). An active snapshot on the image
    // brings the view back.
    let view = ctrd.view_of_nix_layer("view-check", &root);
    for (base, _) in &f.closure {
        let seen = view.join("nix/store").join(base);
        let orig = f.nix.real(&format!("/nix/store/{base}"));
        assert_eq!(
            dump_sha256(&seen),
            dump_sha256(&orig),
            "{base} differs through the view"
        );
    }

    // An image built on an ordinary image: the Nix layer on top of normal layers,
    // and an entrypoint that is a file store path.
    let mut layers = image::busybox_layers();
    layers.push(nix_layer(&f.closure, &[]));
    let mixed = "docker.io/library/nix-mixed:latest";
    let archive = tmp.join("mixed.tar");
    write_oci_archive(&archive, mixed, &layers, &[&f.exe]);
    // Our loader applies the ordinary layers (the whiteout included) and
    // the Nix layer just as `ctr` does; no labels on either.
    for out in import_and_load_then_run(&ctrd, &daemon, &archive, mixed) {
        assert!(out.contains("hello from the top layer"), "{out}");
        assert!(out.contains("kept") && !out.contains("doomed"), "{out}");
        assert!(out.contains("hello from the nix store"), "{out}");
    }
    drop(ctrd);
    drop(daemon);
}

#[test]
fn unreachable_cache_gives_eio_then_recovers() {
    let f = fixture();
    let tmp = TempRoot::new("nixfault");
    let server = Server::start(f.cache.clone());
    server.fault("", Fault::Status(503), None);
    let (_cfg, daemon, ctrd) = stack(&tmp, &server, "[fetch]\nattempts = 2\n[fuse]\nfetch_timeout = 5.0\n");
    let mut layers = image::busybox_layers();
    layers.push(nix_layer(&f.closure, &[]));
    let name = "docker.io/library/nix-fault:latest";
    let archive = tmp.join("fault.tar");
    let cmd = format!("cat {}/greeting || echo READ-FAILED", f.data);
    write_oci_archive(&archive, name, &layers, &["/bin/sh", "-c", &cmd]);
    ctrd.ctr_ok(&["images", "import", "--snapshotter", "nix", archive.to_str().unwrap()]);
    let out = run(
        &ctrd,
        &daemon,
        &["run", "--rm", "--snapshotter", "nix", name, &unique("c")],
    );
    assert!(out.contains("READ-FAILED") && !out.contains("hello from"), "{out}");
    // The daemon is still healthy, and once the cache is back the same image works.
    server.clear_faults();
    let out = run(
        &ctrd,
        &daemon,
        &["run", "--rm", "--snapshotter", "nix", name, &unique("c")],
    );
    assert!(out.contains("hello from the nix store"), "{out}\n{}", daemon.log_text());
    drop(ctrd);
    drop(daemon);
}

#[test]
fn image_build_cli_is_reproducible_and_its_images_run() {
    let f = fixture();
    let tmp = TempRoot::new("imgbuild");
    let closure_file = tmp.join("store-paths");
    let paths: Vec<String> = f.closure.iter().map(|(b, _)| format!("/nix/store/{b}")).collect();
    std::fs::write(&closure_file, paths.join("\n") + "\n").unwrap();
    std::fs::write(tmp.join("copy.json"), serde_json::to_vec(&[&f.tool]).unwrap()).unwrap();
    std::fs::write(
        tmp.join("config.json"),
        serde_json::to_vec(&serde_json::json!({
            "Cmd": ["/bin/busybox", "sh", "-c", format!("cat {}/greeting", f.data)],
            "Env": ["PATH=/bin"],
        }))
        .unwrap(),
    )
    .unwrap();
    let build = |out: &Path, extra: &[&str]| {
        let st = std::process::Command::new(common::DAEMON)
            .args(["image", "build", "--config"])
            .arg(tmp.join("config.json"))
            .arg("--closure")
            .arg(&closure_file)
            .arg("--copy-to-root")
            .arg(tmp.join("copy.json"))
            .arg("--store-root")
            .arg(&f.nix.root)
            .args(extra)
            .arg(out)
            .output()
            .unwrap();
        assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    };
    let (a, b) = (tmp.join("a.tar"), tmp.join("b.tar"));
    build(&a, &["--ref", "docker.io/library/built:latest"]);
    build(&b, &["--ref", "docker.io/library/built:latest"]);
    assert_eq!(
        std::fs::read(&a).unwrap(),
        std::fs::read(&b).unwrap(),
        "image build is not reproducible"
    );

    // On top of an ordinary image.
    let base = tmp.join("base.tar");
    image::busybox_two_layers(&base, "docker.io/library/base:latest");
    let on_base = tmp.join("on-base.tar");
    build(
        &on_base,
        &[
            "--ref",
            "docker.io/library/built-on-base:latest",
            "--from-image",
            base.to_str().unwrap(),
        ],
    );

    let server = Server::start(f.cache.clone());
    let (_cfg, daemon, ctrd) = stack(&tmp, &server, "");
    ctrd.ctr_ok(&["images", "import", "--snapshotter", "nix", a.to_str().unwrap()]);
    let out = run(
        &ctrd,
        &daemon,
        &[
            "run",
            "--rm",
            "--snapshotter",
            "nix",
            "docker.io/library/built:latest",
            &unique("c"),
        ],
    );
    assert_eq!(out.trim(), "hello from the nix store");
    ctrd.ctr_ok(&["images", "import", "--snapshotter", "nix", on_base.to_str().unwrap()]);
    let out = run(
        &ctrd,
        &daemon,
        &[
            "run",
            "--rm",
            "--snapshotter",
            "nix",
            "docker.io/library/built-on-base:latest",
            &unique("c"),
            "sh",
            "-c",
            "cat /hello.txt; /bin/busybox ls /etc",
        ],
    );
    assert!(
        out.contains("hello from the top layer") && out.contains("kept") && !out.contains("doomed"),
        "{out}"
    );
    drop(ctrd);
    drop(daemon);
}

#[test]
fn concurrent_cold_containers_share_downloads_and_restart_keeps_working() {
    let f = fixture();
    let tmp = TempRoot::new("nixconc");
    let server = Server::start(f.cache.clone());
    let root = tmp.join("root");
    let (cfg, mut daemon, ctrd) = stack(&tmp, &server, "");
    let name = "docker.io/library/nix-conc:latest";
    let archive = tmp.join("conc.tar");
    let bb = format!("{}/bin/busybox", f.tool);
    // (The sleep: see tests/live_ops.rs, `Node::start`.)
    let script = format!("cat {}/greeting {}/x && sleep 0.2", f.data, f.extra);
    write_oci_archive(
        &archive,
        name,
        &[nix_layer(&f.closure, &[])],
        &[&bb, "sh", "-c", &script],
    );
    ctrd.ctr_ok(&["images", "import", "--snapshotter", "nix", archive.to_str().unwrap()]);

    // Eight containers at once on an empty store.
    let outs: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    run(
                        &ctrd,
                        &daemon,
                        &["run", "--rm", "--snapshotter", "nix", name, &unique("c")],
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for out in &outs {
        assert!(
            out.contains("hello from the nix store") && out.contains("filler 7"),
            "{out}\n--- daemon problems:\n{}",
            daemon.log_problems()
        );
    }
    let mut expected: Vec<String> = [&f.tool, &f.data, &f.extra].iter().map(|p| nar_url(p)).collect();
    expected.sort();
    assert_eq!(
        nar_downloads(&server),
        expected,
        "a store path was downloaded more than once"
    );

    // Restart the daemon while idle: snapshots and views come back from disk.
    daemon.stop();
    let daemon = Daemon::start_with(&root, &tmp.join("nix.sock"), &["--config", cfg.to_str().unwrap()], &[]);
    let start = std::time::Instant::now();
    loop {
        let o = ctrd.ctr(&["snapshots", "--snapshotter", "nix", "ls"]);
        if o.status.success() {
            break;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "containerd did not reconnect"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let out = run(
        &ctrd,
        &daemon,
        &["run", "--rm", "--snapshotter", "nix", name, &unique("c")],
    );
    assert!(out.contains("hello from the nix store"), "{out}");
    // Already local: nothing downloaded again.
    assert_eq!(nar_downloads(&server), expected);
    drop(ctrd);
    drop(daemon);
}

/// Debian's redis, packaged the Nix way: binaries and each group of shared
/// libraries in store paths of their own, binaries patched with patchelf to
/// load their interpreter and libraries from the store.
#[test]
fn redis_from_patched_debian_binaries_answers_pong() {
    let f = fixture();
    let tmp = TempRoot::new("redis");
    let redis = common::redis::build(&f.nix);
    let mut closure_paths = f.nix.closure(&redis);
    closure_paths.extend(f.nix.closure(&f.tool));
    let cache = tmp.join("cache");
    f.nix.publish(&cache, "zstd", &closure_paths);
    let closure: Vec<(String, bool)> = closure_paths
        .iter()
        .map(|p| (StorePath::parse(p).unwrap().base_name().to_string(), true))
        .collect();

    let server = Server::start(cache);
    let (_cfg, daemon, ctrd) = stack(&tmp, &server, "");
    let bb = format!("{}/bin/busybox", f.tool);
    let script = format!(
        "{r}/bin/redis-server --port 6399 --daemonize yes --save '' --logfile '' 2>&1; \
         for i in $(seq 1 100); do {r}/bin/redis-cli -p 6399 ping 2>&1 && exit 0; sleep 0.1; done; exit 1",
        r = redis
    );
    let archive = tmp.join("redis.tar");
    let name = "docker.io/library/nix-redis:latest";
    write_oci_archive(
        &archive,
        name,
        &[nix_layer(&closure, &[("bin/sh", bb.clone())])],
        &[&bb, "sh", "-c", &script],
    );
    for out in import_and_load_then_run(&ctrd, &daemon, &archive, name) {
        assert!(out.lines().any(|l| l.trim() == "PONG"), "{out}");
    }
    drop(ctrd);
    drop(daemon);
}

#[test]
fn tampered_nar_is_never_served() {
    let f = fixture();
    let tmp = TempRoot::new("nixtamper");
    let cache = tmp.join("cache");
    let st = std::process::Command::new("cp")
        .arg("-r")
        .arg(&f.cache)
        .arg(&cache)
        .status()
        .unwrap();
    assert!(st.success());
    // Flip one byte in the middle of the greeting path's compressed NAR.
    let p = StorePath::parse(&f.data).unwrap();
    let info =
        NarInfo::parse(&std::fs::read_to_string(cache.join(format!("{}.narinfo", p.hash_part()))).unwrap()).unwrap();
    let nar = cache.join(&info.url);
    let mut bytes = std::fs::read(&nar).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&nar, bytes).unwrap();

    let server = Server::start(cache);
    let root = tmp.join("root");
    let (_cfg, daemon, ctrd) = stack(&tmp, &server, "[fuse]\nfetch_timeout = 10.0\n");
    let mut layers = image::busybox_layers();
    layers.push(nix_layer(&f.closure, &[]));
    let name = "docker.io/library/nix-tamper:latest";
    let archive = tmp.join("tamper.tar");
    // One line at the end: ctr can lose the last lines of a short-lived
    // container's output under load (and retries only when all is lost).
    let cmd = format!(
        "r=read; g=$(cat {d}/greeting 2>&1) || r=READ-FAILED; l=list; ls {d} >/dev/null 2>&1 || l=LIST-FAILED; echo \"$r $l [$g]\"",
        d = f.data
    );
    write_oci_archive(&archive, name, &layers, &["/bin/sh", "-c", &cmd]);
    ctrd.ctr_ok(&["images", "import", "--snapshotter", "nix", archive.to_str().unwrap()]);
    let out = run(
        &ctrd,
        &daemon,
        &["run", "--rm", "--snapshotter", "nix", name, &unique("c")],
    );
    assert!(out.contains("READ-FAILED") && out.contains("LIST-FAILED"), "{out}");
    assert!(!out.contains("hello from"), "tampered content was served: {out}");
    // Nothing of it reached the store, under its name or half-written.
    let entries: Vec<String> = std::fs::read_dir(root.join("store"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(!entries.iter().any(|e| e.contains(p.hash_part())), "{entries:?}");
    assert!(
        daemon.log_text().contains("mismatch") || daemon.log_text().contains("decompress"),
        "no verification error logged"
    );
    drop(ctrd);
    drop(daemon);
}

/// Waits until store path `path` left the daemon's local store, failing
/// with what the daemon said about fetches, views and collection.
fn wait_evicted(tmp: &TempRoot, daemon: &Daemon, path: &str) {
    let base = path.trim_start_matches("/nix/store/");
    let dir = tmp.join("root/store").join(base);
    common::wait_until(
        Duration::from_secs(30),
        || !dir.exists(),
        || {
            let said: Vec<String> = daemon
                .log_text()
                .lines()
                .filter(|l| {
                    ["fetched", "garbage", "view", "remove key", "prepare key"]
                        .iter()
                        .any(|w| l.contains(w))
                })
                .map(str::to_string)
                .collect();
            format!(
                "{path} still in the store after its container went:\n{}",
                said.join("\n")
            )
        },
    );
}

#[test]
fn eviction_under_pressure_spares_what_live_containers_use() {
    let f = fixture();
    let tmp = TempRoot::new("nixevict");
    let server = Server::start(f.cache.clone());
    // Far below the working set: every fetch is followed by an eviction.
    let (_cfg, daemon, ctrd) = stack(&tmp, &server, "[store]\nmax_size = \"1\"\n");
    let bb = format!("{}/bin/busybox", f.tool);
    let only = |paths: &[&str]| -> Vec<(String, bool)> {
        f.closure
            .iter()
            .filter(|(b, _)| paths.iter().any(|p| p.ends_with(b.as_str())))
            .cloned()
            .collect()
    };
    let filler = |i: usize| {
        format!(
            "/nix/store/{}",
            f.closure
                .iter()
                .find(|(b, _)| b.ends_with(&format!("-filler{i}")))
                .unwrap()
                .0
        )
    };
    let image = |name: &str, paths: &[&str], script: &str| {
        let archive = tmp.join(&format!("{name}.tar"));
        let reference = format!("docker.io/library/{name}:latest");
        write_oci_archive(
            &archive,
            &reference,
            &[nix_layer(&only(paths), &[])],
            &[&bb, "sh", "-c", script],
        );
        ctrd.ctr_ok(&["images", "import", "--snapshotter", "nix", archive.to_str().unwrap()]);
        reference
    };
    // A long-running container reads its store file again and again.
    let reader = image(
        "evict-reader",
        &[&f.tool, &f.data],
        &format!(
            "i=0; while [ $i -lt 40 ]; do cat {}/greeting; i=$((i+1)); sleep 0.1; done",
            f.data
        ),
    );
    let (f7, f8) = (filler(7), filler(8));
    let seven = image("evict-seven", &[&f.tool, &f7], &format!("cat {f7}/x"));
    let eight = image("evict-eight", &[&f.tool, &f8], &format!("cat {f8}/x"));

    std::thread::scope(|s| {
        let reading = s.spawn(|| {
            run(
                &ctrd,
                &daemon,
                &["run", "--rm", "--snapshotter", "nix", &reader, &unique("c")],
            )
        });
        // The reader runs (its store path was fetched) before others start.
        let data = tmp.join("root/store").join(f.data.trim_start_matches("/nix/store/"));
        common::wait_until(
            Duration::from_secs(60),
            || data.exists(),
            || "the reader never started".into(),
        );
        // Meanwhile other containers come and go; what they alone showed
        // is evicted once they are gone.
        for (img, path, want) in [
            (&seven, &f7, "filler 7\n"),
            (&eight, &f8, "filler 8\n"),
            (&seven, &f7, "filler 7\n"),
        ] {
            let out = run(
                &ctrd,
                &daemon,
                &["run", "--rm", "--snapshotter", "nix", img, &unique("c")],
            );
            assert_eq!(out, want, "--- daemon problems:\n{}", daemon.log_problems());
            wait_evicted(&tmp, &daemon, path);
        }
        let out = reading.join().unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines.len(),
            40,
            "{out}\n--- daemon problems:\n{}",
            daemon.log_problems()
        );
        assert!(lines.iter().all(|l| *l == "hello from the nix store"), "{out}");
    });
    let downloads = nar_downloads(&server);
    let count = |p: &str| downloads.iter().filter(|d| **d == nar_url(p)).count();
    // What the reader used was never evicted under it.
    assert_eq!(count(&f.data), 1, "{downloads:?}");
    assert_eq!(count(&f.tool), 1, "{downloads:?}");
    // filler 7 went when no live container showed it, and came back.
    assert_eq!(count(&f7), 2, "{downloads:?}\n{}", daemon.log_text());
}
