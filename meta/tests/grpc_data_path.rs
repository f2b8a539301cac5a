//! ReportReplicaFailure and ListChunkExtents through the generated gRPC
//! client, against a meta server in process on 127.0.0.1:0.

use ironblock_proto::v1 as pb;
use tonic::Code;

mod common;

use common::{create_volume, heartbeater, register, Running};

#[tokio::test]
async fn replica_failure_reports_and_chunk_extent_lists() {
    let dir = tempfile::tempdir().unwrap();
    let meta = Running::start(dir.path()).await;
    let mut c = meta.client().await;
    let mut ids = Vec::new();
    // Live chunks that acknowledge every revision (CreateVolume waits
    // until it is in force on them).
    let mut beats = Vec::new();
    for n in 1..=3u8 {
        let r = register(&mut c, n).await;
        ids.push(r.chunk_id);
        beats.push(heartbeater(c.clone(), &r, true));
    }
    let v = create_volume(&mut c, "v", 128 << 20, 2, false).await;

    // Every chunk lists exactly the extents it is a replica of.
    let mut listed = 0;
    let mut rev = 0;
    for id in &ids {
        let l = c
            .list_chunk_extents(pb::ListChunkExtentsRequest { chunk_id: *id })
            .await
            .unwrap()
            .into_inner();
        assert!(l.revision > 0);
        rev = rev.max(l.revision);
        for e in &l.extents {
            assert!(e.replicas.contains(id));
            assert_eq!(e.volume_id, v.id);
            assert_eq!(e.store_key, v.id);
        }
        listed += l.extents.len();
    }
    assert_eq!(listed, 2 * 2, "2 extents x RF 2");
    let e = c
        .list_chunk_extents(pb::ListChunkExtentsRequest { chunk_id: 77 })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    let ext = c
        .get_extents(pb::GetExtentsRequest {
            volume_id: v.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .extents[1]
        .clone();
    let victim = ext.replicas[0];
    let report = pb::ReportReplicaFailureRequest {
        volume_id: v.id.clone(),
        index: 1,
        store_key: v.id.clone(),
        chunk_id: victim,
        seen_epoch: ext.epoch,
        error: "disk on fire".into(),
    };
    let after = c
        .report_replica_failure(report.clone())
        .await
        .unwrap()
        .into_inner()
        .extent
        .unwrap();
    // + 1 for the removal (+ 1 more if a spare became a learner).
    assert!(after.epoch > ext.epoch, "{after:?}");
    assert!(!after.replicas.contains(&victim));
    assert!(after.degraded);
    // Reported again with the old epoch: unchanged, same answer.
    let again = c
        .report_replica_failure(report.clone())
        .await
        .unwrap()
        .into_inner()
        .extent
        .unwrap();
    assert_eq!(again, after);
    // The victim no longer lists that extent; the revision moved.
    let l = c
        .list_chunk_extents(pb::ListChunkExtentsRequest { chunk_id: victim })
        .await
        .unwrap()
        .into_inner();
    assert!(l.extents.iter().all(|e| e.index != 1));
    assert!(l.revision > rev);
    // Recovery to the spare is queued.
    let tasks = c
        .list_recovery_tasks(pb::ListRecoveryTasksRequest { target_chunk: 0 })
        .await
        .unwrap()
        .into_inner()
        .tasks;
    assert!(tasks
        .iter()
        .any(|t| t.extent_index == 1 && t.volume_id == v.id));

    for (vol, index) in [
        ("00000000-0000-4000-8000-000000000000", 0),
        (v.id.as_str(), 9),
    ] {
        let e = c
            .report_replica_failure(pb::ReportReplicaFailureRequest {
                volume_id: vol.into(),
                store_key: vol.into(),
                index,
                ..report.clone()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{vol}/{index}");
    }

    for b in beats {
        b.abort();
    }
    meta.stop().await;
}
