//! The inode table: which node id stands for what.
//!
//! Directories get one node id per view (a directory may have only one
//! parent in the kernel's dentry cache), so `<v1>/nix/store/X` and
//! `<v2>/nix/store/X` are distinct directories. Everything else (files,
//! symlinks) has one id whatever view it is seen through, so the kernel's
//! page cache for a store file is shared between containers.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::journal::{Journal, Model, Record};
use crate::ClosureEntry;

#[derive(Debug, Clone)]
pub(crate) enum Node {
    Root,
    /// `<view>`, `<view>/nix`, `<view>/nix/store`
    ViewDir {
        view: Arc<View>,
        depth: u8,
    },
    /// Something at `rel` inside store path `base` (`rel` empty: the path itself).
    Store(StoreNode),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct StoreNode {
    pub base: Arc<str>,
    pub rel: PathBuf,
    /// The view a directory belongs to; None for anything else.
    pub view: Option<Arc<str>>,
    /// Made from a hint (the image's mountpoint, a `.ls` listing) before
    /// the store path was fetched: a directory only until verified.
    pub hinted: bool,
}

#[derive(Debug)]
pub(crate) struct View {
    pub name: Arc<str>,
    /// Sorted by name.
    pub closure: Vec<ClosureEntry>,
    pub inos: [u64; 3],
}

impl View {
    pub fn entry(&self, name: &OsStr) -> Option<&ClosureEntry> {
        let name = name.to_str()?;
        self.closure
            .binary_search_by(|e| e.base_name.as_str().cmp(name))
            .ok()
            .map(|i| &self.closure[i])
    }
}

/// Key of a store node: (view for directories, store path, relative path).
pub(crate) type StoreKey = (Option<Arc<str>>, Arc<str>, PathBuf);

impl StoreNode {
    pub(crate) fn key(&self) -> StoreKey {
        (self.view.clone(), self.base.clone(), self.rel.clone())
    }
}

#[derive(Default)]
pub(crate) struct Inodes {
    pub nodes: HashMap<u64, Node>,
    store: HashMap<StoreKey, u64>,
    /// How many lookups of each store node the kernel holds: a node whose
    /// count the kernel forgets down to 0 is dropped, so the table is
    /// bounded by what the kernel caches, not by all ever seen.
    lookups: HashMap<u64, u64>,
    pub views: HashMap<String, Arc<View>>,
    /// Inode numbers ever given to each view name: a view dropped and added
    /// again gets the same ones, so entries the kernel still caches stay right.
    view_inos: HashMap<String, [u64; 3]>,
    /// Where every change is written before the kernel hears of it, when
    /// the session is kept across restarts.
    pub journal: Option<Arc<Journal>>,
}

impl Inodes {
    /// The node id of `node`, allocating one on first use; `looked_up`:
    /// it goes to the kernel in a lookup reply, which the kernel will
    /// forget. A verified node replaces a hinted one under the same key.
    pub fn store_ino(&mut self, next: &AtomicU64, node: &StoreNode, looked_up: bool) -> u64 {
        let key = node.key();
        let ino = match self.store.get(&key) {
            Some(ino) => {
                if !node.hinted {
                    if let Some(Node::Store(n)) = self.nodes.get_mut(ino) {
                        if n.hinted {
                            n.hinted = false;
                            self.record(Record::Verified(*ino));
                        }
                    }
                }
                *ino
            }
            None => {
                let ino = next.fetch_add(1, Ordering::Relaxed);
                self.store.insert(key, ino);
                self.nodes.insert(ino, Node::Store(node.clone()));
                self.record(Record::Node {
                    ino,
                    node: node.clone(),
                });
                ino
            }
        };
        if looked_up {
            *self.lookups.entry(ino).or_insert(0) += 1;
            self.record(Record::Lookup { ino, n: 1 });
        }
        ino
    }

    fn record(&self, r: Record) {
        if let Some(j) = &self.journal {
            j.append(r);
        }
    }

    /// The table a journal describes (views come back with `add_view`).
    pub fn restore(model: &Model, journal: Option<Arc<Journal>>) -> Inodes {
        let mut t = Inodes {
            journal,
            ..Default::default()
        };
        for (ino, kept) in &model.nodes {
            t.store.insert(kept.node.key(), *ino);
            t.nodes.insert(*ino, Node::Store(kept.node.clone()));
            if let Some(n) = kept.lookups {
                t.lookups.insert(*ino, n);
            }
        }
        t.view_inos = model.views.clone();
        t
    }

    /// Drops the nodes that showed store path `base` as a directory on a
    /// hint's word, now refuted; returns whether there were any. The kernel
    /// may still hold them (an overlay's cached entry): requests for them
    /// then find no node, and get ENOENT.
    pub fn drop_hinted(&mut self, base: &str) -> bool {
        let gone: Vec<u64> = self
            .nodes
            .iter()
            .filter(|(_, n)| matches!(n, Node::Store(sn) if sn.hinted && &*sn.base == base))
            .map(|(ino, _)| *ino)
            .collect();
        for ino in &gone {
            self.remove_store_node(*ino);
            self.record(Record::Removed(*ino));
        }
        !gone.is_empty()
    }

    /// Forgets store node `ino`: the node, its key and its lookup count.
    fn remove_store_node(&mut self, ino: u64) {
        if let Some(Node::Store(sn)) = self.nodes.remove(&ino) {
            self.store.remove(&sn.key());
        }
        self.lookups.remove(&ino);
    }

    /// The kernel dropped `n` of its lookups of `ino`; returns whether the
    /// node went with them.
    pub fn forget(&mut self, ino: u64, n: u64) -> bool {
        let Some(count) = self.lookups.get_mut(&ino) else {
            return false;
        };
        *count = count.saturating_sub(n);
        if let Some(j) = &self.journal {
            j.append(Record::Forget { ino, n });
        }
        if *count > 0 {
            return false;
        }
        self.remove_store_node(ino);
        true
    }

    pub fn find_store(&self, node: &StoreNode) -> Option<u64> {
        self.store.get(&node.key()).copied()
    }

    /// Adds view `name` unless present; returns whether it was added.
    pub fn add_view(&mut self, next: &AtomicU64, name: &str, closure: &[ClosureEntry]) -> bool {
        if self.views.contains_key(name) {
            return false;
        }
        let mut closure = closure.to_vec();
        closure.sort();
        closure.dedup_by(|a, b| a.base_name == b.base_name);
        let inos = match self.view_inos.get(name) {
            Some(inos) => *inos,
            None => {
                let inos = [0, 1, 2].map(|_| next.fetch_add(1, Ordering::Relaxed));
                self.view_inos.insert(name.to_string(), inos);
                self.record(Record::View {
                    name: name.to_string(),
                    inos,
                });
                inos
            }
        };
        let view = Arc::new(View {
            name: Arc::from(name),
            closure,
            inos,
        });
        for (depth, ino) in inos.iter().enumerate() {
            self.nodes.insert(
                *ino,
                Node::ViewDir {
                    view: view.clone(),
                    depth: depth as u8,
                },
            );
        }
        self.views.insert(name.to_string(), view);
        true
    }

    /// Forgets view `name`. Its store nodes stay: the kernel may still hold
    /// entries for them, and a view added again must find them whole.
    pub fn remove_view(&mut self, name: &str) {
        if let Some(view) = self.views.remove(name) {
            for ino in view.inos {
                self.nodes.remove(&ino);
            }
        }
    }

    /// The `nix/store` directories of the views that list `base`.
    pub fn store_dirs_listing(&self, base: &str) -> Vec<u64> {
        self.views
            .values()
            .filter(|v| v.entry(OsStr::new(base)).is_some())
            .map(|v| v.inos[2])
            .collect()
    }
}
