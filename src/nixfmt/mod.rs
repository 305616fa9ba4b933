//! Nix's formats, parsed from untrusted network input: store paths, hashes,
//! narinfo files and their signatures, `nix-cache-info`, `.ls` NAR listings
//! and NAR archives (streamed, never held whole in memory).
//!
//! Every parser here is fuzzed (see `fuzz/`).

pub mod base32;
pub mod cache_info;
pub mod hash;
pub mod index;
pub mod listing;
pub mod nar;
pub mod narinfo;
pub mod profile;
pub mod signature;
pub mod store_path;

pub use hash::NixHash;
pub use narinfo::NarInfo;
pub use store_path::StorePath;

/// Mutation tests: the same properties as the cargo-fuzz targets in `fuzz/`,
/// run on a few thousand deterministic mutations of valid inputs so that CI
/// exercises them on every change.
#[cfg(test)]
mod robustness {
    use rand::{Rng, SeedableRng};

    fn mutations(seed: &[u8], n: usize) -> Vec<Vec<u8>> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        (0..n)
            .map(|_| {
                let mut v = seed.to_vec();
                for _ in 0..rng.random_range(1..4) {
                    if v.is_empty() {
                        v.push(rng.random());
                        continue;
                    }
                    let i = rng.random_range(0..v.len());
                    match rng.random_range(0..5) {
                        0 => v[i] ^= 1 << rng.random_range(0..8),
                        1 => v.truncate(i),
                        2 => v.insert(i, rng.random()),
                        3 => {
                            v.remove(i);
                        }
                        _ => v[i] = rng.random(),
                    }
                }
                v
            })
            .collect()
    }

    #[test]
    fn nar_unpacker_survives_mutations_and_round_trips_what_it_accepts() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir_all(src.join("d/e")).unwrap();
        std::fs::write(src.join("d/e/f"), b"contents").unwrap();
        std::fs::write(src.join("x"), b"").unwrap();
        std::os::unix::fs::symlink("d/e", src.join("l")).unwrap();
        let mut seed = Vec::new();
        super::nar::dump(&src, &mut seed).unwrap();
        let mut accepted = 0;
        for (i, m) in mutations(&seed, 3000).into_iter().enumerate() {
            let dest = tmp.path().join(format!("o{i}"));
            let mut r = &m[..];
            if super::nar::unpack(&mut r, &dest).is_ok() {
                accepted += 1;
                let consumed = m.len() - r.len();
                let mut again = Vec::new();
                super::nar::dump(&dest, &mut again).unwrap();
                assert_eq!(
                    &m[..consumed],
                    &again[..],
                    "mutation {i} accepted but does not round-trip"
                );
            }
            let _ = crate::store::gc::remove_tree(&dest);
        }
        assert!(accepted > 0, "no mutation was accepted: the check proves little");
    }

    #[test]
    fn text_parsers_survive_mutations() {
        let narinfo = "StorePath: /nix/store/syd87l2rxw8cbsxmxl853h0r6pdwhw1a-x\nURL: nar/a.nar.xz\nCompression: xz\nNarHash: sha256:1b4sb93wp679q4zx9k1ignby1yna3z7c4c2ri3wphylbc2dwsys0\nNarSize: 8\nReferences: syd87l2rxw8cbsxmxl853h0r6pdwhw1a-x\nSig: k:AAAA\n";
        for m in mutations(narinfo.as_bytes(), 3000) {
            if let Ok(s) = std::str::from_utf8(&m) {
                if let Ok(i) = super::NarInfo::parse(s) {
                    assert!(i.fingerprint().starts_with("1;/nix/store/"));
                }
                let _ = super::StorePath::parse(s);
                let _ = super::NixHash::parse(s);
                let _ = super::cache_info::CacheInfo::parse(s);
                let _ = super::signature::PublicKey::parse(s);
            }
        }
        let listing = br#"{"version":1,"root":{"type":"directory","entries":{"a":{"type":"regular","size":3,"narOffset":9},"b":{"type":"symlink","target":"a"}}}}"#;
        for m in mutations(listing, 3000) {
            if let Ok(root) = super::listing::parse(&m) {
                let _ = root.lookup("a/b");
            }
        }
    }
}
