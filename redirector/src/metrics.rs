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
//!   portal failed the last probe (left out of the redirects).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;
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

/// Serve `GET /metrics` on `listener` until `shutdown`, with the target
/// crate's responder (the one the chunk's target serves its metrics with).
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let render = Arc::new(move || metrics.render());
    ironblock_target::metrics::serve_http(listener, render, shutdown).await
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

    #[tokio::test]
    async fn serves_the_text_on_get_metrics_until_shutdown() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let get = |addr: std::net::SocketAddr, path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await?;
            s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
                .await?;
            let mut out = String::new();
            s.read_to_string(&mut out).await?;
            Ok::<_, std::io::Error>(out)
        };
        let m = Arc::new(Metrics::default());
        m.redirected(7);
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(l, m.clone(), stop.clone()));
        let text = get(addr, "/metrics").await.unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(
            text.contains("ironblock_redirector_redirects_total{chunk=\"7\"} 1"),
            "{text}"
        );
        assert!(get(addr, "/other").await.unwrap().contains(" 404 "));
        stop.cancel();
        tokio::time::timeout(std::time::Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
    }
}
