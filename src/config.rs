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
    pub image_service: ImageServiceConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageServiceConfig {
    /// Serve the CRI ImageService on the same socket (resolves `nix:0/...` refs).
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
        }
    }
}

impl Default for ImageServiceConfig {
    fn default() -> Self {
        ImageServiceConfig {
            enable: false,
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

impl Config {
    /// Loads `explicit` if given (it must exist), else the default file if it
    /// exists, else the defaults.
    pub fn load(explicit: Option<&Path>) -> Result<Config, ConfigError> {
        let path = explicit.unwrap_or(Path::new(DEFAULT_CONFIG));
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(&text).map_err(|message| ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            }),
            Err(e) if explicit.is_none() && e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(source) => Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Parses TOML text over the defaults; the message names the bad key and line.
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().replace('\n', "\n  "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_go_keys() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
        let c = Config::parse(
            "address = \"/tmp/s.sock\"\nroot = \"/tmp/r\"\nexternal_builder = \"/bin/b\"\n[image_service]\nenable = true\ncontainerd_address = \"/tmp/c.sock\"\n",
        )
        .unwrap();
        assert_eq!(c.address, Path::new("/tmp/s.sock"));
        assert_eq!(c.root, Path::new("/tmp/r"));
        assert_eq!(c.external_builder, "/bin/b");
        assert!(c.image_service.enable);
        assert_eq!(c.image_service.containerd_address, Path::new("/tmp/c.sock"));
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
    fn missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.toml");
        let err = Config::load(Some(&missing)).unwrap_err();
        assert!(err.to_string().contains("nope.toml"), "{err}");
    }
}
