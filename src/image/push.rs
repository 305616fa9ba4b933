//! `image push ARCHIVE REF`: uploads an image archive to a registry with the
//! OCI distribution API, byte for byte (digests unchanged, so a Nix layer
//! keeps its annotations and a pull through containerd makes it from its
//! labels, never downloading it).
//!
//! Each blob is checked first (`HEAD`) and uploaded only when missing
//! (`POST` then one `PUT` with the digest; `?mount=&from=` when the caller
//! names a repository of the same registry that has it); the manifest goes
//! last. Credentials come from `--creds USER:PASS` or `~/.docker/config.json`
//! (`auths.<host>.auth`); a registry that answers 401 with a Bearer
//! challenge gets the token it asks for.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use reqwest::{Method, StatusCode};

use super::{read_raw, BlobRef, ImageError};

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("{0:?}: not an image reference (HOST[:PORT]/REPOSITORY[:TAG])")]
    BadRef(String),
    #[error("{url}: {msg}")]
    Registry { url: String, msg: String },
    #[error("cannot read credentials from {}: {msg}", path.display())]
    Creds { path: PathBuf, msg: String },
}

/// A parsed `HOST[:PORT]/REPOSITORY[:TAG]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub host: String,
    pub repository: String,
    pub tag: String,
}

impl Reference {
    pub fn parse(r: &str) -> Result<Reference, PushError> {
        let bad = || PushError::BadRef(r.to_string());
        let (host, rest) = r.split_once('/').ok_or_else(bad)?;
        if !(host.contains('.') || host.contains(':') || host == "localhost") {
            // docker.io/library style short names are not guessed.
            return Err(bad());
        }
        let (repository, tag) = match rest.rsplit_once(':') {
            Some((repo, tag)) if !tag.contains('/') => (repo, tag),
            _ => (rest, "latest"),
        };
        let ok_repo = !repository.is_empty()
            && repository.split('/').all(|c| {
                !c.is_empty()
                    && c.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
            });
        let ok_tag = !tag.is_empty()
            && tag.len() <= 128
            && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !ok_repo || !ok_tag {
            return Err(bad());
        }
        Ok(Reference {
            host: host.to_string(),
            repository: repository.to_string(),
            tag: tag.to_string(),
        })
    }
}

pub struct PushOptions {
    pub plain_http: bool,
    /// `USER:PASS`; else `~/.docker/config.json`.
    pub creds: Option<String>,
    /// Repositories of the same registry to mount blobs from.
    pub mount_from: Vec<String>,
}

struct Registry {
    client: reqwest::Client,
    base: String,
    reference: Reference,
    basic: Option<String>,
    bearer: Option<String>,
}

/// What a push did.
#[derive(Debug, Default)]
pub struct PushReport {
    pub uploaded: Vec<String>,
    pub present: Vec<String>,
    pub mounted: Vec<String>,
    pub manifest: String,
}

pub async fn push(archive: &Path, reference: &str, opts: &PushOptions) -> Result<PushReport, PushError> {
    let reference = Reference::parse(reference)?;
    let path = archive.to_path_buf();
    let img = tokio::task::spawn_blocking(move || read_raw(&path))
        .await
        .map_err(|e| PushError::Registry {
            url: archive.display().to_string(),
            msg: e.to_string(),
        })??;
    let basic = match &opts.creds {
        Some(c) => Some(base64::engine::general_purpose::STANDARD.encode(c)),
        None => docker_config_auth(&reference.host)?,
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .user_agent(concat!("nix-snapshotter/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| PushError::Registry {
            url: reference.host.clone(),
            msg: e.to_string(),
        })?;
    let scheme = if opts.plain_http { "http" } else { "https" };
    let mut reg = Registry {
        client,
        base: format!("{scheme}://{}/v2/{}", reference.host, reference.repository),
        reference,
        basic,
        bearer: None,
    };
    let mut report = PushReport::default();
    let mut blobs: Vec<(String, Blob)> = vec![(img.config_digest.clone(), Blob::Bytes(img.config_bytes.clone()))];
    blobs.extend(
        img.layers
            .iter()
            .map(|(d, b, _)| (d.digest.clone(), Blob::Archive(b.clone()))),
    );
    for (digest, blob) in blobs {
        match reg.put_blob(&digest, blob, &opts.mount_from).await? {
            Put::Present => report.present.push(digest),
            Put::Mounted => report.mounted.push(digest),
            Put::Uploaded => report.uploaded.push(digest),
        }
    }
    let url = format!("{}/manifests/{}", reg.base, reg.reference.tag);
    let resp = reg
        .send(Method::PUT, &url, |r| {
            r.header("Content-Type", img.manifest.media_type.clone())
                .body(img.manifest_bytes.clone())
        })
        .await?;
    if !resp.status().is_success() {
        return Err(failed(&url, resp).await);
    }
    report.manifest = img.manifest.digest.clone();
    Ok(report)
}

enum Blob {
    Bytes(Vec<u8>),
    Archive(BlobRef),
}

enum Put {
    Present,
    Mounted,
    Uploaded,
}

async fn failed(url: &str, resp: reqwest::Response) -> PushError {
    let status = resp.status();
    let body = read_capped(resp, 64 << 10).await.unwrap_or_default();
    let body = String::from_utf8_lossy(&body);
    PushError::Registry {
        url: url.to_string(),
        msg: format!("{status}: {}", body.chars().take(500).collect::<String>()),
    }
}

/// A response body of at most `cap` bytes (a registry is not trusted to
/// send small answers).
async fn read_capped(mut resp: reqwest::Response, cap: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        if out.len() + chunk.len() > cap {
            return Err(format!("answer larger than {cap} bytes"));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

impl Registry {
    /// Sends a request, answering one Bearer challenge if the registry asks.
    async fn send(
        &mut self,
        method: Method,
        url: &str,
        build: impl Fn(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, PushError> {
        let mut challenged = false;
        loop {
            let mut req = build(self.client.request(method.clone(), url));
            if let Some(t) = &self.bearer {
                req = req.bearer_auth(t);
            } else if let Some(b) = &self.basic {
                req = req.header("Authorization", format!("Basic {b}"));
            }
            let resp = req.send().await.map_err(|e| PushError::Registry {
                url: url.to_string(),
                msg: e.to_string(),
            })?;
            if resp.status() == StatusCode::UNAUTHORIZED && !challenged {
                challenged = true;
                let challenge = resp
                    .headers()
                    .get("www-authenticate")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                if let Some(token) = self.token(&challenge).await? {
                    self.bearer = Some(token);
                    continue;
                }
            }
            return Ok(resp);
        }
    }

    /// The token a `Bearer realm=...,service=...` challenge asks for.
    async fn token(&self, challenge: &str) -> Result<Option<String>, PushError> {
        let Some(params) = challenge.strip_prefix("Bearer ") else {
            return Ok(None);
        };
        let get = |k: &str| {
            params.split(',').find_map(|kv| {
                let (key, v) = kv.trim().split_once('=')?;
                (key == k).then(|| v.trim_matches('"').to_string())
            })
        };
        let Some(realm) = get("realm") else {
            return Ok(None);
        };
        let scope = get("scope").unwrap_or_else(|| format!("repository:{}:pull,push", self.reference.repository));
        let mut url = reqwest::Url::parse(&realm).map_err(|e| PushError::Registry {
            url: realm.clone(),
            msg: e.to_string(),
        })?;
        url.query_pairs_mut()
            .append_pair("service", &get("service").unwrap_or_default())
            .append_pair("scope", &scope);
        let mut req = self.client.get(url);
        if let Some(b) = &self.basic {
            req = req.header("Authorization", format!("Basic {b}"));
        }
        let resp = req.send().await.map_err(|e| PushError::Registry {
            url: realm.clone(),
            msg: e.to_string(),
        })?;
        if !resp.status().is_success() {
            return Err(failed(&realm, resp).await);
        }
        let bytes = read_capped(resp, 1 << 20).await.map_err(|msg| PushError::Registry {
            url: realm.clone(),
            msg,
        })?;
        let body: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| PushError::Registry {
            url: realm.clone(),
            msg: format!("token answer: {e}"),
        })?;
        Ok(body["token"]
            .as_str()
            .or(body["access_token"].as_str())
            .map(str::to_string))
    }

    async fn put_blob(&mut self, digest: &str, blob: Blob, mount_from: &[String]) -> Result<Put, PushError> {
        let url = format!("{}/blobs/{digest}", self.base);
        let resp = self.send(Method::HEAD, &url, |r| r).await?;
        if resp.status().is_success() {
            return Ok(Put::Present);
        }
        // A mount that fails opens an upload session (202): the last one
        // is used for the upload, earlier ones are left to the registry.
        let mut location = None;
        for from in mount_from {
            let url = format!("{}/blobs/uploads/?mount={digest}&from={from}", self.base);
            let resp = self.send(Method::POST, &url, |r| r).await?;
            match resp.status() {
                StatusCode::CREATED => return Ok(Put::Mounted),
                StatusCode::ACCEPTED => {
                    location = resp
                        .headers()
                        .get("location")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                }
                _ => return Err(failed(&url, resp).await),
            }
        }
        let location = match location {
            Some(l) => l,
            None => {
                let url = format!("{}/blobs/uploads/", self.base);
                let resp = self.send(Method::POST, &url, |r| r).await?;
                if resp.status() != StatusCode::ACCEPTED {
                    return Err(failed(&url, resp).await);
                }
                resp.headers()
                    .get("location")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
                    .ok_or_else(|| PushError::Registry {
                        url,
                        msg: "no Location for the upload".into(),
                    })?
            }
        };
        let mut put = if location.starts_with('/') {
            let origin = self.base.split("/v2/").next().unwrap_or(&self.base).to_string();
            reqwest::Url::parse(&format!("{origin}{location}"))
        } else {
            reqwest::Url::parse(&location)
        }
        .map_err(|e| PushError::Registry {
            url: location.clone(),
            msg: e.to_string(),
        })?;
        put.query_pairs_mut().append_pair("digest", digest);
        let put_url = put.to_string();
        let resp = self
            .send(Method::PUT, &put_url, |r| {
                let r = r.header("Content-Type", "application/octet-stream");
                match &blob {
                    Blob::Bytes(b) => r.body(b.clone()),
                    // Streamed from the archive (opened afresh for each try),
                    // never held whole: a layer may be large.
                    Blob::Archive(b) => match open_stream(b) {
                        Ok(body) => r.header("Content-Length", b.size).body(body),
                        Err(_) => r.body(Vec::new()),
                    },
                }
            })
            .await?;
        if resp.status() != StatusCode::CREATED {
            return Err(failed(&put_url, resp).await);
        }
        Ok(Put::Uploaded)
    }
}

/// A blob of the archive as a request body.
fn open_stream(b: &BlobRef) -> std::io::Result<reqwest::Body> {
    use std::io::{Seek, SeekFrom};
    use tokio::io::AsyncReadExt;
    let mut f = std::fs::File::open(&b.archive)?;
    f.seek(SeekFrom::Start(b.offset))?;
    let reader = tokio::fs::File::from_std(f).take(b.size);
    Ok(reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(reader)))
}

/// `auths.<host>.auth` of `$DOCKER_CONFIG/config.json` or
/// `~/.docker/config.json`, if any.
fn docker_config_auth(host: &str) -> Result<Option<String>, PushError> {
    let dir = std::env::var_os("DOCKER_CONFIG")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")));
    let Some(path) = dir.map(|d| d.join("config.json")) else {
        return Ok(None);
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(PushError::Creds {
                path,
                msg: e.to_string(),
            })
        }
    };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| PushError::Creds {
        path: path.clone(),
        msg: e.to_string(),
    })?;
    Ok(v["auths"][host]["auth"].as_str().map(str::to_string))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_parsed_strictly() {
        let r = Reference::parse("127.0.0.1:5000/nix/hello:v1").unwrap();
        assert_eq!(
            (r.host.as_str(), r.repository.as_str(), r.tag.as_str()),
            ("127.0.0.1:5000", "nix/hello", "v1")
        );
        assert_eq!(Reference::parse("ghcr.io/pdtpartners/hello").unwrap().tag, "latest");
        for bad in [
            "hello",
            "redis:latest",
            "127.0.0.1:5000/",
            "127.0.0.1:5000/UPPER",
            "h.io/a//b",
            "h.io/a:b/c:",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad}");
        }
    }
}
