//! Metrics operators watch on a target: I/O rates and bytes by kind,
//! command latency, SCSI errors, sessions, and login outcomes, kept in a
//! `prometheus-client` registry and rendered in the Prometheus text format.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// What a SCSI command does, for per-kind rates and latency.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum IoKind {
    Read,
    Write,
    Other,
}

impl IoKind {
    /// Classify a CDB by its operation code.
    pub fn of(cdb: &[u8]) -> IoKind {
        match cdb.first().copied() {
            Some(0x08 | 0x28 | 0xa8 | 0x88) => IoKind::Read,
            Some(0x0a | 0x2a | 0xaa | 0x8a | 0x2e | 0xae | 0x8e | 0x41 | 0x93 | 0x89) => {
                IoKind::Write
            }
            _ => IoKind::Other,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: IoKind,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

/// The target's metrics. Cheap to update from many tasks at once.
pub struct TargetMetrics {
    registry: Registry,
    pub commands: Family<KindLabel, Counter>,
    pub bytes: Family<KindLabel, Counter>,
    pub latency: Family<KindLabel, Histogram>,
    /// Commands that ended in CHECK CONDITION or another non-GOOD status.
    pub scsi_errors: Counter,
    pub sessions: Gauge,
    pub connections: Gauge,
    pub logins: Family<OutcomeLabel, Counter>,
    /// PDUs rejected or connections closed for protocol errors.
    pub protocol_errors: Counter,
    /// Connections, logins and commands refused by a bound
    /// (`crate::limits`), by reason.
    pub refused: Family<ReasonLabel, Counter>,
    /// Connections in the login phase.
    pub login_connections: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

fn latency_histogram() -> Histogram {
    // 10 us .. ~5 s
    Histogram::new(exponential_buckets(0.000_01, 2.0, 20))
}

impl Default for TargetMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("ironblock_target");
        let commands = Family::<KindLabel, Counter>::default();
        let bytes = Family::<KindLabel, Counter>::default();
        let latency = Family::<KindLabel, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let scsi_errors = Counter::default();
        let sessions = Gauge::default();
        let connections = Gauge::default();
        let logins = Family::<OutcomeLabel, Counter>::default();
        let protocol_errors = Counter::default();
        let refused = Family::<ReasonLabel, Counter>::default();
        let login_connections = Gauge::default();
        registry.register("scsi_commands", "SCSI commands completed", commands.clone());
        registry.register("scsi_bytes", "Bytes moved by SCSI commands", bytes.clone());
        registry.register(
            "scsi_command_seconds",
            "SCSI command latency from receipt of all data to completion",
            latency.clone(),
        );
        registry.register(
            "scsi_errors",
            "SCSI commands that did not end GOOD",
            scsi_errors.clone(),
        );
        registry.register(
            "sessions",
            "Sessions in full feature phase",
            sessions.clone(),
        );
        registry.register("connections", "Open TCP connections", connections.clone());
        registry.register("logins", "Login attempts by outcome", logins.clone());
        registry.register(
            "protocol_errors",
            "PDUs rejected or connections closed for protocol errors",
            protocol_errors.clone(),
        );
        registry.register(
            "refused",
            "Connections, logins and commands refused by a bound (login_evicted, login_timeout, portal_connections, initiator_connections, write_too_long, write_buffers_full)",
            refused.clone(),
        );
        registry.register(
            "login_connections",
            "Connections in the login phase",
            login_connections.clone(),
        );
        TargetMetrics {
            registry,
            commands,
            bytes,
            latency,
            scsi_errors,
            sessions,
            connections,
            logins,
            protocol_errors,
            refused,
            login_connections,
        }
    }
}

impl TargetMetrics {
    /// Record one finished SCSI command.
    pub fn command(&self, kind: IoKind, bytes: u64, seconds: f64, good: bool) {
        let l = KindLabel { kind };
        self.commands.get_or_create(&l).inc();
        if bytes > 0 {
            self.bytes.get_or_create(&l).inc_by(bytes);
        }
        self.latency.get_or_create(&l).observe(seconds);
        if !good {
            self.scsi_errors.inc();
        }
    }

    /// Count `n` refusals for `reason` (see [`TargetMetrics::refused`]).
    pub fn refuse(&self, reason: &'static str, n: u64) {
        self.refused
            .get_or_create(&ReasonLabel { reason })
            .inc_by(n);
    }

    pub fn login(&self, outcome: &'static str) {
        self.logins.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Serve `GET /metrics` in the Prometheus text format until `shutdown`.
///
/// Hand-written on purpose: one read-only endpoint does not justify an HTTP
/// server stack in the target crate. It reads at most 8 KiB of request
/// head within 5 s, answers HTTP/1.0-style and closes.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    render: std::sync::Arc<dyn Fn() -> String + Send + Sync>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let (mut sock, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => match a {
                Ok(x) => x,
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let render = render.clone();
        tokio::spawn(async move {
            let mut head = Vec::with_capacity(512);
            let mut buf = [0u8; 1024];
            let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while head.len() < 8192 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                true
            })
            .await;
            if read != Ok(true) {
                return;
            }
            let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
            let ok = line.starts_with(b"GET /metrics ") || line.starts_with(b"GET / ");
            let (status, body) = if ok {
                ("200 OK", render())
            } else {
                ("404 Not Found", "not found; try /metrics\n".to_string())
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts_by_kind() {
        let m = TargetMetrics::default();
        m.command(IoKind::of(&[0x28]), 4096, 0.0001, true);
        m.command(IoKind::of(&[0x2a]), 512, 0.0002, false);
        m.login("success");
        let text = m.render();
        assert!(
            text.contains("ironblock_target_scsi_commands_total{kind=\"Read\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("ironblock_target_scsi_bytes_total{kind=\"Write\"} 512"),
            "{text}"
        );
        assert!(
            text.contains("ironblock_target_scsi_errors_total 1"),
            "{text}"
        );
        assert!(
            text.contains("ironblock_target_logins_total{outcome=\"success\"} 1"),
            "{text}"
        );
    }
}
