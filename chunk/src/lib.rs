//! `ironblock-chunk`: a chunk server.
//!
//! Owns the extent store on a local directory (crc32c per block), synchronous
//! replication with epoch fencing, recovery and scrubbing, and serves iSCSI for
//! every target/LUN of the cluster through the `ironblock-target` crate. It
//! learns cluster state only from meta; it never decides placement itself.
//!
//! Status: not built yet (see the cluster issue).
