//! The store subcommands: `fetch`, `gc`, `evict`, `status`. While a daemon
//! answers on the socket they ask it (its admin API); otherwise they open
//! the state in the root directly (which a daemon serving elsewhere holds:
//! then they refuse, with a clear message).

use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::api::admin::admin_client::AdminClient;
use crate::api::admin::{EvictRequest, FetchRequest, GcRequest, ProfileRequest, StatusRequest, StatusResponse};
use crate::config::Config;
use crate::nixfmt::StorePath;
use crate::store::{self, Location, Store};

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("{0}")]
    Setup(#[from] store::SetupError),
    #[error("{0}")]
    State(#[from] crate::error::Error),
    #[error("{0}")]
    Store(#[from] store::StoreError),
    #[error("{0}")]
    BadPath(#[from] crate::nixfmt::store_path::StorePathError),
    #[error("the daemon at {address}: {status}", status = .status.message())]
    Daemon { address: String, status: tonic::Status },
    #[error("{failed} of {total} paths could not be fetched:\n  {}", messages.join("\n  "))]
    Failed {
        failed: usize,
        total: usize,
        messages: Vec<String>,
    },
}

/// The running daemon's admin API on `address`, if one answers there.
async fn daemon(address: &std::path::Path) -> Option<AdminClient<tonic::transport::Channel>> {
    let channel = crate::uds::connect(address).await.ok()?;
    Some(AdminClient::new(channel))
}

fn daemon_err(address: &std::path::Path) -> impl FnOnce(tonic::Status) -> CommandError {
    let address = address.display().to_string();
    move |status| CommandError::Daemon { address, status }
}

async fn open(cfg: &Config) -> Result<Arc<Store>, CommandError> {
    let db = crate::db::open_root(&cfg.root)?;
    // No daemon pins what live snapshots need (containers may be running
    // on a session kept for the next daemon): pin it here, from the
    // snapshot records, so that evict and gc spare it as the daemon would.
    let pinned = crate::snapshots::pinned_paths(db.clone())?;
    let store = store::open_from_config(cfg, db).await?;
    store.set_pinned(pinned);
    Ok(store)
}

pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `nix-snapshotter fetch [--closure] PATH...`: prewarms the running
/// daemon's store, or the root's when no daemon runs.
pub async fn fetch(cfg: &Config, paths: &[String], closure: bool) -> Result<(), CommandError> {
    let roots = paths
        .iter()
        .map(|p| StorePath::parse(p))
        .collect::<Result<Vec<_>, _>>()?;
    let started = Instant::now();
    if let Some(mut d) = daemon(&cfg.address).await {
        let r = d
            .fetch(FetchRequest {
                paths: paths.to_vec(),
                closure,
                list_only: false,
            })
            .await
            .map_err(daemon_err(&cfg.address))?
            .into_inner();
        for p in &r.paths {
            println!("{p}");
        }
        eprintln!(
            "the daemon fetched {} paths ({} downloaded) in {:.2} s; {} now local",
            r.fetched,
            human(r.bytes_downloaded),
            started.elapsed().as_secs_f64(),
            r.paths.len()
        );
        return if r.errors.is_empty() {
            Ok(())
        } else {
            Err(CommandError::Failed {
                failed: r.errors.len(),
                total: r.errors.len() + r.paths.len(),
                messages: r.errors,
            })
        };
    }
    let store = open(cfg).await?;
    let targets = if closure { store.closure(&roots).await? } else { roots };

    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    if let Some(b) = &bar {
        // The total is what the narinfos announce for paths not yet here.
        let mut total = 0;
        for p in &targets {
            if store.local(p).is_none() {
                if let Ok(f) = store.narinfo(p).await {
                    total += f.info.file_size.unwrap_or(f.info.nar_size);
                }
            }
        }
        b.set_length(total);
    }
    let ticker = bar.clone().map(|b| {
        let store = store.clone();
        tokio::spawn(async move {
            loop {
                b.set_position(store.counters.bytes_downloaded.load(Ordering::Relaxed));
                b.set_message(format!(
                    "{} paths",
                    store.counters.paths_fetched.load(Ordering::Relaxed)
                ));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    });

    let results = crate::admin::fetch_all(&store, &targets, cfg.fetch.max_parallel).await;
    if let Some(t) = ticker {
        t.abort();
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }

    let mut failures = Vec::new();
    let (mut host, mut present) = (0, 0);
    for (p, r) in &results {
        match r {
            Ok(loc) => {
                if matches!(loc, Location::Host(_)) {
                    host += 1;
                }
                println!("{p}");
            }
            Err(e) => failures.push(e.to_string()),
        }
    }
    let fetched = store.counters.paths_fetched.load(Ordering::Relaxed) as usize;
    present += results.len() - failures.len() - fetched - host;
    store.flush_uses()?;
    eprintln!(
        "fetched {fetched} paths ({present} already present, {host} from the host store) in {:.2} s: {} downloaded, {} on disk",
        started.elapsed().as_secs_f64(),
        human(store.counters.bytes_downloaded.load(Ordering::Relaxed)),
        human(store.counters.bytes_on_disk.load(Ordering::Relaxed)),
    );
    if failures.is_empty() {
        Ok(())
    } else {
        Err(CommandError::Failed {
            failed: failures.len(),
            total: results.len(),
            messages: failures,
        })
    }
}

/// `nix-snapshotter gc [--max-size SIZE]`
pub async fn gc(cfg: &Config, max_size: Option<u64>) -> Result<(), CommandError> {
    if let Some(mut d) = daemon(&cfg.address).await {
        let r = d
            .gc(GcRequest { max_size })
            .await
            .map_err(daemon_err(&cfg.address))?
            .into_inner();
        for p in &r.removed {
            println!("removed {p}");
        }
        eprintln!(
            "freed {} ({} paths); {} in the store; {} in use kept",
            human(r.freed),
            r.removed.len(),
            human(r.remaining),
            r.kept_in_use
        );
        return Ok(());
    }
    let store = open(cfg).await?;
    let target = max_size.unwrap_or(cfg.store.max_size.0);
    let report = tokio::task::spawn_blocking(move || store.gc(target))
        .await
        .map_err(|e| crate::error::Error::Database(e.to_string()))??;
    for p in &report.removed {
        println!("removed {p}");
    }
    eprintln!(
        "freed {} ({} paths); {} in the store; {} in use kept",
        human(report.freed),
        report.removed.len(),
        human(report.remaining),
        report.kept_in_use
    );
    Ok(())
}

/// `nix-snapshotter evict PATH...`: makes store paths cold again.
pub async fn evict(cfg: &Config, paths: &[String]) -> Result<(), CommandError> {
    let parsed = paths
        .iter()
        .map(|p| StorePath::parse(p))
        .collect::<Result<Vec<_>, _>>()?;
    let (evicted, absent, freed) = match daemon(&cfg.address).await {
        Some(mut d) => {
            let r = d
                .evict(EvictRequest { paths: paths.to_vec() })
                .await
                .map_err(daemon_err(&cfg.address))?
                .into_inner();
            (r.evicted, r.absent, r.freed)
        }
        None => {
            let store = open(cfg).await?;
            let r = tokio::task::spawn_blocking(move || store.evict(&parsed))
                .await
                .map_err(|e| crate::error::Error::Database(e.to_string()))??;
            (r.evicted, r.absent, r.freed)
        }
    };
    for p in &evicted {
        println!("evicted {p}");
    }
    for p in &absent {
        println!("not local {p}");
    }
    eprintln!("freed {} ({} paths)", human(freed), evicted.len());
    Ok(())
}

/// `nix-snapshotter status [--json]`
/// `nix-snapshotter profile [--reset] [--output FILE]`: the access profile
/// the running daemon recorded (or, with none running, the root's last
/// one), to publish with an image (`image build --profile`, buildImage's
/// `accessProfile`).
pub async fn profile(cfg: &Config, reset: bool, output: Option<&std::path::Path>) -> Result<(), CommandError> {
    let bad = |m: String| CommandError::State(crate::error::Error::InvalidArgument(m));
    let (text, ranges) = match daemon(&cfg.address).await {
        Some(mut d) => {
            let r = d
                .profile(ProfileRequest { reset })
                .await
                .map_err(daemon_err(&cfg.address))?
                .into_inner();
            (r.text, r.ranges)
        }
        None if reset => {
            return Err(bad(format!(
                "--reset needs a running daemon (none answers at {})",
                cfg.address.display()
            )))
        }
        None => {
            let file = cfg.root.join("access-profile");
            let text = std::fs::read_to_string(&file).map_err(|e| {
                bad(format!(
                    "no daemon answers at {} and {} cannot be read: {e}",
                    cfg.address.display(),
                    file.display()
                ))
            })?;
            let ranges = crate::nixfmt::profile::parse(&text)
                .map_err(|e| bad(format!("{}: {e}", file.display())))?
                .ranges
                .len() as u64;
            (text, ranges)
        }
    };
    match output {
        Some(p) => std::fs::write(p, &text).map_err(|e| bad(format!("{}: {e}", p.display())))?,
        None => print!("{text}"),
    }
    eprintln!("{ranges} ranges");
    Ok(())
}

pub async fn status(cfg: &Config, json: bool) -> Result<(), CommandError> {
    let (daemon_runs, s) = match daemon(&cfg.address).await {
        Some(mut d) => (
            true,
            d.status(StatusRequest {})
                .await
                .map_err(daemon_err(&cfg.address))?
                .into_inner(),
        ),
        None => {
            let store = open(cfg).await?;
            let (paths, bytes) = store.usage()?;
            (
                false,
                StatusResponse {
                    root: cfg.root.display().to_string(),
                    store_paths: paths,
                    store_bytes: bytes,
                    store_max_size: cfg.store.max_size.0,
                    store_open: true,
                    ..Default::default()
                },
            )
        }
    };
    if json {
        println!("{}", status_json(&s, daemon_runs, &cfg.address));
        return Ok(());
    }
    if daemon_runs {
        println!("daemon:   serving on {} (root {})", cfg.address.display(), s.root);
        let session = match (s.session_kept, s.session_resumed) {
            (true, true) => "kept for the next daemon; resumed from the last one",
            (true, false) => "kept for the next daemon",
            (false, _) => "not kept: running containers lose /nix/store when the daemon stops",
        };
        println!("session:  {session}");
        println!(
            "fuse:     {} views, {} nodes, {} open files",
            s.views.len(),
            s.fuse_nodes,
            s.open_files
        );
    } else {
        println!(
            "daemon:   none answers on {}; the state in {}:",
            cfg.address.display(),
            s.root
        );
    }
    if !s.store_open {
        println!("store:    not open yet (it opens in the background; the daemon's log says why if it cannot)");
        return Ok(());
    }
    let bound = if s.store_max_size == 0 {
        "no bound".to_string()
    } else {
        format!("bound {}", human(s.store_max_size))
    };
    println!(
        "store:    {} paths, {} ({bound}), {} pinned, {} fetches in flight, {} evictions",
        s.store_paths,
        human(s.store_bytes),
        s.pinned,
        s.fetches_in_flight,
        s.evictions
    );
    for c in &s.caches {
        println!(
            "cache:    {}: {} requests, {} NARs, {}, {} errors, {} retries{}",
            c.url,
            c.requests,
            c.nar_fetches,
            human(c.bytes),
            c.errors,
            c.retries,
            if c.last_error.is_empty() {
                String::new()
            } else {
                format!(" (last: {})", c.last_error)
            }
        );
    }
    Ok(())
}

fn status_json(s: &StatusResponse, daemon_runs: bool, address: &std::path::Path) -> serde_json::Value {
    serde_json::json!({
        "daemon": daemon_runs,
        "address": address.display().to_string(),
        "root": s.root,
        "views": s.views,
        "session": { "kept": s.session_kept, "resumed": s.session_resumed },
        "fuse": { "nodes": s.fuse_nodes, "open_files": s.open_files },
        "store": {
            "open": s.store_open,
            "paths": s.store_paths,
            "bytes": s.store_bytes,
            "max_size": s.store_max_size,
            "pinned": s.pinned,
            "fetches_in_flight": s.fetches_in_flight,
            "evictions": s.evictions,
        },
        "caches": s.caches.iter().map(|c| serde_json::json!({
            "url": c.url,
            "requests": c.requests,
            "nar_fetches": c.nar_fetches,
            "bytes": c.bytes,
            "errors": c.errors,
            "retries": c.retries,
            "last_error": c.last_error,
        })).collect::<Vec<_>>(),
    })
}
