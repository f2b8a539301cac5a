//! iSCSI protocol behaviour of the target, driven by the test initiator
//! against an in-process server on loopback: login with and without CHAP,
//! digests, discovery, data transfer through immediate data and R2T, and
//! malformed input that must close only the offending connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ironblock_target::login::ChapCredentials;
use ironblock_target::pdu::{op, Pdu, RESERVED_TAG};
use ironblock_target::scsi::mem_device::MemDevice;
use ironblock_target::scsi::{LogicalUnit, LuConfig, LunTable};
use ironblock_target::server::{ExportedTarget, Server, ServerConfig, StaticPortal};
use ironblock_tests::initiator::{LoginFailure, LoginOptions, Session};

const IQN: &str = "iqn.2026-11.dev.ironblock:test";
const INI: &str = "iqn.2026-11.dev.ironblock:initiator";
const BS: u32 = 512;

async fn start(chap: Option<ChapCredentials>) -> (Server, SocketAddr) {
    let mut luns = LunTable::new();
    for lun in [0u64, 1] {
        let dev = Arc::new(MemDevice::new(BS, 8192));
        luns.insert(lun, Arc::new(LogicalUnit::new(dev, LuConfig::default())));
    }
    let target = Arc::new(ExportedTarget::new(IQN, luns));
    let portal = StaticPortal::new(vec![target], chap).with_discovery_chap(false);
    start_with(Arc::new(portal), ServerConfig::default()).await
}

fn chap(mutual: bool) -> ChapCredentials {
    ChapCredentials {
        user: "alice".into(),
        secret: b"secret-of-alice".to_vec(),
        mutual: mutual.then(|| ("target".to_string(), b"secret-of-target".to_vec())),
    }
}

/// Clear the power-on unit attention a new nexus gets.
async fn clear_ua(s: &Session, lun: u64) {
    for _ in 0..4 {
        let r = s.test_unit_ready(lun).await.expect("TUR");
        if r.status == 0 {
            return;
        }
    }
    panic!("unit attention did not clear");
}

fn pattern(len: usize, seed: u8) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect::<Vec<_>>(),
    )
}

fn login_failure(e: anyhow::Error) -> LoginFailure {
    e.downcast::<LoginFailure>()
        .expect("a login failure status from the target")
}

#[tokio::test]
async fn write_read_round_trip_through_immediate_data_and_r2t() {
    let (_server, addr) = start(None).await;
    let s = Session::login(addr, &LoginOptions::normal(INI, IQN))
        .await
        .expect("login");
    clear_ua(&s, 1).await;
    assert_eq!(s.report_luns().await.expect("report luns"), vec![0, 1]);
    assert_eq!(s.capacity(1).await.expect("capacity"), (8192, BS));
    // Small write: all immediate data. Large write: immediate + R2Ts
    // (MaxBurstLength bounded), larger than FirstBurstLength.
    for (lba, len, seed) in [
        (0u64, 4096usize, 1u8),
        (100, 1 << 20, 2),
        (3000, 300 * 1024, 3),
    ] {
        let data = pattern(len, seed);
        let w = s.write16(1, lba, data.clone(), BS).await.expect("write");
        assert_eq!(w.status, 0, "write status, sense {:?}", w.sense_key());
        let r = s
            .read16(1, lba, (len / BS as usize) as u32, BS)
            .await
            .expect("read");
        assert_eq!(r.status, 0);
        assert_eq!(r.data, data, "read back at lba {lba}");
    }
    // LUN 0 is a different device: still zeros there.
    let r = s.read16(0, 100, 8, BS).await.expect("read lun0");
    assert!(r.data.iter().all(|b| *b == 0));
    s.logout().await.expect("logout");
}

#[tokio::test]
async fn pipelined_commands_all_complete() {
    let (_server, addr) = start(None).await;
    let s = Arc::new(
        Session::login(addr, &LoginOptions::normal(INI, IQN))
            .await
            .expect("login"),
    );
    clear_ua(&s, 1).await;
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let data = pattern(8192, i as u8);
            let w = s.write16(1, i * 16, data.clone(), BS).await.expect("write");
            assert_eq!(w.status, 0);
            let r = s.read16(1, i * 16, 16, BS).await.expect("read");
            assert_eq!(r.data, data);
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
}

#[tokio::test]
async fn digests_protect_every_pdu_after_login() {
    let (_server, addr) = start(None).await;
    let mut opts = LoginOptions::normal(INI, IQN);
    opts.header_digest = true;
    opts.data_digest = true;
    let s = Session::login(addr, &opts)
        .await
        .expect("login with digests");
    assert_eq!(
        s.negotiated.get("HeaderDigest").map(String::as_str),
        Some("CRC32C")
    );
    assert_eq!(
        s.negotiated.get("DataDigest").map(String::as_str),
        Some("CRC32C")
    );
    clear_ua(&s, 0).await;
    let data = pattern(64 * 1024 + 512, 9);
    assert_eq!(
        s.write16(0, 7, data.clone(), BS)
            .await
            .expect("write")
            .status,
        0
    );
    assert_eq!(
        s.read16(0, 7, (data.len() / 512) as u32, BS)
            .await
            .expect("read")
            .data,
        data
    );
}

#[tokio::test]
async fn chap_good_bad_and_missing() {
    let (_server, addr) = start(Some(chap(false))).await;
    // Right name and secret.
    let mut opts = LoginOptions::normal(INI, IQN);
    opts.chap = Some(("alice".into(), "secret-of-alice".into()));
    let s = Session::login(addr, &opts)
        .await
        .expect("login with good CHAP");
    clear_ua(&s, 0).await;
    // Wrong secret.
    opts.chap = Some(("alice".into(), "not-the-secret".into()));
    let f = login_failure(
        Session::login(addr, &opts)
            .await
            .err()
            .expect("bad secret must fail"),
    );
    assert_eq!((f.class, f.detail), (0x02, 0x01), "authentication failure");
    // Wrong name.
    opts.chap = Some(("mallory".into(), "secret-of-alice".into()));
    let f = login_failure(
        Session::login(addr, &opts)
            .await
            .err()
            .expect("bad name must fail"),
    );
    assert_eq!((f.class, f.detail), (0x02, 0x01));
    // No CHAP at all where CHAP is required.
    opts.chap = None;
    let f = login_failure(
        Session::login(addr, &opts)
            .await
            .err()
            .expect("no CHAP must fail"),
    );
    assert_eq!((f.class, f.detail), (0x02, 0x01));
    // The good session is untouched by the failures.
    assert_eq!(s.test_unit_ready(0).await.expect("TUR").status, 0);
}

#[tokio::test]
async fn mutual_chap_proves_the_target() {
    let (_server, addr) = start(Some(chap(true))).await;
    let mut opts = LoginOptions::normal(INI, IQN);
    opts.chap = Some(("alice".into(), "secret-of-alice".into()));
    opts.mutual_secret = Some("secret-of-target".into());
    Session::login(addr, &opts)
        .await
        .expect("mutual CHAP login");
    // An initiator expecting another target secret rejects the target.
    opts.mutual_secret = Some("some-other-secret".into());
    let e = Session::login(addr, &opts)
        .await
        .err()
        .expect("target must fail our check");
    assert!(e.to_string().contains("mutual"), "{e}");
}

#[tokio::test]
async fn discovery_lists_targets_and_unknown_target_is_refused() {
    let (_server, addr) = start(None).await;
    let d = Session::login(addr, &LoginOptions::discovery(INI))
        .await
        .expect("discovery login");
    let targets = d.send_targets("All").await.expect("SendTargets");
    assert_eq!(targets.len(), 1);
    assert_eq!(targets[0].0, IQN);
    assert_eq!(targets[0].1, vec![format!("{addr},1")]);
    d.logout().await.expect("logout");
    let f = login_failure(
        Session::login(
            addr,
            &LoginOptions::normal(INI, "iqn.2026-11.dev.ironblock:nope"),
        )
        .await
        .err()
        .expect("unknown target"),
    );
    assert_eq!((f.class, f.detail), (0x02, 0x03), "not found");
}

/// RFC 7143 11.5.1 c): ABORT TASK of a command that arrived and completed
/// (no such task; its CmdSN is below ExpCmdSN, outside the window) is
/// "Task does not exist", not "Function complete": the command's GOOD
/// status went out, so nothing was aborted. (libiscsi's
/// iSCSITMF.AbortTaskSimpleAsync fails a target that says both.)
#[tokio::test]
async fn abort_task_of_a_completed_command_is_task_does_not_exist() {
    let (_server, addr) = start(None).await;
    let s = Session::login(addr, &LoginOptions::normal(INI, IQN))
        .await
        .expect("login");
    clear_ua(&s, 0).await;
    let done = s.next_cmd_sn();
    let data = pattern(4096, 9);
    let w = s.write16(0, 8, data.clone(), BS).await.expect("write");
    assert_eq!(w.status, 0, "write: {:?}", w.sense_key());
    let mut tmf = Pdu::new(op::TASK_MGMT_REQ);
    tmf.bhs[1] = 0x80 | ironblock_target::pdu::tmf::ABORT_TASK;
    tmf.set_lun_raw(ironblock_target::pdu::encode_lun(0));
    tmf.set_ttt(0x7777_0001); // Referenced Task Tag: long gone
    tmf.set_u32(32, done); // RefCmdSN: the completed write's
    let r = s.request(tmf, Bytes::new(), true).await.expect("TMF");
    assert_eq!(r.residual_flags, op::TASK_MGMT_RESP);
    assert_eq!(r.status, 1, "Task does not exist");
    let back = s.read16(0, 8, 8, BS).await.expect("read");
    assert_eq!(back.data, data, "the write stands");
}

#[tokio::test]
async fn nop_out_is_echoed() {
    let (_server, addr) = start(None).await;
    let s = Session::login(addr, &LoginOptions::normal(INI, IQN))
        .await
        .expect("login");
    let echo = s
        .nop(Bytes::from_static(b"ping payload"))
        .await
        .expect("nop");
    assert_eq!(&echo[..], b"ping payload");
}

#[tokio::test]
async fn malformed_pdus_close_only_their_connection() {
    let (server, addr) = start(None).await;
    let good = Session::login(addr, &LoginOptions::normal(INI, IQN))
        .await
        .expect("login");
    clear_ua(&good, 0).await;

    // An unknown opcode is rejected (COMMAND NOT SUPPORTED), the session lives.
    let bad = Session::login(addr, &LoginOptions::normal(INI, IQN))
        .await
        .expect("login 2");
    let mut p = Pdu::new(0x1a);
    p.set_itt(0xdead);
    bad.send_raw(p).await.expect("send");
    let echo = bad
        .nop(Bytes::from_static(b"still here"))
        .await
        .expect("session survives");
    assert_eq!(&echo[..], b"still here");
    let rejected = bad
        .events
        .lock()
        .expect("events")
        .iter()
        .any(|e| e.opcode() == op::REJECT && e.bhs[2] == 0x05);
    assert!(rejected, "expected a Reject with reason 0x05");

    // A data segment beyond MaxRecvDataSegmentLength is a protocol error:
    // Reject (0x04), then the connection closes.
    let mut p = Pdu::new(op::NOP_OUT);
    p.bhs[0] |= 0x40;
    p.set_itt(0xbeef);
    p.set_ttt(RESERVED_TAG);
    p.data = Bytes::from(vec![0u8; 1 << 20]);
    bad.send_raw(p).await.expect("send");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !bad.is_closed() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        bad.is_closed(),
        "target must close the offending connection"
    );
    let rejected = bad
        .events
        .lock()
        .expect("events")
        .iter()
        .any(|e| e.opcode() == op::REJECT && e.bhs[2] == 0x04);
    assert!(
        rejected,
        "expected a Reject with reason 0x04 before the close"
    );

    // Pure garbage on a fresh socket before login: closed, nothing else hurt.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut raw = tokio::net::TcpStream::connect(addr).await.expect("connect");
        raw.write_all(&[0xffu8; 48]).await.expect("write garbage");
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            let mut total = 0;
            loop {
                match raw.read(&mut buf).await {
                    Ok(0) | Err(_) => return total,
                    Ok(n) => total += n,
                }
            }
        })
        .await
        .expect("target must close a garbage connection");
        // It may answer with a login reject first (48 bytes), then closes.
        assert!(n == 0 || n == 48, "unexpected {n} bytes");
    }

    // The well-behaved session still works.
    let data = pattern(4096, 5);
    assert_eq!(
        good.write16(0, 1, data.clone(), BS)
            .await
            .expect("write")
            .status,
        0
    );
    assert_eq!(good.read16(0, 1, 8, BS).await.expect("read").data, data);
    assert!(server.session_count() >= 1);
}

async fn start_with(
    portal: Arc<dyn ironblock_target::server::Portal>,
    config: ServerConfig,
) -> (Server, SocketAddr) {
    let server = Server::new(portal, config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let s = server.clone();
    tokio::spawn(async move { s.serve(listener).await });
    (server, addr)
}

fn one_target() -> Arc<ExportedTarget> {
    let mut luns = LunTable::new();
    luns.insert(
        0,
        Arc::new(LogicalUnit::new(
            Arc::new(MemDevice::new(BS, 1024)),
            LuConfig::default(),
        )),
    );
    Arc::new(ExportedTarget::new(IQN, luns))
}

#[tokio::test]
async fn target_pings_find_dead_initiators() {
    use std::time::Duration;
    let config = ServerConfig {
        nop_interval: Duration::from_millis(300),
        // Generous for the live initiator on a loaded CI machine.
        nop_timeout: Duration::from_millis(1500),
        ..ServerConfig::default()
    };
    let portal = Arc::new(StaticPortal::new(vec![one_target()], None));
    let (server, addr) = start_with(portal, config).await;
    let alive = Session::login(addr, &LoginOptions::normal(INI, IQN))
        .await
        .expect("login");
    let mut opts = LoginOptions::normal(INI, IQN);
    opts.answer_pings = false;
    let dead = Session::login(addr, &opts).await.expect("login");
    // The silent initiator is dropped after a ping interval plus the ping
    // timeout (bounded wait); the answering one stays.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !dead.is_closed() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        dead.is_closed(),
        "target must drop an initiator that ignores NOP-In pings"
    );
    assert!(!alive.is_closed());
    assert!(alive
        .events
        .lock()
        .expect("events")
        .iter()
        .any(|p| p.opcode() == op::NOP_IN));
    assert_eq!(
        alive.nop(Bytes::from_static(b"x")).await.expect("nop"),
        Bytes::from_static(b"x")
    );
    assert_eq!(server.session_count(), 1);
}

#[tokio::test]
async fn shutdown_asks_initiators_to_log_out() {
    let portal = Arc::new(StaticPortal::new(vec![one_target()], None));
    let (server, addr) = start_with(portal, ServerConfig::default()).await;
    let s = Session::login(addr, &LoginOptions::normal(INI, IQN))
        .await
        .expect("login");
    server.shutdown();
    server.drain(std::time::Duration::from_secs(10)).await;
    assert_eq!(server.connection_count(), 0);
    let asked = s
        .events
        .lock()
        .expect("events")
        .iter()
        .any(|p| p.opcode() == op::ASYNC_MSG && p.bhs[36] == 1);
    assert!(
        asked,
        "expected an Async Message with AsyncEvent 1 (logout request)"
    );
}

#[tokio::test]
async fn abort_drops_every_connection_at_once() {
    use tokio::io::AsyncReadExt;
    let portal = Arc::new(StaticPortal::new(vec![one_target()], None));
    let (server, addr) = start_with(portal, ServerConfig::default()).await;
    let s = Session::login(addr, &LoginOptions::normal(INI, IQN))
        .await
        .expect("login");
    // A connection still in its login phase (nothing sent yet).
    let mut raw = tokio::net::TcpStream::connect(addr).await.expect("connect");
    for _ in 0..100 {
        if server.connection_count() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(server.connection_count(), 2);
    let t0 = std::time::Instant::now();
    server.abort();
    // Both closed at once: no logout request, no login timeout.
    let mut buf = [0u8; 48];
    let n = tokio::time::timeout(Duration::from_secs(1), raw.read(&mut buf))
        .await
        .expect("the login-phase connection was closed within 1 s");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    server.drain(Duration::from_secs(1)).await;
    assert_eq!(server.connection_count(), 0);
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    assert!(
        tokio::time::timeout(Duration::from_secs(2), s.test_unit_ready(0))
            .await
            .map_or(true, |r| r.is_err()),
        "the session still answers after abort"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still accepting after abort"
    );
}

/// A policy that sends every normal login elsewhere: the redirect hook.
struct Redirecting;

impl ironblock_target::server::Portal for Redirecting {
    fn decide(
        &self,
        _initiator: &str,
        target: Option<&str>,
    ) -> ironblock_target::login::LoginDecision {
        match target {
            None => ironblock_target::login::LoginDecision::Accept { chap: None },
            Some(_) => ironblock_target::login::LoginDecision::Redirect {
                address: "127.0.0.9:3261".into(),
                permanent: false,
            },
        }
    }
    fn discover(
        &self,
        _initiator: &str,
        local: SocketAddr,
    ) -> Vec<ironblock_target::server::DiscoveredTarget> {
        vec![ironblock_target::server::DiscoveredTarget {
            name: IQN.into(),
            addresses: vec![format!("{local},1")],
        }]
    }
    fn target(&self, _name: &str) -> Option<Arc<ExportedTarget>> {
        None
    }
}

#[tokio::test]
async fn login_can_be_answered_with_a_redirect() {
    let (_server, addr) = start_with(Arc::new(Redirecting), ServerConfig::default()).await;
    let f = login_failure(
        Session::login(addr, &LoginOptions::normal(INI, IQN))
            .await
            .err()
            .expect("redirected login does not complete"),
    );
    assert_eq!(
        (f.class, f.detail),
        (0x01, 0x01),
        "target moved temporarily"
    );
    let to = f
        .text
        .iter()
        .find(|(k, _)| k == "TargetAddress")
        .map(|(_, v)| v.as_str());
    assert_eq!(to, Some("127.0.0.9:3261"));
    // Discovery still answers on the redirector.
    let d = Session::login(addr, &LoginOptions::discovery(INI))
        .await
        .expect("discovery");
    assert_eq!(d.send_targets("All").await.expect("SendTargets")[0].0, IQN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_sessions_at_once_keep_their_data_apart() {
    let (server, addr) = start(None).await;
    let mut tasks = Vec::new();
    for i in 0..24u64 {
        tasks.push(tokio::spawn(async move {
            let s = Session::login(addr, &LoginOptions::normal(&format!("{INI}-{i}"), IQN))
                .await
                .expect("login");
            clear_ua(&s, 1).await;
            // Each session owns 64 blocks of LUN 1 and overwrites them a few times.
            for round in 0..4u8 {
                let data = pattern(64 * 512, (i as u8).wrapping_mul(7).wrapping_add(round));
                assert_eq!(
                    s.write16(1, i * 64, data.clone(), BS)
                        .await
                        .expect("write")
                        .status,
                    0
                );
                assert_eq!(s.read16(1, i * 64, 64, BS).await.expect("read").data, data);
            }
            s
        }));
    }
    let mut sessions = Vec::new();
    for t in tasks {
        sessions.push(t.await.expect("session task"));
    }
    assert_eq!(server.session_count(), 24);
    for s in sessions {
        s.logout().await.expect("logout");
    }
}

#[tokio::test]
async fn metrics_count_io_sessions_and_logins() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (server, addr) = start(Some(chap(false))).await;
    let mut opts = LoginOptions::normal(INI, IQN);
    opts.chap = Some(("alice".into(), "wrong".into()));
    assert!(Session::login(addr, &opts).await.is_err());
    opts.chap = Some(("alice".into(), "secret-of-alice".into()));
    let s = Session::login(addr, &opts).await.expect("login");
    clear_ua(&s, 0).await;
    let data = pattern(8192, 3);
    assert_eq!(
        s.write16(0, 0, data.clone(), BS)
            .await
            .expect("write")
            .status,
        0
    );
    assert_eq!(s.read16(0, 0, 16, BS).await.expect("read").data, data);

    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let maddr = l.local_addr().expect("addr");
    let m = server.metrics();
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(ironblock_target::metrics::serve_http(
        l,
        Arc::new(move || m.render()),
        stop.clone(),
    ));
    let mut sock = tokio::net::TcpStream::connect(maddr)
        .await
        .expect("connect");
    sock.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("send");
    let mut text = String::new();
    sock.read_to_string(&mut text).await.expect("read");
    stop.cancel();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    for want in [
        "ironblock_target_scsi_bytes_total{kind=\"Write\"} 8192",
        "ironblock_target_scsi_bytes_total{kind=\"Read\"} 8192",
        "ironblock_target_logins_total{outcome=\"auth_failure\"} 1",
        "ironblock_target_logins_total{outcome=\"success\"} 1",
        "ironblock_target_sessions 1",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
}
