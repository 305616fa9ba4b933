//! Cold starts by the file against every other way, in one run on one shaped
//! link (50 ms round trip, 100 Mbit/s, userspace: this kernel has no netem):
//! time from `ctr run` to the container's first output line, and bytes that
//! crossed the link, for the python closure of the cold-start benchmark
//! (python3 and its libraries plus ~390 MiB of unrelated store paths; the
//! program prints `ready` after `import json`):
//!
//! (a) eager, the Go nix-snapshotter's way: real Nix fetches the whole
//!     closure (`nix copy --from`), then the container starts from it;
//! (b) our whole-path lazy store (a cache without file indexes, the
//!     command's closure prefetched whole);
//! (c) by file: the cache given file indexes and seekable NARs by
//!     `cache index`, chunks fetched as files are read;
//! (d) (c) with an access profile one (c) run recorded, published with the
//!     image (`image build --profile`): a cold start fetches what it lists
//!     at once;
//! (e) the same python files as an ordinary one-layer image on containerd's
//!     overlayfs, already unpacked (page cache dropped): the floor;
//! (f) SOCI, Debian's `soci-snapshotter`: (e)'s image with a SOCI index in
//!     Debian's `docker-registry` behind the same link, `soci image rpull`
//!     then `ctr run` (see `soci.rs`; left out, saying why, when its
//!     package is missing);
//! (g) stargz: (e)'s image converted to eStargz and optimized for the
//!     command by Debian's `ctr-remote`, the same registry and link, served
//!     by a main of ours over Debian's stargz-snapshotter sources, `rpull`
//!     then `ctr run` (see `stargz.rs`; left out likewise).
//!
//! The Nix images of (b)–(d) are as buildImage makes them: one
//! `nix-closure` label naming a closure-info store path, which a cold node
//! fetches from the cache first; (a)'s has the Go project's labels, a
//! `nix-store-path.<i>` per path.
//!
//! Every cold run has a fresh daemon root and a fresh containerd; page
//! caches are dropped before the clock starts; the modes take turns within
//! each round. Then warm: (d) again against (e) warm, alternating.
//!
//!     cargo bench --bench filegrain [-- --rounds N --warm-runs N --json FILE]
//!         [--only eager,by_file_profile,...] [--daemon-log info]
//!         [--warm-passthrough true] [--warm-hold]
//!
//! `--daemon-log LEVEL` keeps each run's daemon log under
//! `target/filegrain-logs/` (where a cold start's time goes). `--only`
//! also leaves out the layout comparison (two more `cache push`es).
//! `--warm-hold` keeps the warm containerd and daemon after the warm runs,
//! until a file it names is removed, to look at warm starts by hand.
//!
//! Needs root, containerd, runc, nix-bin, patchelf, python3,
//! docker-registry, skopeo, ctr-remote and Debian's Go sources (scripts/bench).

#[path = "../tests/common/mod.rs"]
mod tc;

mod common;
mod layouts;
mod link;
mod python;
mod soci;
mod stargz;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{arg, arg_or, drop_caches, median, nix_copy_from, publish, run, signing_key, NIXFLAGS};
use python::PythonClosure;
use tc::{Containerd, Daemon, TempRoot};

const IMAGE: &str = "docker.io/library/bench-python:latest";
const PLAIN_IMAGE: &str = "docker.io/library/bench-python-plain:latest";

#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    Eager,
    WholePath,
    ByFile,
    Profiled,
    Overlay,
    Soci,
    Stargz,
}

impl Mode {
    fn key(self) -> &'static str {
        match self {
            Mode::Eager => "eager",
            Mode::WholePath => "whole_path",
            Mode::ByFile => "by_file",
            Mode::Profiled => "by_file_profile",
            Mode::Overlay => "overlayfs_unpacked",
            Mode::Soci => "soci",
            Mode::Stargz => "stargz",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Mode::Eager => "(a) eager (nix copy, the Go way)",
            Mode::WholePath => "(b) lazy, whole paths",
            Mode::ByFile => "(c) lazy, by file",
            Mode::Profiled => "(d) lazy, by file + profile",
            Mode::Overlay => "(e) overlayfs, unpacked",
            Mode::Soci => "(f) SOCI (rpull + run)",
            Mode::Stargz => "(g) stargz, optimized (rpull + run)",
        }
    }
}

struct Setup {
    closure: PythonClosure,
    public: String,
    /// The shaped links to the plain cache and to the indexed one.
    cache: link::Link,
    indexed: link::Link,
    /// (b)'s and (c)'s image.
    nix_tar: PathBuf,
    /// (a)'s: the Go project's labels.
    go_tar: PathBuf,
    /// (d)'s: its closure holds an access profile.
    profiled_tar: PathBuf,
    plain_tar: PathBuf,
}

struct Sample {
    seconds: f64,
    /// Bytes that crossed the link.
    fetched: u64,
}

fn main() {
    let rounds = arg_or("--rounds", 3);
    let tmp = TempRoot::new("filebench");
    let dir = tmp.path.clone();
    let closure = PythonClosure::build(&dir);

    let (key, public) = signing_key(&dir, "bench-file-1");
    eprintln!(
        "publishing ({} store paths, {} MiB) ...",
        closure.paths.len(),
        closure.bytes >> 20
    );
    // The images as buildImage makes them: one `nix-closure` label naming
    // a closure-info store path, published with the closure. (a), the Go
    // way, gets the Go project's labels (a `nix-store-path.<i>` per path).
    let nix_tar = dir.join("nix.tar");
    let info = closure.nix_image_info(&dir, IMAGE, &nix_tar, None);
    let go_tar = dir.join("nix-go.tar");
    closure.nix_image(&dir, IMAGE, &go_tar, None);
    let cache = dir.join("cache");
    publish(&closure.chroot, &cache, "zstd", &key, &closure.top);
    publish(&closure.chroot, &cache, "zstd", &key, &info);
    // The same closure as `cache push` publishes it: file indexes and
    // seekable NARs only, so that the two caches' sizes compare.
    let indexed = dir.join("cache-indexed");
    common::cache_push(&indexed, &key, &closure.chroot, &[], &[&closure.top, &info]);
    let size = |d: &Path| common::du(&d.join("nar"));
    let (plain_bytes, indexed_bytes) = (size(&cache), size(&indexed));

    let python_part: Vec<&String> = closure.paths.iter().filter(|p| !p.contains("-bulk-")).collect();
    let plain_tar = dir.join("plain.tar");
    closure.plain_image(&[python_part], PLAIN_IMAGE, &plain_tar);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let rtt = Duration::from_millis(50);
    let server = tc::http::Server::start(cache.clone());
    let indexed_server = tc::http::Server::start(indexed.clone());
    let setup = Setup {
        public,
        cache: link::shaped_proxy(&rt, server.addr, rtt, 100e6 / 8.0),
        indexed: link::shaped_proxy(&rt, indexed_server.addr, rtt, 100e6 / 8.0),
        nix_tar,
        go_tar,
        profiled_tar: dir.join("nix-profiled.tar"),
        plain_tar,
        closure,
    };
    setup.cache.check(&cache);

    // --- (d): a profile recorded by one by-file cold start, published as
    // a store path that a second image names.
    eprintln!("recording an access profile ...");
    let recorded = dir.join("access-profile");
    cold_run(&dir.join("record"), &setup, Mode::ByFile, Some(&recorded));
    let ranges = nix_snapshotter::nixfmt::profile::parse(&std::fs::read_to_string(&recorded).unwrap())
        .unwrap()
        .ranges;
    // What the program read: the profile's ranges.
    let read_bytes: u64 = ranges.iter().map(|r| r.len).sum();
    let profile = run(Command::new("nix")
        .args(NIXFLAGS)
        .args(["store", "add-file", "--store"])
        .arg(&setup.closure.chroot)
        .arg(&recorded))
    .trim()
    .to_string();
    let info = setup
        .closure
        .nix_image_info(&dir, IMAGE, &setup.profiled_tar, Some(&profile));
    common::cache_push(&indexed, &key, &setup.closure.chroot, &[], &[&profile, &info]);

    // --- The layout, measured on that profile: frame sizes, and no
    // compression at all.
    eprintln!("publishing the closure with other frame sizes ...");
    let mut layouts = Vec::new();
    // `--only` is for looking at a few ways quickly: no layouts then.
    let frames: &[(&str, &str)] = if arg("--only").is_some() {
        &[]
    } else {
        &[
            ("256KiB", "seekable zstd, 256 KiB frames"),
            ("1MiB", "seekable zstd, 1 MiB frames"),
        ]
    };
    for &(frame, name) in frames {
        let other = dir.join(format!("cache-{frame}"));
        common::cache_push(
            &other,
            &key,
            &setup.closure.chroot,
            &["--frame-size", frame],
            &[&setup.closure.top],
        );
        layouts.push(layouts::seekable(name, &other, &ranges));
        let _ = nix_snapshotter::store::gc::remove_tree(&other);
    }
    if !frames.is_empty() {
        layouts.insert(
            0,
            layouts::seekable("seekable zstd, 64 KiB frames (default)", &indexed, &ranges),
        );
        layouts.push(layouts::uncompressed(&indexed, &ranges));
    }

    // --- (f): SOCI over the same link, when its package can be had.
    let only = arg("--only");
    let wanted = |m: Mode| only.as_deref().is_none_or(|o| o.split(',').any(|k| k == m.key()));
    let soci = wanted(Mode::Soci)
        .then(|| {
            soci::Soci::prepare(&dir.join("soci"), &setup.plain_tar, &rt, rtt)
                .map_err(|e| eprintln!("SOCI left out: {e}"))
                .ok()
        })
        .flatten();
    // --- (g): stargz likewise.
    let stargz = wanted(Mode::Stargz)
        .then(|| {
            stargz::Stargz::prepare(&dir.join("stargz"), &setup.plain_tar, &rt, rtt)
                .map_err(|e| eprintln!("stargz left out: {e}"))
                .ok()
        })
        .flatten();
    let mut modes: Vec<Mode> = [
        Mode::Eager,
        Mode::WholePath,
        Mode::ByFile,
        Mode::Profiled,
        Mode::Overlay,
    ]
    .into_iter()
    .filter(|m| wanted(*m))
    .collect();
    if soci.is_some() {
        modes.push(Mode::Soci);
    }
    if stargz.is_some() {
        modes.push(Mode::Stargz);
    }
    let mut samples: Vec<Vec<Sample>> = modes.iter().map(|_| Vec::new()).collect();
    for r in 0..rounds {
        for i in 0..modes.len() {
            let m = (r + i) % modes.len();
            let d = dir.join(format!("r{r}-{}", modes[m].key()));
            let s = match (modes[m], &soci, &stargz) {
                (Mode::Soci, Some(soci), _) => soci.cold_run(&d),
                (Mode::Stargz, _, Some(stargz)) => stargz.cold_run(&d),
                (mode, _, _) => cold_run(&d, &setup, mode, None),
            };
            eprintln!(
                "round {r}: {}: {:.2} s, {:.1} MiB over the link",
                modes[m].label(),
                s.seconds,
                s.fetched as f64 / 1048576.0
            );
            samples[m].push(s);
        }
    }

    // --- Warm: (d) again against (e), alternating, after a warm-up of each.
    eprintln!("warm runs ...");
    let Warm {
        ours: warm,
        interval,
        overlay,
        plain_ours,
        requests: warm_requests,
        operations: warm_operations,
        operations_d: warm_operations_d,
    } = warm_runs(&dir.join("warm"), &setup);

    let mut report = serde_json::Map::new();
    println!();
    println!(
        "closure: {} store paths, {} MiB; cache {} MiB of zstd NARs, {} MiB with indexes and seekable NARs ({:.2}x); \
         the program reads {:.1} MiB (its profile); shaped link 50 ms / 100 Mbit; {rounds} rounds, medians",
        setup.closure.paths.len(),
        setup.closure.bytes >> 20,
        plain_bytes >> 20,
        indexed_bytes >> 20,
        indexed_bytes as f64 / plain_bytes as f64,
        read_bytes as f64 / 1048576.0
    );
    let eager = match modes.iter().position(|m| *m == Mode::Eager) {
        Some(e) => median(samples[e].iter().map(|s| s.seconds).collect()),
        None => f64::NAN,
    };
    for (m, mode) in modes.iter().enumerate() {
        let times: Vec<f64> = samples[m].iter().map(|s| s.seconds).collect();
        let t = median(times.clone());
        let fetched = median(samples[m].iter().map(|s| s.fetched as f64).collect());
        println!(
            "{:<34} {t:>6.2} s  (min {:.2}, max {:.2})  {:>5.1}x faster than (a)  {:>6.1} MiB fetched ({:.2}x what it reads)",
            mode.label(),
            times.iter().copied().fold(f64::MAX, f64::min),
            times.iter().copied().fold(0.0, f64::max),
            eager / t,
            fetched / 1048576.0,
            fetched / read_bytes as f64,
        );
        report.insert(
            mode.key().into(),
            serde_json::json!({
                "label": mode.label(),
                "seconds": times,
                "median": t,
                "speedup_over_eager": eager / t,
                "fetched_bytes": fetched,
            }),
        );
    }
    println!(
        "warm, {} alternating runs each: (d) {warm:.3} s, overlayfs {overlay:.3} s, ratio {:.2}x \
         (90 % bootstrap interval {:.2}-{:.2}x); \
         (e)'s image through our snapshotter (no Nix layer, no FUSE) {plain_ours:.3} s, {:.2}x overlayfs",
        warm_count(),
        warm / overlay,
        interval.0,
        interval.1,
        plain_ours / overlay
    );
    println!(
        "FUSE requests per warm start of (d): {}",
        warm_requests
            .iter()
            .map(|(op, n)| format!("{op} {n:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let list = |v: &[(String, f64)]| {
        v.iter()
            .map(|(op, n)| format!("{op} {n:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "snapshots API calls per warm start through our snapshotter: {} (around (d)'s starts alone: {})",
        list(&warm_operations),
        list(&warm_operations_d)
    );
    println!("layouts, for this profile (cache size against plain zstd NARs; bytes and requests of a cold start):");
    let mut layout_report = Vec::new();
    for l in &layouts {
        println!(
            "  {:<44} cache {:>6.1} MiB ({:.2}x)  fetches {:>5.1} MiB ({:.2}x what it reads) in {} requests",
            l.name,
            l.cache_bytes as f64 / 1048576.0,
            l.cache_bytes as f64 / plain_bytes as f64,
            l.fetched as f64 / 1048576.0,
            l.fetched as f64 / read_bytes as f64,
            l.requests
        );
        layout_report.push(serde_json::json!({
            "name": l.name, "cache_bytes": l.cache_bytes, "fetched_bytes": l.fetched, "requests": l.requests,
        }));
    }
    report.insert("layouts".into(), serde_json::json!(layout_report));
    report.insert(
        "warm".into(),
        serde_json::json!({
            "by_file_profile": warm, "overlayfs": overlay, "plain_through_ours": plain_ours,
            "ratio_interval_90": [interval.0, interval.1],
        }),
    );
    report.insert("read_bytes".into(), serde_json::json!(read_bytes));
    report.insert("closure_bytes".into(), serde_json::json!(setup.closure.bytes));
    report.insert(
        "cache_bytes".into(),
        serde_json::json!({ "zstd": plain_bytes, "indexed": indexed_bytes }),
    );
    if let Some(out) = arg("--json") {
        std::fs::write(out, serde_json::to_vec_pretty(&report).unwrap()).unwrap();
    }
    drop(soci);
    drop(stargz);
    drop(server);
    drop(indexed_server);
    drop(rt);
}

/// The daemon's config for `mode`, under `dir`.
fn daemon_config(dir: &Path, setup: &Setup, mode: Mode, host_store: &str) -> PathBuf {
    let link = if matches!(mode, Mode::ByFile | Mode::Profiled) {
        &setup.indexed
    } else {
        &setup.cache
    };
    // By file, the command's closure is not fetched whole ahead: what is
    // read is fetched by the chunk (and with a profile, ahead by it).
    let store = if mode == Mode::ByFile {
        "prefetch_entrypoint = false\n"
    } else {
        ""
    };
    let cfg = tc::cache_config(
        dir,
        &link.url,
        &setup.public,
        &format!("[store]\nmax_size = \"0\"\n{store}"),
    );
    if !host_store.is_empty() {
        let text = std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("host_store = \"\"", &format!("host_store = \"{host_store}\""));
        std::fs::write(&cfg, text).unwrap();
    }
    cfg
}

/// One cold start of `mode` in a fresh node under `dir`; the daemon's access
/// profile copied to `keep_profile` when given.
fn cold_run(dir: &Path, setup: &Setup, mode: Mode, keep_profile: Option<&Path>) -> Sample {
    std::fs::create_dir_all(dir).unwrap();
    let sock = dir.join("nix.sock");
    let link = if matches!(mode, Mode::ByFile | Mode::Profiled) {
        &setup.indexed
    } else {
        &setup.cache
    };
    let before = link.downloaded();
    let eager_store = dir.join("eager");
    let host_store = if mode == Mode::Eager {
        // Empty until `nix copy` fills it, inside the clock.
        std::fs::create_dir_all(eager_store.join("nix/store")).unwrap();
        eager_store.join("nix/store").to_string_lossy().into_owned()
    } else {
        String::new()
    };
    let daemon = (mode != Mode::Overlay).then(|| {
        let cfg = daemon_config(dir, setup, mode, &host_store);
        Daemon::start_logging(
            &dir.join("root"),
            &sock,
            &["--config", cfg.to_str().unwrap()],
            &[],
            &arg("--daemon-log").unwrap_or_else(|| "warn".into()),
        )
    });
    let ctrd = Containerd::start(&dir.join("ctrd"), &sock);
    let ns = ctrd.namespace.clone();
    if mode == Mode::Overlay {
        // Already unpacked: only the page cache is cold.
        run(Command::new("ctr")
            .arg("--address")
            .arg(&ctrd.address)
            .args(["--namespace", &ns, "images", "import", "--snapshotter", "overlayfs"])
            .arg(&setup.plain_tar));
    }
    drop_caches();
    // The clock covers what a pull does: loading the Nix image (for the
    // lazy ways, that starts their prefetch), and for the Go way the whole
    // closure realised first.
    let start = Instant::now();
    if mode == Mode::Eager {
        nix_copy_from(&link.url, &setup.public, &eager_store, &setup.closure.top);
    }
    let (snapshotter, image) = if mode == Mode::Overlay {
        ("overlayfs", PLAIN_IMAGE)
    } else {
        let tar = match mode {
            Mode::Profiled => &setup.profiled_tar,
            Mode::Eager => &setup.go_tar,
            _ => &setup.nix_tar,
        };
        let out = ctrd.image_load(&ns, tar);
        assert!(
            out.status.success(),
            "image load: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ("nix", IMAGE)
    };
    first_line(&ctrd, snapshotter, image, &format!("{ns}-c"));
    let seconds = start.elapsed().as_secs_f64();
    if let Some(to) = keep_profile {
        // Written twice a second while it changes.
        std::thread::sleep(Duration::from_millis(1500));
        std::fs::copy(dir.join("root").join("access-profile"), to).expect("the daemon recorded no access profile");
    }
    let fetched = link.downloaded() - before;
    drop(ctrd);
    drop(daemon);
    keep_daemon_log(dir);
    tc::unmount_below(dir);
    let _ = nix_snapshotter::store::gc::remove_tree(dir);
    Sample {
        seconds,
        fetched: if mode == Mode::Overlay { 0 } else { fetched },
    }
}

/// `ctr run` of `image` until the first line of output: seconds.
pub fn first_line(ctrd: &Containerd, snapshotter: &str, image: &str, id: &str) -> f64 {
    common::first_line(
        Command::new("ctr")
            .arg("--address")
            .arg(&ctrd.address)
            .args(["--namespace", &ctrd.namespace])
            .args(["run", "--rm", "--snapshotter", snapshotter, image, id]),
    )
}

/// With `--daemon-log`: the log of the daemon rooted at `dir/root`, kept
/// as `target/filegrain-logs/<dir's name>.log`.
fn keep_daemon_log(dir: &Path) {
    if arg("--daemon-log").is_some() {
        let logs = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/filegrain-logs");
        let _ = std::fs::create_dir_all(&logs);
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let _ = std::fs::copy(dir.join("root.log"), logs.join(format!("{name}.log")));
    }
}

/// `--warm-runs N`: warm runs of each (default 31).
fn warm_count() -> usize {
    arg_or("--warm-runs", 31)
}

/// Medians of warm starts, in seconds.
struct Warm {
    /// (d).
    ours: f64,
    /// 90 % bootstrap interval of (d)'s median over (e)'s.
    interval: (f64, f64),
    /// (e).
    overlay: f64,
    /// (e)'s plain image unpacked by our snapshotter: what being a proxy
    /// snapshotter costs, without a Nix layer or FUSE.
    plain_ours: f64,
    /// FUSE requests per warm start of (d), by operation.
    requests: Vec<(String, f64)>,
    /// Snapshots API calls per warm start through our snapshotter.
    operations: Vec<(String, f64)>,
    /// The same, counted around (d)'s starts alone.
    operations_d: Vec<(String, f64)>,
}

/// Alternating warm runs of (d), of (e), and of (e)'s image through our
/// snapshotter, after a warm-up.
fn warm_runs(dir: &Path, setup: &Setup) -> Warm {
    std::fs::create_dir_all(dir).unwrap();
    let sock = dir.join("nix.sock");
    let cfg = daemon_config(dir, setup, Mode::Profiled, "");
    // Its metrics: which FUSE requests a warm start costs.
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut text = format!(
        "metrics_address = \"{metrics}\"\n{}",
        std::fs::read_to_string(&cfg).unwrap()
    );
    if let Some(p) = arg("--warm-passthrough") {
        text.push_str(&format!("[fuse]\npassthrough = {p}\n"));
    }
    std::fs::write(&cfg, text).unwrap();
    let daemon = Daemon::start_logging(
        &dir.join("root"),
        &sock,
        &["--config", cfg.to_str().unwrap()],
        &[],
        &arg("--daemon-log").unwrap_or_else(|| "warn".into()),
    );
    let ctrd = Containerd::start(&dir.join("ctrd"), &sock);
    let ns = ctrd.namespace.clone();
    let out = ctrd.image_load(&ns, &setup.profiled_tar);
    assert!(
        out.status.success(),
        "image load: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    run(Command::new("ctr")
        .arg("--address")
        .arg(&ctrd.address)
        .args(["--namespace", &ns, "images", "import", "--snapshotter", "overlayfs"])
        .arg(&setup.plain_tar));
    run(Command::new("ctr")
        .arg("--address")
        .arg(&ctrd.address)
        .args(["--namespace", &ns, "images", "import", "--snapshotter", "nix"])
        .arg(&setup.plain_tar));
    for w in 0..2 {
        first_line(&ctrd, "nix", IMAGE, &format!("{ns}-wn{w}"));
        first_line(&ctrd, "overlayfs", PLAIN_IMAGE, &format!("{ns}-wo{w}"));
        first_line(&ctrd, "nix", PLAIN_IMAGE, &format!("{ns}-wp{w}"));
    }
    wait_quiet(metrics);
    let (mut ours, mut theirs, mut plain) = (Vec::new(), Vec::new(), Vec::new());
    // (The plain image's runs make no FUSE requests: no Nix layer.)
    const FUSE: &str = "nix_snapshotter_fuse_requests_total";
    const SNAPSHOTS: &str = "nix_snapshotter_snapshot_operations_total";
    let (fuse_before, ops_before) = (counters(metrics, FUSE), counters(metrics, SNAPSHOTS));
    // The snapshots API calls around (d)'s starts alone (containerd's
    // garbage collection after a run may land in the next run instead).
    let mut ops_d: Vec<(String, f64)> = Vec::new();
    for i in 0..warm_count() {
        let before = counters(metrics, SNAPSHOTS);
        ours.push(first_line(&ctrd, "nix", IMAGE, &format!("{ns}-n{i}")));
        for (k, n) in per_start(metrics, SNAPSHOTS, &before, warm_count()) {
            match ops_d.iter_mut().find(|(o, _)| *o == k) {
                Some((_, sum)) => *sum += n,
                None => ops_d.push((k, n)),
            }
        }
        theirs.push(first_line(&ctrd, "overlayfs", PLAIN_IMAGE, &format!("{ns}-o{i}")));
        plain.push(first_line(&ctrd, "nix", PLAIN_IMAGE, &format!("{ns}-p{i}")));
    }
    let requests = per_start(metrics, FUSE, &fuse_before, warm_count());
    // Both (d) and (e)'s image through ours call it.
    let operations = per_start(metrics, SNAPSHOTS, &ops_before, 2 * warm_count());
    ops_d.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap());
    if arg("--warm-hold").is_some() {
        hold(&ctrd);
    }
    drop(ctrd);
    drop(daemon);
    keep_daemon_log(dir);
    tc::unmount_below(dir);
    Warm {
        interval: ratio_interval(&ours, &theirs),
        ours: median(ours),
        overlay: median(theirs),
        plain_ours: median(plain),
        requests,
        operations,
        operations_d: ops_d,
    }
}

/// The 90 % bootstrap interval of median(a) / median(b): how far noise
/// alone moves the warm ratio (2,000 resamples of each).
fn ratio_interval(a: &[f64], b: &[f64]) -> (f64, f64) {
    use rand::Rng;
    if a.is_empty() || b.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mut rng = rand::rng();
    let mut resample = |v: &[f64]| median((0..v.len()).map(|_| v[rng.random_range(0..v.len())]).collect());
    let mut ratios: Vec<f64> = (0..2000).map(|_| resample(a) / resample(b)).collect();
    ratios.sort_by(|x, y| x.partial_cmp(y).unwrap());
    (ratios[100], ratios[1899])
}

/// `--warm-hold`: keeps the warm containerd and daemon until a file is
/// removed, to look at a warm start with perf or strace.
fn hold(ctrd: &Containerd) {
    let flag = std::env::temp_dir().join(format!("filegrain-hold-{}", std::process::id()));
    std::fs::write(&flag, "").unwrap();
    eprintln!(
        "holding: ctr --address {} --namespace {} run --rm --snapshotter nix|overlayfs {IMAGE}|{PLAIN_IMAGE} ID; \
         rm {} to go on",
        ctrd.address.display(),
        ctrd.namespace,
        flag.display()
    );
    while flag.exists() {
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The daemon's metrics, as text.
fn metrics(addr: std::net::SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).unwrap();
    text
}

/// Waits (up to a minute) until the daemon has no fetch under way and
/// has received no byte for 4 s: the warm-ups' prefetch and background
/// completion of paths read by the chunk (which starts 2 s after) are then
/// done, and do not share the CPU with the warm runs.
fn wait_quiet(addr: std::net::SocketAddr) {
    let state = || {
        let text = metrics(addr);
        let sum = |name| samples(&text, name).map(|(_, v)| v).sum::<f64>();
        (
            sum("nix_snapshotter_fetches_in_flight"),
            sum("nix_snapshotter_cache_bytes_total"),
        )
    };
    let start = Instant::now();
    let mut last = (state(), Instant::now());
    while start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(250));
        let now = state();
        if now != last.0 {
            last = (now, Instant::now());
        } else if now.0 == 0.0 && last.1.elapsed() >= Duration::from_secs(4) {
            return;
        }
    }
    eprintln!("warning: the warm daemon was still fetching after a minute");
}

/// The samples of `metric` in a metrics text, by their labels
/// (`op=lookup`, `op=prepare,result=ok`; empty for an unlabelled one).
fn samples<'a>(text: &'a str, metric: &'a str) -> impl Iterator<Item = (String, f64)> + 'a {
    text.lines().filter_map(move |l| {
        let rest = l.strip_prefix(metric)?;
        let (labels, n) = match rest.strip_prefix('{') {
            Some(labelled) => labelled.split_once("} ")?,
            None => ("", rest.strip_prefix(' ')?),
        };
        Some((labels.replace('"', ""), n.trim().parse().ok()?))
    })
}

/// The daemon's counters named `metric` (its metrics endpoint), by their
/// labels.
fn counters(addr: std::net::SocketAddr, metric: &str) -> Vec<(String, f64)> {
    samples(&metrics(addr), metric).collect()
}

/// What changed in `metric`'s counters since `before`, divided by `per`,
/// the largest first.
fn per_start(addr: std::net::SocketAddr, metric: &str, before: &[(String, f64)], per: usize) -> Vec<(String, f64)> {
    let mut changed: Vec<(String, f64)> = counters(addr, metric)
        .into_iter()
        .map(|(k, n)| {
            let was = before.iter().find(|(o, _)| *o == k).map_or(0.0, |(_, b)| *b);
            (k, (n - was) / per as f64)
        })
        .filter(|(_, n)| *n > 0.0)
        .collect();
    changed.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap());
    changed
}
