//! `ironblock-redirector`: holds the virtual IP (VIP) portal and redirects
//! iSCSI logins to live chunks.
//!
//! Several redirectors run at once; exactly one serves the VIP: the holder
//! of the VIP lease in meta (`AcquireVipLease`, fencing tokens). The holder
//! binds the VIP portal (on loopback an address such as 127.0.0.100:3260
//! that only it binds) and
//! - answers discovery (SendTargets) with the targets in which the
//!   initiator sees at least one LUN, each with the VIP as its portal, so
//!   every login comes through the VIP;
//! - answers every normal-session login with a login redirect (class 0x01,
//!   detail 0x01 "moved temporarily") to the advertised portal of one Alive
//!   chunk whose target answered the last portal probe ([`probe`]: the
//!   first step of a login, so a hung chunk whose kernel still accepts
//!   connections is left out too), chosen by rendezvous
//!   hashing of (sharing-group key, target, chunk id) ([`hash`],
//!   [`view::sharing_groups`]: initiators sharing a LUN use the smallest
//!   IQN of their group, so they meet on one chunk), so a chunk's loss
//!   moves only its own sessions.
//!
//! It loses the VIP when meta refuses a renewal or cannot be reached for a
//! whole lease ttl: the listener is closed and every connection on the VIP
//! (login or full feature phase) is dropped at once.
//!
//! What it owns: the lease loop and the VIP listener ([`redirector`]), its
//! view of meta's live chunks and export map ([`view`]), the hash, its
//! metrics ([`metrics`]). What it must not know: anything about volumes
//! beyond target IQNs and ACLs, extents, replica sets or data; it never
//! carries a SCSI command and keeps no state of its own beyond its lease
//! token. Policy on the chunk (LUN masking, the data path) stays in the
//! chunk; liveness stays in meta.
//!
//! Modules: [`hash`] (rendezvous choice), [`view`] (`ClusterView` from
//! ListChunks + ListExports, `RedirectPortal`: the `ironblock_target`
//! `Portal`), [`meta`] (a small typed meta client), [`redirector`] (the
//! lease loop, serving, view refresh), [`probe`] (the portal probe),
//! [`metrics`] (Prometheus text and the
//! `/metrics` listener), [`vip_iface`] (`--vip-interface`: the VIP's
//! address on a real interface with `ip addr` and a gratuitous ARP),
//! [`cli`] (the binary's arguments and `run`).

pub mod cli;
pub mod hash;
pub mod meta;
pub mod metrics;
pub mod probe;
pub mod redirector;
pub mod view;
pub mod vip_iface;

pub use redirector::{Config, LeaseStatus, Redirector};
