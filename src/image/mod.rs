//! Nix images in the Go nix-snapshotter's format, as OCI image-layout tars.
//!
//! The Nix layer is an ordinary gzip tar holding only *mountpoints*: an empty
//! directory (0755) per directory store path and an empty file (0555) per
//! file store path, plus the copyToRoot symlinks (`/bin/x ->
//! /nix/store/…/bin/x`); owner 0, mtime 0. Its descriptor carries
//! `containerd.io/snapshot/nix-closure` (the closure-info store path) when
//! the closure came from one, else the legacy `nix-layer` +
//! `nix-store-path.<i>` annotations. It is the last layer. Output is
//! reproducible: the same inputs give the same bytes.

pub mod load;
pub mod push;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::api::containerd::types::Descriptor;
use crate::nixfmt::StorePath;
pub use crate::nixlayer::{add_root_links, RootLink};
use nix_snapshotter_fuse::beneath;

pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: {msg}", path.display())]
    Invalid { path: PathBuf, msg: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn invalid(path: &Path, msg: impl Into<String>) -> ImageError {
    ImageError::Invalid {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

/// A layer ready to be written: its compressed blob and what describes it.
#[derive(Debug, Clone)]
pub struct Layer {
    pub gz: Vec<u8>,
    /// Digest of the uncompressed tar.
    pub diff_id: String,
    pub annotations: BTreeMap<String, String>,
}

impl Layer {
    pub fn from_tar(tar: &[u8], annotations: BTreeMap<String, String>) -> Layer {
        // Level 6 and no header timestamp: deterministic output.
        let mut enc = flate2::GzBuilder::new()
            .mtime(0)
            .write(Vec::new(), flate2::Compression::default());
        // Writing to a Vec cannot fail.
        let _ = enc.write_all(tar);
        let gz = enc.finish().unwrap_or_default();
        Layer {
            gz,
            diff_id: sha256_digest(tar),
            annotations,
        }
    }
}

/// Entries of an image layer, for building tars.
pub enum Entry {
    Dir(String, u32),
    File(String, u32, Vec<u8>),
    Symlink(String, String),
}

/// An uncompressed tar of `entries`, owner 0, mtime 0, in the given order.
pub fn layer_tar(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let header = |kind: tar::EntryType, mode: u32, size: u64| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h
    };
    for e in entries {
        // Appending to a Vec cannot fail for valid (relative, short) names.
        let _ = match e {
            Entry::Dir(p, mode) => b.append_data(&mut header(tar::EntryType::Directory, *mode, 0), p, &[][..]),
            Entry::File(p, mode, data) => b.append_data(
                &mut header(tar::EntryType::Regular, *mode, data.len() as u64),
                p,
                &data[..],
            ),
            Entry::Symlink(p, target) => b.append_link(&mut header(tar::EntryType::Symlink, 0o777, 0), p, target),
        };
    }
    b.into_inner().unwrap_or_default()
}

/// The Nix layer's entries: `nix/store/<path>` mountpoints (sorted), then
/// the copyToRoot directories and symlinks.
pub fn nix_layer_entries(closure: &[(String, bool)], links: &BTreeMap<String, RootLink>) -> Vec<Entry> {
    let mut v = vec![Entry::Dir("nix".into(), 0o755), Entry::Dir("nix/store".into(), 0o755)];
    let sorted: BTreeMap<&String, bool> = closure.iter().map(|(n, d)| (n, *d)).collect();
    for (base, is_dir) in sorted {
        let p = format!("nix/store/{base}");
        v.push(if is_dir {
            Entry::Dir(p, 0o755)
        } else {
            Entry::File(p, 0o555, Vec::new())
        });
    }
    let mut dirs = BTreeSet::new();
    for (path, link) in links {
        if *link == RootLink::Dir {
            dirs.insert(path.clone());
        }
        let mut p = Path::new(path).parent();
        while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
            dirs.insert(d.to_string_lossy().into_owned());
            p = d.parent();
        }
    }
    v.extend(dirs.into_iter().map(|d| Entry::Dir(d, 0o755)));
    v.extend(links.iter().filter_map(|(l, t)| match t {
        RootLink::Symlink(t) => Some(Entry::Symlink(l.clone(), t.clone())),
        RootLink::Dir => None,
    }));
    v
}

/// Writes an OCI image-layout tar: `config` is the image config without
/// `rootfs` (filled in here), layers bottom first, `name` (if any) as
/// `io.containerd.image.name`.
pub fn write_archive(out: &Path, name: Option<&str>, mut config: Value, layers: &[Layer]) -> Result<(), ImageError> {
    config["rootfs"] = json!({
        "type": "layers",
        "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>(),
    });
    let config = serde_json::to_vec(&config).map_err(|e| invalid(out, e.to_string()))?;
    let config_digest = sha256_digest(&config);
    let layer_descs: Vec<Value> = layers
        .iter()
        .map(|l| {
            let mut d = json!({ "mediaType": LAYER_MEDIA_TYPE, "digest": sha256_digest(&l.gz), "size": l.gz.len() });
            if !l.annotations.is_empty() {
                d["annotations"] = json!(l.annotations);
            }
            d
        })
        .collect();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": { "mediaType": CONFIG_MEDIA_TYPE, "digest": config_digest, "size": config.len() },
        "layers": layer_descs,
    }))
    .map_err(|e| invalid(out, e.to_string()))?;
    let manifest_digest = sha256_digest(&manifest);
    let mut desc = json!({ "mediaType": MANIFEST_MEDIA_TYPE, "digest": manifest_digest, "size": manifest.len() });
    if let Some(name) = name {
        let tag = name
            .rsplit_once(':')
            .map(|(_, t)| t)
            .filter(|t| !t.contains('/'))
            .unwrap_or("latest");
        desc["annotations"] = json!({ "io.containerd.image.name": name, "org.opencontainers.image.ref.name": tag });
    }
    let index = serde_json::to_vec(&json!({ "schemaVersion": 2, "manifests": [desc] }))
        .map_err(|e| invalid(out, e.to_string()))?;

    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for l in layers {
        files.insert(blob_path(&sha256_digest(&l.gz)), l.gz.clone());
    }
    files.insert(blob_path(&config_digest), config);
    files.insert(blob_path(&manifest_digest), manifest);
    let tmp = out.with_extension("tmp");
    let f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
    let mut b = tar::Builder::new(io::BufWriter::new(f));
    let mut add = |path: &str, data: &[u8]| -> io::Result<()> {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o444);
        h.set_size(data.len() as u64);
        h.set_mtime(0);
        b.append_data(&mut h, path, data)
    };
    // Docker's manifest too, so that `docker load` and the Go project's
    // tools take the archive (Docker >= 25 writes the same pair).
    let mut docker = json!({
        "Config": blob_path(&config_digest),
        "Layers": layers.iter().map(|l| blob_path(&sha256_digest(&l.gz))).collect::<Vec<_>>(),
    });
    if let Some(name) = name.filter(|n| !n.starts_with("nix:0")) {
        let tagged = match name.rsplit_once(':') {
            Some((_, t)) if !t.contains('/') => name.to_string(),
            _ => format!("{name}:latest"),
        };
        docker["RepoTags"] = json!([tagged]);
    }
    let docker = serde_json::to_vec(&json!([docker])).map_err(|e| invalid(out, e.to_string()))?;
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(io_err(&tmp))?;
    add("index.json", &index).map_err(io_err(&tmp))?;
    add("manifest.json", &docker).map_err(io_err(&tmp))?;
    for (path, data) in &files {
        add(path, data).map_err(io_err(&tmp))?;
    }
    let mut w = b.into_inner().map_err(io_err(&tmp))?;
    w.flush().map_err(io_err(&tmp))?;
    drop(w);
    std::fs::rename(&tmp, out).map_err(io_err(out))
}

fn blob_path(digest: &str) -> String {
    format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"))
}

/// An image read from an OCI image-layout tar (for `--from-image`).
pub struct Archive {
    pub config: Value,
    pub layers: Vec<Layer>,
}

pub fn read_archive(path: &Path) -> Result<Archive, ImageError> {
    let raw = read_raw(path)?;
    let config = serde_json::from_slice(&raw.config_bytes).map_err(|e| invalid(path, format!("config: {e}")))?;
    let mut layers = Vec::new();
    for (desc, blob, diff_id) in raw.layers {
        let data = blob.read().map_err(io_err(path))?;
        let m = &desc.media_type;
        if m == TAR_MEDIA_TYPE || m.ends_with("rootfs.diff.tar") {
            // Uncompressed (a Docker archive's): compressed here, and its
            // content must be what the config says.
            let layer = Layer::from_tar(&data, desc.annotations.into_iter().collect());
            if layer.diff_id != diff_id {
                return Err(invalid(
                    path,
                    format!("layer {} is not its diff_id {diff_id}", desc.digest),
                ));
            }
            layers.push(layer);
            continue;
        }
        if !m.ends_with("tar+gzip") && !m.ends_with("tar.gzip") && !m.contains("rootfs.diff.tar.gzip") {
            return Err(invalid(path, format!("layer media type {m} is not gzip tar")));
        }
        layers.push(Layer {
            gz: data,
            diff_id,
            annotations: desc.annotations.into_iter().collect(),
        });
    }
    Ok(Archive { config, layers })
}

/// A blob inside an image archive: where its bytes are, not the bytes, so
/// that a large image is never held in memory.
#[derive(Debug, Clone)]
pub(crate) struct BlobRef {
    pub archive: PathBuf,
    pub offset: u64,
    pub size: u64,
}

impl BlobRef {
    /// Reads it whole (small blobs, and `--from-image` layers).
    pub fn read(&self) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        self.reader()?.read_to_end(&mut out)?;
        Ok(out)
    }

    /// Its bytes as a stream.
    pub fn reader(&self) -> io::Result<impl Read> {
        use std::io::{Seek, SeekFrom};
        let mut f = std::fs::File::open(&self.archive)?;
        f.seek(SeekFrom::Start(self.offset))?;
        Ok(f.take(self.size))
    }

    fn sha256(&self) -> io::Result<String> {
        let mut r = self.reader()?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = r.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        Ok(format!("sha256:{:x}", h.finalize()))
    }
}

/// Most entries an image archive may have, and most bytes of one of its
/// JSON documents (index, manifest, config): bounds on what an untrusted
/// archive can make us hold.
const MAX_ARCHIVE_ENTRIES: usize = 100_000;
const MAX_JSON: u64 = 16 << 20;

/// An image as an OCI image-layout tar has it: raw blobs (each checked
/// against its digest), so digests stay what they are.
pub(crate) struct RawImage {
    /// `io.containerd.image.name`, if the archive names the image.
    pub name: Option<String>,
    pub manifest: Descriptor,
    pub manifest_bytes: Vec<u8>,
    pub config_digest: String,
    pub config_bytes: Vec<u8>,
    /// (descriptor, blob, diff id), bottom first.
    pub layers: Vec<(Descriptor, BlobRef, String)>,
}

pub(crate) fn read_raw(path: &Path) -> Result<RawImage, ImageError> {
    let f = std::fs::File::open(path).map_err(io_err(path))?;
    let mut files: HashMap<String, BlobRef> = HashMap::new();
    for entry in tar::Archive::new(f).entries().map_err(io_err(path))? {
        let e = entry.map_err(io_err(path))?;
        if files.len() >= MAX_ARCHIVE_ENTRIES {
            return Err(invalid(path, format!("more than {MAX_ARCHIVE_ENTRIES} entries")));
        }
        let name = e
            .path()
            .map_err(io_err(path))?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_string();
        files.insert(
            name,
            BlobRef {
                archive: path.to_path_buf(),
                offset: e.raw_file_position(),
                size: e.size(),
            },
        );
    }
    let blob = |digest: &str| -> Result<BlobRef, ImageError> {
        let blob = files
            .get(&blob_path(digest))
            .cloned()
            .ok_or_else(|| invalid(path, format!("missing blob {digest}")))?;
        if blob.sha256().map_err(io_err(path))? != digest {
            return Err(invalid(path, format!("blob {digest} does not match its digest")));
        }
        Ok(blob)
    };
    let small = |b: &BlobRef, what: &str| -> Result<Vec<u8>, ImageError> {
        if b.size > MAX_JSON {
            return Err(invalid(path, format!("{what} is larger than {MAX_JSON} bytes")));
        }
        b.read().map_err(io_err(path))
    };
    let json = |bytes: &[u8], what: &str| -> Result<Value, ImageError> {
        serde_json::from_slice(bytes).map_err(|e| invalid(path, format!("{what}: {e}")))
    };
    let Some(index_ref) = files.get("index.json") else {
        // A Docker archive (`docker save`): manifest.json only.
        let docker_ref = files.get("manifest.json").ok_or_else(|| {
            invalid(
                path,
                "no index.json or manifest.json (not an OCI image layout or Docker archive)",
            )
        })?;
        let docker = json(&small(docker_ref, "manifest.json")?, "manifest.json")?;
        return docker_raw(path, &files, &docker[0], &small);
    };
    let index = json(&small(index_ref, "index.json")?, "index.json")?;
    let m = &index["manifests"][0];
    let digest = m["digest"]
        .as_str()
        .ok_or_else(|| invalid(path, "index.json names no manifest"))?
        .to_string();
    let manifest_bytes = small(&blob(&digest)?, "the manifest")?;
    let manifest = json(&manifest_bytes, "manifest")?;
    let config_digest = manifest["config"]["digest"]
        .as_str()
        .ok_or_else(|| invalid(path, "manifest has no config"))?
        .to_string();
    let config_bytes = small(&blob(&config_digest)?, "the config")?;
    let config = json(&config_bytes, "config")?;
    let diff_ids = config["rootfs"]["diff_ids"].as_array().cloned().unwrap_or_default();
    let descs = manifest["layers"].as_array().cloned().unwrap_or_default();
    if descs.len() != diff_ids.len() {
        return Err(invalid(path, "layer count and diff_ids disagree"));
    }
    let mut layers = Vec::new();
    for (d, diff) in descs.iter().zip(diff_ids) {
        let digest = d["digest"]
            .as_str()
            .ok_or_else(|| invalid(path, "layer without digest"))?
            .to_string();
        let annotations = d["annotations"]
            .as_object()
            .map(|a| {
                a.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        let desc = Descriptor {
            media_type: d["mediaType"].as_str().unwrap_or(LAYER_MEDIA_TYPE).to_string(),
            digest: digest.clone(),
            size: d["size"].as_i64().unwrap_or(0),
            annotations,
        };
        layers.push((desc, blob(&digest)?, diff.as_str().unwrap_or_default().to_string()));
    }
    Ok(RawImage {
        name: m["annotations"]["io.containerd.image.name"]
            .as_str()
            .map(str::to_string),
        manifest: Descriptor {
            media_type: m["mediaType"].as_str().unwrap_or(MANIFEST_MEDIA_TYPE).to_string(),
            digest,
            size: manifest_bytes.len() as i64,
            annotations: HashMap::new(),
        },
        manifest_bytes,
        config_digest,
        config_bytes,
        layers,
    })
}

/// Reads a small JSON blob of the archive (bounded), naming it in errors.
type ReadSmall<'a> = dyn Fn(&BlobRef, &str) -> Result<Vec<u8>, ImageError> + 'a;

/// Uncompressed layers, as `docker save` writes them.
const TAR_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";

/// A Docker archive's image (one `manifest.json` entry), as an OCI manifest
/// of the same blobs would describe it: layers are tar or gzip tar, told
/// apart by their first bytes; paths are looked up among the archive's
/// entries only.
fn docker_raw(
    path: &Path,
    files: &HashMap<String, BlobRef>,
    entry: &Value,
    small: &ReadSmall<'_>,
) -> Result<RawImage, ImageError> {
    let entry_of = |p: &str| -> Result<BlobRef, ImageError> {
        files.get(p.trim_start_matches("./")).cloned().ok_or_else(|| {
            invalid(
                path,
                format!("manifest.json names {p:?}, which the archive does not hold"),
            )
        })
    };
    let config_path = entry["Config"]
        .as_str()
        .ok_or_else(|| invalid(path, "manifest.json names no Config"))?;
    let config_bytes = small(&entry_of(config_path)?, "the config")?;
    let config_digest = sha256_digest(&config_bytes);
    let config: Value = serde_json::from_slice(&config_bytes).map_err(|e| invalid(path, format!("config: {e}")))?;
    let diff_ids = config["rootfs"]["diff_ids"].as_array().cloned().unwrap_or_default();
    let paths = entry["Layers"].as_array().cloned().unwrap_or_default();
    if paths.len() != diff_ids.len() {
        return Err(invalid(path, "layer count and diff_ids disagree"));
    }
    let mut layers = Vec::new();
    let mut descs = Vec::new();
    for (p, diff) in paths.iter().zip(diff_ids) {
        let blob = entry_of(
            p.as_str()
                .ok_or_else(|| invalid(path, "a layer path is not a string"))?,
        )?;
        let mut magic = [0u8; 2];
        let gz = blob.reader().and_then(|mut r| r.read_exact(&mut magic)).is_ok() && magic == [0x1f, 0x8b];
        let desc = Descriptor {
            media_type: if gz { LAYER_MEDIA_TYPE } else { TAR_MEDIA_TYPE }.to_string(),
            digest: blob.sha256().map_err(io_err(path))?,
            size: blob.size as i64,
            annotations: HashMap::new(),
        };
        descs.push(json!({ "mediaType": desc.media_type, "digest": desc.digest, "size": desc.size }));
        layers.push((desc, blob, diff.as_str().unwrap_or_default().to_string()));
    }
    let manifest_bytes = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": { "mediaType": CONFIG_MEDIA_TYPE, "digest": config_digest, "size": config_bytes.len() },
        "layers": descs,
    }))
    .map_err(|e| invalid(path, e.to_string()))?;
    Ok(RawImage {
        name: entry["RepoTags"][0].as_str().map(str::to_string),
        manifest: Descriptor {
            media_type: MANIFEST_MEDIA_TYPE.to_string(),
            digest: sha256_digest(&manifest_bytes),
            size: manifest_bytes.len() as i64,
            annotations: HashMap::new(),
        },
        manifest_bytes,
        config_digest,
        config_bytes,
        layers,
    })
}

/// Inputs of `image build`.
pub struct BuildOptions {
    /// The image config's `config` object (Cmd, Entrypoint, Env, …).
    pub config: PathBuf,
    /// A file listing the closure's store paths, one per line
    /// (closure-info's `store-paths`).
    pub closure: PathBuf,
    /// JSON list of store paths whose contents are linked into `/`.
    pub copy_to_root: Option<PathBuf>,
    pub from_image: Option<PathBuf>,
    pub name: Option<String>,
    /// Where store paths physically are (`/` normally; a chroot store's root otherwise).
    pub store_root: PathBuf,
    /// The image's architecture (OCI/Go names: amd64, arm64, ...); default
    /// the host's. (A `--from-image` base keeps its own.)
    pub arch: Option<String>,
    /// A store path of the closure holding an access profile, named by the
    /// Nix layer's `nix-profile` label.
    pub profile: Option<String>,
}

/// This machine's architecture as OCI images name it.
pub fn host_arch() -> String {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        "loongarch64" => "loong64",
        other => other,
    }
    .to_string()
}

pub fn build(opts: &BuildOptions, out: &Path) -> Result<(), ImageError> {
    let text = std::fs::read_to_string(&opts.closure).map_err(io_err(&opts.closure))?;
    let mut paths = BTreeSet::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        paths.insert(StorePath::parse(line).map_err(|e| invalid(&opts.closure, e.to_string()))?);
    }
    // Where the store is physically (a chroot store's root, or `/`).
    let store_dir = opts.store_root.join("nix/store");
    let holder = beneath::root(&store_dir).map_err(io_err(&store_dir))?;
    // Each path's mountpoint type comes from the path itself: one that is
    // not here cannot be described, so it is an error, named.
    let mut closure: Vec<(String, bool)> = Vec::new();
    let mut missing = Vec::new();
    for p in &paths {
        match beneath::lstat(holder.as_fd(), Path::new(p.base_name())) {
            Ok(st) => closure.push((p.base_name().to_string(), beneath::Kind::of(&st) == beneath::Kind::Dir)),
            Err(_) => missing.push(p.absolute()),
        }
    }
    if !missing.is_empty() {
        return Err(invalid(
            &opts.closure,
            format!(
                "{} store path(s) of the closure are not in {}: {}",
                missing.len(),
                store_dir.display(),
                missing.join(", ")
            ),
        ));
    }

    let mut links = BTreeMap::new();
    let mut roots = Vec::new();
    if let Some(file) = &opts.copy_to_root {
        let list: Vec<String> = serde_json::from_slice(&std::fs::read(file).map_err(io_err(file))?)
            .map_err(|e| invalid(file, format!("expected a JSON list of store paths: {e}")))?;
        for s in list {
            let p = StorePath::parse(&s).map_err(|e| invalid(file, e.to_string()))?;
            if !paths.contains(&p) {
                return Err(invalid(file, format!("{s} is not in the closure")));
            }
            add_root_links(holder.as_fd(), p.base_name(), &mut links)
                .map_err(|e| invalid(file, format!("{s}: {e}")))?;
            roots.push(p.absolute());
        }
    }

    let mut annotations = BTreeMap::new();
    // Seen from the store, not from where the file physically is (a chroot store).
    let logical = match opts.closure.strip_prefix(&opts.store_root) {
        Ok(rel) if opts.store_root != Path::new("/") => Path::new("/").join(rel),
        _ => opts.closure.clone(),
    };
    let info = logical
        .parent()
        .and_then(|d| StorePath::parse(&d.to_string_lossy()).ok());
    match info.filter(|_| logical.file_name().is_some_and(|n| n == "store-paths")) {
        Some(info) => {
            annotations.insert(crate::nixlayer::LABEL_CLOSURE.to_string(), info.absolute());
        }
        None => {
            annotations.insert(crate::nixlayer::LABEL_LAYER.to_string(), "true".into());
            for (i, p) in paths.iter().enumerate() {
                annotations.insert(format!("{}{i}", crate::nixlayer::LABEL_PATH_PREFIX), p.absolute());
            }
        }
    }
    // Says the layer is exactly what the labels and these copyToRoot paths
    // determine, so a snapshotter may build it without fetching it.
    let marker = serde_json::to_string(&roots).unwrap_or_default();
    if crate::nixlayer::LABEL_COPY_TO_ROOT.len() + marker.len() <= crate::nixlayer::MAX_LABEL_SIZE {
        annotations.insert(crate::nixlayer::LABEL_COPY_TO_ROOT.to_string(), marker);
    } else {
        tracing::warn!(
            "the copyToRoot list is too long for a containerd label: the Nix layer will be fetched and applied"
        );
    }
    let user: Value = serde_json::from_slice(&std::fs::read(&opts.config).map_err(io_err(&opts.config))?)
        .map_err(|e| invalid(&opts.config, e.to_string()))?;
    if !user.is_object() {
        return Err(invalid(
            &opts.config,
            "expected a JSON object (the image config's `config`)",
        ));
    }
    let (mut config, mut layers) = match &opts.from_image {
        Some(base) => {
            let a = read_archive(base)?;
            (a.config, a.layers)
        }
        None => (
            json!({ "architecture": opts.arch.clone().unwrap_or_else(host_arch), "os": "linux", "config": {} }),
            Vec::new(),
        ),
    };
    // The base image's settings, overridden key by key by ours.
    if let (Some(base), Some(ours)) = (config["config"].as_object_mut(), user.as_object()) {
        for (k, v) in ours {
            base.insert(k.clone(), v.clone());
        }
    } else {
        config["config"] = user;
    }
    if let Some(obj) = config.as_object_mut() {
        obj.remove("history");
        obj.remove("created");
    }
    // Where the command runs from, so a snapshotter can fetch it early.
    let args: Vec<&str> = ["Entrypoint", "Cmd"]
        .iter()
        .filter_map(|k| config["config"][k].as_array())
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let in_closure = |base: &str| StorePath::from_base_name(base).is_ok_and(|p| paths.contains(&p));
    let entry = crate::nixlayer::entrypoint_paths(args, &in_closure);
    if !entry.is_empty() {
        annotations.insert(
            crate::nixlayer::LABEL_ENTRYPOINT.to_string(),
            serde_json::to_string(&entry).unwrap_or_default(),
        );
    }
    if let Some(p) = &opts.profile {
        let sp = StorePath::parse(p)
            .ok()
            .filter(|sp| paths.contains(sp))
            .ok_or_else(|| ImageError::Invalid {
                path: opts.closure.clone(),
                msg: format!("--profile {p}: not a store path of the closure (add it to the closure)"),
            })?;
        annotations.insert(crate::nixlayer::LABEL_PROFILE.to_string(), sp.to_string());
    }
    let nix = Layer::from_tar(&layer_tar(&nix_layer_entries(&closure, &links)), annotations);
    layers.push(nix);
    write_archive(out, opts.name.as_deref(), config, &layers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(archive: &Path) -> BTreeMap<String, Vec<u8>> {
        let mut out = BTreeMap::new();
        for e in tar::Archive::new(std::fs::File::open(archive).unwrap())
            .entries()
            .unwrap()
        {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            out.insert(name, data);
        }
        out
    }

    #[test]
    fn archives_carry_a_docker_manifest_naming_the_same_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("a.tar");
        let layer = Layer::from_tar(&layer_tar(&[]), BTreeMap::new());
        let config = json!({ "architecture": host_arch(), "os": "linux", "config": {} });
        write_archive(
            &out,
            Some("ghcr.io/pdtpartners/hello"),
            config,
            std::slice::from_ref(&layer),
        )
        .unwrap();
        let files = entries(&out);
        let docker: Value = serde_json::from_slice(&files["manifest.json"]).unwrap();
        assert_eq!(docker[0]["RepoTags"], json!(["ghcr.io/pdtpartners/hello:latest"]));
        let layer_path = docker[0]["Layers"][0].as_str().unwrap();
        assert_eq!(files[layer_path], layer.gz);
        let config: Value = serde_json::from_slice(&files[docker[0]["Config"].as_str().unwrap()]).unwrap();
        assert_eq!(config["architecture"], json!(host_arch()));
        // A nix:0 name is no Docker tag: none is given.
        write_archive(&out, Some("nix:0/nix/store/x.tar"), json!({"config": {}}), &[layer]).unwrap();
        let docker: Value = serde_json::from_slice(&entries(&out)["manifest.json"]).unwrap();
        assert!(docker[0].get("RepoTags").is_none());
    }

    #[test]
    fn a_docker_manifest_naming_what_is_not_there_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("d.tar");
        let mut b = tar::Builder::new(std::fs::File::create(&out).unwrap());
        let manifest = br#"[{"Config":"../../etc/passwd","Layers":[]}]"#;
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(manifest.len() as u64);
        b.append_data(&mut h, "manifest.json", &manifest[..]).unwrap();
        b.finish().unwrap();
        drop(b);
        let err = read_raw(&out).err().expect("refused").to_string();
        assert!(
            err.contains("../../etc/passwd") && err.contains("does not hold"),
            "{err}"
        );
    }

    #[test]
    fn the_host_architecture_has_its_oci_name() {
        if cfg!(target_arch = "x86_64") {
            assert_eq!(host_arch(), "amd64");
        }
        assert!(!host_arch().is_empty());
    }
}
