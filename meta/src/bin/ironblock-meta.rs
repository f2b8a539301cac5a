//! `ironblock-meta`: the meta service daemon.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use ironblock_meta::{parse_duration, serve, Config};
use tracing::info;

/// ironblock cluster metadata service (gRPC).
#[derive(Parser, Debug)]
#[command(name = "ironblock-meta", version)]
struct Args {
    /// gRPC listen address.
    #[arg(long, env = "IRONBLOCK_META_LISTEN", default_value = "127.0.0.1:7000")]
    listen: SocketAddr,
    /// Directory of the sled metadata store (created if missing).
    #[arg(long, env = "IRONBLOCK_META_DATA")]
    data: PathBuf,
    /// A chunk without a heartbeat for this long is declared dead.
    #[arg(long, env = "IRONBLOCK_META_LIVENESS_TIMEOUT", default_value = "3s", value_parser = parse_duration)]
    liveness_timeout: Duration,
    /// Serve Prometheus metrics (GET /metrics) on this address.
    #[arg(long, env = "IRONBLOCK_META_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let config = Config {
        listen: args.listen,
        data_dir: args.data,
        liveness_timeout: args.liveness_timeout,
        metrics_listen: args.metrics_listen,
    };
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
