//! The `ironblock-chunk` command line: `init` and `run`, every flag also
//! from an `IRONBLOCK_CHUNK_<FLAG>` environment variable. The binary is a
//! thin wrapper around [`run_command`].

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use tracing::info;

use crate::node::{self, Node, NodeConfig};

/// `ironblock-chunk` subcommands.
#[derive(Subcommand, Debug, Clone)]
pub enum ChunkCommand {
    /// Register a new chunk with meta and stamp the data directory.
    Init(InitArgs),
    /// Serve a stamped data directory.
    Run(RunArgs),
}

/// `ironblock-chunk init`.
#[derive(Args, Debug, Clone)]
pub struct InitArgs {
    /// Data directory (created if missing).
    #[arg(long, env = "IRONBLOCK_CHUNK_DATA")]
    pub data: PathBuf,
    /// Meta address, `host:port` or `http://host:port`.
    #[arg(long, env = "IRONBLOCK_CHUNK_META")]
    pub meta: String,
    /// iSCSI portal to register (replaced by the real one at `run`).
    #[arg(long, env = "IRONBLOCK_CHUNK_PORTAL", default_value = "127.0.0.1:3261")]
    pub portal: String,
    /// Replica address to register (replaced by the real one at `run`).
    #[arg(
        long,
        env = "IRONBLOCK_CHUNK_DATA_ADDR",
        default_value = "127.0.0.1:3262"
    )]
    pub data_addr: String,
    /// Re-stamp an already stamped directory, wiping its extents.
    #[arg(long, env = "IRONBLOCK_CHUNK_FORCE")]
    pub force: bool,
}

/// `ironblock-chunk run`.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Data directory (stamped by `init`).
    #[arg(long, env = "IRONBLOCK_CHUNK_DATA")]
    pub data: PathBuf,
    /// Meta address, `host:port` or `http://host:port`.
    #[arg(long, env = "IRONBLOCK_CHUNK_META")]
    pub meta: String,
    /// iSCSI bind address.
    #[arg(long, env = "IRONBLOCK_CHUNK_LISTEN", default_value = "127.0.0.1:3261")]
    pub listen: SocketAddr,
    /// Replica (chunk-to-chunk) transport bind address.
    #[arg(
        long,
        env = "IRONBLOCK_CHUNK_DATA_LISTEN",
        default_value = "127.0.0.1:0"
    )]
    pub data_listen: SocketAddr,
    /// Advertised iSCSI portal (default: the bound address).
    #[arg(long, env = "IRONBLOCK_CHUNK_PORTAL")]
    pub portal: Option<String>,
    /// Advertised replica address (default: the bound address).
    #[arg(long, env = "IRONBLOCK_CHUNK_DATA_ADDR")]
    pub data_addr: Option<String>,
    /// Serve Prometheus metrics (GET /metrics) here.
    #[arg(long, env = "IRONBLOCK_CHUNK_METRICS")]
    pub metrics: Option<SocketAddr>,
    /// Pause between scrub passes (e.g. 1h, 30s, 500ms); 0 disables.
    #[arg(long, env = "IRONBLOCK_CHUNK_SCRUB_INTERVAL", default_value = "1h", value_parser = parse_duration)]
    pub scrub_interval: Duration,
    /// Logical block size of every LUN.
    #[arg(long, env = "IRONBLOCK_CHUNK_BLOCK_SIZE", default_value_t = 512, value_parser = parse_block_size)]
    pub block_size: u32,
    /// Idle time before the target pings an initiator.
    #[arg(long, env = "IRONBLOCK_CHUNK_NOP_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub nop_interval: Duration,
    /// Least time between two full garbage collections after revision
    /// changes (copies meta moved off this chunk give their space back
    /// within about this long); 0: no limit.
    #[arg(long, env = "IRONBLOCK_CHUNK_GC_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub gc_interval: Duration,
}

/// `500ms`, `3s`, `2m`, `1h`, or a bare number of seconds; `0` is zero.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (try 30s, 500ms or 1h)"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("invalid duration unit in {s:?} (ms, s, m or h)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("duration {s:?} must not be negative"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn parse_block_size(s: &str) -> Result<u32, String> {
    match s.trim() {
        "512" => Ok(512),
        "4096" => Ok(4096),
        _ => Err(format!("block size {s:?} must be 512 or 4096")),
    }
}

impl RunArgs {
    /// The node configuration these flags describe.
    pub fn node_config(&self) -> NodeConfig {
        NodeConfig {
            data_dir: self.data.clone(),
            meta: self.meta.clone(),
            listen: self.listen,
            data_listen: self.data_listen,
            portal: self.portal.clone(),
            data_addr: self.data_addr.clone(),
            metrics: self.metrics,
            scrub_interval: self.scrub_interval,
            block_size: self.block_size,
            nop_interval: self.nop_interval,
            gc_interval: self.gc_interval,
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn termination() {
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
    match term {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => info!("SIGTERM: shutting down"),
                _ = tokio::signal::ctrl_c() => info!("SIGINT: shutting down"),
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "no SIGTERM handler; only SIGINT stops the chunk");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Run one `ironblock-chunk` command to the end. `run` prints exactly one
/// stdout line `ready chunk=<id> portal=<addr> data=<addr>` once it serves,
/// and returns after SIGTERM/SIGINT and a clean shutdown.
pub async fn run_command(cmd: ChunkCommand) -> anyhow::Result<()> {
    match cmd {
        ChunkCommand::Init(a) => {
            let id = node::init(&a.data, &a.meta, &a.portal, &a.data_addr, a.force)
                .await
                .with_context(|| format!("initialising {}", a.data.display()))?;
            let mut out = std::io::stdout().lock();
            writeln!(out, "chunk {} cluster {}", id.chunk_id, id.cluster_id)?;
            out.flush()?;
            Ok(())
        }
        ChunkCommand::Run(a) => {
            let node = Node::start(a.node_config())
                .await
                .with_context(|| format!("starting the chunk on {}", a.data.display()))?;
            {
                let mut out = std::io::stdout().lock();
                writeln!(
                    out,
                    "ready chunk={} portal={} data={}",
                    node.chunk_id(),
                    node.portal(),
                    node.data_addr()
                )?;
                out.flush()?;
            }
            if let Some(m) = node.metrics_addr() {
                info!(addr = %m, "metrics at http://{m}/metrics");
            }
            node.run(termination()).await;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(subcommand)]
        cmd: ChunkCommand,
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("3 parsecs").is_err());
    }

    #[test]
    fn run_flags_and_defaults() {
        let c = Cli::try_parse_from([
            "x",
            "run",
            "--data",
            "/d",
            "--meta",
            "127.0.0.1:7000",
            "--scrub-interval",
            "0",
            "--block-size",
            "4096",
        ])
        .unwrap();
        let ChunkCommand::Run(r) = c.cmd else {
            panic!("not run")
        };
        let n = r.node_config();
        assert_eq!(n.listen, "127.0.0.1:3261".parse().unwrap());
        assert_eq!(n.data_listen.port(), 0);
        assert_eq!(n.block_size, 4096);
        assert!(n.scrub_interval.is_zero());
        assert_eq!(n.nop_interval, Duration::from_secs(10));
        assert_eq!(n.gc_interval, crate::gc::DEFAULT_GC_INTERVAL);
        assert_eq!(
            NodeConfig::new("/d".into(), "m".into()).gc_interval,
            n.gc_interval,
            "the library default is the CLI's"
        );
        assert!(n.portal.is_none());
        assert!(Cli::try_parse_from([
            "x",
            "run",
            "--data",
            "/d",
            "--meta",
            "m",
            "--block-size",
            "1024"
        ])
        .is_err());
        let c = Cli::try_parse_from([
            "x",
            "run",
            "--data",
            "/d",
            "--meta",
            "m",
            "--gc-interval",
            "250ms",
        ])
        .unwrap();
        let ChunkCommand::Run(r) = c.cmd else {
            panic!("not run")
        };
        assert_eq!(r.node_config().gc_interval, Duration::from_millis(250));
        let c =
            Cli::try_parse_from(["x", "init", "--data", "/d", "--meta", "m", "--force"]).unwrap();
        assert!(matches!(
            c.cmd,
            ChunkCommand::Init(InitArgs { force: true, .. })
        ));
    }
}
