//! `ironblock-proto`: the wire contracts between ironblock processes.
//!
//! Owns the `.proto` files under `ironblock/v1/` and `csi/v1/` and the Rust code generated
//! from them (prost messages, tonic clients and servers). It holds no logic:
//! it must not know how meta stores state, how chunks store blocks, or
//! anything about iSCSI. The `.proto` files are compiled at build time by the
//! pure-Rust `protox` compiler, so no `protoc` binary is needed.

pub mod meta_channel;
pub use meta_channel::MetaChannel;

/// The generated meta client over a [`MetaChannel`] (the group's members,
/// following the leader).
pub type MetaGroupClient = v1::meta_client::MetaClient<MetaChannel>;

/// `ironblock.v1`: the meta service API (`meta_client` / `meta_server`) and
/// the messages of the chunk-to-chunk replica traffic (carried in
/// `ironblock-chunk`'s own framing, not gRPC).
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("ironblock.v1");
}

/// `csi.v1`: the Container Storage Interface v1 (spec 1.9): `identity_*`,
/// `controller_*` and `node_*` clients and servers with their messages.
/// Well-known types (`Timestamp`, wrappers) are `prost_types`.
pub mod csi {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("csi.v1");
}
