//! The gRPC face of the snapshotter: containerd's Snapshots service.
//! Each call runs the synchronous core on tokio's blocking pool.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::api::snapshots::{self as pb, snapshots_server::Snapshots};
use crate::snapshots::{Info, Kind, Snapshotter};

/// How many infos one List response message carries (as containerd's own service).
const LIST_BATCH: usize = 100;

#[derive(Clone)]
pub struct SnapshotService {
    sn: Arc<Snapshotter>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl SnapshotService {
    pub fn new(sn: Arc<Snapshotter>) -> Self {
        SnapshotService { sn, metrics: None }
    }

    /// Counts each call by operation and result.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn count(&self, call: &'static str, code: tonic::Code) {
        if let Some(m) = &self.metrics {
            m.snapshot_op(call, crate::metrics::code_name(code));
        }
    }

    /// Runs `f` against the core off the async runtime and maps its error.
    async fn run<T: Send + 'static>(
        &self,
        call: &'static str,
        f: impl FnOnce(&Snapshotter) -> crate::error::Result<T> + Send + 'static,
    ) -> Result<T, Status> {
        let sn = self.sn.clone();
        let result = match tokio::task::spawn_blocking(move || f(&sn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                tracing::debug!(call, error = %e, "call failed");
                Err(Status::from(e))
            }
            Err(e) => Err(Status::internal(format!("{call}: worker failed: {e}"))),
        };
        self.count(call, result.as_ref().map_or_else(|s| s.code(), |_| tonic::Code::Ok));
        result
    }
}

fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or(Duration::ZERO);
    prost_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn to_pb(info: Info) -> pb::Info {
    pb::Info {
        name: info.name,
        parent: info.parent,
        kind: match info.kind {
            Kind::View => pb::Kind::View,
            Kind::Active => pb::Kind::Active,
            Kind::Committed => pb::Kind::Committed,
        } as i32,
        created_at: Some(timestamp(info.created)),
        updated_at: Some(timestamp(info.updated)),
        labels: info.labels.into_iter().collect(),
    }
}

#[tonic::async_trait]
impl Snapshots for SnapshotService {
    async fn prepare(
        &self,
        req: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = req.into_inner();
        tracing::debug!(key = %r.key, parent = %r.parent, labels = ?r.labels, "prepare");
        let mounts = self
            .run("prepare", move |sn| sn.prepare(&r.key, &r.parent, r.labels))
            .await?;
        Ok(Response::new(pb::PrepareSnapshotResponse { mounts }))
    }

    async fn view(&self, req: Request<pb::ViewSnapshotRequest>) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = req.into_inner();
        tracing::debug!(key = %r.key, parent = %r.parent, "view");
        let mounts = self.run("view", move |sn| sn.view(&r.key, &r.parent, r.labels)).await?;
        Ok(Response::new(pb::ViewSnapshotResponse { mounts }))
    }

    async fn mounts(&self, req: Request<pb::MountsRequest>) -> Result<Response<pb::MountsResponse>, Status> {
        let r = req.into_inner();
        tracing::debug!(key = %r.key, "mounts");
        let mounts = self.run("mounts", move |sn| sn.mounts(&r.key)).await?;
        Ok(Response::new(pb::MountsResponse { mounts }))
    }

    async fn commit(&self, req: Request<pb::CommitSnapshotRequest>) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        tracing::debug!(key = %r.key, name = %r.name, "commit");
        self.run("commit", move |sn| sn.commit(&r.name, &r.key, r.labels))
            .await?;
        Ok(Response::new(()))
    }

    async fn remove(&self, req: Request<pb::RemoveSnapshotRequest>) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        tracing::debug!(key = %r.key, "remove");
        self.run("remove", move |sn| sn.remove(&r.key)).await?;
        Ok(Response::new(()))
    }

    async fn stat(&self, req: Request<pb::StatSnapshotRequest>) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let r = req.into_inner();
        let info = self.run("stat", move |sn| sn.stat(&r.key)).await?;
        Ok(Response::new(pb::StatSnapshotResponse {
            info: Some(to_pb(info)),
        }))
    }

    async fn update(
        &self,
        req: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = req.into_inner();
        let info = r
            .info
            .ok_or_else(|| Status::invalid_argument("update: info is required"))?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        tracing::debug!(name = %info.name, ?paths, "update");
        let info = self
            .run("update", move |sn| sn.update(&info.name, info.labels, &paths))
            .await?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(to_pb(info)),
        }))
    }

    type ListStream = ReceiverStream<Result<pb::ListSnapshotsResponse, Status>>;

    async fn list(&self, req: Request<pb::ListSnapshotsRequest>) -> Result<Response<Self::ListStream>, Status> {
        let r = req.into_inner();
        let infos = self.run("list", move |sn| sn.list(&r.filters)).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut infos = infos.into_iter().map(to_pb).peekable();
            while infos.peek().is_some() {
                let info: Vec<_> = infos.by_ref().take(LIST_BATCH).collect();
                if tx.send(Ok(pb::ListSnapshotsResponse { info })).await.is_err() {
                    break; // client went away
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn usage(&self, req: Request<pb::UsageRequest>) -> Result<Response<pb::UsageResponse>, Status> {
        let r = req.into_inner();
        let u = self.run("usage", move |sn| sn.usage(&r.key)).await?;
        Ok(Response::new(pb::UsageResponse {
            size: u.size,
            inodes: u.inodes,
        }))
    }

    async fn cleanup(&self, _req: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        let removed = self.run("cleanup", |sn| sn.cleanup()).await?;
        tracing::debug!(removed, "cleanup");
        Ok(Response::new(()))
    }
}
