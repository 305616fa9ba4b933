//! The inode journal: what a successor process needs to serve the same
//! FUSE connection with every node id meaning what it meant.
//!
//! The kernel names files by node ids that only the serving process can
//! interpret. Every change to that mapping (a node made or verified, a
//! lookup counted or forgotten, a view's ids, a passthrough backing id) is
//! appended here *before* the reply that tells the kernel, to a memfd that
//! the session keeper holds next to the `/dev/fuse` descriptor. So a process
//! dying at any instant leaves a journal that says at least everything the
//! kernel was told; a record whose reply never went out only keeps a node
//! longer than needed. A torn last record (death in mid-write) fails its
//! checksum and is dropped with everything after it.
//!
//! When the journal grows well past its live content it is rewritten into a
//! new memfd, handed to the keeper under the next generation's name, and the
//! old one removed: at every instant the keeper holds a complete journal.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::inodes::StoreNode;
use crate::Keeper;

/// The keeper's name for the `/dev/fuse` descriptor.
pub const FUSE_FD_NAME: &str = "fuse";
/// Journals are kept as `journal.<generation>`; the highest one is current.
const JOURNAL_PREFIX: &str = "journal.";
/// No record is larger (names are at most 255 bytes, paths 4 KiB).
const MAX_RECORD: usize = 64 * 1024;
/// Rewrite when the journal is this much larger than its live content...
const GROWTH: u64 = 4;
/// ...and at least this large.
const MIN_COMPACT: u64 = 1 << 20;
/// A journal larger than this is not ours (or not sane): start afresh.
const MAX_JOURNAL: u64 = 1 << 30;

/// What INIT negotiated, and which mount the connection serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Init {
    pub major: u32,
    pub minor: u32,
    pub passthrough: bool,
    /// The kernel takes `FUSE_NOTIFY_RESEND`.
    pub resend: bool,
    /// `major << 32 | minor` of the mount's device (from mountinfo).
    pub mount_dev: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Record {
    Init(Init),
    /// A process began serving the connection (the first is 0): file
    /// handles of different epochs never collide.
    Epoch(u64),
    View {
        name: String,
        inos: [u64; 3],
    },
    Node {
        ino: u64,
        node: StoreNode,
    },
    Verified(u64),
    /// `n` more lookups of `ino` the kernel holds.
    Lookup {
        ino: u64,
        n: u64,
    },
    Forget {
        ino: u64,
        n: u64,
    },
    Removed(u64),
    Backing {
        ino: u64,
        id: u32,
    },
    /// Backing id `id` of `ino` was closed (a later id of the same inode
    /// is not affected).
    Unbacked {
        ino: u64,
        id: u32,
    },
    /// Node ids up to here were given out (a rewritten journal keeps the
    /// mark of ids the kernel may still hold though their nodes are gone).
    HighWater(u64),
}

/// A store node as the journal keeps it, with the kernel's lookup count
/// (None: never sent in a lookup reply, so never forgotten either).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct KeptNode {
    pub node: StoreNode,
    pub lookups: Option<u64>,
}

/// The state the journal describes.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Model {
    pub init: Option<Init>,
    pub epoch: u64,
    pub views: HashMap<String, [u64; 3]>,
    pub nodes: HashMap<u64, KeptNode>,
    pub backing: HashMap<u64, u32>,
    /// The highest node id ever given out in this session: never reused.
    pub high_water: u64,
}

impl Model {
    pub fn apply(&mut self, r: &Record) {
        match r {
            Record::Init(i) => self.init = Some(*i),
            Record::Epoch(e) => self.epoch = *e,
            Record::View { name, inos } => {
                self.views.insert(name.clone(), *inos);
                self.high_water = self.high_water.max(inos.iter().copied().max().unwrap_or(0));
            }
            Record::Node { ino, node } => {
                self.high_water = self.high_water.max(*ino);
                self.nodes.insert(
                    *ino,
                    KeptNode {
                        node: node.clone(),
                        lookups: None,
                    },
                );
            }
            Record::Verified(ino) => {
                if let Some(n) = self.nodes.get_mut(ino) {
                    n.node.hinted = false;
                }
            }
            Record::Lookup { ino, n } => {
                if let Some(k) = self.nodes.get_mut(ino) {
                    *k.lookups.get_or_insert(0) += n;
                }
            }
            Record::Forget { ino, n } => {
                let gone = match self.nodes.get_mut(ino).and_then(|k| k.lookups.as_mut()) {
                    Some(c) => {
                        *c = c.saturating_sub(*n);
                        *c == 0
                    }
                    None => false,
                };
                if gone {
                    // The kernel forgot the inode: no file of it is open.
                    self.nodes.remove(ino);
                    self.backing.remove(ino);
                }
            }
            Record::Removed(ino) => {
                self.nodes.remove(ino);
            }
            Record::Backing { ino, id } => {
                self.backing.insert(*ino, *id);
            }
            Record::Unbacked { ino, id } => {
                if self.backing.get(ino) == Some(id) {
                    self.backing.remove(ino);
                }
            }
            Record::HighWater(n) => self.high_water = self.high_water.max(*n),
        }
    }

    /// The records that rebuild this model from nothing.
    fn records(&self) -> Vec<Record> {
        let mut out = Vec::with_capacity(2 + self.views.len() + self.nodes.len() * 2 + self.backing.len());
        if let Some(i) = self.init {
            out.push(Record::Init(i));
        }
        out.push(Record::Epoch(self.epoch));
        out.push(Record::HighWater(self.high_water));
        for (name, inos) in &self.views {
            out.push(Record::View {
                name: name.clone(),
                inos: *inos,
            });
        }
        for (ino, k) in &self.nodes {
            out.push(Record::Node {
                ino: *ino,
                node: k.node.clone(),
            });
            if let Some(n) = k.lookups {
                out.push(Record::Lookup { ino: *ino, n });
            }
        }
        for (ino, id) in &self.backing {
            out.push(Record::Backing { ino: *ino, id: *id });
        }
        out
    }

    /// The highest node id ever given out (views included).
    pub fn max_ino(&self) -> u64 {
        self.high_water.max(1)
    }
}

// ---- encoding ----

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn put_u64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(b: &mut Vec<u8>, s: &[u8]) {
    b.extend_from_slice(&(s.len() as u32).to_le_bytes());
    b.extend_from_slice(s);
}

/// Appends `r` as one frame: body length, checksum, body.
fn encode(r: &Record, out: &mut Vec<u8>) {
    let mut b = Vec::with_capacity(64);
    match r {
        Record::Init(i) => {
            b.push(1);
            put_u64(&mut b, u64::from(i.major) << 32 | u64::from(i.minor));
            b.push(u8::from(i.passthrough) | u8::from(i.resend) << 1);
            put_u64(&mut b, i.mount_dev);
        }
        Record::Epoch(e) => {
            b.push(2);
            put_u64(&mut b, *e);
        }
        Record::View { name, inos } => {
            b.push(3);
            put_bytes(&mut b, name.as_bytes());
            for i in inos {
                put_u64(&mut b, *i);
            }
        }
        Record::Node { ino, node } => {
            b.push(4);
            put_u64(&mut b, *ino);
            b.push(u8::from(node.hinted) | u8::from(node.view.is_some()) << 1);
            put_bytes(&mut b, node.base.as_bytes());
            put_bytes(&mut b, node.rel.as_os_str().as_bytes());
            put_bytes(&mut b, node.view.as_deref().unwrap_or("").as_bytes());
        }
        Record::Verified(ino) => {
            b.push(5);
            put_u64(&mut b, *ino);
        }
        Record::Lookup { ino, n } => {
            b.push(6);
            put_u64(&mut b, *ino);
            put_u64(&mut b, *n);
        }
        Record::Forget { ino, n } => {
            b.push(7);
            put_u64(&mut b, *ino);
            put_u64(&mut b, *n);
        }
        Record::Removed(ino) => {
            b.push(8);
            put_u64(&mut b, *ino);
        }
        Record::Backing { ino, id } => {
            b.push(9);
            put_u64(&mut b, *ino);
            put_u64(&mut b, u64::from(*id));
        }
        Record::Unbacked { ino, id } => {
            b.push(10);
            put_u64(&mut b, *ino);
            put_u64(&mut b, u64::from(*id));
        }
        Record::HighWater(n) => {
            b.push(11);
            put_u64(&mut b, *n);
        }
    }
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    put_u64(out, fnv1a(&b));
    out.extend_from_slice(&b);
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Option<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Some(u64::from_le_bytes(a))
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?.to_vec()).ok()
    }
}

fn decode_body(body: &[u8]) -> Option<Record> {
    let mut r = Reader(body);
    let rec = match r.u8()? {
        1 => {
            let v = r.u64()?;
            let flags = r.u8()?;
            Record::Init(Init {
                major: (v >> 32) as u32,
                minor: v as u32,
                passthrough: flags & 1 != 0,
                resend: flags & 2 != 0,
                mount_dev: r.u64()?,
            })
        }
        2 => Record::Epoch(r.u64()?),
        3 => Record::View {
            name: r.string()?,
            inos: [r.u64()?, r.u64()?, r.u64()?],
        },
        4 => {
            let ino = r.u64()?;
            let flags = r.u8()?;
            let base = r.string()?;
            let rel = PathBuf::from(std::ffi::OsStr::from_bytes(r.bytes()?));
            let view = r.string()?;
            Record::Node {
                ino,
                node: StoreNode {
                    base: Arc::from(base),
                    rel,
                    view: (flags & 2 != 0).then(|| Arc::from(view)),
                    hinted: flags & 1 != 0,
                },
            }
        }
        5 => Record::Verified(r.u64()?),
        6 => Record::Lookup {
            ino: r.u64()?,
            n: r.u64()?,
        },
        7 => Record::Forget {
            ino: r.u64()?,
            n: r.u64()?,
        },
        8 => Record::Removed(r.u64()?),
        9 => Record::Backing {
            ino: r.u64()?,
            id: u32::try_from(r.u64()?).ok()?,
        },
        10 => Record::Unbacked {
            ino: r.u64()?,
            id: u32::try_from(r.u64()?).ok()?,
        },
        11 => Record::HighWater(r.u64()?),
        _ => return None,
    };
    r.0.is_empty().then_some(rec)
}

/// The records in `bytes` up to the first damaged one, how many bytes
/// they take, and whether the damage is only a torn last record (a death in
/// mid-write) rather than something in the middle.
pub(crate) fn decode_checked(bytes: &[u8]) -> (Vec<Record>, usize, bool) {
    let (records, at) = decode(bytes);
    let torn_only = match bytes.get(at..at + 4) {
        None => true,
        Some(h) => {
            let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
            // A frame whose declared end is past the end: cut in mid-write.
            len > MAX_RECORD || at + 12 + len >= bytes.len()
        }
    };
    (records, at, torn_only)
}

/// The records in `bytes` up to the first damaged one, and how many bytes
/// they take.
pub(crate) fn decode(bytes: &[u8]) -> (Vec<Record>, usize) {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(head) = bytes.get(at..at + 12) {
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let mut sum = [0u8; 8];
        sum.copy_from_slice(&head[4..12]);
        if len > MAX_RECORD {
            break;
        }
        let Some(body) = bytes.get(at + 12..at + 12 + len) else {
            break;
        };
        if fnv1a(body) != u64::from_le_bytes(sum) {
            break;
        }
        let Some(rec) = decode_body(body) else {
            break;
        };
        out.push(rec);
        at += 12 + len;
    }
    (out, at)
}

// ---- the journal file ----

fn journal_name(generation: u64) -> String {
    format!("{JOURNAL_PREFIX}{generation}")
}

fn new_memfd() -> io::Result<File> {
    let fd = rustix::fs::memfd_create("nix-snapshotter-inodes", rustix::fs::MemfdFlags::CLOEXEC)?;
    Ok(File::from(fd))
}

/// A journal found among the keeper's descriptors, replayed.
pub(crate) struct Loaded {
    pub model: Model,
    pub generation: u64,
    file: File,
    len: u64,
}

/// Picks the newest journal among `fds` and replays it. None when there is
/// none, or it does not start with what INIT negotiated.
pub(crate) fn load(fds: &mut Vec<(String, OwnedFd)>) -> Option<Loaded> {
    let (i, generation) = fds
        .iter()
        .enumerate()
        .filter_map(|(i, (n, _))| Some((i, n.strip_prefix(JOURNAL_PREFIX)?.parse::<u64>().ok()?)))
        .max_by_key(|(_, g)| *g)?;
    let file = File::from(fds.remove(i).1);
    let size = file.metadata().ok()?.len();
    if size > MAX_JOURNAL {
        tracing::warn!(size, "the inode journal is implausibly large; not resuming");
        return None;
    }
    let mut bytes = vec![0u8; size as usize];
    file.read_exact_at(&mut bytes, 0).ok()?;
    let (records, len, torn_only) = decode_checked(&bytes);
    if !torn_only {
        // Records after the damage are lost: node ids the kernel holds
        // could be misread or given out again. Not worth the risk.
        tracing::error!(
            at = len,
            size = bytes.len(),
            "the inode journal is damaged (or written by a newer version); not resuming"
        );
        return None;
    }
    if len < bytes.len() {
        tracing::warn!(
            dropped = bytes.len() - len,
            "the inode journal ends in a torn record; dropping it"
        );
    }
    let mut model = Model::default();
    for r in &records {
        model.apply(r);
    }
    model.init?;
    Some(Loaded {
        model,
        generation,
        file,
        len: len as u64,
    })
}

struct Inner {
    file: File,
    generation: u64,
    len: u64,
    /// Compact past this length.
    compact_at: u64,
    model: Model,
    /// A write failed: the keeper no longer holds a journal, and nothing
    /// more is written (a successor mounts afresh).
    broken: bool,
    /// The session was left to a successor: this process writes no more.
    sealed: bool,
}

/// The journal being written, shared by the inode table and the open files.
pub(crate) struct Journal {
    inner: Mutex<Inner>,
    keeper: Arc<dyn Keeper>,
}

impl Journal {
    /// Starts a journal of `model` under generation `generation`, handed to
    /// the keeper (which drops older generations it held).
    pub fn create(keeper: Arc<dyn Keeper>, model: Model, generation: u64, old: Option<u64>) -> io::Result<Journal> {
        let (file, len) = write_snapshot(&model)?;
        keeper.put(&journal_name(generation), file.as_fd())?;
        if let Some(old) = old {
            let _ = keeper.remove(&journal_name(old));
        }
        Ok(Journal {
            inner: Mutex::new(Inner {
                file,
                generation,
                len,
                compact_at: (len * GROWTH).max(MIN_COMPACT),
                model,
                broken: false,
                sealed: false,
            }),
            keeper,
        })
    }

    /// Continues a journal loaded from the keeper (which still holds it).
    pub fn resume(keeper: Arc<dyn Keeper>, loaded: Loaded) -> io::Result<Journal> {
        // Cut a torn tail so that new records follow the last good one.
        loaded.file.set_len(loaded.len)?;
        Ok(Journal {
            inner: Mutex::new(Inner {
                file: loaded.file,
                generation: loaded.generation,
                len: loaded.len,
                compact_at: (loaded.len * GROWTH).max(MIN_COMPACT),
                model: loaded.model,
                broken: false,
                sealed: false,
            }),
            keeper,
        })
    }

    pub fn append(&self, r: Record) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.broken || inner.sealed {
            return;
        }
        let mut buf = Vec::with_capacity(64);
        encode(&r, &mut buf);
        inner.model.apply(&r);
        let at = inner.len;
        match inner.file.write_all_at(&buf, at) {
            Ok(()) => inner.len += buf.len() as u64,
            Err(e) => return self.break_off(&mut inner, &e),
        }
        if inner.len > inner.compact_at {
            self.compact(&mut inner);
        }
    }

    fn compact(&self, inner: &mut Inner) {
        let next = inner.generation + 1;
        let result = write_snapshot(&inner.model)
            .and_then(|(file, len)| self.keeper.put(&journal_name(next), file.as_fd()).map(|()| (file, len)));
        match result {
            Ok((file, len)) => {
                let _ = self.keeper.remove(&journal_name(inner.generation));
                tracing::debug!(from = inner.len, to = len, "inode journal compacted");
                inner.file = file;
                inner.len = len;
                inner.generation = next;
                inner.compact_at = (len * GROWTH).max(MIN_COMPACT);
            }
            // The old journal is still whole and held: keep writing it,
            // and try again after as much growth again.
            Err(e) => {
                tracing::warn!(error = %e, "cannot compact the inode journal");
                inner.compact_at = inner.len.saturating_mul(2);
            }
        }
    }

    fn break_off(&self, inner: &mut Inner, e: &io::Error) {
        tracing::error!(error = %e, "cannot write the inode journal; the session ends with this process");
        inner.broken = true;
        // The descriptor too: a successor must not resume a session whose
        // node ids it cannot read.
        let _ = self.keeper.clear();
    }

    /// Writes nothing more: a successor owns the journal from now on (once
    /// this returns, no write of this process is under way).
    pub fn seal(&self) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).sealed = true;
    }

    /// Whether this process no longer writes (sealed, or a write failed).
    pub fn stopped(&self) -> bool {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.sealed || inner.broken
    }

    /// What INIT negotiated (the journal's first record).
    pub fn init(&self) -> Option<Init> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).model.init
    }

    /// Whether a write failed (the keeper was told to let go).
    pub fn broken(&self) -> bool {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).broken
    }
}

fn write_snapshot(model: &Model) -> io::Result<(File, u64)> {
    let file = new_memfd()?;
    let mut buf = Vec::new();
    for r in model.records() {
        encode(&r, &mut buf);
    }
    file.write_all_at(&buf, 0)?;
    Ok((file, buf.len() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(base: &str, rel: &str, view: Option<&str>, hinted: bool) -> StoreNode {
        StoreNode {
            base: Arc::from(base),
            rel: PathBuf::from(rel),
            view: view.map(Arc::from),
            hinted,
        }
    }

    fn sample() -> Vec<Record> {
        vec![
            Record::Init(Init {
                major: 7,
                minor: 41,
                passthrough: true,
                resend: true,
                mount_dev: 54 << 32 | 3,
            }),
            Record::Epoch(2),
            Record::View {
                name: "v1".into(),
                inos: [2, 3, 4],
            },
            Record::Node {
                ino: 5,
                node: node("aaa-x", "", Some("v1"), true),
            },
            Record::Node {
                ino: 6,
                node: node("aaa-x", "bin/sh", None, false),
            },
            Record::Lookup { ino: 5, n: 1 },
            Record::Lookup { ino: 6, n: 1 },
            Record::Lookup { ino: 6, n: 1 },
            Record::Lookup { ino: 6, n: 1 },
            Record::Verified(5),
            Record::Backing { ino: 6, id: 9 },
            Record::Forget { ino: 6, n: 1 },
            Record::Node {
                ino: 7,
                node: node("bbb-y", "lib", Some("v1"), false),
            },
            Record::Lookup { ino: 7, n: 1 },
            Record::Forget { ino: 7, n: 1 },
            Record::Node {
                ino: 8,
                node: node("ccc-z", "", Some("v1"), true),
            },
            Record::Removed(8),
        ]
    }

    fn model_of(records: &[Record]) -> Model {
        let mut m = Model::default();
        for r in records {
            m.apply(r);
        }
        m
    }

    #[test]
    fn records_round_trip() {
        let mut buf = Vec::new();
        for r in sample() {
            encode(&r, &mut buf);
        }
        let (back, len) = decode(&buf);
        assert_eq!(len, buf.len());
        assert_eq!(back, sample());
    }

    #[test]
    fn replay_keeps_live_nodes_and_counts() {
        let m = model_of(&sample());
        assert_eq!(m.nodes.len(), 2, "7 was forgotten and 8 removed");
        assert_eq!(m.nodes[&5].lookups, Some(1));
        assert!(!m.nodes[&5].node.hinted);
        assert_eq!(m.nodes[&6].lookups, Some(2));
        assert_eq!(m.backing[&6], 9);
        assert_eq!(m.max_ino(), 8, "the highest id ever given (8 was removed)");
    }

    #[test]
    fn a_snapshot_rebuilds_the_same_model() {
        let m = model_of(&sample());
        let mut buf = Vec::new();
        for r in m.records() {
            encode(&r, &mut buf);
        }
        let (records, _) = decode(&buf);
        assert_eq!(model_of(&records), m);
    }

    #[test]
    fn a_torn_or_damaged_tail_is_dropped() {
        let mut buf = Vec::new();
        for r in sample() {
            encode(&r, &mut buf);
        }
        let whole = buf.len();
        for cut in [whole - 1, whole - 5, 13] {
            let (records, len) = decode(&buf[..cut]);
            assert!(len <= cut);
            assert!(records.len() < sample().len());
            assert_eq!(records[..], sample()[..records.len()]);
        }
        // A flipped bit in the middle ends the journal there.
        let mut bad = buf.clone();
        bad[whole / 2] ^= 0x40;
        let (records, _) = decode(&bad);
        assert!(records.len() < sample().len());
        assert_eq!(records[..], sample()[..records.len()]);
    }

    #[test]
    fn node_ids_once_given_are_never_given_again() {
        let mut records = sample();
        records.push(Record::Removed(6));
        records.push(Record::Forget { ino: 5, n: 1 });
        let m = model_of(&records);
        assert!(m.nodes.is_empty());
        assert_eq!(m.max_ino(), 8, "ids 7 and 8 went, but the kernel may hold them");
        // Also through a rewrite.
        let mut buf = Vec::new();
        for r in m.records() {
            encode(&r, &mut buf);
        }
        assert_eq!(model_of(&decode(&buf).0).max_ino(), 8);
    }

    #[test]
    fn a_closed_backing_id_does_not_close_a_newer_one() {
        let mut m = model_of(&sample());
        m.apply(&Record::Backing { ino: 6, id: 10 });
        m.apply(&Record::Unbacked { ino: 6, id: 9 });
        assert_eq!(m.backing[&6], 10);
        m.apply(&Record::Unbacked { ino: 6, id: 10 });
        assert!(!m.backing.contains_key(&6));
    }

    #[test]
    fn damage_in_the_middle_is_told_from_a_torn_tail() {
        let mut buf = Vec::new();
        for r in sample() {
            encode(&r, &mut buf);
        }
        let (_, _, torn) = decode_checked(&buf[..buf.len() - 3]);
        assert!(torn);
        let mut bad = buf.clone();
        bad[40] ^= 0x01;
        let (_, _, torn) = decode_checked(&bad);
        assert!(!torn, "a flipped bit mid-journal is damage, not a tear");
        let (_, len, torn) = decode_checked(&buf);
        assert!(torn && len == buf.len());
    }

    #[test]
    fn garbage_is_no_journal() {
        for junk in [&b""[..], b"\xff\xff\xff\xff", &[0u8; 64], b"not a journal at all"] {
            let (records, _) = decode(junk);
            assert!(records.is_empty());
        }
    }
}
