//! Hostile images and store paths, met as a user would meet them: nothing an
//! image, a layer, a label or a store path says may reach the host. Real
//! containerd, runc, FUSE, overlayfs and Nix throughout.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::http::Server;
use common::image::{busybox_layers, nix_layer, symlink, Entry};
use common::nix::{busybox_tool, derivation, NixStore};
use common::{unique, Containerd, Daemon, TempRoot};
use nix_snapshotter::image::{self as lib, Layer};
use nix_snapshotter::nixfmt::StorePath;

/// A directory on the host that hostile layers aim at, with a file in it;
/// removed on drop.
struct Victim {
    dir: PathBuf,
}

impl Victim {
    fn new() -> Victim {
        let dir = PathBuf::from(format!("/tmp/nst-victim-{}", unique("v")));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("keep"), b"host file\n").unwrap();
        std::fs::write(dir.join("sub/inner"), b"host inner\n").unwrap();
        Victim { dir }
    }

    /// The host directory exactly as it was made.
    fn assert_untouched(&self, what: &str) {
        let mut names: Vec<String> = std::fs::read_dir(&self.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["keep", "sub"], "{what}: the host directory changed");
        assert_eq!(std::fs::read(self.dir.join("keep")).unwrap(), b"host file\n", "{what}");
        use std::os::unix::fs::MetadataExt;
        let links = std::fs::metadata(self.dir.join("keep")).unwrap().nlink();
        assert_eq!(links, 1, "{what}: the host file gained a hard link");
        assert_eq!(
            std::fs::read(self.dir.join("sub/inner")).unwrap(),
            b"host inner\n",
            "{what}"
        );
    }
}

impl Drop for Victim {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One raw tar entry, including kinds the image writer never makes.
enum Raw {
    Dir(&'static str),
    File(&'static str, &'static [u8]),
    Hardlink(&'static str, String),
    /// A file whose name the tar crate would refuse (`..`), written raw.
    DotDot(&'static str),
}

fn raw_tar(entries: &[Raw]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        match e {
            Raw::Dir(p) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_data(&mut h, p, &[][..]).unwrap();
            }
            Raw::File(p, data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, p, *data).unwrap_or_else(|e| panic!("{p}: {e}"));
            }
            Raw::DotDot(p) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_size(0);
                let name = &mut h.as_old_mut().name;
                name[..p.len()].copy_from_slice(p.as_bytes());
                h.set_cksum();
                b.append(&h, &[][..]).unwrap();
            }
            Raw::Hardlink(p, t) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_mode(0o644);
                h.set_size(0);
                b.append_link(&mut h, p, t).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

/// Busybox, then a layer with `x -> victim`, then `attack` through `x`.
/// Returns the diff_ids the image config names.
fn archive(out: &Path, name: &str, victim: &Path, attack: &[Raw], lie_about_diff_id: bool) -> Vec<String> {
    let mut layers: Vec<Layer> = busybox_layers()
        .iter()
        .map(|l| Layer::from_tar(&lib::layer_tar(l), BTreeMap::new()))
        .collect();
    layers.push(Layer::from_tar(
        &lib::layer_tar(&[symlink("x", &victim.to_string_lossy())]),
        BTreeMap::new(),
    ));
    let mut top = Layer::from_tar(&raw_tar(attack), BTreeMap::new());
    if lie_about_diff_id {
        top.diff_id = layers[0].diff_id.clone();
    }
    layers.push(top);
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Cmd": ["/bin/sh", "-c", "ls /x/ 2>&1; cat /x/keep /hl 2>&1; true"], "Env": ["PATH=/bin"] },
    });
    lib::write_archive(out, Some(name), config, &layers).unwrap();
    layers.iter().map(|l| l.diff_id.clone()).collect()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn layers_aiming_through_symlinks_at_host_directories_never_touch_the_host() {
    let (tmp, daemon, ctrd) = common::plain_stack("hostile");
    let victim = Victim::new();

    let attacks: Vec<(&str, Vec<Raw>)> = vec![
        ("whiteout", vec![Raw::File("x/.wh.keep", b"")]),
        ("whiteout of a directory", vec![Raw::File("x/.wh.sub", b"")]),
        ("opaque marker", vec![Raw::File("x/.wh..wh..opq", b"")]),
        ("file", vec![Raw::File("x/planted", b"planted\n")]),
        ("file over a host file", vec![Raw::File("x/keep", b"overwritten\n")]),
        ("directory", vec![Raw::Dir("x/planted-dir")]),
        (
            "file in a nested directory",
            vec![Raw::File("x/sub/planted", b"planted\n")],
        ),
        (
            "hardlink to a host file",
            vec![Raw::Hardlink("hl", format!("{}/keep", victim.dir.display()))],
        ),
        (
            "hardlink through the symlink",
            vec![Raw::Hardlink("hl", "x/keep".into())],
        ),
        ("dot-dot", vec![Raw::DotDot("../../../../../../tmp/nst-planted-dotdot")]),
    ];
    for (i, (what, attack)) in attacks.iter().enumerate() {
        let name = format!("docker.io/library/hostile{i}:latest");
        let file = tmp.join(&format!("hostile{i}.tar"));
        archive(&file, &name, &victim.dir, attack, false);

        // Our loader: containerd's own applier, inside the snapshot's mounts.
        let ns = format!("{}-load{i}", ctrd.namespace);
        let out = ctrd.image_load(&ns, &file);
        victim.assert_untouched(&format!("image load: {what}"));
        if !out.status.success() {
            let err = text(&out.stderr);
            assert!(
                err.contains("layer") || err.contains("sha256:"),
                "{what}: unclear error: {err}"
            );
        }
        // containerd's own import, for comparison.
        let out = ctrd.ctr(&["images", "import", "--snapshotter", "nix", file.to_str().unwrap()]);
        victim.assert_untouched(&format!("ctr images import: {what}"));
        if out.status.success() {
            let run = ctrd.ctr_run_in(
                &ctrd.namespace,
                &["run", "--rm", "--snapshotter", "nix", &name, &unique("c")],
            );
            assert!(
                !text(&run.stdout).contains("host file"),
                "{what}: {}",
                text(&run.stdout)
            );
            victim.assert_untouched(&format!("ctr run: {what}"));
        }
    }
    assert!(!Path::new("/tmp/nst-planted-dotdot").exists());
    drop(ctrd);
    drop(daemon);
}

#[test]
fn a_layer_that_is_not_its_diff_id_is_refused_and_nothing_is_committed() {
    let (tmp, daemon, ctrd) = common::plain_stack("diffid");
    let victim = Victim::new();
    let file = tmp.join("lying.tar");
    let diff_ids = archive(
        &file,
        "docker.io/library/lying:latest",
        &victim.dir,
        &[Raw::File("planted", b"x\n")],
        true,
    );
    let out = ctrd.image_load(&ctrd.namespace, &file);
    assert!(!out.status.success(), "a lying diff_id was accepted");
    let err = text(&out.stderr);
    assert!(err.contains("diff_id"), "the error does not say what is wrong: {err}");
    // Nothing was committed under the lying layer's chain (the honest ones
    // below it may have been, until containerd's collector takes them).
    let lying = nix_snapshotter::image::load::chain_ids(&diff_ids)[3].clone();
    let listed = ctrd.ctr_ok(&["snapshots", "--snapshotter", "nix", "ls"]);
    assert!(!listed.contains(&lying), "{listed}");
    assert!(listed.matches("Committed").count() <= 3, "{listed}");
    let images = ctrd.ctr_ok(&["images", "ls", "-q"]);
    assert!(!images.contains("lying"), "{images}");
    drop(ctrd);
    drop(daemon);
}

#[test]
fn a_poisoned_chain_in_one_namespace_is_not_reused_by_another() {
    let (tmp, daemon, ctrd) = common::plain_stack("poison");
    let file = tmp.join("honest.tar");
    let name = "docker.io/library/honest:latest";
    let layers = busybox_layers();
    common::image::write_oci_archive(&file, name, &layers, &["/bin/cat", "/hello.txt"]);
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|l| Layer::from_tar(&lib::layer_tar(l), BTreeMap::new()).diff_id)
        .collect();
    let chains = nix_snapshotter::image::load::chain_ids(&diff_ids);

    // Namespace A commits a poisoned tree under the first layer's chain ID,
    // labelled as containerd's unpacker labels a layer it applied.
    let ns_a = format!("{}-a", ctrd.namespace);
    let mounts = text(
        &ctrd
            .ctr_in(
                &ns_a,
                &["snapshots", "--snapshotter", "nix", "prepare", "--mounts", "poison", ""],
            )
            .stdout,
    );
    // The snapshot's directory, whatever quoting ctr prints it with.
    let upper = mounts
        .split(|c: char| c.is_whitespace() || c == '"' || c == ',' || c == '=')
        .find(|w| w.starts_with('/') && w.contains("/snapshots/"))
        .unwrap_or_else(|| panic!("no snapshot directory in {mounts:?}"))
        .to_string();
    assert!(Path::new(&upper).is_dir(), "{upper}");
    std::fs::create_dir_all(Path::new(&upper).join("bin")).unwrap();
    std::fs::write(Path::new(&upper).join("hello.txt"), b"poisoned\n").unwrap();
    let out = ctrd.ctr_in(
        &ns_a,
        &["snapshots", "--snapshotter", "nix", "commit", &chains[0], "poison"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = ctrd.ctr_in(
        &ns_a,
        &[
            "snapshots",
            "--snapshotter",
            "nix",
            "label",
            &chains[0],
            &format!("containerd.io/snapshot.ref={}", chains[0]),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));

    // Namespace A's tree is what a reuse would show.
    let poisoned = ctrd.ctr_in(&ns_a, &["snapshots", "--snapshotter", "nix", "ls"]);
    assert!(
        text(&poisoned.stdout).contains(&chains[0]),
        "{}",
        text(&poisoned.stdout)
    );

    // Namespace B loads the honest image: its layers are its own.
    let ns_b = format!("{}-b", ctrd.namespace);
    let out = ctrd.image_load(&ns_b, &file);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let run = ctrd.ctr_run_in(&ns_b, &["run", "--rm", "--snapshotter", "nix", name, &unique("c")]);
    assert_eq!(
        text(&run.stdout),
        "hello from the top layer\n",
        "{}\n{}",
        text(&run.stderr),
        daemon.log_text()
    );
    drop(ctrd);
    drop(daemon);
}

#[test]
fn image_build_names_closure_paths_missing_from_its_store() {
    let tmp = TempRoot::new("buildmissing");
    let store = tmp.join("chroot/nix/store");
    std::fs::create_dir_all(store.join("7h7qgvs4kgzsn8a6rb274saxyqh4jxlz-present")).unwrap();
    let closure = tmp.join("store-paths");
    std::fs::write(
        &closure,
        "/nix/store/7h7qgvs4kgzsn8a6rb274saxyqh4jxlz-present\n/nix/store/syd87l2rxw8cbsxmxl853h0r6pdwhw1a-absent\n",
    )
    .unwrap();
    let config = tmp.join("config.json");
    std::fs::write(&config, "{}").unwrap();
    let out_tar = tmp.join("out.tar");
    let out = Command::new(common::DAEMON)
        .args(["image", "build", "--config"])
        .arg(&config)
        .arg("--closure")
        .arg(&closure)
        .arg("--store-root")
        .arg(tmp.join("chroot"))
        .arg(&out_tar)
        .output()
        .unwrap();
    assert!(!out.status.success(), "a closure path that is not there was guessed");
    let err = text(&out.stderr);
    assert!(
        err.contains("/nix/store/syd87l2rxw8cbsxmxl853h0r6pdwhw1a-absent") && !err.contains("-present,"),
        "{err}"
    );
    assert!(!out_tar.exists());
}

/// The evil store path for the Nix tests: `$out -> /`, built by real Nix,
/// signed, served from a cache on 127.0.0.1.
struct NixFixture {
    _dir: TempRoot,
    nix: NixStore,
    cache: PathBuf,
    tool: String,
    evil: String,
    /// A closure-info path listing tool and evil (`store-paths`).
    info: String,
    closure: Vec<(String, bool)>,
}

fn nix_fixture(dir: TempRoot) -> NixFixture {
    let nix = NixStore::new(&dir.join("nix"), "hostile-1");
    let expr = format!(
        "rec {{ tool = {}; evil = {}; info = {}; top = {}; }}",
        busybox_tool(),
        derivation("evil", "b ln -s / $out", &[]),
        derivation(
            "closure-info",
            "b mkdir $out; b echo ${tool} > $out/store-paths; b echo ${evil} >> $out/store-paths",
            &["tool", "evil"]
        ),
        derivation(
            "top",
            "b mkdir $out; for r in $deps; do b echo $r >> $out/refs; done",
            &["tool", "evil", "info"]
        ),
    );
    let outs = nix.build(&expr);
    let find = |s: &str| outs.iter().find(|o| o.ends_with(s)).unwrap().clone();
    let top = find("-top");
    let cache = dir.join("cache");
    nix.publish(&cache, "zstd", std::slice::from_ref(&top));
    // The image lies: every store path is a directory mountpoint.
    let closure = nix
        .closure(&top)
        .into_iter()
        .map(|p| (StorePath::parse(&p).unwrap().base_name().to_string(), true))
        .collect();
    NixFixture {
        _dir: dir,
        tool: find("-tool"),
        evil: find("-evil"),
        info: find("-closure-info"),
        nix,
        cache,
        closure,
    }
}

/// A host file no container may read (`/etc/<name>`), removed on drop.
struct Secret {
    name: String,
    path: PathBuf,
}

impl Secret {
    fn new() -> Secret {
        let name = unique("nst-secret");
        let path = Path::new("/etc").join(&name);
        std::fs::write(&path, b"HOST SECRET\n").unwrap();
        Secret { name, path }
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Runs image `name` once; its output, which must not hold the secret.
fn run_without_the_secret(ctrd: &Containerd, name: &str) -> String {
    let run = ctrd.ctr_run_in(
        &ctrd.namespace,
        &["run", "--rm", "--snapshotter", "nix", name, &unique("c")],
    );
    let out = text(&run.stdout);
    assert!(!out.contains("HOST SECRET"), "the container read a host file: {out}");
    out
}

/// The evil store path's cache (whose unsigned `.ls` for it says
/// `listing`), our daemon on it, and a private containerd.
fn evil_stack(f: &NixFixture, tmp: &TempRoot, listing: &[u8]) -> (Server, Daemon, Containerd) {
    let server = Server::start(f.cache.clone());
    let evil = StorePath::parse(&f.evil).unwrap();
    server.route(
        &format!("/{}.ls", evil.hash_part()),
        "application/json",
        listing.to_vec(),
        &[],
    );
    let cfg = common::cache_config(&tmp.path, &server.url(), &f.nix.public_key, "");
    let sock = tmp.join("nix.sock");
    let daemon = Daemon::start_with(&tmp.join("root"), &sock, &["--config", cfg.to_str().unwrap()], &[]);
    let ctrd = Containerd::start(&tmp.join("ctrd"), &sock);
    (server, daemon, ctrd)
}

#[test]
fn a_store_path_that_is_a_symlink_to_root_never_shows_the_host() {
    let f = nix_fixture(TempRoot::new("evilnix"));
    let tmp = TempRoot::new("evil");
    let secret = Secret::new();
    let secret_name = &secret.name;
    // The unsigned `.ls` listing lies too: it says directory.
    let (_server, daemon, ctrd) = evil_stack(&f, &tmp, br#"{"version":1,"root":{"type":"directory","entries":{}}}"#);
    let root = tmp.join("root");

    let bb = format!("{}/bin/busybox", f.tool);
    let target = format!("{}/etc/{secret_name}", f.evil);
    let script = format!(
        "cat {target} 2>&1; ls {evil}/etc 2>&1 | grep -c {secret_name}; ls -ld {evil} 2>&1",
        evil = f.evil
    );
    let name = "docker.io/library/evil:latest";
    let file = tmp.join("evil.tar");
    let layers: Vec<Vec<Entry>> = vec![nix_layer(&f.closure, &[("bin/sh", bb.clone())])];
    common::image::write_oci_archive(&file, name, &layers, &[&bb, "sh", "-c", &script]);
    ctrd.ctr_ok(&["images", "import", "--snapshotter", "nix", file.to_str().unwrap()]);
    // The first container meets the lie: errors, never the host's file.
    // (Its overlay keeps the directory it was first shown, now stale.)
    run_without_the_secret(&ctrd, name);
    // Later containers see the verified store path: the symlink it is,
    // which resolves in the container's own root.
    let out = run_without_the_secret(&ctrd, name);
    assert!(
        out.contains(&format!("{} -> /", f.evil)),
        "{out}\n{}",
        daemon.log_text()
    );

    // The daemon's own mount, as a local user who is not root, while a
    // container keeps the view alive.
    let holder = unique("c");
    let sleeper = ctrd.ctr(&["run", "-d", "--snapshotter", "nix", name, &holder, &bb, "sleep", "60"]);
    assert!(sleeper.status.success(), "{}", text(&sleeper.stderr));
    let view = std::fs::read_dir(root.join("fuse"))
        .unwrap()
        .flatten()
        .next()
        .map(|e| e.path())
        .expect("a running container has a view");
    let path = view.join(target.trim_start_matches('/'));
    let as_nobody = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!text(&as_nobody.stdout).contains("HOST SECRET"));
    assert!(!as_nobody.status.success());
    let _ = ctrd.ctr(&["task", "kill", "-s", "SIGKILL", &holder]);
    let start = std::time::Instant::now();
    while !ctrd.ctr(&["task", "rm", "-f", &holder]).status.success() && start.elapsed().as_secs() < 20 {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = ctrd.ctr(&["containers", "rm", &holder]);
    drop(ctrd);
    drop(daemon);
}

#[test]
fn a_lying_listing_never_decides_what_a_store_path_is() {
    let f = nix_fixture(TempRoot::new("evills"));
    let tmp = TempRoot::new("evills");
    let secret = Secret::new();
    let secret_name = &secret.name;
    // The image's labels name the closure (no mountpoint types reach the
    // view), so the unsigned `.ls` is what is asked; it says directory.
    let (server, daemon, ctrd) = evil_stack(
        &f,
        &tmp,
        br#"{"version":1,"root":{"type":"directory","entries":{"etc":{"type":"directory"}}}}"#,
    );

    let bb = format!("{}/bin/busybox", f.tool);
    let script = format!(
        "ls -ld {evil} 2>&1; cat {evil}/etc/{secret_name} 2>&1; ls -ld {evil} 2>&1",
        evil = f.evil
    );
    let annotations = BTreeMap::from([(nix_snapshotter::nixlayer::LABEL_CLOSURE.to_string(), f.info.clone())]);
    let layer = Layer::from_tar(&lib::layer_tar(&nix_layer(&f.closure, &[])), annotations);
    let name = "docker.io/library/evil-listing:latest";
    let file = tmp.join("evil-listing.tar");
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Cmd": [bb, "sh", "-c", script] },
    });
    lib::write_archive(&file, Some(name), config, &[layer]).unwrap();
    let out = ctrd.image_load(&ctrd.namespace, &file);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = run_without_the_secret(&ctrd, name);
    assert!(
        server.count(".ls") >= 1,
        "the listing was never asked: {:?}",
        server.log()
    );
    // The verified store path overruled the listing.
    assert!(
        daemon.log_text().contains("a hint said this store path is a directory"),
        "{out}\n{}",
        daemon.log_text()
    );
    let out = run_without_the_secret(&ctrd, name);
    assert!(
        out.contains(&format!("{} -> /", f.evil)),
        "{out}\n{}",
        daemon.log_text()
    );
    drop(ctrd);
    drop(daemon);
}
