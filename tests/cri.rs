//! The CRI image service on our socket, as a kubelet pointed at it with
//! `--image-service-endpoint` would use it, against containerd's CRI plugin
//! (Debian's containerd 1.6): every call is passed through, a `nix:0` ref is
//! pulled from a signed binary cache without a nix-daemon, an unreachable
//! containerd is named, and `enable = false` really turns the service off.

mod common;

use std::path::Path;

use common::{image, Containerd, Daemon, TempRoot};
use nix_snapshotter::api::cri::image_service_client::ImageServiceClient;
use nix_snapshotter::api::cri::{
    ImageFsInfoRequest, ImageSpec, ImageStatusRequest, ListImagesRequest, PullImageRequest, RemoveImageRequest,
};
use tonic::transport::Channel;

fn spec(image: &str) -> Option<ImageSpec> {
    Some(ImageSpec {
        image: image.to_string(),
        ..Default::default()
    })
}

/// ImageStatus of `image`: the image, if the CRI has it.
async fn status_of(client: &ImageServiceClient<Channel>, image: &str) -> Option<nix_snapshotter::api::cri::Image> {
    client
        .clone()
        .image_status(ImageStatusRequest {
            image: spec(image),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .image
}

/// Asserts that containerd's CRI lists no image.
async fn assert_no_images(ctrd: &Containerd) {
    let listed = client(&ctrd.address)
        .await
        .list_images(ListImagesRequest { filter: None })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.images.is_empty(), "{listed:?}");
}

/// PullImage of `image` through our socket, which must fail: the error.
async fn pull_err(daemon: &Daemon, image: &str) -> tonic::Status {
    client(&daemon.address)
        .await
        .pull_image(PullImageRequest {
            image: spec(image),
            auth: None,
        })
        .await
        .unwrap_err()
}

async fn client(socket: &Path) -> ImageServiceClient<Channel> {
    ImageServiceClient::new(nix_snapshotter::uds::connect(socket).await.unwrap())
}

fn daemon_with(tmp: &TempRoot, image_service: &str) -> Daemon {
    let cfg = tmp.join("nix-snapshotter.toml");
    std::fs::write(
        &cfg,
        format!("substituters = []\nhost_store = \"\"\n[image_service]\n{image_service}"),
    )
    .unwrap();
    Daemon::start_with(
        &tmp.join("root"),
        &tmp.join("nix.sock"),
        &["--config", cfg.to_str().unwrap()],
        &[],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_service_passes_every_call_to_containerds_cri() {
    let tmp = TempRoot::new("cri");
    let ctrd_dir = tmp.join("ctrd");
    let daemon = daemon_with(
        &tmp,
        &format!(
            "enable = true\ncontainerd_address = \"{}\"\n",
            ctrd_dir.join("containerd.sock").display()
        ),
    );
    let ctrd = Containerd::start_with_cri(&ctrd_dir, &daemon.address);
    let ours = client(&daemon.address).await;
    let direct = client(&ctrd.address).await;

    // An image the CRI knows (imported into its namespace).
    let name = "docker.io/library/cri-busybox:latest";
    let archive = tmp.join("busybox.tar");
    image::busybox_two_layers(&archive, name);
    // (In the CRI's namespace: no container runs there, so no runc state
    // to clean up.)
    let out = std::process::Command::new("ctr")
        .arg("--address")
        .arg(&ctrd.address)
        .args(["--namespace", "k8s.io", "images", "import"])
        .arg(&archive)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // containerd's CRI learns of imported images by events: wait for it.
    let mut status = None;
    for _ in 0..100 {
        status = status_of(&direct, name).await;
        if status.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let direct_image = status.expect("containerd's CRI never saw the imported image");

    // Through us: the same answers.
    let via_us = status_of(&ours, name).await.expect("ImageStatus through the daemon");
    assert_eq!(via_us.id, direct_image.id);
    let listed = ours
        .clone()
        .list_images(ListImagesRequest { filter: None })
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed.images.iter().any(|i| i.repo_tags.iter().any(|t| t == name)),
        "{listed:?}"
    );
    let fs_ours = ours
        .clone()
        .image_fs_info(ImageFsInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let fs_direct = direct
        .clone()
        .image_fs_info(ImageFsInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let mounts = |r: &nix_snapshotter::api::cri::ImageFsInfoResponse| {
        r.image_filesystems
            .iter()
            .map(|f| f.fs_id.as_ref().map(|i| i.mountpoint.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(mounts(&fs_ours), mounts(&fs_direct));

    // Errors come back as containerd gives them, naming the ref.
    let bad = "127.0.0.1:1/nothing/here:v1";
    let err = ours
        .clone()
        .pull_image(PullImageRequest {
            image: spec(bad),
            auth: None,
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("nothing/here"), "{err:?}");

    // RemoveImage through us: gone for the CRI.
    ours.clone()
        .remove_image(RemoveImageRequest { image: spec(name) })
        .await
        .unwrap();
    let after = status_of(&direct, name).await;
    assert!(after.is_none(), "{after:?}");
    drop(ctrd);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_containerd_is_named_and_a_disabled_service_is_off() {
    let tmp = TempRoot::new("cri-off");
    let nowhere = tmp.join("no-containerd.sock");
    let daemon = daemon_with(
        &tmp,
        &format!("enable = true\ncontainerd_address = \"{}\"\n", nowhere.display()),
    );
    let err = client(&daemon.address)
        .await
        .list_images(ListImagesRequest { filter: None })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains(nowhere.to_str().unwrap()), "{err:?}");
    drop(daemon);

    let tmp = TempRoot::new("cri-off");
    let daemon = daemon_with(&tmp, "enable = false\n");
    let err = client(&daemon.address)
        .await
        .list_images(ListImagesRequest { filter: None })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented, "{err:?}");
}

/// A Nix image (busybox and a greeting) whose archive, with its closure,
/// only a signed binary cache on 127.0.0.1 has.
struct NixImage {
    nix: common::nix::NixStore,
    /// The archive as `image build` wrote it.
    archive: std::path::PathBuf,
    /// The archive's store path.
    stored: String,
    tool: String,
    server: common::http::Server,
}

fn nix_image_in_cache(tmp: &TempRoot) -> NixImage {
    use common::nix::{busybox_tool, derivation, NixStore};
    let nix = NixStore::new(&tmp.join("nix"), "cri-1");
    let expr = format!(
        "rec {{ tool = {}; data = {}; }}",
        busybox_tool(),
        derivation(
            "data",
            "b mkdir $out; b printf 'hello from a pod\\n' > $out/greeting",
            &[]
        )
    );
    let outs = nix.build(&expr);
    let closure: Vec<String> = outs.iter().flat_map(|o| nix.closure(o)).collect();
    let tool = outs.iter().find(|o| o.ends_with("-tool")).unwrap().clone();
    let data = outs.iter().find(|o| o.ends_with("-data")).unwrap().clone();
    let cmd = [format!("{tool}/bin/busybox"), "cat".into(), format!("{data}/greeting")];
    let (archive, stored, server) = archive_in_cache(tmp, &nix, closure, &cmd);
    NixImage {
        nix,
        archive,
        stored,
        tool,
        server,
    }
}

/// `image build` of an image running `cmd` over `closure` (paths of `nix`),
/// the archive added to the store and published with the closure, signed,
/// on 127.0.0.1: (archive file, its store path, the cache's server).
fn archive_in_cache(
    tmp: &TempRoot,
    nix: &common::nix::NixStore,
    closure: Vec<String>,
    cmd: &[String],
) -> (std::path::PathBuf, String, common::http::Server) {
    let list = tmp.join("store-paths");
    std::fs::write(&list, closure.join("\n")).unwrap();
    let conf = tmp.join("config.json");
    std::fs::write(&conf, serde_json::json!({ "Cmd": cmd }).to_string()).unwrap();
    let archive = tmp.join("nix-image-hello.tar");
    let built = std::process::Command::new(common::DAEMON)
        .args(["image", "build", "--config"])
        .arg(&conf)
        .arg("--closure")
        .arg(&list)
        .arg("--store-root")
        .arg(&nix.root)
        .arg(&archive)
        .output()
        .unwrap();
    assert!(built.status.success(), "{}", String::from_utf8_lossy(&built.stderr));
    let stored = nix.add_file(&archive);
    let cache = tmp.join("cache");
    let mut published = closure;
    published.push(stored.clone());
    nix.publish(&cache, "zstd", &published);
    (archive, stored, common::http::Server::start(cache))
}

/// Our daemon (image service on, pointed at `ctrd_dir`'s containerd) using
/// the image's cache, and containerd with its CRI plugin.
fn node(tmp: &TempRoot, img: &NixImage) -> (Daemon, Containerd) {
    node_from(tmp, img, None)
}

/// [`node`] with containerd from `bin` (another Debian release's).
fn node_from(tmp: &TempRoot, img: &NixImage, bin: Option<&Path>) -> (Daemon, Containerd) {
    node_trusting(tmp, img, bin, &img.nix.public_key)
}

/// [`node_from`] trusting `key` (not necessarily the cache's).
fn node_trusting(tmp: &TempRoot, img: &NixImage, bin: Option<&Path>, key: &str) -> (Daemon, Containerd) {
    let ctrd_dir = tmp.join("ctrd");
    let cfg = common::cache_config(
        &tmp.path,
        &img.server.url(),
        key,
        &format!(
            "[image_service]\nenable = true\ncontainerd_address = \"{}\"\n",
            ctrd_dir.join("containerd.sock").display()
        ),
    );
    let daemon = Daemon::start_with(
        &tmp.join("root"),
        &tmp.join("nix.sock"),
        &["--config", cfg.to_str().unwrap()],
        &[],
    );
    let ctrd = Containerd::start_with_cri_from(&ctrd_dir, &daemon.address, bin);
    (daemon, ctrd)
}

/// A `nix:0` ref whose archive only a signed binary cache on 127.0.0.1 has
/// (empty local store, no nix-daemon): PullImage through our socket fetches
/// the archive, loads the image for snapshotter `nix` and answers once
/// containerd's CRI reports it. The image's own store paths are not fetched
/// by the pull (they come when a container reads them). Bad refs are named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nix_ref_is_pulled_from_a_signed_cache_into_the_cri() {
    let tmp = TempRoot::new("cri-nix");
    let img = nix_image_in_cache(&tmp);
    let (daemon, ctrd) = node(&tmp, &img);
    let ours = client(&daemon.address).await;

    let image = format!("nix:0{}:latest", img.stored);
    let id = ours
        .clone()
        .pull_image(PullImageRequest {
            image: spec(&image),
            auth: None,
        })
        .await
        .unwrap_or_else(|e| panic!("PullImage {image}: {e:?}\n{}", daemon.log_problems()))
        .into_inner()
        .image_ref;
    assert!(id.starts_with("sha256:"), "{id}");
    let status = status_of(&client(&ctrd.address).await, &image).await;
    assert_eq!(status.map(|i| i.id), Some(id));
    // The archive came from the cache, and, started by the pull, the
    // closure the image's command runs from (busybox and the data it
    // reads: the whole image here), before any container asked.
    let start = std::time::Instant::now();
    while !daemon
        .log_text()
        .contains("prefetched the closure of the image's command")
    {
        assert!(start.elapsed() < std::time::Duration::from_secs(30), "no prefetch");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let nars: Vec<String> = img.server.log().into_iter().filter(|l| l.contains("/nar/")).collect();
    assert_eq!(nars.len(), 3, "{nars:?}");

    // Bad refs, each named.
    let p = &img.stored;
    for (bad, code) in [
        (format!("nix:0{p}:v2"), tonic::Code::InvalidArgument),
        (
            "nix:0/nix/store/00000000000000000000000000000000-nix-image-missing.tar".to_string(),
            tonic::Code::NotFound,
        ),
        (format!("nix:0{}", img.tool), tonic::Code::InvalidArgument),
    ] {
        let err = ours
            .clone()
            .pull_image(PullImageRequest {
                image: spec(&bad),
                auth: None,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{bad}: {err:?}");
        assert!(err.message().contains(bad.trim_end_matches(":v2")), "{err:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_runs_from_a_nix_ref_through_the_cri_of_containerd_1_6() {
    pod_from_a_nix_ref("cri-pod", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_runs_from_a_nix_ref_through_the_cri_of_containerd_1_7() {
    pod_from_a_nix_ref("cri-pod17", Some(&common::containerd_of("trixie"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_runs_from_a_nix_ref_through_the_cri_of_containerd_2() {
    pod_from_a_nix_ref("cri-pod2", Some(&common::containerd_of("sid"))).await;
}

/// As a kubelet does: ImageStatus, PullImage (through our image service),
/// RunPodSandbox with host network, CreateContainer, StartContainer, read
/// its log, stop and remove. The pod's store paths are fetched lazily.
async fn pod_from_a_nix_ref(name: &str, bin: Option<&Path>) {
    let tmp = TempRoot::new(name);
    let img = nix_image_in_cache(&tmp);
    let (daemon, ctrd) = node_from(&tmp, &img, bin);
    ctrd.import_pause_image();
    let images = client(&daemon.address).await;

    let image = format!("nix:0{}", img.stored);
    let absent = status_of(&images, &format!("{image}:latest")).await;
    assert!(absent.is_none(), "{absent:?}");
    images
        .clone()
        .pull_image(PullImageRequest {
            image: spec(&format!("{image}:latest")),
            auth: None,
        })
        .await
        .unwrap_or_else(|e| panic!("PullImage: {e:?}\n{}", daemon.log_problems()));

    let log = run_pod(&tmp, &ctrd, &daemon, &format!("{image}:latest")).await;
    assert!(log.contains("hello from a pod"), "{log}");
    // Lazily: the archive, busybox and the greeting, each once.
    let nars: Vec<String> = img.server.log().into_iter().filter(|l| l.contains("/nar/")).collect();
    assert_eq!(nars.len(), 3, "{nars:?}");
}

/// Debian's docker-registry on 127.0.0.1, with its access log.
/// `image push` to Debian's docker-registry, then a pod from the pushed
/// image through the CRI (pulled by containerd from the registry): the Nix
/// layer is made from its labels, and never downloaded from the registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_nix_image_runs_as_a_pod_without_its_nix_layer_being_downloaded() {
    let tmp = TempRoot::new("cri-push");
    let img = nix_image_in_cache(&tmp);
    let registry = common::registry::DockerRegistry::start(&tmp.join("registry"));
    let reference = format!("{}/nix/hello:v1", registry.host);
    let push = |extra: &[&str]| {
        std::process::Command::new(common::DAEMON)
            .args(["image", "push", "--plain-http"])
            .args(extra)
            .arg(&img.archive)
            .arg(&reference)
            .output()
            .unwrap()
    };
    let out = push(&[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("pushed 2 blobs"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Again: every blob is found there, nothing uploaded.
    let again = push(&[]);
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("pushed 0 blobs (2 already there"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    // Bad references are named.
    let bad = std::process::Command::new(common::DAEMON)
        .args(["image", "push", "--plain-http"])
        .arg(&img.archive)
        .arg("NoHost/UPPER")
        .output()
        .unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("NoHost/UPPER"));

    let (daemon, ctrd) = node(&tmp, &img);
    ctrd.import_pause_image();
    ctrd.plain_http_registry(&registry.host, &registry.host);
    let images = client(&daemon.address).await;
    images
        .clone()
        .pull_image(PullImageRequest {
            image: spec(&reference),
            auth: None,
        })
        .await
        .unwrap_or_else(|e| panic!("PullImage {reference}: {e:?}\n{}", daemon.log_problems()));
    let log = run_pod(&tmp, &ctrd, &daemon, &reference).await;
    assert!(log.contains("hello from a pod"), "{log}");
    // The config came from the registry (the manifest too, not as a blob);
    // the Nix layer did not.
    let config = config_digest(&img.archive);
    let gets = registry.blob_gets();
    assert!(
        gets.iter().any(|g| g.contains(&config)) && gets.iter().all(|g| g.contains(&config)),
        "a layer was downloaded from the registry: {gets:?}"
    );
}

/// The config blob's digest of an image archive.
fn config_digest(archive: &Path) -> String {
    let mut files = std::collections::HashMap::new();
    let mut a = tar::Archive::new(std::fs::File::open(archive).unwrap());
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().to_string_lossy().trim_start_matches("./").to_string();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).unwrap();
        files.insert(name, data);
    }
    let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
    let m = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let manifest: serde_json::Value = serde_json::from_slice(&files[&format!("blobs/sha256/{m}")]).unwrap();
    manifest["config"]["digest"].as_str().unwrap().to_string()
}

/// Runs a pod with one container of `image` through containerd's CRI, as a
/// kubelet does (host network), to its exit; returns the container's log.
async fn run_pod(tmp: &TempRoot, ctrd: &Containerd, daemon: &Daemon, image: &str) -> String {
    let mut pod = common::pod::Pod::run(&ctrd.address, "hello", &tmp.join("pod-logs")).await;
    let id = pod
        .start("hello", image)
        .await
        .unwrap_or_else(|e| panic!("CreateContainer/StartContainer: {e:?}\n{}", daemon.log_problems()));
    let status = pod.wait_exit(&id, std::time::Duration::from_secs(60)).await;
    let log = pod.log("hello");
    assert!(
        status.exit_code == 0,
        "{status:?}\nlog: {log}\n--- daemon:\n{}",
        daemon.log_problems()
    );
    pod.remove().await;
    log
}

/// The Go project's redis example as a pod: redis (Debian's binaries and
/// libraries as store paths) from a `nix:0` ref whose archive only a signed
/// cache has, answering PONG; a store path of the closure that redis does
/// not touch is never fetched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_example_answers_pong_as_a_pod() {
    use common::nix::{busybox_tool, derivation, NixStore};
    let tmp = TempRoot::new("cri-redis");
    let nix = NixStore::new(&tmp.join("nix"), "cri-redis-1");
    let outs = nix.build(&format!(
        "rec {{ tool = {}; unused = {}; }}",
        busybox_tool(),
        derivation("unused", "b mkdir $out; b printf 'never read\\n' > $out/x", &[])
    ));
    let tool = outs.iter().find(|o| o.ends_with("-tool")).unwrap().clone();
    let unused = outs.iter().find(|o| o.ends_with("-unused")).unwrap().clone();
    let redis = common::redis::build(&nix);
    let mut closure: Vec<String> = [&redis, &tool, &unused].iter().flat_map(|p| nix.closure(p)).collect();
    closure.sort();
    closure.dedup();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let script = format!(
        "{redis}/bin/redis-server --port {port} --daemonize yes --save '' --logfile '' 2>&1; \
         for i in $(seq 1 100); do {redis}/bin/redis-cli -p {port} ping 2>&1 && exit 0; sleep 0.1; done; exit 1"
    );
    let cmd = [format!("{tool}/bin/busybox"), "sh".into(), "-c".into(), script];
    let (_archive, stored, server) = archive_in_cache(&tmp, &nix, closure, &cmd);
    let img = NixImage {
        nix,
        archive: _archive,
        stored,
        tool,
        server,
    };
    let (daemon, ctrd) = node(&tmp, &img);
    ctrd.import_pause_image();
    let image = format!("nix:0{}:latest", img.stored);
    client(&daemon.address)
        .await
        .pull_image(PullImageRequest {
            image: spec(&image),
            auth: None,
        })
        .await
        .unwrap_or_else(|e| panic!("PullImage: {e:?}\n{}", daemon.log_problems()));
    let log = run_pod(&tmp, &ctrd, &daemon, &image).await;
    assert!(log.lines().any(|l| l.trim_end().ends_with("PONG")), "{log}");
    // Its NAR's URL, as the narinfo names it.
    let nar_url = |path: &str| {
        let p = nix_snapshotter::nixfmt::StorePath::parse(path).unwrap();
        let text = std::fs::read_to_string(tmp.join("cache").join(format!("{}.narinfo", p.hash_part()))).unwrap();
        nix_snapshotter::nixfmt::NarInfo::parse(&text).unwrap().url
    };
    let log = img.server.log();
    assert!(
        log.iter().any(|l| l.contains(&nar_url(&redis))),
        "redis itself was fetched: {log:?}"
    );
    assert!(!log.iter().any(|l| l.contains(&nar_url(&unused))), "{log:?}");
}

/// An archive signed by a key the node does not trust: refused, naming the
/// ref, and nothing reaches containerd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_archive_no_trusted_key_signed_is_refused_and_nothing_is_imported() {
    let tmp = TempRoot::new("cri-unsigned");
    let img = nix_image_in_cache(&tmp);
    let other = common::nix::NixStore::new(&tmp.join("other"), "someone-else-1");
    let (daemon, ctrd) = node_trusting(&tmp, &img, None, &other.public_key);
    let image = format!("nix:0{}:latest", img.stored);
    let err = pull_err(&daemon, &image).await;
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains(&image), "{err:?}");
    assert_no_images(&ctrd).await;
    // Not even fetched: its narinfo was refused.
    assert!(
        !img.server.log().iter().any(|l| l.contains("/nar/")),
        "{:?}",
        img.server.log()
    );
}

/// An archive that is a signed, well-formed image whose Nix layer the
/// snapshotter refuses (a `nix-entrypoint` hint outside its closure): the
/// load fails midway, after blobs were written; PullImage names the ref and
/// the label, and neither the CRI nor containerd's image store keeps
/// anything of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_archive_that_fails_midway_is_named_and_nothing_is_half_imported() {
    let tmp = TempRoot::new("cri-midway");
    let img = nix_image_in_cache(&tmp);
    let mut a = nix_snapshotter::image::read_archive(&img.archive).unwrap();
    a.layers.last_mut().unwrap().annotations.insert(
        "containerd.io/snapshot/nix-entrypoint".into(),
        "[\"/nix/store/00000000000000000000000000000000-elsewhere\"]".into(),
    );
    let bad = tmp.join("bad").join("nix-image-bad.tar");
    std::fs::create_dir_all(bad.parent().unwrap()).unwrap();
    nix_snapshotter::image::write_archive(&bad, None, a.config, &a.layers).unwrap();
    let stored = img.nix.add_file(&bad);
    img.nix
        .publish(&tmp.join("cache"), "zstd", std::slice::from_ref(&stored));
    let (daemon, ctrd) = node(&tmp, &img);

    let image = format!("nix:0{stored}:latest");
    let err = pull_err(&daemon, &image).await;
    assert!(
        err.message().contains(&stored) && err.message().contains("nix-entrypoint"),
        "{err:?}"
    );
    assert_no_images(&ctrd).await;
    let out = std::process::Command::new("ctr")
        .arg("--address")
        .arg(&ctrd.address)
        .args(["--namespace", "k8s.io", "images", "ls", "-q"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).trim().is_empty(), "{out:?}");
    let snaps = std::process::Command::new("ctr")
        .arg("--address")
        .arg(&ctrd.address)
        .args(["--namespace", "k8s.io", "snapshots", "--snapshotter", "nix", "ls"])
        .output()
        .unwrap();
    let snaps = String::from_utf8_lossy(&snaps.stdout);
    assert_eq!(snaps.lines().skip(1).count(), 0, "{snaps}");
}
