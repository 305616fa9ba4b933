//! The `nix-snapshotter` command: with no subcommand, runs the daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use nix_snapshotter::config::{Config, Defaults};
use nix_snapshotter::rootless::{self, Net};

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
    /// Run inside rootless containerd's namespaces (those of the process in
    /// `$XDG_RUNTIME_DIR/containerd-rootless/child_pid`), with the user's
    /// paths as defaults. Implied defaults, not the join, when not root.
    #[arg(long)]
    rootless: bool,
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
    /// The access profile the daemon recorded (what containers read by the
    /// chunk), to publish with an image (`image build --profile`).
    Profile {
        /// Configuration file (TOML), as for the daemon.
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Start recording afresh (after printing what was recorded).
        #[arg(long)]
        reset: bool,
        /// Write it to FILE instead of standard output.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Time cold against warm (and eager) starts of an image already in
    /// containerd, on the running daemon: what is fetched, how long it takes.
    Bench {
        /// containerd's socket (default: $CONTAINERD_ADDRESS, else
        /// /run/containerd/containerd.sock, or the rootless one when not root).
        #[arg(short, long, value_name = "CONTAINERD_SOCK", env = "CONTAINERD_ADDRESS")]
        address: Option<PathBuf>,
        /// containerd namespace the image is in.
        #[arg(short, long, value_name = "NS", default_value = "default")]
        namespace: String,
        /// Snapshotter the containers run on (the daemon's, as containerd names it).
        #[arg(long, default_value = "nix")]
        snapshotter: String,
        /// The daemon's socket (default: its configured `address`).
        #[arg(long, value_name = "SOCK")]
        daemon_address: Option<PathBuf>,
        /// Ready at the first output line matching this regular expression
        /// (default: the first line, or the command's exit).
        #[arg(long, value_name = "REGEX")]
        ready_line: Option<String>,
        /// Runs of each mode.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Also time the Go project's way: the whole closure fetched first.
        #[arg(long)]
        eager: bool,
        /// Shape the daemon's cache traffic as a WAN link would, e.g. 50ms,100mbit.
        #[arg(long, value_name = "RTT,RATE")]
        link: Option<nix_snapshotter::bench::LinkSpec>,
        /// Write the results as JSON.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
        /// Draw the medians: FILE.svg, or FILE.png (needs rsvg-convert).
        #[arg(long, value_name = "FILE")]
        chart: Option<PathBuf>,
        /// Give up on a run not ready after this many seconds.
        #[arg(long, value_name = "SECS", default_value_t = 120)]
        timeout: u64,
        /// The ctr binary that starts the containers.
        #[arg(long, value_name = "PATH", default_value = "ctr")]
        ctr: PathBuf,
        /// Image name, as containerd lists it.
        image: String,
        /// Command and arguments to run instead of the image's (after --).
        #[arg(last = true, value_name = "CMD")]
        cmd: Vec<String>,
    },
    /// Publish binary caches that lazy readers can read by file (signed
    /// file indexes, seekable zstd NARs; stock Nix reads them as usual).
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Rootless operation: containerd under rootlesskit for an unprivileged user.
    #[command(subcommand)]
    Rootless(RootlessCommand),
    /// Hold the FUSE session while no daemon serves it (started by the daemon).
    #[command(hide = true)]
    FuseHolder {
        /// Socket to answer on.
        #[arg(long, value_name = "SOCK")]
        socket: PathBuf,
    },
}

#[derive(Subcommand)]
enum CacheCommand {
    /// Copy the closures of store paths from a local Nix store into a
    /// file:// cache directory, as `nix copy --to file://DIR` does, with
    /// file indexes and seekable NARs.
    Push {
        /// The cache directory (created if missing).
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
        /// Nix secret key file (`nix key generate-secret`).
        #[arg(long, value_name = "FILE")]
        secret_key: PathBuf,
        /// Where the store is: paths are read from STORE_ROOT/nix/store.
        #[arg(long, value_name = "DIR", default_value = "/")]
        store_root: PathBuf,
        #[command(flatten)]
        layout: LayoutArgs,
        /// Store paths (/nix/store/<hash>-<name>).
        #[arg(required = true, value_name = "STORE_PATH")]
        paths: Vec<String>,
    },
    /// Give every store path of a cache directory (one `nix copy` wrote,
    /// say) a seekable NAR and a signed file index.
    Index {
        /// Nix secret key file (`nix key generate-secret`).
        #[arg(long, value_name = "FILE")]
        secret_key: PathBuf,
        #[command(flatten)]
        layout: LayoutArgs,
        /// The cache directory.
        dir: PathBuf,
    },
}

#[derive(clap::Args)]
struct LayoutArgs {
    /// Bytes per hashed chunk of a file (a power of two, 4KiB to 4MiB).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "64KiB")]
    chunk_size: u64,
    /// Uncompressed bytes per zstd frame (the least a ranged read inflates).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "64KiB")]
    frame_size: u64,
    /// zstd level: 15 makes the frames a cold start reads ~8 % smaller
    /// than 9 (measured on python's binary), at a third of the speed (on
    /// every core).
    #[arg(long, default_value_t = 15)]
    level: i32,
}

impl LayoutArgs {
    fn layout(&self) -> Result<nix_snapshotter::publish::Layout, String> {
        let chunk = u32::try_from(self.chunk_size).unwrap_or(0);
        if !(4096..=4 << 20).contains(&chunk) || !chunk.is_power_of_two() {
            return Err(format!(
                "--chunk-size {}: a power of two from 4KiB to 4MiB",
                self.chunk_size
            ));
        }
        let frame = u32::try_from(self.frame_size).unwrap_or(0);
        if !(4096..=64 << 20).contains(&frame) {
            return Err(format!("--frame-size {}: from 4KiB to 64MiB", self.frame_size));
        }
        Ok(nix_snapshotter::publish::Layout {
            chunk_size: chunk,
            frame_size: frame,
            level: self.level,
        })
    }
}

fn cache_command(c: CacheCommand) -> ExitCode {
    use nix_snapshotter::publish;
    let key_of = |path: &std::path::Path| -> Result<nix_snapshotter::nixfmt::signature::SecretKey, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        nix_snapshotter::nixfmt::signature::SecretKey::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    };
    let result = match c {
        CacheCommand::Push {
            to,
            secret_key,
            store_root,
            layout,
            paths,
        } => (|| {
            let key = key_of(&secret_key)?;
            let layout = layout.layout()?;
            let roots = paths
                .iter()
                .map(|p| nix_snapshotter::nixfmt::StorePath::parse(p).map_err(|e| e.to_string()))
                .collect::<Result<Vec<_>, _>>()?;
            publish::push(&to, &key, &store_root, &roots, &layout).map_err(|e| e.to_string())
        })(),
        CacheCommand::Index {
            secret_key,
            layout,
            dir,
        } => (|| {
            let key = key_of(&secret_key)?;
            let layout = layout.layout()?;
            publish::index(&dir, &key, &layout).map_err(|e| e.to_string())
        })(),
    };
    match result {
        Ok(r) => {
            for p in &r.published {
                println!("{p}");
            }
            eprintln!(
                "published {} store paths ({} already there): {} NAR bytes as {} compressed",
                r.published.len(),
                r.present.len(),
                nix_snapshotter::commands::human(r.nar_bytes),
                nix_snapshotter::commands::human(r.compressed_bytes)
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

#[derive(Subcommand)]
enum RootlessCommand {
    /// Run containerd under rootlesskit, with us as its `nix` snapshotter
    /// (state under $XDG_RUNTIME_DIR and $XDG_DATA_HOME). Then start the
    /// daemon with `nix-snapshotter --rootless`.
    Containerd {
        /// How containerd reaches the network.
        #[arg(long, value_enum, default_value_t = Net::Slirp4netns)]
        net: Net,
        /// The containerd program.
        #[arg(long, value_name = "PROGRAM", default_value = "containerd")]
        containerd: PathBuf,
        /// containerd's configuration, used as it is (default: one written
        /// for the user's directories, with `nix` as a proxy snapshotter).
        #[arg(long, value_name = "FILE", conflicts_with = "extra_config")]
        containerd_config: Option<PathBuf>,
        /// TOML merged over the generated configuration (tables key by key).
        #[arg(long, value_name = "FILE")]
        extra_config: Option<PathBuf>,
    },
    /// rootlesskit's child (run by `rootless containerd`): prepares the
    /// namespace and becomes containerd.
    #[command(hide = true)]
    ContainerdChild {
        #[arg(long, value_name = "PROGRAM")]
        containerd: PathBuf,
        #[arg(long, value_name = "FILE")]
        containerd_config: PathBuf,
    },
    /// Check what rootless operation needs from this machine and user.
    Check {
        /// How containerd will reach the network.
        #[arg(long, value_enum, default_value_t = Net::Slirp4netns)]
        net: Net,
    },
    /// Print the user's rootless paths as shell variables
    /// (CONTAINERD_ADDRESS, the sockets, the roots, rootlesskit's child).
    Env,
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
        /// A store path of the closure holding an access profile (a copy of
        /// a daemon's `<root>/access-profile`): pulls prefetch what it lists.
        #[arg(long, value_name = "STORE_PATH")]
        profile: Option<String>,
        /// Output archive.
        out: PathBuf,
    },
    /// Import an image archive into containerd and unpack it for a snapshotter,
    /// passing the Nix layer's labels (no ctr or Transfer service needed).
    Load {
        /// containerd's socket (default: $CONTAINERD_ADDRESS, else
        /// /run/containerd/containerd.sock, or the rootless one when not root).
        #[arg(short, long, value_name = "CONTAINERD_SOCK", env = "CONTAINERD_ADDRESS")]
        address: Option<PathBuf>,
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
    if let Some(Command::Rootless(c)) = &cli.command {
        return rootless_command(c);
    }
    let cli = match cli.command {
        Some(Command::Cache(c)) => return cache_command(c),
        _ => cli,
    };
    // Paths as the user who started us sees them: the rootless join below
    // makes us root in the user namespace.
    let defaults = match defaults(cli.rootless) {
        Ok(d) => d,
        Err(e) => return fail(&e),
    };
    let mut lifeline = None;
    if cli.rootless && cli.command.is_none() {
        // Before any thread: the kernel moves only a single-threaded
        // process into a user namespace.
        let joined = rootless::Dirs::from_env()
            .and_then(|d| rootless::child_pid(&d))
            .and_then(|pid| {
                let l = rootless::Lifeline::open(pid)?;
                rootless::join(pid)?;
                Ok(l)
            });
        match joined {
            Ok(l) => lifeline = Some(l),
            Err(e) => return fail(&e),
        }
        if let Some(msg) = rootless::cgroup_note() {
            tracing::info!("{msg}");
        }
    }
    // Before any thread: systemd's stored descriptors come with the environment.
    let found = nix_snapshotter::keeper::Found::from_environment();
    // The store subcommands also take --config after the subcommand.
    let config_file = match &cli.command {
        Some(Command::Fetch { config: Some(c), .. })
        | Some(Command::Gc { config: Some(c), .. })
        | Some(Command::Evict { config: Some(c), .. })
        | Some(Command::Status { config: Some(c), .. })
        | Some(Command::Profile { config: Some(c), .. }) => Some(c.clone()),
        _ => cli.config.clone(),
    };
    let mut cfg = match Config::load_with(config_file.as_deref(), &defaults) {
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
            profile,
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
                profile,
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
            let address = address.unwrap_or(defaults.containerd_address);
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
        Some(Command::Profile { reset, output, .. }) => {
            run(async { nix_snapshotter::commands::profile(&cfg, reset, output.as_deref()).await })
        }
        Some(Command::Bench {
            address,
            namespace,
            snapshotter,
            daemon_address,
            ready_line,
            runs,
            eager,
            link,
            json,
            chart,
            timeout,
            ctr,
            image,
            cmd,
        }) => run(async {
            let opts = nix_snapshotter::bench::Options {
                image,
                cmd,
                ready_line,
                runs,
                eager,
                link,
                json,
                chart,
                address: address.unwrap_or(defaults.containerd_address),
                namespace,
                snapshotter,
                daemon: daemon_address.unwrap_or(cfg.address.clone()),
                timeout: std::time::Duration::from_secs(timeout),
                ctr,
            };
            nix_snapshotter::bench::bench(opts).await.map(drop)
        }),
        None => run(async move {
            let lifeline = lifeline.map(|l| Box::pin(l.ended()) as nix_snapshotter::daemon::Lifeline);
            nix_snapshotter::daemon::run(cfg, found, cli.take_over, lifeline).await
        }),
        Some(Command::FuseHolder { .. }) | Some(Command::Rootless(_)) | Some(Command::Cache(_)) => ExitCode::SUCCESS,
    }
}

/// The rootless user's paths when asked for or when not root (and the
/// user's directories are known), else the system's.
fn defaults(rootless: bool) -> Result<Defaults, rootless::RootlessError> {
    if !rootless && rustix::process::geteuid().is_root() {
        return Ok(Defaults::system());
    }
    match rootless::Dirs::from_env() {
        Ok(d) => Ok(Defaults::rootless(&d)),
        Err(e) if rootless => Err(e),
        Err(_) => Ok(Defaults::system()),
    }
}

fn rootless_command(c: &RootlessCommand) -> ExitCode {
    use rootless::Dirs;
    let result = match c {
        // rootlesskit's child: the user's directories are in its arguments.
        RootlessCommand::ContainerdChild {
            containerd,
            containerd_config,
        } => rootless::exec_child(containerd, containerd_config),
        RootlessCommand::Containerd {
            net,
            containerd,
            containerd_config,
            extra_config,
        } => {
            let config = match containerd_config {
                Some(c) => rootless::ContainerdConfig::Given(c.clone()),
                None => rootless::ContainerdConfig::Generated {
                    extra: extra_config.clone(),
                },
            };
            Dirs::from_env().and_then(|dirs| rootless::exec_containerd(&dirs, *net, containerd, &config))
        }
        // The runtime directory is a prerequisite too.
        RootlessCommand::Check { net } => Dirs::from_env()
            .and_then(|_| rootless::check_prerequisites(&rootless::user_name(), *net == Net::Slirp4netns))
            .map(|()| {
                println!("ready for rootless operation");
                if let Some(msg) = rootless::cgroup_note() {
                    println!("note: {msg}");
                }
            }),
        RootlessCommand::Env => Dirs::from_env().map(|dirs| print!("{}", rootless::env_text(&dirs))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
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
