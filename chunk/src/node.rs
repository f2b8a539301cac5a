//! The chunk server as a library: [`init`] stamps a data directory with the
//! identity meta hands out; [`Node::start`] brings a stamped chunk up and
//! [`Node::run`] serves until shutdown.
//!
//! Start-up order (nothing is served before the stale data is gone):
//!
//! 1. Read the stamp (an unstamped directory is refused), open the
//!    [`ExtentStore`], bind the iSCSI, replica and metrics listeners.
//! 2. RegisterChunk with the stamped ids and the bound (or advertised)
//!    addresses; meta refuses another cluster's directory.
//! 3. Garbage-collect: delete every local extent meta does not list for this
//!    chunk (ListChunkExtents). A chunk that was declared dead was stripped
//!    from its replica sets; its copies are stale and must never be served.
//! 4. Fetch the chunk list (peers) and the export map; build the LUNs.
//! 5. Serve: the replica service, iSCSI, metrics, the scrubber (bad blocks
//!    are repaired from another member), and the heartbeat loop.
//!
//! The heartbeat loop reports used bytes and the applied revision. When the
//! revision moves it refetches the export map (LUNs and targets come and go,
//! volumes grow, extents of deleted volumes are garbage-collected),
//! refreshes peers and drops every cached replica-set view,
//! and only then reports the new revision as applied. Every applied
//! revision also asks the GC task for a full collection (copies meta
//! dropped this chunk from: a lowered replication factor, a drain,
//! rebalance or locality move), paced to at most one per
//! [`NodeConfig::gc_interval`] (see [`crate::gc`]).
//!
//! Garbage collection never deletes a copy still needed: meta's
//! ListChunkExtents lists learners (copies being filled by recovery) as
//! well as members, and only extents unchanged since before meta was asked
//! are deleted. A copy meta dropped is *retired* (see `store/retired.rs`):
//! an access point still on a view from before the drop that reads it gets
//! StaleEpoch, refreshes its set from meta and reads a member that has the
//! data (see `read_extent` in `volume.rs`), never zeros. FAILED_PRECONDITION
//! (declared dead) fences I/O at once, re-registers and garbage-collects
//! again. If no heartbeat succeeds for the liveness timeout, the [`Fence`]
//! makes every SCSI I/O fail with NOT READY until one does.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ironblock_proto::v1 as pb;
use ironblock_target::login::LoginConfig;
use ironblock_target::server::{Server, ServerConfig};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn, Instrument};

use crate::exports::{ChunkPortal, Exporter, Fence};
use crate::gc::{self, Next};
use crate::identity::{self, Identity, IdentityError};
use crate::meta_client::{
    volume_of_store_key, MetaClient, MetaClientError, MetaMembership, MetaPeers,
};
use crate::recovery::RecoveryWorker;
use crate::repair::{run_repairs, RepairMetrics};
use crate::replica::{ChunkId, ExtentId, LocalPeer, Membership, PeerDirectory, ReplicaPeer};
use crate::rpc::{serve_replica, RemotePeerConfig};
use crate::scrub::{ScrubConfig, ScrubMetrics, Scrubber};
use crate::store::{ExtentStore, StoreConfig, StoreError};

/// How long start-up keeps retrying an unreachable meta.
const REGISTER_PATIENCE: Duration = Duration::from_secs(30);
/// Grace for iSCSI sessions to log out at shutdown.
const DRAIN_LIMIT: Duration = Duration::from_secs(5);
/// Timeout of one meta call.
const META_TIMEOUT: Duration = Duration::from_secs(3);

/// Everything that can stop a chunk from starting.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{dir} is not a chunk data directory: run `ironblock-chunk init` first")]
    NotStamped { dir: PathBuf },
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("meta: {0}")]
    Meta(#[from] MetaClientError),
    #[error(
        "meta refused this chunk (data directory of cluster {cluster}, chunk {chunk}): {reason}"
    )]
    Refused {
        cluster: String,
        chunk: String,
        reason: String,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("bad configuration: {0}")]
    Config(String),
    #[error("task failed: {0}")]
    Task(String),
}

/// Settings of a running chunk (`ironblock-chunk run`).
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    /// Meta address, `host:port` or `http://host:port`.
    pub meta: String,
    /// iSCSI bind address.
    pub listen: SocketAddr,
    /// Replica transport bind address.
    pub data_listen: SocketAddr,
    /// Advertised iSCSI portal (default: the bound address).
    pub portal: Option<String>,
    /// Advertised replica address (default: the bound address).
    pub data_addr: Option<String>,
    /// Prometheus `/metrics` bind address.
    pub metrics: Option<SocketAddr>,
    /// Pause between scrub passes; zero disables scrubbing.
    pub scrub_interval: Duration,
    /// Logical block size of every LUN (512 or 4096).
    pub block_size: u32,
    /// Idle time before an iSCSI NOP-In ping.
    pub nop_interval: Duration,
    /// Time an iSCSI connection may take to log in.
    pub login_timeout: Duration,
    /// Least time between two full garbage collections asked for by
    /// revision changes (zero: no limit). A request inside the interval
    /// waits for it, and many are folded into one.
    pub gc_interval: Duration,
}

impl NodeConfig {
    /// Defaults as the CLI has them.
    pub fn new(data_dir: PathBuf, meta: String) -> Self {
        NodeConfig {
            data_dir,
            meta,
            listen: SocketAddr::from(([127, 0, 0, 1], 3261)),
            data_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            portal: None,
            data_addr: None,
            metrics: None,
            scrub_interval: Duration::from_secs(3600),
            block_size: 512,
            nop_interval: Duration::from_secs(10),
            login_timeout: Duration::from_secs(15),
            gc_interval: gc::DEFAULT_GC_INTERVAL,
        }
    }
}

fn chunk_id_u64(id: &Identity) -> Result<u64, NodeError> {
    id.chunk_id.parse().map_err(|_| {
        NodeError::Config(format!(
            "chunk id {:?} in the stamp is not a meta chunk id",
            id.chunk_id
        ))
    })
}

/// `ironblock-chunk init`: register a new chunk with meta (empty cluster id,
/// chunk id 0) and stamp `dir` with the ids meta hands out. A stamped
/// directory is refused unless `force` (which wipes its extents).
pub async fn init(
    dir: &Path,
    meta: &str,
    portal: &str,
    data_addr: &str,
    force: bool,
) -> Result<Identity, NodeError> {
    if !force {
        let d = dir.to_path_buf();
        if let Some(old) = tokio::task::spawn_blocking(move || identity::read_stamp(&d))
            .await
            .map_err(|e| NodeError::Task(e.to_string()))??
        {
            return Err(IdentityError::AlreadyStamped {
                dir: dir.to_path_buf(),
                cluster: old.cluster_id,
                chunk: old.chunk_id,
            }
            .into());
        }
    }
    let client = MetaClient::new(meta, META_TIMEOUT)?;
    let r = client
        .register_chunk(pb::RegisterChunkRequest {
            cluster_id: String::new(),
            chunk_id: 0,
            portal: portal.to_string(),
            data_addr: data_addr.to_string(),
            capacity_bytes: 0,
            used_bytes: 0,
            // One id for every retry of this registration (the client
            // retries across a meta failover): a retry whose first try
            // went through gets the chunk that try created.
            request_id: format!("{:032x}", rand::random::<u128>()),
        })
        .await?;
    let d = dir.to_path_buf();
    let chunk = r.chunk_id.to_string();
    let id = tokio::task::spawn_blocking(move || identity::init(&d, &r.cluster_id, &chunk, force))
        .await
        .map_err(|e| NodeError::Task(e.to_string()))??;
    Ok(id)
}

/// Counters and gauges of the node itself.
#[derive(Debug, Default)]
pub struct NodeMetrics {
    pub heartbeats: AtomicU64,
    pub heartbeat_failures: AtomicU64,
    pub registrations: AtomicU64,
    pub gc_deleted_extents: AtomicU64,
    /// Garbage collections run (start-up, rejoin, deleted volumes and the
    /// paced ones after revision changes).
    pub gc_runs: AtomicU64,
    /// Garbage collections that failed (meta unreachable, disk errors).
    pub gc_failures: AtomicU64,
    pub applied_revision: AtomicU64,
    pub revision_applies: AtomicU64,
}

struct Shared {
    meta: MetaClient,
    /// The heartbeat loop's own client: its own HTTP/2 connection to meta,
    /// so heartbeats never queue behind the other meta calls of a busy data
    /// path (membership changes, extent allocation, recovery).
    beat: MetaClient,
    store: ExtentStore,
    local: Arc<LocalPeer>,
    peers: Arc<MetaPeers>,
    membership: Arc<MetaMembership>,
    exporter: Arc<Exporter>,
    fence: Arc<Fence>,
    cluster_id: String,
    chunk_id: u64,
    portal: String,
    data_addr: String,
    metrics: NodeMetrics,
    repair_metrics: Arc<RepairMetrics>,
    scrub_metrics: Option<Arc<ScrubMetrics>>,
    target_metrics: Arc<ironblock_target::metrics::TargetMetrics>,
    /// Set once the recovery worker runs (after registration).
    recovery: std::sync::OnceLock<RecoveryWorker>,
    /// The newest revision meta announced; the applier task brings the
    /// chunk to it. Applying can take a while (it waits for in-flight writes
    /// and flushes to replicas that may be slow to time out), so it never
    /// runs inside the heartbeat loop: a chunk must keep heartbeating.
    want_revision: watch::Sender<u64>,
    /// One revision apply at a time (the applier and a rejoin).
    apply_lock: tokio::sync::Mutex<()>,
    /// Heartbeat now (a revision was applied: meta's snapshot barrier waits
    /// for it, so it is reported at once instead of at the next tick).
    beat_now: tokio::sync::Notify,
    /// A full garbage collection is wanted (a revision was applied); the
    /// GC task runs it, paced by `gc_interval`.
    gc_wanted: tokio::sync::Notify,
    gc_interval: Duration,
    /// One garbage collection at a time (start-up, rejoin, the GC task and
    /// the deleted-volume pass of a revision apply).
    gc_lock: tokio::sync::Mutex<()>,
}

/// What one garbage collection did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct GcReport {
    deleted: usize,
    /// Stale-looking extents kept because they changed since meta was
    /// asked, or meta placed them here again meanwhile: the next
    /// collection judges them.
    kept: usize,
}

/// What meta's current record says about a local extent it no longer
/// lists for this chunk.
enum Fate {
    /// The record names this chunk again (member or learner): keep it.
    Placed,
    /// Not placed here; retire it fenced at the record's epoch.
    Retire(u64),
}

/// The store's name of an extent meta sends.
fn extent_id_of(e: &pb::Extent) -> ExtentId {
    let key = if e.store_key.is_empty() {
        e.volume_id.clone()
    } else {
        e.store_key.clone()
    };
    ExtentId::new(key, e.index)
}

impl Shared {
    async fn register(&self) -> Result<pb::RegisterChunkResponse, NodeError> {
        let capacity = self
            .store
            .disk_space()
            .await
            .map(|d| d.total_bytes)
            .unwrap_or(0);
        let used = self.store.used_bytes().await.unwrap_or(0);
        let req = pb::RegisterChunkRequest {
            cluster_id: self.cluster_id.clone(),
            chunk_id: self.chunk_id,
            portal: self.portal.clone(),
            data_addr: self.data_addr.clone(),
            capacity_bytes: capacity,
            used_bytes: used,
            request_id: String::new(),
        };
        let deadline = Instant::now() + REGISTER_PATIENCE;
        loop {
            match self.meta.register_chunk(req.clone()).await {
                Ok(r) => {
                    self.metrics.registrations.fetch_add(1, Ordering::Relaxed);
                    info!(cluster = %r.cluster_id, chunk = r.chunk_id, heartbeat_ms = r.heartbeat_interval_ms, liveness_ms = r.liveness_timeout_ms, "registered with meta");
                    return Ok(r);
                }
                Err(MetaClientError::FailedPrecondition(reason))
                | Err(MetaClientError::NotFound(reason))
                | Err(MetaClientError::InvalidArgument(reason)) => {
                    return Err(NodeError::Refused {
                        cluster: self.cluster_id.clone(),
                        chunk: self.chunk_id.to_string(),
                        reason,
                    })
                }
                Err(MetaClientError::Unavailable(m)) if Instant::now() < deadline => {
                    warn!(error = %m, "meta unreachable; retrying registration");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Delete every local extent meta does not place on this chunk. Only
    /// extents that existed before asking meta are candidates, so an extent
    /// created by a write racing with the garbage collection is kept.
    async fn gc(&self) -> Result<GcReport, NodeError> {
        self.gc_where(|_| true).await
    }

    /// Garbage-collect the extents of volumes that are no longer exported
    /// (deleted), if this chunk holds any.
    async fn gc_deleted_volumes(
        &self,
        exports: &pb::ListExportsResponse,
    ) -> Result<GcReport, NodeError> {
        let exported: HashSet<&str> = exports
            .targets
            .iter()
            .flat_map(|t| t.luns.iter().map(|l| l.volume_id.as_str()))
            .collect();
        let gone = |id: &ExtentId| !exported.contains(volume_of_store_key(&id.volume));
        if !self.store.list_extents().iter().any(gone) {
            return Ok(GcReport::default());
        }
        // Never wait for a full collection here (this runs in the revision
        // apply): the one this revision asks for gets them too.
        let Ok(_one) = self.gc_lock.try_lock() else {
            tracing::debug!(
                "a garbage collection is running; the next one takes the deleted volumes"
            );
            return Ok(GcReport::default());
        };
        self.gc_counted(gone).await
    }

    /// Delete every local extent matching `candidate` that meta does not
    /// list for this chunk.
    ///
    /// ListChunkExtents lists the extents this chunk is a member *or a
    /// learner* of (meta's `State::chunk_extents`), so a copy recovery is
    /// filling is never a candidate. The change stamps are read before
    /// asking meta: an extent touched after that (a write reaching a new
    /// learner, a recovery copy starting on it and getting promoted) is
    /// kept even if meta's answer, which may predate it, does not list it.
    /// The next collection decides.
    ///
    /// A copy whose record meta still has (the chunk was dropped from its
    /// set) is *retired* at the record's epoch, read from meta after the
    /// list (GetExtents, once per volume, only when there is something to
    /// delete): an access point still on an older view that reads it gets
    /// StaleEpoch and refreshes instead of reading zeros (see
    /// `store/retired.rs`). A record that names this chunk again by then is
    /// kept. Extents of records meta no longer has (deleted volumes and
    /// snapshots) are plainly deleted.
    async fn gc_where(&self, candidate: impl Fn(&ExtentId) -> bool) -> Result<GcReport, NodeError> {
        let _one = self.gc_lock.lock().await;
        self.gc_counted(candidate).await
    }

    /// [`Shared::gc_where`] with `gc_lock` held.
    async fn gc_counted(
        &self,
        candidate: impl Fn(&ExtentId) -> bool,
    ) -> Result<GcReport, NodeError> {
        self.metrics.gc_runs.fetch_add(1, Ordering::Relaxed);
        let r = self.gc_locked(candidate).await;
        if r.is_err() {
            self.metrics.gc_failures.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    async fn gc_locked(
        &self,
        candidate: impl Fn(&ExtentId) -> bool,
    ) -> Result<GcReport, NodeError> {
        let before: Vec<(ExtentId, u64)> = self
            .store
            .change_stamps()
            .into_iter()
            .filter(|(id, _)| candidate(id))
            .collect();
        let listed = self.meta.list_chunk_extents(self.chunk_id).await?;
        let keep: HashSet<ExtentId> = listed.extents.iter().map(extent_id_of).collect();
        let stale: Vec<(ExtentId, u64)> = before
            .into_iter()
            .filter(|(id, _)| !keep.contains(id))
            .collect();
        let mut report = GcReport::default();
        if stale.is_empty() {
            tracing::debug!(
                kept = keep.len(),
                revision = listed.revision,
                "garbage collection: nothing to delete"
            );
            return Ok(report);
        }
        let fates = self.fates(&stale).await?;
        for (id, stamp) in stale {
            let retire = match fates.get(&id) {
                Some(Fate::Placed) => {
                    report.kept += 1;
                    info!(extent = %id, "stale-looking extent placed here again since meta was asked; kept");
                    continue;
                }
                Some(Fate::Retire(epoch)) => Some(*epoch),
                None => None,
            };
            let r = match retire {
                Some(epoch) => {
                    self.store
                        .retire_extent_if_unchanged(&id, stamp, epoch)
                        .await
                }
                None => self.store.delete_extent_if_unchanged(&id, stamp).await,
            };
            match r {
                Ok(true) => {
                    report.deleted += 1;
                    self.metrics
                        .gc_deleted_extents
                        .fetch_add(1, Ordering::Relaxed);
                    match retire {
                        Some(epoch) => {
                            info!(extent = %id, retired_at_epoch = epoch, "deleted stale extent (meta dropped this chunk from its set)")
                        }
                        None => {
                            info!(extent = %id, "deleted stale extent (not placed here by meta)")
                        }
                    }
                }
                Ok(false) => {
                    report.kept += 1;
                    info!(extent = %id, "stale-looking extent changed since meta was asked; kept");
                }
                Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        info!(
            deleted = report.deleted,
            kept_changed = report.kept,
            placed = keep.len(),
            revision = listed.revision,
            "garbage collection done"
        );
        Ok(report)
    }

    /// Meta's current word on each of `stale` (extents ListChunkExtents did
    /// not list for this chunk): one GetExtents per volume. Absent from the
    /// map: meta has no such record (the volume or its snapshot is gone).
    async fn fates(&self, stale: &[(ExtentId, u64)]) -> Result<HashMap<ExtentId, Fate>, NodeError> {
        let volumes: BTreeSet<&str> = stale
            .iter()
            .map(|(id, _)| volume_of_store_key(&id.volume))
            .collect();
        let wanted: HashSet<&ExtentId> = stale.iter().map(|(id, _)| id).collect();
        let mut fates = HashMap::new();
        for volume in volumes {
            let extents = match self.meta.get_extents(volume).await {
                Ok(r) => r.extents,
                Err(MetaClientError::NotFound(_)) => continue,
                Err(e) => return Err(e.into()),
            };
            for e in &extents {
                let id = extent_id_of(e);
                if !wanted.contains(&id) {
                    continue;
                }
                let here =
                    e.replicas.contains(&self.chunk_id) || e.learners.contains(&self.chunk_id);
                fates.insert(
                    id,
                    if here {
                        Fate::Placed
                    } else {
                        Fate::Retire(e.epoch)
                    },
                );
            }
        }
        Ok(fates)
    }

    /// The GC task: runs the full collections revision changes ask for
    /// ([`Shared::gc_wanted`]), at most one per `gc_interval`; a failed
    /// one, or one that kept extents that changed meanwhile, runs again.
    async fn gc_loop(self: Arc<Self>, stop: CancellationToken) {
        let started = tokio::time::Instant::now();
        let me: &Shared = &self;
        gc::run_paced(&me.gc_wanted, me.gc_interval, Some(started), &stop, || async move {
            match me.gc().await {
                Ok(r) if r.kept > 0 => Next::Again,
                Ok(_) => Next::Done,
                Err(e) => {
                    warn!(error = %e, "garbage collection failed; retrying after the GC interval");
                    Next::Again
                }
            }
        })
        .await;
    }

    /// Bring exports, peers and cached views to meta's current revision.
    /// Returns the revision applied.
    async fn apply_revision(&self) -> Result<u64, NodeError> {
        let _one = self.apply_lock.lock().await;
        self.peers.refresh(&self.meta).await?;
        let exports = self.meta.list_exports().await?;
        self.exporter.apply(&exports);
        if let Err(e) = self.gc_deleted_volumes(&exports).await {
            warn!(error = %e, "garbage collection of deleted volumes failed");
        }
        self.membership.set_revision(exports.revision);
        self.membership.invalidate();
        self.exporter.invalidate().await;
        // Meta may have dropped this chunk from replica sets: collect the
        // copies it no longer places here, after the views above are gone
        // (paced by the GC task; a copy read through a view older than
        // the drop answers StaleEpoch once retired, see gc_where).
        self.gc_wanted.notify_one();
        if let Some(w) = self.recovery.get() {
            // New recovery tasks come with a revision change.
            w.kick();
        }
        self.metrics
            .applied_revision
            .store(exports.revision, Ordering::Release);
        self.metrics
            .revision_applies
            .fetch_add(1, Ordering::Relaxed);
        info!(
            revision = exports.revision,
            targets = exports.targets.len(),
            "metadata revision applied"
        );
        Ok(exports.revision)
    }

    async fn heartbeat_loop(self: Arc<Self>, mut interval: Duration, stop: CancellationToken) {
        let mut failures_logged = 0u64;
        let mut rejoin: Option<JoinHandle<()>> = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
                _ = self.beat_now.notified() => {}
            }
            let used = self.store.used_bytes().await.unwrap_or(0);
            let applied = self.metrics.applied_revision.load(Ordering::Acquire);
            let io = self
                .exporter
                .devices()
                .iter()
                .filter_map(|d| {
                    let bytes = d.metrics().io_bytes.load(Ordering::Relaxed);
                    (bytes > 0).then(|| pb::VolumeIo {
                        volume_id: d.volume().to_string(),
                        bytes,
                    })
                })
                .collect();
            let sent = Instant::now();
            let r = self
                .beat
                .heartbeat(pb::HeartbeatRequest {
                    cluster_id: self.cluster_id.clone(),
                    chunk_id: self.chunk_id,
                    used_bytes: used,
                    applied_revision: applied,
                    io,
                })
                .await;
            match r {
                Ok(resp) => {
                    self.metrics.heartbeats.fetch_add(1, Ordering::Relaxed);
                    if failures_logged > 0 {
                        info!(after = failures_logged, "heartbeats accepted again");
                        failures_logged = 0;
                    }
                    match resp.lease_ms {
                        Some(ms) => self.fence.ok_for(sent, Duration::from_millis(ms)),
                        None => self.fence.ok_at(sent),
                    }
                    if resp.revision != applied {
                        self.announce(resp.revision);
                    }
                }
                Err(MetaClientError::FailedPrecondition(reason)) => {
                    self.metrics
                        .heartbeat_failures
                        .fetch_add(1, Ordering::Relaxed);
                    self.fence.close();
                    self.fence.rejoining();
                    // Re-register here (quick), then garbage-collect and
                    // apply the revision in the background: heartbeats go
                    // on meanwhile, so a slow GC under load does not get
                    // this chunk declared dead again (the fence stays
                    // closed until the rejoin is done).
                    let busy = rejoin.as_ref().is_some_and(|h| !h.is_finished());
                    if busy {
                        warn!(%reason, "meta refused the heartbeat during a rejoin; fenced");
                        continue;
                    }
                    warn!(%reason, "meta refused the heartbeat; fencing I/O and re-registering");
                    match self.register().await {
                        Ok(r) => {
                            interval = heartbeat_interval(&r);
                            self.fence
                                .set_timeout(Duration::from_millis(r.liveness_timeout_ms.max(1)));
                            self.fence.ok_at(sent);
                            let (me, stop) = (self.clone(), stop.clone());
                            rejoin = Some(tokio::spawn(async move {
                                tokio::select! {
                                    _ = stop.cancelled() => {}
                                    _ = me.finish_rejoin() => {}
                                }
                            }));
                        }
                        Err(e) => error!(error = %e, "re-registration failed; still fenced"),
                    }
                }
                Err(e) => {
                    self.metrics
                        .heartbeat_failures
                        .fetch_add(1, Ordering::Relaxed);
                    failures_logged += 1;
                    if failures_logged == 1 || failures_logged.is_power_of_two() {
                        warn!(error = %e, failures = failures_logged, fenced = self.fence.is_fenced(), "heartbeat failed");
                    }
                }
            }
        }
    }

    /// Meta is at `revision` (a heartbeat answer or the watch stream said
    /// so). Replica sets may have changed: the data path re-checks the
    /// sets of calls still waiting (a member declared dead is not waited
    /// for) at once, before the applier gets to the rest.
    fn announce(&self, revision: u64) {
        if revision <= self.metrics.applied_revision.load(Ordering::Acquire)
            && revision <= *self.want_revision.borrow()
        {
            return;
        }
        self.membership.set_revision(revision);
        self.want_revision.send_if_modified(|w| {
            let newer = *w != revision;
            *w = revision;
            newer
        });
    }

    /// Follows meta's revision stream (`WatchRevisions`): every change is
    /// announced to the applier within a round trip, and the heartbeat the
    /// applier sends after applying it is the acknowledgement meta's
    /// in-force waits count. Reconnects with a bounded backoff (100 ms
    /// doubling to 1 s); the heartbeats announce revisions meanwhile.
    async fn watch_loop(self: Arc<Self>, stop: CancellationToken) {
        let me = format!("chunk {}", self.chunk_id);
        let mut backoff = Duration::from_millis(100);
        loop {
            let opened = tokio::select! {
                _ = stop.cancelled() => return,
                r = self.meta.watch_revisions(&me) => r,
            };
            match opened {
                Ok(mut stream) => loop {
                    let ev = tokio::select! {
                        _ = stop.cancelled() => return,
                        ev = stream.message() => ev,
                    };
                    match ev {
                        Ok(Some(ev)) => {
                            backoff = Duration::from_millis(100);
                            self.announce(ev.revision);
                        }
                        Ok(None) => {
                            debug!("meta closed the revision stream; reopening");
                            break;
                        }
                        Err(e) => {
                            debug!(error = %e, "revision stream failed; reopening");
                            break;
                        }
                    }
                },
                Err(e) => debug!(error = %e, "cannot open the revision stream; retrying"),
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// Applies every revision the heartbeats announce, outside the
    /// heartbeat loop; retries (every 500 ms) until it succeeds.
    async fn applier_loop(self: Arc<Self>, stop: CancellationToken) {
        let mut rx = self.want_revision.subscribe();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = rx.changed() => if r.is_err() { return },
            }
            loop {
                let want = *rx.borrow_and_update();
                if self.metrics.applied_revision.load(Ordering::Acquire) >= want {
                    break;
                }
                match self.apply_revision().await {
                    Ok(_) => self.beat_now.notify_one(),
                    Err(e) => {
                        warn!(error = %e, revision = want, "could not apply the new revision; retrying");
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        }
                    }
                }
            }
        }
    }

    /// The rest of a rejoin after re-registering: garbage-collect and
    /// apply the current revision (retrying every 500 ms), then lift the
    /// rejoin fence.
    async fn finish_rejoin(self: Arc<Self>) {
        loop {
            let r = async {
                self.gc().await?;
                self.apply_revision().await
            }
            .await;
            match r {
                Ok(_) => break,
                Err(e) => {
                    warn!(error = %e, "rejoin: garbage collection or revision apply failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        self.fence.rejoined();
        info!(fenced = self.fence.is_fenced(), "rejoined the cluster");
    }

    /// The node's metrics in the Prometheus text format.
    fn render_metrics(&self) -> String {
        let mut out = self.target_metrics.render();
        if let Some(i) = out.rfind("# EOF") {
            out.truncate(i);
        }
        let mut w = MetricWriter(&mut out);
        let sm = self.store.metrics();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        w.counter(
            "ironblock_chunk_store_reads",
            "Extent reads served by the store",
            load(&sm.reads),
        );
        w.counter(
            "ironblock_chunk_store_read_bytes",
            "Bytes read from the store",
            load(&sm.read_bytes),
        );
        w.counter(
            "ironblock_chunk_store_writes",
            "Extent writes applied by the store",
            load(&sm.writes),
        );
        w.counter(
            "ironblock_chunk_store_written_bytes",
            "Bytes written to the store",
            load(&sm.written_bytes),
        );
        w.counter(
            "ironblock_chunk_store_checksum_errors",
            "Blocks that failed their checksum on read or scrub",
            load(&sm.checksum_errors),
        );
        w.counter(
            "ironblock_chunk_store_repairs",
            "Blocks rewritten from a good copy",
            load(&sm.repairs),
        );
        w.counter(
            "ironblock_chunk_store_stale_epoch_rejects",
            "Requests refused for a stale epoch (fencing)",
            load(&sm.stale_epoch_rejects),
        );
        w.counter(
            "ironblock_chunk_store_no_space_errors",
            "Writes refused for lack of space",
            load(&sm.no_space_errors),
        );
        w.gauge(
            "ironblock_chunk_store_trash_pending_files",
            "Files of deleted extents waiting in the trash for the background unlink",
            self.store.trash_pending(),
        );
        w.counter(
            "ironblock_chunk_store_trash_deleted_files",
            "Files of deleted extents unlinked by the trash's background thread",
            self.store.trash_deleted(),
        );
        w.gauge(
            "ironblock_chunk_extents",
            "Extents in the local store",
            self.store.list_extents().len() as u64,
        );
        w.gauge(
            "ironblock_chunk_quarantined_extents",
            "Extents found broken at start-up and not served",
            self.store.quarantined().len() as u64,
        );
        if let Some(s) = &self.scrub_metrics {
            w.counter(
                "ironblock_chunk_scrub_passes",
                "Completed scrub passes",
                load(&s.passes),
            );
            w.counter(
                "ironblock_chunk_scrub_bytes",
                "Bytes verified by the scrubber",
                load(&s.bytes_scrubbed),
            );
            w.counter(
                "ironblock_chunk_scrub_bad_blocks",
                "Bad blocks found by the scrubber",
                load(&s.bad_blocks_found),
            );
            w.counter(
                "ironblock_chunk_scrub_errors",
                "Extents the scrubber could not read",
                load(&s.errors),
            );
        }
        w.counter(
            "ironblock_chunk_scrub_repairs",
            "Scrubbed bad blocks repaired from a replica",
            load(&self.repair_metrics.repaired),
        );
        w.counter(
            "ironblock_chunk_scrub_repair_failures",
            "Scrubbed bad blocks that could not be repaired",
            load(&self.repair_metrics.failed),
        );
        let m = &self.metrics;
        w.counter(
            "ironblock_chunk_heartbeats",
            "Heartbeats accepted by meta",
            load(&m.heartbeats),
        );
        w.counter(
            "ironblock_chunk_heartbeat_failures",
            "Heartbeats that failed or were refused",
            load(&m.heartbeat_failures),
        );
        w.counter(
            "ironblock_chunk_registrations",
            "Registrations with meta (start and rejoin)",
            load(&m.registrations),
        );
        w.counter(
            "ironblock_chunk_gc_deleted_extents",
            "Stale local extents deleted (meta no longer places them on this chunk)",
            load(&m.gc_deleted_extents),
        );
        w.counter(
            "ironblock_chunk_gc_runs",
            "Garbage collections run (start-up, rejoin, deleted volumes, after revision changes)",
            load(&m.gc_runs),
        );
        w.counter(
            "ironblock_chunk_gc_failures",
            "Garbage collections that failed (retried)",
            load(&m.gc_failures),
        );
        w.gauge(
            "ironblock_chunk_store_retired_extents",
            "Tombstones of collected copies that still answer StaleEpoch to old views",
            self.store.retired_count(),
        );
        w.gauge(
            "ironblock_chunk_applied_revision",
            "Meta revision applied to every served volume",
            load(&m.applied_revision),
        );
        w.gauge(
            "ironblock_chunk_fenced",
            "1 while I/O is refused because meta is out of reach",
            u64::from(self.fence.is_fenced()),
        );
        w.counter(
            "ironblock_chunk_fenced_ios",
            "SCSI I/Os refused by the self-fence",
            load(&self.exporter.fenced_ios),
        );
        let devs = self.exporter.devices();
        w.gauge(
            "ironblock_chunk_exported_volumes",
            "Volumes served over iSCSI",
            devs.len() as u64,
        );
        type Pick = fn(&crate::volume::VolumeMetrics) -> &AtomicU64;
        let per_volume: [(&str, &str, Pick); 11] = [
            ("ironblock_chunk_volume_reads", "Volume reads", |v| &v.reads),
            (
                "ironblock_chunk_volume_io_bytes",
                "Bytes read and written through this chunk's portal",
                |v| &v.io_bytes,
            ),
            ("ironblock_chunk_volume_writes", "Volume writes", |v| {
                &v.writes
            }),
            ("ironblock_chunk_volume_flushes", "Volume flushes", |v| {
                &v.flushes
            }),
            (
                "ironblock_chunk_volume_member_removals",
                "Replicas removed from a set after failing an I/O",
                |v| &v.member_removals,
            ),
            (
                "ironblock_chunk_volume_abandoned_calls",
                "Replica calls not waited for any longer: meta moved the replica out of the set",
                |v| &v.abandoned_calls,
            ),
            (
                "ironblock_chunk_volume_hung_calls",
                "Replica calls failed because the replica did not answer a probe (hung)",
                |v| &v.hung_calls,
            ),
            (
                "ironblock_chunk_volume_slow_calls",
                "Probes of a slow replica call's peer that found it alive",
                |v| &v.slow_calls,
            ),
            (
                "ironblock_chunk_volume_stale_refreshes",
                "Replica-set views refreshed after a newer epoch was seen",
                |v| &v.stale_refreshes,
            ),
            (
                "ironblock_chunk_volume_checksum_failovers",
                "Reads served from another replica after a checksum failure",
                |v| &v.checksum_failovers,
            ),
            (
                "ironblock_chunk_volume_read_repairs",
                "Bad blocks repaired on read",
                |v| &v.repairs,
            ),
        ];
        for (name, help, pick) in per_volume {
            w.head(name, help, "counter");
            for d in &devs {
                let v = pick(d.metrics()).load(Ordering::Relaxed);
                w.0.push_str(&format!("{name}_total{{volume=\"{}\"}} {v}\n", d.volume()));
            }
        }
        if let Some(r) = self.recovery.get() {
            r.metrics().render_prometheus(&mut out);
        }
        out.push_str("# EOF\n");
        out
    }
}

struct MetricWriter<'a>(&'a mut String);

impl MetricWriter<'_> {
    fn head(&mut self, name: &str, help: &str, kind: &str) {
        self.0
            .push_str(&format!("# HELP {name} {help}.\n# TYPE {name} {kind}\n"));
    }
    fn counter(&mut self, name: &str, help: &str, v: u64) {
        self.head(name, help, "counter");
        self.0.push_str(&format!("{name}_total {v}\n"));
    }
    fn gauge(&mut self, name: &str, help: &str, v: u64) {
        self.head(name, help, "gauge");
        self.0.push_str(&format!("{name} {v}\n"));
    }
}

fn heartbeat_interval(r: &pb::RegisterChunkResponse) -> Duration {
    Duration::from_millis(r.heartbeat_interval_ms.clamp(50, 10_000))
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, NodeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| NodeError::Bind { addr, source })
}

fn local_addr(l: &TcpListener, asked: SocketAddr) -> Result<SocketAddr, NodeError> {
    l.local_addr().map_err(|source| NodeError::Bind {
        addr: asked,
        source,
    })
}

/// A started chunk server.
pub struct Node {
    shared: Arc<Shared>,
    server: Server,
    stop: CancellationToken,
    scrub_stop: watch::Sender<bool>,
    tasks: Vec<(&'static str, JoinHandle<()>)>,
    iscsi_addr: SocketAddr,
    data_listen_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
}

impl Node {
    /// Bring the chunk up (see the module docs for the order). When this
    /// returns, every listener serves.
    pub async fn start(cfg: NodeConfig) -> Result<Node, NodeError> {
        if cfg.block_size != 512 && cfg.block_size != 4096 {
            return Err(NodeError::Config(format!(
                "block size {} is not 512 or 4096",
                cfg.block_size
            )));
        }
        let dir = cfg.data_dir.clone();
        let stamp = {
            let d = dir.clone();
            tokio::task::spawn_blocking(move || identity::read_stamp(&d))
                .await
                .map_err(|e| NodeError::Task(e.to_string()))??
        }
        .ok_or_else(|| NodeError::NotStamped { dir: dir.clone() })?;
        let chunk_id = chunk_id_u64(&stamp)?;
        let span = tracing::info_span!("chunk", id = chunk_id);
        Self::start_inner(cfg, stamp, chunk_id)
            .instrument(span)
            .await
    }

    async fn start_inner(
        cfg: NodeConfig,
        stamp: Identity,
        chunk_id: u64,
    ) -> Result<Node, NodeError> {
        let store = {
            let d = cfg.data_dir.clone();
            let sc = StoreConfig {
                expected_cluster: Some(stamp.cluster_id.clone()),
                expected_chunk: Some(stamp.chunk_id.clone()),
                ..StoreConfig::default()
            };
            tokio::task::spawn_blocking(move || ExtentStore::open(&d, sc))
                .await
                .map_err(|e| NodeError::Task(e.to_string()))??
        };
        let iscsi = bind(cfg.listen).await?;
        let data = bind(cfg.data_listen).await?;
        let metrics_l = match cfg.metrics {
            Some(a) => Some(bind(a).await?),
            None => None,
        };
        let iscsi_addr = local_addr(&iscsi, cfg.listen)?;
        let data_listen_addr = local_addr(&data, cfg.data_listen)?;
        let metrics_addr = metrics_l.as_ref().and_then(|l| l.local_addr().ok());
        let portal = cfg.portal.clone().unwrap_or_else(|| iscsi_addr.to_string());
        let data_addr = cfg
            .data_addr
            .clone()
            .unwrap_or_else(|| data_listen_addr.to_string());

        let meta = MetaClient::new(&cfg.meta, META_TIMEOUT)?;
        let local = Arc::new(LocalPeer::new(store.clone()));
        let peers = Arc::new(MetaPeers::new(local.clone(), RemotePeerConfig::default()));
        let membership = Arc::new(MetaMembership::new(meta.clone()).with_peers(peers.clone()));
        // DefaultTime2Wait 0: an initiator whose chunk died reconnects
        // (through the VIP, to another chunk) without waiting 2 s first.
        let login = LoginConfig {
            default_time2wait: 0,
            ..LoginConfig::default()
        };
        let tpgt = login.target_portal_group_tag;
        let chunk_portal = Arc::new(ChunkPortal::new(&portal, tpgt));
        let fence = Arc::new(Fence::new(Duration::from_secs(3)));
        let exporter = Arc::new(Exporter::new(
            chunk_portal.clone(),
            membership.clone() as Arc<dyn Membership>,
            peers.clone() as Arc<dyn PeerDirectory>,
            local.clone() as Arc<dyn ReplicaPeer>,
            fence.clone(),
            cfg.block_size,
            store.extent_size(),
            Duration::from_secs(5),
        ));
        let server = Server::new(
            chunk_portal.clone(),
            ServerConfig {
                login,
                nop_interval: cfg.nop_interval.max(Duration::from_millis(100)),
                login_timeout: cfg.login_timeout.max(Duration::from_millis(100)),
                ..ServerConfig::default()
            },
        );
        let scrub = (!cfg.scrub_interval.is_zero()).then(|| {
            Scrubber::new(
                store.clone(),
                ScrubConfig {
                    pause_between_extents: Duration::from_millis(20),
                    pause_between_passes: cfg.scrub_interval,
                },
            )
        });
        let shared = Arc::new(Shared {
            meta,
            beat: MetaClient::new(&cfg.meta, META_TIMEOUT)?,
            store: store.clone(),
            local: local.clone(),
            peers,
            membership,
            exporter,
            fence,
            cluster_id: stamp.cluster_id.clone(),
            chunk_id,
            portal,
            data_addr,
            metrics: NodeMetrics::default(),
            repair_metrics: Arc::default(),
            scrub_metrics: scrub.as_ref().map(|s| s.metrics()),
            target_metrics: server.metrics(),
            recovery: std::sync::OnceLock::new(),
            want_revision: watch::channel(0).0,
            apply_lock: tokio::sync::Mutex::new(()),
            beat_now: tokio::sync::Notify::new(),
            gc_wanted: tokio::sync::Notify::new(),
            gc_interval: cfg.gc_interval,
            gc_lock: tokio::sync::Mutex::new(()),
        });

        // Register, then drop stale data before anything is served.
        let reg = shared.register().await?;
        if reg.cluster_id != stamp.cluster_id {
            return Err(NodeError::Refused {
                cluster: stamp.cluster_id,
                chunk: stamp.chunk_id,
                reason: format!("meta is cluster {}", reg.cluster_id),
            });
        }
        shared
            .fence
            .set_timeout(Duration::from_millis(reg.liveness_timeout_ms.max(1)));
        shared.fence.ok();
        shared.gc().await?;
        shared.apply_revision().await?;

        let stop = CancellationToken::new();
        let mut tasks = Vec::new();
        {
            // Fills the extents meta makes this chunk a learner of.
            let (worker, handle) = RecoveryWorker::start(
                shared.meta.grpc(),
                store.clone(),
                ChunkId(chunk_id.to_string()),
                shared.peers.clone() as Arc<dyn PeerDirectory>,
                stop.clone(),
            );
            let _ = shared.recovery.set(worker);
            tasks.push(("recovery", handle));
        }
        {
            let stop = stop.clone();
            let local = shared.local.clone();
            tasks.push((
                "replica",
                tokio::spawn(async move {
                    if let Err(e) = serve_replica(data, local, stop).await {
                        error!(error = %e, "replica service failed");
                    }
                }),
            ));
        }
        {
            let server = server.clone();
            tasks.push((
                "iscsi",
                tokio::spawn(
                    async move {
                        if let Err(e) = server.serve(iscsi).await {
                            error!(error = %e, "iSCSI server failed");
                        }
                    }
                    .instrument(tracing::Span::current()),
                ),
            ));
        }
        if let Some(l) = metrics_l {
            let s = shared.clone();
            let render: Arc<dyn Fn() -> String + Send + Sync> =
                Arc::new(move || s.render_metrics());
            tasks.push((
                "metrics",
                tokio::spawn(ironblock_target::metrics::serve_http(
                    l,
                    render,
                    stop.clone(),
                )),
            ));
        }
        let (scrub_stop, scrub_rx) = watch::channel(false);
        if let Some(scrub) = scrub {
            let (tx, rx) = mpsc::channel(1024);
            let scrub = scrub.with_reports(tx);
            tasks.push((
                "scrub",
                tokio::spawn(scrub.run(scrub_rx).instrument(tracing::Span::current())),
            ));
            tasks.push((
                "repair",
                tokio::spawn(
                    run_repairs(
                        rx,
                        store,
                        ChunkId(chunk_id.to_string()),
                        shared.membership.clone() as Arc<dyn Membership>,
                        shared.peers.clone() as Arc<dyn PeerDirectory>,
                        shared.repair_metrics.clone(),
                    )
                    .instrument(tracing::Span::current()),
                ),
            ));
        }
        {
            let s = shared.clone();
            let stop = stop.clone();
            tasks.push((
                "gc",
                tokio::spawn(s.gc_loop(stop).instrument(tracing::Span::current())),
            ));
        }
        {
            let s = shared.clone();
            let stop = stop.clone();
            tasks.push((
                "revisions",
                tokio::spawn(s.applier_loop(stop).instrument(tracing::Span::current())),
            ));
        }
        {
            let peers = shared.peers.clone();
            let stop = stop.clone();
            tasks.push((
                "peer-watch",
                tokio::spawn(peers.watch_busy(stop).instrument(tracing::Span::current())),
            ));
        }
        {
            let s = shared.clone();
            let stop = stop.clone();
            tasks.push((
                "revision-watch",
                tokio::spawn(s.watch_loop(stop).instrument(tracing::Span::current())),
            ));
        }
        {
            let s = shared.clone();
            let stop = stop.clone();
            tasks.push((
                "heartbeat",
                tokio::spawn(
                    s.heartbeat_loop(heartbeat_interval(&reg), stop)
                        .instrument(tracing::Span::current()),
                ),
            ));
        }
        info!(portal = %shared.portal, data = %shared.data_addr, "chunk serving");
        Ok(Node {
            shared,
            server,
            stop,
            scrub_stop,
            tasks,
            iscsi_addr,
            data_listen_addr,
            metrics_addr,
        })
    }

    /// Meta's id of this chunk.
    pub fn chunk_id(&self) -> u64 {
        self.shared.chunk_id
    }

    /// The cluster this chunk belongs to.
    pub fn cluster_id(&self) -> &str {
        &self.shared.cluster_id
    }

    /// The advertised iSCSI portal (`host:port`).
    pub fn portal(&self) -> &str {
        &self.shared.portal
    }

    /// The advertised replica address (`host:port`).
    pub fn data_addr(&self) -> &str {
        &self.shared.data_addr
    }

    /// The bound iSCSI address.
    pub fn iscsi_addr(&self) -> SocketAddr {
        self.iscsi_addr
    }

    /// The bound replica address.
    pub fn data_listen_addr(&self) -> SocketAddr {
        self.data_listen_addr
    }

    /// The bound metrics address.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The metrics text `GET /metrics` serves.
    pub fn render_metrics(&self) -> String {
        self.shared.render_metrics()
    }

    /// Serve until `shutdown` completes, then stop accepting iSCSI, drain the
    /// sessions, stop heartbeating and the other services.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        shutdown.await;
        self.shutdown().await;
    }

    /// Stop now (see [`Node::run`]).
    pub async fn shutdown(self) {
        info!("shutting down: draining iSCSI sessions");
        self.server.shutdown();
        self.server.drain(DRAIN_LIMIT).await;
        let _ = self.scrub_stop.send(true);
        self.stop.cancel();
        for (name, mut t) in self.tasks {
            match tokio::time::timeout(Duration::from_secs(5), &mut t).await {
                Ok(_) => {}
                Err(_) => {
                    warn!(task = name, "task did not stop in time; aborting it");
                    t.abort();
                }
            }
        }
        if let Err(e) = self.shared.store.flush(None).await {
            warn!(error = %e, "final flush failed");
        }
        info!("chunk stopped");
    }
}
