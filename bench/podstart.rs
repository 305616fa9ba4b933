//! Pod cold start through the CRI, as a kubelet drives it: from PullImage to
//! the container's first log line, for the python closure of the cold-start
//! benchmark (python3 and its libraries plus ~390 MiB of unrelated store
//! paths; the program prints `ready` after `import json`) as
//!
//! (a) a `nix:0` image: the archive's store path pulled through our image
//!     service from the signed binary cache, store paths fetched lazily;
//! (b) the same Nix image pushed to Debian's `docker-registry` with
//!     `image push` and pulled through the CRI by reference: containerd
//!     fetches manifest and config from the registry, never the Nix layer;
//! (c) the same files as an ordinary OCI image (one gzip layer per store
//!     path, as Nix's layered images are) in the same registry, pulled by
//!     containerd's CRI onto its overlayfs snapshotter: what a Kubernetes
//!     node runs today;
//! (d) (a) from a copy of the cache that `cache index` gave file indexes and
//!     seekable NARs: store paths read by the chunk;
//! (e) (d) with an access profile that one (d) run recorded, published with
//!     the image (`image build --profile`): a pull prefetches what it lists;
//! (f) (e)'s image pushed to the registry and pulled by reference, as (b).
//!
//! Every run starts cold: a fresh containerd (no images, no content), for
//! (a) and (b) a fresh daemon with an empty store, page caches dropped. The
//! sandbox (pause image, imported locally) is up before the clock starts,
//! as a kubelet starts it before pulling. The cache and the registry are
//! each behind a shaped link (50 ms round trip, 100 Mbit/s, userspace: this
//! kernel has no netem). The modes take turns within each round.
//!
//!     cargo bench --bench podstart [-- --rounds N --json FILE]
//!
//! Needs root, containerd (with its CRI plugin), runc, nix-bin, patchelf,
//! python3, docker-registry and Debian's Go sources (scripts/bench).

#[path = "../tests/common/mod.rs"]
mod tc;

mod common;
mod link;
mod python;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{arg, arg_or, drop_caches, median, publish, run, signing_key, NIXFLAGS};
use nix_snapshotter::api::cri::image_service_client::ImageServiceClient;
use nix_snapshotter::api::cri::{ImageSpec, PullImageRequest};
use python::PythonClosure;
use tc::{Containerd, Daemon, TempRoot};

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    NixRef,
    PushedNix,
    Oci,
    FileGrained,
    Profiled,
    PushedProfiled,
}

impl Mode {
    fn key(self) -> &'static str {
        match self {
            Mode::NixRef => "nix_ref",
            Mode::PushedNix => "pushed_nix",
            Mode::Oci => "oci_overlayfs",
            Mode::FileGrained => "nix_ref_file_granular",
            Mode::Profiled => "nix_ref_file_granular_profile",
            Mode::PushedProfiled => "pushed_nix_file_granular_profile",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Mode::NixRef => "(a) nix:0 image",
            Mode::PushedNix => "(b) pushed Nix image",
            Mode::Oci => "(c) OCI image on overlayfs",
            Mode::FileGrained => "(d) nix:0 image, by file",
            Mode::Profiled => "(e) by file, with a profile",
            Mode::PushedProfiled => "(f) pushed, by file, profile",
        }
    }
}

/// One cold pod start: seconds to the first log line, bytes over the links.
struct Sample {
    seconds: f64,
    /// Of which PullImage.
    pull: f64,
    from_cache: u64,
    from_registry: u64,
}

struct Setup {
    public: String,
    nix_ref: String,
    /// The same image naming a recorded access profile, and pushed.
    nix_ref_profiled: String,
    pushed_profiled: String,
    pushed: String,
    oci: String,
    cache: link::Link,
    /// The same cache with file indexes and seekable NARs (`cache index`).
    indexed: link::Link,
    registry: link::Link,
    registry_host: String,
}

fn main() {
    let rounds = arg_or("--rounds", 3);
    let tmp = TempRoot::new("podbench");
    let dir = tmp.path.clone();
    let closure = PythonClosure::build(&dir);

    // --- The Nix image, its archive in the store and in the signed cache.
    let archive = dir.join("nix-image-python.tar");
    closure.nix_image(&dir, "docker.io/library/bench-python:latest", &archive, None);
    let stored = run(Command::new("nix")
        .args(NIXFLAGS)
        .args(["store", "add-file", "--store"])
        .arg(&closure.chroot)
        .arg(&archive))
    .trim()
    .to_string();
    let (key, public) = signing_key(&dir, "bench-pod-1");
    let cache = dir.join("cache");
    eprintln!(
        "publishing ({} store paths, {} MiB) ...",
        closure.paths.len(),
        closure.bytes >> 20
    );
    publish(&closure.chroot, &cache, "zstd", &key, &closure.top);
    publish(&closure.chroot, &cache, "zstd", &key, &stored);
    let indexed = dir.join("cache-indexed");
    run(Command::new("cp").arg("-a").arg(&cache).arg(&indexed));
    run(Command::new(tc::DAEMON)
        .args(["cache", "index", "--secret-key"])
        .arg(&key)
        .arg(&indexed));

    // --- The same files as an ordinary image, and both pushed.
    eprintln!("building the OCI image (one gzip layer per store path) ...");
    let per_path: Vec<Vec<&String>> = closure.paths.iter().map(|p| vec![p]).collect();
    let oci_archive = dir.join("oci.tar");
    closure.plain_image(&per_path, "docker.io/library/bench-python-oci:latest", &oci_archive);
    let registry = tc::registry::DockerRegistry::start(&dir.join("registry"));
    let push = |archive: &Path, reference: &str| {
        run(Command::new(tc::DAEMON)
            .args(["image", "push", "--plain-http"])
            .arg(archive)
            .arg(reference));
    };
    let pushed = format!("{}/bench/python-nix:v1", registry.host);
    let oci = format!("{}/bench/python-oci:v1", registry.host);
    push(&archive, &pushed);
    push(&oci_archive, &oci);
    let oci_bytes = std::fs::metadata(&oci_archive).unwrap().len();

    // --- Both behind shaped links.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = tc::http::Server::start(cache.clone());
    let indexed_server = tc::http::Server::start(indexed.clone());
    let rtt = Duration::from_millis(50);
    let mut setup = Setup {
        public,
        nix_ref: format!("nix:0{stored}:latest"),
        nix_ref_profiled: String::new(),
        pushed_profiled: format!("{}/bench/python-nix:profiled", registry.host),
        pushed,
        oci,
        cache: link::shaped_proxy(&rt, server.addr, rtt, 100e6 / 8.0),
        indexed: link::shaped_proxy(&rt, indexed_server.addr, rtt, 100e6 / 8.0),
        registry: link::shaped_proxy(&rt, registry.host.parse().unwrap(), rtt, 100e6 / 8.0),
        registry_host: registry.host.clone(),
    };
    setup.cache.check(&cache);

    // --- (e): a profile recorded by one by-file cold start, published as a
    // store path with a second image that names it.
    eprintln!("recording an access profile ...");
    let recorded = dir.join("access-profile");
    rt.block_on(cold_pod(
        &dir.join("record"),
        &setup,
        Mode::FileGrained,
        Some(&recorded),
    ));
    let profile = run(Command::new("nix")
        .args(NIXFLAGS)
        .args(["store", "add-file", "--store"])
        .arg(&closure.chroot)
        .arg(&recorded))
    .trim()
    .to_string();
    let profiled = dir.join("nix-image-python-profiled.tar");
    closure.nix_image(&dir, "docker.io/library/bench-python:latest", &profiled, Some(&profile));
    let stored_profiled = run(Command::new("nix")
        .args(NIXFLAGS)
        .args(["store", "add-file", "--store"])
        .arg(&closure.chroot)
        .arg(&profiled))
    .trim()
    .to_string();
    common::cache_push(&indexed, &key, &closure.chroot, &[], &[&profile, &stored_profiled]);
    setup.nix_ref_profiled = format!("nix:0{stored_profiled}:latest");
    push(&profiled, &setup.pushed_profiled);

    let modes = [
        Mode::NixRef,
        Mode::PushedNix,
        Mode::Oci,
        Mode::FileGrained,
        Mode::Profiled,
        Mode::PushedProfiled,
    ];
    let mut samples: Vec<Vec<Sample>> = modes.iter().map(|_| Vec::new()).collect();
    for r in 0..rounds {
        for i in 0..modes.len() {
            // Each round starts with another mode: none always goes first.
            let m = (r + i) % modes.len();
            let s = rt.block_on(cold_pod(
                &dir.join(format!("r{r}-{}", modes[m].key())),
                &setup,
                modes[m],
                None,
            ));
            eprintln!(
                "round {r}: {}: {:.2} s, of which PullImage {:.2} s ({} MiB from the cache, {} MiB from the registry)",
                modes[m].label(),
                s.seconds,
                s.pull,
                s.from_cache >> 20,
                s.from_registry >> 20
            );
            samples[m].push(s);
        }
    }

    let mut report = serde_json::Map::new();
    println!();
    println!(
        "closure: {} store paths, {} MiB; OCI image {} MiB compressed; shaped links 50 ms / 100 Mbit; {rounds} rounds, medians",
        closure.paths.len(),
        closure.bytes >> 20,
        oci_bytes >> 20
    );
    let median_of = |m: usize| median(samples[m].iter().map(|s| s.seconds).collect());
    let baseline = median_of(2);
    for (m, mode) in modes.iter().enumerate() {
        let t = median_of(m);
        let cache_mib = median(samples[m].iter().map(|s| s.from_cache as f64).collect()) / 1048576.0;
        let pull = median(samples[m].iter().map(|s| s.pull).collect());
        let reg_mib = median(samples[m].iter().map(|s| s.from_registry as f64).collect()) / 1048576.0;
        println!(
            "{:<28} {t:>6.2} s  (min {:.2}, max {:.2}, PullImage {pull:.2})  {:>5.1}x faster than (c)  fetched {cache_mib:.0} MiB from the cache, {reg_mib:.1} MiB from the registry",
            mode.label(),
            samples[m].iter().map(|s| s.seconds).fold(f64::MAX, f64::min),
            samples[m].iter().map(|s| s.seconds).fold(0.0, f64::max),
            baseline / t,
        );
        report.insert(
            mode.key().into(),
            serde_json::json!({
                "label": mode.label(),
                "seconds": samples[m].iter().map(|s| s.seconds).collect::<Vec<_>>(),
                "median": t,
                "pull": pull,
                "speedup": baseline / t,
                "cache_mib": cache_mib,
                "registry_mib": reg_mib,
            }),
        );
    }
    report.insert("closure_mib".into(), serde_json::json!(closure.bytes >> 20));
    report.insert("oci_mib".into(), serde_json::json!(oci_bytes >> 20));
    if let Some(out) = arg("--json") {
        std::fs::write(out, serde_json::to_vec_pretty(&report).unwrap()).unwrap();
    }
    drop(server);
    drop(rt);
    drop(registry);
}

/// One cold start of `mode` in a fresh node under `dir`; the daemon's
/// access profile copied to `keep_profile` when given.
async fn cold_pod(dir: &Path, setup: &Setup, mode: Mode, keep_profile: Option<&Path>) -> Sample {
    std::fs::create_dir_all(dir).unwrap();
    let nix_sock = dir.join("nix.sock");
    let ctrd_dir = dir.join("ctrd");
    let by_file = matches!(mode, Mode::FileGrained | Mode::Profiled | Mode::PushedProfiled);
    let cache = if by_file { &setup.indexed } else { &setup.cache };
    let daemon = (mode != Mode::Oci).then(|| {
        let cfg = tc::cache_config(
            dir,
            &cache.url,
            &setup.public,
            &format!(
                "[image_service]\nenable = true\ncontainerd_address = \"{}\"\n{}",
                ctrd_dir.join("containerd.sock").display(),
                if by_file {
                    "[store]\nprefetch_entrypoint = false\n"
                } else {
                    ""
                }
            ),
        );
        Daemon::start_logging(
            &dir.join("root"),
            &nix_sock,
            &["--config", cfg.to_str().unwrap()],
            &[],
            "warn",
        )
    });
    let snapshotter = if mode == Mode::Oci { "overlayfs" } else { "nix" };
    let ctrd = Containerd::start_with_cri_on(&ctrd_dir, &nix_sock, snapshotter);
    ctrd.import_pause_image_for(snapshotter);
    ctrd.plain_http_registry(&setup.registry_host, &setup.registry.host);
    // What a kubelet talks to: our socket as its image service for Nix
    // images; containerd alone for the ordinary node.
    let image_service = daemon.as_ref().map_or(ctrd.address.clone(), |d| d.address.clone());
    let mut images = ImageServiceClient::new(nix_snapshotter::uds::connect(&image_service).await.unwrap());
    let image = match mode {
        Mode::NixRef | Mode::FileGrained => &setup.nix_ref,
        Mode::Profiled => &setup.nix_ref_profiled,
        Mode::PushedProfiled => &setup.pushed_profiled,
        Mode::PushedNix => &setup.pushed,
        Mode::Oci => &setup.oci,
    };
    let mut pod = tc::pod::Pod::run(&ctrd.address, "bench", &dir.join("logs")).await;
    drop_caches();
    let (cache0, reg0) = (cache.downloaded(), setup.registry.downloaded());

    let start = Instant::now();
    images
        .pull_image(PullImageRequest {
            image: Some(ImageSpec {
                image: image.clone(),
                ..Default::default()
            }),
            auth: None,
        })
        .await
        .unwrap_or_else(|e| panic!("PullImage {image}: {e:?}"));
    let pull = start.elapsed().as_secs_f64();
    let id = pod
        .start("app", image)
        .await
        .unwrap_or_else(|e| panic!("starting {image}: {e:?}"));
    while !pod.log("app").lines().any(|l| l.ends_with(" ready")) {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "{image}: no output after 300 s: {}",
            pod.log("app")
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let seconds = start.elapsed().as_secs_f64();

    if let Some(to) = keep_profile {
        // Written twice a second while it changes.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        std::fs::copy(dir.join("root").join("access-profile"), to).expect("the daemon recorded no access profile");
    }
    let status = pod.wait_exit(&id, Duration::from_secs(60)).await;
    assert_eq!(status.exit_code, 0, "{image}: {status:?}");
    pod.remove().await;
    let sample = Sample {
        seconds,
        pull,
        from_cache: cache.downloaded() - cache0,
        from_registry: setup.registry.downloaded() - reg0,
    };
    drop(ctrd);
    drop(daemon);
    tc::unmount_below(dir);
    let _ = nix_snapshotter::store::gc::remove_tree(dir);
    sample
}
