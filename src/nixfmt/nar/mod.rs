//! NAR archives: a streaming parser that tells a [`Visitor`] what it meets
//! (reads from any `Read`, holds at most one buffer in memory), the
//! unpacker built on it, and a writer.
//!
//! Format: strings are a little-endian u64 length, the bytes, and zero
//! padding to a multiple of 8. After the magic `nix-archive-1` comes a node:
//! `( type regular [executable ""] contents <data> )`,
//! `( type symlink target <target> )` or
//! `( type directory { entry ( name <name> node <node> ) }* )`,
//! entries strictly sorted by name.

use std::io::{self, Read};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

mod dump;
mod unpack;

pub use dump::dump;
pub use unpack::{unpack, UnpackStats};

pub(crate) const MAGIC: &[u8] = b"nix-archive-1";
/// Longest entry name Linux accepts.
const MAX_NAME: u64 = 255;
/// Longest symlink target Linux accepts.
const MAX_TARGET: u64 = 4095;
/// Deepest nesting we unpack (bounds recursion on hostile input).
const MAX_DEPTH: usize = 256;
/// Nix gives every store file this mtime (1 s after the epoch); tools such as
/// Python compare it against what compiled caches recorded.
pub fn store_mtime() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1)
}

#[derive(Debug, thiserror::Error)]
pub enum NarError {
    #[error("malformed NAR at {path:?}: {msg}")]
    Malformed { path: String, msg: String },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading NAR: {0}")]
    Read(#[source] io::Error),
}

/// A NAR entry name: not empty, not `.` or `..`, no `/` or NUL.
pub fn valid_entry_name(name: &[u8]) -> bool {
    !name.is_empty() && name != b"." && name != b".." && !name.contains(&b'/') && !name.contains(&0)
}

/// What a NAR holds, in the order the parser meets it. Paths are relative
/// to the root (empty for the root itself), names joined with `/`, every
/// name checked with [`valid_entry_name`] and sorted as NAR requires.
pub trait Visitor {
    fn directory(&mut self, path: &[u8]) -> Result<(), NarError>;
    /// After the directory's last entry.
    fn directory_end(&mut self, _path: &[u8]) -> Result<(), NarError> {
        Ok(())
    }
    fn symlink(&mut self, path: &[u8], target: &[u8]) -> Result<(), NarError>;
    /// A regular file of `size` bytes whose contents start at byte
    /// `offset` of the NAR; [`Visitor::data`] follows with them, in pieces.
    fn file(&mut self, path: &[u8], executable: bool, size: u64, offset: u64) -> Result<(), NarError>;
    fn data(&mut self, bytes: &[u8]) -> Result<(), NarError>;
    fn file_end(&mut self) -> Result<(), NarError>;
}

/// Parses the NAR read from `r`, telling `v` what it holds; returns the
/// NAR's size. Reads nothing past the NAR's end.
pub fn walk<R: Read>(r: R, v: &mut impl Visitor) -> Result<u64, NarError> {
    let mut w = Walker {
        r,
        offset: 0,
        buf: vec![0u8; 256 * 1024],
        path: Vec::new(),
    };
    let magic = w.read_string(64)?;
    if magic != MAGIC {
        return Err(w.malformed("not a NAR (bad magic)"));
    }
    w.node(v, 0)?;
    Ok(w.offset)
}

struct Walker<R> {
    r: R,
    /// Bytes read so far.
    offset: u64,
    buf: Vec<u8>,
    /// The current node's path.
    path: Vec<u8>,
}

impl<R: Read> Walker<R> {
    fn malformed(&self, msg: impl Into<String>) -> NarError {
        NarError::Malformed {
            path: format!("/{}", String::from_utf8_lossy(&self.path)),
            msg: msg.into(),
        }
    }

    fn read_exact(&mut self, n: usize) -> Result<(), NarError> {
        match self.r.read_exact(&mut self.buf[..n]) {
            Ok(()) => {
                self.offset += n as u64;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(self.malformed("truncated")),
            Err(e) => Err(NarError::Read(e)),
        }
    }

    fn read_u64(&mut self) -> Result<u64, NarError> {
        self.read_exact(8)?;
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.buf[..8]);
        Ok(u64::from_le_bytes(b))
    }

    fn read_padding(&mut self, len: u64) -> Result<(), NarError> {
        let pad = ((8 - len % 8) % 8) as usize;
        if pad > 0 {
            self.read_exact(pad)?;
            if self.buf[..pad].iter().any(|&b| b != 0) {
                return Err(self.malformed("non-zero padding"));
            }
        }
        Ok(())
    }

    /// Reads a string of at most `max` bytes.
    fn read_string(&mut self, max: u64) -> Result<Vec<u8>, NarError> {
        let len = self.read_u64()?;
        if len > max {
            return Err(self.malformed(format!("string of {len} bytes where at most {max} fit")));
        }
        self.read_exact(len as usize)?;
        let s = self.buf[..len as usize].to_vec();
        self.read_padding(len)?;
        Ok(s)
    }

    fn expect(&mut self, tag: &str) -> Result<(), NarError> {
        let s = self.read_string(64)?;
        if s != tag.as_bytes() {
            return Err(self.malformed(format!("expected {tag:?}, found {:?}", String::from_utf8_lossy(&s))));
        }
        Ok(())
    }

    fn node(&mut self, v: &mut impl Visitor, depth: usize) -> Result<(), NarError> {
        if depth > MAX_DEPTH {
            return Err(self.malformed("nested too deeply"));
        }
        self.expect("(")?;
        self.expect("type")?;
        let kind = self.read_string(64)?;
        match &kind[..] {
            b"regular" => self.regular(v),
            b"symlink" => {
                self.expect("target")?;
                let target = self.read_string(MAX_TARGET)?;
                if target.is_empty() || target.contains(&0) {
                    return Err(self.malformed("empty or NUL-containing symlink target"));
                }
                v.symlink(&self.path, &target)?;
                self.expect(")")
            }
            b"directory" => self.directory(v, depth),
            other => Err(self.malformed(format!("unknown type {:?}", String::from_utf8_lossy(other)))),
        }
    }

    fn regular(&mut self, v: &mut impl Visitor) -> Result<(), NarError> {
        let mut tag = self.read_string(64)?;
        let executable = tag == b"executable";
        if executable {
            self.expect("")?;
            tag = self.read_string(64)?;
        }
        if tag != b"contents" {
            return Err(self.malformed("expected \"contents\""));
        }
        let len = self.read_u64()?;
        v.file(&self.path, executable, len, self.offset)?;
        let mut left = len;
        while left > 0 {
            let n = left.min(self.buf.len() as u64) as usize;
            self.read_exact(n)?;
            v.data(&self.buf[..n])?;
            left -= n as u64;
        }
        self.read_padding(len)?;
        v.file_end()?;
        self.expect(")")
    }

    fn directory(&mut self, v: &mut impl Visitor, depth: usize) -> Result<(), NarError> {
        v.directory(&self.path)?;
        let mut prev: Option<Vec<u8>> = None;
        loop {
            let tag = self.read_string(64)?;
            match &tag[..] {
                b")" => break,
                b"entry" => {}
                other => {
                    return Err(self.malformed(format!(
                        "expected \"entry\" or \")\", found {:?}",
                        String::from_utf8_lossy(other)
                    )))
                }
            }
            self.expect("(")?;
            self.expect("name")?;
            let name = self.read_string(MAX_NAME)?;
            let parent_len = self.path.len();
            if parent_len > 0 {
                self.path.push(b'/');
            }
            self.path.extend_from_slice(&name);
            if !valid_entry_name(&name) {
                return Err(self.malformed("invalid entry name"));
            }
            if prev.as_ref().is_some_and(|p| *p >= name) {
                return Err(self.malformed("entries not strictly sorted (or duplicated)"));
            }
            self.expect("node")?;
            self.node(v, depth + 1)?;
            self.expect(")")?;
            self.path.truncate(parent_len);
            prev = Some(name);
        }
        v.directory_end(&self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    /// Builds a NAR by hand from (kind, …) tokens.
    fn s(out: &mut Vec<u8>, x: &[u8]) {
        out.extend((x.len() as u64).to_le_bytes());
        out.extend(x);
        out.extend(&[0u8; 8][..(8 - x.len() % 8) % 8]);
    }

    fn sample_tree(root: &Path) {
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::create_dir_all(root.join("deep/a/b/c/d")).unwrap();
        fs::create_dir_all(root.join("empty-dir")).unwrap();
        fs::write(root.join("bin/tool"), b"#!/bin/sh\necho hi\n").unwrap();
        fs::set_permissions(root.join("bin/tool"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(root.join("empty"), b"").unwrap();
        fs::write(root.join("name with spaces ünïcödé"), b"odd").unwrap();
        fs::write(root.join("deep/a/b/c/d/leaf"), vec![7u8; 100_003]).unwrap();
        std::os::unix::fs::symlink("../bin/tool", root.join("deep/link")).unwrap();
        std::os::unix::fs::symlink("/nix/store/does-not-exist", root.join("abs-link")).unwrap();
    }

    #[test]
    fn dump_unpack_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        sample_tree(&src);
        let mut nar = Vec::new();
        dump(&src, &mut nar).unwrap();
        let out = tmp.path().join("out");
        let stats = unpack(&nar[..], &out).unwrap();
        assert_eq!(stats.files, 4);
        assert_eq!(stats.symlinks, 2);
        assert_eq!(stats.dirs, 8);
        let mut again = Vec::new();
        dump(&out, &mut again).unwrap();
        assert_eq!(nar, again, "unpacked tree dumps to different bytes");
        let m = fs::metadata(out.join("bin/tool")).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o555);
        assert_eq!(fs::metadata(out.join("empty")).unwrap().mode() & 0o7777, 0o444);
        assert_eq!(fs::metadata(out.join("bin")).unwrap().mode() & 0o7777, 0o555);
        assert_eq!(m.mtime(), 1);
        assert_eq!(
            fs::read_link(out.join("abs-link")).unwrap(),
            Path::new("/nix/store/does-not-exist")
        );
    }

    #[test]
    fn single_file_and_symlink_roots() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("f");
        fs::write(&f, b"12345678x").unwrap();
        let mut nar = Vec::new();
        dump(&f, &mut nar).unwrap();
        unpack(&nar[..], &tmp.path().join("g")).unwrap();
        assert_eq!(fs::read(tmp.path().join("g")).unwrap(), b"12345678x");
    }

    fn dir_nar(names: &[&[u8]]) -> Vec<u8> {
        let mut n = Vec::new();
        for t in [&b"nix-archive-1"[..], b"(", b"type", b"directory"] {
            s(&mut n, t);
        }
        for name in names {
            for t in [
                &b"entry"[..],
                b"(",
                b"name",
                name,
                b"node",
                b"(",
                b"type",
                b"regular",
                b"contents",
            ] {
                s(&mut n, t);
            }
            s(&mut n, b"x");
            s(&mut n, b")");
            s(&mut n, b")");
        }
        s(&mut n, b")");
        n
    }

    #[test]
    fn hostile_names_and_order_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(unpack(&dir_nar(&[b"a", b"b"])[..], &tmp.path().join("ok")).is_ok());
        for (i, names) in [
            vec![&b".."[..]],
            vec![b"."],
            vec![b"a/b"],
            vec![b"a\0b"],
            vec![b""],
            vec![b"b", b"a"],
            vec![b"a", b"a"],
        ]
        .into_iter()
        .enumerate()
        {
            let dest = tmp.path().join(format!("bad{i}"));
            let err = unpack(&dir_nar(&names)[..], &dest).unwrap_err();
            assert!(matches!(err, NarError::Malformed { .. }), "{names:?}: {err}");
        }
        // Nothing escaped the destination.
        assert!(!tmp.path().join("a").exists() && !tmp.path().join("b").exists());
    }

    #[test]
    fn truncation_and_garbage_are_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let nar = dir_nar(&[b"a"]);
        for cut in [0, 7, 20, nar.len() / 2, nar.len() - 1] {
            let err = unpack(&nar[..cut], &tmp.path().join(format!("t{cut}"))).unwrap_err();
            assert!(matches!(err, NarError::Malformed { .. }), "{cut}: {err}");
        }
        let mut bad_pad = nar.clone();
        bad_pad[8 + 13] = 1; // padding after the magic
        assert!(unpack(&bad_pad[..], &tmp.path().join("p")).is_err());
        let mut huge = Vec::new();
        s(&mut huge, b"nix-archive-1");
        huge.extend(u64::MAX.to_le_bytes());
        assert!(unpack(&huge[..], &tmp.path().join("h")).is_err());
    }
}
