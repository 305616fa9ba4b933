//! Content hashes as narinfo files write them: `sha256:<nix-base32>`, also
//! accepted as base16, base64 or SRI (`sha256-<base64>`).

use std::fmt;

use base64::Engine;

use super::base32;

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct NixHash {
    /// Only SHA-256: what Nix uses for NarHash and FileHash.
    pub sha256: [u8; 32],
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed hash {0:?} (expected sha256 in base32, base16 or base64)")]
pub struct HashError(pub String);

impl NixHash {
    pub fn parse(s: &str) -> Result<NixHash, HashError> {
        let bad = || HashError(s.to_string());
        let (algo, digest, sri) = match (s.split_once(':'), s.split_once('-')) {
            (Some((a, d)), _) => (a, d, false),
            (None, Some((a, d))) => (a, d, true),
            _ => return Err(bad()),
        };
        if algo != "sha256" {
            return Err(bad());
        }
        let bytes = if sri {
            base64::engine::general_purpose::STANDARD.decode(digest).ok()
        } else {
            match digest.len() {
                52 => base32::decode(digest, 32),
                64 => hex_decode(digest),
                44 => base64::engine::general_purpose::STANDARD.decode(digest).ok(),
                _ => None,
            }
        };
        let sha256: [u8; 32] = bytes.and_then(|b| b.try_into().ok()).ok_or_else(bad)?;
        Ok(NixHash { sha256 })
    }

    /// The canonical form, `sha256:<base32>`, as signatures cover it.
    pub fn to_nix_string(&self) -> String {
        format!("sha256:{}", base32::encode(&self.sha256))
    }

    pub fn to_hex(&self) -> String {
        self.sha256.iter().map(|b| format!("{b:02x}")).collect()
    }
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl fmt::Display for NixHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_nix_string())
    }
}

impl fmt::Debug for NixHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_nix_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_encodings_agree() {
        let b32 = NixHash::parse("sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73").unwrap();
        let b16 = NixHash::parse("sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855").unwrap();
        let sri = NixHash::parse("sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=").unwrap();
        assert_eq!(b32, b16);
        assert_eq!(b32, sri);
        assert_eq!(
            b32.to_string(),
            "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
    }

    #[test]
    fn rejects() {
        for bad in [
            "",
            "sha256:",
            "md5:abc",
            "sha1:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73",
            "sha256:xyz",
            "sha256-!!",
        ] {
            assert!(NixHash::parse(bad).is_err(), "{bad}");
        }
    }
}
