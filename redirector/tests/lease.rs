//! The lease loop against an in-process meta on 127.0.0.1: a holder that
//! cannot bind the VIP lets the lease lapse for another redirector, and
//! serves once the address is free and the lease is its again.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ironblock_meta::{Config as MetaConfig, MetaServer};
use ironblock_redirector::meta::MetaLink;
use ironblock_redirector::{Config, LeaseStatus, Redirector};
use tokio_util::sync::CancellationToken;

/// "y" impersonates a redirector whose view is current (no call here
/// waits for a revision to be in force).
const CURRENT: u64 = u64::MAX;

async fn start_meta(dir: &std::path::Path) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let config = MetaConfig::new("127.0.0.1:0".parse().unwrap(), dir.to_path_buf());
    let server = MetaServer::bind(config).await.expect("bind meta");
    let addr = server.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = server
            .run(async {
                let _ = rx.await;
            })
            .await;
    });
    (addr, tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_that_cannot_bind_lets_the_lease_lapse_then_serves_when_free() {
    let dir = tempfile::tempdir().unwrap();
    let (meta, _stop) = start_meta(dir.path()).await;
    // Something else occupies the VIP address.
    let blocker = std::net::TcpListener::bind("127.0.0.101:0").expect("bind 127.0.0.101");
    let vip = blocker.local_addr().unwrap().to_string();
    let ttl = Duration::from_millis(300);

    let mut cfg = Config::new(&meta.to_string(), &vip, "x");
    cfg.lease_ttl = ttl;
    let r = std::sync::Arc::new(Redirector::new(cfg).expect("redirector"));
    let mut status = r.status();
    let shutdown = CancellationToken::new();
    let run = {
        let r = r.clone();
        let s = shutdown.clone();
        tokio::spawn(async move { r.run(s).await })
    };

    let link = MetaLink::new(&meta.to_string(), Duration::from_secs(2)).unwrap();
    // "x" takes the lease first but cannot bind.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let l = link.get_vip_lease(&vip).await.expect("GetVipLease");
        if l.held && l.holder == "x" {
            break;
        }
        assert!(Instant::now() < deadline, "x never took the lease");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(*status.borrow(), LeaseStatus::Standby);

    // Within 3 ttls of failing binds plus one ttl of silence, "y" gets it.
    let started = Instant::now();
    let mut y_token = None;
    while started.elapsed() < Duration::from_secs(5) {
        let l = link
            .acquire_vip_lease(&vip, "y", ttl, y_token.unwrap_or(0), CURRENT)
            .await
            .expect("AcquireVipLease");
        if l.held {
            y_token = Some(l.token);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let y_token = y_token.expect("x let the lease lapse within 5 s");
    println!("lease lapsed to y after {:?}", started.elapsed());
    assert!(started.elapsed() >= ttl * 2, "x gave up too early");
    assert_eq!(*status.borrow(), LeaseStatus::Standby);

    // "y" keeps it for a while (x is refused), then stops renewing; with
    // the address free, "x" takes the lease and serves the VIP.
    drop(blocker);
    for _ in 0..5 {
        let l = link
            .acquire_vip_lease(&vip, "y", ttl, y_token, CURRENT)
            .await
            .expect("renew y");
        assert!(l.held, "y lost its lease while renewing");
        tokio::time::sleep(ttl / 3).await;
    }
    assert_eq!(*status.borrow(), LeaseStatus::Standby);
    let serving = tokio::time::timeout(
        Duration::from_secs(5),
        status.wait_for(|s| matches!(s, LeaseStatus::Serving { .. })),
    )
    .await
    .expect("x serves the VIP once the lease is free")
    .map(|s| *s)
    .expect("status");
    let LeaseStatus::Serving { token } = serving else {
        unreachable!()
    };
    assert!(token > y_token, "a new tenure has a higher token");
    assert!(tokio::net::TcpStream::connect(&vip).await.is_ok());
    assert_eq!(
        r.metrics()
            .lease_acquisitions
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .expect("redirector stops")
        .expect("run task");
    assert_eq!(*r.status().borrow(), LeaseStatus::Standby);
    assert!(
        tokio::net::TcpStream::connect(&vip).await.is_err(),
        "the VIP is released on shutdown"
    );
}
