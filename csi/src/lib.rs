//! `ironblock-csi`: the Kubernetes CSI v1 driver (Identity, Controller, Node).
//!
//! Talks to meta for volumes/ACLs (controller) and to open-iscsi on the node
//! (behind the [`node::Initiator`] trait). It knows nothing of how chunks
//! store data.
//!
//! ```text
//! server.rs      serve(): the three gRPC services on a unix socket
//! identity.rs    GetPluginInfo / GetPluginCapabilities / Probe
//! controller.rs  the Controller service over meta's gRPC API
//! node/          the Node service: mod.rs (stage/publish/... logic),
//!                initiator.rs (the Initiator seam), host.rs (iscsiadm,
//!                blkid, mkfs, mount, ... with timeouts), state.rs (staged
//!                volumes on disk)
//! rpc.rs         the span / error / response shape every call shares
//! locks.rs       per-volume locks (ABORTED when busy), single-flight
//! metrics.rs     calls by method and code, external commands, /metrics
//! names.rs       CSI names <-> meta names, capabilities, sizes
//! topology.rs    the one topology segment (the cluster), requirements
//! error.rs       CsiError -> gRPC status codes
//! ```

pub mod controller;
pub mod error;
pub mod identity;
pub mod locks;
pub mod metrics;
pub mod names;
pub mod node;
pub mod rpc;
pub mod server;
pub mod topology;

pub use error::CsiError;

/// The driver name (GetPluginInfo, CSIDriver object, StorageClass
/// provisioner).
pub const DRIVER_NAME: &str = "csi.ironblock.dev";

/// The vendor version reported by GetPluginInfo.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Keys of the publish context / volume context the controller hands out
/// and the node reads.
pub mod keys {
    /// The target IQN that holds the volume's LUN.
    pub const TARGET: &str = "targetIqn";
    /// The LUN number.
    pub const LUN: &str = "lun";
    /// The VPD page 0x80 serial (the volume id as 32 hex digits).
    pub const SERIAL: &str = "vpdSerial";
    /// The NAA-6 identifier (VPD page 0x83) in hex.
    pub const NAA: &str = "naa";
    /// The iSCSI portal (the redirector's VIP), "host:port".
    pub const PORTAL: &str = "portal";
    /// The filesystem the volume is formatted with (StorageClass fsType).
    pub const FS_TYPE: &str = "fsType";
    /// The replication factor.
    pub const REPLICAS: &str = "replicas";
    /// Publish context: "true" when the controller published the volume
    /// read-only (the LUN is write-protected for the node), so the node
    /// mounts it `ro` and never formats it.
    pub const READ_ONLY: &str = "readOnly";
}
