//! Running the meta service: bind, serve gRPC, run the liveness loop, stop
//! cleanly on a shutdown signal.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ironblock_proto::v1::meta_server::MetaServer as MetaGrpcServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{error, info, warn, Instrument};

use crate::clock::{Clock, SystemClock};
use crate::error::MetaError;
use crate::service::{MetaService, SharedState};
use crate::state::{Options, State, DEFAULT_LIVENESS_TIMEOUT};

/// Meta service configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// gRPC listen address (port 0 picks one).
    pub listen: SocketAddr,
    /// sled directory.
    pub data_dir: PathBuf,
    /// A chunk silent this long is Dead.
    pub liveness_timeout: Duration,
    /// Prometheus `/metrics` listen address (none: no endpoint).
    pub metrics_listen: Option<SocketAddr>,
    /// Bytes of a volume's I/O that decide its home chunk (data locality
    /// for RF=1 volumes); 0 turns locality off.
    pub locality_window_bytes: u64,
}

impl Config {
    /// Defaults for everything but the data directory.
    pub fn new(listen: SocketAddr, data_dir: PathBuf) -> Self {
        Config {
            listen,
            data_dir,
            liveness_timeout: DEFAULT_LIVENESS_TIMEOUT,
            metrics_listen: None,
            locality_window_bytes: crate::state::DEFAULT_LOCALITY_WINDOW_BYTES,
        }
    }

    /// How often chunks are told to heartbeat: a third of the timeout, at
    /// most one second.
    pub fn heartbeat_interval(&self) -> Duration {
        (self.liveness_timeout / 3).min(Duration::from_secs(1))
    }
}

/// Failure to start or run the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The state could not be opened.
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// Binding the listener failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// A background task failed.
    #[error("meta task failed: {0}")]
    Task(String),
    /// The gRPC transport failed.
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// A bound, not yet running meta server.
pub struct MetaServer {
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    state: SharedState,
    config: Config,
    clock: Arc<dyn Clock>,
}

impl MetaServer {
    /// Opens the state and binds the listener.
    pub async fn bind(config: Config) -> Result<Self, ServeError> {
        Self::bind_with_clock(config, Arc::new(SystemClock)).await
    }

    /// [`MetaServer::bind`] with an explicit clock.
    pub async fn bind_with_clock(
        config: Config,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, ServeError> {
        let opts = Options {
            liveness_timeout: config.liveness_timeout,
            locality_window_bytes: config.locality_window_bytes,
            ..Options::default()
        };
        let dir = config.data_dir.clone();
        let now = clock.now();
        let state = tokio::task::spawn_blocking(move || State::open(&dir, opts, now))
            .await
            .map_err(|e| ServeError::Task(e.to_string()))??;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ServeError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let metrics_listener = match config.metrics_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| ServeError::Bind { addr, source })?,
            ),
            None => None,
        };
        Ok(MetaServer {
            listener,
            metrics_listener,
            state: Arc::new(Mutex::new(state)),
            config,
            clock,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> Result<SocketAddr, ServeError> {
        self.listener
            .local_addr()
            .map_err(|source| ServeError::Bind {
                addr: self.config.listen,
                source,
            })
    }

    /// The address of the metrics endpoint, if enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// The shared state (for in-process tools and tests).
    pub fn state(&self) -> SharedState {
        self.state.clone()
    }

    /// Serves until `shutdown` resolves, then flushes the state.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServeError> {
        let addr = self.local_addr()?;
        let span = tracing::info_span!("meta", %addr);
        async move {
            let (stop_tx, stop_rx) = watch::channel(false);
            let metrics = self.metrics_listener.map(|l| {
                if let Ok(a) = l.local_addr() {
                    info!(metrics = %a, "metrics endpoint up");
                }
                let clock = self.clock.clone();
                tokio::spawn(
                    crate::metrics::serve_metrics(
                        l,
                        self.state.clone(),
                        move || clock.now(),
                        stop_rx.clone(),
                    )
                    .in_current_span(),
                )
            });
            let liveness = tokio::spawn(
                liveness_loop(
                    self.state.clone(),
                    self.clock.clone(),
                    self.config.liveness_timeout,
                    stop_rx,
                )
                .in_current_span(),
            );
            // Streams (WatchRevisions) end when the shutdown starts, so the
            // graceful shutdown does not wait on them.
            let (streams_tx, streams_rx) = watch::channel(false);
            let svc = MetaService::new(
                self.state.clone(),
                self.clock.clone(),
                self.config.heartbeat_interval(),
            )
            .ending_streams_on(streams_rx);
            let shutdown = async move {
                shutdown.await;
                let _ = streams_tx.send(true);
            };
            info!(
                liveness_timeout_ms = self.config.liveness_timeout.as_millis() as u64,
                data = %self.config.data_dir.display(),
                "meta serving"
            );
            // No Nagle: small pushes (WatchRevisions) and answers leave at once
            // instead of waiting out the peer's delayed ACK (40 ms).
            let incoming =
                tonic::transport::server::TcpIncoming::from(self.listener).with_nodelay(Some(true));
            let res = tonic::transport::Server::builder()
                .add_service(MetaGrpcServer::new(svc))
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await;
            let _ = stop_tx.send(true);
            if let Some(m) = metrics {
                if let Err(e) = m.await {
                    warn!(error = %e, "metrics task ended abnormally");
                }
            }
            if let Err(e) = liveness.await {
                warn!(error = %e, "liveness task ended abnormally");
            }
            // Connection tasks may still hold the state for a moment; wait
            // (bounded) so the sled lock is free when `run` returns.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while Arc::strong_count(&self.state) > 1 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if Arc::strong_count(&self.state) > 1 {
                warn!("meta state still referenced after shutdown");
            }
            match self.state.lock() {
                Ok(st) => {
                    if let Err(e) = st.flush() {
                        error!(error = %e, "final flush failed");
                    }
                }
                Err(_) => error!("state lock poisoned at shutdown"),
            }
            info!("meta stopped");
            res.map_err(ServeError::from)
        }
        .instrument(span)
        .await
    }
}

async fn liveness_loop(
    state: SharedState,
    clock: Arc<dyn Clock>,
    timeout: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let period = (timeout / 4).clamp(Duration::from_millis(10), Duration::from_millis(250));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_tick = clock.now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let asked = clock.now();
        // This loop itself ran late (meta was descheduled, frozen or
        // starved): heartbeats that arrived meanwhile still wait in the
        // sockets. Give them a turn before judging anybody.
        let late = asked.saturating_duration_since(last_tick) > period * 3;
        last_tick = asked;
        if late {
            continue;
        }
        let res = match state.lock() {
            Ok(mut st) => {
                let now = clock.now();
                // If a long mutation held the lock, heartbeats queued behind
                // it too: judge liveness only after they had a turn.
                if now.saturating_duration_since(asked) > period {
                    continue;
                }
                st.check_liveness(now)
            }
            Err(_) => {
                error!("state lock poisoned; liveness loop stops");
                return;
            }
        };
        match res {
            Ok(dead) if !dead.is_empty() => {
                warn!(chunks = ?dead, "chunks missed the liveness timeout")
            }
            Ok(_) => {}
            Err(e) => error!(error = %e, "liveness check failed"),
        }
    }
}

/// Runs meta until `shutdown` resolves: the library entry point for the
/// binary, `ironblock dev` and tests.
pub async fn serve(
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    MetaServer::bind(config).await?.run(shutdown).await
}

/// Parses durations like `3s`, `500ms`, `2m` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (try 3s or 500ms)"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        _ => return Err(format!("invalid duration unit in {s:?} (ms, s or m)")),
    };
    if !secs.is_finite() || secs <= 0.0 {
        return Err(format!("duration {s:?} must be positive"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("3s").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("3h").is_err());
        assert!(parse_duration("x").is_err());
    }
}
