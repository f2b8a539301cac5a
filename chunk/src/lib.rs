//! `ironblock-chunk`: a chunk server.
pub mod identity;
mod kv;
