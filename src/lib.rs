//! nix-snapshotter: a containerd remote snapshotter for Nix store paths.
//!
//! - [`snapshots`]: the overlayfs snapshotter core (metadata + directories).
//! - [`service`]: containerd's Snapshots gRPC service over that core.
//! - [`authority`]: lets clients that send a socket path as `:authority` in.
//! - [`daemon`]: socket, signals, readiness.
//! - [`config`]: the TOML configuration.

pub mod admin;
pub mod api;
pub mod authority;
pub mod bench;
pub mod cache;
pub mod commands;
pub mod config;
pub mod cri;
pub mod daemon;
pub mod db;
pub mod error;
pub mod image;
pub mod keeper;
pub mod metrics;
pub mod nixfmt;
pub mod nixlayer;
pub mod publish;
pub mod rootless;
pub mod service;
pub mod snapshots;
pub mod store;
pub mod uds;
pub mod usage;
