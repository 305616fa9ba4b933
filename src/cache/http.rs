//! `http://` and `https://` caches (cache.nixos.org, Cachix, Attic, harmonia,
//! S3 behind HTTP): reqwest with rustls, pooled connections, HTTP/2 where the
//! server offers it, the usual proxy environment variables.

use bytes::Bytes;
use futures::StreamExt;
use reqwest::StatusCode;

use super::{BinaryCache, ByteStream, CacheError, CacheOptions};

pub fn client(opts: &CacheOptions) -> Result<reqwest::Client, CacheError> {
    builder(opts.connect_timeout, opts.max_connections)
        .build()
        .map_err(|e| CacheError::Transport {
            url: String::new(),
            msg: format!("cannot build HTTP client: {e}"),
            retryable: false,
        })
}

/// What every HTTP client of ours is: its connection timeout, pool and
/// user agent.
fn builder(connect_timeout: std::time::Duration, max_connections: usize) -> reqwest::ClientBuilder {
    // ring is our one TLS crypto provider; installing it twice is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .connect_timeout(connect_timeout)
        .pool_max_idle_per_host(max_connections)
        .user_agent(concat!("nix-snapshotter/", env!("CARGO_PKG_VERSION")))
}

pub struct HttpCache {
    url: String,
    client: reqwest::Client,
    auth: Option<(String, String)>,
    /// The client's settings, for a detour's own client.
    connect_timeout: std::time::Duration,
    max_connections: usize,
    /// Set by `bench --link`: where requests go instead.
    detour: std::sync::RwLock<Option<Detour>>,
}

/// Requests sent through another address: for `http://`, to it with the
/// cache's Host header; for `https://`, the cache's name resolved to it (so
/// TLS still checks the cache's certificate).
struct Detour {
    base: String,
    client: reqwest::Client,
    host: Option<String>,
}

impl HttpCache {
    /// `client` is shared by all caches and made by [`client`] from `opts`.
    pub fn new(url: &str, client: reqwest::Client, opts: &CacheOptions) -> HttpCache {
        let host = reqwest::Url::parse(url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string))
            .unwrap_or_default();
        HttpCache {
            url: url.to_string(),
            client,
            auth: opts.netrc.as_ref().and_then(|n| n.credentials(&host).cloned()),
            connect_timeout: opts.connect_timeout,
            max_connections: opts.max_connections,
            detour: std::sync::RwLock::new(None),
        }
    }

    async fn request(&self, rel: &str, offset: u64) -> Result<Option<reqwest::Response>, CacheError> {
        self.request_range(rel, offset, None).await
    }

    /// GET `rel` from `offset`, up to `len` bytes when given.
    async fn request_range(
        &self,
        rel: &str,
        offset: u64,
        len: Option<u64>,
    ) -> Result<Option<reqwest::Response>, CacheError> {
        let url = format!("{}/{rel}", self.url);
        let mut req = match self.detour.read().as_deref() {
            Ok(Some(d)) => {
                let req = d.client.get(format!("{}/{rel}", d.base));
                match &d.host {
                    Some(h) => req.header(reqwest::header::HOST, h),
                    None => req,
                }
            }
            _ => self.client.get(&url),
        };
        if let Some((user, pass)) = &self.auth {
            req = req.basic_auth(user, Some(pass));
        }
        match len {
            Some(n) if n > 0 => {
                req = req.header(reqwest::header::RANGE, format!("bytes={offset}-{}", offset + n - 1));
            }
            _ if offset > 0 => {
                req = req.header(reqwest::header::RANGE, format!("bytes={offset}-"));
            }
            _ => {}
        }
        let resp = req.send().await.map_err(|e| CacheError::Transport {
            url: url.clone(),
            msg: error_chain(&e),
            retryable: true,
        })?;
        match resp.status() {
            // S3 answers 403 for keys that do not exist.
            StatusCode::NOT_FOUND | StatusCode::FORBIDDEN | StatusCode::GONE => Ok(None),
            s if s.is_success() => Ok(Some(resp)),
            s => Err(CacheError::Status {
                url,
                status: s.as_u16(),
            }),
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

#[async_trait::async_trait]
impl BinaryCache for HttpCache {
    fn url(&self) -> &str {
        &self.url
    }

    fn detour(&self, via: Option<std::net::SocketAddr>) -> Result<(), CacheError> {
        let bad = |msg: String| CacheError::Transport {
            url: self.url.clone(),
            msg,
            retryable: false,
        };
        let detour = match via {
            None => None,
            Some(via) => {
                let u = reqwest::Url::parse(&self.url).map_err(|e| bad(e.to_string()))?;
                let authority = match (u.host_str(), u.port()) {
                    (Some(h), Some(p)) => format!("{h}:{p}"),
                    (Some(h), None) => h.to_string(),
                    (None, _) => return Err(bad("no host in the URL".into())),
                };
                if u.scheme() == "http" {
                    Some(Detour {
                        base: format!("http://{via}{}", u.path().trim_end_matches('/')),
                        client: self.client.clone(),
                        host: Some(authority),
                    })
                } else {
                    let domain = u.host_str().unwrap_or_default().to_string();
                    if domain.trim_matches(['[', ']']).parse::<std::net::IpAddr>().is_ok() {
                        return Err(bad(
                            "an https cache named by IP address cannot be routed elsewhere".into()
                        ));
                    }
                    let client = builder(self.connect_timeout, self.max_connections)
                        .resolve(&domain, via)
                        .build()
                        .map_err(|e| bad(format!("cannot build HTTP client: {e}")))?;
                    Some(Detour {
                        base: self.url.clone(),
                        client,
                        host: None,
                    })
                }
            }
        };
        *self.detour.write().map_err(|_| bad("lock poisoned".into()))? = detour;
        Ok(())
    }

    async fn get(&self, rel: &str) -> Result<Option<Bytes>, CacheError> {
        let Some(resp) = self.request(rel, 0).await? else {
            return Ok(None);
        };
        let url = resp.url().to_string();
        let limit = super::small_file_limit(rel);
        if resp.content_length().is_some_and(|n| n > limit) {
            return Err(super::too_large(url, limit));
        }
        let mut body = Vec::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| CacheError::Transport {
                url: url.clone(),
                msg: error_chain(&e),
                retryable: true,
            })?;
            if (body.len() + chunk.len()) as u64 > limit {
                return Err(super::too_large(url, limit));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Some(body.into()))
    }

    async fn read_range(&self, rel: &str, offset: u64, len: u64) -> Result<Option<Bytes>, CacheError> {
        let Some(resp) = self.request_range(rel, offset, Some(len)).await? else {
            return Ok(None);
        };
        let url = resp.url().to_string();
        // A server that ignores Range sends the whole file: skip to the range.
        let mut skip = if resp.status() == StatusCode::PARTIAL_CONTENT {
            0
        } else {
            offset
        };
        let mut body = Vec::with_capacity(len as usize);
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let mut chunk = chunk.map_err(|e| CacheError::Transport {
                url: url.clone(),
                msg: error_chain(&e),
                retryable: true,
            })?;
            let n = skip.min(chunk.len() as u64);
            skip -= n;
            let _ = chunk.split_to(n as usize);
            let want = (len as usize).saturating_sub(body.len());
            body.extend_from_slice(&chunk[..chunk.len().min(want)]);
            if body.len() as u64 >= len {
                break;
            }
        }
        if (body.len() as u64) < len {
            return Err(CacheError::Transport {
                url,
                msg: format!("{} of the {len} bytes asked for at {offset}", body.len()),
                retryable: true,
            });
        }
        Ok(Some(body.into()))
    }

    async fn open(&self, rel: &str, offset: u64) -> Result<Option<ByteStream>, CacheError> {
        let Some(resp) = self.request(rel, offset).await? else {
            return Ok(None);
        };
        let partial = resp.status() == StatusCode::PARTIAL_CONTENT;
        let stream = resp
            .bytes_stream()
            .map(|r| r.map_err(|e| std::io::Error::other(error_chain(&e))));
        if offset == 0 || partial {
            return Ok(Some(Box::pin(stream)));
        }
        // The server ignored the Range header: skip what we already have.
        let mut skip = offset;
        let skipped = stream.filter_map(move |r| {
            let out = match r {
                Ok(mut b) if skip > 0 => {
                    let n = skip.min(b.len() as u64);
                    skip -= n;
                    let _ = b.split_to(n as usize);
                    (!b.is_empty()).then_some(Ok(b))
                }
                other => Some(other),
            };
            futures::future::ready(out)
        });
        Ok(Some(Box::pin(skipped)))
    }
}
