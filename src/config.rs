//! Daemon configuration: defaults < TOML file < command-line flags.
//!
//! Keys are those of the Go nix-snapshotter, so existing config files keep
//! working; unknown keys are rejected by name rather than silently ignored.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const DEFAULT_CONFIG: &str = "/etc/nix-snapshotter/config.toml";
pub const DEFAULT_ADDRESS: &str = "/run/nix-snapshotter/nix-snapshotter.sock";
pub const DEFAULT_ROOT: &str = "/var/lib/containerd/io.containerd.snapshotter.v1.nix";
pub const DEFAULT_CONTAINERD_ADDRESS: &str = "/run/containerd/containerd.sock";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Unix socket the gRPC services listen on.
    pub address: PathBuf,
    /// State directory: metadata database and snapshot trees.
    pub root: PathBuf,
    /// Program that builds store paths no cache has (the Go project's key).
    pub external_builder: String,

    /// Binary caches to fetch store paths from, in order (nix.conf `substituters`).
    /// `?priority=N` overrides a cache's own priority; `?trusted=1` accepts its
    /// paths without a trusted signature.
    pub substituters: Vec<String>,
    /// Keys whose signatures make a path trusted, `name:base64` (nix.conf `trusted-public-keys`).
    pub trusted_public_keys: Vec<String>,
    /// Require a valid signature by a trusted key (nix.conf `require-sigs`).
    pub require_sigs: bool,
    /// The node's own Nix store, used instead of downloading when it has a
    /// path; empty turns it off.
    pub host_store: PathBuf,
    /// netrc file with credentials for private caches; empty for none.
    pub netrc_file: PathBuf,
    /// `host:port` to serve Prometheus metrics on (`GET /metrics`); empty: off.
    pub metrics_address: String,
    pub image_service: ImageServiceConfig,
    pub store: StoreConfig,
    pub fetch: FetchConfig,
    pub fuse: FuseConfig,
}

/// The lazy FUSE store under `<root>/fuse`, used for Nix layers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FuseConfig {
    /// Serve Nix layers through FUSE views (false: Nix layers are plain layers).
    pub enable: bool,
    /// Seconds a read may wait for its store path to be fetched before it fails with EIO.
    pub fetch_timeout: f64,
    /// FUSE worker threads (a request waiting for a fetch holds one).
    pub threads: usize,
    /// Use FUSE passthrough for reads where the kernel allows it (root,
    /// Linux >= 6.9). Off by default: passthrough needs an OPEN and a
    /// RELEASE round trip per open file (a warm python start made 27 of
    /// each); without it the kernel opens store files by itself and keeps
    /// their page cache (docs/benchmarks.md).
    pub passthrough: bool,
    /// Keep the FUSE session across daemon restarts, crashes and upgrades
    /// (systemd's file descriptor store, else a holder process), so that
    /// running containers keep their /nix/store.
    pub keep_session: bool,
}

impl Default for FuseConfig {
    fn default() -> Self {
        FuseConfig {
            enable: true,
            fetch_timeout: 60.0,
            threads: 16,
            passthrough: false,
            keep_session: true,
        }
    }
}

/// The local store under `<root>/store`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Bound on the local store's disk usage ("20GiB", "512MiB", bytes);
    /// least recently used paths are evicted first. "0" means unbounded.
    pub max_size: ByteSize,
    /// When a Nix image is pulled, start fetching the closures of the store
    /// paths its command runs from (its `nix-entrypoint` label) at once,
    /// many in flight, instead of one after another as the program loads.
    pub prefetch_entrypoint: bool,
    /// When a pulled Nix image names an access profile (its `nix-profile`
    /// label), fetch what the profile lists at once, many requests in
    /// flight (by the frame where the cache has file indexes), instead of
    /// the command's closures whole.
    pub prefetch_profile: bool,
    /// A store path read by the chunk (from a cache with file indexes) is
    /// fetched whole in the background once this fraction of its files'
    /// bytes was read, and is then whole and NarHash-verified; above 1:
    /// never.
    pub complete_after: f64,
}

/// Network behaviour of cache fetches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FetchConfig {
    /// Seconds to wait for a TCP/TLS connection (nix.conf `connect-timeout`).
    pub connect_timeout: f64,
    /// Seconds without any data before a transfer is abandoned and retried.
    pub stall_timeout: f64,
    /// Tries per request, the first included (nix.conf `download-attempts`).
    pub attempts: u32,
    /// Downloads and narinfo requests in flight at once (nix.conf `http-connections`).
    pub max_parallel: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            max_size: ByteSize(20 << 30),
            prefetch_entrypoint: true,
            prefetch_profile: true,
            complete_after: 0.5,
        }
    }
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            connect_timeout: 5.0,
            stall_timeout: 30.0,
            attempts: 5,
            max_parallel: 16,
        }
    }
}

/// A byte count written as a number or with a unit (B, KiB, MiB, GiB, TiB, KB, MB, GB, TB).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(s: &str) -> Result<ByteSize, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: f64 = num.parse().map_err(|_| format!("invalid size {s:?}"))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "K" | "KiB" => 1 << 10,
            "M" | "MiB" => 1 << 20,
            "G" | "GiB" => 1 << 30,
            "T" | "TiB" => 1 << 40,
            "KB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            u => return Err(format!("invalid size {s:?}: unknown unit {u:?}")),
        };
        Ok(ByteSize((n * mult as f64) as u64))
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}B", self.0))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => ByteSize::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageServiceConfig {
    /// Serve the CRI ImageService on the same socket: `nix:0/...` refs are
    /// pulled here, everything else is passed to containerd's CRI.
    pub enable: bool,
    /// containerd's socket, where the image service stores images.
    pub containerd_address: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            address: DEFAULT_ADDRESS.into(),
            root: DEFAULT_ROOT.into(),
            external_builder: String::new(),
            image_service: ImageServiceConfig::default(),
            substituters: vec!["https://cache.nixos.org".into()],
            trusted_public_keys: vec!["cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=".into()],
            require_sigs: true,
            host_store: "/nix/store".into(),
            netrc_file: PathBuf::new(),
            metrics_address: String::new(),
            store: StoreConfig::default(),
            fetch: FetchConfig::default(),
            fuse: FuseConfig::default(),
        }
    }
}

impl Default for ImageServiceConfig {
    fn default() -> Self {
        ImageServiceConfig {
            enable: true,
            containerd_address: DEFAULT_CONTAINERD_ADDRESS.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file {}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
}

/// Where an instance keeps its files when flags and the config file do not
/// say: the system's paths for root, the user's (XDG) paths for a rootless
/// user, as the Go project lays them out.
#[derive(Debug, Clone, PartialEq)]
pub struct Defaults {
    pub config_file: PathBuf,
    pub address: PathBuf,
    pub root: PathBuf,
    pub containerd_address: PathBuf,
}

impl Defaults {
    pub fn system() -> Defaults {
        Defaults {
            config_file: DEFAULT_CONFIG.into(),
            address: DEFAULT_ADDRESS.into(),
            root: DEFAULT_ROOT.into(),
            containerd_address: DEFAULT_CONTAINERD_ADDRESS.into(),
        }
    }

    pub fn rootless(dirs: &crate::rootless::Dirs) -> Defaults {
        Defaults {
            config_file: dirs.config_file(),
            address: dirs.address(),
            root: dirs.root(),
            containerd_address: dirs.containerd_address(),
        }
    }
}

impl Config {
    /// The defaults with `defaults`' paths.
    pub fn default_with(defaults: &Defaults) -> Config {
        Config {
            address: defaults.address.clone(),
            root: defaults.root.clone(),
            image_service: ImageServiceConfig {
                containerd_address: defaults.containerd_address.clone(),
                ..ImageServiceConfig::default()
            },
            ..Config::default()
        }
    }

    /// Loads `explicit` if given (it must exist), else the default file if it
    /// exists, else the defaults.
    pub fn load(explicit: Option<&Path>) -> Result<Config, ConfigError> {
        Config::load_with(explicit, &Defaults::system())
    }

    /// As [`Config::load`], with `defaults` for the default file and for
    /// the paths the file leaves out.
    pub fn load_with(explicit: Option<&Path>, defaults: &Defaults) -> Result<Config, ConfigError> {
        let path = explicit.unwrap_or(&defaults.config_file);
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse_with(&text, defaults).map_err(|message| ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            }),
            Err(e) if explicit.is_none() && e.kind() == std::io::ErrorKind::NotFound => {
                Ok(Config::default_with(defaults))
            }
            Err(source) => Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Parses TOML text over the defaults; the message names the bad key and line.
    pub fn parse(text: &str) -> Result<Config, String> {
        Config::parse_with(text, &Defaults::system())
    }

    /// As [`Config::parse`], the paths the text leaves out from `defaults`.
    pub fn parse_with(text: &str, defaults: &Defaults) -> Result<Config, String> {
        let table: toml::Table = toml::from_str(text).map_err(|e| e.to_string().trim_end().replace('\n', "\n  "))?;
        let mut cfg: Config = toml::from_str(text).map_err(|e| e.to_string().trim_end().replace('\n', "\n  "))?;
        let given = |key: &str| table.contains_key(key);
        if !given("address") {
            cfg.address = defaults.address.clone();
        }
        if !given("root") {
            cfg.root = defaults.root.clone();
        }
        let service = table.get("image_service").and_then(|v| v.as_table());
        if !service.is_some_and(|t| t.contains_key("containerd_address")) {
            cfg.image_service.containerd_address = defaults.containerd_address.clone();
        }
        cfg.refuse_unsupported()?;
        Ok(cfg)
    }

    /// Keys of the Go project that this build accepts but cannot honour yet
    /// are refused rather than silently ignored.
    fn refuse_unsupported(&self) -> Result<(), String> {
        if !self.external_builder.is_empty() {
            return Err(format!(
                "external_builder = {:?}: building store paths that no binary cache has is not supported \
                 by this build yet; remove the key (or set it to \"\")",
                self.external_builder
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_go_keys() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
        let c = Config::parse(
            "address = \"/tmp/s.sock\"\nroot = \"/tmp/r\"\nexternal_builder = \"\"\n[image_service]\nenable = false\ncontainerd_address = \"/tmp/c.sock\"\n",
        )
        .unwrap();
        assert_eq!(c.address, Path::new("/tmp/s.sock"));
        assert_eq!(c.root, Path::new("/tmp/r"));
        assert_eq!(c.image_service.containerd_address, Path::new("/tmp/c.sock"));
        // Accepted keys must work: what this build cannot do is refused, by name.
        let err = Config::parse("external_builder = \"/bin/b\"").unwrap_err();
        assert!(
            err.contains("external_builder") && err.contains("not supported"),
            "{err}"
        );
        assert!(
            Config::parse("[image_service]\nenable = true")
                .unwrap()
                .image_service
                .enable
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = Config::parse("adress = \"/x\"").unwrap_err();
        assert!(err.contains("adress"), "{err}");
        let err = Config::parse("[image_service]\nenabled = true").unwrap_err();
        assert!(err.contains("enabled"), "{err}");
    }

    #[test]
    fn malformed_is_rejected() {
        assert!(Config::parse("address = ").is_err());
        assert!(Config::parse("address = 3").unwrap_err().contains("address"));
    }

    #[test]
    fn cache_keys() {
        let c = Config::parse(
            "substituters = [\"file:///tmp/c\"]\ntrusted_public_keys = []\nrequire_sigs = false\nhost_store = \"\"\n[store]\nmax_size = \"1.5GiB\"\n[fetch]\nattempts = 2\nstall_timeout = 0.5\n",
        )
        .unwrap();
        assert_eq!(c.substituters, vec!["file:///tmp/c"]);
        assert!(!c.require_sigs);
        assert_eq!(c.host_store, Path::new(""));
        assert_eq!(c.store.max_size, ByteSize(3 << 29));
        assert_eq!(c.fetch.attempts, 2);
        assert_eq!(c.fetch.stall_timeout, 0.5);
        assert_eq!(Config::default().substituters, vec!["https://cache.nixos.org"]);
        assert!(Config::parse("[store]\nmax_size = \"lots\"")
            .unwrap_err()
            .contains("lots"));
        assert!(Config::parse("[fetch]\ntimeout = 3").unwrap_err().contains("timeout"));
        assert_eq!(ByteSize::parse("512MiB").unwrap(), ByteSize(512 << 20));
        assert_eq!(ByteSize::parse("0").unwrap(), ByteSize(0));
        assert_eq!(ByteSize::parse("2GB").unwrap(), ByteSize(2_000_000_000));
    }

    #[test]
    fn rootless_defaults_fill_only_what_the_file_leaves_out() {
        let dirs = crate::rootless::Dirs {
            runtime: "/run/user/1000".into(),
            data: "/home/a/.local/share".into(),
            config: "/home/a/.config".into(),
        };
        let d = Defaults::rootless(&dirs);
        let c = Config::parse_with("root = \"/srv/nix\"\n", &d).unwrap();
        assert_eq!(c.root, Path::new("/srv/nix"));
        assert_eq!(
            c.address,
            Path::new("/run/user/1000/nix-snapshotter/nix-snapshotter.sock")
        );
        assert_eq!(
            c.image_service.containerd_address,
            Path::new("/run/user/1000/containerd/containerd.sock")
        );
        let dir = tempfile::tempdir().unwrap();
        let d = Defaults {
            config_file: dir.path().join("absent.toml"),
            ..d
        };
        let c = Config::load_with(None, &d).unwrap();
        assert_eq!(
            c.root,
            Path::new("/home/a/.local/share/containerd/io.containerd.snapshotter.v1.nix")
        );
    }

    #[test]
    fn missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.toml");
        let err = Config::load(Some(&missing)).unwrap_err();
        assert!(err.to_string().contains("nope.toml"), "{err}");
    }
}
