//! The chunk server as real processes: `ironblock-meta` plus two
//! `ironblock-chunk` processes on 127.0.0.1, driven through the Rust test
//! initiator and meta's gRPC API.
//!
//! Build the binaries first: `cargo build -p ironblock-meta -p ironblock-chunk`.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ironblock_proto::v1 as pb;
use ironblock_tests::cluster::{
    chunk_init, Admin, ChunkOptions, ChunkProcess, MetaEndpoint, MetaProcess,
};
use ironblock_tests::initiator::{LoginFailure, LoginOptions, Session};
use ironblock_tests::{bin_path, scratch_dir};
use rand::{Rng, SeedableRng};

const INI: &str = "iqn.2026-11.dev.ironblock:node-test";
const OTHER: &str = "iqn.2026-11.dev.ironblock:other";
const BS: u32 = 512;
const MIB: u64 = 1 << 20;
const APPLY: Duration = Duration::from_secs(20);

fn pattern(seed: u64, len: usize) -> Bytes {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    Bytes::from((0..len).map(|_| r.gen()).collect::<Vec<u8>>())
}

struct Cluster {
    _dir: tempfile::TempDir,
    meta: MetaProcess,
    a: ChunkProcess,
    b: ChunkProcess,
    admin: Admin,
}

async fn cluster(name: &str, liveness: Duration, opts: ChunkOptions) -> Cluster {
    let dir = scratch_dir(name);
    let meta = MetaProcess::start(dir.path(), liveness);
    let a = ChunkProcess::init_and_start(&meta, &dir.path().join("a"), opts.clone());
    let b = ChunkProcess::init_and_start(&meta, &dir.path().join("b"), opts);
    assert_ne!(a.chunk_id(), b.chunk_id());
    assert_eq!(a.cluster_id(), b.cluster_id());
    let admin = meta.admin().await;
    Cluster {
        _dir: dir,
        meta,
        a,
        b,
        admin,
    }
}

impl Cluster {
    /// Wait until both chunks applied meta's current revision.
    async fn settle(&mut self) {
        let rev = self.admin.revision().await;
        for c in [&self.a, &self.b] {
            assert!(
                c.wait_applied(rev, APPLY).await,
                "chunk {} did not apply revision {rev}; log:\n{}",
                c.chunk_id(),
                c.log_tail()
            );
        }
    }

    /// An RF=2 volume of `size` with `INI` in its ACL, applied everywhere.
    async fn volume(&mut self, name: &str, size: u64) -> pb::Volume {
        let v = self.admin.create_volume(name, size, 2).await;
        self.admin.acl_add(&v.id, INI).await;
        self.settle().await;
        v
    }
}

async fn login(portal: std::net::SocketAddr, initiator: &str, target: &str) -> Session {
    Session::login(portal, &LoginOptions::normal(initiator, target))
        .await
        .unwrap_or_else(|e| panic!("login of {initiator} to {target} at {portal}: {e:#}"))
}

/// Clear the power-on unit attention of a new nexus.
async fn clear_ua(s: &Session, lun: u64) {
    for _ in 0..4 {
        if s.test_unit_ready(lun).await.unwrap().status == 0 {
            return;
        }
    }
    panic!("unit attention on LUN {lun} did not clear");
}

async fn write(s: &Session, lun: u64, lba: u64, data: &Bytes) {
    let r = s.write16(lun, lba, data.clone(), BS).await.unwrap();
    assert_eq!(r.status, 0, "write at {lba}: sense {:?}", r.sense_key());
}

async fn read(s: &Session, lun: u64, lba: u64, len: usize) -> Bytes {
    let r = s
        .read16(lun, lba, (len / BS as usize) as u32, BS)
        .await
        .unwrap();
    assert_eq!(r.status, 0, "read at {lba}: sense {:?}", r.sense_key());
    r.data
}

fn file_bytes(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, offset).unwrap();
    b
}

fn flip_byte(path: &Path, offset: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x5a;
    f.write_all_at(&b, offset).unwrap();
}

/// VPD page 0x80 (unit serial number) of a LUN.
async fn vpd_serial(s: &Session, lun: u64) -> String {
    let r = s
        .scsi(lun, &[0x12, 1, 0x80, 0, 255, 0], Bytes::new(), 255)
        .await
        .unwrap();
    assert_eq!(r.status, 0);
    String::from_utf8_lossy(&r.data[4..]).trim().to_string()
}

#[tokio::test]
async fn data_written_through_one_chunk_reads_back_through_the_other() {
    let mut c = cluster("node-rw", Duration::from_secs(3), ChunkOptions::default()).await;
    let v = c.volume("rw", 64 * MIB).await;
    let lun = u64::from(v.lun);

    let s = login(c.a.portal(), INI, &v.target_iqn).await;
    clear_ua(&s, lun).await;
    assert_eq!(s.capacity(lun).await.unwrap(), (64 * MIB / 512, BS));
    let serial_a = vpd_serial(&s, lun).await;
    let p1 = pattern(1, 256 * 1024);
    let p2 = pattern(2, 64 * 1024);
    write(&s, lun, 0, &p1).await;
    write(&s, lun, 100_000, &p2).await;
    s.logout().await.unwrap();

    let s = login(c.b.portal(), INI, &v.target_iqn).await;
    clear_ua(&s, lun).await;
    assert_eq!(read(&s, lun, 0, p1.len()).await, p1);
    assert_eq!(read(&s, lun, 100_000, p2.len()).await, p2);
    // Every chunk presents the same identity.
    assert_eq!(vpd_serial(&s, lun).await, serial_a);
    assert_eq!(serial_a, v.vpd_serial);
    s.logout().await.unwrap();

    // Both replicas hold the data on disk.
    for ch in [&c.a, &c.b] {
        let f = ch.extent_data_path(&v.id, 0);
        assert_eq!(file_bytes(&f, 0, p1.len()), p1.to_vec(), "{}", f.display());
    }
    assert!(c.a.stop(), "chunk a exits 0 on SIGTERM");
    assert!(c.b.stop(), "chunk b exits 0 on SIGTERM");
}

#[tokio::test]
async fn lun_masking_follows_the_acl() {
    let mut c = cluster("node-mask", Duration::from_secs(3), ChunkOptions::default()).await;
    let v = c.volume("masked", 64 * MIB).await;
    let lun = u64::from(v.lun);
    let s = login(c.a.portal(), INI, &v.target_iqn).await;
    clear_ua(&s, lun).await;
    let data = pattern(3, 64 * 1024);
    write(&s, lun, 8, &data).await;

    // Discovery: INI finds the target at this chunk's portal, OTHER nothing.
    let d = Session::login(c.a.portal(), &LoginOptions::discovery(INI))
        .await
        .unwrap();
    let found = d.send_targets("All").await.unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].0, v.target_iqn);
    assert_eq!(found[0].1, vec![format!("{},1", c.a.portal())]);
    let d = Session::login(c.a.portal(), &LoginOptions::discovery(OTHER))
        .await
        .unwrap();
    assert!(d.send_targets("All").await.unwrap().is_empty());
    // A normal login where OTHER sees no LUN: authorization failure.
    let e = Session::login(c.a.portal(), &LoginOptions::normal(OTHER, &v.target_iqn))
        .await
        .err()
        .expect("login refused");
    let f = e.downcast::<LoginFailure>().expect("a login status");
    assert_eq!((f.class, f.detail), (2, 2), "{f}");

    // A second volume in the same target that OTHER may see: it can log in
    // but sees only that LUN; the first one is absent for it.
    let v2 = c.admin.create_volume("mine", 64 * MIB, 2).await;
    assert_eq!(v2.target_iqn, v.target_iqn);
    c.admin.acl_add(&v2.id, OTHER).await;
    c.settle().await;
    let o = login(c.b.portal(), OTHER, &v.target_iqn).await;
    assert_eq!(o.report_luns().await.unwrap(), vec![u64::from(v2.lun)]);
    let r = o.read16(lun, 8, 8, BS).await.unwrap();
    assert_eq!(r.status, 2);
    assert_eq!(r.sense_key(), Some((5, 0x25, 0)), "LUN not supported");
    assert!(r.data.is_empty());

    // After AclAdd reaches the chunk, OTHER reads and writes the LUN.
    c.admin.acl_add(&v.id, OTHER).await;
    c.settle().await;
    let mut luns = o.report_luns().await.unwrap();
    luns.sort_unstable();
    assert_eq!(luns, vec![lun, u64::from(v2.lun)]);
    clear_ua(&o, lun).await;
    assert_eq!(read(&o, lun, 8, data.len()).await, data);
    let mine = pattern(4, 8192);
    write(&o, lun, 4096, &mine).await;
    assert_eq!(read(&s, lun, 4096, mine.len()).await, mine);
}

#[tokio::test]
async fn a_flipped_byte_is_detected_on_read_and_repaired_on_disk() {
    let mut c = cluster("node-flip", Duration::from_secs(3), ChunkOptions::default()).await;
    let v = c.volume("flip", 64 * MIB).await;
    let lun = u64::from(v.lun);
    let s = login(c.a.portal(), INI, &v.target_iqn).await;
    clear_ua(&s, lun).await;
    let data = pattern(5, 64 * 1024);
    write(&s, lun, 0, &data).await;

    let fa = c.a.extent_data_path(&v.id, 0);
    let at = 3 * 4096 + 10;
    flip_byte(&fa, at);
    assert_ne!(file_bytes(&fa, at, 1)[0], data[at as usize]);
    // Chunk a reads its own copy first: the checksum catches the flip, the
    // data comes from b, and a's copy is rewritten.
    assert_eq!(read(&s, lun, 0, data.len()).await, data);
    assert_eq!(file_bytes(&fa, 0, data.len()), data.to_vec());
    let repairs = c.a.metric("ironblock_chunk_store_repairs_total").await;
    assert!(repairs.is_some_and(|r| r >= 1.0), "{repairs:?}");
}

#[tokio::test]
async fn the_scrubber_repairs_a_block_nobody_reads() {
    let opts = ChunkOptions {
        scrub_interval: "1s".into(),
        ..ChunkOptions::default()
    };
    let mut c = cluster("node-scrub", Duration::from_secs(3), opts).await;
    let v = c.volume("scrub", 64 * MIB).await;
    let lun = u64::from(v.lun);
    let s = login(c.a.portal(), INI, &v.target_iqn).await;
    clear_ua(&s, lun).await;
    let data = pattern(6, 128 * 1024);
    write(&s, lun, 2048, &data).await;
    s.logout().await.unwrap();

    let fb = c.b.extent_data_path(&v.id, 0);
    let at = MIB + 4096 * 7 + 99;
    let good = file_bytes(&fb, at, 1)[0];
    flip_byte(&fb, at);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut repaired = false;
    while Instant::now() < deadline {
        if file_bytes(&fb, at, 1)[0] == good {
            repaired = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        repaired,
        "scrubber did not repair; log:\n{}",
        c.b.log_tail()
    );
    assert_eq!(file_bytes(&fb, MIB, data.len()), data.to_vec());
    let n = c.b.metric("ironblock_chunk_scrub_repairs_total").await;
    assert!(n.is_some_and(|n| n >= 1.0), "{n:?}");
}

#[tokio::test]
async fn a_chunk_declared_dead_drops_its_stale_extents_on_restart() {
    let mut c = cluster("node-dead", Duration::from_secs(2), ChunkOptions::default()).await;
    let v = c.volume("dead", 64 * MIB).await;
    let lun = u64::from(v.lun);
    let s = login(c.a.portal(), INI, &v.target_iqn).await;
    clear_ua(&s, lun).await;
    let old = pattern(7, 64 * 1024);
    write(&s, lun, 0, &old).await;
    let fb = c.b.extent_data_path(&v.id, 0);
    assert_eq!(file_bytes(&fb, 0, old.len()), old.to_vec());

    c.b.kill9();
    assert!(
        c.admin
            .wait_chunk_state(
                c.b.chunk_id(),
                pb::ChunkState::Dead,
                Duration::from_secs(20)
            )
            .await,
        "meta never declared chunk b dead; meta log:\n{}",
        c.meta.log_tail()
    );
    let extents = c.admin.extents(&v.id).await;
    assert!(!extents[0].replicas.contains(&c.b.chunk_id()));
    // New data while b is gone: b's copy is now stale.
    let new = pattern(8, 64 * 1024);
    write(&s, lun, 0, &new).await;

    c.b.restart();
    // The returning chunk is a spare for the degraded extent: meta makes it a
    // learner and its stale copy is replaced by a fresh one (resync), never
    // served; once it is a member again its copy on disk holds the new data.
    wait_fresh_copy(&mut c, &v.id, &new).await;
    c.settle().await;
    let s2 = login(c.b.portal(), INI, &v.target_iqn).await;
    clear_ua(&s2, lun).await;
    assert_eq!(read(&s2, lun, 0, new.len()).await, new);
}

/// Wait (bounded) until chunk b is a member of extent 0 of `volume` again
/// (recovered), then check its copy on disk starts with `new`: the stale copy
/// it held before being declared dead is gone.
async fn wait_fresh_copy(c: &mut Cluster, volume: &str, new: &[u8]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let b = c.b.chunk_id();
    loop {
        let e = c.admin.extents(volume).await.remove(0);
        if e.replicas.contains(&b) {
            let path = c.b.extent_data_path(&e.store_key, e.index);
            let data = std::fs::read(&path).unwrap_or_default();
            assert!(
                data.len() >= new.len() && data[..new.len()] == *new,
                "b's recovered copy {} does not hold the current data",
                path.display()
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "chunk b never recovered extent 0: {e:?}; log:\n{}",
            c.b.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Run `ironblock-chunk ARGS` to completion (bounded); (success, stdout+stderr).
fn run_chunk(args: &[&str]) -> (bool, String) {
    let mut child = Command::new(bin_path("ironblock-chunk"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(40);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            let out = child.wait_with_output().unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            return (out.status.success(), text);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("ironblock-chunk {args:?} did not finish");
}

#[tokio::test]
async fn run_refuses_unstamped_and_foreign_directories() {
    let dir = scratch_dir("node-refuse");
    let meta = MetaProcess::start(dir.path(), Duration::from_secs(3));
    let other = MetaProcess::start(&dir.path().join("other"), Duration::from_secs(3));
    let m = meta.addr().to_string();
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = empty.to_str().unwrap();
    let (ok, out) = run_chunk(&["run", "--data", e, "--meta", &m, "--listen", "127.0.0.1:0"]);
    assert!(!ok);
    assert!(out.contains("ironblock-chunk init"), "{out}");

    let d = dir.path().join("stamped");
    let (id, cluster) = chunk_init(&meta.meta_arg(), &d, false).unwrap();
    assert!(id >= 1);
    assert!(!cluster.is_empty());
    let again = chunk_init(&meta.meta_arg(), &d, false).unwrap_err();
    assert!(again.contains("stamped"), "{again}");
    let (id2, _) = chunk_init(&meta.meta_arg(), &d, true).unwrap();
    assert_ne!(id2, id, "--force registers a new chunk");

    let ds = d.to_str().unwrap();
    let o = other.addr().to_string();
    let (ok, out) = run_chunk(&["run", "--data", ds, "--meta", &o, "--listen", "127.0.0.1:0"]);
    assert!(!ok, "{out}");
    assert!(out.contains("cluster"), "{out}");
}

#[tokio::test]
async fn a_chunk_cut_off_from_meta_fences_its_io_until_meta_answers_again() {
    let mut c = cluster(
        "node-fence",
        Duration::from_secs(2),
        ChunkOptions::default(),
    )
    .await;
    let v = c.volume("fence", 64 * MIB).await;
    let lun = u64::from(v.lun);
    let s = login(c.a.portal(), INI, &v.target_iqn).await;
    clear_ua(&s, lun).await;
    let data = pattern(9, 8192);
    write(&s, lun, 0, &data).await;

    c.meta.kill9();
    // Within the liveness timeout (2 s) plus a heartbeat, I/O must stop.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut fenced = None;
    while Instant::now() < deadline {
        let r = s.read16(lun, 0, 16, BS).await.unwrap();
        if r.status != 0 {
            fenced = r.sense_key();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (key, asc, _) = fenced.expect("I/O kept succeeding without meta");
    assert_eq!((key, asc), (2, 4), "NOT READY");
    let w = s.write16(lun, 64, data.clone(), BS).await.unwrap();
    assert_eq!(
        w.sense_key().map(|k| k.0),
        Some(2),
        "writes are refused too"
    );
    // The refusal may come first from the data path (a view dropped by a
    // pushed revision needs meta to be rebuilt); the self-fence closes
    // when the last heartbeat's lease runs out, whatever the view.
    let mut gauge = None;
    while Instant::now() < deadline {
        gauge = c.a.metric("ironblock_chunk_fenced").await;
        if gauge == Some(1.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(gauge, Some(1.0), "fence gauge");

    c.meta.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut back = false;
    while Instant::now() < deadline {
        let r = s.read16(lun, 0, 16, BS).await.unwrap();
        if r.status == 0 {
            assert_eq!(r.data, data);
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(back, "I/O did not resume; log:\n{}", c.a.log_tail());
    write(&s, lun, 64, &data).await;
}

#[tokio::test]
async fn a_frozen_chunk_declared_dead_rejoins_without_its_stale_data() {
    let mut c = cluster(
        "node-rejoin",
        Duration::from_secs(2),
        ChunkOptions::default(),
    )
    .await;
    let v = c.volume("rejoin", 64 * MIB).await;
    let lun = u64::from(v.lun);
    let s = login(c.a.portal(), INI, &v.target_iqn).await;
    clear_ua(&s, lun).await;
    write(&s, lun, 0, &pattern(10, 32 * 1024)).await;

    c.b.pause();
    let dead = c
        .admin
        .wait_chunk_state(
            c.b.chunk_id(),
            pb::ChunkState::Dead,
            Duration::from_secs(20),
        )
        .await;
    let new = pattern(11, 32 * 1024);
    if dead {
        write(&s, lun, 0, &new).await;
    }
    c.b.resume();
    assert!(dead, "meta never declared the frozen chunk dead");
    // Its next heartbeat is refused: it re-registers and collects garbage.
    assert!(
        c.admin
            .wait_chunk_state(
                c.b.chunk_id(),
                pb::ChunkState::Alive,
                Duration::from_secs(20)
            )
            .await
    );
    wait_fresh_copy(&mut c, &v.id, &new).await;
    assert!(c.b.metric("ironblock_chunk_registrations_total").await >= Some(2.0));
    c.settle().await;
    let s2 = login(c.b.portal(), INI, &v.target_iqn).await;
    clear_ua(&s2, lun).await;
    assert_eq!(read(&s2, lun, 0, new.len()).await, new);
}

#[tokio::test]
async fn resize_and_delete_reach_open_sessions() {
    let mut c = cluster(
        "node-resize",
        Duration::from_secs(3),
        ChunkOptions::default(),
    )
    .await;
    let v = c.volume("grow", 64 * MIB).await;
    let v2 = c.volume("gone", 64 * MIB).await;
    let lun = u64::from(v.lun);
    let s = login(c.b.portal(), INI, &v.target_iqn).await;
    clear_ua(&s, lun).await;
    clear_ua(&s, u64::from(v2.lun)).await;
    assert_eq!(s.capacity(lun).await.unwrap().0, 64 * MIB / 512);

    c.admin
        .client()
        .resize_volume(pb::ResizeVolumeRequest {
            volume: Some(pb::VolumeRef {
                r#ref: Some(pb::volume_ref::Ref::Id(v.id.clone())),
            }),
            new_size_bytes: 192 * MIB,
        })
        .await
        .unwrap();
    c.settle().await;
    // The next command reports CAPACITY DATA HAS CHANGED, then the new size.
    let ua = s.test_unit_ready(lun).await.unwrap();
    assert_eq!(
        ua.sense_key(),
        Some((6, 0x2a, 0x09)),
        "{:?}",
        ua.sense_key()
    );
    assert_eq!(s.capacity(lun).await.unwrap().0, 192 * MIB / 512);
    // The new extents work, replicated.
    let tail = pattern(12, 64 * 1024);
    let lba = (192 * MIB - tail.len() as u64) / 512;
    write(&s, lun, lba, &tail).await;
    let s2 = login(c.a.portal(), INI, &v.target_iqn).await;
    clear_ua(&s2, lun).await;
    assert_eq!(read(&s2, lun, lba, tail.len()).await, tail);

    write(&s, u64::from(v2.lun), 0, &tail).await;
    for ch in [&c.a, &c.b] {
        assert!(ch.extent_files().iter().any(|f| f.starts_with(&v2.id)));
    }
    c.admin
        .client()
        .delete_volume(pb::VolumeRef {
            r#ref: Some(pb::volume_ref::Ref::Id(v2.id.clone())),
        })
        .await
        .unwrap();
    c.settle().await;
    assert_eq!(s.report_luns().await.unwrap(), vec![lun]);
    let r = s.read16(u64::from(v2.lun), 0, 8, BS).await.unwrap();
    assert_eq!(r.sense_key(), Some((5, 0x25, 0)));
    // The deleted volume's extents are garbage-collected; the other stays.
    for ch in [&c.a, &c.b] {
        let files = ch.extent_files();
        assert!(!files.iter().any(|f| f.starts_with(&v2.id)), "{files:?}");
        assert!(files.iter().any(|f| f.starts_with(&v.id)), "{files:?}");
    }
}

/// meta itself freezes (SIGSTOP) for twice the liveness timeout while the
/// chunks keep heartbeating into its sockets: when it thaws it must read
/// those heartbeats before judging liveness, and declare nobody dead.
#[tokio::test]
async fn a_frozen_meta_declares_nobody_dead_when_it_thaws() {
    let mut c = cluster(
        "node-meta-freeze",
        Duration::from_secs(2),
        ChunkOptions::default(),
    )
    .await;
    let v = c.volume("thaw", 64 * MIB).await;
    let lun = u64::from(v.lun);
    let s = login(c.a.portal(), INI, &v.target_iqn).await;
    clear_ua(&s, lun).await;
    write(&s, lun, 0, &pattern(12, 8192)).await;
    for round in 0..3 {
        c.meta.pause();
        tokio::time::sleep(Duration::from_secs(4)).await;
        c.meta.resume();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        for ch in c.admin.chunks().await {
            assert_eq!(
                ch.state,
                pb::ChunkState::Alive as i32,
                "round {round}: chunk {} declared dead after meta thawed; meta log:\n{}",
                ch.id,
                c.meta.log_tail()
            );
        }
    }
    for ch in [&c.a, &c.b] {
        assert_eq!(
            ch.metric("ironblock_chunk_registrations_total").await,
            Some(1.0),
            "chunk {} re-registered",
            ch.chunk_id()
        );
    }
    c.settle().await;
    assert_eq!(read(&s, lun, 0, 8192).await, pattern(12, 8192));
}

/// MODE SENSE(6) and (10) of a LUN: whether the WP bit of the
/// device-specific parameter is set in both.
async fn mode_sense_wp(s: &Session, lun: u64) -> bool {
    let r6 = s
        .scsi(lun, &[0x1a, 0x08, 0x3f, 0, 255, 0], Bytes::new(), 255)
        .await
        .unwrap();
    assert_eq!(r6.status, 0, "MODE SENSE(6): sense {:?}", r6.sense_key());
    let r10 = s
        .scsi(
            lun,
            &[0x5a, 0x08, 0x3f, 0, 0, 0, 0, 1, 0, 0],
            Bytes::new(),
            256,
        )
        .await
        .unwrap();
    assert_eq!(r10.status, 0, "MODE SENSE(10): sense {:?}", r10.sense_key());
    let wp6 = r6.data[2] & 0x80 != 0;
    let wp10 = r10.data[3] & 0x80 != 0;
    assert_eq!(wp6, wp10, "MODE SENSE(6) and (10) disagree on WP");
    wp6
}

fn write10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = 0x2a;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

#[tokio::test]
async fn a_read_only_acl_entry_write_protects_the_lun_for_that_initiator_only() {
    let mut c = cluster("node-ro", Duration::from_secs(3), ChunkOptions::default()).await;
    let v = c.volume("ro", 64 * MIB).await;
    let lun = u64::from(v.lun);
    c.admin.acl_add_read_only(&v.id, OTHER).await;
    // The same mode again is a no-op; the other mode is ALREADY_EXISTS.
    c.admin.acl_add_read_only(&v.id, OTHER).await;
    let e = c
        .admin
        .acl_add_mode(&v.id, OTHER, false, false)
        .await
        .expect_err("a mode mismatch is refused");
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
    c.settle().await;

    // Both initiators on the same chunk, so on the same logical unit.
    let w = login(c.a.portal(), INI, &v.target_iqn).await;
    let r = login(c.a.portal(), OTHER, &v.target_iqn).await;
    clear_ua(&w, lun).await;
    clear_ua(&r, lun).await;
    let data = pattern(11, 8192);
    write(&w, lun, 16, &data).await;
    assert!(!mode_sense_wp(&w, lun).await, "the writer sees no WP");

    // The reader: WP in MODE SENSE, reads work, writes are DATA PROTECT /
    // WRITE PROTECTED and change nothing.
    assert!(mode_sense_wp(&r, lun).await, "the reader sees WP");
    assert_eq!(read(&r, lun, 16, data.len()).await, data);
    let junk = Bytes::from(vec![0xeeu8; 4096]);
    let x = r.scsi(lun, &write10(16, 8), junk.clone(), 0).await.unwrap();
    assert_eq!(x.status, 2, "WRITE(10) from the reader");
    assert_eq!(x.sense_key(), Some((7, 0x27, 0)), "WRITE PROTECTED");
    let x = r.write16(lun, 16, junk.clone(), BS).await.unwrap();
    assert_eq!(
        x.sense_key(),
        Some((7, 0x27, 0)),
        "WRITE(16) from the reader"
    );
    let mut unmap = vec![0u8, 22, 0, 16, 0, 0, 0, 0];
    unmap.extend_from_slice(&16u64.to_be_bytes());
    unmap.extend_from_slice(&8u32.to_be_bytes());
    unmap.extend_from_slice(&[0; 4]);
    let x = r
        .scsi(
            lun,
            &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0],
            Bytes::from(unmap),
            0,
        )
        .await
        .unwrap();
    assert_eq!(x.sense_key(), Some((7, 0x27, 0)), "UNMAP from the reader");
    assert_eq!(read(&w, lun, 16, data.len()).await, data);

    // The writer goes on writing; the reader sees it.
    let more = pattern(12, 4096);
    write(&w, lun, 64, &more).await;
    assert_eq!(read(&r, lun, 64, more.len()).await, more);

    // On the other chunk too, from a fresh session.
    let r2 = login(c.b.portal(), OTHER, &v.target_iqn).await;
    clear_ua(&r2, lun).await;
    assert!(mode_sense_wp(&r2, lun).await);
    let x = r2.scsi(lun, &write10(0, 8), junk.clone(), 0).await.unwrap();
    assert_eq!(x.sense_key(), Some((7, 0x27, 0)));

    // An explicit mode change reaches the established session.
    c.admin
        .acl_add_mode(&v.id, OTHER, false, true)
        .await
        .expect("mode change");
    c.settle().await;
    assert!(!mode_sense_wp(&r, lun).await);
    write(&r, lun, 16, &junk).await;
    assert_eq!(read(&w, lun, 16, junk.len()).await, junk);
}

/// PERSISTENT RESERVE OUT with a basic 24-byte parameter list.
async fn prout(
    s: &Session,
    lun: u64,
    action: u8,
    ptype: u8,
    key: u64,
    sa_key: u64,
) -> ironblock_tests::initiator::ScsiReply {
    let mut p = vec![0u8; 24];
    p[0..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sa_key.to_be_bytes());
    s.scsi(
        lun,
        &[0x5f, action, ptype, 0, 0, 0, 0, 0, 24, 0],
        Bytes::from(p),
        0,
    )
    .await
    .unwrap()
}

/// PERSISTENT RESERVE IN (READ KEYS = 0, READ RESERVATION = 1).
async fn prin(s: &Session, lun: u64, action: u8) -> Bytes {
    let r = s
        .scsi(
            lun,
            &[0x5e, action, 0, 0, 0, 0, 0, 1, 0, 0],
            Bytes::new(),
            256,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 0, "PR IN: sense {:?}", r.sense_key());
    r.data
}

/// A reader (read-only ACL entry) sharing a LUN with a writer on the same
/// chunk takes no reservation that would block the writer: RESERVE(6)/(10)
/// and PR OUT RESERVE / PREEMPT / PREEMPT AND ABORT / CLEAR are DATA
/// PROTECT / WRITE PROTECTED; it may register and so read under the
/// writer's Exclusive Access - Registrants Only reservation. The writer
/// keeps writing throughout.
#[tokio::test]
async fn a_read_only_initiator_takes_no_reservation_that_blocks_the_writer() {
    const WP: Option<(u8, u8, u8)> = Some((7, 0x27, 0));
    let mut c = cluster(
        "node-ro-pr",
        Duration::from_secs(3),
        ChunkOptions::default(),
    )
    .await;
    let v = c.volume("ro-pr", 64 * MIB).await;
    let lun = u64::from(v.lun);
    c.admin.acl_add_read_only(&v.id, OTHER).await;
    c.settle().await;
    // Both on chunk a: one logical unit, one reservation state.
    let w = login(c.a.portal(), INI, &v.target_iqn).await;
    let r = login(c.a.portal(), OTHER, &v.target_iqn).await;
    clear_ua(&w, lun).await;
    clear_ua(&r, lun).await;
    let data = pattern(21, 4096);
    write(&w, lun, 0, &data).await;

    for cdb in [
        &[0x16u8, 0, 0, 0, 0, 0][..],
        &[0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0][..],
    ] {
        let x = r.scsi(lun, cdb, Bytes::new(), 0).await.unwrap();
        assert_eq!((x.status, x.sense_key()), (2, WP), "{cdb:02x?}");
    }
    write(&w, lun, 8, &data).await;

    // The reader registers (allowed) but reserves nothing.
    let x = prout(&r, lun, 0x06, 0, 0, 0xbb).await;
    assert_eq!(x.status, 0, "REGISTER: sense {:?}", x.sense_key());
    for t in [1u8, 3] {
        let x = prout(&r, lun, 0x01, t, 0xbb, 0).await;
        assert_eq!((x.status, x.sense_key()), (2, WP), "RESERVE type {t}");
    }
    assert_eq!(&prin(&w, lun, 1).await[4..8], &[0, 0, 0, 0]);
    write(&w, lun, 16, &data).await;

    // The writer's Exclusive Access - Registrants Only reservation: the
    // registered reader reads, and cannot preempt or clear it.
    assert_eq!(prout(&w, lun, 0x06, 0, 0, 0xaa).await.status, 0);
    assert_eq!(prout(&w, lun, 0x01, 6, 0xaa, 0).await.status, 0);
    assert_eq!(read(&r, lun, 0, data.len()).await, data);
    for (what, action, sa_key) in [
        ("PREEMPT", 0x04, 0xaa),
        ("PREEMPT AND ABORT", 0x05, 0xaa),
        ("CLEAR", 0x03, 0),
    ] {
        let x = prout(&r, lun, action, 6, 0xbb, sa_key).await;
        assert_eq!((x.status, x.sense_key()), (2, WP), "{what}");
    }
    let keys = prin(&w, lun, 0).await;
    assert_eq!(&keys[4..8], &[0, 0, 0, 16], "both registrations stand");
    let res = prin(&w, lun, 1).await;
    assert_eq!(&res[8..16], &0xaau64.to_be_bytes(), "the writer holds it");
    let more = pattern(22, 4096);
    write(&w, lun, 0, &more).await;
    assert_eq!(read(&r, lun, 0, more.len()).await, more);

    // A reader outside the registrations is shut out by EA-RO (the
    // reservation works as SPC-4 says), not by anything of its own.
    assert_eq!(prout(&r, lun, 0x00, 0, 0xbb, 0).await.status, 0);
    let x = r.read16(lun, 0, 8, BS).await.unwrap();
    assert_eq!(x.status, 0x18, "RESERVATION CONFLICT for the unregistered");
    assert_eq!(prout(&w, lun, 0x02, 6, 0xaa, 0).await.status, 0);
    assert_eq!(read(&r, lun, 0, more.len()).await, more);
}

/// READ CAPACITY(16): the LBPME bit (byte 14, bit 7) of a LUN.
async fn lbpme(s: &Session, lun: u64) -> bool {
    let mut cdb = [0u8; 16];
    cdb[0] = 0x9e;
    cdb[1] = 0x10;
    cdb[13] = 32;
    let r = s.scsi(lun, &cdb, Bytes::new(), 32).await.unwrap();
    assert_eq!(r.status, 0, "READ CAPACITY(16): {:?}", r.sense_key());
    assert!(r.data.len() >= 15, "short READ CAPACITY(16) data");
    r.data[14] & 0x80 != 0
}

/// UNMAP of 8 blocks at `lba`; returns (status, sense key/asc/ascq).
async fn unmap(s: &Session, lun: u64, lba: u64) -> (u8, Option<(u8, u8, u8)>) {
    let mut list = vec![0u8, 22, 0, 16, 0, 0, 0, 0];
    list.extend_from_slice(&lba.to_be_bytes());
    list.extend_from_slice(&8u32.to_be_bytes());
    list.extend_from_slice(&[0; 4]);
    let cdb = [0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0];
    let r = s.scsi(lun, &cdb, Bytes::from(list), 0).await.unwrap();
    (r.status, r.sense_key())
}

#[tokio::test]
async fn a_thick_volume_is_a_fully_provisioned_lun_and_a_thin_one_is_not() {
    let mut c = cluster("node-prov", Duration::from_secs(3), ChunkOptions::default()).await;
    let thin = c.admin.create_volume("thin", 64 * MIB, 2).await;
    let thick = c.admin.create_thick_volume("thick", 64 * MIB, 2).await;
    for v in [&thin, &thick] {
        c.admin.acl_add(&v.id, INI).await;
    }
    c.settle().await;
    assert_eq!(thin.target_iqn, thick.target_iqn, "volumes share a target");
    let s = login(c.a.portal(), INI, &thin.target_iqn).await;
    let (tl, kl) = (u64::from(thin.lun), u64::from(thick.lun));
    clear_ua(&s, tl).await;
    clear_ua(&s, kl).await;

    // Thin: LBPME, and UNMAP deallocates (reads back as zeros).
    assert!(lbpme(&s, tl).await, "a thin volume reports LBPME");
    let data = pattern(21, 4096);
    write(&s, tl, 64, &data).await;
    assert_eq!(unmap(&s, tl, 64).await, (0, None), "UNMAP on the thin LUN");
    assert_eq!(read(&s, tl, 64, 4096).await[..4096], [0u8; 4096][..]);

    // Thick: fully provisioned, UNMAP refused as an unsupported field, and
    // nothing changes.
    assert!(!lbpme(&s, kl).await, "a thick volume reports no LBPME");
    write(&s, kl, 64, &data).await;
    let (status, sense) = unmap(&s, kl, 64).await;
    assert_eq!(status, 2, "UNMAP on the thick LUN fails");
    assert_eq!(
        sense.map(|(k, _, _)| k),
        Some(5),
        "ILLEGAL REQUEST: {sense:?}"
    );
    assert_eq!(read(&s, kl, 64, 4096).await, data, "data kept");
}
