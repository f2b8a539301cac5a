//! `ironblock`: the admin CLI (volumes, snapshots, ACLs, chunks, cluster
//! health), the `ironblock meta` / `ironblock chunk` daemons and the
//! `ironblock dev` local cluster.
//!
//! The admin commands talk to meta over gRPC only (`ironblock.v1.Meta`); they
//! never touch block data. `ironblock meta` runs the meta service in process
//! (`ironblock_meta::cli`); `ironblock chunk init|run` runs a chunk server
//! in process (`ironblock_chunk::cli`); `ironblock dev` ([`dev`]) starts meta and N chunks as
//! child processes of the same binary and supervises them.
//!
//! Map:
//! - [`args`]: the clap command tree and global flags.
//! - [`client`]: connecting to meta, turning gRPC errors into one-line
//!   messages, resolving volumes and snapshots by name or id.
//! - [`admin`]: the admin commands.
//! - [`output`]: tables, human sizes and the JSON views (`--output json`;
//!   field names documented there).
//! - [`dev`]: `ironblock dev`.

pub mod admin;
pub mod args;
pub mod client;
pub mod dev;
pub mod output;
