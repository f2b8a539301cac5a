//! Redirector processes for the VIP tests: [`RedirectorProcess`] runs
//! `ironblock-redirector` against a [`MetaProcess`] with a VIP portal on
//! 127.0.0.100 ([`vip_addr`]), plus small helpers the VIP tests share
//! (metric parsing, bounded waits, settling chunks on a revision, running
//! libiscsi's tools).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cluster::{http_get, Admin, ChunkProcess, MetaProcess};
use crate::{bin_path, free_port, log_dir, log_tail, require_tool};

/// A running `ironblock-redirector`, killed on drop.
pub struct RedirectorProcess {
    child: Option<Child>,
    /// The lease holder name.
    pub name: String,
    metrics: SocketAddr,
    log: PathBuf,
}

impl RedirectorProcess {
    /// Start a redirector for `vip` with a 2 s lease ttl and the default
    /// probe interval; its log goes to `build/test-logs/<dir>-<name>.log`.
    pub fn start(meta: &MetaProcess, vip: SocketAddr, name: &str, dir: &Path) -> RedirectorProcess {
        Self::start_with(meta, vip, name, dir, &[])
    }

    /// [`RedirectorProcess::start`] with extra arguments.
    pub fn start_with(
        meta: &MetaProcess,
        vip: SocketAddr,
        name: &str,
        dir: &Path,
        extra: &[&str],
    ) -> RedirectorProcess {
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let log = log_dir().join(format!(
            "{}-{name}.log",
            dir.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        ));
        let err = std::fs::File::create(&log).expect("create redirector log");
        let child = Command::new(bin_path("ironblock-redirector"))
            .args(["--meta", &meta.addr().to_string()])
            .args(["--vip", &vip.to_string()])
            .args(["--name", name])
            .args(["--lease-ttl", "2s"])
            .args(["--metrics", &metrics.to_string()])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("spawn ironblock-redirector");
        RedirectorProcess {
            child: Some(child),
            name: name.to_string(),
            metrics,
            log,
        }
    }

    /// The value of one sample (name with labels, exactly).
    pub async fn metric(&self, key: &str) -> Option<f64> {
        let text = http_get(self.metrics, "/metrics").await.ok()?;
        metric_value(&text, key)
    }

    /// Logins redirected to chunk `id` so far (0 when none).
    pub async fn redirects_to(&self, id: u64) -> f64 {
        self.metric(&format!(
            "ironblock_redirector_redirects_total{{chunk=\"{id}\"}}"
        ))
        .await
        .unwrap_or(0.0)
    }

    /// Wait until this redirector serves the VIP with `chunks` live chunks.
    pub async fn wait_serving(&self, chunks: usize, timeout: Duration) -> bool {
        wait_for(timeout, || async {
            self.metric("ironblock_redirector_lease_held").await == Some(1.0)
                && self.metric("ironblock_redirector_live_chunks").await == Some(chunks as f64)
        })
        .await
    }

    /// The end of its log.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log, 3000)
    }

    /// SIGKILL.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedirectorProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The value of the sample whose name-and-labels is exactly `key`.
pub fn metric_value(text: &str, key: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == key).then(|| v.parse().ok())?
    })
}

/// A free port on the VIP address 127.0.0.100.
pub fn vip_addr() -> SocketAddr {
    for _ in 0..20 {
        let port = free_port();
        let a = SocketAddr::from(([127, 0, 0, 100], port));
        if std::net::TcpListener::bind(a).is_ok() {
            return a;
        }
    }
    panic!("no free port on 127.0.0.100");
}

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
