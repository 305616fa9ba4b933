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
//! Reported: the longest single read in each case, its ratio to the
//! baseline's, and the targets (a) < 2 s, (b) < 0.5 s. Any failed or wrong
//! read fails the benchmark.
//!
//!     cargo bench --bench continuity [-- --rounds N --json FILE]
//!
//! Needs root, containerd, runc and nix-bin (scripts/install-deps).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "common.rs"]
mod helpers;

use std::process::Command;
use std::time::Duration;

use common::reader::{fixture, verdict, Stack};
use common::Daemon;
use helpers::{arg, arg_or, median};

type Event = fn(&Stack, Daemon) -> Daemon;

fn nothing(_: &Stack, d: Daemon) -> Daemon {
    d
}

fn kill_and_restart(s: &Stack, mut d: Daemon) -> Daemon {
    d.kill9();
    s.start_daemon(&[])
}

fn hand_over(s: &Stack, mut d: Daemon) -> Daemon {
    let next = s.start_daemon(&["--take-over"]);
    let status = d.child.wait().expect("the predecessor");
    assert!(status.success(), "the predecessor did not stop cleanly: {status}");
    next
}

fn ten_restarts(s: &Stack, mut d: Daemon) -> Daemon {
    for _ in 0..10 {
        d.stop();
        d = s.start_daemon(&[]);
        std::thread::sleep(Duration::from_millis(300));
    }
    d
}

/// One run of a case: the longest read, in seconds.
fn run_case(name: &str, secs: u32, event: Event) -> f64 {
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
    let (out, daemon) = std::thread::scope(|scope| {
        let reader = s.run_reader(scope);
        std::thread::sleep(Duration::from_millis(1500));
        let daemon = event(&s, daemon);
        (reader.join().unwrap(), daemon)
    });
    let (_, _, worst) = verdict(&out, &daemon);
    drop(daemon);
    worst
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
        let runs: Vec<f64> = (0..rounds)
            .map(|i| {
                let w = run_case(&format!("bench-cont-{key}"), secs, event);
                eprintln!("{label}: round {} of {rounds}: longest read {w:.2} s", i + 1);
                w
            })
            .collect();
        let max = runs.iter().cloned().fold(0.0, f64::max);
        results.push((key, label, median(runs), max, target));
    }
    let base = results[0].2.max(0.01);
    println!(
        "\n{:<40} {:>14} {:>10} {:>12} {:>8}",
        "case", "longest read", "worst", "vs baseline", "target"
    );
    for (_, label, med, max, target) in &results {
        println!(
            "{:<40} {:>12.2} s {:>8.2} s {:>11.1}x {:>8}",
            label,
            med,
            max,
            med / base,
            target.map(|t| format!("< {t} s")).unwrap_or_default()
        );
    }
    for (_, label, med, _, target) in &results {
        if let Some(t) = target {
            if med >= t {
                println!("MISSED: {label}: {med:.2} s, target < {t} s");
            }
        }
    }
    if let Some(path) = arg("--json") {
        let json = serde_json::json!({
            "rounds": rounds,
            "cases": results.iter().map(|(key, label, med, max, target)| serde_json::json!({
                "case": key, "label": label, "longest_read_s": med, "worst_s": max,
                "vs_baseline": med / base, "target_s": target,
            })).collect::<Vec<_>>(),
        });
        std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    }
}
