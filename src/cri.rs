//! The CRI image service (`runtime.v1.ImageService`) on the daemon's
//! socket, so that a kubelet can be pointed at it
//! (`--image-service-endpoint`). Every call is passed to containerd's CRI
//! at `[image_service] containerd_address` as raw bytes, so nothing a
//! kubelet sends is lost on the way, whatever CRI version it speaks. The
//! one exception is `PullImage` of a `nix:0/...` ref (a Nix image archive
//! in a store path), which containerd cannot resolve: it is answered here.
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

use crate::api::cri::PullImageRequest;

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
}

impl ImageService {
    pub fn new(containerd: PathBuf) -> ImageService {
        ImageService {
            inner: Arc::new(Inner {
                containerd,
                channel: Mutex::new(None),
            }),
        }
    }
}

impl NamedService for ImageService {
    const NAME: &'static str = SERVICE;
}

impl Inner {
    /// The channel to containerd, made on first use.
    async fn channel(&self) -> Result<Channel, Status> {
        let mut slot = self.channel.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let c = crate::uds::connect(&self.containerd).await.map_err(|e| {
            Status::unavailable(format!(
                "containerd's CRI at {} is unreachable: {e}",
                self.containerd.display()
            ))
        })?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Passes one call to containerd's CRI as it came.
    async fn forward(&self, method: &str, req: Request<Bytes>) -> Result<Response<Bytes>, Status> {
        let channel = self.channel().await?;
        let mut client = tonic::client::Grpc::new(channel).max_decoding_message_size(MAX_MESSAGE);
        client.ready().await.map_err(|e| {
            Status::unavailable(format!(
                "containerd's CRI at {} is unreachable: {e}",
                self.containerd.display()
            ))
        })?;
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
                return Err(Status::unimplemented(format!(
                    "{image:?}: nix:0 image refs are not served by this build yet; \
                     push the image to a registry and pull it from there"
                )));
            }
        }
        self.forward(method, req).await
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
