//! Real-process cluster harness: `ironblock-meta` and `ironblock-chunk`
//! processes on 127.0.0.1, plus a small gRPC admin client.
//!
//! - [`MetaProcess::start`]: a meta daemon on a free port with its sled
//!   directory under the given dir; [`MetaProcess::kill9`],
//!   [`MetaProcess::restart`] (same port and data), [`MetaProcess::stop`].
//! - [`ChunkProcess::init_and_start`]: `ironblock-chunk init` then
//!   `ironblock-chunk run` on a data directory, parsing the
//!   `ready chunk=<id> portal=<addr> data=<addr>` line; every listener binds
//!   port 0 (metrics on a free port), so any number of chunks coexist.
//!   [`ChunkProcess::kill9`], [`ChunkProcess::restart`] (same data dir, new
//!   ports: read [`ChunkProcess::portal`] again), [`ChunkProcess::stop`]
//!   (SIGTERM; true on a clean exit 0), [`ChunkProcess::pause`] /
//!   [`ChunkProcess::resume`] (SIGSTOP/SIGCONT), [`ChunkProcess::extent_data_path`]
//!   for corrupting replicas behind the store's back,
//!   [`ChunkProcess::metric`] / [`ChunkProcess::wait_applied`] to wait until
//!   a metadata change reached the chunk.
//! - [`RedirectorProcess`]: an `ironblock-redirector` for a VIP (on
//!   loopback, [`loopback_vip`]) with kill -9 / restart and its metrics.
//! - [`Admin`]: the meta gRPC client with helpers for volumes, ACLs, extents
//!   and chunk states.
//!
//! Processes are killed on drop. stderr of every process goes to
//! `build/test-logs/<parent dir>-<dir>.log` (kept after the test), and its
//! tail is printed in panic messages.
//!
//! The binaries come from `build/debug` ([`crate::bin_path`]); build them
//! first (`cargo build -p ironblock-meta -p ironblock-chunk`) so a stale
//! binary is never tested.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ironblock_proto::v1 as pb;
use ironblock_proto::v1::meta_client::MetaClient;
use ironblock_proto::MetaChannel;

use crate::{bin_path, free_port, log_tail, terminate, wait_ready, READY_TIMEOUT};

/// How long a chunk gets to print its ready line.
pub const CHUNK_READY_TIMEOUT: Duration = Duration::from_secs(40);

fn sigkill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// `build/test-logs/<parent>-<dir>.log`: kept after the test's temp
/// directory is gone, so a failure can be read afterwards.
fn log_path(dir: &Path) -> PathBuf {
    let name = |p: Option<&Path>| {
        p.and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    crate::log_dir().join(format!("{}-{}.log", name(dir.parent()), name(Some(dir))))
}

/// Open (append) a process log.
fn open_log(path: &Path) -> File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open log {}: {e}", path.display()))
}

/// A running `ironblock-meta`.
pub struct MetaProcess {
    child: Option<Child>,
    addr: SocketAddr,
    metrics: SocketAddr,
    data: PathBuf,
    log: PathBuf,
    liveness: Duration,
    env: Vec<(String, String)>,
    /// Group flags (`--id`, `--peers`); empty: meta alone.
    group_args: Vec<String>,
}

/// Where a process finds meta: one node, or a group's members.
pub trait MetaEndpoint {
    /// The `--meta` argument: `host:port[,host:port...]`.
    fn meta_arg(&self) -> String;
}

impl MetaEndpoint for MetaProcess {
    fn meta_arg(&self) -> String {
        self.addr.to_string()
    }
}

impl MetaProcess {
    /// Start meta with its sled store in `dir/meta` (created), a chunk
    /// liveness timeout of `liveness`, on a free 127.0.0.1 port. Waits (up to
    /// [`READY_TIMEOUT`]) until it accepts TCP.
    pub fn start(dir: &Path, liveness: Duration) -> MetaProcess {
        Self::start_with_env(dir, liveness, &[])
    }

    /// [`MetaProcess::start`] with extra environment variables (meta's
    /// flags all have one, e.g. `IRONBLOCK_META_LOCALITY_WINDOW_MIB`).
    pub fn start_with_env(dir: &Path, liveness: Duration, env: &[(&str, &str)]) -> MetaProcess {
        let data = dir.join("meta");
        std::fs::create_dir_all(&data).expect("create meta dir");
        let mut m = MetaProcess {
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
            metrics: SocketAddr::from(([127, 0, 0, 1], free_port())),
            log: log_path(&data),
            data,
            liveness,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            group_args: Vec::new(),
        };
        m.spawn();
        m
    }

    fn spawn(&mut self) {
        let mut last = String::new();
        for attempt in 0..3 {
            // A group member keeps its port: the others know it by it.
            if attempt > 0 && self.child.is_none() && self.group_args.is_empty() {
                self.addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
                self.metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
            }
            let mut child = Command::new(bin_path("ironblock-meta"))
                .arg("--listen")
                .arg(self.addr.to_string())
                .arg("--data")
                .arg(&self.data)
                .arg("--liveness-timeout")
                .arg(format!("{}ms", self.liveness.as_millis()))
                .arg("--metrics-listen")
                .arg(self.metrics.to_string())
                .args(&self.group_args)
                .envs(self.env.iter().map(|(k, v)| (k, v)))
                .env("RUST_BACKTRACE", "1")
                .env("RUST_LIB_BACKTRACE", "0")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(open_log(&self.log))
                .spawn()
                .expect("spawn ironblock-meta");
            match wait_ready(&mut child, self.addr, READY_TIMEOUT) {
                Ok(()) => {
                    self.child = Some(child);
                    return;
                }
                Err(e) => {
                    terminate(&mut child, Duration::from_secs(2));
                    last = format!("ironblock-meta {e}; log:\n{}", log_tail(&self.log, 4000));
                }
            }
        }
        panic!("{last}");
    }

    /// The gRPC address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://` URL of the gRPC address.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The sled directory.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The last 8 KiB of meta's log.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log, 8192)
    }

    /// SIGKILL.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            sigkill(&mut c);
        }
    }

    /// Start again on the same port with the same data (after kill9/stop).
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// SIGSTOP: meta freezes (a stalled host) but keeps its sockets.
    pub fn pause(&self) {
        signal_child(self.child.as_ref(), libc::SIGSTOP);
    }

    /// SIGCONT after [`MetaProcess::pause`].
    pub fn resume(&self) {
        signal_child(self.child.as_ref(), libc::SIGCONT);
    }

    /// SIGTERM and wait (5 s grace, then SIGKILL); true on a clean exit.
    pub fn stop(&mut self) -> bool {
        match self.child.take() {
            Some(mut c) => terminate(&mut c, Duration::from_secs(5)),
            None => true,
        }
    }

    /// The value of an unlabelled metric (e.g.
    /// `ironblock_meta_committed_ops_total`) from meta's `GET /metrics`.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let text = http_get(self.metrics, "/metrics").await.ok()?;
        text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            (k == name).then(|| v.parse().ok())?
        })
    }

    /// An admin client.
    pub async fn admin(&self) -> Admin {
        Admin::connect(self.addr).await
    }
}

/// What the meta node at `addr` says of its group (ListMetas, bounded:
/// 2 s); None if it does not answer.
pub async fn meta_view(addr: &str) -> Option<pb::ListMetasResponse> {
    let ep = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).ok()?;
    let fut = async {
        let ch = ep
            .connect_timeout(Duration::from_millis(500))
            .timeout(Duration::from_secs(1))
            .connect()
            .await
            .ok()?;
        let mut c = ironblock_proto::v1::meta_raft_client::MetaRaftClient::new(ch);
        c.list_metas(pb::ListMetasRequest {})
            .await
            .ok()
            .map(|r| r.into_inner())
    };
    tokio::time::timeout(Duration::from_secs(2), fut)
        .await
        .ok()
        .flatten()
}

/// A meta group of processes, formed together: every member starts with
/// the same `--peers` (ids 1..=n).
pub struct MetaGroup {
    /// Member `i` has node id `i + 1`.
    pub members: Vec<MetaProcess>,
}

impl MetaEndpoint for MetaGroup {
    fn meta_arg(&self) -> String {
        self.members
            .iter()
            .map(|m| m.addr.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl MetaGroup {
    /// `n` metas with their stores in `dir/meta-<id>`, on free ports.
    pub fn start(dir: &Path, n: usize, liveness: Duration) -> MetaGroup {
        let addrs: Vec<SocketAddr> = (0..n)
            .map(|_| SocketAddr::from(([127, 0, 0, 1], free_port())))
            .collect();
        let peers = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{}={a}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let members = addrs
            .iter()
            .enumerate()
            .map(|(i, addr)| {
                let data = dir.join(format!("meta-{}", i + 1));
                std::fs::create_dir_all(&data).expect("create meta dir");
                let mut m = MetaProcess {
                    child: None,
                    addr: *addr,
                    metrics: SocketAddr::from(([127, 0, 0, 1], free_port())),
                    log: log_path(&data),
                    data,
                    liveness,
                    env: Vec::new(),
                    group_args: vec![
                        "--id".into(),
                        (i + 1).to_string(),
                        "--peers".into(),
                        peers.clone(),
                    ],
                };
                m.spawn();
                m
            })
            .collect();
        MetaGroup { members }
    }

    /// What member `i` says of the group (bounded: 1 s); None if it does
    /// not answer.
    pub async fn view(&self, i: usize) -> Option<pb::ListMetasResponse> {
        let m = self.members.get(i)?;
        m.child.as_ref()?;
        meta_view(&m.addr.to_string()).await
    }

    /// The member that says it leads (and whose lease a quorum renewed
    /// recently), if any.
    pub async fn leader(&self) -> Option<usize> {
        for i in 0..self.members.len() {
            if let Some(v) = self.view(i).await {
                if v.leader_id == v.node_id && v.node_id == i as u64 + 1 {
                    return Some(i);
                }
            }
        }
        None
    }

    /// Wait (bounded) for a leader other than `not`; its index and how long
    /// the wait took.
    pub async fn wait_leader(
        &self,
        not: Option<usize>,
        bound: Duration,
    ) -> Option<(usize, Duration)> {
        let t = Instant::now();
        while t.elapsed() < bound {
            if let Some(l) = self.leader().await.filter(|l| Some(*l) != not) {
                return Some((l, t.elapsed()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// A client of the group (it follows the leader).
    pub fn admin(&self) -> Admin {
        Admin::connect_to(&self.meta_arg())
    }

    /// The members' log tails.
    pub fn log_tails(&self) -> String {
        self.members
            .iter()
            .enumerate()
            .map(|(i, m)| format!("--- meta {} ---\n{}", i + 1, log_tail(&m.log, 3000)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for MetaProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Options of a chunk process.
#[derive(Clone, Debug)]
pub struct ChunkOptions {
    /// `--scrub-interval` (default `0`: no scrubbing).
    pub scrub_interval: String,
    /// `--block-size`.
    pub block_size: u32,
    /// Extra `run` arguments.
    pub extra_args: Vec<String>,
}

impl Default for ChunkOptions {
    fn default() -> Self {
        ChunkOptions {
            scrub_interval: "0".into(),
            block_size: 512,
            extra_args: Vec::new(),
        }
    }
}

/// A running `ironblock-chunk run`.
pub struct ChunkProcess {
    child: Option<Child>,
    dir: PathBuf,
    meta: String,
    opts: ChunkOptions,
    log: PathBuf,
    chunk_id: u64,
    cluster_id: String,
    portal: SocketAddr,
    data_addr: SocketAddr,
    metrics: SocketAddr,
}

/// Run `ironblock-chunk init` on `dir`; returns (chunk id, cluster id) or the
/// failure output.
pub fn chunk_init(meta: &str, dir: &Path, force: bool) -> Result<(u64, String), String> {
    let mut cmd = Command::new(bin_path("ironblock-chunk"));
    cmd.arg("init")
        .arg("--data")
        .arg(dir)
        .arg("--meta")
        .arg(meta)
        // Placeholders until `run` registers the bound addresses; distinct so
        // chunks initialised side by side never collide.
        .arg("--portal")
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--data-addr")
        .arg(format!("127.0.0.1:{}", free_port()));
    if force {
        cmd.arg("--force");
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .expect("run ironblock-chunk init");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!(
            "init failed ({}): {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let words: Vec<&str> = stdout.split_whitespace().collect();
    match words.as_slice() {
        ["chunk", id, "cluster", cluster] => Ok((
            id.parse()
                .map_err(|_| format!("bad chunk id in {stdout:?}"))?,
            cluster.to_string(),
        )),
        _ => Err(format!("unexpected init output {stdout:?}")),
    }
}

/// Parse `ready chunk=<id> portal=<addr> data=<addr>`.
pub fn parse_ready(line: &str) -> Option<(u64, SocketAddr, SocketAddr)> {
    let mut it = line.trim().split(' ');
    if it.next()? != "ready" {
        return None;
    }
    let id = it.next()?.strip_prefix("chunk=")?.parse().ok()?;
    let portal = it.next()?.strip_prefix("portal=")?.parse().ok()?;
    let data = it.next()?.strip_prefix("data=")?.parse().ok()?;
    if it.next().is_some() {
        return None;
    }
    Some((id, portal, data))
}

/// `n` chunks with default options on fresh data directories
/// `DIR/chunk-1` .. `DIR/chunk-n`, each started and ready.
pub fn start_chunks(meta: &impl MetaEndpoint, dir: &Path, n: usize) -> Vec<ChunkProcess> {
    (1..=n)
        .map(|i| {
            ChunkProcess::init_and_start(
                meta,
                &dir.join(format!("chunk-{i}")),
                ChunkOptions::default(),
            )
        })
        .collect()
}

impl ChunkProcess {
    /// `init` a fresh data directory `dir` against `meta`, then `run` it and
    /// wait for its ready line.
    pub fn init_and_start(
        meta: &impl MetaEndpoint,
        dir: &Path,
        opts: ChunkOptions,
    ) -> ChunkProcess {
        let (chunk_id, cluster_id) =
            chunk_init(&meta.meta_arg(), dir, false).unwrap_or_else(|e| panic!("{e}"));
        let mut c = ChunkProcess {
            child: None,
            dir: dir.to_path_buf(),
            meta: meta.meta_arg(),
            opts,
            log: log_path(dir),
            chunk_id,
            cluster_id,
            portal: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        c.spawn();
        c
    }

    fn spawn(&mut self) {
        match self.try_spawn() {
            Ok(()) => {}
            Err(e) => panic!("{e}"),
        }
    }

    /// `run` the data directory; Err carries the reason and the log tail.
    fn try_spawn(&mut self) -> Result<(), String> {
        self.metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut child = Command::new(bin_path("ironblock-chunk"))
            .arg("run")
            .arg("--data")
            .arg(&self.dir)
            .arg("--meta")
            .arg(&self.meta)
            .args(["--listen", "127.0.0.1:0", "--data-listen", "127.0.0.1:0"])
            .arg("--metrics")
            .arg(self.metrics.to_string())
            .arg("--scrub-interval")
            .arg(&self.opts.scrub_interval)
            .arg("--block-size")
            .arg(self.opts.block_size.to_string())
            .args(&self.opts.extra_args)
            .env("RUST_BACKTRACE", "1")
            .env("RUST_LIB_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(open_log(&self.log))
            .spawn()
            .expect("spawn ironblock-chunk run");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        // Reads the ready line, then keeps draining stdout.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(l) => {
                        let _ = tx.send(l);
                    }
                    Err(_) => return,
                }
            }
        });
        let deadline = Instant::now() + CHUNK_READY_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left.min(Duration::from_millis(200))) {
                Ok(line) => match parse_ready(&line) {
                    Some((id, portal, data)) => {
                        assert_eq!(id, self.chunk_id, "ready line names another chunk");
                        self.portal = portal;
                        self.data_addr = data;
                        self.child = Some(child);
                        return Ok(());
                    }
                    None => {
                        terminate(&mut child, Duration::from_secs(2));
                        return Err(format!("unexpected stdout line {line:?}"));
                    }
                },
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {
                    if let Ok(Some(status)) = child.try_wait() {
                        return Err(format!(
                            "ironblock-chunk run exited during start-up ({status}); log:\n{}",
                            log_tail(&self.log, 6000)
                        ));
                    }
                }
                Err(_) => {
                    terminate(&mut child, Duration::from_secs(2));
                    return Err(format!(
                        "ironblock-chunk run printed no ready line within {CHUNK_READY_TIMEOUT:?}; log:\n{}",
                        log_tail(&self.log, 6000)
                    ));
                }
            }
        }
    }

    /// Meta's id of this chunk.
    pub fn chunk_id(&self) -> u64 {
        self.chunk_id
    }

    /// The cluster id the data directory is stamped with.
    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// The iSCSI portal from the last ready line.
    pub fn portal(&self) -> SocketAddr {
        self.portal
    }

    /// The replica address from the last ready line.
    pub fn data_addr(&self) -> SocketAddr {
        self.data_addr
    }

    /// The metrics address.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    /// The `.data` file of extent `index` of `store_key` (a volume id for
    /// generation 0) in this chunk's store.
    pub fn extent_data_path(&self, store_key: &str, index: u64) -> PathBuf {
        self.dir
            .join("extents")
            .join(format!("{store_key}.{index:016x}.data"))
    }

    /// Store keys of every extent file in the data directory, sorted.
    pub fn extent_files(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.dir.join("extents"))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| n.ends_with(".meta"))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// The last 8 KiB of the chunk's log.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log, 8192)
    }

    /// Whether the process runs.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            sigkill(&mut c);
        }
    }

    fn signal(&self, sig: libc::c_int) {
        signal_child(self.child.as_ref(), sig);
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGSTOP: the process freezes (no heartbeats, no I/O) but keeps its
    /// sockets, like a partitioned or hung machine.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT after [`ChunkProcess::pause`].
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    /// `run` the same data directory again (after kill9/stop) and wait for
    /// the ready line; addresses change.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// SIGTERM and wait up to 15 s; true when it exited with status 0.
    pub fn stop(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return true;
        };
        if let Ok(pid) = libc::pid_t::try_from(c.id()) {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = c.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        sigkill(&mut c);
        false
    }

    /// The value of an unlabelled metric (e.g.
    /// `ironblock_chunk_applied_revision`) from `GET /metrics`.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let text = http_get(self.metrics, "/metrics").await.ok()?;
        text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            (k == name).then(|| v.parse().ok())?
        })
    }

    /// The whole `/metrics` text.
    pub async fn metrics_text(&self) -> String {
        http_get(self.metrics, "/metrics").await.unwrap_or_default()
    }

    /// The sum of every series of the counter `name` (all label sets, e.g.
    /// one per volume); 0 when the chunk does not answer or has none.
    pub async fn metric_sum(&self, name: &str) -> u64 {
        self.metrics_text()
            .await
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                let series = k.split_once('{').map_or(k, |(n, _)| n);
                (series == name).then(|| v.parse::<f64>().ok())?
            })
            .map(|v| v as u64)
            .sum()
    }

    /// Wait (bounded by `timeout`) until the chunk reports having applied
    /// meta revision `revision`. False on timeout.
    pub async fn wait_applied(&self, revision: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self
                .metric("ironblock_chunk_applied_revision")
                .await
                .is_some_and(|v| v >= revision as f64)
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }
}

impl Drop for ChunkProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The value of the sample whose name-and-labels is exactly `key` in a
/// Prometheus text page.
pub fn metric_value(text: &str, key: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == key).then(|| v.parse().ok())?
    })
}

/// A free port on the loopback VIP address 127.0.0.100 (every 127/8 address
/// is local, so redirectors can bind it without touching an interface).
pub fn loopback_vip() -> SocketAddr {
    for _ in 0..20 {
        let a = SocketAddr::from(([127, 0, 0, 100], free_port()));
        if std::net::TcpListener::bind(a).is_ok() {
            return a;
        }
    }
    panic!("no free port on 127.0.0.100");
}

/// A running `ironblock-redirector` (killed on drop); stderr goes to
/// `build/test-logs/<dir>-<name>.log`.
pub struct RedirectorProcess {
    child: Option<Child>,
    name: String,
    meta: String,
    vip: SocketAddr,
    lease_ttl: Duration,
    extra: Vec<String>,
    metrics: SocketAddr,
    log: PathBuf,
}

impl RedirectorProcess {
    /// Start a redirector named `name` for `vip` against `meta`, with a
    /// 2 s lease ttl and the default probe interval.
    pub fn start(
        meta: &impl MetaEndpoint,
        vip: SocketAddr,
        name: &str,
        dir: &Path,
    ) -> RedirectorProcess {
        Self::start_with(meta, vip, name, dir, Duration::from_secs(2), &[])
    }

    /// [`RedirectorProcess::start`] with a lease ttl and extra arguments
    /// (kept across [`RedirectorProcess::restart`]).
    pub fn start_with(
        meta: &impl MetaEndpoint,
        vip: SocketAddr,
        name: &str,
        dir: &Path,
        lease_ttl: Duration,
        extra: &[&str],
    ) -> RedirectorProcess {
        let log = crate::log_dir().join(format!(
            "{}-{name}.log",
            dir.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        ));
        let mut r = RedirectorProcess {
            child: None,
            name: name.to_string(),
            meta: meta.meta_arg(),
            vip,
            lease_ttl,
            extra: extra.iter().map(|a| a.to_string()).collect(),
            metrics: SocketAddr::from(([127, 0, 0, 1], 0)),
            log,
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        self.metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let child = Command::new(bin_path("ironblock-redirector"))
            .args(["--meta", &self.meta])
            .args(["--vip", &self.vip.to_string()])
            .args(["--name", &self.name])
            .arg("--lease-ttl")
            .arg(format!("{}ms", self.lease_ttl.as_millis()))
            .args(["--metrics", &self.metrics.to_string()])
            .args(&self.extra)
            .env("RUST_LOG", "info")
            .env("RUST_BACKTRACE", "1")
            .env("RUST_LIB_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(open_log(&self.log))
            .spawn()
            .expect("spawn ironblock-redirector");
        self.child = Some(child);
    }

    /// The instance name (the lease holder name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A metric sample by name-and-labels.
    pub async fn metric(&self, key: &str) -> Option<f64> {
        let text = http_get(self.metrics, "/metrics").await.ok()?;
        metric_value(&text, key)
    }

    /// Whether it reports holding the VIP lease (and serving the VIP).
    pub async fn holds_vip(&self) -> bool {
        self.metric("ironblock_redirector_lease_held").await == Some(1.0)
    }

    /// Logins redirected to chunk `id` so far (0 when none).
    pub async fn redirects_to(&self, id: u64) -> f64 {
        self.metric(&format!(
            "ironblock_redirector_redirects_total{{chunk=\"{id}\"}}"
        ))
        .await
        .unwrap_or(0.0)
    }

    /// Wait (bounded) until it serves the VIP with `chunks` live chunks.
    pub async fn wait_serving(&self, chunks: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.holds_vip().await
                && self.metric("ironblock_redirector_live_chunks").await == Some(chunks as f64)
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    /// The last 4 KiB of its log.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log, 4096)
    }

    /// SIGKILL.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            sigkill(&mut c);
        }
    }

    /// Start again (after kill9) with a new metrics port.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }
}

impl Drop for RedirectorProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Send `sig` to a child we have not reaped.
fn signal_child(child: Option<&Child>, sig: libc::c_int) {
    if let Some(pid) = child.and_then(|c| libc::pid_t::try_from(c.id()).ok()) {
        // SAFETY: kill(2) on our own unreaped child.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// A minimal HTTP/1.0 GET on 127.0.0.1 (metrics endpoints).
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        Ok(text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default())
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "GET timed out"))?
}

/// The meta gRPC API for tests: volumes, ACLs, extents, chunks.
pub struct Admin {
    client: MetaClient<MetaChannel>,
}

impl Admin {
    /// A client of meta at `addr` (connects lazily; a call follows the
    /// group's leader and is retried for up to 10 s).
    pub async fn connect(addr: SocketAddr) -> Admin {
        Self::connect_to(&addr.to_string())
    }

    /// A client of the meta group `addrs` (`host:port,...`).
    pub fn connect_to(addrs: &str) -> Admin {
        let ch = MetaChannel::new(addrs, Duration::from_secs(10), |e| {
            e.connect_timeout(Duration::from_millis(500))
                .timeout(Duration::from_secs(10))
        })
        .expect("meta address list");
        Admin {
            client: MetaClient::new(ch),
        }
    }

    /// The raw generated client.
    pub fn client(&mut self) -> &mut MetaClient<MetaChannel> {
        &mut self.client
    }

    /// Create a thin volume (panics on error).
    pub async fn create_volume(&mut self, name: &str, size: u64, replicas: u32) -> pb::Volume {
        self.create_volume_with(name, size, replicas, true).await
    }

    /// Create a thick volume: every extent placed up front.
    pub async fn create_thick_volume(
        &mut self,
        name: &str,
        size: u64,
        replicas: u32,
    ) -> pb::Volume {
        self.create_volume_with(name, size, replicas, false).await
    }

    async fn create_volume_with(
        &mut self,
        name: &str,
        size: u64,
        replicas: u32,
        thin: bool,
    ) -> pb::Volume {
        self.client
            .create_volume(pb::CreateVolumeRequest {
                name: name.into(),
                size_bytes: size,
                replicas,
                thin,
            })
            .await
            .expect("CreateVolume")
            .into_inner()
            .volume
            .expect("volume in response")
    }

    /// Allow `initiator` on the volume's LUN.
    pub async fn acl_add(&mut self, volume_id: &str, initiator: &str) {
        self.client
            .acl_add(pb::AclRequest {
                volume_id: volume_id.into(),
                initiator_iqn: initiator.into(),
                ..Default::default()
            })
            .await
            .expect("AclAdd");
    }

    /// Allow `initiator` on the volume's LUN read-only (write-protected).
    pub async fn acl_add_read_only(&mut self, volume_id: &str, initiator: &str) {
        self.acl_add_mode(volume_id, initiator, true, false)
            .await
            .expect("AclAdd read-only");
    }

    /// AclAdd with a mode (`read_only`), optionally as a mode change.
    pub async fn acl_add_mode(
        &mut self,
        volume_id: &str,
        initiator: &str,
        read_only: bool,
        change_mode: bool,
    ) -> Result<pb::AclResponse, tonic::Status> {
        self.client
            .acl_add(pb::AclRequest {
                volume_id: volume_id.into(),
                initiator_iqn: initiator.into(),
                read_only,
                change_mode,
            })
            .await
            .map(|r| r.into_inner())
    }

    /// Revoke `initiator`.
    pub async fn acl_remove(&mut self, volume_id: &str, initiator: &str) {
        self.client
            .acl_remove(pb::AclRequest {
                volume_id: volume_id.into(),
                initiator_iqn: initiator.into(),
                ..Default::default()
            })
            .await
            .expect("AclRemove");
    }

    /// The volume's extents.
    pub async fn extents(&mut self, volume_id: &str) -> Vec<pb::Extent> {
        self.client
            .get_extents(pb::GetExtentsRequest {
                volume_id: volume_id.into(),
            })
            .await
            .expect("GetExtents")
            .into_inner()
            .extents
    }

    /// Every chunk.
    pub async fn chunks(&mut self) -> Vec<pb::Chunk> {
        self.client
            .list_chunks(pb::ListChunksRequest {})
            .await
            .expect("ListChunks")
            .into_inner()
            .chunks
    }

    /// Meta's cluster status.
    pub async fn status(&mut self) -> pb::ClusterStatusResponse {
        self.client
            .cluster_status(pb::ClusterStatusRequest {})
            .await
            .expect("ClusterStatus")
            .into_inner()
    }

    /// Meta's current revision.
    pub async fn revision(&mut self) -> u64 {
        self.status().await.revision
    }

    /// Wait (bounded) until chunk `id` is in `state`. False on timeout.
    pub async fn wait_chunk_state(
        &mut self,
        id: u64,
        state: pb::ChunkState,
        timeout: Duration,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self
                .chunks()
                .await
                .iter()
                .any(|c| c.id == id && c.state == state as i32)
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_lines() {
        let (id, p, d) = parse_ready("ready chunk=3 portal=127.0.0.1:3261 data=127.0.0.1:40000\n")
            .expect("parses");
        assert_eq!(id, 3);
        assert_eq!(p.port(), 3261);
        assert_eq!(d.port(), 40000);
        assert!(parse_ready("ready chunk=x portal=127.0.0.1:1 data=127.0.0.1:2").is_none());
        assert!(parse_ready("ready chunk=1 portal=127.0.0.1:1").is_none());
        assert!(parse_ready("ready chunk=1 portal=127.0.0.1:1 data=127.0.0.1:2 x").is_none());
    }
}
