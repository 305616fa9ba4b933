//! `file://` caches: a directory written by `nix copy --to file://…`.

use std::io;
use std::path::PathBuf;

use bytes::Bytes;
use tokio::io::AsyncSeekExt;

use super::{BinaryCache, ByteStream, CacheError};

pub struct FileCache {
    url: String,
    dir: PathBuf,
}

impl FileCache {
    pub fn new(dir: &str) -> FileCache {
        FileCache {
            url: format!("file://{dir}"),
            dir: PathBuf::from(dir),
        }
    }

    fn err(&self, rel: &str, e: io::Error) -> CacheError {
        CacheError::Transport {
            url: format!("{}/{rel}", self.url),
            msg: e.to_string(),
            retryable: false,
        }
    }
}

#[async_trait::async_trait]
impl BinaryCache for FileCache {
    fn url(&self) -> &str {
        &self.url
    }

    async fn get(&self, rel: &str) -> Result<Option<Bytes>, CacheError> {
        use tokio::io::AsyncReadExt;
        let limit = super::small_file_limit(rel);
        let f = match tokio::fs::File::open(self.dir.join(rel)).await {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.err(rel, e)),
        };
        let mut body = Vec::new();
        f.take(limit + 1)
            .read_to_end(&mut body)
            .await
            .map_err(|e| self.err(rel, e))?;
        if body.len() as u64 > limit {
            return Err(super::too_large(format!("{}/{rel}", self.url), limit));
        }
        Ok(Some(body.into()))
    }

    async fn read_range(&self, rel: &str, offset: u64, len: u64) -> Result<Option<Bytes>, CacheError> {
        use tokio::io::AsyncReadExt;
        let mut f = match tokio::fs::File::open(self.dir.join(rel)).await {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.err(rel, e)),
        };
        f.seek(io::SeekFrom::Start(offset))
            .await
            .map_err(|e| self.err(rel, e))?;
        let mut body = vec![0u8; len as usize];
        f.read_exact(&mut body).await.map_err(|e| self.err(rel, e))?;
        Ok(Some(body.into()))
    }

    async fn open(&self, rel: &str, offset: u64) -> Result<Option<ByteStream>, CacheError> {
        let mut f = match tokio::fs::File::open(self.dir.join(rel)).await {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.err(rel, e)),
        };
        if offset > 0 {
            f.seek(io::SeekFrom::Start(offset))
                .await
                .map_err(|e| self.err(rel, e))?;
        }
        Ok(Some(Box::pin(tokio_util::io::ReaderStream::with_capacity(
            f,
            256 * 1024,
        ))))
    }
}
