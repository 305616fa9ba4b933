//! A shaped network link for benchmarks: this kernel has no netem, so a
//! userspace TCP proxy on 127.0.0.1 delays each direction by half a
//! round-trip time (plus one round trip per new connection) and paces all
//! traffic through it to one rate.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A running shaped link to one upstream.
pub struct Link {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    /// `127.0.0.1:PORT`
    pub host: String,
    /// Bytes carried from the upstream to clients so far.
    pub down: Arc<AtomicU64>,
}

impl Link {
    pub fn downloaded(&self) -> u64 {
        self.down.load(Ordering::Relaxed)
    }

    /// Measures and prints what the link does: one small request's latency
    /// and the rate of the largest NAR of the binary cache it fronts.
    pub fn check(&self, cache: &Path) {
        let big = std::fs::read_dir(cache.join("nar"))
            .unwrap()
            .map(|e| e.unwrap())
            .max_by_key(|e| e.metadata().unwrap().len())
            .unwrap();
        let curl = |url: &str| {
            let ok = Command::new("curl")
                .args(["-sf", "-o", "/dev/null", url])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "curl {url} failed");
        };
        let t = Instant::now();
        curl(&format!("{}/nix-cache-info", self.url));
        let latency = t.elapsed().as_secs_f64();
        let t = Instant::now();
        curl(&format!("{}/nar/{}", self.url, big.file_name().to_string_lossy()));
        let mbit = big.metadata().unwrap().len() as f64 * 8.0 / 1e6 / t.elapsed().as_secs_f64();
        println!(
            "shaped link check: small request {:.0} ms (2 RTT: connect + request), bulk {:.0} Mbit/s",
            latency * 1000.0,
            mbit
        );
    }
}

/// A delaying, rate-limited TCP proxy to `upstream` on `rt`.
pub fn shaped_proxy(
    rt: &tokio::runtime::Runtime,
    upstream: std::net::SocketAddr,
    rtt: Duration,
    bytes_per_sec: f64,
) -> Link {
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    let bucket = Arc::new(tokio::sync::Mutex::new(Instant::now()));
    let down = Arc::new(AtomicU64::new(0));
    let counter = down.clone();
    rt.spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let bucket = bucket.clone();
            let counter = counter.clone();
            tokio::spawn(async move {
                // Connection set-up costs a round trip.
                tokio::time::sleep(rtt).await;
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pipe(cr, sw, rtt / 2, bucket.clone(), bytes_per_sec, None));
                tokio::spawn(pipe(sr, cw, rtt / 2, bucket, bytes_per_sec, Some(counter)));
            });
        }
    });
    Link {
        url: format!("http://{addr}"),
        host: addr.to_string(),
        down,
    }
}

async fn pipe(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
    bucket: Arc<tokio::sync::Mutex<Instant>>,
    rate: f64,
    counter: Option<Arc<AtomicU64>>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due.into()).await;
            if w.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = w.shutdown().await;
    });
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(c) = &counter {
            c.fetch_add(n as u64, Ordering::Relaxed);
        }
        // Pace: the shared link is busy until `next`.
        let send_at = {
            let mut next = bucket.lock().await;
            let now = Instant::now();
            let start = if *next > now { *next } else { now };
            *next = start + Duration::from_secs_f64(n as f64 / rate);
            *next
        };
        if tx.send((send_at + delay, buf[..n].to_vec())).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}
