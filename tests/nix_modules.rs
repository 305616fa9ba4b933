//! The NixOS and Home Manager modules, evaluated by real Nix against a
//! stand-in for the parts of nixpkgs they use (tests/nix/mock-*.nix), with
//! every option of ours set. The units they render are checked, then run
//! on this Debian machine without systemd: their `ExecStart` lines (store
//! paths mapped into the test's chroot store, whose packages link Debian's
//! programs) start the daemon, rootless containerd and the rootless daemon
//! as a new user, and load an image that then runs.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::http::Server;
use common::nix::{copy_cli, NixStore};
use common::rootless::{DaemonCommand, RootlessStack, RootlessUser};
use common::{unique, Containerd, TempRoot};

/// A unit file: (section, key) → values, in order.
struct Unit(BTreeMap<(String, String), Vec<String>>);

impl Unit {
    fn read(path: &Path) -> Unit {
        let text = std::fs::read_to_string(path).unwrap();
        let mut map: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
        let mut section = String::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = s.to_string();
            } else {
                let (k, v) = line
                    .split_once('=')
                    .unwrap_or_else(|| panic!("{}: {line:?}", path.display()));
                map.entry((section.clone(), k.to_string()))
                    .or_default()
                    .push(v.to_string());
            }
        }
        Unit(map)
    }

    fn all(&self, section: &str, key: &str) -> Vec<String> {
        self.0.get(&(section.into(), key.into())).cloned().unwrap_or_default()
    }

    fn one(&self, section: &str, key: &str) -> String {
        let v = self.all(section, key);
        assert_eq!(v.len(), 1, "[{section}] {key}: {v:?}");
        v[0].clone()
    }
}

/// Built units and their store.
struct Rendered {
    nix: NixStore,
    out: PathBuf,
}

impl Rendered {
    fn unit(&self, name: &str) -> Unit {
        Unit::read(&self.out.join(name))
    }

    fn file(&self, name: &str) -> String {
        std::fs::read_to_string(self.out.join(name)).unwrap()
    }

    /// `s` with store paths where they physically are.
    fn mapped(&self, s: &str) -> String {
        s.replace("/nix/store/", &format!("{}/nix/store/", self.nix.root.display()))
    }

    /// An ExecStart (or Environment) line split as systemd does (words,
    /// single quotes), store paths mapped, `%t` as `runtime`.
    fn words(&self, line: &str, runtime: &Path) -> Vec<String> {
        let line = self.mapped(line).replace("%t", runtime.to_str().unwrap());
        let (mut words, mut cur, mut quoted, mut any) = (Vec::new(), String::new(), false, false);
        for c in line.chars() {
            match c {
                '\'' => {
                    quoted = !quoted;
                    any = true;
                }
                ' ' if !quoted => {
                    if any || !cur.is_empty() {
                        words.push(std::mem::take(&mut cur));
                    }
                    any = false;
                }
                c => cur.push(c),
            }
        }
        if any || !cur.is_empty() {
            words.push(cur);
        }
        words
    }

    /// `KEY=value` pairs of a unit's Environment lines.
    fn env(&self, unit: &Unit, runtime: &Path) -> Vec<(String, String)> {
        unit.all("Service", "Environment")
            .iter()
            .map(|l| {
                let l = self.mapped(l).replace("%t", runtime.to_str().unwrap());
                let (k, v) = l.split_once('=').unwrap();
                (k.to_string(), v.to_string())
            })
            .collect()
    }
}

/// Builds tests/nix/modules-test.nix; the hello package the preloaded image
/// runs is published to `cache_dir`, served at `cache_url`.
fn render(tmp: &TempRoot, cache_dir: &Path, cache_url: &str) -> Rendered {
    let nix = NixStore::new(&tmp.join("nix"), "modules-1");
    let cli = copy_cli(&tmp.path);
    let state = tmp.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let out = nix.build_test_expr(
        &cli,
        "modules-test.nix",
        &[
            "--argstr",
            "tmp",
            state.to_str().unwrap(),
            "--argstr",
            "cache",
            cache_url,
            "--argstr",
            "key",
            &nix.public_key,
        ],
    );
    let out = nix.real(String::from_utf8_lossy(&out.stdout).trim());
    let image = std::fs::read_to_string(out.join("image")).unwrap();
    nix.publish(cache_dir, "zstd", &[image]);
    Rendered { nix, out }
}

#[test]
fn the_nixos_module_renders_units_that_run_and_a_containerd_config_that_loads() {
    let tmp = TempRoot::new("nixosmod");
    let cache = tmp.join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    let server = Server::start(cache.clone());
    let r = render(&tmp, &cache, &server.url());

    // The daemon's unit: notify, the fd store, before containerd, our flags.
    let unit = r.unit("nixos/nix-snapshotter.service");
    assert_eq!(unit.one("Service", "Type"), "notify");
    assert_eq!(unit.one("Service", "FileDescriptorStoreMax"), "16");
    assert_eq!(unit.one("Install", "RequiredBy"), "containerd.service");
    let exec = r.words(&unit.one("Service", "ExecStart"), Path::new("/run"));
    assert!(exec[0].ends_with("/bin/nix-snapshotter"), "{exec:?}");
    assert_eq!(&exec[exec.len() - 2..], ["--log-level", "debug"]);

    // containerd's settings: containerd itself accepts them.
    assert_eq!(r.file("nixos/containerd-enabled"), "true");
    let toml = tmp.join("containerd.toml");
    std::fs::write(&toml, r.file("nixos/containerd.toml")).unwrap();
    let dump = Command::new("containerd")
        .arg("--config")
        .arg(&toml)
        .args(["config", "dump"])
        .output()
        .unwrap();
    assert!(dump.status.success(), "{}", String::from_utf8_lossy(&dump.stderr));
    let dump = String::from_utf8_lossy(&dump.stdout);
    for want in [
        "[proxy_plugins.nix]",
        &format!("address = \"{}\"", tmp.join("state/nix.sock").display()),
        "snapshotter = \"nix\"",
        "disable_snapshot_annotations = false",
    ] {
        assert!(dump.contains(want), "{want:?} not in containerd's view:\n{dump}");
    }
    // For the Transfer service of containerd >= 1.7 (1.6 ignores it).
    assert!(r.file("nixos/containerd.toml").contains(
        "[[plugins.\"io.containerd.transfer.v1.local\".unpack_config]]\nplatform = \"linux/amd64\"\nsnapshotter = \"nix\""
    ));

    // The login shell's lines: CONTAINERD_SNAPSHOTTER only when unset.
    let init = tmp.join("init.sh");
    std::fs::write(&init, r.file("nixos/extra-init.sh")).unwrap();
    let shell = |preset: &str| {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("{preset} . {}; echo $CONTAINERD_SNAPSHOTTER", init.display()))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(shell(""), "nix");
    assert_eq!(shell("CONTAINERD_SNAPSHOTTER=overlayfs;"), "overlayfs");

    // Run the unit's command, then the preload unit's against a containerd
    // using it: the preloaded image runs, its store path from the cache.
    let log = std::fs::File::create(tmp.join("daemon.log")).unwrap();
    let mut daemon = Command::new(&exec[0])
        .args(&exec[1..])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let sock = tmp.join("state/nix.sock");
    common::wait_for_socket(
        &sock,
        std::time::Duration::from_secs(20),
        &mut daemon,
        &tmp.join("daemon.log"),
    );
    let ctrd = Containerd::start(&tmp.join("ctrd"), &sock);
    let preload = r.unit("nixos/preload-containerd-images.service");
    assert_eq!(preload.one("Service", "Type"), "oneshot");
    let mut names = Vec::new();
    for line in preload.all("Service", "ExecStart") {
        let w = r.words(&line, Path::new("/run"));
        let out = Command::new(&w[0])
            .args(&w[1..])
            .env("CONTAINERD_ADDRESS", &ctrd.address)
            .output()
            .unwrap();
        assert!(out.status.success(), "{line}: {}", String::from_utf8_lossy(&out.stderr));
        names.push(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    assert_eq!(names.len(), 1);
    let out = Command::new("ctr")
        .arg("--address")
        .arg(&ctrd.address)
        .args(["-n", "default", "run", "--rm", "--snapshotter", "nix", &names[0]])
        .arg(unique("c"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from buildImage\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = Command::new("ctr")
        .arg("--address")
        .arg(&ctrd.address)
        .args(["-n", "default", "images", "rm", &names[0]])
        .output();
    drop(ctrd);
    let status = common::stop_child(&mut daemon, std::time::Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}

#[test]
fn the_home_manager_units_run_rootless_containerd_and_the_daemon_as_a_new_user() {
    let tmp = TempRoot::new("homemod");
    let cache = tmp.join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    let server = Server::start(cache.clone());
    let r = render(&tmp, &cache, &server.url());
    let user = RootlessUser::create("homemod");

    // Both rootless variants (Home Manager's and NixOS's user units) run
    // the same commands.
    for name in ["containerd.service", "nix-snapshotter.service"] {
        assert_eq!(
            r.unit(&format!("home/{name}")).all("Service", "ExecStart").len(),
            1,
            "{name}"
        );
        assert_eq!(
            r.unit(&format!("nixos/user/{name}")).one("Service", "Type"),
            "notify",
            "{name}"
        );
    }
    let ctrd_unit = r.unit("home/containerd.service");
    let daemon_unit = r.unit("home/nix-snapshotter.service");
    assert_eq!(daemon_unit.all("Unit", "PartOf"), ["containerd.service"]);
    assert_eq!(daemon_unit.all("Unit", "After"), ["containerd.service"]);

    // containerd's unit as the user would have it run: its own network
    // namespace through slirp4netns (/dev/net/tun and /dev/fuse 0666, as on
    // a stock Debian install).
    let exec = r.words(&ctrd_unit.one("Service", "ExecStart"), &user.run);
    assert!(
        exec.contains(&"rootless".to_string()) && exec.contains(&"slirp4netns".to_string()),
        "{exec:?}"
    );
    let env: Vec<(String, String)> = r.env(&ctrd_unit, &user.run);
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let args: Vec<&str> = exec[1..].iter().map(String::as_str).collect();
    let containerd = user.command_in_namespace(
        0o666,
        &format!(
            "mknod -m 666 '{d}/tun' c 10 200; mount --bind '{d}/tun' /dev/net/tun",
            d = user.dir.join("devs").display()
        ),
        Path::new(&exec[0]),
        &args,
        &env_refs,
    );
    let dexec = r.words(&daemon_unit.one("Service", "ExecStart"), &user.run);
    assert!(dexec.contains(&"--rootless".to_string()), "{dexec:?}");
    let daemon = DaemonCommand {
        program: dexec[0].clone().into(),
        args: dexec[1..].to_vec(),
        env: r.env(&daemon_unit, &user.run),
    };
    let s = RootlessStack::start_with(&user, containerd, daemon);
    // The extra settings reached containerd's configuration.
    let written = std::fs::read_to_string(user.run.join("nix-snapshotter/containerd.toml")).unwrap();
    assert!(written.contains("level = \"info\""), "{written}");

    // The preload unit loads the image (CONTAINERD_ADDRESS from %t), and
    // the image runs, lazily fetched by the rootless daemon.
    let preload = r.unit("home/preload-containerd-images.service");
    let penv = r.env(&preload, &user.run);
    assert_eq!(
        penv,
        [(
            "CONTAINERD_ADDRESS".to_string(),
            user.run.join("containerd/containerd.sock").display().to_string()
        )]
    );
    let mut names = Vec::new();
    for line in preload.all("Service", "ExecStart") {
        let w = r.words(&line, &user.run);
        let args: Vec<&str> = w[1..].iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = penv.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let out = user.command(Path::new(&w[0]), &args, &env).output().unwrap();
        assert!(out.status.success(), "{line}: {}", String::from_utf8_lossy(&out.stderr));
        names.push(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    assert_eq!(names.len(), 1);
    let mut s = s;
    s.namespace = "default".into();
    assert_eq!(s.run(&["--rm", &names[0], &unique("c")]), "hello from buildImage\n");

    // The session's CONTAINERD_ADDRESS is that socket.
    let vars = tmp.join("vars.sh");
    std::fs::write(&vars, r.file("home/session-variables.sh")).unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(". {}; echo $CONTAINERD_ADDRESS", vars.display()))
        .env("XDG_RUNTIME_DIR", &user.run)
        .env_remove("CONTAINERD_ADDRESS")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        user.run.join("containerd/containerd.sock").display().to_string()
    );
}
