//! containerd's own snapshotter conformance suite (snapshots/testsuite from
//! Debian's containerd 1.6 sources), built with Debian's Go in GOPATH mode
//! and run against our daemon through containerd's proxy client.
//! The suite mounts what the daemon returns, so this needs root.

mod common;

use std::path::Path;
use std::process::Command;

#[test]
fn containerd_snapshotter_conformance() {
    assert!(
        Path::new(common::GOCODE)
            .join("src/github.com/containerd/containerd/snapshots/testsuite")
            .is_dir(),
        "needs golang-github-containerd-containerd-dev (installed by .ci/run)"
    );
    let tmp = common::TempRoot::new("conf");
    let bin = common::go_build("conformance", "conformance_test.go", &tmp.path);

    let run = Command::new(&bin)
        .args(["-test.v", "-test.root", "-test.timeout", "20m"])
        .env("NIX_SNAPSHOTTER_BIN", common::DAEMON)
        .current_dir(tmp.path.as_path())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&run.stdout);
    println!("{out}");
    let passed = out
        .lines()
        .filter(|l| l.trim_start().starts_with("--- PASS: TestContainerdSnapshotterSuite/"))
        .count();
    let failed: Vec<&str> = out.lines().filter(|l| l.contains("--- FAIL")).collect();
    assert!(
        run.status.success() && failed.is_empty(),
        "conformance failures: {failed:#?}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    // The 1.6 suite has 21 cases; Rename skips itself on overlay-like snapshotters.
    assert!(passed >= 20, "only {passed} cases passed");
}
