//! The VIP as an address on a network interface (`--vip-interface`).
//!
//! On loopback every 127/8 address is already local, so a redirector just
//! binds the VIP. On a real network (a container network, a LAN) the VIP
//! must be an address of the holder's interface, and the neighbours' ARP
//! caches must learn the new holder's MAC at once. [`VipInterface`] does
//! what keepalived-style failover does, with the standard tools:
//!
//! - [`VipInterface::add`] on taking the lease, before binding:
//!   `ip addr replace VIP/32 dev IFACE` (idempotent), then one gratuitous
//!   ARP `arping -U -c 1 -I IFACE VIP` (iputils; Habets' arping `-i IFACE`
//!   as a fallback), in the background. The ARP is best effort: a failure
//!   is logged, never fatal (some interfaces do not ARP at all).
//! - [`VipInterface::remove`] on losing the lease, on shutdown and at
//!   start-up (a leftover from a crash): `ip addr del VIP/32 dev IFACE`; an
//!   address that is not there is fine.
//!
//! Needs CAP_NET_ADMIN (containers: `cap_add: [NET_ADMIN]`) and, for the
//! ARP, CAP_NET_RAW. Every command runs with a timeout.

use std::net::IpAddr;
use std::time::Duration;

use tokio::process::Command;
use tracing::{info, warn};

/// How long one `ip` or `arping` invocation may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the VIP could not be put on or taken off the interface.
#[derive(Debug, thiserror::Error)]
pub enum VipIfaceError {
    /// The command could not be started (not installed?).
    #[error("cannot run {cmd}: {source} (install iproute2)")]
    Spawn {
        /// The command line.
        cmd: String,
        /// The spawn error.
        source: std::io::Error,
    },
    /// The command did not finish in time.
    #[error("{cmd} did not finish within {COMMAND_TIMEOUT:?}")]
    Timeout {
        /// The command line.
        cmd: String,
    },
    /// The command failed.
    #[error("{cmd} failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        cmd: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
}

/// The VIP's address on one interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipInterface {
    iface: String,
    addr: IpAddr,
}

struct Output {
    ok: bool,
    status: String,
    stderr: String,
}

async fn run(program: &str, args: &[String]) -> Result<Output, VipIfaceError> {
    let cmd = format!("{program} {}", args.join(" "));
    let child = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(COMMAND_TIMEOUT, child).await {
        Err(_) => Err(VipIfaceError::Timeout { cmd }),
        Ok(Err(source)) => Err(VipIfaceError::Spawn { cmd, source }),
        Ok(Ok(out)) => Ok(Output {
            ok: out.status.success(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        }),
    }
}

impl VipInterface {
    /// The VIP `addr` on interface `iface`.
    pub fn new(iface: &str, addr: IpAddr) -> VipInterface {
        VipInterface {
            iface: iface.to_string(),
            addr,
        }
    }

    /// The interface name.
    pub fn iface(&self) -> &str {
        &self.iface
    }

    /// `VIP/32` (or `/128`).
    fn cidr(&self) -> String {
        let bits = if self.addr.is_ipv4() { 32 } else { 128 };
        format!("{}/{bits}", self.addr)
    }

    /// The `ip` arguments that put the VIP on the interface.
    pub fn add_args(&self) -> Vec<String> {
        ["addr", "replace", &self.cidr(), "dev", &self.iface]
            .map(String::from)
            .to_vec()
    }

    /// The `ip` arguments that take the VIP off the interface.
    pub fn del_args(&self) -> Vec<String> {
        ["addr", "del", &self.cidr(), "dev", &self.iface]
            .map(String::from)
            .to_vec()
    }

    /// Put the VIP on the interface and announce it (gratuitous ARP, best
    /// effort).
    pub async fn add(&self) -> Result<(), VipIfaceError> {
        let args = self.add_args();
        let out = run("ip", &args).await?;
        if !out.ok {
            return Err(VipIfaceError::Failed {
                cmd: format!("ip {}", args.join(" ")),
                status: out.status,
                stderr: out.stderr,
            });
        }
        info!(vip = %self.addr, iface = %self.iface, "VIP added to the interface");
        if self.addr.is_ipv4() {
            // In the background: arping may take a second or more, and the
            // lease ttl can be shorter than that.
            let me = self.clone();
            tokio::spawn(async move { me.announce().await });
        }
        Ok(())
    }

    /// One unsolicited ARP so neighbours switch to this holder's MAC.
    async fn announce(&self) {
        let ip = self.addr.to_string();
        // iputils-arping first, then Habets' arping (other interface flag).
        let mut last = String::new();
        for flag in ["-I", "-i"] {
            let args: Vec<String> = ["-U", "-c", "1", flag, &self.iface, &ip]
                .map(String::from)
                .to_vec();
            match run("arping", &args).await {
                Ok(o) if o.ok => {
                    info!(vip = %self.addr, iface = %self.iface, "gratuitous ARP sent");
                    return;
                }
                Ok(o) => last = format!("{} {}", o.status, o.stderr),
                Err(e) => {
                    last = e.to_string();
                    break;
                }
            }
        }
        warn!(vip = %self.addr, iface = %self.iface, error = %last,
            "gratuitous ARP failed; neighbours learn the VIP's new MAC when their ARP entry expires");
    }

    /// Take the VIP off the interface; an address that is not there is not
    /// an error.
    pub async fn remove(&self) -> Result<(), VipIfaceError> {
        let args = self.del_args();
        let out = run("ip", &args).await?;
        if out.ok {
            info!(vip = %self.addr, iface = %self.iface, "VIP removed from the interface");
            return Ok(());
        }
        // iproute2: "RTNETLINK answers: Cannot assign requested address"
        // when the address is not on the interface.
        if out.stderr.contains("Cannot assign requested address") {
            return Ok(());
        }
        Err(VipIfaceError::Failed {
            cmd: format!("ip {}", args.join(" ")),
            status: out.status,
            stderr: out.stderr,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands() {
        let v = VipInterface::new("eth0", "10.213.0.100".parse().unwrap());
        assert_eq!(
            v.add_args().join(" "),
            "addr replace 10.213.0.100/32 dev eth0"
        );
        assert_eq!(v.del_args().join(" "), "addr del 10.213.0.100/32 dev eth0");
        let v6 = VipInterface::new("eth1", "fd00::64".parse().unwrap());
        assert_eq!(
            v6.add_args().join(" "),
            "addr replace fd00::64/128 dev eth1"
        );
    }
}
