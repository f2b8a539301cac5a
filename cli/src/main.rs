//! `ironblock`: see the crate documentation of `ironblock_cli`.

use std::process::ExitCode;

use clap::Parser;
use ironblock_cli::admin::Admin;
use ironblock_cli::args::{ChunkCmd, Cli, Command, MetaCmd, MetaMemberCmd};
use ironblock_cli::client::Meta;
use ironblock_cli::dev;

fn init_tracing(default: &str) {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .init();
}

async fn admin(cli: &Cli) -> anyhow::Result<Admin> {
    Ok(Admin {
        meta: Meta::connect(&cli.meta, cli.timeout).await?,
        output: cli.output,
    })
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Meta(MetaCmd {
            member: Some(ref m),
            ..
        }) => {
            let mut a = admin(&cli).await?;
            match m {
                MetaMemberCmd::List => a.meta_list().await,
                MetaMemberCmd::Add { id, addr } => a.meta_change(*id, Some(addr.clone())).await,
                MetaMemberCmd::Remove { id } => a.meta_change(*id, None).await,
            }
        }
        Command::Meta(MetaCmd {
            daemon: Some(args), ..
        }) => ironblock_meta::cli::run(args).await,
        Command::Meta(_) => {
            anyhow::bail!("ironblock meta: give the daemon's flags (--data ...) or list|add|remove")
        }
        Command::Redirector(args) => ironblock_redirector::cli::run(args).await,
        Command::Dev(args) => dev::run(args).await,
        Command::Chunk(ChunkCmd::Server(cmd)) => ironblock_chunk::cli::run_command(*cmd).await,
        Command::Chunk(ChunkCmd::List) => admin(&cli).await?.chunk_list().await,
        Command::Chunk(ChunkCmd::Drain { id }) => admin(&cli).await?.chunk_change(id, true).await,
        Command::Chunk(ChunkCmd::Remove { id }) => admin(&cli).await?.chunk_change(id, false).await,
        Command::Status => admin(&cli).await?.status().await,
        Command::Volume(ref c) => admin(&cli).await?.volume(c.clone()).await,
        Command::Snapshot(ref c) => admin(&cli).await?.snapshot(c.clone()).await,
        Command::Acl(ref c) => admin(&cli).await?.acl(c.clone()).await,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let daemon = matches!(
        cli.command,
        Command::Meta(MetaCmd { member: None, .. })
            | Command::Redirector(_)
            | Command::Dev(_)
            | Command::Chunk(ChunkCmd::Server(_))
    );
    init_tracing(if daemon { "info" } else { "warn" });
    // `dev` runs on the main thread only: its children's parent-death
    // signal is tied to the thread that spawned them.
    let rt = if matches!(cli.command, Command::Dev(_)) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if let Command::Chunk(ChunkCmd::Server(cmd)) = &cli.command {
            // The chunk server sizes its own runtime (`--worker-threads`).
            b.worker_threads(cmd.worker_threads());
        }
        b.enable_all().build()
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
