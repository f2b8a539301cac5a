//! The driver's metrics (process-wide), as Prometheus text on `GET /metrics`:
//!
//! - `ironblock_csi_calls_total{method,code}`: CSI calls answered, by gRPC
//!   code name;
//! - `ironblock_csi_call_seconds_sum{method}` / `_count`: time to answer;
//! - `ironblock_csi_commands_total{program}`: external commands run by the
//!   node (iscsiadm, blkid, mkfs.*, mount, ...);
//! - `ironblock_csi_command_timeouts_total`: commands killed at their timeout;
//! - `ironblock_csi_iscsiadm_running` / `ironblock_csi_iscsiadm_peak`:
//!   iscsiadm processes running now / at most at once since start.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The process's metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::default);

/// Counters and gauges.
#[derive(Debug, Default)]
pub struct Metrics {
    calls: Mutex<BTreeMap<(String, String), u64>>,
    seconds: Mutex<BTreeMap<String, (f64, u64)>>,
    commands: Mutex<BTreeMap<String, u64>>,
    /// Commands killed at their timeout.
    pub command_timeouts: AtomicU64,
    /// iscsiadm processes running now.
    pub iscsiadm_running: AtomicU64,
    /// Most iscsiadm processes running at once.
    pub iscsiadm_peak: AtomicU64,
}

/// The canonical name of a gRPC code number.
fn code_name(code: i32) -> String {
    format!("{:?}", tonic::Code::from_i32(code))
}

impl Metrics {
    /// Records one answered call.
    pub fn call(&self, method: &str, code: i32, took: Duration) {
        *self
            .calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry((method.to_string(), code_name(code)))
            .or_insert(0) += 1;
        let mut s = self.seconds.lock().unwrap_or_else(PoisonError::into_inner);
        let e = s.entry(method.to_string()).or_insert((0.0, 0));
        e.0 += took.as_secs_f64();
        e.1 += 1;
    }

    /// Calls of `method` answered with `code` (a `tonic::Code` name).
    pub fn calls(&self, method: &str, code: &str) -> u64 {
        self.calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(method.to_string(), code.to_string()))
            .copied()
            .unwrap_or(0)
    }

    /// A command starts; the guard marks its end.
    pub fn command(&'static self, program: &str) -> CommandGuard {
        *self
            .commands
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(program.to_string())
            .or_insert(0) += 1;
        let iscsiadm = program == "iscsiadm";
        if iscsiadm {
            let now = self.iscsiadm_running.fetch_add(1, Ordering::SeqCst) + 1;
            self.iscsiadm_peak.fetch_max(now, Ordering::SeqCst);
        }
        CommandGuard {
            metrics: self,
            iscsiadm,
        }
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut s = String::new();
        s.push_str("# HELP ironblock_csi_calls_total CSI calls answered.\n# TYPE ironblock_csi_calls_total counter\n");
        for ((m, c), v) in self
            .calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            let _ = writeln!(
                s,
                "ironblock_csi_calls_total{{method=\"{m}\",code=\"{c}\"}} {v}"
            );
        }
        s.push_str("# HELP ironblock_csi_call_seconds Time to answer a CSI call.\n# TYPE ironblock_csi_call_seconds summary\n");
        for (m, (sum, n)) in self
            .seconds
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            let _ = writeln!(s, "ironblock_csi_call_seconds_sum{{method=\"{m}\"}} {sum}");
            let _ = writeln!(s, "ironblock_csi_call_seconds_count{{method=\"{m}\"}} {n}");
        }
        s.push_str("# HELP ironblock_csi_commands_total External commands run.\n# TYPE ironblock_csi_commands_total counter\n");
        for (p, v) in self
            .commands
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            let _ = writeln!(s, "ironblock_csi_commands_total{{program=\"{p}\"}} {v}");
        }
        for (name, kind, help, v) in [
            (
                "command_timeouts_total",
                "counter",
                "Commands killed at their timeout.",
                &self.command_timeouts,
            ),
            (
                "iscsiadm_running",
                "gauge",
                "iscsiadm processes running now.",
                &self.iscsiadm_running,
            ),
            (
                "iscsiadm_peak",
                "gauge",
                "Most iscsiadm processes running at once.",
                &self.iscsiadm_peak,
            ),
        ] {
            let _ = writeln!(
                s,
                "# HELP ironblock_csi_{name} {help}\n# TYPE ironblock_csi_{name} {kind}\nironblock_csi_{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        s
    }
}

/// Ends a command's accounting on drop.
pub struct CommandGuard {
    metrics: &'static Metrics,
    iscsiadm: bool,
}

impl Drop for CommandGuard {
    fn drop(&mut self) {
        if self.iscsiadm {
            self.metrics.iscsiadm_running.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// A tower layer recording every gRPC call (method, code, duration) in
/// [`METRICS`].
#[derive(Clone, Copy, Debug, Default)]
pub struct CallMetricsLayer;

impl<S> tower::Layer<S> for CallMetricsLayer {
    type Service = CallMetrics<S>;
    fn layer(&self, inner: S) -> CallMetrics<S> {
        CallMetrics { inner }
    }
}

/// The service of [`CallMetricsLayer`].
#[derive(Clone, Debug)]
pub struct CallMetrics<S> {
    inner: S,
}

type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, RB> tower::Service<http::Request<B>> for CallMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFut<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = req
            .uri()
            .path()
            .rsplit('/')
            .next()
            .unwrap_or("")
            .to_string();
        let start = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let r = fut.await;
            if let Ok(resp) = &r {
                // Errors are trailers-only responses: grpc-status is a
                // header. Successes carry it in the trailers (0).
                let code = resp
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                METRICS.call(&method, code, start.elapsed());
            }
            r
        })
    }
}

async fn answer(mut stream: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
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
        ("200 OK", METRICS.render())
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

/// Serves `GET /metrics` on `listener` for good.
pub async fn serve(listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(async move {
                    if let Err(e) = answer(stream).await {
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
    fn render() {
        let m = Metrics::default();
        m.call("CreateVolume", 0, Duration::from_millis(5));
        m.call("CreateVolume", 6, Duration::from_millis(5));
        assert_eq!(m.calls("CreateVolume", "Ok"), 1);
        assert_eq!(m.calls("CreateVolume", "AlreadyExists"), 1);
        let t = m.render();
        assert!(
            t.contains(
                "ironblock_csi_calls_total{method=\"CreateVolume\",code=\"AlreadyExists\"} 1"
            ),
            "{t}"
        );
        assert!(
            t.contains("ironblock_csi_call_seconds_count{method=\"CreateVolume\"} 2"),
            "{t}"
        );
    }

    #[test]
    fn iscsiadm_peak() {
        let a = METRICS.command("iscsiadm");
        let b = METRICS.command("iscsiadm");
        assert!(METRICS.iscsiadm_peak.load(Ordering::SeqCst) >= 2);
        drop((a, b));
        let _c = METRICS.command("blkid");
        assert!(METRICS
            .render()
            .contains("ironblock_csi_commands_total{program=\"blkid\"}"));
    }
}
