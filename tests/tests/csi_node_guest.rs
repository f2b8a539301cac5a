//! The CSI Node service against the REAL Linux initiator: `ironblock-csi
//! --mode node` runs inside the QEMU guest of `../shared/tools/initiator-vm`
//! (Debian's kernel, open-iscsi's iscsid/iscsiadm, util-linux, e2fsprogs),
//! against a process cluster on the host: meta, two chunks and a redirector
//! holding a VIP. The node plugin logs in through the VIP (SendTargets
//! discovery on the VIP, login redirected to a chunk portal; the guest
//! reaches the VIP and every chunk portal by port through initiator-vm's
//! `--portal` mappings).
//!
//! The controller (`ironblock-csi --mode controller`) runs on the host; the
//! guest reaches its gRPC through a TCP bridge on 127.0.0.1 (one more
//! `--portal` mapping) to its unix socket. The CSI client that drives both
//! runs inside the guest: `tests/examples/csi-node-driver.rs guest-test`
//! (built on the host, shared with `--share`): NodeGetInfo -> stage (mkfs)
//! -> publish -> write -> unpublish -> unstage -> stage again (same
//! filesystem UUID, data intact) -> ControllerExpand + NodeExpandVolume
//! (filesystem grows) -> NodeGetVolumeStats (bytes, inodes) -> raw block
//! stage/publish with I/O -> refusals of a device that carries another
//! volume's filesystem (foreign signature; another volume's LUN = identity
//! mismatch) -> teardown. Each check is an assertion in that client; its
//! exit status and PASS line decide this test.
//!
//! Needs: the initiator-vm tool (qemu-system-x86, installed by
//! `initiator-vm build` with apt-get), `strip` (binutils, optional) and
//! `resize2fs` (e2fsprogs) on the host. Runs in the `conformance` nextest
//! group so it never overlaps the iscsi-test-cu runs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ironblock_tests::cluster::{http_get, start_chunks, MetaProcess};
use ironblock_tests::csi::CsiProcess;
use ironblock_tests::{
    bin_path, build_dir, free_port, log_dir, log_tail, require_tool, scratch_dir, workspace_root,
};

const NODE_IQN: &str = "iqn.2026-11.dev.ironblock.node:guest-node";

/// `../shared/tools/initiator-vm` (or `$INITIATOR_VM`); panics with what to
/// install when it is missing or cannot build its guest image.
fn initiator_vm() -> PathBuf {
    let p = std::env::var_os("INITIATOR_VM").map_or_else(
        || {
            workspace_root()
                .parent()
                .map(|p| p.join("shared/tools/initiator-vm"))
                .unwrap_or_default()
        },
        PathBuf::from,
    );
    assert!(
        p.is_file(),
        "initiator-vm not found at {} (set INITIATOR_VM=/path/to/initiator-vm); it needs \
         qemu-system-x86, open-iscsi, e2fsprogs, util-linux, sg3-utils, fio, nftables, socat \
         (apt-get install -y qemu-system-x86 open-iscsi e2fsprogs util-linux sg3-utils fio \
         nftables socat iproute2)",
        p.display()
    );
    let out = Command::new(&p)
        .arg("build")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {} build: {e}", p.display()));
    assert!(
        out.status.success(),
        "`initiator-vm build` failed ({}): install qemu-system-x86 open-iscsi e2fsprogs \
         util-linux sg3-utils fio nftables socat iproute2 (apt-get install -y ...):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    p
}

/// `build/debug/examples/NAME`, built when missing.
fn example_path(name: &str) -> PathBuf {
    let path = build_dir().join("debug/examples").join(name);
    if !path.is_file() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "-p", "ironblock-tests", "--example", name])
            .current_dir(workspace_root())
            .status()
            .expect("run cargo build --example");
        assert!(
            st.success() && path.is_file(),
            "cannot build example {name}"
        );
    }
    path
}

/// Copies `bin` into `dir/bin` (stripped when `strip` exists: 9p under TCG
/// is slow for 100 MB debug binaries) and its non-libc libraries into
/// `dir/lib`.
fn share_binary(dir: &Path, bin: &Path) {
    let name = bin.file_name().expect("binary name");
    let dst = dir.join("bin").join(name);
    std::fs::create_dir_all(dir.join("bin")).expect("create share/bin");
    std::fs::create_dir_all(dir.join("lib")).expect("create share/lib");
    let stripped = Command::new("strip")
        .arg("-o")
        .arg(&dst)
        .arg(bin)
        .status()
        .is_ok_and(|s| s.success());
    if !stripped {
        std::fs::copy(bin, &dst).expect("copy binary into the share");
    }
    let ldd = Command::new("ldd").arg(bin).output().expect("run ldd");
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        let mut w = line.split_whitespace();
        if let (Some(_), Some("=>"), Some(lib)) = (w.next(), w.next(), w.next()) {
            if lib.starts_with('/') {
                let real = std::fs::canonicalize(lib).expect("resolve library");
                let out = dir
                    .join("lib")
                    .join(Path::new(lib).file_name().expect("lib name"));
                if !out.exists() {
                    std::fs::copy(real, out).expect("copy library");
                }
            }
        }
    }
}

/// `ironblock-redirector` holding `vip`.
struct Redirector {
    child: Child,
    metrics: SocketAddr,
    log: PathBuf,
}

impl Redirector {
    fn start(meta: &MetaProcess, vip: SocketAddr) -> Redirector {
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let log = log_dir().join(format!("csi-node-guest-redirector-{}.log", vip.port()));
        let child = Command::new(bin_path("ironblock-redirector"))
            .args(["--meta", &meta.addr().to_string()])
            .args(["--vip", &vip.to_string()])
            .args(["--name", "r1"])
            .args(["--lease-ttl", "2s"])
            .args(["--metrics", &metrics.to_string()])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("create redirector log"))
            .spawn()
            .expect("spawn ironblock-redirector");
        Redirector {
            child,
            metrics,
            log,
        }
    }

    /// Sum of the samples whose name starts with `name`.
    async fn metric_sum(&self, name: &str) -> f64 {
        let text = http_get(self.metrics, "/metrics").await.unwrap_or_default();
        text.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for Redirector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free port on 127.0.0.100 (the VIP; ports distinct from every other
/// portal, as initiator-vm's netns mode maps portals by port).
fn vip_addr() -> SocketAddr {
    for _ in 0..50 {
        let a = SocketAddr::from(([127, 0, 0, 100], free_port()));
        if std::net::TcpListener::bind(a).is_ok() {
            return a;
        }
    }
    panic!("no free port on 127.0.0.100");
}

/// TCP on 127.0.0.1 -> the controller's unix socket (the guest reaches
/// host loopback ports only).
async fn bridge(sock: PathBuf) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the controller bridge");
    let addr = l.local_addr().expect("bridge address");
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = l.accept().await {
            let sock = sock.clone();
            tokio::spawn(async move {
                if let Ok(mut unix) = tokio::net::UnixStream::connect(&sock).await {
                    let _ = tokio::io::copy_bidirectional(&mut tcp, &mut unix).await;
                }
            });
        }
    });
    addr
}

/// The guest job: the node plugin in the background, the client in front.
const GUEST_JOB: &str = r#"
# Off the 9p share into RAM (else every command loads libc over 9p).
mkdir -p /run/ib && cp -a /mnt/host/bin /mnt/host/lib /run/ib/
export LD_LIBRARY_PATH=/run/ib/lib PATH=/run/ib/bin:$PATH
mkdir -p /run/csi
ironblock-csi --mode node --endpoint unix:///run/csi/csi.sock --node-id "$INITIATOR_NAME" \
    --cluster-id $CLUSTER_ID --state-dir /var/lib/ironblock-csi >/run/csi/node.log 2>&1 &
csi-node-driver guest-test --controller "http://$CTL" --node /run/csi/csi.sock --node-id "$INITIATOR_NAME"
rc=$?
cp /run/csi/node.log /mnt/host/node.log
echo "--- iscsi sessions at the end"; iscsiadm -m session 2>&1
echo "--- node record timeouts"
iscsiadm -m node -o show 2>&1 | grep -E 'timeo\.(noop_out|replacement|login|abort|lu_reset)' | sort -u
exit $rc
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_service_in_the_guest_against_the_cluster_through_the_vip() {
    let vm = initiator_vm();
    require_tool("resize2fs", "e2fsprogs");
    let dir = scratch_dir("csi-node-guest");
    let share = dir.path().join("share");
    share_binary(&share, &bin_path("ironblock-csi"));
    share_binary(&share, &example_path("csi-node-driver"));
    // The guest image has mke2fs but no resize2fs.
    share_binary(&share, &require_tool("resize2fs", "e2fsprogs"));

    let meta = MetaProcess::start(&dir.path().join("meta"), Duration::from_secs(3));
    let chunks = start_chunks(&meta, dir.path(), 2);
    let vip = vip_addr();
    let redirector = Redirector::start(&meta, vip);
    let deadline = Instant::now() + Duration::from_secs(20);
    while redirector
        .metric_sum("ironblock_redirector_lease_held")
        .await
        < 1.0
    {
        assert!(
            Instant::now() < deadline,
            "the redirector did not take the VIP; log:\n{}",
            log_tail(&redirector.log, 3000)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let vip_s = vip.to_string();
    let meta_s = meta.addr().to_string();
    let ctl = CsiProcess::start(
        &dir.path().join("controller"),
        "controller",
        &["--meta", &meta_s, "--portal", &vip_s],
    );
    let ctl_addr = bridge(ctl.socket().to_path_buf()).await;

    // The guest reaches no meta: its node plugin is given the cluster id.
    let cluster_id = meta
        .admin()
        .await
        .client()
        .cluster_status(ironblock_proto::v1::ClusterStatusRequest {})
        .await
        .expect("meta ClusterStatus")
        .into_inner()
        .cluster_id;
    let job = GUEST_JOB
        .replace("$CTL", &ctl_addr.to_string())
        .replace("$CLUSTER_ID", &cluster_id);
    let mut cmd = Command::new(&vm);
    cmd.arg("run").args(["--portal", &vip_s]);
    for c in &chunks {
        cmd.args(["--portal", &c.portal().to_string()]);
    }
    cmd.args(["--portal", &ctl_addr.to_string()])
        .args(["--initiator-name", NODE_IQN])
        .arg("--share")
        .arg(&share)
        .args(["--timeout", "400", "--", &job])
        .stdin(Stdio::null());
    let t = Instant::now();
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("join")
        .expect("run initiator-vm");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    println!("guest run took {:?}", t.elapsed());
    let node_log = std::fs::read_to_string(share.join("node.log")).unwrap_or_default();
    assert!(
        out.status.success() && text.contains("CSI-NODE-GUEST PASS"),
        "the guest sequence failed ({}); node plugin log:\n{}\ncontroller log:\n{}",
        out.status,
        node_log
            .lines()
            .rev()
            .take(80)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n"),
        ctl.log_tail()
    );
    for step in [
        "NodeStage(a) mkfs",
        "NodeStage(a) again, no mkfs",
        "data-intact",
        "NodeExpandVolume(a)",
        "NodeGetVolumeStats(a)",
        "raw-block-io",
        "refuse-foreign-signature",
        "refuse-identity-mismatch",
    ] {
        assert!(
            text.contains(&format!("STEP {step} ok")),
            "step {step} missing"
        );
    }
    // Every node record the plugin logged in with carries ironblock's
    // session timeouts (a hung chunk's session drops within seconds): each
    // is there, and no record has another value.
    let records = text
        .split("--- node record timeouts")
        .nth(1)
        .expect("the guest printed the node records' timeouts");
    for (k, v) in ironblock_csi::node::host::SESSION_TIMEOUTS {
        let values: Vec<&str> = records
            .lines()
            .filter_map(|l| l.trim().strip_prefix(k)?.trim().strip_prefix('='))
            .map(str::trim)
            .collect();
        assert!(
            !values.is_empty() && values.iter().all(|x| *x == v),
            "node records: {k} = {values:?}, want {v} in every one (iscsiadm -m node -o show, above)"
        );
    }
    // The node went through the VIP: discovery on the redirector, logins
    // redirected to the chunks.
    assert!(
        redirector
            .metric_sum("ironblock_redirector_redirects_total")
            .await
            >= 1.0,
        "no login was redirected by the VIP holder; log:\n{}",
        log_tail(&redirector.log, 3000)
    );
    // The format ran once (first stage), never on the second stage.
    let mkfs = node_log.matches("formatting a blank device").count();
    assert_eq!(mkfs, 1, "mkfs runs in the node log: {mkfs}");
    // The fresh thin volume proved through the real kernel's SG_IO (READ
    // CAPACITY(16) LBPRZ + GET LBA STATUS) that it was never written, so
    // mkfs skipped zeroing.
    assert!(
        node_log
            .lines()
            .any(|l| l.contains("formatting a blank device") && l.contains("never_written=true")),
        "the fresh volume did not prove itself never written; node log:\n{node_log}"
    );
    drop(chunks);
}
