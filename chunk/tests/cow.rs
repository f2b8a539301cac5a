//! Copy-on-write snapshots and clones with real data: extent stores in temp
//! directories (RF=2 over three chunks), `VolumeDevice`s on top, and
//! `InMemoryMembership` modelling meta's generations and clone parents.
//! (`cow_meta.rs` runs the same flow against a real in-process meta.)

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use ironblock_chunk::identity;
use ironblock_chunk::replica::{
    store_key, ChunkId, ExtentId, InMemoryMembership, LocalPeer, Membership, PeerError,
    ReplicaPeer, StaticPeers,
};
use ironblock_chunk::rpc::{serve_replica, RemotePeer, RemotePeerConfig};
use ironblock_chunk::store::{ExtentStore, StoreConfig, StoreError};
use ironblock_chunk::volume::{VolumeConfig, VolumeDevice};
use ironblock_target::scsi::{BlockDevice, DeviceIdentity};
use tokio_util::sync::CancellationToken;

mod common;
use common::{flip_byte, pattern, read_all};

const EXT: u64 = 1 << 20;
const VOL: &str = "vol";

fn store(dir: &std::path::Path, chunk: &str) -> ExtentStore {
    identity::init(dir, "test", chunk, false).unwrap();
    ExtentStore::open(
        dir,
        StoreConfig {
            extent_size: EXT,
            ..StoreConfig::default()
        },
    )
    .unwrap()
}

/// A peer that can hold writes back (to observe `invalidate`).
struct SlowPeer {
    inner: Arc<dyn ReplicaPeer>,
    delay_writes: AtomicBool,
    copies: AtomicU64,
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
        if self.delay_writes.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(300)).await;
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
        self.inner.read(extent, epoch, offset, len).await
    }
    async fn flush(&self, extent: &ExtentId) -> Result<(), PeerError> {
        self.inner.flush(extent).await
    }
    async fn unmap(
        &self,
        extent: &ExtentId,
        epoch: u64,
        offset: u64,
        len: u64,
    ) -> Result<(), PeerError> {
        self.inner.unmap(extent, epoch, offset, len).await
    }
    async fn repair(&self, extent: &ExtentId, block: u64, good: Bytes) -> Result<(), PeerError> {
        self.inner.repair(extent, block, good).await
    }
    async fn fence(&self, extent: &ExtentId, epoch: u64) -> Result<(), PeerError> {
        self.inner.fence(extent, epoch).await
    }
    async fn copy_extent(
        &self,
        src: &ExtentId,
        dst: &ExtentId,
        epoch: u64,
    ) -> Result<(), PeerError> {
        self.copies.fetch_add(1, Ordering::SeqCst);
        self.inner.copy_extent(src, dst, epoch).await
    }
}

struct Cluster {
    _dirs: Vec<tempfile::TempDir>,
    stores: Vec<ExtentStore>,
    peers: Vec<Arc<SlowPeer>>,
    meta: Arc<InMemoryMembership>,
    directory: Arc<StaticPeers>,
}

fn cluster() -> Cluster {
    let mut dirs = Vec::new();
    let mut stores = Vec::new();
    let mut peers = Vec::new();
    let mut directory = StaticPeers::new();
    for i in 0..3 {
        let d = tempfile::tempdir().unwrap();
        let s = store(d.path(), &format!("c{i}"));
        let p = Arc::new(SlowPeer {
            inner: Arc::new(LocalPeer::new(s.clone())),
            delay_writes: AtomicBool::new(false),
            copies: AtomicU64::new(0),
        });
        directory.insert(p.clone());
        dirs.push(d);
        stores.push(s);
        peers.push(p);
    }
    Cluster {
        _dirs: dirs,
        stores,
        peers,
        meta: Arc::new(InMemoryMembership::new(
            (0..3).map(|i| ChunkId::new(format!("c{i}"))).collect(),
            2,
        )),
        directory: Arc::new(directory),
    }
}

impl Cluster {
    fn device(&self, volume: &str, size: u64) -> VolumeDevice {
        let mut cfg = VolumeConfig::new(
            volume,
            size,
            DeviceIdentity {
                serial: volume.into(),
                naa: [0x60, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
            },
        );
        cfg.extent_size = EXT;
        cfg.peer_timeout = Duration::from_secs(5);
        VolumeDevice::new(cfg, self.meta.clone(), self.directory.clone(), None).unwrap()
    }

    fn copies(&self) -> u64 {
        self.peers
            .iter()
            .map(|p| p.copies.load(Ordering::SeqCst))
            .sum()
    }
}

async fn write(v: &VolumeDevice, offset: u64, data: &[u8]) {
    v.write_bytes(offset, data, false).await.unwrap();
}

async fn read(v: &VolumeDevice, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    v.read_bytes(offset, &mut buf).await.unwrap();
    buf
}

#[tokio::test]
async fn store_copy_is_sparse_verified_fenced_and_idempotent() {
    let d = tempfile::tempdir().unwrap();
    let s = store(d.path(), "c0");
    let src = ExtentId::new("v", 0);
    let dst = ExtentId::new("v.g1", 0);
    s.create_extent(&src, 3).await.unwrap();
    let a = pattern(1, 8192);
    let b = pattern(2, 4096);
    s.write(&src, 3, 0, Bytes::from(a.clone()), false)
        .await
        .unwrap();
    s.write(&src, 3, 512 * 1024, Bytes::from(b.clone()), false)
        .await
        .unwrap();
    let used_before = s.used_bytes().await.unwrap();
    s.copy_extent(&src, &dst, 1).await.unwrap();
    let whole = s.read(&dst, 0, EXT).await.unwrap();
    assert_eq!(whole, s.read(&src, 0, EXT).await.unwrap());
    assert_eq!(&whole[..8192], &a[..]);
    assert_eq!(&whole[512 * 1024..512 * 1024 + 4096], &b[..]);
    assert_eq!(s.extent_epoch(&dst).unwrap(), 1);
    // Sparse: only about the written blocks were allocated.
    let grown = s.used_bytes().await.unwrap() - used_before;
    assert!(grown <= 64 * 1024, "copy allocated {grown} bytes");

    // Idempotent, and it overwrites whatever the destination held.
    s.write(&dst, 1, 256 * 1024, Bytes::from(pattern(3, 4096)), false)
        .await
        .unwrap();
    s.copy_extent(&src, &dst, 1).await.unwrap();
    assert_eq!(s.read(&dst, 0, EXT).await.unwrap(), whole);

    // A destination at a newer epoch (committed and written) is fenced.
    s.set_epoch(&dst, 2).await.unwrap();
    assert!(matches!(
        s.copy_extent(&src, &dst, 1).await,
        Err(StoreError::StaleEpoch { have: 2, got: 1 })
    ));

    // A missing source copies as zeros.
    let z = ExtentId::new("w.g1", 0);
    s.copy_extent(&ExtentId::new("w", 0), &z, 1).await.unwrap();
    assert!(s.read(&z, 0, EXT).await.unwrap().iter().all(|b| *b == 0));

    // A bad source block aborts the copy with the source's block.
    flip_byte(
        &d.path().join("extents").join(format!("v.{:016x}.data", 0)),
        512 * 1024 + 17,
    );
    let bad = ExtentId::new("v.g2", 0);
    match s.copy_extent(&src, &bad, 1).await {
        Err(StoreError::Checksum { extent, block }) => {
            assert_eq!((extent, block), (src.clone(), 128));
        }
        other => panic!("expected a checksum error, got {other:?}"),
    }
    // Copying onto itself is refused.
    assert!(s.copy_extent(&src, &src, 5).await.is_err());
}

#[tokio::test]
async fn copy_extent_over_grpc() {
    let d = tempfile::tempdir().unwrap();
    let s = store(d.path(), "c0");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let server = tokio::spawn(serve_replica(
        listener,
        Arc::new(LocalPeer::new(s.clone())),
        stop.clone(),
    ));
    let remote = RemotePeer::new(
        ChunkId::new("c0"),
        &format!("http://{addr}"),
        RemotePeerConfig::default(),
    )
    .unwrap();
    let src = ExtentId::new("v", 1);
    let dst = ExtentId::new("v.g1", 1);
    let a = pattern(9, 16384);
    remote
        .write(&src, 1, 4096, Bytes::from(a.clone()), true)
        .await
        .unwrap();
    remote.copy_extent(&src, &dst, 1).await.unwrap();
    assert_eq!(
        remote.read(&dst, 1, 4096, 16384).await.unwrap(),
        Bytes::from(a)
    );
    // Errors keep their meaning across the wire.
    remote.fence(&dst, 4).await.unwrap();
    assert_eq!(
        remote.copy_extent(&src, &dst, 1).await,
        Err(PeerError::StaleEpoch { have: 4, got: 1 })
    );
    assert!(matches!(
        remote.copy_extent(&src, &src, 1).await,
        Err(PeerError::Other(_))
    ));
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn snapshot_and_clone_keep_their_data() {
    let c = cluster();
    let size = 3 * EXT;
    let vol = c.device(VOL, size);
    let a = pattern(1, size as usize);
    write(&vol, 0, &a).await;
    assert_eq!(read(&vol, 0, size as usize).await, a);

    // Snapshot: freeze generation 0; the device drops its views.
    let snap = c.meta.snapshot(VOL);
    assert_eq!(snap, 0);
    vol.invalidate().await;

    // Overwrite extents 0 and 1 (partly, with 512-byte pieces) with B.
    let b = pattern(2, (EXT + EXT / 2) as usize);
    write(&vol, 0, &b).await;
    write(&vol, EXT + EXT / 2 + 512, &[0xbb; 512]).await;
    let mut expect_vol = a.clone();
    expect_vol[..b.len()].copy_from_slice(&b);
    let at = (EXT + EXT / 2 + 512) as usize;
    expect_vol[at..at + 512].fill(0xbb);
    assert_eq!(read(&vol, 0, size as usize).await, expect_vol);
    assert_eq!(vol.metrics().copy_ups.load(Ordering::Relaxed), 2);
    // Each copy-up ran on both members of the source, locally.
    assert_eq!(c.copies(), 4);
    for i in 0..2 {
        let g0 = c.meta.get(&ExtentId::new(VOL, i)).unwrap();
        let g1 = c.meta.get(&ExtentId::new(store_key(VOL, 1), i)).unwrap();
        assert_eq!(g0.members, g1.members);
        assert!(!c.meta.is_pending(&ExtentId::new(store_key(VOL, 1), i)));
    }
    // Extent 2 was not written after the snapshot: still generation 0.
    assert!(c.meta.get(&ExtentId::new(store_key(VOL, 1), 2)).is_none());

    // A clone of the snapshot reads A.
    c.meta.clone_volume("cln", VOL, snap, 3);
    let cln = c.device("cln", size);
    assert_eq!(read(&cln, 0, size as usize).await, a);

    // Writes to the clone leave the volume and the snapshot alone.
    let w = pattern(3, 8192);
    write(&cln, EXT - 4096, &w).await;
    write(&cln, 2 * EXT + 1024, &[0xcc; 1024]).await;
    let mut expect_cln = a.clone();
    let at = (EXT - 4096) as usize;
    expect_cln[at..at + 8192].copy_from_slice(&w);
    let at = (2 * EXT + 1024) as usize;
    expect_cln[at..at + 1024].fill(0xcc);
    assert_eq!(read(&cln, 0, size as usize).await, expect_cln);
    assert_eq!(read(&vol, 0, size as usize).await, expect_vol);
    c.meta.clone_volume("cln2", VOL, snap, 3);
    let cln2 = c.device("cln2", size);
    assert_eq!(read(&cln2, 0, size as usize).await, a, "snapshot changed");

    // A second snapshot and more writes: the first clone still sees A.
    let snap2 = c.meta.snapshot(VOL);
    assert_eq!(snap2, 1);
    vol.invalidate().await;
    write(&vol, 0, &[0xdd; 4096]).await;
    expect_vol[..4096].fill(0xdd);
    assert_eq!(read(&vol, 0, size as usize).await, expect_vol);
    assert_eq!(read(&cln2, 0, size as usize).await, a);
    // The untouched extent 2 of the volume is still read from generation 0.
    assert_eq!(
        read(&vol, 2 * EXT, EXT as usize).await,
        a[2 * EXT as usize..]
    );
    // Every store holds what meta lists and nothing half-copied.
    for s in &c.stores {
        for info in s.extent_info() {
            assert!(
                c.meta.get(&info.id).is_some(),
                "{} not listed by meta",
                info.id
            );
        }
    }
}

#[tokio::test]
async fn a_crash_between_copy_up_and_commit_loses_nothing() {
    let c = cluster();
    let size = 2 * EXT;
    let vol = c.device(VOL, size);
    let a = pattern(7, size as usize);
    write(&vol, 0, &a).await;
    c.meta.snapshot(VOL);
    vol.invalidate().await;

    // A writer starts a copy-up of extent 1, copies on one member only, and
    // dies before committing.
    let cu = c.meta.copy_up(VOL, 1).await.unwrap();
    let src = cu.source.clone().unwrap();
    let dst = cu.destination.clone();
    assert!(dst.pending);
    let first = c.peers.iter().find(|p| *p.chunk() == dst.set.members[0]);
    first
        .unwrap()
        .copy_extent(&src.id, &dst.id, dst.set.epoch)
        .await
        .unwrap();
    // Repeating the copy-up returns the same pending destination.
    assert_eq!(c.meta.copy_up(VOL, 1).await.unwrap(), cu);

    // A fresh access point still reads the snapshot data everywhere.
    let fresh = c.device(VOL, size);
    assert_eq!(read(&fresh, 0, size as usize).await, a);
    // Its first write resumes the same copy-up and commits it.
    write(&fresh, EXT + 8192, &[0xee; 4096]).await;
    assert!(!c.meta.is_pending(&dst.id));
    let own = c.meta.resolve(VOL, 1).await.unwrap().own.unwrap();
    assert_eq!(own.id, dst.id);
    assert_eq!(own.set.epoch, dst.set.epoch + 1);
    let mut expect = a.clone();
    let at = (EXT + 8192) as usize;
    expect[at..at + 4096].fill(0xee);
    assert_eq!(read(&fresh, 0, size as usize).await, expect);
    // Both members hold the full copy plus the write.
    for p in &c.peers {
        if own.set.contains(p.chunk()) {
            let got = p.read(&own.id, own.set.epoch, 0, EXT).await.unwrap();
            assert_eq!(got[..], expect[EXT as usize..]);
        }
    }
    // The crashed writer's late copy at the old epoch is fenced off.
    assert_eq!(
        first
            .unwrap()
            .copy_extent(&src.id, &dst.id, dst.set.epoch)
            .await,
        Err(PeerError::StaleEpoch {
            have: own.set.epoch,
            got: dst.set.epoch
        })
    );
}

#[tokio::test]
async fn concurrent_writers_share_one_copy_up() {
    let c = cluster();
    let vol = c.device(VOL, EXT);
    let a = pattern(11, EXT as usize);
    write(&vol, 0, &a).await;
    c.meta.snapshot(VOL);
    vol.invalidate().await;
    let mut expect = a.clone();
    let mut tasks = Vec::new();
    for i in 0..8u64 {
        let v = vol.clone();
        let off = i * 64 * 1024 + 512;
        expect[off as usize..off as usize + 1024].fill(i as u8 + 1);
        tasks.push(tokio::spawn(async move {
            v.write_bytes(off, &[i as u8 + 1; 1024], false).await
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(20), t)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
    assert_eq!(vol.metrics().copy_ups.load(Ordering::Relaxed), 1);
    assert_eq!(c.copies(), 2);
    assert_eq!(read_all(&vol, 0, EXT as usize).await, expect);
    vol.flush_all().await.unwrap();
    BlockDevice::flush(&vol).await.unwrap();
}

#[tokio::test]
async fn invalidate_waits_for_in_flight_writes() {
    let c = cluster();
    let vol = c.device(VOL, EXT);
    write(&vol, 0, &[1; 4096]).await;
    for p in &c.peers {
        p.delay_writes.store(true, Ordering::SeqCst);
    }
    let done = Arc::new(AtomicBool::new(false));
    let w = {
        let (v, done) = (vol.clone(), done.clone());
        tokio::spawn(async move {
            v.write_bytes(4096, &[2; 4096], false).await.unwrap();
            done.store(true, Ordering::SeqCst);
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!done.load(Ordering::SeqCst));
    tokio::time::timeout(Duration::from_secs(10), vol.invalidate())
        .await
        .unwrap();
    assert!(
        done.load(Ordering::SeqCst),
        "invalidate returned before the write that used the old view"
    );
    w.await.unwrap();
    for p in &c.peers {
        p.delay_writes.store(false, Ordering::SeqCst);
    }
    assert_eq!(vol.metrics().invalidations.load(Ordering::Relaxed), 1);
    // Views are refetched transparently.
    let got = read(&vol, 0, 8192).await;
    assert!(got[..4096].iter().all(|b| *b == 1));
    assert!(got[4096..].iter().all(|b| *b == 2));
}
