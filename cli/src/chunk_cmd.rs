//! `ironblock chunk init|run`: STUB until the chunk server's library entry
//! point (`ironblock_chunk::cli::{ChunkCommand, run_command}`) is merged; it
//! replaces [`ChunkServerCommand`] and [`run_command`] one for one. Until
//! then the arguments are handed to the `ironblock-chunk` binary next to the
//! current executable, which replaces this process (exec).

use std::os::unix::process::CommandExt;

use anyhow::Context;
use clap::Subcommand;

/// The chunk server commands (stub: raw arguments).
#[derive(Subcommand, Debug, Clone)]
pub enum ChunkServerCommand {
    /// Register a new chunk with meta and stamp its data directory.
    #[command(disable_help_flag = true)]
    Init(RawArgs),
    /// Serve a stamped chunk (iSCSI portal, replica gRPC, heartbeats).
    #[command(disable_help_flag = true)]
    Run(RawArgs),
}

/// Arguments passed through unparsed (`--meta` is the global flag, so it is
/// captured here and passed on).
#[derive(clap::Args, Debug, Clone)]
pub struct RawArgs {
    /// Meta address.
    #[arg(long)]
    pub meta: Option<String>,
    /// Everything else, passed to `ironblock-chunk` as is.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    pub args: Vec<String>,
}

/// The subcommand and the arguments for `ironblock-chunk`: the raw ones,
/// with `--meta` (given before the subcommand, in the environment or the
/// default) in front unless they carry their own.
fn argv(cmd: ChunkServerCommand) -> (&'static str, Vec<String>) {
    let (sub, raw) = match cmd {
        ChunkServerCommand::Init(a) => ("init", a),
        ChunkServerCommand::Run(a) => ("run", a),
    };
    let own_meta = raw
        .args
        .iter()
        .any(|a| a == "--meta" || a.starts_with("--meta="));
    let mut out = Vec::new();
    if let (Some(m), false) = (raw.meta, own_meta) {
        out.push("--meta".to_string());
        out.push(m);
    }
    out.extend(raw.args);
    (sub, out)
}

/// Runs the command by exec'ing `ironblock-chunk`; returns only on failure.
pub async fn run_command(cmd: ChunkServerCommand) -> anyhow::Result<()> {
    let (sub, args) = argv(cmd);
    let exe = std::env::current_exe().context("locating the current executable")?;
    let bin = exe.with_file_name("ironblock-chunk");
    let err = std::process::Command::new(&bin).arg(sub).args(args).exec();
    Err(anyhow::anyhow!("cannot run {}: {err}", bin.display()))
}

#[cfg(test)]
mod tests {
    use crate::args::{ChunkCmd, Cli, Command};
    use clap::Parser;

    fn raw(argv: &[&str]) -> Vec<String> {
        let c = Cli::try_parse_from(argv).unwrap();
        match c.command {
            Command::Chunk(ChunkCmd::Server(cmd)) => super::argv(cmd).1,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn arguments_pass_through_with_one_meta() {
        let a = raw(&[
            "ironblock",
            "chunk",
            "init",
            "--data",
            "/d",
            "--meta",
            "127.0.0.1:1",
            "--force",
        ]);
        assert_eq!(a, ["--data", "/d", "--meta", "127.0.0.1:1", "--force"]);
        let a = raw(&[
            "ironblock",
            "chunk",
            "run",
            "--meta",
            "127.0.0.1:2",
            "--data",
            "/d",
        ]);
        assert_eq!(a, ["--meta", "127.0.0.1:2", "--data", "/d"]);
        let a = raw(&[
            "ironblock",
            "--meta",
            "127.0.0.1:3",
            "chunk",
            "run",
            "--data",
            "/d",
        ]);
        assert_eq!(a, ["--meta", "127.0.0.1:3", "--data", "/d"]);
        let a = raw(&["ironblock", "chunk", "run", "--help"]);
        assert_eq!(a, ["--meta", "127.0.0.1:7000", "--help"]);
    }
}
