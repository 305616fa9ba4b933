//! Seekable zstd: a NAR compressed as independent frames, followed by a
//! seek table in a skippable frame (zstd's seekable format), so that a
//! reader fetches and decompresses only the frames that hold the bytes it
//! needs, while any zstd decoder (stock Nix's) still reads the whole stream.

use std::io::{self, Write};

use sha2::{Digest, Sha256};

use crate::nixfmt::index::Frame;
use crate::nixfmt::NixHash;

const SKIPPABLE_MAGIC: u32 = 0x184D_2A5E;
const SEEKABLE_MAGIC: u32 = 0x8F92_EAB1;

/// Compresses what is written to it in frames of `frame_size` bytes, a
/// batch of frames at a time on every core (frames are independent, and a
/// strong level is slow).
pub struct FrameWriter<W: Write> {
    out: W,
    buf: Vec<u8>,
    /// Full frames not yet compressed.
    batch: Vec<Vec<u8>>,
    /// Frames a batch holds: about 4 MiB a core.
    batch_len: usize,
    threads: usize,
    frame_size: usize,
    level: i32,
    frames: Vec<Frame>,
    file_hash: Sha256,
    file_size: u64,
}

/// What a finished writer produced.
pub struct Written<W> {
    pub out: W,
    pub frames: Vec<Frame>,
    /// Of the compressed file, as a narinfo's FileHash.
    pub file_hash: NixHash,
    pub file_size: u64,
}

impl<W: Write> FrameWriter<W> {
    pub fn new(out: W, frame_size: u32, level: i32) -> FrameWriter<W> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        FrameWriter {
            out,
            buf: Vec::with_capacity(frame_size as usize),
            batch: Vec::new(),
            batch_len: ((4 << 20) / frame_size.max(1) as usize + 1) * threads,
            threads,
            frame_size: frame_size as usize,
            level,
            frames: Vec::new(),
            file_hash: Sha256::new(),
            file_size: 0,
        }
    }

    fn emit(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.file_hash.update(bytes);
        self.file_size += bytes.len() as u64;
        Ok(())
    }

    /// Ends the frame being filled; compresses the batch once it holds
    /// enough frames for every core (or `all`).
    fn flush_frame(&mut self, all: bool) -> io::Result<()> {
        if !self.buf.is_empty() {
            let full = std::mem::replace(&mut self.buf, Vec::with_capacity(self.frame_size));
            self.batch.push(full);
        }
        if self.batch.is_empty() || (!all && self.batch.len() < self.batch_len) {
            return Ok(());
        }
        let level = self.level;
        let share = self.batch.len().div_ceil(self.threads);
        let compress = |frames: &[Vec<u8>]| {
            frames
                .iter()
                .map(|f| zstd::bulk::compress(f, level))
                .collect::<io::Result<Vec<_>>>()
        };
        let compressed: Vec<io::Result<Vec<Vec<u8>>>> = std::thread::scope(|scope| {
            let workers: Vec<_> = self
                .batch
                .chunks(share)
                .map(|frames| {
                    // A thread that cannot be made: this share on this one.
                    std::thread::Builder::new()
                        .name("zstd-frames".into())
                        .spawn_scoped(scope, move || compress(frames))
                        .map_err(|_| frames)
                })
                .collect();
            workers
                .into_iter()
                .map(|w| match w {
                    Ok(w) => w
                        .join()
                        .unwrap_or_else(|_| Err(io::Error::other("a compressing thread panicked"))),
                    Err(frames) => compress(frames),
                })
                .collect()
        });
        let batch = std::mem::take(&mut self.batch);
        let frames: Vec<Vec<u8>> = compressed
            .into_iter()
            .collect::<io::Result<Vec<_>>>()?
            .into_iter()
            .flatten()
            .collect();
        if frames.len() != batch.len() {
            return Err(io::Error::other("frames were lost while compressing"));
        }
        for (plain, frame) in batch.iter().zip(frames) {
            self.frames.push(Frame {
                compressed: frame.len() as u32,
                decompressed: plain.len() as u32,
            });
            self.emit(&frame)?;
        }
        Ok(())
    }

    /// Writes the last frames and the seek table.
    pub fn finish(mut self) -> io::Result<Written<W>> {
        self.flush_frame(true)?;
        let mut table = Vec::with_capacity(self.frames.len() * 8 + 17);
        table.extend(SKIPPABLE_MAGIC.to_le_bytes());
        table.extend(((self.frames.len() * 8 + 9) as u32).to_le_bytes());
        for f in &self.frames {
            table.extend(f.compressed.to_le_bytes());
            table.extend(f.decompressed.to_le_bytes());
        }
        table.extend((self.frames.len() as u32).to_le_bytes());
        table.push(0); // no checksums: the file index hashes every chunk
        table.extend(SEEKABLE_MAGIC.to_le_bytes());
        self.emit(&table)?;
        self.out.flush()?;
        Ok(Written {
            out: self.out,
            frames: self.frames,
            file_hash: NixHash {
                sha256: self.file_hash.finalize().into(),
            },
            file_size: self.file_size,
        })
    }
}

impl<W: Write> Write for FrameWriter<W> {
    fn write(&mut self, mut data: &[u8]) -> io::Result<usize> {
        let n = data.len();
        while !data.is_empty() {
            let take = data.len().min(self.frame_size - self.buf.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() == self.frame_size {
                self.flush_frame(false)?;
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_zstd_decoder_reads_the_whole_and_each_frame_decodes_alone() {
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8 ^ (i / 4096) as u8).collect();
        let mut w = FrameWriter::new(Vec::new(), 64 << 10, 3);
        // Several batches, each on several threads.
        (w.threads, w.batch_len) = (3, 5);
        for piece in data.chunks(1000) {
            w.write_all(piece).unwrap();
        }
        let out = w.finish().unwrap();
        assert_eq!(out.frames.len(), 16);
        assert!(out.frames[..15].iter().all(|f| f.decompressed == 64 << 10));
        // A stock decoder skips the seek table.
        assert_eq!(zstd::stream::decode_all(&out.out[..]).unwrap(), data);
        // Frame 5 alone gives bytes 5 × 64 KiB onwards.
        let start: usize = out.frames[..5].iter().map(|f| f.compressed as usize).sum();
        let f = out.frames[5];
        let alone =
            zstd::bulk::decompress(&out.out[start..start + f.compressed as usize], f.decompressed as usize).unwrap();
        assert_eq!(alone, data[5 << 16..6 << 16]);
        assert_eq!(out.file_size, out.out.len() as u64);
        // The footer says how many frames there are.
        let n = out.out.len();
        assert_eq!(u32::from_le_bytes(out.out[n - 4..].try_into().unwrap()), SEEKABLE_MAGIC);
        assert_eq!(u32::from_le_bytes(out.out[n - 9..n - 5].try_into().unwrap()), 16);
    }
}
