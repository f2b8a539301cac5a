//! What meta acknowledges is in force on every portal when the call
//! returns, with real processes on 127.0.0.x: `ironblock-meta`, three chunk
//! processes and a redirector serving a VIP portal on 127.0.0.100.
//!
//! - 100 times: `AclAdd` of a new initiator, then at once discovery through
//!   the VIP and a login + INQUIRY through every chunk portal: 0 misses.
//! - 100 times: `AclRemove` of one of them, then at once READ and WRITE
//!   through the sessions it had open on every chunk, a new login on every
//!   chunk, and discovery through the VIP: 0 successes. The open sessions
//!   see REPORTED LUNS DATA HAS CHANGED, then LOGICAL UNIT NOT SUPPORTED.
//!
//! Neither loop waits for anything between the call and the checks: the
//! call's return is the only synchronisation. (Checked against the wait
//! taken out of meta: both loops then miss; see ARCHITECTURE.md.)

use std::time::Instant;

use bytes::Bytes;
use ironblock_tests::initiator::{LoginOptions, Session};
use ironblock_tests::portals::{
    discovery_lists, inquiry_sees_the_lun, login_sees_the_lun, summary, VipCluster,
};
use ironblock_tests::scratch_dir;

const LOOPS: usize = 100;
const BS: u32 = 512;
const MIB: u64 = 1 << 20;

fn initiator(k: usize) -> String {
    format!("iqn.2026-12.dev.ironblock:in-force-{k:03}")
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_changes_are_in_force_on_every_portal_when_the_call_returns() {
    let dir = scratch_dir("in-force");
    let c = VipCluster::start(dir.path(), "in-force-r1").await;
    let (chunks, vip) = (&c.chunks, c.vip);
    let mut admin = c.meta.admin().await;
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
        for chunk in chunks {
            let at = format!("{ini} on chunk {}", chunk.chunk_id());
            match login_sees_the_lun(chunk.portal(), &ini, &target, lun).await {
                Err(e) => misses.push(format!("{at}: {e}")),
                Ok(s) => {
                    if let Err(e) = clear_ua(&s, lun).await {
                        misses.push(format!("{at}: {e}"));
                    }
                    sessions.push(s);
                }
            }
        }
        open.push((ini, sessions));
    }
    println!("AclAdd: {}", summary(add_took));
    assert!(
        misses.is_empty(),
        "{} of {} checks right after AclAdd missed the LUN: {:#?}\n{}",
        misses.len(),
        LOOPS * (1 + chunks.len()),
        misses,
        c.logs()
    );

    // Remove: gone everywhere the moment the call returns, open sessions
    // included.
    let mut leaks = Vec::new();
    let mut unexpected = Vec::new();
    let mut remove_took = Vec::new();
    let data = Bytes::from(vec![0x5a; BS as usize]);
    for (ini, sessions) in &open {
        assert_eq!(sessions.len(), chunks.len());
        let t = Instant::now();
        admin.acl_remove(&v.id, ini).await;
        remove_took.push(t.elapsed());
        for (s, chunk) in sessions.iter().zip(chunks) {
            let at = format!("{ini} on chunk {}", chunk.chunk_id());
            // The open session: REPORTED LUNS DATA HAS CHANGED, then
            // LOGICAL UNIT NOT SUPPORTED (or the session is gone).
            let read = s.read16(lun, 0, 1, BS).await;
            let write = s.write16(lun, 8, data.clone(), BS).await;
            match (&read, &write) {
                (Ok(r), _) if r.status == 0 => {
                    leaks.push(format!("{at}: READ through the open session succeeded"))
                }
                (_, Ok(w)) if w.status == 0 => {
                    leaks.push(format!("{at}: WRITE through the open session succeeded"))
                }
                (Ok(r), Ok(w))
                    if r.sense_key() == Some((6, 0x3f, 0x0e))
                        && w.sense_key() == Some((5, 0x25, 0)) => {}
                (Err(_), Err(_)) => {}
                (r, w) => unexpected.push(format!(
                    "{at}: READ {:?}, then WRITE {:?}",
                    r.as_ref().map(|r| r.sense_key()).map_err(|e| e.to_string()),
                    w.as_ref().map(|w| w.sense_key()).map_err(|e| e.to_string()),
                )),
            }
            if let Ok(s) = Session::login(chunk.portal(), &LoginOptions::normal(ini, &target)).await
            {
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
    println!("AclRemove: {}", summary(remove_took));
    assert!(
        leaks.is_empty(),
        "{} checks right after AclRemove still reached the LUN: {:#?}\n{}",
        leaks.len(),
        leaks,
        c.logs()
    );
    assert!(
        unexpected.is_empty(),
        "open sessions that lost the LUN did not see REPORTED LUNS DATA HAS CHANGED, then \
         LOGICAL UNIT NOT SUPPORTED: {unexpected:#?}\n{}",
        c.logs()
    );
}
