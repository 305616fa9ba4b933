//! Time from `ctr run` to the container's first output line, for a large
//! closure of which the program reads a small part: Debian's python3 and its
//! standard library patched into store paths (interpreter and rpath point at
//! store paths of Debian's glibc, zlib and expat), plus ~390 MiB of unrelated
//! store paths (Debian's Go sources) in the same closure. The program is
//! `python3 -c 'import json; print("ready")'`.
//!
//! (a) cold lazy: our daemon, empty store, host store off;
//! (b) cold eager, the Go nix-snapshotter's way: real Nix fetches the whole
//!     closure from the same cache (`nix copy`, what `nix-store --realise`
//!     does), then the container starts from local paths;
//! (c) warm: (a) again, store and page cache warm;
//! (d) the same python rootfs as an ordinary image on containerd's built-in
//!     overlayfs snapshotter, already unpacked.
//!
//! Each on loopback and through a shaped link: a userspace proxy on
//! 127.0.0.1 that adds 50 ms of round-trip time and paces all traffic to
//! 100 Mbit/s (this kernel has no netem). Also: bytes fetched against the
//! closure's size, and warm sequential read throughput of a large store file
//! through our FUSE view against the same file on local disk.
//!
//!     cargo bench --bench coldstart [-- --rounds N --json FILE]
//!
//! Needs root, containerd, runc, nix-bin, patchelf, python3 and Debian's Go
//! sources (scripts/bench installs them).

mod common;
#[allow(dead_code)]
#[path = "../tests/common/http.rs"]
mod http;
mod link;
mod python;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{arg, arg_or, drop_caches, du, median, nix_copy_from, publish, run, signing_key};
use python::PythonClosure;

const IMAGE: &str = "docker.io/library/bench-python:latest";
const PLAIN_IMAGE: &str = "docker.io/library/bench-python-plain:latest";

/// Processes and mounts to clean up, whatever happens.
struct Guard {
    dir: PathBuf,
    children: Vec<Child>,
    namespaces: Vec<String>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let needle = self.dir.to_string_lossy().into_owned();
        let _ = Command::new("pkill").args(["-9", "-f", &needle]).status();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut points: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|p| p.starts_with(&needle))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            let _ = rustix::mount::unmount(p, rustix::mount::UnmountFlags::DETACH);
        }
        for ns in &self.namespaces {
            let _ = std::fs::remove_dir_all(Path::new("/run/containerd/runc").join(ns));
        }
        let _ = nix_snapshotter::store::gc::remove_tree(&self.dir);
    }
}

fn wait_sock(p: &Path) {
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(p).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{} not listening",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

struct Env {
    ctrd_sock: PathBuf,
    nix_sock: PathBuf,
}

impl Env {
    /// Imports the Nix image into `ns`, retrying while containerd reconnects
    /// to a restarted daemon (it backs off up to a few seconds).
    fn import(&self, ns: &str, archive: &Path) {
        let start = Instant::now();
        loop {
            let out = self
                .ctr(ns)
                .args(["images", "import", "--snapshotter", "nix"])
                .arg(archive)
                .output()
                .unwrap();
            if out.status.success() {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "import failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn ctr(&self, ns: &str) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address").arg(&self.ctrd_sock).args(["--namespace", ns]);
        c
    }

    /// `ctr run` until the first line of output: seconds.
    fn first_line(&self, ns: &str, snapshotter: &str, image: &str, id: &str) -> f64 {
        common::first_line(
            self.ctr(ns)
                .args(["run", "--rm", "--snapshotter", snapshotter, image, id]),
        )
    }
}

fn main() {
    let rounds = arg_or("--rounds", 3);
    let dir = PathBuf::from(format!("/tmp/nsb-cold-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut guard = Guard {
        dir: dir.clone(),
        children: Vec::new(),
        namespaces: Vec::new(),
    };

    // --- The closure, built by real Nix from Debian's files.
    let closure = PythonClosure::build(&dir);
    let (chroot, top, paths, python, closure_bytes) = (
        &closure.chroot,
        &closure.top,
        &closure.paths,
        &closure.python,
        closure.bytes,
    );

    let (key, public) = signing_key(&dir, "bench-1");
    eprintln!(
        "publishing ({} store paths, {} MiB) ...",
        paths.len(),
        closure_bytes >> 20
    );
    let cache = dir.join("cache");
    publish(chroot, &cache, "zstd", &key, top);

    // --- Images: the Nix image, and the same python rootfs as a plain image.
    let cli = env!("CARGO_BIN_EXE_nix-snapshotter");
    closure.nix_image(&dir, IMAGE, &dir.join("nix.tar"), None);
    // The python part of the closure, unpacked as ordinary files.
    let python_part: Vec<&String> = paths.iter().filter(|p| !p.contains("-bulk-")).collect();
    closure.plain_image(&[python_part], PLAIN_IMAGE, &dir.join("plain.tar"));

    // --- Servers: the cache on loopback and behind the shaped link.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = http::Server::start(cache.clone());
    let shaped = link::shaped_proxy(&rt, server.addr, Duration::from_millis(50), 100e6 / 8.0);
    shaped.check(&cache);
    let shaped = shaped.url.clone();

    let env = Env {
        ctrd_sock: dir.join("containerd.sock"),
        nix_sock: dir.join("nix.sock"),
    };
    std::fs::write(
        dir.join("containerd.toml"),
        format!(
            "version = 2\nroot = \"{d}/ctrd-root\"\nstate = \"{d}/ctrd-state\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\n[grpc]\n  address = \"{s}\"\n\n[proxy_plugins.nix]\n  type = \"snapshot\"\n  address = \"{n}\"\n",
            d = dir.display(),
            s = env.ctrd_sock.display(),
            n = env.nix_sock.display()
        ),
    )
    .unwrap();
    let start_daemon = |guard: &mut Guard, root: &Path, url: &str, host_store: &str| -> usize {
        let cfg = root.with_extension("toml");
        std::fs::write(&cfg, format!("substituters = [\"{url}\"]\ntrusted_public_keys = [\"{public}\"]\nhost_store = \"{host_store}\"\n[store]\nmax_size = \"0\"\n")).unwrap();
        let _ = std::fs::remove_file(&env.nix_sock);
        let child = Command::new(cli)
            .arg("--config")
            .arg(&cfg)
            .arg("--root")
            .arg(root)
            .arg("--address")
            .arg(&env.nix_sock)
            .args(["--log-level", "warn"])
            .stderr(std::fs::File::create(root.with_extension("log")).unwrap())
            .spawn()
            .unwrap();
        guard.children.push(child);
        wait_sock(&env.nix_sock);
        guard.children.len() - 1
    };
    let stop_daemon = |guard: &mut Guard, i: usize| {
        let c = &mut guard.children[i];
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_raw(c.id() as i32).unwrap(),
            rustix::process::Signal::TERM,
        );
        let _ = c.wait();
    };
    let ctrd = Command::new("containerd")
        .arg("--config")
        .arg(dir.join("containerd.toml"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("containerd.log")).unwrap())
        .spawn()
        .unwrap();
    guard.children.push(ctrd);
    wait_sock(&env.ctrd_sock);

    // (d) baseline: containerd's own overlayfs, image already unpacked.
    let base_ns = format!("nsb-{}-plain", std::process::id());
    guard.namespaces.push(base_ns.clone());
    run(env
        .ctr(&base_ns)
        .args(["images", "import", "--snapshotter", "overlayfs"])
        .arg(dir.join("plain.tar")));
    let mut overlay = Vec::new();
    for r in 0..rounds + 1 {
        let t = env.first_line(
            &base_ns,
            "overlayfs",
            PLAIN_IMAGE,
            &format!("nsb-{}-p{r}", std::process::id()),
        );
        if r > 0 {
            overlay.push(t); // the first run warms the page cache
        }
    }

    let mut report = serde_json::Map::new();
    let mut summary = Vec::new();
    for (link, url) in [("loopback", server.url()), ("shaped 50ms/100Mbit", shaped.clone())] {
        let (mut cold, mut warm, mut eager, mut fetched) = (Vec::new(), Vec::new(), Vec::new(), 0u64);
        for r in 0..rounds {
            let tag = format!(
                "nsb-{}-{}-{r}",
                std::process::id(),
                if link == "loopback" { "l" } else { "s" }
            );
            guard.namespaces.push(tag.clone());
            // (a) + (c): a fresh daemon root, so the store is empty.
            let root = dir.join(format!("{tag}-root"));
            let d = start_daemon(&mut guard, &root, &url, "");
            env.import(&tag, &dir.join("nix.tar"));
            drop_caches();
            cold.push(env.first_line(&tag, "nix", IMAGE, &format!("{tag}-cold")));
            warm.push(env.first_line(&tag, "nix", IMAGE, &format!("{tag}-warm")));
            fetched = du(&root.join("store"));
            stop_daemon(&mut guard, d);

            // (b): real Nix fetches the whole closure, then the container
            // starts from those local paths (our daemon, host store = them).
            let eager_store = dir.join(format!("{tag}-eager"));
            drop_caches();
            let t = Instant::now();
            nix_copy_from(&url, &public, &eager_store, top);
            let realise = t.elapsed().as_secs_f64();
            let root = dir.join(format!("{tag}-eroot"));
            let d = start_daemon(
                &mut guard,
                &root,
                &url,
                &eager_store.join("nix/store").to_string_lossy(),
            );
            let etag = format!("{tag}e");
            guard.namespaces.push(etag.clone());
            env.import(&etag, &dir.join("nix.tar"));
            let start = env.first_line(&etag, "nix", IMAGE, &format!("{tag}-eager"));
            eager.push(realise + start);
            stop_daemon(&mut guard, d);
            let _ = nix_snapshotter::store::gc::remove_tree(&eager_store);
            eprintln!(
                "{link} round {r}: cold lazy {:.2} s, warm {:.3} s, cold eager {:.2} s (realise {realise:.2} s)",
                cold[r], warm[r], eager[r]
            );
        }
        let (c, w, e, o) = (median(cold), median(warm), median(eager), median(overlay.clone()));
        summary.push(format!(
            "{link}: cold lazy {c:.2} s | cold eager {e:.2} s | warm {w:.3} s | overlayfs {o:.3} s | eager/lazy {:.1}x | warm/overlayfs {:.2}x | fetched {} of {} MiB ({:.1} %)",
            e / c,
            w / o,
            fetched >> 20,
            closure_bytes >> 20,
            100.0 * fetched as f64 / closure_bytes as f64
        ));
        report.insert(
            link.to_string(),
            serde_json::json!({ "cold_lazy": c, "cold_eager": e, "warm": w, "overlayfs": o,
                                "fetched_bytes": fetched, "closure_bytes": closure_bytes }),
        );
    }

    // --- Warm sequential read: through the FUSE view vs the local file.
    let root = dir.join("read-root");
    let d = start_daemon(&mut guard, &root, &server.url(), "");
    let ns = format!("nsb-{}-read", std::process::id());
    guard.namespaces.push(ns.clone());
    env.import(&ns, &dir.join("nix.tar"));
    env.first_line(&ns, "nix", IMAGE, &format!("{ns}-c"));

    // --- Warm against overlayfs under the same conditions: alternating
    // runs, after a warm-up of each, nothing else going on.
    env.first_line(&ns, "nix", IMAGE, &format!("{ns}-w"));
    env.first_line(&base_ns, "overlayfs", PLAIN_IMAGE, &format!("{ns}-o"));
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for i in 0..9 {
        ours.push(env.first_line(&ns, "nix", IMAGE, &format!("{ns}-w{i}")));
        theirs.push(env.first_line(&base_ns, "overlayfs", PLAIN_IMAGE, &format!("{ns}-o{i}")));
    }
    let (w, o) = (median(ours), median(theirs));
    summary.push(format!(
        "warm vs overlayfs, 9 alternating runs each: nix-snapshotter {w:.3} s, overlayfs {o:.3} s, ratio {:.2}x",
        w / o
    ));
    report.insert(
        "warm_alternating".into(),
        serde_json::json!({ "warm": w, "overlayfs": o }),
    );

    // Views go with their last snapshot: hold one open for the read test.
    let snaps = run(env.ctr(&ns).args(["snapshots", "--snapshotter", "nix", "ls"]));
    let layer = snaps
        .lines()
        .find(|l| l.contains("Committed"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_string();
    run(env
        .ctr(&ns)
        .args(["snapshots", "--snapshotter", "nix", "prepare", "read-view", &layer]));
    let view = std::fs::read_dir(root.join("fuse"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let rel = format!("{}/bin/python3.11", python.trim_start_matches("/nix/store/"));
    let through_fuse = view.join("nix/store").join(&rel);
    let local = root.join("store").join(&rel);
    let read_rate = |p: &Path| {
        let mut best = 0f64;
        for _ in 0..5 {
            let t = Instant::now();
            let mut f = std::fs::File::open(p).unwrap();
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0usize;
            for _ in 0..40 {
                // 40 passes over the file: sequential, page-cache warm.
                use std::io::Seek;
                f.seek(std::io::SeekFrom::Start(0)).unwrap();
                loop {
                    let n = f.read(&mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    total += n;
                }
            }
            best = best.max(total as f64 / t.elapsed().as_secs_f64());
        }
        best
    };
    let (fuse_rate, disk_rate) = (read_rate(&through_fuse), read_rate(&local));
    stop_daemon(&mut guard, d);
    summary.push(format!(
        "warm sequential read of python3.11 (6.5 MiB, 40 passes): FUSE view {:.0} MiB/s, local disk {:.0} MiB/s, ratio {:.2}x",
        fuse_rate / 1048576.0,
        disk_rate / 1048576.0,
        fuse_rate / disk_rate
    ));
    report.insert("fuse_read_ratio".into(), serde_json::json!(fuse_rate / disk_rate));

    println!();
    println!(
        "closure: {} store paths, {} MiB; {rounds} rounds, medians",
        paths.len(),
        closure_bytes >> 20
    );
    for s in summary {
        println!("{s}");
    }
    if let Some(out) = arg("--json") {
        std::fs::write(out, serde_json::to_vec_pretty(&report).unwrap()).unwrap();
    }
    drop(server);
    drop(rt);
    drop(guard);
}
