//! The verifying write load and the bookkeeping of the chaos suites
//! (`tests/tests/chaos.rs` on processes, `tests/tests/compose_chaos.rs` on
//! the compose cluster).
//!
//! - [`Load`]: [`WRITERS`] writers, each an initiator of its own
//!   ([`writer_iqn`]) logged in through the VIP following the login
//!   redirect, writing 4 KiB payloads that name writer, sequence number and
//!   LBA ([`payload`], [`tag`]) to LBAs it alone owns ([`slot_lba`]). A write
//!   that fails or times out has an unknown outcome: its LBA may hold it or
//!   the previous acknowledged write ([`Expect`]) and the writer never
//!   writes that LBA again. After a failure the writer drops its session
//!   and logs in through the VIP again. A hung target is found as the Linux
//!   initiator finds it with the CSI node's timers ([`nop_timers`]: a
//!   NOP-Out after 1 s of silence, unanswered for 1 s). Per writer the longest gap between
//!   acknowledged writes in a window is the I/O stall.
//! - [`verify_all`]: pause the load, read every LBA back through each
//!   portal given, count acknowledged writes verified and lost.
//! - [`Row`], [`print_table`]: the per-scenario report.
//! - [`seed_from_env`], [`scenarios_from_env`]: `CHAOS_SEED` and
//!   `CHAOS_SCENARIOS`, read the same way by both suites.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use tokio::sync::RwLock;

use ironblock_proto::v1 as pb;

use crate::cluster::{Admin, ChunkOptions, ChunkProcess, MetaGroup};
use crate::initiator::{LoginOptions, Session};

pub const BS: u32 = 512;
/// One write: 8 logical blocks (4 KiB).
pub const IO_BLOCKS: u64 = 8;
pub const EXTENT: u64 = 64 << 20;
/// Four extents, RF=2 over three chunks: eight replicas, so with meta's
/// rebalancing (within 2 replicas) every chunk holds at least two.
pub const VOLUME_SIZE: u64 = 4 * EXTENT;
pub const RF: u32 = 2;
pub const WRITERS: u64 = 4;
/// LBAs (4 KiB slots) each writer owns, spread over the whole volume.
pub const SLOTS_PER_WRITER: u64 = 256;
/// A write not answered within this is an unknown outcome.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// How the writers find a hung target, modelled on the Linux initiator with
/// the CSI node's session timers (`SESSION_TIMEOUTS`): after
/// `noop_out_interval` with no answer the writer sends a NOP-Out on the same
/// session, and if that is not answered within `noop_out_timeout` it drops
/// the session (the write's outcome is unknown) and logs in through the VIP
/// again. A target that is slow but alive answers the NOP-Out, and the
/// write goes on waiting, up to [`WRITE_TIMEOUT`].
pub fn nop_timers() -> (Duration, Duration) {
    let secs = |key: &str| {
        ironblock_csi::node::host::SESSION_TIMEOUTS
            .iter()
            .find(|(k, _)| *k == key)
            .and_then(|(_, v)| v.parse::<u64>().ok())
            .map(Duration::from_secs)
            .unwrap_or_else(|| panic!("SESSION_TIMEOUTS has no numeric {key}"))
    };
    (
        secs("node.conn[0].timeo.noop_out_interval"),
        secs("node.conn[0].timeo.noop_out_timeout"),
    )
}

/// Whether `s` answers a NOP-Out within `timeout`.
async fn answers_nop(s: &Session, timeout: Duration) -> bool {
    matches!(tokio::time::timeout(timeout, s.ping()).await, Ok(Ok(_)))
}

/// One write on `s`, with the initiator's hang detection ([`nop_timers`]):
/// `None` when the write was not answered in time or its session was found
/// hung.
async fn write_watched(
    s: &Session,
    lun: u64,
    lba: u64,
    data: Bytes,
    (interval, nop_timeout): (Duration, Duration),
) -> Option<crate::initiator::ScsiReply> {
    let write = tokio::time::timeout(WRITE_TIMEOUT, s.write16(lun, lba, data, BS));
    tokio::pin!(write);
    let mut next_nop = tokio::time::Instant::now() + interval;
    loop {
        tokio::select! {
            res = &mut write => return res.ok()?.ok(),
            _ = tokio::time::sleep_until(next_nop) => {
                if !answers_nop(s, nop_timeout).await {
                    return None;
                }
                next_nop = tokio::time::Instant::now() + interval;
            }
        }
    }
}
pub const VERIFIER: &str = "iqn.2026-11.dev.ironblock:chaos-verify";

/// The run's seed: `CHAOS_SEED`, else a random one; printed first, so that
/// any run can be replayed.
pub fn seed_from_env() -> u64 {
    let seed: u64 = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    println!("CHAOS_SEED={seed}");
    seed
}

/// The scenarios to run, in order: `CHAOS_SCENARIOS` (comma-separated),
/// else every one of `all`. A name not in `all` fails the test.
pub fn scenarios_from_env(all: &[&str]) -> Vec<String> {
    let scenarios: Vec<String> = match std::env::var("CHAOS_SCENARIOS") {
        Ok(s) if !s.trim().is_empty() => s.split(',').map(|x| x.trim().to_string()).collect(),
        _ => all.iter().map(|s| s.to_string()).collect(),
    };
    for s in &scenarios {
        assert!(
            all.contains(&s.as_str()),
            "unknown scenario {s:?} in CHAOS_SCENARIOS (known: {all:?})"
        );
    }
    scenarios
}

pub fn writer_iqn(w: u64) -> String {
    format!("iqn.2026-11.dev.ironblock:chaos-w{w}")
}

/// 4 KiB slots between two consecutive slots of the load.
pub const STRIDE: u64 = VOLUME_SIZE / (IO_BLOCKS * BS as u64) / (SLOTS_PER_WRITER * WRITERS);

/// The LBA of writer `w`'s slot `slot` in region `region` (< [`STRIDE`]):
/// slots of all writers interleave and spread over the whole volume (every
/// extent); a new region is a fresh set of LBAs no write touched before
/// (unallocated space on every chunk).
pub fn slot_lba(w: u64, slot: u64, region: u64) -> u64 {
    ((slot * WRITERS + w) * STRIDE + region % STRIDE) * IO_BLOCKS
}

/// A payload that names its writer, sequence number and LBA.
pub fn payload(rng: &mut impl RngCore, writer: u64, seq: u64, lba: u64) -> Bytes {
    let mut v = vec![0u8; (IO_BLOCKS * u64::from(BS)) as usize];
    rng.fill_bytes(&mut v);
    v[0..8].copy_from_slice(&writer.to_le_bytes());
    v[8..16].copy_from_slice(&seq.to_le_bytes());
    v[16..24].copy_from_slice(&lba.to_le_bytes());
    Bytes::from(v)
}

/// (writer, sequence number, LBA) a payload names.
pub fn tag(d: &[u8]) -> (u64, u64, u64) {
    let n = |r: std::ops::Range<usize>| {
        d.get(r)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
            .unwrap_or(u64::MAX)
    };
    (n(0..8), n(8..16), n(16..24))
}

/// What an LBA may hold: the last acknowledged write, or one of the writes
/// with an unknown outcome issued after it (after one of those the LBA is
/// never written again).
#[derive(Clone, Default)]
pub struct Expect {
    pub acked: Option<Bytes>,
    pub maybe: Vec<Bytes>,
}

impl Expect {
    pub fn allows(&self, got: &[u8]) -> bool {
        let zeros = self.acked.is_none() && got.iter().all(|b| *b == 0);
        zeros || self.acked.as_deref() == Some(got) || self.maybe.iter().any(|m| m.as_ref() == got)
    }
}

pub type Book = Arc<Mutex<HashMap<u64, Expect>>>;

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One write into every extent of the (thin) volume, so that all are
/// placed before any fault.
pub async fn place_extents(s: &Session, lun: u64) {
    for i in 0..VOLUME_SIZE / EXTENT {
        let r = s
            .write16(
                lun,
                i * EXTENT / u64::from(BS) + 8,
                Bytes::from(vec![1u8; 4096]),
                BS,
            )
            .await
            .expect("placing write");
        assert_eq!(r.status, 0, "placing write: {:?}", r.sense_key());
    }
}

/// Meta's cluster status and the volume's extents (index, members,
/// learners, epoch), for progress lines and failure reports.
pub async fn status_report(admin: &mut Admin, volume_id: &str) -> String {
    let st = admin
        .client()
        .cluster_status(pb::ClusterStatusRequest {})
        .await
        .map(|r| format!("{:?}", r.into_inner()))
        .unwrap_or_else(|e| format!("status failed: {e}"));
    let ext: Vec<_> = admin
        .extents(volume_id)
        .await
        .iter()
        .map(|e| (e.index, e.replicas.clone(), e.learners.clone(), e.epoch))
        .collect();
    format!("{st}\nextents (index, members, learners, epoch): {ext:?}")
}

/// The suites' process cluster up to its volume: a meta group of three
/// voters in `dir` (a leader within 20 s), one chunk per directory of
/// `chunk_dirs`, and the RF=[`RF`] volume `name` of [`VOLUME_SIZE`] with the
/// writers and the [`VERIFIER`] in its ACL, applied by every chunk.
pub async fn start_group_cluster(
    dir: &std::path::Path,
    liveness: Duration,
    chunk_dirs: &[std::path::PathBuf],
    name: &str,
) -> (MetaGroup, Vec<ChunkProcess>, Admin, pb::Volume) {
    let metas = MetaGroup::start(dir, 3, liveness);
    assert!(
        metas
            .wait_leader(None, Duration::from_secs(20))
            .await
            .is_some(),
        "no meta leader within 20 s:\n{}",
        metas.log_tails()
    );
    let chunks: Vec<ChunkProcess> = chunk_dirs
        .iter()
        .map(|d| ChunkProcess::init_and_start(&metas, d, ChunkOptions::default()))
        .collect();
    let mut admin = metas.admin();
    let vol = admin.create_volume(name, VOLUME_SIZE, RF).await;
    for w in 0..WRITERS {
        admin.acl_add(&vol.id, &writer_iqn(w)).await;
    }
    admin.acl_add(&vol.id, VERIFIER).await;
    let rev = admin.revision().await;
    for c in &chunks {
        assert!(
            c.wait_applied(rev, Duration::from_secs(30)).await,
            "chunk {} did not apply revision {rev}; log:\n{}",
            c.chunk_id(),
            c.log_tail()
        );
    }
    (metas, chunks, admin, vol)
}

/// Wait (polling every 200 ms, at most `timeout`) until meta reports full
/// replication: `chunks` alive, no degraded or unavailable extent, and every
/// extent of `volume_id` with at least `rf` members. The time it took, or
/// `None` on the bound.
pub async fn wait_full_replication(
    admin: &mut Admin,
    volume_id: &str,
    chunks: usize,
    rf: u32,
    timeout: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    let deadline = started + timeout;
    while Instant::now() < deadline {
        let st = admin
            .client()
            .cluster_status(pb::ClusterStatusRequest {})
            .await
            .map(|r| r.into_inner());
        if let Ok(st) = st {
            if st.chunks_alive == chunks as u64
                && st.degraded_extents == 0
                && st.unavailable_extents == 0
                && admin
                    .extents(volume_id)
                    .await
                    .iter()
                    .all(|e| e.replicas.len() >= rf as usize)
            {
                return Some(started.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

/// Log in through `portal` (following redirects) and clear the power-on
/// unit attention. Bounded: 10 s for the login, 10 TEST UNIT READYs.
pub async fn connect(
    portal: SocketAddr,
    initiator: &str,
    target: &str,
    lun: u64,
) -> Option<Session> {
    connect_at(portal, initiator, target, lun)
        .await
        .map(|(_, s)| s)
}

/// [`connect`], with the portal the session ended up at (after redirects).
pub async fn connect_at(
    portal: SocketAddr,
    initiator: &str,
    target: &str,
    lun: u64,
) -> Option<(SocketAddr, Session)> {
    let opts = LoginOptions::normal(initiator, target);
    let (at, s) = tokio::time::timeout(
        Duration::from_secs(10),
        Session::login_following_redirects(portal, &opts, 4),
    )
    .await
    .ok()?
    .ok()?;
    for _ in 0..10 {
        match tokio::time::timeout(Duration::from_secs(5), s.test_unit_ready(lun)).await {
            Ok(Ok(r)) if r.status == 0 => return Some((at, s)),
            Ok(Ok(_)) => {}
            _ => return None,
        }
    }
    None
}

/// The verifier's first login through the VIP, retried every 200 ms for at
/// most `bound` (the redirector may not serve the VIP yet).
pub async fn first_login(
    vip: SocketAddr,
    target: &str,
    lun: u64,
    bound: Duration,
) -> Option<Session> {
    let t0 = Instant::now();
    loop {
        if let Some(s) = connect(vip, VERIFIER, target, lun).await {
            return Some(s);
        }
        if t0.elapsed() >= bound {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[derive(Clone, Debug)]
pub struct WriterStat {
    pub acked: u64,
    pub failed: u64,
    pub logins: u64,
    pub last_ack: Instant,
    /// Longest gap between two acknowledged writes in the current window.
    pub max_gap: Duration,
    /// The chunk portal the writer's current session is logged in at.
    pub portal: Option<SocketAddr>,
}

/// The verifying load through the VIP.
pub struct Load {
    pub book: Book,
    /// Writers hold it shared around each write; the verifier takes it
    /// exclusively, so it reads a quiet volume.
    pub gate: Arc<RwLock<()>>,
    pub stop: Arc<AtomicBool>,
    /// Which set of LBAs the writers write ([`slot_lba`]).
    pub region: Arc<AtomicU64>,
    pub stats: Arc<Mutex<Vec<WriterStat>>>,
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub fn start(vip: SocketAddr, target: String, lun: u64, seed: u64, run_for: Duration) -> Load {
        let book: Book = Arc::default();
        let gate = Arc::new(RwLock::new(()));
        let stop = Arc::new(AtomicBool::new(false));
        let region = Arc::new(AtomicU64::new(0));
        let now = Instant::now();
        let stats = Arc::new(Mutex::new(
            (0..WRITERS)
                .map(|_| WriterStat {
                    acked: 0,
                    failed: 0,
                    logins: 0,
                    last_ack: now,
                    max_gap: Duration::ZERO,
                    portal: None,
                })
                .collect::<Vec<_>>(),
        ));
        let hard_deadline = now + run_for;
        let timers = nop_timers();
        let tasks = (0..WRITERS)
            .map(|w| {
                let (book, gate, stop, stats, target, region) = (
                    book.clone(),
                    gate.clone(),
                    stop.clone(),
                    stats.clone(),
                    target.clone(),
                    region.clone(),
                );
                let mut rng = StdRng::seed_from_u64(seed ^ (0x5157 + w));
                tokio::spawn(async move {
                    let iqn = writer_iqn(w);
                    let mut session: Option<Session> = None;
                    let mut retired: HashSet<u64> = HashSet::new();
                    // Bounded in count and in time.
                    for seq in 0..5_000_000u64 {
                        if stop.load(Ordering::Relaxed) || Instant::now() > hard_deadline {
                            break;
                        }
                        let Some(s) = session.as_ref() else {
                            let at = connect_at(vip, &iqn, &target, lun).await;
                            if let Some((portal, s)) = at {
                                session = Some(s);
                                let mut st = lock(&stats);
                                st[w as usize].logins += 1;
                                st[w as usize].portal = Some(portal);
                            } else {
                                tokio::time::sleep(Duration::from_millis(200)).await;
                            }
                            continue;
                        };
                        let reg = region.load(Ordering::Relaxed);
                        let Some(lba) = (0..64)
                            .map(|_| slot_lba(w, rng.gen_range(0..SLOTS_PER_WRITER), reg))
                            .find(|l| !retired.contains(l))
                        else {
                            break;
                        };
                        let data = payload(&mut rng, w, seq, lba);
                        // The gate is held until the outcome is in the
                        // book: the verifier never sees data newer than it.
                        let gate_guard = gate.read().await;
                        let res = write_watched(s, lun, lba, data.clone(), timers).await;
                        let ok = matches!(&res, Some(r) if r.status == 0);
                        {
                            let mut book = lock(&book);
                            let e = book.entry(lba).or_default();
                            if ok {
                                e.acked = Some(data);
                                e.maybe.clear();
                            } else {
                                e.maybe.push(data);
                            }
                        }
                        drop(gate_guard);
                        let mut st = lock(&stats);
                        let st = &mut st[w as usize];
                        if ok {
                            let now = Instant::now();
                            st.max_gap = st.max_gap.max(now - st.last_ack);
                            st.last_ack = now;
                            st.acked += 1;
                        } else {
                            st.failed += 1;
                            st.portal = None;
                            retired.insert(lba);
                            session = None;
                        }
                    }
                })
            })
            .collect();
        Load {
            book,
            gate,
            stop,
            region,
            stats,
            tasks,
        }
    }

    /// Start a new stall window: gaps are measured from now.
    pub fn begin_window(&self) {
        let now = Instant::now();
        for s in lock(&self.stats).iter_mut() {
            s.last_ack = now;
            s.max_gap = Duration::ZERO;
        }
    }

    /// Per writer: the longest gap between acknowledged writes since
    /// [`Load::begin_window`], including a gap still open.
    pub fn window_stalls(&self) -> Vec<f64> {
        let now = Instant::now();
        lock(&self.stats)
            .iter()
            .map(|s| s.max_gap.max(now - s.last_ack).as_secs_f64())
            .collect()
    }

    /// [`Load::window_stalls`] split in two: those of the writers `apart`
    /// marks (for example the ones logged in at a chunk that hung), and the
    /// rest.
    pub fn window_stalls_apart(&self, apart: &[bool]) -> (Vec<f64>, Vec<f64>) {
        let (mut marked, mut rest) = (Vec::new(), Vec::new());
        for (w, stall) in self.window_stalls().into_iter().enumerate() {
            if apart.get(w).copied().unwrap_or(false) {
                marked.push(stall);
            } else {
                rest.push(stall);
            }
        }
        (marked, rest)
    }

    /// Per writer: the chunk portal its session is logged in at now.
    pub fn portals(&self) -> Vec<Option<SocketAddr>> {
        lock(&self.stats).iter().map(|s| s.portal).collect()
    }

    pub fn totals(&self) -> (u64, u64, u64) {
        lock(&self.stats).iter().fold((0, 0, 0), |a, s| {
            (a.0 + s.acked, a.1 + s.failed, a.2 + s.logins)
        })
    }

    pub async fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = tokio::time::timeout(WRITE_TIMEOUT * 2, t).await;
        }
    }
}

/// Read every LBA in `book` through a session at `portal` (following
/// redirects). Returns (acknowledged LBAs verified, LBAs lost with a
/// description, LBAs unreadable).
pub async fn verify_via(
    portal: SocketAddr,
    target: &str,
    lun: u64,
    book: &HashMap<u64, Expect>,
) -> (u64, Vec<(u64, String)>, u64) {
    let Some(s) = connect(portal, VERIFIER, target, lun).await else {
        return (0, Vec::new(), book.len() as u64);
    };
    let s = Arc::new(s);
    let results: Vec<(u64, Option<Bytes>)> = futures::stream::iter(book.keys().copied())
        .map(|lba| {
            let s = s.clone();
            async move {
                for _ in 0..3 {
                    if let Ok(Ok(r)) = tokio::time::timeout(
                        Duration::from_secs(10),
                        s.read16(lun, lba, IO_BLOCKS as u32, BS),
                    )
                    .await
                    {
                        if r.status == 0 {
                            return (lba, Some(r.data));
                        }
                    }
                }
                (lba, None)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let (mut verified, mut lost, mut unreadable) = (0, Vec::new(), 0);
    for (lba, data) in results {
        let e = &book[&lba];
        match data {
            None => unreadable += 1,
            Some(d) if e.allows(&d) => {
                if e.acked.is_some() {
                    verified += 1;
                }
            }
            Some(d) => lost.push((
                lba,
                format!(
                    "lba {lba}: acked (writer, seq, lba) {:?}, unknown-outcome writes {:?}, \
                     read {:?}{}",
                    e.acked.as_deref().map(tag),
                    e.maybe.iter().map(|m| tag(m)).collect::<Vec<_>>(),
                    tag(&d),
                    if d.iter().all(|b| *b == 0) {
                        " (zeros)"
                    } else {
                        ""
                    }
                ),
            )),
        }
    }
    (verified, lost, unreadable)
}

#[derive(Default)]
pub struct Row {
    pub name: String,
    pub faults: u32,
    pub verified: u64,
    pub lost: u64,
    pub unreadable: u64,
    pub stalls: Vec<f64>,
    pub back_to_full: Vec<f64>,
    pub note: String,
    pub failure: Option<String>,
}

impl Row {
    /// The empty row of scenario `name`.
    pub fn new(name: &str) -> Row {
        Row {
            name: name.to_string(),
            ..Row::default()
        }
    }

    /// Faults, writes verified and lost, I/O stalls and times back to full
    /// replication: the middle of a suite's per-scenario progress line.
    pub fn summary(&self) -> String {
        let [stall50, stall_max, full50, full_max] = self.times();
        format!(
            "{} faults, verified {}, lost {}, stall p50 {stall50:.2}s max {stall_max:.2}s, \
             back to full replication p50 {full50:.2}s max {full_max:.2}s",
            self.faults, self.verified, self.lost,
        )
    }

    /// I/O stall p50 and max, time back to full replication p50 and max.
    pub fn times(&self) -> [f64; 4] {
        [
            pct(&self.stalls, 0.5),
            pct(&self.stalls, 1.0),
            pct(&self.back_to_full, 0.5),
            pct(&self.back_to_full, 1.0),
        ]
    }
}

/// `scenario: failure` of every row that failed.
pub fn failures(rows: &[Row]) -> Vec<String> {
    rows.iter()
        .filter_map(|r| r.failure.as_ref().map(|f| format!("{}: {f}", r.name)))
        .collect()
}

pub fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    // Nearest rank.
    let rank = (p * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

pub fn print_table(seed: u64, rows: &[Row]) {
    println!("\nchaos results (CHAOS_SEED={seed}):");
    println!(
        "{:<16} {:>6} {:>9} {:>6} {:>10} {:>10} {:>12} {:>12}  note",
        "scenario", "faults", "verified", "lost", "stall p50", "stall max", "full p50", "full max"
    );
    for r in rows {
        let [stall50, stall_max, full50, full_max] = r.times();
        println!(
            "{:<16} {:>6} {:>9} {:>6} {stall50:>9.2}s {stall_max:>9.2}s {full50:>11.2}s \
             {full_max:>11.2}s  {}{}",
            r.name,
            r.faults,
            r.verified,
            r.lost,
            r.note,
            r.failure
                .as_deref()
                .map(|f| format!(" FAILED: {f}"))
                .unwrap_or_default()
        );
    }
}

/// Pause the load (every write in flight finishes and is booked first),
/// read every LBA back through each of `vias` (name, portal; a redirecting
/// portal is followed) and add the counts to `row`: acknowledged writes
/// verified through the first portal, distinct LBAs lost through any.
/// Returns a failure description when writes were lost or reads failed.
pub async fn verify_all(
    load: &Load,
    vias: &[(String, SocketAddr)],
    target: &str,
    lun: u64,
    row: &mut Row,
) -> Option<String> {
    let _quiet = tokio::time::timeout(WRITE_TIMEOUT * 2, load.gate.write())
        .await
        .expect("writers drain within two write timeouts");
    let book = lock(&load.book).clone();
    let mut lost: BTreeSet<u64> = BTreeSet::new();
    let mut details = Vec::new();
    let mut unreadable = 0;
    for (k, (name, portal)) in vias.iter().enumerate() {
        let (verified, l, u) = verify_via(*portal, target, lun, &book).await;
        if k == 0 {
            row.verified += verified;
        }
        unreadable += u;
        for (lba, d) in l {
            if lost.insert(lba) && details.len() < 10 {
                details.push(format!("via {name}: {d}"));
            }
        }
    }
    row.lost += lost.len() as u64;
    row.unreadable += unreadable;
    if !lost.is_empty() {
        Some(format!(
            "{} acknowledged writes lost; first: {details:#?}",
            lost.len()
        ))
    } else if unreadable > 0 {
        Some(format!(
            "{unreadable} reads failed after the cluster was back"
        ))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_names_counts_and_times() {
        let mut r = Row::new("chunk-kill");
        r.faults = 2;
        r.verified = 10;
        r.stalls = vec![3.0, 1.0];
        r.back_to_full = vec![2.5];
        assert_eq!(
            r.summary(),
            "2 faults, verified 10, lost 0, stall p50 1.00s max 3.00s, \
             back to full replication p50 2.50s max 2.50s"
        );
        assert_eq!(r.times(), [1.0, 3.0, 2.5, 2.5]);
        r.failure = Some("lost".into());
        assert_eq!(failures(&[r, Row::new("partition")]), ["chunk-kill: lost"]);
    }
}
