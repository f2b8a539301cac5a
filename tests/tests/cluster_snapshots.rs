//! Copy-on-write snapshots and clones on a real cluster (meta + 2 chunk
//! processes on 127.0.0.1), through iSCSI:
//!
//! - snapshot creation costs the same metadata work for a 10 GiB volume as
//!   for a 1 GiB one (counted in records meta commits; wall times printed);
//! - a snapshot keeps the old data after the volume is overwritten (read
//!   through a clone of it, on another chunk than the writer);
//! - a clone is writable without touching its parent or the snapshot.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ironblock_proto::v1 as pb;
use ironblock_tests::cluster::{start_chunks, Admin, ChunkProcess, MetaProcess};
use ironblock_tests::initiator::{LoginOptions, Session};
use ironblock_tests::scratch_dir;

const INITIATOR: &str = "iqn.2026-11.dev.ironblock:snapshots";
const BS: u32 = 512;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

async fn settle(admin: &mut Admin, chunks: &[ChunkProcess]) {
    let rev = admin.revision().await;
    for c in chunks {
        assert!(
            c.wait_applied(rev, Duration::from_secs(30)).await,
            "chunk {} did not apply revision {rev}; log:\n{}",
            c.chunk_id(),
            c.log_tail()
        );
    }
}

async fn session(portal: SocketAddr, vol: &pb::Volume) -> Session {
    let s = Session::login(portal, &LoginOptions::normal(INITIATOR, &vol.target_iqn))
        .await
        .unwrap_or_else(|e| panic!("login to {} at {portal}: {e}", vol.target_iqn));
    let lun = u64::from(vol.lun);
    for _ in 0..10 {
        if s.test_unit_ready(lun).await.is_ok_and(|r| r.status == 0) {
            return s;
        }
    }
    panic!("LUN {lun} of {} never became ready", vol.target_iqn);
}

fn pattern(seed: u8, len: usize) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| seed.wrapping_mul(31).wrapping_add((i % 251) as u8))
            .collect::<Vec<_>>(),
    )
}

async fn write(s: &Session, vol: &pb::Volume, offset: u64, data: &Bytes) {
    let r = s
        .write16(u64::from(vol.lun), offset / u64::from(BS), data.clone(), BS)
        .await
        .expect("write");
    assert_eq!(r.status, 0, "write at {offset}: {:?}", r.sense_key());
}

async fn read(s: &Session, vol: &pb::Volume, offset: u64, len: usize) -> Bytes {
    let r = s
        .read16(
            u64::from(vol.lun),
            offset / u64::from(BS),
            (len as u64 / u64::from(BS)) as u32,
            BS,
        )
        .await
        .expect("read");
    assert_eq!(r.status, 0, "read at {offset}: {:?}", r.sense_key());
    r.data
}

async fn snapshot(admin: &mut Admin, volume: &pb::Volume, name: &str) -> (pb::Snapshot, Duration) {
    let t = Instant::now();
    let s = admin
        .client()
        .create_snapshot(pb::CreateSnapshotRequest {
            volume_id: volume.id.clone(),
            name: name.into(),
        })
        .await
        .expect("CreateSnapshot")
        .into_inner()
        .snapshot
        .expect("snapshot");
    (s, t.elapsed())
}

async fn clone_of(admin: &mut Admin, snap: &pb::Snapshot, name: &str) -> pb::Volume {
    let v = admin
        .client()
        .clone_volume(pb::CloneVolumeRequest {
            snapshot_id: snap.id.clone(),
            name: name.into(),
            size_bytes: 0,
            replicas: 0,
            thin: true,
        })
        .await
        .expect("CloneVolume")
        .into_inner()
        .volume
        .expect("volume");
    admin.acl_add(&v.id, INITIATOR).await;
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_are_constant_time_and_keep_old_data_and_clones_are_independent() {
    let dir = scratch_dir("cluster-snapshots-");
    let meta = MetaProcess::start(dir.path(), Duration::from_secs(3));
    let chunks = start_chunks(&meta, dir.path(), 2);
    let mut admin = meta.admin().await;

    // Constant time: thick volumes (every extent placed up front) of 1 GiB
    // (16 extents) and 10 GiB (160 extents); snapshot each and count the
    // metadata records meta commits.
    let mut cost = Vec::new();
    for (name, size) in [("small", GIB), ("large", 10 * GIB)] {
        let v = admin
            .client()
            .create_volume(pb::CreateVolumeRequest {
                name: name.into(),
                size_bytes: size,
                replicas: 2,
                thin: false,
            })
            .await
            .expect("create thick volume")
            .into_inner()
            .volume
            .expect("volume");
        let extents = admin.extents(&v.id).await.len();
        let before = meta
            .metric("ironblock_meta_committed_ops_total")
            .await
            .expect("meta metrics");
        let (_, took) = snapshot(&mut admin, &v, &format!("{name}-snap")).await;
        let after = meta
            .metric("ironblock_meta_committed_ops_total")
            .await
            .expect("meta metrics");
        println!(
            "snapshot of {name} ({} GiB, {extents} extents): {:.1} ms, {} metadata records",
            size / GIB,
            took.as_secs_f64() * 1000.0,
            after - before
        );
        cost.push((extents, after - before));
    }
    assert_eq!(cost[0].0 * 10, cost[1].0, "10x the extents");
    assert_eq!(
        cost[0].1, cost[1].1,
        "snapshot work does not depend on the volume size"
    );
    assert!(cost[1].1 <= 5.0, "a snapshot writes a handful of records");

    // Data: write A through chunk 1, snapshot, overwrite with B.
    let v = admin.create_volume("data", 256 * MIB, 2).await;
    admin.acl_add(&v.id, INITIATOR).await;
    settle(&mut admin, &chunks).await;
    let s1 = session(chunks[0].portal(), &v).await;
    // Two offsets in different 64 MiB extents, one never overwritten.
    let (o1, o2, o3) = (0, 100 * MIB, 200 * MIB);
    let a = pattern(1, 64 * 1024);
    write(&s1, &v, o1, &a).await;
    write(&s1, &v, o2, &a).await;
    write(&s1, &v, o3, &a).await;
    let (snap, _) = snapshot(&mut admin, &v, "data-snap").await;
    let b = pattern(2, 64 * 1024);
    write(&s1, &v, o1, &b).await;
    write(&s1, &v, o2, &b).await;
    assert_eq!(
        read(&s1, &v, o1, b.len()).await,
        b,
        "volume has the new data"
    );

    // The snapshot (through a clone, read on the other chunk) has the old.
    let c = clone_of(&mut admin, &snap, "data-clone").await;
    settle(&mut admin, &chunks).await;
    let s2 = session(chunks[1].portal(), &c).await;
    for o in [o1, o2, o3] {
        assert_eq!(read(&s2, &c, o, a.len()).await, a, "snapshot data at {o}");
    }
    // Never written anywhere: zeros.
    assert!(read(&s2, &c, 50 * MIB, 4096).await.iter().all(|x| *x == 0));

    // The clone is writable; its parent and the snapshot stay as they were.
    let d = pattern(3, 64 * 1024);
    write(&s2, &c, o1, &d).await;
    write(&s2, &c, o3, &d).await;
    assert_eq!(read(&s2, &c, o1, d.len()).await, d);
    assert_eq!(
        read(&s2, &c, o2, a.len()).await,
        a,
        "unwritten part of the clone"
    );
    let s1v = session(chunks[1].portal(), &v).await;
    assert_eq!(read(&s1v, &v, o1, b.len()).await, b, "parent untouched");
    assert_eq!(read(&s1v, &v, o3, a.len()).await, a, "parent untouched");
    let c2 = clone_of(&mut admin, &snap, "data-clone-2").await;
    settle(&mut admin, &chunks).await;
    let s3 = session(chunks[0].portal(), &c2).await;
    for o in [o1, o2, o3] {
        assert_eq!(
            read(&s3, &c2, o, a.len()).await,
            a,
            "the snapshot is unchanged by writes to its first clone"
        );
    }
}
