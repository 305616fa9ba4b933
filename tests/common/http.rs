//! A small HTTP/1.1 file server on 127.0.0.1 for binary-cache tests: serves
//! a directory (and fixed routes, for a registry), honours Range and HEAD,
//! keeps connections alive, logs every request, and injects faults (status
//! codes, dropped connections, stalls) on demand.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone, Debug)]
pub enum Fault {
    Status(u16),
    /// Send the headers (full Content-Length) and this many body bytes, then close.
    DropAfter(usize),
    /// Send the headers and this many body bytes, then go silent for the duration.
    StallAfter(usize, Duration),
    /// Send the body at most this many bytes a second (a slow link).
    Throttle(usize),
}

#[derive(Clone, Debug)]
struct Rule {
    suffix: String,
    fault: Fault,
    /// How many more requests it applies to; None = always.
    remaining: Option<usize>,
}

/// A fixed response: content type, body and extra headers.
#[derive(Clone, Debug)]
struct Route {
    content_type: String,
    body: Vec<u8>,
    headers: Vec<(String, String)>,
}

#[derive(Default)]
struct Shared {
    rules: Vec<Rule>,
    routes: std::collections::HashMap<String, Route>,
    log: Vec<String>,
}

pub struct Server {
    pub addr: std::net::SocketAddr,
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
}

impl Server {
    pub fn start(root: PathBuf) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Mutex::new(Shared::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (shared.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (root, s, st) = (root.clone(), s.clone(), st.clone());
                std::thread::spawn(move || serve(conn, &root, &s, &st));
            }
        });
        Server { addr, shared, stop }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Applies `fault` to requests whose path ends with `suffix` (`times` of them, or all).
    pub fn fault(&self, suffix: &str, fault: Fault, times: Option<usize>) {
        self.shared.lock().unwrap().rules.push(Rule {
            suffix: suffix.to_string(),
            fault,
            remaining: times,
        });
    }

    /// Serves `body` at `path` (before any file), with a content type and headers.
    pub fn route(&self, path: &str, content_type: &str, body: Vec<u8>, headers: &[(&str, &str)]) {
        self.shared.lock().unwrap().routes.insert(
            path.to_string(),
            Route {
                content_type: content_type.to_string(),
                body,
                headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            },
        );
    }

    pub fn clear_faults(&self) {
        self.shared.lock().unwrap().rules.clear();
    }

    /// Requests so far ("GET /x", "HEAD /x", "GET /x bytes=N-" or "GET /x bytes=N-M").
    pub fn log(&self) -> Vec<String> {
        self.shared.lock().unwrap().log.clone()
    }

    /// Forgets the requests logged so far.
    pub fn log_clear(&self) {
        self.shared.lock().unwrap().log.clear();
    }

    pub fn count(&self, suffix: &str) -> usize {
        self.log()
            .iter()
            .filter(|l| l.split(' ').nth(1).is_some_and(|p| p.ends_with(suffix)))
            .count()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr); // wake the accept loop
    }
}

fn serve(conn: TcpStream, root: &std::path::Path, shared: &Mutex<Shared>, stop: &AtomicBool) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut out = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || stop.load(Ordering::SeqCst) {
            return;
        }
        let method = line.split_whitespace().next().unwrap_or("GET").to_string();
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        let mut range_start = 0usize;
        let mut range_end: Option<usize> = None;
        let mut ranged = false;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some(v) = h
                .strip_prefix("range: bytes=")
                .or_else(|| h.strip_prefix("Range: bytes="))
            {
                let (a, b) = v.split_once('-').unwrap_or((v, ""));
                range_start = a.parse().unwrap_or(0);
                range_end = b.parse().ok();
                ranged = true;
            }
        }
        let fault = {
            let mut s = shared.lock().unwrap();
            s.log.push(if ranged {
                format!(
                    "{method} {path} bytes={range_start}-{}",
                    range_end.map(|e| e.to_string()).unwrap_or_default()
                )
            } else {
                format!("{method} {path}")
            });
            let mut found = None;
            for r in s.rules.iter_mut() {
                if path.ends_with(&r.suffix) && r.remaining != Some(0) {
                    if let Some(n) = &mut r.remaining {
                        *n -= 1;
                    }
                    found = Some(r.fault.clone());
                    break;
                }
            }
            found
        };
        if let Some(Fault::Status(code)) = fault {
            let _ = write!(out, "HTTP/1.1 {code} Fault\r\ncontent-length: 0\r\n\r\n");
            continue;
        }
        let route = shared.lock().unwrap().routes.get(&path).cloned();
        let mut extra = String::new();
        let mut body = match route {
            Some(r) => {
                extra = format!("content-type: {}\r\n", r.content_type);
                for (k, v) in &r.headers {
                    extra.push_str(&format!("{k}: {v}\r\n"));
                }
                r.body
            }
            None => match std::fs::read(root.join(path.trim_start_matches('/'))) {
                Ok(b) => b,
                Err(_) => {
                    let _ = write!(out, "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n");
                    continue;
                }
            },
        };
        let status = if ranged && (range_start > 0 || range_end.is_some()) {
            if let Some(e) = range_end {
                body.truncate((e + 1).min(body.len()));
            }
            body.drain(..range_start.min(body.len()));
            "206 Partial Content"
        } else {
            "200 OK"
        };
        let _ = write!(
            out,
            "HTTP/1.1 {status}\r\n{extra}content-length: {}\r\n\r\n",
            body.len()
        );
        if method == "HEAD" {
            continue;
        }
        match fault {
            Some(Fault::DropAfter(n)) => {
                let _ = out.write_all(&body[..n.min(body.len())]);
                let _ = out.flush();
                let _ = out.shutdown(std::net::Shutdown::Both);
                return;
            }
            Some(Fault::StallAfter(n, d)) => {
                let _ = out.write_all(&body[..n.min(body.len())]);
                let _ = out.flush();
                std::thread::sleep(d);
                return;
            }
            Some(Fault::Throttle(rate)) => {
                // Tenths of a second's worth at a time.
                let chunk = (rate / 10).max(1);
                for part in body.chunks(chunk) {
                    if out.write_all(part).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            _ => {
                if out.write_all(&body).is_err() {
                    return;
                }
            }
        }
    }
}
