//! `ironblock-meta`: the meta service daemon (flags: [`ironblock_meta::cli::MetaArgs`]).

use clap::Parser;
use ironblock_meta::cli::{run, MetaArgs};

/// ironblock cluster metadata service (gRPC).
#[derive(Parser, Debug)]
#[command(name = "ironblock-meta", version)]
struct Args {
    #[command(flatten)]
    meta: MetaArgs,
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
    run(Args::parse().meta).await
}
