//! A live node: an operator prewarms the running daemon before a rollout
//! (`fetch --closure`), resets a path to cold (`evict`), asks what it holds
//! (`status`), and scrapes its metrics during a cold start, all while the
//! daemon serves containerd. Bad input gets a clear error naming the thing
//! at fault.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use common::http::Server;
use common::image::{nix_layer, write_oci_archive};
use common::nix::{busybox_tool, derivation, NixStore};
use common::{unique, Containerd, Daemon, TempRoot};
use nix_snapshotter::nixfmt::{NarInfo, StorePath};

const DAEMON: &str = env!("CARGO_BIN_EXE_nix-snapshotter");

struct Fixture {
    _dir: TempRoot,
    nix: NixStore,
    cache: PathBuf,
    tool: String,
    data: String,
    top: String,
    closure: Vec<(String, bool)>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = TempRoot::leaked("livefix");
        let nix = NixStore::new(&dir.join("nix"), "live-1");
        let expr = format!(
            "rec {{ tool = {}; data = {}; top = {}; }}",
            busybox_tool(),
            derivation("data", "b mkdir $out; b printf 'warm or cold\\n' > $out/greeting", &[]),
            derivation(
                "top",
                "b mkdir $out; for r in $deps; do b echo $r >> $out/refs; done",
                &["tool", "data"]
            ),
        );
        let built = nix.build_cache(&expr, "top", &dir.join("cache"));
        Fixture {
            cache: dir.join("cache"),
            _dir: dir,
            tool: built.find("-tool"),
            data: built.find("-data"),
            top: built.top,
            closure: built.closure,
            nix,
        }
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Node {
    tmp: TempRoot,
    server: Server,
    cfg: PathBuf,
    daemon: Daemon,
    ctrd: Containerd,
    metrics: String,
    image: String,
}

impl Node {
    fn start(name: &str) -> Node {
        let f = fixture();
        let tmp = TempRoot::new(name);
        let server = Server::start(f.cache.clone());
        let metrics = format!("127.0.0.1:{}", free_port());
        let (cfg, daemon, ctrd) = common::cache_stack(
            &tmp,
            &server.url(),
            &f.nix.public_key,
            &format!("metrics_address = \"{metrics}\"\n"),
        );
        let image = format!("docker.io/library/{name}:latest");
        let archive = tmp.join("image.tar");
        let bb = format!("{}/bin/busybox", f.tool);
        // The sleep: ctr can lose the output of a process that exits right
        // after writing it (containerd's shim reports the exit before its
        // copy is done), which under load made this test flaky.
        let script = format!("cat {}/greeting && sleep 0.2", f.data);
        write_oci_archive(
            &archive,
            &image,
            &[nix_layer(&f.closure, &[])],
            &[&bb, "sh", "-c", &script],
        );
        ctrd.ctr_ok(&["images", "import", "--snapshotter", "nix", archive.to_str().unwrap()]);
        Node {
            tmp,
            server,
            cfg,
            daemon,
            ctrd,
            metrics,
            image,
        }
    }

    /// `nix-snapshotter --address <sock> <args>` with the node's config.
    fn cli(&self, args: &[&str]) -> Output {
        let (sub, rest) = args.split_first().unwrap();
        Command::new(DAEMON)
            .arg("--address")
            .arg(self.tmp.join("nix.sock"))
            .arg("--root")
            .arg(self.tmp.join("root"))
            .arg(sub)
            .arg("--config")
            .arg(&self.cfg)
            .args(rest)
            .output()
            .unwrap()
    }

    fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "{args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    fn cli_err(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(!out.status.success(), "{args:?} should fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    fn run_container(&self) -> String {
        let out = self
            .ctrd
            .ctr(&["run", "--rm", "--snapshotter", "nix", &self.image, &unique("c")]);
        assert!(
            out.status.success(),
            "{}\n--- daemon:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.daemon.log_problems()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn nar_downloads(&self) -> usize {
        self.server.log().iter().filter(|l| l.contains("/nar/")).count()
    }

    fn scrape(&self) -> String {
        let mut conn = std::net::TcpStream::connect(&self.metrics).unwrap();
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut text = String::new();
        conn.read_to_string(&mut text).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        body.to_string()
    }
}

/// The value of one sample line `name{labels} value` in a scrape.
fn sample(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name_and_labels} in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// The compressed size of `path`'s NAR in the cache (what the access log serves).
fn nar_file_size(cache: &Path, path: &str) -> u64 {
    let p = StorePath::parse(path).unwrap();
    let info =
        NarInfo::parse(&std::fs::read_to_string(cache.join(format!("{}.narinfo", p.hash_part()))).unwrap()).unwrap();
    std::fs::metadata(cache.join(&info.url)).unwrap().len()
}

#[test]
fn prewarm_evict_and_status_on_a_running_daemon() {
    let f = fixture();
    let mut node = Node::start("live-ops");

    // Prewarm before the rollout: every path of the closure, from the cache.
    let out = node.cli_ok(&["fetch", "--closure", &f.top]);
    assert!(out.contains("the daemon fetched 3 paths"), "{out}");
    for p in [&f.tool, &f.data, &f.top] {
        assert!(out.contains(p.as_str()), "{p} not reported: {out}");
    }
    assert_eq!(node.nar_downloads(), 3);
    // The next cold start fetches nothing.
    assert!(node.run_container().contains("warm or cold"));
    assert_eq!(node.nar_downloads(), 3, "a prewarmed start downloaded again");

    let status = node.cli_ok(&["status"]);
    assert!(status.contains("store:    3 paths"), "{status}");
    assert!(status.contains("kept for the next daemon"), "{status}");
    assert!(
        status.contains(&format!("cache:    {}: ", node.server.url())) && status.contains("3 NARs"),
        "{status}"
    );
    let json: serde_json::Value = serde_json::from_str(&node.cli_ok(&["status", "--json"])).unwrap();
    assert_eq!(json["store"]["paths"], 3);
    assert_eq!(json["daemon"], true);

    // Reset one path to cold: the next start fetches exactly it again.
    // (containerd removes the container's snapshot in its background
    // garbage collection: until then its view keeps the path in use.)
    let out = evict_when_unused(&node, &f.data);
    assert!(out.contains(&format!("evicted {}", f.data)), "{out}");
    let out = node.cli_ok(&["evict", &f.data]);
    assert!(out.contains(&format!("not local {}", f.data)), "{out}");
    assert!(node.run_container().contains("warm or cold"));
    assert_eq!(node.nar_downloads(), 4);

    // Bad input, each named.
    let bogus = "/nix/store/00000000000000000000000000000000-nothing";
    let err = node.cli_err(&["fetch", bogus]);
    assert!(
        err.contains(bogus) && err.contains("not found in any substituter"),
        "{err}"
    );
    let err = node.cli_err(&["evict", "/tmp/not-a-store-path"]);
    assert!(err.contains("/tmp/not-a-store-path"), "{err}");
    let err = node.cli_err(&["fetch", "--closure", "nix/store/relative"]);
    assert!(err.contains("nix/store/relative"), "{err}");

    // A path a running container needs is not pulled from under it.
    let long = "docker.io/library/live-long:latest".to_string();
    let archive = node.tmp.join("long.tar");
    let bb = format!("{}/bin/busybox", f.tool);
    write_oci_archive(&archive, &long, &[nix_layer(&f.closure, &[])], &[&bb, "sleep", "30"]);
    node.ctrd
        .ctr_ok(&["images", "import", "--snapshotter", "nix", archive.to_str().unwrap()]);
    let id = unique("long");
    node.ctrd.ctr_ok(&["run", "-d", "--snapshotter", "nix", &long, &id]);
    let err = node.cli_err(&["evict", &f.data]);
    assert!(err.contains(&f.data) && err.contains("in use"), "{err}");
    std::thread::sleep(std::time::Duration::from_millis(100));
    let _ = node.ctrd.ctr(&["tasks", "kill", "-s", "KILL", &id]);
    let start = std::time::Instant::now();
    while !node.ctrd.ctr(&["tasks", "rm", "-f", &id]).status.success() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "the task did not go"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    node.ctrd.ctr_ok(&["containers", "rm", &id]);
    // Its snapshot goes in containerd's background collection: until then
    // its paths stay pinned (also for the commands without a daemon).
    let start = std::time::Instant::now();
    loop {
        let json: serde_json::Value = serde_json::from_str(&node.cli_ok(&["status", "--json"])).unwrap();
        if json["store"]["pinned"] == 0 {
            break;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "still pinned: {json}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }

    // With the daemon gone the commands work on the root directly.
    node.daemon.stop();
    let status = node.cli_ok(&["status"]);
    assert!(
        status.contains("none answers on") && status.contains("3 paths"),
        "{status}"
    );
    let out = node.cli_ok(&["evict", &f.tool]);
    assert!(out.contains(&format!("evicted {}", f.tool)), "{out}");
    node.daemon = Daemon::start_with(
        &node.tmp.join("root"),
        &node.tmp.join("nix.sock"),
        &["--config", node.cfg.to_str().unwrap()],
        &[],
    );
    let start = std::time::Instant::now();
    let mut status = node.cli_ok(&["status"]);
    while status.contains("not open yet") && start.elapsed() < std::time::Duration::from_secs(20) {
        std::thread::sleep(std::time::Duration::from_millis(100));
        status = node.cli_ok(&["status"]);
    }
    assert!(status.contains("store:    2 paths"), "{status}");
}

/// `evict PATH`, retried while a container that just ended still holds it.
fn evict_when_unused(node: &Node, path: &str) -> String {
    let start = std::time::Instant::now();
    loop {
        let out = node.cli(&["evict", path]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.success() {
            return format!("{}{err}", String::from_utf8_lossy(&out.stdout));
        }
        assert!(
            err.contains("in use") && start.elapsed() < std::time::Duration::from_secs(30),
            "{err}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[test]
fn metrics_during_a_cold_start_match_the_cache_log_and_pass_promtool() {
    let f = fixture();
    let node = Node::start("live-metrics");
    let before = node.scrape();
    assert_eq!(sample(&before, "nix_snapshotter_fuse_views"), 0.0);
    assert!(node.run_container().contains("warm or cold"));
    let text = node.scrape();
    let cache = format!("{{cache=\"{}\"}}", node.server.url());
    // The container touched tool and data (not top, which only the image's
    // closure names).
    let nars = node.nar_downloads();
    assert_eq!(nars, 2, "{:?}", node.server.log());
    assert_eq!(
        sample(&text, &format!("nix_snapshotter_cache_nar_fetches_total{cache}")),
        nars as f64
    );
    let bytes = nar_file_size(&f.cache, &f.tool) + nar_file_size(&f.cache, &f.data);
    assert_eq!(
        sample(&text, &format!("nix_snapshotter_cache_bytes_total{cache}")),
        bytes as f64
    );
    assert_eq!(sample(&text, "nix_snapshotter_store_paths"), 2.0);
    assert!(sample(&text, "nix_snapshotter_fetch_duration_seconds_count") >= 2.0);
    assert!(sample(&text, "nix_snapshotter_fuse_fetch_wait_seconds_count") >= 1.0);
    assert!(sample(&text, "nix_snapshotter_fuse_requests_total{op=\"lookup\"}") > 0.0);
    assert!(
        sample(
            &text,
            "nix_snapshotter_snapshot_operations_total{op=\"prepare\",result=\"ok\"}"
        ) >= 1.0
    );

    let file = node.tmp.join("metrics.txt");
    std::fs::write(&file, &text).unwrap();
    let check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .expect("promtool (Debian's prometheus package) must be installed: see scripts/install-deps");
    assert!(
        check.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    // Anything but /metrics is not found; a bad metrics address is refused by name.
    let mut conn = std::net::TcpStream::connect(&node.metrics).unwrap();
    conn.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut head = String::new();
    conn.read_to_string(&mut head).unwrap();
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    let bad = node.tmp.join("bad.toml");
    std::fs::write(&bad, "metrics_address = \"nowhere\"\n").unwrap();
    let out = Command::new(DAEMON)
        .args(["--config", bad.to_str().unwrap(), "--root"])
        .arg(node.tmp.join("root2"))
        .arg("--address")
        .arg(node.tmp.join("other.sock"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("nowhere"), "{err}");
}

/// With no daemon answering (stopped while a container runs, its session
/// kept for the next daemon), `evict` and `gc` work on the root directly,
/// and still spare what the snapshot records say live snapshots need.
#[test]
fn without_a_daemon_evict_and_gc_spare_what_running_containers_need() {
    let f = fixture();
    let mut node = Node::start("live-offline");
    let long = "docker.io/library/live-offline-long:latest";
    let archive = node.tmp.join("long.tar");
    let bb = format!("{}/bin/busybox", f.tool);
    write_oci_archive(&archive, long, &[nix_layer(&f.closure, &[])], &[&bb, "sleep", "30"]);
    node.ctrd
        .ctr_ok(&["images", "import", "--snapshotter", "nix", archive.to_str().unwrap()]);
    let id = unique("long");
    node.ctrd.ctr_ok(&["run", "-d", "--snapshotter", "nix", long, &id]);
    node.cli_ok(&["fetch", &f.data]);
    node.daemon.stop();
    let err = node.cli_err(&["evict", &f.data]);
    assert!(err.contains(&f.data) && err.contains("in use"), "{err}");
    let out = node.cli_ok(&["gc", "--max-size", "0"]);
    assert!(
        out.contains("in use kept") && !out.contains(&format!("removed {}", f.data)),
        "{out}"
    );
    let _ = node.ctrd.ctr(&["tasks", "kill", "-s", "KILL", &id]);
}
