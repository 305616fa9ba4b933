//! The download pipeline of one store path, run on a blocking thread while
//! the network task feeds it chunks: compressed bytes are counted and hashed
//! (FileSize/FileHash), decompressed, counted and hashed again (NarSize/
//! NarHash) and unpacked as they arrive. Nothing is trusted until both
//! hashes matched; the caller publishes the tree only then.

use std::io::{self, Read};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::{Buf, Bytes};
use sha2::{Digest, Sha256};

use crate::nixfmt::nar::{self, NarError, UnpackStats};
use crate::nixfmt::narinfo::{Compression, NarInfo};
use crate::nixfmt::NixHash;

/// Reads the chunks the network task sends.
pub struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
    /// Set when the network side reported a failure, so a read error further
    /// up (wrapped or not by a decompressor) is blamed on the download.
    failed: Arc<AtomicBool>,
}

impl ChannelReader {
    pub fn new(rx: tokio::sync::mpsc::Receiver<io::Result<Bytes>>) -> Self {
        ChannelReader {
            rx,
            current: Bytes::new(),
            failed: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.current = b,
                Some(Err(e)) => {
                    self.failed.store(true, Ordering::SeqCst);
                    return Err(e);
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current.advance(n);
        Ok(n)
    }
}

/// Counts and hashes what passes through; refuses to pass more than `limit`.
struct Measured<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
    limit: Option<u64>,
    exceeded: bool,
}

impl<R: Read> Measured<R> {
    fn new(inner: R, limit: Option<u64>) -> Self {
        Measured {
            inner,
            hasher: Sha256::new(),
            count: 0,
            limit,
            exceeded: false,
        }
    }

    fn finish(self) -> (u64, [u8; 32]) {
        (self.count, self.hasher.finalize().into())
    }
}

impl<R: Read> Read for Measured<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        if self.limit.is_some_and(|l| self.count > l) {
            self.exceeded = true;
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "stream longer than announced",
            ));
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("{0}")]
    Nar(NarError),
    #[error("the NAR is larger than its NarSize {0} (decompression bomb or wrong narinfo)")]
    NarTooLong(u64),
    #[error("NarSize mismatch: narinfo says {expected}, the NAR has {got} bytes")]
    NarSize { expected: u64, got: u64 },
    #[error("NarHash mismatch: narinfo says {expected}, the NAR hashes to {got}")]
    NarHash { expected: NixHash, got: NixHash },
    #[error("FileSize mismatch: narinfo says {expected}, the download has {got} bytes")]
    FileSize { expected: u64, got: u64 },
    #[error("FileHash mismatch: narinfo says {expected}, the download hashes to {got}")]
    FileHash { expected: NixHash, got: NixHash },
    #[error("cannot decompress ({0}): {1}")]
    Decompress(&'static str, io::Error),
    #[error("download failed: {0}")]
    Download(io::Error),
}

/// Memory the xz decoder may use: `xz -9` needs 65 MiB to decompress.
const XZ_MEMLIMIT: u64 = 256 << 20;

/// Unpacks the NAR arriving on `input` to `dest` and checks it against `info`.
pub fn unpack_verified(input: ChannelReader, info: &NarInfo, dest: &Path) -> Result<UnpackStats, PipelineError> {
    let download_failed = input.failed.clone();
    let classify_read_error = move |e: io::Error, compression: &'static str| {
        if download_failed.load(Ordering::SeqCst) {
            PipelineError::Download(e)
        } else {
            PipelineError::Decompress(compression, e)
        }
    };
    let mut raw = Measured::new(input, info.file_size);
    let (stats, nar_count, nar_hash) = {
        let (decoder, name): (Box<dyn Read + '_>, &'static str) = match info.compression {
            Compression::None => (Box::new(&mut raw), "none"),
            Compression::Zstd => (
                Box::new(zstd::stream::read::Decoder::new(&mut raw).map_err(|e| PipelineError::Decompress("zstd", e))?),
                "zstd",
            ),
            Compression::Xz => {
                // Bounded: an xz header may ask for any dictionary size.
                let stream = liblzma::stream::Stream::new_stream_decoder(XZ_MEMLIMIT, liblzma::stream::CONCATENATED)
                    .map_err(|e| PipelineError::Decompress("xz", e.into()))?;
                (Box::new(liblzma::read::XzDecoder::new_stream(&mut raw, stream)), "xz")
            }
            Compression::Bzip2 => (Box::new(bzip2::read::MultiBzDecoder::new(&mut raw)), "bzip2"),
        };
        let mut nar_reader = Measured::new(decoder, Some(info.nar_size));
        let result = nar::unpack(&mut nar_reader, dest);
        if nar_reader.exceeded {
            return Err(PipelineError::NarTooLong(info.nar_size));
        }
        let stats = result.map_err(|e| match e {
            NarError::Read(io) => classify_read_error(io, name),
            other => PipelineError::Nar(other),
        })?;
        // Anything after the archive's end is not part of it.
        let mut extra = [0u8; 1];
        match nar_reader.read(&mut extra) {
            Ok(0) => {}
            Ok(_) | Err(_) if nar_reader.exceeded => return Err(PipelineError::NarTooLong(info.nar_size)),
            Ok(_) => {
                return Err(PipelineError::NarSize {
                    expected: info.nar_size,
                    got: nar_reader.count + 1,
                })
            }
            Err(e) => return Err(classify_read_error(e, name)),
        }
        let (count, hash) = nar_reader.finish();
        (stats, count, hash)
    };
    if nar_count != info.nar_size {
        return Err(PipelineError::NarSize {
            expected: info.nar_size,
            got: nar_count,
        });
    }
    if nar_hash != info.nar_hash.sha256 {
        return Err(PipelineError::NarHash {
            expected: info.nar_hash,
            got: NixHash { sha256: nar_hash },
        });
    }
    // Drain what the decompressor did not need, so the file checks cover everything.
    io::copy(&mut raw, &mut io::sink()).map_err(|e| {
        if raw.exceeded {
            PipelineError::FileSize {
                expected: info.file_size.unwrap_or(0),
                got: raw.count,
            }
        } else {
            PipelineError::Download(e)
        }
    })?;
    let (file_count, file_hash) = raw.finish();
    if let Some(expected) = info.file_size {
        if expected != file_count {
            return Err(PipelineError::FileSize {
                expected,
                got: file_count,
            });
        }
    }
    if let Some(expected) = info.file_hash {
        if expected.sha256 != file_hash {
            return Err(PipelineError::FileHash {
                expected,
                got: NixHash { sha256: file_hash },
            });
        }
    }
    Ok(stats)
}
