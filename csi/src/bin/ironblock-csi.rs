//! `ironblock-csi --endpoint unix:///PATH --mode controller|node|all
//! --meta ADDR [--cluster-id ID] [--node-id IQN]`: the CSI driver process.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use ironblock_csi::controller::{ControllerConfig, ControllerService};
use ironblock_csi::identity::{IdentityService, ReadyCheck};
use ironblock_csi::node::host::HostInitiator;
use ironblock_csi::node::{NodeConfig, NodeService};
use ironblock_csi::topology::ClusterId;
use tracing::info;

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    Controller,
    Node,
    All,
}

/// The ironblock CSI driver (Identity + Controller and/or Node on a unix socket).
#[derive(Parser, Debug)]
#[command(name = "ironblock-csi", version)]
struct Args {
    /// The CSI endpoint, unix:///PATH.
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    endpoint: String,
    /// Which services to serve besides Identity.
    #[arg(long, env = "IRONBLOCK_CSI_MODE", value_enum, default_value = "all")]
    mode: Mode,
    /// meta's gRPC address (controller; a node without --cluster-id learns
    /// the cluster id from it).
    #[arg(long, env = "IRONBLOCK_META")]
    meta: Option<String>,
    /// The cluster id (`ironblock status`): the node's topology segment
    /// topology.ironblock.io/cluster. A node needs it or --meta; the
    /// controller checks meta's against it.
    #[arg(long, env = "IRONBLOCK_CLUSTER_ID")]
    cluster_id: Option<String>,
    /// The node id: this node's iSCSI initiator name (IQN). A plain name N
    /// becomes iqn.2026-11.dev.ironblock.node:N. Default: the InitiatorName
    /// in /etc/iscsi/initiatorname.iscsi.
    #[arg(long, env = "NODE_ID")]
    node_id: Option<String>,
    /// The iSCSI portal (the redirector's VIP, host:port) handed to nodes.
    #[arg(long, env = "IRONBLOCK_PORTAL")]
    portal: Option<String>,
    /// Replication factor when the StorageClass does not set one.
    #[arg(long, env = "IRONBLOCK_CSI_DEFAULT_REPLICAS", default_value_t = 2)]
    default_replicas: u32,
    /// Node: where staged volumes are recorded.
    #[arg(
        long,
        env = "IRONBLOCK_CSI_STATE_DIR",
        default_value = "/var/lib/ironblock-csi"
    )]
    state_dir: PathBuf,
    /// Node: timeout of every external command, in seconds.
    #[arg(long, env = "IRONBLOCK_CSI_COMMAND_TIMEOUT", default_value_t = 60)]
    command_timeout: u64,
    /// Node: external commands running at once.
    #[arg(long, env = "IRONBLOCK_CSI_MAX_COMMANDS", default_value_t = 8)]
    max_commands: usize,
    /// Serve Prometheus metrics (GET /metrics) on this address.
    #[arg(long, env = "IRONBLOCK_CSI_METRICS")]
    metrics: Option<std::net::SocketAddr>,
    /// Node: run every operation under one global lock (only the baseline
    /// of the 100-volume benchmark; never in production).
    #[arg(long, env = "IRONBLOCK_CSI_GLOBAL_LOCK")]
    global_lock: bool,
    /// Node: stages/unstages running at once.
    #[arg(long, env = "IRONBLOCK_CSI_MAX_PARALLEL", default_value_t = 16)]
    max_parallel: usize,
}

fn node_iqn(arg: Option<&str>) -> anyhow::Result<String> {
    if let Some(a) = arg {
        if ironblock_csi::names::is_iscsi_name(a) {
            return Ok(a.to_string());
        }
        if a.is_empty()
            || !a
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'))
        {
            bail!("--node-id {a:?}: expected an IQN or a host name");
        }
        return Ok(format!(
            "iqn.2026-11.dev.ironblock.node:{}",
            a.to_ascii_lowercase()
        ));
    }
    let f = "/etc/iscsi/initiatorname.iscsi";
    let text =
        std::fs::read_to_string(f).with_context(|| format!("no --node-id and cannot read {f}"))?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("InitiatorName="))
        .map(str::to_string)
        .find(|n| ironblock_csi::names::is_iscsi_name(n))
        .with_context(|| format!("no InitiatorName in {f}"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if let Some(addr) = args.metrics {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the metrics listener {addr}"))?;
        info!(%addr, "metrics on /metrics");
        tokio::spawn(ironblock_csi::metrics::serve(l));
    }
    let want_controller = matches!(args.mode, Mode::Controller | Mode::All);
    let want_node = matches!(args.mode, Mode::Node | Mode::All);

    let controller = if want_controller {
        let meta = args
            .meta
            .as_deref()
            .context("--meta (IRONBLOCK_META) is required in controller mode")?;
        Some(ControllerService::new(
            meta,
            ControllerConfig {
                portal: args.portal.clone(),
                default_replicas: args.default_replicas,
                cluster_id: args.cluster_id.clone(),
                ..ControllerConfig::default()
            },
        )?)
    } else {
        None
    };
    let node = if want_node {
        let iqn = node_iqn(args.node_id.as_deref())?;
        let mut cfg = NodeConfig::new(&iqn, &args.state_dir);
        // The node's topology: the controller's source in `--mode all`,
        // else --cluster-id, else meta's answer.
        cfg.cluster = Some(match &controller {
            Some(c) => c.cluster(),
            None => {
                if args.cluster_id.is_none() && args.meta.is_none() {
                    bail!(
                        "node mode needs the cluster id for its topology: \
                         --cluster-id (IRONBLOCK_CLUSTER_ID) or --meta (IRONBLOCK_META)"
                    );
                }
                let meta = match (&args.cluster_id, &args.meta) {
                    (None, Some(m)) => Some(ironblock_csi::controller::meta_client(
                        m,
                        Duration::from_secs(15),
                    )?),
                    _ => None,
                };
                Arc::new(ClusterId::new(args.cluster_id.as_deref(), meta)?)
            }
        });
        cfg.portal = args.portal.clone();
        cfg.max_parallel = args.max_parallel;
        cfg.global_lock = args.global_lock;
        let host = Arc::new(
            HostInitiator::new(Duration::from_secs(args.command_timeout), args.max_commands)
                .with_initiator_name(&iqn),
        );
        info!(node_id = %iqn, "node service");
        Some(NodeService::new(cfg, host)?)
    } else {
        None
    };
    let ready: Option<ReadyCheck> = controller.clone().map(|c| {
        let f: ReadyCheck = Arc::new(move || {
            let c = c.clone();
            Box::pin(async move { c.health().await })
        });
        f
    });
    let identity = IdentityService {
        controller: want_controller,
        ready,
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => info!("SIGINT: shutting down"),
        }
    };
    ironblock_csi::server::serve(
        &args.endpoint,
        identity,
        controller,
        node,
        |p| {
            println!("ready endpoint={}", p.display());
            info!(endpoint = %p.display(), mode = ?args.mode, "serving CSI");
        },
        shutdown,
    )
    .await
    .context("CSI server failed")?;
    Ok(())
}
