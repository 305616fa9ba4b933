//! Cold starts under load: batches of eight containers start at once on a
//! store that does not have their paths, and copy store files with busybox
//! `cat` (which uses sendfile) and with a program that calls sendfile(2)
//! itself. Not one output may be lost or short.
//!
//! Two images with disjoint closures take turns, and the store is bounded
//! far below either, so every batch starts cold: the other image's paths
//! were evicted by the previous batch's fetches. `NST_STRESS_STARTS` sets
//! how many containers start in all (CI: 48; `scripts/stress`: 400).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::http::Server;
use common::image::{nix_layer, Entry};
use common::nix::{derivation, NixStore};
use common::{unique, Containerd, Daemon, TempRoot};
use nix_snapshotter::image::{self as lib, Layer};
use nix_snapshotter::nixfmt::StorePath;

const BIG: usize = 100 * 1024;

struct Image {
    reference: String,
    expected: String,
}

/// The static sendfile program, compiled from tests/stress/sendfile.c.
fn sendfile_program(dir: &Path) -> Vec<u8> {
    let out = dir.join("sendfile");
    let status = Command::new("cc")
        .args(["-static", "-O2", "-o"])
        .arg(&out)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/stress/sendfile.c"))
        .status()
        .expect("a C compiler (gcc, libc6-dev) must be installed (see scripts/install-deps)");
    assert!(status.success(), "cc failed");
    std::fs::read(out).unwrap()
}

#[test]
fn cold_starts_never_lose_or_shorten_sendfile_output() {
    let starts: usize = common::env_or("NST_STRESS_STARTS", 48);
    let tmp = TempRoot::new("stress");
    let nix = NixStore::new(&tmp.join("nix"), "stress-1");
    let mut attrs = Vec::new();
    for side in ["a", "b"] {
        attrs.push(format!(
            "tool{side} = {};",
            derivation(
                &format!("tool-{side}"),
                "b mkdir -p $out/bin; b cp /bin/busybox $out/bin/busybox",
                &[]
            )
        ));
        attrs.push(format!(
            "data{side} = {};",
            derivation(
                &format!("data-{side}"),
                &format!("b mkdir $out; b printf 'greeting {side}\\n' > $out/small; b dd if=/dev/zero of=$out/big bs=1024 count={}", BIG / 1024),
                &[]
            )
        ));
    }
    let outs = nix.build(&format!("rec {{ {} }}", attrs.join("\n")));
    let cache = tmp.join("cache");
    nix.publish(&cache, "zstd", &outs);
    let find = |s: &str| outs.iter().find(|o| o.ends_with(s)).unwrap().clone();
    let program = sendfile_program(&tmp.path);

    let server = Server::start(cache);
    let cfg = common::cache_config(
        &tmp.path,
        &server.url(),
        &nix.public_key,
        "[store]\nmax_size = \"1\"\n[fuse]\nfetch_timeout = 60.0\n",
    );
    let sock = tmp.join("nix.sock");
    let root = tmp.join("root");
    let daemon = Daemon::start_with(&root, &sock, &["--config", cfg.to_str().unwrap()], &[]);
    let ctrd = Containerd::start(&tmp.join("ctrd"), &sock);

    let images: Vec<Image> = ["a", "b"]
        .iter()
        .map(|side| {
            let (tool, data) = (find(&format!("-tool-{side}")), find(&format!("-data-{side}")));
            let closure: Vec<(String, bool)> = [&tool, &data]
                .iter()
                .map(|p| (StorePath::parse(p).unwrap().base_name().to_string(), true))
                .collect();
            // What the container read also goes to a host file, so that a
            // loss can be told apart: in the store (the file is wrong too)
            // or between the container and `ctr` (only ctr's copy is).
            let script = format!(
                "{{ cat {data}/small; /sendfile {data}/small; cat {data}/big | wc -c; /sendfile {data}/big | wc -c; }} | tee /out/$ID"
            );
            let bb = format!("{tool}/bin/busybox");
            let layers = [
                Layer::from_tar(
                    &lib::layer_tar(&[Entry::File("sendfile".into(), 0o755, program.clone())]),
                    Default::default(),
                ),
                Layer::from_tar(&lib::layer_tar(&nix_layer(&closure, &[])), Default::default()),
            ];
            let reference = format!("docker.io/library/stress-{side}:latest");
            let config = serde_json::json!({
                "architecture": "amd64",
                "os": "linux",
                "config": { "Cmd": [bb, "sh", "-c", script] },
            });
            let archive: PathBuf = tmp.join(&format!("stress-{side}.tar"));
            lib::write_archive(&archive, Some(&reference), config, &layers).unwrap();
            ctrd.ctr_ok(&["images", "import", "--snapshotter", "nix", archive.to_str().unwrap()]);
            Image {
                reference,
                expected: format!("greeting {side}\ngreeting {side}\n{BIG}\n{BIG}\n"),
            }
        })
        .collect();

    let evidence = tmp.join("out");
    std::fs::create_dir_all(&evidence).unwrap();
    let mount = format!("type=bind,src={},dst=/out,options=rbind:rw", evidence.display());
    let views = || std::fs::read_dir(root.join("fuse")).map(|d| d.count()).unwrap_or(0);
    let mut lost = Vec::new();
    let mut ctr_lost = Vec::new();
    let mut done = 0;
    let mut batch = 0;
    while done < starts {
        let image = &images[batch % 2];
        let n = (starts - done).min(8);
        let outs: Vec<(String, String, String)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..n)
                .map(|_| {
                    s.spawn(|| {
                        let id = unique("c");
                        let env = format!("ID={id}");
                        let out = ctrd.ctr(&[
                            "run",
                            "--rm",
                            "--snapshotter",
                            "nix",
                            "--env",
                            &env,
                            "--mount",
                            &mount,
                            &image.reference,
                            &id,
                        ]);
                        let read = std::fs::read_to_string(evidence.join(&id)).unwrap_or_default();
                        (
                            read,
                            String::from_utf8_lossy(&out.stdout).into_owned(),
                            format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr)),
                        )
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let norm = |s: &str| -> String { s.lines().map(|l| format!("{}\n", l.trim())).collect() };
        for (read, out, err) in outs {
            if norm(&read) != image.expected {
                lost.push(format!(
                    "batch {batch}: read {read:?}, ctr printed {out:?} (ctr {err:?})"
                ));
            } else if norm(&out) != image.expected {
                ctr_lost.push(format!("batch {batch}: ctr printed {out:?} (ctr {err:?})"));
            }
        }
        done += n;
        batch += 1;
        // Wait for containerd to remove the finished containers' snapshots,
        // so their views (and pins) are gone and the next batch's fetches
        // evict this image's paths.
        let start = Instant::now();
        while views() > 0 && start.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    println!(
        "{done} cold starts in {batch} batches of up to 8: {} lost or short reads; \
         {} outputs the container wrote whole but ctr did not print{}",
        lost.len(),
        ctr_lost.len(),
        ctr_lost.iter().map(|l| format!("\n  {l}")).collect::<String>()
    );
    assert!(
        lost.is_empty(),
        "{} of {done} outputs lost or short:\n{}\n--- daemon problems:\n{}",
        lost.len(),
        lost.join("\n"),
        daemon.log_problems()
    );
    // Every batch was cold: each image's data was fetched once per turn.
    let fetched = server.log().iter().filter(|l| l.contains("/nar/")).count();
    assert!(fetched >= 2 * batch, "only {fetched} NAR downloads for {batch} batches");
    drop(ctrd);
    drop(daemon);
}
