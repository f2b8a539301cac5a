//! A minimal Prometheus text endpoint (`GET /metrics`) over plain HTTP/1.x.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::debug;

use crate::raft::Group;
use crate::service::SharedState;
use crate::state::{ChunkState, ChunkView, ClusterStatus, Health};

/// Renders the cluster counters in the Prometheus text format.
pub fn render(s: &ClusterStatus, chunks: &[ChunkView]) -> String {
    let mut o = String::new();
    let mut gauge = |name: &str, help: &str, v: u64| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
    };
    gauge(
        "ironblock_meta_health",
        "Cluster health: 0 ok, 1 degraded, 2 critical.",
        match s.health {
            Health::Ok => 0,
            Health::Degraded => 1,
            Health::Critical => 2,
        },
    );
    gauge("ironblock_meta_volumes", "Volumes.", s.volumes);
    gauge("ironblock_meta_snapshots", "Snapshots.", s.snapshots);
    gauge("ironblock_meta_targets", "iSCSI targets.", s.targets);
    gauge("ironblock_meta_extents", "Extents.", s.extents);
    gauge(
        "ironblock_meta_degraded_extents",
        "Extents below their replication factor.",
        s.degraded_extents,
    );
    gauge(
        "ironblock_meta_unavailable_extents",
        "Extents with no live replica.",
        s.unavailable_extents,
    );
    gauge(
        "ironblock_meta_recovery_queued",
        "Recovery tasks queued.",
        s.recovery_queued,
    );
    gauge("ironblock_meta_revision", "Metadata revision.", s.revision);
    let _ = writeln!(
        o,
        "# HELP ironblock_meta_in_force_waits_total Calls that waited until their change was in force on every chunk and VIP holder, by how the wait ended.\n\
         # TYPE ironblock_meta_in_force_waits_total counter\n\
         ironblock_meta_in_force_waits_total{{result=\"acknowledged\"}} {}\n\
         ironblock_meta_in_force_waits_total{{result=\"lease_ran_out\"}} {}\n\
         # HELP ironblock_meta_in_force_wait_seconds_total Time spent in those waits.\n\
         # TYPE ironblock_meta_in_force_wait_seconds_total counter\n\
         ironblock_meta_in_force_wait_seconds_total {:.3}",
        s.in_force_waits - s.in_force_lapsed,
        s.in_force_lapsed,
        s.in_force_wait_ms as f64 / 1000.0
    );
    let _ = writeln!(
        o,
        "# HELP ironblock_meta_committed_ops_total Metadata records written by this process.\n\
         # TYPE ironblock_meta_committed_ops_total counter\n\
         ironblock_meta_committed_ops_total {}",
        s.committed_ops
    );
    let _ = writeln!(
        o,
        "# HELP ironblock_meta_recovery_total Recovery tasks finished, by result.\n\
         # TYPE ironblock_meta_recovery_total counter\n\
         ironblock_meta_recovery_total{{result=\"ok\"}} {}\n\
         ironblock_meta_recovery_total{{result=\"failed\"}} {}",
        s.recovery_completed, s.recovery_failed
    );
    let _ = writeln!(
        o,
        "# HELP ironblock_meta_chunks Chunks by state.\n# TYPE ironblock_meta_chunks gauge"
    );
    for (state, v) in [
        ("alive", s.chunks_alive),
        ("dead", s.chunks_dead),
        ("draining", s.chunks_draining),
        ("removed", s.chunks_removed),
    ] {
        let _ = writeln!(o, "ironblock_meta_chunks{{state=\"{state}\"}} {v}");
    }
    let _ = writeln!(
        o,
        "# HELP ironblock_meta_chunk_extents Extent replicas per chunk.\n\
         # TYPE ironblock_meta_chunk_extents gauge"
    );
    for c in chunks
        .iter()
        .filter(|c| c.record.state != ChunkState::Removed)
    {
        let _ = writeln!(
            o,
            "ironblock_meta_chunk_extents{{chunk=\"{}\"}} {}",
            c.record.id, c.extents
        );
    }
    o
}

/// Serves `GET /metrics` on `listener` until `stop` flips.
pub async fn serve_metrics(
    listener: TcpListener,
    state: SharedState,
    group: Option<Group>,
    now: impl Fn() -> Instant + Send + Sync + 'static,
    mut stop: watch::Receiver<bool>,
) {
    let now = std::sync::Arc::new(now);
    loop {
        let (sock, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    debug!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let state = state.clone();
        let group = group.clone();
        let now = now.clone();
        tokio::spawn(async move {
            let res = tokio::time::timeout(
                Duration::from_secs(5),
                answer(sock, &state, group.as_ref(), now()),
            )
            .await;
            if !matches!(res, Ok(Ok(()))) {
                debug!(%peer, "metrics request failed or timed out");
            }
        });
    }
}

/// The meta group's gauges: what an operator alarms on (no leader: no
/// quorum, the data path fences).
pub fn render_group(g: &Group, now: Instant) -> String {
    let m = g.raft.metrics().borrow().clone();
    let voters = m.membership_config.membership().voter_ids().count() as u64;
    let mut o = String::new();
    let mut gauge = |name: &str, help: &str, v: u64| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
    };
    gauge(
        "ironblock_meta_raft_serving",
        "1 if this node leads the meta group and serves (quorum acknowledged it within the leader lease).",
        u64::from(g.serving(now).is_ok()),
    );
    gauge(
        "ironblock_meta_raft_leader_known",
        "1 if this node knows a leader of the meta group; 0 during an election or without a quorum.",
        u64::from(m.current_leader.is_some()),
    );
    gauge("ironblock_meta_raft_term", "Raft term.", m.current_term);
    gauge(
        "ironblock_meta_raft_applied_index",
        "Last log index applied here.",
        m.last_applied.map(|l| l.index).unwrap_or(0),
    );
    gauge(
        "ironblock_meta_raft_voters",
        "Voters in the meta group.",
        voters,
    );
    o
}

async fn answer(
    mut sock: TcpStream,
    state: &SharedState,
    group: Option<&Group>,
    now: Instant,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, body) = if method != "GET" {
        ("405 Method Not Allowed", String::from("GET only\n"))
    } else if path != "/metrics" && path != "/" {
        ("404 Not Found", String::from("try /metrics\n"))
    } else {
        let group = group.map(|g| render_group(g, now)).unwrap_or_default();
        let st = state.lock().await;
        let mut body = render(&st.status(), &st.list_chunks(now));
        body.push_str(&group);
        ("200 OK", body)
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await?;
    sock.write_all(body.as_bytes()).await?;
    sock.shutdown().await
}
