//! Store paths, hashes, public keys and nix-cache-info never panic, and
//! valid store paths and hashes print back to what parses to the same value.
#![no_main]
use libfuzzer_sys::fuzz_target;
use nix_snapshotter::nixfmt::{cache_info::CacheInfo, signature::PublicKey, NixHash, StorePath};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(p) = StorePath::parse(s) {
        assert_eq!(StorePath::parse(&p.to_string()).unwrap(), p);
    }
    if let Ok(h) = NixHash::parse(s) {
        assert_eq!(NixHash::parse(&h.to_nix_string()).unwrap(), h);
    }
    let _ = PublicKey::parse(s);
    let _ = CacheInfo::parse(s);
});
