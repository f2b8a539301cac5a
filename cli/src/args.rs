//! The command tree. Global flags (`--meta`, `--output`, `--timeout`) may be
//! given before or after the subcommand.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use ironblock_meta::cli::MetaArgs;
use ironblock_meta::parse_duration;

/// ironblock: distributed iSCSI block storage.
#[derive(Parser, Debug)]
#[command(name = "ironblock", version, propagate_version = true)]
pub struct Cli {
    /// Meta service address, `host:port` or `http://host:port`.
    #[arg(
        long,
        env = "IRONBLOCK_META",
        default_value = "127.0.0.1:7000",
        global = true
    )]
    pub meta: String,
    /// Output format of the admin commands.
    #[arg(long, value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,
    /// Connect and call timeout for requests to meta (e.g. 10s, 500ms).
    #[arg(long, default_value = "10s", value_parser = parse_duration, global = true)]
    pub timeout: Duration,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Human-readable tables with human sizes.
    Table,
    /// JSON with stable field names (documented in `ironblock_cli::output`).
    Json,
}

/// Top-level commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create, list, inspect, resize, clone and delete volumes.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Create, list and delete snapshots.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Which initiators (IQNs) may see a volume's LUN.
    #[command(subcommand)]
    Acl(AclCmd),
    /// Inspect and manage chunk servers, or run one (`init`, `run`).
    #[command(subcommand)]
    Chunk(ChunkCmd),
    /// Cluster health, counts and recovery progress.
    Status,
    /// Run the meta service (`ironblock meta --data DIR ...`), or manage
    /// its group: `ironblock meta list|add|remove`.
    Meta(MetaCmd),
    /// Run a redirector: holds the VIP (by a lease in meta) and redirects
    /// logins to live chunks.
    Redirector(ironblock_redirector::cli::Args),
    /// Run a local cluster (meta + N chunks as child processes) in the
    /// foreground until Ctrl-C / SIGTERM.
    Dev(DevArgs),
}

/// `ironblock meta`: the daemon's flags, or a group subcommand.
#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct MetaCmd {
    /// A group subcommand (none: run the daemon).
    #[command(subcommand)]
    pub member: Option<MetaMemberCmd>,
    /// The daemon's flags.
    #[command(flatten)]
    pub daemon: Option<MetaArgs>,
}

/// `ironblock meta list|add|remove`: the meta group's membership.
#[derive(Subcommand, Debug, Clone)]
pub enum MetaMemberCmd {
    /// The members, the leader, the term and each member's lag.
    List,
    /// Add a meta node: start it first with `--join` (and its own `--id`
    /// and `--advertise`); it catches up as a learner, then votes.
    Add {
        /// Its node id (unique in the group).
        id: u64,
        /// Its gRPC address, host:port.
        addr: String,
    },
    /// Remove a meta node from the group (to replace a dead one: remove
    /// it, then add the new one).
    Remove {
        /// Its node id.
        id: u64,
    },
}

/// `ironblock volume ...`
#[derive(Subcommand, Debug, Clone)]
pub enum VolumeCmd {
    /// Create a volume (idempotent for the same parameters).
    Create {
        /// Volume name.
        name: String,
        /// Size: bytes or with a KiB/MiB/GiB/TiB (K/M/G/T) suffix.
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Number of replicas (1..=3).
        #[arg(long, default_value_t = 2)]
        replicas: u32,
        /// Allocate extents on first write instead of at creation.
        #[arg(long)]
        thin: bool,
    },
    /// List volumes.
    List,
    /// Show one volume (target, LUN, portals, identity, ACL, snapshots).
    Show {
        /// Volume name or id.
        volume: String,
    },
    /// Grow a volume.
    Resize {
        /// Volume name or id.
        volume: String,
        /// New size (bytes or with a unit suffix); never smaller.
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// Change the replication factor online. A raise returns at once and
    /// recovery copies the extents in the background (degraded until done;
    /// `--wait` waits for it); a lower drops the surplus replicas at once.
    /// Extents a snapshot shares are never lowered.
    SetReplicas {
        /// Volume name or id.
        volume: String,
        /// The new replication factor (1..=3).
        replicas: u32,
        /// Wait until every extent of the volume has its replicas.
        #[arg(long)]
        wait: bool,
        /// How long `--wait` waits before giving up (recovery goes on).
        #[arg(long, default_value = "10m", value_parser = parse_duration, requires = "wait")]
        wait_timeout: Duration,
    },
    /// Delete a volume (it must have no snapshots).
    Delete {
        /// Volume name or id.
        volume: String,
        /// Succeed when the volume does not exist.
        #[arg(long)]
        ignore_missing: bool,
    },
    /// Create a volume from a snapshot.
    Clone {
        /// Snapshot name or id.
        snapshot: String,
        /// Name of the new volume.
        new_name: String,
        /// Size of the clone (default: the snapshot's size).
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Number of replicas (default: the source volume's).
        #[arg(long)]
        replicas: Option<u32>,
        /// Allocate extents on first write.
        #[arg(long)]
        thin: bool,
    },
}

/// `ironblock snapshot ...`
#[derive(Subcommand, Debug, Clone)]
pub enum SnapshotCmd {
    /// Snapshot a volume.
    Create {
        /// Volume name or id.
        volume: String,
        /// Snapshot name (unique in the cluster).
        name: String,
    },
    /// List snapshots, all or of one volume.
    List {
        /// Volume name or id.
        volume: Option<String>,
    },
    /// Delete a snapshot (it must have no clones).
    Delete {
        /// Snapshot name or id.
        snapshot: String,
        /// Succeed when the snapshot does not exist.
        #[arg(long)]
        ignore_missing: bool,
    },
}

/// `ironblock acl ...`
#[derive(Subcommand, Debug, Clone)]
pub enum AclCmd {
    /// Allow an initiator to see the volume's LUN (idempotent for the same
    /// mode; an initiator already allowed with the other mode is refused:
    /// use `acl set-mode`).
    Add {
        /// Volume name or id.
        volume: String,
        /// Initiator IQN.
        iqn: String,
        /// The initiator sees the LUN write-protected (reads only).
        #[arg(long)]
        read_only: bool,
    },
    /// Set an initiator's mode (adds it if it is not on the ACL).
    SetMode {
        /// Volume name or id.
        volume: String,
        /// Initiator IQN.
        iqn: String,
        /// `read-only` or `read-write`.
        mode: AclModeArg,
    },
    /// Revoke an initiator.
    Remove {
        /// Volume name or id.
        volume: String,
        /// Initiator IQN.
        iqn: String,
    },
    /// List the initiators allowed to see the volume's LUN.
    List {
        /// Volume name or id.
        volume: String,
    },
}

/// An ACL entry's mode on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AclModeArg {
    /// Reads only: the LUN is write-protected for the initiator.
    #[value(alias = "ro")]
    ReadOnly,
    /// Reads and writes.
    #[value(alias = "rw")]
    ReadWrite,
}

/// `ironblock chunk ...`
#[derive(Subcommand, Debug)]
pub enum ChunkCmd {
    /// List chunk servers.
    List,
    /// Stop placing extents on a chunk and move its extents away.
    Drain {
        /// Chunk id.
        id: u64,
    },
    /// Forget a chunk for good (drained or dead).
    Remove {
        /// Chunk id.
        id: u64,
    },
    /// Running a chunk server.
    #[command(flatten)]
    Server(Box<ironblock_chunk::cli::ChunkCommand>),
}

/// `ironblock dev` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct DevArgs {
    /// Cluster directory: DIR/meta, DIR/chunk-<i>, DIR/logs, DIR/pids.
    #[arg(long)]
    pub data: PathBuf,
    /// Number of chunk servers.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub chunks: u16,
    /// Meta gRPC listen address (of meta 1; meta i listens on the next
    /// ports).
    #[arg(long, default_value = "127.0.0.1:7000")]
    pub meta_listen: SocketAddr,
    /// Number of meta nodes: 3 (or 5) form a Raft group that survives the
    /// loss of one (two); 1 runs meta alone.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=7))]
    pub metas: u16,
    /// iSCSI portal port of chunk 1 (chunk i uses base + i - 1).
    #[arg(long, default_value_t = 3261)]
    pub portal_base: u16,
    /// Replica transport port of chunk 1.
    #[arg(long, default_value_t = 7101)]
    pub data_port_base: u16,
    /// Metrics port of chunk 1.
    #[arg(long, default_value_t = 9101)]
    pub metrics_port_base: u16,
    /// Meta's liveness timeout for chunks.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub liveness_timeout: Duration,
    /// The VIP portal the redirectors share (only the lease holder binds it).
    #[arg(long, default_value = "127.0.0.100:3260")]
    pub vip: SocketAddr,
    /// Number of redirectors (0: none).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(0..=8))]
    pub redirectors: u16,
}

/// Sizes for clap: plain bytes or with a KiB/MiB/GiB/TiB (K/M/G/T) suffix
/// ([`ironblock_target::file_device::parse_size`]). Zero is left to meta,
/// which refuses it.
pub fn parse_size(s: &str) -> Result<u64, String> {
    ironblock_target::file_device::parse_size(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_tree_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_go_anywhere() {
        let c = Cli::try_parse_from([
            "ironblock",
            "volume",
            "show",
            "v1",
            "--output",
            "json",
            "--meta",
            "http://127.0.0.1:9",
        ])
        .unwrap();
        assert_eq!(c.output, Output::Json);
        assert_eq!(c.meta, "http://127.0.0.1:9");
        let c = Cli::try_parse_from(["ironblock", "--timeout", "500ms", "status"]).unwrap();
        assert_eq!(c.timeout, Duration::from_millis(500));
    }

    #[test]
    fn sizes() {
        let c =
            Cli::try_parse_from(["ironblock", "volume", "create", "a", "--size", "10GiB"]).unwrap();
        match c.command {
            Command::Volume(VolumeCmd::Create {
                size,
                replicas,
                thin,
                ..
            }) => {
                assert_eq!(size, 10 << 30);
                assert_eq!(replicas, 2);
                assert!(!thin);
            }
            other => panic!("parsed as {other:?}"),
        }
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("2 TiB").unwrap(), 2 << 40);
        assert!(parse_size("ten").is_err());
        assert!(parse_size("10XB").is_err());
        let e =
            Cli::try_parse_from(["ironblock", "volume", "create", "a", "--size", "x"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn set_replicas() {
        let c = Cli::try_parse_from(["ironblock", "volume", "set-replicas", "db", "3"]).unwrap();
        match c.command {
            Command::Volume(VolumeCmd::SetReplicas {
                volume,
                replicas,
                wait,
                wait_timeout,
            }) => {
                assert_eq!((volume.as_str(), replicas, wait), ("db", 3, false));
                assert_eq!(wait_timeout, Duration::from_secs(600));
            }
            other => panic!("parsed as {other:?}"),
        }
        let c = Cli::try_parse_from([
            "ironblock",
            "volume",
            "set-replicas",
            "db",
            "1",
            "--wait",
            "--wait-timeout",
            "30s",
        ])
        .unwrap();
        assert!(matches!(
            c.command,
            Command::Volume(VolumeCmd::SetReplicas { wait: true, wait_timeout, .. })
                if wait_timeout == Duration::from_secs(30)
        ));
        for bad in [
            &["ironblock", "volume", "set-replicas", "db"][..],
            &["ironblock", "volume", "set-replicas", "db", "two"],
            &[
                "ironblock",
                "volume",
                "set-replicas",
                "db",
                "2",
                "--wait-timeout",
                "1s",
            ],
        ] {
            let e = Cli::try_parse_from(bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn meta_flags_are_the_daemons() {
        let c = Cli::try_parse_from([
            "ironblock",
            "meta",
            "--listen",
            "127.0.0.1:7100",
            "--data",
            "/tmp/x",
            "--liveness-timeout",
            "500ms",
        ])
        .unwrap();
        match c.command {
            Command::Meta(MetaCmd {
                member: None,
                daemon: Some(m),
            }) => {
                assert_eq!(m.listen.port(), 7100);
                assert_eq!(m.liveness_timeout, Duration::from_millis(500));
                assert!(m.metrics_listen.is_none());
                assert_eq!(m.id, 1);
                assert!(m.peers.0.is_empty());
            }
            other => panic!("parsed as {other:?}"),
        }
        // The group subcommands need no daemon flags.
        let c = Cli::try_parse_from(["ironblock", "meta", "add", "4", "10.0.0.4:7000"]).unwrap();
        match c.command {
            Command::Meta(MetaCmd {
                member: Some(MetaMemberCmd::Add { id, addr }),
                ..
            }) => assert_eq!((id, addr.as_str()), (4, "10.0.0.4:7000")),
            other => panic!("parsed as {other:?}"),
        }
        assert!(Cli::try_parse_from(["ironblock", "meta", "list", "--data", "/x"]).is_err());
        let c = Cli::try_parse_from([
            "ironblock",
            "meta",
            "--data",
            "/x",
            "--id",
            "2",
            "--peers",
            "1=a:7000,2=b:7000,3=c:7000",
        ])
        .unwrap();
        match c.command {
            Command::Meta(MetaCmd {
                daemon: Some(m), ..
            }) => assert_eq!((m.id, m.peers.0.len()), (2, 3)),
            other => panic!("parsed as {other:?}"),
        }
    }

    /// A flattened chunk-server subcommand with its own `--meta` flag (as
    /// `ironblock_chunk::cli::ChunkCommand` has) coexists with the global
    /// `--meta`.
    #[test]
    fn a_subcommand_may_have_its_own_meta_flag() {
        #[derive(Subcommand, Debug)]
        enum Server {
            Run(RunArgs),
        }
        #[derive(clap::Args, Debug)]
        struct RunArgs {
            #[arg(long)]
            meta: String,
            #[arg(long)]
            data: PathBuf,
        }
        #[derive(Subcommand, Debug)]
        enum Chunk {
            List,
            #[command(flatten)]
            Server(Server),
        }
        #[derive(Parser, Debug)]
        struct Top {
            #[arg(long, default_value = "127.0.0.1:7000", global = true)]
            meta: String,
            #[command(subcommand)]
            cmd: Chunk,
        }
        Top::command().debug_assert();
        let t = Top::try_parse_from(["x", "run", "--meta", "127.0.0.1:1", "--data", "/d"]).unwrap();
        match t.cmd {
            Chunk::Server(Server::Run(r)) => assert_eq!(r.meta, "127.0.0.1:1"),
            other => panic!("parsed as {other:?}"),
        }
    }
}
