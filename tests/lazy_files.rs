//! File-granular lazy fetching end to end: a cache made by `cache push`
//! (signed file indexes, seekable NARs) on 127.0.0.1, a private containerd
//! with our daemon, a container that reads one small file of a 3 MiB store
//! path. Only the frames under what it reads are fetched, by ranged
//! requests; the path is never fetched whole; what a view shows re-dumps to
//! the store path's NarHash.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::http::Server;
use common::image::{nix_layer, write_oci_archive};
use common::nix::{dump_sha256, mixed_closure, NixStore};
use common::{unique, Containerd, Daemon, TempRoot};
use nix_snapshotter::nixfmt::index::FileIndex;
use nix_snapshotter::nixfmt::StorePath;

/// NAR traffic for one store path's NAR file: (ranged bytes, whole GETs).
fn traffic(server: &Server, nar_url: &str) -> (u64, usize) {
    let mut ranged = 0;
    let mut whole = 0;
    for l in server.log().iter().filter(|l| l.contains(nar_url)) {
        match l.split_once(" bytes=") {
            Some((_, r)) => {
                let (a, b) = r.split_once('-').unwrap();
                ranged += b.parse::<u64>().unwrap_or(u64::MAX) - a.parse::<u64>().unwrap() + 1;
            }
            None => whole += 1,
        }
    }
    (ranged, whole)
}

fn scenario(name: &str, passthrough: bool) {
    let tmp = TempRoot::new(name);
    let nix = NixStore::new(&tmp.join("nix"), "lazyfiles-1");
    let top = mixed_closure(&nix);
    let cache = tmp.join("cache");
    let out = Command::new(common::DAEMON)
        .args(["cache", "push", "--to"])
        .arg(&cache)
        .arg("--secret-key")
        .arg(&nix.secret_key)
        .arg("--store-root")
        .arg(&nix.root)
        .args(["--frame-size", "64KiB", "--chunk-size", "16KiB", &top])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let closure = nix.closure(&top);
    let data = closure.iter().find(|p| p.ends_with("-data")).unwrap().clone();
    let tool = closure.iter().find(|p| p.ends_with("-tool")).unwrap().clone();
    let nar_of = |p: &str| {
        let sp = StorePath::parse(p).unwrap();
        FileIndex::parse(&std::fs::read(cache.join(format!("{}.idx", sp.hash_part()))).unwrap())
            .unwrap()
            .url
            .unwrap()
    };
    let (data_nar, tool_nar) = (nar_of(&data), nar_of(&tool));

    let server = Server::start(cache.clone());
    let cfg = common::cache_config(
        &tmp.path,
        &server.url(),
        &nix.public_key,
        &format!("[fuse]\nfetch_timeout = 20.0\npassthrough = {passthrough}\n"),
    );
    let sock = tmp.join("nix.sock");
    let root = tmp.join("root");
    let daemon = Daemon::start_with(&root, &sock, &["--config", cfg.to_str().unwrap()], &[]);
    let ctrd = Containerd::start(&tmp.join("ctrd"), &sock);
    let layer = nix.layer_closure(&top);
    let bb = format!("{tool}/bin/busybox");
    let image = format!("docker.io/library/{name}:latest");
    let archive = tmp.join("image.tar");
    let script = format!(
        "cat {data}/share/deep/a; ls {data}/share; readlink {data}/share/link; \
         echo changed > {data}/share/deep/b; cat {data}/share/deep/b"
    );
    write_oci_archive(&archive, &image, &[nix_layer(&layer, &[])], &[&bb, "sh", "-c", &script]);
    ctrd.ctr_ok(&["images", "import", "--snapshotter", "nix", archive.to_str().unwrap()]);
    let out = ctrd.ctr_run_in(
        &ctrd.namespace,
        &["run", "--rm", "--snapshotter", "nix", &image, &unique("c")],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "small one\nbig\ndeep\nlink\ndeep/a\nchanged\n",
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        common::tail(&daemon.log_text(), 30)
    );

    // The data path: one small file read (and one copied up to be written):
    // a frame or two of its NAR, never the whole; nothing unpacked.
    let (ranged, whole) = traffic(&server, &data_nar);
    let nar_size = std::fs::metadata(cache.join(&data_nar)).unwrap().len();
    assert_eq!(whole, 0, "{:#?}", server.log());
    assert!(
        ranged > 0 && ranged <= 2 * (64 << 10),
        "{ranged} of {nar_size} bytes fetched"
    );
    // busybox: read by the piece too (the whole binary, as exec reads it).
    assert_eq!(traffic(&server, &tool_nar).1, 0, "{:#?}", server.log());
    let base = |p: &str| StorePath::parse(p).unwrap().base_name().to_string();
    assert!(
        !root.join("store").join(base(&data)).exists(),
        "the data path was fetched whole"
    );

    // A view shows exactly the store path: its dump is the original's
    // (every file read through the index, every chunk verified).
    let view: PathBuf = ctrd.view_of_nix_layer("dump-check", &root);
    for p in [&data, &tool] {
        assert_eq!(
            dump_sha256(&view.join("nix/store").join(base(p))),
            dump_sha256(&nix.real(p)),
            "{p} differs through the view"
        );
    }
    assert_eq!(traffic(&server, &data_nar).1, 0);
    let log = daemon.log_text();
    let problems: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn a_container_reading_one_small_file_fetches_a_frame_not_the_path() {
    scenario("lazyfiles", true);
}

#[test]
fn without_passthrough_too() {
    scenario("lazyfilesnp", false);
}
