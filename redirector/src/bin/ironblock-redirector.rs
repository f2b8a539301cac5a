//! `ironblock-redirector`: see the library's crate doc.

use clap::Parser;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = ironblock_redirector::cli::Args::parse();
    if let Err(e) = ironblock_redirector::cli::run(args).await {
        eprintln!("ironblock-redirector: {e:#}");
        std::process::exit(1);
    }
}
