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

/// A closure pushed to a cache with file indexes, served on 127.0.0.1.
struct Setup {
    tmp: TempRoot,
    nix: NixStore,
    top: String,
    cache: PathBuf,
    server: Server,
    data: String,
    tool: String,
    data_nar: String,
    tool_nar: String,
}

fn push(nix: &NixStore, cache: &std::path::Path, path: &str) {
    nix.cache_push(cache, &["--frame-size", "64KiB", "--chunk-size", "16KiB"], &[path]);
}

fn setup(name: &str) -> Setup {
    let tmp = TempRoot::new(name);
    let nix = NixStore::new(&tmp.join("nix"), "lazyfiles-1");
    let top = mixed_closure(&nix);
    let cache = tmp.join("cache");
    push(&nix, &cache, &top);
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
    Setup {
        tmp,
        nix,
        top,
        cache,
        server,
        data,
        tool,
        data_nar,
        tool_nar,
    }
}

impl Setup {
    /// A node: our daemon (root `<tmp>/<name>/root`) and a containerd.
    fn node(&self, name: &str, extra: &str) -> (Daemon, Containerd, PathBuf) {
        let dir = self.tmp.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = common::cache_config(
            &dir,
            &self.server.url(),
            &self.nix.public_key,
            &format!("[fuse]\nfetch_timeout = 20.0\n{extra}"),
        );
        let sock = dir.join("nix.sock");
        let root = dir.join("root");
        let daemon = Daemon::start_with(&root, &sock, &["--config", cfg.to_str().unwrap()], &[]);
        let ctrd = Containerd::start(&dir.join("ctrd"), &sock);
        (daemon, ctrd, root)
    }

    fn script(&self) -> String {
        let data = &self.data;
        format!(
            "cat {data}/share/deep/a; ls {data}/share; readlink {data}/share/link; \
             echo changed > {data}/share/deep/b; cat {data}/share/deep/b"
        )
    }

    fn run(&self, ctrd: &Containerd, daemon: &Daemon, image: &str) {
        let out = ctrd.ctr_run_in(
            &ctrd.namespace,
            &["run", "--rm", "--snapshotter", "nix", image, &unique("c")],
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "small one\nbig\ndeep\nlink\ndeep/a\nchanged\n",
            "{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            common::tail(&daemon.log_text(), 30)
        );
    }
}

fn no_problems(daemon: &Daemon) {
    let log = daemon.log_text();
    let problems: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    assert!(problems.is_empty(), "{problems:#?}");
}

fn scenario(name: &str, passthrough: bool) {
    let s = setup(name);
    let (daemon, ctrd, root) = s.node("node", &format!("passthrough = {passthrough}\n"));
    let layer = s.nix.layer_closure(&s.top);
    let bb = format!("{}/bin/busybox", s.tool);
    let image = format!("docker.io/library/{name}:latest");
    let archive = s.tmp.join("image.tar");
    write_oci_archive(
        &archive,
        &image,
        &[nix_layer(&layer, &[])],
        &[&bb, "sh", "-c", &s.script()],
    );
    ctrd.ctr_ok(&["images", "import", "--snapshotter", "nix", archive.to_str().unwrap()]);
    s.run(&ctrd, &daemon, &image);

    // The data path: one small file read (and one copied up to be written):
    // a frame or two of its NAR, never the whole; nothing unpacked.
    let (ranged, whole) = traffic(&s.server, &s.data_nar);
    let nar_size = std::fs::metadata(s.cache.join(&s.data_nar)).unwrap().len();
    assert_eq!(whole, 0, "{:#?}", s.server.log());
    assert!(
        ranged > 0 && ranged <= 2 * (64 << 10),
        "{ranged} of {nar_size} bytes fetched"
    );
    // busybox: read by the piece too (the whole binary, as exec reads it).
    assert_eq!(traffic(&s.server, &s.tool_nar).1, 0, "{:#?}", s.server.log());
    let base = |p: &str| StorePath::parse(p).unwrap().base_name().to_string();
    assert!(
        !root.join("store").join(base(&s.data)).exists(),
        "the data path was fetched whole"
    );

    // A view shows exactly the store path: its dump is the original's
    // (every file read through the index, every chunk verified).
    let view: PathBuf = ctrd.view_of_nix_layer("dump-check", &root);
    for p in [&s.data, &s.tool] {
        assert_eq!(
            dump_sha256(&view.join("nix/store").join(base(p))),
            dump_sha256(&s.nix.real(p)),
            "{p} differs through the view"
        );
    }
    assert_eq!(traffic(&s.server, &s.data_nar).1, 0);
    no_problems(&daemon);
}

#[test]
fn an_access_profile_recorded_on_one_node_prefetches_a_cold_start_on_another() {
    let s = setup("lazyprofile");
    let bb = format!("{}/bin/busybox", s.tool);
    // Node A runs the image once; its daemon records what was read.
    let (daemon, ctrd, root) = s.node("a", "");
    let image = "docker.io/library/lazyprofile:latest";
    let plain = s.tmp.join("plain.tar");
    write_oci_archive(
        &plain,
        image,
        &[nix_layer(&s.nix.layer_closure(&s.top), &[])],
        &[&bb, "sh", "-c", &s.script()],
    );
    ctrd.ctr_ok(&["images", "import", "--snapshotter", "nix", plain.to_str().unwrap()]);
    s.run(&ctrd, &daemon, image);
    let recorded = root.join("access-profile");
    common::wait_until(
        std::time::Duration::from_secs(10),
        || std::fs::read_to_string(&recorded).is_ok_and(|t| t.contains("share/deep/a") && t.contains("bin/busybox")),
        || format!("no profile recorded: {:?}", std::fs::read_to_string(&recorded)),
    );
    // Exported through the daemon (what a CI job does after a run), then
    // recording starts afresh.
    let profile_file = s.tmp.join("profile");
    let export = |args: &[&str]| {
        Command::new(common::DAEMON)
            .arg("--address")
            .arg(&daemon.address)
            .arg("profile")
            .args(args)
            .output()
            .unwrap()
    };
    let out = export(&["--reset", "--output", profile_file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&profile_file).unwrap();
    assert!(text.contains("share/deep/a") && text.contains("bin/busybox"), "{text}");
    assert_eq!(text, std::fs::read_to_string(&recorded).unwrap());
    let out = export(&[]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "nix-snapshotter-profile 1\n",
        "reset: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(ctrd);
    drop(daemon);

    // With the frames of each path's NAR file that the reads needed: hints.
    let data_base = StorePath::parse(&s.data).unwrap().base_name().to_string();
    let hint = format!("\nframes {data_base} {} ", s.data_nar);
    assert!(text.contains(&hint), "{text}");

    // Published with the image: a store path of its closure, named by a
    // label, the image built by `image build --profile`.
    let config = s.tmp.join("config.json");
    std::fs::write(
        &config,
        serde_json::to_vec(&serde_json::json!({ "Cmd": [&bb, "sh", "-c", s.script()] })).unwrap(),
    )
    .unwrap();
    // `listed`: the store path added to the closure.
    let build = |profile: &str, listed: &str, out: &std::path::Path| {
        let paths = s.tmp.join("store-paths");
        let mut closure = s.nix.closure(&s.top);
        closure.push(listed.to_string());
        std::fs::write(&paths, closure.join("\n")).unwrap();
        Command::new(common::DAEMON)
            .args(["image", "build", "--config"])
            .arg(&config)
            .arg("--closure")
            .arg(&paths)
            .arg("--store-root")
            .arg(&s.nix.root)
            .args(["--profile", profile, "--ref", image])
            .arg(out)
            .output()
            .unwrap()
    };
    // A fresh node loads the image with `text` as its profile: loading it
    // (labels passed) prefetches what the profile lists, before any
    // container runs; the run then fetches nothing more. The node's log.
    let cold_node = |tag: &str, text: &str| {
        let file = s.tmp.join(&format!("profile-{tag}"));
        std::fs::write(&file, text).unwrap();
        let profile = s.nix.add_file(&file);
        push(&s.nix, &s.cache, &profile);
        let archive = s.tmp.join(&format!("{tag}.tar"));
        let out = build(&profile, &profile, &archive);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let before = traffic(&s.server, &s.data_nar).0;
        // (Completion off: what a run reads must all have been prefetched,
        // and completing busybox's path would fetch its other half.)
        let (daemon, ctrd, _) = s.node(tag, "[store]\ncomplete_after = 2.0\n");
        let load = ctrd.image_load(&ctrd.namespace, &archive);
        assert!(load.status.success(), "{}", String::from_utf8_lossy(&load.stderr));
        common::wait_until(
            std::time::Duration::from_secs(30),
            || {
                daemon
                    .log_text()
                    .contains("prefetched what the image's access profile lists")
            },
            || format!("no prefetch: {}", common::tail(&daemon.log_text(), 20)),
        );
        let prefetched = traffic(&s.server, &s.data_nar).0 - before;
        assert!(prefetched > 0, "{tag}: nothing of the data path prefetched");
        let requests = s.server.log().len();
        s.run(&ctrd, &daemon, image);
        let after: Vec<String> = s.server.log()[requests..]
            .iter()
            .filter(|l| l.contains("/nar/"))
            .cloned()
            .collect();
        assert!(
            after.is_empty(),
            "{tag}: the run still fetched: {after:#?}\n{}",
            daemon
                .log_text()
                .lines()
                .filter(|l| !l.contains(" FUSE("))
                .collect::<Vec<_>>()
                .join("\n")
        );
        no_problems(&daemon);
        daemon.log_text()
    };
    // The prefetch's runs of frames, and those of them its hints brought.
    let runs = |log: &str| {
        let line = log.lines().find(|l| l.contains("access profile lists")).unwrap();
        let field = |k: &str| -> usize {
            let v = line.split(&format!(" {k}=")).nth(1).unwrap();
            v.split(' ').next().unwrap().parse().unwrap()
        };
        (field("runs"), field("hinted"))
    };
    // As recorded: every hint fits its index and is used as fetched.
    let log = cold_node("b", &text);
    assert!(
        !log.contains("does not fit") && !log.contains("fetched again"),
        "{}",
        common::tail(&log, 30)
    );
    let (all, hinted) = runs(&log);
    assert!(hinted > 0 && hinted == all, "{all} runs, {hinted} hinted");
    // Hostile hints (misaligned, another path's NAR, too long) decide
    // nothing: the ranges are fetched as without them, and served right.
    let mut hostile = String::new();
    for line in text.lines() {
        match line.strip_prefix("frames ") {
            Some(h) => {
                let f: Vec<&str> = h.split(' ').collect();
                let at: u64 = f[2].parse().unwrap();
                hostile.push_str(&format!("frames {} {} {} {}\n", f[0], f[1], at + 1, f[3]));
                let other = if f[1] == s.data_nar { &s.tool_nar } else { &s.data_nar };
                hostile.push_str(&format!("frames {} {other} {at} {}\n", f[0], f[3]));
                hostile.push_str(&format!("frames {} {} 0 {}\n", f[0], f[1], u64::MAX / 2));
            }
            None => hostile.push_str(&format!("{line}\n")),
        }
    }
    let log = cold_node("c", &hostile);
    assert!(log.contains("does not fit"), "{}", common::tail(&log, 30));
    let (all, hinted) = runs(&log);
    assert!(all > 0 && hinted == 0, "{all} runs, {hinted} hinted");

    // A profile label naming a path bigger than any profile can be: its
    // signed narinfo is read, its NAR never fetched, and the node says why.
    let file = s.tmp.join("big-profile");
    std::fs::write(&file, vec![b'#'; 9 << 20]).unwrap();
    let big = s.nix.add_file(&file);
    push(&s.nix, &s.cache, &big);
    let hash = StorePath::parse(&big).unwrap().hash_part().to_string();
    let narinfo = std::fs::read_to_string(s.cache.join(format!("{hash}.narinfo"))).unwrap();
    let big_nar = narinfo
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap()
        .to_string();
    let archive = s.tmp.join("big.tar");
    let out = build(&big, &big, &archive);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (daemon, ctrd, _) = s.node("d", "");
    let load = ctrd.image_load(&ctrd.namespace, &archive);
    assert!(load.status.success(), "{}", String::from_utf8_lossy(&load.stderr));
    common::wait_until(
        std::time::Duration::from_secs(30),
        || daemon.log_text().contains("more than an access profile's"),
        || format!("big profile not refused: {}", common::tail(&daemon.log_text(), 20)),
    );
    let log = s.server.log();
    assert!(log.iter().any(|l| l.contains(&format!("{hash}.narinfo"))), "{log:#?}");
    assert!(
        !log.iter().any(|l| l.contains(&big_nar)),
        "the big profile's NAR was fetched"
    );
    drop(ctrd);
    drop(daemon);

    // A profile outside the closure is refused by name.
    let out = build(
        "/nix/store/00000000000000000000000000000000-elsewhere",
        &s.nix.closure(&s.top)[0],
        &s.tmp.join("bad.tar"),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--profile") && err.contains("not a store path of the closure"),
        "{err}"
    );
}

#[test]
fn a_container_reading_one_small_file_fetches_a_frame_not_the_path() {
    scenario("lazyfiles", true);
}

#[test]
fn without_passthrough_too() {
    scenario("lazyfilesnp", false);
}
