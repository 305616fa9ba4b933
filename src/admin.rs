//! The admin API on the daemon's socket (`nixsnapshotter.admin.v1.Admin`):
//! prewarm (`fetch`), `gc`, `evict` and `status` on a running daemon, which
//! holds the state database the one-shot commands would otherwise open.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures::StreamExt;
use tonic::{Request, Response, Status};

use crate::api::admin::admin_server::Admin;
use crate::api::admin::{
    ActivityRequest, ActivityResponse, CacheStatus, Download, EvictRequest, EvictResponse, FetchRequest, FetchResponse,
    GcRequest, GcResponse, InterposeEvent, InterposeRequest, ProfileRequest, ProfileResponse, StatusRequest,
    StatusResponse,
};
use crate::config::Config;
use crate::nixfmt::StorePath;
use crate::snapshots::nix::StoreSlot;
use crate::snapshots::Snapshotter;
use crate::store::{Store, StoreError};

pub struct AdminService {
    sn: Arc<Snapshotter>,
    store: StoreSlot,
    cfg: Config,
    /// An Interpose call is open (one at a time).
    interposed: Arc<std::sync::atomic::AtomicBool>,
}

impl AdminService {
    pub fn new(sn: Arc<Snapshotter>, store: StoreSlot, cfg: Config) -> AdminService {
        AdminService {
            sn,
            store,
            cfg,
            interposed: Arc::default(),
        }
    }

    fn store(&self) -> Result<Arc<Store>, Status> {
        self.store
            .get()
            .cloned()
            .ok_or_else(|| Status::unavailable("the local store is not open yet (see the daemon's log)"))
    }
}

/// Store paths from a request, each checked; the first bad one is named.
pub fn parse_paths(paths: &[String]) -> Result<Vec<StorePath>, Status> {
    if paths.is_empty() {
        return Err(Status::invalid_argument("no store paths given"));
    }
    paths
        .iter()
        .map(|p| StorePath::parse(p).map_err(|e| Status::invalid_argument(format!("{p:?}: {e}"))))
        .collect()
}

fn store_status(e: &StoreError) -> Status {
    match e {
        StoreError::NotFound { .. } => Status::not_found(e.to_string()),
        StoreError::InUse { .. } => Status::failed_precondition(e.to_string()),
        StoreError::BadNarInfo { .. } | StoreError::Untrusted { .. } | StoreError::Verify { .. } => {
            Status::permission_denied(e.to_string())
        }
        _ => Status::unavailable(e.to_string()),
    }
}

/// Fetches `targets` (at most `parallel` at once); returns each one's result.
pub async fn fetch_all(
    store: &Arc<Store>,
    targets: &[StorePath],
    parallel: usize,
) -> Vec<(StorePath, Result<crate::store::Location, Arc<StoreError>>)> {
    futures::stream::iter(targets.iter().cloned().map(|p| {
        let store = store.clone();
        async move {
            let r = store.ensure(&p).await;
            (p, r)
        }
    }))
    .buffer_unordered(parallel.max(1))
    .collect()
    .await
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn fetch(&self, req: Request<FetchRequest>) -> Result<Response<FetchResponse>, Status> {
        let req = req.into_inner();
        let roots = parse_paths(&req.paths)?;
        let store = self.store()?;
        let targets = if req.closure {
            store.closure(&roots).await.map_err(|e| store_status(&e))?
        } else {
            roots
        };
        if req.list_only {
            return Ok(Response::new(FetchResponse {
                paths: targets.iter().map(ToString::to_string).collect(),
                ..Default::default()
            }));
        }
        let cold: Vec<&StorePath> = targets.iter().filter(|p| store.local(p).is_none()).collect();
        let cold = cold.len() as u64;
        let bytes_before = store.counters.bytes_downloaded.load(Ordering::Relaxed);
        let results = fetch_all(&store, &targets, self.cfg.fetch.max_parallel).await;
        let mut out = FetchResponse {
            fetched: cold,
            ..Default::default()
        };
        for (p, r) in results {
            match r {
                Ok(_) => out.paths.push(p.to_string()),
                Err(e) => out.errors.push(e.to_string()),
            }
        }
        out.fetched = out.fetched.saturating_sub(out.errors.len() as u64);
        out.bytes_downloaded = store
            .counters
            .bytes_downloaded
            .load(Ordering::Relaxed)
            .saturating_sub(bytes_before);
        let _ = store.flush_uses();
        Ok(Response::new(out))
    }

    async fn gc(&self, req: Request<GcRequest>) -> Result<Response<GcResponse>, Status> {
        let target = req.into_inner().max_size.unwrap_or(self.cfg.store.max_size.0);
        let store = self.store()?;
        let report = tokio::task::spawn_blocking(move || store.gc(target))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| store_status(&e))?;
        Ok(Response::new(GcResponse {
            removed: report.removed,
            freed: report.freed,
            remaining: report.remaining,
            kept_in_use: report.kept_in_use as u64,
        }))
    }

    async fn evict(&self, req: Request<EvictRequest>) -> Result<Response<EvictResponse>, Status> {
        let paths = parse_paths(&req.into_inner().paths)?;
        let store = self.store()?;
        let report = tokio::task::spawn_blocking(move || store.evict(&paths))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| store_status(&e))?;
        Ok(Response::new(EvictResponse {
            evicted: report.evicted,
            absent: report.absent,
            freed: report.freed,
        }))
    }

    async fn activity(&self, req: Request<ActivityRequest>) -> Result<Response<ActivityResponse>, Status> {
        let store = self.store()?;
        let (records, last, first_kept) = store.journal.since(req.get_ref().after);
        Ok(Response::new(ActivityResponse {
            downloads: records
                .into_iter()
                .map(|r| Download {
                    seq: r.seq,
                    path: r.path,
                    kind: r.kind.as_str().to_string(),
                    cache: r.cache,
                    bytes: r.bytes,
                    micros: r.took.as_micros() as u64,
                    error: r.error,
                })
                .collect(),
            last,
            first_kept,
        }))
    }

    type InterposeStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<InterposeEvent, Status>> + Send>>;

    async fn interpose(&self, req: Request<InterposeRequest>) -> Result<Response<Self::InterposeStream>, Status> {
        let store = self.store()?;
        let routes = req.into_inner().routes;
        if routes.is_empty() {
            return Err(Status::invalid_argument("no routes given"));
        }
        let caches = store.caches().await.map_err(|e| store_status(&e))?;
        let mut plan = Vec::new();
        for r in &routes {
            let via: std::net::SocketAddr = r
                .via
                .parse()
                .map_err(|e| Status::invalid_argument(format!("route via {:?}: {e}", r.via)))?;
            let i = caches.iter().position(|c| c.url() == r.cache).ok_or_else(|| {
                Status::invalid_argument(format!("{:?} is not one of the daemon's substituters", r.cache))
            })?;
            plan.push((i, via));
        }
        if self.interposed.swap(true, Ordering::AcqRel) {
            return Err(Status::failed_precondition(
                "another client is already routing the caches elsewhere (a bench running?)",
            ));
        }
        // From here the guard puts everything back, however this ends.
        let guard = Detours {
            store: store.clone(),
            caches: plan.iter().map(|(i, _)| *i).collect(),
            flag: self.interposed.clone(),
        };
        for (i, via) in &plan {
            caches[*i]
                .inner
                .detour(Some(*via))
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        tracing::info!(routes = routes.len(), "caches routed through other addresses");
        let first = InterposeEvent {
            message: format!("{} cache(s) routed", routes.len()),
        };
        Ok(Response::new(Box::pin(Held {
            first: Some(first),
            _guard: guard,
        })))
    }

    async fn profile(&self, req: Request<ProfileRequest>) -> Result<Response<ProfileResponse>, Status> {
        let (text, ranges) = self.store()?.recorded_profile(req.get_ref().reset);
        Ok(Response::new(ProfileResponse {
            text,
            ranges: ranges as u64,
        }))
    }

    async fn status(&self, _req: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let mut out = StatusResponse {
            root: self.cfg.root.display().to_string(),
            store_max_size: self.cfg.store.max_size.0,
            ..Default::default()
        };
        if let Some(f) = self.sn.fuse_status() {
            out.views = f.views;
            out.session_kept = f.kept;
            out.session_resumed = f.resumed;
            out.fuse_nodes = f.nodes as u64;
            out.open_files = f.open_files as u64;
        }
        if let Some(store) = self.store.get().cloned() {
            out.store_open = true;
            let usage = tokio::task::spawn_blocking({
                let store = store.clone();
                move || store.usage()
            })
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| store_status(&e))?;
            (out.store_paths, out.store_bytes) = usage;
            out.fetches_in_flight = store.in_flight() as u64;
            out.pinned = store.pinned_count() as u64;
            out.evictions = store.counters.evictions.load(Ordering::Relaxed);
            out.caches = store
                .opened_caches()
                .iter()
                .map(|c| CacheStatus {
                    url: c.url().to_string(),
                    requests: c.stats.requests.load(Ordering::Relaxed),
                    nar_fetches: c.stats.nar_fetches.load(Ordering::Relaxed),
                    bytes: c.stats.bytes.load(Ordering::Relaxed),
                    errors: c.stats.errors.load(Ordering::Relaxed),
                    retries: c.stats.retries.load(Ordering::Relaxed),
                    last_error: c.stats.last_error.lock().map(|l| l.clone()).unwrap_or_default(),
                })
                .collect();
        }
        Ok(Response::new(out))
    }
}

/// Caches routed elsewhere by an open Interpose call: back to their own
/// addresses when the call ends (the client hung up, or went away).
struct Detours {
    store: Arc<Store>,
    caches: Vec<usize>,
    flag: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for Detours {
    fn drop(&mut self) {
        let caches = self.store.opened_caches();
        for i in &self.caches {
            if let Some(c) = caches.get(*i) {
                let _ = c.inner.detour(None);
            }
        }
        self.flag.store(false, Ordering::Release);
        tracing::info!("caches back on their own addresses");
    }
}

/// Interpose's answer: one event, then open until the client hangs up
/// (tonic drops the stream then, and with it the guard).
struct Held {
    first: Option<InterposeEvent>,
    _guard: Detours,
}

impl futures::Stream for Held {
    type Item = Result<InterposeEvent, Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        match self.first.take() {
            Some(e) => std::task::Poll::Ready(Some(Ok(e))),
            // Never woken: nothing more comes until the call is dropped.
            None => std::task::Poll::Pending,
        }
    }
}
