//! The CRI image service on our socket, as a kubelet pointed at it with
//! `--image-service-endpoint` would use it, against containerd's CRI plugin
//! (Debian's containerd 1.6): every call is passed through, a `nix:0` ref is
//! refused by name for now, an unreachable containerd is named, and
//! `enable = false` really turns the service off.

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
        let s = direct
            .clone()
            .image_status(ImageStatusRequest {
                image: spec(name),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner();
        if s.image.is_some() {
            status = s.image;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let direct_image = status.expect("containerd's CRI never saw the imported image");

    // Through us: the same answers.
    let via_us = ours
        .clone()
        .image_status(ImageStatusRequest {
            image: spec(name),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .image
        .expect("ImageStatus through the daemon");
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

    // A nix:0 ref: refused, by name, for now.
    let nix_ref = "nix:0/nix/store/00000000000000000000000000000000-nix-image-x.tar:latest";
    let err = ours
        .clone()
        .pull_image(PullImageRequest {
            image: spec(nix_ref),
            auth: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented, "{err:?}");
    assert!(err.message().contains(nix_ref), "{err:?}");

    // RemoveImage through us: gone for the CRI.
    ours.clone()
        .remove_image(RemoveImageRequest { image: spec(name) })
        .await
        .unwrap();
    let after = direct
        .clone()
        .image_status(ImageStatusRequest {
            image: spec(name),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(after.image.is_none(), "{after:?}");
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
