//! The meta daemon's command line, shared by the `ironblock-meta` binary and
//! `ironblock meta`: [`MetaArgs`] (clap, with environment variables) and
//! [`run`], which serves until SIGTERM or SIGINT.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tracing::info;

use crate::server::{parse_duration, serve, Config};

/// Flags of the meta service daemon.
#[derive(clap::Args, Debug, Clone)]
pub struct MetaArgs {
    /// gRPC listen address.
    #[arg(long, env = "IRONBLOCK_META_LISTEN", default_value = "127.0.0.1:7000")]
    pub listen: SocketAddr,
    /// Directory of the sled metadata store (created if missing).
    #[arg(long, env = "IRONBLOCK_META_DATA")]
    pub data: PathBuf,
    /// A chunk without a heartbeat for this long is declared dead.
    #[arg(long, env = "IRONBLOCK_META_LIVENESS_TIMEOUT", default_value = "3s", value_parser = parse_duration)]
    pub liveness_timeout: Duration,
    /// Serve Prometheus metrics (GET /metrics) on this address.
    #[arg(long, env = "IRONBLOCK_META_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Data locality: once a volume's chunks served this many MiB of its
    /// I/O, the chunk that served 90% of them becomes its home, and an RF=1
    /// volume's extents move there. 0 turns locality off.
    #[arg(
        long,
        env = "IRONBLOCK_META_LOCALITY_WINDOW_MIB",
        default_value_t = 256
    )]
    pub locality_window_mib: u64,
    /// This node's id in the meta group (1, 2, 3, ...).
    #[arg(long, env = "IRONBLOCK_META_ID", default_value_t = 1)]
    pub id: u64,
    /// The address members and clients reach this node at (default: the
    /// listen address; set it when listening on 0.0.0.0).
    #[arg(long, env = "IRONBLOCK_META_ADVERTISE")]
    pub advertise: Option<String>,
    /// The group's first voters, `id=host:port,...` (default: this node
    /// alone). Read only when the node's store is new; every first voter
    /// gets the same list.
    #[arg(long, env = "IRONBLOCK_META_PEERS", default_value = "", value_parser = parse_peer_list)]
    pub peers: PeerList,
    /// Do not form a group: wait to be added (`ironblock meta add`).
    #[arg(long, env = "IRONBLOCK_META_JOIN")]
    pub join: bool,
    /// Raft's minimum election timeout: a dead leader is replaced after 3 to
    /// 4 times this (openraft waits out the old leader's lease, twice this,
    /// then a random timeout between this and twice this). Keep 4 times it
    /// well under the liveness timeout (the chunks' lease). The leader
    /// heartbeats every sixth of it.
    #[arg(long, env = "IRONBLOCK_META_ELECTION_TIMEOUT", default_value = "300ms", value_parser = parse_duration)]
    pub election_timeout: Duration,
}

/// `--peers`, parsed.
#[derive(Clone, Debug, Default)]
pub struct PeerList(pub BTreeMap<u64, String>);

fn parse_peer_list(s: &str) -> Result<PeerList, String> {
    Ok(PeerList(
        crate::raft::parse_peers(s)?
            .into_iter()
            .map(|(id, n)| (id, n.addr))
            .collect(),
    ))
}

impl MetaArgs {
    /// The server configuration these flags describe.
    pub fn config(&self) -> Config {
        Config {
            listen: self.listen,
            data_dir: self.data.clone(),
            liveness_timeout: self.liveness_timeout,
            metrics_listen: self.metrics_listen,
            locality_window_bytes: self.locality_window_mib.saturating_mul(1 << 20),
            node_id: self.id,
            advertise: self.advertise.clone(),
            peers: self.peers.0.clone(),
            join: self.join,
            timing: crate::raft::Timing {
                heartbeat: (self.election_timeout / 6).max(Duration::from_millis(10)),
                election_min: self.election_timeout,
            },
        }
    }
}

/// Runs the meta service until SIGTERM or SIGINT (Ctrl-C), then stops it
/// cleanly. The caller sets up logging.
pub async fn run(args: MetaArgs) -> anyhow::Result<()> {
    let config = args.config();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => info!("SIGINT: shutting down"),
        }
    };
    serve(config, shutdown)
        .await
        .context("meta service failed")?;
    Ok(())
}
