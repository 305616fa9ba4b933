//! ed25519 signatures on narinfo fingerprints, with keys in Nix's
//! `name:base64` format (`nix key generate-secret` / `convert-secret-to-public`).

use base64::Engine;
use ed25519_dalek::{Signature, Verifier, VerifyingKey};

use super::narinfo::NarInfo;

#[derive(Debug, Clone)]
pub struct PublicKey {
    pub name: String,
    key: VerifyingKey,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed public key {0:?} (expected name:base64 of 32 bytes)")]
pub struct KeyError(pub String);

impl PublicKey {
    pub fn parse(s: &str) -> Result<PublicKey, KeyError> {
        let bad = || KeyError(s.to_string());
        let (name, b64) = s.split_once(':').ok_or_else(bad)?;
        if name.is_empty() {
            return Err(bad());
        }
        let bytes: [u8; 32] = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(bad)?;
        let key = VerifyingKey::from_bytes(&bytes).map_err(|_| bad())?;
        Ok(PublicKey {
            name: name.to_string(),
            key,
        })
    }
}

/// A Nix secret key (`nix key generate-secret`: `name:base64` of the 64
/// bytes seed and public key), for signing what we publish.
pub struct SecretKey {
    pub name: String,
    key: ed25519_dalek::SigningKey,
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretKey({})", self.name)
    }
}

impl SecretKey {
    /// Parses a key file's text; the error never holds the secret.
    pub fn parse(s: &str) -> Result<SecretKey, KeyError> {
        let bad = || KeyError("<secret key>".into());
        let (name, b64) = s.trim().split_once(':').ok_or_else(bad)?;
        if name.is_empty() {
            return Err(bad());
        }
        let bytes: [u8; 64] = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(bad)?;
        let key = ed25519_dalek::SigningKey::from_keypair_bytes(&bytes).map_err(|_| bad())?;
        Ok(SecretKey {
            name: name.to_string(),
            key,
        })
    }

    /// `name:base64` of the signature over `fingerprint`.
    pub fn sign(&self, fingerprint: &str) -> String {
        use ed25519_dalek::Signer;
        let sig = self.key.sign(fingerprint.as_bytes());
        format!(
            "{}:{}",
            self.name,
            base64::engine::general_purpose::STANDARD.encode(sig.to_bytes())
        )
    }

    pub fn public(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }
}

/// Why a narinfo is not trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Untrusted {
    NoSignatures,
    /// Signatures exist, none by a trusted key; their key names.
    UntrustedKeys(Vec<String>),
    /// A trusted key's signature does not verify.
    BadSignature(String),
}

impl std::fmt::Display for Untrusted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Untrusted::NoSignatures => f.write_str("it has no signature"),
            Untrusted::UntrustedKeys(k) => write!(f, "it is signed only by untrusted keys {}", k.join(", ")),
            Untrusted::BadSignature(k) => write!(f, "its signature by {k} does not verify"),
        }
    }
}

/// Accepts `info` if any signature by a key in `trusted` verifies.
pub fn verify(info: &NarInfo, trusted: &[PublicKey]) -> Result<String, Untrusted> {
    verify_fingerprint(&info.fingerprint(), &info.sigs, trusted)
}

/// Accepts `fingerprint` if any of `sigs` (`name:base64`) by a key in
/// `trusted` verifies; returns that key's name.
pub fn verify_fingerprint(fingerprint: &str, sigs: &[String], trusted: &[PublicKey]) -> Result<String, Untrusted> {
    if sigs.is_empty() {
        return Err(Untrusted::NoSignatures);
    }
    let mut bad = None;
    let mut names = Vec::new();
    for sig in sigs {
        let Some((name, b64)) = sig.split_once(':') else {
            continue;
        };
        names.push(name.to_string());
        for key in trusted.iter().filter(|k| k.name == name) {
            let sig_bytes: Option<[u8; 64]> = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .ok()
                .and_then(|b| b.try_into().ok());
            match sig_bytes {
                Some(b)
                    if key
                        .key
                        .verify(fingerprint.as_bytes(), &Signature::from_bytes(&b))
                        .is_ok() =>
                {
                    return Ok(name.to_string())
                }
                _ => bad = Some(name.to_string()),
            }
        }
    }
    Err(match bad {
        Some(k) => Untrusted::BadSignature(k),
        None => Untrusted::UntrustedKeys(names),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    fn signed(info: &NarInfo, name: &str, key: &SigningKey) -> String {
        let sig = key.sign(info.fingerprint().as_bytes());
        format!(
            "{name}:{}",
            base64::engine::general_purpose::STANDARD.encode(sig.to_bytes())
        )
    }

    fn pubkey(name: &str, key: &SigningKey) -> PublicKey {
        let b64 = base64::engine::general_purpose::STANDARD.encode(key.verifying_key().to_bytes());
        PublicKey::parse(&format!("{name}:{b64}")).unwrap()
    }

    #[test]
    fn unsorted_references_verify_as_nix_signs_them() {
        let a = "0a5rbqvcs4a7fyjkbxmaz4yrcgfqnhbm-a";
        let b = "syd87l2rxw8cbsxmxl853h0r6pdwhw1a-b";
        let text = format!("StorePath: /nix/store/syd87l2rxw8cbsxmxl853h0r6pdwhw1a-x\nURL: nar/a.nar\nNarHash: sha256:1b4sb93wp679q4zx9k1ignby1yna3z7c4c2ri3wphylbc2dwsys0\nNarSize: 8\nReferences: {b} {a}\n");
        let mut info = NarInfo::parse(&text).unwrap();
        // Nix signs the references sorted, whatever order the file lists.
        assert!(info.fingerprint().ends_with(&format!(";/nix/store/{a},/nix/store/{b}")));
        let key = SigningKey::from_bytes(&[7u8; 32]);
        info.sigs = vec![signed(&info, "test-1", &key)];
        assert!(verify(&info, &[pubkey("test-1", &key)]).is_ok());
    }

    #[test]
    fn verifies_and_refuses() {
        let text = "StorePath: /nix/store/syd87l2rxw8cbsxmxl853h0r6pdwhw1a-x\nURL: nar/a.nar\nNarHash: sha256:1b4sb93wp679q4zx9k1ignby1yna3z7c4c2ri3wphylbc2dwsys0\nNarSize: 8\nReferences: \n";
        let mut info = NarInfo::parse(text).unwrap();
        let good = SigningKey::from_bytes(&[7u8; 32]);
        let other = SigningKey::from_bytes(&[9u8; 32]);
        let trusted = vec![pubkey("test-1", &good)];

        assert_eq!(verify(&info, &trusted), Err(Untrusted::NoSignatures));
        info.sigs = vec![signed(&info, "stranger-1", &other)];
        assert_eq!(
            verify(&info, &trusted),
            Err(Untrusted::UntrustedKeys(vec!["stranger-1".into()]))
        );
        info.sigs = vec![signed(&info, "test-1", &other)];
        assert_eq!(verify(&info, &trusted), Err(Untrusted::BadSignature("test-1".into())));
        info.sigs.push(signed(&info, "test-1", &good));
        assert_eq!(verify(&info, &trusted), Ok("test-1".into()));
        // Any change to what is signed breaks it.
        info.nar_size = 9;
        assert!(verify(&info, &trusted).is_err());
    }

    #[test]
    fn a_secret_key_signs_what_its_public_key_verifies() {
        let key = SigningKey::from_bytes(&[5u8; 32]);
        let text = format!(
            "k-1:{}\n",
            base64::engine::general_purpose::STANDARD.encode(key.to_keypair_bytes())
        );
        let secret = SecretKey::parse(&text).unwrap();
        let sig = secret.sign("1;x");
        assert_eq!(
            verify_fingerprint("1;x", std::slice::from_ref(&sig), &[pubkey("k-1", &key)]),
            Ok("k-1".into())
        );
        assert!(verify_fingerprint("1;y", &[sig], &[secret.public()]).is_err());
        let e = SecretKey::parse("k-1:AAAA").unwrap_err();
        assert!(!format!("{e}").contains("AAAA"));
    }

    #[test]
    fn cache_nixos_org_key_parses() {
        assert!(PublicKey::parse("cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=").is_ok());
        assert!(PublicKey::parse("nokey").is_err());
        assert!(PublicKey::parse("k:AAAA").is_err());
    }
}
