//! `ironblock-target`: an RFC 7143 iSCSI target (ErrorRecoveryLevel 0) and an
//! SPC-4 / SBC-3 SCSI command engine over the [`scsi::BlockDevice`] trait.
//!
//! Layers, bottom up (mini-redis style: frame -> connection -> command):
//! - [`pdu`]: Basic Header Segment layout and typed PDUs (RFC 7143 section 11).
//! - [`codec`]: `tokio-util` framing of PDUs on a byte stream, AHS, padding,
//!   CRC32C header/data digests.
//! - [`login`]: text key=value parsing, operational negotiation (section 13),
//!   CHAP (section 12.1.3), the login state machine; pure functions, no I/O.
//! - [`scsi`]: the SCSI engine. Logical units over a `BlockDevice`, sense data,
//!   unit attentions, reservations. No iSCSI knowledge.
//! - [`conn`] / [`server`]: sessions and connections on real sockets.
//! - [`limits`]: what one portal gives its clients (connections logging in,
//!   sessions in all and per initiator, write buffers), bounded.
//! - [`file_device`]: a file-backed `BlockDevice`.
//!
//! This crate must not know about clusters, replicas, meta or chunks: a
//! caller plugs its storage in as a `BlockDevice` and its policy (which
//! targets exist, who may see which LUN, CHAP secrets, login redirects) in as
//! a [`server::Portal`].

pub mod codec;
pub mod conn;
pub mod file_device;
pub mod limits;
pub mod login;
pub mod metrics;
pub mod pdu;
pub mod scsi;
pub mod server;
