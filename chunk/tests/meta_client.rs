//! MetaMembership and MetaPeers against an in-process meta service.

use std::sync::Arc;
use std::time::Duration;

use ironblock_chunk::meta_client::{MetaClient, MetaMembership, MetaPeers};
use ironblock_chunk::{
    identity, ChunkId, ExtentId, ExtentStore, LocalPeer, Membership, PeerDirectory,
    RemotePeerConfig, StoreConfig,
};
use ironblock_meta::{Config, MetaServer};
use ironblock_proto::v1 as pb;

/// Registers chunk `n` and heartbeats for it (every 50 ms, reporting the
/// revision the previous answer announced as applied: meta's calls wait
/// until a change is in force on every live chunk). The chunk id; the
/// heartbeats end with the runtime.
async fn register(meta: &MetaClient, n: u8) -> u64 {
    let r = meta
        .register_chunk(pb::RegisterChunkRequest {
            portal: format!("127.0.0.{n}:3260"),
            data_addr: format!("127.0.0.{n}:7100"),
            capacity_bytes: 1 << 40,
            ..Default::default()
        })
        .await
        .unwrap();
    let meta = meta.clone();
    let (cluster_id, chunk_id) = (r.cluster_id, r.chunk_id);
    tokio::spawn(async move {
        let mut applied = 0;
        while let Ok(r) = meta
            .heartbeat(pb::HeartbeatRequest {
                cluster_id: cluster_id.clone(),
                chunk_id,
                applied_revision: applied,
                ..Default::default()
            })
            .await
        {
            applied = r.revision;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    chunk_id
}

#[tokio::test]
async fn membership_follows_meta_and_peers_learn_new_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let server = MetaServer::bind(Config::new(
        "127.0.0.1:0".parse().unwrap(),
        dir.path().join("meta"),
    ))
    .await
    .unwrap();
    let addr = server.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    let meta = MetaClient::new(&addr.to_string(), Duration::from_secs(5)).unwrap();
    let c1 = register(&meta, 1).await;
    let c2 = register(&meta, 2).await;

    let sd = dir.path().join("chunk");
    identity::init(&sd, "x", &c1.to_string(), false).unwrap();
    let store = ExtentStore::open(&sd, StoreConfig::default()).unwrap();
    let peers = Arc::new(MetaPeers::new(
        Arc::new(LocalPeer::new(store)),
        RemotePeerConfig::default(),
    ));
    peers.refresh(&meta).await.unwrap();
    assert_eq!(peers.remote_ids(), vec![ChunkId(c2.to_string())]);
    let me = ChunkId(c1.to_string());
    assert_eq!(
        peers.peer(&me).unwrap().chunk(),
        &me,
        "local peer for our id"
    );

    let m = MetaMembership::new(meta.clone()).with_peers(peers.clone());
    let mut raw = ironblock_proto::v1::meta_client::MetaClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let v = raw
        .create_volume(pb::CreateVolumeRequest {
            name: "v".into(),
            size_bytes: 128 << 20,
            replicas: 2,
            thin: false,
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let x0 = ExtentId::new(v.id.clone(), 0);
    let x1 = ExtentId::new(v.id.clone(), 1);
    let s0 = m.current(&x0).await.unwrap().unwrap();
    assert_eq!(s0.epoch, 1);
    assert_eq!(s0.members.len(), 2);
    // Past the end: no set.
    assert!(m
        .current(&ExtentId::new(v.id.clone(), 2))
        .await
        .unwrap()
        .is_none());
    // A generation suffix maps to the same volume.
    let g = ExtentId::new(format!("{}.g1", v.id), 0);
    assert!(
        m.current(&g).await.unwrap().is_none(),
        "no generation-1 extent yet"
    );

    // Changed behind our back: asking again for the same extent refetches.
    raw.report_replica_failure(pb::ReportReplicaFailureRequest {
        volume_id: v.id.clone(),
        index: 0,
        store_key: v.id.clone(),
        chunk_id: c2,
        seen_epoch: 1,
        error: "test".into(),
    })
    .await
    .unwrap();
    let s0b = m.current(&x0).await.unwrap().unwrap();
    // Removal bumps the epoch; a spare made a learner bumps it again.
    assert!(s0b.epoch >= 2, "{s0b:?}");
    assert_eq!(s0b.members, vec![me.clone()]);

    // remove_member goes through ReportReplicaFailure; a stale epoch
    // changes nothing and returns the current set.
    let s1 = m.current(&x1).await.unwrap().unwrap();
    let other = s1.members.iter().find(|c| **c != me).unwrap().clone();
    let after = m.remove_member(&x1, &other, s1.epoch).await.unwrap();
    // + 1 for the removal (+ 1 more if a spare became a learner).
    assert!(after.epoch > s1.epoch, "{after:?}");
    assert!(!after.contains(&other));
    let again = m.remove_member(&x1, &other, s1.epoch).await.unwrap();
    assert_eq!(again, after);

    // A chunk that joins later: a set naming it refreshes the directory.
    let c3 = register(&meta, 3).await;
    assert!(peers.peer(&ChunkId(c3.to_string())).is_none());
    let v3 = raw
        .create_volume(pb::CreateVolumeRequest {
            name: "v3".into(),
            size_bytes: 64 << 20,
            replicas: 3,
            thin: false,
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let s = m.current(&ExtentId::new(v3.id, 0)).await.unwrap().unwrap();
    let joined = ChunkId(c3.to_string());
    assert!(s.contains(&joined));
    assert!(
        peers.peer(&joined).is_some(),
        "directory knows the new member"
    );

    // Unknown volume: NotFound.
    let unknown = ExtentId::new("00000000-0000-4000-8000-000000000000", 0);
    assert!(matches!(
        m.current(&unknown).await,
        Err(ironblock_chunk::MembershipError::NotFound(_))
    ));
    let _ = stop.send(());
    let _ = task.await;
}
