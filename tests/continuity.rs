//! Running containers survive the daemon: a container hashes store files in
//! a tight loop (cold ones included, fetched over a slow link, so that some
//! reads wait on a fetch when the daemon goes) while the daemon is killed
//! with SIGKILL, handed over to a second process, or restarted ten times.
//! Every read must succeed with the right bytes. Then new containers start,
//! and a removed image's view goes away as before.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::http::{Fault, Server};
use common::image::{nix_layer, write_oci_archive};
use common::nix::{derivation, NixStore};
use common::{unique, Containerd, Daemon, TempRoot};
use nix_snapshotter::nixfmt::StorePath;

/// Twelve store paths of 1 MiB of random bytes each, and one that lists
/// their SHA-256 sums.
struct Fixture {
    _dir: TempRoot,
    nix: NixStore,
    cache: PathBuf,
    tool: String,
    sums: String,
    closure: Vec<(String, bool)>,
}

const BLOBS: usize = 12;

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = TempRoot::leaked("contfix");
        let nix = NixStore::new(&dir.join("nix"), "continuity-1");
        let mut attrs = vec![format!(
            "tool = {};",
            derivation("tool", "b mkdir -p $out/bin; b cp /bin/busybox $out/bin/busybox", &[])
        )];
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
        let outs = nix.build(&expr);
        let find = |s: &str| outs.iter().find(|o| o.ends_with(s)).unwrap().clone();
        let sums = find("-sums");
        let cache = dir.join("cache");
        nix.publish(&cache, "zstd", std::slice::from_ref(&sums));
        let closure = nix
            .closure(&sums)
            .into_iter()
            .map(|p| {
                let base = StorePath::parse(&p).unwrap().base_name().to_string();
                let is_dir = nix.real(&p).is_dir();
                (base, is_dir)
            })
            .collect();
        Fixture {
            _dir: dir,
            cache,
            tool: find("-tool"),
            sums,
            closure,
            nix,
        }
    })
}

/// The container: for `secs` seconds, hash every blob again and again
/// against the sums, timing each read in centiseconds (from /proc/uptime).
fn reader_script(secs: u32) -> String {
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

struct Stack {
    tmp: TempRoot,
    server: Server,
    cfg: PathBuf,
    ctrd: Containerd,
    image: String,
}

impl Stack {
    fn new(name: &str, secs: u32) -> (Stack, Daemon) {
        let f = fixture();
        let tmp = TempRoot::new(name);
        let server = Server::start(f.cache.clone());
        // A slow link: each blob takes about a quarter second to arrive.
        server.fault(".nar.zst", Fault::Throttle(4 << 20), None);
        let cfg = common::cache_config(&tmp.path, &server.url(), &f.nix.public_key, "");
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

    fn start_daemon(&self, extra: &[&str]) -> Daemon {
        let mut args = vec!["--config", self.cfg.to_str().unwrap()];
        args.extend_from_slice(extra);
        Daemon::start_with(&self.tmp.join("root"), &self.tmp.join("nix.sock"), &args, &[])
    }

    /// Runs the reader container to its end on another thread.
    fn run_reader<'s>(&'s self, scope: &'s std::thread::Scope<'s, '_>) -> std::thread::ScopedJoinHandle<'s, String> {
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
    fn wait_for_first_fetch(&self) {
        let start = Instant::now();
        while self.server.count(".nar.zst") < 2 {
            assert!(start.elapsed() < Duration::from_secs(60), "the reader never started");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until containerd reaches the daemon again.
    fn wait_for_daemon(&self) {
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
    fn new_containers_work_and_views_go(&self, daemon: &Daemon) {
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
fn verdict(out: &str, daemon: &Daemon) -> (u32, u32, f64) {
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

fn holder_pids(root: &Path) -> Vec<i32> {
    let needle = root.join("fuse-holder.sock").to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                .unwrap_or(false)
        })
        .collect()
}

#[test]
fn a_killed_daemon_is_replaced_without_a_read_failing() {
    let (s, mut first) = Stack::new("cont-kill", 12);
    std::thread::scope(|scope| {
        let reader = s.run_reader(scope);
        s.wait_for_first_fetch();
        // Some blobs are still on their way: reads wait on them now.
        first.kill9();
        let daemon = s.start_daemon(&[]);
        let out = reader.join().unwrap();
        let (_, _, worst) = verdict(&out, &daemon);
        println!("longest read across a SIGKILL and restart: {worst:.2} s");
        assert!(
            daemon.log_text().contains("lazy store resumed"),
            "the new daemon did not resume the session:\n{}",
            daemon.log_text()
        );
        s.wait_for_daemon();
        s.new_containers_work_and_views_go(&daemon);
    });
}

#[test]
fn a_planned_hand_over_to_a_second_process_keeps_every_read() {
    let (s, mut first) = Stack::new("cont-handover", 10);
    std::thread::scope(|scope| {
        let reader = s.run_reader(scope);
        s.wait_for_first_fetch();
        let successor = s.start_daemon(&["--take-over"]);
        // The predecessor is told to stop, and exits cleanly by itself.
        let status = first.child.wait().unwrap();
        assert!(status.success(), "the predecessor: {status}\n{}", first.log_text());
        s.wait_for_daemon();
        let out = reader.join().unwrap();
        let (_, _, worst) = verdict(&out, &successor);
        println!("longest read across a planned hand-over: {worst:.2} s");
        assert!(
            successor.log_text().contains("lazy store resumed"),
            "{}",
            successor.log_text()
        );
        s.new_containers_work_and_views_go(&successor);
    });
}

#[test]
fn ten_restarts_in_a_row_keep_every_read() {
    let (s, mut daemon) = Stack::new("cont-restart", 25);
    std::thread::scope(|scope| {
        let reader = s.run_reader(scope);
        s.wait_for_first_fetch();
        for i in 0..10 {
            daemon.stop();
            daemon = s.start_daemon(&[]);
            assert!(
                daemon.log_text().matches("lazy store resumed").count() > i,
                "restart {i} did not resume:\n{}",
                daemon.log_text()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        s.wait_for_daemon();
        let out = reader.join().unwrap();
        let (_, _, worst) = verdict(&out, &daemon);
        println!("longest read across ten restarts: {worst:.2} s");
        s.new_containers_work_and_views_go(&daemon);
    });
}

/// The documented limit: with the holder gone too, nothing kept the
/// session. The next daemon detaches the dead mount and mounts afresh, and
/// new containers work.
#[test]
fn with_the_holder_killed_too_the_next_daemon_mounts_afresh() {
    let (s, mut first) = Stack::new("cont-holder", 1);
    let root = s.tmp.join("root");
    let out = s
        .ctrd
        .ctr(&["run", "--rm", "--snapshotter", "nix", &s.image, &unique("once")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let holders = holder_pids(&root);
    assert_eq!(holders.len(), 1, "one holder process per root: {holders:?}");
    first.kill9();
    for pid in holders {
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_raw(pid).unwrap(),
            rustix::process::Signal::KILL,
        );
    }
    std::thread::sleep(Duration::from_millis(200));
    let daemon = s.start_daemon(&[]);
    let log = daemon.log_text();
    assert!(
        !log.contains("lazy store resumed") && log.contains("lazy store mounted"),
        "{log}"
    );
    s.wait_for_daemon();
    s.new_containers_work_and_views_go(&daemon);
}
