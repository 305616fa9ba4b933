//! Rootless operation: containerd under rootlesskit, and our daemon joined
//! to the namespaces rootlesskit made, both as an unprivileged user with no
//! nix-daemon. The FUSE store and the overlays are then mounted by the
//! user namespace's root, invisible on the host.
//!
//! Layout (the Go project's, so its users' set-ups carry over):
//! - rootlesskit's state, with `child_pid`: `$XDG_RUNTIME_DIR/containerd-rootless`
//! - containerd: socket `$XDG_RUNTIME_DIR/containerd/containerd.sock`, state
//!   `$XDG_RUNTIME_DIR/containerd`, root `$XDG_DATA_HOME/containerd`
//! - us: socket `$XDG_RUNTIME_DIR/nix-snapshotter/nix-snapshotter.sock`, root
//!   `$XDG_DATA_HOME/containerd/io.containerd.snapshotter.v1.nix`, config
//!   `$XDG_CONFIG_HOME/nix-snapshotter/config.toml`
//!
//! `$XDG_DATA_HOME` and `$XDG_CONFIG_HOME` fall back to `~/.local/share` and
//! `~/.config` when unset (as under a bare systemd user manager).

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum RootlessError {
    #[error("XDG_RUNTIME_DIR is not set: log in through a session that sets it (systemd-logind), or set it to a directory only you can use (mode 0700)")]
    NoRuntimeDir,
    #[error("neither {var} nor HOME is set: cannot tell where your data goes")]
    NoHome { var: &'static str },
    #[error("{program} was not found on PATH: install Debian's {package} package")]
    Missing {
        program: &'static str,
        package: &'static str,
    },
    #[error("user {user} has no subordinate {kind} ids in {file}: add a range (for example `{user}:100000:65536`) with usermod --add-sub{kind}s")]
    NoSubIds {
        user: String,
        kind: &'static str,
        file: &'static str,
    },
    #[error("unprivileged user namespaces are off ({setting} = {value}): enable them with sysctl")]
    NoUserNamespaces { setting: &'static str, value: String },
    #[error("this machine refuses you a user namespace ({0}): rootless containers need one")]
    UserNamespaceRefused(String),
    #[error("cannot open /dev/fuse for reading and writing: {0} (a rootless FUSE store needs it usable by every user, mode 0666, as a stock Debian install has it)")]
    Fuse(std::io::Error),
    #[error(
        "rootless containerd is not running: {path}: {source} (start it with `nix-snapshotter rootless containerd`)"
    )]
    NoChild { path: PathBuf, source: std::io::Error },
    #[error("cannot join the {ns} namespace of process {pid}: {source}")]
    Join {
        ns: &'static str,
        pid: i32,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

type Result<T> = std::result::Result<T, RootlessError>;

/// The user's directories, resolved once.
#[derive(Debug, Clone)]
pub struct Dirs {
    pub runtime: PathBuf,
    pub data: PathBuf,
    pub config: PathBuf,
}

impl Dirs {
    pub fn from_env() -> Result<Dirs> {
        Self::from(|k| std::env::var_os(k))
    }

    /// From the variables `var` gives (testable without touching the
    /// process environment). Empty values count as unset.
    pub fn from(var: impl Fn(&str) -> Option<OsString>) -> Result<Dirs> {
        let get = |k: &str| var(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        let runtime = get("XDG_RUNTIME_DIR").ok_or(RootlessError::NoRuntimeDir)?;
        let home = get("HOME");
        let under_home = |var: &'static str, rel: &str| {
            get(var)
                .or_else(|| home.as_ref().map(|h| h.join(rel)))
                .ok_or(RootlessError::NoHome { var })
        };
        Ok(Dirs {
            runtime,
            data: under_home("XDG_DATA_HOME", ".local/share")?,
            config: under_home("XDG_CONFIG_HOME", ".config")?,
        })
    }

    /// rootlesskit's state directory (`child_pid`, its API socket).
    pub fn rootlesskit_state(&self) -> PathBuf {
        self.runtime.join("containerd-rootless")
    }

    pub fn containerd_address(&self) -> PathBuf {
        self.runtime.join("containerd/containerd.sock")
    }

    pub fn address(&self) -> PathBuf {
        self.runtime.join("nix-snapshotter/nix-snapshotter.sock")
    }

    pub fn root(&self) -> PathBuf {
        self.data.join("containerd/io.containerd.snapshotter.v1.nix")
    }

    pub fn config_file(&self) -> PathBuf {
        self.config.join("nix-snapshotter/config.toml")
    }
}

/// What a rootless set-up needs from the host, each checked as a new user
/// would meet it, the first missing one named with its fix.
pub fn check_prerequisites(user: &str, needs_slirp: bool) -> Result<()> {
    for (program, package) in [
        ("rootlesskit", "rootlesskit"),
        ("newuidmap", "uidmap"),
        ("newgidmap", "uidmap"),
    ] {
        if which(program).is_none() {
            return Err(RootlessError::Missing { program, package });
        }
    }
    if needs_slirp && which("slirp4netns").is_none() {
        return Err(RootlessError::Missing {
            program: "slirp4netns",
            package: "slirp4netns",
        });
    }
    for (kind, file) in [("uid", "/etc/subuid"), ("gid", "/etc/subgid")] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if !has_sub_ids(&text, user, &uid_string()) {
            return Err(RootlessError::NoSubIds {
                user: user.to_string(),
                kind,
                file,
            });
        }
    }
    check_user_namespaces(|p| std::fs::read_to_string(p).ok())?;
    try_user_namespace()?;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(RootlessError::Fuse)?;
    Ok(())
}

/// Whether `/etc/sub[ug]id` text gives `user` (by name or uid) a range.
fn has_sub_ids(text: &str, user: &str, uid: &str) -> bool {
    text.lines().any(|l| {
        let mut f = l.trim().split(':');
        let (who, count) = (f.next(), f.nth(1));
        (who == Some(user) || who == Some(uid)) && count.and_then(|c| c.trim().parse::<u64>().ok()).unwrap_or(0) > 0
    })
}

/// Unprivileged user namespaces: Debian's own switch (older kernels) and
/// the namespace count limit.
fn check_user_namespaces(read: impl Fn(&str) -> Option<String>) -> Result<()> {
    for (setting, path) in [
        (
            "kernel.unprivileged_userns_clone",
            "/proc/sys/kernel/unprivileged_userns_clone",
        ),
        ("user.max_user_namespaces", "/proc/sys/user/max_user_namespaces"),
    ] {
        if let Some(v) = read(path) {
            if v.trim() == "0" {
                return Err(RootlessError::NoUserNamespaces {
                    setting,
                    value: v.trim().to_string(),
                });
            }
        }
    }
    Ok(())
}

/// Makes a user namespace for real (an LSM or a container runtime may
/// refuse one whatever the sysctls say).
fn try_user_namespace() -> Result<()> {
    let out = Command::new("unshare")
        .args(["--user", "--map-root-user", "true"])
        .output()
        .map_err(|source| RootlessError::Io {
            path: "unshare".into(),
            source,
        })?;
    if out.status.success() {
        return Ok(());
    }
    Err(RootlessError::UserNamespaceRefused(
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    ))
}

fn uid_string() -> String {
    rustix::process::getuid().as_raw().to_string()
}

/// The login name of this process's user (for `/etc/subuid`).
pub fn user_name() -> String {
    let uid = uid_string();
    std::fs::read_to_string("/etc/passwd")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 2 && f[2] == uid).then(|| f[0].to_string())
        })
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or(uid)
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(program)).find(|c| c.is_file()))
}

/// How rootless containerd reaches the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Net {
    /// Its own network namespace through slirp4netns (the Go project's default).
    Slirp4netns,
    /// The host's network (no namespace; 127.0.0.1 is the host's).
    Host,
}

/// containerd's configuration for a rootless instance using us as `nix`,
/// with `extra` (TOML, the admin's) merged over it: tables key by key,
/// anything else replaced.
pub fn containerd_config(dirs: &Dirs, extra: Option<(&Path, &str)>) -> Result<String> {
    let base = format!(
        r#"version = 2
root = "{root}"
state = "{state}"
# No CRI: a rootless user runs no kubelet here.
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime"]

[grpc]
  address = "{address}"

[proxy_plugins.nix]
  type = "snapshot"
  address = "{nix}"

[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = "linux/{arch}"
  snapshotter = "nix"
"#,
        root = dirs.data.join("containerd").display(),
        state = dirs.runtime.join("containerd").display(),
        address = dirs.containerd_address().display(),
        nix = dirs.address().display(),
        arch = crate::image::host_arch(),
    );
    let Some((path, text)) = extra else {
        return Ok(base);
    };
    let bad = |message: String| RootlessError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, message),
    };
    let mut table: toml::Table = toml::from_str(&base).map_err(|e| bad(e.to_string()))?;
    let extra: toml::Table = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
    merge_toml(&mut table, extra);
    toml::to_string(&table).map_err(|e| bad(e.to_string()))
}

fn merge_toml(into: &mut toml::Table, from: toml::Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge_toml(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

/// Where rootless containerd's configuration comes from.
#[derive(Debug, Clone)]
pub enum ContainerdConfig {
    /// The admin's file, used as it is.
    Given(PathBuf),
    /// Ours, for the user's directories, with a file merged over it.
    Generated { extra: Option<PathBuf> },
}

/// Replaces this process with rootlesskit running containerd (`containerd`
/// binary, `config` or ours written to the runtime directory); returns
/// only on failure.
pub fn exec_containerd(dirs: &Dirs, net: Net, containerd: &Path, config: &ContainerdConfig) -> Result<()> {
    check_prerequisites(&user_name(), net == Net::Slirp4netns)?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RootlessError::Io { path, source }
    };
    let own = dirs.runtime.join("nix-snapshotter");
    std::fs::create_dir_all(&own).map_err(io(&own))?;
    let config = match config {
        ContainerdConfig::Given(c) => c.clone(),
        ContainerdConfig::Generated { extra } => {
            let text = match extra {
                Some(e) => Some((e.as_path(), std::fs::read_to_string(e).map_err(io(e))?)),
                None => None,
            };
            let c = own.join("containerd.toml");
            let rendered = containerd_config(dirs, text.as_ref().map(|(p, t)| (*p, t.as_str())))?;
            std::fs::write(&c, rendered).map_err(io(&c))?;
            c
        }
    };
    let state = dirs.rootlesskit_state();
    // A state directory left by a rootlesskit that died refuses a new one.
    if state.exists() && child_pid(dirs).is_err() {
        let _ = std::fs::remove_dir_all(&state);
    }
    let mut cmd = Command::new("rootlesskit");
    cmd.arg(format!("--state-dir={}", state.display()));
    match net {
        Net::Slirp4netns => cmd.args([
            "--net=slirp4netns",
            "--disable-host-loopback",
            "--port-driver=slirp4netns",
        ]),
        Net::Host => cmd.arg("--net=host"),
    };
    let me = std::env::current_exe().map_err(io(Path::new("/proc/self/exe")))?;
    cmd.args(["--copy-up=/etc", "--copy-up=/run", "--copy-up=/var/lib"])
        .arg(me)
        .args(["rootless", "containerd-child", "--containerd"])
        .arg(containerd)
        .arg("--containerd-config")
        .arg(&config);
    let err = cmd.exec();
    Err(RootlessError::Io {
        path: "rootlesskit".into(),
        source: err,
    })
}

/// Host entries that copy-up turned into links to the host's own (root's)
/// files, where containerd must make its own: its shim sockets always go
/// to /run/containerd/s, whatever the configuration says.
const HOST_LINKS: [&str; 4] = [
    "/run/containerd",
    "/run/xtables.lock",
    "/var/lib/containerd",
    "/etc/containerd",
];

/// Inside rootlesskit's namespaces: drops the links copy-up made to the
/// host's containerd files (they are in rootlesskit's private tmpfs; the
/// host's files are untouched), then becomes containerd. Returns only on
/// failure.
pub fn exec_child(containerd: &Path, config: &Path) -> Result<()> {
    for link in HOST_LINKS {
        let path = Path::new(link);
        if path.symlink_metadata().is_ok_and(|m| m.file_type().is_symlink()) {
            std::fs::remove_file(path).map_err(|source| RootlessError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        }
    }
    let err = Command::new(containerd).arg("--config").arg(config).exec();
    Err(RootlessError::Io {
        path: containerd.to_path_buf(),
        source: err,
    })
}

/// rootlesskit's child: the process whose namespaces containerd runs in.
pub fn child_pid(dirs: &Dirs) -> Result<i32> {
    let path = dirs.rootlesskit_state().join("child_pid");
    let text = std::fs::read_to_string(&path).map_err(|source| RootlessError::NoChild {
        path: path.clone(),
        source,
    })?;
    let pid: i32 = text.trim().parse().map_err(|_| RootlessError::NoChild {
        path: path.clone(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not a process id"),
    })?;
    if !Path::new(&format!("/proc/{pid}")).exists() {
        return Err(RootlessError::NoChild {
            path,
            source: std::io::Error::new(std::io::ErrorKind::NotFound, format!("process {pid} is gone")),
        });
    }
    Ok(pid)
}

/// Joins the user and mount namespaces of `pid`, keeping our credentials
/// (as `nsenter --preserve-credentials`). Not its network namespace: we
/// only serve a socket by path and fetch from caches, which is faster on
/// the host's network than through slirp4netns. Must run before any
/// thread starts: the kernel refuses to move a multi-threaded process into
/// a user namespace.
pub fn join(pid: i32) -> Result<()> {
    use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};
    let open = |ns: &'static str| {
        let path = format!("/proc/{pid}/ns/{ns}");
        std::fs::File::open(&path).map_err(|source| RootlessError::Join { ns, pid, source })
    };
    let same_as_ours = |ns: &str| {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).ok();
        theirs.is_some() && theirs == std::fs::read_link(format!("/proc/self/ns/{ns}")).ok()
    };
    // Both opened before moving: once in the user namespace, the host's
    // /proc entries may no longer be reachable the same way.
    let user = open("user")?;
    let mnt = open("mnt")?;
    let enter = |f: &std::fs::File, ns: &'static str, kind: LinkNameSpaceType| {
        move_into_link_name_space(std::os::fd::AsFd::as_fd(f), Some(kind)).map_err(|e| RootlessError::Join {
            ns,
            pid,
            source: e.into(),
        })
    };
    if !same_as_ours("user") {
        enter(&user, "user", LinkNameSpaceType::User)?;
    }
    enter(&mnt, "mnt", LinkNameSpaceType::Mount)
}

/// The process whose namespaces we joined, watched so that we end with it:
/// a snapshotter left in a dead containerd's namespace would keep it alive
/// and serve mounts nobody can reach; a restarted containerd needs a
/// restarted snapshotter in its new namespaces.
pub struct Lifeline {
    pid: i32,
    fd: std::os::fd::OwnedFd,
}

impl Lifeline {
    /// Opened before joining (a pidfd names the process, not a reusable id).
    pub fn open(pid: i32) -> Result<Lifeline> {
        let gone = |source: std::io::Error| RootlessError::Join { ns: "pid", pid, source };
        let raw = rustix::process::Pid::from_raw(pid).ok_or_else(|| gone(std::io::ErrorKind::InvalidInput.into()))?;
        let fd = rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty()).map_err(|e| gone(e.into()))?;
        Ok(Lifeline { pid, fd })
    }

    /// Resolves when the process has exited (needs a tokio runtime).
    pub async fn ended(self) -> String {
        // SAFETY: `self.fd` is an open pidfd that the AsyncFd takes by
        // value: nothing else can close or replace it while it is
        // registered, and OwnedFd::as_raw_fd always returns that one fd.
        match unsafe { tokio::io::unix::AsyncFd::register(self.fd) } {
            Ok(fd) => {
                // A pidfd turns readable when its process exits.
                let _ = fd.readable().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch rootless containerd; polling instead");
                while Path::new(&format!("/proc/{}", self.pid)).exists() {
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
        }
        format!(
            "rootless containerd's namespace (process {}) is gone; start the snapshotter again with the new one",
            self.pid
        )
    }
}

/// What the user should know about resource limits here, if anything:
/// an unprivileged user gets cgroups only where the host delegates one
/// (cgroup v2 with systemd's `Delegate=yes`).
pub fn cgroup_note() -> Option<String> {
    let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    if !v2 {
        return Some(
            "cgroup v1: an unprivileged user cannot be given a cgroup, so rootless containers run \
             without resource limits; run them with no cgroup and no limits \
             (ctr run --cgroup \"\" --cpu-shares 0; Kubernetes limits cannot be enforced)"
                .into(),
        );
    }
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = Path::new("/sys/fs/cgroup").join(rel.trim_start_matches('/'));
    let delegated = rustix::fs::access(dir.join("cgroup.subtree_control"), rustix::fs::Access::WRITE_OK).is_ok();
    (!delegated).then(|| {
        format!(
            "cgroup v2, but {} is not delegated to you (systemd's user@.service with Delegate=yes does it): \
             rootless containers run without resource limits",
            dir.display()
        )
    })
}

/// The user's rootless paths as shell assignments, for scripts and
/// `nsenter` (rootlesskit's child, when it runs).
pub fn env_text(dirs: &Dirs) -> String {
    let quote = |p: &Path| format!("'{}'", p.display().to_string().replace('\'', "'\\''"));
    let child = child_pid(dirs).map(|p| p.to_string()).unwrap_or_default();
    format!(
        "export CONTAINERD_ADDRESS={}\nexport NIX_SNAPSHOTTER_ADDRESS={}\nexport NIX_SNAPSHOTTER_ROOT={}\nexport NIX_SNAPSHOTTER_CONFIG={}\n\
         export ROOTLESSKIT_STATE_DIR={}\nexport ROOTLESSKIT_CHILD_PID={child}\n",
        quote(&dirs.containerd_address()),
        quote(&dirs.address()),
        quote(&dirs.root()),
        quote(&dirs.config_file()),
        quote(&dirs.rootlesskit_state()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_fall_back_to_home_and_a_missing_runtime_dir_is_named() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| OsString::from(v))
        };
        let d = Dirs::from(env(&[
            ("XDG_RUNTIME_DIR", "/run/user/1000"),
            ("HOME", "/home/a"),
            ("XDG_DATA_HOME", ""),
        ]))
        .unwrap();
        assert_eq!(d.data, Path::new("/home/a/.local/share"));
        assert_eq!(d.config, Path::new("/home/a/.config"));
        assert_eq!(
            d.address(),
            Path::new("/run/user/1000/nix-snapshotter/nix-snapshotter.sock")
        );
        assert_eq!(
            d.root(),
            Path::new("/home/a/.local/share/containerd/io.containerd.snapshotter.v1.nix")
        );
        let d = Dirs::from(env(&[
            ("XDG_RUNTIME_DIR", "/r"),
            ("XDG_DATA_HOME", "/d"),
            ("XDG_CONFIG_HOME", "/c"),
        ]))
        .unwrap();
        assert_eq!(d.config_file(), Path::new("/c/nix-snapshotter/config.toml"));
        let e = Dirs::from(env(&[("HOME", "/home/a")])).unwrap_err();
        assert!(e.to_string().contains("XDG_RUNTIME_DIR"), "{e}");
        let e = Dirs::from(env(&[("XDG_RUNTIME_DIR", "/r")])).unwrap_err();
        assert!(e.to_string().contains("XDG_DATA_HOME"), "{e}");
    }

    #[test]
    fn the_admins_containerd_settings_merge_over_ours_and_bad_ones_name_their_file() {
        let dirs = Dirs {
            runtime: "/run/user/7".into(),
            data: "/home/u/.local/share".into(),
            config: "/home/u/.config".into(),
        };
        let plain: toml::Table = toml::from_str(&containerd_config(&dirs, None).unwrap()).unwrap();
        assert_eq!(
            plain["proxy_plugins"]["nix"]["address"].as_str(),
            Some("/run/user/7/nix-snapshotter/nix-snapshotter.sock")
        );
        let extra = "[proxy_plugins.nix]\naddress = \"/elsewhere.sock\"\n[debug]\nlevel = \"debug\"\n";
        let merged: toml::Table =
            toml::from_str(&containerd_config(&dirs, Some((Path::new("/x.toml"), extra))).unwrap()).unwrap();
        assert_eq!(
            merged["proxy_plugins"]["nix"]["address"].as_str(),
            Some("/elsewhere.sock")
        );
        assert_eq!(merged["proxy_plugins"]["nix"]["type"].as_str(), Some("snapshot"));
        assert_eq!(merged["debug"]["level"].as_str(), Some("debug"));
        assert_eq!(merged["root"].as_str(), Some("/home/u/.local/share/containerd"));
        let e = containerd_config(&dirs, Some((Path::new("/x.toml"), "[broken"))).unwrap_err();
        assert!(e.to_string().contains("/x.toml"), "{e}");
    }

    #[test]
    fn sub_ids_are_found_by_name_or_uid_and_empty_ranges_do_not_count() {
        let text = "alice:100000:65536\n1001:200000:65536\nbob:300000:0\n";
        assert!(has_sub_ids(text, "alice", "1000"));
        assert!(has_sub_ids(text, "carol", "1001"));
        assert!(!has_sub_ids(text, "bob", "1002"));
        assert!(!has_sub_ids("", "alice", "1000"));
    }

    #[test]
    fn disabled_user_namespaces_are_named_with_their_setting() {
        let e = check_user_namespaces(|p| p.ends_with("max_user_namespaces").then(|| "0\n".to_string())).unwrap_err();
        assert!(e.to_string().contains("user.max_user_namespaces = 0"), "{e}");
        assert!(check_user_namespaces(|_| Some("15000".into())).is_ok());
        assert!(check_user_namespaces(|_| None).is_ok());
    }
}
