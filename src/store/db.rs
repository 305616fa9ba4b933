//! Path metadata of the local store, in the daemon's database: the narinfo
//! each path was verified against, where it came from, its size on disk and
//! when it was last used (for LRU eviction).

use std::sync::Arc;
use std::time::SystemTime;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// store path base name -> JSON [`PathRecord`].
const PATHS: TableDefinition<&str, &[u8]> = TableDefinition::new("store_paths");

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PathRecord {
    /// The narinfo text the content was verified against.
    pub narinfo: String,
    /// The cache it came from.
    pub cache: String,
    /// Bytes allocated on disk.
    pub disk_size: u64,
    pub fetched: SystemTime,
    pub last_used: SystemTime,
}

pub struct PathDb {
    db: Arc<Database>,
}

impl PathDb {
    pub fn open(db: Arc<Database>) -> Result<PathDb> {
        let txn = db.begin_write()?;
        txn.open_table(PATHS)?;
        txn.commit()?;
        Ok(PathDb { db })
    }

    pub fn get(&self, base: &str) -> Result<Option<PathRecord>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(PATHS)?;
        let v = t.get(base)?;
        Ok(v.map(|v| serde_json::from_slice(v.value())).transpose()?)
    }

    pub fn put(&self, base: &str, rec: &PathRecord) -> Result<()> {
        let txn = self.db.begin_write()?;
        txn.open_table(PATHS)?
            .insert(base, serde_json::to_vec(rec)?.as_slice())?;
        txn.commit()?;
        Ok(())
    }

    /// Records uses without an fsync: losing the last few on a crash only
    /// makes eviction slightly less precise.
    pub fn touch(&self, updates: &[(String, SystemTime)]) -> Result<()> {
        let mut txn = self.db.begin_write()?;
        let _ = txn.set_durability(redb::Durability::None);
        {
            let mut t = txn.open_table(PATHS)?;
            for (base, when) in updates {
                let rec: Option<PathRecord> = t
                    .get(base.as_str())?
                    .map(|v| serde_json::from_slice(v.value()))
                    .transpose()?;
                if let Some(mut rec) = rec {
                    rec.last_used = *when;
                    t.insert(base.as_str(), serde_json::to_vec(&rec)?.as_slice())?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    pub fn remove(&self, base: &str) -> Result<()> {
        let txn = self.db.begin_write()?;
        txn.open_table(PATHS)?.remove(base)?;
        txn.commit()?;
        Ok(())
    }

    pub fn all(&self) -> Result<Vec<(String, PathRecord)>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(PATHS)?;
        let mut out = Vec::new();
        for e in t.iter()? {
            let (k, v) = e?;
            out.push((k.value().to_string(), serde_json::from_slice(v.value())?));
        }
        Ok(out)
    }
}
