//! What meta acknowledges is in force, over gRPC: a call that changes what
//! initiators see returns only once every live chunk and the VIP holder has
//! acknowledged the revision, or once the lease of one that has not has run
//! out (meta stops extending it the moment the call commits); the revision
//! stream pushes every change.

mod common;

use std::time::Duration;

use ironblock_proto::v1 as pb;
use ironblock_proto::v1::meta_client::MetaClient;
use tonic::transport::Channel;

use common::{create_volume, heartbeater, register, Running};

const VIP: &str = "127.0.0.100:3260";
const INI: &str = "iqn.2026-12.dev.ironblock:in-force";

fn beat(reg: &pb::RegisterChunkResponse, applied: u64) -> pb::HeartbeatRequest {
    pb::HeartbeatRequest {
        cluster_id: reg.cluster_id.clone(),
        chunk_id: reg.chunk_id,
        used_bytes: 0,
        applied_revision: applied,
        io: Vec::new(),
    }
}

fn lease(holder: &str, token: u64, applied: u64) -> pb::AcquireVipLeaseRequest {
    pb::AcquireVipLeaseRequest {
        vip: VIP.into(),
        holder: holder.into(),
        ttl_ms: 20_000,
        token,
        applied_revision: applied,
    }
}

async fn revision(c: &mut MetaClient<Channel>) -> u64 {
    c.cluster_status(pb::ClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .revision
}

/// Heartbeats of `reg` reporting `applied` until one is answered with a
/// revision above `above` (the call under test has committed); its lease.
async fn beat_until_committed(
    c: &mut MetaClient<Channel>,
    reg: &pb::RegisterChunkResponse,
    applied: u64,
    above: u64,
) -> pb::HeartbeatResponse {
    for _ in 0..500 {
        let r = c.heartbeat(beat(reg, applied)).await.unwrap().into_inner();
        if r.revision > above {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the call never committed");
}

/// Chunks 1 and 2 and an RF=2 volume on them (both acknowledging while it
/// is created); then only chunk 1 keeps heartbeating, chunk 2 is left to
/// the test. (chunk 2, chunk 1's heartbeats, the volume.)
async fn chunk_1_current_and_chunk_2_silent(
    c: &mut MetaClient<Channel>,
) -> (
    pb::RegisterChunkResponse,
    tokio::task::JoinHandle<()>,
    pb::Volume,
) {
    let r1 = register(c, 1).await;
    let r2 = register(c, 2).await;
    let b1 = heartbeater(c.clone(), &r1, true);
    let b2 = heartbeater(c.clone(), &r2, true);
    let v = create_volume(c, "v", 1 << 30, 2, true).await;
    b2.abort();
    (r2, b1, v)
}

#[tokio::test]
async fn acl_add_returns_once_every_chunk_and_the_vip_holder_have_applied_it() {
    let dir = tempfile::tempdir().unwrap();
    // A long liveness timeout: no lease runs out during this test, so only
    // acknowledgements can end the wait.
    let liveness = Duration::from_secs(30);
    let m = Running::start_with_liveness(dir.path(), liveness).await;
    let mut c = m.client().await;
    let (r2, b1, v) = chunk_1_current_and_chunk_2_silent(&mut c).await;
    let current = revision(&mut c).await;
    let held = c
        .acquire_vip_lease(lease("r1", 0, current))
        .await
        .unwrap()
        .into_inner();
    assert!(held.held);
    // Chunk 2 and the VIP holder stop acknowledging.
    let before = revision(&mut c).await;
    let mut add = c.clone();
    let vid = v.id.clone();
    let call = tokio::spawn(async move {
        add.acl_add(pb::AclRequest {
            volume_id: vid,
            initiator_iqn: INI.into(),
            ..Default::default()
        })
        .await
    });
    // Chunk 2, still on the old revision, is told the new one and gets a
    // lease that ends within the bound of the commit.
    let r = beat_until_committed(&mut c, &r2, before, before).await;
    let committed = r.revision;
    let capped = r.lease_ms.expect("meta sends the lease");
    assert!(capped <= liveness.as_millis() as u64, "{capped}");
    assert!(
        !call.is_finished(),
        "AclAdd returned before chunk 2 applied it"
    );
    // Chunk 2 acknowledges; the redirector has not yet.
    let r = c
        .heartbeat(beat(&r2, committed))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.lease_ms, Some(liveness.as_millis() as u64));
    // One more acknowledgement round of chunk 1 (its heartbeater reports
    // what the previous answer announced, every 50 ms): still waiting on
    // the VIP holder.
    for _ in 0..3 {
        c.heartbeat(beat(&r2, committed)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    assert!(
        !call.is_finished(),
        "AclAdd returned before the VIP holder applied it"
    );
    // A renewal on the old view: granted, but no longer than the bound.
    let l = c
        .acquire_vip_lease(lease("r1", held.token, before))
        .await
        .unwrap()
        .into_inner();
    assert!(l.held);
    assert!(l.expires_in_ms <= liveness.as_millis() as u64);
    assert!(!call.is_finished());
    let l = c
        .acquire_vip_lease(lease("r1", held.token, committed))
        .await
        .unwrap()
        .into_inner();
    assert!(l.held);
    let added = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("AclAdd returns once everyone acknowledged")
        .unwrap()
        .expect("AclAdd")
        .into_inner();
    assert_eq!(added.initiators, vec![INI.to_string()]);
    b1.abort();
    m.stop().await;
}

#[tokio::test]
async fn a_chunk_that_never_applies_is_fenced_out_and_the_call_still_returns() {
    let dir = tempfile::tempdir().unwrap();
    let liveness = Duration::from_millis(800);
    let m = Running::start_with_liveness(dir.path(), liveness).await;
    let mut c = m.client().await;
    let (r2, b1, v) = chunk_1_current_and_chunk_2_silent(&mut c).await;
    let stale = revision(&mut c).await;
    // Chunk 2 keeps heartbeating (it is alive) but never applies anything.
    let mut c2 = c.clone();
    let r2b = r2.clone();
    let stuck = tokio::spawn(async move {
        for _ in 0..600 {
            if c2.heartbeat(beat(&r2b, stale)).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let added = tokio::time::timeout(
        Duration::from_secs(10),
        c.acl_add(pb::AclRequest {
            volume_id: v.id.clone(),
            initiator_iqn: INI.into(),
            ..Default::default()
        }),
    )
    .await
    .expect("AclAdd returns within the bound although chunk 2 never applies it");
    added.expect("AclAdd");
    // From the moment it returned, chunk 2 holds no lease: every heartbeat
    // on its old view is answered with a zero lease (its self-fence stays
    // closed) until it reports the revision.
    let r = c.heartbeat(beat(&r2, stale)).await.unwrap().into_inner();
    assert_eq!(r.lease_ms, Some(0));
    assert!(r.revision > stale);
    stuck.abort();
    let r = c
        .heartbeat(beat(&r2, r.revision))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.lease_ms, Some(liveness.as_millis() as u64));
    b1.abort();
    m.stop().await;
}

#[tokio::test]
async fn the_revision_stream_pushes_every_change() {
    let dir = tempfile::tempdir().unwrap();
    let m = Running::start(dir.path()).await;
    let mut c = m.client().await;
    let b = heartbeater(c.clone(), &register(&mut c, 1).await, true);
    let mut stream = c
        .watch_revisions(pb::WatchRevisionsRequest {
            watcher: "test".into(),
            vip_holder: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream
        .message()
        .await
        .unwrap()
        .expect("the current revision");
    assert_eq!(first.revision, revision(&mut c).await);
    create_volume(&mut c, "v", 1 << 30, 1, true).await;
    let now = revision(&mut c).await;
    assert!(now > first.revision);
    let mut seen = first.revision;
    while seen < now {
        let ev = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("a pushed revision")
            .unwrap()
            .expect("the stream stays open");
        assert!(ev.revision > seen, "revisions only move forward");
        seen = ev.revision;
    }
    b.abort();
    m.stop().await;
}
