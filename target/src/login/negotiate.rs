//! Operational key negotiation (RFC 7143 section 13) and the login stage
//! machine (RFC 7143 sections 6 and 11.12-11.13, CHAP per section 12.1.3).
//!
//! Stage machine summary:
//! - the first Login Request must carry `InitiatorName` (and `TargetName` for
//!   a normal session); the [`LoginAuthority`] is consulted as soon as those
//!   are known and may redirect, refuse, or require CHAP;
//! - security stage (CSG 0): `AuthMethod` then, for CHAP, `CHAP_A` ->
//!   `CHAP_I`/`CHAP_C` -> `CHAP_N`/`CHAP_R` (+ optional mutual challenge);
//!   the target only agrees to leave the stage once authentication is done;
//! - operational stage (CSG 1): every section 13 key is answered; the target
//!   declares its `MaxRecvDataSegmentLength`;
//! - `T=1, NSG=3` with success completes the login and yields
//!   [`SessionParams`] (section 13 defaults for every key not negotiated).
//!
//! Text split across PDUs with the C bit is accumulated and answered with
//! empty responses until the final (C=0) PDU. Any protocol violation ends the
//! login with a non-zero status and `close = true`.

use std::collections::{HashMap, HashSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::chap;
use super::text;
use super::*;

/// Smallest/largest legal MaxRecvDataSegmentLength, MaxBurstLength and
/// FirstBurstLength (RFC 7143 sections 13.12-13.14).
const MIN_LEN: u32 = 512;
const MAX_LEN: u32 = (1 << 24) - 1;

/// Section 13 defaults.
pub const DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH: u32 = 8192;
pub const DEFAULT_MAX_BURST_LENGTH: u32 = 262_144;
pub const DEFAULT_FIRST_BURST_LENGTH: u32 = 65_536;
pub const DEFAULT_TIME2WAIT: u32 = 2;
pub const DEFAULT_TIME2RETAIN: u32 = 20;
pub const DEFAULT_MAX_OUTSTANDING_R2T: u32 = 1;
pub const DEFAULT_MAX_CONNECTIONS: u32 = 1;

/// The iSCSIProtocolLevel we claim (1 = RFC 7143).
const OUR_PROTOCOL_LEVEL: u64 = 1;

/// Longest iSCSI name (RFC 7143 section 4.2.7.1).
const MAX_ISCSI_NAME_LEN: usize = 223;

/// Cap on text accumulated over C-bit continuations (RFC 7143 requires at
/// least 8192 bytes).
const MAX_ACCUMULATED_TEXT: usize = 64 * 1024;
/// Cap on Login Request PDUs per login, so a peer cannot loop forever.
const MAX_LOGIN_PDUS: u32 = 1024;

/// Every key defined by RFC 7143 sections 12 and 13 (plus the obsoleted
/// marker keys and RFC 7144's iSCSIProtocolLevel).
const KNOWN_KEYS: &[&str] = &[
    "AuthMethod",
    "CHAP_A",
    "CHAP_I",
    "CHAP_C",
    "CHAP_N",
    "CHAP_R",
    "HeaderDigest",
    "DataDigest",
    "MaxConnections",
    "SendTargets",
    "TargetName",
    "InitiatorName",
    "TargetAlias",
    "InitiatorAlias",
    "TargetAddress",
    "TargetPortalGroupTag",
    "InitialR2T",
    "ImmediateData",
    "MaxRecvDataSegmentLength",
    "MaxBurstLength",
    "FirstBurstLength",
    "DefaultTime2Wait",
    "DefaultTime2Retain",
    "MaxOutstandingR2T",
    "DataPDUInOrder",
    "DataSequenceInOrder",
    "ErrorRecoveryLevel",
    "SessionType",
    "TaskReporting",
    "iSCSIProtocolLevel",
    "OFMarker",
    "IFMarker",
    "OFMarkInt",
    "IFMarkInt",
];

const NOT_UNDERSTOOD: &str = "NotUnderstood";
const IRRELEVANT: &str = "Irrelevant";
const REJECT: &str = "Reject";

fn is_extension_key(key: &str) -> bool {
    key.starts_with("X-") || key.starts_with("X#")
}

fn is_security_key(key: &str) -> bool {
    key == "AuthMethod" || key.starts_with("CHAP_")
}

fn is_identity_key(key: &str) -> bool {
    matches!(
        key,
        "InitiatorName" | "TargetName" | "SessionType" | "InitiatorAlias"
    )
}

/// Parse a numerical value: decimal or `0x` hex (RFC 7143 section 6.1).
fn parse_number(v: &str) -> Option<u64> {
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        if h.is_empty() || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u64::from_str_radix(h, 16).ok()
    } else {
        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        v.parse().ok()
    }
}

fn parse_ranged(v: &str, min: u64, max: u64) -> Option<u32> {
    parse_number(v)
        .filter(|n| (min..=max).contains(n))
        .and_then(|n| u32::try_from(n).ok())
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

fn yes_no(b: bool) -> String {
    if b { "Yes" } else { "No" }.to_string()
}

/// Operational values negotiated so far (`None` = not negotiated, default
/// applies).
#[derive(Debug, Clone, Default)]
struct OpValues {
    header_digest: Option<bool>,
    data_digest: Option<bool>,
    max_connections: Option<u32>,
    initial_r2t: Option<bool>,
    immediate_data: Option<bool>,
    initiator_mrdsl: Option<u32>,
    max_burst: Option<u32>,
    first_burst: Option<u32>,
    time2wait: Option<u32>,
    time2retain: Option<u32>,
    max_outstanding_r2t: Option<u32>,
    data_pdu_in_order: Option<bool>,
    data_sequence_in_order: Option<bool>,
    error_recovery_level: Option<u32>,
}

/// Our side of each negotiation, derived from [`LoginConfig`].
#[derive(Debug, Clone)]
struct Ours {
    mrdsl: u32,
    max_burst: u32,
    first_burst: u32,
    max_outstanding_r2t: u32,
    max_connections: u32,
    header_digest: bool,
    data_digest: bool,
    require_header_digest: bool,
    require_data_digest: bool,
    time2wait: u32,
}

impl Ours {
    fn from_config(c: &LoginConfig) -> Self {
        let max_burst = c.max_burst_length.clamp(MIN_LEN, MAX_LEN);
        Ours {
            mrdsl: c.max_recv_data_segment_length.clamp(MIN_LEN, MAX_LEN),
            max_burst,
            first_burst: c.first_burst_length.clamp(MIN_LEN, max_burst),
            max_outstanding_r2t: c.max_outstanding_r2t.clamp(1, 65535),
            max_connections: c.max_connections.clamp(1, 65535),
            header_digest: c.allow_header_digest || c.require_header_digest,
            data_digest: c.allow_data_digest || c.require_data_digest,
            require_header_digest: c.require_header_digest,
            require_data_digest: c.require_data_digest,
            time2wait: c.default_time2wait.min(3600),
        }
    }
}

/// Pick the first value of the offered list we support (RFC 7143 6.2.1).
fn pick_from_list<'a>(offer: &'a str, supported: &[&str]) -> Option<&'a str> {
    offer.split(',').find(|v| supported.contains(v))
}

/// Answer one operational key during login. Returns the reply value, or
/// `None` when the key is declarative and needs no reply.
fn negotiate_operational(
    ops: &mut OpValues,
    ours: &Ours,
    discovery: bool,
    key: &str,
    value: &str,
) -> Option<String> {
    // Keys irrelevant for discovery sessions (RFC 7143 section 13).
    let normal_only = matches!(
        key,
        "MaxConnections"
            | "InitialR2T"
            | "ImmediateData"
            | "MaxBurstLength"
            | "FirstBurstLength"
            | "MaxOutstandingR2T"
            | "DataPDUInOrder"
            | "DataSequenceInOrder"
            | "TaskReporting"
    );
    if discovery && normal_only {
        return Some(IRRELEVANT.into());
    }
    let reply = match key {
        "HeaderDigest" | "DataDigest" => {
            let allow = if key == "HeaderDigest" {
                ours.header_digest
            } else {
                ours.data_digest
            };
            let require = if key == "HeaderDigest" {
                ours.require_header_digest
            } else {
                ours.require_data_digest
            };
            let supported: &[&str] = if require {
                &["CRC32C"]
            } else if allow {
                &["CRC32C", "None"]
            } else {
                &["None"]
            };
            match pick_from_list(value, supported) {
                Some(v) => {
                    let on = v == "CRC32C";
                    if key == "HeaderDigest" {
                        ops.header_digest = Some(on);
                    } else {
                        ops.data_digest = Some(on);
                    }
                    v.to_string()
                }
                None => REJECT.into(),
            }
        }
        "MaxConnections" => min_numeric(value, 1, 65535, ours.max_connections, |n| {
            ops.max_connections = Some(n)
        }),
        // We accept unsolicited Data-Out (the connection layer implements
        // it), so our side is No and the initiator's offer decides (OR).
        "InitialR2T" => bool_fn(value, false, false, |b| ops.initial_r2t = Some(b)),
        "ImmediateData" => bool_fn(value, true, true, |b| ops.immediate_data = Some(b)),
        "DataPDUInOrder" => bool_fn(value, true, false, |b| ops.data_pdu_in_order = Some(b)),
        "DataSequenceInOrder" => {
            bool_fn(value, true, false, |b| ops.data_sequence_in_order = Some(b))
        }
        "MaxRecvDataSegmentLength" => {
            // Declarative: record the initiator's limit, no reply.
            return match parse_ranged(value, MIN_LEN.into(), MAX_LEN.into()) {
                Some(n) => {
                    ops.initiator_mrdsl = Some(n);
                    None
                }
                None => Some(REJECT.into()),
            };
        }
        "MaxBurstLength" => min_numeric(value, MIN_LEN, MAX_LEN, ours.max_burst, |n| {
            ops.max_burst = Some(n)
        }),
        "FirstBurstLength" => min_numeric(value, MIN_LEN, MAX_LEN, ours.first_burst, |n| {
            ops.first_burst = Some(n)
        }),
        "DefaultTime2Wait" => match parse_ranged(value, 0, 3600) {
            Some(n) => {
                let r = n.max(ours.time2wait);
                ops.time2wait = Some(r);
                r.to_string()
            }
            None => REJECT.into(),
        },
        "DefaultTime2Retain" => min_numeric(value, 0, 3600, DEFAULT_TIME2RETAIN, |n| {
            ops.time2retain = Some(n)
        }),
        "MaxOutstandingR2T" => min_numeric(value, 1, 65535, ours.max_outstanding_r2t, |n| {
            ops.max_outstanding_r2t = Some(n)
        }),
        // We implement error recovery level 0 only.
        "ErrorRecoveryLevel" => min_numeric(value, 0, 2, 0, |n| ops.error_recovery_level = Some(n)),
        "TaskReporting" => match pick_from_list(value, &["RFC3720"]) {
            Some(v) => v.to_string(),
            None => REJECT.into(),
        },
        "iSCSIProtocolLevel" => match parse_number(value).filter(|n| *n <= 31) {
            Some(n) => n.min(OUR_PROTOCOL_LEVEL).to_string(),
            None => REJECT.into(),
        },
        // Obsoleted by RFC 7143 (section 13.25): markers are never used.
        "OFMarker" | "IFMarker" => match parse_bool(value) {
            Some(_) => "No".into(),
            None => REJECT.into(),
        },
        "OFMarkInt" | "IFMarkInt" => IRRELEVANT.into(),
        _ => NOT_UNDERSTOOD.into(),
    };
    Some(reply)
}

/// Numeric negotiation whose result is the minimum of both sides.
fn min_numeric(value: &str, lo: u32, hi: u32, ours: u32, set: impl FnOnce(u32)) -> String {
    match parse_ranged(value, lo.into(), hi.into()) {
        Some(n) => {
            let r = n.min(ours);
            set(r);
            r.to_string()
        }
        None => REJECT.into(),
    }
}

/// Boolean negotiation: `and = true` for AND keys, `false` for OR keys.
fn bool_fn(value: &str, ours: bool, and: bool, set: impl FnOnce(bool)) -> String {
    match parse_bool(value) {
        Some(b) => {
            let r = if and { b && ours } else { b || ours };
            set(r);
            yes_no(r)
        }
        None => REJECT.into(),
    }
}

/// Answer a Text Request's keys in Full Feature Phase.
///
/// The caller MUST strip `SendTargets` first (the connection layer answers
/// discovery itself); if it is left in, it is answered with `Reject`.
/// `MaxRecvDataSegmentLength` may be re-declared (updates
/// `params.initiator_max_recv_data_segment_length`), `InitiatorAlias` may be
/// re-declared; keys that are only legal during login are answered with
/// `Reject`, unknown and `X-`/`X#` keys with `NotUnderstood`. A key repeated
/// within one request is answered with `Reject` on its repeats.
pub fn ffp_text(pairs: &[(String, String)], params: &mut SessionParams) -> Vec<(String, String)> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (k, v) in pairs {
        if !seen.insert(k.as_str()) {
            out.push((k.clone(), REJECT.to_string()));
            continue;
        }
        match k.as_str() {
            "MaxRecvDataSegmentLength" => match parse_ranged(v, MIN_LEN.into(), MAX_LEN.into()) {
                Some(n) => params.initiator_max_recv_data_segment_length = n,
                None => out.push((k.clone(), REJECT.to_string())),
            },
            "InitiatorAlias" => params.initiator_alias = Some(v.clone()),
            key if is_extension_key(key) => out.push((k.clone(), NOT_UNDERSTOOD.to_string())),
            key if KNOWN_KEYS.contains(&key) => out.push((k.clone(), REJECT.to_string())),
            _ => out.push((k.clone(), NOT_UNDERSTOOD.to_string())),
        }
    }
    out
}

/// Progress of authentication in the security stage.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Auth {
    /// No AuthMethod agreed yet.
    Pending,
    /// AuthMethod=None agreed (only when CHAP is not required).
    NoneChosen,
    /// AuthMethod=CHAP agreed; waiting for CHAP_A.
    ChapAwaitAlgorithm,
    /// Challenge sent; waiting for CHAP_N/CHAP_R.
    ChapAwaitResponse { id: u8, challenge: Vec<u8> },
    /// CHAP verified.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No complete text set received yet.
    Start,
    /// In login stage 0 (security) or 1 (operational).
    Stage(u8),
    /// Login completed or failed; no further PDUs are accepted.
    Finished,
}

/// A step that ends the login with a non-zero status.
#[derive(Debug)]
struct Fail {
    status: (u8, u8),
    data: Vec<(String, String)>,
}

impl Fail {
    fn new(status: (u8, u8)) -> Self {
        Fail {
            status,
            data: Vec::new(),
        }
    }
}

/// Security keys found in one text set.
#[derive(Default)]
struct SecKeys {
    auth_method: Option<String>,
    chap_a: Option<String>,
    chap_i: Option<String>,
    chap_c: Option<String>,
    chap_n: Option<String>,
    chap_r: Option<String>,
}

impl SecKeys {
    fn has_chap(&self) -> bool {
        self.chap_a.is_some()
            || self.chap_i.is_some()
            || self.chap_c.is_some()
            || self.chap_n.is_some()
            || self.chap_r.is_some()
    }
}

/// The login state machine behind [`LoginMachine`].
pub struct Machine {
    authority: Arc<dyn LoginAuthority>,
    config: LoginConfig,
    ours: Ours,
    rng: StdRng,
    state: State,
    pdus: u32,
    /// Text accumulated from C=1 PDUs, and the CSG they were sent in.
    pending: Vec<u8>,
    pending_csg: Option<u8>,
    initiator_name: Option<String>,
    initiator_alias: Option<String>,
    target_name: Option<String>,
    session_type: SessionType,
    chap: Option<ChapCredentials>,
    auth: Auth,
    /// Every key received so far in this login, with its value.
    seen: HashMap<String, String>,
    ops: OpValues,
    declared_mrdsl: bool,
}

impl Machine {
    pub fn new(config: LoginConfig, authority: Arc<dyn LoginAuthority>) -> Self {
        Self::build(config, authority, StdRng::from_entropy())
    }

    pub fn with_seed(config: LoginConfig, authority: Arc<dyn LoginAuthority>, seed: u64) -> Self {
        Self::build(config, authority, StdRng::seed_from_u64(seed))
    }

    fn build(config: LoginConfig, authority: Arc<dyn LoginAuthority>, rng: StdRng) -> Self {
        Machine {
            authority,
            ours: Ours::from_config(&config),
            config,
            rng,
            state: State::Start,
            pdus: 0,
            pending: Vec::new(),
            pending_csg: None,
            initiator_name: None,
            initiator_alias: None,
            target_name: None,
            session_type: SessionType::Normal,
            chap: None,
            auth: Auth::Pending,
            seen: HashMap::new(),
            ops: OpValues::default(),
            declared_mrdsl: false,
        }
    }

    /// Process one Login Request PDU. Never panics.
    pub fn step(&mut self, req: &LoginRequestFields, data: &[u8]) -> LoginStep {
        match self.step_inner(req, data) {
            Ok(step) => {
                if step.complete.is_some() {
                    self.state = State::Finished;
                }
                step
            }
            Err(fail) => {
                self.state = State::Finished;
                tracing::info!(
                    initiator = self.initiator_name.as_deref().unwrap_or(""),
                    class = fail.status.0,
                    detail = fail.status.1,
                    "login rejected"
                );
                LoginStep {
                    response: LoginResponseFields {
                        transit: false,
                        cont: false,
                        csg: req.csg & 3,
                        nsg: 0,
                        version_max: 0,
                        version_active: 0,
                        status_class: fail.status.0,
                        status_detail: fail.status.1,
                    },
                    data: text::encode(&fail.data),
                    complete: None,
                    close: true,
                }
            }
        }
    }

    fn ok_step(csg: u8, transit: bool, nsg: u8, pairs: &[(String, String)]) -> LoginStep {
        LoginStep {
            response: LoginResponseFields {
                transit,
                cont: false,
                csg,
                nsg: if transit { nsg } else { 0 },
                version_max: 0,
                version_active: 0,
                status_class: 0,
                status_detail: 0,
            },
            data: text::encode(pairs),
            complete: None,
            close: false,
        }
    }

    fn step_inner(&mut self, req: &LoginRequestFields, data: &[u8]) -> Result<LoginStep, Fail> {
        use status::*;
        if self.state == State::Finished {
            return Err(Fail::new(INITIATOR_ERROR));
        }
        self.pdus += 1;
        if self.pdus > MAX_LOGIN_PDUS {
            return Err(Fail::new(INITIATOR_ERROR));
        }
        if req.version_min != 0 {
            return Err(Fail::new(UNSUPPORTED_VERSION));
        }
        let csg = req.csg;
        if csg > 1 {
            return Err(Fail::new(INITIATOR_ERROR));
        }
        match (self.state, self.pending_csg) {
            (_, Some(p)) if p != csg => return Err(Fail::new(INITIATOR_ERROR)),
            (State::Stage(s), _) if s != csg => return Err(Fail::new(INITIATOR_ERROR)),
            _ => {}
        }

        // C bit: accumulate and answer with an empty response.
        if req.cont {
            if req.transit {
                return Err(Fail::new(INITIATOR_ERROR));
            }
            if self.pending.len() + data.len() > MAX_ACCUMULATED_TEXT {
                return Err(Fail::new(INITIATOR_ERROR));
            }
            self.pending.extend_from_slice(data);
            self.pending_csg = Some(csg);
            return Ok(Self::ok_step(csg, false, 0, &[]));
        }
        if req.transit && (req.nsg <= csg || req.nsg == 2 || req.nsg > 3) {
            return Err(Fail::new(INITIATOR_ERROR));
        }

        let mut buf = std::mem::take(&mut self.pending);
        self.pending_csg = None;
        if buf.len() + data.len() > MAX_ACCUMULATED_TEXT {
            return Err(Fail::new(INITIATOR_ERROR));
        }
        buf.extend_from_slice(data);
        let pairs = match text::parse(&buf) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(error = %e, "malformed login text");
                return Err(Fail::new(INITIATOR_ERROR));
            }
        };

        // Duplicates within one text set, and re-negotiation of a defined
        // key across PDUs, are protocol errors (RFC 7143 section 6.2).
        // Identity keys may be repeated with the same value (libiscsi
        // re-sends them in the operational stage): such repeats are dropped.
        // Unknown keys are simply answered NotUnderstood each time.
        let mut in_set = HashSet::new();
        let mut fresh: Vec<(String, String)> = Vec::with_capacity(pairs.len());
        for (k, v) in pairs {
            if !in_set.insert(k.clone()) {
                tracing::debug!(key = %k, "duplicate key in login text");
                return Err(Fail::new(INITIATOR_ERROR));
            }
            if !KNOWN_KEYS.contains(&k.as_str()) {
                fresh.push((k, v));
                continue;
            }
            if let Some(prev) = self.seen.get(&k) {
                if is_identity_key(&k) && *prev == v {
                    continue;
                }
                tracing::debug!(key = %k, "key renegotiated during login");
                return Err(Fail::new(INITIATOR_ERROR));
            }
            self.seen.insert(k.clone(), v.clone());
            fresh.push((k, v));
        }

        let mut reply: Vec<(String, String)> = Vec::new();
        let first = self.state == State::Start;
        if first {
            self.identify(&fresh)?;
            self.state = State::Stage(csg);
            if self.session_type == SessionType::Normal {
                reply.push((
                    "TargetPortalGroupTag".into(),
                    self.config.target_portal_group_tag.to_string(),
                ));
                if let Some(alias) = &self.config.target_alias {
                    reply.push(("TargetAlias".into(), alias.clone()));
                }
            }
        } else {
            self.check_late_identity(&fresh)?;
        }
        let discovery = self.session_type == SessionType::Discovery;

        // Skipping the security stage is only allowed without CHAP.
        if csg == 1 && self.chap.is_some() && self.auth != Auth::Done {
            return Err(Fail::new(AUTHENTICATION_FAILURE));
        }

        let mut sec = SecKeys::default();
        let mut op_reply = Vec::new();
        for (k, v) in fresh {
            if is_identity_key(&k) {
                continue;
            }
            if is_security_key(&k) {
                if csg != 0 {
                    return Err(Fail::new(INITIATOR_ERROR));
                }
                let slot = match k.as_str() {
                    "AuthMethod" => &mut sec.auth_method,
                    "CHAP_A" => &mut sec.chap_a,
                    "CHAP_I" => &mut sec.chap_i,
                    "CHAP_C" => &mut sec.chap_c,
                    "CHAP_N" => &mut sec.chap_n,
                    "CHAP_R" => &mut sec.chap_r,
                    _ => {
                        op_reply.push((k, NOT_UNDERSTOOD.to_string()));
                        continue;
                    }
                };
                *slot = Some(v);
                continue;
            }
            let answer = match k.as_str() {
                "SendTargets" => Some(IRRELEVANT.to_string()),
                "TargetAlias" | "TargetAddress" | "TargetPortalGroupTag" => {
                    Some(REJECT.to_string())
                }
                key if is_extension_key(key) => Some(NOT_UNDERSTOOD.to_string()),
                _ => negotiate_operational(&mut self.ops, &self.ours, discovery, &k, &v),
            };
            if let Some(a) = answer {
                op_reply.push((k, a));
            }
        }
        // FirstBurstLength must not exceed MaxBurstLength.
        if let Some(fb) = self.ops.first_burst {
            let mb = self.ops.max_burst.unwrap_or(DEFAULT_MAX_BURST_LENGTH);
            if fb > mb {
                self.ops.first_burst = Some(mb);
                for (k, v) in op_reply.iter_mut() {
                    if k == "FirstBurstLength" {
                        *v = mb.to_string();
                    }
                }
            }
        }

        let mut transit = req.transit;
        if csg == 0 {
            let progressed = self.security(&sec, &mut reply)?;
            let auth_ok = self.chap.is_none() || self.auth == Auth::Done;
            if transit && !auth_ok {
                if progressed {
                    // Mid-exchange: stay in the security stage.
                    transit = false;
                } else {
                    return Err(Fail::new(AUTHENTICATION_FAILURE));
                }
            }
        }
        reply.extend(op_reply);

        let to_ffp = transit && req.nsg == 3;
        if !self.declared_mrdsl && (csg == 1 || to_ffp) {
            self.declared_mrdsl = true;
            reply.push((
                "MaxRecvDataSegmentLength".into(),
                self.ours.mrdsl.to_string(),
            ));
        }

        let mut step = Self::ok_step(csg, transit, req.nsg, &reply);
        if transit {
            if to_ffp {
                step.complete = Some(self.params());
                tracing::debug!(
                    initiator = self.initiator_name.as_deref().unwrap_or(""),
                    target = self.target_name.as_deref().unwrap_or(""),
                    "negotiation complete"
                );
            } else {
                self.state = State::Stage(req.nsg);
            }
        }
        Ok(step)
    }

    /// Read the identity keys of the first text set and ask the authority.
    fn identify(&mut self, pairs: &[(String, String)]) -> Result<(), Fail> {
        use status::*;
        let get = |key: &str| pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
        let initiator = get("InitiatorName").filter(|n| !n.is_empty());
        let Some(initiator) = initiator else {
            return Err(Fail::new(MISSING_PARAMETER));
        };
        if initiator.len() > MAX_ISCSI_NAME_LEN {
            return Err(Fail::new(INITIATOR_ERROR));
        }
        self.session_type = match get("SessionType").as_deref() {
            None | Some("Normal") => SessionType::Normal,
            Some("Discovery") => SessionType::Discovery,
            Some(_) => return Err(Fail::new(SESSION_TYPE_NOT_SUPPORTED)),
        };
        self.initiator_name = Some(initiator.clone());
        self.initiator_alias = get("InitiatorAlias");
        let target = match self.session_type {
            SessionType::Discovery => None,
            SessionType::Normal => match get("TargetName").filter(|n| !n.is_empty()) {
                Some(t) if t.len() > MAX_ISCSI_NAME_LEN => return Err(Fail::new(INITIATOR_ERROR)),
                Some(t) => Some(t),
                None => return Err(Fail::new(MISSING_PARAMETER)),
            },
        };
        self.target_name = target.clone();
        match self.authority.decide(&initiator, target.as_deref()) {
            LoginDecision::Accept { chap } => {
                self.chap = chap;
                Ok(())
            }
            LoginDecision::NotFound => Err(Fail::new(NOT_FOUND)),
            LoginDecision::Forbidden => Err(Fail::new(AUTHORIZATION_FAILURE)),
            LoginDecision::Redirect { address, permanent } => Err(Fail {
                status: if permanent {
                    TARGET_MOVED_PERMANENTLY
                } else {
                    TARGET_MOVED_TEMPORARILY
                },
                data: vec![("TargetAddress".into(), redirect_address(&address))],
            }),
        }
    }

    /// Identity keys after the first text set must match what was declared.
    fn check_late_identity(&mut self, pairs: &[(String, String)]) -> Result<(), Fail> {
        for (k, v) in pairs {
            let consistent = match k.as_str() {
                "InitiatorName" => self.initiator_name.as_deref() == Some(v.as_str()),
                "TargetName" => {
                    self.session_type == SessionType::Discovery
                        || self.target_name.as_deref() == Some(v.as_str())
                }
                "SessionType" => {
                    let now = match self.session_type {
                        SessionType::Normal => "Normal",
                        SessionType::Discovery => "Discovery",
                    };
                    now == v
                }
                "InitiatorAlias" => {
                    self.initiator_alias = Some(v.clone());
                    true
                }
                _ => true,
            };
            if !consistent {
                return Err(Fail::new(status::INITIATOR_ERROR));
            }
        }
        Ok(())
    }

    /// Security stage keys. Returns whether the exchange made progress
    /// (method agreed or challenge sent), i.e. whether staying in the stage
    /// is legitimate.
    fn security(&mut self, sec: &SecKeys, reply: &mut Vec<(String, String)>) -> Result<bool, Fail> {
        use status::AUTHENTICATION_FAILURE as AUTH_FAIL;
        let mut progressed = false;
        if let Some(offer) = &sec.auth_method {
            if self.auth != Auth::Pending {
                return Err(Fail::new(status::INITIATOR_ERROR));
            }
            let methods: Vec<&str> = offer.split(',').collect();
            if self.chap.is_some() {
                if !methods.contains(&"CHAP") {
                    tracing::info!(
                        initiator = self.initiator_name.as_deref().unwrap_or(""),
                        "CHAP required but not offered"
                    );
                    return Err(Fail::new(AUTH_FAIL));
                }
                reply.push(("AuthMethod".into(), "CHAP".into()));
                self.auth = Auth::ChapAwaitAlgorithm;
                progressed = true;
            } else if methods.contains(&"None") {
                reply.push(("AuthMethod".into(), "None".into()));
                self.auth = Auth::NoneChosen;
            } else {
                // No credentials configured, so we cannot run CHAP.
                reply.push(("AuthMethod".into(), REJECT.into()));
            }
        }

        match std::mem::replace(&mut self.auth, Auth::Pending) {
            Auth::ChapAwaitAlgorithm => {
                self.auth = Auth::ChapAwaitAlgorithm;
                if sec.chap_n.is_some()
                    || sec.chap_r.is_some()
                    || sec.chap_i.is_some()
                    || sec.chap_c.is_some()
                {
                    return Err(Fail::new(AUTH_FAIL));
                }
                match &sec.chap_a {
                    None if progressed => {}
                    None => return Err(Fail::new(AUTH_FAIL)),
                    Some(list) => {
                        let md5 = list
                            .split(',')
                            .any(|a| parse_number(a) == Some(u64::from(chap::CHAP_MD5)));
                        if !md5 {
                            return Err(Fail::new(AUTH_FAIL));
                        }
                        let id: u8 = self.rng.gen();
                        let mut challenge = vec![0u8; chap::CHALLENGE_LEN];
                        self.rng.fill(&mut challenge[..]);
                        reply.push(("CHAP_A".into(), chap::CHAP_MD5.to_string()));
                        reply.push(("CHAP_I".into(), id.to_string()));
                        reply.push(("CHAP_C".into(), chap::encode_hex(&challenge)));
                        self.auth = Auth::ChapAwaitResponse { id, challenge };
                        progressed = true;
                    }
                }
            }
            Auth::ChapAwaitResponse { id, challenge } => {
                // Only CHAP_N/CHAP_R (+ mutual CHAP_I/CHAP_C) may follow.
                let mutual = self.verify_chap(id, &challenge, sec)?;
                if let Some((name, resp)) = mutual {
                    reply.push(("CHAP_N".into(), name));
                    reply.push(("CHAP_R".into(), chap::encode_hex(&resp)));
                }
                self.auth = Auth::Done;
            }
            other => {
                self.auth = other;
                if sec.has_chap() {
                    return Err(Fail::new(AUTH_FAIL));
                }
            }
        }
        Ok(progressed)
    }

    /// Check the initiator's CHAP response; answer a mutual challenge.
    fn verify_chap(
        &self,
        id: u8,
        challenge: &[u8],
        sec: &SecKeys,
    ) -> Result<Option<(String, [u8; 16])>, Fail> {
        let fail = || Fail::new(status::AUTHENTICATION_FAILURE);
        let who = self.initiator_name.as_deref().unwrap_or("");
        let creds = self.chap.as_ref().ok_or_else(fail)?;
        if sec.chap_a.is_some() {
            return Err(fail());
        }
        let (Some(name), Some(resp)) = (&sec.chap_n, &sec.chap_r) else {
            tracing::info!(initiator = who, "CHAP_N/CHAP_R missing");
            return Err(fail());
        };
        let resp = chap::decode_binary(resp).map_err(|_| fail())?;
        let expected = chap::md5_response(id, &creds.secret, challenge);
        let resp_ok = chap::constant_time_eq(&resp, &expected);
        if *name != creds.user || !resp_ok {
            tracing::info!(initiator = who, "CHAP authentication failed");
            return Err(fail());
        }
        match (&sec.chap_i, &sec.chap_c) {
            (None, None) => Ok(None),
            (Some(i), Some(c)) => {
                let Some((mutual_user, mutual_secret)) = &creds.mutual else {
                    tracing::info!(initiator = who, "mutual CHAP requested, not configured");
                    return Err(fail());
                };
                let their_id = chap::parse_identifier(i).map_err(|_| fail())?;
                let their_c = chap::decode_binary(c).map_err(|_| fail())?;
                if their_c == challenge {
                    tracing::info!(initiator = who, "mutual CHAP challenge reflected");
                    return Err(fail());
                }
                let r = chap::md5_response(their_id, mutual_secret, &their_c);
                Ok(Some((mutual_user.clone(), r)))
            }
            _ => Err(fail()),
        }
    }

    /// Final parameters: negotiated values, section 13 defaults otherwise.
    fn params(&self) -> SessionParams {
        let o = &self.ops;
        let max_burst = o.max_burst.unwrap_or(DEFAULT_MAX_BURST_LENGTH);
        SessionParams {
            session_type: self.session_type,
            initiator_name: self.initiator_name.clone().unwrap_or_default(),
            initiator_alias: self.initiator_alias.clone(),
            target_name: match self.session_type {
                SessionType::Discovery => String::new(),
                SessionType::Normal => self.target_name.clone().unwrap_or_default(),
            },
            header_digest: o.header_digest.unwrap_or(false),
            data_digest: o.data_digest.unwrap_or(false),
            our_max_recv_data_segment_length: if self.declared_mrdsl {
                self.ours.mrdsl
            } else {
                DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH
            },
            initiator_max_recv_data_segment_length: o
                .initiator_mrdsl
                .unwrap_or(DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH),
            max_burst_length: max_burst,
            first_burst_length: o
                .first_burst
                .unwrap_or(DEFAULT_FIRST_BURST_LENGTH)
                .min(max_burst),
            initial_r2t: o.initial_r2t.unwrap_or(true),
            immediate_data: o.immediate_data.unwrap_or(true),
            max_outstanding_r2t: o.max_outstanding_r2t.unwrap_or(DEFAULT_MAX_OUTSTANDING_R2T),
            data_pdu_in_order: o.data_pdu_in_order.unwrap_or(true),
            data_sequence_in_order: o.data_sequence_in_order.unwrap_or(true),
            default_time2wait: o.time2wait.unwrap_or(DEFAULT_TIME2WAIT),
            default_time2retain: o.time2retain.unwrap_or(DEFAULT_TIME2RETAIN),
            error_recovery_level: o.error_recovery_level.unwrap_or(0),
            max_connections: o.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
        }
    }
}

/// A redirect's TargetAddress must omit the portal group tag (RFC 7143
/// section 13.8): strip a trailing `,<digits>` (IPv6 brackets respected).
fn redirect_address(address: &str) -> String {
    if let Some(pos) = address.rfind(',') {
        let tag = &address[pos + 1..];
        let after_bracket = match address.rfind(']') {
            Some(b) => b < pos,
            None => true,
        };
        if after_bracket && !tag.is_empty() && tag.bytes().all(|b| b.is_ascii_digit()) {
            return address[..pos].to_string();
        }
    }
    address.to_string()
}

/// Authority used by [`fuzz_login`]: every normal login needs CHAP.
struct FuzzAuthority;

impl LoginAuthority for FuzzAuthority {
    fn decide(&self, initiator: &str, target: Option<&str>) -> LoginDecision {
        match (initiator.len() % 7, target) {
            (5, _) => LoginDecision::NotFound,
            (6, Some(_)) => LoginDecision::Redirect {
                address: "10.0.0.1:3260,1".into(),
                permanent: initiator.len() & 1 == 0,
            },
            _ => LoginDecision::Accept {
                chap: Some(ChapCredentials {
                    user: "user".into(),
                    secret: b"secretsecret".to_vec(),
                    mutual: Some(("target".into(), b"mutualsecret".to_vec())),
                }),
            },
        }
    }
}

/// Fuzz entry point: splits `data` into fake Login Request PDUs and drives a
/// CHAP-requiring [`LoginMachine`]. Panics only if an invariant is broken.
///
/// Each PDU is `flags, version, len, text[len]` where `flags` bit 7 = T,
/// bit 6 = C, bits 3..2 = CSG, bits 1..0 = NSG.
#[doc(hidden)]
pub fn fuzz_login(data: &[u8]) {
    let mut m = LoginMachine::with_seed(LoginConfig::default(), Arc::new(FuzzAuthority), 1);
    let mut rest = data;
    while rest.len() >= 3 {
        let (flags, version, len) = (rest[0], rest[1], usize::from(rest[2]));
        let body_end = (3 + len).min(rest.len());
        let text = &rest[3..body_end];
        rest = &rest[body_end..];
        let req = LoginRequestFields {
            transit: flags & 0x80 != 0,
            cont: flags & 0x40 != 0,
            csg: (flags >> 2) & 3,
            nsg: flags & 3,
            version_max: version,
            // Mostly valid versions so the machine gets past the check.
            version_min: if version & 0xf0 == 0xf0 {
                version & 0x0f
            } else {
                0
            },
            isid: [0; 6],
            tsih: 0,
            cid: 0,
        };
        let step = m.step(&req, text);
        let r = step.response;
        assert_eq!(r.version_max, 0);
        assert_eq!(r.version_active, 0);
        assert_eq!(
            step.close,
            (r.status_class, r.status_detail) != status::SUCCESS
        );
        if let Some(p) = &step.complete {
            assert!(r.transit && r.nsg == 3 && !step.close);
            assert!(p.first_burst_length <= p.max_burst_length);
        }
        if step.close || step.complete.is_some() {
            // The machine must refuse anything after the end of the login.
            let again = m.step(&req, rest);
            assert!(again.close && again.complete.is_none());
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use md5::{Digest, Md5};
    use std::sync::Mutex;

    const INAME: &str = "iqn.2000-01.com.example:init";
    const TNAME: &str = "iqn.2000-01.com.example:disk1";

    /// Authority returning a fixed decision and recording its queries.
    struct Fixed {
        decision: LoginDecision,
        asked: Mutex<Vec<(String, Option<String>)>>,
    }

    impl LoginAuthority for Fixed {
        fn decide(&self, initiator: &str, target: Option<&str>) -> LoginDecision {
            if let Ok(mut a) = self.asked.lock() {
                a.push((initiator.to_string(), target.map(str::to_string)));
            }
            self.decision.clone()
        }
    }

    fn fixed(decision: LoginDecision) -> Arc<Fixed> {
        Arc::new(Fixed {
            decision,
            asked: Mutex::new(Vec::new()),
        })
    }

    fn open() -> LoginDecision {
        LoginDecision::Accept { chap: None }
    }

    fn creds(mutual: bool) -> ChapCredentials {
        ChapCredentials {
            user: "alice".into(),
            secret: b"alice-secret-12".to_vec(),
            mutual: mutual.then(|| ("target-bob".to_string(), b"bob-secret-1234".to_vec())),
        }
    }

    fn machine_cfg(decision: LoginDecision, config: LoginConfig) -> LoginMachine {
        LoginMachine::with_seed(config, fixed(decision), 42)
    }

    fn machine(decision: LoginDecision) -> LoginMachine {
        machine_cfg(decision, LoginConfig::default())
    }

    fn req(csg: u8, transit: bool, nsg: u8) -> LoginRequestFields {
        LoginRequestFields {
            transit,
            csg,
            nsg,
            ..Default::default()
        }
    }

    fn txt(pairs: &[(&str, &str)]) -> Vec<u8> {
        text::encode(pairs)
    }

    fn pairs(step: &LoginStep) -> Vec<(String, String)> {
        text::parse(&step.data).unwrap()
    }

    fn get(step: &LoginStep, key: &str) -> Option<String> {
        pairs(step)
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    fn status_of(step: &LoginStep) -> (u8, u8) {
        (step.response.status_class, step.response.status_detail)
    }

    fn names() -> Vec<(&'static str, &'static str)> {
        vec![
            ("InitiatorName", INAME),
            ("TargetName", TNAME),
            ("SessionType", "Normal"),
        ]
    }

    /// One-PDU operational login with extra keys; returns the final step.
    fn op_login(extra: &[(&str, &str)]) -> LoginStep {
        op_login_cfg(extra, LoginConfig::default())
    }

    fn op_login_cfg(extra: &[(&str, &str)], cfg: LoginConfig) -> LoginStep {
        let mut m = machine_cfg(open(), cfg);
        let mut kv = names();
        kv.extend_from_slice(extra);
        m.step(&req(1, true, 3), &txt(&kv))
    }

    fn assert_fail(step: &LoginStep, st: (u8, u8)) {
        assert_eq!(status_of(step), st, "data: {:?}", pairs(step));
        assert!(step.close);
        assert!(step.complete.is_none());
        assert!(!step.response.transit);
    }

    fn md5_of(id: u8, secret: &[u8], challenge: &[u8]) -> Vec<u8> {
        let mut bytes = vec![id];
        bytes.extend_from_slice(secret);
        bytes.extend_from_slice(challenge);
        Md5::digest(&bytes).to_vec()
    }

    fn unhex(v: &str) -> Vec<u8> {
        hex::decode(v.strip_prefix("0x").unwrap()).unwrap()
    }

    // ---- full logins, defaults, declarations -------------------------

    #[test]
    fn libiscsi_style_operational_login_completes() {
        let step = op_login(&[
            ("HeaderDigest", "None,CRC32C"),
            ("DataDigest", "None"),
            ("InitialR2T", "Yes"),
            ("ImmediateData", "Yes"),
            ("MaxBurstLength", "262144"),
            ("FirstBurstLength", "262144"),
            ("DefaultTime2Wait", "2"),
            ("DefaultTime2Retain", "0"),
            ("MaxOutstandingR2T", "1"),
            ("ErrorRecoveryLevel", "0"),
            ("IFMarker", "No"),
            ("OFMarker", "No"),
            ("MaxConnections", "1"),
            ("MaxRecvDataSegmentLength", "262144"),
            ("DataPDUInOrder", "Yes"),
            ("DataSequenceInOrder", "Yes"),
        ]);
        assert_eq!(status_of(&step), status::SUCCESS);
        assert!(!step.close);
        let r = step.response;
        assert!(r.transit);
        assert_eq!(
            (r.csg, r.nsg, r.version_max, r.version_active),
            (1, 3, 0, 0)
        );
        assert_eq!(get(&step, "TargetPortalGroupTag").as_deref(), Some("1"));
        assert_eq!(get(&step, "HeaderDigest").as_deref(), Some("None"));
        assert_eq!(get(&step, "DefaultTime2Retain").as_deref(), Some("0"));
        assert_eq!(get(&step, "IFMarker").as_deref(), Some("No"));
        assert_eq!(
            get(&step, "MaxRecvDataSegmentLength").as_deref(),
            Some("262144")
        );
        let p = step.complete.unwrap();
        assert_eq!(p.session_type, SessionType::Normal);
        assert_eq!(p.initiator_name, INAME);
        assert_eq!(p.target_name, TNAME);
        assert_eq!(p.first_burst_length, 262144);
        assert_eq!(p.max_burst_length, 262144);
        assert_eq!(p.default_time2retain, 0);
        assert_eq!(p.initiator_max_recv_data_segment_length, 262144);
        assert_eq!(p.our_max_recv_data_segment_length, 256 * 1024);
    }

    #[test]
    fn defaults_for_keys_not_sent() {
        let step = op_login(&[]);
        let p = step.complete.clone().unwrap();
        assert_eq!(
            p,
            SessionParams {
                session_type: SessionType::Normal,
                initiator_name: INAME.into(),
                initiator_alias: None,
                target_name: TNAME.into(),
                header_digest: false,
                data_digest: false,
                our_max_recv_data_segment_length: 256 * 1024,
                initiator_max_recv_data_segment_length: 8192,
                max_burst_length: 262_144,
                first_burst_length: 65_536,
                initial_r2t: true,
                immediate_data: true,
                max_outstanding_r2t: 1,
                data_pdu_in_order: true,
                data_sequence_in_order: true,
                default_time2wait: 2,
                default_time2retain: 20,
                error_recovery_level: 0,
                max_connections: 1,
            }
        );
        // We still declare our MaxRecvDataSegmentLength and the TPGT.
        assert_eq!(
            pairs(&step),
            vec![
                ("TargetPortalGroupTag".to_string(), "1".to_string()),
                ("MaxRecvDataSegmentLength".to_string(), "262144".to_string()),
            ]
        );
    }

    #[test]
    fn session_type_defaults_to_normal_and_alias_declared() {
        let cfg = LoginConfig {
            target_alias: Some("disk one".into()),
            target_portal_group_tag: 7,
            ..Default::default()
        };
        let mut m = machine_cfg(open(), cfg);
        let step = m.step(
            &req(1, true, 3),
            &txt(&[
                ("InitiatorName", INAME),
                ("TargetName", TNAME),
                ("InitiatorAlias", "box"),
            ]),
        );
        assert_eq!(get(&step, "TargetPortalGroupTag").as_deref(), Some("7"));
        assert_eq!(get(&step, "TargetAlias").as_deref(), Some("disk one"));
        let p = step.complete.unwrap();
        assert_eq!(p.session_type, SessionType::Normal);
        assert_eq!(p.initiator_alias.as_deref(), Some("box"));
    }

    // ---- one test per key class --------------------------------------

    #[test]
    fn boolean_and_or() {
        let step = op_login(&[
            ("ImmediateData", "No"),       // AND: No
            ("InitialR2T", "Yes"),         // OR with our No: Yes
            ("DataPDUInOrder", "No"),      // OR with our Yes: Yes
            ("DataSequenceInOrder", "No"), // OR: Yes
        ]);
        assert_eq!(get(&step, "ImmediateData").as_deref(), Some("No"));
        assert_eq!(get(&step, "InitialR2T").as_deref(), Some("Yes"));
        assert_eq!(get(&step, "DataPDUInOrder").as_deref(), Some("Yes"));
        assert_eq!(get(&step, "DataSequenceInOrder").as_deref(), Some("Yes"));
        let p = step.complete.unwrap();
        assert!(!p.immediate_data && p.initial_r2t && p.data_pdu_in_order);
        assert!(p.data_sequence_in_order);

        let step = op_login(&[("ImmediateData", "Yes"), ("InitialR2T", "No")]);
        assert_eq!(get(&step, "ImmediateData").as_deref(), Some("Yes"));
        assert_eq!(get(&step, "InitialR2T").as_deref(), Some("No"));
        let p = step.complete.unwrap();
        assert!(p.immediate_data && !p.initial_r2t);
    }

    #[test]
    fn numeric_min_and_max() {
        let step = op_login(&[
            ("MaxBurstLength", "16777215"),
            ("FirstBurstLength", "65536"),
            ("MaxOutstandingR2T", "100"),
            ("MaxConnections", "8"),
            ("DefaultTime2Wait", "0"),    // max(0, 2) = 2
            ("DefaultTime2Retain", "60"), // min(60, 20) = 20
            ("ErrorRecoveryLevel", "2"),  // min(2, 0) = 0
        ]);
        assert_eq!(get(&step, "MaxBurstLength").as_deref(), Some("1048576"));
        assert_eq!(get(&step, "FirstBurstLength").as_deref(), Some("65536"));
        assert_eq!(get(&step, "MaxOutstandingR2T").as_deref(), Some("16"));
        assert_eq!(get(&step, "MaxConnections").as_deref(), Some("1"));
        assert_eq!(get(&step, "DefaultTime2Wait").as_deref(), Some("2"));
        assert_eq!(get(&step, "DefaultTime2Retain").as_deref(), Some("20"));
        assert_eq!(get(&step, "ErrorRecoveryLevel").as_deref(), Some("0"));
        let p = step.complete.unwrap();
        assert_eq!(p.max_burst_length, 1 << 20);
        assert_eq!(p.max_outstanding_r2t, 16);
        assert_eq!(p.default_time2wait, 2);
        assert_eq!(p.default_time2retain, 20);

        let step = op_login(&[("DefaultTime2Wait", "30"), ("MaxBurstLength", "4096")]);
        assert_eq!(get(&step, "DefaultTime2Wait").as_deref(), Some("30"));
        assert_eq!(get(&step, "MaxBurstLength").as_deref(), Some("4096"));
        // Hex numerical values are accepted too.
        let step = op_login(&[("MaxOutstandingR2T", "0x4")]);
        assert_eq!(get(&step, "MaxOutstandingR2T").as_deref(), Some("4"));
    }

    #[test]
    fn first_burst_never_exceeds_max_burst() {
        let step = op_login(&[("MaxBurstLength", "8192"), ("FirstBurstLength", "65536")]);
        assert_eq!(get(&step, "FirstBurstLength").as_deref(), Some("8192"));
        let p = step.complete.unwrap();
        assert_eq!((p.max_burst_length, p.first_burst_length), (8192, 8192));
        // Default FirstBurstLength is clamped to a smaller MaxBurstLength.
        let p = op_login(&[("MaxBurstLength", "4096")]).complete.unwrap();
        assert_eq!((p.max_burst_length, p.first_burst_length), (4096, 4096));
    }

    #[test]
    fn default_time2wait_offer_is_configurable() {
        let cfg = || LoginConfig {
            default_time2wait: 0,
            ..Default::default()
        };
        // max(0, 0) = 0: a dropped initiator may reconnect at once.
        let step = op_login_cfg(&[("DefaultTime2Wait", "0")], cfg());
        assert_eq!(get(&step, "DefaultTime2Wait").as_deref(), Some("0"));
        assert_eq!(step.complete.unwrap().default_time2wait, 0);
        // The initiator's larger value still wins.
        let step = op_login_cfg(&[("DefaultTime2Wait", "5")], cfg());
        assert_eq!(get(&step, "DefaultTime2Wait").as_deref(), Some("5"));
        assert_eq!(step.complete.unwrap().default_time2wait, 5);
    }

    #[test]
    fn declarative_max_recv_data_segment_length() {
        let cfg = LoginConfig {
            max_recv_data_segment_length: 65536,
            ..Default::default()
        };
        let step = op_login_cfg(&[("MaxRecvDataSegmentLength", "131072")], cfg);
        // Our declaration, not an echo of theirs.
        assert_eq!(
            get(&step, "MaxRecvDataSegmentLength").as_deref(),
            Some("65536")
        );
        let p = step.complete.unwrap();
        assert_eq!(p.initiator_max_recv_data_segment_length, 131072);
        assert_eq!(p.our_max_recv_data_segment_length, 65536);
    }

    #[test]
    fn list_negotiation_digests() {
        let step = op_login(&[("HeaderDigest", "CRC32C,None"), ("DataDigest", "CRC32C")]);
        assert_eq!(get(&step, "HeaderDigest").as_deref(), Some("CRC32C"));
        assert_eq!(get(&step, "DataDigest").as_deref(), Some("CRC32C"));
        let p = step.complete.unwrap();
        assert!(p.header_digest && p.data_digest);

        let cfg = LoginConfig {
            allow_header_digest: false,
            allow_data_digest: false,
            ..Default::default()
        };
        let step = op_login_cfg(
            &[("HeaderDigest", "CRC32C,None"), ("DataDigest", "CRC32C")],
            cfg,
        );
        assert_eq!(get(&step, "HeaderDigest").as_deref(), Some("None"));
        assert_eq!(get(&step, "DataDigest").as_deref(), Some("Reject"));
        let p = step.complete.unwrap();
        assert!(!p.header_digest && !p.data_digest);

        // A target that requires digests picks CRC32C even when the
        // initiator prefers None, and rejects an offer of None alone.
        let cfg = LoginConfig {
            require_header_digest: true,
            require_data_digest: true,
            ..Default::default()
        };
        let step = op_login_cfg(
            &[("HeaderDigest", "None,CRC32C"), ("DataDigest", "None")],
            cfg,
        );
        assert_eq!(get(&step, "HeaderDigest").as_deref(), Some("CRC32C"));
        assert_eq!(get(&step, "DataDigest").as_deref(), Some("Reject"));

        let step = op_login(&[("TaskReporting", "FastAbort,RFC3720")]);
        assert_eq!(get(&step, "TaskReporting").as_deref(), Some("RFC3720"));
        let step = op_login(&[("TaskReporting", "FastAbort")]);
        assert_eq!(get(&step, "TaskReporting").as_deref(), Some("Reject"));
    }

    #[test]
    fn irrelevant_keys_in_discovery() {
        let auth = fixed(open());
        let mut m = LoginMachine::with_seed(LoginConfig::default(), auth.clone(), 1);
        let step = m.step(
            &req(1, true, 3),
            &txt(&[
                ("InitiatorName", INAME),
                ("SessionType", "Discovery"),
                ("TargetName", "ignored"),
                ("MaxBurstLength", "262144"),
                ("ImmediateData", "Yes"),
                ("MaxConnections", "1"),
                ("HeaderDigest", "None"),
                ("ErrorRecoveryLevel", "0"),
                ("MaxRecvDataSegmentLength", "32768"),
            ]),
        );
        assert_eq!(status_of(&step), status::SUCCESS);
        assert_eq!(get(&step, "MaxBurstLength").as_deref(), Some("Irrelevant"));
        assert_eq!(get(&step, "ImmediateData").as_deref(), Some("Irrelevant"));
        assert_eq!(get(&step, "MaxConnections").as_deref(), Some("Irrelevant"));
        assert_eq!(get(&step, "HeaderDigest").as_deref(), Some("None"));
        assert_eq!(get(&step, "ErrorRecoveryLevel").as_deref(), Some("0"));
        assert_eq!(get(&step, "TargetPortalGroupTag"), None);
        let p = step.complete.unwrap();
        assert_eq!(p.session_type, SessionType::Discovery);
        assert_eq!(p.target_name, "");
        assert_eq!(p.max_burst_length, DEFAULT_MAX_BURST_LENGTH);
        assert_eq!(p.initiator_max_recv_data_segment_length, 32768);
        assert_eq!(
            auth.asked.lock().unwrap().clone(),
            vec![(INAME.to_string(), None)]
        );
    }

    #[test]
    fn out_of_range_values_rejected() {
        let step = op_login(&[
            ("MaxBurstLength", "100"),
            ("FirstBurstLength", "16777216"),
            ("ErrorRecoveryLevel", "3"),
            ("MaxRecvDataSegmentLength", "511"),
            ("DefaultTime2Wait", "3601"),
            ("MaxConnections", "0"),
            ("MaxOutstandingR2T", "99999999999999999999999"),
            ("InitialR2T", "maybe"),
            ("DataDigest", "MD5"),
            ("iSCSIProtocolLevel", "32"),
        ]);
        assert_eq!(status_of(&step), status::SUCCESS);
        for key in [
            "MaxBurstLength",
            "FirstBurstLength",
            "ErrorRecoveryLevel",
            "DefaultTime2Wait",
            "MaxConnections",
            "MaxOutstandingR2T",
            "InitialR2T",
            "DataDigest",
            "iSCSIProtocolLevel",
        ] {
            assert_eq!(get(&step, key).as_deref(), Some("Reject"), "{key}");
        }
        let all = pairs(&step);
        assert!(all.contains(&("MaxRecvDataSegmentLength".into(), "Reject".into())));
        // Rejected keys keep their defaults.
        let p = step.complete.unwrap();
        assert_eq!(p.max_burst_length, DEFAULT_MAX_BURST_LENGTH);
        assert_eq!(p.first_burst_length, DEFAULT_FIRST_BURST_LENGTH);
        assert_eq!(p.initiator_max_recv_data_segment_length, 8192);
        assert_eq!(p.default_time2wait, 2);
    }

    #[test]
    fn unknown_and_private_keys_not_understood() {
        let step = op_login(&[
            ("X-com.example.Foo", "1"),
            ("X#org.example.Bar", "2"),
            ("FancyNewKey", "Yes"),
            ("SendTargets", "All"),
            ("TargetAddress", "1.2.3.4"),
            ("OFMarkInt", "2048"),
            ("iSCSIProtocolLevel", "2"),
        ]);
        assert_eq!(status_of(&step), status::SUCCESS);
        assert_eq!(
            get(&step, "X-com.example.Foo").as_deref(),
            Some("NotUnderstood")
        );
        assert_eq!(
            get(&step, "X#org.example.Bar").as_deref(),
            Some("NotUnderstood")
        );
        assert_eq!(get(&step, "FancyNewKey").as_deref(), Some("NotUnderstood"));
        assert_eq!(get(&step, "SendTargets").as_deref(), Some("Irrelevant"));
        assert_eq!(get(&step, "TargetAddress").as_deref(), Some("Reject"));
        assert_eq!(get(&step, "OFMarkInt").as_deref(), Some("Irrelevant"));
        assert_eq!(get(&step, "iSCSIProtocolLevel").as_deref(), Some("1"));
        assert!(step.complete.is_some());
    }

    #[test]
    fn duplicate_key_is_initiator_error() {
        let step = op_login(&[("MaxBurstLength", "8192"), ("MaxBurstLength", "8192")]);
        assert_fail(&step, status::INITIATOR_ERROR);

        // Renegotiating across PDUs is also an error.
        let mut m = machine(open());
        let mut kv = names();
        kv.push(("MaxBurstLength", "8192"));
        let s1 = m.step(&req(1, false, 0), &txt(&kv));
        assert_eq!(status_of(&s1), status::SUCCESS);
        assert!(!s1.response.transit);
        let s2 = m.step(&req(1, true, 3), &txt(&[("MaxBurstLength", "4096")]));
        assert_fail(&s2, status::INITIATOR_ERROR);

        // Unknown keys may come again in a later PDU.
        let mut m = machine(open());
        let mut kv = names();
        kv.push(("X-vendor.opt", "1"));
        m.step(&req(0, true, 1), &txt(&kv));
        let s = m.step(&req(1, true, 3), &txt(&[("X-vendor.opt", "1")]));
        assert_eq!(get(&s, "X-vendor.opt").as_deref(), Some("NotUnderstood"));
        assert!(s.complete.is_some());
    }

    #[test]
    fn identity_keys_may_be_repeated_unchanged() {
        let mut m = machine(open());
        let mut kv = names();
        kv.push(("AuthMethod", "None"));
        let s1 = m.step(&req(0, true, 1), &txt(&kv));
        assert_eq!(get(&s1, "AuthMethod").as_deref(), Some("None"));
        assert!(s1.response.transit);
        assert_eq!((s1.response.csg, s1.response.nsg), (0, 1));
        // MaxRecvDataSegmentLength is declared in the operational stage.
        assert_eq!(get(&s1, "MaxRecvDataSegmentLength"), None);
        let s2 = m.step(&req(1, true, 3), &txt(&names()));
        assert_eq!(status_of(&s2), status::SUCCESS);
        assert!(s2.complete.is_some());
        assert_eq!(get(&s2, "TargetPortalGroupTag"), None, "TPGT only once");
        assert!(get(&s2, "MaxRecvDataSegmentLength").is_some());

        // ... but changing one is an error.
        let mut m = machine(open());
        m.step(&req(0, true, 1), &txt(&names()));
        let s = m.step(
            &req(1, true, 3),
            &txt(&[("TargetName", "iqn.2000-01.com.example:other")]),
        );
        assert_fail(&s, status::INITIATOR_ERROR);
    }

    // ---- stage transitions and header checks -------------------------

    #[test]
    fn stage_transitions() {
        // Security -> FFP directly.
        let mut m = machine(open());
        let s = m.step(&req(0, true, 3), &txt(&names()));
        assert_eq!((s.response.csg, s.response.nsg), (0, 3));
        assert!(s.response.transit);
        assert!(s.complete.is_some());
        assert!(get(&s, "MaxRecvDataSegmentLength").is_some());
        // Nothing is accepted after completion.
        let s = m.step(&req(1, true, 3), &[]);
        assert_fail(&s, status::INITIATOR_ERROR);

        // Staying in a stage (T=0) then moving on.
        let mut m = machine(open());
        let s = m.step(&req(0, false, 0), &txt(&names()));
        assert!(!s.response.transit && s.complete.is_none() && !s.close);
        let s = m.step(&req(0, true, 1), &[]);
        assert!(s.response.transit);
        assert_eq!(s.response.nsg, 1);
        // After agreeing to move to stage 1, CSG 0 is invalid.
        let s = m.step(&req(0, true, 1), &[]);
        assert_fail(&s, status::INITIATOR_ERROR);
    }

    #[test]
    fn malformed_headers_are_initiator_errors() {
        let cases = [
            req(2, false, 0), // CSG 2 is reserved
            req(3, true, 3),  // CSG 3 is invalid
            req(1, true, 1),  // NSG == CSG
            req(1, true, 0),  // NSG < CSG
            req(0, true, 2),  // NSG 2 reserved
            LoginRequestFields {
                transit: true,
                cont: true,
                csg: 0,
                nsg: 1,
                ..Default::default()
            },
        ];
        for r in cases {
            let s = machine(open()).step(&r, &txt(&names()));
            assert_fail(&s, status::INITIATOR_ERROR);
            assert_eq!(s.response.csg, r.csg & 3);
        }
        // Malformed text.
        let s = machine(open()).step(&req(1, true, 3), b"InitiatorName\0");
        assert_fail(&s, status::INITIATOR_ERROR);
        let s = machine(open()).step(&req(1, true, 3), b"InitiatorName=\xff\0");
        assert_fail(&s, status::INITIATOR_ERROR);
    }

    #[test]
    fn version_and_missing_parameters() {
        let r = LoginRequestFields {
            version_max: 2,
            version_min: 1,
            ..req(1, true, 3)
        };
        let s = machine(open()).step(&r, &txt(&names()));
        assert_fail(&s, status::UNSUPPORTED_VERSION);
        assert_eq!((s.response.version_max, s.response.version_active), (0, 0));
        // version_max above ours is fine.
        let r = LoginRequestFields {
            version_max: 5,
            ..req(1, true, 3)
        };
        assert!(machine(open()).step(&r, &txt(&names())).complete.is_some());

        let s = machine(open()).step(&req(1, true, 3), &txt(&[("TargetName", TNAME)]));
        assert_fail(&s, status::MISSING_PARAMETER);
        let s = machine(open()).step(&req(1, true, 3), &txt(&[("InitiatorName", INAME)]));
        assert_fail(&s, status::MISSING_PARAMETER);
        let long = format!("iqn.2000-01.com.example:{}", "x".repeat(200));
        let s = machine(open()).step(
            &req(1, true, 3),
            &txt(&[("InitiatorName", &long), ("TargetName", TNAME)]),
        );
        assert_fail(&s, status::INITIATOR_ERROR);
        let s = machine(open()).step(
            &req(1, true, 3),
            &txt(&[("InitiatorName", INAME), ("SessionType", "Weird")]),
        );
        assert_fail(&s, status::SESSION_TYPE_NOT_SUPPORTED);
    }

    #[test]
    fn security_keys_in_operational_stage_rejected() {
        let s = op_login(&[("AuthMethod", "None")]);
        assert_fail(&s, status::INITIATOR_ERROR);
    }

    // ---- authority decisions -----------------------------------------

    #[test]
    fn redirect_decisions() {
        for (permanent, st) in [
            (false, status::TARGET_MOVED_TEMPORARILY),
            (true, status::TARGET_MOVED_PERMANENTLY),
        ] {
            let mut m = machine(LoginDecision::Redirect {
                address: "192.0.2.7:3260,2".into(),
                permanent,
            });
            let s = m.step(&req(0, true, 1), &txt(&names()));
            assert_fail(&s, st);
            // The portal group tag is omitted in a redirect.
            assert_eq!(
                pairs(&s),
                vec![("TargetAddress".to_string(), "192.0.2.7:3260".to_string())]
            );
        }
    }

    #[test]
    fn redirect_address_strips_tag() {
        assert_eq!(redirect_address("10.0.0.1:3260,1"), "10.0.0.1:3260");
        assert_eq!(redirect_address("10.0.0.1"), "10.0.0.1");
        assert_eq!(redirect_address("[fe80::1]:3260,12"), "[fe80::1]:3260");
        assert_eq!(redirect_address("[fe80::1]"), "[fe80::1]");
        assert_eq!(redirect_address("host.example,x"), "host.example,x");
    }

    #[test]
    fn not_found_and_forbidden() {
        let auth = fixed(LoginDecision::NotFound);
        let mut m = LoginMachine::with_seed(LoginConfig::default(), auth.clone(), 0);
        let s = m.step(&req(0, true, 1), &txt(&names()));
        assert_fail(&s, status::NOT_FOUND);
        assert_eq!(
            auth.asked.lock().unwrap().clone(),
            vec![(INAME.to_string(), Some(TNAME.to_string()))]
        );
        let s = machine(LoginDecision::Forbidden).step(&req(0, true, 1), &txt(&names()));
        assert_fail(&s, status::AUTHORIZATION_FAILURE);
    }

    // ---- CHAP ---------------------------------------------------------

    /// Drive AuthMethod + CHAP_A; returns (machine, id, challenge).
    fn chap_challenge(creds: ChapCredentials) -> (LoginMachine, u8, Vec<u8>) {
        let mut m = machine(LoginDecision::Accept { chap: Some(creds) });
        let mut kv = names();
        kv.push(("AuthMethod", "CHAP,None"));
        // libiscsi asks to transit on the first PDU; we must hold it back.
        let s1 = m.step(&req(0, true, 1), &txt(&kv));
        assert_eq!(status_of(&s1), status::SUCCESS);
        assert_eq!(get(&s1, "AuthMethod").as_deref(), Some("CHAP"));
        assert!(!s1.response.transit);
        assert_eq!(get(&s1, "TargetPortalGroupTag").as_deref(), Some("1"));
        let s2 = m.step(&req(0, false, 1), &txt(&[("CHAP_A", "7,5")]));
        assert_eq!(status_of(&s2), status::SUCCESS);
        assert!(!s2.response.transit);
        assert_eq!(get(&s2, "CHAP_A").as_deref(), Some("5"));
        let id: u8 = get(&s2, "CHAP_I").unwrap().parse().unwrap();
        let c = get(&s2, "CHAP_C").unwrap();
        assert!(c.starts_with("0x"));
        let challenge = unhex(&c);
        assert!(challenge.len() >= 16);
        (m, id, challenge)
    }

    #[test]
    fn chap_one_way_success_then_operational() {
        let cr = creds(false);
        let (mut m, id, challenge) = chap_challenge(cr.clone());
        let resp = format!("0x{}", hex::encode(md5_of(id, &cr.secret, &challenge)));
        let s3 = m.step(
            &req(0, true, 1),
            &txt(&[("CHAP_N", "alice"), ("CHAP_R", &resp)]),
        );
        assert_eq!(status_of(&s3), status::SUCCESS);
        assert!(s3.response.transit);
        assert_eq!((s3.response.csg, s3.response.nsg), (0, 1));
        assert_eq!(get(&s3, "CHAP_N"), None);
        // libiscsi re-sends the identity keys in the operational stage.
        let mut kv = names();
        kv.push(("HeaderDigest", "None"));
        let s4 = m.step(&req(1, true, 3), &txt(&kv));
        assert_eq!(status_of(&s4), status::SUCCESS);
        assert!(s4.complete.is_some());
    }

    #[test]
    fn chap_base64_response_and_verify_in_t0_pdu() {
        let cr = creds(false);
        let (mut m, id, challenge) = chap_challenge(cr.clone());
        let digest = md5_of(id, &cr.secret, &challenge);
        // Independent base64 of the 16-byte digest.
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut b64 = String::new();
        for chunk in digest.chunks(3) {
            let mut n = [0u8; 3];
            n[..chunk.len()].copy_from_slice(chunk);
            let v = (u32::from(n[0]) << 16) | (u32::from(n[1]) << 8) | u32::from(n[2]);
            for i in 0..=chunk.len() {
                b64.push(alphabet[((v >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        while b64.len() & 3 != 0 {
            b64.push('=');
        }
        let s3 = m.step(
            &req(0, false, 1),
            &txt(&[("CHAP_N", "alice"), ("CHAP_R", &format!("0b{b64}"))]),
        );
        assert_eq!(status_of(&s3), status::SUCCESS);
        assert!(!s3.response.transit);
        let s4 = m.step(&req(0, true, 3), &[]);
        assert!(s4.complete.is_some());
    }

    #[test]
    fn chap_bad_secret_bad_name_missing_response() {
        let cr = creds(false);
        let (mut m, id, challenge) = chap_challenge(cr.clone());
        let bad = format!("0x{}", hex::encode(md5_of(id, b"wrong", &challenge)));
        let s = m.step(
            &req(0, true, 1),
            &txt(&[("CHAP_N", "alice"), ("CHAP_R", &bad)]),
        );
        assert_fail(&s, status::AUTHENTICATION_FAILURE);

        let (mut m, id, challenge) = chap_challenge(cr.clone());
        let good = format!("0x{}", hex::encode(md5_of(id, &cr.secret, &challenge)));
        let s = m.step(
            &req(0, true, 1),
            &txt(&[("CHAP_N", "mallory"), ("CHAP_R", &good)]),
        );
        assert_fail(&s, status::AUTHENTICATION_FAILURE);

        let (mut m, _, _) = chap_challenge(cr.clone());
        let s = m.step(&req(0, true, 1), &txt(&[("CHAP_N", "alice")]));
        assert_fail(&s, status::AUTHENTICATION_FAILURE);

        let (mut m, _, _) = chap_challenge(cr.clone());
        let s = m.step(
            &req(0, true, 1),
            &txt(&[("CHAP_N", "alice"), ("CHAP_R", "zz")]),
        );
        assert_fail(&s, status::AUTHENTICATION_FAILURE);

        // Trying to leave the stage right after the challenge.
        let (mut m, _, _) = chap_challenge(cr);
        let s = m.step(&req(0, true, 1), &[]);
        assert_fail(&s, status::AUTHENTICATION_FAILURE);
    }

    #[test]
    fn chap_required_but_skipped_or_not_offered() {
        let chap = || LoginDecision::Accept {
            chap: Some(creds(false)),
        };
        // Only None offered.
        let mut kv = names();
        kv.push(("AuthMethod", "None"));
        let s = machine(chap()).step(&req(0, true, 1), &txt(&kv));
        assert_fail(&s, status::AUTHENTICATION_FAILURE);
        // No AuthMethod at all, straight to the operational stage.
        let s = machine(chap()).step(&req(0, true, 1), &txt(&names()));
        assert_fail(&s, status::AUTHENTICATION_FAILURE);
        // Security stage skipped entirely.
        let s = machine(chap()).step(&req(1, true, 3), &txt(&names()));
        assert_fail(&s, status::AUTHENTICATION_FAILURE);
        // Method agreed, then skipping CHAP_A.
        let mut m = machine(chap());
        let mut kv = names();
        kv.push(("AuthMethod", "CHAP"));
        m.step(&req(0, false, 0), &txt(&kv));
        let s = m.step(&req(0, true, 3), &[]);
        assert_fail(&s, status::AUTHENTICATION_FAILURE);
        // Only unsupported algorithms.
        let mut m = machine(chap());
        m.step(&req(0, false, 0), &txt(&kv));
        let s = m.step(&req(0, false, 0), &txt(&[("CHAP_A", "6,7")]));
        assert_fail(&s, status::AUTHENTICATION_FAILURE);
        // CHAP keys without CHAP being agreed.
        let mut kv2 = names();
        kv2.push(("CHAP_A", "5"));
        let s = machine(chap()).step(&req(0, false, 0), &txt(&kv2));
        assert_fail(&s, status::AUTHENTICATION_FAILURE);
    }

    #[test]
    fn no_creds_required_accepts_none_and_rejects_chap_only() {
        let mut kv = names();
        kv.push(("AuthMethod", "CHAP,None"));
        let s = machine(open()).step(&req(0, true, 1), &txt(&kv));
        assert_eq!(get(&s, "AuthMethod").as_deref(), Some("None"));
        assert!(s.response.transit);

        let mut kv = names();
        kv.push(("AuthMethod", "CHAP"));
        let s = machine(open()).step(&req(0, false, 0), &txt(&kv));
        assert_eq!(get(&s, "AuthMethod").as_deref(), Some("Reject"));
        assert!(!s.close);
    }

    #[test]
    fn mutual_chap_success() {
        let cr = creds(true);
        let (mut m, id, challenge) = chap_challenge(cr.clone());
        let resp = format!("0x{}", hex::encode(md5_of(id, &cr.secret, &challenge)));
        let their_c = [0x11u8; 32];
        let s = m.step(
            &req(0, true, 1),
            &txt(&[
                ("CHAP_N", "alice"),
                ("CHAP_R", &resp),
                ("CHAP_I", "77"),
                ("CHAP_C", &format!("0x{}", hex::encode(their_c))),
            ]),
        );
        assert_eq!(status_of(&s), status::SUCCESS);
        assert!(s.response.transit);
        assert_eq!(get(&s, "CHAP_N").as_deref(), Some("target-bob"));
        let r = unhex(&get(&s, "CHAP_R").unwrap());
        assert_eq!(r, md5_of(77, b"bob-secret-1234", &their_c));
    }

    #[test]
    fn mutual_chap_refused_and_reflection_rejected() {
        // Not configured.
        let cr = creds(false);
        let (mut m, id, challenge) = chap_challenge(cr.clone());
        let resp = format!("0x{}", hex::encode(md5_of(id, &cr.secret, &challenge)));
        let s = m.step(
            &req(0, true, 1),
            &txt(&[
                ("CHAP_N", "alice"),
                ("CHAP_R", &resp),
                ("CHAP_I", "1"),
                ("CHAP_C", "0x0102030405060708090a0b0c0d0e0f10"),
            ]),
        );
        assert_fail(&s, status::AUTHENTICATION_FAILURE);

        // Reflected challenge.
        let cr = creds(true);
        let (mut m, id, challenge) = chap_challenge(cr.clone());
        let resp = format!("0x{}", hex::encode(md5_of(id, &cr.secret, &challenge)));
        let s = m.step(
            &req(0, true, 1),
            &txt(&[
                ("CHAP_N", "alice"),
                ("CHAP_R", &resp),
                ("CHAP_I", &id.to_string()),
                ("CHAP_C", &format!("0x{}", hex::encode(&challenge))),
            ]),
        );
        assert_fail(&s, status::AUTHENTICATION_FAILURE);
        assert_eq!(get(&s, "CHAP_R"), None);

        // CHAP_I without CHAP_C.
        let (mut m, id, challenge) = chap_challenge(cr.clone());
        let resp = format!("0x{}", hex::encode(md5_of(id, &cr.secret, &challenge)));
        let s = m.step(
            &req(0, true, 1),
            &txt(&[("CHAP_N", "alice"), ("CHAP_R", &resp), ("CHAP_I", "3")]),
        );
        assert_fail(&s, status::AUTHENTICATION_FAILURE);
    }

    #[test]
    fn seeded_challenges_are_deterministic() {
        let (_, id1, c1) = chap_challenge(creds(false));
        let (_, id2, c2) = chap_challenge(creds(false));
        assert_eq!((id1, &c1), (id2, &c2));
        let mut other = LoginMachine::with_seed(
            LoginConfig::default(),
            fixed(LoginDecision::Accept {
                chap: Some(creds(false)),
            }),
            43,
        );
        let mut kv = names();
        kv.push(("AuthMethod", "CHAP"));
        other.step(&req(0, false, 0), &txt(&kv));
        let s = other.step(&req(0, false, 0), &txt(&[("CHAP_A", "5")]));
        assert_ne!(unhex(&get(&s, "CHAP_C").unwrap()), c1);
    }

    // ---- C bit ----------------------------------------------------------

    #[test]
    fn continuation_accumulates_text() {
        let mut m = machine(open());
        let mut kv = names();
        kv.push(("MaxBurstLength", "65536"));
        let all = txt(&kv);
        // Split in the middle of keys/values.
        let (a, rest) = all.split_at(10);
        let (b, c) = rest.split_at(30);
        let cont = LoginRequestFields {
            cont: true,
            ..req(1, false, 0)
        };
        for part in [a, b] {
            let s = m.step(&cont, part);
            assert_eq!(status_of(&s), status::SUCCESS);
            assert!(s.data.is_empty() && !s.response.transit && !s.close);
            assert!(s.complete.is_none());
        }
        let s = m.step(&req(1, true, 3), c);
        assert_eq!(status_of(&s), status::SUCCESS);
        assert_eq!(get(&s, "MaxBurstLength").as_deref(), Some("65536"));
        assert_eq!(get(&s, "TargetPortalGroupTag").as_deref(), Some("1"));
        assert_eq!(s.complete.unwrap().max_burst_length, 65536);
    }

    #[test]
    fn continuation_errors() {
        // CSG changes inside a continued sequence.
        let mut m = machine(open());
        let cont = LoginRequestFields {
            cont: true,
            ..req(0, false, 0)
        };
        m.step(&cont, b"InitiatorName=x");
        let s = m.step(&req(1, true, 3), b"\0");
        assert_fail(&s, status::INITIATOR_ERROR);
        // Too much text.
        let mut m = machine(open());
        let chunk = vec![b'a'; 8192];
        let mut last = None;
        for _ in 0..20 {
            let s = m.step(&cont, &chunk);
            if s.close {
                last = Some(s);
                break;
            }
        }
        assert_fail(&last.unwrap(), status::INITIATOR_ERROR);
    }

    // ---- Full Feature Phase text ------------------------------------------

    #[test]
    fn ffp_text_negotiation() {
        let mut p = op_login(&[]).complete.unwrap();
        let kv = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let out = ffp_text(
            &kv(&[
                ("MaxRecvDataSegmentLength", "16384"),
                ("InitiatorAlias", "renamed"),
                ("X-vendor.thing", "1"),
                ("Bogus", "1"),
                ("MaxBurstLength", "4096"),
                ("HeaderDigest", "CRC32C"),
                ("SessionType", "Normal"),
            ]),
            &mut p,
        );
        assert_eq!(
            out,
            kv(&[
                ("X-vendor.thing", "NotUnderstood"),
                ("Bogus", "NotUnderstood"),
                ("MaxBurstLength", "Reject"),
                ("HeaderDigest", "Reject"),
                ("SessionType", "Reject"),
            ])
        );
        assert_eq!(p.initiator_max_recv_data_segment_length, 16384);
        assert_eq!(p.initiator_alias.as_deref(), Some("renamed"));
        assert_eq!(p.max_burst_length, DEFAULT_MAX_BURST_LENGTH);

        let out = ffp_text(
            &kv(&[
                ("MaxRecvDataSegmentLength", "1"),
                ("MaxRecvDataSegmentLength", "4096"),
            ]),
            &mut p,
        );
        assert_eq!(
            out,
            kv(&[
                ("MaxRecvDataSegmentLength", "Reject"),
                ("MaxRecvDataSegmentLength", "Reject"),
            ])
        );
        assert_eq!(p.initiator_max_recv_data_segment_length, 16384);
    }

    // ---- fuzz entry -------------------------------------------------------

    #[test]
    fn fuzz_login_survives_random_and_crafted_input() {
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..3000 {
            let len = rng.gen_range(0..400);
            let mut data = vec![0u8; len];
            rng.fill(&mut data[..]);
            fuzz_login(&data);
        }
        // A crafted sequence reaching the CHAP challenge.
        let mut data = Vec::new();
        let mut pdu = |flags: u8, text: &[u8]| {
            data.extend_from_slice(&[flags, 0, text.len() as u8]);
            data.extend_from_slice(text);
        };
        pdu(
            0x81,
            b"InitiatorName=iqn.a\0TargetName=iqn.t\0AuthMethod=CHAP\0",
        );
        pdu(0x01, b"CHAP_A=5\0");
        pdu(0x81, b"CHAP_N=user\0CHAP_R=0x00\0");
        fuzz_login(&data);
    }

    #[test]
    fn fuzz_login_structured_sequences() {
        // Sequences assembled from plausible key=value tokens reach deeper
        // states than raw random bytes.
        let tokens: &[&[u8]] = &[
            b"InitiatorName=iqn.a\0",
            b"InitiatorName=iqn.abcde\0",
            b"TargetName=iqn.t\0",
            b"SessionType=Discovery\0",
            b"SessionType=Normal\0",
            b"AuthMethod=CHAP,None\0",
            b"AuthMethod=None\0",
            b"CHAP_A=5\0",
            b"CHAP_A=7\0",
            b"CHAP_N=user\0",
            b"CHAP_R=0x00112233445566778899aabbccddeeff\0",
            b"CHAP_R=0bAAAA\0",
            b"CHAP_I=3\0",
            b"CHAP_C=0x0102\0",
            b"HeaderDigest=CRC32C,None\0",
            b"MaxBurstLength=512\0",
            b"FirstBurstLength=999999999\0",
            b"X-foo=bar\0",
            b"Broken",
            b"=\0",
            b"\0",
        ];
        let mut rng = StdRng::seed_from_u64(11);
        for _ in 0..3000 {
            let mut data = Vec::new();
            for _ in 0..rng.gen_range(1..8) {
                let mut text = Vec::new();
                for _ in 0..rng.gen_range(0..5) {
                    text.extend_from_slice(tokens[rng.gen_range(0..tokens.len())]);
                }
                text.truncate(255);
                let flags: u8 = rng.gen::<u8>() & 0xcf;
                data.extend_from_slice(&[flags, 0, text.len() as u8]);
                data.extend_from_slice(&text);
            }
            fuzz_login(&data);
        }
    }

    #[test]
    fn open_iscsi_style_chap_with_t0_first() {
        let cr = creds(false);
        let mut m = machine(LoginDecision::Accept {
            chap: Some(cr.clone()),
        });
        let mut kv = names();
        kv.push(("AuthMethod", "CHAP"));
        let s1 = m.step(&req(0, false, 1), &txt(&kv));
        assert_eq!(get(&s1, "AuthMethod").as_deref(), Some("CHAP"));
        // CHAP_A sent with T=1: we must still stay in the security stage.
        let s2 = m.step(&req(0, true, 1), &txt(&[("CHAP_A", "7,6,5")]));
        assert!(!s2.response.transit && !s2.close);
        let id: u8 = get(&s2, "CHAP_I").unwrap().parse().unwrap();
        let challenge = unhex(&get(&s2, "CHAP_C").unwrap());
        let resp = format!(
            "0x{}",
            hex::encode_upper(md5_of(id, &cr.secret, &challenge))
        );
        let s3 = m.step(
            &req(0, true, 1),
            &txt(&[("CHAP_N", "alice"), ("CHAP_R", &resp)]),
        );
        assert!(s3.response.transit && !s3.close);
        let s4 = m.step(
            &req(1, true, 3),
            &txt(&[
                ("HeaderDigest", "None"),
                ("MaxRecvDataSegmentLength", "262144"),
            ]),
        );
        let p = s4.complete.unwrap();
        assert_eq!(p.initiator_max_recv_data_segment_length, 262144);
    }
}
