//! A shaped network link for benchmarks: this kernel has no netem, so a
//! userspace TCP proxy on 127.0.0.1 delays each direction by half a
//! round-trip time (plus one round trip per new connection) and paces all
//! traffic through it to one rate.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nix_snapshotter::bench::link::{LinkSpec, Shaper};

/// A running shaped link to one upstream.
pub struct Link {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    /// `127.0.0.1:PORT`
    pub host: String,
    shaper: Shaper,
}

impl Link {
    /// Bytes carried from the upstream to clients so far.
    pub fn downloaded(&self) -> u64 {
        self.shaper.downloaded()
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

/// A delaying, rate-limited TCP proxy to `upstream` on `rt` (the one
/// `nix-snapshotter bench --link` uses).
pub fn shaped_proxy(
    rt: &tokio::runtime::Runtime,
    upstream: std::net::SocketAddr,
    rtt: Duration,
    bytes_per_sec: f64,
) -> Link {
    let spec = LinkSpec {
        rtt,
        rate: bytes_per_sec,
    };
    let shaper = rt.block_on(Shaper::start(upstream, spec)).unwrap();
    Link {
        url: format!("http://{}", shaper.addr),
        host: shaper.addr.to_string(),
        shaper,
    }
}
