//! The signed file index never panics; whatever parses serialises back to
//! itself. The fuzzer mostly writes bodies: the header is rebuilt around
//! them with a matching BodyHash, so that the body parser is reached.
#![no_main]
use libfuzzer_sys::fuzz_target;
use nix_snapshotter::nixfmt::index::FileIndex;
use sha2::{Digest, Sha256};

fuzz_target!(|data: &[u8]| {
    let _ = FileIndex::parse(data);
    let hash = nix_snapshotter::nixfmt::NixHash {
        sha256: Sha256::digest(data).into(),
    };
    let mut with_header = format!(
        "FileIndex: 1\nStorePath: /nix/store/syd87l2rxw8cbsxmxl853h0r6pdwhw1a-x\n\
         NarHash: sha256:1b4sb93wp679q4zx9k1ignby1yna3z7c4c2ri3wphylbc2dwsys0\nNarSize: 100000\n\
         ChunkSize: 4096\nURL: nar/x.nar.zst\nBodyHash: {}\nBodySize: {}\n\n",
        hash.to_nix_string(),
        data.len()
    )
    .into_bytes();
    with_header.extend_from_slice(data);
    if let Ok(idx) = FileIndex::parse(&with_header) {
        assert_eq!(FileIndex::parse(&idx.to_bytes()).unwrap(), idx);
    }
});
