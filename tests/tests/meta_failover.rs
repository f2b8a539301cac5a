//! Meta as a group of three processes under a verifying load through the
//! VIP (three chunks, an RF=2 volume, two redirectors): the leader killed
//! again and again, the leader frozen, and the quorum lost.
//!
//! - `leader_kills_...`: `kill -9` the leader 5 times (seeded: the pause
//!   between kills; `CHAOS_SEED` replays a run), restarting it each time.
//!   Right after each kill, a volume create, an ACL add and a snapshot are
//!   issued; each must take effect exactly once. Printed: I/O errors the
//!   initiators saw (must be 0), acknowledged writes lost (must be 0), the
//!   longest time without a completed write (goal < 1 s, bound 2 s) and the
//!   time to a new leader (p50, max).
//! - `a_frozen_leader_...`: SIGSTOP the leader for 10 s. Another member is
//!   elected; the frozen one, resumed, serves nothing from its stale view
//!   and steps down; the two redirectors never both hold the VIP.
//! - `losing_the_quorum_...`: two of three metas killed. The chunks fence
//!   their I/O once their lease runs out (no split brain), status says the
//!   group has no quorum; with the metas back, I/O resumes and no
//!   acknowledged write is lost.
//!
//! `IRONBLOCK_LONG=1` kills the leader 20 times.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ironblock_proto::v1 as pb;
use ironblock_tests::chaos::{
    first_login, pct, place_extents, seed_from_env, start_group_cluster, status_report, verify_all,
    wait_full_replication, Load, Row, RF, WRITERS,
};
use ironblock_tests::cluster::{
    loopback_vip, Admin, ChunkProcess, MetaEndpoint, MetaGroup, RedirectorProcess,
};
use ironblock_tests::{long_mode, scratch_dir};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Meta's liveness timeout, which is also the chunks' lease.
const LIVENESS: Duration = Duration::from_secs(3);
const LEASE_TTL: Duration = Duration::from_secs(2);
/// The longest a write may wait across a leader kill.
const STALL_BOUND: f64 = 2.0;

struct Cluster {
    dir: tempfile::TempDir,
    metas: MetaGroup,
    chunks: Vec<ChunkProcess>,
    redirectors: Vec<RedirectorProcess>,
    vip: SocketAddr,
    admin: Admin,
    vol: pb::Volume,
}

impl Cluster {
    async fn start(prefix: &str) -> Cluster {
        let dir = scratch_dir(prefix);
        let chunk_dirs: Vec<_> = (1..=3)
            .map(|i| dir.path().join(format!("chunk-{i}")))
            .collect();
        let (metas, chunks, admin, vol) =
            start_group_cluster(dir.path(), LIVENESS, &chunk_dirs, "failover").await;
        let vip = loopback_vip();
        let redirectors: Vec<RedirectorProcess> = ["fo-ra", "fo-rb"]
            .iter()
            .map(|n| RedirectorProcess::start_with(&metas, vip, n, dir.path(), LEASE_TTL, &[]))
            .collect();
        let mut c = Cluster {
            dir,
            metas,
            chunks,
            redirectors,
            vip,
            admin,
            vol,
        };
        let first = first_login(c.vip, &c.vol.target_iqn, c.lun(), Duration::from_secs(20)).await;
        let first = first.unwrap_or_else(|| {
            panic!(
                "no login through the VIP {} within 20 s; redirector log:\n{}",
                c.vip,
                c.redirectors[0].log_tail()
            )
        });
        place_extents(&first, c.lun()).await;
        drop(first);
        assert!(
            c.wait_full(Duration::from_secs(30)).await,
            "not fully replicated at the start: {}",
            c.status().await
        );
        c
    }

    fn lun(&self) -> u64 {
        u64::from(self.vol.lun)
    }

    async fn status(&mut self) -> String {
        status_report(&mut self.admin, &self.vol.id).await
    }

    async fn wait_full(&mut self, timeout: Duration) -> bool {
        let n = self.chunks.len();
        wait_full_replication(&mut self.admin, &self.vol.id, n, RF, timeout)
            .await
            .is_some()
    }

    async fn verify(&mut self, load: &Load, row: &mut Row) {
        let mut vias: Vec<(String, SocketAddr)> = vec![("vip".into(), self.vip)];
        vias.extend(
            self.chunks
                .iter()
                .map(|ch| (format!("chunk {}", ch.chunk_id()), ch.portal())),
        );
        let target = self.vol.target_iqn.clone();
        if let Some(f) = verify_all(load, &vias, &target, self.lun(), row).await {
            row.failure.get_or_insert(f);
        }
    }

    fn logs_hint(&self) -> String {
        format!(
            "logs in build/test-logs/{}-*",
            self.dir
                .path()
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        )
    }
}

/// A call retried (it is idempotent) until it succeeds or `bound` passes.
async fn retried<T, F, Fut>(bound: Duration, mut call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let t = Instant::now();
    loop {
        match call().await {
            Ok(v) => return Ok(v),
            Err(s) if t.elapsed() < bound && s.code() == tonic::Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(s) => return Err(s),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_kills_under_load_lose_nothing_and_every_call_takes_effect_once() {
    let seed = seed_from_env();
    let mut rng = StdRng::seed_from_u64(seed);
    let kills = if long_mode() { 20 } else { 5 };
    let mut c = Cluster::start("meta-fo-").await;
    let load = Load::start(
        c.vip,
        c.vol.target_iqn.clone(),
        c.lun(),
        seed,
        Duration::from_secs(600),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, failed0, _) = load.totals();

    let mut row = Row::new("meta-leader-kill");
    let mut to_leader = Vec::new();
    let mut calls = Vec::new();
    for k in 0..kills {
        let Some(old) = c.metas.leader().await else {
            panic!("no leader before kill {k}:\n{}", c.metas.log_tails());
        };
        load.begin_window();
        c.metas.members[old].kill9();
        row.faults += 1;
        // Metadata calls straddling the failover, each retried by the
        // client until it lands: every one must take effect once.
        let meta = c.metas.meta_arg();
        let vol_id = c.vol.id.clone();
        let calls_task = tokio::spawn(async move {
            let mut a = Admin::connect_to(&meta);
            let name = format!("fo-{k}");
            let created = retried(Duration::from_secs(20), || {
                let mut cl = a.client().clone();
                let name = name.clone();
                async move {
                    cl.create_volume(pb::CreateVolumeRequest {
                        name,
                        size_bytes: 64 << 20,
                        replicas: 1,
                        thin: true,
                    })
                    .await
                }
            })
            .await
            .map(|r| r.into_inner().volume.unwrap_or_default());
            let created = created.map_err(|e| format!("create {name}: {e}"))?;
            let iqn = format!("iqn.2026-11.dev.ironblock:fo-{k}");
            retried(Duration::from_secs(20), || {
                let mut cl = a.client().clone();
                let req = pb::AclRequest {
                    volume_id: created.id.clone(),
                    initiator_iqn: iqn.clone(),
                    ..Default::default()
                };
                async move { cl.acl_add(req).await }
            })
            .await
            .map_err(|e| format!("acl add {iqn}: {e}"))?;
            retried(Duration::from_secs(20), || {
                let mut cl = a.client().clone();
                let req = pb::CreateSnapshotRequest {
                    volume_id: vol_id.clone(),
                    name: format!("fo-snap-{k}"),
                };
                async move { cl.create_snapshot(req).await }
            })
            .await
            .map_err(|e| format!("snapshot fo-snap-{k}: {e}"))?;
            Ok::<_, String>(())
        });
        let Some((new, took)) = c
            .metas
            .wait_leader(Some(old), Duration::from_secs(10))
            .await
        else {
            panic!(
                "no new leader within 10 s of killing meta {}:\n{}",
                old + 1,
                c.metas.log_tails()
            );
        };
        to_leader.push(took.as_secs_f64());
        calls.push(calls_task.await.expect("calls task"));
        // Writes keep completing under the new leader before the old one
        // comes back.
        tokio::time::sleep(Duration::from_millis(rng.gen_range(1500..3000))).await;
        row.stalls.extend(load.window_stalls());
        c.metas.members[old].restart();
        println!(
            "kill {k}: meta {} killed, meta {} leads after {:.2}s; stall so far max {:.2}s",
            old + 1,
            new + 1,
            took.as_secs_f64(),
            pct(&row.stalls, 1.0)
        );
        // The restarted member catches up before the next kill (so a kill
        // never takes the quorum down with it).
        let t = Instant::now();
        loop {
            let caught = match (c.metas.view(old).await, c.metas.view(new).await) {
                (Some(o), Some(n)) => o.applied_index + 2 >= n.applied_index && o.leader_id != 0,
                _ => false,
            };
            if caught {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "meta {} did not catch up within 20 s:\n{}",
                old + 1,
                c.metas.log_tails()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let (acked, failed, logins) = load.totals();
    c.verify(&load, &mut row).await;
    load.finish().await;
    let io_errors = failed - failed0;

    // Exactly once: one volume, one ACL entry and one snapshot per kill.
    let vols = c
        .admin
        .client()
        .list_volumes(pb::ListVolumesRequest {})
        .await
        .expect("list volumes")
        .into_inner()
        .volumes;
    let snaps = c
        .admin
        .client()
        .list_snapshots(pb::ListSnapshotsRequest {
            volume_id: c.vol.id.clone(),
        })
        .await
        .expect("list snapshots")
        .into_inner()
        .snapshots;
    let mut once = Vec::new();
    for k in 0..kills {
        let v: Vec<&pb::Volume> = vols
            .iter()
            .filter(|v| v.name == format!("fo-{k}"))
            .collect();
        let s = snaps
            .iter()
            .filter(|s| s.name == format!("fo-snap-{k}"))
            .count();
        let acl_ok = v.len() == 1 && v[0].acl == vec![format!("iqn.2026-11.dev.ironblock:fo-{k}")];
        once.push((v.len(), s, acl_ok));
    }

    println!(
        "\nmeta leader kills (CHAOS_SEED={seed}): {} kills; time to a new leader p50 {:.2}s max \
         {:.2}s; longest time without a completed write p50 {:.2}s max {:.2}s (goal < 1 s, \
         bound {STALL_BOUND} s); I/O errors seen by the initiators {io_errors}; acknowledged \
         writes lost {} ({} verified); load {acked} acked, {logins} logins; {}",
        row.faults,
        pct(&to_leader, 0.5),
        pct(&to_leader, 1.0),
        pct(&row.stalls, 0.5),
        pct(&row.stalls, 1.0),
        row.lost,
        row.verified,
        c.logs_hint()
    );
    for (k, r) in calls.iter().enumerate() {
        assert!(r.is_ok(), "kill {k}: a metadata call failed: {r:?}");
    }
    for (k, (v, s, acl)) in once.iter().enumerate() {
        assert_eq!(
            (*v, *s, *acl),
            (1, 1, true),
            "kill {k}: volume fo-{k} x{v}, snapshot fo-snap-{k} x{s}, ACL as asked: {acl}"
        );
    }
    assert!(row.failure.is_none(), "{:?}", row.failure);
    assert_eq!(row.lost, 0, "acknowledged writes lost");
    assert_eq!(
        io_errors, 0,
        "the initiators saw I/O errors across the leader kills"
    );
    assert!(
        pct(&row.stalls, 1.0) < STALL_BOUND,
        "a write waited {:.2}s across a leader kill (bound {STALL_BOUND} s)",
        pct(&row.stalls, 1.0)
    );
    assert!(acked > 500, "the load made progress ({acked} acked)");
}

/// Whether both redirectors hold the VIP at once: A, then B, then A again
/// (sampling is not atomic; B holding between two samples of A holding is
/// an overlap of their leases).
async fn both_hold_the_vip(r: &[RedirectorProcess]) -> bool {
    for (a, b) in [(0, 1), (1, 0)] {
        if r[a].holds_vip().await && r[b].holds_vip().await && r[a].holds_vip().await {
            return true;
        }
    }
    false
}

/// A raw client of one member (no leader following), its calls bounded.
async fn member_client(
    addr: &str,
) -> Option<ironblock_proto::v1::meta_client::MetaClient<tonic::transport::Channel>> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .ok()?
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(2))
        .connect()
        .await
        .ok()?;
    Some(ironblock_proto::v1::meta_client::MetaClient::new(ch))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_leader_steps_down_serves_nothing_stale_and_the_vip_never_has_two_holders() {
    let mut c = Cluster::start("meta-freeze-").await;
    let Some(old) = c.metas.leader().await else {
        panic!("no leader:\n{}", c.metas.log_tails());
    };
    let old_addr = c.metas.members[old].addr().to_string();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Watch the VIP holders the whole time.
    let sampler = {
        let stop = stop.clone();
        let redirectors = std::mem::take(&mut c.redirectors);
        tokio::spawn(async move {
            let (mut samples, mut overlaps) = (0u64, 0u64);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                samples += 1;
                if both_hold_the_vip(&redirectors).await {
                    overlaps += 1;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (redirectors, samples, overlaps)
        })
    };

    let frozen_at = Instant::now();
    c.metas.members[old].pause();
    let new = c
        .metas
        .wait_leader(Some(old), Duration::from_secs(10))
        .await;
    let Some((new, took)) = new else {
        c.metas.members[old].resume();
        panic!(
            "no new leader within 10 s of freezing meta {}:\n{}",
            old + 1,
            c.metas.log_tails()
        );
    };
    // A change made under the new leader while the old one is frozen: a
    // new initiator on the volume's ACL.
    let late = "iqn.2026-11.dev.ironblock:after-the-freeze";
    let mut quick = Admin::connect_to(&c.metas.members[new].addr().to_string());
    quick.acl_add(&c.vol.id, late).await;
    let rev = quick.revision().await;
    for ch in &c.chunks {
        assert!(
            ch.wait_applied(rev, Duration::from_secs(10)).await,
            "chunk {} did not apply revision {rev}",
            ch.chunk_id()
        );
    }
    // Hold the freeze for 10 s in all.
    let left = Duration::from_secs(10).saturating_sub(frozen_at.elapsed());
    tokio::time::sleep(left).await;
    c.metas.members[old].resume();
    let resumed = Instant::now();

    // From the moment it runs again, the old leader serves nothing: every
    // answer is UNAVAILABLE (pointing at the leader) until it knows it
    // follows; and it learns that within a bound.
    let mut answered_stale = Vec::new();
    let mut stepped_down = None;
    while resumed.elapsed() < Duration::from_secs(10) {
        if let Some(mut m) = member_client(&old_addr).await {
            match m.list_exports(pb::ListExportsRequest {}).await {
                Ok(r) => answered_stale.push(r.into_inner().revision),
                Err(s) => assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}"),
            }
        }
        if let Some(v) = c.metas.view(old).await {
            if v.leader_id != 0 && v.leader_id != old as u64 + 1 {
                stepped_down = Some(resumed.elapsed());
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Every chunk still has the ACL the new leader added (no chunk took a
    // view from the old leader), and the new initiator sees the LUN.
    for ch in &c.chunks {
        assert!(ch.wait_applied(rev, Duration::from_secs(5)).await);
        let s = ironblock_tests::portals::login_sees_the_lun(
            ch.portal(),
            late,
            &c.vol.target_iqn,
            c.lun(),
        )
        .await;
        assert!(s.is_ok(), "chunk {}: {:?}", ch.chunk_id(), s.err());
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (redirectors, samples, overlaps) = sampler.await.expect("sampler");
    c.redirectors = redirectors;
    println!(
        "frozen leader: meta {} frozen 10 s; meta {} led after {:.2}s; resumed, it stepped down \
         after {:?} and answered {} calls with its stale view; {samples} samples of the VIP \
         holders, {overlaps} with two holders",
        old + 1,
        new + 1,
        took.as_secs_f64(),
        stepped_down,
        answered_stale.len()
    );
    assert!(
        stepped_down.is_some(),
        "the resumed meta {} did not follow the new leader within 10 s:\n{}",
        old + 1,
        c.metas.log_tails()
    );
    assert!(
        answered_stale.is_empty(),
        "the resumed old leader answered from its stale view (revisions {answered_stale:?})"
    );
    assert_eq!(overlaps, 0, "two redirectors held the VIP at once");
    assert!(samples > 50, "the VIP holders were sampled ({samples})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn losing_the_quorum_fences_the_data_path_and_loses_nothing() {
    let seed = seed_from_env();
    let mut c = Cluster::start("meta-quorum-").await;
    let load = Load::start(
        c.vip,
        c.vol.target_iqn.clone(),
        c.lun(),
        seed,
        Duration::from_secs(300),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut row = Row::new("meta-quorum-loss");
    // Two of three down: the one left cannot lead.
    let Some(leader) = c.metas.leader().await else {
        panic!("no leader:\n{}", c.metas.log_tails());
    };
    let follower = (leader + 1) % 3;
    let survivor = (leader + 2) % 3;
    let lost_at = Instant::now();
    c.metas.members[leader].kill9();
    c.metas.members[follower].kill9();
    row.faults += 1;

    // Every chunk fences once its lease (the liveness timeout from its last
    // accepted heartbeat) runs out: bounded by the lease plus a heartbeat.
    let bound = LIVENESS + Duration::from_secs(2);
    let mut fenced = vec![false; c.chunks.len()];
    while lost_at.elapsed() < bound && !fenced.iter().all(|f| *f) {
        for (i, ch) in c.chunks.iter().enumerate() {
            fenced[i] |= ch.metric("ironblock_chunk_fenced").await == Some(1.0);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fenced_after = lost_at.elapsed();
    assert!(
        fenced.iter().all(|f| *f),
        "not every chunk fenced within {bound:?} of losing the quorum: {fenced:?}"
    );
    // No write completes while fenced.
    let (acked_fenced, _, _) = load.totals();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (acked_later, _, _) = load.totals();
    // The status says why.
    let out = std::process::Command::new(ironblock_tests::bin_path("ironblock"))
        .args(["--meta", &c.metas.meta_arg(), "--timeout", "3s", "status"])
        .output()
        .expect("run ironblock status");
    let status_err = String::from_utf8_lossy(&out.stderr).into_owned();
    // The quorum comes back.
    c.metas.members[leader].restart();
    c.metas.members[follower].restart();
    let back = c.metas.wait_leader(None, Duration::from_secs(20)).await;
    let resumed_in = back.map(|(_, t)| t);
    // I/O resumes: writes complete again.
    let t = Instant::now();
    let mut resumed = false;
    while t.elapsed() < Duration::from_secs(30) {
        let (a, _, _) = load.totals();
        if a > acked_later + 100 {
            resumed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.verify(&load, &mut row).await;
    let (acked, failed, logins) = load.totals();
    load.finish().await;
    println!(
        "quorum loss (CHAOS_SEED={seed}): metas {} and {} killed, meta {} alone; every chunk \
         fenced after {:.2}s; {} writes completed in 2 s fenced; quorum back, leader after \
         {resumed_in:?}; I/O resumed: {resumed}; lost {} of {} verified; load {acked} acked, \
         {failed} failed, {logins} logins; status said: {}",
        leader + 1,
        follower + 1,
        survivor + 1,
        fenced_after.as_secs_f64(),
        acked_later - acked_fenced,
        row.lost,
        row.verified,
        status_err.trim()
    );
    assert!(!out.status.success(), "status succeeded without a quorum");
    assert!(
        status_err.contains("no quorum") || status_err.contains("no leader"),
        "status does not say the group lost its quorum: {status_err}"
    );
    assert!(
        acked_later - acked_fenced <= WRITERS,
        "writes completed while every chunk was fenced ({} in 2 s)",
        acked_later - acked_fenced
    );
    assert!(
        resumed_in.is_some(),
        "no leader once the quorum was back:\n{}",
        c.metas.log_tails()
    );
    assert!(
        resumed,
        "I/O did not resume within 30 s of the quorum coming back"
    );
    assert!(row.failure.is_none(), "{:?}", row.failure);
    assert_eq!(
        row.lost, 0,
        "acknowledged writes lost across the quorum loss"
    );
}
