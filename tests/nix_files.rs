//! The Nix side: every .nix file parses, and nix/build-image.nix, evaluated
//! by real Nix against a busybox-only stand-in for nixpkgs
//! (tests/nix/mock-pkgs.nix), builds an image in its sandbox with our CLI
//! that containerd imports and runs from a binary cache.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::http::Server;
use common::nix::NixStore;
use common::{unique, Containerd, Daemon, TempRoot};

fn nix_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if p.is_dir() && !["target", ".git", "fuzz"].contains(&name.as_str()) {
            nix_files(&p, out);
        } else if name.ends_with(".nix") {
            out.push(p);
        }
    }
}

#[test]
fn every_nix_file_parses() {
    let mut files = Vec::new();
    nix_files(Path::new(env!("CARGO_MANIFEST_DIR")), &mut files);
    assert!(files.len() >= 6, "{files:?}");
    for f in files {
        let out = Command::new("nix-instantiate").arg("--parse").arg(&f).output().unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            f.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `nix-build tests/nix/build-image-test.nix` with `args`, against the mock pkgs.
fn build_image_nix(nix: &NixStore, cli: &Path, args: &[&str]) -> std::process::Output {
    nix.build_test_expr(cli, "build-image-test.nix", args)
}

/// The Go project's own example name has slashes, which a store path name
/// cannot: the archive is named after its last part, the image after all.
#[test]
fn build_image_takes_a_registry_name() {
    let tmp = TempRoot::new("buildname");
    let nix = NixStore::new(&tmp.join("nix"), "buildname-1");
    let cli = common::nix::copy_cli(&tmp.path);
    let out = build_image_nix(&nix, &cli, &["--argstr", "name", "ghcr.io/pdtpartners/hello"]);
    let image_path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(image_path.ends_with("-nix-image-hello.tar"), "{image_path}");
    // A valid image archive, named after the whole name.
    nix_snapshotter::image::read_archive(&nix.real(&image_path)).unwrap();
    let index = {
        let mut a = tar::Archive::new(std::fs::File::open(nix.real(&image_path)).unwrap());
        let mut s = String::new();
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            if e.path().unwrap().to_string_lossy().trim_start_matches("./") == "index.json" {
                std::io::Read::read_to_string(&mut e, &mut s).unwrap();
            }
        }
        s
    };
    assert!(index.contains("ghcr.io/pdtpartners/hello:latest"), "{index}");
    // The ref to use, as the derivation tells it.
    let expr = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/nix/build-image-test.nix");
    let eval = Command::new("nix-instantiate")
        .arg("--store")
        .arg(&nix.root)
        .args([
            "--eval",
            "--strict",
            "--attr",
            "image",
            "--argstr",
            "name",
            "ghcr.io/pdtpartners/hello",
            "--argstr",
            "cli",
        ])
        .arg(&cli)
        .arg(&expr)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&eval.stdout).trim(),
        "\"ghcr.io/pdtpartners/hello:latest\"",
        "{}",
        String::from_utf8_lossy(&eval.stderr)
    );
}

/// `accessProfile`: the file joins the closure as a store path of its own,
/// and the Nix layer's label names it (cold starts prefetch by it).
#[test]
fn build_image_publishes_an_access_profile_with_the_image() {
    let tmp = TempRoot::new("buildprofile");
    let nix = NixStore::new(&tmp.join("nix"), "buildprofile-1");
    let cli = common::nix::copy_cli(&tmp.path);
    let recorded = tmp.join("access-profile");
    std::fs::write(&recorded, "nix-snapshotter-profile 1\n").unwrap();
    let out = build_image_nix(&nix, &cli, &["--arg", "accessProfile", recorded.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let image_path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let image = nix_snapshotter::image::read_archive(&nix.real(&image_path)).unwrap();
    let ann = &image.layers.last().unwrap().annotations;
    let profile = &ann["containerd.io/snapshot/nix-profile"];
    assert!(profile.ends_with("-nix-access-profile-hello"), "{profile}");
    assert_eq!(
        std::fs::read_to_string(nix.real(profile)).unwrap(),
        "nix-snapshotter-profile 1\n"
    );
    let info = &ann["containerd.io/snapshot/nix-closure"];
    let paths = std::fs::read_to_string(nix.real(info).join("store-paths")).unwrap();
    assert!(paths.lines().any(|l| l == profile), "{paths}");
}

#[test]
fn build_image_nix_builds_a_runnable_image() {
    let tmp = TempRoot::new("buildimage");
    let nix = NixStore::new(&tmp.join("nix"), "buildimage-1");
    let cli = common::nix::copy_cli(&tmp.path);
    let out = build_image_nix(&nix, &cli, &["--arg", "resolvedByNix", "true"]);
    let image_path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(image_path.ends_with("-nix-image-hello.tar"), "{image_path}");
    let archive = nix.real(&image_path);

    // The Nix layer names its closure-info; publish that closure.
    let image = nix_snapshotter::image::read_archive(&archive).unwrap();
    let info = image.layers.last().unwrap().annotations["containerd.io/snapshot/nix-closure"].clone();
    let paths = std::fs::read_to_string(nix.real(&info).join("store-paths")).unwrap();
    let mut paths: Vec<String> = paths.lines().map(str::to_string).collect();
    assert!(paths.iter().any(|p| p.ends_with("-hello")), "{paths:?}");
    // The closure-info path itself too: labels name it.
    paths.push(info.clone());
    let cache = tmp.join("cache");
    nix.publish(&cache, "zstd", &paths);

    let server = Server::start(cache);
    let cfg = common::cache_config(&tmp.path, &server.url(), &nix.public_key, "");
    let sock = tmp.join("nix.sock");
    let daemon = Daemon::start_with(&tmp.join("root"), &sock, &["--config", cfg.to_str().unwrap()], &[]);
    let ctrd = Containerd::start(&tmp.join("ctrd"), &sock);
    ctrd.ctr_ok(&["images", "import", "--snapshotter", "nix", archive.to_str().unwrap()]);
    // resolvedByNix: the image is named after its own store path.
    let name = format!("nix:0{image_path}");
    let listed = ctrd.ctr_ok(&["images", "ls", "-q"]);
    assert!(listed.lines().any(|l| l == name), "{listed}");
    let out = ctrd.ctr_ok(&["run", "--rm", "--snapshotter", "nix", &name, &unique("c")]);
    assert_eq!(out.trim(), "hello from buildImage", "{}", daemon.log_text());

    // The same archive through `image load`: the Nix layer now arrives with
    // its labels, so it is made from the closure-info path and copyToRoot.
    let ns = format!("{}-load", ctrd.namespace);
    let load = ctrd.image_load(&ns, &archive);
    assert!(load.status.success(), "{}", String::from_utf8_lossy(&load.stderr));
    // buildImage marks the layer (copyToRoot listed): made, not applied.
    assert!(
        daemon.log_text().contains("made a Nix layer from its labels"),
        "{}",
        daemon.log_text()
    );
    let out = ctrd.ctr_in(&ns, &["run", "--rm", "--snapshotter", "nix", &name, &unique("c")]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        daemon.log_text()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "hello from buildImage");
    drop(ctrd);
    drop(daemon);
}

/// copyToRegistry and copyToContainerd are scripts that run our CLI on the
/// image: `image push` under the image's name and tag, `image load`.
#[test]
fn copy_scripts_push_and_load_the_image() {
    let tmp = TempRoot::new("copyscripts");
    let nix = NixStore::new(&tmp.join("nix"), "copyscripts-1");
    let cli = common::nix::copy_cli(&tmp.path);
    let out = nix.build_test_expr(&cli, "copy-scripts-test.nix", &[]);
    let dir = nix.real(String::from_utf8_lossy(&out.stdout).trim());
    let image = std::fs::read_to_string(dir.join("image")).unwrap().trim().to_string();
    let registry = std::fs::read_to_string(dir.join("registry")).unwrap();
    let containerd = std::fs::read_to_string(dir.join("containerd")).unwrap();
    assert!(registry.starts_with("#!"), "{registry}");
    for want in [
        "bin/nix-snapshotter image push",
        "--plain-http",
        image.as_str(),
        "'ghcr.io/pdtpartners/hello:v1'",
    ] {
        assert!(registry.contains(want), "{want:?} not in:\n{registry}");
    }
    for want in ["bin/nix-snapshotter image load", "--namespace 'k8s.io'", image.as_str()] {
        assert!(containerd.contains(want), "{want:?} not in:\n{containerd}");
    }
}
