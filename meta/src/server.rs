//! Running the meta service: bind, serve gRPC, run the liveness loop, stop
//! cleanly on a shutdown signal.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use std::collections::BTreeMap;

use ironblock_proto::v1::meta_raft_server::MetaRaftServer;
use ironblock_proto::v1::meta_server::MetaServer as MetaGrpcServer;
use openraft::BasicNode;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{error, info, warn, Instrument};

use crate::clock::{Clock, SystemClock};
use crate::error::MetaError;
use crate::raft::network::{Network, RaftService};
use crate::raft::store::{self, LogStore, StateMachine};
use crate::raft::{Group, NodeId, Raft, Timing};
use crate::service::{MetaService, SharedState};
use crate::state::{Options, SharedPulse, State, DEFAULT_LIVENESS_TIMEOUT};

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
    /// This node's id in the meta group.
    pub node_id: NodeId,
    /// The address the other members and clients reach this node at
    /// (`None`: the bound address).
    pub advertise: Option<String>,
    /// The group's first voters, id to address (empty: this node alone).
    /// Used only by a node that never took part in a group, and only if it
    /// is among them (or they are empty).
    pub peers: BTreeMap<NodeId, String>,
    /// Wait to be added by `ironblock meta add` instead of forming a group.
    pub join: bool,
    /// Raft timing.
    pub timing: Timing,
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
            node_id: 1,
            advertise: None,
            peers: BTreeMap::new(),
            join: false,
            timing: Timing::default(),
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
    /// The meta group could not start.
    #[error("meta group: {0}")]
    Raft(String),
    /// The gRPC transport failed.
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// A bound, not yet running meta server.
pub struct MetaServer {
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    state: SharedState,
    pulse: SharedPulse,
    config: Config,
    clock: Arc<dyn Clock>,
    group: Group,
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
        let db = tokio::task::spawn_blocking(move || crate::state::open_db(&dir))
            .await
            .map_err(|e| ServeError::Task(e.to_string()))??;
        let queue = store::new_queue();
        let log = LogStore::open(&db).map_err(MetaError::from)?;
        let sm =
            StateMachine::open(&db, queue.clone()).map_err(|e| ServeError::Raft(e.to_string()))?;
        let state = {
            let db = db.clone();
            let queue = queue.clone();
            tokio::task::spawn_blocking(move || State::open_replicated(db, opts, now, queue))
                .await
                .map_err(|e| ServeError::Task(e.to_string()))??
        };
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
        let bound = listener.local_addr().map_err(|source| ServeError::Bind {
            addr: config.listen,
            source,
        })?;
        let advertise = config
            .advertise
            .clone()
            .unwrap_or_else(|| bound.to_string());
        let id = config.node_id;
        let pristine = log.is_pristine().map_err(MetaError::from)?;
        let raft_config = Arc::new(
            config
                .timing
                .config()
                .validate()
                .map_err(|e| ServeError::Raft(e.to_string()))?,
        );
        let raft = Raft::new(id, raft_config, Network, log, sm)
            .await
            .map_err(|e| ServeError::Raft(e.to_string()))?;
        if pristine && !config.join {
            let mut voters: BTreeMap<NodeId, BasicNode> = config
                .peers
                .iter()
                .map(|(id, a)| (*id, BasicNode::new(a)))
                .collect();
            if voters.is_empty() {
                voters.insert(id, BasicNode::new(&advertise));
            }
            if voters.contains_key(&id) {
                info!(node = id, voters = ?voters.keys().collect::<Vec<_>>(), "forming the meta group");
                if let Err(e) = raft.initialize(voters).await {
                    // Another member's initialisation reached us first.
                    info!(error = %e, "meta group already formed");
                }
            } else {
                info!(node = id, "not among the first voters: waiting to be added");
            }
        }
        let group = Group::new(raft, id, config.timing, state.announcer());
        let pulse = state.pulse();
        Ok(MetaServer {
            listener,
            metrics_listener,
            pulse,
            state: Arc::new(tokio::sync::Mutex::new(state)),
            config,
            clock,
            group,
        })
    }

    /// The meta group handle.
    pub fn group(&self) -> Group {
        self.group.clone()
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
                        Some(self.group.clone()),
                        move || clock.now(),
                        stop_rx.clone(),
                    )
                    .in_current_span(),
                )
            });
            let standing = tokio::spawn(
                follow_standing(
                    self.group.clone(),
                    self.state.clone(),
                    self.clock.clone(),
                    stop_rx.clone(),
                )
                .in_current_span(),
            );
            let liveness = tokio::spawn(
                liveness_loop(
                    self.state.clone(),
                    self.group.clone(),
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
                self.pulse.clone(),
                self.clock.clone(),
                self.config.heartbeat_interval(),
            )
            .in_group(self.group.clone())
            .ending_streams_on(streams_rx);
            let shutdown = async move {
                shutdown.await;
                let _ = streams_tx.send(true);
            };
            info!(
                node = self.group.id,
                liveness_timeout_ms = self.config.liveness_timeout.as_millis() as u64,
                data = %self.config.data_dir.display(),
                "meta serving"
            );
            // No Nagle: small pushes (WatchRevisions) and answers leave at once
            // instead of waiting out the peer's delayed ACK (40 ms).
            let incoming =
                tonic::transport::server::TcpIncoming::from(self.listener).with_nodelay(Some(true));
            let res = tonic::transport::Server::builder()
                .add_service(MetaGrpcServer::new(crate::service::Settled(svc)))
                .add_service(MetaRaftServer::new(RaftService::new(self.group.clone())))
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await;
            let _ = stop_tx.send(true);
            if let Err(e) = standing.await {
                warn!(error = %e, "leader-following task ended abnormally");
            }
            if let Err(e) = self.group.raft.shutdown().await {
                warn!(error = %e, "raft did not stop cleanly");
            }
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
            if let Err(e) = self.state.lock().await.flush() {
                error!(error = %e, "final flush failed");
            }
            info!("meta stopped");
            res.map_err(ServeError::from)
        }
        .instrument(span)
        .await
    }
}

/// Follows openraft's metrics into the group's [`crate::raft::Standing`]
/// (the leader, when a quorum last acknowledged this node), and runs the
/// start-up of each term this node leads: apply everything committed (a
/// read barrier), catch the model up, then
/// [`State::on_leader_start`] (a full lease of grace for every chunk and VIP
/// holder), and only then serve.
async fn follow_standing(
    group: Group,
    state: SharedState,
    clock: Arc<dyn Clock>,
    mut stop: watch::Receiver<bool>,
) {
    let mut metrics = group.raft.metrics();
    let mut started: Option<u64> = None;
    loop {
        let m = metrics.borrow_and_update().clone();
        let now = clock.now();
        let leader = m.current_leader.and_then(|l| {
            m.membership_config
                .membership()
                .get_node(&l)
                .map(|n| (l, n.addr.clone()))
        });
        let leading = m.state == openraft::ServerState::Leader;
        let alone = m.membership_config.membership().voter_ids().eq([group.id]);
        group.update(|s| {
            if s.leader.as_ref().map(|l| l.0) != leader.as_ref().map(|l| l.0) {
                match &leader {
                    Some(l) => info!(leader = ?l, term = m.current_term, "meta leader"),
                    None => warn!(
                        term = m.current_term,
                        "the meta group has no leader (an election, or no quorum: fewer than half the voters answer); chunks fence their I/O once their lease runs out"
                    ),
                }
            }
            s.leader = leader;
            if leading {
                s.quorum_ack = if alone {
                    // A lone voter is its own quorum; see Group::serving.
                    Some(now + Duration::from_secs(3600))
                } else {
                    m.millis_since_quorum_ack
                        .map(|ms| now.checked_sub(Duration::from_millis(ms)).unwrap_or(now))
                };
            } else {
                s.serving_term = None;
                s.quorum_ack = None;
            }
        });
        if !leading {
            started = None;
        } else if started != Some(m.current_term) {
            started = Some(m.current_term);
            let term = m.current_term;
            let (group, state, clock) = (group.clone(), state.clone(), clock.clone());
            tokio::spawn(
                async move {
                    // A leader restored from its own vote (every member
                    // restarted at once) cannot confirm the term until a
                    // quorum is up again, and nobody elects anew while it
                    // heartbeats: so start-up is retried for as long as
                    // this node leads this term, never given up.
                    let mut pause = Duration::from_millis(100);
                    loop {
                        match lead(&group, &state, &*clock, term).await {
                            Ok(()) => {
                                info!(term, "leading the meta group: serving");
                                break;
                            }
                            Err(e) => {
                                if !group.leads_term(term) {
                                    warn!(term, error = %e, "leader start-up failed and the term is over; not serving it");
                                    break;
                                }
                                warn!(term, error = %e, retry_in_ms = pause.as_millis() as u64, "leader start-up failed; retrying");
                                tokio::time::sleep(pause).await;
                                pause = (pause * 2).min(Duration::from_secs(1));
                            }
                        }
                    }
                }
                .in_current_span(),
            );
        }
        tokio::select! {
            r = metrics.changed() => if r.is_err() { return },
            _ = stop.changed() => return,
            // A lone leader's metrics may sit still; refresh its ack now
            // and then anyway.
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
    }
}

/// The start-up of a term this node leads (see [`follow_standing`]).
async fn lead(
    group: &Group,
    state: &SharedState,
    clock: &dyn Clock,
    term: u64,
) -> Result<(), String> {
    group
        .raft
        .ensure_linearizable()
        .await
        .map_err(|e| e.to_string())?;
    let now = clock.now();
    let (mut st, _) = crate::service::lock_state(state, Some(group), now)
        .await
        .map_err(|e| e.message().to_string())?;
    st.on_leader_start(now).map_err(|e| e.to_string())?;
    // Held while it goes through the log: nothing serves before it.
    if let Some(t) = crate::service::submit(group, &mut st) {
        t.wait().await.map_err(|e| e.to_string())?;
    }
    if !group.leads_term(term) {
        return Err("lost the leadership during start-up".into());
    }
    group.update(|s| s.serving_term = Some(term));
    Ok(())
}

async fn liveness_loop(
    state: SharedState,
    group: Group,
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
        // Only the serving leader judges (a new one gives everyone a full
        // timeout first, see State::on_leader_start).
        if group.serving(asked).is_err() {
            continue;
        }
        let (mut st, _) = match crate::service::lock_state(&state, Some(&group), clock.now()).await
        {
            Ok(locked) => locked,
            Err(e) => {
                error!(error = %e.message(), "catching up with the meta log failed");
                continue;
            }
        };
        let now = clock.now();
        // If a long mutation held the lock, heartbeats queued behind it
        // too: judge liveness only after they had a turn.
        if now.saturating_duration_since(asked) > period {
            continue;
        }
        // The volume I/O heartbeats reported (locality): an optimisation,
        // so its failure is logged and judging goes on.
        if let Err(e) = st.fold_io() {
            tracing::warn!(error = %e, "recording the chunks' volume I/O failed");
        }
        let res = match st.check_liveness(now) {
            Ok(dead) => Ok((dead, crate::service::submit(&group, &mut st))),
            Err(e) => {
                let _ = st.replicated_failed(now);
                Err(e.to_string())
            }
        };
        // The log round trip happens without the state lock.
        drop(st);
        let res = match res {
            Ok((dead, Some(t))) => t.wait().await.map(|()| dead).map_err(|e| e.to_string()),
            Ok((dead, None)) => Ok(dead),
            Err(e) => Err(e),
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
