//! Process chaos suite: a real cluster of processes on 127.0.0.x (a meta
//! group of three voters, three chunks, two redirectors sharing the VIP 127.0.0.100) with a
//! verifying write load running through the VIP the whole time, and faults
//! injected one scenario after the other:
//!
//! - `chunk-kill`: `kill -9` a random chunk, hold it down for a random time
//!   around the liveness timeout, start it again; repeated;
//! - `chunk-flap`: kill -9 and restart random chunks back to back (down for
//!   about the liveness timeout, up 0.3-2.5 s) without waiting for recovery
//!   in between, then wait for full replication once;
//! - `redirector-kill`: `kill -9` the redirector holding the VIP, then start
//!   it again as the standby;
//! - `chunk-freeze`: SIGSTOP a chunk for 10 s (a hung host), preferring one
//!   that no writer is logged in at, then SIGCONT. The replicas' hang
//!   detection (`chunk/src/health.rs`) drops it from the sets it is in
//!   before meta's liveness timeout would. The row's stalls are those of
//!   the writers logged in elsewhere: a writer whose own target froze finds
//!   it by its initiator's NOP-Out (the load models the CSI node's 1 s + 1 s
//!   timers) and logs in again through the VIP, which the note shows apart;
//! - `partition`: cut a random chunk off for longer than the liveness
//!   timeout and heal it. On processes the cut is SIGSTOP/SIGCONT: the chunk
//!   is silent to meta, its peers and its initiators and keeps its sockets,
//!   which is what a network cut looks like from the outside (the compose
//!   suite uses `docker network disconnect`);
//! - `meta-leader-kill`: `kill -9` the meta group's leader, wait for another
//!   to lead, start it again (it rejoins as a follower); the note gives the
//!   time to the new leader;
//! - `disk-full`: chunk 3's data directory lives on a small tmpfs mounted by
//!   the test (needs root); a filler file takes every free byte while the
//!   load runs, then is deleted.
//!
//! The load: four writers, each an initiator of its own (so the redirector
//! spreads them over the chunks), each logged in through the VIP following
//! the login redirect, each writing 4 KiB payloads that name writer, sequence
//! number and LBA to LBAs it alone owns. A write that fails or times out has
//! an unknown outcome: its LBA may hold it or the previous acknowledged
//! write, and the writer never writes that LBA again (a late landing of the
//! unknown write can then never be mistaken for a lost acknowledged one).
//! After a failure the writer drops its session and logs in through the VIP
//! again, as a real initiator does when its chunk dies.
//!
//! After each scenario: wait (bounded) until meta reports full replication
//! again (every chunk alive, no degraded or unavailable extent), pause the
//! load, read every LBA back through the VIP and through every chunk's
//! portal directly (which reads each chunk's local copy where it holds one),
//! and count acknowledged writes verified and lost. Printed per scenario:
//! writes verified, writes lost, I/O stall p50/max (per writer and fault:
//! the longest gap between two acknowledged writes), time from the fault to
//! full replication. Writes lost must be 0; the test fails otherwise (after
//! printing the table) and leaves the process logs in `build/test-logs/`.
//!
//! - `CHAOS_SEED=<u64>` replays a run (the seed is printed first);
//! - `CHAOS_SCENARIOS=chunk-kill,partition` picks scenarios (default: all,
//!   in the order above);
//! - `IRONBLOCK_LONG=1` repeats each fault more often.
//!
//! Build the binaries first: `cargo build -p ironblock-meta -p
//! ironblock-chunk -p ironblock-redirector`.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ironblock_proto::v1 as pb;
use ironblock_tests::chaos::{
    connect, failures, first_login, place_extents, print_table, scenarios_from_env, seed_from_env,
    start_group_cluster, status_report, verify_all, wait_full_replication, Load, Row, RF, VERIFIER,
};
use ironblock_tests::cluster::{loopback_vip, Admin, ChunkProcess, MetaGroup, RedirectorProcess};
use ironblock_tests::{long_mode, scratch_dir};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const LIVENESS: Duration = Duration::from_secs(2);
const LEASE_TTL: Duration = Duration::from_secs(2);
/// The chunk whose data directory is on a tmpfs (disk-full scenario).
const TMPFS_CHUNK: usize = 2;
const TMPFS_SIZE_MIB: u64 = 64;

/// How long `chunk-freeze` keeps a chunk stopped.
const FREEZE: Duration = Duration::from_secs(10);

const ALL_SCENARIOS: [&str; 7] = [
    "chunk-kill",
    "chunk-flap",
    "redirector-kill",
    "chunk-freeze",
    "partition",
    "meta-leader-kill",
    "disk-full",
];

/// A tmpfs mounted by the test, unmounted (lazily) on drop.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path, size_mib: u64) -> Tmpfs {
        // SAFETY: geteuid(2) has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "the disk-full chaos scenario mounts a {size_mib} MiB tmpfs for a chunk's data \
             directory and needs root (run as root, or leave disk-full out with \
             CHAOS_SCENARIOS=chunk-kill,redirector-kill,partition)"
        );
        std::fs::create_dir_all(path).expect("create tmpfs mount point");
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(path)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount -t tmpfs on {} failed (the disk-full scenario needs root with \
             CAP_SYS_ADMIN): {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs {
            path: path.to_path_buf(),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

/// Fill the filesystem holding `path` with one file until ENOSPC (bounded
/// by `max` bytes). Returns the bytes written.
fn fill(path: &Path, max: u64) -> u64 {
    use std::io::Write;
    let mut f = std::fs::File::create(path).expect("create filler");
    let buf = vec![0xa5u8; 1 << 20];
    let mut n = 0u64;
    while n < max {
        match f.write(&buf) {
            Ok(0) => break,
            Ok(k) => n += k as u64,
            Err(_) => break,
        }
    }
    let _ = f.sync_all();
    n
}

/// The tmpfs mount point of the disk-full chunk: named after the test's
/// scratch dir, so the chunk's log (`<parent>-<dir>.log`) is the run's own.
fn tmpfs_dir(dir: &Path) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dir.join(format!("{name}-fs"))
}

struct Cluster {
    dir: tempfile::TempDir,
    meta: MetaGroup,
    chunks: Vec<ChunkProcess>,
    redirectors: Vec<RedirectorProcess>,
    vip: SocketAddr,
    admin: Admin,
    vol: pb::Volume,
    _tmpfs: Option<Tmpfs>,
}

impl Cluster {
    fn lun(&self) -> u64 {
        u64::from(self.vol.lun)
    }

    fn filler_path(&self) -> PathBuf {
        tmpfs_dir(self.dir.path()).join("filler")
    }

    /// Seconds until meta reports full replication (every chunk alive, no
    /// degraded or unavailable extent, every extent with RF members), or
    /// None after `timeout`.
    async fn wait_full_replication(&mut self, since: Instant, timeout: Duration) -> Option<f64> {
        let n = self.chunks.len();
        wait_full_replication(&mut self.admin, &self.vol.id, n, RF, timeout)
            .await
            .map(|_| since.elapsed().as_secs_f64())
    }

    async fn status_line(&mut self) -> String {
        status_report(&mut self.admin, &self.vol.id).await
    }

    async fn vip_holder(&self) -> Option<usize> {
        for (k, r) in self.redirectors.iter().enumerate() {
            if r.holds_vip().await {
                return Some(k);
            }
        }
        None
    }
}

/// Pause the load, verify through the VIP and through every chunk portal.
async fn verify(c: &mut Cluster, load: &Load, row: &mut Row) {
    let mut vias: Vec<(String, SocketAddr)> = vec![("vip".into(), c.vip)];
    vias.extend(
        c.chunks
            .iter()
            .map(|ch| (format!("chunk {}", ch.chunk_id()), ch.portal())),
    );
    let target = c.vol.target_iqn.clone();
    if let Some(f) = verify_all(load, &vias, &target, c.lun(), row).await {
        let msg = format!("{f}\n{}", c.status_line().await);
        eprintln!("{msg}");
        row.failure.get_or_insert(msg);
    }
}

fn full_timeout() -> Duration {
    Duration::from_secs(if long_mode() { 180 } else { 60 })
}

async fn record_full(c: &mut Cluster, since: Instant, row: &mut Row) -> bool {
    match c.wait_full_replication(since, full_timeout()).await {
        Some(t) => {
            row.back_to_full.push(t);
            true
        }
        None => {
            let st = c.status_line().await;
            row.failure.get_or_insert(format!(
                "not back to full replication within {:?}\n{st}",
                full_timeout()
            ));
            false
        }
    }
}

async fn chunk_kill(c: &mut Cluster, load: &Load, rng: &mut StdRng, row: &mut Row) {
    let repeats = if long_mode() { 8 } else { 2 };
    let mut victims = Vec::new();
    for _ in 0..repeats {
        let v = rng.gen_range(0..c.chunks.len());
        // Around the liveness timeout: sometimes back before meta declares
        // it dead, sometimes after recovery started.
        let down = Duration::from_millis(rng.gen_range(500..4500));
        load.begin_window();
        let at = Instant::now();
        c.chunks[v].kill9();
        tokio::time::sleep(down).await;
        c.chunks[v].restart();
        row.faults += 1;
        victims.push(format!(
            "{}:{:.1}s",
            c.chunks[v].chunk_id(),
            down.as_secs_f64()
        ));
        let ok = record_full(c, at, row).await;
        row.stalls.extend(load.window_stalls());
        if !ok {
            break;
        }
    }
    row.note = format!("killed chunk:down {}", victims.join(" "));
}

/// Chunks flapping: kill -9 and restart random chunks back to back, each
/// down for about the liveness timeout and up only briefly, without waiting
/// for recovery in between (recoveries and resyncs are cut short), then
/// wait for full replication once.
async fn chunk_flap(c: &mut Cluster, load: &Load, rng: &mut StdRng, row: &mut Row) {
    let cycles = if long_mode() { 12 } else { 4 };
    let mut notes = Vec::new();
    load.begin_window();
    let at = Instant::now();
    for _ in 0..cycles {
        let v = rng.gen_range(0..c.chunks.len());
        let down = Duration::from_millis(rng.gen_range(1500..3500));
        let up = Duration::from_millis(rng.gen_range(300..2500));
        c.chunks[v].kill9();
        tokio::time::sleep(down).await;
        c.chunks[v].restart();
        tokio::time::sleep(up).await;
        row.faults += 1;
        notes.push(format!(
            "{}:{:.1}s/{:.1}s",
            c.chunks[v].chunk_id(),
            down.as_secs_f64(),
            up.as_secs_f64()
        ));
    }
    record_full(c, at, row).await;
    row.stalls.extend(load.window_stalls());
    row.note = format!("chunk:down/up {}", notes.join(" "));
}

async fn redirector_kill(c: &mut Cluster, load: &Load, row: &mut Row) {
    let repeats = if long_mode() { 4 } else { 1 };
    let mut takeovers = Vec::new();
    for _ in 0..repeats {
        let Some(h) = c.vip_holder().await else {
            row.failure = Some("no redirector holds the VIP".into());
            return;
        };
        load.begin_window();
        let at = Instant::now();
        c.redirectors[h].kill9();
        row.faults += 1;
        let other = 1 - h;
        // Bounded: the standby takes the VIP within 3 ttls and a new login
        // through the VIP works.
        let mut took = None;
        while at.elapsed() < LEASE_TTL * 5 {
            if c.redirectors[other].holds_vip().await
                && connect(c.vip, VERIFIER, &c.vol.target_iqn, c.lun())
                    .await
                    .is_some()
            {
                took = Some(at.elapsed().as_secs_f64());
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let Some(t) = took else {
            row.failure = Some(format!(
                "the standby did not take the VIP within {:?}; log:\n{}",
                LEASE_TTL * 5,
                c.redirectors[other].log_tail()
            ));
            return;
        };
        takeovers.push(format!("{t:.2}s"));
        c.redirectors[h].restart();
        let ok = record_full(c, at, row).await;
        row.stalls.extend(load.window_stalls());
        if !ok {
            return;
        }
    }
    row.note = format!("new logins via VIP after {}", takeovers.join(" "));
}

/// Sum of a chunk counter over the chunks `which`.
async fn chunk_counter(c: &Cluster, which: &[usize], name: &str) -> u64 {
    let mut sum = 0;
    for &i in which {
        sum += c.chunks[i].metric_sum(name).await;
    }
    sum
}

/// The chunk to hang (freeze or cut off): one no writer is logged in at
/// when there is one (a hung serving chunk costs its own writers their
/// NOP-Out timers, reported apart), and which writers are on it.
fn hung_victim(c: &Cluster, load: &Load, rng: &mut StdRng) -> (usize, Vec<bool>) {
    let n = c.chunks.len();
    let portals = load.portals();
    let serves = |i: usize| {
        portals
            .iter()
            .filter(|p| **p == Some(c.chunks[i].portal()))
            .count()
    };
    let idle: Vec<usize> = (0..n).filter(|&i| serves(i) == 0).collect();
    let v = if idle.is_empty() {
        rng.gen_range(0..n)
    } else {
        idle[rng.gen_range(0..idle.len())]
    };
    let victim_portal = Some(c.chunks[v].portal());
    (v, portals.iter().map(|p| *p == victim_portal).collect())
}

async fn chunk_freeze(c: &mut Cluster, load: &Load, rng: &mut StdRng, row: &mut Row) {
    let repeats = if long_mode() { 3 } else { 1 };
    let n = c.chunks.len();
    let mut victims = Vec::new();
    let mut on_frozen: Vec<f64> = Vec::new();
    for _ in 0..repeats {
        let (v, on_victim) = hung_victim(c, load, rng);
        let others: Vec<usize> = (0..n).filter(|&i| i != v).collect();
        let hung_before =
            chunk_counter(c, &others, "ironblock_chunk_volume_hung_calls_total").await;
        load.begin_window();
        let at = Instant::now();
        c.chunks[v].pause();
        tokio::time::sleep(FREEZE).await;
        c.chunks[v].resume();
        row.faults += 1;
        let hung = chunk_counter(c, &others, "ironblock_chunk_volume_hung_calls_total").await
            - hung_before;
        victims.push(format!(
            "{}({} writers on it, {hung} replica calls found it hung)",
            c.chunks[v].chunk_id(),
            on_victim.iter().filter(|b| **b).count()
        ));
        let ok = record_full(c, at, row).await;
        let (frozen, rest) = load.window_stalls_apart(&on_victim);
        on_frozen.extend(frozen);
        row.stalls.extend(rest);
        if !ok {
            break;
        }
    }
    let frozen_max = on_frozen.iter().copied().fold(0.0, f64::max);
    row.note = format!(
        "SIGSTOP {FREEZE:?}: {}; writers on the frozen chunk itself: {} (stall max {frozen_max:.1}s, their NOP-Out timers)",
        victims.join(" "),
        on_frozen.len()
    );
}

async fn meta_leader_kill(c: &mut Cluster, load: &Load, row: &mut Row) {
    let repeats = if long_mode() { 3 } else { 1 };
    let mut took = Vec::new();
    for _ in 0..repeats {
        let Some(old) = c.meta.leader().await else {
            row.failure = Some(format!("no meta leader:\n{}", c.meta.log_tails()));
            return;
        };
        load.begin_window();
        let at = Instant::now();
        c.meta.members[old].kill9();
        row.faults += 1;
        let new = c.meta.wait_leader(Some(old), Duration::from_secs(15)).await;
        // Back as a follower (same port, same data).
        c.meta.members[old].restart();
        let Some((new, t)) = new else {
            row.failure = Some(format!(
                "no new meta leader within 15 s of killing meta {}:\n{}",
                old + 1,
                c.meta.log_tails()
            ));
            return;
        };
        took.push(format!(
            "meta {}->{} {:.2}s",
            old + 1,
            new + 1,
            t.as_secs_f64()
        ));
        let ok = record_full(c, at, row).await;
        row.stalls.extend(load.window_stalls());
        if !ok {
            break;
        }
    }
    row.note = format!(
        "kill -9 of the meta leader (3 voters); new leader: {}",
        took.join(", ")
    );
}

async fn partition(c: &mut Cluster, load: &Load, rng: &mut StdRng, row: &mut Row) {
    let repeats = if long_mode() { 4 } else { 1 };
    let mut victims = Vec::new();
    let mut on_cut: Vec<f64> = Vec::new();
    for _ in 0..repeats {
        let (v, on_victim) = hung_victim(c, load, rng);
        let cut = LIVENESS * 2 + Duration::from_millis(rng.gen_range(0..2000));
        load.begin_window();
        let at = Instant::now();
        c.chunks[v].pause();
        tokio::time::sleep(cut).await;
        c.chunks[v].resume();
        row.faults += 1;
        victims.push(format!(
            "{}:{:.1}s",
            c.chunks[v].chunk_id(),
            cut.as_secs_f64()
        ));
        let ok = record_full(c, at, row).await;
        let (cut_off, rest) = load.window_stalls_apart(&on_victim);
        on_cut.extend(cut_off);
        row.stalls.extend(rest);
        if !ok {
            break;
        }
    }
    let cut_max = on_cut.iter().copied().fold(0.0, f64::max);
    row.note = format!(
        "SIGSTOP/SIGCONT as the network cut; chunk:cut {}; writers on the cut-off chunk itself: {} (stall max {cut_max:.1}s, their NOP-Out timers)",
        victims.join(" "),
        on_cut.len()
    );
}

async fn disk_full(c: &mut Cluster, load: &Load, row: &mut Row) {
    let full_id = c.chunks[TMPFS_CHUNK].chunk_id();
    let holds = |ext: &[pb::Extent]| {
        ext.iter()
            .filter(|e| e.replicas.contains(&full_id))
            .map(|e| e.index)
            .collect::<BTreeSet<u64>>()
    };
    // After the earlier scenarios the tmpfs chunk may have lost its
    // replicas; meta's rebalancing gives it some back (bounded wait).
    let waited = Instant::now();
    let mut before = holds(&c.admin.extents(&c.vol.id).await);
    while before.is_empty() && waited.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        before = holds(&c.admin.extents(&c.vol.id).await);
    }
    if before.is_empty() {
        row.failure = Some(format!(
            "chunk {full_id} (on the tmpfs) holds no extent 30 s after full replication \
             (rebalancing did not give it one back), nothing to fill: {}",
            c.status_line().await
        ));
        return;
    }
    let filler = c.filler_path();
    load.begin_window();
    let at = Instant::now();
    let (acked0, failed0, _) = load.totals();
    let n = fill(&filler, (TMPFS_SIZE_MIB + 1) << 20);
    // Fresh LBAs: overwrites of allocated tmpfs pages need no space, new
    // blocks do.
    load.region.fetch_add(1, Ordering::Relaxed);
    row.faults += 1;
    // The load runs against the full disk; watch the replica sets.
    let mut dropped: BTreeSet<u64> = BTreeSet::new();
    let hold = Duration::from_secs(if long_mode() { 15 } else { 5 });
    while at.elapsed() < hold {
        let now = holds(&c.admin.extents(&c.vol.id).await);
        dropped.extend(before.difference(&now));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (acked1, failed1, _) = load.totals();
    let _ = std::fs::remove_file(&filler);
    row.note = format!(
        "chunk {full_id} full ({} MiB filler): held extents {before:?}, dropped from {dropped:?}; \
         {} writes acked, {} failed while full",
        n >> 20,
        acked1 - acked0,
        failed1 - failed0
    );
    record_full(c, at, row).await;
    row.stalls.extend(load.window_stalls());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_with_a_verifying_load_through_the_vip() {
    let seed = seed_from_env();
    let scenarios = scenarios_from_env(&ALL_SCENARIOS);
    println!("scenarios: {scenarios:?}");
    let mut rng = StdRng::seed_from_u64(seed);

    let dir = scratch_dir("chaos-");
    let tmpfs = scenarios
        .iter()
        .any(|s| s == "disk-full")
        .then(|| Tmpfs::mount(&tmpfs_dir(dir.path()), TMPFS_SIZE_MIB));
    let chunk_dirs: Vec<PathBuf> = (0..3)
        .map(|i| {
            if i == TMPFS_CHUNK && tmpfs.is_some() {
                tmpfs_dir(dir.path()).join(format!("chunk-{}", i + 1))
            } else {
                dir.path().join(format!("chunk-{}", i + 1))
            }
        })
        .collect();
    let (meta, chunks, admin, vol) =
        start_group_cluster(dir.path(), LIVENESS, &chunk_dirs, "chaos").await;
    let vip = loopback_vip();
    let redirectors: Vec<RedirectorProcess> = ["chaos-ra", "chaos-rb"]
        .iter()
        .map(|n| RedirectorProcess::start_with(&meta, vip, n, dir.path(), LEASE_TTL, &[]))
        .collect();
    let mut c = Cluster {
        dir,
        meta,
        chunks,
        redirectors,
        vip,
        admin,
        vol,
        _tmpfs: tmpfs,
    };
    // The VIP is served and redirects a login before the load starts.
    let first = first_login(c.vip, &c.vol.target_iqn, c.lun(), Duration::from_secs(20)).await;
    let first = first.unwrap_or_else(|| {
        panic!(
            "no login through the VIP {} within 20 s; redirector logs:\n{}\n{}",
            c.vip,
            c.redirectors[0].log_tail(),
            c.redirectors[1].log_tail()
        )
    });
    place_extents(&first, c.lun()).await;
    drop(first);
    assert!(
        c.wait_full_replication(Instant::now(), Duration::from_secs(30))
            .await
            .is_some(),
        "cluster not fully replicated at the start: {}",
        c.status_line().await
    );
    println!("cluster up: {}", c.status_line().await);

    let budget = Duration::from_secs(if long_mode() { 3600 } else { 600 });
    let load = Load::start(c.vip, c.vol.target_iqn.clone(), c.lun(), seed, budget);
    // Let every writer log in and write.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = Instant::now();
    let mut rows: Vec<Row> = Vec::new();
    for name in &scenarios {
        let mut row = Row::new(name);
        let t = Instant::now();
        match name.as_str() {
            "chunk-kill" => chunk_kill(&mut c, &load, &mut rng, &mut row).await,
            "chunk-flap" => chunk_flap(&mut c, &load, &mut rng, &mut row).await,
            "redirector-kill" => redirector_kill(&mut c, &load, &mut row).await,
            "chunk-freeze" => chunk_freeze(&mut c, &load, &mut rng, &mut row).await,
            "partition" => partition(&mut c, &load, &mut rng, &mut row).await,
            "disk-full" => disk_full(&mut c, &load, &mut row).await,
            "meta-leader-kill" => meta_leader_kill(&mut c, &load, &mut row).await,
            _ => unreachable!("checked above"),
        }
        verify(&mut c, &load, &mut row).await;
        let (acked, failed, logins) = load.totals();
        println!(
            "[{:>6.1}s] {name}: {} ({:.1}s; load so far: {acked} acked, {failed} failed, \
             {logins} logins) {}",
            started.elapsed().as_secs_f64(),
            row.summary(),
            t.elapsed().as_secs_f64(),
            row.note
        );
        let failed_now = row.failure.is_some();
        rows.push(row);
        if failed_now {
            break;
        }
    }
    let (acked, failed, logins) = load.totals();
    load.finish().await;
    print_table(seed, &rows);
    println!(
        "load: {acked} writes acknowledged, {failed} failed or timed out, {logins} logins \
         through the VIP; {:.1}s of chaos; logs in build/test-logs/{}-*",
        started.elapsed().as_secs_f64(),
        c.dir
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    );
    let failures = failures(&rows);
    assert!(
        failures.is_empty(),
        "chaos failed (CHAOS_SEED={seed} replays it):\n{}\nmeta log tail:\n{}",
        failures.join("\n"),
        c.meta.log_tails()
    );
    assert!(acked > 500, "the load made progress ({acked} acked)");
    assert_eq!(rows.len(), scenarios.len());
}
