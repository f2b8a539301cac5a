//! `ironblock-target`: export file-backed LUNs over iSCSI.
//!
//! ```text
//! ironblock-target --listen 127.0.0.1:3260 --iqn IQN --lun 1=PATH:SIZE \
//!     [--lun 2=...] [--chap USER:SECRET] [--mutual-chap USER:SECRET]
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use ironblock_target::file_device::{identity_for, parse_size, FileDevice};
use ironblock_target::login::{ChapCredentials, LoginConfig};
use ironblock_target::scsi::{LogicalUnit, LuConfig, LunTable};
use ironblock_target::server::{ExportedTarget, Server, ServerConfig, StaticPortal};
use tracing::info;

#[derive(Parser, Debug)]
#[command(
    name = "ironblock-target",
    version,
    about = "Export file-backed LUNs over iSCSI (RFC 7143)"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "IRONBLOCK_LISTEN", default_value = "127.0.0.1:3260")]
    listen: SocketAddr,
    /// Target name (IQN) to export.
    #[arg(long, env = "IRONBLOCK_IQN")]
    iqn: String,
    /// A LUN: `N=PATH:SIZE` (SIZE like 1GiB; the file is created sparse if
    /// missing; `:SIZE` may be left out for an existing file). Repeatable.
    #[arg(long = "lun", required = true)]
    luns: Vec<String>,
    /// Require one-way CHAP with this `USER:SECRET`.
    #[arg(long, env = "IRONBLOCK_CHAP")]
    chap: Option<String>,
    /// Answer mutual CHAP with this `USER:SECRET` (needs --chap).
    #[arg(long, env = "IRONBLOCK_MUTUAL_CHAP")]
    mutual_chap: Option<String>,
    /// Also require CHAP on discovery sessions.
    #[arg(long)]
    discovery_chap: bool,
    /// Logical block size in bytes (512 or 4096).
    #[arg(long, default_value_t = 512)]
    block_size: u32,
    /// Refuse header/data digests even when the initiator offers them.
    /// (By default CRC32C digests are accepted when the initiator offers
    /// them first.)
    #[arg(long, conflicts_with_all = ["header_digest", "data_digest"])]
    no_digests: bool,
    /// Require CRC32C header digests (refuse HeaderDigest=None).
    #[arg(long)]
    header_digest: bool,
    /// Require CRC32C data digests (refuse DataDigest=None).
    #[arg(long)]
    data_digest: bool,
    /// Serve Prometheus metrics on this address (`GET /metrics`).
    #[arg(long, env = "IRONBLOCK_METRICS")]
    metrics: Option<SocketAddr>,
    /// Seconds of idle time before the target pings the initiator.
    #[arg(long, default_value_t = 10)]
    nop_interval: u64,
}

fn split_cred(s: &str, what: &str) -> Result<(String, Vec<u8>)> {
    match s.split_once(':') {
        Some((u, p)) if !u.is_empty() && !p.is_empty() => {
            Ok((u.to_string(), p.as_bytes().to_vec()))
        }
        _ => bail!("{what} must be USER:SECRET"),
    }
}

fn parse_lun(spec: &str) -> Result<(u64, PathBuf, Option<u64>)> {
    let (n, rest) = spec.split_once('=').context("--lun must be N=PATH:SIZE")?;
    let n: u64 = n
        .trim()
        .parse()
        .with_context(|| format!("bad LUN number {n:?}"))?;
    if n > 16383 {
        bail!("LUN {n} is out of range (0..=16383)");
    }
    // The size is after the last ':' when it parses as a size.
    if let Some((path, size)) = rest.rsplit_once(':') {
        if let Ok(bytes) = parse_size(size) {
            return Ok((n, PathBuf::from(path), Some(bytes)));
        }
    }
    Ok((n, PathBuf::from(rest), None))
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    if args.block_size != 512 && args.block_size != 4096 {
        bail!("--block-size must be 512 or 4096");
    }
    let mut table = LunTable::new();
    for spec in &args.luns {
        let (n, path, size) = parse_lun(spec)?;
        if table.get(n).is_some() {
            bail!("LUN {n} given twice");
        }
        let size = match size {
            Some(s) => s,
            None => std::fs::metadata(&path)
                .with_context(|| {
                    format!(
                        "{}: no size given and the file does not exist",
                        path.display()
                    )
                })?
                .len(),
        };
        let identity = identity_for(&format!("{}:{}", args.iqn, n));
        let dev = FileDevice::open(&path, size, args.block_size, identity)
            .with_context(|| format!("opening {}", path.display()))?;
        info!(lun = n, path = %path.display(), bytes = size, "exporting");
        table.insert(
            n,
            Arc::new(LogicalUnit::new(Arc::new(dev), LuConfig::default())),
        );
    }
    let chap = match &args.chap {
        Some(c) => {
            let (user, secret) = split_cred(c, "--chap")?;
            let mutual = args
                .mutual_chap
                .as_deref()
                .map(|m| split_cred(m, "--mutual-chap"))
                .transpose()?;
            Some(ChapCredentials {
                user,
                secret,
                mutual,
            })
        }
        None if args.mutual_chap.is_some() => bail!("--mutual-chap needs --chap"),
        None => None,
    };
    let target = Arc::new(ExportedTarget::new(args.iqn.clone(), table));
    let portal = StaticPortal::new(vec![target], chap).with_discovery_chap(args.discovery_chap);
    let config = ServerConfig {
        login: LoginConfig {
            allow_header_digest: !args.no_digests,
            allow_data_digest: !args.no_digests,
            require_header_digest: args.header_digest,
            require_data_digest: args.data_digest,
            ..LoginConfig::default()
        },
        nop_interval: Duration::from_secs(args.nop_interval.max(1)),
        ..ServerConfig::default()
    };
    let server = Server::new(Arc::new(portal), config);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    info!(iqn = %args.iqn, listen = %args.listen, "ironblock-target ready");
    let metrics_stop = tokio_util::sync::CancellationToken::new();
    if let Some(addr) = args.metrics {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding metrics address {addr}"))?;
        let m = server.metrics();
        let render: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(move || m.render());
        tokio::spawn(ironblock_target::metrics::serve_http(
            l,
            render,
            metrics_stop.clone(),
        ));
        info!(%addr, "metrics at http://{addr}/metrics");
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let serve = {
        let server = server.clone();
        tokio::spawn(async move { server.serve(listener).await })
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("SIGINT: shutting down"),
        _ = term.recv() => info!("SIGTERM: shutting down"),
    }
    server.shutdown();
    metrics_stop.cancel();
    server.drain(Duration::from_secs(5)).await;
    let _ = serve.await;
    info!("stopped");
    Ok(())
}
