//! Hostile iSCSI clients against a running cluster (meta and a chunk
//! process): what one client can take from a portal is bounded, each bound
//! answers clearly and is counted, and legitimate I/O goes on meanwhile
//! (see `ironblock_target::limits`).
//!
//! - 2,000 idle connections: the chunk keeps at most 256 of them in the
//!   login phase (the oldest are evicted), its RSS stays under a printed
//!   bound, an established session's verified I/O goes on and a new login
//!   still works.
//! - A login that stalls is dropped after the chunk's `--login-timeout`.
//! - 64 WRITE commands claiming 4 GiB each get CHECK CONDITION (INVALID
//!   FIELD IN CDB) at once, without a buffer sized from their length (RSS
//!   before and after printed).
//! - One initiator gets at most 64 connections in full feature phase; the
//!   next login fails with "out of resources" (0x0302).
//!
//! Build the binaries first: `cargo build -p ironblock-meta -p
//! ironblock-chunk`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use ironblock_proto::v1 as pb;
use ironblock_target::pdu::{op, Pdu};
use ironblock_tests::cluster::{metric_value, Admin, ChunkOptions, ChunkProcess, MetaProcess};
use ironblock_tests::initiator::{LoginFailure, LoginOptions, Session};
use ironblock_tests::scratch_dir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const INI: &str = "iqn.2026-12.dev.ironblock:hostile-legit";
const NEW: &str = "iqn.2026-12.dev.ironblock:hostile-new";
const OTHER: &str = "iqn.2026-12.dev.ironblock:hostile-other";
const BS: u32 = 512;
const MIB: u64 = 1 << 20;
const LOGIN_TIMEOUT: Duration = Duration::from_secs(3);

struct Cluster {
    _dir: tempfile::TempDir,
    _meta: MetaProcess,
    chunk: ChunkProcess,
    vol: pb::Volume,
}

async fn cluster(name: &str) -> Cluster {
    let dir = scratch_dir(name);
    let meta = MetaProcess::start(dir.path(), Duration::from_secs(3));
    let opts = ChunkOptions {
        extra_args: vec![
            "--login-timeout".into(),
            format!("{}ms", LOGIN_TIMEOUT.as_millis()),
        ],
        ..ChunkOptions::default()
    };
    let chunk = ChunkProcess::init_and_start(&meta, &dir.path().join("c"), opts);
    let mut admin: Admin = meta.admin().await;
    let vol = admin.create_volume("hostile", 64 * MIB, 1).await;
    for ini in [INI, NEW, OTHER] {
        admin.acl_add(&vol.id, ini).await;
    }
    let rev = admin.revision().await;
    assert!(
        chunk.wait_applied(rev, Duration::from_secs(20)).await,
        "the chunk did not apply revision {rev}; log:\n{}",
        chunk.log_tail()
    );
    Cluster {
        _dir: dir,
        _meta: meta,
        chunk,
        vol,
    }
}

impl Cluster {
    async fn login(&self, initiator: &str) -> Session {
        let s = Session::login(
            self.chunk.portal(),
            &LoginOptions::normal(initiator, &self.vol.target_iqn),
        )
        .await
        .unwrap_or_else(|e| panic!("login of {initiator}: {e:#}"));
        for _ in 0..4 {
            if s.test_unit_ready(u64::from(self.vol.lun))
                .await
                .unwrap()
                .status
                == 0
            {
                return s;
            }
        }
        panic!("unit attention did not clear");
    }

    /// The chunk's resident set size in bytes.
    fn rss(&self) -> u64 {
        let pid = self.chunk.pid().expect("the chunk runs");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status");
        kib * 1024
    }

    async fn refused(&self, reason: &str) -> f64 {
        let text = self.chunk.metrics_text().await;
        metric_value(
            &text,
            &format!("ironblock_target_refused_total{{reason=\"{reason}\"}}"),
        )
        .unwrap_or(0.0)
    }
}

/// Write a pattern at `lba` and read it back.
async fn verified_io(s: &Session, lun: u64, lba: u64, seed: u8) {
    let data = Bytes::from(
        (0..64 * 1024)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect::<Vec<u8>>(),
    );
    let w = s.write16(lun, lba, data.clone(), BS).await.unwrap();
    assert_eq!(w.status, 0, "write: sense {:?}", w.sense_key());
    let r = s
        .read16(lun, lba, (data.len() as u32) / BS, BS)
        .await
        .unwrap();
    assert_eq!(r.status, 0, "read: sense {:?}", r.sense_key());
    assert_eq!(r.data, data, "read back what was written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_idle_connections_leave_legitimate_io_working() {
    let c = cluster("hostile-idle").await;
    let lun = u64::from(c.vol.lun);
    let s = c.login(INI).await;
    verified_io(&s, lun, 0, 1).await;
    let before = c.rss();

    let mut idle = Vec::with_capacity(2000);
    for i in 0..2000 {
        match tokio::net::TcpStream::connect(c.chunk.portal()).await {
            Ok(t) => idle.push(t),
            Err(e) => panic!("connect {i}: {e}"),
        }
    }
    // The chunk accepted them all and evicted the oldest beyond 256.
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.refused("login_evicted").await < (2000 - 256) as f64 {
        assert!(
            Instant::now() < deadline,
            "evictions: {} of at least {}",
            c.refused("login_evicted").await,
            2000 - 256
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let logging_in = metric_value(
        &c.chunk.metrics_text().await,
        "ironblock_target_login_connections",
    )
    .unwrap_or(-1.0);
    assert!(
        (0.0..=256.0).contains(&logging_in),
        "connections in the login phase: {logging_in}"
    );
    // The established session's I/O goes on, and a new login works.
    verified_io(&s, lun, 1024, 2).await;
    let fresh = c.login(NEW).await;
    fresh.test_unit_ready(lun).await.unwrap();
    let after = c.rss();
    let bound = before + 64 * MIB;
    println!(
        "2000 idle connections: chunk RSS {:.1} MiB before, {:.1} MiB after (bound {:.1} MiB); {} evicted, {} in the login phase",
        before as f64 / MIB as f64,
        after as f64 / MIB as f64,
        bound as f64 / MIB as f64,
        c.refused("login_evicted").await,
        logging_in
    );
    assert!(after < bound, "RSS {after} over the bound {bound}");
    drop(idle);
}

#[tokio::test]
async fn a_stalled_login_is_dropped_after_the_login_timeout() {
    let c = cluster("hostile-slow").await;
    let mut t = tokio::net::TcpStream::connect(c.chunk.portal())
        .await
        .unwrap();
    // Half a Login Request header, then nothing.
    let mut bhs = [0u8; 48];
    bhs[0] = 0x43;
    bhs[1] = 0x81;
    t.write_all(&bhs[..20]).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(LOGIN_TIMEOUT + Duration::from_secs(10), t.read(&mut buf))
        .await
        .expect("the chunk closes a stalled login within its timeout (+10 s)")
        .unwrap_or(0);
    let took = started.elapsed();
    println!("a stalled login was closed after {took:.2?} (login timeout {LOGIN_TIMEOUT:?})");
    assert_eq!(n, 0, "closed, nothing answered");
    assert!(
        took + Duration::from_millis(200) >= LOGIN_TIMEOUT,
        "closed after {took:?}, before the {LOGIN_TIMEOUT:?} timeout"
    );
    assert_eq!(c.refused("login_timeout").await, 1.0);
}

#[tokio::test]
async fn writes_claiming_4_gib_are_refused_without_allocation() {
    let c = cluster("hostile-edtl").await;
    let lun = u64::from(c.vol.lun);
    let s = c.login(INI).await;
    verified_io(&s, lun, 0, 3).await;
    let before = c.rss();
    for i in 0..64u64 {
        // WRITE(16) of 8 Mi blocks (4 GiB) with no data attached.
        let mut p = Pdu::new(op::SCSI_COMMAND);
        p.set_flags(0x80 | 0x20 | 0x01);
        p.set_lun_raw(ironblock_target::pdu::encode_lun(lun));
        let mut cdb = [0u8; 16];
        cdb[0] = 0x8a;
        cdb[2..10].copy_from_slice(&(i * 8).to_be_bytes());
        cdb[10..14].copy_from_slice(&(8u32 << 20).to_be_bytes());
        p.bhs[32..48].copy_from_slice(&cdb);
        p.set_u32(20, u32::MAX);
        let r = tokio::time::timeout(Duration::from_secs(10), s.request(p, Bytes::new(), false))
            .await
            .expect("answered at once, not after waiting for 4 GiB of data")
            .unwrap();
        assert_eq!(r.status, 2, "CHECK CONDITION");
        assert_eq!(r.sense_key(), Some((5, 0x24, 0)), "INVALID FIELD IN CDB");
    }
    let after = c.rss();
    println!(
        "64 WRITEs claiming 4 GiB each: chunk RSS {:.1} MiB before, {:.1} MiB after",
        before as f64 / MIB as f64,
        after as f64 / MIB as f64
    );
    assert!(
        after < before + 32 * MIB,
        "RSS grew from {before} to {after}"
    );
    assert_eq!(c.refused("write_too_long").await, 64.0);
    // The session is intact.
    verified_io(&s, lun, 2048, 4).await;
}

#[tokio::test]
async fn one_initiator_gets_at_most_64_connections() {
    let c = cluster("hostile-conns").await;
    let mut sessions = Vec::new();
    for _ in 0..64 {
        sessions.push(
            Session::login(
                c.chunk.portal(),
                &LoginOptions::normal(INI, &c.vol.target_iqn),
            )
            .await
            .expect("a login within the bound"),
        );
    }
    let e = Session::login(
        c.chunk.portal(),
        &LoginOptions::normal(INI, &c.vol.target_iqn),
    )
    .await
    .err()
    .expect("the 65th connection of one initiator is refused");
    let f = e.downcast::<LoginFailure>().expect("a login status");
    assert_eq!((f.class, f.detail), (3, 2), "out of resources: {f}");
    assert_eq!(c.refused("initiator_connections").await, 1.0);
    // Another initiator is not affected, and a freed place is usable again.
    let other = c.login(OTHER).await;
    verified_io(&other, u64::from(c.vol.lun), 0, 5).await;
    sessions.pop().unwrap().logout().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Session::login(
            c.chunk.portal(),
            &LoginOptions::normal(INI, &c.vol.target_iqn),
        )
        .await
        {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("the freed place was not given back: {e:#}"),
        }
    }
}
