//! The built `ironblock` binary against an in-process meta on 127.0.0.1:0
//! with three fake chunks (registered over gRPC, heartbeating from a task).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use ironblock_meta::{Config, MetaServer};
use ironblock_proto::v1 as pb;
use ironblock_proto::v1::meta_client::MetaClient;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const GIB: u64 = 1 << 30;

struct Cluster {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    beats: JoinHandle<()>,
}

impl Cluster {
    /// Meta plus `chunks` fake chunks that heartbeat every 100 ms and report
    /// the revision they last saw as applied.
    async fn start(dir: &Path, chunks: u8) -> Cluster {
        let mut config = Config::new("127.0.0.1:0".parse().unwrap(), dir.to_path_buf());
        config.liveness_timeout = Duration::from_secs(30);
        let server = MetaServer::bind(config).await.expect("bind meta");
        let addr = server.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server
                .run(async {
                    let _ = rx.await;
                })
                .await
                .expect("meta run");
        });
        let mut c = tokio::time::timeout(
            Duration::from_secs(5),
            MetaClient::connect(format!("http://{addr}")),
        )
        .await
        .expect("connect timeout")
        .expect("connect");
        let mut ids = Vec::new();
        for n in 1..=chunks {
            let r = c
                .register_chunk(pb::RegisterChunkRequest {
                    portal: format!("127.0.0.{n}:3260"),
                    data_addr: format!("127.0.0.{n}:7100"),
                    capacity_bytes: 100 * GIB,
                    ..Default::default()
                })
                .await
                .expect("register")
                .into_inner();
            ids.push((r.cluster_id, r.chunk_id));
        }
        let beats = tokio::spawn(async move {
            let mut seen = vec![0u64; ids.len()];
            loop {
                for (i, (cluster_id, chunk_id)) in ids.iter().enumerate() {
                    let req = pb::HeartbeatRequest {
                        cluster_id: cluster_id.clone(),
                        chunk_id: *chunk_id,
                        used_bytes: 0,
                        applied_revision: seen[i],
                        io: Vec::new(),
                    };
                    if let Ok(r) = c.heartbeat(req).await {
                        seen[i] = r.into_inner().revision;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Cluster {
            addr,
            stop: Some(tx),
            task,
            beats,
        }
    }

    async fn stop(mut self) {
        self.beats.abort();
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("meta did not stop")
            .expect("meta task");
    }
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    fn json(&self) -> Value {
        match serde_json::from_str(&self.stdout) {
            Ok(v) => v,
            Err(e) => panic!("not JSON ({e}): {}\nstderr: {}", self.stdout, self.stderr),
        }
    }

    /// Asserts success and returns self.
    fn ok(self) -> Out {
        assert_eq!(
            self.code, 0,
            "failed: stdout {:?} stderr {:?}",
            self.stdout, self.stderr
        );
        self
    }

    /// Asserts exit code `code` and a one-line stderr containing `needle`.
    fn fails(&self, code: i32, needle: &str) {
        assert_eq!(
            self.code, code,
            "exit code; stdout {:?} stderr {:?}",
            self.stdout, self.stderr
        );
        assert!(
            self.stderr.contains(needle),
            "stderr {:?} lacks {needle:?}",
            self.stderr
        );
    }
}

/// Runs `ironblock` with IRONBLOCK_META set to `meta` (bounded in time).
async fn ib(meta: &str, args: &[&str]) -> Out {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ironblock"))
        .args(args)
        .env("IRONBLOCK_META", meta)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn ironblock");
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("ironblock {args:?} hung"))
        .expect("wait");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_lifecycle_with_snapshots_clones_and_acls() {
    let dir = tempfile::tempdir().unwrap();
    let cl = Cluster::start(dir.path(), 3).await;
    let m = cl.addr.to_string();
    let m = m.as_str();

    // Create, idempotent re-create, conflicting re-create.
    let v = ib(
        m,
        &[
            "--output", "json", "volume", "create", "db", "--size", "1GiB",
        ],
    )
    .await
    .ok()
    .json();
    assert_eq!(v["name"], "db");
    assert_eq!(v["size_bytes"], GIB);
    assert_eq!(v["replicas"], 2);
    assert_eq!(v["thin"], false);
    let id = v["id"].as_str().unwrap().to_string();
    let again = ib(
        m,
        &["volume", "create", "db", "--size", "1G", "--output", "json"],
    )
    .await
    .ok()
    .json();
    assert_eq!(again["id"], id.as_str());
    ib(m, &["volume", "create", "db", "--size", "2GiB"])
        .await
        .fails(1, "create volume \"db\": already exists");
    ib(
        m,
        &[
            "volume",
            "create",
            "scratch",
            "--size",
            "512M",
            "--replicas",
            "1",
            "--thin",
        ],
    )
    .await
    .ok();

    // List (table and JSON).
    let t = ib(m, &["volume", "list"]).await.ok().stdout;
    let header = t.lines().next().unwrap();
    assert!(header.starts_with("NAME") && header.contains("SIZE"), "{t}");
    assert!(
        t.lines()
            .any(|l| l.starts_with("db ") && l.contains("1 GiB")),
        "{t}"
    );
    assert!(
        t.lines()
            .any(|l| l.starts_with("scratch ") && l.contains("512 MiB")),
        "{t}"
    );
    let l = ib(m, &["volume", "list", "--output", "json"])
        .await
        .ok()
        .json();
    let names: Vec<&str> = l
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 2);
    assert!(names.contains(&"db") && names.contains(&"scratch"));

    // Show by name and by id.
    let s = ib(m, &["volume", "show", "db", "--output", "json"])
        .await
        .ok()
        .json();
    assert_eq!(s["id"], id.as_str());
    assert!(s["target_iqn"].as_str().unwrap().starts_with("iqn."), "{s}");
    assert!(s["lun"].is_u64());
    let mut portals: Vec<&str> = s["portals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    portals.sort();
    assert_eq!(
        portals,
        ["127.0.0.1:3260", "127.0.0.2:3260", "127.0.0.3:3260"]
    );
    assert_eq!(s["vpd_serial"].as_str().unwrap().len(), 32);
    assert_eq!(s["naa_id"].as_str().unwrap().len(), 32);
    assert_eq!(s["acl"], Value::Array(vec![]));
    assert_eq!(s["acl_read_only"], Value::Array(vec![]));
    assert_eq!(s["acl_entries"], Value::Array(vec![]));
    assert_eq!(s["snapshots"], Value::Array(vec![]));
    assert!(s["parent_snapshot_id"].is_null());
    let by_id = ib(m, &["volume", "show", &id, "--output", "json"])
        .await
        .ok()
        .json();
    assert_eq!(by_id["name"], "db");
    let human = ib(m, &["volume", "show", "db"]).await.ok().stdout;
    assert!(
        human.contains("127.0.0.2:3260") && human.contains("1 GiB"),
        "{human}"
    );

    // Resize (grow; shrink refused).
    let r = ib(
        m,
        &[
            "--output", "json", "volume", "resize", "db", "--size", "2GiB",
        ],
    )
    .await
    .ok()
    .json();
    assert_eq!(r["size_bytes"], 2 * GIB);
    assert_eq!(r["capacity_generation"], 1);
    ib(m, &["volume", "resize", "db", "--size", "1GiB"])
        .await
        .fails(1, "resize volume \"db\"");

    // ACLs.
    let a = ib(
        m,
        &[
            "acl",
            "add",
            "db",
            "iqn.2024-01.org.example:host1",
            "--output",
            "json",
        ],
    )
    .await
    .ok()
    .json();
    assert_eq!(
        a["acl"],
        serde_json::json!(["iqn.2024-01.org.example:host1"])
    );
    assert_eq!(a["volume_id"], id.as_str());
    ib(m, &["acl", "add", &id, "iqn.2024-01.org.example:host2"])
        .await
        .ok();
    let t = ib(m, &["acl", "list", "db"]).await.ok().stdout;
    assert_eq!(
        t.lines().collect::<Vec<_>>(),
        [
            "INITIATOR                      MODE",
            "iqn.2024-01.org.example:host1  read-write",
            "iqn.2024-01.org.example:host2  read-write"
        ]
    );

    // Read-only entries: idempotent with the same mode, refused with the
    // other one (pointing at set-mode), shown by volume show.
    let reader = "iqn.2024-01.org.example:reader";
    for _ in 0..2 {
        let a = ib(
            m,
            &[
                "acl",
                "add",
                "db",
                reader,
                "--read-only",
                "--output",
                "json",
            ],
        )
        .await
        .ok()
        .json();
        assert_eq!(a["acl_read_only"], serde_json::json!([reader]));
        assert_eq!(a["acl"].as_array().unwrap().len(), 3);
    }
    ib(m, &["acl", "add", "db", reader])
        .await
        .fails(1, "set-mode");
    ib(
        m,
        &[
            "acl",
            "add",
            "db",
            "iqn.2024-01.org.example:host1",
            "--read-only",
        ],
    )
    .await
    .fails(1, "already exists");
    let s = ib(m, &["volume", "show", "db", "--output", "json"])
        .await
        .ok()
        .json();
    assert_eq!(s["acl_read_only"], serde_json::json!([reader]));
    assert!(
        s["acl_entries"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!({"initiator": reader, "mode": "read-only"})),
        "{s}"
    );
    let t = ib(m, &["volume", "show", "db"]).await.ok().stdout;
    assert!(t.contains(&format!("{reader} (read-only)")), "{t}");
    assert!(
        t.contains("iqn.2024-01.org.example:host1 (read-write)"),
        "{t}"
    );
    let a = ib(
        m,
        &[
            "acl",
            "set-mode",
            "db",
            reader,
            "read-write",
            "--output",
            "json",
        ],
    )
    .await
    .ok()
    .json();
    assert_eq!(a["acl_read_only"], serde_json::json!([]));
    ib(m, &["acl", "set-mode", "db", reader, "ro"]).await.ok();
    let t = ib(m, &["acl", "list", "db"]).await.ok().stdout;
    assert!(
        t.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == [reader, "read-only"]),
        "{t}"
    );
    ib(m, &["acl", "remove", "db", reader]).await.ok();
    let a = ib(
        m,
        &[
            "acl",
            "remove",
            "db",
            "iqn.2024-01.org.example:host1",
            "--output",
            "json",
        ],
    )
    .await
    .ok()
    .json();
    assert_eq!(
        a["acl"],
        serde_json::json!(["iqn.2024-01.org.example:host2"])
    );
    let a = ib(m, &["acl", "list", "db", "--output", "json"])
        .await
        .ok()
        .json();
    assert_eq!(
        a["acl"],
        serde_json::json!(["iqn.2024-01.org.example:host2"])
    );

    // Snapshots and clones.
    let snap = ib(
        m,
        &["snapshot", "create", "db", "db-snap1", "--output", "json"],
    )
    .await
    .ok()
    .json();
    assert_eq!(snap["name"], "db-snap1");
    assert_eq!(snap["volume_id"], id.as_str());
    assert_eq!(snap["size_bytes"], 2 * GIB);
    let snap_id = snap["id"].as_str().unwrap().to_string();
    let t = ib(m, &["snapshot", "list"]).await.ok().stdout;
    assert!(
        t.lines()
            .any(|l| l.starts_with("db-snap1 ") && l.contains(" db ")),
        "{t}"
    );
    let l = ib(m, &["snapshot", "list", "db", "--output", "json"])
        .await
        .ok()
        .json();
    assert_eq!(l.as_array().unwrap().len(), 1);
    let l = ib(m, &["snapshot", "list", "scratch", "--output", "json"])
        .await
        .ok()
        .json();
    assert_eq!(l, Value::Array(vec![]));
    let s = ib(m, &["volume", "show", "db", "--output", "json"])
        .await
        .ok()
        .json();
    assert_eq!(s["snapshots"][0]["id"], snap_id.as_str());

    let c = ib(
        m,
        &["volume", "clone", "db-snap1", "db-copy", "--output", "json"],
    )
    .await
    .ok()
    .json();
    assert_eq!(c["parent_snapshot_id"], snap_id.as_str());
    assert_eq!(c["size_bytes"], 2 * GIB);
    assert_eq!(c["replicas"], 2);
    let c2 = ib(
        m,
        &[
            "volume",
            "clone",
            &snap_id,
            "db-big",
            "--size",
            "3GiB",
            "--replicas",
            "3",
            "--thin",
            "--output",
            "json",
        ],
    )
    .await
    .ok()
    .json();
    assert_eq!(c2["size_bytes"], 3 * GIB);
    assert_eq!(c2["replicas"], 3);
    assert_eq!(c2["thin"], true);

    // A volume with snapshots cannot go; a snapshot with clones cannot go.
    ib(m, &["volume", "delete", "db"])
        .await
        .fails(1, "delete volume \"db\"");
    ib(m, &["snapshot", "delete", "db-snap1"])
        .await
        .fails(1, "delete snapshot \"db-snap1\"");
    for v in ["db-copy", "db-big"] {
        let d = ib(m, &["volume", "delete", v, "--output", "json"])
            .await
            .ok()
            .json();
        assert_eq!(d["deleted"], true);
    }
    let d = ib(m, &["snapshot", "delete", &snap_id, "--output", "json"])
        .await
        .ok()
        .json();
    assert_eq!(d["deleted"], true);
    assert_eq!(d["name"], "db-snap1");
    ib(m, &["snapshot", "delete", "db-snap1"])
        .await
        .fails(1, "snapshot \"db-snap1\" not found");
    ib(m, &["snapshot", "delete", "db-snap1", "--ignore-missing"])
        .await
        .ok();
    let out = ib(m, &["volume", "delete", "db"]).await.ok().stdout;
    assert!(out.contains("deleted volume db"), "{out}");
    ib(m, &["volume", "show", "db"])
        .await
        .fails(1, "volume \"db\" not found");
    ib(m, &["volume", "delete", "db"])
        .await
        .fails(1, "volume \"db\" not found");
    let d = ib(
        m,
        &[
            "volume",
            "delete",
            "db",
            "--ignore-missing",
            "--output",
            "json",
        ],
    )
    .await
    .ok()
    .json();
    assert_eq!(d["deleted"], false);
    let l = ib(m, &["volume", "list", "--output", "json"])
        .await
        .ok()
        .json();
    assert_eq!(l.as_array().unwrap().len(), 1);

    cl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_and_status() {
    let dir = tempfile::tempdir().unwrap();
    let cl = Cluster::start(dir.path(), 3).await;
    let m = cl.addr.to_string();
    let m = m.as_str();
    ib(m, &["volume", "create", "v", "--size", "128MiB"])
        .await
        .ok();

    let t = ib(m, &["chunk", "list"]).await.ok().stdout;
    let lines: Vec<&str> = t.lines().collect();
    assert_eq!(lines.len(), 4, "{t}");
    for col in [
        "ID",
        "STATE",
        "PORTAL",
        "DATA",
        "CAPACITY",
        "USED",
        "EXTENTS",
        "LAST HEARTBEAT",
    ] {
        assert!(lines[0].contains(col), "missing {col}: {t}");
    }
    assert!(
        lines[1].contains("alive") && lines[1].contains("100 GiB"),
        "{t}"
    );
    let j = ib(m, &["chunk", "list", "--output", "json"])
        .await
        .ok()
        .json();
    let chunks = j.as_array().unwrap();
    assert_eq!(chunks.len(), 3);
    let extents: u64 = chunks.iter().map(|c| c["extents"].as_u64().unwrap()).sum();
    assert_eq!(extents, 4, "2 extents x 2 replicas: {j}");
    assert_eq!(chunks[0]["state"], "alive");
    assert_eq!(chunks[0]["capacity_bytes"], 100 * GIB);
    assert_eq!(chunks[2]["portal"], "127.0.0.3:3260");
    assert_eq!(chunks[2]["data_addr"], "127.0.0.3:7100");
    assert!(chunks[0]["last_heartbeat_ms_ago"].as_u64().unwrap() < 10_000);

    let s = ib(m, &["status", "--output", "json"]).await.ok().json();
    assert_eq!(s["health"], "ok");
    assert_eq!(s["chunks_alive"], 3);
    assert_eq!(s["volumes"], 1);
    assert_eq!(s["extents"], 2);
    assert_eq!(s["degraded_extents"], 0);
    assert_eq!(s["recovery_queued"], 0);
    assert!(!s["cluster_id"].as_str().unwrap().is_empty());
    let t = ib(m, &["status"]).await.ok().stdout;
    assert!(t.contains("3 alive, 0 dead, 0 draining"), "{t}");
    assert!(t.lines().any(|l| l.starts_with("recovery")), "{t}");

    // Drain a chunk holding extents: it turns draining, recovery moves
    // its extents (tasks queued; nobody runs them here).
    let holder = chunks
        .iter()
        .find(|c| c["extents"].as_u64().unwrap() > 0)
        .unwrap()["id"]
        .as_u64()
        .unwrap()
        .to_string();
    let d = ib(m, &["chunk", "drain", &holder, "--output", "json"])
        .await
        .ok()
        .json();
    assert_eq!(d[0]["state"], "draining");
    let s = ib(m, &["status", "--output", "json"]).await.ok().json();
    assert_eq!(s["chunks_draining"], 1);
    ib(m, &["chunk", "remove", &holder])
        .await
        .fails(1, &format!("remove chunk {holder}"));
    ib(m, &["chunk", "drain", "99"])
        .await
        .fails(1, "chunk 99 not found");
    ib(m, &["chunk", "drain", "x"])
        .await
        .fails(2, "invalid value");

    cl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_replicas_raises_through_recovery_and_lowers() {
    let dir = tempfile::tempdir().unwrap();
    let cl = Cluster::start(dir.path(), 3).await;
    let m = cl.addr.to_string();
    let m = m.as_str();
    ib(
        m,
        &[
            "volume",
            "create",
            "rf",
            "--size",
            "128MiB",
            "--replicas",
            "1",
        ],
    )
    .await
    .ok();

    // Raise: answered at once, both extents short and being copied.
    let r = ib(
        m,
        &["--output", "json", "volume", "set-replicas", "rf", "3"],
    )
    .await
    .ok()
    .json();
    assert_eq!(r["name"], "rf");
    assert_eq!(r["replicas"], 3);
    assert_eq!(r["previous_replicas"], 1);
    assert_eq!(r["replication"]["extents"], 2);
    assert_eq!(r["replication"]["extents_off_factor"], 2);
    assert_eq!(r["replication"]["extents_copying"], 2);
    assert_eq!(r["replication"]["complete"], false);
    let s = ib(m, &["--output", "json", "status"]).await.ok().json();
    assert_eq!(s["health"], "degraded");
    assert_eq!(s["degraded_extents"], 2);
    // The table says the same; waiting gives up (these chunks copy
    // nothing) with exit 1 and one line.
    let human = ib(m, &["volume", "show", "rf"]).await.ok().stdout;
    assert!(human.contains("2 of 2 extents off"), "{human}");
    let o = ib(
        m,
        &[
            "volume",
            "set-replicas",
            "rf",
            "3",
            "--wait",
            "--wait-timeout",
            "1s",
        ],
    )
    .await;
    o.fails(1, "still off the replication factor 3");
    assert_eq!(o.stderr.trim().lines().count(), 1, "{:?}", o.stderr);

    // Play the chunks' recovery workers until meta has nothing left to copy.
    let mut c = MetaClient::connect(format!("http://{m}")).await.unwrap();
    for _ in 0..4 {
        let tasks = c
            .list_recovery_tasks(pb::ListRecoveryTasksRequest { target_chunk: 0 })
            .await
            .unwrap()
            .into_inner()
            .tasks;
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
    let r = ib(
        m,
        &[
            "--output",
            "json",
            "volume",
            "set-replicas",
            "rf",
            "3",
            "--wait",
        ],
    )
    .await
    .ok()
    .json();
    assert_eq!(r["previous_replicas"], 3, "unchanged: a no-op");
    assert_eq!(r["replication"]["complete"], true);
    let human = ib(m, &["volume", "set-replicas", "rf", "3"])
        .await
        .ok()
        .stdout;
    assert!(
        human.contains("previous replicas") && human.contains("complete (2 extents)"),
        "{human}"
    );

    // Lower: complete at once, one member per extent.
    let r = ib(
        m,
        &[
            "--output",
            "json",
            "volume",
            "set-replicas",
            "rf",
            "1",
            "--wait",
        ],
    )
    .await
    .ok()
    .json();
    assert_eq!(
        (r["replicas"].as_u64(), r["previous_replicas"].as_u64()),
        (Some(1), Some(3))
    );
    assert_eq!(r["replication"]["complete"], true);
    let id = r["id"].as_str().unwrap().to_string();
    let ext = c
        .get_extents(pb::GetExtentsRequest {
            volume_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .extents;
    assert!(ext.iter().all(|e| e.replicas.len() == 1), "{ext:?}");
    // By id, too.
    let r = ib(m, &["--output", "json", "volume", "set-replicas", &id, "2"])
        .await
        .ok()
        .json();
    assert_eq!(r["replicas"], 2);
    let s = ib(m, &["--output", "json", "volume", "show", "rf"])
        .await
        .ok()
        .json();
    assert_eq!(s["replicas"], 2);
    assert_eq!(s["replication"]["complete"], false);

    // Errors: one line, exit 1 (meta refused) or 2 (usage).
    ib(m, &["volume", "set-replicas", "nope", "2"])
        .await
        .fails(1, "volume \"nope\" not found");
    ib(m, &["volume", "set-replicas", "rf", "4"])
        .await
        .fails(1, "set the replication factor of \"rf\" to 4");
    ib(m, &["volume", "set-replicas", "rf", "0"])
        .await
        .fails(1, "replication factor must be 1..=3");
    ib(m, &["volume", "set-replicas", "rf", "three"])
        .await
        .fails(2, "invalid value");
    cl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_one_line_with_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let cl = Cluster::start(dir.path(), 2).await;
    let m = cl.addr.to_string();
    let m = m.as_str();

    let o = ib(m, &["volume", "show", "nope"]).await;
    o.fails(1, "volume \"nope\" not found");
    assert_eq!(o.stderr.trim().lines().count(), 1, "{:?}", o.stderr);
    assert!(o.stdout.is_empty());
    ib(m, &["volume", "resize", "nope", "--size", "1G"])
        .await
        .fails(1, "volume \"nope\" not found");
    ib(m, &["snapshot", "create", "nope", "s"])
        .await
        .fails(1, "volume \"nope\" not found");
    ib(m, &["acl", "add", "nope", "iqn.2024-01.org.example:x"])
        .await
        .fails(1, "volume \"nope\" not found");
    ib(m, &["volume", "clone", "nope", "c"])
        .await
        .fails(1, "snapshot \"nope\" not found");
    ib(m, &["volume", "create", "z", "--size", "0"])
        .await
        .fails(1, "invalid argument");
    ib(
        m,
        &["volume", "create", "r", "--size", "1G", "--replicas", "3"],
    )
    .await
    .fails(1, "create volume \"r\"");
    // Two chunks cannot hold three replicas.
    ib(
        m,
        &["volume", "create", "two", "--size", "1G", "--replicas", "2"],
    )
    .await
    .ok();
    ib(m, &["volume", "set-replicas", "two", "3"])
        .await
        .fails(1, "needs 3 alive chunks");
    ib(m, &["volume", "create", "z", "--size", "lots"])
        .await
        .fails(2, "invalid size");
    ib(m, &["volume", "create", "z"]).await.fails(2, "--size");
    ib(m, &["volume", "frobnicate"])
        .await
        .fails(2, "frobnicate");
    ib(m, &["--output", "yaml", "status"])
        .await
        .fails(2, "yaml");
    // --meta wins over the environment; http:// is accepted.
    let url = format!("http://{m}");
    ib("127.0.0.1:1", &["--meta", &url, "status"]).await.ok();
    cl.stop().await;

    // Nobody listens on a just-freed port.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let gone = format!("127.0.0.1:{port}");
    let o = ib(&gone, &["--timeout", "2s", "volume", "list"]).await;
    o.fails(1, &format!("cannot reach meta at {gone}"));
    assert_eq!(o.stderr.trim().lines().count(), 1, "{:?}", o.stderr);
}
