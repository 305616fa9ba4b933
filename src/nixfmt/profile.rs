//! Access profiles: which byte ranges of which store files a container read
//! first, in order, so that a later cold start can fetch them all at once
//! before they are asked for. The daemon records one
//! (`<root>/access-profile`); published as a store path named by an
//! image's `nix-profile` label, it is untrusted input like any store file:
//! bounded, and only paths of the image's closure are taken from it.
//!
//! ```text
//! nix-snapshotter-profile 1
//! <hash>-<name> <path in it, %-escaped> <offset> <length>
//! ```

use std::collections::HashSet;

use super::nar::valid_entry_name;
use super::StorePath;

/// A profile longer than this is refused.
pub const MAX_PROFILE: usize = 8 << 20;
/// Ranges kept at most (recording stops there).
pub const MAX_RANGES: usize = 200_000;
const HEADER: &str = "nix-snapshotter-profile 1";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub path: StorePath,
    /// Relative to the store path, `/`-separated.
    pub rel: Vec<u8>,
    pub offset: u64,
    pub len: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed access profile: {0}")]
pub struct ProfileError(pub String);

fn escape(rel: &[u8]) -> String {
    let mut s = String::with_capacity(rel.len());
    for &b in rel {
        if b.is_ascii_graphic() && b != b'%' {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02x}"));
        }
    }
    s
}

fn unescape(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

pub fn to_text(ranges: &[Range]) -> String {
    let mut t = format!("{HEADER}\n");
    for r in ranges {
        t.push_str(&format!(
            "{} {} {} {}\n",
            r.path.base_name(),
            escape(&r.rel),
            r.offset,
            r.len
        ));
    }
    t
}

/// Parses a profile; every line is checked (a store path name, a relative
/// path of valid names, numbers).
pub fn parse(text: &str) -> Result<Vec<Range>, ProfileError> {
    let err = |m: String| ProfileError(m);
    if text.len() > MAX_PROFILE {
        return Err(err(format!("{} bytes is more than {MAX_PROFILE}", text.len())));
    }
    let mut lines = text.lines();
    if lines.next() != Some(HEADER) {
        return Err(err(format!("the first line must be {HEADER:?}")));
    }
    let mut out = Vec::new();
    for (n, line) in lines.enumerate() {
        if line.is_empty() {
            continue;
        }
        let bad = |m: &str| err(format!("line {}: {m}", n + 2));
        if out.len() >= MAX_RANGES {
            return Err(bad(&format!("more than {MAX_RANGES} ranges")));
        }
        let f: Vec<&str> = line.split(' ').collect();
        let [base, rel, offset, len] = f[..] else {
            return Err(bad("expected: store path name, path, offset, length"));
        };
        let path = StorePath::from_base_name(base).map_err(|e| bad(&e.to_string()))?;
        let rel = unescape(rel).ok_or_else(|| bad("bad %-escape"))?;
        if rel.split(|&b| b == b'/').any(|c| !valid_entry_name(c)) {
            return Err(bad("not a path inside a store path"));
        }
        let num = |s: &str| s.parse::<u64>().map_err(|_| bad("offset and length are numbers"));
        out.push(Range {
            path,
            rel,
            offset: num(offset)?,
            len: num(len)?,
        });
    }
    Ok(out)
}

/// What the store read by the chunk, first reads first: one range per
/// (file, chunk) first seen, merged with the one before when it continues it.
#[derive(Default)]
pub struct Recorder {
    seen: HashSet<(StorePath, Vec<u8>, u64)>,
    pub ranges: Vec<Range>,
    /// Changed since last written.
    pub dirty: bool,
    /// About the length of the profile's text so far.
    text_len: usize,
}

/// Chunks remembered as seen at most: recording stops there (a profile is
/// about a program's first reads, not everything a node ever reads).
const MAX_SEEN: usize = 1 << 20;

impl Recorder {
    /// Notes a read of `len` bytes at `offset` of `rel` in `path`, in
    /// chunks of `chunk` bytes.
    pub fn note(&mut self, path: &StorePath, rel: &[u8], offset: u64, len: u64, chunk: u64) {
        if len == 0 || chunk == 0 {
            return;
        }
        for c in offset / chunk..=(offset + len - 1) / chunk {
            // Full: what is recorded stays parseable (within MAX_PROFILE and
            // MAX_RANGES), and memory bounded.
            let line = path.base_name().len() + 3 * rel.len() + 44;
            if self.seen.len() >= MAX_SEEN
                || self.ranges.len() >= MAX_RANGES
                || self.text_len + line > MAX_PROFILE - HEADER.len() - 1
            {
                return;
            }
            if !self.seen.insert((path.clone(), rel.to_vec(), c)) {
                continue;
            }
            self.dirty = true;
            let (start, size) = (c * chunk, chunk);
            if let Some(last) = self.ranges.last_mut() {
                if &last.path == path && last.rel == rel && last.offset + last.len == start {
                    last.len += size;
                    continue;
                }
            }
            self.text_len += line;
            self.ranges.push(Range {
                path: path.clone(),
                rel: rel.to_vec(),
                offset: start,
                len: size,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_profile_round_trips_and_merges_what_continues() {
        let p = StorePath::from_base_name("syd87l2rxw8cbsxmxl853h0r6pdwhw1a-python3").unwrap();
        let mut r = Recorder::default();
        r.note(&p, b"lib/os.py", 0, 100, 4096);
        r.note(&p, b"lib/os.py", 10, 5000, 4096); // chunk 0 again, chunk 1 new: merged
        r.note(&p, b"lib/odd name %", 8192, 1, 4096);
        r.note(&p, b"lib/os.py", 0, 1, 4096); // seen
        assert_eq!(r.ranges.len(), 2);
        assert_eq!((r.ranges[0].offset, r.ranges[0].len), (0, 8192));
        let text = to_text(&r.ranges);
        assert!(text.contains("lib/odd%20name%20%25 8192 4096"), "{text}");
        assert_eq!(parse(&text).unwrap(), r.ranges);
    }

    #[test]
    fn a_full_recorder_stops_and_what_it_wrote_still_parses() {
        let p = StorePath::from_base_name("syd87l2rxw8cbsxmxl853h0r6pdwhw1a-python3").unwrap();
        let mut r = Recorder::default();
        // Long, escaped names: the text limit is what stops it.
        let rel = format!("lib/{}", " x".repeat(2000)).into_bytes();
        for i in 0..10_000u64 {
            r.note(&p, &rel, i * 8192, 1, 4096);
        }
        let text = to_text(&r.ranges);
        assert!(
            text.len() <= MAX_PROFILE && r.ranges.len() < 10_000,
            "{} bytes",
            text.len()
        );
        assert_eq!(parse(&text).unwrap().len(), r.ranges.len());
    }

    #[test]
    fn hostile_profiles_are_refused_by_line() {
        let p = "syd87l2rxw8cbsxmxl853h0r6pdwhw1a-x";
        for (text, says) in [
            ("nope\n".to_string(), "first line"),
            (format!("{HEADER}\n{p} ../etc/passwd 0 1\n"), "line 2"),
            (format!("{HEADER}\n{p} a/%2e%2e/b 0 1\n"), "not a path"),
            (format!("{HEADER}\n/etc a 0 1\n"), "line 2"),
            (format!("{HEADER}\n{p} a x 1\n"), "numbers"),
            (format!("{HEADER}\n{p} a%zz 0 1\n"), "escape"),
            (format!("{HEADER}\n{p} a 0\n"), "expected"),
        ] {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains(says), "{text:?}: {e}");
        }
        assert!(parse(&"x".repeat(MAX_PROFILE + 1)).is_err());
    }
}
