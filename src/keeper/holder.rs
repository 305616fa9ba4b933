//! The holder process: keeps the FUSE session's descriptors while no daemon
//! serves it, where systemd's file descriptor store is not available.
//!
//! It is the same binary (`nix-snapshotter fuse-holder --socket PATH`),
//! started by the daemon in a process group of its own so that it outlives
//! the daemon however that ends. It answers on a `SOCK_SEQPACKET` socket
//! (mode 0600, only its own user is served), one request per message:
//!
//! | request          | descriptors | answer                          |
//! |------------------|-------------|---------------------------------|
//! | `put <name>`     | one         | `ok`                            |
//! | `remove <name>`  | none        | `ok`                            |
//! | `take`           | none        | `ok <name>\n<name>...`, the fds |
//! | `clear`          | none        | `ok`, then it exits             |
//!
//! It exits by itself when the FUSE connection it holds goes away
//! (unmounted: nothing left to keep), or when it was given nothing within a
//! minute of starting.

use std::collections::BTreeMap;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::net::{
    accept_with, bind, connect, listen, recvmsg, sendmsg, socket_with, sockopt, AddressFamily, RecvAncillaryBuffer,
    RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix,
    SocketFlags, SocketType,
};

use nix_snapshotter_fuse::{Keeper, FUSE_FD_NAME};

/// Most descriptors one answer carries (the fuse fd and a journal or two).
const MAX_FDS: usize = 16;
const MAX_MESSAGE: usize = 4096;
/// A holder given nothing this long after starting exits.
const IDLE_EXIT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum HolderError {
    #[error("cannot serve the FUSE session holder at {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn seqpacket() -> io::Result<OwnedFd> {
    Ok(socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// Sends `msg` with `fds` attached.
fn send(sock: BorrowedFd<'_>, msg: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut anc = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !anc.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("too many descriptors for one message"));
    }
    sendmsg(sock, &[io::IoSlice::new(msg)], &mut anc, SendFlags::NOSIGNAL)?;
    Ok(())
}

/// Receives one message and the descriptors attached to it.
fn recv(sock: BorrowedFd<'_>) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut anc = RecvAncillaryBuffer::new(&mut space);
    let got = recvmsg(
        sock,
        &mut [io::IoSliceMut::new(&mut buf)],
        &mut anc,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for m in anc.drain() {
        if let RecvAncillaryMessage::ScmRights(r) = m {
            fds.extend(r);
        }
    }
    if got.flags.intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC) {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "message too long"));
    }
    buf.truncate(got.bytes);
    Ok((buf, fds))
}

/// Serves the holder socket at `path` until there is nothing to hold.
pub fn serve(path: &Path) -> Result<(), HolderError> {
    let err = |source| HolderError::Io {
        path: path.to_path_buf(),
        source,
    };
    let listener = seqpacket().map_err(err)?;
    let addr = SocketAddrUnix::new(path).map_err(|e| err(e.into()))?;
    // A holder that died left its socket file; a live one answers.
    if path.exists() {
        let probe = seqpacket().map_err(err)?;
        if connect(&probe, &addr).is_ok() {
            return Err(err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "another holder serves it",
            )));
        }
        let _ = std::fs::remove_file(path);
    }
    bind(&listener, &addr).map_err(|e| err(e.into()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    listen(&listener, 16).map_err(|e| err(e.into()))?;
    let me = rustix::process::getuid();
    let started = Instant::now();
    let mut held: BTreeMap<String, OwnedFd> = BTreeMap::new();
    tracing::info!(socket = %path.display(), "holding the FUSE session for the next daemon");
    loop {
        let mut fds = vec![PollFd::new(&listener, PollFlags::IN)];
        if let Some(dev) = held.get(FUSE_FD_NAME) {
            // No events asked: only an error (the connection gone) wakes us.
            fds.push(PollFd::new(dev, PollFlags::empty()));
        }
        let tick = Timespec { tv_sec: 5, tv_nsec: 0 };
        match poll(&mut fds, Some(&tick)) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(err(e.into())),
        }
        let dev_gone = fds.get(1).is_some_and(|f| {
            f.revents()
                .intersects(PollFlags::ERR | PollFlags::HUP | PollFlags::NVAL)
        });
        let incoming = fds[0].revents().contains(PollFlags::IN);
        drop(fds);
        if dev_gone {
            tracing::info!("the FUSE session ended (unmounted); holder exits");
            break;
        }
        if held.is_empty() && started.elapsed() > IDLE_EXIT && !incoming {
            tracing::info!("given nothing to hold; holder exits");
            break;
        }
        if !incoming {
            continue;
        }
        let Ok(conn) = accept_with(&listener, SocketFlags::CLOEXEC) else {
            continue;
        };
        // Only our own user (root, or the rootless user) may hand over or take.
        match sockopt::socket_peercred(&conn) {
            Ok(c) if c.uid == me => {}
            _ => continue,
        }
        let _ = conn_timeout(&conn);
        let Ok((msg, mut fds)) = recv(conn.as_fd()) else {
            continue;
        };
        let text = String::from_utf8_lossy(&msg).into_owned();
        let (verb, name) = text.split_once(' ').unwrap_or((text.as_str(), ""));
        let answer = match (verb, fds.len()) {
            ("put", 1) if !name.is_empty() => {
                if held.len() >= MAX_FDS && !held.contains_key(name) {
                    send(conn.as_fd(), b"err holding too many descriptors", &[])
                } else {
                    held.insert(name.to_string(), fds.remove(0));
                    send(conn.as_fd(), b"ok", &[])
                }
            }
            ("remove", 0) => {
                held.remove(name);
                send(conn.as_fd(), b"ok", &[])
            }
            ("take", 0) => {
                let names: Vec<&str> = held.keys().map(String::as_str).collect();
                let reply = format!("ok {}", names.join("\n"));
                let fds: Vec<BorrowedFd<'_>> = held.values().map(|f| f.as_fd()).collect();
                send(conn.as_fd(), reply.as_bytes(), &fds)
            }
            ("clear", 0) => {
                held.clear();
                // Gone from its path before it answers: a holder started
                // right after never finds this one's socket.
                let _ = std::fs::remove_file(path);
                let _ = send(conn.as_fd(), b"ok", &[]);
                tracing::info!("told to let go of the FUSE session; holder exits");
                break;
            }
            _ => send(conn.as_fd(), b"err bad request", &[]),
        };
        if let Err(e) = answer {
            tracing::debug!(error = %e, "answering a holder request");
        }
    }
    let _ = std::fs::remove_file(path);
    Ok(())
}

fn conn_timeout(conn: &OwnedFd) -> io::Result<()> {
    let t = Some(Duration::from_secs(5));
    sockopt::set_socket_timeout(conn, sockopt::Timeout::Recv, t)?;
    sockopt::set_socket_timeout(conn, sockopt::Timeout::Send, t)?;
    Ok(())
}

/// The daemon's side: talks to (and starts) the holder process. It keeps
/// its own duplicates of what it handed over, and watches the holder: one
/// that died (killed, OOM) is replaced and given everything again, so that
/// the session stays kept while the daemon lives.
pub struct HolderKeeper {
    inner: Arc<Inner>,
}

struct Inner {
    socket: PathBuf,
    exe: PathBuf,
    /// What the holder should hold, by name.
    mirror: Mutex<BTreeMap<String, OwnedFd>>,
    watching: AtomicBool,
}

/// How often the watchdog checks that the holder is alive.
const WATCH_EVERY: Duration = Duration::from_secs(2);

impl HolderKeeper {
    pub fn new(socket: PathBuf) -> io::Result<HolderKeeper> {
        Ok(HolderKeeper {
            inner: Arc::new(Inner {
                socket,
                exe: std::env::current_exe()?,
                mirror: Mutex::new(BTreeMap::new()),
                watching: AtomicBool::new(false),
            }),
        })
    }

    fn mirror(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, OwnedFd>> {
        self.inner.mirror.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the watchdog once; it ends when the mirror is cleared.
    fn watch(&self) {
        if self.inner.watching.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        let spawned = std::thread::Builder::new()
            .name("fuse-holder-watch".into())
            .spawn(move || loop {
                std::thread::sleep(WATCH_EVERY);
                let Some(inner) = weak.upgrade() else { return };
                if inner.mirror.lock().map(|m| m.is_empty()).unwrap_or(true) {
                    inner.watching.store(false, Ordering::Release);
                    return;
                }
                if let Err(e) = inner.ensure_running() {
                    tracing::warn!(error = %e, "the FUSE session holder is gone and cannot be replaced");
                }
            });
        if spawned.is_err() {
            self.inner.watching.store(false, Ordering::Release);
        }
    }
}

impl Inner {
    /// One request, one answer. `Ok(None)`: no holder is running.
    fn ask(&self, msg: &str, fds: &[BorrowedFd<'_>]) -> io::Result<Option<(String, Vec<OwnedFd>)>> {
        let sock = seqpacket()?;
        let addr = SocketAddrUnix::new(&self.socket)?;
        match connect(&sock, &addr) {
            Ok(()) => {}
            Err(rustix::io::Errno::NOENT | rustix::io::Errno::CONNREFUSED) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        conn_timeout(&sock)?;
        send(sock.as_fd(), msg.as_bytes(), fds)?;
        let (answer, got) = recv(sock.as_fd())?;
        let answer = String::from_utf8_lossy(&answer).into_owned();
        match answer.strip_prefix("ok") {
            Some(rest) => Ok(Some((rest.trim_start().to_string(), got))),
            None => Err(io::Error::other(format!(
                "the FUSE session holder at {} said: {answer}",
                self.socket.display()
            ))),
        }
    }

    fn alive(&self) -> bool {
        matches!(self.ask("remove -", &[]), Ok(Some(_)))
    }

    /// Starts a holder unless one answers, and gives a new one everything
    /// it should hold.
    fn ensure_running(&self) -> io::Result<()> {
        if self.alive() {
            return Ok(());
        }
        // Its own log: it outlives the daemon, whose output (a pipe, a
        // journal stream) must not be held open by it.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.socket.with_extension("log"))?;
        let mut child = std::process::Command::new(&self.exe)
            .arg("fuse-holder")
            .arg("--socket")
            .arg(&self.socket)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            // Its own process group: a signal to the daemon's group (a
            // terminal's Ctrl-C, a supervisor) leaves it alone.
            .process_group(0)
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.alive() {
                // Reaped when it exits, so it never lingers as a zombie.
                std::thread::spawn(move || child.wait());
                let mirror = self.mirror.lock().unwrap_or_else(|e| e.into_inner());
                for (name, fd) in mirror.iter() {
                    self.ask(&format!("put {name}"), &[fd.as_fd()])?;
                }
                if !mirror.is_empty() {
                    tracing::warn!("the FUSE session holder had gone; a new one holds the session again");
                }
                return Ok(());
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(io::Error::other(format!("the FUSE session holder exited: {status}")));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the FUSE session holder did not start",
        ))
    }
}

impl Keeper for HolderKeeper {
    fn put(&self, name: &str, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.inner.ensure_running()?;
        self.inner
            .ask(&format!("put {name}"), &[fd])?
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "the FUSE session holder went away"))?;
        self.mirror().insert(name.to_string(), fd.try_clone_to_owned()?);
        self.watch();
        Ok(())
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        self.mirror().remove(name);
        self.inner.ask(&format!("remove {name}"), &[]).map(drop)
    }

    fn take(&self) -> io::Result<Vec<(String, OwnedFd)>> {
        let Some((names, fds)) = self.inner.ask("take", &[])? else {
            return Ok(Vec::new());
        };
        let names: Vec<String> = names.lines().map(str::to_string).collect();
        if names.len() != fds.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the FUSE session holder sent a name per descriptor, not as many",
            ));
        }
        let taken: Vec<(String, OwnedFd)> = names.into_iter().zip(fds).collect();
        // What it holds is what it should hold, if it has to be replaced.
        let mut mirror = self.mirror();
        for (name, fd) in &taken {
            mirror.insert(name.clone(), fd.try_clone()?);
        }
        drop(mirror);
        if !taken.is_empty() {
            self.watch();
        }
        Ok(taken)
    }

    fn clear(&self) -> io::Result<()> {
        self.mirror().clear();
        self.inner.ask("clear", &[]).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    #[test]
    fn descriptors_travel_with_their_names() {
        let (a, b) =
            rustix::net::socketpair(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None).unwrap();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"journal").unwrap();
        send(a.as_fd(), b"put journal.1", &[f.as_fd()]).unwrap();
        let (msg, fds) = recv(b.as_fd()).unwrap();
        assert_eq!(msg, b"put journal.1");
        assert_eq!(fds.len(), 1);
        let mut back = std::fs::File::from(fds.into_iter().next().unwrap());
        back.rewind().unwrap();
        let mut s = String::new();
        back.read_to_string(&mut s).unwrap();
        assert_eq!(s, "journal");
    }

    #[test]
    fn an_oversized_message_is_refused() {
        let (a, b) =
            rustix::net::socketpair(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None).unwrap();
        send(a.as_fd(), &vec![b'x'; MAX_MESSAGE + 1], &[]).unwrap();
        assert!(recv(b.as_fd()).is_err());
    }
}
