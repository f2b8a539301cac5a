//! The VIP lease RPCs through the generated gRPC client, meta in process on
//! 127.0.0.1:0.

use std::time::Duration;

use ironblock_proto::v1 as pb;
use tonic::Code;

mod common;

use common::Running;

const VIP: &str = "127.0.0.100:3260";

fn acquire(holder: &str, ttl_ms: u64, token: u64) -> pb::AcquireVipLeaseRequest {
    pb::AcquireVipLeaseRequest {
        vip: VIP.into(),
        holder: holder.into(),
        ttl_ms,
        token,
        // A holder whose view is current (no call here waits for a
        // revision to be in force; tests/grpc_in_force.rs covers that).
        applied_revision: u64::MAX,
    }
}

#[tokio::test]
async fn vip_lease_grant_renew_refuse_and_takeover() {
    let dir = tempfile::tempdir().unwrap();
    let meta = Running::start(dir.path()).await;
    let mut c = meta.client().await;

    let get = pb::GetVipLeaseRequest { vip: VIP.into() };
    let free = c.get_vip_lease(get.clone()).await.unwrap().into_inner();
    assert!(!free.held);
    assert_eq!(free.token, 0);

    let a = c
        .acquire_vip_lease(acquire("a", 500, 0))
        .await
        .unwrap()
        .into_inner();
    assert!(a.held);
    assert_eq!((a.holder.as_str(), a.token), ("a", 1));
    assert!(a.expires_in_ms <= 500 && a.expires_in_ms > 0);

    let b = c
        .acquire_vip_lease(acquire("b", 500, 0))
        .await
        .unwrap()
        .into_inner();
    assert!(!b.held);
    assert_eq!((b.holder.as_str(), b.token), ("a", 1));

    let renewed = c
        .acquire_vip_lease(acquire("a", 500, 1))
        .await
        .unwrap()
        .into_inner();
    assert!(renewed.held);
    assert_eq!(renewed.token, 1);
    let now = c.get_vip_lease(get.clone()).await.unwrap().into_inner();
    assert!(now.held);
    assert_eq!(now.holder, "a");

    // "a" stops renewing: after the ttl "b" gets it with the next token.
    // "b" asks for a long ttl, so its lease still holds when the stale "a"
    // tries below however slow a loaded host makes the next call (with
    // 500 ms it could lapse first and "a" would rightly get it back).
    let mut taken = None;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let r = c
            .acquire_vip_lease(acquire("b", 10_000, 0))
            .await
            .unwrap()
            .into_inner();
        if r.held {
            taken = Some(r);
            break;
        }
    }
    let taken = taken.expect("b takes the lease after a's ttl");
    assert_eq!(taken.token, 2);
    let stale = c
        .acquire_vip_lease(acquire("a", 500, 1))
        .await
        .unwrap()
        .into_inner();
    assert!(!stale.held);
    assert_eq!(stale.holder, "b");

    let bad = c.acquire_vip_lease(acquire("a", 50, 0)).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    let bad = c.acquire_vip_lease(acquire("", 500, 0)).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);

    meta.stop().await;
}

#[tokio::test]
async fn a_holder_whose_watch_goes_away_is_released_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let meta = Running::start(dir.path()).await;
    let mut c = meta.client().await;
    // A 20 s lease: only the early release can free it within the test.
    let a = c
        .acquire_vip_lease(acquire("a", 20_000, 0))
        .await
        .unwrap()
        .into_inner();
    assert!(a.held);
    let mut w = meta.client().await;
    let mut stream = w
        .watch_revisions(pb::WatchRevisionsRequest {
            watcher: "redirector a".into(),
            vip_holder: "a".into(),
        })
        .await
        .unwrap()
        .into_inner();
    stream
        .message()
        .await
        .unwrap()
        .expect("the current revision");
    let get = pb::GetVipLeaseRequest { vip: VIP.into() };
    assert!(
        c.get_vip_lease(get.clone())
            .await
            .unwrap()
            .into_inner()
            .held
    );

    // The holder goes away (its stream and connection are dropped).
    drop(stream);
    drop(w);
    let mut freed = false;
    for _ in 0..500 {
        if !c
            .get_vip_lease(get.clone())
            .await
            .unwrap()
            .into_inner()
            .held
        {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(freed, "the lease is freed within 5 s of its 20 s");
    // A standby takes it at once, in a new tenure.
    let b = c
        .acquire_vip_lease(acquire("b", 20_000, 0))
        .await
        .unwrap()
        .into_inner();
    assert!(b.held);
    assert_eq!((b.holder.as_str(), b.token), ("b", 2));
    // The old holder, if alive after all, is refused and learns who holds it.
    let old = c
        .acquire_vip_lease(acquire("a", 20_000, 1))
        .await
        .unwrap()
        .into_inner();
    assert!(!old.held);
    assert_eq!(old.holder, "b");
    meta.stop().await;
}
