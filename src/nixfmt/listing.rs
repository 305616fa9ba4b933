//! `.ls` NAR listings (`write-nar-listing=true`): the tree of a store path
//! as JSON, so metadata can be answered without downloading the NAR.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::nar::valid_entry_name;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Node {
    Regular {
        #[serde(default)]
        size: u64,
        #[serde(default)]
        executable: bool,
        #[serde(rename = "narOffset")]
        nar_offset: Option<u64>,
    },
    Directory {
        #[serde(default)]
        entries: BTreeMap<String, Node>,
    },
    Symlink {
        target: String,
    },
}

#[derive(Debug, Deserialize)]
struct Listing {
    version: u32,
    root: Node,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed NAR listing: {0}")]
pub struct ListingError(pub String);

#[derive(Deserialize)]
struct RootOnly {
    version: u32,
    root: TypeOnly,
}

#[derive(Deserialize)]
struct TypeOnly {
    #[serde(rename = "type")]
    kind: String,
}

/// Whether a listing's root is a directory, read as it streams in: the
/// entries are skipped, never held, so a huge (or hostile) listing costs no
/// memory. This bit is all the store takes from an unsigned listing.
pub fn root_is_dir(json: impl std::io::Read) -> Result<bool, ListingError> {
    let listing: RootOnly = serde_json::from_reader(json).map_err(|e| ListingError(e.to_string()))?;
    if listing.version != 1 {
        return Err(ListingError(format!("unsupported version {}", listing.version)));
    }
    match listing.root.kind.as_str() {
        "directory" => Ok(true),
        "regular" | "symlink" => Ok(false),
        other => Err(ListingError(format!("unknown root type {other:?}"))),
    }
}

/// Deepest directory nesting we accept (also bounds recursion).
const MAX_DEPTH: usize = 256;

pub fn parse(json: &[u8]) -> Result<Node, ListingError> {
    let listing: Listing = serde_json::from_slice(json).map_err(|e| ListingError(e.to_string()))?;
    if listing.version != 1 {
        return Err(ListingError(format!("unsupported version {}", listing.version)));
    }
    check(&listing.root, "", 0)?;
    Ok(listing.root)
}

fn check(node: &Node, path: &str, depth: usize) -> Result<(), ListingError> {
    if depth > MAX_DEPTH {
        return Err(ListingError(format!("{path}: nested too deeply")));
    }
    match node {
        Node::Directory { entries } => {
            for (name, child) in entries {
                if !valid_entry_name(name.as_bytes()) {
                    return Err(ListingError(format!("{path}: invalid entry name {name:?}")));
                }
                check(child, &format!("{path}/{name}"), depth + 1)?;
            }
        }
        Node::Symlink { target } if target.is_empty() || target.contains('\0') => {
            return Err(ListingError(format!("{path}: invalid symlink target")));
        }
        _ => {}
    }
    Ok(())
}

impl Node {
    /// Follows `rel` (components separated by '/') without resolving symlinks.
    pub fn lookup(&self, rel: &str) -> Option<&Node> {
        rel.split('/')
            .filter(|c| !c.is_empty())
            .try_fold(self, |node, c| match node {
                Node::Directory { entries } => entries.get(c),
                _ => None,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nix_listing() {
        let json = br#"{"version":1,"root":{"type":"directory","entries":{"bin":{"type":"directory","entries":{"hello":{"type":"regular","size":42,"executable":true,"narOffset":400}}},"lib":{"type":"symlink","target":"../x"}}}}"#;
        let root = parse(json).unwrap();
        assert_eq!(
            root.lookup("bin/hello"),
            Some(&Node::Regular {
                size: 42,
                executable: true,
                nar_offset: Some(400)
            })
        );
        assert!(matches!(root.lookup("lib"), Some(Node::Symlink { .. })));
        assert!(root.lookup("lib/x").is_none());
    }

    #[test]
    fn rejects() {
        for bad in [
            &br#"{"version":2,"root":{"type":"regular"}}"#[..],
            br#"{"version":1,"root":{"type":"directory","entries":{"..":{"type":"regular"}}}}"#,
            br#"{"version":1,"root":{"type":"directory","entries":{"a/b":{"type":"regular"}}}}"#,
            br#"{"version":1,"root":{"type":"fifo"}}"#,
            b"[]",
        ] {
            assert!(parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
