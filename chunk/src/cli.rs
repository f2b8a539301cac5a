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
    /// Time an iSCSI connection may take to log in; a slower one (an idle
    /// or slow-loris connection) is closed.
    #[arg(long, env = "IRONBLOCK_CHUNK_LOGIN_TIMEOUT", default_value = "15s", value_parser = parse_duration)]
    pub login_timeout: Duration,
    /// Least time between two full garbage collections after revision
    /// changes (copies meta moved off this chunk give their space back
    /// within about this long); 0: no limit.
    #[arg(long, env = "IRONBLOCK_CHUNK_GC_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub gc_interval: Duration,
    /// Threads that run the iSCSI, replica and meta traffic (the async
    /// runtime's workers; disk transfers above 64 KiB, fsyncs and copies
    /// run on a separate blocking pool). 0 = half the CPUs, at least one.
    #[arg(long, env = "IRONBLOCK_CHUNK_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,
}

/// The default number of runtime workers on a machine with `cpus` CPUs:
/// half of them, at least one.
///
/// A chunk server is hyperconverged: it shares its node with the
/// workloads whose I/O it serves, so it should leave them CPU. And on a
/// small node one worker is also the faster choice, not only the frugal
/// one: most of a 4 KiB command's cost is hand-offs between tasks, which a
/// second worker turns into cross-thread wake-ups (futex + epoll) without
/// running anything in parallel. Measured on a 2-CPU host (bench rig,
/// qemu-img bench QD32 4 KiB writes, chunk CPU per command): 20.8 µs with
/// two workers and 12.8 µs with one, at 46k against 67k IOPS (RF=1);
/// RF=2 29k against 32k IOPS. Reads at QD32 through libiscsi's iscsi-perf
/// do better with two (78k against 64k IOPS, same CPU per command), which
/// is why bigger nodes get more than one.
pub fn default_worker_threads(cpus: usize) -> usize {
    (cpus / 2).max(1)
}

impl ChunkCommand {
    /// How many runtime workers this command wants (see
    /// [`RunArgs::worker_threads`]); `init` needs one.
    pub fn worker_threads(&self) -> usize {
        match self {
            ChunkCommand::Init(_) => 1,
            ChunkCommand::Run(r) if r.worker_threads > 0 => r.worker_threads,
            ChunkCommand::Run(_) => {
                default_worker_threads(std::thread::available_parallelism().map_or(1, |n| n.get()))
            }
        }
    }
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
            login_timeout: self.login_timeout,
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
        assert_eq!(c.cmd.worker_threads(), 1);
    }

    #[test]
    fn worker_threads_default_to_half_the_cpus_and_can_be_set() {
        assert_eq!(default_worker_threads(1), 1);
        assert_eq!(default_worker_threads(2), 1);
        assert_eq!(default_worker_threads(3), 1);
        assert_eq!(default_worker_threads(16), 8);
        let run = |extra: &[&str]| {
            let mut args = vec!["x", "run", "--data", "/d", "--meta", "m"];
            args.extend_from_slice(extra);
            Cli::try_parse_from(args).unwrap().cmd
        };
        assert_eq!(run(&["--worker-threads", "3"]).worker_threads(), 3);
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(run(&[]).worker_threads(), default_worker_threads(cpus));
        assert_eq!(
            run(&["--worker-threads", "0"]).worker_threads(),
            default_worker_threads(cpus)
        );
        assert!(Cli::try_parse_from([
            "x",
            "run",
            "--data",
            "/d",
            "--meta",
            "m",
            "--worker-threads",
            "-1"
        ])
        .is_err());
    }
}
