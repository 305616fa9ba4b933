//! End to end with a private containerd (Debian's package) using our daemon
//! as its `nix` proxy snapshotter: import an image, run containers with runc,
//! restart our daemon under a running containerd.

mod common;

use std::time::{Duration, Instant};

use common::{image, unique, Containerd, Daemon, TempRoot};

const IMAGE: &str = "docker.io/library/nix-snapshotter-e2e:latest";

fn run_container(ctrd: &Containerd) -> String {
    let id = unique("c");
    ctrd.ctr_ok(&["run", "--rm", "--snapshotter", "nix", IMAGE, &id])
}

#[test]
fn import_run_restart_run() {
    let tmp = TempRoot::new("e2e");
    let archive = tmp.join("image.tar");
    image::busybox_two_layers(&archive, IMAGE);

    let sock = tmp.join("nix.sock");
    let mut daemon = Daemon::start(&tmp.join("nix-root"), &sock);
    let ctrd = Containerd::start(&tmp.join("ctrd"), &sock);

    ctrd.ctr_ok(&["images", "import", "--snapshotter", "nix", archive.to_str().unwrap()]);
    let out = run_container(&ctrd);
    assert!(out.contains("hello from the top layer"), "unexpected output: {out}");
    assert!(out.contains("kept"), "lower layer file missing: {out}");
    assert!(
        !out.contains("doomed"),
        "whiteout not applied, deleted file visible: {out}"
    );

    let before = ctrd.ctr_ok(&["snapshots", "--snapshotter", "nix", "ls"]);
    let committed = before.lines().filter(|l| l.contains("Committed")).count();
    assert_eq!(
        committed, 2,
        "expected the image's two layers as committed snapshots:\n{before}"
    );

    // Restart our daemon while containerd keeps running and keeps its
    // connection: state must come back from disk.
    daemon.stop();
    assert!(!sock.exists(), "daemon left its socket behind");
    let daemon = Daemon::start(&tmp.join("nix-root"), &sock);

    // containerd reconnects with backoff; give it a bounded time.
    let start = Instant::now();
    let after = loop {
        let out = ctrd.ctr(&["snapshots", "--snapshotter", "nix", "ls"]);
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "containerd did not reconnect: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let names = |s: &str| {
        let mut v: Vec<String> = s
            .lines()
            .skip(1)
            .filter(|l| l.contains("Committed"))
            .map(|l| l.split_whitespace().next().unwrap().to_string())
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        names(&before),
        names(&after),
        "committed snapshots changed across restart"
    );

    let out = run_container(&ctrd);
    assert!(
        out.contains("hello from the top layer") && !out.contains("doomed"),
        "after restart: {out}"
    );
    drop(daemon);
}

/// A Docker archive (`docker save`'s format: manifest.json, uncompressed
/// layers) loads with `image load` and runs; so does an image built on it
/// with `--from-image`.
#[test]
fn a_docker_archive_loads_and_runs() {
    let tmp = TempRoot::new("e2e-docker");
    let archive = tmp.join("docker.tar");
    let name = "docker.io/library/nst-docker-archive:latest";
    image::write_docker_archive(
        &archive,
        name,
        &image::busybox_layers(),
        &["/bin/sh", "-c", "cat /hello.txt; ls /etc"],
    );
    let sock = tmp.join("nix.sock");
    let _daemon = Daemon::start(&tmp.join("nix-root"), &sock);
    let ctrd = Containerd::start(&tmp.join("ctrd"), &sock);
    let out = ctrd.image_load(&ctrd.namespace, &archive);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(name));
    let run = ctrd.ctr_ok(&["run", "--rm", "--snapshotter", "nix", name, &unique("c")]);
    assert!(
        run.contains("hello from the top layer") && run.contains("kept") && !run.contains("doomed"),
        "{run}"
    );

    // Read as a base image: its layers come out compressed, whole.
    let base = nix_snapshotter::image::read_archive(&archive).unwrap();
    assert_eq!(base.layers.len(), 2);
    assert_eq!(base.config["config"]["Cmd"][0], "/bin/sh");
}
