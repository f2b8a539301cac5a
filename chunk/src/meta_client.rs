//! The chunk's view of meta: a typed gRPC client ([`MetaClient`]), the
//! [`Membership`] the volume data path runs against ([`MetaMembership`]) and
//! the [`PeerDirectory`] built from meta's chunk list ([`MetaPeers`]).
//!
//! Nothing here decides anything: replica sets, epochs and chunk addresses
//! are whatever meta says. Caches exist only to avoid one RPC per extent and
//! are dropped whenever meta's revision moves (the node tells us, from its
//! heartbeat responses) or on explicit invalidation.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ironblock_proto::v1 as pb;
use ironblock_proto::v1::meta_client::MetaClient as GrpcClient;
use ironblock_proto::MetaChannel;
use parking_lot::{Mutex, RwLock};
use tonic::Code;

use crate::replica::{
    ChunkId, CopyUp, ExtentId, ExtentView, LocalPeer, Membership, MembershipError, PeerDirectory,
    ReplicaPeer, ReplicaSet, Resolved,
};
use crate::rpc::{RemotePeer, RemotePeerConfig};

/// Default per-call timeout of [`MetaClient`].
pub const DEFAULT_META_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a meta call failed, by what the caller should do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetaClientError {
    /// The meta address cannot be used.
    #[error("bad meta address {addr:?}: {reason}")]
    Address { addr: String, reason: String },
    /// Meta could not be reached or did not answer in time: retry later.
    #[error("meta unavailable: {0}")]
    Unavailable(String),
    /// NOT_FOUND: the volume / extent / chunk does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// FAILED_PRECONDITION: e.g. this chunk was declared dead (re-register)
    /// or belongs to another cluster.
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// INVALID_ARGUMENT.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Any other status.
    #[error("meta error {code:?}: {message}")]
    Other { code: Code, message: String },
}

impl MetaClientError {
    fn from_status(s: tonic::Status) -> Self {
        let m = s.message().to_string();
        match s.code() {
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
                MetaClientError::Unavailable(m)
            }
            Code::NotFound => MetaClientError::NotFound(m),
            Code::FailedPrecondition => MetaClientError::FailedPrecondition(m),
            Code::InvalidArgument => MetaClientError::InvalidArgument(m),
            code => MetaClientError::Other { code, message: m },
        }
    }

    fn into_membership(self, extent: &ExtentId) -> MembershipError {
        match self {
            MetaClientError::NotFound(_) => MembershipError::NotFound(extent.clone()),
            MetaClientError::Unavailable(m) => MembershipError::Unavailable(m),
            MetaClientError::FailedPrecondition(m) => MembershipError::Other(m),
            other => MembershipError::Other(other.to_string()),
        }
    }
}

pub use ironblock_proto::meta_channel::meta_uri;

/// A typed client of the meta service: connects lazily (and reconnects),
/// every call bounded by a timeout. Cheap to clone.
#[derive(Clone, Debug)]
pub struct MetaClient {
    client: GrpcClient<MetaChannel>,
    /// For `WatchRevisions`: a channel of its own with no per-request
    /// timeout (the stream lives as long as meta does).
    watch: GrpcClient<MetaChannel>,
    addr: String,
    timeout: Duration,
}

macro_rules! call {
    ($self:ident, $method:ident, $req:expr) => {{
        let mut c = $self.client.clone();
        match tokio::time::timeout($self.timeout, c.$method($req)).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(MetaClientError::from_status(s)),
            Err(_) => Err(MetaClientError::Unavailable(format!(
                "{} to {} timed out after {:?}",
                stringify!($method),
                $self.addr,
                $self.timeout
            ))),
        }
    }};
}

impl MetaClient {
    /// The generated client over the same lazy channel (for adapters such as
    /// the recovery worker's).
    pub fn grpc(&self) -> GrpcClient<MetaChannel> {
        self.client.clone()
    }

    /// A client of the meta group at `addrs` (comma-separated
    /// `host:port` or `http://host:port`; it follows the leader, see
    /// [`MetaChannel`]). Each attempt is bounded by `timeout`, and so is a
    /// call with its retries. Must be called within a tokio runtime.
    pub fn new(addrs: &str, timeout: Duration) -> Result<Self, MetaClientError> {
        let bad = |e: ironblock_proto::meta_channel::BadAddress| MetaClientError::Address {
            addr: e.addr,
            reason: e.reason,
        };
        let (client, watch) = MetaChannel::for_daemon(addrs, timeout).map_err(bad)?;
        Ok(MetaClient {
            client: GrpcClient::new(client),
            watch: GrpcClient::new(watch),
            addr: addrs.to_string(),
            timeout,
        })
    }

    /// The URI of meta.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub async fn register_chunk(
        &self,
        req: pb::RegisterChunkRequest,
    ) -> Result<pb::RegisterChunkResponse, MetaClientError> {
        call!(self, register_chunk, req)
    }

    pub async fn heartbeat(
        &self,
        req: pb::HeartbeatRequest,
    ) -> Result<pb::HeartbeatResponse, MetaClientError> {
        call!(self, heartbeat, req)
    }

    /// Open meta's revision stream (`WatchRevisions`): the current
    /// revision, then every change. Opening is bounded by the call timeout;
    /// the stream itself is not.
    pub async fn watch_revisions(
        &self,
        watcher: &str,
    ) -> Result<tonic::Streaming<pb::RevisionEvent>, MetaClientError> {
        let mut c = self.watch.clone();
        let req = pb::WatchRevisionsRequest {
            watcher: watcher.to_string(),
            vip_holder: String::new(),
        };
        match tokio::time::timeout(self.timeout, c.watch_revisions(req)).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(MetaClientError::from_status(s)),
            Err(_) => Err(MetaClientError::Unavailable(format!(
                "watch_revisions to {} timed out after {:?}",
                self.addr, self.timeout
            ))),
        }
    }

    pub async fn list_chunks(&self) -> Result<Vec<pb::Chunk>, MetaClientError> {
        call!(self, list_chunks, pb::ListChunksRequest {}).map(|r| r.chunks)
    }

    pub async fn list_exports(&self) -> Result<pb::ListExportsResponse, MetaClientError> {
        call!(self, list_exports, pb::ListExportsRequest {})
    }

    pub async fn get_extents(
        &self,
        volume_id: &str,
    ) -> Result<pb::GetExtentsResponse, MetaClientError> {
        call!(
            self,
            get_extents,
            pb::GetExtentsRequest {
                volume_id: volume_id.to_string()
            }
        )
    }

    pub async fn report_replica_failure(
        &self,
        req: pb::ReportReplicaFailureRequest,
    ) -> Result<Option<pb::Extent>, MetaClientError> {
        call!(self, report_replica_failure, req).map(|r| r.extent)
    }

    pub async fn ensure_extent(
        &self,
        volume_id: &str,
        index: u64,
    ) -> Result<Option<pb::Extent>, MetaClientError> {
        call!(
            self,
            ensure_extent,
            pb::ExtentRequest {
                volume_id: volume_id.to_string(),
                index
            }
        )
        .map(|r| r.extent)
    }

    pub async fn resolve_extent(
        &self,
        volume_id: &str,
        index: u64,
    ) -> Result<pb::ResolveExtentResponse, MetaClientError> {
        call!(
            self,
            resolve_extent,
            pb::ExtentRequest {
                volume_id: volume_id.to_string(),
                index
            }
        )
    }

    pub async fn copy_up_extent(
        &self,
        volume_id: &str,
        index: u64,
    ) -> Result<pb::CopyUpExtentResponse, MetaClientError> {
        call!(
            self,
            copy_up_extent,
            pb::ExtentRequest {
                volume_id: volume_id.to_string(),
                index
            }
        )
    }

    pub async fn commit_copy_up(
        &self,
        volume_id: &str,
        index: u64,
        store_key: &str,
    ) -> Result<Option<pb::Extent>, MetaClientError> {
        call!(
            self,
            commit_copy_up,
            pb::CommitCopyUpRequest {
                volume_id: volume_id.to_string(),
                index,
                store_key: store_key.to_string(),
            }
        )
        .map(|r| r.extent)
    }

    pub async fn list_chunk_extents(
        &self,
        chunk_id: u64,
    ) -> Result<pb::ListChunkExtentsResponse, MetaClientError> {
        call!(
            self,
            list_chunk_extents,
            pb::ListChunkExtentsRequest { chunk_id }
        )
    }
}

/// The volume id of a store key: the part before a `.g<generation>` suffix.
pub fn volume_of_store_key(key: &str) -> &str {
    match key.rsplit_once(".g") {
        Some((v, g)) if !v.is_empty() && !g.is_empty() && g.bytes().all(|b| b.is_ascii_digit()) => {
            v
        }
        _ => key,
    }
}

/// The store key meta gives an extent (the volume id when it sends none).
fn store_key(e: &pb::Extent, volume: &str) -> String {
    if e.store_key.is_empty() {
        volume.to_string()
    } else {
        e.store_key.clone()
    }
}

fn replica_set(e: &pb::Extent) -> ReplicaSet {
    ReplicaSet {
        epoch: e.epoch,
        members: e.replicas.iter().map(|c| ChunkId(c.to_string())).collect(),
        learners: e.learners.iter().map(|c| ChunkId(c.to_string())).collect(),
    }
}

/// Meta's extent as the data path's view of it.
fn extent_view(e: &pb::Extent, volume: &str) -> ExtentView {
    ExtentView {
        id: ExtentId::new(store_key(e, volume), e.index),
        set: replica_set(e),
        generation: e.generation,
        pending: e.pending,
    }
}

/// One volume's extents as fetched from meta.
struct VolumeView {
    sets: HashMap<ExtentId, ReplicaSet>,
    /// Extents already handed out from this fetch: a second ask for the same
    /// extent means the caller's view went stale, so it is fetched anew.
    served: HashSet<ExtentId>,
}

/// [`Membership`] backed by meta.
///
/// `current` fetches the whole volume with GetExtents and caches it, so the
/// first access to each extent costs no extra RPC. Each cached answer is
/// handed out once per fetch: the volume data path only asks again when its
/// own view is stale (a replica reported a newer epoch), and then it gets a
/// fresh one. The whole cache is dropped when meta's revision moves
/// ([`MetaMembership::set_revision`]) or on [`MetaMembership::invalidate`].
///
/// [`Membership::changes`] is meta's revision as the node last heard it
/// (every change of a replica set moves meta's revision, and the heartbeat
/// answers carry it): the data path re-asks meta for a set it waits on when
/// it moves. The cache is dropped before the new value is published, so a
/// `current` after the signal answers from a fetch made after it.
pub struct MetaMembership {
    meta: MetaClient,
    cache: Mutex<HashMap<String, Arc<Mutex<VolumeView>>>>,
    revision: Mutex<u64>,
    peers: Option<Arc<MetaPeers>>,
    changed: tokio::sync::watch::Sender<u64>,
}

impl MetaMembership {
    pub fn new(meta: MetaClient) -> Self {
        MetaMembership {
            meta,
            cache: Mutex::new(HashMap::new()),
            revision: Mutex::new(0),
            peers: None,
            changed: tokio::sync::watch::channel(0).0,
        }
    }

    /// Keep `peers` complete: a set naming a chunk the directory does not
    /// know yet (it joined since the last refresh) refreshes the directory
    /// before the set is handed out, so a new member or learner is never
    /// mistaken for an unreachable one.
    pub fn with_peers(mut self, peers: Arc<MetaPeers>) -> Self {
        self.peers = Some(peers);
        self
    }

    async fn know_members(&self, set: &ReplicaSet) {
        let Some(peers) = &self.peers else {
            return;
        };
        // Learners too: a chunk that just (re)joined is often a learner
        // first, and an unknown one would be reported as failed.
        if set.targets().all(|m| peers.peer(m).is_some()) {
            return;
        }
        if let Err(e) = peers.refresh(&self.meta).await {
            tracing::warn!(error = %e, "could not refresh the chunk directory");
        }
    }

    /// Meta's revision as last seen; a change drops every cached view and
    /// then signals [`Membership::changes`]. The node calls it as soon as a
    /// heartbeat answer names a new revision (before the revision is
    /// applied), and again when applying it.
    pub fn set_revision(&self, revision: u64) {
        let mut r = self.revision.lock();
        if *r != revision {
            *r = revision;
            self.cache.lock().clear();
            self.changed.send_replace(revision);
        }
    }

    /// Drop every cached view.
    pub fn invalidate(&self) {
        self.cache.lock().clear();
    }

    fn chunk_u64(chunk: &ChunkId) -> Result<u64, MembershipError> {
        chunk
            .as_str()
            .parse()
            .map_err(|_| MembershipError::Other(format!("chunk id {chunk} is not a meta chunk id")))
    }

    async fn fetch(&self, volume: &str) -> Result<Arc<Mutex<VolumeView>>, MetaClientError> {
        let r = self.meta.get_extents(volume).await?;
        let sets = r
            .extents
            .iter()
            .map(|e| (ExtentId::new(store_key(e, volume), e.index), replica_set(e)))
            .collect();
        let view = Arc::new(Mutex::new(VolumeView {
            sets,
            served: HashSet::new(),
        }));
        self.cache.lock().insert(volume.to_string(), view.clone());
        Ok(view)
    }

    fn remember(&self, extent: &ExtentId, set: ReplicaSet) {
        let volume = volume_of_store_key(&extent.volume);
        if let Some(v) = self.cache.lock().get(volume) {
            let mut v = v.lock();
            v.sets.insert(extent.clone(), set);
            v.served.insert(extent.clone());
        }
    }
}

#[async_trait]
impl Membership for MetaMembership {
    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.changed.subscribe())
    }

    async fn current(&self, extent: &ExtentId) -> Result<Option<ReplicaSet>, MembershipError> {
        let set = self.current_inner(extent).await?;
        if let Some(s) = &set {
            self.know_members(s).await;
        }
        Ok(set)
    }

    async fn remove_member(
        &self,
        extent: &ExtentId,
        failed: &ChunkId,
        seen_epoch: u64,
    ) -> Result<ReplicaSet, MembershipError> {
        let set = self.remove_member_inner(extent, failed, seen_epoch).await?;
        self.know_members(&set).await;
        Ok(set)
    }

    async fn ensure_extent(&self, volume: &str, index: u64) -> Result<ReplicaSet, MembershipError> {
        let set = self.ensure_extent_inner(volume, index).await?;
        self.know_members(&set).await;
        Ok(set)
    }

    async fn resolve(&self, volume: &str, index: u64) -> Result<Resolved, MembershipError> {
        let id = ExtentId::new(volume, index);
        let r = self
            .meta
            .resolve_extent(volume, index)
            .await
            .map_err(|e| e.into_membership(&id))?;
        let read = r.read.as_ref().map(|e| extent_view(e, volume));
        let own = r.own.as_ref().map(|e| extent_view(e, volume));
        for v in read.iter().chain(own.iter()) {
            self.know_members(&v.set).await;
        }
        Ok(Resolved { read, own })
    }

    async fn copy_up(&self, volume: &str, index: u64) -> Result<CopyUp, MembershipError> {
        let id = ExtentId::new(volume, index);
        let r = self
            .meta
            .copy_up_extent(volume, index)
            .await
            .map_err(|e| e.into_membership(&id))?;
        let destination = r
            .destination
            .as_ref()
            .map(|e| extent_view(e, volume))
            .ok_or_else(|| MembershipError::Other("meta answered without a destination".into()))?;
        self.know_members(&destination.set).await;
        Ok(CopyUp {
            source: r.source.as_ref().map(|e| extent_view(e, volume)),
            destination,
        })
    }

    async fn commit_copy_up(
        &self,
        volume: &str,
        index: u64,
        dst: &ExtentId,
    ) -> Result<ExtentView, MembershipError> {
        let e = self
            .meta
            .commit_copy_up(volume, index, &dst.volume)
            .await
            .map_err(|e| e.into_membership(dst))?
            .ok_or_else(|| MembershipError::Other("meta answered without an extent".into()))?;
        let view = extent_view(&e, volume);
        self.remember(&view.id, view.set.clone());
        Ok(view)
    }
}

impl MetaMembership {
    async fn current_inner(
        &self,
        extent: &ExtentId,
    ) -> Result<Option<ReplicaSet>, MembershipError> {
        let volume = volume_of_store_key(&extent.volume).to_string();
        let cached = self.cache.lock().get(&volume).cloned();
        if let Some(view) = cached {
            let mut v = view.lock();
            if !v.served.contains(extent) {
                let set = v.sets.get(extent).cloned();
                if set.is_some() {
                    v.served.insert(extent.clone());
                }
                return Ok(set);
            }
        }
        let view = self
            .fetch(&volume)
            .await
            .map_err(|e| e.into_membership(extent))?;
        let mut v = view.lock();
        let set = v.sets.get(extent).cloned();
        if set.is_some() {
            v.served.insert(extent.clone());
        }
        Ok(set)
    }

    async fn remove_member_inner(
        &self,
        extent: &ExtentId,
        failed: &ChunkId,
        seen_epoch: u64,
    ) -> Result<ReplicaSet, MembershipError> {
        let volume = volume_of_store_key(&extent.volume).to_string();
        let req = pb::ReportReplicaFailureRequest {
            volume_id: volume.clone(),
            index: extent.index,
            store_key: extent.volume.clone(),
            chunk_id: Self::chunk_u64(failed)?,
            seen_epoch,
            error: "replica I/O failed".into(),
        };
        let e = self
            .meta
            .report_replica_failure(req)
            .await
            .map_err(|e| e.into_membership(extent))?
            .ok_or_else(|| MembershipError::Other("meta answered without an extent".into()))?;
        let set = replica_set(&e);
        self.remember(extent, set.clone());
        Ok(set)
    }

    async fn ensure_extent_inner(
        &self,
        volume: &str,
        index: u64,
    ) -> Result<ReplicaSet, MembershipError> {
        let id = ExtentId::new(volume, index);
        let vol = volume_of_store_key(volume);
        let e = match self.meta.ensure_extent(vol, index).await {
            Ok(Some(e)) => e,
            Ok(None) => {
                return Err(MembershipError::Other(
                    "meta answered without an extent".into(),
                ))
            }
            Err(MetaClientError::Other {
                code: Code::Unimplemented,
                ..
            }) => {
                // Meta without lazy placement: every extent was placed at
                // create, so the current set is the answer.
                return match self.current_inner(&id).await? {
                    Some(s) => Ok(s),
                    None => Err(MembershipError::NoPlacement {
                        extent: id,
                        reason: "meta has no set for the extent and cannot place one".into(),
                    }),
                };
            }
            Err(MetaClientError::FailedPrecondition(m)) => {
                return Err(MembershipError::CopyUpRequired(m))
            }
            Err(e) => return Err(e.into_membership(&id)),
        };
        let set = replica_set(&e);
        let key = ExtentId::new(store_key(&e, vol), index);
        self.remember(&key, set.clone());
        Ok(set)
    }
}

/// [`PeerDirectory`] from meta's chunk list: this chunk's own [`LocalPeer`]
/// and a [`RemotePeer`] for every other Alive or Draining chunk, kept across
/// refreshes while its data address stays the same.
pub struct MetaPeers {
    local: Arc<LocalPeer>,
    cfg: RemotePeerConfig,
    peers: RwLock<HashMap<ChunkId, Arc<RemotePeer>>>,
}

impl MetaPeers {
    pub fn new(local: Arc<LocalPeer>, cfg: RemotePeerConfig) -> Self {
        MetaPeers {
            local,
            cfg,
            peers: RwLock::new(HashMap::new()),
        }
    }

    /// Replace the directory with meta's current chunk list.
    pub async fn refresh(&self, meta: &MetaClient) -> Result<(), MetaClientError> {
        let chunks = meta.list_chunks().await?;
        self.apply(&chunks);
        Ok(())
    }

    /// Replace the directory with `chunks` (ListChunks).
    pub fn apply(&self, chunks: &[pb::Chunk]) {
        let old = self.peers.read().clone();
        let mut next = HashMap::new();
        for c in chunks {
            let state = pb::ChunkState::try_from(c.state).unwrap_or(pb::ChunkState::Unspecified);
            if !matches!(state, pb::ChunkState::Alive | pb::ChunkState::Draining) {
                continue;
            }
            let id = ChunkId(c.id.to_string());
            if &id == self.local.chunk() || c.data_addr.is_empty() {
                continue;
            }
            let want = meta_uri(&c.data_addr);
            let peer = match old.get(&id) {
                Some(p) if p.addr() == want => p.clone(),
                _ => match RemotePeer::new(id.clone(), &c.data_addr, self.cfg.clone()) {
                    Ok(p) => Arc::new(p),
                    Err(e) => {
                        tracing::warn!(chunk = %id, addr = %c.data_addr, error = %e, "unusable data address");
                        continue;
                    }
                },
            };
            next.insert(id, peer);
        }
        *self.peers.write() = next;
    }

    /// Until `stop`: every [`crate::health::WATCH_EVERY`], probe each
    /// remote peer that has calls in flight (see `crate::health`), so a
    /// peer that froze under them is found whatever its latency.
    pub async fn watch_busy(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(crate::health::WATCH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let busy: Vec<Arc<RemotePeer>> = self
                .peers
                .read()
                .values()
                .filter(|p| p.health().is_some_and(|h| h.busy()))
                .cloned()
                .collect();
            let probes = busy.iter().map(|p| async move {
                if let Some(h) = p.health() {
                    if let Err(reason) = h.probe(|| p.ping()).await {
                        tracing::debug!(chunk = %p.chunk(), %reason, "background probe: peer hung");
                    }
                }
            });
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = futures::future::join_all(probes) => {}
            }
        }
    }

    /// Chunk ids with a remote peer, sorted.
    pub fn remote_ids(&self) -> Vec<ChunkId> {
        let mut v: Vec<_> = self.peers.read().keys().cloned().collect();
        v.sort();
        v
    }
}

impl PeerDirectory for MetaPeers {
    fn peer(&self, chunk: &ChunkId) -> Option<Arc<dyn ReplicaPeer>> {
        if chunk == self.local.chunk() {
            return Some(self.local.clone());
        }
        self.peers
            .read()
            .get(chunk)
            .map(|p| p.clone() as Arc<dyn ReplicaPeer>)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_keys_map_to_volumes() {
        let v = "0f1e2d3c-0000-4000-8000-000000000001";
        assert_eq!(volume_of_store_key(v), v);
        assert_eq!(volume_of_store_key(&format!("{v}.g3")), v);
        assert_eq!(volume_of_store_key(&format!("{v}.g12")), v);
        assert_eq!(volume_of_store_key("a.gx"), "a.gx");
        assert_eq!(volume_of_store_key(".g1"), ".g1");
    }

    #[test]
    fn status_codes_map_to_typed_errors() {
        let e = MetaClientError::from_status(tonic::Status::failed_precondition("dead"));
        assert_eq!(e, MetaClientError::FailedPrecondition("dead".into()));
        let e = MetaClientError::from_status(tonic::Status::unavailable("down"));
        assert!(matches!(e, MetaClientError::Unavailable(_)));
        let x = ExtentId::new("v", 1);
        assert_eq!(
            MetaClientError::NotFound("v".into()).into_membership(&x),
            MembershipError::NotFound(x.clone())
        );
    }

    #[tokio::test]
    async fn unreachable_meta_is_unavailable_within_the_timeout() {
        // A port nobody listens on (bound, then closed).
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let c = MetaClient::new(&addr.to_string(), Duration::from_millis(500)).unwrap();
        let t0 = std::time::Instant::now();
        let e = c.list_chunks().await.unwrap_err();
        assert!(matches!(e, MetaClientError::Unavailable(_)), "{e:?}");
        assert!(t0.elapsed() < Duration::from_secs(5));
        let m = MetaMembership::new(c);
        let e = m.current(&ExtentId::new("v", 0)).await.unwrap_err();
        assert!(matches!(e, MembershipError::Unavailable(_)), "{e:?}");
    }
}
