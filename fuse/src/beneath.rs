//! Paths resolved beneath a directory fd, never through a symlink.
//!
//! Store paths, image layers and copyToRoot trees are untrusted: a store path
//! may itself be a symlink to `/`, or hold `etc -> /etc`. Every access that
//! follows a path made from such input goes through `openat2(2)` with
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`, so the
//! kernel refuses (ELOOP / EXDEV) any component that would leave the
//! directory or follow a link, whatever the path says and however the tree
//! changes underneath. Symlinks are only ever *read* (as the last component,
//! with `O_PATH | O_NOFOLLOW`), never followed.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Component, Path};

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags, Stat};

const RESOLVE: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);

/// Refuses anything but plain names: `..`, `/`, `.` have no business in a
/// path that names an entry below a directory (openat2 would refuse an
/// escape anyway; this gives a clearer error first).
fn check(path: &Path) -> io::Result<()> {
    if path.as_os_str().is_empty() || !path.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: not a plain relative path", path.display()),
        ));
    }
    Ok(())
}

/// Opens a directory named by a trusted path (our own state, the store
/// the admin configured) as the root that untrusted paths are then
/// resolved beneath.
pub fn root(path: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        path,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// `openat2(dir, path, flags | O_NOFOLLOW | O_CLOEXEC)` beneath `dir`.
pub fn open(dir: BorrowedFd<'_>, path: &Path, flags: OFlags) -> io::Result<OwnedFd> {
    check(path)?;
    let flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut tries = 0;
    loop {
        match rustix::fs::openat2(dir, path, flags, Mode::empty(), RESOLVE) {
            // The kernel asks for a retry when a rename raced the walk.
            Err(rustix::io::Errno::AGAIN) if tries < 8 => tries += 1,
            other => return other.map_err(io::Error::from),
        }
    }
}

/// An `O_PATH` handle on `path` itself (a symlink stays a symlink).
pub fn handle(dir: BorrowedFd<'_>, path: &Path) -> io::Result<OwnedFd> {
    open(dir, path, OFlags::PATH)
}

/// `lstat` of `path` beneath `dir`.
pub fn lstat(dir: BorrowedFd<'_>, path: &Path) -> io::Result<Stat> {
    let fd = handle(dir, path)?;
    Ok(rustix::fs::fstat(&fd)?)
}

/// The target of the symlink at `path` beneath `dir` (read, not followed).
pub fn read_link(dir: BorrowedFd<'_>, path: &Path) -> io::Result<OsString> {
    let fd = handle(dir, path)?;
    let target = rustix::fs::readlinkat(&fd, "", Vec::new())?;
    Ok(OsString::from_vec(target.into_bytes()))
}

/// A regular file opened for reading.
pub fn open_file(dir: BorrowedFd<'_>, path: &Path) -> io::Result<File> {
    let fd = open(dir, path, OFlags::RDONLY)?;
    let file = File::from(fd);
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: not a regular file", path.display()),
        ));
    }
    Ok(file)
}

/// A directory opened for reading its entries.
pub fn open_dir(dir: BorrowedFd<'_>, path: &Path) -> io::Result<OwnedFd> {
    open(dir, path, OFlags::RDONLY | OFlags::DIRECTORY)
}

/// Reads a regular file whole, refusing one larger than `limit` bytes.
pub fn read_file(dir: BorrowedFd<'_>, path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let file = open_file(dir, path)?;
    let mut out = Vec::new();
    file.take(limit + 1).read_to_end(&mut out)?;
    if out.len() as u64 > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: larger than {limit} bytes", path.display()),
        ));
    }
    Ok(out)
}

/// Kind of a directory entry, as `lstat` would say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    Other,
}

impl Kind {
    pub fn of(st: &Stat) -> Kind {
        Kind::from(rustix::fs::FileType::from_raw_mode(st.st_mode))
    }
}

impl From<rustix::fs::FileType> for Kind {
    fn from(t: rustix::fs::FileType) -> Kind {
        match t {
            rustix::fs::FileType::Directory => Kind::Dir,
            rustix::fs::FileType::RegularFile => Kind::File,
            rustix::fs::FileType::Symlink => Kind::Symlink,
            _ => Kind::Other,
        }
    }
}

/// The entries of an open directory (without `.` and `..`), sorted by name,
/// with their kinds as the directory reports them.
pub fn entries(dir: impl AsFd) -> io::Result<Vec<(OsString, Kind)>> {
    let mut d = rustix::fs::Dir::read_from(dir)?;
    let mut out = Vec::new();
    while let Some(e) = d.read() {
        let e = e?;
        let name = e.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        let kind = match e.file_type() {
            // Filesystems that give no type in listings: ask (never following).
            rustix::fs::FileType::Unknown => {
                match rustix::fs::statat(d.fd()?, e.file_name(), AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) => Kind::of(&st),
                    // Gone since the listing was read.
                    Err(rustix::io::Errno::NOENT) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            t => Kind::from(t),
        };
        out.push((OsString::from_vec(name.to_vec()), kind));
    }
    out.sort();
    Ok(out)
}

/// Creates directory `path` (mode `mode`) beneath `dir`; its parent must exist.
pub fn mkdir(dir: BorrowedFd<'_>, path: &Path, mode: u32) -> io::Result<()> {
    let (parent, name) = split(dir, path)?;
    match rustix::fs::mkdirat(
        parent.as_ref().map_or(dir, |p| p.as_fd()),
        name,
        Mode::from_raw_mode(mode),
    ) {
        Err(rustix::io::Errno::EXIST) => {
            let st = lstat(dir, path)?;
            if Kind::of(&st) == Kind::Dir {
                Ok(())
            } else {
                Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{}: exists and is not a directory", path.display()),
                ))
            }
        }
        other => other.map_err(io::Error::from),
    }
}

/// Creates symlink `path -> target` beneath `dir`; its parent must exist.
pub fn symlink(dir: BorrowedFd<'_>, path: &Path, target: &Path) -> io::Result<()> {
    let (parent, name) = split(dir, path)?;
    rustix::fs::symlinkat(target, parent.as_ref().map_or(dir, |p| p.as_fd()), name)?;
    Ok(())
}

/// The parent directory of `path` opened beneath `dir` (None: `dir` itself)
/// and the last component.
fn split<'p>(dir: BorrowedFd<'_>, path: &'p Path) -> io::Result<(Option<OwnedFd>, &'p std::ffi::OsStr)> {
    check(path)?;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => Some(open(dir, p, OFlags::PATH | OFlags::DIRECTORY)?),
        _ => None,
    };
    Ok((parent, name))
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)` of one plain name.
pub fn lstat_name(dir: BorrowedFd<'_>, name: &std::ffi::OsStr) -> io::Result<Stat> {
    check(Path::new(name))?;
    if Path::new(name).components().count() != 1 {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    Ok(rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinks_are_never_followed() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        std::fs::create_dir(root.join("d")).unwrap();
        std::fs::write(root.join("d/f"), b"x").unwrap();
        std::os::unix::fs::symlink("/", root.join("up")).unwrap();
        std::os::unix::fs::symlink("d", root.join("rel")).unwrap();
        let fd = super::root(root).unwrap();
        let fd = fd.as_fd();
        assert_eq!(read_file(fd, Path::new("d/f"), 10).unwrap(), b"x");
        // Through a symlink, absolute or relative: refused.
        assert!(open_file(fd, Path::new("up/etc/hostname")).is_err());
        assert!(open_file(fd, Path::new("rel/f")).is_err());
        assert!(open_dir(fd, Path::new("up")).is_err());
        // `..` and absolute paths: refused.
        assert!(lstat(fd, Path::new("d/../d")).is_err());
        assert!(lstat(fd, Path::new("/etc")).is_err());
        // The link itself can be stat'ed and read.
        assert_eq!(Kind::of(&lstat(fd, Path::new("up")).unwrap()), Kind::Symlink);
        assert_eq!(read_link(fd, Path::new("up")).unwrap(), "/");
        // Creating below a symlink is refused too.
        assert!(mkdir(fd, Path::new("up/tmp-nst-never"), 0o755).is_err());
        assert!(symlink(fd, Path::new("up/nst-never"), Path::new("x")).is_err());
        mkdir(fd, Path::new("d/e"), 0o755).unwrap();
        mkdir(fd, Path::new("d/e"), 0o755).unwrap();
        symlink(fd, Path::new("d/e/l"), Path::new("/nix/store/x")).unwrap();
        assert_eq!(read_link(fd, Path::new("d/e/l")).unwrap(), "/nix/store/x");
        assert!(mkdir(fd, Path::new("d/e/l"), 0o755).is_err());
        // Size bounds.
        assert!(read_file(fd, Path::new("d/f"), 0).is_err());
        let names: Vec<_> = entries(open_dir(fd, Path::new("d")).unwrap()).unwrap();
        assert_eq!(names, vec![("e".into(), Kind::Dir), ("f".into(), Kind::File)]);
    }
}
