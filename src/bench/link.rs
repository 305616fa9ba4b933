//! A shaped network link in user space (no netem needed, no privileges): a
//! TCP proxy on 127.0.0.1 that delays each direction by half a round-trip
//! time, adds one round trip per new connection (its set-up), and paces
//! everything through it to one rate, as a WAN link would.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// `--link RTT,RATE`, e.g. `50ms,100mbit`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkSpec {
    pub rtt: Duration,
    /// Bytes per second.
    pub rate: f64,
}

impl std::fmt::Display for LinkSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ms / {} Mbit/s", self.rtt.as_millis(), self.rate * 8.0 / 1e6)
    }
}

impl std::str::FromStr for LinkSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<LinkSpec, String> {
        let usage = || format!("--link {s:?}: expected RTT,RATE such as 50ms,100mbit");
        let (rtt, rate) = s.split_once(',').ok_or_else(usage)?;
        let number = |t: &str, suffix: &str| -> Option<f64> {
            t.trim()
                .to_ascii_lowercase()
                .strip_suffix(suffix)?
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v >= 0.0)
        };
        let rtt = number(rtt, "ms")
            .map(|ms| ms / 1000.0)
            .or_else(|| number(rtt, "s"))
            .filter(|s| *s <= 60.0)
            .ok_or_else(|| format!("{}: the round-trip time must be like 50ms or 0.2s", usage()))?;
        let bits = [("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0)]
            .iter()
            .find_map(|(suffix, scale)| number(rate, suffix).map(|v| v * scale))
            .filter(|b| *b >= 8000.0)
            .ok_or_else(|| {
                format!(
                    "{}: the rate must be like 100mbit, 1gbit or 512kbit (at least 8kbit)",
                    usage()
                )
            })?;
        Ok(LinkSpec {
            rtt: Duration::from_secs_f64(rtt),
            rate: bits / 8.0,
        })
    }
}

/// A running shaped proxy to one upstream; stops accepting when dropped.
pub struct Shaper {
    pub addr: SocketAddr,
    /// Bytes carried from the upstream to clients so far.
    down: Arc<AtomicU64>,
    accept: tokio::task::JoinHandle<()>,
}

impl Shaper {
    /// Listens on 127.0.0.1 (a free port) and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr, spec: LinkSpec) -> std::io::Result<Shaper> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        // The link is one: all connections share its rate.
        let busy_until = Arc::new(tokio::sync::Mutex::new(Instant::now()));
        let down = Arc::new(AtomicU64::new(0));
        let counter = down.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (busy_until, counter) = (busy_until.clone(), counter.clone());
                tokio::spawn(async move {
                    // Connection set-up costs a round trip.
                    tokio::time::sleep(spec.rtt).await;
                    let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = (client.set_nodelay(true), server.set_nodelay(true));
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let half = spec.rtt / 2;
                    tokio::spawn(pipe(cr, sw, half, busy_until.clone(), spec.rate, None));
                    tokio::spawn(pipe(sr, cw, half, busy_until, spec.rate, Some(counter)));
                });
            }
        });
        Ok(Shaper { addr, down, accept })
    }

    pub fn downloaded(&self) -> u64 {
        self.down.load(Ordering::Relaxed)
    }
}

impl Drop for Shaper {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Copies `r` to `w`, each chunk sent `delay` after the link is free for it.
async fn pipe(
    mut r: OwnedReadHalf,
    mut w: OwnedWriteHalf,
    delay: Duration,
    busy_until: Arc<tokio::sync::Mutex<Instant>>,
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
        let sent = {
            let mut next = busy_until.lock().await;
            let start = (*next).max(Instant::now());
            *next = start + Duration::from_secs_f64(n as f64 / rate);
            *next
        };
        if tx.send((sent + delay, buf[..n].to_vec())).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_specs_parse_or_say_what_is_wrong() {
        let l: LinkSpec = "50ms,100mbit".parse().unwrap();
        assert_eq!(l.rtt, Duration::from_millis(50));
        assert_eq!(l.rate, 100e6 / 8.0);
        let l: LinkSpec = " 0.2s , 1Gbit ".parse().unwrap();
        assert_eq!((l.rtt, l.rate), (Duration::from_millis(200), 1e9 / 8.0));
        assert_eq!("0ms,512kbit".parse::<LinkSpec>().unwrap().rate, 64e3);
        for (bad, says) in [
            ("50ms", "RTT,RATE"),
            ("50,100mbit", "round-trip"),
            ("-5ms,100mbit", "round-trip"),
            ("50ms,100", "rate"),
            ("50ms,fastmbit", "rate"),
            ("50ms,1bit", "rate"),
            ("99s,1mbit", "round-trip"),
        ] {
            let e = bad.parse::<LinkSpec>().unwrap_err();
            assert!(e.contains(says) && e.contains(bad.trim()), "{bad}: {e}");
        }
    }

    #[tokio::test]
    async fn a_shaped_link_adds_its_round_trips_and_paces_to_its_rate() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = server.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = server.accept().await.unwrap();
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await.unwrap();
            s.write_all(&vec![7u8; 100_000]).await.unwrap();
        });
        let spec = LinkSpec {
            rtt: Duration::from_millis(100),
            rate: 1e6,
        };
        let link = Shaper::start(upstream, spec).await.unwrap();
        let t = Instant::now();
        let mut c = tokio::net::TcpStream::connect(link.addr).await.unwrap();
        c.write_all(b"x").await.unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.unwrap();
        let took = t.elapsed();
        assert_eq!(got.len(), 100_000);
        assert_eq!(link.downloaded(), 100_000);
        // Connect (1 RTT) + request and answer (1 RTT) + 100 kB at 1 MB/s.
        assert!(took >= Duration::from_millis(290), "{took:?}");
    }
}
