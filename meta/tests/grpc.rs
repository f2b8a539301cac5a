//! The meta service driven through its generated gRPC client, in process on
//! 127.0.0.1:0.

use std::time::Duration;

use ironblock_meta::{volume_prefix_from_naa, Config, MetaServer};
use ironblock_proto::v1 as pb;
use ironblock_proto::v1::meta_client::MetaClient;
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::Code;

mod common;

use common::{create_volume, heartbeater, register, Running, GIB};

fn by_id(id: &str) -> pb::VolumeRef {
    pb::VolumeRef {
        r#ref: Some(pb::volume_ref::Ref::Id(id.to_string())),
    }
}

fn by_name(n: &str) -> pb::VolumeRef {
    pb::VolumeRef {
        r#ref: Some(pb::volume_ref::Ref::Name(n.to_string())),
    }
}

async fn chunk_state(c: &mut MetaClient<Channel>, id: u64) -> i32 {
    c.list_chunks(pb::ListChunksRequest {})
        .await
        .unwrap()
        .into_inner()
        .chunks
        .into_iter()
        .find(|x| x.id == id)
        .map(|x| x.state)
        .unwrap_or_default()
}

#[tokio::test]
async fn volumes_snapshots_acls_exports_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let meta = Running::start_with_liveness(dir.path(), Duration::from_secs(30)).await;
    let mut c = meta.client().await;
    let r1 = register(&mut c, 1).await;
    let r2 = register(&mut c, 2).await;
    let beats = [
        heartbeater(c.clone(), &r1, true),
        heartbeater(c.clone(), &r2, true),
    ];
    assert_eq!(r1.chunk_id, 1);
    assert!(r1.heartbeat_interval_ms <= 1000);
    assert_eq!(r1.liveness_timeout_ms, 30_000);

    // Errors carry the right codes.
    let e = c
        .create_volume(pb::CreateVolumeRequest {
            name: "v".into(),
            size_bytes: 0,
            replicas: 1,
            thin: true,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("size"), "{}", e.message());
    let e = c
        .create_volume(pb::CreateVolumeRequest {
            name: "v".into(),
            size_bytes: GIB,
            replicas: 3,
            thin: true,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let e = c.get_volume(by_name("nope")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = c
        .get_volume(pb::VolumeRef { r#ref: None })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // Create, idempotently.
    let req = pb::CreateVolumeRequest {
        name: "pvc-a".into(),
        size_bytes: GIB,
        replicas: 2,
        thin: false,
    };
    let v = c
        .create_volume(req.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let again = c
        .create_volume(req.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v, again);
    let e = c
        .create_volume(pb::CreateVolumeRequest {
            size_bytes: 2 * GIB,
            ..req.clone()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    assert_eq!(v.lun, 1);
    assert!(v.target_iqn.starts_with("iqn.2026-11.dev.ironblock:"));
    assert!(v.target_iqn.ends_with(":t1"));
    assert!(v.acl.is_empty());
    // VPD identity maps back to the volume.
    assert_eq!(v.vpd_serial, v.id.replace('-', ""));
    let naa: [u8; 16] = v.naa_id.as_slice().try_into().unwrap();
    assert!(v
        .id
        .replace('-', "")
        .starts_with(&volume_prefix_from_naa(&naa).unwrap()));

    let got = c.get_volume(by_id(&v.id)).await.unwrap().into_inner();
    assert_eq!(got.volume.unwrap().name, "pvc-a");

    // Extents: 16 of 64 MiB, two distinct replicas each.
    let ex = c
        .get_extents(pb::GetExtentsRequest {
            volume_id: v.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ex.extent_size_bytes, 64 << 20);
    assert_eq!(ex.extents.len(), 16);
    for e in &ex.extents {
        assert_eq!(e.replicas.len(), 2);
        assert_ne!(e.replicas[0], e.replicas[1]);
        assert!(!e.degraded);
    }

    // ACL: not visible until added.
    let exports = c
        .list_exports(pb::ListExportsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(exports.targets.len(), 1);
    assert_eq!(exports.targets[0].luns.len(), 1);
    assert!(exports.targets[0].luns[0].allowed_initiators.is_empty());
    let acl = pb::AclRequest {
        volume_id: v.id.clone(),
        initiator_iqn: "iqn.2026-01.com.example:node1".into(),
        ..Default::default()
    };
    for _ in 0..2 {
        let r = c.acl_add(acl.clone()).await.unwrap().into_inner();
        assert_eq!(r.initiators, vec!["iqn.2026-01.com.example:node1"]);
    }
    let exports2 = c
        .list_exports(pb::ListExportsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(exports2.revision > exports.revision);
    let lun = &exports2.targets[0].luns[0];
    assert_eq!(lun.volume_id, v.id);
    assert_eq!(lun.lun, 1);
    assert_eq!(lun.size_bytes, GIB);
    assert_eq!(
        lun.allowed_initiators,
        vec!["iqn.2026-01.com.example:node1"]
    );
    assert_eq!(lun.naa_id, v.naa_id);
    let e = c
        .acl_add(pb::AclRequest {
            initiator_iqn: "bogus".into(),
            ..acl.clone()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c
        .acl_add(pb::AclRequest {
            volume_id: "00000000-0000-4000-8000-000000000000".into(),
            ..acl.clone()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // Read-only entries: listed in the volume, the exports and the
    // response; the other mode is ALREADY_EXISTS unless a mode change is
    // asked for; removal ignores the mode.
    let reader = pb::AclRequest {
        volume_id: v.id.clone(),
        initiator_iqn: "iqn.2026-01.com.example:reader".into(),
        read_only: true,
        change_mode: false,
    };
    for _ in 0..2 {
        let r = c.acl_add(reader.clone()).await.unwrap().into_inner();
        assert_eq!(r.initiators.len(), 2);
        assert_eq!(
            r.read_only_initiators,
            vec!["iqn.2026-01.com.example:reader"]
        );
    }
    let e = c
        .acl_add(pb::AclRequest {
            read_only: false,
            ..reader.clone()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    let e = c
        .acl_add(pb::AclRequest {
            read_only: true,
            ..acl.clone()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    let got = c.get_volume(by_id(&v.id)).await.unwrap().into_inner();
    let got = got.volume.unwrap();
    assert_eq!(got.acl.len(), 2);
    assert_eq!(got.acl_read_only, vec!["iqn.2026-01.com.example:reader"]);
    let exports3 = c
        .list_exports(pb::ListExportsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        exports3.targets[0].luns[0].read_only_initiators,
        vec!["iqn.2026-01.com.example:reader"]
    );
    let r = c
        .acl_add(pb::AclRequest {
            read_only: false,
            change_mode: true,
            ..reader.clone()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.read_only_initiators.is_empty());
    c.acl_add(pb::AclRequest {
        change_mode: true,
        ..reader.clone()
    })
    .await
    .unwrap();
    let r = c.acl_remove(reader.clone()).await.unwrap().into_inner();
    assert_eq!(r.initiators, vec!["iqn.2026-01.com.example:node1"]);
    assert!(r.read_only_initiators.is_empty());

    // Resize.
    let e = c
        .resize_volume(pb::ResizeVolumeRequest {
            volume: Some(by_id(&v.id)),
            new_size_bytes: GIB / 2,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let grown = c
        .resize_volume(pb::ResizeVolumeRequest {
            volume: Some(by_name("pvc-a")),
            new_size_bytes: 2 * GIB,
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(grown.size_bytes, 2 * GIB);
    assert_eq!(grown.capacity_generation, 1);

    // Snapshot and clone.
    let s = c
        .create_snapshot(pb::CreateSnapshotRequest {
            volume_id: v.id.clone(),
            name: "snap".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(s.size_bytes, 2 * GIB);
    let clone = c
        .clone_volume(pb::CloneVolumeRequest {
            snapshot_id: s.id.clone(),
            name: "pvc-b".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(clone.parent_snapshot_id, s.id);
    assert_eq!(clone.replicas, 2);
    assert_eq!(
        (clone.target_iqn.as_str(), clone.lun),
        (v.target_iqn.as_str(), 2)
    );
    let snaps = c
        .list_snapshots(pb::ListSnapshotsRequest {
            volume_id: v.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .snapshots;
    assert_eq!(snaps, vec![s.clone()]);
    let e = c.delete_volume(by_id(&v.id)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let e = c
        .delete_snapshot(pb::DeleteSnapshotRequest {
            snapshot_id: s.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);

    let st = c
        .cluster_status(pb::ClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.health, pb::Health::Ok as i32);
    assert_eq!((st.volumes, st.snapshots, st.targets), (2, 1, 1));
    assert_eq!(st.chunks_alive, 2);
    assert_eq!(st.cluster_id, r1.cluster_id);

    // Delete in order, idempotently.
    assert!(
        c.delete_volume(by_name("pvc-b"))
            .await
            .unwrap()
            .into_inner()
            .deleted
    );
    assert!(
        !c.delete_volume(by_name("pvc-b"))
            .await
            .unwrap()
            .into_inner()
            .deleted
    );
    let del = pb::DeleteSnapshotRequest {
        snapshot_id: s.id.clone(),
    };
    assert!(
        c.delete_snapshot(del.clone())
            .await
            .unwrap()
            .into_inner()
            .deleted
    );
    assert!(!c.delete_snapshot(del).await.unwrap().into_inner().deleted);
    assert!(
        c.delete_volume(by_id(&v.id))
            .await
            .unwrap()
            .into_inner()
            .deleted
    );
    let vols = c
        .list_volumes(pb::ListVolumesRequest {})
        .await
        .unwrap()
        .into_inner()
        .volumes;
    assert!(vols.is_empty());

    for b in beats {
        b.abort();
    }
    meta.stop().await;
}

#[tokio::test]
async fn liveness_marks_a_silent_chunk_dead_and_queues_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let timeout = Duration::from_millis(500);
    let meta = Running::start_with_liveness(dir.path(), timeout).await;
    let mut c = meta.client().await;
    let mut ids = Vec::new();
    let mut cluster = String::new();
    // Chunk 1's only sign of life is its registration, after this instant.
    let started = tokio::time::Instant::now();
    for n in 1..=4 {
        let r = register(&mut c, n).await;
        cluster = r.cluster_id.clone();
        ids.push(r.chunk_id);
    }
    let v = create_volume(&mut c, "v", 4 * (64 << 20), 3, false).await;

    // Chunks 2..=4 heartbeat every 100 ms; chunk 1 stays silent.
    let (hb_stop_tx, mut hb_stop) = oneshot::channel::<()>();
    let mut hb_client = c.clone();
    let beating: Vec<u64> = ids[1..].to_vec();
    let hb_cluster = cluster.clone();
    let heartbeats = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = &mut hb_stop => return,
            }
            for id in &beating {
                hb_client
                    .heartbeat(pb::HeartbeatRequest {
                        cluster_id: hb_cluster.clone(),
                        chunk_id: *id,
                        used_bytes: 0,
                        applied_revision: 0,
                        io: Vec::new(),
                    })
                    .await
                    .expect("heartbeat");
            }
        }
    });

    let deadline = started + Duration::from_secs(5);
    while chunk_state(&mut c, ids[0]).await != pb::ChunkState::Dead as i32 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "chunk 1 not declared dead in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed();
    assert!(took >= timeout, "dead too early: {took:?}");
    assert!(took < timeout * 4, "dead too late: {took:?}");
    // The others stay alive, well past the timeout.
    tokio::time::sleep(timeout * 2).await;
    for id in &ids[1..] {
        assert_eq!(chunk_state(&mut c, *id).await, pb::ChunkState::Alive as i32);
    }

    // Its extents lost it (epoch 2), recovery is queued and each task's
    // target is a learner of its extent (epoch 3).
    let ex = c
        .get_extents(pb::GetExtentsRequest {
            volume_id: v.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let degraded: Vec<&pb::Extent> = ex.extents.iter().filter(|e| e.degraded).collect();
    assert!(!degraded.is_empty());
    for e in &ex.extents {
        assert!(!e.replicas.contains(&ids[0]));
        if e.degraded {
            assert_eq!(e.epoch, 3);
            assert_eq!(e.learners.len(), 1);
            assert!(!e.replicas.contains(&e.learners[0]));
            assert_eq!(e.store_key, v.id);
        } else {
            assert!(e.learners.is_empty());
        }
    }
    let st = c
        .cluster_status(pb::ClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.health, pb::Health::Degraded as i32);
    assert_eq!(st.chunks_dead, 1);
    assert_eq!(st.degraded_extents, degraded.len() as u64);
    assert_eq!(st.recovery_queued, degraded.len() as u64);
    let tasks = c
        .list_recovery_tasks(pb::ListRecoveryTasksRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tasks;
    assert_eq!(tasks.len(), degraded.len());
    for t in &tasks {
        let e = degraded
            .iter()
            .find(|e| e.index == t.extent_index)
            .expect("task of a degraded extent");
        assert_eq!(e.learners, vec![t.target_chunk]);
        assert_eq!(t.epoch, e.epoch);
        assert_eq!(t.sources, e.replicas);
        assert_eq!(t.store_key, v.id);
        let done = c
            .complete_recovery(pb::CompleteRecoveryRequest {
                task_id: t.id,
                success: true,
                error: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .extent
            .unwrap();
        assert_eq!(done.replicas.len(), 3);
        assert!(done.replicas.contains(&t.target_chunk));
        assert!(done.learners.is_empty());
        assert_eq!(done.epoch, t.epoch + 1);
        assert!(!done.degraded);
    }
    let st = c
        .cluster_status(pb::ClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.health, pb::Health::Ok as i32);
    assert_eq!(st.recovery_completed, tasks.len() as u64);

    // The dead chunk's heartbeat is refused; it re-registers with its id.
    let e = c
        .heartbeat(pb::HeartbeatRequest {
            cluster_id: cluster.clone(),
            chunk_id: ids[0],
            used_bytes: 0,
            applied_revision: 0,
            io: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let e = c
        .register_chunk(pb::RegisterChunkRequest {
            cluster_id: "00000000-0000-4000-8000-000000000000".into(),
            chunk_id: ids[0],
            portal: "127.0.0.1:3260".into(),
            data_addr: "127.0.0.1:7100".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let back = c
        .register_chunk(pb::RegisterChunkRequest {
            cluster_id: cluster.clone(),
            chunk_id: ids[0],
            portal: "127.0.0.1:3260".into(),
            data_addr: "127.0.0.1:7100".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(back.chunk_id, ids[0]);
    assert_eq!(
        chunk_state(&mut c, ids[0]).await,
        pb::ChunkState::Alive as i32
    );

    let _ = hb_stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(5), heartbeats)
        .await
        .expect("heartbeat task stop")
        .expect("heartbeat task");
    meta.stop().await;
}

#[tokio::test]
async fn restart_keeps_volumes_snapshots_acls_and_identity() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, chunk, vol, snap) = {
        let meta = Running::start_with_liveness(dir.path(), Duration::from_secs(30)).await;
        let mut c = meta.client().await;
        let r = register(&mut c, 1).await;
        // The chunk acknowledges every revision (the calls below wait until
        // they are in force on it).
        let beat = heartbeater(c.clone(), &r, true);
        let v = create_volume(&mut c, "keep", GIB, 1, true).await;
        c.acl_add(pb::AclRequest {
            volume_id: v.id.clone(),
            initiator_iqn: "iqn.2026-01.com.example:n1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        c.acl_add(pb::AclRequest {
            volume_id: v.id.clone(),
            initiator_iqn: "iqn.2026-01.com.example:reader".into(),
            read_only: true,
            change_mode: false,
        })
        .await
        .unwrap();
        let s = c
            .create_snapshot(pb::CreateSnapshotRequest {
                volume_id: v.id.clone(),
                name: "keep-snap".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .snapshot
            .unwrap();
        let v = c
            .get_volume(by_id(&v.id))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        drop(c);
        beat.abort();
        meta.stop().await;
        (r.cluster_id, r.chunk_id, v, s)
    };
    let meta = Running::start_with_liveness(dir.path(), Duration::from_secs(30)).await;
    let mut c = meta.client().await;
    // The chunk heartbeats the restarted meta (it may still hold a lease
    // the old one granted, so calls wait for its acknowledgement).
    let beat = heartbeater(
        c.clone(),
        &pb::RegisterChunkResponse {
            cluster_id: cluster.clone(),
            chunk_id: chunk,
            ..Default::default()
        },
        true,
    );
    let v = c
        .get_volume(by_name("keep"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v, vol);
    assert_eq!(
        v.acl,
        vec![
            "iqn.2026-01.com.example:n1",
            "iqn.2026-01.com.example:reader"
        ]
    );
    assert_eq!(v.acl_read_only, vec!["iqn.2026-01.com.example:reader"]);
    // The mode still rules after the restart.
    let e = c
        .acl_add(pb::AclRequest {
            volume_id: v.id.clone(),
            initiator_iqn: "iqn.2026-01.com.example:reader".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    let snaps = c
        .list_snapshots(pb::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .snapshots;
    assert_eq!(snaps, vec![snap]);
    let st = c
        .cluster_status(pb::ClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.cluster_id, cluster);
    // The chunk keeps its identity across the meta restart.
    let r = c
        .register_chunk(pb::RegisterChunkRequest {
            cluster_id: cluster.clone(),
            chunk_id: chunk,
            portal: "127.0.0.1:3260".into(),
            data_addr: "127.0.0.1:7100".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.chunk_id, chunk);
    beat.abort();
    drop(c);
    meta.stop().await;
}

#[tokio::test]
async fn metrics_endpoint_serves_prometheus_text() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::new("127.0.0.1:0".parse().unwrap(), dir.path().to_path_buf());
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let server = match MetaServer::bind(config).await {
        Ok(s) => s,
        Err(e) => panic!("bind meta: {e}"),
    };
    let addr = server.local_addr().unwrap();
    let maddr = server.metrics_addr().expect("metrics addr");
    let group = server.group();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = rx.await;
    }));
    assert!(group.wait_serving(Duration::from_secs(10)).await);
    drop(group);
    let mut c = tokio::time::timeout(
        Duration::from_secs(5),
        MetaClient::connect(format!("http://{addr}")),
    )
    .await
    .unwrap()
    .unwrap();
    let r = register(&mut c, 1).await;
    let beat = heartbeater(c.clone(), &r, true);
    c.create_volume(pb::CreateVolumeRequest {
        name: "m".into(),
        size_bytes: GIB,
        replicas: 1,
        thin: false,
    })
    .await
    .unwrap();

    let get = |path: &'static str| async move {
        let mut s = tokio::net::TcpStream::connect(maddr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
            .await
            .unwrap()
            .unwrap();
        out
    };
    let body = get("/metrics").await;
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    assert!(body.contains("\nironblock_meta_volumes 1\n"), "{body}");
    // The create waited until the chunk acknowledged it.
    assert!(
        body.contains("ironblock_meta_in_force_waits_total{result=\"acknowledged\"} 1\n"),
        "{body}"
    );
    assert!(body.contains("\nironblock_meta_extents 16\n"), "{body}");
    assert!(
        body.contains("ironblock_meta_chunks{state=\"alive\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("ironblock_meta_chunk_extents{chunk=\"1\"} 16"),
        "{body}"
    );
    assert!(body.contains("ironblock_meta_health 0"), "{body}");
    assert!(get("/nope").await.starts_with("HTTP/1.1 404"));

    beat.abort();
    drop(c);
    let _ = tx.send(());
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
