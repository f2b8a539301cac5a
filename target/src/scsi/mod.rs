//! The SCSI command engine (SPC-4 / SBC-3) over a [`BlockDevice`].
//!
//! The engine knows nothing of iSCSI: the transport hands it a
//! [`ScsiCommand`] with the whole Data-Out buffer already collected and gets a
//! [`ScsiResult`] back (status, sense, Data-In). Per-LU state (unit
//! attentions, reservations, mode pages) lives in [`LogicalUnit`]; the
//! LUN table, REPORT LUNS and commands to absent LUNs in [`LunTable`].

pub mod device;
pub mod engine;
pub mod mem_device;
pub mod pr;
pub mod sense;
mod spc;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use bytes::Bytes;

pub use device::{BlockDevice, DeviceError, DeviceIdentity};
pub use engine::{LogicalUnit, LuConfig, LunTable};
pub use mem_device::MemDevice;
pub use sense::Sense;

/// SCSI status codes (SAM-5).
pub mod status {
    pub const GOOD: u8 = 0x00;
    pub const CHECK_CONDITION: u8 = 0x02;
    pub const CONDITION_MET: u8 = 0x04;
    pub const BUSY: u8 = 0x08;
    pub const RESERVATION_CONFLICT: u8 = 0x18;
    pub const TASK_SET_FULL: u8 = 0x28;
    pub const ACA_ACTIVE: u8 = 0x30;
    pub const TASK_ABORTED: u8 = 0x40;
}

/// Task attribute from the SCSI Command PDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TaskAttr {
    Untagged,
    #[default]
    Simple,
    Ordered,
    HeadOfQueue,
    Aca,
}

/// Identifies an I_T nexus: which initiator port talks through which target
/// port. Unit attentions and reservations are kept per nexus.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Nexus {
    /// iSCSI initiator name (IQN/EUI), e.g. `iqn.2005-03.org.open-iscsi:abc`.
    pub initiator_name: Arc<str>,
    /// ISID of the session, which with the name forms the initiator port
    /// (`<name>,i,0x<isid>`).
    pub isid: [u8; 6],
    /// Target port: target name and portal group tag (`<name>,t,0x<tpgt>`).
    pub target_name: Arc<str>,
    pub tpgt: u16,
}

impl Nexus {
    /// SCSI initiator port name, `<iqn>,i,0x<isid hex>` (RFC 7143 section 4.2.7).
    pub fn initiator_port(&self) -> String {
        format!("{},i,0x{}", self.initiator_name, hex::encode(self.isid))
    }
    /// SCSI target port name, `<iqn>,t,0x<tpgt hex>`.
    pub fn target_port(&self) -> String {
        format!("{},t,0x{:04x}", self.target_name, self.tpgt)
    }
}

/// One SCSI command as the transport hands it over.
#[derive(Debug, Clone)]
pub struct ScsiCommand {
    /// The CDB (16 bytes from the BHS, or longer with an extended-CDB AHS).
    /// Only the bytes the opcode defines are meaningful.
    pub cdb: Bytes,
    /// Decoded LUN (flat/peripheral addressing, 0..=16383).
    pub lun: u64,
    pub nexus: Arc<Nexus>,
    pub attr: TaskAttr,
    /// Expected Data Transfer Length for Data-In (0 for writes/no data).
    pub expected_data_in: u32,
    /// Data-Out as received (may be shorter or longer than the CDB implies;
    /// the engine checks).
    pub data_out: Bytes,
    /// The transport's policy write-protects this LU for this I_T nexus
    /// (a read-only export): MODE SENSE reports WP, commands that would
    /// change the medium or the LU's mode pages fail with DATA PROTECT /
    /// WRITE PROTECTED, and so do reservations that would restrict the
    /// LU's writers (RESERVE(6)/(10); PERSISTENT RESERVE OUT RESERVE,
    /// PREEMPT, PREEMPT AND ABORT, CLEAR, REGISTER AND MOVE, and RELEASE of
    /// an all-registrants reservation; see
    /// `pr::Reservations::refuses_write_protected`); reads, its own
    /// registration and releasing what it holds alone are unaffected.
    pub write_protected: bool,
}

/// What the engine answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiResult {
    pub status: u8,
    /// Fixed-format sense data (no length prefix) when status is CHECK CONDITION.
    pub sense: Option<Bytes>,
    /// Data-In. May be longer than the Expected Data Transfer Length; the
    /// transport truncates and reports the residual overflow.
    pub data_in: Bytes,
}

impl ScsiResult {
    pub fn good(data_in: Bytes) -> Self {
        ScsiResult {
            status: status::GOOD,
            sense: None,
            data_in,
        }
    }
    pub fn check(sense: Sense) -> Self {
        ScsiResult {
            status: status::CHECK_CONDITION,
            sense: Some(sense.to_fixed()),
            data_in: Bytes::new(),
        }
    }
    pub fn status(status: u8) -> Self {
        ScsiResult {
            status,
            sense: None,
            data_in: Bytes::new(),
        }
    }
}
