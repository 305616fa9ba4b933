//! Nix's formats, parsed from untrusted network input: store paths, hashes,
//! narinfo files and their signatures, `nix-cache-info`, `.ls` NAR listings
//! and NAR archives (streamed, never held whole in memory).
//!
//! Every parser here is fuzzed (see `fuzz/`).

pub mod base32;
pub mod cache_info;
pub mod hash;
pub mod listing;
pub mod nar;
pub mod narinfo;
pub mod signature;
pub mod store_path;

pub use hash::NixHash;
pub use narinfo::NarInfo;
pub use store_path::StorePath;
