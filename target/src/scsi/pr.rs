//! SCSI reservations: SPC-4 persistent reservations (section 5.13) and
//! SPC-2 RESERVE/RELEASE.
//!
//! One [`Reservations`] exists per logical unit; the engine keeps it behind a
//! mutex, asks [`Reservations::conflicts`] before running any command, and
//! hands PERSISTENT RESERVE IN/OUT and RESERVE/RELEASE to the methods here.
//!
//! What is supported:
//! - PERSISTENT RESERVE IN: READ KEYS, READ RESERVATION, REPORT CAPABILITIES,
//!   READ FULL STATUS (iSCSI TransportIDs, format 01b with the initiator
//!   port name).
//! - PERSISTENT RESERVE OUT: REGISTER, REGISTER AND IGNORE EXISTING KEY,
//!   RESERVE, RELEASE, CLEAR, PREEMPT, PREEMPT AND ABORT (treated as PREEMPT:
//!   aborting the preempted nexuses' tasks is the transport's business),
//!   REGISTER AND MOVE (unspecified-ISID TransportIDs excepted, see
//!   [`Reservations::persistent_reserve_out`]).
//! - All six reservation types at LU scope.
//!
//! Not supported (and reported so in REPORT CAPABILITIES): persistence
//! through power loss (APTPL=1 is rejected with INVALID FIELD IN PARAMETER
//! LIST), SPEC_I_PT=1 and ALL_TG_PT=1 (likewise rejected), and the SPC-4
//! 5.13.3 "compatible reservation handling" exceptions (CRH=0: RESERVE and
//! RELEASE conflict while any persistent registration exists).
//!
//! Registrations are kept per I_T nexus ([`Nexus`] equality: initiator port
//! plus target port). They survive the loss of the nexus and LU/target
//! resets; an SPC-2 reservation does not.

// `u64::is_multiple_of` needs Rust 1.87; the workspace's rust-version is 1.80.

use std::sync::Arc;

use super::{Nexus, Sense};

/// PERSISTENT RESERVE IN / OUT and SPC-2 opcodes.
mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const INQUIRY: u8 = 0x12;
    pub const RESERVE_6: u8 = 0x16;
    pub const RELEASE_6: u8 = 0x17;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const RECEIVE_DIAGNOSTIC: u8 = 0x1c;
    pub const READ_6: u8 = 0x08;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const VERIFY_10: u8 = 0x2f;
    pub const PRE_FETCH_10: u8 = 0x34;
    pub const READ_DEFECT_DATA_10: u8 = 0x37;
    pub const READ_BUFFER: u8 = 0x3c;
    pub const READ_LONG_10: u8 = 0x3e;
    pub const LOG_SENSE: u8 = 0x4d;
    pub const RESERVE_10: u8 = 0x56;
    pub const RELEASE_10: u8 = 0x57;
    pub const MODE_SENSE_10: u8 = 0x5a;
    pub const PERSISTENT_RESERVE_IN: u8 = 0x5e;
    pub const PERSISTENT_RESERVE_OUT: u8 = 0x5f;
    pub const VARIABLE_LENGTH: u8 = 0x7f;
    pub const ACCESS_CONTROL_IN: u8 = 0x86;
    pub const ACCESS_CONTROL_OUT: u8 = 0x87;
    pub const READ_16: u8 = 0x88;
    pub const READ_ATTRIBUTE: u8 = 0x8c;
    pub const VERIFY_16: u8 = 0x8f;
    pub const PRE_FETCH_16: u8 = 0x90;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    pub const REPORT_LUNS: u8 = 0xa0;
    pub const SECURITY_PROTOCOL_IN: u8 = 0xa2;
    pub const MAINTENANCE_IN: u8 = 0xa3;
    pub const READ_12: u8 = 0xa8;
    pub const SERVICE_ACTION_IN_12: u8 = 0xab;
    pub const VERIFY_12: u8 = 0xaf;
    pub const READ_DEFECT_DATA_12: u8 = 0xb7;
}

/// PERSISTENT RESERVE OUT service actions.
mod sa {
    pub const REGISTER: u8 = 0x00;
    pub const RESERVE: u8 = 0x01;
    pub const RELEASE: u8 = 0x02;
    pub const CLEAR: u8 = 0x03;
    pub const PREEMPT: u8 = 0x04;
    pub const PREEMPT_AND_ABORT: u8 = 0x05;
    pub const REGISTER_AND_IGNORE: u8 = 0x06;
    pub const REGISTER_AND_MOVE: u8 = 0x07;
}

/// Persistent reservation types (SPC-4 table 212).
pub mod pr_type {
    pub const WRITE_EXCLUSIVE: u8 = 1;
    pub const EXCLUSIVE_ACCESS: u8 = 3;
    pub const WRITE_EXCLUSIVE_REGISTRANTS_ONLY: u8 = 5;
    pub const EXCLUSIVE_ACCESS_REGISTRANTS_ONLY: u8 = 6;
    pub const WRITE_EXCLUSIVE_ALL_REGISTRANTS: u8 = 7;
    pub const EXCLUSIVE_ACCESS_ALL_REGISTRANTS: u8 = 8;
}

const ILLEGAL_REQUEST: u8 = 0x05;
const UNIT_ATTENTION: u8 = 0x06;
const INVALID_FIELD_IN_CDB: Sense = Sense::new(ILLEGAL_REQUEST, 0x24, 0x00);
const INVALID_FIELD_IN_PARAM: Sense = Sense::new(ILLEGAL_REQUEST, 0x26, 0x00);
const PARAM_LIST_LENGTH_ERROR: Sense = Sense::new(ILLEGAL_REQUEST, 0x1a, 0x00);
const INVALID_RELEASE: Sense = Sense::new(ILLEGAL_REQUEST, 0x26, 0x04);
/// RESERVATIONS PREEMPTED unit attention.
pub const UA_RESERVATIONS_PREEMPTED: Sense = Sense::new(UNIT_ATTENTION, 0x2a, 0x03);
/// RESERVATIONS RELEASED unit attention.
pub const UA_RESERVATIONS_RELEASED: Sense = Sense::new(UNIT_ATTENTION, 0x2a, 0x04);
/// REGISTRATIONS PREEMPTED unit attention.
pub const UA_REGISTRATIONS_PREEMPTED: Sense = Sense::new(UNIT_ATTENTION, 0x2a, 0x05);

/// Relative target port identifier reported in READ FULL STATUS.
const RELATIVE_TARGET_PORT: u16 = 1;
/// iSCSI protocol identifier in TransportIDs (SPC-4 table 362).
const PROTOCOL_ISCSI: u8 = 0x05;

fn valid_type(t: u8) -> bool {
    matches!(t, 1 | 3 | 5 | 6 | 7 | 8)
}
fn is_all_registrants(t: u8) -> bool {
    matches!(t, 7 | 8)
}
fn is_registrants_type(t: u8) -> bool {
    matches!(t, 5..=8)
}
fn is_write_exclusive(t: u8) -> bool {
    matches!(t, 1 | 5 | 7)
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        v.copy_from_slice(s);
    }
    u64::from_be_bytes(v)
}
fn be_u32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        v.copy_from_slice(s);
    }
    u32::from_be_bytes(v)
}
fn be_u16(b: &[u8], at: usize) -> u16 {
    let mut v = [0u8; 2];
    if let Some(s) = b.get(at..at + 2) {
        v.copy_from_slice(s);
    }
    u16::from_be_bytes(v)
}
fn byte(b: &[u8], at: usize) -> u8 {
    b.get(at).copied().unwrap_or(0)
}

#[derive(Debug, Clone)]
struct Registration {
    nexus: Arc<Nexus>,
    key: u64,
}

#[derive(Debug, Clone)]
struct Persistent {
    /// The holder for all types but the all-registrants ones, where every
    /// registrant holds it (this is then the nexus that created it).
    holder: Arc<Nexus>,
    ptype: u8,
}

/// Unit attentions the engine must queue after a PERSISTENT RESERVE OUT.
#[derive(Default)]
pub struct PrEffects {
    pub unit_attentions: Vec<(Arc<Nexus>, Sense)>,
}

/// Reservation state of one logical unit.
#[derive(Debug, Default)]
pub struct Reservations {
    /// In registration order (READ KEYS lists them so).
    regs: Vec<Registration>,
    res: Option<Persistent>,
    generation: u32,
    /// SPC-2 RESERVE holder.
    spc2: Option<Arc<Nexus>>,
}

/// How a non-holder's command fares against a persistent reservation.
enum Class {
    /// Allowed whatever the reservation (INQUIRY, REPORT LUNS, ...).
    Always,
    /// Allowed under Write Exclusive types, otherwise only for registrants
    /// of registrants-only / all-registrants types (MODE SENSE, ...).
    ReadMeta,
    /// Reads medium data: like `ReadMeta`.
    Read,
    /// Anything else: allowed only for registrants of registrants-only /
    /// all-registrants types.
    Write,
    /// PERSISTENT RESERVE OUT: checked by the service action itself.
    PrOut,
    /// RESERVE/RELEASE: conflict while any registration exists (CRH=0).
    Spc2,
}

fn classify(cdb: &[u8]) -> Class {
    let sa5 = byte(cdb, 1) & 0x1f;
    match byte(cdb, 0) {
        op::INQUIRY
        | op::REPORT_LUNS
        | op::REQUEST_SENSE
        | op::TEST_UNIT_READY
        | op::PERSISTENT_RESERVE_IN
        | op::LOG_SENSE
        | op::ACCESS_CONTROL_IN
        | op::ACCESS_CONTROL_OUT
        | op::READ_CAPACITY_10 => Class::Always,
        // READ MEDIA SERIAL NUMBER
        op::SERVICE_ACTION_IN_12 if sa5 == 0x01 => Class::Always,
        op::SERVICE_ACTION_IN_16 => match sa5 {
            0x10 => Class::Always,      // READ CAPACITY(16)
            0x11..=0x13 => Class::Read, // READ LONG(16), GET LBA STATUS, REPORT REFERRALS
            _ => Class::Write,
        },
        op::MAINTENANCE_IN => match sa5 {
            // REPORT IDENTIFYING INFORMATION, REPORT TARGET PORT GROUPS,
            // REPORT ALIASES, REPORT PRIORITY, REPORT TIMESTAMP
            0x05 | 0x0a | 0x0b | 0x0e | 0x0f => Class::Always,
            // REPORT SUPPORTED OPERATION CODES / TMFs, MANAGEMENT PROTOCOL IN
            0x0c | 0x0d | 0x10 => Class::ReadMeta,
            _ => Class::Write,
        },
        op::MODE_SENSE_6
        | op::MODE_SENSE_10
        | op::READ_ATTRIBUTE
        | op::READ_BUFFER
        | op::RECEIVE_DIAGNOSTIC
        | op::SECURITY_PROTOCOL_IN => Class::ReadMeta,
        op::READ_6
        | op::READ_10
        | op::READ_12
        | op::READ_16
        | op::VERIFY_10
        | op::VERIFY_12
        | op::VERIFY_16
        | op::PRE_FETCH_10
        | op::PRE_FETCH_16
        | op::READ_DEFECT_DATA_10
        | op::READ_DEFECT_DATA_12
        | op::READ_LONG_10 => Class::Read,
        // READ(32) and VERIFY(32)
        op::VARIABLE_LENGTH if matches!(be_u16(cdb, 8), 0x0009 | 0x000a) => Class::Read,
        op::PERSISTENT_RESERVE_OUT => Class::PrOut,
        op::RESERVE_6 | op::RESERVE_10 | op::RELEASE_6 | op::RELEASE_10 => Class::Spc2,
        _ => Class::Write,
    }
}

impl Reservations {
    pub fn new() -> Self {
        Self::default()
    }

    fn reg_index(&self, nexus: &Nexus) -> Option<usize> {
        self.regs.iter().position(|r| *r.nexus == *nexus)
    }

    fn key_of(&self, nexus: &Nexus) -> Option<u64> {
        self.reg_index(nexus).map(|i| self.regs[i].key)
    }

    /// Whether `nexus` holds the persistent reservation (for all-registrants
    /// types: whether it is registered).
    fn is_holder(&self, nexus: &Nexus) -> bool {
        match &self.res {
            None => false,
            Some(r) if is_all_registrants(r.ptype) => self.reg_index(nexus).is_some(),
            Some(r) => *r.holder == *nexus,
        }
    }

    fn bump_generation(&mut self) {
        self.generation = self.generation.wrapping_add(1);
    }

    /// RESERVATION CONFLICT check for any command (SPC-4 table 45 "SPC
    /// commands that are allowed in the presence of various reservations",
    /// its SBC-3 counterpart, and SPC-2 RESERVE semantics).
    pub fn conflicts(&self, nexus: &Nexus, cdb: &[u8]) -> bool {
        let class = classify(cdb);
        // SPC-2 reservation held by another nexus: only a few commands pass.
        if let Some(holder) = &self.spc2 {
            if **holder != *nexus {
                let opcode = byte(cdb, 0);
                let allowed = matches!(
                    opcode,
                    op::INQUIRY
                        | op::REPORT_LUNS
                        | op::REQUEST_SENSE
                        | op::RELEASE_6
                        | op::RELEASE_10
                        | op::PERSISTENT_RESERVE_IN
                ) || (opcode == op::MAINTENANCE_IN && byte(cdb, 1) & 0x1f == 0x0a);
                if !allowed {
                    return true;
                }
            }
        }
        if let Class::Spc2 = class {
            // CRH=0: RESERVE/RELEASE conflict while anyone is registered.
            return !self.regs.is_empty();
        }
        let Some(res) = &self.res else {
            return false;
        };
        if self.is_holder(nexus) {
            return false;
        }
        let registered_for_type = is_registrants_type(res.ptype) && self.reg_index(nexus).is_some();
        match class {
            Class::Always | Class::PrOut | Class::Spc2 => false,
            Class::ReadMeta | Class::Read => {
                !(is_write_exclusive(res.ptype) || registered_for_type)
            }
            Class::Write => !registered_for_type,
        }
    }

    /// Whether a nexus the transport write-protects (a read-only export) is
    /// refused this reservation command; the engine answers DATA PROTECT /
    /// WRITE PROTECTED (27/00) for it, the sense the same nexus gets for a
    /// write (an initiator that knows the LU is write-protected for it, WP
    /// in MODE SENSE, reads the refusal as that, where ILLEGAL REQUEST
    /// would claim the command unsupported and RESERVATION CONFLICT a
    /// reservation that does not exist). Linux's LIO answers the same
    /// sense for a read-only LUN mapping (there for every command with a
    /// Data-Out buffer, so for every PERSISTENT RESERVE OUT with a
    /// parameter list).
    ///
    /// The rule: a reader may manage its own registration and give up what
    /// it holds alone, but may not take a reservation or touch anybody
    /// else's registrations or reservation, since that would restrict
    /// (or strip the protection of) the writers sharing the LU (SPC-4
    /// 5.13, 6.16):
    /// - RESERVE(6)/(10) (SPC-2) and PR OUT RESERVE: refused; a reader's
    ///   reservation would shut the writers out (an SPC-2 one until it
    ///   releases it or a reset).
    /// - PREEMPT, PREEMPT AND ABORT: refused; they remove other nexuses'
    ///   registrations (and abort their tasks) and hand the issuer a
    ///   reservation.
    /// - CLEAR: refused; it drops every registration and the reservation.
    /// - REGISTER AND MOVE: refused; it registers another nexus and makes
    ///   it the holder of a reservation on the reader's behalf.
    /// - RELEASE: allowed for a reservation the reader holds alone (it can
    ///   hold one only from before its ACL entry became read-only, or moved
    ///   to it by a writer), which only frees the writers; refused for an
    ///   all-registrants reservation it is registered under, where its
    ///   RELEASE would end the reservation the writing registrants hold too.
    ///   A RELEASE that changes nothing (not the holder) passes unchanged.
    /// - REGISTER, REGISTER AND IGNORE EXISTING KEY: allowed. A
    ///   registration alone restricts nobody (registrations never conflict,
    ///   see [`Self::conflicts`]); the reader needs one to keep reading
    ///   under an Exclusive Access - Registrants Only / All Registrants
    ///   reservation of the writers (a read-only cluster member); and
    ///   unregistering (service action key 0) only gives up its own state.
    ///   Under an all-registrants type the registration makes the reader a
    ///   holder, but holding brings it no write (the transport still
    ///   write-protects every medium write) and no right the writers lack.
    /// - RELEASE(6)/(10): allowed; they release only the issuer's own
    ///   SPC-2 reservation.
    ///
    /// Service actions this LU does not know are left to
    /// [`Self::persistent_reserve_out`] (INVALID FIELD IN CDB).
    pub fn refuses_write_protected(&self, nexus: &Nexus, cdb: &[u8]) -> bool {
        match byte(cdb, 0) {
            op::RESERVE_6 | op::RESERVE_10 => true,
            op::PERSISTENT_RESERVE_OUT => match byte(cdb, 1) & 0x1f {
                sa::RESERVE
                | sa::PREEMPT
                | sa::PREEMPT_AND_ABORT
                | sa::CLEAR
                | sa::REGISTER_AND_MOVE => true,
                sa::RELEASE => self.res.as_ref().is_some_and(|r| {
                    is_all_registrants(r.ptype) && self.reg_index(nexus).is_some()
                }),
                _ => false,
            },
            _ => false,
        }
    }

    /// PERSISTENT RESERVE IN (opcode 0x5E): parameter data (untruncated; the
    /// engine truncates to the allocation length) or sense.
    pub fn persistent_reserve_in(&self, _nexus: &Nexus, cdb: &[u8]) -> Result<Vec<u8>, Sense> {
        let mut out = Vec::new();
        match byte(cdb, 1) & 0x1f {
            // READ KEYS
            0x00 => {
                out.extend_from_slice(&self.generation.to_be_bytes());
                let len = (self.regs.len() * 8) as u32;
                out.extend_from_slice(&len.to_be_bytes());
                for r in &self.regs {
                    out.extend_from_slice(&r.key.to_be_bytes());
                }
            }
            // READ RESERVATION
            0x01 => {
                out.extend_from_slice(&self.generation.to_be_bytes());
                match &self.res {
                    None => out.extend_from_slice(&0u32.to_be_bytes()),
                    Some(r) => {
                        out.extend_from_slice(&16u32.to_be_bytes());
                        let key = if is_all_registrants(r.ptype) {
                            0
                        } else {
                            self.key_of(&r.holder).unwrap_or(0)
                        };
                        out.extend_from_slice(&key.to_be_bytes());
                        out.extend_from_slice(&[0; 4]); // obsolete
                        out.push(0); // reserved
                        out.push(r.ptype & 0x0f); // scope 0 (LU) | type
                        out.extend_from_slice(&[0; 2]); // obsolete
                    }
                }
            }
            // REPORT CAPABILITIES
            0x02 => {
                out.extend_from_slice(&8u16.to_be_bytes());
                // CRH=0, SIP_C=0, ATP_C=0, PTPL_C=0
                out.push(0);
                // TMV=1, ALLOW COMMANDS=011b (TUR allowed through WE and EA;
                // MODE SENSE & co. allowed through WE), PTPL_A=0
                out.push(0x80 | (0b011 << 4));
                // Type mask: WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX; EX_AC_AR
                out.push(0x80 | 0x40 | 0x20 | 0x08 | 0x02);
                out.push(0x01);
                out.extend_from_slice(&[0; 2]);
            }
            // READ FULL STATUS
            0x03 => {
                out.extend_from_slice(&self.generation.to_be_bytes());
                out.extend_from_slice(&[0; 4]); // additional length, below
                for r in &self.regs {
                    let holder = self.is_holder(&r.nexus);
                    out.extend_from_slice(&r.key.to_be_bytes());
                    out.extend_from_slice(&[0; 4]);
                    out.push(if holder { 0x01 } else { 0x00 }); // ALL_TG_PT=0, R_HOLDER
                    out.push(match (&self.res, holder) {
                        (Some(res), true) => res.ptype & 0x0f,
                        _ => 0,
                    });
                    out.extend_from_slice(&[0; 4]);
                    out.extend_from_slice(&RELATIVE_TARGET_PORT.to_be_bytes());
                    let tid = transport_id(&r.nexus);
                    out.extend_from_slice(&(tid.len() as u32).to_be_bytes());
                    out.extend_from_slice(&tid);
                }
                let add = (out.len() - 8) as u32;
                out[4..8].copy_from_slice(&add.to_be_bytes());
            }
            _ => return Err(INVALID_FIELD_IN_CDB),
        }
        Ok(out)
    }

    /// PERSISTENT RESERVE OUT (0x5F) with its parameter list.
    /// `Err(None)` = RESERVATION CONFLICT status, `Err(Some(sense))` = CHECK
    /// CONDITION.
    ///
    /// REGISTER AND MOVE is supported for TransportIDs of format 01b (an
    /// initiator port name with ISID) naming relative target port 1; a
    /// format-00b TransportID (name without ISID) cannot identify an I_T
    /// nexus here and is rejected with INVALID FIELD IN PARAMETER LIST.
    pub fn persistent_reserve_out(
        &mut self,
        nexus: &Arc<Nexus>,
        cdb: &[u8],
        param: &[u8],
    ) -> Result<PrEffects, Option<Sense>> {
        let action = byte(cdb, 1) & 0x1f;
        let scope = byte(cdb, 2) >> 4;
        let ptype = byte(cdb, 2) & 0x0f;
        let list_len = be_u32(cdb, 5) as usize;
        if action > sa::REGISTER_AND_MOVE {
            return Err(Some(INVALID_FIELD_IN_CDB));
        }
        if action == sa::REGISTER_AND_MOVE {
            return self.register_and_move(nexus, scope, ptype, list_len, param);
        }
        if list_len != 24 || param.len() < 24 {
            return Err(Some(PARAM_LIST_LENGTH_ERROR));
        }
        let rkey = be_u64(param, 0);
        let sarkey = be_u64(param, 8);
        let flags = byte(param, 20);
        let spec_i_pt = flags & 0x08 != 0;
        let all_tg_pt = flags & 0x04 != 0;
        let aptpl = flags & 0x01 != 0;
        // SIP_C=0: SPEC_I_PT is invalid for every service action.
        if spec_i_pt {
            return Err(Some(INVALID_FIELD_IN_PARAM));
        }
        let is_register = matches!(action, sa::REGISTER | sa::REGISTER_AND_IGNORE);
        // ATP_C=0 and PTPL_C=0; both bits are ignored outside REGISTER.
        if is_register && (all_tg_pt || aptpl) {
            return Err(Some(INVALID_FIELD_IN_PARAM));
        }
        if matches!(
            action,
            sa::RESERVE | sa::RELEASE | sa::PREEMPT | sa::PREEMPT_AND_ABORT
        ) && (scope != 0 || !valid_type(ptype))
        {
            return Err(Some(INVALID_FIELD_IN_CDB));
        }
        match action {
            sa::REGISTER => self.register(nexus, Some(rkey), sarkey),
            sa::REGISTER_AND_IGNORE => self.register(nexus, None, sarkey),
            sa::RESERVE => self.pr_reserve(nexus, rkey, ptype),
            sa::RELEASE => self.pr_release(nexus, rkey, ptype),
            sa::CLEAR => self.clear(nexus, rkey),
            _ => self.preempt(nexus, rkey, sarkey, ptype),
        }
    }

    /// Check that `nexus` is registered with `rkey`.
    fn check_key(&self, nexus: &Nexus, rkey: u64) -> Result<usize, Option<Sense>> {
        match self.reg_index(nexus) {
            Some(i) if self.regs[i].key == rkey => Ok(i),
            _ => Err(None),
        }
    }

    /// Remove the registration at `i`, releasing a reservation it held.
    /// Returns the UAs a release causes (not the removed nexus's own).
    fn remove_registration(&mut self, i: usize, effects: &mut PrEffects) {
        if i >= self.regs.len() {
            return;
        }
        let gone = self.regs.remove(i);
        let Some(res) = &self.res else { return };
        if is_all_registrants(res.ptype) {
            if self.regs.is_empty() {
                self.res = None;
            }
        } else if *res.holder == *gone.nexus {
            let ptype = res.ptype;
            self.res = None;
            if matches!(ptype, 5 | 6) {
                for r in &self.regs {
                    effects
                        .unit_attentions
                        .push((r.nexus.clone(), UA_RESERVATIONS_RELEASED));
                }
            }
        }
    }

    fn register(
        &mut self,
        nexus: &Arc<Nexus>,
        rkey: Option<u64>,
        sarkey: u64,
    ) -> Result<PrEffects, Option<Sense>> {
        let mut effects = PrEffects::default();
        match self.reg_index(nexus) {
            None => {
                if rkey.is_some_and(|k| k != 0) {
                    return Err(None);
                }
                if sarkey != 0 {
                    self.regs.push(Registration {
                        nexus: nexus.clone(),
                        key: sarkey,
                    });
                    self.bump_generation();
                }
            }
            Some(i) => {
                if rkey.is_some_and(|k| k != self.regs[i].key) {
                    return Err(None);
                }
                if sarkey == 0 {
                    self.remove_registration(i, &mut effects);
                } else {
                    self.regs[i].key = sarkey;
                }
                self.bump_generation();
            }
        }
        Ok(effects)
    }

    fn pr_reserve(
        &mut self,
        nexus: &Arc<Nexus>,
        rkey: u64,
        ptype: u8,
    ) -> Result<PrEffects, Option<Sense>> {
        self.check_key(nexus, rkey)?;
        match &self.res {
            Some(r) => {
                if self.is_holder(nexus) && r.ptype == ptype {
                    Ok(PrEffects::default())
                } else {
                    Err(None)
                }
            }
            None => {
                self.res = Some(Persistent {
                    holder: nexus.clone(),
                    ptype,
                });
                Ok(PrEffects::default())
            }
        }
    }

    fn pr_release(
        &mut self,
        nexus: &Arc<Nexus>,
        rkey: u64,
        ptype: u8,
    ) -> Result<PrEffects, Option<Sense>> {
        self.check_key(nexus, rkey)?;
        let mut effects = PrEffects::default();
        let Some(res) = &self.res else {
            return Ok(effects);
        };
        if !self.is_holder(nexus) {
            return Ok(effects);
        }
        if res.ptype != ptype {
            return Err(Some(INVALID_RELEASE));
        }
        let released = res.ptype;
        self.res = None;
        if !matches!(
            released,
            pr_type::WRITE_EXCLUSIVE | pr_type::EXCLUSIVE_ACCESS
        ) {
            for r in self.regs.iter().filter(|r| *r.nexus != **nexus) {
                effects
                    .unit_attentions
                    .push((r.nexus.clone(), UA_RESERVATIONS_RELEASED));
            }
        }
        Ok(effects)
    }

    fn clear(&mut self, nexus: &Arc<Nexus>, rkey: u64) -> Result<PrEffects, Option<Sense>> {
        self.check_key(nexus, rkey)?;
        let mut effects = PrEffects::default();
        for r in self.regs.drain(..) {
            if *r.nexus != **nexus {
                effects
                    .unit_attentions
                    .push((r.nexus, UA_RESERVATIONS_PREEMPTED));
            }
        }
        self.res = None;
        self.bump_generation();
        Ok(effects)
    }

    /// Remove every registration with `key` except the issuer's, with a
    /// REGISTRATIONS PREEMPTED unit attention for each. Conflict if no
    /// registration at all has `key`.
    fn preempt_registrations(
        &mut self,
        nexus: &Nexus,
        key: u64,
        effects: &mut PrEffects,
    ) -> Result<(), Option<Sense>> {
        if !self.regs.iter().any(|r| r.key == key) {
            return Err(None);
        }
        while let Some(i) = self
            .regs
            .iter()
            .position(|r| r.key == key && *r.nexus != *nexus)
        {
            let victim = self.regs[i].nexus.clone();
            self.remove_registration(i, effects);
            effects
                .unit_attentions
                .push((victim, UA_REGISTRATIONS_PREEMPTED));
        }
        Ok(())
    }

    fn preempt(
        &mut self,
        nexus: &Arc<Nexus>,
        rkey: u64,
        sarkey: u64,
        ptype: u8,
    ) -> Result<PrEffects, Option<Sense>> {
        self.check_key(nexus, rkey)?;
        let mut effects = PrEffects::default();
        let current = self.res.clone();
        match current {
            // All-registrants reservation and SARK 0: everyone else goes,
            // the issuer gets a new reservation of the requested type.
            Some(res) if is_all_registrants(res.ptype) && sarkey == 0 => {
                let victims: Vec<Arc<Nexus>> = self
                    .regs
                    .iter()
                    .filter(|r| *r.nexus != **nexus)
                    .map(|r| r.nexus.clone())
                    .collect();
                self.regs.retain(|r| *r.nexus == **nexus);
                for v in victims {
                    effects
                        .unit_attentions
                        .push((v, UA_REGISTRATIONS_PREEMPTED));
                }
                self.res = Some(Persistent {
                    holder: nexus.clone(),
                    ptype,
                });
            }
            // Preempting the holder of an ordinary reservation.
            Some(res)
                if !is_all_registrants(res.ptype) && self.key_of(&res.holder) == Some(sarkey) =>
            {
                let before: Vec<Arc<Nexus>> = self.regs.iter().map(|r| r.nexus.clone()).collect();
                // Take the reservation away first so that removing the
                // holder's registration does not count as a release.
                self.res = None;
                self.preempt_registrations(nexus, sarkey, &mut effects)?;
                self.res = Some(Persistent {
                    holder: nexus.clone(),
                    ptype,
                });
                if res.ptype != ptype {
                    for n in before {
                        if *n != **nexus && self.reg_index(&n).is_some() {
                            effects.unit_attentions.push((n, UA_RESERVATIONS_RELEASED));
                        }
                    }
                }
            }
            // No reservation, or SARK does not name the holder: only
            // registrations are preempted.
            _ => {
                if sarkey == 0 {
                    return Err(Some(INVALID_FIELD_IN_PARAM));
                }
                self.preempt_registrations(nexus, sarkey, &mut effects)?;
            }
        }
        self.bump_generation();
        Ok(effects)
    }

    /// REGISTER AND MOVE (SPC-4 5.13.8).
    fn register_and_move(
        &mut self,
        nexus: &Arc<Nexus>,
        scope: u8,
        ptype: u8,
        list_len: usize,
        param: &[u8],
    ) -> Result<PrEffects, Option<Sense>> {
        // Header is 24 bytes; a TransportID follows.
        if list_len < 24 || param.len() < 24 {
            return Err(Some(PARAM_LIST_LENGTH_ERROR));
        }
        let param = param.get(..list_len).unwrap_or(param);
        if scope != 0 || !valid_type(ptype) {
            return Err(Some(INVALID_FIELD_IN_CDB));
        }
        let rkey = be_u64(param, 0);
        let sarkey = be_u64(param, 8);
        let flags = byte(param, 17);
        let unreg = flags & 0x02 != 0;
        let aptpl = flags & 0x01 != 0;
        let rel_port = be_u16(param, 18);
        let tid_len = be_u32(param, 20) as usize;
        // The issuer must be registered with the key; unregistered → conflict.
        self.check_key(nexus, rkey)?;
        // Only the holder of an ordinary reservation can move it.
        let Some(res) = self.res.clone() else {
            return Err(None);
        };
        if is_all_registrants(res.ptype) || *res.holder != **nexus {
            return Err(None);
        }
        if aptpl {
            return Err(Some(INVALID_FIELD_IN_PARAM));
        }
        let Some(tid) = 24usize
            .checked_add(tid_len)
            .and_then(|end| param.get(24..end))
        else {
            return Err(Some(PARAM_LIST_LENGTH_ERROR));
        };
        if rel_port != RELATIVE_TARGET_PORT {
            return Err(Some(INVALID_FIELD_IN_PARAM));
        }
        let Some((name, isid)) = parse_iscsi_transport_id(tid) else {
            return Err(Some(INVALID_FIELD_IN_PARAM));
        };
        if sarkey == 0 {
            return Err(Some(INVALID_FIELD_IN_PARAM));
        }
        let dest = Arc::new(Nexus {
            initiator_name: Arc::from(name.as_str()),
            isid,
            target_name: nexus.target_name.clone(),
            tpgt: nexus.tpgt,
        });
        // Moving to oneself is invalid.
        if *dest == **nexus {
            return Err(Some(INVALID_FIELD_IN_PARAM));
        }
        // Register (or re-key) the destination.
        match self.reg_index(&dest) {
            Some(i) => self.regs[i].key = sarkey,
            None => self.regs.push(Registration {
                nexus: dest.clone(),
                key: sarkey,
            }),
        }
        self.res = Some(Persistent {
            holder: dest,
            ptype,
        });
        if unreg {
            if let Some(i) = self.reg_index(nexus) {
                self.regs.remove(i);
            }
        }
        self.bump_generation();
        Ok(PrEffects::default())
    }

    /// RESERVE(6)/(10). `Err(())` = RESERVATION CONFLICT (another nexus
    /// holds it, or persistent registrations exist).
    #[allow(clippy::result_unit_err)]
    pub fn reserve(&mut self, nexus: &Arc<Nexus>) -> Result<(), ()> {
        if !self.regs.is_empty() || self.res.is_some() {
            return Err(());
        }
        match &self.spc2 {
            Some(h) if **h != **nexus => Err(()),
            _ => {
                self.spc2 = Some(nexus.clone());
                Ok(())
            }
        }
    }

    /// RELEASE(6)/(10): releases the SPC-2 reservation if `nexus` holds it;
    /// from any other nexus it does nothing (and completes with GOOD).
    pub fn release(&mut self, nexus: &Nexus) {
        if self.spc2.as_deref() == Some(nexus) {
            self.spc2 = None;
        }
    }

    /// An I_T nexus is gone: its SPC-2 reservation goes with it.
    /// Persistent registrations and reservations survive.
    pub fn nexus_removed(&mut self, nexus: &Nexus) {
        self.release(nexus);
    }

    /// LU reset / target reset: drops the SPC-2 reservation (persistent
    /// reservations survive).
    pub fn reset(&mut self) {
        self.spc2 = None;
    }
}

/// iSCSI TransportID, format 01b: `<name>,i,0x<isid>` NUL-terminated and
/// padded to a multiple of four bytes (at least 20 bytes of name).
fn transport_id(nexus: &Nexus) -> Vec<u8> {
    let name = nexus.initiator_port();
    let mut body = name.into_bytes();
    body.push(0);
    while !body.len().is_multiple_of(4) || body.len() < 20 {
        body.push(0);
    }
    let mut tid = Vec::with_capacity(4 + body.len());
    tid.push(0x40 | PROTOCOL_ISCSI);
    tid.push(0);
    tid.extend_from_slice(&(body.len() as u16).to_be_bytes());
    tid.extend_from_slice(&body);
    tid
}

/// Parse a format-01b iSCSI TransportID into (initiator name, ISID).
fn parse_iscsi_transport_id(tid: &[u8]) -> Option<(String, [u8; 6])> {
    let first = *tid.first()?;
    if first & 0x0f != PROTOCOL_ISCSI || first >> 6 != 0b01 {
        return None;
    }
    let len = be_u16(tid, 2) as usize;
    let body = tid.get(4..4 + len)?;
    let end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
    let text = std::str::from_utf8(body.get(..end)?).ok()?;
    // The separator is ",i,0x" (case-insensitive per RFC 7143).
    let lower = text.to_ascii_lowercase();
    let at = lower.rfind(",i,0x")?;
    let name = text.get(..at)?;
    let hexpart = text.get(at + 5..)?;
    if name.is_empty() || hexpart.len() != 12 {
        return None;
    }
    let raw = hex::decode(hexpart).ok()?;
    let isid: [u8; 6] = raw.try_into().ok()?;
    Some((name.to_string(), isid))
}

#[cfg(test)]
mod tests;
