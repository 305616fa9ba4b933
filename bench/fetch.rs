//! Fetching a large closure from a binary cache on 127.0.0.1: our
//! `nix-snapshotter fetch --closure` against real Nix's `nix copy --from`,
//! for zstd and xz caches written by `nix copy`, in one run; plus our
//! throughput on the largest NAR against `curl | zstd -d > /dev/null`.
//!
//! The closure: every directory of Debian's Go sources under
//! /usr/share/gocode/src/*/* imported as its own store path (tens of store
//! paths, ~400 MB, ~17,000 files), and one path referencing them all.
//!
//!     cargo bench --bench fetch [-- --rounds N]
//!
//! Needs root, nix-bin, curl, zstd and golang-github-containerd-containerd-dev
//! (scripts/bench installs them).

mod common;
#[allow(dead_code)]
#[path = "../tests/common/http.rs"]
mod http;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{arg_or, closure_of, du, median, nix_build, nix_copy_from, publish, run, signing_key, store_name};

struct Guard(PathBuf);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = nix_snapshotter::store::gc::remove_tree(&self.0);
    }
}

/// Seconds `nix-snapshotter fetch ARGS` takes into an empty `root`.
fn timed_fetch(cfg: &std::path::Path, root: &std::path::Path, args: &[&str]) -> f64 {
    let t = Instant::now();
    run(Command::new(env!("CARGO_BIN_EXE_nix-snapshotter"))
        .arg("--config")
        .arg(cfg)
        .arg("--root")
        .arg(root)
        .args(["--log-level", "warn", "fetch"])
        .args(args));
    t.elapsed().as_secs_f64()
}

fn main() {
    let rounds = arg_or("--rounds", 3);
    let dir = PathBuf::from(format!("/tmp/nsb-fetch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let _guard = Guard(dir.clone());
    let chroot = dir.join("src-store");

    // The closure.
    let mut imports = Vec::new();
    for host in std::fs::read_dir("/usr/share/gocode/src").expect("golang-github-containerd-containerd-dev is needed") {
        let host = host.unwrap().path();
        for org in std::fs::read_dir(&host).unwrap() {
            let org = org.unwrap().path();
            if !org.is_dir() {
                continue;
            }
            let name = store_name(&format!(
                "gocode-{}-{}",
                host.file_name().unwrap().to_string_lossy(),
                org.file_name().unwrap().to_string_lossy()
            ));
            imports.push(format!(
                "(builtins.path {{ path = {}; name = \"{name}\"; }})",
                org.display()
            ));
        }
    }
    let expr = format!(
        r#"derivation {{
  name = "gocode-closure"; system = "x86_64-linux"; builder = "/bin/sh";
  args = [ "-c" "/bin/busybox echo $refs > $out" ];
  refs = [ {} ];
}}"#,
        imports.join(" ")
    );
    std::fs::write(dir.join("closure.nix"), expr).unwrap();
    eprintln!("building the closure ({} imported paths) ...", imports.len());
    let top = nix_build(&chroot, &dir.join("closure.nix"), "");
    let n_paths = closure_of(&chroot, &top).len();
    let unpacked = du(&chroot.join("nix/store"));

    let (key, public) = signing_key(&dir, "bench-1");

    let mut results = Vec::new();
    for compression in ["zstd", "xz"] {
        let cache = dir.join(format!("cache-{compression}"));
        eprintln!("publishing with {compression} ...");
        publish(&chroot, &cache, compression, &key, &top);
        let download: u64 = std::fs::read_dir(cache.join("nar"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        let server = http::Server::start(cache.clone());
        let cfg = dir.join("config.toml");
        std::fs::write(
            &cfg,
            format!("substituters = [\"{}\"]\ntrusted_public_keys = [\"{public}\"]\nhost_store = \"\"\n[store]\nmax_size = \"0\"\n", server.url()),
        )
        .unwrap();

        let (mut ours, mut nix) = (Vec::new(), Vec::new());
        for r in 0..rounds {
            let root = dir.join(format!("ours-{compression}-{r}"));
            ours.push(timed_fetch(&cfg, &root, &["--closure", &top]));
            let _ = nix_snapshotter::store::gc::remove_tree(&root);

            let dest = dir.join(format!("nix-{compression}-{r}"));
            let t = Instant::now();
            nix_copy_from(&server.url(), &public, &dest, &top);
            nix.push(t.elapsed().as_secs_f64());
            let _ = nix_snapshotter::store::gc::remove_tree(&dest);
            eprintln!(
                "{compression} round {r}: ours {:.2} s, nix copy {:.2} s",
                ours[r], nix[r]
            );
        }
        results.push((compression, download, median(ours), median(nix)));

        if compression == "zstd" {
            // Physical limit: the largest NAR through curl and zstd.
            let largest = std::fs::read_dir(cache.join("nar"))
                .unwrap()
                .map(|e| e.unwrap())
                .max_by_key(|e| e.metadata().unwrap().len())
                .unwrap();
            let url = format!("{}/nar/{}", server.url(), largest.file_name().to_string_lossy());
            let info_file = std::fs::read_dir(&cache)
                .unwrap()
                .map(|e| e.unwrap().path())
                .find(|p| {
                    p.extension().is_some_and(|x| x == "narinfo")
                        && std::fs::read_to_string(p)
                            .unwrap()
                            .contains(&*largest.file_name().to_string_lossy())
                })
                .unwrap();
            let info = nix_snapshotter::nixfmt::NarInfo::parse(&std::fs::read_to_string(&info_file).unwrap()).unwrap();
            let mut curl = Vec::new();
            let mut single = Vec::new();
            for r in 0..rounds {
                // Not charged for the writeback of the rounds above (hundreds
                // of MiB written and removed): both start from a quiet disk.
                run(&mut Command::new("sync"));
                let t = Instant::now();
                run(Command::new("sh")
                    .arg("-c")
                    .arg(format!("curl -sf {url} | zstd -dc > /dev/null")));
                curl.push(t.elapsed().as_secs_f64());
                let root = dir.join(format!("single-{r}"));
                run(&mut Command::new("sync"));
                single.push(timed_fetch(&cfg, &root, &[&info.store_path.to_string()]));
                let _ = nix_snapshotter::store::gc::remove_tree(&root);
            }
            let mb = info.nar_size as f64 / (1 << 20) as f64;
            println!(
                "largest NAR ({}, {:.1} MiB unpacked): curl|zstd -d {:.0} MiB/s, ours (fetch+verify+unpack to disk) {:.0} MiB/s, ratio {:.2}x",
                info.store_path.name(),
                mb,
                mb / median(curl.clone()),
                mb / median(single.clone()),
                median(curl) / median(single)
            );
        }
        drop(server);
        std::thread::sleep(Duration::from_millis(50));
    }
    println!();
    println!(
        "closure: {n_paths} store paths, {:.0} MiB on disk unpacked; {rounds} rounds, medians",
        unpacked as f64 / (1 << 20) as f64
    );
    for (c, download, ours, nix) in results {
        println!(
            "{c:>5}: download {:.0} MiB | nix-snapshotter fetch --closure {ours:.2} s | nix copy --from {nix:.2} s | ratio ours/nix {:.2}x",
            download as f64 / (1 << 20) as f64,
            ours / nix
        );
    }
}
