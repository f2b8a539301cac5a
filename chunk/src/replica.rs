//! The seams of synchronous replication, independent of any transport.
//!
//! This module owns the *vocabulary* the volume data path
//! ([`crate::volume`]) is written against, and nothing that talks to a
//! network:
//!
//! - [`ReplicaSet`]: the members of one extent's replica set and the set's
//!   epoch, as meta records it.
//! - [`ReplicaPeer`]: one chunk's copy of extents as seen from an access
//!   point (the chunk serving the iSCSI session). The network (or any other)
//!   client of a remote chunk implements it; [`LocalPeer`] implements it over
//!   this chunk's own [`ExtentStore`].
//! - [`PeerDirectory`]: maps a [`ChunkId`] to its [`ReplicaPeer`].
//! - [`Membership`]: what meta implements: the current set of an extent,
//!   removing a failed member (epoch bump), allocating an extent on first
//!   write. [`InMemoryMembership`] is a complete in-process implementation
//!   for tests and simulation.
//!
//! # Epoch rules every implementation must keep
//!
//! - A peer refuses a write, unmap or read whose epoch is *below* the epoch
//!   it holds for the extent ([`PeerError::StaleEpoch`]); a request with a
//!   newer epoch persists that epoch before it is applied. This is what
//!   fences an access point whose view of the set is old.
//! - Meta's epoch of a set only moves forward, and every change of the
//!   member list moves it.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;

pub use crate::store::ExtentId;
use crate::store::{ExtentStore, StoreError, BLOCK_SIZE};

/// Identifies a chunk server (the `chunk_id` of its stamped data directory).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub String);

impl ChunkId {
    pub fn new(id: impl Into<String>) -> Self {
        ChunkId(id.into())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for ChunkId {
    fn from(s: &str) -> Self {
        ChunkId(s.to_string())
    }
}

/// The replica set of one extent: who holds it, at which epoch.
///
/// `learners` are chunks being filled by a recovery task: they receive
/// every write, unmap and flush like members, but a learner's failure never
/// fails the I/O (it is reported through [`Membership::remove_member`]) and
/// reads never go to them. Meta makes a learner a member when its copy is
/// complete. Every change of members or learners moves the epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaSet {
    pub epoch: u64,
    pub members: Vec<ChunkId>,
    pub learners: Vec<ChunkId>,
}

impl ReplicaSet {
    /// A set without learners.
    pub fn new(epoch: u64, members: Vec<ChunkId>) -> Self {
        ReplicaSet {
            epoch,
            members,
            learners: Vec::new(),
        }
    }

    /// Whether `chunk` is a member (learners are not).
    pub fn contains(&self, chunk: &ChunkId) -> bool {
        self.members.contains(chunk)
    }

    /// Whether `chunk` is a learner.
    pub fn is_learner(&self, chunk: &ChunkId) -> bool {
        self.learners.contains(chunk)
    }

    /// Whether `chunk` receives writes: a member or a learner.
    pub fn holds(&self, chunk: &ChunkId) -> bool {
        self.contains(chunk) || self.is_learner(chunk)
    }

    /// Every chunk a mutation goes to: the members, then the learners.
    pub fn targets(&self) -> impl Iterator<Item = &ChunkId> {
        self.members.iter().chain(&self.learners)
    }
}

/// Why a request to a replica failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// The replica holds a newer epoch than the request: the caller's view of
    /// the set is old (the set changed). Refresh from meta; never ack on it.
    #[error("stale epoch: replica is at epoch {have}, request carries {got}")]
    StaleEpoch { have: u64, got: u64 },
    /// The replica's copy of `block` (index within the extent) failed its
    /// checksum: read elsewhere and repair this copy.
    #[error("checksum mismatch at block {block}")]
    Checksum { block: u64 },
    /// Dead, partitioned or timed out.
    #[error("replica unreachable: {0}")]
    Unreachable(String),
    /// The replica's disk is full.
    #[error("replica out of space")]
    NoSpace,
    /// Anything else (I/O error on the replica's disk, bad request, ...).
    #[error("replica error: {0}")]
    Other(String),
}

/// One chunk's copy of extents, as an access point sees it.
///
/// Offsets and lengths are bytes within the extent, multiples of
/// [`BLOCK_SIZE`]. An extent the replica has never seen reads as zeros and
/// is created (at the request's epoch) by the first write or fence. One
/// whose copy garbage collection retired (meta dropped this chunk from its
/// set) answers [`PeerError::StaleEpoch`] instead, at the epoch it was
/// retired at or below (see `store/retired.rs`).
#[async_trait]
pub trait ReplicaPeer: Send + Sync + 'static {
    /// The chunk this peer talks to.
    fn chunk(&self) -> &ChunkId;

    /// Write `data` at `offset`, fenced by `epoch`; with `fua`, durable on
    /// return.
    async fn write(
        &self,
        extent: &ExtentId,
        epoch: u64,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> Result<(), PeerError>;

    /// Read and verify `len` bytes at `offset`. `epoch` is the reader's view
    /// of the set; a replica at a newer epoch refuses with `StaleEpoch`.
    async fn read(
        &self,
        extent: &ExtentId,
        epoch: u64,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, PeerError>;

    /// Make every completed write to `extent` durable.
    async fn flush(&self, extent: &ExtentId) -> Result<(), PeerError>;

    /// Deallocate (reads as zeros afterwards), fenced by `epoch`.
    async fn unmap(
        &self,
        extent: &ExtentId,
        epoch: u64,
        offset: u64,
        len: u64,
    ) -> Result<(), PeerError>;

    /// Replace block `block` (index within the extent) with `good` if it
    /// still fails its checksum; durable on return.
    async fn repair(&self, extent: &ExtentId, block: u64, good: Bytes) -> Result<(), PeerError>;

    /// Move the replica's epoch of `extent` up to `epoch` (durable), so that
    /// requests carrying an older epoch are refused from now on.
    async fn fence(&self, extent: &ExtentId, epoch: u64) -> Result<(), PeerError>;

    /// Whether the chunk answers at all, on a path that never waits behind
    /// its data path (the network peer: a connection of its own, answered
    /// without touching the store). The caller bounds it in time. The
    /// default (an in-process peer) always answers.
    async fn ping(&self) -> Result<(), PeerError> {
        Ok(())
    }

    /// The peer's latency window and probe state ([`crate::health`]);
    /// `None` (the default): calls are bounded by the peer timeout only,
    /// never probed.
    fn health(&self) -> Option<&crate::health::PeerHealth> {
        None
    }

    /// Copy-up, on the replica itself: make `dst` (created at `epoch` if
    /// missing) a copy of its `src` (every written block with its checksum;
    /// the source is verified: a bad block is `Checksum`). Durable on return
    /// and idempotent; a `dst` already at a newer epoch refuses with
    /// `StaleEpoch` (the copy-up was committed and written to meanwhile).
    /// The default refuses: peers that cannot copy fail copy-ups only.
    async fn copy_extent(
        &self,
        src: &ExtentId,
        dst: &ExtentId,
        epoch: u64,
    ) -> Result<(), PeerError> {
        let _ = (src, dst, epoch);
        Err(PeerError::Other(format!(
            "replica {} cannot copy extents",
            self.chunk()
        )))
    }
}

/// Finds the [`ReplicaPeer`] of a chunk. `None` means "no way to reach it"
/// and is treated like [`PeerError::Unreachable`].
pub trait PeerDirectory: Send + Sync + 'static {
    fn peer(&self, chunk: &ChunkId) -> Option<Arc<dyn ReplicaPeer>>;
}

/// A fixed [`PeerDirectory`].
#[derive(Default, Clone)]
pub struct StaticPeers {
    peers: HashMap<ChunkId, Arc<dyn ReplicaPeer>>,
}

impl StaticPeers {
    pub fn new() -> Self {
        Self::default()
    }
    /// Register `peer` under its own chunk id.
    pub fn insert(&mut self, peer: Arc<dyn ReplicaPeer>) {
        self.peers.insert(peer.chunk().clone(), peer);
    }
    pub fn with(mut self, peer: Arc<dyn ReplicaPeer>) -> Self {
        self.insert(peer);
        self
    }
}

impl PeerDirectory for StaticPeers {
    fn peer(&self, chunk: &ChunkId) -> Option<Arc<dyn ReplicaPeer>> {
        self.peers.get(chunk).cloned()
    }
}

/// Why meta could not answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    /// Meta is unreachable or has no leader right now.
    #[error("membership service unavailable: {0}")]
    Unavailable(String),
    /// The volume (or extent) does not exist.
    #[error("unknown extent {0}")]
    NotFound(ExtentId),
    /// No chunks to place an extent on.
    #[error("cannot place extent {extent}: {reason}")]
    NoPlacement { extent: ExtentId, reason: String },
    /// The volume's data at this index lives in an older generation or a
    /// clone parent: the write needs [`Membership::copy_up`] (meta's
    /// EnsureExtent answers FAILED_PRECONDITION).
    #[error("extent needs a copy-up first: {0}")]
    CopyUpRequired(String),
    #[error("membership error: {0}")]
    Other(String),
}

/// The extent's name on the chunks (its [`ExtentId::volume`]): the volume id
/// for generation 0, `<volume id>.g<generation>` otherwise (as meta's
/// `Extent.store_key`).
pub fn store_key(volume: &str, generation: u64) -> String {
    if generation == 0 {
        volume.to_string()
    } else {
        format!("{volume}.g{generation}")
    }
}

/// One extent record as meta serves it, copy-on-write aware (meta's
/// `Extent`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtentView {
    /// Store key + index: the extent's name on the replicas.
    pub id: ExtentId,
    /// Members and epoch.
    pub set: ReplicaSet,
    /// The copy-on-write generation the extent belongs to.
    pub generation: u64,
    /// A copy-up destination not committed yet.
    pub pending: bool,
}

/// Where a volume reads one extent index from and what it writes (meta's
/// `ResolveExtentResponse`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    /// Reads go here (possibly an older generation or a clone parent's
    /// extent); `None`: never written, zeros.
    pub read: Option<ExtentView>,
    /// The volume's own writable extent (current generation, committed);
    /// then equal to `read`. `None`: a write needs a copy-up or placement.
    pub own: Option<ExtentView>,
}

/// A copy-up in progress (meta's `CopyUpExtentResponse`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyUp {
    /// What to copy; `None` when nothing had to be copied.
    pub source: Option<ExtentView>,
    /// The volume's new extent: `pending` until committed. Not pending means
    /// the volume already owns it (nothing to copy).
    pub destination: ExtentView,
}

/// Replica-set membership, as meta serves it.
#[async_trait]
pub trait Membership: Send + Sync + 'static {
    /// The current set of `extent`, or `None` if the extent was never
    /// allocated (thin: it reads as zeros).
    async fn current(&self, extent: &ExtentId) -> Result<Option<ReplicaSet>, MembershipError>;

    /// Remove `failed` (a member or a learner) from the set of `extent`. If
    /// the set is still at `seen_epoch`, meta removes it, bumps the epoch and
    /// returns the new set. If the epoch already moved, meta changes nothing
    /// and returns the newer set (the caller re-evaluates against it).
    async fn remove_member(
        &self,
        extent: &ExtentId,
        failed: &ChunkId,
        seen_epoch: u64,
    ) -> Result<ReplicaSet, MembershipError>;

    /// The set of extent `index` of `volume`, allocating (placing) it first
    /// if it does not exist yet. Idempotent. For a copy-on-write volume
    /// whose data at `index` must be copied up first:
    /// [`MembershipError::CopyUpRequired`]. (gRPC: `Meta.EnsureExtent`.)
    async fn ensure_extent(&self, volume: &str, index: u64) -> Result<ReplicaSet, MembershipError>;

    /// A signal that meta's view *may* have changed: the value moves (meta's
    /// revision for [`crate::meta_client::MetaMembership`], a change counter
    /// for [`InMemoryMembership`]) whenever the members or learners of a
    /// set may have changed, and a
    /// [`Membership::current`] asked after the move answers at least as new.
    ///
    /// The volume data path watches it while a replica call waits for an
    /// answer: a member meta moved out of the set under a newer epoch (e.g.
    /// declared dead by the liveness check: frozen, partitioned) is not
    /// waited for until the call timeout. `None`: no signal; the calls are
    /// bounded by the peer timeout only.
    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }

    /// Where `volume` reads extent `index` from and whether it owns a
    /// writable extent there. (gRPC: `Meta.ResolveExtent`; `read` / `own`
    /// map field by field, `id` = `ExtentId::new(store_key, index)`.)
    ///
    /// The default knows no copy-on-write: extent `(volume, index)` is both.
    async fn resolve(&self, volume: &str, index: u64) -> Result<Resolved, MembershipError> {
        let id = ExtentId::new(volume, index);
        let view = self.current(&id).await?.map(|set| ExtentView {
            id,
            set,
            generation: 0,
            pending: false,
        });
        Ok(Resolved {
            read: view.clone(),
            own: view,
        })
    }

    /// Start or resume the copy-up of extent `index` of `volume`: the source
    /// and the (pending) destination placed on the source's chunks. If
    /// nothing has to be copied the destination comes back committed.
    /// Idempotent while pending. (gRPC: `Meta.CopyUpExtent`.)
    async fn copy_up(&self, volume: &str, index: u64) -> Result<CopyUp, MembershipError> {
        let _ = index;
        Err(MembershipError::Other(format!(
            "copy-on-write is not supported here (volume {volume})"
        )))
    }

    /// Commit the copy-up whose destination is `dst` (every member has the
    /// copy): it becomes the volume's extent, with a newer epoch. Idempotent.
    /// (gRPC: `Meta.CommitCopyUp` with `store_key = dst.volume`.)
    async fn commit_copy_up(
        &self,
        volume: &str,
        index: u64,
        dst: &ExtentId,
    ) -> Result<ExtentView, MembershipError> {
        let _ = index;
        Err(MembershipError::Other(format!(
            "copy-on-write is not supported here (volume {volume}, extent {dst})"
        )))
    }
}

/// An in-process [`Membership`] (tests, simulation): places new extents on
/// `replication` chunks of a fixed list, rotating by extent index, and keeps
/// every set in memory.
pub struct InMemoryMembership {
    chunks: Vec<ChunkId>,
    replication: usize,
    sets: Mutex<HashMap<ExtentId, ReplicaSet>>,
    removals: AtomicU64,
    /// Copy-on-write model (see `InMemoryMembership::snapshot`). Lock
    /// order: `cow`, then `sets`.
    cow: Mutex<CowModel>,
    /// Counts changes of `sets` ([`Membership::changes`]).
    changed: tokio::sync::watch::Sender<u64>,
}

impl InMemoryMembership {
    /// Place new extents on `replication` of `chunks` (all of them if fewer).
    pub fn new(chunks: Vec<ChunkId>, replication: usize) -> Self {
        InMemoryMembership {
            chunks,
            replication,
            sets: Mutex::new(HashMap::new()),
            removals: AtomicU64::new(0),
            cow: Mutex::new(CowModel::default()),
            changed: tokio::sync::watch::channel(0).0,
        }
    }

    /// Tell [`Membership::changes`] watchers that a set changed.
    fn bump_changed(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// The set of `extent` without allocating it.
    pub fn get(&self, extent: &ExtentId) -> Option<ReplicaSet> {
        self.sets.lock().get(extent).cloned()
    }

    /// Replace the set of `extent` (an operator / recovery action).
    pub fn set(&self, extent: ExtentId, set: ReplicaSet) {
        self.sets.lock().insert(extent, set);
        self.bump_changed();
    }

    /// Every allocated extent and its set, sorted.
    pub fn all(&self) -> Vec<(ExtentId, ReplicaSet)> {
        let mut v: Vec<_> = self
            .sets
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// How many members or learners were removed so far.
    pub fn removals(&self) -> u64 {
        self.removals.load(Ordering::Relaxed)
    }

    /// Make `chunk` a learner of `extent` (epoch + 1), as meta does when it
    /// queues a recovery task. `None` if the extent is unknown or the chunk
    /// already holds it.
    pub fn add_learner(&self, extent: &ExtentId, chunk: ChunkId) -> Option<ReplicaSet> {
        let mut sets = self.sets.lock();
        let set = sets.get_mut(extent)?;
        if set.holds(&chunk) {
            return None;
        }
        set.learners.push(chunk);
        set.epoch += 1;
        let set = set.clone();
        drop(sets);
        self.bump_changed();
        Some(set)
    }

    /// Make learner `chunk` a member (epoch + 1), as meta does when its
    /// copy completes. `None` if it is not a learner of `extent`.
    pub fn promote(&self, extent: &ExtentId, chunk: &ChunkId) -> Option<ReplicaSet> {
        let mut sets = self.sets.lock();
        let set = sets.get_mut(extent)?;
        if !set.is_learner(chunk) {
            return None;
        }
        set.learners.retain(|c| c != chunk);
        set.members.push(chunk.clone());
        set.epoch += 1;
        let set = set.clone();
        drop(sets);
        self.bump_changed();
        Some(set)
    }
}

#[async_trait]
impl Membership for InMemoryMembership {
    async fn resolve(&self, volume: &str, index: u64) -> Result<Resolved, MembershipError> {
        let cow = self.cow.lock();
        let sets = self.sets.lock();
        Ok(cow.resolve(&sets, volume, index))
    }

    async fn copy_up(&self, volume: &str, index: u64) -> Result<CopyUp, MembershipError> {
        self.cow_copy_up(volume, index)
    }

    async fn commit_copy_up(
        &self,
        volume: &str,
        index: u64,
        dst: &ExtentId,
    ) -> Result<ExtentView, MembershipError> {
        self.cow_commit(volume, index, dst)
    }

    async fn current(&self, extent: &ExtentId) -> Result<Option<ReplicaSet>, MembershipError> {
        Ok(self.get(extent))
    }

    async fn remove_member(
        &self,
        extent: &ExtentId,
        failed: &ChunkId,
        seen_epoch: u64,
    ) -> Result<ReplicaSet, MembershipError> {
        let mut sets = self.sets.lock();
        let set = sets
            .get_mut(extent)
            .ok_or_else(|| MembershipError::NotFound(extent.clone()))?;
        if set.epoch == seen_epoch && set.holds(failed) {
            let learner = set.is_learner(failed);
            set.members.retain(|m| m != failed);
            set.learners.retain(|m| m != failed);
            set.epoch += 1;
            self.removals.fetch_add(1, Ordering::Relaxed);
            tracing::info!(extent = %extent, chunk = %failed, epoch = set.epoch, learner, "replica removed");
            let set = set.clone();
            drop(sets);
            self.bump_changed();
            return Ok(set);
        }
        Ok(set.clone())
    }

    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.changed.subscribe())
    }

    async fn ensure_extent(&self, volume: &str, index: u64) -> Result<ReplicaSet, MembershipError> {
        let cow = self.cow.lock();
        let mut sets = self.sets.lock();
        let id = ExtentId::new(store_key(volume, cow.generation(volume)), index);
        if let Some(s) = sets.get(&id) {
            if cow.pending.contains(&id) {
                return Err(MembershipError::CopyUpRequired(format!(
                    "copy-up of {id} in progress"
                )));
            }
            return Ok(s.clone());
        }
        if let Some(src) = cow.resolve(&sets, volume, index).read {
            return Err(MembershipError::CopyUpRequired(format!(
                "{id} must be copied up from {}",
                src.id
            )));
        }
        self.place(&mut sets, id)
    }
}

/// The copy-on-write model of [`InMemoryMembership`]: volume generations,
/// clone parents, pending copy-up destinations (mirrors meta's rules).
#[derive(Default)]
struct CowModel {
    /// volume -> current generation (absent: 0).
    generations: HashMap<String, u64>,
    /// clone -> (parent volume, snapshot generation, snapshot extents).
    parents: HashMap<String, (String, u64, u64)>,
    pending: std::collections::HashSet<ExtentId>,
}

/// Bound on clone chains walked while resolving.
const MAX_CLONE_DEPTH: usize = 64;

impl CowModel {
    fn generation(&self, volume: &str) -> u64 {
        self.generations.get(volume).copied().unwrap_or(0)
    }

    fn view(
        &self,
        sets: &HashMap<ExtentId, ReplicaSet>,
        id: &ExtentId,
        gen: u64,
    ) -> Option<ExtentView> {
        sets.get(id).map(|set| ExtentView {
            id: id.clone(),
            set: set.clone(),
            generation: gen,
            pending: self.pending.contains(id),
        })
    }

    fn resolve(&self, sets: &HashMap<ExtentId, ReplicaSet>, volume: &str, index: u64) -> Resolved {
        let current = self.generation(volume);
        let mut vol = volume.to_string();
        let mut max_gen = current;
        let mut read = None;
        'walk: for _ in 0..MAX_CLONE_DEPTH {
            for g in (0..=max_gen).rev() {
                let id = ExtentId::new(store_key(&vol, g), index);
                if sets.contains_key(&id) && !self.pending.contains(&id) {
                    read = self.view(sets, &id, g);
                    break 'walk;
                }
            }
            match self.parents.get(&vol) {
                Some((p, g, extents)) if index < *extents => {
                    vol = p.clone();
                    max_gen = *g;
                }
                _ => break,
            }
        }
        let own_key = store_key(volume, current);
        let own = read.clone().filter(|v| v.id.volume == own_key);
        Resolved { read, own }
    }
}

impl InMemoryMembership {
    /// Take a snapshot of `volume`: freezes its current generation (returned)
    /// and moves it to the next one, like meta's CreateSnapshot.
    pub fn snapshot(&self, volume: &str) -> u64 {
        let mut cow = self.cow.lock();
        let g = cow.generations.entry(volume.to_string()).or_insert(0);
        *g += 1;
        *g - 1
    }

    /// Make `clone` a clone of the snapshot `(parent, generation)` covering
    /// `extents` extents, like meta's CloneVolume.
    pub fn clone_volume(&self, clone: &str, parent: &str, generation: u64, extents: u64) {
        self.cow
            .lock()
            .parents
            .insert(clone.to_string(), (parent.to_string(), generation, extents));
    }

    /// The volume's current generation.
    pub fn generation(&self, volume: &str) -> u64 {
        self.cow.lock().generation(volume)
    }

    /// Whether `extent` is a pending copy-up destination.
    pub fn is_pending(&self, extent: &ExtentId) -> bool {
        self.cow.lock().pending.contains(extent)
    }

    /// Place `id` on `replication` chunks, rotating by index.
    fn place(
        &self,
        sets: &mut HashMap<ExtentId, ReplicaSet>,
        id: ExtentId,
    ) -> Result<ReplicaSet, MembershipError> {
        if self.chunks.is_empty() || self.replication == 0 {
            return Err(MembershipError::NoPlacement {
                extent: id,
                reason: "no chunks".into(),
            });
        }
        let n = self.replication.min(self.chunks.len());
        let start = (id.index % self.chunks.len() as u64) as usize;
        let members = (0..n)
            .map(|i| self.chunks[(start + i) % self.chunks.len()].clone())
            .collect();
        let set = ReplicaSet::new(1, members);
        sets.insert(id, set.clone());
        Ok(set)
    }

    fn cow_copy_up(&self, volume: &str, index: u64) -> Result<CopyUp, MembershipError> {
        let mut cow = self.cow.lock();
        let mut sets = self.sets.lock();
        let g = cow.generation(volume);
        let id = ExtentId::new(store_key(volume, g), index);
        let source = cow.resolve(&sets, volume, index).read;
        if let Some(dst) = cow.view(&sets, &id, g) {
            return Ok(CopyUp {
                source,
                destination: dst,
            });
        }
        let Some(src) = source else {
            let set = self.place(&mut sets, id.clone())?;
            return Ok(CopyUp {
                source: None,
                destination: ExtentView {
                    id,
                    set,
                    generation: g,
                    pending: false,
                },
            });
        };
        let mut members = src.set.members.clone();
        members.truncate(self.replication.max(1));
        let set = ReplicaSet::new(1, members);
        sets.insert(id.clone(), set.clone());
        cow.pending.insert(id.clone());
        tracing::info!(from = %src.id, to = %id, "copy-up started");
        Ok(CopyUp {
            source: Some(src),
            destination: ExtentView {
                id,
                set,
                generation: g,
                pending: true,
            },
        })
    }

    fn cow_commit(
        &self,
        volume: &str,
        index: u64,
        dst: &ExtentId,
    ) -> Result<ExtentView, MembershipError> {
        let mut cow = self.cow.lock();
        let mut sets = self.sets.lock();
        let owner_ok = dst.volume == volume || dst.volume.starts_with(&format!("{volume}.g"));
        if dst.index != index || !owner_ok {
            return Err(MembershipError::Other(format!(
                "{dst} is not extent {index} of volume {volume}"
            )));
        }
        let set = sets
            .get_mut(dst)
            .ok_or_else(|| MembershipError::NotFound(dst.clone()))?;
        if cow.pending.remove(dst) {
            set.epoch += 1;
            tracing::info!(extent = %dst, epoch = set.epoch, "copy-up committed");
        }
        let generation = dst
            .volume
            .rsplit_once(".g")
            .and_then(|(_, g)| g.parse().ok())
            .unwrap_or(0);
        Ok(ExtentView {
            id: dst.clone(),
            set: set.clone(),
            generation,
            pending: false,
        })
    }
}

/// [`ReplicaPeer`] over an [`ExtentStore`]: this chunk's own copy (and, in
/// tests, in-process "remote" chunks).
pub struct LocalPeer {
    chunk: ChunkId,
    store: ExtentStore,
}

impl LocalPeer {
    /// The peer is named by the store's stamped chunk id.
    pub fn new(store: ExtentStore) -> Self {
        let chunk = ChunkId(store.identity().chunk_id.clone());
        LocalPeer { chunk, store }
    }

    pub fn store(&self) -> &ExtentStore {
        &self.store
    }

    /// The epoch a missing `extent` is fenced at if garbage collection
    /// retired it at `epoch` or later (see `store/retired.rs`).
    fn retired_at_or_above(&self, extent: &ExtentId, epoch: u64) -> Option<u64> {
        self.store
            .retired_epoch(extent)
            .filter(|have| *have >= epoch)
    }

    /// Create `extent` at `epoch` if it does not exist (a racing create is
    /// fine).
    async fn ensure(&self, extent: &ExtentId, epoch: u64) -> Result<(), PeerError> {
        match self.store.create_extent(extent, epoch).await {
            Ok(()) | Err(StoreError::Exists(_)) => Ok(()),
            Err(e) => Err(map_store(e)),
        }
    }
}

/// Store errors as a peer reports them.
fn map_store(e: StoreError) -> PeerError {
    match e {
        StoreError::StaleEpoch { have, got } => PeerError::StaleEpoch { have, got },
        StoreError::Checksum { block, .. } => PeerError::Checksum { block },
        StoreError::NoSpace => PeerError::NoSpace,
        other => PeerError::Other(other.to_string()),
    }
}

/// Upper bound on the create-then-retry loop for a missing extent (a
/// concurrent delete could make it vanish again).
const CREATE_RETRIES: usize = 3;

#[async_trait]
impl ReplicaPeer for LocalPeer {
    fn chunk(&self) -> &ChunkId {
        &self.chunk
    }

    async fn write(
        &self,
        extent: &ExtentId,
        epoch: u64,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> Result<(), PeerError> {
        for _ in 0..CREATE_RETRIES {
            match self
                .store
                .write(extent, epoch, offset, data.clone(), fua)
                .await
            {
                Err(StoreError::NotFound(_)) => self.ensure(extent, epoch).await?,
                r => return r.map_err(map_store),
            }
        }
        Err(PeerError::Other(format!("extent {extent} keeps vanishing")))
    }

    async fn read(
        &self,
        extent: &ExtentId,
        epoch: u64,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, PeerError> {
        match self.store.extent_epoch(extent) {
            Ok(have) if have > epoch => return Err(PeerError::StaleEpoch { have, got: epoch }),
            Ok(_) => {}
            Err(StoreError::NotFound(_)) => {
                // Garbage collection retired this copy (meta dropped this
                // chunk from the set): the caller's view is older than
                // that, and zeros would be wrong data. Refresh instead.
                if let Some(have) = self.retired_at_or_above(extent, epoch) {
                    return Err(PeerError::StaleEpoch { have, got: epoch });
                }
                // Never written here: thin, reads as zeros (still
                // range-checked).
                return if len == 0
                    || !offset.is_multiple_of(BLOCK_SIZE)
                    || !len.is_multiple_of(BLOCK_SIZE)
                {
                    Err(PeerError::Other(format!(
                        "unaligned read at {offset} length {len}"
                    )))
                } else {
                    Ok(Bytes::from(vec![0u8; len as usize]))
                };
            }
            Err(e) => return Err(map_store(e)),
        }
        match self.store.read(extent, offset, len).await {
            Err(StoreError::NotFound(_)) => match self.retired_at_or_above(extent, epoch) {
                // Retired between the epoch check and the read.
                Some(have) => Err(PeerError::StaleEpoch { have, got: epoch }),
                None => Ok(Bytes::from(vec![0u8; len as usize])),
            },
            r => r.map_err(map_store),
        }
    }

    async fn flush(&self, extent: &ExtentId) -> Result<(), PeerError> {
        match self.store.flush(Some(extent)).await {
            Ok(()) | Err(StoreError::NotFound(_)) => Ok(()),
            Err(e) => Err(map_store(e)),
        }
    }

    async fn unmap(
        &self,
        extent: &ExtentId,
        epoch: u64,
        offset: u64,
        len: u64,
    ) -> Result<(), PeerError> {
        match self.store.unmap(extent, epoch, offset, len).await {
            // Nothing stored here; make sure the epoch still fences.
            Err(StoreError::NotFound(_)) => self.ensure(extent, epoch).await,
            r => r.map_err(map_store),
        }
    }

    async fn repair(&self, extent: &ExtentId, block: u64, good: Bytes) -> Result<(), PeerError> {
        self.store
            .repair(extent, block, good)
            .await
            .map(|_| ())
            .map_err(map_store)
    }

    async fn fence(&self, extent: &ExtentId, epoch: u64) -> Result<(), PeerError> {
        for _ in 0..CREATE_RETRIES {
            match self.store.set_epoch(extent, epoch).await {
                Err(StoreError::NotFound(_)) => self.ensure(extent, epoch).await?,
                r => return r.map_err(map_store),
            }
        }
        Err(PeerError::Other(format!("extent {extent} keeps vanishing")))
    }

    async fn copy_extent(
        &self,
        src: &ExtentId,
        dst: &ExtentId,
        epoch: u64,
    ) -> Result<(), PeerError> {
        self.store
            .copy_extent(src, dst, epoch)
            .await
            .map_err(map_store)
    }
}
