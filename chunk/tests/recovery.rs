//! Recovery with learners, end to end and in pieces.
//!
//! - `member_dies_learner_catches_up_under_write_load`: meta in-process
//!   (`MetaServer` on 127.0.0.1:0, 1 s liveness), three chunks (real
//!   `ExtentStore`s served by `serve_replica` on 127.0.0.1:0, heartbeating),
//!   an RF=2 `VolumeDevice` over a meta-backed membership and `RemotePeer`s,
//!   a verified write load; one member is stopped, the third chunk becomes a
//!   learner and its `RecoveryWorker` copies while writes go on; afterwards
//!   every member's copy equals the acknowledged data.
//! - a failing learner never fails writes; learners get every mutation and
//!   serve no read;
//! - a task whose sources are unreachable is reported failed;
//! - at most two copies run at once, each exact;
//! - a failing source is replaced by another mid-copy; `kick` polls at once;
//! - an access point with a view from before the learner cannot slip a
//!   write past the copy (the source is fenced before it is read);
//! - the gRPC `MetaRecovery` adapter maps meta's answers.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use ironblock_chunk::identity;
use ironblock_chunk::recovery::{
    MetaRecovery, RecoveryConfig, RecoveryError, RecoveryMeta, RecoveryTaskInfo, RecoveryWorker,
};
use ironblock_chunk::replica::{
    ChunkId, ExtentId, InMemoryMembership, LocalPeer, Membership, MembershipError, PeerDirectory,
    PeerError, ReplicaPeer, ReplicaSet, StaticPeers,
};
use ironblock_chunk::rpc::{serve_replica, RemotePeer, RemotePeerConfig, RpcError};
use ironblock_chunk::store::{ExtentStore, StoreConfig};
use ironblock_chunk::volume::{VolumeConfig, VolumeDevice};
use ironblock_meta::service::SharedState;
use ironblock_meta::state::ExtentRecord;
use ironblock_meta::{Config as MetaConfig, MetaServer};
use ironblock_proto::v1 as pb;
use ironblock_proto::v1::meta_client::MetaClient;
use ironblock_proto::MetaChannel;
use ironblock_target::scsi::DeviceIdentity;
use parking_lot::Mutex;
use rand::{Rng, SeedableRng};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const MIB: u64 = 1 << 20;
/// Meta's extent size; the stores must use the same.
const META_EXTENT: u64 = 64 * MIB;

fn ident() -> DeviceIdentity {
    DeviceIdentity {
        serial: "rec-1".into(),
        naa: [0x60, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
    }
}

async fn wait_until<F, Fut>(what: &str, limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if f().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------- wrappers

/// A peer that delays reads (so a copy takes a while) and counts calls.
struct SlowPeer {
    inner: Arc<dyn ReplicaPeer>,
    read_delay: Duration,
    reads: AtomicU64,
    writes: AtomicU64,
    unmaps: AtomicU64,
    flushes: AtomicU64,
    fail_writes: AtomicBool,
    fail_reads_from: AtomicU64,
}

impl SlowPeer {
    fn new(inner: Arc<dyn ReplicaPeer>, read_delay: Duration) -> Arc<SlowPeer> {
        Arc::new(SlowPeer {
            inner,
            read_delay,
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            unmaps: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            fail_writes: AtomicBool::new(false),
            fail_reads_from: AtomicU64::new(u64::MAX),
        })
    }
}

#[async_trait]
impl ReplicaPeer for SlowPeer {
    fn chunk(&self) -> &ChunkId {
        self.inner.chunk()
    }
    async fn write(
        &self,
        extent: &ExtentId,
        epoch: u64,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> Result<(), PeerError> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        if self.fail_writes.load(Ordering::SeqCst) {
            return Err(PeerError::Unreachable("injected".into()));
        }
        self.inner.write(extent, epoch, offset, data, fua).await
    }
    async fn read(
        &self,
        extent: &ExtentId,
        epoch: u64,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, PeerError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.read_delay).await;
        if offset >= self.fail_reads_from.load(Ordering::SeqCst) {
            return Err(PeerError::Other("injected read error".into()));
        }
        self.inner.read(extent, epoch, offset, len).await
    }
    async fn flush(&self, extent: &ExtentId) -> Result<(), PeerError> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        self.inner.flush(extent).await
    }
    async fn unmap(
        &self,
        extent: &ExtentId,
        epoch: u64,
        offset: u64,
        len: u64,
    ) -> Result<(), PeerError> {
        self.unmaps.fetch_add(1, Ordering::SeqCst);
        self.inner.unmap(extent, epoch, offset, len).await
    }
    async fn repair(&self, extent: &ExtentId, block: u64, good: Bytes) -> Result<(), PeerError> {
        self.inner.repair(extent, block, good).await
    }
    async fn fence(&self, extent: &ExtentId, epoch: u64) -> Result<(), PeerError> {
        self.inner.fence(extent, epoch).await
    }
}

// ---------------------------------------------------------------- a small cluster

struct Meta {
    addr: SocketAddr,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Meta {
    /// Meta and its in-process state (drop every clone of the state before
    /// [`Meta::stop`], which waits for it to be released).
    async fn start(liveness: Duration) -> (Meta, SharedState) {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = MetaConfig::new("127.0.0.1:0".parse().unwrap(), dir.path().to_path_buf());
        cfg.liveness_timeout = liveness;
        let server = MetaServer::bind(cfg).await.unwrap();
        let addr = server.local_addr().unwrap();
        let state = server.state();
        let stop = CancellationToken::new();
        let s = stop.clone();
        let task = tokio::spawn(async move {
            server.run(s.cancelled_owned()).await.unwrap();
        });
        (
            Meta {
                addr,
                stop,
                task: Some(task),
                _dir: dir,
            },
            state,
        )
    }

    async fn client(&self) -> MetaClient<MetaChannel> {
        let ch = MetaChannel::new(&self.addr.to_string(), Duration::from_secs(10), |e| e).unwrap();
        MetaClient::new(ch)
    }

    async fn stop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .expect("meta stops")
                .unwrap();
        }
    }
}

struct Node {
    id: u64,
    chunk: ChunkId,
    store: ExtentStore,
    addr: SocketAddr,
    stop_server: CancellationToken,
    server: Option<JoinHandle<Result<(), RpcError>>>,
    stop_heartbeat: CancellationToken,
    heartbeat: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Node {
    /// Register with meta, stamp a data dir with the handed-out id, serve
    /// replica traffic and heartbeat every 200 ms.
    async fn start(meta: &mut MetaClient<MetaChannel>, cluster: &mut String) -> Node {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let r = meta
            .register_chunk(pb::RegisterChunkRequest {
                cluster_id: cluster.clone(),
                chunk_id: 0,
                portal: addr.to_string(),
                data_addr: addr.to_string(),
                capacity_bytes: 1 << 40,
                used_bytes: 0,
                request_id: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        *cluster = r.cluster_id.clone();
        let dir = tempfile::tempdir().unwrap();
        identity::init(dir.path(), &r.cluster_id, &r.chunk_id.to_string(), false).unwrap();
        let store = ExtentStore::open(dir.path(), StoreConfig::default()).unwrap();
        assert_eq!(store.extent_size(), META_EXTENT);
        let peer = Arc::new(LocalPeer::new(store.clone()));
        let stop_server = CancellationToken::new();
        let server = tokio::spawn(serve_replica(listener, peer, stop_server.clone()));
        let stop_heartbeat = CancellationToken::new();
        let heartbeat = {
            let stop = stop_heartbeat.clone();
            let mut c = meta.clone();
            let (cluster, id) = (r.cluster_id.clone(), r.chunk_id);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(200));
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    let _ = c
                        .heartbeat(pb::HeartbeatRequest {
                            cluster_id: cluster.clone(),
                            chunk_id: id,
                            used_bytes: 0,
                            applied_revision: 0,
                            io: Vec::new(),
                        })
                        .await;
                }
            })
        };
        Node {
            id: r.chunk_id,
            chunk: ChunkId(r.chunk_id.to_string()),
            store,
            addr,
            stop_server,
            server: Some(server),
            stop_heartbeat,
            heartbeat: Some(heartbeat),
            _dir: dir,
        }
    }

    async fn stop_heartbeats(&mut self) {
        self.stop_heartbeat.cancel();
        if let Some(h) = self.heartbeat.take() {
            tokio::time::timeout(Duration::from_secs(5), h)
                .await
                .expect("heartbeat task stops")
                .unwrap();
        }
    }

    /// Stop serving and heartbeating: the chunk is gone.
    async fn kill(&mut self) {
        self.stop_heartbeats().await;
        self.stop_server.cancel();
        if let Some(t) = self.server.take() {
            tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .expect("replica server stops")
                .unwrap()
                .unwrap();
        }
    }
}

fn set_of(e: &ExtentRecord) -> ReplicaSet {
    ReplicaSet {
        epoch: e.epoch,
        members: e.replicas.iter().map(|c| ChunkId(c.to_string())).collect(),
        learners: e.learners.iter().map(|c| ChunkId(c.to_string())).collect(),
    }
}

fn set_from_pb(e: &pb::Extent) -> ReplicaSet {
    ReplicaSet {
        epoch: e.epoch,
        members: e.replicas.iter().map(|c| ChunkId(c.to_string())).collect(),
        learners: e.learners.iter().map(|c| ChunkId(c.to_string())).collect(),
    }
}

/// Test-only [`Membership`] backed by meta: the current set over gRPC
/// (GetExtents); failures go straight to the in-process state's
/// `remove_replica` (the ReportReplicaFailure RPC is not wired up here).
struct MetaMembership {
    client: MetaClient<MetaChannel>,
    state: SharedState,
    removals: AtomicU64,
}

impl MetaMembership {
    async fn extent(
        &self,
        volume: &str,
        index: u64,
    ) -> Result<Option<pb::Extent>, MembershipError> {
        let mut c = self.client.clone();
        let r = c
            .get_extents(pb::GetExtentsRequest {
                volume_id: volume.to_string(),
            })
            .await
            .map_err(|s| MembershipError::Unavailable(s.message().to_string()))?
            .into_inner();
        Ok(r.extents.into_iter().find(|e| e.index == index))
    }
}

#[async_trait]
impl Membership for MetaMembership {
    async fn current(&self, extent: &ExtentId) -> Result<Option<ReplicaSet>, MembershipError> {
        Ok(self
            .extent(&extent.volume, extent.index)
            .await?
            .map(|e| set_from_pb(&e)))
    }

    async fn remove_member(
        &self,
        extent: &ExtentId,
        failed: &ChunkId,
        seen_epoch: u64,
    ) -> Result<ReplicaSet, MembershipError> {
        let chunk: u64 = failed
            .as_str()
            .parse()
            .map_err(|_| MembershipError::Other(format!("chunk id {failed}")))?;
        self.removals.fetch_add(1, Ordering::SeqCst);
        let mut st = self.state.lock().await;
        let e = st
            .remove_replica(&extent.volume, extent.index, chunk, seen_epoch, "test")
            .map_err(|e| MembershipError::Other(e.to_string()))?;
        Ok(set_of(&e))
    }

    async fn ensure_extent(&self, volume: &str, index: u64) -> Result<ReplicaSet, MembershipError> {
        self.extent(volume, index)
            .await?
            .map(|e| set_from_pb(&e))
            .ok_or_else(|| MembershipError::NotFound(ExtentId::new(volume, index)))
    }
}

/// One writer's region and what was acknowledged in it.
struct Model {
    base: u64,
    data: Vec<u8>,
}

/// Random writes (and some unmaps) to `[base, base+len)`; every one must be
/// acknowledged. Stops at `stop` or after `max_ops`.
async fn write_load(
    v: VolumeDevice,
    mut model: Model,
    seed: u64,
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
    max_ops: u64,
) -> Model {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let blocks = model.data.len() as u64 / 4096;
    for n in 0..max_ops {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let len = rng.gen_range(1..=8u64).min(blocks);
        let first = rng.gen_range(0..=blocks - len);
        let (at, bytes) = ((first * 4096) as usize, (len * 4096) as usize);
        if n % 10 == 9 {
            v.unmap_bytes(model.base + at as u64, bytes as u64)
                .await
                .unwrap_or_else(|e| panic!("unmap {n} at {at} failed: {e}"));
            model.data[at..at + bytes].fill(0);
        } else {
            let data: Vec<u8> = (0..bytes).map(|_| rng.gen()).collect();
            v.write_bytes(model.base + at as u64, &data, n % 7 == 0)
                .await
                .unwrap_or_else(|e| panic!("write {n} at {at} failed: {e}"));
            model.data[at..at + bytes].copy_from_slice(&data);
        }
        ops.fetch_add(1, Ordering::SeqCst);
        if n % 8 == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    model
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn member_dies_learner_catches_up_under_write_load() {
    let t0 = std::time::Instant::now();
    let (mut meta, state) = Meta::start(Duration::from_secs(1)).await;
    let mut client = meta.client().await;
    let mut cluster = String::new();
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(Node::start(&mut client, &mut cluster).await);
    }
    const VOL_SIZE: u64 = 8 * MIB;
    let vol = client
        .create_volume(pb::CreateVolumeRequest {
            name: "rec".into(),
            size_bytes: VOL_SIZE,
            replicas: 2,
            thin: false,
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let ext = ExtentId::new(vol.id.clone(), 0);
    let membership = Arc::new(MetaMembership {
        client: client.clone(),
        state,
        removals: AtomicU64::new(0),
    });
    let first_set = membership.current(&ext).await.unwrap().unwrap();
    assert_eq!(first_set.members.len(), 2);
    let victim = nodes
        .iter()
        .position(|n| n.chunk == first_set.members[0])
        .unwrap();
    let spare = nodes
        .iter()
        .position(|n| !first_set.holds(&n.chunk))
        .unwrap();

    let pcfg = RemotePeerConfig {
        call_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(1),
    };
    let mut peers = StaticPeers::new();
    // The recovery workers read through slow peers so the copy overlaps
    // plenty of writes.
    let mut slow_peers = StaticPeers::new();
    for n in &nodes {
        let remote: Arc<dyn ReplicaPeer> =
            Arc::new(RemotePeer::new(n.chunk.clone(), &n.addr.to_string(), pcfg.clone()).unwrap());
        peers.insert(remote.clone());
        slow_peers.insert(SlowPeer::new(remote, Duration::from_millis(15)));
    }
    let peers: Arc<dyn PeerDirectory> = Arc::new(peers);
    let slow_peers: Arc<dyn PeerDirectory> = Arc::new(slow_peers);

    let stop_workers = CancellationToken::new();
    let mut workers = Vec::new();
    for n in &nodes {
        let w = RecoveryWorker::new(
            Arc::new(MetaRecovery::new(client.clone())),
            n.store.clone(),
            n.chunk.clone(),
            slow_peers.clone(),
            RecoveryConfig {
                poll_interval: Duration::from_millis(100),
                piece_size: MIB,
                ..RecoveryConfig::default()
            },
        );
        let h = w.spawn(stop_workers.clone());
        workers.push((w, h));
    }

    let mut vcfg = VolumeConfig::new(vol.id.clone(), VOL_SIZE, ident());
    vcfg.logical_block_size = 4096;
    vcfg.extent_size = META_EXTENT;
    vcfg.peer_timeout = Duration::from_secs(3);
    let v = VolumeDevice::new(vcfg, membership.clone(), peers.clone(), None).unwrap();

    // Fill the volume so the copy has real data.
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut initial = vec![0u8; VOL_SIZE as usize];
    rng.fill(&mut initial[..]);
    for at in (0..VOL_SIZE).step_by(MIB as usize) {
        v.write_bytes(at, &initial[at as usize..(at + MIB) as usize], false)
            .await
            .unwrap();
    }
    v.flush_all().await.unwrap();

    // Four writers, each on its own 2 MiB.
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let region = VOL_SIZE / 4;
    let writers: Vec<_> = (0..4u64)
        .map(|i| {
            let model = Model {
                base: i * region,
                data: initial[(i * region) as usize..((i + 1) * region) as usize].to_vec(),
            };
            tokio::spawn(write_load(
                v.clone(),
                model,
                100 + i,
                stop.clone(),
                ops.clone(),
                20_000,
            ))
        })
        .collect();
    wait_until("writes before the failure", Duration::from_secs(20), || {
        let ops = ops.clone();
        async move { ops.load(Ordering::SeqCst) >= 100 }
    })
    .await;

    // The member dies.
    nodes[victim].kill().await;

    let learner = nodes[spare].chunk.clone();
    // The spare becomes a learner and its worker starts copying; writes go on.
    let w = workers[spare].0.clone();
    wait_until("the copy to start", Duration::from_secs(20), || {
        let w = w.clone();
        async move { !w.progress().is_empty() }
    })
    .await;
    let p = w.progress();
    assert_eq!(p[0].extent, ext);
    assert_eq!(p[0].bytes_total, META_EXTENT);
    let ops_at_copy_start = ops.load(Ordering::SeqCst);
    let set = membership.current(&ext).await.unwrap().unwrap();
    assert!(
        set.is_learner(&learner) || set.contains(&learner),
        "{set:?}"
    );
    assert!(!set.holds(&nodes[victim].chunk));

    // Recovery completes: the learner is a member, RF=2 again.
    let m = membership.clone();
    let l = learner.clone();
    wait_until("the learner's promotion", Duration::from_secs(60), || {
        let m = m.clone();
        let l = l.clone();
        let ext = ext.clone();
        async move {
            let s = m.current(&ext).await.unwrap().unwrap();
            s.contains(&l) && s.members.len() == 2 && s.learners.is_empty()
        }
    })
    .await;
    let ops_at_promotion = ops.load(Ordering::SeqCst);
    eprintln!(
        "promoted at {:?}, ops {ops_at_copy_start} -> {ops_at_promotion}",
        t0.elapsed()
    );
    assert!(
        ops_at_promotion > ops_at_copy_start + 10,
        "writes went on during the copy: {ops_at_copy_start} -> {ops_at_promotion}"
    );
    // The worker counts the task once meta took its CompleteRecovery, i.e.
    // just *after* the promotion became visible above: wait for the count
    // (bounded) instead of racing the worker.
    wait_until(
        "the worker to count the completed task",
        Duration::from_secs(10),
        || {
            let w = w.clone();
            async move { w.metrics().tasks_completed.load(Ordering::SeqCst) >= 1 }
        },
    )
    .await;
    assert!(w.metrics().tasks_completed.load(Ordering::SeqCst) >= 1);
    assert!(w.metrics().bytes_copied.load(Ordering::SeqCst) >= META_EXTENT);
    assert_eq!(w.metrics().tasks_failed.load(Ordering::SeqCst), 0);
    let mut text = String::new();
    w.metrics().render_prometheus(&mut text);
    assert!(text.contains("ironblock_chunk_recovery_tasks_completed_total 1"));

    // A little more load on the new set, then stop and settle.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let mut models = Vec::new();
    for wr in writers {
        models.push(
            tokio::time::timeout(Duration::from_secs(30), wr)
                .await
                .expect("writer stops")
                .unwrap(),
        );
    }
    v.flush_all().await.unwrap();
    let mut expect = vec![0u8; VOL_SIZE as usize];
    for m in &models {
        expect[m.base as usize..m.base as usize + m.data.len()].copy_from_slice(&m.data);
    }

    // The victim was declared dead by the liveness check.
    wait_until("the victim declared dead", Duration::from_secs(10), || {
        let mut c = client.clone();
        async move {
            c.cluster_status(pb::ClusterStatusRequest {})
                .await
                .unwrap()
                .into_inner()
                .chunks_dead
                == 1
        }
    })
    .await;
    let st = client
        .cluster_status(pb::ClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.health, pb::Health::Ok as i32);
    assert_eq!(st.recovery_completed, 1);
    assert_eq!(st.recovery_queued, 0);

    // Every member's own copy equals what was acknowledged.
    let set = membership.current(&ext).await.unwrap().unwrap();
    assert_eq!(set.members.len(), 2);
    for m in &set.members {
        let n = nodes.iter().find(|n| &n.chunk == m).unwrap();
        let got = n.store.read(&ext, 0, VOL_SIZE).await.unwrap();
        let bad = got.iter().zip(&expect).position(|(a, b)| a != b);
        assert!(bad.is_none(), "chunk {m} differs at byte {bad:?}");
        assert!(!n.store.resyncing(&ext).unwrap());
        assert_eq!(n.id.to_string(), m.as_str());
    }
    let mut through = vec![0u8; VOL_SIZE as usize];
    v.read_bytes(0, &mut through).await.unwrap();
    assert!(through == expect);
    assert!(membership.removals.load(Ordering::SeqCst) >= 1);

    stop_workers.cancel();
    for (_, h) in workers {
        tokio::time::timeout(Duration::from_secs(15), h)
            .await
            .expect("worker stops")
            .unwrap();
    }
    for n in nodes.iter_mut() {
        if n.server.is_some() {
            n.kill().await;
        }
    }
    drop((v, membership, m));
    meta.stop().await;
    eprintln!("stopped at {:?}", t0.elapsed());
}

// ---------------------------------------------------------------- learners on the data path

/// A fake meta whose one task copies `ext` at `epoch` from chunks 0 and 1
/// to chunk 2.
fn fake_meta_copying_to_c2(ext: &ExtentId, epoch: u64) -> Arc<FakeMeta> {
    let fake = Arc::new(FakeMeta::default());
    fake.tasks.lock().push(RecoveryTaskInfo {
        id: 1,
        extent: ext.clone(),
        epoch,
        target: ChunkId("c2".into()),
        sources: vec![ChunkId("c0".into()), ChunkId("c1".into())],
    });
    fake
}

fn local_store(id: &str) -> (tempfile::TempDir, ExtentStore) {
    let d = tempfile::tempdir().unwrap();
    identity::init(d.path(), "test", id, false).unwrap();
    let s = ExtentStore::open(
        d.path(),
        StoreConfig {
            extent_size: MIB,
            ..StoreConfig::default()
        },
    )
    .unwrap();
    (d, s)
}

#[tokio::test]
async fn learners_get_every_mutation_serve_no_read_and_never_fail_writes() {
    let mut dirs = Vec::new();
    let mut stores = Vec::new();
    let mut counted = Vec::new();
    let mut peers = StaticPeers::new();
    for i in 0..4 {
        let (d, s) = local_store(&format!("c{i}"));
        let p = SlowPeer::new(Arc::new(LocalPeer::new(s.clone())), Duration::ZERO);
        peers.insert(p.clone());
        counted.push(p);
        dirs.push(d);
        stores.push(s);
    }
    let chunk = |i: usize| ChunkId(format!("c{i}"));
    let meta = Arc::new(InMemoryMembership::new(vec![chunk(0), chunk(1)], 2));
    let mut cfg = VolumeConfig::new("vol-l", 2 * MIB, ident());
    cfg.extent_size = MIB;
    cfg.logical_block_size = 4096;
    cfg.peer_timeout = Duration::from_secs(2);
    let v = VolumeDevice::new(cfg, meta.clone(), Arc::new(peers), None).unwrap();
    let ext = ExtentId::new("vol-l", 0);
    v.write_bytes(0, &[1u8; 8192], false).await.unwrap();

    // c2 becomes a learner: it gets writes, unmaps and flushes.
    let set = meta.add_learner(&ext, chunk(2)).unwrap();
    assert_eq!(set.epoch, 2);
    assert!(meta.add_learner(&ext, chunk(0)).is_none());
    // As the recovery worker does: fence the members to the learner epoch,
    // so the access point's old view is refused and refreshed.
    for s in &stores[..2] {
        s.set_epoch(&ext, 2).await.unwrap();
    }
    v.write_bytes(4096 * 4, &[2u8; 4096], false).await.unwrap();
    for (i, s) in stores.iter().enumerate().take(3) {
        let got = s.read(&ext, 4096 * 4, 4096).await.unwrap();
        assert_eq!(&got[..], &[2u8; 4096][..], "chunk {i}");
    }
    v.unmap_bytes(0, 4096).await.unwrap();
    v.flush_all().await.unwrap();
    assert!(counted[2].writes.load(Ordering::SeqCst) >= 1);
    assert_eq!(counted[2].unmaps.load(Ordering::SeqCst), 1);
    assert_eq!(counted[2].flushes.load(Ordering::SeqCst), 1);
    // Reads go to members only.
    let mut buf = vec![0u8; 2 * MIB as usize];
    for _ in 0..5 {
        v.read_bytes(0, &mut buf).await.unwrap();
    }
    assert_eq!(counted[2].reads.load(Ordering::SeqCst), 0);
    assert!(buf[..4096].iter().all(|b| *b == 0));
    assert!(buf[4096..8192].iter().all(|b| *b == 1));

    // The learner starts failing: writes are still acknowledged, the
    // learner is reported and dropped, the members have the data.
    counted[2].fail_writes.store(true, Ordering::SeqCst);
    let removals = meta.removals();
    v.write_bytes(4096 * 8, &[3u8; 4096], true).await.unwrap();
    let set = meta.get(&ext).unwrap();
    assert!(set.learners.is_empty(), "{set:?}");
    assert_eq!(set.members, vec![chunk(0), chunk(1)]);
    assert_eq!(meta.removals(), removals + 1);
    for s in &stores[..2] {
        let got = s.read(&ext, 4096 * 8, 4096).await.unwrap();
        assert_eq!(&got[..], &[3u8; 4096][..]);
    }
    // And more writes go on without it.
    let w3 = counted[2].writes.load(Ordering::SeqCst);
    v.write_bytes(4096 * 9, &[4u8; 4096], false).await.unwrap();
    assert_eq!(counted[2].writes.load(Ordering::SeqCst), w3);

    // A healthy learner promoted to member serves reads from then on.
    let set = meta.add_learner(&ext, chunk(3)).unwrap();
    for s in &stores[..2] {
        s.set_epoch(&ext, set.epoch).await.unwrap();
    }
    v.write_bytes(4096 * 10, &[5u8; 4096], false).await.unwrap();
    assert!(counted[3].writes.load(Ordering::SeqCst) >= 1);
    let s = meta.promote(&ext, &chunk(3)).unwrap();
    assert_eq!(s.members, vec![chunk(0), chunk(1), chunk(3)]);
    assert!(meta.promote(&ext, &chunk(3)).is_none());
}

// ---------------------------------------------------------------- the worker against a fake meta

#[derive(Default)]
struct FakeMeta {
    tasks: Mutex<Vec<RecoveryTaskInfo>>,
    done: Mutex<HashMap<u64, Result<(), String>>>,
}

#[async_trait]
impl RecoveryMeta for FakeMeta {
    async fn tasks(&self, chunk: &ChunkId) -> Result<Vec<RecoveryTaskInfo>, RecoveryError> {
        Ok(self
            .tasks
            .lock()
            .iter()
            .filter(|t| &t.target == chunk)
            .cloned()
            .collect())
    }

    async fn complete(
        &self,
        task_id: u64,
        result: Result<(), String>,
    ) -> Result<(), RecoveryError> {
        let mut tasks = self.tasks.lock();
        let before = tasks.len();
        tasks.retain(|t| t.id != task_id);
        if tasks.len() == before {
            return Err(RecoveryError::TaskGone(task_id));
        }
        self.done.lock().insert(task_id, result);
        Ok(())
    }
}

#[tokio::test]
async fn a_task_whose_sources_are_unreachable_is_reported_failed() {
    let (_d, store) = local_store("9");
    // One source listens nowhere (a closed port), one is unknown.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let mut peers = StaticPeers::new();
    peers.insert(Arc::new(
        RemotePeer::new(
            ChunkId::from("1"),
            &closed.to_string(),
            RemotePeerConfig {
                call_timeout: Duration::from_secs(1),
                connect_timeout: Duration::from_millis(500),
            },
        )
        .unwrap(),
    ));
    let fake = Arc::new(FakeMeta::default());
    let ext = ExtentId::new("vol-u", 0);
    fake.tasks.lock().push(RecoveryTaskInfo {
        id: 5,
        extent: ext.clone(),
        epoch: 3,
        target: ChunkId::from("9"),
        sources: vec![ChunkId::from("1"), ChunkId::from("2")],
    });
    let w = RecoveryWorker::new(
        fake.clone(),
        store.clone(),
        ChunkId::from("9"),
        Arc::new(peers),
        RecoveryConfig {
            poll_interval: Duration::from_secs(60),
            ..RecoveryConfig::default()
        },
    );
    let stop = CancellationToken::new();
    assert_eq!(w.poll_once(&stop).await.unwrap(), 1);
    let f = fake.clone();
    wait_until("the failure report", Duration::from_secs(20), || {
        let f = f.clone();
        async move { f.done.lock().contains_key(&5) }
    })
    .await;
    let r = fake.done.lock().get(&5).cloned().unwrap();
    let msg = r.unwrap_err();
    assert!(msg.contains("no source"), "{msg}");
    assert!(msg.contains("unknown chunk"), "{msg}");
    assert_eq!(w.metrics().tasks_failed.load(Ordering::SeqCst), 1);
    assert_eq!(w.metrics().tasks_completed.load(Ordering::SeqCst), 0);
    wait_until(
        "the task to leave the running list",
        Duration::from_secs(5),
        || {
            let w = w.clone();
            async move { w.progress().is_empty() }
        },
    )
    .await;
    assert!(!store.resyncing(&ext).unwrap());
    assert_eq!(w.metrics().tasks_running.load(Ordering::SeqCst), 0);
}

/// A [`RecoveryMeta`] whose task list can be answered late: the list is
/// taken when asked, handed back after `lag` (as an answer of a loaded meta
/// or network arrives).
struct LaggingMeta {
    inner: Arc<FakeMeta>,
    lag: Mutex<Option<Duration>>,
}

#[async_trait]
impl RecoveryMeta for LaggingMeta {
    async fn tasks(&self, chunk: &ChunkId) -> Result<Vec<RecoveryTaskInfo>, RecoveryError> {
        let list = self.inner.tasks(chunk).await?;
        let lag = *self.lag.lock();
        if let Some(lag) = lag {
            tokio::time::sleep(lag).await;
        }
        Ok(list)
    }

    async fn complete(
        &self,
        task_id: u64,
        result: Result<(), String>,
    ) -> Result<(), RecoveryError> {
        self.inner.complete(task_id, result).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_finished_while_meta_answered_is_not_started_again() {
    let (_ds, source) = local_store("1");
    let (_dt, target) = local_store("2");
    let src_peer = SlowPeer::new(
        Arc::new(LocalPeer::new(source.clone())),
        Duration::from_millis(50),
    );
    let ext = ExtentId::new("vol-r", 0);
    source.create_extent(&ext, 4).await.unwrap();
    source
        .write(&ext, 4, 0, Bytes::from(vec![7u8; 64 * 4096]), false)
        .await
        .unwrap();
    let fake = Arc::new(FakeMeta::default());
    fake.tasks.lock().push(RecoveryTaskInfo {
        id: 7,
        extent: ext.clone(),
        epoch: 5,
        target: ChunkId::from("2"),
        sources: vec![ChunkId::from("1")],
    });
    let lagging = Arc::new(LaggingMeta {
        inner: fake.clone(),
        lag: Mutex::new(None),
    });
    let w = RecoveryWorker::new(
        lagging.clone(),
        target.clone(),
        ChunkId::from("2"),
        Arc::new(StaticPeers::new().with(src_peer)),
        RecoveryConfig {
            poll_interval: Duration::from_secs(60),
            piece_size: 256 << 10,
            ..RecoveryConfig::default()
        },
    );
    let stop = CancellationToken::new();
    assert_eq!(w.poll_once(&stop).await.unwrap(), 1);
    // The next answer is made now (the task is still queued) but arrives
    // only after the copy completed and meta took the completion.
    *lagging.lag.lock() = Some(Duration::from_secs(3));
    let started = w.poll_once(&stop).await.unwrap();
    assert!(
        fake.done.lock().contains_key(&7),
        "the copy did not complete within the lag; the test proves nothing"
    );
    assert_eq!(started, 0, "a completed task was started again");
    assert!(!target.resyncing(&ext).unwrap());
    assert_eq!(w.metrics().tasks_completed.load(Ordering::SeqCst), 1);
    assert_eq!(w.metrics().tasks_failed.load(Ordering::SeqCst), 0);
    assert_eq!(
        target.read(&ext, 0, MIB).await.unwrap(),
        source.read(&ext, 0, MIB).await.unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_two_copies_at_once_and_each_is_exact() {
    let (_ds, source) = local_store("1");
    let (_dt, target) = local_store("2");
    let src_peer = SlowPeer::new(
        Arc::new(LocalPeer::new(source.clone())),
        Duration::from_millis(40),
    );
    let fake = Arc::new(FakeMeta::default());
    let mut expect = Vec::new();
    for i in 0..3u64 {
        let ext = ExtentId::new("vol-c", i);
        source.create_extent(&ext, 4).await.unwrap();
        let data = Bytes::from(vec![i as u8 + 1; 64 * 4096]);
        source.write(&ext, 4, 4096 * 16, data, false).await.unwrap();
        expect.push(ext.clone());
        fake.tasks.lock().push(RecoveryTaskInfo {
            id: 10 + i,
            extent: ext,
            epoch: 5,
            target: ChunkId::from("2"),
            sources: vec![ChunkId::from("1")],
        });
    }
    let w = RecoveryWorker::new(
        fake.clone(),
        target.clone(),
        ChunkId::from("2"),
        Arc::new(StaticPeers::new().with(src_peer.clone())),
        RecoveryConfig {
            poll_interval: Duration::from_millis(50),
            piece_size: 256 << 10,
            ..RecoveryConfig::default()
        },
    );
    let stop = CancellationToken::new();
    let h = w.spawn(stop.clone());
    let mut most = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while fake.done.lock().len() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "copies did not finish"
        );
        most = most.max(w.progress().len());
        assert!(w.metrics().tasks_running.load(Ordering::SeqCst) <= 2);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(most, 2, "two copies ran side by side");
    for (id, r) in fake.done.lock().iter() {
        assert!(r.is_ok(), "task {id}: {r:?}");
    }
    for (i, ext) in expect.iter().enumerate() {
        assert_eq!(
            target.read(ext, 0, MIB).await.unwrap(),
            source.read(ext, 0, MIB).await.unwrap(),
            "extent {i}"
        );
        // The source was fenced to the learner epoch before the copy.
        assert_eq!(source.extent_epoch(ext).unwrap(), 5);
        assert_eq!(target.extent_epoch(ext).unwrap(), 5);
    }
    assert_eq!(w.metrics().bytes_copied.load(Ordering::SeqCst), 3 * MIB);
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), h)
        .await
        .expect("worker stops")
        .unwrap();
}

#[tokio::test]
async fn meta_recovery_adapter_maps_meta_answers() {
    let (mut meta, state) = Meta::start(Duration::from_secs(30)).await;
    drop(state);
    let client = meta.client().await;
    let m = MetaRecovery::new(client).with_timeout(Duration::from_secs(5));
    assert_eq!(m.tasks(&ChunkId::from("7")).await.unwrap(), vec![]);
    assert!(matches!(
        m.tasks(&ChunkId::from("c7")).await,
        Err(RecoveryError::Invalid(_))
    ));
    assert_eq!(
        m.complete(999, Ok(())).await,
        Err(RecoveryError::TaskGone(999))
    );
    assert_eq!(
        m.complete(999, Err("x".into())).await,
        Err(RecoveryError::TaskGone(999))
    );
    let t = ironblock_chunk::recovery::task_from_pb(&pb::RecoveryTask {
        id: 4,
        volume_id: "vol".into(),
        extent_index: 2,
        target_chunk: 3,
        sources: vec![1, 2],
        replaces_chunk: 0,
        epoch: 9,
        store_key: "vol.g1".into(),
        generation: 1,
    });
    assert_eq!(t.extent, ExtentId::new("vol.g1", 2));
    assert_eq!(t.target, ChunkId::from("3"));
    assert_eq!(t.sources, vec![ChunkId::from("1"), ChunkId::from("2")]);
    assert_eq!(t.epoch, 9);
    meta.stop().await;
}

#[tokio::test]
async fn copy_falls_back_to_another_source_and_kick_polls_at_once() {
    let (_d1, s1) = local_store("1");
    let (_d2, s2) = local_store("2");
    let (_dt, target) = local_store("3");
    let ext = ExtentId::new("vol-f", 0);
    let data = Bytes::from((0..MIB).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    for s in [&s1, &s2] {
        s.create_extent(&ext, 2).await.unwrap();
        s.write(&ext, 2, 0, data.clone(), false).await.unwrap();
    }
    let p1 = SlowPeer::new(Arc::new(LocalPeer::new(s1.clone())), Duration::ZERO);
    let p2 = SlowPeer::new(Arc::new(LocalPeer::new(s2.clone())), Duration::ZERO);
    // The first source fails from the middle of the extent on.
    p1.fail_reads_from.store(MIB / 2, Ordering::SeqCst);
    let fake = Arc::new(FakeMeta::default());
    let w = RecoveryWorker::new(
        fake.clone(),
        target.clone(),
        ChunkId::from("3"),
        Arc::new(StaticPeers::new().with(p1.clone()).with(p2.clone())),
        RecoveryConfig {
            poll_interval: Duration::from_secs(3600),
            piece_size: 128 << 10,
            ..RecoveryConfig::default()
        },
    );
    let stop = CancellationToken::new();
    let h = w.spawn(stop.clone());
    // The first poll (at start) finds nothing; the task appears later and
    // only a kick can make the worker see it within the test's time.
    tokio::time::sleep(Duration::from_millis(100)).await;
    fake.tasks.lock().push(RecoveryTaskInfo {
        id: 1,
        extent: ext.clone(),
        epoch: 3,
        target: ChunkId::from("3"),
        sources: vec![ChunkId::from("1"), ChunkId::from("2")],
    });
    w.kick();
    let f = fake.clone();
    wait_until("the copy to complete", Duration::from_secs(20), || {
        let f = f.clone();
        async move { f.done.lock().contains_key(&1) }
    })
    .await;
    assert_eq!(fake.done.lock().get(&1), Some(&Ok(())));
    assert_eq!(target.read(&ext, 0, MIB).await.unwrap(), data);
    // Both sources were read: the first until it failed, the second after.
    assert!(p1.reads.load(Ordering::SeqCst) >= 4);
    assert!(p2.reads.load(Ordering::SeqCst) >= 4);
    // Each source was fenced to the learner epoch before its first read.
    assert_eq!(s1.extent_epoch(&ext).unwrap(), 3);
    assert_eq!(s2.extent_epoch(&ext).unwrap(), 3);
    assert_eq!(w.metrics().tasks_completed.load(Ordering::SeqCst), 1);
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), h)
        .await
        .expect("worker stops")
        .unwrap();
}

/// An access point whose cached view predates the learner keeps writing
/// to the old members only. The copy fences its source first, so such a
/// write is either on the source before the copy reads it or refused (and
/// retried on the new set, learner included): the learner misses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn access_point_with_an_old_view_cannot_slip_writes_past_the_copy() {
    let chunk = |i: usize| ChunkId(format!("c{i}"));
    let mut dirs = Vec::new();
    let mut stores = Vec::new();
    let mut fast = StaticPeers::new();
    let mut slow = StaticPeers::new();
    for i in 0..3 {
        let (d, s) = local_store(&format!("c{i}"));
        let p: Arc<dyn ReplicaPeer> = Arc::new(LocalPeer::new(s.clone()));
        fast.insert(p.clone());
        slow.insert(SlowPeer::new(p, Duration::from_millis(10)));
        dirs.push(d);
        stores.push(s);
    }
    let meta = Arc::new(InMemoryMembership::new(vec![chunk(0), chunk(1)], 2));
    let mut cfg = VolumeConfig::new("vol-s", MIB, ident());
    cfg.extent_size = MIB;
    cfg.logical_block_size = 4096;
    let v = VolumeDevice::new(cfg, meta.clone(), Arc::new(fast), None).unwrap();
    let ext = ExtentId::new("vol-s", 0);
    let initial: Vec<u8> = (0..MIB).map(|i| (i % 253) as u8).collect();
    v.write_bytes(0, &initial, false).await.unwrap();

    // Meta makes c2 a learner; the access point is not told (its cached
    // view stays at epoch 1 until a replica refuses it).
    let set = meta.add_learner(&ext, chunk(2)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let writer = tokio::spawn(write_load(
        v.clone(),
        Model {
            base: 0,
            data: initial.clone(),
        },
        5,
        stop.clone(),
        ops.clone(),
        50_000,
    ));
    // The load is under way before the copy starts (on a loaded host the
    // writer task may start late), so the two really overlap.
    let o = ops.clone();
    wait_until("the write load", Duration::from_secs(30), || {
        let o = o.clone();
        async move { o.load(Ordering::SeqCst) >= 10 }
    })
    .await;
    let before = ops.load(Ordering::SeqCst);
    let fake = fake_meta_copying_to_c2(&ext, set.epoch);
    let w = RecoveryWorker::new(
        fake.clone(),
        stores[2].clone(),
        chunk(2),
        Arc::new(slow),
        RecoveryConfig {
            poll_interval: Duration::from_millis(20),
            piece_size: 64 << 10,
            ..RecoveryConfig::default()
        },
    );
    let stop_worker = CancellationToken::new();
    let h = w.spawn(stop_worker.clone());
    let f = fake.clone();
    wait_until("the copy", Duration::from_secs(30), || {
        let f = f.clone();
        async move { f.done.lock().contains_key(&1) }
    })
    .await;
    assert_eq!(fake.done.lock().get(&1), Some(&Ok(())));
    meta.promote(&ext, &chunk(2)).unwrap();
    let during = ops.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, Ordering::SeqCst);
    let model = tokio::time::timeout(Duration::from_secs(30), writer)
        .await
        .expect("writer stops")
        .unwrap();
    assert!(
        during - before >= 5,
        "writes overlapped the copy: {}",
        during - before
    );
    assert!(v.metrics().stale_refreshes.load(Ordering::SeqCst) >= 1);
    for (i, s) in stores.iter().enumerate() {
        let got = s.read(&ext, 0, MIB).await.unwrap();
        let bad = got.iter().zip(&model.data).position(|(a, b)| a != b);
        assert!(bad.is_none(), "chunk c{i} differs at byte {bad:?}");
    }
    stop_worker.cancel();
    tokio::time::timeout(Duration::from_secs(10), h)
        .await
        .expect("worker stops")
        .unwrap();
}

/// How long the returning chunk's discard of its old copy is made to take
/// (as unlinking a large file on a busy disk did: 2.8 s in one run).
const SLOW_DISCARD: Duration = Duration::from_secs(3);
/// The bound on one 4 KiB write to the extent while the learner is set up:
/// well below the replica timeout of the volume (5 s here).
const PROMPT_WRITE: Duration = Duration::from_secs(1);

/// A chunk returns holding an old copy of an extent and becomes its
/// learner. Its recovery task first discards the old copy (made slow, see
/// [`SLOW_DISCARD`]); the access point meanwhile sends a write of the
/// extent to the learner too and waits for its answer. That write must
/// finish promptly: the discard is not on the write path. Afterwards the
/// copy completes and the learner holds exactly the members' data (the old
/// copy's data is gone, the write is there).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_discard_of_the_old_copy_does_not_stall_writes_to_the_learner() {
    let chunk = |i: usize| ChunkId(format!("c{i}"));
    let mut dirs = Vec::new();
    let mut stores = Vec::new();
    let mut peers = StaticPeers::new();
    for i in 0..3 {
        let (d, s) = local_store(&format!("c{i}"));
        peers.insert(Arc::new(LocalPeer::new(s.clone())));
        dirs.push(d);
        stores.push(s);
    }
    let peers = Arc::new(peers);
    let meta = Arc::new(InMemoryMembership::new(vec![chunk(0), chunk(1)], 2));
    let mut cfg = VolumeConfig::new("vol-d", MIB, ident());
    cfg.extent_size = MIB;
    cfg.logical_block_size = 4096;
    cfg.peer_timeout = Duration::from_secs(5);
    let v = VolumeDevice::new(cfg, meta.clone(), peers.clone(), None).unwrap();
    let ext = ExtentId::new("vol-d", 0);
    v.write_bytes(0, &vec![1u8; MIB as usize], false)
        .await
        .unwrap();
    assert_eq!(stores[0].extent_epoch(&ext).unwrap(), 1);

    // c2 still holds a copy from before it left: the whole extent, epoch 1.
    stores[2].create_extent(&ext, 1).await.unwrap();
    stores[2]
        .write(&ext, 1, 0, Bytes::from(vec![9u8; MIB as usize]), true)
        .await
        .unwrap();
    stores[2].set_delete_delay(SLOW_DISCARD);

    // Meta makes c2 a learner; the access point learns the new set (as it
    // does when meta's revision moves).
    let set = meta.add_learner(&ext, chunk(2)).unwrap();
    assert_eq!(set.epoch, 2);
    v.invalidate().await;

    // c2's worker takes the task: the setup discards the old copy.
    let fake = fake_meta_copying_to_c2(&ext, set.epoch);
    let w = RecoveryWorker::new(
        fake.clone(),
        stores[2].clone(),
        chunk(2),
        peers.clone(),
        RecoveryConfig {
            poll_interval: Duration::from_secs(60),
            piece_size: 256 << 10,
            ..RecoveryConfig::default()
        },
    );
    let stop = CancellationToken::new();
    assert_eq!(w.poll_once(&stop).await.unwrap(), 1);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let t = std::time::Instant::now();
    v.write_bytes(4096 * 3, &[2u8; 4096], false).await.unwrap();
    let took = t.elapsed();
    println!(
        "a write to the extent during the learner's setup took {took:?} \
         (discard of the old copy made to take {SLOW_DISCARD:?})"
    );
    assert!(
        took < PROMPT_WRITE,
        "a write during the learner's setup took {took:?} (bound {PROMPT_WRITE:?})"
    );
    assert_eq!(
        meta.removals(),
        0,
        "the learner was dropped instead of answering"
    );
    // The old copy was discarded and its slow unlink is still under way.
    assert!(
        stores[2].trash_pending() > 0,
        "the old copy was not discarded, or not slowly: the test proves nothing"
    );

    let f = fake.clone();
    wait_until("the copy", Duration::from_secs(30), || {
        let f = f.clone();
        async move { f.done.lock().contains_key(&1) }
    })
    .await;
    assert_eq!(fake.done.lock().get(&1), Some(&Ok(())));
    let want = stores[0].read(&ext, 0, MIB).await.unwrap();
    assert_eq!(&want[4096 * 3..4096 * 4], &[2u8; 4096][..]);
    for (i, s) in stores.iter().enumerate() {
        let got = s.read(&ext, 0, MIB).await.unwrap();
        let bad = got.iter().zip(want.iter()).position(|(a, b)| a != b);
        assert!(bad.is_none(), "chunk c{i} differs at byte {bad:?}");
    }
    // And the old copy's files go away in the background.
    let t = std::time::Instant::now();
    while stores[2].trash_pending() > 0 {
        assert!(
            t.elapsed() < SLOW_DISCARD + Duration::from_secs(10),
            "the trash was not emptied"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stores[2].trash_deleted(), 3);
}
