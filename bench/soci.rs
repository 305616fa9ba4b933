//! SOCI (Debian trixie's `soci-snapshotter` 0.4.1, unpacked by
//! `scripts/fetch-deb soci-snapshotter trixie`) as a lazy-pull peer: the
//! same files as an OCI image with a SOCI index, in Debian's
//! `docker-registry` behind the same shaped link.
//!
//! What it takes here (see DESIGN.md's field facts): soci hard-codes
//! `/var/lib/soci-snapshotter-grpc` and fetches index and ztocs over https
//! only, while both it and containerd use plain http for any loopback host.
//! So every run lives in a private mount namespace (a `sleep` holds it;
//! commands join it with `nsenter`) with fresh directories bound over
//! `/var/lib` and `/run/containerd` and an `/etc/hosts` naming the registry
//! `soci-registry.test` at 127.0.0.1; the registry serves TLS from a
//! private CA trusted through `SSL_CERT_FILE`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::link;
use crate::tc;

const NAME: &str = "soci-registry.test";

pub struct Soci {
    dir: PathBuf,
    bin: PathBuf,
    registry: Child,
    /// The shaped link in front of the registry.
    pub link: link::Link,
    /// The image through the link.
    image: String,
}

/// A private mount namespace held by a `sleep`, its binds in place (also
/// the stargz peer's, see `stargz.rs`).
pub struct Ns {
    pub holder: Child,
    env: Vec<(String, String)>,
    /// Daemons started inside, waited for when it goes.
    children: std::sync::Mutex<Vec<Child>>,
}

impl Ns {
    /// Fresh `root/varlib` and `root/runctd` bound over `/var/lib` and
    /// `/run/containerd`, `hosts` over `/etc/hosts`; `ca` trusted by the
    /// programs run inside when given.
    pub fn new(root: &Path, hosts: &Path, ca: Option<&Path>) -> Ns {
        let _ = nix_snapshotter::store::gc::remove_tree(root);
        for d in ["varlib", "runctd/soci"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let holder = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sleep", "3600"])
            .spawn()
            .unwrap();
        let ns = Ns {
            holder,
            env: ca
                .map(|ca| ("SSL_CERT_FILE".to_string(), ca.display().to_string()))
                .into_iter()
                .chain([
                    ("CONTAINERD_ADDRESS".into(), "/run/containerd/containerd.sock".into()),
                    ("CONTAINERD_NAMESPACE".into(), "default".into()),
                ])
                .collect(),
            children: Default::default(),
        };
        // The holder must be in its namespace before anything joins it.
        let me = std::fs::read_link("/proc/self/ns/mnt").unwrap();
        tc::wait_until(
            Duration::from_secs(5),
            || std::fs::read_link(format!("/proc/{}/ns/mnt", ns.holder.id())).is_ok_and(|l| l != me),
            || "unshare did not make a mount namespace".into(),
        );
        for (from, to) in [
            (root.join("varlib"), PathBuf::from("/var/lib")),
            (root.join("runctd"), PathBuf::from("/run/containerd")),
            (hosts.to_path_buf(), PathBuf::from("/etc/hosts")),
        ] {
            let out = ns.cmd("mount").arg("--bind").arg(&from).arg(&to).output().unwrap();
            assert!(
                out.status.success(),
                "bind {from:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        ns
    }

    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg("-t")
            .arg(self.holder.id().to_string())
            .args(["-m", "--"])
            .arg(program)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    /// Starts a daemon inside, its output to `log`.
    pub fn spawn(&self, c: Command, log: &Path) {
        let child = spawn_logged(c, log);
        self.children.lock().unwrap().push(child);
    }

    pub fn run(&self, program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> String {
        crate::common::run(self.cmd(program).args(args))
    }

    /// [`Self::run`], its failure an error naming the command.
    pub fn try_run(&self, program: &str, args: &[&str]) -> Result<String, String> {
        crate::common::try_run(self.cmd(program).args(args))
    }

    /// Processes in this namespace, the holder aside.
    fn members(&self) -> Vec<i32> {
        let Ok(mine) = std::fs::read_link(format!("/proc/{}/ns/mnt", self.holder.id())) else {
            return Vec::new();
        };
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| *pid as u32 != self.holder.id())
            .filter(|pid| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).is_ok_and(|l| l == mine))
            .collect()
    }
}

impl Drop for Ns {
    /// Stops what runs inside (TERM, then KILL after 3 s) and lets the
    /// namespace go with its mounts (soci's FUSE, overlays, binds).
    fn drop(&mut self) {
        let signal = |pids: &[i32], s| {
            for p in pids {
                let _ = rustix::process::kill_process(rustix::process::Pid::from_raw(*p).unwrap(), s);
            }
        };
        signal(&self.members(), rustix::process::Signal::TERM);
        let start = Instant::now();
        while !self.members().is_empty() && start.elapsed() < Duration::from_secs(3) {
            std::thread::sleep(Duration::from_millis(50));
        }
        signal(&self.members(), rustix::process::Signal::KILL);
        for c in self.children.lock().unwrap().iter_mut() {
            let _ = c.wait();
        }
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

pub fn spawn_logged(mut c: Command, log: &Path) -> Child {
    c.stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

impl Soci {
    /// Unpacked package, CA, registry behind the link, the OCI image
    /// `oci_archive` pushed and its SOCI index created and pushed.
    pub fn prepare(
        dir: &Path,
        oci_archive: &Path,
        rt: &tokio::runtime::Runtime,
        rtt: Duration,
    ) -> Result<Soci, String> {
        let bin = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/soci-snapshotter/trixie/usr/bin");
        if !bin.join("soci-snapshotter-grpc").exists() {
            return Err(format!(
                "{} missing: run scripts/fetch-deb soci-snapshotter trixie",
                bin.display()
            ));
        }
        for tool in ["skopeo", "openssl", "docker-registry", "unshare", "nsenter"] {
            if !tc::have(tool) {
                return Err(format!("{tool} missing (scripts/bench installs it)"));
            }
        }
        std::fs::create_dir_all(dir).unwrap();
        // A private CA and a certificate for the registry's name.
        let tls = dir.join("tls");
        std::fs::create_dir_all(&tls).unwrap();
        let openssl = |args: &[&str]| crate::common::run(Command::new("openssl").current_dir(&tls).args(args));
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "30",
            "-subj",
            "/CN=bench CA",
        ]);
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            &format!("/CN={NAME}"),
        ]);
        std::fs::write(
            tls.join("ext.cnf"),
            format!("subjectAltName=DNS:{NAME}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"),
        )
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "30",
            "-extfile",
            "ext.cnf",
        ]);
        let (registry, upstream) = start_registry(dir, Some(&tls));
        let port = upstream.port();
        let link = link::shaped_proxy(rt, upstream, rtt, 100e6 / 8.0);
        let hosts = dir.join("hosts");
        std::fs::write(
            &hosts,
            format!(
                "{}\n127.0.0.1 {NAME}\n",
                std::fs::read_to_string("/etc/hosts").unwrap_or_default()
            ),
        )
        .unwrap();
        let soci = Soci {
            dir: dir.to_path_buf(),
            bin,
            registry,
            image: format!(
                "{NAME}:{}/bench/python:oci",
                link.host.rsplit(':').next().unwrap_or_default()
            ),
            link,
        };

        // Push the image and its index, straight to the registry.
        eprintln!("SOCI: pushing the image and its index ...");
        let direct = format!("{NAME}:{port}/bench/python:oci");
        let ns = soci.namespace(&dir.join("setup"));
        ns.run(
            "skopeo",
            &[
                "copy",
                "--quiet",
                "--dest-tls-verify=false",
                &format!("oci-archive:{}", oci_archive.display()),
                &format!("docker://{direct}"),
            ],
        );
        soci.containerd(&ns, &dir.join("setup-containerd.log"));
        ns.run("ctr", &["images", "pull", &direct]);
        let soci_cli = soci.bin.join("soci");
        ns.run(
            &soci_cli,
            &[
                "create",
                "--span-size",
                "1048576",
                "--min-layer-size",
                "1048576",
                &direct,
            ],
        );
        ns.run(&soci_cli, &["push", &direct]);
        drop(ns);
        Ok(soci)
    }

    fn namespace(&self, root: &Path) -> Ns {
        Ns::new(root, &self.dir.join("hosts"), Some(&self.dir.join("tls/ca.crt")))
    }

    /// containerd inside `ns`, the soci proxy plugin configured, ready.
    fn containerd(&self, ns: &Ns, log: &Path) {
        containerd_in(
            ns,
            &self.dir.join("containerd.toml"),
            "soci",
            "/run/containerd/soci/soci-snapshotter-grpc.sock",
            log,
        );
    }

    /// One cold start: fresh namespace, soci root and containerd; `soci
    /// image rpull` then `ctr run` until the first line, through the link.
    pub fn cold_run(&self, dir: &Path) -> crate::Sample {
        std::fs::create_dir_all(dir).unwrap();
        let ns = self.namespace(&dir.join("ns"));
        let conf = self.dir.join("soci.toml");
        // Background fetch would pull whole layers after a quiet spell.
        std::fs::write(&conf, "[background_fetch]\ndisable = true\n").unwrap();
        let mut d = ns.cmd(self.bin.join("soci-snapshotter-grpc"));
        d.arg("-config")
            .arg(&conf)
            .args(["-address", "/run/containerd/soci/soci-snapshotter-grpc.sock"]);
        ns.spawn(d, &dir.join("soci.log"));
        let sock = dir.join("ns/runctd/soci/soci-snapshotter-grpc.sock");
        tc::wait_until(
            Duration::from_secs(20),
            || sock.exists(),
            || "soci-snapshotter-grpc did not start".into(),
        );
        self.containerd(&ns, &dir.join("containerd.log"));
        crate::common::drop_caches();
        let before = self.link.downloaded();
        let start = Instant::now();
        let pulled = ns.run(self.bin.join("soci"), &["image", "rpull", &self.image]);
        // A layer in rpull's output: soci fell back to pulling it whole.
        assert!(
            !pulled.contains("image.layer") && !pulled.contains("image.rootfs"),
            "SOCI pulled a layer whole (not lazy):\n{pulled}"
        );
        let seconds = run_ready(&ns, "soci", &self.image, start);
        let fetched = self.link.downloaded() - before;
        drop(ns);
        crate::Sample { seconds, fetched }
    }
}

/// Debian's `docker-registry` on a free port of 127.0.0.1, storing under
/// `dir/storage`, its log `dir/registry.log`; with TLS from `tls`'s
/// `server.crt` and `server.key` when given. Ready.
pub fn start_registry(dir: &Path, tls: Option<&Path>) -> (Child, std::net::SocketAddr) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let tls = tls
        .map(|t| {
            format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                t.join("server.crt").display(),
                t.join("server.key").display()
            )
        })
        .unwrap_or_default();
    std::fs::write(
        dir.join("registry.yml"),
        format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  redirect:\n    disable: true\nhttp:\n  addr: 127.0.0.1:{port}\n{tls}  debug:\n    addr: \"\"\nhealth:\n  storagedriver:\n    enabled: false\n",
            dir.join("storage").display(),
        ),
    )
    .unwrap();
    let mut reg = Command::new("docker-registry");
    reg.arg("serve").arg(dir.join("registry.yml"));
    let registry = spawn_logged(reg, &dir.join("registry.log"));
    let upstream: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    tc::wait_until(
        Duration::from_secs(20),
        || std::net::TcpStream::connect(upstream).is_ok(),
        || "docker-registry did not start".into(),
    );
    (registry, upstream)
}

/// `ctr run` of `image` inside `ns` through `snapshotter` (a FUSE one)
/// until its first line, which must be `ready`: seconds since `start`.
/// Checks the container succeeded and a FUSE layer was mounted (lazy).
pub fn run_ready(ns: &Ns, snapshotter: &str, image: &str, start: Instant) -> f64 {
    let mut run = ns
        .cmd("ctr")
        .args(["run", "--rm", "--snapshotter", snapshotter, image, "cold"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(run.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let seconds = start.elapsed().as_secs_f64();
    assert_eq!(line.trim(), "ready", "the {snapshotter} container printed {line:?}");
    let status = run.wait().unwrap();
    assert!(status.success(), "the {snapshotter} container failed: {status:?}");
    let mounts = std::fs::read_to_string(format!("/proc/{}/mounts", ns.holder.id())).unwrap_or_default();
    assert!(
        mounts.contains("fuse.rawBridge"),
        "no {snapshotter} FUSE mount: not lazy"
    );
    seconds
}

/// containerd inside `ns` (its config, written to `cfg`, in the
/// namespace's view), with the proxy snapshotter `plugin` at `socket`; ready.
pub fn containerd_in(ns: &Ns, cfg: &Path, plugin: &str, socket: &str, log: &Path) {
    std::fs::write(
        cfg,
        format!(
            "version = 2\nroot = \"/var/lib/containerd\"\nstate = \"/run/containerd\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\n[grpc]\n  address = \"/run/containerd/containerd.sock\"\n\n[proxy_plugins.{plugin}]\n  type = \"snapshot\"\n  address = \"{socket}\"\n"
        ),
    )
    .unwrap();
    let mut c = ns.cmd("containerd");
    c.arg("--config").arg(cfg);
    ns.spawn(c, log);
    tc::wait_until(
        Duration::from_secs(20),
        || ns.cmd("ctr").arg("version").output().is_ok_and(|o| o.status.success()),
        || {
            format!(
                "containerd in a private namespace did not start: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            )
        },
    );
}

impl Drop for Soci {
    fn drop(&mut self) {
        let _ = self.registry.kill();
        let _ = self.registry.wait();
    }
}
