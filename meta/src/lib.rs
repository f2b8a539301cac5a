//! `ironblock-meta`: the cluster's metadata service.
//!
//! Owns chunks and their liveness, volumes, targets and LUNs, per-LUN ACLs,
//! extent placement and replica-set epochs, snapshots and the VIP lease,
//! persisted in sled and served over gRPC. It never touches block data and
//! knows nothing of the iSCSI wire protocol.
//!
//! Status: not built yet (see the cluster issue).
