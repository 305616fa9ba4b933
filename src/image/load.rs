//! `image load`: imports an OCI image-layout tar into containerd through its
//! gRPC API and unpacks it into a snapshotter itself, passing each layer's
//! `containerd.io/snapshot/*` annotations as labels (so Nix layers are known
//! by their closure-info), without `ctr` or containerd's Transfer service.
//!
//! Steps, all under one lease so nothing is collected half-way: write the
//! blobs to the content store (with the GC references containerd's own
//! unpacker records), then for each layer not yet unpacked Prepare a
//! snapshot on its parent with `containerd.io/snapshot.ref` = its chain ID
//! (a snapshotter that can make the layer itself, as ours does for marked
//! Nix layers, answers ALREADY_EXISTS and the layer is skipped), else mount
//! have containerd's Diff service apply it to the snapshot's mounts (its
//! applier confines every path, link and whiteout of the layer to them),
//! check the digest it reports against the layer's diff_id, and Commit it
//! under its chain ID; finally create or update the image record.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::api::content::{self, content_client::ContentClient};
use crate::api::diff::{self, diff_client::DiffClient};
use crate::api::images::{self, images_client::ImagesClient};
use crate::api::leases::{self, leases_client::LeasesClient};
use crate::api::snapshots::{self, snapshots_client::SnapshotsClient};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{}: {msg}", path.display())]
    Archive { path: PathBuf, msg: String },
    #[error("cannot reach containerd at {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("containerd {call}: {status}")]
    Api { call: &'static str, status: tonic::Status },
    #[error(transparent)]
    Image(#[from] super::ImageError),
    #[error("applying layer {digest}: {msg}")]
    Apply { digest: String, msg: String },
}

fn api(call: &'static str) -> impl FnOnce(tonic::Status) -> LoadError {
    move |status| LoadError::Api { call, status }
}

/// containerd's namespace header (and lease) on every call.
#[derive(Clone)]
pub struct Headers {
    namespace: MetadataValue<tonic::metadata::Ascii>,
    lease: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl Headers {
    /// The namespace header alone; `None` for a name no header can carry.
    pub fn namespace(ns: &str) -> Option<Headers> {
        Some(Headers {
            namespace: ns.parse().ok()?,
            lease: None,
        })
    }
}

impl tonic::service::Interceptor for Headers {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut()
            .insert("containerd-namespace", self.namespace.clone());
        if let Some(l) = &self.lease {
            req.metadata_mut().insert("containerd-lease", l.clone());
        }
        Ok(req)
    }
}

type Svc = InterceptedService<Channel, Headers>;

/// The chain IDs of a layer stack: what containerd names unpacked snapshots.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => format!("sha256:{:x}", Sha256::digest(format!("{prev} {d}").as_bytes())),
        };
        out.push(next);
    }
    out
}

/// Imports `archive` into containerd at `address`, namespace `namespace`,
/// unpacked for `snapshotter`. Returns the image name.
pub async fn load(
    address: &Path,
    namespace: &str,
    archive: &Path,
    snapshotter: &str,
    name: Option<&str>,
) -> Result<String, LoadError> {
    let archive_path = archive.to_path_buf();
    let name = name.map(str::to_string);
    let mut img = tokio::task::spawn_blocking(move || super::read_raw(&archive_path))
        .await
        .map_err(|e| LoadError::Archive {
            path: archive.to_path_buf(),
            msg: e.to_string(),
        })??;
    if let Some(n) = name {
        img.name = Some(n);
    }
    let Some(image_name) = img.name.clone() else {
        return Err(LoadError::Archive {
            path: archive.to_path_buf(),
            msg: "the archive names no image (io.containerd.image.name); pass --name".into(),
        });
    };
    let channel = crate::uds::connect(address)
        .await
        .map_err(|source| LoadError::Connect {
            path: address.to_path_buf(),
            source,
        })?;
    let ns: MetadataValue<_> = namespace.parse().map_err(|_| LoadError::Archive {
        path: archive.to_path_buf(),
        msg: format!("invalid namespace {namespace:?}"),
    })?;
    let lease_id = format!(
        "nix-snapshotter-load-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    );
    let mut leases = LeasesClient::with_interceptor(
        channel.clone(),
        Headers {
            namespace: ns.clone(),
            lease: None,
        },
    );
    leases
        .create(leases::CreateRequest {
            id: lease_id.clone(),
            labels: HashMap::new(),
        })
        .await
        .map_err(api("leases.Create"))?;
    let headers = Headers {
        namespace: ns,
        lease: lease_id.parse().ok(),
    };
    let result = load_leased(channel, headers, &img, snapshotter).await;
    let _ = leases
        .delete(leases::DeleteRequest {
            id: lease_id,
            sync: false,
        })
        .await;
    result.map(|()| image_name)
}

async fn load_leased(channel: Channel, h: Headers, img: &super::RawImage, snapshotter: &str) -> Result<(), LoadError> {
    let mut content: ContentClient<Svc> = ContentClient::with_interceptor(channel.clone(), h.clone());
    let mut snaps: SnapshotsClient<Svc> = SnapshotsClient::with_interceptor(channel.clone(), h.clone());
    let mut diff: DiffClient<Svc> = DiffClient::with_interceptor(channel.clone(), h.clone());
    let mut images: ImagesClient<Svc> = ImagesClient::with_interceptor(channel, h);

    let diff_ids: Vec<String> = img.layers.iter().map(|(_, _, d)| d.clone()).collect();
    let chains = chain_ids(&diff_ids);
    let top = chains.last().cloned().unwrap_or_default();

    // Blobs, with the references containerd's GC follows.
    for (d, blob, _) in &img.layers {
        write_blob(&mut content, &d.digest, Blob::Archive(blob), HashMap::new()).await?;
    }
    let mut config_labels = HashMap::new();
    if !top.is_empty() {
        config_labels.insert(format!("containerd.io/gc.ref.snapshot.{snapshotter}"), top.clone());
    }
    write_blob(
        &mut content,
        &img.config_digest,
        Blob::Bytes(&img.config_bytes),
        config_labels,
    )
    .await?;
    let mut manifest_labels = HashMap::from([(
        "containerd.io/gc.ref.content.config".to_string(),
        img.config_digest.clone(),
    )]);
    for (i, (d, _, _)) in img.layers.iter().enumerate() {
        manifest_labels.insert(format!("containerd.io/gc.ref.content.l.{i}"), d.digest.clone());
    }
    write_blob(
        &mut content,
        &img.manifest.digest,
        Blob::Bytes(&img.manifest_bytes),
        manifest_labels,
    )
    .await?;

    // Layers, bottom up.
    for (i, ((desc, _, diff_id), chain)) in img.layers.iter().zip(&chains).enumerate() {
        let exists = snaps
            .stat(snapshots::StatSnapshotRequest {
                snapshotter: snapshotter.to_string(),
                key: chain.clone(),
            })
            .await
            .is_ok();
        if exists {
            continue;
        }
        let mut labels: HashMap<String, String> = desc
            .annotations
            .iter()
            .filter(|(k, _)| k.starts_with("containerd.io/snapshot/"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // As containerd's unpacker does: a snapshotter that can make the
        // layer itself (a Nix layer, or one it already has) answers
        // ALREADY_EXISTS and containerd records the chain for us.
        labels.insert("containerd.io/snapshot.ref".to_string(), chain.clone());
        let key = format!("extract-{:08x} {chain}", rand::random::<u32>());
        let parent = if i == 0 { String::new() } else { chains[i - 1].clone() };
        let prepared = snaps
            .prepare(snapshots::PrepareSnapshotRequest {
                snapshotter: snapshotter.to_string(),
                key: key.clone(),
                parent,
                labels: labels.clone(),
            })
            .await;
        let mounts = match prepared {
            Err(s) if s.code() == tonic::Code::AlreadyExists => {
                tracing::info!(layer = %desc.digest, "layer made by the snapshotter; not applied");
                continue;
            }
            other => other.map_err(api("snapshots.Prepare"))?.into_inner().mounts,
        };
        let applied = apply(&mut diff, desc, mounts, diff_id).await;
        if let Err(msg) = applied {
            let digest = desc.digest.clone();
            let _ = snaps
                .remove(snapshots::RemoveSnapshotRequest {
                    snapshotter: snapshotter.to_string(),
                    key,
                })
                .await;
            return Err(LoadError::Apply { digest, msg });
        }
        snaps
            .commit(snapshots::CommitSnapshotRequest {
                snapshotter: snapshotter.to_string(),
                name: chain.clone(),
                key,
                labels,
            })
            .await
            .map_err(api("snapshots.Commit"))?;
    }

    let image = images::Image {
        name: img.name.clone().unwrap_or_default(),
        labels: HashMap::new(),
        target: Some(img.manifest.clone()),
        created_at: None,
        updated_at: None,
    };
    match images
        .create(images::CreateImageRequest {
            image: Some(image.clone()),
        })
        .await
    {
        Ok(_) => Ok(()),
        Err(s) if s.code() == tonic::Code::AlreadyExists => images
            .update(images::UpdateImageRequest {
                image: Some(image),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["target".into()],
                }),
            })
            .await
            .map(|_| ())
            .map_err(api("images.Update")),
        Err(s) => Err(api("images.Create")(s)),
    }
}

/// A blob to write: bytes at hand, or a range of the archive.
enum Blob<'a> {
    Bytes(&'a [u8]),
    Archive(&'a super::BlobRef),
}

async fn write_blob(
    c: &mut ContentClient<Svc>,
    digest: &str,
    data: Blob<'_>,
    labels: HashMap<String, String>,
) -> Result<(), LoadError> {
    if let Ok(info) = c
        .info(content::InfoRequest {
            digest: digest.to_string(),
        })
        .await
    {
        // Present: only make sure our GC references are on it.
        if !labels.is_empty() {
            let mut all = info.into_inner().info.map(|i| i.labels).unwrap_or_default();
            let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
            all.extend(labels);
            c.update(content::UpdateRequest {
                info: Some(content::Info {
                    digest: digest.to_string(),
                    labels: all,
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask { paths }),
            })
            .await
            .map_err(api("content.Update"))?;
        }
        return Ok(());
    }
    let reference = format!("nix-snapshotter-load-{digest}");
    let (total, mut source): (u64, Box<dyn Read + Send>) = match data {
        Blob::Bytes(b) => (b.len() as u64, Box::new(std::io::Cursor::new(b.to_vec()))),
        Blob::Archive(r) => (
            r.size,
            Box::new(r.reader().map_err(|e| LoadError::Archive {
                path: r.archive.clone(),
                msg: format!("blob {digest}: {e}"),
            })?),
        ),
    };
    // Sent as it is read, a MiB at a time: a layer is never held whole.
    let (tx, rx) = tokio::sync::mpsc::channel::<content::WriteContentRequest>(2);
    let read_error = std::sync::Arc::new(std::sync::Mutex::new(None::<std::io::Error>));
    let reader = {
        let (reference, expected, read_error) = (reference.clone(), digest.to_string(), read_error.clone());
        tokio::task::spawn_blocking(move || {
            let mut offset = 0u64;
            loop {
                let mut chunk = Vec::with_capacity(1 << 20);
                match (&mut source).take(1 << 20).read_to_end(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => {
                        let req = content::WriteContentRequest {
                            action: content::WriteAction::Write as i32,
                            r#ref: reference.clone(),
                            total: total as i64,
                            expected: expected.clone(),
                            offset: offset as i64,
                            data: chunk,
                            labels: HashMap::new(),
                        };
                        offset += n as u64;
                        if tx.blocking_send(req).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        if let Ok(mut slot) = read_error.lock() {
                            *slot = Some(e);
                        }
                        return;
                    }
                }
            }
            let _ = tx.blocking_send(content::WriteContentRequest {
                action: content::WriteAction::Commit as i32,
                r#ref: reference,
                total: total as i64,
                expected,
                offset: offset as i64,
                data: Vec::new(),
                labels,
            });
        })
    };
    // On an error the call is over and the reader stops at its next send:
    // it is not waited for.
    send_blob(c, tokio_stream::wrappers::ReceiverStream::new(rx)).await?;
    let _ = reader.await;
    if let Some(e) = read_error.lock().ok().and_then(|mut s| s.take()) {
        return Err(LoadError::Archive {
            path: PathBuf::from(digest),
            msg: format!("reading the blob: {e}"),
        });
    }
    Ok(())
}

/// Streams write requests to the content store until containerd commits.
async fn send_blob(
    c: &mut ContentClient<Svc>,
    reqs: tokio_stream::wrappers::ReceiverStream<content::WriteContentRequest>,
) -> Result<(), LoadError> {
    let mut responses = match c.write(reqs).await {
        Ok(r) => r.into_inner(),
        Err(s) if s.code() == tonic::Code::AlreadyExists => return Ok(()),
        Err(s) => return Err(api("content.Write")(s)),
    };
    loop {
        match responses.message().await {
            Ok(Some(r)) if r.action == content::WriteAction::Commit as i32 => return Ok(()),
            Ok(Some(_)) => {}
            Ok(None) => return Ok(()),
            Err(s) if s.code() == tonic::Code::AlreadyExists => return Ok(()),
            Err(s) => return Err(api("content.Write")(s)),
        }
    }
}

/// Has containerd apply the layer `desc` (already in its content store) to
/// `mounts` with its own applier, which confines every entry, link and
/// whiteout to the mounts, then checks that what was applied is the layer
/// the image config names (`diff_id`): a layer that is not is refused
/// before anything is committed under its chain ID.
async fn apply(
    client: &mut DiffClient<Svc>,
    desc: &crate::api::containerd::types::Descriptor,
    mounts: Vec<crate::api::Mount>,
    diff_id: &str,
) -> Result<(), String> {
    let applied = client
        .apply(diff::ApplyRequest {
            diff: Some(desc.clone()),
            mounts,
        })
        .await
        .map_err(|s| format!("containerd diff.Apply: {}", s.message()))?
        .into_inner()
        .applied
        .ok_or("containerd diff.Apply returned no descriptor")?;
    if applied.digest != diff_id {
        return Err(format!(
            "its content is {}, but the image config says its diff_id is {diff_id}",
            applied.digest
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_oci_definition() {
        let d1 = "sha256:aaaa".to_string();
        let d2 = "sha256:bbbb".to_string();
        let c = chain_ids(&[d1.clone(), d2]);
        assert_eq!(c[0], d1);
        assert_eq!(c[1], format!("sha256:{:x}", Sha256::digest(b"sha256:aaaa sha256:bbbb")));
    }
}
