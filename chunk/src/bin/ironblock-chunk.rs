//! `ironblock-chunk`: the chunk server (`init` stamps a data directory,
//! `run` serves it). All logic lives in `ironblock_chunk::cli`.

use clap::Parser;
use ironblock_chunk::cli::{run_command, ChunkCommand};

/// ironblock chunk server: extent storage, replication and iSCSI.
#[derive(Parser, Debug)]
#[command(name = "ironblock-chunk", version)]
struct Cli {
    #[command(subcommand)]
    cmd: ChunkCommand,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cmd = Cli::parse().cmd;
    let workers = cmd.worker_threads();
    tracing::debug!(workers, "async runtime");
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?
        .block_on(run_command(cmd))
}
