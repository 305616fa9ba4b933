//! One container start through `ctr run` (it comes with every containerd):
//! the time until it is ready, by its output or its exit, and every trace
//! of it removed afterwards, also when it fails or the bench is stopped.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt};

use super::BenchError;

/// How a run is started and when it counts as ready.
pub struct Runner {
    pub ctr: PathBuf,
    pub address: PathBuf,
    pub namespace: String,
    pub snapshotter: String,
    pub image: String,
    /// Replaces the image's command when not empty.
    pub cmd: Vec<String>,
    /// Ready at the first line matching it; without, at the first line.
    pub ready: Option<regex::Regex>,
    pub timeout: Duration,
}

/// After ready, how long a command that exits by itself is given to, so
/// that its exit status is checked; one still running then is killed.
const GRACE: Duration = Duration::from_secs(2);
/// Output kept for error messages.
const KEEP: usize = 4096;

impl Runner {
    fn ctr(&self) -> std::process::Command {
        let mut c = std::process::Command::new(&self.ctr);
        c.arg("--address")
            .arg(&self.address)
            .args(["--namespace", &self.namespace]);
        c
    }

    /// Starts a container `id` and returns the seconds until it was ready.
    pub async fn run(&self, id: &str) -> Result<f64, BenchError> {
        let mut cmd = tokio::process::Command::from(self.ctr());
        cmd.args(["run", "--rm", "--snapshotter", &self.snapshotter, &self.image, id])
            .args(&self.cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let guard = Cleanup { runner: self, id };
        let start = Instant::now();
        let mut child = cmd.spawn().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => BenchError::NoCtr(self.ctr.clone()),
            _ => BenchError::Run {
                id: id.into(),
                msg: format!("cannot start {}: {e}", self.ctr.display()),
            },
        })?;
        let mut lines = Lines::new(child.stdout.take().expect("piped"));
        let mut stderr = child.stderr.take().expect("piped");
        let err_text = tokio::spawn(async move {
            // The first bytes kept, the rest drained (a full pipe would stop ctr).
            let (mut kept, mut buf) = (Vec::new(), [0u8; 8192]);
            while let Ok(n @ 1..) = stderr.read(&mut buf).await {
                if kept.len() < KEEP * 16 {
                    kept.extend_from_slice(&buf[..n]);
                }
            }
            String::from_utf8_lossy(&kept).into_owned()
        });
        let mut seen = String::new();
        let deadline = start + self.timeout;
        let ready = loop {
            let line = match tokio::time::timeout_at(deadline.into(), lines.next()).await {
                Err(_) => {
                    drop(guard);
                    return Err(BenchError::Timeout {
                        id: id.into(),
                        secs: self.timeout.as_secs(),
                        what: match &self.ready {
                            Some(r) => format!("a line matching {:?}", r.as_str()),
                            None => "a line of output".into(),
                        },
                        output: tail(&seen),
                    });
                }
                Ok(Some(l)) => l,
                // Output closed: the command ended.
                Ok(_) => break None,
            };
            if seen.len() < KEEP {
                seen.push_str(&line);
                seen.push('\n');
            }
            if self.ready.as_ref().is_none_or(|r| r.is_match(&line)) {
                break Some(start.elapsed().as_secs_f64());
            }
        };
        // Ready or ended: wait a little for its exit to check the status.
        let status = tokio::time::timeout(if ready.is_some() { GRACE } else { self.timeout }, child.wait()).await;
        let seconds = ready.unwrap_or_else(|| start.elapsed().as_secs_f64());
        match status {
            Ok(Ok(s)) if s.success() => {
                if ready.is_none() && self.ready.is_some() {
                    return Err(BenchError::Run {
                        id: id.into(),
                        msg: format!(
                            "the command exited without printing a line matching {:?}; its output:\n{}",
                            self.ready.as_ref().map(|r| r.as_str()).unwrap_or_default(),
                            tail(&seen)
                        ),
                    });
                }
            }
            Ok(Ok(s)) => {
                let err = err_text.await.unwrap_or_default();
                return Err(BenchError::Run {
                    id: id.into(),
                    msg: format!(
                        "the container failed ({}); output:\n{}{}",
                        s.code().map_or("killed".into(), |c| format!("exit status {c}")),
                        tail(&seen),
                        tail(&err)
                    ),
                });
            }
            Ok(Err(e)) => {
                return Err(BenchError::Run {
                    id: id.into(),
                    msg: e.to_string(),
                })
            }
            // Still running (a server): the cleanup kills it.
            Err(_) => {}
        }
        drop(guard);
        Ok(seconds)
    }
}

/// Lines of a container's output, each at most [`MAX_LINE`] bytes (a longer
/// one comes in pieces): its output takes bounded memory here.
struct Lines<R> {
    r: R,
    buf: Vec<u8>,
    done: bool,
}

const MAX_LINE: usize = 64 * 1024;

impl<R: AsyncRead + Unpin> Lines<R> {
    fn new(r: R) -> Self {
        Lines {
            r,
            buf: Vec::new(),
            done: false,
        }
    }

    /// The next line without its newline; `None` at the end.
    async fn next(&mut self) -> Option<String> {
        loop {
            let window = &self.buf[..self.buf.len().min(MAX_LINE + 1)];
            if let Some(i) = window.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return Some(String::from_utf8_lossy(&line[..i]).into_owned());
            }
            if self.buf.len() >= MAX_LINE || (self.done && !self.buf.is_empty()) {
                let line: Vec<u8> = self.buf.drain(..self.buf.len().min(MAX_LINE)).collect();
                return Some(String::from_utf8_lossy(&line).into_owned());
            }
            if self.done {
                return None;
            }
            let mut chunk = [0u8; 8192];
            match self.r.read(&mut chunk).await {
                Ok(0) | Err(_) => self.done = true,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Kills and removes container `id` (task, container, snapshot) when
/// dropped, whatever happened: synchronous, so it also runs when the
/// bench is interrupted and its futures are dropped.
struct Cleanup<'a> {
    runner: &'a Runner,
    id: &'a str,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let quiet = |args: &[&str]| {
            let _ = self
                .runner
                .ctr()
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        let id = self.id;
        quiet(&["tasks", "kill", "--signal", "SIGKILL", id]);
        // `ctr run --rm` removes what it made once the task is gone; what
        // it could not (it was killed) goes here.
        for _ in 0..50 {
            let listed = self
                .runner
                .ctr()
                .args(["tasks", "ls", "--quiet"])
                .stderr(Stdio::null())
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.trim() == id))
                .unwrap_or(false);
            if !listed {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
            quiet(&["tasks", "delete", "--force", id]);
        }
        quiet(&["containers", "delete", id]);
        quiet(&["snapshots", "--snapshotter", &self.runner.snapshotter, "rm", id]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn output_lines_are_split_and_bounded() {
        let mut data = b"first\nsecond\n".to_vec();
        data.extend(std::iter::repeat_n(b'x', MAX_LINE + 10));
        data.extend_from_slice(b"\nlast without newline");
        let mut lines = Lines::new(&data[..]);
        assert_eq!(lines.next().await.as_deref(), Some("first"));
        assert_eq!(lines.next().await.as_deref(), Some("second"));
        assert_eq!(lines.next().await.map(|l| l.len()), Some(MAX_LINE));
        assert_eq!(lines.next().await.as_deref(), Some("xxxxxxxxxx"));
        assert_eq!(lines.next().await.as_deref(), Some("last without newline"));
        assert_eq!(lines.next().await, None);
    }
}
