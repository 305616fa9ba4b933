//! The CRI image service (`runtime.v1.ImageService`) on the daemon's
//! socket, so that a kubelet can be pointed at it
//! (`--image-service-endpoint`). Every call is passed to containerd's CRI
//! at `[image_service] containerd_address` as raw bytes, so nothing a
//! kubelet sends is lost on the way, whatever CRI version it speaks. The
//! one exception is `PullImage` of a `nix:0/...` ref (a Nix image archive
//! in a store path), which containerd cannot resolve: it is answered here.
//! The archive is fetched through our verified store (signed caches, no
//! nix-daemon), loaded into containerd's `k8s.io` namespace for snapshotter
//! `nix` (its Nix layer made from labels, never downloaded), and the answer
//! waits until containerd's CRI reports the image, whose id it returns.
//!
//! The connection to containerd is made on first use and remade after a
//! failure, so the daemon starts (and serves snapshots) while containerd is
//! still down; calls meanwhile fail with UNAVAILABLE naming the socket.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes};
use prost::Message;
use tokio::sync::Mutex;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::server::NamedService;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::api::cri::{ImageSpec, ImageStatusRequest, ImageStatusResponse, PullImageRequest, PullImageResponse};
use crate::nixfmt::StorePath;
use crate::snapshots::nix::StoreSlot;

/// The service's gRPC name: paths are `/runtime.v1.ImageService/<Method>`.
const SERVICE: &str = "runtime.v1.ImageService";

/// Most bytes a request may carry (a kubelet's are a few KiB).
const MAX_MESSAGE: usize = 16 << 20;

/// Passes messages on as they are.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

#[derive(Debug, Clone, Copy, Default)]
pub struct RawCoder;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCoder;
    type Decoder = RawCoder;

    fn encoder(&mut self) -> Self::Encoder {
        RawCoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCoder
    }
}

impl Encoder for RawCoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCoder {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        let n = src.remaining();
        Ok(Some(src.copy_to_bytes(n)))
    }
}

/// The image service: a pass-through to containerd's CRI.
#[derive(Clone)]
pub struct ImageService {
    inner: Arc<Inner>,
}

struct Inner {
    containerd: PathBuf,
    channel: Mutex<Option<Channel>>,
    store: StoreSlot,
    /// How long a pull waits for the store to open, and for containerd's
    /// CRI to report an image just loaded.
    timeout: std::time::Duration,
}

/// The namespace containerd's CRI keeps its images in.
const CRI_NAMESPACE: &str = "k8s.io";

impl ImageService {
    pub fn new(containerd: PathBuf, store: StoreSlot, timeout: std::time::Duration) -> ImageService {
        ImageService {
            inner: Arc::new(Inner {
                containerd,
                channel: Mutex::new(None),
                store,
                timeout,
            }),
        }
    }
}

impl NamedService for ImageService {
    const NAME: &'static str = SERVICE;
}

impl Inner {
    fn unreachable(&self, e: impl std::fmt::Display) -> Status {
        Status::unavailable(format!(
            "containerd's CRI at {} is unreachable: {e}",
            self.containerd.display()
        ))
    }

    /// The channel to containerd, made on first use.
    async fn channel(&self) -> Result<Channel, Status> {
        let mut slot = self.channel.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let c = crate::uds::connect(&self.containerd)
            .await
            .map_err(|e| self.unreachable(e))?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Passes one call to containerd's CRI as it came.
    async fn forward(&self, method: &str, req: Request<Bytes>) -> Result<Response<Bytes>, Status> {
        let channel = self.channel().await?;
        let mut client = tonic::client::Grpc::new(channel).max_decoding_message_size(MAX_MESSAGE);
        client.ready().await.map_err(|e| self.unreachable(e))?;
        let path = http::uri::PathAndQuery::try_from(format!("/{SERVICE}/{method}"))
            .map_err(|e| Status::internal(e.to_string()))?;
        let result = client.unary(req, path, RawCodec).await;
        if let Err(s) = &result {
            if s.code() == tonic::Code::Unavailable {
                // Reconnect next time (containerd restarted, or went away).
                *self.channel.lock().await = None;
            }
        }
        result
    }

    async fn call(&self, method: &str, req: Request<Bytes>) -> Result<Response<Bytes>, Status> {
        if method == "PullImage" {
            let msg = PullImageRequest::decode(req.get_ref().clone())
                .map_err(|e| Status::invalid_argument(format!("PullImage: {e}")))?;
            let image = msg.image.map(|i| i.image).unwrap_or_default();
            if is_nix_ref(&image) {
                let id = self.pull_nix(&image).await?;
                let mut out = Vec::new();
                PullImageResponse { image_ref: id }
                    .encode(&mut out)
                    .map_err(|e| Status::internal(e.to_string()))?;
                return Ok(Response::new(Bytes::from(out)));
            }
        }
        self.forward(method, req).await
    }

    /// `PullImage` of a `nix:0/nix/store/<hash>-<name>.tar[:latest]` ref.
    async fn pull_nix(&self, image: &str) -> Result<String, Status> {
        let archive = nix_ref_path(image).map_err(|m| Status::invalid_argument(format!("{image}: {m}")))?;
        let store = self.opened_store(image).await?;
        let loc = store.ensure(&archive).await.map_err(|e| pull_error(image, &e))?;
        let dir = store.holder(&loc);
        // Beneath the store, never following a symlink: a store path is
        // untrusted content.
        let file = nix_snapshotter_fuse::beneath::open_file(
            std::os::fd::AsFd::as_fd(dir.as_ref()),
            std::path::Path::new(archive.base_name()),
        )
        .map_err(|e| Status::invalid_argument(format!("{image}: {archive} is not an image archive (a file): {e}")))?;
        // The name containerd's CRI looks images up by (with its tag).
        let name = format!("nix:0{archive}:latest");
        let fd_path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&file));
        crate::image::load::load(
            &self.containerd,
            CRI_NAMESPACE,
            std::path::Path::new(&fd_path),
            "nix",
            Some(&name),
        )
        .await
        .map_err(|e| match e {
            crate::image::load::LoadError::Connect { .. } => Status::unavailable(format!("{image}: {e}")),
            crate::image::load::LoadError::Archive { msg, .. } => {
                Status::invalid_argument(format!("{image}: not a Nix image archive: {msg}"))
            }
            crate::image::load::LoadError::Image(e) => {
                Status::invalid_argument(format!("{image}: not a Nix image archive: {e}"))
            }
            e => Status::internal(format!("{image}: loading into containerd: {e}")),
        })?;
        drop(file);
        self.wait_for_cri(image, &name).await
    }

    /// The store, waiting while it opens.
    async fn opened_store(&self, image: &str) -> Result<Arc<crate::store::Store>, Status> {
        let start = std::time::Instant::now();
        loop {
            if let Some(s) = self.store.get() {
                return Ok(s.clone());
            }
            if start.elapsed() > self.timeout {
                return Err(Status::unavailable(format!(
                    "{image}: the local store did not open (see the daemon's log)"
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Waits until containerd's CRI reports image `name` (it learns of
    /// images loaded through containerd's API by events, a little later);
    /// returns its id.
    async fn wait_for_cri(&self, image: &str, name: &str) -> Result<String, Status> {
        let mut req = Vec::new();
        ImageStatusRequest {
            image: Some(ImageSpec {
                image: name.to_string(),
                ..Default::default()
            }),
            verbose: false,
        }
        .encode(&mut req)
        .map_err(|e| Status::internal(e.to_string()))?;
        let req = Bytes::from(req);
        let start = std::time::Instant::now();
        loop {
            let answer = self.forward("ImageStatus", Request::new(req.clone())).await?;
            let status = ImageStatusResponse::decode(answer.into_inner())
                .map_err(|e| Status::internal(format!("containerd's CRI ImageStatus: {e}")))?;
            if let Some(id) = status.image.map(|i| i.id).filter(|id| !id.is_empty()) {
                return Ok(id);
            }
            if start.elapsed() > self.timeout {
                return Err(Status::deadline_exceeded(format!(
                    "{image}: loaded, but containerd's CRI did not report it within {:?}",
                    self.timeout
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
}

/// The archive's store path in a `nix:0` ref; only the tag `latest` (which
/// a kubelet adds) is taken, as the Go project does.
pub fn nix_ref_path(image: &str) -> Result<StorePath, String> {
    let rest = image.strip_prefix("nix:0").ok_or("not a nix:0 ref")?;
    let rest = rest.strip_suffix(":latest").unwrap_or(rest);
    if rest
        .rsplit('/')
        .next()
        .is_some_and(|last| last.contains(':') || last.contains('@'))
    {
        return Err("a nix:0 ref takes no tag or digest but :latest".into());
    }
    StorePath::parse(rest).map_err(|e| e.to_string())
}

fn pull_error(image: &str, e: &crate::store::StoreError) -> Status {
    use crate::store::StoreError;
    match e {
        StoreError::NotFound { .. } => Status::not_found(format!("{image}: {e}")),
        StoreError::Untrusted { .. } | StoreError::BadNarInfo { .. } | StoreError::Verify { .. } => {
            Status::permission_denied(format!("{image}: {e}"))
        }
        _ => Status::unavailable(format!("{image}: {e}")),
    }
}

/// A `nix:0/nix/store/...` ref (a kubelet may have added `:latest`).
pub fn is_nix_ref(image: &str) -> bool {
    image.starts_with("nix:0/")
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// One unary call, for tonic's server machinery.
struct Unary {
    inner: Arc<Inner>,
    method: String,
}

impl tonic::server::UnaryService<Bytes> for Unary {
    type Response = Bytes;
    type Future = BoxFuture<Result<Response<Bytes>, Status>>;

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let (inner, method) = (self.inner.clone(), self.method.clone());
        Box::pin(async move { inner.call(&method, req).await })
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for ImageService {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let inner = self.inner.clone();
        let method = req
            .uri()
            .path()
            .strip_prefix(&format!("/{SERVICE}/"))
            .unwrap_or("")
            .to_string();
        Box::pin(async move {
            if method.is_empty() || method.contains('/') || method.starts_with("Stream") {
                // Streams (StreamImages) and unknown paths: as containerd
                // itself answers a method it does not know.
                let status = Status::unimplemented(format!("{SERVICE}/{method} is not served"));
                return Ok(status.into_http());
            }
            let mut grpc = tonic::server::Grpc::new(RawCodec).max_decoding_message_size(MAX_MESSAGE);
            Ok(grpc.unary(Unary { inner, method }, req).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nix_refs_take_only_the_latest_tag() {
        let p = "/nix/store/0c4n3pzm6y2y0yw4a0xgxkc0wczr7qj5-nix-image-redis.tar";
        for r in [format!("nix:0{p}"), format!("nix:0{p}:latest")] {
            assert_eq!(nix_ref_path(&r).unwrap().to_string(), p);
        }
        for bad in [
            format!("nix:0{p}:v1"),
            format!("nix:0{p}@sha256:00"),
            "nix:0/tmp/x.tar".to_string(),
            "nix:0/nix/store/short.tar".to_string(),
            "docker.io/library/redis:latest".to_string(),
        ] {
            assert!(nix_ref_path(&bad).is_err(), "{bad}");
        }
    }
}
