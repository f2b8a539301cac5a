//! Cluster faults with real processes on 127.0.0.1: `ironblock-meta` and
//! `ironblock-chunk` daemons (see `ironblock_tests::cluster`), driven by the
//! crate's Rust initiator.
//!
//! - `kill -9` of a replica chunk during a bounded, verified write load: no
//!   acknowledged write is lost (read back through two other chunks), the
//!   replica sets shrink, recovery restores the replication factor, and the
//!   restarted chunk serves current data only.
//! - meta `kill -9` + restart keeps every volume, snapshot and ACL, and the
//!   chunks serve I/O again afterwards.
//! - libiscsi's `iscsi-test-cu -t ALL` against an RF=2 cluster LUN, then both
//!   replicas of every extent are byte-identical.
//! - one replica frozen (SIGSTOP) past the liveness timeout under a verified
//!   write load: writes stall only until meta moves it out (bounded by the
//!   liveness timeout + 2 s, printed), none fails, all read back, full
//!   replication again after it thaws.
//! - the replication factor changed online with `ironblock volume
//!   set-replicas`: 1 -> 2 copies every extent of a volume with data to a
//!   second chunk by recovery, the original chunk is killed (-9) and every
//!   byte reads back through the other; lowered back to 1, raised and
//!   lowered again with both alive: one member per extent, epochs bumped,
//!   the data intact through both chunks, new writes on the kept member.
//! - copies meta drops are garbage-collected online: lowered 2 -> 1, the
//!   dropped chunk's extent files go within a bounded time with no restart
//!   or rejoin (counters, tombstones, used bytes at meta, trash drained),
//!   every byte reads back through both chunks, also during the collection;
//!   an RF=1 volume's locality moves leave nothing on the chunk it left.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ironblock_proto::v1 as pb;
use ironblock_tests::cluster::{start_chunks, Admin, ChunkOptions, ChunkProcess, MetaProcess};
use ironblock_tests::initiator::{LoginOptions, Session};
use ironblock_tests::{bin_path, cunit, iscsi_url, long_mode, require_tool, scratch_dir};
use rand::{Rng, RngCore, SeedableRng};

const INITIATOR: &str = "iqn.2026-11.dev.ironblock:faults";
const BS: u32 = 512;
/// One write: 8 logical blocks (4 KiB).
const IO_BLOCKS: u64 = 8;
const EXTENT: u64 = 64 << 20;

/// Wait until every chunk applied meta's current revision (ACL changes,
/// new volumes reach the chunks with their heartbeats).
async fn settle(admin: &mut Admin, chunks: &[&ChunkProcess]) {
    let rev = admin.revision().await;
    for c in chunks {
        assert!(
            c.wait_applied(rev, Duration::from_secs(30)).await,
            "chunk {} did not apply revision {rev} within 30 s; log:\n{}",
            c.chunk_id(),
            c.log_tail()
        );
    }
}

/// Log in and consume the power-on unit attention (TEST UNIT READY until it
/// reports GOOD), as an initiator does before I/O.
async fn login(portal: SocketAddr, iqn: &str, lun: u64) -> Session {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match Session::login(portal, &LoginOptions::normal(INITIATOR, iqn)).await {
            Ok(s) => {
                for _ in 0..10 {
                    if s.test_unit_ready(lun).await.is_ok_and(|r| r.status == 0) {
                        break;
                    }
                }
                return s;
            }
            Err(e) if Instant::now() < deadline => {
                eprintln!("login to {portal} failed ({e}); retrying");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(e) => panic!("login to {portal} {iqn}: {e}"),
        }
    }
}

/// A block-sized payload that names its writer, sequence number and LBA.
fn payload(rng: &mut impl RngCore, writer: u64, seq: u64, lba: u64) -> Bytes {
    let mut v = vec![0u8; (IO_BLOCKS * u64::from(BS)) as usize];
    rng.fill_bytes(&mut v);
    v[0..8].copy_from_slice(&writer.to_le_bytes());
    v[8..16].copy_from_slice(&seq.to_le_bytes());
    v[16..24].copy_from_slice(&lba.to_le_bytes());
    Bytes::from(v)
}

/// What an LBA may hold: the last acknowledged write, plus any write after it
/// whose outcome is unknown (failed or timed out: it may or may not have
/// landed).
#[derive(Clone, Default)]
struct Expect {
    acked: Option<Bytes>,
    maybe: Vec<Bytes>,
}

impl Expect {
    fn allows(&self, got: &[u8]) -> bool {
        let zeros = self.acked.is_none() && got.iter().all(|b| *b == 0);
        zeros || self.acked.as_deref() == Some(got) || self.maybe.iter().any(|m| m.as_ref() == got)
    }
}

/// Write `per_extent` seeded blocks, evenly spaced, into each of the first
/// `extents` extents; every write must be acknowledged. Returns the book.
async fn write_spread(
    s: &Session,
    lun: u64,
    extents: u64,
    per_extent: u64,
    seed: u64,
) -> HashMap<u64, Expect> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut book = HashMap::new();
    for i in 0..extents {
        for j in 0..per_extent {
            let lba = (i * EXTENT + j * (EXTENT / per_extent)) / u64::from(BS);
            let data = payload(&mut rng, i, j, lba);
            let r = s.write16(lun, lba, data.clone(), BS).await.expect("write");
            assert_eq!(r.status, 0, "write: {:?}", r.sense_key());
            book.insert(
                lba,
                Expect {
                    acked: Some(data),
                    maybe: vec![],
                },
            );
        }
    }
    book
}

async fn verify(session: &Session, lun: u64, book: &HashMap<u64, Expect>, via: &str) -> usize {
    let mut checked = 0;
    for (lba, e) in book {
        let r = session
            .read16(lun, *lba, IO_BLOCKS as u32, BS)
            .await
            .unwrap_or_else(|err| panic!("read lba {lba} via {via}: {err}"));
        assert_eq!(r.status, 0, "read lba {lba} via {via}: {:?}", r.sense_key());
        assert!(
            e.allows(&r.data),
            "lba {lba} via {via}: data is neither the acknowledged write nor an unacknowledged one \
             (acked {:?}, got writer/seq {:?})",
            e.acked.as_ref().map(|a| (a[0], a[8])),
            (r.data.first(), r.data.get(8))
        );
        if e.acked.is_some() {
            checked += 1;
        }
    }
    checked
}

/// Replicas each chunk holds of `extents`, each of which must have `rf`
/// (before a fault).
fn replicas_per_chunk(extents: &[pb::Extent], rf: usize) -> HashMap<u64, usize> {
    let mut held: HashMap<u64, usize> = HashMap::new();
    for e in extents {
        assert_eq!(e.replicas.len(), rf, "RF={rf} before the fault: {e:?}");
        for r in &e.replicas {
            *held.entry(*r).or_default() += 1;
        }
    }
    held
}

/// The load's seed: `FAULTS_SEED` or a random one, printed to rerun a
/// failure.
fn faults_seed() -> u64 {
    let seed: u64 = std::env::var("FAULTS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    println!("FAULTS_SEED={seed}");
    seed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill9_of_a_replica_during_a_verified_write_load_loses_no_acknowledged_write() {
    let seed = faults_seed();
    let dir = scratch_dir("cluster-kill9-");
    let meta = MetaProcess::start(dir.path(), Duration::from_secs(2));
    let mut chunks = start_chunks(&meta, dir.path(), 3);
    let mut admin = meta.admin().await;
    let size = 4 * EXTENT;
    let vol = admin.create_volume("kill9", size, 2).await;
    admin.acl_add(&vol.id, INITIATOR).await;
    settle(&mut admin, &chunks.iter().collect::<Vec<_>>()).await;
    let lun = u64::from(vol.lun);
    let serving = Arc::new(login(chunks[0].portal(), &vol.target_iqn, u64::from(vol.lun)).await);

    // Touch every extent once so all are placed, then pick the victim: the
    // chunk other than the serving one that holds the most replicas.
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let book: Arc<Mutex<HashMap<u64, Expect>>> = Arc::default();
    for i in 0..size / EXTENT {
        let lba = i * EXTENT / u64::from(BS);
        let data = payload(&mut rng, 99, i, lba);
        let r = serving
            .write16(lun, lba, data.clone(), BS)
            .await
            .expect("write");
        assert_eq!(r.status, 0, "initial write: {:?}", r.sense_key());
        book.lock().unwrap().insert(
            lba,
            Expect {
                acked: Some(data),
                maybe: vec![],
            },
        );
    }
    let extents = admin.extents(&vol.id).await;
    assert_eq!(extents.len() as u64, size / EXTENT, "every extent placed");
    let held = replicas_per_chunk(&extents, 2);
    let serving_id = chunks[0].chunk_id();
    let victim = (1..chunks.len())
        .max_by_key(|i| held.get(&chunks[*i].chunk_id()).copied().unwrap_or(0))
        .unwrap();
    let victim_id = chunks[victim].chunk_id();
    let witness = (1..chunks.len()).find(|i| *i != victim).unwrap();
    println!(
        "serving chunk {serving_id}, victim chunk {victim_id} (holds {} of {} extents)",
        held.get(&victim_id).copied().unwrap_or(0),
        extents.len()
    );

    // The load: 4 writers, each on its own LBAs (so the expected content of
    // an LBA is well defined), bounded in time and count.
    let load_for = Duration::from_secs(if long_mode() { 60 } else { 12 });
    let max_writes_per_writer = if long_mode() { 200_000 } else { 20_000 };
    let blocks = size / u64::from(BS);
    let mut writers = Vec::new();
    let start = Instant::now();
    for w in 0..4u64 {
        let s = serving.clone();
        let book = book.clone();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (w + 1));
        writers.push(tokio::spawn(async move {
            let (mut acked, mut failed) = (0u64, 0u64);
            for seq in 0..max_writes_per_writer {
                if start.elapsed() > load_for {
                    break;
                }
                // LBA slot owned by this writer.
                let slot = rng.gen_range(0..blocks / IO_BLOCKS / 4) * 4 + w;
                let lba = slot * IO_BLOCKS;
                let data = payload(&mut rng, w, seq, lba);
                let res = tokio::time::timeout(
                    Duration::from_secs(20),
                    s.write16(lun, lba, data.clone(), BS),
                )
                .await;
                let mut book = book.lock().unwrap();
                let e = book.entry(lba).or_default();
                match res {
                    Ok(Ok(r)) if r.status == 0 => {
                        e.acked = Some(data);
                        e.maybe.clear();
                        acked += 1;
                    }
                    _ => {
                        e.maybe.push(data);
                        failed += 1;
                    }
                }
            }
            (acked, failed)
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let killed_at = Instant::now();
    chunks[victim].kill9();
    println!(
        "kill -9 chunk {victim_id} at {:?} into the load",
        start.elapsed()
    );
    let (mut acked, mut failed) = (0, 0);
    for w in writers {
        let (a, f) = w.await.expect("writer");
        acked += a;
        failed += f;
    }
    println!("load done: {acked} writes acknowledged, {failed} failed or timed out");
    assert!(acked > 100, "the load made progress ({acked} acked)");
    assert!(
        failed * 20 <= acked,
        "a replica's death may fail only the writes in flight ({failed} failed vs {acked} acked)"
    );

    // Meta declared the victim dead and every replica set shrank to the
    // survivors (the victim is no member of any extent any more).
    assert!(
        admin
            .wait_chunk_state(victim_id, pb::ChunkState::Dead, Duration::from_secs(20))
            .await,
        "victim not declared dead"
    );
    for e in admin.extents(&vol.id).await {
        assert!(
            !e.replicas.contains(&victim_id),
            "victim still a member after being declared dead: {e:?}"
        );
    }

    // Every acknowledged write reads back, through the serving chunk and
    // through the witness chunk.
    let book = book.lock().unwrap().clone();
    let n = verify(&serving, lun, &book, "serving chunk").await;
    let other = login(
        chunks[witness].portal(),
        &vol.target_iqn,
        u64::from(vol.lun),
    )
    .await;
    verify(&other, lun, &book, "witness chunk").await;
    println!("verified {n} acknowledged LBAs through two chunks");

    // Recovery restores RF=2 on the two survivors... with three chunks and
    // one dead, the survivors are exactly two: every extent back to 2 members.
    let deadline = Instant::now() + Duration::from_secs(if long_mode() { 300 } else { 90 });
    loop {
        let ext = admin.extents(&vol.id).await;
        let st = admin.status().await;
        if ext.iter().all(|e| e.replicas.len() == 2) && st.degraded_extents == 0 {
            println!(
                "replication factor restored {:.1}s after the kill ({} recoveries completed)",
                killed_at.elapsed().as_secs_f64(),
                st.recovery_completed
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replication factor not restored: {ext:?} status {st:?}\nwitness log:\n{}",
            chunks[witness].log_tail()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The recovered copies are right: read through the witness again (it now
    // holds recovered extents it may read locally).
    verify(&other, lun, &book, "witness chunk after recovery").await;

    // The victim comes back: it must not serve its stale copies. It holds no
    // extent meta gave it (its old ones were garbage-collected), and reads
    // through it return current data.
    chunks[victim].restart();
    assert!(
        admin
            .wait_chunk_state(victim_id, pb::ChunkState::Alive, Duration::from_secs(20))
            .await,
        "victim did not come back"
    );
    settle(&mut admin, &[&chunks[victim]]).await;
    let mine: Vec<_> = admin
        .extents(&vol.id)
        .await
        .into_iter()
        .filter(|e| e.replicas.contains(&victim_id) || e.learners.contains(&victim_id))
        .map(|e| e.store_key.clone() + &format!("/{}", e.index))
        .collect();
    let files = chunks[victim].extent_files();
    println!("restarted victim holds {files:?}; meta places on it {mine:?}");
    if mine.is_empty() {
        assert!(
            files.is_empty(),
            "the restarted chunk kept stale extents: {files:?}"
        );
    }
    let back = login(chunks[victim].portal(), &vol.target_iqn, u64::from(vol.lun)).await;
    verify(&back, lun, &book, "restarted victim").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meta_restart_keeps_volumes_snapshots_and_acls() {
    let dir = scratch_dir("cluster-meta-restart-");
    let mut meta = MetaProcess::start(dir.path(), Duration::from_secs(3));
    let chunks = start_chunks(&meta, dir.path(), 2);
    let mut admin = meta.admin().await;
    let a = admin.create_volume("keep-a", 2 * EXTENT, 2).await;
    let b = admin.create_volume("keep-b", EXTENT, 1).await;
    admin.acl_add(&a.id, INITIATOR).await;
    admin
        .acl_add(&b.id, "iqn.2026-11.dev.ironblock:other")
        .await;
    settle(&mut admin, &chunks.iter().collect::<Vec<_>>()).await;

    // Data written before the restart.
    let s = login(chunks[0].portal(), &a.target_iqn, u64::from(a.lun)).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let data = payload(&mut rng, 1, 1, 2048);
    assert_eq!(
        s.write16(u64::from(a.lun), 2048, data.clone(), BS)
            .await
            .expect("write")
            .status,
        0
    );
    let snap = admin
        .client()
        .create_snapshot(pb::CreateSnapshotRequest {
            volume_id: a.id.clone(),
            name: "keep-a-snap".into(),
        })
        .await
        .expect("snapshot")
        .into_inner()
        .snapshot
        .expect("snapshot");

    let volumes = |v: pb::ListVolumesResponse| {
        let mut v = v.volumes;
        v.sort_by(|x, y| x.id.cmp(&y.id));
        v
    };
    let before_v = volumes(
        admin
            .client()
            .list_volumes(pb::ListVolumesRequest {})
            .await
            .expect("list")
            .into_inner(),
    );
    let before_s = admin
        .client()
        .list_snapshots(pb::ListSnapshotsRequest::default())
        .await
        .expect("snapshots")
        .into_inner()
        .snapshots;
    let before_e = admin.extents(&a.id).await;

    meta.kill9();
    meta.restart();
    let mut admin = meta.admin().await;
    let after_v = volumes(
        admin
            .client()
            .list_volumes(pb::ListVolumesRequest {})
            .await
            .expect("list")
            .into_inner(),
    );
    assert_eq!(
        before_v, after_v,
        "volumes (with ACLs) survive a meta restart"
    );
    assert!(after_v
        .iter()
        .any(|v| v.id == a.id && v.acl == vec![INITIATOR.to_string()]));
    let after_s = admin
        .client()
        .list_snapshots(pb::ListSnapshotsRequest::default())
        .await
        .expect("snapshots")
        .into_inner()
        .snapshots;
    assert_eq!(before_s, after_s, "snapshots survive a meta restart");
    assert!(after_s.iter().any(|s| s.id == snap.id));
    let after_e = admin.extents(&a.id).await;
    assert_eq!(
        before_e
            .iter()
            .map(|e| (&e.store_key, e.index))
            .collect::<Vec<_>>(),
        after_e
            .iter()
            .map(|e| (&e.store_key, e.index))
            .collect::<Vec<_>>(),
        "extent placement survives a meta restart"
    );

    // The chunks re-attach and serve the data written before.
    for c in &chunks {
        assert!(
            admin
                .wait_chunk_state(c.chunk_id(), pb::ChunkState::Alive, Duration::from_secs(20))
                .await,
            "chunk {} not alive after the meta restart",
            c.chunk_id()
        );
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = login(chunks[1].portal(), &a.target_iqn, u64::from(a.lun)).await;
        match s.read16(u64::from(a.lun), 2048, IO_BLOCKS as u32, BS).await {
            Ok(r) if r.status == 0 => {
                assert_eq!(r.data, data, "data written before the restart");
                break;
            }
            other => {
                assert!(
                    Instant::now() < deadline,
                    "no I/O 30 s after the meta restart: {:?}",
                    other.map(|r| r.sense_key())
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iscsi_test_cu_passes_on_an_rf2_cluster_lun() {
    require_tool("iscsi-test-cu", "libiscsi-bin");
    let dir = scratch_dir("cluster-cu-");
    let meta = MetaProcess::start(dir.path(), Duration::from_secs(3));
    let chunks = start_chunks(&meta, dir.path(), 2);
    let mut admin = meta.admin().await;
    let size = if long_mode() { 1 << 30 } else { EXTENT };
    let vol = admin.create_volume("conformance", size, 2).await;
    admin.acl_add(&vol.id, cunit::INITIATOR_1).await;
    admin.acl_add(&vol.id, cunit::INITIATOR_2).await;
    settle(&mut admin, &chunks.iter().collect::<Vec<_>>()).await;

    let url = iscsi_url(chunks[0].portal(), &vol.target_iqn, vol.lun, None, &[]);
    cunit::run_suite_and_assert(url, "cluster-rf2", || {
        format!("chunk log:\n{}", chunks[0].log_tail())
    })
    .await;

    // Both replicas of every extent hold identical bytes on disk.
    let extents = admin.extents(&vol.id).await;
    assert!(!extents.is_empty(), "the suite wrote data");
    for e in &extents {
        assert_eq!(e.replicas.len(), 2, "still RF=2: {e:?}");
        let read = |c: &ChunkProcess| {
            std::fs::read(c.extent_data_path(&e.store_key, e.index)).unwrap_or_default()
        };
        let (a, b) = (read(&chunks[0]), read(&chunks[1]));
        // Sparse files: compare the common length and require the tail of
        // the longer to be zeros.
        let n = a.len().min(b.len());
        assert!(a[..n] == b[..n], "replicas of extent {} differ", e.index);
        assert!(a[n..].iter().chain(b[n..].iter()).all(|x| *x == 0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_chunk_takes_replicas_and_the_data_stays_right() {
    let dir = scratch_dir("cluster-rebalance-");
    let meta = MetaProcess::start(dir.path(), Duration::from_secs(3));
    let mut chunks = start_chunks(&meta, dir.path(), 2);
    let mut admin = meta.admin().await;
    // RF=1, thick: 8 extents placed up front, 4 on each chunk.
    let vol = admin.create_thick_volume("grow", 8 * EXTENT, 1).await;
    admin.acl_add(&vol.id, INITIATOR).await;
    settle(&mut admin, &chunks.iter().collect::<Vec<_>>()).await;
    let lun = u64::from(vol.lun);
    let s = login(chunks[0].portal(), &vol.target_iqn, lun).await;
    let book = write_spread(&s, lun, 8, 4, 11).await;

    // A third chunk joins: meta moves replicas to it until the chunks are
    // within the rebalance slack, and every byte is still right.
    let third =
        ChunkProcess::init_and_start(&meta, &dir.path().join("chunk-3"), ChunkOptions::default());
    let id3 = third.chunk_id();
    chunks.push(third);
    let start = Instant::now();
    loop {
        let ext = admin.extents(&vol.id).await;
        let on3 = ext.iter().filter(|e| e.replicas.contains(&id3)).count();
        let moving = ext.iter().any(|e| !e.learners.is_empty());
        if on3 >= 2 && !moving {
            println!(
                "chunk {id3} holds {on3} of 8 extents {:.1}s after joining",
                start.elapsed().as_secs_f64()
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "no rebalancing onto the new chunk: {ext:?}\nlog:\n{}",
            chunks[2].log_tail()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for e in admin.extents(&vol.id).await {
        assert_eq!(e.replicas.len(), 1, "RF=1 kept: {e:?}");
    }
    let n = verify(&s, lun, &book, "chunk 1 after rebalancing").await;
    assert_eq!(n, 32);
    settle(&mut admin, &chunks.iter().collect::<Vec<_>>()).await;
    let s3 = login(chunks[2].portal(), &vol.target_iqn, lun).await;
    verify(&s3, lun, &book, "the new chunk").await;
}

/// Data locality: an RF=1 volume whose I/O all comes through chunk 1's
/// portal moves its extents from chunk 2 to chunk 1 (meta learns the home
/// from the chunks' heartbeats), under I/O, losing nothing; the balancer
/// does not move them back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rf1_volume_moves_to_the_chunk_its_initiator_uses() {
    let dir = scratch_dir("cluster-locality-");
    // A 1 MiB window, so a few rounds of the test's I/O decide the home.
    let meta = MetaProcess::start_with_env(
        dir.path(),
        Duration::from_secs(3),
        &[("IRONBLOCK_META_LOCALITY_WINDOW_MIB", "1")],
    );
    let chunks = start_chunks(&meta, dir.path(), 2);
    let (id1, id2) = (chunks[0].chunk_id(), chunks[1].chunk_id());
    let mut admin = meta.admin().await;
    let vol = admin.create_thick_volume("local", 8 * EXTENT, 1).await;
    admin.acl_add(&vol.id, INITIATOR).await;
    settle(&mut admin, &chunks.iter().collect::<Vec<_>>()).await;
    let remote = |ext: &[pb::Extent]| ext.iter().filter(|e| !e.replicas.contains(&id1)).count();
    assert_eq!(
        remote(&admin.extents(&vol.id).await),
        4,
        "placement spreads 4/4"
    );
    let lun = u64::from(vol.lun);
    let s = login(chunks[0].portal(), &vol.target_iqn, lun).await;
    let book = write_spread(&s, lun, 8, 4, 21).await;

    // Keep reading through chunk 1 (every round checks every byte) until
    // every extent is on chunk 1 and no move is in flight.
    let start = Instant::now();
    let mut rounds = 0;
    loop {
        verify(&s, lun, &book, "chunk 1 while extents move").await;
        rounds += 1;
        let ext = admin.extents(&vol.id).await;
        if remote(&ext) == 0 && ext.iter().all(|e| e.learners.is_empty()) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "extents still off chunk {id1} after {rounds} rounds: {ext:?}\nmeta log:\n{}",
            meta.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "all 8 extents on chunk {id1} {:.1}s and {rounds} read rounds after the writes",
        start.elapsed().as_secs_f64()
    );
    let v = admin
        .client()
        .get_volume(pb::VolumeRef {
            r#ref: Some(pb::volume_ref::Ref::Id(vol.id.clone())),
        })
        .await
        .expect("get volume")
        .into_inner();
    assert_eq!(v.volume.map(|v| v.home_chunk), Some(id1));
    for e in admin.extents(&vol.id).await {
        assert_eq!(e.replicas, vec![id1], "RF=1 kept, on the home: {e:?}");
    }
    // Chunk 2 serves it too (forwarding to chunk 1 now), and every byte
    // is right through both.
    let s2 = login(chunks[1].portal(), &vol.target_iqn, lun).await;
    assert_eq!(verify(&s2, lun, &book, "chunk 2 after the moves").await, 32);
    assert_eq!(verify(&s, lun, &book, "chunk 1 after the moves").await, 32);
    // Quiet for a while: the balancer leaves the pinned extents alone
    // (8 vs 0 is past its slack).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ext = admin.extents(&vol.id).await;
    assert!(
        ext.iter()
            .all(|e| e.replicas == vec![id1] && e.learners.is_empty()),
        "moved off the home (chunk {id2}?): {ext:?}"
    );
    // The moved-off copies leave chunk 2's data directory without a
    // restart (its GC after the revision changes; default interval).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !extent_files_of(&chunks[1], &vol.id).is_empty() {
        assert!(
            Instant::now() < deadline,
            "chunk {id2} still holds {:?} of the moved volume\nlog:\n{}",
            extent_files_of(&chunks[1], &vol.id),
            chunks[1].log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(extent_files_of(&chunks[0], &vol.id).len(), 8);
    assert!(chunk_metric(&chunks[1], "ironblock_chunk_gc_deleted_extents_total").await >= 4.0);
    assert_eq!(
        verify(&s2, lun, &book, "chunk 2 after its copies went").await,
        32
    );
}

/// Every chunk freezes past the liveness timeout (a stalled host: SIGSTOP),
/// so meta declares every member of every extent dead in one pass. When
/// they thaw they rejoin and garbage-collect: nothing acknowledged may be
/// lost. (A chaos run once lost 827 writes this way: the replica sets were
/// emptied, and the returning chunks deleted the only copies as stale.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_chunk_frozen_past_the_liveness_timeout_loses_nothing() {
    let dir = scratch_dir("cluster-freeze-all-");
    let liveness = Duration::from_secs(2);
    let meta = MetaProcess::start(dir.path(), liveness);
    let chunks = start_chunks(&meta, dir.path(), 3);
    let mut admin = meta.admin().await;
    let vol = admin.create_thick_volume("frozen", 3 * EXTENT, 2).await;
    admin.acl_add(&vol.id, INITIATOR).await;
    settle(&mut admin, &chunks.iter().collect::<Vec<_>>()).await;
    let lun = u64::from(vol.lun);
    let book = {
        let s = login(chunks[0].portal(), &vol.target_iqn, lun).await;
        write_spread(&s, lun, 3, 8, 5).await
    };

    for c in &chunks {
        c.pause();
    }
    tokio::time::sleep(liveness * 2 + Duration::from_secs(1)).await;
    let st = admin.status().await;
    for c in &chunks {
        c.resume();
    }
    assert_eq!(st.chunks_dead, 3, "every chunk declared dead: {st:?}");
    assert_eq!(
        st.unavailable_extents, 3,
        "unavailable, not emptied: {st:?}"
    );
    // Members are kept while dead (both, or the one left if the two were
    // declared dead in different liveness passes): never an empty set.
    for e in admin.extents(&vol.id).await {
        assert!(!e.replicas.is_empty(), "members kept while dead: {e:?}");
    }

    // They rejoin (and garbage-collect); the cluster is healthy again.
    let start = Instant::now();
    loop {
        let st = admin.status().await;
        if st.chunks_alive == 3 && st.degraded_extents == 0 && st.recovery_queued == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "not healthy 60 s after thawing: {st:?}\nchunk 1 log:\n{}",
            chunks[0].log_tail()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    settle(&mut admin, &chunks.iter().collect::<Vec<_>>()).await;
    for (i, c) in chunks.iter().enumerate() {
        let s = login(c.portal(), &vol.target_iqn, lun).await;
        let n = verify(&s, lun, &book, &format!("chunk {} after thawing", i + 1)).await;
        assert_eq!(n, 24);
    }
}

/// A replica frozen with SIGSTOP (its sockets stay open, nothing answers)
/// must not stall writes to the extents it is a member of for the replica
/// call timeout: the serving chunk's hang detection (`chunk/src/health.rs`:
/// a probe on its own connection gets no answer) or meta declaring it dead
/// (liveness timeout), whichever comes first, moves it out of the replica
/// sets, and the serving chunk completes the writes on the new sets. Every acknowledged write reads
/// back after it thaws, and the sets return to full replication.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_replica_stalls_writes_only_until_it_is_moved_out() {
    let seed = faults_seed();
    let dir = scratch_dir("cluster-freeze-one-");
    let liveness = Duration::from_secs(2);
    let meta = MetaProcess::start(dir.path(), liveness);
    let chunks = start_chunks(&meta, dir.path(), 3);
    let mut admin = meta.admin().await;
    let size = 4 * EXTENT;
    let vol = admin.create_thick_volume("freeze-one", size, 2).await;
    admin.acl_add(&vol.id, INITIATOR).await;
    settle(&mut admin, &chunks.iter().collect::<Vec<_>>()).await;
    let lun = u64::from(vol.lun);
    let serving = Arc::new(login(chunks[0].portal(), &vol.target_iqn, lun).await);

    // The victim: the chunk other than the serving one that holds the most
    // replicas; the extents it is a member of are the ones that would stall.
    let extents = admin.extents(&vol.id).await;
    assert_eq!(extents.len() as u64, size / EXTENT, "every extent placed");
    let held = replicas_per_chunk(&extents, 2);
    let victim = (1..chunks.len())
        .max_by_key(|i| held.get(&chunks[*i].chunk_id()).copied().unwrap_or(0))
        .expect("two other chunks");
    let victim_id = chunks[victim].chunk_id();
    let victim_extents: Vec<u64> = extents
        .iter()
        .filter(|e| e.replicas.contains(&victim_id))
        .map(|e| e.index)
        .collect();
    assert!(!victim_extents.is_empty(), "the victim holds replicas");
    println!(
        "serving chunk {}, victim chunk {victim_id} (member of extents {victim_extents:?})",
        chunks[0].chunk_id()
    );

    // The load: 4 writers on their own LBAs, bounded in time and count;
    // every write's latency is measured.
    let book: Arc<Mutex<HashMap<u64, Expect>>> = Arc::default();
    let load_for = Duration::from_secs(16);
    let max_writes_per_writer = 50_000u64;
    let blocks = size / u64::from(BS);
    let start = Instant::now();
    let frozen_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let frozen_for = liveness * 3;
    // Acknowledged writes per second of the load (printed: the freeze shows).
    let per_second: Arc<Mutex<Vec<u64>>> = Arc::new(Mutex::new(vec![0; 40]));
    let mut writers = Vec::new();
    for w in 0..4u64 {
        let s = serving.clone();
        let book = book.clone();
        let frozen_at = frozen_at.clone();
        let per_second = per_second.clone();
        let victim_extents = victim_extents.clone();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (w + 1));
        writers.push(tokio::spawn(async move {
            let (mut acked, mut failed, mut acked_on_victim_while_frozen) = (0u64, 0u64, 0u64);
            // The longest write of the whole load, and of those sent from
            // 1 s before the freeze to 1 s before the thaw (what the frozen
            // chunk may delay; the thawed chunk's rejoin and the copies to
            // it come after).
            let (mut longest, mut longest_frozen) = (Duration::ZERO, Duration::ZERO);
            for seq in 0..max_writes_per_writer {
                if start.elapsed() > load_for {
                    break;
                }
                let slot = rng.gen_range(0..blocks / IO_BLOCKS / 4) * 4 + w;
                let lba = slot * IO_BLOCKS;
                let data = payload(&mut rng, w, seq, lba);
                let sent = Instant::now();
                let res = tokio::time::timeout(
                    Duration::from_secs(20),
                    s.write16(lun, lba, data.clone(), BS),
                )
                .await;
                let took = sent.elapsed();
                longest = longest.max(took);
                let window = frozen_at.lock().unwrap().is_some_and(|t| {
                    sent + Duration::from_secs(1) > t
                        && sent + Duration::from_secs(1) < t + frozen_for
                });
                if window {
                    longest_frozen = longest_frozen.max(took);
                }
                let mut book = book.lock().unwrap();
                let e = book.entry(lba).or_default();
                match res {
                    Ok(Ok(r)) if r.status == 0 => {
                        e.acked = Some(data);
                        e.maybe.clear();
                        acked += 1;
                        let second = start.elapsed().as_secs() as usize;
                        if let Some(n) = per_second.lock().unwrap().get_mut(second) {
                            *n += 1;
                        }
                        let during = frozen_at
                            .lock()
                            .unwrap()
                            .is_some_and(|t| sent > t && sent < t + frozen_for);
                        if during && victim_extents.contains(&(lba * u64::from(BS) / EXTENT)) {
                            acked_on_victim_while_frozen += 1;
                        }
                    }
                    _ => {
                        e.maybe.push(data);
                        failed += 1;
                    }
                }
            }
            (
                acked,
                failed,
                acked_on_victim_while_frozen,
                longest,
                longest_frozen,
            )
        }));
    }

    // Freeze the victim well past the liveness timeout, then thaw it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    chunks[victim].pause();
    *frozen_at.lock().unwrap() = Some(Instant::now());
    println!(
        "SIGSTOP chunk {victim_id} at {:?} into the load",
        start.elapsed()
    );
    let declared_dead = admin
        .wait_chunk_state(victim_id, pb::ChunkState::Dead, frozen_for)
        .await;
    let members_after = admin.extents(&vol.id).await;
    let remaining = frozen_at
        .lock()
        .unwrap()
        .map(|t| frozen_for.saturating_sub(t.elapsed()))
        .unwrap_or_default();
    tokio::time::sleep(remaining).await;
    chunks[victim].resume();
    let thawed_at = Instant::now();
    println!(
        "SIGCONT chunk {victim_id} at {:?} into the load",
        start.elapsed()
    );
    assert!(declared_dead, "the frozen chunk was not declared dead");
    for e in &members_after {
        assert!(
            !e.replicas.contains(&victim_id),
            "the dead chunk is still a member: {e:?}"
        );
    }

    let (mut acked, mut failed, mut on_victim) = (0, 0, 0);
    let (mut longest, mut stall) = (Duration::ZERO, Duration::ZERO);
    for w in writers {
        let (a, f, v, l, lf) = w.await.expect("writer");
        acked += a;
        failed += f;
        on_victim += v;
        longest = longest.max(l);
        stall = stall.max(lf);
    }
    let abandoned = chunks[0]
        .metric_sum("ironblock_chunk_volume_abandoned_calls_total")
        .await;
    let hung = chunks[0]
        .metric_sum("ironblock_chunk_volume_hung_calls_total")
        .await;
    println!(
        "load done: {acked} writes acknowledged ({on_victim} to the victim's extents while it was \
         frozen), {failed} failed; longest write stall from the freeze {:.2}s (liveness \
         timeout {:?}), longest write of the whole load {:.2}s; {abandoned} replica calls \
         abandoned, {hung} found the replica hung",
        stall.as_secs_f64(),
        liveness,
        longest.as_secs_f64(),
    );
    let per_second = per_second.lock().unwrap().clone();
    println!(
        "acknowledged writes per second of the load: {:?}",
        &per_second[..=load_for.as_secs() as usize]
    );
    // Meta declares the chunk dead after the liveness timeout (+ up to a
    // quarter of it for its liveness pass), the serving chunk hears of it
    // with its next heartbeat (a third of it): liveness + 2 s leaves room
    // for a loaded machine, and is below the chunk's 5 s replica call
    // timeout that bounded the stall before.
    let bound = liveness + Duration::from_secs(2);
    assert!(
        stall < bound,
        "a write stalled {stall:?} behind the frozen replica (bound {bound:?}: liveness \
         timeout + 2 s); serving chunk log:\n{}",
        chunks[0].log_tail()
    );
    assert_eq!(failed, 0, "no write may fail because a replica froze");
    assert!(acked > 100, "the load made progress ({acked} acked)");
    assert!(
        on_victim > 0,
        "writes to the frozen chunk's extents went on while it was frozen"
    );

    // Back to full replication (the thawed chunk rejoins; recovery refills).
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let ext = admin.extents(&vol.id).await;
        let st = admin.status().await;
        if st.chunks_alive == 3
            && ext
                .iter()
                .all(|e| e.replicas.len() == 2 && e.learners.is_empty())
            && st.degraded_extents == 0
            && st.recovery_queued == 0
        {
            println!(
                "full replication {:.1}s after the thaw",
                thawed_at.elapsed().as_secs_f64()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replication not restored: {ext:?} status {st:?}\nvictim log:\n{}",
            chunks[victim].log_tail()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Every acknowledged write reads back, through every chunk.
    settle(&mut admin, &chunks.iter().collect::<Vec<_>>()).await;
    let book = book.lock().unwrap().clone();
    let n = verify(&serving, lun, &book, "serving chunk").await;
    for (i, c) in chunks.iter().enumerate().skip(1) {
        let s = login(c.portal(), &vol.target_iqn, lun).await;
        verify(&s, lun, &book, &format!("chunk {}", i + 1)).await;
    }
    println!("verified {n} acknowledged LBAs through every chunk");
}

/// `ironblock --output json ARGS` against `meta`; the parsed output.
fn cli_json(meta: &MetaProcess, args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(bin_path("ironblock"))
        .arg("--meta")
        .arg(meta.addr().to_string())
        .args(["--output", "json"])
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run ironblock");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ironblock {args:?} failed ({}): {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("ironblock {args:?}: not JSON ({e}): {stdout}"))
}

/// Polls the volume's extents until each has `members` members and no
/// learner and meta has nothing queued (bounded).
async fn wait_members(admin: &mut Admin, volume: &str, members: usize, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let ext = admin.extents(volume).await;
        let st = admin.status().await;
        if ext
            .iter()
            .all(|e| e.replicas.len() == members && e.learners.is_empty())
            && st.recovery_queued == 0
            && st.degraded_extents == 0
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "extents not at {members} members within {within:?}: {ext:?}\nstatus {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replication_factor_changed_online_keeps_every_byte() {
    let seed = faults_seed();
    let dir = scratch_dir("cluster-set-replicas-");
    let meta = MetaProcess::start(dir.path(), Duration::from_secs(2));
    let mut chunks = start_chunks(&meta, dir.path(), 1);
    let mut admin = meta.admin().await;
    let extents = 2;
    let vol = admin.create_thick_volume("grow", extents * EXTENT, 1).await;
    admin.acl_add(&vol.id, INITIATOR).await;
    settle(&mut admin, &[&chunks[0]]).await;
    let lun = u64::from(vol.lun);
    let original = chunks[0].chunk_id();
    let s = login(chunks[0].portal(), &vol.target_iqn, lun).await;
    let mut book = write_spread(&s, lun, extents, 16, seed).await;
    drop(s);
    let before = admin.extents(&vol.id).await;
    assert!(before
        .iter()
        .all(|e| e.replicas == vec![original] && e.replication_factor == 1));

    // A second chunk joins (two extents against none is within the
    // rebalancing slack: nothing moves by itself).
    chunks.push(ChunkProcess::init_and_start(
        &meta,
        &dir.path().join("chunk-2"),
        ChunkOptions::default(),
    ));
    let other = chunks[1].chunk_id();
    settle(&mut admin, &[&chunks[0], &chunks[1]]).await;
    let completed = admin.status().await.recovery_completed;

    // Raise 1 -> 2: answered at once, every extent short until recovery has
    // copied it; `--wait` returns once it has (bounded).
    let t = Instant::now();
    let r = cli_json(&meta, &["volume", "set-replicas", "grow", "2"]);
    assert_eq!(
        (r["replicas"].as_u64(), r["previous_replicas"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(r["replication"]["complete"], false, "{r}");
    assert_eq!(r["replication"]["extents_off_factor"], extents);
    let r = cli_json(
        &meta,
        &[
            "volume",
            "set-replicas",
            "grow",
            "2",
            "--wait",
            "--wait-timeout",
            "90s",
        ],
    );
    assert_eq!(r["replication"]["complete"], true, "{r}");
    wait_members(&mut admin, &vol.id, 2, Duration::from_secs(30)).await;
    println!("raised to 2 replicas in {:.1}s", t.elapsed().as_secs_f64());
    for e in admin.extents(&vol.id).await {
        let mut m = e.replicas.clone();
        m.sort_unstable();
        assert_eq!(m, vec![original, other], "{e:?}");
        assert_eq!(e.replication_factor, 2);
    }
    assert!(
        admin.status().await.recovery_completed >= completed + extents,
        "the copies were recovery tasks"
    );

    // The original dies: every byte is on the other chunk.
    chunks[0].kill9();
    let via_other = login(chunks[1].portal(), &vol.target_iqn, lun).await;
    let n = verify(&via_other, lun, &book, "the second chunk, original killed").await;
    assert_eq!(n as u64, extents * 16);
    println!("verified {n} blocks through chunk {other} with chunk {original} killed");
    assert!(
        admin
            .wait_chunk_state(original, pb::ChunkState::Dead, Duration::from_secs(20))
            .await,
        "original not declared dead"
    );
    let st = admin.status().await;
    assert_eq!(
        st.degraded_extents, extents,
        "RF 2 on one live chunk: {st:?}"
    );

    // Lowered back to 1 while it is dead: healthy again at once.
    let r = cli_json(&meta, &["volume", "set-replicas", "grow", "1", "--wait"]);
    assert_eq!(r["replicas"], 1);
    assert_eq!(r["replication"]["complete"], true, "{r}");
    let st = admin.status().await;
    assert_eq!((st.health, st.degraded_extents), (pb::Health::Ok as i32, 0));
    for e in admin.extents(&vol.id).await {
        assert_eq!(e.replicas, vec![other], "{e:?}");
    }

    // The original returns (its stale copies are no member's: collected),
    // the volume is raised again and then lowered with both alive.
    chunks[0].restart();
    assert!(
        admin
            .wait_chunk_state(original, pb::ChunkState::Alive, Duration::from_secs(20))
            .await,
        "original did not come back"
    );
    settle(&mut admin, &[&chunks[0], &chunks[1]]).await;
    admin
        .client()
        .set_volume_replicas(pb::SetVolumeReplicasRequest {
            volume: Some(pb::VolumeRef {
                r#ref: Some(pb::volume_ref::Ref::Id(vol.id.clone())),
            }),
            replicas: 2,
        })
        .await
        .expect("SetVolumeReplicas 2");
    wait_members(&mut admin, &vol.id, 2, Duration::from_secs(90)).await;
    let full = admin.extents(&vol.id).await;
    let r = cli_json(&meta, &["volume", "set-replicas", &vol.id, "1"]);
    assert_eq!(
        r["replication"]["complete"], true,
        "a lower is immediate: {r}"
    );
    let low = admin.extents(&vol.id).await;
    for (e, was) in low.iter().zip(&full) {
        assert_eq!(e.replicas.len(), 1, "{e:?}");
        assert!(e.learners.is_empty(), "{e:?}");
        assert!(
            e.epoch > was.epoch,
            "the old set is fenced: {was:?} -> {e:?}"
        );
        assert_eq!(e.replication_factor, 1);
    }
    let st = admin.status().await;
    assert_eq!(
        (st.health, st.degraded_extents, st.recovery_queued),
        (pb::Health::Ok as i32, 0, 0)
    );
    settle(&mut admin, &[&chunks[0], &chunks[1]]).await;
    // Every byte through both chunks (one of them reads remotely), then new
    // writes through each, read back through the other.
    let a = login(chunks[0].portal(), &vol.target_iqn, lun).await;
    let b = login(chunks[1].portal(), &vol.target_iqn, lun).await;
    verify(&a, lun, &book, "the original after the lower").await;
    verify(&b, lun, &book, "the second chunk after the lower").await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5e7);
    for (i, (writer, _)) in [(&a, "original"), (&b, "second")].iter().enumerate() {
        for j in 0..extents {
            let lba = (j * EXTENT + (i as u64 + 1) * 4096 * 1024) / u64::from(BS);
            let data = payload(&mut rng, 7 + i as u64, j, lba);
            let r = writer
                .write16(lun, lba, data.clone(), BS)
                .await
                .expect("write");
            assert_eq!(r.status, 0, "write after the lower: {:?}", r.sense_key());
            book.insert(
                lba,
                Expect {
                    acked: Some(data),
                    maybe: vec![],
                },
            );
        }
    }
    verify(&a, lun, &book, "the original, new writes").await;
    verify(&b, lun, &book, "the second chunk, new writes").await;
}

/// Extent files (`.meta`, one per extent) of `volume` in `chunk`'s data
/// directory.
fn extent_files_of(chunk: &ChunkProcess, volume: &str) -> Vec<String> {
    chunk
        .extent_files()
        .into_iter()
        .filter(|f| f.starts_with(volume))
        .collect()
}

/// The `.data` file of extent `e` in `chunk`'s store.
fn extent_data_of(chunk: &ChunkProcess, volume: &str, e: &pb::Extent) -> std::path::PathBuf {
    let key = if e.store_key.is_empty() {
        volume
    } else {
        e.store_key.as_str()
    };
    chunk.extent_data_path(key, e.index)
}

/// An unlabelled counter or gauge of a chunk (0 when absent).
async fn chunk_metric(c: &ChunkProcess, name: &str) -> f64 {
    c.metric(name).await.unwrap_or(0.0)
}

/// The replication factor lowered 2 -> 1 online: the chunk meta drops from
/// each extent's set deletes its copy within a bounded time, without a
/// restart or rejoin (the garbage collection a revision change asks for,
/// paced by `--gc-interval 1s` here); its used bytes as meta sees them
/// (`chunk list`) come back, the collected copies are retired (tombstones
/// that answer StaleEpoch to old views), and every byte reads back through
/// both chunks, also while the copies go (a reader on each portal).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lowered_replicas_are_collected_online_and_every_byte_stays() {
    let seed = faults_seed();
    let dir = scratch_dir("cluster-gc-online-");
    // A liveness timeout well above a loaded machine's heartbeat hiccups:
    // a chunk declared dead would rejoin, and a rejoin collects too (this
    // test is about the collection without one).
    let meta = MetaProcess::start(dir.path(), Duration::from_secs(6));
    let opts = ChunkOptions {
        extra_args: vec!["--gc-interval".into(), "1s".into()],
        ..ChunkOptions::default()
    };
    let mut chunks: Vec<ChunkProcess> = (1..=2)
        .map(|i| {
            ChunkProcess::init_and_start(
                &meta,
                &dir.path().join(format!("chunk-{i}")),
                opts.clone(),
            )
        })
        .collect();
    let mut admin = meta.admin().await;
    let extents = 4u64;
    let vol = admin
        .create_thick_volume("shrink", extents * EXTENT, 2)
        .await;
    admin.acl_add(&vol.id, INITIATOR).await;
    settle(&mut admin, &[&chunks[0], &chunks[1]]).await;
    let lun = u64::from(vol.lun);
    let a = Arc::new(login(chunks[0].portal(), &vol.target_iqn, lun).await);
    let mut book = write_spread(&a, lun, extents, 16, seed).await;
    let b = Arc::new(login(chunks[1].portal(), &vol.target_iqn, lun).await);
    for c in &chunks {
        assert_eq!(
            extent_files_of(c, &vol.id).len() as u64,
            extents,
            "RF=2: every extent on chunk {}",
            c.chunk_id()
        );
    }
    // Both portals read through views of the two-member sets.
    assert_eq!(
        verify(&a, lun, &book, "chunk 1 before").await as u64,
        extents * 16
    );
    assert_eq!(
        verify(&b, lun, &book, "chunk 2 before").await as u64,
        extents * 16
    );
    let mut registrations = Vec::new();
    let mut deleted_before = Vec::new();
    for c in &chunks {
        registrations.push(chunk_metric(c, "ironblock_chunk_registrations_total").await);
        deleted_before.push(chunk_metric(c, "ironblock_chunk_gc_deleted_extents_total").await);
    }
    // Meta's view of each chunk's used bytes once the heartbeats carry the
    // writes (16 blocks of 4 KiB per extent at least).
    let written = extents * 16 * 4096;
    let deadline = Instant::now() + Duration::from_secs(20);
    let used_before: HashMap<u64, u64> = loop {
        let used: HashMap<u64, u64> = admin
            .chunks()
            .await
            .iter()
            .map(|c| (c.id, c.used_bytes))
            .collect();
        if chunks
            .iter()
            .all(|c| used.get(&c.chunk_id()).is_some_and(|u| *u >= written))
        {
            break used;
        }
        assert!(
            Instant::now() < deadline,
            "used bytes never reported: {used:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // A reader on each portal while the copies go (bounded in rounds and
    // time; `verify` fails on any wrong byte or failed read).
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let shared_book = Arc::new(book.clone());
    let readers: Vec<_> = [
        (a.clone(), "chunk 1, during"),
        (b.clone(), "chunk 2, during"),
    ]
    .into_iter()
    .map(|(s, via)| {
        let (stop, book) = (stop.clone(), shared_book.clone());
        tokio::spawn(async move {
            let start = Instant::now();
            let mut rounds = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed)
                && rounds < 5_000
                && start.elapsed() < Duration::from_secs(90)
            {
                verify(&s, lun, &book, via).await;
                rounds += 1;
            }
            rounds
        })
    })
    .collect();

    // Lower: one member per extent at once; the other chunk's copy is no
    // member's any more.
    let t = Instant::now();
    let r = cli_json(&meta, &["volume", "set-replicas", "shrink", "1"]);
    assert_eq!(
        r["replication"]["complete"], true,
        "a lower is immediate: {r}"
    );
    let low = admin.extents(&vol.id).await;
    assert_eq!(low.len() as u64, extents);
    let mut dropped: HashMap<u64, u64> = HashMap::new();
    for e in &low {
        assert_eq!(e.replicas.len(), 1, "{e:?}");
        assert!(e.learners.is_empty(), "{e:?}");
        for c in &chunks {
            if !e.replicas.contains(&c.chunk_id()) {
                *dropped.entry(c.chunk_id()).or_default() += 1;
            }
        }
    }
    assert_eq!(dropped.values().sum::<u64>(), extents);
    println!("dropped copies per chunk: {dropped:?}");

    // The dropped copies' files leave the data directories; the kept ones
    // stay (bounded: the GC interval, a heartbeat, slack for a loaded
    // machine).
    let limit = Duration::from_secs(30);
    let vid = vol.id.as_str();
    loop {
        let pending: Vec<String> = low
            .iter()
            .flat_map(|e| {
                chunks.iter().filter_map(move |c| {
                    let path = extent_data_of(c, vid, e);
                    let member = e.replicas.contains(&c.chunk_id());
                    (member != path.is_file()).then(|| {
                        format!(
                            "extent {} on chunk {} ({})",
                            e.index,
                            c.chunk_id(),
                            if member {
                                "kept copy missing"
                            } else {
                                "dropped copy still there"
                            }
                        )
                    })
                })
            })
            .collect();
        if pending.is_empty() {
            break;
        }
        assert!(
            t.elapsed() < limit,
            "not collected within {limit:?} of the lower: {pending:?}\nchunk 1 log:\n{}\nchunk 2 log:\n{}",
            chunks[0].log_tail(),
            chunks[1].log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "dropped copies collected {:.1}s after the lower, without a restart",
        t.elapsed().as_secs_f64()
    );
    for c in &chunks {
        let n = dropped.get(&c.chunk_id()).copied().unwrap_or(0);
        assert_eq!(
            extent_files_of(c, &vol.id).len() as u64,
            extents - n,
            "chunk {}",
            c.chunk_id()
        );
    }

    // The same processes, never re-registered; the store says so too.
    for (i, c) in chunks.iter_mut().enumerate() {
        assert!(c.is_running(), "chunk {} exited", c.chunk_id());
        let id = c.chunk_id();
        let n = dropped.get(&id).copied().unwrap_or(0) as f64;
        assert_eq!(
            chunk_metric(c, "ironblock_chunk_registrations_total").await,
            registrations[i],
            "chunk {id} re-registered (a restart or rejoin, not the online GC; \
             heartbeat failures {})",
            chunk_metric(c, "ironblock_chunk_heartbeat_failures_total").await
        );
        assert_eq!(
            chunk_metric(c, "ironblock_chunk_gc_deleted_extents_total").await - deleted_before[i],
            n,
            "chunk {id}: deleted-extent counter"
        );
        assert!(
            chunk_metric(c, "ironblock_chunk_store_retired_extents").await >= n,
            "chunk {id}: the collected copies are retired (fenced at meta's epoch)"
        );
        assert!(
            n == 0.0 || chunk_metric(c, "ironblock_chunk_gc_runs_total").await >= 2.0,
            "chunk {id}: start-up plus at least one collection after a revision"
        );
    }

    // Capacity comes back: meta's view of a dropping chunk's used bytes
    // shrinks (heartbeats carry it), and its trash drains.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now: HashMap<u64, u64> = admin
            .chunks()
            .await
            .iter()
            .map(|c| (c.id, c.used_bytes))
            .collect();
        let mut trash = 0.0;
        for c in &chunks {
            trash += chunk_metric(c, "ironblock_chunk_store_trash_pending_files").await;
        }
        let shrunk = dropped
            .keys()
            .all(|id| now.get(id).copied().unwrap_or(u64::MAX) < used_before[id]);
        if shrunk && trash == 0.0 {
            println!("used bytes at meta: {used_before:?} -> {now:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "used bytes not back: {used_before:?} -> {now:?}, trash pending {trash}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A little more reading on the new views, then the readers stop.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for (i, r) in readers.into_iter().enumerate() {
        let rounds = r
            .await
            .expect("reader (a read failed or returned wrong data)");
        println!("reader {} verified {rounds} rounds across the lower", i + 1);
        assert!(rounds > 0);
    }

    // Every byte through both chunks (a dropping chunk reads remotely now),
    // then new writes through each, read back through the other.
    assert_eq!(
        verify(&a, lun, &book, "chunk 1 after").await as u64,
        extents * 16
    );
    assert_eq!(
        verify(&b, lun, &book, "chunk 2 after").await as u64,
        extents * 16
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x6c);
    for (i, writer) in [&a, &b].iter().enumerate() {
        for j in 0..extents {
            let lba = (j * EXTENT + (i as u64 + 1) * 4096 * 1024) / u64::from(BS);
            let data = payload(&mut rng, 40 + i as u64, j, lba);
            let r = writer
                .write16(lun, lba, data.clone(), BS)
                .await
                .expect("write");
            assert_eq!(r.status, 0, "write after the GC: {:?}", r.sense_key());
            book.insert(
                lba,
                Expect {
                    acked: Some(data),
                    maybe: vec![],
                },
            );
        }
    }
    verify(&a, lun, &book, "chunk 1, new writes").await;
    verify(&b, lun, &book, "chunk 2, new writes").await;
    // The new writes went to the kept members only: nothing re-created.
    for c in &chunks {
        let n = dropped.get(&c.chunk_id()).copied().unwrap_or(0);
        assert_eq!(
            extent_files_of(c, &vol.id).len() as u64,
            extents - n,
            "chunk {} after new writes",
            c.chunk_id()
        );
    }
}
