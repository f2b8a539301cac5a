//! A small iSCSI initiator for tests and load generation.
//!
//! It speaks just enough RFC 7143 to drive a target the way real initiators
//! do: login (security stage with optional one-way/mutual CHAP, operational
//! stage with digests), SendTargets discovery, and pipelined SCSI commands
//! with immediate data and R2T-solicited Data-Out. It is deliberately not
//! built on the target crate's connection code, only on its PDU codec, so
//! the two sides do not share protocol logic.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use ironblock_target::codec::{encode_parts, Inbound, PduCodec};
use ironblock_target::pdu::{op, Pdu, RESERVED_TAG};
use md5::{Digest, Md5};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_util::codec::FramedRead;

/// How to log in.
#[derive(Debug, Clone)]
pub struct LoginOptions {
    pub initiator: String,
    /// `None`: discovery session.
    pub target: Option<String>,
    /// One-way CHAP: name and secret.
    pub chap: Option<(String, String)>,
    /// Mutual CHAP: the secret we expect the target to prove.
    pub mutual_secret: Option<String>,
    pub header_digest: bool,
    pub data_digest: bool,
    pub immediate_data: bool,
    pub initial_r2t: bool,
    /// Answer target NOP-In pings (a real initiator does; turn off to play
    /// a dead initiator).
    pub answer_pings: bool,
}

impl LoginOptions {
    pub fn normal(initiator: &str, target: &str) -> Self {
        LoginOptions {
            initiator: initiator.into(),
            target: Some(target.into()),
            chap: None,
            mutual_secret: None,
            header_digest: false,
            data_digest: false,
            immediate_data: true,
            initial_r2t: false,
            answer_pings: true,
        }
    }
    pub fn discovery(initiator: &str) -> Self {
        LoginOptions {
            target: None,
            ..Self::normal(initiator, "")
        }
    }
}

/// Why a login failed: the status class/detail from the target.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("login failed: status {class:#04x}/{detail:#04x} {text:?}")]
pub struct LoginFailure {
    pub class: u8,
    pub detail: u8,
    /// Text keys of the failing response (e.g. TargetAddress of a redirect).
    pub text: Vec<(String, String)>,
}

/// Result of one SCSI command.
#[derive(Debug, Clone)]
pub struct ScsiReply {
    pub status: u8,
    pub sense: Bytes,
    pub data: Bytes,
    /// Residual flags byte (O = 0x04, U = 0x02) and count.
    pub residual_flags: u8,
    pub residual: u32,
}

impl ScsiReply {
    /// (sense key, ASC, ASCQ) of fixed-format sense, if any.
    pub fn sense_key(&self) -> Option<(u8, u8, u8)> {
        if self.sense.len() >= 14 {
            Some((self.sense[2] & 0x0f, self.sense[12], self.sense[13]))
        } else {
            None
        }
    }
}

type Waiters = Arc<Mutex<HashMap<u32, Pending>>>;

struct Pending {
    tx: oneshot::Sender<Result<ScsiReply>>,
    write_data: Bytes,
    lun_raw: u64,
    data_in: BytesMut,
}

struct Wire {
    io: OwnedWriteHalf,
    hd: bool,
    dd: bool,
    buf: BytesMut,
}

impl Wire {
    async fn send(&mut self, mut p: Pdu) -> Result<()> {
        p.fix_lengths();
        self.buf.clear();
        encode_parts(self.hd, self.dd, &p.bhs, &p.ahs, &p.data, &mut self.buf);
        self.io.write_all(&self.buf).await?;
        Ok(())
    }
}

/// A logged-in session.
pub struct Session {
    wire: Arc<tokio::sync::Mutex<Wire>>,
    waiters: Waiters,
    cmd_sn: Arc<AtomicU32>,
    itt: AtomicU32,
    exp_stat_sn: Arc<AtomicU32>,
    /// Parameters the target answered in the operational stage.
    pub negotiated: HashMap<String, String>,
    /// Target's MaxRecvDataSegmentLength: the most we may send per PDU.
    pub target_mrdsl: u32,
    pub first_burst: u32,
    pub immediate_data: bool,
    pub initial_r2t: bool,
    reader: Option<tokio::task::JoinHandle<()>>,
    pending_reader: Option<FramedRead<OwnedReadHalf, PduCodec>>,
    /// Async messages and unsolicited NOP-Ins seen by the reader.
    pub events: Arc<Mutex<Vec<Pdu>>>,
}

fn text_encode(pairs: &[(&str, String)]) -> Bytes {
    let mut v = Vec::new();
    for (k, val) in pairs {
        v.extend_from_slice(k.as_bytes());
        v.push(b'=');
        v.extend_from_slice(val.as_bytes());
        v.push(0);
    }
    Bytes::from(v)
}

pub fn text_decode(d: &[u8]) -> Vec<(String, String)> {
    d.split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .filter_map(|s| {
            let s = String::from_utf8_lossy(s);
            s.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

fn hex_decode(v: &str) -> Result<Vec<u8>> {
    let h = v
        .strip_prefix("0x")
        .or_else(|| v.strip_prefix("0X"))
        .context("CHAP value not hex")?;
    hex::decode(h).context("bad hex")
}

fn chap_response(id: u8, secret: &[u8], challenge: &[u8]) -> Vec<u8> {
    let mut m = Md5::new();
    m.update([id]);
    m.update(secret);
    m.update(challenge);
    m.finalize().to_vec()
}

impl Session {
    /// Connect and log in.
    pub async fn login(addr: SocketAddr, opts: &LoginOptions) -> Result<Session> {
        let stream = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
            .await
            .context("connect timed out")??;
        stream.set_nodelay(true)?;
        let (rd, wr) = stream.into_split();
        let reader = FramedRead::new(rd, PduCodec::new(16 << 20));
        let wire = Wire {
            io: wr,
            hd: false,
            dd: false,
            buf: BytesMut::new(),
        };
        // A distinct ISID per session so parallel sessions of one initiator
        // name are separate I_T nexuses (not reinstatements of each other).
        static NEXT_ISID: AtomicU32 = AtomicU32::new(1);
        let n = NEXT_ISID.fetch_add(1, Ordering::Relaxed).to_be_bytes();
        let isid = [0x80, 0x00, n[0], n[1], n[2], n[3]];
        let kind = if opts.target.is_some() {
            "Normal"
        } else {
            "Discovery"
        };
        Self::login_exchange(reader, wire, isid, opts, kind).await
    }

    async fn login_exchange(
        mut reader: FramedRead<OwnedReadHalf, PduCodec>,
        mut wire: Wire,
        isid: [u8; 6],
        opts: &LoginOptions,
        kind: &str,
    ) -> Result<Session> {
        let mut exp_stat_sn = 0u32;
        let mut negotiated: HashMap<String, String> = HashMap::new();
        // --- security stage ---
        let mut keys: Vec<(&str, String)> = vec![
            ("InitiatorName", opts.initiator.clone()),
            ("SessionType", kind.into()),
        ];
        if let Some(t) = &opts.target {
            keys.push(("TargetName", t.clone()));
        }
        keys.push((
            "AuthMethod",
            if opts.chap.is_some() {
                "CHAP,None".into()
            } else {
                "None".into()
            },
        ));
        let mut resp = Self::login_pdu(
            &mut wire,
            &mut reader,
            isid,
            0,
            1,
            true,
            &keys,
            &mut exp_stat_sn,
        )
        .await?;
        let mut got = text_decode(&resp.data);
        let auth = got
            .iter()
            .find(|(k, _)| k == "AuthMethod")
            .map(|(_, v)| v.clone());
        if auth.as_deref() == Some("CHAP") {
            let (user, secret) = opts
                .chap
                .clone()
                .context("target wants CHAP but none configured")?;
            resp = Self::login_pdu(
                &mut wire,
                &mut reader,
                isid,
                0,
                1,
                false,
                &[("CHAP_A", "5".into())],
                &mut exp_stat_sn,
            )
            .await?;
            got = text_decode(&resp.data);
            let id: u8 = got
                .iter()
                .find(|(k, _)| k == "CHAP_I")
                .and_then(|(_, v)| v.parse().ok())
                .context("no CHAP_I")?;
            let challenge = hex_decode(
                &got.iter()
                    .find(|(k, _)| k == "CHAP_C")
                    .context("no CHAP_C")?
                    .1,
            )?;
            let r = chap_response(id, secret.as_bytes(), &challenge);
            let mut keys = vec![
                ("CHAP_N", user.clone()),
                ("CHAP_R", format!("0x{}", hex::encode(r))),
            ];
            let my_id = 77u8;
            let my_challenge: Vec<u8> = (0..16u8)
                .map(|i| i.wrapping_mul(37).wrapping_add(11))
                .collect();
            if opts.mutual_secret.is_some() {
                keys.push(("CHAP_I", my_id.to_string()));
                keys.push(("CHAP_C", format!("0x{}", hex::encode(&my_challenge))));
            }
            resp = Self::login_pdu(
                &mut wire,
                &mut reader,
                isid,
                0,
                1,
                true,
                &keys,
                &mut exp_stat_sn,
            )
            .await?;
            got = text_decode(&resp.data);
            if let Some(ms) = &opts.mutual_secret {
                let r = hex_decode(
                    &got.iter()
                        .find(|(k, _)| k == "CHAP_R")
                        .context("target sent no CHAP_R")?
                        .1,
                )?;
                if r != chap_response(my_id, ms.as_bytes(), &my_challenge) {
                    bail!("target failed mutual CHAP");
                }
            }
        }
        for (k, v) in got {
            negotiated.insert(k, v);
        }
        // The security stage must have transited to operational.
        if resp.flags() & 0x80 == 0 {
            // Target wants more security exchanges: send an empty transit request.
            Self::login_pdu(
                &mut wire,
                &mut reader,
                isid,
                0,
                1,
                true,
                &[],
                &mut exp_stat_sn,
            )
            .await?;
        }
        // --- operational stage ---
        let bool_s = |b: bool| {
            if b {
                "Yes".to_string()
            } else {
                "No".to_string()
            }
        };
        let mut keys: Vec<(&str, String)> = vec![
            (
                "HeaderDigest",
                if opts.header_digest {
                    "CRC32C".into()
                } else {
                    "None".into()
                },
            ),
            (
                "DataDigest",
                if opts.data_digest {
                    "CRC32C".into()
                } else {
                    "None".into()
                },
            ),
            ("MaxRecvDataSegmentLength", "262144".into()),
        ];
        if opts.target.is_some() {
            keys.extend([
                ("InitialR2T", bool_s(opts.initial_r2t)),
                ("ImmediateData", bool_s(opts.immediate_data)),
                ("MaxBurstLength", "16776192".into()),
                ("FirstBurstLength", "262144".into()),
                ("MaxOutstandingR2T", "1".into()),
                ("ErrorRecoveryLevel", "0".into()),
                ("MaxConnections", "1".into()),
            ]);
        }
        let mut resp = Self::login_pdu(
            &mut wire,
            &mut reader,
            isid,
            1,
            3,
            true,
            &keys,
            &mut exp_stat_sn,
        )
        .await?;
        for (k, v) in text_decode(&resp.data) {
            negotiated.insert(k, v);
        }
        while resp.flags() & 0x80 == 0 || resp.flags() & 0x03 != 3 {
            resp = Self::login_pdu(
                &mut wire,
                &mut reader,
                isid,
                1,
                3,
                true,
                &[],
                &mut exp_stat_sn,
            )
            .await?;
            for (k, v) in text_decode(&resp.data) {
                negotiated.insert(k, v);
            }
        }
        let hd = negotiated
            .get("HeaderDigest")
            .map(|v| v == "CRC32C")
            .unwrap_or(false);
        let dd = negotiated
            .get("DataDigest")
            .map(|v| v == "CRC32C")
            .unwrap_or(false);
        wire.hd = hd;
        wire.dd = dd;
        reader.decoder_mut().set_digests(hd, dd);
        let num = |k: &str, d: u32| negotiated.get(k).and_then(|v| v.parse().ok()).unwrap_or(d);
        let yes = |k: &str, d: bool| negotiated.get(k).map(|v| v == "Yes").unwrap_or(d);
        let session = Session {
            wire: Arc::new(tokio::sync::Mutex::new(wire)),
            waiters: Arc::new(Mutex::new(HashMap::new())),
            cmd_sn: Arc::new(AtomicU32::new(resp.u32_at(28))),
            itt: AtomicU32::new(0x100),
            exp_stat_sn: Arc::new(AtomicU32::new(exp_stat_sn)),
            target_mrdsl: num("MaxRecvDataSegmentLength", 8192),
            first_burst: num("FirstBurstLength", 65536),
            immediate_data: yes("ImmediateData", true),
            initial_r2t: yes("InitialR2T", true),
            negotiated,
            reader: None,
            pending_reader: Some(reader),
            events: Arc::new(Mutex::new(Vec::new())),
        };
        Ok(session.start(opts.answer_pings))
    }

    #[allow(clippy::too_many_arguments)]
    async fn login_pdu(
        wire: &mut Wire,
        reader: &mut FramedRead<OwnedReadHalf, PduCodec>,
        isid: [u8; 6],
        csg: u8,
        nsg: u8,
        transit: bool,
        keys: &[(&str, String)],
        exp_stat_sn: &mut u32,
    ) -> Result<Pdu> {
        let mut p = Pdu::new(op::LOGIN_REQ);
        p.bhs[0] = 0x40 | op::LOGIN_REQ;
        p.set_flags((if transit { 0x80 } else { 0 }) | (csg << 2) | if transit { nsg } else { 0 });
        p.bhs[8..14].copy_from_slice(&isid);
        p.set_itt(1);
        p.set_u32(28, *exp_stat_sn);
        p.data = text_encode(keys);
        wire.send(p).await?;
        let r = match tokio::time::timeout(Duration::from_secs(10), reader.next()).await {
            Ok(Some(Ok(Inbound::Pdu(r)))) => r,
            Ok(Some(Ok(Inbound::DataDigestError(_)))) => bail!("digest error during login"),
            Ok(Some(Ok(Inbound::Oversized(_)))) => bail!("oversized PDU during login"),
            Ok(Some(Err(e))) => bail!("framing error during login: {e}"),
            Ok(None) => bail!("connection closed during login"),
            Err(_) => bail!("login response timed out"),
        };
        if r.opcode() != op::LOGIN_RESP {
            bail!("expected a Login Response, got opcode {:#x}", r.opcode());
        }
        *exp_stat_sn = r.stat_sn().wrapping_add(1);
        if r.bhs[36] != 0 {
            return Err(anyhow!(LoginFailure {
                class: r.bhs[36],
                detail: r.bhs[37],
                text: text_decode(&r.data),
            }));
        }
        Ok(r)
    }

    fn start(mut self, answer_pings: bool) -> Session {
        let Some(mut reader) = self.pending_reader.take() else {
            return self;
        };
        let waiters = self.waiters.clone();
        let wire = self.wire.clone();
        let exp = self.exp_stat_sn.clone();
        let events = self.events.clone();
        let mrdsl = self.target_mrdsl as usize;
        self.reader = Some(tokio::spawn(async move {
            while let Some(Ok(Inbound::Pdu(p))) = reader.next().await {
                let itt = p.itt();
                match p.opcode() {
                    op::DATA_IN => {
                        let status = p.flags() & 0x01 != 0;
                        let mut done = None;
                        if let Ok(mut w) = waiters.lock() {
                            if let Some(pd) = w.get_mut(&itt) {
                                let off = p.buffer_offset() as usize;
                                if pd.data_in.len() < off + p.data.len() {
                                    pd.data_in.resize(off + p.data.len(), 0);
                                }
                                pd.data_in[off..off + p.data.len()].copy_from_slice(&p.data);
                            }
                            if status {
                                exp.store(p.stat_sn().wrapping_add(1), Ordering::Release);
                                done = w
                                    .remove(&itt)
                                    .map(|pd| (pd, p.bhs[3], p.flags() & 0x06, p.u32_at(44)));
                            }
                        }
                        if let Some((pd, st, rf, res)) = done {
                            let _ = pd.tx.send(Ok(ScsiReply {
                                status: st,
                                sense: Bytes::new(),
                                data: pd.data_in.freeze(),
                                residual_flags: rf,
                                residual: res,
                            }));
                        }
                    }
                    op::SCSI_RESPONSE => {
                        exp.store(p.stat_sn().wrapping_add(1), Ordering::Release);
                        let pd = waiters.lock().ok().and_then(|mut w| w.remove(&itt));
                        if let Some(pd) = pd {
                            let sense = if p.data.len() >= 2 {
                                let n = u16::from_be_bytes([p.data[0], p.data[1]]) as usize;
                                p.data.slice(2..(2 + n).min(p.data.len()))
                            } else {
                                Bytes::new()
                            };
                            let _ = pd.tx.send(Ok(ScsiReply {
                                status: p.bhs[3],
                                sense,
                                data: pd.data_in.freeze(),
                                residual_flags: p.flags() & 0x06,
                                residual: p.u32_at(44),
                            }));
                        }
                    }
                    op::R2T => {
                        let (data, lun) =
                            match waiters.lock().ok().and_then(|w| {
                                w.get(&itt).map(|pd| (pd.write_data.clone(), pd.lun_raw))
                            }) {
                                Some(x) => x,
                                None => continue,
                            };
                        let off = p.u32_at(40) as usize;
                        let len = p.u32_at(44) as usize;
                        let ttt = p.ttt();
                        let end = (off + len).min(data.len());
                        let mut pos = off;
                        let mut sn = 0u32;
                        let mut w = wire.lock().await;
                        while pos < end {
                            let n = (end - pos).min(mrdsl);
                            let mut d = Pdu::new(op::DATA_OUT);
                            d.set_flags(if pos + n == end { 0x80 } else { 0 });
                            d.set_lun_raw(lun);
                            d.set_itt(itt);
                            d.set_ttt(ttt);
                            d.set_u32(28, exp.load(Ordering::Acquire));
                            d.set_u32(36, sn);
                            d.set_u32(40, pos as u32);
                            d.data = data.slice(pos..pos + n);
                            sn += 1;
                            pos += n;
                            if w.send(d).await.is_err() {
                                return;
                            }
                        }
                    }
                    op::NOP_IN => {
                        if p.ttt() != RESERVED_TAG && answer_pings {
                            // Target ping: answer it.
                            let mut r = Pdu::new(op::NOP_OUT);
                            r.bhs[0] = 0x40 | op::NOP_OUT;
                            r.set_itt(RESERVED_TAG);
                            r.set_ttt(p.ttt());
                            r.set_lun_raw(p.lun_raw());
                            let _ = wire.lock().await.send(r).await;
                        }
                        if let Ok(mut e) = events.lock() {
                            e.push(p.clone());
                        }
                        if let Some(pd) = waiters.lock().ok().and_then(|mut w| w.remove(&itt)) {
                            let _ = pd.tx.send(Ok(ScsiReply {
                                status: 0,
                                sense: Bytes::new(),
                                data: p.data.clone(),
                                residual_flags: 0,
                                residual: 0,
                            }));
                        }
                    }
                    _ => {
                        // Text/TMF/Logout/Reject responses: hand back the raw PDU.
                        if let Ok(mut e) = events.lock() {
                            e.push(p.clone());
                        }
                        if let Some(pd) = waiters.lock().ok().and_then(|mut w| w.remove(&itt)) {
                            let _ = pd.tx.send(Ok(ScsiReply {
                                status: p.bhs[2],
                                sense: Bytes::from(p.bhs.to_vec()),
                                data: p.data.clone(),
                                residual_flags: p.opcode(),
                                residual: 0,
                            }));
                        }
                    }
                }
            }
            // Connection gone: fail every waiter.
            if let Ok(mut w) = waiters.lock() {
                for (_, pd) in w.drain() {
                    let _ = pd.tx.send(Err(anyhow!("connection closed")));
                }
            }
        }));
        self
    }

    /// Log in at `addr` the way a real initiator logs in at a portal: a
    /// login redirect (status class 0x01, `TargetAddress`) is followed to
    /// the named portal, up to `max_hops` redirects. Returns the portal the
    /// session runs on and the session. A failed login or a redirect loop
    /// longer than `max_hops` is an error (the [`LoginFailure`] of the last
    /// portal when it refused).
    pub async fn login_following_redirects(
        addr: SocketAddr,
        opts: &LoginOptions,
        max_hops: usize,
    ) -> Result<(SocketAddr, Session)> {
        let mut at = addr;
        for _ in 0..=max_hops {
            match Session::login(at, opts).await {
                Ok(s) => return Ok((at, s)),
                Err(e) => {
                    let Some(f) = e.downcast_ref::<LoginFailure>() else {
                        return Err(e.context(format!("login at {at}")));
                    };
                    if f.class != 0x01 {
                        return Err(e);
                    }
                    let to = f
                        .text
                        .iter()
                        .find(|(k, _)| k == "TargetAddress")
                        .map(|(_, v)| v.split(',').next().unwrap_or(v).to_string())
                        .context("redirect without TargetAddress")?;
                    at = to
                        .parse()
                        .with_context(|| format!("redirect to an unusable address {to:?}"))?;
                }
            }
        }
        bail!("more than {max_hops} login redirects starting at {addr}")
    }

    /// The CmdSN the next non-immediate request will carry.
    pub fn next_cmd_sn(&self) -> u32 {
        self.cmd_sn.load(Ordering::Acquire)
    }

    fn next_itt(&self) -> u32 {
        self.itt.fetch_add(1, Ordering::Relaxed)
    }

    /// Send `p` (ITT, CmdSN and ExpStatSN are filled in) and wait for the
    /// reply with the same ITT.
    pub async fn request(
        &self,
        mut p: Pdu,
        write_data: Bytes,
        immediate: bool,
    ) -> Result<ScsiReply> {
        let itt = self.next_itt();
        p.set_itt(itt);
        let (tx, rx) = oneshot::channel();
        if let Ok(mut w) = self.waiters.lock() {
            w.insert(
                itt,
                Pending {
                    tx,
                    write_data,
                    lun_raw: p.lun_raw(),
                    data_in: BytesMut::new(),
                },
            );
        }
        {
            let mut wire = self.wire.lock().await;
            let sn = if immediate {
                p.bhs[0] |= 0x40;
                self.cmd_sn.load(Ordering::Acquire)
            } else {
                self.cmd_sn.fetch_add(1, Ordering::AcqRel)
            };
            p.set_u32(24, sn);
            p.set_u32(28, self.exp_stat_sn.load(Ordering::Acquire));
            wire.send(p).await?;
        }
        match tokio::time::timeout(Duration::from_secs(30), rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => bail!("connection closed"),
            Err(_) => bail!("command timed out"),
        }
    }

    /// A SCSI command to `lun`. `data_out` is sent as immediate data (up to
    /// what the target allows) and the rest on R2T.
    pub async fn scsi(
        &self,
        lun: u64,
        cdb: &[u8],
        data_out: Bytes,
        data_in_len: u32,
    ) -> Result<ScsiReply> {
        let mut p = Pdu::new(op::SCSI_COMMAND);
        let mut flags = 0x80 | 0x01; // F, SIMPLE
        if data_in_len > 0 {
            flags |= 0x40;
        }
        if !data_out.is_empty() {
            flags |= 0x20;
        }
        p.set_lun_raw(ironblock_target::pdu::encode_lun(lun));
        let mut c = [0u8; 16];
        let n = cdb.len().min(16);
        c[..n].copy_from_slice(&cdb[..n]);
        p.bhs[32..48].copy_from_slice(&c);
        let edtl = if data_out.is_empty() {
            data_in_len
        } else {
            data_out.len() as u32
        };
        p.set_u32(20, edtl);
        if !data_out.is_empty() && self.immediate_data {
            let n = data_out
                .len()
                .min(self.first_burst as usize)
                .min(self.target_mrdsl as usize);
            p.data = data_out.slice(..n);
        }
        p.set_flags(flags);
        self.request(p, data_out, false).await
    }

    pub async fn test_unit_ready(&self, lun: u64) -> Result<ScsiReply> {
        self.scsi(lun, &[0u8; 6], Bytes::new(), 0).await
    }

    pub async fn read16(
        &self,
        lun: u64,
        lba: u64,
        blocks: u32,
        block_size: u32,
    ) -> Result<ScsiReply> {
        let mut c = [0u8; 16];
        c[0] = 0x88;
        c[2..10].copy_from_slice(&lba.to_be_bytes());
        c[10..14].copy_from_slice(&blocks.to_be_bytes());
        self.scsi(lun, &c, Bytes::new(), blocks * block_size).await
    }

    pub async fn write16(
        &self,
        lun: u64,
        lba: u64,
        data: Bytes,
        block_size: u32,
    ) -> Result<ScsiReply> {
        let mut c = [0u8; 16];
        c[0] = 0x8a;
        c[2..10].copy_from_slice(&lba.to_be_bytes());
        c[10..14].copy_from_slice(&((data.len() as u32) / block_size).to_be_bytes());
        self.scsi(lun, &c, data, 0).await
    }

    /// READ CAPACITY (16): (blocks, block size).
    pub async fn capacity(&self, lun: u64) -> Result<(u64, u32)> {
        let mut c = [0u8; 16];
        c[0] = 0x9e;
        c[1] = 0x10;
        c[13] = 32;
        let r = self.scsi(lun, &c, Bytes::new(), 32).await?;
        if r.status != 0 || r.data.len() < 12 {
            bail!(
                "READ CAPACITY failed: status {:#x} sense {:?}",
                r.status,
                r.sense_key()
            );
        }
        let last = u64::from_be_bytes(r.data[0..8].try_into()?);
        let bs = u32::from_be_bytes(r.data[8..12].try_into()?);
        Ok((last + 1, bs))
    }

    /// REPORT LUNS: the LUN numbers listed.
    pub async fn report_luns(&self) -> Result<Vec<u64>> {
        let mut c = [0u8; 12];
        c[0] = 0xa0;
        c[6..10].copy_from_slice(&4096u32.to_be_bytes());
        let r = self.scsi(0, &c, Bytes::new(), 4096).await?;
        if r.status != 0 {
            bail!("REPORT LUNS failed: {:?}", r.sense_key());
        }
        let n = u32::from_be_bytes(r.data.get(0..4).context("short")?.try_into()?) as usize / 8;
        Ok((0..n)
            .filter_map(|i| r.data.get(8 + i * 8..16 + i * 8))
            .filter_map(|b| {
                ironblock_target::pdu::decode_lun(u64::from_be_bytes(b.try_into().ok()?))
            })
            .collect())
    }

    /// SendTargets=All (discovery) or by name: (name, addresses).
    pub async fn send_targets(&self, which: &str) -> Result<Vec<(String, Vec<String>)>> {
        let mut p = Pdu::new(op::TEXT_REQ);
        p.set_ttt(RESERVED_TAG);
        p.data = text_encode(&[("SendTargets", which.to_string())]);
        let r = self.request(p, Bytes::new(), false).await?;
        let mut out: Vec<(String, Vec<String>)> = Vec::new();
        for (k, v) in text_decode(&r.data) {
            match k.as_str() {
                "TargetName" => out.push((v, Vec::new())),
                "TargetAddress" => {
                    if let Some(last) = out.last_mut() {
                        last.1.push(v)
                    }
                }
                _ => {}
            }
        }
        Ok(out)
    }

    /// NOP-Out ping with data; returns the echoed data.
    pub async fn nop(&self, data: Bytes) -> Result<Bytes> {
        let mut p = Pdu::new(op::NOP_OUT);
        p.set_ttt(RESERVED_TAG);
        p.data = data;
        Ok(self.request(p, Bytes::new(), false).await?.data)
    }

    /// An immediate NOP-Out ping, as the Linux initiator sends on a silent
    /// connection (`noop_out_interval`): answered ahead of queued commands.
    pub async fn ping(&self) -> Result<()> {
        let mut p = Pdu::new(op::NOP_OUT);
        p.set_ttt(RESERVED_TAG);
        self.request(p, Bytes::new(), true).await.map(|_| ())
    }

    /// Send a raw PDU without waiting for anything (for malformed-input tests).
    pub async fn send_raw(&self, p: Pdu) -> Result<()> {
        self.wire.lock().await.send(p).await
    }

    /// Logout (close the session).
    pub async fn logout(mut self) -> Result<()> {
        let mut p = Pdu::new(op::LOGOUT_REQ);
        p.bhs[0] = 0x40 | op::LOGOUT_REQ;
        let r = self.request(p, Bytes::new(), true).await?;
        if r.residual_flags != op::LOGOUT_RESP || r.status != 0 {
            bail!(
                "logout failed: opcode {:#x} response {}",
                r.residual_flags,
                r.status
            );
        }
        if let Some(h) = self.reader.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), h).await;
        }
        Ok(())
    }

    /// Whether the reader has seen the connection close.
    pub fn is_closed(&self) -> bool {
        self.reader
            .as_ref()
            .map(|h| h.is_finished())
            .unwrap_or(true)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(h) = self.reader.take() {
            h.abort();
        }
    }
}
