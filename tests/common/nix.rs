//! Real Nix (Debian's nix-bin) for tests: builds closures offline in a
//! private chroot store (no nixpkgs, busybox as the only tool) and publishes
//! them as signed binary caches with `nix copy`.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::have;

pub struct NixStore {
    /// Chroot store root: paths live physically under `<root>/nix/store`.
    pub root: PathBuf,
    pub secret_key: PathBuf,
    pub public_key: String,
}

fn nix(args: &[&str]) -> String {
    let out = Command::new("nix")
        .args(["--extra-experimental-features", "nix-command"])
        .args(args)
        .output()
        .expect("nix must be installed (nix-bin)");
    assert!(
        out.status.success(),
        "nix {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl NixStore {
    /// A chroot store under `dir` and a signing key named `key_name`.
    pub fn new(dir: &Path, key_name: &str) -> NixStore {
        assert!(
            have("nix-build") && have("nix"),
            "nix-bin must be installed (see .ci/run)"
        );
        std::fs::create_dir_all(dir).unwrap();
        let secret_key = dir.join("secret.key");
        std::fs::write(&secret_key, nix(&["key", "generate-secret", "--key-name", key_name])).unwrap();
        let public_key = {
            let out = Command::new("nix")
                .args([
                    "--extra-experimental-features",
                    "nix-command",
                    "key",
                    "convert-secret-to-public",
                ])
                .stdin(std::fs::File::open(&secret_key).unwrap())
                .output()
                .unwrap();
            assert!(out.status.success());
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        NixStore {
            root: dir.join("chroot"),
            secret_key,
            public_key,
        }
    }

    /// Builds a Nix expression, returns its output paths (`/nix/store/...`).
    pub fn build(&self, expr: &str) -> Vec<String> {
        self.build_with(expr, "")
    }

    /// Like [`build`](Self::build), with the host's /usr, /lib and /lib64
    /// visible in the sandbox (to package Debian binaries with patchelf).
    pub fn build_with_host(&self, expr: &str) -> Vec<String> {
        self.build_with(expr, " /usr /lib /lib64")
    }

    fn build_with(&self, expr: &str, extra_paths: &str) -> Vec<String> {
        let file = self.root.with_extension("nix");
        std::fs::write(&file, expr).unwrap();
        let out = self.nix_build(extra_paths, &[file.as_os_str()]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Builds `expr` and publishes the closure of its output named
    /// `*-<top>` in `cache` as a signed zstd binary cache.
    pub fn build_cache(&self, expr: &str, top: &str, cache: &Path) -> Built {
        let outs = self.build(expr);
        let built = Built {
            outs,
            top: String::new(),
            closure: Vec::new(),
        };
        let top = built.find(&format!("-{top}"));
        self.publish(cache, "zstd", std::slice::from_ref(&top));
        let closure = self.layer_closure(&top);
        Built { top, closure, ..built }
    }

    /// `path`'s closure as an image's Nix layer names it: (base name,
    /// whether it is a directory).
    pub fn layer_closure(&self, path: &str) -> Vec<(String, bool)> {
        self.closure(path)
            .into_iter()
            .map(|p| {
                let base = nix_snapshotter::nixfmt::StorePath::parse(&p)
                    .unwrap()
                    .base_name()
                    .to_string();
                let is_dir = self.real(&p).is_dir();
                (base, is_dir)
            })
            .collect()
    }

    /// Where a store path physically is.
    pub fn real(&self, store_path: &str) -> PathBuf {
        self.root.join(store_path.trim_start_matches('/'))
    }

    /// `nix copy`s the closures of `paths` into a file:// cache at `dir`.
    pub fn publish(&self, dir: &Path, compression: &str, paths: &[String]) {
        let to = format!(
            "file://{}?compression={compression}&secret-key={}&write-nar-listing=true",
            dir.display(),
            self.secret_key.display()
        );
        let mut args = vec!["copy", "--store", self.root.to_str().unwrap(), "--to", &to];
        args.extend(paths.iter().map(String::as_str));
        nix(&args);
    }

    /// Adds `file` to this store as it is (a store path with no references,
    /// named after the file); returns its store path.
    pub fn add_file(&self, file: &Path) -> String {
        nix(&[
            "store",
            "add-file",
            "--store",
            self.root.to_str().unwrap(),
            file.to_str().unwrap(),
        ])
        .trim()
        .to_string()
    }

    /// `nix-build tests/nix/<file>` into this store with `args` and our
    /// binary as `cli` (see [`copy_cli`]); panics unless it builds.
    pub fn build_test_expr(&self, cli: &Path, file: &str, args: &[&str]) -> std::process::Output {
        let expr = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/nix").join(file);
        let mut all: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
        all.extend([
            std::ffi::OsStr::new("--argstr"),
            std::ffi::OsStr::new("cli"),
            cli.as_os_str(),
            expr.as_os_str(),
        ]);
        self.nix_build(&format!(" /lib /lib64 /usr/lib {}", cli.display()), &all)
    }

    /// `nix-build` into this store, offline, busybox as `/bin/sh` and
    /// `extra_paths` in the sandbox, then `args`; panics unless it builds.
    fn nix_build(&self, extra_paths: &str, args: &[&std::ffi::OsStr]) -> std::process::Output {
        let out = Command::new("nix-build")
            .arg("--store")
            .arg(&self.root)
            .args(["--option", "extra-sandbox-paths"])
            .arg(format!("/bin/sh=/bin/busybox /bin/busybox{extra_paths}"))
            .args(["--option", "build-users-group", ""])
            .args(["--option", "substituters", ""])
            .arg("--no-out-link")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "nix-build failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// `nix-snapshotter cache push` of `paths` (and their closures) from
    /// this store into `cache`, signed with this store's key, with `args`
    /// (the layout flags) first; panics unless it succeeds. Its output: the
    /// store paths it published.
    pub fn cache_push(&self, cache: &Path, args: &[&str], paths: &[&str]) -> String {
        let out = Command::new(super::DAEMON)
            .args(["cache", "push", "--to"])
            .arg(cache)
            .arg("--secret-key")
            .arg(&self.secret_key)
            .arg("--store-root")
            .arg(&self.root)
            .args(args)
            .args(paths)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cache push: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The closure of `path` in this store.
    pub fn closure(&self, path: &str) -> Vec<String> {
        let out = nix(&["path-info", "--store", self.root.to_str().unwrap(), "--recursive", path]);
        out.lines().map(str::to_string).collect()
    }
}

/// sha256 of `nix-store --dump PATH` (real Nix's NAR of any tree), as hex.
pub fn dump_sha256(path: &Path) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg("nix-store --dump \"$1\" | sha256sum")
        .arg("sh")
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "nix-store --dump {} failed", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// A derivation built with busybox only: `script` runs with `$out` set.
/// What [`NixStore::build_cache`] built.
pub struct Built {
    pub outs: Vec<String>,
    /// The published output.
    pub top: String,
    /// Its closure, as [`NixStore::layer_closure`] gives it.
    pub closure: Vec<(String, bool)>,
}

impl Built {
    /// The output whose name ends in `suffix`.
    pub fn find(&self, suffix: &str) -> String {
        self.outs
            .iter()
            .find(|o| o.ends_with(suffix))
            .unwrap_or_else(|| panic!("no output *{suffix} in {:?}", self.outs))
            .clone()
    }
}

/// A store path `tool` holding busybox at `bin/busybox`: the userland of
/// most test images.
pub fn busybox_tool() -> String {
    derivation("tool", "b mkdir -p $out/bin; b cp /bin/busybox $out/bin/busybox", &[])
}

pub fn derivation(name: &str, script: &str, deps: &[&str]) -> String {
    format!(
        r#"derivation {{
  name = "{name}";
  system = "x86_64-linux";
  builder = "/bin/sh";
  args = [ "-c" ''b() {{ /bin/busybox "$@"; }}; {script}'' ];
  deps = [ {} ];
}}"#,
        deps.join(" ")
    )
}

/// Our binary copied to `dir/cli`, where the build sandbox can see it (with
/// the host's libraries).
pub fn copy_cli(dir: &Path) -> PathBuf {
    let cli = dir.join("cli");
    std::fs::copy(super::DAEMON, &cli).unwrap();
    cli
}

/// A closure: busybox (`-tool`), a path (`-data`) with a 3 MiB random file
/// `share/big`, small files `share/deep/{a,b}` and a symlink, and a top path
/// referring to both; returns the top path.
pub fn mixed_closure(nix: &NixStore) -> String {
    let expr = format!(
        "rec {{ tool = {}; data = {}; top = {}; }}",
        busybox_tool(),
        derivation(
            "data",
            "b mkdir -p $out/share/deep; b dd if=/dev/urandom of=$out/share/big bs=64k count=48 2>/dev/null; \
             b printf 'small one\\n' > $out/share/deep/a; b printf 'small two\\n' > $out/share/deep/b; \
             b ln -s deep/a $out/share/link",
            &[]
        ),
        derivation(
            "top",
            "b mkdir $out; b echo ${tool} ${data} > $out/refs",
            &["tool", "data"]
        ),
    );
    let outs = nix.build(&expr);
    outs.into_iter().find(|o| o.ends_with("-top")).unwrap()
}
