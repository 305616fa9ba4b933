//! Telling the kernel to forget what it cached: a name in a directory, a
//! directory's listing, a file's pages.
//!
//! One thread sends every notification, in the order asked. A worker never
//! sends one itself: a notification about a directory blocks while the
//! kernel waits for our answer to a request in that directory, which the
//! worker would then never give. One thread for all of them, rather than a
//! thread each, because views are added and dropped on the path of every
//! container start and stop.

use std::ffi::OsString;
use std::sync::mpsc::{channel, Sender};
use std::sync::Mutex;

use fuser::INodeNo;

/// Something the kernel is told to forget.
pub(crate) enum Inval {
    /// A node's attributes and cached pages (for a directory, its listing).
    Inode(u64),
    /// The entry `name` in directory `parent`.
    Entry { parent: u64, name: OsString },
}

/// The sending end; the thread ends when it is dropped.
pub(crate) struct Invalidator {
    tx: Mutex<Sender<Inval>>,
}

impl Invalidator {
    /// Starts the thread that sends through `notifier`; None when no thread
    /// can be had (then nothing is invalidated, and the kernel's caches
    /// expire by themselves).
    pub fn start(notifier: fuser::Notifier) -> Option<Invalidator> {
        let (tx, rx) = channel::<Inval>();
        let spawned = std::thread::Builder::new().name("fuse-inval".into()).spawn(move || {
            for inval in rx {
                let result = match &inval {
                    Inval::Inode(ino) => notifier.inval_inode(INodeNo(*ino), 0, 0),
                    Inval::Entry { parent, name } => notifier.inval_entry(INodeNo(*parent), name),
                };
                // ENOENT: the kernel no longer has it, which is the point.
                if let Err(e) = result {
                    tracing::debug!(error = %e, "invalidating a kernel cache entry");
                }
            }
        });
        match spawned {
            Ok(_) => Some(Invalidator { tx: Mutex::new(tx) }),
            Err(e) => {
                tracing::warn!(error = %e, "no thread to invalidate the kernel's caches; they expire by themselves");
                None
            }
        }
    }

    pub fn send(&self, invals: impl IntoIterator<Item = Inval>) {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        for i in invals {
            // Only fails once the thread is gone, with the session.
            let _ = tx.send(i);
        }
    }
}
