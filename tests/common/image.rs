//! Builds OCI image-layout archives (what `ctr images import` reads) from
//! layers described in code, so tests need no registry and no Docker.

use std::path::Path;

use sha2::{Digest, Sha256};

pub enum Entry {
    Dir(String),
    File(String, u32, Vec<u8>),
    Symlink(String, String),
    /// Deletes a path of a lower layer (an overlay whiteout, `.wh.<name>`).
    Whiteout(String),
}

pub fn dir(p: &str) -> Entry {
    Entry::Dir(p.into())
}

pub fn file(p: &str, mode: u32, data: &[u8]) -> Entry {
    Entry::File(p.into(), mode, data.to_vec())
}

pub fn symlink(p: &str, target: &str) -> Entry {
    Entry::Symlink(p.into(), target.into())
}

/// The image format's Nix layer: an empty directory (0755) per directory
/// store path, an empty file (0555) per file store path, and symlinks
/// (copyToRoot) pointing into the store; `(base name, is_dir)` pairs.
pub fn nix_layer(closure: &[(String, bool)], symlinks: &[(&str, String)]) -> Vec<Entry> {
    let mut v = vec![dir("nix"), dir("nix/store")];
    for (base, is_dir) in closure {
        let p = format!("nix/store/{base}");
        v.push(if *is_dir {
            Entry::Dir(p)
        } else {
            Entry::File(p, 0o555, Vec::new())
        });
    }
    let mut dirs = std::collections::BTreeSet::new();
    for (link, _) in symlinks {
        if let Some(parent) = Path::new(link).parent().filter(|p| !p.as_os_str().is_empty()) {
            dirs.insert(parent.to_string_lossy().into_owned());
        }
    }
    v.extend(dirs.into_iter().map(Entry::Dir));
    v.extend(symlinks.iter().map(|(l, t)| symlink(l, t)));
    v
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h
}

/// The uncompressed tar of one layer.
pub fn layer_tar(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        match e {
            Entry::Dir(p) => {
                let mut h = header(tar::EntryType::Directory, 0o755, 0);
                b.append_data(&mut h, p, &[][..]).unwrap();
            }
            Entry::File(p, mode, data) => {
                let mut h = header(tar::EntryType::Regular, *mode, data.len() as u64);
                b.append_data(&mut h, p, &data[..]).unwrap();
            }
            Entry::Symlink(p, target) => {
                let mut h = header(tar::EntryType::Symlink, 0o777, 0);
                b.append_link(&mut h, p, target).unwrap();
            }
            Entry::Whiteout(p) => {
                let path = Path::new(p);
                let wh = path
                    .parent()
                    .unwrap()
                    .join(format!(".wh.{}", path.file_name().unwrap().to_str().unwrap()));
                let mut h = header(tar::EntryType::Regular, 0o644, 0);
                b.append_data(&mut h, wh, &[][..]).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// Writes an OCI image-layout tar naming the image `name` (e.g.
/// `docker.io/library/e2e:latest`) with the given layers, bottom first.
pub fn write_oci_archive(out: &Path, name: &str, layers: &[Vec<Entry>], cmd: &[&str]) {
    let mut blobs: Vec<(String, Vec<u8>)> = Vec::new();
    let mut layer_descs = Vec::new();
    let mut diff_ids = Vec::new();
    for l in layers {
        let tar = layer_tar(l);
        diff_ids.push(sha256(&tar));
        let gz = gzip(&tar);
        let digest = sha256(&gz);
        layer_descs.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": digest,
            "size": gz.len(),
        }));
        blobs.push((digest, gz));
    }
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Cmd": cmd, "Env": ["PATH=/bin"] },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    }))
    .unwrap();
    let config_digest = sha256(&config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": layer_descs,
    }))
    .unwrap();
    let manifest_digest = sha256(&manifest);
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "annotations": {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": name.rsplit(':').next().unwrap(),
            },
        }],
    }))
    .unwrap();
    blobs.push((config_digest, config));
    blobs.push((manifest_digest, manifest));

    let mut files = vec![
        ("oci-layout".to_string(), br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec()),
        ("index.json".to_string(), index),
    ];
    for (digest, data) in blobs {
        files.push((format!("blobs/sha256/{}", digest.trim_start_matches("sha256:")), data));
    }
    let mut b = tar::Builder::new(std::fs::File::create(out).unwrap());
    for (path, data) in files {
        let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64);
        b.append_data(&mut h, path, &data[..]).unwrap();
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
        Entry::Whiteout("etc/doomed".into()),
        file("hello.txt", 0o644, b"hello from the top layer\n"),
    ];
    vec![base, top]
}
