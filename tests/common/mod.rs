//! Shared helpers for the integration tests: our daemon and a private
//! containerd as child processes that are stopped, unmounted and removed on
//! Drop, also when a test fails.
#![allow(dead_code)]

pub mod http;
pub mod image;
pub mod nix;
pub mod pod;
pub mod reader;
pub mod redis;
pub mod registry;
pub mod rootless;

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix_snapshotter::api::snapshots::snapshots_client::SnapshotsClient;
use tonic::transport::Channel;

pub const DAEMON: &str = env!("CARGO_BIN_EXE_nix-snapshotter");

/// A name unique to this test process and call, for containerd namespaces,
/// container ids and the like (runc state is shared host-wide).
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// A per-test directory under /tmp (short, for socket paths) that unmounts
/// anything left below it and removes itself on Drop.
pub struct TempRoot {
    pub path: PathBuf,
}

impl TempRoot {
    pub fn new(name: &str) -> TempRoot {
        let path = PathBuf::from(format!("/tmp/nst-{}", unique(name)));
        std::fs::create_dir_all(&path).unwrap();
        TempRoot { path }
    }

    /// A root for state shared by a whole test binary (built once, kept in a
    /// static): removed when a later run finds its process gone.
    pub fn leaked(name: &str) -> TempRoot {
        if let Ok(entries) = std::fs::read_dir("/tmp") {
            for e in entries.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                let Some(rest) = n.strip_prefix(&format!("nst-{name}-")) else {
                    continue;
                };
                let pid = rest.split('-').next().unwrap_or("");
                if !Path::new("/proc").join(pid).exists() {
                    unmount_below(&e.path());
                    let _ = nix_snapshotter::store::gc::remove_tree(&e.path());
                }
            }
        }
        TempRoot::new(name)
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for TempRoot {
    fn drop(&mut self) {
        kill_processes_mentioning(&self.path);
        unmount_below(&self.path);
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// SIGKILLs every process whose command line mentions `dir` (containerd
/// shims, stray daemons).
pub fn kill_processes_mentioning(dir: &Path) {
    let needle = dir.to_string_lossy().into_owned();
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let mut cmdline = String::new();
        if let Ok(mut f) = std::fs::File::open(format!("/proc/{pid}/cmdline")) {
            let mut raw = Vec::new();
            let _ = f.read_to_end(&mut raw);
            cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        }
        if cmdline.contains(&needle) {
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_raw(pid as i32).unwrap(),
                rustix::process::Signal::KILL,
            );
        }
    }
}

/// Lazily unmounts every mount point at or below `dir`, deepest first.
pub fn unmount_below(dir: &Path) {
    let prefix = dir.to_string_lossy().into_owned();
    for _ in 0..3 {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut points: Vec<String> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(|p| p.replace("\\040", " "))
            .filter(|p| p == &prefix || p.starts_with(&format!("{prefix}/")))
            .collect();
        if points.is_empty() {
            return;
        }
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            let _ = rustix::mount::unmount(p.as_str(), rustix::mount::UnmountFlags::DETACH);
        }
    }
}

/// Polls `done` every 50 ms until it holds; panics with `why()` once
/// `timeout` passed first.
pub fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool, why: impl Fn() -> String) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{}", why());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until a Unix socket accepts connections.
pub fn wait_for_socket(path: &Path, timeout: Duration, child: &mut Child, log: &Path) {
    let start = Instant::now();
    loop {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "process exited ({status}) before listening on {}:\n{}",
                path.display(),
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            start.elapsed() < timeout,
            "nothing listening on {} after {timeout:?}:\n{}",
            path.display(),
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sends SIGTERM, waits up to `grace`, then SIGKILLs. Returns the status.
pub fn stop_child(child: &mut Child, grace: Duration) -> Option<std::process::ExitStatus> {
    if let Ok(Some(s)) = child.try_wait() {
        return Some(s);
    }
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    let start = Instant::now();
    while start.elapsed() < grace {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// Debian's containerd 1.6 Go sources, for programs that use its client.
pub const GOCODE: &str = "/usr/share/gocode";

/// Builds the Go program `tests/<dir>/<file>` (package main; a `_test.go`
/// file is built as a test binary) with Debian's Go in GOPATH mode against
/// Debian's containerd sources; returns the binary, placed under `out`.
pub fn go_build(dir: &str, file: &str, out: &Path) -> PathBuf {
    assert!(
        have("go")
            && Path::new(GOCODE)
                .join("src/github.com/containerd/containerd/client.go")
                .is_file(),
        "needs golang-go and golang-github-containerd-containerd-dev (installed by .ci/run)"
    );
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let gopath = out.join("gopath");
    let pkg = gopath.join("src").join(dir);
    std::fs::create_dir_all(&pkg).unwrap();
    std::fs::copy(manifest.join("tests").join(dir).join(file), pkg.join(file)).unwrap();
    let bin = out.join(dir);
    let build = Command::new("go")
        .args(if file.ends_with("_test.go") {
            &["test", "-c", "-o"][..]
        } else {
            &["build", "-o"][..]
        })
        .arg(&bin)
        .arg(".")
        .current_dir(&pkg)
        .env("GO111MODULE", "off")
        .env("GOPATH", format!("{}:{GOCODE}", gopath.display()))
        // Kept between runs: containerd's client is large to compile.
        .env("GOCACHE", manifest.join("target/go-cache"))
        .output()
        .unwrap();
    assert!(
        build.status.success(),
        "go build of tests/{dir}/{file} failed:\n{}",
        String::from_utf8_lossy(&build.stderr)
    );
    bin
}

/// Our daemon as a child process.
pub struct Daemon {
    pub child: Child,
    pub root: PathBuf,
    pub address: PathBuf,
    pub log: PathBuf,
}

impl Daemon {
    pub fn start(root: &Path, address: &Path) -> Daemon {
        Self::start_with(root, address, &[], &[])
    }

    pub fn start_with(root: &Path, address: &Path, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        Self::start_logging(root, address, args, env, "debug")
    }

    /// [`start_with`](Self::start_with) at log `level` (benchmarks: `warn`).
    pub fn start_logging(root: &Path, address: &Path, args: &[&str], env: &[(&str, &str)], level: &str) -> Daemon {
        let log = root.with_extension("log");
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        // Unless told otherwise: no substituters, so no test ever reaches
        // beyond this machine.
        let default_cfg = root.with_extension("toml");
        if !args.contains(&"--config") {
            std::fs::write(&default_cfg, "substituters = []\nhost_store = \"\"\n").unwrap();
        }
        let mut child = Command::new(DAEMON)
            .args(["--log-level", level])
            .args(if args.contains(&"--config") {
                vec![]
            } else {
                vec!["--config".into(), default_cfg]
            })
            .arg("--root")
            .arg(root)
            .arg("--address")
            .arg(address)
            .args(args)
            .envs(env.iter().copied())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .spawn()
            .unwrap();
        wait_for_socket(address, Duration::from_secs(20), &mut child, &log);
        Daemon {
            child,
            root: root.to_path_buf(),
            address: address.to_path_buf(),
            log,
        }
    }

    /// SIGTERM; panics unless the daemon exits cleanly within 5 s.
    pub fn stop(&mut self) {
        let status = stop_child(&mut self.child, Duration::from_secs(5));
        match status {
            Some(s) if s.success() => {}
            other => panic!("daemon did not stop cleanly: {other:?}\n{}", self.log_text()),
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log's warnings and errors, and anything about passthrough: what
    /// to print when a container saw the wrong thing.
    pub fn log_problems(&self) -> String {
        self.log_text()
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("passthrough"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub async fn client(&self) -> SnapshotsClient<Channel> {
        SnapshotsClient::new(nix_snapshotter::uds::connect(&self.address).await.unwrap())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(5));
    }
}

pub fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A private containerd (Debian's package) with our daemon as proxy plugin `nix`.
pub struct Containerd {
    pub child: Child,
    pub dir: PathBuf,
    pub address: PathBuf,
    pub namespace: String,
    pub log: PathBuf,
    /// Where its containerd, shims and ctr are; None: the installed ones.
    pub bin: Option<PathBuf>,
}

/// The containerd of Debian release `suite` (`trixie`: 1.7, `sid`: 2.x),
/// unpacked by `scripts/fetch-containerd`.
pub fn containerd_of(suite: &str) -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target/containerd")
        .join(suite)
        .join("usr/bin");
    assert!(
        bin.join("containerd").is_file(),
        "containerd of Debian {suite} missing: run scripts/fetch-containerd {suite} (scripts/test does)"
    );
    bin
}

/// The pod sandbox image of a containerd started with its CRI plugin (a
/// busybox that sleeps; see [`Containerd::import_pause_image`]).
pub const PAUSE_IMAGE: &str = "docker.io/library/nst-pause:latest";

impl Containerd {
    /// Imports [`PAUSE_IMAGE`] into the CRI's namespace, for snapshotter
    /// `nix` (the CRI's), so pods start offline.
    pub fn import_pause_image(&self) {
        self.import_pause_image_for("nix")
    }

    /// [`import_pause_image`](Self::import_pause_image) for `snapshotter`.
    pub fn import_pause_image_for(&self, snapshotter: &str) {
        let archive = self.dir.join("pause.tar");
        image::write_oci_archive(
            &archive,
            PAUSE_IMAGE,
            &image::busybox_layers(),
            &["/bin/sleep", "100000"],
        );
        // (In the CRI's namespace: its containers' runc state is under this
        // containerd's own runc root.)
        let out = Command::new(self.bin.as_ref().map_or(PathBuf::from("ctr"), |b| b.join("ctr")))
            .arg("--address")
            .arg(&self.address)
            .args([
                "--namespace",
                "k8s.io",
                "images",
                "import",
                "--snapshotter",
                snapshotter,
            ])
            .arg(&archive)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }

    /// Lets the CRI pull from the plain-HTTP registry `host` (as image
    /// references name it), reached at `via` (itself, or a proxy).
    pub fn plain_http_registry(&self, host: &str, via: &str) {
        let dir = self.dir.join("certs.d").join(host);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("hosts.toml"),
            format!("server = \"http://{via}\"\n[host.\"http://{via}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"),
        )
        .unwrap();
    }

    pub fn start(dir: &Path, nix_socket: &Path) -> Containerd {
        Self::start_from(dir, nix_socket, None)
    }

    /// Like [`start`](Self::start), with containerd, its shims and ctr from `bin`.
    pub fn start_from(dir: &Path, nix_socket: &Path, bin: Option<&Path>) -> Containerd {
        Self::start_opts(dir, nix_socket, bin, None)
    }

    /// Like [`start`](Self::start), with the CRI plugin on (snapshotter
    /// `nix`, snapshot annotations passed, no lowering of OOM scores).
    pub fn start_with_cri(dir: &Path, nix_socket: &Path) -> Containerd {
        Self::start_opts(dir, nix_socket, None, Some("nix"))
    }

    /// Like [`start_with_cri`](Self::start_with_cri), the CRI's images on
    /// `snapshotter` (`overlayfs`: what a Kubernetes node runs by default).
    pub fn start_with_cri_on(dir: &Path, nix_socket: &Path, snapshotter: &str) -> Containerd {
        Self::start_opts(dir, nix_socket, None, Some(snapshotter))
    }

    /// [`start_with_cri`](Self::start_with_cri) with containerd from `bin`.
    pub fn start_with_cri_from(dir: &Path, nix_socket: &Path, bin: Option<&Path>) -> Containerd {
        Self::start_opts(dir, nix_socket, bin, Some("nix"))
    }

    /// `cri`: the CRI plugin on, its images on that snapshotter.
    fn start_opts(dir: &Path, nix_socket: &Path, bin: Option<&Path>, cri: Option<&str>) -> Containerd {
        assert!(
            have("containerd") && have("ctr") && have("runc"),
            "containerd, ctr and runc must be installed (see .ci/run)"
        );
        std::fs::create_dir_all(dir).unwrap();
        let address = dir.join("containerd.sock");
        let config = dir.join("containerd.toml");
        std::fs::write(
            &config,
            format!(
                r#"version = 2
root = "{root}"
state = "{state}"
{plugins}

[grpc]
  address = "{address}"

[proxy_plugins.nix]
  type = "snapshot"
  address = "{nix}"

# containerd 2.x imports and pulls through its Transfer service, which
# unpacks only to the snapshotters listed here (1.6 has no such plugin).
[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = "linux/amd64"
  snapshotter = "nix"
[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = "linux/amd64"
  snapshotter = "overlayfs"
"#,
                root = dir.join("root").display(),
                state = dir.join("state").display(),
                address = address.display(),
                nix = nix_socket.display(),
                plugins = if let Some(snapshotter) = cri {
                    format!(
                        r#"[plugins."io.containerd.grpc.v1.cri"]
  restrict_oom_score_adj = true
  sandbox_image = "{PAUSE_IMAGE}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "{snapshotter}"
    disable_snapshot_annotations = false
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
    SystemdCgroup = false
    Root = "{runc}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni}/bin"
    conf_dir = "{cni}/conf"
  # Registries on 127.0.0.1 (plain HTTP) are set up per test in here.
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{certs}"
"#,
                        certs = dir.join("certs.d").display(),
                        cni = dir.join("cni").display(),
                        runc = dir.join("runc").display()
                    )
                } else {
                    r#"disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime"]"#
                        .to_string()
                },
            ),
        )
        .unwrap();
        let log = dir.join("containerd.log");
        let logf = std::fs::File::create(&log).unwrap();
        let path = match bin {
            // Its own shims first: containerd finds them on PATH.
            Some(b) => format!("{}:{}", b.display(), std::env::var("PATH").unwrap_or_default()),
            None => std::env::var("PATH").unwrap_or_default(),
        };
        let mut child = Command::new(bin.map_or(PathBuf::from("containerd"), |b| b.join("containerd")))
            .env("PATH", path)
            .arg("--config")
            .arg(&config)
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .spawn()
            .unwrap();
        wait_for_socket(&address, Duration::from_secs(30), &mut child, &log);
        Containerd {
            child,
            dir: dir.to_path_buf(),
            address,
            namespace: unique("ns"),
            log,
            bin: bin.map(Path::to_path_buf),
        }
    }

    /// Our `nix-snapshotter image load` of `archive` into namespace `ns`
    /// (it unpacks through containerd's API itself, instead of `ctr`).
    pub fn image_load(&self, ns: &str, archive: &Path) -> Output {
        Command::new(DAEMON)
            .args(["image", "load", "--address"])
            .arg(&self.address)
            .args(["--namespace", ns])
            .arg(archive)
            .output()
            .unwrap()
    }

    /// Prepares active snapshot `key` on the committed `nix` snapshot (the
    /// Nix layer of the one image imported) and returns the FUSE view it
    /// brings up under the daemon's `root`.
    pub fn view_of_nix_layer(&self, key: &str, root: &Path) -> PathBuf {
        let snaps = self.ctr_ok(&["snapshots", "--snapshotter", "nix", "ls"]);
        let layer = snaps
            .lines()
            .find(|l| l.contains("Committed"))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_else(|| panic!("no committed snapshot:\n{snaps}"))
            .to_string();
        self.ctr_ok(&["snapshots", "--snapshotter", "nix", "prepare", key, &layer]);
        std::fs::read_dir(root.join("fuse"))
            .unwrap()
            .next()
            .expect("no view")
            .unwrap()
            .path()
    }

    /// Runs `ctr` against this containerd in this test's namespace.
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_in(&self.namespace, args)
    }

    /// Runs `ctr` in namespace `ns` (which must start with this test's
    /// namespace, so that Drop cleans its runc state).
    pub fn ctr_in(&self, ns: &str, args: &[&str]) -> Output {
        assert!(ns.starts_with(&self.namespace));
        Command::new(self.bin.as_ref().map_or(PathBuf::from("ctr"), |b| b.join("ctr")))
            .arg("--address")
            .arg(&self.address)
            .args(["--namespace", ns])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// `ctr run` (the last argument is the container id) in namespace `ns`,
    /// run again under a fresh id when it succeeded but printed nothing:
    /// ctr's attach sometimes loses a short-lived container's whole output
    /// under load (the container ran; its output never reached ctr).
    pub fn ctr_run_in(&self, ns: &str, args: &[&str]) -> Output {
        let (id, rest) = args.split_last().expect("a container id");
        let mut out = self.ctr_in(ns, args);
        for attempt in 1..3 {
            if !(out.status.success() && out.stdout.is_empty()) {
                break;
            }
            let again = format!("{id}-again{attempt}");
            let mut retry: Vec<&str> = rest.to_vec();
            retry.push(&again);
            out = self.ctr_in(ns, &retry);
        }
        out
    }

    /// Like [`ctr`](Self::ctr) but panics with both outputs unless it succeeds.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {args:?} failed ({:?}):\nstdout: {}\nstderr: {}\ncontainerd log tail:\n{}",
            out.status.code().or(out.status.signal()),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            tail(&std::fs::read_to_string(&self.log).unwrap_or_default(), 30)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(10));
        kill_processes_mentioning(&self.dir);
        unmount_below(&self.dir);
        // runc keeps per-namespace state host-wide; ours are unique to this test.
        if let Ok(entries) = std::fs::read_dir("/run/containerd/runc") {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(&self.namespace) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Writes a daemon config at `dir/nix-snapshotter.toml` that takes store
/// paths from the cache at `url`, signed by `key`, with no host store, plus
/// `extra` TOML; returns its path.
pub fn cache_config(dir: &Path, url: &str, key: &str, extra: &str) -> PathBuf {
    let cfg = dir.join("nix-snapshotter.toml");
    std::fs::write(
        &cfg,
        format!("substituters = [\"{url}\"]\ntrusted_public_keys = [\"{key}\"]\nhost_store = \"\"\n{extra}"),
    )
    .unwrap();
    cfg
}

/// In `tmp`: our daemon (root `<tmp>/root`, socket `<tmp>/nix.sock`) taking
/// store paths from the cache at `url` signed by `key` (plus `extra` TOML),
/// and a private containerd using it as `nix`; and the daemon's config.
pub fn cache_stack(tmp: &TempRoot, url: &str, key: &str, extra: &str) -> (PathBuf, Daemon, Containerd) {
    let cfg = cache_config(&tmp.path, url, key, extra);
    let sock = tmp.join("nix.sock");
    let daemon = Daemon::start_with(&tmp.join("root"), &sock, &["--config", cfg.to_str().unwrap()], &[]);
    let ctrd = Containerd::start(&tmp.join("ctrd"), &sock);
    (cfg, daemon, ctrd)
}

/// A fresh directory `name`, our daemon on defaults (root `<dir>/root`) and
/// a private containerd using it as `nix`.
pub fn plain_stack(name: &str) -> (TempRoot, Daemon, Containerd) {
    let tmp = TempRoot::new(name);
    let sock = tmp.join("nix.sock");
    let daemon = Daemon::start(&tmp.join("root"), &sock);
    let ctrd = Containerd::start(&tmp.join("ctrd"), &sock);
    (tmp, daemon, ctrd)
}

/// The environment variable `name` parsed, or `default` when unset (a test
/// size a script may raise).
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}
