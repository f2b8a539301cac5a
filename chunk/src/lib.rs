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
//! Not built yet: replication to the other members of a replica set, talking
//! to meta, recovery/resync, the iSCSI front end (`BlockDevice` over
//! extents), the `ironblock-chunk` binary.

pub mod identity;
mod kv;
pub mod scrub;
pub mod store;

pub use identity::{Identity, IdentityError};
pub use scrub::{BadBlock, ScrubConfig, Scrubber};
pub use store::{ExtentId, ExtentStore, RepairOutcome, StoreConfig, StoreError, BLOCK_SIZE};
