//! The remote-snapshot shortcut, end to end: containerd's Go client pulls a
//! Nix image from a registry on 127.0.0.1 and unpacks it to our snapshotter
//! (the path CRI and nerdctl take), so Prepare carries
//! `containerd.io/snapshot.ref` and the layer's annotations. The registry's
//! access log shows which blobs were fetched; containerd's own garbage
//! collector decides what stays.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::http::Server;
use common::nix::{derivation, NixStore};
use common::registry::{serve_image, Served};
use common::{unique, Containerd, Daemon, TempRoot};
use nix_snapshotter::image;

const COPY_TO_ROOT: &str = "containerd.io/snapshot/nix-copy-to-root";
const ENTRYPOINT: &str = "containerd.io/snapshot/nix-entrypoint";
const PROFILE: &str = "containerd.io/snapshot/nix-profile";

/// A small closure with a copyToRoot environment, and its closure-info.
struct Fixture {
    _dir: TempRoot,
    nix: NixStore,
    cache: PathBuf,
    /// `<closure-info>/store-paths`, physically
    store_paths: PathBuf,
    /// The copyToRoot path: bin/hello, bin/sh, share/empty/
    env: String,
    fillers: Vec<String>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = TempRoot::leaked("remotefix");
        let nix = NixStore::new(&dir.join("nix"), "remote-1");
        let mut attrs = vec![
            format!("tool = {};", derivation("tool", "b mkdir -p $out/bin; b cp /bin/busybox $out/bin/busybox", &[])),
            format!(
                "data = {};",
                derivation("data", "b mkdir $out; b printf 'hello from a remote snapshot\\n' > $out/greeting", &[])
            ),
            format!(
                "env = {};",
                derivation(
                    "env",
                    "b mkdir -p $out/bin $out/share/empty; b printf '#!${tool}/bin/busybox sh\\ncat ${data}/greeting\\n' > $out/bin/hello; b chmod 555 $out/bin/hello; b ln -s ${tool}/bin/busybox $out/bin/sh",
                    &["tool", "data"]
                )
            ),
        ];
        let mut refs = vec!["env".to_string()];
        for i in 0..4 {
            attrs.push(format!(
                "filler{i} = {};",
                derivation(&format!("filler{i}"), &format!("b mkdir $out; b echo {i} > $out/x"), &[])
            ));
            refs.push(format!("filler{i}"));
        }
        let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
        let expr = format!(
            r#"rec {{ {} top = {}; info = derivation {{
  name = "closure-info"; system = "x86_64-linux"; builder = "/bin/sh";
  exportReferencesGraph = [ "graph" top ];
  args = [ "-c" "/bin/busybox mkdir $out; /bin/busybox grep '^/nix/store/' graph | /bin/busybox grep -v '[.]drv$' | /bin/busybox sort -u > $out/store-paths" ];
}}; }}"#,
            attrs.join("\n"),
            derivation("top", "b mkdir $out; for r in $deps; do b echo $r >> $out/refs; done", &refs),
        );
        let outs = nix.build(&expr);
        let find = |s: &str| outs.iter().find(|o| o.ends_with(s)).unwrap().clone();
        let info = find("-closure-info");
        let cache = dir.join("cache");
        nix.publish(&cache, "zstd", std::slice::from_ref(&info));
        // Listings as cache.nixos.org stores them: brotli-compressed (served
        // with Content-Encoding: br, which our client does not undo).
        for e in std::fs::read_dir(&cache).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "ls") {
                let st = std::process::Command::new("brotli")
                    .args(["-f", "-o"])
                    .arg(p.with_extension("br"))
                    .arg(&p)
                    .status()
                    .expect("brotli must be installed (see .ci/run)");
                assert!(st.success());
                std::fs::rename(p.with_extension("br"), &p).unwrap();
            }
        }
        Fixture {
            store_paths: nix.real(&info).join("store-paths"),
            env: find("-env"),
            fillers: (0..4).map(|i| find(&format!("-filler{i}"))).collect(),
            cache,
            _dir: dir,
            nix,
        }
    })
}

/// Builds the Nix image with our CLI: closure from closure-info, copyToRoot `env`.
fn build_image(dir: &Path, name: &str) -> PathBuf {
    build_image_running(dir, name, &["/bin/hello"])
}

/// [`build_image`] with command `cmd`.
fn build_image_running(dir: &Path, name: &str, cmd: &[&str]) -> PathBuf {
    let f = fixture();
    std::fs::write(dir.join("copy.json"), serde_json::to_vec(&[&f.env]).unwrap()).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec(&serde_json::json!({ "Cmd": cmd })).unwrap(),
    )
    .unwrap();
    let out = dir.join(format!("{name}.tar"));
    let st = std::process::Command::new(common::DAEMON)
        .args(["image", "build", "--config"])
        .arg(dir.join("config.json"))
        .arg("--closure")
        .arg(&f.store_paths)
        .arg("--copy-to-root")
        .arg(dir.join("copy.json"))
        .arg("--store-root")
        .arg(&f.nix.root)
        .args(["--ref", &format!("docker.io/library/{name}:latest")])
        .arg(&out)
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    out
}

/// The image as the Go project builds it: no copyToRoot marker.
fn without_marker(archive: &Path, out: &Path) {
    let mut a = image::read_archive(archive).unwrap();
    let nix = a.layers.last_mut().unwrap();
    assert!(
        nix.annotations.remove(COPY_TO_ROOT).is_some(),
        "our builder sets {COPY_TO_ROOT}"
    );
    image::write_archive(out, None, a.config, &a.layers).unwrap();
}

/// Our daemon and a private containerd, the cache and the registry they
/// use, and the Go puller; dropped in this order, the directory last.
struct Stack {
    ctrd: Containerd,
    daemon: Daemon,
    puller: PathBuf,
    root: PathBuf,
    cache: Server,
    registry: Server,
    tmp: TempRoot,
}

fn stack(name: &str) -> Stack {
    stack_from(name, None)
}

/// With containerd from `bin` (another Debian release's) instead of the installed one.
fn stack_from(name: &str, bin: Option<&Path>) -> Stack {
    let f = fixture();
    let tmp = TempRoot::new(name);
    let cache = Server::start(f.cache.clone());
    let registry = Server::start(tmp.join("no-files"));
    let cfg = common::cache_config(&tmp.path, &cache.url(), &f.nix.public_key, "");
    let sock = tmp.join("nix.sock");
    let root = tmp.join("root");
    let daemon = Daemon::start_with(&root, &sock, &["--config", cfg.to_str().unwrap()], &[]);
    let ctrd = Containerd::start_from(&tmp.join("ctrd"), &sock, bin);
    let puller = common::go_build("remote", "pull.go", &tmp.join("go"));
    Stack {
        ctrd,
        daemon,
        puller,
        root,
        cache,
        registry,
        tmp,
    }
}

impl Stack {
    fn try_pull(&self, ns: &str, reference: &str) -> std::process::Output {
        std::process::Command::new(&self.puller)
            .arg(&self.ctrd.address)
            .arg(ns)
            .arg(reference)
            .arg("nix")
            .output()
            .unwrap()
    }

    fn pull(&self, ns: &str, reference: &str) {
        let out = self.try_pull(ns, reference);
        assert!(
            out.status.success(),
            "pull of {reference} failed: {}\n--- nix-snapshotter log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            common::tail(&self.daemon.log_text(), 40)
        );
    }

    /// `ctr run`, which must succeed; returns its output.
    fn run(&self, ns: &str, reference: &str, args: &[&str]) -> String {
        self.run_checked(ns, reference, args, |_| true)
    }

    /// `ctr run`; its output must be `expected`.
    fn run_expect(&self, ns: &str, reference: &str, args: &[&str], expected: &str) {
        self.run_checked(ns, reference, args, |out| out == expected);
    }

    fn run_checked(&self, ns: &str, reference: &str, args: &[&str], ok: impl Fn(&str) -> bool) -> String {
        let id = unique("c");
        let mut all = vec!["run", "--rm", "--snapshotter", "nix", reference, id.as_str()];
        all.extend_from_slice(args);
        let out = self.ctrd.ctr_in(ns, &all);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success() && ok(&stdout),
            "ctr run {args:?} ({}) printed {stdout:?}\nstderr: {}\n--- daemon problems:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.daemon.log_problems()
        );
        stdout
    }

    /// Snapshot directories our daemon holds (one per snapshot it knows).
    fn backend_snapshots(&self) -> usize {
        std::fs::read_dir(self.root.join("snapshots"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().parse::<u64>().is_ok())
            })
            .count()
    }

    /// Waits for containerd's collector to bring our snapshots to `n`.
    fn wait_backend_snapshots(&self, n: usize) {
        let start = Instant::now();
        while self.backend_snapshots() != n {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "expected {n} snapshots in the daemon, have {}",
                self.backend_snapshots()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn fetched(registry: &Server, digest: &str) -> usize {
    registry
        .log()
        .iter()
        .filter(|l| l.starts_with("GET ") && l.contains(&format!("/blobs/{digest}")))
        .count()
}

fn nar_downloads(cache: &Server) -> usize {
    cache.log().iter().filter(|l| l.contains("/nar/")).count()
}

#[test]
fn pulled_nix_layer_is_made_from_its_labels_and_containerd_gc_keeps_it() {
    let f = fixture();
    let s = stack("remote");
    let (cache, registry) = (&s.cache, &s.registry);
    let served: Served = serve_image(registry, "nix/hello", "latest", &build_image(&s.tmp.path, "hello"));
    let nix_layer = served.layers.last().unwrap().clone();

    s.pull(&s.ctrd.namespace, &served.reference);
    assert_eq!(
        fetched(registry, &nix_layer),
        0,
        "the Nix layer was fetched: {:#?}",
        registry.log()
    );
    assert!(fetched(registry, &served.manifest) + registry.count(&format!("manifests/{}", served.manifest)) > 0);
    assert!(
        s.daemon.log_text().contains("remote snapshot"),
        "{}",
        s.daemon.log_text()
    );
    assert_eq!(s.backend_snapshots(), 1);

    // copyToRoot's links and directories are there, the whole closure is
    // listed, and only what runs is fetched.
    let out = s.run(
        &s.ctrd.namespace,
        &served.reference,
        &[
            "/bin/sh",
            "-c",
            "/bin/hello; test -d /share/empty && echo has-empty-dir; ls /nix/store",
        ],
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[..2], ["hello from a remote snapshot", "has-empty-dir"], "{out}");
    for filler in &f.fillers {
        assert!(
            lines.contains(&&filler["/nix/store/".len()..]),
            "{filler} not listed: {out}"
        );
    }
    // closure-info, env (listed for copyToRoot), and what /bin/hello runs:
    // tool and data. The fillers' narinfos may be prefetched, never their
    // NARs: `ls` stats them from their (brotli) listings.
    assert_eq!(nar_downloads(cache), 4, "{:#?}", cache.log());

    // Another image comes and goes with a synchronous collection: ours stays.
    let other = s.tmp.join("other.tar");
    common::image::busybox_two_layers(&other, "docker.io/library/other:latest");
    s.ctrd
        .ctr_ok(&["images", "import", "--snapshotter", "nix", other.to_str().unwrap()]);
    s.ctrd
        .ctr_ok(&["images", "rm", "--sync", "docker.io/library/other:latest"]);
    s.wait_backend_snapshots(1);
    let nars = nar_downloads(cache);
    s.run_expect(
        &s.ctrd.namespace,
        &served.reference,
        &["/bin/hello"],
        "hello from a remote snapshot\n",
    );
    assert_eq!(nar_downloads(cache), nars, "warm run fetched again");

    // A second namespace shares the same snapshot: nothing fetched, nothing made.
    let ns2 = format!("{}-two", s.ctrd.namespace);
    s.pull(&ns2, &served.reference);
    assert_eq!(fetched(registry, &nix_layer), 0);
    s.wait_backend_snapshots(1);
    s.run_expect(
        &ns2,
        &served.reference,
        &["/bin/hello"],
        "hello from a remote snapshot\n",
    );

    // Gone from one namespace it is still used by the other; gone from both, collected.
    s.ctrd.ctr_ok(&["images", "rm", "--sync", &served.reference]);
    s.wait_backend_snapshots(1);
    let rm = s.ctrd.ctr_in(&ns2, &["images", "rm", "--sync", &served.reference]);
    assert!(rm.status.success(), "{}", String::from_utf8_lossy(&rm.stderr));
    s.wait_backend_snapshots(0);
}

#[test]
fn pulled_go_format_nix_layer_is_applied_and_not_shared_across_namespaces() {
    let s = stack("remotego");
    let registry = &s.registry;
    let go_format = s.tmp.join("go-format.tar");
    without_marker(&build_image(&s.tmp.path, "hello"), &go_format);
    let served = serve_image(registry, "nix/go-format", "latest", &go_format);
    let nix_layer = served.layers.last().unwrap().clone();

    // Without the marker the layer may carry anything: fetched and applied.
    s.pull(&s.ctrd.namespace, &served.reference);
    assert_eq!(fetched(registry, &nix_layer), 1, "{:#?}", registry.log());
    assert!(s.daemon.log_text().contains("committed a Nix layer"));
    s.run_expect(
        &s.ctrd.namespace,
        &served.reference,
        &["/bin/hello"],
        "hello from a remote snapshot\n",
    );

    // Applied content is vouched for only within its namespace (a client
    // there might have skipped the diff_id check): another namespace
    // applies its own copy rather than trust a chain ID. (containerd shares
    // the blob itself across namespaces, by digest.)
    let ns2 = format!("{}-two", s.ctrd.namespace);
    s.pull(&ns2, &served.reference);
    assert_eq!(
        s.daemon.log_text().matches("committed a Nix layer").count(),
        2,
        "{:#?}\n{}",
        registry.log(),
        s.daemon.log_text()
    );
    s.wait_backend_snapshots(2);
    s.run_expect(
        &ns2,
        &served.reference,
        &["/bin/hello"],
        "hello from a remote snapshot\n",
    );
}

#[test]
fn malformed_copy_to_root_label_is_refused_by_name() {
    let s = stack("remotebad");
    let archive = build_image(&s.tmp.path, "hello");
    let err = refused_pull_with(&s, &archive, COPY_TO_ROOT, "/nix/store/not-json", "nix/bad");
    assert!(err.contains(COPY_TO_ROOT) && err.contains("not-json"), "{err}");
}

/// Pulls `archive` with its Nix layer's annotation `key` set to `value`,
/// served as `repo`: the pull must fail and leave no snapshot. Its stderr.
fn refused_pull_with(s: &Stack, archive: &Path, key: &str, value: &str, repo: &str) -> String {
    let mut a = image::read_archive(archive).unwrap();
    a.layers
        .last_mut()
        .unwrap()
        .annotations
        .insert(key.to_string(), value.to_string());
    let bad = s.tmp.join(&format!("{}.tar", repo.replace('/', "-")));
    image::write_archive(&bad, None, a.config, &a.layers).unwrap();
    let served = serve_image(&s.registry, repo, "latest", &bad);
    let out = s.try_pull(&s.ctrd.namespace, &served.reference);
    assert!(!out.status.success(), "{key}={value} was accepted");
    assert_eq!(s.backend_snapshots(), 0, "a refused pull left a snapshot behind");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A pulled image whose command runs from a store path: that path's
/// closure is fetched at once, before any container asks for it (the
/// `nix-entrypoint` hint), and nothing else; a hint naming a path outside
/// the closure is refused by name.
#[test]
fn a_pull_prefetches_the_closure_the_image_command_runs_from() {
    let f = fixture();
    let s = stack("remotepre");
    let hello = format!("{}/bin/hello", f.env);
    let archive = build_image_running(&s.tmp.path, "pre", &[&hello]);
    let a = image::read_archive(&archive).unwrap();
    assert_eq!(
        a.layers.last().unwrap().annotations.get(ENTRYPOINT),
        Some(&serde_json::to_string(&[&f.env]).unwrap())
    );
    // First, a hint outside the closure: refused, naming the label.
    let outside = serde_json::to_string(&["/nix/store/00000000000000000000000000000000-elsewhere"]).unwrap();
    let err = refused_pull_with(&s, &archive, ENTRYPOINT, &outside, "nix/bad-hint");
    assert!(err.contains(ENTRYPOINT) && err.contains("not in the closure"), "{err}");
    // An access profile is fetched before the closure-info says what the
    // closure is: one the cache has but outside the closure (the
    // closure-info path itself) is refused by name all the same.
    let info = f.store_paths.parent().unwrap().file_name().unwrap().to_string_lossy();
    let err = refused_pull_with(&s, &archive, PROFILE, &format!("/nix/store/{info}"), "nix/bad-profile");
    assert!(err.contains(PROFILE) && err.contains("not in the closure"), "{err}");

    let served = serve_image(&s.registry, "nix/pre", "latest", &archive);
    s.pull(&s.ctrd.namespace, &served.reference);
    // closure-info, env, and what env refers to (tool, data): fetched with
    // no container started. The fillers are in the image, not in env's closure.
    common::wait_until(
        Duration::from_secs(30),
        || {
            s.daemon
                .log_text()
                .contains("prefetched the closure of the image's command")
        },
        || format!("not prefetched: {:#?}\n{}", s.cache.log(), s.daemon.log_text()),
    );
    assert_eq!(nar_downloads(&s.cache), 4, "{:#?}", s.cache.log());
    s.run_expect(
        &s.ctrd.namespace,
        &served.reference,
        &[&hello],
        "hello from a remote snapshot\n",
    );
    assert_eq!(nar_downloads(&s.cache), 4, "{:#?}", s.cache.log());
}

/// Nix images under another containerd: `ctr images import` (1.7 unpacks
/// client-side without labels, so the layer is applied and recognised by its
/// content; 2.x imports through the Transfer service, whose unpacker passes
/// labels, so the layer is made from them), `ctr run`, and a pull through the
/// Go client with the shortcut.
fn nix_images_run_under(suite: &str, import_labels: bool) {
    let s = stack_from(&format!("ctrd-{suite}"), Some(&common::containerd_of(suite)));
    let registry = &s.registry;
    let version = s.ctrd.ctr_ok(&["version"]);
    println!("{version}");

    let archive = build_image(&s.tmp.path, "hello");
    s.ctrd
        .ctr_ok(&["images", "import", "--snapshotter", "nix", archive.to_str().unwrap()]);
    let expected = if import_labels {
        "made a Nix layer from its labels"
    } else {
        "committed a Nix layer"
    };
    assert!(s.daemon.log_text().contains(expected), "{}", s.daemon.log_text());
    s.run_expect(
        &s.ctrd.namespace,
        "docker.io/library/hello:latest",
        &[],
        "hello from a remote snapshot\n",
    );

    let served = serve_image(registry, "nix/hello", "latest", &archive);
    let ns2 = format!("{}-pull", s.ctrd.namespace);
    s.pull(&ns2, &served.reference);
    assert_eq!(
        fetched(registry, served.layers.last().unwrap()),
        0,
        "{:#?}",
        registry.log()
    );
    s.run_expect(
        &ns2,
        &served.reference,
        &["/bin/sh", "-c", "/bin/hello; ls /share"],
        "hello from a remote snapshot\nempty\n",
    );
    s.ctrd
        .ctr_ok(&["images", "rm", "--sync", "docker.io/library/hello:latest"]);
    let rm = s.ctrd.ctr_in(&ns2, &["images", "rm", "--sync", &served.reference]);
    assert!(rm.status.success(), "{}", String::from_utf8_lossy(&rm.stderr));
    s.wait_backend_snapshots(0);
}

#[test]
fn nix_images_run_under_containerd_1_7() {
    nix_images_run_under("trixie", false);
}

#[test]
fn nix_images_run_under_containerd_2() {
    nix_images_run_under("sid", true);
}
