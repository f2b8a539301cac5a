//! One iSCSI connection: login phase, then full feature phase.
//!
//! Per connection there are two tasks: this reader, which decodes PDUs,
//! orders commands by CmdSN, collects Data-Out (immediate, unsolicited and
//! R2T-solicited) and starts one task per SCSI command; and a writer, which
//! owns the socket's write half, stamps StatSN/ExpCmdSN/MaxCmdSN on every
//! outgoing PDU in send order, and batches PDUs into few writes.
//!
//! ErrorRecoveryLevel is 0 and MaxConnections 1, so a session is exactly one
//! connection; when it closes, the session (I_T nexus) ends.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio_util::codec::{Encoder, FramedRead};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::codec::{Inbound, PduCodec};
use crate::limits::{self, LoginSlot, SessionSlot, WriteAdmission};
use crate::login::{
    negotiate, status as lstatus, text, LoginAuthority, LoginDecision, LoginMachine,
    LoginRequestFields, SessionParams, SessionType,
};
use crate::metrics::IoKind;
use crate::pdu::{self, async_event, op, reject, tmf, Pdu, RESERVED_TAG};
use crate::scsi::{self, Nexus, ScsiCommand, ScsiResult, TaskAttr};
use crate::server::{ExportedTarget, SessionEntry, SessionKey, Shared};

/// Hard cap on any data segment we buffer (memory guard); the negotiated
/// MaxRecvDataSegmentLength is checked separately.
const MAX_SEGMENT: usize = 16 * 1024 * 1024;
/// Login PDUs may carry at most 8192 bytes of data (RFC 7143 section 13.12).
const LOGIN_MAX_DATA: usize = 8192;
/// Upper bound on text accumulated across Text/Login continuations.
const MAX_TEXT: usize = 64 * 1024;

/// How an outgoing PDU uses StatSN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sn {
    /// Carries status: gets the next StatSN, which then advances.
    Status,
    /// Shows the current StatSN without advancing it (R2T, unsolicited NOP-In).
    Peek,
    /// StatSN field reserved (Data-In without status).
    None,
}

enum Out {
    Pdu(Pdu, Sn),
    /// Flush what is queued, then close the socket.
    Close,
}

/// Counters shared between reader, writer and command tasks.
struct SeqState {
    exp_cmd_sn: AtomicU32,
    window: u32,
}

impl SeqState {
    fn exp(&self) -> u32 {
        self.exp_cmd_sn.load(Ordering::Acquire)
    }
    fn max(&self) -> u32 {
        self.exp().wrapping_add(self.window).wrapping_sub(1)
    }
}

/// Owns the write half; stamps sequence numbers in send order.
struct Writer {
    io: OwnedWriteHalf,
    codec: PduCodec,
    stat_sn: u32,
    buf: BytesMut,
}

impl Writer {
    fn stamp(&mut self, pdu: &mut Pdu, sn: Sn, seq: &SeqState) {
        match sn {
            Sn::Status => {
                pdu.set_stat_sn(self.stat_sn);
                self.stat_sn = self.stat_sn.wrapping_add(1);
            }
            Sn::Peek => pdu.set_stat_sn(self.stat_sn),
            Sn::None => {}
        }
        pdu.set_exp_cmd_sn(seq.exp());
        pdu.set_max_cmd_sn(seq.max());
        pdu.fix_lengths();
    }

    fn queue(&mut self, mut pdu: Pdu, sn: Sn, seq: &SeqState) {
        self.stamp(&mut pdu, sn, seq);
        // Encoding only appends to memory; it cannot fail.
        let _ = self.codec.encode(pdu, &mut self.buf);
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            self.io.write_all(&self.buf).await?;
            self.buf.clear();
        }
        Ok(())
    }

    /// Send one PDU now (login phase).
    async fn send(&mut self, pdu: Pdu, sn: Sn, seq: &SeqState) -> std::io::Result<()> {
        self.queue(pdu, sn, seq);
        self.flush().await
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Out>, seq: Arc<SeqState>) {
        while let Some(first) = rx.recv().await {
            let mut close = false;
            let mut next = Some(first);
            while let Some(out) = next.take() {
                match out {
                    Out::Pdu(p, sn) => self.queue(p, sn, &seq),
                    Out::Close => {
                        close = true;
                        break;
                    }
                }
                if self.buf.len() < 1 << 20 {
                    next = rx.try_recv().ok();
                    if next.is_none() {
                        // Let the commands that are ready to finish queue
                        // their responses too, so one send carries them.
                        tokio::task::yield_now().await;
                        next = rx.try_recv().ok();
                    }
                }
            }
            if let Err(e) = self.flush().await {
                debug!(error = %e, "write failed");
                return;
            }
            if close {
                let _ = self.io.shutdown().await;
                return;
            }
        }
    }
}

struct Authority(Arc<dyn crate::server::Portal>);

impl LoginAuthority for Authority {
    fn decide(&self, initiator: &str, target: Option<&str>) -> LoginDecision {
        self.0.decide(initiator, target)
    }
}

/// Serve one accepted connection to the end.
pub(crate) async fn run(stream: TcpStream, shared: Arc<Shared>, slot: LoginSlot) {
    let local = match stream.local_addr() {
        Ok(a) => a,
        Err(_) => return,
    };
    let (rd, wr) = stream.into_split();
    let mut reader = FramedRead::new(rd, PduCodec::new(LOGIN_MAX_DATA));
    let mut writer = Writer {
        io: wr,
        codec: PduCodec::new(MAX_SEGMENT),
        stat_sn: 0,
        buf: BytesMut::with_capacity(256 * 1024),
    };
    let seq = Arc::new(SeqState {
        exp_cmd_sn: AtomicU32::new(0),
        window: shared.config.cmd_window.max(1),
    });
    // The login phase: bounded in time, and in place (a newer connection
    // evicts the oldest one logging in; see `crate::limits`).
    shared.metrics.login_connections.inc();
    let login = tokio::select! {
        r = tokio::time::timeout(
            shared.config.login_timeout,
            login_phase(&mut reader, &mut writer, &seq, &shared),
        ) => r,
        _ = slot.evicted.cancelled() => {
            info!("login phase evicted: too many connections logging in");
            shared.metrics.login_connections.dec();
            return;
        }
    };
    shared.metrics.login_connections.dec();
    drop(slot);
    let (logged_in, _full_feature_slot) = match login {
        Ok(Some(x)) => x,
        Ok(None) => return,
        Err(_) => {
            info!(timeout = ?shared.config.login_timeout, "login timed out");
            shared.metrics.refuse("login_timeout", 1);
            return;
        }
    };
    let params = &logged_in.params;
    reader
        .decoder_mut()
        .set_digests(params.header_digest, params.data_digest);
    reader
        .decoder_mut()
        .set_max_data((params.our_max_recv_data_segment_length as usize).clamp(512, MAX_SEGMENT));
    writer
        .codec
        .set_digests(params.header_digest, params.data_digest);
    let span = tracing::info_span!("session", initiator = %params.initiator_name, target = %params.target_name, tsih = logged_in.tsih);
    let _enter = span.enter();
    info!(
        kind = ?params.session_type,
        header_digest = params.header_digest,
        data_digest = params.data_digest,
        "login complete"
    );
    drop(_enter);
    let (tx, rx) = mpsc::unbounded_channel();
    let writer_task = tokio::spawn(writer.run(rx, seq.clone()));
    let mut session = match Session::new(logged_in, local, shared.clone(), tx, seq) {
        Ok(s) => s,
        Err(()) => {
            writer_task.abort();
            return;
        }
    };
    let kill = session.register();
    {
        use tracing::Instrument;
        session
            .full_feature(&mut reader, kill)
            .instrument(span)
            .await;
    }
    session.teardown();
    drop(session);
    let _ = tokio::time::timeout(Duration::from_secs(5), writer_task).await;
}

/// What a successful login phase hands to the full feature phase.
struct LoggedIn {
    params: SessionParams,
    isid: [u8; 6],
    tsih: u16,
    cid: u16,
}

fn login_response(req: &Pdu) -> Pdu {
    let mut p = Pdu::new(op::LOGIN_RESP);
    p.set_flags(0);
    p.bhs[8..14].copy_from_slice(&req.isid());
    p.set_itt(req.itt());
    p
}

/// Run the login phase. Returns the negotiated parameters, ISID and TSIH.
async fn login_phase(
    reader: &mut FramedRead<tokio::net::tcp::OwnedReadHalf, PduCodec>,
    writer: &mut Writer,
    seq: &SeqState,
    shared: &Arc<Shared>,
) -> Option<(LoggedIn, SessionSlot)> {
    let authority = Arc::new(Authority(shared.portal.clone()));
    let mut machine = LoginMachine::new(shared.config.login.clone(), authority);
    let mut first = true;
    loop {
        let pdu = match reader.next().await {
            Some(Ok(Inbound::Pdu(p))) => p,
            Some(Ok(Inbound::Oversized(p))) => {
                let mut r = login_response(&p);
                r.bhs[36] = lstatus::INITIATOR_ERROR.0;
                r.bhs[37] = lstatus::INITIATOR_ERROR.1;
                let _ = writer.send(r, Sn::Status, seq).await;
                return None;
            }
            Some(Ok(Inbound::DataDigestError(_))) | Some(Err(_)) | None => return None,
        };
        if pdu.opcode() != op::LOGIN_REQ {
            // Anything but a Login Request before login completes is a
            // protocol error: reject with the login failure and close.
            let mut r = login_response(&pdu);
            r.bhs[36] = lstatus::INVALID_DURING_LOGIN.0;
            r.bhs[37] = lstatus::INVALID_DURING_LOGIN.1;
            if first {
                writer.stat_sn = pdu.exp_stat_sn();
            }
            let _ = writer.send(r, Sn::Status, seq).await;
            return None;
        }
        if first {
            writer.stat_sn = pdu.exp_stat_sn();
            seq.exp_cmd_sn.store(pdu.cmd_sn(), Ordering::Release);
        }
        let fields = LoginRequestFields {
            transit: pdu.flags() & 0x80 != 0,
            cont: pdu.flags() & 0x40 != 0,
            csg: (pdu.flags() >> 2) & 0x3,
            nsg: pdu.flags() & 0x3,
            version_max: pdu.bhs[2],
            version_min: pdu.bhs[3],
            isid: pdu.isid(),
            tsih: pdu.tsih(),
            cid: pdu.cid(),
        };
        let mut resp = login_response(&pdu);
        if first && fields.tsih != 0 {
            // MaxConnections is 1: a connection can only start a new session.
            resp.set_u16(14, fields.tsih);
            let known = shared
                .sessions
                .lock()
                .map(|s| s.values().any(|e| e.tsih == fields.tsih))
                .unwrap_or(false);
            let st = if known {
                lstatus::TOO_MANY_CONNECTIONS
            } else {
                lstatus::SESSION_DOES_NOT_EXIST
            };
            resp.bhs[36] = st.0;
            resp.bhs[37] = st.1;
            let _ = writer.send(resp, Sn::Status, seq).await;
            return None;
        }
        first = false;
        let step = machine.step(&fields, &pdu.data);
        let r = step.response;
        resp.set_flags(
            (if r.transit { 0x80 } else { 0 })
                | (if r.cont { 0x40 } else { 0 })
                | ((r.csg & 3) << 2)
                | (r.nsg & 3),
        );
        resp.bhs[2] = r.version_max;
        resp.bhs[3] = r.version_active;
        resp.bhs[36] = r.status_class;
        resp.bhs[37] = r.status_detail;
        resp.data = Bytes::from(step.data);
        if r.status_class != 0 {
            shared
                .metrics
                .login(match (r.status_class, r.status_detail) {
                    (0x01, _) => "redirect",
                    (0x02, 0x01) => "auth_failure",
                    (0x02, 0x02) => "forbidden",
                    (0x02, 0x03) => "not_found",
                    _ => "failure",
                });
        }
        if let Some(params) = step.complete {
            let slot = match shared.full_feature.admit(&params.initiator_name) {
                Ok(slot) => slot,
                Err(full) => {
                    // No room: the login fails with "out of resources"
                    // (RFC 7143 11.13.5), no transit.
                    info!(initiator = %params.initiator_name, reason = full.reason(), "login refused: too many connections");
                    shared.metrics.login("out_of_resources");
                    shared.metrics.refuse(full.reason(), 1);
                    resp.set_flags(((r.csg & 3) << 2) | (r.nsg & 3));
                    resp.bhs[36] = lstatus::OUT_OF_RESOURCES.0;
                    resp.bhs[37] = lstatus::OUT_OF_RESOURCES.1;
                    resp.data = Bytes::new();
                    let _ = writer.send(resp, Sn::Status, seq).await;
                    return None;
                }
            };
            shared.metrics.login("success");
            let tsih = shared.alloc_tsih();
            resp.set_u16(14, tsih);
            writer.send(resp, Sn::Status, seq).await.ok()?;
            return Some((
                LoggedIn {
                    params,
                    isid: fields.isid,
                    tsih,
                    cid: fields.cid,
                },
                slot,
            ));
        }
        if writer.send(resp, Sn::Status, seq).await.is_err() || step.close {
            return None;
        }
    }
}

/// Data-Out collection for one write command.
struct PendingWrite {
    cmd: Pdu,
    buf: BytesMut,
    received: u32,
    edtl: u32,
    /// Bytes up to which data has been solicited or sent unsolicited.
    next_offset: u32,
    /// Unsolicited sequence still open (Data-Out with TTT 0xffffffff expected).
    unsolicited_open: bool,
    /// Where unsolicited data must end at the latest (FirstBurstLength).
    unsolicited_limit: u32,
    /// DataSN expected next in the unsolicited sequence.
    unsolicited_datasn: u32,
    /// Outstanding R2T sequences by TTT.
    r2ts: HashMap<u32, R2tSeq>,
    r2t_sn: u32,
}

/// One solicited Data-Out sequence (RFC 7143 section 11.8).
struct R2tSeq {
    offset: u32,
    len: u32,
    received: u32,
    next_datasn: u32,
}

struct RunningTask {
    lun: u64,
    abort: AbortHandle,
}

struct Session {
    params: SessionParams,
    nexus: Arc<Nexus>,
    tsih: u16,
    cid: u16,
    local: std::net::SocketAddr,
    shared: Arc<Shared>,
    target: Option<Arc<ExportedTarget>>,
    tx: mpsc::UnboundedSender<Out>,
    seq: Arc<SeqState>,
    /// Commands waiting for a CmdSN gap to fill.
    held: BTreeMap<u32, Pdu>,
    writes: HashMap<u32, PendingWrite>,
    tasks: Arc<Mutex<HashMap<u32, RunningTask>>>,
    next_ttt: u32,
    /// Text exchange in progress: accumulated request text and pending
    /// response bytes still to send.
    text_in: Vec<u8>,
    text_out: Option<(u32, Bytes)>,
    ping_ttt: Option<u32>,
    closing: bool,
    /// The LUN inventory this nexus saw at its last command, and what it
    /// was read under (see [`Session::inventory_changed`]).
    inventory: Option<Inventory>,
}

/// The LUNs of its target a nexus may see, as of (the portal's view
/// version, the LUN table's identity).
struct Inventory {
    key: (u64, usize),
    luns: Vec<u64>,
}

impl Session {
    fn new(
        login: LoggedIn,
        local: std::net::SocketAddr,
        shared: Arc<Shared>,
        tx: mpsc::UnboundedSender<Out>,
        seq: Arc<SeqState>,
    ) -> Result<Self, ()> {
        let LoggedIn {
            params,
            isid,
            tsih,
            cid,
        } = login;
        let target = if params.session_type == SessionType::Normal {
            match shared.portal.target(&params.target_name) {
                Some(t) => Some(t),
                None => return Err(()),
            }
        } else {
            None
        };
        let nexus = Arc::new(Nexus {
            initiator_name: params.initiator_name.as_str().into(),
            isid,
            target_name: params.target_name.as_str().into(),
            tpgt: shared.config.login.target_portal_group_tag,
        });
        Ok(Session {
            params,
            nexus,
            tsih,
            cid,
            local,
            shared,
            target,
            tx,
            seq,
            held: BTreeMap::new(),
            writes: HashMap::new(),
            tasks: Arc::new(Mutex::new(HashMap::new())),
            next_ttt: 1,
            text_in: Vec::new(),
            text_out: None,
            ping_ttt: None,
            closing: false,
            inventory: None,
        })
    }

    fn key(&self) -> SessionKey {
        (
            self.params.initiator_name.clone(),
            self.nexus.isid,
            self.params.target_name.clone(),
        )
    }

    /// Enter the session in the registry, reinstating (killing) an older
    /// session with the same initiator port and target (RFC 7143 6.3.5).
    fn register(&mut self) -> CancellationToken {
        let kill = self.shared.shutdown.child_token();
        let entry = SessionEntry {
            tsih: self.tsih,
            kill: kill.clone(),
        };
        if let Ok(mut s) = self.shared.sessions.lock() {
            if let Some(old) = s.insert(self.key(), entry) {
                info!(
                    old_tsih = old.tsih,
                    "session reinstatement: closing the old session"
                );
                old.kill.cancel();
            }
        }
        if let Some(t) = &self.target {
            for (_, lu) in t.luns().iter() {
                lu.nexus_added(&self.nexus);
            }
        }
        self.shared.metrics.sessions.inc();
        kill
    }

    fn teardown(&mut self) {
        self.shared.metrics.sessions.dec();
        if let Ok(tasks) = self.tasks.lock() {
            for t in tasks.values() {
                t.abort.abort();
            }
        }
        if let Ok(mut s) = self.shared.sessions.lock() {
            let key = self.key();
            if s.get(&key).map(|e| e.tsih) == Some(self.tsih) {
                s.remove(&key);
            }
        }
        if let Some(t) = &self.target {
            for (_, lu) in t.luns().iter() {
                lu.nexus_removed(&self.nexus);
            }
        }
    }

    fn send(&self, pdu: Pdu, sn: Sn) {
        let _ = self.tx.send(Out::Pdu(pdu, sn));
    }

    fn reject(&self, bad: &Pdu, reason: u8) {
        let mut r = Pdu::new(op::REJECT);
        r.bhs[2] = reason;
        r.set_itt(RESERVED_TAG);
        r.data = Bytes::copy_from_slice(&bad.bhs);
        self.send(r, Sn::Status);
    }

    fn alloc_ttt(&mut self) -> u32 {
        let t = self.next_ttt;
        self.next_ttt = self.next_ttt.wrapping_add(1);
        if self.next_ttt == RESERVED_TAG || self.next_ttt == 0 {
            self.next_ttt = 1;
        }
        t
    }

    async fn full_feature(
        &mut self,
        reader: &mut FramedRead<tokio::net::tcp::OwnedReadHalf, PduCodec>,
        kill: CancellationToken,
    ) {
        let cfg = self.shared.config.clone();
        let mut ping_deadline: Option<tokio::time::Instant> = None;
        loop {
            if self.closing {
                break;
            }
            let idle = match ping_deadline {
                Some(d) => d,
                None => tokio::time::Instant::now() + cfg.nop_interval,
            };
            let next = tokio::select! {
                _ = kill.cancelled() => {
                    self.async_logout_request();
                    // Give the initiator a moment to log out by itself.
                    match tokio::time::timeout(Duration::from_secs(2), reader.next()).await {
                        Ok(Some(Ok(Inbound::Pdu(p)))) if p.opcode() == op::LOGOUT_REQ => self.on_logout(&p),
                        _ => {}
                    }
                    break;
                }
                _ = tokio::time::sleep_until(idle) => {
                    if ping_deadline.is_some() {
                        warn!("initiator did not answer NOP-In ping; dropping connection");
                        break;
                    }
                    self.ping();
                    ping_deadline = Some(tokio::time::Instant::now() + cfg.nop_timeout);
                    continue;
                }
                n = reader.next() => n,
            };
            ping_deadline = None;
            match next {
                Some(Ok(Inbound::Pdu(p))) => {
                    if let Err(e) = self.on_pdu(p) {
                        self.shared.metrics.protocol_errors.inc();
                        warn!(error = %e, "protocol error; closing connection");
                        break;
                    }
                }
                Some(Ok(Inbound::Oversized(p))) => {
                    warn!(
                        len = p.data_segment_len(),
                        "data segment beyond MaxRecvDataSegmentLength"
                    );
                    self.reject(&p, reject::PROTOCOL_ERROR);
                    break;
                }
                Some(Ok(Inbound::DataDigestError(p))) => {
                    warn!(opcode = p.opcode(), "data digest error");
                    self.reject(&p, reject::DATA_DIGEST_ERROR);
                    // ERL 0: a command whose data was lost cannot complete.
                    if p.opcode() == op::DATA_OUT || p.opcode() == op::SCSI_COMMAND {
                        break;
                    }
                }
                Some(Err(e)) => {
                    info!(error = %e, "connection closed on framing error");
                    break;
                }
                None => {
                    debug!("connection closed by initiator");
                    break;
                }
            }
        }
        let _ = self.tx.send(Out::Close);
    }

    fn ping(&mut self) {
        let ttt = self.alloc_ttt();
        self.ping_ttt = Some(ttt);
        let mut p = Pdu::new(op::NOP_IN);
        p.set_itt(RESERVED_TAG);
        p.set_ttt(ttt);
        self.send(p, Sn::Peek);
    }

    fn async_logout_request(&self) {
        let mut p = Pdu::new(op::ASYNC_MSG);
        p.set_itt(RESERVED_TAG);
        p.bhs[36] = async_event::LOGOUT_REQUEST;
        p.set_u16(42, 0); // Parameter3: Time2Wait
        self.send(p, Sn::Status);
    }

    /// One PDU from the initiator. `Err` closes the connection.
    fn on_pdu(&mut self, p: Pdu) -> Result<(), String> {
        let mrdsl = self.params.our_max_recv_data_segment_length as usize;
        if p.data.len() > mrdsl {
            self.reject(&p, reject::PROTOCOL_ERROR);
            return Err(format!(
                "data segment {} > MaxRecvDataSegmentLength {}",
                p.data.len(),
                mrdsl
            ));
        }
        match p.opcode() {
            op::DATA_OUT => self.on_data_out(p),
            op::SNACK => {
                // ErrorRecoveryLevel 0: SNACK is not supported.
                self.reject(&p, reject::COMMAND_NOT_SUPPORTED);
                Ok(())
            }
            op::NOP_OUT | op::SCSI_COMMAND | op::TASK_MGMT_REQ | op::TEXT_REQ | op::LOGOUT_REQ => {
                if p.opcode() == op::NOP_OUT && p.ttt() != RESERVED_TAG {
                    // Answer to our ping.
                    if self.ping_ttt == Some(p.ttt()) {
                        self.ping_ttt = None;
                    }
                    if p.itt() == RESERVED_TAG {
                        return Ok(());
                    }
                }
                self.ordered(p)
            }
            op::LOGIN_REQ => {
                self.reject(&p, reject::PROTOCOL_ERROR);
                Err("login request in full feature phase".into())
            }
            _ => {
                self.reject(&p, reject::COMMAND_NOT_SUPPORTED);
                Ok(())
            }
        }
    }

    /// CmdSN ordering (RFC 7143 section 3.2.2.1).
    fn ordered(&mut self, p: Pdu) -> Result<(), String> {
        if self.params.session_type == SessionType::Discovery
            && !matches!(p.opcode(), op::TEXT_REQ | op::LOGOUT_REQ | op::NOP_OUT)
        {
            self.reject(&p, reject::PROTOCOL_ERROR);
            return Err("only text, NOP and logout are allowed in a discovery session".into());
        }
        if p.immediate() {
            return self.deliver(p);
        }
        let sn = p.cmd_sn();
        let exp = self.seq.exp();
        let max = self.seq.max();
        if !(pdu::sn_le(exp, sn) && pdu::sn_le(sn, max)) {
            // Outside the window: silently ignored, as the RFC requires.
            debug!(cmd_sn = sn, exp, max, "CmdSN outside the window; dropped");
            return Ok(());
        }
        if sn != exp {
            if self.held.len() >= self.seq.window as usize {
                return Err("too many commands held for a CmdSN gap".into());
            }
            self.held.insert(sn, p);
            return Ok(());
        }
        self.seq
            .exp_cmd_sn
            .store(exp.wrapping_add(1), Ordering::Release);
        self.deliver(p)?;
        while let Some(next) = self.held.remove(&self.seq.exp()) {
            self.seq.exp_cmd_sn.fetch_add(1, Ordering::AcqRel);
            self.deliver(next)?;
        }
        Ok(())
    }

    fn deliver(&mut self, p: Pdu) -> Result<(), String> {
        match p.opcode() {
            op::NOP_OUT => {
                if p.itt() != RESERVED_TAG {
                    let mut r = Pdu::new(op::NOP_IN);
                    r.set_lun_raw(p.lun_raw());
                    r.set_itt(p.itt());
                    r.set_ttt(RESERVED_TAG);
                    r.data = p.data.clone();
                    self.send(r, Sn::Status);
                }
                Ok(())
            }
            op::SCSI_COMMAND => self.on_scsi_command(p),
            op::TASK_MGMT_REQ => {
                self.on_tmf(&p);
                Ok(())
            }
            op::TEXT_REQ => self.on_text(&p),
            op::LOGOUT_REQ => {
                self.on_logout(&p);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn on_logout(&mut self, p: &Pdu) {
        let mut r = Pdu::new(op::LOGOUT_RESP);
        r.set_itt(p.itt());
        r.bhs[2] = match p.logout_reason() {
            0 => 0,
            1 if p.cid() == self.cid => 0,
            1 => 1, // CID not found
            2 => 2, // connection recovery not supported at ERL 0
            _ => 3,
        };
        r.set_u16(40, self.params.default_time2wait as u16);
        r.set_u16(42, self.params.default_time2retain as u16);
        let closes = r.bhs[2] == 0;
        self.send(r, Sn::Status);
        if closes {
            self.closing = true;
        }
    }

    fn on_text(&mut self, p: &Pdu) -> Result<(), String> {
        let cont = p.flags() & 0x40 != 0;
        // Continuation of a long response: the initiator asks for more.
        if p.ttt() != RESERVED_TAG {
            if let Some((ttt, rest)) = self.text_out.take() {
                if ttt == p.ttt() && p.data.is_empty() {
                    self.send_text_part(p, rest);
                    return Ok(());
                }
            }
        }
        if self.text_in.len() + p.data.len() > MAX_TEXT {
            self.reject(p, reject::PROTOCOL_ERROR);
            return Err("text request too long".into());
        }
        self.text_in.extend_from_slice(&p.data);
        if cont {
            // More text follows: acknowledge with an empty response.
            let ttt = self.alloc_ttt();
            let mut r = Pdu::new(op::TEXT_RESP);
            r.set_flags(0);
            r.set_lun_raw(p.lun_raw());
            r.set_itt(p.itt());
            r.set_ttt(ttt);
            self.send(r, Sn::Status);
            return Ok(());
        }
        let request = std::mem::take(&mut self.text_in);
        let pairs = match text::parse(&request) {
            Ok(pairs) => pairs,
            Err(_) => {
                self.reject(p, reject::PROTOCOL_ERROR);
                return Ok(());
            }
        };
        let mut out: Vec<(String, String)> = Vec::new();
        let mut rest = Vec::new();
        for (k, v) in pairs {
            if k == "SendTargets" {
                self.send_targets(&v, &mut out);
            } else {
                rest.push((k, v));
            }
        }
        if !rest.is_empty() {
            out.extend(negotiate::ffp_text(&rest, &mut self.params));
        }
        let body = Bytes::from(text::encode(&out));
        self.send_text_part(p, body);
        Ok(())
    }

    fn send_text_part(&mut self, p: &Pdu, body: Bytes) {
        let max = self.params.initiator_max_recv_data_segment_length.max(512) as usize;
        let mut r = Pdu::new(op::TEXT_RESP);
        r.set_lun_raw(p.lun_raw());
        r.set_itt(p.itt());
        if body.len() > max {
            let ttt = self.alloc_ttt();
            r.set_flags(0x40); // C=1, F=0
            r.set_ttt(ttt);
            r.data = body.slice(..max);
            self.text_out = Some((ttt, body.slice(max..)));
        } else {
            r.set_flags(0x80);
            r.set_ttt(RESERVED_TAG);
            r.data = body;
        }
        self.send(r, Sn::Status);
    }

    fn send_targets(&self, which: &str, out: &mut Vec<(String, String)>) {
        let all = self
            .shared
            .portal
            .discover(&self.params.initiator_name, self.local);
        let wanted: Box<dyn Fn(&str) -> bool> = match which {
            "All" if self.params.session_type == SessionType::Discovery => Box::new(|_| true),
            "All" => Box::new(|_| false),
            "" => {
                let me = self.params.target_name.clone();
                Box::new(move |n| n == me)
            }
            name => {
                let name = name.to_string();
                Box::new(move |n| n == name)
            }
        };
        for t in all.into_iter().filter(|t| wanted(&t.name)) {
            out.push(("TargetName".into(), t.name.clone()));
            if t.addresses.is_empty() {
                out.push((
                    "TargetAddress".into(),
                    format!(
                        "{},{}",
                        self.local, self.shared.config.login.target_portal_group_tag
                    ),
                ));
            }
            for a in t.addresses {
                out.push(("TargetAddress".into(), a));
            }
        }
    }

    fn on_tmf(&mut self, p: &Pdu) {
        let func = p.tmf_function();
        let mut r = Pdu::new(op::TASK_MGMT_RESP);
        r.set_itt(p.itt());
        let lun = p.lun();
        let target = self.target.clone();
        let lu = |lun: Option<u64>| {
            let t = target.as_ref()?;
            let lun = lun?;
            if !self.shared.portal.lun_visible(
                &self.params.initiator_name,
                &self.params.target_name,
                lun,
            ) {
                return None;
            }
            t.luns().get(lun).cloned()
        };
        let response = match func {
            tmf::ABORT_TASK => {
                let rtt = p.ttt();
                let found = self.tasks.lock().ok().and_then(|mut t| t.remove(&rtt));
                let write = self.writes.remove(&rtt);
                if let Some(task) = found {
                    task.abort.abort();
                    tmf::FUNCTION_COMPLETE
                } else if write.is_some() {
                    tmf::FUNCTION_COMPLETE
                } else if pdu::sn_lt(p.ref_cmd_sn(), p.cmd_sn())
                    && !pdu::sn_lt(p.ref_cmd_sn(), self.seq.exp())
                    && !pdu::sn_lt(self.seq.max(), p.ref_cmd_sn())
                {
                    // RFC 7143 11.5.1 b): the referenced command has not
                    // arrived, but its CmdSN is within the window and
                    // before this request's: it counts as received (and
                    // so as aborted).
                    tmf::FUNCTION_COMPLETE
                } else {
                    // c): no such task, and its CmdSN is outside the
                    // window. Below ExpCmdSN that means it arrived and has
                    // completed: its response went (or goes) out, so it
                    // was not aborted.
                    tmf::TASK_DOES_NOT_EXIST
                }
            }
            tmf::ABORT_TASK_SET | tmf::CLEAR_TASK_SET => match (lun, lu(lun)) {
                (Some(l), Some(_)) => {
                    self.abort_where(|t| t.lun == l);
                    self.writes.retain(|_, w| w.cmd.lun() != Some(l));
                    tmf::FUNCTION_COMPLETE
                }
                _ => tmf::LUN_DOES_NOT_EXIST,
            },
            tmf::CLEAR_ACA => tmf::FUNCTION_COMPLETE,
            tmf::LOGICAL_UNIT_RESET => match (lun, lu(lun)) {
                (Some(l), Some(unit)) => {
                    self.abort_where(|t| t.lun == l);
                    self.writes.retain(|_, w| w.cmd.lun() != Some(l));
                    unit.lun_reset(&self.nexus);
                    tmf::FUNCTION_COMPLETE
                }
                _ => tmf::LUN_DOES_NOT_EXIST,
            },
            tmf::TARGET_WARM_RESET | tmf::TARGET_COLD_RESET => {
                self.abort_where(|_| true);
                self.writes.clear();
                if let Some(t) = &self.target {
                    // Only the LUNs this initiator may see: a target reset
                    // must not reach behind the LUN masking.
                    let initiator = &self.params.initiator_name;
                    for (lun, unit) in t.luns().iter() {
                        if self.shared.portal.lun_visible(initiator, &t.name, lun) {
                            unit.target_reset(&self.nexus);
                        }
                    }
                }
                if func == tmf::TARGET_COLD_RESET {
                    // A cold reset also drops the connection (RFC 7143 11.5.1).
                    self.closing = true;
                }
                tmf::FUNCTION_COMPLETE
            }
            tmf::TASK_REASSIGN => tmf::REASSIGNMENT_NOT_SUPPORTED,
            _ => tmf::REJECTED,
        };
        r.bhs[2] = response;
        self.send(r, Sn::Status);
    }

    fn abort_where(&self, f: impl Fn(&RunningTask) -> bool) {
        if let Ok(mut tasks) = self.tasks.lock() {
            tasks.retain(|_, t| {
                if f(t) {
                    t.abort.abort();
                    false
                } else {
                    true
                }
            });
        }
    }

    fn on_scsi_command(&mut self, p: Pdu) -> Result<(), String> {
        let itt = p.itt();
        if self.writes.contains_key(&itt)
            || self
                .tasks
                .lock()
                .map(|t| t.contains_key(&itt))
                .unwrap_or(false)
        {
            // RFC 7143: a task tag must be unique among outstanding tasks.
            self.reject(&p, reject::TASK_IN_PROGRESS);
            return Ok(());
        }
        if !p.ahs.is_empty() && !valid_ahs(&p.ahs) {
            self.reject(&p, reject::PROTOCOL_ERROR);
            return Ok(());
        }
        let edtl = p.edtl();
        if p.cmd_write() && edtl > 0 {
            if !p.data.is_empty() && !self.params.immediate_data {
                self.reject(&p, reject::PROTOCOL_ERROR);
                return Err("immediate data sent although ImmediateData=No".into());
            }
            if p.data.len() as u32 > edtl || p.data.len() as u32 > self.params.first_burst_length {
                self.reject(&p, reject::PROTOCOL_ERROR);
                return Err("immediate data exceeds EDTL or FirstBurstLength".into());
            }
            if p.data.len() as u32 == edtl {
                // The common small write: all data came as immediate data;
                // hand the received buffer over without copying.
                let data = p.data.clone();
                self.execute(p, data);
                return Ok(());
            }
            let pending: u64 = self.writes.values().map(|w| w.buf.len() as u64).sum();
            let refusal = match limits::admit_write(
                edtl,
                pending,
                crate::scsi::engine::MAX_TRANSFER_BYTES,
                &self.shared.config.limits,
            ) {
                WriteAdmission::Buffer => None,
                WriteAdmission::TooLong => Some((
                    "write_too_long",
                    ScsiResult::check(scsi::Sense::INVALID_FIELD_IN_CDB),
                )),
                WriteAdmission::Full => Some((
                    "write_buffers_full",
                    ScsiResult::status(scsi::status::TASK_SET_FULL),
                )),
            };
            if let Some((reason, result)) = refusal {
                // Answered before any buffer is sized from the wire's
                // length; Data-Out that still comes for it is dropped as
                // data for an unknown task.
                debug!(itt, edtl, pending, reason, "write refused");
                self.shared.metrics.refuse(reason, 1);
                let ctx = CmdCtx {
                    itt,
                    edtl,
                    read: false,
                    write: true,
                    mrdsl: 512,
                    max_burst: 512,
                };
                respond(&self.tx, &ctx, None, result);
                return Ok(());
            }
            let unsolicited_limit = if self.params.initial_r2t {
                p.data.len() as u32
            } else {
                self.params.first_burst_length.min(edtl)
            };
            let unsolicited_open = !p.final_bit()
                && !self.params.initial_r2t
                && (p.data.len() as u32) < unsolicited_limit;
            let mut buf = BytesMut::zeroed(edtl as usize);
            buf[..p.data.len()].copy_from_slice(&p.data);
            let received = p.data.len() as u32;
            let w = PendingWrite {
                cmd: p,
                buf,
                received,
                edtl,
                next_offset: received,
                unsolicited_open,
                unsolicited_limit,
                unsolicited_datasn: 0,
                r2ts: HashMap::new(),
                r2t_sn: 0,
            };
            self.writes.insert(itt, w);
            self.advance_write(itt);
            return Ok(());
        }
        let data = if p.cmd_write() {
            p.data.clone()
        } else {
            Bytes::new()
        };
        self.execute(p, data);
        Ok(())
    }

    /// Issue R2Ts as allowed, or execute once all data is in.
    fn advance_write(&mut self, itt: u32) {
        let max_burst = self.params.max_burst_length.max(512);
        let max_out = self.params.max_outstanding_r2t.max(1) as usize;
        let Some(w) = self.writes.get_mut(&itt) else {
            return;
        };
        if w.received >= w.edtl {
            if let Some(w) = self.writes.remove(&itt) {
                let data = w.buf.freeze();
                self.execute(w.cmd, data);
            }
            return;
        }
        if w.unsolicited_open {
            return;
        }
        let mut bursts = Vec::new();
        let mut next = w.next_offset;
        while w.r2ts.len() + bursts.len() < max_out && next < w.edtl {
            let len = (w.edtl - next).min(max_burst);
            bursts.push((next, len));
            next += len;
        }
        for (off, len) in bursts {
            let ttt = self.alloc_ttt();
            let Some(w) = self.writes.get_mut(&itt) else {
                return;
            };
            w.r2ts.insert(
                ttt,
                R2tSeq {
                    offset: off,
                    len,
                    received: 0,
                    next_datasn: 0,
                },
            );
            w.next_offset = off + len;
            let mut r = Pdu::new(op::R2T);
            r.set_lun_raw(w.cmd.lun_raw());
            r.set_itt(itt);
            r.set_ttt(ttt);
            r.set_u32(36, w.r2t_sn);
            w.r2t_sn = w.r2t_sn.wrapping_add(1);
            r.set_u32(40, off);
            r.set_u32(44, len);
            self.send(r, Sn::Peek);
        }
    }

    fn on_data_out(&mut self, p: Pdu) -> Result<(), String> {
        let itt = p.itt();
        let Some(w) = self.writes.get_mut(&itt) else {
            // Data for a task we do not know (maybe aborted): RFC 7143 says
            // reject with Invalid PDU Field... unless it was aborted, in
            // which case the data is silently dropped.
            debug!(itt, "Data-Out for an unknown task");
            return Ok(());
        };
        let off = p.buffer_offset();
        let len = p.data.len() as u32;
        let end = match off.checked_add(len) {
            Some(e) if e <= w.edtl => e,
            _ => {
                self.reject(&p, reject::PROTOCOL_ERROR);
                return Err("Data-Out beyond the expected data transfer length".into());
            }
        };
        // DataPDUInOrder=Yes: every sequence must arrive in order, with
        // DataSN counting from 0 within it (RFC 7143 sections 11.7.4/11.7.5).
        let ttt = p.ttt();
        let datasn = p.data_sn();
        if ttt == RESERVED_TAG {
            if !w.unsolicited_open
                || datasn != w.unsolicited_datasn
                || off != w.next_offset
                || end > w.unsolicited_limit
            {
                warn!(
                    itt,
                    datasn, off, "bad unsolicited Data-Out sequence; failing the command"
                );
                self.fail_write(itt);
                return Ok(());
            }
            w.unsolicited_datasn += 1;
            w.next_offset = end;
            if p.final_bit() {
                w.unsolicited_open = false;
            }
        } else {
            let Some(r) = w.r2ts.get_mut(&ttt) else {
                self.reject(&p, reject::INVALID_PDU_FIELD);
                return Err(format!("Data-Out for unknown TTT {ttt:#x}"));
            };
            let want_off = r.offset + r.received;
            let want_sn = r.next_datasn;
            if datasn != want_sn || off != want_off || end > r.offset + r.len {
                warn!(
                    itt,
                    datasn, want_sn, off, want_off, "bad Data-Out sequence; failing the command"
                );
                self.fail_write(itt);
                return Ok(());
            }
            r.next_datasn += 1;
            r.received += len;
            let done = r.received == r.len;
            if done {
                w.r2ts.remove(&ttt);
            } else if p.final_bit() {
                warn!(itt, "R2T sequence ended early; failing the command");
                self.fail_write(itt);
                return Ok(());
            }
        }
        let Some(w) = self.writes.get_mut(&itt) else {
            return Ok(());
        };
        w.buf[off as usize..end as usize].copy_from_slice(&p.data);
        w.received = w.received.saturating_add(len);
        self.advance_write(itt);
        Ok(())
    }

    /// End a write whose Data-Out sequence broke the rules (DataSN or
    /// offset out of order, early F bit): ErrorRecoveryLevel 0 cannot
    /// recover within the command, so the command fails with ABORTED
    /// COMMAND / DATA PHASE ERROR and the connection stays up. Any further
    /// Data-Out for it is dropped as data for an unknown task.
    fn fail_write(&mut self, itt: u32) {
        let Some(w) = self.writes.remove(&itt) else {
            return;
        };
        let ctx = CmdCtx {
            itt,
            edtl: w.edtl,
            read: false,
            write: true,
            mrdsl: 512,
            max_burst: 512,
        };
        let result = ScsiResult::check(scsi::Sense::new(0x0b, 0x4b, 0x00));
        respond(&self.tx, &ctx, None, result);
    }

    /// SAM-5's REPORTED LUNS DATA HAS CHANGED for a command with opcode
    /// `op`: the unit attention to report when the LUNs this nexus may see
    /// (the target's table, masked) changed since its last command. Read
    /// again only when the portal's view version or the table changed, so
    /// a command pays one atomic load otherwise. REPORT LUNS takes the new
    /// inventory without a UA (that is how an initiator learns it);
    /// INQUIRY and REQUEST SENSE neither report nor clear it.
    fn inventory_changed(&mut self, op: u8) -> Option<scsi::Sense> {
        let t = self.target.as_ref()?;
        let table = t.luns();
        let portal = &self.shared.portal;
        let key = (portal.view_version(), Arc::as_ptr(&table) as usize);
        if self.inventory.as_ref().is_some_and(|i| i.key == key) {
            return None;
        }
        let (ini, tgt) = (&self.params.initiator_name, &self.params.target_name);
        let luns: Vec<u64> = table
            .iter()
            .map(|(l, _)| l)
            .filter(|l| portal.lun_visible(ini, tgt, *l))
            .collect();
        let changed = self.inventory.as_ref().is_some_and(|i| i.luns != luns);
        if changed && matches!(op, 0x12 | 0x03) {
            return None;
        }
        self.inventory = Some(Inventory { key, luns });
        (changed && op != 0xa0).then_some(scsi::Sense::UA_LUNS_CHANGED)
    }

    /// Run one SCSI command in its own task.
    fn execute(&mut self, p: Pdu, data_out: Bytes) {
        let itt = p.itt();
        let lun = p.lun().unwrap_or(u64::MAX);
        let inventory_ua = self.inventory_changed(p.cdb().first().copied().unwrap_or(0xff));
        let mut cdb = BytesMut::from(p.cdb());
        // Extended CDB AHS (type 1): the CDB continues past 16 bytes.
        if let Some(ext) = extended_cdb(&p.ahs) {
            cdb.put_slice(ext);
        }
        let cmd = ScsiCommand {
            cdb: cdb.freeze(),
            lun,
            nexus: self.nexus.clone(),
            attr: match p.cmd_attr() {
                0 => TaskAttr::Untagged,
                2 => TaskAttr::Ordered,
                3 => TaskAttr::HeadOfQueue,
                4 => TaskAttr::Aca,
                _ => TaskAttr::Simple,
            },
            expected_data_in: if p.cmd_read() { p.edtl() } else { 0 },
            data_out,
            write_protected: self.shared.portal.lun_write_protected(
                &self.params.initiator_name,
                &self.params.target_name,
                lun,
            ),
        };
        let ctx = CmdCtx {
            itt,
            edtl: p.edtl(),
            read: p.cmd_read(),
            write: p.cmd_write(),
            mrdsl: self.params.initiator_max_recv_data_segment_length.max(512),
            max_burst: self.params.max_burst_length.max(512),
        };
        let target = self.target.clone();
        let portal = self.shared.portal.clone();
        let metrics = self.shared.metrics.clone();
        let tx = self.tx.clone();
        let tasks = self.tasks.clone();
        // Hold the lock while spawning so a fast task cannot try to remove
        // its entry before it is inserted.
        let mut guard = match self.tasks.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let handle = tokio::spawn(async move {
            let started = std::time::Instant::now();
            let mut data_out_need = None;
            let result = match (&target, inventory_ua) {
                // The LUN inventory changed: the unit attention first (the
                // command is not run; the initiator retries it).
                (Some(_), Some(ua)) => ScsiResult::check(ua),
                (Some(t), None) => {
                    let table = t.luns();
                    let initiator = &cmd.nexus.initiator_name;
                    let visible = |l: u64| portal.lun_visible(initiator, &t.name, l);
                    // A masked LUN is absent: nothing about it (not even
                    // its block size, through the residual) may show.
                    data_out_need = table
                        .get(cmd.lun)
                        .filter(|_| visible(cmd.lun))
                        .and_then(|lu| lu.expected_data_out(&cmd.cdb));
                    table.execute(&cmd, &visible).await
                }
                (None, _) => ScsiResult::check(scsi::Sense::new(0x05, 0x25, 0x00)),
            };
            let kind = IoKind::of(&cmd.cdb);
            let bytes = match kind {
                IoKind::Read => result.data_in.len(),
                IoKind::Write => cmd.data_out.len(),
                IoKind::Other => 0,
            };
            metrics.command(
                kind,
                bytes as u64,
                started.elapsed().as_secs_f64(),
                result.status == scsi::status::GOOD,
            );
            let removed = tasks
                .lock()
                .map(|mut t| t.remove(&itt).is_some())
                .unwrap_or(true);
            if removed {
                respond(&tx, &ctx, data_out_need, result);
            }
        });
        guard.insert(
            itt,
            RunningTask {
                lun,
                abort: handle.abort_handle(),
            },
        );
    }
}

struct CmdCtx {
    itt: u32,
    edtl: u32,
    read: bool,
    write: bool,
    mrdsl: u32,
    max_burst: u32,
}

/// Send Data-In and/or the SCSI Response for a finished command.
fn respond(
    tx: &mpsc::UnboundedSender<Out>,
    ctx: &CmdCtx,
    data_out_need: Option<u64>,
    result: ScsiResult,
) {
    let mut data = result.data_in;
    let mut flags_res = 0u8;
    let mut residual = 0u32;
    if ctx.read || !data.is_empty() {
        let want = if ctx.read { ctx.edtl as usize } else { 0 };
        if data.len() > want {
            residual = (data.len() - want) as u32;
            flags_res = 0x04; // O
            data.truncate(want);
        } else if data.len() < want {
            residual = (want - data.len()) as u32;
            flags_res = 0x02; // U
        }
    } else if data_out_need.is_some() || ctx.write {
        if let Some(need) = data_out_need {
            let have = ctx.edtl as u64;
            if need > have {
                residual = (need - have).min(u32::MAX as u64) as u32;
                flags_res = 0x04;
            } else if need < have {
                residual = (have - need).min(u32::MAX as u64) as u32;
                flags_res = 0x02;
            }
        }
    } else if ctx.edtl > 0 {
        residual = ctx.edtl;
        flags_res = 0x02;
    }
    let good = result.status == scsi::status::GOOD && result.sense.is_none();
    let total = data.len();
    let mut offset = 0usize;
    let mut data_sn = 0u32;
    while offset < total {
        let len = (total - offset).min(ctx.mrdsl as usize);
        let last = offset + len == total;
        let burst_end = last || (offset + len).is_multiple_of(ctx.max_burst as usize);
        let mut p = Pdu::new(op::DATA_IN);
        let mut flags = if burst_end { 0x80 } else { 0 };
        p.set_itt(ctx.itt);
        p.set_ttt(RESERVED_TAG);
        p.set_u32(36, data_sn);
        p.set_u32(40, offset as u32);
        p.data = data.slice(offset..offset + len);
        data_sn = data_sn.wrapping_add(1);
        offset += len;
        if last && good {
            // Phase collapse: status rides on the last Data-In.
            flags |= 0x80 | 0x01 | flags_res;
            p.bhs[3] = result.status;
            p.set_u32(44, residual);
            p.set_flags(flags);
            let _ = tx.send(Out::Pdu(p, Sn::Status));
            return;
        }
        p.set_flags(flags);
        let _ = tx.send(Out::Pdu(p, Sn::None));
    }
    let mut r = Pdu::new(op::SCSI_RESPONSE);
    r.set_flags(0x80 | flags_res);
    r.bhs[2] = 0; // command completed at target
    r.bhs[3] = result.status;
    r.set_itt(ctx.itt);
    r.set_u32(36, data_sn); // ExpDataSN
    r.set_u32(44, residual);
    if let Some(sense) = result.sense {
        let mut d = BytesMut::with_capacity(sense.len() + 2);
        d.put_u16(sense.len() as u16);
        d.put_slice(&sense);
        r.data = d.freeze();
    }
    let _ = tx.send(Out::Pdu(r, Sn::Status));
}

fn valid_ahs(ahs: &[u8]) -> bool {
    let mut rest = ahs;
    while !rest.is_empty() {
        if rest.len() < 4 {
            return false;
        }
        let len = u16::from_be_bytes([rest[0], rest[1]]) as usize;
        let total = (3 + len).div_ceil(4) * 4;
        if total > rest.len() {
            return false;
        }
        rest = &rest[total..];
    }
    true
}

/// The extra CDB bytes of an Extended CDB AHS (type 1), if present.
fn extended_cdb(ahs: &[u8]) -> Option<&[u8]> {
    let mut rest = ahs;
    while rest.len() >= 4 {
        let len = u16::from_be_bytes([rest[0], rest[1]]) as usize;
        let kind = rest[2];
        let total = (3 + len).div_ceil(4) * 4;
        if total > rest.len() || len == 0 {
            return None;
        }
        if kind == 1 {
            // AHSLength counts the reserved byte plus the CDB bytes.
            return rest.get(4..3 + len);
        }
        rest = &rest[total..];
    }
    None
}
