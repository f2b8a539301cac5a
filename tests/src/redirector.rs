//! Redirector processes for the VIP tests: [`RedirectorProcess`] runs
//! `ironblock-redirector` (re-exported from `cluster`) with a VIP portal on
//! 127.0.0.100 ([`vip_addr`]), plus small helpers the VIP tests share
//! (metric parsing, bounded waits, settling chunks on a revision, running
//! libiscsi's tools).

use std::process::Command;
use std::time::{Duration, Instant};

use crate::cluster::{Admin, ChunkProcess};
use crate::require_tool;

pub use crate::cluster::{loopback_vip as vip_addr, metric_value, RedirectorProcess};

/// Wait (bounded) until `cond` holds; false on timeout.
pub async fn wait_for<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Wait until every chunk applied meta's current revision.
pub async fn settle(admin: &mut Admin, chunks: &[ChunkProcess]) {
    let rev = admin.revision().await;
    for c in chunks {
        assert!(
            c.wait_applied(rev, Duration::from_secs(30)).await,
            "chunk {} did not apply revision {rev}; log:\n{}",
            c.chunk_id(),
            c.log_tail()
        );
    }
}

/// Successful logins a chunk's iSCSI target served.
pub async fn chunk_logins(c: &ChunkProcess) -> f64 {
    metric_value(
        &c.metrics_text().await,
        "ironblock_target_logins_total{outcome=\"success\"}",
    )
    .unwrap_or(0.0)
}

/// Run a libiscsi tool; (success, stdout + stderr).
pub fn run_tool(tool: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(require_tool(tool, "libiscsi-bin"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {tool}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}
