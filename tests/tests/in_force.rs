//! What meta acknowledges is in force on every portal when the call
//! returns, with real processes on 127.0.0.x: `ironblock-meta`, three chunk
//! processes and a redirector serving a VIP portal on 127.0.0.100.
//!
//! - 100 times: `AclAdd` of a new initiator, then at once discovery through
//!   the VIP and a login + INQUIRY through every chunk portal: 0 misses.
//! - 100 times: `AclRemove` of one of them, then at once READ and WRITE
//!   through the sessions it had open on every chunk, a new login on every
//!   chunk, and discovery through the VIP: 0 successes. The open sessions
//!   see LOGICAL UNIT NOT SUPPORTED (or are dropped).
//!
//! Neither loop waits for anything between the call and the checks: the
//! call's return is the only synchronisation. (Checked against the wait
//! taken out of meta: both loops then miss; see ARCHITECTURE.md.)

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ironblock_tests::cluster::{start_chunks, ChunkProcess, MetaProcess};
use ironblock_tests::initiator::{LoginOptions, Session};
use ironblock_tests::redirector::{vip_addr, RedirectorProcess};
use ironblock_tests::scratch_dir;

const LOOPS: usize = 100;
const BS: u32 = 512;
const MIB: u64 = 1 << 20;

fn initiator(k: usize) -> String {
    format!("iqn.2026-12.dev.ironblock:in-force-{k:03}")
}

/// INQUIRY (standard data): the LUN is there for this initiator
/// (peripheral qualifier 0, direct-access device), not masked.
async fn inquiry_sees_the_lun(s: &Session, lun: u64) -> Result<(), String> {
    let r = s
        .scsi(lun, &[0x12, 0, 0, 0, 96, 0], Bytes::new(), 96)
        .await
        .map_err(|e| format!("INQUIRY failed: {e:#}"))?;
    match (r.status, r.data.first()) {
        (0, Some(0x00)) => Ok(()),
        (st, b) => Err(format!("INQUIRY status {st}, byte 0 {b:?}")),
    }
}

/// Clear the power-on unit attention of a new session.
async fn clear_ua(s: &Session, lun: u64) -> Result<(), String> {
    for _ in 0..4 {
        match s.test_unit_ready(lun).await {
            Ok(r) if r.status == 0 => return Ok(()),
            Ok(_) => {}
            Err(e) => return Err(format!("TEST UNIT READY failed: {e:#}")),
        }
    }
    Err("the unit attention did not clear".into())
}

/// Whether discovery through `vip` as `ini` lists `target`.
async fn discovery_lists(vip: SocketAddr, ini: &str, target: &str) -> Result<bool, String> {
    let d = Session::login(vip, &LoginOptions::discovery(ini))
        .await
        .map_err(|e| format!("discovery login failed: {e:#}"))?;
    let found = d
        .send_targets("All")
        .await
        .map_err(|e| format!("SendTargets failed: {e:#}"))?;
    Ok(found.iter().any(|(t, _)| t == target))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn show(what: &str, mut d: Vec<Duration>) {
    d.sort();
    println!(
        "{what}: p50 {:?}, p99 {:?}, max {:?} over {}",
        percentile(&d, 0.5),
        percentile(&d, 0.99),
        d.last().copied().unwrap_or_default(),
        d.len()
    );
}

fn logs(meta: &MetaProcess, chunks: &[ChunkProcess], r: &RedirectorProcess) -> String {
    let mut s = format!("meta log:\n{}\n", meta.log_tail());
    for c in chunks {
        s += &format!("chunk {} log:\n{}\n", c.chunk_id(), c.log_tail());
    }
    s + &format!("redirector log:\n{}", r.log_tail())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_changes_are_in_force_on_every_portal_when_the_call_returns() {
    let dir = scratch_dir("in-force");
    let meta = MetaProcess::start(dir.path(), Duration::from_secs(3));
    let chunks = start_chunks(&meta, dir.path(), 3);
    let vip = vip_addr();
    let redir = RedirectorProcess::start(&meta, vip, "in-force-r1", dir.path());
    assert!(
        redir.wait_serving(3, Duration::from_secs(30)).await,
        "the redirector did not serve the VIP with 3 chunks:\n{}",
        redir.log_tail()
    );
    let mut admin = meta.admin().await;
    let v = admin.create_volume("in-force", 64 * MIB, 2).await;
    let lun = u64::from(v.lun);
    let target = v.target_iqn.clone();

    // Add: visible everywhere the moment the call returns.
    let mut misses = Vec::new();
    let mut add_took = Vec::new();
    let mut open: Vec<(String, Vec<Session>)> = Vec::new();
    for k in 0..LOOPS {
        let ini = initiator(k);
        let t = Instant::now();
        admin.acl_add(&v.id, &ini).await;
        add_took.push(t.elapsed());
        match discovery_lists(vip, &ini, &target).await {
            Ok(true) => {}
            Ok(false) => misses.push(format!("{ini}: discovery through the VIP lists nothing")),
            Err(e) => misses.push(format!("{ini}: VIP: {e}")),
        }
        let mut sessions = Vec::new();
        for c in &chunks {
            let at = format!("{ini} on chunk {}", c.chunk_id());
            match Session::login(c.portal(), &LoginOptions::normal(&ini, &target)).await {
                Err(e) => misses.push(format!("{at}: login refused: {e:#}")),
                Ok(s) => {
                    if let Err(e) = inquiry_sees_the_lun(&s, lun).await {
                        misses.push(format!("{at}: {e}"));
                    } else if let Err(e) = clear_ua(&s, lun).await {
                        misses.push(format!("{at}: {e}"));
                    }
                    sessions.push(s);
                }
            }
        }
        open.push((ini, sessions));
    }
    show("AclAdd", add_took);
    assert!(
        misses.is_empty(),
        "{} of {} checks right after AclAdd missed the LUN: {:#?}\n{}",
        misses.len(),
        LOOPS * (1 + chunks.len()),
        misses,
        logs(&meta, &chunks, &redir)
    );

    // Remove: gone everywhere the moment the call returns, open sessions
    // included.
    let mut leaks = Vec::new();
    let mut remove_took = Vec::new();
    let data = Bytes::from(vec![0x5a; BS as usize]);
    for (ini, sessions) in &open {
        assert_eq!(sessions.len(), chunks.len());
        let t = Instant::now();
        admin.acl_remove(&v.id, ini).await;
        remove_took.push(t.elapsed());
        for (s, c) in sessions.iter().zip(&chunks) {
            let at = format!("{ini} on chunk {}", c.chunk_id());
            if let Ok(r) = s.read16(lun, 0, 1, BS).await {
                if r.status == 0 {
                    leaks.push(format!("{at}: READ through the open session succeeded"));
                } else if r.sense_key().map(|k| (k.1, k.2)) != Some((0x25, 0)) {
                    // Anything but GOOD is refused; name what it was.
                    println!("{at}: READ refused with {:?}", r.sense_key());
                }
            }
            if let Ok(r) = s.write16(lun, 8, data.clone(), BS).await {
                if r.status == 0 {
                    leaks.push(format!("{at}: WRITE through the open session succeeded"));
                }
            }
            if let Ok(s) = Session::login(c.portal(), &LoginOptions::normal(ini, &target)).await {
                if inquiry_sees_the_lun(&s, lun).await.is_ok() {
                    leaks.push(format!("{at}: a new login sees the LUN"));
                }
            }
        }
        if let Ok(true) = discovery_lists(vip, ini, &target).await {
            leaks.push(format!(
                "{ini}: discovery through the VIP still lists the target"
            ));
        }
    }
    show("AclRemove", remove_took);
    assert!(
        leaks.is_empty(),
        "{} checks right after AclRemove still reached the LUN: {:#?}\n{}",
        leaks.len(),
        leaks,
        logs(&meta, &chunks, &redir)
    );
}
