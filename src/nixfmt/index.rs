//! `<hash>.idx`: a signed index of one store path's NAR, published next to
//! its narinfo (stock Nix ignores files it does not know), so that a reader
//! can list the tree and fetch single files, chunk by chunk, verifying every
//! byte against a trusted key without the whole NAR.
//!
//! A text header in the narinfo style, a blank line, then a binary body:
//!
//! ```text
//! FileIndex: 1
//! StorePath: /nix/store/<hash>-<name>
//! NarHash: sha256:<base32>           the store path's, as its narinfo says
//! NarSize: <bytes>
//! ChunkSize: <bytes>                 a power of two, 4 KiB to 4 MiB
//! URL: nar/<file>.nar.zst            the NAR file the frames describe (optional)
//! BodyHash: sha256:<base32>
//! BodySize: <bytes>
//! Sig: <key name>:<base64>           over the fingerprint, one or more
//! ```
//!
//! Body, little-endian: `u32` entry count; per entry in NAR order a kind
//! byte (1 directory, 2 file, 3 executable file, 4 symlink), a `u16`-long
//! path relative to the root (empty for the root), then for files the size
//! and the contents' offset in the NAR (`u64` each), for symlinks a
//! `u16`-long target; `u32` frame count and per frame the compressed and
//! decompressed sizes (`u32` each): the NAR file at `URL` is these
//! independent zstd frames back to back (a seekable zstd file); then the
//! SHA-256 of every `ChunkSize` piece of every file, in order.
//!
//! The signature covers the fingerprint
//! `nix-snapshotter-index;1;<StorePath>;<NarHash>;<NarSize>;<ChunkSize>;<URL>;<BodyHash>;<BodySize>`,
//! so a trusted key vouches for the tree, the offsets and every chunk; the
//! NarHash binds the index to the narinfo's store path contents.

use sha2::{Digest, Sha256};

use super::hash::NixHash;
use super::nar::{valid_entry_name, NarError, Visitor};
use super::signature::{verify_fingerprint, PublicKey, SecretKey, Untrusted};
use super::store_path::StorePath;

/// A header is a few lines.
pub const MAX_HEADER: usize = 64 << 10;
/// Bodies of the largest store paths (a few hundred thousand files) fit.
pub const MAX_BODY: u64 = 256 << 20;
pub const MIN_CHUNK: u32 = 4 << 10;
pub const MAX_CHUNK: u32 = 4 << 20;
/// A frame decompresses to at most this (bounds what one read inflates).
pub const MAX_FRAME: u32 = 64 << 20;
const MAX_PATH: usize = 64 << 10;
/// Entries an index may list (each costs about 100 bytes parsed).
pub const MAX_ENTRIES: usize = 1 << 20;
const MAX_TARGET: usize = 4095;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed file index: {0}")]
pub struct IndexError(pub String);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Directory,
    Symlink {
        target: Vec<u8>,
    },
    Regular {
        executable: bool,
        size: u64,
        /// Where the contents start in the NAR.
        offset: u64,
        /// Index of its first chunk hash in [`FileIndex::chunks`].
        first_chunk: usize,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Relative to the store path; empty for the root.
    pub path: Vec<u8>,
    pub kind: EntryKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub compressed: u32,
    pub decompressed: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileIndex {
    pub store_path: StorePath,
    pub nar_hash: NixHash,
    pub nar_size: u64,
    pub chunk_size: u32,
    pub url: Option<String>,
    pub entries: Vec<Entry>,
    pub frames: Vec<Frame>,
    pub chunks: Vec<[u8; 32]>,
    pub sigs: Vec<String>,
}

fn chunk_count(size: u64, chunk: u32) -> u64 {
    size.div_ceil(chunk as u64)
}

impl FileIndex {
    fn body(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend((self.entries.len() as u32).to_le_bytes());
        for e in &self.entries {
            let kind = match &e.kind {
                EntryKind::Directory => 1u8,
                EntryKind::Regular { executable: false, .. } => 2,
                EntryKind::Regular { executable: true, .. } => 3,
                EntryKind::Symlink { .. } => 4,
            };
            b.push(kind);
            b.extend((e.path.len() as u16).to_le_bytes());
            b.extend(&e.path);
            match &e.kind {
                EntryKind::Directory => {}
                EntryKind::Regular { size, offset, .. } => {
                    b.extend(size.to_le_bytes());
                    b.extend(offset.to_le_bytes());
                }
                EntryKind::Symlink { target } => {
                    b.extend((target.len() as u16).to_le_bytes());
                    b.extend(target);
                }
            }
        }
        b.extend((self.frames.len() as u32).to_le_bytes());
        for f in &self.frames {
            b.extend(f.compressed.to_le_bytes());
            b.extend(f.decompressed.to_le_bytes());
        }
        for c in &self.chunks {
            b.extend(c);
        }
        b
    }

    fn fingerprint_of(&self, body: &[u8]) -> String {
        let body_hash = NixHash {
            sha256: Sha256::digest(body).into(),
        };
        fingerprint_text(
            &self.store_path,
            &self.nar_hash,
            self.nar_size,
            self.chunk_size as u64,
            self.url.as_deref(),
            &body_hash,
            body.len() as u64,
        )
    }

    /// What a signature covers.
    pub fn fingerprint(&self) -> String {
        self.fingerprint_of(&self.body())
    }

    /// Adds `key`'s signature.
    pub fn sign(&mut self, key: &SecretKey) {
        let sig = key.sign(&self.fingerprint());
        self.sigs
            .retain(|s| s.split_once(':').map(|(n, _)| n) != Some(key.name.as_str()));
        self.sigs.push(sig);
    }

    /// Accepts the index if a trusted key signed it; that key's name.
    pub fn verify(&self, trusted: &[PublicKey]) -> Result<String, Untrusted> {
        verify_fingerprint(&self.fingerprint(), &self.sigs, trusted)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let body = self.body();
        let body_hash = NixHash {
            sha256: Sha256::digest(&body).into(),
        };
        let mut out = format!(
            "FileIndex: 1\nStorePath: {}\nNarHash: {}\nNarSize: {}\nChunkSize: {}\n",
            self.store_path,
            self.nar_hash.to_nix_string(),
            self.nar_size,
            self.chunk_size
        );
        if let Some(u) = &self.url {
            out.push_str(&format!("URL: {u}\n"));
        }
        out.push_str(&format!(
            "BodyHash: {}\nBodySize: {}\n",
            body_hash.to_nix_string(),
            body.len()
        ));
        for s in &self.sigs {
            out.push_str(&format!("Sig: {s}\n"));
        }
        out.push('\n');
        let mut bytes = out.into_bytes();
        bytes.extend(body);
        bytes
    }

    /// Parses an index; every field is checked against every other (a
    /// tree in NAR order, files in NAR order inside the NAR, frames that
    /// add up to the NAR, one hash per chunk), so that what a signature
    /// vouches for is also what a reader can use safely.
    pub fn parse(bytes: &[u8]) -> Result<FileIndex, IndexError> {
        Self::parse_with(bytes, None)
    }

    /// [`FileIndex::parse`], refusing an index no key of `trusted` signed
    /// before its body is even read (the header names the body's hash and
    /// size, which the signature covers): an untrusted index costs no more
    /// than its header.
    pub fn parse_trusted(bytes: &[u8], trusted: &[PublicKey]) -> Result<FileIndex, IndexError> {
        Self::parse_with(bytes, Some(trusted))
    }

    fn parse_with(bytes: &[u8], trusted: Option<&[PublicKey]>) -> Result<FileIndex, IndexError> {
        let err = |m: String| IndexError(m);
        let split = bytes
            .windows(2)
            .take(MAX_HEADER)
            .position(|w| w == b"\n\n")
            .ok_or_else(|| err(format!("no header end in the first {MAX_HEADER} bytes")))?;
        let header = std::str::from_utf8(&bytes[..split]).map_err(|_| err("header is not UTF-8".into()))?;
        let body = &bytes[split + 2..];
        let (mut version, mut store_path, mut nar_hash, mut nar_size, mut chunk_size) = (None, None, None, None, None);
        let (mut url, mut body_hash, mut body_size) = (None, None, None);
        let mut sigs = Vec::new();
        for (n, line) in header.lines().enumerate() {
            let (key, value) = line
                .split_once(": ")
                .ok_or_else(|| err(format!("line {}: expected 'Key: value'", n + 1)))?;
            let num = |v: &str| {
                v.parse::<u64>()
                    .map_err(|_| err(format!("line {}: {key} is not a number", n + 1)))
            };
            let slot_dup = |present: bool| {
                if present {
                    Err(err(format!("line {}: duplicate field {key}", n + 1)))
                } else {
                    Ok(())
                }
            };
            match key {
                "FileIndex" => {
                    slot_dup(version.is_some())?;
                    version = Some(value.to_string());
                }
                "StorePath" => {
                    slot_dup(store_path.is_some())?;
                    store_path = Some(StorePath::parse(value).map_err(|e| err(e.to_string()))?);
                }
                "NarHash" => {
                    slot_dup(nar_hash.is_some())?;
                    nar_hash = Some(NixHash::parse(value).map_err(|e| err(e.to_string()))?);
                }
                "NarSize" => {
                    slot_dup(nar_size.is_some())?;
                    nar_size = Some(num(value)?);
                }
                "ChunkSize" => {
                    slot_dup(chunk_size.is_some())?;
                    chunk_size = Some(num(value)?);
                }
                "URL" => {
                    slot_dup(url.is_some())?;
                    if value.is_empty() || value.contains(['\n', ';']) {
                        return Err(err(format!("line {}: bad URL", n + 1)));
                    }
                    url = Some(value.to_string());
                }
                "BodyHash" => {
                    slot_dup(body_hash.is_some())?;
                    body_hash = Some(NixHash::parse(value).map_err(|e| err(e.to_string()))?);
                }
                "BodySize" => {
                    slot_dup(body_size.is_some())?;
                    body_size = Some(num(value)?);
                }
                "Sig" => sigs.push(value.to_string()),
                // Later versions may add fields; they are not signed here.
                _ => {}
            }
        }
        if version.as_deref() != Some("1") {
            return Err(err(format!("unsupported version {version:?}")));
        }
        let missing = |f: &str| err(format!("missing {f}"));
        let store_path = store_path.ok_or_else(|| missing("StorePath"))?;
        let nar_hash = nar_hash.ok_or_else(|| missing("NarHash"))?;
        let nar_size = nar_size.ok_or_else(|| missing("NarSize"))?;
        let chunk_size = chunk_size.ok_or_else(|| missing("ChunkSize"))?;
        let body_hash = body_hash.ok_or_else(|| missing("BodyHash"))?;
        let body_size = body_size.ok_or_else(|| missing("BodySize"))?;
        if !(MIN_CHUNK as u64..=MAX_CHUNK as u64).contains(&chunk_size) || !chunk_size.is_power_of_two() {
            return Err(err(format!(
                "ChunkSize {chunk_size} is not a power of two from 4 KiB to 4 MiB"
            )));
        }
        if body_size > MAX_BODY || body.len() as u64 != body_size {
            return Err(err(format!(
                "body of {} bytes where BodySize says {body_size} (at most {MAX_BODY})",
                body.len()
            )));
        }
        if let Some(keys) = trusted {
            let fingerprint = fingerprint_text(
                &store_path,
                &nar_hash,
                nar_size,
                chunk_size,
                url.as_deref(),
                &body_hash,
                body_size,
            );
            verify_fingerprint(&fingerprint, &sigs, keys).map_err(|why| err(format!("not trusted: {why}")))?;
        }
        if <[u8; 32]>::from(Sha256::digest(body)) != body_hash.sha256 {
            return Err(err("body does not match BodyHash".into()));
        }
        let mut index = FileIndex {
            store_path,
            nar_hash,
            nar_size,
            chunk_size: chunk_size as u32,
            url,
            entries: Vec::new(),
            frames: Vec::new(),
            chunks: Vec::new(),
            sigs,
        };
        parse_body(&mut index, body)?;
        Ok(index)
    }

    /// The entry at `path` (relative, `/`-separated; empty for the root).
    pub fn entry(&self, path: &[u8]) -> Option<&Entry> {
        self.entries.iter().find(|e| e.path == path)
    }
}

/// What a signature covers.
fn fingerprint_text(
    store_path: &StorePath,
    nar_hash: &NixHash,
    nar_size: u64,
    chunk_size: u64,
    url: Option<&str>,
    body_hash: &NixHash,
    body_len: u64,
) -> String {
    format!(
        "nix-snapshotter-index;1;{store_path};{};{nar_size};{chunk_size};{};{};{body_len}",
        nar_hash.to_nix_string(),
        url.unwrap_or(""),
        body_hash.to_nix_string(),
    )
}

/// An entry's path split into its directory's path and its name (the root
/// directory's entries have an empty parent).
pub fn split_parent(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&path[..0], path),
    }
}

/// A cursor over the body that never reads past its end.
struct Cursor<'a> {
    b: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], IndexError> {
        if self.b.len() < n {
            return Err(IndexError("body truncated".into()));
        }
        let (a, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, IndexError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, IndexError> {
        let t = self.take(2)?;
        Ok(u16::from_le_bytes([t[0], t[1]]))
    }
    fn u32(&mut self) -> Result<u32, IndexError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> Result<u64, IndexError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
}

fn parse_body(index: &mut FileIndex, body: &[u8]) -> Result<(), IndexError> {
    let err = |m: String| IndexError(m);
    let mut c = Cursor { b: body };
    let count = c.u32()? as usize;
    // Each entry takes at least 3 bytes: a count beyond that is a lie. The
    // largest store paths hold a few hundred thousand entries.
    if count == 0 || count > body.len() / 3 || count > MAX_ENTRIES {
        return Err(err(format!("{count} entries cannot fit the body")));
    }
    let mut check = TreeCheck::default();
    let mut next_chunk: u64 = 0;
    let mut file_end: Option<u64> = None;
    for _ in 0..count {
        let kind = c.u8()?;
        let len = c.u16()? as usize;
        let path = c.take(len)?.to_vec();
        let shown = String::from_utf8_lossy(&path).into_owned();
        let kind = match kind {
            1 => EntryKind::Directory,
            2 | 3 => {
                let size = c.u64()?;
                let offset = c.u64()?;
                let end = offset
                    .checked_add(size)
                    .filter(|&e| e <= index.nar_size)
                    .ok_or_else(|| err(format!("/{shown}: contents beyond the NAR")))?;
                // Files come in NAR order, and a NAR puts framing between
                // two files' contents (and before the first).
                if offset == 0 || file_end.is_some_and(|e| offset <= e) {
                    return Err(err(format!("/{shown}: contents overlap or go backwards")));
                }
                file_end = Some(end);
                let first_chunk = next_chunk as usize;
                next_chunk += chunk_count(size, index.chunk_size);
                EntryKind::Regular {
                    executable: kind == 3,
                    size,
                    offset,
                    first_chunk,
                }
            }
            4 => {
                let tlen = c.u16()? as usize;
                let target = c.take(tlen)?.to_vec();
                if target.is_empty() || tlen > MAX_TARGET || target.contains(&0) {
                    return Err(err(format!("/{shown}: bad symlink target")));
                }
                EntryKind::Symlink { target }
            }
            k => return Err(err(format!("/{shown}: unknown kind {k}"))),
        };
        check.add(&path, matches!(kind, EntryKind::Directory))?;
        index.entries.push(Entry { path, kind });
    }
    let frames = c.u32()? as usize;
    if frames > c.b.len() / 8 {
        return Err(err(format!("{frames} frames cannot fit the body")));
    }
    let mut total: u64 = 0;
    for _ in 0..frames {
        let f = Frame {
            compressed: c.u32()?,
            decompressed: c.u32()?,
        };
        if f.compressed == 0 || f.decompressed == 0 || f.decompressed > MAX_FRAME {
            return Err(err(format!("frame of {} / {} bytes", f.compressed, f.decompressed)));
        }
        total += f.decompressed as u64;
        index.frames.push(f);
    }
    if frames > 0 && (total != index.nar_size || index.url.is_none()) {
        return Err(err(format!(
            "frames add up to {total} bytes of a {}-byte NAR, or name no file",
            index.nar_size
        )));
    }
    if c.b.len() as u64 != next_chunk * 32 {
        return Err(err(format!(
            "{} bytes of chunk hashes where {next_chunk} chunks need {}",
            c.b.len(),
            next_chunk * 32
        )));
    }
    index.chunks =
        c.b.chunks_exact(32)
            .map(|h| {
                let mut a = [0u8; 32];
                a.copy_from_slice(h);
                a
            })
            .collect();
    Ok(())
}

/// Checks that paths come as a NAR lists them: the root first, every entry
/// inside a directory listed before it, names valid and strictly sorted.
#[derive(Default)]
struct TreeCheck {
    /// Open directories from the root down: (path, last child name).
    stack: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    seen_root: bool,
}

impl TreeCheck {
    fn add(&mut self, path: &[u8], is_dir: bool) -> Result<(), IndexError> {
        let err = |m: &str| IndexError(format!("/{}: {m}", String::from_utf8_lossy(path)));
        if path.len() > MAX_PATH {
            return Err(err("path too long"));
        }
        if !self.seen_root {
            if !path.is_empty() {
                return Err(err("the first entry must be the root"));
            }
            self.seen_root = true;
            if is_dir {
                self.stack.push((Vec::new(), None));
            }
            return Ok(());
        }
        let (parent, name) = split_parent(path);
        if path.is_empty() || path[0] == b'/' || !valid_entry_name(name) {
            return Err(err("invalid entry name"));
        }
        while self.stack.last().is_some_and(|(p, _)| p != parent) {
            self.stack.pop();
        }
        let Some((_, last)) = self.stack.last_mut() else {
            return Err(err("not inside a directory listed before it"));
        };
        if last.as_deref().is_some_and(|l| l >= name) {
            return Err(err("entries not strictly sorted"));
        }
        *last = Some(name.to_vec());
        if is_dir {
            self.stack.push((path.to_vec(), None));
        }
        Ok(())
    }
}

/// Builds an index while a NAR is walked ([`super::nar::walk`]): the tree,
/// each file's offset, and the hash of every chunk.
pub struct IndexBuilder {
    chunk_size: u32,
    entries: Vec<Entry>,
    chunks: Vec<[u8; 32]>,
    hasher: Sha256,
    in_chunk: u32,
}

impl IndexBuilder {
    pub fn new(chunk_size: u32) -> IndexBuilder {
        IndexBuilder {
            chunk_size,
            entries: Vec::new(),
            chunks: Vec::new(),
            hasher: Sha256::new(),
            in_chunk: 0,
        }
    }

    /// The index of the NAR walked, for `store_path` (whose narinfo says
    /// `nar_hash` and `nar_size`), unsigned.
    pub fn finish(
        self,
        store_path: StorePath,
        nar_hash: NixHash,
        nar_size: u64,
        url: Option<String>,
        frames: Vec<Frame>,
    ) -> FileIndex {
        FileIndex {
            store_path,
            nar_hash,
            nar_size,
            chunk_size: self.chunk_size,
            url,
            entries: self.entries,
            frames,
            chunks: self.chunks,
            sigs: Vec::new(),
        }
    }
}

/// A path an index cannot hold (its length is a `u16`; the reader takes
/// at most [`MAX_PATH`]): the publisher refuses it rather than sign a
/// truncated one.
fn too_long(path: &[u8]) -> Result<(), NarError> {
    if path.len() >= MAX_PATH.min(u16::MAX as usize) {
        return Err(NarError::Malformed {
            path: format!("/{}", String::from_utf8_lossy(&path[..64])),
            msg: format!("a path of {} bytes is too long for a file index", path.len()),
        });
    }
    Ok(())
}

impl Visitor for IndexBuilder {
    fn directory(&mut self, path: &[u8]) -> Result<(), NarError> {
        too_long(path)?;
        self.entries.push(Entry {
            path: path.to_vec(),
            kind: EntryKind::Directory,
        });
        Ok(())
    }

    fn symlink(&mut self, path: &[u8], target: &[u8]) -> Result<(), NarError> {
        too_long(path)?;
        self.entries.push(Entry {
            path: path.to_vec(),
            kind: EntryKind::Symlink {
                target: target.to_vec(),
            },
        });
        Ok(())
    }

    fn file(&mut self, path: &[u8], executable: bool, size: u64, offset: u64) -> Result<(), NarError> {
        too_long(path)?;
        self.entries.push(Entry {
            path: path.to_vec(),
            kind: EntryKind::Regular {
                executable,
                size,
                offset,
                first_chunk: self.chunks.len(),
            },
        });
        self.in_chunk = 0;
        Ok(())
    }

    fn data(&mut self, mut bytes: &[u8]) -> Result<(), NarError> {
        while !bytes.is_empty() {
            let n = bytes.len().min((self.chunk_size - self.in_chunk) as usize);
            self.hasher.update(&bytes[..n]);
            self.in_chunk += n as u32;
            bytes = &bytes[n..];
            if self.in_chunk == self.chunk_size {
                self.chunks.push(std::mem::take(&mut self.hasher).finalize().into());
                self.in_chunk = 0;
            }
        }
        Ok(())
    }

    fn file_end(&mut self) -> Result<(), NarError> {
        if self.in_chunk > 0 {
            self.chunks.push(std::mem::take(&mut self.hasher).finalize().into());
            self.in_chunk = 0;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nixfmt::nar;

    fn sample() -> (tempfile::TempDir, Vec<u8>) {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir_all(src.join("lib/deep")).unwrap();
        std::fs::write(src.join("lib/deep/big"), vec![7u8; 10_000]).unwrap();
        std::fs::write(src.join("lib/a.c"), b"int main;").unwrap();
        std::fs::write(src.join("empty"), b"").unwrap();
        std::fs::write(src.join("run"), b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(src.join("run"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("lib/a.c", src.join("link")).unwrap();
        let mut bytes = Vec::new();
        nar::dump(&src, &mut bytes).unwrap();
        (tmp, bytes)
    }

    fn build(nar_bytes: &[u8]) -> FileIndex {
        let mut b = IndexBuilder::new(4096);
        let size = nar::walk(nar_bytes, &mut b).unwrap();
        let hash = NixHash {
            sha256: Sha256::digest(nar_bytes).into(),
        };
        let sp = StorePath::parse("/nix/store/syd87l2rxw8cbsxmxl853h0r6pdwhw1a-x").unwrap();
        b.finish(sp, hash, size, None, Vec::new())
    }

    fn key(seed: u8) -> SecretKey {
        use base64::Engine;
        let k = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
        SecretKey::parse(&format!(
            "test-{seed}:{}",
            base64::engine::general_purpose::STANDARD.encode(k.to_keypair_bytes())
        ))
        .unwrap()
    }

    #[test]
    fn an_index_locates_every_file_and_hashes_every_chunk() {
        let (_t, bytes) = sample();
        let idx = build(&bytes);
        let paths: Vec<String> = idx
            .entries
            .iter()
            .map(|e| String::from_utf8_lossy(&e.path).into())
            .collect();
        assert_eq!(
            paths,
            ["", "empty", "lib", "lib/a.c", "lib/deep", "lib/deep/big", "link", "run"]
        );
        let Some(EntryKind::Regular {
            size,
            offset,
            first_chunk,
            executable: false,
        }) = idx.entry(b"lib/deep/big").map(|e| &e.kind)
        else {
            panic!("no big file")
        };
        // The offset points at the contents in the NAR; 10,000 bytes make
        // three 4 KiB chunks, each hashed.
        let (o, s) = (*offset as usize, *size as usize);
        assert_eq!(&bytes[o..o + s], &vec![7u8; 10_000][..]);
        for i in 0..3 {
            let piece = &bytes[o + i * 4096..(o + s).min(o + (i + 1) * 4096)];
            assert_eq!(idx.chunks[first_chunk + i], <[u8; 32]>::from(Sha256::digest(piece)));
        }
        assert!(matches!(
            idx.entry(b"run").unwrap().kind,
            EntryKind::Regular { executable: true, .. }
        ));
        assert_eq!(
            idx.entry(b"link").unwrap().kind,
            EntryKind::Symlink {
                target: b"lib/a.c".to_vec()
            }
        );
    }

    #[test]
    fn it_round_trips_and_only_a_trusted_key_vouches_for_it() {
        let (_t, bytes) = sample();
        let mut idx = build(&bytes);
        idx.url = Some("nar/x.nar.zst".into());
        idx.frames = vec![Frame {
            compressed: 100,
            decompressed: idx.nar_size as u32,
        }];
        let (good, other) = (key(1), key(2));
        idx.sign(&good);
        let text = idx.to_bytes();
        let back = FileIndex::parse(&text).unwrap();
        assert_eq!(back, idx);
        assert_eq!(back.verify(&[good.public()]), Ok("test-1".into()));
        assert!(back.verify(&[other.public()]).is_err());
        // A change to anything signed breaks the signature: a chunk hash,
        // the NAR file named.
        let mut forged = back.clone();
        forged.chunks[0][0] ^= 1;
        assert!(forged.verify(&[good.public()]).is_err());
        let mut moved = back.clone();
        moved.url = Some("nar/y.nar.zst".into());
        assert!(moved.verify(&[good.public()]).is_err());
    }

    #[test]
    fn an_untrusted_index_is_refused_before_its_body_is_read() {
        let (_t, bytes) = sample();
        let mut idx = build(&bytes);
        idx.sign(&key(2));
        let mut text = idx.to_bytes();
        // A body that would not parse: the signature says no first.
        let last = text.len() - 1;
        text[last] ^= 1;
        let e = FileIndex::parse_trusted(&text, &[key(1).public()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("not trusted"), "{e}");
        let good = idx.to_bytes();
        assert!(FileIndex::parse_trusted(&good, &[key(2).public()]).is_ok());
        assert!(FileIndex::parse_trusted(&good, &[key(1).public()]).is_err());
    }

    #[test]
    fn inconsistent_bodies_are_refused_by_what_is_wrong() {
        let (_t, bytes) = sample();
        let idx = build(&bytes);
        let reparse = |f: &dyn Fn(&mut FileIndex)| {
            let mut i = idx.clone();
            f(&mut i);
            FileIndex::parse(&i.to_bytes()).unwrap_err().to_string()
        };
        let e = reparse(&|i| i.entries.swap(3, 4));
        assert!(e.contains("sorted") || e.contains("overlap"), "{e}");
        let e = reparse(&|i| i.entries[2].path = b"lib/../x".to_vec());
        assert!(e.contains("invalid entry name") || e.contains("inside"), "{e}");
        let e = reparse(&|i| {
            if let EntryKind::Regular { offset, .. } = &mut i.entries[5].kind {
                *offset = i.nar_size;
            }
        });
        assert!(e.contains("beyond the NAR"), "{e}");
        let e = reparse(&|i| {
            i.chunks.pop();
        });
        assert!(e.contains("chunk hashes"), "{e}");
        let e = reparse(&|i| {
            i.frames = vec![Frame {
                compressed: 1,
                decompressed: 5,
            }];
            i.url = Some("nar/x".into());
        });
        assert!(e.contains("frames add up"), "{e}");
        let e = reparse(&|i| i.chunk_size = 1000);
        assert!(e.contains("ChunkSize"), "{e}");
        let e = reparse(&|i| i.entries[1].path = b"/empty".to_vec());
        assert!(e.contains("invalid entry name"), "{e}");
        // A body that does not match its header's hash.
        let mut text = idx.to_bytes();
        let last = text.len() - 1;
        text[last] ^= 1;
        assert!(FileIndex::parse(&text).unwrap_err().to_string().contains("BodyHash"));
    }

    #[test]
    fn the_parser_survives_mutations() {
        let (_t, bytes) = sample();
        let mut idx = build(&bytes);
        idx.sign(&key(1));
        let text = idx.to_bytes();
        let mut rng = 0x2545F4914F6CDD1Du64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for _ in 0..3000 {
            let mut m = text.clone();
            for _ in 0..1 + next() % 3 {
                let i = (next() as usize) % m.len();
                match next() % 3 {
                    0 => m[i] ^= 1 << (next() % 8),
                    1 => m.truncate(i),
                    _ => m[i] = next() as u8,
                }
            }
            if let Ok(p) = FileIndex::parse(&m) {
                // Whatever parses is self-consistent (and mostly unsigned).
                let _ = p.verify(&[key(1).public()]);
                assert_eq!(FileIndex::parse(&p.to_bytes()).unwrap(), p);
            }
        }
        // The body mutated under a header rebuilt to match it: the body
        // parser itself must refuse or accept soundly.
        let split = text.windows(2).position(|w| w == b"\n\n").unwrap();
        let body = &text[split + 2..];
        let mut accepted = 0;
        for _ in 0..3000 {
            let mut m = body.to_vec();
            for _ in 0..1 + next() % 3 {
                let i = (next() as usize) % m.len();
                match next() % 3 {
                    0 => m[i] ^= 1 << (next() % 8),
                    1 => m.truncate(i.max(1)),
                    _ => m[i] = next() as u8,
                }
            }
            let mut whole = format!(
                "FileIndex: 1\nStorePath: {}\nNarHash: {}\nNarSize: {}\nChunkSize: 4096\nBodyHash: {}\nBodySize: {}\n\n",
                idx.store_path,
                idx.nar_hash.to_nix_string(),
                idx.nar_size,
                NixHash {
                    sha256: Sha256::digest(&m).into()
                }
                .to_nix_string(),
                m.len()
            )
            .into_bytes();
            whole.extend(&m);
            if let Ok(p) = FileIndex::parse(&whole) {
                accepted += 1;
                assert_eq!(FileIndex::parse(&p.to_bytes()).unwrap(), p);
            }
        }
        assert!(accepted > 0, "no mutated body was accepted: the check proves little");
    }
}
