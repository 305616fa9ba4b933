//! Open store files: handles given to the kernel, a bounded cache of backing
//! files, and one passthrough backing id per inode.

use std::collections::HashMap;
use std::fs::File;
use std::num::NonZeroUsize;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use fuser::BackingId;

use crate::journal::{Journal, Record};

/// A passthrough backing id of one inode. The journal hears of it when it
/// is made and when it is closed, so that a successor reuses it for the
/// files the kernel still has open (a second id for a busy inode fails).
pub(crate) struct Backing {
    /// Closed on drop, unless the session was left to a successor (which
    /// may still need it for files the kernel has open).
    pub id: std::mem::ManuallyDrop<BackingId>,
    raw: u32,
    ino: u64,
    journal: Option<Arc<Journal>>,
}

impl Backing {
    pub fn new(id: BackingId, raw: u32, ino: u64, journal: Option<Arc<Journal>>) -> Backing {
        if let Some(j) = &journal {
            j.append(Record::Backing { ino, id: raw });
        }
        Backing {
            id: std::mem::ManuallyDrop::new(id),
            raw,
            ino,
            journal,
        }
    }
}

impl Backing {
    /// Wraps a backing id an earlier process recorded (no new record).
    pub fn adopted(id: BackingId, raw: u32, ino: u64, journal: Option<Arc<Journal>>) -> Backing {
        Backing {
            id: std::mem::ManuallyDrop::new(id),
            raw,
            ino,
            journal,
        }
    }
}

impl Drop for Backing {
    fn drop(&mut self) {
        if let Some(j) = &self.journal {
            if j.stopped() {
                // Left to a successor, which adopts it: not ours to close.
                return;
            }
            // Before the id closes: a successor must never reuse a closed id.
            j.append(Record::Unbacked {
                ino: self.ino,
                id: self.raw,
            });
        }
        // SAFETY (of ManuallyDrop::drop): `id` is dropped once, here, and
        // not used after.
        unsafe { std::mem::ManuallyDrop::drop(&mut self.id) };
    }
}

/// An open backing file and, with passthrough, its kernel backing id.
pub(crate) type OpenFile = (Arc<File>, Option<Arc<Backing>>);

pub(crate) struct Files {
    /// Recently opened store files. Reusing them makes a repeated open (every
    /// container start opens the same libraries) one round trip with no
    /// syscalls here. Bounded by the daemon's file descriptor budget.
    recent: Mutex<lru::LruCache<u64, OpenFile>>,
    /// One backing id per inode while any open holds it: a second id for a
    /// busy inode makes the kernel fail the open, also after `recent`
    /// evicted it and after passthrough was turned off.
    weak: Mutex<HashMap<u64, Weak<Backing>>>,
    /// Backing ids an earlier process of this session made, by inode
    /// (from the journal): the kernel may have files open with them, whose
    /// releases went to that process. Kept until the kernel forgets the
    /// inode (no file of it can be open then).
    adopted: Mutex<HashMap<u64, Adopted>>,
    /// Handles the kernel holds, with their inode.
    opens: Mutex<HashMap<u64, (u64, OpenFile)>>,
    /// Inodes opened without a backing file (read from a verified tree):
    /// the kernel may still have them open so, and refuses passthrough on
    /// an inode open without it.
    unbacked: Mutex<std::collections::HashSet<u64>>,
    next_fh: AtomicU64,
}

enum Adopted {
    Raw(u32),
    Held(Arc<Backing>),
}

/// File handles of one process: `epoch` in the high bits, so a successor's
/// handles never collide with those the kernel got from its predecessors.
pub(crate) fn first_handle(epoch: u64) -> u64 {
    (epoch << 40) | 1
}

impl Files {
    pub fn new(capacity: usize, epoch: u64) -> Files {
        Files {
            recent: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN),
            )),
            weak: Mutex::new(HashMap::new()),
            adopted: Mutex::new(HashMap::new()),
            opens: Mutex::new(HashMap::new()),
            unbacked: Mutex::new(std::collections::HashSet::new()),
            next_fh: AtomicU64::new(first_handle(epoch)),
        }
    }

    /// Takes over the backing ids an earlier process made.
    pub fn adopt(&self, ids: &HashMap<u64, u32>) {
        if let Ok(mut a) = self.adopted.lock() {
            a.extend(ids.iter().map(|(ino, id)| (*ino, Adopted::Raw(*id))));
        }
    }

    /// The adopted backing id of `ino`, wrapped by `wrap` on first use.
    pub fn adopted(&self, ino: u64, wrap: impl FnOnce(u32) -> Backing) -> Option<Arc<Backing>> {
        let mut a = self.adopted.lock().ok()?;
        let slot = a.get_mut(&ino)?;
        let held = match slot {
            Adopted::Held(b) => b.clone(),
            Adopted::Raw(id) => {
                let b = Arc::new(wrap(*id));
                *slot = Adopted::Held(b.clone());
                b
            }
        };
        if let Ok(mut w) = self.weak.lock() {
            w.insert(ino, Arc::downgrade(&held));
        }
        Some(held)
    }

    /// The kernel forgot `ino`: an adopted backing id of it is closed
    /// (directly on `dev` when never wrapped).
    pub fn release_adopted(&self, ino: u64, dev: Option<&OwnedFd>, journal: Option<&Arc<Journal>>) {
        let gone = self.adopted.lock().ok().and_then(|mut a| a.remove(&ino));
        if let (Some(Adopted::Raw(id)), Some(dev)) = (gone, dev) {
            if let Some(j) = journal {
                j.append(Record::Unbacked { ino, id });
            }
            if let Err(e) = BackingId::close_raw(dev, id) {
                tracing::debug!(error = %e, id, "closing an adopted backing id");
            }
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
    pub fn live_backing(&self, ino: u64) -> Option<Arc<Backing>> {
        self.weak.lock().ok()?.get(&ino).and_then(Weak::upgrade)
    }

    /// Makes a backing id for `ino` with `make`, unless one is live; the
    /// check and the insertion are one step, so two opens never make two.
    pub fn backing_or(
        &self,
        ino: u64,
        make: impl FnOnce() -> std::io::Result<Backing>,
    ) -> std::io::Result<Arc<Backing>> {
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

    /// Notes that `ino` was opened without a backing file.
    pub fn opened_unbacked(&self, ino: u64) {
        if let Ok(mut u) = self.unbacked.lock() {
            u.insert(ino);
        }
    }

    /// Whether `ino` was ever opened without a backing file (it must then
    /// never be opened with passthrough).
    pub fn was_unbacked(&self, ino: u64) -> bool {
        self.unbacked.lock().map(|u| u.contains(&ino)).unwrap_or(true)
    }

    /// Keeps `ino`'s backing file for reads without a handle (the kernel
    /// opens files itself once told opens are not implemented).
    pub fn keep(&self, ino: u64, file: OpenFile) {
        if let Ok(mut c) = self.recent.lock() {
            c.put(ino, file);
        }
    }

    /// Whether any passthrough backing id is live or adopted: files of
    /// such inodes must keep being opened through us.
    pub fn has_backings(&self) -> bool {
        let live = self
            .weak
            .lock()
            .map(|w| w.values().any(|b| b.strong_count() > 0))
            .unwrap_or(true);
        live || self.adopted.lock().map(|a| !a.is_empty()).unwrap_or(true)
    }

    /// Records an open of `ino`; returns its handle.
    pub fn opened(&self, ino: u64, file: OpenFile) -> u64 {
        if let Ok(mut c) = self.recent.lock() {
            c.put(ino, file.clone());
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.insert(fh, ino, file);
        fh
    }

    /// Serves handle `fh` (one an earlier process gave) from `file`.
    pub fn insert(&self, fh: u64, ino: u64, file: OpenFile) {
        if let Ok(mut o) = self.opens.lock() {
            o.insert(fh, (ino, file));
        }
    }

    /// The file behind handle `fh` of inode `ino`; None for a handle this
    /// process did not give (an earlier one did).
    pub fn file(&self, fh: u64, ino: u64) -> Option<Arc<File>> {
        match self.opens.lock().ok()?.get(&fh) {
            Some((i, o)) if *i == ino => Some(o.0.clone()),
            _ => None,
        }
    }

    /// Handles the kernel holds now.
    pub fn open_count(&self) -> usize {
        self.opens.lock().map(|o| o.len()).unwrap_or(0)
    }

    pub fn release(&self, fh: u64) {
        if let Ok(mut o) = self.opens.lock() {
            o.remove(&fh);
        }
    }
}
