//! `.ls` listing parsing never panics; lookups on what parses never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use nix_snapshotter::nixfmt::listing;

fuzz_target!(|data: &[u8]| {
    if let Ok(root) = listing::parse(data) {
        let _ = root.lookup("bin/x");
        let _ = root.lookup("");
    }
});
