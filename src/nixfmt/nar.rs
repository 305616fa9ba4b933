//! NAR archives: a streaming unpacker (reads from any `Read`, writes the tree
//! as it goes, holds at most one buffer in memory) and a writer.
//!
//! Format: strings are a little-endian u64 length, the bytes, and zero
//! padding to a multiple of 8. After the magic `nix-archive-1` comes a node:
//! `( type regular [executable ""] contents <data> )`,
//! `( type symlink target <target> )` or
//! `( type directory { entry ( name <name> node <node> ) }* )`,
//! entries strictly sorted by name.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

const MAGIC: &[u8] = b"nix-archive-1";
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

/// What an unpack produced.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UnpackStats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Bytes of regular-file contents.
    pub bytes: u64,
}

struct Unpacker<R> {
    r: R,
    stats: UnpackStats,
    buf: Vec<u8>,
}

/// Unpacks the NAR read from `r` to `dest`, which must not exist. Files get
/// mode 0444 (0555 if executable), directories 0555, everything mtime 1;
/// no setuid bits, and no path is ever resolved through a symlink (the tree
/// is built only from directories this call created). On error the partial
/// tree is left for the caller to delete.
pub fn unpack<R: Read>(r: R, dest: &Path) -> Result<UnpackStats, NarError> {
    let mut u = Unpacker {
        r,
        stats: UnpackStats::default(),
        buf: vec![0u8; 256 * 1024],
    };
    let magic = u.read_string(64, "")?;
    if magic != MAGIC {
        return Err(malformed("", "not a NAR (bad magic)"));
    }
    u.node(dest, "", 0)?;
    Ok(u.stats)
}

fn malformed(path: &str, msg: impl Into<String>) -> NarError {
    NarError::Malformed {
        path: if path.is_empty() { "/".into() } else { path.into() },
        msg: msg.into(),
    }
}

fn write_err(path: &Path) -> impl FnOnce(io::Error) -> NarError + '_ {
    move |source| NarError::Write {
        path: path.to_path_buf(),
        source,
    }
}

impl<R: Read> Unpacker<R> {
    fn read_exact(&mut self, n: usize, path: &str) -> Result<(), NarError> {
        self.r.read_exact(&mut self.buf[..n]).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                malformed(path, "truncated")
            } else {
                NarError::Read(e)
            }
        })
    }

    fn read_u64(&mut self, path: &str) -> Result<u64, NarError> {
        self.read_exact(8, path)?;
        Ok(u64::from_le_bytes(self.buf[..8].try_into().unwrap_or_default()))
    }

    fn read_padding(&mut self, len: u64, path: &str) -> Result<(), NarError> {
        let pad = ((8 - len % 8) % 8) as usize;
        if pad > 0 {
            self.read_exact(pad, path)?;
            if self.buf[..pad].iter().any(|&b| b != 0) {
                return Err(malformed(path, "non-zero padding"));
            }
        }
        Ok(())
    }

    /// Reads a string of at most `max` bytes.
    fn read_string(&mut self, max: u64, path: &str) -> Result<Vec<u8>, NarError> {
        let len = self.read_u64(path)?;
        if len > max {
            return Err(malformed(
                path,
                format!("string of {len} bytes where at most {max} fit"),
            ));
        }
        self.read_exact(len as usize, path)?;
        let s = self.buf[..len as usize].to_vec();
        self.read_padding(len, path)?;
        Ok(s)
    }

    fn expect(&mut self, tag: &str, path: &str) -> Result<(), NarError> {
        let s = self.read_string(64, path)?;
        if s != tag.as_bytes() {
            return Err(malformed(
                path,
                format!("expected {tag:?}, found {:?}", String::from_utf8_lossy(&s)),
            ));
        }
        Ok(())
    }

    fn node(&mut self, dest: &Path, path: &str, depth: usize) -> Result<(), NarError> {
        if depth > MAX_DEPTH {
            return Err(malformed(path, "nested too deeply"));
        }
        self.expect("(", path)?;
        self.expect("type", path)?;
        let kind = self.read_string(64, path)?;
        match &kind[..] {
            b"regular" => self.regular(dest, path)?,
            b"symlink" => {
                self.expect("target", path)?;
                let target = self.read_string(MAX_TARGET, path)?;
                if target.is_empty() || target.contains(&0) {
                    return Err(malformed(path, "empty or NUL-containing symlink target"));
                }
                // Stored verbatim; resolved only inside containers.
                use std::os::unix::ffi::OsStrExt;
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&target), dest).map_err(write_err(dest))?;
                self.stats.symlinks += 1;
                self.expect(")", path)?;
            }
            b"directory" => self.directory(dest, path, depth)?,
            other => {
                return Err(malformed(
                    path,
                    format!("unknown type {:?}", String::from_utf8_lossy(other)),
                ))
            }
        }
        Ok(())
    }

    fn regular(&mut self, dest: &Path, path: &str) -> Result<(), NarError> {
        let mut tag = self.read_string(64, path)?;
        let executable = tag == b"executable";
        if executable {
            self.expect("", path)?;
            tag = self.read_string(64, path)?;
        }
        if tag != b"contents" {
            return Err(malformed(path, "expected \"contents\""));
        }
        let len = self.read_u64(path)?;
        // create_new: never opens an existing file or follows a symlink.
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dest)
            .map_err(write_err(dest))?;
        let mut left = len;
        while left > 0 {
            let n = left.min(self.buf.len() as u64) as usize;
            self.read_exact(n, path)?;
            file.write_all(&self.buf[..n]).map_err(write_err(dest))?;
            left -= n as u64;
        }
        self.read_padding(len, path)?;
        let mode = if executable { 0o555 } else { 0o444 };
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(write_err(dest))?;
        file.set_times(
            fs::FileTimes::new()
                .set_modified(store_mtime())
                .set_accessed(store_mtime()),
        )
        .map_err(write_err(dest))?;
        self.stats.files += 1;
        self.stats.bytes += len;
        self.expect(")", path)
    }

    fn directory(&mut self, dest: &Path, path: &str, depth: usize) -> Result<(), NarError> {
        fs::DirBuilder::new()
            .mode(0o700)
            .create(dest)
            .map_err(write_err(dest))?;
        self.stats.dirs += 1;
        let mut prev: Option<Vec<u8>> = None;
        loop {
            let tag = self.read_string(64, path)?;
            match &tag[..] {
                b")" => break,
                b"entry" => {}
                other => {
                    return Err(malformed(
                        path,
                        format!(
                            "expected \"entry\" or \")\", found {:?}",
                            String::from_utf8_lossy(other)
                        ),
                    ))
                }
            }
            self.expect("(", path)?;
            self.expect("name", path)?;
            let name = self.read_string(MAX_NAME, path)?;
            let child_path = format!("{path}/{}", String::from_utf8_lossy(&name));
            if !valid_entry_name(&name) {
                return Err(malformed(&child_path, "invalid entry name"));
            }
            if prev.as_ref().is_some_and(|p| *p >= name) {
                return Err(malformed(&child_path, "entries not strictly sorted (or duplicated)"));
            }
            self.expect("node", &child_path)?;
            use std::os::unix::ffi::OsStrExt;
            self.node(&dest.join(std::ffi::OsStr::from_bytes(&name)), &child_path, depth + 1)?;
            self.expect(")", &child_path)?;
            prev = Some(name);
        }
        let dir = fs::File::open(dest).map_err(write_err(dest))?;
        dir.set_permissions(fs::Permissions::from_mode(0o555))
            .map_err(write_err(dest))?;
        dir.set_times(
            fs::FileTimes::new()
                .set_modified(store_mtime())
                .set_accessed(store_mtime()),
        )
        .map_err(write_err(dest))?;
        Ok(())
    }
}

/// Writes the NAR serialisation of the tree at `path` (not following
/// symlinks), exactly as `nix-store --dump` does.
pub fn dump(path: &Path, w: &mut impl Write) -> io::Result<()> {
    fn string(w: &mut impl Write, s: &[u8]) -> io::Result<()> {
        w.write_all(&(s.len() as u64).to_le_bytes())?;
        w.write_all(s)?;
        w.write_all(&[0u8; 8][..(8 - s.len() % 8) % 8])
    }
    fn node(w: &mut impl Write, path: &Path) -> io::Result<()> {
        use std::os::unix::ffi::OsStrExt;
        let meta = fs::symlink_metadata(path)?;
        string(w, b"(")?;
        string(w, b"type")?;
        if meta.is_symlink() {
            string(w, b"symlink")?;
            string(w, b"target")?;
            string(w, fs::read_link(path)?.as_os_str().as_bytes())?;
        } else if meta.is_dir() {
            string(w, b"directory")?;
            let mut names: Vec<_> = fs::read_dir(path)?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<Result<_, _>>()?;
            names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            for name in names {
                string(w, b"entry")?;
                string(w, b"(")?;
                string(w, b"name")?;
                string(w, name.as_bytes())?;
                string(w, b"node")?;
                node(w, &path.join(&name))?;
                string(w, b")")?;
            }
        } else {
            string(w, b"regular")?;
            if meta.permissions().mode() & 0o100 != 0 {
                string(w, b"executable")?;
                string(w, b"")?;
            }
            string(w, b"contents")?;
            w.write_all(&meta.len().to_le_bytes())?;
            let copied = io::copy(&mut fs::File::open(path)?, w)?;
            if copied != meta.len() {
                return Err(io::Error::other(format!(
                    "{} changed while being dumped",
                    path.display()
                )));
            }
            w.write_all(&[0u8; 8][..((8 - meta.len() % 8) % 8) as usize])?;
        }
        string(w, b")")
    }
    string(w, MAGIC)?;
    node(w, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

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
