//! LUN masking through a [`Portal`] that hides LUNs per initiator: REPORT
//! LUNS, commands, residuals and target resets must not reach or reveal a
//! LUN the initiator may not see.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use ironblock_target::login::LoginDecision;
use ironblock_target::pdu::{op, Pdu};
use ironblock_target::scsi::mem_device::MemDevice;
use ironblock_target::scsi::{LogicalUnit, LuConfig, LunTable};
use ironblock_target::server::{DiscoveredTarget, ExportedTarget, Portal, Server, ServerConfig};
use ironblock_tests::initiator::{LoginOptions, Session};

const IQN: &str = "iqn.2026-11.dev.ironblock:masked";
const A: &str = "iqn.2026-11.dev.ironblock:a";
const B: &str = "iqn.2026-11.dev.ironblock:b";
const BS: u32 = 512;

/// LUN 0 is A's only; LUN 1 is shared by A and B.
struct Masked(Arc<ExportedTarget>);

impl Portal for Masked {
    fn decide(&self, _i: &str, _t: Option<&str>) -> LoginDecision {
        LoginDecision::Accept { chap: None }
    }
    fn discover(&self, _i: &str, _l: SocketAddr) -> Vec<DiscoveredTarget> {
        Vec::new()
    }
    fn target(&self, name: &str) -> Option<Arc<ExportedTarget>> {
        (name == self.0.name).then(|| self.0.clone())
    }
    fn lun_visible(&self, initiator: &str, _t: &str, lun: u64) -> bool {
        lun == 1 || initiator == A
    }
}

async fn clear_ua(s: &Session, lun: u64) {
    for _ in 0..4 {
        if s.test_unit_ready(lun).await.unwrap().status == 0 {
            return;
        }
    }
    panic!("unit attention did not clear");
}

#[tokio::test]
async fn masked_luns_are_absent_in_every_respect() {
    let mut luns = LunTable::new();
    for lun in [0u64, 1] {
        let dev = Arc::new(MemDevice::new(BS, 4096));
        luns.insert(lun, Arc::new(LogicalUnit::new(dev, LuConfig::default())));
    }
    let portal = Masked(Arc::new(ExportedTarget::new(IQN, luns)));
    let server = Server::new(Arc::new(portal), ServerConfig::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let srv = server.clone();
    tokio::spawn(async move { srv.serve(listener).await });

    let a = Session::login(addr, &LoginOptions::normal(A, IQN))
        .await
        .unwrap();
    clear_ua(&a, 0).await;
    clear_ua(&a, 1).await;
    let data = Bytes::from(vec![0xa5u8; 4096]);
    assert_eq!(a.write16(0, 8, data.clone(), BS).await.unwrap().status, 0);

    let b = Session::login(addr, &LoginOptions::normal(B, IQN))
        .await
        .unwrap();
    assert_eq!(b.report_luns().await.unwrap(), vec![1]);
    let r = b.read16(0, 8, 8, BS).await.unwrap();
    assert_eq!(r.status, 2);
    assert_eq!(
        r.sense_key(),
        Some((5, 0x25, 0)),
        "LOGICAL UNIT NOT SUPPORTED"
    );
    assert!(r.data.is_empty());
    // A WRITE(16) for 8 blocks carrying one block: the masked LUN's block
    // size must not show through an overflow residual.
    let mut cdb = [0u8; 16];
    cdb[0] = 0x8a;
    cdb[9] = 8;
    cdb[13] = 8;
    let w = b
        .scsi(0, &cdb, Bytes::from(vec![0u8; 512]), 0)
        .await
        .unwrap();
    assert_eq!(w.sense_key(), Some((5, 0x25, 0)));
    assert_eq!(
        w.residual_flags & 0x04,
        0,
        "no overflow residual from a masked LUN"
    );

    // B's TARGET WARM RESET reaches LUN 1 (shared) but not LUN 0 (A's).
    let mut tmf = Pdu::new(op::TASK_MGMT_REQ);
    tmf.bhs[1] = 0x80 | ironblock_target::pdu::tmf::TARGET_WARM_RESET;
    tmf.set_ttt(0xffff_ffff);
    let resp = b.request(tmf, Bytes::new(), true).await.unwrap();
    assert_eq!(resp.residual_flags, op::TASK_MGMT_RESP);
    assert_eq!(resp.status, 0, "function complete");
    assert_eq!(
        a.test_unit_ready(0).await.unwrap().status,
        0,
        "no unit attention on a LUN the resetting initiator cannot see"
    );
    let ua = a.test_unit_ready(1).await.unwrap();
    assert_eq!(ua.sense_key().map(|k| (k.0, k.1)), Some((6, 0x29)));
    // A's data on its LUN is untouched.
    let r = a.read16(0, 8, 8, BS).await.unwrap();
    assert_eq!(r.data, data);
    server.shutdown();
}

/// LUN 0 only while `shown` is set, LUN 1 always; `version` moves with
/// every change, as a cluster portal's does when an export map is applied.
struct Switched {
    target: Arc<ExportedTarget>,
    shown: std::sync::atomic::AtomicBool,
    version: std::sync::atomic::AtomicU64,
}

impl Switched {
    fn show(&self, on: bool) {
        use std::sync::atomic::Ordering;
        self.shown.store(on, Ordering::SeqCst);
        self.version.fetch_add(1, Ordering::SeqCst);
    }
}

impl Portal for Switched {
    fn decide(&self, _i: &str, _t: Option<&str>) -> LoginDecision {
        LoginDecision::Accept { chap: None }
    }
    fn discover(&self, _i: &str, _l: SocketAddr) -> Vec<DiscoveredTarget> {
        Vec::new()
    }
    fn target(&self, name: &str) -> Option<Arc<ExportedTarget>> {
        (name == self.target.name).then(|| self.target.clone())
    }
    fn lun_visible(&self, _i: &str, _t: &str, lun: u64) -> bool {
        lun == 1 || self.shown.load(std::sync::atomic::Ordering::SeqCst)
    }
    fn view_version(&self) -> u64 {
        self.version.load(std::sync::atomic::Ordering::SeqCst)
    }
}

const LUNS_CHANGED: Option<(u8, u8, u8)> = Some((6, 0x3f, 0x0e));

#[tokio::test]
async fn an_open_session_that_loses_a_lun_gets_reported_luns_changed_then_lun_not_supported() {
    let mut luns = LunTable::new();
    for lun in [0u64, 1] {
        let dev = Arc::new(MemDevice::new(BS, 4096));
        luns.insert(lun, Arc::new(LogicalUnit::new(dev, LuConfig::default())));
    }
    let portal = Arc::new(Switched {
        target: Arc::new(ExportedTarget::new(IQN, luns)),
        shown: true.into(),
        version: 0.into(),
    });
    let server = Server::new(portal.clone(), ServerConfig::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let srv = server.clone();
    tokio::spawn(async move { srv.serve(listener).await });

    let a = Session::login(addr, &LoginOptions::normal(A, IQN))
        .await
        .unwrap();
    clear_ua(&a, 0).await;
    clear_ua(&a, 1).await;
    assert_eq!(a.read16(0, 0, 1, BS).await.unwrap().status, 0);

    // LUN 0 is masked away from the open session: its next command (to
    // either LUN) gets the unit attention once, then LUN 0 is absent and
    // LUN 1 works.
    portal.show(false);
    // INQUIRY neither reports nor clears it.
    let inq = a
        .scsi(1, &[0x12, 0, 0, 0, 36, 0], Bytes::new(), 36)
        .await
        .unwrap();
    assert_eq!(inq.status, 0);
    let r = a.read16(0, 0, 1, BS).await.unwrap();
    assert_eq!(
        r.sense_key(),
        LUNS_CHANGED,
        "REPORTED LUNS DATA HAS CHANGED"
    );
    let r = a.read16(0, 0, 1, BS).await.unwrap();
    assert_eq!(
        r.sense_key(),
        Some((5, 0x25, 0)),
        "LOGICAL UNIT NOT SUPPORTED"
    );
    let w = a
        .write16(0, 0, Bytes::from(vec![1u8; BS as usize]), BS)
        .await
        .unwrap();
    assert_eq!(w.sense_key(), Some((5, 0x25, 0)));
    assert_eq!(a.report_luns().await.unwrap(), vec![1]);
    assert_eq!(a.read16(1, 0, 1, BS).await.unwrap().status, 0);

    // A version change that leaves the inventory as it was: no UA.
    portal.show(false);
    assert_eq!(a.read16(1, 0, 1, BS).await.unwrap().status, 0);

    // Shown again: REPORT LUNS takes the new inventory without a UA.
    portal.show(true);
    assert_eq!(a.report_luns().await.unwrap(), vec![0, 1]);
    assert_eq!(a.read16(0, 0, 1, BS).await.unwrap().status, 0);
    // And without REPORT LUNS first, the next command reports it.
    portal.show(false);
    portal.show(true);
    assert_eq!(
        a.read16(1, 0, 1, BS).await.unwrap().status,
        0,
        "same inventory"
    );
    portal.show(false);
    assert_eq!(
        a.test_unit_ready(1).await.unwrap().sense_key(),
        LUNS_CHANGED
    );
    assert_eq!(a.test_unit_ready(1).await.unwrap().status, 0);
}
