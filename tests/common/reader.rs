//! The reader workload shared by `tests/continuity.rs` and
//! `bench/continuity.rs`: a container hashes twelve 1 MiB store files
//! against their sums in a tight loop, timing every read, while the test or
//! benchmark does things to the daemon.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::http::{Fault, Server};
use super::image::{nix_layer, write_oci_archive};
use super::nix::{busybox_tool, derivation, NixStore};
use super::{unique, Containerd, Daemon, TempRoot};

/// Twelve store paths of 1 MiB of random bytes each, and one that lists
/// their SHA-256 sums.
pub struct Fixture {
    _dir: TempRoot,
    pub nix: NixStore,
    pub cache: PathBuf,
    pub tool: String,
    pub sums: String,
    pub closure: Vec<(String, bool)>,
}

pub const BLOBS: usize = 12;

pub fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = TempRoot::leaked("contfix");
        let nix = NixStore::new(&dir.join("nix"), "continuity-1");
        let mut attrs = vec![format!("tool = {};", busybox_tool())];
        let mut blobs = Vec::new();
        for i in 0..BLOBS {
            attrs.push(format!(
                "blob{i} = {};",
                derivation(
                    &format!("blob{i}"),
                    "b mkdir $out; b dd if=/dev/urandom of=$out/data bs=64k count=16 2>/dev/null",
                    &[]
                )
            ));
            blobs.push(format!("blob{i}"));
        }
        let expr = format!(
            "rec {{ {} sums = {}; }}",
            attrs.join("\n"),
            derivation(
                "sums",
                "b mkdir $out; for d in $deps; do b sha256sum $d/data >> $out/sums; done; b echo ${tool} > $out/tool",
                &blobs.iter().map(String::as_str).collect::<Vec<_>>()
            ),
        );
        let built = nix.build_cache(&expr, "sums", &dir.join("cache"));
        Fixture {
            cache: dir.join("cache"),
            _dir: dir,
            tool: built.find("-tool"),
            sums: built.top,
            closure: built.closure,
            nix,
        }
    })
}

/// The container: for `secs` seconds, hash every blob again and again
/// against the sums, timing each read in centiseconds (from /proc/uptime).
pub fn reader_script(secs: u32) -> String {
    let f = fixture();
    format!(
        r#"B={tool}/bin/busybox
up() {{ read u r < /proc/uptime; echo ${{u%.*}}${{u#*.}}; }}
end=$(( $(up) + {secs}00 )); n=0; fail=0; worst=0
while [ $(up) -lt $end ]; do
  k=0
  while read h f; do
    k=$((k+1))
    t0=$(up)
    got=$($B sha256sum $f 2>&1)
    t1=$(up)
    [ $((t1-t0)) -gt $worst ] && worst=$((t1-t0))
    case "$got" in "$h "*) ;; *) echo "BAD $f: $got"; fail=$((fail+1));; esac
  done < {sums}/sums
  [ $k -eq {blobs} ] || {{ echo "BAD round $n: $k of {blobs} sums read"; fail=$((fail+1)); }}
  n=$((n+1))
done
echo "rounds $n failures $fail worst_cs $worst"
"#,
        tool = f.tool,
        sums = f.sums,
        blobs = BLOBS,
    )
}

pub struct Stack {
    pub tmp: TempRoot,
    pub server: Server,
    pub cfg: PathBuf,
    pub ctrd: Containerd,
    pub image: String,
}

impl Stack {
    pub fn new(name: &str, secs: u32) -> (Stack, Daemon) {
        Self::with_config(name, secs, "")
    }

    /// [`new`](Self::new) with `extra` lines in the daemon's config.
    pub fn with_config(name: &str, secs: u32, extra: &str) -> (Stack, Daemon) {
        let f = fixture();
        let tmp = TempRoot::new(name);
        let server = Server::start(f.cache.clone());
        // A slow link: each blob takes about a quarter second to arrive.
        server.fault(".nar.zst", Fault::Throttle(4 << 20), None);
        let cfg = super::cache_config(&tmp.path, &server.url(), &f.nix.public_key, extra);
        let sock = tmp.join("nix.sock");
        let daemon = Daemon::start_with(&tmp.join("root"), &sock, &["--config", cfg.to_str().unwrap()], &[]);
        let ctrd = Containerd::start(&tmp.join("ctrd"), &sock);
        let image = format!("docker.io/library/{name}:latest");
        let archive = tmp.join("image.tar");
        let bb = format!("{}/bin/busybox", f.tool);
        write_oci_archive(
            &archive,
            &image,
            &[nix_layer(&f.closure, &[])],
            &[&bb, "sh", "-c", &reader_script(secs)],
        );
        ctrd.ctr_ok(&["images", "import", "--snapshotter", "nix", archive.to_str().unwrap()]);
        (
            Stack {
                tmp,
                server,
                cfg,
                ctrd,
                image,
            },
            daemon,
        )
    }

    pub fn start_daemon(&self, extra: &[&str]) -> Daemon {
        let mut args = vec!["--config", self.cfg.to_str().unwrap()];
        args.extend_from_slice(extra);
        Daemon::start_with(&self.tmp.join("root"), &self.tmp.join("nix.sock"), &args, &[])
    }

    /// Runs the reader container to its end on another thread.
    pub fn run_reader<'s>(
        &'s self,
        scope: &'s std::thread::Scope<'s, '_>,
    ) -> std::thread::ScopedJoinHandle<'s, String> {
        let image = self.image.clone();
        scope.spawn(move || {
            let out = self
                .ctrd
                .ctr(&["run", "--rm", "--snapshotter", "nix", &image, &unique("reader")]);
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// Waits until the container has started reading (its view exists and
    /// a first blob was asked for).
    pub fn wait_for_first_fetch(&self) {
        let start = Instant::now();
        while self.server.count(".nar.zst") < 2 {
            assert!(start.elapsed() < Duration::from_secs(60), "the reader never started");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until containerd reaches the daemon again.
    pub fn wait_for_daemon(&self) {
        let start = Instant::now();
        loop {
            let o = self.ctrd.ctr(&["snapshots", "--snapshotter", "nix", "ls"]);
            if o.status.success() {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "containerd did not reconnect"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// After the ordeal: a new container starts and reads right, and the
    /// image's view goes away with the image.
    pub fn new_containers_work_and_views_go(&self, daemon: &Daemon) {
        let f = fixture();
        let name = "docker.io/library/after:latest";
        let archive = self.tmp.join("after.tar");
        let bb = format!("{}/bin/busybox", f.tool);
        let check = format!("{bb} sha256sum -c -s {}/sums && echo all-good", f.sums);
        write_oci_archive(
            &archive,
            name,
            &[nix_layer(&f.closure, &[])],
            &[&bb, "sh", "-c", &check],
        );
        self.ctrd
            .ctr_ok(&["images", "import", "--snapshotter", "nix", archive.to_str().unwrap()]);
        let out = self
            .ctrd
            .ctr(&["run", "--rm", "--snapshotter", "nix", name, &unique("after")]);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("all-good"),
            "a new container after the restarts: {}{}\n--- daemon:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            daemon.log_problems()
        );
        for image in [name, self.image.as_str()] {
            self.ctrd.ctr_ok(&["images", "rm", "--sync", image]);
        }
        let fuse = self.tmp.join("root").join("fuse");
        let start = Instant::now();
        loop {
            let views: Vec<_> = std::fs::read_dir(&fuse).unwrap().flatten().collect();
            if views.is_empty() {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "views left after their images went: {views:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// The reader's verdict: (rounds, failures, worst read in seconds).
pub fn verdict(out: &str, daemon: &Daemon) -> (u32, u32, f64) {
    let line = out.lines().find(|l| l.starts_with("rounds ")).unwrap_or_else(|| {
        panic!(
            "the reader did not finish: {out}\n--- daemon:\n{}",
            daemon.log_problems()
        )
    });
    let w: Vec<&str> = line.split_whitespace().collect();
    let (rounds, failures, worst): (u32, u32, u32) =
        (w[1].parse().unwrap(), w[3].parse().unwrap(), w[5].parse().unwrap());
    assert!(
        failures == 0 && !out.contains("BAD"),
        "reads failed or saw wrong bytes across the restart:\n{out}\n--- daemon:\n{}",
        daemon.log_problems()
    );
    assert!(rounds >= 2, "the reader made too little progress: {out}");
    println!("{line}");
    (rounds, failures, f64::from(worst) / 100.0)
}
