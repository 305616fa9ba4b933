//! The snapshotter core: containerd's overlayfs snapshotter semantics, with
//! metadata in [`db::MetaStore`] and trees under `<root>/snapshots/<id>/{fs,work}`.
//!
//! This layer is synchronous (filesystem and database calls block); the gRPC
//! service runs it on tokio's blocking pool.

mod db;
pub mod filter;
pub mod nix;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::api::Mount;
use crate::error::{Error, Result};
pub use crate::usage::{disk_usage, Usage};
use db::{Ancestor, MetaStore, NewRecord, LABEL_SNAPSHOT_REF};

/// Maximum size of one label's key plus value, as containerd enforces.
pub use crate::nixlayer::MAX_LABEL_SIZE;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    View,
    Active,
    Committed,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        })
    }
}

/// What Stat, Update and List report about a snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct Info {
    pub name: String,
    /// Empty when there is no parent.
    pub parent: String,
    pub kind: Kind,
    pub created: SystemTime,
    pub updated: SystemTime,
    pub labels: BTreeMap<String, String>,
}

/// Overlay options that depend on the kernel and on where we run.
#[derive(Debug, Clone, Copy)]
pub struct MountOptions {
    /// `index=off`: the kernel has the overlay index feature; turning it off
    /// lets one lower directory serve several overlays (as containerd does).
    pub index_off: bool,
    /// `userxattr`: needed for overlay inside a user namespace (rootless).
    pub userxattr: bool,
}

impl MountOptions {
    /// Detects the options the way containerd's overlayfs snapshotter does.
    pub fn detect() -> Self {
        MountOptions {
            index_off: Path::new("/sys/module/overlay/parameters/index").exists(),
            userxattr: in_user_namespace() && kernel_at_least(5, 11),
        }
    }
}

/// True when this process runs in a user namespace other than the initial one.
fn in_user_namespace() -> bool {
    match fs::read_to_string("/proc/self/uid_map") {
        Ok(map) => {
            let fields: Vec<&str> = map.split_whitespace().collect();
            fields != ["0", "0", "4294967295"]
        }
        Err(_) => false,
    }
}

fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let maj: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let min: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (maj, min) >= (major, minor)
}

/// Rejects keys that containerd would never send and that could confuse
/// anything that treats keys as text: empty, NUL bytes, or `.`/`..` segments.
/// The store paths live snapshots need (what a daemon pins against
/// eviction), read from the snapshot records alone.
pub fn pinned_paths(db: Arc<crate::db::Database>) -> Result<std::collections::HashSet<crate::nixfmt::StorePath>> {
    let meta = MetaStore::open(db)?;
    Ok(meta
        .live_chains()?
        .iter()
        .flat_map(|chain| chain.iter().flat_map(|a| a.nix.iter().flatten()))
        .filter_map(|p| crate::nixfmt::StorePath::from_base_name(&p.name).ok())
        .collect())
}

pub fn validate_key(what: &str, key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::InvalidArgument(format!("{what} must not be empty")));
    }
    if key.contains('\0') {
        return Err(Error::InvalidArgument(format!("{what} {key:?} contains a NUL byte")));
    }
    if key.split('/').any(|seg| seg == ".." || seg == ".") {
        return Err(Error::InvalidArgument(format!(
            "{what} {key:?} contains a \".\" or \"..\" path segment"
        )));
    }
    Ok(())
}

/// Checks label sizes as containerd does.
fn check_labels(key: &str, labels: &HashMap<String, String>) -> Result<()> {
    match labels.iter().find(|(k, v)| k.len() + v.len() > MAX_LABEL_SIZE) {
        Some((k, _)) => Err(Error::InvalidArgument(format!(
            "label {k:?} of snapshot {key:?}: key and value exceed {MAX_LABEL_SIZE} bytes"
        ))),
        None => Ok(()),
    }
}

/// Checks label sizes and drops empty values (containerd stores none).
fn clean_labels(key: &str, labels: HashMap<String, String>) -> Result<BTreeMap<String, String>> {
    check_labels(key, &labels)?;
    Ok(labels.into_iter().filter(|(_, v)| !v.is_empty()).collect())
}

pub struct Snapshotter {
    root: PathBuf,
    db: MetaStore,
    opts: MountOptions,
    /// Creates and removes hold it shared; Cleanup holds it exclusively, so
    /// it never deletes a directory that an in-flight Prepare is publishing.
    dirs: RwLock<()>,
    /// Held while recording a snapshot that may need a FUSE view and while
    /// removing one (which may drop views): a Remove that read the live
    /// snapshots before a concurrent Prepare committed would otherwise drop
    /// the view that Prepare just took.
    views: std::sync::Mutex<()>,
    /// Read once: mkdir only needs a chmod when the umask narrows its mode.
    umask: u32,
    /// Nix layer support; without it Nix layers are ordinary layers.
    nix: Option<nix::NixSupport>,
}

/// What [`Snapshotter::fuse_status`] tells.
#[derive(Debug, Clone)]
pub struct FuseStatus {
    pub views: Vec<String>,
    pub kept: bool,
    pub resumed: bool,
    pub nodes: usize,
    pub open_files: usize,
}

impl Snapshotter {
    /// Opens (or creates) the state under `root` and removes leftovers of
    /// calls that a crash interrupted.
    pub fn open(root: &Path, db: Arc<crate::db::Database>, opts: MountOptions) -> Result<Self> {
        for dir in [root.to_path_buf(), root.join("snapshots")] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(Error::io("cannot create", &dir))?;
        }
        let db = MetaStore::open(db)?;
        let sn = Snapshotter {
            root: root.to_path_buf(),
            db,
            opts,
            dirs: RwLock::new(()),
            views: std::sync::Mutex::new(()),
            umask: current_umask(),
            nix: None,
        };
        let removed = sn.cleanup()?;
        if removed > 0 {
            tracing::info!(removed, "removed directories left behind by an interrupted run");
        }
        Ok(sn)
    }

    /// Turns on Nix layers, served through `support`'s FUSE views.
    pub fn with_nix(mut self, support: nix::NixSupport) -> Self {
        self.nix = Some(support);
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    fn upper(&self, id: u64) -> PathBuf {
        self.snapshots_dir().join(id.to_string()).join("fs")
    }

    fn work(&self, id: u64) -> PathBuf {
        self.snapshots_dir().join(id.to_string()).join("work")
    }

    pub fn prepare(&self, key: &str, parent: &str, labels: HashMap<String, String>) -> Result<Vec<Mount>> {
        self.create(Kind::Active, key, parent, labels)
    }

    pub fn view(&self, key: &str, parent: &str, labels: HashMap<String, String>) -> Result<Vec<Mount>> {
        self.create(Kind::View, key, parent, labels)
    }

    fn create(&self, kind: Kind, key: &str, parent: &str, labels: HashMap<String, String>) -> Result<Vec<Mount>> {
        validate_key("snapshot key", key)?;
        if !parent.is_empty() {
            validate_key("parent", parent)?;
        }
        let labels = clean_labels(key, labels)?;
        if kind == Kind::Active {
            if let Some(target) = labels.get(LABEL_SNAPSHOT_REF) {
                self.remote_shortcut(key, parent, target, &labels)?;
            }
        }
        let _guard = self.dirs.read().map_err(|_| Error::Database("lock poisoned".into()))?;
        // Build the directory under a temporary name first; it becomes
        // `snapshots/<id>` only inside the transaction that records it.
        let tmp = tempdir_in(&self.snapshots_dir())?;
        let built = mkdir(&tmp.join("fs"), 0o755, self.umask).and_then(|()| match kind {
            Kind::Active => mkdir(&tmp.join("work"), 0o711, self.umask),
            _ => Ok(()),
        });
        if let Err(e) = built {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        let _views = self.views.lock().map_err(|_| Error::Database("lock poisoned".into()))?;
        self.publish(NewRecord::empty(kind, labels), key, parent, tmp, |rec, parents| {
            self.mounts_for(kind, rec.id, parents)
        })
    }

    /// The remote-snapshot shortcut, for a Prepare that names the layer chain
    /// it unpacks (`containerd.io/snapshot.ref`). If a committed snapshot of
    /// that chain on the same parent exists (an earlier pull, in any
    /// namespace), or the layer is a Nix layer whose labels determine its
    /// whole content, answers ALREADY_EXISTS with the committed snapshot in
    /// place, and containerd neither fetches nor applies the layer.
    /// Returns Ok when the layer must be fetched and applied as usual.
    fn remote_shortcut(&self, key: &str, parent: &str, target: &str, labels: &BTreeMap<String, String>) -> Result<()> {
        if let Some(existing) = self.db.find_ref(target, parent, key, labels)? {
            return Err(Error::AlreadyExists(format!(
                "target snapshot {target:?} already exists as {existing:?}"
            )));
        }
        let Some(layer) = (match &self.nix {
            Some(n) => n.remote_layer(labels)?,
            None => None,
        }) else {
            return Ok(());
        };
        let _guard = self.dirs.read().map_err(|_| Error::Database("lock poisoned".into()))?;
        let tmp = tempdir_in(&self.snapshots_dir())?;
        let fs_dir = tmp.join("fs");
        let usage = mkdir(&fs_dir, 0o755, self.umask)
            .and_then(|()| nix::materialize(&fs_dir, &layer.links))
            .and_then(|()| disk_usage(&fs_dir));
        let usage = match usage {
            Ok(u) => u,
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                tracing::warn!(target, error = %e, "cannot build the Nix layer from its labels; it will be fetched");
                return Ok(());
            }
        };
        let paths = layer.closure.len();
        if let Some(n) = &self.nix {
            n.prefetch(&layer);
        }
        let new = NewRecord {
            kind: Kind::Committed,
            labels: labels.clone(),
            usage,
            nix: Some(layer.closure),
            remote: true,
        };
        self.publish(new, key, parent, tmp, |_, _| Ok(()))?;
        tracing::info!(key, target, paths, "made a Nix layer from its labels (remote snapshot)");
        Err(Error::AlreadyExists(format!(
            "target snapshot {target:?} was made from its Nix closure without fetching the layer"
        )))
    }

    /// Records a new snapshot whose tree was built in `tmp` (holding `fs/`
    /// and, for an active snapshot, `work/`), renaming it into place inside
    /// the recording transaction; `then` runs there too and its result is
    /// returned. On failure nothing is recorded and `tmp` is removed.
    fn publish<T>(
        &self,
        new: NewRecord,
        key: &str,
        parent: &str,
        tmp: PathBuf,
        then: impl FnOnce(&db::Record, &[Ancestor]) -> Result<T>,
    ) -> Result<T> {
        let mut published = None;
        let result = self.db.create(new, key, parent, |rec, parents| {
            let fs_dir = tmp.join("fs");
            if let Some(pid) = parents.first().map(|a| a.id) {
                // The new upper starts owned like the parent's root, so a
                // layer's root ownership survives into its children.
                let meta = fs::metadata(self.upper(pid)).map_err(Error::io("cannot stat parent", self.upper(pid)))?;
                std::os::unix::fs::lchown(&fs_dir, Some(meta.uid()), Some(meta.gid()))
                    .map_err(Error::io("cannot chown", &fs_dir))?;
            }
            let dest = self.snapshots_dir().join(rec.id.to_string());
            if let Err(e) = fs::rename(&tmp, &dest) {
                if !matches!(e.kind(), ErrorKind::DirectoryNotEmpty | ErrorKind::AlreadyExists) {
                    return Err(Error::io("cannot publish", &dest)(e));
                }
                // A crash between rename and commit left a directory for an
                // id the database never recorded: it is garbage.
                fs::remove_dir_all(&dest).map_err(Error::io("cannot remove stale", &dest))?;
                fs::rename(&tmp, &dest).map_err(Error::io("cannot publish", &dest))?;
            }
            published = Some(dest);
            then(rec, parents)
        });
        if result.is_err() {
            // Nothing was recorded: remove what we built, wherever it is now.
            for dir in std::iter::once(tmp).chain(published) {
                let _ = fs::remove_dir_all(dir);
            }
        }
        result
    }

    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let (rec, parents) = self
            .db
            .get_with_parents(key)?
            .ok_or_else(|| Error::NotFound(format!("snapshot {key:?} does not exist")))?;
        if rec.kind == Kind::Committed {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} is committed: only active snapshots and views have mounts"
            )));
        }
        let _views = self.views.lock().map_err(|_| Error::Database("lock poisoned".into()))?;
        self.mounts_for(rec.kind, rec.id, &parents)
    }

    /// containerd's overlayfs rules: a bind mount when there is no parent
    /// (or a view of exactly one), otherwise an overlay. Above a Nix layer,
    /// the closure's FUSE view becomes the top-most lower directory, so real
    /// store paths win over the layer's empty mountpoints.
    fn mounts_for(&self, kind: Kind, id: u64, parents: &[Ancestor]) -> Result<Vec<Mount>> {
        let bind = |path: PathBuf, ro: bool| Mount {
            r#type: "bind".into(),
            source: path.display().to_string(),
            target: String::new(),
            options: vec![if ro { "ro" } else { "rw" }.into(), "rbind".into()],
        };
        if parents.is_empty() {
            return Ok(vec![bind(self.upper(id), kind == Kind::View)]);
        }
        let view = match &self.nix {
            Some(n) => n.view_for(parents)?,
            None => None,
        };
        let mut options = Vec::new();
        if self.opts.index_off {
            options.push("index=off".to_string());
        }
        if self.opts.userxattr {
            options.push("userxattr".to_string());
        }
        if kind == Kind::Active {
            options.push(format!("workdir={}", self.work(id).display()));
            options.push(format!("upperdir={}", self.upper(id).display()));
        } else if parents.len() == 1 && view.is_none() {
            return Ok(vec![bind(self.upper(parents[0].id), true)]);
        }
        let lowers: Vec<String> = view
            .into_iter()
            .chain(parents.iter().map(|p| self.upper(p.id)))
            .map(|p| p.display().to_string())
            .collect();
        options.push(format!("lowerdir={}", lowers.join(":")));
        Ok(vec![Mount {
            r#type: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options,
        }])
    }

    pub fn commit(&self, name: &str, key: &str, labels: HashMap<String, String>) -> Result<()> {
        validate_key("snapshot name", name)?;
        validate_key("snapshot key", key)?;
        let labels = clean_labels(name, labels)?;
        let rec = self
            .db
            .get(key)?
            .ok_or_else(|| Error::NotFound(format!("active snapshot {key:?} does not exist")))?;
        if rec.kind != Kind::Active {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} is not active (it is {})",
                rec.kind
            )));
        }
        // Measured outside the write transaction so a large layer does not
        // stall every other call; commit_active re-checks the id.
        let usage = disk_usage(&self.upper(rec.id))?;
        let nix = match &self.nix {
            Some(n) => {
                // Labels may come with Prepare (CRI) or with Commit.
                let mut all = rec.labels.clone();
                all.extend(labels.iter().map(|(k, v)| (k.clone(), v.clone())));
                let closure = n.detect(&self.upper(rec.id), &all)?;
                if let Some(c) = &closure {
                    tracing::info!(name, paths = c.len(), "committed a Nix layer");
                }
                closure
            }
            None => None,
        };
        self.db.commit_active(key, name, rec.id, labels, usage, nix)
    }

    /// Publishes the opened store in `slot`: its evictions close the files
    /// the FUSE store kept open for them, and what the views made before
    /// it opened show is pinned before anything can evict through it.
    pub fn store_opened(&self, slot: &nix::StoreSlot, store: Arc<crate::store::Store>) {
        // Under the lock that adds and drops views: no view is added between
        // the pins and the publication.
        let _views = self.views.lock();
        if let Some(n) = &self.nix {
            store.on_evict(n.fs.evictor());
            let shown = n.fs.shown();
            store.set_pinned(
                shown
                    .iter()
                    .filter_map(|b| crate::nixfmt::StorePath::from_base_name(b).ok())
                    .collect(),
            );
        }
        let _ = slot.set(store);
    }

    /// The FUSE store's state, when Nix layers are served through it.
    pub fn fuse_status(&self) -> Option<FuseStatus> {
        let n = self.nix.as_ref()?;
        Some(FuseStatus {
            views: n.fs.view_names(),
            kept: n.fs.kept(),
            resumed: n.fs.resumed(),
            nodes: n.fs.node_count(),
            open_files: n.fs.open_files(),
        })
    }

    /// FUSE requests served so far, by operation.
    pub fn fuse_requests(&self) -> Vec<(&'static str, u64)> {
        self.nix.as_ref().map(|n| n.fs.request_counts()).unwrap_or_default()
    }

    /// Adds the view of every snapshot that needs one (a resumed FUSE
    /// session: running containers use them); returns how many there are.
    pub fn restore_views(&self) -> Result<usize> {
        let Some(n) = &self.nix else {
            return Ok(0);
        };
        let _views = self.views.lock().map_err(|_| Error::Database("lock poisoned".into()))?;
        for chain in self.db.live_chains()? {
            n.view_for(&chain)?;
        }
        Ok(n.fs.view_names().len())
    }

    /// Starts serving the FUSE store (after [`Snapshotter::restore_views`]).
    pub fn start_store_fs(&self) -> Result<()> {
        match &self.nix {
            Some(n) => n.fs.start().map_err(|e| Error::Fuse(e.to_string())),
            None => Ok(()),
        }
    }

    /// At a stop: while views exist (containers may run on them) the FUSE
    /// session is left to its keeper for the next daemon; otherwise it ends.
    pub fn stop_store_fs(&self) {
        let Some(n) = &self.nix else {
            return;
        };
        let result = if n.has_views() && n.fs.kept() {
            tracing::info!("leaving the FUSE session to its keeper: running containers keep their store");
            n.fs.leave()
        } else {
            n.fs.unmount()
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "stopping the FUSE store");
        }
    }

    /// Unmounts the FUSE store and lets a kept session go: for when the
    /// containers that used it are gone with their namespace.
    pub fn end_store_fs(&self) {
        if let Some(n) = &self.nix {
            if let Err(e) = n.fs.unmount() {
                tracing::warn!(error = %e, "stopping the FUSE store");
            }
        }
    }

    pub fn remove(&self, key: &str) -> Result<()> {
        let _guard = self.dirs.read().map_err(|_| Error::Database("lock poisoned".into()))?;
        let rec = {
            let _views = self.views.lock().map_err(|_| Error::Database("lock poisoned".into()))?;
            let rec = self.db.remove(key)?;
            // A view goes with the last snapshot that needs it.
            if let (Some(n), false) = (&self.nix, rec.kind == Kind::Committed) {
                // Scanning every snapshot is only worth it when a view exists.
                if n.has_views() {
                    n.drop_unused_views(&self.db.live_chains()?);
                }
            }
            rec
        };
        // The record is gone, so the directory is already garbage: a failure
        // here only delays its removal to the next Cleanup.
        let dir = self.snapshots_dir().join(rec.id.to_string());
        if let Err(e) = fs::remove_dir_all(&dir) {
            tracing::warn!(path = %dir.display(), error = %e, "cannot remove snapshot directory; Cleanup will retry");
        }
        Ok(())
    }

    pub fn stat(&self, key: &str) -> Result<Info> {
        self.db
            .get(key)?
            .map(|r| r.info(key))
            .ok_or_else(|| Error::NotFound(format!("snapshot {key:?} does not exist")))
    }

    pub fn update(&self, name: &str, labels: HashMap<String, String>, paths: &[String]) -> Result<Info> {
        check_labels(name, &labels)?;
        self.db.update_labels(name, &labels.into_iter().collect(), paths)
    }

    pub fn usage(&self, key: &str) -> Result<Usage> {
        let rec = self
            .db
            .get(key)?
            .ok_or_else(|| Error::NotFound(format!("snapshot {key:?} does not exist")))?;
        match rec.kind {
            Kind::Active => disk_usage(&self.upper(rec.id)),
            _ => Ok(rec.usage),
        }
    }

    pub fn list(&self, filters: &[String]) -> Result<Vec<Info>> {
        let filter = filter::Filter::parse_any(filters)?;
        let mut out = Vec::new();
        self.db.walk(|key, rec| {
            let info = rec.info(key);
            if filter.matches(&info) {
                out.push(info);
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Removes every directory under `snapshots/` that no record names.
    /// Returns how many were removed.
    pub fn cleanup(&self) -> Result<usize> {
        let _guard = self.dirs.write().map_err(|_| Error::Database("lock poisoned".into()))?;
        let ids = self.db.ids()?;
        let dir = self.snapshots_dir();
        let mut removed = 0;
        for entry in fs::read_dir(&dir).map_err(Error::io("cannot list", &dir))? {
            let entry = entry.map_err(Error::io("cannot list", &dir))?;
            let name = entry.file_name();
            let keep = name
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|id| ids.contains(&id));
            if !keep {
                let path = entry.path();
                tracing::debug!(path = %path.display(), "removing unreferenced snapshot directory");
                fs::remove_dir_all(&path).map_err(Error::io("cannot remove", &path))?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

fn mkdir(path: &Path, mode: u32, umask: u32) -> Result<()> {
    fs::DirBuilder::new()
        .mode(mode)
        .create(path)
        .map_err(Error::io("cannot create", path))?;
    if mode & umask == 0 {
        return Ok(());
    }
    // The umask narrowed the mode; the layout needs it exact (a container's
    // non-root user must be able to traverse the upper directory).
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(Error::io("cannot chmod", path))
}

/// The process umask, read without changing it; assume the worst if unknown.
fn current_umask() -> u32 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o777)
}

/// Creates a fresh `new-<random>` directory; never a name a record could use.
fn tempdir_in(dir: &Path) -> Result<PathBuf> {
    use std::hash::{BuildHasher, Hasher};
    for _ in 0..16 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        );
        let path = dir.join(format!("new-{:016x}", h.finish()));
        match fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => return Ok(path),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io("cannot create", path)(e)),
        }
    }
    Err(Error::Io {
        context: "cannot find a free temporary name in",
        path: dir.to_path_buf(),
        source: std::io::Error::from(std::io::ErrorKind::AlreadyExists),
    })
}
