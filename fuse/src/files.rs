//! Open store files: handles given to the kernel, a bounded cache of backing
//! files, and one passthrough backing id per inode.

use std::collections::HashMap;
use std::fs::File;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use fuser::BackingId;

/// An open backing file and, with passthrough, its kernel backing id.
pub(crate) type OpenFile = (Arc<File>, Option<Arc<BackingId>>);

pub(crate) struct Files {
    /// Recently opened store files. Reusing them makes a repeated open (every
    /// container start opens the same libraries) one round trip with no
    /// syscalls here. Bounded by the daemon's file descriptor budget.
    recent: Mutex<lru::LruCache<u64, OpenFile>>,
    /// One backing id per inode while any open holds it: a second id for a
    /// busy inode makes the kernel fail the open, also after `recent`
    /// evicted it and after passthrough was turned off.
    weak: Mutex<HashMap<u64, Weak<BackingId>>>,
    /// Handles the kernel holds.
    opens: Mutex<HashMap<u64, OpenFile>>,
    next_fh: AtomicU64,
}

impl Files {
    pub fn new(capacity: usize) -> Files {
        Files {
            recent: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN),
            )),
            weak: Mutex::new(HashMap::new()),
            opens: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
        }
    }

    pub fn recent(&self, ino: u64) -> Option<OpenFile> {
        self.recent.lock().ok()?.get(&ino).cloned()
    }

    /// Stops reusing `ino`'s open backing file (its store path is gone).
    pub fn forget(&self, ino: u64) {
        if let Ok(mut c) = self.recent.lock() {
            c.pop(&ino);
        }
    }

    /// The live backing id of `ino`, if an open still holds one.
    pub fn live_backing(&self, ino: u64) -> Option<Arc<BackingId>> {
        self.weak.lock().ok()?.get(&ino).and_then(Weak::upgrade)
    }

    /// Makes a backing id for `ino` with `make`, unless one is live; the
    /// check and the insertion are one step, so two opens never make two.
    pub fn backing_or(
        &self,
        ino: u64,
        make: impl FnOnce() -> std::io::Result<BackingId>,
    ) -> std::io::Result<Arc<BackingId>> {
        let mut weak = self.weak.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(id) = weak.get(&ino).and_then(Weak::upgrade) {
            return Ok(id);
        }
        let id = Arc::new(make()?);
        if weak.len() > 4096 {
            weak.retain(|_, w| w.strong_count() > 0);
        }
        weak.insert(ino, Arc::downgrade(&id));
        Ok(id)
    }

    /// Records an open of `ino`; returns its handle.
    pub fn opened(&self, ino: u64, file: OpenFile) -> u64 {
        if let Ok(mut c) = self.recent.lock() {
            c.put(ino, file.clone());
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut o) = self.opens.lock() {
            o.insert(fh, file);
        }
        fh
    }

    pub fn file(&self, fh: u64) -> Option<Arc<File>> {
        self.opens.lock().ok()?.get(&fh).map(|o| o.0.clone())
    }

    pub fn release(&self, fh: u64) {
        if let Ok(mut o) = self.opens.lock() {
            o.remove(&fh);
        }
    }
}
