//! An unprivileged user made for one test, and the rootless stack it runs
//! through our subcommands: containerd under rootlesskit
//! (`nix-snapshotter rootless containerd`) and our daemon joined to its
//! namespaces (`nix-snapshotter --rootless`). On Drop every process of the
//! user is killed (their namespaces, mounts included, go with them), the
//! user is deleted and its directories removed.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use super::{stop_child, unique, wait_until, TempRoot, DAEMON};

pub struct RootlessUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    /// `$XDG_RUNTIME_DIR` (mode 0700, the user's).
    pub run: PathBuf,
    /// Our binary, copied where the user may run it.
    pub bin: PathBuf,
    pub dir: TempRoot,
}

fn sh(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn id_of(flag: &str, name: &str) -> u32 {
    String::from_utf8_lossy(&sh(Command::new("id").args([flag, name])).stdout)
        .trim()
        .parse()
        .unwrap()
}

impl RootlessUser {
    /// A new regular user (useradd gives it subordinate ids, as on any
    /// Debian install) with a home and a runtime directory under /tmp.
    pub fn create(tag: &str) -> RootlessUser {
        let dir = TempRoot::new(tag);
        std::fs::set_permissions(&dir.path, std::fs::Permissions::from_mode(0o755)).unwrap();
        // Short and unique: user names are at most 32 bytes.
        let name = format!("nst{}", unique("").replace('-', ""));
        let home = dir.join("home");
        sh(Command::new("useradd")
            .args(["--no-create-home", "--shell", "/bin/sh", "--home-dir"])
            .arg(&home)
            .arg(&name));
        let (uid, gid) = (id_of("-u", &name), id_of("-g", &name));
        let run = dir.join("run");
        for d in [&home, &run] {
            std::fs::create_dir_all(d).unwrap();
            std::os::unix::fs::chown(d, Some(uid), Some(gid)).unwrap();
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).unwrap();
        }
        let bin = dir.join("nix-snapshotter");
        std::fs::copy(DAEMON, &bin).unwrap();
        let user = RootlessUser {
            name,
            uid,
            gid,
            home,
            run,
            bin,
            dir,
        };
        assert!(
            user.sub_ids("/etc/subuid").is_some(),
            "useradd gave {} no subordinate ids",
            user.name
        );
        user
    }

    /// The user's first subordinate id range in `file` (start, count).
    pub fn sub_ids(&self, file: &str) -> Option<(u32, u32)> {
        std::fs::read_to_string(file).ok()?.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() == 3 && (f[0] == self.name || f[0] == self.uid.to_string()))
                .then(|| (f[1].parse().unwrap(), f[2].parse().unwrap()))
        })
    }

    /// The login environment a session manager would give the user.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("HOME".into(), self.home.display().to_string()),
            ("USER".into(), self.name.clone()),
            ("LOGNAME".into(), self.name.clone()),
            ("XDG_RUNTIME_DIR".into(), self.run.display().to_string()),
            ("PATH".into(), "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin".into()),
        ]
    }

    /// `program args` as the user, with only [`RootlessUser::env`] (plus `extra`).
    pub fn command(&self, program: &Path, args: &[&str], extra: &[(&str, &str)]) -> Command {
        let mut c = Command::new("setpriv");
        c.arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={}", self.gid))
            .arg("--init-groups")
            .arg("env")
            .arg("-i");
        for (k, v) in self.env() {
            c.arg(format!("{k}={v}"));
        }
        for (k, v) in extra {
            c.arg(format!("{k}={v}"));
        }
        c.arg(program).args(args);
        c
    }

    /// As [`RootlessUser::command`], in a mount namespace of its own whose
    /// `/dev/fuse` is a node of mode `fuse_mode` (these machines have 0600;
    /// a stock Debian install 0666): the host's device is left alone.
    pub fn command_with_fuse(&self, fuse_mode: u32, program: &Path, args: &[&str], extra: &[(&str, &str)]) -> Command {
        self.command_in_namespace(fuse_mode, "", program, args, extra)
    }

    /// As [`RootlessUser::command_with_fuse`], after running the shell
    /// `setup` as root in that mount namespace (to bind something over a
    /// host file for this command alone).
    pub fn command_in_namespace(
        &self,
        fuse_mode: u32,
        setup: &str,
        program: &Path,
        args: &[&str],
        extra: &[(&str, &str)],
    ) -> Command {
        let devs = self.dir.join("devs");
        std::fs::create_dir_all(&devs).unwrap();
        let inner = self.command(program, args, extra);
        let mut line = String::from("exec");
        for a in std::iter::once(inner.get_program()).chain(inner.get_args()) {
            line.push_str(&format!(" '{}'", a.to_string_lossy().replace('\'', "'\\''")));
        }
        let mut c = Command::new("unshare");
        c.args(["--mount", "--propagation", "slave", "sh", "-ec"]).arg(format!(
            "mount -t tmpfs -o mode=0755 devs '{d}'; mknod -m {fuse_mode:o} '{d}/fuse' c 10 229; \
             mount --bind '{d}/fuse' /dev/fuse; {setup}\n{line}",
            d = devs.display()
        ));
        c
    }

    /// Runs our binary as the user; (success, stdout, stderr).
    pub fn run_ours(&self, args: &[&str], extra: &[(&str, &str)]) -> (bool, String, String) {
        let out = self.command(&self.bin, args, extra).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Files under the user's directories that the host sees as root's.
    pub fn owned_by_root(&self) -> Vec<PathBuf> {
        let mut found = Vec::new();
        let mut stack = vec![self.home.clone(), self.run.clone()];
        while let Some(p) = stack.pop() {
            let Ok(meta) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if std::os::unix::fs::MetadataExt::uid(&meta) == 0 {
                found.push(p.clone());
            }
            if meta.is_dir() {
                for e in std::fs::read_dir(&p).into_iter().flatten().flatten() {
                    stack.push(e.path());
                }
            }
        }
        found
    }

    /// Files anywhere on the host's filesystems owned by the user or its
    /// subordinate ids, outside its directories.
    pub fn written_elsewhere(&self) -> Vec<String> {
        let (start, count) = self.sub_ids("/etc/subuid").unwrap();
        let mut found = Vec::new();
        for fs in ["/", "/dev/shm", "/run"] {
            let out = Command::new("find")
                .args([fs, "-xdev", "("])
                .args(["-uid", &self.uid.to_string(), "-o", "("])
                .args([
                    "-uid",
                    &format!("+{}", start - 1),
                    "-uid",
                    &format!("-{}", start + count),
                    "))",
                ])
                .args(["-print"])
                .stderr(Stdio::null())
                .output()
                .unwrap();
            found.extend(
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter(|l| !Path::new(l).starts_with(&self.dir.path))
                    .map(String::from),
            );
        }
        found.sort();
        found.dedup();
        found
    }

    /// Command lines of the user's processes.
    pub fn processes(&self) -> Vec<String> {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_str().is_some_and(|n| n.parse::<u32>().is_ok()))
            .filter(|e| std::fs::metadata(e.path()).is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == self.uid))
            .map(|e| {
                std::fs::read_to_string(e.path().join("cmdline"))
                    .unwrap_or_default()
                    .replace('\0', " ")
            })
            .collect()
    }

    fn kill_all(&self) {
        for _ in 0..50 {
            let _ = Command::new("pkill")
                .args(["-KILL", "-U", &self.uid.to_string()])
                .status();
            let left = Command::new("pgrep").args(["-U", &self.uid.to_string()]).output();
            if left.is_ok_and(|o| o.stdout.is_empty()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for RootlessUser {
    fn drop(&mut self) {
        self.kill_all();
        let _ = Command::new("userdel").arg(&self.name).output();
        // userdel keeps /etc/sub[ug]id entries on some versions.
        for file in ["/etc/subuid", "/etc/subgid"] {
            if let Ok(text) = std::fs::read_to_string(file) {
                let kept: String = text
                    .lines()
                    .filter(|l| l.split(':').next() != Some(self.name.as_str()))
                    .map(|l| format!("{l}\n"))
                    .collect();
                if kept != text {
                    let _ = std::fs::write(file, kept);
                }
            }
        }
        // TempRoot (dropped next) removes the directories.
    }
}

/// Rootless containerd and our daemon, both run by `user` through our
/// subcommands, with rootlesskit on the host's network (the test's cache
/// is on 127.0.0.1).
/// How a stack starts its daemon (as the user): program, arguments and
/// environment beyond the user's.
#[derive(Clone)]
pub struct DaemonCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

pub struct RootlessStack<'a> {
    pub user: &'a RootlessUser,
    pub daemon_command: DaemonCommand,
    pub containerd: Child,
    pub containerd_log: PathBuf,
    pub daemon: Option<Child>,
    pub daemon_log: PathBuf,
    pub namespace: String,
}

impl<'a> RootlessStack<'a> {
    /// `nix-snapshotter rootless containerd --net host`, in a mount
    /// namespace whose /dev/fuse is 0666; waits for containerd's socket.
    pub fn start(user: &'a RootlessUser) -> RootlessStack<'a> {
        let containerd = user.command_with_fuse(
            0o666,
            &user.bin,
            &[
                "rootless",
                "containerd",
                "--net",
                "host",
                "--containerd",
                "/usr/bin/containerd",
            ],
            &[],
        );
        let daemon = DaemonCommand {
            program: user.bin.clone(),
            args: vec!["--rootless".into(), "--log-level".into(), "debug".into()],
            env: vec![],
        };
        Self::start_with(user, containerd, daemon)
    }

    /// A stack from the given commands (a unit's, say): `containerd` must
    /// run rootless containerd as the user.
    pub fn start_with(
        user: &'a RootlessUser,
        mut containerd: Command,
        daemon_command: DaemonCommand,
    ) -> RootlessStack<'a> {
        let containerd_log = user.dir.join("containerd.log");
        let log = std::fs::File::create(&containerd_log).unwrap();
        let containerd = containerd.stdout(log.try_clone().unwrap()).stderr(log).spawn().unwrap();
        let mut s = RootlessStack {
            user,
            daemon_command,
            containerd,
            containerd_log,
            daemon: None,
            daemon_log: user.dir.join("daemon.log"),
            namespace: unique("rl"),
        };
        let sock = user.run.join("containerd/containerd.sock");
        let log = s.containerd_log.clone();
        let child = &mut s.containerd;
        wait_until(
            Duration::from_secs(30),
            || std::os::unix::net::UnixStream::connect(&sock).is_ok() || child.try_wait().unwrap().is_some(),
            || {
                format!(
                    "rootless containerd did not start:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            },
        );
        assert!(
            s.containerd.try_wait().unwrap().is_none(),
            "rootless containerd exited:\n{}",
            s.containerd_text()
        );
        s.start_daemon();
        s
    }

    pub fn containerd_text(&self) -> String {
        std::fs::read_to_string(&self.containerd_log).unwrap_or_default()
    }

    pub fn daemon_text(&self) -> String {
        std::fs::read_to_string(&self.daemon_log).unwrap_or_default()
    }

    /// `nix-snapshotter --rootless` with the user's defaults (its config
    /// file under `$XDG_CONFIG_HOME`); waits for its socket.
    pub fn start_daemon(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.daemon_log)
            .unwrap();
        let d = &self.daemon_command;
        let args: Vec<&str> = d.args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = d.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut child = self
            .user
            .command(&d.program, &args, &env)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let sock = self.user.run.join("nix-snapshotter/nix-snapshotter.sock");
        super::wait_for_socket(&sock, Duration::from_secs(30), &mut child, &self.daemon_log);
        self.daemon = Some(child);
    }

    /// Waits until containerd has reconnected to a restarted daemon (it
    /// retries with backoff).
    pub fn wait_reconnected(&self) {
        wait_until(
            Duration::from_secs(30),
            || self.ctr(&["snapshots", "--snapshotter", "nix", "ls"]).status.success(),
            || "containerd did not reconnect to the restarted daemon".into(),
        );
    }

    /// Stops rootless containerd (SIGTERM to rootlesskit); returns how the
    /// daemon, left without the namespace it joined, ended.
    pub fn stop_containerd_and_wait_daemon(&mut self) -> std::process::ExitStatus {
        stop_child(&mut self.containerd, Duration::from_secs(10));
        let mut child = self.daemon.take().expect("daemon running");
        let mut status = None;
        wait_until(
            Duration::from_secs(20),
            || {
                status = child.try_wait().unwrap();
                status.is_some()
            },
            || "the daemon outlived rootless containerd".into(),
        );
        status.unwrap()
    }

    /// SIGTERM to the daemon; it must stop cleanly.
    pub fn stop_daemon(&mut self) {
        let mut child = self.daemon.take().expect("daemon running");
        let status = stop_child(&mut child, Duration::from_secs(10));
        assert!(
            status.is_some_and(|s| s.success()),
            "daemon did not stop cleanly: {status:?}\n{}",
            self.daemon_text()
        );
    }

    /// rootlesskit's child: the namespaces containerd runs in.
    pub fn child_pid(&self) -> String {
        std::fs::read_to_string(self.user.run.join("containerd-rootless/child_pid"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// `ctr` as the user inside containerd's namespaces (the client mounts
    /// snapshots itself, so it must see the same mounts).
    pub fn ctr(&self, args: &[&str]) -> Output {
        let pid = self.child_pid();
        let sock = self.user.run.join("containerd/containerd.sock");
        let mut full = vec![
            "-U",
            "--preserve-credentials",
            "-m",
            "-t",
            &pid,
            "ctr",
            "--address",
            sock.to_str().unwrap(),
            "-n",
            &self.namespace,
        ];
        full.extend_from_slice(args);
        self.user
            .command(Path::new("/usr/bin/nsenter"), &full, &[])
            .output()
            .unwrap()
    }

    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {args:?}: {}\n--- daemon:\n{}\n--- containerd:\n{}",
            String::from_utf8_lossy(&out.stderr),
            super::tail(&self.daemon_text(), 30),
            super::tail(&self.containerd_text(), 15)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ctr run` with the options rootless needs before `rest`: FIFOs in the
    /// user's runtime directory (rootlesskit's /run links the host's
    /// /run/containerd, root's), and on cgroup v1 no cgroup and no limits.
    pub fn run(&self, rest: &[&str]) -> String {
        let fifos = self.user.run.join("containerd/fifo");
        let mut args = vec![
            "run",
            "--snapshotter",
            "nix",
            "--fifo-dir",
            fifos.to_str().unwrap(),
            "--cgroup",
            "",
            "--cpu-shares",
            "0",
        ];
        args.extend_from_slice(rest);
        self.ctr_ok(&args)
    }
}

impl Drop for RootlessStack<'_> {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            stop_child(&mut d, Duration::from_secs(5));
        }
        stop_child(&mut self.containerd, Duration::from_secs(5));
    }
}
