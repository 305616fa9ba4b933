//! Rootless: an unprivileged user, made by the test as any new user is
//! (subordinate ids from useradd, a stock 0666 /dev/fuse), runs containerd
//! under rootlesskit and our daemon through our subcommands, with no
//! nix-daemon and an empty store. Nix images run lazily from a signed cache
//! on 127.0.0.1, the FUSE store and the overlays living in the user's
//! namespace, invisible to the host.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::http::Server;
use common::image::{nix_layer, write_oci_archive};
use common::nix::{busybox_tool, derivation, NixStore};
use common::rootless::{RootlessStack, RootlessUser};
use common::{unique, TempRoot};
use nix_snapshotter::nixfmt::{NarInfo, StorePath};

struct Fixture {
    _dir: TempRoot,
    nix: NixStore,
    cache: PathBuf,
    tool: String,
    data: String,
    closure: Vec<(String, bool)>,
}

/// busybox, a data path and six fillers no container touches.
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = TempRoot::leaked("rlfix");
        let nix = NixStore::new(&dir.join("nix"), "rootless-1");
        let mut attrs = vec![
            format!("tool = {};", busybox_tool()),
            format!(
                "data = {};",
                derivation(
                    "data",
                    "b mkdir $out; b printf 'hello, rootless\\n' > $out/greeting",
                    &[]
                )
            ),
        ];
        let mut refs = vec!["tool".to_string(), "data".to_string()];
        for i in 0..6 {
            attrs.push(format!(
                "filler{i} = {};",
                derivation(
                    &format!("filler{i}"),
                    &format!("b mkdir $out; b echo {i} > $out/x"),
                    &[]
                )
            ));
            refs.push(format!("filler{i}"));
        }
        let expr = format!(
            "rec {{ {} top = {}; }}",
            attrs.join("\n"),
            derivation(
                "top",
                "b mkdir $out; for r in $deps; do b echo $r >> $out/refs; done",
                &refs.iter().map(String::as_str).collect::<Vec<_>>()
            ),
        );
        let built = nix.build_cache(&expr, "top", &dir.join("cache"));
        Fixture {
            cache: dir.join("cache"),
            tool: built.find("-tool"),
            data: built.find("-data"),
            closure: built.closure,
            _dir: dir,
            nix,
        }
    })
}

fn nar_downloads(server: &Server) -> Vec<String> {
    let mut v: Vec<String> = server
        .log()
        .into_iter()
        .filter(|l| l.contains("/nar/") && !l.contains("bytes="))
        .collect();
    v.sort();
    v
}

fn nar_url(store_path: &str) -> String {
    let p = StorePath::parse(store_path).unwrap();
    let text = std::fs::read_to_string(fixture().cache.join(format!("{}.narinfo", p.hash_part()))).unwrap();
    format!("GET /{}", NarInfo::parse(&text).unwrap().url)
}

/// The user's config at its default place: the test cache, no host store.
fn write_user_config(user: &RootlessUser, server: &Server) {
    let dir = user.home.join(".config/nix-snapshotter");
    let out = user
        .command(Path::new("/bin/mkdir"), &["-p", dir.to_str().unwrap()], &[])
        .output()
        .unwrap();
    assert!(out.status.success());
    let cfg = dir.join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "substituters = [\"{}\"]\ntrusted_public_keys = [\"{}\"]\nhost_store = \"\"\n[fuse]\nfetch_timeout = 20.0\n",
            server.url(),
            fixture().nix.public_key
        ),
    )
    .unwrap();
    std::os::unix::fs::chown(&cfg, Some(user.uid), Some(user.gid)).unwrap();
}

#[test]
fn an_unprivileged_user_runs_nix_images_lazily_with_no_nix_daemon() {
    let f = fixture();
    let user = RootlessUser::create("rootless");
    let server = Server::start(f.cache.clone());
    write_user_config(&user, &server);
    let mut s = RootlessStack::start(&user);

    // The user's daemon mounted its store where only the user's namespace
    // sees it; the host sees no mount of the user's.
    let host_mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !host_mounts.contains(user.dir.path.to_str().unwrap()),
        "a rootless mount leaked to the host:\n{host_mounts}"
    );

    let bb = format!("{}/bin/busybox", f.tool);
    let image = "docker.io/library/rootless-hello:latest";
    let archive = user.dir.join("hello.tar");
    write_oci_archive(
        &archive,
        image,
        &[nix_layer(&f.closure, &[("bin/sh", bb.clone())])],
        &[&bb, "sh", "-c", &format!("cat {}/greeting; id -u", f.data)],
    );
    s.ctr_ok(&["images", "import", "--snapshotter", "nix", archive.to_str().unwrap()]);

    // Cold: only the two store paths the program touches are downloaded.
    let out = s.run(&["--rm", image, &unique("c")]);
    assert_eq!(out, "hello, rootless\n0\n", "{}", s.daemon_text());
    let mut touched = vec![nar_url(&f.tool), nar_url(&f.data)];
    touched.sort();
    assert_eq!(
        nar_downloads(&server),
        touched,
        "fetched more (or less) than was touched"
    );
    // Warm: nothing more.
    assert_eq!(s.run(&["--rm", image, &unique("c")]), "hello, rootless\n0\n");
    assert_eq!(nar_downloads(&server), touched);

    // The same image through our loader, from the host, into another
    // containerd namespace (CONTAINERD_ADDRESS as a user session sets it).
    let loaded_ns = format!("{}-load", s.namespace);
    let address = user.run.join("containerd/containerd.sock");
    let (ok, _, err) = user.run_ours(
        &["image", "load", "--namespace", &loaded_ns, archive.to_str().unwrap()],
        &[("CONTAINERD_ADDRESS", address.to_str().unwrap())],
    );
    assert!(ok, "image load: {err}");
    let ns = std::mem::replace(&mut s.namespace, loaded_ns);
    assert_eq!(s.run(&["--rm", image, &unique("c")]), "hello, rootless\n0\n");
    s.namespace = ns;

    // A write to a store path lands in the container's upper layer, owned by
    // the user on the host; the store copy is untouched.
    let id = unique("w");
    let out = s.run(&[
        image,
        &id,
        &bb,
        "sh",
        "-c",
        &format!("echo changed > {}/greeting; cat {0}/greeting", f.data),
    ]);
    assert_eq!(out, "changed\n");
    let base = StorePath::parse(&f.data).unwrap().base_name().to_string();
    let root = user
        .home
        .join(".local/share/containerd/io.containerd.snapshotter.v1.nix");
    let uppers: Vec<PathBuf> = std::fs::read_dir(root.join("snapshots"))
        .unwrap()
        .flatten()
        .map(|e| e.path().join("fs/nix/store").join(&base).join("greeting"))
        .filter(|p| p.exists())
        .collect();
    assert_eq!(uppers.len(), 1, "{uppers:?}");
    assert_eq!(std::fs::read(&uppers[0]).unwrap(), b"changed\n");
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&uppers[0]).unwrap()),
        user.uid
    );
    assert_eq!(
        std::fs::read(root.join("store").join(&base).join("greeting")).unwrap(),
        b"hello, rootless\n"
    );
    s.ctr_ok(&["containers", "rm", &id]);

    // The daemon stopped and started again: the next run works, warm.
    s.stop_daemon();
    s.start_daemon();
    s.wait_reconnected();
    assert_eq!(s.run(&["--rm", image, &unique("c")]), "hello, rootless\n0\n");
    assert_eq!(nar_downloads(&server), touched);

    // Nothing the host would see as root's in the user's directories, and
    // nothing of the user's (or its subordinate ids') anywhere else.
    assert_eq!(user.owned_by_root(), Vec::<PathBuf>::new());
    assert_eq!(user.written_elsewhere(), Vec::<String>::new());
    let log = s.daemon_text();
    let problems: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" ERROR ") || l.contains(" WARN "))
        .collect();
    assert!(problems.is_empty(), "{problems:#?}");

    // containerd stops: the daemon, whose mounts live in its namespace,
    // ends with it and says why (a supervisor restarts both).
    let status = s.stop_containerd_and_wait_daemon();
    assert!(!status.success());
    let log = s.daemon_text();
    assert!(
        log.contains("rootless containerd's namespace") && log.contains("is gone"),
        "{}",
        common::tail(&log, 10)
    );
    common::wait_until(
        std::time::Duration::from_secs(10),
        || user.processes().is_empty(),
        || format!("processes of the user outlived its stack: {:?}", user.processes()),
    );
}

/// `nix-snapshotter rootless check` as `user` in a namespace with
/// /dev/fuse at `fuse_mode`, after `setup`: (success, stdout + stderr).
fn check(user: &RootlessUser, fuse_mode: u32, setup: &str, extra: &[(&str, &str)]) -> (bool, String) {
    let out = user
        .command_in_namespace(
            fuse_mode,
            setup,
            &user.bin,
            &["rootless", "check", "--net", "host"],
            extra,
        )
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn each_missing_prerequisite_is_named_with_its_fix_as_a_new_user_meets_it() {
    let user = RootlessUser::create("rlpre");
    // All there (/dev/fuse as on a stock Debian install).
    let (ok, text) = check(&user, 0o666, "", &[]);
    assert!(ok && text.contains("ready for rootless operation"), "{text}");

    // /dev/fuse only root's, as on these machines.
    let (ok, text) = check(&user, 0o600, "", &[]);
    assert!(!ok && text.contains("/dev/fuse") && text.contains("0666"), "{text}");

    // rootlesskit not installed: a PATH with only uidmap's programs.
    let bin = user.dir.join("bin-no-rootlesskit");
    std::fs::create_dir_all(&bin).unwrap();
    for p in ["newuidmap", "newgidmap", "unshare"] {
        std::os::unix::fs::symlink(format!("/usr/bin/{p}"), bin.join(p)).unwrap();
    }
    let (ok, text) = check(&user, 0o666, "", &[("PATH", bin.to_str().unwrap())]);
    assert!(
        !ok && text.contains("rootlesskit was not found") && text.contains("Debian's rootlesskit package"),
        "{text}"
    );

    // Unprivileged user namespaces turned off (seen through a bind over
    // the sysctl in this namespace alone; the host's setting is untouched).
    let zero = user.dir.join("zero");
    std::fs::write(&zero, "0\n").unwrap();
    let (ok, text) = check(
        &user,
        0o666,
        &format!("mount --bind '{}' /proc/sys/user/max_user_namespaces", zero.display()),
        &[],
    );
    assert!(!ok && text.contains("user.max_user_namespaces = 0"), "{text}");

    // No runtime directory (no login session).
    let (ok, text) = check(&user, 0o666, "", &[("XDG_RUNTIME_DIR", "")]);
    assert!(!ok && text.contains("XDG_RUNTIME_DIR is not set"), "{text}");

    // The daemon, asked to join a rootless containerd that is not running.
    let (ok, _, err) = user.run_ours(&["--rootless"], &[]);
    assert!(
        !ok && err.contains("rootless containerd is not running") && err.contains("child_pid"),
        "{err}"
    );

    // No subordinate ids: `rootless containerd` itself refuses, before
    // rootlesskit would fail obscurely.
    let (start, count) = user.sub_ids("/etc/subuid").unwrap();
    let range = format!("{start}-{}", start + count - 1);
    let del = std::process::Command::new("usermod")
        .args(["--del-subuids", &range, &user.name])
        .output()
        .unwrap();
    assert!(del.status.success(), "{}", String::from_utf8_lossy(&del.stderr));
    let out = user
        .command_with_fuse(0o666, &user.bin, &["rootless", "containerd", "--net", "host"], &[])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("/etc/subuid") && err.contains("usermod --add-subuids"),
        "{err}"
    );
    assert!(
        !user.run.join("containerd-rootless").exists(),
        "rootlesskit was started"
    );
}
