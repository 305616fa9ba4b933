//! Bad requests get the gRPC code containerd expects, a message naming the
//! key at fault, and leave the metadata exactly as it was.

mod common;

use std::collections::HashMap;

use common::{Daemon, TempRoot};
use nix_snapshotter::api::snapshots::{self as pb, snapshots_client::SnapshotsClient};
use tonic::transport::Channel;
use tonic::Code;

async fn prepare(c: &mut SnapshotsClient<Channel>, key: &str, parent: &str) -> Result<(), tonic::Status> {
    c.prepare(pb::PrepareSnapshotRequest {
        snapshotter: "nix".into(),
        key: key.into(),
        parent: parent.into(),
        labels: HashMap::new(),
    })
    .await
    .map(|_| ())
}

async fn commit(c: &mut SnapshotsClient<Channel>, name: &str, key: &str) -> Result<(), tonic::Status> {
    c.commit(pb::CommitSnapshotRequest {
        snapshotter: "nix".into(),
        name: name.into(),
        key: key.into(),
        labels: HashMap::new(),
    })
    .await
    .map(|_| ())
}

async fn remove(c: &mut SnapshotsClient<Channel>, key: &str) -> Result<(), tonic::Status> {
    c.remove(pb::RemoveSnapshotRequest {
        snapshotter: "nix".into(),
        key: key.into(),
    })
    .await
    .map(|_| ())
}

/// Everything List reports, sorted, with timestamps: any change shows.
async fn state(c: &mut SnapshotsClient<Channel>) -> Vec<String> {
    let mut stream = c
        .list(pb::ListSnapshotsRequest {
            snapshotter: "nix".into(),
            filters: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(msg) = stream.message().await.unwrap() {
        out.extend(msg.info.into_iter().map(|i| format!("{i:?}")));
    }
    out.sort();
    out
}

fn expect(res: Result<(), tonic::Status>, code: Code, names: &str) {
    let err = res.expect_err("call should have failed");
    assert_eq!(err.code(), code, "wrong code: {err:?}");
    assert!(
        err.message().contains(names),
        "message {:?} does not name {names:?}",
        err.message()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_are_refused_without_side_effects() {
    let tmp = TempRoot::new("bad");
    let daemon = Daemon::start(&tmp.join("root"), &tmp.join("sock"));
    let mut c = daemon.client().await;

    prepare(&mut c, "base-active", "").await.unwrap();
    commit(&mut c, "base", "base-active").await.unwrap();
    prepare(&mut c, "child", "base").await.unwrap();
    prepare(&mut c, "lonely-active", "").await.unwrap();
    let dirs_before = std::fs::read_dir(tmp.join("root/snapshots")).unwrap().count();
    let before = state(&mut c).await;

    expect(prepare(&mut c, "child", "").await, Code::AlreadyExists, "child");
    expect(
        commit(&mut c, "new-name", "no-such-key").await,
        Code::NotFound,
        "no-such-key",
    );
    expect(
        commit(&mut c, "base", "lonely-active").await,
        Code::AlreadyExists,
        "base",
    );
    expect(remove(&mut c, "base").await, Code::FailedPrecondition, "base");
    expect(remove(&mut c, "ghost").await, Code::NotFound, "ghost");
    expect(
        prepare(&mut c, "nul\0key", "").await,
        Code::InvalidArgument,
        "nul\\0key",
    );
    expect(
        prepare(&mut c, "ns/../../etc", "").await,
        Code::InvalidArgument,
        "ns/../../etc",
    );
    expect(prepare(&mut c, "", "").await, Code::InvalidArgument, "key");
    expect(
        prepare(&mut c, "on-active", "lonely-active").await,
        Code::InvalidArgument,
        "lonely-active",
    );
    expect(
        prepare(&mut c, "orphan", "missing-parent").await,
        Code::NotFound,
        "missing-parent",
    );
    expect(
        commit(&mut c, "from-committed", "base").await,
        Code::FailedPrecondition,
        "base",
    );
    let mounts = c
        .mounts(pb::MountsRequest {
            snapshotter: "nix".into(),
            key: "base".into(),
        })
        .await;
    expect(mounts.map(|_| ()), Code::FailedPrecondition, "base");
    let big = c
        .prepare(pb::PrepareSnapshotRequest {
            snapshotter: "nix".into(),
            key: "big-labels".into(),
            parent: String::new(),
            labels: HashMap::from([("x".to_string(), "y".repeat(5000))]),
        })
        .await;
    expect(big.map(|_| ()), Code::InvalidArgument, "big-labels");
    let upd = c
        .update(pb::UpdateSnapshotRequest {
            snapshotter: "nix".into(),
            info: Some(pb::Info {
                name: "base".into(),
                parent: "elsewhere".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["parent".into()],
            }),
        })
        .await;
    expect(upd.map(|_| ()), Code::InvalidArgument, "base");
    let list = c
        .list(pb::ListSnapshotsRequest {
            snapshotter: "nix".into(),
            filters: vec!["kind==".into()],
        })
        .await;
    expect(list.map(|_| ()), Code::InvalidArgument, "kind==");

    assert_eq!(state(&mut c).await, before, "metadata changed by refused calls");
    let dirs_after = std::fs::read_dir(tmp.join("root/snapshots")).unwrap().count();
    assert_eq!(dirs_before, dirs_after, "refused calls left directories behind");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cache_that_does_not_answer_at_commit_is_unavailable_not_a_bad_request() {
    let tmp = TempRoot::new("badnet");
    let cfg = tmp.join("cfg.toml");
    // Nothing listens on port 1 of loopback.
    std::fs::write(
        &cfg,
        "substituters = [\"http://127.0.0.1:1\"]\ntrusted_public_keys = []\nhost_store = \"\"\n[fetch]\nattempts = 1\nconnect_timeout = 1.0\n[fuse]\nfetch_timeout = 5.0\n",
    )
    .unwrap();
    let daemon = Daemon::start_with(
        &tmp.join("root"),
        &tmp.join("sock"),
        &["--config", cfg.to_str().unwrap()],
        &[],
    );
    let mut c = daemon.client().await;
    prepare(&mut c, "layer-active", "").await.unwrap();
    let labels = HashMap::from([(
        "containerd.io/snapshot/nix-closure".to_string(),
        "/nix/store/syd87l2rxw8cbsxmxl853h0r6pdwhw1a-closure-info".to_string(),
    )]);
    let res = c
        .commit(pb::CommitSnapshotRequest {
            snapshotter: "nix".into(),
            name: "layer".into(),
            key: "layer-active".into(),
            labels,
        })
        .await
        .map(|_| ());
    // containerd retries UNAVAILABLE; INVALID_ARGUMENT would be final.
    expect(res, Code::Unavailable, "nix-closure");
}
