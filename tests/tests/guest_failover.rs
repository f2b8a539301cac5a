//! The real Linux initiator through the VIP, and its failover when the
//! serving chunk dies (`kill -9`) or freezes (SIGSTOP, thawed after the
//! run): one test each.
//!
//! A process cluster (meta, 3 chunks, one `ironblock-redirector` with
//! 250 ms portal probes on a VIP 127.0.0.100:PORT) and a QEMU guest with
//! Debian's kernel and open-iscsi (`initiator-vm`, see
//! `../shared/tools/initiator-vm`; under TCG emulation it is slow, so this
//! is about behaviour, not speed). The guest gets the VIP and every chunk
//! portal (`--portal VIP --portal CHUNK1 ...`: the tool maps each host
//! portal into the guest by port, so redirects work unchanged) and an
//! explicit iscsid.conf whose session timers are the CSI node's
//! (`SESSION_TIMEOUTS`: NOP-Out after 1 s of silence with a 1 s timeout,
//! replacement_timeout 30 s, login timeout 5 s, abort 5 s, LU reset 10 s)
//! and DefaultTime2Wait 0 (the chunks offer 0 too, so the negotiated wait
//! before a reconnect is 0). In the guest: SendTargets discovery on
//! the VIP, login (redirected to the hashed chunk), mkfs.ext4 + mount, an
//! 8 MiB file with a known sha256, then a bounded loop of 4 KiB fsync'ed
//! writes with completion timestamps. While it runs the test `kill -9`s the
//! serving chunk; open-iscsi's reconnect to the dead chunk fails, it falls
//! back to the VIP and is redirected to a surviving chunk.
//!
//! Checked: the session moved to the chunk the hash picks among the
//! survivors; the longest gap between two write completions (the I/O
//! stall, printed; goal under 2 s) is at most 15 s after a kill, 10 s after
//! a freeze (`IRONBLOCK_GUEST_MAX_STALL=<secs>` to change); every acknowledged
//! (fsync'ed) write reads back after a remount; the file's checksum holds;
//! `e2fsck -fn` is clean.
//!
//! Prerequisites: the `initiator-vm` tool (found at
//! `$IRONBLOCK_INITIATOR_VM`, `<repo>/../shared/tools/initiator-vm` or on
//! PATH), root, apt (it installs qemu-system-x86, open-iscsi, ... on first
//! use; `.ci/run` builds its image up front). The test fails, never skips,
//! when they are missing. Build the binaries first: `cargo build --bins`.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ironblock_csi::node::host::SESSION_TIMEOUTS;
use ironblock_tests::cluster::{start_chunks, MetaProcess};
use ironblock_tests::redirector::{settle, vip_addr, RedirectorProcess};
use ironblock_tests::{log_dir, scratch_dir, workspace_root};

const INITIATOR: &str = "iqn.2026-11.dev.ironblock:guest-failover";
/// How long the guest's write loop runs (guest seconds).
const LOOP_SECS: u32 = 30;
/// When the serving chunk is killed, after the loop started.
const KILL_AFTER: Duration = Duration::from_secs(4);

/// The explicit initiator settings (the rest are Debian's defaults); the
/// session timers come from the CSI node's [`SESSION_TIMEOUTS`] (see
/// [`iscsid_conf`]), so this test measures what a Kubernetes node gets.
const ISCSID_CONF_BASE: &str = "\
iscsid.startup = /usr/sbin/iscsid
node.startup = manual
node.leading_login = No
node.conn[0].timeo.logout_timeout = 5
node.session.err_timeo.tgt_reset_timeout = 30
node.session.err_timeo.host_reset_timeout = 60
node.session.initial_login_retry_max = 8
node.session.cmds_max = 128
node.session.queue_depth = 32
node.session.xmit_thread_priority = -20
node.session.iscsi.InitialR2T = No
node.session.iscsi.ImmediateData = Yes
node.session.iscsi.FirstBurstLength = 262144
node.session.iscsi.MaxBurstLength = 16776192
node.conn[0].iscsi.MaxRecvDataSegmentLength = 262144
node.conn[0].iscsi.MaxXmitDataSegmentLength = 0
discovery.sendtargets.iscsi.MaxRecvDataSegmentLength = 32768
node.session.nr_sessions = 1
node.session.reopen_max = 0
node.session.iscsi.FastAbort = Yes
node.session.scan = auto
node.session.iscsi.DefaultTime2Wait = 0
";

/// [`ISCSID_CONF_BASE`] plus the CSI node's session timers.
fn iscsid_conf() -> String {
    let mut conf = ISCSID_CONF_BASE.to_string();
    for (k, v) in SESSION_TIMEOUTS {
        conf.push_str(&format!("{k} = {v}\n"));
    }
    conf
}

/// The fault injected into the serving chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// `kill -9`: its sockets close, the kernel sees the connection drop.
    Kill,
    /// SIGSTOP (a hung host): its sockets stay open and nothing answers;
    /// the kernel finds out by its NOP-Out timeout. Thawed after the run.
    Freeze,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::Kill => "kill",
            Fault::Freeze => "freeze",
        }
    }

    /// The default bound on the stall (`IRONBLOCK_GUEST_MAX_STALL`
    /// overrides it): a freeze is found by the NOP-Out timers (1 s + 1 s),
    /// then the reconnect goes to the VIP, whose probes leave the frozen
    /// chunk out.
    fn max_stall(self) -> f64 {
        match self {
            Fault::Kill => 15.0,
            Fault::Freeze => 10.0,
        }
    }
}

/// The job run in the guest. Lines starting with `@@` are read by the
/// test.
fn guest_job() -> String {
    format!(
        r#"set -euo pipefail
t() {{ printf '[%7.2f] %s\n' "$(cut -d' ' -f1 /proc/uptime)" "$*"; }}
portal() {{ iscsiadm -m session -P1 | awk '/Current Portal:/ {{print $3; exit}}'; }}
t "discovery on the VIP $HOST_PORTAL"
iscsiadm -m discovery -t sendtargets -p "$HOST_PORTAL"
iscsiadm -m node --login
DEV=$(wait-iscsi-disks 1 60 | head -n1)
t "disk $DEV: $(blockdev --getsize64 "$DEV") bytes"
iscsiadm -m session -P1 | grep -E 'Target:|Portal:' || true
iscsiadm -m node -o show | grep -E 'Time2Wait|replacement_timeout|noop_out' || true
echo "@@PORTAL-BEFORE $(portal)"
mkfs.ext4 -q -F -E nodiscard "$DEV"
mkdir -p /mnt/t
mount "$DEV" /mnt/t
dd if=/dev/urandom of=/mnt/t/known bs=1M count=8 status=none
SUM=$(sha256sum /mnt/t/known | cut -d' ' -f1)
sync
t "known file sha256 $SUM"
: >/tmp/expected.bin
# Only builtins but dd in the loop: under emulation every process costs.
read -r start _ </proc/uptime
echo "@@LOOP-START $start"
# initiator-vm streams the console through a block-buffered pipe: 4 KiB of
# padding pushes the start line out to the test now, not seconds later.
printf '@@PAD %4096s\n' ''
end=$(( ${{start/./}} + {LOOP_SECS}00 ))
i=0
while :; do
    read -r now _ </proc/uptime
    (( ${{now/./}} < end )) || break
    printf '%-4095s\n' "block-$i" >/tmp/blk
    dd if=/tmp/blk of=/mnt/t/log.bin bs=4096 seek=$i count=1 conv=notrunc,fsync status=none
    printf '%-4095s\n' "block-$i" >>/tmp/expected.bin
    read -r now _ </proc/uptime
    echo "@@W $i $now"
    i=$((i + 1))
done
echo "@@LOOP-END $i"
echo "@@PORTAL-AFTER $(portal)"
umount /mnt/t
echo 3 >/proc/sys/vm/drop_caches
mount "$DEV" /mnt/t
if cmp <(head -c $((i * 4096)) /mnt/t/log.bin) /tmp/expected.bin; then
    echo "@@ACKED-OK $i"
else
    echo "@@ACKED-LOST"
fi
SUM2=$(sha256sum /mnt/t/known | cut -d' ' -f1)
if [[ $SUM == "$SUM2" ]]; then echo "@@CHECKSUM-OK $SUM2"; else echo "@@CHECKSUM-BAD $SUM $SUM2"; fi
umount /mnt/t
if e2fsck -fn "$DEV"; then echo "@@FSCK-CLEAN"; else echo "@@FSCK-ERRORS $?"; fi
echo "iscsid log (tail):"
tail -n 20 /run/iscsid.log || true
"#
    )
}

/// The `initiator-vm` tool, or a panic saying how to get it.
fn initiator_vm() -> PathBuf {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("IRONBLOCK_INITIATOR_VM") {
        candidates.push(p.into());
    }
    candidates.push(workspace_root().join("../shared/tools/initiator-vm"));
    candidates.push("/work/shared/tools/initiator-vm".into());
    let path = std::env::var_os("PATH").unwrap_or_default();
    candidates.extend(std::env::split_paths(&path).map(|d| d.join("initiator-vm")));
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "the guest failover test needs the `initiator-vm` tool (QEMU + open-iscsi \
                 guest): set IRONBLOCK_INITIATOR_VM=/path/to/initiator-vm or put it at \
                 <repo>/../shared/tools/initiator-vm; it needs root and apt on Debian 12 \
                 and installs qemu-system-x86 open-iscsi fio e2fsprogs util-linux \
                 sg3-utils nftables socat iproute2 itself (`initiator-vm build`)"
            )
        })
}

fn field<'a>(lines: &'a [String], tag: &str) -> Option<&'a str> {
    lines
        .iter()
        .find_map(|l| l.strip_prefix(tag).map(|r| r.trim_start()))
}

fn port_of(portal: &str) -> Option<u16> {
    // "127.0.0.1:3261,1"
    portal.split(',').next()?.rsplit_once(':')?.1.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_io_resumes_on_another_chunk_after_the_serving_chunk_dies() {
    guest_failover(Fault::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_io_resumes_on_another_chunk_after_the_serving_chunk_freezes() {
    guest_failover(Fault::Freeze).await;
}

async fn guest_failover(fault: Fault) {
    let tool = initiator_vm();
    // Prerequisites (host packages, guest image) before starting a cluster.
    let build = Command::new(&tool)
        .arg("build")
        .output()
        .unwrap_or_else(|e| panic!("run {} build: {e}", tool.display()));
    assert!(
        build.status.success(),
        "`{} build` failed ({}): it needs root, apt-get and Debian 12 to install \
         qemu-system-x86 open-iscsi fio e2fsprogs util-linux sg3-utils nftables socat \
         iproute2 and to fetch the guest kernel:\n{}{}",
        tool.display(),
        build.status,
        String::from_utf8_lossy(&build.stdout),
        String::from_utf8_lossy(&build.stderr)
    );
    let max_stall: f64 = std::env::var("IRONBLOCK_GUEST_MAX_STALL")
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("IRONBLOCK_GUEST_MAX_STALL={v:?} is not a number"))
        })
        .unwrap_or(fault.max_stall());

    let dir = scratch_dir(&format!("guest-failover-{}", fault.name()));
    let meta = MetaProcess::start(dir.path(), Duration::from_secs(3));
    let mut chunks = start_chunks(&meta, dir.path(), 3);
    let mut admin = meta.admin().await;
    let vol = admin.create_volume("guest-vol", 256 << 20, 2).await;
    admin.acl_add(&vol.id, INITIATOR).await;
    settle(&mut admin, &chunks).await;
    let vip = vip_addr();
    let r = RedirectorProcess::start_with(
        &meta,
        vip,
        "r1",
        dir.path(),
        Duration::from_secs(2),
        &["--probe-interval", "250ms"],
    );
    assert!(
        r.wait_serving(3, Duration::from_secs(15)).await,
        "redirector did not take the VIP with 3 live chunks; log:\n{}",
        r.log_tail()
    );
    let ids: Vec<u64> = chunks.iter().map(|c| c.chunk_id()).collect();
    let hashed = ironblock_redirector::hash::choose(INITIATOR, &vol.target_iqn, ids.clone())
        .expect("a chunk");

    let conf = dir.path().join("iscsid.conf");
    std::fs::write(&conf, iscsid_conf()).expect("write iscsid.conf");
    let mut cmd = Command::new(&tool);
    cmd.arg("run").args(["--portal", &vip.to_string()]);
    for c in &chunks {
        cmd.args(["--portal", &c.portal().to_string()]);
    }
    cmd.args(["--initiator-name", INITIATOR])
        .arg("--iscsid-conf")
        .arg(&conf)
        .args(["--timeout", "420"])
        .arg("--")
        .arg(guest_job())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd.spawn().expect("spawn initiator-vm run");
    let console_log = log_dir().join(format!("guest-failover-{}-console.log", fault.name()));
    let (tx, rx) = mpsc::channel::<String>();
    let out = child.stdout.take().expect("stdout");
    let err = child.stderr.take().expect("stderr");
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx2.send(format!("[initiator-vm] {l}"));
        }
    });

    let mut lines: Vec<String> = Vec::new();
    let mut loop_seen: Option<Instant> = None;
    let mut killed: Option<(usize, Instant)> = None;
    let status = loop {
        while let Ok(l) = rx.try_recv() {
            if !l.starts_with("@@W ") && !l.starts_with("@@PAD") {
                println!("guest| {l}");
            }
            if l.starts_with("@@LOOP-START") {
                loop_seen = Some(Instant::now());
            }
            lines.push(l);
        }
        if killed.is_none() && loop_seen.is_some_and(|t| t.elapsed() >= KILL_AFTER) {
            let before = field(&lines, "@@PORTAL-BEFORE")
                .and_then(port_of)
                .expect("the guest printed its portal before the loop");
            let k = chunks
                .iter()
                .position(|c| c.portal().port() == before)
                .unwrap_or_else(|| panic!("the guest is on port {before}, no chunk's portal"));
            assert_eq!(
                chunks[k].chunk_id(),
                hashed,
                "the guest's login went to chunk {} but the hash picks {hashed}",
                chunks[k].chunk_id()
            );
            println!(
                "{} of the serving chunk {} (portal {}), {KILL_AFTER:?} into the write loop",
                match fault {
                    Fault::Kill => "kill -9",
                    Fault::Freeze => "SIGSTOP",
                },
                chunks[k].chunk_id(),
                chunks[k].portal()
            );
            match fault {
                Fault::Kill => chunks[k].kill9(),
                Fault::Freeze => chunks[k].pause(),
            }
            killed = Some((k, Instant::now()));
        }
        if let Some(s) = child.try_wait().expect("wait initiator-vm") {
            // Drain what is left.
            std::thread::sleep(Duration::from_millis(300));
            while let Ok(l) = rx.try_recv() {
                if !l.starts_with("@@W ") && !l.starts_with("@@PAD") {
                    println!("guest| {l}");
                }
                lines.push(l);
            }
            break s;
        }
        if started.elapsed() > Duration::from_secs(480) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("initiator-vm did not finish within 480 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = std::fs::write(&console_log, lines.join("\n"));
    println!(
        "guest run took {:.1} s (console: {})",
        started.elapsed().as_secs_f64(),
        console_log.display()
    );
    if let (Fault::Freeze, Some((k, _))) = (fault, killed) {
        chunks[k].resume();
    }
    let (victim, _) = killed.unwrap_or_else(|| {
        panic!(
            "the guest never started its write loop (exit {status}); console: {}",
            console_log.display()
        )
    });

    // The write completions: (index, guest uptime seconds).
    let writes: Vec<(u64, f64)> = lines
        .iter()
        .filter_map(|l| {
            let mut it = l.strip_prefix("@@W ")?.split_whitespace();
            Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
        })
        .collect();
    let loop_start: f64 = field(&lines, "@@LOOP-START")
        .and_then(|v| v.parse().ok())
        .expect("loop start");
    let mut prev = loop_start;
    let mut stall = (0.0f64, 0u64);
    for (i, t) in &writes {
        if t - prev > stall.0 {
            stall = (t - prev, *i);
        }
        prev = *t;
    }
    let after_stall = writes.iter().filter(|(i, _)| *i >= stall.1).count();
    println!(
        "guest I/O stall after a chunk {}: {:.2} s (longest gap between fsync'ed 4 KiB writes, \
         before write {}); {} writes in total, {after_stall} from the resumed one on (goal < 2 s, \
         bound {max_stall} s)",
        fault.name(),
        stall.0,
        stall.1,
        writes.len()
    );
    assert!(
        status.success(),
        "the guest job failed ({status}); console: {}\nredirector log:\n{}",
        console_log.display(),
        r.log_tail()
    );

    // The session moved to the chunk the hash picks among the survivors.
    let survivors: Vec<u64> = ids.iter().copied().filter(|c| *c != ids[victim]).collect();
    let next = ironblock_redirector::hash::choose(INITIATOR, &vol.target_iqn, survivors)
        .expect("a survivor");
    let after = field(&lines, "@@PORTAL-AFTER")
        .and_then(port_of)
        .expect("the guest printed its portal after the loop");
    let next_chunk = chunks
        .iter()
        .find(|c| c.chunk_id() == next)
        .expect("known chunk");
    assert_eq!(
        after,
        next_chunk.portal().port(),
        "after the failover the guest is on port {after}, not on chunk {next} ({})",
        next_chunk.portal()
    );
    assert!(
        r.redirects_to(next).await >= 1.0,
        "the redirector never sent a login to chunk {next}"
    );
    println!("session moved from chunk {} to chunk {next}", ids[victim]);

    // I/O flows again at the end: writes in the loop's last 10 s (the kill
    // is 4 s in, so within the stall bound these come after the failover).
    let tail = writes
        .iter()
        .filter(|(_, t)| *t >= loop_start + f64::from(LOOP_SECS) - 10.0)
        .count();
    assert!(
        tail >= 10,
        "only {tail} writes in the loop's last 10 s: the I/O did not really resume"
    );
    assert!(
        stall.0 <= max_stall,
        "the guest's I/O stalled {:.2} s (> {max_stall} s)",
        stall.0
    );
    let acked = field(&lines, "@@ACKED-OK").unwrap_or_else(|| {
        panic!(
            "acknowledged writes were lost or not checked; console: {}",
            console_log.display()
        )
    });
    assert_eq!(
        acked.parse::<usize>().ok(),
        Some(writes.len()),
        "the verified writes are not all the acknowledged ones"
    );
    assert!(
        field(&lines, "@@CHECKSUM-OK").is_some(),
        "the known file's checksum changed; console: {}",
        console_log.display()
    );
    assert!(
        lines.iter().any(|l| l == "@@FSCK-CLEAN"),
        "e2fsck found errors; console: {}",
        console_log.display()
    );
}
