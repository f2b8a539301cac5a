//! The meta group in one process: formed by one node, grown online by
//! AddMeta (the new members catch up from a snapshot, the log having been
//! compacted), the leader stopped (another one takes over with every
//! record), the dead member removed and replaced.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::{create_volume, heartbeater, register, Running};
use ironblock_meta::Config;
use ironblock_proto::v1 as pb;
use ironblock_proto::v1::meta_client::MetaClient;
use ironblock_proto::v1::meta_raft_client::MetaRaftClient;
use ironblock_proto::MetaChannel;
use tonic::transport::Channel;

/// A member: meta in process (see `common::Running`).
struct Node(Running);

impl std::ops::Deref for Node {
    type Target = Running;
    fn deref(&self) -> &Running {
        &self.0
    }
}

impl Node {
    async fn start(dir: &Path, id: u64, join: bool) -> Node {
        let mut config = Config::new("127.0.0.1:0".parse().unwrap(), dir.to_path_buf());
        config.node_id = id;
        config.join = join;
        config.liveness_timeout = Duration::from_secs(30);
        Node(Running::spawn(config).await)
    }

    async fn members(&self) -> pb::ListMetasResponse {
        let mut c = MetaRaftClient::connect(format!("http://{}", self.addr))
            .await
            .expect("connect");
        c.list_metas(pb::ListMetasRequest {})
            .await
            .expect("list metas")
            .into_inner()
    }

    async fn stop(&mut self) {
        self.0.halt().await;
    }
}

fn voters(r: &pb::ListMetasResponse) -> BTreeSet<u64> {
    r.members.iter().filter(|m| m.voter).map(|m| m.id).collect()
}

async fn add(to: &Node, id: u64, addr: SocketAddr) -> pb::ListMetasResponse {
    let mut c = MetaRaftClient::connect(format!("http://{}", to.addr))
        .await
        .expect("connect");
    c.add_meta(pb::AddMetaRequest {
        id,
        addr: addr.to_string(),
    })
    .await
    .expect("add meta")
    .into_inner()
}

/// A client of the group `nodes` (follows the leader; 10 s a call).
fn client_of(nodes: &[&Node]) -> MetaClient<MetaChannel> {
    let list: Vec<String> = nodes.iter().map(|n| n.addr.to_string()).collect();
    let ch = MetaChannel::new(&list.join(","), Duration::from_secs(10), |e| {
        e.connect_timeout(Duration::from_millis(500))
    })
    .unwrap();
    MetaClient::new(ch)
}

/// Wait (bounded) until `cond` holds for `n`'s view.
async fn wait_view(n: &Node, what: &str, cond: impl Fn(&pb::ListMetasResponse) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let v = n.members().await;
        if cond(&v) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} within 20 s; last view {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_grows_online_survives_its_leader_and_replaces_a_dead_member() {
    let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut n1 = Node::start(dirs[0].path(), 1, false).await;
    assert!(n1.group.wait_serving(Duration::from_secs(10)).await);
    let mut c: MetaClient<Channel> = MetaClient::connect(format!("http://{}", n1.addr))
        .await
        .unwrap();
    let chunk = register(&mut c, 1).await;
    let beat = heartbeater(c.clone(), &chunk, true);
    for k in 0..20 {
        create_volume(&mut c, &format!("g{k}"), 64 << 20, 1, true).await;
    }
    // Compact: a snapshot of every record, and no log before it.
    n1.group.raft.trigger().snapshot().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let snap = loop {
        let m = n1.group.raft.metrics().borrow().clone();
        if let Some(s) = m.snapshot {
            break s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no snapshot within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    n1.group.raft.trigger().purge_log(snap.index).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while n1.group.raft.metrics().borrow().purged.map(|p| p.index) != Some(snap.index) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "log not purged within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Grow to three: each new node joins empty, so it can only catch up
    // from the snapshot.
    let mut n2 = Node::start(dirs[1].path(), 2, true).await;
    let mut n3 = Node::start(dirs[2].path(), 3, true).await;
    add(&n1, 2, n2.addr).await;
    let r = add(&n1, 3, n3.addr).await;
    assert_eq!(voters(&r), BTreeSet::from([1, 2, 3]), "{r:?}");
    // Adding a member again is a no-op.
    assert_eq!(
        voters(&add(&n1, 3, n3.addr).await),
        BTreeSet::from([1, 2, 3])
    );
    let leader_applied = n1.members().await.applied_index;
    for n in [&n2, &n3] {
        wait_view(n, "a new member catches up", |v| {
            v.applied_index >= leader_applied && v.leader_id == 1
        })
        .await;
    }
    let r = n1.members().await;
    assert!(r.members.iter().all(|m| m.lag <= 1), "lags: {r:?}");
    beat.abort();

    // The leader goes: one of the new members leads, with every record.
    n1.stop().await;
    let mut g = client_of(&[&n2, &n3]);
    let vols = g
        .list_volumes(pb::ListVolumesRequest {})
        .await
        .expect("list volumes through the new leader")
        .into_inner()
        .volumes;
    assert_eq!(vols.len(), 20, "{vols:?}");
    // And takes changes.
    g.register_chunk(pb::RegisterChunkRequest {
        portal: "127.0.0.2:3260".into(),
        data_addr: "127.0.0.2:7100".into(),
        capacity_bytes: 1 << 40,
        ..Default::default()
    })
    .await
    .expect("a change under the new leader");

    // Replace the dead member: remove it, add a fresh node.
    let leader = if n2.group.wait_serving(Duration::from_secs(1)).await {
        &n2
    } else {
        &n3
    };
    let mut rc = MetaRaftClient::connect(format!("http://{}", leader.addr))
        .await
        .unwrap();
    let r = rc
        .remove_meta(pb::RemoveMetaRequest { id: 1 })
        .await
        .expect("remove meta 1")
        .into_inner();
    assert_eq!(voters(&r), BTreeSet::from([2, 3]), "{r:?}");
    let mut n4 = Node::start(dirs[3].path(), 4, true).await;
    let r = add(leader, 4, n4.addr).await;
    assert_eq!(voters(&r), BTreeSet::from([2, 3, 4]), "{r:?}");
    let applied = leader.members().await.applied_index;
    wait_view(&n4, "the replacement catches up", |v| {
        v.applied_index >= applied
    })
    .await;
    // A member cannot be moved to another address by adding it again.
    let e = rc
        .add_meta(pb::AddMetaRequest {
            id: 4,
            addr: "127.0.0.1:1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");

    for n in [&mut n2, &mut n3, &mut n4] {
        n.stop().await;
    }
}

#[tokio::test]
async fn a_follower_points_at_the_leader() {
    let d1 = tempfile::tempdir().unwrap();
    let d2 = tempfile::tempdir().unwrap();
    let mut n1 = Node::start(d1.path(), 1, false).await;
    assert!(n1.group.wait_serving(Duration::from_secs(10)).await);
    let mut n2 = Node::start(d2.path(), 2, true).await;
    add(&n1, 2, n2.addr).await;
    wait_view(&n2, "the follower knows the leader", |v| v.leader_id == 1).await;
    let mut c = MetaClient::connect(format!("http://{}", n2.addr))
        .await
        .unwrap();
    let e = c
        .cluster_status(pb::ClusterStatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    let hint = e
        .metadata()
        .get(ironblock_proto::meta_channel::LEADER_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    assert_eq!(hint, Some(n1.addr.to_string()));
    // A client given only the follower reaches the leader through the hint.
    let ch = MetaChannel::new(&n2.addr.to_string(), Duration::from_secs(5), |e| e).unwrap();
    let s = MetaClient::new(ch)
        .cluster_status(pb::ClusterStatusRequest {})
        .await
        .expect("status via the hint");
    assert!(!s.into_inner().cluster_id.is_empty());
    n2.stop().await;
    n1.stop().await;
}

/// Group commit: calls that arrive while an entry is in flight share the
/// next one (so the state lock is not held across the log round trip),
/// every one of them takes effect once, and the followers hold the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_changes_share_log_entries_and_each_takes_effect_once() {
    const CALLS: usize = 40;
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut n1 = Node::start(dirs[0].path(), 1, false).await;
    assert!(n1.group.wait_serving(Duration::from_secs(10)).await);
    let mut n2 = Node::start(dirs[1].path(), 2, true).await;
    let mut n3 = Node::start(dirs[2].path(), 3, true).await;
    add(&n1, 2, n2.addr).await;
    add(&n1, 3, n3.addr).await;
    let mut c = n1.client().await;
    let chunk = register(&mut c, 1).await;
    let beat = heartbeater(c.clone(), &chunk, true);

    let before = n1.group.raft.metrics().borrow().last_log_index.unwrap_or(0);
    let started = std::time::Instant::now();
    let calls: Vec<_> = (0..CALLS)
        .map(|k| {
            let mut c = c.clone();
            tokio::spawn(async move {
                c.create_volume(pb::CreateVolumeRequest {
                    name: format!("gc{k}"),
                    size_bytes: 64 << 20,
                    replicas: 1,
                    thin: true,
                })
                .await
                .map(|r| r.into_inner().volume.map(|v| v.id))
            })
        })
        .collect();
    let mut ids = BTreeSet::new();
    for call in calls {
        let id = call.await.unwrap().expect("CreateVolume");
        ids.insert(id.expect("a volume in the answer"));
    }
    let entries = n1.group.raft.metrics().borrow().last_log_index.unwrap_or(0) - before;
    println!(
        "{CALLS} concurrent CreateVolume calls went through {entries} log entries in {:?}",
        started.elapsed()
    );
    assert_eq!(ids.len(), CALLS, "every call created its own volume");
    assert!(
        (entries as usize) < CALLS,
        "{CALLS} concurrent calls took {entries} log entries: none shared one"
    );
    let vols = c
        .list_volumes(pb::ListVolumesRequest {})
        .await
        .unwrap()
        .into_inner()
        .volumes;
    assert_eq!(vols.len(), CALLS, "{vols:?}");
    // Each follower applied them all: the leader, stopped, leaves one of
    // them leading with the same volumes.
    beat.abort();
    n1.stop().await;
    let after: BTreeSet<String> = client_of(&[&n2, &n3])
        .list_volumes(pb::ListVolumesRequest {})
        .await
        .expect("list volumes through the new leader")
        .into_inner()
        .volumes
        .into_iter()
        .map(|v| v.id)
        .collect();
    assert_eq!(after, ids);
    for n in [&mut n2, &mut n3] {
        n.stop().await;
    }
}
