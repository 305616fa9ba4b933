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
use common::unique;

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
