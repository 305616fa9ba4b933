//! Unpacking a NAR onto disk, as the walker meets it.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{store_mtime, walk, NarError, Visitor};

/// What an unpack produced.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UnpackStats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Bytes of regular-file contents.
    pub bytes: u64,
}

/// Unpacks the NAR read from `r` to `dest`, which must not exist. Files get
/// mode 0444 (0555 if executable), directories 0555, everything mtime 1;
/// no setuid bits, and no path is ever resolved through a symlink (the tree
/// is built only from directories this call created). On error the partial
/// tree is left for the caller to delete.
pub fn unpack<R: Read>(r: R, dest: &Path) -> Result<UnpackStats, NarError> {
    let mut u = Unpacker {
        dest: dest.to_path_buf(),
        stats: UnpackStats::default(),
        file: None,
    };
    walk(r, &mut u)?;
    Ok(u.stats)
}

struct Unpacker {
    dest: PathBuf,
    stats: UnpackStats,
    /// The file being written, with its path and mode.
    file: Option<(fs::File, PathBuf, u32)>,
}

fn write_err(path: &Path) -> impl FnOnce(std::io::Error) -> NarError + '_ {
    move |source| NarError::Write {
        path: path.to_path_buf(),
        source,
    }
}

/// The store's timestamps on an open file or directory.
fn set_store_times(f: &fs::File, path: &Path) -> Result<(), NarError> {
    f.set_times(
        fs::FileTimes::new()
            .set_modified(store_mtime())
            .set_accessed(store_mtime()),
    )
    .map_err(write_err(path))
}

impl Unpacker {
    fn at(&self, path: &[u8]) -> PathBuf {
        if path.is_empty() {
            self.dest.clone()
        } else {
            self.dest.join(std::ffi::OsStr::from_bytes(path))
        }
    }
}

impl Visitor for Unpacker {
    fn directory(&mut self, path: &[u8]) -> Result<(), NarError> {
        let at = self.at(path);
        fs::DirBuilder::new().mode(0o700).create(&at).map_err(write_err(&at))?;
        self.stats.dirs += 1;
        Ok(())
    }

    fn directory_end(&mut self, path: &[u8]) -> Result<(), NarError> {
        let at = self.at(path);
        let dir = fs::File::open(&at).map_err(write_err(&at))?;
        dir.set_permissions(fs::Permissions::from_mode(0o555))
            .map_err(write_err(&at))?;
        set_store_times(&dir, &at)
    }

    fn symlink(&mut self, path: &[u8], target: &[u8]) -> Result<(), NarError> {
        let at = self.at(path);
        // Stored verbatim; resolved only inside containers.
        std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(target), &at).map_err(write_err(&at))?;
        self.stats.symlinks += 1;
        Ok(())
    }

    fn file(&mut self, path: &[u8], executable: bool, size: u64, _offset: u64) -> Result<(), NarError> {
        let at = self.at(path);
        // create_new: never opens an existing file or follows a symlink.
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&at)
            .map_err(write_err(&at))?;
        self.stats.files += 1;
        self.stats.bytes += size;
        self.file = Some((file, at, if executable { 0o555 } else { 0o444 }));
        Ok(())
    }

    fn data(&mut self, bytes: &[u8]) -> Result<(), NarError> {
        if let Some((f, at, _)) = &mut self.file {
            f.write_all(bytes).map_err(write_err(at))?;
        }
        Ok(())
    }

    fn file_end(&mut self) -> Result<(), NarError> {
        if let Some((f, at, mode)) = self.file.take() {
            f.set_permissions(fs::Permissions::from_mode(mode))
                .map_err(write_err(&at))?;
            set_store_times(&f, &at)?;
        }
        Ok(())
    }
}
