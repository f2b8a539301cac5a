//! `acl-propagation`: how long `AclAdd` takes, and how long until the new
//! initiator actually sees its LUN through the VIP (discovery) and through
//! every chunk portal (login + INQUIRY), over 100 calls on a process
//! cluster of meta, three chunks and a redirector on 127.0.0.100.
//!
//! ```text
//! cargo run -p ironblock-tests --example acl-propagation [-- CALLS]
//! ```
//!
//! The cluster's binaries come from `$CARGO_TARGET_DIR/debug` (default
//! `build/debug`), so pointing `CARGO_TARGET_DIR` at a build of another
//! commit measures that commit with the same client (how the "before"
//! figures in `bench/results/acl-propagation.txt` were taken). Propagation
//! is polled every 2 ms from the call's start; each poll is one discovery
//! and one login per chunk. Prints one line per figure.

use std::time::{Duration, Instant};

use ironblock_tests::portals::{discovery_lists, login_sees_the_lun, summary, VipCluster};
use ironblock_tests::scratch_dir;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let calls: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("CALLS must be a number"))
        .unwrap_or(100);
    let dir = scratch_dir("acl-propagation");
    let c = VipCluster::start(dir.path(), "acl-prop-r1").await;
    let (chunks, vip) = (&c.chunks, c.vip);
    let mut admin = c.meta.admin().await;
    let v = admin.create_volume("acl-propagation", 64 << 20, 2).await;
    let lun = u64::from(v.lun);
    let mut call = Vec::new();
    let mut visible = Vec::new();
    let mut missed_at_return = 0;
    for k in 0..calls {
        let ini = format!("iqn.2026-12.dev.ironblock:acl-prop-{k:03}");
        let t = Instant::now();
        admin.acl_add(&v.id, &ini).await;
        call.push(t.elapsed());
        let mut first = true;
        loop {
            let mut all = discovery_lists(vip, &ini, &v.target_iqn).await == Ok(true);
            for chunk in chunks {
                all = all
                    && login_sees_the_lun(chunk.portal(), &ini, &v.target_iqn, lun)
                        .await
                        .is_ok();
            }
            if all {
                break;
            }
            if first {
                missed_at_return += 1;
                first = false;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "{ini} did not see its LUN everywhere within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        visible.push(t.elapsed());
    }
    println!(
        "bin dir: {}",
        ironblock_tests::build_dir().join("debug").display()
    );
    println!("AclAdd call:                  {}", summary(call));
    println!("until visible on every portal: {}", summary(visible));
    println!("calls after which the first check missed: {missed_at_return} of {calls}");
}
