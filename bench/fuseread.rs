//! Warm read throughput through the lazy store, against the local disk.
//!
//! Where FUSE passthrough is refused (rootless: the kernel grants it to the
//! init namespace's root only) every read of a store file goes through the
//! daemon. This measures that path (`[fuse] passthrough = false`, the same
//! code a rootless daemon runs) and passthrough, against reading the same
//! bytes straight from the local store directory, all warm (fetched
//! before), in one run:
//!
//! - one 512 MiB file read sequentially with 1 MiB reads,
//! - 4096 files of 16 KiB each (64 MiB), each opened, read and closed,
//!
//! each with the page cache dropped before every round (the data comes
//! from the local disk) and hot (read again right after). Printed: MiB/s
//! medians and their ratio to the local disk; the target is >= 0.8x.
//!
//!     cargo bench --bench fuseread [-- --rounds N --json FILE]
//!
//! Needs root, containerd, runc and nix-bin (scripts/install-deps).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "common.rs"]
mod helpers;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::http::Server;
use common::image::{nix_layer, write_oci_archive};
use common::nix::{busybox_tool, derivation, NixStore};
use common::{Containerd, Daemon, TempRoot};
use helpers::{arg, arg_or, drop_caches, median};
use nix_snapshotter::nixfmt::StorePath;

const BIG_MIB: usize = 512;
const SMALL_FILES: usize = 4096;

/// Reads every file under `dir` (recursively, in name order), each whole
/// with 1 MiB reads; returns the bytes read.
fn read_tree(dir: &Path, buf: &mut [u8]) -> u64 {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    let mut total = 0;
    for p in entries {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        if meta.is_dir() {
            total += read_tree(&p, buf);
        } else if meta.is_file() {
            let mut f = std::fs::File::open(&p).unwrap();
            loop {
                let n = f.read(buf).unwrap();
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
        }
    }
    total
}

/// MiB/s of reading `dir` once, after dropping caches when `cold`.
fn throughput(dir: &Path, cold: bool) -> f64 {
    let mut buf = vec![0u8; 1 << 20];
    if cold {
        drop_caches();
    } else {
        read_tree(dir, &mut buf);
    }
    let t = Instant::now();
    let bytes = read_tree(dir, &mut buf);
    bytes as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64()
}

struct Source {
    name: &'static str,
    big: PathBuf,
    small: PathBuf,
}

fn main() {
    assert!(
        rustix::process::geteuid().is_root(),
        "run as root (mounts, drop_caches)"
    );
    let rounds = arg_or("--rounds", 5);
    let tmp = TempRoot::new("fuseread");
    let nix = NixStore::new(&tmp.join("nix"), "fuseread-1");
    let expr = format!(
        "rec {{ tool = {}; big = {}; small = {}; top = {}; }}",
        busybox_tool(),
        derivation(
            "big",
            &format!("b mkdir $out; b dd if=/dev/urandom of=$out/data bs=1M count={BIG_MIB} 2>/dev/null"),
            &[]
        ),
        derivation(
            "small",
            &format!(
                "b mkdir $out; i=0; while [ $i -lt {SMALL_FILES} ]; do d=$out/$((i % 64)); b mkdir -p $d; \
                 b dd if=/dev/urandom of=$d/f$i bs=16k count=1 2>/dev/null; i=$((i+1)); done"
            ),
            &[]
        ),
        derivation(
            "top",
            "b mkdir $out; b echo $deps > $out/refs",
            &["tool", "big", "small"]
        ),
    );
    eprintln!("building {BIG_MIB} MiB + {SMALL_FILES} x 16 KiB of store paths...");
    let built = nix.build_cache(&expr, "top", &tmp.join("cache"));
    let (big, small) = (built.find("-big"), built.find("-small"));
    let server = Server::start(tmp.join("cache"));
    let bb = format!("{}/bin/busybox", built.find("-tool"));

    let mut sources: Vec<(Source, Option<(Daemon, Containerd)>)> = Vec::new();
    for (name, passthrough) in [("FUSE, reads through the daemon", false), ("FUSE passthrough", true)] {
        let dir = tmp.join(if passthrough { "pt" } else { "daemon" });
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = common::cache_config(
            &dir,
            &server.url(),
            &nix.public_key,
            &format!("[fuse]\npassthrough = {passthrough}\n"),
        );
        let sock = dir.join("nix.sock");
        let root = dir.join("root");
        let daemon = Daemon::start_logging(&root, &sock, &["--config", cfg.to_str().unwrap()], &[], "warn");
        let ctrd = Containerd::start(&dir.join("ctrd"), &sock);
        let archive = dir.join("image.tar");
        write_oci_archive(
            &archive,
            "docker.io/library/fuseread:latest",
            &[nix_layer(&built.closure, &[])],
            &[&bb],
        );
        ctrd.ctr_ok(&["images", "import", "--snapshotter", "nix", archive.to_str().unwrap()]);
        let view = ctrd.view_of_nix_layer("reader", &root);
        // Warm: fetched into the local store before anything is timed.
        let out = Command::new(common::DAEMON)
            .arg("--address")
            .arg(&sock)
            .arg("--root")
            .arg(&root)
            .args(["fetch", "--config", cfg.to_str().unwrap(), &big, &small])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

        let at = |p: &str| view.join("nix/store").join(StorePath::parse(p).unwrap().base_name());
        if !passthrough {
            // The baseline: the very bytes the views serve, read from disk.
            let local = |p: &str| root.join("store").join(StorePath::parse(p).unwrap().base_name());
            sources.push((
                Source {
                    name: "local disk (baseline)",
                    big: local(&big),
                    small: local(&small),
                },
                None,
            ));
        }
        sources.push((
            Source {
                name,
                big: at(&big),
                small: at(&small),
            },
            Some((daemon, ctrd)),
        ));
    }

    let mut results = Vec::new();
    println!("warm reads, median MiB/s of {rounds} rounds (ratio to the local disk)");
    for (workload, big_file) in [("512 MiB file", true), ("4096 x 16 KiB files", false)] {
        for cold in [true, false] {
            let state = if cold { "page cache dropped" } else { "page cache hot" };
            let mut base = 0.0;
            for (s, _) in &sources {
                let dir = if big_file { &s.big } else { &s.small };
                let v = median((0..rounds).map(|_| throughput(dir, cold)).collect());
                if s.name.starts_with("local") {
                    base = v;
                }
                println!(
                    "  {workload:22} {state:19} {:32} {v:8.0} MiB/s  {:.2}x",
                    s.name,
                    v / base
                );
                results.push(format!(
                    "{{\"workload\":\"{workload}\",\"cache\":\"{state}\",\"source\":\"{}\",\"mib_s\":{v:.1},\"ratio\":{:.3}}}",
                    s.name,
                    v / base
                ));
            }
        }
    }
    if let Some(path) = arg("--json") {
        std::fs::write(path, format!("[{}]\n", results.join(",\n"))).unwrap();
    }
    for (_, stack) in sources {
        drop(stack);
    }
}
