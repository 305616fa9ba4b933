//! Writing NARs: `nix-store --dump` of a tree.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::MAGIC;

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
