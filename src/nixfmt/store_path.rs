//! Store paths: `/nix/store/<32 base32 chars>-<name>`.

use std::fmt;

use super::base32;

pub const STORE_DIR: &str = "/nix/store";
/// Length of the hash part in base32 (160 bits).
pub const HASH_LEN: usize = 32;
/// Nix's limit on the name part.
pub const MAX_NAME_LEN: usize = 211;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath {
    /// `<hash>-<name>`, validated.
    base: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorePathError {
    #[error("store path {0:?} is not under {STORE_DIR}")]
    NotInStore(String),
    #[error("store path {0:?} has a malformed hash part")]
    BadHash(String),
    #[error(
        "store path {0:?} has a malformed name (1 to {MAX_NAME_LEN} of A-Z a-z 0-9 + - . _ ? =, not starting with '.')"
    )]
    BadName(String),
}

impl StorePath {
    /// Parses a full path (`/nix/store/…`, trailing components not allowed).
    pub fn from_absolute(path: &str) -> Result<StorePath, StorePathError> {
        let base = path
            .strip_prefix(STORE_DIR)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| StorePathError::NotInStore(path.to_string()))?;
        StorePath::from_base_name(base.trim_end_matches('/'))
    }

    /// Parses `<hash>-<name>` (what narinfo References lists).
    pub fn from_base_name(base: &str) -> Result<StorePath, StorePathError> {
        let b = base.as_bytes();
        if b.len() < HASH_LEN + 2 || b[HASH_LEN] != b'-' || !b[..HASH_LEN].iter().all(|&c| base32::is_valid_char(c)) {
            return Err(StorePathError::BadHash(base.to_string()));
        }
        let name = &base[HASH_LEN + 1..];
        let name_ok = !name.is_empty()
            && name.len() <= MAX_NAME_LEN
            && !name.starts_with('.')
            && name
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"+-._?=".contains(&c));
        if !name_ok {
            return Err(StorePathError::BadName(base.to_string()));
        }
        Ok(StorePath { base: base.to_string() })
    }

    /// Accepts either form.
    pub fn parse(s: &str) -> Result<StorePath, StorePathError> {
        if s.starts_with('/') {
            StorePath::from_absolute(s)
        } else {
            StorePath::from_base_name(s)
        }
    }

    /// `<hash>-<name>`
    pub fn base_name(&self) -> &str {
        &self.base
    }

    /// The 32-character hash part: the key of `<hash>.narinfo`.
    pub fn hash_part(&self) -> &str {
        &self.base[..HASH_LEN]
    }

    pub fn name(&self) -> &str {
        &self.base[HASH_LEN + 1..]
    }

    pub fn absolute(&self) -> String {
        format!("{STORE_DIR}/{}", self.base)
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{STORE_DIR}/{}", self.base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "/nix/store/7h7qgvs4kgzsn8a6rb274saxyqh4jxlz-hello-2.12.1";

    #[test]
    fn parses() {
        let p = StorePath::parse(GOOD).unwrap();
        assert_eq!(p.hash_part(), "7h7qgvs4kgzsn8a6rb274saxyqh4jxlz");
        assert_eq!(p.name(), "hello-2.12.1");
        assert_eq!(p.to_string(), GOOD);
        assert_eq!(StorePath::parse(p.base_name()).unwrap(), p);
        assert!(StorePath::parse("7h7qgvs4kgzsn8a6rb274saxyqh4jxlz-a?b=c+d_e.f").is_ok());
    }

    #[test]
    fn rejects() {
        for bad in [
            "/nix/store/7h7qgvs4kgzsn8a6rb274saxyqh4jxlz",
            "/nix/store/7h7qgvs4kgzsn8a6rb274saxyqh4jxlz-",
            "/nix/store/eh7qgvs4kgzsn8a6rb274saxyqh4jxlz-x",
            "/nix/store/7h7qgvs4kgzsn8a6rb274saxyqh4jxl-x",
            "/nix/store/7h7qgvs4kgzsn8a6rb274saxyqh4jxlz-.hidden",
            "/nix/store/7h7qgvs4kgzsn8a6rb274saxyqh4jxlz-a b",
            "/nix/store/7h7qgvs4kgzsn8a6rb274saxyqh4jxlz-a/b",
            "/nix/store/7h7qgvs4kgzsn8a6rb274saxyqh4jxlz-..",
            "/gnu/store/7h7qgvs4kgzsn8a6rb274saxyqh4jxlz-x",
            "/nix/store/../etc/passwd",
            "7h7qgvs4kgzsn8a6rb274saxyqh4jxlz-é",
        ] {
            assert!(StorePath::parse(bad).is_err(), "{bad}");
        }
        let long = format!("7h7qgvs4kgzsn8a6rb274saxyqh4jxlz-{}", "a".repeat(212));
        assert!(StorePath::parse(&long).is_err());
    }
}
