//! Replica traffic over the network: extent stores in temp directories, each
//! served by `serve_replica` on 127.0.0.1:0, reached through `RemotePeer`s,
//! with `InMemoryMembership` standing in for meta.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ironblock_chunk::identity;
use ironblock_chunk::replica::{
    ChunkId, ExtentId, InMemoryMembership, LocalPeer, PeerError, ReplicaPeer, ReplicaSet,
    StaticPeers,
};
use ironblock_chunk::rpc::wire::Op;
use ironblock_chunk::rpc::{serve_replica, CallError, RemotePeer, RemotePeerConfig, RpcError};
use ironblock_chunk::store::{ExtentStore, StoreConfig};
use ironblock_chunk::volume::{VolumeConfig, VolumeDevice};
use ironblock_proto::v1 as pb;
use ironblock_target::scsi::{BlockDevice, DeviceIdentity};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

mod common;
use common::{flip_byte, pattern, read_all};

const EXT: u64 = 1 << 20;
const VOL: &str = "vol-1";

struct Node {
    _dir: tempfile::TempDir,
    path: PathBuf,
    store: ExtentStore,
    addr: SocketAddr,
    stop: CancellationToken,
    task: Option<JoinHandle<Result<(), RpcError>>>,
}

impl Node {
    /// Stop serving (graceful), bounded in time.
    async fn kill(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            match tokio::time::timeout(Duration::from_secs(10), t).await {
                Ok(r) => r.unwrap().unwrap(),
                Err(_) => panic!("replica server did not stop within 10 s"),
            }
        }
    }
}

struct Net {
    nodes: Vec<Node>,
    remotes: Vec<Arc<RemotePeer>>,
    meta: Arc<InMemoryMembership>,
}

fn chunk(i: usize) -> ChunkId {
    ChunkId::new(format!("c{i}"))
}

fn cfg() -> RemotePeerConfig {
    RemotePeerConfig {
        call_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(1),
    }
}

async fn net(n: usize, rf: usize) -> Net {
    let mut nodes = Vec::new();
    let mut remotes = Vec::new();
    for i in 0..n {
        let d = tempfile::tempdir().unwrap();
        identity::init(d.path(), "test", &format!("c{i}"), false).unwrap();
        let store = ExtentStore::open(
            d.path(),
            StoreConfig {
                extent_size: EXT,
                ..StoreConfig::default()
            },
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve_replica(
            listener,
            Arc::new(LocalPeer::new(store.clone())),
            stop.clone(),
        ));
        remotes.push(Arc::new(
            RemotePeer::new(chunk(i), &addr.to_string(), cfg()).unwrap(),
        ));
        nodes.push(Node {
            path: d.path().to_path_buf(),
            _dir: d,
            store,
            addr,
            stop,
            task: Some(task),
        });
    }
    Net {
        nodes,
        remotes,
        meta: Arc::new(InMemoryMembership::new((0..n).map(chunk).collect(), rf)),
    }
}

fn ident() -> DeviceIdentity {
    DeviceIdentity {
        serial: "vol-1".into(),
        naa: [0x60, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
    }
}

impl Net {
    /// A volume device running on chunk `local` (its own copy through a
    /// `LocalPeer`, every other member through a `RemotePeer`), or on an
    /// access point holding no replica (`None`: every member remote).
    fn volume(&self, local: Option<usize>) -> VolumeDevice {
        let mut cfg = VolumeConfig::new(VOL, 8 * EXT, ident());
        cfg.extent_size = EXT;
        cfg.peer_timeout = Duration::from_secs(3);
        let mut dir = StaticPeers::new();
        let mut local_peer = None;
        for (i, r) in self.remotes.iter().enumerate() {
            if Some(i) == local {
                let l: Arc<dyn ReplicaPeer> = Arc::new(LocalPeer::new(self.nodes[i].store.clone()));
                dir.insert(l.clone());
                local_peer = Some(l);
            } else {
                dir.insert(r.clone());
            }
        }
        VolumeDevice::new(cfg, self.meta.clone(), Arc::new(dir), local_peer).unwrap()
    }

    fn data_file(&self, i: usize, index: u64) -> PathBuf {
        self.nodes[i]
            .path
            .join("extents")
            .join(format!("{VOL}.{index:016x}.data"))
    }

    async fn raw(&self, i: usize, index: u64) -> Bytes {
        self.nodes[i]
            .store
            .read(&ExtentId::new(VOL, index), 0, EXT)
            .await
            .unwrap()
    }
}

#[tokio::test]
async fn rf3_over_the_network_every_store_holds_identical_data() {
    let n = net(3, 3).await;
    for local in [None, Some(0)] {
        let v = n.volume(local);
        // Crosses extents 0/1, starts at a 512-byte (unaligned) LBA.
        let start = EXT - 3 * 4096 - 512;
        let data = pattern(1 + local.unwrap_or(9) as u64, 40 * 1024);
        v.write(start / 512, &data, false).await.unwrap();
        v.write(7, &[0xab; 512], true).await.unwrap();
        BlockDevice::flush(&v).await.unwrap();
        assert_eq!(read_all(&v, start / 512, data.len()).await, data);
        assert_eq!(read_all(&v, 7, 512).await, vec![0xab; 512]);
        for index in [0, 1] {
            let a = n.raw(0, index).await;
            assert_eq!(a, n.raw(1, index).await, "extent {index} c0 vs c1");
            assert_eq!(a, n.raw(2, index).await, "extent {index} c0 vs c2");
        }
        let e0 = n.raw(1, 0).await;
        assert_eq!(&e0[start as usize..], &data[..(EXT - start) as usize]);
        assert_eq!(&e0[7 * 512..8 * 512], &[0xab; 512][..]);
    }
    // Unmap travels too.
    let v = n.volume(None);
    BlockDevice::unmap(&v, 0, 16).await.unwrap();
    for i in 0..3 {
        assert_eq!(&n.raw(i, 0).await[..8192], &[0u8; 8192][..]);
    }
}

#[tokio::test]
async fn rf2_over_the_network_each_set_holds_identical_data() {
    let n = net(3, 2).await;
    let v = n.volume(Some(1));
    let data = pattern(5, (4 * EXT) as usize);
    v.write(0, &data, true).await.unwrap();
    assert_eq!(read_all(&v, 0, data.len()).await, data);
    let sets = n.meta.all();
    assert_eq!(sets.len(), 4);
    for (ext, set) in sets {
        assert_eq!(set.members.len(), 2);
        let want = &data[(ext.index * EXT) as usize..((ext.index + 1) * EXT) as usize];
        for m in &set.members {
            let i: usize = m.as_str()[1..].parse().unwrap();
            assert_eq!(&n.raw(i, ext.index).await[..], want, "{ext} on {m}");
        }
        // The chunk outside the set never saw the extent.
        let outside = (0..3).find(|i| !set.contains(&chunk(*i))).unwrap();
        assert!(!n.nodes[outside].store.list_extents().contains(&ext));
    }
}

#[tokio::test]
async fn stale_epoch_round_trips_and_fences_over_the_network() {
    let n = net(3, 3).await;
    let ext = ExtentId::new(VOL, 0);
    let r = &n.remotes[1];
    r.write(&ext, 1, 0, Bytes::from(vec![1u8; 4096]), true)
        .await
        .unwrap();
    // Another access point fences the replica at epoch 5.
    let other = RemotePeer::new(chunk(1), &n.nodes[1].addr.to_string(), cfg()).unwrap();
    other.fence(&ext, 5).await.unwrap();
    let stale = PeerError::StaleEpoch { have: 5, got: 1 };
    assert_eq!(
        r.write(&ext, 1, 0, Bytes::from(vec![2u8; 4096]), false)
            .await
            .unwrap_err(),
        stale
    );
    assert_eq!(r.read(&ext, 1, 0, 4096).await.unwrap_err(), stale);
    assert_eq!(r.unmap(&ext, 1, 0, 4096).await.unwrap_err(), stale);
    // The refused write changed nothing.
    assert_eq!(r.read(&ext, 5, 0, 4096).await.unwrap(), vec![1u8; 4096]);

    // Through the volume: an access point with a view at epoch 1 is fenced
    // once meta moved the set, refreshes and writes at the new epoch.
    let ext1 = ExtentId::new(VOL, 1);
    let old = n.volume(None);
    old.write(EXT / 512, &[3; 4096], false).await.unwrap();
    n.meta.set(
        ext1.clone(),
        ReplicaSet {
            epoch: 2,
            members: vec![chunk(0), chunk(1), chunk(2)],
            learners: Vec::new(),
        },
    );
    let new = n.volume(Some(2));
    new.write(EXT / 512, &[4; 4096], false).await.unwrap();
    old.write(EXT / 512 + 8, &[5; 4096], false).await.unwrap();
    assert!(old.metrics().stale_refreshes.load(Ordering::SeqCst) >= 1);
    for i in 0..3 {
        assert_eq!(n.nodes[i].store.extent_epoch(&ext1).unwrap(), 2);
        let raw = n.raw(i, 1).await;
        assert_eq!(&raw[..4096], &[4; 4096][..]);
        assert_eq!(&raw[4096..8192], &[5; 4096][..]);
    }
}

#[tokio::test]
async fn remote_checksum_error_is_reported_and_repaired_over_rpc() {
    let n = net(3, 3).await;
    // Every member remote: reads go to c0 first.
    let v = n.volume(None);
    let data = pattern(3, 64 * 1024);
    v.write(0, &data, true).await.unwrap();
    let ext0 = ExtentId::new(VOL, 0);
    flip_byte(&n.data_file(0, 0), 5 * 4096 + 17);
    flip_byte(&n.data_file(0, 0), 11 * 4096 + 4000);
    assert_eq!(
        n.remotes[0].read(&ext0, 1, 0, 64 * 1024).await.unwrap_err(),
        PeerError::Checksum { block: 5 }
    );
    // The volume fails over to c1 and repairs c0 through the Repair RPC.
    assert_eq!(read_all(&v, 0, data.len()).await, data);
    assert_eq!(v.metrics().checksum_failovers.load(Ordering::SeqCst), 1);
    assert_eq!(v.metrics().repairs.load(Ordering::SeqCst), 2);
    assert_eq!(
        &n.nodes[0].store.read(&ext0, 0, 64 * 1024).await.unwrap()[..],
        &data[..]
    );
    assert_eq!(n.raw(0, 0).await, n.raw(1, 0).await);

    // Directly: a corrupt block on c2 is reported, repaired by RPC, reads.
    flip_byte(&n.data_file(2, 0), 3 * 4096);
    assert_eq!(
        n.remotes[2].read(&ext0, 1, 0, 8 * 4096).await.unwrap_err(),
        PeerError::Checksum { block: 3 }
    );
    let good = Bytes::copy_from_slice(&data[3 * 4096..4 * 4096]);
    n.remotes[2].repair(&ext0, 3, good).await.unwrap();
    assert_eq!(
        &n.remotes[2].read(&ext0, 1, 0, 8 * 4096).await.unwrap()[..],
        &data[..8 * 4096]
    );
}

#[tokio::test]
async fn stopped_chunk_is_removed_and_writes_keep_being_acked_on_survivors() {
    let mut n = net(3, 3).await;
    let v = Arc::new(n.volume(None));
    let started = Instant::now();
    const WRITES: u64 = 64;
    let mut acked = Vec::new();
    for k in 0..WRITES {
        if k == 16 {
            n.nodes[2].kill().await;
        }
        // Spread over four extents, each 4 KiB block written once.
        let lba = (k % 4) * (EXT / 512) + (k / 4) * 8;
        let buf = vec![(k as u8).wrapping_add(1); 4096];
        tokio::time::timeout(Duration::from_secs(20), v.write(lba, &buf, k % 8 == 0))
            .await
            .expect("write hung")
            .unwrap_or_else(|e| panic!("write {k} failed: {e}"));
        acked.push((lba, buf));
    }
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
    // c2 was removed from every extent (once each), nothing else was.
    let sets = n.meta.all();
    assert_eq!(sets.len(), 4);
    for (ext, set) in &sets {
        let mut members = set.members.clone();
        members.sort();
        assert_eq!(members, vec![chunk(0), chunk(1)], "{ext}");
        assert_eq!(set.epoch, 2, "{ext}");
    }
    assert_eq!(n.meta.removals(), 4);
    assert_eq!(v.metrics().member_removals.load(Ordering::SeqCst), 4);
    // Every acknowledged write is on both survivors.
    for (lba, buf) in &acked {
        assert_eq!(&read_all(&v, *lba, 4096).await, buf);
    }
    for index in 0..4 {
        assert_eq!(n.raw(0, index).await, n.raw(1, index).await);
    }
    // The dead chunk's peer reports Unreachable, quickly.
    let t = Instant::now();
    let e = n.remotes[2]
        .read(&ExtentId::new(VOL, 0), 2, 0, 4096)
        .await
        .unwrap_err();
    assert!(matches!(e, PeerError::Unreachable(_)), "{e}");
    assert!(t.elapsed() < Duration::from_secs(3));
    for node in &mut n.nodes[..2] {
        node.kill().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_stopped_under_concurrent_writes_loses_no_ack() {
    let mut n = net(3, 3).await;
    let v = Arc::new(n.volume(Some(0)));
    let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
    const TASKS: u64 = 4;
    const PER_TASK: u64 = 24;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let v = v.clone();
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            for k in 0..PER_TASK {
                // Task t owns extent t; block k.
                let lba = t * (EXT / 512) + k * 8;
                let buf = vec![(t * 64 + k + 1) as u8; 4096];
                tokio::time::timeout(Duration::from_secs(20), v.write(lba, &buf, k % 4 == 0))
                    .await
                    .expect("write hung")
                    .unwrap_or_else(|e| panic!("task {t} write {k} failed: {e}"));
                acked.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    // Stop c2 while writes are in flight.
    while acked.load(Ordering::SeqCst) < 8 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    n.nodes[2].kill().await;
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(acked.load(Ordering::SeqCst), TASKS * PER_TASK);
    assert!(started.elapsed() < Duration::from_secs(60));
    // Every extent written after the stop lost c2; none lost anyone else.
    for (ext, set) in n.meta.all() {
        assert!(set.contains(&chunk(0)) && set.contains(&chunk(1)), "{ext}");
    }
    assert!(n.meta.removals() >= 1 && n.meta.removals() <= TASKS);
    for t in 0..TASKS {
        for k in 0..PER_TASK {
            let lba = t * (EXT / 512) + k * 8;
            let want = vec![(t * 64 + k + 1) as u8; 4096];
            assert_eq!(read_all(&v, lba, 4096).await, want, "task {t} block {k}");
        }
        assert_eq!(n.raw(0, t).await, n.raw(1, t).await, "extent {t}");
    }
}

#[tokio::test]
async fn malformed_requests_are_refused_and_the_server_survives() {
    let n = net(1, 1).await;
    let c = &n.remotes[0];
    let ext = || {
        Some(pb::ExtentRef {
            volume: VOL.into(),
            index: 0,
        })
    };
    let write = |extent: Option<pb::ExtentRef>, offset: u64, len: usize| pb::ReplicaWriteRequest {
        extent,
        epoch: 1,
        offset,
        data: Bytes::from(vec![7u8; len]),
        fua: false,
    };
    let read = |offset: u64, len: u64| pb::ReplicaReadRequest {
        extent: ext(),
        epoch: 1,
        offset,
        len,
    };
    let bad_id = Some(pb::ExtentRef {
        volume: "../../etc".into(),
        index: 0,
    });
    let results = vec![
        c.call_raw(Op::Write, &write(ext(), 512, 4096)).await,
        c.call_raw(Op::Write, &write(ext(), 0, 100)).await,
        c.call_raw(Op::Write, &write(ext(), 0, 0)).await,
        c.call_raw(Op::Write, &write(None, 0, 4096)).await,
        c.call_raw(Op::Write, &write(bad_id.clone(), 0, 4096)).await,
        c.call_raw(Op::Write, &write(ext(), EXT, 4096)).await,
        c.call_raw(Op::Write, &write(ext(), u64::MAX - 4095, 4096))
            .await,
        c.call_raw(Op::Read, &read(4095, 4096)).await,
        c.call_raw(Op::Read, &read(0, (16 << 20) + 4096)).await,
        c.call_raw(Op::Read, &read(0, u64::MAX - 4095)).await,
        c.call_raw(Op::Read, &read(u64::MAX - 4095, 4096)).await,
        c.call_raw(
            Op::Unmap,
            &pb::ReplicaUnmapRequest {
                extent: ext(),
                epoch: 1,
                offset: 0,
                len: 3,
            },
        )
        .await,
        c.call_raw(
            Op::Repair,
            &pb::ReplicaRepairRequest {
                extent: ext(),
                block: 0,
                data: Bytes::from(vec![0u8; 512]),
            },
        )
        .await,
        c.call_raw(
            Op::Repair,
            &pb::ReplicaRepairRequest {
                extent: ext(),
                block: u64::MAX,
                data: Bytes::from(vec![0u8; 4096]),
            },
        )
        .await,
        c.call_raw(
            Op::Fence,
            &pb::ReplicaFenceRequest {
                extent: bad_id,
                epoch: 1,
            },
        )
        .await,
        c.call_raw(Op::Flush, &pb::ReplicaFlushRequest { extent: None })
            .await,
        // A message of another operation does not decode as a valid one.
        c.call_raw(Op::CopyExtent, &write(ext(), 0, 4096)).await,
    ];
    for (i, r) in results.iter().enumerate() {
        assert!(matches!(r, Err(CallError::Invalid(_))), "case {i}: {r:?}");
    }
    // Nothing was created by the refused requests.
    assert!(n.nodes[0].store.list_extents().is_empty());

    // Through the ReplicaPeer API a malformed request is `Other`, never a
    // retryable or fencing error.
    let e = c
        .write(
            &ExtentId::new(VOL, 0),
            1,
            512,
            Bytes::from(vec![0; 4096]),
            false,
        )
        .await
        .unwrap_err();
    assert!(matches!(e, PeerError::Other(_)), "{e}");

    // Raw garbage on a socket: no hello, a bad hello, an oversized frame, an
    // unknown op, a frame shorter than its header. Each costs only its own
    // connection.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = n.nodes[0].addr;
    let hello = |s: &[u8]| {
        let mut v = (s.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(s);
        v
    };
    let mut cases: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        hello(b"ironblock-replica/999"),
        [
            hello(b"ironblock-replica/1"),
            u32::MAX.to_be_bytes().to_vec(),
        ]
        .concat(),
        [
            hello(b"ironblock-replica/1"),
            3u32.to_be_bytes().to_vec(),
            vec![1, 2, 3],
        ]
        .concat(),
    ];
    // An unknown op is answered (invalid), then the connection goes on.
    let mut unknown = hello(b"ironblock-replica/1");
    unknown.extend_from_slice(&9u32.to_be_bytes());
    unknown.extend_from_slice(&42u64.to_be_bytes());
    unknown.push(200);
    cases.push(unknown);
    for (i, bytes) in cases.iter().enumerate() {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(bytes).await.unwrap();
        let mut buf = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(10), async {
            let mut chunk = [0u8; 256];
            loop {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => {
                        buf.extend_from_slice(&chunk[..k]);
                        if i == 4 && buf.len() >= 4 + 19 + 4 + 9 {
                            break;
                        }
                    }
                }
            }
        })
        .await;
        assert!(
            r.is_ok(),
            "case {i}: the server neither answered nor closed"
        );
        if i == 4 {
            // hello back, then the refusal of request 42.
            let refusal = &buf[4 + 19..];
            assert_eq!(&refusal[4..12], &42u64.to_be_bytes(), "{buf:?}");
            assert_eq!(refusal[12], 2, "status INVALID");
        }
    }
    // The server is still healthy.
    c.call_raw(Op::Write, &write(ext(), 0, 4096)).await.unwrap();
    let r = c.call_raw(Op::Read, &read(0, 4096)).await.unwrap();
    let r = <pb::ReplicaReadResponse as prost::Message>::decode(r).unwrap();
    assert_eq!(r.data, vec![7u8; 4096]);
}

#[tokio::test]
async fn sixteen_mib_payloads_fit_and_larger_io_is_split() {
    // Extents of 64 MiB here so a 16 MiB+ I/O fits in one extent.
    let d = tempfile::tempdir().unwrap();
    identity::init(d.path(), "test", "big", false).unwrap();
    let store = ExtentStore::open(
        d.path(),
        StoreConfig {
            extent_size: 64 << 20,
            ..StoreConfig::default()
        },
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(serve_replica(
        listener,
        Arc::new(LocalPeer::new(store.clone())),
        stop.clone(),
    ));
    let r = RemotePeer::new(ChunkId::new("big"), &addr.to_string(), cfg()).unwrap();
    let ext = ExtentId::new(VOL, 0);
    let len = (16 << 20) + 8192;
    let data = Bytes::from(pattern(9, len));
    r.write(&ext, 1, 4096, data.clone(), true).await.unwrap();
    assert_eq!(r.read(&ext, 1, 4096, len as u64).await.unwrap(), data);
    assert_eq!(
        store.read(&ext, 4096, len as u64).await.unwrap(),
        data,
        "store content"
    );
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// A server that says hello on every connection and then answers nothing:
/// what a frozen chunk (SIGSTOP) looks like once its connections are up.
async fn silent_server() -> (SocketAddr, JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut sock, _)) = listener.accept().await {
            use tokio::io::AsyncWriteExt;
            let hello = ironblock_chunk::rpc::wire::hello();
            if sock.write_all(&hello).await.is_ok() {
                held.push(sock);
            }
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_is_answered_by_a_live_peer_and_a_silent_one_is_cut_off() {
    let net = net(1, 1).await;
    net.remotes[0]
        .ping()
        .await
        .expect("a live replica answers a ping");
    assert!(net.remotes[0].health().is_some());

    let (addr, server) = silent_server().await;
    let patient = RemotePeerConfig {
        call_timeout: Duration::from_secs(120),
        connect_timeout: Duration::from_secs(5),
    };
    let silent = Arc::new(RemotePeer::new(chunk(9), &addr.to_string(), patient).unwrap());
    // A write waits on the data connection (the server never answers).
    let write = {
        let s = silent.clone();
        tokio::spawn(async move {
            s.write(
                &ExtentId::new(VOL, 0),
                1,
                0,
                Bytes::from(vec![1u8; 4096]),
                false,
            )
            .await
        })
    };
    let err = tokio::time::timeout(Duration::from_secs(30), silent.ping())
        .await
        .expect("the ping bounds itself")
        .expect_err("a silent peer fails its ping");
    assert!(err.to_string().contains("no answer"), "{err}");
    // The failed probe closed the data connection: the write fails now,
    // not at its 120 s call timeout.
    let r = tokio::time::timeout(Duration::from_secs(30), write)
        .await
        .expect("the waiting write ends once the probe fails")
        .unwrap();
    match r {
        Err(PeerError::Unreachable(m)) => assert!(m.contains("probe"), "{m}"),
        other => panic!("expected unreachable after the probe, got {other:?}"),
    }
    server.abort();
}
