//! Size-bounded eviction: least recently used paths go first; never a path
//! that is leased (being read) or pinned (needed by a live snapshot).

use std::path::Path;

use super::{poisoned, Result, Store};
use crate::nixfmt::StorePath;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcReport {
    pub removed: Vec<String>,
    pub freed: u64,
    /// Bytes still in the store afterwards.
    pub remaining: u64,
    /// Paths that would have gone but were in use.
    pub kept_in_use: usize,
    /// Bytes of chunks (of paths read by the chunk) removed.
    pub chunks_freed: u64,
}

impl Store {
    /// Evicts until the store uses at most `target` bytes (or nothing
    /// evictable is left): kept chunks first (the oldest; they are fetched
    /// again when read), then least recently used paths.
    pub fn gc(&self, target: u64) -> Result<GcReport> {
        self.flush_uses()?;
        let mut records = self.db.all()?;
        let paths: u64 = records.iter().map(|(_, r)| r.disk_size).sum();
        let chunks = self.indexes.chunk_bytes.load(std::sync::atomic::Ordering::Relaxed);
        let mut report = GcReport {
            remaining: paths + chunks,
            ..Default::default()
        };
        if report.remaining <= target {
            return Ok(report);
        }
        if chunks > 0 {
            let freed = self.collect_chunks(target.saturating_sub(paths));
            report.chunks_freed = freed;
            report.freed += freed;
            report.remaining -= freed.min(report.remaining);
            if report.remaining <= target {
                tracing::info!(chunks_freed = freed, "store garbage collection");
                return Ok(report);
            }
        }
        records.sort_by_key(|(_, r)| r.last_used);
        for (base, rec) in records {
            if report.remaining <= target {
                break;
            }
            let Ok(path) = StorePath::from_base_name(&base) else {
                continue;
            };
            // Holding the lease table while removing means no reader can
            // lease this path between the check and the removal.
            let leases = self.leases.lock().map_err(|_| poisoned())?;
            let pinned = self.pinned.lock().map_err(|_| poisoned())?.contains(&path);
            if pinned || leases.contains_key(&path) {
                report.kept_in_use += 1;
                continue;
            }
            self.remove_unused(&base, &path, leases)?;
            report.freed += rec.disk_size;
            report.remaining -= rec.disk_size;
            report.removed.push(base);
        }
        tracing::info!(
            removed = report.removed.len(),
            freed = report.freed,
            "store garbage collection"
        );
        Ok(report)
    }
}

/// What [`Store::evict`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EvictReport {
    pub evicted: Vec<String>,
    /// Not in the local store (already cold, or only in the host store).
    pub absent: Vec<String>,
    pub freed: u64,
}

impl Store {
    /// Makes `paths` cold: removes them from the local store, so the next
    /// access fetches them again. A path a live snapshot needs (pinned) or
    /// being read now (leased) is refused, by name: the store of a running
    /// container is never pulled from under it.
    pub fn evict(&self, paths: &[StorePath]) -> std::result::Result<EvictReport, super::StoreError> {
        self.flush_uses()?;
        let records: std::collections::HashMap<String, u64> =
            self.db.all()?.into_iter().map(|(b, r)| (b, r.disk_size)).collect();
        let mut report = EvictReport::default();
        for path in paths {
            let base = path.base_name().to_string();
            let leases = self.leases.lock().map_err(|_| poisoned())?;
            let pinned = self.pinned.lock().map_err(|_| poisoned())?.contains(path);
            if pinned || leases.contains_key(path) {
                return Err(super::StoreError::InUse {
                    path: path.to_string(),
                    done: report.evicted.len(),
                });
            }
            // Cold as after a restart: what this run learned of the path
            // (narinfo, listing, index) goes too, and the chunks read of it.
            let chunks = self.forget(path);
            match records.get(&base) {
                Some(size) => {
                    self.remove_unused(&base, path, leases)?;
                    report.freed += size + chunks;
                    report.evicted.push(path.to_string());
                }
                None if chunks > 0 => {
                    // Read by the chunk, never whole: the kernel's cached
                    // pages of it go too.
                    self.tell_evicted(&base);
                    report.freed += chunks;
                    report.evicted.push(path.to_string());
                }
                None => report.absent.push(path.to_string()),
            }
        }
        tracing::info!(
            evicted = report.evicted.len(),
            freed = report.freed,
            "store paths evicted on request"
        );
        Ok(report)
    }

    /// Removes `base` (checked unused under `leases`, which is held until
    /// it is out of readers' way).
    fn remove_unused(
        &self,
        base: &str,
        path: &StorePath,
        leases: std::sync::MutexGuard<'_, std::collections::HashMap<StorePath, usize>>,
    ) -> Result<()> {
        let dir = self.dir().join(base);
        let trash = self.dir().join(format!(".trash-{base}"));
        // Forget first: a crash now leaves an unrecorded directory, which
        // the next start removes.
        self.db.remove(base)?;
        if std::fs::rename(&dir, &trash).is_ok() {
            drop(leases);
            if let Err(e) = remove_tree(&trash) {
                tracing::warn!(path = %trash.display(), error = %e, "cannot delete evicted path");
            }
        }
        if let Ok(mut n) = self.narinfos.lock() {
            n.pop(path);
        }
        self.tell_evicted(base);
        Ok(())
    }
}

/// Deletes a tree whose directories may be read-only (as store paths are).
pub fn remove_tree(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.is_dir() {
        return std::fs::remove_file(path);
    }
    if meta.permissions().mode() & 0o700 != 0o700 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
    }
    for entry in std::fs::read_dir(path)? {
        remove_tree(&entry?.path())?;
    }
    std::fs::remove_dir(path)
}
