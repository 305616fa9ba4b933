//! Snapshot metadata, in the daemon's database (see [`crate::db`]).
//!
//! Every call that changes metadata is one write transaction; a failed check
//! aborts it, so bad requests leave the database untouched.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::SystemTime;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::{Info, Kind, Usage};
use crate::error::{Error, Result};

/// snapshot key -> JSON-encoded [`Record`].
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
/// "<parent>\0<child>" -> child id: lets Remove refuse a parent in O(log n).
/// Keys never contain NUL (see `validate_key`), so the separator is unambiguous.
const CHILDREN: TableDefinition<&str, u64> = TableDefinition::new("children");
/// Counters: "next_id".
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// What we store per snapshot; the key is the table key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// Names the snapshot's directory, `<root>/snapshots/<id>`. Stable across Commit.
    pub id: u64,
    pub kind: Kind,
    /// Empty when the snapshot has no parent.
    pub parent: String,
    pub created: SystemTime,
    pub updated: SystemTime,
    pub labels: BTreeMap<String, String>,
    /// Disk usage, measured once at Commit (only meaningful when committed).
    pub usage: Usage,
    /// For a committed Nix layer: the closure it stands for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nix: Option<Vec<NixPath>>,
    /// Made by the snapshotter itself from verified store content and its
    /// labels (the remote-snapshot shortcut), not applied by a client: the
    /// only content other namespaces may reuse. Provenance, not a label, so
    /// no client can claim it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub remote: bool,
}

/// A store path of a Nix layer's closure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NixPath {
    /// `<hash>-<name>`
    pub name: String,
    /// Known from the layer's mountpoints; unknown when only labels named it.
    pub dir: Option<bool>,
}

/// An ancestor of a snapshot, nearest first: its directory id and, for a
/// Nix layer, its closure.
#[derive(Debug, Clone)]
pub struct Ancestor {
    pub id: u64,
    pub nix: Option<Vec<NixPath>>,
}

/// What a new snapshot starts with.
pub struct NewRecord {
    pub kind: Kind,
    pub labels: BTreeMap<String, String>,
    pub usage: Usage,
    pub nix: Option<Vec<NixPath>>,
    /// See [`Record::remote`].
    pub remote: bool,
}

impl NewRecord {
    pub fn empty(kind: Kind, labels: BTreeMap<String, String>) -> Self {
        NewRecord {
            kind,
            labels,
            usage: Usage::default(),
            nix: None,
            remote: false,
        }
    }
}

/// containerd labels a layer's snapshot with its chain id under this key.
pub const LABEL_SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";

impl Record {
    pub fn info(&self, name: &str) -> Info {
        Info {
            name: name.to_string(),
            parent: self.parent.clone(),
            kind: self.kind,
            created: self.created,
            updated: self.updated,
            labels: self.labels.clone(),
        }
    }
}

fn child_link(parent: &str, child: &str) -> String {
    format!("{parent}\0{child}")
}

pub struct MetaStore {
    db: Arc<Database>,
}

impl MetaStore {
    pub fn open(db: Arc<Database>) -> Result<Self> {
        let txn = db.begin_write()?;
        txn.open_table(SNAPSHOTS)?;
        txn.open_table(CHILDREN)?;
        txn.open_table(META)?;
        txn.commit()?;
        Ok(MetaStore { db })
    }

    pub fn get(&self, key: &str) -> Result<Option<Record>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SNAPSHOTS)?;
        let value = table.get(key)?;
        value.map(|v| decode(v.value())).transpose()
    }

    /// Returns the record of `key` and its ancestors, nearest first.
    pub fn get_with_parents(&self, key: &str) -> Result<Option<(Record, Vec<Ancestor>)>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SNAPSHOTS)?;
        let Some(rec) = table.get(key)?.map(|v| decode(v.value())).transpose()? else {
            return Ok(None);
        };
        let ancestors = ancestors(&table, &rec.parent)?;
        Ok(Some((rec, ancestors)))
    }

    /// Inserts a new snapshot: active, view, or (for a remote snapshot)
    /// committed. `publish` runs inside the transaction after every check
    /// passed, with the new record and its ancestors' ids; the transaction
    /// commits only if it succeeds, so the directory and the record appear
    /// together or not at all.
    pub fn create<T>(
        &self,
        new: NewRecord,
        key: &str,
        parent: &str,
        publish: impl FnOnce(&Record, &[Ancestor]) -> Result<T>,
    ) -> Result<T> {
        let txn = self.db.begin_write()?;
        let out = {
            let mut snaps = txn.open_table(SNAPSHOTS)?;
            if snaps.get(key)?.is_some() {
                return Err(Error::AlreadyExists(format!("snapshot {key:?} already exists")));
            }
            // Two pulls of one layer may race to make it remotely: one wins.
            if new.kind == Kind::Committed {
                if let Some(target) = new.labels.get(LABEL_SNAPSHOT_REF) {
                    if let Some(existing) = find_ref(&snaps, target, parent, key, &new.labels)? {
                        return Err(Error::AlreadyExists(format!(
                            "target snapshot {target:?} already exists as {existing:?}"
                        )));
                    }
                }
            }
            let parents = if parent.is_empty() {
                Vec::new()
            } else {
                let p = snaps
                    .get(parent)?
                    .map(|v| decode(v.value()))
                    .transpose()?
                    .ok_or_else(|| Error::NotFound(format!("parent {parent:?} of snapshot {key:?} does not exist")))?;
                if p.kind != Kind::Committed {
                    return Err(Error::InvalidArgument(format!(
                        "parent {parent:?} of snapshot {key:?} is not a committed snapshot"
                    )));
                }
                let mut chain = vec![Ancestor { id: p.id, nix: p.nix }];
                chain.extend(ancestors(&snaps, &p.parent)?);
                chain
            };
            let id = next_id(&txn)?;
            let now = SystemTime::now();
            let rec = Record {
                id,
                kind: new.kind,
                parent: parent.to_string(),
                created: now,
                updated: now,
                labels: new.labels,
                usage: new.usage,
                nix: new.nix,
                remote: new.remote,
            };
            snaps.insert(key, encode(&rec)?.as_slice())?;
            if !parent.is_empty() {
                txn.open_table(CHILDREN)?.insert(child_link(parent, key).as_str(), id)?;
            }
            publish(&rec, &parents)?
        };
        txn.commit()?;
        Ok(out)
    }

    /// Turns active snapshot `key` (whose id must still be `id`) into
    /// committed snapshot `name`, keeping its id and so its directory.
    pub fn commit_active(
        &self,
        key: &str,
        name: &str,
        id: u64,
        labels: BTreeMap<String, String>,
        usage: Usage,
        nix: Option<Vec<NixPath>>,
    ) -> Result<()> {
        let txn = self.db.begin_write()?;
        {
            let mut snaps = txn.open_table(SNAPSHOTS)?;
            if snaps.get(name)?.is_some() {
                return Err(Error::AlreadyExists(format!(
                    "cannot commit {key:?}: snapshot {name:?} already exists"
                )));
            }
            let mut rec = match snaps.get(key)? {
                Some(v) => decode(v.value())?,
                None => return Err(Error::NotFound(format!("active snapshot {key:?} does not exist"))),
            };
            if rec.kind != Kind::Active {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key:?} is not active (it is {})",
                    rec.kind
                )));
            }
            if rec.id != id {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key:?} was replaced while it was being committed"
                )));
            }
            snaps.remove(key)?;
            let now = SystemTime::now();
            rec.kind = Kind::Committed;
            rec.created = now;
            rec.updated = now;
            rec.labels = labels; // replaced, not inherited, as containerd does
            rec.usage = usage;
            rec.nix = nix;
            snaps.insert(name, encode(&rec)?.as_slice())?;
            if !rec.parent.is_empty() {
                let mut children = txn.open_table(CHILDREN)?;
                children.remove(child_link(&rec.parent, key).as_str())?;
                children.insert(child_link(&rec.parent, name).as_str(), rec.id)?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Deletes `key`'s record; refuses while it has children.
    pub fn remove(&self, key: &str) -> Result<Record> {
        let txn = self.db.begin_write()?;
        let rec = {
            let mut snaps = txn.open_table(SNAPSHOTS)?;
            let rec = match snaps.get(key)? {
                Some(v) => decode(v.value())?,
                None => return Err(Error::NotFound(format!("snapshot {key:?} does not exist"))),
            };
            let mut children = txn.open_table(CHILDREN)?;
            let prefix = child_link(key, "");
            let end = format!("{key}\u{1}");
            let first_child = children
                .range(prefix.as_str()..end.as_str())?
                .next()
                .transpose()?
                .map(|(k, _)| k.value()[prefix.len()..].to_string());
            if let Some(child) = first_child {
                return Err(Error::FailedPrecondition(format!(
                    "cannot remove snapshot {key:?}: snapshot {child:?} is its child"
                )));
            }
            snaps.remove(key)?;
            if !rec.parent.is_empty() {
                children.remove(child_link(&rec.parent, key).as_str())?;
            }
            rec
        };
        txn.commit()?;
        Ok(rec)
    }

    /// Applies a label update (containerd's field-path rules) and returns the new info.
    pub fn update_labels(&self, name: &str, labels: &BTreeMap<String, String>, paths: &[String]) -> Result<Info> {
        let txn = self.db.begin_write()?;
        let info = {
            let mut snaps = txn.open_table(SNAPSHOTS)?;
            let mut rec = match snaps.get(name)? {
                Some(v) => decode(v.value())?,
                None => return Err(Error::NotFound(format!("snapshot {name:?} does not exist"))),
            };
            let before = rec.labels.clone();
            if paths.is_empty() {
                rec.labels = labels.clone();
            }
            for path in paths {
                if let Some(label) = path.strip_prefix("labels.") {
                    match labels.get(label) {
                        Some(v) => rec.labels.insert(label.to_string(), v.clone()),
                        None => rec.labels.remove(label),
                    };
                } else if path == "labels" {
                    rec.labels = labels.clone();
                } else {
                    return Err(Error::InvalidArgument(format!(
                        "cannot update field {path:?} of snapshot {name:?}: only labels are mutable"
                    )));
                }
            }
            // containerd stores no empty label values: setting "" deletes.
            rec.labels.retain(|_, v| !v.is_empty());
            // A snapshot we made from its labels vouches for exactly those:
            // once a client changes what determines it (or which chain it
            // stands for), it is just a client's snapshot.
            if rec.remote
                && (crate::nixlayer::content_labels(&before) != crate::nixlayer::content_labels(&rec.labels)
                    || before.get(LABEL_SNAPSHOT_REF) != rec.labels.get(LABEL_SNAPSHOT_REF))
            {
                rec.remote = false;
            }
            rec.updated = SystemTime::now();
            snaps.insert(name, encode(&rec)?.as_slice())?;
            rec.info(name)
        };
        txn.commit()?;
        Ok(info)
    }

    /// Calls `f` for every snapshot, in key order, inside one read snapshot.
    pub fn walk(&self, mut f: impl FnMut(&str, &Record) -> Result<()>) -> Result<()> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SNAPSHOTS)?;
        for entry in table.iter()? {
            let (k, v) = entry?;
            f(k.value(), &decode(v.value())?)?;
        }
        Ok(())
    }

    /// The ancestor chains of every active snapshot and view.
    pub fn live_chains(&self) -> Result<Vec<Vec<Ancestor>>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SNAPSHOTS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (_, v) = entry?;
            let rec = decode(v.value())?;
            if rec.kind != Kind::Committed && !rec.parent.is_empty() {
                out.push(ancestors(&table, &rec.parent)?);
            }
        }
        Ok(out)
    }

    /// A committed snapshot of chain `target` on `parent` that may stand in
    /// for the one a Prepare under `key` with `labels` asks for
    /// ([`crate::nixlayer::may_share`]).
    pub fn find_ref(
        &self,
        target: &str,
        parent: &str,
        key: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<Option<String>> {
        let txn = self.db.begin_read()?;
        find_ref(&txn.open_table(SNAPSHOTS)?, target, parent, key, labels)
    }

    /// The ids of all snapshots: everything else under `snapshots/` is garbage.
    pub fn ids(&self) -> Result<HashSet<u64>> {
        let mut ids = HashSet::new();
        self.walk(|_, rec| {
            ids.insert(rec.id);
            Ok(())
        })?;
        Ok(ids)
    }
}

fn next_id(txn: &WriteTransaction) -> Result<u64> {
    let mut meta = txn.open_table(META)?;
    let id = meta.get("next_id")?.map(|v| v.value()).unwrap_or(1);
    meta.insert("next_id", id + 1)?;
    Ok(id)
}

fn ancestors(table: &impl ReadableTable<&'static str, &'static [u8]>, first: &str) -> Result<Vec<Ancestor>> {
    let mut out = Vec::new();
    let mut name = first.to_string();
    while !name.is_empty() {
        let rec = table
            .get(name.as_str())?
            .map(|v| decode(v.value()))
            .transpose()?
            .ok_or_else(|| Error::Database(format!("ancestor {name:?} is missing")))?;
        out.push(Ancestor {
            id: rec.id,
            nix: rec.nix,
        });
        name = rec.parent;
    }
    Ok(out)
}

fn find_ref(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    target: &str,
    parent: &str,
    key: &str,
    labels: &BTreeMap<String, String>,
) -> Result<Option<String>> {
    for entry in table.iter()? {
        let (k, v) = entry?;
        let rec = decode(v.value())?;
        if rec.kind == Kind::Committed
            && rec.parent == parent
            && rec.labels.get(LABEL_SNAPSHOT_REF).is_some_and(|t| t == target)
            && crate::nixlayer::may_share(k.value(), &rec.labels, rec.remote, key, labels)
        {
            return Ok(Some(k.value().to_string()));
        }
    }
    Ok(None)
}

fn encode(rec: &Record) -> Result<Vec<u8>> {
    Ok(serde_json::to_vec(rec)?)
}

fn decode(bytes: &[u8]) -> Result<Record> {
    Ok(serde_json::from_slice(bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_label_update_that_changes_what_a_made_layer_is_drops_its_provenance() {
        let t = tempfile::tempdir().unwrap();
        let db = MetaStore::open(crate::db::open(&t.path().join("m.redb")).unwrap()).unwrap();
        let labels = BTreeMap::from([
            (LABEL_SNAPSHOT_REF.to_string(), "sha256:x".to_string()),
            (crate::nixlayer::LABEL_CLOSURE.to_string(), "/nix/store/x".to_string()),
            (crate::nixlayer::LABEL_COPY_TO_ROOT.to_string(), "[]".to_string()),
        ]);
        let new = |labels: &BTreeMap<String, String>| NewRecord {
            kind: Kind::Committed,
            labels: labels.clone(),
            usage: Usage::default(),
            nix: None,
            remote: true,
        };
        db.create(new(&labels), "a/1/made", "", |_, _| Ok(())).unwrap();
        let remote = |db: &MetaStore, key: &str| {
            let mut r = None;
            db.walk(|k, rec| {
                if k == key {
                    r = Some(rec.remote);
                }
                Ok(())
            })
            .unwrap();
            r.unwrap()
        };
        // An unrelated label: still ours.
        let extra = BTreeMap::from([("note".to_string(), "x".to_string())]);
        db.update_labels("a/1/made", &extra, &["labels.note".to_string()])
            .unwrap();
        assert!(remote(&db, "a/1/made"));
        // Another closure, by a client's word: no longer ours to share.
        let other = BTreeMap::from([(crate::nixlayer::LABEL_CLOSURE.to_string(), "/nix/store/y".to_string())]);
        let path = format!("labels.{}", crate::nixlayer::LABEL_CLOSURE);
        db.update_labels("a/1/made", &other, &[path]).unwrap();
        assert!(!remote(&db, "a/1/made"));
    }
}
