//! The `ironblock-redirector` binary: arguments and `run`.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::redirector::{Config, Redirector};

/// Holds the VIP lease and redirects iSCSI logins to live chunks.
#[derive(Debug, Parser)]
#[command(name = "ironblock-redirector", version)]
pub struct Args {
    /// Meta's gRPC address (host:port).
    #[arg(long, env = "IRONBLOCK_META")]
    pub meta: String,
    /// The VIP portal host:port, bound only while holding the lease.
    #[arg(long)]
    pub vip: String,
    /// This instance's name (the lease holder; unique per instance).
    #[arg(long)]
    pub name: String,
    /// Lease ttl (renewed every ttl/3), e.g. 2s or 1500ms.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub lease_ttl: Duration,
    /// Interval (and timeout) of the probes of every live chunk's portal
    /// (the first step of a discovery login, which only a live target
    /// answers); a chunk that fails one is left out of the redirects until a
    /// probe succeeds. 0 disables probing.
    #[arg(long, default_value = "250ms", value_parser = parse_interval)]
    pub probe_interval: Duration,
    /// Serve Prometheus metrics on GET /metrics at this address.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// Put the VIP's IP on this interface while holding the lease (`ip addr
    /// replace` + a gratuitous ARP) and take it off on losing it. Needs
    /// CAP_NET_ADMIN. Leave unset on loopback.
    #[arg(long, env = "IRONBLOCK_VIP_INTERFACE")]
    pub vip_interface: Option<String>,
}

/// Like [`parse_duration`], but `0` (off) is allowed.
pub fn parse_interval(s: &str) -> Result<Duration, String> {
    if s.trim().trim_end_matches(['m', 's']).trim() == "0" {
        return Ok(Duration::ZERO);
    }
    parse_duration(s)
}

/// `3s`, `500ms`, `1m` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (try 2s or 500ms)"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        _ => return Err(format!("invalid duration unit in {s:?} (ms, s or m)")),
    };
    if !secs.is_finite() || secs <= 0.0 {
        return Err(format!("duration {s:?} must be positive"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Run until SIGTERM/SIGINT. Prints `ready name=<name> vip=<vip>
/// metrics=<addr>` on stdout once the metrics listener is bound.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let mut cfg = Config::new(&args.meta, &args.vip, &args.name);
    cfg.lease_ttl = args.lease_ttl;
    cfg.probe_interval = args.probe_interval;
    cfg.vip_interface = args.vip_interface.clone();
    let r = Redirector::new(cfg)?;
    let shutdown = CancellationToken::new();
    let metrics_addr = match args.metrics {
        Some(a) => {
            let l = TcpListener::bind(a).await?;
            let local = l.local_addr()?;
            tokio::spawn(crate::metrics::serve(l, r.metrics(), shutdown.clone()));
            local.to_string()
        }
        None => "-".to_string(),
    };
    println!(
        "ready name={} vip={} metrics={metrics_addr}",
        args.name, args.vip
    );
    let stop = shutdown.clone();
    tokio::spawn(async move {
        wait_signal().await;
        tracing::info!("signal received; releasing the VIP");
        stop.cancel();
    });
    r.run(shutdown).await;
    Ok(())
}

async fn wait_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_parse() {
        let a = Args::try_parse_from([
            "ironblock-redirector",
            "--meta",
            "127.0.0.1:7000",
            "--vip",
            "127.0.0.100:3260",
            "--name",
            "r1",
            "--lease-ttl",
            "1500ms",
        ])
        .unwrap();
        assert_eq!(a.lease_ttl, Duration::from_millis(1500));
        assert_eq!(a.probe_interval, Duration::from_millis(250));
        assert_eq!(a.metrics, None);
        let d = Args::try_parse_from([
            "ironblock-redirector",
            "--meta",
            "m:1",
            "--vip",
            "v:2",
            "--name",
            "n",
        ])
        .unwrap();
        assert_eq!(d.lease_ttl, crate::redirector::DEFAULT_LEASE_TTL);
        assert!(parse_duration("0s").is_err());
        assert_eq!(parse_interval("0"), Ok(Duration::ZERO));
        assert_eq!(parse_interval("0ms"), Ok(Duration::ZERO));
        assert_eq!(parse_interval("100ms"), Ok(Duration::from_millis(100)));
        assert!(parse_duration("3h").is_err());
    }
}
