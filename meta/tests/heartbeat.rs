//! Heartbeats never queue behind the state lock: a chunk stays alive and
//! keeps its lease while a long mutation (a huge thick create, a commit
//! waiting on the meta group's log) holds the state.

mod common;

use std::time::Duration;

use common::{register, Running};
use ironblock_proto::v1 as pb;

#[tokio::test]
async fn heartbeats_are_answered_while_a_mutation_holds_the_state() {
    let dir = tempfile::tempdir().unwrap();
    let liveness = Duration::from_secs(1);
    let meta = Running::start_with_liveness(dir.path(), liveness).await;
    let mut c = meta.client().await;
    let reg = register(&mut c, 1).await;

    let held = meta.hold_state().await;
    let hold_started = std::time::Instant::now();
    // Held longer than the liveness timeout: a heartbeat that waited for
    // the lock would come too late to keep the chunk alive.
    let beat = || {
        let mut c = c.clone();
        let (cluster_id, chunk_id) = (reg.cluster_id.clone(), reg.chunk_id);
        async move {
            c.heartbeat(pb::HeartbeatRequest {
                cluster_id,
                chunk_id,
                used_bytes: 0,
                applied_revision: 0,
                io: vec![pb::VolumeIo {
                    volume_id: "not-a-volume".into(),
                    bytes: 1,
                }],
            })
            .await
        }
    };
    for _ in 0..25 {
        // Bounded: before the change, this waited for the lock (that is,
        // until the end of the test's hold) and timed out.
        let r = tokio::time::timeout(Duration::from_secs(5), beat())
            .await
            .expect("a heartbeat waited for the state lock")
            .expect("heartbeat");
        let r = r.into_inner();
        assert_eq!(r.state, pb::ChunkState::Alive as i32);
        assert!(
            r.lease_ms.unwrap_or(0) > 0,
            "a heartbeat under a held lock still gets a lease"
        );
        // The interval a chunk heartbeats at.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(held);

    // Once the lock is free, meta's view holds those heartbeats: the last
    // one it saw came during the hold (not the registration before it), and
    // the chunk is alive. Its reported I/O, for an unknown volume, harmed
    // nothing.
    let chunks = c
        .list_chunks(pb::ListChunksRequest {})
        .await
        .expect("ListChunks")
        .into_inner()
        .chunks;
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].state, pb::ChunkState::Alive as i32);
    let since_last = Duration::from_millis(chunks[0].last_heartbeat_ms_ago);
    assert!(
        since_last < hold_started.elapsed(),
        "meta's last heartbeat from the chunk is {since_last:?} old: none during the hold counted"
    );
    meta.stop().await;
}
