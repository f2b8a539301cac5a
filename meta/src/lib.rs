//! `ironblock-meta`: the cluster's metadata service.
//!
//! Owns the cluster id; chunks, their identity and liveness; volumes,
//! targets (at most 4096) and LUNs (at most 255 per target, shared by
//! volumes); per-LUN initiator ACLs; extent placement and replica sets with
//! epochs; recovery scheduling; copy-on-write snapshots and clones (extent
//! generations, copy-up bookkeeping, the snapshot barrier). All of it
//! is persisted in sled ([`state`]) and served over gRPC ([`service`], the
//! `ironblock.v1.Meta` API from `ironblock-proto`).
//!
//! Must not know: block data (meta never reads or writes a block), the iSCSI
//! wire protocol (it only hands out IQNs, LUN numbers and VPD identities),
//! how chunks lay data out on disk. Time enters through [`clock::Clock`] /
//! explicit `now` arguments so the state machine can be simulated.

pub mod cli;
pub mod clock;
pub mod error;
pub mod ids;
pub mod metrics;
pub mod raft;
pub mod server;
pub mod service;
pub mod state;

pub use error::{MetaError, Result};
pub use ids::{volume_prefix_from_naa, vpd_identity, Uuid};
pub use server::{parse_duration, serve, Config, MetaServer, ServeError};
