//! Cross-crate integration, conformance, chaos and benchmark harnesses.
//!
//! Helpers shared by the integration tests in `tests/tests/`:
//!
//! - [`bin_path`]: find (and if needed build) a workspace binary.
//! - [`free_port`]: an unused TCP port on 127.0.0.1.
//! - [`TargetProcess`]: a running `ironblock-target`, killed on drop.
//! - [`Tgtd`]: a private `tgtd` (Debian `tgt`) instance with one LUN, killed on drop.
//! - [`require_tool`]: fail (never skip) when an external tool is missing.
//! - [`cunit`]: run libiscsi's `iscsi-test-cu` and parse its CUnit report.
//! - [`cluster`]: real `ironblock-meta` / `ironblock-chunk` processes
//!   (start, kill -9, restart, stop) and a gRPC admin client.
//! - [`csi`]: a running `ironblock-csi` and CSI clients over its unix socket.
//! - [`redirector`]: `ironblock-redirector` processes on a VIP and the
//!   helpers the VIP tests share.

pub mod chaos;
pub mod cluster;
pub mod csi;
pub mod cunit;
pub mod initiator;
pub mod portals;
pub mod redirector;

use std::fs::File;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::thread::sleep;
use std::time::{Duration, Instant};

/// How long a freshly spawned target gets to accept TCP connections.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// IQN used by the tests for the target under test.
pub const TEST_IQN: &str = "iqn.2026-11.dev.ironblock:test";

/// `IRONBLOCK_LONG=1` selects the long forms of suites (bigger LUNs, more
/// iterations). Anything else (or unset) is the short form.
pub fn long_mode() -> bool {
    std::env::var("IRONBLOCK_LONG").is_ok_and(|v| v == "1")
}

/// The workspace root: the parent of this crate's manifest directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ crate has a parent directory")
        .to_path_buf()
}

/// Cargo's output directory for this workspace (`build/`, see
/// `.cargo/config.toml`), honouring `CARGO_TARGET_DIR` when set.
pub fn build_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        None => workspace_root().join("build"),
    }
}

/// Serialises the fallback `cargo build` so parallel tests in one process do
/// not race each other for cargo's lock.
static BUILD_LOCK: Mutex<()> = Mutex::new(());

/// Path of the workspace binary `name` in `build/debug`.
///
/// When it is missing, runs `cargo build --bin NAME` once and looks again;
/// panics with a clear message when it still cannot be found.
pub fn bin_path(name: &str) -> PathBuf {
    let path = build_dir().join("debug").join(name);
    if path.is_file() {
        return path;
    }
    let _guard = BUILD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if path.is_file() {
        return path;
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(&cargo)
        .args(["build", "--bin", name])
        .current_dir(workspace_root())
        .status()
        .unwrap_or_else(|e| panic!("cannot run `cargo build --bin {name}`: {e}"));
    assert!(
        status.success() && path.is_file(),
        "binary {name} not found at {} and `cargo build --bin {name}` did not produce it \
         (exit: {status}); run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
///
/// There is an unavoidable window between this call and the server binding
/// the port; [`TargetProcess`] and [`Tgtd`] retry on a new port when the
/// server dies at start-up.
///
/// The port is drawn at random from below the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`), never from it: a process that a test
/// kills and restarts on the same port (a meta group member keeps its
/// address) would otherwise find the port taken by some other test's
/// outgoing connection, which the kernel numbers from that range.
pub fn free_port() -> u16 {
    let (lo, hi) = port_pool();
    for _ in 0..if lo < hi { 256 } else { 0 } {
        let p = rand::Rng::gen_range(&mut rand::thread_rng(), lo..hi);
        if TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// The ports [`free_port`] draws from: 20000 up to the ephemeral range
/// (`cli/tests/dev.rs` takes its blocks of ports below 20000), never below
/// 1024.
fn port_pool() -> (u16, u16) {
    let range: Vec<u16> = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .map(|s| {
            s.split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    match range[..] {
        [low, _] if low > 21_024 => (20_000, low),
        // An unusually wide ephemeral range: the ports above its top.
        [_, high] if high < 64_000 => (high + 1, u16::MAX),
        [] => (20_000, 32_768),
        _ => (0, 0),
    }
}

/// Finds `name` on PATH (or in /usr/sbin and /sbin, where Debian puts
/// daemons); panics with "install <apt package> (apt-get install -y X)" when
/// it is missing. Tests never skip silently because a tool is absent.
pub fn require_tool(name: &str, apt_package: &str) -> PathBuf {
    find_tool(name).unwrap_or_else(|| {
        panic!(
            "required tool `{name}` not found: install {apt_package} \
             (apt-get install -y {apt_package}); .ci/run installs it on a fresh machine"
        )
    })
}

fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// True once something accepts TCP connections on `addr`.
pub fn port_accepts(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// The last `max_bytes` of a log file, for failure messages.
pub fn log_tail(path: &Path, max_bytes: usize) -> String {
    let mut buf = Vec::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_end(&mut buf);
    }
    let start = buf.len().saturating_sub(max_bytes);
    String::from_utf8_lossy(&buf[start..]).into_owned()
}

/// Sends SIGTERM, waits up to `grace` for the child to exit, then SIGKILLs it.
/// Returns true when it exited within the grace period.
pub(crate) fn terminate(child: &mut Child, grace: Duration) -> bool {
    if let Ok(Some(_)) = child.try_wait() {
        return true;
    }
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: plain kill(2) on our own child's pid, which has not been
        // reaped yet (try_wait above returned None), so it cannot be reused.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}

/// Polls until `addr` accepts TCP or the child exits or `timeout` passes.
fn wait_ready(child: &mut Child, addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited during start-up ({status})"));
        }
        if port_accepts(addr) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("did not accept TCP on {addr} within {timeout:?}"));
        }
        sleep(Duration::from_millis(100));
    }
}

/// A running standalone `ironblock-target`, SIGTERMed (then killed) on drop.
///
/// It listens on a free 127.0.0.1 port; stderr goes to `target.stderr` in a
/// private temp directory, which also holds LUN backing files created with
/// [`TargetProcess::lun_path`].
pub struct TargetProcess {
    child: Child,
    addr: SocketAddr,
    stderr_path: PathBuf,
    dir: tempfile::TempDir,
}

impl TargetProcess {
    /// Spawns `ironblock-target --listen 127.0.0.1:PORT ARGS...` and waits
    /// (up to [`READY_TIMEOUT`]) until the port accepts TCP. `args` may refer
    /// to files under `dir` (see [`TargetProcess::spawn_in`]).
    pub fn spawn<S: AsRef<str>>(args: &[S]) -> TargetProcess {
        let dir = tempfile::Builder::new()
            .prefix("ironblock-target-")
            .tempdir_in(scratch_root())
            .expect("create temp dir");
        Self::spawn_in(dir, args)
    }

    /// Like [`TargetProcess::spawn`], in a temp dir the caller created (so
    /// LUN paths in `args` can live inside it).
    pub fn spawn_in<S: AsRef<str>>(dir: tempfile::TempDir, args: &[S]) -> TargetProcess {
        let bin = bin_path("ironblock-target");
        let stderr_path = dir.path().join("target.stderr");
        let mut last_err = String::new();
        for _attempt in 0..3 {
            let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
            let stderr = File::create(&stderr_path).expect("create stderr log");
            let mut child = Command::new(&bin)
                .arg("--listen")
                .arg(addr.to_string())
                .args(args.iter().map(AsRef::as_ref))
                .env("RUST_BACKTRACE", "1")
                .env("RUST_LIB_BACKTRACE", "0")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
            match wait_ready(&mut child, addr, READY_TIMEOUT) {
                Ok(()) => {
                    return TargetProcess {
                        child,
                        addr,
                        stderr_path,
                        dir,
                    }
                }
                Err(e) => {
                    terminate(&mut child, Duration::from_secs(2));
                    last_err = format!(
                        "ironblock-target {e}; stderr:\n{}",
                        log_tail(&stderr_path, 4000)
                    );
                }
            }
        }
        panic!("{last_err}");
    }

    /// The temp dir owned by this target (for LUN files, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn stderr_path(&self) -> &Path {
        &self.stderr_path
    }

    /// The last 8 KiB of the target's stderr.
    pub fn stderr_tail(&self) -> String {
        log_tail(&self.stderr_path, 8192)
    }

    /// Whether the target's whole stderr so far contains `needle`.
    pub fn stderr_contains(&self, needle: &str) -> bool {
        std::fs::read_to_string(&self.stderr_path).is_ok_and(|s| s.contains(needle))
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM and wait; returns true if it exited within `grace`.
    pub fn shutdown(&mut self, grace: Duration) -> bool {
        terminate(&mut self.child, grace)
    }
}

impl Drop for TargetProcess {
    fn drop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(5));
    }
}

/// Where tests put scratch files: a real disk, not tmpfs, so LUN files and
/// fsync behave as in production. `IRONBLOCK_SCRATCH` overrides.
pub fn scratch_root() -> PathBuf {
    let dir = std::env::var_os("IRONBLOCK_SCRATCH")
        .map(PathBuf::from)
        .unwrap_or_else(|| build_dir().join("test-scratch"));
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("create scratch dir {}: {e}", dir.display()));
    dir
}

/// A persistent directory for test logs (`build/test-logs`), kept after the
/// test so failures can be read afterwards.
pub fn log_dir() -> PathBuf {
    let dir = build_dir().join("test-logs");
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("create log dir {}: {e}", dir.display()));
    dir
}

/// A fresh temp dir under [`scratch_root`].
pub fn scratch_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(scratch_root())
        .expect("create temp dir")
}

/// Parses sizes like `64MiB`, `1GiB`, `4096`, `512KiB`.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// Options for a private [`Tgtd`] instance.
#[derive(Clone, Debug)]
pub struct TgtdOptions {
    pub iqn: String,
    /// Backing file for LUN 1; created sparse with `lun_size` bytes if missing.
    pub backing_file: Option<PathBuf>,
    pub lun_size: u64,
    /// Incoming CHAP account (initiator authenticates to the target).
    pub chap: Option<(String, String)>,
    /// Allow CRC32C header/data digests (`CRC32C,None`).
    pub header_digest: bool,
    pub data_digest: bool,
    /// Backing store type, `rdwr` (plain pread/pwrite) by default.
    pub bstype: String,
}

impl Default for TgtdOptions {
    fn default() -> Self {
        TgtdOptions {
            iqn: TEST_IQN.to_string(),
            backing_file: None,
            lun_size: 64 << 20,
            chap: None,
            header_digest: false,
            data_digest: false,
            bstype: "rdwr".to_string(),
        }
    }
}

/// A private `tgtd` (Debian package `tgt`) on a free 127.0.0.1 port with its
/// own control port, so several can run side by side. Configured with one
/// target (`opts.iqn`) and a file-backed LUN 1, open to all initiators.
/// Killed on drop. Needs root (tgtd's control socket lives in /run/tgtd).
pub struct Tgtd {
    child: Child,
    addr: SocketAddr,
    control_port: u16,
    log_path: PathBuf,
    iqn: String,
    _dir: tempfile::TempDir,
}

impl Tgtd {
    pub fn start(opts: TgtdOptions) -> Tgtd {
        let tgtd = require_tool("tgtd", "tgt");
        require_tool("tgtadm", "tgt");
        let dir = scratch_dir("tgtd-");
        let backing = opts
            .backing_file
            .clone()
            .unwrap_or_else(|| dir.path().join("lun1.img"));
        if !backing.exists() {
            File::create(&backing)
                .and_then(|f| f.set_len(opts.lun_size))
                .unwrap_or_else(|e| panic!("create {}: {e}", backing.display()));
        }
        // tgtd puts its control socket here; the tgt package's tmpfiles rule
        // does not run in containers.
        std::fs::create_dir_all("/run/tgtd").expect("create /run/tgtd (tgtd needs root)");
        let log_path = dir.path().join("tgtd.log");
        let mut last_err = String::new();
        for _attempt in 0..3 {
            let port = free_port();
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            // tgtd's "control port" (1..=32767) only names the unix socket
            // /run/tgtd/socket.N. Derive it from the free TCP port; a clash
            // makes tgtd exit at start-up and we retry on a new port.
            let control_port = 1000 + port % 30000;
            let log = File::create(&log_path).expect("create tgtd log");
            let mut child = Command::new(&tgtd)
                .arg("-f")
                .args(["--iscsi", &format!("portal={addr}")])
                .args(["-C", &control_port.to_string()])
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("dup log"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn tgtd: {e}"));
            if let Err(e) = wait_ready(&mut child, addr, READY_TIMEOUT) {
                terminate(&mut child, Duration::from_secs(1));
                remove_tgtd_socket(control_port);
                last_err = format!("tgtd {e}; log:\n{}", log_tail(&log_path, 4000));
                continue;
            }
            let mut t = Tgtd {
                child,
                addr,
                control_port,
                log_path: log_path.clone(),
                iqn: opts.iqn.clone(),
                _dir: dir,
            };
            t.configure(&opts, &backing);
            return t;
        }
        panic!("{last_err}");
    }

    fn configure(&mut self, opts: &TgtdOptions, backing: &Path) {
        let tid = "1";
        self.tgtadm(&[
            "--op", "new", "--mode", "target", "--tid", tid, "-T", &opts.iqn,
        ]);
        self.tgtadm(&[
            "--op",
            "new",
            "--mode",
            "logicalunit",
            "--tid",
            tid,
            "--lun",
            "1",
            "--bstype",
            &opts.bstype,
            "-b",
            backing.to_str().expect("utf-8 path"),
        ]);
        self.tgtadm(&[
            "--op", "bind", "--mode", "target", "--tid", tid, "-I", "ALL",
        ]);
        if let Some((user, secret)) = &opts.chap {
            self.tgtadm(&[
                "--op",
                "new",
                "--mode",
                "account",
                "--user",
                user,
                "--password",
                secret,
            ]);
            self.tgtadm(&[
                "--op", "bind", "--mode", "account", "--tid", tid, "--user", user,
            ]);
        }
        for (key, on) in [
            ("HeaderDigest", opts.header_digest),
            ("DataDigest", opts.data_digest),
        ] {
            if on {
                self.tgtadm(&[
                    "--op",
                    "update",
                    "--mode",
                    "target",
                    "--tid",
                    tid,
                    "-n",
                    key,
                    "-v",
                    "CRC32C,None",
                ]);
            }
        }
    }

    /// Runs `tgtadm --lld iscsi -C CONTROL ARGS`, panicking on failure.
    pub fn tgtadm(&self, args: &[&str]) -> String {
        let out = Command::new("tgtadm")
            .args(["--lld", "iscsi", "-C", &self.control_port.to_string()])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run tgtadm: {e}"));
        assert!(
            out.status.success(),
            "tgtadm {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn iqn(&self) -> &str {
        &self.iqn
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }
}

fn remove_tgtd_socket(control_port: u16) {
    for suffix in ["", ".lock"] {
        let _ = std::fs::remove_file(format!("/run/tgtd/socket.{control_port}{suffix}"));
    }
}

impl Drop for Tgtd {
    fn drop(&mut self) {
        // tgtd ignores SIGTERM while targets exist, so no grace period.
        let _ = self.child.kill();
        let _ = self.child.wait();
        remove_tgtd_socket(self.control_port);
    }
}

/// Builds a libiscsi URL: `iscsi://[user%secret@]HOST:PORT/IQN/LUN[?args]`.
pub fn iscsi_url(
    addr: SocketAddr,
    iqn: &str,
    lun: u32,
    chap: Option<(&str, &str)>,
    url_args: &[(&str, &str)],
) -> String {
    let auth = chap.map_or(String::new(), |(u, s)| format!("{u}%{s}@"));
    let mut url = format!("iscsi://{auth}{addr}/{iqn}/{lun}");
    for (i, (k, v)) in url_args.iter().enumerate() {
        url.push(if i == 0 { '?' } else { '&' });
        url.push_str(&format!("{k}={v}"));
    }
    url
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64MiB"), Some(64 << 20));
        assert_eq!(parse_size("1GiB"), Some(1 << 30));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("1XB"), None);
    }

    #[test]
    fn urls() {
        let a: SocketAddr = "127.0.0.1:3260".parse().unwrap();
        assert_eq!(
            iscsi_url(a, "iqn.x:y", 1, None, &[]),
            "iscsi://127.0.0.1:3260/iqn.x:y/1"
        );
        assert_eq!(
            iscsi_url(
                a,
                "iqn.x:y",
                2,
                Some(("u", "s")),
                &[("header_digest", "crc32c")]
            ),
            "iscsi://u%s@127.0.0.1:3260/iqn.x:y/2?header_digest=crc32c"
        );
    }

    #[test]
    fn missing_tool_panics_with_install_hint() {
        let err = std::panic::catch_unwind(|| require_tool("no-such-tool-xyz", "pkg-xyz"))
            .expect_err("must panic");
        let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(
            msg.contains("install pkg-xyz (apt-get install -y pkg-xyz)"),
            "{msg}"
        );
    }

    #[test]
    fn free_port_is_bindable() {
        let p = free_port();
        TcpListener::bind(("127.0.0.1", p)).expect("port free");
        let (lo, hi) = port_pool();
        assert!(lo >= 1024 && lo < hi, "pool {lo}..{hi}");
        assert!(
            lo >= 20_000,
            "the pool stays clear of cli/tests/dev.rs's ports"
        );
    }
}
