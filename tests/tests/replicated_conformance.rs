//! libiscsi's `iscsi-test-cu -t ALL` against a LUN served by the chunk's
//! replicated `VolumeDevice` (replication factor 2 over two extent stores on
//! a real disk), exported by the iSCSI target in-process on loopback. The
//! replica transport is in-process here (`LocalPeer`); the network
//! transport and meta come with the rest of the cluster issue. After the
//! suite, both replicas of every extent must hold identical bytes.

use std::sync::Arc;

use ironblock_chunk::identity;
use ironblock_chunk::replica::{ChunkId, InMemoryMembership, LocalPeer, ReplicaPeer, StaticPeers};
use ironblock_chunk::store::{ExtentStore, StoreConfig};
use ironblock_chunk::volume::{VolumeConfig, VolumeDevice};
use ironblock_target::scsi::{DeviceIdentity, LogicalUnit, LuConfig, LunTable};
use ironblock_target::server::{ExportedTarget, Server, ServerConfig, StaticPortal};
use ironblock_tests::{cunit, iscsi_url, long_mode, require_tool, scratch_dir};

const IQN: &str = "iqn.2026-11.dev.ironblock:replicated";
const EXTENT: u64 = 16 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iscsi_test_cu_passes_on_a_replicated_lun() {
    require_tool("iscsi-test-cu", "libiscsi-bin");
    let size: u64 = if long_mode() { 1 << 30 } else { 64 << 20 };
    let dir = scratch_dir("replicated-");
    let mut stores = Vec::new();
    let mut peers = StaticPeers::new();
    for i in 0..2 {
        let d = dir.path().join(format!("chunk{i}"));
        std::fs::create_dir_all(&d).expect("mkdir");
        identity::init(&d, "conformance", &format!("c{i}"), false).expect("stamp");
        let s = ExtentStore::open(
            &d,
            StoreConfig {
                extent_size: EXTENT,
                ..StoreConfig::default()
            },
        )
        .expect("open store");
        peers.insert(Arc::new(LocalPeer::new(s.clone())));
        stores.push(s);
    }
    let membership = Arc::new(InMemoryMembership::new(
        vec![ChunkId::new("c0"), ChunkId::new("c1")],
        2,
    ));
    let local: Arc<dyn ReplicaPeer> = Arc::new(LocalPeer::new(stores[0].clone()));
    let mut cfg = VolumeConfig::new(
        "vol-conformance",
        size,
        DeviceIdentity {
            serial: "IBvol-conformance".into(),
            naa: [
                0x60, 0x0a, 0x49, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
            ],
        },
    );
    cfg.extent_size = EXTENT;
    let volume = VolumeDevice::new(cfg, membership.clone(), Arc::new(peers), Some(local))
        .expect("volume device");
    let mut luns = LunTable::new();
    luns.insert(
        1,
        Arc::new(LogicalUnit::new(Arc::new(volume), LuConfig::default())),
    );
    let target = Arc::new(ExportedTarget::new(IQN, luns));
    let server = Server::new(
        Arc::new(StaticPortal::new(vec![target], None)),
        ServerConfig::default(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let srv = server.clone();
    tokio::spawn(async move { srv.serve(listener).await });

    let url = iscsi_url(addr, IQN, 1, None, &[]);
    cunit::run_suite_and_assert(url, "replicated", String::new).await;
    server.shutdown();

    // Every extent the suite wrote exists on both replicas with equal bytes.
    let mut extents = stores[0].list_extents();
    extents.sort_by(|a, b| (&a.volume, a.index).cmp(&(&b.volume, b.index)));
    let mut other = stores[1].list_extents();
    other.sort_by(|a, b| (&a.volume, a.index).cmp(&(&b.volume, b.index)));
    assert_eq!(extents, other, "both replicas hold the same extents");
    assert!(!extents.is_empty(), "the suite wrote data");
    for id in extents {
        let a = stores[0]
            .read(&id, 0, EXTENT)
            .await
            .expect("read replica 0");
        let b = stores[1]
            .read(&id, 0, EXTENT)
            .await
            .expect("read replica 1");
        assert!(a == b, "replicas of {id:?} differ");
    }
    assert_eq!(
        membership.removals(),
        0,
        "no replica was dropped during the suite"
    );
}
