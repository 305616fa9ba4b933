//! `<hash>.narinfo`: what a binary cache says about one store path.

use super::hash::NixHash;
use super::store_path::{StorePath, STORE_DIR};

/// Compressions a NAR file may use (the `Compression` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Xz,
    Zstd,
    Bzip2,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfo {
    pub store_path: StorePath,
    /// Relative to the cache root, e.g. `nar/<filehash>.nar.zst`.
    pub url: String,
    pub compression: Compression,
    pub file_hash: Option<NixHash>,
    pub file_size: Option<u64>,
    pub nar_hash: NixHash,
    pub nar_size: u64,
    pub references: Vec<StorePath>,
    pub deriver: Option<String>,
    /// `keyname:base64`, as many as the cache has.
    pub sigs: Vec<String>,
    pub ca: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed narinfo: {0}")]
pub struct NarInfoError(pub String);

/// narinfo files are small; anything bigger is not one.
pub const MAX_NARINFO_SIZE: usize = 1 << 20;

impl NarInfo {
    pub fn parse(text: &str) -> Result<NarInfo, NarInfoError> {
        let err = |m: String| NarInfoError(m);
        if text.len() > MAX_NARINFO_SIZE {
            return Err(err(format!("{} bytes is too large", text.len())));
        }
        let (mut store_path, mut url, mut compression, mut file_hash, mut file_size) = (None, None, None, None, None);
        let (mut nar_hash, mut nar_size, mut references, mut deriver, mut ca) = (None, None, None, None, None);
        let mut sigs = Vec::new();
        for (n, line) in text.lines().enumerate() {
            if line.is_empty() {
                continue;
            }
            let (key, value) = line
                .split_once(": ")
                .ok_or_else(|| err(format!("line {}: expected 'Key: value'", n + 1)))?;
            let dup = |present: bool| {
                if present {
                    Err(err(format!("line {}: duplicate field {key}", n + 1)))
                } else {
                    Ok(())
                }
            };
            let num = |v: &str| {
                v.parse::<u64>()
                    .map_err(|_| err(format!("line {}: {key} is not a number", n + 1)))
            };
            let hash = |v: &str| NixHash::parse(v).map_err(|e| err(format!("line {}: {key}: {e}", n + 1)));
            match key {
                "StorePath" => {
                    dup(store_path.is_some())?;
                    store_path = Some(StorePath::from_absolute(value).map_err(|e| err(e.to_string()))?);
                }
                "URL" => {
                    dup(url.is_some())?;
                    url = Some(value.to_string());
                }
                "Compression" => {
                    dup(compression.is_some())?;
                    compression = Some(match value {
                        "none" => Compression::None,
                        "xz" => Compression::Xz,
                        "zstd" => Compression::Zstd,
                        "bzip2" => Compression::Bzip2,
                        other => return Err(err(format!("unsupported compression {other:?}"))),
                    });
                }
                "FileHash" => {
                    dup(file_hash.is_some())?;
                    file_hash = Some(hash(value)?);
                }
                "FileSize" => {
                    dup(file_size.is_some())?;
                    file_size = Some(num(value)?);
                }
                "NarHash" => {
                    dup(nar_hash.is_some())?;
                    nar_hash = Some(hash(value)?);
                }
                "NarSize" => {
                    dup(nar_size.is_some())?;
                    nar_size = Some(num(value)?);
                }
                "References" => {
                    dup(references.is_some())?;
                    references = Some(
                        value
                            .split(' ')
                            .filter(|r| !r.is_empty())
                            .map(|r| StorePath::from_base_name(r).map_err(|e| err(format!("References: {e}"))))
                            .collect::<Result<Vec<_>, _>>()?,
                    );
                }
                "Deriver" => {
                    dup(deriver.is_some())?;
                    deriver = (value != "unknown-deriver").then(|| value.to_string());
                }
                "Sig" => sigs.push(value.to_string()),
                "CA" => {
                    dup(ca.is_some())?;
                    ca = Some(value.to_string());
                }
                _ => {} // System and future fields: not ours to reject
            }
        }
        let missing = |f: &str| err(format!("missing field {f}"));
        let url: String = url.ok_or_else(|| missing("URL"))?;
        if !is_relative_url(&url) {
            return Err(err(format!("URL {url:?} is not a relative path inside the cache")));
        }
        Ok(NarInfo {
            store_path: store_path.ok_or_else(|| missing("StorePath"))?,
            url,
            // Nix's default when the field is absent.
            compression: compression.unwrap_or(Compression::Bzip2),
            file_hash,
            file_size,
            nar_hash: nar_hash.ok_or_else(|| missing("NarHash"))?,
            nar_size: nar_size.ok_or_else(|| missing("NarSize"))?,
            references: references.unwrap_or_default(),
            deriver,
            sigs,
            ca,
        })
    }

    /// What signatures sign: `1;<path>;<narhash>;<narsize>;<refs,...>`,
    /// with the references sorted as Nix sorts them (a narinfo may list
    /// them in any order).
    /// The narinfo file's text, as Nix writes it (references by base name).
    pub fn to_text(&self) -> String {
        let mut t = format!(
            "StorePath: {}\nURL: {}\nCompression: {}\n",
            self.store_path,
            self.url,
            match self.compression {
                Compression::None => "none",
                Compression::Xz => "xz",
                Compression::Zstd => "zstd",
                Compression::Bzip2 => "bzip2",
            }
        );
        if let Some(h) = &self.file_hash {
            t.push_str(&format!("FileHash: {}\n", h.to_nix_string()));
        }
        if let Some(n) = self.file_size {
            t.push_str(&format!("FileSize: {n}\n"));
        }
        let refs: Vec<&str> = self.references.iter().map(|r| r.base_name()).collect();
        t.push_str(&format!(
            "NarHash: {}\nNarSize: {}\nReferences: {}\n",
            self.nar_hash.to_nix_string(),
            self.nar_size,
            refs.join(" ")
        ));
        if let Some(d) = &self.deriver {
            t.push_str(&format!("Deriver: {d}\n"));
        }
        for s in &self.sigs {
            t.push_str(&format!("Sig: {s}\n"));
        }
        if let Some(ca) = &self.ca {
            t.push_str(&format!("CA: {ca}\n"));
        }
        t
    }

    pub fn fingerprint(&self) -> String {
        let mut refs: Vec<String> = self
            .references
            .iter()
            .map(|r| format!("{STORE_DIR}/{}", r.base_name()))
            .collect();
        refs.sort();
        format!(
            "1;{};{};{};{}",
            self.store_path,
            self.nar_hash.to_nix_string(),
            self.nar_size,
            refs.join(",")
        )
    }
}

/// Whether `url` names a file inside a cache: relative, no `..`, no query.
pub fn is_relative_url(url: &str) -> bool {
    !(url.is_empty() || url.starts_with('/') || url.split('/').any(|s| s == "..") || url.contains(['?', '#']))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub const SAMPLE: &str = "StorePath: /nix/store/syd87l2rxw8cbsxmxl853h0r6pdwhw1a-curl-7.82.0-bin
URL: nar/05ra3y72i3qjri7xskf9qj8kb29r6naqy1sqpbs3azi3xcigmj56.nar.xz
Compression: xz
FileHash: sha256:05ra3y72i3qjri7xskf9qj8kb29r6naqy1sqpbs3azi3xcigmj56
FileSize: 68852
NarHash: sha256:1b4sb93wp679q4zx9k1ignby1yna3z7c4c2ri3wphylbc2dwsys0
NarSize: 196040
References: 0jqd0rlxzra1rs38rdxl43yh6rxchgc6-curl-7.82.0 6w8g7njm4mck5dmjxws0z1xnrxvl81xa-glibc-2.34-115 j5jxw3iy7bbz4a57fh9g2xm2gxmyal8h-zlib-1.2.12 yxvjs9drzsphm9pcf42a4byzj1kb9m7k-openssl-1.1.1n
Deriver: 5rwxzi7pal3qhpsyfc16gzkh939q1np6-curl-7.82.0.drv
Sig: cache.nixos.org-1:TsTTb3WGTZKphvYdBHXwo6weVILmTytUjLB+vcX89fOjjRicCHmKA4RCPMVLkj6TMJ4GMX3HPVWRdD1hkeKZBQ==
Sig: other-1:AAAA
CA: fixed:r:sha256:1b4sb93wp679q4zx9k1ignby1yna3z7c4c2ri3wphylbc2dwsys0
";

    #[test]
    fn parses_every_field() {
        let n = NarInfo::parse(SAMPLE).unwrap();
        assert_eq!(n.store_path.name(), "curl-7.82.0-bin");
        assert_eq!(n.compression, Compression::Xz);
        assert_eq!(n.file_size, Some(68852));
        assert_eq!(n.nar_size, 196040);
        assert_eq!(n.references.len(), 4);
        assert_eq!(n.sigs.len(), 2);
        assert_eq!(
            n.deriver.as_deref(),
            Some("5rwxzi7pal3qhpsyfc16gzkh939q1np6-curl-7.82.0.drv")
        );
        assert!(n.ca.is_some());
        assert_eq!(
            n.fingerprint(),
            "1;/nix/store/syd87l2rxw8cbsxmxl853h0r6pdwhw1a-curl-7.82.0-bin;sha256:1b4sb93wp679q4zx9k1ignby1yna3z7c4c2ri3wphylbc2dwsys0;196040;/nix/store/0jqd0rlxzra1rs38rdxl43yh6rxchgc6-curl-7.82.0,/nix/store/6w8g7njm4mck5dmjxws0z1xnrxvl81xa-glibc-2.34-115,/nix/store/j5jxw3iy7bbz4a57fh9g2xm2gxmyal8h-zlib-1.2.12,/nix/store/yxvjs9drzsphm9pcf42a4byzj1kb9m7k-openssl-1.1.1n"
        );
    }

    #[test]
    fn what_it_writes_parses_back_the_same() {
        let text = "StorePath: /nix/store/syd87l2rxw8cbsxmxl853h0r6pdwhw1a-x\nURL: nar/a.nar.zst\nCompression: zstd\nFileHash: sha256:1b4sb93wp679q4zx9k1ignby1yna3z7c4c2ri3wphylbc2dwsys0\nFileSize: 5\nNarHash: sha256:1b4sb93wp679q4zx9k1ignby1yna3z7c4c2ri3wphylbc2dwsys0\nNarSize: 8\nReferences: syd87l2rxw8cbsxmxl853h0r6pdwhw1a-x\nSig: k:AAAA\n";
        let info = NarInfo::parse(text).unwrap();
        assert_eq!(NarInfo::parse(&info.to_text()).unwrap(), info);
        assert_eq!(info.to_text(), text);
    }

    #[test]
    fn rejects_malformed() {
        let cases = [
            SAMPLE.replace("NarSize: 196040", "NarSize: many"),
            SAMPLE.replace("StorePath: /nix/store/", "StorePath: /tmp/"),
            SAMPLE.replace("URL: nar/", "URL: ../../etc/"),
            SAMPLE.replace("Compression: xz", "Compression: lz4"),
            SAMPLE.replace("References: 0jqd", "References: bad"),
            SAMPLE.replace("NarHash: sha256:1b4s", "NarHash: sha256:eb4s"),
            SAMPLE
                .lines()
                .filter(|l| !l.starts_with("NarHash"))
                .collect::<Vec<_>>()
                .join("\n"),
            format!("{SAMPLE}NarSize: 1\n"),
            "garbage".to_string(),
        ];
        for c in cases {
            assert!(NarInfo::parse(&c).is_err(), "accepted:\n{c}");
        }
    }

    #[test]
    fn defaults() {
        let minimal = "StorePath: /nix/store/syd87l2rxw8cbsxmxl853h0r6pdwhw1a-x\nURL: nar/a.nar\nNarHash: sha256:1b4sb93wp679q4zx9k1ignby1yna3z7c4c2ri3wphylbc2dwsys0\nNarSize: 8\nReferences: \nDeriver: unknown-deriver\n";
        let n = NarInfo::parse(minimal).unwrap();
        assert_eq!(n.compression, Compression::Bzip2);
        assert!(n.references.is_empty() && n.deriver.is_none() && n.sigs.is_empty());
        assert!(n.fingerprint().ends_with(";8;"));
    }
}
