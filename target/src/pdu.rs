//! iSCSI PDUs (RFC 7143 section 11).
//!
//! A [`Pdu`] is the 48-byte Basic Header Segment kept as raw bytes plus the
//! additional header segments and the data segment. Every field is reached
//! through typed accessors at the offsets of section 11, so decoding never
//! fails on field values: the codec only checks framing, and the connection
//! layer validates semantics (and answers with a Reject where it must).

use bytes::Bytes;

/// Length of the Basic Header Segment.
pub const BHS_LEN: usize = 48;

/// Initiator opcodes (section 11.1.1).
pub mod op {
    pub const NOP_OUT: u8 = 0x00;
    pub const SCSI_COMMAND: u8 = 0x01;
    pub const TASK_MGMT_REQ: u8 = 0x02;
    pub const LOGIN_REQ: u8 = 0x03;
    pub const TEXT_REQ: u8 = 0x04;
    pub const DATA_OUT: u8 = 0x05;
    pub const LOGOUT_REQ: u8 = 0x06;
    pub const SNACK: u8 = 0x10;
    // Target opcodes.
    pub const NOP_IN: u8 = 0x20;
    pub const SCSI_RESPONSE: u8 = 0x21;
    pub const TASK_MGMT_RESP: u8 = 0x22;
    pub const LOGIN_RESP: u8 = 0x23;
    pub const TEXT_RESP: u8 = 0x24;
    pub const DATA_IN: u8 = 0x25;
    pub const LOGOUT_RESP: u8 = 0x26;
    pub const R2T: u8 = 0x31;
    pub const ASYNC_MSG: u8 = 0x32;
    pub const REJECT: u8 = 0x3f;

    /// Vendor-specific initiator opcodes (0x1c..=0x1e).
    pub fn is_vendor_initiator(op: u8) -> bool {
        (0x1c..=0x1e).contains(&op)
    }
}

/// Reject reasons (section 11.17.1).
pub mod reject {
    pub const DATA_DIGEST_ERROR: u8 = 0x02;
    pub const SNACK_REJECT: u8 = 0x03;
    pub const PROTOCOL_ERROR: u8 = 0x04;
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x05;
    pub const IMMEDIATE_COMMAND_REJECT: u8 = 0x06;
    pub const TASK_IN_PROGRESS: u8 = 0x07;
    pub const INVALID_DATA_ACK: u8 = 0x08;
    pub const INVALID_PDU_FIELD: u8 = 0x09;
    pub const LONG_OP_REJECT: u8 = 0x0a;
    pub const WAITING_FOR_LOGOUT: u8 = 0x0c;
}

/// Task management functions (section 11.5.1) and responses (11.6.1).
pub mod tmf {
    pub const ABORT_TASK: u8 = 1;
    pub const ABORT_TASK_SET: u8 = 2;
    pub const CLEAR_ACA: u8 = 3;
    pub const CLEAR_TASK_SET: u8 = 4;
    pub const LOGICAL_UNIT_RESET: u8 = 5;
    pub const TARGET_WARM_RESET: u8 = 6;
    pub const TARGET_COLD_RESET: u8 = 7;
    pub const TASK_REASSIGN: u8 = 8;

    pub const FUNCTION_COMPLETE: u8 = 0;
    pub const TASK_DOES_NOT_EXIST: u8 = 1;
    pub const LUN_DOES_NOT_EXIST: u8 = 2;
    pub const TASK_STILL_ALLEGIANT: u8 = 3;
    pub const REASSIGNMENT_NOT_SUPPORTED: u8 = 4;
    pub const NOT_SUPPORTED: u8 = 5;
    pub const AUTHORIZATION_FAILED: u8 = 6;
    pub const REJECTED: u8 = 255;
}

/// Async events (section 11.9.1).
pub mod async_event {
    pub const SCSI_EVENT: u8 = 0;
    pub const LOGOUT_REQUEST: u8 = 1;
    pub const CONNECTION_DROP: u8 = 2;
    pub const SESSION_DROP: u8 = 3;
    pub const NEGOTIATION_REQUEST: u8 = 4;
}

/// The reserved tag value.
pub const RESERVED_TAG: u32 = 0xffff_ffff;

/// One PDU: header, AHS and data segment (without padding or digests).
#[derive(Clone, PartialEq, Eq)]
pub struct Pdu {
    pub bhs: [u8; BHS_LEN],
    /// Additional header segments, raw (a multiple of 4 bytes).
    pub ahs: Bytes,
    pub data: Bytes,
}

impl std::fmt::Debug for Pdu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pdu")
            .field("opcode", &format_args!("{:#04x}", self.opcode()))
            .field("itt", &format_args!("{:#010x}", self.itt()))
            .field("ahs_len", &self.ahs.len())
            .field("data_len", &self.data.len())
            .finish()
    }
}

fn be32(b: &[u8; BHS_LEN], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl Pdu {
    /// A target PDU with `opcode` and the F bit set, everything else zero.
    pub fn new(opcode: u8) -> Self {
        let mut bhs = [0u8; BHS_LEN];
        bhs[0] = opcode & 0x3f;
        bhs[1] = 0x80;
        Pdu {
            bhs,
            ahs: Bytes::new(),
            data: Bytes::new(),
        }
    }

    pub fn u32_at(&self, at: usize) -> u32 {
        be32(&self.bhs, at)
    }
    pub fn set_u32(&mut self, at: usize, v: u32) {
        self.bhs[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }
    pub fn u16_at(&self, at: usize) -> u16 {
        u16::from_be_bytes([self.bhs[at], self.bhs[at + 1]])
    }
    pub fn set_u16(&mut self, at: usize, v: u16) {
        self.bhs[at..at + 2].copy_from_slice(&v.to_be_bytes());
    }

    pub fn opcode(&self) -> u8 {
        self.bhs[0] & 0x3f
    }
    /// The I (immediate delivery) bit of initiator PDUs.
    pub fn immediate(&self) -> bool {
        self.bhs[0] & 0x40 != 0
    }
    /// The F (final) bit.
    pub fn final_bit(&self) -> bool {
        self.bhs[1] & 0x80 != 0
    }
    pub fn flags(&self) -> u8 {
        self.bhs[1]
    }
    pub fn set_flags(&mut self, f: u8) {
        self.bhs[1] = f;
    }
    /// TotalAHSLength in bytes, as declared in the header.
    pub fn total_ahs_len(&self) -> usize {
        self.bhs[4] as usize * 4
    }
    /// DataSegmentLength as declared in the header.
    pub fn data_segment_len(&self) -> usize {
        ((self.bhs[5] as usize) << 16) | ((self.bhs[6] as usize) << 8) | self.bhs[7] as usize
    }
    /// Write TotalAHSLength and DataSegmentLength from `ahs` and `data`.
    pub fn fix_lengths(&mut self) {
        self.bhs[4] = (self.ahs.len() / 4) as u8;
        let n = self.data.len() as u32;
        self.bhs[5] = (n >> 16) as u8;
        self.bhs[6] = (n >> 8) as u8;
        self.bhs[7] = n as u8;
    }
    /// Raw 8-byte LUN field.
    pub fn lun_raw(&self) -> u64 {
        u64::from_be_bytes([
            self.bhs[8],
            self.bhs[9],
            self.bhs[10],
            self.bhs[11],
            self.bhs[12],
            self.bhs[13],
            self.bhs[14],
            self.bhs[15],
        ])
    }
    pub fn set_lun_raw(&mut self, lun: u64) {
        self.bhs[8..16].copy_from_slice(&lun.to_be_bytes());
    }
    /// The LUN number from single-level peripheral (00b) or flat (01b)
    /// addressing; `None` for other address methods.
    pub fn lun(&self) -> Option<u64> {
        decode_lun(self.lun_raw())
    }
    pub fn itt(&self) -> u32 {
        self.u32_at(16)
    }
    pub fn set_itt(&mut self, v: u32) {
        self.set_u32(16, v)
    }
    /// TTT (NOP, Data-Out, Text, R2T, Data-In) / Referenced Task Tag (TMF).
    pub fn ttt(&self) -> u32 {
        self.u32_at(20)
    }
    pub fn set_ttt(&mut self, v: u32) {
        self.set_u32(20, v)
    }
    /// CmdSN of initiator PDUs / StatSN of target PDUs (offset 24).
    pub fn cmd_sn(&self) -> u32 {
        self.u32_at(24)
    }
    pub fn stat_sn(&self) -> u32 {
        self.u32_at(24)
    }
    pub fn set_stat_sn(&mut self, v: u32) {
        self.set_u32(24, v)
    }
    /// ExpStatSN of initiator PDUs / ExpCmdSN of target PDUs (offset 28).
    pub fn exp_stat_sn(&self) -> u32 {
        self.u32_at(28)
    }
    pub fn set_exp_cmd_sn(&mut self, v: u32) {
        self.set_u32(28, v)
    }
    pub fn set_max_cmd_sn(&mut self, v: u32) {
        self.set_u32(32, v)
    }

    // --- SCSI Command (11.3) ---
    pub fn cmd_read(&self) -> bool {
        self.bhs[1] & 0x40 != 0
    }
    pub fn cmd_write(&self) -> bool {
        self.bhs[1] & 0x20 != 0
    }
    pub fn cmd_attr(&self) -> u8 {
        self.bhs[1] & 0x07
    }
    /// Expected Data Transfer Length.
    pub fn edtl(&self) -> u32 {
        self.u32_at(20)
    }
    pub fn cdb(&self) -> &[u8] {
        &self.bhs[32..48]
    }

    // --- Data-Out (11.7) / Data-In (11.8) ---
    pub fn data_sn(&self) -> u32 {
        self.u32_at(36)
    }
    pub fn buffer_offset(&self) -> u32 {
        self.u32_at(40)
    }

    // --- TMF request (11.5) ---
    pub fn tmf_function(&self) -> u8 {
        self.bhs[1] & 0x7f
    }
    pub fn ref_cmd_sn(&self) -> u32 {
        self.u32_at(32)
    }

    // --- Login (11.12) ---
    pub fn isid(&self) -> [u8; 6] {
        [
            self.bhs[8],
            self.bhs[9],
            self.bhs[10],
            self.bhs[11],
            self.bhs[12],
            self.bhs[13],
        ]
    }
    pub fn tsih(&self) -> u16 {
        self.u16_at(14)
    }
    pub fn cid(&self) -> u16 {
        self.u16_at(20)
    }

    // --- Logout (11.14) ---
    pub fn logout_reason(&self) -> u8 {
        self.bhs[1] & 0x7f
    }
}

/// Decode an 8-byte SAM LUN in peripheral (00b) or flat (01b) addressing.
pub fn decode_lun(raw: u64) -> Option<u64> {
    let b = raw.to_be_bytes();
    if b[2..].iter().any(|&x| x != 0) {
        return None;
    }
    match b[0] >> 6 {
        0 if b[0] == 0 => Some(b[1] as u64),
        0 => None,
        1 => Some((((b[0] & 0x3f) as u64) << 8) | b[1] as u64),
        _ => None,
    }
}

/// Encode a LUN number as an 8-byte SAM LUN (peripheral below 256, flat above).
pub fn encode_lun(lun: u64) -> u64 {
    let mut b = [0u8; 8];
    if lun < 256 {
        b[1] = lun as u8;
    } else {
        b[0] = 0x40 | ((lun >> 8) & 0x3f) as u8;
        b[1] = lun as u8;
    }
    u64::from_be_bytes(b)
}

/// Serial number arithmetic (RFC 1982, 32 bits): `a < b`.
pub fn sn_lt(a: u32, b: u32) -> bool {
    a != b && b.wrapping_sub(a) < 0x8000_0000
}

/// `a <= b` in serial number arithmetic.
pub fn sn_le(a: u32, b: u32) -> bool {
    a == b || sn_lt(a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lun_round_trip() {
        for lun in [0u64, 1, 255, 256, 1000, 16383] {
            assert_eq!(decode_lun(encode_lun(lun)), Some(lun), "lun {lun}");
        }
        assert_eq!(decode_lun(0x0001_0000_0000_0000), Some(1));
        assert_eq!(decode_lun(0x8001_0000_0000_0000), None);
        assert_eq!(decode_lun(0x0001_0000_0000_0001), None);
    }

    #[test]
    fn serial_arithmetic_wraps() {
        assert!(sn_lt(1, 2));
        assert!(sn_lt(0xffff_fffe, 1));
        assert!(!sn_lt(1, 0xffff_fffe));
        assert!(sn_le(5, 5));
        assert!(!sn_lt(5, 5));
    }

    #[test]
    fn lengths_are_written_from_segments() {
        let mut p = Pdu::new(op::DATA_IN);
        p.data = Bytes::from(vec![1u8; 0x012345]);
        p.ahs = Bytes::from(vec![0u8; 8]);
        p.fix_lengths();
        assert_eq!(p.data_segment_len(), 0x012345);
        assert_eq!(p.total_ahs_len(), 8);
    }
}
