//! Helpers shared by the benchmarks (each bench is its own crate root).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub const NIXFLAGS: [&str; 2] = ["--extra-experimental-features", "nix-command"];

/// Runs a command; panics with its stderr unless it succeeds.
pub fn run(cmd: &mut Command) -> String {
    try_run(cmd).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs a command: its stdout, or an error naming it, with its stderr.
pub fn try_run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{cmd:?} failed:\n{}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The value after `--name` on the command line.
pub fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

pub fn arg_or(name: &str, default: usize) -> usize {
    arg(name).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Writes dirty pages back and drops the page, dentry and inode caches.
pub fn drop_caches() {
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

/// The median; NaN for no samples (a way left out of the run).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Bytes allocated under `path`.
pub fn du(path: &Path) -> u64 {
    nix_snapshotter::snapshots::disk_usage(path)
        .map(|u| u.size as u64)
        .unwrap_or(0)
}

/// A fresh Nix signing key in `dir`: (secret key file, public key).
pub fn signing_key(dir: &Path, name: &str) -> (PathBuf, String) {
    let key = dir.join("key");
    std::fs::write(
        &key,
        run(Command::new("nix")
            .args(NIXFLAGS)
            .args(["key", "generate-secret", "--key-name", name])),
    )
    .unwrap();
    let public = run(Command::new("nix")
        .args(NIXFLAGS)
        .args(["key", "convert-secret-to-public"])
        .stdin(std::fs::File::open(&key).unwrap()))
    .trim()
    .to_string();
    (key, public)
}

/// Builds `expr_file` into the chroot store at `chroot` (busybox as /bin/sh,
/// plus `extra_sandbox_paths`), returning the output path.
pub fn nix_build(chroot: &Path, expr_file: &Path, extra_sandbox_paths: &str) -> String {
    run(Command::new("nix-build")
        .arg("--store")
        .arg(chroot)
        .args(["--option", "extra-sandbox-paths"])
        .arg(format!("/bin/sh=/bin/busybox /bin/busybox{extra_sandbox_paths}"))
        .args([
            "--option",
            "build-users-group",
            "",
            "--option",
            "substituters",
            "",
            "--no-out-link",
        ])
        .arg(expr_file))
    .trim()
    .to_string()
}

/// `nix copy`s `path`'s closure from the chroot store to a signed file:// cache.
pub fn publish(chroot: &Path, cache: &Path, compression: &str, key: &Path, path: &str) {
    run(Command::new("nix")
        .args(NIXFLAGS)
        .arg("copy")
        .arg("--store")
        .arg(chroot)
        .arg("--to")
        .arg(format!(
            "file://{}?compression={compression}&secret-key={}",
            cache.display(),
            key.display()
        ))
        .arg(path));
}

/// Every store path of `top`'s closure in the chroot store.
pub fn closure_of(chroot: &Path, top: &str) -> Vec<String> {
    run(Command::new("nix")
        .args(NIXFLAGS)
        .arg("path-info")
        .arg("--store")
        .arg(chroot)
        .args(["-r", top]))
    .lines()
    .map(str::to_string)
    .collect()
}

/// Real Nix substituting `path`'s closure from the cache at `url` (trusting
/// `public`) into the chroot store `to`: the eager baseline both benchmarks use.
pub fn nix_copy_from(url: &str, public: &str, to: &Path, path: &str) {
    run(Command::new("nix")
        .args(NIXFLAGS)
        .args(["copy", "--option", "trusted-public-keys", public, "--from", url, "--to"])
        .arg(to)
        .arg(path));
}

/// `s` with every character a store path name cannot hold replaced by '-'.
pub fn store_name(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "+-._".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// Runs `ctr_run` (a `ctr run` of a container that prints `ready`) until
/// its first line of output: seconds; panics unless it printed `ready` and
/// succeeded.
pub fn first_line(ctr_run: &mut Command) -> f64 {
    use std::io::{BufRead, Read};
    use std::process::Stdio;
    let start = std::time::Instant::now();
    let mut child = ctr_run
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let t = start.elapsed().as_secs_f64();
    let status = child.wait().unwrap();
    let mut err = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    assert!(
        status.success() && line.trim() == "ready",
        "{ctr_run:?} failed ({line:?}): {err}"
    );
    t
}

/// `nix-snapshotter cache push` of `paths` (and their closures) from the
/// store under `store_root` into the cache directory `to`, signed with
/// `key`, with `flags` (e.g. `--frame-size 1MiB`).
pub fn cache_push(to: &Path, key: &Path, store_root: &Path, flags: &[&str], paths: &[&str]) {
    run(Command::new(env!("CARGO_BIN_EXE_nix-snapshotter"))
        .args(["cache", "push"])
        .args(flags)
        .arg("--to")
        .arg(to)
        .arg("--secret-key")
        .arg(key)
        .arg("--store-root")
        .arg(store_root)
        .args(paths));
}
