//! Operating the daemon: socket ownership, systemd readiness, clean stop,
//! and recovery after kill -9 in the middle of work.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use common::{Daemon, TempRoot, DAEMON};
use nix_snapshotter::api::snapshots as pb;

#[test]
fn refuses_a_socket_that_a_live_daemon_serves() {
    let tmp = TempRoot::new("ops");
    let sock = tmp.join("run/dir/sock");
    let _first = Daemon::start(&tmp.join("root1"), &sock);
    let mode = std::fs::metadata(tmp.join("run/dir")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "socket directory mode");

    let out = Command::new(DAEMON)
        .args(["--config", "/dev/null", "--root"])
        .arg(tmp.join("root2"))
        .arg("--address")
        .arg(&sock)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already serving") && err.contains(sock.to_str().unwrap()),
        "{err}"
    );
    // The first daemon still answers.
    assert!(std::os::unix::net::UnixStream::connect(&sock).is_ok());
}

#[test]
fn replaces_a_stale_socket_and_removes_it_on_stop() {
    let tmp = TempRoot::new("ops");
    let sock = tmp.join("sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap()); // leaves the file
    assert!(sock.exists());
    let mut d = Daemon::start(&tmp.join("root"), &sock);
    d.stop();
    assert!(!sock.exists(), "socket left behind after SIGTERM");
}

#[test]
fn notifies_systemd_ready_and_stopping() {
    let tmp = TempRoot::new("ops");
    let notify = tmp.join("notify");
    let listener = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    listener.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut d = Daemon::start_with(
        &tmp.join("root"),
        &tmp.join("sock"),
        &[],
        &[("NOTIFY_SOCKET", notify.to_str().unwrap())],
    );
    let mut buf = [0u8; 64];
    let n = listener.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"READY=1");
    d.stop();
    let n = listener.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"STOPPING=1");
}

#[tokio::test(flavor = "multi_thread")]
async fn state_survives_kill_9_mid_work() {
    let tmp = TempRoot::new("ops");
    let root = tmp.join("root");
    let sock = tmp.join("sock");

    for round in 0..3 {
        let mut d = Daemon::start(&root, &sock);
        let mut c = d.client().await;
        // Hammer the daemon from a task, kill it at a point we do not choose.
        let worker = tokio::spawn(async move {
            let mut parent = String::new();
            for i in 0.. {
                let key = format!("r{round}-a{i}");
                let name = format!("r{round}-c{i}");
                let ok = c
                    .prepare(pb::PrepareSnapshotRequest {
                        key: key.clone(),
                        parent: parent.clone(),
                        ..Default::default()
                    })
                    .await
                    .is_ok()
                    && c.commit(pb::CommitSnapshotRequest {
                        name: name.clone(),
                        key: key.clone(),
                        labels: HashMap::from([("round".into(), round.to_string())]),
                        ..Default::default()
                    })
                    .await
                    .is_ok();
                if !ok {
                    break;
                }
                if i % 3 == 2 {
                    let _ = c
                        .remove(pb::RemoveSnapshotRequest {
                            key: name,
                            ..Default::default()
                        })
                        .await;
                } else {
                    parent = name;
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(150 + 70 * round)).await;
        d.kill9();
        let _ = worker.await;
    }

    // Restart: whatever survived must be consistent and usable.
    let d = Daemon::start(&root, &sock);
    let mut c = d.client().await;
    let mut stream = c.list(pb::ListSnapshotsRequest::default()).await.unwrap().into_inner();
    let mut infos = Vec::new();
    while let Some(m) = stream.message().await.unwrap() {
        infos.extend(m.info);
    }
    assert!(!infos.is_empty(), "nothing survived:\n{}", d.log_text());
    let names: std::collections::HashSet<_> = infos.iter().map(|i| i.name.clone()).collect();
    for i in &infos {
        assert!(
            i.parent.is_empty() || names.contains(&i.parent),
            "{} has a missing parent {}",
            i.name,
            i.parent
        );
        let u = c
            .usage(pb::UsageRequest {
                key: i.name.clone(),
                ..Default::default()
            })
            .await;
        assert!(u.is_ok(), "usage of {}: {u:?}", i.name);
        if i.kind == pb::Kind::Committed as i32 {
            // Every surviving committed snapshot can still be built upon.
            let key = format!("check-{}", i.name);
            let m = c
                .prepare(pb::PrepareSnapshotRequest {
                    key: key.clone(),
                    parent: i.name.clone(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            let lower = m.mounts[0].options.iter().find(|o| o.starts_with("lowerdir=")).cloned();
            let src = m.mounts[0].source.clone();
            for dir in lower
                .map(|l| l["lowerdir=".len()..].split(':').map(String::from).collect::<Vec<_>>())
                .unwrap_or(vec![src])
            {
                assert!(std::path::Path::new(&dir).is_dir(), "{dir} missing for {}", i.name);
            }
            c.remove(pb::RemoveSnapshotRequest {
                key,
                ..Default::default()
            })
            .await
            .unwrap();
        }
    }
    // No directory without a record remains (startup cleanup ran).
    let dirs = std::fs::read_dir(root.join("snapshots")).unwrap().count();
    assert_eq!(dirs, infos.len(), "orphaned snapshot directories after restart");
}

#[test]
fn an_existing_open_state_directory_is_closed_to_other_users() {
    let tmp = TempRoot::new("opsmode");
    let root = tmp.join("root");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let _daemon = Daemon::start(&root, &tmp.join("sock"));
    // Below it lie every container's layers and the FUSE mount.
    let mode = std::fs::metadata(&root).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "state directory mode");
}
