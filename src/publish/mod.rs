//! Publishing binary caches that a lazy reader can read by file: `cache
//! push` copies a closure from a local Nix store into a `file://` cache
//! directory (as `nix copy --to file://…` does), `cache index` adds what it
//! lacks to a cache stock Nix wrote. Either way each store path gets:
//!
//! - its NAR as seekable zstd (`nar/<file hash>.nar.zst`: independent frames
//!   and a seek table; stock Nix reads it as any zstd NAR),
//! - a signed file index (`<hash>.idx`, see [`crate::nixfmt::index`]),
//! - a narinfo signed as Nix signs it, written last (by rename), so that no
//!   reader sees a store path before its files.

pub mod seekable;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::nixfmt::index::{FileIndex, IndexBuilder, IndexError};
use crate::nixfmt::nar::{self, NarError};
use crate::nixfmt::narinfo::{Compression, NarInfo, NarInfoError};
use crate::nixfmt::signature::SecretKey;
use crate::nixfmt::{NixHash, StorePath};

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {source}")]
    Nar {
        path: String,
        #[source]
        source: NarError,
    },
    #[error("{}: {source}", path.display())]
    NarInfo {
        path: PathBuf,
        #[source]
        source: NarInfoError,
    },
    #[error("{path}: the NAR in the cache hashes to {got}, its narinfo says {want}; nothing was written for it")]
    HashMismatch { path: String, got: String, want: String },
    #[error("{path}: {what} NARs cannot be read here (zstd, xz and uncompressed can)")]
    Compression { path: String, what: &'static str },
    #[error("{path} is not in the store at {}", root.display())]
    NotInStore { path: String, root: PathBuf },
    #[error("{0}")]
    Index(#[from] IndexError),
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> PublishError + '_ {
    move |source| PublishError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How NARs and indexes are cut.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    /// Bytes per hashed chunk of a file (a power of two, 4 KiB to 4 MiB).
    pub chunk_size: u32,
    /// Uncompressed bytes per zstd frame: what the smallest ranged read
    /// inflates.
    pub frame_size: u32,
    pub level: i32,
}

impl Default for Layout {
    fn default() -> Self {
        Layout {
            chunk_size: 64 << 10,
            // Measured (bench/filegrain.rs): a third fewer bytes per cold
            // start than 256 KiB frames, for a cache 9 % larger.
            frame_size: 64 << 10,
            // See `cache push --level`.
            level: 15,
        }
    }
}

/// What was published.
#[derive(Debug, Default)]
pub struct Report {
    /// Store paths given a NAR, an index and a narinfo.
    pub published: Vec<String>,
    /// Already there (and indexed).
    pub present: Vec<String>,
    pub nar_bytes: u64,
    pub compressed_bytes: u64,
}

/// Finds store path hash parts in a byte stream, as Nix finds references:
/// any 32 characters of the nix-base32 alphabet equal to a candidate's.
struct RefScanner<'a> {
    candidates: &'a HashMap<String, StorePath>,
    found: BTreeSet<String>,
    carry: Vec<u8>,
}

fn is_base32(b: u8) -> bool {
    matches!(b, b'0'..=b'9' | b'a'..=b'd' | b'f'..=b'n' | b'p'..=b's' | b'v'..=b'z')
}

impl RefScanner<'_> {
    fn feed(&mut self, data: &[u8]) {
        let mut window = std::mem::take(&mut self.carry);
        window.extend_from_slice(data);
        let mut i = 0;
        while i + 32 <= window.len() {
            // From the end back: a character outside the alphabet lets the
            // search jump past it.
            match (0..32).rev().find(|&k| !is_base32(window[i + k])) {
                Some(k) => i += k + 1,
                None => {
                    if let Ok(s) = std::str::from_utf8(&window[i..i + 32]) {
                        if self.candidates.contains_key(s) {
                            self.found.insert(s.to_string());
                        }
                    }
                    i += 1;
                }
            }
        }
        let keep = window.len().min(31);
        self.carry = window[window.len() - keep..].to_vec();
    }
}

/// A reader that also hashes, compresses and scans what passes through.
struct Tee<'a, R> {
    inner: R,
    frames: seekable::FrameWriter<fs::File>,
    nar_hash: Sha256,
    nar_size: u64,
    scanner: Option<RefScanner<'a>>,
}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let got = &buf[..n];
        self.frames.write_all(got)?;
        self.nar_hash.update(got);
        self.nar_size += n as u64;
        if let Some(s) = &mut self.scanner {
            s.feed(got);
        }
        Ok(n)
    }
}

/// One NAR read once: its hash and size, its seekable copy at `out`, its
/// index (unsigned) and the candidates it references.
struct Processed {
    nar_hash: NixHash,
    nar_size: u64,
    written: seekable::Written<fs::File>,
    index: IndexBuilder,
    refs: BTreeSet<String>,
}

fn process(
    nar: impl Read,
    shown: &str,
    out: &Path,
    layout: &Layout,
    candidates: Option<&HashMap<String, StorePath>>,
) -> Result<Processed, PublishError> {
    let file = fs::File::create(out).map_err(io_at(out))?;
    let mut tee = Tee {
        inner: nar,
        frames: seekable::FrameWriter::new(file, layout.frame_size, layout.level),
        nar_hash: Sha256::new(),
        nar_size: 0,
        scanner: candidates.map(|c| RefScanner {
            candidates: c,
            found: BTreeSet::new(),
            carry: Vec::new(),
        }),
    };
    let mut index = IndexBuilder::new(layout.chunk_size);
    nar::walk(&mut tee, &mut index).map_err(|source| PublishError::Nar {
        path: shown.to_string(),
        source,
    })?;
    let written = tee.frames.finish().map_err(io_at(out))?;
    Ok(Processed {
        nar_hash: NixHash {
            sha256: tee.nar_hash.finalize().into(),
        },
        nar_size: tee.nar_size,
        written,
        index,
        refs: tee.scanner.map(|s| s.found).unwrap_or_default(),
    })
}

/// Writes `bytes` to `path` by rename (readers see all of it or nothing).
fn publish_file(path: &Path, bytes: &[u8]) -> Result<(), PublishError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{:016x}", rand::random::<u64>()));
    fs::write(&tmp, bytes).map_err(io_at(&tmp))?;
    fs::rename(&tmp, path).map_err(io_at(path))
}

/// Moves the seekable NAR at `tmp` to its place in `cache`; its URL.
fn place_nar(cache: &Path, tmp: &Path, file_hash: &NixHash) -> Result<String, PublishError> {
    let url = format!("nar/{}.nar.zst", crate::nixfmt::base32::encode(&file_hash.sha256));
    let dest = cache.join(&url);
    fs::rename(tmp, &dest).map_err(io_at(&dest))?;
    Ok(url)
}

/// Makes `nar/` and a `nix-cache-info` that says the cache has file
/// indexes (`FileIndexes: 1`, which Nix ignores), keeping what an existing
/// one says otherwise.
fn prepare_cache(cache: &Path) -> Result<(), PublishError> {
    let nar_dir = cache.join("nar");
    fs::create_dir_all(&nar_dir).map_err(io_at(&nar_dir))?;
    let info = cache.join("nix-cache-info");
    let text = match fs::read_to_string(&info) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n".into()
        }
        Err(e) => return Err(PublishError::Io { path: info, source: e }),
    };
    if !text.lines().any(|l| l.trim() == "FileIndexes: 1") {
        let mut text: String = text
            .lines()
            .filter(|l| !l.starts_with("FileIndexes:"))
            .map(|l| format!("{l}\n"))
            .collect();
        text.push_str("FileIndexes: 1\n");
        publish_file(&info, text.as_bytes())?;
    }
    Ok(())
}

/// Copies the closures of `roots` from the Nix store under `store_root`
/// (`/` for the machine's own) into the cache directory `cache`, signed
/// with `key`. References are found as Nix finds them, by scanning each
/// NAR for the hashes of the store's paths. Paths already published are
/// kept (their references still followed).
pub fn push(
    cache: &Path,
    key: &SecretKey,
    store_root: &Path,
    roots: &[StorePath],
    layout: &Layout,
) -> Result<Report, PublishError> {
    prepare_cache(cache)?;
    let store_dir = store_root.join("nix/store");
    let mut candidates = HashMap::new();
    for e in fs::read_dir(&store_dir).map_err(io_at(&store_dir))?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Ok(p) = StorePath::from_base_name(&name) {
            candidates.insert(p.hash_part().to_string(), p);
        }
    }
    let mut report = Report::default();
    let mut queue: VecDeque<StorePath> = roots.iter().cloned().collect();
    let mut seen = BTreeSet::new();
    while let Some(path) = queue.pop_front() {
        if !seen.insert(path.base_name().to_string()) {
            continue;
        }
        let narinfo = cache.join(format!("{}.narinfo", path.hash_part()));
        let refs: Vec<StorePath> = if narinfo.exists() {
            let text = fs::read_to_string(&narinfo).map_err(io_at(&narinfo))?;
            let info = NarInfo::parse(&text).map_err(|source| PublishError::NarInfo {
                path: narinfo.clone(),
                source,
            })?;
            report.present.push(path.to_string());
            info.references
        } else {
            let src = store_dir.join(path.base_name());
            if src.symlink_metadata().is_err() {
                return Err(PublishError::NotInStore {
                    path: path.to_string(),
                    root: store_root.to_path_buf(),
                });
            }
            let raw = cache.join(format!("nar/{}.nar.tmp", path.hash_part()));
            let mut f = io::BufWriter::new(fs::File::create(&raw).map_err(io_at(&raw))?);
            nar::dump(&src, &mut f).map_err(io_at(&src))?;
            f.flush().map_err(io_at(&raw))?;
            drop(f);
            let tmp = cache.join(format!("nar/{}.nar.zst.tmp", path.hash_part()));
            let reader = io::BufReader::new(fs::File::open(&raw).map_err(io_at(&raw))?);
            let p = process(reader, &path.to_string(), &tmp, layout, Some(&candidates))?;
            let _ = fs::remove_file(&raw);
            let refs: Vec<StorePath> = p.refs.iter().filter_map(|h| candidates.get(h).cloned()).collect();
            let mut info = NarInfo {
                store_path: path.clone(),
                url: String::new(), // set where the NAR is placed
                compression: Compression::Zstd,
                file_hash: None,
                file_size: None,
                nar_hash: p.nar_hash,
                nar_size: p.nar_size,
                references: refs.clone(),
                deriver: None,
                sigs: Vec::new(),
                ca: None,
            };
            // Nix's fingerprint covers neither the NAR file nor its hash.
            info.sigs.push(key.sign(&info.fingerprint()));
            publish_processed(cache, &tmp, p, info, key, &mut report)?;
            refs
        };
        queue.extend(refs);
    }
    Ok(report)
}

/// Gives every store path of the cache at `cache` (written by `nix copy`,
/// say) a seekable NAR and a signed index, re-pointing its narinfo at the
/// new NAR (a narinfo's signatures do not cover its URL, so they stay
/// valid). A NAR that does not hash to its narinfo's NarHash is refused by
/// name and nothing is written for it. The old NAR files are left in place.
pub fn index(cache: &Path, key: &SecretKey, layout: &Layout) -> Result<Report, PublishError> {
    prepare_cache(cache)?;
    let mut report = Report::default();
    let mut names: Vec<PathBuf> = fs::read_dir(cache)
        .map_err(io_at(cache))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "narinfo"))
        .collect();
    names.sort();
    for narinfo in names {
        let text = fs::read_to_string(&narinfo).map_err(io_at(&narinfo))?;
        let info = NarInfo::parse(&text).map_err(|source| PublishError::NarInfo {
            path: narinfo.clone(),
            source,
        })?;
        let shown = info.store_path.to_string();
        let idx_path = cache.join(format!("{}.idx", info.store_path.hash_part()));
        let indexed = fs::read(&idx_path)
            .ok()
            .and_then(|b| FileIndex::parse(&b).ok())
            .is_some_and(|i| i.verify(&[key.public()]).is_ok() && i.nar_hash == info.nar_hash);
        if indexed {
            report.present.push(shown);
            continue;
        }
        let src = cache.join(&info.url);
        let file = io::BufReader::new(fs::File::open(&src).map_err(io_at(&src))?);
        let reader: Box<dyn Read> = match info.compression {
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(file).map_err(io_at(&src))?),
            Compression::Xz => Box::new(liblzma::read::XzDecoder::new(file)),
            Compression::None => Box::new(file),
            Compression::Bzip2 => {
                return Err(PublishError::Compression {
                    path: shown,
                    what: "bzip2",
                })
            }
        };
        let tmp = cache.join(format!("nar/{}.nar.zst.tmp", info.store_path.hash_part()));
        let p = match process(reader, &shown, &tmp, layout, None) {
            Ok(p) => p,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        if p.nar_hash != info.nar_hash || p.nar_size != info.nar_size {
            let _ = fs::remove_file(&tmp);
            return Err(PublishError::HashMismatch {
                path: shown,
                got: format!("{} ({} bytes)", p.nar_hash.to_nix_string(), p.nar_size),
                want: format!("{} ({} bytes)", info.nar_hash.to_nix_string(), info.nar_size),
            });
        }
        publish_processed(cache, &tmp, p, info, key, &mut report)?;
    }
    Ok(report)
}

/// Places `p`'s seekable NAR (written at `tmp`), writes its signed index,
/// then `info` pointed at that NAR, last: no reader sees the path before
/// its files.
fn publish_processed(
    cache: &Path,
    tmp: &Path,
    p: Processed,
    mut info: NarInfo,
    key: &SecretKey,
    report: &mut Report,
) -> Result<(), PublishError> {
    let hash = info.store_path.hash_part().to_string();
    let url = place_nar(cache, tmp, &p.written.file_hash)?;
    let mut idx = p.index.finish(
        info.store_path.clone(),
        p.nar_hash,
        p.nar_size,
        Some(url.clone()),
        p.written.frames,
    );
    idx.sign(key);
    publish_file(&cache.join(format!("{hash}.idx")), &idx.to_bytes())?;
    info.url = url;
    info.compression = Compression::Zstd;
    info.file_hash = Some(p.written.file_hash);
    info.file_size = Some(p.written.file_size);
    publish_file(&cache.join(format!("{hash}.narinfo")), info.to_text().as_bytes())?;
    report.published.push(info.store_path.to_string());
    report.nar_bytes += p.nar_size;
    report.compressed_bytes += p.written.file_size;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_found_across_read_boundaries_and_only_for_candidates() {
        let a = StorePath::parse("/nix/store/syd87l2rxw8cbsxmxl853h0r6pdwhw1a-a").unwrap();
        let b = StorePath::parse("/nix/store/0a5rbqvcs4a7fyjkbxmaz4yrcgfqnhbm-b").unwrap();
        let candidates: HashMap<String, StorePath> = [&a, &b]
            .iter()
            .map(|p| (p.hash_part().to_string(), (*p).clone()))
            .collect();
        let text = format!(
            "xx{}yy /nix/store/zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz-c {}",
            a.hash_part(),
            &b.hash_part()[..20]
        );
        for split in [1, 5, 13, 20, 31, 40] {
            let mut s = RefScanner {
                candidates: &candidates,
                found: BTreeSet::new(),
                carry: Vec::new(),
            };
            let bytes = text.as_bytes();
            for piece in bytes.chunks(split) {
                s.feed(piece);
            }
            assert_eq!(s.found.iter().collect::<Vec<_>>(), [a.hash_part()], "split {split}");
        }
    }
}
