//! The redirector's metrics, rendered as Prometheus text on `GET /metrics`.
//!
//! - `ironblock_redirector_redirects_total{chunk="<id>"}`: normal-session
//!   logins redirected to each chunk;
//! - `ironblock_redirector_logins_refused_total`: normal logins refused
//!   (unknown target, no visible LUN, no live chunk);
//! - `ironblock_redirector_discoveries_total`: SendTargets answered;
//! - `ironblock_redirector_lease_acquisitions_total`,
//!   `ironblock_redirector_lease_losses_total`: lease tenures begun / ended;
//! - `ironblock_redirector_lease_held` (0/1), `ironblock_redirector_lease_token`;
//! - `ironblock_redirector_live_chunks`: chunks meta reports Alive;
//! - `ironblock_redirector_unreachable_chunks`: of those, chunks whose
//!   portal failed the last TCP probe (left out of the redirects).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Counters and gauges of one redirector.
#[derive(Debug, Default)]
pub struct Metrics {
    redirects: Mutex<BTreeMap<u64, u64>>,
    /// Normal logins refused.
    pub logins_refused: AtomicU64,
    /// Discovery sessions answered (SendTargets).
    pub discoveries: AtomicU64,
    /// Lease tenures begun (the VIP bound).
    pub lease_acquisitions: AtomicU64,
    /// Lease tenures ended (the VIP closed).
    pub lease_losses: AtomicU64,
    /// 1 while this redirector serves the VIP.
    pub lease_held: AtomicU64,
    /// The current (or last) fencing token.
    pub lease_token: AtomicU64,
    /// Chunks in the current view.
    pub live_chunks: AtomicU64,
    /// Chunks of the view whose portal failed the last probe.
    pub unreachable_chunks: AtomicU64,
}

impl Metrics {
    /// Count one login redirected to `chunk`.
    pub fn redirected(&self, chunk: u64) {
        if let Ok(mut m) = self.redirects.lock() {
            *m.entry(chunk).or_insert(0) += 1;
        }
    }

    /// Logins redirected to `chunk` so far.
    pub fn redirects_to(&self, chunk: u64) -> u64 {
        self.redirects
            .lock()
            .map(|m| m.get(&chunk).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# HELP ironblock_redirector_redirects_total Logins redirected, per chunk.\n\
             # TYPE ironblock_redirector_redirects_total counter"
        );
        if let Ok(m) = self.redirects.lock() {
            for (chunk, n) in m.iter() {
                let _ = writeln!(
                    s,
                    "ironblock_redirector_redirects_total{{chunk=\"{chunk}\"}} {n}"
                );
            }
        }
        let scalars: [(&str, &str, &str, &AtomicU64); 8] = [
            (
                "logins_refused_total",
                "counter",
                "Normal logins refused.",
                &self.logins_refused,
            ),
            (
                "discoveries_total",
                "counter",
                "SendTargets answered.",
                &self.discoveries,
            ),
            (
                "lease_acquisitions_total",
                "counter",
                "VIP lease tenures begun.",
                &self.lease_acquisitions,
            ),
            (
                "lease_losses_total",
                "counter",
                "VIP lease tenures ended.",
                &self.lease_losses,
            ),
            (
                "lease_held",
                "gauge",
                "1 while serving the VIP.",
                &self.lease_held,
            ),
            (
                "lease_token",
                "gauge",
                "Current fencing token.",
                &self.lease_token,
            ),
            (
                "live_chunks",
                "gauge",
                "Chunks logins may go to.",
                &self.live_chunks,
            ),
            (
                "unreachable_chunks",
                "gauge",
                "Live chunks whose portal failed the last probe.",
                &self.unreachable_chunks,
            ),
        ];
        for (name, kind, help, v) in scalars {
            let _ = writeln!(
                s,
                "# HELP ironblock_redirector_{name} {help}\n\
                 # TYPE ironblock_redirector_{name} {kind}\n\
                 ironblock_redirector_{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        s
    }
}

async fn answer(mut stream: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    // Read the request head (bounded in size and time).
    let read = async {
        while len < buf.len() {
            let n = stream.read(&mut buf[len..]).await?;
            if n == 0 {
                break;
            }
            len += n;
            if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(Duration::from_secs(2), read)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "request timed out"))??;
    let head = String::from_utf8_lossy(&buf[..len]);
    let (code, body) = if head.starts_with("GET /metrics ") || head.starts_with("GET / ") {
        ("200 OK", metrics.render())
    } else {
        ("404 Not Found", "not found\n".to_string())
    };
    let resp = format!(
        "HTTP/1.0 {code}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(resp.as_bytes()).await?;
    stream.shutdown().await
}

/// Serve `GET /metrics` on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, _)) => {
                let m = metrics.clone();
                tokio::spawn(async move {
                    if let Err(e) = answer(stream, &m).await {
                        tracing::debug!(error = %e, "metrics request failed");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_lists_redirects_per_chunk_and_lease_counters() {
        let m = Metrics::default();
        m.redirected(3);
        m.redirected(3);
        m.redirected(1);
        m.lease_acquisitions.fetch_add(1, Ordering::Relaxed);
        let text = m.render();
        assert!(
            text.contains("ironblock_redirector_redirects_total{chunk=\"3\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("ironblock_redirector_redirects_total{chunk=\"1\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("ironblock_redirector_lease_acquisitions_total 1"),
            "{text}"
        );
        assert!(
            text.contains("ironblock_redirector_lease_losses_total 0"),
            "{text}"
        );
        assert_eq!(m.redirects_to(3), 2);
        assert_eq!(m.redirects_to(2), 0);
    }
}
