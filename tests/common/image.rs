//! Builds OCI image-layout archives (what `ctr images import` reads) from
//! layers described in code, with the library's image writer, so tests need
//! no registry and no Docker.

use std::collections::BTreeMap;
use std::path::Path;

pub use nix_snapshotter::image::Entry;
use nix_snapshotter::image::{self as lib, Layer};

pub fn dir(p: &str) -> Entry {
    Entry::Dir(p.into(), 0o755)
}

pub fn file(p: &str, mode: u32, data: &[u8]) -> Entry {
    Entry::File(p.into(), mode, data.to_vec())
}

pub fn symlink(p: &str, target: &str) -> Entry {
    Entry::Symlink(p.into(), target.into())
}

/// Deletes `p` of a lower layer: an overlay whiteout, `.wh.<name>`.
pub fn whiteout(p: &str) -> Entry {
    let path = Path::new(p);
    let name = path.file_name().unwrap().to_string_lossy();
    let wh = path.with_file_name(format!(".wh.{name}"));
    Entry::File(wh.to_string_lossy().into_owned(), 0o644, Vec::new())
}

/// The image format's Nix layer for `(base name, is_dir)` pairs, with
/// copyToRoot-style symlinks, and no annotations (as `ctr images import`
/// on containerd 1.6 sees it).
pub fn nix_layer(closure: &[(String, bool)], symlinks: &[(&str, String)]) -> Vec<Entry> {
    let links: BTreeMap<String, lib::RootLink> = symlinks
        .iter()
        .map(|(l, t)| (l.to_string(), lib::RootLink::Symlink(t.clone())))
        .collect();
    lib::nix_layer_entries(closure, &links)
}

/// Writes an OCI image-layout tar naming the image `name` (e.g.
/// `docker.io/library/e2e:latest`) with the given layers, bottom first.
pub fn write_oci_archive(out: &Path, name: &str, layers: &[Vec<Entry>], cmd: &[&str]) {
    let layers: Vec<Layer> = layers
        .iter()
        .map(|l| Layer::from_tar(&lib::layer_tar(l), BTreeMap::new()))
        .collect();
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Cmd": cmd, "Env": ["PATH=/bin"] },
    });
    lib::write_archive(out, Some(name), config, &layers).unwrap();
}

/// A Docker archive (as `docker save` writes it): `manifest.json`, the
/// config, and uncompressed layer tars, no OCI index.
pub fn write_docker_archive(out: &Path, name: &str, layers: &[Vec<Entry>], cmd: &[&str]) {
    let tars: Vec<Vec<u8>> = layers.iter().map(|l| lib::layer_tar(l)).collect();
    let diff_ids: Vec<String> = tars.iter().map(|t| lib::sha256_digest(t)).collect();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Cmd": cmd, "Env": ["PATH=/bin"] },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    }))
    .unwrap();
    let hex = |d: &str| d.trim_start_matches("sha256:").to_string();
    let config_name = format!("{}.json", hex(&lib::sha256_digest(&config)));
    let layer_names: Vec<String> = diff_ids.iter().map(|d| format!("{}/layer.tar", hex(d))).collect();
    let manifest = serde_json::to_vec(&serde_json::json!([{
        "Config": config_name,
        "RepoTags": [name],
        "Layers": layer_names,
    }]))
    .unwrap();
    let mut b = tar::Builder::new(std::fs::File::create(out).unwrap());
    let mut add = |path: &str, data: &[u8]| {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, path, data).unwrap();
    };
    add("manifest.json", &manifest);
    add(&config_name, &config);
    for (name, data) in layer_names.iter().zip(&tars) {
        add(name, data);
    }
    b.finish().unwrap();
}

/// A two-layer busybox image: the lower layer has `/etc/doomed` and
/// `/etc/kept`, the upper one deletes `/etc/doomed` and adds `/hello.txt`.
pub fn busybox_two_layers(out: &Path, name: &str) {
    write_oci_archive(
        out,
        name,
        &busybox_layers(),
        &["/bin/sh", "-c", "cat /hello.txt; ls /etc"],
    );
}

/// The layers of [`busybox_two_layers`], to build other images on.
pub fn busybox_layers() -> Vec<Vec<Entry>> {
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static must be installed (see .ci/run)");
    let mut base = vec![
        dir("bin"),
        dir("etc"),
        dir("tmp"),
        Entry::File("bin/busybox".into(), 0o755, busybox),
        file("etc/doomed", 0o644, b"delete me\n"),
        file("etc/kept", 0o644, b"keep me\n"),
    ];
    for tool in ["sh", "cat", "ls", "echo", "sleep", "test", "wc"] {
        base.push(symlink(&format!("bin/{tool}"), "busybox"));
    }
    let top = vec![
        whiteout("etc/doomed"),
        file("hello.txt", 0o644, b"hello from the top layer\n"),
    ];
    vec![base, top]
}
