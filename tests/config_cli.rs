//! Configuration errors stop the daemon before it touches anything, with a
//! message naming the file and the key; precedence is defaults < file < flags.

mod common;

use std::process::Command;

use common::{TempRoot, DAEMON};

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(DAEMON).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn unknown_key_is_named() {
    let tmp = TempRoot::new("cfg");
    let cfg = tmp.join("config.toml");
    std::fs::write(&cfg, "root = \"/tmp/x\"\nsnapshoter_root = \"/oops\"\n").unwrap();
    let sock = tmp.join("sock");
    let (ok, _, err) = run(&["-c", cfg.to_str().unwrap(), "-a", sock.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("snapshoter_root") && err.contains("config.toml"), "{err}");
    assert!(!sock.exists(), "daemon started despite a bad config");
}

#[test]
fn malformed_file_is_refused() {
    let tmp = TempRoot::new("cfg");
    let cfg = tmp.join("broken.toml");
    std::fs::write(&cfg, "address = \"/tmp/unterminated\n[image_service\n").unwrap();
    let (ok, _, err) = run(&["--config", cfg.to_str().unwrap(), "config"]);
    assert!(!ok);
    assert!(err.contains("broken.toml") && err.contains("line"), "{err}");
}

#[test]
fn missing_explicit_file_is_an_error() {
    let (ok, _, err) = run(&["--config", "/nonexistent/nix-snapshotter.toml", "config"]);
    assert!(!ok);
    assert!(err.contains("/nonexistent/nix-snapshotter.toml"), "{err}");
}

#[test]
fn flags_override_file_override_defaults() {
    let tmp = TempRoot::new("cfg");
    let cfg = tmp.join("config.toml");
    std::fs::write(
        &cfg,
        "address = \"/from/file.sock\"\nroot = \"/from/file\"\n[image_service]\ncontainerd_address = \"/from/file/c.sock\"\n",
    )
    .unwrap();
    let (ok, out, err) = run(&["-c", cfg.to_str().unwrap(), "--root", "/from/flag", "config"]);
    assert!(ok, "{err}");
    let parsed: toml::Value = toml::from_str(&out).unwrap();
    assert_eq!(parsed["root"].as_str(), Some("/from/flag"));
    assert_eq!(parsed["address"].as_str(), Some("/from/file.sock"));
    assert_eq!(
        parsed["image_service"]["containerd_address"].as_str(),
        Some("/from/file/c.sock")
    );
}
