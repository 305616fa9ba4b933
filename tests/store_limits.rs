//! The store at its limits, as containers meet them: a store path larger
//! than a link can deliver within `fuse.fetch_timeout`, and more distinct
//! store files than the default open-file limit.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::http::{Fault, Server};
use common::image::{nix_layer, write_oci_archive};
use common::nix::{derivation, NixStore};
use common::{unique, Containerd, Daemon, TempRoot};
use nix_snapshotter::nixfmt::StorePath;

const FILES: usize = 5000;
const BIG_MIB: usize = 200;

struct Stack {
    tmp: TempRoot,
    server: Server,
    daemon: Daemon,
    ctrd: Containerd,
    nix: NixStore,
    outs: Vec<String>,
}

impl Stack {
    fn find(&self, suffix: &str) -> String {
        self.outs.iter().find(|o| o.ends_with(suffix)).unwrap().clone()
    }

    /// Imports an image of `paths` (all directories) running `script` with
    /// the store's busybox.
    fn image(&self, name: &str, paths: &[&str], script: &str) -> String {
        let closure: Vec<(String, bool)> = paths
            .iter()
            .map(|p| (StorePath::parse(p).unwrap().base_name().to_string(), true))
            .collect();
        let bb = format!("{}/bin/busybox", self.find("-tool"));
        let archive = self.tmp.join(&format!("{name}.tar"));
        let reference = format!("docker.io/library/{name}:latest");
        write_oci_archive(
            &archive,
            &reference,
            &[nix_layer(&closure, &[])],
            &[&bb, "sh", "-c", script],
        );
        self.ctrd
            .ctr_ok(&["images", "import", "--snapshotter", "nix", archive.to_str().unwrap()]);
        reference
    }

    fn run(&self, reference: &str) -> (bool, String, String) {
        let out = self
            .ctrd
            .ctr(&["run", "--rm", "--snapshotter", "nix", reference, &unique("c")]);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// Builds `extra` derivations beside busybox, publishes them uncompressed,
/// and starts our daemon (with `config` added) under a private containerd.
fn stack(name: &str, extra: &[String], config: &str) -> Stack {
    let tmp = TempRoot::new(name);
    let nix = NixStore::new(&tmp.join("nix"), &format!("{name}-1"));
    let mut attrs = vec![format!(
        "tool = {};",
        derivation("tool", "b mkdir -p $out/bin; b cp /bin/busybox $out/bin/busybox", &[])
    )];
    attrs.extend(extra.iter().cloned());
    let outs = nix.build(&format!("rec {{ {} }}", attrs.join("\n")));
    let cache = tmp.join("cache");
    nix.publish(&cache, "none", &outs);
    let server = Server::start(cache);
    let cfg = common::cache_config(&tmp.path, &server.url(), &nix.public_key, config);
    let sock = tmp.join("nix.sock");
    let daemon = Daemon::start_with(&tmp.join("root"), &sock, &["--config", cfg.to_str().unwrap()], &[]);
    let ctrd = Containerd::start(&tmp.join("ctrd"), &sock);
    Stack {
        tmp,
        server,
        daemon,
        ctrd,
        nix,
        outs,
    }
}

fn tmp_entries(root: PathBuf) -> Vec<String> {
    std::fs::read_dir(root)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(".tmp-"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_store_path_slower_than_the_fetch_timeout_still_arrives_once() {
    let big = format!(
        "big = {};",
        derivation(
            "big",
            &format!("b mkdir $out; b dd if=/dev/urandom of=$out/blob bs=1048576 count={BIG_MIB}"),
            &[]
        )
    );
    let s = stack(
        "slowlink",
        &[big],
        "[fuse]\nfetch_timeout = 1.0\n[fetch]\nstall_timeout = 30.0\n",
    );
    let big = s.find("-big");
    // A link of 50 MB/s: the path takes about four seconds.
    s.server.fault(".nar", Fault::Throttle(50 << 20), None);
    let reference = s.image(
        "slowlink",
        &[&s.find("-tool"), &big],
        &format!("cat {big}/blob | wc -c"),
    );
    // The first container gives up waiting (EIO), the download goes on.
    let (_, out, _) = s.run(&reference);
    assert_ne!(
        out.trim(),
        (BIG_MIB << 20).to_string(),
        "the link was not slow enough to test anything"
    );
    // Later containers find it arriving or arrived.
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < Duration::from_secs(120) {
        let (ok, out, err) = s.run(&reference);
        if ok && out.trim() == (BIG_MIB << 20).to_string() {
            break;
        }
        last = format!("{out}{err}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let (ok, out, err) = s.run(&reference);
    assert!(
        ok && out.trim() == (BIG_MIB << 20).to_string(),
        "never arrived: {out}{err}\nearlier: {last}\n--- daemon problems:\n{}",
        s.daemon.log_problems()
    );
    // Downloaded once, from the start, never restarted.
    let info = StorePath::parse(&big).unwrap();
    let narinfo = std::fs::read_to_string(s.tmp.join(&format!("cache/{}.narinfo", info.hash_part()))).unwrap();
    let url = narinfo
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap()
        .to_string();
    let gets: Vec<String> = s.server.log().into_iter().filter(|l| l.contains(&url)).collect();
    assert_eq!(gets.len(), 1, "{gets:?}");
    assert!(tmp_entries(s.tmp.join("root/store")).is_empty());
    let _ = &s.nix;
}

#[test]
fn five_thousand_store_files_open_without_running_out_of_descriptors() {
    let many = format!(
        "many = {};",
        derivation(
            "many",
            &format!("b mkdir $out; i=0; while [ $i -lt {FILES} ]; do b printf 'x' > $out/f$i; i=$((i+1)); done"),
            &[]
        )
    );
    // The daemon starts with systemd's default soft limit (1024), as on a
    // node: it must raise it itself.
    let mut lim = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    lim.current = Some(1024);
    rustix::process::setrlimit(rustix::process::Resource::Nofile, lim).unwrap();
    let s = stack("manyfiles", &[many], "");
    let many = s.find("-many");
    // busybox cat opens every file, one after another; the daemon keeps
    // the backing files open for the next container's opens.
    let reference = s.image(
        "manyfiles",
        &[&s.find("-tool"), &many],
        &format!("cat {many}/* | wc -c"),
    );
    for _ in 0..2 {
        let (ok, out, err) = s.run(&reference);
        assert!(
            ok && out.trim() == FILES.to_string(),
            "{out}{err}\n--- daemon problems:\n{}",
            s.daemon.log_problems()
        );
    }
    let log = s.daemon.log_text();
    assert!(!log.contains("Too many open files"), "{}", s.daemon.log_problems());
}
