//! Copy-on-write end to end against a real in-process meta over gRPC:
//! `VolumeDevice`s on three real extent stores (RF=2), a small in-test
//! `Membership` adapter over the Meta gRPC API, and a chunk agent that
//! heartbeats, drops cached views (`VolumeDevice::invalidate`) when the
//! revision moves and reports it applied, so CreateSnapshot's barrier passes.
//!
//! The adapter shows the mapping the chunk binary's meta client uses:
//! `resolve` -> ResolveExtent, `copy_up` -> CopyUpExtent, `commit_copy_up`
//! -> CommitCopyUp, `ensure_extent` -> EnsureExtent (FAILED_PRECONDITION ->
//! `CopyUpRequired`), `current` -> GetExtents of the store key's owner.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ironblock_chunk::identity;
use ironblock_chunk::replica::{
    ChunkId, CopyUp, ExtentId, ExtentView, LocalPeer, Membership, MembershipError, ReplicaPeer,
    ReplicaSet, Resolved, StaticPeers,
};
use ironblock_chunk::store::{ExtentStore, StoreConfig};
use ironblock_chunk::volume::{VolumeConfig, VolumeDevice};
use ironblock_meta::{Config, MetaServer};
use ironblock_proto::v1 as pb;
use ironblock_proto::v1::meta_client::MetaClient;
use ironblock_target::scsi::DeviceIdentity;
use parking_lot::Mutex;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::Code;

mod common;
use common::pattern;

/// Meta's extent size.
const EXT: u64 = 64 << 20;

struct GrpcMembership {
    client: MetaClient<Channel>,
}

fn meta_err(s: tonic::Status) -> MembershipError {
    match s.code() {
        Code::FailedPrecondition => MembershipError::CopyUpRequired(s.message().to_string()),
        Code::Unavailable => MembershipError::Unavailable(s.message().to_string()),
        _ => MembershipError::Other(format!("{:?}: {}", s.code(), s.message())),
    }
}

fn view(e: pb::Extent) -> ExtentView {
    ExtentView {
        id: ExtentId::new(e.store_key, e.index),
        set: ReplicaSet {
            epoch: e.epoch,
            members: e
                .replicas
                .iter()
                .map(|c| ChunkId::new(c.to_string()))
                .collect(),
            learners: e
                .learners
                .iter()
                .map(|c| ChunkId::new(c.to_string()))
                .collect(),
        },
        generation: e.generation,
        pending: e.pending,
    }
}

#[async_trait]
impl Membership for GrpcMembership {
    async fn current(&self, extent: &ExtentId) -> Result<Option<ReplicaSet>, MembershipError> {
        let owner = extent
            .volume
            .split_once(".g")
            .map_or(extent.volume.as_str(), |(v, _)| v);
        let es = self
            .client
            .clone()
            .get_extents(pb::GetExtentsRequest {
                volume_id: owner.to_string(),
            })
            .await
            .map_err(meta_err)?
            .into_inner()
            .extents;
        Ok(es
            .into_iter()
            .find(|e| e.store_key == extent.volume && e.index == extent.index)
            .map(|e| view(e).set))
    }

    async fn remove_member(
        &self,
        extent: &ExtentId,
        _failed: &ChunkId,
        _seen_epoch: u64,
    ) -> Result<ReplicaSet, MembershipError> {
        Err(MembershipError::Other(format!(
            "no member removal in this test ({extent})"
        )))
    }

    async fn ensure_extent(&self, volume: &str, index: u64) -> Result<ReplicaSet, MembershipError> {
        let e = self
            .client
            .clone()
            .ensure_extent(pb::ExtentRequest {
                volume_id: volume.into(),
                index,
            })
            .await
            .map_err(meta_err)?
            .into_inner()
            .extent
            .ok_or_else(|| MembershipError::Other("no extent".into()))?;
        Ok(view(e).set)
    }

    async fn resolve(&self, volume: &str, index: u64) -> Result<Resolved, MembershipError> {
        let r = self
            .client
            .clone()
            .resolve_extent(pb::ExtentRequest {
                volume_id: volume.into(),
                index,
            })
            .await
            .map_err(meta_err)?
            .into_inner();
        Ok(Resolved {
            read: r.read.map(view),
            own: r.own.map(view),
        })
    }

    async fn copy_up(&self, volume: &str, index: u64) -> Result<CopyUp, MembershipError> {
        let r = self
            .client
            .clone()
            .copy_up_extent(pb::ExtentRequest {
                volume_id: volume.into(),
                index,
            })
            .await
            .map_err(meta_err)?
            .into_inner();
        Ok(CopyUp {
            source: r.source.map(view),
            destination: view(
                r.destination
                    .ok_or_else(|| MembershipError::Other("no destination".into()))?,
            ),
        })
    }

    async fn commit_copy_up(
        &self,
        volume: &str,
        index: u64,
        dst: &ExtentId,
    ) -> Result<ExtentView, MembershipError> {
        let e = self
            .client
            .clone()
            .commit_copy_up(pb::CommitCopyUpRequest {
                volume_id: volume.into(),
                index,
                store_key: dst.volume.clone(),
            })
            .await
            .map_err(meta_err)?
            .into_inner()
            .extent
            .ok_or_else(|| MembershipError::Other("no extent".into()))?;
        Ok(view(e))
    }
}

struct Rig {
    _dirs: Vec<tempfile::TempDir>,
    client: MetaClient<Channel>,
    membership: Arc<GrpcMembership>,
    peers: Arc<StaticPeers>,
    locals: Vec<Arc<LocalPeer>>,
    devices: Arc<Mutex<Vec<VolumeDevice>>>,
    agents: Vec<JoinHandle<()>>,
    stop: tokio::sync::oneshot::Sender<()>,
    meta: JoinHandle<()>,
}

/// One chunk's agent: heartbeat every 30 ms; when meta's revision moves,
/// invalidate every device, then report the revision applied. Bounded:
/// 60 s at most.
fn agent(
    mut c: MetaClient<Channel>,
    cluster_id: String,
    chunk_id: u64,
    devices: Arc<Mutex<Vec<VolumeDevice>>>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut applied = 0;
        for _ in 0..2000 {
            let Ok(r) = c
                .heartbeat(pb::HeartbeatRequest {
                    cluster_id: cluster_id.clone(),
                    chunk_id,
                    used_bytes: 0,
                    applied_revision: applied,
                    io: Vec::new(),
                })
                .await
            else {
                return;
            };
            let rev = r.into_inner().revision;
            if rev > applied {
                let devs: Vec<VolumeDevice> = devices.lock().clone();
                for d in devs {
                    d.invalidate().await;
                }
                applied = rev;
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    })
}

async fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let config = Config::new("127.0.0.1:0".parse().unwrap(), dir.path().to_path_buf());
    let server = match MetaServer::bind(config).await {
        Ok(s) => s,
        Err(e) => panic!("bind meta: {e}"),
    };
    let addr = server.local_addr().unwrap();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let meta = tokio::spawn(async move {
        server
            .run(async {
                let _ = rx.await;
            })
            .await
            .expect("meta run");
    });
    let mut client = tokio::time::timeout(
        Duration::from_secs(5),
        MetaClient::connect(format!("http://{addr}")),
    )
    .await
    .unwrap()
    .unwrap();
    let devices = Arc::new(Mutex::new(Vec::new()));
    let mut dirs = vec![dir];
    let mut directory = StaticPeers::new();
    let mut locals = Vec::new();
    let mut agents = Vec::new();
    for n in 1..=3u8 {
        let r = client
            .register_chunk(pb::RegisterChunkRequest {
                portal: format!("127.0.0.{n}:3260"),
                data_addr: format!("127.0.0.{n}:7100"),
                capacity_bytes: 100 << 30,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let d = tempfile::tempdir().unwrap();
        identity::init(d.path(), &r.cluster_id, &r.chunk_id.to_string(), false).unwrap();
        let s = ExtentStore::open(d.path(), StoreConfig::default()).unwrap();
        assert_eq!(s.extent_size(), EXT);
        let p = Arc::new(LocalPeer::new(s));
        directory.insert(p.clone());
        locals.push(p);
        dirs.push(d);
        agents.push(agent(
            client.clone(),
            r.cluster_id.clone(),
            r.chunk_id,
            devices.clone(),
        ));
    }
    Rig {
        _dirs: dirs,
        membership: Arc::new(GrpcMembership {
            client: client.clone(),
        }),
        client,
        peers: Arc::new(directory),
        locals,
        devices,
        agents,
        stop,
        meta,
    }
}

impl Rig {
    async fn volume(&mut self, name: &str, size: u64) -> pb::Volume {
        self.client
            .create_volume(pb::CreateVolumeRequest {
                name: name.into(),
                size_bytes: size,
                replicas: 2,
                thin: true,
            })
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
    }

    fn device(&self, v: &pb::Volume) -> VolumeDevice {
        let mut cfg = VolumeConfig::new(
            v.id.clone(),
            v.size_bytes,
            DeviceIdentity {
                serial: v.vpd_serial.clone(),
                naa: [0x60, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
            },
        );
        cfg.peer_timeout = Duration::from_secs(10);
        let d = VolumeDevice::new(cfg, self.membership.clone(), self.peers.clone(), None).unwrap();
        self.devices.lock().push(d.clone());
        d
    }

    async fn snapshot(&mut self, v: &pb::Volume, name: &str) -> pb::Snapshot {
        tokio::time::timeout(
            Duration::from_secs(20),
            self.client.create_snapshot(pb::CreateSnapshotRequest {
                volume_id: v.id.clone(),
                name: name.into(),
            }),
        )
        .await
        .expect("snapshot barrier stuck")
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap()
    }

    async fn clone_of(&mut self, s: &pb::Snapshot, name: &str) -> pb::Volume {
        self.client
            .clone_volume(pb::CloneVolumeRequest {
                snapshot_id: s.id.clone(),
                name: name.into(),
                size_bytes: 4 * EXT,
                thin: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
    }

    async fn extents(&mut self, v: &pb::Volume) -> Vec<(u64, u64, bool)> {
        self.client
            .get_extents(pb::GetExtentsRequest {
                volume_id: v.id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .extents
            .iter()
            .map(|e| (e.index, e.generation, e.pending))
            .collect()
    }

    async fn stop(self) {
        for a in self.agents {
            a.abort();
        }
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(20), self.meta)
            .await
            .expect("meta did not stop")
            .unwrap();
    }
}

async fn read(v: &VolumeDevice, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    v.read_bytes(offset, &mut buf).await.unwrap();
    buf
}

/// The regions the test writes: (offset, len).
const REGIONS: [(u64, usize); 3] = [(0, 65536), (EXT + 40960, 65536), (2 * EXT - 8192, 16384)];

async fn regions(v: &VolumeDevice) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (o, l) in REGIONS {
        out.push(read(v, o, l).await);
    }
    out
}

#[tokio::test]
async fn snapshot_clone_and_copy_up_through_meta() {
    let mut rig = rig().await;
    let v = rig.volume("vol", 3 * EXT).await;
    let vol = rig.device(&v);
    let a: Vec<Vec<u8>> = REGIONS
        .iter()
        .enumerate()
        .map(|(i, (_, l))| pattern(i as u64 + 1, *l))
        .collect();
    for ((o, _), data) in REGIONS.iter().zip(&a) {
        vol.write_bytes(*o, data, false).await.unwrap();
    }
    assert_eq!(regions(&vol).await, a);
    // Thin: only the written extents were placed (the last region spans
    // extents 1 and 2).
    assert_eq!(
        rig.extents(&v).await,
        vec![(0, 0, false), (1, 0, false), (2, 0, false)]
    );

    let s = rig.snapshot(&v, "s1").await;
    assert_eq!(s.generation, 0);
    // Overwrite part of region 0 with B (512-byte aligned, partial blocks).
    let b = pattern(10, 32768 - 1024);
    vol.write_bytes(1024, &b, false).await.unwrap();
    let mut expect_vol = a.clone();
    expect_vol[0][1024..1024 + b.len()].copy_from_slice(&b);
    assert_eq!(regions(&vol).await, expect_vol);
    assert_eq!(
        vol.metrics()
            .copy_ups
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(
        rig.extents(&v).await,
        vec![(0, 0, false), (0, 1, false), (1, 0, false), (2, 0, false)]
    );

    let c = rig.clone_of(&s, "cln").await;
    let cln = rig.device(&c);
    assert_eq!(regions(&cln).await, a, "the clone reads the snapshot");
    // Writes to the clone: two copy-ups from the parent, and a fresh
    // placement beyond the snapshot (the clone is bigger).
    cln.write_bytes(4096, &[0xcc; 8192], true).await.unwrap();
    cln.write_bytes(2 * EXT + 65536, &[0xcd; 4096], false)
        .await
        .unwrap();
    cln.write_bytes(3 * EXT + 4096, &[0xce; 4096], false)
        .await
        .unwrap();
    let mut expect_cln = a.clone();
    expect_cln[0][4096..4096 + 8192].fill(0xcc);
    assert_eq!(regions(&cln).await, expect_cln);
    assert_eq!(read(&cln, 2 * EXT + 65536, 4096).await, vec![0xcd; 4096]);
    assert_eq!(read(&cln, 3 * EXT + 4096, 4096).await, vec![0xce; 4096]);
    assert_eq!(read(&cln, 3 * EXT, 4096).await, vec![0; 4096]);
    assert_eq!(
        rig.extents(&c).await,
        vec![(0, 0, false), (2, 0, false), (3, 0, false)]
    );
    assert_eq!(
        cln.metrics()
            .copy_ups
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    // The volume and the snapshot are unchanged.
    assert_eq!(regions(&vol).await, expect_vol);
    assert_eq!(read(&vol, 2 * EXT + 65536, 4096).await, vec![0; 4096]);
    let c2 = rig.clone_of(&s, "cln2").await;
    let cln2 = rig.device(&c2);
    assert_eq!(regions(&cln2).await, a, "the snapshot changed");

    // Deleting: the snapshot is held by its clones; after they go, its
    // generation-0 copy of extent 0 is dropped (extent 1 is still read).
    let del = pb::DeleteSnapshotRequest {
        snapshot_id: s.id.clone(),
    };
    assert_eq!(
        rig.client
            .delete_snapshot(del.clone())
            .await
            .unwrap_err()
            .code(),
        Code::FailedPrecondition
    );
    for name in ["cln", "cln2"] {
        rig.client
            .delete_volume(pb::VolumeRef {
                r#ref: Some(pb::volume_ref::Ref::Name(name.into())),
            })
            .await
            .unwrap();
    }
    rig.client.delete_snapshot(del).await.unwrap();
    assert_eq!(
        rig.extents(&v).await,
        vec![(0, 1, false), (1, 0, false), (2, 0, false)]
    );
    vol.invalidate().await;
    assert_eq!(regions(&vol).await, expect_vol);
    rig.stop().await;
}

#[tokio::test]
async fn crash_between_copy_up_and_commit_through_meta() {
    let mut rig = rig().await;
    let v = rig.volume("vol", EXT).await;
    let vol = rig.device(&v);
    let a = pattern(5, 131072);
    vol.write_bytes(0, &a, true).await.unwrap();
    rig.snapshot(&v, "s").await;
    // A writer starts the copy-up, copies on one member, and dies.
    let cu = rig.membership.copy_up(&v.id, 0).await.unwrap();
    let (src, dst) = (cu.source.clone().unwrap(), cu.destination.clone());
    assert!(dst.pending);
    assert_eq!(dst.set.members, src.set.members);
    let first = rig
        .locals
        .iter()
        .find(|p| *p.chunk() == dst.set.members[0])
        .unwrap();
    first
        .copy_extent(&src.id, &dst.id, dst.set.epoch)
        .await
        .unwrap();
    assert_eq!(rig.membership.copy_up(&v.id, 0).await.unwrap(), cu);
    // Reads keep resolving to the source; the next write resumes and commits.
    let fresh = rig.device(&v);
    assert_eq!(read(&fresh, 0, a.len()).await, a);
    fresh
        .write_bytes(65536, &[0xee; 4096], false)
        .await
        .unwrap();
    let r = rig.membership.resolve(&v.id, 0).await.unwrap();
    let own = r.own.unwrap();
    assert_eq!(own.id, dst.id);
    assert!(!own.pending);
    let mut expect = a.clone();
    expect[65536..65536 + 4096].fill(0xee);
    assert_eq!(read(&fresh, 0, a.len()).await, expect);
    for p in &rig.locals {
        if own.set.contains(p.chunk()) {
            let got = p
                .read(&own.id, own.set.epoch, 0, a.len() as u64)
                .await
                .unwrap();
            assert_eq!(got[..], expect[..], "member {}", p.chunk());
        }
    }
    rig.stop().await;
}
