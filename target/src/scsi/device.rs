//! The block-device trait the engine runs on.

use async_trait::async_trait;

/// Errors a block device reports. Each maps to specific sense data.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Unrecoverable read: MEDIUM ERROR / UNRECOVERED READ ERROR.
    #[error("read error: {0}")]
    Read(std::io::Error),
    /// Write failed: MEDIUM ERROR / WRITE ERROR.
    #[error("write error: {0}")]
    Write(std::io::Error),
    /// Backing store is full: DATA PROTECT / SPACE ALLOCATION FAILED WRITE PROTECT.
    #[error("no space left on the backing store")]
    NoSpace,
    /// Temporarily unable to serve (e.g. replicas unreachable): NOT READY.
    #[error("device unavailable: {0}")]
    Unavailable(String),
    /// Any other failure: HARDWARE ERROR / INTERNAL TARGET FAILURE.
    #[error("device error: {0}")]
    Other(String),
}

/// Stable identity of the device, shown in VPD pages 0x80 and 0x83 so a host
/// can prove which volume a device is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceIdentity {
    /// Unit serial number (VPD 0x80), printable ASCII.
    pub serial: String,
    /// NAA IEEE Registered Extended identifier (type 6, 16 bytes) for VPD 0x83.
    pub naa: [u8; 16],
}

/// A device of `num_blocks()` logical blocks of `block_size()` bytes.
///
/// All offsets are in logical blocks; buffers are whole blocks. Calls may
/// run concurrently. Implementations must not panic on any argument: the
/// engine has already range-checked, but must not rely on it.
#[async_trait]
pub trait BlockDevice: Send + Sync + 'static {
    fn block_size(&self) -> u32;
    /// Current capacity; it may grow while the device is in use (online
    /// resize), which the engine reports as a CAPACITY DATA HAS CHANGED unit
    /// attention.
    fn num_blocks(&self) -> u64;
    fn identity(&self) -> DeviceIdentity;
    /// Whether UNMAP / WRITE SAME with UNMAP really deallocate (thin).
    fn thin(&self) -> bool {
        false
    }
    /// Whether the device has a volatile write cache (WCE bit).
    fn write_cache(&self) -> bool {
        true
    }

    async fn read(&self, lba: u64, buf: &mut [u8]) -> Result<(), DeviceError>;
    /// `fua`: durable before returning.
    async fn write(&self, lba: u64, data: &[u8], fua: bool) -> Result<(), DeviceError>;
    /// Make every completed write durable.
    async fn flush(&self) -> Result<(), DeviceError>;
    /// Deallocate; later reads return zeros.
    async fn unmap(&self, lba: u64, blocks: u64) -> Result<(), DeviceError>;
    /// For GET LBA STATUS: whether `lba` is mapped and how many blocks from
    /// `lba` share that state (at least 1). Default: everything mapped.
    async fn lba_status(&self, lba: u64) -> Result<(bool, u64), DeviceError> {
        Ok((true, self.num_blocks().saturating_sub(lba).max(1)))
    }
}
