//! `meta-ops`: what consensus costs the control plane and a thin volume's
//! first writes, with one meta and with a group of three, side by side in
//! one run (each on its own process cluster of three chunks, RF=2).
//!
//! ```text
//! cargo run -p ironblock-tests --example meta-ops [-- OPS EXTENTS]
//! ```
//!
//! - metadata operations per second: OPS (default 100) pairs of CreateVolume
//!   (thin, 64 MiB, RF=2) and AclAdd, one after the other, each returning
//!   once in force on every chunk; then the same from 8 clients at once
//!   (group commit: calls that decide during a log round trip share the
//!   next entry);
//! - the first write to each of EXTENTS (default 64) extents of a thin
//!   volume: one 4 KiB WRITE(16) per extent from a logged-in initiator,
//!   each placing its extent through meta (EnsureExtent, a log entry in a
//!   group): p50 and p99 of the write's latency, and of a second write to
//!   the same extents (placed: no meta call) for reference.
//!
//! The cluster's binaries come from `$CARGO_TARGET_DIR/debug` (default
//! `build/debug`); `META_OPS_ONLY_ONE=1` measures the one-meta cluster
//! only, so the binaries of a commit from before the meta group can be
//! measured with the same client (the "before" figures in
//! `bench/results/meta-ops.txt`).

use std::time::{Duration, Instant};

use bytes::Bytes;
use ironblock_tests::cluster::{
    start_chunks, Admin, ChunkProcess, MetaEndpoint, MetaGroup, MetaProcess,
};
use ironblock_tests::initiator::{LoginOptions, Session};
use ironblock_tests::portals::summary;
use ironblock_tests::scratch_dir;

const EXTENT: u64 = 64 << 20;
const BS: u32 = 512;

/// Clients issuing pairs at once for the concurrent figure.
const CLIENTS: usize = 8;

struct Figures {
    ops_per_s: f64,
    concurrent_ops_per_s: f64,
    call: Vec<Duration>,
    first: Vec<Duration>,
    again: Vec<Duration>,
}

async fn measure(
    meta: &impl MetaEndpoint,
    chunks: &[ChunkProcess],
    ops: usize,
    extents: u64,
    tag: &str,
) -> Figures {
    let mut admin = Admin::connect_to(&meta.meta_arg());
    // Warm up: the group has a leader and every chunk is in.
    admin.create_volume(&format!("{tag}-warm"), EXTENT, 2).await;
    let mut call = Vec::new();
    let t = Instant::now();
    for k in 0..ops {
        let c = Instant::now();
        let v = admin.create_volume(&format!("{tag}-v{k}"), EXTENT, 2).await;
        admin
            .acl_add(&v.id, &format!("iqn.2026-12.dev.ironblock:{tag}-{k}"))
            .await;
        call.push(c.elapsed());
    }
    let ops_per_s = ops as f64 / t.elapsed().as_secs_f64();

    // The same pairs from CLIENTS clients at once: what group commit buys.
    let t = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let meta = meta.meta_arg();
            let tag = tag.to_string();
            tokio::spawn(async move {
                let mut admin = Admin::connect_to(&meta);
                for k in (c..ops).step_by(CLIENTS) {
                    let v = admin.create_volume(&format!("{tag}-c{k}"), EXTENT, 2).await;
                    admin
                        .acl_add(&v.id, &format!("iqn.2026-12.dev.ironblock:{tag}-c{k}"))
                        .await;
                }
            })
        })
        .collect();
    for c in clients {
        c.await.expect("a concurrent client");
    }
    let concurrent_ops_per_s = ops as f64 / t.elapsed().as_secs_f64();

    let ini = format!("iqn.2026-12.dev.ironblock:{tag}-writer");
    let v = admin
        .create_volume(&format!("{tag}-thin"), extents * EXTENT, 2)
        .await;
    admin.acl_add(&v.id, &ini).await;
    let s = Session::login(
        chunks[0].portal(),
        &LoginOptions::normal(&ini, &v.target_iqn),
    )
    .await
    .expect("login");
    let lun = u64::from(v.lun);
    // The first command of a session reports the power-on unit attention.
    for _ in 0..3 {
        if s.test_unit_ready(lun).await.is_ok_and(|r| r.status == 0) {
            break;
        }
    }
    let data = Bytes::from(vec![0x5a; 4096]);
    let mut first = Vec::new();
    let mut again = Vec::new();
    for round in 0..2 {
        for e in 0..extents {
            let lba = e * EXTENT / u64::from(BS);
            let w = Instant::now();
            let r = s.write16(lun, lba, data.clone(), BS).await.expect("write");
            assert_eq!(
                r.status,
                0,
                "write to extent {e} failed: {:?}",
                r.sense_key()
            );
            if round == 0 {
                first.push(w.elapsed());
            } else {
                again.push(w.elapsed());
            }
        }
    }
    Figures {
        ops_per_s,
        concurrent_ops_per_s,
        call,
        first,
        again,
    }
}

fn print(name: &str, f: Figures) {
    println!("{name}:");
    println!(
        "  create + acl add: {:.1} ops/s; per pair {}",
        f.ops_per_s,
        summary(f.call)
    );
    println!(
        "  create + acl add, {CLIENTS} clients at once: {:.1} ops/s",
        f.concurrent_ops_per_s
    );
    println!(
        "  first write to an extent (placed through meta): {}",
        summary(f.first)
    );
    println!(
        "  second write (placed):                          {}",
        summary(f.again)
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let ops: usize = args
        .next()
        .map(|a| a.parse().expect("OPS must be a number"))
        .unwrap_or(100);
    let extents: u64 = args
        .next()
        .map(|a| a.parse().expect("EXTENTS must be a number"))
        .unwrap_or(64);
    let liveness = Duration::from_secs(3);

    let one = {
        let dir = scratch_dir("meta-ops-1");
        let meta = MetaProcess::start(dir.path(), liveness);
        let chunks = start_chunks(&meta, dir.path(), 3);
        measure(&meta, &chunks, ops, extents, "one").await
    };
    if std::env::var("META_OPS_ONLY_ONE").is_ok_and(|v| v == "1") {
        println!(
            "bin dir: {}; {ops} create + acl add pairs, {extents} extents",
            ironblock_tests::build_dir().join("debug").display()
        );
        print("1 meta", one);
        return;
    }
    let three = {
        let dir = scratch_dir("meta-ops-3");
        let metas = MetaGroup::start(dir.path(), 3, liveness);
        assert!(metas
            .wait_leader(None, Duration::from_secs(20))
            .await
            .is_some());
        let chunks = start_chunks(&metas, dir.path(), 3);
        measure(&metas, &chunks, ops, extents, "three").await
    };
    println!(
        "bin dir: {}; {ops} create + acl add pairs, {extents} extents",
        ironblock_tests::build_dir().join("debug").display()
    );
    print("1 meta", one);
    print("3 metas (Raft group)", three);
}
