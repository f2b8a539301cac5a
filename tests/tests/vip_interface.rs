//! `ironblock-redirector --vip-interface` in a network namespace the test
//! creates (needs root and iproute2): meta and the redirector run inside the
//! namespace (`ip netns exec`), the VIP 10.99.0.100 lives on a dummy
//! interface there (one end of a veth pair).
//!
//! - holding the lease puts VIP/32 on the interface and serves the portal
//!   (a TCP connect from inside the namespace succeeds);
//! - losing the lease (meta killed for longer than the ttl) takes it off;
//! - meta back: the lease and the address come back;
//! - SIGTERM: the redirector takes the address off before it exits.
//!
//! Build the binaries first: `cargo build -p ironblock-meta -p
//! ironblock-redirector`.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ironblock_tests::{bin_path, log_dir, log_tail, require_tool, scratch_dir};

const VIP: &str = "10.99.0.100";
const IFACE: &str = "vip0";
const PEER: &str = "vip0p";

/// A network namespace, deleted (with everything still running in it) on
/// drop.
struct Netns {
    name: String,
    children: Vec<Child>,
}

fn ip(args: &[&str]) -> (bool, String) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run ip {args:?}: {e}"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

impl Netns {
    fn create() -> Netns {
        // SAFETY: geteuid(2) has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "this test creates a network namespace and needs root (CAP_NET_ADMIN)"
        );
        require_tool("ip", "iproute2");
        let name = format!("ibvip-{}", std::process::id());
        let _ = ip(&["netns", "del", &name]);
        let (ok, out) = ip(&["netns", "add", &name]);
        assert!(ok, "ip netns add {name}: {out}");
        let ns = Netns {
            name,
            children: Vec::new(),
        };
        for args in [
            vec!["link", "set", "lo", "up"],
            // A veth pair (the dummy driver is not in every kernel).
            vec!["link", "add", IFACE, "type", "veth", "peer", "name", PEER],
            vec!["link", "set", IFACE, "up"],
            vec!["link", "set", PEER, "up"],
        ] {
            let mut a = vec!["-n", ns.name.as_str()];
            a.extend(args.iter().copied());
            let (ok, out) = ip(&a);
            assert!(ok, "ip {a:?}: {out}");
        }
        ns
    }

    /// Spawn `bin args` inside the namespace, stderr to `log`.
    fn spawn(&mut self, bin: &str, args: &[String], log: &std::path::Path) -> usize {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .arg(bin_path(bin))
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("create log"))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {bin} in {}: {e}", self.name));
        self.children.push(child);
        self.children.len() - 1
    }

    fn signal(&mut self, k: usize, sig: libc::c_int) {
        let c = &mut self.children[k];
        if let Ok(pid) = libc::pid_t::try_from(c.id()) {
            // SAFETY: kill(2) on our own child (`ip netns exec` execs the
            // program, so this is the program's pid); not reaped yet.
            if matches!(c.try_wait(), Ok(None)) {
                unsafe {
                    libc::kill(pid, sig);
                }
            }
        }
    }

    /// Whether the VIP is on the interface.
    fn vip_present(&self) -> bool {
        let (_, out) = ip(&["-n", &self.name, "-o", "addr", "show", "dev", IFACE]);
        out.contains(&format!("{VIP}/32"))
    }

    /// A TCP connect to the VIP portal from inside the namespace.
    fn portal_accepts(&self) -> bool {
        Command::new("ip")
            .args(["netns", "exec", &self.name, "bash", "-c"])
            .arg(format!("exec 3<>/dev/tcp/{VIP}/3260"))
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = ip(&["netns", "del", &self.name]);
    }
}

fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if cond() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

#[test]
fn the_vip_is_on_the_interface_exactly_while_the_lease_is_held() {
    let dir = scratch_dir("vip-iface-");
    let mut ns = Netns::create();
    let meta_log = log_dir().join("vip-iface-meta.log");
    let redir_log = log_dir().join("vip-iface-redirector.log");
    let meta_args: Vec<String> = [
        "--listen",
        "127.0.0.1:7000",
        "--data",
        &dir.path().join("meta").display().to_string(),
        "--liveness-timeout",
        "3s",
    ]
    .map(String::from)
    .to_vec();
    let mut meta = ns.spawn("ironblock-meta", &meta_args, &meta_log);
    let redir_args: Vec<String> = [
        "--meta",
        "127.0.0.1:7000",
        "--vip",
        &format!("{VIP}:3260"),
        "--name",
        "r1",
        "--lease-ttl",
        "1s",
        "--vip-interface",
        IFACE,
    ]
    .map(String::from)
    .to_vec();
    let redir = ns.spawn("ironblock-redirector", &redir_args, &redir_log);
    let tails = || {
        format!(
            "redirector log:\n{}\nmeta log:\n{}",
            log_tail(&redir_log, 3000),
            log_tail(&meta_log, 2000)
        )
    };

    let t = wait_until(Duration::from_secs(20), || {
        ns.vip_present() && ns.portal_accepts()
    });
    assert!(
        t.is_some(),
        "the VIP never appeared on {IFACE} and served\n{}",
        tails()
    );
    println!("VIP on {IFACE} and serving after {t:?}");

    // Meta gone for longer than the ttl: the lease lapses, the address goes.
    ns.signal(meta, libc::SIGKILL);
    let t = wait_until(Duration::from_secs(10), || !ns.vip_present());
    assert!(
        t.is_some(),
        "the VIP stayed on {IFACE} without a lease\n{}",
        tails()
    );
    assert!(!ns.portal_accepts(), "the VIP portal still accepts");
    println!("VIP off {IFACE} {t:?} after meta died (ttl 1 s)");

    // Meta back: the lease and the address come back.
    meta = ns.spawn(
        "ironblock-meta",
        &meta_args,
        &meta_log.with_extension("2.log"),
    );
    let t = wait_until(Duration::from_secs(20), || {
        ns.vip_present() && ns.portal_accepts()
    });
    assert!(t.is_some(), "the VIP did not come back\n{}", tails());
    println!("VIP back {t:?} after meta restarted");

    // SIGTERM: released before exit.
    ns.signal(redir, libc::SIGTERM);
    let t = wait_until(Duration::from_secs(10), || !ns.vip_present());
    assert!(t.is_some(), "SIGTERM left the VIP on {IFACE}\n{}", tails());
    let _ = meta;
}
