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
//! - [`rpc`]: the network transport of replica traffic: the `Replica` gRPC
//!   service over a [`LocalPeer`] ([`serve_replica`]) and [`RemotePeer`], a
//!   [`ReplicaPeer`] over a tonic channel, with a reversible mapping of
//!   [`PeerError`] to gRPC statuses.
//!
//! Not built yet: the meta client for [`Membership`], recovery/resync, the
//! `ironblock-chunk` binary.

pub mod identity;
mod kv;
pub mod replica;
pub mod rpc;
pub mod scrub;
pub mod store;
pub mod volume;

pub use identity::{Identity, IdentityError};
pub use replica::{
    store_key, ChunkId, CopyUp, ExtentView, InMemoryMembership, LocalPeer, Membership,
    MembershipError, PeerDirectory, PeerError, ReplicaPeer, ReplicaSet, Resolved, StaticPeers,
};
pub use rpc::{serve_replica, RemotePeer, RemotePeerConfig, ReplicaService, RpcError};
pub use scrub::{BadBlock, ScrubConfig, Scrubber};
pub use store::{ExtentId, ExtentStore, RepairOutcome, StoreConfig, StoreError, BLOCK_SIZE};
pub use volume::{VolumeConfig, VolumeDevice, VolumeError, VolumeMetrics};
