//! Binary caches: where store paths come from.
//!
//! [`BinaryCache`] is the seam: fetch a small file, or open a byte stream of
//! a large one from an offset. [`http::HttpCache`] and [`file::FileCache`]
//! implement it; [`Cache`] adds what every kind shares: the cache's own
//! settings (priority, whether its signatures are required), retries with
//! backoff and jitter, a stalled-transfer timeout, and resuming a broken
//! NAR download where it stopped.

pub mod file;
pub mod http;
pub mod netrc;

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};

use crate::nixfmt::cache_info::CacheInfo;

pub type ByteStream = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{url}: {msg}")]
    Transport { url: String, msg: String, retryable: bool },
    #[error("{url}: no data for {secs} s (stalled-transfer timeout)")]
    Stalled { url: String, secs: u64 },
    #[error("{url}: HTTP status {status}")]
    Status { url: String, status: u16 },
    #[error("{url}: {msg}")]
    Invalid { url: String, msg: String },
    #[error("unsupported substituter URL {0:?} (use http://, https:// or file://)")]
    UnsupportedUrl(String),
}

impl CacheError {
    /// Connection errors, timeouts and 5xx are worth another try; 404 and
    /// other client errors are not.
    pub fn retryable(&self) -> bool {
        match self {
            CacheError::Transport { retryable, .. } => *retryable,
            CacheError::Stalled { .. } => true,
            CacheError::Status { status, .. } => *status >= 500 || *status == 429,
            CacheError::Invalid { .. } | CacheError::UnsupportedUrl(_) => false,
        }
    }
}

/// The most bytes we take of a small file from a cache (untrusted input):
/// a `.ls` listing is a few hundred bytes per file of a store path, a
/// narinfo a line per field and a name per reference.
pub fn small_file_limit(rel: &str) -> u64 {
    if rel.ends_with(".ls") || rel.ends_with(".idx") {
        64 << 20
    } else if rel.ends_with(".narinfo") {
        4 << 20
    } else {
        64 << 10
    }
}

fn too_large(url: String, limit: u64) -> CacheError {
    CacheError::Invalid {
        url,
        msg: format!("larger than {limit} bytes, the most taken for this kind of file"),
    }
}

/// One kind of binary cache.
#[async_trait::async_trait]
pub trait BinaryCache: Send + Sync {
    /// The cache's URL, for messages.
    fn url(&self) -> &str;
    /// Fetches a small file (`nix-cache-info`, `*.narinfo`, `*.ls`), at
    /// most [`small_file_limit`] bytes of it; `Ok(None)` when the cache
    /// does not have it.
    async fn get(&self, rel: &str) -> Result<Option<Bytes>, CacheError>;
    /// Opens `rel` as a stream starting at byte `offset`; `Ok(None)` when missing.
    async fn open(&self, rel: &str, offset: u64) -> Result<Option<ByteStream>, CacheError>;
    /// Exactly `len` bytes of `rel` from `offset` (a ranged request);
    /// `Ok(None)` when missing, an error when fewer bytes come.
    async fn read_range(&self, rel: &str, offset: u64, len: u64) -> Result<Option<Bytes>, CacheError>;
    /// Connects to `via` instead of the cache's own address from now on
    /// (`None`: its own again), for `bench --link`. TLS, the Host header and
    /// the URL stay the cache's.
    fn detour(&self, via: Option<std::net::SocketAddr>) -> Result<(), CacheError> {
        match via {
            None => Ok(()),
            Some(_) => Err(CacheError::UnsupportedUrl(format!(
                "{}: only http(s) caches can be routed through another address",
                self.url()
            ))),
        }
    }
}

/// The most bytes one ranged read takes (a few frames of a seekable NAR).
pub const MAX_RANGE: u64 = 256 << 20;

/// How hard to try.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Tries per request, the first included.
    pub attempts: u32,
    /// First backoff; doubles each retry, with ±50 % jitter.
    pub backoff: Duration,
    /// A transfer that delivers nothing for this long is abandoned (and retried).
    pub stall_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 5,
            backoff: Duration::from_millis(250),
            stall_timeout: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    fn delay(&self, attempt: u32) -> Duration {
        let base = self.backoff.saturating_mul(1 << attempt.min(10));
        base.mul_f64(0.5 + rand::random::<f64>())
    }
}

/// What one cache has done, for `status` and metrics.
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Small files asked for (narinfo, .ls, nix-cache-info).
    pub requests: AtomicU64,
    /// NARs streamed (a transfer resumed at an offset counts once).
    pub nar_fetches: AtomicU64,
    /// Ranged reads of NAR frames (file-granular fetching).
    pub ranges: AtomicU64,
    /// NAR bytes received.
    pub bytes: AtomicU64,
    /// Requests that failed for good.
    pub errors: AtomicU64,
    /// Retries and resumed transfers.
    pub retries: AtomicU64,
    pub last_error: std::sync::Mutex<String>,
}

impl CacheStats {
    fn failed(&self, e: &CacheError) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut l) = self.last_error.lock() {
            *l = e.to_string();
        }
    }
}

/// A configured substituter.
pub struct Cache {
    pub inner: Arc<dyn BinaryCache>,
    /// Lower is tried first (nix-cache-info's Priority, or `?priority=` in the URL).
    pub priority: u32,
    /// Set by `?priority=`: nix-cache-info does not override it.
    pub priority_fixed: bool,
    /// When false, this cache's narinfos need no trusted signature (`?trusted=1`).
    pub require_sigs: bool,
    pub retry: RetryPolicy,
    pub stats: Arc<CacheStats>,
    /// Its nix-cache-info says it publishes file indexes: only then is a
    /// path's `.idx` asked for (a request fewer per path everywhere else).
    pub file_indexes: bool,
}

impl Cache {
    pub fn url(&self) -> &str {
        self.inner.url()
    }

    /// `op` (a request for `rel`), each try bounded by the stalled-transfer
    /// timeout, retried with backoff while its error is worth another try.
    async fn with_retries<T, Fut>(&self, rel: &str, op: impl Fn() -> Fut) -> Result<T, CacheError>
    where
        Fut: std::future::Future<Output = Result<T, CacheError>>,
    {
        let mut attempt = 0;
        loop {
            let res = tokio::time::timeout(self.retry.stall_timeout, op())
                .await
                .unwrap_or_else(|_| {
                    Err(CacheError::Stalled {
                        url: format!("{}/{rel}", self.url()),
                        secs: self.retry.stall_timeout.as_secs(),
                    })
                });
            match res {
                Err(e) if e.retryable() && attempt + 1 < self.retry.attempts => {
                    tracing::debug!(error = %e, attempt, "retrying");
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(self.retry.delay(attempt)).await;
                    attempt += 1;
                }
                Err(e) => {
                    self.stats.failed(&e);
                    return Err(e);
                }
                ok => return ok,
            }
        }
    }

    /// `get` with retries.
    pub async fn get(&self, rel: &str) -> Result<Option<Bytes>, CacheError> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        self.with_retries(rel, || self.inner.get(rel)).await
    }

    /// `read_range` with retries; at most [`MAX_RANGE`] bytes.
    pub async fn read_range(&self, rel: &str, offset: u64, len: u64) -> Result<Option<Bytes>, CacheError> {
        if len > MAX_RANGE {
            return Err(CacheError::Invalid {
                url: format!("{}/{rel}", self.url()),
                msg: format!("a range of {len} bytes is more than the {MAX_RANGE} taken at once"),
            });
        }
        self.stats.ranges.fetch_add(1, Ordering::Relaxed);
        let r = self
            .with_retries(rel, || self.inner.read_range(rel, offset, len))
            .await?;
        if let Some(b) = &r {
            self.stats.bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
        }
        Ok(r)
    }

    /// Streams `rel` into `tx`, reopening at the current offset when the
    /// transfer breaks or stalls (at most `attempts` openings in all, so a
    /// server that keeps dropping cannot hold us forever), until
    /// `expected_len` bytes (if known) have been delivered. Errors are also
    /// sent down `tx` so the reader sees them.
    pub async fn stream_to(
        &self,
        rel: &str,
        expected_len: Option<u64>,
        tx: tokio::sync::mpsc::Sender<io::Result<Bytes>>,
    ) -> Result<u64, CacheError> {
        let mut offset = 0u64;
        let mut failures = 0u32;
        let url = format!("{}/{rel}", self.url());
        let stall = self.retry.stall_timeout;
        self.stats.nar_fetches.fetch_add(1, Ordering::Relaxed);
        let err: CacheError = loop {
            let error = match tokio::time::timeout(stall, self.inner.open(rel, offset)).await {
                Err(_) => CacheError::Stalled {
                    url: url.clone(),
                    secs: stall.as_secs(),
                },
                Ok(Err(e)) => e,
                Ok(Ok(None)) => {
                    break CacheError::Status {
                        url: url.clone(),
                        status: 404,
                    }
                }
                Ok(Ok(Some(mut stream))) => loop {
                    match tokio::time::timeout(stall, stream.next()).await {
                        Err(_) => {
                            break CacheError::Stalled {
                                url: url.clone(),
                                secs: stall.as_secs(),
                            }
                        }
                        Ok(Some(Ok(chunk))) => {
                            offset += chunk.len() as u64;
                            self.stats.bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                            if expected_len.is_some_and(|n| offset > n) {
                                break CacheError::Invalid {
                                    url: url.clone(),
                                    msg: format!(
                                        "more than the {} bytes the narinfo announced",
                                        expected_len.unwrap_or(0)
                                    ),
                                };
                            }
                            if tx.send(Ok(chunk)).await.is_err() {
                                return Ok(offset); // the reader gave up; it reports why
                            }
                        }
                        Ok(Some(Err(e))) => {
                            break CacheError::Transport {
                                url: url.clone(),
                                msg: format!("transfer broke after {offset} bytes: {e}"),
                                retryable: true,
                            }
                        }
                        Ok(None) => match expected_len {
                            Some(n) if offset < n => {
                                break CacheError::Transport {
                                    url: url.clone(),
                                    msg: format!("transfer ended after {offset} of {n} bytes"),
                                    retryable: true,
                                }
                            }
                            _ => return Ok(offset),
                        },
                    }
                },
            };
            failures += 1;
            if !error.retryable() || failures >= self.retry.attempts {
                break error;
            }
            tracing::debug!(error = %error, offset, failures, "resuming transfer");
            self.stats.retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(self.retry.delay(failures - 1)).await;
        };
        self.stats.failed(&err);
        let _ = tx.send(Err(io::Error::other(err.to_string()))).await;
        Err(err)
    }
}

/// Settings that can ride on a substituter URL, as in Nix (`?priority=10&trusted=1`).
struct UrlParams {
    base: String,
    priority: Option<u32>,
    trusted: bool,
}

fn split_params(url: &str) -> Result<UrlParams, CacheError> {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut p = UrlParams {
        base: base.trim_end_matches('/').to_string(),
        priority: None,
        trusted: false,
    };
    for kv in query.split('&').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        match k {
            "priority" => {
                p.priority = Some(
                    v.parse()
                        .map_err(|_| CacheError::UnsupportedUrl(format!("{url} (priority {v:?} is not a number)")))?,
                )
            }
            "trusted" => p.trusted = matches!(v, "1" | "true"),
            _ => {} // other Nix store settings do not concern a reader
        }
    }
    Ok(p)
}

/// Everything needed to open caches.
pub struct CacheOptions {
    pub retry: RetryPolicy,
    pub connect_timeout: Duration,
    pub netrc: Option<netrc::Netrc>,
    /// Global default; `?trusted=1` turns it off per cache.
    pub require_sigs: bool,
    pub max_connections: usize,
}

/// Builds a [`Cache`] per substituter URL, without touching the network
/// (the daemon must start even when every cache is unreachable; see
/// [`Cache::read_info`] for the `nix-cache-info` check done on first use).
pub fn open_all(urls: &[String], opts: &CacheOptions) -> Result<Vec<Cache>, CacheError> {
    let http = http::client(opts)?;
    let mut caches = Vec::new();
    for url in urls {
        let p = split_params(url)?;
        let inner: Arc<dyn BinaryCache> = if let Some(path) = p.base.strip_prefix("file://") {
            Arc::new(file::FileCache::new(path))
        } else if p.base.starts_with("http://") || p.base.starts_with("https://") {
            Arc::new(http::HttpCache::new(&p.base, http.clone(), opts))
        } else {
            return Err(CacheError::UnsupportedUrl(url.clone()));
        };
        caches.push(Cache {
            inner,
            priority: p.priority.unwrap_or(50),
            priority_fixed: p.priority.is_some(),
            require_sigs: opts.require_sigs && !p.trusted,
            retry: opts.retry,
            stats: Arc::default(),
            file_indexes: false,
        });
    }
    Ok(caches)
}

impl Cache {
    /// Reads `nix-cache-info` (one quick try): adopts its Priority unless the
    /// URL fixed one, and refuses a cache for another store directory. A
    /// cache without the file, or unreachable now, keeps the defaults.
    pub async fn read_info(&mut self) -> Result<(), CacheError> {
        let limit = self.retry.stall_timeout;
        let info = tokio::time::timeout(limit, self.inner.get("nix-cache-info"))
            .await
            .unwrap_or_else(|_| {
                Err(CacheError::Stalled {
                    url: self.url().to_string(),
                    secs: limit.as_secs(),
                })
            });
        match info {
            Ok(Some(text)) => {
                let info = CacheInfo::parse(&String::from_utf8_lossy(&text)).map_err(|e| CacheError::Invalid {
                    url: self.url().to_string(),
                    msg: e.to_string(),
                })?;
                if !self.priority_fixed {
                    self.priority = info.priority;
                }
                self.file_indexes = info.file_indexes;
            }
            Ok(None) => tracing::warn!(cache = self.url(), "no nix-cache-info; assuming defaults"),
            Err(e) => tracing::warn!(cache = self.url(), error = %e, "cache unreachable for now"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_params() {
        let p = split_params("https://example.org/cache/?priority=10&trusted=1&compression=zstd").unwrap();
        assert_eq!(p.base, "https://example.org/cache");
        assert_eq!(p.priority, Some(10));
        assert!(p.trusted);
        assert!(split_params("file:///x?priority=high").is_err());
    }

    #[test]
    fn backoff_grows_with_jitter() {
        let r = RetryPolicy::default();
        for a in 0..4 {
            let d = r.delay(a);
            let base = r.backoff * (1 << a);
            assert!(d >= base / 2 && d <= base * 3 / 2, "{a}: {d:?}");
        }
    }
}
