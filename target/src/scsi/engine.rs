//! Command dispatch: the LUN table and per-LU state.
//!
//! Data-Out size policy (see also [`LogicalUnit::expected_data_out`]): for
//! WRITE / WRITE AND VERIFY the engine writes `min(data_out, CDB length)`
//! when the Data-Out it got is a whole number of blocks (the transport
//! reports the residual from its Expected Data Transfer Length, as tgtd and
//! LIO do and as libiscsi's iSCSIResiduals tests expect); a Data-Out that
//! ends in a partial block and is shorter than the CDB needs writes nothing
//! and fails with ILLEGAL REQUEST / INVALID FIELD IN INFORMATION UNIT
//! (0E/03). Commands whose Data-Out is a single unit (WRITE SAME, COMPARE
//! AND WRITE, VERIFY with BYTCHK) require the exact size and fail with
//! 0E/03 otherwise. Parameter lists (MODE SELECT, UNMAP, PR OUT) use
//! `min(parameter list length, data_out)`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::RwLock;

use super::pr::Reservations;
use super::spc::{self, ModeParams};
use super::*;

/// Strings shown in standard INQUIRY data.
#[derive(Debug, Clone)]
pub struct LuConfig {
    /// T10 vendor identification, up to 8 ASCII chars.
    pub vendor: String,
    /// Product identification, up to 16 ASCII chars.
    pub product: String,
    /// Product revision level, up to 4 ASCII chars.
    pub revision: String,
}

impl Default for LuConfig {
    fn default() -> Self {
        LuConfig {
            vendor: "IRONBLK".into(),
            product: "ironblock".into(),
            revision: "0001".into(),
        }
    }
}

/// Largest READ/WRITE/VERIFY transfer in bytes (VPD B0 MAXIMUM TRANSFER LENGTH).
pub const MAX_TRANSFER_BYTES: u64 = 8 << 20;
/// Optimal transfer size in bytes (VPD B0 OPTIMAL TRANSFER LENGTH).
pub const OPTIMAL_TRANSFER_BYTES: u64 = 1 << 20;
/// MAXIMUM COMPARE AND WRITE LENGTH in blocks.
pub const MAX_COMPARE_AND_WRITE: u64 = 16;
/// MAXIMUM UNMAP LBA COUNT.
pub const MAX_UNMAP_LBA_COUNT: u64 = 1 << 20;
/// MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT.
pub const MAX_UNMAP_DESCRIPTORS: usize = 256;
/// MAXIMUM WRITE SAME LENGTH in blocks.
pub const MAX_WRITE_SAME: u64 = 0xffff;
/// Largest buffer WRITE SAME writes in one device call.
const WRITE_SAME_CHUNK_BYTES: u64 = 1 << 20;
/// At most this many unit attentions are queued per nexus.
const MAX_UA_QUEUE: usize = 16;

/// Why a command did not complete with GOOD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fail {
    /// CHECK CONDITION with this sense.
    Check(Sense),
    /// CHECK CONDITION with sense and INFORMATION field.
    CheckInfo(Sense, u64),
    /// RESERVATION CONFLICT, no sense.
    Conflict,
}

impl From<Sense> for Fail {
    fn from(s: Sense) -> Self {
        Fail::Check(s)
    }
}

impl From<DeviceError> for Fail {
    fn from(e: DeviceError) -> Self {
        Fail::Check(device_error_sense(&e))
    }
}

/// Sense data for a device error.
pub fn device_error_sense(e: &DeviceError) -> Sense {
    match e {
        DeviceError::Read(_) => Sense::READ_ERROR,
        DeviceError::Write(_) => Sense::WRITE_ERROR,
        DeviceError::NoSpace => Sense::NO_SPACE,
        DeviceError::Unavailable(_) => Sense::BECOMING_READY,
        DeviceError::Other(_) => Sense::INTERNAL_FAILURE,
    }
}

type CmdResult = Result<ScsiResult, Fail>;

fn fail_result(f: Fail) -> ScsiResult {
    match f {
        Fail::Check(s) => ScsiResult::check(s),
        Fail::CheckInfo(s, info) => ScsiResult {
            status: status::CHECK_CONDITION,
            sense: Some(s.to_fixed_with_info(info)),
            data_in: Bytes::new(),
        },
        Fail::Conflict => ScsiResult::status(status::RESERVATION_CONFLICT),
    }
}

fn good(v: Vec<u8>, alloc: usize) -> CmdResult {
    let mut v = v;
    v.truncate(alloc);
    Ok(ScsiResult::good(Bytes::from(v)))
}

fn good_empty() -> CmdResult {
    Ok(ScsiResult::good(Bytes::new()))
}

fn invalid_cdb() -> Fail {
    Fail::Check(Sense::INVALID_FIELD_IN_CDB)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Big-endian integer from `c[off..off + len]` (the CDB is padded to 16).
fn be(c: &[u8; 16], off: usize, len: usize) -> u64 {
    c.iter()
        .skip(off)
        .take(len)
        .fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
}

/// Big-endian integer from a parameter list; missing bytes read as zero.
fn be_param(p: &[u8], off: usize, len: usize) -> u64 {
    (0..len).fold(0u64, |acc, i| {
        (acc << 8) | u64::from(p.get(off + i).copied().unwrap_or(0))
    })
}

/// CDB length implied by the opcode's group code.
fn cdb_len(op: u8) -> usize {
    match op >> 5 {
        0 => 6,
        1 | 2 => 10,
        4 => 16,
        5 => 12,
        _ => 16,
    }
}

/// Per-nexus state.
#[derive(Debug, Default)]
struct NexusState {
    unit_attentions: VecDeque<Sense>,
    prevent: bool,
}

impl NexusState {
    fn push_ua(&mut self, s: Sense) {
        if !self.unit_attentions.contains(&s) && self.unit_attentions.len() < MAX_UA_QUEUE {
            self.unit_attentions.push_back(s);
        }
    }
}

/// Mutable LU state behind a std mutex (never held across `.await`).
#[derive(Debug)]
struct LuState {
    nexuses: HashMap<Nexus, NexusState>,
    mode: ModeParams,
}

impl LuState {
    fn ua_all(&mut self, s: Sense) {
        for n in self.nexuses.values_mut() {
            n.push_ua(s);
        }
    }
    fn ua_others(&mut self, me: &Nexus, s: Sense) {
        for (k, n) in self.nexuses.iter_mut() {
            if k != me {
                n.push_ua(s);
            }
        }
    }
}

/// The kind of media access, for the stopped-unit and write-protect checks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    None,
    Read,
    Write,
}

/// One logical unit: a device plus SCSI state.
pub struct LogicalUnit {
    dev: Arc<dyn BlockDevice>,
    config: LuConfig,
    state: Mutex<LuState>,
    pr: Mutex<Reservations>,
    /// Ordinary writes take it shared, COMPARE AND WRITE exclusively.
    io_lock: RwLock<()>,
    started: AtomicBool,
    last_blocks: AtomicU64,
    default_mode: ModeParams,
}

impl LogicalUnit {
    pub fn new(dev: Arc<dyn BlockDevice>, config: LuConfig) -> Self {
        let default_mode = ModeParams {
            wce: dev.write_cache(),
            swp: false,
        };
        let blocks = dev.num_blocks();
        LogicalUnit {
            dev,
            config,
            state: Mutex::new(LuState {
                nexuses: HashMap::new(),
                mode: default_mode,
            }),
            pr: Mutex::new(Reservations::new()),
            io_lock: RwLock::new(()),
            started: AtomicBool::new(true),
            last_blocks: AtomicU64::new(blocks),
            default_mode,
        }
    }
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.dev
    }

    /// Execute one command addressed to this LU.
    pub async fn execute(&self, cmd: &ScsiCommand) -> ScsiResult {
        match self.execute_inner(cmd).await {
            Ok(r) => r,
            Err(f) => fail_result(f),
        }
    }

    /// A new I_T nexus appeared (session login): it gets a POWER ON, RESET,
    /// OR BUS DEVICE RESET OCCURRED unit attention.
    pub fn nexus_added(&self, nexus: &Nexus) {
        let mut st = lock(&self.state);
        let n = st.nexuses.entry(nexus.clone()).or_default();
        n.unit_attentions.clear();
        n.push_ua(Sense::UA_POWER_ON);
    }
    /// An I_T nexus is gone (session ended).
    pub fn nexus_removed(&self, nexus: &Nexus) {
        lock(&self.state).nexuses.remove(nexus);
        lock(&self.pr).nexus_removed(nexus);
    }
    /// LOGICAL UNIT RESET task management function from `by`.
    ///
    /// Every other nexus gets BUS DEVICE RESET FUNCTION OCCURRED; the nexus
    /// that asked for the reset already knows (its TMF response says so).
    pub fn lun_reset(&self, by: &Nexus) {
        self.reset(Sense::UA_DEVICE_RESET, Some(by));
    }
    /// TARGET WARM/COLD RESET task management function from `by`.
    pub fn target_reset(&self, _by: &Nexus) {
        self.reset(Sense::UA_POWER_ON, None);
    }

    fn reset(&self, ua: Sense, except: Option<&Nexus>) {
        {
            let mut st = lock(&self.state);
            st.mode = self.default_mode;
            for (k, n) in st.nexuses.iter_mut() {
                n.prevent = false;
                n.unit_attentions.clear();
                if except != Some(k) {
                    n.push_ua(ua);
                }
            }
        }
        lock(&self.pr).reset();
    }

    /// Bytes of Data-Out the CDB calls for (the SCSI transfer length), or
    /// `None` for an unknown opcode. The transport may use this to size
    /// R2Ts and compute write residuals.
    pub fn expected_data_out(&self, cdb: &[u8]) -> Option<u64> {
        let mut c = [0u8; 16];
        for (d, s) in c.iter_mut().zip(cdb) {
            *d = *s;
        }
        let bs = u64::from(self.dev.block_size());
        Some(match c[0] {
            0x0a => {
                let n = be(&c, 4, 1);
                if n == 0 {
                    256 * bs
                } else {
                    n * bs
                }
            }
            0x2a | 0x2e => be(&c, 7, 2) * bs,
            0xaa | 0xae => be(&c, 6, 4) * bs,
            0x8a | 0x8e => be(&c, 10, 4) * bs,
            0x2f => verify_bytes(c[1], be(&c, 7, 2), bs),
            0xaf => verify_bytes(c[1], be(&c, 6, 4), bs),
            0x8f => verify_bytes(c[1], be(&c, 10, 4), bs),
            0x41 => bs,
            0x93 => {
                if c[1] & 1 != 0 {
                    0
                } else {
                    bs
                }
            }
            0x89 => 2 * be(&c, 13, 1) * bs,
            0x15 => be(&c, 4, 1),
            0x55 | 0x42 => be(&c, 7, 2),
            0x5f => be(&c, 5, 4),
            0x00 | 0x03 | 0x08 | 0x12 | 0x16 | 0x17 | 0x1a | 0x1b | 0x1e | 0x25 | 0x28 | 0x34
            | 0x35 | 0x56 | 0x57 | 0x5a | 0x5e | 0x88 | 0x90 | 0x91 | 0x9e | 0xa0 | 0xa3 | 0xa8 => {
                0
            }
            _ => return None,
        })
    }

    /// Unit attention bookkeeping for one command: lazy nexus registration,
    /// capacity change detection and UA reporting. Returns the UA to report.
    fn take_unit_attention(&self, nexus: &Nexus, op: u8) -> Option<Sense> {
        let blocks = self.dev.num_blocks();
        let changed = self.last_blocks.load(Ordering::Relaxed) != blocks
            && self.last_blocks.swap(blocks, Ordering::Relaxed) != blocks;
        let mut st = lock(&self.state);
        if changed {
            st.ua_all(Sense::UA_CAPACITY_CHANGED);
        }
        let ns = match st.nexuses.get_mut(nexus) {
            Some(n) => n,
            None => st.nexuses.entry(nexus.clone()).or_default(),
        };
        // INQUIRY, REPORT LUNS and REQUEST SENSE neither report nor clear a UA
        // (REQUEST SENSE returns it as its parameter data instead).
        match op {
            0x12 | 0xa0 | 0x03 => None,
            _ => ns.unit_attentions.pop_front(),
        }
    }

    async fn execute_inner(&self, cmd: &ScsiCommand) -> CmdResult {
        let raw = &cmd.cdb[..];
        let op = match raw.first() {
            Some(op) => *op,
            None => return Err(Sense::INVALID_OPCODE.into()),
        };
        if raw.len() < cdb_len(op) {
            return Err(invalid_cdb());
        }
        let mut c = [0u8; 16];
        for (d, s) in c.iter_mut().zip(raw) {
            *d = *s;
        }

        if let Some(ua) = self.take_unit_attention(&cmd.nexus, op) {
            return Err(ua.into());
        }
        if lock(&self.pr).conflicts(&cmd.nexus, raw) {
            return Err(Fail::Conflict);
        }

        let access = match op {
            0x08 | 0x28 | 0xa8 | 0x88 | 0x2f | 0xaf | 0x8f | 0x34 | 0x90 => Access::Read,
            0x0a | 0x2a | 0xaa | 0x8a | 0x2e | 0xae | 0x8e | 0x41 | 0x93 | 0x42 | 0x89 | 0x35
            | 0x91 => Access::Write,
            0x9e if c[1] & 0x1f == 0x12 => Access::Read,
            _ => Access::None,
        };
        if access != Access::None && !self.started.load(Ordering::Relaxed) {
            return Err(Sense::NOT_READY_STOPPED.into());
        }
        // A nexus the transport write-protects: nothing that changes the
        // medium (SYNCHRONIZE CACHE only flushes, and is allowed), nor the
        // mode pages every other nexus shares (WCE, SWP). Reservations that
        // would restrict the LU's writers are refused in their arms below
        // (`Reservations::refuses_write_protected`).
        if cmd.write_protected
            && ((access == Access::Write && !matches!(op, 0x35 | 0x91))
                || matches!(op, 0x15 | 0x55))
        {
            return Err(Sense::WRITE_PROTECTED.into());
        }

        let bs = u64::from(self.dev.block_size());
        if bs == 0 {
            // A broken device; refuse rather than divide by zero below.
            return Err(Sense::INTERNAL_FAILURE.into());
        }
        match op {
            0x00 => self.test_unit_ready(),
            0x03 => self.request_sense(cmd, &c),
            0x12 => self.inquiry(cmd, &c),
            0x1a | 0x5a => self.mode_sense(&c, cmd.write_protected),
            0x15 | 0x55 => self.mode_select(cmd, &c),
            0x1b => self.start_stop(&c).await,
            0x1e => self.prevent_allow(cmd, &c),
            0x25 => self.read_capacity10(&c),
            0x9e => match c[1] & 0x1f {
                0x10 => self.read_capacity16(&c),
                0x12 => self.get_lba_status(&c).await,
                _ => Err(invalid_cdb()),
            },
            0xa3 => match c[1] & 0x1f {
                0x0c => self.report_opcodes(&c),
                0x0d => report_tmfs(&c),
                _ => Err(invalid_cdb()),
            },
            0xa0 => Err(invalid_cdb()), // answered by LunTable
            // READ(6): 21-bit LBA, 0 blocks means 256.
            0x08 => {
                let lba = be(&c, 1, 3) & 0x1f_ffff;
                let n = match c[4] {
                    0 => 256,
                    n => u64::from(n),
                };
                self.read(lba, n).await
            }
            0x28 | 0xa8 | 0x88 => {
                if c[1] & 0xe0 != 0 {
                    return Err(invalid_cdb());
                }
                let (lba, n) = lba_len(op, &c);
                self.read(lba, n).await
            }
            0x0a => {
                let lba = be(&c, 1, 3) & 0x1f_ffff;
                let n = match c[4] {
                    0 => 256,
                    n => u64::from(n),
                };
                self.write(cmd, lba, n, false, bs).await
            }
            0x2a | 0xaa | 0x8a => {
                if c[1] & 0xe0 != 0 {
                    return Err(invalid_cdb());
                }
                let (lba, n) = lba_len(op, &c);
                self.write(cmd, lba, n, c[1] & 0x08 != 0, bs).await
            }
            0x2e | 0xae | 0x8e => {
                // WRITE AND VERIFY: BYTCHK 0 or 1 (SBC-4 bits 1-2), no protection.
                if c[1] & 0xe0 != 0 || (c[1] >> 1) & 3 > 1 {
                    return Err(invalid_cdb());
                }
                let (lba, n) = lba_len(op, &c);
                self.write(cmd, lba, n, true, bs).await
            }
            0x2f | 0xaf | 0x8f => {
                if c[1] & 0xe0 != 0 {
                    return Err(invalid_cdb());
                }
                let (lba, n) = lba_len(op, &c);
                self.verify(cmd, lba, n, (c[1] >> 1) & 3, bs).await
            }
            0x34 | 0x90 => {
                let (lba, n) = lba_len(op, &c);
                self.check_range(lba, n)?;
                good_empty()
            }
            0x35 | 0x91 => {
                let (lba, n) = lba_len(op, &c);
                self.check_range(lba, n)?;
                self.dev.flush().await?;
                good_empty()
            }
            0x41 | 0x93 => self.write_same(cmd, &c, bs).await,
            0x42 => self.unmap(cmd, &c).await,
            0x89 => self.compare_and_write(cmd, &c, bs).await,
            0x16 | 0x56 => {
                if op == 0x56 && c[1] & 0x12 != 0 {
                    // third-party / LONGID reservations are not supported
                    return Err(invalid_cdb());
                }
                let mut pr = lock(&self.pr);
                if cmd.write_protected && pr.refuses_write_protected(&cmd.nexus, raw) {
                    return Err(Sense::WRITE_PROTECTED.into());
                }
                match pr.reserve(&cmd.nexus) {
                    Ok(()) => good_empty(),
                    Err(()) => Err(Fail::Conflict),
                }
            }
            0x17 | 0x57 => {
                lock(&self.pr).release(&cmd.nexus);
                good_empty()
            }
            0x5e => {
                let alloc = be(&c, 7, 2) as usize;
                let data = lock(&self.pr).persistent_reserve_in(&cmd.nexus, raw)?;
                good(data, alloc)
            }
            0x5f => {
                let len = be(&c, 5, 4) as usize;
                let param = cmd.data_out.get(..len).unwrap_or(&cmd.data_out[..]);
                // A write-protected nexus is refused under the same lock
                // that runs the service action (RELEASE depends on the
                // reservation's type).
                let res = {
                    let mut pr = lock(&self.pr);
                    if cmd.write_protected && pr.refuses_write_protected(&cmd.nexus, raw) {
                        return Err(Sense::WRITE_PROTECTED.into());
                    }
                    pr.persistent_reserve_out(&cmd.nexus, raw, param)
                };
                match res {
                    Ok(eff) => {
                        if !eff.unit_attentions.is_empty() {
                            let mut st = lock(&self.state);
                            for (n, s) in eff.unit_attentions {
                                st.nexuses.entry((*n).clone()).or_default().push_ua(s);
                            }
                        }
                        good_empty()
                    }
                    Err(None) => Err(Fail::Conflict),
                    Err(Some(s)) => Err(s.into()),
                }
            }
            _ => Err(Sense::INVALID_OPCODE.into()),
        }
    }

    fn test_unit_ready(&self) -> CmdResult {
        if !self.started.load(Ordering::Relaxed) {
            return Err(Sense::NOT_READY_STOPPED.into());
        }
        good_empty()
    }

    fn request_sense(&self, cmd: &ScsiCommand, c: &[u8; 16]) -> CmdResult {
        let desc = c[1] & 1 != 0;
        let alloc = c[4] as usize;
        let ua = {
            let mut st = lock(&self.state);
            st.nexuses
                .get_mut(&*cmd.nexus)
                .and_then(|n| n.unit_attentions.pop_front())
        };
        let s = match ua {
            Some(s) => s,
            None if !self.started.load(Ordering::Relaxed) => Sense::NOT_READY_STOPPED,
            None => Sense::NO_SENSE,
        };
        let data = if desc {
            s.to_descriptor(None)
        } else {
            s.to_fixed()
        };
        good(data.to_vec(), alloc)
    }

    fn inquiry(&self, cmd: &ScsiCommand, c: &[u8; 16]) -> CmdResult {
        let evpd = c[1] & 1 != 0;
        let page = c[2];
        let alloc = be(c, 3, 2) as usize;
        if c[1] & 0xfe != 0 {
            return Err(invalid_cdb());
        }
        if !evpd {
            if page != 0 {
                return Err(invalid_cdb());
            }
            return good(spc::standard_inquiry(&self.config, 0x00), alloc);
        }
        let body: Vec<u8> = match page {
            0x00 => vec![0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2],
            0x80 => {
                let id = self.dev.identity();
                let mut s = vec![0u8; id.serial.len()];
                spc::put_ascii(&mut s, &id.serial);
                s
            }
            0x83 => self.vpd_device_id(&cmd.nexus),
            0xb0 => self.vpd_block_limits(),
            0xb1 => {
                let mut d = vec![0u8; 0x3c];
                d[1] = 0x01; // non-rotating medium
                d[3] = 0x05; // form factor: less than 1.8 inch
                d
            }
            0xb2 => {
                let mut d = vec![0u8; 4];
                if self.dev.thin() {
                    // LBPU, LBPWS, LBPWS10, LBPRZ; provisioning type thin.
                    d[1] = 0x80 | 0x40 | 0x20 | 0x04;
                    d[2] = 0x02;
                }
                d
            }
            _ => return Err(invalid_cdb()),
        };
        let mut d = Vec::with_capacity(body.len() + 4);
        d.extend_from_slice(&[0x00, page]);
        d.extend_from_slice(&(body.len().min(0xffff) as u16).to_be_bytes());
        d.extend_from_slice(&body);
        good(d, alloc)
    }

    fn vpd_device_id(&self, nexus: &Nexus) -> Vec<u8> {
        let id = self.dev.identity();
        let mut d = Vec::with_capacity(160);
        // NAA IEEE Registered Extended, associated with the LU.
        d.extend_from_slice(&[0x01, 0x03, 0x00, 16]);
        d.extend_from_slice(&id.naa);
        // T10 vendor ID: vendor (8, space padded) + serial.
        let mut vendor = [0u8; 8];
        spc::put_ascii(&mut vendor, &self.config.vendor);
        let mut serial = vec![0u8; id.serial.len().min(200)];
        spc::put_ascii(&mut serial, &id.serial);
        d.extend_from_slice(&[0x02, 0x01, 0x00, (8 + serial.len()) as u8]);
        d.extend_from_slice(&vendor);
        d.extend_from_slice(&serial);
        // SCSI name strings: target port and target device (iSCSI, UTF-8).
        let port = nexus.target_port();
        push_name_designator(&mut d, 0x98, port.as_bytes());
        push_name_designator(&mut d, 0xa8, nexus.target_name.as_bytes());
        // Relative target port identifier: the TPGT, at least 1.
        let rel = nexus.tpgt.max(1);
        d.extend_from_slice(&[0x51, 0x94, 0x00, 4, 0, 0]);
        d.extend_from_slice(&rel.to_be_bytes());
        d
    }

    fn vpd_block_limits(&self) -> Vec<u8> {
        let bs = u64::from(self.dev.block_size()).max(1);
        let mut d = vec![0u8; 0x3c];
        d[0] = 0x01; // WSNZ: WRITE SAME with 0 blocks is rejected
        d[1] = MAX_COMPARE_AND_WRITE as u8;
        let max_xfer = (MAX_TRANSFER_BYTES / bs).max(1) as u32;
        let opt_xfer = (OPTIMAL_TRANSFER_BYTES / bs).max(1) as u32;
        d[2..4].copy_from_slice(&1u16.to_be_bytes()); // optimal granularity
        d[4..8].copy_from_slice(&max_xfer.to_be_bytes());
        d[8..12].copy_from_slice(&opt_xfer.to_be_bytes());
        if self.dev.thin() {
            d[16..20].copy_from_slice(&(MAX_UNMAP_LBA_COUNT as u32).to_be_bytes());
            d[20..24].copy_from_slice(&(MAX_UNMAP_DESCRIPTORS as u32).to_be_bytes());
            d[24..28].copy_from_slice(&1u32.to_be_bytes()); // optimal unmap granularity
        }
        d[32..40].copy_from_slice(&MAX_WRITE_SAME.to_be_bytes());
        d
    }

    fn mode_params(&self) -> ModeParams {
        lock(&self.state).mode
    }

    /// `write_protected`: this nexus may not write (the WP bit is set
    /// whether that or the Control page's SWP is the reason).
    fn mode_sense(&self, c: &[u8; 16], write_protected: bool) -> CmdResult {
        let ten = c[0] == 0x5a;
        let dbd = c[1] & 0x08 != 0;
        let llbaa = ten && c[1] & 0x10 != 0;
        let pc = c[2] >> 6;
        let page = c[2] & 0x3f;
        let subpage = c[3];
        let alloc = if ten { be(c, 7, 2) } else { be(c, 4, 1) } as usize;
        if pc == 3 {
            return Err(Sense::SAVING_NOT_SUPPORTED.into());
        }
        if subpage != 0 && subpage != 0xff {
            return Err(invalid_cdb());
        }
        let cur = self.mode_params();
        let wce_ch = self.dev.write_cache();
        let mut pages = Vec::with_capacity(64);
        if page == 0x3f {
            for p in spc::MODE_PAGES {
                if let Some(v) = spc::mode_page(p, pc, cur, self.default_mode, wce_ch) {
                    pages.extend_from_slice(&v);
                }
            }
        } else {
            match spc::mode_page(page, pc, cur, self.default_mode, wce_ch) {
                Some(v) => pages.extend_from_slice(&v),
                None => return Err(invalid_cdb()),
            }
        }
        let bs = self.dev.block_size();
        let blocks = self.dev.num_blocks();
        let mut bd = Vec::new();
        if !dbd {
            if llbaa {
                bd.extend_from_slice(&blocks.to_be_bytes());
                bd.extend_from_slice(&[0, 0, 0, 0]);
                bd.extend_from_slice(&bs.to_be_bytes());
            } else {
                let n = u32::try_from(blocks).unwrap_or(u32::MAX);
                bd.extend_from_slice(&n.to_be_bytes());
                bd.push(0);
                bd.extend_from_slice(&bs.to_be_bytes()[1..]);
            }
        }
        let devspec = if cur.swp || write_protected { 0x80 } else { 0 } | 0x10; // WP, DPOFUA
        let mut d = Vec::with_capacity(8 + bd.len() + pages.len());
        if ten {
            let len = (6 + bd.len() + pages.len()) as u16;
            d.extend_from_slice(&len.to_be_bytes());
            d.extend_from_slice(&[0, devspec, u8::from(llbaa && !dbd), 0]);
            d.extend_from_slice(&(bd.len() as u16).to_be_bytes());
        } else {
            let len = (3 + bd.len() + pages.len()).min(255) as u8;
            d.extend_from_slice(&[len, 0, devspec, bd.len() as u8]);
        }
        d.extend_from_slice(&bd);
        d.extend_from_slice(&pages);
        good(d, alloc)
    }

    fn mode_select(&self, cmd: &ScsiCommand, c: &[u8; 16]) -> CmdResult {
        let ten = c[0] == 0x55;
        let pf = c[1] & 0x10 != 0;
        let sp = c[1] & 0x01 != 0;
        let len = if ten { be(c, 7, 2) } else { be(c, 4, 1) } as usize;
        if sp {
            return Err(invalid_cdb());
        }
        if len == 0 {
            return good_empty();
        }
        if !pf {
            return Err(invalid_cdb());
        }
        if cmd.data_out.len() < len {
            return Err(Sense::PARAM_LIST_LENGTH.into());
        }
        let p = cmd.data_out.get(..len).unwrap_or(&[]);
        let hdr = if ten { 8 } else { 4 };
        if p.len() < hdr {
            return Err(Sense::PARAM_LIST_LENGTH.into());
        }
        let (bdlen, longlba) = if ten {
            (be_param(p, 6, 2) as usize, be_param(p, 4, 1) & 1 != 0)
        } else {
            (be_param(p, 3, 1) as usize, false)
        };
        let bd = p.get(hdr..hdr + bdlen).ok_or(Sense::PARAM_LIST_LENGTH)?;
        let bs = u64::from(self.dev.block_size());
        match (bdlen, longlba) {
            (0, _) => {}
            (8, false) => {
                if be_param(bd, 5, 3) != bs {
                    return Err(Sense::INVALID_FIELD_IN_PARAM.into());
                }
            }
            (16, true) => {
                if be_param(bd, 12, 4) != bs {
                    return Err(Sense::INVALID_FIELD_IN_PARAM.into());
                }
            }
            _ => return Err(Sense::INVALID_FIELD_IN_PARAM.into()),
        }
        let cur = self.mode_params();
        let wce_ch = self.dev.write_cache();
        let mut new = cur;
        let mut rest = p.get(hdr + bdlen..).unwrap_or(&[]);
        while !rest.is_empty() {
            let code = rest.first().copied().unwrap_or(0);
            if code & 0x40 != 0 {
                // SPF: no subpages are implemented
                return Err(Sense::INVALID_FIELD_IN_PARAM.into());
            }
            let plen = rest.get(1).copied().ok_or(Sense::PARAM_LIST_LENGTH)? as usize + 2;
            let page = rest.get(..plen).ok_or(Sense::PARAM_LIST_LENGTH)?;
            let code = code & 0x3f;
            let current = spc::mode_page(code, 0, cur, self.default_mode, wce_ch)
                .ok_or(Sense::INVALID_FIELD_IN_PARAM)?;
            let mask = spc::mode_page(code, 1, cur, self.default_mode, wce_ch)
                .ok_or(Sense::INVALID_FIELD_IN_PARAM)?;
            if current.len() != plen {
                return Err(Sense::INVALID_FIELD_IN_PARAM.into());
            }
            for i in 2..plen {
                let (n, o, m) = (
                    page.get(i).copied().unwrap_or(0),
                    current.get(i).copied().unwrap_or(0),
                    mask.get(i).copied().unwrap_or(0),
                );
                if (n ^ o) & !m != 0 {
                    return Err(Sense::INVALID_FIELD_IN_PARAM.into());
                }
            }
            match code {
                0x08 => new.wce = page.get(2).is_some_and(|b| b & 0x04 != 0),
                0x0a => new.swp = page.get(4).is_some_and(|b| b & 0x08 != 0),
                _ => {}
            }
            rest = rest.get(plen..).unwrap_or(&[]);
        }
        if new != cur {
            let mut st = lock(&self.state);
            st.mode = new;
            st.ua_others(&cmd.nexus, Sense::UA_MODE_CHANGED);
        }
        good_empty()
    }

    async fn start_stop(&self, c: &[u8; 16]) -> CmdResult {
        let pc = c[4] >> 4;
        let loej = c[4] & 0x02 != 0;
        let start = c[4] & 0x01 != 0;
        let no_flush = c[4] & 0x04 != 0;
        if pc != 0 {
            // Power conditions: accepted, nothing to do.
            return good_empty();
        }
        if loej {
            // Not removable: there is no medium to load or eject.
            return Err(invalid_cdb());
        }
        if start {
            self.started.store(true, Ordering::Relaxed);
        } else {
            if !no_flush {
                self.dev.flush().await?;
            }
            self.started.store(false, Ordering::Relaxed);
        }
        good_empty()
    }

    fn prevent_allow(&self, cmd: &ScsiCommand, c: &[u8; 16]) -> CmdResult {
        let prevent = c[4] & 0x03;
        if prevent > 1 {
            return Err(invalid_cdb());
        }
        let mut st = lock(&self.state);
        st.nexuses.entry((*cmd.nexus).clone()).or_default().prevent = prevent == 1;
        good_empty()
    }

    fn read_capacity10(&self, c: &[u8; 16]) -> CmdResult {
        if c[8] & 1 == 0 && be(c, 2, 4) != 0 {
            return Err(invalid_cdb());
        }
        let last = self.dev.num_blocks().saturating_sub(1);
        let last = u32::try_from(last).unwrap_or(u32::MAX);
        let mut d = Vec::with_capacity(8);
        d.extend_from_slice(&last.to_be_bytes());
        d.extend_from_slice(&self.dev.block_size().to_be_bytes());
        good(d, 8)
    }

    fn read_capacity16(&self, c: &[u8; 16]) -> CmdResult {
        let alloc = be(c, 10, 4) as usize;
        let mut d = vec![0u8; 32];
        d[..8].copy_from_slice(&self.dev.num_blocks().saturating_sub(1).to_be_bytes());
        d[8..12].copy_from_slice(&self.dev.block_size().to_be_bytes());
        if self.dev.thin() {
            d[14] = 0x80 | 0x40; // LBPME, LBPRZ
        }
        good(d, alloc)
    }

    async fn get_lba_status(&self, c: &[u8; 16]) -> CmdResult {
        let lba = be(c, 2, 8);
        let alloc = be(c, 10, 4) as usize;
        let end = self.dev.num_blocks();
        if lba >= end {
            return Err(Sense::LBA_OUT_OF_RANGE.into());
        }
        let max_desc = (alloc.saturating_sub(8) / 16).clamp(1, 64);
        let mut d = vec![0u8; 8];
        let mut cur = lba;
        while cur < end && (d.len() - 8) / 16 < max_desc {
            let (mapped, n) = self.dev.lba_status(cur).await?;
            let n = n.clamp(1, end - cur).min(u64::from(u32::MAX));
            d.extend_from_slice(&cur.to_be_bytes());
            d.extend_from_slice(&(n as u32).to_be_bytes());
            d.extend_from_slice(&[if mapped { 0 } else { 1 }, 0, 0, 0]);
            cur += n;
        }
        let plen = (d.len() - 4) as u32;
        d[..4].copy_from_slice(&plen.to_be_bytes());
        good(d, alloc)
    }

    fn report_opcodes(&self, c: &[u8; 16]) -> CmdResult {
        let rctd = c[2] & 0x80 != 0;
        let opts = c[2] & 0x07;
        let req_op = c[3];
        let req_sa = be(c, 4, 2) as u16;
        let alloc = be(c, 6, 4) as usize;
        let mut d = Vec::with_capacity(1024);
        match opts {
            0 => {
                d.extend_from_slice(&[0, 0, 0, 0]);
                for ci in spc::COMMANDS {
                    d.push(ci.op);
                    d.push(0);
                    d.extend_from_slice(&ci.sa.unwrap_or(0).to_be_bytes());
                    d.push(0);
                    d.push(if rctd { 0x02 } else { 0 } | u8::from(ci.sa.is_some()));
                    d.extend_from_slice(&(ci.usage.len() as u16).to_be_bytes());
                    if rctd {
                        d.extend_from_slice(&spc::TIMEOUTS);
                    }
                }
                let l = (d.len() - 4) as u32;
                d[..4].copy_from_slice(&l.to_be_bytes());
            }
            1..=3 => {
                let has_sa = spc::has_service_actions(req_op);
                let want_sa = match opts {
                    1 if has_sa => return Err(invalid_cdb()),
                    1 => None,
                    2 if !has_sa => return Err(invalid_cdb()),
                    2 => Some(req_sa),
                    _ if has_sa => Some(req_sa),
                    _ => None,
                };
                let found = spc::COMMANDS
                    .iter()
                    .find(|ci| ci.op == req_op && ci.sa == want_sa);
                match found {
                    Some(ci) => {
                        d.push(0);
                        d.push(if rctd { 0x80 } else { 0 } | 0x03);
                        d.extend_from_slice(&(ci.usage.len() as u16).to_be_bytes());
                        d.extend_from_slice(ci.usage);
                        if rctd {
                            d.extend_from_slice(&spc::TIMEOUTS);
                        }
                    }
                    None => d.extend_from_slice(&[0, 0x01, 0, 0]),
                }
            }
            _ => return Err(invalid_cdb()),
        }
        good(d, alloc)
    }

    /// LBA out of range check: `lba + n` must not pass the capacity.
    fn check_range(&self, lba: u64, n: u64) -> Result<(), Fail> {
        match lba.checked_add(n) {
            Some(end) if end <= self.dev.num_blocks() => Ok(()),
            _ => Err(Sense::LBA_OUT_OF_RANGE.into()),
        }
    }

    fn check_xfer(&self, n: u64, bs: u64) -> Result<u64, Fail> {
        let bytes = n.saturating_mul(bs);
        if bytes > MAX_TRANSFER_BYTES {
            return Err(invalid_cdb());
        }
        Ok(bytes)
    }

    /// Write-protect check (SWP); returns whether writes must be forced
    /// to FUA because the write cache is disabled (WCE=0).
    fn check_writable(&self) -> Result<bool, Fail> {
        let m = lock(&self.state).mode;
        if m.swp {
            return Err(Sense::WRITE_PROTECTED.into());
        }
        Ok(!m.wce)
    }

    async fn read(&self, lba: u64, n: u64) -> CmdResult {
        self.check_range(lba, n)?;
        if n == 0 {
            return good_empty();
        }
        let bytes = self.check_xfer(n, u64::from(self.dev.block_size()))?;
        let mut buf = vec![0u8; bytes as usize];
        self.dev.read(lba, &mut buf).await?;
        Ok(ScsiResult::good(Bytes::from(buf)))
    }

    async fn write(&self, cmd: &ScsiCommand, lba: u64, n: u64, fua: bool, bs: u64) -> CmdResult {
        self.check_range(lba, n)?;
        if n == 0 {
            return good_empty();
        }
        let bytes = self.check_xfer(n, bs)? as usize;
        let force_fua = self.check_writable()?;
        let avail = cmd.data_out.len();
        let data = if avail >= bytes {
            &cmd.data_out[..bytes]
        } else if (avail as u64).checked_rem(bs) == Some(0) {
            &cmd.data_out[..]
        } else {
            return Err(Sense::INVALID_FIELD_IN_IU.into());
        };
        if data.is_empty() {
            return good_empty();
        }
        let fua = fua || force_fua;
        let _g = self.io_lock.read().await;
        self.dev.write(lba, data, fua).await?;
        good_empty()
    }

    async fn verify(&self, cmd: &ScsiCommand, lba: u64, n: u64, bytchk: u8, bs: u64) -> CmdResult {
        if bytchk == 2 {
            return Err(invalid_cdb());
        }
        self.check_range(lba, n)?;
        if n == 0 {
            return good_empty();
        }
        let bytes = self.check_xfer(n, bs)? as usize;
        let need = match bytchk {
            0 => 0,
            1 => bytes,
            _ => bs as usize,
        };
        if cmd.data_out.len() != need {
            return Err(Sense::INVALID_FIELD_IN_IU.into());
        }
        let mut buf = vec![0u8; bytes];
        self.dev.read(lba, &mut buf).await?;
        let expect = &cmd.data_out[..];
        let mismatch = match bytchk {
            0 => None,
            1 => first_diff(&buf, expect),
            _ => buf
                .chunks(bs as usize)
                .enumerate()
                .find_map(|(i, blk)| first_diff(blk, expect).map(|o| i * bs as usize + o)),
        };
        match mismatch {
            Some(off) => Err(Fail::CheckInfo(Sense::MISCOMPARE, off as u64)),
            None => good_empty(),
        }
    }

    async fn write_same(&self, cmd: &ScsiCommand, c: &[u8; 16], bs: u64) -> CmdResult {
        let sixteen = c[0] == 0x93;
        let (lba, n) = if sixteen {
            (be(c, 2, 8), be(c, 10, 4))
        } else {
            (be(c, 2, 4), be(c, 7, 2))
        };
        let anchor = c[1] & 0x10 != 0;
        let unmap = c[1] & 0x08 != 0;
        let ndob = sixteen && c[1] & 0x01 != 0;
        // UNMAP needs a thin device (LBPWS/LBPWS10 are only set then).
        // PBDATA/LBDATA (bits 2, 1) are not supported.
        if c[1] & 0xe6 != 0 || anchor || (unmap && !self.dev.thin()) {
            return Err(invalid_cdb());
        }
        self.check_range(lba, n)?;
        if n == 0 || n > MAX_WRITE_SAME {
            return Err(invalid_cdb());
        }
        let need = if ndob { 0 } else { bs as usize };
        if cmd.data_out.len() != need {
            return Err(Sense::INVALID_FIELD_IN_IU.into());
        }
        let force_fua = self.check_writable()?;
        let _g = self.io_lock.read().await;
        if unmap {
            self.dev.unmap(lba, n).await?;
            return good_empty();
        }
        let per = (WRITE_SAME_CHUNK_BYTES / bs.max(1)).clamp(1, n);
        let mut buf = Vec::with_capacity((per * bs) as usize);
        for _ in 0..per {
            if ndob {
                buf.resize(buf.len() + bs as usize, 0);
            } else {
                buf.extend_from_slice(&cmd.data_out);
            }
        }
        let fua = force_fua;
        let mut cur = lba;
        let end = lba + n;
        while cur < end {
            let k = per.min(end - cur);
            let chunk = buf.get(..(k * bs) as usize).unwrap_or(&buf);
            self.dev.write(cur, chunk, fua).await?;
            cur += k;
        }
        good_empty()
    }

    async fn unmap(&self, cmd: &ScsiCommand, c: &[u8; 16]) -> CmdResult {
        if !self.dev.thin() {
            return Err(Sense::INVALID_OPCODE.into());
        }
        if c[1] & 0x01 != 0 {
            return Err(invalid_cdb()); // ANCHOR: anchored state not supported
        }
        let len = be(c, 7, 2) as usize;
        if len == 0 {
            return good_empty();
        }
        let p = cmd.data_out.get(..len).unwrap_or(&cmd.data_out[..]);
        if p.len() < 8 {
            return Err(Sense::PARAM_LIST_LENGTH.into());
        }
        let bd_len = (be_param(p, 2, 2) as usize).min(p.len() - 8) / 16;
        if bd_len > MAX_UNMAP_DESCRIPTORS {
            return Err(Sense::INVALID_FIELD_IN_PARAM.into());
        }
        let mut ranges = Vec::with_capacity(bd_len);
        for i in 0..bd_len {
            let o = 8 + 16 * i;
            let lba = be_param(p, o, 8);
            let n = be_param(p, o + 8, 4);
            if n > MAX_UNMAP_LBA_COUNT {
                return Err(Sense::INVALID_FIELD_IN_PARAM.into());
            }
            self.check_range(lba, n)?;
            if n > 0 {
                ranges.push((lba, n));
            }
        }
        self.check_writable()?;
        let _g = self.io_lock.read().await;
        for (lba, n) in ranges {
            self.dev.unmap(lba, n).await?;
        }
        good_empty()
    }

    async fn compare_and_write(&self, cmd: &ScsiCommand, c: &[u8; 16], bs: u64) -> CmdResult {
        if c[1] & 0xe0 != 0 {
            return Err(invalid_cdb());
        }
        let lba = be(c, 2, 8);
        let n = be(c, 13, 1);
        if n > MAX_COMPARE_AND_WRITE {
            return Err(invalid_cdb());
        }
        self.check_range(lba, n)?;
        if n == 0 {
            // Nothing to compare; Data-Out sent anyway contradicts the CDB.
            if !cmd.data_out.is_empty() {
                return Err(invalid_cdb());
            }
            return good_empty();
        }
        let bytes = (n * bs) as usize;
        if cmd.data_out.len() != 2 * bytes {
            return Err(Sense::INVALID_FIELD_IN_IU.into());
        }
        let force_fua = self.check_writable()?;
        let (verify, write) = cmd.data_out.split_at(bytes);
        let fua = c[1] & 0x08 != 0 || force_fua;
        let _g = self.io_lock.write().await;
        let mut buf = vec![0u8; bytes];
        self.dev.read(lba, &mut buf).await?;
        if let Some(off) = first_diff(&buf, verify) {
            return Err(Fail::CheckInfo(Sense::MISCOMPARE, off as u64));
        }
        self.dev.write(lba, write, fua).await?;
        good_empty()
    }
}

fn push_name_designator(d: &mut Vec<u8>, piv_assoc_type: u8, name: &[u8]) {
    // NUL terminated, padded to a multiple of 4, at most 252 bytes.
    let name = name.get(..247.min(name.len())).unwrap_or(name);
    let len = (name.len() + 1 + 3) & !3;
    d.extend_from_slice(&[0x53, piv_assoc_type, 0x00, len as u8]);
    d.extend_from_slice(name);
    d.resize(d.len() + (len - name.len()), 0);
}

fn verify_bytes(b1: u8, n: u64, bs: u64) -> u64 {
    match (b1 >> 1) & 3 {
        1 => n * bs,
        3 => bs,
        _ => 0,
    }
}

/// LBA and transfer length of a 10/12/16-byte READ/WRITE/VERIFY-like CDB.
fn lba_len(op: u8, c: &[u8; 16]) -> (u64, u64) {
    match op >> 5 {
        1 | 2 => (be(c, 2, 4), be(c, 7, 2)),
        5 => (be(c, 2, 4), be(c, 6, 4)),
        _ => (be(c, 2, 8), be(c, 10, 4)),
    }
}

fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or(if a.len() != b.len() {
            Some(a.len().min(b.len()))
        } else {
            None
        })
}

/// REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS.
fn report_tmfs(c: &[u8; 16]) -> CmdResult {
    let repd = c[2] & 0x80 != 0;
    let alloc = be(c, 6, 4) as usize;
    // ABORT TASK, ABORT TASK SET, CLEAR TASK SET, LU RESET, TARGET RESET.
    let mut d = vec![0xc0 | 0x10 | 0x08 | 0x02, 0, 0, 0];
    if repd {
        d[3] = 0x0c;
        d.resize(16, 0);
    }
    good(d, alloc)
}

/// The LUNs of one target.
#[derive(Default, Clone)]
pub struct LunTable {
    luns: BTreeMap<u64, Arc<LogicalUnit>>,
}

impl LunTable {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn insert(&mut self, lun: u64, lu: Arc<LogicalUnit>) {
        self.luns.insert(lun, lu);
    }
    pub fn remove(&mut self, lun: u64) -> Option<Arc<LogicalUnit>> {
        self.luns.remove(&lun)
    }
    pub fn get(&self, lun: u64) -> Option<&Arc<LogicalUnit>> {
        self.luns.get(&lun)
    }
    pub fn iter(&self) -> impl Iterator<Item = (u64, &Arc<LogicalUnit>)> {
        self.luns.iter().map(|(k, v)| (*k, v))
    }
    /// Execute a command. `visible` says which LUNs this nexus may see (LUN
    /// masking): REPORT LUNS lists only those, and others behave as absent.
    pub async fn execute(
        &self,
        cmd: &ScsiCommand,
        visible: &(dyn Fn(u64) -> bool + Sync),
    ) -> ScsiResult {
        let op = cmd.cdb.first().copied().unwrap_or(0xff);
        if op == 0xa0 {
            return self.report_luns(cmd, visible);
        }
        match self.luns.get(&cmd.lun) {
            Some(lu) if visible(cmd.lun) => lu.execute(cmd).await,
            _ => absent_lun(cmd),
        }
    }

    fn report_luns(&self, cmd: &ScsiCommand, visible: &(dyn Fn(u64) -> bool + Sync)) -> ScsiResult {
        let mut c = [0u8; 16];
        for (d, s) in c.iter_mut().zip(&cmd.cdb[..]) {
            *d = *s;
        }
        if cmd.cdb.len() < 12 {
            return ScsiResult::check(Sense::INVALID_FIELD_IN_CDB);
        }
        let alloc = be(&c, 6, 4) as usize;
        let mut d = vec![0u8; 8];
        match c[2] {
            0x00 | 0x02 => {
                for (lun, _) in self.luns.iter().filter(|(l, _)| visible(**l)) {
                    d.extend_from_slice(&spc::encode_lun(*lun));
                }
            }
            0x01 => {} // no well-known LUNs
            _ => return ScsiResult::check(Sense::INVALID_FIELD_IN_CDB),
        }
        let l = (d.len() - 8) as u32;
        d[..4].copy_from_slice(&l.to_be_bytes());
        d.truncate(alloc);
        ScsiResult::good(Bytes::from(d))
    }
}

/// A command to a LUN that does not exist (or is masked): INQUIRY reports
/// peripheral qualifier 011b, REQUEST SENSE reports LOGICAL UNIT NOT
/// SUPPORTED as data, anything else fails with it.
fn absent_lun(cmd: &ScsiCommand) -> ScsiResult {
    let mut c = [0u8; 16];
    for (d, s) in c.iter_mut().zip(&cmd.cdb[..]) {
        *d = *s;
    }
    match c[0] {
        0x12 => {
            let alloc = be(&c, 3, 2) as usize;
            let mut d = if c[1] & 1 == 0 {
                if c[2] != 0 {
                    return ScsiResult::check(Sense::INVALID_FIELD_IN_CDB);
                }
                spc::standard_inquiry(&LuConfig::default(), 0x7f)
            } else if c[2] == 0 {
                vec![0x7f, 0x00, 0x00, 0x01, 0x00]
            } else {
                return ScsiResult::check(Sense::INVALID_FIELD_IN_CDB);
            };
            d.truncate(alloc);
            ScsiResult::good(Bytes::from(d))
        }
        0x03 => {
            let alloc = c[4] as usize;
            let s = Sense::LUN_NOT_SUPPORTED;
            let d = if c[1] & 1 != 0 {
                s.to_descriptor(None)
            } else {
                s.to_fixed()
            };
            ScsiResult::good(d.slice(..alloc.min(d.len())))
        }
        _ => ScsiResult::check(Sense::LUN_NOT_SUPPORTED),
    }
}
