//! What an initiator sees through the VIP and the chunk portals, for the
//! in-force test and the ACL propagation benchmark: the cluster they run
//! on ([`VipCluster`]), discovery through the VIP, a login + INQUIRY
//! through a chunk portal, and latency summaries.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;

use crate::cluster::{start_chunks, ChunkProcess, MetaProcess, RedirectorProcess};
use crate::initiator::{LoginOptions, Session};

/// Meta (3 s liveness), three chunks and one redirector serving a VIP on
/// 127.0.0.100, every process on loopback.
pub struct VipCluster {
    pub meta: MetaProcess,
    pub chunks: Vec<ChunkProcess>,
    pub vip: SocketAddr,
    pub redirector: RedirectorProcess,
}

impl VipCluster {
    /// Starts it in `dir` and waits (bounded) until the redirector serves
    /// the VIP with all three chunks in its view; `name` names the
    /// redirector.
    pub async fn start(dir: &Path, name: &str) -> VipCluster {
        let meta = MetaProcess::start(dir, Duration::from_secs(3));
        let chunks = start_chunks(&meta, dir, 3);
        let vip = crate::cluster::loopback_vip();
        let redirector = RedirectorProcess::start(&meta, vip, name, dir);
        assert!(
            redirector
                .wait_serving(chunks.len(), Duration::from_secs(30))
                .await,
            "the redirector did not serve the VIP with {} chunks:\n{}",
            chunks.len(),
            redirector.log_tail()
        );
        VipCluster {
            meta,
            chunks,
            vip,
            redirector,
        }
    }

    /// The tails of every process's log, for a failure message.
    pub fn logs(&self) -> String {
        let mut s = format!("meta log:\n{}\n", self.meta.log_tail());
        for c in &self.chunks {
            s += &format!("chunk {} log:\n{}\n", c.chunk_id(), c.log_tail());
        }
        s + &format!("redirector log:\n{}", self.redirector.log_tail())
    }
}

/// INQUIRY (standard data): the LUN is there for this session's initiator
/// (peripheral qualifier 0, direct-access device), not masked.
pub async fn inquiry_sees_the_lun(s: &Session, lun: u64) -> Result<(), String> {
    let r = s
        .scsi(lun, &[0x12, 0, 0, 0, 96, 0], Bytes::new(), 96)
        .await
        .map_err(|e| format!("INQUIRY failed: {e:#}"))?;
    match (r.status, r.data.first()) {
        (0, Some(0x00)) => Ok(()),
        (st, b) => Err(format!("INQUIRY status {st}, byte 0 {b:?}")),
    }
}

/// Log in as `ini` to `target` at `portal` and check INQUIRY sees `lun`;
/// the session on success.
pub async fn login_sees_the_lun(
    portal: SocketAddr,
    ini: &str,
    target: &str,
    lun: u64,
) -> Result<Session, String> {
    let s = Session::login(portal, &LoginOptions::normal(ini, target))
        .await
        .map_err(|e| format!("login refused: {e:#}"))?;
    inquiry_sees_the_lun(&s, lun).await?;
    Ok(s)
}

/// Whether discovery through `vip` as `ini` lists `target`.
pub async fn discovery_lists(vip: SocketAddr, ini: &str, target: &str) -> Result<bool, String> {
    let d = Session::login(vip, &LoginOptions::discovery(ini))
        .await
        .map_err(|e| format!("discovery login failed: {e:#}"))?;
    let found = d
        .send_targets("All")
        .await
        .map_err(|e| format!("SendTargets failed: {e:#}"))?;
    Ok(found.iter().any(|(t, _)| t == target))
}

/// "p50 …, p99 …, max … over N" of `samples`.
pub fn summary(mut samples: Vec<Duration>) -> String {
    samples.sort();
    let at = |p: f64| {
        let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
        samples.get(i).copied().unwrap_or_default()
    };
    format!(
        "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {}",
        at(0.5).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        samples.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        samples.len()
    )
}
