//! Shared by meta's integration tests: a meta server in process on
//! 127.0.0.1:0 and the calls a chunk makes (register, heartbeat).

// Each test binary uses its own subset.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::Duration;

use ironblock_meta::raft::Group;
use ironblock_meta::state::State;
use ironblock_meta::{Config, MetaServer};
use ironblock_proto::v1 as pb;
use ironblock_proto::v1::meta_client::MetaClient;
use tokio::sync::{oneshot, Mutex};
use tokio::task::JoinHandle;
use tonic::transport::Channel;

pub const GIB: u64 = 1 << 30;

/// A meta server running in this process.
pub struct Running {
    pub addr: SocketAddr,
    /// Its meta group handle.
    pub group: Group,
    /// Weak: meta's shutdown waits (up to 5 s) until nobody else holds
    /// the state, so the test must not.
    state: Weak<Mutex<State>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Running {
    /// Meta on `dir` with the default configuration.
    pub async fn start(dir: &Path) -> Running {
        Running::with(Config::new(
            "127.0.0.1:0".parse().unwrap(),
            dir.to_path_buf(),
        ))
        .await
    }

    /// Meta on `dir` declaring a silent chunk dead after `liveness`.
    pub async fn start_with_liveness(dir: &Path, liveness: Duration) -> Running {
        let mut config = Config::new("127.0.0.1:0".parse().unwrap(), dir.to_path_buf());
        config.liveness_timeout = liveness;
        Running::with(config).await
    }

    async fn with(config: Config) -> Running {
        let running = Running::spawn(config).await;
        // A lone voter elects itself at once; calls wait for that.
        assert!(
            running.group.wait_serving(Duration::from_secs(10)).await,
            "meta did not start leading its group within 10 s"
        );
        running
    }

    /// Meta with `config`, started without waiting for it to serve (a
    /// member that waits to be added to a group never does on its own).
    pub async fn spawn(config: Config) -> Running {
        let server = match MetaServer::bind(config).await {
            Ok(s) => s,
            Err(e) => panic!("bind meta: {e}"),
        };
        let addr = server.local_addr().unwrap();
        let state = Arc::downgrade(&server.state());
        let group = server.group();
        let (stop, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server
                .run(async {
                    let _ = rx.await;
                })
                .await
                .expect("meta run");
        });
        Running {
            addr,
            group,
            state,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// A client of it (bounded: 5 s to connect).
    pub async fn client(&self) -> MetaClient<Channel> {
        let url = format!("http://{}", self.addr);
        tokio::time::timeout(Duration::from_secs(5), MetaClient::connect(url))
            .await
            .expect("connect timeout")
            .expect("connect")
    }

    /// Operations committed so far.
    pub async fn committed_ops(&self) -> u64 {
        let state = self.state.upgrade().expect("meta is running");
        let ops = state.lock().await.status().committed_ops;
        ops
    }

    /// Hold the state lock (what a long mutation does) until the guard
    /// drops.
    pub async fn hold_state(&self) -> tokio::sync::OwnedMutexGuard<State> {
        let state = self.state.upgrade().expect("meta is running");
        state.lock_owned().await
    }

    /// Stops it (bounded: 15 s).
    pub async fn stop(mut self) {
        self.halt().await;
    }

    /// Stops it in place (bounded: 15 s); a second call does nothing.
    pub async fn halt(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(15), t)
                .await
                .expect("meta did not stop")
                .expect("meta task");
        }
    }
}

/// CreateVolume that must succeed; the created volume.
pub async fn create_volume(
    c: &mut MetaClient<Channel>,
    name: &str,
    size_bytes: u64,
    replicas: u32,
    thin: bool,
) -> pb::Volume {
    c.create_volume(pb::CreateVolumeRequest {
        name: name.into(),
        size_bytes,
        replicas,
        thin,
    })
    .await
    .expect("CreateVolume")
    .into_inner()
    .volume
    .expect("volume in the response")
}

/// Registers chunk `n` (portal 127.0.0.n:3260, 100 GiB).
pub async fn register(c: &mut MetaClient<Channel>, n: u8) -> pb::RegisterChunkResponse {
    c.register_chunk(pb::RegisterChunkRequest {
        portal: format!("127.0.0.{n}:3260"),
        data_addr: format!("127.0.0.{n}:7100"),
        capacity_bytes: 100 * GIB,
        ..Default::default()
    })
    .await
    .expect("register")
    .into_inner()
}

/// A chunk's heartbeat loop every 50 ms. With `apply`, it reports the last
/// revision meta announced as applied (what a real chunk does after
/// dropping its cached extent views, so CreateSnapshot's barrier passes);
/// without, it stays alive but never confirms (a stuck one). Bounded: stops
/// after 60 s or on the first error; abort it when done.
pub fn heartbeater(
    mut c: MetaClient<Channel>,
    reg: &pb::RegisterChunkResponse,
    apply: bool,
) -> JoinHandle<()> {
    let (cluster_id, chunk_id) = (reg.cluster_id.clone(), reg.chunk_id);
    tokio::spawn(async move {
        let mut applied = 0;
        for _ in 0..1200 {
            let Ok(r) = c
                .heartbeat(pb::HeartbeatRequest {
                    cluster_id: cluster_id.clone(),
                    chunk_id,
                    used_bytes: 0,
                    applied_revision: applied,
                    io: Vec::new(),
                })
                .await
            else {
                return;
            };
            if apply {
                applied = r.into_inner().revision;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}
