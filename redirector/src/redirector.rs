//! The lease loop, the VIP listener and the view refresh.
//!
//! [`Redirector::run`]:
//! - a refresh task rebuilds the [`ClusterView`] from `ListChunks` +
//!   `ListExports` every [`Config::refresh`] (500 ms), so a chunk meta
//!   declares Dead is left out within one refresh;
//! - the lease loop calls `AcquireVipLease` every ttl/3 (sooner when a
//!   refused lease is about to expire, every 200 ms while another holds
//!   it, or while the VIP cannot be bound yet). The revision watch names
//!   this instance as a lease holder: meta frees its lease the moment that
//!   watch goes away with the process, so a standby takes over within a
//!   poll instead of a ttl. Granted and not serving: refresh the view, bind the VIP, serve it
//!   with an `ironblock_target` [`Server`] over the [`RedirectPortal`]. A
//!   holder that cannot bind the VIP for 3 ttls stops renewing for one ttl
//!   so another redirector can take it.
//!   Refused, or no successful renewal for a whole ttl (counted from when
//!   the last granted request was sent): stop serving at once (the server
//!   is aborted: it stops accepting and drops every connection on the VIP,
//!   in login or full feature phase, without a logout handshake; the
//!   listener is dropped) and start over with token 0.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ironblock_target::server::{Server, ServerConfig};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use crate::meta::{MetaError, MetaLink};
use crate::metrics::Metrics;
use crate::view::{ClusterView, RedirectPortal};
use crate::vip_iface::{VipIfaceError, VipInterface};

/// Default lease ttl.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(2);
/// Default view refresh interval.
pub const DEFAULT_REFRESH: Duration = Duration::from_millis(500);
const SHUTTING_DOWN: &str = "shutting down";
/// Default interval of the chunk portal probes.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// How often a standby asks for a lease another redirector holds.
const STANDBY_POLL: Duration = Duration::from_millis(200);
/// Retry interval while the VIP cannot be bound.
const BIND_RETRY: Duration = Duration::from_millis(100);
/// A holder that cannot bind the VIP for this many ttls lets its lease
/// lapse (stops renewing for one ttl) so another redirector can try.
const BIND_GIVE_UP_TTLS: u32 = 3;

/// Settings of one redirector.
#[derive(Clone, Debug)]
pub struct Config {
    /// Meta's gRPC address.
    pub meta: String,
    /// The VIP portal `host:port`: bound while holding the lease and
    /// handed out in discovery.
    pub vip: String,
    /// This instance's name (the lease holder name; unique).
    pub name: String,
    /// Lease duration; renewed every ttl/3.
    pub lease_ttl: Duration,
    /// View refresh interval.
    pub refresh: Duration,
    /// Interval of the login probes of the chunk portals (also their
    /// timeout); zero disables probing (meta's liveness alone decides).
    pub probe_interval: Duration,
    /// iSCSI transport settings of the VIP portal.
    pub server: ServerConfig,
    /// Put the VIP's address on this interface while holding the lease
    /// (`ip addr` + gratuitous ARP, see [`crate::vip_iface`]); `None` on
    /// loopback, where the address is local already.
    pub vip_interface: Option<String>,
}

impl Config {
    /// Defaults for everything but the addresses and the name.
    pub fn new(meta: &str, vip: &str, name: &str) -> Config {
        Config {
            meta: meta.to_string(),
            vip: vip.to_string(),
            name: name.to_string(),
            lease_ttl: DEFAULT_LEASE_TTL,
            refresh: DEFAULT_REFRESH,
            probe_interval: DEFAULT_PROBE_INTERVAL,
            server: ServerConfig::default(),
            vip_interface: None,
        }
    }
}

/// Whether this redirector serves the VIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseStatus {
    /// Not holding the lease (or holding it but not bound yet).
    Standby,
    /// Holding the lease with this fencing token and serving the VIP.
    Serving {
        /// The fencing token of this tenure.
        token: u64,
    },
}

/// Errors that stop a redirector.
#[derive(Debug, thiserror::Error)]
pub enum RedirectorError {
    /// The configuration is unusable.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The meta address is unusable.
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// The VIP could not be taken off its interface at start-up.
    #[error(transparent)]
    VipInterface(#[from] VipIfaceError),
}

struct Serving {
    server: Arc<Server>,
    task: JoinHandle<()>,
    token: u64,
}

/// One redirector instance.
pub struct Redirector {
    cfg: Config,
    meta: MetaLink,
    portal: Arc<RedirectPortal>,
    metrics: Arc<Metrics>,
    status: watch::Sender<LeaseStatus>,
    vip_iface: Option<VipInterface>,
    /// The metadata revision of the view in use (sent with every lease
    /// call: meta's in-force waits count it as this holder's
    /// acknowledgement).
    applied: AtomicU64,
    /// A newer view is in use: renew the lease now (acknowledge it).
    ack_now: Notify,
    /// Meta announced a newer revision: refresh the view now.
    refresh_now: Notify,
}

impl Redirector {
    /// A redirector; nothing runs before [`Redirector::run`]. Must be called
    /// within a tokio runtime.
    pub fn new(cfg: Config) -> Result<Redirector, RedirectorError> {
        if cfg.name.is_empty() {
            return Err(RedirectorError::Config("--name must not be empty".into()));
        }
        if cfg.lease_ttl < Duration::from_millis(300) || cfg.lease_ttl > Duration::from_secs(60) {
            return Err(RedirectorError::Config(
                "the lease ttl must be 300ms..=60s".into(),
            ));
        }
        // Meta calls must end well within a renewal period.
        let meta = MetaLink::new(
            &cfg.meta,
            (cfg.lease_ttl / 3).max(Duration::from_millis(100)),
        )?;
        let metrics = Arc::new(Metrics::default());
        let mut portal = RedirectPortal::new(&cfg.vip, metrics.clone());
        if !cfg.probe_interval.is_zero() {
            portal = portal.with_login_check(cfg.probe_interval.min(Duration::from_millis(200)));
        }
        let portal = Arc::new(portal);
        let (status, _) = watch::channel(LeaseStatus::Standby);
        let vip_iface = match &cfg.vip_interface {
            None => None,
            Some(iface) => {
                let addr: std::net::SocketAddr = cfg.vip.parse().map_err(|_| {
                    RedirectorError::Config(format!(
                        "--vip-interface needs the VIP as IP:port, got {:?}",
                        cfg.vip
                    ))
                })?;
                Some(VipInterface::new(iface, addr.ip()))
            }
        };
        Ok(Redirector {
            cfg,
            meta,
            portal,
            metrics,
            status,
            vip_iface,
            applied: AtomicU64::new(0),
            ack_now: Notify::new(),
            refresh_now: Notify::new(),
        })
    }

    /// The metrics (render with [`Metrics::render`]).
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// The portal policy (its view can be read for tests and status).
    pub fn portal(&self) -> Arc<RedirectPortal> {
        self.portal.clone()
    }

    /// Watch the lease status.
    pub fn status(&self) -> watch::Receiver<LeaseStatus> {
        self.status.subscribe()
    }

    async fn refresh(&self) -> Result<(), MetaError> {
        let (chunks, exports) =
            tokio::try_join!(self.meta.list_chunks(), self.meta.list_exports())?;
        self.portal
            .set_view(ClusterView::from_meta(&chunks, &exports));
        let before = self.applied.fetch_max(exports.revision, Ordering::AcqRel);
        if exports.revision > before {
            self.ack_now.notify_one();
        }
        Ok(())
    }

    /// Follows meta's revision stream: a revision newer than the view's
    /// refreshes it at once (the refresh loop's next pass), so a change
    /// reaches discovery within a round trip, and the lease loop then
    /// acknowledges it. Reconnects with a bounded backoff (100 ms doubling
    /// to 1 s); the periodic refresh goes on meanwhile.
    async fn watch_loop(&self, shutdown: CancellationToken) {
        let me = format!("redirector {}", self.cfg.name);
        let mut backoff = Duration::from_millis(100);
        loop {
            let opened = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.meta.watch_revisions(&me, &self.cfg.name) => r,
            };
            if let Ok(mut stream) = opened {
                loop {
                    let ev = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        ev = stream.message() => ev,
                    };
                    match ev {
                        Ok(Some(ev)) => {
                            backoff = Duration::from_millis(100);
                            if ev.revision > self.applied.load(Ordering::Acquire) {
                                self.refresh_now.notify_one();
                            }
                        }
                        Ok(None) | Err(_) => break,
                    }
                }
                // Meta may have freed our lease (it saw this watch go away):
                // renew now, so a holder that is alive after all learns of
                // a takeover within a round trip, not a renewal period.
                self.ack_now.notify_one();
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    async fn refresh_loop(&self, shutdown: CancellationToken) {
        let mut failing = false;
        loop {
            match self.refresh().await {
                Ok(()) => failing = false,
                Err(e) if !failing => {
                    warn!(error = %e, "view refresh failed; keeping the last view");
                    failing = true;
                }
                Err(_) => {}
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.cfg.refresh) => {}
                _ = self.refresh_now.notified() => {}
            }
        }
    }

    /// Probe every live chunk's portal once (concurrently, each bounded by
    /// the probe interval); record the ones that failed.
    async fn probe_once(&self) {
        let view = self.portal.view();
        let limit = self.cfg.probe_interval.max(Duration::from_millis(50));
        let mut set = tokio::task::JoinSet::new();
        for c in view.chunks.iter().cloned() {
            set.spawn(async move {
                let ok = crate::probe::probe(c.portal.as_str(), limit).await;
                (c.id, ok)
            });
        }
        let mut failed = std::collections::BTreeSet::new();
        while let Some(r) = set.join_next().await {
            if let Ok((id, false)) = r {
                failed.insert(id);
            }
        }
        self.portal.set_unreachable(failed);
    }

    async fn probe_loop(&self, shutdown: CancellationToken) {
        if self.cfg.probe_interval.is_zero() {
            return;
        }
        let mut tick = tokio::time::interval(self.cfg.probe_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.probe_once() => {}
            }
        }
    }

    /// Bind the VIP and serve it.
    async fn start_serving(&self, token: u64) -> std::io::Result<Serving> {
        if !self.portal.view().loaded {
            if let Err(e) = self.refresh().await {
                warn!(error = %e, "no view of the cluster yet; serving anyway");
            }
        }
        if let Some(v) = &self.vip_iface {
            v.add().await.map_err(std::io::Error::other)?;
        }
        let listener = TcpListener::bind(&self.cfg.vip).await?;
        let server = Arc::new(Server::new(self.portal.clone(), self.cfg.server.clone()));
        let s = server.clone();
        let span = tracing::info_span!("vip", vip = %self.cfg.vip, token);
        let task = tokio::spawn(
            async move {
                if let Err(e) = s.serve(listener).await {
                    warn!(error = %e, "VIP listener failed");
                }
            }
            .instrument(span),
        );
        self.metrics
            .lease_acquisitions
            .fetch_add(1, Ordering::Relaxed);
        self.metrics.lease_held.store(1, Ordering::Relaxed);
        self.metrics.lease_token.store(token, Ordering::Relaxed);
        self.status.send_replace(LeaseStatus::Serving { token });
        info!(vip = %self.cfg.vip, token, "serving the VIP");
        Ok(Serving {
            server,
            task,
            token,
        })
    }

    /// Close the listener and every connection now (a lease loss: drop
    /// them; a shutdown of the process while still holding: ask the
    /// sessions to log out first).
    async fn stop_serving(&self, s: Serving, why: &str) {
        if why == SHUTTING_DOWN {
            s.server.shutdown();
        } else {
            s.server.abort();
        }
        let mut task = s.task;
        if tokio::time::timeout(Duration::from_secs(1), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
        self.drop_vip_address().await;
        self.metrics.lease_losses.fetch_add(1, Ordering::Relaxed);
        self.metrics.lease_held.store(0, Ordering::Relaxed);
        self.status.send_replace(LeaseStatus::Standby);
        warn!(vip = %self.cfg.vip, token = s.token, why, "stopped serving the VIP");
    }

    /// Take the VIP's address off its interface (with `--vip-interface`).
    async fn drop_vip_address(&self) {
        if let Some(v) = &self.vip_iface {
            if let Err(e) = v.remove().await {
                tracing::error!(error = %e, "cannot take the VIP off the interface");
            }
        }
    }

    /// Run until `shutdown`: the view refresh and the lease loop. Serving
    /// stops (the VIP is released) before this returns.
    pub async fn run(&self, shutdown: CancellationToken) {
        let span = tracing::info_span!("redirector", name = %self.cfg.name, vip = %self.cfg.vip);
        async {
            // A leftover of a crashed tenure must not answer for the VIP.
            self.drop_vip_address().await;
            let refresh = self.refresh_loop(shutdown.clone());
            let lease = self.lease_loop(shutdown.clone());
            let probe = self.probe_loop(shutdown.clone());
            let watch = self.watch_loop(shutdown.clone());
            tokio::join!(refresh, lease, probe, watch);
        }
        .instrument(span)
        .await
    }

    async fn lease_loop(&self, shutdown: CancellationToken) {
        let ttl = self.cfg.lease_ttl;
        let period = ttl / 3;
        let mut token = 0u64;
        // While holding: the lease is ours until this instant.
        let mut valid_until: Option<Instant> = None;
        let mut serving: Option<Serving> = None;
        // Since when the VIP cannot be bound while we hold the lease.
        let mut bind_failing: Option<Instant> = None;
        loop {
            let sent = Instant::now();
            if valid_until.is_some_and(|v| v <= sent) {
                if let Some(s) = serving.take() {
                    self.stop_serving(s, "no renewal within the lease ttl")
                        .await;
                }
                valid_until = None;
                token = 0;
            }
            let mut next = sent + period;
            match self
                .meta
                .acquire_vip_lease(
                    &self.cfg.vip,
                    &self.cfg.name,
                    ttl,
                    token,
                    self.applied.load(Ordering::Acquire),
                )
                .await
            {
                Ok(r) if r.held => {
                    if r.token != token && serving.is_some() {
                        // Our tenure changed under us (token 0 sent after a
                        // lapse); re-serve under the new token.
                        if let Some(s) = serving.take() {
                            self.stop_serving(s, "new lease tenure").await;
                        }
                    }
                    token = r.token;
                    // Meta may grant less than asked (the view lags a
                    // revision a call waits to see in force): hold it only
                    // that long, and renew well before it ends.
                    let granted = Duration::from_millis(r.expires_in_ms).min(ttl);
                    valid_until = Some(sent + granted);
                    if granted < ttl {
                        next = next.min(sent + granted / 2);
                    }
                    if serving.is_none() {
                        match self.start_serving(token).await {
                            Ok(s) => {
                                serving = Some(s);
                                bind_failing = None;
                            }
                            Err(e) => {
                                let since = *bind_failing.get_or_insert(sent);
                                if since == sent {
                                    warn!(vip = %self.cfg.vip, error = %e, "cannot bind the VIP; retrying");
                                }
                                next = Instant::now() + BIND_RETRY;
                                if sent.duration_since(since) >= ttl * BIND_GIVE_UP_TTLS {
                                    self.drop_vip_address().await;
                                    tracing::error!(vip = %self.cfg.vip, error = %e,
                                        "cannot bind the VIP; letting the lease lapse for another redirector");
                                    bind_failing = None;
                                    valid_until = None;
                                    token = 0;
                                    // Silent for one ttl (+ a period): the
                                    // lease expires and a standby can take it.
                                    next = Instant::now() + ttl + period;
                                }
                            }
                        }
                    }
                }
                Ok(r) => {
                    if let Some(s) = serving.take() {
                        let why =
                            format!("lease refused: held by {} (token {})", r.holder, r.token);
                        self.stop_serving(s, &why).await;
                    }
                    valid_until = None;
                    token = 0;
                    self.metrics.lease_token.store(r.token, Ordering::Relaxed);
                    // Try again just after the holder's lease would run
                    // out, and every STANDBY_POLL until then: meta frees a
                    // dead holder's lease early (its watch went away).
                    let wake = Instant::now() + Duration::from_millis(r.expires_in_ms + 20);
                    next = next.min(wake).min(sent + STANDBY_POLL);
                }
                Err(e) => {
                    warn!(error = %e, holding = serving.is_some(), "lease call failed");
                }
            }
            let expiry = valid_until.unwrap_or(next);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep_until(expiry), if valid_until.is_some() => {}
                _ = tokio::time::sleep_until(next) => {}
                _ = self.ack_now.notified(), if valid_until.is_some() => {}
            }
        }
        if let Some(s) = serving.take() {
            self.stop_serving(s, SHUTTING_DOWN).await;
        }
    }
}
