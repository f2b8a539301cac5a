//! The seam between the Node service's logic and the host: everything that
//! runs an external command or touches mounts and devices. The real
//! implementation is [`super::host::HostInitiator`]; tests use a fake.

use std::path::{Path, PathBuf};

/// An error of a host operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InitiatorError {
    /// The command ran and failed.
    #[error("{cmd} failed: {msg}")]
    Failed {
        /// The command (no secrets).
        cmd: String,
        /// Its stderr or the reason.
        msg: String,
    },
    /// The command did not finish within its timeout (it was killed).
    #[error("{0} timed out")]
    Timeout(String),
    /// The target or portal refused or could not be reached.
    #[error("{0}")]
    Unreachable(String),
}

/// CHAP credentials for the login (from the CSI node-stage secrets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chap {
    /// CHAP user name.
    pub user: String,
    /// CHAP secret (never logged).
    pub secret: String,
}

/// What the device says it is (VPD 0x80 serial, VPD 0x83 designator).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceIdentity {
    /// Unit serial number (VPD page 0x80), trimmed.
    pub serial: Option<String>,
    /// The device's WWN/WWID, e.g. `naa.6...` (VPD page 0x83).
    pub wwn: Option<String>,
}

/// A mount seen in the mount table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    /// The mount source (a device path for filesystems).
    pub source: String,
    /// Filesystem type.
    pub fs_type: String,
    /// Mounted read-only.
    pub readonly: bool,
}

/// Filesystem usage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FsStats {
    /// Bytes.
    pub total_bytes: u64,
    /// Bytes available to unprivileged users.
    pub available_bytes: u64,
    /// Bytes used.
    pub used_bytes: u64,
    /// Inodes.
    pub total_inodes: u64,
    /// Free inodes.
    pub free_inodes: u64,
}

/// Host operations the Node service needs. Every method must be bounded in
/// time (the real one runs each command under a timeout) and idempotent
/// where the docs say so.
#[async_trait::async_trait]
pub trait Initiator: Send + Sync + 'static {
    /// SendTargets discovery on `portal` and login to `target` (CHAP when
    /// given). Already logged in: Ok.
    async fn login(
        &self,
        portal: &str,
        target: &str,
        chap: Option<&Chap>,
    ) -> Result<(), InitiatorError>;
    /// Logs out of `target` on `portal`. Not logged in: Ok.
    async fn logout(&self, portal: &str, target: &str) -> Result<(), InitiatorError>;
    /// Rescans the sessions of `target` (new LUNs, capacity changes).
    async fn rescan(&self, target: &str) -> Result<(), InitiatorError>;
    /// The block device of `lun` of `target` via `portal`, if present
    /// (canonical path, e.g. `/dev/sdb`).
    async fn find_device(
        &self,
        portal: &str,
        target: &str,
        lun: u32,
    ) -> Result<Option<PathBuf>, InitiatorError>;
    /// Whether a device node still exists.
    async fn device_exists(&self, device: &Path) -> bool;
    /// The device's identity (VPD serial and WWN).
    async fn identity(&self, device: &Path) -> Result<DeviceIdentity, InitiatorError>;
    /// The filesystem or partition-table signature on the device (blkid
    /// TYPE / PTTYPE), None when it carries none.
    async fn signature(&self, device: &Path) -> Result<Option<String>, InitiatorError>;
    /// Whether the device itself proves it has never been written: every
    /// block deallocated and reading as zeros (thin provisioning with
    /// LBPRZ). False when it cannot tell.
    async fn never_written(&self, _device: &Path) -> bool {
        false
    }
    /// Creates a filesystem (mkfs.TYPE) on a device without a signature;
    /// `prezeroed`: the device proved it reads as zeros (see
    /// [`Initiator::never_written`]), so mkfs may skip zeroing.
    async fn format(
        &self,
        device: &Path,
        fs_type: &str,
        prezeroed: bool,
    ) -> Result<(), InitiatorError>;
    /// Mounts `source` at `target` (`options` may hold `bind` and `ro`).
    async fn mount(
        &self,
        source: &Path,
        target: &Path,
        fs_type: Option<&str>,
        options: &[String],
    ) -> Result<(), InitiatorError>;
    /// Unmounts `target`. Not mounted: Ok.
    async fn unmount(&self, target: &Path) -> Result<(), InitiatorError>;
    /// What is mounted at `path` (None: not a mount point).
    async fn mount_at(&self, path: &Path) -> Result<Option<MountInfo>, InitiatorError>;
    /// Flushes and removes the SCSI device (the LUN only, not the session).
    async fn remove_device(&self, device: &Path) -> Result<(), InitiatorError>;
    /// Size of the block device in bytes.
    async fn device_size(&self, device: &Path) -> Result<u64, InitiatorError>;
    /// Grows the filesystem on `device` mounted at `mount_path`.
    async fn resize_fs(
        &self,
        device: &Path,
        mount_path: &Path,
        fs_type: &str,
    ) -> Result<(), InitiatorError>;
    /// Usage of the filesystem at `path`.
    async fn fs_stats(&self, path: &Path) -> Result<FsStats, InitiatorError>;
}
