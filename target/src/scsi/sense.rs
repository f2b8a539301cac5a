//! Sense data (SPC-4 section 4.5).

use bytes::Bytes;

/// Sense key, additional sense code and qualifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
}

/// Sense keys (SPC-4 table 48).
pub mod key {
    pub const NO_SENSE: u8 = 0x0;
    pub const NOT_READY: u8 = 0x2;
    pub const MEDIUM_ERROR: u8 = 0x3;
    pub const HARDWARE_ERROR: u8 = 0x4;
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    pub const UNIT_ATTENTION: u8 = 0x6;
    pub const DATA_PROTECT: u8 = 0x7;
    pub const ABORTED_COMMAND: u8 = 0xb;
    pub const MISCOMPARE: u8 = 0xe;
}

impl Sense {
    pub const fn new(key: u8, asc: u8, ascq: u8) -> Self {
        Sense { key, asc, ascq }
    }

    /// NO SENSE / NO ADDITIONAL SENSE INFORMATION.
    pub const NO_SENSE: Sense = Sense::new(key::NO_SENSE, 0x00, 0x00);
    /// ILLEGAL REQUEST / INVALID COMMAND OPERATION CODE.
    pub const INVALID_OPCODE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x20, 0x00);
    /// ILLEGAL REQUEST / LOGICAL BLOCK ADDRESS OUT OF RANGE.
    pub const LBA_OUT_OF_RANGE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x21, 0x00);
    /// ILLEGAL REQUEST / INVALID FIELD IN CDB.
    pub const INVALID_FIELD_IN_CDB: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x24, 0x00);
    /// ILLEGAL REQUEST / LOGICAL UNIT NOT SUPPORTED.
    pub const LUN_NOT_SUPPORTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x25, 0x00);
    /// ILLEGAL REQUEST / INVALID FIELD IN PARAMETER LIST.
    pub const INVALID_FIELD_IN_PARAM: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x00);
    /// ILLEGAL REQUEST / PARAMETER LIST LENGTH ERROR.
    pub const PARAM_LIST_LENGTH: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x1a, 0x00);
    /// ILLEGAL REQUEST / SAVING PARAMETERS NOT SUPPORTED.
    pub const SAVING_NOT_SUPPORTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x39, 0x00);
    /// ILLEGAL REQUEST / INVALID FIELD IN INFORMATION UNIT (Data-Out size
    /// does not match what the CDB requires).
    pub const INVALID_FIELD_IN_IU: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x0e, 0x03);
    /// ILLEGAL REQUEST / MEDIUM REMOVAL PREVENTED.
    pub const REMOVAL_PREVENTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x53, 0x02);
    /// MISCOMPARE / MISCOMPARE DURING VERIFY OPERATION.
    pub const MISCOMPARE: Sense = Sense::new(key::MISCOMPARE, 0x1d, 0x00);
    /// MEDIUM ERROR / UNRECOVERED READ ERROR.
    pub const READ_ERROR: Sense = Sense::new(key::MEDIUM_ERROR, 0x11, 0x00);
    /// MEDIUM ERROR / WRITE ERROR.
    pub const WRITE_ERROR: Sense = Sense::new(key::MEDIUM_ERROR, 0x0c, 0x00);
    /// DATA PROTECT / SPACE ALLOCATION FAILED WRITE PROTECT.
    pub const NO_SPACE: Sense = Sense::new(key::DATA_PROTECT, 0x27, 0x07);
    /// DATA PROTECT / WRITE PROTECTED.
    pub const WRITE_PROTECTED: Sense = Sense::new(key::DATA_PROTECT, 0x27, 0x00);
    /// NOT READY / LOGICAL UNIT IS IN PROCESS OF BECOMING READY.
    pub const BECOMING_READY: Sense = Sense::new(key::NOT_READY, 0x04, 0x01);
    /// NOT READY / LOGICAL UNIT NOT READY, INITIALIZING COMMAND REQUIRED.
    pub const NOT_READY_STOPPED: Sense = Sense::new(key::NOT_READY, 0x04, 0x02);
    /// HARDWARE ERROR / INTERNAL TARGET FAILURE.
    pub const INTERNAL_FAILURE: Sense = Sense::new(key::HARDWARE_ERROR, 0x44, 0x00);
    /// UNIT ATTENTION / POWER ON, RESET, OR BUS DEVICE RESET OCCURRED.
    pub const UA_POWER_ON: Sense = Sense::new(key::UNIT_ATTENTION, 0x29, 0x00);
    /// UNIT ATTENTION / SCSI BUS RESET OCCURRED (target warm reset).
    pub const UA_BUS_RESET: Sense = Sense::new(key::UNIT_ATTENTION, 0x29, 0x02);
    /// UNIT ATTENTION / BUS DEVICE RESET FUNCTION OCCURRED (LU reset).
    pub const UA_DEVICE_RESET: Sense = Sense::new(key::UNIT_ATTENTION, 0x29, 0x03);
    /// UNIT ATTENTION / MODE PARAMETERS CHANGED.
    pub const UA_MODE_CHANGED: Sense = Sense::new(key::UNIT_ATTENTION, 0x2a, 0x01);
    /// UNIT ATTENTION / CAPACITY DATA HAS CHANGED.
    pub const UA_CAPACITY_CHANGED: Sense = Sense::new(key::UNIT_ATTENTION, 0x2a, 0x09);
    /// UNIT ATTENTION / REPORTED LUNS DATA HAS CHANGED.
    pub const UA_LUNS_CHANGED: Sense = Sense::new(key::UNIT_ATTENTION, 0x3f, 0x0e);

    /// Fixed-format sense data (response code 0x70), 18 bytes.
    pub fn to_fixed(&self) -> Bytes {
        Bytes::from(self.fixed_bytes(None).to_vec())
    }

    /// Fixed-format sense data with the VALID bit and the INFORMATION field
    /// set (e.g. the miscompare offset). Values above `u32::MAX` saturate.
    pub fn to_fixed_with_info(&self, info: u64) -> Bytes {
        Bytes::from(self.fixed_bytes(Some(info)).to_vec())
    }

    fn fixed_bytes(&self, info: Option<u64>) -> [u8; 18] {
        let mut b = [0u8; 18];
        b[0] = 0x70;
        b[2] = self.key & 0x0f;
        if let Some(info) = info {
            b[0] |= 0x80;
            let v = u32::try_from(info).unwrap_or(u32::MAX);
            b[3..7].copy_from_slice(&v.to_be_bytes());
        }
        b[7] = 10;
        b[12] = self.asc;
        b[13] = self.ascq;
        b
    }

    /// Descriptor-format sense data (response code 0x72), with an
    /// information descriptor when `info` is given.
    pub fn to_descriptor(&self, info: Option<u64>) -> Bytes {
        let mut b = Vec::with_capacity(20);
        b.extend_from_slice(&[0x72, self.key & 0x0f, self.asc, self.ascq, 0, 0, 0, 0]);
        if let Some(info) = info {
            b.extend_from_slice(&[0x00, 0x0a, 0x80, 0x00]);
            b.extend_from_slice(&info.to_be_bytes());
            b[7] = 12;
        }
        Bytes::from(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_layout() {
        let s = Sense::INVALID_FIELD_IN_CDB.to_fixed();
        assert_eq!(s.len(), 18);
        assert_eq!(&s[..3], &[0x70, 0, 5]);
        assert_eq!(s[7], 10);
        assert_eq!((s[12], s[13]), (0x24, 0));
    }

    #[test]
    fn fixed_with_info() {
        let s = Sense::MISCOMPARE.to_fixed_with_info(0x1234);
        assert_eq!(s[0], 0xf0);
        assert_eq!(&s[3..7], &[0, 0, 0x12, 0x34]);
        assert_eq!(s[2], 0x0e);
    }

    #[test]
    fn descriptor_layout() {
        let s = Sense::MISCOMPARE.to_descriptor(Some(7));
        assert_eq!(&s[..4], &[0x72, 0x0e, 0x1d, 0]);
        assert_eq!(s[7] as usize, s.len() - 8);
        assert_eq!(s[8], 0);
        assert_eq!(s[19], 7);
        assert_eq!(Sense::NO_SENSE.to_descriptor(None).len(), 8);
    }
}
