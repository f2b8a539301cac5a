//! The real [`Initiator`]: open-iscsi's `iscsiadm`, util-linux's `blkid`,
//! e2fsprogs / xfsprogs, mount(2)/umount(2), and sysfs. Every command runs
//! with a timeout (killed when it expires) and at most `max_commands` run at
//! once.
//!
//! Only what has no system call is a command (iscsiadm, blkid on a device
//! with data on it, mkfs, resize2fs/xfs_growfs): mounts, unmounts, the blank
//! check and the flush before a device is removed are done in-process,
//! because a fork+exec is the dominant cost of a stage on a busy node (0.1 to
//! 0.5 s of CPU each in an emulated guest, see bench/results/csi-100.txt).

use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::mount::{MountFlags, UnmountFlags};
use tokio::process::Command;
use tokio::sync::Semaphore;
use tracing::debug;

use super::initiator::{Chap, DeviceIdentity, FsStats, Initiator, InitiatorError, MountInfo};

/// iscsiadm exit status: a non-retryable login failure.
const ISCSI_ERR_LOGIN_REFUSED: i32 = 19;
/// iscsiadm exit status: the session already exists.
const ISCSI_ERR_SESS_EXISTS: i32 = 15;
/// iscsiadm exit status: no session / no records found.
const ISCSI_ERR_NO_OBJS_FOUND: i32 = 21;
/// blkid exit status: nothing found.
const BLKID_NOTHING: i32 = 2;
/// The blank check reads this much at the start of a device: every
/// signature blkid probes for sits in the first 2 MiB (the farthest, VMFS at
/// 1 MiB and UDF's anchor at sector 256 of 4 KiB sectors) ...
const BLANK_HEAD: u64 = 2 << 20;
/// ... or in the last 1 MiB (GPT's backup header, MD 0.90/1.0 and DDF RAID
/// metadata, ZFS's labels 2 and 3).
const BLANK_TAIL: u64 = 1 << 20;

/// The host implementation.
pub struct HostInitiator {
    timeout: Duration,
    commands: Semaphore,
    sysfs: PathBuf,
    /// Log in through this iscsiadm iface, set up once with the node's
    /// initiator name (so the IQN on the LUN ACLs is the one that logs in).
    iface: Option<String>,
    initiator_name: Option<String>,
    iface_ready: tokio::sync::OnceCell<()>,
}

/// The iscsiadm iface the driver creates when it has an initiator name.
pub const IFACE: &str = "ironblock-csi";

struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

impl HostInitiator {
    /// Commands time out after `timeout`; at most `max_commands` at once.
    pub fn new(timeout: Duration, max_commands: usize) -> HostInitiator {
        HostInitiator {
            timeout,
            commands: Semaphore::new(max_commands.max(1)),
            sysfs: PathBuf::from("/sys"),
            iface: None,
            initiator_name: None,
            iface_ready: tokio::sync::OnceCell::new(),
        }
    }

    /// Logs in with `iqn` as the initiator name, through the iscsiadm iface
    /// [`IFACE`] (created and updated on first use).
    pub fn with_initiator_name(mut self, iqn: &str) -> HostInitiator {
        self.iface = Some(IFACE.to_string());
        self.initiator_name = Some(iqn.to_string());
        self
    }

    /// `-I IFACE` when an iface is configured (set up on first call).
    async fn iface_args(&self) -> Result<Vec<String>, InitiatorError> {
        let (Some(iface), Some(iqn)) = (&self.iface, &self.initiator_name) else {
            return Ok(Vec::new());
        };
        self.iface_ready
            .get_or_try_init(|| async {
                // Show it; create it only when it does not exist yet.
                let shown = format!("iscsiadm -m iface -I {iface}");
                let o = self
                    .run("iscsiadm", &["-m", "iface", "-I", iface], &shown)
                    .await?;
                if o.code != 0 {
                    self.run_ok("iscsiadm", &["-m", "iface", "-I", iface, "-o", "new"])
                        .await?;
                }
                self.run_ok(
                    "iscsiadm",
                    &[
                        "-m",
                        "iface",
                        "-I",
                        iface,
                        "-o",
                        "update",
                        "-n",
                        "iface.initiatorname",
                        "-v",
                        iqn,
                    ],
                )
                .await
                .map(|_| ())
            })
            .await?;
        Ok(vec!["-I".to_string(), iface.clone()])
    }

    /// Runs `prog args`; `shown` is the command line for messages (no
    /// secrets).
    async fn run(&self, prog: &str, args: &[&str], shown: &str) -> Result<Output, InitiatorError> {
        let _permit = self
            .commands
            .acquire()
            .await
            .map_err(|_| InitiatorError::Failed {
                cmd: shown.into(),
                msg: "shutting down".into(),
            })?;
        debug!(cmd = shown, "run");
        let _running = crate::metrics::METRICS.command(prog);
        let child = Command::new(prog)
            .args(args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        match tokio::time::timeout(self.timeout, child).await {
            Err(_) => {
                crate::metrics::METRICS
                    .command_timeouts
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Err(InitiatorError::Timeout(format!(
                    "{shown} ({:?})",
                    self.timeout
                )))
            }
            Ok(Err(e)) => Err(InitiatorError::Failed {
                cmd: shown.into(),
                msg: e.to_string(),
            }),
            Ok(Ok(o)) => Ok(Output {
                code: o.status.code().unwrap_or(-1),
                stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&o.stderr).trim().to_string(),
            }),
        }
    }

    async fn run_ok(&self, prog: &str, args: &[&str]) -> Result<Output, InitiatorError> {
        let shown = format!("{prog} {}", args.join(" "));
        let o = self.run(prog, args, &shown).await?;
        if o.code != 0 {
            return Err(InitiatorError::Failed {
                cmd: shown,
                msg: format!("exit {}: {}", o.code, o.stderr),
            });
        }
        Ok(o)
    }

    /// The kernel name of a block device path (`/dev/sdb`, or a symlink to
    /// it).
    fn block_name(device: &Path) -> Option<String> {
        let real = std::fs::canonicalize(device).unwrap_or_else(|_| device.to_path_buf());
        real.file_name().map(|n| n.to_string_lossy().into_owned())
    }

    /// Reads sysfs under `root` instead of `/sys` (tests).
    pub fn with_sysfs(mut self, root: &Path) -> HostInitiator {
        self.sysfs = root.to_path_buf();
        self
    }

    fn block_sys(&self, device: &Path) -> Option<PathBuf> {
        Self::block_name(device).map(|n| self.sysfs.join("class/block").join(n))
    }

    /// Device I/O and mount system calls, which may block (a dead iSCSI
    /// session, a journal replay, writeback): on the blocking pool, under
    /// the same timeout as a command. `what` names it in errors.
    async fn off_thread<T: Send + 'static>(
        &self,
        what: String,
        f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> Result<T, InitiatorError> {
        let failed = |msg: String| InitiatorError::Failed {
            cmd: what.clone(),
            msg,
        };
        match tokio::time::timeout(self.timeout, tokio::task::spawn_blocking(f)).await {
            Err(_) => Err(InitiatorError::Timeout(format!(
                "{what} ({:?})",
                self.timeout
            ))),
            Ok(Err(e)) => Err(failed(e.to_string())),
            Ok(Ok(Err(e))) => Err(failed(e.to_string())),
            Ok(Ok(Ok(v))) => Ok(v),
        }
    }
}

fn read_trim(p: &Path) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The topmost mount at `path` in a mountinfo text.
pub fn parse_mountinfo(text: &str, path: &Path) -> Option<MountInfo> {
    let mut found = None;
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let l: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        if l.len() < 6 || r.len() < 2 {
            continue;
        }
        if Path::new(&unescape(l[4])) == path {
            found = Some(MountInfo {
                source: unescape(r[1]),
                fs_type: r[0].to_string(),
                readonly: l[5].split(',').any(|o| o == "ro"),
            });
        }
    }
    found
}

/// True when the first [`BLANK_HEAD`] and last [`BLANK_TAIL`] bytes of
/// `device` are all zero: no signature can be there, so blkid need not run.
fn ends_are_zero(device: &Path) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(device)?;
    let len = f.seek(SeekFrom::End(0))?;
    let head = BLANK_HEAD.min(len);
    let tail = len.saturating_sub(BLANK_TAIL).max(head);
    let mut buf = vec![0u8; 256 << 10];
    for (start, end) in [(0, head), (tail, len)] {
        f.seek(SeekFrom::Start(start))?;
        let mut at = start;
        while at < end {
            let n = usize::try_from(end - at).map_or(buf.len(), |r| r.min(buf.len()));
            f.read_exact(&mut buf[..n])?;
            if buf[..n].iter().any(|&b| b != 0) {
                return Ok(false);
            }
            at += n as u64;
        }
    }
    Ok(true)
}

/// mount(8)'s option words as mount(2) flags; the words the kernel does not
/// know as flags go to the filesystem as its data string. Returns the flags,
/// whether it is a bind mount (and recursive) and the data.
pub fn mount_flags(options: &[String]) -> (MountFlags, Option<bool>, String) {
    let mut flags = MountFlags::empty();
    let mut bind = None;
    let mut data: Vec<&str> = Vec::new();
    for o in options.iter().flat_map(|o| o.split(',')) {
        match o {
            "" | "defaults" | "auto" | "noauto" | "nofail" | "_netdev" | "user" | "nouser"
            | "async" => {}
            o if o.starts_with("x-") => {}
            "bind" => bind = Some(bind.unwrap_or(false)),
            "rbind" => bind = Some(true),
            "ro" => flags |= MountFlags::RDONLY,
            "rw" => flags &= !MountFlags::RDONLY,
            "nosuid" => flags |= MountFlags::NOSUID,
            "suid" => flags &= !MountFlags::NOSUID,
            "nodev" => flags |= MountFlags::NODEV,
            "dev" => flags &= !MountFlags::NODEV,
            "noexec" => flags |= MountFlags::NOEXEC,
            "exec" => flags &= !MountFlags::NOEXEC,
            "sync" => flags |= MountFlags::SYNCHRONOUS,
            "dirsync" => flags |= MountFlags::DIRSYNC,
            "noatime" => flags |= MountFlags::NOATIME,
            "atime" => flags &= !MountFlags::NOATIME,
            "nodiratime" => flags |= MountFlags::NODIRATIME,
            "diratime" => flags &= !MountFlags::NODIRATIME,
            "relatime" => flags |= MountFlags::RELATIME,
            "norelatime" => flags &= !MountFlags::RELATIME,
            "strictatime" => flags |= MountFlags::STRICTATIME,
            "lazytime" => flags |= MountFlags::LAZYTIME,
            "nolazytime" => flags &= !MountFlags::LAZYTIME,
            "nosymfollow" => flags |= MountFlags::NOSYMFOLLOW,
            other => data.push(other),
        }
    }
    (flags, bind, data.join(","))
}

/// TYPE or PTTYPE from `blkid -p -o export` output.
pub fn parse_blkid(text: &str) -> Option<String> {
    let mut pt = None;
    for line in text.lines() {
        if let Some(t) = line.strip_prefix("TYPE=") {
            return Some(t.to_string());
        }
        if let Some(t) = line.strip_prefix("PTTYPE=") {
            pt = Some(format!("partition table {t}"));
        }
    }
    pt
}

/// The kernel initiator's session timeouts, set on every node record before
/// its login (open-iscsi's defaults are for a single target that comes back
/// where it was; ironblock's sessions move to another chunk through the VIP):
///
/// - NOP-Out after 1 s of silence, answered within 1 s: a hung chunk
///   (frozen, partitioned, a dead link with no RST) drops its session
///   within ~2 s instead of open-iscsi's 10 s + 15 s, and the re-login goes
///   through the VIP to a live chunk (the redirectors' portal probes leave
///   a hung chunk out). The timers are whole seconds, so 2 s is the floor.
///   A chunk that is slow but alive answers the NOP-Out at once (it is
///   answered ahead of queued commands), so load does not drop sessions:
///   the soak test models these timers and counts 0 extra logins;
/// - `replacement_timeout` 30 s: I/O stays queued while the session is
///   re-established (a failover takes seconds), and fails upwards only if no
///   chunk takes it back within 30 s (open-iscsi's 120 s hangs a pod that
///   long);
/// - login 5 s (15 s default): a login to a dead portal gives way to the
///   next attempt quickly;
/// - abort 5 s and LU reset 10 s (15 s and 30 s): error recovery on a stuck
///   command escalates to a session drop sooner.
pub const SESSION_TIMEOUTS: [(&str, &str); 6] = [
    ("node.conn[0].timeo.noop_out_interval", "1"),
    ("node.conn[0].timeo.noop_out_timeout", "1"),
    ("node.session.timeo.replacement_timeout", "30"),
    ("node.conn[0].timeo.login_timeout", "5"),
    ("node.session.err_timeo.abort_timeout", "5"),
    ("node.session.err_timeo.lu_reset_timeout", "10"),
];

#[async_trait::async_trait]
impl Initiator for HostInitiator {
    async fn login(
        &self,
        portal: &str,
        target: &str,
        chap: Option<&Chap>,
    ) -> Result<(), InitiatorError> {
        let iface = self.iface_args().await?;
        let mut disc = vec!["-m", "discovery", "-t", "sendtargets", "-p", portal];
        disc.extend(iface.iter().map(String::as_str));
        self.run_ok("iscsiadm", &disc)
            .await
            .map_err(|e| InitiatorError::Unreachable(e.to_string()))?;
        let mut base = vec!["-m", "node", "-T", target, "-p", portal];
        base.extend(iface.iter().map(String::as_str));
        let mut settings: Vec<(&str, &str, bool)> = SESSION_TIMEOUTS
            .iter()
            .map(|&(k, v)| (k, v, false))
            .collect();
        if let Some(c) = chap {
            settings.extend([
                ("node.session.auth.authmethod", "CHAP", false),
                ("node.session.auth.username", c.user.as_str(), false),
                ("node.session.auth.password", c.secret.as_str(), true),
            ]);
        }
        for (k, v, secret) in settings {
            let mut args = base.clone();
            args.extend(["-o", "update", "-n", k, "-v", v]);
            let shown = format!(
                "iscsiadm -m node -T {target} -p {portal} -o update -n {k} -v {}",
                if secret { "***" } else { v }
            );
            let o = self.run("iscsiadm", &args, &shown).await?;
            if o.code != 0 {
                return Err(InitiatorError::Failed {
                    cmd: shown,
                    msg: o.stderr,
                });
            }
        }
        let mut args = base.clone();
        args.push("--login");
        let shown = format!("iscsiadm -m node -T {target} -p {portal} --login");
        // A login refused outright (19: the target answered with a
        // non-retryable status) is Unreachable like any other: the node
        // service tries again within its own deadline (a chunk fenced out
        // for a moment, an ACL removed and added back).
        let o = self.run("iscsiadm", &args, &shown).await?;
        match o.code {
            0 | ISCSI_ERR_SESS_EXISTS => Ok(()),
            c => Err(InitiatorError::Unreachable(format!(
                "{shown}: exit {c}{}: {}",
                if c == ISCSI_ERR_LOGIN_REFUSED {
                    " (login refused)"
                } else {
                    ""
                },
                o.stderr
            ))),
        }
    }

    async fn logout(&self, portal: &str, target: &str) -> Result<(), InitiatorError> {
        let shown = format!("iscsiadm -m node -T {target} -p {portal} --logout");
        let iface = self.iface_args().await?;
        let mut args = vec!["-m", "node", "-T", target, "-p", portal];
        args.extend(iface.iter().map(String::as_str));
        args.push("--logout");
        let o = self.run("iscsiadm", &args, &shown).await?;
        match o.code {
            0 | ISCSI_ERR_NO_OBJS_FOUND => Ok(()),
            c => Err(InitiatorError::Failed {
                cmd: shown,
                msg: format!("exit {c}: {}", o.stderr),
            }),
        }
    }

    async fn rescan(&self, target: &str) -> Result<(), InitiatorError> {
        let shown = format!("iscsiadm -m node -T {target} --rescan");
        let o = self
            .run(
                "iscsiadm",
                &["-m", "node", "-T", target, "--rescan"],
                &shown,
            )
            .await?;
        match o.code {
            0 | ISCSI_ERR_NO_OBJS_FOUND => Ok(()),
            c => Err(InitiatorError::Failed {
                cmd: shown,
                msg: format!("exit {c}: {}", o.stderr),
            }),
        }
    }

    async fn find_device(
        &self,
        _portal: &str,
        target: &str,
        lun: u32,
    ) -> Result<Option<PathBuf>, InitiatorError> {
        // sysfs, not udev's by-path links (whose portal is the chunk the VIP
        // redirected to): iscsi_session/sessionN/targetname, then
        // sessionN/device/targetH:C:T/H:C:T:LUN/block/NAME.
        let sessions = self.sysfs.join("class/iscsi_session");
        let Ok(rd) = std::fs::read_dir(&sessions) else {
            return Ok(None);
        };
        for s in rd.flatten() {
            if read_trim(&s.path().join("targetname")).as_deref() != Some(target) {
                continue;
            }
            let Ok(dev) = std::fs::read_dir(s.path().join("device")) else {
                continue;
            };
            for t in dev.flatten() {
                if !t.file_name().to_string_lossy().starts_with("target") {
                    continue;
                }
                let Ok(luns) = std::fs::read_dir(t.path()) else {
                    continue;
                };
                for l in luns.flatten() {
                    let name = l.file_name().to_string_lossy().into_owned();
                    if name.rsplit(':').next() != Some(&lun.to_string())
                        || name.split(':').count() != 4
                    {
                        continue;
                    }
                    if let Ok(mut b) = std::fs::read_dir(l.path().join("block")) {
                        if let Some(Ok(b)) = b.next() {
                            return Ok(Some(Path::new("/dev").join(b.file_name())));
                        }
                    }
                }
            }
        }
        Ok(None)
    }

    async fn device_exists(&self, device: &Path) -> bool {
        device.exists() && self.block_sys(device).is_some_and(|p| p.exists())
    }

    async fn identity(&self, device: &Path) -> Result<DeviceIdentity, InitiatorError> {
        let sys = self
            .block_sys(device)
            .ok_or_else(|| InitiatorError::Failed {
                cmd: "identity".into(),
                msg: format!("{} is not a block device", device.display()),
            })?;
        let serial = std::fs::read(sys.join("device/vpd_pg80"))
            .ok()
            .and_then(|b| {
                // Header: peripheral, page code, length (2 bytes).
                (b.len() > 4).then(|| {
                    String::from_utf8_lossy(&b[4..])
                        .trim_matches(|c: char| c == '\0' || c.is_whitespace())
                        .to_string()
                })
            });
        let wwn = read_trim(&sys.join("device/wwid"));
        Ok(DeviceIdentity { serial, wwn })
    }

    async fn signature(&self, device: &Path) -> Result<Option<String>, InitiatorError> {
        let d = device.to_string_lossy();
        // Blank ends: nothing for blkid to find (a fresh volume, the common
        // case, costs no fork). Any data there: blkid decides what it is.
        let p = device.to_path_buf();
        if self
            .off_thread(format!("read the ends of {d}"), move || ends_are_zero(&p))
            .await?
        {
            return Ok(None);
        }
        let shown = format!("blkid -p -o export {d}");
        let o = self
            .run("blkid", &["-p", "-o", "export", &d], &shown)
            .await?;
        match o.code {
            0 => Ok(Some(
                parse_blkid(&o.stdout).unwrap_or_else(|| "unknown signature".into()),
            )),
            BLKID_NOTHING => Ok(None),
            c => Err(InitiatorError::Failed {
                cmd: shown,
                msg: format!("exit {c}: {}", o.stderr),
            }),
        }
    }

    async fn never_written(&self, device: &Path) -> bool {
        let p = device.to_path_buf();
        let what = format!("ask {} for its LBA status", device.display());
        match self
            .off_thread(what, move || super::sg::never_written(&p))
            .await
        {
            Ok(v) => v,
            Err(e) => {
                debug!(device = %device.display(), error = %e, "no never-written proof");
                false
            }
        }
    }

    async fn format(
        &self,
        device: &Path,
        fs_type: &str,
        prezeroed: bool,
    ) -> Result<(), InitiatorError> {
        let d = device.to_string_lossy();
        // The caller probed the device for signatures just before; mkfs.xfs
        // without -f refuses a device with a signature on its own, mke2fs
        // does not when run non-interactively, so probe once more here
        // (asking the device again when it proved itself never written).
        let blank = prezeroed && self.never_written(device).await;
        if let Some(sig) = if blank {
            None
        } else {
            self.signature(device).await?
        } {
            return Err(InitiatorError::Failed {
                cmd: format!("mkfs.{fs_type} {d}"),
                msg: format!("refused: the device carries a {sig} signature"),
            });
        }
        match fs_type {
            // assume_storage_prezeroed (e2fsprogs 1.47): no zeroing of the
            // journal, and the inode tables are marked zeroed so the
            // kernel's lazyinit thread does not write them after mount.
            "ext4" if blank => self
                .run_ok(
                    "mkfs.ext4",
                    &["-q", "-E", "nodiscard,assume_storage_prezeroed=1", &d],
                )
                .await
                .map(|_| ()),
            "ext4" => self
                .run_ok("mkfs.ext4", &["-q", "-E", "nodiscard", &d])
                .await
                .map(|_| ()),
            "xfs" => self.run_ok("mkfs.xfs", &["-q", "-K", &d]).await.map(|_| ()),
            other => Err(InitiatorError::Failed {
                cmd: "mkfs".into(),
                msg: format!("unsupported filesystem {other}"),
            }),
        }
    }

    async fn mount(
        &self,
        source: &Path,
        target: &Path,
        fs_type: Option<&str>,
        options: &[String],
    ) -> Result<(), InitiatorError> {
        let (flags, bind, data) = mount_flags(options);
        let shown = format!(
            "mount {}{}{} {}",
            fs_type.map(|f| format!("-t {f} ")).unwrap_or_default(),
            if options.is_empty() {
                String::new()
            } else {
                format!("-o {} ", options.join(","))
            },
            source.display(),
            target.display()
        );
        debug!(cmd = %shown, "mount(2)");
        let (source, target) = (source.to_path_buf(), target.to_path_buf());
        let fs = match (bind, fs_type) {
            (Some(_), _) => String::new(),
            (None, Some(f)) => f.to_string(),
            (None, None) => {
                return Err(InitiatorError::Failed {
                    cmd: shown,
                    msg: "no filesystem type".into(),
                })
            }
        };
        let data = std::ffi::CString::new(data).map_err(|e| InitiatorError::Failed {
            cmd: shown.clone(),
            msg: e.to_string(),
        })?;
        self.off_thread(shown, move || {
            match bind {
                Some(recursive) => {
                    let rec = if recursive {
                        MountFlags::REC
                    } else {
                        MountFlags::empty()
                    };
                    rustix::mount::mount(&source, &target, "none", MountFlags::BIND | rec, None)?;
                    // A bind mount takes its flags (ro, nosuid, ...) only
                    // from a remount.
                    if !flags.is_empty() {
                        rustix::mount::mount_remount(&target, MountFlags::BIND | flags, "")?;
                    }
                }
                None => {
                    let data = (!data.as_bytes().is_empty()).then_some(data.as_c_str());
                    rustix::mount::mount(&source, &target, fs.as_str(), flags, data)?;
                }
            }
            Ok(())
        })
        .await
    }

    async fn unmount(&self, target: &Path) -> Result<(), InitiatorError> {
        if self.mount_at(target).await?.is_none() {
            return Ok(());
        }
        debug!(path = %target.display(), "umount(2)");
        let t = target.to_path_buf();
        self.off_thread(format!("umount {}", target.display()), move || {
            Ok(rustix::mount::unmount(&t, UnmountFlags::empty())?)
        })
        .await
    }

    async fn mount_at(&self, path: &Path) -> Result<Option<MountInfo>, InitiatorError> {
        let p = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let text = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| {
            InitiatorError::Failed {
                cmd: "read /proc/self/mountinfo".into(),
                msg: e.to_string(),
            }
        })?;
        Ok(parse_mountinfo(&text, &p))
    }

    async fn remove_device(&self, device: &Path) -> Result<(), InitiatorError> {
        let d = device.to_string_lossy();
        // What `blockdev --flushbufs` is for here: the device's dirty pages
        // reach the volume before the device goes.
        let p = device.to_path_buf();
        self.off_thread(format!("flush {d}"), move || {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .and_then(|f| f.sync_all())
        })
        .await?;
        let sys = self
            .block_sys(device)
            .ok_or_else(|| InitiatorError::Failed {
                cmd: "remove device".into(),
                msg: format!("{d} is not a block device"),
            })?;
        std::fs::write(sys.join("device/delete"), b"1").map_err(|e| InitiatorError::Failed {
            cmd: format!("echo 1 > {}/device/delete", sys.display()),
            msg: e.to_string(),
        })
    }

    async fn device_size(&self, device: &Path) -> Result<u64, InitiatorError> {
        let sys = self
            .block_sys(device)
            .ok_or_else(|| InitiatorError::Failed {
                cmd: "device size".into(),
                msg: format!("{} is not a block device", device.display()),
            })?;
        read_trim(&sys.join("size"))
            .and_then(|s| s.parse::<u64>().ok())
            .map(|sectors| sectors * 512)
            .ok_or_else(|| InitiatorError::Failed {
                cmd: format!("read {}/size", sys.display()),
                msg: "unreadable".into(),
            })
    }

    async fn resize_fs(
        &self,
        device: &Path,
        mount_path: &Path,
        fs_type: &str,
    ) -> Result<(), InitiatorError> {
        match fs_type {
            "xfs" => self
                .run_ok("xfs_growfs", &[&mount_path.to_string_lossy()])
                .await
                .map(|_| ()),
            _ => self
                .run_ok("resize2fs", &[&device.to_string_lossy()])
                .await
                .map(|_| ()),
        }
    }

    async fn fs_stats(&self, path: &Path) -> Result<FsStats, InitiatorError> {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| {
            InitiatorError::Failed {
                cmd: "statvfs".into(),
                msg: e.to_string(),
            }
        })?;
        // SAFETY: statvfs(3) with a valid NUL-terminated path and a zeroed
        // out-struct it fills.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
        if rc != 0 {
            return Err(InitiatorError::Failed {
                cmd: format!("statvfs {}", path.display()),
                msg: std::io::Error::last_os_error().to_string(),
            });
        }
        let f = st.f_frsize as u64;
        Ok(FsStats {
            total_bytes: st.f_blocks as u64 * f,
            available_bytes: st.f_bavail as u64 * f,
            used_bytes: (st.f_blocks as u64).saturating_sub(st.f_bfree as u64) * f,
            total_inodes: st.f_files as u64,
            free_inodes: st.f_ffree as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo() {
        let t = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
                 40 22 8:16 / /var/lib/k\\040s rw,relatime shared:2 - ext4 /dev/sdb rw\n\
                 41 22 8:16 / /pods/x ro,relatime shared:2 - ext4 /dev/sdb rw\n";
        let m = parse_mountinfo(t, Path::new("/var/lib/k s")).unwrap();
        assert_eq!(m.source, "/dev/sdb");
        assert!(!m.readonly);
        assert!(parse_mountinfo(t, Path::new("/pods/x")).unwrap().readonly);
        assert!(parse_mountinfo(t, Path::new("/nope")).is_none());
    }

    #[test]
    fn blkid() {
        assert_eq!(
            parse_blkid("DEVNAME=/dev/sdb\nTYPE=ext4\n").as_deref(),
            Some("ext4")
        );
        assert_eq!(
            parse_blkid("PTUUID=x\nPTTYPE=gpt\n").as_deref(),
            Some("partition table gpt")
        );
        assert_eq!(parse_blkid(""), None);
    }

    #[test]
    fn mount_options_become_flags_and_data() {
        let o = |v: &[&str]| mount_flags(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let (f, bind, data) = o(&["ro,noatime", "discard", "nosuid", "errors=remount-ro"]);
        assert_eq!(
            f,
            MountFlags::RDONLY | MountFlags::NOATIME | MountFlags::NOSUID
        );
        assert_eq!(bind, None);
        assert_eq!(data, "discard,errors=remount-ro");
        let (f, bind, data) = o(&["bind", "ro"]);
        assert_eq!(
            (f, bind, data.as_str()),
            (MountFlags::RDONLY, Some(false), "")
        );
        let (f, bind, _) = o(&["rbind", "defaults", "_netdev", "x-k8s=1"]);
        assert_eq!((f, bind), (MountFlags::empty(), Some(true)));
        assert_eq!(o(&["ro", "rw"]).0, MountFlags::empty());
    }

    /// The blank check reads both ends: one byte in the first 2 MiB or the
    /// last 1 MiB makes a device non-blank, data in between does not.
    #[test]
    fn blank_check_reads_both_ends() {
        use std::io::{Seek, SeekFrom, Write};
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("d.img");
        let len = 8u64 << 20;
        let put = |at: u64| {
            let mut f = std::fs::File::create(&img).unwrap();
            f.set_len(len).unwrap();
            if at < len {
                f.seek(SeekFrom::Start(at)).unwrap();
                f.write_all(&[1]).unwrap();
            }
        };
        put(len);
        assert!(ends_are_zero(&img).unwrap());
        for at in [0, 1 << 20, BLANK_HEAD - 1, len - BLANK_TAIL, len - 1] {
            put(at);
            assert!(!ends_are_zero(&img).unwrap(), "byte at {at}");
        }
        for at in [BLANK_HEAD, len - BLANK_TAIL - 1] {
            put(at);
            assert!(ends_are_zero(&img).unwrap(), "byte at {at}");
        }
        // Smaller than both windows together.
        std::fs::File::create(&img).unwrap().set_len(4096).unwrap();
        assert!(ends_are_zero(&img).unwrap());
        assert!(ends_are_zero(&dir.path().join("missing")).is_err());
    }

    /// blkid and mke2fs on a plain file: a blank file has no signature, a
    /// formatted one has, and a second format is refused.
    #[tokio::test]
    async fn signature_and_format_on_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
        let h = HostInitiator::new(Duration::from_secs(30), 2);
        assert_eq!(h.signature(&img).await.unwrap(), None);
        // A file cannot prove it was never written: formatted the slow way.
        assert!(!h.never_written(&img).await);
        h.format(&img, "ext4", true).await.unwrap();
        assert_eq!(h.signature(&img).await.unwrap().as_deref(), Some("ext4"));
        let e = h.format(&img, "ext4", false).await.unwrap_err();
        assert!(e.to_string().contains("signature"), "{e}");
        assert!(h.format(&img, "ntfs", false).await.is_err());
    }

    /// The sysfs layout of an open-iscsi session: the LUN's block device is
    /// found by target name and LUN, its identity read from vpd_pg80/wwid.
    #[tokio::test]
    async fn finds_the_lun_and_its_identity_in_sysfs() {
        let root = tempfile::tempdir().unwrap();
        let sys = root.path();
        let target = "iqn.2026-11.dev.ironblock:t0";
        for (session, host, tname, luns) in [
            (
                "session1",
                2,
                "iqn.2026-11.dev.ironblock:other",
                vec![(1u32, "sdb")],
            ),
            (
                "session2",
                3,
                target,
                vec![(0, "sdc"), (1, "sdd"), (12, "sde")],
            ),
        ] {
            let s = sys.join("class/iscsi_session").join(session);
            std::fs::create_dir_all(&s).unwrap();
            std::fs::write(s.join("targetname"), format!("{tname}\n")).unwrap();
            for (lun, name) in luns {
                let d = s
                    .join("device")
                    .join(format!("target{host}:0:0"))
                    .join(format!("{host}:0:0:{lun}"))
                    .join("block")
                    .join(name);
                std::fs::create_dir_all(&d).unwrap();
            }
        }
        let h = HostInitiator::new(Duration::from_secs(5), 2).with_sysfs(sys);
        let p = "127.0.0.100:3260";
        assert_eq!(
            h.find_device(p, target, 1).await.unwrap(),
            Some("/dev/sdd".into())
        );
        assert_eq!(
            h.find_device(p, target, 12).await.unwrap(),
            Some("/dev/sde".into())
        );
        assert_eq!(h.find_device(p, target, 2).await.unwrap(), None);
        assert_eq!(h.find_device(p, "iqn.x:none", 1).await.unwrap(), None);
        // VPD page 0x80 as the kernel exposes it: 4-byte header + serial.
        let serial = "0123abcd000040008000000000000001";
        let dev = sys.join("class/block/sdd/device");
        std::fs::create_dir_all(&dev).unwrap();
        let mut pg80 = vec![0x00, 0x80, 0x00, serial.len() as u8];
        pg80.extend_from_slice(serial.as_bytes());
        std::fs::write(dev.join("vpd_pg80"), pg80).unwrap();
        std::fs::write(dev.join("wwid"), "naa.60ab10c0123abcd0000400080000000\n").unwrap();
        std::fs::write(sys.join("class/block/sdd/size"), "2097152\n").unwrap();
        let id = h.identity(Path::new("/dev/sdd")).await.unwrap();
        assert_eq!(id.serial.as_deref(), Some(serial));
        assert_eq!(
            id.wwn.as_deref(),
            Some("naa.60ab10c0123abcd0000400080000000")
        );
        assert_eq!(h.device_size(Path::new("/dev/sdd")).await.unwrap(), 1 << 30);
        // A device without VPD pages has no identity: staging refuses it.
        std::fs::create_dir_all(sys.join("class/block/sde/device")).unwrap();
        assert_eq!(
            h.identity(Path::new("/dev/sde")).await.unwrap(),
            DeviceIdentity::default()
        );
    }

    #[tokio::test]
    async fn commands_time_out() {
        let h = HostInitiator::new(Duration::from_millis(200), 2);
        let t = std::time::Instant::now();
        let e = h.run("sleep", &["5"], "sleep 5").await.err().unwrap();
        assert!(matches!(e, InitiatorError::Timeout(_)), "{e:?}");
        assert!(t.elapsed() < Duration::from_secs(2));
    }
}
