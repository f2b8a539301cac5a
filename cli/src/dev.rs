//! `ironblock dev`: a local cluster in the foreground. Each meta node and
//! each chunk run as their own child process of the same binary
//! (`ironblock meta`, `ironblock chunk init|run`), each in its own process
//! group (Ctrl-C reaches only this supervisor, which then stops the
//! children in order: chunks and redirectors, then the metas) and with a
//! parent-death signal (a killed supervisor takes its children with it).
//!
//! The metas (3 by default) form one Raft group: meta 1 forms it alone,
//! the others start with `--join` and are added with `AddMeta` (a no-op
//! for members), so a directory from a one-meta run grows its group online.
//!
//! Layout of DIR: `meta/` (meta 1's sled), `meta-<i>/` (the others'),
//! `chunk-<i>/` (chunk data, stamped by `chunk init`), `logs/<name>.log`
//! (children's stderr and stdout), `pids` (`meta <pid>`, `meta-<i> <pid>`,
//! `chunk-<i> <pid>` lines while the cluster runs) and `dev.lock` (held
//! while a `dev` runs on DIR).

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::Context;
use fs2::FileExt;
use ironblock_proto::v1 as pb;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use crate::args::DevArgs;
use crate::client::Meta;

/// The chunk data-dir stamp file (written by `chunk init`).
pub const CHUNK_STAMP: &str = "IRONBLOCK_CHUNK";
/// How long meta may take to answer ClusterStatus.
const META_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `chunk init` may take.
const CHUNK_INIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long all chunks together may take to print their ready line.
const CHUNK_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a child may take to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// A chunk's `ready chunk=<id> portal=<addr> data=<addr>` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    /// Chunk id.
    pub id: u64,
    /// Advertised iSCSI portal.
    pub portal: String,
    /// Advertised replica address.
    pub data: String,
}

/// Parses a ready line; `None` if `line` is not one.
pub fn parse_ready(line: &str) -> Option<Ready> {
    let rest = line.trim().strip_prefix("ready ")?;
    let (mut id, mut portal, mut data) = (None, None, None);
    for kv in rest.split_whitespace() {
        match kv.split_once('=')? {
            ("chunk", v) => id = v.parse().ok(),
            ("portal", v) => portal = Some(v.to_string()),
            ("data", v) => data = Some(v.to_string()),
            _ => {}
        }
    }
    Some(Ready {
        id: id?,
        portal: portal?,
        data: data?,
    })
}

/// One supervised child.
struct Proc {
    name: String,
    pid: u32,
    child: Child,
    exited: Option<ExitStatus>,
}

/// The children of a `dev` run.
struct Supervisor {
    exe: PathBuf,
    logs: PathBuf,
    procs: Vec<Proc>,
}

fn describe(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => status.to_string(),
    }
}

impl Supervisor {
    fn log_file(&self, name: &str) -> anyhow::Result<File> {
        let p = self.logs.join(format!("{name}.log"));
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .with_context(|| format!("opening {}", p.display()))
    }

    /// A command for `<exe> args...` with stderr (and stdout unless piped)
    /// to `logs/<name>.log`, in its own process group, dying with us.
    fn command(&self, name: &str, args: &[String], pipe_stdout: bool) -> anyhow::Result<Command> {
        let log = self.log_file(name)?;
        let mut cmd = Command::new(&self.exe);
        cmd.args(args)
            .stdin(Stdio::null())
            .stderr(Stdio::from(log.try_clone()?))
            .stdout(if pipe_stdout {
                Stdio::piped()
            } else {
                Stdio::from(log)
            })
            .process_group(0);
        let parent = std::process::id();
        // SAFETY: the closure runs between fork and exec and only calls
        // async-signal-safe functions (prctl, getppid).
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() as u32 != parent {
                    return Err(std::io::Error::other("supervisor exited"));
                }
                Ok(())
            });
        }
        debug!(name, ?args, "spawning");
        Ok(cmd)
    }

    /// Starts a supervised child; returns its pid and piped stdout.
    fn spawn(
        &mut self,
        name: &str,
        args: &[String],
        pipe_stdout: bool,
    ) -> anyhow::Result<(u32, Option<ChildStdout>)> {
        let mut child = self
            .command(name, args, pipe_stdout)?
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow::anyhow!("{name} exited at once"))?;
        let out = child.stdout.take();
        info!(name, pid, "started");
        self.procs.push(Proc {
            name: name.to_string(),
            pid,
            child,
            exited: None,
        });
        Ok((pid, out))
    }

    /// Children that exited since the last call.
    fn reap(&mut self) -> Vec<(String, u32, ExitStatus)> {
        let mut gone = Vec::new();
        for p in &mut self.procs {
            if p.exited.is_some() {
                continue;
            }
            match p.child.try_wait() {
                Ok(Some(st)) => {
                    p.exited = Some(st);
                    gone.push((p.name.clone(), p.pid, st));
                }
                Ok(None) => {}
                Err(e) => warn!(name = %p.name, error = %e, "cannot poll child"),
            }
        }
        gone
    }

    fn running(&self, name: &str) -> bool {
        self.procs
            .iter()
            .any(|p| p.name == name && p.exited.is_none())
    }

    /// SIGTERM the children selected by `pick`, wait (bounded), SIGKILL
    /// the rest.
    async fn stop(&mut self, pick: impl Fn(&str) -> bool) {
        self.reap();
        for p in self
            .procs
            .iter()
            .filter(|p| p.exited.is_none() && pick(&p.name))
        {
            // The child is not reaped yet, so its pid cannot be reused.
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe {
                libc::kill(p.pid as libc::pid_t, libc::SIGTERM);
            }
        }
        let deadline = tokio::time::Instant::now() + STOP_GRACE;
        loop {
            self.reap();
            let left = self
                .procs
                .iter()
                .filter(|p| p.exited.is_none() && pick(&p.name))
                .count();
            if left == 0 || tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for p in self
            .procs
            .iter_mut()
            .filter(|p| p.exited.is_none() && pick(&p.name))
        {
            eprintln!(
                "ironblock dev: {} (pid {}) ignored SIGTERM for {STOP_GRACE:?}; killing it",
                p.name, p.pid
            );
            if let Err(e) = p.child.kill().await {
                warn!(name = %p.name, error = %e, "kill failed");
            }
            p.exited = p.child.try_wait().ok().flatten();
        }
    }

    /// Stops every child: chunks (and anything else) first, the metas
    /// last.
    async fn shutdown(&mut self) {
        self.stop(|n| !is_meta(n)).await;
        self.stop(is_meta).await;
    }
}

fn is_meta(name: &str) -> bool {
    name == "meta" || name.starts_with("meta-")
}

/// Where meta `i` (1-based) runs: (process name, data dir, listen address).
fn meta_plan(args: &DevArgs) -> anyhow::Result<Vec<(String, PathBuf, SocketAddr)>> {
    (1..=args.metas)
        .map(|i| {
            let (name, dir) = if i == 1 {
                ("meta".to_string(), args.data.join("meta"))
            } else {
                (format!("meta-{i}"), args.data.join(format!("meta-{i}")))
            };
            let mut addr = args.meta_listen;
            addr.set_port(port(args.meta_listen.port(), i)?);
            Ok((name, dir, addr))
        })
        .collect()
}

/// Reads a chunk's stdout: the ready line goes to `ready`, every line to
/// the chunk's log.
fn watch_stdout(out: ChildStdout, mut log: File, ready: oneshot::Sender<Ready>) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(out).lines();
        let mut ready = Some(ready);
        while let Ok(Some(line)) = lines.next_line().await {
            let _ = writeln!(log, "{line}");
            if let Some(r) = parse_ready(&line) {
                if let Some(tx) = ready.take() {
                    let _ = tx.send(r);
                }
            }
        }
    });
}

fn write_atomic(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

fn port(base: u16, i: u16) -> anyhow::Result<u16> {
    base.checked_add(i - 1)
        .ok_or_else(|| anyhow::anyhow!("port base {base} + {} overflows", i - 1))
}

/// Where chunk `i` (1-based) listens.
struct ChunkPlan {
    name: String,
    dir: PathBuf,
    portal: SocketAddr,
    data: SocketAddr,
    metrics: SocketAddr,
}

fn plan(args: &DevArgs) -> anyhow::Result<Vec<ChunkPlan>> {
    let host = std::net::Ipv4Addr::LOCALHOST;
    (1..=args.chunks)
        .map(|i| {
            Ok(ChunkPlan {
                name: format!("chunk-{i}"),
                dir: args.data.join(format!("chunk-{i}")),
                portal: SocketAddr::from((host, port(args.portal_base, i)?)),
                data: SocketAddr::from((host, port(args.data_port_base, i)?)),
                metrics: SocketAddr::from((host, port(args.metrics_port_base, i)?)),
            })
        })
        .collect()
}

/// A started cluster.
struct Started {
    /// (name, pid, address) of each meta.
    metas: Vec<(String, u32, SocketAddr)>,
    chunks: Vec<(String, u32, Ready)>,
    redirectors: Vec<(String, u32)>,
}

async fn wait_for_meta(sup: &mut Supervisor, addr: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + META_START_TIMEOUT;
    let mut last = String::new();
    while tokio::time::Instant::now() < deadline {
        sup.reap();
        if let Some(name) = sup
            .procs
            .iter()
            .map(|p| p.name.clone())
            .find(|n| is_meta(n) && !sup.running(n))
        {
            anyhow::bail!(
                "{name} exited during startup; see {}",
                sup.logs.join(format!("{name}.log")).display()
            );
        }
        // Long enough for a call to wait out an election (the group may be
        // electing its first leader).
        match Meta::connect(addr, Duration::from_secs(5)).await {
            Ok(mut m) => match m.client.cluster_status(pb::ClusterStatusRequest {}).await {
                Ok(_) => return Ok(()),
                Err(s) => last = s.message().to_string(),
            },
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("meta did not answer within {META_START_TIMEOUT:?}: {last}")
}

async fn init_chunk(sup: &Supervisor, c: &ChunkPlan, meta: &str) -> anyhow::Result<()> {
    fs::create_dir_all(&c.dir).with_context(|| format!("creating {}", c.dir.display()))?;
    let log_name = format!("{}-init", c.name);
    let args: Vec<String> = vec![
        "chunk".into(),
        "init".into(),
        "--data".into(),
        c.dir.display().to_string(),
        "--meta".into(),
        meta.into(),
        "--portal".into(),
        c.portal.to_string(),
        "--data-addr".into(),
        c.data.to_string(),
    ];
    let mut cmd = sup.command(&log_name, &args, true)?;
    cmd.kill_on_drop(true);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {log_name}"))?;
    let out = match tokio::time::timeout(CHUNK_INIT_TIMEOUT, child.wait_with_output()).await {
        Ok(r) => r.with_context(|| format!("waiting for {log_name}"))?,
        Err(_) => anyhow::bail!("{log_name} did not finish within {CHUNK_INIT_TIMEOUT:?}"),
    };
    if !out.status.success() {
        anyhow::bail!(
            "{log_name} failed ({}); see {}",
            describe(&out.status),
            sup.logs.join(format!("{log_name}.log")).display()
        );
    }
    info!(chunk = %c.name, out = %String::from_utf8_lossy(&out.stdout).trim(), "chunk initialised");
    Ok(())
}

/// Starts the redirectors (`<exe> redirector ...`), which share the VIP by a
/// lease in meta, and waits (bounded) until the lease holder serves the VIP.
async fn start_redirectors(
    sup: &mut Supervisor,
    args: &DevArgs,
    meta: &str,
) -> anyhow::Result<Vec<(String, u32)>> {
    let mut started = Vec::new();
    for i in 1..=args.redirectors {
        let name = format!("redirector-{i}");
        let run_args: Vec<String> = vec![
            "redirector".into(),
            "--meta".into(),
            meta.into(),
            "--vip".into(),
            args.vip.to_string(),
            "--name".into(),
            format!("dev-{name}"),
        ];
        let (pid, _) = sup.spawn(&name, &run_args, false)?;
        started.push((name, pid));
    }
    if started.is_empty() {
        return Ok(started);
    }
    let deadline = tokio::time::Instant::now() + META_START_TIMEOUT;
    loop {
        sup.reap();
        if tokio::net::TcpStream::connect(args.vip).await.is_ok() {
            return Ok(started);
        }
        if started.iter().all(|(n, _)| !sup.running(n)) {
            anyhow::bail!(
                "every redirector exited during startup; see {}",
                sup.logs.join("redirector-1.log").display()
            );
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!(
                "no redirector served the VIP {} within {META_START_TIMEOUT:?}; see {}",
                args.vip,
                sup.logs.join("redirector-1.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Adds meta `id` at `addr` to the group (a no-op for a member), retried
/// (bounded) while the group elects or the node starts.
async fn add_meta(sup: &mut Supervisor, leader: &str, id: u64, addr: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + META_START_TIMEOUT;
    let mut last = String::new();
    while tokio::time::Instant::now() < deadline {
        sup.reap();
        let mut m = Meta::connect(leader, Duration::from_secs(5)).await?;
        let req = pb::AddMetaRequest {
            id,
            addr: addr.to_string(),
        };
        match m.group.add_meta(req).await {
            Ok(_) => return Ok(()),
            Err(s) => last = s.message().to_string(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    anyhow::bail!("meta {id} did not join the group within {META_START_TIMEOUT:?}: {last}")
}

async fn start(sup: &mut Supervisor, args: &DevArgs) -> anyhow::Result<Started> {
    let mplan = meta_plan(args)?;
    let mut metas = Vec::new();
    for (i, (name, dir, addr)) in mplan.iter().enumerate() {
        let id = i as u64 + 1;
        let mut meta_args: Vec<String> = vec![
            "meta".into(),
            "--listen".into(),
            addr.to_string(),
            "--data".into(),
            dir.display().to_string(),
            "--liveness-timeout".into(),
            format!("{}ms", args.liveness_timeout.as_millis()),
            "--id".into(),
            id.to_string(),
        ];
        if id == 1 {
            meta_args.extend(["--peers".into(), format!("1={addr}")]);
        } else {
            meta_args.push("--join".into());
        }
        let (pid, _) = sup.spawn(name, &meta_args, false)?;
        metas.push((name.clone(), pid, *addr));
    }
    let meta_addr = metas
        .iter()
        .map(|(_, _, a)| a.to_string())
        .collect::<Vec<_>>()
        .join(",");
    // All are up first: a group formed by an earlier run needs a quorum of
    // them to elect its leader.
    wait_for_meta(sup, &meta_addr).await?;
    for (i, (_, _, addr)) in metas.iter().enumerate().skip(1) {
        add_meta(sup, &meta_addr, i as u64 + 1, &addr.to_string()).await?;
    }

    let plans = plan(args)?;
    let mut waiting = Vec::new();
    for c in &plans {
        if !c.dir.join(CHUNK_STAMP).exists() {
            init_chunk(sup, c, &meta_addr).await?;
        }
        let run_args: Vec<String> = vec![
            "chunk".into(),
            "run".into(),
            "--data".into(),
            c.dir.display().to_string(),
            "--meta".into(),
            meta_addr.clone(),
            "--listen".into(),
            c.portal.to_string(),
            "--data-listen".into(),
            c.data.to_string(),
            "--metrics".into(),
            c.metrics.to_string(),
        ];
        let (pid, out) = sup.spawn(&c.name, &run_args, true)?;
        let out = out.ok_or_else(|| anyhow::anyhow!("{}: no stdout pipe", c.name))?;
        let (tx, rx) = oneshot::channel();
        watch_stdout(out, sup.log_file(&c.name)?, tx);
        waiting.push((c.name.clone(), pid, rx));
    }
    let deadline = tokio::time::Instant::now() + CHUNK_READY_TIMEOUT;
    let mut chunks = Vec::new();
    for (name, pid, rx) in waiting {
        let log = sup.logs.join(format!("{name}.log"));
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(r)) => chunks.push((name, pid, r)),
            Ok(Err(_)) => anyhow::bail!("{name} exited before it was ready; see {}", log.display()),
            Err(_) => anyhow::bail!(
                "{name} was not ready within {CHUNK_READY_TIMEOUT:?}; see {}",
                log.display()
            ),
        }
    }
    let redirectors = start_redirectors(sup, args, &meta_addr).await?;
    Ok(Started {
        metas,
        chunks,
        redirectors,
    })
}

fn summary(args: &DevArgs, s: &Started) -> String {
    let mut out = format!("ironblock dev: cluster in {}\n", args.data.display());
    for (name, pid, addr) in &s.metas {
        out.push_str(&format!("{name:<8} {addr}  pid {pid}\n"));
    }
    for (name, pid, r) in &s.chunks {
        out.push_str(&format!(
            "{name}  id {}  pid {pid}  portal {}  data {}\n",
            r.id, r.portal, r.data
        ));
    }
    if !s.redirectors.is_empty() {
        let pids: Vec<String> = s.redirectors.iter().map(|(_, p)| p.to_string()).collect();
        out.push_str(&format!(
            "vip      {}  (discovery and logins; redirectors pid {})\n",
            args.vip,
            pids.join(", ")
        ));
    }
    let list: Vec<String> = s.metas.iter().map(|(_, _, a)| a.to_string()).collect();
    out.push_str(&format!(
        "export IRONBLOCK_META={}\nCtrl-C stops the cluster; logs in {}\n",
        list.join(","),
        args.data.join("logs").display()
    ));
    out
}

fn pids_text(s: &Started) -> String {
    let mut t = String::new();
    for (name, pid, _) in &s.metas {
        t.push_str(&format!("{name} {pid}\n"));
    }
    for (name, pid, _) in &s.chunks {
        t.push_str(&format!("{name} {pid}\n"));
    }
    for (name, pid) in &s.redirectors {
        t.push_str(&format!("{name} {pid}\n"));
    }
    t
}

/// Runs `ironblock dev` until SIGTERM or SIGINT; Ok once every child is
/// stopped.
pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let logs = args.data.join("logs");
    fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let lock_path = args.data.join("dev.lock");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    if lock.try_lock_exclusive().is_err() {
        anyhow::bail!(
            "another `ironblock dev` is already running on {} (lock {} is held)",
            args.data.display(),
            lock_path.display()
        );
    }
    let pids_path = args.data.join("pids");
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sup = Supervisor {
        exe: std::env::current_exe().context("locating the current executable")?,
        logs,
        procs: Vec::new(),
    };

    let started = tokio::select! {
        r = start(&mut sup, &args) => r.map(Some),
        _ = term.recv() => Ok(None),
        _ = int.recv() => Ok(None),
    };
    let started = match started {
        Ok(Some(s)) => s,
        Ok(None) => {
            eprintln!("ironblock dev: interrupted during startup; stopping");
            sup.shutdown().await;
            return Ok(());
        }
        Err(e) => {
            sup.shutdown().await;
            return Err(e);
        }
    };
    if let Err(e) = write_atomic(&pids_path, &pids_text(&started)) {
        sup.shutdown().await;
        return Err(e);
    }
    {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(summary(&args, &started).as_bytes());
        let _ = out.flush();
    }

    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = term.recv() => { eprintln!("ironblock dev: SIGTERM: stopping the cluster"); break; }
            _ = int.recv() => { eprintln!("ironblock dev: SIGINT: stopping the cluster"); break; }
            _ = tick.tick() => {
                for (name, pid, st) in sup.reap() {
                    eprintln!(
                        "ironblock dev: {name} (pid {pid}) exited ({}); not restarting it; log: {}",
                        describe(&st),
                        sup.logs.join(format!("{name}.log")).display()
                    );
                }
            }
        }
    }
    sup.shutdown().await;
    if let Err(e) = fs::remove_file(&pids_path) {
        warn!(error = %e, "cannot remove {}", pids_path.display());
    }
    drop(lock);
    eprintln!("ironblock dev: stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_lines() {
        assert_eq!(
            parse_ready("ready chunk=3 portal=127.0.0.1:3263 data=127.0.0.1:7103\n"),
            Some(Ready {
                id: 3,
                portal: "127.0.0.1:3263".into(),
                data: "127.0.0.1:7103".into()
            })
        );
        assert_eq!(parse_ready("ready chunk=x portal=a data=b"), None);
        assert_eq!(parse_ready("ready chunk=1 portal=a"), None);
        assert_eq!(parse_ready("chunk 1 cluster abc"), None);
    }

    #[test]
    fn ports_follow_the_chunk_index() {
        let args = DevArgs {
            data: PathBuf::from("/d"),
            chunks: 2,
            meta_listen: "127.0.0.1:7000".parse().unwrap(),
            metas: 3,
            portal_base: 3261,
            data_port_base: 7101,
            metrics_port_base: 65535,
            liveness_timeout: Duration::from_secs(3),
            vip: "127.0.0.100:3260".parse().unwrap(),
            redirectors: 2,
        };
        assert!(plan(&args).is_err(), "65535 + 1 overflows");
        let args = DevArgs {
            metrics_port_base: 9101,
            ..args
        };
        let p = plan(&args).unwrap();
        assert_eq!(p[1].name, "chunk-2");
        assert_eq!(p[1].dir, PathBuf::from("/d/chunk-2"));
        assert_eq!(p[1].portal.to_string(), "127.0.0.1:3262");
        assert_eq!(p[1].data.to_string(), "127.0.0.1:7102");
        assert_eq!(p[1].metrics.to_string(), "127.0.0.1:9102");
        let m = meta_plan(&args).unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(
            (m[0].0.as_str(), m[0].1.clone()),
            ("meta", PathBuf::from("/d/meta"))
        );
        assert_eq!(m[2].0, "meta-3");
        assert_eq!(m[2].1, PathBuf::from("/d/meta-3"));
        assert_eq!(m[2].2.to_string(), "127.0.0.1:7002");
        assert!(is_meta("meta-2") && is_meta("meta") && !is_meta("metal"));
    }
}
