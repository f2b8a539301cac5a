//! The chunk portal probe: is the chunk's iSCSI target answering, not only
//! its kernel?
//!
//! A TCP connect is not enough. The kernel of a hung host (a frozen
//! process, a paused container, a stuck runtime) still completes the
//! handshake into the listen backlog, so a connect-only probe calls it
//! alive, and a reconnecting initiator is sent straight back to it, where
//! its login waits out the initiator's login timeout.
//!
//! So the probe opens the first step of a discovery login: one Login
//! Request in the security stage that does not ask to transit (T=0), and it
//! needs any Login Response back, success or not (a target that wants CHAP
//! answers too). Only the target's own code sends that. The probe then
//! closes the connection: no session is made, and the target counts no
//! login.
//!
//! [`login_probe`] is the wire form (pure, tested), [`answers`] the check
//! of the reply; [`probe`] and [`probe_blocking`] are thin I/O shells.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use ironblock_target::codec::encode_parts;
use ironblock_target::pdu::{op, BHS_LEN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The initiator name the probe logs in with (shown in a target's logs
/// only if it logs login attempts).
pub const PROBE_INITIATOR: &str = "iqn.2026-11.dev.ironblock:redirector-probe";

/// The probe's Login Request: the I bit and opcode 0x03, flags 0 (T=0,
/// CSG=NSG=security), ISID of the random format with fixed bytes, TSIH 0,
/// and the keys of a discovery login.
pub fn login_probe() -> &'static [u8] {
    static WIRE: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(encode_login_probe);
    &WIRE
}

fn encode_login_probe() -> Vec<u8> {
    let text = format!("InitiatorName={PROBE_INITIATOR}\0SessionType=Discovery\0AuthMethod=None\0");
    let mut bhs = [0u8; BHS_LEN];
    bhs[0] = 0x40 | op::LOGIN_REQ;
    // Flags 0: no transit, CSG 0 and NSG 0 (security negotiation).
    bhs[1] = 0;
    let len = text.len() as u32;
    bhs[5..8].copy_from_slice(&len.to_be_bytes()[1..]);
    // ISID: type 0b10 (random), then fixed bytes ("IBP").
    bhs[8..14].copy_from_slice(&[0x80, 0x00, 0x00, 0x49, 0x42, 0x50]);
    // ITT 1; CID 0; CmdSN 0; ExpStatSN 0.
    bhs[16..20].copy_from_slice(&1u32.to_be_bytes());
    let mut out = BytesMut::new();
    encode_parts(false, false, &bhs, &[], text.as_bytes(), &mut out);
    out.to_vec()
}

/// Whether `header` (the first bytes of the reply) is a Login Response.
pub fn answers(header: &[u8]) -> bool {
    header.len() >= BHS_LEN && header[0] & 0x3f == op::LOGIN_RESP
}

/// Probe `portal` (`host:port`) within `timeout` in all: connect, send
/// [`login_probe`], read a header that [`answers`].
pub async fn probe(portal: &str, timeout: Duration) -> bool {
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(portal).await.ok()?;
        s.write_all(login_probe()).await.ok()?;
        let mut header = [0u8; BHS_LEN];
        s.read_exact(&mut header).await.ok()?;
        Some(answers(&header))
    };
    matches!(
        tokio::time::timeout(timeout, exchange).await,
        Ok(Some(true))
    )
}

/// [`probe`] on a blocking socket, for the check right before a redirect
/// (which runs in synchronous code).
pub fn probe_blocking(addr: &SocketAddr, timeout: Duration) -> bool {
    let start = Instant::now();
    let left = || {
        timeout
            .saturating_sub(start.elapsed())
            .max(Duration::from_millis(1))
    };
    let exchange = || -> std::io::Result<bool> {
        let mut s = std::net::TcpStream::connect_timeout(addr, timeout)?;
        s.set_write_timeout(Some(left()))?;
        s.write_all(login_probe())?;
        let mut header = [0u8; BHS_LEN];
        let mut got = 0;
        while got < BHS_LEN {
            s.set_read_timeout(Some(left()))?;
            let n = s.read(&mut header[got..])?;
            if n == 0 || start.elapsed() >= timeout {
                return Ok(false);
            }
            got += n;
        }
        Ok(answers(&header))
    };
    exchange().unwrap_or(false)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ironblock_target::codec::{Inbound, PduCodec};
    use tokio_util::codec::Decoder;

    #[test]
    fn the_probe_is_one_login_request_that_does_not_transit() {
        let wire = login_probe();
        let mut codec = PduCodec::new(8192);
        let mut buf = BytesMut::from(wire);
        let Ok(Some(Inbound::Pdu(p))) = codec.decode(&mut buf) else {
            panic!("the probe does not decode as one PDU");
        };
        assert!(buf.is_empty(), "nothing after the one PDU");
        assert_eq!(p.opcode(), op::LOGIN_REQ);
        assert!(p.immediate());
        assert_eq!(p.flags() & 0x80, 0, "T=0: the login never completes");
        assert_eq!(p.flags() & 0x0f, 0, "CSG=NSG=security");
        assert_eq!(p.tsih(), 0);
        let text = String::from_utf8_lossy(&p.data);
        assert!(text.contains("SessionType=Discovery\0"));
        assert!(text.contains(&format!("InitiatorName={PROBE_INITIATOR}\0")));
    }

    /// A portal whose target answers the probe: on a thread of its own, it
    /// reads a header and answers with a Login Response header, for every
    /// connection `live` accepts.
    pub(crate) fn answer_probes(live: std::net::TcpListener) {
        std::thread::spawn(move || {
            for mut s in live.incoming().flatten() {
                let mut req = [0u8; BHS_LEN];
                if s.read_exact(&mut req).is_ok() {
                    let mut h = [0u8; BHS_LEN];
                    h[0] = op::LOGIN_RESP;
                    let _ = s.write_all(&h);
                }
            }
        });
    }

    /// A portal whose kernel accepts connections but whose target never
    /// answers (a frozen chunk: the listener's backlog takes the handshake)
    /// fails the probe; one that answers with a Login Response passes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_portal_that_accepts_but_never_answers_fails_the_probe() {
        let frozen = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let frozen_addr = frozen.local_addr().unwrap();
        let live = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let live_addr = live.local_addr().unwrap();
        answer_probes(live);
        let t = Duration::from_millis(300);
        assert!(!probe(&frozen_addr.to_string(), t).await);
        assert!(!probe_blocking(&frozen_addr, t));
        assert!(probe(&live_addr.to_string(), Duration::from_secs(5)).await);
        assert!(probe_blocking(&live_addr, Duration::from_secs(5)));
        drop(frozen);
    }

    #[test]
    fn only_a_login_response_counts_as_an_answer() {
        let mut h = [0u8; BHS_LEN];
        h[0] = op::LOGIN_RESP;
        assert!(answers(&h));
        h[0] = op::REJECT;
        assert!(!answers(&h));
        assert!(!answers(&h[..10]));
    }
}
