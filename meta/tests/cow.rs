//! Copy-on-write through the gRPC API: snapshot cost independent of the
//! volume size, the snapshot barrier, and the copy-up RPCs.

use std::time::{Duration, Instant};

use ironblock_proto::v1 as pb;
use ironblock_proto::v1::meta_client::MetaClient;
use tonic::transport::Channel;
use tonic::Code;

mod common;

use common::{create_volume, heartbeater, register, Running, GIB};

async fn volume(c: &mut MetaClient<Channel>, name: &str, size: u64, thin: bool) -> pb::Volume {
    create_volume(c, name, size, 2, thin).await
}

async fn snapshot(c: &mut MetaClient<Channel>, vol: &str, name: &str) -> pb::Snapshot {
    c.create_snapshot(pb::CreateSnapshotRequest {
        volume_id: vol.into(),
        name: name.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .snapshot
    .unwrap()
}

#[tokio::test]
async fn snapshot_cost_does_not_depend_on_the_volume_size() {
    let dir = tempfile::tempdir().unwrap();
    let m = Running::start_with_liveness(dir.path(), Duration::from_secs(3)).await;
    let mut c = m.client().await;
    let beats = [
        heartbeater(c.clone(), &register(&mut c, 1).await, true),
        heartbeater(c.clone(), &register(&mut c, 2).await, true),
    ];
    let big = volume(&mut c, "big", 10 * GIB, false).await;
    let small = volume(&mut c, "small", GIB, false).await;
    let client = c.clone();
    let extents = |id: String| {
        let mut c = client.clone();
        async move {
            c.get_extents(pb::GetExtentsRequest { volume_id: id })
                .await
                .unwrap()
                .into_inner()
                .extents
        }
    };
    assert_eq!(extents(big.id.clone()).await.len(), 160);
    assert_eq!(extents(small.id.clone()).await.len(), 16);

    let mut cost = Vec::new();
    for (v, name) in [(&big, "big-s"), (&small, "small-s")] {
        let before = m.committed_ops().await;
        let t = Instant::now();
        let s = snapshot(&mut c, &v.id, name).await;
        let took = t.elapsed();
        let ops = m.committed_ops().await - before;
        println!(
            "snapshot of {} GiB: {ops} metadata records written, {took:?} (barrier included)",
            v.size_bytes / GIB
        );
        assert_eq!(s.generation, 0);
        cost.push(ops);
    }
    assert_eq!(cost[0], cost[1], "snapshot cost must not grow with size");
    assert!(cost[0] <= 4, "snapshot wrote {} records", cost[0]);
    // Still every record at generation 0, and the volume moved on.
    let es = extents(big.id.clone()).await;
    assert_eq!(es.len(), 160);
    assert!(es
        .iter()
        .all(|e| e.generation == 0 && e.store_key == big.id));
    let got = c
        .get_volume(pb::VolumeRef {
            r#ref: Some(pb::volume_ref::Ref::Id(big.id.clone())),
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(got.generation, 1);
    for b in beats {
        b.abort();
    }
    m.stop().await;
}

#[tokio::test]
async fn copy_up_rpcs_and_lazy_placement() {
    let dir = tempfile::tempdir().unwrap();
    let m = Running::start_with_liveness(dir.path(), Duration::from_secs(3)).await;
    let mut c = m.client().await;
    let beats = [
        heartbeater(c.clone(), &register(&mut c, 1).await, true),
        heartbeater(c.clone(), &register(&mut c, 2).await, true),
    ];
    let v = volume(&mut c, "v", 2 * GIB, true).await;
    let req = |index| pb::ExtentRequest {
        volume_id: v.id.clone(),
        index,
    };
    let r = c.resolve_extent(req(3)).await.unwrap().into_inner();
    assert!(r.read.is_none() && r.own.is_none());
    let e = c
        .ensure_extent(req(3))
        .await
        .unwrap()
        .into_inner()
        .extent
        .unwrap();
    assert_eq!((e.index, e.generation, e.pending), (3, 0, false));
    assert_eq!(e.store_key, v.id);
    assert_eq!(e.replicas.len(), 2);
    let s = snapshot(&mut c, &v.id, "s").await;
    let st = c.ensure_extent(req(3)).await.unwrap_err();
    assert_eq!(st.code(), Code::FailedPrecondition);
    let cu = c.copy_up_extent(req(3)).await.unwrap().into_inner();
    let (src, dst) = (cu.source.unwrap(), cu.destination.unwrap());
    assert_eq!(src, e);
    assert!(dst.pending);
    assert_eq!(dst.store_key, format!("{}.g1", v.id));
    assert_eq!(dst.replicas, e.replicas);
    let all = c
        .get_extents(pb::GetExtentsRequest {
            volume_id: v.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .extents;
    assert_eq!(all.len(), 2);
    let done = c
        .commit_copy_up(pb::CommitCopyUpRequest {
            volume_id: v.id.clone(),
            index: 3,
            store_key: dst.store_key.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .extent
        .unwrap();
    assert!(!done.pending);
    let r = c.resolve_extent(req(3)).await.unwrap().into_inner();
    assert_eq!(r.own.as_ref(), Some(&done));
    // Deleting the snapshot drops generation 0 of extent 3.
    c.delete_snapshot(pb::DeleteSnapshotRequest { snapshot_id: s.id })
        .await
        .unwrap();
    let all = c
        .get_extents(pb::GetExtentsRequest {
            volume_id: v.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .extents;
    assert_eq!(all, vec![done]);
    for b in beats {
        b.abort();
    }
    m.stop().await;
}

#[tokio::test]
async fn snapshot_barrier_waits_for_chunks_and_fences_out_stuck_ones() {
    let dir = tempfile::tempdir().unwrap();
    let liveness = Duration::from_millis(600);
    let m = Running::start_with_liveness(dir.path(), liveness).await;
    let mut c = m.client().await;
    let good = heartbeater(c.clone(), &register(&mut c, 1).await, true);
    let stuck_reg = register(&mut c, 2).await;
    // A chunk that stays alive but never confirms: the calls still return
    // (within the in-force bound, the liveness timeout), because meta
    // stops extending its lease and waits until it has run out.
    let stuck = heartbeater(c.clone(), &stuck_reg, false);
    let t = Instant::now();
    let v = tokio::time::timeout(Duration::from_secs(10), volume(&mut c, "v", GIB, true))
        .await
        .expect("CreateVolume must not wait on a stuck chunk beyond its lease");
    let s = tokio::time::timeout(Duration::from_secs(10), snapshot(&mut c, &v.id, "s"))
        .await
        .expect("CreateSnapshot must not wait on a stuck chunk beyond its lease");
    println!(
        "create + snapshot with a stuck chunk took {:?}",
        t.elapsed()
    );
    assert_eq!(s.name, "s");
    stuck.abort();
    // It is fenced out: a heartbeat with its stale revision renews nothing,
    // one that reports the current revision gets the full lease back.
    let beat = |applied: u64| pb::HeartbeatRequest {
        cluster_id: stuck_reg.cluster_id.clone(),
        chunk_id: stuck_reg.chunk_id,
        used_bytes: 0,
        applied_revision: applied,
        io: Vec::new(),
    };
    let r = c.heartbeat(beat(0)).await.unwrap().into_inner();
    assert_eq!(
        r.lease_ms,
        Some(0),
        "a chunk behind a revision in force holds no lease"
    );
    let r = c.heartbeat(beat(r.revision)).await.unwrap().into_inner();
    assert_eq!(r.lease_ms, Some(liveness.as_millis() as u64));
    // With only current chunks it passes on their acknowledgements.
    let s2 = tokio::time::timeout(Duration::from_secs(10), snapshot(&mut c, &v.id, "s2"))
        .await
        .expect("snapshot with current chunks");
    assert_eq!(s2.name, "s2");
    good.abort();
    m.stop().await;
}
