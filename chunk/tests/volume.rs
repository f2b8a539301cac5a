//! The replicated volume data path, in process: three extent stores in temp
//! directories, each behind a `LocalPeer`, wrapped in fault-injecting peers,
//! with `InMemoryMembership` standing in for meta.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use ironblock_chunk::health::PeerHealth;
use ironblock_chunk::identity;
use ironblock_chunk::replica::{
    ChunkId, ExtentId, InMemoryMembership, LocalPeer, Membership, PeerError, ReplicaPeer,
    ReplicaSet, StaticPeers,
};
use ironblock_chunk::store::{ExtentStore, StoreConfig, StoreError};
use ironblock_chunk::volume::{VolumeConfig, VolumeDevice};
use ironblock_target::scsi::{
    status, BlockDevice, DeviceError, DeviceIdentity, LogicalUnit, LuConfig, LunTable, Nexus,
    ScsiCommand, TaskAttr,
};
use rand::{Rng, SeedableRng};

mod common;
use common::{flip_byte, pattern, read_all};

const EXT: u64 = 1 << 20;
const VOL: &str = "vol-1";

/// Fault injection around a real peer.
struct FaultyPeer {
    inner: Arc<dyn ReplicaPeer>,
    /// Fail this many next calls with Unreachable.
    fail_next: AtomicU32,
    /// Fail every call with Unreachable.
    dead: AtomicBool,
    /// Fail every write with NoSpace.
    full: AtomicBool,
    /// Answer this many next calls with StaleEpoch.
    stale_next: AtomicU32,
    /// Sleep this long before every call.
    delay_ms: AtomicU64,
    /// Frozen (SIGSTOP, a cut link): calls and pings never answer.
    frozen: AtomicBool,
    pings: AtomicU64,
    health: PeerHealth,
    writes: AtomicU64,
    reads: AtomicU64,
    flushes: AtomicU64,
}

impl FaultyPeer {
    fn new(inner: Arc<dyn ReplicaPeer>) -> Arc<Self> {
        Arc::new(FaultyPeer {
            inner,
            fail_next: AtomicU32::new(0),
            dead: AtomicBool::new(false),
            full: AtomicBool::new(false),
            stale_next: AtomicU32::new(0),
            delay_ms: AtomicU64::new(0),
            frozen: AtomicBool::new(false),
            pings: AtomicU64::new(0),
            health: PeerHealth::default(),
            writes: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
        })
    }

    async fn gate(&self) -> Result<(), PeerError> {
        if self.frozen.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        let d = self.delay_ms.load(Ordering::SeqCst);
        if d > 0 {
            tokio::time::sleep(Duration::from_millis(d)).await;
        }
        if self.dead.load(Ordering::SeqCst) {
            return Err(PeerError::Unreachable("injected: dead".into()));
        }
        if self
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(PeerError::Unreachable("injected: fail next".into()));
        }
        if self
            .stale_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(PeerError::StaleEpoch {
                have: u64::MAX,
                got: 0,
            });
        }
        Ok(())
    }
}

#[async_trait]
impl ReplicaPeer for FaultyPeer {
    fn chunk(&self) -> &ChunkId {
        self.inner.chunk()
    }
    async fn ping(&self) -> Result<(), PeerError> {
        self.pings.fetch_add(1, Ordering::SeqCst);
        if self.frozen.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if self.dead.load(Ordering::SeqCst) {
            return Err(PeerError::Unreachable("injected: dead".into()));
        }
        Ok(())
    }
    fn health(&self) -> Option<&PeerHealth> {
        Some(&self.health)
    }
    async fn write(
        &self,
        extent: &ExtentId,
        epoch: u64,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> Result<(), PeerError> {
        self.gate().await?;
        if self.full.load(Ordering::SeqCst) {
            return Err(PeerError::NoSpace);
        }
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.write(extent, epoch, offset, data, fua).await
    }
    async fn read(
        &self,
        extent: &ExtentId,
        epoch: u64,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, PeerError> {
        self.gate().await?;
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.read(extent, epoch, offset, len).await
    }
    async fn flush(&self, extent: &ExtentId) -> Result<(), PeerError> {
        self.gate().await?;
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
        self.gate().await?;
        self.inner.unmap(extent, epoch, offset, len).await
    }
    async fn repair(&self, extent: &ExtentId, block: u64, good: Bytes) -> Result<(), PeerError> {
        self.gate().await?;
        self.inner.repair(extent, block, good).await
    }
    async fn fence(&self, extent: &ExtentId, epoch: u64) -> Result<(), PeerError> {
        self.gate().await?;
        self.inner.fence(extent, epoch).await
    }
}

struct Cluster {
    _dirs: Vec<tempfile::TempDir>,
    paths: Vec<PathBuf>,
    stores: Vec<ExtentStore>,
    peers: Vec<Arc<FaultyPeer>>,
    meta: Arc<InMemoryMembership>,
    directory: Arc<StaticPeers>,
}

fn chunk(i: usize) -> ChunkId {
    ChunkId::new(format!("c{i}"))
}

fn cluster(n: usize, rf: usize) -> Cluster {
    let mut dirs = Vec::new();
    let mut paths = Vec::new();
    let mut stores = Vec::new();
    let mut peers = Vec::new();
    let mut directory = StaticPeers::new();
    for i in 0..n {
        let d = tempfile::tempdir().unwrap();
        identity::init(d.path(), "test", &format!("c{i}"), false).unwrap();
        let s = ExtentStore::open(
            d.path(),
            StoreConfig {
                extent_size: EXT,
                ..StoreConfig::default()
            },
        )
        .unwrap();
        let p = FaultyPeer::new(Arc::new(LocalPeer::new(s.clone())));
        directory.insert(p.clone());
        paths.push(d.path().to_path_buf());
        dirs.push(d);
        stores.push(s);
        peers.push(p);
    }
    Cluster {
        _dirs: dirs,
        paths,
        stores,
        peers,
        meta: Arc::new(InMemoryMembership::new((0..n).map(chunk).collect(), rf)),
        directory: Arc::new(directory),
    }
}

fn ident() -> DeviceIdentity {
    DeviceIdentity {
        serial: "vol-1".into(),
        naa: [0x60, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
    }
}

impl Cluster {
    /// A volume device; `local`: index of the chunk it runs on (None: an
    /// access point that holds no replica).
    fn volume_with(&self, size: u64, bs: u32, local: Option<usize>) -> VolumeDevice {
        let mut cfg = VolumeConfig::new(VOL, size, ident());
        cfg.logical_block_size = bs;
        cfg.extent_size = EXT;
        cfg.peer_timeout = Duration::from_millis(500);
        VolumeDevice::new(
            cfg,
            self.meta.clone(),
            self.directory.clone(),
            local.map(|i| self.peers[i].clone() as Arc<dyn ReplicaPeer>),
        )
        .unwrap()
    }

    fn volume(&self) -> VolumeDevice {
        self.volume_with(8 * EXT, 512, None)
    }

    fn data_file(&self, i: usize, index: u64) -> PathBuf {
        self.paths[i]
            .join("extents")
            .join(format!("{VOL}.{index:016x}.data"))
    }

    /// Read a whole extent straight from chunk `i`'s store.
    async fn raw(&self, i: usize, index: u64) -> Bytes {
        self.stores[i]
            .read(&ExtentId::new(VOL, index), 0, EXT)
            .await
            .unwrap()
    }
}

#[tokio::test]
async fn rf3_write_then_every_member_holds_identical_data() {
    let c = cluster(3, 3);
    let v = c.volume();
    // Crosses the boundary between extent 0 and 1, starts unaligned (512).
    let start = EXT - 3 * 4096 - 512;
    let data = pattern(1, 40 * 1024);
    v.write(start / 512, &data, false).await.unwrap();
    // A small unaligned write inside one 4 KiB block.
    v.write(7, &[0xab; 512], true).await.unwrap();
    assert_eq!(read_all(&v, start / 512, data.len()).await, data);
    assert_eq!(read_all(&v, 7, 512).await, vec![0xab; 512]);
    assert_eq!(read_all(&v, 6, 512).await, vec![0; 512]);
    for index in [0, 1] {
        let a = c.raw(0, index).await;
        assert_eq!(a, c.raw(1, index).await, "extent {index} c0 vs c1");
        assert_eq!(a, c.raw(2, index).await, "extent {index} c0 vs c2");
    }
    let e0 = c.raw(0, 0).await;
    assert_eq!(&e0[start as usize..], &data[..(EXT - start) as usize]);
    assert_eq!(&e0[7 * 512..8 * 512], &[0xab; 512][..]);
    let e1 = c.raw(0, 1).await;
    assert_eq!(
        &e1[..data.len() - (EXT - start) as usize],
        &data[(EXT - start) as usize..]
    );
    // Never-written extents were not allocated.
    let sets = c.meta.all();
    assert_eq!(sets.len(), 2);
    assert!(sets
        .iter()
        .all(|(_, s)| s.epoch == 1 && s.members.len() == 3));
}

#[tokio::test]
async fn thin_reads_do_not_allocate() {
    let c = cluster(3, 3);
    let v = c.volume();
    assert_eq!(read_all(&v, 0, 64 * 1024).await, vec![0; 64 * 1024]);
    assert!(c.meta.all().is_empty());
    assert!(c.stores.iter().all(|s| s.list_extents().is_empty()));
    assert_eq!(v.lba_status(0).await.unwrap(), (false, 8 * EXT / 512));
}

#[tokio::test]
async fn failed_member_is_removed_before_ack_and_fenced() {
    let c = cluster(3, 3);
    let v = c.volume();
    // A second access point with a view cached at epoch 1.
    let old = c.volume();
    old.write(0, &[1; 4096], false).await.unwrap();
    let ext0 = ExtentId::new(VOL, 0);
    assert_eq!(c.meta.get(&ext0).unwrap().epoch, 1);

    c.peers[2].fail_next.store(1, Ordering::SeqCst);
    let data = pattern(2, 8192);
    v.write(8, &data, true).await.unwrap();
    // Removed (epoch bumped) before the ack.
    let set = c.meta.get(&ext0).unwrap();
    assert_eq!(
        set,
        ReplicaSet {
            epoch: 2,
            members: vec![chunk(0), chunk(1)],
            learners: Vec::new(),
        }
    );
    assert_eq!(c.meta.removals(), 1);
    assert_eq!(v.metrics().member_removals.load(Ordering::SeqCst), 1);
    // Every remaining member has the acknowledged data, at the new epoch.
    for i in [0, 1] {
        let raw = c.raw(i, 0).await;
        assert_eq!(&raw[4096..4096 + 8192], &data[..]);
        assert_eq!(c.stores[i].extent_epoch(&ext0).unwrap(), 2);
        // Fencing: the survivors refuse the old epoch.
        let e = c.stores[i]
            .write(&ext0, 1, 0, Bytes::from(vec![9u8; 4096]), false)
            .await
            .unwrap_err();
        assert!(
            matches!(e, StoreError::StaleEpoch { have: 2, got: 1 }),
            "{e}"
        );
    }
    // The removed member is fenced too, once it is reachable again.
    let mut fenced = false;
    for _ in 0..100 {
        if c.stores[2].extent_epoch(&ext0).unwrap() >= 2 {
            fenced = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(fenced, "removed member was not fenced");
    let e = c.stores[2]
        .write(&ext0, 1, 0, Bytes::from(vec![9u8; 4096]), false)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::StaleEpoch { .. }), "{e}");
    // It does not have the write acknowledged without it.
    assert_ne!(&c.raw(2, 0).await[4096..4096 + 8192], &data[..]);

    // The old access point is refused by the survivors, refreshes its view
    // and writes to the new set only (the fenced removed member refuses the
    // first, stale attempt, and is not asked again).
    let writes_c2 = c.peers[2].writes.load(Ordering::SeqCst);
    old.write(0, &[7; 4096], false).await.unwrap();
    assert!(old.metrics().stale_refreshes.load(Ordering::SeqCst) >= 1);
    assert!(c.peers[2].writes.load(Ordering::SeqCst) <= writes_c2 + 1);
    assert_eq!(&c.raw(2, 0).await[..4096], &[1; 4096][..]);
    for i in [0, 1] {
        assert_eq!(&c.raw(i, 0).await[..4096], &[7; 4096][..]);
    }
    assert_eq!(read_all(&v, 0, 4096).await, vec![7; 4096]);
    assert_eq!(read_all(&v, 8, 8192).await, data);
}

#[tokio::test]
async fn stale_epoch_from_a_peer_refreshes_the_view() {
    let c = cluster(3, 3);
    let v = c.volume();
    v.write(0, &[1; 4096], false).await.unwrap();
    let ext0 = ExtentId::new(VOL, 0);
    // Meta moved the set on (e.g. recovery) without telling us; the replicas
    // learnt the new epoch.
    let newer = ReplicaSet {
        epoch: 5,
        members: vec![chunk(0), chunk(1), chunk(2)],
        learners: Vec::new(),
    };
    c.meta.set(ext0.clone(), newer);
    for s in &c.stores {
        s.set_epoch(&ext0, 5).await.unwrap();
    }
    v.write(0, &[2; 4096], true).await.unwrap();
    assert!(v.metrics().stale_refreshes.load(Ordering::SeqCst) >= 1);
    assert_eq!(c.meta.removals(), 0);
    for i in 0..3 {
        assert_eq!(&c.raw(i, 0).await[..4096], &[2; 4096][..]);
    }
    // An injected StaleEpoch (the peer claims a newer epoch) also refreshes
    // and the retry completes.
    c.peers[1].stale_next.store(1, Ordering::SeqCst);
    v.write(0, &[3; 4096], false).await.unwrap();
    assert_eq!(read_all(&v, 0, 4096).await, vec![3; 4096]);
    for i in 0..3 {
        assert_eq!(&c.raw(i, 0).await[..4096], &[3; 4096][..]);
    }
    // A peer that keeps claiming a newer epoch never gets an ack.
    c.peers[1].stale_next.store(1000, Ordering::SeqCst);
    let e = v.write(0, &[4; 4096], false).await.unwrap_err();
    assert!(matches!(e, DeviceError::Unavailable(_)), "{e}");
}

#[tokio::test]
async fn checksum_failure_is_served_from_another_member_and_repaired() {
    let c = cluster(3, 3);
    // Runs on c0, so reads go to c0 first.
    let v = c.volume_with(8 * EXT, 512, Some(0));
    let data = pattern(3, 64 * 1024);
    v.write(0, &data, true).await.unwrap();
    let ext0 = ExtentId::new(VOL, 0);
    // Corrupt two blocks of c0's copy.
    flip_byte(&c.data_file(0, 0), 5 * 4096 + 17);
    flip_byte(&c.data_file(0, 0), 11 * 4096 + 4000);
    assert!(matches!(
        c.stores[0].read(&ext0, 0, 64 * 1024).await,
        Err(StoreError::Checksum { block: 5, .. })
    ));
    let reads_c1 = c.peers[1].reads.load(Ordering::SeqCst);
    assert_eq!(read_all(&v, 0, data.len()).await, data);
    assert!(c.peers[1].reads.load(Ordering::SeqCst) > reads_c1);
    assert_eq!(v.metrics().checksum_failovers.load(Ordering::SeqCst), 1);
    assert_eq!(v.metrics().repairs.load(Ordering::SeqCst), 2);
    // c0's copy is good again and equal to the others.
    assert_eq!(
        &c.stores[0].read(&ext0, 0, 64 * 1024).await.unwrap()[..],
        &data[..]
    );
    assert_eq!(c.raw(0, 0).await, c.raw(1, 0).await);
    // Corruption under a partial (512-byte) write's read-modify-write is
    // repaired too, and the merge uses good data.
    flip_byte(&c.data_file(0, 0), 2 * 4096 + 100);
    v.write(2 * 8 + 1, &[0xee; 512], false).await.unwrap();
    let mut want = data.clone();
    want[2 * 4096 + 512..2 * 4096 + 1024].fill(0xee);
    assert_eq!(read_all(&v, 0, want.len()).await, want);
    for i in 0..3 {
        assert_eq!(&c.raw(i, 0).await[..want.len()], &want[..], "member {i}");
    }
}

#[tokio::test]
async fn every_copy_bad_is_a_medium_error_never_bad_data() {
    let c = cluster(3, 3);
    let v = c.volume();
    v.write(0, &pattern(4, 8192), true).await.unwrap();
    for i in 0..3 {
        flip_byte(&c.data_file(i, 0), 4096 + 9);
    }
    let mut buf = vec![0u8; 8192];
    let e = BlockDevice::read(&v, 0, &mut buf).await.unwrap_err();
    assert!(matches!(e, DeviceError::Read(_)), "{e}");
    // The good block next to it still reads.
    assert_eq!(
        read_all(&v, 0, 4096).await,
        pattern(4, 8192)[..4096].to_vec()
    );
}

#[tokio::test]
async fn all_members_unreachable_is_unavailable_never_an_ack() {
    let c = cluster(3, 3);
    let v = c.volume();
    v.write(0, &[5; 4096], true).await.unwrap();
    for p in &c.peers {
        p.dead.store(true, Ordering::SeqCst);
    }
    let e = v.write(0, &[6; 4096], true).await.unwrap_err();
    assert!(matches!(e, DeviceError::Unavailable(_)), "{e}");
    // A new extent cannot be written either.
    let e = v.write(3 * EXT / 512, &[6; 4096], true).await.unwrap_err();
    assert!(matches!(e, DeviceError::Unavailable(_)), "{e}");
    let mut buf = vec![0u8; 4096];
    let e = BlockDevice::read(&v, 0, &mut buf).await.unwrap_err();
    assert!(matches!(e, DeviceError::Unavailable(_)), "{e}");
    let e = v.flush().await;
    assert!(e.is_ok(), "nothing unflushed: {e:?}");
    // Membership was not shrunk to nothing.
    assert_eq!(c.meta.removals(), 0);
    assert_eq!(c.meta.get(&ExtentId::new(VOL, 0)).unwrap().members.len(), 3);
    for p in &c.peers {
        p.dead.store(false, Ordering::SeqCst);
    }
    assert_eq!(read_all(&v, 0, 4096).await, vec![5; 4096]);
}

#[tokio::test]
async fn no_space_everywhere_is_no_space() {
    let c = cluster(2, 2);
    let v = c.volume();
    for p in &c.peers {
        p.full.store(true, Ordering::SeqCst);
    }
    let e = v.write(0, &[1; 4096], false).await.unwrap_err();
    assert!(matches!(e, DeviceError::NoSpace), "{e}");
    assert_eq!(c.meta.removals(), 0);
    // One member full, the other fine: the full one is removed.
    c.peers[0].full.store(false, Ordering::SeqCst);
    v.write(0, &[1; 4096], false).await.unwrap();
    assert_eq!(
        c.meta.get(&ExtentId::new(VOL, 0)).unwrap().members,
        vec![chunk(0)]
    );
}

#[tokio::test]
async fn slow_member_times_out_and_is_removed() {
    let c = cluster(3, 3);
    let v = c.volume();
    c.peers[1].delay_ms.store(2000, Ordering::SeqCst);
    let t = std::time::Instant::now();
    v.write(0, &[8; 4096], true).await.unwrap();
    assert!(t.elapsed() < Duration::from_millis(1900));
    assert_eq!(
        c.meta.get(&ExtentId::new(VOL, 0)).unwrap().members,
        vec![chunk(0), chunk(2)]
    );
    c.peers[1].delay_ms.store(0, Ordering::SeqCst);
}

#[tokio::test]
async fn flush_and_fua_reach_every_member() {
    let c = cluster(3, 3);
    let v = c.volume();
    v.write(0, &[1; 4096], false).await.unwrap();
    v.write(EXT / 512, &[1; 4096], false).await.unwrap();
    v.flush().await.unwrap();
    for p in &c.peers {
        assert_eq!(p.flushes.load(Ordering::SeqCst), 2);
    }
    // Nothing new written: the next flush has nothing to do.
    v.flush().await.unwrap();
    for p in &c.peers {
        assert_eq!(p.flushes.load(Ordering::SeqCst), 2);
    }
    // A member failing the flush is removed; the flush succeeds on the rest.
    v.write(0, &[2; 4096], false).await.unwrap();
    c.peers[0].fail_next.store(1, Ordering::SeqCst);
    v.flush().await.unwrap();
    assert_eq!(
        c.meta.get(&ExtentId::new(VOL, 0)).unwrap().members,
        vec![chunk(1), chunk(2)]
    );
}

#[tokio::test]
async fn concurrent_partial_writes_to_one_block_all_land() {
    let c = cluster(3, 2);
    let v = Arc::new(c.volume());
    // Eight 512-byte sectors of one 4 KiB block, written concurrently: each
    // is a read-modify-write of the same physical block.
    let mut tasks = Vec::new();
    for s in 0..8u64 {
        let v = v.clone();
        tasks.push(tokio::spawn(async move {
            v.write(16 + s, &[s as u8 + 1; 512], false).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let got = read_all(&v, 16, 4096).await;
    for s in 0..8usize {
        assert_eq!(&got[s * 512..(s + 1) * 512], &[s as u8 + 1; 512][..]);
    }
    let set = c.meta.get(&ExtentId::new(VOL, 0)).unwrap();
    let i0: usize = set.members[0].as_str()[1..].parse().unwrap();
    let i1: usize = set.members[1].as_str()[1..].parse().unwrap();
    assert_eq!(c.raw(i0, 0).await, c.raw(i1, 0).await);
}

#[tokio::test]
async fn unmap_and_lba_status() {
    let c = cluster(3, 3);
    let v = c.volume();
    let data = pattern(5, 64 * 1024);
    v.write(0, &data, false).await.unwrap();
    // Unaligned at both ends: [512*3, 512*3 + 40 KiB).
    BlockDevice::unmap(&v, 3, 80).await.unwrap();
    let mut want = data.clone();
    want[3 * 512..3 * 512 + 80 * 512].fill(0);
    assert_eq!(read_all(&v, 0, want.len()).await, want);
    for i in 0..3 {
        assert_eq!(&c.raw(i, 0).await[..want.len()], &want[..]);
    }
    // Unmapping never-written space allocates nothing.
    BlockDevice::unmap(&v, 4 * EXT / 512, 100).await.unwrap();
    assert_eq!(c.meta.all().len(), 1);
    let per_ext = EXT / 512;
    assert_eq!(v.lba_status(0).await.unwrap(), (true, per_ext));
    assert_eq!(v.lba_status(10).await.unwrap(), (true, per_ext - 10));
    assert_eq!(v.lba_status(per_ext).await.unwrap(), (false, 7 * per_ext));
    v.write(5 * per_ext, &[1; 512], false).await.unwrap();
    assert_eq!(
        v.lba_status(per_ext + 1).await.unwrap(),
        (false, 4 * per_ext - 1)
    );
    assert!(v.lba_status(8 * per_ext).await.is_err());
}

#[tokio::test]
async fn grow_online_and_range_checks() {
    let c = cluster(1, 1);
    let v = c.volume_with(EXT, 4096, Some(0));
    assert_eq!(v.num_blocks(), EXT / 4096);
    let mut buf = vec![0u8; 4096];
    assert!(BlockDevice::read(&v, EXT / 4096, &mut buf).await.is_err());
    assert!(v.write(EXT / 4096, &buf, false).await.is_err());
    v.grow(3 * EXT).unwrap();
    assert_eq!(v.num_blocks(), 3 * EXT / 4096);
    v.write(EXT / 4096, &[3; 4096], false).await.unwrap();
    assert_eq!(read_all(&v, EXT / 4096, 4096).await, vec![3; 4096]);
    assert!(v.grow(EXT).is_err());
    assert!(v.grow(3 * EXT + 512).is_err());
}

/// Seeded random workload on RF=2 over three chunks: random 512-aligned
/// offsets and lengths, some concurrent, reads checked against a model;
/// one chunk dies in the middle. Every acknowledged write must read back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_workload_with_a_member_killed() {
    let seed: u64 = std::env::var("IRONBLOCK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x1b10c);
    let c = cluster(3, 2);
    let size = 4 * EXT;
    let v = Arc::new(c.volume_with(size, 512, Some(1)));
    let mut model = vec![0u8; size as usize];
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let rounds = 60;
    for round in 0..rounds {
        if round == rounds / 2 {
            c.peers[2].dead.store(true, Ordering::SeqCst);
        }
        // A batch of concurrent writes to disjoint ranges (the model does
        // not order overlapping in-flight writes).
        let mut batch: Vec<(u64, Vec<u8>)> = Vec::new();
        for _ in 0..rng.gen_range(1..5) {
            let sectors = rng.gen_range(1..=96u64);
            let lba = rng.gen_range(0..size / 512 - sectors);
            if batch
                .iter()
                .any(|(l, d)| lba < l + d.len() as u64 / 512 && *l < lba + sectors)
            {
                continue;
            }
            let data = pattern(rng.gen(), (sectors * 512) as usize);
            batch.push((lba, data));
        }
        let fua = rng.gen_bool(0.2);
        let tasks: Vec<_> = batch
            .iter()
            .cloned()
            .map(|(lba, data)| {
                let v = v.clone();
                tokio::spawn(async move { v.write(lba, &data, fua).await })
            })
            .collect();
        for ((lba, data), t) in batch.iter().zip(tasks) {
            t.await
                .unwrap()
                .unwrap_or_else(|e| panic!("seed {seed} round {round}: write failed: {e}"));
            let at = (*lba * 512) as usize;
            model[at..at + data.len()].copy_from_slice(data);
        }
        if rng.gen_bool(0.3) {
            v.flush().await.unwrap();
        }
        // Random read check.
        let sectors = rng.gen_range(1..=256u64);
        let lba = rng.gen_range(0..size / 512 - sectors);
        let got = read_all(&v, lba, (sectors * 512) as usize).await;
        let at = (lba * 512) as usize;
        assert!(
            got == model[at..at + got.len()],
            "seed {seed} round {round}: read at lba {lba} differs from the model"
        );
    }
    // Everything reads back through the volume ...
    assert!(
        read_all(&v, 0, size as usize).await == model,
        "seed {seed}: final read differs"
    );
    // ... and every member of every current set holds exactly the model.
    let stores: HashMap<ChunkId, &ExtentStore> = (0..3).map(|i| (chunk(i), &c.stores[i])).collect();
    for (ext, set) in c.meta.all() {
        let at = (ext.index * EXT) as usize;
        for m in &set.members {
            if *m == chunk(2) {
                continue; // dead; still listed only for extents not written since
            }
            let raw = stores[m].read(&ext, 0, EXT).await.unwrap();
            assert!(
                raw[..] == model[at..at + EXT as usize],
                "seed {seed}: extent {ext} on {m} differs from the model"
            );
        }
    }
    // The dead chunk was removed from every extent written after it died.
    assert!(c.meta.removals() >= 1, "seed {seed}: nobody was removed");
}

fn scsi_cmd(cdb: &[u8], data: &[u8], expected_in: u32) -> ScsiCommand {
    let mut c = cdb.to_vec();
    c.resize(16, 0);
    ScsiCommand {
        cdb: Bytes::from(c),
        lun: 0,
        nexus: Arc::new(Nexus {
            initiator_name: Arc::from("iqn.2024-01.test:init"),
            isid: [0x80, 0, 0, 0, 0, 1],
            target_name: Arc::from("iqn.2024-01.io.ironblock:t1"),
            tpgt: 1,
        }),
        attr: TaskAttr::Simple,
        expected_data_in: expected_in,
        data_out: Bytes::copy_from_slice(data),
        write_protected: false,
    }
}

fn rw16(op: u8, lba: u64, blocks: u32) -> Vec<u8> {
    let mut c = vec![0u8; 16];
    c[0] = op;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

#[tokio::test]
async fn scsi_engine_over_the_replicated_volume() {
    let c = cluster(3, 3);
    let dev = Arc::new(c.volume_with(8 * EXT, 512, Some(0)));
    let lu = Arc::new(LogicalUnit::new(dev.clone(), LuConfig::default()));
    let mut table = LunTable::new();
    table.insert(0, lu);
    // Clear the power-on unit attention.
    for _ in 0..4 {
        let r = table.execute(&scsi_cmd(&[0x00], &[], 0), &|_| true).await;
        if r.status == status::GOOD {
            break;
        }
    }
    // WRITE(16) crossing an extent boundary, unaligned to 4 KiB.
    let lba = EXT / 512 - 9;
    let blocks = 40u32;
    let data = pattern(6, blocks as usize * 512);
    let r = table
        .execute(&scsi_cmd(&rw16(0x8a, lba, blocks), &data, 0), &|_| true)
        .await;
    assert_eq!(r.status, status::GOOD, "write sense {:02x?}", r.sense);
    // SYNCHRONIZE CACHE(10).
    let r = table.execute(&scsi_cmd(&[0x35], &[], 0), &|_| true).await;
    assert_eq!(r.status, status::GOOD, "sync sense {:02x?}", r.sense);
    assert!(c
        .peers
        .iter()
        .all(|p| p.flushes.load(Ordering::SeqCst) >= 2));
    // READ(16).
    let r = table
        .execute(
            &scsi_cmd(&rw16(0x88, lba, blocks), &[], blocks * 512),
            &|_| true,
        )
        .await;
    assert_eq!(r.status, status::GOOD, "read sense {:02x?}", r.sense);
    assert_eq!(&r.data_in[..], &data[..]);
    // Same bytes on every member, straight from their stores.
    let split = (EXT - lba * 512) as usize;
    for i in 0..3 {
        assert_eq!(&c.raw(i, 0).await[(lba * 512) as usize..], &data[..split]);
        assert_eq!(&c.raw(i, 1).await[..data.len() - split], &data[split..]);
    }
    // READ CAPACITY(16) sees the size, and growth.
    let mut rc = vec![0u8; 16];
    rc[0] = 0x9e;
    rc[1] = 0x10;
    rc[13] = 32;
    let r = table.execute(&scsi_cmd(&rc, &[], 32), &|_| true).await;
    assert_eq!(r.status, status::GOOD);
    assert_eq!(
        u64::from_be_bytes(r.data_in[..8].try_into().unwrap()),
        8 * EXT / 512 - 1
    );
    dev.grow(16 * EXT).unwrap();
    let mut grew = false;
    for _ in 0..3 {
        let r = table.execute(&scsi_cmd(&rc, &[], 32), &|_| true).await;
        if r.status == status::GOOD {
            assert_eq!(
                u64::from_be_bytes(r.data_in[..8].try_into().unwrap()),
                16 * EXT / 512 - 1
            );
            grew = true;
            break;
        }
    }
    assert!(grew);
}

#[tokio::test]
async fn membership_remove_member_semantics() {
    let m = InMemoryMembership::new(vec![chunk(0), chunk(1), chunk(2)], 2);
    let s = m.ensure_extent("v", 1).await.unwrap();
    assert_eq!(s.members, vec![chunk(1), chunk(2)]);
    assert_eq!(m.ensure_extent("v", 1).await.unwrap(), s);
    let ext = ExtentId::new("v", 1);
    let s2 = m.remove_member(&ext, &chunk(1), 1).await.unwrap();
    assert_eq!(s2.epoch, 2);
    assert_eq!(s2.members, vec![chunk(2)]);
    // Epoch already moved: unchanged, the newer set comes back.
    let s3 = m.remove_member(&ext, &chunk(2), 1).await.unwrap();
    assert_eq!(s3, s2);
    assert!(m.current(&ExtentId::new("v", 9)).await.unwrap().is_none());
}

/// A volume device whose replica calls time out only after `peer_timeout`.
fn patient_volume(c: &Cluster, peer_timeout: Duration) -> VolumeDevice {
    let mut cfg = VolumeConfig::new(VOL, 8 * EXT, ident());
    cfg.extent_size = EXT;
    cfg.peer_timeout = peer_timeout;
    VolumeDevice::new(cfg, c.meta.clone(), c.directory.clone(), None).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_meta_moves_out_is_not_waited_for() {
    let c = cluster(3, 3);
    let v = patient_volume(&c, Duration::from_secs(30));
    v.write(0, &[1; 4096], false).await.unwrap();
    let ext0 = ExtentId::new(VOL, 0);
    assert_eq!(c.meta.get(&ext0).unwrap().epoch, 1);

    // Chunk 2 freezes: its calls hang (far past the test's bounds).
    c.peers[2].delay_ms.store(60_000, Ordering::SeqCst);
    let t = std::time::Instant::now();
    let w = {
        let v = v.clone();
        tokio::spawn(async move { v.write(8, &[2; 4096], true).await })
    };
    // Meta declares it dead a little later: out of the set, epoch + 1.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!w.is_finished(), "the write waited for the frozen member");
    c.meta
        .set(ext0.clone(), ReplicaSet::new(2, vec![chunk(0), chunk(1)]));
    tokio::time::timeout(Duration::from_secs(5), w)
        .await
        .expect("the write completes on the new set, long before the peer timeout")
        .unwrap()
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(v.metrics().abandoned_calls.load(Ordering::SeqCst), 1);
    // Nothing was removed by the access point itself: meta did it.
    assert_eq!(c.meta.removals(), 0);
    // Acknowledged under epoch 2: every member of that set has the write,
    // fenced to epoch 2.
    for i in [0, 1] {
        assert_eq!(&c.raw(i, 0).await[4096..8192], &[2; 4096][..]);
        assert_eq!(c.stores[i].extent_epoch(&ext0).unwrap(), 2);
    }

    // A read waiting on a member meta moves out goes to the newer set.
    c.peers[0].delay_ms.store(60_000, Ordering::SeqCst);
    let t = std::time::Instant::now();
    let r = {
        let v = v.clone();
        tokio::spawn(async move { read_all(&v, 8, 4096).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!r.is_finished(), "the read waited for the frozen member");
    c.meta.set(ext0.clone(), ReplicaSet::new(3, vec![chunk(1)]));
    let got = tokio::time::timeout(Duration::from_secs(5), r)
        .await
        .expect("the read is served by the newer set")
        .unwrap();
    assert_eq!(got, vec![2; 4096]);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(v.metrics().abandoned_calls.load(Ordering::SeqCst), 2);
}

/// A member that answers nothing (frozen, cut off) is probed, found hung,
/// removed through meta, and the write acknowledged on the rest: long before
/// the peer timeout (60 s here), and before meta would declare it dead
/// (never, here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_member_is_dropped_after_a_probe_and_the_write_acked_on_the_rest() {
    let c = cluster(3, 3);
    let v = patient_volume(&c, Duration::from_secs(60));
    v.write(0, &[1; 4096], false).await.unwrap();
    v.write(EXT / 512, &[1; 4096], false).await.unwrap();
    let ext0 = ExtentId::new(VOL, 0);
    let ext1 = ExtentId::new(VOL, 1);
    c.peers[2].frozen.store(true, Ordering::SeqCst);
    let w = {
        let v = v.clone();
        tokio::spawn(async move { v.write(8, &[2; 4096], true).await })
    };
    tokio::time::timeout(Duration::from_secs(30), w)
        .await
        .expect("the write completes without the hung member, well inside the peer timeout")
        .unwrap()
        .unwrap();
    assert!(
        c.peers[2].pings.load(Ordering::SeqCst) >= 1,
        "the member was probed"
    );
    assert!(v.metrics().hung_calls.load(Ordering::SeqCst) >= 1);
    assert_eq!(c.peers[2].health.hung_verdicts(), 1);
    let s0 = c.meta.get(&ext0).unwrap();
    assert_eq!(s0.members, vec![chunk(0), chunk(1)]);
    assert_eq!(s0.epoch, 2);
    for i in [0, 1] {
        assert_eq!(&c.raw(i, 0).await[4096..8192], &[2; 4096][..]);
        assert_eq!(c.stores[i].extent_epoch(&ext0).unwrap(), 2);
    }
    // The other extent's write drops it too (the verdict is reused while it
    // is fresh, or the peer is probed again: either way not waited for).
    tokio::time::timeout(
        Duration::from_secs(30),
        v.write(EXT / 512 + 8, &[3; 4096], true),
    )
    .await
    .expect("the second extent's write completes without the hung member")
    .unwrap();
    let mut m1 = c.meta.get(&ext1).unwrap().members;
    m1.sort();
    assert_eq!(m1, vec![chunk(0), chunk(1)]);
    assert_eq!(c.meta.removals(), 2);
    assert_eq!(v.metrics().member_removals.load(Ordering::SeqCst), 2);
}

/// A member slower than the longest suspicion (1 s) that answers its
/// probes is waited for and stays in the set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_member_that_answers_probes_stays() {
    let c = cluster(3, 3);
    let v = patient_volume(&c, Duration::from_secs(60));
    v.write(0, &[1; 4096], false).await.unwrap();
    let ext0 = ExtentId::new(VOL, 0);
    c.peers[2].delay_ms.store(2500, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(30), v.write(8, &[4; 4096], true))
        .await
        .expect("the write completes once the slow member answers")
        .unwrap();
    assert!(
        c.peers[2].pings.load(Ordering::SeqCst) >= 1,
        "the slow member was probed"
    );
    assert!(v.metrics().slow_calls.load(Ordering::SeqCst) >= 1);
    assert_eq!(v.metrics().hung_calls.load(Ordering::SeqCst), 0);
    assert_eq!(c.meta.removals(), 0);
    assert_eq!(
        c.meta.get(&ext0).unwrap().members,
        vec![chunk(0), chunk(1), chunk(2)]
    );
    assert_eq!(&c.raw(2, 0).await[4096..8192], &[4; 4096][..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_member_still_in_the_set_is_waited_for() {
    let c = cluster(3, 3);
    let v = patient_volume(&c, Duration::from_secs(30));
    v.write(0, &[1; 4096], false).await.unwrap();
    let ext0 = ExtentId::new(VOL, 0);

    // Chunk 2 is slow, not gone: meta's set moves (epoch + 1) but keeps it.
    c.peers[2].delay_ms.store(1500, Ordering::SeqCst);
    let w = {
        let v = v.clone();
        tokio::spawn(async move { v.write(8, &[3; 4096], true).await })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    c.meta.set(
        ext0.clone(),
        ReplicaSet::new(2, vec![chunk(0), chunk(1), chunk(2)]),
    );
    tokio::time::timeout(Duration::from_secs(20), w)
        .await
        .expect("the write completes once the slow member answers")
        .unwrap()
        .unwrap();
    assert_eq!(v.metrics().abandoned_calls.load(Ordering::SeqCst), 0);
    assert_eq!(c.meta.removals(), 0);
    assert_eq!(
        c.meta.get(&ext0).unwrap().members,
        vec![chunk(0), chunk(1), chunk(2)]
    );
    // The slow member has the acknowledged write like the others.
    for i in [0, 1, 2] {
        assert_eq!(&c.raw(i, 0).await[4096..8192], &[3; 4096][..]);
    }
    c.peers[2].delay_ms.store(0, Ordering::SeqCst);
}

#[tokio::test]
async fn a_member_failing_right_after_a_learner_was_promoted_does_not_fail_the_write() {
    let c = cluster(3, 2);
    let ext0 = ExtentId::new(VOL, 0);
    // Extent 0 on c0 + c1; c1 is lost, c2 becomes a learner (epoch 3) and
    // the access point caches that view with its first write.
    c.meta.ensure_extent(VOL, 0).await.unwrap();
    c.meta.remove_member(&ext0, &chunk(1), 1).await.unwrap();
    assert_eq!(c.meta.add_learner(&ext0, chunk(2)).unwrap().epoch, 3);
    let v = c.volume();
    v.write(0, &[1; 4096], false).await.unwrap();
    // The learner's copy completes: meta promotes it (epoch 4); the access
    // point has not heard of it.
    assert_eq!(c.meta.promote(&ext0, &chunk(2)).unwrap().epoch, 4);
    // Now the old member fails a write the promoted learner took. Under
    // meta's current set a member has it, so the failed one is removed
    // and the write acknowledged, not failed.
    c.peers[0].fail_next.store(1, Ordering::SeqCst);
    v.write(8, &[2; 4096], true).await.unwrap();
    let set = c.meta.get(&ext0).unwrap();
    assert_eq!(set.members, vec![chunk(2)], "{set:?}");
    assert_eq!(&c.raw(2, 0).await[4096..8192], &[2; 4096][..]);
    assert_eq!(c.stores[2].extent_epoch(&ext0).unwrap(), set.epoch);
    assert_eq!(read_all(&v, 8, 4096).await, vec![2; 4096]);
}

/// The race of an online garbage collection: meta drops chunk 0 from the
/// set (a lowered replication factor, a move) and chunk 0 collects its copy
/// while access points still hold the old view. A missing extent reads as
/// zeros (thin), so without the tombstone the old view would read zeros
/// from chunk 0 (local-first for the access point on chunk 0, first member
/// for the one that holds no replica). Retired at meta's epoch, the copy
/// answers StaleEpoch: both refresh and read the data from chunk 1, and a
/// write through an old view does not re-create the copy on chunk 0.
#[tokio::test]
async fn a_read_through_an_old_view_of_a_collected_copy_refreshes_not_zeros() {
    let c = cluster(2, 2);
    let on0 = c.volume_with(8 * EXT, 512, Some(0));
    let remote = c.volume_with(8 * EXT, 512, None);
    let writer = c.volume_with(8 * EXT, 512, None);
    let data = pattern(7, 8192);
    on0.write(16, &data, true).await.unwrap();
    // Every access point caches the two-member view at epoch 1.
    for v in [&on0, &remote, &writer] {
        assert_eq!(read_all(v, 16, data.len()).await, data);
    }
    let ext0 = ExtentId::new(VOL, 0);
    assert_eq!(c.meta.get(&ext0).unwrap().members, vec![chunk(0), chunk(1)]);

    // Meta drops chunk 0 (epoch 2); chunk 0's GC retires its copy.
    c.meta.set(ext0.clone(), ReplicaSet::new(2, vec![chunk(1)]));
    let stamp = c.stores[0]
        .change_stamps()
        .into_iter()
        .find(|(id, _)| *id == ext0)
        .unwrap()
        .1;
    assert!(c.stores[0]
        .retire_extent_if_unchanged(&ext0, stamp, 2)
        .await
        .unwrap());
    assert!(c.stores[0].list_extents().is_empty());
    assert!(!c.data_file(0, 0).exists());
    // The raw peer says so.
    let e = c.peers[0].read(&ext0, 1, 0, 4096).await.unwrap_err();
    assert_eq!(e, PeerError::StaleEpoch { have: 2, got: 1 });

    // Old views: the data, from chunk 1, after a refresh.
    for (v, who) in [
        (&on0, "chunk 0's access point"),
        (&remote, "a remote access point"),
    ] {
        let before = v.metrics().stale_refreshes.load(Ordering::SeqCst);
        assert_eq!(read_all(v, 16, data.len()).await, data, "{who}");
        assert!(
            v.metrics().stale_refreshes.load(Ordering::SeqCst) > before,
            "{who} refreshed its view"
        );
    }
    // A write through an old view lands on chunk 1 only.
    let fresh = pattern(8, 4096);
    writer.write(64, &fresh, true).await.unwrap();
    assert!(
        c.stores[0].list_extents().is_empty(),
        "a stale write re-created the collected copy"
    );
    assert_eq!(read_all(&remote, 64, fresh.len()).await, fresh);
    assert_eq!(read_all(&on0, 16, data.len()).await, data);

    // Placed on chunk 0 again (a newer epoch): writes create it there.
    c.meta
        .set(ext0.clone(), ReplicaSet::new(3, vec![chunk(1), chunk(0)]));
    let again = pattern(9, 4096);
    let fresh_view = c.volume_with(8 * EXT, 512, None);
    fresh_view.write(128, &again, true).await.unwrap();
    assert_eq!(c.stores[0].extent_epoch(&ext0).unwrap(), 3);
    assert_eq!(c.stores[0].retired_epoch(&ext0), None);
    assert_eq!(&c.raw(0, 0).await[128 * 512..128 * 512 + 4096], &again[..]);
}
