//! `nix-snapshotter bench IMAGE`: cold against warm (and eager) starts of
//! an image already in containerd, on the running daemon. Everything goes
//! through the daemon's admin API: `evict` makes the image's store paths
//! cold before each cold run, `fetch --closure` is the eager baseline (the
//! Go project's way: the whole closure first, then start), `Activity`
//! says exactly what each run downloaded, and `Interpose` routes the
//! caches through a shaping proxy of ours for `--link` while this runs.

mod image;
pub mod link;
pub mod report;
mod run;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tonic::transport::Channel;

use crate::api::admin::admin_client::AdminClient;
use crate::api::admin::{ActivityRequest, EvictRequest, FetchRequest, InterposeRequest, Route, StatusRequest};
pub use link::LinkSpec;
use report::{Download, Report, Run};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Usage(String),
    #[error("no nix-snapshotter daemon answers at {address}: {msg} (start it, or pass --daemon-address)")]
    NoDaemon { address: PathBuf, msg: String },
    #[error("the daemon at {address}: {msg}")]
    Daemon { address: PathBuf, msg: String },
    #[error("no containerd answers at {address}: {msg} (pass --address, or set CONTAINERD_ADDRESS)")]
    NoContainerd { address: PathBuf, msg: String },
    #[error("containerd: {0}")]
    Containerd(String),
    #[error("image {image} is not in containerd's namespace {namespace:?} (load it with `nix-snapshotter image load`, or pass --namespace)")]
    NoImage { image: String, namespace: String },
    #[error("not a Nix image: {0}")]
    NotNix(String),
    #[error("{} not found: ctr comes with containerd (pass --ctr PATH)", .0.display())]
    NoCtr(PathBuf),
    #[error("container {id}: {msg}")]
    Run { id: String, msg: String },
    #[error("container {id}: not ready after {secs} s: no {what} came (raise --timeout?); its output:\n{output}")]
    Timeout {
        id: String,
        secs: u64,
        what: String,
        output: String,
    },
    #[error("{}: {msg}", path.display())]
    Output { path: PathBuf, msg: String },
    #[error("the shaping proxy for {cache}: {msg}")]
    Link { cache: String, msg: String },
    #[error("interrupted: the run under way was stopped and removed, the caches routed back")]
    Interrupted,
}

/// What `bench` was asked to do.
pub struct Options {
    pub image: String,
    pub cmd: Vec<String>,
    pub ready_line: Option<String>,
    pub runs: usize,
    pub eager: bool,
    pub link: Option<LinkSpec>,
    pub json: Option<PathBuf>,
    pub chart: Option<PathBuf>,
    /// containerd's socket and namespace.
    pub address: PathBuf,
    pub namespace: String,
    pub snapshotter: String,
    /// Our daemon's socket.
    pub daemon: PathBuf,
    pub timeout: Duration,
    pub ctr: PathBuf,
}

struct Bench {
    admin: AdminClient<Channel>,
    daemon: PathBuf,
    closure: Vec<String>,
    runner: run::Runner,
    drop_caches: bool,
    progress: bool,
}

pub async fn bench(o: Options) -> Result<Report, BenchError> {
    // Bad arguments first, before anything is touched.
    if o.runs == 0 || o.runs > 1000 {
        return Err(BenchError::Usage(format!("--runs {}: give 1 to 1000", o.runs)));
    }
    let ready = o
        .ready_line
        .as_deref()
        .map(|r| {
            regex::RegexBuilder::new(r)
                .size_limit(1 << 20)
                .build()
                .map_err(|e| BenchError::Usage(format!("--ready-line {r:?}: {e}")))
        })
        .transpose()?;
    for (flag, p) in [("--json", &o.json), ("--chart", &o.chart)] {
        if let Some(p) = p {
            let parent = p
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            if !parent.is_dir() {
                return Err(BenchError::Usage(format!(
                    "{flag} {}: no directory {}",
                    p.display(),
                    parent.display()
                )));
            }
        }
    }
    if let Some(c) = &o.chart {
        if !matches!(c.extension().and_then(|e| e.to_str()), Some("svg" | "png")) {
            return Err(BenchError::Usage(format!(
                "--chart {}: the file must end in .svg or .png",
                c.display()
            )));
        }
    }

    let channel = crate::uds::connect(&o.daemon).await.map_err(|e| BenchError::NoDaemon {
        address: o.daemon.clone(),
        msg: e.to_string(),
    })?;
    let mut admin = AdminClient::new(channel);
    let daemon_err = daemon_err(&o.daemon);
    let status = admin
        .status(StatusRequest {})
        .await
        .map_err(|s| match s.code() {
            tonic::Code::Unavailable | tonic::Code::Unknown => BenchError::NoDaemon {
                address: o.daemon.clone(),
                msg: s.message().to_string(),
            },
            _ => daemon_err(s),
        })?
        .into_inner();
    let roots = image::nix_roots(&o.address, &o.namespace, &o.image).await?;
    let closure = admin
        .fetch(FetchRequest {
            paths: roots.clone(),
            closure: true,
            list_only: true,
        })
        .await
        .map_err(daemon_err)?
        .into_inner()
        .paths;

    // --link: a shaping proxy per cache, the daemon routed through them
    // while `_routed` is open.
    let mut shapers = Vec::new();
    let mut _routed = None;
    if let Some(spec) = o.link {
        let mut routes = Vec::new();
        for c in &status.caches {
            let url = reqwest::Url::parse(&c.url).map_err(|e| BenchError::Link {
                cache: c.url.clone(),
                msg: e.to_string(),
            })?;
            if !matches!(url.scheme(), "http" | "https") {
                eprintln!(
                    "note: {} is not reached over the network: --link leaves it alone",
                    c.url
                );
                continue;
            }
            let host = url.host_str().unwrap_or_default().trim_matches(['[', ']']);
            let port = url.port_or_known_default().unwrap_or(80);
            let upstream = tokio::net::lookup_host((host, port))
                .await
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| BenchError::Link {
                    cache: c.url.clone(),
                    msg: format!("cannot resolve {host}"),
                })?;
            let shaper = link::Shaper::start(upstream, spec)
                .await
                .map_err(|e| BenchError::Link {
                    cache: c.url.clone(),
                    msg: e.to_string(),
                })?;
            routes.push(Route {
                cache: c.url.clone(),
                via: shaper.addr.to_string(),
            });
            shapers.push(shaper);
        }
        if routes.is_empty() {
            return Err(BenchError::Usage(
                "--link: the daemon has no http(s) substituter to shape (see `nix-snapshotter status`)".into(),
            ));
        }
        let mut events = admin
            .interpose(InterposeRequest { routes })
            .await
            .map_err(daemon_err)?
            .into_inner();
        events.message().await.map_err(daemon_err)?;
        _routed = Some(events);
    }

    let root = rustix::process::geteuid().is_root();
    let mut b = Bench {
        admin,
        daemon: o.daemon.clone(),
        closure,
        runner: run::Runner {
            ctr: o.ctr.clone(),
            address: o.address.clone(),
            namespace: o.namespace.clone(),
            snapshotter: o.snapshotter.clone(),
            image: o.image.clone(),
            cmd: o.cmd.clone(),
            ready,
            timeout: o.timeout,
        },
        drop_caches: root,
        progress: std::io::stderr().is_terminal(),
    };
    let mut report = Report {
        image: o.image.clone(),
        command: o.cmd.clone(),
        ready: match &o.ready_line {
            Some(r) => format!("the first line matching {r:?}"),
            None => "the first line of output (or exit)".into(),
        },
        link: o.link.map(|l| l.to_string()),
        closure_paths: b.closure.len(),
        caches_dropped: root,
        summary: Vec::new(),
        runs: Vec::new(),
        slowest: Vec::new(),
    };
    if !root {
        eprintln!("note: not root, so page caches cannot be dropped: cold runs may read some files from memory");
    }
    let modes: &[&'static str] = if o.eager {
        &["cold", "warm", "eager"]
    } else {
        &["cold", "warm"]
    };
    let tag = format!(
        "nsbench-{}-{:06x}",
        std::process::id(),
        rand::random::<u32>() & 0xffffff
    );
    // Ctrl-C or SIGTERM ends the runs early: the run under way is dropped,
    // so its cleanup (task, container, snapshot) runs, and so does the
    // routing's (the daemon's caches back on their own addresses).
    let runs = async {
        for i in 0..o.runs {
            for mode in modes {
                let id = format!("{tag}-{mode}-{i}");
                let r = b.one(mode, i, &id, o.runs).await?;
                report.runs.push(r);
            }
        }
        Ok::<(), BenchError>(())
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| BenchError::Usage(format!("cannot watch for SIGTERM: {e}")))?;
    tokio::select! {
        r = runs => r?,
        _ = tokio::signal::ctrl_c() => return Err(BenchError::Interrupted),
        _ = term.recv() => return Err(BenchError::Interrupted),
    }
    report.summarize();
    drop(_routed);
    drop(shapers);
    let mut out = std::io::stdout().lock();
    report.table(&mut out).map_err(|e| BenchError::Output {
        path: "stdout".into(),
        msg: e.to_string(),
    })?;
    if let Some(p) = &o.json {
        let text = serde_json::to_vec_pretty(&report).map_err(|e| BenchError::Output {
            path: p.clone(),
            msg: e.to_string(),
        })?;
        std::fs::write(p, text).map_err(|e| BenchError::Output {
            path: p.clone(),
            msg: e.to_string(),
        })?;
    }
    if let Some(p) = &o.chart {
        report.chart(p)?;
    }
    Ok(report)
}

/// How long a cold run waits for the image's paths to be unpinned: the
/// last run's snapshot goes when containerd's garbage collector gets to it.
const EVICT_WAIT: Duration = Duration::from_secs(90);

/// The daemon's answer `s` as an error naming the daemon at `address`.
fn daemon_err(address: &Path) -> impl Fn(tonic::Status) -> BenchError + Copy + '_ {
    move |s| BenchError::Daemon {
        address: address.to_path_buf(),
        msg: s.message().to_string(),
    }
}

impl Bench {
    fn err(&self, s: tonic::Status) -> BenchError {
        daemon_err(&self.daemon)(s)
    }

    /// Waits until the daemon has no fetch under way (a prefetch that a
    /// pull or the last run started), so that each run's downloads are its
    /// own and none lands after an eviction.
    async fn settle(&mut self) -> Result<(), BenchError> {
        let start = Instant::now();
        loop {
            let s = self.admin.status(StatusRequest {}).await.map_err(|s| self.err(s))?;
            if s.into_inner().fetches_in_flight == 0 || start.elapsed() > Duration::from_secs(300) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Makes the image's store paths cold: evicted from the daemon's store
    /// (with what it knew of them) and, as root, out of the page cache.
    async fn make_cold(&mut self) -> Result<(), BenchError> {
        self.settle().await?;
        // The last run's snapshot reaches the daemon's Remove only when
        // containerd's garbage collector runs, which it paces by its own
        // pause time (`pause_threshold`): seconds on a loaded machine. Until
        // then the paths are pinned, so they are asked for again.
        let start = Instant::now();
        let mut told = false;
        loop {
            let r = self
                .admin
                .evict(EvictRequest {
                    paths: self.closure.clone(),
                })
                .await;
            match r {
                Ok(_) => break,
                Err(s) if s.code() == tonic::Code::FailedPrecondition && start.elapsed() < EVICT_WAIT => {
                    if self.progress && !told && start.elapsed() > Duration::from_secs(2) {
                        eprintln!(
                            "waiting for containerd to remove the last run's snapshot ({})",
                            s.message()
                        );
                        told = true;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                    return Err(BenchError::Daemon {
                        address: self.daemon.clone(),
                        msg: format!("{} (stop the containers that use the image first)", s.message()),
                    })
                }
                Err(s) => return Err(self.err(s)),
            }
        }
        if self.drop_caches {
            rustix::fs::sync();
            let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
        }
        Ok(())
    }

    async fn last_seq(&mut self) -> Result<u64, BenchError> {
        let r = self.admin.activity(ActivityRequest { after: u64::MAX }).await;
        Ok(r.map_err(|s| self.err(s))?.into_inner().last)
    }

    async fn one(&mut self, mode: &'static str, i: usize, id: &str, runs: usize) -> Result<Run, BenchError> {
        if mode != "warm" {
            self.make_cold().await?;
        }
        let seq = self.last_seq().await?;
        let label = format!("[{mode} {}/{runs}]", i + 1);
        let ticker = self.progress.then(|| {
            let label = label.clone();
            tokio::spawn(async move {
                let start = Instant::now();
                loop {
                    eprint!("\r{label} {:.1} s ", start.elapsed().as_secs_f64());
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        });
        let started = Instant::now();
        let mut prefetch = None;
        let result = async {
            if mode == "eager" {
                // The Go project's way: the whole closure first.
                let r = self
                    .admin
                    .fetch(FetchRequest {
                        paths: self.closure.clone(),
                        closure: false,
                        list_only: false,
                    })
                    .await
                    .map_err(|s| self.err(s))?
                    .into_inner();
                if !r.errors.is_empty() {
                    return Err(BenchError::Daemon {
                        address: self.daemon.clone(),
                        msg: format!("eager fetch of the closure: {}", r.errors.join("; ")),
                    });
                }
                prefetch = Some(started.elapsed().as_secs_f64());
            }
            self.runner.run(id).await
        }
        .await;
        if let Some(t) = ticker {
            t.abort();
            eprint!("\r");
        }
        let seconds = prefetch.unwrap_or(0.0) + result?;
        // What the start set going (a prefetch still running) is its too.
        self.settle().await?;
        let activity = self
            .admin
            .activity(ActivityRequest { after: seq })
            .await
            .map_err(|s| self.err(s))?
            .into_inner();
        if activity.first_kept > seq + 1 && seq > 0 {
            eprintln!("note: more downloads than the daemon keeps a record of: the list is not complete");
        }
        let downloads: Vec<Download> = activity
            .downloads
            .into_iter()
            .map(|d| Download {
                path: d.path,
                kind: d.kind,
                bytes: d.bytes,
                seconds: d.micros as f64 / 1e6,
                error: d.error,
            })
            .collect();
        let mut fetched_paths: Vec<String> = downloads
            .iter()
            .filter(|d| d.error.is_empty() && d.bytes > 0)
            .map(|d| d.path.clone())
            .collect();
        fetched_paths.sort();
        fetched_paths.dedup();
        let fetched_bytes = downloads.iter().map(|d| d.bytes).sum();
        eprintln!(
            "{label} {seconds:.3} s, {} store paths fetched, {}",
            fetched_paths.len(),
            crate::commands::human(fetched_bytes)
        );
        Ok(Run {
            mode,
            index: i,
            seconds,
            prefetch_seconds: prefetch,
            fetched_paths,
            fetched_bytes,
            downloads,
        })
    }
}
