//! `nix-cache-info`: a binary cache's self-description.

use super::store_path::STORE_DIR;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheInfo {
    pub store_dir: String,
    pub want_mass_query: bool,
    /// Lower is preferred; Nix's default is 50.
    pub priority: u32,
    /// `FileIndexes: 1`: the cache publishes a signed file index next to
    /// each narinfo (`cache push`, `cache index`); Nix ignores the field.
    pub file_indexes: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed nix-cache-info: {0}")]
pub struct CacheInfoError(pub String);

impl CacheInfo {
    pub fn parse(text: &str) -> Result<CacheInfo, CacheInfoError> {
        if text.len() > 64 * 1024 {
            return Err(CacheInfoError("too large".into()));
        }
        let mut info = CacheInfo {
            store_dir: String::new(),
            want_mass_query: false,
            priority: 50,
            file_indexes: false,
        };
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let (key, value) = line
                .split_once(':')
                .ok_or_else(|| CacheInfoError(format!("line {}: expected 'Key: value'", n + 1)))?;
            let value = value.trim();
            match key {
                "StoreDir" => info.store_dir = value.to_string(),
                "WantMassQuery" => info.want_mass_query = value == "1",
                "FileIndexes" => info.file_indexes = value == "1",
                "Priority" => {
                    info.priority = value
                        .parse()
                        .map_err(|_| CacheInfoError(format!("line {}: Priority {value:?} is not a number", n + 1)))?
                }
                _ => {}
            }
        }
        if info.store_dir != STORE_DIR {
            return Err(CacheInfoError(format!(
                "StoreDir is {:?}, this snapshotter serves {STORE_DIR}",
                info.store_dir
            )));
        }
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        let i = CacheInfo::parse("StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n").unwrap();
        assert_eq!(i.priority, 40);
        assert!(i.want_mass_query);
        assert_eq!(CacheInfo::parse("StoreDir: /nix/store\n").unwrap().priority, 50);
        assert!(CacheInfo::parse("StoreDir: /gnu/store\n").is_err());
        assert!(CacheInfo::parse("StoreDir: /nix/store\nPriority: high\n").is_err());
        assert!(CacheInfo::parse("<html>").is_err());
    }
}
