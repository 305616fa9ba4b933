//! stargz-snapshotter as a lazy-pull peer: (e)'s image converted to eStargz
//! and optimized by Debian's `ctr-remote` (`image optimize` runs the
//! image's command once and puts the files it read first, with a prefetch
//! landmark, at the front of each layer), in Debian's `docker-registry`
//! behind the same shaped link.
//!
//! Debian packages the daemon's sources (`golang-github-containerd-stargz-
//! snapshotter-dev`) but not the daemon: `stargz/main.go`, ours, serves its
//! `fs` and `snapshot` packages as a proxy snapshotter (built in GOPATH
//! mode). Background fetch is off, as for SOCI. Each cold run lives in a
//! private mount namespace (`soci::Ns`), so that a stopped daemon's FUSE
//! mounts go with it. The registry is on 127.0.0.1: plain http, as
//! containerd and our main use for loopback hosts.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::link;
use crate::soci::{containerd_in, run_ready, start_registry, Ns};
use crate::tc;

/// The daemon's socket, in the namespace's view.
const SOCKET: &str = "/run/containerd/stargz.sock";

pub struct Stargz {
    dir: PathBuf,
    /// Our main, built.
    bin: PathBuf,
    registry: Child,
    /// The shaped link in front of the registry.
    pub link: link::Link,
    /// The optimized image through the link.
    image: String,
}

impl Stargz {
    /// Builds the daemon, starts the registry behind the link, converts
    /// `oci_archive` to an optimized eStargz image and pushes it.
    pub fn prepare(
        dir: &Path,
        oci_archive: &Path,
        rt: &tokio::runtime::Runtime,
        rtt: Duration,
    ) -> Result<Stargz, String> {
        for tool in ["ctr-remote", "skopeo", "docker-registry", "go", "unshare", "nsenter"] {
            if !tc::have(tool) {
                return Err(format!("{tool} missing (scripts/bench installs it)"));
            }
        }
        let sources = Path::new(tc::GOCODE).join("src/github.com/containerd/stargz-snapshotter/fs");
        if !sources.is_dir() {
            return Err("golang-github-containerd-stargz-snapshotter-dev missing (scripts/bench installs it)".into());
        }
        std::fs::create_dir_all(dir).unwrap();
        let bin = build(dir)?;

        let (registry, upstream) = start_registry(dir, None);
        let port = upstream.port();
        let link = link::shaped_proxy(rt, upstream, rtt, 100e6 / 8.0);
        std::fs::copy("/etc/hosts", dir.join("hosts")).unwrap();
        let stargz = Stargz {
            dir: dir.to_path_buf(),
            bin,
            registry,
            image: format!("{}/bench/python:esgz", link.host),
            link,
        };

        // Push, pull, optimize and push again, straight to the registry.
        eprintln!("stargz: converting and optimizing the image ...");
        let direct = format!("127.0.0.1:{port}/bench/python");
        let ns = stargz.namespace(&dir.join("setup"));
        ns.try_run(
            "skopeo",
            &[
                "copy",
                "--quiet",
                "--dest-tls-verify=false",
                &format!("oci-archive:{}", oci_archive.display()),
                &format!("docker://{direct}:oci"),
            ],
        )?;
        containerd_in(
            &ns,
            &dir.join("setup-containerd.toml"),
            "stargz",
            SOCKET,
            &dir.join("setup-containerd.log"),
        );
        let oci = format!("{direct}:oci");
        let esgz = format!("{direct}:esgz");
        ns.try_run("ctr-remote", &["image", "pull", "--plain-http", &oci])?;
        ns.try_run(
            "ctr-remote",
            &["image", "optimize", "--oci", "--period", "5", &oci, &esgz],
        )?;
        ns.try_run("ctr-remote", &["image", "push", "--plain-http", &esgz])?;
        drop(ns);
        Ok(stargz)
    }

    fn namespace(&self, root: &Path) -> Ns {
        Ns::new(root, &self.dir.join("hosts"), None)
    }

    /// One cold start: fresh namespace, daemon root and containerd;
    /// `ctr-remote image rpull` then `ctr run` until the first line,
    /// through the link.
    pub fn cold_run(&self, dir: &Path) -> crate::Sample {
        std::fs::create_dir_all(dir).unwrap();
        let ns = self.namespace(&dir.join("ns"));
        let conf = dir.join("stargz.toml");
        // Background fetch would pull whole layers after a quiet spell.
        std::fs::write(&conf, "no_background_fetch = true\n").unwrap();
        let mut d = ns.cmd(&self.bin);
        d.args(["-address", SOCKET, "-root"])
            .arg(dir.join("root"))
            .arg("-config")
            .arg(&conf);
        ns.spawn(d, &dir.join("stargz.log"));
        let sock = dir.join("ns/runctd/stargz.sock");
        tc::wait_until(
            Duration::from_secs(20),
            || sock.exists(),
            || {
                format!(
                    "the stargz daemon did not start: {}",
                    std::fs::read_to_string(dir.join("stargz.log")).unwrap_or_default()
                )
            },
        );
        containerd_in(
            &ns,
            &dir.join("containerd.toml"),
            "stargz",
            SOCKET,
            &dir.join("containerd.log"),
        );
        crate::common::drop_caches();
        let before = self.link.downloaded();
        let start = Instant::now();
        let pulled = ns.run("ctr-remote", &["image", "rpull", "--plain-http", &self.image]);
        // A layer in rpull's output: stargz fell back to pulling it whole.
        assert!(
            !pulled.contains("image.layer") && !pulled.contains("image.rootfs"),
            "stargz pulled a layer whole (not lazy):\n{pulled}"
        );
        let seconds = run_ready(&ns, "stargz", &self.image, start);
        let fetched = self.link.downloaded() - before;
        drop(ns);
        crate::Sample { seconds, fetched }
    }
}

/// `stargz/main.go` built against Debian's Go sources, under `dir`.
fn build(dir: &Path) -> Result<PathBuf, String> {
    let pkg = dir.join("gopath/src/stargz");
    std::fs::create_dir_all(&pkg).unwrap();
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    std::fs::copy(manifest.join("bench/stargz/main.go"), pkg.join("main.go")).unwrap();
    let bin = dir.join("stargz");
    let out = Command::new("go")
        .args(["build", "-o"])
        .arg(&bin)
        .arg(".")
        .current_dir(&pkg)
        .env("GO111MODULE", "off")
        .env("GOPATH", format!("{}:{}", dir.join("gopath").display(), tc::GOCODE))
        .env("GOCACHE", manifest.join("target/go-cache"))
        .output()
        .map_err(|e| format!("go: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "go build of bench/stargz/main.go failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(bin)
}

impl Drop for Stargz {
    fn drop(&mut self) {
        let _ = self.registry.kill();
        let _ = self.registry.wait();
    }
}
