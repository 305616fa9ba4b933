//! How long a running container's reads stall while the daemon goes away
//! and comes back. A container hashes twelve 1 MiB store files against
//! their sums in a tight loop (all warm: prefetched with `fetch --closure`),
//! timing every read; meanwhile the daemon is
//!
//! - left alone (the baseline, measured in the same run),
//! - (a) killed with SIGKILL and started again,
//! - (b) upgraded: a second process started with `--take-over`,
//! - (c) restarted (SIGTERM, start) ten times in a row.
//!
//! Reported: the longest single read in each case (timed by the container,
//! 10 ms resolution), its ratio to the baseline's, the service gap (from
//! the moment the daemon is stopped or killed until its successor serves:
//! an upper bound on any read's stall, whenever it comes) and the targets
//! (a) < 2 s, (b) < 0.5 s. Any failed or wrong read fails the benchmark.
//!
//!     cargo bench --bench continuity [-- --rounds N --json FILE]
//!
//! Needs root, containerd, runc and nix-bin (scripts/install-deps).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "common.rs"]
mod helpers;

use std::process::Command;
use std::time::{Duration, Instant};

use common::reader::{fixture, verdict, Stack};
use common::Daemon;
use helpers::{arg, arg_or, median};

/// Does something to the daemon; returns the daemon now serving and the
/// longest service gap (seconds).
type Event = fn(&Stack, Daemon) -> (Daemon, f64);

fn nothing(_: &Stack, d: Daemon) -> (Daemon, f64) {
    (d, 0.0)
}

fn kill_and_restart(s: &Stack, mut d: Daemon) -> (Daemon, f64) {
    let t = Instant::now();
    d.kill9();
    // The socket is bound once the FUSE session was resumed.
    let next = s.start_daemon(&[]);
    (next, t.elapsed().as_secs_f64())
}

fn hand_over(s: &Stack, mut d: Daemon) -> (Daemon, f64) {
    // The successor is started (binary loaded, runtime up) before it stops
    // the running daemon; the gap is bounded by the whole hand-over.
    let t = Instant::now();
    let next = s.start_daemon(&["--take-over"]);
    let status = d.child.wait().expect("the predecessor");
    assert!(status.success(), "the predecessor did not stop cleanly: {status}");
    let ready = Instant::now();
    while std::os::unix::net::UnixStream::connect(s.tmp.join("nix.sock")).is_err() {
        assert!(ready.elapsed() < Duration::from_secs(30), "the successor never served");
        std::thread::sleep(Duration::from_millis(1));
    }
    (next, t.elapsed().as_secs_f64())
}

fn ten_restarts(s: &Stack, mut d: Daemon) -> (Daemon, f64) {
    let mut gap: f64 = 0.0;
    for _ in 0..10 {
        let t = Instant::now();
        d.stop();
        d = s.start_daemon(&[]);
        gap = gap.max(t.elapsed().as_secs_f64());
        std::thread::sleep(Duration::from_millis(300));
    }
    (d, gap)
}

/// One run of a case: the longest read and the longest service gap, in seconds.
fn run_case(name: &str, secs: u32, event: Event) -> (f64, f64) {
    let (s, daemon) = Stack::new(name, secs);
    // Warm: every stall measured is the daemon's, not a download's.
    let out = Command::new(common::DAEMON)
        .arg("--address")
        .arg(s.tmp.join("nix.sock"))
        .args([
            "fetch",
            "--config",
            s.cfg.to_str().unwrap(),
            "--closure",
            &fixture().sums,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "prefetch: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (out, daemon, gap) = std::thread::scope(|scope| {
        let reader = s.run_reader(scope);
        std::thread::sleep(Duration::from_millis(1500));
        let (daemon, gap) = event(&s, daemon);
        (reader.join().unwrap(), daemon, gap)
    });
    let (_, _, worst) = verdict(&out, &daemon);
    drop(daemon);
    (worst, gap)
}

fn main() {
    // `cargo bench` passes --bench; a test run of benches (no --bench) is a no-op.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let rounds = arg_or("--rounds", 3).max(1);
    let cases: [(&str, &str, u32, Event, Option<f64>); 4] = [
        ("baseline", "no event (baseline)", 6, nothing, None),
        ("kill", "(a) SIGKILL, then start", 6, kill_and_restart, Some(2.0)),
        (
            "handover",
            "(b) planned hand-over (--take-over)",
            6,
            hand_over,
            Some(0.5),
        ),
        ("restarts", "(c) ten restarts in a row", 14, ten_restarts, None),
    ];
    let mut results = Vec::new();
    for (key, label, secs, event, target) in cases {
        let runs: Vec<(f64, f64)> = (0..rounds)
            .map(|i| {
                let (w, g) = run_case(&format!("bench-cont-{key}"), secs, event);
                eprintln!(
                    "{label}: round {} of {rounds}: longest read {w:.2} s, gap {g:.3} s",
                    i + 1
                );
                (w, g)
            })
            .collect();
        let max = runs.iter().map(|r| r.0).fold(0.0, f64::max);
        let gap = runs.iter().map(|r| r.1).fold(0.0, f64::max);
        results.push((key, label, median(runs.iter().map(|r| r.0).collect()), max, gap, target));
    }
    let base = results[0].2.max(0.01);
    println!(
        "\n{:<40} {:>14} {:>10} {:>12} {:>11} {:>8}",
        "case", "longest read", "worst", "vs baseline", "gap (max)", "target"
    );
    for (_, label, med, max, gap, target) in &results {
        println!(
            "{:<40} {:>12.2} s {:>8.2} s {:>11.1}x {:>9.3} s {:>8}",
            label,
            med,
            max,
            med / base,
            gap,
            target.map(|t| format!("< {t} s")).unwrap_or_default()
        );
    }
    for (_, label, _, max, gap, target) in &results {
        if let Some(t) = target {
            if max.max(*gap) >= *t {
                println!("MISSED: {label}: longest read {max:.2} s, gap {gap:.3} s, target < {t} s");
            }
        }
    }
    if let Some(path) = arg("--json") {
        let json = serde_json::json!({
            "rounds": rounds,
            "cases": results.iter().map(|(key, label, med, max, gap, target)| serde_json::json!({
                "case": key, "label": label, "longest_read_s": med, "worst_s": max,
                "gap_s": gap, "vs_baseline": med / base, "target_s": target,
            })).collect::<Vec<_>>(),
        });
        std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    }
}
