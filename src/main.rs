//! The `nix-snapshotter` command: with no subcommand, runs the daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use nix_snapshotter::config::Config;

#[derive(Parser)]
#[command(
    name = "nix-snapshotter",
    version,
    about = "containerd snapshotter that runs containers straight from Nix store paths"
)]
struct Cli {
    /// Configuration file (TOML). A missing default file is fine.
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Unix socket to serve on (overrides `address`).
    #[arg(short, long, value_name = "SOCK")]
    address: Option<PathBuf>,
    /// State directory (overrides `root`).
    #[arg(long, global = true, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Log level.
    #[arg(short = 'l', long, global = true, value_enum, default_value_t = LogLevel::Info)]
    log_level: LogLevel,
    /// Take over from the daemon serving the socket (an upgrade): it is
    /// stopped, and this one resumes its FUSE session and its socket.
    #[arg(long)]
    take_over: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Print the effective configuration (defaults < file < flags) as TOML.
    Config,
    /// Fetch store paths from the substituters into the local store.
    Fetch {
        /// Configuration file (TOML), as for the daemon.
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Also fetch everything the paths reference, transitively.
        #[arg(long)]
        closure: bool,
        /// Store paths (/nix/store/<hash>-<name>).
        #[arg(required = true, value_name = "STORE_PATH")]
        paths: Vec<String>,
    },
    /// Build or load Nix images.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Evict least recently used store paths until the store fits its size bound.
    Gc {
        /// Configuration file (TOML), as for the daemon.
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Bound to collect down to (default: store.max_size), e.g. 10GiB or 0.
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        max_size: Option<u64>,
    },
    /// Make store paths cold again: remove them from the local store.
    Evict {
        /// Configuration file (TOML), as for the daemon.
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Store paths (/nix/store/<hash>-<name>).
        #[arg(required = true, value_name = "STORE_PATH")]
        paths: Vec<String>,
    },
    /// What the daemon (or, with none running, the root) holds and does.
    Status {
        /// Configuration file (TOML), as for the daemon.
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Hold the FUSE session while no daemon serves it (started by the daemon).
    #[command(hide = true)]
    FuseHolder {
        /// Socket to answer on.
        #[arg(long, value_name = "SOCK")]
        socket: PathBuf,
    },
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Write a Nix image (OCI image-layout tar) in the nix-snapshotter format.
    Build {
        /// JSON object: the image config's `config` (Cmd, Entrypoint, Env, ...).
        #[arg(long = "config", value_name = "CONFIG.json")]
        image_config: PathBuf,
        /// File listing the closure's store paths (closure-info's `store-paths`).
        #[arg(long, value_name = "STORE_PATHS_FILE")]
        closure: PathBuf,
        /// JSON list of store paths whose contents are linked into `/`.
        #[arg(long, value_name = "PATHS.json")]
        copy_to_root: Option<PathBuf>,
        /// An OCI image-layout tar to build on (the Nix layer goes on top).
        #[arg(long, value_name = "ARCHIVE")]
        from_image: Option<PathBuf>,
        /// Image name recorded in the archive (default: nix:0<OUT>, as the Go project).
        #[arg(long, value_name = "REF")]
        r#ref: Option<String>,
        /// Where store paths physically are, for a chroot store (default /).
        #[arg(long, value_name = "DIR", default_value = "/")]
        store_root: PathBuf,
        /// The image's architecture (amd64, arm64, ...; default: this machine's).
        #[arg(long, value_name = "ARCH")]
        arch: Option<String>,
        /// Output archive.
        out: PathBuf,
    },
    /// Import an image archive into containerd and unpack it for a snapshotter,
    /// passing the Nix layer's labels (no ctr or Transfer service needed).
    Load {
        /// containerd's socket.
        #[arg(
            short,
            long,
            value_name = "CONTAINERD_SOCK",
            default_value = "/run/containerd/containerd.sock"
        )]
        address: PathBuf,
        /// containerd namespace (Kubernetes uses k8s.io).
        #[arg(short, long, value_name = "NS", default_value = "default")]
        namespace: String,
        /// Snapshotter to unpack for.
        #[arg(long, default_value = "nix")]
        snapshotter: String,
        /// Image name, if the archive does not name one (or to rename it).
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
        /// OCI image-layout tar (as `image build` or buildImage writes).
        archive: PathBuf,
    },
    /// Upload an image archive to a registry (OCI distribution API), digests
    /// unchanged: pulls of it through containerd make its Nix layer from
    /// labels, never downloading it.
    Push {
        /// Talk HTTP, not HTTPS (a registry on the local network).
        #[arg(long)]
        plain_http: bool,
        /// USER:PASS (default: ~/.docker/config.json's auths.<host>.auth).
        #[arg(long, value_name = "USER:PASS")]
        creds: Option<String>,
        /// A repository of the same registry to mount blobs from (repeatable).
        #[arg(long, value_name = "REPO")]
        mount_from: Vec<String>,
        /// OCI image-layout tar.
        archive: PathBuf,
        /// HOST[:PORT]/REPOSITORY[:TAG]
        reference: String,
    },
}

fn parse_size(s: &str) -> Result<u64, String> {
    nix_snapshotter::config::ByteSize::parse(s).map(|b| b.0)
}

/// The Go project's (logrus) levels; fatal and panic log as error.
#[derive(Clone, Copy, ValueEnum)]
enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
    Fatal,
    Panic,
}

fn init_logging(level: LogLevel) {
    let level = match level {
        LogLevel::Trace => tracing::Level::TRACE,
        LogLevel::Debug => tracing::Level::DEBUG,
        LogLevel::Info => tracing::Level::INFO,
        LogLevel::Warn => tracing::Level::WARN,
        LogLevel::Error | LogLevel::Fatal | LogLevel::Panic => tracing::Level::ERROR,
    };
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_level);
    if let Some(Command::FuseHolder { socket }) = &cli.command {
        return match nix_snapshotter::keeper::holder::serve(socket) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        };
    }
    // Before any thread: systemd's stored descriptors come with the environment.
    let found = nix_snapshotter::keeper::Found::from_environment();
    // The store subcommands also take --config after the subcommand.
    let config_file = match &cli.command {
        Some(Command::Fetch { config: Some(c), .. })
        | Some(Command::Gc { config: Some(c), .. })
        | Some(Command::Evict { config: Some(c), .. })
        | Some(Command::Status { config: Some(c), .. }) => Some(c.clone()),
        _ => cli.config.clone(),
    };
    let mut cfg = match Config::load(config_file.as_deref()) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    if let Some(a) = cli.address {
        cfg.address = a;
    }
    if let Some(r) = cli.root {
        cfg.root = r;
    }
    match cli.command {
        Some(Command::Config) => match toml::to_string(&cfg) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        Some(Command::Fetch { closure, paths, .. }) => {
            run(async { nix_snapshotter::commands::fetch(&cfg, &paths, closure).await })
        }
        Some(Command::Image(ImageCommand::Build {
            image_config,
            closure,
            copy_to_root,
            from_image,
            r#ref,
            store_root,
            arch,
            out,
        })) => {
            let abs = std::path::absolute(&out).unwrap_or(out.clone());
            let opts = nix_snapshotter::image::BuildOptions {
                config: image_config,
                closure,
                copy_to_root,
                from_image,
                name: Some(r#ref.unwrap_or_else(|| format!("nix:0{}", abs.display()))),
                store_root,
                arch,
            };
            match nix_snapshotter::image::build(&opts, &out) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            }
        }
        Some(Command::Image(ImageCommand::Load {
            address,
            namespace,
            snapshotter,
            name,
            archive,
        })) => run(async {
            let name =
                nix_snapshotter::image::load::load(&address, &namespace, &archive, &snapshotter, name.as_deref())
                    .await?;
            println!("{name}");
            Ok::<(), nix_snapshotter::image::load::LoadError>(())
        }),
        Some(Command::Image(ImageCommand::Push {
            plain_http,
            creds,
            mount_from,
            archive,
            reference,
        })) => run(async {
            let opts = nix_snapshotter::image::push::PushOptions {
                plain_http,
                creds,
                mount_from,
            };
            let r = nix_snapshotter::image::push::push(&archive, &reference, &opts).await?;
            println!("{reference}@{}", r.manifest);
            eprintln!(
                "pushed {} blobs ({} already there, {} mounted)",
                r.uploaded.len(),
                r.present.len(),
                r.mounted.len()
            );
            Ok::<(), nix_snapshotter::image::push::PushError>(())
        }),
        Some(Command::Gc { max_size, .. }) => run(async { nix_snapshotter::commands::gc(&cfg, max_size).await }),
        Some(Command::Evict { paths, .. }) => run(async { nix_snapshotter::commands::evict(&cfg, &paths).await }),
        Some(Command::Status { json, .. }) => run(async { nix_snapshotter::commands::status(&cfg, json).await }),
        None => run(nix_snapshotter::daemon::run(cfg, found, cli.take_over)),
        Some(Command::FuseHolder { .. }) => ExitCode::SUCCESS,
    }
}

fn run<E: std::fmt::Display>(job: impl std::future::Future<Output = Result<(), E>>) -> ExitCode {
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return fail(&e),
    };
    match rt.block_on(job) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("nix-snapshotter: {e}");
    ExitCode::FAILURE
}
