//! SetVolumeReplicas through the generated gRPC client, against a meta
//! server in process on 127.0.0.1:0: the raise is carried out by recovery
//! tasks (ListRecoveryTasks / CompleteRecovery, as a chunk's recovery worker
//! drives them), the lower trims at once, and each error code.

use std::time::{Duration, Instant};

use ironblock_proto::v1 as pb;
use ironblock_proto::v1::meta_client::MetaClient;
use tonic::transport::Channel;
use tonic::Code;

mod common;

use common::{create_volume, heartbeater, register, Running};

fn by_name(n: &str) -> Option<pb::VolumeRef> {
    Some(pb::VolumeRef {
        r#ref: Some(pb::volume_ref::Ref::Name(n.into())),
    })
}

async fn set(
    c: &mut MetaClient<Channel>,
    volume: Option<pb::VolumeRef>,
    replicas: u32,
) -> Result<pb::Volume, tonic::Status> {
    c.set_volume_replicas(pb::SetVolumeReplicasRequest { volume, replicas })
        .await
        .map(|r| r.into_inner().volume.expect("volume"))
}

async fn extents(c: &mut MetaClient<Channel>, id: &str) -> pb::GetExtentsResponse {
    c.get_extents(pb::GetExtentsRequest {
        volume_id: id.into(),
    })
    .await
    .expect("GetExtents")
    .into_inner()
}

async fn status(c: &mut MetaClient<Channel>) -> pb::ClusterStatusResponse {
    c.cluster_status(pb::ClusterStatusRequest {})
        .await
        .expect("ClusterStatus")
        .into_inner()
}

#[tokio::test]
async fn set_volume_replicas_raises_through_recovery_and_lowers_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let meta = Running::start_with_liveness(dir.path(), Duration::from_secs(1)).await;
    let mut c = meta.client().await;
    let mut beats = Vec::new();
    for n in 1..=3u8 {
        let r = register(&mut c, n).await;
        beats.push(heartbeater(c.clone(), &r, true));
    }
    let v = create_volume(&mut c, "v", 128 << 20, 1, false).await;
    let before = extents(&mut c, &v.id).await;
    assert!(before
        .extents
        .iter()
        .all(|e| e.replication_factor == 1 && !e.degraded));

    // Errors first: none changes anything.
    let rev = status(&mut c).await.revision;
    for (volume, replicas, want) in [
        (by_name("nope"), 2, Code::NotFound),
        (
            Some(pb::VolumeRef {
                r#ref: Some(pb::volume_ref::Ref::Id(
                    "00000000-0000-4000-8000-000000000000".into(),
                )),
            }),
            2,
            Code::NotFound,
        ),
        (None, 2, Code::InvalidArgument),
        (by_name("v"), 0, Code::InvalidArgument),
        (by_name("v"), 4, Code::InvalidArgument),
    ] {
        let e = set(&mut c, volume.clone(), replicas).await.unwrap_err();
        assert_eq!(e.code(), want, "{volume:?} -> {replicas}: {e:?}");
    }
    assert_eq!(status(&mut c).await.revision, rev);
    // Unchanged: the same volume back, nothing committed.
    assert_eq!(set(&mut c, by_name("v"), 1).await.unwrap(), v);
    assert_eq!(status(&mut c).await.revision, rev);

    // Raise to 3: every extent degraded, one learner + task each.
    let v3 = set(&mut c, by_name("v"), 3).await.unwrap();
    assert_eq!(v3.replicas, 3);
    let got = c
        .get_volume(by_name("v").unwrap())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(got.replicas, 3);
    let mid = extents(&mut c, &v.id).await;
    assert_eq!(mid.replicas, 3);
    for e in &mid.extents {
        assert!(e.degraded, "{e:?}");
        assert_eq!(e.replication_factor, 3);
        assert_eq!(e.learners.len(), 1, "one copy at a time per extent");
    }
    let s = status(&mut c).await;
    assert_eq!(s.health, pb::Health::Degraded as i32);
    assert_eq!(s.degraded_extents, 2);
    // Play the recovery workers until every extent has three members.
    let mut rounds = 0;
    loop {
        let tasks = c
            .list_recovery_tasks(pb::ListRecoveryTasksRequest { target_chunk: 0 })
            .await
            .unwrap()
            .into_inner()
            .tasks;
        if tasks.is_empty() {
            break;
        }
        rounds += 1;
        assert!(rounds <= 4, "recovery does not converge: {tasks:?}");
        for t in tasks {
            c.complete_recovery(pb::CompleteRecoveryRequest {
                task_id: t.id,
                success: true,
                error: String::new(),
            })
            .await
            .unwrap();
        }
    }
    let full = extents(&mut c, &v.id).await;
    for e in &full.extents {
        assert_eq!(e.replicas.len(), 3, "{e:?}");
        assert!(!e.degraded && e.learners.is_empty());
    }
    let s = status(&mut c).await;
    assert_eq!(
        (s.health, s.degraded_extents, s.recovery_completed),
        (pb::Health::Ok as i32, 0, 4)
    );

    // Lower to 1 by id: surplus members leave at once, epoch bumped.
    let v1 = set(
        &mut c,
        Some(pb::VolumeRef {
            r#ref: Some(pb::volume_ref::Ref::Id(v.id.clone())),
        }),
        1,
    )
    .await
    .unwrap();
    assert_eq!(v1.replicas, 1);
    let low = extents(&mut c, &v.id).await;
    for (e, was) in low.extents.iter().zip(&full.extents) {
        assert_eq!(e.replicas.len(), 1, "{e:?}");
        assert!(was.replicas.contains(&e.replicas[0]));
        assert!(e.epoch > was.epoch);
        assert_eq!(e.replication_factor, 1);
    }
    let listed: usize = {
        let mut n = 0;
        for id in 1..=3 {
            n += c
                .list_chunk_extents(pb::ListChunkExtentsRequest { chunk_id: id })
                .await
                .unwrap()
                .into_inner()
                .extents
                .len();
        }
        n
    };
    assert_eq!(listed, 2, "the dropped copies are no chunk's any more");
    assert_eq!(status(&mut c).await.health, pb::Health::Ok as i32);

    // Chunk 3 goes silent: with two chunks alive a raise to 3 is refused
    // (nothing changes), to 2 accepted.
    beats[2].abort();
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(&mut c).await.chunks_alive != 2 {
        assert!(Instant::now() < deadline, "chunk 3 never declared dead");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rev = status(&mut c).await.revision;
    let e = set(&mut c, by_name("v"), 3).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert_eq!(status(&mut c).await.revision, rev);
    assert_eq!(set(&mut c, by_name("v"), 2).await.unwrap().replicas, 2);
    assert!(extents(&mut c, &v.id)
        .await
        .extents
        .iter()
        .all(|e| e.replication_factor == 2));
    for b in &beats {
        b.abort();
    }
    meta.stop().await;
}
