//! Listening sockets, sessions, and the policy seam ([`Portal`]).
//!
//! The server owns no policy: which targets exist, who may log in to which,
//! which LUNs an initiator sees and where a login is redirected all come
//! from the [`Portal`] the caller supplies. [`StaticPortal`] is the simple
//! fixed-export policy the standalone `ironblock-target` binary uses.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use crate::limits::{Limits, LoginSlots, Sessions};
use crate::login::{ChapCredentials, LoginConfig, LoginDecision};
use crate::metrics::TargetMetrics;
use crate::scsi::LunTable;

/// A target as discovery reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveredTarget {
    pub name: String,
    /// `host:port,tpgt` entries; empty means "the portal you asked".
    pub addresses: Vec<String>,
}

/// One exported target: a name and its LUN table, which may change while
/// sessions run (LUNs added, removed or resized).
pub struct ExportedTarget {
    pub name: String,
    luns: RwLock<Arc<LunTable>>,
}

impl ExportedTarget {
    pub fn new(name: impl Into<String>, luns: LunTable) -> Self {
        ExportedTarget {
            name: name.into(),
            luns: RwLock::new(Arc::new(luns)),
        }
    }
    /// A snapshot of the current LUN table.
    pub fn luns(&self) -> Arc<LunTable> {
        match self.luns.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
    pub fn set_luns(&self, luns: LunTable) {
        match self.luns.write() {
            Ok(mut g) => *g = Arc::new(luns),
            Err(p) => *p.into_inner() = Arc::new(luns),
        }
    }
}

/// The caller's policy.
pub trait Portal: Send + Sync + 'static {
    /// May `initiator` log in to `target` (`None`: discovery session)?
    fn decide(&self, initiator: &str, target: Option<&str>) -> LoginDecision;
    /// Targets `initiator` may discover (SendTargets). `local` is the portal
    /// address the initiator connected to.
    fn discover(&self, initiator: &str, local: SocketAddr) -> Vec<DiscoveredTarget>;
    /// The target for a normal session.
    fn target(&self, name: &str) -> Option<Arc<ExportedTarget>>;
    /// LUN masking: may `initiator` see `lun` of `target`?
    fn lun_visible(&self, _initiator: &str, _target: &str, _lun: u64) -> bool {
        true
    }
    /// May `initiator` only read `lun` of `target`? Asked per command, so
    /// a change applies to established sessions at their next command.
    fn lun_write_protected(&self, _initiator: &str, _target: &str, _lun: u64) -> bool {
        false
    }
    /// Changes whenever masking may have changed what some initiator sees
    /// ([`Portal::lun_visible`]). A session re-reads its LUN inventory only
    /// when this (or its target's LUN table) changed, and reports REPORTED
    /// LUNS DATA HAS CHANGED when the inventory did.
    fn view_version(&self) -> u64 {
        0
    }
}

/// Fixed exports: every target visible to everyone, optional CHAP for all.
pub struct StaticPortal {
    targets: Vec<Arc<ExportedTarget>>,
    chap: Option<ChapCredentials>,
    discovery_chap: bool,
}

impl StaticPortal {
    pub fn new(targets: Vec<Arc<ExportedTarget>>, chap: Option<ChapCredentials>) -> Self {
        StaticPortal {
            targets,
            chap,
            discovery_chap: false,
        }
    }
    /// Also require CHAP on discovery sessions.
    pub fn with_discovery_chap(mut self, on: bool) -> Self {
        self.discovery_chap = on;
        self
    }
}

impl Portal for StaticPortal {
    fn decide(&self, _initiator: &str, target: Option<&str>) -> LoginDecision {
        match target {
            None => LoginDecision::Accept {
                chap: if self.discovery_chap {
                    self.chap.clone()
                } else {
                    None
                },
            },
            Some(t) if self.targets.iter().any(|x| x.name == t) => LoginDecision::Accept {
                chap: self.chap.clone(),
            },
            Some(_) => LoginDecision::NotFound,
        }
    }
    fn discover(&self, _initiator: &str, local: SocketAddr) -> Vec<DiscoveredTarget> {
        self.targets
            .iter()
            .map(|t| DiscoveredTarget {
                name: t.name.clone(),
                addresses: vec![format!("{local},1")],
            })
            .collect()
    }
    fn target(&self, name: &str) -> Option<Arc<ExportedTarget>> {
        self.targets.iter().find(|t| t.name == name).cloned()
    }
}

/// Transport settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub login: LoginConfig,
    /// Time allowed for the whole login phase.
    pub login_timeout: Duration,
    /// Idle time before the target pings the initiator with a NOP-In.
    pub nop_interval: Duration,
    /// How long a ping may go unanswered before the connection is dropped.
    pub nop_timeout: Duration,
    /// Command window (MaxCmdSN - ExpCmdSN + 1).
    pub cmd_window: u32,
    /// Connection and buffer bounds ([`crate::limits`]).
    pub limits: Limits,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            login: LoginConfig::default(),
            login_timeout: Duration::from_secs(15),
            nop_interval: Duration::from_secs(10),
            nop_timeout: Duration::from_secs(15),
            cmd_window: 128,
            limits: Limits::default(),
        }
    }
}

/// Key of a session for reinstatement: initiator name, ISID, target.
pub(crate) type SessionKey = (String, [u8; 6], String);

pub(crate) struct SessionEntry {
    pub tsih: u16,
    pub kill: CancellationToken,
}

/// State shared by every connection of a server.
pub struct Shared {
    pub(crate) portal: Arc<dyn Portal>,
    pub(crate) config: ServerConfig,
    pub(crate) sessions: Mutex<HashMap<SessionKey, SessionEntry>>,
    next_tsih: AtomicU16,
    connections: AtomicUsize,
    pub(crate) shutdown: CancellationToken,
    /// Cancelled by [`Server::abort`]: every connection task ends at once.
    abort: CancellationToken,
    pub(crate) metrics: Arc<TargetMetrics>,
    pub(crate) login_slots: Arc<LoginSlots>,
    pub(crate) full_feature: Arc<Sessions>,
}

impl Shared {
    /// After [`Server::abort`]: forget every session (their tasks are
    /// gone).
    fn abort_session_entries(&self) {
        if let Ok(mut s) = self.sessions.lock() {
            s.clear();
        }
    }

    pub(crate) fn alloc_tsih(&self) -> u16 {
        loop {
            let t = self.next_tsih.fetch_add(1, Ordering::Relaxed);
            if t != 0 {
                return t;
            }
        }
    }
}

/// An iSCSI target server.
#[derive(Clone)]
pub struct Server {
    shared: Arc<Shared>,
}

impl Server {
    pub fn new(portal: Arc<dyn Portal>, config: ServerConfig) -> Self {
        Server {
            shared: Arc::new(Shared {
                portal,
                sessions: Mutex::new(HashMap::new()),
                next_tsih: AtomicU16::new(1),
                connections: AtomicUsize::new(0),
                shutdown: CancellationToken::new(),
                abort: CancellationToken::new(),
                metrics: Arc::new(TargetMetrics::default()),
                login_slots: LoginSlots::new(config.limits.max_login_connections),
                full_feature: Sessions::new(&config.limits),
                config,
            }),
        }
    }

    /// Accept connections until [`Server::shutdown`] is called.
    pub async fn serve(&self, listener: TcpListener) -> std::io::Result<()> {
        let local = listener.local_addr()?;
        info!(%local, "listening");
        loop {
            let accepted = tokio::select! {
                _ = self.shared.shutdown.cancelled() => break,
                a = listener.accept() => a,
            };
            let (stream, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let shared = self.shared.clone();
            shared.connections.fetch_add(1, Ordering::Relaxed);
            shared.metrics.connections.inc();
            let (slot, evicted) = shared.login_slots.admit();
            if evicted > 0 {
                shared.metrics.refuse("login_evicted", evicted as u64);
            }
            let span = tracing::info_span!("conn", %peer);
            tokio::spawn(
                async move {
                    tokio::select! {
                        _ = crate::conn::run(stream, shared.clone(), slot) => {}
                        _ = shared.abort.cancelled() => {
                            // Dropping the connection's future closes its
                            // socket (the writer task ends with it).
                            shared.abort_session_entries();
                        }
                    }
                    shared.connections.fetch_sub(1, Ordering::Relaxed);
                    shared.metrics.connections.dec();
                }
                .instrument(span),
            );
        }
        Ok(())
    }

    /// Stop accepting, ask every session to log out, and drop them.
    pub fn shutdown(&self) {
        self.shared.shutdown.cancel();
    }

    /// Stop accepting and close every connection at once, in any phase
    /// (login or full feature), without a logout handshake. For a portal
    /// that must stop answering right now, e.g. a redirector that lost the
    /// VIP lease. Sessions are dropped without their per-LUN teardown, so
    /// the server must not be used again afterwards.
    pub fn abort(&self) {
        self.shared.shutdown.cancel();
        self.shared.abort.cancel();
    }

    /// The server's metrics (render with [`TargetMetrics::render`]).
    pub fn metrics(&self) -> Arc<TargetMetrics> {
        self.shared.metrics.clone()
    }

    /// Connections currently open.
    pub fn connection_count(&self) -> usize {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// Sessions in full feature phase.
    pub fn session_count(&self) -> usize {
        self.shared.sessions.lock().map(|s| s.len()).unwrap_or(0)
    }

    /// Wait (bounded) until every connection has closed.
    pub async fn drain(&self, limit: Duration) {
        self.drain_until(0, limit).await
    }

    /// Wait (bounded) until at most `left` connections are open.
    pub async fn drain_until(&self, left: usize, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while self.connection_count() > left && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
