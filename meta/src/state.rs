//! The cluster state machine and its sled persistence.
//!
//! The whole model lives in memory (it is small: records, not data) and every
//! change is written through to sled first: a mutation validates, builds a
//! list of [`Op`]s, commits them in ONE sled transaction across all the trees
//! it touches (and flushes), and only then applies the same ops to memory. So
//! memory never holds anything the disk does not.
//!
//! Trees (one per kind, bincode-encoded records): `cluster` (singleton),
//! `chunks`, `volumes`, `targets`, `acls`, `snapshots`, `extents`,
//! `recovery`, `acl_read_only` (per volume the initiators of its ACL that
//! see the LUN write-protected; a tree of its own so a store written before
//! read-only entries existed loads unchanged); and `vip_leases` (the redirectors' VIP leases, written
//! outside the transactions, see `state/lease.rs`).
//!
//! Time never comes from inside: functions that need it take `now: Instant`
//! (liveness) and/or `unix_ms` (timestamps) so a simulator can drive them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;
use tracing::{info, warn};

use crate::error::{MetaError, Result};
use crate::ids::Uuid;

mod cow;
pub use cow::{parse_store_key, store_key, ResolvedExtent};
pub mod in_force;
mod lease;
mod locality;
pub mod pulse;
pub use lease::{LeaseRecord, LeaseView, MAX_LEASE_TTL, MIN_LEASE_TTL};
pub use locality::{DEFAULT_LOCALITY_WINDOW_BYTES, LOCALITY_SHARE_PCT, MAX_FILL_PCT};
use pulse::Liveness;
pub use pulse::{Beat, Pulse, SharedPulse};

/// In-memory key of an extent record: (volume, index, generation).
pub type ExtentKey = (Uuid, u64, u64);

/// Size of one extent, the unit of placement and replication.
pub const EXTENT_SIZE: u64 = 64 << 20;
/// Volume sizes must be a multiple of this.
pub const BLOCK_SIZE: u64 = 4096;
/// Largest volume meta accepts.
pub const MAX_VOLUME_SIZE: u64 = 16 << 40;
/// Most targets in a cluster.
pub const MAX_TARGETS: u32 = 4096;
/// Most LUNs in a target; LUN numbers are `1..=MAX_LUNS_PER_TARGET`.
pub const MAX_LUNS_PER_TARGET: u16 = 255;
/// Highest replication factor.
pub const MAX_REPLICAS: u32 = 3;
/// Prefix of every target IQN.
pub const IQN_PREFIX: &str = "iqn.2026-11.dev.ironblock";
/// Default liveness timeout.
pub const DEFAULT_LIVENESS_TIMEOUT: Duration = Duration::from_secs(3);
/// Rebalancing stops once the most and least loaded alive chunks differ by
/// at most this many replicas (or a tenth of the mean, if larger).
pub const REBALANCE_SLACK: u64 = 2;
/// Recovery and rebalance tasks in flight above which no move is queued.
pub const MAX_REBALANCE_MOVES: usize = 4;
/// After a copy to a chunk fails, no rebalance move targets it for this
/// long (recovery of degraded extents is not held back). Without it a chunk
/// that cannot take copies yet (peers still dial its old address after a
/// restart) draws a storm of moves that fail and are queued again at once.
pub const REBALANCE_COOLDOWN: Duration = Duration::from_secs(5);

const TREE_NAMES: [&str; 13] = [
    "cluster",
    "chunks",
    "volumes",
    "targets",
    "acls",
    "snapshots",
    "extents",
    "recovery",
    "acl_read_only",
    "volume_home",
    "vip_leases",
    "freed_luns",
    "chunk_requests",
];
const T_CLUSTER: usize = 0;
const T_CHUNKS: usize = 1;
const T_VOLUMES: usize = 2;
const T_TARGETS: usize = 3;
const T_ACLS: usize = 4;
const T_SNAPSHOTS: usize = 5;
const T_EXTENTS: usize = 6;
const T_RECOVERY: usize = 7;
const T_ACL_RO: usize = 8;
const T_HOME: usize = 9;
const T_LEASES: usize = 10;
const T_FREED: usize = 11;
const T_CHUNK_REQ: usize = 12;
const CLUSTER_KEY: &[u8] = b"cluster";

// ------------------------------------------------------------------ records

/// Cluster-wide singleton.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterRecord {
    /// Generated at first start, never changes.
    pub cluster_id: Uuid,
    /// Next chunk id to hand out (ids start at 1 and are never reused).
    pub next_chunk_id: u64,
    /// Next recovery task id.
    pub next_task_id: u64,
    /// Bumped on every committed change.
    pub revision: u64,
    /// Recovery tasks that finished successfully.
    pub recovery_completed: u64,
    /// Recovery tasks reported failed or abandoned.
    pub recovery_failed: u64,
    /// Rebalance moves queued (a subset of the recovery tasks).
    pub rebalance_moves: u64,
}

/// Lifecycle of a chunk server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChunkState {
    /// Heartbeating, takes new extents.
    Alive,
    /// Missed its liveness timeout; stripped from every replica set.
    Dead,
    /// Alive but being emptied; takes no new extents.
    Draining,
    /// Gone for good; its id cannot register again.
    Removed,
}

/// A chunk server as meta knows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChunkRecord {
    /// Handed out by meta at first registration.
    pub id: u64,
    /// iSCSI portal, `host:port`.
    pub portal: String,
    /// Replication address, `host:port`.
    pub data_addr: String,
    /// Raw capacity.
    pub capacity_bytes: u64,
    /// Lifecycle state.
    pub state: ChunkState,
    /// First registration time.
    pub registered_at_unix_ms: u64,
}

/// Volume lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VolumeState {
    /// Usable.
    Ready,
}

/// A volume (one LUN).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// Stable id.
    pub id: Uuid,
    /// Unique name.
    pub name: String,
    /// Size in bytes (multiple of [`BLOCK_SIZE`]).
    pub size_bytes: u64,
    /// Replication factor, 1..=3.
    pub replicas: u32,
    /// Thin (no capacity reserved) or thick.
    pub thin: bool,
    /// Number of the target the LUN lives in (see [`TargetRecord`]).
    pub target: u32,
    /// LUN number in that target, 1..=255.
    pub lun: u16,
    /// Creation time.
    pub created_at_unix_ms: u64,
    /// For clones: the snapshot it was cloned from.
    pub parent_snapshot: Option<Uuid>,
    /// Lifecycle state.
    pub state: VolumeState,
    /// Bumped by each resize.
    pub capacity_generation: u64,
    /// Current copy-on-write generation; a snapshot freezes the current one
    /// and the volume moves to the next.
    pub generation: u64,
    /// Snapshots of this volume, oldest first (the COW chain).
    pub snapshot_chain: Vec<Uuid>,
}

/// An iSCSI target shared by up to 255 volumes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TargetRecord {
    /// 1-based target number (the `t<N>` in the IQN).
    pub number: u32,
    /// Target IQN.
    pub iqn: String,
    /// LUN number -> volume.
    pub luns: BTreeMap<u16, Uuid>,
}

/// A snapshot (metadata only).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// Stable id.
    pub id: Uuid,
    /// Unique name.
    pub name: String,
    /// Source volume.
    pub volume: Uuid,
    /// Volume size when taken.
    pub size_bytes: u64,
    /// Creation time.
    pub created_at_unix_ms: u64,
    /// The volume generation this snapshot froze.
    pub generation: u64,
}

/// One extent of a volume and its replica set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExtentRecord {
    /// Owning volume.
    pub volume: Uuid,
    /// Extent index: bytes `[index * EXTENT_SIZE, (index + 1) * EXTENT_SIZE)`.
    pub index: u64,
    /// Chunk ids of the current replica set (distinct).
    pub replicas: Vec<u64>,
    /// Bumped whenever the replica set (members or learners) changes.
    pub epoch: u64,
    /// Chunks being filled by a recovery task (distinct, never members):
    /// they receive every write but serve no read until CompleteRecovery
    /// makes them members.
    pub learners: Vec<u64>,
    /// Copy-on-write generation the extent was created in (see
    /// [`ResolvedExtent`] and [`store_key`]).
    pub generation: u64,
    /// A copy-up destination not committed yet: reads resolve past it.
    pub pending: bool,
    /// The replication factor this record is kept at: its volume's when it
    /// was created, changed by [`State::set_replicas`] (which may leave the
    /// records a snapshot shares at another factor than the volume's).
    /// Recovery, trimming, rebalancing and health go by this, not by the
    /// volume. Records stored before the field existed load with the
    /// volume's factor (see [`decode_extent`]).
    pub replication: u32,
}

/// [`ExtentRecord`] as stores written before per-record replication
/// factors encoded it: the same fields without the trailing `replication`.
/// (bincode is positional; an older meta reading a newer record ignores the
/// trailing bytes, so the change is compatible both ways.)
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct ExtentRecordV1 {
    volume: Uuid,
    index: u64,
    replicas: Vec<u64>,
    epoch: u64,
    learners: Vec<u64>,
    generation: u64,
    pending: bool,
}

/// Decodes an extent record of either layout. An old record comes back with
/// `replication` 0, which [`State::load`] replaces with its volume's
/// factor.
fn decode_extent(bytes: &[u8]) -> Result<ExtentRecord> {
    if let Ok(e) = bincode::deserialize::<ExtentRecord>(bytes) {
        return Ok(e);
    }
    let old: ExtentRecordV1 = decode(T_EXTENTS, bytes)?;
    Ok(ExtentRecord {
        volume: old.volume,
        index: old.index,
        replicas: old.replicas,
        epoch: old.epoch,
        learners: old.learners,
        generation: old.generation,
        pending: old.pending,
        replication: 0,
    })
}

impl ExtentRecord {
    /// Whether `chunk` holds (or is being given) a copy: member or learner.
    pub fn holds(&self, chunk: u64) -> bool {
        self.replicas.contains(&chunk) || self.learners.contains(&chunk)
    }
}

/// Copy an extent to a chunk (re-replication or a move off a draining chunk).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecoveryTask {
    /// Task id.
    pub id: u64,
    /// Volume of the extent.
    pub volume: Uuid,
    /// Extent index.
    pub index: u64,
    /// Chunk that receives the copy.
    pub target_chunk: u64,
    /// Replica set when queued (copy sources).
    pub sources: Vec<u64>,
    /// For drain moves: the chunk that leaves the set on completion.
    pub replaces: Option<u64>,
    /// Extent epoch when queued: the epoch that made the target a learner.
    pub epoch: u64,
    /// Generation of the extent (its store key, see
    /// [`ExtentRecord::store_key`]).
    pub generation: u64,
}

/// One change, applied first to sled, then to memory. An op writes or
/// removes a whole record, so applying it twice is applying it once.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) enum Op {
    Cluster(ClusterRecord),
    Chunk(ChunkRecord),
    Volume(VolumeRecord),
    DelVolume(Uuid),
    Target(TargetRecord),
    Acl(Uuid, BTreeSet<String>),
    DelAcl(Uuid),
    /// The read-only subset of a volume's ACL.
    AclRo(Uuid, BTreeSet<String>),
    DelAclRo(Uuid),
    Snapshot(SnapshotRecord),
    DelSnapshot(Uuid),
    Extent(ExtentRecord),
    /// (volume, index, generation).
    DelExtent(Uuid, u64, u64),
    Task(RecoveryTask),
    DelTask(u64),
    /// A volume's learned home chunk (see `state/locality.rs`); `None`
    /// forgets it.
    Home(Uuid, Option<u64>),
    /// The last grant of a VIP lease (a new tenure or ttl; renewals that
    /// change neither write nothing), see `state/lease.rs`.
    Lease(String, LeaseRecord),
    /// A LUN number freed by a delete (true) and not to be handed out
    /// again for a while, or taken again (false): the freed-LUN guard.
    FreedLun(u32, u16, bool),
    /// A first registration's request id and the chunk id it got: a retry
    /// of the same registration (its answer lost in a failover) gets the
    /// same chunk.
    ChunkRequest(String, u64),
}

/// A change as it travels through the meta group's log (see `raft/`): the
/// records one commit writes, decided by the leader against
/// `base_revision`. Applying it is deterministic: it only writes records.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Batch {
    /// The revision the leader decided it at; the batch applies only on
    /// top of exactly that revision (else it is a conflict, skipped on
    /// every member alike).
    pub base_revision: u64,
    pub(crate) ops: Vec<Op>,
}

impl Batch {
    /// The revision the batch leaves.
    pub fn revision(&self) -> u64 {
        self.ops
            .iter()
            .rev()
            .find_map(|o| match o {
                Op::Cluster(c) => Some(c.revision),
                _ => None,
            })
            .unwrap_or(self.base_revision)
    }
}

/// Publishes what the meta group's log made durable: the revision (to
/// heartbeats and `WatchRevisions`) and the chunk states it wrote. The
/// leader's memory runs ahead of the log while a group commit is in flight
/// (`raft/commit.rs`), so what it announces comes from the committed
/// batches, never from memory.
#[derive(Clone, Debug)]
pub struct Announcer {
    pulse: SharedPulse,
    revisions: tokio::sync::watch::Sender<u64>,
}

impl Announcer {
    /// `batches` went through the log, in order.
    pub fn durable(&self, batches: &[Batch]) {
        let Some(last) = batches.last() else {
            return;
        };
        let revision = last.revision();
        let ops = || batches.iter().flat_map(|b| b.ops.iter());
        let cluster_id = ops().rev().find_map(|o| match o {
            Op::Cluster(c) => Some(c.cluster_id),
            _ => None,
        });
        let chunks = ops().filter_map(|o| match o {
            Op::Chunk(c) => Some((c.id, c.state)),
            _ => None,
        });
        pulse::lock(&self.pulse).advance(cluster_id, revision, chunks);
        self.revisions.send_if_modified(|r| {
            let newer = revision > *r;
            if newer {
                *r = revision;
            }
            newer
        });
    }
}

/// What the state machine of the meta group applied, for the in-memory
/// model to catch up on (see [`State::catch_up`]).
#[derive(Clone, Debug)]
pub enum Applied {
    /// A batch written to sled.
    Batch(Batch),
    /// The records were replaced wholesale (a snapshot was installed).
    Reload,
}

/// Applied changes not yet in the in-memory model.
pub type AppliedQueue = std::sync::Mutex<std::collections::VecDeque<Applied>>;

// ------------------------------------------------------------------ options and views

/// Tunables of the state machine.
#[derive(Clone, Debug)]
pub struct Options {
    /// A chunk without a heartbeat for this long is Dead.
    pub liveness_timeout: Duration,
    /// Target limit (4096 in production; smaller in tests).
    pub max_targets: u32,
    /// LUNs per target (255 in production).
    pub max_luns_per_target: u16,
    /// Seed for ids; `None` seeds from the OS.
    pub seed: Option<u64>,
    /// fsync (sled flush) after every commit.
    pub sync: bool,
    /// Bytes of I/O after which a volume's home is decided (see
    /// `state/locality.rs`); 0 turns data locality off.
    pub locality_window_bytes: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            liveness_timeout: DEFAULT_LIVENESS_TIMEOUT,
            max_targets: MAX_TARGETS,
            max_luns_per_target: MAX_LUNS_PER_TARGET,
            seed: None,
            sync: true,
            locality_window_bytes: locality::DEFAULT_LOCALITY_WINDOW_BYTES,
        }
    }
}

/// What a chunk sends to register.
#[derive(Clone, Debug, Default)]
pub struct ChunkRegistration {
    /// Empty on first registration.
    pub cluster_id: String,
    /// 0 on first registration.
    pub chunk_id: u64,
    /// iSCSI portal `host:port`.
    pub portal: String,
    /// Replication address `host:port`.
    pub data_addr: String,
    /// Raw capacity.
    pub capacity_bytes: u64,
    /// Bytes in use.
    pub used_bytes: u64,
    /// Names this registration across retries (first registration only;
    /// empty: none): a retry whose first try went through gets the chunk
    /// that try created.
    pub request_id: String,
}

/// Longest registration request id.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// A chunk plus its volatile liveness data.
#[derive(Clone, Debug, PartialEq)]
pub struct ChunkView {
    /// The persisted record.
    pub record: ChunkRecord,
    /// Bytes in use (last heartbeat).
    pub used_bytes: u64,
    /// Time since the last heartbeat seen by this meta process.
    pub since_heartbeat: Option<Duration>,
    /// Extent replicas placed on it.
    pub extents: u64,
}

/// Names a volume.
#[derive(Clone, Copy, Debug)]
pub enum VolumeKey<'a> {
    /// By id (UUID text).
    Id(&'a str),
    /// By name.
    Name(&'a str),
}

/// Overall health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// Every extent has its full replica set.
    Ok,
    /// Some extent is short of replicas but has a copy.
    Degraded,
    /// Some extent has no live copy.
    Critical,
}

/// Counters for ClusterStatus.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterStatus {
    /// Cluster id.
    pub cluster_id: Uuid,
    /// Overall health.
    pub health: Health,
    /// Chunk counts by state.
    pub chunks_alive: u64,
    /// Dead chunks.
    pub chunks_dead: u64,
    /// Draining chunks.
    pub chunks_draining: u64,
    /// Removed chunks.
    pub chunks_removed: u64,
    /// Volumes.
    pub volumes: u64,
    /// Snapshots.
    pub snapshots: u64,
    /// Targets.
    pub targets: u64,
    /// Extents.
    pub extents: u64,
    /// Extents below their replication factor (including unavailable ones).
    pub degraded_extents: u64,
    /// Extents with no replica at all.
    pub unavailable_extents: u64,
    /// Recovery tasks queued.
    pub recovery_queued: u64,
    /// Recovery tasks completed.
    pub recovery_completed: u64,
    /// Recovery tasks failed.
    pub recovery_failed: u64,
    /// Rebalance moves queued since the cluster was created.
    pub rebalance_moves: u64,
    /// Metadata revision.
    pub revision: u64,
    /// Records written (sled inserts/removes, the cluster record included)
    /// by this process since it opened the state.
    pub committed_ops: u64,
    /// Calls that waited for their change to be in force (this process).
    pub in_force_waits: u64,
    /// Of those, waits that ended because a participant's lease ran out
    /// (it was fenced out) rather than by every acknowledgement.
    pub in_force_lapsed: u64,
    /// Total milliseconds spent in those waits.
    pub in_force_wait_ms: u64,
}

/// One LUN of an export.
#[derive(Clone, Debug, PartialEq)]
pub struct ExportedLun {
    /// LUN number.
    pub lun: u16,
    /// The volume behind it.
    pub volume: VolumeRecord,
    /// Initiators allowed to see it.
    pub acl: BTreeSet<String>,
    /// The subset of `acl` that sees it write-protected.
    pub read_only: BTreeSet<String>,
}

/// How an initiator on a LUN's ACL may use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AclMode {
    /// Reads and writes.
    ReadWrite,
    /// The LUN is write-protected for this initiator.
    ReadOnly,
}

impl AclMode {
    /// `true` -> [`AclMode::ReadOnly`].
    pub fn from_read_only(ro: bool) -> Self {
        if ro {
            AclMode::ReadOnly
        } else {
            AclMode::ReadWrite
        }
    }
    /// Lower-case name, as the API and CLI print it.
    pub fn as_str(self) -> &'static str {
        match self {
            AclMode::ReadWrite => "read-write",
            AclMode::ReadOnly => "read-only",
        }
    }
}

/// A volume's ACL: every initiator that sees the LUN, and the read-only
/// subset.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AclView {
    /// All initiators (lowercase IQNs), whatever their mode.
    pub initiators: BTreeSet<String>,
    /// The read-only ones (a subset of `initiators`).
    pub read_only: BTreeSet<String>,
}

/// Where an in-force wait stands (see [`State::in_force_waiting`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InForceWait {
    /// Who may still serve on an older view.
    pub waiting: Vec<String>,
    /// The soonest end of their leases.
    pub soonest: Option<Instant>,
    /// Alive chunks behind the revision whose lease has run out.
    pub fenced_out: Vec<String>,
}

/// A target and its LUNs.
#[derive(Clone, Debug, PartialEq)]
pub struct ExportedTarget {
    /// Target IQN.
    pub iqn: String,
    /// LUNs in order.
    pub luns: Vec<ExportedLun>,
}

// ------------------------------------------------------------------ the state

/// The cluster state: in-memory model written through to sled.
pub struct State {
    db: sled::Db,
    trees: Vec<sled::Tree>,
    opts: Options,
    rng: StdRng,
    cluster: ClusterRecord,
    chunks: BTreeMap<u64, ChunkRecord>,
    /// First registrations' request ids and the chunk each got.
    chunk_requests: HashMap<String, u64>,
    /// Liveness, leases and the in-force rule: what heartbeats need, off
    /// the state lock (see `state/pulse.rs`).
    pulse: SharedPulse,
    /// Chunks a copy failed to, until when they take no rebalance move
    /// ([`REBALANCE_COOLDOWN`]; in memory only).
    move_cooldown: HashMap<u64, Instant>,
    /// LUN numbers freed by a delete, and when (in memory only): not handed
    /// out again for two liveness timeouts, so no chunk still serves the old
    /// volume under the number the new one gets (an initiator's kernel
    /// would cache the old identity).
    freed_luns: HashMap<(u32, u16), Instant>,
    volumes: BTreeMap<Uuid, VolumeRecord>,
    volume_names: HashMap<String, Uuid>,
    targets: BTreeMap<u32, TargetRecord>,
    acls: BTreeMap<Uuid, BTreeSet<String>>,
    acl_ro: BTreeMap<Uuid, BTreeSet<String>>,
    snapshots: BTreeMap<Uuid, SnapshotRecord>,
    snapshot_names: HashMap<String, Uuid>,
    /// Keyed by (volume, index, generation), see [`ExtentRecord::key`].
    extents: BTreeMap<ExtentKey, ExtentRecord>,
    tasks: BTreeMap<u64, RecoveryTask>,
    /// Records written since open (see [`ClusterStatus::committed_ops`]).
    committed_ops: u64,
    /// Learned home chunk per volume (persisted, see `state/locality.rs`).
    homes: BTreeMap<Uuid, u64>,
    /// I/O seen per volume since the last home decision (memory only).
    access: HashMap<Uuid, locality::Access>,
    /// The redirectors' VIP leases (see `state/lease.rs`).
    leases: lease::Leases,
    /// The revision, for `WatchRevisions` subscribers.
    revisions: tokio::sync::watch::Sender<u64>,
    /// In-force waits: (count, lapsed, total ms).
    in_force_stats: (u64, u64, u64),
    /// Replicated (a member of a meta group): commits are not written
    /// here but collected in `pending`, for the caller to put through the
    /// group's log (see [`State::take_pending`]); the state machine writes
    /// them to sled once committed and `queue` brings them to memory.
    replicated: Option<Arc<AppliedQueue>>,
    /// Batches committed in memory, not yet through the log.
    pending: Vec<Batch>,
    /// When this model was loaded, or this node last became the leader:
    /// what memory-only guards (leases, freed LUNs) learnt from the log
    /// count from.
    since: Instant,
}

fn encode<T: Serialize>(tree: usize, v: &T) -> Result<Vec<u8>> {
    bincode::serialize(v).map_err(|e| MetaError::Corrupt {
        tree: TREE_NAMES[tree],
        reason: format!("encode: {e}"),
    })
}

fn decode<T: DeserializeOwned>(tree: usize, bytes: &[u8]) -> Result<T> {
    bincode::deserialize(bytes).map_err(|e| MetaError::Corrupt {
        tree: TREE_NAMES[tree],
        reason: format!("decode: {e}"),
    })
}

fn extent_key(volume: &Uuid, index: u64, generation: u64) -> Vec<u8> {
    let mut k = volume.0.to_vec();
    k.extend_from_slice(&index.to_be_bytes());
    k.extend_from_slice(&generation.to_be_bytes());
    k
}

fn validate_name(kind: &str, name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 253 {
        return Err(MetaError::InvalidArgument(format!(
            "{kind} name must be 1..=253 bytes, got {}",
            name.len()
        )));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
    {
        return Err(MetaError::InvalidArgument(format!(
            "{kind} name {name:?} may only contain ASCII letters, digits, '-', '_', '.', ':'"
        )));
    }
    Ok(())
}

fn validate_size(size: u64) -> Result<()> {
    if size == 0 {
        return Err(MetaError::InvalidArgument("size must not be 0".into()));
    }
    if !size.is_multiple_of(BLOCK_SIZE) {
        return Err(MetaError::InvalidArgument(format!(
            "size {size} is not a multiple of {BLOCK_SIZE}"
        )));
    }
    if size > MAX_VOLUME_SIZE {
        return Err(MetaError::InvalidArgument(format!(
            "size {size} exceeds the maximum volume size {MAX_VOLUME_SIZE}"
        )));
    }
    Ok(())
}

fn validate_replicas(replicas: u32) -> Result<()> {
    if !(1..=MAX_REPLICAS).contains(&replicas) {
        return Err(MetaError::InvalidArgument(format!(
            "replication factor must be 1..={MAX_REPLICAS}, got {replicas}"
        )));
    }
    Ok(())
}

fn validate_addr(what: &str, addr: &str) -> Result<()> {
    let ok = addr
        .rsplit_once(':')
        .map(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0))
        .unwrap_or(false);
    if ok {
        Ok(())
    } else {
        Err(MetaError::InvalidArgument(format!(
            "{what} {addr:?} is not host:port"
        )))
    }
}

/// Validates and normalises (lowercases) an initiator name: `iqn.`, `eui.`
/// or `naa.` form, at most 223 bytes (RFC 7143 section 4.2.7.1).
pub fn normalize_initiator(name: &str) -> Result<String> {
    let n = name.to_ascii_lowercase();
    let prefix_ok = n.starts_with("iqn.") || n.starts_with("eui.") || n.starts_with("naa.");
    let chars_ok = n
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'));
    if !prefix_ok || !chars_ok || n.len() > 223 || n.len() < 5 {
        return Err(MetaError::InvalidArgument(format!(
            "{name:?} is not an iSCSI initiator name (iqn./eui./naa., at most 223 bytes)"
        )));
    }
    Ok(n)
}

fn extent_count(size: u64) -> u64 {
    size.div_ceil(EXTENT_SIZE)
}

// ------------------------------------------------------------------ sled encoding

/// The sled writes of ops: (tree index, key, value; `None` removes).
pub(crate) type Writes = Vec<(usize, Vec<u8>, Option<Vec<u8>>)>;

fn freed_key(target: u32, lun: u16) -> Vec<u8> {
    let mut k = target.to_be_bytes().to_vec();
    k.extend_from_slice(&lun.to_be_bytes());
    k
}

/// Encodes `ops` as sled writes into the record trees ([`TREE_NAMES`]).
pub(crate) fn op_writes(ops: &[Op]) -> Result<Writes> {
    let mut writes: Writes = Vec::with_capacity(ops.len());
    for op in ops {
        writes.push(match op {
            Op::Cluster(c) => (T_CLUSTER, CLUSTER_KEY.to_vec(), Some(encode(T_CLUSTER, c)?)),
            Op::Chunk(c) => (
                T_CHUNKS,
                c.id.to_be_bytes().to_vec(),
                Some(encode(T_CHUNKS, c)?),
            ),
            Op::Volume(v) => (T_VOLUMES, v.id.0.to_vec(), Some(encode(T_VOLUMES, v)?)),
            Op::DelVolume(id) => (T_VOLUMES, id.0.to_vec(), None),
            Op::Target(t) => (
                T_TARGETS,
                t.number.to_be_bytes().to_vec(),
                Some(encode(T_TARGETS, t)?),
            ),
            Op::Acl(id, set) => (T_ACLS, id.0.to_vec(), Some(encode(T_ACLS, set)?)),
            Op::DelAcl(id) => (T_ACLS, id.0.to_vec(), None),
            Op::AclRo(id, set) if set.is_empty() => (T_ACL_RO, id.0.to_vec(), None),
            Op::AclRo(id, set) => (T_ACL_RO, id.0.to_vec(), Some(encode(T_ACL_RO, set)?)),
            Op::DelAclRo(id) => (T_ACL_RO, id.0.to_vec(), None),
            Op::Snapshot(s) => (T_SNAPSHOTS, s.id.0.to_vec(), Some(encode(T_SNAPSHOTS, s)?)),
            Op::DelSnapshot(id) => (T_SNAPSHOTS, id.0.to_vec(), None),
            Op::Extent(e) => (
                T_EXTENTS,
                extent_key(&e.volume, e.index, e.generation),
                Some(encode(T_EXTENTS, e)?),
            ),
            Op::DelExtent(v, i, g) => (T_EXTENTS, extent_key(v, *i, *g), None),
            Op::Task(t) => (
                T_RECOVERY,
                t.id.to_be_bytes().to_vec(),
                Some(encode(T_RECOVERY, t)?),
            ),
            Op::DelTask(id) => (T_RECOVERY, id.to_be_bytes().to_vec(), None),
            Op::Home(id, home) => (
                T_HOME,
                id.0.to_vec(),
                match home {
                    Some(c) => Some(encode(T_HOME, c)?),
                    None => None,
                },
            ),
            Op::Lease(vip, rec) => (
                T_LEASES,
                vip.as_bytes().to_vec(),
                Some(encode(T_LEASES, rec)?),
            ),
            Op::FreedLun(t, l, true) => (T_FREED, freed_key(*t, *l), Some(encode(T_FREED, &true)?)),
            Op::FreedLun(t, l, false) => (T_FREED, freed_key(*t, *l), None),
            Op::ChunkRequest(r, id) => (
                T_CHUNK_REQ,
                r.as_bytes().to_vec(),
                Some(encode(T_CHUNK_REQ, id)?),
            ),
        });
    }
    Ok(writes)
}

/// Writes `writes` in one sled transaction over `trees`: the record trees
/// in [`TREE_NAMES`] order, then any the caller appends (the meta group's
/// state machine adds its own, so a batch and its log position are written
/// together).
pub(crate) fn transact(trees: &[sled::Tree], writes: &Writes) -> Result<()> {
    let res: std::result::Result<(), TransactionError<()>> = trees.transaction(|tx| {
        for (t, k, v) in writes {
            match v {
                Some(v) => {
                    tx[*t].insert(k.as_slice(), v.as_slice())?;
                }
                None => {
                    tx[*t].remove(k.as_slice())?;
                }
            }
        }
        Ok::<(), ConflictableTransactionError<()>>(())
    });
    match res {
        Ok(()) => Ok(()),
        Err(TransactionError::Storage(e)) => Err(MetaError::Store(e)),
        Err(TransactionError::Abort(())) => Err(MetaError::Corrupt {
            tree: "transaction",
            reason: "aborted".into(),
        }),
    }
}

/// The names of the record trees, in the order [`transact`] takes them.
pub(crate) fn record_tree_names() -> &'static [&'static str] {
    &TREE_NAMES
}

/// The revision a store's cluster record holds (0: none yet).
pub(crate) fn stored_revision(cluster_tree: &sled::Tree) -> Result<u64> {
    Ok(match cluster_tree.get(CLUSTER_KEY)? {
        Some(b) => decode::<ClusterRecord>(T_CLUSTER, &b)?.revision,
        None => 0,
    })
}

impl State {
    /// Opens (or initialises) the state in `dir`.
    ///
    /// sled releases its directory lock asynchronously after the previous
    /// [`State`] in this process is dropped (its thread pool lets go a little
    /// later), so lock contention is retried for up to 5 s. This blocks the
    /// calling thread; async callers use `spawn_blocking`.
    pub fn open(dir: &Path, opts: Options, now: Instant) -> Result<State> {
        Self::from_db(open_db(dir)?, opts, now, None)
    }

    /// The state of a meta group member on `db` (see [`Batch`]): commits
    /// are collected for the group's log, and `queue` brings what the
    /// state machine applied into memory. A fresh store holds no cluster
    /// record until the first leader commits one (revision 0 until then).
    pub fn open_replicated(
        db: sled::Db,
        opts: Options,
        now: Instant,
        queue: Arc<AppliedQueue>,
    ) -> Result<State> {
        Self::from_db(db, opts, now, Some(queue))
    }
}

/// Opens the sled database in `dir`.
///
/// sled releases its directory lock asynchronously after the previous
/// database in this process is dropped (its thread pool lets go a little
/// later), so lock contention is retried for up to 5 s. This blocks the
/// calling thread; async callers use `spawn_blocking`.
pub fn open_db(dir: &Path) -> Result<sled::Db> {
    {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let db = loop {
            match sled::Config::new().path(dir).open() {
                Ok(db) => break db,
                // sled reports the lock as a custom `Other` error wrapping
                // the WouldBlock of flock(2).
                Err(sled::Error::Io(e))
                    if (e.kind() == std::io::ErrorKind::WouldBlock
                        || e.to_string().contains("could not acquire lock"))
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e.into()),
            }
        };
        Ok(db)
    }
}

impl State {
    fn from_db(
        db: sled::Db,
        opts: Options,
        now: Instant,
        replicated: Option<Arc<AppliedQueue>>,
    ) -> Result<State> {
        let trees = TREE_NAMES
            .iter()
            .map(|n| db.open_tree(n))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let mut rng = match opts.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_entropy(),
        };
        let (cluster, fresh) = match trees[T_CLUSTER].get(CLUSTER_KEY)? {
            Some(b) => (decode::<ClusterRecord>(T_CLUSTER, &b)?, false),
            None => (
                ClusterRecord {
                    cluster_id: Uuid::random(&mut rng),
                    next_chunk_id: 1,
                    next_task_id: 1,
                    revision: 0,
                    recovery_completed: 0,
                    recovery_failed: 0,
                    rebalance_moves: 0,
                },
                true,
            ),
        };
        let leases = lease::Leases::new(now);
        let opts_bound = opts.liveness_timeout;
        let revision0 = cluster.revision;
        let cluster_id0 = cluster.cluster_id;
        let mut st = State {
            db,
            trees,
            opts,
            rng,
            cluster,
            chunks: BTreeMap::new(),
            chunk_requests: HashMap::new(),
            pulse: Arc::new(std::sync::Mutex::new(Pulse::new(
                cluster_id0,
                revision0,
                opts_bound,
            ))),
            move_cooldown: HashMap::new(),
            freed_luns: HashMap::new(),
            volumes: BTreeMap::new(),
            volume_names: HashMap::new(),
            targets: BTreeMap::new(),
            acls: BTreeMap::new(),
            acl_ro: BTreeMap::new(),
            snapshots: BTreeMap::new(),
            snapshot_names: HashMap::new(),
            extents: BTreeMap::new(),
            tasks: BTreeMap::new(),
            committed_ops: 0,
            homes: BTreeMap::new(),
            access: HashMap::new(),
            leases,
            revisions: tokio::sync::watch::channel(revision0).0,
            in_force_stats: (0, 0, 0),
            replicated,
            pending: Vec::new(),
            since: now,
        };
        if fresh && st.replicated.is_none() {
            info!(cluster_id = %st.cluster.cluster_id, "initialising new cluster");
            let c = st.cluster.clone();
            st.commit(vec![Op::Cluster(c)])?;
        }
        st.load(now)?;
        info!(
            cluster_id = %st.cluster.cluster_id,
            chunks = st.chunks.len(),
            volumes = st.volumes.len(),
            snapshots = st.snapshots.len(),
            targets = st.targets.len(),
            extents = st.extents.len(),
            "meta state loaded"
        );
        Ok(st)
    }

    /// Decode every record of tree `t` into an [`Op`] with `mk`.
    fn load_tree<T: DeserializeOwned>(
        &self,
        t: usize,
        mk: fn(T) -> Op,
        ops: &mut Vec<Op>,
    ) -> Result<()> {
        for kv in self.trees[t].iter() {
            let (_, v) = kv?;
            ops.push(mk(decode(t, &v)?));
        }
        Ok(())
    }

    /// [`State::load_tree`] for a tree keyed by UTF-8 names (a VIP, a
    /// request id): `mk` gets the name and the record.
    fn load_named<T: DeserializeOwned>(
        &self,
        t: usize,
        mk: fn(String, T) -> Op,
        ops: &mut Vec<Op>,
    ) -> Result<()> {
        for kv in self.trees[t].iter() {
            let (k, v) = kv?;
            let name = String::from_utf8(k.to_vec()).map_err(|e| MetaError::Corrupt {
                tree: TREE_NAMES[t],
                reason: e.to_string(),
            })?;
            ops.push(mk(name, decode(t, &v)?));
        }
        Ok(())
    }

    fn load(&mut self, now: Instant) -> Result<()> {
        let mut ops = Vec::new();
        self.load_tree(T_CHUNKS, Op::Chunk, &mut ops)?;
        self.load_tree(T_VOLUMES, Op::Volume, &mut ops)?;
        self.load_tree(T_TARGETS, Op::Target, &mut ops)?;
        for (t, mk) in [
            (T_ACLS, Op::Acl as fn(Uuid, BTreeSet<String>) -> Op),
            (T_ACL_RO, Op::AclRo),
        ] {
            for kv in self.trees[t].iter() {
                let (k, v) = kv?;
                let id: [u8; 16] = k.as_ref().try_into().map_err(|_| MetaError::Corrupt {
                    tree: TREE_NAMES[t],
                    reason: "bad key length".into(),
                })?;
                ops.push(mk(Uuid(id), decode(t, &v)?));
            }
        }
        self.load_tree(T_SNAPSHOTS, Op::Snapshot, &mut ops)?;
        for kv in self.trees[T_EXTENTS].iter() {
            let (_, v) = kv?;
            ops.push(Op::Extent(decode_extent(&v)?));
        }
        self.load_tree(T_RECOVERY, Op::Task, &mut ops)?;
        for kv in self.trees[T_HOME].iter() {
            let (k, v) = kv?;
            let id: [u8; 16] = k.as_ref().try_into().map_err(|_| MetaError::Corrupt {
                tree: TREE_NAMES[T_HOME],
                reason: "bad key length".into(),
            })?;
            ops.push(Op::Home(Uuid(id), Some(decode(T_HOME, &v)?)));
        }
        self.load_named(T_LEASES, Op::Lease, &mut ops)?;
        for kv in self.trees[T_FREED].iter() {
            let (k, _) = kv?;
            let k: [u8; 6] = k.as_ref().try_into().map_err(|_| MetaError::Corrupt {
                tree: TREE_NAMES[T_FREED],
                reason: "bad key length".into(),
            })?;
            let target = u32::from_be_bytes([k[0], k[1], k[2], k[3]]);
            ops.push(Op::FreedLun(target, u16::from_be_bytes([k[4], k[5]]), true));
        }
        self.load_named(T_CHUNK_REQ, Op::ChunkRequest, &mut ops)?;
        for op in ops {
            self.apply(op);
        }
        // Records from before per-record factors: the volume's factor is the
        // one they were created with (it could not change then). Memory
        // only; the record's next change writes the new layout.
        for e in self.extents.values_mut().filter(|e| e.replication == 0) {
            e.replication = self.volumes.get(&e.volume).map(|v| v.replicas).unwrap_or(1);
        }
        // Every chunk that was alive gets a full timeout of grace after a
        // meta restart.
        self.grant_grace(now);
        Ok(())
    }

    /// Every alive or draining chunk without liveness data gets a full
    /// liveness timeout from `now` before it can be declared dead, and is
    /// taken to hold a lease that long (one an earlier meta or leader
    /// granted may still run).
    fn grant_grace(&mut self, now: Instant) {
        let grace = self.opts.liveness_timeout;
        let mut p = pulse::lock(&self.pulse);
        for c in self.chunks.values() {
            if matches!(c.state, ChunkState::Alive | ChunkState::Draining) {
                p.live.entry(c.id).or_insert(Liveness {
                    last_seen: now,
                    used_bytes: 0,
                    applied_revision: 0,
                    lease_until: now + grace,
                });
            }
        }
    }

    /// Replaces every record in memory with what sled holds (a snapshot
    /// was installed, or a replicated commit failed and memory ran ahead
    /// of the log). Memory-only knowledge (liveness, lease ends) stays for
    /// the chunks and leases that are still there.
    fn reload(&mut self, now: Instant) -> Result<()> {
        if let Some(b) = self.trees[T_CLUSTER].get(CLUSTER_KEY)? {
            self.cluster = decode(T_CLUSTER, &b)?;
        }
        self.chunks.clear();
        self.volumes.clear();
        self.volume_names.clear();
        self.targets.clear();
        self.acls.clear();
        self.acl_ro.clear();
        self.snapshots.clear();
        self.snapshot_names.clear();
        self.extents.clear();
        self.tasks.clear();
        self.homes.clear();
        self.chunk_requests.clear();
        self.leases.forget_records();
        let live = std::mem::take(&mut pulse::lock(&self.pulse).live);
        self.load(now)?;
        let mut p = pulse::lock(&self.pulse);
        for (id, l) in live {
            if p.live.contains_key(&id) {
                p.live.insert(id, l);
            }
        }
        drop(p);
        self.announce();
        Ok(())
    }

    /// Brings what the meta group's state machine applied into memory
    /// (a member's model follows the log; on the leader its own batches
    /// are there already). A no-op for a standalone state.
    pub fn catch_up(&mut self, now: Instant) -> Result<()> {
        let Some(queue) = self.replicated.clone() else {
            return Ok(());
        };
        loop {
            let next = queue
                .lock()
                .map_err(|_| MetaError::Corrupt {
                    tree: "applied queue",
                    reason: "lock poisoned".into(),
                })?
                .pop_front();
            let Some(next) = next else { break };
            match next {
                Applied::Reload => self.reload(now)?,
                Applied::Batch(b) => {
                    let rev = b.revision();
                    if rev <= self.cluster.revision {
                        continue;
                    }
                    if b.base_revision != self.cluster.revision {
                        // Memory is off the log's line (it ran ahead with
                        // a commit that did not make it): start again from
                        // what the state machine wrote.
                        self.reload(now)?;
                        continue;
                    }
                    for op in b.ops {
                        self.apply(op);
                    }
                    self.announce();
                }
            }
        }
        Ok(())
    }

    /// The batches committed in memory since the last call, for the
    /// caller to put through the meta group's log (in order; see
    /// `raft/commit.rs`). Empty for a standalone state.
    pub fn take_pending(&mut self) -> Vec<Batch> {
        std::mem::take(&mut self.pending)
    }

    /// Whether commits wait to go through a meta group's log.
    pub fn is_replicated(&self) -> bool {
        self.replicated.is_some()
    }

    /// The batches did not go through the log (or went through as a
    /// conflict): memory ran ahead, so reload it from what is applied.
    pub fn replicated_failed(&mut self, now: Instant) -> Result<()> {
        self.pending.clear();
        self.catch_up(now)?;
        self.reload(now)
    }

    /// This node just became the meta group's leader (its model caught up
    /// with the log): nothing any earlier leader granted may be cut short.
    /// Every alive or draining chunk gets a full liveness timeout before it
    /// can be declared dead (and is taken to hold a lease that long), every
    /// recorded VIP lease counts as held by its last holder for its ttl,
    /// and every freed LUN stays guarded as if freed now. A never
    /// initialised cluster gets its cluster record (committed, for the
    /// caller to replicate).
    pub fn on_leader_start(&mut self, now: Instant) -> Result<()> {
        self.since = now;
        let grace = self.opts.liveness_timeout;
        pulse::lock(&self.pulse).live.clear();
        self.grant_grace(now);
        self.leases.restart(now);
        for at in self.freed_luns.values_mut() {
            *at = now;
        }
        pulse::lock(&self.pulse).in_force = in_force::InForce::new(grace);
        self.announce();
        if self.cluster.revision == 0 {
            info!(cluster_id = %self.cluster.cluster_id, "initialising new cluster");
            let c = self.cluster.clone();
            self.commit(vec![Op::Cluster(c)])?;
        }
        Ok(())
    }

    /// Writes `ops` (plus a revision bump) in one sled transaction, then
    /// applies them to memory. Replicated, the batch is kept for the
    /// caller to put through the log instead (see [`State::take_pending`]).
    fn commit(&mut self, mut ops: Vec<Op>) -> Result<()> {
        let mut cluster = ops
            .iter()
            .rev()
            .find_map(|o| match o {
                Op::Cluster(c) => Some(c.clone()),
                _ => None,
            })
            .unwrap_or_else(|| self.cluster.clone());
        cluster.revision = self.cluster.revision + 1;
        ops.retain(|o| !matches!(o, Op::Cluster(_)));
        ops.push(Op::Cluster(cluster));

        let base_revision = self.cluster.revision;
        let written = if self.replicated.is_some() {
            self.pending.push(Batch {
                base_revision,
                ops: ops.clone(),
            });
            ops.len()
        } else {
            let writes = op_writes(&ops)?;
            transact(&self.trees, &writes)?;
            if self.opts.sync {
                self.db.flush()?;
            }
            writes.len()
        };
        self.committed_ops += written as u64;
        for op in ops {
            self.apply(op);
        }
        if self.replicated.is_none() {
            self.announce();
        }
        Ok(())
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Cluster(c) => self.cluster = c,
            Op::Chunk(c) => {
                if matches!(c.state, ChunkState::Dead | ChunkState::Removed) {
                    pulse::lock(&self.pulse).gone(c.id, c.state);
                }
                self.chunks.insert(c.id, c);
            }
            Op::Volume(v) => {
                self.volume_names.insert(v.name.clone(), v.id);
                self.volumes.insert(v.id, v);
            }
            Op::DelVolume(id) => {
                if let Some(v) = self.volumes.remove(&id) {
                    self.volume_names.remove(&v.name);
                }
            }
            Op::Target(t) => {
                self.targets.insert(t.number, t);
            }
            Op::Acl(id, set) => {
                self.acls.insert(id, set);
            }
            Op::DelAcl(id) => {
                self.acls.remove(&id);
            }
            Op::AclRo(id, set) => {
                if set.is_empty() {
                    self.acl_ro.remove(&id);
                } else {
                    self.acl_ro.insert(id, set);
                }
            }
            Op::DelAclRo(id) => {
                self.acl_ro.remove(&id);
            }
            Op::Snapshot(s) => {
                self.snapshot_names.insert(s.name.clone(), s.id);
                self.snapshots.insert(s.id, s);
            }
            Op::DelSnapshot(id) => {
                if let Some(s) = self.snapshots.remove(&id) {
                    self.snapshot_names.remove(&s.name);
                }
            }
            Op::Extent(e) => {
                self.extents.insert(e.key(), e);
            }
            Op::DelExtent(v, i, g) => {
                self.extents.remove(&(v, i, g));
            }
            Op::Task(t) => {
                self.tasks.insert(t.id, t);
            }
            Op::DelTask(id) => {
                self.tasks.remove(&id);
            }
            Op::Home(id, Some(c)) => {
                self.homes.insert(id, c);
            }
            Op::Home(id, None) => {
                self.homes.remove(&id);
                self.access.remove(&id);
            }
            Op::Lease(vip, rec) => self.leases.note_record(vip, rec),
            Op::FreedLun(t, l, true) => {
                let since = self.since;
                self.freed_luns.entry((t, l)).or_insert(since);
            }
            Op::FreedLun(t, l, false) => {
                self.freed_luns.remove(&(t, l));
            }
            Op::ChunkRequest(r, id) => {
                self.chunk_requests.insert(r, id);
            }
        }
    }

    /// Flushes sled.
    pub fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }

    // -------------------------------------------------------------- accessors

    /// The cluster id.
    pub fn cluster_id(&self) -> Uuid {
        self.cluster.cluster_id
    }

    /// Short form of the cluster id used in target IQNs (8 hex digits).
    pub fn cluster_short(&self) -> String {
        self.cluster.cluster_id.simple()[..8].to_string()
    }

    /// Metadata revision (bumped on every change).
    pub fn revision(&self) -> u64 {
        self.cluster.revision
    }

    /// The options in force.
    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// The IQN of target number `n`.
    pub fn target_iqn(&self, n: u32) -> String {
        self.targets
            .get(&n)
            .map(|t| t.iqn.clone())
            .unwrap_or_default()
    }

    // -------------------------------------------------------------- chunks

    fn check_cluster_id(&self, given: &str) -> Result<()> {
        pulse::check_cluster_id(self.cluster.cluster_id, given)
    }

    fn chunk(&self, id: u64) -> Result<&ChunkRecord> {
        self.chunks
            .get(&id)
            .ok_or_else(|| MetaError::NotFound(format!("chunk {id}")))
    }

    /// Registers a new chunk or re-registers a known one (same id).
    pub fn register_chunk(
        &mut self,
        reg: &ChunkRegistration,
        now: Instant,
        unix_ms: u64,
    ) -> Result<ChunkRecord> {
        validate_addr("portal", &reg.portal)?;
        validate_addr("data address", &reg.data_addr)?;
        if !reg.cluster_id.is_empty() {
            self.check_cluster_id(&reg.cluster_id)?;
        } else if reg.chunk_id != 0 {
            return Err(MetaError::InvalidArgument(
                "a chunk id without its cluster id".into(),
            ));
        }
        if reg.request_id.len() > MAX_REQUEST_ID_LEN {
            return Err(MetaError::InvalidArgument(format!(
                "request id longer than {MAX_REQUEST_ID_LEN} bytes"
            )));
        }
        // A retried first registration whose first try went through: it
        // re-registers the chunk that try created.
        let chunk_id = match reg.chunk_id {
            0 if !reg.request_id.is_empty() => self
                .chunk_requests
                .get(&reg.request_id)
                .copied()
                .unwrap_or(0),
            id => id,
        };
        let record = if chunk_id == 0 {
            if let Some(c) = self.chunks.values().find(|c| {
                c.portal == reg.portal
                    && matches!(c.state, ChunkState::Alive | ChunkState::Draining)
            }) {
                return Err(MetaError::AlreadyExists(format!(
                    "portal {} belongs to live chunk {}; a restarting chunk must send its id",
                    reg.portal, c.id
                )));
            }
            let mut cluster = self.cluster.clone();
            let id = cluster.next_chunk_id;
            cluster.next_chunk_id += 1;
            let rec = ChunkRecord {
                id,
                portal: reg.portal.clone(),
                data_addr: reg.data_addr.clone(),
                capacity_bytes: reg.capacity_bytes,
                state: ChunkState::Alive,
                registered_at_unix_ms: unix_ms,
            };
            let mut ops = vec![Op::Cluster(cluster), Op::Chunk(rec.clone())];
            if !reg.request_id.is_empty() {
                ops.push(Op::ChunkRequest(reg.request_id.clone(), id));
            }
            self.commit(ops)?;
            info!(chunk = id, portal = %rec.portal, "chunk registered");
            rec
        } else {
            let old = self.chunk(chunk_id)?.clone();
            if old.state == ChunkState::Removed {
                return Err(MetaError::FailedPrecondition(format!(
                    "chunk {} was removed from the cluster and cannot register again",
                    old.id
                )));
            }
            let state = if old.state == ChunkState::Draining {
                ChunkState::Draining
            } else {
                ChunkState::Alive
            };
            let rec = ChunkRecord {
                portal: reg.portal.clone(),
                data_addr: reg.data_addr.clone(),
                capacity_bytes: reg.capacity_bytes,
                state,
                ..old.clone()
            };
            if rec != old {
                self.commit(vec![Op::Chunk(rec.clone())])?;
            }
            info!(chunk = rec.id, was = ?old.state, "chunk re-registered");
            rec
        };
        // A (re)starting chunk process holds no cached extent views: it is
        // up to date for the snapshot barrier.
        pulse::lock(&self.pulse).live.insert(
            record.id,
            Liveness {
                last_seen: now,
                used_bytes: reg.used_bytes,
                applied_revision: self.cluster.revision,
                lease_until: now + self.opts.liveness_timeout,
            },
        );
        // A new or returning chunk is a spare for degraded extents.
        self.reconcile()?;
        Ok(record)
    }

    /// Records a heartbeat (liveness and used bytes) on the published
    /// state. Returns the chunk's state and the revision. For the unit
    /// tests: the heartbeat call goes to the pulse without the state lock
    /// ([`Pulse::heartbeat`]).
    #[cfg(test)]
    pub(crate) fn heartbeat(
        &mut self,
        cluster_id: &str,
        chunk_id: u64,
        used_bytes: u64,
        now: Instant,
    ) -> Result<(ChunkState, u64)> {
        pulse::lock(&self.pulse).beat(cluster_id, chunk_id, used_bytes, now)
    }

    /// The pulse (for the heartbeat handler).
    pub fn pulse(&self) -> SharedPulse {
        self.pulse.clone()
    }

    /// Publish what is durable into the pulse and announce the revision to
    /// `WatchRevisions` subscribers.
    fn announce(&mut self) {
        pulse::lock(&self.pulse).publish(
            self.cluster.cluster_id,
            self.cluster.revision,
            self.chunks.values().map(|c| (c.id, c.state)),
        );
        self.revisions.send_replace(self.cluster.revision);
    }

    /// Fold the volume I/O heartbeats reported into the locality model
    /// (see `state/locality.rs`); may commit a home change.
    pub fn fold_io(&mut self) -> Result<()> {
        let queued = pulse::lock(&self.pulse).take_io();
        for (chunk, io) in queued {
            self.note_access(chunk, &io)?;
        }
        Ok(())
    }

    /// Whether `chunk` serves I/O (alive or draining).
    fn serving(&self, chunk: u64) -> bool {
        self.chunks
            .get(&chunk)
            .is_some_and(|c| matches!(c.state, ChunkState::Alive | ChunkState::Draining))
    }

    fn extents_per_chunk(&self) -> HashMap<u64, u64> {
        let mut m = HashMap::new();
        for e in self.extents.values() {
            for c in e.replicas.iter().chain(&e.learners) {
                *m.entry(*c).or_insert(0) += 1;
            }
        }
        m
    }

    /// All chunks with their liveness.
    pub fn list_chunks(&self, now: Instant) -> Vec<ChunkView> {
        let counts = self.extents_per_chunk();
        self.chunks
            .values()
            .map(|c| {
                let l = pulse::lock(&self.pulse).live.get(&c.id).copied();
                ChunkView {
                    record: c.clone(),
                    used_bytes: l.map(|l| l.used_bytes).unwrap_or(0),
                    since_heartbeat: l.map(|l| now.saturating_duration_since(l.last_seen)),
                    extents: counts.get(&c.id).copied().unwrap_or(0),
                }
            })
            .collect()
    }

    /// One chunk with its liveness.
    pub fn get_chunk(&self, id: u64, now: Instant) -> Result<ChunkView> {
        self.chunk(id)?;
        self.list_chunks(now)
            .into_iter()
            .find(|c| c.record.id == id)
            .ok_or_else(|| MetaError::NotFound(format!("chunk {id}")))
    }

    /// Stops placing extents on a chunk and queues moves off it.
    pub fn drain_chunk(&mut self, id: u64) -> Result<ChunkRecord> {
        let c = self.chunk(id)?.clone();
        match c.state {
            ChunkState::Draining => return Ok(c),
            ChunkState::Dead | ChunkState::Removed => {
                return Err(MetaError::FailedPrecondition(format!(
                    "chunk {id} is {:?}; only an alive chunk can be drained",
                    c.state
                )))
            }
            ChunkState::Alive => {}
        }
        let rec = ChunkRecord {
            state: ChunkState::Draining,
            ..c
        };
        // Copies to the draining chunk are abandoned (their learners
        // dropped); reconcile queues them elsewhere.
        let mut ops = Vec::new();
        let mut abandoned = 0;
        for t in self.tasks.values().filter(|t| t.target_chunk == id) {
            self.drop_task_ops(t, &mut ops);
            abandoned += 1;
        }
        if abandoned > 0 {
            let mut cluster = self.cluster.clone();
            cluster.recovery_failed += abandoned;
            ops.push(Op::Cluster(cluster));
        }
        ops.push(Op::Chunk(rec.clone()));
        self.commit(ops)?;
        info!(chunk = id, "chunk draining");
        self.reconcile()?;
        Ok(rec)
    }

    /// Forgets a chunk for good. It must hold no extent unless it is dead.
    pub fn remove_chunk(&mut self, id: u64) -> Result<ChunkRecord> {
        let c = self.chunk(id)?.clone();
        if c.state == ChunkState::Removed {
            return Ok(c);
        }
        let held = self.extents_per_chunk().get(&id).copied().unwrap_or(0);
        if held > 0 {
            return Err(MetaError::FailedPrecondition(format!(
                "chunk {id} still holds {held} extent replicas; drain it first"
            )));
        }
        let mut ops: Vec<Op> = Vec::new();
        for t in self
            .tasks
            .values()
            .filter(|t| t.target_chunk == id || t.replaces == Some(id))
        {
            self.drop_task_ops(t, &mut ops);
        }
        let rec = ChunkRecord {
            state: ChunkState::Removed,
            ..c
        };
        ops.push(Op::Chunk(rec.clone()));
        self.commit(ops)?;
        info!(chunk = id, "chunk removed");
        self.reconcile()?;
        Ok(rec)
    }

    /// Declares every chunk silent for the liveness timeout Dead, strips it
    /// from all replica sets (bumping epochs) and queues recovery. Returns
    /// the chunks declared dead.
    pub fn check_liveness(&mut self, now: Instant) -> Result<Vec<u64>> {
        let timeout = self.opts.liveness_timeout;
        let p = pulse::lock(&self.pulse);
        let dead: Vec<u64> = self
            .chunks
            .values()
            .filter(|c| matches!(c.state, ChunkState::Alive | ChunkState::Draining))
            .filter(|c| {
                p.live
                    .get(&c.id)
                    .is_none_or(|l| now.saturating_duration_since(l.last_seen) >= timeout)
            })
            .map(|c| c.id)
            .collect();
        drop(p);
        self.end_cooldowns()?;
        if dead.is_empty() {
            return Ok(dead);
        }
        let mut ops = Vec::new();
        let mut failed_tasks = 0;
        for id in &dead {
            if let Some(c) = self.chunks.get(id) {
                ops.push(Op::Chunk(ChunkRecord {
                    state: ChunkState::Dead,
                    ..c.clone()
                }));
            }
        }
        let mut bumped = 0usize;
        let mut stranded = 0usize;
        for e in self.extents.values() {
            if e.replicas
                .iter()
                .chain(&e.learners)
                .any(|r| dead.contains(r))
            {
                let mut e2 = e.clone();
                e2.learners.retain(|r| !dead.contains(r));
                if e.replicas
                    .iter()
                    .any(|r| !dead.contains(r) && self.serving(*r))
                {
                    e2.replicas.retain(|r| !dead.contains(r));
                } else {
                    // Every member died at once: they all hold every
                    // acknowledged write, and nobody else does. Keep them
                    // as members (the extent is unavailable, not lost)
                    // until one comes back; emptying the set would let
                    // their copies be garbage-collected on return.
                    stranded += 1;
                }
                if e2 != *e {
                    e2.epoch += 1;
                    ops.push(Op::Extent(e2));
                    bumped += 1;
                }
            }
        }
        if stranded > 0 {
            warn!(
                extents = stranded,
                "every member of some extents is dead; they stay members (unavailable until one returns)"
            );
        }
        for t in self.tasks.values() {
            if dead.contains(&t.target_chunk) {
                ops.push(Op::DelTask(t.id));
                failed_tasks += 1;
            } else if t.replaces.is_some_and(|r| dead.contains(&r)) {
                // The chunk being drained died: its extents were already
                // stripped; the task becomes a plain re-replication.
                let mut t2 = t.clone();
                t2.replaces = None;
                t2.sources.retain(|s| !dead.contains(s));
                ops.push(Op::Task(t2));
            }
        }
        if failed_tasks > 0 {
            let mut cluster = self.cluster.clone();
            cluster.recovery_failed += failed_tasks;
            ops.push(Op::Cluster(cluster));
        }
        self.commit(ops)?;
        warn!(chunks = ?dead, extents = bumped, "chunks declared dead; replica sets shrunk");
        self.reconcile()?;
        Ok(dead)
    }

    /// Load per placeable chunk: extent replicas, learners included (a
    /// queued copy's target is a learner of its extent).
    fn load_map(&self) -> HashMap<u64, u64> {
        self.extents_per_chunk()
    }

    /// Thick bytes reserved per chunk.
    fn reserved_map(&self) -> HashMap<u64, u64> {
        let mut m = HashMap::new();
        for e in self.extents.values() {
            if self.volumes.get(&e.volume).is_some_and(|v| !v.thin) {
                for c in e.replicas.iter().chain(&e.learners) {
                    *m.entry(*c).or_insert(0) += EXTENT_SIZE;
                }
            }
        }
        m
    }

    /// Queues a recovery task for every extent that is short of replicas or
    /// sits on a draining chunk and has none yet, when a spare exists. The
    /// spare becomes a learner of the extent in the same commit (epoch + 1)
    /// and the task carries that epoch. Learners without a task (left over
    /// by an older version or a bug) are dropped. An extent with more
    /// members than its replication factor (lowered by
    /// [`State::set_replicas`]) and no task in flight loses the surplus
    /// ([`State::surplus_members`], epoch + 1). "Short" and "surplus" go by
    /// the record's own factor ([`ExtentRecord::replication`]).
    fn reconcile(&mut self) -> Result<usize> {
        self.reconcile_avoiding(&[])
    }

    /// [`State::reconcile`], choosing the chunks in `avoid` (which just
    /// failed an I/O) as spares only when nothing else is left.
    fn reconcile_avoiding(&mut self, avoid: &[u64]) -> Result<usize> {
        let busy: BTreeSet<ExtentKey> = self
            .tasks
            .values()
            .map(|t| (t.volume, t.index, t.generation))
            .collect();
        let mut load = self.load_map();
        let alive: Vec<u64> = self
            .chunks
            .values()
            .filter(|c| c.state == ChunkState::Alive)
            .map(|c| c.id)
            .collect();
        let mut cluster = self.cluster.clone();
        let mut ops = Vec::new();
        let mut queued = 0;
        for e in self.extents.values() {
            // Pending copy-up destinations are being filled by their writer.
            if busy.contains(&e.key()) || e.replicas.is_empty() || e.pending {
                continue;
            }
            // Members kept although dead (every member died at once, see
            // `check_liveness`): nothing can be copied until one serves
            // again; once one does, the dead ones leave the set.
            if !e.replicas.iter().any(|r| self.serving(*r)) {
                continue;
            }
            let mut e = e.clone();
            let mut changed = false;
            if e.replicas.iter().any(|r| !self.serving(*r)) {
                let gone: Vec<u64> = e
                    .replicas
                    .iter()
                    .copied()
                    .filter(|r| !self.serving(*r))
                    .collect();
                info!(volume = %e.volume, extent = e.index, dead = ?gone,
                      "a member is back; dead members leave the set");
                e.replicas.retain(|r| self.serving(*r));
                changed = true;
            }
            if !e.learners.is_empty() {
                warn!(volume = %e.volume, extent = e.index, learners = ?e.learners,
                      "learners without a recovery task dropped");
                e.learners.clear();
                changed = true;
            }
            let keep = e.replication.max(1) as usize;
            if e.replicas.len() > keep {
                let dropped = self.surplus_members(&e, keep, &load);
                info!(volume = %e.volume, extent = e.index, generation = e.generation,
                      factor = e.replication, dropped = ?dropped,
                      "more members than the replication factor; surplus members leave the set");
                e.replicas.retain(|r| !dropped.contains(r));
                for d in &dropped {
                    if let Some(n) = load.get_mut(d) {
                        *n = n.saturating_sub(1);
                    }
                }
                changed = true;
            }
            if changed {
                e.epoch += 1;
            }
            let orphans = changed;
            if !self.volumes.contains_key(&e.volume) {
                if orphans {
                    ops.push(Op::Extent(e));
                }
                continue;
            }
            let draining = e.replicas.iter().copied().find(|r| {
                self.chunks
                    .get(r)
                    .is_some_and(|c| c.state == ChunkState::Draining)
            });
            let short = (e.replicas.len() as u32) < e.replication;
            let spare = if e.replicas.is_empty() || (!short && draining.is_none()) {
                None
            } else {
                alive
                    .iter()
                    .copied()
                    .filter(|c| !e.holds(*c))
                    .min_by_key(|c| (avoid.contains(c), load.get(c).copied().unwrap_or(0), *c))
            };
            let Some(spare) = spare else {
                if orphans {
                    ops.push(Op::Extent(e));
                }
                continue;
            };
            *load.entry(spare).or_insert(0) += 1;
            e.learners.push(spare);
            e.epoch += 1;
            let task = RecoveryTask {
                id: cluster.next_task_id,
                volume: e.volume,
                index: e.index,
                target_chunk: spare,
                sources: e.replicas.clone(),
                replaces: if short { None } else { draining },
                epoch: e.epoch,
                generation: e.generation,
            };
            cluster.next_task_id += 1;
            ops.push(Op::Extent(e));
            ops.push(Op::Task(task));
            queued += 1;
        }
        if !ops.is_empty() {
            ops.push(Op::Cluster(cluster));
            self.commit(ops)?;
            if queued > 0 {
                info!(
                    tasks = queued,
                    "recovery tasks queued; targets are learners now"
                );
            }
        }
        Ok(queued + self.rebalance()?)
    }

    /// Evens out the replicas per chunk after a chunk joins or returns:
    /// while the most and least loaded alive chunks differ by more than
    /// [`REBALANCE_SLACK`] (or a tenth of the mean), moves one replica of a
    /// healthy extent from the former to the latter, as a drain move does
    /// (the target becomes a learner, the task `replaces` the source, which
    /// leaves the set when the copy completes). Only when no extent is
    /// degraded, and at most [`MAX_REBALANCE_MOVES`] tasks in flight, so
    /// recovery always comes first and moves never swamp client I/O; each
    /// completed move calls this again, so the moves chain until balanced.
    fn rebalance(&mut self) -> Result<usize> {
        let degraded = self.extents.values().any(|e| {
            self.volumes.contains_key(&e.volume) && (e.replicas.len() as u32) < e.replication
        });
        if degraded || self.tasks.len() >= MAX_REBALANCE_MOVES {
            return Ok(0);
        }
        let alive: Vec<u64> = self
            .chunks
            .values()
            .filter(|c| c.state == ChunkState::Alive)
            .map(|c| c.id)
            .collect();
        if alive.len() < 2 {
            return Ok(0);
        }
        let mut load = self.load_map();
        let now = Instant::now();
        let targets: Vec<u64> = alive
            .iter()
            .copied()
            .filter(|c| self.move_cooldown.get(c).is_none_or(|until| *until <= now))
            .filter(|c| self.fill_ok(*c, 0))
            .collect();
        let mut busy: BTreeSet<ExtentKey> = self
            .tasks
            .values()
            .map(|t| (t.volume, t.index, t.generation))
            .collect();
        let mut cluster = self.cluster.clone();
        let mut ops = Vec::new();
        // Locality first (see `state/locality.rs`), then evening out.
        let mut queued = self.locality_moves(
            MAX_REBALANCE_MOVES - self.tasks.len(),
            &mut busy,
            &mut load,
            &mut cluster,
            &mut ops,
        );
        'moves: while self.tasks.len() + queued < MAX_REBALANCE_MOVES {
            let count = |c: &u64| load.get(c).copied().unwrap_or(0);
            let Some(lo) = targets.iter().copied().min_by_key(|c| (count(c), *c)) else {
                break;
            };
            let mean = alive.iter().map(count).sum::<u64>() / alive.len() as u64;
            let slack = REBALANCE_SLACK.max(mean / 10);
            // Most loaded first; a chunk whose replicas are all pinned to
            // it by locality gives way to the next one.
            let mut sources: Vec<u64> = alive.clone();
            sources.sort_by_key(|c| std::cmp::Reverse((count(c), *c)));
            for hi in sources {
                if count(&hi) <= count(&lo) + slack {
                    break 'moves;
                }
                let found = self.extents.values().find(|e| {
                    e.replicas.contains(&hi)
                        && !e.holds(lo)
                        && e.learners.is_empty()
                        && !e.pending
                        && !busy.contains(&e.key())
                        && !self.pinned(e, hi)
                });
                if let Some(e) = found {
                    busy.insert(e.key());
                    info!(volume = %e.volume, extent = e.index, from = hi, to = lo, "rebalance move queued");
                    self.queue_move(e, lo, hi, &mut cluster, &mut load, &mut ops);
                    queued += 1;
                    continue 'moves;
                }
            }
            break;
        }
        if queued > 0 {
            ops.push(Op::Cluster(cluster));
            self.commit(ops)?;
        }
        Ok(queued)
    }

    /// Rebalance cooldowns that ran out: forget them and reconcile, since
    /// nothing else may call it in a quiet cluster (called from the
    /// liveness pass).
    fn end_cooldowns(&mut self) -> Result<()> {
        let now = Instant::now();
        let before = self.move_cooldown.len();
        self.move_cooldown.retain(|_, until| *until > now);
        if self.move_cooldown.len() < before {
            self.reconcile()?;
        }
        Ok(())
    }

    /// A copy to `chunk` failed: no rebalance move targets it for
    /// [`REBALANCE_COOLDOWN`].
    fn cool_down(&mut self, chunk: u64) {
        self.move_cooldown
            .insert(chunk, Instant::now() + REBALANCE_COOLDOWN);
    }

    /// Ops that drop task `t`: the task itself and its target's learner
    /// slot (epoch + 1). Each task has its own extent, so the ops of several
    /// tasks can share one commit.
    fn drop_task_ops(&self, t: &RecoveryTask, ops: &mut Vec<Op>) {
        ops.push(Op::DelTask(t.id));
        if let Some(e) = self.extents.get(&(t.volume, t.index, t.generation)) {
            if e.learners.contains(&t.target_chunk) {
                let mut e2 = e.clone();
                e2.learners.retain(|c| *c != t.target_chunk);
                e2.epoch += 1;
                ops.push(Op::Extent(e2));
            }
        }
    }

    /// Chooses `replicas` distinct alive chunks for each of `count` extents,
    /// least-loaded first, `prefer` (a volume's home, see
    /// `state/locality.rs`) before all. Thick volumes only go where
    /// capacity is free.
    fn place(
        &self,
        count: u64,
        replicas: u32,
        thin: bool,
        prefer: Option<u64>,
    ) -> Result<Vec<Vec<u64>>> {
        let alive: Vec<&ChunkRecord> = self
            .chunks
            .values()
            .filter(|c| c.state == ChunkState::Alive)
            .collect();
        let r = replicas as usize;
        if alive.len() < r {
            return Err(MetaError::FailedPrecondition(format!(
                "replication factor {replicas} needs {replicas} alive chunks, the cluster has {}",
                alive.len()
            )));
        }
        let mut load = self.load_map();
        let mut reserved = self.reserved_map();
        let mut out = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let mut cands: Vec<(u64, u64)> = alive
                .iter()
                .filter(|c| {
                    thin || reserved.get(&c.id).copied().unwrap_or(0) + EXTENT_SIZE
                        <= c.capacity_bytes
                })
                .map(|c| (load.get(&c.id).copied().unwrap_or(0), c.id))
                .collect();
            if cands.len() < r {
                return Err(MetaError::ResourceExhausted(format!(
                    "not enough free capacity on {replicas} distinct chunks for a thick volume"
                )));
            }
            cands.sort_unstable_by_key(|(load, id)| (Some(*id) != prefer, *load, *id));
            let set: Vec<u64> = cands[..r].iter().map(|(_, id)| *id).collect();
            for id in &set {
                *load.entry(*id).or_insert(0) += 1;
                if !thin {
                    *reserved.entry(*id).or_insert(0) += EXTENT_SIZE;
                }
            }
            out.push(set);
        }
        Ok(out)
    }

    // -------------------------------------------------------------- volumes

    fn resolve(&self, key: VolumeKey<'_>) -> Result<Option<Uuid>> {
        Ok(match key {
            VolumeKey::Id(s) => {
                let id = Uuid::parse(s)?;
                self.volumes.contains_key(&id).then_some(id)
            }
            VolumeKey::Name(n) => self.volume_names.get(n).copied(),
        })
    }

    /// Looks a volume up by id or name.
    pub fn get_volume(&self, key: VolumeKey<'_>) -> Result<VolumeRecord> {
        self.resolve(key)?
            .and_then(|id| self.volumes.get(&id).cloned())
            .ok_or_else(|| MetaError::NotFound(format!("volume {key:?}")))
    }

    /// Every volume, by id.
    pub fn list_volumes(&self) -> Vec<VolumeRecord> {
        self.volumes.values().cloned().collect()
    }

    /// Allocates a LUN: the first target with room, else a new target.
    /// Returns (target number, LUN, new target record if created).
    fn allocate_lun(&self) -> Result<(TargetRecord, u16)> {
        let max_luns = self.opts.max_luns_per_target;
        let now = Instant::now();
        let delay = self.opts.liveness_timeout * 2;
        let cooling = |t: u32, l: u16| {
            self.freed_luns
                .get(&(t, l))
                .is_some_and(|at| now.saturating_duration_since(*at) < delay)
        };
        // Free and not freed just now, else (a new target would exceed the
        // limit) any free one.
        for settled in [true, false] {
            for t in self.targets.values() {
                if t.luns.len() < max_luns as usize {
                    if let Some(lun) = (1..=max_luns)
                        .find(|l| !(t.luns.contains_key(l) || settled && cooling(t.number, *l)))
                    {
                        return Ok((t.clone(), lun));
                    }
                }
            }
            if settled && self.targets.len() < self.opts.max_targets as usize {
                break;
            }
        }
        if self.targets.len() >= self.opts.max_targets as usize {
            return Err(MetaError::ResourceExhausted(format!(
                "all {} targets hold {} LUNs; the cluster is full",
                self.opts.max_targets, max_luns
            )));
        }
        let number = self.targets.keys().next_back().copied().unwrap_or(0) + 1;
        Ok((
            TargetRecord {
                number,
                iqn: format!("{IQN_PREFIX}:{}:t{number}", self.cluster_short()),
                luns: BTreeMap::new(),
            },
            1,
        ))
    }

    fn create_inner(
        &mut self,
        name: &str,
        size_bytes: u64,
        replicas: u32,
        thin: bool,
        parent: Option<&SnapshotRecord>,
        unix_ms: u64,
    ) -> Result<VolumeRecord> {
        let (mut target, lun) = self.allocate_lun()?;
        // Thick volumes are placed eagerly; thin volumes and clones are
        // placed extent by extent on first write (EnsureExtent/CopyUpExtent).
        let count = if thin || parent.is_some() {
            0
        } else {
            extent_count(size_bytes)
        };
        let placement = self.place(count, replicas, thin, None)?;
        let id = loop {
            let id = Uuid::random(&mut self.rng);
            if !self.volumes.contains_key(&id) && !self.snapshots.contains_key(&id) {
                break id;
            }
        };
        target.luns.insert(lun, id);
        let vol = VolumeRecord {
            id,
            name: name.to_string(),
            size_bytes,
            replicas,
            thin,
            target: target.number,
            lun,
            created_at_unix_ms: unix_ms,
            parent_snapshot: parent.map(|s| s.id),
            state: VolumeState::Ready,
            capacity_generation: 0,
            generation: 0,
            snapshot_chain: Vec::new(),
        };
        let mut ops = vec![Op::Volume(vol.clone()), Op::Target(target.clone())];
        if self.freed_luns.contains_key(&(target.number, lun)) {
            ops.push(Op::FreedLun(target.number, lun, false));
        }
        for (index, set) in placement.into_iter().enumerate() {
            ops.push(Op::Extent(ExtentRecord {
                volume: id,
                index: index as u64,
                replicas: set,
                epoch: 1,
                learners: Vec::new(),
                generation: 0,
                pending: false,
                replication: replicas,
            }));
        }
        self.commit(ops)?;
        info!(volume = %id, name, size_bytes, replicas, thin, target = %target.iqn, lun,
              extents = count, "volume created");
        Ok(vol)
    }

    /// Creates a volume; idempotent by name.
    pub fn create_volume(
        &mut self,
        name: &str,
        size_bytes: u64,
        replicas: u32,
        thin: bool,
        unix_ms: u64,
    ) -> Result<VolumeRecord> {
        validate_name("volume", name)?;
        validate_size(size_bytes)?;
        validate_replicas(replicas)?;
        if let Some(id) = self.volume_names.get(name) {
            let v = &self.volumes[id];
            if v.size_bytes == size_bytes
                && v.replicas == replicas
                && v.thin == thin
                && v.parent_snapshot.is_none()
            {
                return Ok(v.clone());
            }
            return Err(MetaError::AlreadyExists(format!(
                "volume {name:?} exists with size {} replicas {} thin {}{}",
                v.size_bytes,
                v.replicas,
                v.thin,
                if v.parent_snapshot.is_some() {
                    " (a clone)"
                } else {
                    ""
                }
            )));
        }
        self.create_inner(name, size_bytes, replicas, thin, None, unix_ms)
    }

    /// Deletes a volume; unknown volumes are fine. A volume with snapshots
    /// cannot be deleted (FAILED_PRECONDITION).
    pub fn delete_volume(&mut self, key: VolumeKey<'_>) -> Result<bool> {
        let Some(id) = self.resolve(key)? else {
            return Ok(false);
        };
        let v = self.volumes[&id].clone();
        if !v.snapshot_chain.is_empty() {
            return Err(MetaError::FailedPrecondition(format!(
                "volume {} has {} snapshots; delete them first",
                v.name,
                v.snapshot_chain.len()
            )));
        }
        let mut ops = vec![
            Op::DelVolume(id),
            Op::DelAcl(id),
            Op::DelAclRo(id),
            Op::Home(id, None),
        ];
        if let Some(t) = self.targets.get(&v.target) {
            let mut t = t.clone();
            t.luns.remove(&v.lun);
            ops.push(Op::Target(t));
            self.freed_luns.insert((v.target, v.lun), Instant::now());
            ops.push(Op::FreedLun(v.target, v.lun, true));
        }
        for e in self.extents.range((id, 0, 0)..=(id, u64::MAX, u64::MAX)) {
            ops.push(Op::DelExtent(id, e.1.index, e.1.generation));
        }
        for t in self.tasks.values().filter(|t| t.volume == id) {
            ops.push(Op::DelTask(t.id));
        }
        self.commit(ops)?;
        info!(volume = %id, name = %v.name, "volume deleted");
        Ok(true)
    }

    /// Grows a volume (never shrinks). The same size is a no-op.
    pub fn resize_volume(&mut self, key: VolumeKey<'_>, new_size: u64) -> Result<VolumeRecord> {
        validate_size(new_size)?;
        let v = self.get_volume(key)?;
        if new_size < v.size_bytes {
            return Err(MetaError::InvalidArgument(format!(
                "volume {} is {} bytes; shrinking to {new_size} is not supported",
                v.name, v.size_bytes
            )));
        }
        if new_size == v.size_bytes {
            return Ok(v);
        }
        let have = extent_count(v.size_bytes);
        let want = extent_count(new_size);
        let lazy = v.thin || v.parent_snapshot.is_some();
        let home = self.locality_home(&v);
        let placement = self.place(if lazy { 0 } else { want - have }, v.replicas, v.thin, home)?;
        let v2 = VolumeRecord {
            size_bytes: new_size,
            capacity_generation: v.capacity_generation + 1,
            ..v.clone()
        };
        let mut ops = vec![Op::Volume(v2.clone())];
        for (i, set) in placement.into_iter().enumerate() {
            ops.push(Op::Extent(ExtentRecord {
                volume: v.id,
                index: have + i as u64,
                replicas: set,
                epoch: 1,
                learners: Vec::new(),
                generation: v.generation,
                pending: false,
                replication: v.replicas,
            }));
        }
        self.commit(ops)?;
        info!(volume = %v.id, from = v.size_bytes, to = new_size, "volume resized");
        Ok(v2)
    }

    // -------------------------------------------------------------- snapshots

    /// Takes a snapshot: freezes the volume's generation and moves the
    /// volume to the next one. O(1): no per-extent work (writes copy up
    /// lazily). Idempotent by name. The caller (the gRPC service) then waits
    /// until the revision is in force, see [`State::in_force_waiting`].
    pub fn create_snapshot(
        &mut self,
        volume_id: &str,
        name: &str,
        unix_ms: u64,
    ) -> Result<SnapshotRecord> {
        validate_name("snapshot", name)?;
        let v = self.get_volume(VolumeKey::Id(volume_id))?;
        if let Some(sid) = self.snapshot_names.get(name) {
            let s = &self.snapshots[sid];
            if s.volume == v.id {
                return Ok(s.clone());
            }
            return Err(MetaError::AlreadyExists(format!(
                "snapshot {name:?} exists for volume {}",
                s.volume
            )));
        }
        let id = loop {
            let id = Uuid::random(&mut self.rng);
            if !self.volumes.contains_key(&id) && !self.snapshots.contains_key(&id) {
                break id;
            }
        };
        let snap = SnapshotRecord {
            id,
            name: name.to_string(),
            volume: v.id,
            size_bytes: v.size_bytes,
            created_at_unix_ms: unix_ms,
            generation: v.generation,
        };
        let mut v2 = v.clone();
        v2.generation += 1;
        v2.snapshot_chain.push(id);
        self.commit(vec![Op::Snapshot(snap.clone()), Op::Volume(v2)])?;
        info!(snapshot = %id, name, volume = %v.id, "snapshot created");
        Ok(snap)
    }

    /// Records that chunk `chunk_id` has applied every metadata revision up to
    /// `revision` (dropped cached extent views, finished the writes that used
    /// them). Only moves forward; unknown or dead chunks are ignored. For
    /// the unit tests (heartbeats report it to the pulse).
    #[cfg(test)]
    pub(crate) fn note_applied_revision(&mut self, chunk_id: u64, revision: u64) {
        pulse::lock(&self.pulse).note_applied(chunk_id, revision);
    }

    /// What publishes the durable revision once a group commit went
    /// through (see [`Announcer`]).
    pub fn announcer(&self) -> Announcer {
        Announcer {
            pulse: self.pulse.clone(),
            revisions: self.revisions.clone(),
        }
    }

    /// Subscribe to the metadata revision (`WatchRevisions`): the receiver
    /// sees the current revision and every later one (folded when quick).
    pub fn watch_revisions(&self) -> tokio::sync::watch::Receiver<u64> {
        self.revisions.subscribe()
    }

    /// The current revision must be in force before the calling mutation
    /// returns (see `state/in_force.rs`): from now on a participant that
    /// has not applied it holds no lease past `now` + the bound. Returns
    /// the revision to wait for with [`State::in_force_waiting`].
    pub fn require_in_force(&mut self, now: Instant) -> u64 {
        let r = self.cluster.revision;
        pulse::lock(&self.pulse).in_force.require(r, now);
        r
    }

    /// How long a participant may lag behind a revision a call waits for
    /// (the liveness timeout).
    pub fn in_force_bound(&self) -> Duration {
        pulse::lock(&self.pulse).in_force.bound()
    }

    /// Count an in-force wait that took `waited`; `lapsed`: it ended by a
    /// lease running out.
    pub fn note_in_force_wait(&mut self, waited: Duration, lapsed: bool) {
        let s = &mut self.in_force_stats;
        s.0 += 1;
        s.1 += u64::from(lapsed);
        s.2 += waited.as_millis() as u64;
    }

    /// Who may still serve initiators on a view older than `revision` at
    /// `now`: alive or draining chunks and VIP holders that have not
    /// acknowledged it and whose lease has not run out (named for logs and
    /// errors), and the soonest end of their leases; and the alive chunks
    /// that have not acknowledged it but whose lease has run out (fenced
    /// out). `waiting` empty: `revision` is in force.
    pub fn in_force_waiting(&self, revision: u64, now: Instant) -> InForceWait {
        let mut who = Vec::new();
        let mut fenced_out = Vec::new();
        let mut soonest: Option<Instant> = None;
        let p = pulse::lock(&self.pulse);
        for c in self.chunks.values() {
            if !matches!(c.state, ChunkState::Alive | ChunkState::Draining) {
                continue;
            }
            let Some(l) = p.live.get(&c.id) else {
                continue;
            };
            if l.applied_revision >= revision {
                continue;
            }
            if l.lease_until > now {
                who.push(format!("chunk {}", c.id));
                soonest = Some(soonest.map_or(l.lease_until, |s| s.min(l.lease_until)));
            } else {
                fenced_out.push(format!("chunk {}", c.id));
            }
        }
        drop(p);
        for (holder, vip, until) in self.leases.lagging(revision, now) {
            who.push(format!("redirector {holder} (VIP {vip})"));
            soonest = Some(soonest.map_or(until, |s| s.min(until)));
        }
        InForceWait {
            waiting: who,
            soonest,
            fenced_out,
        }
    }

    /// Snapshots, all or of one volume.
    pub fn list_snapshots(&self, volume_id: Option<&str>) -> Result<Vec<SnapshotRecord>> {
        let filter = volume_id.map(Uuid::parse).transpose()?;
        Ok(self
            .snapshots
            .values()
            .filter(|s| filter.is_none_or(|f| s.volume == f))
            .cloned()
            .collect())
    }

    /// A snapshot by id.
    pub fn get_snapshot(&self, id: &str) -> Result<SnapshotRecord> {
        let id = Uuid::parse(id)?;
        self.snapshots
            .get(&id)
            .cloned()
            .ok_or_else(|| MetaError::NotFound(format!("snapshot {id}")))
    }

    /// Deletes a snapshot; unknown is fine. A snapshot with clones cannot be
    /// deleted (FAILED_PRECONDITION).
    pub fn delete_snapshot(&mut self, id: &str) -> Result<bool> {
        let id = Uuid::parse(id)?;
        let Some(s) = self.snapshots.get(&id).cloned() else {
            return Ok(false);
        };
        let clones: Vec<&str> = self
            .volumes
            .values()
            .filter(|v| v.parent_snapshot == Some(id))
            .map(|v| v.name.as_str())
            .collect();
        if !clones.is_empty() {
            return Err(MetaError::FailedPrecondition(format!(
                "snapshot {} has clones: {}",
                s.name,
                clones.join(", ")
            )));
        }
        let mut ops = vec![Op::DelSnapshot(id)];
        let mut dropped = 0;
        if let Some(v) = self.volumes.get(&s.volume) {
            let mut v2 = v.clone();
            v2.snapshot_chain.retain(|x| *x != id);
            let gc = self.unreachable_extent_ops(v, id);
            dropped = gc.iter().filter(|o| matches!(o, Op::DelExtent(..))).count();
            ops.push(Op::Volume(v2));
            ops.extend(gc);
        }
        self.commit(ops)?;
        info!(snapshot = %id, name = %s.name, extents_dropped = dropped, "snapshot deleted");
        Ok(true)
    }

    /// Creates a volume from a snapshot; idempotent by name. `size_bytes` 0
    /// means the snapshot's size; `replicas` 0 means the source's factor.
    pub fn clone_volume(
        &mut self,
        snapshot_id: &str,
        name: &str,
        size_bytes: u64,
        replicas: u32,
        thin: bool,
        unix_ms: u64,
    ) -> Result<VolumeRecord> {
        validate_name("volume", name)?;
        let snap = self.get_snapshot(snapshot_id)?;
        let size = if size_bytes == 0 {
            snap.size_bytes
        } else {
            size_bytes
        };
        validate_size(size)?;
        if size < snap.size_bytes {
            return Err(MetaError::InvalidArgument(format!(
                "a clone must be at least the snapshot's size {}, got {size}",
                snap.size_bytes
            )));
        }
        let replicas = if replicas == 0 {
            self.volumes
                .get(&snap.volume)
                .map(|v| v.replicas)
                .unwrap_or(1)
        } else {
            replicas
        };
        validate_replicas(replicas)?;
        if let Some(id) = self.volume_names.get(name) {
            let v = &self.volumes[id];
            if v.parent_snapshot == Some(snap.id)
                && v.size_bytes == size
                && v.replicas == replicas
                && v.thin == thin
            {
                return Ok(v.clone());
            }
            return Err(MetaError::AlreadyExists(format!(
                "volume {name:?} exists with other parameters"
            )));
        }
        self.create_inner(name, size, replicas, thin, Some(&snap), unix_ms)
    }

    // -------------------------------------------------------------- ACLs

    /// The initiators allowed to see a volume's LUN.
    pub fn acl(&self, volume: &Uuid) -> BTreeSet<String> {
        self.acls.get(volume).cloned().unwrap_or_default()
    }

    /// The initiators of a volume's ACL that see the LUN write-protected.
    pub fn acl_read_only(&self, volume: &Uuid) -> BTreeSet<String> {
        self.acl_ro.get(volume).cloned().unwrap_or_default()
    }

    /// A volume's whole ACL with modes.
    pub fn acl_view(&self, volume: &Uuid) -> AclView {
        AclView {
            initiators: self.acl(volume),
            read_only: self.acl_read_only(volume),
        }
    }

    /// Allows an initiator read-write (idempotent). Returns the ACL after
    /// the change. See [`State::acl_add_mode`].
    pub fn acl_add(&mut self, volume_id: &str, initiator: &str) -> Result<BTreeSet<String>> {
        Ok(self
            .acl_add_mode(volume_id, initiator, AclMode::ReadWrite, false)?
            .initiators)
    }

    /// Allows an initiator with `mode`. Idempotent for the same mode; an
    /// initiator already on the ACL with the other mode is ALREADY_EXISTS
    /// unless `change_mode`, which switches it (and adds it if absent).
    /// Returns the ACL after the change.
    pub fn acl_add_mode(
        &mut self,
        volume_id: &str,
        initiator: &str,
        mode: AclMode,
        change_mode: bool,
    ) -> Result<AclView> {
        let v = self.get_volume(VolumeKey::Id(volume_id))?;
        let iqn = normalize_initiator(initiator)?;
        let mut view = self.acl_view(&v.id);
        if view.initiators.contains(&iqn) {
            let current = AclMode::from_read_only(view.read_only.contains(&iqn));
            if current == mode {
                return Ok(view);
            }
            if !change_mode {
                return Err(MetaError::AlreadyExists(format!(
                    "initiator {iqn} is on the ACL of volume {} as {}, not {} (ask for a mode change)",
                    v.id,
                    current.as_str(),
                    mode.as_str()
                )));
            }
        }
        let mut ops = Vec::with_capacity(2);
        if view.initiators.insert(iqn.clone()) {
            ops.push(Op::Acl(v.id, view.initiators.clone()));
        }
        let ro_changed = match mode {
            AclMode::ReadOnly => view.read_only.insert(iqn.clone()),
            AclMode::ReadWrite => view.read_only.remove(&iqn),
        };
        if ro_changed {
            ops.push(Op::AclRo(v.id, view.read_only.clone()));
        }
        if !ops.is_empty() {
            self.commit(ops)?;
            info!(volume = %v.id, initiator = %iqn, mode = mode.as_str(), "ACL add");
        }
        Ok(view)
    }

    /// Revokes an initiator whatever its mode (idempotent). Returns the ACL
    /// after the change.
    pub fn acl_remove(&mut self, volume_id: &str, initiator: &str) -> Result<BTreeSet<String>> {
        Ok(self.acl_remove_view(volume_id, initiator)?.initiators)
    }

    /// [`State::acl_remove`] returning the modes too.
    pub fn acl_remove_view(&mut self, volume_id: &str, initiator: &str) -> Result<AclView> {
        let v = self.get_volume(VolumeKey::Id(volume_id))?;
        let iqn = normalize_initiator(initiator)?;
        let mut view = self.acl_view(&v.id);
        let mut ops = Vec::with_capacity(2);
        if view.initiators.remove(&iqn) {
            ops.push(Op::Acl(v.id, view.initiators.clone()));
        }
        if view.read_only.remove(&iqn) {
            ops.push(Op::AclRo(v.id, view.read_only.clone()));
        }
        if !ops.is_empty() {
            self.commit(ops)?;
            info!(volume = %v.id, initiator = %iqn, "ACL remove");
        }
        Ok(view)
    }

    // -------------------------------------------------------------- extents and recovery

    /// Every extent record of a volume (all generations, pending ones
    /// included), by index then generation.
    pub fn extents(&self, volume_id: &str) -> Result<(VolumeRecord, Vec<ExtentRecord>)> {
        let v = self.get_volume(VolumeKey::Id(volume_id))?;
        let es = self
            .extents
            .range((v.id, 0, 0)..=(v.id, u64::MAX, u64::MAX))
            .map(|(_, e)| e.clone())
            .collect();
        Ok((v, es))
    }

    /// Queued recovery tasks, optionally only those copying to `target`.
    pub fn recovery_tasks(&self, target: Option<u64>) -> Vec<RecoveryTask> {
        self.tasks
            .values()
            .filter(|t| target.is_none_or(|c| t.target_chunk == c))
            .cloned()
            .collect()
    }

    /// A chunk reports a recovery copy done (or failed). On success the
    /// target, a learner of the extent, becomes a member (and a drained
    /// chunk leaves the set), with an epoch bump. On failure, or when the
    /// target is no longer an alive learner, the learner is dropped (and
    /// the epoch bumped) and reconcile may queue a new task. Returns the extent after the
    /// change, `None` if the task did not complete.
    pub fn complete_recovery(
        &mut self,
        task_id: u64,
        success: bool,
        error: &str,
    ) -> Result<Option<ExtentRecord>> {
        let t = self
            .tasks
            .get(&task_id)
            .cloned()
            .ok_or_else(|| MetaError::NotFound(format!("recovery task {task_id}")))?;
        let mut cluster = self.cluster.clone();
        let mut ops = Vec::new();
        let target_alive = self
            .chunks
            .get(&t.target_chunk)
            .is_some_and(|c| c.state == ChunkState::Alive);
        let extent = self
            .extents
            .get(&(t.volume, t.index, t.generation))
            .cloned();
        let result = match extent {
            Some(mut e) if success && target_alive && e.learners.contains(&t.target_chunk) => {
                ops.push(Op::DelTask(task_id));
                e.learners.retain(|c| *c != t.target_chunk);
                if !e.replicas.contains(&t.target_chunk) {
                    e.replicas.push(t.target_chunk);
                }
                if let Some(r) = t.replaces {
                    e.replicas.retain(|x| *x != r);
                }
                e.epoch += 1;
                ops.push(Op::Extent(e.clone()));
                cluster.recovery_completed += 1;
                info!(task = task_id, volume = %t.volume, extent = t.index,
                      chunk = t.target_chunk, epoch = e.epoch, "recovery completed; learner promoted");
                Some(e)
            }
            e => {
                let learner = e.is_some_and(|e| e.learners.contains(&t.target_chunk));
                self.drop_task_ops(&t, &mut ops);
                self.cool_down(t.target_chunk);
                cluster.recovery_failed += 1;
                warn!(
                    task = task_id,
                    success, error, target_alive, learner, "recovery task dropped"
                );
                None
            }
        };
        ops.push(Op::Cluster(cluster));
        self.commit(ops)?;
        self.reconcile()?;
        Ok(result)
    }

    /// A learner of an extent failed a write (or its copy can no longer
    /// work): if the extent is still at `seen_epoch` and `chunk` is one of
    /// its learners, the learner is dropped (epoch + 1), its recovery task
    /// counts as failed and is dropped, and reconcile may queue a new one.
    /// Otherwise nothing changes. Returns the extent as it is afterwards.
    /// `key` is the extent's store key (the volume id for generation 0).
    ///
    /// This is the learner half of `ReportReplicaFailure`: a failure report
    /// naming a learner is routed here.
    pub fn remove_learner(
        &mut self,
        key: &str,
        index: u64,
        chunk: u64,
        seen_epoch: u64,
        error: &str,
    ) -> Result<ExtentRecord> {
        let (volume, generation) = parse_store_key(key)?;
        let e = self
            .extents
            .get(&(volume, index, generation))
            .cloned()
            .ok_or_else(|| MetaError::NotFound(format!("extent {volume}/{index}")))?;
        if e.epoch != seen_epoch || !e.learners.contains(&chunk) {
            return Ok(e);
        }
        let mut ops = Vec::new();
        let task = self
            .tasks
            .values()
            .find(|t| {
                t.volume == volume
                    && t.index == index
                    && t.generation == generation
                    && t.target_chunk == chunk
            })
            .cloned();
        self.cool_down(chunk);
        match &task {
            Some(t) => self.drop_task_ops(t, &mut ops),
            None => {
                let mut e2 = e.clone();
                e2.learners.retain(|c| *c != chunk);
                e2.epoch += 1;
                ops.push(Op::Extent(e2));
            }
        }
        let mut cluster = self.cluster.clone();
        cluster.recovery_failed += 1;
        ops.push(Op::Cluster(cluster));
        self.commit(ops)?;
        warn!(volume = %volume, extent = index, chunk, seen_epoch, error,
              task = task.map(|t| t.id), "learner failed; dropped");
        self.reconcile_avoiding(&[chunk])?;
        self.extents
            .get(&(volume, index, generation))
            .cloned()
            .ok_or_else(|| MetaError::NotFound(format!("extent {key}/{index}")))
    }

    /// [`State::report_replica_failure`] returning only the extent.
    pub fn remove_replica(
        &mut self,
        key: &str,
        index: u64,
        chunk: u64,
        seen_epoch: u64,
        error: &str,
    ) -> Result<ExtentRecord> {
        self.report_replica_failure(key, index, chunk, seen_epoch, error)
            .map(|(_, e)| e)
    }

    // -------------------------------------------------------------- status and exports

    /// Counters and health.
    pub fn status(&self) -> ClusterStatus {
        let count = |s: ChunkState| self.chunks.values().filter(|c| c.state == s).count() as u64;
        let mut degraded = 0;
        let mut unavailable = 0;
        for e in self.extents.values() {
            let serving = e.replicas.iter().filter(|r| self.serving(**r)).count();
            if (serving as u32) < e.replication {
                degraded += 1;
            }
            if serving == 0 {
                unavailable += 1;
            }
        }
        let health = if unavailable > 0 {
            Health::Critical
        } else if degraded > 0 {
            Health::Degraded
        } else {
            Health::Ok
        };
        ClusterStatus {
            cluster_id: self.cluster.cluster_id,
            health,
            chunks_alive: count(ChunkState::Alive),
            chunks_dead: count(ChunkState::Dead),
            chunks_draining: count(ChunkState::Draining),
            chunks_removed: count(ChunkState::Removed),
            volumes: self.volumes.len() as u64,
            snapshots: self.snapshots.len() as u64,
            targets: self.targets.len() as u64,
            extents: self.extents.len() as u64,
            degraded_extents: degraded,
            unavailable_extents: unavailable,
            recovery_queued: self.tasks.len() as u64,
            recovery_completed: self.cluster.recovery_completed,
            recovery_failed: self.cluster.recovery_failed,
            rebalance_moves: self.cluster.rebalance_moves,
            revision: self.cluster.revision,
            committed_ops: self.committed_ops,
            in_force_waits: self.in_force_stats.0,
            in_force_lapsed: self.in_force_stats.1,
            in_force_wait_ms: self.in_force_stats.2,
        }
    }

    /// Every target with its LUNs, volumes and ACLs.
    pub fn exports(&self) -> Vec<ExportedTarget> {
        self.targets
            .values()
            .map(|t| ExportedTarget {
                iqn: t.iqn.clone(),
                luns: t
                    .luns
                    .iter()
                    .filter_map(|(lun, id)| {
                        self.volumes.get(id).map(|v| ExportedLun {
                            lun: *lun,
                            volume: v.clone(),
                            acl: self.acl(id),
                            read_only: self.acl_read_only(id),
                        })
                    })
                    .collect(),
            })
            .collect()
    }
}

mod data_path;
mod replication;

#[cfg(test)]
mod tests;
