//! A user measures their own image: `nix-snapshotter bench IMAGE` against
//! the running daemon and containerd prints cold, warm and eager times and
//! exactly which store paths each cold start fetched (the cache's access
//! log agrees), shapes the cache traffic with `--link`, and writes JSON and
//! a chart. Bad input, tried as a new user would, gets a clear error and
//! leaves no container, snapshot or routing behind.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use common::http::Server;
use common::nix::{busybox_tool, derivation, NixStore};
use common::{Containerd, Daemon, TempRoot};
use nix_snapshotter::nixfmt::{NarInfo, StorePath};

const DAEMON: &str = env!("CARGO_BIN_EXE_nix-snapshotter");

struct Fixture {
    _dir: TempRoot,
    nix: NixStore,
    cache: PathBuf,
    tool: String,
    data: String,
    closure: Vec<String>,
    /// A `store-paths` file listing the closure (for `image build`).
    closure_file: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = TempRoot::leaked("benchfix");
        let nix = NixStore::new(&dir.join("nix"), "bench-1");
        let expr = format!(
            "rec {{ tool = {}; data = {}; bulk = {}; top = {}; }}",
            busybox_tool(),
            derivation(
                "data",
                "b mkdir $out; b printf 'hello from the store\\n' > $out/greeting",
                &[]
            ),
            derivation(
                "bulk",
                "b mkdir $out; b dd if=/dev/urandom of=$out/blob bs=64k count=16 2>/dev/null",
                &[]
            ),
            derivation(
                "top",
                "b mkdir $out; for r in $deps; do b echo $r >> $out/refs; done",
                &["tool", "data", "bulk"]
            ),
        );
        let built = nix.build_cache(&expr, "top", &dir.join("cache"));
        let closure = nix.closure(&built.top);
        let closure_file = dir.join("store-paths");
        std::fs::write(&closure_file, closure.join("\n")).unwrap();
        Fixture {
            cache: dir.join("cache"),
            _dir: dir,
            tool: built.find("-tool"),
            data: built.find("-data"),
            closure,
            closure_file,
            nix,
        }
    })
}

/// A node: the cache on 127.0.0.1 (with its access log), our daemon, a
/// private containerd, and the image loaded with `image load`.
struct Node {
    tmp: TempRoot,
    server: Server,
    daemon: Daemon,
    ctrd: Containerd,
    image: String,
}

impl Node {
    fn start(name: &str) -> Node {
        let f = fixture();
        let tmp = TempRoot::new(name);
        let server = Server::start(f.cache.clone());
        let (_, daemon, ctrd) = common::cache_stack(&tmp, &server.url(), &f.nix.public_key, "");
        let image = format!("docker.io/library/{name}:latest");
        let config = tmp.join("config.json");
        let cmd = serde_json::json!({ "Cmd": [format!("{}/bin/busybox", f.tool), "sh", "-c",
            format!("cat {}/greeting; echo done", f.data)] });
        std::fs::write(&config, serde_json::to_vec(&cmd).unwrap()).unwrap();
        let archive = tmp.join("image.tar");
        let out = Command::new(DAEMON)
            .args(["image", "build", "--config"])
            .arg(&config)
            .arg("--closure")
            .arg(&f.closure_file)
            .arg("--store-root")
            .arg(&f.nix.root)
            .args(["--ref", &image])
            .arg(&archive)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let out = ctrd.image_load(&ctrd.namespace, &archive);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        Node {
            tmp,
            server,
            daemon,
            ctrd,
            image,
        }
    }

    /// `nix-snapshotter bench` against this node, with `args`.
    fn bench_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(DAEMON);
        cmd.arg("bench")
            .arg("--address")
            .arg(&self.ctrd.address)
            .args(["--namespace", &self.ctrd.namespace])
            .arg("--daemon-address")
            .arg(&self.daemon.address)
            .args(args)
            .env_remove("CONTAINERD_ADDRESS");
        cmd
    }

    fn bench(&self, args: &[&str]) -> Output {
        self.bench_command(args).output().unwrap()
    }

    fn bench_ok(&self, args: &[&str]) -> String {
        let out = self.bench(args);
        assert!(
            out.status.success(),
            "bench {args:?}:\n{}{}\n--- daemon:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.daemon.log_problems()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn bench_err(&self, args: &[&str]) -> String {
        let out = self.bench(args);
        assert!(!out.status.success(), "bench {args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        self.assert_nothing_left(&err);
        err
    }

    /// Store paths whose NARs the cache served since the log was cleared.
    fn nars_served(&self) -> BTreeSet<String> {
        let f = fixture();
        let by_url: Vec<(String, String)> = f
            .closure
            .iter()
            .map(|p| {
                let sp = StorePath::parse(p).unwrap();
                let info = NarInfo::parse(
                    &std::fs::read_to_string(f.cache.join(format!("{}.narinfo", sp.hash_part()))).unwrap(),
                )
                .unwrap();
                (info.url, p.clone())
            })
            .collect();
        self.server
            .log()
            .iter()
            .filter_map(|l| by_url.iter().find(|(u, _)| l.contains(u.as_str())))
            .map(|(_, p)| p.clone())
            .collect()
    }

    /// No container, task or active snapshot of a bench is left, and the
    /// daemon takes a new routing (none is held).
    fn assert_nothing_left(&self, context: &str) {
        let ctr = |args: &[&str]| String::from_utf8_lossy(&self.ctrd.ctr(args).stdout).into_owned();
        assert_eq!(ctr(&["containers", "ls", "--quiet"]).trim(), "", "{context}");
        assert_eq!(ctr(&["tasks", "ls", "--quiet"]).trim(), "", "{context}");
        let snaps = ctr(&["snapshots", "--snapshotter", "nix", "ls"]);
        assert!(
            snaps.lines().skip(1).all(|l| l.contains("Committed")),
            "{context}\n{snaps}"
        );
    }
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn paths_of(run: &serde_json::Value) -> BTreeSet<String> {
    run["fetched_paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn bench_times_cold_warm_and_eager_starts_and_names_what_each_fetched() {
    let f = fixture();
    let node = Node::start("bench-story");
    let (j, chart) = (node.tmp.join("bench.json"), node.tmp.join("bench.svg"));
    node.server.log_clear();
    let out = node.bench_ok(&[
        "--runs",
        "1",
        "--json",
        j.to_str().unwrap(),
        "--chart",
        chart.to_str().unwrap(),
        &node.image,
    ]);
    // The table: both modes, what was fetched, by name.
    for want in ["cold", "warm", "cold / warm", &f.tool, &f.data] {
        assert!(out.contains(want), "no {want:?} in:\n{out}");
    }
    let report = json(&j);
    let runs = report["runs"].as_array().unwrap();
    let cold = runs.iter().find(|r| r["mode"] == "cold").unwrap();
    let warm = runs.iter().find(|r| r["mode"] == "warm").unwrap();
    // Exactly what the command touched, and what the cache's log says it served.
    let touched: BTreeSet<String> = [f.tool.clone(), f.data.clone()].into();
    assert_eq!(paths_of(cold), touched);
    assert_eq!(node.nars_served(), touched, "{:?}", node.server.log());
    assert!(paths_of(warm).is_empty(), "a warm start fetches nothing: {warm}");
    assert!(cold["seconds"].as_f64().unwrap() > 0.0);
    assert_eq!(report["closure_paths"].as_u64().unwrap() as usize, f.closure.len());
    let svg = std::fs::read_to_string(&chart).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("cold") && svg.trim_end().ends_with("</svg>"));
    node.assert_nothing_left("after a bench");

    // Eager, the Go way: the whole closure each time, and PNG.
    let png = node.tmp.join("bench.png");
    node.server.log_clear();
    node.bench_ok(&[
        "--runs",
        "1",
        "--eager",
        "--json",
        j.to_str().unwrap(),
        "--chart",
        png.to_str().unwrap(),
        &node.image,
    ]);
    let report = json(&j);
    let eager = report["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["mode"] == "eager")
        .unwrap()
        .clone();
    assert_eq!(paths_of(&eager), f.closure.iter().cloned().collect::<BTreeSet<_>>());
    assert!(eager["prefetch_seconds"].as_f64().unwrap() > 0.0);
    assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));
    node.assert_nothing_left("after an eager bench");
}

#[test]
fn a_shaped_link_costs_its_round_trips_and_goes_away_with_the_bench() {
    let node = Node::start("bench-link");
    let (plain, shaped) = (node.tmp.join("plain.json"), node.tmp.join("shaped.json"));
    node.bench_ok(&["--runs", "1", "--json", plain.to_str().unwrap(), &node.image]);
    node.server.log_clear();
    node.bench_ok(&[
        "--runs",
        "1",
        "--link",
        "50ms,100mbit",
        "--json",
        shaped.to_str().unwrap(),
        &node.image,
    ]);
    let cold = |p: &Path| json(p)["summary"][0]["median"].as_f64().unwrap();
    let report = json(&shaped);
    assert_eq!(report["link"], "50 ms / 100 Mbit/s");
    // Lower bounds the link cannot beat (no wall-clock comparison between
    // runs, which a loaded machine can upset): every download through it is
    // a request and an answer, a 50 ms round trip at least; the cold start
    // waits for a narinfo and a NAR one after another, on a new connection.
    let downloads = report["runs"][0]["downloads"].as_array().unwrap();
    assert!(!downloads.is_empty());
    for d in downloads {
        assert!(d["seconds"].as_f64().unwrap() >= 0.05, "{d}");
    }
    assert!(
        cold(&shaped) >= 0.15,
        "shaped {} s (unshaped {} s)",
        cold(&shaped),
        cold(&plain)
    );
    // The traffic really crossed the cache: the same paths, through the proxy.
    assert_eq!(
        paths_of(&report["runs"][0]),
        [fixture().tool.clone(), fixture().data.clone()].into()
    );
    assert!(!node.nars_served().is_empty());
    // The routing ended with the bench: the daemon is back on its own
    // address, and takes a new one.
    assert!(node.daemon.log_text().contains("caches back on their own addresses"));
    node.bench_ok(&["--runs", "1", "--link", "1ms,1gbit", &node.image]);
    node.assert_nothing_left("after shaped benches");
}

#[test]
fn bad_input_gets_a_clear_error_and_leaves_nothing_behind() {
    let f = fixture();
    let node = Node::start("bench-bad");
    let bb = format!("{}/bin/busybox", f.tool);

    let e = node.bench_err(&["docker.io/library/nothing-here:latest"]);
    assert!(
        e.contains("nothing-here") && e.contains("is not in containerd") && e.contains(&node.ctrd.namespace),
        "{e}"
    );

    let e = node.bench_err(&[
        "--runs",
        "1",
        &node.image,
        "--",
        &bb,
        "sh",
        "-c",
        "echo partial; exit 3",
    ]);
    // Ready at its first line, then it failed: the failure counts.
    assert!(e.contains("exit status 3") && e.contains("partial"), "{e}");

    let e = node.bench_err(&[
        "--runs",
        "1",
        "--timeout",
        "3",
        "--ready-line",
        "^listening",
        &node.image,
        "--",
        &bb,
        "sh",
        "-c",
        "echo starting; sleep 60",
    ]);
    assert!(
        e.contains("not ready after 3 s") && e.contains("^listening") && e.contains("starting"),
        "{e}"
    );

    let e = node.bench_err(&["--ready-line", "(unclosed", &node.image]);
    assert!(e.contains("--ready-line") && e.contains("(unclosed"), "{e}");
    let e = node.bench_err(&["--link", "fast", &node.image]);
    assert!(e.contains("--link") && e.contains("RTT,RATE"), "{e}");
    let e = node.bench_err(&["--chart", "out.gif", &node.image]);
    assert!(e.contains("out.gif") && e.contains(".svg or .png"), "{e}");

    let nowhere = node.tmp.join("nowhere.sock");
    let out = Command::new(DAEMON)
        .arg("bench")
        .arg("--address")
        .arg(&node.ctrd.address)
        .arg("--daemon-address")
        .arg(&nowhere)
        .arg(&node.image)
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && e.contains("no nix-snapshotter daemon answers") && e.contains("nowhere.sock"),
        "{e}"
    );
    let out = Command::new(DAEMON)
        .arg("bench")
        .arg("--address")
        .arg(&nowhere)
        .arg("--daemon-address")
        .arg(&node.daemon.address)
        .arg(&node.image)
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && e.contains("no containerd answers") && e.contains("nowhere.sock"),
        "{e}"
    );

    // A failure with a link up: the routing goes with it.
    let e = node.bench_err(&["--runs", "1", "--link", "5ms,1gbit", &node.image, "--", &bb, "false"]);
    assert!(e.contains("exit status 1"), "{e}");
    node.bench_ok(&["--runs", "1", "--link", "1ms,1gbit", &node.image]);
    node.assert_nothing_left("after bad input");
}

#[test]
fn an_interrupted_bench_removes_its_container_and_its_routing() {
    let f = fixture();
    let node = Node::start("bench-int");
    let bb = format!("{}/bin/busybox", f.tool);
    let child = node
        .bench_command(&[
            "--runs",
            "1",
            "--link",
            "5ms,1gbit",
            "--ready-line",
            "never",
            &node.image,
            "--",
            &bb,
            "sleep",
            "60",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupted while its container runs.
    common::wait_until(
        std::time::Duration::from_secs(30),
        || {
            !String::from_utf8_lossy(&node.ctrd.ctr(&["tasks", "ls", "--quiet"]).stdout)
                .trim()
                .is_empty()
        },
        || "the bench's container never ran".into(),
    );
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
        rustix::process::Signal::INT,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("interrupted"), "{err}");
    node.assert_nothing_left(&err);
    assert!(node.daemon.log_text().contains("caches back on their own addresses"));
    node.bench_ok(&["--runs", "1", "--link", "1ms,1gbit", &node.image]);
}
