//! Which store paths an image in containerd runs from: its manifest's Nix
//! layer names them (the closure-info path, or the legacy list), read
//! through containerd's Images and Content services.

use std::path::Path;

use futures::StreamExt;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::BenchError;
use crate::api::content::content_client::ContentClient;
use crate::api::content::ReadContentRequest;
use crate::api::images::images_client::ImagesClient;
use crate::api::images::GetImageRequest;
use crate::image::load::Headers;
use crate::nixlayer::{LABEL_CLOSURE, LABEL_PATH_PREFIX};

/// Manifests and indexes are small: more than this is not one.
const MAX_MANIFEST: usize = 4 << 20;

type Svc = InterceptedService<Channel, Headers>;

/// The store paths the Nix layer of `image` names (the roots of its
/// closure), from containerd at `address` in namespace `ns`.
pub async fn nix_roots(address: &Path, ns: &str, image: &str) -> Result<Vec<String>, BenchError> {
    let headers = Headers::namespace(ns).ok_or_else(|| BenchError::Usage(format!("invalid namespace {ns:?}")))?;
    let channel = crate::uds::connect(address)
        .await
        .map_err(|e| BenchError::NoContainerd {
            address: address.to_path_buf(),
            msg: e.to_string(),
        })?;
    let mut images = ImagesClient::with_interceptor(channel.clone(), headers.clone());
    let found = images
        .get(GetImageRequest { name: image.into() })
        .await
        .map_err(|s| match s.code() {
            tonic::Code::NotFound => BenchError::NoImage {
                image: image.into(),
                namespace: ns.into(),
            },
            tonic::Code::Unavailable => BenchError::NoContainerd {
                address: address.to_path_buf(),
                msg: s.message().into(),
            },
            _ => BenchError::Containerd(format!("images.Get {image}: {}", s.message())),
        })?;
    let target = found
        .into_inner()
        .image
        .and_then(|i| i.target)
        .ok_or_else(|| BenchError::Containerd(format!("image {image} has no target")))?;
    let mut content = ContentClient::with_interceptor(channel, headers);
    let mut doc = read_json(&mut content, &target.digest).await?;
    if let Some(manifests) = doc.get("manifests").and_then(|m| m.as_array()) {
        // An index: the manifest for this machine, else the first.
        let arch = crate::image::host_arch();
        let pick = manifests
            .iter()
            .find(|m| m["platform"]["architecture"] == arch.as_str() && m["platform"]["os"] == "linux")
            .or_else(|| manifests.first())
            .and_then(|m| m["digest"].as_str())
            .ok_or_else(|| BenchError::NotNix(format!("{image}: its index lists no manifest")))?
            .to_string();
        doc = read_json(&mut content, &pick).await?;
    }
    let layers = doc["layers"].as_array().cloned().unwrap_or_default();
    for layer in layers.iter().rev() {
        let Some(ann) = layer["annotations"].as_object() else {
            continue;
        };
        if let Some(p) = ann.get(LABEL_CLOSURE).and_then(|v| v.as_str()) {
            return Ok(vec![p.to_string()]);
        }
        let listed: Vec<String> = ann
            .iter()
            .filter(|(k, _)| k.starts_with(LABEL_PATH_PREFIX))
            .filter_map(|(_, v)| v.as_str().map(str::to_string))
            .collect();
        if !listed.is_empty() {
            return Ok(listed);
        }
    }
    Err(BenchError::NotNix(format!(
        "{image}: no layer of its manifest carries {LABEL_CLOSURE} or {LABEL_PATH_PREFIX}<i> annotations \
         (build it with `nix-snapshotter image build` or nix/buildImage)"
    )))
}

async fn read_json(content: &mut ContentClient<Svc>, digest: &str) -> Result<serde_json::Value, BenchError> {
    let bad = |m: String| BenchError::Containerd(format!("content {digest}: {m}"));
    let mut stream = content
        .read(ReadContentRequest {
            digest: digest.into(),
            offset: 0,
            size: 0,
        })
        .await
        .map_err(|s| bad(s.message().into()))?
        .into_inner();
    let mut bytes = Vec::new();
    while let Some(part) = stream.next().await {
        bytes.extend_from_slice(&part.map_err(|s| bad(s.message().into()))?.data);
        if bytes.len() > MAX_MANIFEST {
            return Err(bad(format!("more than {MAX_MANIFEST} bytes: not a manifest")));
        }
    }
    serde_json::from_slice(&bytes).map_err(|e| bad(format!("not JSON: {e}")))
}
