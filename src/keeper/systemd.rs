//! systemd's file descriptor store as the session keeper: descriptors sent
//! with `FDSTORE=1` to `$NOTIFY_SOCKET` are held by the service manager
//! across restarts of the unit (`FileDescriptorStoreMax=` > 0) and passed
//! back at the next start (`$LISTEN_FDS`, `$LISTEN_FDNAMES`).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::Mutex;

use rustix::net::{
    sendmsg_addr, socket_with, AddressFamily, SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix,
    SocketFlags, SocketType,
};

use nix_snapshotter_fuse::Keeper;

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: i32 = 3;

pub struct SystemdKeeper {
    socket: OsString,
    /// Duplicates of what the store holds, as far as this process knows.
    held: Mutex<BTreeMap<String, OwnedFd>>,
}

impl SystemdKeeper {
    /// The keeper when systemd runs us with a file descriptor store
    /// (`$NOTIFY_SOCKET` and `$FDSTORE` set), taking the descriptors it
    /// passed at start. Call before any thread starts: it reads and clears
    /// the `LISTEN_*` variables.
    pub fn from_environment() -> Option<SystemdKeeper> {
        let socket = std::env::var_os("NOTIFY_SOCKET")?;
        match std::env::var("FDSTORE").ok().and_then(|v| v.parse::<u32>().ok()) {
            Some(n) if n > 0 => {}
            _ => {
                tracing::warn!(
                    "run by systemd without a file descriptor store ($FDSTORE unset: systemd < 254 or \
                     FileDescriptorStoreMax=0): the FUSE session is kept by a holder process, which dies \
                     with the unit's cgroup unless KillMode=process"
                );
                return None;
            }
        }
        let held = passed_fds();
        Some(SystemdKeeper {
            socket,
            held: Mutex::new(held),
        })
    }

    fn notify(&self, state: &str, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let sock = socket_with(AddressFamily::UNIX, SocketType::DGRAM, SocketFlags::CLOEXEC, None)?;
        let bytes = self.socket.as_encoded_bytes();
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => SocketAddrUnix::new_abstract_name(name)?,
            None => SocketAddrUnix::new(std::path::Path::new(&self.socket))?,
        };
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut anc = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !anc.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(io::Error::other("too many descriptors"));
        }
        sendmsg_addr(
            &sock,
            &addr,
            &[io::IoSlice::new(state.as_bytes())],
            &mut anc,
            SendFlags::NOSIGNAL,
        )?;
        Ok(())
    }
}

/// Takes the descriptors systemd passed at start, by name.
fn passed_fds() -> BTreeMap<String, OwnedFd> {
    let mut out = BTreeMap::new();
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    let count: i32 = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .unwrap_or_default()
        .split(':')
        .map(str::to_string)
        .collect();
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    if !ours {
        return out;
    }
    for i in 0..count.clamp(0, 64) {
        let raw = LISTEN_FDS_START + i;
        // SAFETY: systemd passed descriptors LISTEN_FDS_START.. to this
        // process (LISTEN_PID is ours) for it to own; each is taken once,
        // here, and the variables that name them are cleared above.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let _ = rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC);
        let name = names.get(i as usize).cloned().unwrap_or_default();
        out.insert(name, fd);
    }
    out
}

impl Keeper for SystemdKeeper {
    fn put(&self, name: &str, fd: BorrowedFd<'_>) -> io::Result<()> {
        // The store keeps every descriptor sent under a name: drop the old.
        self.notify(&format!("FDSTOREREMOVE=1\nFDNAME={name}"), &[])?;
        self.notify(&format!("FDSTORE=1\nFDNAME={name}"), &[fd])?;
        let dup = fd.try_clone_to_owned()?;
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), dup);
        Ok(())
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).remove(name);
        self.notify(&format!("FDSTOREREMOVE=1\nFDNAME={name}"), &[])
    }

    fn take(&self) -> io::Result<Vec<(String, OwnedFd)>> {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.iter()
            .map(|(n, fd)| Ok((n.clone(), fd.as_fd().try_clone_to_owned()?)))
            .collect()
    }

    fn clear(&self) -> io::Result<()> {
        let names: Vec<String> = self
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        for n in names {
            self.remove(&n)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::net::{bind, recvmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};

    /// A stand-in for systemd's notify socket: what arrives, with its fds.
    #[test]
    fn stored_descriptors_reach_the_notify_socket_with_their_names() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = socket_with(AddressFamily::UNIX, SocketType::DGRAM, SocketFlags::CLOEXEC, None).unwrap();
        bind(&server, &SocketAddrUnix::new(&path).unwrap()).unwrap();
        let keeper = SystemdKeeper {
            socket: path.clone().into_os_string(),
            held: Mutex::new(BTreeMap::new()),
        };
        let f = tempfile::tempfile().unwrap();
        keeper.put("journal.1", f.as_fd()).unwrap();
        let mut got = Vec::new();
        for _ in 0..2 {
            let mut buf = [0u8; 256];
            let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut anc = RecvAncillaryBuffer::new(&mut space);
            let r = recvmsg(
                &server,
                &mut [io::IoSliceMut::new(&mut buf)],
                &mut anc,
                RecvFlags::empty(),
            )
            .unwrap();
            let fds: usize = anc
                .drain()
                .map(|m| match m {
                    RecvAncillaryMessage::ScmRights(r) => r.count(),
                    _ => 0,
                })
                .sum();
            got.push((String::from_utf8_lossy(&buf[..r.bytes]).into_owned(), fds));
        }
        assert_eq!(
            got,
            vec![
                ("FDSTOREREMOVE=1\nFDNAME=journal.1".to_string(), 0),
                ("FDSTORE=1\nFDNAME=journal.1".to_string(), 1)
            ]
        );
        assert_eq!(keeper.take().unwrap().len(), 1);
        keeper.clear().unwrap();
        assert!(keeper.take().unwrap().is_empty());
    }
}
