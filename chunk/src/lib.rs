//! `ironblock-chunk`: a chunk server.
//!
//! Owns the extent store on a local directory (crc32c per block), synchronous
//! replication with epoch fencing, recovery and scrubbing, and serves iSCSI for
//! every target/LUN of the cluster through the `ironblock-target` crate. It
//! learns cluster state only from meta; it never decides placement itself.
//!
//! # What exists now
//!
//! The local storage layer, with no network and no cluster knowledge beyond
//! the ids it is given:
//!
//! - [`identity`]: stamping the data directory with cluster id and chunk id;
//!   a chunk refuses a directory of another cluster or chunk.
//! - [`store`]: the extent store: fixed-size extents (sparse data file,
//!   crc32c per 4 KiB block, forward-only persisted epoch used for fencing),
//!   read with verification, write with FUA, repair, unmap, flush, scrub,
//!   capacity accounting.
//! - [`scrub`]: a background scrubber that walks all extents slowly and
//!   reports bad blocks for repair.
//!
//! The transport-agnostic replicated data path on top of it:
//!
//! - [`replica`]: the seams: replica sets with epochs, the [`ReplicaPeer`]
//!   trait (one chunk's copy as an access point sees it; [`LocalPeer`] over
//!   this chunk's store), the [`Membership`] trait meta implements
//!   ([`InMemoryMembership`] for tests).
//! - [`volume`]: [`VolumeDevice`], one volume as an iSCSI `BlockDevice`:
//!   synchronous replication to every member, removal of failed members
//!   through meta before the ack, read failover and read-repair, logical
//!   512/4096-byte blocks over 4 KiB replica blocks, thin extents,
//!   copy-on-write snapshots and clones (copy-up of an extent on its first
//!   write, [`VolumeDevice::invalidate`] for the snapshot barrier).
//!
//! - [`health`]: hang detection for replica peers: a call waiting a few
//!   times the peer's p99 (0.3–1 s) probes the peer on a connection of its
//!   own; no answer, and the member is dropped from the set instead of
//!   waited for.
//! - [`rpc`]: the network transport of replica traffic: replica.proto's
//!   messages in length-delimited frames, pipelined over one TCP connection
//!   per peer ([`serve_replica`] over a [`LocalPeer`], [`RemotePeer`] a
//!   [`ReplicaPeer`] with per-call timeouts), with a reversible mapping of
//!   [`PeerError`] to the wire's `ReplicaError`.
//!
//! The server around it:
//!
//! - [`meta_client`]: the typed meta gRPC client, [`Membership`] over meta
//!   (`MetaMembership`: GetExtents cached per volume, ReportReplicaFailure,
//!   EnsureExtent) and the [`PeerDirectory`] from meta's chunk list
//!   (`MetaPeers`).
//! - [`exports`]: every target/LUN of meta's export map as `VolumeDevice`
//!   LUNs, LUN masking by ACL (discovery, login, REPORT LUNS, commands), and
//!   the self-fence that fails all I/O while meta is out of reach.
//! - [`repair`]: repairing a bad block the scrubber found from another
//!   member of the extent's set.
//! - [`node`]: the chunk server as a library: init (register + stamp), start
//!   (register, garbage-collect stale extents, serve iSCSI / replica /
//!   metrics / scrub), heartbeats, revision changes, re-registration after
//!   being declared dead, graceful shutdown.
//! - [`gc`]: pacing of the garbage collection each revision change asks for
//!   (at most one full collection per `--gc-interval`, none forgotten).
//! - [`cli`]: `ironblock-chunk init|run` (the binary is a thin wrapper).
//! - [`recovery`]: [`RecoveryWorker`], which fills this chunk's copy of
//!   the extents meta made it a learner of (store resync plus a copy from a
//!   member while writes go on) and reports the result to meta
//!   ([`RecoveryMeta`]; [`MetaRecovery`] over meta's gRPC client).

pub mod cli;
pub mod exports;
pub mod gc;
pub mod health;
pub mod identity;
mod kv;
pub mod meta_client;
pub mod node;
pub mod recovery;
pub mod repair;
pub mod replica;
pub mod rpc;
pub mod scrub;
pub mod store;
pub mod volume;

pub use identity::{Identity, IdentityError};
pub use recovery::{
    MetaRecovery, RecoveryConfig, RecoveryError, RecoveryMeta, RecoveryMetrics, RecoveryProgress,
    RecoveryTaskInfo, RecoveryWorker,
};
pub use replica::{
    store_key, ChunkId, CopyUp, ExtentView, InMemoryMembership, LocalPeer, Membership,
    MembershipError, PeerDirectory, PeerError, ReplicaPeer, ReplicaSet, Resolved, StaticPeers,
};
pub use rpc::{serve_replica, RemotePeer, RemotePeerConfig, ReplicaService, RpcError};
pub use scrub::{BadBlock, ScrubConfig, Scrubber};
pub use store::{ExtentId, ExtentStore, RepairOutcome, StoreConfig, StoreError, BLOCK_SIZE};
pub use volume::{VolumeConfig, VolumeDevice, VolumeError, VolumeMetrics};
