//! The store's recent downloads, numbered: what `nix-snapshotter bench`
//! (through the admin API) asks after a run to learn exactly which store
//! paths it fetched, by what means and how long each took. Bounded: the
//! oldest records go first.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

/// Records kept at most.
pub const MAX_RECORDS: usize = 4096;

/// How a download got its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A whole NAR, streamed and unpacked.
    Path,
    /// A run of frames of a seekable NAR (file-granular reading).
    Range,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Path => "path",
            Kind::Range => "range",
        }
    }
}

/// One download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Numbered from 1, in the order they ended.
    pub seq: u64,
    /// `/nix/store/<hash>-<name>`
    pub path: String,
    pub kind: Kind,
    pub cache: String,
    /// Bytes that came over the wire (0 for a path made from kept chunks).
    pub bytes: u64,
    pub took: Duration,
    /// Why it failed; empty when it did not.
    pub error: String,
}

#[derive(Default)]
pub struct Journal {
    inner: Mutex<(u64, VecDeque<Record>)>,
}

impl Journal {
    /// Adds a record (its `seq` is assigned here).
    pub fn add(&self, mut r: Record) {
        let Ok(mut g) = self.inner.lock() else {
            return;
        };
        g.0 += 1;
        r.seq = g.0;
        if g.1.len() == MAX_RECORDS {
            g.1.pop_front();
        }
        g.1.push_back(r);
    }

    /// Records after `seq`, and the last number given so far. A caller that
    /// asks with an old `seq` may have missed records: `first_kept` says.
    pub fn since(&self, seq: u64) -> (Vec<Record>, u64, u64) {
        let Ok(g) = self.inner.lock() else {
            return (Vec::new(), 0, 0);
        };
        let first_kept = g.1.front().map_or(g.0 + 1, |r| r.seq);
        (g.1.iter().filter(|r| r.seq > seq).cloned().collect(), g.0, first_kept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(path: &str) -> Record {
        Record {
            seq: 0,
            path: path.into(),
            kind: Kind::Path,
            cache: "http://c".into(),
            bytes: 1,
            took: Duration::from_millis(1),
            error: String::new(),
        }
    }

    #[test]
    fn records_are_numbered_kept_in_order_and_bounded() {
        let j = Journal::default();
        assert_eq!(j.since(0), (vec![], 0, 1));
        j.add(rec("/nix/store/a"));
        j.add(rec("/nix/store/b"));
        let (after_first, last, first_kept) = j.since(1);
        assert_eq!((last, first_kept), (2, 1));
        assert_eq!(after_first.len(), 1);
        assert_eq!((after_first[0].seq, after_first[0].path.as_str()), (2, "/nix/store/b"));
        for _ in 0..MAX_RECORDS {
            j.add(rec("/nix/store/c"));
        }
        let (all, last, first_kept) = j.since(0);
        assert_eq!(all.len(), MAX_RECORDS);
        assert_eq!(last, MAX_RECORDS as u64 + 2);
        assert_eq!(first_kept, 3, "the two oldest went first");
    }
}
