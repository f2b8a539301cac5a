//! libiscsi through the VIP: `iscsi-ls`, `iscsi-inq` and `iscsi-test-cu -t
//! ALL` on a LUN addressed by the VIP portal (`iscsi://VIP/target/lun`) of a
//! real-process cluster (meta, 3 chunks, one `ironblock-redirector`), so
//! every login libiscsi makes is redirected and followed. The suite must
//! pass in full (the same accounting as the other conformance runs,
//! `cunit::run_suite_and_assert`), and every login must have gone to the
//! chunk the rendezvous hash picks for the LUN's sharing group: the suite
//! logs in as two initiators (`-i`, `-I`, for the reservation and
//! multi-nexus tests), both on the LUN's ACL, so both hash under the
//! smaller IQN and meet on one chunk.
//!
//! Build the binaries first: `cargo build --bins`.

use std::time::Duration;

use ironblock_tests::cluster::{start_chunks, MetaProcess};
use ironblock_tests::cunit::{self, INITIATOR_1, INITIATOR_2};
use ironblock_tests::redirector::{chunk_logins, run_tool, settle, vip_addr, RedirectorProcess};
use ironblock_tests::{iscsi_url, scratch_dir};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iscsi_test_cu_passes_through_the_vip_on_the_hashed_chunk() {
    let dir = scratch_dir("vip-conformance");
    let meta = MetaProcess::start(dir.path(), Duration::from_secs(3));
    let chunks = start_chunks(&meta, dir.path(), 3);
    let mut admin = meta.admin().await;
    let vol = admin.create_volume("vip-cu", 64 << 20, 2).await;
    admin.acl_add(&vol.id, INITIATOR_1).await;
    admin.acl_add(&vol.id, INITIATOR_2).await;
    settle(&mut admin, &chunks).await;

    let vip = vip_addr();
    let r = RedirectorProcess::start(&meta, vip, "r1", dir.path());
    assert!(
        r.wait_serving(3, Duration::from_secs(15)).await,
        "redirector did not take the VIP with 3 live chunks; log:\n{}",
        r.log_tail()
    );

    // The chunk the hash picks: both initiators share the LUN, so both
    // hash under the smaller IQN of the group.
    let ids: Vec<u64> = chunks.iter().map(|c| c.chunk_id()).collect();
    let key = std::cmp::min(
        INITIATOR_1.to_ascii_lowercase(),
        INITIATOR_2.to_ascii_lowercase(),
    );
    let want =
        ironblock_redirector::hash::choose(&key, &vol.target_iqn, ids.clone()).expect("a chunk");
    let other_key = if key == INITIATOR_1 {
        INITIATOR_2
    } else {
        INITIATOR_1
    };
    println!(
        "sharing group {{{INITIATOR_1}, {INITIATOR_2}}} -> key {key} -> chunk {want} \
         (the other name alone would hash to chunk {:?})",
        ironblock_redirector::hash::choose(other_key, &vol.target_iqn, ids.clone())
    );

    // Discovery + login (-s) through the VIP, then INQUIRY as each name.
    let (ok, text) = run_tool(
        "iscsi-ls",
        &["-s", "-i", INITIATOR_1, &format!("iscsi://{vip}")],
    );
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
    let url = iscsi_url(vip, &vol.target_iqn, vol.lun, None, &[]);
    for i in [INITIATOR_1, INITIATOR_2] {
        let (ok, text) = run_tool("iscsi-inq", &["-i", i, &url]);
        assert!(
            ok,
            "iscsi-inq as {i} failed:\n{text}\nredirector log:\n{}",
            r.log_tail()
        );
    }

    let started = std::time::Instant::now();
    cunit::run_suite_and_assert(url, "vip", || {
        format!(
            "redirector log:\n{}\nchunk {want} log:\n{}",
            r.log_tail(),
            chunks
                .iter()
                .find(|c| c.chunk_id() == want)
                .map(|c| c.log_tail())
                .unwrap_or_default()
        )
    })
    .await;
    println!(
        "iscsi-test-cu through the VIP took {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // Every login went through the VIP to the hashed chunk, and the chunk
    // served exactly those.
    let mut total = 0.0;
    for c in &chunks {
        let redirected = r.redirects_to(c.chunk_id()).await;
        let served = chunk_logins(c).await;
        println!(
            "chunk {}: logins redirected {redirected}, logins served {served}{}",
            c.chunk_id(),
            if c.chunk_id() == want {
                " (hashed)"
            } else {
                ""
            }
        );
        assert_eq!(
            served,
            redirected,
            "chunk {} served logins the redirector did not send",
            c.chunk_id()
        );
        if c.chunk_id() == want {
            total = redirected;
        } else {
            assert_eq!(redirected, 0.0, "a login went to chunk {}", c.chunk_id());
        }
    }
    // iscsi-ls -s + 2 iscsi-inq + at least one login per test.
    assert!(total > 3.0, "only {total} logins reached the hashed chunk");
    println!("{total} logins, all on the hashed chunk {want}");
    assert_eq!(
        r.metric("ironblock_redirector_logins_refused_total").await,
        Some(0.0),
        "no login was refused"
    );
}
