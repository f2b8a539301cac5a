//! `ironblock`: the admin CLI (volumes, snapshots, chunks, cluster health)
//! and the `ironblock dev` embedded cluster. It talks to meta over gRPC only.
//!
//! Status: not built yet (see the cluster issue).
