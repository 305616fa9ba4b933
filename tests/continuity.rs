//! Running containers survive the daemon: a container hashes store files in
//! a tight loop (cold ones included, fetched over a slow link, so that some
//! reads wait on a fetch when the daemon goes) while the daemon is killed
//! with SIGKILL, handed over to a second process, or restarted ten times.
//! Every read must succeed with the right bytes. Then new containers start,
//! and a removed image's view goes away as before.

mod common;

use std::path::Path;
use std::time::Duration;

use common::reader::{verdict, Stack};
use common::{unique, Daemon};

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
    // With passthrough (not the default): the successor must also adopt
    // the backing ids of the files the kernel still has open.
    let (s, mut first) = Stack::with_config("cont-kill", 12, "[fuse]\npassthrough = true\n");
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

/// While the daemon runs it watches its holder: one that died is replaced
/// and handed the session again, so a crash after that still keeps the
/// containers' store.
#[test]
fn a_holder_that_dies_while_the_daemon_runs_is_replaced() {
    let (s, mut first) = Stack::new("cont-reholder", 8);
    let root = s.tmp.join("root");
    std::thread::scope(|scope| {
        let reader = s.run_reader(scope);
        s.wait_for_first_fetch();
        let holders = holder_pids(&root);
        assert_eq!(holders.len(), 1, "{holders:?}");
        kill(holders[0]);
        let start = std::time::Instant::now();
        // A new holder, once it was handed the connection again.
        loop {
            let now = holder_pids(&root);
            if now.len() == 1 && now[0] != holders[0] && holds_dev_fuse(now[0]) {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "no new holder: {now:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
        first.kill9();
        let daemon = s.start_daemon(&[]);
        let out = reader.join().unwrap();
        verdict(&out, &daemon);
        assert!(
            daemon.log_text().contains("lazy store resumed"),
            "{}",
            daemon.log_text()
        );
    });
}

/// A resumed session has no mount object of its own: when its last view
/// goes and the daemon stops, it is still unmounted (promptly: a clean exit
/// within the usual grace), and the holder lets go.
#[test]
fn a_resumed_session_without_views_is_unmounted_at_stop() {
    let (s, mut first) = Stack::new("cont-unmount", 1);
    let root = s.tmp.join("root");
    let id = unique("sleeper");
    let f = common::reader::fixture();
    let sleeper = "docker.io/library/cont-sleeper:latest";
    let archive = s.tmp.join("sleeper.tar");
    let bb = format!("{}/bin/busybox", f.tool);
    common::image::write_oci_archive(
        &archive,
        sleeper,
        &[common::image::nix_layer(&f.closure, &[])],
        &[&bb, "sleep", "60"],
    );
    s.ctrd
        .ctr_ok(&["images", "import", "--snapshotter", "nix", archive.to_str().unwrap()]);
    s.ctrd.ctr_ok(&["run", "-d", "--snapshotter", "nix", sleeper, &id]);
    first.stop();
    let mut daemon = s.start_daemon(&[]);
    assert!(
        daemon.log_text().contains("lazy store resumed"),
        "{}",
        daemon.log_text()
    );
    // Until containerd has reconnected, the removals its garbage collector
    // sends the snapshotter fail (and wait for its next run): a call that
    // reaches the daemon tells it is back.
    let start = std::time::Instant::now();
    while !s
        .ctrd
        .ctr(&["snapshots", "--snapshotter", "nix", "prepare", "probe", ""])
        .status
        .success()
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "containerd did not reconnect"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    s.ctrd.ctr_ok(&["snapshots", "--snapshotter", "nix", "rm", "probe"]);
    let _ = s.ctrd.ctr(&["tasks", "kill", "-s", "KILL", &id]);
    let start = std::time::Instant::now();
    while !s.ctrd.ctr(&["tasks", "rm", "-f", &id]).status.success() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    s.ctrd.ctr_ok(&["containers", "rm", &id]);
    for image in [sleeper, s.image.as_str()] {
        s.ctrd.ctr_ok(&["images", "rm", "--sync", image]);
    }
    let fuse = root.join("fuse");
    let start = std::time::Instant::now();
    while std::fs::read_dir(&fuse).map(|d| d.count()).unwrap_or(0) > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "views left: {:?}\nsnapshots: {}\n{}",
            std::fs::read_dir(&fuse).map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>()),
            String::from_utf8_lossy(&s.ctrd.ctr(&["snapshots", "--snapshotter", "nix", "ls"]).stdout),
            daemon
                .log_text()
                .lines()
                .filter(|l| l.contains("remove") || l.contains("view") || l.contains("starting"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    daemon.stop();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(fuse.to_str().unwrap()),
        "the store is still mounted after a stop with no views"
    );
    let start = std::time::Instant::now();
    while !holder_pids(&root).is_empty() {
        assert!(start.elapsed() < Duration::from_secs(10), "the holder did not let go");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `keep_session = false`: a session an earlier run kept is let go, and
/// the store is mounted afresh.
#[test]
fn turning_keep_session_off_lets_a_kept_session_go() {
    let (s, mut first) = Stack::new("cont-off", 1);
    let root = s.tmp.join("root");
    let id = unique("sleeper");
    s.ctrd.ctr_ok(&["run", "-d", "--snapshotter", "nix", &s.image, &id]);
    first.kill9();
    assert_eq!(holder_pids(&root).len(), 1);
    let off = s.tmp.join("off.toml");
    let cfg = std::fs::read_to_string(&s.cfg).unwrap();
    std::fs::write(&off, format!("{cfg}\n[fuse]\nkeep_session = false\n")).unwrap();
    let daemon = Daemon::start_with(
        &root,
        &s.tmp.join("nix.sock"),
        &["--config", off.to_str().unwrap()],
        &[],
    );
    let log = daemon.log_text();
    assert!(
        log.contains("letting go of the session") && log.contains("lazy store mounted"),
        "{log}"
    );
    let start = std::time::Instant::now();
    while !holder_pids(&root).is_empty() {
        assert!(start.elapsed() < Duration::from_secs(10), "the holder did not let go");
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = s.ctrd.ctr(&["tasks", "kill", "-s", "KILL", &id]);
}

/// Whether process `pid` holds a `/dev/fuse` descriptor.
fn holds_dev_fuse(pid: i32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .any(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == Path::new("/dev/fuse")))
        })
        .unwrap_or(false)
}

fn kill(pid: i32) {
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid).unwrap(),
        rustix::process::Signal::KILL,
    );
}
