//! Seeded random and mutated PDUs against a live target (bounded in count
//! and time). The target must never crash, must answer or close the
//! offending connection, and a well-behaved session beside it must keep
//! working with its data intact. Reproduce a failure with the printed seed:
//! `GARBAGE_SEED=<seed> cargo test -p ironblock-tests --test garbage`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ironblock_target::pdu::{op, Pdu};
use ironblock_target::scsi::mem_device::MemDevice;
use ironblock_target::scsi::{LogicalUnit, LuConfig, LunTable};
use ironblock_target::server::{ExportedTarget, Server, ServerConfig, StaticPortal};
use ironblock_tests::initiator::{LoginOptions, Session};
use rand::{Rng, RngCore, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The well-behaved session's target.
const IQN: &str = "iqn.2026-11.dev.ironblock:good";
/// The target the garbage sessions log in to: their random (but well
/// formed) SCSI commands may legitimately write, reserve or reset it.
const IQN_VICTIM: &str = "iqn.2026-11.dev.ironblock:victim";
const INI: &str = "iqn.2026-11.dev.ironblock:fuzzer";

async fn start() -> (Server, SocketAddr) {
    let mut targets = Vec::new();
    for name in [IQN, IQN_VICTIM] {
        let mut luns = LunTable::new();
        let dev = Arc::new(MemDevice::new(512, 4096));
        luns.insert(0, Arc::new(LogicalUnit::new(dev, LuConfig::default())));
        targets.push(Arc::new(ExportedTarget::new(name, luns)));
    }
    let server = Server::new(
        Arc::new(StaticPortal::new(targets, None)),
        ServerConfig {
            login_timeout: Duration::from_secs(2),
            ..ServerConfig::default()
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let s = server.clone();
    tokio::spawn(async move { s.serve(listener).await });
    (server, addr)
}

/// A PDU whose header fields are random but plausible, or fully random.
fn random_pdu(rng: &mut impl RngCore) -> Vec<u8> {
    let ops = [
        op::NOP_OUT,
        op::SCSI_COMMAND,
        op::TASK_MGMT_REQ,
        op::LOGIN_REQ,
        op::TEXT_REQ,
        op::DATA_OUT,
        op::LOGOUT_REQ,
        op::SNACK,
        0x1c,
        0x3f,
    ];
    let mut p = Pdu::new(ops[rng.gen_range(0..ops.len())]);
    rng.fill_bytes(&mut p.bhs[1..4]);
    rng.fill_bytes(&mut p.bhs[8..48]);
    if rng.gen_bool(0.3) {
        p.bhs[0] |= 0x40;
    }
    let len = match rng.gen_range(0..4) {
        0 => 0,
        1 => rng.gen_range(1..64),
        2 => rng.gen_range(64..9000),
        _ => rng.gen_range(9000..300_000),
    };
    let mut data = vec![0u8; len];
    rng.fill_bytes(&mut data);
    p.data = Bytes::from(data);
    if rng.gen_bool(0.2) {
        let mut ahs = vec![0u8; 4 * rng.gen_range(1..4)];
        rng.fill_bytes(&mut ahs);
        p.ahs = Bytes::from(ahs);
    }
    let mut wire = bytes::BytesMut::new();
    p.fix_lengths();
    ironblock_target::codec::encode_parts(false, false, &p.bhs, &p.ahs, &p.data, &mut wire);
    let mut v = wire.to_vec();
    // Sometimes corrupt the framing itself.
    if rng.gen_bool(0.2) && !v.is_empty() {
        let i = rng.gen_range(0..v.len().min(48));
        v[i] = rng.gen();
    }
    if rng.gen_bool(0.1) {
        v.truncate(rng.gen_range(0..v.len().max(1)));
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_pdus_never_hurt_other_sessions() {
    let seed: u64 = std::env::var("GARBAGE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    println!("GARBAGE_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (server, addr) = start().await;

    let good = Session::login(addr, &LoginOptions::normal(INI, IQN))
        .await
        .expect("login");
    for _ in 0..3 {
        let _ = good.test_unit_ready(0).await;
    }
    let data = Bytes::from(vec![0x5au8; 8192]);
    assert_eq!(
        good.write16(0, 10, data.clone(), 512)
            .await
            .expect("write")
            .status,
        0
    );

    let long = std::env::var("IRONBLOCK_LONG").is_ok_and(|v| v == "1");
    let rounds = if long { 2000 } else { 150 };
    let deadline = Instant::now() + Duration::from_secs(if long { 600 } else { 60 });
    let mut logged_in_rounds = 0;
    for round in 0..rounds {
        if Instant::now() > deadline {
            break;
        }
        // Half the rounds log in first, so full-feature-phase parsing is
        // exercised too; the rest hit the login phase with garbage.
        let pdus: Vec<Vec<u8>> = (0..rng.gen_range(1..6))
            .map(|_| random_pdu(&mut rng))
            .collect();
        if rng.gen_bool(0.5) {
            let s = match Session::login(addr, &LoginOptions::normal(INI, IQN_VICTIM)).await {
                Ok(s) => s,
                Err(e) => panic!("round {round}: login failed: {e} (seed {seed})"),
            };
            logged_in_rounds += 1;
            for p in pdus {
                let mut pdu = Pdu::new(0);
                if p.len() >= 48 {
                    pdu.bhs.copy_from_slice(&p[..48]);
                    pdu.data = Bytes::copy_from_slice(&p[48..]);
                    // Keep the declared length honest half the time.
                    if rng.gen_bool(0.5) {
                        pdu.fix_lengths();
                    }
                }
                if s.send_raw(pdu).await.is_err() {
                    break;
                }
            }
            drop(s);
        } else {
            let Ok(mut sock) = tokio::net::TcpStream::connect(addr).await else {
                panic!("round {round}: target stopped accepting (seed {seed})");
            };
            for p in pdus {
                if sock.write_all(&p).await.is_err() {
                    break;
                }
            }
            let _ = sock.shutdown().await;
            let mut buf = [0u8; 4096];
            // The target answers or closes; either way it must not hang us.
            let _ = tokio::time::timeout(Duration::from_secs(3), async {
                while let Ok(n) = sock.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            })
            .await;
        }
        // The good session still works and its data is intact.
        let r = good
            .read16(0, 10, 16, 512)
            .await
            .unwrap_or_else(|e| panic!("round {round}: the good session broke: {e} (seed {seed})"));
        assert_eq!(
            (r.status, r.sense_key()),
            (0, None),
            "round {round}: the good session's read failed (seed {seed})"
        );
        assert_eq!(r.data, data, "round {round}: data changed (seed {seed})");
    }
    assert!(logged_in_rounds > 0);
    // Every garbage connection is gone again (bounded wait).
    server.drain_until(2, Duration::from_secs(20)).await;
    assert!(
        server.connection_count() <= 2,
        "{} connections still open after the garbage rounds (seed {seed})",
        server.connection_count()
    );
}
