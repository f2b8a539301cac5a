//! Recovery: filling this chunk's copy of the extents meta made it a
//! *learner* of, while writes go on.
//!
//! Meta queues a recovery task (extent -> this chunk) and makes this chunk a
//! learner of the extent at a new epoch E in the same step; from then on
//! every access point that knows epoch E sends each write, unmap and flush
//! of the extent to this chunk too. [`RecoveryWorker`] polls meta for the
//! tasks targeting this chunk (every `poll_interval`, and at once after
//! [`RecoveryWorker::kick`], e.g. when the binary sees meta's revision
//! move) and runs at most `max_concurrent` of them at a time, one per
//! extent:
//!
//! 1. [`ExtentStore::begin_resync`] at E: the local copy is (re)created
//!    empty (writes that already arrived at E are kept) and the store starts
//!    tracking blocks touched by normal writes.
//! 2. Fence the source (a member of the set) to E before reading from it.
//!    An access point still writing with an older view is refused there,
//!    refreshes its view and sends the write to this learner too; every
//!    write that was *not* sent here is therefore on the source before the
//!    first read of it.
//! 3. Copy the extent in pieces (`piece_size`, 1-4 MiB) with
//!    [`ReplicaPeer::read`], falling back to another source on an error,
//!    and apply each piece with [`ExtentStore::resync_write`], which skips
//!    blocks a normal write touched meanwhile (those hold newer data).
//! 4. Flush, [`ExtentStore::end_resync`], and report the result with
//!    CompleteRecovery: on success meta promotes the learner to member; on
//!    failure it drops the learner and may queue the copy again.
//!
//! Progress is visible through [`RecoveryWorker::metrics`] (Prometheus
//! text via [`RecoveryMetrics::render_prometheus`]) and
//! [`RecoveryWorker::progress`].
//!
//! Meta is reached through the [`RecoveryMeta`] trait; [`MetaRecovery`]
//! implements it over the `ironblock.v1.Meta` gRPC client.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use ironblock_proto::v1 as pb;
use ironblock_proto::v1::meta_client::MetaClient;
use ironblock_proto::MetaChannel;
use parking_lot::Mutex;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::replica::{ChunkId, PeerDirectory, PeerError, ReplicaPeer};
use crate::store::{ExtentId, ExtentStore, BLOCK_SIZE};

/// Default size of one copied piece.
pub const DEFAULT_PIECE_SIZE: u64 = 4 << 20;
/// Default number of tasks copying at once.
pub const DEFAULT_MAX_CONCURRENT: usize = 2;

/// One recovery task as the worker needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveryTaskInfo {
    /// Meta's task id.
    pub id: u64,
    /// The extent, named by its store key.
    pub extent: ExtentId,
    /// The epoch that made the target a learner.
    pub epoch: u64,
    /// The chunk receiving the copy.
    pub target: ChunkId,
    /// Members to copy from, in order of preference.
    pub sources: Vec<ChunkId>,
}

/// Why meta could not answer the worker.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecoveryError {
    /// Meta is unreachable or timed out.
    #[error("meta unavailable: {0}")]
    Unavailable(String),
    /// Meta no longer knows the task (dropped: learner failed, target
    /// died, extent deleted).
    #[error("recovery task {0} is no longer known to meta")]
    TaskGone(u64),
    /// The request or answer made no sense.
    #[error("bad recovery request: {0}")]
    Invalid(String),
    /// Anything else meta said.
    #[error("meta error: {0}")]
    Other(String),
}

/// What the worker needs from meta.
#[async_trait]
pub trait RecoveryMeta: Send + Sync + 'static {
    /// The queued tasks whose target is `chunk`.
    async fn tasks(&self, chunk: &ChunkId) -> Result<Vec<RecoveryTaskInfo>, RecoveryError>;

    /// Report a task done (`Ok`) or failed (`Err(reason)`).
    async fn complete(&self, task_id: u64, result: Result<(), String>)
        -> Result<(), RecoveryError>;
}

/// [`RecoveryMeta`] over meta's gRPC API (ListRecoveryTasks and
/// CompleteRecovery).
#[derive(Clone, Debug)]
pub struct MetaRecovery {
    client: MetaClient<MetaChannel>,
    timeout: Duration,
}

impl MetaRecovery {
    /// Every call must finish within 10 s.
    pub fn new(client: MetaClient<MetaChannel>) -> Self {
        MetaRecovery {
            client,
            timeout: Duration::from_secs(10),
        }
    }

    /// Change the per-call timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    async fn call<T>(
        &self,
        task: Option<u64>,
        fut: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, RecoveryError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(match (s.code(), task) {
                (tonic::Code::NotFound, Some(id)) => RecoveryError::TaskGone(id),
                (tonic::Code::Unavailable | tonic::Code::DeadlineExceeded, _) => {
                    RecoveryError::Unavailable(s.message().to_string())
                }
                (tonic::Code::InvalidArgument, _) => {
                    RecoveryError::Invalid(s.message().to_string())
                }
                _ => RecoveryError::Other(format!("{:?}: {}", s.code(), s.message())),
            }),
            Err(_) => Err(RecoveryError::Unavailable(format!(
                "no answer within {:?}",
                self.timeout
            ))),
        }
    }
}

/// A task as meta serves it, in the worker's terms.
pub fn task_from_pb(t: &pb::RecoveryTask) -> RecoveryTaskInfo {
    let key = if t.store_key.is_empty() {
        t.volume_id.clone()
    } else {
        t.store_key.clone()
    };
    RecoveryTaskInfo {
        id: t.id,
        extent: ExtentId::new(key, t.extent_index),
        epoch: t.epoch,
        target: ChunkId(t.target_chunk.to_string()),
        sources: t.sources.iter().map(|s| ChunkId(s.to_string())).collect(),
    }
}

#[async_trait]
impl RecoveryMeta for MetaRecovery {
    async fn tasks(&self, chunk: &ChunkId) -> Result<Vec<RecoveryTaskInfo>, RecoveryError> {
        let id: u64 = chunk.as_str().parse().map_err(|_| {
            RecoveryError::Invalid(format!("chunk id {chunk} is not meta's numeric id"))
        })?;
        if id == 0 {
            return Err(RecoveryError::Invalid("chunk id 0".into()));
        }
        let mut c = self.client.clone();
        let r = self
            .call(
                None,
                c.list_recovery_tasks(pb::ListRecoveryTasksRequest { target_chunk: id }),
            )
            .await?;
        Ok(r.tasks.iter().map(task_from_pb).collect())
    }

    async fn complete(
        &self,
        task_id: u64,
        result: Result<(), String>,
    ) -> Result<(), RecoveryError> {
        let mut c = self.client.clone();
        let (success, error) = match result {
            Ok(()) => (true, String::new()),
            Err(e) => (false, e),
        };
        self.call(
            Some(task_id),
            c.complete_recovery(pb::CompleteRecoveryRequest {
                task_id,
                success,
                error,
            }),
        )
        .await?;
        Ok(())
    }
}

/// Settings of a [`RecoveryWorker`].
#[derive(Clone, Debug)]
pub struct RecoveryConfig {
    /// How often meta is asked for tasks (besides [`RecoveryWorker::kick`]).
    pub poll_interval: Duration,
    /// Tasks copying at once.
    pub max_concurrent: usize,
    /// Bytes per copied piece: a multiple of 4096, 1-4 MiB in practice.
    pub piece_size: u64,
    /// Each replica call (fence, read) must finish within this.
    pub call_timeout: Duration,
    /// How often a read refused with a newer epoch is retried at that epoch.
    pub stale_retries: u32,
}

impl Default for RecoveryConfig {
    fn default() -> Self {
        RecoveryConfig {
            poll_interval: Duration::from_secs(2),
            max_concurrent: DEFAULT_MAX_CONCURRENT,
            piece_size: DEFAULT_PIECE_SIZE,
            call_timeout: Duration::from_secs(30),
            stale_retries: 4,
        }
    }
}

/// Counters of the worker.
#[derive(Debug, Default)]
pub struct RecoveryMetrics {
    /// Tasks copying right now (gauge).
    pub tasks_running: AtomicU64,
    /// Tasks copied and accepted by meta.
    pub tasks_completed: AtomicU64,
    /// Tasks that failed (copy error, or meta refused the completion).
    pub tasks_failed: AtomicU64,
    /// Bytes read from sources and applied locally.
    pub bytes_copied: AtomicU64,
    /// Polls of meta that failed.
    pub poll_errors: AtomicU64,
}

impl RecoveryMetrics {
    /// Append the counters in Prometheus text format.
    pub fn render_prometheus(&self, out: &mut String) {
        let rows: [(&str, &str, &str, &AtomicU64); 5] = [
            (
                "ironblock_chunk_recovery_tasks_running",
                "gauge",
                "Recovery tasks copying now.",
                &self.tasks_running,
            ),
            (
                "ironblock_chunk_recovery_tasks_completed_total",
                "counter",
                "Recovery tasks completed.",
                &self.tasks_completed,
            ),
            (
                "ironblock_chunk_recovery_tasks_failed_total",
                "counter",
                "Recovery tasks failed.",
                &self.tasks_failed,
            ),
            (
                "ironblock_chunk_recovery_bytes_copied_total",
                "counter",
                "Bytes copied by recovery.",
                &self.bytes_copied,
            ),
            (
                "ironblock_chunk_recovery_poll_errors_total",
                "counter",
                "Failed polls of meta for recovery tasks.",
                &self.poll_errors,
            ),
        ];
        for (name, kind, help, v) in rows {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
        }
    }
}

/// One running copy, for status output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveryProgress {
    pub task_id: u64,
    pub extent: ExtentId,
    pub epoch: u64,
    /// The member currently copied from.
    pub source: Option<ChunkId>,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

struct Worker {
    meta: Arc<dyn RecoveryMeta>,
    store: ExtentStore,
    chunk: ChunkId,
    peers: Arc<dyn PeerDirectory>,
    cfg: RecoveryConfig,
    kick: Notify,
    limit: Arc<Semaphore>,
    running: Mutex<HashMap<u64, RecoveryProgress>>,
    /// How many tasks left `running` so far; moved under the `running`
    /// lock. A poll whose answer was made while one of our tasks finished
    /// may still list that task (see [`RecoveryWorker::poll_once`]).
    finished: AtomicU64,
    metrics: RecoveryMetrics,
    span: tracing::Span,
}

/// Runs the recovery tasks that target this chunk. Cheap to clone.
#[derive(Clone)]
pub struct RecoveryWorker {
    inner: Arc<Worker>,
}

impl std::fmt::Debug for RecoveryWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecoveryWorker")
            .field("chunk", &self.inner.chunk)
            .finish_non_exhaustive()
    }
}

/// Why one copy failed (reported to meta as text).
#[derive(Debug, thiserror::Error)]
enum CopyError {
    #[error("local store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("{0}")]
    Sources(String),
}

impl RecoveryWorker {
    /// A worker for chunk `chunk` (its id in meta), copying into `store`,
    /// reaching sources through `peers`.
    pub fn new(
        meta: Arc<dyn RecoveryMeta>,
        store: ExtentStore,
        chunk: ChunkId,
        peers: Arc<dyn PeerDirectory>,
        mut cfg: RecoveryConfig,
    ) -> Self {
        cfg.max_concurrent = cfg.max_concurrent.max(1);
        cfg.piece_size = (cfg.piece_size / BLOCK_SIZE).max(1) * BLOCK_SIZE;
        let span = tracing::info_span!("recovery", chunk = %chunk);
        RecoveryWorker {
            inner: Arc::new(Worker {
                meta,
                store,
                chunk,
                peers,
                limit: Arc::new(Semaphore::new(cfg.max_concurrent)),
                cfg,
                kick: Notify::new(),
                running: Mutex::new(HashMap::new()),
                finished: AtomicU64::new(0),
                metrics: RecoveryMetrics::default(),
                span,
            }),
        }
    }

    /// The one call a chunk server needs: a worker with default settings
    /// over meta's gRPC client, polling until `shutdown` is cancelled.
    pub fn start(
        meta: MetaClient<MetaChannel>,
        store: ExtentStore,
        chunk: ChunkId,
        peers: Arc<dyn PeerDirectory>,
        shutdown: CancellationToken,
    ) -> (RecoveryWorker, JoinHandle<()>) {
        let w = RecoveryWorker::new(
            Arc::new(MetaRecovery::new(meta)),
            store,
            chunk,
            peers,
            RecoveryConfig::default(),
        );
        let h = w.spawn(shutdown);
        (w, h)
    }

    /// Poll meta now (e.g. its revision moved).
    pub fn kick(&self) {
        self.inner.kick.notify_one();
    }

    pub fn metrics(&self) -> &RecoveryMetrics {
        &self.inner.metrics
    }

    /// The copies running now, by task id.
    pub fn progress(&self) -> Vec<RecoveryProgress> {
        let mut v: Vec<_> = self.inner.running.lock().values().cloned().collect();
        v.sort_by_key(|p| p.task_id);
        v
    }

    /// Run [`RecoveryWorker::run`] in a task.
    pub fn spawn(&self, shutdown: CancellationToken) -> JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move { me.run(shutdown).await })
    }

    /// Poll and copy until `shutdown` is cancelled; then stop the running
    /// copies (without reporting them: meta keeps the tasks) and return
    /// once they are gone (bounded).
    pub async fn run(self, shutdown: CancellationToken) {
        let span = self.inner.span.clone();
        async {
            tracing::info!(
                interval = ?self.inner.cfg.poll_interval,
                max_concurrent = self.inner.cfg.max_concurrent,
                "recovery worker up"
            );
            let mut tick = tokio::time::interval(self.inner.cfg.poll_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => {}
                    _ = self.inner.kick.notified() => {}
                }
                if let Err(e) = self.poll_once(&shutdown).await {
                    self.inner
                        .metrics
                        .poll_errors
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "polling meta for recovery tasks failed");
                }
            }
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while !self.inner.running.lock().is_empty() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            tracing::info!("recovery worker stopped");
        }
        .instrument(span)
        .await
    }

    /// Ask meta for tasks once and start as many as the concurrency limit
    /// allows (skipping tasks already running and extents already being
    /// copied). Returns how many were started.
    ///
    /// An answer is dropped (and meta asked again at once) if one of this
    /// worker's tasks finished while meta answered: the answer may have
    /// been made before meta took that task's CompleteRecovery and still
    /// list it, and running it again would restart a resync on a chunk
    /// that is a member by now (clearing blocks a normal write did not
    /// touch since the task's epoch).
    pub async fn poll_once(&self, shutdown: &CancellationToken) -> Result<usize, RecoveryError> {
        let w = &self.inner;
        let seen = w.finished.load(Ordering::SeqCst);
        let tasks = w.meta.tasks(&w.chunk).await?;
        let mut started = 0;
        for t in tasks {
            if t.target != w.chunk {
                continue;
            }
            let permit = {
                let mut running = w.running.lock();
                if w.finished.load(Ordering::SeqCst) != seen {
                    tracing::debug!("a task finished while meta answered; asking again");
                    self.kick();
                    return Ok(started);
                }
                if running.contains_key(&t.id) || running.values().any(|p| p.extent == t.extent) {
                    continue;
                }
                let Ok(permit) = w.limit.clone().try_acquire_owned() else {
                    break;
                };
                running.insert(
                    t.id,
                    RecoveryProgress {
                        task_id: t.id,
                        extent: t.extent.clone(),
                        epoch: t.epoch,
                        source: None,
                        bytes_done: 0,
                        bytes_total: w.store.extent_size(),
                    },
                );
                permit
            };
            w.metrics.tasks_running.fetch_add(1, Ordering::Relaxed);
            let me = self.clone();
            let stop = shutdown.clone();
            let span = tracing::info_span!(parent: &w.span, "recovery_task",
                task = t.id, extent = %t.extent, epoch = t.epoch);
            tokio::spawn(async move { me.run_task(t, permit, stop).await }.instrument(span));
            started += 1;
        }
        Ok(started)
    }

    async fn run_task(
        self,
        task: RecoveryTaskInfo,
        _permit: OwnedSemaphorePermit,
        shutdown: CancellationToken,
    ) {
        let w = &self.inner;
        tracing::info!(sources = ?task.sources, "recovery copy starting");
        let result = tokio::select! {
            r = self.copy(&task) => Some(r),
            _ = shutdown.cancelled() => None,
        };
        match w.store.end_resync(&task.extent).await {
            Ok(()) | Err(crate::store::StoreError::NotFound(_)) => {}
            Err(e) => tracing::warn!(error = %e, "ending the resync failed"),
        }
        let copied = matches!(result, Some(Ok(_)));
        match result {
            None => tracing::info!("shutting down; the copy is left to meta"),
            Some(Ok(bytes)) => match w.meta.complete(task.id, Ok(())).await {
                Ok(()) => {
                    w.metrics.tasks_completed.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(bytes, "recovery copy completed");
                }
                Err(e) => {
                    w.metrics.tasks_failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "copy done but meta did not take the completion");
                }
            },
            Some(Err(e)) => {
                w.metrics.tasks_failed.fetch_add(1, Ordering::Relaxed);
                let msg = e.to_string();
                tracing::warn!(error = %msg, "recovery copy failed");
                if let Err(e) = w.meta.complete(task.id, Err(msg)).await {
                    tracing::warn!(error = %e, "could not report the failed copy to meta");
                }
            }
        }
        {
            let mut running = w.running.lock();
            running.remove(&task.id);
            w.finished.fetch_add(1, Ordering::SeqCst);
        }
        w.metrics.tasks_running.fetch_sub(1, Ordering::Relaxed);
        // A slot is free: look for more work now after a success (after a
        // failure the poll interval paces the retries).
        if copied {
            self.kick();
        }
    }

    fn set_progress(&self, task: u64, source: Option<&ChunkId>, done: u64) {
        if let Some(p) = self.inner.running.lock().get_mut(&task) {
            p.source = source.cloned();
            p.bytes_done = done;
        }
    }

    /// The copy itself; returns the bytes copied.
    async fn copy(&self, task: &RecoveryTaskInfo) -> Result<u64, CopyError> {
        let w = &self.inner;
        let extent = &task.extent;
        extent.validate()?;
        let sources: Vec<ChunkId> = task
            .sources
            .iter()
            .filter(|c| **c != w.chunk)
            .cloned()
            .collect();
        if sources.is_empty() {
            return Err(CopyError::Sources("the task names no source".into()));
        }
        w.store.begin_resync(extent, task.epoch).await?;
        let size = w.store.extent_size();
        let mut src = Source {
            list: sources,
            current: 0,
            fenced: HashSet::new(),
            epoch: task.epoch,
        };
        let mut offset = 0;
        while offset < size {
            let len = w.cfg.piece_size.min(size - offset);
            let data = self.read_piece(&mut src, extent, offset, len).await?;
            w.store.resync_write(extent, offset, data).await?;
            offset += len;
            w.metrics.bytes_copied.fetch_add(len, Ordering::Relaxed);
            self.set_progress(task.id, src.list.get(src.current), offset);
        }
        w.store.flush(Some(extent)).await?;
        Ok(size)
    }

    async fn timed<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, PeerError>>,
    ) -> Result<T, PeerError> {
        let t = self.inner.cfg.call_timeout;
        tokio::time::timeout(t, fut)
            .await
            .unwrap_or_else(|_| Err(PeerError::Unreachable(format!("no answer within {t:?}"))))
    }

    /// Read one piece from the current source, moving on to the next ones
    /// on errors. A source is fenced to the learner epoch before its first
    /// read (see the module docs).
    async fn read_piece(
        &self,
        src: &mut Source,
        extent: &ExtentId,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, CopyError> {
        let n = src.list.len();
        let mut errors = Vec::new();
        for k in 0..n {
            let i = (src.current + k) % n;
            let chunk = src.list[i].clone();
            let Some(peer) = self.inner.peers.peer(&chunk) else {
                errors.push(format!("{chunk}: unknown chunk"));
                continue;
            };
            if !src.fenced.contains(&chunk) {
                match self.timed(peer.fence(extent, src.epoch)).await {
                    Ok(()) => {}
                    // Already past the learner epoch: fenced at least as
                    // strongly; read at its epoch.
                    Err(PeerError::StaleEpoch { have, .. }) => src.epoch = src.epoch.max(have),
                    Err(e) => {
                        tracing::warn!(source = %chunk, error = %e, "cannot fence source");
                        errors.push(format!("{chunk}: fence: {e}"));
                        continue;
                    }
                }
                src.fenced.insert(chunk.clone());
            }
            match self
                .read_from(peer.as_ref(), src, extent, offset, len)
                .await
            {
                Ok(data) => {
                    if i != src.current {
                        tracing::info!(source = %chunk, offset, "copying from another source");
                    }
                    src.current = i;
                    return Ok(data);
                }
                Err(e) => {
                    tracing::warn!(source = %chunk, offset, len, error = %e, "source read failed");
                    errors.push(format!("{chunk}: {e}"));
                }
            }
        }
        Err(CopyError::Sources(format!(
            "no source could serve bytes {offset}+{len}: {}",
            errors.join("; ")
        )))
    }

    async fn read_from(
        &self,
        peer: &dyn ReplicaPeer,
        src: &mut Source,
        extent: &ExtentId,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, PeerError> {
        let mut tries = 0;
        loop {
            match self.timed(peer.read(extent, src.epoch, offset, len)).await {
                Ok(d) if d.len() as u64 == len => return Ok(d),
                Ok(d) => {
                    return Err(PeerError::Other(format!(
                        "read returned {} bytes, asked for {len}",
                        d.len()
                    )))
                }
                Err(PeerError::StaleEpoch { have, .. })
                    if have > src.epoch && tries < self.inner.cfg.stale_retries =>
                {
                    tries += 1;
                    src.epoch = have;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// The sources of one copy and how far fencing got.
struct Source {
    list: Vec<ChunkId>,
    current: usize,
    fenced: HashSet<ChunkId>,
    /// Epoch reads carry: the learner epoch, or newer if a source is past it.
    epoch: u64,
}
