//! Soak: loaded I/O with no fault at all, on the product's default failure
//! detection (meta's 3 s liveness timeout, the chunks' replica hang
//! detection, a meta group of three voters with the default election
//! timeout). Whatever fails over here is a false positive.
//!
//! The cluster: three metas, three chunks, two redirectors on the VIP
//! 127.0.0.100, an RF=2 volume; the load: the chaos suites' four verifying
//! writers through the VIP (`tests/src/chaos.rs`), as fast as they go, which
//! keeps this 2-core machine busy. Every second the test asks meta how many
//! chunks are alive and which member leads.
//!
//! Printed: writes acknowledged, and the count of failovers of every kind:
//! chunks declared dead, replica-set members removed
//! (`ironblock_chunk_volume_member_removals_total`), replica calls that
//! found a peer hung or were abandoned, failed writes and extra logins of
//! the load, meta leader changes. The test fails unless every count is 0
//! and every acknowledged write reads back through the VIP and through each
//! chunk.
//!
//! Short form: 60 s. `IRONBLOCK_LONG=1`: 10 minutes
//! (`IRONBLOCK_SOAK_SECS=<secs>` sets any length).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ironblock_tests::chaos::{
    first_login, place_extents, seed_from_env, start_group_cluster, status_report, verify_all,
    wait_full_replication, Load, Row, RF, WRITERS,
};
use ironblock_tests::cluster::{loopback_vip, ChunkProcess, RedirectorProcess};
use ironblock_tests::{long_mode, scratch_dir};

/// Meta's default liveness timeout (`ironblock-meta --liveness-timeout`).
const LIVENESS: Duration = Duration::from_secs(3);
const LEASE_TTL: Duration = Duration::from_secs(2);

fn soak_for() -> Duration {
    if let Ok(v) = std::env::var("IRONBLOCK_SOAK_SECS") {
        let secs: u64 = v
            .parse()
            .unwrap_or_else(|_| panic!("IRONBLOCK_SOAK_SECS={v:?} is not a number of seconds"));
        return Duration::from_secs(secs);
    }
    Duration::from_secs(if long_mode() { 600 } else { 60 })
}

/// Sum of the counter `name` over every chunk.
async fn chunk_counter(chunks: &[ChunkProcess], name: &str) -> u64 {
    let mut sum = 0;
    for c in chunks {
        sum += c.metric_sum(name).await;
    }
    sum
}

const COUNTERS: [&str; 3] = [
    "ironblock_chunk_volume_member_removals_total",
    "ironblock_chunk_volume_hung_calls_total",
    "ironblock_chunk_volume_abandoned_calls_total",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn loaded_io_without_faults_never_fails_over() {
    let seed = seed_from_env();
    let run_for = soak_for();
    let dir = scratch_dir("soak-");
    let chunk_dirs: Vec<_> = (1..=3)
        .map(|i| dir.path().join(format!("chunk-{i}")))
        .collect();
    let (metas, chunks, mut admin, vol) =
        start_group_cluster(dir.path(), LIVENESS, &chunk_dirs, "soak").await;
    let vip = loopback_vip();
    let _redirectors: Vec<RedirectorProcess> = ["soak-ra", "soak-rb"]
        .iter()
        .map(|n| RedirectorProcess::start_with(&metas, vip, n, dir.path(), LEASE_TTL, &[]))
        .collect();
    let lun = u64::from(vol.lun);
    let first = first_login(vip, &vol.target_iqn, lun, Duration::from_secs(20))
        .await
        .expect("a login through the VIP within 20 s");
    place_extents(&first, lun).await;
    drop(first);
    assert!(
        wait_full_replication(
            &mut admin,
            &vol.id,
            chunks.len(),
            RF,
            Duration::from_secs(30)
        )
        .await
        .is_some(),
        "not fully replicated at the start: {}",
        status_report(&mut admin, &vol.id).await
    );
    let leader0 = metas.leader().await;
    let mut before = Vec::new();
    for name in COUNTERS {
        before.push(chunk_counter(&chunks, name).await);
    }
    println!(
        "soak of {:?} (seed {seed}): 3 metas, 3 chunks, RF={RF}, liveness {LIVENESS:?}",
        run_for
    );

    let load = Load::start(
        vip,
        vol.target_iqn.clone(),
        lun,
        seed,
        run_for + Duration::from_secs(60),
    );
    let started = Instant::now();
    let (mut min_alive, mut leader_changes, mut last_leader) = (u64::MAX, 0u32, leader0);
    let mut ticks = 0u64;
    while started.elapsed() < run_for {
        tokio::time::sleep(Duration::from_secs(1)).await;
        ticks += 1;
        let st = admin.status().await;
        min_alive = min_alive.min(st.chunks_alive);
        let l = metas.leader().await;
        if l.is_some() && l != last_leader {
            leader_changes += 1;
            last_leader = l;
        }
        if ticks.is_multiple_of(60) {
            let (a, f, _) = load.totals();
            println!(
                "[{:>5.0}s] {a} acked, {f} failed, chunks alive >= {min_alive}",
                started.elapsed().as_secs_f64()
            );
        }
    }
    let mut vias: Vec<(String, SocketAddr)> = vec![("vip".into(), vip)];
    vias.extend(
        chunks
            .iter()
            .map(|c| (format!("chunk {}", c.chunk_id()), c.portal())),
    );
    let mut row = Row::new("soak");
    let verdict = verify_all(&load, &vias, &vol.target_iqn, lun, &mut row).await;
    let (acked, failed, logins) = load.totals();
    load.finish().await;
    let mut after = Vec::new();
    for name in COUNTERS {
        after.push(chunk_counter(&chunks, name).await);
    }
    let d: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    let dead = 3u64.saturating_sub(min_alive);
    let extra_logins = logins.saturating_sub(WRITERS);
    let failovers =
        dead + d.iter().sum::<u64>() + failed + extra_logins + u64::from(leader_changes);
    println!(
        "soak: {:.0}s, {acked} writes acknowledged ({:.0}/s), {} verified, {} lost; \
         failovers: {failovers} (chunks declared dead {dead}, members removed {}, calls that \
         found a peer hung {}, calls abandoned {}, failed writes {failed}, extra logins \
         {extra_logins}, meta leader changes {leader_changes})",
        started.elapsed().as_secs_f64(),
        acked as f64 / started.elapsed().as_secs_f64(),
        row.verified,
        row.lost,
        d[0],
        d[1],
        d[2],
    );
    assert!(verdict.is_none(), "{}", verdict.unwrap_or_default());
    assert_eq!(row.lost, 0);
    assert!(
        acked > 1000,
        "the load made too little progress to mean anything ({acked} acked)"
    );
    assert_eq!(
        failovers,
        0,
        "something failed over without a fault: {}\nmeta logs:\n{}",
        status_report(&mut admin, &vol.id).await,
        metas.log_tails()
    );
}
