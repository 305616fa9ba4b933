//! Prometheus metrics on the optional `metrics_address` (text exposition
//! format 0.0.4, served over plain HTTP: `GET /metrics`).
//!
//! Counters live where they are counted (a cache's [`CacheStats`], the
//! store's counters, the FUSE filesystem's request counts); this module owns
//! only the histograms and the snapshot operation counts, and renders
//! everything on each scrape.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::cache::CacheStats;
use crate::snapshots::nix::StoreSlot;
use crate::snapshots::Snapshotter;

/// Upper bounds (seconds) of the latency buckets: from a local hit to a
/// fetch that hits the default time bound.
const BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// A latency histogram (cumulative buckets on render).
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| s <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros().min(u128::from(u64::MAX)) as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, le) in BUCKETS.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// The daemon's own metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    /// How long a FUSE request waited for its store path to be fetched.
    pub fuse_wait_seconds: Arc<Histogram>,
    /// Snapshot service calls by (operation, gRPC code).
    snapshot_ops: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
}

impl Metrics {
    pub fn snapshot_op(&self, op: &'static str, result: &'static str) {
        if let Ok(mut m) = self.snapshot_ops.lock() {
            *m.entry((op, result)).or_insert(0) += 1;
        }
    }

    /// The exposition text: everything the daemon counts now.
    pub fn render(&self, sn: &Snapshotter, store: &StoreSlot) -> String {
        let mut out = String::new();
        if let Some(store) = store.get() {
            let caches: Vec<(String, &CacheStats)> = store
                .opened_caches()
                .iter()
                .map(|c| (c.url().to_string(), c.stats.as_ref()))
                .collect();
            type Pick = fn(&CacheStats) -> u64;
            let per_cache: [(&str, &str, Pick); 5] = [
                (
                    "cache_requests_total",
                    "Small files (narinfo, .ls) asked of each cache.",
                    |s| s.requests.load(Ordering::Relaxed),
                ),
                ("cache_nar_fetches_total", "NARs fetched from each cache.", |s| {
                    s.nar_fetches.load(Ordering::Relaxed)
                }),
                ("cache_bytes_total", "NAR bytes received from each cache.", |s| {
                    s.bytes.load(Ordering::Relaxed)
                }),
                (
                    "cache_errors_total",
                    "Requests to each cache that failed for good.",
                    |s| s.errors.load(Ordering::Relaxed),
                ),
                (
                    "cache_retries_total",
                    "Retried requests and resumed transfers per cache.",
                    |s| s.retries.load(Ordering::Relaxed),
                ),
            ];
            for (name, help, pick) in per_cache {
                header(&mut out, name, help, "counter");
                for (url, s) in &caches {
                    let _ = writeln!(out, "nix_snapshotter_{name}{{cache=\"{}\"}} {}", escape(url), pick(s));
                }
            }
            if let Ok((paths, bytes)) = store.usage() {
                gauge(&mut out, "store_paths", "Store paths in the local store.", paths);
                gauge(&mut out, "store_bytes", "Disk space the local store uses.", bytes);
            }
            gauge(
                &mut out,
                "store_max_bytes",
                "The local store's size bound (0: none).",
                store.max_size(),
            );
            gauge(
                &mut out,
                "store_pinned_paths",
                "Store paths live snapshots need.",
                store.pinned_count() as u64,
            );
            gauge(
                &mut out,
                "fetches_in_flight",
                "Store path fetches under way.",
                store.in_flight() as u64,
            );
            counter(
                &mut out,
                "evictions_total",
                "Store paths evicted.",
                store.counters.evictions.load(Ordering::Relaxed),
            );
            counter(
                &mut out,
                "fetched_paths_total",
                "Store paths fetched.",
                store.counters.paths_fetched.load(Ordering::Relaxed),
            );
        }
        if let Some(store) = store.get() {
            store.counters.fetch_seconds.render(
                &mut out,
                "nix_snapshotter_fetch_duration_seconds",
                "Time to fetch a store path (download, verify, unpack).",
            );
        }
        self.fuse_wait_seconds.render(
            &mut out,
            "nix_snapshotter_fuse_fetch_wait_seconds",
            "Time a FUSE request waited for its store path to be fetched.",
        );
        if let Some(f) = sn.fuse_status() {
            gauge(
                &mut out,
                "fuse_views",
                "FUSE views (closures shown to containers).",
                f.views.len() as u64,
            );
            gauge(&mut out, "fuse_nodes", "Nodes in the FUSE inode table.", f.nodes as u64);
            gauge(
                &mut out,
                "fuse_open_files",
                "Files open through the FUSE store.",
                f.open_files as u64,
            );
            gauge(
                &mut out,
                "fuse_session_kept",
                "1 when the FUSE session is kept across daemon restarts.",
                u64::from(f.kept),
            );
            header(
                &mut out,
                "fuse_requests_total",
                "FUSE requests served, by operation.",
                "counter",
            );
            for (op, n) in sn.fuse_requests() {
                let _ = writeln!(out, "nix_snapshotter_fuse_requests_total{{op=\"{op}\"}} {n}");
            }
        }
        header(
            &mut out,
            "snapshot_operations_total",
            "Snapshot service calls, by operation and gRPC result.",
            "counter",
        );
        if let Ok(m) = self.snapshot_ops.lock() {
            for ((op, result), n) in m.iter() {
                let _ = writeln!(
                    out,
                    "nix_snapshotter_snapshot_operations_total{{op=\"{op}\",result=\"{result}\"}} {n}"
                );
            }
        }
        out
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(
        out,
        "# HELP nix_snapshotter_{name} {help}\n# TYPE nix_snapshotter_{name} {kind}"
    );
}

fn gauge(out: &mut String, name: &str, help: &str, v: u64) {
    header(out, name, help, "gauge");
    let _ = writeln!(out, "nix_snapshotter_{name} {v}");
}

fn counter(out: &mut String, name: &str, help: &str, v: u64) {
    header(out, name, help, "counter");
    let _ = writeln!(out, "nix_snapshotter_{name} {v}");
}

/// A label value as the exposition format wants it.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The name of a gRPC code, for the `result` label.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "ok",
        Cancelled => "cancelled",
        InvalidArgument => "invalid_argument",
        DeadlineExceeded => "deadline_exceeded",
        NotFound => "not_found",
        AlreadyExists => "already_exists",
        PermissionDenied => "permission_denied",
        ResourceExhausted => "resource_exhausted",
        FailedPrecondition => "failed_precondition",
        Aborted => "aborted",
        OutOfRange => "out_of_range",
        Unimplemented => "unimplemented",
        Internal => "internal",
        Unavailable => "unavailable",
        DataLoss => "data_loss",
        Unauthenticated => "unauthenticated",
        Unknown => "unknown",
    }
}

/// The most of a request we read: scrapers send a line and a few headers.
const MAX_REQUEST: usize = 8 * 1024;
/// Connections served at once.
const MAX_CONNECTIONS: usize = 8;

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>, sn: Arc<Snapshotter>, store: StoreSlot) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(address = %addr, "serving metrics");
    }
    // Scrapers come one at a time; a flood of connections waits here
    // instead of taking descriptors and blocking threads from fetches.
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (mut conn, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "accepting a metrics connection");
                continue;
            }
        };
        let (metrics, sn, store) = (metrics.clone(), sn.clone(), store.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let request = tokio::time::timeout(Duration::from_secs(5), read_head(&mut conn)).await;
            let response = match request {
                Ok(Some(line)) if line.starts_with("GET /metrics ") || line == "GET /metrics" => {
                    let body = tokio::task::spawn_blocking(move || metrics.render(&sn, &store))
                        .await
                        .unwrap_or_default();
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                }
                Ok(Some(_)) => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string(),
                _ => return,
            };
            let write = async {
                conn.write_all(response.as_bytes()).await?;
                conn.shutdown().await
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), write).await;
        });
    }
}

/// The request line, once the whole head arrived (None: too long or cut).
async fn read_head(conn: &mut tokio::net::TcpStream) -> Option<String> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut chunk).await.ok()?;
        if n == 0 || buf.len() + n > MAX_REQUEST {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    head.lines().next().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_with_sum_and_count() {
        let h = Histogram::default();
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_millis(200));
        h.observe(Duration::from_secs(100));
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"0.005\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.25\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"60\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count 3\n"), "{out}");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
