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
//! frames <hash>-<name> <NAR URL> <offset> <length>
//! ```
//!
//! `frames` lines are hints: byte ranges of a path's seekable NAR file
//! (runs of whole zstd frames) holding what the ranges above need, so that
//! a cold start can ask for them while the path's index is still on its way
//! (one round trip fewer). Nothing of them is kept unless it matches the
//! index's frames and URL and every chunk its hash.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::nar::valid_entry_name;
use super::narinfo::is_relative_url;
use super::StorePath;

/// A profile longer than this is refused.
pub const MAX_PROFILE: usize = 8 << 20;
/// Ranges kept at most (recording stops there).
pub const MAX_RANGES: usize = 200_000;
/// The most compressed bytes one prefetch request takes (a frame of zeros
/// counts as a quarter of its size).
pub const MAX_RUN: u64 = 4 << 20;
/// The most a recorded frame hint asks for (compressed bytes, costed as
/// for [`MAX_RUN`]): small enough that a run arrives soon after it is asked
/// for and is served at once, while a few in flight fill a WAN link.
pub const HINT_RUN: u64 = 256 << 10;
/// A NAR URL longer than this is refused.
const MAX_URL: usize = 1024;
const HEADER: &str = "nix-snapshotter-profile 1";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub path: StorePath,
    /// Relative to the store path, `/`-separated.
    pub rel: Vec<u8>,
    pub offset: u64,
    pub len: u64,
}

/// Bytes `offset..offset + len` of `path`'s NAR file at `url`: whole
/// frames, a hint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hint {
    pub path: StorePath,
    pub url: String,
    pub offset: u64,
    pub len: u64,
}

/// A parsed profile.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Profile {
    pub ranges: Vec<Range>,
    pub hints: Vec<Hint>,
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

pub fn to_text(profile: &Profile) -> String {
    let mut t = format!("{HEADER}\n");
    for r in &profile.ranges {
        t.push_str(&format!(
            "{} {} {} {}\n",
            r.path.base_name(),
            escape(&r.rel),
            r.offset,
            r.len
        ));
    }
    for h in &profile.hints {
        t.push_str(&format!(
            "frames {} {} {} {}\n",
            h.path.base_name(),
            h.url,
            h.offset,
            h.len
        ));
    }
    t
}

/// Whether a frame hint may name `url`: relative to the cache, printable
/// ASCII without spaces (fields are space-separated), at most 1 KiB.
pub fn valid_hint_url(url: &str) -> bool {
    url.len() <= MAX_URL && is_relative_url(url) && url.bytes().all(|b| b.is_ascii_graphic())
}

/// One item of [`coalesce`]: bytes `start..end`, what they cost, and
/// whether they must be in the same run as the item before when adjacent
/// (frames that one chunk straddles: a chunk is verified whole or not at
/// all).
#[derive(Debug, Clone, Copy)]
pub struct Item {
    pub start: u64,
    pub end: u64,
    pub cost: u64,
    pub joined: bool,
}

/// Runs of adjacent items (one's end the next's start, in order), each
/// costing at most `max`, or up to 4 × `max` to keep items a chunk
/// straddles together: `(first item's start, last item's end)`. Past that a
/// run is cut anyway, and the next starts again at the item before the cut
/// (they overlap by it), so that the chunk is whole in one of them.
pub fn coalesce(items: impl IntoIterator<Item = Item>, max: u64) -> Vec<(u64, u64)> {
    let hard = max.saturating_mul(4);
    let mut runs = Vec::new();
    // The run: (start, end, cost); its last item: (start, cost).
    let mut run: Option<(u64, u64, u64)> = None;
    let mut last: (u64, u64) = (0, 0);
    for Item {
        start,
        end,
        cost,
        joined,
    } in items
    {
        let straddled = joined && run.is_some_and(|(_, b, _)| b == start);
        run = match run {
            Some((a, b, n)) if b == start && n.saturating_add(cost) <= max => Some((a, end, n + cost)),
            Some((a, _, n)) if straddled && (n.saturating_add(cost) <= hard || a == last.0) => {
                Some((a, end, n.saturating_add(cost)))
            }
            Some((a, b, _)) => {
                runs.push((a, b));
                if straddled {
                    Some((last.0, end, last.1.saturating_add(cost)))
                } else {
                    Some((start, end, cost))
                }
            }
            None => Some((start, end, cost)),
        };
        last = (start, cost);
    }
    runs.extend(run.map(|(a, b, _)| (a, b)));
    runs
}

/// Parses a profile; every line is checked (a store path name, a relative
/// path of valid names, numbers).
pub fn parse(text: &str) -> Result<Profile, ProfileError> {
    let err = |m: String| ProfileError(m);
    if text.len() > MAX_PROFILE {
        return Err(err(format!("{} bytes is more than {MAX_PROFILE}", text.len())));
    }
    let mut lines = text.lines();
    if lines.next() != Some(HEADER) {
        return Err(err(format!("the first line must be {HEADER:?}")));
    }
    let mut out = Profile::default();
    for (n, line) in lines.enumerate() {
        if line.is_empty() {
            continue;
        }
        let bad = |m: &str| err(format!("line {}: {m}", n + 2));
        if out.ranges.len() + out.hints.len() >= MAX_RANGES {
            return Err(bad(&format!("more than {MAX_RANGES} ranges")));
        }
        let num = |s: &str| s.parse::<u64>().map_err(|_| bad("offset and length are numbers"));
        let path = |base: &str| StorePath::from_base_name(base).map_err(|e| bad(&e.to_string()));
        let f: Vec<&str> = line.split(' ').collect();
        if let ["frames", base, url, offset, len] = f[..] {
            if !valid_hint_url(url) {
                return Err(bad("the NAR URL is not a relative path inside the cache"));
            }
            out.hints.push(Hint {
                path: path(base)?,
                url: url.to_string(),
                offset: num(offset)?,
                len: num(len)?,
            });
            continue;
        }
        let [base, rel, offset, len] = f[..] else {
            return Err(bad("expected: store path name, path, offset, length"));
        };
        let path = path(base)?;
        let rel = unescape(rel).ok_or_else(|| bad("bad %-escape"))?;
        if rel.split(|&b| b == b'/').any(|c| !valid_entry_name(c)) {
            return Err(bad("not a path inside a store path"));
        }
        out.ranges.push(Range {
            path,
            rel,
            offset: num(offset)?,
            len: num(len)?,
        });
    }
    Ok(out)
}

/// What the store read by the chunk, first reads first: one range per
/// (file, chunk) first seen, merged with the one before when it continues it;
/// and the frames of each path's NAR file those chunks lie in.
#[derive(Default)]
pub struct Recorder {
    seen: HashSet<(StorePath, Vec<u8>, u64)>,
    pub ranges: Vec<Range>,
    /// Per path, in order of first read.
    frames: Vec<PathFrames>,
    frames_of: HashMap<StorePath, usize>,
    frames_seen: usize,
    /// Changed since last written.
    pub dirty: bool,
    /// About the length of the profile's text so far.
    text_len: usize,
}

/// The frames read of one path's NAR file.
struct PathFrames {
    path: StorePath,
    url: String,
    /// By compressed offset.
    read: BTreeMap<u64, FrameRead>,
}

struct FrameRead {
    compressed: u64,
    cost: u64,
    /// Read together with the frame before (one chunk straddles them).
    joined: bool,
    /// Frames noted before it, of any path: the order of first reads.
    seq: usize,
}

/// One frame of a seekable NAR file: compressed offset and length, and
/// decompressed length.
#[derive(Debug, Clone, Copy)]
pub struct FrameSpan {
    pub offset: u64,
    pub compressed: u64,
    pub decompressed: u64,
    /// A chunk the read needed straddles it and the frame before.
    pub straddled: bool,
}

impl FrameSpan {
    /// What it costs a prefetch run (a frame of zeros is tiny, yet
    /// decompressing it is not free).
    pub fn cost(&self) -> u64 {
        self.compressed.max(self.decompressed / 4)
    }
}

/// Chunks remembered as seen at most: recording stops there (a profile is
/// about a program's first reads, not everything a node ever reads).
const MAX_SEEN: usize = 1 << 20;

impl Recorder {
    /// The profile recorded so far: its ranges, and the frames they need
    /// as runs of at most [`HINT_RUN`] of adjacent frames, first read
    /// first (a cold start asks for them in that order).
    pub fn profile(&self) -> Profile {
        let mut hints = Vec::new();
        for p in &self.frames {
            let items = p.read.iter().map(|(&at, r)| Item {
                start: at,
                end: at + r.compressed,
                cost: r.cost,
                joined: r.joined,
            });
            for (a, b) in coalesce(items, HINT_RUN) {
                let first = p.read.range(a..b).map(|(_, r)| r.seq).min().unwrap_or(usize::MAX);
                let hint = Hint {
                    path: p.path.clone(),
                    url: p.url.clone(),
                    offset: a,
                    len: b - a,
                };
                hints.push((first, hint));
            }
        }
        hints.sort_by_key(|(first, _)| *first);
        Profile {
            ranges: self.ranges.clone(),
            hints: hints.into_iter().map(|(_, h)| h).collect(),
        }
    }

    /// Notes that a read of `path` needed `frames` of its NAR file at `url`
    /// (adjacent ones, kept in one run by [`Recorder::profile`]).
    pub fn note_frames(&mut self, path: &StorePath, url: &str, frames: impl IntoIterator<Item = FrameSpan>) {
        // At worst a line a frame; bounded as the ranges are.
        let line = path.base_name().len() + url.len() + 50;
        let full = |r: &Recorder| {
            r.frames_seen >= MAX_SEEN
                || r.ranges.len() + r.frames_seen >= MAX_RANGES
                || r.text_len + line > MAX_PROFILE - HEADER.len() - 1
        };
        // A URL the profile could not carry (the index's own checks are
        // looser) is not recorded: the profile must stay parseable.
        if !valid_hint_url(url) {
            return;
        }
        let i = match self.frames_of.get(path) {
            Some(&i) => i,
            None if full(self) => return,
            None => {
                self.frames.push(PathFrames {
                    path: path.clone(),
                    url: url.to_string(),
                    read: BTreeMap::new(),
                });
                self.frames_of.insert(path.clone(), self.frames.len() - 1);
                self.frames.len() - 1
            }
        };
        for f in frames {
            let joined = f.straddled;
            let full = full(self);
            match self.frames[i].read.entry(f.offset) {
                std::collections::btree_map::Entry::Occupied(mut o) => {
                    if joined && !o.get().joined {
                        o.get_mut().joined = true;
                        self.dirty = true;
                    }
                }
                std::collections::btree_map::Entry::Vacant(v) => {
                    if full {
                        return;
                    }
                    v.insert(FrameRead {
                        compressed: f.compressed,
                        cost: f.cost(),
                        joined,
                        seq: self.frames_seen,
                    });
                    self.frames_seen += 1;
                    self.text_len += line;
                    self.dirty = true;
                }
            }
        }
    }

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
                || self.ranges.len() + self.frames_seen >= MAX_RANGES
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
        let text = to_text(&r.profile());
        assert!(text.contains("lib/odd%20name%20%25 8192 4096"), "{text}");
        assert_eq!(parse(&text).unwrap().ranges, r.ranges);
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
        // Frames too, each a line at worst.
        let url = format!("nar/{}.nar.zst", "u".repeat(900));
        for i in 0..10_000u64 {
            let span = FrameSpan {
                straddled: false,
                offset: i * 2,
                compressed: 1,
                decompressed: 1,
            };
            r.note_frames(&p, &url, [span]);
        }
        let text = to_text(&r.profile());
        assert!(
            text.len() <= MAX_PROFILE && r.ranges.len() < 10_000,
            "{} bytes",
            text.len()
        );
        let parsed = parse(&text).unwrap();
        assert_eq!(parsed.ranges.len(), r.ranges.len());
        assert!(!parsed.hints.is_empty());
    }

    #[test]
    fn frames_read_become_runs_of_adjacent_frames() {
        let p = StorePath::from_base_name("syd87l2rxw8cbsxmxl853h0r6pdwhw1a-python3").unwrap();
        let q = StorePath::from_base_name("0jqd0rlxzra1rs38rdxl43yh6rxchgc6-libc").unwrap();
        let span = |offset, compressed| FrameSpan {
            offset,
            compressed,
            decompressed: 4 * compressed,
            straddled: false,
        };
        let straddled = |offset, compressed| FrameSpan {
            straddled: true,
            ..span(offset, compressed)
        };
        let mut r = Recorder::default();
        r.note_frames(&q, "nar/q.nar.zst", [span(0, 10)]);
        // Out of order and again: frames 100.., 110.., 300...
        r.note_frames(&p, "nar/p.nar.zst", [span(110, 50), span(100, 10)]);
        r.note_frames(&p, "nar/p.nar.zst", [span(300, 5), span(100, 10)]);
        // A run stops at HINT_RUN ...
        r.note_frames(&p, "nar/p.nar.zst", [span(1000, HINT_RUN - 1)]);
        r.note_frames(&p, "nar/p.nar.zst", [span(1000 + HINT_RUN - 1, 2)]);
        // ... but not between frames a chunk straddles ...
        let far = 10 * HINT_RUN;
        r.note_frames(
            &p,
            "nar/p.nar.zst",
            [span(far, HINT_RUN - 1), straddled(far + HINT_RUN - 1, 2)],
        );
        // ... up to 4 × HINT_RUN: then the next run starts again at the
        // frame before the cut.
        let farther = 20 * HINT_RUN;
        let half = HINT_RUN / 2;
        let chain: Vec<_> = (0..10)
            .map(|k| {
                let s = straddled(farther + k * half, half);
                FrameSpan { straddled: k > 0, ..s }
            })
            .collect();
        r.note_frames(&p, "nar/p.nar.zst", chain);
        // A URL a profile cannot carry is not recorded.
        r.note_frames(&p, "nar/with space", [span(0, 1)]);
        // Read last: asked for last, though q's first frame was read first.
        r.note_frames(&q, "nar/q.nar.zst", [span(50, 7)]);
        let hints: Vec<_> = r
            .profile()
            .hints
            .iter()
            .map(|h| (h.path.name().to_string(), h.url.clone(), h.offset, h.len))
            .collect();
        let h = |n: &str, u: &str, a, l| (n.to_string(), u.to_string(), a, l);
        assert_eq!(
            hints,
            [
                h("libc", "nar/q.nar.zst", 0, 10),
                h("python3", "nar/p.nar.zst", 100, 60),
                h("python3", "nar/p.nar.zst", 300, 5),
                h("python3", "nar/p.nar.zst", 1000, HINT_RUN - 1),
                h("python3", "nar/p.nar.zst", 1000 + HINT_RUN - 1, 2),
                h("python3", "nar/p.nar.zst", far, HINT_RUN + 1),
                h("python3", "nar/p.nar.zst", farther, 4 * HINT_RUN),
                h("python3", "nar/p.nar.zst", farther + 7 * half, 3 * half),
                h("libc", "nar/q.nar.zst", 50, 7),
            ]
        );
        let text = to_text(&r.profile());
        assert!(
            text.contains("\nframes syd87l2rxw8cbsxmxl853h0r6pdwhw1a-python3 nar/p.nar.zst 100 60\n"),
            "{text}"
        );
        assert_eq!(parse(&text).unwrap(), r.profile());
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
            (format!("{HEADER}\nframes {p} ../x 0 1\n"), "NAR URL"),
            (format!("{HEADER}\nframes {p} /nar/x 0 1\n"), "NAR URL"),
            (format!("{HEADER}\nframes {p} nar/x?a 0 1\n"), "NAR URL"),
            (format!("{HEADER}\nframes {p} nar/\u{1}x 0 1\n"), "NAR URL"),
            (format!("{HEADER}\nframes {p} {} 0 1\n", "n".repeat(2000)), "NAR URL"),
            (format!("{HEADER}\nframes /etc nar/x 0 1\n"), "line 2"),
            (format!("{HEADER}\nframes {p} nar/x 0 -1\n"), "numbers"),
        ] {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains(says), "{text:?}: {e}");
        }
        assert!(parse(&"x".repeat(MAX_PROFILE + 1)).is_err());
    }
}
