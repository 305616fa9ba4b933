//! One-shot subcommands that work on the daemon's state directly:
//! `fetch` and `gc`. They open the state database, which the running daemon
//! holds, so they refuse (with a clear message) while it runs on that root.

use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;

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
    #[error("{failed} of {total} paths could not be fetched:\n  {}", messages.join("\n  "))]
    Failed {
        failed: usize,
        total: usize,
        messages: Vec<String>,
    },
}

async fn open(cfg: &Config) -> Result<Arc<Store>, CommandError> {
    let db = crate::db::open_root(&cfg.root)?;
    Ok(store::open_from_config(cfg, db).await?)
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

/// `nix-snapshotter fetch [--closure] PATH...`
pub async fn fetch(cfg: &Config, paths: &[String], closure: bool) -> Result<(), CommandError> {
    let roots = paths
        .iter()
        .map(|p| StorePath::parse(p))
        .collect::<Result<Vec<_>, _>>()?;
    let started = Instant::now();
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

    let parallel = cfg.fetch.max_parallel.max(1);
    let results: Vec<_> = futures::stream::iter(targets.iter().map(|p| {
        let store = store.clone();
        async move { (p, store.ensure(p).await) }
    }))
    .buffer_unordered(parallel)
    .collect()
    .await;
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
