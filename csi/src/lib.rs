//! `ironblock-csi`: the Kubernetes CSI v1 driver (Identity, Controller, Node).
//!
//! Talks to meta for volumes/ACLs and to open-iscsi on the node. It knows
//! nothing of how chunks store data.
//!
//! Status: not built yet (see the CSI issue).
