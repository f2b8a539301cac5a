//! The redirector with real processes on 127.0.0.x: `ironblock-meta`, chunk
//! processes and `ironblock-redirector` instances serving a VIP portal on
//! 127.0.0.100 (see `ironblock_tests::cluster`; the redirector harness is in
//! this file).
//!
//! - libiscsi's `iscsi-ls -s` and `iscsi-inq` against the VIP follow the
//!   login redirect and work, and the chunk that served each login is the one
//!   the rendezvous hash picks (redirector and chunk login metrics).
//! - Two redirectors: exactly one holds the lease and serves the VIP; after
//!   `kill -9` of the holder the other takes over (the takeover time is
//!   printed), new logins work again and a session established before is
//!   untouched.
//!
//! Build the binaries first: `cargo build -p ironblock-meta -p
//! ironblock-chunk -p ironblock-redirector`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ironblock_proto::v1 as pb;
use ironblock_tests::cluster::{start_chunks, Admin, ChunkOptions, ChunkProcess, MetaProcess};
use ironblock_tests::initiator::{LoginFailure, LoginOptions, Session};
use ironblock_tests::redirector::{
    chunk_logins, run_tool, settle, vip_addr, wait_for, RedirectorProcess,
};
use ironblock_tests::{iscsi_url, scratch_dir};

const INITIATORS: [&str; 3] = [
    "iqn.2026-11.dev.ironblock:redir-a",
    "iqn.2026-11.dev.ironblock:redir-b",
    "iqn.2026-11.dev.ironblock:redir-c",
];

/// Log in through the VIP: expect a redirect, follow it. Returns the chunk
/// portal and the session.
async fn login_via(vip: SocketAddr, initiator: &str, iqn: &str) -> (SocketAddr, Session) {
    let e = Session::login(vip, &LoginOptions::normal(initiator, iqn))
        .await
        .err()
        .expect("a login on the VIP is redirected, never accepted");
    let f = e
        .downcast::<LoginFailure>()
        .expect("a login status from the redirector");
    assert_eq!(
        (f.class, f.detail),
        (0x01, 0x01),
        "moved temporarily: {f:?}"
    );
    let to: SocketAddr = f
        .text
        .iter()
        .find(|(k, _)| k == "TargetAddress")
        .map(|(_, v)| v.parse().expect("TargetAddress host:port"))
        .expect("TargetAddress in the redirect");
    let s = Session::login(to, &LoginOptions::normal(initiator, iqn))
        .await
        .expect("login on the chunk the redirect named");
    (to, s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libiscsi_follows_the_vip_redirect_to_the_hashed_chunk() {
    let dir = scratch_dir("redir-libiscsi");
    let meta = MetaProcess::start(dir.path(), Duration::from_secs(3));
    let chunks = start_chunks(&meta, dir.path(), 3);
    let mut admin = meta.admin().await;
    // One volume per initiator: initiators that share a LUN are one
    // sharing group and would all go to one chunk (see the redirector's
    // `view::sharing_groups`); alone on their LUNs each hashes on its own.
    // Initiator names are picked so that each hashes to a different chunk
    // (the target IQN embeds the random cluster id): the kill below then
    // always has initiators that must stay where they are.
    let ids: Vec<u64> = chunks.iter().map(|c| c.chunk_id()).collect();
    let mut vols = Vec::new();
    let mut names = Vec::new();
    for k in 0..3 {
        let v = admin
            .create_volume(&format!("redir-vol-{k}"), 64 << 20, 2)
            .await;
        let name = (0..1000)
            .map(|n| format!("iqn.2026-11.dev.ironblock:redir-{k}-{n}"))
            .find(|name| {
                ironblock_redirector::hash::choose(name, &v.target_iqn, ids.clone()) == Some(ids[k])
            })
            .expect("a name hashing to each chunk");
        admin.acl_add(&v.id, &name).await;
        vols.push(v);
        names.push(name);
    }
    let initiators: Vec<&str> = names.iter().map(String::as_str).collect();
    let vol = vols[0].clone();
    settle(&mut admin, &chunks).await;

    let vip = vip_addr();
    let r = RedirectorProcess::start(&meta, vip, "r1", dir.path());
    assert!(
        wait_for(Duration::from_secs(15), || async {
            r.metric("ironblock_redirector_lease_held").await == Some(1.0)
                && r.metric("ironblock_redirector_live_chunks").await == Some(3.0)
        })
        .await,
        "redirector did not take the VIP with 3 live chunks; log:\n{}",
        r.log_tail()
    );

    // Discovery + login of every target (-s), through the VIP.
    let portal_url = format!("iscsi://{vip}");
    let (ok, text) = run_tool("iscsi-ls", &["-s", "-i", initiators[0], &portal_url]);
    assert!(
        ok,
        "iscsi-ls failed:\n{text}\nredirector log:\n{}",
        r.log_tail()
    );
    assert!(text.contains(&vol.target_iqn), "target missing:\n{text}");
    assert!(
        text.contains(&format!("Lun:{}", vol.lun)),
        "LUN missing:\n{text}"
    );
    println!("iscsi-ls -s via {vip}:\n{text}");
    // An initiator outside the ACL discovers nothing.
    let (_, text) = run_tool(
        "iscsi-ls",
        &["-i", "iqn.2026-11.dev.ironblock:nobody", &portal_url],
    );
    assert!(
        !text.contains(&vol.target_iqn),
        "masked target listed:\n{text}"
    );

    let mut expected_logins = vec![0.0; chunks.len()];
    // iscsi-ls -s logged in once as initiators[0].
    let first = ironblock_redirector::hash::choose(initiators[0], &vol.target_iqn, ids.clone())
        .expect("a chunk");
    expected_logins[ids.iter().position(|c| *c == first).expect("known chunk")] += 1.0;
    for (i, vol) in initiators.iter().copied().zip(&vols) {
        let url = iscsi_url(vip, &vol.target_iqn, vol.lun, None, &[]);
        let (ok, text) = run_tool("iscsi-inq", &["-i", i, &url]);
        assert!(
            ok,
            "iscsi-inq as {i} failed:\n{text}\nredirector log:\n{}",
            r.log_tail()
        );
        let want =
            ironblock_redirector::hash::choose(i, &vol.target_iqn, ids.clone()).expect("a chunk");
        expected_logins[ids.iter().position(|c| *c == want).expect("known chunk")] += 1.0;
        println!("{i} -> chunk {want}");
    }
    for (k, c) in chunks.iter().enumerate() {
        let redirected = r
            .metric(&format!(
                "ironblock_redirector_redirects_total{{chunk=\"{}\"}}",
                c.chunk_id()
            ))
            .await
            .unwrap_or(0.0);
        let served = chunk_logins(c).await;
        println!(
            "chunk {}: redirected {redirected}, logins served {served}, expected {}",
            c.chunk_id(),
            expected_logins[k]
        );
        assert_eq!(
            redirected,
            expected_logins[k],
            "redirects to chunk {}",
            c.chunk_id()
        );
        assert_eq!(
            served,
            expected_logins[k],
            "logins served by chunk {}",
            c.chunk_id()
        );
    }
    // kill -9 the chunk initiators[2] was sent to: once meta declares it
    // dead the redirector leaves it out, and only its initiators move.
    let mut chunks = chunks;
    let victim_id =
        ironblock_redirector::hash::choose(initiators[2], &vols[2].target_iqn, ids.clone())
            .expect("a chunk");
    let victim = ids
        .iter()
        .position(|c| *c == victim_id)
        .expect("known chunk");
    let victim_before = r
        .metric(&format!(
            "ironblock_redirector_redirects_total{{chunk=\"{victim_id}\"}}"
        ))
        .await;
    chunks[victim].kill9();
    let killed = Instant::now();
    assert!(
        wait_for(Duration::from_secs(15), || async {
            r.metric("ironblock_redirector_live_chunks").await == Some(2.0)
        })
        .await,
        "the redirector still counts the dead chunk; log:\n{}",
        r.log_tail()
    );
    println!(
        "chunk {victim_id} left out of the redirects {:.2} s after kill -9 (meta liveness 3 s)",
        killed.elapsed().as_secs_f64()
    );
    let left: Vec<u64> = ids.iter().copied().filter(|c| *c != victim_id).collect();
    let mut stayed = 0;
    for (i, vol) in initiators.iter().copied().zip(&vols) {
        let before = ironblock_redirector::hash::choose(i, &vol.target_iqn, ids.clone());
        let now = ironblock_redirector::hash::choose(i, &vol.target_iqn, left.clone());
        if before != Some(victim_id) {
            assert_eq!(now, before, "{i} moved although its chunk lives");
            stayed += 1;
        }
        let want = now.expect("a chunk");
        let key = format!("ironblock_redirector_redirects_total{{chunk=\"{want}\"}}");
        let was = r.metric(&key).await.unwrap_or(0.0);
        let url = iscsi_url(vip, &vol.target_iqn, vol.lun, None, &[]);
        let (ok, text) = run_tool("iscsi-inq", &["-i", i, &url]);
        assert!(ok, "iscsi-inq as {i} after the chunk died:\n{text}");
        assert_eq!(
            r.metric(&key).await,
            Some(was + 1.0),
            "{i} not sent to chunk {want}"
        );
        println!("{i} -> chunk {want} after chunk {victim_id} died");
    }
    assert_eq!(stayed, 2, "two initiators were on surviving chunks");
    assert_eq!(
        r.metric(&format!(
            "ironblock_redirector_redirects_total{{chunk=\"{victim_id}\"}}"
        ))
        .await,
        victim_before,
        "a login was sent to the dead chunk"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_vip_holder_hands_the_vip_to_the_other_redirector() {
    let dir = scratch_dir("redir-failover");
    let meta = MetaProcess::start(dir.path(), Duration::from_secs(3));
    let chunks = vec![ChunkProcess::init_and_start(
        &meta,
        &dir.path().join("chunk-1"),
        ChunkOptions::default(),
    )];
    let mut admin = meta.admin().await;
    let vol = admin.create_volume("failover-vol", 64 << 20, 1).await;
    for i in INITIATORS {
        admin.acl_add(&vol.id, i).await;
    }
    settle(&mut admin, &chunks).await;

    let vip = vip_addr();
    let mut rs = [
        RedirectorProcess::start(&meta, vip, "ra", dir.path()),
        RedirectorProcess::start(&meta, vip, "rb", dir.path()),
    ];
    let lease = |admin: &mut Admin| {
        let mut c = admin.client().clone();
        async move {
            c.get_vip_lease(pb::GetVipLeaseRequest {
                vip: vip.to_string(),
            })
            .await
            .expect("GetVipLease")
            .into_inner()
        }
    };
    let mut holder = None;
    for _ in 0..150 {
        let mut held = 0;
        for (k, r) in rs.iter().enumerate() {
            if r.metric("ironblock_redirector_lease_held").await == Some(1.0) {
                held += 1;
                holder = Some(k);
            }
        }
        assert!(held <= 1, "two redirectors serve the VIP");
        if held == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let h = holder.expect("a redirector holds the VIP within 15 s");
    let other = 1 - h;
    let l = lease(&mut admin).await;
    assert!(l.held);
    assert_eq!(l.holder, rs[h].name());
    // Stays that way across several renewals; the standby is refused.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        rs[h].metric("ironblock_redirector_lease_held").await,
        Some(1.0)
    );
    assert_eq!(
        rs[other].metric("ironblock_redirector_lease_held").await,
        Some(0.0)
    );
    assert_eq!(
        lease(&mut admin).await.token,
        l.token,
        "renewals keep the token"
    );

    // A session established through the VIP before the failover.
    let (chunk_portal, session) = login_via(vip, INITIATORS[0], &vol.target_iqn).await;
    assert_eq!(chunk_portal, chunks[0].portal());
    let url = iscsi_url(vip, &vol.target_iqn, vol.lun, None, &[]);
    let (ok, text) = run_tool("iscsi-inq", &["-i", INITIATORS[1], &url]);
    assert!(ok, "iscsi-inq before failover:\n{text}");

    let killed = Instant::now();
    rs[h].kill9();
    let mut lease_at = None;
    let mut login_at = None;
    let deadline = killed + Duration::from_secs(15);
    while Instant::now() < deadline && login_at.is_none() {
        if lease_at.is_none()
            && rs[other].metric("ironblock_redirector_lease_held").await == Some(1.0)
        {
            lease_at = Some(killed.elapsed());
        }
        if lease_at.is_some() {
            let (ok, _) = run_tool("iscsi-inq", &["-i", INITIATORS[2], &url]);
            if ok {
                login_at = Some(killed.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let lease_at = lease_at.unwrap_or_else(|| {
        panic!(
            "the standby did not take the VIP within 15 s; log:\n{}",
            rs[other].log_tail()
        )
    });
    let login_at = login_at.unwrap_or_else(|| {
        panic!(
            "no login through the VIP within 15 s of the kill; log:\n{}",
            rs[other].log_tail()
        )
    });
    println!(
        "VIP takeover after kill -9 of the holder: serving after {:.3} s, first new login after {:.3} s (goal < 3 s)",
        lease_at.as_secs_f64(),
        login_at.as_secs_f64()
    );
    let l2 = lease(&mut admin).await;
    assert!(l2.held);
    assert_eq!(l2.holder, rs[other].name());
    assert!(
        l2.token > l.token,
        "a new tenure has a higher fencing token"
    );
    assert!(
        login_at < Duration::from_secs(10),
        "takeover took {login_at:?}"
    );
    // The established session (on the chunk) never noticed.
    let tur = session
        .test_unit_ready(u64::from(vol.lun))
        .await
        .expect("TUR");
    assert!(
        tur.status == 0 || tur.status == 2,
        "session still answers: {tur:?}"
    );
    let tur = session
        .test_unit_ready(u64::from(vol.lun))
        .await
        .expect("TUR");
    assert_eq!(tur.status, 0, "session still works after the failover");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vip_is_released_when_meta_is_gone_for_a_ttl_and_taken_again_after() {
    let dir = scratch_dir("redir-metaloss");
    let mut meta = MetaProcess::start(dir.path(), Duration::from_secs(3));
    let chunks = vec![ChunkProcess::init_and_start(
        &meta,
        &dir.path().join("chunk-1"),
        ChunkOptions::default(),
    )];
    let mut admin = meta.admin().await;
    let vol = admin.create_volume("metaloss-vol", 64 << 20, 1).await;
    admin.acl_add(&vol.id, INITIATORS[0]).await;
    settle(&mut admin, &chunks).await;
    drop(admin);

    let vip = vip_addr();
    let r = RedirectorProcess::start(&meta, vip, "solo", dir.path());
    assert!(
        wait_for(Duration::from_secs(15), || async {
            r.metric("ironblock_redirector_lease_held").await == Some(1.0)
                && r.metric("ironblock_redirector_live_chunks").await == Some(1.0)
        })
        .await,
        "redirector did not take the VIP; log:\n{}",
        r.log_tail()
    );
    let token = r
        .metric("ironblock_redirector_lease_token")
        .await
        .expect("token");
    // An open discovery session on the VIP.
    let disc = Session::login(vip, &LoginOptions::discovery(INITIATORS[0]))
        .await
        .expect("discovery login on the VIP");
    let found = disc.send_targets("All").await.expect("SendTargets");
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].0, vol.target_iqn);
    assert_eq!(
        found[0].1,
        vec![format!("{vip},1")],
        "the VIP is the portal"
    );

    // Meta gone: within the ttl (2 s) plus a renewal period the VIP is
    // released, its listener closed and its session ended.
    meta.kill9();
    let lost = Instant::now();
    assert!(
        wait_for(Duration::from_secs(5), || async {
            r.metric("ironblock_redirector_lease_held").await == Some(0.0)
        })
        .await,
        "the VIP was kept without meta; log:\n{}",
        r.log_tail()
    );
    let released = lost.elapsed();
    println!(
        "VIP released {:.3} s after meta died (ttl 2 s)",
        released.as_secs_f64()
    );
    assert!(
        released <= Duration::from_millis(2900),
        "released after {released:?}"
    );
    assert!(
        tokio::net::TcpStream::connect(vip).await.is_err(),
        "the VIP still accepts connections"
    );
    assert!(
        wait_for(Duration::from_secs(5), || async {
            disc.send_targets("All").await.is_err()
        })
        .await,
        "the discovery session survived the lease loss"
    );
    assert_eq!(
        r.metric("ironblock_redirector_lease_losses_total").await,
        Some(1.0)
    );

    // Meta back (same port and data): the redirector takes the VIP again,
    // under a higher fencing token.
    meta.restart();
    assert!(
        wait_for(Duration::from_secs(15), || async {
            r.metric("ironblock_redirector_lease_held").await == Some(1.0)
        })
        .await,
        "the VIP was not taken again after meta came back; log:\n{}",
        r.log_tail()
    );
    let token2 = r
        .metric("ironblock_redirector_lease_token")
        .await
        .expect("token");
    assert!(token2 > token, "token {token2} after {token}");
    let url = iscsi_url(vip, &vol.target_iqn, vol.lun, None, &[]);
    let mut ok = false;
    for _ in 0..50 {
        if run_tool("iscsi-inq", &["-i", INITIATORS[0], &url]).0 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ok, "no login through the VIP after meta came back");
}
