//! Snapshot lifecycle throughput: our daemon against containerd's own
//! overlayfs snapshotter, both served as proxy snapshotters on a Unix socket
//! and driven by the same gRPC client.
//!
//! One cycle = Prepare (on a committed base) → mount the overlay and write 4
//! small files → unmount → Commit → View → Remove(view) → Remove(committed):
//! five Snapshots API calls plus the mount work containerd would do.
//! Rounds alternate between the two daemons so machine noise hits both.
//!
//!     cargo bench --bench snapshots [-- --cycles N --rounds R]
//!
//! Needs root (mounts), Go and Debian's containerd sources for the baseline
//! (golang-go golang-github-containerd-containerd-dev).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{arg_or, median};
use nix_snapshotter::api::snapshots::{self as pb, snapshots_client::SnapshotsClient};
use nix_snapshotter::api::Mount;
use tonic::transport::Channel;

struct Guard {
    dir: PathBuf,
    children: Vec<Child>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_raw(c.id() as i32).unwrap(),
                rustix::process::Signal::TERM,
            );
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(5) && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let prefix = self.dir.to_string_lossy().into_owned();
        for p in mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|p| p.starts_with(&prefix))
        {
            let _ = rustix::mount::unmount(p, rustix::mount::UnmountFlags::DETACH);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn build_baseline(dir: &Path) -> PathBuf {
    let src = dir.join("gopath/src/overlayref");
    std::fs::create_dir_all(&src).unwrap();
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::copy(manifest.join("bench/overlay-ref/main.go"), src.join("main.go")).unwrap();
    let bin = dir.join("overlay-ref");
    let out = Command::new("go")
        .args(["build", "-o"])
        .arg(&bin)
        .arg(".")
        .current_dir(&src)
        .env("GO111MODULE", "off")
        .env("GOPATH", format!("{}:/usr/share/gocode", dir.join("gopath").display()))
        .env("GOCACHE", manifest.join("target/go-cache"))
        .output()
        .expect("go must be installed (golang-go)");
    assert!(
        out.status.success(),
        "building the baseline failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    bin
}

fn spawn(cmd: &mut Command, sock: &Path) -> Child {
    let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{} did not listen",
            sock.display()
        );
        assert!(matches!(child.try_wait(), Ok(None)), "daemon exited early");
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

fn mount_all(mounts: &[Mount], target: &Path) {
    use rustix::mount::{mount, mount_bind_recursive, MountFlags};
    let m = &mounts[0];
    if m.r#type == "bind" {
        mount_bind_recursive(m.source.as_str(), target).unwrap();
    } else {
        let data = std::ffi::CString::new(m.options.join(",")).unwrap();
        mount(
            m.source.as_str(),
            target,
            m.r#type.as_str(),
            MountFlags::empty(),
            data.as_c_str(),
        )
        .unwrap();
    }
}

/// Runs `n` cycles; with `mnt`, mounts each new snapshot there and writes files.
async fn cycles(c: &mut SnapshotsClient<Channel>, tag: &str, n: usize, mnt: Option<&Path>) -> Duration {
    let start = Instant::now();
    for i in 0..n {
        let key = format!("{tag}-active-{i}");
        let name = format!("{tag}-committed-{i}");
        let view = format!("{tag}-view-{i}");
        let mounts = c
            .prepare(pb::PrepareSnapshotRequest {
                snapshotter: "bench".into(),
                key: key.clone(),
                parent: "base".into(),
                labels: Default::default(),
            })
            .await
            .unwrap()
            .into_inner()
            .mounts;
        if let Some(mnt) = mnt {
            mount_all(&mounts, mnt);
            for f in 0..4 {
                std::fs::write(mnt.join(format!("file-{f}")), [b'x'; 4096]).unwrap();
            }
            rustix::mount::unmount(mnt, rustix::mount::UnmountFlags::empty()).unwrap();
        }
        c.commit(pb::CommitSnapshotRequest {
            snapshotter: "bench".into(),
            name: name.clone(),
            key,
            labels: Default::default(),
        })
        .await
        .unwrap();
        c.view(pb::ViewSnapshotRequest {
            snapshotter: "bench".into(),
            key: view.clone(),
            parent: name.clone(),
            labels: Default::default(),
        })
        .await
        .unwrap();
        for key in [view, name] {
            c.remove(pb::RemoveSnapshotRequest {
                snapshotter: "bench".into(),
                key,
            })
            .await
            .unwrap();
        }
    }
    start.elapsed()
}

async fn base(c: &mut SnapshotsClient<Channel>, mnt: &Path) {
    let mounts = c
        .prepare(pb::PrepareSnapshotRequest {
            snapshotter: "bench".into(),
            key: "base-active".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    mount_all(&mounts, mnt);
    std::fs::create_dir_all(mnt.join("etc")).unwrap();
    std::fs::write(mnt.join("etc/base"), b"base layer\n").unwrap();
    rustix::mount::unmount(mnt, rustix::mount::UnmountFlags::empty()).unwrap();
    c.commit(pb::CommitSnapshotRequest {
        snapshotter: "bench".into(),
        name: "base".into(),
        key: "base-active".into(),
        ..Default::default()
    })
    .await
    .unwrap();
}

fn main() {
    let n = arg_or("--cycles", 200);
    let rounds = arg_or("--rounds", 5);
    let dir = PathBuf::from(format!("/tmp/nsb-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut guard = Guard {
        dir: dir.clone(),
        children: Vec::new(),
    };
    let baseline = build_baseline(&dir);
    let ours_sock = dir.join("ours.sock");
    let ref_sock = dir.join("ref.sock");
    guard.children.push(spawn(
        Command::new(env!("CARGO_BIN_EXE_nix-snapshotter"))
            .args(["--config", "/dev/null", "--log-level", "warn", "--root"])
            .arg(dir.join("ours"))
            .arg("--address")
            .arg(&ours_sock),
        &ours_sock,
    ));
    guard.children.push(spawn(
        Command::new(&baseline).arg(dir.join("ref")).arg(&ref_sock),
        &ref_sock,
    ));
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let results = rt.block_on(async {
        let mut a = SnapshotsClient::new(nix_snapshotter::uds::connect(&ours_sock).await.unwrap());
        let mut b = SnapshotsClient::new(nix_snapshotter::uds::connect(&ref_sock).await.unwrap());
        base(&mut a, &mnt).await;
        base(&mut b, &mnt).await;
        // Warm-up, not measured.
        cycles(&mut a, "warm", 20, Some(&mnt)).await;
        cycles(&mut b, "warm", 20, Some(&mnt)).await;
        let mut results = Vec::new();
        for (phase, mnt) in [("with mount+write", Some(mnt.as_path())), ("API only", None)] {
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            for r in 0..rounds {
                let tag = format!("{}-r{r}", if mnt.is_some() { "m" } else { "a" });
                let ta = cycles(&mut a, &tag, n, mnt).await;
                let tb = cycles(&mut b, &tag, n, mnt).await;
                ours.push(n as f64 / ta.as_secs_f64());
                theirs.push(n as f64 / tb.as_secs_f64());
                println!(
                    "{phase:>16} round {r}: nix-snapshotter {:8.1} cycles/s   containerd overlayfs {:8.1} cycles/s",
                    ours[r], theirs[r]
                );
            }
            results.push((phase, median(ours), median(theirs)));
        }
        results
    });
    println!();
    println!("cycles per round: {n}, rounds: {rounds}; a cycle is Prepare, Commit, View, Remove x2 (5 API calls)");
    for (phase, ours, theirs) in results {
        println!("{phase}:");
        println!(
            "  nix-snapshotter       median {ours:8.1} cycles/s  ({:8.1} API ops/s)",
            ours * 5.0
        );
        println!(
            "  containerd overlayfs  median {theirs:8.1} cycles/s  ({:8.1} API ops/s)",
            theirs * 5.0
        );
        println!("  ratio (ours / containerd): {:.2}x", ours / theirs);
    }
    drop(guard);
}
