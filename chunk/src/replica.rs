//! The seams of synchronous replication, independent of any transport.
//!
//! This module owns the *vocabulary* the volume data path
//! ([`crate::volume`]) is written against, and nothing that talks to a
//! network:
//!
//! - [`ReplicaSet`]: the members of one extent's replica set and the set's
//!   epoch, as meta records it.
//! - [`ReplicaPeer`]: one chunk's copy of extents as seen from an access
//!   point (the chunk serving the iSCSI session). The gRPC (or any other)
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
/// is created (at the request's epoch) by the first write or fence.
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
    #[error("membership error: {0}")]
    Other(String),
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
    /// if it does not exist yet. Idempotent.
    async fn ensure_extent(&self, volume: &str, index: u64) -> Result<ReplicaSet, MembershipError>;
}

/// An in-process [`Membership`] (tests, simulation): places new extents on
/// `replication` chunks of a fixed list, rotating by extent index, and keeps
/// every set in memory.
pub struct InMemoryMembership {
    chunks: Vec<ChunkId>,
    replication: usize,
    sets: Mutex<HashMap<ExtentId, ReplicaSet>>,
    removals: AtomicU64,
}

impl InMemoryMembership {
    /// Place new extents on `replication` of `chunks` (all of them if fewer).
    pub fn new(chunks: Vec<ChunkId>, replication: usize) -> Self {
        InMemoryMembership {
            chunks,
            replication,
            sets: Mutex::new(HashMap::new()),
            removals: AtomicU64::new(0),
        }
    }

    /// The set of `extent` without allocating it.
    pub fn get(&self, extent: &ExtentId) -> Option<ReplicaSet> {
        self.sets.lock().get(extent).cloned()
    }

    /// Replace the set of `extent` (an operator / recovery action).
    pub fn set(&self, extent: ExtentId, set: ReplicaSet) {
        self.sets.lock().insert(extent, set);
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
        Some(set.clone())
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
        Some(set.clone())
    }
}

#[async_trait]
impl Membership for InMemoryMembership {
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
        }
        Ok(set.clone())
    }

    async fn ensure_extent(&self, volume: &str, index: u64) -> Result<ReplicaSet, MembershipError> {
        let id = ExtentId::new(volume, index);
        let mut sets = self.sets.lock();
        if let Some(s) = sets.get(&id) {
            return Ok(s.clone());
        }
        if self.chunks.is_empty() || self.replication == 0 {
            return Err(MembershipError::NoPlacement {
                extent: id,
                reason: "no chunks".into(),
            });
        }
        let n = self.replication.min(self.chunks.len());
        let start = (index % self.chunks.len() as u64) as usize;
        let members = (0..n)
            .map(|i| self.chunks[(start + i) % self.chunks.len()].clone())
            .collect();
        let set = ReplicaSet::new(1, members);
        sets.insert(id, set.clone());
        Ok(set)
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
            // Never written here: thin, reads as zeros (still range-checked).
            Err(StoreError::NotFound(_)) => {
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
            Err(StoreError::NotFound(_)) => Ok(Bytes::from(vec![0u8; len as usize])),
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
}
